"""Image-text rewards: OpenCLIP models scoring single frames against a caption (SPEC 5).

T2V-Turbo-v2 scores decoded frames with two OpenCLIP ViT-H/14 models that differ only in their
weights and preprocessing: HPSv2.1 (letterboxed to 224 on the long side, zero-padded, then CLIP
mean/std) and CLIP laion2B-s32B-b79K (bicubic squash to 224x224, CLIP mean/std). `OpenCLIPReward`
wraps any open_clip architecture, named (a built-in config such as "ViT-H-14") or given as a
config dict (tiny test models), with weights from a local .pt/.pth/.bin/.ckpt (weights_only) or
.safetensors file; HPSv2.1's checkpoint nests them under 'state_dict'. Its score is the cosine of
the L2-normalised image and text features, as the release computes it (logit scale optional).
Nothing is fetched from the network: vision towers are open_clip's own or timm's (built without
pretrained weights); text towers are open_clip's own, tokenised by open_clip's BPE tokenizer
unless the architecture names a Hugging Face tokenizer, which the caller then passes in.

The preprocessing itself is `turbo_kernels.reward_preprocess`, run by the mixture for every model
at once; `hpsv2_spec`, `clip_spec` and `video_spec` are the release's pipelines as PreprocessSpecs
(shared/reward_reference/README.md, section 1).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from t2v_turbo.rewards.base import RewardModel, l2_normalize
from t2v_turbo.rewards.internvideo2 import read_state_dict_file
from turbo_kernels import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from turbo_kernels import OPENAI_CLIP_MEAN as CLIP_MEAN
from turbo_kernels import OPENAI_CLIP_STD as CLIP_STD

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "OpenCLIPReward", "clip_spec", "hpsv2_spec",
           "video_spec"]

# Checkpoints saved from a DistributedDataParallel wrapper carry this prefix on every key.
DDP_PREFIX = "module."
RELEASE_IMAGE_SIZE = 224
# captions -> (len(captions), context_length) integer token ids, as open_clip's tokenizers are called.
Tokenizer = Callable[[list[str]], Tensor]


def hpsv2_spec(size: int = RELEASE_IMAGE_SIZE) -> PreprocessSpec:
    """HPSv2.1's ResizeMaxSize + Normalize: longest side to `size` (bicubic, antialias), centred
    zero pad to size x size before normalising with CLIP mean/std."""
    return PreprocessSpec(size, "pad", interpolation="bicubic", antialias=True, mean=CLIP_MEAN, std=CLIP_STD)


def clip_spec(size: int = RELEASE_IMAGE_SIZE) -> PreprocessSpec:
    """CLIP ViT-H-14's Resize((size, size)) + Normalize: an aspect-distorting bicubic squash."""
    return PreprocessSpec(size, "squash", interpolation="bicubic", antialias=True, mean=CLIP_MEAN, std=CLIP_STD)


def video_spec(size: int = RELEASE_IMAGE_SIZE, crop_offset: tuple[int, int] | None = None) -> PreprocessSpec:
    """The video rewards' ResizeCropMinSize + ViCLIP_NORMALIZE: shortest side to `size` (bicubic,
    antialias), one size x size crop for every frame (centred, or at `crop_offset` = (top, left) as
    the release's RandomCrop draws it), ImageNet mean/std."""
    return PreprocessSpec(
        size, "crop", interpolation="bicubic", antialias=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        crop_offset=crop_offset,
    )


def _model_config(architecture: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(architecture, str):
        config = open_clip.get_model_config(architecture)
        if config is None:
            raise ValueError(
                f"architecture {architecture!r} is not a built-in open_clip config; pass a config dict "
                f"(embed_dim, vision_cfg, text_cfg) instead"
            )
        return config
    if not isinstance(architecture, Mapping):
        raise TypeError(f"architecture must be an open_clip model name or a config dict, got {type(architecture).__name__}")
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in architecture]
    if missing:
        raise ValueError(f"architecture config lacks {missing} (open_clip needs embed_dim, vision_cfg, text_cfg)")
    return copy.deepcopy(dict(architecture))


def _check_supported(config: Mapping[str, Any], architecture: str) -> None:
    """Refuses what this package cannot build offline or score with: timm vision towers build
    offline unless told to load timm's pretrained weights; a Hugging Face text tower reads its
    model config from the hub; CoCa models need a class of their own."""
    if "multimodal_cfg" in config:
        raise ValueError(f"architecture {architecture!r} is a CoCa model (it has a multimodal_cfg); CoCa is not supported")
    if config["text_cfg"].get("hf_model_name"):
        raise ValueError(
            f"architecture {architecture!r} has a Hugging Face text tower (text_cfg.hf_model_name="
            f"{config['text_cfg']['hf_model_name']!r}), which fetches its model config from the Hugging Face hub; "
            "only open_clip's own text tower is supported"
        )
    if config["vision_cfg"].get("timm_model_pretrained"):
        raise ValueError(
            f"architecture {architecture!r} sets vision_cfg.timm_model_pretrained, which would download timm's "
            "pretrained weights; set it to False and load the weights with from_weights"
        )


def _build_clip(config: Mapping[str, Any]) -> nn.Module:
    """The open_clip model class create_model would pick for this config, with random weights."""
    config = copy.deepcopy(dict(config))
    custom_text = config.pop("custom_text", False)
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return model_class(**config)


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)


class OpenCLIPReward(RewardModel):
    """An open_clip model as a frozen image-text reward: embed_visual = encode_image, embed_text =
    the architecture's tokenizer + encode_text, both L2-normalised; score = their cosine, times
    exp(logit_scale) when `use_logit_scale` (the release leaves it off).

    `architecture`: a built-in open_clip model name ("ViT-H-14") or a config dict (embed_dim,
    vision_cfg, text_cfg, optional quick_gelu / custom_text ...). The vision tower may be open_clip's
    own or a timm model (vision_cfg.timm_model_name, built without timm's pretrained weights); the
    text tower must be open_clip's own (no text_cfg.hf_model_name); CoCa models are not supported.
    Weights are random; use `from_weights` to load a file.

    `tokenizer`: captions -> (len(captions), context_length) integer token ids, such as
    `open_clip.get_tokenizer(name)` returns where the tokenizer files are at hand. Without one,
    open_clip's BPE tokenizer (shipped with the package) at the architecture's context length and
    text_cfg.tokenizer_kwargs; an architecture whose text_cfg names a Hugging Face tokenizer
    (hf_tokenizer_name: "ViT-H-14-worldwide", "ViT-L-14-CLIPA", the SigLIP models) needs one,
    since this package never fetches from the hub."""

    kind = "image"
    num_frames = 1

    def __init__(
        self,
        architecture: str | Mapping[str, Any],
        use_logit_scale: bool = False,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(use_logit_scale, bool):
            raise TypeError(f"use_logit_scale must be a bool, got {type(use_logit_scale).__name__}")
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(f"tokenizer must be a callable from a list of captions to token ids, got {type(tokenizer).__name__}")
        self.architecture = architecture if isinstance(architecture, str) else "custom"
        self.config = _model_config(architecture)
        self.use_logit_scale = use_logit_scale
        _check_supported(self.config, self.architecture)
        text_cfg = self.config["text_cfg"]
        self.context_length = int(text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH))
        # Before the towers are built: a missing tokenizer fails fast, whatever the model's size.
        self.tokenizer = tokenizer if tokenizer is not None else self._bpe_tokenizer()
        self.clip = _build_clip(self.config)
        self.freeze()

    def _bpe_tokenizer(self) -> open_clip.SimpleTokenizer:
        """open_clip's BPE tokenizer (its vocabulary ships with the package: no download), set up as
        open_clip.get_tokenizer sets it up for this architecture."""
        text_cfg = self.config["text_cfg"]
        hf_tokenizer_name = text_cfg.get("hf_tokenizer_name")
        if hf_tokenizer_name:
            raise ValueError(
                f"architecture {self.architecture!r} tokenises with the Hugging Face tokenizer {hf_tokenizer_name!r}, "
                "which this package never fetches from the hub: pass tokenizer= (e.g. what open_clip.get_tokenizer "
                "returns for the architecture with that tokenizer's files available locally)"
            )
        return open_clip.SimpleTokenizer(context_length=self.context_length, **text_cfg.get("tokenizer_kwargs", {}))

    @classmethod
    def from_weights(
        cls,
        architecture: str | Mapping[str, Any],
        path: str | os.PathLike,
        use_logit_scale: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        tokenizer: Tokenizer | None = None,
    ) -> OpenCLIPReward:
        """The model with a local checkpoint's weights, loaded strictly, built without a random
        initialisation (on the meta device), in the checkpoint's dtype unless `dtype` is given;
        `tokenizer` as for the constructor."""
        state = read_state_dict_file(path)
        if state and all(key.startswith(DDP_PREFIX) for key in state):
            state = {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}
        with torch.device("meta"):
            model = cls(architecture, use_logit_scale=use_logit_scale, tokenizer=tokenizer)
        try:
            model.clip.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as error:
            raise KeyError(f"{path}: the weights do not match the open_clip model: {error}") from None
        model._materialize_causal_masks()
        return model.to(device=device, dtype=dtype).freeze()

    def _materialize_causal_masks(self) -> None:
        """open_clip keeps the text tower's additive causal mask as its only non-persistent buffer,
        so loading a state dict onto a meta-built model leaves it unset: rebuild it."""
        reference = self.clip.logit_scale
        for module in self.clip.modules():
            mask = module._buffers.get("attn_mask")
            if mask is not None and mask.is_meta:
                module._buffers["attn_mask"] = _causal_mask(mask.shape[-1], reference.dtype, reference.device)
        left_on_meta = [name for name, tensor in self.state_dict(keep_vars=True).items() if tensor.is_meta]
        left_on_meta += [name for name, tensor in self.named_buffers() if tensor.is_meta]
        if left_on_meta:
            raise KeyError(f"the weights leave {len(left_on_meta)} tensors unset: {left_on_meta[:20]}")

    @property
    def image_size(self) -> int:
        size = self.config["vision_cfg"].get("image_size", RELEASE_IMAGE_SIZE)
        if not isinstance(size, int):
            raise TypeError(f"non-square image_size {size} is not supported: the reward specs are square")
        return size

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.logit_scale.dtype

    @property
    def gradient_checkpointing(self) -> bool:
        # Where the switch lives depends on the tower: open_clip's ViT holds it on its transformer,
        # a timm tower on its trunk or on each of the trunk's stages.
        return any(getattr(module, "grad_checkpointing", False) for module in self.clip.visual.modules())

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each vision block in the backward pass instead of storing its activations."""
        if enabled and not self.supports_block_checkpointing:
            raise ValueError(f"{self.architecture}: its {type(self.clip.visual).__name__} vision tower has no gradient "
                             "checkpointing (a RewardMixture checkpoints such a model's whole call instead)")
        self.clip.visual.set_grad_checkpointing(bool(enabled))

    @property
    def supports_block_checkpointing(self) -> bool:
        """Whether the vision tower has block checkpoints: open_clip's ViT and timm trunks do (a
        grad_checkpointing flag); its ModifiedResNet (the RN* architectures) takes the switch and
        ignores it."""
        return any(hasattr(module, "grad_checkpointing") for module in self.clip.visual.modules())

    def embed_visual(self, pixels: Tensor) -> Tensor:
        """(N, 3, S, S) preprocessed images -> (N, embed_dim) normalised image features, in the model
        dtype; differentiable with respect to `pixels`."""
        if not isinstance(pixels, Tensor) or not pixels.is_floating_point():
            raise TypeError(f"pixels must be a floating-point torch.Tensor, got {type(pixels).__name__}")
        size = self.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must have shape (N, 3, {size}, {size}), got {tuple(pixels.shape)}")
        return l2_normalize(self.clip.encode_image(pixels.to(self.dtype)))

    def embed_text(self, captions: Sequence[str]) -> Tensor:
        """(len(captions), embed_dim) normalised text features, without gradients."""
        if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
            raise TypeError("captions must be a sequence of strings")
        if len(captions) == 0:
            raise ValueError("captions must hold at least one caption")
        tokens = self.tokenizer(list(captions))
        expected = (len(captions), self.context_length)
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int32, torch.int64) or tokens.shape != expected:
            got = f"shape {tuple(tokens.shape)}, dtype {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokenizer must return a {expected} tensor of token ids for {len(captions)} captions, got {got}")
        tokens = tokens.to(self.clip.logit_scale.device)
        with torch.no_grad():
            return l2_normalize(self.clip.encode_text(tokens))

    def score(self, pixels: Tensor, text_embeddings: Tensor) -> Tensor:
        """(N,) cosine of each image with its text row (times exp(logit_scale) if use_logit_scale)."""
        cosine = super().score(pixels, text_embeddings)
        return cosine * self.clip.logit_scale.exp() if self.use_logit_scale else cosine

    def extra_repr(self) -> str:
        return f"architecture={self.architecture}, config={json.dumps(self.config, sort_keys=True)}"
