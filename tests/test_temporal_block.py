"""FusedTemporalTransformer (SPEC 1): the release's golden, the fused path against the reference
(forward, input and parameter gradients) with each backend forced, the layout copies it removes,
the Triton kernels against their op references on ragged shapes, release key names, fallbacks,
errors and opcheck.

Tolerance: the error against float64 maths is at most twice that of the reference run in the
same storage dtype, plus one rounding of that dtype. Single ops take the largest error
(helpers.assert_within_2x_of_reference). The whole block chains a dozen roundings, which makes
its largest single error a noisy statistic (the reference is sometimes lucky on one element of a
parameter gradient), so block outputs and gradients compare root-mean-square errors.
Triton output buffers start as NaN, so an element a kernel never writes fails.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import turbo_kernels as tk
from turbo_kernels import dispatch
from turbo_kernels.reference import temporal_block as ref
from turbo_kernels.temporal_block import FusedTemporalTransformer
from turbo_kernels.triton_kernels import group_norm as kernels
from turbo_kernels.triton_kernels import temporal_attention as attention_kernels

from .helpers import (
    DEVICE, KERNEL_DTYPES, SHARED, STORAGE_EPS, assert_within_2x_of_reference, randn, record_kernel_launches,
    seeded_generator, unreported_launches,
)

GOLDEN = SHARED / "vc2_reference"
TRITON_USABLE = dispatch.machine_unavailable_reason("triton", DEVICE) is None
BACKENDS = ["reference"] + (["triton"] if TRITON_USABLE else [])
OPS = (
    "group_norm_stats", "strided_linear", "strided_linear_weight_grad", "group_norm_stats_backward", "channel_affine_backward"
)

# (videos, frames, channels, height, width, heads, head dim): VideoCrafter2's proportions (inner =
# C, 2 channels a group) at an odd frame count, and init_attn's (inner = 2C, 1 channel a group).
CASES = [(2, 3, 64, 3, 4, 2, 32), (2, 4, 32, 2, 3, 4, 16)]
CASE_IDS = ["inner=C", "inner=2C"]
# Channels-last streams: odd H*W, and 2, 3 and 5 channels a group (the statistics' programs take
# whole groups, 32 a program at 2 and 3 channels, 25 at 5: a ragged second tile).
CHANNELS_LAST_CASES = [(2, 3, 64, 3, 5, 2, 32), (1, 4, 96, 5, 3, 3, 32), (2, 2, 160, 3, 3, 5, 32)]
CHANNELS_LAST_IDS = ["C=64", "C=96", "C=160"]

# The release's state-dict keys of one temporal transformer, in its order.
ATTENTION_KEYS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")
BLOCK_KEYS = (
    *(f"attn1.{key}" for key in ATTENTION_KEYS),
    "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight", "ff.net.2.bias",
    *(f"attn2.{key}" for key in ATTENTION_KEYS),
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
)
RELEASE_KEYS = [
    "norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias",
    *(f"transformer_blocks.0.{key}" for key in BLOCK_KEYS),
    "proj_out.weight", "proj_out.bias",
]


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    """Every Triton output buffer starts as NaN."""
    dispatch._warned.clear()

    def nan_filled(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "new_output", nan_filled)
    monkeypatch.setattr(kernels, "new_output_like", lambda t: torch.full_like(t, float("nan")))
    monkeypatch.setattr(attention_kernels, "new_output", nan_filled)


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero weights as the release's tiny golden draws them: matrices N(0, 1/fan_in), norm
    scales 1 + 0.1 N(0, 1), biases 0.05 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() > 1:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
    return module


def _module(channels, heads, head_dim, seed=0, dtype=torch.float32):
    return _randomised(FusedTemporalTransformer(channels, heads, head_dim), seed).to(device=DEVICE, dtype=dtype)


def _stream(videos, frames, channels, height, width, dtype, g):
    """A stream whose channels have different means, so GroupNorm's centring matters."""
    offsets = torch.linspace(-2, 2, channels, dtype=torch.float64).view(1, channels, 1, 1)
    x = torch.randn(videos * frames, channels, height, width, generator=g, dtype=torch.float64) + offsets
    return x.to(device=DEVICE, dtype=dtype)


def _forward_backward(module, x, grad_out, num_frames, reference: bool):
    """(out, d x, {name: d parameter}) of a fresh copy of `module`. The gradients as the backward
    returns them (torch.autograd.grad): a leaf's .grad would take x's strides whatever they were."""
    module = copy.deepcopy(module)
    x = x.detach().clone().requires_grad_(True)
    out = module.reference_forward(x, num_frames) if reference else module(x, num_frames)
    names, parameters = zip(*module.named_parameters())
    grad_x, *grads = torch.autograd.grad(out, (x, *parameters), grad_out, allow_unused=True)
    return out.detach(), grad_x, dict(zip(names, grads))


# ---- the release ---------------------------------------------------------------------------------


@pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"release goldens not found at {GOLDEN} (../shared is absent)")
def test_release_golden_init_attn(chosen):
    """The tiny UNet's init_attn (8 heads x 8, inner 64 over 32 channels; its Conv1d(k=1)
    projections are Linear layers) on its recorded input, float64: the reference path, and the
    fused path on the reference backend (Triton takes no float64), reproduce the release."""
    from safetensors.torch import load_file

    prefix = "init_attn.0."
    weights = load_file(str(GOLDEN / "tiny_unet.safetensors"))
    state = {k.removeprefix(prefix): v.squeeze(-1) for k, v in weights.items() if k.startswith(prefix)}
    activations = load_file(str(GOLDEN / "tiny_intermediates.safetensors"))
    x, want = activations["input_blocks.0"].to(DEVICE), activations["init_attn"].to(DEVICE)

    module = FusedTemporalTransformer(32, heads=8, head_dim=8).double().to(DEVICE)
    module.load_state_dict(state, strict=True)
    frames = 4
    torch.testing.assert_close(module.reference_forward(x, frames), want, rtol=0, atol=1e-12)
    with tk.backend("reference"):
        torch.testing.assert_close(module(x, frames), want, rtol=0, atol=1e-12)
    assert {name for _, name in chosen} == {"reference"}
    module.use_reference = True
    torch.testing.assert_close(module(x, frames), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "projections,memory_format",
    [("strided", torch.contiguous_format), ("cublas", torch.contiguous_format), ("auto", torch.channels_last)],
    ids=["strided", "cublas", "channels-last"],
)
def test_the_fused_path_infers_shapes_on_the_meta_device(projections, memory_format):
    """Shape inference on meta tensors (a model built under torch.device("meta")) runs the fused
    path through its ops' fake implementations, forward and backward: torch.autocast refuses the
    meta device, and the fused block turned autocast off with it. The output and x's gradient lie
    as x does."""
    with torch.device("meta"):
        module = FusedTemporalTransformer(64, heads=2, head_dim=32, projections=projections)
        x = torch.empty(2 * 4, 64, 5, 6, memory_format=memory_format, requires_grad=True)
        out = module(x, 4)
        (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert out.shape == x.shape and out.is_meta and grad_x.shape == x.shape
    assert out.stride() == grad_x.stride() == x.stride()


def test_a_vc2_unet_with_kernels_infers_shapes_on_the_meta_device():
    """The same for the whole UNet with kernels on (its default), GroupNorm + SiLU included."""
    from t2v_turbo.models import VC2UNet

    with torch.device("meta"):
        unet = VC2UNet.preset("tiny")
        x = torch.empty(1, 4, 4, 16, 16, requires_grad=True)
        out = unet(x, torch.full((1,), 999), torch.empty(1, 77, unet.config["context_dim"]), 8)
        out.sum().backward()
    assert unet.use_kernels and out.shape == x.shape and x.grad.shape == x.shape


def test_parameters_carry_the_release_names():
    module = FusedTemporalTransformer(320, heads=5, head_dim=64)
    assert list(module.state_dict()) == RELEASE_KEYS
    shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    assert shapes["transformer_blocks.0.ff.net.0.proj.weight"] == (2560, 320)
    assert shapes["transformer_blocks.0.ff.net.2.weight"] == (320, 1280)


@pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"release goldens not found at {GOLDEN} (../shared is absent)")
def test_loads_a_release_temporal_transformer_strictly():
    """Every Linear temporal transformer of the full model (keys and shapes from the release's
    state dict) loads strictly into a module of its width."""
    keys = json.loads((GOLDEN / "unet_full_keys.json").read_text())["keys"]
    layers: dict[str, dict[str, tuple]] = {}
    for key, _shape, _ in keys:
        head, sep, rest = key.partition(".transformer_blocks.")
        # Temporal transformers are the third module of a block (".2."), spatial ones the second.
        if sep and head.endswith(".2") and rest.startswith("0.attn1.to_q"):
            layers[head] = {}
    for key, shape, _ in keys:
        for head in layers:
            if key.startswith(head + "."):
                layers[head][key.removeprefix(head + ".")] = tuple(shape)
    assert len(layers) >= 16
    for head, shapes in layers.items():
        channels, inner = shapes["proj_in.weight"][1], shapes["proj_in.weight"][0]
        with torch.device("meta"):
            module = FusedTemporalTransformer(channels, heads=inner // 64, head_dim=64)
        assert list(shapes) == RELEASE_KEYS, head
        module.load_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()}, strict=True, assign=True)


# ---- fused against the reference -------------------------------------------------------------------


def _rms(t: torch.Tensor) -> float:
    return t.double().square().mean().sqrt().item()


def _assert_rms_within_2x_of_reference(got, ref_same_precision, ref64, name):
    assert got.shape == ref64.shape and got.dtype == ref_same_precision.dtype, name
    assert torch.isfinite(got).all(), f"{name}: non-finite elements (unwritten output?)"
    error, ref_error = _rms(got.cpu() - ref64.cpu()), _rms(ref_same_precision.cpu() - ref64.cpu())
    budget = 2 * ref_error + STORAGE_EPS[got.dtype] * _rms(ref64)
    assert error <= budget, f"{name}: RMS error {error:.3e} > budget {budget:.3e} (reference RMS error {ref_error:.3e})"


def _check_fused_against_reference(
    case, dtype, backend_name, chosen, projections="strided", memory_format=torch.contiguous_format
):
    """The fused path against the reference, on x (and the output's gradient) in `memory_format`:
    every op on `backend_name` (no fallback), the output and x's gradient in x's layout."""
    videos, frames, channels, height, width, heads, head_dim = case
    g = seeded_generator(*case, dtype.itemsize)
    x = _stream(videos, frames, channels, height, width, dtype, g).contiguous(memory_format=memory_format)
    grad_out = randn(x.shape, dtype, g, memory_format=memory_format)
    module = _module(channels, heads, head_dim, dtype=dtype)
    module.projections = projections
    with tk.backend(backend_name), warnings.catch_warnings():
        warnings.simplefilter("error", tk.TurboKernelsFallbackWarning)
        out, grad_x, grads = _forward_backward(module, x, grad_out, frames, reference=False)
    route = "cublas" if memory_format == torch.channels_last else projections
    projection_ops = {"strided": {"strided_linear", "strided_linear_weight_grad"}, "cublas": {"channel_affine"}}
    want_ops = (set(OPS) - projection_ops["strided"]) | projection_ops[route] | {
        "temporal_attention", "temporal_attention_backward_packed", "geglu", "geglu_backward", "layer_norm", "layer_norm_backward"
    }
    assert set(chosen) == {(op, backend_name) for op in want_ops}, chosen
    assert out.stride() == grad_x.stride() == x.stride()

    out_lp, grad_x_lp, grads_lp = _forward_backward(module, x, grad_out, frames, reference=True)
    out64, grad_x64, grads64 = _forward_backward(
        copy.deepcopy(module).double(), x.double(), grad_out.double(), frames, reference=True
    )
    _assert_rms_within_2x_of_reference(out, out_lp, out64, "out")
    _assert_rms_within_2x_of_reference(grad_x, grad_x_lp, grad_x64, "d x")
    for name in grads64:
        _assert_rms_within_2x_of_reference(grads[name], grads_lp[name], grads64[name], f"d {name}")


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_triton_matches_reference(dtype, chosen):
    _check_fused_against_reference(CASES[0], dtype, "triton", chosen)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_triton_matches_reference_at_init_attn_proportions(chosen):
    _check_fused_against_reference(CASES[1], torch.float32, "triton", chosen)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_reference_backend_matches_reference(case, dtype, chosen):
    """The fused composition with every op on its plain PyTorch implementation."""
    _check_fused_against_reference(case, dtype, "reference", chosen)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_cublas_projections_match_reference(backend_name, dtype, chosen):
    """proj_in and proj_out on cuBLAS around the channel_affine pass and a transposed add."""
    _check_fused_against_reference(CASES[0], dtype, backend_name, chosen, projections="cublas")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CHANNELS_LAST_CASES, ids=CHANNELS_LAST_IDS)
def test_a_channels_last_stream_matches_reference(case, dtype, backend_name, chosen):
    """A channels_last stream ((B*F, H, W, C) in memory, as channels-last convolutions hand it
    over) takes the cuBLAS route whatever "auto" would pick for a contiguous one: its tokens are
    row-major already. Statistics on its videos' channels-last layout, no fallback; the output
    and x's gradient channels_last too."""
    _check_fused_against_reference(case, dtype, backend_name, chosen, "auto", torch.channels_last)


def test_projection_routes(monkeypatch, chosen):
    """"auto" takes cuBLAS below the threshold (the library's, which tests/conftest.py sets to 0
    for the session), and a default module takes that route on small frames. A channels_last
    stream takes cuBLAS at any size, and refuses "strided" (its tokens are row-major: there is
    no layout change for strided_linear to absorb)."""
    from turbo_kernels import temporal_block
    from turbo_kernels.temporal_block import projection_route

    monkeypatch.setattr(temporal_block, "CUBLAS_PROJECTIONS_BELOW", 640)
    assert projection_route("strided", 1) == "strided" and projection_route("cublas", 10**6) == "cublas"
    assert projection_route("auto", 640) == "strided" and projection_route("auto", 639) == "cublas"
    assert projection_route("auto", 10**6, channels_last=True) == projection_route("cublas", 1, True) == "cublas"
    with pytest.raises(ValueError, match='a channels_last stream takes "cublas"'):
        projection_route("strided", 10**6, channels_last=True)
    videos, frames, channels, height, width, heads, head_dim = CASES[0]
    x = _stream(videos, frames, channels, height, width, torch.float32, torch.Generator().manual_seed(27))
    with tk.backend("reference"):
        _module(channels, heads, head_dim)(x, frames)
    assert ("channel_affine", "reference") in chosen and ("strided_linear", "reference") not in chosen
    with pytest.raises(ValueError, match="projections must be one of"):
        FusedTemporalTransformer(64, 2, 32, projections="triton")


def test_auto_route_compares_a_frames_positions(monkeypatch, chosen):
    """"auto" compares a frame's H*W positions with the threshold, not one side of it: at a
    threshold of 10, 3x4 frames (12 positions, each side below 10) take the strided route and
    3x3 frames (9) cuBLAS."""
    from turbo_kernels import temporal_block

    monkeypatch.setattr(temporal_block, "CUBLAS_PROJECTIONS_BELOW", 10)
    module = _module(64, 2, 32)
    g = torch.Generator().manual_seed(29)
    for (height, width), op in (((3, 4), "strided_linear"), ((3, 3), "channel_affine")):
        chosen.clear()
        with tk.backend("reference"):
            module(_stream(1, 2, 64, height, width, torch.float32, g), 2)
        assert (op, "reference") in chosen, ((height, width), chosen)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_frames_of_one_pixel_are_a_contiguous_stream(backend_name, chosen):
    """A (B*F, C, 1, 1) stream is both contiguous and channels_last in torch's sense; it is a
    contiguous stream, so projections="strided" takes it (rather than refusing it as
    channels_last) and runs strided_linear on one token a frame row, forward and backward
    (the weight gradient's bias programs sum a single-token tile)."""
    case = (2, 3, 64, 1, 1, 2, 32)
    assert _stream(*case[:5], torch.float32, torch.Generator()).is_contiguous(memory_format=torch.channels_last)
    _check_fused_against_reference(case, torch.float32, backend_name, chosen, projections="strided")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_bias_only_training_gets_the_bias_gradients(backend_name):
    """Bias-only fine-tuning (BitFit): x from frozen layers, every weight frozen. proj_out's bias
    gradient then comes without its weight's (summed from the output's gradient, which arrives
    channel-first), and proj_in's normalisation needs the shift's gradient (GroupNorm's bias)
    without the scale's: each bias gradient within the 2x rule of the reference path's."""
    videos, frames, channels, height, width, heads, head_dim = CASES[0]
    g = torch.Generator().manual_seed(30)
    x = _stream(videos, frames, channels, height, width, torch.float32, g)
    grad_out = randn(x.shape, torch.float32, g)
    module = _module(channels, heads, head_dim)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(name.endswith("bias"))

    def bias_gradients(module, x, grad_out, reference):
        out = module.reference_forward(x, frames) if reference else module(x, frames)
        names, biases = zip(*[(n, p) for n, p in module.named_parameters() if p.requires_grad])
        return dict(zip(names, torch.autograd.grad(out, biases, grad_out)))

    with tk.backend(backend_name), warnings.catch_warnings():
        warnings.simplefilter("error", tk.TurboKernelsFallbackWarning)
        got = bias_gradients(module, x, grad_out, reference=False)
    same = bias_gradients(module, x, grad_out, reference=True)
    exact = bias_gradients(copy.deepcopy(module).double(), x.double(), grad_out.double(), reference=True)
    assert set(got) == set(exact) and "norm.bias" in got and "proj_out.bias" in got
    for name in exact:
        _assert_rms_within_2x_of_reference(got[name], same[name], exact[name], f"d {name}")


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_channel_affine_kernel(dtype, chosen):
    """The stream's channel-major tokens (3 videos of 2 frames, 201 tokens, 72 channels: ragged
    tiles both ways) normalised into row-major tokens, every element written."""
    g = torch.Generator().manual_seed(23)
    frames, videos, channels = 2, 3, 72
    x = _stream(videos, frames, channels, 67, 3, dtype, g)
    tokens = x.flatten(2).transpose(1, 2)
    scale, shift = (randn((videos, channels), torch.float32, g) for _ in range(2))
    with tk.backend("triton"):
        got = torch.ops.turbo_kernels.channel_affine(tokens, scale, shift, frames)
    assert chosen == [("channel_affine", "triton")]
    assert got.is_contiguous() and got.shape == tokens.shape
    want = ref.channel_affine(tokens, scale, shift, frames)
    want64 = ref.channel_affine(tokens.double(), scale.double(), shift.double(), frames)
    assert_within_2x_of_reference(got, want, want64)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["stream", "channels-last"])
def test_channel_affine_opcheck(backend_name, memory_format):
    """On a contiguous stream's channel-major tokens and a channels_last stream's row-major ones."""
    g = torch.Generator().manual_seed(24)
    stream = _stream(2, 2, 64, 3, 5, torch.float32, g).contiguous(memory_format=memory_format)
    tokens = stream.flatten(2).transpose(1, 2)
    scale, shift = (randn((2, 64), torch.float32, g) for _ in range(2))
    with tk.backend(backend_name):
        for requires_grad in (False, True):
            args = tuple(t.clone().requires_grad_(requires_grad) for t in (tokens, scale, shift))
            torch.library.opcheck(torch.ops.turbo_kernels.channel_affine.default, (*args, 2))


# ---- layout copies ---------------------------------------------------------------------------------


COPY_OPS = {"clone", "copy_", "_to_copy", "cat", "stack", "_reshape_copy"}


class _CopyRecorder(TorchDispatchMode):
    """Records every op that copies tensor data into a new layout, with its output size. Custom
    ops are opaque here; what their kernels receive is checked by the launch test below."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in COPY_OPS:
            written = args[0] if func.overloadpacket.__name__ == "copy_" else out
            self.copies.append((func.overloadpacket.__name__, tuple(written.shape)))
        return out

    def of_at_least(self, numel: int) -> list[tuple[str, tuple]]:
        return [(name, shape) for name, shape in self.copies if torch.Size(shape).numel() >= numel]


@pytest.mark.parametrize(
    "projections,memory_format",
    [("strided", torch.contiguous_format), ("cublas", torch.contiguous_format), ("auto", torch.channels_last)],
    ids=["strided", "cublas", "channels-last"],
)
def test_fused_block_makes_no_activation_copies(projections, memory_format):
    """The reference pays the release's layout round trip, 11 copies here: 2 rearranges into
    tokens, 4 head split/merge copies in each attention and the rearrange back (GroupNorm also
    makes its permuted input contiguous, inside aten::native_group_norm in this torch, so not
    counted). The fused forward and backward copy only weights: the packed attention's backward
    writes the gradient of the q/k/v projection as one tensor, and turbo_kernels.geglu's both
    halves of its input's gradient. On cuBLAS projections the backward of a contiguous stream
    copies one activation: proj_out's gradient, transposed, made contiguous for its GEMMs. A
    channels_last stream (cuBLAS too) copies none: its tokens, and proj_out's gradient in the
    output's layout, are row-major already."""
    videos, frames, channels, height, width, heads, head_dim = 1, 4, 64, 8, 8, 2, 32
    # 256 tokens: activations (16384 elements) outnumber the concatenated qkv weight (12288).
    activation = videos * frames * height * width * channels
    g = torch.Generator().manual_seed(12)
    module = _module(channels, heads, head_dim)
    module.projections = projections
    x = _stream(videos, frames, channels, height, width, torch.float32, g).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    counts = {}
    for path in ("reference", "fused"):
        with _CopyRecorder() as forward:
            out = module.reference_forward(x, frames) if path == "reference" else module(x, frames)
        with _CopyRecorder() as backward:
            out.backward(torch.ones_like(out))
        counts[path] = (forward.of_at_least(activation), backward.of_at_least(activation))

    reference_forward, _ = counts["reference"]
    fused_forward, fused_backward = counts["fused"]
    assert fused_forward == []
    assert len(reference_forward) >= 11, reference_forward
    if projections != "cublas":
        assert fused_backward == []
    else:
        assert [shape for _, shape in fused_backward] == [(videos * frames, height * width, channels)], fused_backward


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_kernels_read_and_write_the_stream_in_place(monkeypatch):
    """GroupNorm statistics and proj_in read the stream's own memory, proj_out adds it as the
    residual and writes the (B*F, C, H, W) output directly, and attention takes q, k, v as
    slices of one projection."""
    launches = record_kernel_launches(monkeypatch, kernels)
    attention = []
    original_attention = attention_kernels._launch

    def attention_spy(kernel, tensors, *args):
        attention.append(tensors)
        return original_attention(kernel, tensors, *args)

    monkeypatch.setattr(attention_kernels, "_launch", attention_spy)
    videos, frames, channels, height, width, heads, head_dim = CASES[0]
    g = torch.Generator().manual_seed(13)
    x = _stream(videos, frames, channels, height, width, torch.float32, g)
    with tk.backend("triton"):
        out = _module(channels, heads, head_dim)(x, frames)

    tokens = height * width
    stats, _merge, proj_in, *_, proj_out = launches
    assert stats[0].__name__ == "group_norm_partial_stats_kernel" and stats[1][0].data_ptr() == x.data_ptr()
    assert proj_in[0].__name__ == "strided_linear_kernel"
    assert (proj_in[1][0].data_ptr(), proj_in[1][0].stride()) == (x.data_ptr(), (channels * tokens, 1, tokens))
    residual, written = proj_out[1][3], proj_out[1][6]
    assert (residual.data_ptr(), residual.stride()) == (x.data_ptr(), (channels * tokens, 1, tokens))
    assert written.data_ptr() == out.data_ptr() and out.is_contiguous()
    for q, k, v, *_ in attention:
        assert k.data_ptr() - q.data_ptr() == v.data_ptr() - k.data_ptr() == channels * q.element_size()
        assert q.stride() == (tokens * 3 * channels, 3 * channels, 1)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_kernels_read_and_write_a_channels_last_stream_in_place(monkeypatch):
    """On a channels_last stream the statistics reduce its videos' channels-last memory, the
    normalisation reads its row-major tokens, the output lies as x does, and the backward's
    statistics and affine passes read x in place."""
    launches = record_kernel_launches(monkeypatch, kernels)
    videos, frames, channels, height, width, heads, head_dim = CHANNELS_LAST_CASES[0]
    g = torch.Generator().manual_seed(13)
    x = _stream(videos, frames, channels, height, width, torch.float32, g).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with tk.backend("triton"):
        out = _module(channels, heads, head_dim)(x, frames)
        (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))

    tokens = height * width
    by_name = {}
    for kernel, args, constexprs in launches:
        by_name.setdefault(kernel.__name__, []).append((args, constexprs))
    assert launches[0][0].__name__ == "channels_last_group_norm_partial_stats_kernel"
    assert launches[0][1][0].data_ptr() == x.data_ptr()
    ((affine_args, _),) = by_name["channel_affine_kernel"]
    assert (affine_args[0].data_ptr(), affine_args[0].stride()) == (x.data_ptr(), (tokens * channels, channels, 1))
    assert out.stride() == grad_x.stride() == x.stride()
    ((stats_backward_args, stats_backward_constexprs),) = by_name["group_norm_stats_backward_kernel"]
    assert stats_backward_args[0].data_ptr() == x.data_ptr() and stats_backward_constexprs["CHANNELS_LAST"]
    ((affine_backward_args, _),) = by_name["channel_affine_backward_kernel"]
    assert affine_backward_args[1].data_ptr() == x.data_ptr()
    assert "strided_linear_kernel" not in by_name


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(
    "projections,memory_format",
    [("strided", torch.contiguous_format), ("cublas", torch.contiguous_format), ("auto", torch.channels_last)],
    ids=["strided", "cublas", "channels-last"],
)
def test_kernel_report_compiles_what_the_block_launches(monkeypatch, dtype, projections, memory_format):
    """Every GEMM and gradient-pass launch of the fused block's forward and backward matches a
    REPORT_CONFIGS entry, unit strides, constexprs and warps included (the strides decide which
    accesses the compiler vectorises and pipelines). The statistics kernels' tiles follow the shapes, declared at
    VideoCrafter2's; the weight gradient's rows a program is 1 only in these small shapes."""
    launches = record_kernel_launches(monkeypatch, kernels)
    videos, frames, channels, height, width, heads, head_dim = CASES[0]
    g = torch.Generator().manual_seed(17)
    x = _stream(videos, frames, channels, height, width, dtype, g).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    module = _module(channels, heads, head_dim, dtype=dtype)
    module.projections = projections
    with tk.backend("triton"):
        module(x, frames).backward(randn(x.shape, dtype, g, memory_format=memory_format))

    # proj_in and proj_out: forward, input gradient, weight gradient (strided), or proj_in's
    # normalisation (cuBLAS, a channels_last stream's route); GroupNorm's two gradient passes.
    route = "cublas" if memory_format == torch.channels_last else projections
    shape_free, count = {
        "strided": ({"strided_linear_kernel", "strided_linear_weight_grad_kernel"}, 8),
        "cublas": ({"channel_affine_kernel"}, 3),
    }[route]
    shape_free = shape_free | {"channel_affine_backward_kernel", "group_norm_stats_backward_kernel"}
    checked = [launch for launch in launches if launch[0].__name__ in shape_free]
    assert {kernel.__name__ for kernel, *_ in checked} == shape_free
    assert len(checked) == count
    assert unreported_launches(checked, kernels.REPORT_CONFIGS, unit_sizes=("rows_per_split",)) == []


# ---- the kernels against their op references -------------------------------------------------------


def _channels_first_tokens(rows, channels, tokens, dtype, g):
    """(rows, tokens, channels) tokens as the stream holds them: a transposed (rows, channels,
    tokens) tensor."""
    return randn((rows, channels, tokens), dtype, g).transpose(1, 2)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "affine,bias,residual,channels_first_in,channels_first_out",
    [(True, True, False, True, False), (False, True, True, False, True), (False, False, False, False, False)],
    ids=["proj_in", "proj_out", "input-grad"],
)
def test_strided_linear_kernel(dtype, affine, bias, residual, channels_first_in, channels_first_out, chosen):
    """Ragged tiles in every dimension (37 tokens, 40 input and 72 output features), 3 videos of
    2 frames, a transposed weight view, each prologue and epilogue."""
    g = torch.Generator().manual_seed(14)
    frames, rows, tokens, k, j = 2, 6, 37, 40, 72
    x = _channels_first_tokens(rows, k, tokens, dtype, g) if channels_first_in else randn((rows, tokens, k), dtype, g)
    weight = (randn((k, j), dtype, g) / k**0.5).t()
    out_shape = (rows, j, tokens) if channels_first_out else (rows, tokens, j)
    args = [
        x, weight,
        randn((j,), dtype, g) if bias else None,
        randn(out_shape, dtype, g) if residual else None,
        randn((rows // frames, k), torch.float32, g) if affine else None,
        randn((rows // frames, k), torch.float32, g) if affine else None,
    ]
    with tk.backend("triton"):
        out = torch.ops.turbo_kernels.strided_linear(*args, frames, channels_first_out)
    assert chosen == [("strided_linear", "triton")]
    assert out.shape == out_shape and out.is_contiguous()

    def reference(cast):
        return ref.strided_linear(*(None if a is None else cast(a) for a in args), frames, channels_first_out)

    assert_within_2x_of_reference(out, reference(lambda a: a), reference(lambda a: a.double()))


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_strided_linear_weight_grad_kernel(dtype, affine, chosen):
    """5 frame rows split into ranges, 131 tokens (the bias programs' 128-token tiles: two trips,
    the second ragged), 72 output channels (ragged tiles), channels-first x, a transposed
    gradient view; returns the weight and the bias gradient."""
    g = torch.Generator().manual_seed(15)
    frames, rows, tokens, k, j = 1, 5, 131, 24, 72
    grad_out = randn((rows, j, tokens), dtype, g).transpose(1, 2)
    x = _channels_first_tokens(rows, k, tokens, dtype, g)
    scale, shift = (randn((rows, k), torch.float32, g) if affine else None for _ in range(2))
    with tk.backend("triton"):
        got_weight, got_bias = torch.ops.turbo_kernels.strided_linear_weight_grad(grad_out, x, scale, shift, frames)
    assert chosen == [("strided_linear_weight_grad", "triton")]
    assert kernels.weight_grad_splits(rows, j, k, dtype == torch.float32) > 1
    want = ref.strided_linear_weight_grad(grad_out, x, scale, shift, frames)
    want64 = ref.strided_linear_weight_grad(
        grad_out.double(), x.double(), *(None if t is None else t.double() for t in (scale, shift)), frames
    )
    # The op returns float32 sums of storage-dtype products: hold it to the same-precision reference.
    assert got_weight.dtype == got_bias.dtype == torch.float32
    assert_within_2x_of_reference(got_weight, want[0], want64[0])
    assert_within_2x_of_reference(got_bias, want[1], want64[1])


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_weight_grad_kernel_with_several_rows_a_range_and_an_empty_one(monkeypatch, dtype):
    """Fewer programs than rows, as at 40x64 (16 rows in 10 ranges of 2, the last ones empty):
    here 5 rows in ranges of 2, 2, 1 and one empty; every partial written (poisoned buffers)."""
    g = torch.Generator().manual_seed(25)
    rows, tokens, k, j = 5, 131, 24, 72
    tiles = kernels._weight_grad_tiles(j, k, kernels.weight_grad_params(dtype == torch.float32)[0])
    monkeypatch.setattr(kernels, "WEIGHT_GRAD_PROGRAMS", 4 * tiles)
    splits = kernels.weight_grad_splits(rows, j, k, dtype == torch.float32)
    assert splits == 4 and -(-rows // splits) * (splits - 1) >= rows
    grad_out = randn((rows, j, tokens), dtype, g).transpose(1, 2)
    x = randn((rows, tokens, k), dtype, g)
    with tk.backend("triton"):
        got = torch.ops.turbo_kernels.strided_linear_weight_grad(grad_out, x, None, None, 1)
    want = ref.strided_linear_weight_grad(grad_out, x, None, None, 1)
    want64 = ref.strided_linear_weight_grad(grad_out.double(), x.double(), None, None, 1)
    for name, value, same_precision, exact in zip(("d weight", "d bias"), got, want, want64):
        assert_within_2x_of_reference(value, same_precision, exact, name)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("out_features,in_features", [(0, 8), (8, 0)])
def test_weight_grad_of_empty_channels(out_features, in_features):
    g = torch.Generator().manual_seed(26)
    grad_out, x = randn((3, 5, out_features), torch.float32, g), randn((3, 5, in_features), torch.float32, g)
    with tk.backend("triton"):
        weight, bias = torch.ops.turbo_kernels.strided_linear_weight_grad(grad_out, x, None, None, 1)
    assert weight.shape == (out_features, in_features) and not weight.abs().sum()
    torch.testing.assert_close(bias, grad_out.sum(dim=(0, 1)))


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("frames,channels,height,width", [(5, 64, 7, 9), (3, 32, 1, 1)], ids=["ragged", "1x1"])
@pytest.mark.parametrize("spread", [1.0, 0.01, 0.0], ids=["spread-1", "spread-0.01", "constant"])
@pytest.mark.parametrize("min_programs", [None, 1], ids=["group-a-program", "groups-a-program"])
def test_group_norm_stats_kernel(dtype, frames, channels, height, width, spread, min_programs, chosen, monkeypatch):
    """Statistics span each video's frames, and a mean of 1000 against a small spread, or none,
    neither cancels (a one-pass sum of squares would lose the variance) nor carries the fp32
    rounding of per-frame means into the merge (rstd was off by 2e-3 at spread 0.01): within
    the 2x rule of torch's var_mean on the same storage. These few rows take a group a program;
    without the program floor, all 32 groups of a row are one program's tile."""
    if min_programs is not None:
        monkeypatch.setattr(kernels, "STATS_MIN_PROGRAMS", min_programs)
    g = torch.Generator().manual_seed(16)
    x = (1000 + spread * randn((2 * frames, channels, height, width), torch.float64, g)).to(dtype)
    with tk.backend("triton"):
        mean, rstd = torch.ops.turbo_kernels.group_norm_stats(x, frames, 32, 1e-6)
    assert chosen == [("group_norm_stats", "triton")]
    want_mean, want_rstd = ref.group_norm_stats(x.double(), frames, 32, 1e-6)
    same_mean, same_rstd = ref.group_norm_stats(x, frames, 32, 1e-6)
    assert mean.shape == rstd.shape == (2, 32) and mean.dtype == rstd.dtype == torch.float32
    assert_within_2x_of_reference(mean, same_mean, want_mean, "mean")
    assert_within_2x_of_reference(rstd, same_rstd, want_rstd, "rstd")


def test_group_norm_stats_launch_enough_programs_at_batch_1():
    """At batch 1 (16 frame rows of 32 groups) every VideoCrafter2 level launches a group a
    program, 512 programs; with many rows a program streams at least STATS_MIN_ELEMENTS again
    (or a row's 32 groups, at the middle block's 40 x 40)."""
    for (_, group_numel), min_elements_tile in zip(kernels._STATS_SHAPES, (4, 8, 16, 32)):
        params, _ = kernels.stats_params(16, 32, group_numel)
        assert params == dict(GROUP_TILE=1, BLOCK=kernels.STATS_TILE_ELEMENTS)
        params, _ = kernels.stats_params(2048, 32, group_numel)
        assert params["GROUP_TILE"] == min_elements_tile
        assert params["GROUP_TILE"] * params["BLOCK"] == kernels.STATS_TILE_ELEMENTS
    # Between the two: the largest tile that keeps the floor (64 rows: 2 groups a program, 1024 programs).
    assert kernels.stats_params(64, 32, 40 * 160)[0]["GROUP_TILE"] == 2


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("channels", [64, 160])
@pytest.mark.parametrize("spread", [1.0, 0.01], ids=["spread-1", "spread-0.01"])
def test_group_norm_stats_of_a_channels_last_stream(backend_name, dtype, channels, spread, chosen, monkeypatch):
    """A channels_last stream's statistics (Triton: the channels-last reduction on its videos,
    whole groups a program) and, through autograd, x's gradient (Triton: the elementwise backward
    indexing channels innermost), in x's layout; a mean of 1000 against a small spread, 5 frames
    of 7x9. Within the 2x rule of the references on the same storage."""
    launches = record_kernel_launches(monkeypatch, kernels)
    g = seeded_generator(dtype.itemsize, channels, spread)
    frames = 5
    x = (1000 + spread * randn((2 * frames, channels, 7, 9), torch.float64, g)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_mean, grad_rstd = (randn((2, 32), torch.float32, g) for _ in range(2))
    leaf = x.detach().clone().requires_grad_(True)
    with tk.backend(backend_name):
        mean, rstd = torch.ops.turbo_kernels.group_norm_stats(leaf, frames, 32, 1e-6)
        (grad_x,) = torch.autograd.grad((mean, rstd), leaf, (grad_mean, grad_rstd))
    assert chosen == [("group_norm_stats", backend_name), ("group_norm_stats_backward", backend_name)]
    if backend_name == "triton":
        launched = [kernel.__name__ for kernel, *_ in launches]
        assert launched[0] == "channels_last_group_norm_partial_stats_kernel", launched
        assert launches[-1][2]["CHANNELS_LAST"] and launches[-1][1][0].data_ptr() == leaf.data_ptr()
    assert grad_x.stride() == x.stride()

    def reference(cast):
        x_ref = cast(x).requires_grad_(True)
        stats = ref.group_norm_stats(x_ref, frames, 32, 1e-6)
        return (*stats, *torch.autograd.grad(stats, x_ref, (cast(grad_mean), cast(grad_rstd))))

    for name, got, same, exact in zip(
        ("mean", "rstd", "d x"), (mean, rstd, grad_x), reference(lambda t: t.detach().clone()),
        reference(lambda t: t.detach().double()),
    ):
        assert_within_2x_of_reference(got.detach(), same, exact, name)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_a_stream_of_no_positions(chosen):
    """Frames of no positions: NaN statistics as torch.var_mean gives (the kernels read nothing),
    and the block's empty output."""
    with tk.backend("triton"):
        mean, rstd = torch.ops.turbo_kernels.group_norm_stats(torch.empty(2, 64, 0, 4, device=DEVICE), 1, 32, 1e-6)
        out = FusedTemporalTransformer(64, 2, 32).to(DEVICE)(torch.randn(4, 64, 0, 3, device=DEVICE), 2)
    assert mean.shape == rstd.shape == (2, 32) and mean.isnan().all() and rstd.isnan().all()
    assert out.shape == (4, 64, 0, 3)


# ---- fallbacks and errors --------------------------------------------------------------------------


def test_gradient_references_match_float64_autograd():
    """group_norm_stats_backward, channel_affine_backward and strided_linear_weight_grad against
    autograd through the statistics, the affine and strided_linear, in float64."""
    g = torch.Generator().manual_seed(21)
    frames, videos, channels, tokens = 3, 2, 64, 5
    x = _stream(videos, frames, channels, 1, tokens, torch.float64, g).requires_grad_(True)
    mean, rstd = ref.group_norm_stats(x, frames, 32, 1e-6)
    grad_mean, grad_rstd = (randn(mean.shape, torch.float64, g) for _ in range(2))
    (want,) = torch.autograd.grad((mean, rstd), x, (grad_mean, grad_rstd))
    got = ref.group_norm_stats_backward(x.detach(), mean.detach(), rstd.detach(), grad_mean, grad_rstd, frames)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)

    tokens_x = x.detach().flatten(2).transpose(1, 2).requires_grad_(True)
    scale, shift = (randn((videos, channels), torch.float64, g).requires_grad_(True) for _ in range(2))
    grad_a = randn(tokens_x.shape, torch.float64, g)
    a = ref.channel_affine(tokens_x, scale, shift, frames)
    want = torch.autograd.grad(a, (tokens_x, scale, shift), grad_a)
    got = ref.channel_affine_backward(grad_a, tokens_x.detach(), scale.detach(), frames)
    for name, value, expected in zip(("d x", "d scale", "d shift"), got, want):
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-13, msg=lambda m: f"{name}: {m}")
    assert got[0].stride() == tokens_x.stride()

    weight, bias = (randn(shape, torch.float64, g).requires_grad_(True) for shape in ((7, channels), (7,)))
    out = ref.strided_linear(tokens_x.detach(), weight, bias, None, scale.detach(), shift.detach(), frames, True)
    grad_out = randn(out.shape, torch.float64, g)
    want = torch.autograd.grad(out, (weight, bias), grad_out)
    got = ref.strided_linear_weight_grad(grad_out.transpose(1, 2), tokens_x.detach(), scale.detach(), shift.detach(), frames)
    for name, value, expected in zip(("d weight", "d bias"), got, want):
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-13, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channel-major", "row-major"])
def test_gradient_kernels_match_their_references(dtype, layout, chosen):
    """3 videos of 2 frames, 64 channels, 201 tokens (ragged blocks, several token ranges a row),
    the affine's operands channel-major as proj_in's are, or row-major; outputs poisoned first."""
    g = torch.Generator().manual_seed(22)
    frames, videos, channels, height, width = 2, 3, 64, 67, 3
    x = _stream(videos, frames, channels, height, width, dtype, g)
    mean, rstd = ref.group_norm_stats(x, frames, 32, 1e-6)
    grad_mean, grad_rstd = (randn(mean.shape, torch.float32, g) for _ in range(2))
    if layout == "channel-major":
        tokens_x = x.flatten(2).transpose(1, 2)
        grad_a = _channels_first_tokens(videos * frames, channels, height * width, dtype, g)
    else:
        tokens_x = x.flatten(2).transpose(1, 2).contiguous()
        grad_a = randn(tokens_x.shape, dtype, g)
    assert kernels.affine_backward_splits(videos * frames, height * width, channels) > 1
    scale = randn((videos, channels), torch.float32, g)
    with tk.backend("triton"):
        stats_grad = torch.ops.turbo_kernels.group_norm_stats_backward(x, mean, rstd, grad_mean, grad_rstd, frames)
        affine_grads = torch.ops.turbo_kernels.channel_affine_backward(grad_a, tokens_x, scale, frames)
    assert chosen == [("group_norm_stats_backward", "triton"), ("channel_affine_backward", "triton")]

    def reference(cast):
        return (
            ref.group_norm_stats_backward(cast(x), *(cast(t) for t in (mean, rstd, grad_mean, grad_rstd)), frames),
            *ref.channel_affine_backward(cast(grad_a), cast(tokens_x), cast(scale), frames),
        )

    want_lp = reference(lambda t: t)
    want64 = reference(lambda t: t.double())
    names = ("stats d x", "affine d x", "d scale", "d shift")
    for name, got, lp, w64 in zip(names, (stats_grad, *affine_grads), want_lp, want64):
        assert got.dtype == lp.dtype and got.stride() == lp.stride(), name
        _assert_rms_within_2x_of_reference(got, lp, w64, name)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_affine_backward_token_ranges_that_do_not_divide_the_token_blocks(monkeypatch, chosen):
    """Fewer programs than token blocks, in a count that does not divide them, as at
    VideoCrafter2's 40x64 level (16 rows, 10 channel blocks: 40 token blocks in 3 ranges of 14):
    here 201 tokens' 4 blocks in 3 ranges of 2, 2 and none. Every token counted once in the sums
    and its d x written (poisoned buffers)."""
    g = torch.Generator().manual_seed(31)
    frames, channels, tokens = 2, 32, 201
    monkeypatch.setattr(kernels, "AFFINE_BACKWARD_PROGRAMS", 3 * frames)
    assert kernels.affine_backward_splits(frames, tokens, channels) == 3
    x = _channels_first_tokens(frames, channels, tokens, torch.float32, g)
    grad_a = randn(x.shape, torch.float32, g)
    scale = randn((1, channels), torch.float32, g)
    with tk.backend("triton"):
        got = torch.ops.turbo_kernels.channel_affine_backward(grad_a, x, scale, frames)
    assert chosen == [("channel_affine_backward", "triton")]
    want = ref.channel_affine_backward(grad_a, x, scale, frames)
    want64 = ref.channel_affine_backward(grad_a.double(), x.double(), scale.double(), frames)
    for name, value, same_precision, exact in zip(("d x", "d scale", "d shift"), got, want, want64):
        assert_within_2x_of_reference(value, same_precision, exact, name)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_float32_operands_in_another_layout_fall_back(chosen):
    """The kernels index scale and shift as contiguous (B, K) rows: strided views of them run the
    reference, warned, to the same result, rather than being read as rows."""
    g = torch.Generator().manual_seed(32)
    frames, rows, tokens, k, j = 2, 4, 5, 16, 8
    x = _channels_first_tokens(rows, k, tokens, torch.float32, g)
    weight = randn((j, k), torch.float32, g)
    scale, shift = (randn((k, rows // frames), torch.float32, g).t() for _ in range(2))
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match="scale must be contiguous"):
        out = torch.ops.turbo_kernels.strided_linear(x, weight, None, None, scale, shift, frames, False)
        tokens_out = torch.ops.turbo_kernels.channel_affine(x, scale, shift, frames)
    assert chosen == [("strided_linear", "reference"), ("channel_affine", "reference")]
    torch.testing.assert_close(out, ref.strided_linear(x, weight, None, None, scale, shift, frames, False))
    torch.testing.assert_close(tokens_out, ref.channel_affine(x, scale, shift, frames))


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_statistics_gradients_in_any_layout_or_unused_run_the_kernel(chosen):
    """The statistics op's backward hands the kernel its (B, groups) gradients contiguous (the
    kernel indexes them as rows, and refuses other layouts): gradients arriving as transposed
    views run the kernel, no fallback, to the reference's d x; so does a loss of rstd alone."""
    g = torch.Generator().manual_seed(33)
    frames = 3
    x = _stream(2, frames, 64, 2, 3, torch.float32, g).requires_grad_(True)
    grad_mean, grad_rstd = (randn((32, 2), torch.float32, g).t() for _ in range(2))
    with tk.backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", tk.TurboKernelsFallbackWarning)
        mean, rstd = torch.ops.turbo_kernels.group_norm_stats(x, frames, 32, 1e-6)
        (grad_x,) = torch.autograd.grad((mean, rstd), x, (grad_mean, grad_rstd), retain_graph=True)
        (grad_x_rstd_only,) = torch.autograd.grad(rstd, x, grad_rstd)
    assert chosen == [("group_norm_stats", "triton")] + [("group_norm_stats_backward", "triton")] * 2
    args = (x.detach(), mean.detach(), rstd.detach())
    want = ref.group_norm_stats_backward(*args, grad_mean, grad_rstd, frames)
    want_rstd_only = ref.group_norm_stats_backward(*args, torch.zeros_like(grad_mean), grad_rstd, frames)
    torch.testing.assert_close(grad_x, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x_rstd_only, want_rstd_only, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_a_channel_strided_stream_falls_back_for_the_statistics(chosen):
    """The statistics' kernels walk a contiguous or channels_last stream; every other channel of a
    wider one (neither) runs that op's reference and its backward's (warned), while the
    projections read it in place; forward and x's gradient match the reference."""
    videos, frames, channels, height, width, heads, head_dim = CASES[0]
    g = torch.Generator().manual_seed(17)
    wide = _stream(videos, frames, 2 * channels, height, width, torch.float32, g)
    grad_out = randn((videos * frames, channels, height, width), torch.float32, g)
    module = _module(channels, heads, head_dim)

    def forward_backward(forward):
        x = wide.detach().requires_grad_(True)
        out = forward(x[:, ::2], frames)
        out.backward(grad_out)
        return out.detach(), x.grad[:, ::2]

    with tk.backend("triton"):
        with pytest.warns(tk.TurboKernelsFallbackWarning, match="neither a contiguous nor a channels_last"):
            out, grad_x = forward_backward(module)
    assert {("group_norm_stats", "reference"), ("group_norm_stats_backward", "reference")} <= set(chosen)
    assert ("strided_linear", "triton") in chosen
    want, want_grad_x = forward_backward(module.reference_forward)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, want_grad_x, rtol=1e-5, atol=1e-5)


def test_strided_projections_refuse_a_channels_last_stream():
    module = FusedTemporalTransformer(64, 2, 32, projections="strided")
    x = torch.randn(4, 64, 2, 3).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match='projections="strided" reads and writes a contiguous stream'):
        module(x, 2)


def test_auto_on_cpu_runs_the_reference(chosen):
    if DEVICE.type == "cuda":
        pytest.skip("checks the CPU default; this machine has a GPU")
    module = _module(32, 2, 16)
    x = torch.randn(4, 32, 2, 2, requires_grad=True)
    module(x, 2).sum().backward()
    assert {name for _, name in chosen} == {"reference"}


@pytest.mark.parametrize(
    "shape,frames,match",
    [((4, 48, 2, 2), 2, r"x must be the stream \(B\*F, C=64"), ((6, 64, 2), 2, "x must be the stream"),
     ((6, 64, 2, 2), 4, "not divisible by num_frames=4"), ((4, 64, 2, 2), 0, "num_frames must be a positive int")],
    ids=["channels", "3d", "frames-divide", "frames-zero"],
)
def test_errors_name_the_argument(shape, frames, match):
    with pytest.raises(ValueError, match=match):
        FusedTemporalTransformer(64, 2, 32)(torch.randn(shape), frames)


@pytest.mark.parametrize("use_reference", [False, True], ids=["fused", "reference"])
def test_x_on_another_device_than_the_parameters_is_named(use_reference):
    module = FusedTemporalTransformer(64, 2, 32, use_reference=use_reference).to("meta")
    with pytest.raises(ValueError, match=r"x is on cpu, expected the device of the layer's parameters \(meta\)"):
        module(torch.randn(4, 64, 2, 2), 2)


def test_channels_must_split_into_32_groups():
    with pytest.raises(ValueError, match="groups=32 does not divide the 48 channels"):
        FusedTemporalTransformer(48, 2, 24)


@pytest.mark.parametrize("heads,head_dim,depth,name", [(0, 32, 1, "heads"), (2, 0, 1, "head_dim"), (2, 32, 0, "depth")])
def test_sizes_must_be_positive(heads, head_dim, depth, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        FusedTemporalTransformer(64, heads, head_dim, depth)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_opcheck(backend_name):
    """Schema, fake tensors, autograd registration and AOT dispatch of the three ops; the
    strided_linear inputs are transposed views, as the stream's tokens are."""
    g = torch.Generator().manual_seed(18)
    frames, rows, tokens, k, j = 2, 4, 3, 16, 8

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    x = _channels_first_tokens(rows, k, tokens, torch.float32, g)
    weight = randn((j, k), torch.float32, g)
    scale, shift = (randn((rows // frames, k), torch.float32, g) for _ in range(2))
    residual = randn((rows, j, tokens), torch.float32, g)
    stream = randn((rows, 32, 2, 2), torch.float32, g)
    channels_last_stream = randn((rows, 32, 3, 1), torch.float32, g, memory_format=torch.channels_last)
    with tk.backend(backend_name):
        for args in (
            (leaf(x), leaf(weight), leaf(weight[:, 0]), None, leaf(scale), leaf(shift), frames, False),
            (leaf(x), leaf(weight), None, leaf(residual), None, None, frames, True),
        ):
            torch.library.opcheck(torch.ops.turbo_kernels.strided_linear.default, args)
        for x_stream in (stream, channels_last_stream):
            torch.library.opcheck(torch.ops.turbo_kernels.group_norm_stats.default, (leaf(x_stream), frames, 32, 1e-6))
        torch.library.opcheck(
            torch.ops.turbo_kernels.strided_linear_weight_grad.default,
            (randn((rows, tokens, j), torch.float32, g), x, scale, shift, frames),
        )
        # proj_in's operands on either route: channel-major, and a channels_last stream's row-major.
        for grad_a, tokens_x in (
            (_channels_first_tokens(rows, k, tokens, torch.float32, g), x),
            (randn((rows, tokens, k), torch.float32, g), randn((rows, tokens, k), torch.float32, g)),
        ):
            torch.library.opcheck(torch.ops.turbo_kernels.channel_affine_backward.default, (grad_a, tokens_x, scale, frames))
        statistics = [randn((rows // frames, 32), torch.float32, g) for _ in range(4)]
        statistics[1] = statistics[1].abs() + 0.5  # rstd
        for x_stream in (stream, channels_last_stream):
            torch.library.opcheck(
                torch.ops.turbo_kernels.group_norm_stats_backward.default, (x_stream, *statistics, frames)
            )


@pytest.mark.parametrize("projections", ["strided", "cublas"])
def test_torch_compile_fullgraph_and_checkpointing_match_eager(projections):
    """One graph under torch.compile (the ops are opaque custom ops with fake implementations),
    and activation checkpointing recomputes the forward to the same gradients (no hidden state),
    on either projection route. In float64: on a GPU the compiled graph's products may take other
    cuBLAS algorithms than eager's, whose float32 sums differ by ~1e-5."""
    module = _module(32, 2, 16, dtype=torch.float64)
    module.projections = projections
    x = randn((4, 32, 2, 3), torch.float64, torch.Generator().manual_seed(19)).requires_grad_(True)

    def loss(forward):
        out = forward(x)
        return out, torch.autograd.grad(out.square().sum(), [x, *module.parameters()])

    with tk.backend("reference"):
        eager, eager_grads = loss(lambda x: module(x, 2))
        torch.compiler.reset()
        compiled, compiled_grads = loss(torch.compile(lambda x: module(x, 2), fullgraph=True, backend="aot_eager"))
        _, checkpointed_grads = loss(lambda x: torch.utils.checkpoint.checkpoint(module, x, 2, use_reentrant=False))
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for got_grads in (compiled_grads, checkpointed_grads):
        for got, want in zip(got_grads, eager_grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
