"""How a Triton kernel module declares the launch configurations it uses in production.

Each kernel module lists its configurations next to its kernels (`REPORT_CONFIGS`), so tools that
compile them ahead of time (`turbo_kernels.kernel_report`) need no knowledge of the launch
wrappers. This module imports nothing from the report, so kernel modules stay importable alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# Triton's type names for the storage dtypes the ops accept: float32, float16, bfloat16.
STORAGE_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant of a kernel: argument types, constexpr values and warps.

    `signature` maps every non-constexpr argument to a Triton type ("*fp16", "i32", "fp32");
    `dtype` is the storage dtype and `label` names the constexpr values, for reports.
    """

    kernel: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int
    dtype: str
    label: str


def storage_configs(
    kernel, fixed_args: Mapping[str, str], constexprs: Mapping[str, Any], num_warps: int
) -> list[KernelConfig]:
    """One config per storage dtype: arguments in `fixed_args` keep their type, every other
    non-constexpr argument is a `*_ptr` to storage and points to that dtype."""
    unknown = sorted((set(fixed_args) | set(constexprs)) - set(kernel.arg_names))
    if unknown:
        raise ValueError(f"{kernel.__name__} has no arguments {unknown}")
    runtime_args = [name for name in kernel.arg_names if name not in constexprs]
    untyped = [name for name in runtime_args if name not in fixed_args and not name.endswith("_ptr")]
    if untyped:
        raise ValueError(f"{kernel.__name__}: give a type for non-pointer arguments {untyped}")
    label = " ".join(f"{name}={int(value) if isinstance(value, bool) else value}" for name, value in constexprs.items())
    return [
        KernelConfig(
            kernel=kernel,
            signature={name: fixed_args.get(name, f"*{dtype}") for name in runtime_args},
            constexprs=dict(constexprs),
            num_warps=num_warps,
            dtype=dtype,
            label=label,
        )
        for dtype in STORAGE_DTYPES
    ]
