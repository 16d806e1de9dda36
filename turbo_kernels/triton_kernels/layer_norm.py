"""Triton kernels of LayerNorm over the last dimension with affine weight and bias, as the temporal
transformer's norm1/norm2/norm3 apply it to (tokens, inner) rows.

A program holds whole rows (all channels, padded to a power of two) in registers, so statistics,
normalisation and affine take one read of x and one write. The backward recomputes each row's
mean and rstd from x instead of saving them (they cost no extra read: the row of x is read for x̂
anyway), writes d x, and reduces grad_out * x̂ and grad_out over the rows it walks into one
float32 partial row of d weight and d bias per program; the host sums the partials (deterministic:
no atomics). This replaces torch's backward, whose weight and bias gradient kernel took 176 µs per
call at 40960 x 320 bf16 on an H100 (torch 2.11; about 10% of the measured copy rate). weight and
bias may be in another storage dtype than x (they are read in float32 either way).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from turbo_kernels.triton_kernels.fast_launch import jit
from turbo_kernels.triton_kernels.launch_config import cdiv, next_power_of_2, storage_configs

# Rows x padded channels a program holds at once: 4096 elements, 32 fp32 values a thread at 4 warps.
TILE_ELEMENTS = 4096
# Widest row the kernels take (8 warps, one row a tile step); wider rows fall back to the reference.
MAX_CHANNELS = 8192
# The backward's programs, at most: each walks a run of rows and writes one partial row of d weight
# and d bias, so the partials stay small (at most MAX_PROGRAMS x channels float32).
MAX_PROGRAMS = 1024


@jit
def _row_statistics(x, channel_mask, channels, eps):
    """Per row of a [ROWS, CHANNELS] fp32 tile (padded channels 0): x - mean (0 where padded), rstd."""
    mean = tl.sum(x, axis=1) / channels
    centred = tl.where(channel_mask, x - mean[:, None], 0.0)
    # The fp32 mean is off by up to an ulp of itself, which rstd magnifies where a row's spread is
    # small against its mean (a constant row normalised to 0.05 instead of 0 at eps 1e-12): the
    # centred values' own mean, computed exactly enough, takes that error out (the corrected
    # two-pass algorithm). The tile is in registers, so it costs arithmetic only.
    centred = tl.where(channel_mask, centred - (tl.sum(centred, axis=1) / channels)[:, None], 0.0)
    variance = tl.sum(centred * centred, axis=1) / channels
    return centred, tl.div_rn(1.0, tl.sqrt_rn(variance + eps))


@jit
def layer_norm_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr, rows, channels, x_row_stride, eps,
    BLOCK_ROWS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    channel = tl.arange(0, BLOCK_CHANNELS)[None, :]
    channel_mask = channel < channels
    mask = (row < rows) & channel_mask
    x = tl.load(x_ptr + row * x_row_stride + channel, mask=mask, other=0.0).to(tl.float32)
    centred, rstd = _row_statistics(x, channel_mask, channels, eps)
    weight = tl.load(weight_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
    out = centred * rstd[:, None] * weight + bias
    tl.store(out_ptr + row * channels + channel, out.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def layer_norm_bwd_kernel(
    grad_ptr, x_ptr, weight_ptr, grad_x_ptr, partial_weight_ptr, partial_bias_ptr,
    rows, channels, x_row_stride, eps, rows_per_program,
    BLOCK_ROWS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):
    program = tl.program_id(0)
    channel = tl.arange(0, BLOCK_CHANNELS)[None, :]
    channel_mask = channel < channels
    weight = tl.load(weight_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)
    weight_sum = tl.zeros([BLOCK_ROWS, BLOCK_CHANNELS], tl.float32)
    bias_sum = tl.zeros([BLOCK_ROWS, BLOCK_CHANNELS], tl.float32)
    first = program.to(tl.int64) * rows_per_program
    # rows_per_program is a multiple of BLOCK_ROWS: programs never share a row.
    for start in range(0, rows_per_program, BLOCK_ROWS):
        row = first + start + tl.arange(0, BLOCK_ROWS)[:, None]
        mask = (row < rows) & channel_mask
        x = tl.load(x_ptr + row * x_row_stride + channel, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + row * channels + channel, mask=mask, other=0.0).to(tl.float32)
        centred, rstd = _row_statistics(x, channel_mask, channels, eps)
        normalised = centred * rstd[:, None]
        g = grad * weight
        mean_g = tl.sum(g, axis=1) / channels
        mean_g_normalised = tl.sum(g * normalised, axis=1) / channels
        grad_x = rstd[:, None] * (g - mean_g[:, None] - normalised * mean_g_normalised[:, None])
        tl.store(grad_x_ptr + row * channels + channel, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        # Rows past the end loaded grad = 0 and add nothing.
        weight_sum += grad * normalised
        bias_sum += grad
    partial = program.to(tl.int64) * channels + tl.arange(0, BLOCK_CHANNELS)
    partial_mask = tl.arange(0, BLOCK_CHANNELS) < channels
    tl.store(partial_weight_ptr + partial, tl.sum(weight_sum, axis=0), mask=partial_mask)
    tl.store(partial_bias_ptr + partial, tl.sum(bias_sum, axis=0), mask=partial_mask)


def tile(channels: int, backward: bool = False) -> tuple[dict, int]:
    """BLOCK_ROWS x BLOCK_CHANNELS for rows of `channels`, and the warps. The backward keeps about
    seven tiles live (forward: three), so it spreads the same tile over twice the warps: 16 values
    a thread, 115-128 registers (sm_90a, kernel_report) instead of 193-236 at 4 warps, so more
    warps fit on an SM to hide the loads' latency."""
    block_channels = next_power_of_2(channels)
    params = dict(BLOCK_ROWS=max(1, TILE_ELEMENTS // block_channels), BLOCK_CHANNELS=block_channels)
    wide = block_channels > TILE_ELEMENTS
    return params, 8 if wide or backward else 4


# Production launch configurations (see launch_config.py), compiled ahead of time by
# `python -m turbo_kernels.kernel_report`: the temporal transformer's inner widths, with float32
# parameters as autocast training holds them.
_FWD_ARGS = dict(weight_ptr="*fp32", bias_ptr="*fp32", rows="i32", channels="i32", x_row_stride="i32", eps="fp32")
_BWD_ARGS = dict(
    weight_ptr="*fp32", partial_weight_ptr="*fp32", partial_bias_ptr="*fp32", rows="i32", channels="i32",
    x_row_stride="i32", eps="fp32", rows_per_program="i32",
)
REPORT_CONFIGS = [
    config
    for channels in (320, 640, 1280)
    for kernel, args, backward in ((layer_norm_fwd_kernel, _FWD_ARGS, False), (layer_norm_bwd_kernel, _BWD_ARGS, True))
    for config in storage_configs(kernel, args, *tile(channels, backward))
]


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer is allocated here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(x: Tensor) -> Tensor:
    """x as (rows, channels) without a copy (the op's checks guarantee a view exists)."""
    return x.view(-1, x.shape[-1])


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    out = new_output(x.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    rows = _rows(x)
    params, num_warps = tile(rows.shape[1])
    layer_norm_fwd_kernel[(cdiv(rows.shape[0], params["BLOCK_ROWS"]),)](
        rows, weight, bias, out, rows.shape[0], rows.shape[1], rows.stride(0), float(eps),
        num_warps=num_warps, **params,
    )
    return out


def rows_per_program(rows: int, block_rows: int) -> int:
    """Rows a backward program walks: a multiple of block_rows, so that at most MAX_PROGRAMS run."""
    return block_rows * max(1, cdiv(cdiv(rows, block_rows), MAX_PROGRAMS))


def layer_norm_backward(grad_out: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    channels = x.shape[-1]
    grad_x = new_output(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        zeros = torch.zeros(channels, dtype=torch.float32, device=x.device)
        return grad_x, zeros, zeros.clone()
    rows = _rows(x)
    params, num_warps = tile(channels, backward=True)
    run = rows_per_program(rows.shape[0], params["BLOCK_ROWS"])
    programs = cdiv(rows.shape[0], run)
    partial_weight = new_output((programs, channels), torch.float32, x.device)
    partial_bias = new_output((programs, channels), torch.float32, x.device)
    layer_norm_bwd_kernel[(programs,)](
        grad_out.contiguous(), rows, weight, grad_x, partial_weight, partial_bias,
        rows.shape[0], channels, rows.stride(0), float(eps), run, num_warps=num_warps, **params,
    )
    return grad_x, partial_weight.sum(dim=0), partial_bias.sum(dim=0)
