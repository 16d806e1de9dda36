"""Triton kernels of the guided-solver family.

All of them are memory-bound streams over batch-first tensors: grid axis 1 is the sample, axis 0
walks that sample's elements in blocks. Per-sample scalars (timesteps, w, m) are gathered inside
the kernel from (B,) tensors and the alphas_cumprod table, so one launch serves a batch with
different timesteps and no scalar ever round-trips through the host. Maths is fp32 whatever the
storage dtype.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from turbo_kernels.triton_kernels.fast_launch import jit
from turbo_kernels.triton_kernels.launch_config import cdiv, storage_configs

# 1024 elements over 4 warps is 8 per thread: two 16-byte vectors at fp32, one at fp16/bf16.
BLOCK = 1024
NUM_WARPS = 4
# The loss reduction writes one partial sum per block; 4096-element blocks keep that buffer small.
REDUCE_BLOCK = 4096
REDUCE_NUM_WARPS = 8


@jit
def _alpha_sigma(acp_ptr, t_ptr, b):
    abar = tl.load(acp_ptr + tl.load(t_ptr + b)).to(tl.float32)
    return tl.sqrt(abar), tl.sqrt(1.0 - abar)


@jit
def _boundary_scalings(t_ptr, b, timestep_scaling, sigma_data):
    s = tl.load(t_ptr + b).to(tl.float32) * timestep_scaling
    sd2 = sigma_data * sigma_data
    return sd2 / (s * s + sd2), s / tl.sqrt(s * s + sd2)


@jit
def _block_offsets(n_per_sample, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return b, b.to(tl.int64) * n_per_sample + offs, offs < n_per_sample


@jit
def guided_solver_fwd_kernel(
    z_ptr, eps_c_ptr, eps_u_ptr, score_ptr, z_lo_ptr, x0_ptr,
    t_hi_ptr, t_lo_ptr, w_ptr, m_ptr, acp_ptr, n_per_sample,
    HAS_SCORE: tl.constexpr, RELEASE_FORM: tl.constexpr, BLOCK: tl.constexpr,
):
    b, idx, mask = _block_offsets(n_per_sample, BLOCK)
    alpha_hi, sigma_hi = _alpha_sigma(acp_ptr, t_hi_ptr, b)
    alpha_lo, sigma_lo = _alpha_sigma(acp_ptr, t_lo_ptr, b)
    w = tl.load(w_ptr + b)

    z = tl.load(z_ptr + idx, mask=mask).to(tl.float32)
    eps_c = tl.load(eps_c_ptr + idx, mask=mask).to(tl.float32)
    eps_u = tl.load(eps_u_ptr + idx, mask=mask).to(tl.float32)
    eps_guided = eps_c + w * (eps_c - eps_u)
    x0 = (z - sigma_hi * eps_guided) / alpha_hi
    eps_hat = eps_guided
    if HAS_SCORE:
        if RELEASE_FORM:
            g = tl.sqrt(1.0 - alpha_hi)
        else:
            g = sigma_hi
        score = tl.load(score_ptr + idx, mask=mask).to(tl.float32)
        eps_hat = eps_hat - tl.load(m_ptr + b) * g * score
    z_lo = alpha_lo * x0 + sigma_lo * eps_hat
    tl.store(z_lo_ptr + idx, z_lo.to(z_lo_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + idx, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@jit
def guided_solver_bwd_kernel(
    gz_ptr, gx_ptr, gz_t_ptr, g_eps_c_ptr, g_eps_u_ptr, g_score_ptr,
    t_hi_ptr, t_lo_ptr, w_ptr, m_ptr, acp_ptr, n_per_sample,
    HAS_SCORE: tl.constexpr, RELEASE_FORM: tl.constexpr, BLOCK: tl.constexpr,
):
    b, idx, mask = _block_offsets(n_per_sample, BLOCK)
    alpha_hi, sigma_hi = _alpha_sigma(acp_ptr, t_hi_ptr, b)
    alpha_lo, sigma_lo = _alpha_sigma(acp_ptr, t_lo_ptr, b)
    w = tl.load(w_ptr + b)

    gz = tl.load(gz_ptr + idx, mask=mask).to(tl.float32)
    gx = tl.load(gx_ptr + idx, mask=mask).to(tl.float32)
    reaching_x0 = gx + alpha_lo * gz
    reaching_eps = sigma_lo * gz - (sigma_hi / alpha_hi) * reaching_x0
    dtype = gz_t_ptr.dtype.element_ty
    tl.store(gz_t_ptr + idx, (reaching_x0 / alpha_hi).to(dtype), mask=mask)
    tl.store(g_eps_c_ptr + idx, ((1.0 + w) * reaching_eps).to(dtype), mask=mask)
    tl.store(g_eps_u_ptr + idx, (-w * reaching_eps).to(dtype), mask=mask)
    if HAS_SCORE:
        if RELEASE_FORM:
            g = tl.sqrt(1.0 - alpha_hi)
        else:
            g = sigma_hi
        tl.store(g_score_ptr + idx, (-tl.load(m_ptr + b) * g * sigma_lo * gz).to(dtype), mask=mask)


@jit
def consistency_output_fwd_kernel(
    sample_ptr, eps_ptr, out_ptr, t_ptr, acp_ptr, n_per_sample, timestep_scaling, sigma_data,
    BLOCK: tl.constexpr,
):
    b, idx, mask = _block_offsets(n_per_sample, BLOCK)
    alpha, sigma = _alpha_sigma(acp_ptr, t_ptr, b)
    c_skip, c_out = _boundary_scalings(t_ptr, b, timestep_scaling, sigma_data)
    x = tl.load(sample_ptr + idx, mask=mask).to(tl.float32)
    eps = tl.load(eps_ptr + idx, mask=mask).to(tl.float32)
    out = c_skip * x + c_out * ((x - sigma * eps) / alpha)
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def consistency_output_bwd_kernel(
    g_ptr, g_sample_ptr, g_eps_ptr, t_ptr, acp_ptr, n_per_sample, timestep_scaling, sigma_data,
    BLOCK: tl.constexpr,
):
    b, idx, mask = _block_offsets(n_per_sample, BLOCK)
    alpha, sigma = _alpha_sigma(acp_ptr, t_ptr, b)
    c_skip, c_out = _boundary_scalings(t_ptr, b, timestep_scaling, sigma_data)
    g = tl.load(g_ptr + idx, mask=mask).to(tl.float32)
    dtype = g_sample_ptr.dtype.element_ty
    tl.store(g_sample_ptr + idx, ((c_skip + c_out / alpha) * g).to(dtype), mask=mask)
    tl.store(g_eps_ptr + idx, (-(c_out * sigma / alpha) * g).to(dtype), mask=mask)


@jit
def sampler_step_fwd_kernel(
    sample_ptr, eps_ptr, noise_ptr, denoised_ptr, next_ptr, t_ptr, t_prev_ptr, acp_ptr,
    n_per_sample, timestep_scaling, sigma_data, BLOCK: tl.constexpr,
):
    b, idx, mask = _block_offsets(n_per_sample, BLOCK)
    alpha, sigma = _alpha_sigma(acp_ptr, t_ptr, b)
    alpha_prev, sigma_prev = _alpha_sigma(acp_ptr, t_prev_ptr, b)
    c_skip, c_out = _boundary_scalings(t_ptr, b, timestep_scaling, sigma_data)
    x = tl.load(sample_ptr + idx, mask=mask).to(tl.float32)
    eps = tl.load(eps_ptr + idx, mask=mask).to(tl.float32)
    noise = tl.load(noise_ptr + idx, mask=mask).to(tl.float32)
    denoised = c_skip * x + c_out * ((x - sigma * eps) / alpha)
    dtype = denoised_ptr.dtype.element_ty
    tl.store(denoised_ptr + idx, denoised.to(dtype), mask=mask)
    tl.store(next_ptr + idx, (alpha_prev * denoised + sigma_prev * noise).to(dtype), mask=mask)


@jit
def sampler_step_bwd_kernel(
    gd_ptr, gn_ptr, g_sample_ptr, g_eps_ptr, g_noise_ptr, t_ptr, t_prev_ptr, acp_ptr,
    n_per_sample, timestep_scaling, sigma_data, BLOCK: tl.constexpr,
):
    b, idx, mask = _block_offsets(n_per_sample, BLOCK)
    alpha, sigma = _alpha_sigma(acp_ptr, t_ptr, b)
    alpha_prev, sigma_prev = _alpha_sigma(acp_ptr, t_prev_ptr, b)
    c_skip, c_out = _boundary_scalings(t_ptr, b, timestep_scaling, sigma_data)
    gd = tl.load(gd_ptr + idx, mask=mask).to(tl.float32)
    gn = tl.load(gn_ptr + idx, mask=mask).to(tl.float32)
    reaching_denoised = gd + alpha_prev * gn
    dtype = g_sample_ptr.dtype.element_ty
    tl.store(g_sample_ptr + idx, ((c_skip + c_out / alpha) * reaching_denoised).to(dtype), mask=mask)
    tl.store(g_eps_ptr + idx, (-(c_out * sigma / alpha) * reaching_denoised).to(dtype), mask=mask)
    tl.store(g_noise_ptr + idx, (sigma_prev * gn).to(dtype), mask=mask)


@jit
def pseudo_huber_fwd_kernel(pred_ptr, target_ptr, partial_ptr, n, c, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(pred_ptr + offs, mask=mask).to(tl.float32) - tl.load(target_ptr + offs, mask=mask).to(tl.float32)
    # sqrt(d^2 + c^2) - c cancels catastrophically for |d| << c; d^2 / (sqrt(d^2 + c^2) + c) is the
    # same number without the cancellation.
    loss = (d * d) / (tl.sqrt(d * d + c * c) + c)
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))


@jit
def pseudo_huber_bwd_kernel(grad_ptr, pred_ptr, target_ptr, g_pred_ptr, g_target_ptr, n, c, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(pred_ptr + offs, mask=mask).to(tl.float32) - tl.load(target_ptr + offs, mask=mask).to(tl.float32)
    scale = tl.load(grad_ptr).to(tl.float32) / n
    g = scale * d / tl.sqrt(d * d + c * c)
    tl.store(g_pred_ptr + offs, g.to(g_pred_ptr.dtype.element_ty), mask=mask)
    tl.store(g_target_ptr + offs, (-g).to(g_target_ptr.dtype.element_ty), mask=mask)


# Production launch configurations (see launch_config.py), compiled ahead of time by
# `python -m turbo_kernels.kernel_report`. Timesteps are int64, w, motion scale and the
# alphas_cumprod table fp32, whatever the storage dtype.
_GUIDED_ARGS = dict(t_hi_ptr="*i64", t_lo_ptr="*i64", w_ptr="*fp32", m_ptr="*fp32", acp_ptr="*fp32", n_per_sample="i32")
_BOUNDARY_ARGS = dict(t_ptr="*i64", acp_ptr="*fp32", n_per_sample="i32", timestep_scaling="fp32", sigma_data="fp32")
_SAMPLER_ARGS = dict(_BOUNDARY_ARGS, t_prev_ptr="*i64")
REPORT_CONFIGS = [
    *(
        config
        for kernel in (guided_solver_fwd_kernel, guided_solver_bwd_kernel)
        for has_score in (True, False)
        for release_form in (True, False)
        for config in storage_configs(
            kernel, _GUIDED_ARGS, dict(HAS_SCORE=has_score, RELEASE_FORM=release_form, BLOCK=BLOCK), NUM_WARPS
        )
    ),
    *storage_configs(consistency_output_fwd_kernel, _BOUNDARY_ARGS, dict(BLOCK=BLOCK), NUM_WARPS),
    *storage_configs(consistency_output_bwd_kernel, _BOUNDARY_ARGS, dict(BLOCK=BLOCK), NUM_WARPS),
    *storage_configs(sampler_step_fwd_kernel, _SAMPLER_ARGS, dict(BLOCK=BLOCK), NUM_WARPS),
    *storage_configs(sampler_step_bwd_kernel, _SAMPLER_ARGS, dict(BLOCK=BLOCK), NUM_WARPS),
    *storage_configs(
        pseudo_huber_fwd_kernel, dict(partial_ptr="*fp32", n="i32", c="fp32"), dict(BLOCK=REDUCE_BLOCK), REDUCE_NUM_WARPS
    ),
    *storage_configs(pseudo_huber_bwd_kernel, dict(grad_ptr="*fp32", n="i32", c="fp32"), dict(BLOCK=BLOCK), NUM_WARPS),
]


def new_output(like: Tensor) -> Tensor:
    """Every output buffer is allocated here (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty_like(like)


def _grid(x: Tensor):
    n_per_sample = x.numel() // x.shape[0]
    return (cdiv(n_per_sample, BLOCK), x.shape[0]), n_per_sample


def guided_solver_step(z_t, eps_cond, eps_uncond, score, t_hi, t_lo, w, motion_scale, alphas_cumprod, release_form):
    z_lo, x0 = new_output(z_t), new_output(z_t)
    if z_t.numel() == 0:
        return z_lo, x0
    grid, n = _grid(z_t)
    guided_solver_fwd_kernel[grid](
        z_t, eps_cond, eps_uncond, score if score is not None else z_t, z_lo, x0,
        t_hi, t_lo, w, motion_scale, alphas_cumprod, n,
        HAS_SCORE=score is not None, RELEASE_FORM=release_form, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return z_lo, x0


def guided_solver_step_backward(grad_z_lo, grad_x0, t_hi, t_lo, w, motion_scale, alphas_cumprod, release_form, has_score):
    g_z_t, g_eps_c, g_eps_u = (new_output(grad_z_lo) for _ in range(3))
    g_score = new_output(grad_z_lo) if has_score else grad_z_lo.new_empty(0)
    if grad_z_lo.numel() == 0:
        return g_z_t, g_eps_c, g_eps_u, g_score
    grid, n = _grid(grad_z_lo)
    guided_solver_bwd_kernel[grid](
        grad_z_lo, grad_x0, g_z_t, g_eps_c, g_eps_u, g_score if has_score else g_z_t,
        t_hi, t_lo, w, motion_scale, alphas_cumprod, n,
        HAS_SCORE=has_score, RELEASE_FORM=release_form, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return g_z_t, g_eps_c, g_eps_u, g_score


def consistency_output(sample, eps, t, alphas_cumprod, timestep_scaling, sigma_data):
    out = new_output(sample)
    if sample.numel() == 0:
        return out
    grid, n = _grid(sample)
    consistency_output_fwd_kernel[grid](
        sample, eps, out, t, alphas_cumprod, n, float(timestep_scaling), float(sigma_data),
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return out


def consistency_output_backward(grad_out, t, alphas_cumprod, timestep_scaling, sigma_data):
    g_sample, g_eps = new_output(grad_out), new_output(grad_out)
    if grad_out.numel() == 0:
        return g_sample, g_eps
    grid, n = _grid(grad_out)
    consistency_output_bwd_kernel[grid](
        grad_out, g_sample, g_eps, t, alphas_cumprod, n, float(timestep_scaling), float(sigma_data),
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return g_sample, g_eps


def consistency_sampler_step(sample, eps, noise, t, t_prev, alphas_cumprod, timestep_scaling, sigma_data):
    denoised, next_sample = new_output(sample), new_output(sample)
    if sample.numel() == 0:
        return denoised, next_sample
    grid, n = _grid(sample)
    sampler_step_fwd_kernel[grid](
        sample, eps, noise, denoised, next_sample, t, t_prev, alphas_cumprod, n,
        float(timestep_scaling), float(sigma_data), BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return denoised, next_sample


def consistency_sampler_step_backward(grad_denoised, grad_next, t, t_prev, alphas_cumprod, timestep_scaling, sigma_data):
    g_sample, g_eps, g_noise = (new_output(grad_denoised) for _ in range(3))
    if grad_denoised.numel() == 0:
        return g_sample, g_eps, g_noise
    grid, n = _grid(grad_denoised)
    sampler_step_bwd_kernel[grid](
        grad_denoised, grad_next, g_sample, g_eps, g_noise, t, t_prev, alphas_cumprod, n,
        float(timestep_scaling), float(sigma_data), BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return g_sample, g_eps, g_noise


def pseudo_huber_loss(pred, target, c):
    n = pred.numel()
    n_blocks = max(cdiv(n, REDUCE_BLOCK), 1)
    partial = new_output(torch.empty(n_blocks, device=pred.device, dtype=torch.float32))
    if n == 0:
        return torch.full((), float("nan"), device=pred.device, dtype=torch.float32)
    pseudo_huber_fwd_kernel[(n_blocks,)](pred, target, partial, n, float(c), BLOCK=REDUCE_BLOCK, num_warps=REDUCE_NUM_WARPS)
    return partial.sum() / n


def pseudo_huber_loss_backward(grad, pred, target, c):
    g_pred, g_target = new_output(pred), new_output(target)
    n = pred.numel()
    if n == 0:
        return g_pred, g_target
    pseudo_huber_bwd_kernel[(cdiv(n, BLOCK),)](
        grad, pred, target, g_pred, g_target, n, float(c), BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    return g_pred, g_target
