"""Iterative pruning: WR rewinds to the checkpoint and LRR keeps the weights, both keep the masks; with
FusedPILoTSGD pruned entries stay at (0, 0) with zero momentum; the baselines run under the same driver."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim import Optimizer

from pilot import (FusedPILoTSGD, IterativePruning, ProxSGD, lasso_param_groups, str_param_groups, spred_optimizer,
                   to_str_model)
from test_parity import BACKENDS, SmallCNN, cnn_loss

STEPS = 3


def train(model: nn.Module, optimizer: Optimizer, steps: int = STEPS) -> None:
    loss = cnn_loss()
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()


def pruned_count(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    return sum(int((~keep).sum()) for keep in masks.values())


def assert_masks_hold(model: nn.Module, optimizer: Optimizer, masks: dict[str, torch.Tensor]) -> None:
    for name, keep in masks.items():
        p = model.get_parameter(name)
        assert not p.detach()[~keep].any(), name
        state = optimizer.state.get(p, {})
        for key in ("m", "w", "momentum_buffer_m", "momentum_buffer_w", "momentum_buffer"):
            if state.get(key) is not None:
                assert not state[key][~keep].any(), f"{name}.{key}"


def fused(backend: str):
    return lambda model: FusedPILoTSGD(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-3, weight_decay=1e-3,
                                       backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_rewinding_with_fused_pilot(backend: str) -> None:
    model = SmallCNN()
    driver = IterativePruning(model, fused(backend), mode="wr", keep_rate=0.5)
    seen: list[tuple[dict, FusedPILoTSGD]] = []

    def train_fn(model: nn.Module, optimizer: FusedPILoTSGD, cycle: int) -> int:
        if cycle == 0:
            train(model, optimizer, 2)
            driver.save_rewind_point()  # the early checkpoint, after two steps
        else:
            rewind = driver.rewind_point
            for name, value in model.state_dict().items():  # rewound, masked, and factorised again
                expected = rewind[name].clone()
                if name in driver.masks:
                    expected = expected * driver.masks[name]
                    p = model.get_parameter(name)
                    torch.testing.assert_close(optimizer.state[p]["m"] * optimizer.state[p]["w"], expected)
                torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
            assert_masks_hold(model, optimizer, driver.masks)
        train(model, optimizer)
        assert_masks_hold(model, optimizer, driver.masks)
        seen.append(({name: keep.clone() for name, keep in driver.masks.items()}, optimizer))
        return cycle * 10

    history = driver.run(train_fn, cycles=2)
    assert [c.cycle for c in history] == [0, 1, 2] and [c.result for c in history] == [0, 10, 20]
    total = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    for cycle, sparsity in zip(history, (0.0, 0.5, 0.75)):
        assert cycle.sparsity == pytest.approx(round(sparsity * total) / total)
    assert pruned_count(model, seen[1][0]) == round(0.5 * total)
    for name, keep in seen[1][0].items():  # later masks only add pruned entries
        assert not (seen[2][0][name] & ~keep).any()
    assert len({id(optimizer) for _, optimizer in seen}) == 3  # a fresh optimizer after every rewind


def test_learning_rate_rewinding_with_fused_pilot() -> None:
    model = SmallCNN()
    driver = IterativePruning(model, fused("eager"), mode="lrr", keep_rate=0.8, scope="layer")
    ends: list[dict[str, torch.Tensor]] = []
    optimizers: set[int] = set()

    def train_fn(model: nn.Module, optimizer: FusedPILoTSGD, cycle: int) -> None:
        optimizers.add(id(optimizer))
        assert optimizer.param_groups[0]["lr"] == 0.05 and optimizer.param_groups[0]["alpha"] == 1e-3
        if ends:  # the weights go on from where the last cycle ended, pruned
            for name, value in model.named_parameters():
                expected = ends[-1][name] * driver.masks[name] if name in driver.masks else ends[-1][name]
                assert torch.equal(value.detach(), expected), name
        train(model, optimizer)
        assert_masks_hold(model, optimizer, driver.masks)
        for group in optimizer.param_groups:  # what a scheduler would do during the cycle
            group["lr"] *= 0.1
            group["alpha"] *= 0.5
        ends.append({name: p.detach().clone() for name, p in model.named_parameters()})

    history = driver.run(train_fn, cycles=2)
    assert len(optimizers) == 1
    for keep in driver.masks.values():  # layer scope: every tensor at round(0.36 * n) zeros
        assert int((~keep).sum()) == round((1 - 0.8 ** 2) * keep.numel())
    assert history[-1].sparsity > 0.3


@pytest.mark.parametrize("mode", ["wr", "lrr"])
@pytest.mark.parametrize("baseline", ["dense", "lasso", "str", "spred"])
def test_baselines_keep_their_masks(mode: str, baseline: str) -> None:
    def make_optimizer(model: nn.Module) -> Optimizer:
        if baseline == "dense":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        if baseline == "lasso":
            return ProxSGD(lasso_param_groups(model, l1=1e-3, weight_decay=1e-3), lr=0.05, momentum=0.9)
        if baseline == "str":
            to_str_model(model, s_init=-6.0)
            return torch.optim.SGD(str_param_groups(model, weight_decay=1e-3, s_weight_decay=1e-2), lr=0.05,
                                   momentum=0.9)
        return spred_optimizer(model.parameters(), alpha=1e-3, lr=0.05, momentum=0.9, backend="eager")

    model = SmallCNN()
    driver = IterativePruning(model, make_optimizer, mode=mode, keep_rate=0.6)

    def train_fn(model: nn.Module, optimizer: Optimizer, cycle: int) -> int:
        assert_masks_hold(model, optimizer, driver.masks)
        train(model, optimizer)
        assert_masks_hold(model, optimizer, driver.masks)
        return pruned_count(model, driver.masks)

    history = driver.run(train_fn, cycles=2)
    total = sum(keep.numel() for keep in driver.masks.values())
    assert [c.result for c in history] == [0, round(0.4 * total), round(0.64 * total)]
    assert all(c.sparsity >= target - 1e-9 for c, target in zip(history, (0.0, 0.4, 0.64)))


def test_bad_arguments() -> None:
    model = SmallCNN()
    with pytest.raises(ValueError, match="mode"):
        IterativePruning(model, fused("eager"), mode="rewind")
    with pytest.raises(ValueError, match="keep_rate"):
        IterativePruning(model, fused("eager"), mode="wr", keep_rate=1.0)
    with pytest.raises(ValueError, match="scope"):
        IterativePruning(model, fused("eager"), mode="wr", scope="all")
    with pytest.raises(ValueError, match="cycles"):
        IterativePruning(model, fused("eager"), mode="wr").run(lambda *args: None, cycles=-1)
    with pytest.raises(TypeError, match="make_optimizer returned"):
        IterativePruning(model, lambda m: None, mode="wr").run(lambda *args: None, cycles=0)
