"""turbo_kernels.triton_kernels.fast_launch: a remembered launch hands Triton's launcher the grid
and kernel arguments Triton's own launch path would, for the kernel Triton compiled for them. Checked on
the CPU with benchmarks.host_cost's driver, which compiles for sm_90a and records each launch
instead of running it; in a process of its own, without TRITON_INTERPRET (under the interpreter
`jit` is triton.jit)."""

from __future__ import annotations

import pytest

from tests.helpers import run_without_interpreter
from turbo_kernels import kernel_report

_UNAVAILABLE = kernel_report.unavailable_reason()
if _UNAVAILABLE is not None:
    pytest.skip(f"Triton cannot compile for sm_90a here: {_UNAVAILABLE}", allow_module_level=True)

_SCRIPT = r'''
import torch
from triton.runtime.jit import JITFunction

import turbo_kernels
from benchmarks.host_cost import elided_launches
from turbo_kernels.triton_kernels import fast_launch
from turbo_kernels.triton_kernels.layer_norm import layer_norm_fwd_kernel

torch.manual_seed(0)
inputs = {
    "weight": torch.randn(64), "bias": torch.randn(64), "x16": torch.randn(1, 16, 64), "x24": torch.randn(1, 24, 64),
    # A view 4 bytes into its storage: not 16-byte aligned, which Triton compiles for separately.
    "misaligned": torch.randn(16 * 64 + 1)[1:].view(1, 16, 64),
    "x16_fp16": torch.randn(1, 16, 64, dtype=torch.float16), "weight_fp16": torch.randn(64, dtype=torch.float16),
    "bias_fp16": torch.randn(64, dtype=torch.float16), "stream": torch.randn(16, 64, 2, 2), "h": torch.randn(1, 16, 512),
    "q": torch.randn(16, 4, 128), "k": torch.randn(16, 4, 128), "v": torch.randn(16, 4, 128), "out": torch.empty(16, 64),
}
names = {t.data_ptr(): name for name, t in inputs.items()}
x = inputs["x16"].view(16, 64)
w, b, out = inputs["weight"], inputs["bias"], inputs["out"]
ops = [
    lambda: turbo_kernels.layer_norm(inputs["x16"], w, b),
    lambda: turbo_kernels.layer_norm(inputs["misaligned"], w, b),
    lambda: turbo_kernels.layer_norm(inputs["x24"], w, b),
    lambda: turbo_kernels.layer_norm(inputs["x16_fp16"], inputs["weight_fp16"], inputs["bias_fp16"]),
    lambda: turbo_kernels.group_norm_silu(inputs["stream"].unflatten(0, (1, 16)).transpose(1, 2), w, b, 32, 1e-6),
    lambda: turbo_kernels.geglu(inputs["h"]),
    lambda: turbo_kernels.temporal_attention(inputs["q"], inputs["k"], inputs["v"], 16, 2),
    # The same positional arguments with other constexprs or warps: other kernels.
    lambda: layer_norm_fwd_kernel[(2,)](x, w, b, out, 16, 64, 64, 1e-5, BLOCK_ROWS=8, BLOCK_CHANNELS=64, num_warps=4),
    lambda: layer_norm_fwd_kernel[(2,)](x, w, b, out, 16, 64, 64, 1e-5, BLOCK_ROWS=8, BLOCK_CHANNELS=64, num_warps=2),
    lambda: layer_norm_fwd_kernel[(1,)](x, w, b, out, 16, 64, 64, 1e-5, BLOCK_ROWS=16, BLOCK_CHANNELS=64, num_warps=4),
]
# Runtime arguments by keyword: never remembered, each launch goes through Triton.
unkeyed = [
    lambda: layer_norm_fwd_kernel[(2,)](x, w, b, out, rows=16, channels=64, x_row_stride=64, eps=1e-5, BLOCK_ROWS=8,
                                        BLOCK_CHANNELS=64, num_warps=4),
]


def described(value):
    # Inputs by name (a swap shows); outputs, new each run, by what Triton specialises and their layout.
    if isinstance(value, torch.Tensor):
        return names.get(value.data_ptr()) or ("output", value.dtype, tuple(value.shape), value.stride(),
                                               value.data_ptr() % 16 == 0)
    return value


def launches(fast):
    fast_launch.FAST_LAUNCH = fast
    record, runs = [], []
    run = JITFunction.run

    def counted_run(self, *args, **kwargs):
        runs.append(self.__name__)
        return run(self, *args, **kwargs)

    JITFunction.run = counted_run
    try:
        with elided_launches(record), turbo_kernels.backend("triton"):
            for _ in range(2):
                for call in ops + unkeyed:
                    call()
    finally:
        JITFunction.run = run
    return [(hash_, grid, tuple(map(described, args))) for hash_, grid, args in record], len(runs)


triton_path, triton_runs = launches(False)
remembered, remembered_runs = launches(True)
assert triton_runs == len(triton_path), (triton_runs, len(triton_path))
# Every call twice: the second launch of each keyed one is remembered, so Triton's launch path
# ran for half of those, and for every unkeyed launch.
assert remembered_runs == len(remembered) // 2 + len(unkeyed), (remembered_runs, len(remembered))
assert len(remembered) == len(triton_path), (len(remembered), len(triton_path))
different = [(i, a, b) for i, (a, b) in enumerate(zip(remembered, triton_path)) if a != b]
assert not different, different[:2]
aligned_hash, misaligned_hash = triton_path[0][0], triton_path[1][0]
assert aligned_hash != misaligned_hash, "the misaligned view compiled no kernel of its own"
direct = len(triton_path) // 2 - len(unkeyed) - 3
assert len({hash_ for hash_, _, _ in triton_path[direct:direct + 3]}) == 3, "other constexprs or warps, same kernel"
print("launches", len(remembered))
'''


def test_a_remembered_launch_hands_the_launcher_what_triton_would():
    done = run_without_interpreter("-c", _SCRIPT, unset=("TURBO_KERNELS_FAST_LAUNCH",))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "launches" in done.stdout
