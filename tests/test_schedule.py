"""Alpha schedules: Algorithm 1 on scripted accuracy / L1 sequences, the relative threshold, the fixed schedules,
state dicts, composition with torch LR schedulers and argument checks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pilot.schedule import effective_density
from pilot import (ConstantAlpha, FusedPILoTSGD, GeometricAlpha, HarmonicAlpha, PILoTSchedule, QuadraticAlpha,
                   alpha_schedule)

ALPHA = 0.01


def make_optimizer() -> FusedPILoTSGD:
    """Three groups: a factorised one, a plain one (reparam=False) and a mixed one (a weight and a bias)."""
    torch.manual_seed(0)
    layer, plain, mixed = nn.Linear(4, 3), nn.Linear(2, 2), nn.Linear(3, 2)
    return FusedPILoTSGD([{"params": [layer.weight]},
                          {"params": list(plain.parameters()), "reparam": False, "alpha": 0.5},
                          {"params": list(mixed.parameters()), "alpha": 2 * ALPHA}],
                         lr=0.1, alpha=ALPHA, backend="eager")


def scripted_l1(monkeypatch: pytest.MonkeyPatch, schedule: PILoTSchedule, values: list[float]) -> None:
    """l1_norm() returns values[k - 1] during the k-th step (the rule may or may not ask for it)."""
    monkeypatch.setattr(schedule.optimizer, "l1_norm", lambda: values[schedule.k - 1])


def test_algorithm_1_on_scripted_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizer = make_optimizer()
    schedule = PILoTSchedule(optimizer, factor=2.0, threshold=1.0, total=10)
    # k:          1     2      3     4     5     6 (> total/2)
    accuracy = [0.50, 0.40, 0.60, 0.60, 0.70, 0.80]
    l1 = [2.0, 2.0, 0.5, 1.0, 3.0, 3.0]
    # grow: all hold; shrink: accuracy dropped; shrink: L1 below K; grow: equal accuracy and L1 == K hold;
    # grow; shrink: second half
    expected = [2, 1, 0.5, 1, 2, 1]
    scripted_l1(monkeypatch, schedule, l1)
    for acc, multiplier in zip(accuracy, expected):
        alphas = schedule.step(acc)
        assert alphas == pytest.approx([ALPHA * multiplier, 2 * ALPHA * multiplier])
        assert optimizer.param_groups[0]["alpha"] == pytest.approx(ALPHA * multiplier)
        assert optimizer.param_groups[2]["alpha"] == pytest.approx(2 * ALPHA * multiplier)
        assert optimizer.param_groups[1]["alpha"] == 0.5  # no factorised parameter: untouched
    assert schedule.k == 6 and schedule.previous_accuracy == 0.8


def test_first_step_compares_with_zero_accuracy(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizer = make_optimizer()
    schedule = PILoTSchedule(optimizer, factor=3.0, threshold=0.0, total=2)
    scripted_l1(monkeypatch, schedule, [1.0, 1.0])
    assert schedule.step(0.0)[0] == pytest.approx(3 * ALPHA)  # 0 >= 0, k = 1 <= 1
    assert schedule.step(1.0)[0] == pytest.approx(ALPHA)  # k = 2 > total / 2


def test_relative_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizer = make_optimizer()
    initial = optimizer.l1_norm()
    assert initial > 0
    schedule = PILoTSchedule(optimizer, factor=2.0, threshold=0.25, total=100, relative_threshold=True)
    assert schedule.threshold == pytest.approx(0.25 * initial)
    scripted_l1(monkeypatch, schedule, [0.3 * initial, 0.2 * initial])
    assert schedule.step(0.5)[0] == pytest.approx(2 * ALPHA)  # 0.3 of the initial norm >= 0.25
    assert schedule.step(0.5)[0] == pytest.approx(ALPHA)  # 0.2 < 0.25


def test_state_dict_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = make_optimizer(), make_optimizer()
    schedule = PILoTSchedule(first, factor=2.0, threshold=0.1, total=8)
    scripted_l1(monkeypatch, schedule, [1.0] * 4)
    for acc in (0.3, 0.5, 0.4):
        schedule.step(acc)
    state = schedule.state_dict()
    assert "optimizer" not in state
    restored = PILoTSchedule(second, factor=5.0, threshold=9.0, total=1)
    restored.load_state_dict(state)
    second.load_state_dict(first.state_dict())  # the optimizer's state carries the alphas
    assert (restored.k, restored.previous_accuracy, restored.threshold, restored.factor, restored.total) == \
        (3, 0.4, 0.1, 2.0, 8)
    scripted_l1(monkeypatch, restored, [1.0] * 4)
    assert restored.step(0.45) == schedule.step(0.45)


def test_composes_with_torch_lr_scheduler() -> None:
    optimizer = make_optimizer()
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    alpha_scheduler = GeometricAlpha(optimizer, rate=0.9)
    for epoch in range(1, 4):
        optimizer.zero_grad()
        optimizer.param_groups[0]["params"][0].sum().backward()
        optimizer.step()
        lr_scheduler.step()
        alpha_scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** epoch)
        assert optimizer.param_groups[0]["alpha"] == pytest.approx(ALPHA * 0.9 ** epoch)


@pytest.mark.parametrize("name, multiplier", [
    ("constant", lambda k: 1.0), ("harmonic", lambda k: 1 / (k + 1)), ("quadratic", lambda k: 1 / (k + 1) ** 2),
    ("geometric", lambda k: 0.95 ** k)])
def test_fixed_schedules(name: str, multiplier) -> None:
    optimizer = make_optimizer()
    schedule = alpha_schedule(name, optimizer)
    assert type(schedule) is {"constant": ConstantAlpha, "harmonic": HarmonicAlpha, "quadratic": QuadraticAlpha,
                              "geometric": GeometricAlpha}[name]
    for k in range(1, 6):
        schedule.step()
        assert optimizer.param_groups[0]["alpha"] == pytest.approx(ALPHA * multiplier(k))
        assert optimizer.param_groups[2]["alpha"] == pytest.approx(2 * ALPHA * multiplier(k))
        assert optimizer.param_groups[1]["alpha"] == 0.5
    restored = alpha_schedule(name, make_optimizer())
    restored.load_state_dict(schedule.state_dict())
    assert restored.step() == schedule.step()


@pytest.mark.parametrize("kwargs, argument", [
    (dict(factor=0.5, threshold=1.0, total=10), "factor"),
    (dict(factor=float("inf"), threshold=1.0, total=10), "factor"),
    (dict(factor=2.0, threshold=-1.0, total=10), "threshold"),
    (dict(factor=2.0, threshold=1.0, total=10, signal="l2"), "signal"),
    (dict(factor=2.0, threshold=1.0, total=0), "total"),
    (dict(factor=2.0, threshold=1.0, total=2.5), "total"),
])
def test_pilot_schedule_rejects_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        PILoTSchedule(make_optimizer(), **kwargs)


def test_bad_arguments_elsewhere() -> None:
    optimizer = make_optimizer()
    with pytest.raises(ValueError, match="rate"):
        GeometricAlpha(optimizer, rate=1.5)
    with pytest.raises(ValueError, match="schedule name"):
        alpha_schedule("cosine", optimizer)
    with pytest.raises(ValueError, match="train_accuracy"):
        PILoTSchedule(optimizer, factor=2.0, threshold=0.0, total=4).step(float("nan"))
    dense = FusedPILoTSGD(nn.Linear(2, 2).parameters(), reparam=False, backend="eager")
    with pytest.raises(ValueError, match="no factorised parameter"):
        ConstantAlpha(dense)
    with pytest.raises(TypeError, match="l1_norm"):
        PILoTSchedule(torch.optim.SGD([{"params": [nn.Parameter(torch.ones(2, 2))], "alpha": 0.1}], lr=0.1),
                      factor=2.0, threshold=0.0, total=4)


def test_tensor_alpha_is_updated_in_place() -> None:
    layer = nn.Linear(3, 3)
    alpha = torch.tensor(0.04)
    optimizer = FusedPILoTSGD([{"params": [layer.weight], "alpha": alpha}], lr=0.1, backend="eager")
    schedule = HarmonicAlpha(optimizer)
    schedule.step()
    assert optimizer.param_groups[0]["alpha"] is alpha and alpha.item() == pytest.approx(0.02)


def test_effective_density_counts_the_entries_that_carry_the_mass() -> None:
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(200_000, generator=generator)
    assert effective_density([gaussian]) == pytest.approx(1.0, abs=0.01)
    sparse = gaussian.clone()
    sparse[20_000:] = 0  # 10% of the entries keep their Gaussian values
    assert effective_density([sparse]) == pytest.approx(0.1, abs=0.002)
    k_equal = torch.zeros(1000)
    k_equal[:50] = -3.0  # k equal non-zeros: (pi / 2) * k / n
    assert effective_density([k_equal]) == pytest.approx(math.pi / 2 * 50 / 1000)
    # Weighted by size; all-zero and empty tensors count as empty / are skipped.
    assert effective_density([gaussian[:1000], torch.zeros(3000), torch.zeros(0)]) == pytest.approx(
        effective_density([gaussian[:1000]]) / 4)
    assert effective_density([]) == 0.0


def test_effective_density_ignores_the_scale_of_each_tensor() -> None:
    """The property the L1 norm lacks: a layer that shrinks uniformly (free under BatchNorm) is as dense."""
    generator = torch.Generator().manual_seed(1)
    layers = [torch.randn(64, 32, generator=generator), torch.randn(10, 64, generator=generator).pow(3)]
    before = effective_density(layers)
    assert effective_density([layers[0] * 1e-3, layers[1] * 50.0]) == pytest.approx(before, rel=1e-5)


def test_effective_density_signal_drives_algorithm_1() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(400, 300, bias=False)
    nn.init.normal_(layer.weight)
    optimizer = FusedPILoTSGD(layer.parameters(), lr=0.1, alpha=ALPHA, backend="eager")
    schedule = PILoTSchedule(optimizer, factor=2.0, threshold=0.5, total=10, signal="effective-density")
    assert schedule.threshold == 0.5 and schedule.last_signal is None
    with torch.no_grad():
        layer.weight.mul_(1e-3)  # uniform shrinkage: the L1 norm falls 1000x, the density does not
    assert schedule.step(0.5) == pytest.approx([2 * ALPHA])
    assert schedule.last_signal == pytest.approx(1.0, abs=0.02)
    with torch.no_grad():
        layer.weight[:, 40:] = 0  # the mass on 10% of the entries
    assert schedule.step(0.6) == pytest.approx([ALPHA])
    assert schedule.last_signal == pytest.approx(0.1, abs=0.01)
    relative = PILoTSchedule(optimizer, factor=2.0, threshold=0.5, total=10, signal="effective-density",
                             relative_threshold=True)
    assert relative.threshold == pytest.approx(0.5 * schedule.last_signal)


class HostReads(torch.Tensor):
    """A tensor that counts the reads of its value by the host (``float``, ``item``, ``tolist``): on a CUDA
    tensor, as alpha is under ``capturable=True``, each would make the host wait for the device."""

    count = 0

    def __float__(self) -> float:
        HostReads.count += 1
        return super().__float__()

    def item(self) -> float:
        HostReads.count += 1
        return super().item()

    def tolist(self) -> object:
        HostReads.count += 1
        return super().tolist()


def value_of(t: torch.Tensor) -> float:
    """A HostReads tensor's value, read without counting (as the test's own check, not the schedule's read)."""
    return t.as_subclass(torch.Tensor).item()


def test_a_step_reads_no_alpha_tensor_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """alpha as a tensor is read once, at construction; then each step works from the host copy of what it set
    (it read the tensor back at every step: a sync per step under capturable). A tensor edited by someone else
    (fill_) is read once more, and the rule goes on from its new value."""
    layer = nn.Linear(4, 3)
    alpha = torch.tensor(ALPHA).as_subclass(HostReads)
    optimizer = FusedPILoTSGD([{"params": [layer.weight], "alpha": alpha}], lr=0.1, backend="eager")
    host = FusedPILoTSGD([{"params": [nn.Linear(4, 3).weight], "alpha": ALPHA}], lr=0.1, backend="eager")
    schedules = [PILoTSchedule(o, factor=2.0, threshold=1.0, total=10) for o in (optimizer, host)]
    for schedule in schedules:
        scripted_l1(monkeypatch, schedule, [2.0, 0.5, 2.0, 2.0, 2.0])
    HostReads.count = 0
    for accuracy in (0.5, 0.6, 0.7, 0.8):  # grow, shrink (the signal is below K), grow, grow
        alphas = [schedule.step(accuracy) for schedule in schedules]
        assert HostReads.count == 0
        assert alphas[0] == pytest.approx(alphas[1], rel=1e-6)  # the schedule of host numbers, to fp32 rounding
        assert value_of(alpha) == torch.tensor(alphas[0][0]).item()  # what it set, rounded to fp32 by fill_
    assert alphas[0] == pytest.approx([4 * ALPHA])
    alpha.fill_(ALPHA)  # someone else's edit: read once
    assert schedules[0].step(0.9) == pytest.approx([2 * ALPHA]) and HostReads.count == 1
