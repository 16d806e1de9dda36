"""Public spatial attention (SPEC 1: the UNet's spatial self-attention and its cross-attention to
the text tokens), registered as torch.library custom ops.

`turbo_kernels::spatial_attention` returns the output and the logsumexp of every query row (fp32,
(B*F, heads, N)); its autograd formula calls `turbo_kernels::spatial_attention_backward`, which
recomputes the probabilities from q, k and that logsumexp (the Triton kernels of self-attention
also read the output). The public function returns the output alone. Inside each op,
`dispatch.run` picks triton | reference for the actual tensors; whether a model calls this op or
torch's scaled_dot_product_attention at a given shape is the patch layer's choice.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from turbo_kernels import checks, dispatch
from turbo_kernels.reference import attention as ref



def _triton():
    from turbo_kernels.triton_kernels import spatial_attention

    return spatial_attention


def _lse_shape(q: Tensor, heads: int) -> tuple[int, int, int]:
    return q.shape[0], heads, q.shape[1]


def _check_inputs(q, k, v, heads, kv_repeat) -> int:
    """Checks q (B*F, N, heads*d) and k, v (B*F / kv_repeat, M, heads*d); returns the head dim d."""
    checks.floating_tensor(q, "q", min_dim=0)
    if q.dim() != 3:
        raise ValueError(f"q must have 3 dimensions (B*F, N, heads*d), got shape {tuple(q.shape)}")
    checks.floating_tensor(k, "k", min_dim=0)
    if k.dim() != 3:
        raise ValueError(f"k must have 3 dimensions (B*F / kv_repeat, M, heads*d), got shape {tuple(k.shape)}")
    checks.same_as(v, "v", k, "k")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device}, expected the device of q ({q.device})")
    checks.positive_int(heads, "heads")
    checks.positive_int(kv_repeat, "kv_repeat")
    rows, _, channels = q.shape
    if channels == 0:
        raise ValueError("q's last dimension (heads*d) must be positive, got 0")
    if channels % heads:
        raise ValueError(f"q's last dimension {channels} is not divisible by heads={heads}")
    if k.shape[2] != channels:
        raise ValueError(f"k's last dimension {k.shape[2]} is not q's last dimension {channels} (heads*d)")
    if k.shape[0] * kv_repeat != rows:
        raise ValueError(
            f"q's first dimension {rows} (B*F) is not k's first dimension {k.shape[0]} times kv_repeat={kv_repeat}"
        )
    if k.shape[1] == 0:
        raise ValueError("k's second dimension (M, the keys) must be positive, got 0")
    return channels // heads


# ---- reference backend -------------------------------------------------------------------------


def _by_kv_row(x: Tensor, heads: int, kv_rows: int, rows_per_kv_row: int, dtype: torch.dtype) -> Tensor:
    """(kv_rows * rows_per_kv_row, tokens, heads*d) -> (kv_rows, rows_per_kv_row, heads, tokens, d)
    in `dtype`."""
    x = ref.split_heads(x, heads).to(dtype)
    return x.reshape(kv_rows, rows_per_kv_row, *x.shape[1:])


def _reference_forward(q, k, v, heads, scale, kv_repeat):
    out = ref.spatial_attention(q, k, v, heads, scale, kv_repeat).contiguous()
    # The Triton backward needs the logsumexp even when this forward ran the reference.
    q_h = _by_kv_row(q, heads, k.shape[0], kv_repeat, torch.float32)
    k_h = _by_kv_row(k, heads, k.shape[0], 1, torch.float32)
    lse = torch.logsumexp(torch.matmul(q_h, k_h.transpose(-1, -2)) * scale, dim=-1)
    return out, lse.reshape(_lse_shape(q, heads)).contiguous()


def _reference_backward(grad_out, q, k, v, out, lse, heads, scale, kv_repeat):
    """Explicit softmax-attention gradients in float32 (float64 for float64 inputs); dk and dv sum
    over the kv_repeat query rows that share a key row."""
    probs = ref.spatial_attention_probs(q, k, heads, scale, kv_repeat)
    kv_rows, cdt = k.shape[0], probs.dtype
    q_h, grad_h = (_by_kv_row(x, heads, kv_rows, kv_repeat, cdt) for x in (q, grad_out))
    k_h, v_h = (_by_kv_row(x, heads, kv_rows, 1, cdt) for x in (k, v))
    grad_probs = torch.matmul(grad_h, v_h.transpose(-1, -2))
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True)) * scale
    grad_q = torch.matmul(grad_scores, k_h).flatten(0, 1)
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q_h).sum(dim=1)
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_h).sum(dim=1)
    return tuple(ref.merge_heads(g).to(x.dtype).contiguous() for g, x in zip((grad_q, grad_k, grad_v), (q, k, v)))


# ---- Triton backend: what its kernels cannot take ---------------------------------------------


def _kernel_problem(tensors: dict[str, Tensor], heads: int) -> Optional[str]:
    """Why the Triton kernels cannot take these tensors, or None."""
    first = next(iter(tensors.values()))
    problem = checks.storage_problem(*tensors.values())
    if problem:
        return problem
    head_dim = first.shape[-1] // heads
    if head_dim > _triton().MAX_HEAD_DIM:
        return f"head dim {head_dim} exceeds {_triton().MAX_HEAD_DIM}"
    return next(filter(None, (checks.channel_stride_problem(t, name) for name, t in tensors.items())), None)


def _forward_problem(q, k, v, heads, scale, kv_repeat):
    return _kernel_problem(dict(q=q, k=k, v=v), heads)


def _backward_problem(grad_out, q, k, v, out, lse, heads, scale, kv_repeat):
    expected = _lse_shape(q, heads)
    if lse.dtype != torch.float32 or lse.shape != expected or not lse.is_contiguous():
        return f"lse must be a contiguous float32 tensor of shape {expected}"
    return _kernel_problem(dict(grad_out=grad_out, q=q, k=k, v=v, out=out), heads)


dispatch.register("spatial_attention", "reference")(_reference_forward)
dispatch.register("spatial_attention", "triton", _forward_problem)(lambda *a: _triton().spatial_attention(*a))
dispatch.register("spatial_attention_backward", "reference")(_reference_backward)
dispatch.register("spatial_attention_backward", "triton", _backward_problem)(
    lambda *a: _triton().spatial_attention_backward(*a)
)


# ---- custom ops --------------------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::spatial_attention")
def _spatial_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, kv_repeat: int
) -> tuple[Tensor, Tensor]:
    return dispatch.run("spatial_attention", q.device, q, k, v, heads, scale, kv_repeat)


@_spatial_attention.register_fake
def _(q, k, v, heads, scale, kv_repeat):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, heads), dtype=torch.float32)


@dispatch.custom_op("turbo_kernels::spatial_attention_backward")
def _spatial_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, heads: int, scale: float,
    kv_repeat: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.run(
        "spatial_attention_backward", q.device, grad_out, q, k, v, out, lse, heads, scale, kv_repeat,
        requested=backend,
    )


@_spatial_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, heads, scale, kv_repeat, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, heads, scale, kv_repeat = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.attention = (heads, scale, kv_repeat)
    ctx.backend = dispatch.requested_backend()


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    # Autograd may hand in an expanded grad (e.g. from .sum()); the kernels need unit channel stride.
    if grad_out.shape[-1] > 1 and grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_q, grad_k, grad_v = _spatial_attention_backward(grad_out, q, k, v, out, lse, *ctx.attention, ctx.backend)
    return grad_q, grad_k, grad_v, None, None, None


_spatial_attention.register_autograd(_backward, setup_context=_setup)


def spatial_attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, scale: Optional[float] = None, kv_repeat: int = 1
) -> Tensor:
    """softmax(scale q k^T) v per head over the M tokens of k (SPEC 1), returned as a contiguous
    (B*F, N, heads*d) tensor in q's dtype, the layout the out projection reads.

    q: (B*F, N, heads*d), the tokens of every frame. k, v: (B*F / kv_repeat, M, heads*d); query row
    r attends to key row r // kv_repeat. Self-attention: k, v of q's shape (kv_repeat=1).
    Cross-attention to a text context shared by the F frames of a video: k, v of (B, 77, heads*d)
    and kv_repeat=F, never repeated in memory (k, v expanded to B*F rows with a zero batch stride
    work too). Any strides are taken without copies as long as channels are unit-stride (q, k, v
    sliced from one fused qkv projection). scale defaults to 1/sqrt(d). Differentiable in q, k, v.
    """
    head_dim = _check_inputs(q, k, v, heads, kv_repeat)
    scale = ref.default_scale(head_dim, None if scale is None else checks.positive_float(scale, "scale"))
    out, _ = _spatial_attention(q, k, v, heads, scale, kv_repeat)
    return out
