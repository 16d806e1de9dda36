"""The temporal transformer of VideoCrafter2's UNet (SPEC 1), fused to run on the main stream's
(B*F, C, H, W) layout without layout copies.

The reference (reference.temporal_block.temporal_transformer, the release's code path) moves the
stream into tokens (B*H*W, F, C) and back. At inner width = C the dispatcher sees 11
full-activation copies a layer: two rearranges into tokens, the head split (q, k, v) and merge of
each attention (8), and the rearrange back; GroupNorm also needs its permuted (B, C, F, H, W)
input contiguous (in this torch that copy happens inside aten::native_group_norm). The UNet's
return to (B*F, C, H, W) is a view, as the residual add takes the input's layout.
tests/test_temporal_block.py counts them.

The fused forward makes none. Every layout change is absorbed into the addressing of a GEMM:
- GroupNorm statistics over (C/32, F, H, W) per video: a Triton reduction over the stream
  (two passes over each chunk, the second from cache; deterministic partials per frame, merged
  per video), `group_norm_stats`.
- Normalisation is applied while proj_in loads its operand: the tokens of frame row r are the
  stream's (C, H*W) slab read transposed (channel stride H*W), and GroupNorm is a per-(video,
  channel) affine x*scale + shift of it, so `strided_linear` (triton_kernels/group_norm.py) reads
  NCHW and writes proj_in's output (B*F, H*W, inner) row-major: the "frames" token layout. This
  removes the GroupNorm output, its permuted copies and the proj_in input copy altogether; a
  separate normalise-and-transpose kernel would still write and re-read one activation.
- Temporal attention runs on that "frames" layout directly, with q, k, v strided slices of one
  fused [to_q; to_k; to_v] projection: no head split/merge. It goes through
  ops.attention.temporal_attention_packed, whose backward writes the gradients of the three
  slices into one tensor, the projection's output gradient; through three slices autograd would
  concatenate them (0.11 ms at 40x64 in the third lease's profile).
- to_out.0 and ff.net.2 read and write row-major tokens, the layout cuBLAS takes as it is, so they
  run there (bias in its epilogue) and add their residual after: on an H100 the
  strided_linear kernel took about 3x cuBLAS's time per FLOP at these GEMM shapes (the third
  lease's profile), far more than the extra elementwise pass costs. The GEGLU between ff.net.0
  and ff.net.2 is one pass (turbo_kernels.geglu), not gelu, product and, backward, a
  concatenation.
- norm1/norm2/norm3 run on turbo_kernels.layer_norm: torch's LayerNorm backward spent 176 µs a
  call at 40x64 latents (H100, bf16) summing the weight and bias gradients over 40960 rows, which
  the Triton backward folds into its one pass as per-program partial sums.
- proj_out writes its output transposed, i.e. straight into the stream's (B*F, C, H, W) layout,
  with the stream itself added as the residual in the epilogue. torch.baddbmm into that layout
  would copy the residual into the output first and needs a separate bias pass.
The only copies left are of weights (the [to_q; to_k; to_v] concatenation, dtype casts), in
the backward too (the reference's backward copies 10 activations).

That is the "strided" projection route. Where strided_linear's GEMMs cost more than the layout
passes they save (small frames, where cuBLAS's per-FLOP advantage dominates), the "cublas" route
runs proj_in and proj_out on cuBLAS instead: channel_affine normalises the stream into row-major
tokens in one Triton pass, and proj_out's output is added back to the stream transposed
(projection_route, fused_temporal_transformer).

A torch.channels_last stream, as VC2UNet's channels-last convolutions hand it over
(benchmarks.models' kernels-nhwc), is (B*F, H, W, C) in memory: its tokens, the view
x.flatten(2).transpose(1, 2), are already the row-major "frames" layout, and its videos
(B, C, F, H, W) lie channels_last_3d. It takes the cuBLAS route at any size (and refuses
"strided": there is no layout change left for strided_linear to absorb): group_norm_stats reduces
the videos with the channels-last statistics kernel group_norm_silu uses, channel_affine reads
the tokens in place, and proj_out's output, row-major tokens, is the stream's own layout, so the
residual add returns a channels_last output. Backward, channel_affine_backward reads and writes
row-major tokens and group_norm_stats_backward indexes channels innermost, so x's gradient is
channels_last too. No activation copy either way (when the output's gradient arrives
channels_last).

Autograd: group_norm_stats, strided_linear and its weight gradient are torch.library custom ops
(dispatch picks triton | reference per call), differentiable through composition: GroupNorm enters
proj_in as scale = rstd*gamma and shift = beta - mean*scale, tiny (B, C) tensors built with plain
PyTorch ops; strided_linear's backward returns the gradients of x, scale and shift, and the
statistics op's backward (d mean, d rstd -> d x) completes GroupNorm's gradient. Both are one
pass over the stream each, custom ops too: channel_affine_backward (d x = d a * scale while it
sums d a and d a * x per channel for d scale and d shift) and group_norm_stats_backward; composed
from PyTorch ops they took about 14 passes, some in float32. The backward GEMMs are strided_linear
again (transposed weight views) and a deterministic weight-gradient kernel, whose launch also
sums the bias gradient in programs of its own (they read the gradient again, alongside the
weight programs; torch's separate reduction took about 80 µs a call at 40x64, H100, in the third
lease's profile). No global state:
gradient checkpointing can recompute.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from turbo_kernels import checks, dispatch
from turbo_kernels.ops.attention import temporal_attention_packed
from turbo_kernels.ops.geglu import geglu
from turbo_kernels.ops.layer_norm import layer_norm as _layer_norm
from turbo_kernels.reference import temporal_block as ref



def _triton():
    from turbo_kernels.triton_kernels import group_norm

    return group_norm


# ---- Triton backend: what its kernels cannot take ---------------------------------------------


def _kernel_problem(storage: dict[str, Optional[Tensor]], fp32: dict[str, Optional[Tensor]]) -> Optional[str]:
    """Why the kernels cannot take these tensors: `storage` tensors must share one kernel dtype,
    `fp32` ones be float32, all on one device."""
    storage = {name: t for name, t in storage.items() if t is not None}
    fp32 = {name: t for name, t in fp32.items() if t is not None}
    problem = checks.storage_problem(*storage.values())
    if problem:
        return problem
    for name, t in fp32.items():
        if t.dtype != torch.float32:
            return f"{name} must be float32, got {t.dtype}"
        if not t.is_contiguous():
            return f"{name} must be contiguous (the kernels index it as rows of channels)"
    if len({t.device for t in (*storage.values(), *fp32.values())}) > 1:
        return "tensors on several devices"
    return None


def _stream_layout_problem(x: Tensor) -> Optional[str]:
    """Why the statistics' kernels cannot walk x: they take a (B*F, C, H, W) stream contiguous or
    torch.channels_last."""
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return "x is neither a contiguous nor a channels_last (B*F, C, H, W) stream"
    return None


def _stats_problem(x, num_frames, groups, eps):
    return _stream_layout_problem(x) or _kernel_problem(dict(x=x), {})


def _linear_problem(x, weight, bias, residual, scale, shift, num_frames, channels_first_out):
    return _kernel_problem(dict(x=x, weight=weight, bias=bias, residual=residual), dict(scale=scale, shift=shift))


def _weight_grad_problem(grad_out, x, scale, shift, num_frames):
    return _kernel_problem(dict(grad_out=grad_out, x=x), dict(scale=scale, shift=shift))


def _stats_backward_problem(x, mean, rstd, grad_mean, grad_rstd, num_frames):
    problem = _stream_layout_problem(x)
    if problem:
        return problem
    videos = x.shape[0] // num_frames
    if any(t.dim() != 2 or t.shape[0] != videos for t in (mean, rstd, grad_mean, grad_rstd)):
        return f"the statistics and their gradients must be ({videos}, groups)"
    return _kernel_problem(dict(x=x), dict(mean=mean, rstd=rstd, grad_mean=grad_mean, grad_rstd=grad_rstd))


def _affine_problem(x, scale, shift, num_frames):
    if x.shape[0] % num_frames:
        return f"x's {x.shape[0]} rows are not whole videos of num_frames={num_frames}"
    if scale.shape != (x.shape[0] // num_frames, x.shape[2]) or shift.shape != scale.shape:
        return f"scale and shift must be ({x.shape[0] // num_frames}, {x.shape[2]})"
    return _kernel_problem(dict(x=x), dict(scale=scale, shift=shift))


def _affine_backward_problem(grad_a, x, scale, num_frames):
    if x.shape[0] % num_frames:
        return f"x's {x.shape[0]} rows are not whole videos of num_frames={num_frames}"
    if grad_a.shape != x.shape or scale.shape != (x.shape[0] // num_frames, x.shape[2]):
        return f"grad_a must have x's shape and scale be ({x.shape[0] // num_frames}, {x.shape[2]})"
    return _kernel_problem(dict(grad_a=grad_a, x=x), dict(scale=scale))


dispatch.register("group_norm_stats", "reference")(ref.group_norm_stats)
dispatch.register("group_norm_stats", "triton", _stats_problem)(lambda *a: _triton().group_norm_stats(*a))
dispatch.register("strided_linear", "reference")(ref.strided_linear)
dispatch.register("strided_linear", "triton", _linear_problem)(lambda *a: _triton().strided_linear(*a))
dispatch.register("strided_linear_weight_grad", "reference")(ref.strided_linear_weight_grad)
dispatch.register("strided_linear_weight_grad", "triton", _weight_grad_problem)(
    lambda *a: _triton().strided_linear_weight_grad(*a)
)
dispatch.register("group_norm_stats_backward", "reference")(ref.group_norm_stats_backward)
dispatch.register("group_norm_stats_backward", "triton", _stats_backward_problem)(
    lambda *a: _triton().group_norm_stats_backward(*a)
)
dispatch.register("channel_affine", "reference")(lambda *a: ref.channel_affine(*a).contiguous())
dispatch.register("channel_affine", "triton", _affine_problem)(lambda *a: _triton().channel_affine(*a))
dispatch.register("channel_affine_backward", "reference")(ref.channel_affine_backward)
dispatch.register("channel_affine_backward", "triton", _affine_backward_problem)(
    lambda *a: _triton().channel_affine_backward(*a)
)


# ---- custom ops --------------------------------------------------------------------------------


@dispatch.custom_op("turbo_kernels::group_norm_stats")
def _group_norm_stats(x: Tensor, num_frames: int, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    return dispatch.run("group_norm_stats", x.device, x, num_frames, groups, eps)


@_group_norm_stats.register_fake
def _(x, num_frames, groups, eps):
    shape = (x.shape[0] // num_frames, groups)
    return x.new_empty(shape, dtype=ref.compute_dtype(x)), x.new_empty(shape, dtype=ref.compute_dtype(x))


def _stats_setup(ctx, inputs, output):
    x, num_frames, _, _ = inputs
    mean, rstd = output
    ctx.save_for_backward(x, mean, rstd)
    ctx.num_frames = num_frames
    ctx.backend = dispatch.requested_backend()


def _stats_backward(ctx, grad_mean, grad_rstd):
    x, mean, rstd = ctx.saved_tensors
    # The statistics' gradients are tiny (B, groups) tensors: zeros where unused, contiguous.
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.contiguous()
    grad_rstd = torch.zeros_like(rstd) if grad_rstd is None else grad_rstd.contiguous()
    grad_x = _group_norm_stats_backward(x, mean, rstd, grad_mean, grad_rstd, ctx.num_frames, ctx.backend)
    return grad_x, None, None, None


_group_norm_stats.register_autograd(_stats_backward, setup_context=_stats_setup)


@dispatch.custom_op("turbo_kernels::group_norm_stats_backward")
def _group_norm_stats_backward(
    x: Tensor, mean: Tensor, rstd: Tensor, grad_mean: Tensor, grad_rstd: Tensor, num_frames: int,
    backend: Optional[str] = None,
) -> Tensor:
    return dispatch.run(
        "group_norm_stats_backward", x.device, x, mean, rstd, grad_mean, grad_rstd, num_frames, requested=backend
    )


@_group_norm_stats_backward.register_fake
def _(x, mean, rstd, grad_mean, grad_rstd, num_frames, backend=None):
    return torch.empty_like(x)


@dispatch.custom_op("turbo_kernels::channel_affine")
def _channel_affine(x: Tensor, scale: Tensor, shift: Tensor, num_frames: int) -> Tensor:
    return dispatch.run("channel_affine", x.device, x, scale, shift, num_frames)


@_channel_affine.register_fake
def _(x, scale, shift, num_frames):
    return x.new_empty(x.shape)


def _affine_setup(ctx, inputs, output):
    x, scale, _, num_frames = inputs
    ctx.save_for_backward(x, scale)
    ctx.num_frames = num_frames
    ctx.backend = dispatch.requested_backend()


def _affine_backward(ctx, grad_a):
    x, scale = ctx.saved_tensors
    grad_x, grad_scale, grad_shift = _channel_affine_backward(grad_a, x, scale, ctx.num_frames, ctx.backend)
    return grad_x, grad_scale, grad_shift, None


_channel_affine.register_autograd(_affine_backward, setup_context=_affine_setup)


@dispatch.custom_op("turbo_kernels::channel_affine_backward")
def _channel_affine_backward(
    grad_a: Tensor, x: Tensor, scale: Tensor, num_frames: int, backend: Optional[str] = None
) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch.run("channel_affine_backward", x.device, grad_a, x, scale, num_frames, requested=backend)


@_channel_affine_backward.register_fake
def _(grad_a, x, scale, num_frames, backend=None):
    return torch.empty_like(x), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


@dispatch.custom_op("turbo_kernels::strided_linear")
def _strided_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], num_frames: int, channels_first_out: bool, backend: Optional[str] = None,
) -> Tensor:
    return dispatch.run(
        "strided_linear", x.device, x, weight, bias, residual, scale, shift, num_frames, channels_first_out,
        requested=backend,
    )


@_strided_linear.register_fake
def _(x, weight, bias, residual, scale, shift, num_frames, channels_first_out, backend=None):
    rows, tokens, _ = x.shape
    return x.new_empty((rows, weight.shape[0], tokens) if channels_first_out else (rows, tokens, weight.shape[0]))


@dispatch.custom_op("turbo_kernels::strided_linear_weight_grad")
def _strided_linear_weight_grad(
    grad_out: Tensor, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], num_frames: int,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    return dispatch.run(
        "strided_linear_weight_grad", x.device, grad_out, x, scale, shift, num_frames, requested=backend
    )


@_strided_linear_weight_grad.register_fake
def _(grad_out, x, scale, shift, num_frames, backend=None):
    out_features, dtype = grad_out.shape[2], ref.compute_dtype(x)
    return x.new_empty((out_features, x.shape[2]), dtype=dtype), x.new_empty((out_features,), dtype=dtype)


def _is_channels_first(x: Tensor) -> bool:
    """Whether the (R, M, K) tensor x is a view of (R, K, M) memory, as the stream's tokens are."""
    return x.stride(1) < x.stride(2)


def _linear_setup(ctx, inputs, output):
    x, weight, _, _, scale, shift, num_frames, channels_first_out, backend = inputs
    ctx.save_for_backward(x, weight, scale, shift)
    ctx.num_frames = num_frames
    ctx.channels_first_out = channels_first_out
    ctx.backend = dispatch.requested_backend() if backend is None else backend


def _linear_backward(ctx, grad_out):
    x, weight, scale, shift = ctx.saved_tensors
    needs_x, needs_weight, needs_bias, needs_residual, needs_scale, needs_shift = ctx.needs_input_grad[:6]
    num_frames = ctx.num_frames
    grad = grad_out.transpose(1, 2) if ctx.channels_first_out else grad_out  # (R, M, J), any strides
    grad_x = grad_weight = grad_bias = grad_scale = grad_shift = None
    if needs_x or needs_scale or needs_shift:
        # The gradient of a = x*scale + shift, laid out as x is (the stream's layout for proj_in).
        channels_first = _is_channels_first(x)
        grad_a = _strided_linear(grad, weight.t(), None, None, None, None, num_frames, channels_first, ctx.backend)
        grad_a = grad_a.transpose(1, 2) if channels_first else grad_a
        if scale is None:
            grad_x = grad_a
        else:
            # One pass: d x = d a * scale, and the per-channel sums that give d scale and d shift.
            grad_x, grad_scale, grad_shift = _channel_affine_backward(grad_a, x, scale, num_frames, ctx.backend)
            grad_x, grad_scale, grad_shift = (
                grad if needed else None
                for grad, needed in ((grad_x, needs_x), (grad_scale, needs_scale), (grad_shift, needs_shift))
            )
    if needs_weight:
        # The same launch sums the bias gradient, whether needed or not.
        grad_weight, bias_sum = _strided_linear_weight_grad(grad, x, scale, shift, num_frames, ctx.backend)
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = bias_sum.to(weight.dtype) if needs_bias else None
    elif needs_bias:
        grad_bias = grad.sum(dim=(0, 1), dtype=ref.compute_dtype(grad)).to(weight.dtype)
    return (
        grad_x, grad_weight, grad_bias, grad_out if needs_residual else None, grad_scale, grad_shift, None, None, None
    )


_strided_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---- the module --------------------------------------------------------------------------------


class TemporalSelfAttention(nn.Module):
    """The release's CrossAttention used as temporal self-attention: to_q, to_k, to_v (no bias),
    to_out.0."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)


class FeedForward(nn.Module):
    """net.0 = GEGLU (value = first half, gate = second half, exact GELU), net.2 = Linear back."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is the release's Dropout(p=0), kept so the checkpoint keys line up.
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])


class TemporalTransformerBlock(nn.Module):
    """BasicTransformerBlock with temporal self-attention only (registration order as released)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = TemporalSelfAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = TemporalSelfAttention(dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim, eps=ref.LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=ref.LAYER_NORM_EPS)
        self.norm3 = nn.LayerNorm(dim, eps=ref.LAYER_NORM_EPS)


PROJECTION_ROUTES = ("auto", "strided", "cublas")
# Below this many latent pixels a frame, "auto" runs proj_in and proj_out on cuBLAS. A prior from
# the third lease (H100, bf16), to be set from benchmarks.temporal_block's triton-strided and
# triton-cublas rows: strided_linear took about 3x cuBLAS's time per FLOP on the block's GEMM
# shapes, while the layout passes the cuBLAS route adds cost about 5 µs each at 10x16.
CUBLAS_PROJECTIONS_BELOW = 640


def projection_route(projections: str, positions: int, channels_last: bool = False) -> str:
    """"strided" or "cublas": the route `projections` ("auto", "strided" or "cublas") takes for
    frames of `positions` latent pixels, of a channels_last stream if `channels_last`. A
    channels_last stream's tokens are already row-major, so there is no layout change for
    strided_linear to absorb: it takes cuBLAS whatever the size, and refuses "strided"."""
    if projections not in PROJECTION_ROUTES:
        raise ValueError(f"projections must be one of {PROJECTION_ROUTES}, got {projections!r}")
    if channels_last:
        if projections == "strided":
            raise ValueError(
                'projections="strided" reads and writes a contiguous stream; a channels_last stream takes "cublas" '
                '(or "auto")'
            )
        return "cublas"
    if projections != "auto":
        return projections
    return "cublas" if positions < CUBLAS_PROJECTIONS_BELOW else "strided"


def is_channels_last_stream(x: Tensor) -> bool:
    """Whether the (B*F, C, H, W) stream x lies torch.channels_last ((B*F, H, W, C) in memory) and
    not also contiguous (frames of one pixel are both): the fused path's channels-last route."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class FusedTemporalTransformer(nn.Module):
    """VideoCrafter2's TemporalTransformer (use_linear, temporal self-attention only) on the main
    stream x (B*F, C, H, W), frame-major, contiguous or channels_last; forward(x, num_frames)
    returns the same shape, dtype and layout.

    Parameters carry the release's state-dict names (norm, proj_in, transformer_blocks.{i}.{attn1,
    ff, attn2, norm1, norm2, norm3}, proj_out), so a checkpoint's temporal transformer loads
    strictly. The fused path (module docstring) runs by default; `use_reference=True`, or
    `reference_forward`, runs the release's plain PyTorch path instead. Parameters are cast to the
    stream's dtype (the LayerNorms read float32 ones as they are), and autocast is off inside: the
    stream's dtype is the compute dtype.
    """

    def __init__(
        self, in_channels: int, heads: int, head_dim: int, depth: int = 1, use_reference: bool = False,
        projections: str = "auto",
    ):
        super().__init__()
        checks.group_count(ref.GROUPS, "groups", in_channels, "channels")
        for value, name in ((heads, "heads"), (head_dim, "head_dim"), (depth, "depth")):
            checks.positive_int(value, name)
        projection_route(projections, 0)
        inner = heads * head_dim
        self.heads = heads
        self.depth = depth
        self.use_reference = use_reference
        self.projections = projections
        self.norm = nn.GroupNorm(ref.GROUPS, in_channels, eps=ref.GROUP_NORM_EPS, affine=True)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(TemporalTransformerBlock(inner, heads, head_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, in_channels)
        # The release zero-initialises proj_out (zero_module), so a fresh layer is the identity.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        if self.use_reference:
            return self.reference_forward(x, num_frames)
        return fused_temporal_transformer(self, x, num_frames)

    def reference_forward(self, x: Tensor, num_frames: int) -> Tensor:
        _check_stream(self.norm, x, num_frames)
        return ref.temporal_transformer(x, num_frames, dict(self.named_parameters()), self.heads, self.depth)


def fused_temporal_transformer(
    layer: nn.Module,
    x: Tensor,
    num_frames: int,
    proj_in_weight: Optional[Tensor] = None,
    proj_out_weight: Optional[Tensor] = None,
    projections: Optional[str] = None,
) -> Tensor:
    """The fused path (module docstring) on `layer`'s own parameters: a FusedTemporalTransformer, or
    any module with its structure and the release's names (norm, proj_in, transformer_blocks.{i}.
    {norm1, attn1, norm2, attn2, norm3, ff}, proj_out; attn1/attn2 carry `heads`), as VC2UNet's
    temporal layers are. proj_in_weight / proj_out_weight stand in for layer.proj_in / proj_out's
    weights where those are not (out, in) matrices (the release's init_attn uses Conv1d(k=1)).
    `projections` (default: layer.projections, else "auto") routes proj_in and proj_out
    (projection_route): "strided" runs them on strided_linear, reading and writing the stream's
    layout; "cublas" normalises the stream into row-major tokens (channel_affine, one pass),
    projects on cuBLAS, and adds proj_out's output back transposed (one more pass, and autograd
    copies its gradient once for cuBLAS). A channels_last stream (is_channels_last_stream) always
    takes "cublas" and refuses "strided": its tokens are row-major as they lie, the output is
    channels_last, and neither pass copies an activation when the output's gradient arrives
    channels_last too (then x's gradient is channels_last); a gradient in another layout is
    copied once for cuBLAS, and x's gradient then takes that layout. Parameters are cast to the stream's dtype (the
    LayerNorms read float32 ones as they are) and autocast is off inside."""
    _check_stream(layer.norm, x, num_frames)
    proj_in_weight = layer.proj_in.weight if proj_in_weight is None else proj_in_weight
    proj_out_weight = layer.proj_out.weight if proj_out_weight is None else proj_out_weight
    projections = getattr(layer, "projections", "auto") if projections is None else projections
    rows, channels, height, width = x.shape
    cublas = projection_route(projections, height * width, is_channels_last_stream(x)) == "cublas"
    # Meta tensors (shape inference) have no autocast to turn off, and torch.autocast refuses them.
    no_autocast = (
        torch.autocast(x.device.type, enabled=False)
        if checks.autocast_available(x.device.type) else contextlib.nullcontext()
    )
    with no_autocast:
        scale, shift = _group_norm_affine(layer.norm, x, num_frames)
        stream = x.flatten(2)  # (B*F, C, H*W): a view of the stream
        proj_in_bias, proj_out_bias = layer.proj_in.bias.to(x.dtype), layer.proj_out.bias.to(x.dtype)
        if cublas:
            tokens = _channel_affine(stream.transpose(1, 2), scale, shift, num_frames)
            h = F.linear(tokens, proj_in_weight.to(x.dtype), proj_in_bias)
        else:
            h = _strided_linear(
                stream.transpose(1, 2), proj_in_weight.to(x.dtype), proj_in_bias, None, scale, shift, num_frames, False
            )
        for block in layer.transformer_blocks:
            h = _fused_block(block, h, num_frames)
        if cublas:
            # The stream first: the sum takes its layout, not the transposed projection's.
            out = stream + F.linear(h, proj_out_weight.to(x.dtype), proj_out_bias).transpose(1, 2)
        else:
            out = _strided_linear(h, proj_out_weight.to(x.dtype), proj_out_bias, stream, None, None, num_frames, True)
    return out.view(rows, channels, height, width)


def _fused_block(block: nn.Module, h: Tensor, num_frames: int) -> Tensor:
    def layer_norm(norm):
        return _layer_norm(h, norm.weight, norm.bias, norm.eps)

    h = _fused_attention(block.attn1, layer_norm(block.norm1), h, num_frames)
    h = _fused_attention(block.attn2, layer_norm(block.norm2), h, num_frames)
    return _fused_feed_forward(block.ff, layer_norm(block.norm3), h)


def _fused_attention(attn: nn.Module, x: Tensor, residual: Tensor, num_frames: int) -> Tensor:
    """residual + to_out(attention(x)) on (B*F, N, dim) "frames" tokens."""
    w_qkv = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).to(x.dtype)
    out = temporal_attention_packed(F.linear(x, w_qkv), num_frames, attn.heads, layout="frames")
    to_out = attn.to_out[0]
    return _linear_plus_residual(out, to_out, residual)


def _fused_feed_forward(ff: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """residual + net.2(GEGLU(x)): value = first half of net.0.proj, gate = second half, exact GELU
    (turbo_kernels.geglu: one pass each way, no concatenation of the two halves' gradients)."""
    proj = ff.net[0].proj
    hidden = geglu(F.linear(x, proj.weight.to(x.dtype), proj.bias.to(x.dtype)))
    return _linear_plus_residual(hidden, ff.net[2], residual)


def _linear_plus_residual(x: Tensor, linear: nn.Linear, residual: Tensor) -> Tensor:
    """residual + linear(x) on row-major tokens: cuBLAS, then one add. Not add_: F.linear's 3-D
    output is a view of its matrix product, and autograd's backward of an in-place op on a view
    copies the gradient four times (tests/test_temporal_block.py counts the copies)."""
    return F.linear(x, linear.weight.to(x.dtype), linear.bias.to(x.dtype)) + residual


def _group_norm_affine(norm: nn.GroupNorm, x: Tensor, num_frames: int) -> tuple[Tensor, Tensor]:
    """GroupNorm of video b as a per-channel affine of x: (scale, shift), each (B, C) float32."""
    mean, rstd = _group_norm_stats(x, num_frames, norm.num_groups, norm.eps)
    return ref.group_affine(mean, rstd, norm.weight, norm.bias)


def _check_stream(norm: nn.GroupNorm, x: Tensor, num_frames: int) -> None:
    checks.floating_tensor(x, "x")
    if x.dim() != 4 or x.shape[1] != norm.num_channels:
        raise ValueError(f"x must be the stream (B*F, C={norm.num_channels}, H, W), got shape {tuple(x.shape)}")
    checks.positive_int(num_frames, "num_frames")
    if x.shape[0] % num_frames:
        raise ValueError(f"x's first dimension {x.shape[0]} (B*F) is not divisible by num_frames={num_frames}")
    if x.device != norm.weight.device:
        raise ValueError(f"x is on {x.device}, expected the device of the layer's parameters ({norm.weight.device})")
