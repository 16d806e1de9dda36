"""Triton kernels of the fused reward preprocessing: every spec's resize + pad/crop + normalise of
every frame in one launch, and the exact adjoint in one more.

A spec's output channel is (A X B^T - mean) / std (see turbo_kernels/reference/preprocess.py): X
is one (H, W) input channel, A (size, H) and B (size, W) are banded resampling matrices with the
pad or crop folded in. The launch wrapper receives A and B of all specs stacked, plus each output
row's span [first, end) of nonzero input indices (the band).

Forward. One program computes a BLOCK_I x BLOCK_J output tile of one spec for one (frame,
channel): from the spans of its rows and columns it takes the input window that the tile reads,
and walks it in CHUNK x CHUNK pieces: T = X[rows chunk, window] B[tile cols, window]^T, then
out += A[tile rows, rows chunk] T, two tl.dot calls on tensor cores at near-fp32 accuracy (see
"Precision" below). Grid axis 0 walks the tiles of all
specs and is the fastest-varying one, so the programs of one (frame, channel) run together and
re-read its 0.6 MB (320x512 fp32) from L2: DRAM sees each frame once while every spec's output is
made, without one program looping over specs (which would leave a 2-clip batch with only 96
programs, and hold several specs' accumulators at once). Tiles are narrow in the output columns
(BLOCK_J = 16) because the first product spends (tile columns x input-column window) per input
row: the dense window costs more the wider the tile. Tiles made only of padding skip the loops
and write -mean/std. The input goes through x * in_scale + in_shift on load ([-1, 1] frames), in
any strides, so strided frame selections need no copy; fp16/bf16 frames are upcast on load and
the output is written in the requested dtype.

Backward. d X = in_scale sum_s A_s^T (G_s / std_s) B_s. One program owns a BLOCK_H x BLOCK_W
tile of d X for one (frame, channel) and loops over the specs, so the sum needs no atomics and
is deterministic. Per spec, the spans of the input rows and columns (the transposed bands) give
the output window that reaches the tile, walked as U = G[chunk, window] B[window, tile cols] and
d X += A[chunk, tile rows]^T U, at the same precision. The tiles are narrow in the input columns
(BLOCK_W = 16) for the same reason as the forward's (a 32-wide fp32 tile also spills registers on
sm_90). The result is written once, contiguous, in the frames' dtype.

Precision. The op promises 1e-5 against the fp32 reference. Every tl.dot uses
input_precision="tf32x3": each fp32 operand is split into a TF32 high part and a TF32 remainder,
and three tensor-core products (hi·hi + hi·lo + lo·hi) leave out only lo·lo, about 2^-22 of each
term. Emulated in PyTorch on the test shapes and on 320x512 -> 224 (pad, squash, crop), the
output's error against float64 is 0.6e-6 to 1.3e-6: within twice the fp32 reference's own error
plus one fp32 rounding (the kernel tests' budget), and 8x inside 1e-5. The Triton interpreter
computes every dot in exact fp32, so only the GPU tests see this. Exact fp32 ("ieee") ran the dots
on FMA units: on an H100 the forward moved about 100 GB/s (3-4% of the copy rate) at 16 clips, and
the expected gain from tensor cores is about 2x on the forward and backward (not yet measured).
The forward runs 8 warps because its fp32-storage variant spills registers at 4 with tf32x3.

The tile sizes follow the arithmetic above and the kernel report's register counts, not
measurements.
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl
from torch import Tensor

from turbo_kernels.triton_kernels.fast_launch import jit
from turbo_kernels.triton_kernels.launch_config import UNIT, KernelConfig, cdiv, storage_configs

BLOCK_I = 32
BLOCK_J = 16
BLOCK_H = 32
BLOCK_W = 16
# tl.dot needs every matrix dimension to be at least 16.
CHUNK = 16
FWD_NUM_WARPS = 8
BWD_NUM_WARPS = 4
# Columns of the per-launch tables: a tile is (spec, size, the spec's first row in the stacked
# matrices, the offset of its output block per image, first output row, first output column); a
# spec is (size, first row, block offset per image).
TILE_FIELDS = tl.constexpr(6)
SPEC_FIELDS = tl.constexpr(3)


@jit
def _frame_channel_base(image, num_frames, stride_b, stride_f, stride_c):
    """Offset of (frame, channel) `image` = (b * F + f) * 3 + c in frames of any strides."""
    channel = image % 3
    frame = image // 3
    return (frame // num_frames).to(tl.int64) * stride_b + (frame % num_frames).to(tl.int64) * stride_f + (
        channel.to(tl.int64) * stride_c
    )


@jit
def _window(span_ptr, index, valid, empty_first):
    """[first, end) covering the spans of the valid indices (first > end: nothing to read)."""
    first = tl.min(tl.load(span_ptr + index * 2, mask=valid, other=empty_first), axis=0)
    end = tl.max(tl.load(span_ptr + index * 2 + 1, mask=valid, other=0), axis=0)
    return first, end


@jit
def reward_preprocess_fwd_kernel(
    x_ptr, out_ptr, rows_ptr, cols_ptr, mean_ptr, std_ptr, row_span_ptr, col_span_ptr, tile_ptr,
    num_images, num_frames, height, width, stride_b, stride_f, stride_c, stride_h, stride_w, in_scale, in_shift,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, CHUNK: tl.constexpr,
):
    tile = tile_ptr + tl.program_id(0) * TILE_FIELDS
    image = tl.program_id(1)
    spec = tl.load(tile)
    size = tl.load(tile + 1)
    matrix_row = tl.load(tile + 2)
    block_offset = tl.load(tile + 3)
    out_i = tl.load(tile + 4) + tl.arange(0, BLOCK_I)
    out_j = tl.load(tile + 5) + tl.arange(0, BLOCK_J)
    valid_i = out_i < size
    valid_j = out_j < size
    h_first, h_end = _window(row_span_ptr, matrix_row + out_i, valid_i, height)
    w_first, w_end = _window(col_span_ptr, matrix_row + out_j, valid_j, width)
    x_base = x_ptr + _frame_channel_base(image, num_frames, stride_b, stride_f, stride_c)

    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for h in range(h_first, h_end, CHUNK):
        in_h = h + tl.arange(0, CHUNK)
        valid_h = in_h < height
        resampled_cols = tl.zeros((CHUNK, BLOCK_J), dtype=tl.float32)
        for w in range(w_first, w_end, CHUNK):
            in_w = w + tl.arange(0, CHUNK)
            valid_w = in_w < width
            # Elements past the frame's edge load as 0 and become in_shift, but meet zero weights.
            x = tl.load(
                x_base + in_h[:, None].to(tl.int64) * stride_h + in_w[None, :].to(tl.int64) * stride_w,
                mask=valid_h[:, None] & valid_w[None, :], other=0.0,
            ).to(tl.float32) * in_scale + in_shift
            cols_t = tl.load(
                cols_ptr + (matrix_row + out_j[None, :]).to(tl.int64) * width + in_w[:, None],
                mask=valid_j[None, :] & valid_w[:, None], other=0.0,
            )
            resampled_cols = tl.dot(x, cols_t, resampled_cols, input_precision="tf32x3")
        rows = tl.load(
            rows_ptr + (matrix_row + out_i[:, None]).to(tl.int64) * height + in_h[None, :],
            mask=valid_i[:, None] & valid_h[None, :], other=0.0,
        )
        acc = tl.dot(rows, resampled_cols, acc, input_precision="tf32x3")

    channel = image % 3
    out = (acc - tl.load(mean_ptr + spec * 3 + channel)) / tl.load(std_ptr + spec * 3 + channel)
    image_out = out_ptr + block_offset * num_images + image.to(tl.int64) * size * size
    tl.store(
        image_out + out_i[:, None] * size + out_j[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=valid_i[:, None] & valid_j[None, :],
    )


@jit
def reward_preprocess_bwd_kernel(
    grad_ptr, grad_x_ptr, rows_ptr, cols_ptr, std_ptr, row_span_t_ptr, col_span_t_ptr, spec_ptr,
    num_specs, num_images, height, width, in_scale,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK: tl.constexpr,
):
    tiles_w = tl.cdiv(width, BLOCK_W)
    in_h = (tl.program_id(0) // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_w = (tl.program_id(0) % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    image = tl.program_id(1)
    channel = image % 3
    valid_h = in_h < height
    valid_w = in_w < width

    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for spec in range(num_specs):
        size = tl.load(spec_ptr + spec * SPEC_FIELDS)
        matrix_row = tl.load(spec_ptr + spec * SPEC_FIELDS + 1)
        block_offset = tl.load(spec_ptr + spec * SPEC_FIELDS + 2)
        i_first, i_end = _window(row_span_t_ptr, spec * height + in_h, valid_h, size)
        j_first, j_end = _window(col_span_t_ptr, spec * width + in_w, valid_w, size)
        grad_base = grad_ptr + block_offset * num_images + image.to(tl.int64) * size * size
        scale = in_scale / tl.load(std_ptr + spec * 3 + channel)
        for i in range(i_first, i_end, CHUNK):
            out_i = i + tl.arange(0, CHUNK)
            valid_i = out_i < size
            grad_cols = tl.zeros((CHUNK, BLOCK_W), dtype=tl.float32)
            for j in range(j_first, j_end, CHUNK):
                out_j = j + tl.arange(0, CHUNK)
                valid_j = out_j < size
                grad = tl.load(
                    grad_base + out_i[:, None] * size + out_j[None, :],
                    mask=valid_i[:, None] & valid_j[None, :], other=0.0,
                ).to(tl.float32)
                cols = tl.load(
                    cols_ptr + (matrix_row + out_j[:, None]).to(tl.int64) * width + in_w[None, :],
                    mask=valid_j[:, None] & valid_w[None, :], other=0.0,
                )
                grad_cols = tl.dot(grad, cols, grad_cols, input_precision="tf32x3")
            rows_t = tl.load(
                rows_ptr + (matrix_row + out_i[None, :]).to(tl.int64) * height + in_h[:, None],
                mask=valid_i[None, :] & valid_h[:, None], other=0.0,
            )
            acc = tl.dot(rows_t, grad_cols * scale, acc, input_precision="tf32x3")

    image_grad = grad_x_ptr + image.to(tl.int64) * height * width
    tl.store(
        image_grad + in_h[:, None] * width + in_w[None, :],
        acc.to(grad_x_ptr.dtype.element_ty),
        mask=valid_h[:, None] & valid_w[None, :],
    )


# Production launch configurations (see launch_config.py), compiled ahead of time by
# `python -m turbo_kernels.kernel_report`. The matrices and statistics are fp32, the spans int32,
# the tile and spec tables int64, whatever the storage dtype of frames and outputs. Frames' rows
# are contiguous in production (decoded frames, or a permuted view of them).
_TABLE_ARGS = dict(rows_ptr="*fp32", cols_ptr="*fp32", std_ptr="*fp32", num_images="i32", height="i32", width="i32")
_FWD_ARGS = dict(
    _TABLE_ARGS, mean_ptr="*fp32", row_span_ptr="*i32", col_span_ptr="*i32", tile_ptr="*i64", num_frames="i32",
    stride_b="i32", stride_f="i32", stride_c="i32", stride_h="i32", stride_w=UNIT, in_scale="fp32", in_shift="fp32",
)
_BWD_ARGS = dict(
    _TABLE_ARGS, row_span_t_ptr="*i32", col_span_t_ptr="*i32", spec_ptr="*i64", num_specs="i32", in_scale="fp32"
)
REPORT_CONFIGS: list[KernelConfig] = [
    *storage_configs(
        reward_preprocess_fwd_kernel, _FWD_ARGS, dict(BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, CHUNK=CHUNK), FWD_NUM_WARPS
    ),
    *storage_configs(
        reward_preprocess_bwd_kernel, _BWD_ARGS, dict(BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, CHUNK=CHUNK), BWD_NUM_WARPS
    ),
]


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer is allocated here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_offsets(sizes: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Each spec's first row in the stacked matrices and its block's offset per image (sum of size^2)."""
    row_offsets, block_offsets = [0], [0]
    for size in sizes[:-1]:
        row_offsets.append(row_offsets[-1] + size)
        block_offsets.append(block_offsets[-1] + size * size)
    return row_offsets, block_offsets


@functools.lru_cache(maxsize=None)
def _tile_table(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """(tiles, TILE_FIELDS) int64: every output tile of every spec, spec by spec (built once per
    sizes and device, so later calls copy nothing to the device)."""
    row_offsets, block_offsets = _block_offsets(sizes)
    tiles = [
        (spec, size, row_offsets[spec], block_offsets[spec], i0, j0)
        for spec, size in enumerate(sizes)
        for i0 in range(0, size, BLOCK_I)
        for j0 in range(0, size, BLOCK_J)
    ]
    return torch.tensor(tiles, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=None)
def _spec_table(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """(specs, SPEC_FIELDS) int64: size, row offset, block offset per image."""
    row_offsets, block_offsets = _block_offsets(sizes)
    return torch.tensor(list(zip(sizes, row_offsets, block_offsets)), dtype=torch.int64, device=device)


def reward_preprocess(frames, sizes, rows, cols, mean, std, row_spans, col_spans, in_scale, in_shift, out_dtype):
    """frames (B, F, 3, H, W) in any strides -> every spec's output, flat and concatenated in spec
    order (spec s: (B, F, 3, size_s, size_s) contiguous). rows (sum(sizes), H), cols (sum(sizes), W),
    mean, std (S, 3) are fp32; row_spans, col_spans (sum(sizes), 2) int32."""
    batch, num_frames, channels, height, width = frames.shape
    num_images = batch * num_frames * channels
    out = new_output((num_images * sum(n * n for n in sizes),), out_dtype, frames.device)
    if num_images == 0:
        return out
    tiles = _tile_table(tuple(sizes), frames.device)
    reward_preprocess_fwd_kernel[(tiles.shape[0], num_images)](
        frames, out, rows, cols, mean, std, row_spans, col_spans, tiles,
        num_images, num_frames, height, width, *frames.stride(), float(in_scale), float(in_shift),
        BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, CHUNK=CHUNK, num_warps=FWD_NUM_WARPS,
    )
    return out


def reward_preprocess_backward(grad, frames_shape, frames_dtype, sizes, rows, cols, std, row_spans_t, col_spans_t, in_scale):
    """The adjoint: grad (flat, as reward_preprocess returns) -> d frames (B, F, 3, H, W), contiguous,
    in frames_dtype. row_spans_t (S * H, 2) and col_spans_t (S * W, 2) int32 are each input row's and
    column's span of output indices, spec by spec."""
    batch, num_frames, channels, height, width = frames_shape
    num_images = batch * num_frames * channels
    grad_frames = new_output(tuple(frames_shape), frames_dtype, grad.device)
    if grad_frames.numel() == 0:
        return grad_frames
    grid = (cdiv(height, BLOCK_H) * cdiv(width, BLOCK_W), num_images)
    reward_preprocess_bwd_kernel[grid](
        grad, grad_frames, rows, cols, std, row_spans_t, col_spans_t, _spec_table(tuple(sizes), grad.device),
        len(sizes), num_images, height, width, float(in_scale),
        BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, CHUNK=CHUNK, num_warps=BWD_NUM_WARPS,
    )
    return grad_frames
