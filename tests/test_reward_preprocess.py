"""The fused reward preprocessing (turbo_kernels.reward_preprocess) against torchvision, Keys'
cubic, the release's goldens (shared/reward_reference), finite differences and, for the Triton
kernels, the reference.

Tolerances: the reference (matrix form) in float32 is within 1e-5 of torchvision run in float64
(what the issue asks of fp32); float64 runs match the goldens to their float32 storage (outputs)
or to round-off (float64 gradients and the JSON checksums). Triton outputs are poisoned with NaN
first and must be within twice the reference's own error against float64 (helpers).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import turbo_kernels as tk
from turbo_kernels import dispatch
from turbo_kernels.ops import preprocess as ops
from turbo_kernels.ops.preprocess import PreprocessSpec, reward_preprocess
from turbo_kernels.reference import preprocess as ref
from turbo_kernels.triton_kernels import preprocess as kernels

from .helpers import (
    DEVICE, KERNEL_DTYPES, SHARED, assert_within_2x_of_reference, poison_cuda_allocator, record_kernel_launches,
    unreported_launches,
)

TF = pytest.importorskip("torchvision.transforms.v2.functional")
from torchvision.transforms import InterpolationMode  # noqa: E402

GOLDEN = SHARED / "reward_reference"
FP32_TOLERANCE = 1e-5

HPS = PreprocessSpec(224, "pad")
CLIP = PreprocessSpec(224, "squash")


def _video(crop_offset=None, size=224):
    return PreprocessSpec(size, "crop", mean=ref.IMAGENET_MEAN, std=ref.IMAGENET_STD, crop_offset=crop_offset)


def _frames(shape, seed, dtype=torch.float32, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low).to(dtype)


def _torchvision(frames: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """The release's transforms, written with torchvision's own functions (float64)."""
    batch, num_frames, channels, height, width = frames.shape
    x = frames.double().reshape(batch * num_frames, channels, height, width)
    mode = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
    if spec.mode == "squash":
        x = TF.resize(x, [spec.size, spec.size], interpolation=mode, antialias=spec.antialias)
    else:
        side = max(height, width) if spec.mode == "pad" else min(height, width)
        scale = spec.size / side
        new_h, new_w = round(height * scale), round(width * scale)
        x = TF.resize(x, [new_h, new_w], interpolation=mode, antialias=spec.antialias)
        if spec.mode == "pad":
            pad_h, pad_w = spec.size - new_h, spec.size - new_w
            x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        elif spec.crop_offset is None:
            x = TF.center_crop(x, [spec.size, spec.size])
        else:
            x = TF.crop(x, *spec.crop_offset, spec.size, spec.size)
    x = TF.normalize(x, list(spec.mean), list(spec.std))
    return x.reshape(batch, num_frames, channels, spec.size, spec.size)


# ---- the reference against torchvision and Keys' cubic ------------------------------------------

TORCHVISION_CASES = [
    ((40, 64), PreprocessSpec(24, "pad")),
    ((33, 50), PreprocessSpec(16, "squash", interpolation="bilinear")),
    ((33, 50), _video(size=16)),
    ((33, 50), _video(crop_offset=(0, 7), size=16)),
    ((50, 33), PreprocessSpec(21, "pad", antialias=False)),
    ((17, 12), PreprocessSpec(29, "crop", interpolation="bilinear", antialias=False)),
    ((12, 17), PreprocessSpec(40, "pad")),
    ((20, 20), PreprocessSpec(9, "squash", antialias=False)),
    ((31, 45), PreprocessSpec(31, "crop", mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))),
]


@pytest.mark.parametrize("size_hw,spec", TORCHVISION_CASES, ids=[f"{hw[0]}x{hw[1]}-{s.mode}-{s.size}" for hw, s in TORCHVISION_CASES])
def test_matches_torchvision(size_hw, spec):
    frames = _frames((2, 2, 3, *size_hw), seed=sum(size_hw) + spec.size)
    want = _torchvision(frames, spec)
    torch.testing.assert_close(ref.release_pipeline(frames.double(), spec), want, rtol=0, atol=1e-12)
    leaf = frames.clone().requires_grad_()
    (got,) = reward_preprocess(leaf, [spec])
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=FP32_TOLERANCE)
    # The gradient too: the op's backward against autograd through torchvision's functions.
    upstream = _frames(want.shape, seed=spec.size, low=-1.0)
    leaf64 = frames.double().requires_grad_()
    (want_grad,) = torch.autograd.grad((_torchvision(leaf64, spec) * upstream.double()).sum(), leaf64)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), leaf)
    assert want_grad.abs().max() > 0.1
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=0, atol=FP32_TOLERANCE * want_grad.abs().max().item())


def test_release_size_320x512_to_224_in_one_call():
    frames = _frames((1, 2, 3, 320, 512), seed=7)
    specs = [HPS, CLIP, _video()]
    outputs = reward_preprocess(frames, specs)
    for spec, got in zip(specs, outputs):
        torch.testing.assert_close(got.double(), _torchvision(frames, spec), rtol=0, atol=FP32_TOLERANCE)
    # HPS letterboxes 320x512 to 140x224 content with 42 zero rows above and below, normalised after padding.
    padded = -torch.tensor(ref.OPENAI_CLIP_MEAN) / torch.tensor(ref.OPENAI_CLIP_STD)
    torch.testing.assert_close(outputs[0][0, 0, :, :42], padded[:, None, None].expand(3, 42, 224))
    torch.testing.assert_close(outputs[0][0, 0, :, 182:], padded[:, None, None].expand(3, 42, 224))


def _keys(x: torch.Tensor, a: float) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


@pytest.mark.parametrize("in_size,out_size", [(8, 19), (24, 10)], ids=["upsample", "downsample"])
@pytest.mark.parametrize("antialias", [True, False])
def test_resize_weights_are_keys_cubic(in_size, out_size, antialias):
    """Interior rows: Keys' cubic at the source positions, a = -0.5 with antialias (support
    widened by the downscale factor, weights renormalised) and a = -0.75 without (torch's kernels)."""
    weights = ref.resize_matrix(in_size, out_size, "bicubic", antialias)
    scale = in_size / out_size
    stretch = max(scale, 1.0) if antialias else 1.0
    source = torch.arange(in_size, dtype=torch.float64)
    for i in range(out_size // 3, 2 * out_size // 3):
        position = (i + 0.5) * scale - 0.5
        want = _keys((source - position) / stretch, -0.5 if antialias else -0.75)
        torch.testing.assert_close(weights[i], want / want.sum(), rtol=0, atol=1e-12)


def test_input_range_signed_and_out_dtype():
    unit = _frames((1, 2, 3, 33, 50), seed=3)
    signed = unit * 2 - 1
    specs = [PreprocessSpec(16, "pad"), _video(size=16)]
    want = reward_preprocess(unit, specs)
    got = reward_preprocess(signed, specs, input_range="signed", out_dtype=torch.float16)
    for g, w in zip(got, want):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.float(), w, rtol=0, atol=4e-3)
    # bf16 towers take bf16 input: the float32 result rounded once (a GPU's kernel, computing in
    # another order, may land one bf16 step away).
    for g, w in zip(reward_preprocess(unit, specs, out_dtype=torch.bfloat16), want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)


# ---- the release's goldens ----------------------------------------------------------------------

GOLDEN_PIPELINES = ("hps", "clip", "video")


def _golden():
    if not (GOLDEN / "preprocess_golden.safetensors").is_file():
        pytest.skip(f"reward reference data not found at {GOLDEN} (shared/reward_reference is absent)")
    from safetensors.torch import load_file

    meta = json.loads((GOLDEN / "preprocess_golden.json").read_text())
    return load_file(str(GOLDEN / "preprocess_golden.safetensors")), meta


def _golden_specs(meta_case, antialias=True):
    top, left = meta_case["video"]["random_crop_params_i_j_h_w"][0][:2]
    specs = dict(hps=HPS, clip=CLIP, video=_video((top, left)))
    return {name: dataclasses.replace(spec, antialias=antialias) for name, spec in specs.items()}


def _cosine_field(shape, coefficients):
    """cos(ci i + cj j + cc c + cn n) over (n, c, i, j), as the README defines w and v."""
    ci, cj, cc, cn = coefficients
    n, c, i, j = (torch.arange(s, dtype=torch.float64) for s in shape)
    return torch.cos(ci * i[None, None, :, None] + cj * j[None, None, None, :] + cc * c[None, :, None, None] + cn * n[:, None, None, None])


def _functional(out):
    flat = out.reshape(-1, *out.shape[2:])
    return (_cosine_field(flat.shape, (1.2345, 2.3456, 0.789, 0.4567)) * flat).sum()


@pytest.mark.parametrize("case", ["small", "big"])
def test_release_goldens(case):
    tensors, meta = _golden()
    frames = tensors["small/frames"] if case == "small" else tensors["big/frames_f16exact"].double()
    frames = frames.clone().requires_grad_(True)
    specs = _golden_specs(meta[case])
    outputs = dict(zip(GOLDEN_PIPELINES, reward_preprocess(frames, list(specs.values()))))
    v = _cosine_field((frames.shape[0] * frames.shape[1], *frames.shape[2:]), (0.3141, 0.2718, 1.414, 1.732))
    total_grad = torch.zeros_like(frames)
    for name in GOLDEN_PIPELINES:
        expected = meta[case][name]
        out = outputs[name]
        golden_out = tensors[f"{case}/{name}/out"].double()
        # Stored as float32, rounded from float64.
        torch.testing.assert_close(out.reshape(golden_out.shape), golden_out, rtol=0, atol=4e-7 * golden_out.abs().max())
        loss = _functional(out)
        assert loss.item() == pytest.approx(expected["functional_L"], rel=1e-9, abs=1e-9), name
        (grad,) = torch.autograd.grad(loss, frames, retain_graph=True)
        total_grad += grad
        if case == "small":
            torch.testing.assert_close(grad, tensors[f"small/{name}/grad"], rtol=0, atol=1e-12)
        else:
            slice_ = tensors[f"big/{name}/grad_frame1_ch1"].double()
            torch.testing.assert_close(grad[0, 1, 1], slice_, rtol=0, atol=4e-7 * slice_.abs().max())
        assert grad.sum().item() == pytest.approx(expected["grad_sum"], rel=1e-9, abs=1e-9), name
        assert (grad**2).sum().item() == pytest.approx(expected["grad_sumsq"], rel=1e-9), name
        assert (grad.reshape(v.shape) * v).sum().item() == pytest.approx(expected["grad_dot_v"], rel=1e-9, abs=1e-9), name
    # One backward through all three outputs sums the adjoints.
    (fused_grad,) = torch.autograd.grad(sum(_functional(outputs[name]) for name in GOLDEN_PIPELINES), frames)
    torch.testing.assert_close(fused_grad, total_grad, rtol=0, atol=1e-12)


def test_release_goldens_tell_the_antialias_flag_apart():
    tensors, meta = _golden()
    specs = _golden_specs(meta["small"], antialias=False)
    outputs = reward_preprocess(tensors["small/frames"], list(specs.values()))
    for name, out in zip(GOLDEN_PIPELINES, outputs):
        want = meta["small"][name]["functional_L_if_antialias_False"]
        assert _functional(out).item() == pytest.approx(want, rel=1e-9, abs=1e-9), name


# ---- gradients ----------------------------------------------------------------------------------


def test_gradcheck_float64():
    frames = _frames((1, 2, 3, 6, 9), seed=11, dtype=torch.float64).requires_grad_(True)
    specs = [
        PreprocessSpec(5, "pad"),
        PreprocessSpec(4, "squash", interpolation="bilinear", antialias=False),
        PreprocessSpec(5, "crop", crop_offset=(0, 1), mean=(0.1, 0.2, 0.3), std=(0.9, 0.5, 0.25)),
    ]
    # fast_mode checks the Jacobian along random directions: a few calls instead of one per element.
    assert torch.autograd.gradcheck(
        lambda x: tuple(reward_preprocess(x, specs, input_range="signed")), (frames,), fast_mode=True
    )


def test_opcheck():
    frames = _frames((1, 1, 3, 7, 10), seed=5).requires_grad_(True)
    specs = (PreprocessSpec(6, "pad"), _video(crop_offset=(0, 2), size=5))
    args = (frames, *ops._spec_args(specs), 1.0, 0.0, torch.float32)
    torch.library.opcheck(torch.ops.turbo_kernels.reward_preprocess.default, args)


def test_torch_compile_fullgraph_matches_eager_across_frame_sizes():
    specs = [PreprocessSpec(8, "pad"), _video(size=6)]

    def loss(x):
        return sum(out.square().sum() for out in reward_preprocess(x, specs, input_range="signed"))

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for shape in [(1, 2, 3, 10, 14), (2, 1, 3, 12, 9)]:
        x = _frames(shape, seed=shape[3]).requires_grad_(True)
        want = loss(x)
        (want_grad,) = torch.autograd.grad(want, x)
        got = compiled(x)
        (got_grad,) = torch.autograd.grad(got, x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)


# ---- Triton kernels (the interpreter on the CPU) against the reference ---------------------------


@pytest.fixture
def poisoned(monkeypatch):
    dispatch._warned.clear()
    monkeypatch.setattr(
        kernels, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


# (frames shape before taking every other frame, specs, input range): odd sizes; the first spans
# several output tiles (both axes) and several input tiles in the backward.
TRITON_CASES = [
    ((1, 1, 3, 40, 64), (PreprocessSpec(36, "pad"), _video(size=34), PreprocessSpec(20, "squash")), "unit"),
    ((1, 4, 3, 13, 21), (PreprocessSpec(12, "crop", "bilinear", False, crop_offset=(0, 6)), PreprocessSpec(9, "pad")), "signed"),
    # Upsampling (the cases above only shrink): bilinear 5x4 -> 33 leaves outputs 32 (rows and
    # columns) weighing only the last input row or column, one CHUNK past every other's window, so
    # a window that drops the last row's or column's span (forward or backward) loses them.
    ((1, 2, 3, 5, 4), (PreprocessSpec(33, "squash", "bilinear", False), PreprocessSpec(20, "pad")), "unit"),
]
TRITON_IDS = ["40x64-3-specs", "13x21-strided-signed", "5x4-upsampled"]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,specs,input_range", TRITON_CASES, ids=TRITON_IDS)
def test_triton_matches_reference(shape, specs, input_range, dtype, poisoned, chosen):
    _check_kernels_against_reference("triton", shape, specs, input_range, dtype, chosen)


def _check_kernels_against_reference(backend_name, shape, specs, input_range, dtype, chosen):
    low = -1.0 if input_range == "signed" else 0.0
    frames = _frames(shape, seed=shape[3], low=low).to(DEVICE, dtype)[:, ::2]  # a strided frame selection
    grads_out = [_frames((*frames.shape[:3], s.size, s.size), seed=s.size, low=-1.0).to(DEVICE, dtype) for s in specs]

    def run(backend_name, x):
        x = x.detach().requires_grad_(True)
        with tk.backend(backend_name):
            outputs = reward_preprocess(x, list(specs), input_range=input_range)
            (grad,) = torch.autograd.grad(outputs, x, grads_out)
        return outputs, grad

    poison_cuda_allocator()
    outputs, grad = run(backend_name, frames)
    assert {name for _, name in chosen} == {backend_name}, chosen
    want_lp, grad_lp = run("reference", frames)
    want64, grad64 = run("reference", frames.double())
    for index, (out, lp, w64) in enumerate(zip(outputs, want_lp, want64)):
        assert out.is_contiguous()
        assert_within_2x_of_reference(out, lp, w64, f"output {index}")
    assert_within_2x_of_reference(grad, grad_lp, grad64, "d frames")
    if dtype == torch.float32:
        for out, w64 in zip(outputs, want64):
            torch.testing.assert_close(out.double(), w64, rtol=0, atol=FP32_TOLERANCE)


# The CUDA kernels' tiles are 16 x 64: the third case spans several of them both ways, forward
# and backward, and its squash upsamples the height (70 -> 100) while it downsamples the width.
# A crop resizes the shorter side to its size, so an offset crop of wide frames moves left only.
CUDA_CASES = TRITON_CASES + [
    ((1, 2, 3, 70, 150), (PreprocessSpec(80, "pad"), PreprocessSpec(66, "crop"), PreprocessSpec(100, "squash")), "unit"),
    ((3, 6, 3, 24, 40), (PreprocessSpec(16, "crop", crop_offset=(0, 5)), PreprocessSpec(20, "pad")), "signed"),
]
CUDA_IDS = TRITON_IDS + ["70x150-upsampled", "3-clips-24x40"]


@pytest.mark.parametrize("shape,specs,input_range", CUDA_CASES, ids=CUDA_IDS)
def test_kernel_cases_are_valid_on_the_cpu(shape, specs, input_range):
    """The kernel cases run only on a GPU: the reference runs each here, so a case whose specs do not
    fit its frames fails on every machine, not first on a GPU."""
    frames = _frames(shape, seed=shape[3], low=-1.0 if input_range == "signed" else 0.0)[:, ::2]
    outputs = reward_preprocess(frames, list(specs), input_range=input_range)
    assert [out.shape[-1] for out in outputs] == [spec.size for spec in specs]


def _cuda_extension_error():
    from turbo_kernels import _cuda_ext

    return _cuda_ext.load_error()


def test_cuda_schemas_are_registered_when_the_extension_is_built():
    if _cuda_extension_error() is not None:
        pytest.skip(_cuda_extension_error())
    from turbo_kernels import _cuda_ext

    namespace = _cuda_ext.ops()
    for name in ("reward_preprocess_fwd", "reward_preprocess_bwd"):
        op = getattr(namespace, name).default
        assert "int[] sizes" in str(op._schema), str(op._schema)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), f"{name} has no CUDA kernel"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,specs,input_range", CUDA_CASES, ids=CUDA_IDS)
def test_cuda_matches_reference(shape, specs, input_range, dtype, chosen):
    """New CUDA buffers start as NaN (helpers.poison_cuda_allocator): an unwritten element fails."""
    if _cuda_extension_error() is not None:
        pytest.skip(_cuda_extension_error())
    _check_kernels_against_reference("cuda", shape, specs, input_range, dtype, chosen)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_kernels_at_the_release_size_320x512_to_224(backend_name, poisoned, chosen):
    """The release's three pipelines on 320x512 frames, forward and backward (a GPU test: the
    interpreter takes over a minute on it)."""
    if backend_name == "cuda" and _cuda_extension_error() is not None:
        pytest.skip(_cuda_extension_error())
    _check_kernels_against_reference(backend_name, (1, 4, 3, 320, 512), (HPS, CLIP, _video()), "unit", torch.float32, chosen)


@pytest.mark.gpu
def test_cuda_falls_back_with_one_warning_beyond_eight_specs(chosen):
    if _cuda_extension_error() is not None:
        pytest.skip(_cuda_extension_error())
    frames = _frames((1, 1, 3, 16, 16), seed=3).to(DEVICE)
    specs = [PreprocessSpec(8 + index, "squash") for index in range(ops.CUDA_MAX_SPECS + 1)]
    dispatch._warned.clear()
    with tk.backend("cuda"), pytest.warns(tk.TurboKernelsFallbackWarning, match="up to 8"):
        reward_preprocess(frames, specs)
    assert {name for _, name in chosen} == {"reference"}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_kernel_report_compiles_what_the_mixture_launches(monkeypatch, dtype):
    """The forward and backward launches on decoded frames as RewardMixture passes them (a
    (B, 3, F, H, W) batch viewed as (B, F, 3, H, W)) match REPORT_CONFIGS entries, unit stride included."""
    launches = record_kernel_launches(monkeypatch, kernels)
    frames = _frames((1, 3, 2, 20, 32), seed=5).to(DEVICE, dtype).transpose(1, 2).requires_grad_(True)
    with tk.backend("triton"):
        outputs = reward_preprocess(frames, [PreprocessSpec(16, "pad"), PreprocessSpec(16, "squash"), _video(size=12)])
        torch.autograd.grad(outputs, frames, [torch.ones_like(out) for out in outputs])

    assert {kernel.__name__ for kernel, *_ in launches} == {"reward_preprocess_fwd_kernel", "reward_preprocess_bwd_kernel"}
    assert unreported_launches(launches, kernels.REPORT_CONFIGS) == []


def test_triton_falls_back_with_one_warning_for_float64(poisoned):
    frames = _frames((1, 1, 3, 9, 12), seed=2, dtype=torch.float64).to(DEVICE)
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match="float64"):
        (got,) = reward_preprocess(frames, [PreprocessSpec(8, "squash")])
    torch.testing.assert_close(got, ref.release_pipeline(frames, PreprocessSpec(8, "squash")), rtol=0, atol=1e-12)


def test_triton_falls_back_with_one_warning_for_a_float64_output(poisoned):
    """float32 frames the kernels take, but an output dtype they cannot write."""
    frames = _frames((1, 1, 3, 9, 12), seed=2).to(DEVICE)
    spec = PreprocessSpec(8, "squash")
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match="output dtype torch.float64"):
        (got,) = reward_preprocess(frames, [spec], out_dtype=torch.float64)
    with tk.backend("reference"):
        (want,) = reward_preprocess(frames, [spec], out_dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_image_limit_of_the_kernel_grid():
    """The (frame, channel) images walk grid axis 1, at most 65535 programs: 21845 frames of 3
    channels run the kernels, one frame more falls back (select only, nothing is launched)."""
    dispatch._warned.clear()
    with tk.backend("triton"):
        fits = torch.empty(1, 21845, 3, 1, 1, device=DEVICE)
        assert dispatch.select("reward_preprocess", fits.device, fits, None, [1], 1.0, 0.0, fits.dtype) == "triton"
        over = torch.empty(1, 21846, 3, 1, 1, device=DEVICE)
        with pytest.warns(tk.TurboKernelsFallbackWarning, match="65538 .* images exceed 65535"):
            assert dispatch.select("reward_preprocess", over.device, over, None, [1], 1.0, 0.0, over.dtype) == "reference"


def test_cpu_auto_runs_the_reference(chosen):
    reward_preprocess(_frames((1, 1, 3, 9, 12), seed=2), [PreprocessSpec(8, "pad")])
    assert chosen == [("reward_preprocess", "reference")]


# ---- bad input ----------------------------------------------------------------------------------

GOOD = _frames((1, 2, 3, 10, 16), seed=1)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: reward_preprocess(GOOD[0], [CLIP]), ValueError, "frames must have 5 dimensions"),
        (lambda: reward_preprocess(torch.rand(1, 2, 4, 10, 16), [CLIP]), ValueError, "frames must have 3"),
        (lambda: reward_preprocess(torch.rand(1, 2, 3, 0, 16), [CLIP]), ValueError, "frames must have a positive height"),
        (lambda: reward_preprocess(GOOD.to(torch.int32), [CLIP]), TypeError, "frames must be a floating-point"),
        (lambda: reward_preprocess(GOOD, []), ValueError, "specs must hold at least one"),
        (lambda: reward_preprocess(GOOD, CLIP), TypeError, "specs must be a list"),
        (lambda: reward_preprocess(GOOD, [CLIP, "pad"]), TypeError, r"specs\[1\] must be a PreprocessSpec"),
        (lambda: reward_preprocess(GOOD, [_video(crop_offset=(0, 200))]), ValueError, r"specs\[0\]: crop_offset"),
        (
            lambda: reward_preprocess(torch.rand(1, 1, 3, 97, 5), [PreprocessSpec(4, "pad")]), ValueError,
            r"specs\[0\]: a 97x5 frame resized to 4 on its longer side leaves 4x0 pixels",
        ),
        (lambda: reward_preprocess(GOOD, [CLIP], input_range="pixels"), ValueError, "input_range must be one of"),
        (lambda: reward_preprocess(GOOD, [CLIP], out_dtype=torch.int8), TypeError, "out_dtype must be"),
        (lambda: PreprocessSpec(0, "pad"), ValueError, "size must be a positive int"),
        (lambda: PreprocessSpec(-3, "pad"), ValueError, "size must be a positive int"),
        (lambda: PreprocessSpec(8, "stretch"), ValueError, "mode must be one of"),
        (lambda: PreprocessSpec(8, "pad", interpolation="nearest"), ValueError, "interpolation must be one of"),
        (lambda: PreprocessSpec(8, "pad", std=(1.0, 0.0, 1.0)), ValueError, "std must be positive"),
        (lambda: PreprocessSpec(8, "pad", mean=(0.5, 0.5)), ValueError, "mean must be 3 numbers"),
        (lambda: PreprocessSpec(8, "pad", crop_offset=(0, 0)), ValueError, "crop_offset is only for mode 'crop'"),
        (lambda: PreprocessSpec(8, "crop", crop_offset=(-1, 0)), ValueError, "crop_offset must be"),
    ],
    ids=[
        "4d", "4-channels", "empty-image", "int-frames", "empty-specs", "spec-not-list", "not-a-spec",
        "crop-offset-out-of-range", "too-thin-to-pad", "input-range", "out-dtype", "size-0", "size-negative", "mode",
        "interpolation", "std", "mean", "offset-without-crop", "negative-offset",
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_crop_offset_at_the_edge_is_accepted():
    # 10x16 -> short side 8: 8x13 (12.8 rounds to 13); the last crop starts at column 5.
    (out,) = reward_preprocess(GOOD, [_video(crop_offset=(0, 5), size=8)])
    assert out.shape == (1, 2, 3, 8, 8) and math.isfinite(out.abs().max().item())
    with pytest.raises(ValueError, match="crop_offset"):
        reward_preprocess(GOOD, [_video(crop_offset=(0, 6), size=8)])
