"""Sampling's UNet calls replayed from CUDA graphs, so a step does not wait on the host.

At batch 1 a VideoCrafter2 UNet forward launches a few thousand kernels, and issuing them costs
the host about as long as the GPU takes to run them: on the second lease's H100 the forward took
100.5 ms eager and 100.7 ms with the kernels, although the 30 costliest kernels summed to 76 ms
and 65 ms. A CUDA graph records one call's kernels once; a replay issues all of them at once.

`GraphedCall(fn, modules)` keeps a graph for each call signature it meets (every tensor
argument's shape, strides, dtype and device; every other argument's value; autocast and
turbo_kernels' requested backend). The first call of a signature runs eagerly: it is the warm-up
in which Triton compiles and cuBLAS and cuDNN choose their plans and allocate their workspaces,
none of which a capture may do. The second captures the graph, on static copies of the
arguments, and replays it; from then on a call copies its tensors into those copies, replays,
and returns a copy of the graph's output (the next replay overwrites the graph's own). So a
4-step sampling run replays from its third step on, and every later run with the same shapes
replays throughout.
A GraphedCall's graphs share one memory pool: they never run at the same time, and each keeps
only its inputs and outputs alive between replays. That pool stays allocated while the graphs
live (`reset` frees it): it holds about what one eager call's intermediates peak at.

A graph bakes in the addresses of the modules' parameters and buffers. Changing their values in
place (`load_state_dict`, an optimizer step) carries over to the replays; replacing the tensors
(`.to(dtype)`, `load_state_dict(assign=True)`) would leave the graphs reading freed memory, so
every call compares those addresses with the ones captured and captures anew when they moved.
Calls with gradients enabled, or whose tensors are not all on one GPU, run `fn` eagerly: a graph
keeps no autograd history. So does every call after a capture failed (an op in `fn` that reads a
value back to the host or copies from pageable host memory), with one warning saying why.
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


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list  # static copies of the flattened arguments (non-tensors as they were)
    outputs: Any


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


def _capture(fn: Callable[[], Any], device: torch.device, pool: Any) -> tuple[Any, Any]:
    """(graph, outputs) of fn() captured on `device` into `pool` (None: a new pool)."""
    with torch.cuda.device(device):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
    return graph, outputs


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


class GraphedCall:
    """fn(*args, **kwargs), replayed from CUDA graphs where it can be (module docstring). `modules`
    are those whose parameters and buffers fn reads (their submodules as of now are watched)."""

    def __init__(self, fn: Callable[..., Any], modules: Sequence[nn.Module] = ()):
        self.fn = fn
        # Walking module.parameters() costs the 1.4 B UNet about 3 ms a call, these lists 0.5 ms.
        self._submodules = [sub for module in modules for sub in module.modules()]
        self._graphs: dict[Hashable, _Graph] = {}
        self._warmed_up: set[Hashable] = set()
        self._pool: Any = None
        self._weights: Optional[tuple] = None
        self.failure: Optional[str] = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drops every graph and their memory pool; each signature warms up and captures anew
        (after a change of code path, its new kernels compile in the warm-up, not in a capture)."""
        self._graphs.clear()
        self._warmed_up.clear()
        self._pool = None
        self._weights = None

    def _weight_addresses(self) -> tuple:
        return tuple(
            t.data_ptr()
            for sub in self._submodules
            for tensors in (sub._parameters, sub._buffers)
            for t in tensors.values()
            if t is not None
        )

    def _signature(self, leaves: list, spec: Any) -> Optional[Hashable]:
        try:
            leaf_keys = tuple(_leaf_key(leaf) for leaf in leaves)
        except TypeError:
            return None
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return (spec, leaf_keys, autocast, dispatch.requested_backend())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        device = _graph_device(leaves)
        key = None if device is None or torch.is_grad_enabled() or self.failure else self._signature(leaves, spec)
        if key is None:
            return self.fn(*args, **kwargs)
        weights = self._weight_addresses()
        if weights != self._weights:
            self.reset()
            self._weights = weights
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._warmed_up:
                self._warmed_up.add(key)
                return self.fn(*args, **kwargs)
            try:
                entry = self._capture(leaves, spec, device)
            except Exception as exc:
                self.failure = f"{type(exc).__name__}: {exc}"
                self.reset()
                warnings.warn(f"CUDA graph capture failed ({self.failure}); these calls run eagerly", stacklevel=2)
                return self.fn(*args, **kwargs)
            self._graphs[key] = entry
        for static, leaf in zip(entry.inputs, leaves):
            if isinstance(leaf, Tensor):
                static.copy_(leaf)
        entry.graph.replay()
        return tree_map(_clone, entry.outputs)

    def _capture(self, leaves: list, spec: Any, device: torch.device) -> _Graph:
        inputs = [_clone(leaf) for leaf in leaves]

        def call() -> Any:
            args, kwargs = tree_unflatten(inputs, spec)
            return self.fn(*args, **kwargs)

        graph, outputs = _capture(call, device, self._pool)
        self._pool = graph.pool()
        return _Graph(graph, inputs, outputs)
