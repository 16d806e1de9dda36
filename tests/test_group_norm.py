"""turbo_kernels.group_norm_silu (GroupNorm then SiLU) against torch's composition, forward and
first-order gradients, and its normalisation pass (turbo_kernels::channel_affine_silu) against
its reference, in the layouts VideoCrafter2's UNet hands it: per-frame (N, C, H, W), contiguous
videos (B, C, F, H, W) and the transposed view of the (B*F, C, H, W) stream, each also
channels-last, as channels-last convolutions return them. Triton's interpreter on the CPU;
buffers poisoned with NaN first.

Tolerance: the kernels' error against float64 maths at most twice that of the reference run in
the same storage dtype, plus one rounding of that dtype (helpers.assert_within_2x_of_reference).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import turbo_kernels as tk
from turbo_kernels import dispatch
from turbo_kernels.ops import group_norm as group_norm_ops
from turbo_kernels.reference import temporal_block as ref
from turbo_kernels.triton_kernels import group_norm as kernels

from .helpers import (
    DEVICE, KERNEL_DTYPES, RecordedOps, assert_within_2x_of_reference, record_kernel_launches, unreported_launches,
)

TRITON_USABLE = dispatch.machine_unavailable_reason("triton", DEVICE) is None
GROUPS, EPS = 32, 1e-5
LAYOUTS = ["frames", "video", "stream"]
# The same, channels-last: (B, F, H, W, C) in memory.
CHANNELS_LAST_LAYOUTS = ["frames-cl", "video-cl", "stream-cl"]


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    dispatch._warned.clear()
    monkeypatch.setattr(
        kernels, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )
    monkeypatch.setattr(kernels, "new_output_like", lambda t: torch.full_like(t, float("nan")))


def _input(layout: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """2 videos of 3 frames, 64 channels of 5x7 (ragged blocks), channel means apart so that
    centring matters: 'frames' (6, 64, 5, 7), 'video' (2, 64, 3, 5, 7) contiguous, 'stream' the
    same shape as the transposed view of a (6, 64, 5, 7) stream; with '-cl' channels-last: frames
    in torch.channels_last, the video in torch.channels_last_3d, the transposed view of a
    channels_last stream."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-2, 2, 64, dtype=torch.float64).view(1, 64, 1, 1)
    stream = (torch.randn(6, 64, 5, 7, generator=g, dtype=torch.float64) + offsets).to(device=DEVICE, dtype=dtype)
    channels_last = layout.endswith("-cl")
    if channels_last:
        stream = stream.contiguous(memory_format=torch.channels_last)
    if layout.startswith("frames"):
        return stream
    video = stream.unflatten(0, (2, 3)).transpose(1, 2)
    if layout.startswith("video"):
        return video.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
    return video


def _memory_format(layout: str) -> torch.memory_format:
    """The layout the kernels write the output (and x's gradient) in."""
    if not layout.endswith("-cl"):
        return torch.contiguous_format
    return torch.channels_last if layout.startswith("frames") else torch.channels_last_3d


def _stats_op(layout: str) -> str:
    return "channels_last_group_norm_stats" if layout.endswith("-cl") else "group_norm_stats"


def _affine(channels: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weight = 1 + 0.1 * torch.randn(channels, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(channels, generator=g, dtype=torch.float64)
    return weight, bias


def _composition(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS + CHANNELS_LAST_LAYOUTS)
def test_kernels_match_the_composition(layout, dtype, chosen):
    x = _input(layout, dtype, seed=1)
    weight, bias = _affine(64, torch.Generator().manual_seed(2))
    with torch.no_grad(), tk.backend("triton"):
        got = tk.group_norm_silu(x, weight.to(DEVICE, dtype), bias.to(DEVICE, dtype), GROUPS, EPS)
    assert chosen == [(_stats_op(layout), "triton"), ("channel_affine_silu", "triton")]
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous(memory_format=_memory_format(layout))
    same_precision = _composition(x, weight.to(DEVICE, dtype), bias.to(DEVICE, dtype))
    exact = _composition(x.double(), weight.to(DEVICE), bias.to(DEVICE))
    assert_within_2x_of_reference(got, same_precision, exact)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d], ids=["contiguous", "cl"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 32, 64)], ids=["video", "frames"])
def test_statistics_of_a_large_mean_against_a_small_spread(shape, memory_format, chosen):
    """Groups reduced as slices (a frame's, or a single frame's channel's, 2 a group of a 32x64
    frame; channels-last, chunks of positions) merged per group: each slice's mean, rounded to
    fp32, would carry an ulp of 1000 into the merge were the values not shifted (rstd off by 1e-3
    relative): within the 2x rule of torch's var_mean on the same x."""
    g = torch.Generator().manual_seed(4)
    x = (1000 + 0.01 * torch.randn(2, 64, *shape, generator=g, dtype=torch.float64)).float().to(DEVICE)
    x = x.contiguous(memory_format=memory_format)
    with torch.no_grad(), tk.backend("triton"):
        mean, rstd = group_norm_ops._group_stats(x, GROUPS, EPS)
    cl = memory_format == torch.channels_last_3d
    assert chosen == [("channels_last_group_norm_stats" if cl else "group_norm_stats", "triton")]
    per_group = x.reshape(2, GROUPS, -1)
    for got, same, exact in zip(
        (mean, rstd), _mean_rstd(per_group, EPS), _mean_rstd(per_group.double(), EPS)
    ):
        assert_within_2x_of_reference(got, same, exact)


@pytest.mark.parametrize(
    "channels_per_group, positions, slices",
    [(40, 40, 1), (40, 160, 2), (20, 640, 5), (10, 2560, 10), (2, 2048, 2), (3, 1000, 1), (1, 5, 1)],
    ids=["c1280-5x8", "c1280-10x16", "c640-20x32", "c320-40x64", "a-channel-a-tile", "no-divisor-fits", "one-channel"],
)
def test_single_frame_groups_are_sliced_into_runs_of_a_tile(channels_per_group, positions, slices):
    """VideoCrafter2's levels (32 groups): the fewest whole channels that fill the statistics
    kernel's tile make a slice, the whole group where no shorter run does (3 channels of 1000: 2
    fill it, but 2 does not divide 3)."""
    assert group_norm_ops.SLICE_MIN_ELEMENTS == kernels.STATS_TILE_ELEMENTS
    assert group_norm_ops.single_frame_slices(channels_per_group, positions) == slices


def _mean_rstd(per_group: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    variance, mean = torch.var_mean(per_group, dim=-1, correction=0)
    return mean, torch.rsqrt(variance + eps)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_a_width_of_one_with_any_stride_runs_the_kernels(chosen):
    """(N, C, H, 1) as a transposed (N, C, 1, H) view: contiguous, its width's stride (H) unused."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 1, 5, generator=g, dtype=torch.float64).to(DEVICE, torch.float32).transpose(2, 3)
    weight, bias = (t.to(DEVICE, torch.float32) for t in _affine(64, g))
    with torch.no_grad(), tk.backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", tk.TurboKernelsFallbackWarning)
        got = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
    assert chosen == [("group_norm_stats", "triton"), ("channel_affine_silu", "triton")]
    assert_within_2x_of_reference(got, _composition(x, weight, bias), _composition(x.double(), weight.double(), bias.double()))


def _statistics(seed: int) -> tuple[torch.Tensor, ...]:
    """(mean, rstd) of 2 samples' 32 groups, and a (64,) weight and bias."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(2, GROUPS, generator=g)
    rstd = 0.5 + torch.rand(2, GROUPS, generator=g)
    weight, bias = _affine(64, g)
    return tuple(t.float().to(DEVICE) for t in (mean, rstd, weight, bias))


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_affine_silu_kernel_matches_its_reference(dtype, chosen):
    """The normalisation pass alone, on the stream's transposed view (its strides in the kernel),
    with weight and bias in the storage dtype as a cast model holds them."""
    x = _input("stream", dtype, seed=3)
    mean, rstd, weight, bias = _statistics(4)
    weight, bias = weight.to(dtype), bias.to(dtype)
    with tk.backend("triton"):
        got = torch.ops.turbo_kernels.channel_affine_silu(x, mean, rstd, weight, bias)
    assert chosen == [("channel_affine_silu", "triton")]
    want = ref.channel_affine_silu(x, mean, rstd, weight, bias)
    want64 = ref.channel_affine_silu(x.double(), mean.double(), rstd.double(), weight.double(), bias.double())
    assert_within_2x_of_reference(got, want, want64)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize(
    "samples,channels,groups,partials,order",
    [(2, 64, 32, 3, (0, 1, 2)), (3, 80, 8, 5, (2, 0, 1)), (1, 40, 4, 1, (0, 1, 2)), (4, 16, 1, 37, (2, 0, 1)),
     (2, 1280, 32, 16, (1, 0, 2))],
    ids=["frames-of-videos", "channels-last-ranges", "one-sample", "one-group-many-partials", "vc2-level-4"],
)
@pytest.mark.parametrize("weight_dtype", KERNEL_DTYPES, ids=str)
def test_coefficients_kernel_matches_its_reference(samples, channels, groups, partials, order, weight_dtype):
    """The backward's coefficients from (B, C, partials) partial sums laid out in any order of
    their dimensions (the layouts' (B, C, F) and (ranges, B, C) among them), with outputs poisoned:
    against the reference composition summed over the partials, in float32 and float64."""
    g = torch.Generator().manual_seed(samples * channels + partials)
    shape = (samples, channels, partials)
    stored = [order.index(d) for d in range(3)]
    sum_grad, sum_grad_x = (
        torch.randn([shape[d] for d in order], generator=g).permute(*stored).to(DEVICE) for _ in range(2)
    )
    assert sum_grad.shape == shape and (partials == 1 or order == (0, 1, 2) or not sum_grad.is_contiguous())
    mean = (0.3 * torch.randn(samples, groups, generator=g)).to(DEVICE)
    rstd = (0.5 + torch.rand(samples, groups, generator=g)).to(DEVICE)
    weight = torch.randn(channels, generator=g).to(DEVICE, weight_dtype)
    x_shape = (samples, channels, 3, 5, 7)
    got = kernels.group_norm_silu_coefficients(sum_grad, sum_grad_x, x_shape, mean, rstd, weight)

    def reference(dtype):
        return ref.group_norm_silu_coefficients(
            sum_grad.to(dtype).sum(2), sum_grad_x.to(dtype).sum(2), x_shape, mean.to(dtype), rstd.to(dtype), weight
        )

    for name, out, want, want64 in zip(
        ("grad_weight", "grad_bias", "alpha", "beta"), got, reference(torch.float32), reference(torch.float64)
    ):
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert_within_2x_of_reference(out, want, want64, name)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_groups_wider_than_the_coefficients_tile_take_the_composition(monkeypatch, chosen):
    """Groups of 80 channels: the coefficients kernel refuses them (its one-warp tile would spill),
    the backward sums the partials and takes the composition, and the gradients still match."""
    g = torch.Generator().manual_seed(50)
    channels, groups = 160, 2
    with pytest.raises(ValueError, match="groups of 80 channels"):
        kernels.group_norm_silu_coefficients(
            *(torch.zeros(1, channels, 1) for _ in range(2)), (1, channels, 1, 2, 2), torch.zeros(1, groups),
            torch.ones(1, groups), torch.ones(channels),
        )
    launches = record_kernel_launches(monkeypatch, kernels)
    x64 = torch.randn(2, channels, 3, 4, 4, generator=g, dtype=torch.float64)
    weight64, bias64 = (torch.randn(channels, generator=g, dtype=torch.float64) for _ in range(2))
    grad64 = torch.randn(2, channels, 3, 4, 4, generator=g, dtype=torch.float64)

    def gradients(fn, dtype):
        x, weight, bias = (t.to(DEVICE, dtype).requires_grad_(True) for t in (x64, weight64, bias64))
        return torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad64.to(DEVICE, dtype))

    with tk.backend("triton"):
        got = gradients(lambda x, w, b: tk.group_norm_silu(x, w, b, groups, EPS), torch.float32)
    assert "group_norm_silu_coefficients_kernel" not in [kernel.__name__ for kernel, _, _ in launches]
    assert ("channel_affine_silu_backward", "triton") in chosen
    composition = lambda x, w, b: F.silu(F.group_norm(x, groups, w, b, EPS))  # noqa: E731
    for name, out, want, want64 in zip(
        ("x", "weight", "bias"), got, gradients(composition, torch.float32), gradients(composition, torch.float64)
    ):
        assert_within_2x_of_reference(out, want, want64, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_affine_silu_kernel_rounds_like_groupnorm(dtype):
    """On a GPU (the interpreter's 16-bit rounding differs): the normalised value rounds to the
    storage dtype before SiLU, as torch's GroupNorm output does, so the kernel equals the
    reference on the same statistics to one rounding of the output."""
    x = _input("video", dtype, seed=14)
    mean, rstd, weight, bias = _statistics(15)
    with tk.backend("triton"):
        got = torch.ops.turbo_kernels.channel_affine_silu(x, mean, rstd, weight, bias)
    want = ref.channel_affine_silu(x, mean, rstd, weight, bias)
    ulp = torch.finfo(dtype).eps
    assert ((got.float() - want.float()).abs() <= ulp * want.float().abs() + 1e-6).all()


def test_reference_backend_and_the_float64_reference_agree(chosen):
    """On the reference backend (float64, which Triton does not take) the op is the composition
    to round-off, in every layout, and writes the kernels' layout."""
    for layout in LAYOUTS + CHANNELS_LAST_LAYOUTS:
        x = _input(layout, torch.float64, seed=5)
        weight, bias = (t.to(DEVICE) for t in _affine(64, torch.Generator().manual_seed(6)))
        with torch.no_grad(), tk.backend("reference"):
            got = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
        torch.testing.assert_close(got, _composition(x, weight, bias), rtol=1e-12, atol=1e-12)
        assert got.is_contiguous(memory_format=_memory_format(layout))
    assert {name for _, name in chosen} == {"reference"} and ("channel_affine_silu", "reference") in chosen
    assert ("channels_last_group_norm_stats", "reference") in chosen


def test_layouts_the_kernels_do_not_read_run_the_composition(chosen):
    """Neither positions contiguous nor channels innermost: torch's composition, in the layout it
    gives."""
    weight, bias = (t.float().to(DEVICE) for t in _affine(64, torch.Generator().manual_seed(8)))
    with torch.no_grad():
        strided = _input("video", torch.float32, seed=9)[..., ::2]  # positions not contiguous
        torch.testing.assert_close(tk.group_norm_silu(strided, weight, bias, GROUPS, EPS), _composition(strided, weight, bias))
        # Every other channel of channels-last frames of 128: the channels are not dense.
        frames = torch.cat([_input("frames", torch.float32, seed=10)] * 2, dim=1)
        every_other = frames.contiguous(memory_format=torch.channels_last)[:, ::2]
        out = tk.group_norm_silu(every_other, weight, bias, GROUPS, EPS)
        torch.testing.assert_close(out, _composition(every_other, weight, bias))
    assert chosen == []


def test_channels_last_frames_run_the_op_and_keep_their_layout(chosen):
    """Channels-last frames, which the composition ran before, run the op (its reference on the
    CPU's default backend) and keep the channels_last layout torch's composition gives them."""
    weight, bias = (t.float().to(DEVICE) for t in _affine(64, torch.Generator().manual_seed(8)))
    frames = _input("frames-cl", torch.float32, seed=10)
    with torch.no_grad():
        out = tk.group_norm_silu(frames, weight, bias, GROUPS, EPS)
    assert [op for op, _ in chosen] == ["channels_last_group_norm_stats", "channel_affine_silu"]
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _composition(frames, weight, bias))


AUTOCAST_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
AUTOCAST_CASES = [("reference", torch.float16)] + [("triton", d) for d in AUTOCAST_DTYPES if TRITON_USABLE]


def _autocast_composition(x, weight, bias):
    """What CUDA autocast's GroupNorm computes from 16-bit x and float32 master weights: x cast
    up exactly, float32 throughout, float32 out."""
    return _composition(x.float(), weight, bias)


@pytest.mark.parametrize("layout", ["stream", "stream-cl"])
@pytest.mark.parametrize("backend_name,dtype", AUTOCAST_CASES, ids=lambda v: str(v))
def test_float32_output_from_16_bit_x_is_autocasts_groupnorm(backend_name, dtype, layout, chosen):
    """The op as group_norm_silu runs it under CUDA autocast (out_dtype float32, float32 weight
    and bias): forward and d x, d weight, d bias within twice the error of the float32 composition
    autocast would run, d x in x's dtype; the output in the kernels' layout."""
    x = _input(layout, dtype, seed=30).requires_grad_(True)
    weight, bias = (t.float().to(DEVICE).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(31)))
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(32)).to(DEVICE)
    with torch.no_grad():
        stats = tk.ops.group_norm._group_stats(x, GROUPS, EPS)
    with tk.backend(backend_name):
        out = torch.ops.turbo_kernels.channel_affine_silu(x, *stats, weight, bias, torch.float32)
        grads = _gradients(out, (x, weight, bias), grad_out)
    assert [name for _, name in chosen if _ == "channel_affine_silu"] == [backend_name]
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=_memory_format(layout))
    assert grads[0].dtype == dtype and grads[0].stride() == x.stride()
    same = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
    same_out = _autocast_composition(*same)
    same_grads = _gradients(same_out, same, grad_out)
    exact = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    exact_out = _composition(*exact)
    exact_grads = _gradients(exact_out, exact, grad_out.double())
    assert_within_2x_of_reference(out.detach(), same_out.detach(), exact_out.detach())
    for name, got, lp, expected in zip(("d x", "d weight", "d bias"), grads, same_grads, exact_grads):
        # d x's float32 reference is rounded to x's dtype as autocast's cast back rounds it.
        assert_within_2x_of_reference(got, lp.to(got.dtype), expected, name)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["video", "video-cl"])
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_under_cuda_autocast_the_kernels_return_float32_like_the_composition(dtype, layout, chosen):
    """CUDA autocast's GroupNorm computes and returns float32: the op runs its kernels and does
    the same, to within twice the composition's error, gradients included."""
    x = _input(layout, dtype, seed=16).requires_grad_(True)
    weight, bias = (t.float().to(DEVICE).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(17)))
    with torch.autocast("cuda", dtype=dtype):
        out = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
        same = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
        want = _composition(*same)
    assert [op for op, _ in chosen] == [_stats_op(layout), "channel_affine_silu"]
    assert out.dtype == want.dtype == torch.float32 and out.is_contiguous(memory_format=_memory_format(layout))
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(33)).to(DEVICE)
    grads = _gradients(out, (x, weight, bias), grad_out)
    want_grads = _gradients(want, same, grad_out)
    exact = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    exact_out = _composition(*exact)
    assert_within_2x_of_reference(out.detach(), want.detach(), exact_out.detach())
    for name, got, lp, expected in zip(("d x", "d weight", "d bias"), grads, want_grads, _gradients(exact_out, exact, grad_out.double())):
        assert_within_2x_of_reference(got, lp, expected, name)


def test_autocast_on_other_devices_runs_the_composition(chosen):
    """CPU autocast leaves GroupNorm in x's dtype with mixed weights: not a case the op claims."""
    x = _input("video", torch.float32, seed=34).cpu()
    weight, bias = (t.float() for t in _affine(64, torch.Generator().manual_seed(35)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
        want = _composition(x, weight, bias)
    assert chosen == [] and out.dtype == want.dtype
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch.zeros(2, 64, 3), ValueError, "x must be"),
        (lambda: torch.zeros(2, 48, 3, 3), ValueError, "groups"),
        (lambda: torch.zeros(2, 64, 3, 3, dtype=torch.int32), TypeError, "floating-point"),
    ],
)
def test_bad_input_names_the_argument(make, error, match):
    weight = torch.ones(make().shape[1]) if make().dim() > 1 else torch.ones(64)
    with pytest.raises(error, match=match):
        tk.group_norm_silu(make(), weight, torch.zeros_like(weight), GROUPS, EPS)
    with pytest.raises(ValueError, match="bias must be a \\(64,\\) tensor"):
        tk.group_norm_silu(torch.zeros(2, 64, 3, 3), torch.ones(64), torch.zeros(32), GROUPS, EPS)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        tk.group_norm_silu(torch.zeros(2, 64, 3, 3), torch.ones(64, dtype=torch.int64), torch.zeros(64), GROUPS, EPS)
    for eps in (-1.0, float("nan"), torch.tensor(1e-5)):
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            tk.group_norm_silu(torch.zeros(2, 64, 3, 3), torch.ones(64), torch.zeros(64), GROUPS, eps)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_report_compiles_what_it_launches(monkeypatch, dtype):
    """Three launches a forward, three a backward; the passes match a declared configuration
    exactly, the statistics and the backward's coefficients (whose tiles follow the shapes,
    declared at VideoCrafter2's) by signature."""
    launches = record_kernel_launches(monkeypatch, kernels)
    weight, bias = (t.to(DEVICE, dtype) for t in _affine(64, torch.Generator().manual_seed(10)))
    layouts = LAYOUTS + CHANNELS_LAST_LAYOUTS
    with torch.no_grad(), tk.backend("triton"):
        for layout in layouts:
            tk.group_norm_silu(_input(layout, dtype, seed=11), weight, bias, GROUPS, EPS)
    assert len(launches) == 3 * len(layouts)
    with tk.backend("triton"):  # and each layout's backward: its two passes
        for layout in layouts:
            x = _input(layout, dtype, seed=11).requires_grad_(True)
            tk.group_norm_silu(x, weight, bias, GROUPS, EPS).sum().backward()
    autocast_passes = 0
    if dtype != torch.float32:  # as under CUDA autocast: float32 weight, bias, output and its gradient
        for layout in ("video", "video-cl"):
            x = _input(layout, dtype, seed=11).requires_grad_(True)
            mean, rstd, weight32, bias32 = _statistics(12)
            with tk.backend("triton"):
                out = torch.ops.turbo_kernels.channel_affine_silu(x, mean, rstd, weight32, bias32, torch.float32)
                out.sum().backward()
        autocast_passes = 2 * 3
    passes = tuple(
        f"{prefix}affine_silu{suffix}_kernel" for prefix in ("channel_", "channels_last_") for suffix in ("", "_sums", "_grad")
    )
    exact = [launch for launch in launches if launch[0].__name__ in passes]
    # no-grad forwards, forwards, backwards
    assert len(exact) == len(layouts) + len(layouts) + 2 * len(layouts) + autocast_passes
    assert unreported_launches(exact, kernels.REPORT_CONFIGS) == []
    statistics = [launch for launch in launches if launch[0].__name__ not in passes]
    # one a backward
    coefficients = sum(launch[0].__name__ == "group_norm_silu_coefficients_kernel" for launch in statistics)
    assert coefficients == len(layouts) + autocast_passes // 3
    # A 5x7 frame is one chunk of positions, which the merge takes as frames = 1, and the
    # channels-last sums as one range of positions (one partial).
    unit_sizes = ("frames", "partials")
    assert unreported_launches(statistics, kernels.REPORT_CONFIGS, unit_sizes, check_constexprs=False) == []


@pytest.mark.parametrize("layout", ["stream", "stream-cl"])
def test_opcheck(layout):
    x = _input(layout, torch.float32, seed=12)
    half = _input(layout, torch.float16, seed=12)
    for backend_name in ["reference"] + (["triton"] if TRITON_USABLE else []):
        with tk.backend(backend_name):
            torch.library.opcheck(torch.ops.turbo_kernels.channel_affine_silu.default, (x, *_statistics(13)))
            torch.library.opcheck(
                torch.ops.turbo_kernels.channel_affine_silu.default, (half, *_statistics(13), torch.float32)
            )
            if layout == "stream-cl":
                torch.library.opcheck(torch.ops.turbo_kernels.channels_last_group_norm_stats.default, (x, GROUPS, EPS))


def _significant_strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides that address t's elements (a size-1 dimension's is never used)."""
    return tuple(stride for stride, size in zip(t.stride(), t.shape) if size > 1)


@pytest.mark.parametrize("layout", LAYOUTS + CHANNELS_LAST_LAYOUTS)
def test_the_fakes_give_the_backends_layouts(layout):
    """opcheck compares strides on CUDA only: here the fake (shape inference on the meta device)
    against each backend's output and gradient, dimension by dimension."""
    x = _input(layout, torch.float32, seed=38)
    video = x if x.dim() == 5 else x.unsqueeze(2)
    with torch.no_grad(), tk.backend("reference"):
        stats = (*group_norm_ops._group_stats(video, GROUPS, EPS), *_statistics(39)[2:])
    grad = torch.randn(video.shape, generator=torch.Generator().manual_seed(40)).to(DEVICE)
    fake_out = torch.ops.turbo_kernels.channel_affine_silu(video.to("meta"), *(t.to("meta") for t in stats))
    fake_grad_x, _, _ = torch.ops.turbo_kernels.channel_affine_silu_backward(
        grad.to("meta"), video.to("meta"), *(t.to("meta") for t in stats), True
    )
    for backend_name in ["reference"] + (["triton"] if TRITON_USABLE else []):
        with tk.backend(backend_name):
            out = torch.ops.turbo_kernels.channel_affine_silu(video, *stats)
            grad_x, _, _ = torch.ops.turbo_kernels.channel_affine_silu_backward(grad, video, *stats, True, backend_name)
        assert _significant_strides(out) == _significant_strides(fake_out), backend_name
        assert _significant_strides(grad_x) == _significant_strides(fake_grad_x) == _significant_strides(video)
        channels_last = layout.endswith("-cl")
        assert out.is_contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_an_output_dtype_the_kernels_do_not_write_falls_back(chosen):
    """Narrowing float32 x to a float16 output is not a case the kernels take: the reference runs
    it, with a warning."""
    x = _input("video", torch.float32, seed=36)
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match="out_dtype must be"):
        out = torch.ops.turbo_kernels.channel_affine_silu(x, *_statistics(37), torch.float16)
    assert out.dtype == torch.float16 and chosen == [("channel_affine_silu", "reference")]


# ---- inside VC2UNet ------------------------------------------------------------------------------


def _unet_blocks():
    from t2v_turbo.models.vc2_unet import ResBlock

    torch.manual_seed(18)
    block = ResBlock(64, 32, 64).to(DEVICE)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.1)
    return block


def test_unet_blocks_run_the_op_without_gradients_and_agree(chosen):
    """A ResBlock (two GroupNorm + SiLU on frames, four in its temporal convolution, the first on
    the stream's transposed view) with use_kernels gives the module path's output; in train mode
    (the temporal convolution's dropout drawing) too, from the same seed."""
    block = _unet_blocks()
    x, emb = torch.randn(6, 64, 5, 7, device=DEVICE), torch.randn(6, 32, device=DEVICE)
    for training in (False, True):
        block.train(training)
        outputs = []
        for use_kernels in (False, True):
            block.use_kernels = block.temopral_conv.use_kernels = use_kernels
            torch.manual_seed(19)
            with torch.no_grad(), tk.backend("reference"):
                outputs.append(block(x, emb, 3))
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    assert sum(op == "channel_affine_silu" for op, _ in chosen) == 2 * 6


def test_a_hook_on_a_groupnorm_keeps_its_module_called(chosen):
    block = _unet_blocks()
    block.use_kernels = block.temopral_conv.use_kernels = True
    calls = []
    block.in_layers[0].register_forward_hook(lambda module, args, output: calls.append(output))
    with torch.no_grad(), tk.backend("reference"):
        block(torch.randn(6, 64, 5, 7, device=DEVICE), torch.randn(6, 32, device=DEVICE), 3)
    assert len(calls) == 1
    assert sum(op == "channel_affine_silu" for op, _ in chosen) == 5, "the other five still run the op"


# ---- gradients -----------------------------------------------------------------------------------


def _gradients(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


GRADIENT_CASES = [("reference", torch.float64)] + [("triton", dtype) for dtype in KERNEL_DTYPES if TRITON_USABLE]


def _gradient_input(layout: str, dtype: torch.dtype) -> torch.Tensor:
    """The test layouts, plus 'wide': one-frame videos of 33x40 positions (more than one chunk of
    the backward pass's loop)."""
    if layout != "wide":
        return _input(layout, dtype, seed=20)
    g = torch.Generator().manual_seed(27)
    return torch.randn(2, 64, 1, 33, 40, generator=g, dtype=torch.float64).to(DEVICE, dtype)


@pytest.mark.parametrize("backend_name,dtype", GRADIENT_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("layout", LAYOUTS + CHANNELS_LAST_LAYOUTS + ["wide"])
def test_gradients_match_the_composition(layout, backend_name, dtype, chosen):
    """d x, d weight and d bias through the kernels (the normalisation pass's backward and the
    statistics' backward) against autograd through torch's composition: float64 on the reference
    backend to round-off; on Triton within twice the same-precision composition's error. The
    output's gradient arrives contiguous, so channels-last layouts copy it once."""
    x = _gradient_input(layout, dtype).requires_grad_(True)
    weight, bias = (t.to(DEVICE, dtype).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(21)))
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64).to(DEVICE, dtype)
    with tk.backend(backend_name):
        out = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
        grads = _gradients(out, (x, weight, bias), grad_out)
    # The statistics need no backward of their own: the pass's backward gives x's whole gradient.
    assert [op for op, _ in chosen] == [_stats_op(layout), "channel_affine_silu", "channel_affine_silu_backward"]
    assert {name for _, name in chosen} == {backend_name}
    assert out.is_contiguous(memory_format=_memory_format(layout))
    assert grads[0].shape == x.shape and grads[0].stride() == x.stride()
    exact = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    want = _gradients(_composition(*exact), exact, grad_out.double())
    if backend_name == "reference":
        for got, expected in zip(grads, want):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    else:
        same = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
        same_precision = _gradients(_composition(*same), same, grad_out)
        for name, got, lp, expected in zip(("d x", "d weight", "d bias"), grads, same_precision, want):
            assert_within_2x_of_reference(got, lp, expected, name)


@pytest.mark.parametrize("layout", ["video", "video-cl"])
def test_backward_opcheck(layout):
    x = _input(layout, torch.float32, seed=23)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(24)).to(DEVICE)
    for backend_name in ["reference"] + (["triton"] if TRITON_USABLE else []):
        with tk.backend(backend_name):
            mean, rstd, weight, bias = _statistics(25)
            torch.library.opcheck(
                torch.ops.turbo_kernels.channel_affine_silu.default,
                (x.clone().requires_grad_(True), mean, rstd, weight.requires_grad_(True), bias.requires_grad_(True)),
            )
            for with_x in (True, False):
                torch.library.opcheck(
                    torch.ops.turbo_kernels.channel_affine_silu_backward.default,
                    (grad, x, *_statistics(26), with_x, backend_name),
                )
    with pytest.raises(ValueError, match="mean and rstd require grad"):
        mean, rstd, weight, bias = _statistics(27)
        torch.ops.turbo_kernels.channel_affine_silu(x.requires_grad_(True), mean.requires_grad_(True), rstd, weight, bias)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", CHANNELS_LAST_LAYOUTS)
def test_channels_last_kernels_read_x_in_place(layout, dtype, monkeypatch, chosen):
    """Channels-last x reaches every kernel as itself (its storage and strides), forward and
    backward, as does an output gradient in the output's layout; nothing outside the ops copies
    it; x's gradient is written in x's layout."""
    launches = record_kernel_launches(monkeypatch, kernels)
    x = _input(layout, dtype, seed=41).requires_grad_(True)
    weight, bias = (t.to(DEVICE, dtype).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(42)))
    copies = {torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
    with tk.backend("triton"):
        with RecordedOps(copies) as forward:
            out = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
        grad_out = torch.randn_like(out)  # in out's layout
        grad_x, _, _ = torch.autograd.grad(out, (x, weight, bias), grad_out)
    assert forward.calls == []
    assert chosen == [
        ("channels_last_group_norm_stats", "triton"), ("channel_affine_silu", "triton"),
        ("channel_affine_silu_backward", "triton"),
    ]
    assert [kernel.__name__ for kernel, _, _ in launches] == [
        "channels_last_group_norm_partial_stats_kernel", "group_norm_merge_stats_kernel",
        "channels_last_affine_silu_kernel", "channels_last_affine_silu_sums_kernel",
        "group_norm_silu_coefficients_kernel", "channels_last_affine_silu_grad_kernel",
    ]
    # x is the statistics' and the forward's first argument, the backward passes' second (after
    # the output's gradient; the coefficients between them read neither); their x views may
    # differ only by an inserted frame dimension.
    first, second = zip(*[(args[0], args[1]) for _, args, _ in launches])
    for got in first[:3] + second[3:4] + second[5:]:
        assert got.data_ptr() == x.data_ptr() and _significant_strides(got) == _significant_strides(x)
    for got in first[3:4] + first[5:]:
        assert got.data_ptr() == grad_out.data_ptr()
    assert out.is_contiguous(memory_format=_memory_format(layout)) and grad_x.stride() == x.stride()


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("channels,groups", [(160, 8), (320, 32)], ids=["20-a-group", "10-a-group"])
def test_channels_last_groups_are_found_by_their_channels(channels, groups, chosen):
    """Groups of 20 or 10 channels (no power of two; VideoCrafter2's first level is 320 in 32)
    over 105 positions, channels-last: a statistics program takes 6 or 12 whole groups (120 of its
    128 lanes), the last fewer, over 5 chunks of 21 positions (no multiple of its 16-position
    tile), the sums 64-channel blocks (160 is no multiple). Each channel's mean and spread lie far
    from its neighbours', so a channel counted in the wrong group, or a group's partials merged
    with another's, would move the statistics far outside the 2x rule; forward and gradients."""
    g = torch.Generator().manual_seed(43)
    centres = 20 * torch.randn(channels, generator=g, dtype=torch.float64).view(1, channels, 1, 1, 1)
    spreads = torch.exp(torch.randn(channels, generator=g, dtype=torch.float64)).view(1, channels, 1, 1, 1)
    x64 = centres + spreads * torch.randn(2, channels, 3, 5, 7, generator=g, dtype=torch.float64)
    x = x64.float().to(DEVICE).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    weight, bias = (t.float().to(DEVICE).requires_grad_(True) for t in _affine(channels, g))
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64).float().to(DEVICE)
    with tk.backend("triton"):
        out = tk.group_norm_silu(x, weight, bias, groups, EPS)
        grads = _gradients(out, (x, weight, bias), grad_out)
    assert [name for _, name in chosen] == ["triton"] * 3 and chosen[0][0] == "channels_last_group_norm_stats"

    def composition(*inputs):
        return F.silu(F.group_norm(inputs[0], groups, inputs[1], inputs[2], EPS))

    same = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
    same_out = composition(*same)
    exact = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    exact_out = composition(*exact)
    assert_within_2x_of_reference(out.detach(), same_out.detach(), exact_out.detach())
    for name, got, lp, expected in zip(
        ("d x", "d weight", "d bias"), grads, _gradients(same_out, same, grad_out),
        _gradients(exact_out, exact, grad_out.double()),
    ):
        assert_within_2x_of_reference(got, lp, expected, name)


def test_weight_and_bias_gradients_without_x_gradient(chosen):
    x = _input("stream", torch.float64, seed=28)
    weight, bias = (t.to(DEVICE).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(29)))
    with tk.backend("reference"):
        grads = torch.autograd.grad(tk.group_norm_silu(x, weight, bias, GROUPS, EPS).square().sum(), (weight, bias))
    exact = [weight.detach().requires_grad_(True), bias.detach().requires_grad_(True)]
    want = torch.autograd.grad(_composition(x, *exact).square().sum(), exact)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_channels_last_sums_in_ranges_that_do_not_divide_the_tiles(monkeypatch, chosen):
    """The channels-last backward's sums split each sample's positions into ranges of whole
    16-position tiles, about AFFINE_BACKWARD_PROGRAMS programs in all; at VideoCrafter2's sizes
    the ranges need not divide the tiles. Here (the programs lowered) 105 positions' 7 tiles in 3
    ranges of 3, 3 and 1: every position counted once, so d x, d weight and d bias keep within
    twice the composition's error."""
    monkeypatch.setattr(kernels, "AFFINE_BACKWARD_PROGRAMS", 6)
    assert kernels.channels_last_sums_splits(2, 105, 64) == 3
    x = _input("video-cl", torch.float32, seed=44).requires_grad_(True)
    weight, bias = (t.float().to(DEVICE).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(45)))
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(46)).to(DEVICE)
    with tk.backend("triton"):
        grads = _gradients(tk.group_norm_silu(x, weight, bias, GROUPS, EPS), (x, weight, bias), grad_out)
    assert [op for op, _ in chosen] == ["channels_last_group_norm_stats", "channel_affine_silu", "channel_affine_silu_backward"]
    assert {name for _, name in chosen} == {"triton"}
    same = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
    exact = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    same_grads = _gradients(_composition(*same), same, grad_out)
    exact_grads = _gradients(_composition(*exact), exact, grad_out.double())
    for name, got, lp, expected in zip(("d x", "d weight", "d bias"), grads, same_grads, exact_grads):
        assert_within_2x_of_reference(got, lp, expected, name)
