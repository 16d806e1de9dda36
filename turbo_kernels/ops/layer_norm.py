"""Public LayerNorm over the last dimension with affine weight and bias (F.layer_norm's meaning),
registered as torch.library custom ops, as the temporal transformer's norm1/norm2/norm3 use it.

Forward: one read of x, one write. Backward (`turbo_kernels::layer_norm_backward`): one read of x
and of the output's gradient, one write of x's gradient, and float32 partial sums for the weight
and bias gradients; torch's own backward spends most of its time on those two sums when rows are
many and narrow (the temporal block's 40960 x 320 tokens). Inside each op, `dispatch.run` picks
triton | reference for the actual tensors.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from turbo_kernels import checks, dispatch
from turbo_kernels.reference import temporal_block as ref


def _triton():
    from turbo_kernels.triton_kernels import layer_norm

    return layer_norm


def _rows_problem(x: Tensor) -> Optional[str]:
    """Why the kernels cannot walk x as (rows, channels), or None."""
    problem = checks.rows_problem(x, "x")
    if problem or x.numel() == 0:
        return problem
    from turbo_kernels.triton_kernels.layer_norm import MAX_CHANNELS

    if x.shape[-1] > MAX_CHANNELS:
        return f"{x.shape[-1]} channels (kernels take up to {MAX_CHANNELS})"
    return None


def _parameter_problem(x: Tensor, *parameters: Tensor) -> Optional[str]:
    """The kernels take weight and bias (C,) and contiguous, on x's device, in any storage dtype
    (they read them in float32: fp32 master weights with 16-bit x under autocast)."""
    for parameter in parameters:
        if parameter.dtype not in checks.KERNEL_DTYPES:
            return f"parameters in {parameter.dtype} (kernels take float32, float16, bfloat16)"
        if tuple(parameter.shape) != (x.shape[-1],):
            return f"parameters must have shape ({x.shape[-1]},), got {tuple(parameter.shape)}"
        if not parameter.is_contiguous():
            return "parameters must be contiguous"
        if parameter.device != x.device:
            return "tensors on several devices"
    return None


def _forward_problem(x, weight, bias, eps):
    return checks.storage_problem(x) or _rows_problem(x) or _parameter_problem(x, weight, bias)


def _backward_problem(grad_out, x, weight, eps):
    if grad_out.shape != x.shape:
        return f"grad_out has shape {tuple(grad_out.shape)}, x {tuple(x.shape)}"
    return checks.storage_problem(grad_out, x) or _rows_problem(x) or _parameter_problem(x, weight)


dispatch.register("layer_norm", "reference")(ref.layer_norm)
dispatch.register("layer_norm", "triton", _forward_problem)(lambda *a: _triton().layer_norm(*a))
dispatch.register("layer_norm_backward", "reference")(ref.layer_norm_backward)
dispatch.register("layer_norm_backward", "triton", _backward_problem)(lambda *a: _triton().layer_norm_backward(*a))


@dispatch.custom_op("turbo_kernels::layer_norm")
def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return dispatch.run("layer_norm", x.device, x, weight, bias, eps)


@_layer_norm.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape)


@dispatch.custom_op("turbo_kernels::layer_norm_backward")
def _layer_norm_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.run("layer_norm_backward", x.device, grad_out, x, weight, eps, requested=backend)


@_layer_norm_backward.register_fake
def _(grad_out, x, weight, eps, backend):
    channels, dtype = x.shape[-1], ref.compute_dtype(x)
    return x.new_empty(x.shape), x.new_empty(channels, dtype=dtype), x.new_empty(channels, dtype=dtype)


def _setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps
    ctx.parameter_dtypes = (weight.dtype, bias.dtype)
    ctx.backend = dispatch.requested_backend()


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _layer_norm_backward(grad_out, x, weight, ctx.eps, ctx.backend)
    weight_dtype, bias_dtype = ctx.parameter_dtypes
    return grad_x, grad_weight.to(weight_dtype), grad_bias.to(bias_dtype), None


_layer_norm.register_autograd(_backward, setup_context=_setup)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """F.layer_norm(x, x.shape[-1:], weight, bias, eps): x normalised over its last dimension (C),
    then scaled by weight (C,) and shifted by bias (C,). Maths in float32 (float64 for float64 x)
    with one rounding to x's dtype; returns x's shape and dtype, contiguous; differentiable in x,
    weight and bias (first order: the backward op has no gradient of its own). weight and bias may
    have another dtype than x (autocast's float32 master weights with 16-bit x): they are read as
    they are and their gradients returned in their dtype. Any view of x with unit channel stride
    whose leading dimensions flatten is read without a copy."""
    checks.floating_tensor(x, "x")
    for name, parameter in (("weight", weight), ("bias", bias)):
        checks.floating_tensor(parameter, name)
        if tuple(parameter.shape) != (x.shape[-1],):
            raise ValueError(
                f"{name} must have shape ({x.shape[-1]},) (x's last dimension), got {tuple(parameter.shape)}"
            )
        if parameter.device != x.device:
            raise ValueError(f"{name} is on {parameter.device}, x on {x.device}")
    return _layer_norm(x, weight, bias, checks.positive_float(eps, "eps"))
