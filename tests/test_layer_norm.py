"""turbo_kernels.layer_norm (the temporal transformer's norm1/norm2/norm3): the reference against
float64 maths written here from the definition, its backward against autograd of that definition
and by gradcheck, the Triton kernels (interpreter on the CPU) against the reference on odd widths,
views and dtypes with NaN-poisoned outputs (the backward's per-program partial sums over several
row blocks included), the fallback for layouts and widths the kernels refuse, bad input, opcheck and
torch.compile.

Tolerance: the kernel's error against float64 is at most twice that of the reference in the same
storage dtype plus one rounding of it (helpers.assert_within_2x_of_reference).
"""

import math

import pytest
import torch

import turbo_kernels as tk
from turbo_kernels import dispatch
from turbo_kernels.reference import temporal_block as ref
from turbo_kernels.triton_kernels import layer_norm as triton_layer_norm

from .helpers import (
    DEVICE, KERNEL_DTYPES, STORAGE_EPS, assert_within_2x_of_reference, poison_cuda_allocator, seeded_generator,
)

EPS = 1e-5


def _by_definition(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias per row, the biased variance, with Python floats."""
    rows = []
    for row in x.double().reshape(-1, x.shape[-1]).tolist():
        mean = sum(row) / len(row)
        variance = sum((v - mean) ** 2 for v in row) / len(row)
        rows.append([(v - mean) / math.sqrt(variance + eps) * w + b for v, w, b in zip(row, weight.tolist(), bias.tolist())])
    return torch.tensor(rows, dtype=torch.float64).reshape(x.shape)


def _parameters(channels: int, dtype, generator):
    weight = 1 + 0.5 * torch.randn(channels, generator=generator, dtype=torch.float64)
    bias = 0.5 * torch.randn(channels, generator=generator, dtype=torch.float64)
    return weight.to(DEVICE, dtype), bias.to(DEVICE, dtype)


def test_reference_matches_the_definition_in_float64():
    g = seeded_generator("definition")
    x = torch.randn(3, 4, 10, generator=g, dtype=torch.float64) * 3 + 2
    weight, bias = (t.cpu() for t in _parameters(10, torch.float64, g))
    torch.testing.assert_close(ref.layer_norm(x, weight, bias, EPS), _by_definition(x, weight, bias, EPS), rtol=1e-12, atol=1e-12)


def test_reference_backward_matches_autograd_of_the_definition():
    g = seeded_generator("backward")
    x = (torch.randn(2, 5, 12, generator=g, dtype=torch.float64) * 2).requires_grad_()
    weight, bias = (t.cpu().requires_grad_() for t in _parameters(12, torch.float64, g))
    grad = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    mean = x.mean(dim=-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    definition = (x - mean) / torch.sqrt(variance + EPS) * weight + bias
    want = torch.autograd.grad(definition, (x, weight, bias), grad)
    got = ref.layer_norm_backward(grad, x.detach(), weight.detach(), EPS)
    for name, a, b in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("shape", [(3, 2, 6), (6,)], ids=["3-d", "1-d"])
def test_public_op_passes_gradcheck(shape):
    g = seeded_generator("gradcheck", shape)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    weight, bias = (t.cpu() for t in _parameters(6, torch.float64, g))
    with tk.backend("reference"):
        assert torch.autograd.gradcheck(
            lambda *a: tk.layer_norm(*a, eps=EPS), (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
        )


@pytest.mark.parametrize("shape", [(3, 0), (0, 4), (0,)], ids=["no-channels", "no-rows", "1-d-empty"])
def test_reference_takes_empty_shapes(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight, bias = (torch.randn(shape[-1], dtype=torch.float64, requires_grad=True) for _ in range(2))
    with tk.backend("reference"):
        out = tk.layer_norm(x, weight, bias, EPS)
        grads = torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out), allow_unused=True)
    assert out.shape == x.shape
    assert [tuple(g.shape) for g in grads] == [tuple(x.shape), (shape[-1],), (shape[-1],)]


@pytest.fixture
def poisoned(monkeypatch):
    dispatch._warned.clear()
    monkeypatch.setattr(
        triton_layer_norm, "new_output",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )
    poison_cuda_allocator()


def _views(case: str, dtype, generator):
    """x for each layout the kernels take: contiguous 3-D with a width not a power of two, one
    wider than a tile's 4096 elements, 2-D rows with a larger stride (a column slice of a wider
    projection), a 3-D slice along the last dimension, a single row, a 1-D x, many rows (the
    backward's programs then walk several row blocks), rows of a large mean and a small spread,
    constant rows, one channel of a stride the kernels never use, and empty."""
    def randn(*shape):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * 2 + 1).to(DEVICE, dtype)

    if case == "contiguous":
        return randn(3, 17, 40)
    if case == "wide":
        return randn(3, 5000)
    if case == "row-strided":
        return randn(29, 3 * 24)[:, 24:48]
    if case == "sliced-3d":
        return randn(2, 5, 3 * 20)[:, :, 20:40]
    if case == "one-row":
        return randn(1, 7)
    if case == "one-dim":
        return randn(9)
    if case == "many-rows":  # 8 blocks of 128 rows at 24 (32 padded) channels
        return randn(1000, 24)
    # Rows whose spread is small against their mean, or nil: an fp32 mean off by an ulp, times
    # rstd, would be the whole error (a constant row normalised to 0.05 instead of 0 at eps 1e-12).
    if case == "large-mean":
        return (1000 + 0.01 * torch.randn(6, 40, generator=generator, dtype=torch.float64)).to(DEVICE, dtype)
    if case == "constant-rows":
        return randn(6, 1).repeat(1, 40)
    if case == "one-channel-strided":  # (9, 1) transposed from (1, 9): the channel's stride (9) is unused
        return randn(1, 9).t()
    return randn(0, 4, 8)


def _largest_grad_x_terms(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> float:
    """A bound, in float64, on the terms d x = rstd (g - mean(g) - x̂ mean(g x̂)) is summed from, g
    being grad * weight. With one channel they cancel to a d x of exactly 0 (each row's g is its own
    mean and x̂ is 0) while rstd is 1/sqrt(eps): a float32 kernel's d x is then the rounding residue
    of g times rstd (on a GPU the compiler contracts the product g into g - mean(g), one FMA that
    subtracts the rounded g from the exact one), which only a bound on these terms can budget."""
    centred = x - x.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    normalised = centred * rstd
    g = grad * weight
    projection = normalised * (g * normalised).mean(dim=-1, keepdim=True)
    terms = rstd * (g.abs() + g.mean(dim=-1, keepdim=True).abs() + projection.abs())
    return terms.max().item() if terms.numel() else 0.0


CASES = [
    "contiguous", "wide", "row-strided", "sliced-3d", "one-row", "one-dim", "many-rows", "large-mean", "constant-rows",
    "one-channel-strided", "empty",
]


@pytest.mark.parametrize(
    "dtype, parameter_dtype",
    [(dtype, dtype) for dtype in KERNEL_DTYPES]
    + [(dtype, torch.float32) for dtype in KERNEL_DTYPES[1:]]
    + [(torch.float32, torch.float16)],
    ids=lambda d: str(d).removeprefix("torch."),
)
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_forward_and_backward(poisoned, chosen, monkeypatch, dtype, parameter_dtype, case):
    """Parameters in x's dtype, float32 with 16-bit x (autocast's master weights), or 16-bit with
    float32 x."""
    if dispatch.machine_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip("Triton cannot run here (no GPU, no interpreter)")
    # Two programs: with many rows each walks four row blocks (the last ragged) into its partial row.
    monkeypatch.setattr(triton_layer_norm, "MAX_PROGRAMS", 2)
    generator = seeded_generator("triton", str(dtype), case)
    x = _views(case, dtype, generator).requires_grad_()
    weight, bias = (t.requires_grad_() for t in _parameters(x.shape[-1], parameter_dtype, generator))
    grad = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)
    inputs = (x, weight, bias)
    with tk.backend("triton"):
        out = tk.layer_norm(x, weight, bias, EPS)
    # Outside the block: the backward runs on the backend its forward was given.
    grads = torch.autograd.grad(out, inputs, grad)
    assert {backend for _, backend in chosen} == {"triton"}
    assert [op for op, _ in chosen] == ["layer_norm", "layer_norm_backward"]
    with tk.backend("reference"):
        ref_out = tk.layer_norm(x, weight, bias, EPS)
        ref_grads = torch.autograd.grad(ref_out, inputs, grad)
    x64, weight64, bias64 = (t.detach().double() for t in inputs)
    out64 = ref.layer_norm(x64, weight64, bias64, EPS)
    grads64 = ref.layer_norm_backward(grad.double(), x64, weight64, EPS)
    # The terms cancel in the kernels' float32 maths whatever the storage, so what they may leave is
    # float32's rounding of them; the budget scales it by the storage's epsilon, hence the ratio (a
    # 16-bit one-channel d x, exactly 0, would otherwise be allowed 500 x float16's epsilon).
    magnitudes = {
        "x": _largest_grad_x_terms(grad.double(), x64, weight64, EPS) * STORAGE_EPS[torch.float32] / STORAGE_EPS[dtype]
    }
    assert out.is_contiguous() and out.dtype == dtype
    assert_within_2x_of_reference(out, ref_out, out64, "out")
    for name, got, want, want64 in zip(("x", "weight", "bias"), grads, ref_grads, grads64):
        assert got.dtype == (dtype if name == "x" else parameter_dtype), name
        # Empty x has zero parameter gradients and constant rows a zero weight gradient (the
        # kernel's is zero; torch's is not, its normalised rows being rounding residue).
        assert_within_2x_of_reference(got, want, want64, f"grad {name}", magnitudes.get(name))


@pytest.mark.parametrize("layout, reason", [
    ("channel-strided", "channel stride"),  # every other element of a wider tensor
    ("permuted", "do not flatten"),  # leading dimensions swapped
    ("too-wide", "channels"),  # wider than MAX_CHANNELS (lowered here)
    ("double-parameters", "parameters in torch.float64"),
    ("strided-parameters", "parameters must be contiguous"),  # weight: every other element of a wider tensor
])
def test_inputs_the_kernels_refuse_fall_back_with_one_warning(chosen, monkeypatch, layout, reason):
    if dispatch.machine_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip("Triton cannot run here (no GPU, no interpreter)")
    dispatch._warned.clear()
    monkeypatch.setattr(triton_layer_norm, "MAX_CHANNELS", 16)
    if layout == "channel-strided":
        x = torch.randn(4, 12 * 2, device=DEVICE)[:, ::2]
    elif layout == "permuted":
        x = torch.randn(4, 3, 12, device=DEVICE).transpose(0, 1)
    elif layout in ("double-parameters", "strided-parameters"):
        x = torch.randn(4, 12, device=DEVICE)
    else:
        x = torch.randn(4, 20, device=DEVICE)
    x.requires_grad_()
    parameter_dtype = torch.float64 if layout == "double-parameters" else torch.float32
    weight, bias = (torch.randn(x.shape[-1], device=DEVICE, dtype=parameter_dtype) for _ in range(2))
    if layout == "strided-parameters":
        weight = torch.randn(2 * x.shape[-1], device=DEVICE)[::2]
    grad = torch.randn(x.shape, device=DEVICE)
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match=reason):
        out = tk.layer_norm(x, weight, bias, EPS)
        (grad_x,) = torch.autograd.grad(out, x, grad)
    assert chosen == [("layer_norm", "reference"), ("layer_norm_backward", "reference")]
    torch.testing.assert_close(out, ref.layer_norm(x.detach(), weight, bias, EPS))
    torch.testing.assert_close(grad_x, ref.layer_norm_backward(grad, x.detach(), weight, EPS)[0])


@pytest.mark.parametrize("case", ["transposed", "expanded"])
def test_an_output_gradient_in_another_layout(poisoned, chosen, case):
    """The backward kernel reads the output's gradient as contiguous rows: one arriving in another
    layout (a transposed view, as a downstream permute hands it back, or the stride-0 expansion
    of out.sum()'s) is made contiguous first: d x, d weight and d bias within the 2x rule."""
    if dispatch.machine_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip("Triton cannot run here (no GPU, no interpreter)")
    generator = seeded_generator("gradient layout", case)
    x = _views("contiguous", torch.float32, generator)[0].requires_grad_()  # (17, 40)
    weight, bias = (t.requires_grad_() for t in _parameters(40, torch.float32, generator))
    if case == "transposed":
        grad = torch.randn(40, 17, generator=generator, dtype=torch.float64).to(DEVICE, torch.float32).t()
    else:
        grad = torch.full((1, 1), 0.5, device=DEVICE).expand(17, 40)
    with tk.backend("triton"):
        grads = torch.autograd.grad(tk.layer_norm(x, weight, bias, EPS), (x, weight, bias), grad)
    assert chosen == [("layer_norm", "triton"), ("layer_norm_backward", "triton")]
    want = ref.layer_norm_backward(grad.contiguous(), x.detach(), weight.detach(), EPS)
    want64 = ref.layer_norm_backward(grad.double(), x.detach().double(), weight.detach().double(), EPS)
    for name, got, same_precision, exact in zip(("x", "weight", "bias"), grads, want, want64):
        assert_within_2x_of_reference(got, same_precision, exact, f"grad {name}")


def test_rows_of_max_channels_run_the_kernels(poisoned, chosen, monkeypatch):
    """MAX_CHANNELS (lowered to 16 here) is the widest row the kernels take: a row of exactly that
    many channels runs them, forward and backward; only wider ones fall back."""
    if dispatch.machine_unavailable_reason("triton", DEVICE) is not None:
        pytest.skip("Triton cannot run here (no GPU, no interpreter)")
    monkeypatch.setattr(triton_layer_norm, "MAX_CHANNELS", 16)
    generator = seeded_generator("max channels")
    x = torch.randn(4, 16, generator=generator).to(DEVICE).requires_grad_()
    weight, bias = _parameters(16, torch.float32, generator)
    with tk.backend("triton"):
        out = tk.layer_norm(x, weight, bias, EPS)
        (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert chosen == [("layer_norm", "triton"), ("layer_norm_backward", "triton")]
    torch.testing.assert_close(out, ref.layer_norm(x.detach(), weight, bias, EPS))
    torch.testing.assert_close(grad_x, ref.layer_norm_backward(torch.ones_like(out), x.detach(), weight, EPS)[0])


def test_bad_input_is_rejected_naming_the_argument():
    x, weight, bias = torch.randn(2, 6), torch.randn(6), torch.randn(6)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        tk.layer_norm(torch.ones(2, 6, dtype=torch.int64), weight, bias)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        tk.layer_norm(x, torch.randn(5), bias)
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        tk.layer_norm(x, weight, torch.ones(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias is on meta"):
        tk.layer_norm(x, weight, torch.empty(6, device="meta"))
    for eps in (0.0, True, float("nan")):
        with pytest.raises(ValueError, match="eps must be a positive finite number"):
            tk.layer_norm(x, weight, bias, eps=eps)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "one-dim"])
def test_opcheck(requires_grad, layout):
    x = torch.randn(3, 2, 12, device=DEVICE)
    if layout == "permuted":  # the reference runs it and must return the fake's contiguous layout
        x = x.transpose(0, 1)
    if layout == "one-dim":
        x = x[0, 0]
    weight, bias = (torch.randn(12, device=DEVICE).requires_grad_(requires_grad) for _ in range(2))
    torch.library.opcheck(torch.ops.turbo_kernels.layer_norm.default, (x.requires_grad_(requires_grad), weight, bias, EPS))
    grad = torch.randn(x.shape, device=DEVICE)
    backend = dispatch.requested_backend()
    torch.library.opcheck(torch.ops.turbo_kernels.layer_norm_backward.default, (grad, x.detach(), weight.detach(), EPS, backend))


def test_torch_compile_fullgraph_matches_eager():
    x = torch.randn(4, 3, 16, device=DEVICE, requires_grad=True)
    weight, bias = (torch.randn(16, device=DEVICE, requires_grad=True) for _ in range(2))
    grad = torch.randn(4, 3, 16, device=DEVICE)
    eager = torch.autograd.grad(tk.layer_norm(x, weight, bias), (x, weight, bias), grad)
    torch.compiler.reset()
    compiled_fn = torch.compile(tk.layer_norm, fullgraph=True, backend="aot_eager")
    compiled = torch.autograd.grad(compiled_fn(x, weight, bias), (x, weight, bias), grad)
    torch.compiler.reset()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
