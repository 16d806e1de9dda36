"""temporal_attention: the Triton kernels (interpreter on the CPU, real on a GPU) against the
reference, forward and backward, in both layouts, on odd frame counts, head dims and sequence
counts, and on strided views of one fused qkv projection; plus fallbacks, argument errors,
opcheck and torch.compile.

Tolerance: the kernel's error against float64 maths is at most twice that of the reference run in
the same storage dtype, plus one rounding of that dtype (helpers.assert_within_2x_of_reference).
Output buffers start as NaN, so an element a kernel never writes fails.
"""

import warnings

import pytest
import torch

import turbo_kernels as tk
from turbo_kernels import dispatch
from turbo_kernels.ops.attention import temporal_attention, temporal_attention_packed
from turbo_kernels.reference import attention as ref
from turbo_kernels.triton_kernels import temporal_attention as kernels

from .helpers import DEVICE, HAS_GPU, KERNEL_DTYPES, assert_within_2x_of_reference, check_temporal_attention, randn, seeded_generator

TRITON_USABLE = dispatch.machine_unavailable_reason("triton", DEVICE) is None
OPS = ("temporal_attention", "temporal_attention_backward")

# (layout, batch, frames, positions, heads, head dim): together they cover F in {1, 3, 5, 8, 16,
# 17, 64} (one sequence per tile at 64, padded frames at 3, 5 and 17), head dims 32, 40, 64, 80
# (padded to 64 and 128) and 128, odd position counts, several heads, and ragged last tiles.
CASES = [
    ("frames", 2, 16, 5, 2, 64),
    ("sequences", 2, 16, 3, 3, 32),
    ("frames", 1, 8, 7, 1, 40),
    ("sequences", 1, 3, 5, 2, 80),
    ("frames", 3, 5, 11, 1, 32),
    ("frames", 2, 1, 9, 2, 32),
    ("sequences", 1, 17, 3, 2, 40),
    ("frames", 1, 64, 3, 1, 32),
    ("frames", 1, 8, 3, 1, 128),
]
CASE_IDS = [f"{layout}-B{b}F{f}N{n}h{h}d{d}" for layout, b, f, n, h, d in CASES]


def _shape(layout, batch, frames, positions, heads, head_dim):
    channels = heads * head_dim
    return (batch * frames, positions, channels) if layout == "frames" else (batch * positions, frames, channels)


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    """Every Triton output buffer starts as NaN."""
    dispatch._warned.clear()
    monkeypatch.setattr(
        kernels, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


def _assert_triton_ran_forward_and_backward(chosen):
    assert sorted(set(chosen)) == [(op, "triton") for op in OPS], chosen


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout,batch,frames,positions,heads,head_dim", CASES, ids=CASE_IDS)
def test_matches_reference(layout, batch, frames, positions, heads, head_dim, dtype, chosen):
    g = seeded_generator(layout, frames, positions, head_dim, str(dtype))
    shape = _shape(layout, batch, frames, positions, heads, head_dim)
    q, k, v, grad_out = (randn(shape, dtype, g) for _ in range(4))
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with tk.backend("triton"):
        out = temporal_attention(*inputs, frames, heads, layout=layout)
        grads = torch.autograd.grad(out, inputs, grad_out)
    _assert_triton_ran_forward_and_backward(chosen)
    check_temporal_attention(q, k, v, grad_out, out, grads, frames, heads, layout)


def _packed_case(layout, frames, positions, heads, head_dim, dtype, seed):
    """qkv (..., 3C) as one projection makes it, and an upstream gradient of the output."""
    g = torch.Generator().manual_seed(seed)
    shape = _shape(layout, 2, frames, positions, heads, head_dim)
    return randn((*shape[:-1], 3 * shape[-1]), dtype, g), randn(shape, dtype, g)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout,frames,positions,heads,head_dim", [("frames", 16, 5, 2, 32), ("sequences", 5, 3, 1, 40)])
def test_packed_qkv_gradient_is_written_as_one_tensor(layout, frames, positions, heads, head_dim, dtype, chosen):
    """temporal_attention_packed against the reference on q, k, v = qkv's thirds; the Triton
    backward writes every element of the one (poisoned) gradient buffer."""
    qkv, grad_out = _packed_case(layout, frames, positions, heads, head_dim, dtype, 31)
    qkv.requires_grad_(True)
    with tk.backend("triton"):
        out = temporal_attention_packed(qkv, frames, heads, layout=layout)
        (grad_qkv,) = torch.autograd.grad(out, qkv, grad_out)
    assert chosen == [("temporal_attention", "triton"), ("temporal_attention_backward_packed", "triton")]
    assert grad_qkv.shape == qkv.shape and grad_qkv.is_contiguous()
    check_temporal_attention(*qkv.detach().chunk(3, dim=-1), grad_out, out, grad_qkv.chunk(3, dim=-1), frames, heads, layout)


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
def test_packed_ops_opcheck_and_match_the_three_tensor_op(backend_name):
    qkv, grad_out = _packed_case("frames", 4, 3, 2, 16, torch.float32, 32)
    with tk.backend(backend_name):
        for requires_grad in (False, True):
            torch.library.opcheck(
                torch.ops.turbo_kernels.temporal_attention_packed.default,
                (qkv.clone().requires_grad_(requires_grad), 4, 2, "frames", 0.25),
            )
        _, lse = torch.ops.turbo_kernels.temporal_attention_packed(qkv, 4, 2, "frames", 0.25)
        torch.library.opcheck(
            torch.ops.turbo_kernels.temporal_attention_backward_packed.default,
            (grad_out, qkv, lse, 4, 2, "frames", 0.25, backend_name),
        )
        packed = qkv.clone().requires_grad_(True)
        (packed_grad,) = torch.autograd.grad(temporal_attention_packed(packed, 4, 2), packed, grad_out)
        thirds = [t.clone().requires_grad_(True) for t in qkv.chunk(3, dim=-1)]
        grads = torch.autograd.grad(temporal_attention(*thirds, 4, 2), thirds, grad_out)
    torch.testing.assert_close(packed_grad, torch.cat(grads, dim=-1), rtol=0, atol=0)


def test_packed_qkv_must_hold_three_parts():
    with pytest.raises(ValueError, match="multiple of 3"):
        temporal_attention_packed(torch.randn(4, 3, 64), 2, 2)
    with pytest.raises(ValueError, match="qkv must have 3 dimensions"):
        temporal_attention_packed(torch.randn(4, 192), 2, 2)


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_saved_logsumexp_and_explicit_scale(layout, backend_name):
    """The op's second output, the logsumexp of every scaled query row, on each backend. The
    reference forward computes its own for a Triton backward to read; without its scale it passed
    every other test (the reference backward never reads it)."""
    g = torch.Generator().manual_seed(3)
    frames, heads, head_dim, scale = 6, 2, 32, 0.3
    q, k, v = (randn(_shape(layout, 2, frames, 5, heads, head_dim), torch.float32, g) for _ in range(3))
    with tk.backend(backend_name):
        out, lse = torch.ops.turbo_kernels.temporal_attention(q, k, v, frames, heads, layout, scale)
    q_s, k_s = (ref.to_sequences(x.double(), frames, heads, layout) for x in (q, k))
    want = torch.logsumexp(torch.matmul(q_s, k_s.transpose(-1, -2)) * scale, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (10, heads, frames)
    torch.testing.assert_close(lse.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        out, ref.temporal_attention(q, k, v, frames, heads, layout, scale), rtol=1e-5, atol=1e-6
    )


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_an_unwritten_output_element_fails(monkeypatch):
    """The poisoned buffers make these tests able to fail: a kernel that skips the last tile
    leaves NaN behind, which the comparison reports."""
    original = kernels._launch

    def skip_last_sequence(kernel, tensors, strided, q, num_frames, heads, layout, scale, tile):
        # The launch takes the sequence count from q: in the "sequences" layout, one row fewer.
        original(kernel, tensors, strided, q[:-1], num_frames, heads, layout, scale, tile)

    monkeypatch.setattr(kernels, "_launch", skip_last_sequence)
    g = torch.Generator().manual_seed(4)
    q, k, v = (randn((5, 4, 64), torch.float32, g) for _ in range(3))
    with tk.backend("triton"):
        out = temporal_attention(q, k, v, 4, 2, layout="sequences")
    assert torch.isnan(out[-1]).all() and not torch.isnan(out[:-1]).any()
    want = ref.temporal_attention(q, k, v, 4, 2, "sequences")
    want64 = ref.temporal_attention(q.double(), k.double(), v.double(), 4, 2, "sequences")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_2x_of_reference(out, want, want64)


def _strided_views(views, g, frames, heads, batch=2, positions=5, head_dim=32):
    """(layout, q, k, v): channel slices of one fused (.., 3*C) qkv projection output, or
    (B*N, F, C) transposes of (F, B*N, C) tensors (strided in both leading dimensions)."""
    channels = heads * head_dim
    if views == "transposed-sequences":
        base = (randn((frames, batch * positions, channels), torch.float32, g) for _ in range(3))
        return ("sequences",) + tuple(x.requires_grad_(True).transpose(0, 1) for x in base)
    layout = views.removeprefix("fused-qkv-")
    shape = _shape(layout, batch, frames, positions, heads, head_dim)
    qkv = randn(shape[:2] + (3 * channels,), torch.float32, g).requires_grad_(True)
    return (layout,) + tuple(qkv.split(channels, dim=-1))


@pytest.fixture
def launched(monkeypatch):
    """Records the tensors every kernel launch received."""
    record = []
    original = kernels._launch

    def spy(kernel, tensors, *args):
        record.append(list(tensors))
        return original(kernel, tensors, *args)

    monkeypatch.setattr(kernels, "_launch", spy)
    return record


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("views", ["fused-qkv-frames", "fused-qkv-sequences", "transposed-sequences"])
def test_strided_views_run_without_copies(views, launched, chosen):
    g = torch.Generator().manual_seed(5)
    frames, heads = 8, 2
    layout, q, k, v = _strided_views(views, g, frames, heads)
    grad_out = randn(q.shape, torch.float32, g)
    with tk.backend("triton"):
        out = temporal_attention(q, k, v, frames, heads, layout=layout)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _assert_triton_ran_forward_and_backward(chosen)
    forward, backward = launched
    # q, k, v are forward's first three kernel arguments, and backward's second to fourth.
    for got, view in zip(forward[:3] + backward[1:4], (q, k, v) * 2):
        assert (got.data_ptr(), got.stride()) == (view.data_ptr(), view.stride())
    check_temporal_attention(q, k, v, grad_out, out, grads, frames, heads, layout)


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_expanded_upstream_gradient(chosen):
    """out.sum() hands the backward an all-zero-stride grad; it is made unit-stride, not refused."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (randn((4, 3, 32), torch.float32, g).requires_grad_(True) for _ in range(3))
    with tk.backend("triton"):
        out = temporal_attention(q, k, v, 2, 1)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    _assert_triton_ran_forward_and_backward(chosen)
    check_temporal_attention(q, k, v, torch.ones_like(q), out, grads, 2, 1, "frames")


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_empty_input(layout):
    q = torch.empty(_shape(layout, 2, 4, 0, 2, 32) if layout == "frames" else (0, 4, 64), device=DEVICE)
    with tk.backend("triton"):
        out, lse = torch.ops.turbo_kernels.temporal_attention(q, q, q, 4, 2, layout, 0.5)
    assert out.shape == q.shape and lse.shape == (0, 2, 4)


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_no_positions_forward_and_backward(layout, backend_name):
    """Frames of no positions (N = 0): empty outputs and gradients, on every backend (the
    reference's backward divided its batch by N to restore the frames layout)."""
    shape = (8, 0, 64) if layout == "frames" else (0, 4, 64)
    q, k, v = (torch.zeros(shape, device=DEVICE, requires_grad=True) for _ in range(3))
    with tk.backend(backend_name):
        out = tk.temporal_attention(q, k, v, 4, 2, layout)
        probs = tk.temporal_attention_probs(q, k, 4, 2, layout)
        grads = torch.autograd.grad((out.sum(), probs.sum()), (q, k, v))
    assert out.shape == q.shape and probs.shape == (0, 2, 4, 4)
    assert [tuple(g.shape) for g in grads] == [shape] * 3


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda g: [randn((4, 3, 64), torch.float64, g) for _ in range(3)], "float64"),
        (lambda g: [randn((2, 64, 3), torch.float32, g).transpose(1, 2) for _ in range(3)], "channel stride"),
        (lambda g: [randn((4, 3, 64), dtype, g) for dtype in (torch.float32, torch.float16, torch.float32)], "mixed"),
        (lambda g: [randn((65, 1, 64), torch.float32, g) for _ in range(3)], "num_frames=65 exceeds 64"),
        (lambda g: [randn((4, 3, 130), torch.float32, g) for _ in range(3)], "head dim 130 exceeds 128"),
    ],
    ids=["float64", "channel-stride", "mixed-dtypes", "too-many-frames", "head-dim-too-large"],
)
def test_unsupported_inputs_fall_back_to_the_reference_once(make, reason, chosen):
    g = torch.Generator().manual_seed(7)
    q, k, v = make(g)
    frames = 65 if q.shape[0] == 65 else 2
    heads = 1 if q.shape[-1] == 130 else 2
    with tk.backend("triton"):
        with pytest.warns(tk.TurboKernelsFallbackWarning, match=reason):
            out = temporal_attention(q, k, v, frames, heads)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            temporal_attention(q, k, v, frames, heads)
    assert chosen == [("temporal_attention", "reference")] * 2
    torch.testing.assert_close(out, ref.temporal_attention(q, k, v, frames, heads))


@pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")
def test_a_backward_handed_a_logsumexp_the_kernels_cannot_read_runs_the_reference(chosen):
    """The backward op called directly with a float64 logsumexp (the kernels read float32): the
    reference runs, with a warning naming lse."""
    g = torch.Generator().manual_seed(9)
    q, k, v, grad_out = (randn((4, 3, 32), torch.float32, g) for _ in range(4))
    _, lse = torch.ops.turbo_kernels.temporal_attention(q, k, v, 2, 2, "frames", 0.25)
    backward = torch.ops.turbo_kernels.temporal_attention_backward
    with pytest.warns(tk.TurboKernelsFallbackWarning, match="lse must be a contiguous float32 tensor"):
        grads = backward(grad_out, q, k, v, lse.double(), 2, 2, "frames", 0.25, "triton")
    assert chosen[-1] == ("temporal_attention_backward", "reference")
    want = backward(grad_out, q, k, v, lse, 2, 2, "frames", 0.25, "reference")
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_auto_on_cpu_runs_the_reference(chosen):
    if HAS_GPU:
        pytest.skip("checks the CPU default; this machine has a GPU")
    x = torch.randn(4, 3, 32, requires_grad=True)
    temporal_attention(x, x, x, 2, 1).sum().backward()
    assert chosen == [(op, "reference") for op in OPS]


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
def test_each_backend_with_an_explicit_scale(backend_name, chosen):
    """Both backends' forward and registered backward (the reference's is explicit formulas)
    against autograd through the reference."""
    g = torch.Generator().manual_seed(8)
    q, k, v, grad_out = (randn((6, 5, 48), torch.float32, g) for _ in range(4))
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with tk.backend(backend_name):
        out = temporal_attention(*inputs, 3, 2, layout="frames", scale=0.2)
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert {name for _, name in chosen} == {backend_name}
    check_temporal_attention(q, k, v, grad_out, out, grads, 3, 2, "frames", scale=0.2)


def _qkv(*shape, dtype=torch.float32, device="cpu"):
    return [torch.randn(shape or (8, 3, 64)).to(device=device, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((*_qkv()[:2], torch.randn(8, 3, 32), 4, 2), {}, ValueError, "v has shape"),
        ((*_qkv()[:2], torch.randn(8, 3, 64, device="meta"), 4, 2), {}, ValueError, "v is on meta"),
        ((torch.zeros(8, 3, 64, dtype=torch.int32), *_qkv()[1:], 4, 2), {}, TypeError, "q must be a floating-point"),
        ((*_qkv()[:1], torch.zeros(8, 3, 64, dtype=torch.int64), _qkv()[2], 4, 2), {}, TypeError, "k must be a floating-point"),
        ((*_qkv(8, 3, 130), 4, 4), {}, ValueError, "q's last dimension 130 is not divisible by heads=4"),
        ((*_qkv(8, 3, 0), 4, 4), {}, ValueError, "q's last dimension .* must be positive"),
        ((*_qkv(), 3, 2), {}, ValueError, r"q's first dimension 8 \(B\*F in the 'frames' layout\) is not divisible by num_frames=3"),
        ((*_qkv(), 4, 2), dict(layout="sequences"), ValueError, r"q's second dimension 3 \(F in the 'sequences' layout\) is not num_frames=4"),
        ((*_qkv(), 4, 2), dict(layout="channels"), ValueError, "layout must be one of"),
        ((*_qkv(), 4, 2), dict(scale=0.0), ValueError, "scale must be a positive"),
        ((*_qkv(), 4, 2), dict(scale=float("nan")), ValueError, "scale must be a positive"),
        ((*_qkv(), 0, 2), {}, ValueError, "num_frames must be a positive int"),
        ((*_qkv(), 4, 2.0), {}, ValueError, "heads must be a positive int"),
        ((*_qkv(8, 64), 4, 2), {}, ValueError, "q must have 3 dimensions"),
        (([1.0], *_qkv()[1:], 4, 2), {}, TypeError, "q must be a torch.Tensor"),
    ],
    ids=[
        "v-shape", "v-device", "q-int", "k-int", "heads-divide", "no-channels", "frames-divide", "sequences-frames",
        "layout", "scale-zero", "scale-nan", "num-frames", "heads-float", "q-2d", "q-list",
    ],
)
def test_errors_name_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        temporal_attention(*args, **kwargs)


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_opcheck(backend_name, layout):
    g = torch.Generator().manual_seed(9)
    q, k, v, grad_out = (randn(_shape(layout, 2, 4, 3, 2, 16), torch.float32, g) for _ in range(4))
    with tk.backend(backend_name):
        for requires_grad in (False, True):
            args = tuple(x.clone().requires_grad_(requires_grad) for x in (q, k, v))
            torch.library.opcheck(torch.ops.turbo_kernels.temporal_attention.default, args + (4, 2, layout, 0.25))
        _, lse = torch.ops.turbo_kernels.temporal_attention(q, k, v, 4, 2, layout, 0.25)
        torch.library.opcheck(
            torch.ops.turbo_kernels.temporal_attention_backward.default,
            (grad_out, q, k, v, lse, 4, 2, layout, 0.25, backend_name),
        )


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
def test_torch_compile_fullgraph_matches_eager(backend_name):
    g = torch.Generator().manual_seed(10)
    frames, heads, channels = 4, 2, 64
    qkv = randn((2 * frames, 5, 3 * channels), torch.float32, g).requires_grad_(True)

    def block(qkv):
        q, k, v = qkv.split(channels, dim=-1)
        return temporal_attention(q, k, v, frames, heads).square().mean()

    with tk.backend(backend_name):
        eager = block(qkv)
        (eager_grad,) = torch.autograd.grad(eager, qkv)
        torch.compiler.reset()
        got = torch.compile(block, fullgraph=True, backend="aot_eager")(qkv)
        (got_grad,) = torch.autograd.grad(got, qkv)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, eager_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("tile", [(8, 4), (16, 4), (48, 4), (32, 3), (32, 16)], ids=str)
def test_a_tile_below_the_padded_frames_or_not_a_power_of_two_is_refused(tile):
    """F = 17 pads to 32 frames: a tile needs at least that many rows, a power of two."""
    with pytest.raises(ValueError, match=r"tile must be \(rows, num_warps\).*at least 32.*got"):
        kernels.launch_params(17, 64, False, tile)
    assert kernels.launch_params(17, 64, False, (64, 8)) == (
        dict(NUM_FRAMES=17, HEAD_DIM=64, F_PAD=32, D_PAD=64, ROWS=64), 8
    )


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_more_sequences_than_a_grid_axis_holds(layout, chosen):
    """70,000 sequences x 4 heads: the flattened (sequence block, head) grid axis passes 65,535.
    Head dim 8 (padded to 16) keeps the tensors at 36M elements: the grid is the point, and the
    CPU float64 checks of 143M (head dim 32) held this test for over 100 s on a busy GPU host."""
    g = torch.Generator().manual_seed(11)
    frames, positions, heads, head_dim = 16, 70_000, 4, 8
    shape = _shape(layout, 1, frames, positions, heads, head_dim)
    q, k, v, grad_out = (randn(shape, torch.bfloat16, g) for _ in range(4))
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with tk.backend("triton"):
        out = temporal_attention(*inputs, frames, heads, layout=layout)
        grads = torch.autograd.grad(out, inputs, grad_out)
    _assert_triton_ran_forward_and_backward(chosen)
    check_temporal_attention(q, k, v, grad_out, out, grads, frames, heads, layout)
