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
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from bench.contenders import CONTENDERS, Contender, Hyper, build_contenders, model_spec
from bench.memory import peak_step_memory
from bench.traffic import count_aten, count_fused_step, optimizer_step_traffic
from pilot import FusedPILoTSGD

REPO = Path(__file__).resolve().parent.parent
N = 10_000


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    with open(out / "results.json") as f:
        return json.load(f), result.stdout, out


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


def test_quick_run_writes_parsable_positive_results(quick_run: tuple[dict[str, Any], str, Path]) -> None:
    results, stdout, out = quick_run
    env = results["environment"]
    assert env["device"] == "cpu" and env["device_name"].startswith("cpu: ") and env["device_name"] in stdout
    assert env["torch"] == torch.__version__ and env["triton"] and env["git_commit"]
    for section in ("optimizer_step", "training_step", "traffic", "kernel"):
        assert results[section], section
    for entry in results["optimizer_step"] + results["training_step"]:
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


def test_quick_run_reports_the_fused_kernels_traffic(quick_run: tuple[dict[str, Any], str, Path]) -> None:
    entry = quick_run[0]["traffic"][0]
    kernel = entry["pilot_kernel"]
    assert kernel["factorised_bytes_per_element"]["median"] == 40
    assert kernel["plain_bytes_per_element"]["median"] == 20
    assert entry["contenders"]["pilot"]["launches"]["median"] == 1
    assert entry["contenders"]["dense-fused"]["bytes_per_parameter"]["median"] == 20


def test_ptx_inspector_reports_registers_spills_and_access_widths(
        quick_run: tuple[dict[str, Any], str, Path]) -> None:
    reports = quick_run[0]["kernel"]
    assert {r["arch"] for r in reports} == {"sm_80", "sm_90a"}
    for r in reports:
        assert 0 < r["registers"]["median"] <= 255 and r["spill_bytes"]["median"] >= 0
        assert r["global_loads_by_bits"].get("128", 0) > 0 and r["global_stores_by_bits"].get("128", 0) > 0


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
