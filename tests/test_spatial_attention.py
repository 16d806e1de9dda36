"""spatial_attention: the Triton kernels (interpreter on the CPU, real on a GPU) against the
reference, forward and backward, on both kernel paths (whole KV in one tile, 16-bit only; blocked
online softmax), odd query and key counts, several heads, padded head dims, key rows shared by
kv_repeat query rows, and strided views (fused qkv projections, a zero batch stride); plus
fallbacks, argument errors, opcheck and torch.compile.

Tolerance: the kernel's error against float64 maths is at most twice that of the reference run in
the same storage dtype, plus one rounding of that dtype (helpers.assert_within_2x_of_reference).
Output and scratch buffers start as NaN, so an element a kernel never writes fails.
"""

import warnings

import pytest
import torch

import turbo_kernels as tk
from turbo_kernels import dispatch
from turbo_kernels.ops.spatial import spatial_attention
from turbo_kernels.reference import attention as ref
from turbo_kernels.triton_kernels import spatial_attention as kernels

from .helpers import (
    DEVICE, HAS_GPU, KERNEL_DTYPES, assert_within_2x_of_reference, randn, record_kernel_launches, seeded_generator,
    unreported_launches,
)

TRITON_USABLE = dispatch.machine_unavailable_reason("triton", DEVICE) is None
OPS = ("spatial_attention", "spatial_attention_backward")
needs_triton = pytest.mark.skipif(not TRITON_USABLE, reason="Triton not usable here")

# (query rows B*F, queries N, keys M, heads, head dim, kv_repeat). In 16-bit storage the first
# three take the whole-KV path (77 keys pad to 128, 5 keys to 16, 37 to 64) and the last the
# blocked one (3 KV blocks, the last ragged); fp32 takes the blocked path throughout.
CASES = [
    (2, 37, 77, 1, 32, 2),
    (2, 37, 5, 2, 16, 1),
    (2, 37, 37, 3, 16, 1),
    (1, 150, 150, 1, 40, 1),
]
CASE_IDS = [f"R{r}N{n}M{m}h{h}d{d}rep{rep}" for r, n, m, h, d, rep in CASES]


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    """Every Triton output and scratch buffer starts as NaN."""
    dispatch._warned.clear()
    monkeypatch.setattr(
        kernels, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


@pytest.fixture
def launched(monkeypatch):
    """Records the pointer arguments of every kernel launch."""
    record = []
    original = kernels._launch

    def spy(kernel, num_programs, tensors, *args):
        record.append(list(tensors))
        return original(kernel, num_programs, tensors, *args)

    monkeypatch.setattr(kernels, "_launch", spy)
    return record


def _assert_triton_ran_forward_and_backward(chosen):
    assert sorted(set(chosen)) == [(op, "triton") for op in OPS], chosen


def _inputs(rows, queries, keys, heads, head_dim, kv_repeat, dtype, g):
    channels = heads * head_dim
    q, grad_out = (randn((rows, queries, channels), dtype, g) for _ in range(2))
    k, v = (randn((rows // kv_repeat, keys, channels), dtype, g) for _ in range(2))
    return q, k, v, grad_out


def _check_against_reference(q, k, v, grad_out, out, grads, heads, kv_repeat=1, scale=None):
    """out and grads (of q, k, v) against the reference in q's dtype and in float64."""

    def reference(dtype):
        inputs = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        expected = ref.spatial_attention(*inputs, heads, scale, kv_repeat)
        return expected, torch.autograd.grad(expected, inputs, grad_out.to(dtype))

    out_lp, grads_lp = reference(q.dtype)
    out64, grads64 = reference(torch.float64)
    assert_within_2x_of_reference(out, out_lp, out64, "out")
    for name, got, lp, want in zip(("d q", "d k", "d v"), grads, grads_lp, grads64):
        assert_within_2x_of_reference(got, lp, want, name)


def _run_triton(q, k, v, grad_out, heads, **kwargs):
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with tk.backend("triton"):
        out = spatial_attention(*inputs, heads, **kwargs)
        grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("rows,queries,keys,heads,head_dim,kv_repeat", CASES, ids=CASE_IDS)
def test_matches_reference(rows, queries, keys, heads, head_dim, kv_repeat, dtype, chosen):
    g = seeded_generator(rows, queries, keys, head_dim, str(dtype))
    q, k, v, grad_out = _inputs(rows, queries, keys, heads, head_dim, kv_repeat, dtype, g)
    out, grads = _run_triton(q, k, v, grad_out, heads, kv_repeat=kv_repeat)
    _assert_triton_ran_forward_and_backward(chosen)
    _check_against_reference(q, k, v, grad_out, out, grads, heads, kv_repeat)


@needs_triton
def test_whole_kv_backward_walks_the_query_blocks_of_every_repeated_row(launched, chosen):
    """One program per (kv row, head) accumulates dk, dv over all 4 query blocks that attend to
    its key row (2 rows x 2 blocks of 32 queries, the last block ragged)."""
    g = torch.Generator().manual_seed(2)
    q, k, v, grad_out = _inputs(2, 37, 77, 1, 32, 2, torch.float16, g)
    out, grads = _run_triton(q, k, v, grad_out, 1, kv_repeat=2)
    _assert_triton_ran_forward_and_backward(chosen)
    _, backward = launched
    assert backward[-2].shape == k.shape and backward[-2].dtype == torch.float32, "dk accumulates in fp32"
    _check_against_reference(q, k, v, grad_out, out, grads, 1, kv_repeat=2)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_kernel_report_compiles_what_the_unet_launches(monkeypatch, dtype):
    """Self-attention (kv_repeat = 1, compiled as a constant) and cross-attention to 77 context
    tokens shared by a video's frames, forward and backward at head dim 64: every launch matches
    a REPORT_CONFIGS entry, signature, constexprs and warps."""
    launches = record_kernel_launches(monkeypatch, kernels)
    g = torch.Generator().manual_seed(31)
    for queries, keys, kv_repeat in ((150, 150, 1), (150, 77, 2)):
        q, k, v, grad_out = _inputs(2, queries, keys, 2, 64, kv_repeat, dtype, g)
        _run_triton(q, k, v, grad_out, 2, kv_repeat=kv_repeat)
    assert len(launches) >= 4
    assert unreported_launches(launches, kernels.REPORT_CONFIGS) == []


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
def test_saved_logsumexp_and_explicit_scale(backend_name):
    """The op's second output, the logsumexp of every scaled query row, on each backend. The
    reference forward computes its own for a Triton backward to read; without its scale it passed
    every other test (the reference backward never reads it)."""
    g = torch.Generator().manual_seed(3)
    heads, scale, kv_repeat = 2, 0.3, 2
    q, k, v, _ = _inputs(4, 7, 9, heads, 16, kv_repeat, torch.float32, g)
    with tk.backend(backend_name):
        out, lse = torch.ops.turbo_kernels.spatial_attention(q, k, v, heads, scale, kv_repeat)
    q_h = ref.split_heads(q.double(), heads)
    k_h = ref.split_heads(k.double(), heads).repeat_interleave(kv_repeat, dim=0)
    want = torch.logsumexp(torch.matmul(q_h, k_h.transpose(-1, -2)) * scale, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (4, heads, 7)
    torch.testing.assert_close(lse.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref.spatial_attention(q, k, v, heads, scale, kv_repeat), rtol=1e-5, atol=1e-6)


@needs_triton
def test_an_unwritten_output_element_fails(monkeypatch):
    """The poisoned buffers make these tests able to fail: a launch one program short leaves the
    last (row, head) tile NaN, which the comparison reports."""
    original = kernels._launch
    monkeypatch.setattr(
        kernels, "_launch", lambda kernel, num_programs, *args: original(kernel, num_programs - 1, *args)
    )
    g = torch.Generator().manual_seed(4)
    q, k, v, _ = _inputs(2, 5, 3, 1, 16, 1, torch.float32, g)
    with tk.backend("triton"):
        out = spatial_attention(q, k, v, 1)
    assert torch.isnan(out[-1]).all() and not torch.isnan(out[:-1]).any()
    want64 = ref.spatial_attention(q.double(), k.double(), v.double(), 1)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_2x_of_reference(out, ref.spatial_attention(q, k, v, 1), want64)


def _strided_views(views, dtype, g, rows=2, queries=21, heads=2, head_dim=16):
    """(q, k, v, kv_repeat) as views of bigger tensors, without copies."""
    channels = heads * head_dim
    if views == "fused-qkv-self":
        qkv = randn((rows, queries, 3 * channels), dtype, g).requires_grad_(True)
        return (*qkv.split(channels, dim=-1), 1)
    # Cross-attention to 77 tokens of one text context a video: q a channel slice, k and v slices
    # of one fused kv projection of the context, shared by kv_repeat = 2 frames or expanded over
    # all rows with a zero batch stride.
    q = randn((rows, queries, 2 * channels), dtype, g).requires_grad_(True)[..., channels:]
    if views == "fused-kv-cross-repeat":
        kv = randn((rows // 2, 77, 2 * channels), dtype, g).requires_grad_(True)
        return (q, *kv.split(channels, dim=-1), 2)
    kv = randn((1, 77, 2 * channels), dtype, g).requires_grad_(True)
    return (q, *(x.expand(rows, -1, -1) for x in kv.split(channels, dim=-1)), 1)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("views", ["fused-qkv-self", "fused-kv-cross-repeat", "expanded-kv-cross"])
def test_strided_views_run_without_copies(views, dtype, launched, chosen):
    g = torch.Generator().manual_seed(5)
    q, k, v, kv_repeat = _strided_views(views, dtype, g)
    grad_out = randn(q.shape, dtype, g)
    with tk.backend("triton"):
        out = spatial_attention(q, k, v, 2, kv_repeat=kv_repeat)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _assert_triton_ran_forward_and_backward(chosen)
    forward, *backward = launched
    # q, k, v are the forward's first three pointer arguments, and every backward launch's second
    # to fourth.
    for got, view in zip(forward[:3] + [x for launch in backward for x in launch[1:4]], (q, k, v) * 3):
        assert (got.data_ptr(), got.stride()) == (view.data_ptr(), view.stride())
    _check_against_reference(q, k, v, grad_out, out, grads, 2, kv_repeat)


@needs_triton
def test_expanded_upstream_gradient(chosen):
    """out.sum() hands the backward an all-zero-stride grad; it is made unit-stride, not refused."""
    g = torch.Generator().manual_seed(6)
    q, k, v, _ = _inputs(2, 5, 3, 1, 16, 1, torch.float32, g)
    inputs = [x.requires_grad_(True) for x in (q, k, v)]
    with tk.backend("triton"):
        out = spatial_attention(*inputs, 1)
        grads = torch.autograd.grad(out.sum(), inputs)
    _assert_triton_ran_forward_and_backward(chosen)
    _check_against_reference(q, k, v, torch.ones_like(q), out, grads, 1)


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_no_queries_gives_zero_key_gradients(dtype, chosen):
    q = torch.empty(2, 0, 32, dtype=dtype, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, 3, 32, device=DEVICE).to(dtype).requires_grad_(True) for _ in range(2))
    with tk.backend("triton"):
        out, lse = torch.ops.turbo_kernels.spatial_attention(q, k, v, 2, 0.25, 2)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    assert grads[0].shape == q.shape
    assert all(torch.equal(grad, torch.zeros_like(x)) for grad, x in zip(grads[1:], (k, v)))
    _assert_triton_ran_forward_and_backward(chosen)


@needs_triton
@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda g: [randn((2, 3, 32), torch.float64, g) for _ in range(3)], "float64"),
        (lambda g: [randn((2, 32, 3), torch.float32, g).transpose(1, 2) for _ in range(3)], "channel stride"),
        (lambda g: [randn((2, 3, 32), dtype, g) for dtype in (torch.float32, torch.float16, torch.float16)], "mixed"),
        (lambda g: [randn((2, 3, 160), torch.float32, g) for _ in range(3)], "head dim 80 exceeds 64"),
    ],
    ids=["float64", "channel-stride", "mixed-dtypes", "head-dim-too-large"],
)
def test_unsupported_inputs_fall_back_to_the_reference_once(make, reason, chosen):
    g = torch.Generator().manual_seed(7)
    q, k, v = make(g)
    with tk.backend("triton"):
        with pytest.warns(tk.TurboKernelsFallbackWarning, match=reason):
            out = spatial_attention(q, k, v, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            spatial_attention(q, k, v, 2)
    assert chosen == [("spatial_attention", "reference")] * 2
    torch.testing.assert_close(out, ref.spatial_attention(q, k, v, 2))


@needs_triton
def test_a_backward_handed_a_logsumexp_the_kernels_cannot_read_runs_the_reference(chosen):
    """The backward op called directly with a float64 logsumexp (the kernels read float32): the
    reference runs, with a warning naming lse."""
    g = torch.Generator().manual_seed(9)
    q, grad_out = (randn((4, 3, 32), torch.float32, g) for _ in range(2))
    k, v = (randn((2, 5, 32), torch.float32, g) for _ in range(2))
    out, lse = torch.ops.turbo_kernels.spatial_attention(q, k, v, 2, 0.25, 2)
    backward = torch.ops.turbo_kernels.spatial_attention_backward
    with pytest.warns(tk.TurboKernelsFallbackWarning, match="lse must be a contiguous float32 tensor"):
        grads = backward(grad_out, q, k, v, out, lse.double(), 2, 0.25, 2, "triton")
    assert chosen[-1] == ("spatial_attention_backward", "reference")
    want = backward(grad_out, q, k, v, out, lse, 2, 0.25, 2, "reference")
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_auto_on_cpu_runs_the_reference(chosen):
    if HAS_GPU:
        pytest.skip("checks the CPU default; this machine has a GPU")
    q = torch.randn(4, 3, 32, requires_grad=True)
    kv = torch.randn(2, 5, 32, requires_grad=True)
    spatial_attention(q, kv, kv, 2, kv_repeat=2).sum().backward()
    assert chosen == [(op, "reference") for op in OPS]


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
def test_each_backend_with_an_explicit_scale(backend_name, chosen):
    """Both backends' forward and registered backward (the reference's is explicit formulas)
    against autograd through the reference."""
    g = torch.Generator().manual_seed(8)
    q, k, v, grad_out = _inputs(4, 6, 5, 2, 16, 2, torch.float32, g)
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with tk.backend(backend_name):
        out = spatial_attention(*inputs, 2, scale=0.2, kv_repeat=2)
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert {name for _, name in chosen} == {backend_name}
    _check_against_reference(q, k, v, grad_out, out, grads, 2, kv_repeat=2, scale=0.2)


def _qkv(q_shape=(4, 3, 64), kv_shape=(4, 5, 64)):
    return torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((*_qkv()[:2], torch.randn(4, 5, 32), 2), {}, ValueError, "v has shape"),
        ((*_qkv()[:2], torch.randn(4, 5, 64, device="meta"), 2), {}, ValueError, "v is on meta"),
        ((_qkv()[0], *(torch.randn(4, 5, 64, device="meta") for _ in range(2)), 2), {}, ValueError, "k is on meta"),
        ((torch.zeros(4, 3, 64, dtype=torch.int32), *_qkv()[1:], 2), {}, TypeError, "q must be a floating-point"),
        ((_qkv()[0], torch.zeros(4, 5, 64, dtype=torch.int64), _qkv()[2], 2), {}, TypeError, "k must be a floating"),
        ((*_qkv(), 3), {}, ValueError, "q's last dimension 64 is not divisible by heads=3"),
        ((*_qkv((4, 3, 0), (4, 5, 0)), 2), {}, ValueError, r"q's last dimension \(heads\*d\) must be positive"),
        ((*_qkv(kv_shape=(4, 5, 32)), 2), {}, ValueError, "k's last dimension 32 is not q's last dimension 64"),
        ((*_qkv(), 2), dict(kv_repeat=2), ValueError, r"q's first dimension 4 \(B\*F\) is not k's first dimension 4 "),
        ((*_qkv(kv_shape=(4, 0, 64)), 2), {}, ValueError, r"k's second dimension \(M, the keys\) must be positive"),
        ((*_qkv(), 2), dict(kv_repeat=0), ValueError, "kv_repeat must be a positive int"),
        ((*_qkv(), 2), dict(scale=0.0), ValueError, "scale must be a positive"),
        ((*_qkv(), 2), dict(scale=float("inf")), ValueError, "scale must be a positive"),
        ((*_qkv(), 2.0), {}, ValueError, "heads must be a positive int"),
        ((*_qkv((4, 64)), 2), {}, ValueError, "q must have 3 dimensions"),
        ((*_qkv(kv_shape=(5, 64)), 2), {}, ValueError, "k must have 3 dimensions"),
        (([1.0], *_qkv()[1:], 2), {}, TypeError, "q must be a torch.Tensor"),
    ],
    ids=[
        "v-shape", "v-device", "k-device", "q-int", "k-int", "heads-divide", "no-channels", "kv-channels",
        "kv-repeat-rows", "no-keys", "kv-repeat-zero", "scale-zero", "scale-inf", "heads-float", "q-2d", "k-2d",
        "q-list",
    ],
)
def test_errors_name_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        spatial_attention(*args, **kwargs)


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
def test_opcheck(backend_name):
    g = torch.Generator().manual_seed(9)
    q, k, v, grad_out = _inputs(2, 3, 4, 1, 16, 2, torch.float32, g)
    with tk.backend(backend_name):
        for requires_grad in (False, True):
            args = tuple(x.clone().requires_grad_(requires_grad) for x in (q, k, v))
            torch.library.opcheck(torch.ops.turbo_kernels.spatial_attention.default, args + (1, 0.25, 2))
        out, lse = torch.ops.turbo_kernels.spatial_attention(q, k, v, 1, 0.25, 2)
        torch.library.opcheck(
            torch.ops.turbo_kernels.spatial_attention_backward.default,
            (grad_out, q, k, v, out, lse, 1, 0.25, 2, backend_name),
        )


@pytest.mark.parametrize("backend_name", ["reference"] + (["triton"] if TRITON_USABLE else []))
def test_torch_compile_fullgraph_matches_eager(backend_name):
    """A transformer block's two attentions: self-attention on a fused qkv projection, then
    cross-attention to a context shared by the frames of each video."""
    g = torch.Generator().manual_seed(10)
    frames, heads, channels = 2, 1, 16
    qkv = randn((2 * frames, 5, 3 * channels), torch.float32, g).requires_grad_(True)
    context = randn((2, 7, 2 * channels), torch.float32, g).requires_grad_(True)

    def block(qkv, context):
        q, k, v = qkv.split(channels, dim=-1)
        x = spatial_attention(q, k, v, heads)
        k, v = context.split(channels, dim=-1)
        return spatial_attention(x, k, v, heads, kv_repeat=frames).square().mean()

    with tk.backend(backend_name):
        eager = block(qkv, context)
        eager_grads = torch.autograd.grad(eager, (qkv, context))
        torch.compiler.reset()
        got = torch.compile(block, fullgraph=True, backend="aot_eager")(qkv, context)
        got_grads = torch.autograd.grad(got, (qkv, context))
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)
    for got_grad, eager_grad in zip(got_grads, eager_grads):
        torch.testing.assert_close(got_grad, eager_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "queries,keys,heads,kv_repeat",
    [(2560, 2560, 5, 1), (2560, 77, 5, 16), (640, 640, 10, 1), (160, 77, 20, 16), (40, 40, 20, 1)],
    ids=["self-2560", "cross-2560", "self-640", "cross-160", "self-40"],
)
def test_videocrafter2_shapes_in_16_bit(queries, keys, heads, kv_repeat, dtype, chosen):
    """One video of 16 frames at the UNet's attention levels, in the training dtype and fp16. On an
    H100 (Triton 3.6) the cross cases caught a wrong dk that no interpreter-sized case showed."""
    g = torch.Generator().manual_seed(11)
    q, k, v, grad_out = _inputs(16, queries, keys, heads, 64, kv_repeat, dtype, g)
    out, grads = _run_triton(q, k, v, grad_out, heads, kv_repeat=kv_repeat)
    _assert_triton_ran_forward_and_backward(chosen)
    _check_against_reference(q, k, v, grad_out, out, grads, heads, kv_repeat)
