"""python -m bench.gpu: the dry run of its plan end to end (CPU, tiny sizes, the kernel interpreted), and its budget
and exit status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import gpu_run

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_runs_every_part_and_writes_the_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command settles it itself
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "gpu.json").read_text())
    parts = results["parts"]
    assert results["dry_run"] and not results["failures"]
    assert parts["tests"]["ok"] and parts["tests"]["tests"] > 0  # every CUDA test skips on a CPU
    assert [c["case"]["dtype"] for c in parts["parity"]["cases"]] == ["float32", "bfloat16"]
    assert all(c["ok"] and c["rounded_product"] for c in parts["parity"]["cases"])
    assert [r["set"] for r in parts["bandwidth"]] == ["small-cnn", "synthetic 8.19e+03"]
    for record in parts["bandwidth"]:
        assert record["pilot"]["bytes"] == 40 * record["factorised"] + 20 * record["plain"]
        assert record["copy"]["fraction_of_copy"]["median"] == 1.0
    assert set(parts["overhead"]["contenders"]) == {"dense-fused", "pilot", "reference-foreach"}
    assert len(parts["host"]["variants"]) == 5
    assert all(v["host_time"]["median"] > 0 for v in parts["host"]["variants"].values())
    for heading in ("1. tests", "2. parity", "3. achieved bandwidth", "4. training step", "5. host side"):
        assert heading in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("ok in ")


def _stub_parts(monkeypatch: pytest.MonkeyPatch, parity_ok: bool) -> None:
    monkeypatch.setattr(gpu_run, "cuda_tests", lambda out, timeout: {"ok": True, "tests": 1, "failures": 0,
                                                                     "errors": 0, "skipped": 0, "failed": []})
    case = {"case": {"model": "small-cnn", "dtype": "float32", "steps": 1, "tolerance": 1e-3},
            "max_distance": 0.5, "worst": "conv1.weight.m", "bit_identical": False, "rounded_product": True,
            "l1_relative_error": 0.0, "ok": parity_ok}
    monkeypatch.setattr(gpu_run, "parity", lambda cases, device: {"ok": parity_ok, "cases": [case]})


@pytest.mark.parametrize("parity_ok", [True, False])
def test_budget_cuts_the_measurements_and_failures_set_the_exit_status(
        parity_ok: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With no budget left, parts 3 to 5 are skipped, and say so; a parity failure makes the exit status 1."""
    _stub_parts(monkeypatch, parity_ok)
    status = gpu_run.run(tmp_path, budget_seconds=1e-9, dry_run=True)
    assert status == (0 if parity_ok else 1)
    results: dict[str, Any] = json.loads((tmp_path / "gpu.json").read_text())
    parts = results["parts"]
    assert all("skipped" in record for record in parts["bandwidth"])
    assert "skipped" in parts["overhead"] and "skipped" in parts["host"]
    assert results["failures"] == ([] if parity_ok else ["parity: small-cnn float32"])
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("ok in" if parity_ok else "FAILED: parity: small-cnn float32")


def test_a_part_that_crashes_is_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An exception in a part (a kernel that faults, say) is recorded with its traceback and fails the run; a
    timed-out test run too."""
    _stub_parts(monkeypatch, True)
    monkeypatch.setattr(gpu_run, "cuda_tests", lambda out, timeout: {"ok": False, "timed_out": timeout})

    def crash(cases: Any, device: Any) -> None:
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(gpu_run, "parity", crash)
    assert gpu_run.run(tmp_path, budget_seconds=1e-9, dry_run=True) == 1
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["failures"] == ["tests: timed out after 300 s", "parity: RuntimeError: illegal memory access"]
    assert "RuntimeError: illegal memory access" in results["parts"]["parity"]["error"]
    out = capsys.readouterr().out
    assert "1. tests/test_cuda.py, compiled kernels: timed out after 300 s" in out
    assert "crashed: RuntimeError: illegal memory access" in out
