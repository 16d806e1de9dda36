"""turbo_kernels.group_norm_silu (GroupNorm then SiLU, forward only) against torch's composition,
and its normalisation pass (turbo_kernels::channel_affine_silu) against its reference, in the
layouts VideoCrafter2's UNet hands it: per-frame (N, C, H, W), contiguous videos (B, C, F, H, W)
and the transposed view of the (B*F, C, H, W) stream. Triton's interpreter on the CPU; buffers
poisoned with NaN first.

Tolerance: the kernels' error against float64 maths at most twice that of the reference run in
the same storage dtype, plus one rounding of that dtype (helpers.assert_within_2x_of_reference).
"""

import pytest
import torch
import torch.nn.functional as F

import turbo_kernels as tk
from turbo_kernels import dispatch
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
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_affine_silu_kernel_matches_its_reference(dtype, chosen):
    """The normalisation pass alone, on the stream's transposed view (its strides in the kernel)."""
    x = _input("stream", dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    scale, shift = (torch.randn(2, 64, generator=g).to(DEVICE) for _ in range(2))
    with tk.backend("triton"):
        got = torch.ops.turbo_kernels.channel_affine_silu(x, scale, shift)
    assert chosen == [("channel_affine_silu", "triton")]
    want = ref.channel_affine_silu(x, scale, shift)
    want64 = ref.channel_affine_silu(x.double(), scale.double(), shift.double())
    assert_within_2x_of_reference(got, want, want64)


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


def test_gradients_autocast_and_other_layouts_run_the_composition(chosen):
    x = _input("video", torch.float32, seed=7).requires_grad_(True)
    weight, bias = (t.float().to(DEVICE).requires_grad_(True) for t in _affine(64, torch.Generator().manual_seed(8)))
    out = tk.group_norm_silu(x, weight, bias, GROUPS, EPS)
    grads = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    want = _composition(x, weight, bias)
    want_grads = torch.autograd.grad(want.square().sum(), (x, weight, bias))
    assert chosen == []
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.no_grad():
        strided = _input("video", torch.float32, seed=9)[..., ::2]  # positions not contiguous
        torch.testing.assert_close(tk.group_norm_silu(strided, weight, bias, GROUPS, EPS), _composition(strided, weight, bias))
        assert chosen == []


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


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_report_compiles_what_it_launches(monkeypatch, dtype):
    launches = record_kernel_launches(monkeypatch, kernels)
    weight, bias = (t.to(DEVICE, dtype) for t in _affine(64, torch.Generator().manual_seed(10)))
    with torch.no_grad(), tk.backend("triton"):
        for layout in ("frames", "video", "stream"):
            tk.group_norm_silu(_input(layout, dtype, seed=11), weight, bias, GROUPS, EPS)
    applied = [launch for launch in launches if launch[0].__name__ == "channel_affine_silu_kernel"]
    assert len(applied) == 3
    assert unreported_launches(applied, kernels.REPORT_CONFIGS) == []


def test_opcheck():
    x = _input("stream", torch.float32, seed=12)
    g = torch.Generator().manual_seed(13)
    scale, shift = (torch.randn(2, 64, generator=g).to(DEVICE) for _ in range(2))
    for backend_name in ["reference"] + (["triton"] if TRITON_USABLE else []):
        with tk.backend(backend_name):
            torch.library.opcheck(torch.ops.turbo_kernels.channel_affine_silu.default, (x, scale, shift))
