"""turbo_kernels.group_norm_silu (GroupNorm then SiLU) against torch's composition, forward and
first-order gradients, and its normalisation pass (turbo_kernels::channel_affine_silu) against
its reference, in the layouts VideoCrafter2's UNet hands it: per-frame (N, C, H, W), contiguous
videos (B, C, F, H, W) and the transposed view of the (B*F, C, H, W) stream. Triton's interpreter
on the CPU; buffers poisoned with NaN first.

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

from .helpers import DEVICE, KERNEL_DTYPES, assert_within_2x_of_reference, record_kernel_launches, unreported_launches

TRITON_USABLE = dispatch.machine_unavailable_reason("triton", DEVICE) is None
GROUPS, EPS = 32, 1e-5


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
    same shape as the transposed view of a (6, 64, 5, 7) stream."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-2, 2, 64, dtype=torch.float64).view(1, 64, 1, 1)
    stream = (torch.randn(6, 64, 5, 7, generator=g, dtype=torch.float64) + offsets).to(device=DEVICE, dtype=dtype)
    if layout == "frames":
        return stream
    video = stream.unflatten(0, (2, 3)).transpose(1, 2)
    return video.contiguous() if layout == "video" else video


def _affine(channels: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weight = 1 + 0.1 * torch.randn(channels, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(channels, generator=g, dtype=torch.float64)
    return weight, bias


def _composition(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["frames", "video", "stream"])
def test_kernels_match_the_composition(layout, dtype, chosen):
    x = _input(layout, dtype, seed=1)
    weight, bias = _affine(64, torch.Generator().manual_seed(2))
    with torch.no_grad(), tk.backend("triton"):
        got = tk.group_norm_silu(x, weight.to(DEVICE, dtype), bias.to(DEVICE, dtype), GROUPS, EPS)
    assert chosen == [("group_norm_stats", "triton"), ("channel_affine_silu", "triton")]
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    same_precision = _composition(x, weight.to(DEVICE, dtype), bias.to(DEVICE, dtype))
    exact = _composition(x.double(), weight.to(DEVICE), bias.to(DEVICE))
    assert_within_2x_of_reference(got, same_precision, exact)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("frames", [3, 1], ids=["video", "frames"])
def test_statistics_of_a_large_mean_against_a_small_spread(frames, chosen):
    """Groups reduced as slices (a frame's, or a single frame's channel's) merged per group: each
    slice's mean, rounded to fp32, would carry an ulp of 1000 into the merge were the values not
    shifted (rstd off by 1e-3 relative): within the 2x rule of torch's var_mean on the same x."""
    g = torch.Generator().manual_seed(4)
    x = (1000 + 0.01 * torch.randn(2, 64, frames, 5, 7, generator=g, dtype=torch.float64)).float().to(DEVICE)
    with torch.no_grad(), tk.backend("triton"):
        mean, rstd = group_norm_ops._group_stats(x, GROUPS, EPS)
    assert chosen == [("group_norm_stats", "triton")]
    per_group = x.reshape(2, GROUPS, -1)
    for got, same, exact in zip(
        (mean, rstd), _mean_rstd(per_group, EPS), _mean_rstd(per_group.double(), EPS)
    ):
        assert_within_2x_of_reference(got, same, exact)


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
    to round-off, in every layout."""
    for layout in ("frames", "video", "stream"):
        x = _input(layout, torch.float64, seed=5)
        weight, bias = (t.to(DEVICE) for t in _affine(64, torch.Generator().manual_seed(6)))
        with torch.no_grad(), tk.backend("reference"):
            got = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
        torch.testing.assert_close(got, _composition(x, weight, bias), rtol=1e-12, atol=1e-12)
    assert {name for _, name in chosen} == {"reference"} and ("channel_affine_silu", "reference") in chosen


def test_layouts_the_kernels_do_not_read_run_the_composition(chosen):
    weight, bias = (t.float().to(DEVICE) for t in _affine(64, torch.Generator().manual_seed(8)))
    with torch.no_grad():
        strided = _input("video", torch.float32, seed=9)[..., ::2]  # positions not contiguous
        torch.testing.assert_close(tk.group_norm_silu(strided, weight, bias, GROUPS, EPS), _composition(strided, weight, bias))
        assert chosen == []
        # Channels-last frames keep the layout torch's composition gives them.
        frames = _input("frames", torch.float32, seed=10).contiguous(memory_format=torch.channels_last)
        out = tk.group_norm_silu(frames, weight, bias, GROUPS, EPS)
        assert out.is_contiguous(memory_format=torch.channels_last) and chosen == []


AUTOCAST_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
AUTOCAST_CASES = [("reference", torch.float16)] + [("triton", d) for d in AUTOCAST_DTYPES if TRITON_USABLE]


def _autocast_composition(x, weight, bias):
    """What CUDA autocast's GroupNorm computes from 16-bit x and float32 master weights: x cast
    up exactly, float32 throughout, float32 out."""
    return _composition(x.float(), weight, bias)


@pytest.mark.parametrize("backend_name,dtype", AUTOCAST_CASES, ids=lambda v: str(v))
def test_float32_output_from_16_bit_x_is_autocasts_groupnorm(backend_name, dtype, chosen):
    """The op as group_norm_silu runs it under CUDA autocast (out_dtype float32, float32 weight
    and bias): forward and d x, d weight, d bias within twice the error of the float32 composition
    autocast would run, d x in x's dtype."""
    x = _input("stream", dtype, seed=30).requires_grad_(True)
    weight, bias = (t.float().to(DEVICE).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(31)))
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(32)).to(DEVICE)
    with torch.no_grad():
        stats = tk.ops.group_norm._group_stats(x, GROUPS, EPS)
    with tk.backend(backend_name):
        out = torch.ops.turbo_kernels.channel_affine_silu(x, *stats, weight, bias, torch.float32)
        grads = _gradients(out, (x, weight, bias), grad_out)
    assert [name for _, name in chosen if _ == "channel_affine_silu"] == [backend_name]
    assert out.dtype == torch.float32 and out.is_contiguous() and grads[0].dtype == dtype
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
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_under_cuda_autocast_the_kernels_return_float32_like_the_composition(dtype, chosen):
    """CUDA autocast's GroupNorm computes and returns float32: the op runs its kernels and does
    the same, to within twice the composition's error, gradients included."""
    x = _input("video", dtype, seed=16).requires_grad_(True)
    weight, bias = (t.float().to(DEVICE).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(17)))
    with torch.autocast("cuda", dtype=dtype):
        out = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
        same = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
        want = _composition(*same)
    assert [op for op, _ in chosen] == ["group_norm_stats", "channel_affine_silu"]
    assert out.dtype == want.dtype == torch.float32
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
    """Three launches a forward, two a backward; the passes match a declared configuration
    exactly, the statistics (whose tiles follow the shapes, declared at VideoCrafter2's) by
    signature."""
    launches = record_kernel_launches(monkeypatch, kernels)
    weight, bias = (t.to(DEVICE, dtype) for t in _affine(64, torch.Generator().manual_seed(10)))
    with torch.no_grad(), tk.backend("triton"):
        for layout in ("frames", "video", "stream"):
            tk.group_norm_silu(_input(layout, dtype, seed=11), weight, bias, GROUPS, EPS)
    assert len(launches) == 3 * 3
    with tk.backend("triton"):  # and each layout's backward: its two passes
        for layout in ("frames", "video", "stream"):
            x = _input(layout, dtype, seed=11).requires_grad_(True)
            tk.group_norm_silu(x, weight, bias, GROUPS, EPS).sum().backward()
    autocast_passes = 0
    if dtype != torch.float32:  # as under CUDA autocast: float32 weight, bias, output and its gradient
        x = _input("video", dtype, seed=11).requires_grad_(True)
        mean, rstd, weight32, bias32 = _statistics(12)
        with tk.backend("triton"):
            torch.ops.turbo_kernels.channel_affine_silu(x, mean, rstd, weight32, bias32, torch.float32).sum().backward()
        autocast_passes = 3
    passes = ("channel_affine_silu_kernel", "channel_affine_silu_sums_kernel", "channel_affine_silu_grad_kernel")
    exact = [launch for launch in launches if launch[0].__name__ in passes]
    assert len(exact) == 3 + 3 + 2 * 3 + autocast_passes  # no-grad forwards, forwards, backwards
    assert unreported_launches(exact, kernels.REPORT_CONFIGS) == []
    statistics = [launch for launch in launches if launch[0].__name__ not in passes]
    assert unreported_launches(statistics, kernels.REPORT_CONFIGS, check_constexprs=False) == []


def test_opcheck():
    x = _input("stream", torch.float32, seed=12)
    half = _input("stream", torch.float16, seed=12)
    for backend_name in ["reference"] + (["triton"] if TRITON_USABLE else []):
        with tk.backend(backend_name):
            torch.library.opcheck(torch.ops.turbo_kernels.channel_affine_silu.default, (x, *_statistics(13)))
            torch.library.opcheck(
                torch.ops.turbo_kernels.channel_affine_silu.default, (half, *_statistics(13), torch.float32)
            )


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
@pytest.mark.parametrize("layout", ["frames", "video", "stream", "wide"])
def test_gradients_match_the_composition(layout, backend_name, dtype, chosen):
    """d x, d weight and d bias through the kernels (the normalisation pass's backward and the
    statistics' backward) against autograd through torch's composition: float64 on the reference
    backend to round-off; on Triton within twice the same-precision composition's error."""
    x = _gradient_input(layout, dtype).requires_grad_(True)
    weight, bias = (t.to(DEVICE, dtype).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(21)))
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64).to(DEVICE, dtype)
    with tk.backend(backend_name):
        out = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
        grads = _gradients(out, (x, weight, bias), grad_out)
    # The statistics need no backward of their own: the pass's backward gives x's whole gradient.
    assert [op for op, _ in chosen] == ["group_norm_stats", "channel_affine_silu", "channel_affine_silu_backward"]
    assert {name for _, name in chosen} == {backend_name}
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


def test_backward_opcheck():
    x = _input("video", torch.float32, seed=23)
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


def test_weight_and_bias_gradients_without_x_gradient(chosen):
    x = _input("stream", torch.float64, seed=28)
    weight, bias = (t.to(DEVICE).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(29)))
    with tk.backend("reference"):
        grads = torch.autograd.grad(tk.group_norm_silu(x, weight, bias, GROUPS, EPS).square().sum(), (weight, bias))
    exact = [weight.detach().requires_grad_(True), bias.detach().requires_grad_(True)]
    want = torch.autograd.grad(_composition(x, *exact).square().sum(), exact)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
