"""temporal_attention on the CUDA backend (csrc/temporal_attention.cu: F <= 32, head dim 64) against
the reference, forward and backward, in both layouts, every padded frame count (F in {1, 8, 16, 17,
32}), every storage dtype, strided views of one fused qkv projection, and more sequences than a grid
axis holds; plus fallbacks of what it cannot take. New CUDA buffers start as NaN
(helpers.poison_cuda_allocator), so an element a kernel never writes fails.

Tolerance: the kernel's error against float64 maths is at most twice that of the reference run in
the same storage dtype, plus one rounding of that dtype (helpers.assert_within_2x_of_reference).

Without a GPU only the registration test runs (and skips where the extension is not built).
"""

import pytest
import torch

import turbo_kernels as tk
from turbo_kernels import _cuda_ext, dispatch
from turbo_kernels.ops.attention import temporal_attention
from turbo_kernels.reference import attention as ref

from .helpers import DEVICE, check_temporal_attention, poison_cuda_allocator, randn, seeded_generator

OPS = ("temporal_attention", "temporal_attention_backward")
HEAD_DIM = 64
CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _shape(layout, batch, frames, positions, heads, head_dim=HEAD_DIM):
    channels = heads * head_dim
    return (batch * frames, positions, channels) if layout == "frames" else (batch * positions, frames, channels)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    dispatch._warned.clear()


@pytest.fixture
def cuda_calls(monkeypatch):
    """Records the arguments the CUDA implementation of each op received."""
    record = {op: [] for op in OPS}
    for op in OPS:
        original = dispatch._registry[op]["cuda"]

        def spy(*args, _op=op, _fn=original.fn):
            record[_op].append(args)
            return _fn(*args)

        monkeypatch.setitem(dispatch._registry[op], "cuda", dispatch.Implementation(spy, original.supports))
    return record


def _assert_cuda_ran_forward_and_backward(chosen):
    assert sorted(set(chosen)) == [(op, "cuda") for op in OPS], chosen


def _run(q, k, v, grad_out, frames, heads, layout, scale=None):
    """out and the grads of q, k, v through the public op on the CUDA backend, on NaN-poisoned memory."""
    inputs = [x.detach().clone().requires_grad_(True) if x.is_leaf else x for x in (q, k, v)]
    poison_cuda_allocator()
    with tk.backend("cuda"):
        out = temporal_attention(*inputs, frames, heads, layout=layout, scale=scale)
        poison_cuda_allocator()
        grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


# ---- CPU: the extension registers the ops ------------------------------------------------------


def test_schemas_are_registered_when_the_extension_is_built():
    if _cuda_ext.load_error() is not None:
        pytest.skip(_cuda_ext.load_error())
    namespace = _cuda_ext.ops()
    expected = {
        "temporal_attention_fwd": "Tensor q, Tensor k, Tensor v, int num_frames, int heads, str layout, float scale",
        "temporal_attention_bwd": (
            "Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, int num_frames, int heads, str layout, "
            "float scale"
        ),
    }
    for name, arguments in expected.items():
        op = getattr(namespace, name).default
        assert arguments in str(op._schema), str(op._schema)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), f"{name} has no CUDA kernel"
    usable = tk.backends("cuda")
    for op in OPS:
        assert "cuda" in usable[op], usable[op]


# ---- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("frames", [1, 8, 16, 17, 32])
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_matches_reference(layout, frames, dtype, chosen):
    g = seeded_generator(layout, frames, str(dtype))
    heads = 3
    shape = _shape(layout, 2, frames, 7, heads)
    q, k, v, grad_out = (randn(shape, dtype, g) for _ in range(4))
    out, grads = _run(q, k, v, grad_out, frames, heads, layout)
    _assert_cuda_ran_forward_and_backward(chosen)
    check_temporal_attention(q, k, v, grad_out, out, grads, frames, heads, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_packed_qkv_on_the_cuda_backend(dtype, chosen):
    """temporal_attention_packed's CUDA backward (the three gradients, then concatenated)."""
    from turbo_kernels.ops.attention import temporal_attention_packed

    g = seeded_generator("packed", str(dtype))
    frames, heads = 16, 2
    shape = _shape("frames", 2, frames, 7, heads)
    qkv = randn((*shape[:-1], 3 * shape[-1]), dtype, g).requires_grad_(True)
    grad_out = randn(shape, dtype, g)
    poison_cuda_allocator()
    with tk.backend("cuda"):
        out = temporal_attention_packed(qkv, frames, heads)
        (grad_qkv,) = torch.autograd.grad(out, qkv, grad_out)
    assert chosen == [("temporal_attention", "cuda"), ("temporal_attention_backward_packed", "cuda")]
    check_temporal_attention(*qkv.detach().chunk(3, dim=-1), grad_out, out, grad_qkv.chunk(3, dim=-1), frames, heads, "frames")


@pytest.mark.gpu
@pytest.mark.parametrize("frames", [5, 16, 32])
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_saved_logsumexp_and_explicit_scale(layout, frames):
    g = torch.Generator().manual_seed(3)
    heads, scale = 2, 0.3
    q, k, v = (randn(_shape(layout, 2, frames, 5, heads), torch.float32, g) for _ in range(3))
    poison_cuda_allocator()
    with tk.backend("cuda"):
        out, lse = torch.ops.turbo_kernels.temporal_attention(q, k, v, frames, heads, layout, scale)
    q_s, k_s = (ref.to_sequences(x.double(), frames, heads, layout) for x in (q, k))
    want = torch.logsumexp(torch.matmul(q_s, k_s.transpose(-1, -2)) * scale, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (10, heads, frames) and lse.is_contiguous()
    torch.testing.assert_close(lse.double(), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(
        out, ref.temporal_attention(q, k, v, frames, heads, layout, scale), rtol=1e-5, atol=1e-5
    )


def _strided_views(views, g, frames, heads, dtype, batch=2, positions=5):
    """(layout, q, k, v): channel slices of one fused (.., 3*C) qkv projection output, or
    (B*N, F, C) transposes of (F, B*N, C) tensors (strided in both leading dimensions)."""
    channels = heads * HEAD_DIM
    if views == "transposed-sequences":
        base = (randn((frames, batch * positions, channels), dtype, g) for _ in range(3))
        return ("sequences",) + tuple(x.requires_grad_(True).transpose(0, 1) for x in base)
    layout = views.removeprefix("fused-qkv-")
    shape = _shape(layout, batch, frames, positions, heads)
    qkv = randn(shape[:2] + (3 * channels,), dtype, g).requires_grad_(True)
    return (layout,) + tuple(qkv.split(channels, dim=-1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("views", ["fused-qkv-frames", "fused-qkv-sequences", "transposed-sequences"])
def test_strided_views_run_without_copies(views, dtype, cuda_calls, chosen):
    g = torch.Generator().manual_seed(5)
    frames, heads = 16, 2
    layout, q, k, v = _strided_views(views, g, frames, heads, dtype)
    grad_out = randn(q.shape, dtype, g)
    out, grads = _run(q, k, v, grad_out, frames, heads, layout)
    _assert_cuda_ran_forward_and_backward(chosen)
    (forward,), (backward,) = cuda_calls["temporal_attention"], cuda_calls["temporal_attention_backward"]
    # q, k, v are the forward's first three arguments, and the backward's second to fourth.
    for got, view in zip(forward[:3] + backward[1:4], (q, k, v) * 2):
        assert (got.data_ptr(), got.stride()) == (view.data_ptr(), view.stride())
    check_temporal_attention(q, k, v, grad_out, out, grads, frames, heads, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_more_sequences_than_a_grid_axis_holds(layout, chosen):
    """70,000 sequences: more than 65,535 on any grid axis (the kernels walk (sequence, head) groups
    on one axis)."""
    g = torch.Generator().manual_seed(11)
    frames, positions, heads = 16, 70_000, 1
    shape = _shape(layout, 1, frames, positions, heads)
    q, k, v, grad_out = (randn(shape, torch.bfloat16, g) for _ in range(4))
    out, grads = _run(q, k, v, grad_out, frames, heads, layout)
    _assert_cuda_ran_forward_and_backward(chosen)
    check_temporal_attention(q, k, v, grad_out, out, grads, frames, heads, layout)


@pytest.mark.gpu
def test_cuda_takes_an_expanded_gradient(chosen):
    """out.sum() hands the backward an all-zero-stride grad, which is made unit-stride, not refused."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (randn((8, 3, 2 * HEAD_DIM), torch.bfloat16, g).requires_grad_(True) for _ in range(3))
    poison_cuda_allocator()
    with tk.backend("cuda"):
        out = temporal_attention(q, k, v, 4, 2)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    _assert_cuda_ran_forward_and_backward(chosen)
    check_temporal_attention(q, k, v, torch.ones_like(q), out, grads, 4, 2, "frames")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ref.LAYOUTS)
def test_empty_input(layout):
    shape = _shape(layout, 2, 4, 0, 2) if layout == "frames" else (0, 4, 2 * HEAD_DIM)
    q = torch.empty(shape, device=DEVICE, dtype=torch.bfloat16)
    with tk.backend("cuda"):
        out, lse = torch.ops.turbo_kernels.temporal_attention(q, q, q, 4, 2, layout, 0.5)
        grads = torch.ops.turbo_kernels.temporal_attention_backward(q, q, q, q, lse, 4, 2, layout, 0.5, "cuda")
    assert out.shape == q.shape and lse.shape == (0, 2, 4)
    assert all(grad.shape == q.shape for grad in grads)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "make,frames,heads,reason",
    [
        (lambda g: [randn((4, 3, 64), torch.float32, g) for _ in range(3)], 2, 2, "head dim 32"),
        (lambda g: [randn((33, 2, 64), torch.float32, g) for _ in range(3)], 33, 1, "num_frames=33 exceeds 32"),
        (lambda g: [randn((4, 3, 64), torch.float64, g) for _ in range(3)], 2, 1, "float64"),
        (lambda g: [randn((4, 3, 72), torch.float16, g)[..., 1:65] for _ in range(3)], 2, 1, "16-byte"),
        (lambda g: [randn((4, 3, 68), torch.float16, g)[..., :64] for _ in range(3)], 2, 1, "multiples of 16 bytes"),
    ],
    ids=["head-dim", "too-many-frames", "float64", "misaligned-start", "stride-not-16-bytes"],
)
def test_unsupported_inputs_fall_back_to_the_reference(make, frames, heads, reason, chosen):
    g = torch.Generator().manual_seed(7)
    q, k, v = make(g)
    with tk.backend("cuda"):
        with pytest.warns(tk.TurboKernelsFallbackWarning, match=reason):
            out = temporal_attention(q, k, v, frames, heads)
    assert chosen == [("temporal_attention", "reference")]
    torch.testing.assert_close(out, ref.temporal_attention(q, k, v, frames, heads))
