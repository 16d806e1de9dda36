"""GroupNorm followed by SiLU, as VideoCrafter2's ResBlocks, temporal convolutions and output layer
run them: `turbo_kernels.group_norm_silu(x, weight, bias, groups, eps)`.

The statistics come from the fused temporal block's reduction (`turbo_kernels::group_norm_stats`,
deterministic partials merged with Chan's formula; for channels-last x
`turbo_kernels::channels_last_group_norm_stats`, whose partials the same merge combines), the
normalisation and SiLU from one pass (`turbo_kernels::channel_affine_silu`) that writes a
contiguous output, or a channels-last one for channels-last x. torch's GroupNorm reduces
each (sample, group) in one thread block: a temporal convolution's GroupNorm normalises each
video's (C/32, F, H, W), 32 rows of 410k elements at the first level of a 16-frame 320x512 clip,
so 32 blocks on 132 SMs; on the second lease's H100 its statistics kernel took 52 of the 519 ms of
a 4-step generation, its normalisation 23 ms more, and the SiLU after it another pass. Here the
statistics split every group into partials (a frame's share of a video's group, one channel of
a frame's group; the stream's transposed view four groups of a frame a program), merged
exactly, and the affine, normalisation and SiLU are one pass: three launches a call. Layouts
without a copy: x contiguous, the transposed view of the (B*F, C, H, W) stream that VC2UNet's
temporal convolutions normalise first, and channels-last x ((B, F, H, W, C) in memory: (N, C, H,
W) frames in torch.channels_last, (B, C, F, H, W) videos in torch.channels_last_3d, the
transposed view of a channels_last stream), as channels-last convolutions hand them over. There
a group's channels recur every C elements: a statistics program reduces a few whole groups in
tiles along the channels over a chunk of positions, and the output and x's gradient keep x's
layout, as the composition does on the CPU (CUDA's GroupNorm returns contiguous; an output
gradient in another layout is copied into x's once).

Differentiable (first-order gradients only): `channel_affine_silu_backward` is two passes, the
per-(sample, channel) sums of d a = d y * silu'(a) and d a * x, then x's whole gradient (through
the affine and the statistics, from per-group coefficients that a third, tiny launch computes
between them) written once; reads x and d y twice
and writes d x once, where the affine's backward, the statistics' backward and their sum would
move about 8 tensors. Under CUDA autocast, whose GroupNorm reads 16-bit x as float32 and returns
float32, the kernels do the same: x read in its dtype, the output and its gradient float32, x's
gradient in x's dtype (autocast's composition would also write x's float32 copy, then GroupNorm's
and SiLU's float32 outputs). While torch.compile traces (inductor fuses the GroupNorm and SiLU
itself), and under other devices' autocast, the function runs F.silu(F.group_norm(...)).
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


def _channels_last(x: Tensor) -> bool:
    """Whether the passes read x, and write their output, channels-last ((B, F, H, W, C) in memory)."""
    return ref.affine_silu_memory_format(x) == torch.channels_last_3d


def _affine_silu_problem(
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor, out_dtype: Optional[torch.dtype] = None
) -> Optional[str]:
    problem = checks.storage_problem(x) or checks.storage_problem(weight) or checks.storage_problem(bias)
    if problem:
        return problem
    # A dimension of size 1 has no stride to honour (a transposed (..., 1, W) view reports any).
    positions_contiguous = (x.shape[4] == 1 or x.stride(4) == 1) and (x.shape[3] == 1 or x.stride(3) == x.shape[4])
    if not (positions_contiguous or _channels_last(x)):
        return "x's positions (H, W) are not contiguous, nor is x channels-last"
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (mean, rstd)):
        return "mean and rstd must be contiguous float32"
    if not (weight.is_contiguous() and bias.is_contiguous()):
        return "weight and bias must be contiguous"
    if out_dtype not in (None, x.dtype, torch.float32):
        return f"out_dtype must be x's dtype or float32, got {out_dtype}"
    return None


def _affine_silu_backward_problem(grad, x, mean, rstd, weight, bias, with_x) -> Optional[str]:
    return checks.storage_problem(grad) or _affine_silu_problem(x, mean, rstd, weight, bias)


def _triton_forward(x, mean, rstd, weight, bias, out_dtype=None):
    kernels = _triton()
    forward = kernels.channels_last_affine_silu if _channels_last(x) else kernels.channel_affine_silu
    return forward(x, mean, rstd, weight, bias, out_dtype)


dispatch.register("channel_affine_silu", "reference")(ref.channel_affine_silu)
dispatch.register("channel_affine_silu", "triton", _affine_silu_problem)(_triton_forward)


def _triton_backward(grad, x, mean, rstd, weight, bias, with_x):
    """Three launches: the partial sums, the coefficients from them (one program a group; for
    groups of more than 64 channels the composition), x's whole gradient (skipped when x needs
    none). The output's gradient is read in the output's
    layout (copied once where it arrives in another)."""
    kernels = _triton()
    memory_format = ref.affine_silu_memory_format(x)
    channels_last = memory_format == torch.channels_last_3d
    grad = grad.contiguous(memory_format=memory_format)
    partial_sums = kernels.channels_last_affine_silu_partial_sums if channels_last else kernels.channel_affine_silu_partial_sums
    sum_grad, sum_grad_x = partial_sums(grad, x, mean, rstd, weight, bias)
    wide_groups = x.shape[1] // mean.shape[1] > kernels.COEFFICIENTS_MAX_GROUP_SIZE
    coefficients = _composed_coefficients if wide_groups else kernels.group_norm_silu_coefficients
    grad_weight, grad_bias, alpha, beta = coefficients(sum_grad, sum_grad_x, tuple(x.shape), mean, rstd, weight)
    if not with_x:
        return x.new_empty(0), grad_weight, grad_bias
    grad_x_pass = kernels.channels_last_affine_silu_grad if channels_last else kernels.channel_affine_silu_grad
    grad_x = grad_x_pass(grad, x, mean, rstd, weight, bias, alpha, beta)
    return grad_x, grad_weight, grad_bias


def _composed_coefficients(sum_grad, sum_grad_x, x_shape, mean, rstd, weight):
    """The coefficients' composition on the partial sums (B, C, partials), for groups wider than
    the kernel's tile (none in VideoCrafter2's UNet or VAE)."""
    grad_weight, grad_bias, alpha, beta = ref.group_norm_silu_coefficients(
        sum_grad.sum(2), sum_grad_x.sum(2), x_shape, mean, rstd, weight
    )
    return grad_weight, grad_bias, alpha.contiguous(), beta.contiguous()


def _reference_backward(grad, x, mean, rstd, weight, bias, with_x):
    grad_x, grad_weight, grad_bias = ref.channel_affine_silu_backward(grad, x, mean, rstd, weight, bias)
    return (grad_x if with_x else x.new_empty(0)), grad_weight, grad_bias


dispatch.register("channel_affine_silu_backward", "reference")(_reference_backward)
dispatch.register("channel_affine_silu_backward", "triton", _affine_silu_backward_problem)(_triton_backward)


@dispatch.custom_op("turbo_kernels::channel_affine_silu")
def _channel_affine_silu(
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor, out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """silu(GroupNorm(x)) from x's own (mean, rstd), which carry no graph, in out_dtype (default
    x's; GroupNorm's output rounded to it): its backward gives x's whole gradient, through the
    statistics too."""
    return dispatch.run("channel_affine_silu", x.device, x, mean, rstd, weight, bias, out_dtype)


@_channel_affine_silu.register_fake
def _(x, mean, rstd, weight, bias, out_dtype=None):
    return torch.empty(
        x.shape, dtype=x.dtype if out_dtype is None else out_dtype, device=x.device,
        memory_format=ref.affine_silu_memory_format(x),
    )


@dispatch.custom_op("turbo_kernels::channel_affine_silu_backward")
def _channel_affine_silu_backward(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor, with_x: bool,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x's whole gradient, or an empty tensor without with_x; weight's; bias's), from the
    output's gradient in the output's dtype."""
    return dispatch.run(
        "channel_affine_silu_backward", x.device, grad, x, mean, rstd, weight, bias, with_x, requested=backend
    )


@_channel_affine_silu_backward.register_fake
def _(grad, x, mean, rstd, weight, bias, with_x, backend=None):
    per_channel = x.new_empty(x.shape[1:2], dtype=ref.compute_dtype(x))
    return torch.empty_like(x) if with_x else x.new_empty(0), per_channel, torch.empty_like(per_channel)


def _affine_silu_setup(ctx, inputs, output):
    *inputs, _ = inputs  # out_dtype: the output gradient arrives in it
    _, mean, rstd, _, _ = inputs
    if mean.requires_grad or rstd.requires_grad:
        # The backward gives x's whole gradient, the statistics' part included: mean and rstd must
        # be x's own, taken without a graph (as group_norm_silu takes them).
        raise ValueError("channel_affine_silu needs x's own statistics without a graph: mean and rstd require grad")
    ctx.save_for_backward(*inputs)
    ctx.backend = dispatch.requested_backend()


def _affine_silu_backward(ctx, grad):
    """x's whole gradient (through the affine and the statistics: the statistics op's own backward
    is not needed, so mean and rstd get none), and weight's and bias's."""
    x, mean, rstd, weight, bias = ctx.saved_tensors
    with_x = ctx.needs_input_grad[0]
    grad_x, grad_weight, grad_bias = _channel_affine_silu_backward(
        grad, x, mean, rstd, weight, bias, with_x, ctx.backend
    )
    return grad_x if with_x else None, None, None, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype), None


_channel_affine_silu.register_autograd(_affine_silu_backward, setup_context=_affine_silu_setup)


def _channels_last_stats_problem(x: Tensor, groups: int, eps: float) -> Optional[str]:
    if not x.is_contiguous(memory_format=torch.channels_last_3d):
        return "x is not channels-last ((B, F, H, W, C) in memory)"
    return checks.storage_problem(x)


dispatch.register("channels_last_group_norm_stats", "reference")(ref.video_group_norm_stats)
dispatch.register("channels_last_group_norm_stats", "triton", _channels_last_stats_problem)(
    lambda *a: _triton().channels_last_group_norm_stats(*a)
)


@dispatch.custom_op("turbo_kernels::channels_last_group_norm_stats")
def _channels_last_group_norm_stats(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd), each (B, groups), of x (B, C, F, H, W) channels-last over every sample's
    (C/groups, F, H, W); no gradient (group_norm_silu takes them without a graph)."""
    return dispatch.run("channels_last_group_norm_stats", x.device, x, groups, eps)


@_channels_last_group_norm_stats.register_fake
def _(x, groups, eps):
    shape = (x.shape[0], groups)
    return x.new_empty(shape, dtype=ref.compute_dtype(x)), x.new_empty(shape, dtype=ref.compute_dtype(x))


# A slice of a single frame's group holds at least this many values where the group has them:
# the statistics kernel's tile (turbo_kernels.triton_kernels.group_norm.STATS_TILE_ELEMENTS), which
# a smaller slice fills with masked lanes. One channel a slice made a 5x8 frame's 40 channels 40
# programs of 40 values in tiles of 2048 (the H200 lease: 4x eager's time at c1280, 5x8).
SLICE_MIN_ELEMENTS = 2048


def single_frame_slices(channels_per_group: int, positions: int) -> int:
    """How many equal slices of whole channels a single frame's group is reduced as: runs of the
    fewest channels (a divisor of the group's) that hold SLICE_MIN_ELEMENTS values, one run where
    the whole group holds fewer."""
    run = next(
        (c for c in range(1, channels_per_group + 1) if channels_per_group % c == 0 and c * positions >= SLICE_MIN_ELEMENTS),
        channels_per_group,
    )
    return channels_per_group // run


def _group_stats(x: Tensor, groups: int, eps: float) -> Optional[tuple[Tensor, Tensor]]:
    """(mean, rstd), each (B, groups), of x (B, C, F, H, W) over every (sample, group)'s (C/groups,
    F, H, W), read without a copy; None for a layout the reduction cannot take."""
    batch, channels, frames, height, width = x.shape
    if x.is_contiguous():
        # A group is one contiguous run of (C/groups)*F*H*W elements, reduced as equal slices
        # merged with Chan's formula, so that the partials, one a program, are many: a frame's
        # (C/groups)*H*W each for videos, runs of whole channels for single frames.
        slices = frames if frames > 1 else single_frame_slices(channels // groups, height * width)
        rows = x.reshape(batch * groups * slices, -1, 1, 1)
        mean, rstd = _group_norm_stats(rows, slices, 1, eps)
        return mean.view(batch, groups), rstd.view(batch, groups)
    if x.transpose(1, 2).is_contiguous():
        # The stream (B*F, C, H, W) itself: every frame's groups are contiguous runs.
        return _group_norm_stats(x.transpose(1, 2).reshape(batch * frames, channels, height, width), frames, groups, eps)
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        # Channels innermost, (B, F, H, W, C) in memory (channels_last frames, channels_last_3d
        # videos, the transposed view of a channels_last stream): a group's channels recur every C
        # elements, reduced in tiles across the channels.
        return _channels_last_group_norm_stats(x, groups, eps)
    return None


def _kernels_output_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype torch's composition returns, which the kernels then write; None where the
    composition itself runs: while torch.compile traces (inductor fuses GroupNorm and SiLU) and
    under autocast on devices other than CUDA (whose rules for GroupNorm differ)."""
    if torch.compiler.is_compiling():
        return None
    # Meta tensors (shape inference) have no autocast state to ask about.
    if not checks.autocast_available(x.device.type) or not torch.is_autocast_enabled(x.device.type):
        return x.dtype
    if x.device.type == "cuda":
        # CUDA autocast runs GroupNorm in float32 (16-bit inputs cast up exactly) and returns it.
        return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return None


def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """silu(group_norm(x)) of x (N, C, H, W) (each sample's groups over (C/groups, H, W)) or (B, C,
    F, H, W) (each video's over (C/groups, F, H, W)), with the affine weight and bias (C,), as
    F.silu(F.group_norm(x, groups, weight, bias, eps)) computes it: from the kernels contiguous,
    or channels-last for channels-last x, and in the composition's dtype (x's; float32 from 16-bit
    x under CUDA autocast, whose GroupNorm computes in float32), differentiable (first order) in x,
    weight and bias. Runs that very composition (its dtype and layout) while torch.compile traces,
    under autocast on other devices, or for layouts the kernels do not read (module docstring)."""
    checks.floating_tensor(x, "x")
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be (N, C, H, W) or (B, C, F, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    checks.group_count(groups, "groups", channels, "channels")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor) or t.shape != (channels,):
            raise ValueError(f"{name} must be a ({channels},) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        checks.floating_tensor(t, name)
    eps = checks.positive_float(eps, "eps")
    video = x if x.dim() == 5 else x.unsqueeze(2)
    out_dtype = _kernels_output_dtype(x)
    # No graph through the statistics: channel_affine_silu's backward gives x's whole gradient.
    with torch.no_grad():
        stats = _group_stats(video, groups, eps) if out_dtype is not None and video.numel() else None
    if stats is None:
        return F.silu(F.group_norm(x, groups, weight, bias, eps))
    out = _channel_affine_silu(video, *stats, weight, bias, out_dtype)
    return out if x.dim() == 5 else out.squeeze(2)
