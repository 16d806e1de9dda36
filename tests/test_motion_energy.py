"""temporal_attention_probs and motion_energy: the Triton kernels (interpreter on the CPU, real on
a GPU) against the reference, forward and backward, in both layouts, on odd frame counts, head
dims and sequence counts, strided views (of one fused projection; q and k with different strides),
per-video means and ties; the
conventions against the release's stored maps; argument errors, opcheck, torch.compile and the
capture utility.

Tolerance: the kernel's error against float64 maths is at most twice that of the reference run in
the same storage dtype, plus one rounding of that dtype (helpers.assert_within_2x_of_reference).
Output buffers (partial sums included) start as NaN, so an element a kernel never writes fails.
"""

import zlib

import pytest
import torch
from torch import nn

import turbo_kernels as tk
from turbo_kernels import dispatch
from turbo_kernels.capture import capture_attention_inputs
from turbo_kernels.ops.motion import motion_energy, temporal_attention_probs
from turbo_kernels.reference import attention as ref
from turbo_kernels.triton_kernels import motion_energy as kernels

from .helpers import (
    DEVICE, KERNEL_DTYPES, SHARED, assert_within_2x_of_reference, poison_cuda_allocator, randn, record_kernel_launches,
    unreported_launches,
)

TRITON_USABLE = dispatch.machine_unavailable_reason("triton", DEVICE) is None
GOLDEN = SHARED / "vc2_reference"

# (layout, batch, frames, positions, heads, head dim, source): F in {1, 4, 16, 17, 64} (4 is the
# tiny model's, 17 and 64 run one sequence a program), head dims 8, 16, 40 (several ragged
# head-dim chunks), 32, 64 (VideoCrafter2's) and 128, sequence counts that leave ragged last
# blocks, several heads, and q/k (_qk's sources) from two projections, sliced from one fused qkv
# projection, or with strides of their own (q its own projection, k a slice of a fused kv).
CASES = [
    ("frames", 2, 4, 3, 2, 8, "separate"),
    ("sequences", 2, 16, 5, 2, 40, "fused"),
    ("frames", 2, 16, 9, 1, 32, "fused"),
    ("frames", 1, 17, 3, 2, 16, "mixed"),
    ("sequences", 2, 1, 2, 3, 8, "separate"),
    ("sequences", 1, 64, 2, 1, 16, "mixed"),
    ("frames", 1, 16, 3, 2, 64, "fused"),  # VideoCrafter2's head dim
    ("frames", 1, 8, 2, 1, 128, "mixed"),
]
CASE_IDS = [f"{c[0]}-B{c[1]}F{c[2]}N{c[3]}h{c[4]}d{c[5]}-{c[6]}" for c in CASES]

pytestmark = pytest.mark.skipif(not TRITON_USABLE, reason="Triton cannot run here (no GPU, no interpreter)")


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    dispatch._warned.clear()
    monkeypatch.setattr(
        kernels, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )
    poison_cuda_allocator()


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _assert_ran(chosen, backend_name, ops):
    assert {op for op, _ in chosen} == set(ops), chosen
    assert all(name == backend_name for _, name in chosen), f"expected {backend_name} everywhere, got {chosen}"


def _qk(layout, batch, frames, positions, heads, head_dim, source, dtype, g):
    rows, second = (batch * frames, positions) if layout == "frames" else (batch * positions, frames)
    channels = heads * head_dim
    if source == "fused":
        qkv = randn((rows, second, 3 * channels), dtype, g)
        return qkv[..., :channels], qkv[..., channels : 2 * channels]
    q = randn((rows, second, channels), dtype, g)
    if source == "mixed":
        return q, randn((rows, second, 2 * channels), dtype, g)[..., :channels]
    assert source == "separate", source
    return q, randn((rows, second, channels), dtype, g)


def _ref_probs(num_sequences, heads, frames, g, dtype=torch.float32):
    logits = torch.randn(num_sequences, heads, frames, frames, generator=g, dtype=torch.float64) * 2
    return torch.softmax(logits, dim=-1).to(device=DEVICE, dtype=dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_probs_forward_and_backward(case, dtype, chosen):
    layout, batch, frames, positions, heads, head_dim, source = case
    g = torch.Generator().manual_seed(_seed(case, str(dtype)))
    q, k = _qk(*case, dtype, g)
    num_sequences = batch * positions
    upstream = randn((num_sequences, heads, frames, frames), torch.float32, g)

    q_in, k_in = _leaves(q, k)
    with tk.backend("triton"):
        probs = temporal_attention_probs(q_in, k_in, frames, heads, layout)
        grads = torch.autograd.grad(probs, (q_in, k_in), upstream)
    _assert_ran(chosen, "triton", ["temporal_attention_probs", "temporal_attention_probs_backward"])
    assert probs.dtype == torch.float32

    q64, k64 = _leaves(q.double(), k.double())
    want64 = ref.temporal_attention_probs(q64, k64, frames, heads, layout)
    grads64 = torch.autograd.grad(want64, (q64, k64), upstream.double())
    q_lp, k_lp = _leaves(q, k)
    want_lp = ref.temporal_attention_probs(q_lp, k_lp, frames, heads, layout)
    grads_lp = torch.autograd.grad(want_lp, (q_lp, k_lp), upstream)
    assert_within_2x_of_reference(probs, want_lp, want64, "probs")
    for name, out, lp, w64 in zip(("d q", "d k"), grads, grads_lp, grads64):
        assert_within_2x_of_reference(out, lp, w64, name)


@pytest.mark.parametrize("per_video", [False, True], ids=["pooled", "per-video"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_motion_energy_forward_and_backward(case, dtype, per_video, chosen):
    layout, batch, frames, positions, heads, head_dim, source = case
    g = torch.Generator().manual_seed(_seed(case, str(dtype), per_video))
    q, k = _qk(*case, dtype, g)
    num_sequences = batch * positions
    ref_probs = _ref_probs(num_sequences, heads, frames, g)
    num_videos = batch if per_video else None
    # Scaled so that the gradients are O(1): dE/dP carries 1 / (number of kept entries).
    kept = num_sequences * heads * frames // (batch if per_video else 1)
    upstream = kept * (0.5 + torch.rand((batch,) if per_video else (), generator=g)).to(DEVICE)

    q_in, k_in = _leaves(q, k)
    with tk.backend("triton"):
        energy = motion_energy(q_in, k_in, ref_probs, frames, heads, layout, num_videos=num_videos)
        grads = torch.autograd.grad(energy, (q_in, k_in), upstream)
    _assert_ran(chosen, "triton", ["motion_energy", "motion_energy_backward"])
    assert energy.dtype == torch.float32 and energy.shape == ((batch,) if per_video else ())

    q64, k64 = _leaves(q.double(), k.double())
    want64 = ref.motion_energy(q64, k64, ref_probs, frames, heads, layout, num_videos=num_videos)
    grads64 = torch.autograd.grad(want64, (q64, k64), upstream.double())
    q_lp, k_lp = _leaves(q, k)
    want_lp = ref.motion_energy(q_lp, k_lp, ref_probs, frames, heads, layout, num_videos=num_videos)
    grads_lp = torch.autograd.grad(want_lp, (q_lp, k_lp), upstream)
    assert_within_2x_of_reference(energy, want_lp, want64, "energy")
    for name, out, lp, w64 in zip(("d q", "d k"), grads, grads_lp, grads64):
        assert_within_2x_of_reference(out, lp, w64, name)


@pytest.mark.parametrize("per_video", [False, True], ids=["pooled", "per-video"])
@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_reference_backend_backwards_match_autograd(case, per_video, chosen):
    """The reference backend's hand-written backwards (ops.motion._reference_probs_backward and
    _reference_energy_backward: the CPU default and every fallback) against autograd of the
    reference forwards, in float64. The tests above hold the Triton backwards to those forwards but
    never run these: a dropped factor 2, a per-video count taken over the whole batch, a softmax
    backward summed over queries, or dk = dS q instead of dS^T q all passed."""
    layout, batch, frames, positions, heads, head_dim, source = case
    g = torch.Generator().manual_seed(_seed(case, per_video, "reference-backward"))
    q, k = _qk(*case, torch.float64, g)
    num_sequences = batch * positions
    ref_probs = _ref_probs(num_sequences, heads, frames, g, torch.float64)
    num_videos = batch if per_video else None
    probs_upstream = randn((num_sequences, heads, frames, frames), torch.float64, g)
    energy_upstream = (0.5 + torch.rand((batch,) if per_video else (), generator=g, dtype=torch.float64)).to(DEVICE)

    def both(probs_fn, energy_fn, q, k):
        q, k = _leaves(q, k)
        probs_grads = torch.autograd.grad(probs_fn(q, k, frames, heads, layout), (q, k), probs_upstream)
        energy = energy_fn(q, k, ref_probs, frames, heads, layout, num_videos=num_videos)
        return probs_grads + torch.autograd.grad(energy, (q, k), energy_upstream)

    with tk.backend("reference"):
        got = both(temporal_attention_probs, motion_energy, q, k)
    ops = ["temporal_attention_probs", "temporal_attention_probs_backward", "motion_energy", "motion_energy_backward"]
    _assert_ran(chosen, "reference", ops)
    want = both(ref.temporal_attention_probs, ref.motion_energy, q, k)
    for name, out, w in zip(("probs d q", "probs d k", "energy d q", "energy d k"), got, want):
        torch.testing.assert_close(out, w, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("magnitude", [1.0, 1e-5])
@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float32], ids=str)
def test_16bit_gradients_round_once(dtype, magnitude):
    """dS is split into two 16-bit halves scaled by a power of two for the tensor-core products,
    so 16-bit dq and dk carry only their final rounding, as the fp32-maths reference does, even
    for upstream gradients at the bottom of fp16's range. The 2x rule cannot see this."""
    g = torch.Generator().manual_seed(_seed(str(dtype), magnitude))
    frames, heads, head_dim = 16, 2, 32
    q, k = _qk("sequences", 2, frames, 8, heads, head_dim, "separate", dtype, g)
    upstream = randn((16, heads, frames, frames), torch.float32, g) * magnitude

    def grads_of(probs_fn, q, k, upstream):
        q, k = _leaves(q, k)
        return torch.autograd.grad(probs_fn(q, k, frames, heads, "sequences"), (q, k), upstream)

    with tk.backend("triton"):
        grads = grads_of(temporal_attention_probs, q, k, upstream)
    grads64 = grads_of(ref.temporal_attention_probs, q.double(), k.double(), upstream.double())
    grads_lp = grads_of(ref.temporal_attention_probs, q, k, upstream)
    for name, out, lp, w64 in zip(("d q", "d k"), grads, grads_lp, grads64):
        kernel_err = (out.double() - w64).abs().max().item()
        ref_err = (lp.double() - w64).abs().max().item()
        assert kernel_err <= 1.2 * ref_err, f"{name}: error {kernel_err:.3e} vs the reference's {ref_err:.3e}"


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_kernel_report_compiles_what_the_motion_prior_launches(monkeypatch, dtype):
    """The motion prior's launches (reference maps under no_grad, then the energy of two clips and
    its backward, q and k from their own projections in the "sequences" layout at 16 frames)
    match REPORT_CONFIGS entries: signatures with positions = 1 and key-contiguous maps,
    constexprs and warps."""
    launches = record_kernel_launches(monkeypatch, kernels)
    g = torch.Generator().manual_seed(29)
    frames, heads = 16, 2
    q_ref, k_ref = _qk("sequences", 2, frames, 3, heads, 32, "separate", dtype, g)
    q, k = _leaves(*_qk("sequences", 2, frames, 3, heads, 32, "separate", dtype, g))
    with tk.backend("triton"):
        with torch.no_grad():
            ref_probs = temporal_attention_probs(q_ref, k_ref, frames, heads, "sequences")
        energy = motion_energy(q, k, ref_probs, frames, heads, "sequences", num_videos=2)
        torch.autograd.grad(energy.sum(), (q, k))
    launched = [kernel.__name__ for kernel, *_ in launches]
    assert launched == ["attention_probs_fwd_kernel", "motion_energy_fwd_kernel", "motion_energy_bwd_kernel"]
    assert unreported_launches(launches, kernels.REPORT_CONFIGS) == []


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_ties_keep_the_first_key(backend_name):
    """Rows of ref_probs with several equal maxima keep the first, as torch.argmax does."""
    g = torch.Generator().manual_seed(7)
    frames, heads = 4, 2
    q, k = _qk("sequences", 1, frames, 6, heads, 8, "separate", torch.float32, g)
    rows = torch.tensor(
        [[0.4, 0.1, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3], [0.0, 0.5, 0.0, 0.5]],
        dtype=torch.float32,
    )
    first_max = torch.tensor([0, 0, 1, 1])
    choice = torch.randint(0, 4, (6, heads, frames), generator=g)
    ref_probs, top1 = rows[choice].to(DEVICE), first_max[choice].unsqueeze(-1).to(DEVICE)
    assert torch.equal(ref_probs.argmax(-1, keepdim=True), top1)
    with tk.backend(backend_name):
        energy = motion_energy(q, k, ref_probs, frames, heads, "sequences")
    probs = ref.temporal_attention_probs(q.double(), k.double(), frames, heads, "sequences")
    expected = ((probs.gather(-1, top1) - ref_probs.double().gather(-1, top1)) ** 2).mean()
    torch.testing.assert_close(energy.double(), expected, rtol=1e-6, atol=0)


def test_ref_probs_of_any_dtype_and_strides_and_expanded_grads(chosen):
    g = torch.Generator().manual_seed(3)
    batch, frames, positions, heads = 2, 4, 3, 2
    q, k = _qk("frames", batch, frames, positions, heads, 8, "separate", torch.float32, g)
    num_sequences = batch * positions
    # A (B*N, F, heads, F) buffer seen as (B*N, heads, F, F): strided on every axis.
    strided = _ref_probs(num_sequences, heads, frames, g).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    for ref_probs in (strided, strided.half(), strided.double()):
        q_in, k_in = _leaves(q, k)
        with tk.backend("triton"):
            # sum() hands the per-video energies an expanded (stride 0) gradient.
            grads = torch.autograd.grad(
                motion_energy(q_in, k_in, ref_probs, frames, heads, num_videos=batch).sum(), (q_in, k_in)
            )
        q64, k64 = _leaves(q.double(), k.double())
        want = torch.autograd.grad(
            ref.motion_energy(q64, k64, ref_probs.float(), frames, heads, num_videos=batch).sum(), (q64, k64)
        )
        for out, w in zip(grads, want):
            torch.testing.assert_close(out.double(), w, rtol=1e-5, atol=1e-8)
    assert {name for _, name in chosen} == {"triton"}


def test_probs_of_a_strided_grad():
    g = torch.Generator().manual_seed(4)
    q, k = _qk("sequences", 1, 16, 3, 2, 16, "fused", torch.float32, g)
    upstream = randn((3, 16, 2, 16), torch.float32, g).transpose(1, 2)
    q_in, k_in = _leaves(q, k)
    with tk.backend("triton"):
        grads = torch.autograd.grad(temporal_attention_probs(q_in, k_in, 16, 2, "sequences"), (q_in, k_in), upstream)
    q64, k64 = _leaves(q.double(), k.double())
    want64 = ref.temporal_attention_probs(q64, k64, 16, 2, "sequences")
    want = torch.autograd.grad(want64, (q64, k64), upstream.double())
    for out, w in zip(grads, want):
        torch.testing.assert_close(out.double(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["frames", "sequences"])
def test_q_and_k_with_their_own_strides_are_read_in_place(monkeypatch, layout):
    """Every kernel reads q and k where they lie, even when their strides differ (q its own
    projection, k a slice of a fused kv projection): no contiguous copy of either."""
    launches = record_kernel_launches(monkeypatch, kernels)
    g = torch.Generator().manual_seed(31)
    frames, heads = 16, 2
    q, k = _qk(layout, 2, frames, 3, heads, 16, "mixed", torch.float32, g)
    assert q.stride() != k.stride()
    q_in, k_in = (t.detach().requires_grad_(True) for t in (q, k))  # leaves keeping their strides
    ref_probs = _ref_probs(2 * 3, heads, frames, g)
    with tk.backend("triton"):
        probs = temporal_attention_probs(q_in, k_in, frames, heads, layout)
        torch.autograd.grad(probs, (q_in, k_in), torch.ones_like(probs))
        energy = motion_energy(q_in, k_in, ref_probs, frames, heads, layout)
        torch.autograd.grad(energy, (q_in, k_in))
    assert len(launches) == 4
    for kernel, args, _ in launches:
        q_arg, k_arg = (args[0], args[1]) if kernel.__name__.endswith("fwd_kernel") else (args[1], args[2])
        assert (q_arg.data_ptr(), k_arg.data_ptr()) == (q_in.data_ptr(), k_in.data_ptr()), kernel.__name__


def _realising_qk(probs: torch.Tensor, head_dim: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k, (S, heads, F, head_dim) with head_dim >= F, whose softmax(scale q k^T) is `probs`:
    q_i = log P_i (padded with zeros), k_j = e_j / scale."""
    num_sequences, heads, frames, _ = probs.shape
    q = torch.zeros(num_sequences, heads, frames, head_dim, dtype=torch.float64)
    q[..., :frames] = probs.log()
    k = torch.zeros_like(q)
    k[..., :frames] = torch.eye(frames, dtype=torch.float64) / scale
    return q, k


@pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"release goldens not found at {GOLDEN} (../shared is absent)")
def test_conventions_match_the_release_maps_and_top1_indices():
    """The release's stored maps are ordered ((b*H + y)*W + x)*heads + head and its top-1 indices
    (B, H*W*heads, T) per clip: read as (B*N, heads, F, F) and per-video groups, the kernels must
    reproduce the maps from q/k built in the frames layout and the per-clip masked MSE of those
    maps against a reference whose top-1 keys are the stored indices."""
    from safetensors.torch import load_file

    layer = "output_blocks.0.2.transformer_blocks.0.attn1"
    maps = load_file(str(GOLDEN / "tiny_attn_probs.safetensors"))[layer]
    top1 = load_file(str(GOLDEN / "tiny_motion.safetensors"))[f"ref_top1.{layer}"].long()
    batch, frames, heads, head_dim = top1.shape[0], top1.shape[2], 8, 8
    positions = top1.shape[1] // heads
    assert maps.shape == (batch * positions * heads, frames, frames)
    # A few positions of each clip keep the interpreter quick; the ordering is what is checked.
    kept_positions = 3
    maps = maps.reshape(batch, positions, heads, frames, frames)[:, :kept_positions]
    top1 = top1.reshape(batch, positions, heads, frames)[:, :kept_positions]
    scale = head_dim**-0.5

    live = maps.reshape(-1, heads, frames, frames)
    q_s, k_s = _realising_qk(live, head_dim, scale)
    frames_shape = (batch * frames, kept_positions, heads * head_dim)
    q, k = (ref.from_sequences(x, frames_shape, "frames").float().to(DEVICE) for x in (q_s, k_s))
    ref_probs = (0.5 * torch.nn.functional.one_hot(top1, frames) + 0.5 / frames).reshape(live.shape).to(DEVICE)
    with tk.backend("triton"):
        probs = temporal_attention_probs(q, k, frames, heads, "frames", scale=scale)
        energy = motion_energy(q, k, ref_probs, frames, heads, "frames", scale=scale, num_videos=batch)
    torch.testing.assert_close(probs.double().cpu(), live, rtol=0, atol=1e-6)

    # Per clip b: mean over (position, head, query i) of (maps[..., i, top1] - ref)^2, the mask
    # indexed by the stored indices in their own layout.
    kept = maps.gather(-1, top1.unsqueeze(-1)).squeeze(-1) - (0.5 + 0.5 / frames)
    expected = (kept**2).reshape(batch, -1).mean(dim=1)
    torch.testing.assert_close(energy.double().cpu(), expected, rtol=1e-5, atol=0)


def test_unsupported_inputs_fall_back_to_the_reference(chosen):
    g = torch.Generator().manual_seed(5)
    q, k = _qk("sequences", 1, 65, 2, 1, 8, "separate", torch.float32, g)
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match="num_frames=65 exceeds 64"):
        temporal_attention_probs(q, k, 65, 1, "sequences")
    q, k = _qk("frames", 1, 4, 2, 1, 8, "separate", torch.float32, g)
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match="mixed storage dtypes"):
        motion_energy(q, k.half(), _ref_probs(2, 1, 4, g), 4, 1)
    # Only k with a channel stride: the check covers both tensors.
    k_every_other = torch.stack([k, torch.zeros_like(k)], dim=-1).flatten(-2)[..., ::2]
    ref_probs = _ref_probs(2, 1, 4, g)
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match="k has channel stride 2"):
        energy = motion_energy(q, k_every_other, ref_probs, 4, 1)
    torch.testing.assert_close(energy, ref.motion_energy(q, k, ref_probs, 4, 1, "frames"))
    assert [name for _, name in chosen] == ["reference"] * 3


def test_float64_runs_the_reference(chosen):
    g = torch.Generator().manual_seed(6)
    q, k = _qk("frames", 1, 4, 2, 1, 8, "separate", torch.float64, g)
    energy = motion_energy(q, k, _ref_probs(2, 1, 4, g), 4, 1)
    assert energy.dtype == torch.float64 and chosen == [("motion_energy", "reference")]


def _valid_energy_args(**overrides):
    args = dict(
        q=torch.randn(8, 3, 8), k=torch.randn(8, 3, 8), ref_probs=torch.rand(6, 2, 4, 4), num_frames=4, heads=2,
        layout="frames",
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(k=torch.randn(8, 3, 6)), ValueError, "k has shape"),
        (dict(k=torch.randn(8, 3, 8, device="meta")), ValueError, "k is on meta"),
        (dict(q=torch.zeros(8, 3, 8, dtype=torch.int32)), TypeError, "q must be a floating-point"),
        (dict(q=torch.randn(8, 24)), ValueError, "q must have 3 dimensions"),
        (dict(heads=3), ValueError, "not divisible by heads=3"),
        (dict(num_frames=3), ValueError, "not divisible by num_frames=3"),
        (dict(layout="sequences"), ValueError, "F in the 'sequences' layout"),
        (dict(layout="tokens"), ValueError, "layout must be one of"),
        (dict(num_frames=0), ValueError, "num_frames must be a positive int"),
        (dict(scale=float("inf")), ValueError, "scale must be a positive finite number"),
        (
            dict(ref_probs=torch.rand(6, 2, 4, 5)), ValueError,
            r"ref_probs has shape \(6, 2, 4, 5\), expected \(B\*N, heads, F, F\) = \(6, 2, 4, 4\)",
        ),
        (dict(ref_probs=torch.rand(6, 2, 4, 4, device="meta")), ValueError, "ref_probs is on meta"),
        (dict(ref_probs=torch.zeros(6, 2, 4, 4, dtype=torch.int64)), TypeError, "ref_probs must be a floating-point"),
        (dict(num_videos=4), ValueError, r"num_videos=4 does not divide the 6 sequences \(B\*N\)"),
        (dict(num_videos=True), ValueError, "num_videos must be a positive int"),
    ],
)
def test_errors_name_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        motion_energy(**_valid_energy_args(**overrides))


def test_probs_errors_name_the_argument():
    with pytest.raises(ValueError, match="heads=5"):
        temporal_attention_probs(torch.randn(8, 3, 8), torch.randn(8, 3, 8), 4, 5)
    with pytest.raises(TypeError, match="k must be a floating-point"):
        temporal_attention_probs(torch.randn(8, 3, 8), torch.zeros(8, 3, 8, dtype=torch.int64), 4, 2)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_opcheck(backend_name):
    g = torch.Generator().manual_seed(8)
    q, k = _qk("frames", 2, 4, 3, 2, 8, "fused", torch.float32, g)
    q, k = q.requires_grad_(True), k.requires_grad_(True)
    ref_probs = _ref_probs(6, 2, 4, g)
    with tk.backend(backend_name):
        torch.library.opcheck(torch.ops.turbo_kernels.temporal_attention_probs.default, (q, k, 4, 2, "frames", 0.35))
        for num_videos in (None, 2):
            torch.library.opcheck(
                torch.ops.turbo_kernels.motion_energy.default, (q, k, ref_probs, 4, 2, "frames", 0.35, num_videos)
            )


def test_torch_compile_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(9)
    q, k = _qk("sequences", 2, 4, 3, 2, 8, "fused", torch.float32, g)
    ref_probs = _ref_probs(6, 2, 4, g)

    def loss(q, k):
        probs = temporal_attention_probs(q, k, 4, 2, "sequences")
        energy = motion_energy(q, k, ref_probs, 4, 2, "sequences", num_videos=2)
        return 1e4 * energy.sum() + probs.square().mean()

    q_in, k_in = _leaves(q, k)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with tk.backend("triton"):
        eager = loss(q_in, k_in)
        eager_grads = torch.autograd.grad(eager, (q_in, k_in))
        got = compiled(q_in, k_in)
        got_grads = torch.autograd.grad(got, (q_in, k_in))
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=0)
    for out, want in zip(got_grads, eager_grads):
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-9)


class _TemporalSelfAttention(nn.Module):
    """A stand-in for a temporal attention layer: (B*N, F, C) tokens, to_q / to_k / to_v."""

    def __init__(self, channels: int, heads: int, frames: int):
        super().__init__()
        self.heads, self.frames = heads, frames
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels, bias=False) for _ in range(3))

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return x + ref.temporal_attention(q, k, v, self.frames, self.heads, "sequences")


def test_capture_records_q_and_k_with_their_graphs():
    torch.manual_seed(10)
    frames, heads, channels = 4, 2, 16
    model = nn.Sequential(*(_TemporalSelfAttention(channels, heads, frames) for _ in range(2))).to(DEVICE)
    layers = {"first": model[0], "second": model[1]}
    x_ref = torch.randn(6, frames, channels, device=DEVICE)
    x = torch.randn(6, frames, channels, device=DEVICE, requires_grad=True)

    with torch.no_grad(), capture_attention_inputs(layers) as reference_pass:
        model(x_ref)
    ref_probs = {
        name: ref.temporal_attention_probs(q, k, frames, heads, "sequences") for name, (q, k) in reference_pass.items()
    }
    with capture_attention_inputs(layers) as live:
        hidden = model[0](x)
        model[1](hidden)
    assert all(not module._forward_hooks for module in model.modules()), "hooks left behind"
    assert set(live) == {"first", "second"}
    torch.testing.assert_close(live["first"][0], model[0].to_q(x))
    torch.testing.assert_close(live["second"][1], model[1].to_k(hidden))

    with tk.backend("triton"):
        energy = sum(motion_energy(q, k, ref_probs[name], frames, heads, "sequences") for name, (q, k) in live.items())
    (grad,) = torch.autograd.grad(energy, x)

    x64 = x.detach().double().requires_grad_(True)
    model64 = model.double()
    q0, k0 = model64[0].to_q(x64), model64[0].to_k(x64)
    hidden64 = model64[0](x64)
    q1, k1 = model64[1].to_q(hidden64), model64[1].to_k(hidden64)
    want = ref.motion_energy(q0, k0, ref_probs["first"], frames, heads, "sequences") + ref.motion_energy(
        q1, k1, ref_probs["second"], frames, heads, "sequences"
    )
    (grad64,) = torch.autograd.grad(want, x64)
    torch.testing.assert_close(energy.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-9)


def test_capture_keeps_each_modules_latest_call():
    layer = _TemporalSelfAttention(8, 2, 4).to(DEVICE)
    first, second = (torch.randn(3, 4, 8, device=DEVICE) for _ in range(2))
    with torch.no_grad(), capture_attention_inputs({"layer": layer}) as qk:
        layer(first)
        layer(second)
        want = (layer.to_q(second), layer.to_k(second))
    assert torch.equal(qk["layer"][0], want[0]) and torch.equal(qk["layer"][1], want[1])


def test_capture_removes_its_hooks_when_the_block_raises():
    layer = _TemporalSelfAttention(8, 2, 4)
    with pytest.raises(RuntimeError, match="the forward failed"):
        with capture_attention_inputs({"layer": layer}):
            raise RuntimeError("the forward failed")
    assert all(not module._forward_hooks for module in layer.modules()), "hooks left behind"


def test_capture_names_a_module_without_projections():
    """And removes the hooks it had put on the modules before it."""
    layer = _TemporalSelfAttention(8, 2, 4)
    with pytest.raises(TypeError, match=r"modules\['proj'\] \(Linear\) has no to_q"):
        with capture_attention_inputs({"layer": layer, "proj": nn.Linear(4, 4)}):
            pass
    assert all(not module._forward_hooks for module in layer.modules()), "hooks left behind"


@pytest.mark.gpu
def test_production_shapes_on_gpu():
    """VC2's decoder at 320x512 (N = 40*64 positions, 16 frames, 5 heads x 64) in bf16, and a
    grid of over 100k sequences."""
    g = torch.Generator().manual_seed(11)
    for batch, positions, heads in ((2, 2560, 5), (1, 131072, 1)):
        q, k = _qk("sequences", batch, 16, positions, heads, 64, "fused", torch.bfloat16, g)
        ref_probs = _ref_probs(batch * positions, heads, 16, g)
        # One unit of upstream gradient per kept entry makes the gradients O(1).
        upstream = torch.full((batch,), float(positions * heads * 16), device=DEVICE)
        q_in, k_in = _leaves(q, k)
        with tk.backend("triton"):
            energy = motion_energy(q_in, k_in, ref_probs, 16, heads, "sequences", num_videos=batch)
            grads = torch.autograd.grad(energy, (q_in, k_in), upstream)
        q64, k64 = _leaves(q.double(), k.double())
        want64 = ref.motion_energy(q64, k64, ref_probs, 16, heads, "sequences", num_videos=batch)
        grads64 = torch.autograd.grad(want64, (q64, k64), upstream.double())
        q_lp, k_lp = _leaves(q, k)
        want_lp = ref.motion_energy(q_lp, k_lp, ref_probs, 16, heads, "sequences", num_videos=batch)
        grads_lp = torch.autograd.grad(want_lp, (q_lp, k_lp), upstream)
        assert_within_2x_of_reference(energy, want_lp, want64, "energy")
        for name, out, lp, w64 in zip(("d q", "d k"), grads, grads_lp, grads64):
            assert_within_2x_of_reference(out, lp, w64, name)
