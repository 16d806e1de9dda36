"""InternVideo2-stage2 (1B/14, 224 px, 4 frames, BERT-large): T2V-Turbo-v2's default video-text reward.

Written from the release's behaviour as shared/reward_reference/README.md (section 3) records it.
Module names reproduce the release reward model's state-dict keys, so its weights load as they are;
the parts the reward never runs (the CLIP-distillation decoders and their position embeddings, the
image position embedding, BERT's cross-attention layers from `fusion_layer` on) are checked for shape
on loading and then dropped, so they cost no memory.

Vision: Conv3d patches (time-major tokens) + CLS + `pos_embed` -> pre-RMSNorm blocks (QK-norm,
LayerScale, no final norm) -> attention pooling with the mean token as query -> `vision_proj`.
Text: BERT layers 0..fusion_layer-1 with the additive (1 - mask) * -10000 mask -> CLS row ->
`text_proj`. Both embeddings are L2-normalised and the score is their dot product (plain cosine).

Numerics: RMSNorm and LayerScale compute in float32 for half inputs, as the release does, and in
float64 for float64 inputs (the reference data's `*_pure_f64` outputs). The MLP activation is a
configuration choice: exact-erf GELU (the release's plain PyTorch path, which produced the reference
data) or the tanh approximation (what its fused GPU path computes); the full preset uses tanh.
The model is frozen: gradients reach the input frames only.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from t2v_turbo.files import read_tensor_file
from t2v_turbo.rewards.base import RewardModel, VisionTextConfig

MLP_ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}
# The release's training checkpoint keeps the text tower under this prefix (BertForMaskedLM's `bert`);
# the reward model's own state dict has it under `text_encoder.` alone.
CHECKPOINT_TEXT_PREFIX = "text_encoder.bert."
TEXT_PREFIX = "text_encoder."
# The only parts of a training checkpoint the release's reward setup reads; it ignores the rest
# (temperature, ITM head, BERT's MLM head).
CHECKPOINT_PREFIXES = ("vision_encoder.", CHECKPOINT_TEXT_PREFIX, "vision_proj.", "text_proj.")
NESTED_STATE_KEYS = ("module", "model", "state_dict")
# BERT's additive attention-mask value for padded keys (in the model dtype, as the release forms it).
MASK_VALUE = -10000.0


@dataclass(frozen=True)
class InternVideo2Config(VisionTextConfig):
    """Sizes of the reward model; the field names are this module's, `from_release_hparams` maps the
    release's constructor arguments onto them."""

    image_size: int = 224
    patch_size: int = 14
    tubelet_size: int = 1
    num_frames: int = 4
    in_channels: int = 3
    vision_width: int = 1408
    vision_depth: int = 40
    vision_heads: int = 16
    mlp_hidden_dim: int = 6144
    mlp_activation: str = "gelu_tanh"
    qkv_bias: bool = False
    qk_normalization: bool = True
    layer_scale: bool = True
    rms_norm_eps: float = 1e-6
    pool_heads: int = 16
    pool_norm_eps: float = 1e-5
    vision_output_dim: int = 768
    sep_image_video_pos_embed: bool = True
    # Stored in the checkpoint, never run by the reward (key shapes only).
    clip_teacher_embed_dim: int = 3200
    clip_teacher_final_dim: int = 768
    clip_return_layer: int = 6
    text_vocab_size: int = 30522
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    text_intermediate_dim: int = 4096
    text_max_positions: int = 512
    text_type_vocab_size: int = 2
    text_layer_norm_eps: float = 1e-12
    text_fusion_layer: int = 19
    text_encoder_width: int = 1408
    text_max_length: int = 40
    pad_token_id: int = 0
    embed_dim: int = 512

    def __post_init__(self) -> None:
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation={self.mlp_activation!r}; expected one of {sorted(MLP_ACTIVATIONS)}")
        self._check_sizes([
            (self.vision_width, self.vision_heads, "vision_heads"),
            (self.vision_width, self.pool_heads, "pool_heads"),
            (self.text_width, self.text_heads, "text_heads"),
        ])
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"num_frames={self.num_frames} is not a multiple of tubelet_size={self.tubelet_size}")
        if not 1 <= self.text_fusion_layer <= self.text_layers:
            raise ValueError(f"text_fusion_layer={self.text_fusion_layer} must lie in [1, {self.text_layers}]")
        if not 1 <= self.text_max_length <= self.text_max_positions:
            raise ValueError(f"text_max_length={self.text_max_length} must lie in [1, {self.text_max_positions}]")

    @property
    def num_patches(self) -> int:
        return (self.num_frames // self.tubelet_size) * self.grid_size**2

    @classmethod
    def from_release_hparams(
        cls, vision: Mapping[str, Any], bert: Mapping[str, Any], embed_dim: int, **overrides: Any
    ) -> InternVideo2Config:
        """From the release's `PretrainInternVideo2` keyword arguments, its BERT config and `embed_dim`
        (the projections' output width). `overrides` set this class's fields directly (e.g.
        mlp_activation, text_max_length, which the release fixes outside these dictionaries)."""
        if vision.get("sep_pos_embed", False):
            raise ValueError("sep_pos_embed=True is not supported (the release raises NotImplementedError too)")
        embed = vision["embed_dim"]
        values = {
            "image_size": vision["img_size"],
            "patch_size": vision["patch_size"],
            "tubelet_size": vision.get("tubelet_size", 1),
            "num_frames": vision["num_frames"],
            "in_channels": vision.get("in_chans", 3),
            "vision_width": embed,
            "vision_depth": vision["depth"],
            "vision_heads": vision["num_heads"],
            # The release truncates: int(1408 * 48/11) = 6144, int(32 * 48/11) = 139.
            "mlp_hidden_dim": int(embed * vision["mlp_ratio"]),
            "qkv_bias": bool(vision.get("qkv_bias", False)),
            "qk_normalization": bool(vision.get("qk_normalization", True)),
            "layer_scale": bool(vision.get("init_values", 1e-5)),
            "pool_heads": vision["attn_pool_num_heads"],
            "vision_output_dim": vision["clip_embed_dim"],
            "sep_image_video_pos_embed": bool(vision.get("sep_image_video_pos_embed", False)),
            "clip_teacher_embed_dim": vision["clip_teacher_embed_dim"],
            "clip_teacher_final_dim": vision["clip_teacher_final_dim"],
            "clip_return_layer": vision["clip_return_layer"],
            "text_vocab_size": bert["vocab_size"],
            "text_width": bert["hidden_size"],
            "text_layers": bert["num_hidden_layers"],
            "text_heads": bert["num_attention_heads"],
            "text_intermediate_dim": bert["intermediate_size"],
            "text_max_positions": bert["max_position_embeddings"],
            "text_type_vocab_size": bert["type_vocab_size"],
            "text_layer_norm_eps": bert["layer_norm_eps"],
            "text_fusion_layer": bert["fusion_layer"],
            "text_encoder_width": bert["encoder_width"],
            "pad_token_id": bert.get("pad_token_id", 0),
            "embed_dim": embed_dim,
        }
        if bert.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"BERT hidden_act={bert['hidden_act']!r} is not supported (only 'gelu')")
        if bert.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute BERT position embeddings are supported")
        return cls.from_dict({**values, **overrides})


STAGE2_1B: dict[str, Any] = dataclasses.asdict(InternVideo2Config())
TINY: dict[str, Any] = {
    **STAGE2_1B,
    "image_size": 56,
    "vision_width": 32,
    "vision_depth": 3,
    "vision_heads": 2,
    "mlp_hidden_dim": 139,
    "mlp_activation": "gelu",
    "pool_heads": 2,
    "vision_output_dim": 24,
    "clip_teacher_embed_dim": 16,
    "clip_teacher_final_dim": 16,
    "clip_return_layer": 2,
    "text_vocab_size": 1024,
    "text_width": 32,
    "text_layers": 3,
    "text_heads": 2,
    "text_intermediate_dim": 64,
    "text_max_positions": 64,
    "text_fusion_layer": 2,
    "text_encoder_width": 32,
    "embed_dim": 16,
}
PRESETS: dict[str, dict[str, Any]] = {"stage2-1b": STAGE2_1B, "tiny": TINY}
InternVideo2Config.presets = PRESETS


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (the release's RMSNorm / LayerScale upcast), the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(_compute_dtype(x.dtype))
        normalized = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normalized.to(x.dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        wide = _compute_dtype(x.dtype)
        return (x.to(wide) * self.gamma.to(wide)).to(x.dtype)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, heads*d) -> (B, heads, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, d) -> (B, N, heads*d)."""
    return x.transpose(1, 2).flatten(-2)


class PatchEmbed(nn.Module):
    def __init__(self, config: InternVideo2Config):
        super().__init__()
        kernel = (config.tubelet_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.vision_width, kernel_size=kernel, stride=kernel)

    def forward(self, video: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, T'·H'·W', width), time-major."""
        return self.proj(video).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention; QK-norm is one RMSNorm over all heads of q (and of k)."""

    def __init__(self, config: InternVideo2Config):
        super().__init__()
        width = config.vision_width
        self.heads = config.vision_heads
        self.qkv = nn.Linear(width, 3 * width, bias=config.qkv_bias)
        self.proj = nn.Linear(width, width)
        if config.qk_normalization:
            self.q_norm = RMSNorm(width, config.rms_norm_eps)
            self.k_norm = RMSNorm(width, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(*(_split_heads(t, self.heads) for t in (q, k, v)))
        return self.proj(_merge_heads(out))


class Mlp(nn.Module):
    def __init__(self, config: InternVideo2Config):
        super().__init__()
        self.fc1 = nn.Linear(config.vision_width, config.mlp_hidden_dim)
        self.fc2 = nn.Linear(config.mlp_hidden_dim, config.vision_width)
        self.approximate = MLP_ACTIVATIONS[config.mlp_activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

    def __init__(self, config: InternVideo2Config):
        super().__init__()
        width = config.vision_width
        self.norm1 = RMSNorm(width, config.rms_norm_eps)
        self.attn = SelfAttention(config)
        self.ls1 = LayerScale(width) if config.layer_scale else nn.Identity()
        self.norm2 = RMSNorm(width, config.rms_norm_eps)
        self.mlp = Mlp(config)
        self.ls2 = LayerScale(width) if config.layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PoolingCrossAttention(nn.Module):
    """The pool's attention: bias-free q/k/v weights with separate bias vectors, as the release keys them."""

    def __init__(self, config: InternVideo2Config):
        super().__init__()
        width = config.vision_width
        self.heads = config.pool_heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.k_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, config.vision_output_dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        q = _split_heads(F.linear(query, self.q.weight, self.q_bias), self.heads)
        k = _split_heads(F.linear(key, self.k.weight, self.k_bias), self.heads)
        v = _split_heads(F.linear(value, self.v.weight, self.v_bias), self.heads)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class AttentionPool(nn.Module):
    """One query, the mean of all tokens (CLS included), attending over the tokens."""

    def __init__(self, config: InternVideo2Config):
        super().__init__()
        width, eps = config.vision_width, config.pool_norm_eps
        self.norm1_q = nn.LayerNorm(width, eps=eps)
        self.norm1_k = nn.LayerNorm(width, eps=eps)
        self.norm1_v = nn.LayerNorm(width, eps=eps)
        self.cross_attn = PoolingCrossAttention(config)

    def forward(self, tokens: Tensor) -> Tensor:
        query = self.norm1_q(tokens.mean(1, keepdim=True))
        pooled = self.cross_attn(query, self.norm1_k(tokens), self.norm1_v(tokens))
        return pooled.squeeze(1)


class InternVideo2VisionEncoder(nn.Module):
    """The reward's part of the release's PretrainInternVideo2 (video input, no masking)."""

    def __init__(self, config: InternVideo2Config):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.vision_width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.vision_depth))
        self.clip_projector = AttentionPool(config)
        self.gradient_checkpointing = False

    def tokens(self, frames: Tensor) -> Tensor:
        """(B, T, C, H, W) frames -> (B, 1 + T·H'·W', width): the last block's output (no final norm)."""
        x = self.patch_embed(frames.transpose(1, 2))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, frames: Tensor) -> Tensor:
        """(B, T, C, H, W) frames -> (B, vision_output_dim) pooled features."""
        return self.clip_projector(self.tokens(frames))


def _embedding(count: int, dim: int) -> nn.Embedding:
    """nn.Embedding with its usual N(0, 1) init, skipped on the meta device: there torch's normal_
    takes a first-call path costing ~10 s, and meta models only ever receive checkpoint weights."""
    weight = torch.empty(count, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(count, dim, _weight=weight)


class BertEmbeddings(nn.Module):
    def __init__(self, config: InternVideo2Config):
        super().__init__()
        width = config.text_width
        self.word_embeddings = _embedding(config.text_vocab_size, width)
        self.position_embeddings = _embedding(config.text_max_positions, width)
        self.token_type_embeddings = _embedding(config.text_type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=config.text_layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # token_type_ids are never passed by the reward, so they are all zero; the release sums in
        # this order: (word + token type) + position.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, config: InternVideo2Config):
        super().__init__()
        width = config.text_width
        self.heads = config.text_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))
        return _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask))


class BertResidualOutput(nn.Module):
    """dense, then LayerNorm(· + residual): BERT's `attention.output` and `output` modules."""

    def __init__(self, in_dim: int, config: InternVideo2Config):
        super().__init__()
        self.dense = nn.Linear(in_dim, config.text_width)
        self.LayerNorm = nn.LayerNorm(config.text_width, eps=config.text_layer_norm_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: InternVideo2Config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertResidualOutput(config.text_width, config)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        return self.output(self.self(x, additive_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: InternVideo2Config):
        super().__init__()
        self.dense = nn.Linear(config.text_width, config.text_intermediate_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: InternVideo2Config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config.text_intermediate_dim, config)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        attended = self.attention(x, additive_mask)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: InternVideo2Config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.text_fusion_layer))


class InternVideo2TextEncoder(nn.Module):
    """The release's BERT in mode="text": embeddings and the self-attention layers below fusion_layer."""

    def __init__(self, config: InternVideo2Config):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and 0/1 mask -> (B, L, text_width) last hidden state."""
        x = self.embeddings(input_ids)
        additive_mask = ((1.0 - attention_mask.to(x.dtype)) * MASK_VALUE)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, additive_mask)
        return x


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def release_key_shapes(config: InternVideo2Config) -> dict[str, tuple[int, ...]]:
    """Every key of the release reward model's state dict with its shape, including the parts the
    reward never runs (which InternVideo2Reward does not hold)."""
    with torch.device("meta"):
        held = InternVideo2Reward(config).state_dict()
    shapes = {key: tuple(value.shape) for key, value in held.items()}
    shapes.update(_unused_key_shapes(config))
    return shapes


def _unused_key_shapes(config: InternVideo2Config) -> dict[str, tuple[int, ...]]:
    """Keys stored by the release but never used by its reward: the CLIP-distillation heads, the
    image / CLIP position embeddings, BERT's position_ids buffer and its layers from fusion_layer on."""
    width, tokens = config.vision_width, config.num_patches + 1
    image_tokens = config.grid_size**2 + 1
    shapes: dict[str, tuple[int, ...]] = {"vision_encoder.clip_pos_embed": (1, tokens, width)}
    if config.sep_image_video_pos_embed:
        shapes["vision_encoder.img_pos_embed"] = (1, image_tokens, width)
        shapes["vision_encoder.clip_img_pos_embed"] = (1, image_tokens, width)

    def linear_decoder(prefix: str, in_dim: int, out_dim: int) -> None:
        shapes[f"{prefix}.head.weight"] = (out_dim, in_dim)
        for name in ("head.bias", "norm.weight", "norm.bias"):
            shapes[f"{prefix}.{name}"] = (out_dim,)

    for index in range(config.clip_return_layer):
        linear_decoder(f"vision_encoder.clip_decoder.{index}", width, config.clip_teacher_embed_dim)
    if config.clip_teacher_final_dim > 0:
        linear_decoder("vision_encoder.final_clip_decoder", config.vision_output_dim, config.clip_teacher_final_dim)

    text, hidden = config.text_width, config.text_intermediate_dim
    shapes[f"{TEXT_PREFIX}embeddings.position_ids"] = (1, config.text_max_positions)

    def linear(prefix: str, in_dim: int, out_dim: int) -> None:
        shapes[f"{prefix}.weight"] = (out_dim, in_dim)
        shapes[f"{prefix}.bias"] = (out_dim,)

    def layer_norm(prefix: str) -> None:
        shapes[f"{prefix}.weight"] = shapes[f"{prefix}.bias"] = (text,)

    for index in range(config.text_fusion_layer, config.text_layers):
        layer = f"{TEXT_PREFIX}encoder.layer.{index}"
        for attention, key_width in (("attention", text), ("crossattention", config.text_encoder_width)):
            linear(f"{layer}.{attention}.self.query", text, text)
            linear(f"{layer}.{attention}.self.key", key_width, text)
            linear(f"{layer}.{attention}.self.value", key_width, text)
            linear(f"{layer}.{attention}.output.dense", text, text)
            layer_norm(f"{layer}.{attention}.output.LayerNorm")
        linear(f"{layer}.intermediate.dense", text, hidden)
        linear(f"{layer}.output.dense", hidden, text)
        layer_norm(f"{layer}.output.LayerNorm")
    return shapes


def _bare_state_dict(checkpoint_object: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint, under 'module' / 'model' / 'state_dict' if nested."""
    state: Any = checkpoint_object
    while isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        nested = next((key for key in NESTED_STATE_KEYS if key in state), None)
        if nested is None:
            break
        state = state[nested]
    if not isinstance(state, Mapping):
        raise TypeError(f"the checkpoint holds a {type(state).__name__}, not a state dict")
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, Tensor))
    if not_tensors:
        raise TypeError(f"{len(not_tensors)} checkpoint entries are not tensors: {not_tensors[:20]}")
    return dict(state)


def _reward_part_of_training_checkpoint(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """What the release's reward setup reads from a training checkpoint, keyed as the reward model."""
    reward_part = {}
    for key, value in state.items():
        if key.startswith(CHECKPOINT_TEXT_PREFIX):
            reward_part[TEXT_PREFIX + key.removeprefix(CHECKPOINT_TEXT_PREFIX)] = value
        elif key.startswith(CHECKPOINT_PREFIXES):
            reward_part[key] = value
    return reward_part


def read_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of a .safetensors file or a torch pickle (.pt/.pth/.bin/.ckpt, weights_only);
    a file that cannot be read is a ValueError naming it."""
    return _bare_state_dict(read_tensor_file(path))


class InternVideo2Reward(RewardModel):
    """InternVideo2-stage2's video and text towers and their projections, frozen, in eval mode.

    `embed_video` / `embed_visual` take frames already preprocessed as the release does (short side to
    224, one shared 224 crop, ImageNet mean/std), laid out (B, T, 3, H, W) with T = config.num_frames.
    """

    kind: ClassVar[str] = "video"

    def __init__(self, config: InternVideo2Config | None = None, vocab_path: str | os.PathLike | None = None):
        super().__init__()
        self.config = config or InternVideo2Config()
        self.vision_encoder = InternVideo2VisionEncoder(self.config)
        self.text_encoder = InternVideo2TextEncoder(self.config)
        self.vision_proj = nn.Linear(self.config.vision_output_dim, self.config.embed_dim)
        self.text_proj = nn.Linear(self.config.text_width, self.config.embed_dim)
        self.tokenizer = None if vocab_path is None else load_tokenizer(vocab_path)
        self.requires_grad_(False)
        self.eval()

    @property
    def num_frames(self) -> int:  # type: ignore[override]
        return self.config.num_frames

    @property
    def image_size(self) -> int:  # type: ignore[override]
        return self.config.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_encoder.patch_embed.proj.weight.dtype

    @property
    def gradient_checkpointing(self) -> bool:
        return self.vision_encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each vision block in the backward pass instead of storing its activations."""
        self.vision_encoder.gradient_checkpointing = bool(enabled)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        config: InternVideo2Config | str = "stage2-1b",
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        vocab_path: str | os.PathLike | None = None,
        strict: bool = True,
    ) -> InternVideo2Reward:
        """The model with a checkpoint's weights (see load_original_state_dict), built without a
        random initialisation, in the checkpoint's dtype unless `dtype` is given."""
        if isinstance(config, str):
            config = InternVideo2Config.preset(config)
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
        if vocab_path is not None:
            model.tokenizer = load_tokenizer(vocab_path)
        return model.to(device=device, dtype=dtype).requires_grad_(False).eval()

    def load_original_state_dict(
        self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False
    ) -> None:
        """Loads the release reward model's state dict (its keys as `release_key_shapes` lists them),
        or a release training checkpoint's bare state dict (`text_encoder.bert.*`, of which only the
        parts the release's reward reads are taken). Keys the reward never runs are shape-checked and
        dropped. With `strict`, any missing or unexpected key raises a KeyError naming them; a shape
        mismatch always raises a ValueError."""
        state = dict(state_dict)
        if any(key.startswith(CHECKPOINT_TEXT_PREFIX) for key in state):
            state = _reward_part_of_training_checkpoint(state)
        held = self.state_dict()
        expected = {key: tuple(value.shape) for key, value in held.items()} | _unused_key_shapes(self.config)
        missing = sorted(key for key in held if key not in state)
        unexpected = sorted(key for key in state if key not in expected)
        if strict and (missing or unexpected):
            raise KeyError(
                f"state dict does not match InternVideo2Reward: {len(missing)} missing {missing[:20]}, "
                f"{len(unexpected)} unexpected {unexpected[:20]}"
            )
        wrong_shapes = [
            f"{key}: expected {expected[key]}, got {tuple(value.shape)}"
            for key, value in state.items()
            if key in expected and tuple(value.shape) != expected[key]
        ]
        if wrong_shapes:
            raise ValueError(f"{len(wrong_shapes)} tensors have the wrong shape: {wrong_shapes[:20]}")
        self.load_state_dict({key: state[key] for key in held if key in state}, strict=strict, assign=assign)
        if assign:
            self.requires_grad_(False)

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
        """(B, T, 3, H, W) preprocessed frames -> (B, embed_dim) video embeddings in the model dtype,
        L2-normalised unless `normalize` is False; differentiable with respect to `frames`."""
        self._check_frames(frames)
        embedding = self.vision_proj(self.vision_encoder(frames.to(self.dtype)))
        return _normalize(embedding) if normalize else embedding

    def embed_visual(self, pixels: Tensor) -> Tensor:
        """(B, T, 3, H, W) preprocessed frames -> (B, embed_dim), L2-normalised (embed_video)."""
        return self.embed_video(pixels)

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), each (B, text_max_length): the release's tokenizer call."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer: pass vocab_path (a BERT-large-uncased vocab.txt) or give token ids")
        if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
            raise TypeError("captions must be a list of strings")
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.config.text_max_length,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]

    def embed_text(
        self, text: Sequence[str] | Tensor, attention_mask: Tensor | None = None, normalize: bool = True
    ) -> Tensor:
        """Captions (a list of strings; needs the tokenizer) or token ids (B, L) -> (B, embed_dim) text
        embeddings in the model dtype, L2-normalised unless `normalize` is False, without gradient.
        For ids the mask defaults to ids != pad_token_id (what the tokenizer returns)."""
        if isinstance(text, Tensor):
            input_ids = text
            if attention_mask is None:
                attention_mask = input_ids != self.config.pad_token_id
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with token ids, not with captions")
            input_ids, attention_mask = self.tokenize(text)
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token ids must be an int32/int64 tensor, got {input_ids.dtype}")
        if (
            input_ids.ndim != 2
            or input_ids.shape[0] == 0
            or not 1 <= input_ids.shape[1] <= self.config.text_max_positions
        ):
            raise ValueError(
                f"token ids must have shape (B, L) with B >= 1 and 1 <= L <= {self.config.text_max_positions}, "
                f"got {tuple(input_ids.shape)}"
            )
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        device = self.text_proj.weight.device
        with torch.no_grad():
            hidden = self.text_encoder(input_ids.to(device), attention_mask.to(device))
            embedding = self.text_proj(hidden[:, 0])
            return _normalize(embedding) if normalize else embedding

    def score(self, frames: Tensor, text_embeddings: Tensor) -> Tensor:
        """(B,) cosine of each clip's video embedding with its text embedding: `text_embeddings` is
        (B, embed_dim), or (1, embed_dim) / (embed_dim,) for one caption shared by every clip."""
        if not isinstance(text_embeddings, Tensor):
            raise TypeError(f"text_embeddings must be a torch.Tensor, got {type(text_embeddings).__name__}")
        video = self.embed_video(frames)
        if text_embeddings.ndim == 1:
            text_embeddings = text_embeddings[None]
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"text_embeddings must be (B, {self.config.embed_dim}) or ({self.config.embed_dim},), "
                f"got {tuple(text_embeddings.shape)}"
            )
        if text_embeddings.shape[0] not in (1, video.shape[0]):
            raise ValueError(
                f"text_embeddings has {text_embeddings.shape[0]} rows for {video.shape[0]} clips (expected 1 or "
                f"{video.shape[0]})"
            )
        return (video * text_embeddings.to(video.dtype)).sum(-1)

    def forward(self, frames: Tensor, text_embeddings: Tensor) -> Tensor:
        return self.score(frames, text_embeddings)


def load_tokenizer(vocab_path: str | os.PathLike) -> Any:
    """The release's BERT-large-uncased tokenizer from a local vocab.txt (or a directory holding one)."""
    from transformers import BertTokenizer

    path = Path(vocab_path)
    directory = path if path.is_dir() else path.parent
    if path.is_file() and path.name != "vocab.txt":
        raise ValueError(f"vocab_path must be a vocab.txt file or a directory holding one, got {path}")
    if not (directory / "vocab.txt").is_file():
        raise FileNotFoundError(f"no vocab.txt at {directory}")
    return BertTokenizer.from_pretrained(str(directory), local_files_only=True, do_lower_case=True)
