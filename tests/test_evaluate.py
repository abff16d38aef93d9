"""BatchNorm recalibration against statistics computed independently, and what it must leave alone."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pilot.evaluate import recalibrate_batchnorm_

DEVICE = torch.device("cpu")


def model_and_batches() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5))
    batches = [(torch.randn(6, 3, 8, 8) * 2 + 1, torch.zeros(6, dtype=torch.long)) for _ in range(3)]
    with torch.no_grad():  # stale statistics, as after training and pruning
        for norm in (model[1], model[6]):
            norm.running_mean.fill_(5.0)
            norm.running_var.fill_(9.0)
    return model, batches


def test_statistics_are_the_average_over_the_batches() -> None:
    model, batches = model_and_batches()
    model.train()
    assert recalibrate_batchnorm_(model, batches, device=DEVICE) == 18
    with torch.no_grad():
        conv = torch.cat([model[0](inputs) for inputs, _ in batches])
        # The cumulative average of the per-batch means and unbiased variances, equal weights per batch.
        per_batch = conv.split(6)
        mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in per_batch]).mean(0)
        var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in per_batch]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert int(model[1].num_batches_tracked) == 3
    # Dropout stayed in eval mode: the second BatchNorm saw the deterministic activations, normalised by the
    # first one with each batch's own statistics.
    with torch.no_grad():
        model.eval()
        norm = model[1]
        head = torch.cat([model[5](model[4](model[3](nn.functional.batch_norm(
            model[0](inputs), None, None, norm.weight, norm.bias, training=True, eps=norm.eps))))
            for inputs, _ in batches])
    assert model.training is False
    torch.testing.assert_close(model[6].running_mean, torch.stack([b.mean(0) for b in head.split(6)]).mean(0))


def test_only_batchnorm_buffers_change_and_modes_are_restored() -> None:
    model, batches = model_and_batches()
    model.eval()
    model[2].train()  # a mixed state to restore
    before = copy.deepcopy(model.state_dict())
    recalibrate_batchnorm_(model, batches, device=DEVICE)
    after = model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {f"{i}.{buffer}" for i in (1, 6) for buffer in ("running_mean", "running_var",
                                                                        "num_batches_tracked")}
    assert [m.training for m in model.modules()] == [False, False, False, True, False, False, False, False]
    assert model[1].momentum == 0.3 and model[6].momentum == 0.1
    assert all(p.grad is None for p in model.parameters())
    again = copy.deepcopy(model)
    recalibrate_batchnorm_(again, batches, device=DEVICE)  # deterministic: the old statistics do not matter
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_models_without_batchnorm_and_empty_batches() -> None:
    plain = nn.Linear(3, 2)
    assert recalibrate_batchnorm_(plain, [(torch.ones(2, 3), None)], device=DEVICE) == 0
    model, _ = model_and_batches()
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm_(model, [], device=DEVICE)
