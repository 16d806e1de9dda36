"""Plain PyTorch definitions of the guided-solver family (SPEC sections 3 and 6).

These functions are the meaning of the ops: the Triton and CUDA kernels are tested against them.
Symbols follow SPEC: abar = cumulative alpha product, alpha = sqrt(abar), sigma = sqrt(1 - abar).
Every per-sample scalar is a (B,) tensor; big tensors are batch-first with any trailing shape.
Maths runs in float32 (float64 when the inputs are float64) and results take the storage dtype of
the first big input.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts over one sample of `like`."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


def alpha_sigma(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    abar = _per_sample(alphas_cumprod[t.long()].to(_compute_dtype(like)), like)
    return abar.sqrt(), (1 - abar).sqrt()


def motion_guidance_g(alpha: Tensor, sigma: Tensor, release_form: bool) -> Tensor:
    """g(t) of SPEC 3.4: the release uses sqrt(1 - alpha_t) with alpha_t = sqrt(abar_t);
    the classic form is sqrt(1 - abar_t) = sigma_t."""
    return (1 - alpha).sqrt() if release_form else sigma


def lcm_boundary_scalings(
    t: Tensor, like: Tensor, timestep_scaling: float, sigma_data: float
) -> tuple[Tensor, Tensor]:
    """c_skip(t), c_out(t) of SPEC 3.3 with s = timestep_scaling * t."""
    s = _per_sample(t.to(_compute_dtype(like)) * timestep_scaling, like)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def guided_solver_step(
    z_t: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor,
    score: Tensor | None,
    t_hi: Tensor,
    t_lo: Tensor,
    w: Tensor,
    motion_scale: Tensor,
    alphas_cumprod: Tensor,
    release_form: bool = True,
) -> tuple[Tensor, Tensor]:
    """Teacher DDIM step (eta 0) from t_hi to t_lo with LCM-form CFG and motion guidance.

    x0 = x0_c + w (x0_c - x0_u);  eps_hat = eps_c + w (eps_c - eps_u) - m g(t_hi) score;
    z_lo = alpha_lo x0 + sigma_lo eps_hat.  Returns (z_lo, x0).
    """
    cdt = _compute_dtype(z_t)
    z_t_, eps_c, eps_u = z_t.to(cdt), eps_cond.to(cdt), eps_uncond.to(cdt)
    alpha_hi, sigma_hi = alpha_sigma(alphas_cumprod, t_hi, z_t)
    alpha_lo, sigma_lo = alpha_sigma(alphas_cumprod, t_lo, z_t)
    w_ = _per_sample(w.to(cdt), z_t)

    x0_c = (z_t_ - sigma_hi * eps_c) / alpha_hi
    x0_u = (z_t_ - sigma_hi * eps_u) / alpha_hi
    x0 = x0_c + w_ * (x0_c - x0_u)
    eps_hat = eps_c + w_ * (eps_c - eps_u)
    if score is not None:
        m = _per_sample(motion_scale.to(cdt), z_t)
        eps_hat = eps_hat - m * motion_guidance_g(alpha_hi, sigma_hi, release_form) * score.to(cdt)
    z_lo = alpha_lo * x0 + sigma_lo * eps_hat
    return z_lo.to(z_t.dtype), x0.to(z_t.dtype)


def guided_solver_step_backward(
    grad_z_lo: Tensor,
    grad_x0: Tensor,
    t_hi: Tensor,
    t_lo: Tensor,
    w: Tensor,
    motion_scale: Tensor,
    alphas_cumprod: Tensor,
    release_form: bool,
    has_score: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Adjoint of the (linear) solver step: returns grads for (z_t, eps_cond, eps_uncond, score).

    With G = grad_x0 + alpha_lo grad_z_lo (everything that reaches x0) and
    E = sigma_lo grad_z_lo - (sigma_hi / alpha_hi) G (everything that reaches the guided eps):
    d z_t = G / alpha_hi, d eps_c = (1 + w) E, d eps_u = -w E, d score = -m g sigma_lo grad_z_lo.
    The score gradient is empty when the step had no score.
    """
    cdt = _compute_dtype(grad_z_lo)
    gz, gx = grad_z_lo.to(cdt), grad_x0.to(cdt)
    alpha_hi, sigma_hi = alpha_sigma(alphas_cumprod, t_hi, gz)
    alpha_lo, sigma_lo = alpha_sigma(alphas_cumprod, t_lo, gz)
    w_ = _per_sample(w.to(cdt), gz)

    G = gx + alpha_lo * gz
    E = sigma_lo * gz - (sigma_hi / alpha_hi) * G
    out_dtype = grad_z_lo.dtype
    grad_z_t = (G / alpha_hi).to(out_dtype)
    grad_eps_cond = ((1 + w_) * E).to(out_dtype)
    grad_eps_uncond = (-w_ * E).to(out_dtype)
    if has_score:
        m = _per_sample(motion_scale.to(cdt), gz)
        g = motion_guidance_g(alpha_hi, sigma_hi, release_form)
        grad_score = (-m * g * sigma_lo * gz).to(out_dtype)
    else:
        grad_score = grad_z_lo.new_empty(0)
    return grad_z_t, grad_eps_cond, grad_eps_uncond, grad_score


def consistency_output(
    sample: Tensor,
    eps: Tensor,
    t: Tensor,
    alphas_cumprod: Tensor,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> Tensor:
    """LCM boundary-condition output: c_skip(t) sample + c_out(t) x0, x0 = (sample - sigma_t eps)/alpha_t."""
    cdt = _compute_dtype(sample)
    alpha, sigma = alpha_sigma(alphas_cumprod, t, sample)
    c_skip, c_out = lcm_boundary_scalings(t, sample, timestep_scaling, sigma_data)
    x0 = (sample.to(cdt) - sigma * eps.to(cdt)) / alpha
    return (c_skip * sample.to(cdt) + c_out * x0).to(sample.dtype)


def consistency_output_backward(
    grad_out: Tensor,
    t: Tensor,
    alphas_cumprod: Tensor,
    timestep_scaling: float,
    sigma_data: float,
) -> tuple[Tensor, Tensor]:
    """Adjoint: d sample = (c_skip + c_out / alpha) g, d eps = -(c_out sigma / alpha) g."""
    cdt = _compute_dtype(grad_out)
    g = grad_out.to(cdt)
    alpha, sigma = alpha_sigma(alphas_cumprod, t, g)
    c_skip, c_out = lcm_boundary_scalings(t, g, timestep_scaling, sigma_data)
    grad_sample = (c_skip + c_out / alpha) * g
    grad_eps = -(c_out * sigma / alpha) * g
    return grad_sample.to(grad_out.dtype), grad_eps.to(grad_out.dtype)


def consistency_sampler_step(
    sample: Tensor,
    eps: Tensor,
    noise: Tensor,
    t: Tensor,
    t_prev: Tensor,
    alphas_cumprod: Tensor,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """One multistep consistency sampling step (SPEC 6): the boundary-condition output `denoised`
    at t, and the next sample alpha_prev denoised + sigma_prev noise at t_prev."""
    cdt = _compute_dtype(sample)
    denoised = consistency_output(sample.to(cdt), eps, t, alphas_cumprod, timestep_scaling, sigma_data)
    alpha_prev, sigma_prev = alpha_sigma(alphas_cumprod, t_prev, sample)
    next_sample = alpha_prev * denoised + sigma_prev * noise.to(cdt)
    return denoised.to(sample.dtype), next_sample.to(sample.dtype)


def consistency_sampler_step_backward(
    grad_denoised: Tensor,
    grad_next: Tensor,
    t: Tensor,
    t_prev: Tensor,
    alphas_cumprod: Tensor,
    timestep_scaling: float,
    sigma_data: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adjoint: everything reaching `denoised` is grad_denoised + alpha_prev grad_next; then as
    consistency_output; d noise = sigma_prev grad_next. Returns grads for (sample, eps, noise)."""
    cdt = _compute_dtype(grad_denoised)
    gd, gn = grad_denoised.to(cdt), grad_next.to(cdt)
    alpha_prev, sigma_prev = alpha_sigma(alphas_cumprod, t_prev, gd)
    grad_sample, grad_eps = consistency_output_backward(
        gd + alpha_prev * gn, t, alphas_cumprod, timestep_scaling, sigma_data
    )
    out_dtype = grad_denoised.dtype
    return grad_sample.to(out_dtype), grad_eps.to(out_dtype), (sigma_prev * gn).to(out_dtype)


def pseudo_huber_loss(pred: Tensor, target: Tensor, c: float = 1e-3) -> Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c), a float32 (float64 for float64 inputs) scalar."""
    cdt = _compute_dtype(pred)
    d = pred.to(cdt) - target.to(cdt)
    # The same value as sqrt(d² + c²) - c without its cancellation: that form loses all digits once
    # |d| << c (5% of the loss at |d| = 1e-6 in float32), the regime of a converged student.
    squared = d * d
    return (squared / (torch.sqrt(squared + c * c) + c)).mean()


def pseudo_huber_loss_backward(grad: Tensor, pred: Tensor, target: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """d/d pred = grad (pred - target) / (N sqrt((pred - target)^2 + c^2)); d/d target = -that."""
    cdt = _compute_dtype(pred)
    d = pred.to(cdt) - target.to(cdt)
    g = grad.to(cdt) * d / (torch.sqrt(d * d + c * c) * d.numel())
    # Each gradient takes the layout of its input, as the op's fake implementation promises.
    return torch.empty_like(pred).copy_(g), torch.empty_like(target).copy_(-g)
