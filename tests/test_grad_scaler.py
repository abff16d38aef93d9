"""torch.amp.GradScaler drives FusedPILoTSGD as a fused optimizer: unscale on load, skip on found_inf."""
from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
from torch import nn

from pilot import FusedPILoTSGD
from test_parity import BACKENDS, SmallCNN, cnn_loss

OPTIONS = dict(lr=0.05, momentum=0.9, dampening=0.3, alpha=1e-2, weight_decay=1e-3)  # dampening: see the first step


def snapshot(model: nn.Module, optimizer: FusedPILoTSGD) -> dict:
    state = {(i, key): None if value is None else value.clone()
             for i, p in enumerate(model.parameters()) for key, value in optimizer.state[p].items()}
    return {"params": [p.detach().clone() for p in model.parameters()], "state": state,
            "l1": optimizer.l1_norm(), "density": optimizer.density()}


def assert_same(a: dict, b: dict) -> None:
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    assert a["state"].keys() == b["state"].keys()
    for key, value in a["state"].items():
        other = b["state"][key]
        assert (value is None) == (other is None), key
        assert value is None or torch.equal(value, other), key
    assert a["l1"] == b["l1"] and a["density"] == b["density"]


def scaled_step(model: nn.Module, optimizer: FusedPILoTSGD, scaler: torch.amp.GradScaler, seed: int,
                poison: bool = False, clip: Optional[float] = None) -> None:
    optimizer.zero_grad()
    scaler.scale(cnn_loss(seed)(model)).backward()
    if poison:  # one overflowing gradient entry: GradScaler must skip the whole step
        model.conv.weight.grad[0, 0, 0, 0] = float("inf")
    if clip is not None:
        scaler.unscale_(optimizer)  # then step() gets found_inf but no grad_scale
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()


def plain_step(model: nn.Module, optimizer: FusedPILoTSGD, seed: int, clip: Optional[float] = None) -> None:
    optimizer.zero_grad()
    cnn_loss(seed)(model).backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_with_an_inf_gradient_changes_nothing(backend: str) -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for seed in range(3):
        scaled_step(model, optimizer, scaler, seed)
    before = snapshot(model, optimizer)
    scaled_step(model, optimizer, scaler, 5, poison=True)
    assert scaler.get_scale() == 2.0 ** 11  # the scaler saw the inf ...
    assert_same(before, snapshot(model, optimizer))  # ... and x, m, w, buffers and telemetry are untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_training_equals_unscaled_training(backend: str) -> None:
    """Power-of-two scales make scaling and unscaling exact: the runs agree bit for bit, skipped steps included.

    The very first step overflows: it must stay a *first* momentum step (b = g at the next step). With
    dampening != 0 a buffer that merely started from zero would give b = (1 - dampening) g instead.
    """
    model = SmallCNN()
    reference_model = copy.deepcopy(model)
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
    reference = FusedPILoTSGD(reference_model.parameters(), backend=backend, **OPTIONS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    poisoned = {0, 5}
    scales = set()
    for seed in range(8):
        scaled_step(model, optimizer, scaler, seed, poison=seed in poisoned)
        scales.add(scaler.get_scale())
        if seed not in poisoned:
            plain_step(reference_model, reference, seed)
    assert scales == {2.0 ** 9, 2.0 ** 10, 2.0 ** 11}  # it shrank and grew on the way
    assert_same(snapshot(reference_model, reference), snapshot(model, optimizer))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_after_a_skipped_first_step_says_momentum_has_not_started(backend: str) -> None:
    """The device knows the first momentum step did not happen: a checkpoint taken then says so."""
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
    scaled_step(model, optimizer, torch.amp.GradScaler("cpu"), 0, poison=True)
    saved = optimizer.state_dict()["state"]
    assert all(state["momentum_started"] is False for state in saved.values())
    assert all(optimizer.state[p][key] is None for p in model.parameters() for key in optimizer.state[p]
               if key.startswith("momentum_buffer"))
    resumed_model = copy.deepcopy(model)
    resumed = FusedPILoTSGD(resumed_model.parameters(), backend=backend, **OPTIONS)
    resumed.load_state_dict(optimizer.state_dict())
    for m, opt in ((model, optimizer), (resumed_model, resumed)):
        plain_step(m, opt, 1)
    assert_same(snapshot(model, optimizer), snapshot(resumed_model, resumed))


@pytest.mark.parametrize("backend", ["triton", "compile"])
def test_unscale_then_clip(backend: str) -> None:
    """unscale_ before step (gradient clipping): the optimizer gets found_inf and no scale."""
    model = SmallCNN()
    reference_model = copy.deepcopy(model)
    optimizer = FusedPILoTSGD(model.parameters(), backend=backend, **OPTIONS)
    reference = FusedPILoTSGD(reference_model.parameters(), backend=backend, **OPTIONS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for seed in range(4):
        scaled_step(model, optimizer, scaler, seed, poison=seed == 2, clip=0.5)
        if seed != 2:
            plain_step(reference_model, reference, seed, clip=0.5)
    # clipping divides by the (scaled, then unscaled) norm: equal up to the norm's rounding
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
