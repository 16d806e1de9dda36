"""The diffusion schedule of VideoCrafter2, its latent scale and fps conditioning, and the timestep
grids of T2V-Turbo-v2 (SPEC 1, 2, 6).

The one place that holds these tables: everything else asks here.
"""

from __future__ import annotations

import torch

from turbo_kernels import checks

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
DDIM_GRID_STEPS = 200
# One grid step of the 200-step DDIM grid, in raw timesteps.
SOLVER_SKIP = NUM_TRAIN_TIMESTEPS // DDIM_GRID_STEPS
VAE_SCALE_FACTOR = 0.18215
# The fps conditioning VideoCrafter2 and T2V-Turbo-v2 train and sample with (SPEC 1); clips are
# sampled at this rate to match it.
DEFAULT_FPS = 8


def alphas_cumprod(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """abar_t for t = 0..999 of the "scaled_linear" betas: linspace(sqrt(b0), sqrt(b1), 1000)^2.
    Computed in float64, returned in `dtype`."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype=dtype, device=device)


def release_alphas_cumprod(dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The release scheduler's abar table: betas, 1 - betas and the cumulative product all in
    float32, then cast to `dtype`. It differs from `alphas_cumprod` (built in float64) by up to
    4.8e-7. The teacher cache's z_t, the motion prior (its golden uses this table) and the
    training solver that rebuilds x0 from z_t all use this one, so they agree on alpha."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(dtype=dtype, device=device)


def ddim_timesteps() -> torch.Tensor:
    """The 200-step grid: ddim_timesteps[i] = 5 (i + 1) - 1 = 4, 9, ..., 999."""
    return torch.arange(1, DDIM_GRID_STEPS + 1, dtype=torch.int64) * SOLVER_SKIP - 1


def solver_timesteps(grid_index: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_hi, t_lo) for grid indices n, on n's device: t_hi = ddim_timesteps[n] = 5 (n + 1) - 1,
    t_lo = max(t_hi - 5, 0). The range check reads n's values; on a GPU, as the ops' value checks
    do, only while turbo_kernels' checks are on (a synchronisation otherwise avoided)."""
    n = torch.as_tensor(grid_index, dtype=torch.int64)
    if (n.device.type == "cpu" or checks.reads_values(n)) and bool(((n < 0) | (n >= DDIM_GRID_STEPS)).any()):
        raise ValueError(f"grid_index must lie in [0, {DDIM_GRID_STEPS}), got {n.tolist()}")
    t_hi = (n + 1) * SOLVER_SKIP - 1
    return t_hi, (t_hi - SOLVER_SKIP).clamp(min=0)


def check_step_count(num_steps: int, most: int) -> int:
    """num_steps of a sampler over `most` timesteps: an int in [1, most], or a ValueError."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= most:
        raise ValueError(f"num_steps must be an int in [1, {most}], got {num_steps!r}")
    return num_steps


def sampler_timesteps(num_steps: int) -> list[int]:
    """Timesteps of N-step consistency sampling: the 200-step grid reversed, stride 200 // N, first N.
    N=4 gives 999, 749, 499, 249."""
    check_step_count(num_steps, DDIM_GRID_STEPS)
    stride = DDIM_GRID_STEPS // num_steps
    return ddim_timesteps().flip(0)[::stride][:num_steps].tolist()
