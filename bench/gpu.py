"""python -m bench.gpu: what the day a GPU is lent checks and measures, in one command (issue 23).

    PYTHONPATH=. python -m bench.gpu --out gpu_results    # on one H100 / H200, from the checkout, nothing installed
    python -m bench.gpu --dry-run --out /tmp/gpu_dry      # the same plan on CPU at tiny sizes (CI keeps it working)

Five parts, in this order (the plan and its sizes: :mod:`bench.gpu_run`):

1. tests/test_cuda.py with the compiled kernels (pytest in a subprocess): parity, sync-debug mode, CUDA-graph
   capture and replay under a per-step schedule, streams;
2. parity of FusedPILoTSGD with the eager reference (:mod:`pilot.reference`), fp32 and a bf16 model with
   GradScaler, over tens of steps of a small CNN and ResNet-18 (:mod:`bench.gpu_checks`);
3. the kernel's achieved bandwidth (bytes moved / time) on ResNet-18's, ResNet-50's and a synthetic 1e9-element
   parameter set, against torch's fused SGD on the same shapes and a device-to-device copy, as fractions of the
   copy's (the ceiling measured on the machine);
4. the training step's overhead over dense training: ResNet-50 at batch 256, bf16 autocast, channels_last, pilot
   against torch's fused SGD and the eager reference, interleaved, as paired ratios;
5. the host side of a steady step: host time, and the kernels and copies per step as the profiler counts them
   (plain, under a per-step schedule, capturable, with GradScaler's tensors; fused SGD for comparison).

``--budget SECONDS`` bounds the run: parts 1 and 2 always run, parts 3 to 5 shrink or are skipped (the JSON says
which) when what is left would not hold them. Writes DIR/gpu.json (every figure as {min, median, max, unit,
samples}) and prints a summary. Exit status 1 if a CUDA test, a parity case or a correctness check failed (or a
part crashed), 2 if pilot cannot be imported with the machine's packages, else 0.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_BUDGET = 420.0  # seconds: under 8 minutes of wall time with the interpreter start-up and the summary


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, metavar="SECONDS",
                        help=f"wall-time budget; parts 3-5 are cut to fit it (default {DEFAULT_BUDGET:.0f})")
    parser.add_argument("--out", type=Path, default=Path("gpu_results"), help="output directory (gpu.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same plan on CPU at tiny sizes, the kernel in Triton's interpreter")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # TRITON_INTERPRET is read when pilot_kernels is imported, so it is settled before the parts are imported: the
    # interpreter on CPU tensors for the dry run, the compiled kernels otherwise.
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    try:
        from .gpu_run import run
    except ModuleNotFoundError as error:  # the GPU machine has its own packages, and nothing can be installed there
        print(f"python -m bench.gpu: pilot or bench needs {error.name!r}, which is not installed here ({error})",
              file=sys.stderr)
        return 2
    return run(args.out, args.budget, args.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
