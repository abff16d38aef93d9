"""The plan of ``python -m bench.gpu`` (see :mod:`bench.gpu`), its budget, the JSON and the printed summary.

Sizes on a GPU were chosen to finish in about 4 minutes on one H100 (an estimate: no GPU was available to time
them); the default budget of 420 s leaves room for slower start-ups (Triton compiles each kernel specialisation
once, about 10 s each) before it cuts parts 3 to 5.
"""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import report
from .gpu_checks import ParityCase, cuda_tests, parity
from .gpu_speed import bandwidth, host_side, model_set, overhead, synthetic_elements, synthetic_set


@dataclass(frozen=True)
class Plan:
    device: str
    parity: tuple[ParityCase, ...]
    bandwidth_models: tuple[str, ...]
    synthetic_elements: int
    bandwidth_repeats: int
    overhead: tuple[str, int, int]  # model, batch size, image size
    overhead_repeats: int
    host_model: str
    host_steps: int
    warmup: int
    tests_timeout: float
    # seconds a part needs at least, else it is skipped: 3 (each parameter set), 4, 5
    minimum: tuple[float, float, float]


GPU_PLAN = Plan(
    device="cuda",
    parity=(ParityCase("small-cnn", "float32", 30, 32, 16, 1e-3), ParityCase("small-cnn", "bfloat16", 30, 32, 16, 2e-2),
            ParityCase("resnet18", "float32", 20, 32, 64, 1e-3), ParityCase("resnet18", "bfloat16", 20, 32, 64, 0.2)),
    bandwidth_models=("resnet18", "resnet50"), synthetic_elements=10**9, bandwidth_repeats=10,
    overhead=("resnet50", 256, 224), overhead_repeats=15, host_model="resnet50", host_steps=50, warmup=3,
    tests_timeout=300.0, minimum=(20.0, 60.0, 20.0))
# Tiny sizes for CI: the kernel runs in Triton's interpreter (bf16 parity on the eager torch path: the interpreter
# truncates fp32 -> bf16 instead of rounding, a bias that compounds through the loss).
DRY_PLAN = Plan(
    device="cpu",
    parity=(ParityCase("small-cnn", "float32", 3, 4, 8, 1e-3),
            ParityCase("small-cnn", "bfloat16", 3, 4, 8, 2e-2, backend="eager")),
    bandwidth_models=("small-cnn",), synthetic_elements=8192, bandwidth_repeats=2,
    overhead=("small-cnn", 4, 16), overhead_repeats=1, host_model="small-cnn", host_steps=1, warmup=1,
    tests_timeout=300.0, minimum=(0.0, 0.0, 0.0))


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _guarded(failures: list[str], part: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()`` with the seconds it took, or the error it raised (recorded as a failure: a crash of the kernel
    is a correctness one)."""
    started = time.perf_counter()
    try:
        record = measure()
    except Exception as error:  # noqa: BLE001 - reported in the JSON and the exit status
        failures.append(f"{part}: {type(error).__name__}: {error}")
        record = {"ok": False, "error": traceback.format_exc()[-4000:]}
    return {**record, "seconds": time.perf_counter() - started}


def _skipped(reason: str) -> dict[str, Any]:
    return {"skipped": reason}


def measure(plan: Plan, budget: Budget, out: Path) -> tuple[dict[str, Any], list[str]]:
    """Run the plan's parts in order within ``budget``; (records by part, failures)."""
    device = torch.device(plan.device)
    failures: list[str] = []
    parts: dict[str, Any] = {}
    minimum_bandwidth, minimum_overhead, minimum_host = plan.minimum
    later = minimum_overhead + minimum_host  # kept for parts 4 and 5 while part 3 runs

    progress("[1/5] tests/test_cuda.py with compiled kernels")
    parts["tests"] = _guarded(failures, "tests", lambda: cuda_tests(out, plan.tests_timeout))
    if not parts["tests"]["ok"] and "error" not in parts["tests"]:  # (a crash is a failure already)
        failures.append(f"tests: {_tests_outcome(parts['tests'])}")

    progress("[2/5] parity with the eager reference")
    parts["parity"] = _guarded(failures, "parity", lambda: parity(list(plan.parity), device))
    failures += [f"parity: {r['case']['model']} {r['case']['dtype']}" for r in parts["parity"].get("cases", [])
                 if not r["ok"]]

    records = []
    sets = [(name, lambda name=name: model_set(name)) for name in plan.bandwidth_models]
    sets.append(("synthetic", lambda: synthetic_set(synthetic_elements(plan.synthetic_elements, device))))
    for name, make in sets:
        if budget.left() < minimum_bandwidth + later:
            records.append({"set": name, **_skipped(f"{budget.left():.0f} s left of the budget")})
            continue
        progress(f"[3/5] bandwidth: {name}")
        records.append({"set": name, **_guarded(failures, f"bandwidth {name}", lambda make=make: bandwidth(
            make(), device, plan.bandwidth_repeats, plan.warmup))})
        _release(device)
    parts["bandwidth"] = records

    model, batch_size, image_size = plan.overhead
    if budget.left() < minimum_overhead + minimum_host:
        parts["overhead"] = _skipped(f"{budget.left():.0f} s left of the budget")
    else:
        progress(f"[4/5] training step: {model}, batch {batch_size}, bf16 autocast, channels_last")
        parts["overhead"] = _guarded(failures, "overhead", lambda: overhead(
            model, batch_size, image_size, device, plan.overhead_repeats, plan.warmup))
        _release(device)

    if budget.left() < minimum_host:
        parts["host"] = _skipped(f"{budget.left():.0f} s left of the budget")
    else:
        progress(f"[5/5] host side of a step: {plan.host_model}'s parameters")
        parts["host"] = _guarded(failures, "host", lambda: host_side(plan.host_model, device, plan.host_steps, plan.warmup))
    return parts, failures


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(out: Path, budget_seconds: float, dry_run: bool) -> int:
    """Measure, write DIR/gpu.json, print the summary; the exit status (1 on any failure)."""
    plan = DRY_PLAN if dry_run else GPU_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m bench.gpu: no CUDA device is available (use --dry-run to try the plan on CPU)")
    budget = Budget(budget_seconds)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": report.environment(torch.device(plan.device)), "plan": asdict(plan),
                               "dry_run": dry_run, "budget_seconds": budget_seconds}
    results["parts"], results["failures"] = measure(plan, budget, out)
    results["runtime_seconds"] = budget_seconds - budget.left()
    report.write_json(results, out / "gpu.json")
    print(summary(results))
    print(f"\n{'FAILED: ' + '; '.join(results['failures']) if results['failures'] else 'ok'} "
          f"in {results['runtime_seconds']:.0f} s; wrote {out / 'gpu.json'}")
    return 1 if results["failures"] else 0


# ------------------------------------------------------------------------------------------------ the summary


def _median(stats: Any, digits: int = 1) -> str:
    return f"{stats.median:.{digits}f}"


def _crash(record: dict[str, Any]) -> str:
    return "crashed: " + record["error"].strip().splitlines()[-1]


def _tests_outcome(tests: dict[str, Any]) -> str:
    if "error" in tests:
        return _crash(tests)
    if "timed_out" in tests:
        return f"timed out after {tests['timed_out']:.0f} s"
    if "tests" not in tests:
        return f"pytest exit status {tests['returncode']}, no report"
    failed = f" (failed: {', '.join(tests['failed'])})" if tests["failed"] else ""
    return (f"{tests['tests']} tests, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped{failed}"
            f"{'' if tests['ok'] else ', pytest exit status ' + str(tests['returncode'])}")


def summary(results: dict[str, Any]) -> str:
    """The printed summary: one block per part."""
    env, parts = results["environment"], results["parts"]
    lines = [f"pilot GPU check on {env['device_name']}{' (dry run)' if results['dry_run'] else ''}: torch "
             f"{env['torch']}, triton {env['triton']}, commit {(env['git_commit'] or 'unknown')[:12]}", ""]
    lines.append(f"1. tests/test_cuda.py, compiled kernels: {_tests_outcome(parts['tests'])}")
    lines.append("2. parity with the eager reference (distance / tolerance, relative to how far training moved "
                 "each tensor; round(m*w); telemetry)" + (f": {_crash(parts['parity'])}" if "error" in parts["parity"]
                                                          else ""))
    for r in parts["parity"].get("cases", []):
        case = r["case"]
        lines.append(f"   {case['model']:<10} {case['dtype']:<9} {case['steps']:>3} steps  {r['max_distance']:.1e} / "
                     f"{case['tolerance']:.0e} ({r['worst']}){'  bit-identical' if r['bit_identical'] else ''}  "
                     f"round(m*w) {'exact' if r['rounded_product'] else 'WRONG'}  l1 error "
                     f"{r['l1_relative_error']:.1e}  {'ok' if r['ok'] else 'FAILED'}")
    lines.append("3. achieved bandwidth, GB/s (fraction of a device-to-device copy's)")
    for r in parts["bandwidth"]:
        if "skipped" in r or "error" in r:
            lines.append(f"   {r.get('set', '?'):<18} {r.get('skipped') or _crash(r)}")
            continue
        lines.append(f"   {r['set']:<18} {r['elements'] / 1e6:>8.1f}M  " + "  ".join(
            f"{name} {r[name]['bandwidth'].median:.4g} ({r[name]['fraction_of_copy'].median:.2f})"
            for name in ("pilot", "fused SGD", "copy")))
    overhead = parts["overhead"]
    if "contenders" in overhead:
        lines.append(f"4. training step, {overhead['model']} batch {overhead['batch_size']}, bf16 autocast, "
                     "channels_last: ms (paired ratio to dense fused SGD)")
        lines += [f"   {name:<18} {_median(r['time'])} ms ({r['ratio_to_dense-fused'].median:.3f}x)"
                  for name, r in overhead["contenders"].items()]
    else:
        lines.append(f"4. training step: {overhead.get('skipped') or _crash(overhead)}")
    host = parts["host"]
    if "variants" in host:
        lines.append(f"5. host side of a steady step, {host['model']}'s parameters: host time, kernels and copies "
                     "per step")
        lines += [f"   {name:<42} {_median(r['host_time'])} us  {r['launches_per_step'].median:g} kernels  "
                  f"{r['copies_per_step'].median:g} copies" for name, r in host["variants"].items()]
    else:
        lines.append(f"5. host side: {host.get('skipped') or _crash(host)}")
    return "\n".join(lines)
