"""The temporal transformer of VideoCrafter2's UNet (SPEC 1) in plain PyTorch, and the meaning of
the ops its fused form (turbo_kernels.temporal_block) is built from.

`temporal_transformer` follows the public release step by step, layout round trip included: the
stream (B*F, C, H, W) is viewed as (B, C, F, H, W), group-normalised over (C/32, F, H, W) per
video, rearranged to tokens (B*H*W, F, C), projected, run through the block (two temporal
self-attentions and a GEGLU feed-forward, each pre-LayerNorm with a residual), projected back,
rearranged to (B, C, F, H, W), added to the input and returned as (B*F, C, H, W). Each rearrange
that the release follows with .contiguous() (or that a reshape cannot view) is a full-tensor copy;
tests count them.

Parameters are looked up by the release's state-dict names (norm, proj_in,
transformer_blocks.{i}.{attn1, attn2, ff, norm1, norm2, norm3}, proj_out) and cast to the stream's
dtype, so one set of float32 weights serves every precision.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

GROUPS = 32
GROUP_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the ops compute in (and their fakes return statistics in): float64 for float64 x,
    else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads_first(t: Tensor, heads: int) -> Tensor:
    """'b n (h d) -> (b h) n d'"""
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).permute(0, 2, 1, 3).reshape(b * heads, n, inner // heads)


def _heads_last(t: Tensor, heads: int) -> Tensor:
    """'(b h) n d -> b n (h d)'"""
    bh, n, d = t.shape
    return t.reshape(bh // heads, heads, n, d).permute(0, 2, 1, 3).reshape(bh // heads, n, heads * d)


def self_attention(x: Tensor, heads: int, param: Callable[[str], Tensor]) -> Tensor:
    """The release's CrossAttention without context: softmax(q k^T / sqrt(d)) v per head over the
    sequence (here the F frames of one position), then to_out.0."""
    q = F.linear(x, param("to_q.weight"))
    k = F.linear(x, param("to_k.weight"))
    v = F.linear(x, param("to_v.weight"))
    q, k, v = (_heads_first(t, heads) for t in (q, k, v))
    scale = (q.shape[-1]) ** -0.5
    probs = (torch.einsum("b i d, b j d -> b i j", q, k) * scale).softmax(dim=-1)
    out = _heads_last(torch.einsum("b i j, b j d -> b i d", probs, v), heads)
    return F.linear(out, param("to_out.0.weight"), param("to_out.0.bias"))


def geglu_feed_forward(x: Tensor, param: Callable[[str], Tensor]) -> Tensor:
    """ff.net.0 (GEGLU: Linear to 2 x hidden, first half the value, second half the gate, exact GELU)
    then ff.net.2 (Linear back)."""
    value, gate = F.linear(x, param("net.0.proj.weight"), param("net.0.proj.bias")).chunk(2, dim=-1)
    return F.linear(value * F.gelu(gate), param("net.2.weight"), param("net.2.bias"))


def temporal_block(x: Tensor, heads: int, param: Callable[[str], Tensor]) -> Tensor:
    """BasicTransformerBlock with temporal self-attention only: x (sequences, F, inner)."""
    def layer_norm(h, name):
        return F.layer_norm(h, h.shape[-1:], param(f"{name}.weight"), param(f"{name}.bias"), LAYER_NORM_EPS)

    def sub(prefix):
        return lambda name: param(f"{prefix}.{name}")

    x = self_attention(layer_norm(x, "norm1"), heads, sub("attn1")) + x
    x = self_attention(layer_norm(x, "norm2"), heads, sub("attn2")) + x
    return geglu_feed_forward(layer_norm(x, "norm3"), sub("ff")) + x


def temporal_transformer(
    x: Tensor, num_frames: int, params: Mapping[str, Tensor], heads: int, depth: int = 1
) -> Tensor:
    """The TemporalTransformer (use_linear, temporal self-attention only) on the stream x
    (B*F, C, H, W), frame-major (row b*F + f); returns the stream's shape, layout and dtype."""
    def param(name):
        return params[name].to(x.dtype)

    rows, channels, height, width = x.shape
    videos = rows // num_frames
    # The UNet's rearrange '(b t) c h w -> b c t h w' (a view).
    x_in = x.reshape(videos, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
    h = F.group_norm(x_in, GROUPS, param("norm.weight"), param("norm.bias"), GROUP_NORM_EPS)
    # 'b c t h w -> (b h w) c t', then 'bhw c t -> bhw t c', each made contiguous by the release.
    h = h.permute(0, 3, 4, 1, 2).reshape(videos * height * width, channels, num_frames).contiguous()
    h = h.transpose(1, 2).contiguous()
    h = F.linear(h, param("proj_in.weight"), param("proj_in.bias"))
    for i in range(depth):
        h = temporal_block(h, heads, lambda name, prefix=f"transformer_blocks.{i}": param(f"{prefix}.{name}"))
    h = F.linear(h, param("proj_out.weight"), param("proj_out.bias"))
    # 'b (h w) t c -> b c t h w', made contiguous by the release.
    h = h.reshape(videos, height, width, num_frames, channels).permute(0, 4, 3, 1, 2).contiguous()
    out = h + x_in
    # The UNet's rearrange 'b c t h w -> (b t) c h w'.
    return out.permute(0, 2, 1, 3, 4).reshape(rows, channels, height, width)


# ---- the ops of the fused form -----------------------------------------------------------------


def group_norm_stats(x: Tensor, num_frames: int, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd) of each video's channel groups over (C/groups, F, H, W) of the stream x
    (B*F, C, H, W): each (B, groups), float32 (float64 for float64 x); biased variance."""
    per_group = x.reshape(x.shape[0] // num_frames, num_frames, groups, -1).to(compute_dtype(x))
    variance, mean = torch.var_mean(per_group, dim=(1, 3), correction=0)
    return mean, torch.rsqrt(variance + eps)


def video_group_norm_stats(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """group_norm_stats of x (B, C, F, H, W) in any layout: each sample's groups over (C/groups,
    F, H, W)."""
    return group_norm_stats(x.transpose(1, 2).flatten(0, 1), x.shape[2], groups, eps)


def group_norm_stats_backward(
    x: Tensor, mean: Tensor, rstd: Tensor, grad_mean: Tensor, grad_rstd: Tensor, num_frames: int
) -> Tensor:
    """The gradient of x through group_norm_stats: mean = sum(x)/n and rstd = (sum((x - mean)^2)/n +
    eps)^-1/2 over each video's group, so d x = (d mean + 2 (x - mean) d var)/n with
    d var = -rstd^3/2 d rstd. Returned in x's dtype and strides."""
    groups = mean.shape[1]
    per_group = x.reshape(x.shape[0] // num_frames, num_frames, groups, -1).to(mean.dtype)
    count = num_frames * per_group.shape[-1]
    grad_var = -0.5 * grad_rstd * rstd**3
    deviation = per_group - mean[:, None, :, None]
    grad_x = (grad_mean[:, None, :, None] + 2 * grad_var[:, None, :, None] * deviation) / count
    return torch.empty_like(x).copy_(grad_x.reshape(x.shape))


def channel_affine_backward(grad_a: Tensor, x: Tensor, scale: Tensor, num_frames: int) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of a = x*scale[b] + shift[b] (channel_affine; x and grad_a (B*F, M, K) in any
    strides, scale (B, K)) with respect to x (grad_a*scale, in x's dtype and strides), scale
    (sum of grad_a*x over each video's frames and tokens) and shift (sum of grad_a), the sums in
    scale's dtype."""
    per_video = grad_a.unflatten(0, (-1, num_frames)).to(scale.dtype)
    grad_x = (per_video * scale[:, None, None, :]).flatten(0, 1)
    grad_scale = (per_video * x.unflatten(0, (-1, num_frames)).to(scale.dtype)).sum(dim=(1, 2))
    return torch.empty_like(x).copy_(grad_x), grad_scale, per_video.sum(dim=(1, 2))


def channel_affine(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], num_frames: int) -> Tensor:
    """x (B*F, M, K) -> x*scale[b] + shift[b] with (B, K) scale and shift, rounded to x's dtype (a
    normalisation's output), or x itself without them."""
    if scale is None:
        return x
    per_video = x.unflatten(0, (-1, num_frames)).to(scale.dtype)
    return (per_video * scale[:, None, None, :] + shift[:, None, None, :]).flatten(0, 1).to(x.dtype)


def group_affine(mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """GroupNorm as a per-(sample, channel) affine: (scale, shift) = (rstd*weight, bias -
    mean*scale), each (B, C) in the statistics' dtype, from (B, groups) statistics and (C,) weight
    and bias."""
    group_size = weight.shape[0] // mean.shape[1]
    mean, rstd = (t.repeat_interleave(group_size, dim=1) for t in (mean, rstd))
    scale = rstd * weight.to(rstd.dtype)
    return scale, bias.to(rstd.dtype) - mean * scale


def _rounded_affine(x: Tensor, scale: Tensor, shift: Tensor, rounding: torch.dtype) -> Tensor:
    """a = x*scale + shift per (sample, channel) of a (B, C, F, H, W) x, rounded to `rounding` (the
    dtype of the GroupNorm output it stands for); in the compute dtype."""
    cdt = compute_dtype(x)
    a = x.to(cdt) * scale.to(cdt)[:, :, None, None, None] + shift.to(cdt)[:, :, None, None, None]
    return a.to(rounding).to(cdt)


def affine_silu_memory_format(x: Tensor) -> torch.memory_format:
    """The layout of channel_affine_silu's output for x (B, C, F, H, W): channels-last
    (torch.channels_last_3d, (B, F, H, W, C) in memory) where x lies so and is not contiguous,
    else contiguous. torch's test ignores the strides of size-1 dimensions, so a channels_last
    (N, C, H, W) x with a frame dimension inserted counts, as does the transposed view of a
    channels_last (B*F, C, H, W) stream."""
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def channel_affine_silu(
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor, out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """silu(a), a = x*scale + shift rounded to the output's dtype (GroupNorm's output), (scale,
    shift) = group_affine(...) per (sample, channel), of a (B, C, F, H, W) x with (B, groups)
    statistics and (C,) weight and bias; in out_dtype (default x's; float32 from 16-bit x is what
    CUDA autocast's GroupNorm returns), laid out as affine_silu_memory_format(x) says."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    a = _rounded_affine(x, *group_affine(mean, rstd, weight, bias), out_dtype)
    return F.silu(a).to(out_dtype).contiguous(memory_format=affine_silu_memory_format(x))


def silu_grad_at_rounded_affine(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """d a = d y * silu'(a) at a = x*scale + shift (per (sample, channel), (B, C) scale and shift)
    rounded as channel_affine_silu's forward rounds it: to the output's dtype, which is grad's; in
    the compute dtype."""
    a = _rounded_affine(x, scale, shift, grad.dtype)
    sigmoid = torch.sigmoid(a)
    return grad.to(a.dtype) * sigmoid * (1 + a * (1 - sigmoid))


def group_norm_silu_coefficients(
    sum_grad: Tensor, sum_grad_x: Tensor, x_shape: tuple[int, ...], mean: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From the sums over each (sample, channel)'s positions of d a and d a * x (B, C): (d weight,
    d bias) (C,) and (alpha, beta) (B, groups) such that x's whole gradient is
    d a * scale + alpha * x + beta. With scale = rstd*weight, shift = bias - mean*scale:
    d bias = sum d a, d weight = rstd (sum d a x - mean sum d a), d rstd = sum over the group's
    channels of weight (sum d a x - mean sum d a), d mean = -sum of weight rstd sum d a; and
    through the statistics (count elements a group, var + eps = rstd^-2) d x = (d mean +
    2 d var (x - mean)) / count, d var = -rstd^3 d rstd / 2. As torch's GroupNorm backward, this
    form (sums of d a * x less mean * sum d a) loses float32 precision when a group's mean is large
    against its spread."""
    batch, groups = mean.shape
    group_size = x_shape[1] // groups
    count = group_size * math.prod(x_shape[2:])
    cdt = sum_grad.dtype
    mean, rstd = mean.to(cdt), rstd.to(cdt)
    mean_c, rstd_c = (t.repeat_interleave(group_size, dim=1) for t in (mean, rstd))
    centred = sum_grad_x - sum_grad * mean_c
    grad_weight = (centred * rstd_c).sum(0)
    grad_bias = sum_grad.sum(0)
    w = weight.to(cdt)
    grad_rstd = (centred * w).view(batch, groups, group_size).sum(-1)
    grad_mean = (-sum_grad * rstd_c * w).view(batch, groups, group_size).sum(-1)
    grad_var = -0.5 * grad_rstd * rstd**3
    alpha = 2 * grad_var / count
    beta = (grad_mean - 2 * grad_var * mean) / count
    return grad_weight, grad_bias, alpha, beta


def channel_affine_silu_backward(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm + SiLU's gradients from its output's, grad, in the output's dtype: (d x whole,
    through the affine and the statistics, in x's dtype and strides; d weight; d bias, in the
    compute dtype), d a taken at the rounded a the forward takes (group_norm_silu_coefficients
    gives the formulas)."""
    cdt = compute_dtype(x)
    group_size = x.shape[1] // mean.shape[1]
    scale, shift = group_affine(mean.to(cdt), rstd.to(cdt), weight, bias)
    grad_a = silu_grad_at_rounded_affine(grad, x, scale, shift)
    x_c = x.to(cdt)
    grad_weight, grad_bias, alpha, beta = group_norm_silu_coefficients(
        grad_a.sum(dim=(2, 3, 4)), (grad_a * x_c).sum(dim=(2, 3, 4)), tuple(x.shape), mean, rstd, weight
    )
    alpha_c, beta_c = (t.repeat_interleave(group_size, dim=1)[:, :, None, None, None] for t in (alpha, beta))
    whole = grad_a * scale[:, :, None, None, None] + alpha_c * x_c + beta_c
    return torch.empty_like(x).copy_(whole), grad_weight, grad_bias


def strided_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], num_frames: int, channels_first_out: bool,
) -> Tensor:
    """out[r, m, j] = sum_k a[r, m, k] weight[j, k] + bias[j] + residual[r, m, j], with
    a = channel_affine(x, scale, shift), x (R, M, K) in any strides. Returned contiguous as
    (R, J, M) when channels_first_out (residual then has that shape too), else (R, M, J), in x's
    dtype, rounded once from float32 (float64) maths."""
    cdt = compute_dtype(x)
    out = torch.matmul(channel_affine(x, scale, shift, num_frames).to(cdt), weight.to(cdt).t())
    if bias is not None:
        out = out + bias.to(cdt)
    if channels_first_out:
        out = out.transpose(1, 2)
    if residual is not None:
        out = out + residual.to(cdt)
    return out.to(x.dtype).contiguous()


def strided_linear_weight_grad(
    grad_out: Tensor, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], num_frames: int
) -> tuple[Tensor, Tensor]:
    """The weight and bias gradients of strided_linear: sum over r, m of grad_out[r, m, j] a[r, m, k]
    and of grad_out[r, m, j], with grad_out (R, M, J); (J, K) and (J,), float32 (float64)."""
    cdt = compute_dtype(x)
    a = channel_affine(x, scale, shift, num_frames).to(cdt)
    grad = grad_out.to(cdt)
    return torch.einsum("rmj,rmk->jk", grad, a), grad.sum(dim=(0, 1))


def geglu(h: Tensor) -> Tensor:
    """value * gelu(gate) of h (..., 2 x hidden): value the first half, gate the second, exact (erf)
    GELU; computed in float32 (float64 for float64 input), rounded once to h's dtype, contiguous
    whatever h's strides (as the op's fake implementation says)."""
    value, gate = h.to(compute_dtype(h)).chunk(2, dim=-1)
    return (value * F.gelu(gate)).to(h.dtype).contiguous()


def geglu_backward(grad_out: Tensor, h: Tensor) -> Tensor:
    """The gradient of geglu with respect to h, (..., 2 x hidden) in h's dtype: d value = g gelu(gate),
    d gate = g value gelu'(gate), gelu'(x) = Phi(x) + x phi(x)."""
    cdt = compute_dtype(h)
    value, gate = h.to(cdt).chunk(2, dim=-1)
    grad = grad_out.to(cdt)
    cdf = 0.5 * (1 + torch.erf(gate * 0.5**0.5))
    pdf = torch.exp(-0.5 * gate * gate) * (2 * torch.pi) ** -0.5
    return torch.cat([grad * gate * cdf, grad * value * (cdf + gate * pdf)], dim=-1).to(h.dtype)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over x's last dimension with affine weight and bias (F.layer_norm's meaning),
    computed in float32 (float64 for float64 x), rounded once to x's dtype, contiguous."""
    cdt = compute_dtype(x)
    out = F.layer_norm(x.to(cdt), x.shape[-1:], weight.to(cdt), bias.to(cdt), eps)
    return out.to(x.dtype).contiguous()


def layer_norm_backward(grad_out: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of layer_norm: with x̂ = (x - mean) rstd and g = grad_out * weight per row,
    d x = rstd (g - mean(g) - x̂ mean(g x̂)) in x's dtype; d weight = sum over rows of grad_out x̂ and
    d bias = sum over rows of grad_out, both float32 (float64 for float64 x)."""
    cdt = compute_dtype(x)
    xs = x.to(cdt)
    centred = xs - xs.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    normalised = centred * rstd
    grad = grad_out.to(cdt)
    g = grad * weight.to(cdt)
    grad_x = rstd * (g - g.mean(dim=-1, keepdim=True) - normalised * (g * normalised).mean(dim=-1, keepdim=True))
    rows = (x.shape[:-1].numel(), x.shape[-1])  # also for 1-D x and zero channels
    return grad_x.to(x.dtype), (grad * normalised).reshape(rows).sum(dim=0), grad.reshape(rows).sum(dim=0)
