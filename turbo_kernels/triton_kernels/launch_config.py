"""How a Triton kernel module declares the launch configurations it uses in production.

Each kernel module lists its configurations next to its kernels (`REPORT_CONFIGS`), so tools that
compile them ahead of time (`turbo_kernels.kernel_report`) need no knowledge of the launch
wrappers. This module imports nothing from the report, so kernel modules stay importable alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

# Triton's type names for the storage dtypes the ops accept: float32, float16, bfloat16.
STORAGE_DTYPES = ("fp32", "fp16", "bf16")
# Triton's launcher compiles an integer argument equal to 1 as that constant (so a unit stride
# becomes a contiguous, vectorisable access); a config marks such an argument with this value.
UNIT = 1

Signature = Mapping[str, Union[str, int]]


# Launch wrappers size grids and tiles with these rather than triton.cdiv and
# triton.next_power_of_2: those are constexpr functions, whose every host call unwraps its
# arguments as constexprs (a few µs each, and a GroupNorm + SiLU made a dozen such calls), and the
# host issuing the kernels is what bounds a UNet forward at batch 1.
def cdiv(numerator: int, denominator: int) -> int:
    """ceil(numerator / denominator), as triton.cdiv."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The least power of two at least n (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant of a kernel: argument types, constexpr values and warps.

    `signature` maps every non-constexpr argument to a Triton type ("*fp16", "i32", "fp32"), or to
    UNIT for an integer that is 1 in production (a unit stride, compiled as the constant 1 as
    Triton's launcher does); `dtype` is the storage dtype and `label` names the constexpr values and
    unit arguments, for reports.
    """

    kernel: Any
    signature: Signature
    constexprs: Mapping[str, Any]
    num_warps: int
    dtype: str
    label: str


def storage_configs(
    kernel, fixed_args: Signature, constexprs: Mapping[str, Any], num_warps: int
) -> list[KernelConfig]:
    """One config per storage dtype: arguments in `fixed_args` keep their type (or UNIT), every
    other non-constexpr argument is a `*_ptr` to storage and points to that dtype."""
    unknown = sorted((set(fixed_args) | set(constexprs)) - set(kernel.arg_names))
    if unknown:
        raise ValueError(f"{kernel.__name__} has no arguments {unknown}")
    runtime_args = [name for name in kernel.arg_names if name not in constexprs]
    untyped = [name for name in runtime_args if name not in fixed_args and not name.endswith("_ptr")]
    if untyped:
        raise ValueError(f"{kernel.__name__}: give a type for non-pointer arguments {untyped}")
    units = {name: UNIT for name, kind in fixed_args.items() if kind == UNIT}
    label = " ".join(
        f"{name}={int(value) if isinstance(value, bool) else value}" for name, value in {**constexprs, **units}.items()
    )
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


def launch_signature(kernel, args: Sequence[Any], constexprs: Mapping[str, Any]) -> dict[str, Union[str, int]]:
    """The signature, in KernelConfig's terms, that Triton's launcher specialises a launch
    `kernel[grid](*args, **constexprs)` to, by Triton's own rules less its divisibility-by-16
    hints: integers equal to 1 as UNIT. Tests compare production launches with the declared
    configs through it."""
    from triton.runtime.jit import mangle_type

    runtime_args = [name for name in kernel.arg_names if name not in constexprs]
    if len(args) != len(runtime_args):
        raise ValueError(f"{kernel.__name__} takes {len(runtime_args)} runtime arguments, got {len(args)}")
    return {
        name: UNIT if isinstance(value, int) and not isinstance(value, bool) and value == 1
        else mangle_type(value, True)
        for name, value in zip(runtime_args, args)
    }
