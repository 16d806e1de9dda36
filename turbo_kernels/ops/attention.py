"""Public temporal attention (SPEC 1), registered as torch.library custom ops.

`turbo_kernels::temporal_attention` returns the output and the logsumexp of every query row (fp32,
(sequences, heads, F)); its autograd formula calls `turbo_kernels::temporal_attention_backward`,
which recomputes the probabilities from q, k and that logsumexp. The public function returns the
output alone. Inside each op, `dispatch.run` picks cuda | triton | reference for the actual tensors.

`temporal_attention_packed` takes q, k and v as the thirds of one projection's output (..., 3C),
as the fused temporal block makes them: its backward returns their gradient as one tensor of
that shape, which the Triton kernel writes in place. Through three slices, autograd would copy
the three gradients into one (a concatenation of three activations).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from turbo_kernels import _cuda_ext, checks, dispatch
from turbo_kernels.reference import attention as ref



def _triton():
    from turbo_kernels.triton_kernels import temporal_attention

    return temporal_attention


def _num_sequences(q: Tensor, num_frames: int, layout: str):
    return (q.shape[0] // num_frames) * q.shape[1] if layout == "frames" else q.shape[0]


# ---- reference backend -------------------------------------------------------------------------


def _reference_forward(q, k, v, num_frames, heads, layout, scale):
    out = ref.temporal_attention(q, k, v, num_frames, heads, layout, scale).contiguous()
    # The Triton backward needs the logsumexp even when this forward ran the reference.
    q_s = ref.to_sequences(q, num_frames, heads, layout).float()
    k_s = ref.to_sequences(k, num_frames, heads, layout).float()
    lse = torch.logsumexp(torch.matmul(q_s, k_s.transpose(-1, -2)) * scale, dim=-1)
    return out, lse.contiguous()


def _reference_backward(grad_out, q, k, v, lse, num_frames, heads, layout, scale):
    """Explicit softmax-attention gradients in float32 (float64 for float64 inputs)."""
    probs = ref.temporal_attention_probs(q, k, num_frames, heads, layout, scale)
    cdt = probs.dtype
    q_s, k_s, v_s, grad_s = (ref.to_sequences(x, num_frames, heads, layout).to(cdt) for x in (q, k, v, grad_out))
    grad_probs = torch.matmul(grad_s, v_s.transpose(-1, -2))
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True)) * scale
    grads = (
        torch.matmul(grad_scores, k_s),
        torch.matmul(grad_scores.transpose(-1, -2), q_s),
        torch.matmul(probs.transpose(-1, -2), grad_s),
    )
    return tuple(ref.from_sequences(g, x.shape, layout).to(x.dtype).contiguous() for g, x in zip(grads, (q, k, v)))


# ---- Triton backend: what its kernels cannot take ---------------------------------------------


def _kernel_problem(tensors: dict[str, Tensor], num_frames: int, heads: int) -> Optional[str]:
    """Why the Triton kernels cannot take these tensors (all of one layout and shape), or None."""
    kernels = _triton()
    first = next(iter(tensors.values()))
    problem = checks.storage_problem(*tensors.values())
    if problem:
        return problem
    if num_frames > kernels.MAX_FRAMES:
        return f"num_frames={num_frames} exceeds {kernels.MAX_FRAMES}"
    head_dim = first.shape[-1] // heads
    if head_dim > kernels.MAX_HEAD_DIM:
        return f"head dim {head_dim} exceeds {kernels.MAX_HEAD_DIM}"
    return next(filter(None, (checks.channel_stride_problem(t, name) for name, t in tensors.items())), None)


def _forward_problem(q, k, v, num_frames, heads, layout, scale):
    return _kernel_problem(dict(q=q, k=k, v=v), num_frames, heads)


def _lse_problem(q, lse, num_frames, heads, layout):
    expected = (_num_sequences(q, num_frames, layout), heads, num_frames)
    if lse.dtype != torch.float32 or lse.shape != expected or not lse.is_contiguous() or lse.device != q.device:
        return f"lse must be a contiguous float32 tensor of shape {expected} on {q.device}"
    return None


def _backward_problem(grad_out, q, k, v, lse, num_frames, heads, layout, scale):
    return _lse_problem(q, lse, num_frames, heads, layout) or _kernel_problem(
        dict(grad_out=grad_out, q=q, k=k, v=v), num_frames, heads
    )


# ---- CUDA backend (csrc/temporal_attention.cu): what its kernels cannot take -------------------

CUDA_MAX_FRAMES = 32
CUDA_HEAD_DIM = 64


def _cuda_problem(tensors: dict[str, Tensor], num_frames: int, heads: int) -> Optional[str]:
    """Why the CUDA kernels cannot take these tensors (all of one layout and shape), or None."""
    first = next(iter(tensors.values()))
    if not all(t.is_cuda for t in tensors.values()):
        return "CUDA kernels need CUDA tensors"
    problem = checks.storage_problem(*tensors.values())
    if problem:
        return problem
    if num_frames > CUDA_MAX_FRAMES:
        return f"num_frames={num_frames} exceeds {CUDA_MAX_FRAMES}"
    head_dim = first.shape[-1] // heads
    if head_dim != CUDA_HEAD_DIM:
        return f"head dim {head_dim} (the CUDA kernels take {CUDA_HEAD_DIM})"
    vector = 16 // first.element_size()
    for name, t in tensors.items():
        # 16-byte vector loads: unit channel stride, rows starting on 16-byte boundaries.
        if t.stride(-1) != 1:
            return f"{name} has channel stride {t.stride(-1)} (kernels need 1)"
        if t.data_ptr() % 16:
            return f"{name} does not start on a 16-byte boundary"
        for dim in (0, 1):
            if t.shape[dim] > 1 and t.stride(dim) % vector:
                return f"{name} has stride {t.stride(dim)} in dimension {dim} (CUDA kernels need multiples of 16 bytes)"
    return None


def _cuda_forward_problem(q, k, v, num_frames, heads, layout, scale):
    return _cuda_problem(dict(q=q, k=k, v=v), num_frames, heads)


def _cuda_backward_problem(grad_out, q, k, v, lse, num_frames, heads, layout, scale):
    return _lse_problem(q, lse, num_frames, heads, layout) or _cuda_problem(
        dict(grad_out=grad_out, q=q, k=k, v=v), num_frames, heads
    )


def _cuda_forward(q, k, v, num_frames, heads, layout, scale):
    return tuple(_cuda_ext.ops().temporal_attention_fwd(q, k, v, num_frames, heads, layout, scale))


def _cuda_backward(grad_out, q, k, v, lse, num_frames, heads, layout, scale):
    return tuple(_cuda_ext.ops().temporal_attention_bwd(grad_out, q, k, v, lse, num_frames, heads, layout, scale))


dispatch.register("temporal_attention", "reference")(_reference_forward)
dispatch.register("temporal_attention", "triton", _forward_problem)(lambda *a: _triton().temporal_attention(*a))
dispatch.register("temporal_attention_backward", "reference")(_reference_backward)
dispatch.register("temporal_attention_backward", "triton", _backward_problem)(
    lambda *a: _triton().temporal_attention_backward(*a)
)
dispatch.register("temporal_attention", "cuda", _cuda_forward_problem)(_cuda_forward)
dispatch.register("temporal_attention_backward", "cuda", _cuda_backward_problem)(_cuda_backward)


def _packed(backward: Callable) -> Callable:
    """The packed backward (grad_out, qkv, lse, ...) -> grad_qkv of a backend's three-gradient one."""

    def packed(grad_out, qkv, lse, num_frames, heads, layout, scale):
        return torch.cat(backward(grad_out, *qkv.chunk(3, dim=-1), lse, num_frames, heads, layout, scale), dim=-1)

    return packed


def _triton_backward_packed(grad_out, qkv, lse, num_frames, heads, layout, scale):
    kernels = _triton()
    grad_qkv = kernels.new_output(qkv.shape, qkv.dtype, qkv.device)
    kernels.temporal_attention_backward(
        grad_out, *qkv.chunk(3, dim=-1), lse, num_frames, heads, layout, scale, grads=grad_qkv.chunk(3, dim=-1)
    )
    return grad_qkv


def _packed_problem(problem: Callable) -> Callable:
    def packed_problem(grad_out, qkv, lse, num_frames, heads, layout, scale):
        return problem(grad_out, *qkv.chunk(3, dim=-1), lse, num_frames, heads, layout, scale)

    return packed_problem


dispatch.register("temporal_attention_backward_packed", "reference")(_packed(_reference_backward))
dispatch.register("temporal_attention_backward_packed", "triton", _packed_problem(_backward_problem))(
    _triton_backward_packed
)
dispatch.register("temporal_attention_backward_packed", "cuda", _packed_problem(_cuda_backward_problem))(
    _packed(_cuda_backward)
)


# ---- custom ops --------------------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::temporal_attention")
def _temporal_attention(
    q: Tensor, k: Tensor, v: Tensor, num_frames: int, heads: int, layout: str, scale: float
) -> tuple[Tensor, Tensor]:
    return dispatch.run("temporal_attention", q.device, q, k, v, num_frames, heads, layout, scale)


@_temporal_attention.register_fake
def _(q, k, v, num_frames, heads, layout, scale):
    lse_shape = (_num_sequences(q, num_frames, layout), heads, num_frames)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@dispatch.custom_op("turbo_kernels::temporal_attention_backward")
def _temporal_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, num_frames: int, heads: int, layout: str,
    scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.run(
        "temporal_attention_backward", q.device, grad_out, q, k, v, lse, num_frames, heads, layout, scale,
        requested=backend,
    )


@_temporal_attention_backward.register_fake
def _(grad_out, q, k, v, lse, num_frames, heads, layout, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, num_frames, heads, layout, scale = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, lse)
    ctx.mark_non_differentiable(lse)
    ctx.attention = (num_frames, heads, layout, scale)
    ctx.backend = dispatch.requested_backend()


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, lse = ctx.saved_tensors
    # Autograd may hand in an expanded grad (e.g. from .sum()); the kernels need unit channel stride.
    if grad_out.shape[-1] > 1 and grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_q, grad_k, grad_v = _temporal_attention_backward(grad_out, q, k, v, lse, *ctx.attention, ctx.backend)
    return grad_q, grad_k, grad_v, None, None, None, None


_temporal_attention.register_autograd(_backward, setup_context=_setup)


def temporal_attention(
    q: Tensor, k: Tensor, v: Tensor, num_frames: int, heads: int, layout: str = "frames", scale: Optional[float] = None
) -> Tensor:
    """softmax(scale q k^T) v over the F frames of every sequence and head (SPEC 1: the UNet's
    temporal self-attention, no mask, no positions), returned in q's layout and dtype.

    layout "frames": q, k, v are (B*F, N, heads*d), the main stream's tokens (row b*F + f,
    position n); "sequences": (B*N, F, heads*d). The sequence of position n of video b is
    s = b*N + n in both. Any strides are taken without copies as long as the channel dimension
    is unit-stride (e.g. q, k, v sliced from one fused qkv projection). scale defaults to
    1/sqrt(d). Differentiable in q, k and v.
    """
    head_dim = checks.attention_inputs(q, k, v, num_frames, heads, layout, ref.LAYOUTS)
    scale = ref.default_scale(head_dim, None if scale is None else checks.positive_float(scale, "scale"))
    out, _ = _temporal_attention(q, k, v, num_frames, heads, layout, scale)
    return out


# ---- packed q, k, v ----------------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::temporal_attention_packed")
def _temporal_attention_packed(
    qkv: Tensor, num_frames: int, heads: int, layout: str, scale: float
) -> tuple[Tensor, Tensor]:
    return dispatch.run("temporal_attention", qkv.device, *qkv.chunk(3, dim=-1), num_frames, heads, layout, scale)


@_temporal_attention_packed.register_fake
def _(qkv, num_frames, heads, layout, scale):
    lse_shape = (_num_sequences(qkv, num_frames, layout), heads, num_frames)
    return qkv.new_empty((*qkv.shape[:-1], qkv.shape[-1] // 3)), qkv.new_empty(lse_shape, dtype=torch.float32)


@dispatch.custom_op("turbo_kernels::temporal_attention_backward_packed")
def _temporal_attention_backward_packed(
    grad_out: Tensor, qkv: Tensor, lse: Tensor, num_frames: int, heads: int, layout: str, scale: float, backend: str
) -> Tensor:
    return dispatch.run(
        "temporal_attention_backward_packed", qkv.device, grad_out, qkv, lse, num_frames, heads, layout, scale,
        requested=backend,
    )


@_temporal_attention_backward_packed.register_fake
def _(grad_out, qkv, lse, num_frames, heads, layout, scale, backend):
    return qkv.new_empty(qkv.shape)


def _packed_setup(ctx, inputs, output):
    qkv, num_frames, heads, layout, scale = inputs
    _, lse = output
    ctx.save_for_backward(qkv, lse)
    ctx.mark_non_differentiable(lse)
    ctx.attention = (num_frames, heads, layout, scale)
    ctx.backend = dispatch.requested_backend()


def _packed_backward(ctx, grad_out, _grad_lse):
    qkv, lse = ctx.saved_tensors
    if grad_out.shape[-1] > 1 and grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    return _temporal_attention_backward_packed(grad_out, qkv, lse, *ctx.attention, ctx.backend), None, None, None, None


_temporal_attention_packed.register_autograd(_packed_backward, setup_context=_packed_setup)


def temporal_attention_packed(
    qkv: Tensor, num_frames: int, heads: int, layout: str = "frames", scale: Optional[float] = None
) -> Tensor:
    """temporal_attention of q, k, v = qkv.chunk(3, dim=-1): the same output, with the gradient of
    qkv (..., 3C) made as one tensor rather than concatenated from three."""
    checks.floating_tensor(qkv, "qkv")
    if qkv.dim() != 3:
        raise ValueError(
            f"qkv must have 3 dimensions ((B*F, N, 3*heads*d) or (B*N, F, 3*heads*d)), got shape {tuple(qkv.shape)}"
        )
    if qkv.shape[-1] % 3:
        raise ValueError(f"qkv's last dimension must hold q, k and v, a multiple of 3, got {qkv.shape[-1]}")
    q, k, v = qkv.chunk(3, dim=-1)
    head_dim = checks.attention_inputs(q, k, v, num_frames, heads, layout, ref.LAYOUTS)
    scale = ref.default_scale(head_dim, None if scale is None else checks.positive_float(scale, "scale"))
    out, _ = _temporal_attention_packed(qkv, num_frames, heads, layout, scale)
    return out
