"""Triton kernels of temporal attention: softmax(scale q k^T) v over the F frames of every
(sequence, head), forward and backward.

Temporal attention in a video UNet is a huge batch of tiny attentions (F = 16 frames, head dim 64,
10^4 to 10^5 sequences times 5 to 20 heads): memory- and launch-bound, never compute-bound. So one
program packs ROWS // F_PAD whole sequences of one head into a ROWS-row tile (tile row r holds
frame r % F_PAD of the tile's sequence r // F_PAD, frames padded to a power of two) and runs all of
their attentions as one block-diagonal ROWS x ROWS product, masking the keys of other sequences
and padded frames out of every row. That spends ROWS / F_PAD times the useful arithmetic (1x
by default from F = 9 up, a tile being one sequence; 16 / F_PAD below, tl.dot's 16 rows) on full
tensor-core tiles, with no reshapes, and stays far below the arithmetic intensity at which an H100
stops being bandwidth-bound.

Addressing: element c of head h of token (sequence s = b*N + n, frame f) lives at
b*stride_b + n*stride_n + f*stride_f + h*HEAD_DIM + c in both layouts (see `sequence_strides`), so
the kernels read the native layout and any strided view (q, k, v as slices of one fused qkv
projection) without copies; only the channel dimension must be unit-stride.

The forward saves the logsumexp of every query row (fp32, (sequences, heads, F)); the backward
recomputes the probabilities from q, k and it (FlashAttention): dP = dO v^T,
dS = P (dP - rowsum(P dP)), dq = scale dS k, dk = scale dS^T q, dv = P^T dO. Each program holds
whole sequences, so it has whole rows of P (the row sums need no output O) and every gradient row
is written by exactly one program, without atomics. Softmax and accumulation are fp32;
probabilities are rounded to the storage dtype only as tensor-core operands, as FlashAttention does.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from turbo_kernels.triton_kernels.fast_launch import jit
from turbo_kernels.triton_kernels.launch_config import KernelConfig, cdiv, next_power_of_2, storage_configs

MAX_FRAMES = 64
MAX_HEAD_DIM = 128
# tl.dot needs every matrix dimension to be at least 16.
MIN_DOT = 16
# 16-bit storage: tiles of one sequence's padded frames (16 rows at VideoCrafter2's 16 frames) on
# tensor cores, a warp per 16 rows. The H200 tile sweep (benchmarks/results/nvidia-h200-20261128T054407Z.json)
# put 16 rows and 1 warp first at all four UNet levels, forward and forward+backward: 1.08-1.20x
# the 64 rows and 4 warps before it, 1.07-1.20x 32 rows and 2 warps; more rows than a sequence only
# add block-diagonal waste to the ROWS x ROWS score tiles.
TENSOR_CORE_ROWS = 16
ROWS_PER_WARP = 16
# fp32 storage needs exact fp32 products (input_precision="ieee", as the fp32 reference computes),
# which run on CUDA cores, where the block-diagonal waste costs time and registers: 16-row tiles,
# one 16-frame sequence, and 8 warps once a tile holds more than 16 x 64 elements.
FP32_ROWS = 16
FP32_WARPS_FROM_ELEMENTS = 16 * 64
FP32_NUM_WARPS = 4
TILE_WARPS = (1, 2, 4, 8)
# (tile rows, num_warps)
Tile = tuple[int, int]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@jit
def _tile(num_sequences, num_positions, heads, NUM_FRAMES: tl.constexpr, HEAD_DIM: tl.constexpr,
          F_PAD: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr):
    """This program's tile: each row's video b, position n and frame, its index in the lse, the
    channels of the program's head, the masks of real elements, and which keys each row attends to."""
    # Axis 0 walks the heads fastest, so neighbouring programs read neighbouring channels of the
    # same tokens.
    head = tl.program_id(0) % heads
    slot = tl.arange(0, ROWS) // F_PAD
    frame = tl.arange(0, ROWS) % F_PAD
    seq = (tl.program_id(0) // heads) * (ROWS // F_PAD) + slot
    row_valid = (seq < num_sequences) & (frame < NUM_FRAMES)
    # int64 offsets: fused qkv projections of large batches pass 2^31 elements.
    b = (seq // num_positions).to(tl.int64)
    n = (seq % num_positions).to(tl.int64)
    lse_index = (seq.to(tl.int64) * heads + head) * NUM_FRAMES + frame
    channels = head * HEAD_DIM + tl.arange(0, D_PAD)
    tile_mask = row_valid[:, None] & (tl.arange(0, D_PAD) < HEAD_DIM)[None, :]
    # Row i attends to key j only within its own sequence and to real frames.
    attends = (slot[:, None] == slot[None, :]) & (frame < NUM_FRAMES)[None, :]
    return b, n, frame, lse_index, row_valid, channels, tile_mask, attends


@jit
def _offsets(b, n, frame, channels, stride_b, stride_n, stride_f):
    """Element offsets of the tile's (rows, channels) in a tensor of the given strides."""
    rows = b * stride_b + n * stride_n + frame.to(tl.int64) * stride_f
    return rows[:, None] + channels[None, :]


@jit
def temporal_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    num_sequences, num_positions, heads, scale,
    q_stride_b, q_stride_n, q_stride_f,
    k_stride_b, k_stride_n, k_stride_f,
    v_stride_b, v_stride_n, v_stride_f,
    out_stride_b, out_stride_n, out_stride_f,
    NUM_FRAMES: tl.constexpr, HEAD_DIM: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ROWS: tl.constexpr,
):
    b, n, frame, lse_index, row_valid, channels, tile_mask, attends = _tile(
        num_sequences, num_positions, heads, NUM_FRAMES, HEAD_DIM, F_PAD, D_PAD, ROWS
    )
    q = tl.load(q_ptr + _offsets(b, n, frame, channels, q_stride_b, q_stride_n, q_stride_f), mask=tile_mask, other=0.0)
    k = tl.load(k_ptr + _offsets(b, n, frame, channels, k_stride_b, k_stride_n, k_stride_f), mask=tile_mask, other=0.0)
    logits = tl.dot(q, tl.trans(k), input_precision="ieee") * (scale * LOG2E)
    logits = tl.where(attends, logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    p = tl.exp2(logits - row_max[:, None])
    row_sum = tl.sum(p, axis=1)

    v = tl.load(v_ptr + _offsets(b, n, frame, channels, v_stride_b, v_stride_n, v_stride_f), mask=tile_mask, other=0.0)
    out = tl.dot(p.to(v.dtype), v, input_precision="ieee") / row_sum[:, None]
    out_ptrs = out_ptr + _offsets(b, n, frame, channels, out_stride_b, out_stride_n, out_stride_f)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(lse_ptr + lse_index, (row_max + tl.log2(row_sum)) * LN2, mask=row_valid)


@jit
def temporal_attention_bwd_kernel(
    grad_out_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, grad_q_ptr, grad_k_ptr, grad_v_ptr,
    num_sequences, num_positions, heads, scale,
    grad_out_stride_b, grad_out_stride_n, grad_out_stride_f,
    q_stride_b, q_stride_n, q_stride_f,
    k_stride_b, k_stride_n, k_stride_f,
    v_stride_b, v_stride_n, v_stride_f,
    grad_stride_b, grad_stride_n, grad_stride_f,
    NUM_FRAMES: tl.constexpr, HEAD_DIM: tl.constexpr, F_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ROWS: tl.constexpr,
):
    b, n, frame, lse_index, row_valid, channels, tile_mask, attends = _tile(
        num_sequences, num_positions, heads, NUM_FRAMES, HEAD_DIM, F_PAD, D_PAD, ROWS
    )
    # Padded rows load q = 0 and lse = 0, so their probabilities are finite and, with dO = 0 there,
    # they contribute nothing to any gradient.
    lse = tl.load(lse_ptr + lse_index, mask=row_valid, other=0.0)
    q = tl.load(q_ptr + _offsets(b, n, frame, channels, q_stride_b, q_stride_n, q_stride_f), mask=tile_mask, other=0.0)
    k = tl.load(k_ptr + _offsets(b, n, frame, channels, k_stride_b, k_stride_n, k_stride_f), mask=tile_mask, other=0.0)
    logits = tl.dot(q, tl.trans(k), input_precision="ieee") * (scale * LOG2E)
    p = tl.where(attends, tl.exp2(logits - lse[:, None] * LOG2E), 0.0)
    # The lse only keeps exp2 in range: renormalising makes every row sum to 1 in fp32, so the
    # gradient of a constant softmax (F = 1) is exactly 0, not the lse round trip's residue.
    p = p / tl.sum(p, axis=1)[:, None]

    grad_out = tl.load(
        grad_out_ptr + _offsets(b, n, frame, channels, grad_out_stride_b, grad_out_stride_n, grad_out_stride_f),
        mask=tile_mask, other=0.0,
    )
    grad_offsets = _offsets(b, n, frame, channels, grad_stride_b, grad_stride_n, grad_stride_f)
    grad_v = tl.dot(tl.trans(p.to(grad_out.dtype)), grad_out, input_precision="ieee")
    tl.store(grad_v_ptr + grad_offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=tile_mask)

    v = tl.load(v_ptr + _offsets(b, n, frame, channels, v_stride_b, v_stride_n, v_stride_f), mask=tile_mask, other=0.0)
    grad_p = tl.dot(grad_out, tl.trans(v), input_precision="ieee")
    # delta_i = sum_j P_ij dP_ij from the fp32 tiles at hand: FlashAttention's sum_c dO_ic O_ic
    # equals it, but would read O and carry its storage rounding.
    delta = tl.sum(p * grad_p, axis=1)
    grad_logits = (p * (grad_p - delta[:, None])).to(q.dtype)
    grad_q = tl.dot(grad_logits, k, input_precision="ieee") * scale
    tl.store(grad_q_ptr + grad_offsets, grad_q.to(grad_q_ptr.dtype.element_ty), mask=tile_mask)
    grad_k = tl.dot(tl.trans(grad_logits), q, input_precision="ieee") * scale
    tl.store(grad_k_ptr + grad_offsets, grad_k.to(grad_k_ptr.dtype.element_ty), mask=tile_mask)


def launch_params(num_frames: int, head_dim: int, fp32: bool, tile: Optional[Tile] = None) -> tuple[dict, int]:
    """The kernels' constexprs and num_warps: frames and head dim padded to powers of two (and
    masked), and the tile rows, a multiple of the padded frame count. `tile` = (rows, num_warps)
    replaces the production choice (the benchmark harness's tile sweep)."""
    f_pad = next_power_of_2(num_frames)
    d_pad = max(next_power_of_2(head_dim), MIN_DOT)
    if tile is None:
        rows = max(FP32_ROWS if fp32 else TENSOR_CORE_ROWS, f_pad)
        if fp32:
            num_warps = 8 if rows * d_pad > FP32_WARPS_FROM_ELEMENTS else FP32_NUM_WARPS
        else:
            num_warps = rows // ROWS_PER_WARP
    else:
        rows, num_warps = tile
        if rows < max(f_pad, MIN_DOT) or rows != next_power_of_2(rows) or num_warps not in TILE_WARPS:
            raise ValueError(
                f"tile must be (rows, num_warps) with rows a power of two of at least {max(f_pad, MIN_DOT)} "
                f"(the padded frame count, and {MIN_DOT}) and num_warps in {TILE_WARPS}, got {tile}"
            )
    return dict(NUM_FRAMES=num_frames, HEAD_DIM=head_dim, F_PAD=f_pad, D_PAD=d_pad, ROWS=rows), num_warps


def _stride_args(*names: str) -> dict:
    return {f"{name}_stride_{axis}": "i32" for name in names for axis in "bnf"}


# Production launch configurations (see launch_config.py), compiled ahead of time by
# `python -m turbo_kernels.kernel_report`: VideoCrafter2's F = 16 frames of head dim 64 in every
# storage dtype, and a few other frame counts and head dims in bf16, the training dtype.
_SIZE_ARGS = dict(lse_ptr="*fp32", num_sequences="i32", num_positions="i32", heads="i32", scale="fp32")
_FWD_ARGS = dict(_SIZE_ARGS, **_stride_args("q", "k", "v", "out"))
_BWD_ARGS = dict(_SIZE_ARGS, **_stride_args("grad_out", "q", "k", "v", "grad"))
_REPORTED_SHAPES = {  # (F, head dim): storage dtypes
    (16, 64): ("fp32", "fp16", "bf16"),
    (8, 64): ("bf16",),
    (16, 40): ("bf16",),
    (16, 128): ("bf16",),
    (64, 64): ("bf16",),
}
REPORT_CONFIGS: list[KernelConfig] = [
    config
    for (num_frames, head_dim), dtypes in _REPORTED_SHAPES.items()
    for dtype in dtypes
    for kernel, args in ((temporal_attention_fwd_kernel, _FWD_ARGS), (temporal_attention_bwd_kernel, _BWD_ARGS))
    for config in storage_configs(kernel, args, *launch_params(num_frames, head_dim, dtype == "fp32"))
    if config.dtype == dtype
]


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer is allocated here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def num_sequences(x: Tensor, num_frames: int, layout: str) -> int:
    return (x.shape[0] // num_frames) * x.shape[1] if layout == "frames" else x.shape[0]


def sequence_strides(x: Tensor, num_frames: int, layout: str) -> tuple[int, int, int]:
    """(stride_b, stride_n, stride_f): token (s = b*N + n, f) of `x` starts at
    b*stride_b + n*stride_n + f*stride_f, with N = x.shape[1] ("frames") or B*N ("sequences")."""
    if layout == "frames":  # (B*F, N, C): token (s, f) is row b*F + f, position n
        return num_frames * x.stride(0), x.stride(1), x.stride(0)
    # (B*N, F, C): token (s, f) is row s, so b is always 0.
    return 0, x.stride(0), x.stride(1)


def _launch(kernel, tensors: list[Tensor], strided: list[Tensor], q: Tensor, num_frames, heads, layout, scale, tile):
    sequences = num_sequences(q, num_frames, layout)
    positions = q.shape[1] if layout == "frames" else sequences
    constexprs, num_warps = launch_params(num_frames, q.shape[2] // heads, q.dtype == torch.float32, tile)
    grid = (cdiv(sequences, constexprs["ROWS"] // constexprs["F_PAD"]) * heads,)
    strides = [stride for x in strided for stride in sequence_strides(x, num_frames, layout)]
    kernel[grid](*tensors, sequences, positions, heads, float(scale), *strides, **constexprs, num_warps=num_warps)


def temporal_attention(q, k, v, num_frames, heads, layout, scale, tile: Optional[Tile] = None):
    """(out in q's layout and dtype, lse (sequences, heads, F) fp32)."""
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((num_sequences(q, num_frames, layout), heads, num_frames), torch.float32, q.device)
    if q.numel() == 0:
        return out, lse
    _launch(temporal_attention_fwd_kernel, [q, k, v, out, lse], [q, k, v, out], q, num_frames, heads, layout, scale, tile)
    return out, lse


def temporal_attention_backward(grad_out, q, k, v, lse, num_frames, heads, layout, scale, grads=None,
                                tile: Optional[Tile] = None):
    """(grad_q, grad_k, grad_v), each contiguous in q's layout and dtype; or written into `grads`,
    three tensors of q's shape and dtype with unit channel stride that share their strides (the
    slices of one packed buffer)."""
    if grads is None:
        grads = tuple(new_output(q.shape, q.dtype, q.device) for _ in range(3))
    grad_q, grad_k, grad_v = grads
    if not grad_k.stride() == grad_v.stride() == grad_q.stride():
        raise ValueError("grads must share their strides: the kernel addresses all three through grad_q's")
    if q.numel() == 0:
        return grad_q, grad_k, grad_v
    _launch(
        temporal_attention_bwd_kernel,
        [grad_out, q, k, v, lse, grad_q, grad_k, grad_v],
        [grad_out, q, k, v, grad_q],
        q, num_frames, heads, layout, scale, tile,
    )
    return grad_q, grad_k, grad_v
