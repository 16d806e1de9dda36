"""Op-agnostic benchmark harness: timing, the measured ceilings (copy bandwidth, matrix rate), the
JSON contract, table, plot.

A suite (e.g. `benchmarks.solver`) turns `SuiteOptions` into `Case`s: one op at one shape for one
pass, with a callable per implementation and the bytes an ideal kernel moves. The harness times
every implementation it can, records the others as skipped with the reason, and writes one JSON
file and one PNG a run (see benchmarks/results/README.md for the contract). Each row's share of
the roofline is measured against two ceilings taken in the same run: a large device-to-device
copy (bytes) and a large square matmul in the run's dtype (FLOPs, for cases that count them).

Timing on a GPU is device time: before each timed call the stream gets a spin kernel long enough
to cover the host's work of issuing that call, so the call's kernels run back to back as they do
inside a training step, and CUDA events around the call measure the GPU alone. The host's time to
issue one call is reported beside it (`host_ms`): where it exceeds the device time, the op is
launch-bound when run on its own. So is the call's latency from an idle GPU (`wall_ms`: from
issue to its last kernel's end, over a few synchronised calls after the timed ones), what one
call costs a user where nothing else queues ahead of it; well above median_ms (more than the
tens of µs a launch and a synchronisation add), the GPU waited on the host. On the CPU, timing
is wall-clock time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from t2v_turbo.commands import positive_int
from t2v_turbo.cuda_graphs import GraphCaptureWarning

# The command lines' description: the module docstring's first paragraph.
DESCRIPTION = " ".join(__doc__.split("\n\n")[0].split())
PASSES = ("fwd", "fwd+bwd")
# The baselines every suite times and the table compares against.
EAGER = "reference-eager"
COMPILED = "reference-compile"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 1024**2

# Copy sizes for the bandwidth ceiling: far beyond any cache.
COPY_BYTES_GPU = 1024 * MIB
COPY_BYTES_CPU = 256 * MIB
COPY_BYTES_QUICK = 16 * MIB
# Square matmul sizes for the matrix-rate ceiling (8192: what cuBLAS runs at its peak rate on an H100).
MATMUL_SIZE_GPU = 8192
MATMUL_SIZE_CPU = 1024
MATMUL_SIZE_QUICK = 128

# Inputs rotate over enough copies that each call reads them from DRAM, not from a warm L2
# (an H100's 50 MiB L2 holds all inputs of a B=8 bf16 latent op).
L2_MULTIPLE = 3
MAX_INPUT_SETS = 128

# Head start of the GPU over the host for each timed call: the spin kernel lasts this many times
# the host's issue time of one call, plus a fixed margin, at most SPIN_MAX_MS: a call issuing for
# longer fills the launch queue (about a thousand kernels) or synchronises inside (sampling, the
# reward pass), so a longer spin only leaves the GPU idle, tripling such a row's cost.
SPIN_HOST_FACTOR = 2.0
SPIN_MARGIN_MS = 0.05
SPIN_MAX_MS = 20.0
# Calls whose latency from an idle GPU makes wall_ms (at most the timed calls' count); one for
# calls of more than LONG_CALL_MS, whose latency varies little against its size.
WALL_CALLS = 3
LONG_CALL_MS = 100.0

VALIDATE_ENV = "TURBO_KERNELS_VALIDATE"
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class Impl:
    """One way to run a case: `fn(inputs)` makes one call on one input set.

    compiles: its first call compiles (it then counts against the run's compile budget, and starts
    from a clean torch.compile cache). unavailable: why it cannot run here; it is recorded as
    skipped and never called.
    """

    name: str
    fn: Callable[[Any], Any]
    compiles: bool = False
    unavailable: Optional[str] = None


@dataclass(frozen=True)
class Case:
    """One op at one shape for one pass. `make_inputs()` builds one fresh input set; `bytes_moved`
    is what an ideal kernel reads and writes a call, `flops` its arithmetic where that means
    something (None for memory-bound ops), or a callable that counts them, called once when the case
    runs (counting a full model on the meta device takes seconds, which runs of other ops skip).
    `rotate_inputs`: the run builds enough input sets to
    read them from DRAM (L2_MULTIPLE); False for inputs that hold models, whose weights alone are
    far beyond any cache and which would each be built again. `measure_working_memory`: one more
    call measures the memory the call itself allocates (`working_memory_bytes`), on any device.
    `host_only`: the call runs on the host alone (decoding video files), so it is timed by the
    wall clock on any device: CUDA events would time an empty stream."""

    op: str
    case: str
    pass_name: str
    make_inputs: Callable[[], Any]
    impls: tuple[Impl, ...]
    bytes_moved: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    flops: Optional[int | Callable[[], int]] = None
    rotate_inputs: bool = True
    measure_working_memory: bool = False
    host_only: bool = False


@dataclass(frozen=True)
class SuiteOptions:
    """What a suite needs to build its cases. batch_sizes None: the suite's default for the device."""

    device: torch.device
    dtype: torch.dtype
    batch_sizes: Optional[tuple[int, ...]]
    quick: bool
    seed: int = 0


Suite = Callable[[SuiteOptions], Iterable[Case]]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    host_ms: Optional[float]
    first_call_s: float
    wall_ms: Optional[float] = None


def gbps(nbytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes a second) of moving `nbytes` in `ms` milliseconds."""
    return nbytes / (ms * 1e6)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e9)


def roofline_ms(nbytes: float, flops: Optional[float], copy_gbps: float, matmul_tflops: Optional[float]) -> float:
    """The least time the run's measured ceilings allow a call: its bytes at the copy bandwidth or
    its FLOPs at the matrix rate, whichever takes longer (bytes alone without either FLOPs or rate)."""
    ms = nbytes / (copy_gbps * 1e6)
    if flops is not None and matmul_tflops:
        ms = max(ms, flops / (matmul_tflops * 1e9))
    return ms


# ---- timing ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _spin_cycles_per_ms(device: torch.device) -> float:
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(device):
        torch.cuda._sleep(1000)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
    return cycles / start.elapsed_time(end)


def wall_calls(iters: int, median_ms: float) -> int:
    """How many wall-latency calls follow `iters` timed calls of median `median_ms`."""
    return min(iters, 1 if median_ms > LONG_CALL_MS else WALL_CALLS)


def _time_cuda(fn: Callable, input_sets: Sequence, device: torch.device, warmup: int, iters: int) -> Timing:
    with torch.cuda.device(device):
        begin = time.perf_counter()
        fn(input_sets[0])
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - begin
        # Peak memory is that of the calls after the first: its one-time work (compiling,
        # autotuning, stacking reward weights) allocates what no later call does.
        torch.cuda.reset_peak_memory_stats(device)

        issue_s = []
        for i in range(warmup):
            torch.cuda.synchronize()
            begin = time.perf_counter()
            fn(input_sets[(i + 1) % len(input_sets)])
            issue_s.append(time.perf_counter() - begin)
        torch.cuda.synchronize()
        spin_ms = min(SPIN_HOST_FACTOR * statistics.median(issue_s) * 1e3 + SPIN_MARGIN_MS, SPIN_MAX_MS)
        spin_cycles = int(spin_ms * _spin_cycles_per_ms(device))

        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        issue_s = []
        for i in range(iters):
            torch.cuda._sleep(spin_cycles)
            starts[i].record()
            begin = time.perf_counter()
            fn(input_sets[i % len(input_sets)])
            issue_s.append(time.perf_counter() - begin)
            ends[i].record()
        torch.cuda.synchronize()
        device_ms = [start.elapsed_time(end) for start, end in zip(starts, ends)]
        # After the timed calls, not among the warm-ups: a call that records a CUDA graph on its
        # second use (t2v_turbo.cuda_graphs) is replaying by now.
        wall_s = []
        for i in range(wall_calls(iters, statistics.median(device_ms))):
            begin = time.perf_counter()
            fn(input_sets[i % len(input_sets)])
            torch.cuda.synchronize()
            wall_s.append(time.perf_counter() - begin)
    return Timing(
        statistics.median(device_ms), statistics.median(issue_s) * 1e3, first_call_s, statistics.median(wall_s) * 1e3
    )


def _time_cpu(fn: Callable, input_sets: Sequence, warmup: int, iters: int) -> Timing:
    begin = time.perf_counter()
    fn(input_sets[0])
    first_call_s = time.perf_counter() - begin
    for i in range(warmup):
        fn(input_sets[(i + 1) % len(input_sets)])
    wall_ms = []
    for i in range(iters):
        begin = time.perf_counter()
        fn(input_sets[i % len(input_sets)])
        wall_ms.append((time.perf_counter() - begin) * 1e3)
    return Timing(statistics.median(wall_ms), None, first_call_s)


def time_fn(fn: Callable, input_sets: Sequence, device: torch.device, warmup: int, iters: int) -> Timing:
    """Median time of `fn(input_set)` over `iters` calls that cycle through `input_sets`, after one
    first call (timed apart: it compiles, autotunes, allocates) and `warmup` >= 1 more."""
    if device.type == "cuda":
        return _time_cuda(fn, input_sets, device, warmup, iters)
    return _time_cpu(fn, input_sets, warmup, iters)


def measure_copy_gbps(device: torch.device, nbytes: int, warmup: int = 3, iters: int = 10) -> float:
    """Bandwidth of one large device-to-device copy, counting the bytes read and those written."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda _: dst.copy_(src), [None], device, warmup, iters)
    return gbps(2 * nbytes, timing.median_ms)


def measure_matmul_tflops(
    device: torch.device, dtype: torch.dtype, size: int, warmup: int = 3, iters: int = 10
) -> float:
    """The matrix rate of one (size x size) @ (size x size) product in `dtype`, TFLOP/s (2 size³ a call)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    timing = time_fn(lambda _: torch.mm(a, b, out=out), [None], device, warmup, iters)
    return tflops(2 * size**3, timing.median_ms)


def busy_fraction(intervals: Iterable[tuple[float, float]]) -> Optional[float]:
    """The share of the span from the first start to the last end that the (start, end) intervals
    cover (overlaps counted once); None without intervals."""
    covered, span_start, reach = 0.0, None, None
    for start, end in sorted(intervals):
        if span_start is None:
            span_start, reach = start, start
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    if span_start is None:
        return None
    return covered / (reach - span_start) if reach > span_start else 1.0


def profile_call(fn: Callable, inputs: Any, device: torch.device, top: int) -> tuple[list[dict], Optional[float]]:
    """One profiled call `fn(inputs)`: its `top` kernels (GPU) or operators (CPU) by their own time,
    and on a GPU the share of the call's span in which some kernel ran (below 1: the GPU waited on
    the host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        fn(inputs)
        if on_gpu:
            torch.cuda.synchronize(device)
    own_us = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    events = sorted((e for e in prof.key_averages() if own_us(e) > 0), key=own_us, reverse=True)
    kernels = [{"name": e.key, "ms": own_us(e) / 1e3, "calls": e.count} for e in events[:top]]
    busy = None
    if on_gpu:
        device_events = (e for e in prof.events() if e.device_type == DeviceType.CUDA)
        busy = busy_fraction((e.time_range.start, e.time_range.end) for e in device_events)
    return kernels, busy


# Where host_profile_call files a function's own time: the package its source file lies in, the
# innermost of these its path names; C functions (torch's operators, tensor methods, builtins)
# under "C functions".
HOST_PACKAGES = ("turbo_kernels", "t2v_turbo", "benchmarks", "triton", "torch")


def host_package(path: str) -> str:
    """The package of the innermost directory of `path` that HOST_PACKAGES names ("torch" for
    .../benchmarks/.venv/.../site-packages/torch/nn/functional.py), else "other"."""
    if path == "~":
        return "C functions"
    parts = Path(path).parts
    start = _package_start(parts)
    return "other" if start is None else parts[start]


def _package_start(parts: tuple[str, ...]) -> Optional[int]:
    """The index of the innermost directory among a path's `parts` that HOST_PACKAGES names."""
    return next((i for i in reversed(range(len(parts) - 1)) if parts[i] in HOST_PACKAGES), None)


def host_profile_call(fn: Callable, inputs: Any, device: torch.device, top: int) -> tuple[list[dict], dict[str, float]]:
    """One call `fn(inputs)` under cProfile: its `top` functions by own time (ms) and the own time
    summed by package (host_package). What an eager call spends issuing its work: Python, and C
    functions such as operators' launches, or a synchronisation (a tensor's item(), say) that
    waits on the device inside the call. cProfile adds a cost to every Python call, so the sums
    exceed an unprofiled call's host time and the shares lean towards code of many small calls:
    compare paths with each other, not with host_ms. No spin kernel runs ahead: where the GPU
    falls behind and the launch queue fills, the launches that wait count as C functions' own
    time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler.enable()
    try:
        fn(inputs)
    finally:
        profiler.disable()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    functions, packages = [], {}
    for (path, line, name), (_, calls, own_s, _, _) in pstats.Stats(profiler).stats.items():
        package = host_package(path)
        packages[package] = packages.get(package, 0.0) + own_s * 1e3
        where = name if path == "~" else f"{_package_relative(path)}:{line}({name})"
        functions.append({"function": where, "ms": own_s * 1e3, "calls": calls})
    functions.sort(key=lambda f: f["ms"], reverse=True)
    return functions[:top], dict(sorted(packages.items(), key=lambda item: item[1], reverse=True))


def _package_relative(path: str) -> str:
    """The path from its package's directory on ("torch/nn/modules/module.py"), else the file name."""
    parts = Path(path).parts
    start = _package_start(parts)
    return "/".join(parts[len(parts) - 1 if start is None else start:])


def format_host_profile(case: Case, impl: Impl, functions: list[dict], packages: dict[str, float]) -> str:
    total_ms = sum(packages.values())
    head = (
        f"host profile of {case.op} {case.case} {case.pass_name} [{impl.name}]: {total_ms:.1f} ms under cProfile; "
        + ", ".join(f"{package} {100 * ms / total_ms:.0f}%" for package, ms in packages.items() if total_ms > 0)
    )
    return "\n".join([head] + [f"  {f['ms']:9.3f} ms {f['calls']:6d}x  {f['function'][:150]}" for f in functions])


def format_profile(case: Case, impl: Impl, kernels: list[dict], busy: Optional[float]) -> str:
    total_ms = sum(k["ms"] for k in kernels)
    head = f"top {len(kernels)} kernels of {case.op} {case.case} {case.pass_name} [{impl.name}]: {total_ms:.3f} ms"
    if busy is not None:
        head += f"; the GPU ran kernels {100 * busy:.0f}% of the call's span"
    return "\n".join([head] + [f"  {k['ms']:9.3f} ms {k['calls']:6d}x  {k['name'][:150]}" for k in kernels])


# ---- memory ----------------------------------------------------------------------------------


class TensorMemoryMeter(TorchDispatchMode):
    """Bytes of the tensor storages that ops create on `device` while the mode is active: the
    level now (`current`) and its maximum (`peak`). A storage counts from the op that creates it
    until it is freed; storages that existed before (inputs, weights, in-place results) never
    count. Works where the allocator keeps no statistics (the CPU); it sees every op that reaches
    the dispatcher, backward and recomputation included. Approximate: it misses memory kernels
    allocate outside tensors and tensors made without an op (torch.tensor of data), counts a
    storage at the size it was created with (not after resize_) and skips tensors without a
    plain strided storage (sparse, nested)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.current = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self._watchers: dict[int, weakref.ref] = {}

    def _on_device(self, tensor: torch.Tensor) -> bool:
        device = tensor.device
        return device.type == self.device.type and (self.device.index is None or device.index == self.device.index)

    def _freed(self, watcher: weakref.ref, nbytes: int) -> None:
        self._watchers.pop(id(watcher), None)
        self.current -= nbytes

    @staticmethod
    def _storage(value: Any) -> Optional[torch.UntypedStorage]:
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            return None
        try:
            return value.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
            return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for value in tree_leaves((args, kwargs)):
            storage = self._storage(value)
            if storage is not None:
                self._seen.add(storage)
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            storage = self._storage(value)
            if storage is None or not self._on_device(value):
                continue
            if storage in self._seen:
                continue
            self._seen.add(storage)
            nbytes = storage.nbytes()
            # torch keeps one Python object per storage, so this fires when the storage is freed.
            watcher = weakref.ref(storage, functools.partial(self._freed, nbytes=nbytes))
            self._watchers[id(watcher)] = watcher
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def working_memory_bytes(fn: Callable, inputs: Any, device: torch.device) -> int:
    """The most memory `fn(inputs)` holds at once beyond what was allocated before the call: on a
    GPU from the caching allocator's statistics (its rounding and workspaces included, less
    whatever the call frees of what existed before), elsewhere from a TensorMemoryMeter."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with TensorMemoryMeter(device) as meter:
        fn(inputs)
    return meter.peak


# ---- running cases ---------------------------------------------------------------------------


def _input_set_count(case: Case, device: torch.device) -> int:
    if device.type != "cuda" or not case.rotate_inputs:
        return 1
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(MAX_INPUT_SETS, math.ceil(L2_MULTIPLE * l2_bytes / case.bytes_moved)))


def _counted_flops(case: Case) -> tuple[Optional[int], Optional[str]]:
    """(case.flops, counted now where it is a callable, None), or (None, the reason) where counting
    fails, which costs the case none of its timings: its rows have no FLOP rate."""
    if not callable(case.flops):
        return case.flops, None
    try:
        return int(case.flops()), None
    except Exception as exc:
        return None, _reason(exc)


class _TotalOnly(contextlib.nullcontext):
    """A stand-in for FlopCounterMode's module tracker that attributes every FLOP to the total:
    the tracker's backward hooks refuse torch.autograd.grad (the motion score's), and a case's
    count needs no per-module breakdown."""

    parents = ("Global",)


def total_flop_counter():
    """torch's FlopCounterMode (its formulas and decompositions), counting the total alone."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalOnly()
    return counter


def _reason(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


@dataclass
class RunSettings:
    device: torch.device
    warmup: int
    iters: int
    impls: Optional[tuple[str, ...]]
    compile_budget_s: float
    profile_top: int = 0
    host_profile_top: int = 0


class _Runner:
    """Times cases. `after_impl` runs after each implementation's row (or skip) is recorded: the
    run's file is rewritten there, so a stage stopped inside a case of several long
    implementations keeps those it measured."""

    def __init__(self, settings: RunSettings, after_impl: Callable[[], None] = lambda: None):
        self.settings = settings
        self.after_impl = after_impl
        self.compile_spent_s = 0.0
        self.rows: list[dict] = []
        self.skipped: list[dict] = []

    def _key(self, case: Case, impl: Impl) -> dict:
        return {"op": case.op, "case": case.case, "impl": impl.name, "pass": case.pass_name}

    def _skip(self, case: Case, impl: Impl, reason: str) -> None:
        self.skipped.append({**self._key(case, impl), "reason": reason})

    def run(self, case: Case) -> None:
        wanted = [i for i in case.impls if self.settings.impls is None or i.name in self.settings.impls]
        runnable = []
        for impl in wanted:
            if impl.unavailable is not None:
                self._skip(case, impl, impl.unavailable)
            else:
                runnable.append(impl)
        if not runnable:
            self.after_impl()
            return
        device = self.settings.device
        try:
            input_sets = [case.make_inputs() for _ in range(_input_set_count(case, device))]
        except Exception as exc:
            for impl in runnable:
                self._skip(case, impl, f"building the inputs failed: {_reason(exc)}")
            _release_memory(device)
            self.after_impl()
            return
        flops, flops_error = _counted_flops(case)
        # The compiling implementations last (in their order): a compile that outlasts the stage
        # then costs only compiled rows.
        for impl in sorted(runnable, key=lambda impl: impl.compiles):
            self._run_impl(case, impl, input_sets, flops, flops_error)
            self.after_impl()
        del input_sets
        _release_memory(device)

    def _run_impl(
        self, case: Case, impl: Impl, input_sets: list, flops: Optional[int], flops_error: Optional[str]
    ) -> None:
        settings = self.settings
        if impl.compiles:
            if self.compile_spent_s >= settings.compile_budget_s:
                self._skip(case, impl, f"compile budget of {settings.compile_budget_s:g} s spent (--compile-budget)")
                return
            # A fresh cache per case: accumulated recompilations would otherwise hit dynamo's
            # recompile limit, after which it silently runs eager code.
            torch.compiler.reset()
        begin = time.perf_counter()
        timing_device = torch.device("cpu") if case.host_only else settings.device
        on_gpu = timing_device.type == "cuda"
        try:
            # A graph variant whose capture failed would time eager calls under its name.
            with warnings.catch_warnings():
                warnings.simplefilter("error", GraphCaptureWarning)
                timing = time_fn(impl.fn, input_sets, timing_device, settings.warmup, settings.iters)
        except Exception as exc:
            if impl.compiles:
                self.compile_spent_s += time.perf_counter() - begin
            self._skip(case, impl, _reason(exc))
            _release_memory(settings.device)
            return
        if impl.compiles:
            self.compile_spent_s += timing.first_call_s
        self.rows.append(
            {
                **self._key(case, impl),
                "median_ms": timing.median_ms,
                "gbps": gbps(case.bytes_moved, timing.median_ms),
                "tflops": None if flops is None else tflops(flops, timing.median_ms),
                "flops": flops,
                "host_ms": timing.host_ms,
                "wall_ms": timing.wall_ms,
                "first_call_s": timing.first_call_s,
                "bytes": case.bytes_moved,
                "dtype": str(case.dtype).removeprefix("torch."),
                "shape": list(case.shape),
                "peak_mem_mb": torch.cuda.max_memory_allocated(settings.device) / MIB if on_gpu else None,
            }
        )
        if flops_error is not None:
            self.rows[-1]["flops_error"] = flops_error
        if case.measure_working_memory:
            self._extra_call(
                "working_mem_error", lambda: working_memory_bytes(impl.fn, input_sets[0], settings.device),
                lambda working: self.rows[-1].update(working_mem_mb=working / MIB),
            )
        if settings.profile_top:

            def record_profile(profile: tuple[list[dict], Optional[float]]) -> None:
                kernels, busy = profile
                self.rows[-1].update(top_kernels=kernels, gpu_busy=busy)
                print(format_profile(case, impl, kernels, busy), flush=True)

            self._extra_call(
                "profile_error", lambda: profile_call(impl.fn, input_sets[0], timing_device, settings.profile_top),
                record_profile,
            )
        if settings.host_profile_top:

            def record_host_profile(profile: tuple[list[dict], dict[str, float]]) -> None:
                functions, packages = profile
                self.rows[-1].update(host_functions=functions, host_packages_ms=packages)
                print(format_host_profile(case, impl, functions, packages), flush=True)

            self._extra_call(
                "host_profile_error",
                lambda: host_profile_call(impl.fn, input_sets[0], timing_device, settings.host_profile_top),
                record_host_profile,
            )

    def _extra_call(self, error_field: str, measure: Callable[[], Any], record: Callable[[Any], None]) -> None:
        """One more call after the timed ones (working memory, a profile): `record` takes what
        `measure` returns, or the row gets its error in `error_field`; the row's timing stands
        whatever happens to the extra call."""
        try:
            result = measure()
        except Exception as exc:
            self.rows[-1][error_field] = _reason(exc)
            _release_memory(self.settings.device)
        else:
            record(result)


# ---- the run's record: JSON, table, plot --------------------------------------------------------

def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def assemble(
    device: torch.device,
    created: datetime.datetime,
    copy_gbps: float,
    rows: list[dict],
    skipped: list[dict],
    settings: dict,
    notes: list[str],
    complete: bool = True,
    matmul_tflops: Optional[float] = None,
) -> dict:
    """The run's record, in the contract of benchmarks/results/README.md: each row with its share
    of the roofline the two measured ceilings draw (roofline_ms); none for a row whose FLOPs run in
    another dtype than the matrix rate was measured in (settings' dtype)."""

    def roofline_pct(row: dict) -> Optional[float]:
        flops = row.get("flops")
        if flops is not None and row.get("dtype") != settings.get("dtype"):
            return None
        return 100 * roofline_ms(row["bytes"], flops, copy_gbps, matmul_tflops) / row["median_ms"]

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "created": created.isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps,
        "matmul_tflops": matmul_tflops,
        "validation": False,
        "settings": settings,
        "notes": notes,
        "rows": [{**row, "roofline_pct": roofline_pct(row)} for row in rows],
        "skipped": skipped,
        "complete": complete,
    }


def _format_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms >= 1 else f"{ms:.4g}"


def _speedup(baseline_ms: Optional[float], ms: float) -> str:
    return "-" if baseline_ms is None else f"{baseline_ms / ms:.2f}x"


def _format_optional(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    """One line a measured row: time, bandwidth and FLOP rate, shares of the copy ceiling and of the
    roofline (runs before the matrix rate was measured have none), speed-ups over the reference."""
    copy = result["copy_gbps"]
    median = {(r["op"], r["case"], r["pass"], r["impl"]): r["median_ms"] for r in result["rows"]}
    header = (
        "op", "case", "impl", "pass", "median ms", "host ms", "wall ms", "GB/s", "% copy", "TFLOP/s", "% roof",
        "vs eager", "vs compile",
    )
    lines, previous_op = [], None
    for r in result["rows"]:
        if previous_op is not None and r["op"] != previous_op:
            lines.append(None)
        previous_op = r["op"]
        group = (r["op"], r["case"], r["pass"])
        lines.append(
            (
                r["op"], r["case"], r["impl"], r["pass"],
                _format_ms(r["median_ms"]),
                _format_ms(r["host_ms"]),
                _format_ms(r.get("wall_ms")),
                f"{r['gbps']:.1f}",
                f"{100 * r['gbps'] / copy:.1f}",
                _format_optional(r.get("tflops"), ".4g"),
                _format_optional(r.get("roofline_pct"), ".1f"),
                _speedup(median.get(group + (EAGER,)), r["median_ms"]),
                _speedup(median.get(group + (COMPILED,)), r["median_ms"]),
            )
        )
    widths = [max(len(cells[i]) for cells in [header] + [c for c in lines if c]) for i in range(len(header))]
    numeric_from = 4

    def render(cells) -> str:
        aligned = (
            cell.ljust(width) if i < numeric_from else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        )
        return "  ".join(aligned).rstrip()

    rule = "-" * len(render(header))
    return "\n".join([render(header), rule] + [render(c) if c else "" for c in lines])


def format_skipped(skipped: list[dict]) -> str:
    groups: dict[tuple[str, str], int] = {}
    for s in skipped:
        groups[(s["impl"], s["reason"])] = groups.get((s["impl"], s["reason"]), 0) + 1
    lines = [f"skipped {len(skipped)} row(s):"]
    lines += [f"  {impl} ({count} row(s)): {reason}" for (impl, reason), count in groups.items()]
    return "\n".join(lines)


def write_result(result: dict, out_dir: Path, created: datetime.datetime) -> Path:
    """benchmarks/results/<device-slug>-<UTC timestamp>.json (CPU runs are "cpu-*", kept out of git)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{device_slug(result['device'])}-{created.strftime('%Y%m%dT%H%M%SZ')}.json"
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, path)
    return path


def plot_result(result: dict, path: Path) -> None:
    """Bars of GB/s per implementation and case, one panel per (op, pass), with the copy ceiling."""
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys((r["op"], r["pass"]) for r in result["rows"]))
    impl_names = list(dict.fromkeys(r["impl"] for r in result["rows"]))
    colors = {name: f"C{i % 10}" for i, name in enumerate(impl_names)}
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(7 * ncols, 3.8 * nrows))
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax, (op, pass_name) in zip(axes, panels):
        rows = [r for r in result["rows"] if (r["op"], r["pass"]) == (op, pass_name)]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        impls = [name for name in impl_names if any(r["impl"] == name for r in rows)]
        width = min(0.8 / len(impls), 0.3)
        for j, name in enumerate(impls):
            offset = (j - (len(impls) - 1) / 2) * width
            points = [(cases.index(r["case"]) + offset, r["gbps"]) for r in rows if r["impl"] == name]
            ax.bar([x for x, _ in points], [y for _, y in points], width, label=name, color=colors[name])
        ax.axhline(result["copy_gbps"], color="black", linestyle="--", linewidth=1,
                   label=f"copy ceiling {result['copy_gbps']:.4g} GB/s")
        ax.set_xticks(range(len(cases)), cases, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op} ({pass_name})", fontsize=10)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{result['device']}, torch {result['torch']}, {result['created']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- command line ------------------------------------------------------------------------------


def _name_list(text: str) -> tuple[str, ...]:
    """The names in the order given, each once."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


def _size_list(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ops", type=_name_list,
        help="comma-separated ops to time, in this order, so that a run cut short has the first ones (default: all)",
    )
    parser.add_argument(
        "--impls", type=_name_list,
        help=f"comma-separated implementations to time, e.g. {EAGER},{COMPILED},triton,cuda (default: all)",
    )
    parser.add_argument(
        "--batch-sizes", type=_size_list,
        help="comma-separated batch sizes (default: the suite's; 1,8,32 on a GPU and 1 on the CPU for latent ops)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="storage dtype (default: bf16 on a GPU, fp32 on the CPU)"
    )
    parser.add_argument(
        "--warmup", type=positive_int, help="untimed calls after the first (default: 10 GPU, 2 CPU)"
    )
    parser.add_argument(
        "--iters", type=positive_int, help="timed calls, of which the median counts (default: 100 GPU, 10 CPU)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and PNG (default: benchmarks/results)"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few calls, no torch.compile (a smoke test)")
    parser.add_argument(
        "--compile-budget", type=float, metavar="SECONDS",
        help="seconds the run may spend compiling; later compiled rows are skipped (default: unlimited on a GPU, "
        "60 on the CPU, 0 with --quick)",
    )
    parser.add_argument(
        "--show", type=Path, nargs="+", metavar="JSON",
        help="time nothing: print the table, the skipped rows and the target lines of saved runs "
        "(e.g. benchmarks/results/*.json)",
    )
    parser.add_argument(
        "--profile", type=positive_int, metavar="N", default=0,
        help="after timing each row, profile one more call and record its N costliest kernels (GPU) or operators "
        "(CPU) in the row's top_kernels and, on a GPU, the share of the call the GPU was busy (gpu_busy); print them",
    )
    parser.add_argument(
        "--profile-host", type=positive_int, metavar="N", default=0,
        help="after timing each row, run one more call under cProfile and record its N functions of most own time "
        "(host_functions) and the own time by package (host_packages_ms): where an eager call's host time goes; print them",
    )


def _check_names(option: str, requested: Optional[tuple[str, ...]], known: set[str]) -> None:
    unknown = sorted(set(requested or ()) - known)
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})")


@contextlib.contextmanager
def _timing_conditions(device: torch.device) -> Iterator[None]:
    """Value checks off (they sync the host); on the CPU, torch.compile compiles in this process,
    since inductor's pool of compile workers would share the cores with the timed calls."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environment(VALIDATE_ENV, "0"))
        if device.type != "cuda":
            from torch._inductor import config as inductor_config

            stack.enter_context(inductor_config.patch(compile_threads=1))
        yield


def _notes(on_gpu: bool, quick: bool) -> list[str]:
    notes = [
        "gbps = bytes / median_ms, where bytes is what an ideal kernel moves: each input read once, each output "
        "written once; copy_gbps counts the copy's reads and writes alike",
        "roofline_pct = the least time the measured ceilings allow (bytes at copy_gbps, or flops at matmul_tflops "
        "where the case counts them, whichever is longer) / median_ms; matmul_tflops is one square matmul in the "
        "run's dtype (rows whose FLOPs run in another dtype have none)",
        f"value checks were off while timing ({VALIDATE_ENV}=0)",
    ]
    if quick:
        notes.append("a --quick run's ceilings (a 16 MiB copy, a 128³ matmul) bound nothing: its roofline_pct "
                     "only shows the arithmetic")
    if on_gpu:
        return notes + [
            "median_ms is device time (wall time for host-only cases, such as video decoding, which have no "
            "host_ms, wall_ms or peak_mem_mb): a spin kernel ahead of each timed call (twice the host's issue time, at "
            f"most {SPIN_MAX_MS:g} ms) keeps the GPU from waiting on the host; host_ms is the host's time to issue "
            "one call (above median_ms: launch-bound on its own); a call of more than about a thousand kernels (the "
            "end-to-end ops) fills the launch queue behind the spin kernel, and its host_ms then includes that "
            "wait: an upper bound; such calls, and those that synchronise inside (sampling, the reward pass), "
            "issue past the spin, so their median_ms includes what the GPU waited on the host; wall_ms is one "
            "call's latency from an idle GPU, issue to the end of its last kernel (median of "
            f"{WALL_CALLS} synchronised calls after the timed ones, 1 for calls over {LONG_CALL_MS:g} ms): well "
            "above median_ms (more than the tens of µs of a launch and a sync), the GPU waited on the host",
            f"inputs rotate over enough sets ({L2_MULTIPLE}x the L2, at most {MAX_INPUT_SETS}) to come from DRAM",
        ]
    return notes + ["median_ms is wall time on the CPU"]


def targets_heading(quick: bool) -> str:
    """The line above a run's target lines: --quick times tiny stand-ins for the target shapes, so
    its verdicts only show the lines work."""
    return "targets (a --quick run's tiny shapes: not the targets' verdict):" if quick else "targets:"


def show(paths: Sequence[Path], summaries: Sequence[Callable[[dict], list[str]]] = ()) -> int:
    """Prints saved runs as `run` printed them: device and versions, the table, the skipped rows
    and the summaries' lines. Returns 2 when a file cannot be read as a run."""
    for index, path in enumerate(paths):
        try:
            result = json.loads(Path(path).read_text())
            rows, copy_gbps = result["rows"], result["copy_gbps"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"--show: {path} is not a benchmark run ({error})", file=sys.stderr)
            return 2
        if index:
            print()
        state = "" if result.get("complete", True) else " (stopped part-way: the cases measured before it)"
        print(f"{path}: {result.get('device')}, torch {result.get('torch')}, triton {result.get('triton')}, "
              f"{result.get('created')}{state}")
        print(f"copy ceiling: {copy_gbps:.1f} GB/s")
        if result.get("matmul_tflops"):
            print(f"matrix rate: {result['matmul_tflops']:.4g} TFLOP/s")
        print(format_table(result) if rows else "no rows")
        if result.get("skipped"):
            print(format_skipped(result["skipped"]))
        target_lines = [line for summary in summaries for line in summary(result)]
        if target_lines:
            print(targets_heading(result.get("settings", {}).get("quick", False)))
            print("\n".join(target_lines))
    return 0


def run(
    args: argparse.Namespace, suites: Sequence[Suite], summaries: Sequence[Callable[[dict], list[str]]] = ()
) -> int:
    """Time every case of `suites` as `args` (from add_arguments) say; print, write JSON and PNG,
    then each summary's lines (end-to-end targets, computed from the rows, never asserted).
    Returns the exit status: 1 when no row could be measured. With --show, print saved runs instead."""
    if args.show:
        return show(args.show, summaries)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"

    def default(value, *, quick, cpu, gpu):
        if value is not None:
            return value
        return quick if args.quick else gpu if on_gpu else cpu

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    settings = RunSettings(
        device=device,
        warmup=default(args.warmup, quick=1, cpu=2, gpu=10),
        iters=default(args.iters, quick=3, cpu=10, gpu=100),
        impls=args.impls,
        compile_budget_s=default(args.compile_budget, quick=0.0, cpu=60.0, gpu=math.inf),
        profile_top=args.profile,
        host_profile_top=args.profile_host,
    )
    copy_bytes = default(None, quick=COPY_BYTES_QUICK, cpu=COPY_BYTES_CPU, gpu=COPY_BYTES_GPU)
    matmul_size = default(None, quick=MATMUL_SIZE_QUICK, cpu=MATMUL_SIZE_CPU, gpu=MATMUL_SIZE_GPU)
    created = datetime.datetime.now(datetime.timezone.utc)

    print(f"device: {device_name(device)}   torch {torch.__version__}   triton {_triton_version()}")
    print(f"value checks off while timing ({VALIDATE_ENV}=0); "
          + ("median = device time (CUDA events), host = time to issue one call" if on_gpu else "median = wall time"))
    with _timing_conditions(device):
        options = SuiteOptions(device, dtype, args.batch_sizes, args.quick)
        cases = [case for suite in suites for case in suite(options)]
        _check_names("--ops", args.ops, {c.op for c in cases})
        _check_names("--impls", args.impls, {i.name for c in cases for i in c.impls})
        copy_gbps = measure_copy_gbps(device, copy_bytes)
        print(f"copy ceiling: {copy_gbps:.1f} GB/s ({copy_bytes // MIB} MiB device-to-device copy, read + write)")
        matmul_tflops = measure_matmul_tflops(device, dtype, matmul_size)
        print(f"matrix rate: {matmul_tflops:.4g} TFLOP/s ({matmul_size}³ {str(dtype).removeprefix('torch.')} matmul)")
        runner = _Runner(settings, after_impl=lambda: write_result(result_so_far(complete=False), args.out, created))
        run_settings = {
            "dtype": str(dtype).removeprefix("torch."),
            "warmup": settings.warmup,
            "iters": settings.iters,
            "quick": args.quick,
            "compile_budget_s": None if math.isinf(settings.compile_budget_s) else settings.compile_budget_s,
            "profile_top": settings.profile_top,
            "host_profile_top": settings.host_profile_top,
        }

        def result_so_far(complete: bool) -> dict:
            return assemble(
                device, created, copy_gbps, runner.rows, runner.skipped, run_settings, _notes(on_gpu, args.quick),
                complete, matmul_tflops,
            )

        if args.ops is not None:
            cases = sorted((case for case in cases if case.op in args.ops), key=lambda case: args.ops.index(case.op))
        for case in cases:
            print(f"  timing {case.op} {case.case} {case.pass_name}", file=sys.stderr, flush=True)
            runner.run(case)

    result = result_so_far(complete=True)

    print()
    print(format_table(result) if result["rows"] else "no row could be measured")
    if result["skipped"]:
        print()
        print(format_skipped(result["skipped"]))
    target_lines = [line for summary in summaries for line in summary(result)]
    if target_lines:
        print()
        print(targets_heading(args.quick))
        print("\n".join(target_lines))
    path = write_result(result, args.out, created)
    print(f"wrote {path}")
    if not args.no_plot and result["rows"]:
        plot_path = path.with_suffix(".png")
        plot_result(result, plot_path)
        print(f"wrote {plot_path}")
    return 0 if result["rows"] else 1
