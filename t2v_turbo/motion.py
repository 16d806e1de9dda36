"""The motion prior of T2V-Turbo-v2 (SPEC 4): the score dE/dz_t that the guided solver subtracts
from the teacher's noise direction for motion clips.

For a clip with clean latent z_0 and grid index n (t_hi = ddim_timesteps[n]):
1. `ddim_inversion` runs z_0 up the 200-step grid to t_hi with the conditional teacher, giving z_ref;
2. `motion_score` records the temporal self-attention probabilities of every decoder temporal attn1
   layer on z_ref (no grad) and on z_t (with grad), takes each clip's top-1-masked MSE per layer
   through `turbo_kernels.motion_energy`, E_b = 1e4 · mean over layers, and backpropagates
   sum_b E_b into z_t, so each clip of a batch gets exactly its solo score;
3. `compute_motion_prior` glues both with z_t = α_{t_hi}·z_0 + σ_{t_hi}·ε.

The teacher is any callable teacher(x (B, C, F, H, W), t (B,), context (B, L, D), fps) -> ε on the
teacher path (no guidance or motion conditioning). By default a VC2UNet or a diffusers
UNet3DConditionModel is called through `NoisePredictor` (which drops fps for the latter); any other
module is called as it is. Both networks' decoder temporal attn1 layers see "sequences"
(B·H·W, F, channels): diffusers' TransformerTemporalModel permutes (B·F, C, H, W) to
(B·H·W, F, C) before its blocks, as VC2's temporal transformer does, so their captured to_q / to_k
outputs share the (B·H·W, F, heads·d) layout that motion_energy reads. The attention ops run
on whatever backend `turbo_kernels.backend(...)` selects. Conventions (ε at the destination timestep,
ᾱ_0 = 0.99915 for the first step, the release's float32-built ᾱ table, per-clip means) are those of
shared/vc2_reference/README.md, "Motion-score golden".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import turbo_kernels
from turbo_kernels import checks
from t2v_turbo import schedule
from t2v_turbo.models.adapter import NoisePredictor, is_diffusers_unet3d
from t2v_turbo.models.vc2_unet import VC2UNet
from t2v_turbo.schedule import release_alphas_cumprod

# compute_temp_loss's ×100 times the release's temp_loss_scale of 100.
ENERGY_SCALE = 1e4

Teacher = Callable[[Tensor, Tensor, Tensor, Tensor | int], Tensor]

_VC2_DECODER_ATTN1 = re.compile(r"output_blocks\.\d+\.\d+\.transformer_blocks\.0\.attn1")
_DIFFUSERS_DECODER_ATTN1 = re.compile(r"up_blocks\.\d+\.temp_attentions\.\d+\.transformer_blocks\.0\.attn1")


class MotionScore(NamedTuple):
    """What `motion_score` returns: score = dE/dz_t (z_t's shape and dtype), energy E_b (B,),
    layer_mse (B, L) (unscaled, layers in the given order) and eps_cond, the teacher's ε at
    (z_t, t_hi) from the live pass (the release caches it, saving one teacher pass)."""

    score: Tensor
    energy: Tensor
    layer_mse: Tensor
    eps_cond: Tensor


def decoder_temporal_attention_names(unet: nn.Module) -> list[str]:
    """Names of the first temporal self-attention (attn1) of every decoder temporal transformer,
    in forward order: `output_blocks.{i}.{j}.transformer_blocks.0.attn1` of a VC2UNet (9 layers in
    the full model, 6 in the tiny one) or `up_blocks.{i}.temp_attentions.{j}.transformer_blocks.0.attn1`
    of a diffusers UNet3DConditionModel. Uses the model's own `decoder_temporal_attention_names()`
    where it has one."""
    own = getattr(unet, "decoder_temporal_attention_names", None)
    if callable(own):
        return list(own())
    names = [
        name
        for name, module in unet.named_modules()
        if (_VC2_DECODER_ATTN1.fullmatch(name) and getattr(module, "temporal", False) is True)
        or _DIFFUSERS_DECODER_ATTN1.fullmatch(name)
    ]
    if not names:
        raise ValueError(
            f"unet ({type(unet).__name__}) has no decoder temporal attention: expected modules named "
            "output_blocks.*.transformer_blocks.0.attn1 (temporal) or up_blocks.*.temp_attentions.*.transformer_blocks.0.attn1"
        )
    return names


def _coefficient_dtype(latent_dtype: torch.dtype) -> torch.dtype:
    # Schedule coefficients and the DDIM update in float64 for float64 latents, else float32 (the
    # release did them in bf16 under bf16; float32 costs nothing here and is closer to the maths).
    return torch.float64 if latent_dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _default_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """release_alphas_cumprod in `dtype` on `device`, made once: it is built on the host, so made
    anew it would be a host-to-device copy, a synchronisation on a GPU, at each of the three
    places a motion-prior call asks for it. Never handed to callers, so never changed in place."""
    return release_alphas_cumprod(dtype, device)


def _checked_table(alphas_cumprod: Tensor | None, like: Tensor) -> Tensor:
    dtype = _coefficient_dtype(like.dtype)
    if alphas_cumprod is None:
        if type(like) is not Tensor or torch.compiler.is_compiling():
            # Fake or traced tensors (torch.export, FakeTensorMode) would leave a table of theirs
            # in the cache for every later eager call.
            return release_alphas_cumprod(dtype, like.device)
        return _default_table(dtype, like.device)
    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.shape != (schedule.NUM_TRAIN_TIMESTEPS,):
        raise ValueError(
            f"alphas_cumprod must be a ({schedule.NUM_TRAIN_TIMESTEPS},) tensor, got "
            f"{getattr(alphas_cumprod, 'shape', type(alphas_cumprod).__name__)}"
        )
    if not alphas_cumprod.is_floating_point():
        raise TypeError(f"alphas_cumprod must be floating point, got {alphas_cumprod.dtype}")
    # The inversion and the noising never divide by sqrt(ᾱ) at the table's end: a
    # zero-terminal-SNR table (ᾱ_999 = 0) is fine here.
    checks.check_table_values(alphas_cumprod, allow_zero=True)
    return alphas_cumprod.to(dtype=dtype, device=like.device)


def _checked_latents(z: Tensor, name: str) -> Tensor:
    if not isinstance(z, Tensor) or z.dim() != 5 or not z.is_floating_point():
        raise ValueError(
            f"{name} must be a floating (B, C, F, H, W) latent tensor, got "
            f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}"
        )
    return z


def _host_grid_index(grid_index: Tensor, batch: int) -> Tensor:
    """The clips' grid indices as an int64 host tensor, range-checked there. The inversion's
    bookkeeping (which clips advance at each step) and t_hi are the host's: indices on a device
    are read once here, not at every step."""
    if not isinstance(grid_index, Tensor) or grid_index.shape != (batch,) or grid_index.is_floating_point():
        raise ValueError(
            f"grid_index must be an integer ({batch},) tensor (one grid index per clip), got "
            f"{tuple(grid_index.shape) if isinstance(grid_index, Tensor) else type(grid_index).__name__}"
        )
    grid_index = grid_index.to("cpu", torch.int64)
    schedule.solver_timesteps(grid_index)  # the range check, with its message
    return grid_index


def _checked_context(context: Tensor, batch: int) -> Tensor:
    if not isinstance(context, Tensor) or context.dim() != 3 or context.shape[0] != batch:
        raise ValueError(
            f"context must be a ({batch}, L, D) prompt embedding, got "
            f"{tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__}"
        )
    return context


def _checked_timesteps(t: Tensor | int, batch: int, device: torch.device, name: str) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.int64, device=device).reshape(-1)
    if t.numel() not in (1, batch):
        raise ValueError(f"{name} must be one timestep or one per clip ({batch}), got {t.numel()}")
    return t.expand(batch)


def _per_clip(value: Tensor | int, rows: Tensor) -> Tensor | int:
    """A per-clip conditioning value restricted to the clips in `rows`, host indices (a Python int
    broadcasts)."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] > 1:
        return value[rows.to(value.device, non_blocking=True)]
    return value


def teacher_path(unet: nn.Module) -> Teacher:
    """How to call `unet` on the teacher path: through NoisePredictor for a VC2UNet or a diffusers
    UNet3DConditionModel (no guidance, no motion), else the module itself."""
    if isinstance(unet, VC2UNet) or is_diffusers_unet3d(unet):
        return NoisePredictor(unet)
    return unet


def _require_eval(unet: object) -> None:
    if isinstance(unet, nn.Module) and unet.training:
        raise ValueError("unet is in train mode (its dropout would randomise the teacher): call unet.eval() first")


def ddim_inversion(
    unet_fn: Teacher,
    z0: Tensor,
    grid_index: Tensor,
    context: Tensor,
    alphas_cumprod: Tensor | None = None,
    fps: Tensor | int = schedule.DEFAULT_FPS,
    return_trajectory: bool = False,
    progress: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """DDIM inversion of clean latents z0 (B, C, F, H, W) up the 200-step grid to each clip's
    t_hi = ddim_timesteps[grid_index[b]], under no_grad (SPEC 4.1).

    unet_fn: a teacher callable; a module goes through `teacher_path`.
    Step i (t = 5(i+1) − 1, p = max(t − 5, 0)): ε = unet_fn(x, t, context, fps), at the destination
    timestep t; x ← (x − σ_p·ε)·sqrt(ᾱ_t/ᾱ_p) + σ_t·ε. The first step starts from z0 as the sample
    at t = 0 (ᾱ_0 = 0.99915, not 1). Clip b takes steps 0..n_b; at step i the teacher runs on the
    clips still advancing only (a clip is never evaluated past its own t_hi, so a batch costs
    sum_b (n_b + 1) clip-evaluations, not B·(max n + 1) as masking a full batch would).

    alphas_cumprod: the (1000,) ᾱ table; default `release_alphas_cumprod()`. Coefficients are taken
    in float64 for float64 latents, else float32; x stays in z0's dtype between steps.
    Returns z_ref (B, C, F, H, W); with return_trajectory also the latents after every step,
    (B, max n + 1, C, F, H, W), where entry i of a clip with n_b < i repeats its z_ref.
    """
    z0 = _checked_latents(z0, "z0")
    if isinstance(unet_fn, nn.Module):
        unet_fn = teacher_path(unet_fn)
    batch = z0.shape[0]
    grid_index = _host_grid_index(grid_index, batch)
    context = _checked_context(context, batch)
    table = _checked_table(alphas_cumprod, z0)
    grid = schedule.ddim_timesteps().tolist()
    x = z0.clone()
    trajectory = []
    num_steps = int(grid_index.max()) + 1
    with torch.no_grad():
        for step in tqdm(range(num_steps), desc="DDIM inversion", disable=not progress):
            t = grid[step]
            p = max(t - schedule.SOLVER_SKIP, 0)
            active_on_host = (grid_index >= step).nonzero().squeeze(1)
            everyone = active_on_host.numel() == batch
            active = active_on_host.to(z0.device, non_blocking=True)
            x_active = x if everyone else x[active]
            eps = unet_fn(
                x_active,
                torch.full((active.numel(),), t, dtype=torch.int64, device=z0.device),
                context if everyone else context[active],
                fps if everyone else _per_clip(fps, active_on_host),
            )
            sigma_p, sigma_t = (1 - table[p]).sqrt(), (1 - table[t]).sqrt()
            ratio = (table[t] / table[p]).sqrt()
            eps = eps.to(table.dtype)
            advanced = ((x_active.to(table.dtype) - sigma_p * eps) * ratio + sigma_t * eps).to(z0.dtype)
            x = advanced if everyone else x.index_copy(0, active, advanced)
            if return_trajectory:
                trajectory.append(x)
    if return_trajectory:
        return x, torch.stack(trajectory, dim=1)
    return x


def noised_latents(z0: Tensor, noise: Tensor, t_hi: Tensor | int, alphas_cumprod: Tensor | None = None) -> Tensor:
    """z_t = α_{t_hi}·z0 + σ_{t_hi}·noise per clip (t_hi (B,) or one int), coefficients as in ddim_inversion."""
    z0 = _checked_latents(z0, "z0")
    if not isinstance(noise, Tensor) or noise.shape != z0.shape:
        raise ValueError(f"noise must have z0's shape {tuple(z0.shape)}, got {getattr(noise, 'shape', noise)}")
    table = _checked_table(alphas_cumprod, z0)
    abar = table[_checked_timesteps(t_hi, z0.shape[0], z0.device, "t_hi")].reshape(-1, 1, 1, 1, 1)
    return (abar.sqrt() * z0.to(table.dtype) + (1 - abar).sqrt() * noise.to(table.dtype)).to(z0.dtype)


def _attention_modules(unet: nn.Module, layer_names: Sequence[str] | None) -> dict[str, nn.Module]:
    names = decoder_temporal_attention_names(unet) if layer_names is None else list(layer_names)
    if not names:
        raise ValueError("layer_names must name at least one temporal attention layer")
    modules = {}
    for name in names:
        try:
            module = unet.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"layer_names: {type(unet).__name__} has no submodule {name!r}") from error
        if not isinstance(getattr(module, "heads", None), int):
            raise TypeError(f"layer_names: {name!r} ({type(module).__name__}) has no integer `heads` attribute")
        modules[name] = module
    return modules


def _captured(qk: Mapping[str, tuple[Tensor, Tensor]], names: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
    missing = [name for name in names if name not in qk or any(t is None for t in qk[name])]
    if missing:
        raise ValueError(f"layer_names: these layers never called to_q and to_k in the forward pass: {missing}")
    return {name: qk[name] for name in names}


def motion_energy_per_clip(
    live_qk: Mapping[str, tuple[Tensor, Tensor]],
    reference_probs: Mapping[str, Tensor],
    heads: Mapping[str, int],
    num_frames: int,
    num_clips: int,
) -> tuple[Tensor, Tensor]:
    """Per-clip energies from captured q, k ("sequences" layout (B·H·W, F, heads·d)) of the live
    pass and the reference pass's probabilities (B·H·W, heads, F, F) of the same layers:
    layer_mse[b, l] = turbo_kernels.motion_energy(..., num_videos=B)[b] (top-1 mask of the reference,
    mean over clip b's kept entries) and energy[b] = 1e4 · mean_l layer_mse[b, l].
    Returns (energy (B,), layer_mse (B, L)), differentiable in the live q and k."""
    if set(live_qk) != set(reference_probs):
        raise ValueError(
            f"live_qk and reference_probs must name the same layers, got {sorted(live_qk)} and {sorted(reference_probs)}"
        )
    per_layer = [
        turbo_kernels.motion_energy(
            q, k, reference_probs[name], num_frames, heads[name], layout="sequences", num_videos=num_clips
        )
        for name, (q, k) in live_qk.items()
    ]
    layer_mse = torch.stack(per_layer, dim=1)
    return ENERGY_SCALE * layer_mse.mean(dim=1), layer_mse


def reference_attention_probs(
    unet: nn.Module,
    z_ref: Tensor,
    t_hi: Tensor | int,
    context: Tensor,
    layer_names: Sequence[str] | None = None,
    fps: Tensor | int = schedule.DEFAULT_FPS,
    teacher: Teacher | None = None,
) -> dict[str, Tensor]:
    """The reference maps A_ref of SPEC 4.2: one no-grad teacher forward on z_ref at t_hi, and
    turbo_kernels.temporal_attention_probs of each layer's captured q, k: name ->
    (B·H·W, heads, F, F), sequence s = b·H·W + pixel, rows are query frames."""
    _require_eval(unet)
    z_ref = _checked_latents(z_ref, "z_ref")
    batch, num_frames = z_ref.shape[0], z_ref.shape[2]
    context = _checked_context(context, batch)
    t_hi = _checked_timesteps(t_hi, batch, z_ref.device, "t_hi")
    teacher = teacher_path(unet) if teacher is None else teacher
    modules = _attention_modules(unet, layer_names)
    with torch.no_grad():
        with turbo_kernels.capture_attention_inputs(modules) as reference_qk:
            teacher(z_ref, t_hi, context, fps)
        return {
            name: turbo_kernels.temporal_attention_probs(q, k, num_frames, modules[name].heads, layout="sequences")
            for name, (q, k) in _captured(reference_qk, list(modules)).items()
        }


def motion_score(
    unet: nn.Module,
    z_t: Tensor,
    t_hi: Tensor,
    z_ref: Tensor,
    context: Tensor,
    layer_names: Sequence[str] | None = None,
    fps: Tensor | int = schedule.DEFAULT_FPS,
    teacher: Teacher | None = None,
) -> MotionScore:
    """The motion score of SPEC 4.2-4.5 for a batch of clips: score = d(sum_b E_b)/dz_t, so each
    clip's score is its solo score.

    unet: the module holding the attention layers (eval mode); teacher: how to call it on the teacher
    path, teacher(x, t, context, fps) -> ε (default: `teacher_path(unet)`). layer_names:
    default `decoder_temporal_attention_names(unet)`. A no-grad forward on z_ref gives the
    reference probabilities (turbo_kernels.temporal_attention_probs of the captured q, k); a forward
    on z_t with gradients gives the live q, k; energies through turbo_kernels.motion_energy.
    t_hi: (B,) timesteps (or an int for all). Returns a MotionScore; nothing keeps a graph.
    """
    _require_eval(unet)
    z_t = _checked_latents(z_t, "z_t")
    z_ref = _checked_latents(z_ref, "z_ref")
    if z_ref.shape != z_t.shape:
        raise ValueError(f"z_ref must have z_t's shape {tuple(z_t.shape)}, got {tuple(z_ref.shape)}")
    batch, num_frames = z_t.shape[0], z_t.shape[2]
    context = _checked_context(context, batch)
    t_hi = _checked_timesteps(t_hi, batch, z_t.device, "t_hi")
    teacher = teacher_path(unet) if teacher is None else teacher
    modules = _attention_modules(unet, layer_names)
    heads = {name: module.heads for name, module in modules.items()}

    reference_probs = reference_attention_probs(unet, z_ref, t_hi, context, list(modules), fps, teacher)
    with torch.enable_grad():
        live = z_t.detach().requires_grad_(True)
        with turbo_kernels.capture_attention_inputs(modules) as live_qk:
            eps_cond = teacher(live, t_hi, context, fps)
        energy, layer_mse = motion_energy_per_clip(
            _captured(live_qk, list(modules)), reference_probs, heads, num_frames, batch
        )
        (score,) = torch.autograd.grad(energy.sum(), live)
    return MotionScore(score.detach(), energy.detach(), layer_mse.detach(), eps_cond.detach())


def compute_motion_prior(
    unet: nn.Module,
    z0: Tensor,
    grid_index: Tensor,
    noise: Tensor,
    context: Tensor,
    alphas_cumprod: Tensor | None = None,
    fps: Tensor | int = schedule.DEFAULT_FPS,
    layer_names: Sequence[str] | None = None,
    teacher: Teacher | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    inversion_teacher: Teacher | None = None,
) -> dict[str, Tensor]:
    """The whole motion prior of a batch of clips (SPEC 4), clips with different grid indices n
    batched together: t_hi = ddim_timesteps[n], z_ref = ddim_inversion(z0 → t_hi),
    z_t = α_{t_hi}·z0 + σ_{t_hi}·noise, then motion_score.

    alphas_cumprod: default `release_alphas_cumprod()` (the release's float32-built table, cast to
    the coefficient dtype: float64 for float64 latents, else float32). Pass a table to override it.
    teacher: how to call `unet` (default `teacher_path(unet)`); inversion_teacher: the callable of
    the no-grad inversion steps only (default: teacher), e.g. a torch.compile'd teacher. The score's
    two passes record attention through hooks on `unet`'s layers, so they always run `teacher`.
    Returns dict(z_ref, z_t, score, energy (B,), layer_mse (B, L), eps_cond), plus the padded
    inversion trajectory (B, max n + 1, C, F, H, W) under "trajectory" when asked.
    """
    _require_eval(unet)
    z0 = _checked_latents(z0, "z0")
    teacher = teacher_path(unet) if teacher is None else teacher
    # The inversion and the noising check and convert the caller's table themselves; handing them
    # a converted copy made here would be a new tensor each call, whose values they would read
    # again (a synchronisation each on a GPU).
    grid_index = _host_grid_index(grid_index, z0.shape[0])
    t_hi = schedule.solver_timesteps(grid_index)[0].to(z0.device, non_blocking=True)
    inversion = ddim_inversion(
        teacher if inversion_teacher is None else inversion_teacher, z0, grid_index, context, alphas_cumprod, fps,
        return_trajectory, progress,
    )
    z_ref, trajectory = inversion if return_trajectory else (inversion, None)
    z_t = noised_latents(z0, noise, t_hi, alphas_cumprod)
    result = motion_score(unet, z_t, t_hi, z_ref, context, layer_names, fps, teacher)
    prior = {"z_ref": z_ref, "z_t": z_t, **result._asdict()}
    if return_trajectory:
        prior["trajectory"] = trajectory
    return prior
