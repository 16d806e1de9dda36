"""Registers, spills and shared memory of every production Triton kernel, compiled ahead of time.

Each module in KERNEL_MODULES declares `REPORT_CONFIGS` (see triton_kernels/launch_config.py).
Every configuration is compiled for sm_90a without a GPU; ptxas then reports registers and
spills (a CompiledKernel only learns its register count when loaded onto a device). SASS
instructions are counted in the cubin's code section rather than disassembled: a disassembler run
costs ~0.5 s a kernel, ten times the rest. Tensor-core use is read from the PTX, the only way
Triton reaches tensor cores: Hopper's asynchronous warpgroup products (wgmma), or the synchronous
warp products of earlier GPUs (mma), which Triton emits on Hopper for tiles too small for a
warpgroup and which reach about half of Hopper's tensor-core rate.

    python -m turbo_kernels.kernel_report [--json PATH]

prints the table and exits non-zero when any kernel spills registers.

Pointer arguments and integer sizes are compiled as divisible by 16, the specialisation Triton's
launcher picks for contiguous torch tensors and for most of the latent sizes used in production
(not for the 40 tokens a frame of the 5x8 middle block, whose launches lack that hint); without it
the loads are not vectorised and the register counts would not be the production ones.
Integers that are 1 in production (unit strides, declared UNIT) are compiled as the constant 1,
as the launcher does; tests check the declared signatures against recorded production launches.

Under TRITON_INTERPRET=1 (the CPU test suite) `@triton.jit` gives interpreter objects that cannot
be compiled, so `collect()` then compiles in a child process without that variable.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from turbo_kernels.triton_kernels.launch_config import UNIT

KERNEL_MODULES = (
    "turbo_kernels.triton_kernels.solver",
    "turbo_kernels.triton_kernels.temporal_attention",
    "turbo_kernels.triton_kernels.motion_energy",
    "turbo_kernels.triton_kernels.group_norm",
    "turbo_kernels.triton_kernels.geglu",
    "turbo_kernels.triton_kernels.layer_norm",
    "turbo_kernels.triton_kernels.spatial_attention",
    "turbo_kernels.triton_kernels.preprocess",
)

CAPABILITY = 90
GPU_NAME = "sm_90a"
WARP_SIZE = 32

# An mma / wgmma instruction, possibly predicated, at the start of a PTX line.
_TENSOR_CORE_PTX = re.compile(r"^\s*(?:@!?%\w+\s+)?(wgmma|mma)\.", re.MULTILINE)
# Since Volta every SASS instruction is 16 bytes with the opcode in the low 12 bits; NOP (0x918)
# is alignment padding and not counted.
_SASS_OPCODE_MASK = 0xFFF
_SASS_NOP_OPCODE = 0x918


@dataclass(frozen=True)
class KernelReportRow:
    module: str
    kernel: str
    label: str
    dtype: str
    num_warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_cores: str
    sass_instructions: int


@dataclass(frozen=True)
class PtxasUsage:
    registers: int
    spill_bytes: int
    static_shared_bytes: int


def parse_ptxas_log(log: str) -> PtxasUsage:
    """Registers, spilled bytes (stores + loads) and static shared memory from `ptxas -v` output."""
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    if not registers:
        raise ValueError(f"no register count in ptxas output:\n{log}")
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return PtxasUsage(
        registers=max(registers),
        spill_bytes=sum(int(stores) + int(loads) for stores, loads in spills),
        static_shared_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes smem", log)),
    )


def find_tool(name: str) -> Optional[str]:
    """A CUDA binary tool: the one bundled with Triton (it matches Triton's PTX version), else
    the CUDA toolkit's, else PATH."""
    import triton

    candidates = (
        Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name,
        Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name,
    )
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def unavailable_reason() -> Optional[str]:
    """Why the report cannot be made on this machine, or None if it can."""
    try:
        import triton
        from triton.backends.compiler import BaseBackend
        from triton.compiler import ASTSource
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    if "constexprs" not in inspect.signature(ASTSource).parameters or not hasattr(BaseBackend, "parse_attr"):
        return (
            f"triton {triton.__version__} lacks ASTSource(fn, signature, constexprs, attrs) with name-keyed "
            "constexprs and BaseBackend.parse_attr, the compile format the report uses (triton 3.6 to 3.8 have it)"
        )
    if find_tool("ptxas") is None:
        return "ptxas not found (neither bundled with triton nor in $CUDA_HOME/bin nor on PATH)"
    return None


def _ptxas_usage(ptx: str) -> PtxasUsage:
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        ptx_path = Path(tmp) / "kernel.ptx"
        ptx_path.write_text(ptx)
        cubin_path = Path(tmp) / "kernel.cubin"
        args = [find_tool("ptxas"), "-v", f"--gpu-name={GPU_NAME}", str(ptx_path), "-o", str(cubin_path)]
        result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return parse_ptxas_log(result.stdout + result.stderr)


def _code_section(cubin: bytes, kernel_name: str) -> bytes:
    """The `.text.<kernel_name>` section of a cubin, a little-endian ELF64."""
    (section_headers,) = struct.unpack_from("<Q", cubin, 0x28)
    header_size, n_sections, names_index = struct.unpack_from("<HHH", cubin, 0x3A)

    def section(index):
        name, _type, _flags, _address, offset, size = struct.unpack_from(
            "<IIQQQQ", cubin, section_headers + index * header_size
        )
        return name, offset, size

    names_offset = section(names_index)[1]
    wanted = f".text.{kernel_name}".encode()
    for index in range(n_sections):
        name, offset, size = section(index)
        start = names_offset + name
        if cubin[start : cubin.index(b"\0", start)] == wanted:
            return cubin[offset : offset + size]
    raise ValueError(f"cubin has no section {wanted.decode()}")


def sass_instruction_count(cubin: bytes, kernel_name: str) -> int:
    """Instructions of the kernel in the cubin, padding NOPs left out."""
    code = _code_section(cubin, kernel_name)
    return sum(
        1
        for (first_word, _) in struct.iter_unpack("<QQ", code)
        if first_word & _SASS_OPCODE_MASK != _SASS_NOP_OPCODE
    )


def tensor_core_instructions(ptx: str) -> str:
    """Which tensor-core instructions the kernel issues: "wgmma", "mma", "wgmma+mma" or "no"."""
    kinds = set(_TENSOR_CORE_PTX.findall(ptx))
    return "+".join(kind for kind in ("wgmma", "mma") if kind in kinds) or "no"


def _compile(config, target, backend):
    """Compile one KernelConfig in the format JITFunction itself uses on triton 3.6 to 3.8 (checked
    by unavailable_reason): the signature names every argument and types constexprs "constexpr",
    constexprs are keyed by name, attributes by argument-index path. UNIT arguments are compiled
    as the constant 1, as the launcher specialises them."""
    import triton
    from triton.compiler import ASTSource

    fn = config.kernel
    units = {name: UNIT for name, kind in config.signature.items() if kind == UNIT}
    signature = {name: "constexpr" if name in units else config.signature.get(name, "constexpr") for name in fn.arg_names}
    divisible_by_16 = backend.parse_attr("D")
    attrs = {
        (index,): divisible_by_16
        for index, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or signature[name] in ("i32", "i64")
    }
    source = ASTSource(fn, signature, {**config.constexprs, **units}, attrs)
    return triton.compile(source, target=target, options={"num_warps": config.num_warps})


def _report_row(module_name: str, config, compiled) -> KernelReportRow:
    usage = _ptxas_usage(compiled.asm["ptx"])
    return KernelReportRow(
        module=module_name,
        kernel=config.kernel.__name__,
        label=config.label,
        dtype=config.dtype,
        num_warps=config.num_warps,
        registers=usage.registers,
        spill_bytes=usage.spill_bytes,
        shared_bytes=compiled.metadata.shared + usage.static_shared_bytes,
        tensor_cores=tensor_core_instructions(compiled.asm["ptx"]),
        sass_instructions=sass_instruction_count(compiled.asm["cubin"], compiled.metadata.name),
    )


def _declared_configs() -> list[tuple[str, list]]:
    return [(name, importlib.import_module(name).REPORT_CONFIGS) for name in KERNEL_MODULES]


def _compilable(declared) -> bool:
    from triton.runtime.jit import JITFunction

    return all(isinstance(config.kernel, JITFunction) for _, configs in declared for config in configs)


def _collect_in_child() -> list[KernelReportRow]:
    """Run the report in a child process without TRITON_INTERPRET and read back its JSON rows
    (written even when a kernel spills, which makes the child exit 1)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        rows_path = Path(tmp) / "rows.json"
        result = subprocess.run(
            [sys.executable, "-m", "turbo_kernels.kernel_report", "--json", str(rows_path)],
            capture_output=True,
            text=True,
            env=env,
        )
        if not rows_path.exists():
            raise RuntimeError(f"kernel report child process failed ({result.returncode}):\n{result.stderr}")
        return [KernelReportRow(**row) for row in json.loads(rows_path.read_text())]


def collect() -> list[KernelReportRow]:
    """Compile every declared configuration for sm_90a and report its resource use."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"kernel report unavailable: {reason}")
    declared = _declared_configs()
    if not _compilable(declared):
        return _collect_in_child()

    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", CAPABILITY, WARP_SIZE)
    backend = make_backend(target)
    return [
        _report_row(module_name, config, _compile(config, target, backend))
        for module_name, configs in declared
        for config in configs
    ]


def format_table(rows: list[KernelReportRow]) -> str:
    header = ("kernel", "config", "dtype", "warps", "regs", "spill B", "smem B", "TC", "SASS")
    body = [
        (
            row.kernel,
            row.label,
            row.dtype,
            str(row.num_warps),
            str(row.registers),
            str(row.spill_bytes),
            str(row.shared_bytes),
            row.tensor_cores,
            str(row.sass_instructions),
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    justify = [str.ljust] * 3 + [str.rjust] * (len(header) - 3)

    def line(cells):
        return "  ".join(pad(cell, width) for pad, cell, width in zip(justify, cells, widths))

    modules = sorted({row.module for row in rows})
    title = f"Triton kernels compiled for {GPU_NAME} ({', '.join(modules)})"
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, body)])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbo_kernels.kernel_report", description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args(argv)

    rows = collect()
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    spilling = [row for row in rows if row.spill_bytes]
    if spilling:
        print("\nregister spills:", file=sys.stderr)
        for row in spilling:
            config = f"{row.label}, {row.dtype}, {row.num_warps} warps"
            print(f"  {row.module}.{row.kernel} [{config}]: {row.spill_bytes} bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
