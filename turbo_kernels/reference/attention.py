"""Plain PyTorch definitions of temporal attention, its probabilities and the motion energy, and
of spatial self- and cross-attention (SPEC sections 1 and 4). The kernels are tested against these.

Layouts (the API names them; nothing is guessed from strides):
- "frames": (B*F, N, heads*d), the main stream's token layout: row b*F + f, position n.
- "sequences": (B*N, F, heads*d), what diffusers' temporal transformer hands its processors.
In both, the attention sequence index is s = b*N + n, and attention runs over the F frames of a
sequence, per head. Softmax is float32 (float64 for float64 inputs); no mask, no positions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

LAYOUTS = ("frames", "sequences")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_sequences(x: Tensor, num_frames: int, heads: int, layout: str) -> Tensor:
    """(B*F, N, heads*d) or (B*N, F, heads*d) -> (B*N, heads, F, d)."""
    if layout == "frames":
        bf, n, hd = x.shape
        x = x.reshape(bf // num_frames, num_frames, n, heads, hd // heads).permute(0, 2, 3, 1, 4)
        return x.reshape(-1, heads, num_frames, hd // heads)
    s, f, hd = x.shape
    return x.reshape(s, f, heads, hd // heads).permute(0, 2, 1, 3)


def from_sequences(x: Tensor, shape: tuple[int, int, int], layout: str) -> Tensor:
    """(B*N, heads, F, d) -> the layout's (B*F, N, heads*d) or (B*N, F, heads*d), `shape`: the
    layout's shape (read from it, not divided out of x's: N may be 0)."""
    _, heads, f, d = x.shape
    if layout == "frames":
        rows, positions, _ = shape
        x = x.reshape(rows // f, positions, heads, f, d).permute(0, 3, 1, 2, 4)
        return x.reshape(rows, positions, heads * d)
    return x.permute(0, 2, 1, 3).reshape(shape[0], f, heads * d)


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def temporal_attention_probs(
    q: Tensor, k: Tensor, num_frames: int, heads: int, layout: str = "frames", scale: Optional[float] = None
) -> Tensor:
    """P = softmax_j(scale q_i . k_j) over the frames of every sequence: (B*N, heads, F, F), rows are
    queries, in float32 (float64 for float64 inputs)."""
    cdt = _compute_dtype(q)
    q_s = to_sequences(q, num_frames, heads, layout).to(cdt)
    k_s = to_sequences(k, num_frames, heads, layout).to(cdt)
    scores = torch.matmul(q_s, k_s.transpose(-1, -2)) * default_scale(q_s.shape[-1], scale)
    return torch.softmax(scores, dim=-1)


def temporal_attention(
    q: Tensor, k: Tensor, v: Tensor, num_frames: int, heads: int, layout: str = "frames", scale: Optional[float] = None
) -> Tensor:
    """softmax(scale q k^T) v over the frames of every sequence, returned in the input's layout and dtype."""
    probs = temporal_attention_probs(q, k, num_frames, heads, layout, scale)
    out = torch.matmul(probs, to_sequences(v, num_frames, heads, layout).to(probs.dtype))
    return from_sequences(out, q.shape, layout).to(q.dtype)


def motion_energy(
    q: Tensor,
    k: Tensor,
    ref_probs: Tensor,
    num_frames: int,
    heads: int,
    layout: str = "frames",
    scale: Optional[float] = None,
    num_videos: Optional[int] = None,
) -> Tensor:
    """Top-1-masked attention MSE of SPEC 4 (without its 1e4 factor and mean over layers).

    For every (sequence, head, query row) keep only the key where `ref_probs` is largest (the first
    such key on ties) and average (P - ref_probs)^2 over the kept entries. Returns a float32 (float64)
    scalar, or with `num_videos` a (num_videos,) tensor of per-video means (sequences s split into
    num_videos equal consecutive groups, as s = b*N + n does). `ref_probs` is held constant.
    """
    probs = temporal_attention_probs(q, k, num_frames, heads, layout, scale)
    ref_probs = ref_probs.detach().to(probs.dtype)
    top1 = ref_probs.argmax(dim=-1, keepdim=True)
    kept = probs.gather(-1, top1) - ref_probs.gather(-1, top1)
    squared = kept.squeeze(-1) ** 2
    if num_videos is None:
        return squared.mean()
    return squared.reshape(num_videos, -1).mean(dim=1)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(rows, tokens, heads*d) -> (rows, heads, tokens, d), a view."""
    rows, tokens, channels = x.shape
    return x.reshape(rows, tokens, heads, channels // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(rows, heads, tokens, d) -> (rows, tokens, heads*d)."""
    rows, heads, tokens, d = x.shape
    return x.transpose(1, 2).reshape(rows, tokens, heads * d)


def spatial_attention_probs(
    q: Tensor, k: Tensor, heads: int, scale: Optional[float] = None, kv_repeat: int = 1
) -> Tensor:
    """P = softmax_j(scale q_i . k_j) of spatial self- or cross-attention: (B_kv, kv_repeat, heads,
    N, M) for q (B_kv*kv_repeat, N, heads*d) and k (B_kv, M, heads*d), in float32 (float64 for
    float64 inputs). Query row r attends to key row r // kv_repeat, broadcast, never repeated."""
    cdt = _compute_dtype(q)
    q_h = split_heads(q, heads).to(cdt)
    k_h = split_heads(k, heads).to(cdt)
    q_h = q_h.reshape(k_h.shape[0], kv_repeat, *q_h.shape[1:])
    scores = torch.matmul(q_h, k_h.unsqueeze(1).transpose(-1, -2)) * default_scale(q_h.shape[-1], scale)
    return torch.softmax(scores, dim=-1)


def spatial_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, scale: Optional[float] = None, kv_repeat: int = 1
) -> Tensor:
    """softmax(scale q k^T) v per head over the M tokens of k (SPEC 1: the UNet's spatial
    self-attention, and cross-attention to the 77 text tokens), returned in q's layout and dtype.

    q: (B*F, N, heads*d); k, v: (B*F / kv_repeat, M, heads*d). Query row r attends to the keys of
    row r // kv_repeat, so cross-attention can take one text context per video (B, 77, heads*d)
    for its F frames with kv_repeat=F. Softmax and products in float32 (float64 for float64)."""
    probs = spatial_attention_probs(q, k, heads, scale, kv_repeat)
    out = torch.matmul(probs, split_heads(v, heads).to(probs.dtype).unsqueeze(1))
    return merge_heads(out.flatten(0, 1)).to(q.dtype)
