"""ViCLIP-L (8 frames, 224 px, CLIP text tower): T2V-Turbo-v2's alternative video-text reward.

Written from the release's behaviour as shared/reward_reference/README.md (section 2) records it.
Module names reproduce the release reward model's state-dict keys, so its checkpoint's `model` entry
loads as it is; the unused temperature `temp` is checked for shape on loading and then dropped.

Vision: a Conv3d with a (1, p, p) kernel patchifies every frame; each frame's tokens get the spatial
`positional_embedding` (CLS included), the patch tokens also the per-frame `temporal_positional_embedding`;
the patch tokens are laid out patch-major, time-minor (`b (n t)`) behind one CLS token, then `ln_pre`,
pre-LN blocks (multi-head attention, QuickGELU MLP), `ln_post` of the CLS row and `@ proj`.
Text: token + position embedding, causally masked pre-LN blocks, `ln_final`, the row of the EOT token
(the largest id) `@ text_projection`; the context is 32 tokens of the OpenAI CLIP BPE.
Score: cosine of the L2-normalised embeddings (the temperature is never used).

Numerics: the release casts the video embedding with `.float()` before normalising. Here both
embeddings are normalised in at least float32: the same as the release for float32 and half-precision
weights, while float64 weights stay float64 (the reference data's `*_pure_f64` outputs).
The model is frozen: gradients reach the input frames only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from t2v_turbo.rewards.base import RewardModel, VisionTextConfig, l2_normalize
from t2v_turbo.rewards.internvideo2 import read_state_dict_file

# Stored by the release (the contrastive temperature), never used by its reward.
UNUSED_KEY_SHAPES: dict[str, tuple[int, ...]] = {"temp": ()}
QUICK_GELU_SLOPE = 1.702


@dataclass(frozen=True)
class ViCLIPConfig(VisionTextConfig):
    """Sizes of the reward model; `from_release_hparams` maps the release's constructor arguments
    (`VisionTransformer`, `CLIP_TEXT`) onto these fields."""

    image_size: int = 224
    patch_size: int = 14
    num_frames: int = 8
    in_channels: int = 3
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    text_context_length: int = 32
    text_vocab_size: int = 49408
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    embed_dim: int = 768
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self._check_sizes([(self.vision_width, self.vision_heads, "vision_heads"), (self.text_width, self.text_heads, "text_heads")])
        for name in ("num_frames", "vision_layers", "text_layers", "text_context_length", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @classmethod
    def from_release_hparams(cls, vision: Mapping[str, Any], text: Mapping[str, Any]) -> ViCLIPConfig:
        """From the release's `VisionTransformer` keyword arguments (input_resolution, patch_size, width,
        layers, heads, output_dim, kernel_size, num_frames) and `CLIP_TEXT`'s (embed_dim, context_length,
        vocab_size, transformer_width, transformer_heads, transformer_layers)."""
        if vision.get("kernel_size", 1) != 1:
            raise ValueError(f"vision kernel_size={vision['kernel_size']} is not supported (the reward uses 1)")
        if vision["output_dim"] != text["embed_dim"]:
            raise ValueError(
                f"vision output_dim={vision['output_dim']} differs from text embed_dim={text['embed_dim']}; "
                "the cosine needs one embedding space"
            )
        return cls(
            image_size=vision["input_resolution"],
            patch_size=vision["patch_size"],
            num_frames=vision["num_frames"],
            vision_width=vision["width"],
            vision_layers=vision["layers"],
            vision_heads=vision["heads"],
            text_context_length=text["context_length"],
            text_vocab_size=text["vocab_size"],
            text_width=text["transformer_width"],
            text_layers=text["transformer_layers"],
            text_heads=text["transformer_heads"],
            embed_dim=text["embed_dim"],
        )


VICLIP_L: dict[str, Any] = dataclasses.asdict(ViCLIPConfig())
TINY: dict[str, Any] = {
    **VICLIP_L,
    "image_size": 56,
    "vision_width": 32,
    "vision_layers": 2,
    "vision_heads": 2,
    "text_width": 16,
    "text_layers": 2,
    "text_heads": 2,
    "embed_dim": 24,
}
PRESETS: dict[str, dict[str, Any]] = {"viclip-l": VICLIP_L, "tiny": TINY}
ViCLIPConfig.presets = PRESETS


def _random(*shape: int, std: float) -> nn.Parameter:
    """N(0, std²) parameter, left uninitialised on the meta device: there the first normal_ or
    arithmetic call takes a path costing seconds, and meta models only ever receive checkpoint weights."""
    weight = torch.empty(*shape)
    if not weight.is_meta:
        nn.init.normal_(weight, std=std)
    return nn.Parameter(weight)


class SelfAttention(nn.Module):
    """Multi-head self-attention keyed as torch.nn.MultiheadAttention (packed in_proj, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = _random(3 * width, width, std=width**-0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        """(B, N, width) -> (B, N, width); `causal`: token i attends to tokens 0..i only."""
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).flatten(-2))


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.c_fc(x)
        return self.c_proj(hidden * torch.sigmoid(QUICK_GELU_SLOPE * hidden))


class ResidualAttentionBlock(nn.Module):
    """x += attn(ln_1(x)); x += mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, eps: float):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, eps: float, causal: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, eps) for _ in range(layers))
        self.causal = causal
        self.gradient_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, width), batch-first."""
        for block in self.resblocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, self.causal)
        return x


class ViCLIPVisionEncoder(nn.Module):
    """The release's ViCLIP `VisionTransformer` at test time (no masking)."""

    def __init__(self, config: ViCLIPConfig):
        super().__init__()
        width, scale = config.vision_width, config.vision_width**-0.5
        patch = (1, config.patch_size, config.patch_size)
        self.conv1 = nn.Conv3d(config.in_channels, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = _random(width, std=scale)
        self.positional_embedding = _random(config.grid_size**2 + 1, width, std=scale)
        self.temporal_positional_embedding = nn.Parameter(torch.zeros(1, config.num_frames, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = Transformer(width, config.vision_layers, config.vision_heads, config.layer_norm_eps, False)
        self.ln_post = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.proj = _random(width, config.embed_dim, std=scale)

    def tokens(self, frames: Tensor) -> Tensor:
        """(B, T, C, H, W) -> (B, 1 + N·T, width) after ln_pre: CLS, then patch n of frame t at 1 + n·T + t."""
        patches = self.conv1(frames.transpose(1, 2))  # (B, width, T, h, w)
        patches = patches.flatten(3).permute(0, 3, 2, 1)  # (B, N, T, width)
        # The release adds the spatial embedding first, then the temporal one (patch tokens only).
        patches = patches + self.positional_embedding[1:, None] + self.temporal_positional_embedding
        cls = (self.class_embedding + self.positional_embedding[0]).expand(patches.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, patches.flatten(1, 2)], dim=1))

    def forward(self, frames: Tensor) -> Tensor:
        """(B, T, C, H, W) -> (B, embed_dim): ln_post of the CLS row, @ proj."""
        return self.ln_post(self.transformer(self.tokens(frames))[:, 0]) @ self.proj


class ViCLIPTextEncoder(nn.Module):
    """The release's `CLIP_TEXT`: a causal CLIP text transformer pooled at the EOT token."""

    def __init__(self, config: ViCLIPConfig):
        super().__init__()
        width = config.text_width
        self.token_embedding = nn.Embedding(
            config.text_vocab_size, width, _weight=_random(config.text_vocab_size, width, std=0.02)
        )
        self.positional_embedding = _random(config.text_context_length, width, std=0.01)
        self.transformer = Transformer(width, config.text_layers, config.text_heads, config.layer_norm_eps, True)
        self.ln_final = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.text_projection = _random(width, config.embed_dim, std=width**-0.5)

    def hidden(self, token_ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, text_width) after ln_final. Trailing padding may be cut (L below the
        context length): under the causal mask it does not change the tokens before it."""
        x = self.token_embedding(token_ids) + self.positional_embedding[: token_ids.shape[1]]
        return self.ln_final(self.transformer(x))

    def forward(self, token_ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, embed_dim): the row of each sequence's largest id (EOT) @ text_projection."""
        hidden = self.hidden(token_ids)
        eot = hidden[torch.arange(hidden.shape[0], device=hidden.device), token_ids.argmax(dim=-1)]
        return eot @ self.text_projection


@functools.cache
def clip_tokenizer(context_length: int) -> Any:
    """open_clip's OpenAI CLIP BPE tokenizer (the same vocabulary file as the release's vendored one),
    padding / truncating to `context_length` with the last id forced to EOT, as the release does."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def release_key_shapes(config: ViCLIPConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the release reward model's state dict with its shape, `temp` included."""
    with torch.device("meta"):
        held = ViCLIPReward(config).state_dict()
    return {key: tuple(value.shape) for key, value in held.items()} | UNUSED_KEY_SHAPES


class ViCLIPReward(RewardModel):
    """ViCLIP's video and text towers, frozen, in eval mode.

    `embed_visual` / `embed_video` take frames already preprocessed as the release does (short side to
    224, one shared 224 crop, ImageNet mean/std), laid out (B, T, 3, H, W) with T = config.num_frames.
    """

    kind: ClassVar[str] = "video"

    def __init__(self, config: ViCLIPConfig | None = None):
        super().__init__()
        self.config = config or ViCLIPConfig()
        self.vision_encoder = ViCLIPVisionEncoder(self.config)
        self.text_encoder = ViCLIPTextEncoder(self.config)
        self.freeze()

    @property
    def num_frames(self) -> int:  # type: ignore[override]
        return self.config.num_frames

    @property
    def image_size(self) -> int:  # type: ignore[override]
        return self.config.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_encoder.conv1.weight.dtype

    @property
    def gradient_checkpointing(self) -> bool:
        return self.vision_encoder.transformer.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each vision block in the backward pass instead of storing its activations."""
        self.vision_encoder.transformer.gradient_checkpointing = bool(enabled)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        config: ViCLIPConfig | str = "viclip-l",
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        strict: bool = True,
    ) -> ViCLIPReward:
        """The model with the weights of a .safetensors file or a torch pickle (weights_only; the state
        dict may be nested under 'model' as in the release's checkpoint, 'state_dict' or 'module'),
        built without a random initialisation, in the checkpoint's dtype unless `dtype` is given."""
        if isinstance(config, str):
            config = ViCLIPConfig.preset(config)
        state = read_state_dict_file(path)
        with torch.device("meta"):
            model = cls(config)
        try:
            model.load_original_state_dict(state, strict=strict, assign=True)
        except (KeyError, ValueError) as error:
            raise type(error)(f"{path}: {error.args[0]}") from None
        left_on_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
        if left_on_meta:
            raise KeyError(f"{path}: the checkpoint lacks {len(left_on_meta)} tensors: {left_on_meta[:20]}")
        return model.to(device=device, dtype=dtype).freeze()

    def load_original_state_dict(
        self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False
    ) -> None:
        """Loads the release reward model's state dict (keys as `release_key_shapes` lists them); `temp`
        is shape-checked and dropped. With `strict`, any missing or unexpected key raises a KeyError
        naming them; a shape mismatch always raises a ValueError."""
        held = self.state_dict()
        expected = {key: tuple(value.shape) for key, value in held.items()} | UNUSED_KEY_SHAPES
        missing = sorted(key for key in held if key not in state_dict)
        unexpected = sorted(key for key in state_dict if key not in expected)
        if strict and (missing or unexpected):
            raise KeyError(
                f"state dict does not match ViCLIPReward: {len(missing)} missing {missing[:20]}, "
                f"{len(unexpected)} unexpected {unexpected[:20]}"
            )
        wrong_shapes = [
            f"{key}: expected {expected[key]}, got {tuple(value.shape)}"
            for key, value in state_dict.items()
            if key in expected and tuple(value.shape) != expected[key]
        ]
        if wrong_shapes:
            raise ValueError(f"{len(wrong_shapes)} tensors have the wrong shape: {wrong_shapes[:20]}")
        self.load_state_dict({key: state_dict[key] for key in held if key in state_dict}, strict=strict, assign=assign)
        if assign:
            self.freeze()

    def _check_frames(self, frames: Tensor) -> None:
        config = self.config
        if not isinstance(frames, Tensor):
            raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
        if not frames.is_floating_point():
            raise TypeError(f"frames must be a floating-point tensor, got {frames.dtype}")
        expected = (config.num_frames, config.in_channels, config.image_size, config.image_size)
        if frames.ndim != 5 or tuple(frames.shape[1:]) != expected or frames.shape[0] == 0:
            raise ValueError(
                f"frames must have shape (B, {', '.join(map(str, expected))}) = (clips, frames, channels, "
                f"height, width), preprocessed to {config.image_size} px; got {tuple(frames.shape)}"
            )

    def embed_video(self, frames: Tensor, normalize: bool = True) -> Tensor:
        """(B, T, 3, H, W) preprocessed frames -> (B, embed_dim) video embeddings, differentiable with
        respect to `frames`; in at least float32 and L2-normalised unless `normalize` is False (then
        in the model dtype)."""
        self._check_frames(frames)
        embedding = self.vision_encoder(frames.to(self.dtype))
        return l2_normalize(_at_least_float32(embedding)) if normalize else embedding

    def embed_visual(self, pixels: Tensor) -> Tensor:
        """(B, T, 3, H, W) preprocessed frames -> (B, embed_dim), L2-normalised."""
        return self.embed_video(pixels)

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """(B, text_context_length) int64 ids: the release's CLIP BPE tokenisation."""
        if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
            raise TypeError("captions must be a list of strings")
        if len(captions) == 0:
            raise ValueError("captions is empty")
        return clip_tokenizer(self.config.text_context_length)(list(captions))

    def embed_text(self, text: Sequence[str] | Tensor, normalize: bool = True) -> Tensor:
        """Captions (a list of strings) or token ids (B, L) -> (B, embed_dim) text embeddings without
        gradient; in at least float32 and L2-normalised unless `normalize` is False (then in the model
        dtype). Ids pool at each row's largest id, which is EOT for the CLIP tokenizer's output."""
        token_ids = text if isinstance(text, Tensor) else self.tokenize(text)
        config = self.config
        if token_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token ids must be an int32/int64 tensor, got {token_ids.dtype}")
        if token_ids.ndim != 2 or token_ids.shape[0] == 0 or not 1 <= token_ids.shape[1] <= config.text_context_length:
            raise ValueError(
                f"token ids must have shape (B, L) with B >= 1 and 1 <= L <= {config.text_context_length}, "
                f"got {tuple(token_ids.shape)}"
            )
        if token_ids.min() < 0 or token_ids.max() >= config.text_vocab_size:
            raise ValueError(f"token ids must lie in [0, {config.text_vocab_size})")
        with torch.no_grad():
            embedding = self.text_encoder(token_ids.to(self.text_encoder.positional_embedding.device))
            return l2_normalize(_at_least_float32(embedding)) if normalize else embedding

    def score(self, pixels: Tensor, text_embeddings: Tensor) -> Tensor:
        """(B,) cosine of each clip's video embedding with its text embedding: `text_embeddings` is
        (B, embed_dim), or (1, embed_dim) / (embed_dim,) for one caption shared by every clip."""
        if not isinstance(text_embeddings, Tensor):
            raise TypeError(f"text_embeddings must be a torch.Tensor, got {type(text_embeddings).__name__}")
        dim = self.config.embed_dim
        if text_embeddings.ndim == 1:
            text_embeddings = text_embeddings[None]
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != dim:
            raise ValueError(f"text_embeddings must be (B, {dim}) or ({dim},), got {tuple(text_embeddings.shape)}")
        clips = pixels.shape[0] if isinstance(pixels, Tensor) and pixels.ndim == 5 else None
        if clips is not None and text_embeddings.shape[0] not in (1, clips):
            raise ValueError(
                f"text_embeddings has {text_embeddings.shape[0]} rows for {clips} clips (expected 1 or {clips})"
            )
        return super().score(pixels, text_embeddings)

    def forward(self, pixels: Tensor, text_embeddings: Tensor) -> Tensor:
        return self.score(pixels, text_embeddings)
