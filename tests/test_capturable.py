"""capturable=True: lr and alpha come from device tensors, the step never syncs with the host.

Here the kernel runs in Triton's interpreter on CPU tensors; CUDA graph capture itself is tested in
test_cuda.py (skipped without a GPU).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from pilot import FusedPILoTSGD
from parity import buckets
from test_parity import SmallCNN, cnn_loss

OPTIONS = dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3)


def train_step(model: nn.Module, optimizer: FusedPILoTSGD, seed: int) -> None:
    optimizer.zero_grad(set_to_none=False)  # fixed gradient addresses, as CUDA graph capture needs
    cnn_loss(seed)(model).backward()
    optimizer.step()


def test_lr_and_alpha_become_device_tensors() -> None:
    model = SmallCNN()
    lr = torch.tensor(0.05)
    optimizer = FusedPILoTSGD([{"params": [model.conv.weight], "lr": lr}, {"params": [model.head.weight]}],
                              lr=0.1, alpha=1e-3, capturable=True)
    for group in optimizer.param_groups:
        for key in ("lr", "alpha"):
            assert isinstance(group[key], torch.Tensor) and group[key].dim() == 0
            assert group[key].dtype == torch.float32
    assert optimizer.param_groups[0]["lr"] is lr  # the caller's tensor: its in-place edits reach the step
    assert optimizer.param_groups[0]["alpha"] is not optimizer.param_groups[1]["alpha"]  # not shared via defaults


@pytest.mark.parametrize("backend", ["compile", "eager"])
def test_capturable_needs_the_triton_path(backend: str) -> None:
    with pytest.raises(ValueError, match="capturable=True needs the Triton kernel"):
        FusedPILoTSGD(SmallCNN().parameters(), capturable=True, backend=backend)
    with pytest.raises(TypeError, match="capturable"):
        FusedPILoTSGD(SmallCNN().parameters(), capturable=1)


def test_schedules_through_device_tensors_match_the_host_path() -> None:
    """torch's LR scheduler fills the lr tensor in place, alpha is edited in place: bit-identical training."""
    model = SmallCNN()
    host_model = copy.deepcopy(model)
    optimizer = FusedPILoTSGD(model.parameters(), capturable=True, **OPTIONS)
    host = FusedPILoTSGD(host_model.parameters(), **OPTIONS)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (optimizer, host)]
    lr_tensor = optimizer.param_groups[0]["lr"]
    for step in range(6):
        optimizer.param_groups[0]["alpha"].fill_(1e-2 * 1.5 ** step)
        host.param_groups[0]["alpha"] = 1e-2 * 1.5 ** step
        for m, o in ((model, optimizer), (host_model, host)):
            train_step(m, o, step)
        for scheduler in schedulers:
            scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(host.param_groups[0]["lr"])
    for p, q in zip(model.parameters(), host_model.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, host.state[q][key]), key


def test_steady_state_step_neither_syncs_nor_rebuilds_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """After warm-up a step reads nothing back from the device and uploads no table (what capture requires),
    also with GradScaler's found_inf and scale, which the kernel consumes on the device."""
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), capturable=True, **OPTIONS)
    train_step(model, optimizer, 0)
    (_, bucket), = buckets(optimizer)
    tables = (bucket.backend.tensor_table[1], bucket.backend.hyper_table[1], dict(bucket.backend.block_tables))
    optimizer.param_groups[0]["lr"].fill_(0.01)
    optimizer.zero_grad(set_to_none=False)
    cnn_loss(1)(model).backward()
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(1.0), torch.tensor(0.0)  # as GradScaler.step sets them

    def no_sync(*args, **kwargs):
        raise AssertionError("the step read a tensor's value on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, no_sync)
        optimizer.step()
    assert bucket.backend.tensor_table[1] is tables[0] and bucket.backend.hyper_table[1] is tables[1]
    assert bucket.backend.block_tables == tables[2]
    assert bucket.backend.hyper_table[1][0, 0].item() == pytest.approx(0.01)  # the new lr reached the device table


def test_assigning_a_number_is_a_clear_error() -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), capturable=True, **OPTIONS)
    train_step(model, optimizer, 0)
    optimizer.param_groups[0]["alpha"] = 0.5  # e.g. a schedule that assigns instead of filling in place
    with pytest.raises(TypeError, match=r"alpha was set to float 0.5.*fill_"):
        train_step(model, optimizer, 1)


def test_state_dict_round_trip_keeps_tensors() -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), capturable=True, **OPTIONS)
    train_step(model, optimizer, 0)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = FusedPILoTSGD(resumed_model.parameters(), capturable=True)
    resumed.load_state_dict(torch.load(buffer))
    group = resumed.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].item() == pytest.approx(0.05)
    assert group["lr"] is not optimizer.param_groups[0]["lr"]  # its own tensor, not the saved one
    for m, o in ((model, optimizer), (resumed_model, resumed)):
        train_step(m, o, 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))
