"""One calling convention for the noise predictors that sampling and training accept.

`NoisePredictor(model)(x, t, context, fps, guidance=w, motion=m) -> eps` runs either network:

- `VC2UNet`: guidance and motion strengths become the 256-wide sinusoid embeddings of SPEC 1
  (`timestep_cond` / `motion_cond`); fps is passed through.
- diffusers `UNet3DConditionModel` (ModelScope layout): the guidance embedding, the same LCM
  sinusoid at the model's `time_cond_proj_dim` width, goes in as `timestep_cond`; it has no fps
  input and no motion conditioning.

`guidance=None` leaves `timestep_cond` out: the teacher path.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from t2v_turbo.models.vc2_unet import COND_EMBED_DIM, VC2UNet, sinusoid_b

Strength = Union[None, float, Tensor]


def _diffusers_unet3d_class() -> type | None:
    try:
        from diffusers import UNet3DConditionModel
    except ImportError:
        return None
    return UNet3DConditionModel


def _strengths(values: Strength, name: str, batch: int, device: torch.device) -> Tensor | None:
    """None, a float or a (B,) / () tensor -> None or a float32 (B,) tensor on `device`."""
    if values is None:
        return None
    if isinstance(values, bool) or not isinstance(values, (int, float, Tensor)):
        raise TypeError(f"{name} must be None, a float or a (B,) tensor, got {type(values).__name__}")
    values = torch.as_tensor(values, dtype=torch.float32, device=device).reshape(-1)
    if values.numel() == 1:
        return values.expand(batch)
    if values.numel() != batch:
        raise ValueError(f"{name} must hold 1 or {batch} (the batch size) values, got {values.numel()}")
    return values


class NoisePredictor:
    """eps = predictor(x (B, C, F, H, W), t, context (B, L, D), fps, guidance=w, motion=m).

    x and context are cast to the model's dtype; eps comes back in it. t is an int or a (B,) tensor.
    """

    def __init__(self, model: nn.Module):
        diffusers_class = _diffusers_unet3d_class()
        if isinstance(model, VC2UNet):
            self.kind = "vc2"
            self._guidance_dim = model.config["time_cond_proj_dim"]
            self._has_motion = model.config["motion_cond_proj_dim"] is not None
            self._in_channels = model.config["in_channels"]
        elif diffusers_class is not None and isinstance(model, diffusers_class):
            self.kind = "diffusers"
            self._guidance_dim = model.config.time_cond_proj_dim
            self._has_motion = False
            self._in_channels = model.config.in_channels
        else:
            raise TypeError(
                f"model must be a VC2UNet or a diffusers UNet3DConditionModel, got {type(model).__name__}"
            )
        self.model = model

    @property
    def accepts_guidance(self) -> bool:
        return self._guidance_dim is not None

    @property
    def accepts_motion(self) -> bool:
        return self._has_motion

    @property
    def in_channels(self) -> int:
        return self._in_channels

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(
        self,
        x: Tensor,
        t: int | Tensor,
        context: Tensor,
        fps: int | Tensor = 8,
        guidance: Strength = None,
        motion: Strength = None,
    ) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, F, H, W), got shape {tuple(x.shape)}")
        batch, device, dtype = x.shape[0], x.device, self.dtype
        w = _strengths(guidance, "guidance", batch, device)
        m = _strengths(motion, "motion", batch, device)
        if w is not None and not self.accepts_guidance:
            raise ValueError(f"guidance was given but this {type(self.model).__name__} has no time_cond_proj_dim")
        if m is not None and not self.accepts_motion:
            if bool((m != 0).any()):
                raise ValueError(f"motion was given but this {type(self.model).__name__} has no motion conditioning")
            m = None
        if m is not None and w is None:
            raise ValueError("motion needs guidance: the model mixes the two embeddings")
        timesteps = torch.as_tensor(t, device=device).reshape(-1).expand(batch)
        x, context = x.to(dtype), context.to(device=device, dtype=dtype)

        if self.kind == "vc2":
            timestep_cond = None if w is None else sinusoid_b(w, COND_EMBED_DIM).to(dtype)
            motion_cond = None if m is None else sinusoid_b(m, COND_EMBED_DIM).to(dtype)
            return self.model(x, timesteps, context, fps, timestep_cond=timestep_cond, motion_cond=motion_cond)
        timestep_cond = None if w is None else sinusoid_b(w, self._guidance_dim).to(dtype)
        return self.model(x, timesteps, encoder_hidden_states=context, timestep_cond=timestep_cond).sample
