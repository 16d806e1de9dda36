"""Shared test tools: devices, random batch-first inputs, poisoned outputs and error budgets."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from t2v_turbo import schedule
from turbo_kernels.reference import attention as attention_reference

HAS_GPU = torch.cuda.is_available()
# The reference data the public release produced (vc2_reference, reward_reference): ../shared beside
# the checkout, or where T2V_TURBO_SHARED points (a copy carried to a lent GPU machine).
SHARED = Path(os.environ.get("T2V_TURBO_SHARED") or Path(__file__).resolve().parents[2] / "shared")
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
# Triton's interpreter computes bf16 wrongly, so bf16 kernels are only tested on a GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])

# Absolute slack, relative to the largest reference magnitude, on top of the 2x rule below: one
# rounding of the storage dtype.
STORAGE_EPS = {torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded from the test's parameters, the same in every process (Python's hash()
    of a string is salted per process, so seeds drawn from it change from run to run)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def alphas_cumprod(device=DEVICE, dtype=torch.float32) -> torch.Tensor:
    return schedule.alphas_cumprod(dtype=dtype, device=device)


def random_timesteps(batch: int, generator: torch.Generator, low: int = 0, high: int = 1000) -> torch.Tensor:
    return torch.randint(low, high, (batch,), generator=generator)


def randn(shape, dtype, generator, device=DEVICE, memory_format=torch.contiguous_format) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=memory_format)


@contextlib.contextmanager
def poisoned_triton_outputs(monkeypatch):
    """Make every Triton output buffer start as NaN, so an element the kernel never writes fails."""
    from turbo_kernels.triton_kernels import solver

    monkeypatch.setattr(solver, "new_output", lambda like: torch.full_like(like, float("nan")))
    yield


def poison_cuda_allocator(device=DEVICE, mib: int = 256) -> None:
    """Fill and free blocks of the caching allocator so new CUDA buffers start as NaN: one large
    block, and many small ones for the pool that serves requests of 1 MiB or less."""
    if device.type == "cuda":
        large = torch.full((mib * 2**20 // 4,), float("nan"), device=device)
        small = [torch.full((2**18 // 4,), float("nan"), device=device) for _ in range(256)]
        del large, small


def assert_within_2x_of_reference(out, ref_same_precision, ref64, name: str = "output", magnitude: float | None = None) -> None:
    """The kernel's error against float64 maths must be at most twice the error of the reference
    computed in the same storage precision, plus one rounding of the storage dtype.

    The rounding is taken of `magnitude` when given: the largest term the output is summed from,
    for ops whose output cancels much larger terms. There the reference's error over a handful of
    elements says little about what an equally good kernel, summing in another order, may err by.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == ref_same_precision.dtype, f"{name}: dtype {out.dtype} != {ref_same_precision.dtype}"
    out64 = out.double().cpu()
    ref64 = ref64.double().cpu()
    assert torch.isfinite(out64).all(), f"{name}: non-finite elements (unwritten output?)"
    kernel_err = (out64 - ref64).abs().max().item() if out64.numel() else 0.0
    ref_err = (ref_same_precision.double().cpu() - ref64).abs().max().item() if out64.numel() else 0.0
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    if magnitude is not None:
        scale = max(scale, magnitude)
    budget = 2 * ref_err + STORAGE_EPS[out.dtype] * max(scale, 1.0)
    assert kernel_err <= budget, f"{name}: max error {kernel_err:.3e} > budget {budget:.3e} (reference error {ref_err:.3e})"


def check_temporal_attention(q, k, v, grad_out, out, grads, frames, heads, layout, scale=None):
    """out and grads (of q, k, v) against the reference in q's dtype and in float64."""
    def reference(dtype):
        inputs = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        expected = attention_reference.temporal_attention(*inputs, frames, heads, layout, scale)
        return expected, torch.autograd.grad(expected, inputs, grad_out.to(dtype))

    out_lp, grads_lp = reference(q.dtype)
    out64, grads64 = reference(torch.float64)
    assert_within_2x_of_reference(out, out_lp, out64, "out")
    for name, got, lp, want in zip(("d q", "d k", "d v"), grads, grads_lp, grads64):
        assert_within_2x_of_reference(got, lp, want, name)


class _RecordingKernel:
    """Stands in for a Triton kernel: `kernel[grid](*args, **constexprs)` is recorded, then run."""

    def __init__(self, kernel, launches: list):
        self._kernel = kernel
        self._launches = launches

    def __getitem__(self, grid):
        run = self._kernel[grid]

        def launch(*args, **constexprs):
            self._launches.append((self._kernel, args, constexprs))
            return run(*args, **constexprs)

        return launch

    def __getattr__(self, name):
        return getattr(self._kernel, name)


def record_kernel_launches(monkeypatch, module) -> list:
    """Record every launch of `module`'s *_kernel functions as (kernel, args, constexprs)."""
    launches = []
    for name, obj in list(vars(module).items()):
        if name.endswith("_kernel") and hasattr(obj, "arg_names"):
            monkeypatch.setattr(module, name, _RecordingKernel(obj, launches))
    return launches


def unreported_launches(launches, configs, unit_sizes=(), check_constexprs: bool = True) -> list[str]:
    """The recorded launches that no declared report config (launch_config.KernelConfig) compiles
    as the launcher would: the same signature (pointer dtypes, scalar types, unit strides) and,
    with check_constexprs, the same constexprs and warps. `unit_sizes` names the arguments that are
    1 only in the test's small shapes (declared i32 for production)."""
    from turbo_kernels.triton_kernels.launch_config import UNIT, launch_signature

    def matches(config, launched: dict, constexprs: dict) -> bool:
        declared = dict(config.signature)
        same_signature = declared.keys() == launched.keys() and all(
            kind == launched[name] or (name in unit_sizes and kind == "i32" and launched[name] == UNIT)
            for name, kind in declared.items()
        )
        same_constexprs = not check_constexprs or (
            config.constexprs.items() <= constexprs.items() and constexprs.get("num_warps") == config.num_warps
        )
        return same_signature and same_constexprs

    missing = []
    for kernel, args, constexprs in launches:
        launched = launch_signature(kernel, args, constexprs)
        if not any(config.kernel is kernel and matches(config, launched, constexprs) for config in configs):
            constants = {name: value for name, value in constexprs.items()}
            missing.append(f"{kernel.__name__}: {launched} {constants}")
    return missing


class RecordedGraph:
    """Stands in for a captured CUDA graph on the CPU: replay runs the captured function again and
    writes its result into the outputs handed out at capture, as a graph's replay writes its
    buffers."""

    def __init__(self, fn, outputs, pool):
        self.fn, self.outputs, self.pool_token = fn, outputs, pool
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.outputs.copy_(self.fn())

    def pool(self):
        return ("pool", id(self)) if self.pool_token is None else self.pool_token


def record_graph_captures(monkeypatch) -> list:
    """Makes t2v_turbo.cuda_graphs capture on the CPU: every call with CPU tensors counts as
    graph-able, and each capture is a RecordedGraph appended to the returned list."""
    from t2v_turbo import cuda_graphs

    captures = []

    def capture(fn, device, pool, streams):
        captures.append(RecordedGraph(fn, fn(), pool))
        return captures[-1], captures[-1].outputs

    monkeypatch.setattr(cuda_graphs, "_graph_device", lambda leaves: torch.device("cpu"))
    monkeypatch.setattr(cuda_graphs, "_capture", capture)
    return captures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script_text: str, tmp_path, *args: str, processes: int = 2, expect_failure: bool = False) -> str:
    """Runs the script in `processes` CPU processes; their stdout and stderr together."""
    script = tmp_path / "script.py"
    script.write_text(script_text)
    # torchrun sets the variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) that accelerate reads to run
    # MULTI_CPU over gloo; `accelerate launch --cpu` starts several CPU processes only through mpirun.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(_free_port()), str(script), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert (done.returncode != 0) == expect_failure, done.stderr[-4000:]
    return done.stdout + done.stderr


def run_without_interpreter(*args: str, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python *args` in the repository root, in a process without TRITON_INTERPRET (nor the
    variables in `unset`): Triton's real launch path, which the interpreter replaces."""
    root = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", *unset)}
    env["PYTHONPATH"] = str(root)
    return subprocess.run([sys.executable, *args], env=env, cwd=root, capture_output=True, text=True, timeout=600)


# Ops that read a tensor's value back to the host (on a GPU a synchronisation; a capture refuses them).
DEVICE_READS = frozenset({
    torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten.is_nonzero.default,
})
# Those, and lift_fresh: a tensor made from host data (torch.tensor, as_tensor of a number), which
# on a GPU is a copy from pageable memory.
HOST_READS = DEVICE_READS | {torch.ops.aten.lift_fresh.default}


class RecordedOps(TorchDispatchMode):
    """Records (in `calls`, by name) each call of one of `ops` made while it is active."""

    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))
