"""Public GEGLU activation of the transformer feed-forward (SPEC 1), registered as torch.library
custom ops: out = value * gelu(gate), value and gate the first and second halves of h's last
dimension, exact (erf) GELU.

The eager composition `value * F.gelu(gate)` writes gelu(gate), then the product; its backward
writes three hidden-wide tensors and concatenates the two halves of the gradient. Here the forward
reads h once and writes out, and `turbo_kernels::geglu_backward` reads h and the output's gradient
once and writes both halves of h's gradient. Inside each op, `dispatch.run` picks triton |
reference for the actual tensors.
"""

from __future__ import annotations

from torch import Tensor

from turbo_kernels import checks, dispatch
from turbo_kernels.reference import temporal_block as ref


def _triton():
    from turbo_kernels.triton_kernels import geglu

    return geglu


def _forward_problem(h):
    return checks.storage_problem(h) or checks.rows_problem(h, "h")


def _backward_problem(grad_out, h):
    return checks.storage_problem(grad_out, h) or checks.rows_problem(h, "h")


dispatch.register("geglu", "reference")(ref.geglu)
dispatch.register("geglu", "triton", _forward_problem)(lambda *a: _triton().geglu(*a))
dispatch.register("geglu_backward", "reference")(ref.geglu_backward)
dispatch.register("geglu_backward", "triton", _backward_problem)(lambda *a: _triton().geglu_backward(*a))


@dispatch.custom_op("turbo_kernels::geglu")
def _geglu(h: Tensor) -> Tensor:
    return dispatch.run("geglu", h.device, h)


@_geglu.register_fake
def _(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@dispatch.custom_op("turbo_kernels::geglu_backward")
def _geglu_backward(grad_out: Tensor, h: Tensor, backend: str) -> Tensor:
    return dispatch.run("geglu_backward", h.device, grad_out, h, requested=backend)


@_geglu_backward.register_fake
def _(grad_out, h, backend):
    return h.new_empty(h.shape)


def _setup(ctx, inputs, output):
    (h,) = inputs
    ctx.save_for_backward(h)
    ctx.backend = dispatch.requested_backend()


def _backward(ctx, grad_out):
    (h,) = ctx.saved_tensors
    return _geglu_backward(grad_out, h, ctx.backend)


_geglu.register_autograd(_backward, setup_context=_setup)


def geglu(h: Tensor) -> Tensor:
    """value * gelu(gate) for h (..., 2 x hidden): value = h[..., :hidden], gate = h[..., hidden:],
    exact (erf) GELU, maths in float32 (float64 for float64 h) with one rounding to h's dtype.
    Returns (..., hidden) in h's dtype, contiguous; differentiable in h (first order: the backward op
    has no gradient of its own). Any view with unit channel stride whose leading dimensions flatten
    is read without a copy."""
    checks.floating_tensor(h, "h")
    if h.shape[-1] % 2:
        raise ValueError(f"h's last dimension must be even (value and gate halves), got {h.shape[-1]}")
    return _geglu(h)
