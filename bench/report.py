"""What ``python -m bench`` hands back: the machine, the stdout tables, results.json, the targets and a chart."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import triton

import pilot

from .contenders import BASELINE, CONTENDERS, PRODUCTS, REFERENCES, STEP_CONTENDERS, with_products
from .suite import MEMORY_RATIO_KEY, ratio_key
from .timing import Stats
from .traffic import GPUS

REPO = Path(__file__).resolve().parent.parent
TIME_RATIO = ratio_key(BASELINE)
# The CPU step against torch's fused SGD: its floor is 2x (40 B per factorised element against 20); ResNet-20's
# small tensors add the host time of a compiled call, so its limit is looser (issue 24).
CPU_STEP_LIMIT = 2.5
CPU_STEP_LIMITS = {"resnet20": 3.0}
FOREACH_REFERENCE = "reference-foreach"
NOISY_CORES = 0.1  # other processes' average CPU use above which the table warns that timings are unreliable
# pilot's own bookkeeping beyond the exact optimizer state, which the memory target allows as a fraction of the
# reference's peak: every tensor's segment padded to 128 B in the flat storage, and 24 B of telemetry per tensor on
# CPU or per 1024 elements on CUDA (under 0.1% of the >= 24 B per element that x, g, m, w and the two buffers hold).
# ResNet-20 on CPU: 2.6 KiB, 0.01% of its step's peak.
MEMORY_BOOKKEEPING = 1e-3


# ------------------------------------------------------------------------------------------------ the machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """Which device a figure comes from, e.g. "cpu: AMD EPYC, 2 threads"."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"cpu: {cpu_model()}, {threads} thread{'s' if threads > 1 else ''}"


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def cpu_seconds() -> Optional[tuple[float, float]]:
    """(CPU seconds the machine has been busy, CPU seconds of this process and its children); None off Linux."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = os.times()
    return ((user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system + own.children_user + own.children_system)


def other_processes_cores(start: Optional[tuple[float, float]], end: Optional[tuple[float, float]],
                          wall_seconds: float) -> Optional[float]:
    """Cores that other processes (and the hypervisor's steal) kept busy on average between two cpu_seconds()."""
    if start is None or end is None:
        return None
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / wall_seconds


def environment(device: torch.device) -> dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"device": device.type, "device_name": device_label(device), "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "pilot": pilot.__version__, "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_at_start": list(os.getloadavg())}


# ------------------------------------------------------------------------------------------------ targets


def _target(name: str, subject: str, measured: float, unit: str, met: bool) -> dict[str, Any]:
    return {"target": name, "subject": subject, "measured": measured, "unit": unit, "met": met}


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, against what this run measured (a target nothing measured is left out)."""
    targets = []
    for entry in results.get("traffic", []):
        kernel = entry.get("pilot_kernel")
        if kernel is None:
            continue
        model = entry["model"]
        per_element = kernel["factorised_bytes_per_element"].median
        targets.append(_target("fused step moves 40 B per fp32 factorised element", model, per_element, "B",
                               per_element == 40))
        for reference in REFERENCES:
            ratio = entry["contenders"][reference][ratio_key("pilot")].median
            targets.append(_target("eager reference moves >= 2.5x the fused step's bytes", f"{model}, {reference}",
                                   ratio, "x", ratio >= 2.5))
        fused = entry["contenders"]["pilot"]
        launches, outside_ops = fused["launches"].median, fused["ops"].median
        targets.append(_target("fused step: 1 launch per (device, dtype), no other op", model, launches, "launches",
                               launches == 1 and outside_ops == 0))
    if results["environment"]["device"] == "cpu":
        for entry in results.get("optimizer_step", []):
            model, pilot_record = entry["model"], entry["contenders"]["pilot"]
            ratio = pilot_record[TIME_RATIO].median
            limit = CPU_STEP_LIMITS.get(model, CPU_STEP_LIMIT)
            targets.append(_target(f"CPU: fused step <= {limit:g}x dense fused SGD's step time", model, ratio, "x",
                                   ratio <= limit))
            # Only against the foreach reference: the fused one already moves pilot's 40 B per element in one pass
            # of torch's kernel, so half its time would be under the memory floor (a target unmeetable by design).
            ratio = pilot_record[ratio_key(with_products(FOREACH_REFERENCE))].median
            targets.append(_target("CPU: fused step <= 0.5x the eager reference's step + its products m*w, "
                                   "g*w, g*m", f"{model}, {FOREACH_REFERENCE}", ratio, "x", ratio <= 0.5))
        for entry in results.get("training_step", []):
            if entry["model"] == "resnet20" and entry["batch_size"] == 128:
                ratio = entry["contenders"]["pilot"][TIME_RATIO].median
                targets.append(_target("CPU: ResNet-20 training step at batch 128 within 3% of dense",
                                       "resnet20, vs dense-fused", ratio, "x", ratio <= 1.03))
    for entry in results.get("training_step", []):
        pilot_peak = entry["contenders"]["pilot"]["peak_memory"].median
        for reference in REFERENCES:
            reference_peak = entry["contenders"][reference]["peak_memory"].median
            difference = (pilot_peak - reference_peak) * 1024
            targets.append(_target(
                f"peak memory of pilot's training step no more than the eager reference's (+{MEMORY_BOOKKEEPING:.1%} "
                "for pilot's padding and telemetry)", f"{entry['model']}, {reference}", difference,
                "KiB (pilot - reference)", pilot_peak <= reference_peak * (1 + MEMORY_BOOKKEEPING)))
    return targets


# ------------------------------------------------------------------------------------------------ tables


def _range(stats: Stats, digits: int) -> str:
    return f"{stats.median:.{digits}f} [{stats.min:.{digits}f}, {stats.max:.{digits}f}]"


def _seconds(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def _time_digits(stats: Stats) -> int:
    return 3 if stats.median < 10 else 1


def _timing_cells(r: dict[str, Any], time_digits: int, ratio_digits: int) -> str:
    return f"{_range(r['time'], time_digits):<26} {_range(r[TIME_RATIO], ratio_digits):<22}"


def _table(title: str, entries: Iterable[dict[str, Any]], columns: str, cells, notes: Iterable[str],  # noqa: ANN001
           host: bool = False, names: Iterable[str] = CONTENDERS) -> list[str]:
    """A section: one row per (model, contender) with ``cells(record)`` (and the host time on CUDA), then notes.

    A contender timed with its product work is printed as "+ products" below the contender itself.
    """
    head = f"{'model':<10} {'contender':<18} {columns}" + ("  host ms (median)" if host else "")
    lines = [title, head, "-" * len(head)]
    for entry in entries:
        label = entry["model"]
        for name in names:
            record = entry["contenders"].get(name)
            if record is not None:
                host_cell = f"  {record['host_time'].median:.3f}" if host else ""
                shown = f"  {PRODUCTS.strip()}" if name.endswith(PRODUCTS) else name
                lines.append(f"{label:<10} {shown:<18} {cells(record)}{host_cell}")
                label = ""
    return lines + list(notes) + [""]


def _kernel_note(entry: dict[str, Any]) -> str:
    kernel = entry.get("pilot_kernel")
    if kernel is None:
        return f"{entry['model']}: pilot's kernel not counted (add it to --traffic-models)"
    return (f"{entry['model']}: pilot kernel {kernel['factorised_bytes_per_element'].median:.2f} B per factorised "
            f"element (+{kernel['tables_and_telemetry_bytes_per_factorised_element'].median:.2f} tables and "
            f"telemetry), {kernel['plain_bytes_per_element'].median:.2f} B per plain element; reference moves "
            + ", ".join(f"{entry['contenders'][r][ratio_key('pilot')].median:.2f}x ({r})" for r in REFERENCES))


def _contention(env: dict[str, Any]) -> str:
    cores = env["other_processes_cores"]
    if cores is None:
        return "CPU use of other processes unknown"
    note = f"other processes kept {cores:.2f} cores busy on average during the run"
    if env["device"] == "cpu" and env["torch_threads"] > 1 and cores > NOISY_CORES:
        note += (" -- CPU timings are unreliable: a busy neighbour stalls every multi-threaded op; rerun on an idle "
                 "machine or with --threads 1")
    elif env["device"] == "cpu" and cores + env["torch_threads"] > env["logical_cpus"] + NOISY_CORES:
        note += " -- CPU timings are unreliable: the cores were oversubscribed"
    return note


def format_tables(results: dict[str, Any]) -> str:
    env = results["environment"]
    settings = results["settings"]
    device, cuda = env["device_name"], env["device"] == "cuda"
    commit = (env["git_commit"] or "unknown")[:12] + (" (dirty)" if env["git_dirty"] else "")
    lines = [f"pilot bench on {device}",
             f"torch {env['torch']}, triton {env['triton']}, commit {commit}; load average "
             f"{env['load_average_at_start'][0]:.2f} at start; {_contention(env)}",
             (f"SGD lr {settings['lr']}, momentum {settings['momentum']}, weight decay {settings['weight_decay']}; "
              f"PILoT alpha {settings['alpha']}, beta {settings['beta']}. Times: median [min, max] of "
              f"{settings['repeats']} interleaved samples; x = paired ratio to {BASELINE} (median [min, max])."), ""]
    ratio = f"{'x ' + BASELINE:<22}"
    if "optimizer_step" in results:
        lines += _table(
            f"1. Optimizer step alone ({device})", results["optimizer_step"],
            f"{'ms':<26} {ratio} {'first step':>10}",
            lambda r: f"{_timing_cells(r, _time_digits(r['time']), 2)} {_seconds(r['first_call'].median):>10}",
            ["+ products: the reference's step together with what pilot's step does inside its one pass, x = m*w "
             "(forward) and g*w, g*m (backward), from the same random gradient of x; the reference's step alone "
             "already moves pilot's 40 B per factorised element",
             "first step: the first call's wall time (momentum buffers; for pilot on CPU torch.compile, faster "
             "when inductor's on-disk cache is warm)"], cuda, STEP_CONTENDERS)
    if "training_step" in results:
        shapes = ", ".join(f"{e['model']} batch {e['batch_size']} at {e['image_size']}x{e['image_size']}"
                           for e in results["training_step"])
        lines += _table(
            f"2. Training step: zero_grad, forward, backward, step ({device}); {shapes}", results["training_step"],
            f"{'ms':<26} {ratio} {'peak MiB':>9} {'x ' + BASELINE:>15}",
            lambda r: f"{_timing_cells(r, 1, 3)} {r['peak_memory'].median:>9.1f} {r[MEMORY_RATIO_KEY].median:>15.2f}",
            ["peak MiB: allocator bytes held at the peak of one step beyond what existed before the contender was "
             "built (model, grads, optimizer state, activations)",
             "pilot vs reference: equal is the floor for an exact optimizer; when the backward starts both hold x, "
             "m, w, the two momentum buffers and the activations"], cuda)
    if "traffic" in results:
        lines += _table(
            "3. Memory traffic per optimizer step, counted (device-independent)", results["traffic"],
            (f"{'MB':>8} {'B/param':>8} {'ops':>5} {'launches':>8} {'x ' + BASELINE:>16} "
             f"{'A100 us*':>9} {'H100 us*':>9}"),
            lambda r: (f"{r['bytes'].median / 1e6:>8.2f} {r['bytes_per_parameter'].median:>8.2f} "
                       f"{r['ops'].median:>5.0f} {r['launches'].median:>8.0f} {r[TIME_RATIO].median:>16.2f} "
                       f"{r['model_time_A100'].median:>9.1f} {r['model_time_H100'].median:>9.1f}"),
            [*map(_kernel_note, results["traffic"]),
             "ops: aten ops (each >= 1 kernel launch on a GPU); pilot: Triton launches counted in the interpreter, "
             "ops = aten ops of its step outside the kernel",
             "reference = its optimizer step + the product m*w in the forward + the products g*w, g*m in the backward",
             "* a model, not a measurement: bytes / peak HBM bandwidth (A100 2.0 TB/s, H100 3.35 TB/s)"])
    if "kernel" in results:
        lines.append("4. Fused kernel compiled ahead of time (Triton -> PTX -> ptxas; no GPU needed)")
        lines.append(f"{'arch':<8} {'x dtype':<9} {'regs':>4} {'spill B':>7} {'CTAs/SM':>7} {'KB in flight/SM*':>14} "
                     f"{'BW fraction*':>12}  global loads / stores (bits: count)")
        for r in results["kernel"]:
            needed = r["model_bytes_needed_in_flight_per_sm"].median
            lines.append(f"{r['arch']:<8} {r['x_dtype']:<9} {r['registers'].median:>4.0f} "
                         f"{r['spill_bytes'].median:>7.0f} {r['ctas_per_sm'].median:>7.0f} "
                         f"{r['model_bytes_in_flight_per_sm'].median / 1e3:>6.1f} of {needed / 1e3:>4.1f} "
                         f"{r['model_bandwidth_fraction'].median:>12.0%}  ld {r['global_loads_by_bits']}  "
                         f"st {r['global_stores_by_bits']}")
        gpus = ", ".join(f"{name} ({gpu.arch}: {gpu.sms} SMs, {gpu.bandwidth / 1e12:.2f} TB/s, "
                         f"{gpu.latency * 1e9:.0f} ns)" for name, gpu in GPUS.items())
        lines += ["* a model, not a measurement: the bytes the resident programs (CTAs/SM, from registers and warps) "
                  "have loading at once, before their first store, against the bandwidth * DRAM latency per SM that "
                  f"Little's law asks of the GPU ({gpus}); an upper bound: dependent table reads and store drain "
                  "are not counted", ""]

    if results.get("targets"):
        lines.append("Targets (measured here; not tuned)")
        for t in results["targets"]:
            lines.append(f"  {'met   ' if t['met'] else 'MISSED'}  {t['target']}: {t['subject']}: "
                         f"{t['measured']:.4g} {t['unit']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ files


def write_json(results: dict[str, Any], path: Path) -> None:
    """results.json: every figure as {min, median, max, unit, samples}."""
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=lambda value: value.to_dict())


def plot(results: dict[str, Any], path: Path) -> bool:
    """Bars of time and peak memory relative to dense fused SGD, per model and contender; False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, results[section], key, names) for title, section, key, names in (
        ("optimizer step time", "optimizer_step", TIME_RATIO, STEP_CONTENDERS),
        ("training step time", "training_step", TIME_RATIO, CONTENDERS),
        ("training step peak memory", "training_step", MEMORY_RATIO_KEY, CONTENDERS)) if results.get(section)]
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    colours = {name: f"C{index}" for index, name in enumerate(STEP_CONTENDERS)}  # the same in every panel
    for axis, (title, entries, key, names) in zip(axes[0], panels):
        width = 0.8 / len(names)
        for index, name in enumerate(names):
            stats = [entry["contenders"][name][key] for entry in entries]
            positions = [m + (index - (len(names) - 1) / 2) * width for m in range(len(entries))]
            errors = [[s.median - s.min for s in stats], [s.max - s.median for s in stats]]
            axis.bar(positions, [s.median for s in stats], width, yerr=errors, capsize=2, label=name,
                     color=colours[name])
        if title == "optimizer step time":
            axis.set_yscale("log")  # the step alone spans 1x to tens of x
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(entries)), [entry["model"] for entry in entries])
        axis.set_title(f"{title} / {BASELINE}")
        axis.set_ylabel("ratio (median; bars: min-max of paired ratios)" if "time" in title else "ratio")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"pilot bench: {results['environment']['device_name']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
