"""The VideoCrafter2 3D UNet with T2V-Turbo-v2's student conditioning (SPEC 1): the reference path.

Module names reproduce the release's state-dict keys exactly (shared/vc2_reference/README.md), so its
checkpoints load strictly. Numerics follow the release: embeddings, GroupNorm scopes and eps, the
order of residuals. Attention is softmax(q kᵀ·d_head^-0.5)·v: spatial attention through PyTorch's
scaled_dot_product_attention (its backends never materialise the 2560x2560 score matrices; the
release likewise uses xformers when installed), temporal attention written out.

With `use_kernels` on, the temporal transformers of the finer levels run
turbo_kernels.FusedTemporalTransformer's fused path on their own parameters (TemporalTransformer
says where), the unfused temporal attention (and its probabilities) runs turbo_kernels' ops through
`temporal_attention` / `temporal_attention_probs`, every feed-forward's GEGLU and every
transformer block's LayerNorm run turbo_kernels.geglu / layer_norm outside torch.compile, and the
ResBlocks', temporal convolutions' and output layer's GroupNorm + SiLU run
turbo_kernels.group_norm_silu outside torch.compile (under CUDA autocast in float32, as autocast's
GroupNorm computes it); with it off, everything is plain PyTorch. Gradient checkpointing, when enabled, recomputes each UNet block in
the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import turbo_kernels
from t2v_turbo.schedule import DEFAULT_FPS
from turbo_kernels.checks import autocast_available
from turbo_kernels.patching import has_hooks
from turbo_kernels.temporal_block import fused_temporal_transformer

GROUPS = 32
# On an H100 (bf16, benchmarks.temporal_block, 2026-11-26) the fused block beat the reference
# block forward+backward by 1.03-1.21x at 40x64 and 20x32 latent frames, and lost by 0.69-0.90x
# at 10x16 and 5x8, where its fixed per-launch costs outweigh the copies it saves. torch.compile
# of the reference block beat it at every level it measured, so under torch.compile the layers
# run unfused: inductor fuses the norms and layout copies, and the temporal attention stays on
# turbo_kernels' op (6.7x the compiled attention at 2560 positions, batch 8).
FUSED_MIN_POSITIONS = 640

# The release's ResBlock, TemporalConvBlock and output norms use torch's default eps; its
# transformers' GroupNorms use 1e-6.
GROUP_NORM_EPS = 1e-5
TRANSFORMER_GROUP_NORM_EPS = 1e-6
INIT_ATTN_HEADS = 8
TEMPORAL_CONV_DROPOUT = 0.1
COND_EMBED_DIM = 256
# VideoCrafter2's model.ckpt holds the whole LatentDiffusion; the UNet's keys carry this prefix.
ORIGINAL_PREFIX = "model.diffusion_model."
# The student's layers that the teacher (VideoCrafter2's UNet) does not have (SPEC 1).
STUDENT_ONLY_KEYS = frozenset({"time_cond_proj.weight", "motion_cond_proj.weight", "combine_proj.weight"})
MAX_PERIOD = 10000

TINY_CONFIG: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2],
    "num_head_channels": 8,
    "transformer_depth": 1,
    "context_dim": 32,
    "use_linear": True,
    "use_checkpoint": False,
    "temporal_conv": True,
    "temporal_attention": True,
    "temporal_selfatt_only": True,
    "use_relative_position": False,
    "use_causal_attention": False,
    "temporal_length": 4,
    "addition_attention": True,
    "fps_cond": True,
    "time_cond_proj_dim": 256,
    "motion_cond_proj_dim": 256,
    "record_attn_probs": True,
}
VC2_CONFIG: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "transformer_depth": 1,
    "context_dim": 1024,
    "use_linear": True,
    "use_checkpoint": True,
    "temporal_conv": True,
    "temporal_attention": True,
    "temporal_selfatt_only": True,
    "use_relative_position": False,
    "use_causal_attention": False,
    "temporal_length": 16,
    "addition_attention": True,
    "fps_cond": True,
    "time_cond_proj_dim": 256,
    "motion_cond_proj_dim": 256,
}
PRESETS = {"tiny": TINY_CONFIG, "vc2": VC2_CONFIG}

# Constructor kwargs of the release that this implementation accepts only at the value it implements.
_FIXED_KWARGS: dict[str, Any] = {
    "transformer_depth": 1,
    "use_linear": True,
    "temporal_conv": True,
    "temporal_attention": True,
    "temporal_selfatt_only": True,
    "use_relative_position": False,
    "use_causal_attention": False,
    "addition_attention": True,
    "fps_cond": True,
    "dims": 2,
    "conv_resample": True,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "num_heads": -1,
    "tempspatial_aware": False,
    "use_image_attention": False,
    "temporal_transformer_depth": 1,
    "dropout": 0.0,
    "use_fp16": False,
}
# Kwargs with no effect on parameters or values: checkpointing, the clip length (used only by
# relative position / causal masks), and attention-probability recording.
_IGNORED_KWARGS = ("use_checkpoint", "temporal_length", "record_attn_probs")


def strip_original_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The UNet's keys of a state dict: when any key carries ORIGINAL_PREFIX (a whole
    LatentDiffusion's), only those, prefix stripped; else all of them."""
    if not any(key.startswith(ORIGINAL_PREFIX) for key in state):
        return dict(state)
    return {key.removeprefix(ORIGINAL_PREFIX): value for key, value in state.items() if key.startswith(ORIGINAL_PREFIX)}


def sinusoid_a(values: Tensor, dim: int) -> Tensor:
    """The UNet's timestep / fps embedding: [cos, sin] of v·exp(-ln(10000)·k/half), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sinusoid_b(values: Tensor | float, dim: int = COND_EMBED_DIM, dtype: torch.dtype = torch.float32) -> Tensor:
    """The LCM guidance embedding of the release: [sin, cos] of (1000·v)·exp(-k·ln(10000)/(half-1))."""
    values = torch.as_tensor(values, dtype=dtype).reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=values.device) * -(math.log(MAX_PERIOD) / (half - 1)))
    args = values[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def guidance_embedding(w: Tensor | float, dtype: torch.dtype = torch.float32, dim: int = COND_EMBED_DIM) -> Tensor:
    """`timestep_cond` for CFG scale(s) w: (B, dim), dim the model's time_cond_proj_dim (256 in
    the release's models)."""
    return sinusoid_b(w, dim, dtype=dtype)


def motion_embedding(m: Tensor | float, dtype: torch.dtype = torch.float32, dim: int = COND_EMBED_DIM) -> Tensor:
    """`motion_cond` for motion-guidance strength(s) m: (B, dim), dim the model's
    motion_cond_proj_dim (256 in the release's models)."""
    return sinusoid_b(m, dim, dtype=dtype)


def _per_sample(value: Tensor | float, name: str, x: Tensor) -> Tensor:
    """A scalar or (B,) conditioning value as a (B,) float32 tensor on x's device."""
    batch = x.shape[0]
    value = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if value.dim() > 1 or value.numel() not in (1, batch):
        raise ValueError(
            f"{name} must be a scalar or a ({batch},) tensor (one per sample), got shape {tuple(value.shape)}"
        )
    return value.reshape(-1).expand(batch)


def _condition_rows(cond: Tensor, batch: int, name: str) -> Tensor:
    """A conditioning embedding as (B, D): one row a sample, or one row (a scalar's embedding) for all."""
    rows = cond if cond.dim() == 2 else cond.unsqueeze(0)
    if rows.dim() != 2 or rows.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be (1, D) or ({batch}, D) (one row a sample), got shape {tuple(cond.shape)}")
    return rows.expand(batch, -1)


def _batch_values(value: Tensor | float, name: str, batch: int, device: torch.device) -> Tensor:
    """Timesteps or fps (a number, or one or B values) as a (B,) tensor on `device`. A Python
    number is filled in on the device: torch.as_tensor would copy it from host memory, which a
    CUDA graph cannot capture."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((batch,), value, device=device)
    value = torch.as_tensor(value, device=device)
    if value.numel() not in (1, batch):
        raise ValueError(f"{name} must be a number or {batch} values (one per sample), got shape {tuple(value.shape)}")
    return value.reshape(-1).expand(batch)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """(N, L, heads·d) -> (N, heads, L, d)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def attention_probs(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """softmax(q kᵀ·d^-0.5) per head: (N, heads, Lq, Lk)."""
    d = q.shape[-1] // heads
    return (_split_heads(q, heads) @ _split_heads(k, heads).transpose(-1, -2) * d**-0.5).softmax(dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head softmax(q kᵀ·d^-0.5) v on (N, Lq, heads·d) / (N, Lk, heads·d) tokens."""
    out = attention_probs(q, k, heads) @ _split_heads(v, heads)
    return out.transpose(1, 2).flatten(2)


def spatial_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """`attention` through scaled_dot_product_attention (default scale d^-0.5, no mask). Under
    autocast it runs in the low precision, where the written-out softmax would run in float32."""
    out = F.scaled_dot_product_attention(*(_split_heads(t, heads) for t in (q, k, v)))
    return out.transpose(1, 2).flatten(2)


def temporal_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, use_kernels: bool) -> Tensor:
    """Self-attention over frames at each pixel, on (B·H·W, F, heads·d) tokens."""
    if use_kernels:
        return turbo_kernels.temporal_attention(q, k, v, q.shape[1], heads, layout="sequences")
    return attention(q, k, v, heads)


def temporal_attention_probs(q: Tensor, k: Tensor, heads: int, use_kernels: bool) -> Tensor:
    """The probabilities of temporal_attention: (B·H·W, heads, F, F)."""
    if use_kernels:
        return turbo_kernels.temporal_attention_probs(q, k, q.shape[1], heads, layout="sequences")
    return attention_probs(q, k, heads)


class CrossAttention(nn.Module):
    """The release's CrossAttention; self-attention when context_dim is None or no context is passed.
    A temporal one attends over frames, through turbo_kernels' ops while `use_kernels` is set."""

    def __init__(
        self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None, temporal: bool = False
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.temporal = temporal
        self.use_kernels = False
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        source = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        if self.temporal:
            return self.to_out(temporal_attention(q, k, v, self.heads, self.use_kernels))
        return self.to_out(spatial_attention(q, k, v, self.heads))

    def probs(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The attention probabilities of forward(x, context), (N·heads, Lq, Lk) with the head fastest:
        the layout of the release's record_attn_probs maps (motion guidance reads them)."""
        source = x if context is None else context
        q, k = self.to_q(x), self.to_k(source)
        if self.temporal:
            return temporal_attention_probs(q, k, self.heads, self.use_kernels).flatten(0, 1)
        return attention_probs(q, k, self.heads).flatten(0, 1)


class GEGLU(nn.Module):
    """proj, then value * gelu(gate) of its two halves: turbo_kernels.geglu while `use_kernels` is set
    (outside torch.compile, which fuses the eager form itself), else the release's eager form."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)
        self.use_kernels = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        if self.use_kernels and not torch.compiler.is_compiling():
            return turbo_kernels.geglu(h)
        value, gate = h.chunk(2, dim=-1)
        return value * F.gelu(gate)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and keys) that runs turbo_kernels.layer_norm while
    `use_kernels` is set, outside torch.compile (which fuses the eager form itself): torch's
    backward spends most of its time summing the weight and bias gradients over the many narrow
    rows of a UNet level's tokens. The parameters go in as they are (float32 master weights under
    autocast are read in float32, as nn.LayerNorm's autocast does); the output is x's dtype,
    where autocast's would be float32: every consumer is a Linear that casts to bf16 anyway."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.use_kernels = False

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernels and not torch.compiler.is_compiling():
            return turbo_kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """attn1 (self), attn2 (cross to context; self when context_dim is None), GEGLU feed-forward,
    each pre-LayerNorm with a residual. Registration order as released: attn1, ff, attn2, norms."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None, temporal: bool):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_dim, temporal=temporal)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim=context_dim, temporal=temporal)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame transformer on (B·F, C, H, W): tokens (B·F, H·W, C), cross-attention to the text."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(GROUPS, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, head_dim, context_dim, False)])
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        rows, channels, height, width = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h).transpose(1, 2).reshape(rows, channels, height, width)
        # x first: the sum then takes x's layout (contiguous, or channels_last after channels-last
        # convolutions) rather than h's transposed one; the fused temporal transformer that
        # follows reads either without a copy.
        return x + h


class TemporalTransformer(nn.Module):
    """Temporal self-attention only (the text is never used) on (B·F, C, H, W): GroupNorm over each
    video (C/32, F, H, W), tokens (B·H·W, F, C). init_attn uses Conv1d projections (the release
    builds it without use_linear); the others use Linear.

    While `use_kernels` is set, forward runs turbo_kernels.FusedTemporalTransformer's fused path on
    this module's parameters (turbo_kernels.temporal_block.fused_temporal_transformer: both carry the
    release's structure and names; init_attn's Conv1d(k=1) weights enter as the equivalent Linear
    weights), at the levels where it measured faster than the release's path: frames of at least
    `fused_min_positions` latent pixels, outside torch.compile. The fused path reads the weights directly and never calls
    the submodules, so a hook on any submodule would silently not fire: capture_attention_inputs'
    hooks on attn1/attn2's to_q / to_k, for one. A layer with such a hook, or below the size, runs
    the unfused path, which calls every submodule (its temporal attention still on turbo_kernels'
    ops). Inside the fused path autocast is off (the stream's dtype is the compute dtype,
    FusedTemporalTransformer's contract). Neither path has dropout."""

    fused_min_positions = FUSED_MIN_POSITIONS

    def __init__(self, channels: int, heads: int, head_dim: int, conv_proj: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.conv_proj = conv_proj
        self.use_kernels = False
        self.norm = nn.GroupNorm(GROUPS, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        self.proj_in = nn.Conv1d(channels, inner, 1) if conv_proj else nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, head_dim, None, True)])
        self.proj_out = nn.Conv1d(inner, channels, 1) if conv_proj else nn.Linear(inner, channels)

    def runs_fused(self, x: Tensor) -> bool:
        """Whether forward(x) takes the fused path now: `use_kernels` is set, torch.compile is not
        tracing, x's frames have at least `fused_min_positions` pixels, and no submodule has hooks."""
        return (
            self.use_kernels
            and not torch.compiler.is_compiling()
            and x.shape[-2] * x.shape[-1] >= self.fused_min_positions
            and not any(has_hooks(m) for m in self.modules() if m is not self)
        )

    def _project(self, proj: nn.Module, tokens: Tensor) -> Tensor:
        if self.conv_proj and not has_hooks(proj):
            # Conv1d(k=1) is this linear map; run as one, it returns row-major tokens, where the
            # convolution's (N, C, F) output read transposed had a channel stride of F, which the
            # LayerNorm and attention kernels after it do not take.
            return F.linear(tokens, proj.weight.squeeze(-1), proj.bias)
        if self.conv_proj:
            return proj(tokens.transpose(1, 2)).transpose(1, 2)
        return proj(tokens)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        if self.runs_fused(x):
            if self.conv_proj:
                weights = self.proj_in.weight.squeeze(-1), self.proj_out.weight.squeeze(-1)
                return fused_temporal_transformer(self, x, num_frames, *weights)
            return fused_temporal_transformer(self, x, num_frames)
        rows, channels, height, width = x.shape
        video = x.unflatten(0, (-1, num_frames)).transpose(1, 2)  # (B, C, F, H, W)
        tokens = self.norm(video).permute(0, 3, 4, 2, 1).reshape(-1, num_frames, channels)
        h = self._project(self.proj_in, tokens)
        for block in self.transformer_blocks:
            h = block(h)
        h = self._project(self.proj_out, h)
        h = (
            h.reshape(-1, height, width, num_frames, channels)
            .permute(0, 3, 4, 1, 2)
            .reshape(rows, channels, height, width)
        )
        # x first: the sum takes x's layout (a channels_last stream stays one for the next
        # convolution) rather than h's contiguous one.
        return x + h


def _norm_silu_layers(layers: nn.Sequential, x: Tensor, use_kernels: bool) -> Tensor:
    """layers(x) for a Sequential that opens with GroupNorm and SiLU. With use_kernels the two run
    as one turbo_kernels.group_norm_silu, unless a hook on the Sequential or on either of them
    asks that they be called."""
    # The modules unpacked once: slicing the Sequential built a new Sequential each call (a Module's
    # __init__, 133 a UNet forward in the H200 lease's host profile), and indexing walks it.
    norm, silu, *rest = layers
    if not use_kernels or any(has_hooks(m) for m in (layers, norm, silu)):
        return layers(x)
    h = turbo_kernels.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    for layer in rest:
        h = layer(h)
    return h


class TemporalConvBlock(nn.Module):
    """Four GroupNorm-SiLU-(Dropout)-Conv3d (3,1,1) layers over each video, with an identity residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.use_kernels = False

        def layer(with_dropout: bool) -> nn.Sequential:
            dropout = [nn.Dropout(TEMPORAL_CONV_DROPOUT)] if with_dropout else []
            return nn.Sequential(
                nn.GroupNorm(GROUPS, channels, eps=GROUP_NORM_EPS),
                nn.SiLU(),
                *dropout,
                nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)),
            )

        self.conv1 = layer(False)
        self.conv2 = layer(True)
        self.conv3 = layer(True)
        self.conv4 = layer(True)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for layers in (self.conv1, self.conv2, self.conv3, self.conv4):
            h = _norm_silu_layers(layers, h, self.use_kernels)
        return x + h


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.use_kernels = False
        self.in_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, channels, eps=GROUP_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, out_channels, eps=GROUP_NORM_EPS),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        # The release's spelling, kept for its checkpoint keys.
        self.temopral_conv = TemporalConvBlock(out_channels)

    def forward(self, x: Tensor, emb: Tensor, num_frames: int) -> Tensor:
        h = _norm_silu_layers(self.in_layers, x, self.use_kernels) + self.emb_layers(emb).to(x.dtype)[:, :, None, None]
        h = self.skip_connection(x) + _norm_silu_layers(self.out_layers, h, self.use_kernels)
        video = h.unflatten(0, (-1, num_frames)).transpose(1, 2)
        return self.temopral_conv(video).transpose(1, 2).flatten(0, 1)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetBlock(nn.Sequential):
    """The release's TimestepEmbedSequential: routes emb, context or the frame count to each layer."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                x = layer(x, num_frames)
            else:
                x = layer(x)
        return x


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class VC2UNet(nn.Module):
    """VideoCrafter2's UNetModel (lvdm openaimodel3d) with T2V-Turbo-v2's guidance and motion
    conditioning. forward(x (B, C, T, H, W), timesteps (B,), context (B, L, D), fps) -> (B, C, T, H, W).
    Dropout (in every temporal conv block) follows train()/eval(). `use_kernels` (settable at any
    time) runs the temporal transformers fused (where TemporalTransformer measured it faster) and
    the temporal attention through turbo_kernels' ops; off, it is plain PyTorch.
    `gradient_checkpointing` (enable_/disable_gradient_checkpointing) recomputes each block in the
    backward pass while training. `config` holds the architecture kwargs, enough to rebuild the
    model."""

    # The units FSDP shards one by one (accelerate's TRANSFORMER_BASED_WRAP reads this name).
    _no_split_modules = ("UNetBlock",)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions,
        num_res_blocks: int,
        channel_mult,
        num_head_channels: int,
        context_dim: int,
        time_cond_proj_dim: int | None = None,
        motion_cond_proj_dim: int | None = None,
        use_kernels: bool = True,
    ):
        super().__init__()
        if motion_cond_proj_dim is not None and time_cond_proj_dim is None:
            raise ValueError("motion_cond_proj_dim needs time_cond_proj_dim")
        if not channel_mult or channel_mult[0] != 1:
            # As the release builds it: the output convolution reads model_channels channels.
            raise ValueError(f"channel_mult must start with 1 (the output layer takes model_channels), got {channel_mult}")
        attended = [mult for level, mult in enumerate(channel_mult) if 2**level in attention_resolutions]
        for channels in (mult * model_channels for mult in [*attended, channel_mult[-1]]):  # and the middle block
            if channels < num_head_channels:
                raise ValueError(
                    f"num_head_channels={num_head_channels} leaves no head at a level of {channels} channels "
                    f"(heads = channels // num_head_channels)"
                )
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "model_channels": model_channels,
            "attention_resolutions": list(attention_resolutions),
            "num_res_blocks": num_res_blocks,
            "channel_mult": list(channel_mult),
            "num_head_channels": num_head_channels,
            "context_dim": context_dim,
            "time_cond_proj_dim": time_cond_proj_dim,
            "motion_cond_proj_dim": motion_cond_proj_dim,
        }
        self.model_channels = model_channels
        emb_dim = 4 * model_channels
        self.time_embed = _mlp(model_channels, emb_dim)
        self.fps_embedding = _mlp(model_channels, emb_dim)
        if time_cond_proj_dim is not None:
            self.time_cond_proj = nn.Linear(time_cond_proj_dim, model_channels, bias=False)
        if motion_cond_proj_dim is not None:
            self.motion_cond_proj = nn.Linear(motion_cond_proj_dim, model_channels, bias=False)
            self.combine_proj = nn.Linear(2 * model_channels, model_channels, bias=False)

        def transformers(channels: int) -> list[nn.Module]:
            heads = channels // num_head_channels
            return [
                SpatialTransformer(channels, heads, num_head_channels, context_dim),
                TemporalTransformer(channels, heads, num_head_channels),
            ]

        input_blocks = [UNetBlock(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        skip_channels = [model_channels]
        channels, factor = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(channels, emb_dim, mult * model_channels)]
                channels = mult * model_channels
                if factor in attention_resolutions:
                    layers += transformers(channels)
                input_blocks.append(UNetBlock(*layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                input_blocks.append(UNetBlock(Downsample(channels)))
                skip_channels.append(channels)
                factor *= 2
        self.input_blocks = nn.ModuleList(input_blocks)
        self.init_attn = UNetBlock(
            TemporalTransformer(model_channels, INIT_ATTN_HEADS, num_head_channels, conv_proj=True)
        )
        self.middle_block = UNetBlock(
            ResBlock(channels, emb_dim, channels), *transformers(channels), ResBlock(channels, emb_dim, channels)
        )

        output_blocks = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(channels + skip_channels.pop(), emb_dim, mult * model_channels)]
                channels = mult * model_channels
                if factor in attention_resolutions:
                    layers += transformers(channels)
                if level and i == num_res_blocks:
                    layers.append(Upsample(channels))
                    factor //= 2
                output_blocks.append(UNetBlock(*layers))
        self.output_blocks = nn.ModuleList(output_blocks)
        self.out = nn.Sequential(
            nn.GroupNorm(GROUPS, channels, eps=GROUP_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(model_channels, out_channels, 3, padding=1),
        )
        self.use_kernels = use_kernels
        self.gradient_checkpointing = False

    @property
    def use_kernels(self) -> bool:
        return self._use_kernels

    @use_kernels.setter
    def use_kernels(self, value: bool) -> None:
        self._use_kernels = bool(value)
        for module in self.modules():
            if isinstance(module, (TemporalTransformer, GEGLU, LayerNorm, ResBlock, TemporalConvBlock)) or (
                isinstance(module, CrossAttention) and module.temporal
            ):
                module.use_kernels = self._use_kernels

    def save_pretrained(self, directory) -> None:
        """config.json (the constructor kwargs) and model.safetensors in `directory`, written
        atomically (t2v_turbo.models.checkpoint.save_pretrained)."""
        from t2v_turbo.models.checkpoint import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, use_kernels: bool = True) -> VC2UNet:
        """The model `save_pretrained` wrote, in eval mode, in the saved dtype, on the CPU."""
        from t2v_turbo.models.checkpoint import from_pretrained

        return from_pretrained(directory, use_kernels=use_kernels)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute every block (input, init_attn, middle, output) in the backward pass instead of
        keeping its activations, whenever the model is in train mode with grad enabled
        (torch.utils.checkpoint, non-reentrant, which restores the RNG state, so dropout masks
        are the same in the recomputation)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def decoder_temporal_attention_names(self) -> list[str]:
        """Module names of the first temporal self-attention (attn1) of every temporal transformer
        in output_blocks, in order: the layers whose q/k motion guidance captures."""
        return [
            f"{name}.transformer_blocks.0.attn1"
            for name, module in self.output_blocks.named_modules(prefix="output_blocks")
            if isinstance(module, TemporalTransformer)
        ]

    @classmethod
    def from_original_config(cls, kwargs: Mapping[str, Any]) -> VC2UNet:
        """Builds from the release's UNetModel constructor kwargs (its yaml `unet_config.params`)."""
        kwargs = dict(kwargs)
        for name, value in _FIXED_KWARGS.items():
            given = kwargs.pop(name, value)
            if given != value and not (isinstance(value, bool) and bool(given) == value):
                raise ValueError(f"{name}={given!r} is not supported (only {value!r})")
        for name in _IGNORED_KWARGS:
            kwargs.pop(name, None)
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, use_kernels: bool = True) -> VC2UNet:
        """'tiny' (the reference data's tiny golden) or 'vc2' (the full T2V-Turbo-v2 student)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_original_config({**PRESETS[name], "use_kernels": use_kernels})

    def load_original_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Loads a release checkpoint's UNet state dict: bare, or a whole LatentDiffusion's (only
        the keys under `model.diffusion_model.` are read, prefix stripped). Strictly every key
        must match; strict=False lets exactly the student's layers that VideoCrafter2's model.ckpt
        lacks (STUDENT_ONLY_KEYS: time_cond_proj, motion_cond_proj, combine_proj) be missing, and
        they keep their initialisation, as the release starts its student. Raises KeyError naming
        any other missing or unexpected keys, and ValueError naming the tensors whose shapes
        differ from this configuration's."""
        state_dict = strip_original_prefix(state_dict)
        own = self.state_dict()
        expected, given = set(own), set(state_dict)
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        allowed_missing = set() if strict else STUDENT_ONLY_KEYS
        if unexpected or not set(missing) <= allowed_missing:
            raise KeyError(
                f"state dict does not match VC2UNet: {len(missing)} missing {missing[:20]}, "
                f"{len(unexpected)} unexpected {unexpected[:20]}"
                + ("" if strict else f" (strict=False lets only {sorted(STUDENT_ONLY_KEYS)} be missing)")
            )
        mismatched = [
            f"{key}: {tuple(value.shape)} in the state dict, {tuple(own[key].shape)} in the model"
            for key, value in state_dict.items()
            if key in own and value.shape != own[key].shape
        ]
        if mismatched:
            raise ValueError(
                f"state dict does not match this VC2UNet configuration: {len(mismatched)} with other shapes "
                f"({'; '.join(mismatched[:10])})"
            )
        result = self.load_state_dict(state_dict, strict=False, assign=assign)
        left_on_meta = [key for key in missing if own[key].is_meta]
        if left_on_meta:
            raise ValueError(f"{left_on_meta} are not in the state dict and this model was built on the meta device, so "
                             "they have no initialisation: build it on a real device to start them as constructed")
        return result

    def condition_embedding(self, timestep_cond: Tensor | None, motion_cond: Tensor | None, dtype) -> Tensor | None:
        """c added to the timestep sinusoid: combine_proj of both projections, or the guidance one alone."""
        if timestep_cond is None:
            if motion_cond is not None:
                raise ValueError("motion_cond needs timestep_cond")
            return None
        if not hasattr(self, "time_cond_proj"):
            raise ValueError("this model has no time_cond_proj (built without time_cond_proj_dim)")
        guidance = self.time_cond_proj(timestep_cond.to(dtype))
        if motion_cond is None:
            return guidance
        if not hasattr(self, "motion_cond_proj"):
            raise ValueError("this model has no motion_cond_proj (built without motion_cond_proj_dim)")
        return self.combine_proj(torch.cat([guidance, self.motion_cond_proj(motion_cond.to(dtype))], dim=1))

    def forward_guided(
        self,
        x: Tensor,
        timesteps: Tensor | int,
        context: Tensor,
        fps: Tensor | int = DEFAULT_FPS,
        guidance_scale: Tensor | float | None = None,
        motion_strength: Tensor | float | None = None,
    ) -> Tensor:
        """forward with the conditioning embeddings built here from the CFG scale w
        (`guidance_scale`) and the motion-guidance strength m (`motion_strength`), each a scalar
        or a (B,) tensor, as the release builds them (guidance_embedding / motion_embedding, in
        float32). Without motion_strength only w conditions the model; without either it is the
        teacher path."""
        if motion_strength is not None and guidance_scale is None:
            raise ValueError("motion_strength needs guidance_scale (the release has no motion-only conditioning)")
        timestep_cond = motion_cond = None
        config = self.config
        if guidance_scale is not None:
            w = _per_sample(guidance_scale, "guidance_scale", x)
            timestep_cond = guidance_embedding(w, dim=config["time_cond_proj_dim"] or COND_EMBED_DIM)
        if motion_strength is not None:
            m = _per_sample(motion_strength, "motion_strength", x)
            motion_cond = motion_embedding(m, dim=config["motion_cond_proj_dim"] or COND_EMBED_DIM)
        return self(x, timesteps, context, fps, timestep_cond=timestep_cond, motion_cond=motion_cond)

    @property
    def latent_multiple(self) -> int:
        """What latent heights and widths must be multiples of: the UNet halves them at every level
        but the last and needs them to divide evenly."""
        return 2 ** (len(self.config["channel_mult"]) - 1)

    def _check_inputs(self, x: Tensor, context: Tensor) -> None:
        config = self.config
        if x.dim() != 5 or x.shape[1] != config["in_channels"]:
            raise ValueError(f"x must be (B, {config['in_channels']}, T, H, W) latents, got shape {tuple(x.shape)}")
        factor = self.latent_multiple
        if x.shape[3] % factor or x.shape[4] % factor:
            raise ValueError(
                f"x's height and width must be multiples of {factor} (the UNet halves them "
                f"{len(config['channel_mult']) - 1} times), got {x.shape[3]}x{x.shape[4]}"
            )
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != config["context_dim"]:
            raise ValueError(
                f"context must be (B={x.shape[0]}, L, {config['context_dim']}) text embeddings, "
                f"got shape {tuple(context.shape)}"
            )
        weights = self.time_embed[0].weight.dtype
        device_type = x.device.type
        autocast = autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        # Autocast reconciles x with float32 weights or with weights of its own dtype, not others
        # (GroupNorm, for one, refuses float16 weights under bfloat16 autocast).
        reconciled = autocast and weights in (torch.float32, torch.get_autocast_dtype(device_type))
        if x.dtype != weights and not reconciled:
            raise ValueError(f"x is {x.dtype} but the model's weights are {weights} (from_pretrained keeps the saved "
                             f"dtype): cast one to the other, e.g. unet.to(x.dtype), or run under torch.autocast "
                             f"with dtype={weights}")

    def _run_block(self, block: UNetBlock, h: Tensor, emb: Tensor, context: Tensor, num_frames: int) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return turbo_kernels.checkpoint(block, h, emb, context, num_frames)
        return block(h, emb, context, num_frames)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        fps: Tensor | int,
        timestep_cond: Tensor | None = None,
        motion_cond: Tensor | None = None,
    ) -> Tensor:
        self._check_inputs(x, context)
        batch, _, num_frames, _, _ = x.shape
        dtype = x.dtype
        timesteps, fps = (
            _batch_values(value, name, batch, x.device) for value, name in ((timesteps, "timesteps"), (fps, "fps"))
        )
        t_emb = sinusoid_a(timesteps, self.model_channels).to(dtype)
        timestep_cond, motion_cond = (
            None if cond is None else _condition_rows(cond, batch, name)
            for cond, name in ((timestep_cond, "timestep_cond"), (motion_cond, "motion_cond"))
        )
        c = self.condition_embedding(timestep_cond, motion_cond, dtype)
        if c is not None:
            t_emb = t_emb + c
        emb = self.time_embed(t_emb) + self.fps_embedding(sinusoid_a(fps, self.model_channels).to(dtype))
        emb = emb.repeat_interleave(num_frames, dim=0)
        context = context.to(dtype).repeat_interleave(num_frames, dim=0)

        h = x.transpose(1, 2).flatten(0, 1)  # (B·T, C, H, W), frame index fastest
        skips = []
        for index, block in enumerate(self.input_blocks):
            h = self._run_block(block, h, emb, context, num_frames)
            if index == 0:
                h = self._run_block(self.init_attn, h, emb, context, num_frames)
            skips.append(h)
        h = self._run_block(self.middle_block, h, emb, context, num_frames)
        for block in self.output_blocks:
            h = self._run_block(block, torch.cat([h, skips.pop()], dim=1), emb, context, num_frames)
        return _norm_silu_layers(self.out, h, self.use_kernels).unflatten(0, (batch, num_frames)).transpose(1, 2)
