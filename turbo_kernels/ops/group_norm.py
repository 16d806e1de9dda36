"""GroupNorm followed by SiLU, as VideoCrafter2's ResBlocks, temporal convolutions and output layer
run them: `turbo_kernels.group_norm_silu(x, weight, bias, groups, eps)`.

The statistics come from the fused temporal block's reduction (`turbo_kernels::group_norm_stats`,
deterministic partials merged with Chan's formula), the normalisation and SiLU from one pass
(`turbo_kernels::channel_affine_silu`) that writes a contiguous output. torch's GroupNorm reduces
each (sample, group) in one thread block: a temporal convolution's GroupNorm normalises each
video's (C/32, F, H, W), 32 rows of 410k elements at the first level of a 16-frame 320x512 clip,
so 32 blocks on 132 SMs; on the second lease's H100 its statistics kernel took 52 of the 519 ms of
a 4-step generation, its normalisation 23 ms more, and the SiLU after it another pass. Here the
statistics split every group into one partial a frame, and the normalisation and SiLU are one
pass. Layouts without a copy: x contiguous, or the transposed view of the (B*F, C, H, W) stream
that VC2UNet's temporal convolutions normalise first.

Forward only: with gradients to record (training), under autocast (whose GroupNorm computes and
returns float32) or under torch.compile (inductor fuses the GroupNorm and SiLU itself), the
function runs F.silu(F.group_norm(...)).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from turbo_kernels import checks, dispatch
from turbo_kernels.reference import temporal_block as ref
from turbo_kernels.temporal_block import _group_norm_stats


def _triton():
    from turbo_kernels.triton_kernels import group_norm

    return group_norm


def _affine_silu_problem(x: Tensor, scale: Tensor, shift: Tensor) -> Optional[str]:
    problem = checks.storage_problem(x)
    if problem:
        return problem
    if x.stride(4) != 1 or (x.shape[3] > 1 and x.stride(3) != x.shape[4]):
        return "x's positions (H, W) are not contiguous"
    if scale.dtype != torch.float32 or shift.dtype != torch.float32 or not (scale.is_contiguous() and shift.is_contiguous()):
        return "scale and shift must be contiguous float32"
    return None


dispatch.register("channel_affine_silu", "reference")(ref.channel_affine_silu)
dispatch.register("channel_affine_silu", "triton", _affine_silu_problem)(lambda *a: _triton().channel_affine_silu(*a))


@torch.library.custom_op("turbo_kernels::channel_affine_silu", mutates_args=())
def _channel_affine_silu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return dispatch.run("channel_affine_silu", x.device, x, scale, shift)


@_channel_affine_silu.register_fake
def _(x, scale, shift):
    return x.new_empty(x.shape)


def _group_stats(x: Tensor, groups: int, eps: float) -> Optional[tuple[Tensor, Tensor]]:
    """(mean, rstd), each (B, groups), of x (B, C, F, H, W) over every (sample, group)'s (C/groups,
    F, H, W), read without a copy; None for a layout the reduction cannot take."""
    batch, channels, frames, height, width = x.shape
    if x.transpose(1, 2).is_contiguous():
        # The stream (B*F, C, H, W) itself: every frame's groups are contiguous runs.
        return _group_norm_stats(x.transpose(1, 2).reshape(batch * frames, channels, height, width), frames, groups, eps)
    if x.is_contiguous():
        # A group is one contiguous run of (C/groups)*F*H*W elements: reduce it as F "frames" of
        # one group each, so that each partial streams one frame's worth of the group.
        rows = x.reshape(batch * groups * frames, channels // groups, height, width)
        mean, rstd = _group_norm_stats(rows, frames, 1, eps)
        return mean.view(batch, groups), rstd.view(batch, groups)
    return None


def _fused_path(x: Tensor, weight: Tensor, bias: Tensor) -> bool:
    # Autocast runs GroupNorm in float32 (and returns float32): the composition keeps its dtypes.
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias)))


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """silu(group_norm(x)) of x (N, C, H, W) (each sample's groups over (C/groups, H, W)) or (B, C,
    F, H, W) (each video's over (C/groups, F, H, W)), with the affine weight and bias (C,), as
    F.silu(F.group_norm(x, groups, weight, bias, eps)) computes it; contiguous, in x's dtype.
    Runs that very composition when gradients are recorded, under autocast or while torch.compile
    traces (module docstring)."""
    checks.floating_tensor(x, "x")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be (N, C, H, W) or (B, C, F, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    checks.group_count(groups, "groups", channels, "channels")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor) or t.shape != (channels,):
            raise ValueError(f"{name} must be a ({channels},) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    video = x if x.dim() == 5 else x.unsqueeze(2)
    stats = _group_stats(video, groups, eps) if _fused_path(x, weight, bias) and video.numel() else None
    if stats is None:
        return F.silu(F.group_norm(x, groups, weight, bias, eps)).contiguous()
    mean, rstd = stats
    group_size = channels // groups
    mean, rstd = (t.repeat_interleave(group_size, dim=1) for t in (mean, rstd))
    scale = rstd * weight.to(rstd.dtype)
    shift = bias.to(rstd.dtype) - mean * scale
    out = _channel_affine_silu(video, scale.contiguous(), shift.contiguous())
    return out if x.dim() == 5 else out.squeeze(2)
