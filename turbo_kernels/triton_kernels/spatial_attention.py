"""Triton kernels of spatial attention: softmax(scale q k^T) v per head, forward and backward, for
the UNet's spatial self-attention (N = M <= 2560 tokens) and its cross-attention to the M = 77
text tokens (SPEC 1).

Layout: q and the output are (B*F, N, heads*d), k and v (B*F / kv_repeat, M, heads*d), the
layouts the projections write and the out projection reads. Element c of head h of token n of
row r lives at r*stride_b + n*stride_n + h*HEAD_DIM + c, so q, k, v may be channel slices of one
fused qkv projection, and k, v may have a zero batch stride; only channels must be unit-stride.
Query row r attends to key row r // kv_repeat: one text context per video serves its F frames
without being repeated in memory.

Two paths, chosen by the launcher from the key count M:
- whole KV (M padded to a power of two <= WHOLE_KV_MAX, the 77 text tokens in a 128-row tile):
  every program holds all keys, so the forward is a single-pass softmax (row max, exp, row sum,
  one P V product; no online rescaling), and the backward is one fused kernel that has whole rows
  of P: delta = rowsum(P * dP) comes from fp32 tiles at hand (no read of O, no storage rounding),
  dq is written directly, and dk, dv accumulate in fp32 over every query block of the kv_repeat
  rows that attend to the program's (kv row, head). 16-bit storage only.
- blocked (self-attention, and fp32 storage at every M): FlashAttention-2. The forward walks KV
  blocks with an online softmax; the backward is a dq kernel (one program per query block, which
  also writes delta = rowsum(dO * O) = rowsum(P * dP) of its rows) then a dk/dv kernel (one
  program per KV block, walking every query block of the kv_repeat rows that attend to it), so no
  gradient needs atomics.

Both save the logsumexp of every query row (fp32, (B*F, heads, N)); the backward recomputes
P = exp(scale q k^T - lse) from q, k and it, in natural units, so the logits round exactly as the
reference's do and the lse's own rounding scales whole rows alike. Softmax and accumulation are
fp32; probabilities are rounded to the storage dtype only as tensor-core operands. fp32 storage
takes exact fp32 products (input_precision="ieee", as the fp32 reference computes), on CUDA
cores, in smaller tiles, and its blocked backward renormalises the recomputed probabilities and
takes delta from them (see blocked_bwd_dq_kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

from turbo_kernels.triton_kernels.fast_launch import jit
from turbo_kernels.triton_kernels.launch_config import UNIT, KernelConfig, cdiv, next_power_of_2, storage_configs

# VideoCrafter2 uses 64 everywhere; at 128 the backward kernels spill registers.
MAX_HEAD_DIM = 64
# tl.dot needs every matrix dimension to be at least 16.
MIN_DOT = 16
# The largest padded key count one program holds whole: the 77 text tokens pad to 128.
WHOLE_KV_MAX = 128
# The fused whole-KV backward runs one program per (kv row, head), walking every query block that
# attends to it. Spreading those blocks over several programs whose fp32 dk, dv partials the
# launcher sums (to fill the GPU when B*F/kv_repeat x heads is small) computed dq and dv right but
# dk wrong on an H100 under Triton 3.6 (max error 0.5-1.2 on |dk| <= 20 at the VideoCrafter2
# cross-attention shapes, in fp16 and bf16, while the interpreter's dk was right), so that variant
# is gone until it is understood and tested on a GPU.

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True)
class Tiles:
    """Rows of a query block and of a KV block, and warps, of one kernel."""

    block_q: int
    block_kv: int
    num_warps: int


# The whole-KV path is for 16-bit storage, on tensor cores. fp32 storage runs exact products on
# CUDA cores, whose operands live in registers: it takes the blocked path at every key count (a
# whole 128-key tile needs all 255 registers in the forward and spills in the backward), in small
# tiles.
WHOLE_KV_FWD = Tiles(128, WHOLE_KV_MAX, 8)
WHOLE_KV_BWD = Tiles(32, WHOLE_KV_MAX, 8)
BLOCKED_FWD = {False: Tiles(128, 64, 8), True: Tiles(32, 32, 4)}
# dq: many query rows against narrow KV blocks; dk, dv: many key rows against narrow query blocks.
# fp32's backward kernels hold the tiles of their extra renormalising pass too: 8 warps (at 4,
# dq needs 254 registers, and Triton 3.6, the GPU machine's, spills 924 bytes in dk, dv where
# Triton 3.8 takes 117 registers).
BLOCKED_BWD_DQ = {False: Tiles(128, 32, 4), True: Tiles(32, 32, 8)}
BLOCKED_BWD_DKDV = {False: Tiles(32, 128, 8), True: Tiles(32, 32, 8)}


@jit
def _tile_offsets(row, tokens, channels, stride_b, stride_n):
    """Element offsets of (tokens, channels) of batch row `row` in a tensor of the given strides
    (int64: fused qkv projections of large batches pass 2^31 elements)."""
    starts = row.to(tl.int64) * stride_b + tokens.to(tl.int64) * stride_n
    return starts[:, None] + channels[None, :]


@jit
def _tile_mask(tokens, num_tokens, channel_valid):
    return (tokens < num_tokens)[:, None] & channel_valid[None, :]


@jit
def _head_channels(head, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    channel = tl.arange(0, D_PAD)
    return head * HEAD_DIM + channel, channel < HEAD_DIM


@jit
def _program_tile(num_blocks, heads):
    """(token block, batch row, head) of this program. Token blocks vary fastest, so the programs
    that share one row's k and v run together and find them in L2."""
    pid = tl.program_id(0)
    row_head = pid // num_blocks
    return pid % num_blocks, row_head // heads, row_head % heads


@jit
def _lse_index(row, head, heads, num_queries, queries):
    """Index of (row, head, query) in the (B*F, heads, N) logsumexp and delta buffers."""
    return (row.to(tl.int64) * heads + head) * num_queries + queries


@jit
def whole_kv_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    num_queries, num_keys, heads, kv_repeat, num_query_blocks, scale,
    q_stride_b, q_stride_n, k_stride_b, k_stride_n, v_stride_b, v_stride_n, out_stride_b, out_stride_n,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, KV_PAD: tl.constexpr,
):
    query_block, row, head = _program_tile(num_query_blocks, heads)
    kv_row = row // kv_repeat
    channels, channel_valid = _head_channels(head, HEAD_DIM, D_PAD)
    queries = query_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    keys = tl.arange(0, KV_PAD)

    q_offsets = _tile_offsets(row, queries, channels, q_stride_b, q_stride_n)
    query_mask = _tile_mask(queries, num_queries, channel_valid)
    q = tl.load(q_ptr + q_offsets, mask=query_mask, other=0.0)
    k_offsets = _tile_offsets(kv_row, keys, channels, k_stride_b, k_stride_n)
    kv_mask = _tile_mask(keys, num_keys, channel_valid)
    k = tl.load(k_ptr + k_offsets, mask=kv_mask, other=0.0)
    logits = tl.dot(q, tl.trans(k), input_precision="ieee") * (scale * LOG2E)
    logits = tl.where((keys < num_keys)[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    p = tl.exp2(logits - row_max[:, None])
    row_sum = tl.sum(p, axis=1)

    v_offsets = _tile_offsets(kv_row, keys, channels, v_stride_b, v_stride_n)
    v = tl.load(v_ptr + v_offsets, mask=kv_mask, other=0.0)
    out = tl.dot(p.to(v.dtype), v, input_precision="ieee") / row_sum[:, None]
    out_offsets = _tile_offsets(row, queries, channels, out_stride_b, out_stride_n)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=query_mask)
    lse_ptrs = lse_ptr + _lse_index(row, head, heads, num_queries, queries)
    tl.store(lse_ptrs, (row_max + tl.log2(row_sum)) * LN2, mask=queries < num_queries)


@jit
def blocked_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    num_queries, num_keys, heads, kv_repeat, num_query_blocks, scale,
    q_stride_b, q_stride_n, k_stride_b, k_stride_n, v_stride_b, v_stride_n, out_stride_b, out_stride_n,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
):
    query_block, row, head = _program_tile(num_query_blocks, heads)
    kv_row = row // kv_repeat
    channels, channel_valid = _head_channels(head, HEAD_DIM, D_PAD)
    queries = query_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_offsets = _tile_offsets(row, queries, channels, q_stride_b, q_stride_n)
    query_mask = _tile_mask(queries, num_queries, channel_valid)
    q = tl.load(q_ptr + q_offsets, mask=query_mask, other=0.0)

    block_keys = tl.arange(0, BLOCK_KV)
    k_offsets = _tile_offsets(kv_row, block_keys, channels, k_stride_b, k_stride_n)
    v_offsets = _tile_offsets(kv_row, block_keys, channels, v_stride_b, v_stride_n)
    row_max = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, D_PAD), dtype=tl.float32)
    for start in range(0, num_keys, BLOCK_KV):
        key_valid = start + block_keys < num_keys
        kv_mask = key_valid[:, None] & channel_valid[None, :]
        k = tl.load(k_ptr + k_offsets, mask=kv_mask, other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * (scale * LOG2E)
        logits = tl.where(key_valid[None, :], logits, float("-inf"))
        # Every block holds a real key, so new_max is finite and the first rescale is exp2(-inf) = 0.
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(logits - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + v_offsets, mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max
        k_offsets += BLOCK_KV * k_stride_n
        v_offsets += BLOCK_KV * v_stride_n

    out_offsets = _tile_offsets(row, queries, channels, out_stride_b, out_stride_n)
    tl.store(out_ptr + out_offsets, (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty), mask=query_mask)
    lse_ptrs = lse_ptr + _lse_index(row, head, heads, num_queries, queries)
    tl.store(lse_ptrs, (row_max + tl.log2(row_sum)) * LN2, mask=queries < num_queries)


@jit
def whole_kv_bwd_kernel(
    grad_out_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, grad_q_ptr, grad_k_fp32_ptr, grad_v_fp32_ptr,
    num_queries, num_keys, heads, kv_repeat, num_query_blocks, scale,
    grad_out_stride_b, grad_out_stride_n, q_stride_b, q_stride_n, k_stride_b, k_stride_n,
    v_stride_b, v_stride_n, grad_q_stride_b, grad_q_stride_n,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, KV_PAD: tl.constexpr,
):
    """One program: one (kv row, head) and the kv_repeat * num_query_blocks query blocks that
    attend to it; writes their dq, and dk, dv of that (kv row, head) to the fp32
    (B*F / kv_repeat, M, heads*d) buffers."""
    kv_row = tl.program_id(0) // heads
    head = tl.program_id(0) % heads
    channels, channel_valid = _head_channels(head, HEAD_DIM, D_PAD)
    keys = tl.arange(0, KV_PAD)
    key_valid = keys < num_keys
    k_offsets = _tile_offsets(kv_row, keys, channels, k_stride_b, k_stride_n)
    kv_mask = _tile_mask(keys, num_keys, channel_valid)
    k = tl.load(k_ptr + k_offsets, mask=kv_mask, other=0.0)
    v_offsets = _tile_offsets(kv_row, keys, channels, v_stride_b, v_stride_n)
    v = tl.load(v_ptr + v_offsets, mask=kv_mask, other=0.0)
    grad_k = tl.zeros((KV_PAD, D_PAD), dtype=tl.float32)
    grad_v = tl.zeros((KV_PAD, D_PAD), dtype=tl.float32)

    for block in range(0, kv_repeat * num_query_blocks):
        row = kv_row * kv_repeat + block // num_query_blocks
        queries = (block % num_query_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        # Padded query rows load q = 0, dO = 0 and lse = 0: finite probabilities that, times
        # dO = 0, add nothing to any gradient.
        q_offsets = _tile_offsets(row, queries, channels, q_stride_b, q_stride_n)
        query_mask = _tile_mask(queries, num_queries, channel_valid)
        q = tl.load(q_ptr + q_offsets, mask=query_mask, other=0.0)
        lse_ptrs = lse_ptr + _lse_index(row, head, heads, num_queries, queries)
        lse = tl.load(lse_ptrs, mask=queries < num_queries, other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        p = tl.where(key_valid[None, :], tl.exp(logits - lse[:, None]), 0.0)

        grad_out_offsets = _tile_offsets(row, queries, channels, grad_out_stride_b, grad_out_stride_n)
        grad_out = tl.load(grad_out_ptr + grad_out_offsets, mask=query_mask, other=0.0)
        grad_v += tl.dot(tl.trans(p.to(grad_out.dtype)), grad_out, input_precision="ieee")
        grad_p = tl.dot(grad_out, tl.trans(v), input_precision="ieee")
        delta = tl.sum(p * grad_p, axis=1)
        grad_logits = (p * (grad_p - delta[:, None])).to(q.dtype)
        grad_q = tl.dot(grad_logits, k, input_precision="ieee") * scale
        grad_q_offsets = _tile_offsets(row, queries, channels, grad_q_stride_b, grad_q_stride_n)
        tl.store(grad_q_ptr + grad_q_offsets, grad_q.to(grad_q_ptr.dtype.element_ty), mask=query_mask)
        grad_k += tl.dot(tl.trans(grad_logits), q, input_precision="ieee")

    # The fp32 buffers are contiguous (B*F / kv_repeat, M, heads*d).
    stride_n = heads * HEAD_DIM
    kv_offsets = _tile_offsets(kv_row, keys, channels, num_keys * stride_n, stride_n)
    tl.store(grad_k_fp32_ptr + kv_offsets, grad_k * scale, mask=kv_mask)
    tl.store(grad_v_fp32_ptr + kv_offsets, grad_v, mask=kv_mask)


@jit
def blocked_bwd_dq_kernel(
    grad_out_ptr, q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, delta_ptr, row_scale_ptr, grad_q_ptr,
    num_queries, num_keys, heads, kv_repeat, num_query_blocks, scale,
    grad_out_stride_b, grad_out_stride_n, q_stride_b, q_stride_n, k_stride_b, k_stride_n,
    v_stride_b, v_stride_n, out_stride_b, out_stride_n, grad_q_stride_b, grad_q_stride_n,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    RENORMALISE: tl.constexpr,
):
    """dq of one query block, walking every KV block; also writes delta = rowsum(P * dP) of its
    rows (and with RENORMALISE their row scales) for the dk/dv kernel, which runs next."""
    query_block, row, head = _program_tile(num_query_blocks, heads)
    kv_row = row // kv_repeat
    channels, channel_valid = _head_channels(head, HEAD_DIM, D_PAD)
    queries = query_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    query_valid = queries < num_queries
    q_offsets = _tile_offsets(row, queries, channels, q_stride_b, q_stride_n)
    query_mask = _tile_mask(queries, num_queries, channel_valid)
    q = tl.load(q_ptr + q_offsets, mask=query_mask, other=0.0)
    grad_out_offsets = _tile_offsets(row, queries, channels, grad_out_stride_b, grad_out_stride_n)
    grad_out = tl.load(grad_out_ptr + grad_out_offsets, mask=query_mask, other=0.0)
    row_index = _lse_index(row, head, heads, num_queries, queries)
    lse = tl.load(lse_ptr + row_index, mask=query_valid, other=0.0)

    block_keys = tl.arange(0, BLOCK_KV)
    k_offsets = _tile_offsets(kv_row, block_keys, channels, k_stride_b, k_stride_n)
    v_offsets = _tile_offsets(kv_row, block_keys, channels, v_stride_b, v_stride_n)
    if RENORMALISE:
        # The lse, one fp32 number of magnitude ~5, is good to only ~3e-7, an error that scales
        # every recomputed probability of its row alike, and delta = dO . O carries the forward's
        # rounding of O: together above fp32 storage's error budget. A first pass over the keys
        # measures each row's probability sum, whose reciprocal rescales the row, and
        # delta = rowsum(P * dP) from the fp32 tiles themselves (two more products a KV block).
        row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        p_dot_grad_p = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        pass_k_offsets = k_offsets
        pass_v_offsets = v_offsets
        for start in range(0, num_keys, BLOCK_KV):
            key_valid = start + block_keys < num_keys
            kv_mask = key_valid[:, None] & channel_valid[None, :]
            k = tl.load(k_ptr + pass_k_offsets, mask=kv_mask, other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            p = tl.where(key_valid[None, :], tl.exp(logits - lse[:, None]), 0.0)
            v = tl.load(v_ptr + pass_v_offsets, mask=kv_mask, other=0.0)
            grad_p = tl.dot(grad_out, tl.trans(v), input_precision="ieee")
            row_sum += tl.sum(p, axis=1)
            p_dot_grad_p += tl.sum(p * grad_p, axis=1)
            pass_k_offsets += BLOCK_KV * k_stride_n
            pass_v_offsets += BLOCK_KV * v_stride_n
        row_scale = 1.0 / row_sum
        delta = p_dot_grad_p * row_scale
        tl.store(row_scale_ptr + row_index, row_scale, mask=query_valid)
    else:
        # FlashAttention's delta = rowsum(dO * O), equal to rowsum(P * dP) without a pass.
        out_offsets = _tile_offsets(row, queries, channels, out_stride_b, out_stride_n)
        out = tl.load(out_ptr + out_offsets, mask=query_mask, other=0.0)
        delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), axis=1)
    tl.store(delta_ptr + row_index, delta, mask=query_valid)

    grad_q = tl.zeros((BLOCK_Q, D_PAD), dtype=tl.float32)
    for start in range(0, num_keys, BLOCK_KV):
        key_valid = start + block_keys < num_keys
        kv_mask = key_valid[:, None] & channel_valid[None, :]
        k = tl.load(k_ptr + k_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_offsets, mask=kv_mask, other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        p = tl.where(key_valid[None, :], tl.exp(logits - lse[:, None]), 0.0)
        if RENORMALISE:
            p *= row_scale[:, None]
        grad_p = tl.dot(grad_out, tl.trans(v), input_precision="ieee")
        grad_logits = (p * (grad_p - delta[:, None])).to(k.dtype)
        grad_q += tl.dot(grad_logits, k, input_precision="ieee")
        k_offsets += BLOCK_KV * k_stride_n
        v_offsets += BLOCK_KV * v_stride_n
    grad_q_offsets = _tile_offsets(row, queries, channels, grad_q_stride_b, grad_q_stride_n)
    tl.store(grad_q_ptr + grad_q_offsets, (grad_q * scale).to(grad_q_ptr.dtype.element_ty), mask=query_mask)


@jit
def blocked_bwd_dkdv_kernel(
    grad_out_ptr, q_ptr, k_ptr, v_ptr, lse_ptr, delta_ptr, row_scale_ptr, grad_k_ptr, grad_v_ptr,
    num_queries, num_keys, heads, kv_repeat, num_kv_blocks, scale,
    grad_out_stride_b, grad_out_stride_n, q_stride_b, q_stride_n, k_stride_b, k_stride_n,
    v_stride_b, v_stride_n, grad_kv_stride_b, grad_kv_stride_n,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    RENORMALISE: tl.constexpr,
):
    """dk, dv of one KV block, walking every query block of the kv_repeat rows that attend to it.
    Works on transposed tiles (keys x queries), so both products accumulate without transposing
    the accumulators."""
    kv_block, kv_row, head = _program_tile(num_kv_blocks, heads)
    channels, channel_valid = _head_channels(head, HEAD_DIM, D_PAD)
    keys = kv_block * BLOCK_KV + tl.arange(0, BLOCK_KV)
    key_valid = keys < num_keys
    k_offsets = _tile_offsets(kv_row, keys, channels, k_stride_b, k_stride_n)
    kv_mask = _tile_mask(keys, num_keys, channel_valid)
    k = tl.load(k_ptr + k_offsets, mask=kv_mask, other=0.0)
    v_offsets = _tile_offsets(kv_row, keys, channels, v_stride_b, v_stride_n)
    v = tl.load(v_ptr + v_offsets, mask=kv_mask, other=0.0)
    grad_k = tl.zeros((BLOCK_KV, D_PAD), dtype=tl.float32)
    grad_v = tl.zeros((BLOCK_KV, D_PAD), dtype=tl.float32)

    num_query_blocks = tl.cdiv(num_queries, BLOCK_Q)
    for block in range(0, kv_repeat * num_query_blocks):
        row = kv_row * kv_repeat + block // num_query_blocks
        queries = (block % num_query_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        query_valid = queries < num_queries
        # Padded query rows: q = 0, dO = 0, lse = delta = 0, so they add nothing.
        q_offsets = _tile_offsets(row, queries, channels, q_stride_b, q_stride_n)
        query_mask = _tile_mask(queries, num_queries, channel_valid)
        q = tl.load(q_ptr + q_offsets, mask=query_mask, other=0.0)
        row_index = _lse_index(row, head, heads, num_queries, queries)
        lse = tl.load(lse_ptr + row_index, mask=query_valid, other=0.0)
        delta = tl.load(delta_ptr + row_index, mask=query_valid, other=0.0)
        logits_t = tl.dot(k, tl.trans(q), input_precision="ieee") * scale
        p_t = tl.where(key_valid[:, None], tl.exp(logits_t - lse[None, :]), 0.0)
        if RENORMALISE:
            p_t *= tl.load(row_scale_ptr + row_index, mask=query_valid, other=0.0)[None, :]
        grad_out_offsets = _tile_offsets(row, queries, channels, grad_out_stride_b, grad_out_stride_n)
        grad_out = tl.load(grad_out_ptr + grad_out_offsets, mask=query_mask, other=0.0)
        grad_v += tl.dot(p_t.to(grad_out.dtype), grad_out, input_precision="ieee")
        grad_p_t = tl.dot(v, tl.trans(grad_out), input_precision="ieee")
        grad_logits_t = (p_t * (grad_p_t - delta[None, :])).to(q.dtype)
        grad_k += tl.dot(grad_logits_t, q, input_precision="ieee")

    grad_offsets = _tile_offsets(kv_row, keys, channels, grad_kv_stride_b, grad_kv_stride_n)
    tl.store(grad_k_ptr + grad_offsets, (grad_k * scale).to(grad_k_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(grad_v_ptr + grad_offsets, grad_v.to(grad_v_ptr.dtype.element_ty), mask=kv_mask)


# ---- launch parameters ---------------------------------------------------------------------------


def head_dim_pad(head_dim: int) -> int:
    return max(next_power_of_2(head_dim), MIN_DOT)


def whole_kv_pad(num_keys: int, dtype: torch.dtype) -> int:
    """The padded key count of the whole-KV path, or 0 when these keys take the blocked path."""
    pad = max(next_power_of_2(num_keys), MIN_DOT)
    return pad if pad <= WHOLE_KV_MAX and dtype != torch.float32 else 0


# ---- production configurations for the kernel report (see launch_config.py) ----------------------
# VideoCrafter2: head dim 64 in every storage dtype; in 16-bit storage the 77 text tokens (padded
# to 128) on the whole-KV path and self-attention on the blocked one, fp32 all on the blocked
# path, and the 40-token middle block (padded to 64) in bf16, the training dtype. The whole-KV
# backward's dk, dv buffers are fp32 whatever the storage. Self-attention has kv_repeat = 1, which
# the launcher compiles as a constant; cross-attention shares a video's context across its frames.

_SIZES = dict(num_queries="i32", num_keys="i32", heads="i32", kv_repeat="i32", scale="fp32")
SELF_ATTENTION = dict(kv_repeat=UNIT)
CROSS_ATTENTION: dict = {}


def _strides(*names: str) -> dict:
    return {f"{name}_stride_{axis}": "i32" for name in names for axis in "bn"}


_FWD_ARGS = dict(_SIZES, lse_ptr="*fp32", num_query_blocks="i32", **_strides("q", "k", "v", "out"))
_WHOLE_KV_BWD_ARGS = dict(
    _SIZES, lse_ptr="*fp32", grad_k_fp32_ptr="*fp32", grad_v_fp32_ptr="*fp32", num_query_blocks="i32",
    **_strides("grad_out", "q", "k", "v", "grad_q"),
)
_ROW_STATS = dict(lse_ptr="*fp32", delta_ptr="*fp32", row_scale_ptr="*fp32")
_DQ_ARGS = dict(
    _SIZES, **_ROW_STATS, num_query_blocks="i32", **_strides("grad_out", "q", "k", "v", "out", "grad_q")
)
_DKDV_ARGS = dict(_SIZES, **_ROW_STATS, num_kv_blocks="i32", **_strides("grad_out", "q", "k", "v", "grad_kv"))


def whole_kv_constexprs(tiles: Tiles, head_dim: int, kv_pad: int) -> tuple[dict, int]:
    constexprs = dict(HEAD_DIM=head_dim, D_PAD=head_dim_pad(head_dim), BLOCK_Q=tiles.block_q, KV_PAD=kv_pad)
    return constexprs, tiles.num_warps


def blocked_constexprs(tiles_by_fp32: dict, head_dim: int, fp32: bool) -> tuple[dict, int]:
    tiles = tiles_by_fp32[fp32]
    constexprs = dict(HEAD_DIM=head_dim, D_PAD=head_dim_pad(head_dim), BLOCK_Q=tiles.block_q, BLOCK_KV=tiles.block_kv)
    return constexprs, tiles.num_warps


def blocked_bwd_constexprs(tiles_by_fp32: dict, head_dim: int, fp32: bool) -> tuple[dict, int]:
    """Renormalised probabilities in fp32 storage only: in 16-bit storage the lse's and O's errors
    are far below the rounding of the probabilities to tensor-core operands."""
    constexprs, num_warps = blocked_constexprs(tiles_by_fp32, head_dim, fp32)
    return dict(constexprs, RENORMALISE=fp32), num_warps


def _whole_kv_variants(head_dim: int, kv_pad: int, attention: dict) -> list:
    return [
        (whole_kv_fwd_kernel, {**_FWD_ARGS, **attention}, whole_kv_constexprs(WHOLE_KV_FWD, head_dim, kv_pad)),
        (whole_kv_bwd_kernel, {**_WHOLE_KV_BWD_ARGS, **attention}, whole_kv_constexprs(WHOLE_KV_BWD, head_dim, kv_pad)),
    ]


def _blocked_variants(head_dim: int, fp32: bool, attention: dict) -> list:
    return [
        (blocked_fwd_kernel, {**_FWD_ARGS, **attention}, blocked_constexprs(BLOCKED_FWD, head_dim, fp32)),
        (blocked_bwd_dq_kernel, {**_DQ_ARGS, **attention}, blocked_bwd_constexprs(BLOCKED_BWD_DQ, head_dim, fp32)),
        (blocked_bwd_dkdv_kernel, {**_DKDV_ARGS, **attention}, blocked_bwd_constexprs(BLOCKED_BWD_DKDV, head_dim, fp32)),
    ]


def _configs(variants: list, dtype: str) -> list[KernelConfig]:
    return [
        config
        for kernel, args, (constexprs, num_warps) in variants
        for config in storage_configs(kernel, args, constexprs, num_warps)
        if config.dtype == dtype
    ]


REPORT_CONFIGS: list[KernelConfig] = (
    _configs(_blocked_variants(64, True, SELF_ATTENTION) + _blocked_variants(64, True, CROSS_ATTENTION), "fp32")
    + [
        config
        for dtype in ("fp16", "bf16")
        for config in _configs(
            _whole_kv_variants(64, WHOLE_KV_MAX, CROSS_ATTENTION) + _blocked_variants(64, False, SELF_ATTENTION), dtype
        )
    ]
    + _configs(_whole_kv_variants(64, 64, SELF_ATTENTION), "bf16")
)


# ---- launchers -----------------------------------------------------------------------------------


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output and scratch buffer is allocated here (tests swap in a NaN-filled one to catch
    unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel, num_programs: int, tensors: list, sizes: list, strided: list, constexprs: dict, num_warps: int):
    """One launch: the pointer arguments, then the sizes, then (stride_b, stride_n) of each strided
    tensor (tests spy on this function)."""
    strides = [stride for x in strided for stride in (x.stride(0), x.stride(1))]
    kernel[(num_programs,)](*tensors, *sizes, *strides, **constexprs, num_warps=num_warps)


def spatial_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, kv_repeat: int):
    """(out (B*F, N, heads*d) contiguous in q's dtype, lse (B*F, heads, N) fp32)."""
    rows, num_queries, channels = q.shape
    num_keys = k.shape[1]
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((rows, heads, num_queries), torch.float32, q.device)
    if q.numel() == 0:
        return out, lse
    head_dim, fp32 = channels // heads, q.dtype == torch.float32
    kv_pad = whole_kv_pad(num_keys, q.dtype)
    if kv_pad:
        kernel = whole_kv_fwd_kernel
        constexprs, num_warps = whole_kv_constexprs(WHOLE_KV_FWD, head_dim, kv_pad)
    else:
        kernel = blocked_fwd_kernel
        constexprs, num_warps = blocked_constexprs(BLOCKED_FWD, head_dim, fp32)
    num_query_blocks = cdiv(num_queries, constexprs["BLOCK_Q"])
    _launch(
        kernel, num_query_blocks * rows * heads, [q, k, v, out, lse],
        [num_queries, num_keys, heads, kv_repeat, num_query_blocks, float(scale)], [q, k, v, out],
        constexprs, num_warps,
    )
    return out, lse


def spatial_attention_backward(grad_out, q, k, v, out, lse, heads: int, scale: float, kv_repeat: int):
    """(grad_q, grad_k, grad_v), contiguous, of the shapes and dtype of q, k, v."""
    rows, num_queries, channels = q.shape
    kv_rows, num_keys, _ = k.shape
    if q.numel() == 0:
        # No query attends to any key: dk = dv = 0.
        zeros = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
        return new_output(q.shape, q.dtype, q.device), zeros, zeros.clone()
    head_dim, fp32 = channels // heads, q.dtype == torch.float32
    sizes = [num_queries, num_keys, heads, kv_repeat]
    grad_q = new_output(q.shape, q.dtype, q.device)
    kv_pad = whole_kv_pad(num_keys, q.dtype)
    if kv_pad:
        constexprs, num_warps = whole_kv_constexprs(WHOLE_KV_BWD, head_dim, kv_pad)
        num_query_blocks = cdiv(num_queries, constexprs["BLOCK_Q"])
        grad_k_fp32, grad_v_fp32 = (new_output(k.shape, torch.float32, q.device) for _ in range(2))
        _launch(
            whole_kv_bwd_kernel, kv_rows * heads,
            [grad_out, q, k, v, lse, grad_q, grad_k_fp32, grad_v_fp32],
            sizes + [num_query_blocks, float(scale)], [grad_out, q, k, v, grad_q],
            constexprs, num_warps,
        )
        return grad_q, grad_k_fp32.to(k.dtype), grad_v_fp32.to(v.dtype)

    delta = new_output(lse.shape, torch.float32, q.device)
    # Without RENORMALISE the kernels never touch row_scale; delta stands in for the pointer.
    row_scale = new_output(lse.shape, torch.float32, q.device) if fp32 else delta
    row_stats = [lse, delta, row_scale]
    constexprs, num_warps = blocked_bwd_constexprs(BLOCKED_BWD_DQ, head_dim, fp32)
    num_query_blocks = cdiv(num_queries, constexprs["BLOCK_Q"])
    _launch(
        blocked_bwd_dq_kernel, num_query_blocks * rows * heads, [grad_out, q, k, v, out, *row_stats, grad_q],
        sizes + [num_query_blocks, float(scale)], [grad_out, q, k, v, out, grad_q], constexprs, num_warps,
    )
    grad_k, grad_v = (new_output(k.shape, k.dtype, k.device) for _ in range(2))
    constexprs, num_warps = blocked_bwd_constexprs(BLOCKED_BWD_DKDV, head_dim, fp32)
    num_kv_blocks = cdiv(num_keys, constexprs["BLOCK_KV"])
    _launch(
        blocked_bwd_dkdv_kernel, num_kv_blocks * kv_rows * heads, [grad_out, q, k, v, *row_stats, grad_k, grad_v],
        sizes + [num_kv_blocks, float(scale)], [grad_out, q, k, v, grad_k], constexprs, num_warps,
    )
    return grad_q, grad_k, grad_v
