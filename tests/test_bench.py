"""bench/: a --quick run end to end, the traffic counters on known figures, peak memory, the PTX inspector's fields.

The --quick run is a subprocess without TRITON_INTERPRET (bench times and compiles the real kernels), on one
thread so that other load on the machine cannot stall it; the counters run here, where conftest.py has the kernels
interpreted, which is what the fused-kernel counter needs.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pytest
import torch
from torch import nn

from bench.contenders import (BASELINE, CONTENDERS, REFERENCES, STEP_CONTENDERS, Contender, Hyper, build_contenders,
                              model_spec, reference_step_with_products, with_products)
from bench.memory import peak_step_memory
from bench.quiet import KINETO_LINE, kineto_log_captured
from bench.report import evaluate_targets
from bench.suite import MEMORY_RATIO_KEY, ratio_key
from bench.timing import Stats
from bench.traffic import (GPUS, GpuModel, Traffic, count_aten, count_fused_step, little_law_bandwidth,
                           optimizer_step_traffic, reparametrisation_traffic)
from pilot import FusedPILoTSGD

REPO = Path(__file__).resolve().parent.parent
N = 10_000
PROGRESS_LINE = re.compile(r"^\[\d/4\] ")


class QuickRun(NamedTuple):
    results: dict[str, Any]
    stdout: str
    stderr: str
    out: Path


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    with open(out / "results.json") as f:
        return QuickRun(json.load(f), result.stdout, result.stderr, out)


def figures(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every {min, median, max, unit, samples} figure in results.json, with where it is."""
    if isinstance(node, dict):
        if {"min", "median", "max", "unit"} <= node.keys():
            yield path, node
            return
        for key, value in node.items():
            yield from figures(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from figures(value, f"{path}[{index}]")


def test_quick_run_writes_parsable_positive_results(quick_run: QuickRun) -> None:
    results, stdout, out = quick_run.results, quick_run.stdout, quick_run.out
    env = results["environment"]
    assert env["device"] == "cpu" and env["device_name"].startswith("cpu: ") and env["device_name"] in stdout
    assert env["torch"] == torch.__version__ and env["triton"] and env["git_commit"]
    for section in ("optimizer_step", "training_step", "traffic", "kernel"):
        assert results[section], section
    for entry in results["optimizer_step"]:
        assert set(entry["contenders"]) == set(STEP_CONTENDERS)
    for entry in results["training_step"]:
        assert set(entry["contenders"]) == set(CONTENDERS)
    found = list(figures(results))
    assert len(found) > 100
    for where, figure in found:
        assert figure["unit"] and figure["samples"] >= 1, where
        assert math.isfinite(figure["min"]) and 0 <= figure["min"] <= figure["median"] <= figure["max"], where
        counted = figure["unit"] == "count" or where.endswith(".spill_bytes")
        assert counted or figure["min"] > 0, where  # zero launches / ops / spills are legitimate counts
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])


def test_quick_run_prints_only_tables_and_progress(quick_run: QuickRun) -> None:
    """No profiler, CUDA-probe or library log lines: stderr is the progress lines, stdout the tables."""
    noise = [line for line in quick_run.stderr.splitlines() if not PROGRESS_LINE.match(line)]
    assert not noise, noise
    assert not [line for line in quick_run.stdout.splitlines() if KINETO_LINE.match(line) or ".py:" in line]
    assert quick_run.stdout.startswith("pilot bench on cpu: ") and "Targets" in quick_run.stdout


def test_quick_run_reports_the_fused_kernels_traffic(quick_run: QuickRun) -> None:
    entry = quick_run.results["traffic"][0]
    kernel = entry["pilot_kernel"]
    assert kernel["factorised_bytes_per_element"]["median"] == 40
    assert kernel["plain_bytes_per_element"]["median"] == 20
    assert entry["contenders"]["pilot"]["launches"]["median"] == 1
    assert entry["contenders"]["dense-fused"]["bytes_per_parameter"]["median"] == 20


def test_ptx_inspector_reports_registers_spills_and_access_widths(quick_run: QuickRun) -> None:
    reports = quick_run.results["kernel"]
    assert {r["arch"] for r in reports} == {"sm_80", "sm_90a"}
    for r in reports:
        assert 0 < r["registers"]["median"] <= 255 and r["spill_bytes"]["median"] >= 0
        assert r["global_loads_by_bits"].get("128", 0) > 0 and r["global_stores_by_bits"].get("128", 0) > 0


def test_kernel_section_models_bytes_in_flight_and_bandwidth(quick_run: QuickRun) -> None:
    """From the compiled kernel: programs per SM (registers, warps) times the bytes each loads before its first store
    (fp32: g, m, w, b_m, b_w, 20 B per element), against the GPU of the architecture; printed as a model."""
    from pilot_kernels import pilot_sgd

    for r in quick_run.results["kernel"]:
        gpu = GPUS[r["model_gpu"]]
        assert gpu.arch == r["arch"] and r["x_dtype"] == "float32"
        ctas = r["ctas_per_sm"]["median"]
        assert ctas >= 1
        in_flight = r["model_bytes_in_flight_per_sm"]["median"]
        assert in_flight == ctas * pilot_sgd.BLOCK_SIZE * 20
        assert (r["model_bytes_needed_in_flight_per_sm"]["median"], r["model_bandwidth_fraction"]["median"]) == \
            pytest.approx(little_law_bandwidth(in_flight, gpu))
    section = quick_run.stdout.split("4. Fused kernel")[1]
    assert "KB in flight/SM*" in section and "* a model, not a measurement" in section


def test_little_law_bandwidth_model() -> None:
    """Needed in flight: bandwidth * latency / SMs; the fraction of peak saturates at 1."""
    gpu = GpuModel("sm_90a", sms=100, bandwidth=2e12, latency=500e-9)
    assert little_law_bandwidth(5_000, gpu) == pytest.approx((10_000, 0.5))
    assert little_law_bandwidth(40_000, gpu)[1] == 1.0


def test_traffic_of_one_elementwise_op() -> None:
    a, b = torch.randn(N), torch.randn(N)
    add = count_aten(lambda: torch.add(a, b))
    assert (add.read, add.written, add.ops) == (8 * N, 4 * N, 1)  # read a and b, write the sum: 12 bytes each
    assert count_aten(lambda: a.add_(b)).bytes == 12 * N
    assert count_aten(lambda: a.copy_(b)).bytes == 8 * N  # copy_ does not read its destination
    assert count_aten(lambda: a.view(2, -1).t()).ops == 0  # views move nothing


def test_traffic_of_dense_sgd_steps() -> None:
    contenders = build_contenders(model_spec("lenet300-100"), Hyper(), torch.device("cpu"),
                                  ("dense-foreach", "dense-fused"))
    parameters = sum(p.numel() for p in contenders["dense-fused"].model.parameters())
    fused = optimizer_step_traffic(contenders["dense-fused"])
    assert (fused.bytes, fused.ops) == (20 * parameters, 1)  # read x, g, b; write x, b
    foreach = optimizer_step_traffic(contenders["dense-foreach"])
    assert foreach.bytes == 44 * parameters  # g + wd*x, b*momentum, b += g, x -= lr*b as separate passes


def test_fused_kernel_counter_sees_only_active_lanes() -> None:
    torch.manual_seed(0)
    model = nn.Linear(37, 29)  # 1073 weights: one full block and a masked tail of 49 lanes; 29 plain biases
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.1, momentum=0.9, alpha=1e-4, backend="triton")
    count = count_fused_step(Contender("pilot", model, optimizer), "linear")
    assert (count.factorised_elements, count.plain_elements, count.launches) == (1073, 29, 1)
    assert count.stream_bytes("factorised") == 40 * 1073 and count.stream_bytes("plain") == 20 * 29
    assert count.outside.ops == 0
    # GradScaler's step: the kernel writes the unscaled gradient back, 4 B more per fp32 element
    amp = count_fused_step(Contender("pilot", model, optimizer), "linear", grad_scale=1024.0)
    assert amp.stream_bytes("factorised") == 44 * 1073 and amp.stream_bytes("plain") == 24 * 29
    assert amp.stores["factorised g"] == 4 * 1073 and amp.outside.ops == 0


def test_peak_memory_counts_each_storage_once_and_only_the_contenders() -> None:
    with torch.profiler.profile(profile_memory=True):  # the allocator now knows this block's size...
        stale = [torch.ones(4 * N)]

    def build():  # noqa: ANN202
        stale.clear()  # ... and frees it inside the next session: it was never the contender's
        held = torch.ones(N)

        def step() -> None:
            scratch = torch.ones(2 * N)
            views = [scratch.view(2, -1), scratch[::2], scratch.t()]  # no new storage
            result = scratch * 2
            del views, scratch, result

        step.held = held  # keep it alive with the step
        return step

    peak = peak_step_memory(build, torch.device("cpu"))
    assert 5 * 4 * N <= peak < 5 * 4 * N + 1024  # held + scratch + result, each once


def test_host_time_times_the_step_without_the_kernel() -> None:
    """bench.host_time steps with the launch stubbed out: the parameters stay as the optimizer initialised them
    (m0 * w0), and the real launcher is back afterwards."""
    from bench.host_time import host_time_us
    from pilot_kernels import pilot_sgd

    launch = pilot_sgd.launch_pilot_sgd
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    initialised = [p.detach().clone() for p in FusedPILoTSGD(copy.deepcopy(model).parameters()).param_groups[0]
                   ["params"]]
    times = host_time_us(model, samples=2, steps=3)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initialised))
    assert pilot_sgd.launch_pilot_sgd is launch


KINETO_SAMPLE = "USDT:2026-11-23 16:51:25 3492:3492 SyncActivityProfilerHandler.cpp:39] profiler_start\n"


def test_kineto_log_lines_are_dropped_and_everything_else_passed_on(capfd: pytest.CaptureFixture[str]) -> None:
    with kineto_log_captured():
        os.write(2, KINETO_SAMPLE.encode())  # native code writes to the descriptor, not to sys.stderr
        os.write(2, b"a warning that matters\n")
    assert capfd.readouterr().err == "a warning that matters\n"


def test_kineto_log_is_passed_on_when_the_measurement_fails(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="measurement failed"):
        with kineto_log_captured():
            os.write(2, KINETO_SAMPLE.encode())
            raise RuntimeError("measurement failed")
    assert capfd.readouterr().err == KINETO_SAMPLE


def test_reference_step_with_products_does_the_counted_product_work() -> None:
    """The timed '+ products' step moves what section 3 counts for the reference: its step plus both products."""
    for reference in REFERENCES:
        contenders = build_contenders(model_spec("lenet300-100"), Hyper(), torch.device("cpu"), (reference,))
        contender = contenders[reference]
        counted = optimizer_step_traffic(contender) + sum(reparametrisation_traffic(contender).values(), Traffic())
        contender.fill_random_grads(seed=0)  # as section 1 leaves the parameters that are not factorised
        step = reference_step_with_products(contender, seed=0)
        factors_before = [p.detach().clone() for p in contender.trained]
        timed = count_aten(step)
        assert (timed.bytes, timed.ops) == (counted.bytes, counted.ops), reference
        assert any(not torch.equal(before, p) for before, p in zip(factors_before, contender.trained))
    with pytest.raises(ValueError, match="no factorised weights"):
        reference_step_with_products(build_contenders(model_spec("lenet300-100"), Hyper(), torch.device("cpu"),
                                                      ("dense-fused",))["dense-fused"], seed=0)


def _results(step_ratio: float, pilot_peak: float, reference_peak: float) -> dict[str, Any]:
    """A CPU run's results reduced to what the timing and memory targets read."""
    step = {ratio_key(BASELINE): Stats.exact(1.0, "x"),
            **{ratio_key(with_products(r)): Stats.exact(step_ratio, "x") for r in REFERENCES},
            **{ratio_key(r): Stats.exact(1.0, "x") for r in REFERENCES}}  # the step alone: not a target any more
    peaks = {"pilot": pilot_peak, **{r: reference_peak for r in REFERENCES}}
    training = {name: {"peak_memory": Stats.exact(peak, "MiB"), ratio_key(BASELINE): Stats.exact(1.0, "x"),
                       MEMORY_RATIO_KEY: Stats.exact(1.0, "x")} for name, peak in peaks.items()}
    return {"environment": {"device": "cpu"},
            "optimizer_step": [{"model": "resnet20", "contenders": {"pilot": step}}],
            "training_step": [{"model": "resnet20", "batch_size": 16, "contenders": training}]}


def _met(results: dict[str, Any], words: str) -> list[bool]:
    return [t["met"] for t in evaluate_targets(results) if words in t["target"]]


def test_step_target_compares_with_the_reference_step_and_its_products() -> None:
    """Only the foreach reference: half the fused reference's time would be under the memory floor."""
    assert _met(_results(0.5, 10.0, 10.0), "step + its products") == [True]
    assert _met(_results(0.51, 10.0, 10.0), "step + its products") == [False]


def test_the_cpu_step_limit_is_per_model() -> None:
    results = _results(0.5, 10.0, 10.0)
    step = results["optimizer_step"][0]["contenders"]["pilot"]
    step[ratio_key(BASELINE)] = Stats.exact(2.9, "x")
    assert _met(results, "dense fused SGD's step time") == [True]  # resnet20: 3.0x
    results["optimizer_step"][0]["model"] = "resnet18"
    assert _met(results, "dense fused SGD's step time") == [False]  # 2.5x


def test_memory_target_accepts_equal_peaks_and_pilots_bookkeeping_only() -> None:
    assert _met(_results(0.5, 100.0, 100.0), "peak memory") == [True, True]  # equal: the floor
    assert _met(_results(0.5, 100.05, 100.0), "peak memory") == [True, True]  # padding and telemetry: 0.05%
    assert _met(_results(0.5, 100.5, 100.0), "peak memory") == [False, False]  # 0.5% more: a real cost
