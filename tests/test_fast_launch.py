"""turbo_kernels.triton_kernels.fast_launch: a remembered launch hands Triton's launcher exactly
what Triton's own launch path would, for the kernel Triton compiled for those arguments. Checked on
the CPU with benchmarks.host_cost's driver, which compiles for sm_90a and records each launch
instead of running it; in a process of its own, without TRITON_INTERPRET (under the interpreter
`jit` is triton.jit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from turbo_kernels import kernel_report

_UNAVAILABLE = kernel_report.unavailable_reason()
if _UNAVAILABLE is not None:
    pytest.skip(f"Triton cannot compile for sm_90a here: {_UNAVAILABLE}", allow_module_level=True)

_ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import torch
from triton.runtime.jit import JITFunction

import turbo_kernels
from benchmarks.host_cost import elided_launches
from turbo_kernels.triton_kernels import fast_launch

torch.manual_seed(0)
weight, bias = torch.randn(64), torch.randn(64)
# A view 4 bytes into its storage: not 16-byte aligned, which Triton compiles for separately.
misaligned = torch.randn(16 * 64 + 1)[1:].view(1, 16, 64)
stream = torch.randn(16, 64, 2, 2)
q, k, v = (torch.randn(16, 4, 128) for _ in range(3))
calls = [
    lambda: turbo_kernels.layer_norm(torch.randn(1, 16, 64), weight, bias),
    lambda: turbo_kernels.layer_norm(misaligned, weight, bias),
    lambda: turbo_kernels.layer_norm(torch.randn(1, 24, 64), weight, bias),
    lambda: turbo_kernels.layer_norm(torch.randn(1, 16, 64, dtype=torch.float16), weight.half(), bias.half()),
    lambda: turbo_kernels.group_norm_silu(stream.unflatten(0, (1, 16)).transpose(1, 2), weight, bias, 32, 1e-6),
    lambda: turbo_kernels.geglu(torch.randn(1, 16, 512)),
    lambda: turbo_kernels.temporal_attention(q, k, v, 16, 2),
]


def described(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.stride(), value.data_ptr() % 16 == 0)
    return value


def launches(fast):
    fast_launch.FAST_LAUNCH = fast
    record, compiles = [], []
    run = JITFunction.run

    def counted_run(self, *args, **kwargs):
        compiles.append(self.__name__)
        return run(self, *args, **kwargs)

    JITFunction.run = counted_run
    try:
        with elided_launches(record), turbo_kernels.backend("triton"):
            for _ in range(2):
                for call in calls:
                    call()
    finally:
        JITFunction.run = run
    return [(hash_, grid, tuple(map(described, args))) for hash_, grid, args in record], len(compiles)


triton_path, triton_runs = launches(False)
remembered, remembered_runs = launches(True)
assert triton_runs == len(triton_path), (triton_runs, len(triton_path))
# Every call twice: the second of each is remembered, so Triton's launch path ran for half.
assert remembered_runs == len(remembered) // 2, (remembered_runs, len(remembered))
assert remembered == triton_path, next(
    (i, a, b) for i, (a, b) in enumerate(zip(remembered, triton_path)) if a != b
) if len(remembered) == len(triton_path) else (len(remembered), len(triton_path))
aligned_hash, misaligned_hash = triton_path[0][0], triton_path[1][0]
assert aligned_hash != misaligned_hash, "the misaligned view compiled no kernel of its own"
print("launches", len(remembered))
'''


def test_a_remembered_launch_hands_the_launcher_what_triton_would():
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "TURBO_KERNELS_FAST_LAUNCH")}
    env["PYTHONPATH"] = str(_ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, cwd=_ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "launches" in done.stdout
