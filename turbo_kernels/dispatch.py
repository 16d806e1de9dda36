"""The one place that decides, per call, which implementation of an op runs.

Each op registers up to three implementations with the same signature: "reference" (plain
PyTorch, always usable), "triton" and "cuda", each with a `supports(*args)` check that returns
None or the reason it cannot take these inputs. The choice:

- the requested backend comes from `with turbo_kernels.backend(name):`, else the environment
  variable TURBO_KERNELS_BACKEND, else "auto";
- "auto" tries triton > cuda on CUDA tensors and takes the first whose check passes (on an H100
  in bf16 the harness measured the Triton kernels ahead of the CUDA ones in all but one case:
  benchmarks/results/nvidia-h100-80gb-hbm3-20261126T090637Z.json); CPU tensors run the reference
  (the Triton interpreter is a testing tool, never an automatic choice);
- a forced backend that cannot run on this machine or device raises BackendUnavailableError;
- inputs that the chosen kernels do not support fall back to the reference with a warning that is
  given once per (op, backend, reason).

The choice is made inside the registered custom ops, at run time, so `torch.compile` traces one
opaque op and the choice follows the context in force when the compiled code runs. Eager calls skip
the dispatcher (`custom_op` below): the op's function runs directly, in an autograd.Function built
from its registered backward where an input requires grad.

A backward follows the request in force when its forward ran (saved by the op's setup_context and
passed to the backward op as an argument), not the context of the thread that runs it: on CUDA
tensors autograd runs backwards on a worker thread of its own, outside any `backend()` block of the
caller. Under torch.compile the forward's request is read when the graph is traced. A forward that
gradient checkpointing recomputes in the backward follows it too where it is checkpointed with
`checkpoint` below (the project's UNet and VAE are, when not compiled; diffusers' own
checkpointing is not, so there the environment variable is the request that holds on every thread).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.utils.checkpoint

BACKENDS = ("cuda", "triton", "reference")
_REQUESTABLE = ("auto",) + BACKENDS
ENV_VAR = "TURBO_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was forced that cannot run on this machine or on these tensors' device."""


class TurboKernelsFallbackWarning(UserWarning):
    """A kernel could not take the given inputs, so the reference ran instead."""


SupportsCheck = Callable[..., Optional[str]]


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    supports: SupportsCheck


_registry: dict[str, dict[str, Implementation]] = {}
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("turbo_kernels_backend", default=None)
_warned: set[tuple[str, str, str]] = set()
AUTO_ORDER = ("triton", "cuda")


def register(op: str, backend_name: str, supports: SupportsCheck | None = None) -> Callable:
    """Decorator: register `fn` as the `backend_name` implementation of `op`."""
    if backend_name not in BACKENDS:
        raise ValueError(f"backend_name must be one of {BACKENDS}, got {backend_name!r}")

    def decorator(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend_name] = Implementation(fn, supports or (lambda *a, **k: None))
        return fn

    return decorator


def _check_name(name: str, what: str) -> str:
    if name not in _REQUESTABLE:
        raise ValueError(f"{what} must be one of {_REQUESTABLE}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend ("auto", "cuda", "triton" or "reference") for ops called inside the block."""
    token = _override.set(_check_name(name, "backend name"))
    try:
        yield
    finally:
        _override.reset(token)


def checkpoint(function: Callable, *args, **kwargs):
    """torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs), with the
    recomputation under the backend requested now, as the forward it repeats: it runs inside the
    backward, on autograd's worker thread for CUDA tensors, outside the caller's `backend()` block
    (a forward forced to "reference" would otherwise be recomputed on the kernels). While
    torch.compile traces, the plain checkpoint: the compiler takes no context_fn, and the ops of a
    compiled backward choose their backend when it runs (the module docstring). kwargs go to
    torch's checkpoint: its other options, or function's keyword arguments."""
    taken = {"use_reentrant", "context_fn"} & kwargs.keys()
    if taken:
        raise TypeError(f"turbo_kernels.checkpoint sets {sorted(taken)} itself")
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
    requested = requested_backend()
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), backend(requested)),
        **kwargs,
    )


class EagerCustomOp:
    """A torch.library custom op (`custom_op`) whose plain eager calls run its function directly.

    The op itself is what torch.compile traces (opaque, with its fake), and what fake tensors,
    dispatch and torch function modes, functorch transforms, the JIT tracer, the profiler and
    tensor subclasses meet.
    But an eager call through the dispatcher costs its function about 20 µs of Python more (45 µs
    with gradients: the generated autograd wrapper, default filling, the alias check) on CI's CPU,
    and a VideoCrafter2 UNet forward makes about 465 of them: on the lent H200 its kernels issued
    for 155 ms a batch-1 forward whose GPU work took 50. A call of plain tensors outside all of
    those runs the function, in an autograd.Function made of the op's own backward and
    setup_context when grad mode is on and an input requires grad: the op's semantics, without its
    dispatch."""

    def __init__(self, name: str, fn: Callable):
        self._op = torch.library.custom_op(name, mutates_args=())(fn)
        self._fn = fn
        parameters = list(inspect.signature(fn).parameters.values())
        # The shortcut passes arguments by position, defaults appended: an op with keyword-only
        # parameters always takes the registered path.
        self._positional = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)
        self._num_required = sum(p.default is inspect.Parameter.empty for p in parameters)
        self._defaults = tuple(p.default for p in parameters[self._num_required:])
        self._function: Optional[type[torch.autograd.Function]] = None
        functools.update_wrapper(self, fn)

    def register_fake(self, fake: Callable) -> Callable:
        return self._op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Optional[Callable] = None) -> None:
        self._op.register_autograd(backward, setup_context=setup_context)
        fn = self._fn

        def forward(ctx, *args):
            output = fn(*args)
            if setup_context is not None:
                setup_context(ctx=ctx, inputs=args, output=output)
            return output

        self._function = type(
            f"Eager_{fn.__name__.lstrip('_')}", (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args, **kwargs):
        if kwargs or not self._positional or len(args) < self._num_required or not _plain_eager_call(args):
            return self._op(*args, **kwargs)
        args += self._defaults[len(args) - self._num_required:]
        if torch.is_grad_enabled() and any(_requires_grad(a) for a in args):
            if self._function is None:
                # The op's own autograd raises on backward: a backward op differentiated again (a
                # double backward) fails instead of giving the kernels' graph-less outputs no gradient.
                return self._op(*args)
            return self._function.apply(*args)
        return self._fn(*args)


def custom_op(name: str) -> Callable[[Callable], EagerCustomOp]:
    """Decorator: `torch.library.custom_op(name, mutates_args=())`, its eager calls without the
    dispatcher (EagerCustomOp)."""
    return lambda fn: EagerCustomOp(name, fn)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_tensors(arg) -> bool:
    if isinstance(arg, torch.Tensor):
        return type(arg) in _PLAIN_TENSOR_TYPES
    if isinstance(arg, (list, tuple)):
        return all(_plain_tensors(a) for a in arg)
    return True


def _requires_grad(arg) -> bool:
    if isinstance(arg, torch.Tensor):
        return arg.requires_grad
    return isinstance(arg, (list, tuple)) and any(_requires_grad(a) for a in arg)


def _plain_eager_call(args) -> bool:
    """Whether nothing but the op's function needs to see this call: no compiler tracing, dispatch
    mode (fake tensors, FlopCounterMode), torch function mode (torch.device's context, user modes)
    or argument with a __torch_function__ (tensor subclasses, torch.fx proxies), functorch
    transform, JIT trace or profiler, and plain tensors only."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._has_torch_function(args)
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
        and torch._C._get_tracing_state() is None
        and not torch._C._autograd._profiler_enabled()
        and all(_plain_tensors(a) for a in args)
    )


def requested_backend() -> str:
    forced = _override.get()
    if forced is not None:
        return forced
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton ships with CUDA torch wheels
        return f"triton is not importable ({exc})"
    return None


def machine_unavailable_reason(backend_name: str, device: torch.device) -> Optional[str]:
    """Why `backend_name` cannot run on `device` on this machine, or None if it can."""
    if backend_name == "reference":
        return None
    if backend_name == "triton":
        reason = _triton_import_error()
        if reason:
            return reason
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if triton_interpreter_on() else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton kernels do not run on {device.type} tensors"
    if backend_name == "cuda":
        from turbo_kernels import _cuda_ext

        reason = _cuda_ext.load_error()
        if reason:
            return reason
        if device.type != "cuda":
            return f"CUDA kernels need CUDA tensors, got {device.type} tensors"
        return None
    raise ValueError(f"unknown backend {backend_name!r}")


def _warn_once(op: str, backend_name: str, reason: str) -> None:
    key = (op, backend_name, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"turbo_kernels.{op}: {backend_name} cannot take these inputs ({reason}); using the reference",
        TurboKernelsFallbackWarning,
        stacklevel=4,
    )


def select(op: str, device: torch.device, *args, requested: Optional[str] = None) -> str:
    """The backend that runs `op` on these arguments (see the module docstring for the rules);
    `requested` replaces the backend requested in this context (a backward passes its forward's)."""
    impls = _registry[op]
    requested = requested_backend() if requested is None else _check_name(requested, "requested")
    if requested == "reference":
        return "reference"
    if requested == "auto":
        candidates = AUTO_ORDER if device.type == "cuda" else ()
        rejections = []
        for name in candidates:
            impl = impls.get(name)
            if impl is None or machine_unavailable_reason(name, device) is not None:
                continue
            reason = impl.supports(*args)
            if reason is None:
                return name
            rejections.append(f"{name}: {reason}")
        if rejections:
            _warn_once(op, "auto", "; ".join(rejections))
        return "reference"
    unavailable = machine_unavailable_reason(requested, device)
    if unavailable is not None:
        raise BackendUnavailableError(f"turbo_kernels.{op}: backend {requested!r} was forced but {unavailable}")
    impl = impls.get(requested)
    if impl is None:
        _warn_once(op, requested, f"{op} has no {requested} implementation")
        return "reference"
    reason = impl.supports(*args)
    if reason is not None:
        _warn_once(op, requested, reason)
        return "reference"
    return requested


def run(op: str, device: torch.device, *args, requested: Optional[str] = None):
    """Select a backend for these arguments (see `select`) and call its implementation."""
    return _registry[op][select(op, device, *args, requested=requested)].fn(*args)


def implementation(op: str, backend_name: str) -> Callable:
    """The raw implementation of `op` for `backend_name` (benchmarks and tests call it directly)."""
    return _registry[op][backend_name].fn


def registered_ops() -> list[str]:
    return sorted(_registry)


def backends(device: str | torch.device | None = None) -> dict[str, list[str]]:
    """Per op, the backends usable on this machine for tensors on `device` (default: the GPU
    when there is one, else the CPU), in the order "auto" prefers them on CUDA tensors; on CPU
    tensors "auto" runs the reference, and triton is listed where TRITON_INTERPRET=1 lets it be
    forced."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {
        op: [
            name
            for name in AUTO_ORDER + ("reference",)
            if name in impls and machine_unavailable_reason(name, device) is None
        ]
        for op, impls in sorted(_registry.items())
    }


def report(device: str | torch.device | None = None) -> str:
    """Human-readable table: each op, each backend, and why a backend is not usable here."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    lines = [f"turbo_kernels backends for {device.type} tensors (requested: {requested_backend()})"]
    for op, impls in sorted(_registry.items()):
        lines.append(f"  {op}")
        for name in BACKENDS:
            if name not in impls:
                status = "not implemented"
            else:
                status = machine_unavailable_reason(name, device) or "usable"
            lines.append(f"    {name:<10} {status}")
    return "\n".join(lines)
