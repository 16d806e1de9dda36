"""Public ops of the guided-solver family, registered as torch.library custom ops.

Each op is one custom op (with a fake implementation and an autograd formula that calls a second
custom op for the backward), so torch.compile sees a single opaque node and CUDA graphs can
capture it. Inside, `dispatch.run` picks cuda | triton | reference for the actual tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from turbo_kernels import _cuda_ext, checks, dispatch
from turbo_kernels.reference import solver as ref

MOTION_FORMS = ("release", "classic")
# pseudo_huber_loss's smallest c: its square, 1e-36, is still a normal float32 (from 1.2e-38).
MIN_HUBER_C = 1e-18


# ---- implementations: reference, Triton, CUDA ------------------------------------------------


def _triton():
    from turbo_kernels.triton_kernels import solver

    return solver


def _register_all(op: str, streamed, cuda_fn=None, batched: bool = True) -> None:
    """Register the backends of `op`; `streamed(*args)` names the tensors its kernels stream."""

    def problem(*args):
        big = [a for a in streamed(*args) if a is not None and a.numel() > 0]
        return checks.kernel_layout_problem(*big, batched=batched) if big else None

    def cuda_problem(*args):
        big = [a for a in streamed(*args) if a is not None and a.numel() > 0]
        return (checks.kernel_layout_problem(*big) or checks.exact_layout_problem(*big)) if big else None

    dispatch.register(op, "reference")(getattr(ref, op))
    dispatch.register(op, "triton", problem)(lambda *args: getattr(_triton(), op)(*args))
    if cuda_fn is not None:
        dispatch.register(op, "cuda", cuda_problem)(cuda_fn)


def _cuda_guided_fwd(z_t, eps_cond, eps_uncond, score, t_hi, t_lo, w, motion_scale, acp, release_form):
    return tuple(
        _cuda_ext.ops().guided_solver_step_fwd(
            z_t, eps_cond, eps_uncond, score, t_hi, t_lo, w, motion_scale, acp.float(), release_form
        )
    )


def _cuda_guided_bwd(grad_z_lo, grad_x0, t_hi, t_lo, w, motion_scale, acp, release_form, has_score):
    return tuple(
        _cuda_ext.ops().guided_solver_step_bwd(
            grad_z_lo, grad_x0, t_hi, t_lo, w, motion_scale, acp.float(), release_form, has_score
        )
    )


def _cuda_consistency_fwd(sample, eps, t, acp, timestep_scaling, sigma_data):
    return _cuda_ext.ops().consistency_output_fwd(sample, eps, t, acp.float(), timestep_scaling, sigma_data)


def _cuda_consistency_bwd(grad_out, t, acp, timestep_scaling, sigma_data):
    return tuple(_cuda_ext.ops().consistency_output_bwd(grad_out, t, acp.float(), timestep_scaling, sigma_data))


_register_all("guided_solver_step", lambda *a: a[:4], _cuda_guided_fwd)
_register_all("guided_solver_step_backward", lambda *a: a[:2], _cuda_guided_bwd)
_register_all("consistency_output", lambda *a: a[:2], _cuda_consistency_fwd)
_register_all("consistency_output_backward", lambda *a: a[:1], _cuda_consistency_bwd)
_register_all("consistency_sampler_step", lambda *a: a[:3])
_register_all("consistency_sampler_step_backward", lambda *a: a[:2])
_register_all("pseudo_huber_loss", lambda *a: a[:2], batched=False)
# The incoming grad is a 0-d scalar; only pred and target are streamed.
_register_all("pseudo_huber_loss_backward", lambda *a: a[1:3], batched=False)


def _dense_grads(*grads: Tensor) -> tuple[Tensor, ...]:
    # Autograd hands in expanded or strided grads (e.g. from .sum()); one copy beats a reference run.
    if checks.kernel_layout_problem(*grads) is None:
        return grads
    return tuple(g.contiguous() for g in grads)


def _zeros_if_none(grad: Optional[Tensor], like: tuple) -> Tensor:
    shape, dtype, device = like
    return torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad


# ---- guided_solver_step ------------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::guided_solver_step")
def _guided_solver_step(
    z_t: Tensor, eps_cond: Tensor, eps_uncond: Tensor, score: Optional[Tensor], t_hi: Tensor, t_lo: Tensor,
    w: Tensor, motion_scale: Tensor, alphas_cumprod: Tensor, release_form: bool,
) -> tuple[Tensor, Tensor]:
    return dispatch.run(
        "guided_solver_step", z_t.device,
        z_t, eps_cond, eps_uncond, score, t_hi, t_lo, w, motion_scale, alphas_cumprod, release_form,
    )


@_guided_solver_step.register_fake
def _(z_t, eps_cond, eps_uncond, score, t_hi, t_lo, w, motion_scale, alphas_cumprod, release_form):
    return torch.empty_like(z_t), torch.empty_like(z_t)


@dispatch.custom_op("turbo_kernels::guided_solver_step_backward")
def _guided_solver_step_backward(
    grad_z_lo: Tensor, grad_x0: Tensor, t_hi: Tensor, t_lo: Tensor, w: Tensor, motion_scale: Tensor,
    alphas_cumprod: Tensor, release_form: bool, has_score: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dispatch.run(
        "guided_solver_step_backward", grad_z_lo.device,
        grad_z_lo, grad_x0, t_hi, t_lo, w, motion_scale, alphas_cumprod, release_form, has_score,
        requested=backend,
    )


@_guided_solver_step_backward.register_fake
def _(grad_z_lo, grad_x0, t_hi, t_lo, w, motion_scale, alphas_cumprod, release_form, has_score, backend):
    grad_score = torch.empty_like(grad_z_lo) if has_score else grad_z_lo.new_empty(0)
    return torch.empty_like(grad_z_lo), torch.empty_like(grad_z_lo), torch.empty_like(grad_z_lo), grad_score


def _guided_setup(ctx, inputs, output):
    z_t, _, _, score, t_hi, t_lo, w, motion_scale, alphas_cumprod, release_form = inputs
    ctx.save_for_backward(t_hi, t_lo, w, motion_scale, alphas_cumprod)
    ctx.release_form = release_form
    ctx.has_score = score is not None
    ctx.backend = dispatch.requested_backend()
    ctx.like = (z_t.shape, z_t.dtype, z_t.device)


def _guided_backward(ctx, grad_z_lo, grad_x0):
    t_hi, t_lo, w, motion_scale, alphas_cumprod = ctx.saved_tensors
    like = ctx.like
    grad_z_lo, grad_x0 = _dense_grads(_zeros_if_none(grad_z_lo, like), _zeros_if_none(grad_x0, like))
    g_z_t, g_eps_c, g_eps_u, g_score = _guided_solver_step_backward(
        grad_z_lo, grad_x0, t_hi, t_lo, w, motion_scale, alphas_cumprod, ctx.release_form, ctx.has_score,
        ctx.backend,
    )
    return g_z_t, g_eps_c, g_eps_u, (g_score if ctx.has_score else None), None, None, None, None, None, None


_guided_solver_step.register_autograd(_guided_backward, setup_context=_guided_setup)


def guided_solver_step(
    z_t: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor,
    t_hi,
    t_lo,
    w,
    alphas_cumprod: Tensor,
    score: Optional[Tensor] = None,
    motion_scale=None,
    motion_form: str = "release",
) -> tuple[Tensor, Tensor]:
    """The teacher's DDIM step from t_hi to t_lo with LCM-form CFG and motion guidance (SPEC 3.4).

    x0 = x0_c + w (x0_c - x0_u),  eps_hat = eps_c + w (eps_c - eps_u) - m g(t_hi) score,
    z_lo = alpha_lo x0 + sigma_lo eps_hat.  Returns (z_lo, x0), each like z_t.

    z_t, eps_cond, eps_uncond, score: batch-first tensors of one shape, e.g. latents (B, C, F, H, W).
    t_hi, t_lo: int timesteps, scalar or (B,). w, motion_scale: floats, scalar or (B,).
    motion_form: "release" (g = sqrt(1 - sqrt(abar)), the public release) or "classic"
    (g = sqrt(1 - abar)). score and motion_scale go together.
    Differentiable in z_t, eps_cond, eps_uncond and score.
    """
    checks.floating_tensor(z_t, "z_t")
    checks.same_as(eps_cond, "eps_cond", z_t, "z_t")
    checks.same_as(eps_uncond, "eps_uncond", z_t, "z_t")
    if (score is None) != (motion_scale is None):
        raise ValueError("score and motion_scale go together: pass both for motion guidance, or neither")
    if score is not None:
        checks.same_as(score, "score", z_t, "z_t")
    if motion_form not in MOTION_FORMS:
        raise ValueError(f"motion_form must be one of {MOTION_FORMS}, got {motion_form!r}")
    batch, device = z_t.shape[0], z_t.device
    acp = checks.schedule_table(alphas_cumprod, device)
    return _guided_solver_step(
        z_t, eps_cond, eps_uncond, score,
        checks.timesteps(t_hi, "t_hi", batch, device, acp.numel()),
        checks.timesteps(t_lo, "t_lo", batch, device, acp.numel()),
        checks.per_sample_scalar(w, "w", batch, device),
        checks.per_sample_scalar(motion_scale, "motion_scale", batch, device, default=0.0),
        acp, motion_form == "release",
    )


# ---- consistency_output ------------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::consistency_output")
def _consistency_output(
    sample: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor, timestep_scaling: float, sigma_data: float
) -> Tensor:
    return dispatch.run(
        "consistency_output", sample.device, sample, eps, t, alphas_cumprod, timestep_scaling, sigma_data
    )


@_consistency_output.register_fake
def _(sample, eps, t, alphas_cumprod, timestep_scaling, sigma_data):
    return torch.empty_like(sample)


@dispatch.custom_op("turbo_kernels::consistency_output_backward")
def _consistency_output_backward(
    grad_out: Tensor, t: Tensor, alphas_cumprod: Tensor, timestep_scaling: float, sigma_data: float, backend: str
) -> tuple[Tensor, Tensor]:
    return dispatch.run(
        "consistency_output_backward", grad_out.device, grad_out, t, alphas_cumprod, timestep_scaling, sigma_data,
        requested=backend,
    )


@_consistency_output_backward.register_fake
def _(grad_out, t, alphas_cumprod, timestep_scaling, sigma_data, backend):
    return torch.empty_like(grad_out), torch.empty_like(grad_out)


def _consistency_setup(ctx, inputs, output):
    _, _, t, alphas_cumprod, timestep_scaling, sigma_data = inputs
    ctx.save_for_backward(t, alphas_cumprod)
    ctx.scalings = (timestep_scaling, sigma_data)
    ctx.backend = dispatch.requested_backend()


def _consistency_backward(ctx, grad_out):
    t, alphas_cumprod = ctx.saved_tensors
    (grad_out,) = _dense_grads(grad_out)
    g_sample, g_eps = _consistency_output_backward(grad_out, t, alphas_cumprod, *ctx.scalings, ctx.backend)
    return g_sample, g_eps, None, None, None, None


_consistency_output.register_autograd(_consistency_backward, setup_context=_consistency_setup)


def consistency_output(
    sample: Tensor,
    eps: Tensor,
    t,
    alphas_cumprod: Tensor,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> Tensor:
    """The consistency model's boundary-condition output c_skip(t) sample + c_out(t) x0(eps)
    (SPEC 3.3: s = timestep_scaling t, c_skip = sigma_data^2 / (s^2 + sigma_data^2),
    c_out = s / sqrt(s^2 + sigma_data^2), x0 = (sample - sigma_t eps) / alpha_t).
    Differentiable in sample and eps."""
    checks.floating_tensor(sample, "sample")
    checks.same_as(eps, "eps", sample, "sample")
    batch, device = sample.shape[0], sample.device
    acp = checks.schedule_table(alphas_cumprod, device)
    return _consistency_output(
        sample, eps, checks.timesteps(t, "t", batch, device, acp.numel()), acp,
        checks.positive_float(timestep_scaling, "timestep_scaling"), checks.positive_float(sigma_data, "sigma_data"),
    )


# ---- consistency_sampler_step ------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::consistency_sampler_step")
def _consistency_sampler_step(
    sample: Tensor, eps: Tensor, noise: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor,
    timestep_scaling: float, sigma_data: float,
) -> tuple[Tensor, Tensor]:
    return dispatch.run(
        "consistency_sampler_step", sample.device,
        sample, eps, noise, t, t_prev, alphas_cumprod, timestep_scaling, sigma_data,
    )


@_consistency_sampler_step.register_fake
def _(sample, eps, noise, t, t_prev, alphas_cumprod, timestep_scaling, sigma_data):
    return torch.empty_like(sample), torch.empty_like(sample)


@dispatch.custom_op("turbo_kernels::consistency_sampler_step_backward")
def _consistency_sampler_step_backward(
    grad_denoised: Tensor, grad_next: Tensor, t: Tensor, t_prev: Tensor, alphas_cumprod: Tensor,
    timestep_scaling: float, sigma_data: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.run(
        "consistency_sampler_step_backward", grad_denoised.device,
        grad_denoised, grad_next, t, t_prev, alphas_cumprod, timestep_scaling, sigma_data,
        requested=backend,
    )


@_consistency_sampler_step_backward.register_fake
def _(grad_denoised, grad_next, t, t_prev, alphas_cumprod, timestep_scaling, sigma_data, backend):
    return tuple(torch.empty_like(grad_denoised) for _ in range(3))


def _sampler_setup(ctx, inputs, output):
    sample, _, _, t, t_prev, alphas_cumprod, timestep_scaling, sigma_data = inputs
    ctx.save_for_backward(t, t_prev, alphas_cumprod)
    ctx.scalings = (timestep_scaling, sigma_data)
    ctx.like = (sample.shape, sample.dtype, sample.device)
    ctx.backend = dispatch.requested_backend()


def _sampler_backward(ctx, grad_denoised, grad_next):
    t, t_prev, alphas_cumprod = ctx.saved_tensors
    like = ctx.like
    grad_denoised, grad_next = _dense_grads(_zeros_if_none(grad_denoised, like), _zeros_if_none(grad_next, like))
    g_sample, g_eps, g_noise = _consistency_sampler_step_backward(
        grad_denoised, grad_next, t, t_prev, alphas_cumprod, *ctx.scalings, ctx.backend
    )
    return g_sample, g_eps, g_noise, None, None, None, None, None


_consistency_sampler_step.register_autograd(_sampler_backward, setup_context=_sampler_setup)


def consistency_sampler_step(
    sample: Tensor,
    eps: Tensor,
    t,
    t_prev,
    alphas_cumprod: Tensor,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """One step of multistep consistency sampling (SPEC 6) in one pass: returns (denoised, next_sample)
    with denoised = consistency_output(sample, eps, t) and next_sample = alpha_{t_prev} denoised +
    sigma_{t_prev} noise. `noise` defaults to a fresh standard normal draw (from `generator`).
    The last step of a sampler only needs `denoised`. Differentiable in sample, eps and noise."""
    checks.floating_tensor(sample, "sample")
    checks.same_as(eps, "eps", sample, "sample")
    if noise is None:
        noise = torch.empty_like(sample).normal_(generator=generator)  # in sample's layout, so kernels can stream both
    checks.same_as(noise, "noise", sample, "sample")
    batch, device = sample.shape[0], sample.device
    acp = checks.schedule_table(alphas_cumprod, device)
    return _consistency_sampler_step(
        sample, eps, noise,
        checks.timesteps(t, "t", batch, device, acp.numel()),
        checks.timesteps(t_prev, "t_prev", batch, device, acp.numel()),
        acp, checks.positive_float(timestep_scaling, "timestep_scaling"), checks.positive_float(sigma_data, "sigma_data"),
    )


# ---- pseudo_huber_loss -------------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::pseudo_huber_loss")
def _pseudo_huber_loss(pred: Tensor, target: Tensor, c: float) -> Tensor:
    return dispatch.run("pseudo_huber_loss", pred.device, pred, target, c)


@_pseudo_huber_loss.register_fake
def _(pred, target, c):
    return pred.new_empty((), dtype=torch.float64 if pred.dtype == torch.float64 else torch.float32)


@dispatch.custom_op("turbo_kernels::pseudo_huber_loss_backward")
def _pseudo_huber_loss_backward(
    grad: Tensor, pred: Tensor, target: Tensor, c: float, backend: str
) -> tuple[Tensor, Tensor]:
    return dispatch.run("pseudo_huber_loss_backward", pred.device, grad, pred, target, c, requested=backend)


@_pseudo_huber_loss_backward.register_fake
def _(grad, pred, target, c, backend):
    return torch.empty_like(pred), torch.empty_like(target)


def _huber_setup(ctx, inputs, output):
    pred, target, c = inputs
    ctx.save_for_backward(pred, target)
    ctx.c = c
    ctx.backend = dispatch.requested_backend()


def _huber_backward(ctx, grad):
    pred, target = ctx.saved_tensors
    g_pred, g_target = _pseudo_huber_loss_backward(grad.contiguous(), pred, target, ctx.c, ctx.backend)
    return g_pred, g_target, None


_pseudo_huber_loss.register_autograd(_huber_backward, setup_context=_huber_setup)


def pseudo_huber_loss(pred: Tensor, target: Tensor, c: float = 1e-3) -> Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c) over all elements (SPEC 3.6), a float32 scalar
    (float64 for float64 inputs), fused forward and backward. Differentiable in pred and target."""
    checks.floating_tensor(pred, "pred", min_dim=0)
    checks.same_as(target, "target", pred, "pred")
    c = checks.positive_float(c, "c")
    if c < MIN_HUBER_C:
        # Below it c^2 is not a normal float32: the loss loses its quadratic core and the gradient
        # at pred == target is 0/0.
        raise ValueError(f"c must be at least {MIN_HUBER_C:g}, got {c!r}")
    return _pseudo_huber_loss(pred, target, c)
