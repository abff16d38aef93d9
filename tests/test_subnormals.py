"""pilot.train.subnormals: the probe that a run records, and why the entry point flushes before any tensor work.

The floating-point state is per thread and fixed for a process's intra-op pool once it exists, so each case runs
in a fresh interpreter. That ``python -m pilot.train`` itself records a flushed run is checked by test_torchrun.py
(its jobs start through the entry point).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = "from pilot.train.subnormals import flush_subnormals, subnormals_flushed\n"
START_POOL = "import torch\n(torch.ones(1 << 22) * 2).sum()\n"  # a parallel operation creates the intra-op pool


def probe(code: str) -> str:
    environment = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code + "print(subnormals_flushed())"], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("code, flushed", [
    (IMPORT, "False"),                                       # torch's default: subnormals are computed
    (IMPORT + "flush_subnormals()\n" + START_POOL, "True"),  # before the pool: every thread inherits it
    (START_POOL + IMPORT + "flush_subnormals()\n", "False"),  # after: the pool's threads keep computing them
], ids=["default", "flushed-first", "flushed-late"])
def test_the_probe_sees_whether_every_thread_flushes(code: str, flushed: str) -> None:
    assert probe(code) == flushed
