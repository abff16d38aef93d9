"""Compile the kernels ahead of time for real GPUs, without one: PTX, ptxas resource usage, occupancy, accesses.

    python -m pilot_kernels.aot            # table for sm_80 and sm_90a, plain and GradScaler (amp) variants
    python -m pilot_kernels.aot --json     # the same as JSON

Two views of the kernel: the kernel as it runs (every code variant in one function: its registers set the
occupancy), and each code variant compiled alone (``pilot_sgd.VARIANT_*``), whose PTX shows that variant's access
widths, load / store order and shared-memory use without the others' code around it.

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
# Per-SM limits that set occupancy, the same on sm_80 and sm_90 (CUDA programming guide, compute capabilities
# table): 64K 32-bit registers, 2048 resident threads, 32 resident CTAs. Registers are allocated per warp in units of
# 256, i.e. a thread's count is rounded up to a multiple of 8.
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
REGISTER_ALLOCATION_UNIT = 8

_TRITON_POINTER = {torch.int64: "*i64", torch.int32: "*i32", torch.float32: "*fp32"}
# The kernel's pointer arguments in order, typed as launch_pilot_sgd passes them.
_POINTER_TYPES = {name: _TRITON_POINTER[dtype] for name, dtype in (
    ("tensor_table_ptr", pilot_sgd.TENSOR_TABLE_DTYPE), ("hyper_ptr", pilot_sgd.HYPER_TABLE_DTYPE),
    ("block_table_ptr", pilot_sgd.BLOCK_TABLE_DTYPE), ("factor_ptr", torch.float32), ("momentum_ptr", torch.float32),
    ("l1_ptr", torch.float32), ("nnz_ptr", torch.int64), ("started_ptr", torch.int32),
    ("grad_scale_ptr", torch.float32), ("found_inf_ptr", torch.float32))}
_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_DIVISION = re.compile(r"\bdiv(?:\.\w+)*\.f32\b")
_LABEL = re.compile(r"^(\$L__BB\w+):")
_BRANCH = re.compile(r"^(@!?%p\w+\s+)?bra(?:\.uni)?\s+(\$L__BB\w+);")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class VariantReport:
    """One code variant of the kernel (a ``pilot_sgd.VARIANTS`` name), compiled alone."""

    variant: str
    loads_by_bits: dict[int, int]  # global load instructions per access width
    stores_by_bits: dict[int, int]
    vector_loads_by_bits: dict[int, int]  # of those, the vector (v2 / v4) ones: the streams' vectorised accesses
    vector_stores_by_bits: dict[int, int]
    loads_after_a_store: int  # global loads that some path reaches after a global store (0: loads all come first)
    vector_load_bytes_before_first_store: int  # per thread, on the path that loads the most
    layout_conversions: int  # ttg.convert_layout ops left in the TTGIR (register exchanges through shared memory)
    shared_stores: int  # st.shared instructions (layout conversions and the telemetry reductions)
    barriers: int  # bar.sync instructions


@dataclass
class KernelReport:
    """What the compiled kernel looks like for one GPU architecture and parameter dtype."""

    arch: str
    x_dtype: str
    amp: bool  # the GradScaler variant: unscale on load, skip on found_inf
    num_warps: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    ctas_per_sm: int  # resident programs per SM that the registers and warps allow
    occupancy: float  # resident threads / THREADS_PER_SM
    loads_by_bits: dict[int, int] = field(default_factory=dict)  # global load instructions per access width
    stores_by_bits: dict[int, int] = field(default_factory=dict)
    divisions: dict[str, int] = field(default_factory=dict)  # fp32 division instructions, e.g. {"div.rn.f32": 4}
    variants: list[VariantReport] = field(default_factory=list)

    def variant(self, name: str) -> VariantReport:
        return next(v for v in self.variants if v.variant == name)

    @property
    def load_bytes_in_flight_per_cta(self) -> int:
        """Bytes one program has in flight when it has issued its loads: the full aligned variant's vector loads
        before its first store, on every thread."""
        return self.variant("full aligned").vector_load_bytes_before_first_store * 32 * self.num_warps


def arch_name(arch: int) -> str:
    """ptxas' name: sm_90a for Hopper (Triton emits sm_90a PTX there), sm_<arch> otherwise."""
    return f"sm_{arch}a" if arch == 90 else f"sm_{arch}"


def compile_pilot_sgd(arch: int, x_dtype: torch.dtype, *, grad_scale: bool = False, found_inf: bool = False,
                      variant: int = pilot_sgd.VARIANT_PER_BLOCK) -> dict[str, str]:
    """``pilot_sgd_kernel`` compiled for ``cuda`` compute capability ``arch`` (e.g. 80, 90): its intermediate
    forms by name ("ttgir", "ptx", ...). ``variant``: the kernel as launched (VARIANT_PER_BLOCK) or one variant."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compilation needs the real kernels: unset TRITON_INTERPRET")
    signature = dict(_POINTER_TYPES, X_DTYPE="constexpr", BLOCK="constexpr", HAS_GRAD_SCALE="constexpr",
                     HAS_FOUND_INF="constexpr", VARIANT="constexpr")
    constexprs = {"X_DTYPE": pilot_sgd.TORCH_TO_TRITON_DTYPE[x_dtype], "BLOCK": pilot_sgd.BLOCK_SIZE,
                  "HAS_GRAD_SCALE": grad_scale, "HAS_FOUND_INF": found_inf, "VARIANT": variant}
    attrs = {(index,): [["tt.divisibility", 16]] for index in range(len(_POINTER_TYPES))}
    source = ASTSource(pilot_sgd.pilot_sgd_kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": pilot_sgd.NUM_WARPS})
    return dict(compiled.asm)


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


def ctas_per_sm(registers: int, num_warps: int) -> int:
    """Programs of ``num_warps`` warps, ``registers`` each thread, that fit on one SM at once (shared memory aside:
    the kernel's few hundred bytes for its reductions never bind)."""
    threads = 32 * num_warps
    allocated = -(-registers // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    return min(CTAS_PER_SM, THREADS_PER_SM // threads, REGISTERS_PER_SM // (allocated * threads))


def _access_bits(suffixes: str) -> tuple[int, int]:
    """(lanes, bits) of a global access from its suffixes, e.g. ".v4.b32" -> (4, 128)."""
    parts = suffixes.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p))
    return lanes, lanes * bits


def global_access_widths(ptx: str, vector_only: bool = False) -> tuple[dict[int, int], dict[int, int]]:
    """Global load and store instructions of the PTX, counted per access width in bits (e.g. v4.b32 -> 128);
    ``vector_only``: only the vector (v2, v4) ones."""
    counts = {"ld": collections.Counter(), "st": collections.Counter()}
    for op, suffixes in _ACCESS.findall(ptx):
        lanes, bits = _access_bits(suffixes)
        if lanes > 1 or not vector_only:
            counts[op][bits] += 1
    return dict(counts["ld"]), dict(counts["st"])


def _basic_blocks(ptx: str) -> list[tuple[list[tuple[str, int, int]], list[int]]]:
    """The kernel's basic blocks in order: each its global accesses ("ld" / "st", lanes, bits) in order and the
    indices of its successors. A block starts at a $L__BB label (what branches target) or after a branch."""
    blocks: list[dict] = [{"label": None, "accesses": [], "targets": [], "falls_through": True}]
    for line in (raw.strip() for raw in ptx.splitlines()):
        label = _LABEL.match(line)
        if label:
            if blocks[-1]["label"] is None and not blocks[-1]["accesses"] and len(blocks) > 1:
                blocks[-1]["label"] = label.group(1)  # the label opens the block that a branch just started
            else:
                blocks.append({"label": label.group(1), "accesses": [], "targets": [], "falls_through": True})
            continue
        current = blocks[-1]
        access = _ACCESS.search(line)
        if access:
            current["accesses"].append((access.group(1), *_access_bits(access.group(2))))
        branch = _BRANCH.match(line)
        if branch:
            current["targets"].append(branch.group(2))
            current["falls_through"] = branch.group(1) is not None  # conditional
            blocks.append({"label": None, "accesses": [], "targets": [], "falls_through": True})
        elif line.startswith("ret;"):
            current["falls_through"] = False
            blocks.append({"label": None, "accesses": [], "targets": [], "falls_through": True})
    index = {b["label"]: i for i, b in enumerate(blocks) if b["label"] is not None}
    return [(b["accesses"], [index[t] for t in b["targets"]] + ([i + 1] if b["falls_through"] and i + 1 < len(blocks)
                                                                  else []))
            for i, b in enumerate(blocks)]


def loads_after_a_store(ptx: str) -> int:
    """Global loads that some path through the kernel reaches after a global store (a dataflow fixed point over
    its basic blocks): 0 when every path issues all its loads before its first store."""
    blocks = _basic_blocks(ptx)
    stored_before = [False] * len(blocks)  # some path into the block has stored
    changed = True
    while changed:
        changed = False
        for i, (accesses, successors) in enumerate(blocks):
            stored_after = stored_before[i] or any(op == "st" for op, _, _ in accesses)
            for s in successors:
                if stored_after and not stored_before[s]:
                    stored_before[s] = changed = True
    late = 0
    for (accesses, _), stored in zip(blocks, stored_before):
        for op, _, _ in accesses:
            stored = stored or op == "st"
            late += op == "ld" and stored
    return late


def vector_load_bytes_before_first_store(ptx: str) -> int:
    """Bytes of vector global loads a thread issues before its first global store, on the path that issues the
    most (the kernel's branches form no loops)."""
    blocks = _basic_blocks(ptx)
    memo: dict[int, int] = {}

    def most_from(i: int) -> int:
        if i not in memo:
            accesses, successors = blocks[i]
            loaded = 0
            for op, lanes, bits in accesses:
                if op == "st":
                    memo[i] = loaded
                    return loaded
                loaded += bits // 8 if lanes > 1 else 0
            memo[i] = loaded + max((most_from(s) for s in successors), default=0)
        return memo[i]

    return most_from(0)


def variant_report(arch: int, x_dtype: torch.dtype, amp: bool, variant: str) -> VariantReport:
    """Compile one code variant alone and summarise its accesses, their order and its shared-memory use."""
    asm = compile_pilot_sgd(arch, x_dtype, grad_scale=amp, found_inf=amp, variant=pilot_sgd.VARIANTS[variant])
    ptx = asm["ptx"]
    loads, stores = global_access_widths(ptx)
    vector_loads, vector_stores = global_access_widths(ptx, vector_only=True)
    return VariantReport(variant, loads, stores, vector_loads, vector_stores, loads_after_a_store(ptx),
                         vector_load_bytes_before_first_store(ptx), asm["ttgir"].count("ttg.convert_layout"),
                         len(re.findall(r"\bst\.shared", ptx)), len(re.findall(r"\bbar\.sync", ptx)))


def report(arch: int, x_dtype: torch.dtype, amp: bool = False) -> KernelReport:
    """Compile for ``arch`` and summarise registers, spills, occupancy and accesses, and each code variant's."""
    ptx = compile_pilot_sgd(arch, x_dtype, grad_scale=amp, found_inf=amp)["ptx"]
    registers, spill_stores, spill_loads = ptxas_usage(ptx, arch)
    loads, stores = global_access_widths(ptx)
    ctas = ctas_per_sm(registers, pilot_sgd.NUM_WARPS)
    variants = [variant_report(arch, x_dtype, amp, name) for name, value in pilot_sgd.VARIANTS.items()
                if value != pilot_sgd.VARIANT_PER_BLOCK]
    return KernelReport(arch_name(arch), str(x_dtype).replace("torch.", ""), amp, pilot_sgd.NUM_WARPS, registers,
                        spill_stores, spill_loads, ctas, ctas * 32 * pilot_sgd.NUM_WARPS / THREADS_PER_SM, loads,
                        stores, dict(collections.Counter(_DIVISION.findall(ptx))), variants)


def _widths(counts: dict[int, int]) -> str:
    return " ".join(f"{bits}:{n}" for bits, n in sorted(counts.items())) or "-"


def format_table(reports: list[KernelReport]) -> str:
    lines = [f"{'arch':7} {'dtype':9} {'amp':3} {'regs':>4} {'spill':>5} {'CTAs/SM':>7} {'occup.':>6} "
             f"{'B in flight/CTA':>15}  divisions"]
    for r in reports:
        lines.append(f"{r.arch:7} {r.x_dtype:9} {'yes' if r.amp else 'no':3} {r.registers:4d} "
                     f"{r.spill_store_bytes + r.spill_load_bytes:5d} {r.ctas_per_sm:7d} {r.occupancy:6.1%} "
                     f"{r.load_bytes_in_flight_per_cta:15d}  {r.divisions or '-'}")
    lines += ["", "Each code variant compiled alone: vector global loads / stores (bits:count), loads after a store, "
              "vector bytes loaded per thread before the first store, layout conversions, st.shared, bar.sync"]
    for r in reports:
        for v in r.variants:
            lines.append(f"{r.arch:7} {r.x_dtype:9} {'yes' if r.amp else 'no':3} {v.variant:15} "
                         f"ld {_widths(v.vector_loads_by_bits):15} st {_widths(v.vector_stores_by_bits):15} "
                         f"late ld {v.loads_after_a_store:2d}  {v.vector_load_bytes_before_first_store:3d} B  "
                         f"cvt {v.layout_conversions}  st.shared {v.shared_stores:2d}  bar {v.barriers:2d}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    reports = [report(arch, dtype, amp) for arch in ARCHS for dtype in pilot_sgd.TORCH_TO_TRITON_DTYPE
               for amp in (False, True)]
    if args.json:
        print(json.dumps([asdict(r) | {"load_bytes_in_flight_per_cta": r.load_bytes_in_flight_per_cta}
                          for r in reports], indent=2))
    else:
        print(format_table(reports))


if __name__ == "__main__":
    main()
