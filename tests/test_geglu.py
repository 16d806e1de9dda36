"""turbo_kernels.geglu (the feed-forward's value * gelu(gate)): the reference against float64 maths
written here from the definition (GELU(x) = x Phi(x), Phi the normal CDF through math.erf), its
backward by gradcheck, the Triton kernels (interpreter on the CPU) against the reference on odd
shapes, views and dtypes with NaN-poisoned outputs, the fallback for layouts the kernels refuse,
bad input, opcheck and torch.compile.

Tolerance: the kernel's error against float64 is at most twice that of the reference in the same
storage dtype plus one rounding of it (helpers.assert_within_2x_of_reference).
"""

import math

import pytest
import torch

import turbo_kernels as tk
from turbo_kernels import dispatch
from turbo_kernels.reference import temporal_block as ref
from turbo_kernels.triton_kernels import geglu as triton_geglu

from .helpers import DEVICE, KERNEL_DTYPES, assert_within_2x_of_reference, poison_cuda_allocator, seeded_generator


def _by_definition(h: torch.Tensor) -> torch.Tensor:
    """value * gate * Phi(gate), element by element with math.erf, in float64."""
    hidden = h.shape[-1] // 2
    flat = h.double().reshape(-1, 2 * hidden).tolist()
    rows = [[v * g * 0.5 * (1 + math.erf(g / math.sqrt(2))) for v, g in zip(row[:hidden], row[hidden:])] for row in flat]
    return torch.tensor(rows, dtype=torch.float64).reshape(*h.shape[:-1], hidden)


def test_reference_matches_the_definition_in_float64():
    h = torch.randn(3, 4, 10, generator=seeded_generator("definition"), dtype=torch.float64) * 4
    torch.testing.assert_close(ref.geglu(h), _by_definition(h), rtol=1e-12, atol=1e-12)


def test_reference_backward_passes_gradcheck():
    h = torch.randn(2, 3, 8, generator=seeded_generator("gradcheck"), dtype=torch.float64) * 3
    with tk.backend("reference"):
        assert torch.autograd.gradcheck(tk.geglu, (h.requires_grad_(),))


@pytest.fixture
def poisoned(monkeypatch):
    dispatch._warned.clear()
    monkeypatch.setattr(
        triton_geglu, "new_output", lambda shape, like: torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    )
    poison_cuda_allocator()


def _views(case: str, dtype, generator):
    """h for each layout the kernels take: contiguous 3-D, hidden over one column block (300 > 256),
    2-D rows with a larger stride (a column slice of a wider projection), a 3-D slice along the last
    dimension, a single row, and empty."""
    def randn(*shape):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * 3).to(DEVICE, dtype)

    if case == "contiguous":
        return randn(3, 17, 2 * 37)
    if case == "wide":
        return randn(9, 2 * 300)
    if case == "row-strided":
        return randn(29, 3 * 24)[:, 24:]
    if case == "sliced-3d":
        return randn(2, 5, 3 * 160)[:, :, 160:]
    if case == "one-row":
        return randn(1, 2 * 5)
    return randn(0, 4, 2 * 8)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["contiguous", "wide", "row-strided", "sliced-3d", "one-row", "empty"])
def test_triton_matches_reference_forward_and_backward(poisoned, chosen, dtype, case):
    if dispatch.machine_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip("Triton cannot run here (no GPU, no interpreter)")
    generator = seeded_generator("triton", str(dtype), case)
    h = _views(case, dtype, generator).requires_grad_()
    grad = (torch.randn(*h.shape[:-1], h.shape[-1] // 2, generator=generator, dtype=torch.float64)).to(DEVICE, dtype)
    with tk.backend("triton"):
        out = tk.geglu(h)
    # Outside the block: the backward runs on the backend its forward was given.
    (grad_h,) = torch.autograd.grad(out, h, grad) if h.numel() else (torch.zeros_like(h),)
    if h.numel():
        assert {backend for _, backend in chosen} == {"triton"}
    with tk.backend("reference"):
        ref_out = tk.geglu(h)
        ref_grad = torch.autograd.grad(ref_out, h, grad)[0] if h.numel() else torch.zeros_like(h)
    h64 = h.detach().double().requires_grad_()
    out64 = ref.geglu(h64)
    grad64 = ref.geglu_backward(grad.double(), h64.detach())
    assert_within_2x_of_reference(out, ref_out, out64, "out")
    assert_within_2x_of_reference(grad_h, ref_grad, grad64, "grad_h")


@pytest.mark.parametrize("layout, reason", [
    ("channel-strided", "channel stride"),  # every other element of a wider tensor
    ("permuted", "do not flatten"),  # leading dimensions swapped
])
def test_layouts_the_kernels_refuse_fall_back_with_one_warning(chosen, layout, reason):
    if dispatch.machine_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip("Triton cannot run here (no GPU, no interpreter)")
    dispatch._warned.clear()
    if layout == "channel-strided":
        h = torch.randn(4, 2 * 6 * 2, device=DEVICE)[:, ::2]
    else:
        h = torch.randn(4, 3, 12, device=DEVICE).transpose(0, 1)
    h.requires_grad_()
    grad = torch.randn(*h.shape[:-1], h.shape[-1] // 2, device=DEVICE)
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match=reason):
        out = tk.geglu(h)
        (grad_h,) = torch.autograd.grad(out, h, grad)
    assert [backend for _, backend in chosen] == ["reference", "reference"]
    assert [op for op, _ in chosen] == ["geglu", "geglu_backward"]
    torch.testing.assert_close(out, ref.geglu(h.detach()))
    torch.testing.assert_close(grad_h, ref.geglu_backward(grad, h.detach()))


def test_a_backward_handed_a_gradient_of_another_dtype_runs_the_reference(chosen):
    """The backward op called directly with a float16 gradient of float32 h (autograd hands in the
    output's dtype; the kernels read one storage dtype): the reference runs, with a warning."""
    if dispatch.machine_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip("Triton cannot run here (no GPU, no interpreter)")
    dispatch._warned.clear()
    h = torch.randn(4, 12, device=DEVICE)
    grad = torch.randn(4, 6, device=DEVICE).half()
    with pytest.warns(tk.TurboKernelsFallbackWarning, match="mixed storage dtypes"):
        grad_h = torch.ops.turbo_kernels.geglu_backward(grad, h, "triton")
    assert chosen == [("geglu_backward", "reference")]
    torch.testing.assert_close(grad_h, ref.geglu_backward(grad, h), rtol=0, atol=0)


def test_bad_input_is_rejected_naming_h():
    with pytest.raises(ValueError, match="h's last dimension must be even"):
        tk.geglu(torch.randn(2, 5))
    with pytest.raises(TypeError, match="h must be a floating-point tensor"):
        tk.geglu(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck(requires_grad, layout):
    h = torch.randn(3, 2, 12, device=DEVICE)
    if layout == "permuted":  # the reference runs it and must return the fake's contiguous layout
        h = h.transpose(0, 1)
    torch.library.opcheck(torch.ops.turbo_kernels.geglu.default, (h.requires_grad_(requires_grad),))


def test_torch_compile_fullgraph_matches_eager():
    h = torch.randn(4, 3, 16, device=DEVICE, requires_grad=True)
    grad = torch.randn(4, 3, 8, device=DEVICE)
    eager = torch.autograd.grad(tk.geglu(h), h, grad)[0]
    torch.compiler.reset()
    compiled = torch.autograd.grad(torch.compile(tk.geglu, fullgraph=True, backend="aot_eager")(h), h, grad)[0]
    torch.compiler.reset()
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("case", ["transposed", "expanded"])
def test_an_output_gradient_in_another_layout(poisoned, chosen, case):
    """The backward kernel reads the output's gradient as contiguous rows: one arriving in another
    layout (a transposed view, as a downstream permute hands it back, or the stride-0 expansion
    of out.sum()'s) is made contiguous first: h's gradient within the 2x rule."""
    if dispatch.machine_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip("Triton cannot run here (no GPU, no interpreter)")
    generator = seeded_generator("gradient layout", case)
    h = _views("contiguous", torch.float32, generator)[0].requires_grad_()  # (17, 2 x 37)
    if case == "transposed":
        grad = torch.randn(37, 17, generator=generator, dtype=torch.float64).to(DEVICE, torch.float32).t()
    else:
        grad = torch.full((1, 1), 0.5, device=DEVICE).expand(17, 37)
    with tk.backend("triton"):
        (grad_h,) = torch.autograd.grad(tk.geglu(h), h, grad)
    assert chosen == [("geglu", "triton"), ("geglu_backward", "triton")]
    want = ref.geglu_backward(grad.contiguous(), h.detach())
    assert_within_2x_of_reference(grad_h, want, ref.geglu_backward(grad.double(), h.detach().double()), "grad_h")
