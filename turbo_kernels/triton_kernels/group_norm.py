"""Triton kernels of the fused temporal transformer (SPEC 1): the GroupNorm statistics of a video's
frames, and projections that read and write the main stream's (B*F, C, H, W) layout in place.

GroupNorm statistics. The temporal transformer normalises each video's (C/groups, F, H, W) block,
so its statistics span F frame rows of the stream. In one frame row a group is a contiguous run
of (C/groups)*H*W elements; a program reduces a few consecutive groups of one row, reading each
run twice (sum, then squared deviations from that run's mean; the second pass hits cache) into a
partial (mean, M2). A second launch merges a video's F partials with Chan's formula for equal
counts. Both are fixed-order fp32 reductions whose tiling depends on the shapes alone, so results
are deterministic. Every value enters shifted by one value of its group (the group's first element
in the video's first frame): where a group's mean is large against its spread, fp32 partial means
of the raw values would each be off by up to an ulp of the mean, and the merge's between-frame
term would carry those errors (rstd off by 2e-3 at mean 1000, spread 0.01; torch: 1e-7); shifted,
the partials are small and exact to their own ulp, as the two-pass squares within a frame are.

Channels-last statistics (group_norm_silu's channels_last frames and channels_last_3d videos, and
the videos of the fused temporal block's channels_last stream, (B, F, H, W, C) in memory): a
group's C/groups channels recur every C elements. A program reduces a few whole groups (one run
of at most 128 channels at each position, read in tiles coalesced along it) over a chunk of
positions into per-group partials shifted as above, and the same merge combines a group's chunks;
the chunks divide the positions evenly, as the merge's formula needs.

Strided linear. out[r, m, j] = sum_k a[r, m, k] W[j, k] (+ bias[j]) (+ residual[r, m, j]), where
r is a frame row of the stream, m a token (spatial position) and every tensor is addressed
through its own (row, token, channel) strides. That one GEMM covers the layout changes of the
temporal transformer without copies:
- proj_in reads the stream (B*F, C, H*W) as tokens (row, position, channel) with channel stride
  H*W, and applies GroupNorm on load as a per-(video, channel) affine a = x*scale + shift,
  rounded to the storage dtype as a GroupNorm output would be;
- proj_out writes its (row, position, channel) output with channel stride H*W, i.e. straight into
  the stream's layout, with the stream's residual added in the epilogue;
- the backward GEMMs are the same kernel with W transposed (a strided view).
A cuBLAS GEMM could take the transposed proj_in operand too, but not the per-video normalisation
nor a transposed output with a residual. Programs walk output-channel tiles fastest, so the
programs that share an input tile run together and re-read it from L2.

The weight gradient sum_{r, m} grad[r, m, j] a[r, m, k] reduces over every token of the batch:
programs split the frame rows into a fixed number of ranges (from the shapes only) and write fp32
partials that are summed in a fixed order, so it is deterministic without atomics. The same
launch sums the bias gradient sum_{r, m} grad[r, m, j] in extra programs, one an output-channel
tile and row range, in place of a separate reduction (torch's took about 80 µs a call at 40x64
on an H100, a quarter of the copy bandwidth).

Accumulation is fp32. fp32 storage multiplies exactly (input_precision="ieee") as the fp32
reference does; 16-bit storage runs on tensor cores.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton.language as tl
from torch import Tensor

from turbo_kernels.triton_kernels.fast_launch import jit
from turbo_kernels.triton_kernels.launch_config import UNIT, KernelConfig, cdiv, next_power_of_2, storage_configs

# GroupNorm statistics: programs stream at least 64K elements in tiles of 2048, unless that leaves
# fewer than 4 programs an H100 SM (132 SMs): a program's loads are one serial loop, so few
# programs are latency-bound (at batch 1, 16 frame rows of 32 groups made 32 programs at 10x16
# and 128 at 40x64, which took 54 and 35 µs on the third lease's H100 for 6.5 and 26 MB).
STATS_MIN_ELEMENTS = 65536
STATS_MIN_PROGRAMS = 528
STATS_TILE_ELEMENTS = 2048
STATS_NUM_WARPS = 4
# The merge reads B*groups*F partials: one program per 64 (video, group) pairs, fewer where a
# group has more than 64 partials (tiles of at most 4096 partials).
MERGE_TILE = 64
MERGE_TILE_PARTIALS = 4096
MERGE_NUM_WARPS = 4
# Channels-last statistics: a program reduces whole groups of at most 128 channels over a chunk of
# positions, the chunks splitting each sample into about 4 programs an H100 SM (132 SMs), at most
# 128 partials a group (the merge's tile).
CHANNELS_LAST_STATS_CHANNELS = 128
CHANNELS_LAST_STATS_PROGRAMS = 528
CHANNELS_LAST_STATS_MAX_CHUNKS = 128
# Weight-gradient programs: enough to fill an H100 (132 SMs) about twice.
WEIGHT_GRAD_PROGRAMS = 264
# Its bias programs sum 128-token tiles: a 64-channel tile of them is 16 KiB (16-bit), so the
# loop makes few trips, each a DRAM round trip, and ends within the weight programs' time.
WEIGHT_GRAD_BIAS_TOKENS = 128


@jit
def _group_shift(x_ptr, video_start, group, group_mask, group_stride):
    """The value every element of a video's group is taken relative to: the group's first element
    in the video's first frame (the same for all of the group's partials, so they merge), at
    video_start (the video's first element, int64) + group * group_stride."""
    first = video_start + group.to(tl.int64) * group_stride
    return tl.load(x_ptr + first, mask=group_mask, other=0.0).to(tl.float32)


@jit
def group_norm_partial_stats_kernel(
    x_ptr, mean_ptr, m2_ptr, frames, groups, group_numel, GROUP_TILE: tl.constexpr, BLOCK: tl.constexpr
):
    # In a contiguous (B*F, C, H, W) stream, group g of frame row r is the (r*groups + g)-th run of
    # group_numel elements. A program reduces GROUP_TILE consecutive groups of one row, one a tile row.
    tiles = tl.cdiv(groups, GROUP_TILE)
    row = tl.program_id(0) // tiles
    group = (tl.program_id(0) % tiles) * GROUP_TILE + tl.arange(0, GROUP_TILE)
    group_mask = group < groups
    starts = (row * groups + group).to(tl.int64) * group_numel
    video_start = (row // frames).to(tl.int64) * frames * groups * group_numel
    shift = _group_shift(x_ptr, video_start, group, group_mask, group_numel)
    total = tl.zeros([GROUP_TILE, BLOCK], tl.float32)
    for start in range(0, group_numel, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = group_mask[:, None] & (offsets < group_numel)[None, :]
        values = tl.load(x_ptr + starts[:, None] + offsets[None, :], mask=mask, other=0.0).to(tl.float32)
        total += tl.where(mask, values - shift[:, None], 0.0)
    mean = tl.sum(total, axis=1) / group_numel
    squares = tl.zeros([GROUP_TILE, BLOCK], tl.float32)
    for start in range(0, group_numel, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = group_mask[:, None] & (offsets < group_numel)[None, :]
        values = tl.load(x_ptr + starts[:, None] + offsets[None, :], mask=mask, other=0.0).to(tl.float32)
        deviation = tl.where(mask, values - shift[:, None] - mean[:, None], 0.0)
        squares += deviation * deviation
    # Partials (means of the shifted values) are stored (video, group, frame), so the merge reads a
    # video's frames contiguously.
    index = ((row // frames) * groups + group) * frames + row % frames
    tl.store(mean_ptr + index, mean, mask=group_mask)
    tl.store(m2_ptr + index, tl.sum(squares, axis=1), mask=group_mask)


@jit
def group_norm_merge_stats_kernel(
    x_ptr, partial_mean_ptr, partial_m2_ptr, mean_ptr, rstd_ptr, video_groups, frames, groups, group_numel,
    video_stride, group_stride, eps, TILE: tl.constexpr, F_PAD: tl.constexpr,
):
    # A (video, group)'s `frames` partials of group_numel values each, stored contiguously; its
    # shift lies in x at video * video_stride + group * group_stride, as the partials took it.
    video_group = tl.program_id(0) * TILE + tl.arange(0, TILE)
    frame = tl.arange(0, F_PAD)
    row_mask = video_group < video_groups
    mask = row_mask[:, None] & (frame < frames)[None, :]
    offsets = video_group[:, None] * frames + frame[None, :]
    means = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0)
    m2 = tl.load(partial_m2_ptr + offsets, mask=mask, other=0.0)
    mean = tl.sum(means, axis=1) / frames
    spread = tl.where(mask, means - mean[:, None], 0.0)
    # Chan et al.: M2 = sum_f M2_f + n_f sum_f (mean_f - mean)^2, every frame holding n_f values.
    variance = (tl.sum(m2, axis=1) + group_numel * tl.sum(spread * spread, axis=1)) / (frames * group_numel)
    video_start = (video_group // groups).to(tl.int64) * video_stride
    shift = _group_shift(x_ptr, video_start, video_group % groups, row_mask, group_stride)
    tl.store(mean_ptr + video_group, shift + mean, mask=row_mask)
    tl.store(rstd_ptr + video_group, tl.div_rn(1.0, tl.sqrt_rn(variance + eps)), mask=row_mask)


@jit
def channels_last_group_norm_partial_stats_kernel(
    x_ptr, mean_ptr, m2_ptr, positions, channels, groups, group_size, group_tile, chunk,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_PAD: tl.constexpr,
):
    # x lies as (B, P, C), P = F*H*W positions: a group's channels recur every C elements. A
    # program reduces group_tile whole groups, one run of their channels at each position read in
    # [BLOCK_P, BLOCK_C] tiles coalesced along it, over one chunk of positions, in two passes as the
    # stream's kernel does. Channel sums become group sums through a (group, channel) mask: a
    # group's size is no power of two (10, 20 and 40 channels at VideoCrafter2's widths).
    tiles = tl.cdiv(groups, group_tile)
    chunks = positions // chunk
    tile = tl.program_id(0) % tiles
    part = (tl.program_id(0) // tiles) % chunks
    video = tl.program_id(0) // (tiles * chunks)
    column = tl.arange(0, BLOCK_C)
    tile_group = tl.arange(0, GROUP_PAD)
    group = tile * group_tile + tile_group
    group_mask = (tile_group < group_tile) & (group < groups)
    column_group = tile * group_tile + column // group_size
    column_mask = (column < group_tile * group_size) & (column_group < groups)
    in_group = (column // group_size)[None, :] == tile_group[:, None]
    video_start = video.to(tl.int64) * positions * channels
    shift = _group_shift(x_ptr, video_start, column_group, column_mask, group_size)
    chunk_ptr = x_ptr + video_start + part.to(tl.int64) * chunk * channels + tile * group_tile * group_size
    total = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for start in range(0, chunk, BLOCK_P):
        position = start + tl.arange(0, BLOCK_P)
        mask = (position < chunk)[:, None] & column_mask[None, :]
        values = tl.load(chunk_ptr + position.to(tl.int64)[:, None] * channels + column[None, :], mask=mask, other=0.0)
        total += tl.where(mask, values.to(tl.float32) - shift[None, :], 0.0)
    mean = tl.sum(tl.where(in_group, tl.sum(total, axis=0)[None, :], 0.0), axis=1) / (chunk * group_size)
    column_mean = tl.sum(tl.where(in_group, mean[:, None], 0.0), axis=0)
    squares = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for start in range(0, chunk, BLOCK_P):
        position = start + tl.arange(0, BLOCK_P)
        mask = (position < chunk)[:, None] & column_mask[None, :]
        values = tl.load(chunk_ptr + position.to(tl.int64)[:, None] * channels + column[None, :], mask=mask, other=0.0)
        deviation = tl.where(mask, values.to(tl.float32) - shift[None, :] - column_mean[None, :], 0.0)
        squares += deviation * deviation
    m2 = tl.sum(tl.where(in_group, tl.sum(squares, axis=0)[None, :], 0.0), axis=1)
    # Stored (video, group, chunk): the merge reads a group's partials contiguously.
    index = (video * groups + group) * chunks + part
    tl.store(mean_ptr + index, mean, mask=group_mask)
    tl.store(m2_ptr + index, m2, mask=group_mask)


@jit
def strided_linear_kernel(
    x_ptr, w_ptr, bias_ptr, residual_ptr, scale_ptr, shift_ptr, out_ptr,
    tokens, in_features, out_features, frames,
    x_stride_r, x_stride_m, x_stride_k,
    w_stride_j, w_stride_k,
    residual_stride_r, residual_stride_m, residual_stride_j,
    out_stride_r, out_stride_m, out_stride_j,
    AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tiles_n = tl.cdiv(out_features, BLOCK_N)
    tiles_m = tl.cdiv(tokens, BLOCK_M)
    tile = tl.program_id(0) // tiles_n
    row = tile // tiles_m
    m = (tile % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < tokens
    j_mask = j < out_features
    x_row = x_ptr + row.to(tl.int64) * x_stride_r
    video_channels = (row // frames) * in_features

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < in_features
        a = tl.load(
            x_row + m[:, None] * x_stride_m + k[None, :] * x_stride_k, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        if AFFINE:
            # Padded channels load scale = shift = 0, so they stay 0; padded tokens are never stored.
            scale = tl.load(scale_ptr + video_channels + k, mask=k_mask, other=0.0)
            shift = tl.load(shift_ptr + video_channels + k, mask=k_mask, other=0.0)
            a = (a.to(tl.float32) * scale[None, :] + shift[None, :]).to(x_ptr.dtype.element_ty)
        w = tl.load(
            w_ptr + j[None, :] * w_stride_j + k[:, None] * w_stride_k, mask=k_mask[:, None] & j_mask[None, :], other=0.0
        )
        acc = tl.dot(a, w, acc, input_precision="ieee")

    out_mask = m_mask[:, None] & j_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        residual_row = residual_ptr + row.to(tl.int64) * residual_stride_r
        residual_offsets = m[:, None] * residual_stride_m + j[None, :] * residual_stride_j
        residual = tl.load(residual_row + residual_offsets, mask=out_mask)
        acc += residual.to(tl.float32)
    out_row = out_ptr + row.to(tl.int64) * out_stride_r
    out_offsets = m[:, None] * out_stride_m + j[None, :] * out_stride_j
    tl.store(out_row + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@jit
def strided_linear_weight_grad_kernel(
    grad_ptr, x_ptr, scale_ptr, shift_ptr, partial_ptr, bias_partial_ptr,
    rows, tokens, out_features, in_features, frames, rows_per_split,
    grad_stride_r, grad_stride_m, grad_stride_j,
    x_stride_r, x_stride_m, x_stride_k,
    AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    BIAS_BLOCK_M: tl.constexpr,
):
    tiles_k = tl.cdiv(in_features, BLOCK_K)
    weight_programs = tl.cdiv(out_features, BLOCK_J) * tiles_k
    split = tl.program_id(1)
    first_row = split * rows_per_split
    split_rows = tl.minimum(rows_per_split, rows - first_row)
    if tl.program_id(0) < weight_programs:
        j = (tl.program_id(0) // tiles_k) * BLOCK_J + tl.arange(0, BLOCK_J)
        k = (tl.program_id(0) % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        j_mask = j < out_features
        k_mask = k < in_features
        acc = tl.zeros([BLOCK_J, BLOCK_K], tl.float32)
        for i in range(0, split_rows):
            row = first_row + i
            grad_row = grad_ptr + row.to(tl.int64) * grad_stride_r
            x_row = x_ptr + row.to(tl.int64) * x_stride_r
            if AFFINE:
                video_channels = (row // frames) * in_features
                scale = tl.load(scale_ptr + video_channels + k, mask=k_mask, other=0.0)
                shift = tl.load(shift_ptr + video_channels + k, mask=k_mask, other=0.0)
            for m0 in range(0, tokens, BLOCK_M):
                m = m0 + tl.arange(0, BLOCK_M)
                m_mask = m < tokens
                # Padded tokens load grad = 0, so whatever a holds there contributes nothing.
                grad = tl.load(
                    grad_row + m[:, None] * grad_stride_m + j[None, :] * grad_stride_j,
                    mask=m_mask[:, None] & j_mask[None, :], other=0.0,
                )
                a = tl.load(
                    x_row + m[:, None] * x_stride_m + k[None, :] * x_stride_k,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                )
                if AFFINE:
                    a = (a.to(tl.float32) * scale[None, :] + shift[None, :]).to(x_ptr.dtype.element_ty)
                acc = tl.dot(tl.trans(grad), a, acc, input_precision="ieee")
        partial = partial_ptr + split.to(tl.int64) * out_features * in_features
        tl.store(partial + j[:, None] * in_features + k[None, :], acc, mask=j_mask[:, None] & k_mask[None, :])
    else:
        # The programs after the weight tiles sum the gradient over the split's tokens: the bias
        # gradient, one output-channel tile each.
        j = (tl.program_id(0) - weight_programs) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_mask = j < out_features
        bias_acc = tl.zeros([BLOCK_J], tl.float32)
        for i in range(0, split_rows):
            grad_row = grad_ptr + (first_row + i).to(tl.int64) * grad_stride_r
            for m0 in range(0, tokens, BIAS_BLOCK_M):
                m = m0 + tl.arange(0, BIAS_BLOCK_M)
                grad = tl.load(
                    grad_row + m[:, None] * grad_stride_m + j[None, :] * grad_stride_j,
                    mask=(m < tokens)[:, None] & j_mask[None, :], other=0.0,
                )
                bias_acc += tl.sum(grad.to(tl.float32), axis=0)
        tl.store(bias_partial_ptr + split * out_features + j, bias_acc, mask=j_mask)


@jit
def group_norm_stats_backward_kernel(
    x_ptr, mean_ptr, rstd_ptr, grad_mean_ptr, grad_rstd_ptr, grad_x_ptr,
    numel, frames, channels, group_channels, groups, positions, count,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    # x is a (B*F, C, H*W) stream, and x's gradient lies as x does. Contiguous, element i lies in
    # frame row i // (C*H*W), channel (i // H*W) % C; channels_last ((B*F, H*W, C) in memory), in
    # the same row, channel i % C. Its statistics are its video's, of its channel's group.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    if CHANNELS_LAST:
        channel = offsets % channels
        video_group = (offsets // (positions * channels) // frames) * groups + channel // group_channels
    else:
        row_channel = offsets // positions
        channel = row_channel % channels
        video_group = (row_channel // channels // frames) * groups + channel // group_channels
    mean = tl.load(mean_ptr + video_group, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + video_group, mask=mask, other=0.0)
    grad_mean = tl.load(grad_mean_ptr + video_group, mask=mask, other=0.0)
    grad_var = -0.5 * tl.load(grad_rstd_ptr + video_group, mask=mask, other=0.0) * rstd * rstd * rstd
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_x = (grad_mean + 2.0 * grad_var * (x - mean)) / count
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@jit
def channel_affine_backward_kernel(
    grad_ptr, x_ptr, scale_ptr, grad_x_ptr, sum_grad_ptr, sum_grad_x_ptr,
    tokens, channels, frames, tokens_per_split,
    grad_stride_r, grad_stride_m, grad_stride_k,
    x_stride_r, x_stride_m, x_stride_k,
    out_stride_r, out_stride_m, out_stride_k,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One frame row, BLOCK_K channels and one range of tokens a program: d x = d a * scale written
    # as it streams them, and the range's sums of d a and d a * x kept per channel (partials summed
    # over ranges and frames on the host, in a fixed order).
    row = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    first_token = split * tokens_per_split
    k_mask = k < channels
    scale = tl.load(scale_ptr + (row // frames) * channels + k, mask=k_mask, other=0.0)
    grad_row = grad_ptr + row.to(tl.int64) * grad_stride_r
    x_row = x_ptr + row.to(tl.int64) * x_stride_r
    out_row = grad_x_ptr + row.to(tl.int64) * out_stride_r
    sum_grad = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    sum_grad_x = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for m0 in range(first_token, tl.minimum(first_token + tokens_per_split, tokens), BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        mask = (m < tokens)[:, None] & k_mask[None, :]
        grad = tl.load(grad_row + m[:, None] * grad_stride_m + k[None, :] * grad_stride_k, mask=mask, other=0.0)
        grad = grad.to(tl.float32)
        x = tl.load(x_row + m[:, None] * x_stride_m + k[None, :] * x_stride_k, mask=mask, other=0.0).to(tl.float32)
        sum_grad += grad
        sum_grad_x += grad * x
        out = (grad * scale[None, :]).to(grad_x_ptr.dtype.element_ty)
        tl.store(out_row + m[:, None] * out_stride_m + k[None, :] * out_stride_k, out, mask=mask)
    partial = (split * tl.num_programs(0) + row) * channels + k
    tl.store(sum_grad_ptr + partial, tl.sum(sum_grad, axis=0), mask=k_mask)
    tl.store(sum_grad_x_ptr + partial, tl.sum(sum_grad_x, axis=0), mask=k_mask)


@jit
def channel_affine_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr, tokens, channels, frames,
    x_stride_r, x_stride_m, x_stride_k, out_stride_r, out_stride_m, out_stride_k,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One frame row, BLOCK_M tokens and BLOCK_K channels a program: a = x*scale + shift rounded to
    # the storage dtype. Reading a contiguous stream's channel-major tokens and writing row-major
    # ones, the load and the store each get a coalesced layout (Triton moves the tile between them
    # through shared memory); a channels_last stream's tokens are row-major already.
    row = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < channels
    mask = (m < tokens)[:, None] & k_mask[None, :]
    scale = tl.load(scale_ptr + (row // frames) * channels + k, mask=k_mask, other=0.0)
    shift = tl.load(shift_ptr + (row // frames) * channels + k, mask=k_mask, other=0.0)
    x = tl.load(x_ptr + row.to(tl.int64) * x_stride_r + m[:, None] * x_stride_m + k[None, :] * x_stride_k, mask=mask)
    a = x.to(tl.float32) * scale[None, :] + shift[None, :]
    out = out_ptr + row.to(tl.int64) * out_stride_r + m[:, None] * out_stride_m + k[None, :] * out_stride_k
    tl.store(out, a.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _element_coordinates(offsets, channels, frames, positions):
    """(sample, channel, frame, position) of elements `offsets` of a contiguous (B, C, F, P) tensor."""
    video_channel = offsets // (positions * frames)
    return video_channel // channels, video_channel % channels, (offsets // positions) % frames, offsets % positions


@jit
def _group_affine_elements(
    offsets, mask, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, channels, frames, positions, group_size, groups,
    x_stride_b, x_stride_c, x_stride_f,
):
    """For elements `offsets` of a contiguous (B, C, F, P) tensor: x there (x in any strides with
    contiguous positions; its storage dtype), GroupNorm's affine scale = rstd*weight and shift =
    bias - mean*scale of the element's sample and channel, and its (sample, group) index."""
    video, channel, frame, position = _element_coordinates(offsets, channels, frames, positions)
    x = tl.load(
        x_ptr + video * x_stride_b + channel * x_stride_c + frame * x_stride_f + position, mask=mask, other=0.0
    )
    scale, shift, video_group = _group_affine(
        video, channel, mask, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, group_size, groups
    )
    return x, scale, shift, video_group


@jit
def _channels_last_affine_elements(
    offsets, mask, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, channels, sample_numel, group_size, groups
):
    """_group_affine_elements for elements `offsets` of a channels-last tensor ((B, P, C) in
    memory), x lying so too."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    scale, shift, video_group = _group_affine(
        offsets // sample_numel, offsets % channels, mask, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, group_size, groups
    )
    return x, scale, shift, video_group


@jit
def _group_affine(video, channel, mask, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, group_size, groups):
    """GroupNorm's affine scale = rstd*weight and shift = bias - mean*scale of samples `video` and
    channels `channel`, and their (sample, group) index."""
    video_group = video * groups + channel // group_size
    mean = tl.load(mean_ptr + video_group, mask=mask, other=0.0)
    scale = tl.load(rstd_ptr + video_group, mask=mask, other=0.0) * tl.load(
        weight_ptr + channel, mask=mask, other=0.0
    ).to(tl.float32)
    shift = tl.load(bias_ptr + channel, mask=mask, other=0.0).to(tl.float32) - mean * scale
    return scale, shift, video_group


@jit
def channel_affine_silu_kernel(
    x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, out_ptr, numel, channels, frames, positions, group_size,
    groups, x_stride_b, x_stride_c, x_stride_f, BLOCK: tl.constexpr,
):
    # out is a contiguous (B, C, F, P) tensor, P = H*W positions; x the same shape in any strides
    # with its positions contiguous (the stream's transposed view included). y = silu(a), with
    # a = x*scale + shift rounded to out's dtype as a GroupNorm output is, scale = rstd*weight
    # and shift = bias - mean*scale of the sample's group (GroupNorm's affine, formed here rather
    # than by separate launches).
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x, scale, shift, _ = _group_affine_elements(
        offsets, mask, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, channels, frames, positions, group_size,
        groups, x_stride_b, x_stride_c, x_stride_f,
    )
    y = _silu_at_rounded_affine(x, scale, shift, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def channels_last_affine_silu_kernel(
    x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, out_ptr, numel, channels, sample_numel, group_size, groups,
    BLOCK: tl.constexpr,
):
    # x and out both lie channels-last ((B, P, C) in memory, P = F*H*W positions): element i of one
    # is element i of the other, so the pass runs in memory order.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x, scale, shift, _ = _channels_last_affine_elements(
        offsets, mask, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, channels, sample_numel, group_size, groups
    )
    y = _silu_at_rounded_affine(x, scale, shift, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _silu_at_rounded_affine(x, scale, shift, output_dtype: tl.constexpr):
    """silu(a) at a = x*scale + shift rounded to the output's dtype, as a GroupNorm output is."""
    a = (x.to(tl.float32) * scale + shift).to(output_dtype).to(tl.float32)
    return a / (1.0 + tl.exp(-a))


@jit
def _silu_grad_at_rounded_affine(x, grad, scale, shift, output_dtype: tl.constexpr):
    """d a = d y * silu'(a) at a = x*scale + shift rounded as the forward rounds it: to the
    output's dtype, which is d y's."""
    a = (x * scale + shift).to(output_dtype).to(tl.float32)
    sigmoid = 1.0 / (1.0 + tl.exp(-a))
    return grad * sigmoid * (1.0 + a * (1.0 - sigmoid))


@jit
def channel_affine_silu_sums_kernel(
    grad_ptr, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, sum_grad_ptr, sum_grad_x_ptr,
    channels, frames, positions, group_size, groups, x_stride_b, x_stride_c, x_stride_f, BLOCK: tl.constexpr,
):
    # The backward's first pass, one (sample, channel, frame) a program over its positions in BLOCK
    # chunks: the sums of d a and d a * x (the gradients of the affine's shift and scale), a partial
    # a frame. Nothing is written per element: the second pass forms d x whole.
    program = tl.program_id(0)
    frame = program % frames
    video_channel = program // frames
    channel = video_channel % channels
    video = video_channel // channels
    video_group = video * groups + channel // group_size
    mean = tl.load(mean_ptr + video_group)
    scale = tl.load(rstd_ptr + video_group) * tl.load(weight_ptr + channel).to(tl.float32)
    shift = tl.load(bias_ptr + channel).to(tl.float32) - mean * scale
    x_row = x_ptr + video.to(tl.int64) * x_stride_b + channel.to(tl.int64) * x_stride_c + frame.to(tl.int64) * x_stride_f
    grad_row = grad_ptr + program.to(tl.int64) * positions
    sum_grad = tl.zeros([BLOCK], tl.float32)
    sum_grad_x = tl.zeros([BLOCK], tl.float32)
    for start in range(0, positions, BLOCK):
        position = start + tl.arange(0, BLOCK)
        mask = position < positions
        x = tl.load(x_row + position, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_row + position, mask=mask, other=0.0).to(tl.float32)
        grad_a = _silu_grad_at_rounded_affine(x, grad, scale, shift, grad_ptr.dtype.element_ty)
        grad_a = tl.where(mask, grad_a, 0.0)
        sum_grad += grad_a
        sum_grad_x += grad_a * x
    tl.store(sum_grad_ptr + program, tl.sum(sum_grad, axis=0))
    tl.store(sum_grad_x_ptr + program, tl.sum(sum_grad_x, axis=0))


@jit
def channel_affine_silu_grad_kernel(
    grad_ptr, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr, grad_x_ptr,
    numel, channels, frames, positions, group_size, groups,
    x_stride_b, x_stride_c, x_stride_f, out_stride_b, out_stride_c, out_stride_f, BLOCK: tl.constexpr,
):
    # The backward's second pass, elementwise in the forward's order: the whole gradient of x,
    # d x = d a * scale (through the affine) + alpha * x + beta (through the group's statistics,
    # alpha and beta per (sample, group) from the first pass's sums), written once in x's strides.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x, scale, shift, video_group = _group_affine_elements(
        offsets, mask, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, channels, frames, positions, group_size,
        groups, x_stride_b, x_stride_c, x_stride_f,
    )
    grad_x = _whole_grad_x(grad_ptr, offsets, mask, x, scale, shift, video_group, alpha_ptr, beta_ptr)
    video, channel, frame, position = _element_coordinates(offsets, channels, frames, positions)
    out = grad_x_ptr + video * out_stride_b + channel * out_stride_c + frame * out_stride_f + position
    tl.store(out, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@jit
def _whole_grad_x(grad_ptr, offsets, mask, x, scale, shift, video_group, alpha_ptr, beta_ptr):
    """d x = d a * scale + alpha * x + beta at elements `offsets` of the output's gradient (laid
    out as the output), x there in its storage dtype."""
    x = x.to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_a = _silu_grad_at_rounded_affine(x, grad, scale, shift, grad_ptr.dtype.element_ty)
    alpha = tl.load(alpha_ptr + video_group, mask=mask, other=0.0)
    beta = tl.load(beta_ptr + video_group, mask=mask, other=0.0)
    return grad_a * scale + alpha * x + beta


@jit
def channels_last_affine_silu_sums_kernel(
    grad_ptr, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, sum_grad_ptr, sum_grad_x_ptr,
    positions, channels, group_size, groups, split_positions, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # The backward's first pass for channels-last x and d y ((B, P, C) in memory): one sample,
    # BLOCK_C channels and one range of positions a program, read in [BLOCK_P, BLOCK_C] tiles
    # coalesced along the channels; the range's sums of d a and d a * x kept per channel (partials
    # summed over ranges on the host, in a fixed order).
    video = tl.program_id(0)
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    first = tl.program_id(2) * split_positions
    channel_mask = channel < channels
    scale, shift, _ = _group_affine(
        video, channel, channel_mask, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, group_size, groups
    )
    video_start = video.to(tl.int64) * positions * channels
    sum_grad = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    sum_grad_x = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for start in range(first, tl.minimum(first + split_positions, positions), BLOCK_P):
        position = start + tl.arange(0, BLOCK_P)
        mask = (position < positions)[:, None] & channel_mask[None, :]
        offsets = video_start + position.to(tl.int64)[:, None] * channels + channel[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_a = _silu_grad_at_rounded_affine(x, grad, scale[None, :], shift[None, :], grad_ptr.dtype.element_ty)
        grad_a = tl.where(mask, grad_a, 0.0)
        sum_grad += grad_a
        sum_grad_x += grad_a * x
    partial = (tl.program_id(2) * tl.num_programs(0) + video) * channels + channel
    tl.store(sum_grad_ptr + partial, tl.sum(sum_grad, axis=0), mask=channel_mask)
    tl.store(sum_grad_x_ptr + partial, tl.sum(sum_grad_x, axis=0), mask=channel_mask)


@jit
def channels_last_affine_silu_grad_kernel(
    grad_ptr, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, alpha_ptr, beta_ptr, grad_x_ptr,
    numel, channels, sample_numel, group_size, groups, BLOCK: tl.constexpr,
):
    # The backward's second pass for channels-last x, d y and d x (one layout, (B, P, C) in
    # memory): elementwise in memory order.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x, scale, shift, video_group = _channels_last_affine_elements(
        offsets, mask, x_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, channels, sample_numel, group_size, groups
    )
    grad_x = _whole_grad_x(grad_ptr, offsets, mask, x, scale, shift, video_group, alpha_ptr, beta_ptr)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


@jit
def group_norm_silu_coefficients_kernel(
    sum_grad_ptr, sum_grad_x_ptr, mean_ptr, rstd_ptr, weight_ptr, grad_weight_ptr, grad_bias_ptr, alpha_ptr,
    beta_ptr, samples, partials, group_size, groups, count, stride_b, stride_c, stride_p,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # The backward's coefficients between its two passes, one group a program: the first pass's
    # partial sums of d a and d a * x, (sample, channel, partial) at any strides, summed in a
    # fixed order; each sample's (alpha, beta) and the weight's and bias's gradients summed over
    # the samples (formulas: reference.temporal_block.group_norm_silu_coefficients).
    group = tl.program_id(0)
    member = tl.arange(0, BLOCK_C)
    member_mask = member < group_size
    channel = group * group_size + member
    weight = tl.load(weight_ptr + channel, mask=member_mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK_C], tl.float32)
    grad_bias = tl.zeros([BLOCK_C], tl.float32)
    sample_start = channel.to(tl.int64)[None, :] * stride_c
    for sample in range(samples):
        sum_grad = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        sum_grad_x = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for start in range(0, partials, BLOCK_P):
            partial = start + tl.arange(0, BLOCK_P)
            mask = (partial < partials)[:, None] & member_mask[None, :]
            offsets = sample_start + partial.to(tl.int64)[:, None] * stride_p
            sum_grad += tl.load(sum_grad_ptr + offsets, mask=mask, other=0.0)
            sum_grad_x += tl.load(sum_grad_x_ptr + offsets, mask=mask, other=0.0)
        channel_grad = tl.sum(sum_grad, axis=0)
        stat = sample * groups + group
        mean = tl.load(mean_ptr + stat)
        rstd = tl.load(rstd_ptr + stat)
        centred = tl.sum(sum_grad_x, axis=0) - channel_grad * mean
        grad_weight += centred * rstd
        grad_bias += channel_grad
        grad_rstd = tl.sum(centred * weight, axis=0)
        grad_mean = tl.sum(-channel_grad * rstd * weight, axis=0)
        grad_var = -0.5 * grad_rstd * (rstd * rstd * rstd)
        tl.store(alpha_ptr + stat, 2 * grad_var / count)
        tl.store(beta_ptr + stat, (grad_mean - 2 * grad_var * mean) / count)
        sample_start += stride_b
    tl.store(grad_weight_ptr + channel, grad_weight, mask=member_mask)
    tl.store(grad_bias_ptr + channel, grad_bias, mask=member_mask)


def stats_params(rows: int, groups: int, group_numel: int) -> tuple[dict, int]:
    """Groups a program reduces, of one of `rows` frame rows: enough that it streams at least
    STATS_MIN_ELEMENTS (e.g. 4 groups of 10 channels x 2560 positions at VideoCrafter2's first
    level), fewer where that would leave under STATS_MIN_PROGRAMS programs; and the tile width."""
    groups_for_min_elements = cdiv(STATS_MIN_ELEMENTS, max(group_numel, 1))
    group_tile = min(next_power_of_2(groups), next_power_of_2(groups_for_min_elements))
    while group_tile > 1 and rows * cdiv(groups, group_tile) < STATS_MIN_PROGRAMS:
        group_tile //= 2
    return dict(GROUP_TILE=group_tile, BLOCK=max(16, STATS_TILE_ELEMENTS // group_tile)), STATS_NUM_WARPS


def channels_last_stats_params(groups: int, group_size: int) -> tuple[int, dict, int]:
    """Groups a program of the channels-last statistics reduces (whole groups, as many as fit
    CHANNELS_LAST_STATS_CHANNELS channels, at least one), its tile and warps."""
    group_tile = max(1, min(groups, CHANNELS_LAST_STATS_CHANNELS // group_size))
    block_c = next_power_of_2(group_tile * group_size)
    params = dict(
        BLOCK_P=max(1, STATS_TILE_ELEMENTS // block_c), BLOCK_C=block_c, GROUP_PAD=next_power_of_2(group_tile)
    )
    return group_tile, params, STATS_NUM_WARPS


def channels_last_stats_chunks(samples: int, positions: int, tiles: int, block_p: int) -> int:
    """How many chunks of positions the channels-last statistics split each sample into: about
    CHANNELS_LAST_STATS_PROGRAMS programs in all (`tiles` of groups a chunk), at most
    CHANNELS_LAST_STATS_MAX_CHUNKS, none shorter than a tile; a divisor of the positions, so that
    every partial holds as many values (the merge's Chan formula takes equal counts)."""
    wanted = min(CHANNELS_LAST_STATS_MAX_CHUNKS, cdiv(CHANNELS_LAST_STATS_PROGRAMS, samples * tiles))
    wanted = max(1, min(wanted, positions // block_p))
    return next(chunks for chunks in range(wanted, 0, -1) if positions % chunks == 0)


def merge_tile(f_pad: int) -> int:
    """(video, group) pairs a merge program takes, of f_pad (padded) partials each."""
    return max(1, min(MERGE_TILE, MERGE_TILE_PARTIALS // f_pad))


def linear_params(fp32: bool) -> tuple[dict, int]:
    """Tile sizes and warps of strided_linear_kernel. 16-bit: 64x64 output tiles on tensor cores.
    fp32 multiplies exactly on CUDA cores, where a 32-token tile keeps the accumulator small."""
    return dict(BLOCK_M=32 if fp32 else 64, BLOCK_N=64, BLOCK_K=32), 4


def weight_grad_params(fp32: bool) -> tuple[dict, int]:
    """Tile sizes and warps of strided_linear_weight_grad_kernel; fp32 halves the gradient tile to
    stay well inside the register file."""
    return dict(BLOCK_M=16, BLOCK_J=32, BLOCK_K=64) if fp32 else dict(BLOCK_M=32, BLOCK_J=64, BLOCK_K=64), 4


# Production launch configurations (see launch_config.py), compiled ahead of time by the kernel
# report: every combination of prologue, epilogue and unit strides the temporal transformer launches.
# Without AFFINE, scale_ptr and shift_ptr receive the output (storage dtype), unread.
_LINEAR_ARGS = dict(
    tokens="i32", in_features="i32", out_features="i32", frames="i32",
    **{f"{name}_stride_{axis}": "i32" for name, axes in (("x", "rmk"), ("w", "jk"), ("residual", "rmj"), ("out", "rmj"))
       for axis in axes},
)
_WEIGHT_GRAD_ARGS = dict(
    scale_ptr="*fp32", shift_ptr="*fp32", partial_ptr="*fp32", bias_partial_ptr="*fp32", rows="i32", tokens="i32", out_features="i32",
    in_features="i32", frames="i32", rows_per_split="i32",
    **{f"{name}_stride_{axis}": "i32" for name, axes in (("grad", "rmj"), ("x", "rmk")) for axis in axes},
)
_STATS_ARGS = dict(mean_ptr="*fp32", m2_ptr="*fp32", frames="i32", groups="i32", group_numel="i32")
_MERGE_ARGS = dict(
    partial_mean_ptr="*fp32", partial_m2_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32", video_groups="i32",
    frames="i32", groups="i32", group_numel="i32", video_stride="i32", group_stride="i32", eps="fp32",
)
# (groups, channels a group x positions) at VideoCrafter2's three attention levels and the middle,
# and the frame rows of 1 to 32 videos of 16 frames.
_STATS_SHAPES = ((32, 10 * 2560), (32, 20 * 640), (32, 40 * 160), (32, 40 * 40))
_STATS_ROWS = (16, 32, 64, 128, 256, 512)
# (AFFINE, HAS_BIAS, HAS_RESIDUAL, unit strides) of each launch. The stream's tokens are read
# channel-major (token stride 1), the blocks' tokens row-major (channel stride 1); backward GEMMs
# take the weight transposed (output-feature stride 1) and write the gradient in its input's layout.
_LINEAR_VARIANTS = (
    (True, True, False, ("x_stride_m", "w_stride_k", "residual_stride_j", "out_stride_j")),  # proj_in
    (False, True, True, ("x_stride_k", "w_stride_k", "residual_stride_m", "out_stride_m")),  # proj_out
    (False, False, False, ("x_stride_m", "w_stride_j", "residual_stride_j", "out_stride_j")),  # proj_out's input grad
    (False, False, False, ("x_stride_k", "w_stride_j", "residual_stride_m", "out_stride_m")),  # proj_in's input grad
)
# (AFFINE, unit strides) of the weight gradients of proj_in and proj_out.
_WEIGHT_GRAD_VARIANTS = ((True, ("grad_stride_j", "x_stride_m")), (False, ("grad_stride_m", "x_stride_k")))


_AFFINE_ARGS = dict(scale_ptr="*fp32", shift_ptr="*fp32")


def _with_units(args: dict, units: tuple[str, ...]) -> dict:
    return {**args, **{name: UNIT for name in units}}


def _linear_configs(dtype: str) -> list[KernelConfig]:
    params, num_warps = linear_params(dtype == "fp32")
    return [
        config
        for affine, has_bias, has_residual, units in _LINEAR_VARIANTS
        for config in storage_configs(
            strided_linear_kernel, _with_units({**_LINEAR_ARGS, **(_AFFINE_ARGS if affine else {})}, units),
            dict(AFFINE=affine, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, **params), num_warps,
        )
        if config.dtype == dtype
    ]


def _weight_grad_configs(dtype: str) -> list[KernelConfig]:
    params, num_warps = weight_grad_params(dtype == "fp32")
    return [
        config
        for affine, units in _WEIGHT_GRAD_VARIANTS
        for config in storage_configs(
            strided_linear_weight_grad_kernel, _with_units(_WEIGHT_GRAD_ARGS, units),
            dict(AFFINE=affine, BIAS_BLOCK_M=WEIGHT_GRAD_BIAS_TOKENS, **params),
            num_warps,
        )
        if config.dtype == dtype
    ]


# The gradient passes stream the tensors: blocks of 2048 elements, 64 tokens x 32 channels.
STATS_BACKWARD_BLOCK = 2048
STATS_BACKWARD_NUM_WARPS = 4
AFFINE_BACKWARD_TILE = dict(BLOCK_M=64, BLOCK_K=32)
AFFINE_BACKWARD_NUM_WARPS = 4
# Token ranges split the rows so that about four programs stream on each of an H100's 132 SMs
# (the kernel does not pipeline its loads: more programs keep more bytes in flight).
AFFINE_BACKWARD_PROGRAMS = 528
_STATS_BACKWARD_ARGS = dict(
    mean_ptr="*fp32", rstd_ptr="*fp32", grad_mean_ptr="*fp32", grad_rstd_ptr="*fp32", numel="i32", frames="i32",
    channels="i32", group_channels="i32", groups="i32", positions="i32", count="i32",
)
# proj_in's operands: the stream's tokens (channel-major, token stride 1) and their gradient,
# channel-major from strided_linear or row-major from cuBLAS (the cuBLAS projection route); a
# channels_last stream's tokens are row-major, as are their gradient from cuBLAS and x's.
_AFFINE_BACKWARD_ARGS = dict(
    scale_ptr="*fp32", sum_grad_ptr="*fp32", sum_grad_x_ptr="*fp32", tokens="i32", channels="i32", frames="i32",
    tokens_per_split="i32",
    **{f"{name}_stride_{axis}": "i32" for name in ("grad", "x", "out") for axis in "rmk"},
)
_AFFINE_BACKWARD_UNITS = (
    ("grad_stride_m", "x_stride_m", "out_stride_m"), ("grad_stride_k", "x_stride_m", "out_stride_m"),
    ("grad_stride_k", "x_stride_k", "out_stride_k"),
)
# The cuBLAS route's normalisation: the stream's tokens in, channel-major (a contiguous stream) or
# row-major (a channels_last one), row-major tokens out.
CHANNEL_AFFINE_TILE = dict(BLOCK_M=64, BLOCK_K=64)
CHANNEL_AFFINE_NUM_WARPS = 4
_CHANNEL_AFFINE_ARGS = dict(
    scale_ptr="*fp32", shift_ptr="*fp32", tokens="i32", channels="i32", frames="i32",
    **{f"{name}_stride_{axis}": "i32" for name in ("x", "out") for axis in "rmk"},
)
_CHANNEL_AFFINE_UNITS = (("x_stride_m", "out_stride_k"), ("x_stride_k", "out_stride_k"))
# GroupNorm + SiLU of the UNet's ResBlocks and temporal convolutions, forward and backward: blocks
# (or position chunks) of 1024 elements; at 2048 the elementwise passes took 80-128 registers a
# thread and the forward spilled in fp16.
AFFINE_SILU_BLOCK = 1024
AFFINE_SILU_NUM_WARPS = 4
# Channels-last sums: tiles of as many elements, 16 positions of 64 channels.
CHANNELS_LAST_SUMS_TILE = dict(BLOCK_P=16, BLOCK_C=64)
# The coefficients between the backward's passes: a group's channels (at most 40 in the UNet, 16
# in its VAE) by 16 partials a tile, one warp (a few hundred values a sample). Wider groups are
# not taken: at 128 channels the tile spills (1280 bytes a thread in fp32 on sm_90a), and wider
# ones spill more and take minutes to compile.
COEFFICIENTS_BLOCK_P = 16
COEFFICIENTS_NUM_WARPS = 1
COEFFICIENTS_MAX_GROUP_SIZE = 64
_COEFFICIENTS_ARGS = dict(
    sum_grad_ptr="*fp32", sum_grad_x_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32", grad_weight_ptr="*fp32",
    grad_bias_ptr="*fp32", alpha_ptr="*fp32", beta_ptr="*fp32", samples="i32", partials="i32", group_size="i32",
    groups="i32", count="fp32", stride_b="i32", stride_c="i32", stride_p="i32",
)
_AFFINE_SILU_ARGS = dict(
    mean_ptr="*fp32", rstd_ptr="*fp32", numel="i32", channels="i32", frames="i32", positions="i32",
    group_size="i32", groups="i32", x_stride_b="i32", x_stride_c="i32", x_stride_f="i32",
)
# Its backward: sums with one (sample, channel, frame) a program over its positions in chunks;
# then x's gradient elementwise.
_AFFINE_SILU_SUMS_ARGS = dict(
    mean_ptr="*fp32", rstd_ptr="*fp32", sum_grad_ptr="*fp32", sum_grad_x_ptr="*fp32", channels="i32",
    frames="i32", positions="i32", group_size="i32", groups="i32",
    x_stride_b="i32", x_stride_c="i32", x_stride_f="i32",
)
_AFFINE_SILU_GRAD_ARGS = dict(
    mean_ptr="*fp32", rstd_ptr="*fp32", alpha_ptr="*fp32", beta_ptr="*fp32", numel="i32", channels="i32",
    frames="i32", positions="i32", group_size="i32", groups="i32",
    **{f"{name}_stride_{axis}": "i32" for name in ("x", "out") for axis in "bcf"},
)
_CHANNELS_LAST_STATS_ARGS = dict(
    mean_ptr="*fp32", m2_ptr="*fp32", positions="i32", channels="i32", groups="i32", group_size="i32",
    group_tile="i32", chunk="i32",
)
_CHANNELS_LAST_AFFINE_SILU_ARGS = dict(
    mean_ptr="*fp32", rstd_ptr="*fp32", numel="i32", channels="i32", sample_numel="i32", group_size="i32",
    groups="i32",
)
_CHANNELS_LAST_AFFINE_SILU_SUMS_ARGS = dict(
    mean_ptr="*fp32", rstd_ptr="*fp32", sum_grad_ptr="*fp32", sum_grad_x_ptr="*fp32", positions="i32",
    channels="i32", group_size="i32", groups="i32", split_positions="i32",
)
_CHANNELS_LAST_AFFINE_SILU_GRAD_ARGS = dict(
    mean_ptr="*fp32", rstd_ptr="*fp32", alpha_ptr="*fp32", beta_ptr="*fp32", numel="i32", channels="i32",
    sample_numel="i32", group_size="i32", groups="i32",
)
_AFFINE_SILU_AUTOCAST_ARGS = {
    kernel: dict(weight_ptr="*fp32", bias_ptr="*fp32", **{output: "*fp32"})
    for kernel, output in (
        (channel_affine_silu_kernel, "out_ptr"),
        (channel_affine_silu_sums_kernel, "grad_ptr"),
        (channel_affine_silu_grad_kernel, "grad_ptr"),
        (channels_last_affine_silu_kernel, "out_ptr"),
        (channels_last_affine_silu_sums_kernel, "grad_ptr"),
        (channels_last_affine_silu_grad_kernel, "grad_ptr"),
    )
}


REPORT_CONFIGS: list[KernelConfig] = (
    [
        config
        for params, num_warps in {
            tuple(params.items()): (params, num_warps)
            for rows in _STATS_ROWS
            for groups, group_numel in _STATS_SHAPES
            for params, num_warps in [stats_params(rows, groups, group_numel)]
        }.values()
        for config in storage_configs(group_norm_partial_stats_kernel, _STATS_ARGS, params, num_warps)
    ]
    # group_norm_silu's statistics reduce each group as slices, one group a row (groups = 1): a
    # frame's share of a video's group, or one channel of a frame's; a tile of one group whatever
    # the slice's size or the rows.
    + storage_configs(group_norm_partial_stats_kernel, _with_units(_STATS_ARGS, ("groups",)), *stats_params(1, 1, 1))
    # group_norm_silu's channels-last statistics, whole groups of 10, 20 or 40 channels (the
    # UNet's 320, 640 and 1280 channels in 32 groups) and of 4, 8 or 16 (its VAE's 128, 256, 512).
    + [
        config
        for group_size in (4, 8, 10, 16, 20, 40)
        for config in storage_configs(
            channels_last_group_norm_partial_stats_kernel, _CHANNELS_LAST_STATS_ARGS,
            *channels_last_stats_params(32, group_size)[1:],
        )
    ]
    # The merge reads fp32 partials and each group's shift from the stream: a config a partial
    # count (VideoCrafter2's 16 frames, group_norm_silu's 20 and 40 channels a group of frames, and
    # its channels-last chunks, up to 128), for the stream's groups and group_norm_silu's slices
    # (groups = 1).
    + [
        config
        for f_pad in (16, 32, 64, 128)
        for units in ((), ("groups",))
        for config in storage_configs(
            group_norm_merge_stats_kernel, _with_units(_MERGE_ARGS, units), dict(TILE=merge_tile(f_pad), F_PAD=f_pad),
            MERGE_NUM_WARPS,
        )
    ]
    + [config for dtype in ("fp32", "fp16", "bf16") for config in _linear_configs(dtype) + _weight_grad_configs(dtype)]
    # The stream's statistics, contiguous or channels_last, and group_norm_silu's slices (one group
    # of one position a row).
    + [
        config
        for channels_last, units in ((False, ()), (False, ("groups", "positions")), (True, ()))
        for config in storage_configs(
            group_norm_stats_backward_kernel, _with_units(_STATS_BACKWARD_ARGS, units),
            dict(CHANNELS_LAST=channels_last, BLOCK=STATS_BACKWARD_BLOCK), STATS_BACKWARD_NUM_WARPS,
        )
    ]
    + [
        config
        for units in _AFFINE_BACKWARD_UNITS
        for config in storage_configs(
            channel_affine_backward_kernel, _with_units(_AFFINE_BACKWARD_ARGS, units), AFFINE_BACKWARD_TILE,
            AFFINE_BACKWARD_NUM_WARPS,
        )
    ]
    + [
        config
        for units in _CHANNEL_AFFINE_UNITS
        for config in storage_configs(
            channel_affine_kernel, _with_units(_CHANNEL_AFFINE_ARGS, units), CHANNEL_AFFINE_TILE, CHANNEL_AFFINE_NUM_WARPS
        )
    ]
    # The temporal convolutions' videos, and the ResBlocks' frames (one frame a sample); in the
    # storage dtype throughout, or under CUDA autocast (16-bit x, float32 master weight and bias,
    # float32 output and output gradient).
    + [
        dataclasses.replace(config, label=f"{config.label} autocast") if autocast else config
        for units in ((), ("frames",))
        for autocast in (False, True)
        for kernel, args in (
            (channel_affine_silu_kernel, _AFFINE_SILU_ARGS),
            (channel_affine_silu_sums_kernel, _AFFINE_SILU_SUMS_ARGS),
            (channel_affine_silu_grad_kernel, _AFFINE_SILU_GRAD_ARGS),
        )
        for config in storage_configs(
            kernel, _with_units({**args, **(_AFFINE_SILU_AUTOCAST_ARGS[kernel] if autocast else {})}, units),
            dict(BLOCK=AFFINE_SILU_BLOCK), AFFINE_SILU_NUM_WARPS,
        )
        if not (autocast and config.dtype == "fp32")
    ]
    # The same passes on channels-last frames and videos.
    + [
        dataclasses.replace(config, label=f"{config.label} autocast") if autocast else config
        for autocast in (False, True)
        for kernel, args, tile in (
            (channels_last_affine_silu_kernel, _CHANNELS_LAST_AFFINE_SILU_ARGS, dict(BLOCK=AFFINE_SILU_BLOCK)),
            (channels_last_affine_silu_sums_kernel, _CHANNELS_LAST_AFFINE_SILU_SUMS_ARGS, CHANNELS_LAST_SUMS_TILE),
            (channels_last_affine_silu_grad_kernel, _CHANNELS_LAST_AFFINE_SILU_GRAD_ARGS, dict(BLOCK=AFFINE_SILU_BLOCK)),
        )
        for config in storage_configs(
            kernel, {**args, **(_AFFINE_SILU_AUTOCAST_ARGS[kernel] if autocast else {})}, tile, AFFINE_SILU_NUM_WARPS
        )
        if not (autocast and config.dtype == "fp32")
    ]
    # The coefficients between them, for groups of 10 and 40 channels (the UNet's first and last
    # levels), from each layout's partials: a video's frames (unit stride), single frames (one
    # partial, unit strides), channels-last ranges of positions (unit channel stride). Float32
    # sums and statistics, the weight in the storage dtype (float32 master weights under
    # autocast are the fp32 config).
    + [
        config
        for block_c, units in [
            (block_c, units)
            for block_c in (next_power_of_2(10), next_power_of_2(40))
            for units in (("stride_p",), ("partials", "stride_c", "stride_p"), ("stride_c",))
        ]
        # and one video (batch 1, the distillation step's), whose channels-last sums may be one
        # range of positions, at the widest tile
        + [(next_power_of_2(40), units) for units in (("samples", "stride_p"), ("samples", "partials", "stride_c"))]
        for config in storage_configs(
            group_norm_silu_coefficients_kernel, _with_units(_COEFFICIENTS_ARGS, units),
            dict(BLOCK_C=block_c, BLOCK_P=COEFFICIENTS_BLOCK_P), COEFFICIENTS_NUM_WARPS,
        )
    ]
)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer is allocated here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def new_output_like(t: Tensor) -> Tensor:
    """An output with t's shape, dtype and strides (tests swap in a NaN-filled one)."""
    return torch.empty_like(t)


def _new_stats(samples: int, groups: int, x: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Buffers for (mean, rstd), each (samples, groups) float32, and whether they are final
    already: no groups at all, or groups of no values, whose statistics are NaN as torch.var_mean
    gives them (the kernels would read each group's shift from an empty x)."""
    mean = new_output((samples, groups), torch.float32, x.device)
    rstd = new_output((samples, groups), torch.float32, x.device)
    if mean.numel() == 0:
        return mean, rstd, True
    if x.numel() == 0:
        return mean.fill_(math.nan), rstd.fill_(math.nan), True
    return mean, rstd, False


def group_norm_stats(x: Tensor, num_frames: int, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd), each (B, groups) float32, of every video's channel groups over (C/groups, F,
    H, W); x is a (B*F, C, H, W) stream, contiguous or torch.channels_last."""
    if not x.is_contiguous():
        # A channels_last stream's videos, (B, C, F, H, W), lie channels-last ((B, F, H, W, C) in
        # memory): the channels-last reduction reads them as they are.
        return channels_last_group_norm_stats(x.unflatten(0, (-1, num_frames)).transpose(1, 2), groups, eps)
    rows = x.shape[0]
    videos = rows // num_frames
    group_numel = math.prod(x.shape[1:]) // groups
    mean, rstd, final = _new_stats(videos, groups, x)
    if final:
        return mean, rstd
    partial_mean = new_output((videos, groups, num_frames), torch.float32, x.device)
    partial_m2 = new_output((videos, groups, num_frames), torch.float32, x.device)
    params, num_warps = stats_params(rows, groups, group_numel)
    group_norm_partial_stats_kernel[(rows * cdiv(groups, params["GROUP_TILE"]),)](
        x, partial_mean, partial_m2, num_frames, groups, group_numel, num_warps=num_warps, **params,
    )
    video_numel = num_frames * groups * group_numel
    _merge_stats(x, partial_mean, partial_m2, mean, rstd, group_numel, video_numel, group_numel, eps)
    return mean, rstd


def channels_last_group_norm_stats(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd), each (B, groups) float32, of every sample's channel groups over (C/groups, F,
    H, W); x (B, C, F, H, W) lies channels-last, (B, F, H, W, C) in memory."""
    samples, channels = x.shape[:2]
    positions = math.prod(x.shape[2:])
    group_size = channels // groups
    mean, rstd, final = _new_stats(samples, groups, x)
    if final:
        return mean, rstd
    group_tile, params, num_warps = channels_last_stats_params(groups, group_size)
    tiles = cdiv(groups, group_tile)
    chunks = channels_last_stats_chunks(samples, positions, tiles, params["BLOCK_P"])
    chunk = positions // chunks
    partial_mean = new_output((samples, groups, chunks), torch.float32, x.device)
    partial_m2 = new_output((samples, groups, chunks), torch.float32, x.device)
    channels_last_group_norm_partial_stats_kernel[(samples * chunks * tiles,)](
        x, partial_mean, partial_m2, positions, channels, groups, group_size, group_tile, chunk,
        num_warps=num_warps, **params,
    )
    _merge_stats(x, partial_mean, partial_m2, mean, rstd, chunk * group_size, positions * channels, group_size, eps)
    return mean, rstd


def _merge_stats(x, partial_mean, partial_m2, mean, rstd, group_numel, video_stride, group_stride, eps) -> None:
    """mean and rstd (videos, groups) from partials (videos, groups, partials) of group_numel values
    each, taken relative to each group's shift at x[video * video_stride + group * group_stride]."""
    videos, groups, partials = partial_mean.shape
    f_pad = next_power_of_2(partials)
    tile = merge_tile(f_pad)
    group_norm_merge_stats_kernel[(cdiv(videos * groups, tile),)](
        x, partial_mean, partial_m2, mean, rstd, videos * groups, partials, groups, group_numel, video_stride,
        group_stride, float(eps), TILE=tile, F_PAD=f_pad, num_warps=MERGE_NUM_WARPS,
    )


def _token_major(t: Tensor, channels_first: bool) -> Tensor:
    """The (rows, tokens, channels) view of a (rows, channels, tokens) tensor, or `t` itself."""
    return t.transpose(1, 2) if channels_first else t


def strided_linear(x, weight, bias, residual, scale, shift, num_frames, channels_first_out, tiles=None):
    """x (R, M, K) in any strides, weight (J, K) in any strides -> out, contiguous (R, J, M) if
    channels_first_out else (R, M, J). residual has out's shape; scale, shift are (R/F, K) fp32.
    tiles: (BLOCK_M/N/K dict, warps) instead of linear_params' (the benchmark's tile sweep)."""
    rows, tokens, in_features = x.shape
    out_features = weight.shape[0]
    shape = (rows, out_features, tokens) if channels_first_out else (rows, tokens, out_features)
    out = new_output(shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    out_view = _token_major(out, channels_first_out)
    residual_view = out_view if residual is None else _token_major(residual, channels_first_out)
    params, num_warps = linear_params(x.dtype == torch.float32) if tiles is None else tiles
    grid = (rows * cdiv(tokens, params["BLOCK_M"]) * cdiv(out_features, params["BLOCK_N"]),)
    # Unused pointer arguments get `out`; their constexpr flags keep them unread.
    strided_linear_kernel[grid](
        x, weight, out if bias is None else bias, residual_view, out if scale is None else scale,
        out if shift is None else shift, out,
        tokens, in_features, out_features, num_frames,
        *x.stride(), *weight.stride(), *residual_view.stride(), *out_view.stride(),
        AFFINE=scale is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        num_warps=num_warps, **params,
    )
    return out


def _weight_grad_tiles(out_features: int, in_features: int, params: dict) -> int:
    return cdiv(out_features, params["BLOCK_J"]) * cdiv(in_features, params["BLOCK_K"])


def weight_grad_splits(rows: int, out_features: int, in_features: int, fp32: bool, params: dict | None = None) -> int:
    """How many frame-row ranges the weight gradient is split into (a function of shapes and
    tiles only): `params` the tiles (default: weight_grad_params')."""
    params = weight_grad_params(fp32)[0] if params is None else params
    return max(1, min(rows, WEIGHT_GRAD_PROGRAMS // max(1, _weight_grad_tiles(out_features, in_features, params))))


def strided_linear_weight_grad(grad_out, x, scale, shift, num_frames, tiles=None):
    """(sum over rows and tokens of grad_out[r, m, j] a[r, m, k], a = x (or x*scale + shift
    rounded to x's dtype): (J, K) float32; sum of grad_out[r, m, j]: (J,) float32, the bias
    gradient). grad_out (R, M, J) and x (R, M, K) in any strides. tiles: (BLOCK_M/J/K dict, warps)
    instead of weight_grad_params' (the benchmark's tile sweep)."""
    rows, tokens, in_features = x.shape
    out_features = grad_out.shape[2]
    fp32 = x.dtype == torch.float32
    params, num_warps = weight_grad_params(fp32) if tiles is None else tiles
    splits = weight_grad_splits(rows, out_features, in_features, fp32, params)
    partial = new_output((splits, out_features, in_features), torch.float32, x.device)
    bias_partial = new_output((splits, out_features), torch.float32, x.device)
    if partial.numel() == 0:
        return partial.sum(0), grad_out.sum(dim=(0, 1), dtype=torch.float32)
    bias_programs = cdiv(out_features, params["BLOCK_J"])
    strided_linear_weight_grad_kernel[(_weight_grad_tiles(out_features, in_features, params) + bias_programs, splits)](
        grad_out, x, partial if scale is None else scale, partial if shift is None else shift, partial, bias_partial,
        rows, tokens, out_features, in_features, num_frames, cdiv(rows, splits),
        *grad_out.stride(), *x.stride(),
        AFFINE=scale is not None, BIAS_BLOCK_M=WEIGHT_GRAD_BIAS_TOKENS, num_warps=num_warps, **params,
    )
    return partial.sum(0), bias_partial.sum(0)


def group_norm_stats_backward(x, mean, rstd, grad_mean, grad_rstd, num_frames):
    """The gradient of x (a (B*F, C, H, W) stream, contiguous or torch.channels_last) through its
    groups' (mean, rstd), each (B, groups) float32, from their gradients; in x's dtype and layout."""
    grad_x = new_output_like(x)
    if grad_x.numel() == 0:
        return grad_x
    groups, channels = mean.shape[1], x.shape[1]
    positions = x[0, 0].numel()
    launch_grid = (cdiv(x.numel(), STATS_BACKWARD_BLOCK),)
    group_norm_stats_backward_kernel[launch_grid](
        x, mean, rstd, grad_mean, grad_rstd, grad_x, x.numel(), num_frames, channels, channels // groups, groups,
        positions, num_frames * (channels // groups) * positions,
        CHANNELS_LAST=not x.is_contiguous(), BLOCK=STATS_BACKWARD_BLOCK, num_warps=STATS_BACKWARD_NUM_WARPS,
    )
    return grad_x


def affine_backward_splits(rows: int, tokens: int, channels: int) -> int:
    """How many token ranges channel_affine_backward splits each frame row into (shapes only)."""
    channel_blocks = cdiv(channels, AFFINE_BACKWARD_TILE["BLOCK_K"])
    token_blocks = cdiv(tokens, AFFINE_BACKWARD_TILE["BLOCK_M"])
    return max(1, min(token_blocks, AFFINE_BACKWARD_PROGRAMS // max(rows * channel_blocks, 1)))


def channel_affine(x, scale, shift, num_frames):
    """a = x*scale + shift rounded to x's dtype, x (R, M, K) in any strides, scale and shift (B, K)
    float32: (R, M, K) row-major."""
    rows, tokens, channels = x.shape
    out = new_output(x.shape, x.dtype, x.device)
    if out.numel():
        grid = (rows, cdiv(tokens, CHANNEL_AFFINE_TILE["BLOCK_M"]), cdiv(channels, CHANNEL_AFFINE_TILE["BLOCK_K"]))
        channel_affine_kernel[grid](
            x, scale, shift, out, tokens, channels, num_frames, *x.stride(), *out.stride(),
            num_warps=CHANNEL_AFFINE_NUM_WARPS, **CHANNEL_AFFINE_TILE,
        )
    return out


def channel_affine_silu(x, mean, rstd, weight, bias, out_dtype=None):
    """silu(GroupNorm(x)) from its statistics: x (B, C, F, H, W) with contiguous positions (any
    other strides), mean and rstd (B, groups) float32, weight and bias (C,) in any float dtype: a
    contiguous (B, C, F, H, W) tensor in out_dtype (default x's), GroupNorm's output rounded to it."""
    channels, frames = x.shape[1:3]
    groups = mean.shape[1]
    out = new_output(x.shape, x.dtype if out_dtype is None else out_dtype, x.device)
    if out.numel():
        channel_affine_silu_kernel[(cdiv(out.numel(), AFFINE_SILU_BLOCK),)](
            x, mean, rstd, weight, bias, out, out.numel(), channels, frames, x.shape[3] * x.shape[4],
            channels // groups, groups, *x.stride()[:3], BLOCK=AFFINE_SILU_BLOCK, num_warps=AFFINE_SILU_NUM_WARPS,
        )
    return out


def channel_affine_silu_partial_sums(grad, x, mean, rstd, weight, bias):
    """The backward's first pass: (sums of d a, sums of d a * x) over each (sample, channel,
    frame)'s positions, each (B, C, F) float32, from the output's gradient (contiguous, as the
    output, and in its dtype)."""
    videos, channels, frames = x.shape[:3]
    partials = [new_output((videos, channels, frames), torch.float32, x.device) for _ in range(2)]
    if x.numel():
        channel_affine_silu_sums_kernel[(videos * channels * frames,)](
            grad, x, mean, rstd, weight, bias, *partials, channels, frames, x.shape[3] * x.shape[4],
            channels // mean.shape[1], mean.shape[1], *x.stride()[:3],
            BLOCK=AFFINE_SILU_BLOCK, num_warps=AFFINE_SILU_NUM_WARPS,
        )
    else:
        for partial in partials:
            partial.zero_()
    return partials


def channel_affine_silu_grad(grad, x, mean, rstd, weight, bias, alpha, beta):
    """The backward's second pass: x's whole gradient, in x's dtype and strides; grad contiguous."""
    channels, frames = x.shape[1:3]
    grad_x = new_output_like(x)
    if grad_x.numel():
        channel_affine_silu_grad_kernel[(cdiv(x.numel(), AFFINE_SILU_BLOCK),)](
            grad, x, mean, rstd, weight, bias, alpha, beta, grad_x, x.numel(), channels, frames,
            x.shape[3] * x.shape[4], channels // mean.shape[1], mean.shape[1], *x.stride()[:3], *grad_x.stride()[:3],
            BLOCK=AFFINE_SILU_BLOCK, num_warps=AFFINE_SILU_NUM_WARPS,
        )
    return grad_x


def _channels_last_output(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A (B, C, F, H, W) output lying channels-last, (B, F, H, W, C) in memory: the strides of
    torch.channels_last_3d."""
    samples, channels, *positions = x.shape
    return new_output((samples, *positions, channels), dtype, x.device).movedim(-1, 1)


def channels_last_affine_silu(x, mean, rstd, weight, bias, out_dtype=None):
    """channel_affine_silu of x (B, C, F, H, W) lying channels-last ((B, F, H, W, C) in memory),
    the output lying so too."""
    channels, groups = x.shape[1], mean.shape[1]
    out = _channels_last_output(x, x.dtype if out_dtype is None else out_dtype)
    if out.numel():
        channels_last_affine_silu_kernel[(cdiv(out.numel(), AFFINE_SILU_BLOCK),)](
            x, mean, rstd, weight, bias, out, out.numel(), channels, x[0].numel(), channels // groups, groups,
            BLOCK=AFFINE_SILU_BLOCK, num_warps=AFFINE_SILU_NUM_WARPS,
        )
    return out


def channels_last_sums_splits(samples: int, positions: int, channels: int) -> int:
    """How many position ranges channels_last_affine_silu_sums splits each sample into (shapes
    only): about AFFINE_BACKWARD_PROGRAMS programs in all."""
    channel_blocks = cdiv(channels, CHANNELS_LAST_SUMS_TILE["BLOCK_C"])
    position_blocks = cdiv(positions, CHANNELS_LAST_SUMS_TILE["BLOCK_P"])
    return max(1, min(position_blocks, AFFINE_BACKWARD_PROGRAMS // max(samples * channel_blocks, 1)))


def channels_last_affine_silu_partial_sums(grad, x, mean, rstd, weight, bias):
    """channel_affine_silu_partial_sums of x and the output's gradient both lying channels-last:
    partials over ranges of positions, (B, C, ranges) views."""
    samples, channels = x.shape[:2]
    positions = math.prod(x.shape[2:])
    splits = channels_last_sums_splits(samples, positions, channels)
    sums = new_output((2, splits, samples, channels), torch.float32, x.device)
    if x.numel():
        block_p, block_c = CHANNELS_LAST_SUMS_TILE["BLOCK_P"], CHANNELS_LAST_SUMS_TILE["BLOCK_C"]
        channels_last_affine_silu_sums_kernel[(samples, cdiv(channels, block_c), splits)](
            grad, x, mean, rstd, weight, bias, sums[0], sums[1], positions, channels, channels // mean.shape[1],
            mean.shape[1], cdiv(cdiv(positions, block_p), splits) * block_p,
            num_warps=AFFINE_SILU_NUM_WARPS, **CHANNELS_LAST_SUMS_TILE,
        )
    else:
        sums.zero_()
    return [partials.permute(1, 2, 0) for partials in sums]


def group_norm_silu_coefficients(sum_grad, sum_grad_x, x_shape, mean, rstd, weight):
    """reference.temporal_block.group_norm_silu_coefficients from the first pass's partial sums
    (B, C, partials), both at the same strides (any), summed over the partials here (in a fixed order, so
    deterministic): (d weight, d bias) (C,) and (alpha, beta) (B, groups), float32, in one launch;
    groups of at most COEFFICIENTS_MAX_GROUP_SIZE channels."""
    samples, channels, partials = sum_grad.shape
    groups = mean.shape[1]
    group_size = channels // groups
    if group_size > COEFFICIENTS_MAX_GROUP_SIZE:
        raise ValueError(f"groups of {group_size} channels (the kernel takes at most {COEFFICIENTS_MAX_GROUP_SIZE})")
    grad_weight, grad_bias = (new_output((channels,), torch.float32, mean.device) for _ in range(2))
    alpha, beta = (new_output((samples, groups), torch.float32, mean.device) for _ in range(2))
    if channels:
        group_norm_silu_coefficients_kernel[(groups,)](
            sum_grad, sum_grad_x, mean, rstd, weight, grad_weight, grad_bias, alpha, beta, samples, partials,
            group_size, groups, float(group_size * math.prod(x_shape[2:])), *sum_grad.stride(),
            BLOCK_C=next_power_of_2(group_size), BLOCK_P=COEFFICIENTS_BLOCK_P, num_warps=COEFFICIENTS_NUM_WARPS,
        )
    return grad_weight, grad_bias, alpha, beta


def channels_last_affine_silu_grad(grad, x, mean, rstd, weight, bias, alpha, beta):
    """channel_affine_silu_grad of x and the output's gradient both lying channels-last: x's
    gradient in x's strides (channels-last too)."""
    channels, groups = x.shape[1], mean.shape[1]
    grad_x = new_output_like(x)
    if grad_x.numel():
        channels_last_affine_silu_grad_kernel[(cdiv(x.numel(), AFFINE_SILU_BLOCK),)](
            grad, x, mean, rstd, weight, bias, alpha, beta, grad_x, x.numel(), channels, x[0].numel(),
            channels // groups, groups, BLOCK=AFFINE_SILU_BLOCK, num_warps=AFFINE_SILU_NUM_WARPS,
        )
    return grad_x


def channel_affine_backward(grad_a, x, scale, num_frames):
    """(d x = d a * scale in x's dtype and strides, sum of d a * x and sum of d a over each video's
    frames and tokens, each (B, K) float32) of a = x*scale + shift; grad_a and x (R, M, K) in any
    strides, scale (B, K) float32."""
    rows, tokens, channels = x.shape
    grad_x = new_output_like(x)
    channel_blocks = cdiv(channels, AFFINE_BACKWARD_TILE["BLOCK_K"])
    token_blocks = cdiv(tokens, AFFINE_BACKWARD_TILE["BLOCK_M"])
    splits = affine_backward_splits(rows, tokens, channels)
    sums = new_output((2, splits, rows, channels), torch.float32, x.device)
    if sums.numel() and tokens:
        channel_affine_backward_kernel[(rows, channel_blocks, splits)](
            grad_a, x, scale, grad_x, sums[0], sums[1], tokens, channels, num_frames,
            cdiv(token_blocks, splits) * AFFINE_BACKWARD_TILE["BLOCK_M"],
            *grad_a.stride(), *x.stride(), *grad_x.stride(),
            num_warps=AFFINE_BACKWARD_NUM_WARPS, **AFFINE_BACKWARD_TILE,
        )
    else:
        sums.zero_()
    # Fixed-order sums over token ranges and each video's frames: deterministic.
    sum_grad, sum_grad_x = (
        partial.sum(dim=0).view(rows // num_frames, num_frames, channels).sum(dim=1) for partial in sums
    )
    return grad_x, sum_grad_x, sum_grad
