"""python -m bench.inference: dense against sparse inference of pruned models on the CPU (latency, peak memory).

    python -m bench.inference                     # LeNet-300-100 at batch 1 and 256, ResNet-20 at 1 and 64;
                                                  # 90 / 95 / 98% sparsity; a few minutes on a 2-core CPU
    python -m bench.inference --models lenet300-100 --sparsities 0.98 --batch-sizes 1 --repeats 3

Weights: each model as pilot.models initialises it (Kaiming-normal, seed 0), pruned one-shot by global magnitude
(pilot.prune_) to the sparsity; not trained, so each layer's density is what one global threshold leaves of a
random model (a trained model's differ). Per configuration, the sparse contender is
``pilot.sparse_inference(model, batch)``: each layer dense or sparse as measured on that batch. Both contenders
run the batch under torch.inference_mode, timed interleaved with paired ratios (bench.timing); peak memory is
what the allocator holds during one forward beyond what existed before the contender was built (bench.memory:
weights, activations, scratch). A third contender, timed with them, bounds what any sparse kernel could
give: the dense model with the layers that run sparse replaced by modules that return their output for free ("free
x": dense time / its time). Where it is low, the rest of the forward (other layers, activations, Python module
calls) dominates and no sparse product can do much. The stdout table is also written to DIR/inference.json and DIR/inference.png.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from pilot import prune_, sparse_inference, sparsity_report
from pilot.models import build_model
from pilot.quiet import drop_cuda_home_notice

from . import report
from .memory import peak_step_memory
from .suite import progress
from .timing import Stats, paired_ratios, time_interleaved

# (in_channels, image size, batch sizes) of each model, as the issue asks for them.
MODELS = {"lenet300-100": (1, 28, (1, 256)), "resnet20": (3, 32, (1, 64))}
SPARSITIES = (0.9, 0.95, 0.98)
NUM_CLASSES = 10
SEED = 0
TARGET = ("lenet300-100", 0.98, 1, 2.0)  # model, sparsity, batch size, speed-up the issue asks for
WEIGHTS = ("Kaiming-normal init (pilot.models, seed 0), one-shot global magnitude pruning (pilot.prune_); not "
           "trained: per-layer densities are a random model's")
TIE = 0.05  # a median speed-up within 5% of 1 is called "about equal": paired ratios scatter more than that
MEMORY_TIE = 0.01  # peak memory is counted, not timed: 1% more is reported as more
CPU = torch.device("cpu")
# Next to python -m bench's results.json and bench.png in the same --out, not over them.
RESULTS, PLOT = "inference.json", "inference.png"
MIB = 2**20


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES), metavar="S")
    parser.add_argument("--batch-sizes", nargs="+", type=int, metavar="N",
                        help="for every model (default: " + "; ".join(
                            f"{name} {' and '.join(map(str, sizes))}" for name, (_, _, sizes) in MODELS.items()) + ")")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timing samples per contender")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="output directory")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if any(not 0 <= s < 1 for s in args.sparsities):
        parser.error("--sparsities: each must be a fraction in [0, 1), e.g. 0.95")
    if args.batch_sizes and min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    return args


def pruned_model(name: str, sparsity: float) -> nn.Module:
    """The model the bench measures: initialised with :data:`SEED`, globally magnitude-pruned to ``sparsity``."""
    in_channels, size, _ = MODELS[name]
    torch.manual_seed(SEED)
    model = build_model(name, NUM_CLASSES, in_channels, size).eval()
    prune_(model, sparsity)
    return model


def _peak_mib(contender: nn.Module, batch: torch.Tensor) -> Stats:
    def build() -> Callable[[], None]:
        copied = copy.deepcopy(contender)
        return lambda: copied(batch)

    with torch.inference_mode():
        return Stats.exact(peak_step_memory(build, CPU) / MIB, "MiB")


class _GivenOutput(nn.Module):
    """Returns an output recorded beforehand: a layer that costs nothing, for the "free" contender."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: object) -> torch.Tensor:
        return self.output


def free_layers_model(dense: nn.Module, names: list[str], batch: torch.Tensor) -> nn.Module:
    """A copy of ``dense`` whose layers ``names`` return their output on ``batch`` without computing it."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [dense.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: outputs.setdefault(name, output)) for name in names]
    try:
        with torch.inference_mode():
            dense(batch)
    finally:
        for hook in hooks:
            hook.remove()
    copied = copy.deepcopy(dense)
    for name in names:
        parent, _, attribute = name.rpartition(".")
        setattr(copied.get_submodule(parent), attribute, _GivenOutput(outputs[name]))
    return copied


def measure(name: str, sparsity: float, batch_size: int, repeats: int) -> dict[str, Any]:
    """One configuration: both contenders' times, their paired ratio, peak memory and the layer choices."""
    in_channels, size, _ = MODELS[name]
    dense = pruned_model(name, sparsity)
    batch = torch.randn(batch_size, in_channels, size, size, generator=torch.Generator().manual_seed(SEED))
    sparse = sparse_inference(dense, batch)
    free = free_layers_model(dense, [choice.name for choice in sparse.choices if choice.sparse], batch)
    with torch.inference_mode():
        difference = float((sparse(batch) - dense(batch)).abs().max())
        timings = time_interleaved({"dense": lambda: dense(batch), "sparse": lambda: sparse(batch),
                                    "free": lambda: free(batch)}, CPU, repeats=repeats, warmup=2)
    record: dict[str, Any] = {"model": name, "sparsity": sparsity, "batch_size": batch_size,
                              "measured_sparsity": sparsity_report(dense).sparsity,
                              "max_abs_difference": difference, "choices": [asdict(c) for c in sparse.choices]}
    for contender, model in (("dense", dense), ("sparse", sparse)):
        record[contender] = {"time": Stats.of([t * 1e3 for t in timings[contender].device], "ms"),
                             "peak_memory": _peak_mib(model, batch)}
    record["speedup"] = Stats.of(paired_ratios(timings["dense"].device, timings["sparse"].device), "x")
    record["free_layers_speedup"] = Stats.of(paired_ratios(timings["dense"].device, timings["free"].device), "x")
    record["memory_ratio"] = Stats.exact(record["sparse"]["peak_memory"].median
                                         / record["dense"]["peak_memory"].median, "x")
    return record


def run(args: argparse.Namespace) -> dict[str, Any]:
    started, cpu_at_start = time.perf_counter(), report.cpu_seconds()
    results: dict[str, Any] = {"environment": report.environment(CPU), "weights": WEIGHTS, "settings": {
        "models": args.models, "sparsities": args.sparsities, "batch_sizes": args.batch_sizes,
        "repeats": args.repeats, "threads": torch.get_num_threads()}, "configurations": []}
    for name in args.models:
        for sparsity in args.sparsities:
            for batch_size in args.batch_sizes or MODELS[name][2]:
                progress(f"[inference] {name} at {sparsity:.0%}, batch {batch_size}")
                results["configurations"].append(measure(name, sparsity, batch_size, args.repeats))
    model, sparsity, batch_size, wanted = TARGET
    results["targets"] = [report._target(f"sparse at least {wanted:g}x faster than dense",
                                         f"{model} at {sparsity:.0%}, batch {batch_size}", entry["speedup"].median,
                                         "x", entry["speedup"].median >= wanted)
                          for entry in results["configurations"]
                          if (entry["model"], entry["sparsity"], entry["batch_size"]) == (model, sparsity, batch_size)]
    results["runtime_seconds"] = time.perf_counter() - started
    results["environment"]["other_processes_cores"] = report.other_processes_cores(
        cpu_at_start, report.cpu_seconds(), results["runtime_seconds"])
    return results


def _range(stats: Stats, digits: int) -> str:
    return f"{stats.median:.{digits}f} [{stats.min:.{digits}f}, {stats.max:.{digits}f}]"


def _verdict(entry: dict[str, Any]) -> str:
    if not any(choice["sparse"] for choice in entry["choices"]):
        return "no layer faster sparse: all dense"
    speedup = entry["speedup"].median
    time_word = ("sparse faster" if speedup >= 1 + TIE else "SPARSE SLOWER" if speedup <= 1 - TIE
                 else "about equal")
    return time_word + ("" if entry["memory_ratio"].median <= 1 + MEMORY_TIE else ", MORE MEMORY")


def format_tables(results: dict[str, Any]) -> str:
    env = results["environment"]
    commit = (env["git_commit"] or "unknown")[:12] + (" (dirty)" if env["git_dirty"] else "")
    head = (f"{'model':<13} {'sparsity':>8} {'batch':>5}  {'dense ms':<24} {'sparse ms':<24} "
            f"{'speed-up x':<20} {'free x':>6} {'dense MiB':>9} {'sparse MiB':>10} {'mem x':>6} {'sparse layers':>13}  verdict")
    lines = [f"pilot sparse inference bench on {env['device_name']}",
             f"torch {env['torch']}, commit {commit}; load average {env['load_average_at_start'][0]:.2f} at start; "
             f"{report._contention(env)}",
             f"Weights: {results['weights']}.",
             f"Times: median [min, max] of {results['settings']['repeats']} interleaved samples; speed-up = dense time "
             "/ sparse time, paired per round (> 1: sparse is faster); free x = dense time / time with the sparse "
             "layers' outputs given for free (the most any sparse kernel could give); mem x = sparse peak / dense peak.",
             "",
             head, "-" * len(head)]
    for entry in results["configurations"]:
        used = f"{sum(choice['sparse'] for choice in entry['choices'])} of {len(entry['choices'])}"
        lines.append(f"{entry['model']:<13} {entry['sparsity']:>8.0%} {entry['batch_size']:>5}  "
                     f"{_range(entry['dense']['time'], 3):<24} {_range(entry['sparse']['time'], 3):<24} "
                     f"{_range(entry['speedup'], 2):<20} {entry['free_layers_speedup'].median:>6.2f} "
                     f"{entry['dense']['peak_memory'].median:>9.2f} "
                     f"{entry['sparse']['peak_memory'].median:>10.2f} {entry['memory_ratio'].median:>6.2f} "
                     f"{used:>13}  "
                     f"{_verdict(entry)}")
    lines += ["", "Sparse layers (chosen by pilot.sparse_inference, measuring each layer on the batch):"]
    for entry in results["configurations"]:
        names = [choice["name"] for choice in entry["choices"] if choice["sparse"]]
        lines.append(f"  {entry['model']} at {entry['sparsity']:.0%}, batch {entry['batch_size']}: "
                     f"{', '.join(names) or 'none'} (outputs differ by at most {entry['max_abs_difference']:.1e})")
    if results["targets"]:
        lines += ["", "Targets (measured here; not tuned)"]
        lines += [f"  {'met   ' if t['met'] else 'MISSED'}  {t['target']}: {t['subject']}: {t['measured']:.3g} "
                  f"{t['unit']}" for t in results["targets"]]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Speed-up and peak-memory ratio of each configuration (bars: median; whiskers: min-max of paired ratios)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    entries = results["configurations"]
    labels = [f"{e['model']} {e['sparsity']:.0%} b{e['batch_size']}" for e in entries]
    figure, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.9 * len(entries) + 4), 5), squeeze=False)
    for axis, key, title, better, tie in ((axes[0][0], "speedup", "speed-up: dense time / sparse time", 1, TIE),
                                          (axes[0][1], "memory_ratio", "peak memory: sparse / dense", -1,
                                           MEMORY_TIE)):
        stats = [e[key] for e in entries]
        colours = ["grey" if abs(s.median - 1) <= tie else "C2" if (s.median - 1) * better > 0 else "C3"
                   for s in stats]
        axis.bar(range(len(entries)), [s.median for s in stats], color=colours,
                 yerr=[[s.median - s.min for s in stats], [s.max - s.median for s in stats]], capsize=2)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        for ticks in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
            ticks(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.6, 2, 3 rather than 6x10^-1, 2x10^0
        axis.set_xticks(range(len(entries)), labels, fontsize=7, rotation=35, ha="right")
        axis.set_title(f"{title}\n(green: sparse better, red: worse, grey: within {tie:.0%})", fontsize=9)
    figure.suptitle(f"pilot sparse inference: {results['environment']['device_name']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    drop_cuda_home_notice()
    results = run(args)
    print(format_tables(results))
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / RESULTS)
    plot(results, args.out / PLOT)
    print(f"\nran in {results['runtime_seconds']:.0f} s; wrote {args.out / RESULTS}, {args.out / PLOT}")


if __name__ == "__main__":
    main()
