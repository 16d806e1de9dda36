"""Sampling's UNet calls replayed from CUDA graphs, so a step does not wait on the host.

At batch 1 a VideoCrafter2 UNet forward launches a few thousand kernels, and issuing them costs
the host about as long as the GPU takes to run them: on the second lease's H100 the forward took
100.5 ms eager and 100.7 ms with the kernels, although the 30 costliest kernels summed to 76 ms
and 65 ms. A CUDA graph records one call's kernels once; a replay issues all of them at once.

`GraphedCall(fn, modules)` keeps a graph for each call signature it meets: every tensor
argument's shape, strides, dtype and device, every other argument's value, whether inference
mode is on, turbo_kernels' requested backend, and the modules' `training` and `use_kernels`. The
first call of a signature copies its arguments into static tensors and runs `fn` on them
eagerly: the warm-up, in which Triton compiles and cuDNN and cuBLAS choose their plans, on the
very layouts the capture will see (a torch.compile'd `fn` guards on strides). The second call
copies its arguments into those tensors and captures the graph on them, on a side stream of
this GraphedCall's own, then replays it; every later call copies in, replays, and returns a
copy of the graph's output (the next replay overwrites the graph's own). So a 4-step sampling
run replays from its second step on, and every later run with the same shapes throughout.
A GraphedCall's graphs share one memory pool: they never run at the same time, and each keeps
only its inputs and outputs alive between replays. That pool stays allocated while the graphs
live (`reset` frees it): it holds about what one eager call's intermediates peak at, plus
cuBLAS's workspace for the capture stream.

A graph bakes in the addresses of the modules' parameters and buffers and the submodules it ran.
Changing parameter values in place (`load_state_dict`, an optimizer step) carries over to the
replays; replacing tensors (`.to(dtype)`, `load_state_dict(assign=True)`) or submodules (an
adapter injected) would leave the graphs running what is gone, so every call compares the
tensors and submodules with the ones captured and starts over when they changed.

Some calls run `fn` eagerly, always: with gradients enabled (a graph keeps no autograd history),
under CUDA autocast (its cache of cast weights lives only as long as the autocast block, and a
graph would keep reading it), and with tensors not all on one GPU. So does every call after a
capture failed (an op in `fn` that reads a value back to the host, or copies from pageable host
memory), with one warning that names the op's error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from turbo_kernels import dispatch


class GraphCaptureWarning(UserWarning):
    """A GraphedCall's capture failed: its calls run eagerly from then on."""


@dataclass
class _Graph:
    inputs: list  # static copies of the flattened arguments (non-tensors as they were)
    graph: Any = None  # torch.cuda.CUDAGraph, once captured
    outputs: Any = None


def _leaf_key(leaf: Any) -> Hashable:
    if isinstance(leaf, Tensor):
        return ("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad)
    hash(leaf)  # a TypeError for arguments a signature cannot hold
    return ("value", type(leaf), leaf)


def _graph_device(leaves: Sequence[Any]) -> Optional[torch.device]:
    """The one CUDA device every tensor argument is on; None when there is none or several."""
    devices = {leaf.device for leaf in leaves if isinstance(leaf, Tensor)}
    if len(devices) != 1:
        return None
    (device,) = devices
    return device if device.type == "cuda" else None


def _capture(fn: Callable[[], Any], device: torch.device, pool: Any, streams: dict) -> tuple[Any, Any]:
    """(graph, outputs) of fn() captured on `device` into `pool` (None: a new pool), on the side
    stream `streams` holds for the device (made on first use: torch.cuda.graph's default one is
    one for the process, on whichever GPU was current first). Leaves the current stream as it
    found it, also when the capture fails."""
    with torch.cuda.device(device):
        if device not in streams:
            streams[device] = torch.cuda.Stream(device)
        stream = streams[device]
        current = torch.cuda.current_stream(device)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA calls of other threads (a data loader pinning memory, a server's
            # other requests) go on; only this thread's must be capturable.
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                outputs = fn()
        except Exception:
            # torch.cuda.graph's exit does not leave its stream when ending the capture raises.
            torch.cuda.set_stream(current)
            raise
    return graph, outputs


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


def _capture_error(exc: BaseException) -> str:
    """The error that broke a capture: ending a capture an op broke raises its own, less telling,
    error with the op's as its context."""
    cause = exc.__context__ if exc.__context__ is not None else exc
    return f"{type(cause).__name__}: {cause}"


class GraphedCall:
    """fn(*args, **kwargs), replayed from CUDA graphs where it can be (module docstring). `modules`
    are those whose parameters, buffers and submodules fn runs."""

    def __init__(self, fn: Callable[..., Any], modules: Sequence[nn.Module] = ()):
        self.fn = fn
        self.modules = tuple(modules)
        self._graphs: dict[Hashable, _Graph] = {}
        self._pool: Any = None
        self._streams: dict[torch.device, Any] = {}
        self._submodules: list[nn.Module] = []
        self._state: Optional[tuple] = None
        self.failure: Optional[str] = None

    @property
    def num_graphs(self) -> int:
        return sum(entry.graph is not None for entry in self._graphs.values())

    def reset(self) -> None:
        """Drops every graph, their static inputs and their memory pool; each signature warms up
        and captures anew (after a change of code path, its kernels compile in the warm-up, never
        in a capture)."""
        self._graphs.clear()
        self._pool = None
        self._state = None

    def _module_state(self) -> tuple:
        """What the graphs bake in of the modules: every parameter and buffer (identity and
        address) and every submodule, walked through the submodules seen at the last reset (about
        0.5 ms for the 1.4 B UNet; module.parameters() takes 3 ms). A submodule replaced shows as
        a changed child of its parent."""
        return tuple(
            (id(t), t.data_ptr()) if isinstance(t, Tensor) else id(t)
            for sub in self._submodules
            for members in (sub._parameters, sub._buffers, sub._modules)
            for t in members.values()
            if t is not None
        )

    def _signature(self, leaves: list, spec: Any) -> Optional[Hashable]:
        try:
            leaf_keys = tuple(_leaf_key(leaf) for leaf in leaves)
        except TypeError:
            return None
        modes = tuple((module.training, getattr(module, "use_kernels", None)) for module in self.modules)
        return (spec, leaf_keys, torch.is_inference_mode_enabled(), dispatch.requested_backend(), modes)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        device = _graph_device(leaves)
        eager = (
            device is None or self.failure is not None or torch.is_grad_enabled() or torch.is_autocast_enabled("cuda")
        )
        key = None if eager else self._signature(leaves, spec)
        if key is None:
            return self.fn(*args, **kwargs)
        state = self._module_state() if self._state is not None else None
        if state is None or state != self._state:
            self.reset()
            self._submodules = [sub for module in self.modules for sub in module.modules()]
            self._state = self._module_state()
        entry = self._graphs.get(key)
        if entry is None:
            # The eager warm-up call: kept only once it has run, so a call that raised (out of
            # memory, say) is warmed up again rather than captured with its first-time work.
            entry = _Graph(inputs=[_clone(leaf) for leaf in leaves])
            result = self._run_on_inputs(entry, spec)
            self._graphs[key] = entry
            return result
        for static, leaf in zip(entry.inputs, leaves):
            if isinstance(leaf, Tensor):
                static.copy_(leaf)
        if entry.graph is None:
            try:
                entry.graph, entry.outputs = _capture(
                    lambda: self._run_on_inputs(entry, spec), device, self._pool, self._streams
                )
            except Exception as exc:
                self.failure = _capture_error(exc)
                self.reset()
                warnings.warn(
                    f"CUDA graph capture failed ({self.failure}); these calls run eagerly", GraphCaptureWarning,
                    stacklevel=2,
                )
                return self.fn(*args, **kwargs)
            self._pool = entry.graph.pool()
        entry.graph.replay()
        return tree_map(_clone, entry.outputs)

    def _run_on_inputs(self, entry: _Graph, spec: Any) -> Any:
        args, kwargs = tree_unflatten(entry.inputs, spec)
        return self.fn(*args, **kwargs)
