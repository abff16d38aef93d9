"""Micro-benchmarks of one optimizer step per contender and model, with pytest-benchmark.

    pytest bench/ --benchmark-only

They time the real paths, whatever TRITON_INTERPRET says: FusedPILoTSGD's torch.compile path on CPU (its backend
is named explicitly) and its Triton kernel on CUDA (skipped if the kernels were imported interpreted). The
contenders are bench.contenders', built on pilot.reference like the tests' references. bench is imported inside
the fixture, not at module level: a ``pytest`` run over the whole tree collects this file before tests/conftest.py
sets TRITON_INTERPRET, and pilot_kernels must not be imported before that.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

MODELS = ("resnet20", "resnet18", "resnet50")
CONTENDERS = ("dense-foreach", "dense-fused", "reference-foreach", "reference-fused", "pilot")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WARMUP_STEPS = 3  # momentum buffers, torch.compile


@pytest.fixture
def optimizer_step(model: str, contender: str) -> Callable[[], None]:
    import pilot_kernels
    from bench.contenders import Hyper, build_contenders, model_spec

    if DEVICE.type == "cuda" and contender == "pilot" and pilot_kernels.KERNELS_INTERPRETED:
        pytest.skip("the Triton kernel was imported interpreted (TRITON_INTERPRET=1): nothing real to time on CUDA")
    built = build_contenders(model_spec(model), Hyper(), DEVICE, (contender,))[contender]
    built.fill_random_grads(seed=0)
    for _ in range(WARMUP_STEPS):
        built.optimizer.step()

    def step() -> None:
        built.optimizer.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    return step


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("model", MODELS)
def test_optimizer_step(benchmark: Any, optimizer_step: Callable[[], None], model: str, contender: str) -> None:
    benchmark.group = f"optimizer step, {model}, {DEVICE.type}"
    benchmark(optimizer_step)
