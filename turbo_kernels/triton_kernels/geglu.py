"""Triton kernels of the GEGLU activation of the transformer feed-forward (SPEC 1): out = value *
gelu(gate), value and gate the two halves of the last dimension of h (..., 2 x hidden).

Both are memory-bound streams over (rows, hidden) tiles of the output: the forward reads h once and
writes out; the backward reads h and the output's gradient once and writes both halves of h's
gradient into one buffer, so no concatenation follows. h's row stride is an argument (rows may be any view with unit
channel stride); maths is fp32 whatever the storage dtype, exact (erf) GELU.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from turbo_kernels.triton_kernels.fast_launch import jit
from turbo_kernels.triton_kernels.launch_config import cdiv, storage_configs

# A program takes BLOCK_ROWS rows x BLOCK_COLUMNS output columns: 2048 elements over 4 warps, 16 per
# thread in runs of 8 along a row (16-byte vectors at fp16/bf16). Rows go on grid axis 0 (a UNet
# level has up to 160k tokens), column blocks on axis 1 (hidden = 4 C: at most 20 blocks).
BLOCK_ROWS = 8
BLOCK_COLUMNS = 256
NUM_WARPS = 4
# Globals a @triton.jit function reads must be constexpr.
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@jit
def _tile(rows, hidden, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    column = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)[None, :]
    return row, column, (row < rows) & (column < hidden)


@jit
def geglu_fwd_kernel(
    h_ptr, out_ptr, rows, hidden, h_row_stride, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr
):
    row, column, mask = _tile(rows, hidden, BLOCK_ROWS, BLOCK_COLUMNS)
    value_ptrs = h_ptr + row * h_row_stride + column
    value = tl.load(value_ptrs, mask=mask).to(tl.float32)
    gate = tl.load(value_ptrs + hidden, mask=mask).to(tl.float32)
    out = value * gate * 0.5 * (1.0 + tl.math.erf(gate * SQRT_HALF))
    tl.store(out_ptr + row * hidden + column, out.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def geglu_bwd_kernel(
    grad_ptr, h_ptr, grad_h_ptr, rows, hidden, h_row_stride, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr
):
    row, column, mask = _tile(rows, hidden, BLOCK_ROWS, BLOCK_COLUMNS)
    grad = tl.load(grad_ptr + row * hidden + column, mask=mask).to(tl.float32)
    value_ptrs = h_ptr + row * h_row_stride + column
    value = tl.load(value_ptrs, mask=mask).to(tl.float32)
    gate = tl.load(value_ptrs + hidden, mask=mask).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(gate * SQRT_HALF))
    pdf = tl.exp(-0.5 * gate * gate) * INV_SQRT_2PI
    # grad_h is contiguous (rows, 2 x hidden): each row's value half, then its gate half.
    grad_value_ptrs = grad_h_ptr + row * (2 * hidden) + column
    tl.store(grad_value_ptrs, (grad * gate * cdf).to(grad_h_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_value_ptrs + hidden, (grad * value * (cdf + gate * pdf)).to(grad_h_ptr.dtype.element_ty), mask=mask)


# Production launch configurations (see launch_config.py), compiled ahead of time by
# `python -m turbo_kernels.kernel_report`.
_ARGS = dict(rows="i32", hidden="i32", h_row_stride="i32")
_TILE = dict(BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS)
REPORT_CONFIGS = [
    *storage_configs(geglu_fwd_kernel, _ARGS, _TILE, NUM_WARPS),
    *storage_configs(geglu_bwd_kernel, _ARGS, _TILE, NUM_WARPS),
]


def new_output(shape, like: Tensor) -> Tensor:
    """Every output buffer is allocated here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _rows(h: Tensor) -> Tensor:
    """h as (rows, 2 x hidden) without a copy (the op's checks guarantee a view exists)."""
    return h.view(-1, h.shape[-1])


def _grid(rows: int, hidden: int) -> tuple[int, int]:
    return cdiv(rows, BLOCK_ROWS), cdiv(hidden, BLOCK_COLUMNS)


def geglu(h: Tensor) -> Tensor:
    hidden = h.shape[-1] // 2
    out = new_output((*h.shape[:-1], hidden), h)
    if out.numel() == 0:
        return out
    rows = _rows(h)
    geglu_fwd_kernel[_grid(rows.shape[0], hidden)](
        rows, out, rows.shape[0], hidden, rows.stride(0), **_TILE, num_warps=NUM_WARPS
    )
    return out


def geglu_backward(grad_out: Tensor, h: Tensor) -> Tensor:
    hidden = h.shape[-1] // 2
    grad_h = new_output(h.shape, h)
    if grad_h.numel() == 0:
        return grad_h
    rows = _rows(h)
    geglu_bwd_kernel[_grid(rows.shape[0], hidden)](
        grad_out.contiguous(), rows, grad_h, rows.shape[0], hidden, rows.stride(0), **_TILE, num_warps=NUM_WARPS
    )
    return grad_h
