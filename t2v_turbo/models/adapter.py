"""One calling convention for the noise predictors that sampling and training accept.

`NoisePredictor(model)(x, t, context, fps, guidance=w, motion=m) -> eps` runs either network:

- `VC2UNet`: guidance and motion strengths become the 256-wide sinusoid embeddings of SPEC 1
  (`timestep_cond` / `motion_cond`); fps is passed through.
- diffusers `UNet3DConditionModel` (ModelScope layout): the guidance embedding, the same LCM
  sinusoid at the model's `time_cond_proj_dim` width, goes in as `timestep_cond`; it has no fps
  input and no motion conditioning.

`guidance=None` leaves `timestep_cond` out: the teacher path.

A model wrapped for training (accelerate/DDP's `.module`, peft's `get_base_model()`) is called
through its wrapper, so gradient synchronisation and adapters stay in the forward; the wrapped
network decides the convention.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from t2v_turbo.models.vc2_unet import VC2UNet, sinusoid_b
from t2v_turbo.schedule import DEFAULT_FPS

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


def is_diffusers_unet3d(model: object) -> bool:
    """Whether `model` is a diffusers UNet3DConditionModel (False when diffusers is not installed)."""
    diffusers_class = _diffusers_unet3d_class()
    return diffusers_class is not None and isinstance(model, diffusers_class)


def _wrapped_network(model: nn.Module) -> nn.Module:
    """The VC2UNet or UNet3DConditionModel inside DDP / accelerate (`.module`), torch.compile
    (`._orig_mod`) and peft (`get_base_model()`) wrappers; `model` itself when it is one."""
    network = model
    while not (isinstance(network, VC2UNet) or is_diffusers_unet3d(network)):
        if callable(getattr(network, "get_base_model", None)):
            network = network.get_base_model()
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):
            network = network._orig_mod
        elif isinstance(getattr(network, "module", None), nn.Module):
            network = network.module
        else:
            raise TypeError(
                f"model must be a VC2UNet or a diffusers UNet3DConditionModel (or one wrapped by DDP, accelerate, "
                f"torch.compile or peft), got {type(model).__name__}"
            )
    return network


class NoisePredictor:
    """eps = predictor(x (B, C, F, H, W), t, context (B, L, D), fps, guidance=w, motion=m).

    x and context are cast to the model's dtype; eps comes back in it. t is an int or a (B,) tensor.
    `model` may be a training wrapper around either network: it is what gets called.
    """

    def __init__(self, model: nn.Module):
        network = _wrapped_network(model)
        self._motion_dim = None
        if isinstance(network, VC2UNet):
            self.kind = "vc2"
            self._guidance_dim = network.config["time_cond_proj_dim"]
            self._motion_dim = network.config["motion_cond_proj_dim"]
            self._in_channels = network.config["in_channels"]
            self._context_dim = network.config["context_dim"]
        else:
            self.kind = "diffusers"
            self._guidance_dim = network.config.time_cond_proj_dim
            self._in_channels = network.config.in_channels
            self._context_dim = network.config.cross_attention_dim
        # diffusers' UNet3DConditionModel upsamples back to each skip connection's size, any size.
        self._latent_multiple = network.latent_multiple if self.kind == "vc2" else 1
        self.model = model
        self.network = network
        # A t2v_turbo.cuda_graphs.GraphedCall of call_model while enable_cuda_graphs holds.
        self.graphs = None

    @property
    def accepts_guidance(self) -> bool:
        return self._guidance_dim is not None

    @property
    def accepts_motion(self) -> bool:
        return self._motion_dim is not None

    @property
    def in_channels(self) -> int:
        return self._in_channels

    @property
    def context_dim(self) -> int:
        return self._context_dim

    @property
    def latent_multiple(self) -> int:
        """What the latent height and width must be multiples of."""
        return self._latent_multiple

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
        fps: int | Tensor = DEFAULT_FPS,
        guidance: Strength = None,
        motion: Strength = None,
    ) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, F, H, W), got shape {tuple(x.shape)}")
        batch, device, dtype = x.shape[0], x.device, self.dtype
        w = _strengths(guidance, "guidance", batch, device)
        m = _strengths(motion, "motion", batch, device)
        if w is not None and not self.accepts_guidance:
            raise ValueError(f"guidance was given but this {type(self.network).__name__} has no time_cond_proj_dim")
        if m is not None and not self.accepts_motion:
            if bool((m != 0).any()):
                raise ValueError(f"motion was given but this {type(self.network).__name__} has no motion conditioning")
            m = None
        if m is not None and w is None:
            raise ValueError("motion needs guidance: the model mixes the two embeddings")
        timesteps = torch.as_tensor(t, device=device).reshape(-1).expand(batch)
        x, context = x.to(dtype), context.to(device=device, dtype=dtype)

        timestep_cond = None if w is None else sinusoid_b(w, self._guidance_dim).to(dtype)
        motion_cond = None if m is None else sinusoid_b(m, self._motion_dim).to(dtype)
        call = self.call_model if self.graphs is None else self.graphs
        return call(x, timesteps, context, fps, timestep_cond, motion_cond)

    def enable_cuda_graphs(self) -> NoisePredictor:
        """From now on the model's call replays CUDA graphs (t2v_turbo.cuda_graphs.GraphedCall),
        watching the network's parameters; `graphs = None` turns them off."""
        from t2v_turbo.cuda_graphs import GraphedCall

        self.graphs = GraphedCall(self.call_model, [self.network])
        return self

    def call_model(
        self, x: Tensor, timesteps: Tensor, context: Tensor, fps: int | Tensor, timestep_cond: Tensor | None,
        motion_cond: Tensor | None,
    ) -> Tensor:
        """The model's own call on prepared inputs (embeddings built, dtypes and devices set):
        what a CUDA graph of this predictor records."""
        if self.kind == "vc2":
            return self.model(x, timesteps, context, fps, timestep_cond=timestep_cond, motion_cond=motion_cond)
        return self.model(x, timesteps, encoder_hidden_states=context, timestep_cond=timestep_cond).sample


def check_frame_size(height: int, width: int, vae_downsample: int, latent_multiple: int) -> None:
    """Frames of height x width pixels go through a VAE of that downsample factor, then a UNet
    whose latents must be multiples of latent_multiple: a ValueError naming the multiple the
    frame size must be, where it is not."""
    multiple = vae_downsample * latent_multiple
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise ValueError(
                f"{name} must be a multiple of {multiple} (the VAE's downsample factor {vae_downsample} times "
                f"the UNet's {latent_multiple}), got {value}"
            )
