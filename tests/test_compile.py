"""torch.compile: compiled models train unchanged; optimizer.step() inside a compiled function runs eagerly.

The step is ``torch._dynamo.disable``d (it builds kernel tables from tensor addresses on the host): dynamo
breaks the graph around it instead of tracing it, so the surrounding forward and backward stay compiled and
nothing is re-traced per step. (The torch path's own ``torch.compile`` of the factorised step still works
from inside that eager region.)
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn

from pilot import FusedPILoTSGD
from test_parity import SmallCNN, cnn_loss

OPTIONS = dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3)
STEPS = 6


def train(model: nn.Module, backend: str) -> None:
    """STEPS steps of FusedPILoTSGD with a decaying lr, each forward and backward through ``model``."""
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    for seed in range(STEPS):
        optimizer.zero_grad()
        cnn_loss(seed)(model).backward()
        optimizer.step()
        scheduler.step()


def assert_close_models(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):  # inductor may round differently from eager
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "compile"])
def test_compiled_model_trains_unchanged(backend: str) -> None:
    model = SmallCNN()
    reference = copy.deepcopy(model)
    train(reference, backend)
    train(torch.compile(model), backend)  # the compiled module shares model's parameters
    assert_close_models(model, reference)


@pytest.mark.parametrize("backend", ["triton", "compile"])
def test_step_inside_a_compiled_train_step(backend: str) -> None:
    """Forward, backward and step in one compiled function: a graph break at step(), no re-trace per step
    although lr changes every step (the step's hyper-parameters are not guarded on)."""
    model = SmallCNN()
    reference = copy.deepcopy(model)
    train(reference, backend)
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter)
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    frames = []
    for seed in range(STEPS):
        generator = torch.Generator().manual_seed(seed)
        x, y = torch.randn(8, 3, 6, 6, generator=generator), torch.randint(0, 7, (8,), generator=generator)
        train_step(x, y)
        scheduler.step()
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[-1] == frames[1]  # compiled once (the first step lays out the buffers)
    assert_close_models(model, reference)
