"""The dispatch seam: requested backend, auto order, fallbacks with one warning, clear errors."""

import runpy
import threading
import warnings

import pytest
import torch

import turbo_kernels as tk
from turbo_kernels import dispatch

from .helpers import DEVICE, HAS_GPU, RecordedOps, alphas_cumprod

PUBLIC_OPS = ["guided_solver_step", "consistency_output", "consistency_sampler_step", "pseudo_huber_loss"]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch._warned.clear()


def test_backends_lists_every_op_with_reference_last():
    table = tk.backends()
    for op in PUBLIC_OPS + [f"{op}_backward" for op in PUBLIC_OPS]:
        assert op in table
        assert table[op][-1] == "reference"
    assert tk.backends("cpu")["guided_solver_step"] == (
        ["triton", "reference"] if dispatch.triton_interpreter_on() else ["reference"]
    )


def test_report_says_why_a_backend_is_unusable():
    text = tk.backend_report("cpu")
    assert "guided_solver_step" in text
    assert "cuda" in text and ("CUDA tensors" in text or "not built" in text)


def test_info_prints_the_report_and_it_names_the_backends_an_op_lacks(capsys):
    """`python -m turbo_kernels.info` prints the report; a backend an op has no implementation of
    is reported as such, not by what the machine could run."""
    runpy.run_module("turbo_kernels.info", run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("turbo_kernels backends for")
    sampler = lines.index("  consistency_sampler_step")
    assert lines[sampler + 1].split(None, 1) == ["cuda", "not implemented"]


def test_context_manager_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.requested_backend() == "triton"
    with tk.backend("reference"):
        assert dispatch.requested_backend() == "reference"
        with tk.backend("auto"):
            assert dispatch.requested_backend() == "auto"
        assert dispatch.requested_backend() == "reference"
    assert dispatch.requested_backend() == "triton"


def test_bad_backend_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend name"):
        with tk.backend("fast"):
            pass
    monkeypatch.setenv(dispatch.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.requested_backend()


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    x = torch.randn(2, 8, device=DEVICE)
    assert dispatch.select("consistency_output", x.device, x, x) == "reference"


def test_forcing_cuda_on_cpu_tensors_is_a_clear_error():
    x = torch.randn(2, 3)
    with tk.backend("cuda"), pytest.raises(tk.BackendUnavailableError, match="cuda.*forced"):
        tk.consistency_output(x, x, 5, alphas_cumprod("cpu"))


@pytest.mark.skipif(dispatch.triton_interpreter_on() or HAS_GPU, reason="Triton is usable on this machine")
def test_forcing_triton_without_gpu_or_interpreter_is_a_clear_error():
    x = torch.randn(2, 3)
    with tk.backend("triton"), pytest.raises(tk.BackendUnavailableError, match="TRITON_INTERPRET"):
        tk.consistency_output(x, x, 5, alphas_cumprod("cpu"))


@pytest.mark.skipif(dispatch.machine_unavailable_reason("triton", DEVICE) is not None, reason="Triton not usable here")
def test_unsupported_inputs_fall_back_to_reference_with_one_warning():
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=DEVICE)
    acp = alphas_cumprod(dtype=torch.float64)
    with tk.backend("triton"):
        with pytest.warns(tk.TurboKernelsFallbackWarning, match="float64"):
            out = tk.consistency_output(x, x, 7, acp)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = tk.consistency_output(x, x, 7, acp)
    from turbo_kernels.reference import solver as ref

    want = ref.consistency_output(x, x, torch.full((3,), 7, device=DEVICE), acp)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def _strided_view_and_contiguous():
    view = torch.randn(2, 4, 6, device=DEVICE).transpose(1, 2)  # not dense in any layout the kernels stream
    return view, torch.randn(2, 6, 4, device=DEVICE)


def _contiguous_and_channels_last_3d():
    sample = torch.randn(2, 4, 3, 5, 6, device=DEVICE)
    return sample, torch.randn(2, 4, 3, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.skipif(dispatch.machine_unavailable_reason("triton", DEVICE) is not None, reason="Triton not usable here")
@pytest.mark.parametrize(
    "make,match",
    [(_strided_view_and_contiguous, "layout"), (_contiguous_and_channels_last_3d, "one memory layout")],
    ids=["strided-view", "different-layouts"],
)
def test_layouts_the_kernels_cannot_stream_fall_back_to_reference(make, match):
    """The kernels stream every tensor with the strides of the first, which must be dense: a
    strided view is refused, and so is a channels_last_3d eps beside a contiguous sample, though
    each is dense."""
    sample, eps = make()
    with tk.backend("triton"), pytest.warns(tk.TurboKernelsFallbackWarning, match=match):
        out = tk.consistency_output(sample, eps, 600, alphas_cumprod())
    with tk.backend("reference"):
        want = tk.consistency_output(sample, eps, 600, alphas_cumprod())
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_ops_without_a_cuda_kernel_fall_back_when_cuda_is_forced():
    if dispatch.machine_unavailable_reason("cuda", DEVICE) is not None:
        pytest.skip("the CUDA backend cannot run here")
    x = torch.randn(2, 3, device=DEVICE)
    with tk.backend("cuda"), pytest.warns(tk.TurboKernelsFallbackWarning, match="no cuda implementation"):
        tk.pseudo_huber_loss(x, x)


def test_auto_tries_triton_before_cuda():
    """The order the H100 harness run measured (Triton ahead of CUDA in all cases but one)."""
    assert dispatch.AUTO_ORDER == ("triton", "cuda")
    listed = tk.backends("cuda")["guided_solver_step"]
    assert listed[0] == "triton" and listed == [n for n in ("triton", "cuda", "reference") if n in listed]


CUDA_DEVICE = torch.device("cuda")


def _register_toy(monkeypatch, unavailable=(), **checks):
    """Registers the op "toy": its reference, and a kernel backend for each keyword whose value is
    what that backend's supports check answers (None or a reason). Backends in `unavailable`
    cannot run on this machine; the others can, whatever it has, so "auto" on CUDA tensors can be
    followed without a GPU (select reads no tensor)."""
    monkeypatch.setitem(dispatch._registry, "toy", {})
    dispatch.register("toy", "reference")(lambda x: x)
    for name, reason in checks.items():
        dispatch.register("toy", name, lambda x, reason=reason: reason)(lambda x: x)
    monkeypatch.setattr(
        dispatch, "machine_unavailable_reason", lambda name, device: "absent" if name in unavailable else None
    )


def test_auto_takes_the_first_kernel_backend_that_runs_here_and_accepts_the_inputs(monkeypatch):
    """On CUDA tensors "auto" passes over a backend that cannot run on this machine or refuses the
    inputs, and takes the next one: the CUDA kernel where Triton refuses (a kernel ran, so no
    warning), the CUDA kernel where Triton is missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _register_toy(monkeypatch, triton="head dim 80", cuda=None)
        assert dispatch.select("toy", CUDA_DEVICE, None) == "cuda"
        _register_toy(monkeypatch, unavailable=("triton",), triton=None, cuda=None)
        assert dispatch.select("toy", CUDA_DEVICE, None) == "cuda"


def test_auto_falls_back_with_one_warning_per_reason_naming_every_refusal(monkeypatch):
    """Every kernel backend refusing: the reference runs, with a warning naming each refusal,
    given once; inputs refused for another reason warn again (the key holds the reason)."""
    _register_toy(monkeypatch, triton="head dim 80", cuda="head dim 80 (the CUDA kernels take 64)")
    with pytest.warns(tk.TurboKernelsFallbackWarning) as record:
        assert dispatch.select("toy", CUDA_DEVICE, None) == "reference"
        assert dispatch.select("toy", CUDA_DEVICE, None) == "reference"
    assert [str(w.message) for w in record] == [
        "turbo_kernels.toy: auto cannot take these inputs (triton: head dim 80; cuda: head dim 80 (the CUDA "
        "kernels take 64)); using the reference"
    ]
    _register_toy(monkeypatch, triton="num_frames=65 exceeds 64", cuda="num_frames=65 exceeds 32")
    with pytest.warns(tk.TurboKernelsFallbackWarning, match="triton: num_frames=65 exceeds 64"):
        assert dispatch.select("toy", CUDA_DEVICE, None) == "reference"


def test_forcing_a_backend_the_op_lacks_runs_the_reference_with_a_warning(monkeypatch):
    """The CPU-runnable counterpart of the CUDA test above: an op without a CUDA kernel, forced to
    CUDA on a machine that can run it."""
    _register_toy(monkeypatch, triton=None)
    with tk.backend("cuda"), pytest.warns(tk.TurboKernelsFallbackWarning, match="toy has no cuda implementation"):
        assert dispatch.select("toy", CUDA_DEVICE, None) == "reference"


def test_forcing_cuda_on_cpu_tensors_is_an_error_also_for_ops_without_a_cuda_kernel():
    """Whether the forced backend can run on these tensors is asked first: pseudo_huber_loss has
    no CUDA kernel, and forcing CUDA on CPU tensors is still an error, not a silent reference run."""
    x = torch.randn(2, 3)
    with tk.backend("cuda"), pytest.raises(tk.BackendUnavailableError, match="cuda.*forced"):
        tk.pseudo_huber_loss(x, x)


def test_the_request_defaults_to_auto_and_the_variable_is_read_loosely(monkeypatch):
    """No block and no variable, or an empty one, request "auto"; the variable's case and
    surrounding space do not matter."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.requested_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "")
    assert dispatch.requested_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, " Triton\n")
    assert dispatch.requested_backend() == "triton"


def test_a_block_left_by_an_exception_restores_the_request():
    with pytest.raises(KeyError):
        with tk.backend("reference"):
            raise KeyError("inside")
    assert dispatch.requested_backend() == "auto"


def test_registering_an_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend_name must be one of .* got 'cudnn'"):
        dispatch.register("toy", "cudnn")


def test_triton_takes_cpu_tensors_only_under_the_interpreter_and_no_other_device(monkeypatch):
    """The machine check itself, whatever this machine runs under: the interpreter's variable is
    read at each call."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in dispatch.machine_unavailable_reason("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.machine_unavailable_reason("triton", cpu) is None
    assert dispatch.machine_unavailable_reason("triton", meta) == "Triton kernels do not run on meta tensors"


def test_the_batch_limit_of_the_kernel_grid():
    """Samples walk grid axis 1, at most 65535 programs: 65535 samples run the kernel, one more
    falls back (select only, nothing is launched)."""
    with tk.backend("triton"):
        fits = torch.empty(65535, 1, device=DEVICE)
        assert dispatch.select("consistency_output", fits.device, fits, fits) == "triton"
        over = torch.empty(65536, 1, device=DEVICE)
        with pytest.warns(tk.TurboKernelsFallbackWarning, match="batch size 65536 exceeds 65535"):
            assert dispatch.select("consistency_output", over.device, over, over) == "reference"


def _differentiable_calls():
    """name -> (leaf inputs, call returning a scalar) for every op with a dispatched backward."""
    g = torch.Generator().manual_seed(5)

    def leaves(*shapes):
        return [torch.randn(shape, generator=g).to(DEVICE).requires_grad_(True) for shape in shapes]

    acp = alphas_cumprod()
    latent = (2, 4, 2, 4, 4)
    tokens = (2 * 4, 3, 2 * 16)  # (B*F, N, heads*d) with F = 4, 2 heads of 16
    calls = {
        "guided_solver_step": (leaves(latent, latent, latent), lambda z, c, u: sum(
            out.sum() for out in tk.guided_solver_step(z, c, u, 700, 500, 7.5, acp))),
        "consistency_output": (leaves(latent, latent), lambda x, e: tk.consistency_output(x, e, 500, acp).sum()),
        "consistency_sampler_step": (leaves(latent, latent, latent), lambda x, e, n: sum(
            out.sum() for out in tk.consistency_sampler_step(x, e, 500, 300, acp, noise=n))),
        "pseudo_huber_loss": (leaves(latent, latent), tk.pseudo_huber_loss),
        "temporal_attention": (leaves(tokens, tokens, tokens), lambda q, k, v: tk.temporal_attention(
            q, k, v, 4, 2).square().sum()),
        "temporal_attention_probs": (leaves(tokens, tokens), lambda q, k: tk.temporal_attention_probs(
            q, k, 4, 2).square().sum()),
        "motion_energy": (leaves(tokens, tokens), lambda q, k: tk.motion_energy(
            q, k, torch.rand(2 * 3, 2, 4, 4, generator=g).to(DEVICE), 4, 2)),
        "spatial_attention": (leaves(tokens, tokens, tokens), lambda q, k, v: tk.spatial_attention(
            q, k, v, 2).square().sum()),
        "reward_preprocess": (leaves((1, 2, 3, 6, 8)), lambda frames: sum(
            out.square().sum() for out in tk.reward_preprocess(frames, [tk.PreprocessSpec(4, "squash")]))),
        "strided_linear": (leaves((2, 3, 8), (5, 8)), lambda x, weight: torch.ops.turbo_kernels.strided_linear(
            x, weight, None, None, None, None, 1, False).square().sum()),
    }
    return calls


@pytest.mark.skipif(dispatch.machine_unavailable_reason("triton", DEVICE) is not None, reason="Triton not usable here")
@pytest.mark.parametrize("op", sorted(_differentiable_calls()))
def test_a_backward_follows_its_forwards_request_on_any_thread(op, chosen):
    """On CUDA tensors autograd runs backwards on a worker thread, outside the caller's backend()
    block; here the backward runs after the block has closed, on a thread of its own."""
    inputs, call = _differentiable_calls()[op]
    with tk.backend("triton"):
        loss = call(*inputs)
    grads = []
    worker = threading.Thread(target=lambda: grads.extend(torch.autograd.grad(loss, inputs)))
    worker.start()
    worker.join()
    assert len(grads) == len(inputs)
    assert chosen and {name for _, name in chosen} == {"triton"}, chosen
    assert any(called.endswith(("_backward", "_grad")) for called, _ in chosen), "the backward went through dispatch"


def test_a_checkpointed_forward_is_recomputed_under_its_request():
    """turbo_kernels.checkpoint: the recomputation, run by a backward outside the forward's
    backend() block, sees the forward's request ("auto" without it); its own options are its."""
    seen = []

    def forward(x):
        seen.append(dispatch.requested_backend())
        return x.sin()

    x = torch.randn(4, requires_grad=True)
    with tk.backend("reference"):
        out = tk.checkpoint(forward, x)
    out.sum().backward()
    assert seen == ["reference", "reference"]
    torch.testing.assert_close(x.grad, x.detach().cos())
    with pytest.raises(TypeError, match=r"sets \['use_reentrant'\] itself"):
        tk.checkpoint(forward, x, use_reentrant=True)



_SCALED_CALLS = []


@dispatch.custom_op("turbo_kernels_test::scaled")
def _scaled_op(x: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    _SCALED_CALLS.append(torch.compiler.is_compiling())
    return x * scale + shift


@_scaled_op.register_fake
def _(x, scale, shift=0.0):
    return torch.empty_like(x)


def _scaled_setup(ctx, inputs, output):
    ctx.inputs = inputs


def _scaled_backward(ctx, grad):
    return grad * ctx.inputs[1], None, None


_scaled_op.register_autograd(_scaled_backward, setup_context=_scaled_setup)


class _CountingFunctionMode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_an_eager_custom_op_runs_its_function_without_the_dispatcher(monkeypatch):
    """A plain eager call never reaches the registered op (replaced here by one that fails); with
    gradients it runs the op's own backward, its setup_context given every input, defaults too."""
    monkeypatch.setattr(_scaled_op, "_op", lambda *a, **k: pytest.fail("the eager call reached the dispatcher"))
    x = torch.randn(5, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(_scaled_op(x, 3.0), x * 3.0, rtol=0, atol=0)
    y = _scaled_op(x, 3.0)
    assert type(y.grad_fn).__name__ == "Eager_scaled_opBackward"
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 3.0), rtol=0, atol=0)
    assert y.grad_fn.inputs == (x, 3.0, 0.0)


@pytest.mark.parametrize("case", ["dispatch-mode", "function-mode", "keyword", "subclass", "profiler", "compile"])
def test_custom_op_calls_that_others_must_see_go_through_the_dispatcher(case):
    """Dispatch modes (fake tensors, FlopCounterMode), torch function modes, keyword arguments,
    tensor subclasses, the profiler and torch.compile each get the registered op, with its autograd."""
    x = torch.randn(4, requires_grad=True)
    if case == "dispatch-mode":
        with RecordedOps({torch.ops.turbo_kernels_test.scaled.default}) as mode:
            y = _scaled_op(x, 2.0)
        assert mode.calls == ["turbo_kernels_test.scaled.default"]
    elif case == "function-mode":
        # A TorchFunctionMode (torch.device's default-device context is one) sees the op, as a
        # call through the dispatcher shows it, not the torch functions inside the op's function.
        with _CountingFunctionMode() as mode:
            y = _scaled_op(x, 2.0)
        assert "turbo_kernels_test.scaled.default" in mode.funcs
        assert not any("mul" in func for func in mode.funcs), mode.funcs
    elif case == "keyword":
        y = _scaled_op(x, scale=2.0)
    elif case == "subclass":
        class Marked(torch.Tensor):
            pass

        y = _scaled_op(x.as_subclass(Marked), 2.0)
    elif case == "profiler":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            y = _scaled_op(x, 2.0)
        assert any(event.name == "turbo_kernels_test::scaled" for event in profile.events())
    else:
        _SCALED_CALLS.clear()
        torch.compiler.reset()
        y = torch.compile(lambda t: _scaled_op(t, 2.0), fullgraph=True, backend="aot_eager")(x)
        assert _SCALED_CALLS and not any(_SCALED_CALLS), "the compiled graph calls the op, not the traced function"
    assert "Eager_" not in type(y.grad_fn).__name__
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 2.0), rtol=0, atol=0)


@dispatch.custom_op("turbo_kernels_test::doubled_without_autograd")
def _doubled_op(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).detach()  # as a kernel's output: no graph


def test_an_op_without_a_backward_refuses_gradients_as_the_registered_op_does():
    """A backward op differentiated again (create_graph) must fail, not hand back a kernel's
    graph-less output; without gradients the eager call runs the function."""
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        _doubled_op(x).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(_doubled_op(x), x * 2, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["vmap", "jit-trace"])
def test_functorch_transforms_and_the_jit_tracer_get_the_registered_op(case, monkeypatch):
    """Under a functorch transform or the JIT tracer the call reaches the registered op (which runs
    the function registered with it), never the eager shortcut (replaced here by one that fails).
    (torch.func.grad refuses custom ops with a registered autograd, through the dispatcher too.)"""
    monkeypatch.setattr(_scaled_op, "_fn", lambda *a: pytest.fail("the eager shortcut ran under a transform"))
    x = torch.randn(2, 3)
    if case == "vmap":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")  # no batching rule
            got, want = torch.vmap(lambda t: _scaled_op(t, 2.0))(x), x * 2.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # check_trace would rerun the lambda eagerly, where the shortcut is right.
            traced = torch.jit.trace(lambda t: _scaled_op(t, 2.0), x, check_trace=False)
        assert "turbo_kernels_test::scaled" in str(traced.graph)
        got, want = traced(x), x * 2.0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@dispatch.custom_op("turbo_kernels_test::shifted_by_keyword")
def _shifted_op(x: torch.Tensor, *, shift: float = 1.0) -> torch.Tensor:
    return x + shift


def test_an_op_with_keyword_only_parameters_takes_the_registered_path(monkeypatch):
    """The shortcut passes arguments by position: an op with keyword-only parameters never takes it."""
    x = torch.randn(3)
    torch.testing.assert_close(_shifted_op(x), x + 1.0, rtol=0, atol=0)
    monkeypatch.setattr(_shifted_op, "_op", lambda *a, **k: "registered")
    assert _shifted_op(x) == "registered"
