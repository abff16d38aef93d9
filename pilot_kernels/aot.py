"""Compile the kernels ahead of time for real GPUs, without one: PTX, ptxas resource usage, access widths.

    python -m pilot_kernels.aot            # table for sm_80 and sm_90a, plain and GradScaler (amp) variants
    python -m pilot_kernels.aot --json     # the same as JSON

Pointer arguments get ``tt.divisibility = 16``, as the JIT specialises them for allocations from torch.
Must run without TRITON_INTERPRET (the interpreter replaces the kernels with Python functions).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import pilot_sgd

ARCHS = (80, 90)
_TRITON_POINTER = {torch.int64: "*i64", torch.int32: "*i32", torch.float32: "*fp32"}
# The kernel's pointer arguments in order, typed as launch_pilot_sgd passes them.
_POINTER_TYPES = {name: _TRITON_POINTER[dtype] for name, dtype in (
    ("tensor_table_ptr", pilot_sgd.TENSOR_TABLE_DTYPE), ("hyper_ptr", pilot_sgd.HYPER_TABLE_DTYPE),
    ("block_table_ptr", pilot_sgd.BLOCK_TABLE_DTYPE), ("factor_ptr", torch.float32), ("momentum_ptr", torch.float32),
    ("l1_ptr", torch.float32), ("nnz_ptr", torch.int64), ("started_ptr", torch.int32),
    ("grad_scale_ptr", torch.float32), ("found_inf_ptr", torch.float32))}
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class KernelReport:
    """What the compiled kernel looks like for one GPU architecture and parameter dtype."""

    arch: str
    x_dtype: str
    amp: bool  # the GradScaler variant: unscale on load, skip on found_inf
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    loads_by_bits: dict[int, int] = field(default_factory=dict)  # global load instructions per access width
    stores_by_bits: dict[int, int] = field(default_factory=dict)


def arch_name(arch: int) -> str:
    """ptxas' name: sm_90a for Hopper (Triton emits sm_90a PTX there), sm_<arch> otherwise."""
    return f"sm_{arch}a" if arch == 90 else f"sm_{arch}"


def compile_pilot_sgd(arch: int, x_dtype: torch.dtype, *, grad_scale: bool = False, found_inf: bool = False) -> str:
    """The PTX of ``pilot_sgd_kernel`` for ``cuda`` compute capability ``arch`` (e.g. 80, 90)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compilation needs the real kernels: unset TRITON_INTERPRET")
    signature = dict(_POINTER_TYPES, X_DTYPE="constexpr", BLOCK="constexpr", HAS_GRAD_SCALE="constexpr",
                     HAS_FOUND_INF="constexpr")
    constexprs = {"X_DTYPE": pilot_sgd.TORCH_TO_TRITON_DTYPE[x_dtype], "BLOCK": pilot_sgd.BLOCK_SIZE,
                  "HAS_GRAD_SCALE": grad_scale, "HAS_FOUND_INF": found_inf}
    attrs = {(index,): [["tt.divisibility", 16]] for index in range(len(_POINTER_TYPES))}
    source = ASTSource(pilot_sgd.pilot_sgd_kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": pilot_sgd.NUM_WARPS})
    return compiled.asm["ptx"]


def ptxas_path() -> str:
    """The ptxas that ships with Triton's NVIDIA backend."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) that ``ptxas -v`` reports for the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas_path(), "-v", f"-arch={arch_name(arch)}", path, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    registers = _PTXAS_REGISTERS.search(result.stderr)
    spills = _PTXAS_SPILLS.search(result.stderr)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{result.stderr}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def global_access_widths(ptx: str) -> tuple[dict[int, int], dict[int, int]]:
    """Global load and store instructions of the PTX, counted per access width in bits (e.g. v4.b32 -> 128)."""
    counts = {"ld": collections.Counter(), "st": collections.Counter()}
    for op, suffixes in _ACCESS.findall(ptx):
        parts = suffixes.split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p))
        counts[op][lanes * bits] += 1
    return dict(counts["ld"]), dict(counts["st"])


def report(arch: int, x_dtype: torch.dtype, amp: bool = False) -> KernelReport:
    """Compile for ``arch`` and summarise registers, spills and access widths."""
    ptx = compile_pilot_sgd(arch, x_dtype, grad_scale=amp, found_inf=amp)
    registers, spill_stores, spill_loads = ptxas_usage(ptx, arch)
    loads, stores = global_access_widths(ptx)
    return KernelReport(arch_name(arch), str(x_dtype).replace("torch.", ""), amp, registers, spill_stores,
                        spill_loads, loads, stores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    reports = [report(arch, dtype, amp) for arch in ARCHS for dtype in pilot_sgd.TORCH_TO_TRITON_DTYPE
               for amp in (False, True)]
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
        return
    print(f"{'arch':8} {'dtype':9} {'amp':3} {'regs':>4} {'spills':>6}  global loads / stores by width (bits: count)")
    for r in reports:
        print(f"{r.arch:8} {r.x_dtype:9} {'yes' if r.amp else 'no':3} {r.registers:4d} "
              f"{r.spill_store_bytes + r.spill_load_bytes:6d}  "
              f"ld {dict(sorted(r.loads_by_bits.items()))}  st {dict(sorted(r.stores_by_bits.items()))}")


if __name__ == "__main__":
    main()
