"""The torch path keeps its step plan and hyper-parameter tensors across steps (pilot.torch_step.TorchStep): what
changes between steps must still reach the step, bit for bit as if nothing had been kept."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from parity import buckets
from pilot import FusedPILoTSGD


class SmallAndLarge(nn.Module):
    """Small tensors (one static-size call) and one of 2**16 elements (a dynamic-size call of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Linear(12, 8)
        self.other = nn.Linear(8, 8, bias=False)
        self.large = nn.Parameter(torch.randn(256, 256) * 0.05)


def forget_caches(optimizer: FusedPILoTSGD) -> None:
    """Drop every kept plan and scalar tensor: the next step builds them from scratch."""
    for _, bucket in buckets(optimizer):
        bucket.backend.plan = None
        bucket.backend.scalars = {}


def optimizer_of(model: SmallAndLarge, backend: str) -> FusedPILoTSGD:
    return FusedPILoTSGD([{"params": [model.small.weight, model.small.bias, model.large]},
                          {"params": [model.other.weight], "nesterov": True, "momentum": 0.5}],
                         lr=0.05, momentum=0.9, weight_decay=1e-3, alpha=1e-2, backend=backend)


def optimizers(backend: str, twin_backend: str = "") -> tuple[list[nn.Parameter], FusedPILoTSGD,
                                                              list[nn.Parameter], FusedPILoTSGD]:
    """Two copies of one model with an optimizer each (the twin's on ``twin_backend``, default the same)."""
    model = SmallAndLarge()
    twin = copy.deepcopy(model)
    return (list(model.parameters()), optimizer_of(model, backend),
            list(twin.parameters()), optimizer_of(twin, twin_backend or backend))


@pytest.mark.parametrize("backend", ["compile", "eager"])
def test_kept_plan_steps_as_a_fresh_one(backend: str) -> None:
    """Schedule edits (lr, alpha, momentum, dampening, weight decay, maximize, lr as a tensor), a parameter
    without a gradient for two steps, and gradients kept (zero_grad(set_to_none=False)) or replaced: bit for bit
    the step of an optimizer that builds everything anew at every step."""
    params, optimizer, twin_params, twin = optimizers(backend)
    generator = torch.Generator().manual_seed(3)
    for step in range(12):
        grads = [torch.randn(p.shape, generator=generator) * 0.1 for p in params]
        for ps in (params, twin_params):
            for p, g in zip(ps, grads):
                if step % 2 and p.grad is not None:  # the same gradient tensor, written in place
                    p.grad.copy_(g)
                else:
                    p.grad = g.clone()
            if step in (5, 6):
                ps[0].grad = None
                ps[-1].grad = None
        edits = {2: {"lr": 0.02, "alpha": 3e-2}, 4: {"momentum": 0.7, "dampening": 0.2},
                 7: {"weight_decay": 0.0, "maximize": True}, 8: {"maximize": False},
                 10: {"lr": torch.tensor(0.01)}}.get(step, {})
        for o in (optimizer, twin):
            o.param_groups[step % 2].update(edits)
        optimizer.step()
        forget_caches(twin)
        twin.step()
        for p, q in zip(params, twin_params):
            assert torch.equal(p, q), f"step {step}"
            for key, value in optimizer.state[p].items():
                other = twin.state[q][key]
                assert (value is None and other is None) or torch.equal(value, other), f"step {step}: {key}"


@pytest.mark.parametrize("backend", ["compile", "eager"])
def test_changed_lr_reaches_the_kept_plan(backend: str) -> None:
    """lr set to 0 after a step: nothing moves (no plan or scalar went stale); set back, everything moves."""
    params, optimizer, _, _ = optimizers(backend)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.step()
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for group in optimizer.param_groups:
        group["lr"] = 0.05
    optimizer.step()
    assert not any(torch.equal(p, b) for p, b in zip(params, before))


def test_parameter_losing_its_grad_keeps_its_value_and_state() -> None:
    """A parameter without a gradient is left alone by a kept plan's successor, and steps again with one."""
    params, optimizer, _, _ = optimizers("compile")
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.step()
    lost = [params[0], params[-1]]  # a small tensor and the large one
    kept = [p for p in params if all(p is not q for q in lost)]
    for p in lost:
        p.grad = None
    before = {id(p): (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()}) for p in params}
    optimizer.step()
    for p in lost:
        value, state = before[id(p)]
        assert torch.equal(p, value)
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())
    assert not any(torch.equal(p, before[id(p)][0]) for p in kept)
    for p in lost:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert not any(torch.equal(p, before[id(p)][0]) for p in lost)


def test_small_tensors_fall_back_to_eager_when_the_compiler_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler failure for the small tensors' call warns and steps them eagerly, exactly as backend="eager"."""
    class CompilerFailure(Exception):
        __module__ = "torch._inductor.exc"

    def fail(*args: object, **kwargs: object) -> None:
        raise CompilerFailure("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "compile", fail)
    params, optimizer, eager_params, eager = optimizers("compile", "eager")
    with pytest.warns(RuntimeWarning, match="CompilerFailure: no C"):
        for _ in range(3):
            for p, q in zip(params, eager_params):
                p.grad = torch.full_like(p, 0.01)
                q.grad = torch.full_like(q, 0.01)
            optimizer.step()
            eager.step()
    assert buckets(optimizer)[0][0] == "eager"
    for p, q in zip(params, eager_params):
        assert torch.equal(p, q)
