"""The first stage of VideoCrafter2: an image autoencoder applied to every frame of a clip (SPEC 1, 5).

`VideoVAE` wraps diffusers' `AutoencoderKL` in the LDM configuration that VideoCrafter2 uses and maps
clips (B, 3, F, H, W) in [-1, 1] to scaled latents (B, C, F, H/8, W/8) and back, a chunk of frames at a
time. Decoding is differentiable, since the reward losses backpropagate through it, and can decode only
the frames a reward scores. `PixelSpace` has the same interface for models that diffuse pixels directly.
The release checkpoint's `first_stage_model.*` keys (LDM naming) load through an explicit key mapping.
With `use_kernels` set, the autoencoder's GroupNorm + SiLU pairs run fused (`turbo_kernels.patch`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

import turbo_kernels
from t2v_turbo.files import read_json_file, read_tensor_file, write_atomically, write_files_atomically
from t2v_turbo.models.checkpoint import CONFIG_NAME
from t2v_turbo.schedule import VAE_SCALE_FACTOR

FIRST_STAGE_PREFIX = "first_stage_model."
# Standalone LDM autoencoder checkpoints also carry the training discriminator under this prefix.
LOSS_PREFIX = "loss."
PIXEL_KIND = "pixel"
DIFFUSERS_CLASS_NAME = "AutoencoderKL"

LDM_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": VAE_SCALE_FACTOR,
}
TINY_CONFIG: dict[str, Any] = {
    **LDM_CONFIG,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 16,
}
PRESETS = {"ldm": LDM_CONFIG, "tiny": TINY_CONFIG}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a .safetensors, .pt, .ckpt or .bin file (pickles read with weights_only=True), on
    the CPU, unwrapped from a top-level "state_dict" entry when the file has one (Lightning checkpoints)."""
    path = Path(path)
    checkpoint_data = read_tensor_file(path)
    if not isinstance(checkpoint_data, Mapping):
        raise TypeError(f"path {path}: holds a {type(checkpoint_data).__name__}, not a state dict")
    state = checkpoint_data.get("state_dict", checkpoint_data)
    if not isinstance(state, Mapping):
        raise TypeError(f"path {path}: its 'state_dict' is a {type(state).__name__}, not a mapping")
    return {key: value for key, value in state.items() if isinstance(value, Tensor)}


def _resnet_to_ldm(name: str) -> str:
    return "nin_shortcut" if name == "conv_shortcut" else name


_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_key_to_ldm(key: str, num_levels: int) -> str:
    """The LDM (VideoCrafter2 `first_stage_model`) name of a diffusers AutoencoderKL parameter.

    The decoder's levels are numbered in opposite orders: diffusers' up_blocks.0 runs first (lowest
    resolution), LDM's decoder.up.{num_levels-1} is the one that runs first."""
    if re.fullmatch(r"(quant_conv|post_quant_conv|(encoder|decoder)\.conv_(in|out))\.(weight|bias)", key):
        return key
    if match := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
        return f"{match[1]}.norm_out.{match[2]}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{_resnet_to_ldm(match[3])}.{match[4]}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)", key):
        level = num_levels - 1 - int(match[1])
        return f"decoder.up.{level}.block.{match[2]}.{_resnet_to_ldm(match[3])}.{match[4]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        level = num_levels - 1 - int(match[1])
        return f"decoder.up.{level}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(\w+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_resnet_to_ldm(match[3])}.{match[4]}"
    if match := re.fullmatch(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", key
    ):
        return f"{match[1]}.mid.attn_1.{_ATTENTION_TO_LDM[match[2]]}.{match[3]}"
    raise KeyError(f"no LDM name for the diffusers AutoencoderKL parameter {key!r}")


def diffusers_state_dict_to_ldm(state: Mapping[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict under LDM names, attention projections as 1x1 conv weights."""
    ldm_state = {}
    for key, value in state.items():
        if ".attentions.0.to_" in key and key.endswith(".weight"):
            value = value[:, :, None, None]
        ldm_state[diffusers_key_to_ldm(key, num_levels)] = value
    return ldm_state


def ldm_state_dict_to_diffusers(state: Mapping[str, Tensor], autoencoder: AutoencoderKL) -> dict[str, Tensor]:
    """An LDM first-stage state dict under `autoencoder`'s names, 1x1 attention convs as linear weights.
    Raises KeyError naming the missing and unexpected LDM keys unless the two match exactly."""
    num_levels = len(autoencoder.config.block_out_channels)
    targets = autoencoder.state_dict()
    ldm_to_diffusers = {diffusers_key_to_ldm(key, num_levels): key for key in targets}
    missing = sorted(set(ldm_to_diffusers) - set(state))
    unexpected = sorted(set(state) - set(ldm_to_diffusers))
    if missing or unexpected:
        raise KeyError(
            f"LDM first-stage keys do not match the autoencoder: {len(missing)} missing {missing[:20]}, "
            f"{len(unexpected)} unexpected {unexpected[:20]}"
        )
    converted = {}
    for ldm_key, key in ldm_to_diffusers.items():
        value = state[ldm_key]
        if value.ndim == 4 and targets[key].ndim == 2:
            value = value.reshape(value.shape[0], value.shape[1])
        if value.shape != targets[key].shape:
            raise ValueError(f"{ldm_key}: shape {tuple(value.shape)}, expected {tuple(targets[key].shape)}")
        converted[key] = value
    return converted


def _check_clip(tensor: Tensor, name: str, channels: int) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 5 or tensor.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, F, H, W), got {tuple(tensor.shape)}")


def _frame_index(frame_indices: Sequence[int] | Tensor | None, batch: int, frames: int, device: torch.device) -> Tensor:
    """The (B, k) frame index of every clip that `frame_indices` selects: all frames when None, the same
    frames of every clip for a sequence of ints, each clip its own row for a (B, k) LongTensor."""
    if frame_indices is None:
        return torch.arange(frames, device=device).expand(batch, frames)
    if isinstance(frame_indices, Tensor):
        if frame_indices.dtype != torch.int64 or frame_indices.ndim != 2 or frame_indices.shape[0] != batch:
            raise ValueError(
                f"frame_indices as a tensor must be an int64 tensor of shape ({batch}, k), got "
                f"{frame_indices.dtype} {tuple(frame_indices.shape)}"
            )
        if frame_indices.shape[1] == 0:
            raise ValueError("frame_indices selects no frame")
        index = frame_indices.to(device)
        if turbo_kernels.checks.reads_values(index) and bool(((index < 0) | (index >= frames)).any()):
            raise ValueError(f"frame_indices must lie in [0, {frames}), got {index.tolist()}")
        return index
    if isinstance(frame_indices, (str, bytes)) or not all(isinstance(i, int) for i in frame_indices):
        raise TypeError(f"frame_indices must be a sequence of ints or a (B, k) LongTensor, got {frame_indices!r}")
    frame_indices = list(frame_indices)
    if not frame_indices:
        raise ValueError("frame_indices selects no frame")
    # Checked on the host, where the ints are: reading the device copy back would synchronise.
    if any(not 0 <= i < frames for i in frame_indices):
        raise ValueError(f"frame_indices must lie in [0, {frames}), got {frame_indices}")
    # From pinned memory the copy to a GPU need not wait for the work queued ahead of it.
    host = torch.tensor(frame_indices, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True).expand(batch, -1)


def _check_chunk_size(value: int, name: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _map_frames(
    function: Callable[[Tensor], Tensor],
    clips: Tensor,
    frame_index: Tensor,
    chunk_size: int,
    records_grad: bool,
    checkpointed: bool,
) -> Tensor:
    """function applied to the frames clips[b, :, frame_index[b, j]], `chunk_size` frames per call (chunks
    span clips), returned as (B, C', k, H', W').

    When autograd records (`records_grad`), the chunks' outputs are concatenated, each chunk optionally
    checkpointed; otherwise each chunk is written into one preallocated output, so peak memory is the
    output plus one chunk's activations."""
    batch, selected = frame_index.shape
    clip_of = torch.arange(batch, device=clips.device).repeat_interleave(selected)
    frame_of = frame_index.reshape(-1)
    slot_of = torch.arange(selected, device=clips.device).repeat(batch)
    outputs: list[Tensor] = []
    result: Tensor | None = None
    for start in range(0, batch * selected, chunk_size):
        rows = slice(start, start + chunk_size)
        chunk = clips[clip_of[rows], :, frame_of[rows]]
        if records_grad:
            output = turbo_kernels.checkpoint(function, chunk) if checkpointed else function(chunk)
            outputs.append(output)
            continue
        output = function(chunk)
        if result is None:
            result = output.new_empty((batch, output.shape[1], selected, *output.shape[2:]))
        result[clip_of[rows], :, slot_of[rows]] = output
    if records_grad:
        flat = torch.cat(outputs)
        return flat.reshape(batch, selected, *flat.shape[1:]).transpose(1, 2).contiguous()
    return result


class VideoVAE(nn.Module):
    """diffusers' AutoencoderKL applied per frame, frozen (eval, no parameter gradients) by default.

    `scaling_factor` multiplies posterior samples into the diffusion model's latent scale; `downsample`
    is the spatial factor between frames and latents. `use_kernels`: the ResNet blocks' and output
    layers' GroupNorm + SiLU run as one turbo_kernels.group_norm_silu (`turbo_kernels.patch` of the
    autoencoder), which dispatches to the kernels where the device has them; off, plain diffusers."""

    def __init__(
        self, config: Mapping[str, Any] | None = None, gradient_checkpointing: bool = False, use_kernels: bool = False
    ):
        super().__init__()
        config = dict(LDM_CONFIG if config is None else config)
        self.autoencoder = AutoencoderKL(**config)
        self.autoencoder.requires_grad_(False)
        self.gradient_checkpointing = gradient_checkpointing
        self.use_kernels = use_kernels
        self.scaling_factor = float(self.autoencoder.config.scaling_factor)
        self.latent_channels: int = self.autoencoder.config.latent_channels
        self.downsample: int = 2 ** (len(self.autoencoder.config.block_out_channels) - 1)
        self.eval()

    @classmethod
    def preset(cls, name: str, gradient_checkpointing: bool = False, use_kernels: bool = False) -> VideoVAE:
        """A randomly initialised VAE: "ldm" (VideoCrafter2's first stage) or "tiny" (for tests)."""
        if name not in PRESETS:
            raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(PRESETS[name], gradient_checkpointing=gradient_checkpointing, use_kernels=use_kernels)

    @property
    def use_kernels(self) -> bool:
        return self._use_kernels

    @use_kernels.setter
    def use_kernels(self, value: bool) -> None:
        self._use_kernels = bool(value)
        if self._use_kernels:
            turbo_kernels.patch(self.autoencoder)
        else:
            turbo_kernels.unpatch(self.autoencoder)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.autoencoder.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.autoencoder.dtype

    @property
    def device(self) -> torch.device:
        return self.autoencoder.device

    def _records_grad(self, inputs: Tensor) -> bool:
        return torch.is_grad_enabled() and (inputs.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _posterior_moments(self, frames: Tensor) -> Tensor:
        """(mean, std) of the posterior of (N, 3, H, W) frames, concatenated on channels."""
        posterior = self.autoencoder.encode(frames.to(self.dtype)).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1)

    def _decode_frames(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents.to(self.dtype) / self.scaling_factor).sample

    def encode(
        self, frames: Tensor, generator: torch.Generator | None = None, sample: bool = True, chunk_size: int = 8
    ) -> Tensor:
        """(B, 3, F, H, W) frames in [-1, 1] -> (B, C, F, H/d, W/d) scaled latents, d = downsample: a
        posterior sample (mean when sample=False) times scaling_factor. The noise of the whole batch is
        drawn at once, so a seeded generator gives the same latents for any chunk_size."""
        _check_clip(frames, "frames", 3)
        _check_chunk_size(chunk_size, "chunk_size")
        height, width = frames.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"frames' height and width must be multiples of {self.downsample}, got {height}x{width}")
        batch, _, num_frames = frames.shape[:3]
        frame_index = _frame_index(None, batch, num_frames, frames.device)
        moments = _map_frames(
            self._posterior_moments,
            frames,
            frame_index,
            chunk_size,
            self._records_grad(frames),
            self.gradient_checkpointing,
        )
        mean, std = moments.chunk(2, dim=1)
        if not sample:
            return mean * self.scaling_factor
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise) * self.scaling_factor

    def decode(
        self,
        latents: Tensor,
        decode_chunk_size: int = 8,
        frame_indices: Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """(B, C, F, h, w) scaled latents -> (B, 3, F', d·h, d·w) frames in [-1, 1] (not clamped), F' = F or
        the number of frames `frame_indices` selects (ints: the same frames of every clip; a (B, k)
        LongTensor: per clip). Differentiable with respect to `latents`."""
        _check_clip(latents, "latents", self.latent_channels)
        _check_chunk_size(decode_chunk_size, "decode_chunk_size")
        batch, _, num_frames = latents.shape[:3]
        frame_index = _frame_index(frame_indices, batch, num_frames, latents.device)
        return _map_frames(
            self._decode_frames,
            latents,
            frame_index,
            decode_chunk_size,
            self._records_grad(latents),
            self.gradient_checkpointing,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes diffusers' AutoencoderKL format (config.json + diffusion_pytorch_model.safetensors); each
        file is written to a temporary directory beside it, then moved into place."""
        write_files_atomically(
            Path(directory), lambda staging: self.autoencoder.save_pretrained(staging, safe_serialization=True)
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, gradient_checkpointing: bool = False) -> VideoVAE:
        """The VAE save_pretrained (or diffusers) wrote in `directory`, read from local files only."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"directory {directory} holds no {CONFIG_NAME}")
        try:
            autoencoder = AutoencoderKL.from_pretrained(directory, local_files_only=True)
        # diffusers reports a missing, truncated or foreign weights file as an OSError.
        except OSError as error:
            raise ValueError(f"{directory}: not a readable VAE directory ({error})") from None
        with torch.device("meta"):
            vae = cls(autoencoder.config, gradient_checkpointing=gradient_checkpointing)
        # use_kernels is off: the autoencoder replaced here is unpatched.
        vae.autoencoder = autoencoder.requires_grad_(False).eval()
        return vae

    @classmethod
    def from_original_checkpoint(
        cls, path: str | os.PathLike, preset: str = "ldm", gradient_checkpointing: bool = False
    ) -> VideoVAE:
        """The first stage of a VideoCrafter2 release checkpoint (its `first_stage_model.*` keys, or a
        bare LDM autoencoder state dict), loaded strictly into the `preset` configuration."""
        state = read_checkpoint(path)
        if any(key.startswith(FIRST_STAGE_PREFIX) for key in state):
            state = {
                key.removeprefix(FIRST_STAGE_PREFIX): value
                for key, value in state.items()
                if key.startswith(FIRST_STAGE_PREFIX)
            }
        else:
            state = {key: value for key, value in state.items() if not key.startswith(LOSS_PREFIX)}
        with torch.device("meta"):
            vae = cls.preset(preset, gradient_checkpointing=gradient_checkpointing)
        try:
            converted = ldm_state_dict_to_diffusers(state, vae.autoencoder)
        except KeyError as error:
            raise KeyError(f"{path}: {error.args[0]}") from None
        vae.autoencoder.load_state_dict(converted, assign=True)
        vae.autoencoder.requires_grad_(False)
        return vae


class PixelSpace(nn.Module):
    """The VideoVAE interface for models that diffuse pixels: encode and decode are the identity (decode
    still selects frames), scaling_factor 1, 3 latent channels, no downsampling."""

    scaling_factor = 1.0
    latent_channels = 3
    downsample = 1

    def encode(
        self, frames: Tensor, generator: torch.Generator | None = None, sample: bool = True, chunk_size: int = 8
    ) -> Tensor:
        """The frames themselves; generator, sample and chunk_size are accepted for interface parity."""
        _check_clip(frames, "frames", 3)
        return frames

    def decode(
        self, latents: Tensor, decode_chunk_size: int = 8, frame_indices: Sequence[int] | Tensor | None = None
    ) -> Tensor:
        """The latents themselves, restricted to `frame_indices` as VideoVAE.decode does."""
        _check_clip(latents, "latents", 3)
        if frame_indices is None:
            return latents
        batch, _, num_frames = latents.shape[:3]
        frame_index = _frame_index(frame_indices, batch, num_frames, latents.device)
        gather_index = frame_index[:, None, :, None, None].expand(-1, 3, -1, *latents.shape[-2:])
        return latents.gather(2, gather_index)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = json.dumps({"kind": PIXEL_KIND}, indent=2) + "\n"
        write_atomically(directory / CONFIG_NAME, lambda temporary: temporary.write_text(config))


def load_vae(directory: str | os.PathLike, gradient_checkpointing: bool = False) -> VideoVAE | PixelSpace:
    """The VideoVAE or PixelSpace that save_pretrained wrote in `directory`."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"directory {directory} holds no {CONFIG_NAME}")
    config = read_json_file(path)
    if config.get("kind") == PIXEL_KIND:
        return PixelSpace()
    if config.get("_class_name") == DIFFUSERS_CLASS_NAME:
        return VideoVAE.from_pretrained(directory, gradient_checkpointing=gradient_checkpointing)
    raise ValueError(f"{path}: neither a pixel-space config nor a diffusers {DIFFUSERS_CLASS_NAME} config")
