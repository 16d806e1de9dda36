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
arguments (constexprs and launch options) by type and value, the current device, and Triton's
debug and instrumentation settings. A first launch with a new key, and every launch it cannot key
(a grid given as a function, an argument of another kind, a constexpr passed by position or a
runtime argument by keyword, unhashable keywords, launch hooks or Triton's stage-inspection hook
installed, Triton's pre-run hooks) goes through Triton's own path unchanged. Triton's check that
the globals a kernel reads have not changed since it compiled runs at a key's first launch (the
kernels here read only constant globals).

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


# The environment is read once, at import; the global may be switched later (tests, host_cost).
FAST_LAUNCH = os.environ.get("TURBO_KERNELS_FAST_LAUNCH", "1") != "0"


def _no_hooks(hook: Any) -> bool:
    """Whether a launch hook of Triton's knobs would do nothing: None, or an empty HookChain."""
    return hook is None or not getattr(hook, "calls", True)


class FastLaunchFunction(JITFunction):
    """A JITFunction whose `kernel[grid](*args, **kwargs)` calls the compiled kernel's launcher
    directly for arguments whose key it has launched before (module docstring)."""

    def __init__(self, fn):
        super().__init__(fn)
        self._launches: dict[tuple, Any] = {}
        # A keyed call passes the parameters before the first constexpr by position, and only
        # constexprs and launch options by keyword.
        self._positional_limit = next((p.num for p in self.params if p.is_constexpr), len(self.params))
        self._runtime_names = frozenset(p.name for p in self.params if not p.is_constexpr)
        self._defaults = [(p.name, p.default) for p in self.params]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _key(self, device: int, args: tuple, kwargs: dict) -> tuple | None:
        if len(args) > self._positional_limit or not self._runtime_names.isdisjoint(kwargs):
            return None
        # Triton's debug and instrumentation settings and the keywords' types (True == 1) join the
        # key: each changes what Triton compiles.
        key: list = [device, knobs.runtime.debug, knobs.compilation.instrumentation_mode,
                     tuple(kwargs.items()), tuple(map(type, kwargs.values()))]
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
        return tuple(key)

    def launch(self, grid, args: tuple, kwargs: dict):
        runtime = knobs.runtime
        if (
            not FAST_LAUNCH
            or callable(grid)
            or self.pre_run_hooks
            or not (_no_hooks(runtime.launch_enter_hook) and _no_hooks(runtime.launch_exit_hook))
            or getattr(runtime, "add_stages_inspection_hook", None) is not None
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
        # filling those after the positional ones; no launch metadata and no hooks, as the hooks
        # installed are empty (checked above) and Triton's launcher skips hooks given as None.
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
    if knobs.runtime.interpret:
        return triton.jit(fn)
    return FastLaunchFunction(fn)
