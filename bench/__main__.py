"""python -m bench: what PILoT costs over dense training, on this machine.

    python -m bench                       # all four sections; about 5 minutes on a 2-core CPU
    python -m bench --quick               # CI smoke test: ResNet-20 only, few repeats (< 1 minute)
    python -m bench --models resnet50 --batch-size resnet50=32 --sections step train --out /tmp/bench

Sections: ``step`` (optimizer step alone), ``train`` (training step, time and peak memory), ``traffic`` (bytes and
launches per step, counted), ``kernel`` (the fused kernel compiled for sm_80 / sm_90a). The stdout tables are
also written to DIR/results.json (every figure as min / median / max with its unit) and DIR/bench.png.
"""
from __future__ import annotations

import os
import sys

# Everything here times or compiles the real kernels; only bench.interpreter_worker runs the interpreter, in a
# process of its own. TRITON_INTERPRET is read when pilot_kernels is imported, so it is dropped before that.
if os.environ.pop("TRITON_INTERPRET", None) is not None:
    print("bench: ignoring TRITON_INTERPRET (only the traffic count runs Triton's interpreter, in a subprocess)",
          file=sys.stderr)

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

import torch  # noqa: E402

from pilot.models import MODEL_NAMES  # noqa: E402
from pilot.quiet import drop_cuda_home_notice  # noqa: E402

from . import report, suite  # noqa: E402

SECTIONS = ("step", "train", "traffic", "kernel")
DEFAULT_MODELS = ("resnet20", "resnet18", "resnet50")
# Batch sizes per device: on CPU small enough for the whole run to take about five minutes on 2 cores.
DEFAULT_BATCH_SIZES = {"cpu": {"resnet20": 128, "resnet18": 8, "resnet50": 4},
                       "cuda": {"resnet20": 128, "resnet18": 128, "resnet50": 64}}
FALLBACK_BATCH_SIZE = {"cpu": 32, "cuda": 128}
QUICK_MODELS = ("resnet20",)
QUICK_BATCH_SIZE = 16


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to time and measure memory (auto: cuda if available, else cpu)")
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--batch-size", nargs="+", default=[], metavar="[MODEL=]N",
                        help="training batch size for every model (N) or one model (MODEL=N); defaults per device: "
                             + "; ".join(f"{d}: " + ", ".join(f"{m}={n}" for m, n in sizes.items())
                                         for d, sizes in DEFAULT_BATCH_SIZES.items()))
    parser.add_argument("--repeats", type=int, help="interleaved timing samples per contender (default 20)")
    parser.add_argument("--traffic-models", nargs="*", choices=MODEL_NAMES,
                        help="models whose fused kernel is counted in Triton's interpreter, which takes about "
                             "5 s per million parameters (default: resnet20); the torch paths are counted for "
                             "every model")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's, one per core); on a shared machine another busy "
                             "process stalls every multi-threaded op, which 1 thread avoids")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="output directory")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {', '.join(QUICK_MODELS)} at batch {QUICK_BATCH_SIZE}, 3 repeats")
    return parser.parse_args(argv)


def batch_sizes(entries: Sequence[str], models: Sequence[str], device: str, quick: bool) -> dict[str, int]:
    sizes = {m: QUICK_BATCH_SIZE if quick else DEFAULT_BATCH_SIZES[device].get(m, FALLBACK_BATCH_SIZE[device])
             for m in models}
    for entry in entries:
        model, _, value = entry.rpartition("=")
        if not value.isdigit() or int(value) < 1 or (model and model not in MODEL_NAMES):
            raise SystemExit(f"--batch-size: expected N or MODEL=N with a positive N, got {entry!r}")
        for m in ([model] if model else models):
            sizes[m] = int(value)
    return sizes


def settings_from(args: argparse.Namespace) -> suite.Settings:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    models = tuple(args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS))
    traffic_models = tuple(args.traffic_models if args.traffic_models is not None else QUICK_MODELS)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 20)
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    return suite.Settings(device, models, batch_sizes(args.batch_size, models, device.type, args.quick), repeats,
                          warmup=2 if args.quick else 3, traffic_models=traffic_models)


def run(settings: suite.Settings, sections: Sequence[str]) -> dict[str, Any]:
    """Measure the chosen sections; the results dict that results.json holds."""
    started, cpu_at_start = time.perf_counter(), report.cpu_seconds()
    results: dict[str, Any] = {
        "environment": report.environment(settings.device),
        "settings": {**asdict(settings.hyper), "device": str(settings.device), "models": list(settings.models),
                     "batch_sizes": settings.batch_sizes, "repeats": settings.repeats, "warmup": settings.warmup,
                     "traffic_models": list(settings.traffic_models), "sections": list(sections)}}
    if "step" in sections:
        results["optimizer_step"] = suite.optimizer_step(settings)
    if "train" in sections:
        results["training_step"] = suite.training_step(settings)
    if "traffic" in sections:
        results["traffic"] = suite.traffic(settings)
    if "kernel" in sections:
        results["kernel"] = suite.compiled_kernel()
    results["targets"] = report.evaluate_targets(results)
    results["runtime_seconds"] = time.perf_counter() - started
    results["environment"]["other_processes_cores"] = report.other_processes_cores(
        cpu_at_start, report.cpu_seconds(), results["runtime_seconds"])
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    drop_cuda_home_notice()
    settings = settings_from(args)
    results = run(settings, args.sections)
    print(report.format_tables(results))
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / "results.json")
    written = [args.out / "results.json"]
    if report.plot(results, args.out / "bench.png"):
        written.append(args.out / "bench.png")
    print(f"\nran in {results['runtime_seconds']:.0f} s; wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
