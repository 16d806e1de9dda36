"""What the host spends issuing each op's kernels, measured on a CPU with Triton's launches elided.

At batch 1 a VideoCrafter2 UNet forward is bound by the host issuing its kernels (the H200 lease:
the kernels' eager forward took 155 ms, its GPU work 49.6 ms under CUDA graphs). Each op's host
time is its Python (checks, dispatch, the launch wrapper, allocations) plus Triton's own launch
path (binding the arguments, their specialisation, the cache lookup), once a launch. None of that
needs a GPU: `ElidedLaunchDriver` is a Triton driver that compiles for sm_90 and launches nothing,
so an op's Triton path runs on CPU tensors exactly as it would issue its kernels, and a call's
time is host time alone. Each op is timed against the torch composition that the reference UNet
runs in its place, on the same tensors: a few thousand values each, so that the composition's
computing on the CPU adds little to its host time (its rows are an upper bound of that).

    python -m benchmarks.host_cost [--iters N] [--repeats R] [--ops a,b] [--json PATH]

It runs without TRITON_INTERPRET (the interpreter replaces Triton's launch path); host times are
this CPU's, not a GPU host's, and the elided launcher leaves out the C launcher's own few µs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

# Device properties the launch path reads: an H100/H200's shared memory and register file.
_DEVICE_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}
_TARGET_ARCH = 90


def _elided_driver(record: list | None = None):
    """A Triton driver (a DriverBase) that compiles for sm_90 and whose launches do nothing but,
    given a `record` list, append (compiled kernel's hash, grid, kernel arguments) to it."""
    from triton.runtime import driver
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import ty_to_cpp

    class Utils:
        def get_device_properties(self, device):
            return dict(_DEVICE_PROPERTIES)

        def load_binary(self, name, kernel, shared, device):
            # (module, function, registers, spilled registers, most threads a block)
            return 0, 0, 0, 0, 1024

        def unload_module(self, module):
            pass

    def launcher(src, metadata):
        def launch(*args):
            # A compiled kernel keeps the launcher of its first launch: the record is the one of
            # the driver active now. The arguments: grid x, y, z, stream, function, packed
            # metadata, launch metadata, enter hook, exit hook, then the kernel's own.
            active_record = getattr(driver.active, "record", None)
            if active_record is not None:
                active_record.append((metadata.hash, args[:3], args[9:]))

        return launch

    class ElidedLaunchDriver(DriverBase):
        utils = Utils()
        launcher_cls = staticmethod(launcher)

        def __init__(self):
            self.record = record

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", _TARGET_ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("ElidedLaunchDriver runs nothing to time")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    return ElidedLaunchDriver()


@contextlib.contextmanager
def elided_launches(record: list | None = None) -> Iterator[None]:
    """Within: Triton kernels compile for sm_90 and launch nothing (given a `record` list, each
    launch appends to it what the driver's launcher was handed, as `_elided_driver`), and the
    dispatcher lets the Triton backend take CPU tensors (the launches read none of their values)."""
    from triton.runtime import driver

    from turbo_kernels import dispatch

    if dispatch.triton_interpreter_on():
        raise RuntimeError("host_cost needs Triton's launch path: run it without TRITON_INTERPRET")

    takes_cpu = dispatch.machine_unavailable_reason
    # The driver active before, put back as it was: reset_active() would create the machine's own,
    # and a machine without a GPU has none.
    previous = driver._active
    driver.set_active(_elided_driver(record))
    dispatch.machine_unavailable_reason = lambda name, device: None if device.type == "cpu" else takes_cpu(name, device)
    try:
        yield
    finally:
        dispatch.machine_unavailable_reason = takes_cpu
        driver._active = previous


@contextlib.contextmanager
def counted_launches() -> Iterator[list]:
    """The Triton launches made within: (kernel name, seconds in the launch path) each, timed
    from `kernel[grid](...)` (Triton's JITFunction, or turbo_kernels' FastLaunchFunction)."""
    from triton.runtime.jit import JITFunction

    from turbo_kernels.triton_kernels.fast_launch import FastLaunchFunction

    launches: list = []
    # The classes that define the launch (`kernel[grid]`): Triton's base of JITFunction, and ours.
    defining = {next(c for c in cls.__mro__ if "__getitem__" in vars(c)) for cls in (JITFunction, FastLaunchFunction)}
    originals = {cls: vars(cls)["__getitem__"] for cls in defining}

    def timed_getitem(getitem):
        def __getitem__(self, grid):
            launch = getitem(self, grid)

            def timed_launch(*args, **kwargs):
                start = time.perf_counter()
                kernel = launch(*args, **kwargs)
                launches.append((self.__name__, time.perf_counter() - start))
                return kernel

            return timed_launch

        return __getitem__

    for cls, getitem in originals.items():
        cls.__getitem__ = timed_getitem(getitem)
    try:
        yield launches
    finally:
        for cls, getitem in originals.items():
            cls.__getitem__ = getitem


@dataclass(frozen=True)
class HostCase:
    """An op on small CPU tensors (made by `inputs`), and the torch composition in its place."""

    name: str
    inputs: Callable[[], tuple]
    kernels: Callable[..., object]
    composition: Callable[..., object]


def _group_norm_inputs():
    # The UNet hands group_norm_silu the (B, C, F, H, W) view of its (B*F, C, H, W) stream.
    stream = torch.randn(16, 64, 2, 2)
    return stream.unflatten(0, (1, 16)).transpose(1, 2), torch.randn(64), torch.randn(64)


def _group_norm_kernels(x, weight, bias):
    import turbo_kernels

    return turbo_kernels.group_norm_silu(x, weight, bias, 32, 1e-6)


def _group_norm_composition(x, weight, bias):
    return F.silu(F.group_norm(x, 32, weight, bias, 1e-6))


def _layer_norm_inputs():
    return torch.randn(1, 16, 64), torch.randn(64), torch.randn(64)


def _layer_norm_kernels(x, weight, bias):
    import turbo_kernels

    return turbo_kernels.layer_norm(x, weight, bias, 1e-5)


def _layer_norm_composition(x, weight, bias):
    return F.layer_norm(x, x.shape[-1:], weight, bias, 1e-5)


def _geglu_inputs():
    return (torch.randn(1, 16, 512),)


def _geglu_kernels(h):
    import turbo_kernels

    return turbo_kernels.geglu(h)


def _geglu_composition(h):
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


def _temporal_attention_inputs():
    # (B*F, N, heads*d) as the stream lays tokens out: 16 frames of 4 positions, 2 heads of 64.
    return tuple(torch.randn(16, 4, 128) for _ in range(3))


def _temporal_attention_kernels(q, k, v):
    import turbo_kernels

    return turbo_kernels.temporal_attention(q, k, v, 16, 2)


def _temporal_attention_composition(q, k, v):
    def sequences(t):  # (B*F, N, h*d) -> (B*N, h, F, d), as the reference layout permutes it
        return t.unflatten(0, (-1, 16)).unflatten(-1, (2, 64)).permute(0, 2, 3, 1, 4).flatten(0, 1)

    out = F.scaled_dot_product_attention(sequences(q), sequences(k), sequences(v))
    return out.unflatten(0, (-1, 4)).permute(0, 3, 1, 2, 4).flatten(0, 1).flatten(-2).contiguous()


CASES = (
    HostCase("group_norm_silu", _group_norm_inputs, _group_norm_kernels, _group_norm_composition),
    HostCase("layer_norm", _layer_norm_inputs, _layer_norm_kernels, _layer_norm_composition),
    HostCase("geglu", _geglu_inputs, _geglu_kernels, _geglu_composition),
    HostCase("temporal_attention", _temporal_attention_inputs, _temporal_attention_kernels,
             _temporal_attention_composition),
)


def _per_call_us(fn: Callable[[], object], iters: int, repeats: int = 5) -> float:
    """The least, over `repeats` runs of `iters` calls, mean µs a call (the least is the one
    least disturbed by the machine's other work)."""
    return _interleaved_per_call_us({"fn": (contextlib.nullcontext, fn)}, iters, repeats)["fn"]


def _interleaved_per_call_us(
    fns: dict[str, tuple[Callable[[], contextlib.AbstractContextManager], Callable[[], object]]], iters: int,
    repeats: int = 5,
) -> dict[str, float]:
    """_per_call_us of each (context, function), the function's runs inside its context (entered
    outside the timing) and taking turns (so that a slow spell of the machine falls on all alike)."""
    for context, fn in fns.values():
        with context():
            for _ in range(max(1, iters // 10)):
                fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, (context, fn) in fns.items():
            with context():
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / iters)
    return {name: seconds * 1e6 for name, seconds in best.items()}


@contextlib.contextmanager
def _triton_launch_path() -> Iterator[None]:
    """Within: every kernel launches through Triton's own launch path, not FastLaunchFunction's
    remembered launches."""
    from turbo_kernels.triton_kernels import fast_launch

    enabled = fast_launch.FAST_LAUNCH
    fast_launch.FAST_LAUNCH = False
    try:
        yield
    finally:
        fast_launch.FAST_LAUNCH = enabled


def measure(case: HostCase, iters: int, repeats: int = 5) -> dict:
    """The case's host µs a call, with the launches elided: the kernels' path forward (launching
    as it does, and through Triton's own launch path alone), and forward+backward, against the
    torch composition; the kernels' launches a call, and the µs a forward spends launching (from
    a run of its own, with a timer around each launch)."""
    import turbo_kernels

    inputs = case.inputs()
    grad_inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)

    def forward_backward(fn):
        def call():
            fn(*grad_inputs).sum().backward()

        return call

    with elided_launches(), turbo_kernels.backend("triton"):
        case.kernels(*inputs)  # compiles
        forward_backward(case.kernels)()
        with counted_launches() as forward_launches:
            for _ in range(iters):
                case.kernels(*inputs)
        with counted_launches() as backward_launches:
            forward_backward(case.kernels)()
        forward = _interleaved_per_call_us(
            {
                "kernels": (contextlib.nullcontext, lambda: case.kernels(*inputs)),
                "triton": (_triton_launch_path, lambda: case.kernels(*inputs)),
            },
            iters,
            repeats,
        )
        row = {
            "op": case.name,
            "kernels_fwd_us": forward["kernels"],
            "kernels_triton_launch_path_fwd_us": forward["triton"],
            "kernels_fwd_bwd_us": _per_call_us(forward_backward(case.kernels), iters, repeats),
            "launches_fwd": len(forward_launches) // iters,
            "launching_fwd_us": sum(seconds for _, seconds in forward_launches) / iters * 1e6,
            "launches_fwd_bwd": len(backward_launches),
        }
    row["composition_fwd_us"] = _per_call_us(lambda: case.composition(*inputs), iters, repeats)
    row["composition_fwd_bwd_us"] = _per_call_us(forward_backward(case.composition), iters, repeats)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=500, help="calls a timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs a measurement takes the least of")
    parser.add_argument("--ops", default=",".join(case.name for case in CASES), help="comma-separated op names")
    parser.add_argument("--json", help="write the rows here as well")
    args = parser.parse_args(argv)
    known = {case.name: case for case in CASES}
    names = [name for name in args.ops.split(",") if name]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {sorted(known)}")
    torch.set_num_threads(1)
    rows = [measure(known[name], args.iters, args.repeats) for name in names]
    print(f"host µs a call on this CPU ({args.iters} calls, least of {args.repeats} runs), Triton's launches elided")
    print(f"{'op':20} {'kernels fwd':>12} {'(launching)':>12} {'via triton.run':>15} {'torch fwd':>10} "
          f"{'launches':>9} {'kernels fwd+bwd':>16} {'torch fwd+bwd':>14} {'launches':>9}")
    for row in rows:
        print(f"{row['op']:20} {row['kernels_fwd_us']:12.1f} {row['launching_fwd_us']:12.1f} "
              f"{row['kernels_triton_launch_path_fwd_us']:15.1f} {row['composition_fwd_us']:10.1f} "
              f"{row['launches_fwd']:9d} {row['kernels_fwd_bwd_us']:16.1f} {row['composition_fwd_bwd_us']:14.1f} "
              f"{row['launches_fwd_bwd']:9d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
