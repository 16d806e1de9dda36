"""Triton kernels for temporal attention probabilities and the top-1 motion energy (SPEC 4).

One program takes BLOCK_SEQ attention sequences of one head: it walks their q and k rows in
(BLOCK_SEQ, F, BLOCK_D) tiles straight from the caller's layout (any strides with a unit
last-dimension stride, q's and k's their own), accumulates S = q k^T per sequence with batched tl.dot, and softmaxes the
rows in fp32. Grid axis 0 walks (group, sequence block, head) with the head fastest, so
neighbouring programs read the same token rows. F and the chunk are padded to powers of two of
at least 16 (tl.dot's smallest tile) and masked.

Gradients dq = scale dS k and dk = scale dS^T q multiply the fp32 dS by 16-bit q and k on tensor
cores by splitting dS into two 16-bit halves (hi + lo); fp32 storage multiplies in full fp32.

Token (s, f) of a layout lives at (s // positions) * stride_video + (s % positions) * stride_pos
+ f * stride_frame: "frames" (B*F, N, heads*d) has positions = N, "sequences" (B*N, F, heads*d)
positions = 1.

The motion energy never writes probabilities: the forward reduces (P - ref)^2 at each query row's
top-1 key of ref_probs into one partial sum per program (programs never straddle a video, so
per-video means are sums of whole programs), and the backward recomputes P from q and k.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from turbo_kernels.triton_kernels.fast_launch import jit
from turbo_kernels.triton_kernels.launch_config import UNIT, cdiv, next_power_of_2, storage_configs

MAX_FRAMES = 64
# q and k rows are walked in chunks of 16 head-dim columns: a whole row per tile would cost the
# fp32 path (FMA products hold a chunk of each operand row per thread) and the backward spills.
HEAD_CHUNK = 16
LOG2E = 1.4426950408889634


@jit
def _program_sequences(seq_per_group, blocks_per_group, heads, BLOCK_SEQ: tl.constexpr):
    """This program's (group, head, sequence indices, which of them exist)."""
    pid = tl.program_id(0)
    head = pid % heads
    block = pid // heads
    group = block // blocks_per_group
    local = (block % blocks_per_group) * BLOCK_SEQ + tl.arange(0, BLOCK_SEQ)
    return group, head, group.to(tl.int64) * seq_per_group + local, local < seq_per_group


@jit
def _token_offsets(
    seq, head, positions, stride_video, stride_pos, stride_frame, head_dim,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(BLOCK_SEQ, BLOCK_F, BLOCK_D) offsets of the first head-dim chunk of one head's q or k rows."""
    frames = tl.arange(0, BLOCK_F).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    base = (seq // positions) * stride_video + (seq % positions) * stride_pos + head * head_dim
    return base[:, None, None] + frames[None, :, None] * stride_frame + cols[None, None, :]


@jit
def _chunk_mask(row_ok, chunk_start, head_dim, BLOCK_D: tl.constexpr):
    return row_ok[:, :, None] & (chunk_start + tl.arange(0, BLOCK_D) < head_dim)[None, None, :]


@jit
def _rows_ok(seq_ok, num_frames, BLOCK_F: tl.constexpr):
    return seq_ok[:, None] & (tl.arange(0, BLOCK_F) < num_frames)[None, :]


@jit
def _square_offsets(seq, head, stride_seq, stride_head, stride_query, stride_key, BLOCK_F: tl.constexpr):
    """(BLOCK_SEQ, BLOCK_F, BLOCK_F) element offsets into a (B*N, heads, F, F) tensor."""
    f = tl.arange(0, BLOCK_F).to(tl.int64)
    base = seq * stride_seq + head * stride_head
    return base[:, None, None] + f[None, :, None] * stride_query + f[None, None, :] * stride_key


@jit
def _square_mask(row_ok, num_frames, BLOCK_F: tl.constexpr):
    return row_ok[:, :, None] & (tl.arange(0, BLOCK_F) < num_frames)[None, None, :]


@jit
def _dot(a, b, acc):
    if a.dtype == tl.float32:
        # TF32 would cost the fp32 path its precision; 16-bit products are exact in fp32.
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@jit
def _batched_dot(a, b, acc):
    """acc + a @ b per sequence (axis 0), fp32 accumulation."""
    if a.shape[0] == 1:
        # A batched tl.dot puts every warp on the batch axis; with one sequence a program a plain
        # 2-D product lets the warps share its F x F tile instead.
        out = _dot(
            tl.reshape(a, (a.shape[1], a.shape[2])), tl.reshape(b, (b.shape[1], b.shape[2])),
            tl.reshape(acc, (acc.shape[1], acc.shape[2])),
        )
        return tl.reshape(out, acc.shape)
    return _dot(a, b, acc)


@jit
def _probabilities(
    q_ptr, k_ptr, q_offs, k_offs, row_ok, head_dim, num_frames, qk_scale_log2,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """softmax_j(scale q_i . k_j) per sequence, fp32; padded keys get probability 0."""
    scores = tl.zeros((q_offs.shape[0], BLOCK_F, BLOCK_F), dtype=tl.float32)
    for chunk_start in range(0, head_dim, BLOCK_D):
        mask = _chunk_mask(row_ok, chunk_start, head_dim, BLOCK_D)
        q = tl.load(q_ptr + q_offs + chunk_start, mask=mask, other=0.0)
        k = tl.load(k_ptr + k_offs + chunk_start, mask=mask, other=0.0)
        scores = _batched_dot(q, tl.permute(k, (0, 2, 1)), scores)
    key_ok = tl.arange(0, BLOCK_F) < num_frames
    scores = tl.where(key_ok[None, None, :], scores * qk_scale_log2, float("-inf"))
    p = tl.exp2(scores - tl.max(scores, axis=2)[:, :, None])
    return p / tl.sum(p, axis=2)[:, :, None]


@jit
def _top1(
    ref_ptr, seq, row_ok, head, num_frames, stride_seq, stride_head, stride_query, stride_key, BLOCK_F: tl.constexpr
):
    """Per query row, the first key where ref_probs (rounded to fp32, as the reference does) is
    largest: returns the (BLOCK_SEQ, BLOCK_F, BLOCK_F) one-hot mask and the ref value there."""
    offs = _square_offsets(seq, head, stride_seq, stride_head, stride_query, stride_key, BLOCK_F)
    ref = tl.load(ref_ptr + offs, mask=_square_mask(row_ok, num_frames, BLOCK_F), other=0.0).to(tl.float32)
    keys = tl.arange(0, BLOCK_F)
    ref = tl.where((keys < num_frames)[None, None, :], ref, float("-inf"))
    is_top = keys[None, None, :] == tl.argmax(ref, axis=2, tie_break_left=True)[:, :, None]
    return is_top, tl.sum(tl.where(is_top, ref, 0.0), axis=2)


@jit
def _split(x, dtype: tl.constexpr):
    """fp32 x as hi + lo in a 16-bit dtype (16 significant bits for bf16, 22 for fp16), so tensor
    cores multiply it by 16-bit storage at nearly fp32 precision; fp32 storage keeps x whole."""
    if dtype == tl.float32:
        return x, x
    hi = x.to(dtype)
    return hi, (x - hi.to(tl.float32)).to(dtype)


@jit
def _times_fp32(a_hi, a_lo, b):
    zero = tl.zeros((b.shape[0], a_hi.shape[1], b.shape[2]), dtype=tl.float32)
    if b.dtype == tl.float32:
        return _batched_dot(a_hi, b, zero)
    return _batched_dot(a_lo, b, _batched_dot(a_hi, b, zero))


@jit
def _store_input_grads(
    d_scores, q_ptr, k_ptr, dq_ptr, dk_ptr, q_offs, k_offs, grad_offs, row_ok, head_dim, scale, BLOCK_D: tl.constexpr
):
    """dq = scale dS k and dk = scale dS^T q, chunk by chunk of the head dim, in the input layout."""
    dtype = q_ptr.dtype.element_ty
    if dtype != tl.float32:
        # The lo half of a small dS would underflow fp16: scale dS by a power of two to a largest
        # magnitude near 1 before splitting it, and undo that on the fp32 products.
        largest = tl.max(tl.max(tl.max(tl.abs(d_scores), axis=2), axis=1), axis=0)
        exponent = tl.ceil(tl.log2(tl.maximum(largest, 1e-30)))
        d_scores = d_scores * tl.exp2(-exponent)
        scale = scale * tl.exp2(exponent)
    ds_hi, ds_lo = _split(d_scores, dtype)
    dst_hi, dst_lo = _split(tl.permute(d_scores, (0, 2, 1)), dtype)
    for chunk_start in range(0, head_dim, BLOCK_D):
        mask = _chunk_mask(row_ok, chunk_start, head_dim, BLOCK_D)
        q = tl.load(q_ptr + q_offs + chunk_start, mask=mask, other=0.0)
        k = tl.load(k_ptr + k_offs + chunk_start, mask=mask, other=0.0)
        dq = _times_fp32(ds_hi, ds_lo, k) * scale
        dk = _times_fp32(dst_hi, dst_lo, q) * scale
        tl.store(dq_ptr + grad_offs + chunk_start, dq.to(dq_ptr.dtype.element_ty), mask=mask)
        tl.store(dk_ptr + grad_offs + chunk_start, dk.to(dk_ptr.dtype.element_ty), mask=mask)


@jit
def attention_probs_fwd_kernel(
    q_ptr, k_ptr, p_ptr, n_seq, heads, num_frames, head_dim,
    positions, q_stride_video, q_stride_pos, q_stride_frame, k_stride_video, k_stride_pos, k_stride_frame,
    qk_scale_log2,
    BLOCK_SEQ: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _, head, seq, seq_ok = _program_sequences(n_seq, tl.cdiv(n_seq, BLOCK_SEQ), heads, BLOCK_SEQ)
    q_offs = _token_offsets(
        seq, head, positions, q_stride_video, q_stride_pos, q_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    k_offs = _token_offsets(
        seq, head, positions, k_stride_video, k_stride_pos, k_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    row_ok = _rows_ok(seq_ok, num_frames, BLOCK_F)
    p = _probabilities(q_ptr, k_ptr, q_offs, k_offs, row_ok, head_dim, num_frames, qk_scale_log2, BLOCK_F, BLOCK_D)
    square = num_frames * num_frames
    p_offs = _square_offsets(seq, head, heads * square, square, num_frames, 1, BLOCK_F)
    tl.store(p_ptr + p_offs, p, mask=_square_mask(row_ok, num_frames, BLOCK_F))


@jit
def attention_probs_bwd_kernel(
    grad_ptr, q_ptr, k_ptr, dq_ptr, dk_ptr, n_seq, heads, num_frames, head_dim,
    positions, q_stride_video, q_stride_pos, q_stride_frame, k_stride_video, k_stride_pos, k_stride_frame,
    grad_positions, grad_stride_video, grad_stride_pos, grad_stride_frame,
    g_stride_seq, g_stride_head, g_stride_query, g_stride_key, scale, qk_scale_log2,
    BLOCK_SEQ: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _, head, seq, seq_ok = _program_sequences(n_seq, tl.cdiv(n_seq, BLOCK_SEQ), heads, BLOCK_SEQ)
    q_offs = _token_offsets(
        seq, head, positions, q_stride_video, q_stride_pos, q_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    k_offs = _token_offsets(
        seq, head, positions, k_stride_video, k_stride_pos, k_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    row_ok = _rows_ok(seq_ok, num_frames, BLOCK_F)
    p = _probabilities(q_ptr, k_ptr, q_offs, k_offs, row_ok, head_dim, num_frames, qk_scale_log2, BLOCK_F, BLOCK_D)
    g_offs = _square_offsets(seq, head, g_stride_seq, g_stride_head, g_stride_query, g_stride_key, BLOCK_F)
    dp = tl.load(grad_ptr + g_offs, mask=_square_mask(row_ok, num_frames, BLOCK_F), other=0.0).to(tl.float32)
    d_scores = p * (dp - tl.sum(dp * p, axis=2)[:, :, None])
    grad_offs = _token_offsets(
        seq, head, grad_positions, grad_stride_video, grad_stride_pos, grad_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    _store_input_grads(
        d_scores, q_ptr, k_ptr, dq_ptr, dk_ptr, q_offs, k_offs, grad_offs, row_ok, head_dim, scale, BLOCK_D
    )


@jit
def motion_energy_fwd_kernel(
    q_ptr, k_ptr, ref_ptr, partial_ptr, seq_per_group, heads, num_frames, head_dim,
    positions, q_stride_video, q_stride_pos, q_stride_frame, k_stride_video, k_stride_pos, k_stride_frame,
    r_stride_seq, r_stride_head, r_stride_query, r_stride_key, qk_scale_log2,
    BLOCK_SEQ: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _, head, seq, seq_ok = _program_sequences(seq_per_group, tl.cdiv(seq_per_group, BLOCK_SEQ), heads, BLOCK_SEQ)
    q_offs = _token_offsets(
        seq, head, positions, q_stride_video, q_stride_pos, q_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    k_offs = _token_offsets(
        seq, head, positions, k_stride_video, k_stride_pos, k_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    row_ok = _rows_ok(seq_ok, num_frames, BLOCK_F)
    p = _probabilities(q_ptr, k_ptr, q_offs, k_offs, row_ok, head_dim, num_frames, qk_scale_log2, BLOCK_F, BLOCK_D)
    is_top, ref_top = _top1(
        ref_ptr, seq, row_ok, head, num_frames, r_stride_seq, r_stride_head, r_stride_query, r_stride_key, BLOCK_F
    )
    diff = tl.where(row_ok, tl.sum(tl.where(is_top, p, 0.0), axis=2) - ref_top, 0.0)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.sum(diff * diff, axis=1), axis=0))


@jit
def motion_energy_bwd_kernel(
    grad_ptr, q_ptr, k_ptr, ref_ptr, dq_ptr, dk_ptr, seq_per_group, heads, num_frames, head_dim,
    positions, q_stride_video, q_stride_pos, q_stride_frame, k_stride_video, k_stride_pos, k_stride_frame,
    grad_positions, grad_stride_video, grad_stride_pos, grad_stride_frame,
    r_stride_seq, r_stride_head, r_stride_query, r_stride_key, two_over_count, scale, qk_scale_log2,
    BLOCK_SEQ: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    group, head, seq, seq_ok = _program_sequences(seq_per_group, tl.cdiv(seq_per_group, BLOCK_SEQ), heads, BLOCK_SEQ)
    q_offs = _token_offsets(
        seq, head, positions, q_stride_video, q_stride_pos, q_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    k_offs = _token_offsets(
        seq, head, positions, k_stride_video, k_stride_pos, k_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    row_ok = _rows_ok(seq_ok, num_frames, BLOCK_F)
    p = _probabilities(q_ptr, k_ptr, q_offs, k_offs, row_ok, head_dim, num_frames, qk_scale_log2, BLOCK_F, BLOCK_D)
    is_top, ref_top = _top1(
        ref_ptr, seq, row_ok, head, num_frames, r_stride_seq, r_stride_head, r_stride_query, r_stride_key, BLOCK_F
    )
    p_top = tl.sum(tl.where(is_top, p, 0.0), axis=2)
    # dE/dP is nonzero only at the top-1 key: c_i = g 2 (P_ij* - ref_ij*) / count. The softmax
    # backward of that one-hot row is dS_ij = c_i P_ij* (delta_jj* - P_ij).
    coef = tl.load(grad_ptr + group).to(tl.float32) * two_over_count
    row_coef = tl.where(row_ok, coef * (p_top - ref_top) * p_top, 0.0)
    d_scores = row_coef[:, :, None] * (is_top.to(tl.float32) - p)
    grad_offs = _token_offsets(
        seq, head, grad_positions, grad_stride_video, grad_stride_pos, grad_stride_frame, head_dim, BLOCK_F, BLOCK_D
    )
    _store_input_grads(
        d_scores, q_ptr, k_ptr, dq_ptr, dk_ptr, q_offs, k_offs, grad_offs, row_ok, head_dim, scale, BLOCK_D
    )


def block_config(num_frames: int) -> tuple[dict[str, int], int]:
    """(BLOCK_SEQ, BLOCK_F, BLOCK_D constexprs, num_warps) for F frames.

    A batched tl.dot gives each warp whole sequences: up to 16 frames a program takes 8 sequences
    over 4 warps; longer clips take one sequence a program (the 2-D product in _batched_dot)
    with a warp for every 8 frames, so an F x F fp32 tile costs at most 16 registers a thread.
    """
    block_f = max(16, next_power_of_2(num_frames))
    block_seq, num_warps = (8, 4) if block_f == 16 else (1, block_f // 8)
    return dict(BLOCK_SEQ=block_seq, BLOCK_F=block_f, BLOCK_D=HEAD_CHUNK), num_warps


# Launch configurations (see launch_config.py), compiled ahead of time by
# `python -m turbo_kernels.kernel_report`: every configuration block_config gives (16 frames is
# VC2's; the head dim is a loop bound, so one kernel serves every head dim). Probabilities, their
# grads, ref_probs and partial sums are fp32; q, k, dq and dk take the storage dtype. The motion
# prior captures q and k in the "sequences" layout, one position a sequence: positions is 1.
_TOKEN_ARGS = dict(
    heads="i32", num_frames="i32", head_dim="i32", positions=UNIT,
    **{f"{x}_stride_{axis}": "i32" for x in "qk" for axis in ("video", "pos", "frame")},
    qk_scale_log2="fp32",
)
_GRAD_TOKEN_ARGS = dict(
    grad_positions=UNIT, grad_stride_video="i32", grad_stride_pos="i32", grad_stride_frame="i32", scale="fp32"
)
_SQUARE_STRIDES = ("stride_seq", "stride_head", "stride_query", "stride_key")


def _square_args(prefix: str) -> dict:
    """Strides of a (seq, heads, F, F) fp32 tensor, contiguous along keys as the reference
    probabilities come (nothing in production takes the probabilities' own backward; a gradient
    with other strides compiles another variant)."""
    return {f"{prefix}_{s}": UNIT if s == "stride_key" else "i32" for s in _SQUARE_STRIDES}


_REPORT_KERNELS = (
    (attention_probs_fwd_kernel, dict(p_ptr="*fp32", n_seq="i32", **_TOKEN_ARGS)),
    (
        attention_probs_bwd_kernel,
        dict(
            grad_ptr="*fp32", n_seq="i32", **_TOKEN_ARGS, **_GRAD_TOKEN_ARGS,
            **_square_args("g"),
        ),
    ),
    (
        motion_energy_fwd_kernel,
        dict(
            ref_ptr="*fp32", partial_ptr="*fp32", seq_per_group="i32", **_TOKEN_ARGS,
            **_square_args("r"),
        ),
    ),
    (
        motion_energy_bwd_kernel,
        dict(
            grad_ptr="*fp32", ref_ptr="*fp32", seq_per_group="i32", two_over_count="fp32", **_TOKEN_ARGS,
            **_GRAD_TOKEN_ARGS, **_square_args("r"),
        ),
    ),
)
REPORT_CONFIGS = [
    config
    for kernel, args in _REPORT_KERNELS
    for frames in (16, 32, 64)
    for config in storage_configs(kernel, args, *block_config(frames))
]


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer is allocated here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _token_layout(x: Tensor, num_frames: int, layout: str) -> tuple[int, int, int, int]:
    """(positions, stride_video, stride_pos, stride_frame) of x in `layout` (module docstring)."""
    if layout == "frames":
        return x.shape[1], num_frames * x.stride(0), x.stride(1), x.stride(0)
    return 1, x.stride(0), 0, x.stride(1)


def _qk_layout(q: Tensor, k: Tensor, num_frames: int, layout: str) -> tuple[int, ...]:
    """(positions, q's three strides, k's three strides): q and k share a shape, not their strides."""
    positions, *q_strides = _token_layout(q, num_frames, layout)
    return positions, *q_strides, *_token_layout(k, num_frames, layout)[1:]


def _geometry(q: Tensor, num_frames: int, heads: int, layout: str) -> tuple[int, int]:
    """(number of sequences B*N, head dim)."""
    if layout == "frames":
        return q.shape[0] // num_frames * q.shape[1], q.shape[2] // heads
    return q.shape[0], q.shape[2] // heads


def _qk_scale_log2(scale: float) -> float:
    return float(scale) * LOG2E


def temporal_attention_probs(q, k, num_frames, heads, layout, scale):
    n_seq, head_dim = _geometry(q, num_frames, heads, layout)
    probs = new_output((n_seq, heads, num_frames, num_frames), torch.float32, q.device)
    if probs.numel() == 0:
        return probs
    blocks, num_warps = block_config(num_frames)
    attention_probs_fwd_kernel[(cdiv(n_seq, blocks["BLOCK_SEQ"]) * heads,)](
        q, k, probs, n_seq, heads, num_frames, head_dim, *_qk_layout(q, k, num_frames, layout), _qk_scale_log2(scale),
        **blocks, num_warps=num_warps,
    )
    return probs


def _input_grads(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    return new_output(q.shape, q.dtype, q.device), new_output(k.shape, k.dtype, k.device)


def temporal_attention_probs_backward(grad, q, k, num_frames, heads, layout, scale):
    n_seq, head_dim = _geometry(q, num_frames, heads, layout)
    dq, dk = _input_grads(q, k)
    if n_seq * num_frames * head_dim * heads == 0:
        return dq, dk
    blocks, num_warps = block_config(num_frames)
    attention_probs_bwd_kernel[(cdiv(n_seq, blocks["BLOCK_SEQ"]) * heads,)](
        grad, q, k, dq, dk, n_seq, heads, num_frames, head_dim,
        *_qk_layout(q, k, num_frames, layout), *_token_layout(dq, num_frames, layout), *grad.stride(),
        float(scale), _qk_scale_log2(scale),
        **blocks, num_warps=num_warps,
    )
    return dq, dk


def _groups(n_seq: int, num_videos: Optional[int], block_seq: int) -> tuple[int, int, int]:
    """(groups, sequences a group, blocks a group): one group a video, or one for the whole batch."""
    groups = num_videos or 1
    seq_per_group = n_seq // groups
    return groups, seq_per_group, cdiv(seq_per_group, block_seq)


def motion_energy(q, k, ref_probs, num_frames, heads, layout, scale, num_videos):
    n_seq, head_dim = _geometry(q, num_frames, heads, layout)
    blocks, num_warps = block_config(num_frames)
    groups, seq_per_group, blocks_per_group = _groups(n_seq, num_videos, blocks["BLOCK_SEQ"])
    partial = new_output((groups, blocks_per_group * heads), torch.float32, q.device)
    if partial.numel():
        motion_energy_fwd_kernel[(partial.numel(),)](
            q, k, ref_probs, partial, seq_per_group, heads, num_frames, head_dim,
            *_qk_layout(q, k, num_frames, layout), *ref_probs.stride(), _qk_scale_log2(scale),
            **blocks, num_warps=num_warps,
        )
    # Summing the partials in torch keeps the result deterministic (no atomics). An empty input
    # gives 0 / 0 = nan, the mean of nothing, as the reference does.
    energy = partial.sum(dim=1) / (seq_per_group * heads * num_frames)
    return energy if num_videos is not None else energy.reshape(())


def motion_energy_backward(grad, q, k, ref_probs, num_frames, heads, layout, scale, num_videos):
    n_seq, head_dim = _geometry(q, num_frames, heads, layout)
    dq, dk = _input_grads(q, k)
    blocks, num_warps = block_config(num_frames)
    groups, seq_per_group, blocks_per_group = _groups(n_seq, num_videos, blocks["BLOCK_SEQ"])
    if n_seq * num_frames * head_dim * heads == 0:
        return dq, dk
    count = seq_per_group * heads * num_frames
    per_group_grad = grad.reshape(groups).to(torch.float32).contiguous()
    motion_energy_bwd_kernel[(groups * blocks_per_group * heads,)](
        per_group_grad, q, k, ref_probs, dq, dk, seq_per_group, heads, num_frames, head_dim,
        *_qk_layout(q, k, num_frames, layout), *_token_layout(dq, num_frames, layout), *ref_probs.stride(),
        2.0 / count, float(scale), _qk_scale_log2(scale),
        **blocks, num_warps=num_warps,
    )
    return dq, dk

