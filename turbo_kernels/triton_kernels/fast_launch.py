"""Triton kernels whose repeated launches skip Triton's per-call argument binding.

At batch 1 the host issuing kernels bounds a VideoCrafter2 UNet forward, and Triton's own launch
path is much of that: every `kernel[grid](...)` binds the arguments to the signature, specialises
each one (dtype, 16-byte alignment, integers equal to 1 or divisible by 16), builds a cache key
string and looks the compiled kernel up, about 20-30 µs a launch on CI's CPU
(`python -m benchmarks.host_cost`), while a torch op costs a few µs.

`jit` makes a `FastLaunchFunction`, a JITFunction whose launch remembers, for each key of a
call's arguments, the kernel Triton compiled for it, and calls that kernel's launcher directly the
next time. The key determines Triton's specialisation: every integer by value (which fixes its
type, its equality to 1 and its divisibility by 16), every tensor by dtype and whether its address
is 16-byte aligned, floats by type (Triton does not specialise their values), the keyword
arguments (constexprs and launch options) by value, and the current device. A first launch with a
new key, and every launch it cannot key (a grid given as a function, an argument of another kind,
a constexpr passed by position, unhashable keywords, launch hooks installed, Triton's pre-run hooks)
goes through Triton's own path unchanged. Triton's debug and instrumentation settings are read at
a key's first launch.

Under TRITON_INTERPRET=1 `jit` is triton.jit: the interpreter has no launcher to call.
TURBO_KERNELS_FAST_LAUNCH=0 (read at import) makes every launch take Triton's own path.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# Keys a kernel remembers before it forgets them all (a program whose shapes never repeat would
# otherwise grow the table without bound).
MAX_REMEMBERED_LAUNCHES = 4096


# Read once, at import (a launch reads this module global).
FAST_LAUNCH = os.environ.get("TURBO_KERNELS_FAST_LAUNCH", "1") != "0"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _no_hooks(hook: Any) -> bool:
    """Whether a launch hook of Triton's knobs would do nothing: None, or an empty HookChain."""
    return hook is None or not getattr(hook, "calls", True)


class FastLaunchFunction(JITFunction):
    """A JITFunction whose `kernel[grid](*args, **kwargs)` calls the compiled kernel's launcher
    directly for arguments whose key it has launched before (module docstring)."""

    def __init__(self, fn):
        super().__init__(fn)
        self._launches: dict[tuple, Any] = {}
        # Parameters from the first constexpr on must come as keywords for a call to be keyed.
        self._runtime_params = next((p.num for p in self.params if p.is_constexpr), len(self.params))
        self._defaults = [(p.name, p.default) for p in self.params]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _key(self, device: int, args: tuple, kwargs: dict) -> tuple | None:
        if len(args) > self._runtime_params:
            return None
        key: list = [device]
        for arg in args:
            kind = type(arg)
            if kind is int:
                key.append(arg)
            elif isinstance(arg, torch.Tensor):
                key.append((arg.dtype, arg.data_ptr() % 16 == 0))
            elif kind is float:
                key.append(float)
            elif arg is None or kind is bool:
                key.append((kind, arg))
            else:
                return None
        key.append(tuple(kwargs.items()))
        return tuple(key)

    def launch(self, grid, args: tuple, kwargs: dict):
        enter_hook, exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        if (
            not FAST_LAUNCH
            or callable(grid)
            or self.pre_run_hooks
            or not (_no_hooks(enter_hook) and _no_hooks(exit_hook))
        ):
            return self.run(*args, grid=grid, warmup=False, **kwargs)
        device = driver.active.get_current_device()
        key = self._key(device, args, kwargs)
        try:
            kernel = None if key is None else self._launches.get(key)
        except TypeError:  # an unhashable keyword value
            key = kernel = None
        if kernel is None:
            kernel = self.run(*args, grid=grid, warmup=False, **kwargs)
            if key is not None:
                if len(self._launches) >= MAX_REMEMBERED_LAUNCHES:
                    self._launches.clear()
                self._launches[key] = kernel
            return kernel
        # The arguments Triton's run passes: every parameter in order, keywords and defaults
        # filling those after the positional ones.
        # No launch metadata and no hooks: the hooks installed are empty (checked above), and
        # Triton's launcher skips hooks given as None.
        bound = args + tuple(kwargs.get(name, default) for name, default in self._defaults[len(args):])
        stream = driver.active.get_current_stream(device)
        size = len(grid)
        kernel.run(
            grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, kernel.function,
            kernel.packed_metadata, None, None, None, *bound,
        )
        return kernel


def jit(fn):
    """@triton.jit, launched through FastLaunchFunction (module docstring); under
    TRITON_INTERPRET=1, triton.jit itself."""
    if _interpreting():
        return triton.jit(fn)
    return FastLaunchFunction(fn)
