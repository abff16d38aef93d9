"""pilot.direct_call.DirectCompiled: calls with seen arguments skip dynamo, and compute what dynamo's calls do."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from pilot.direct_call import DirectCompiled


def _update_(x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor, double: bool, total: torch.Tensor) -> None:
    """An in-place update with a reduction, a tensor scalar and a bool flag, as the PILoT step has."""
    x.sub_(lr * (2 * y if double else y) + 0.1 * x.sin())
    total.copy_(x.abs().sum())


class Counted(DirectCompiled):
    """Counts the calls that go through dynamo."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.through_dynamo = 0
        compiled = self.compiled

        def counted(*a: Any) -> Any:
            self.through_dynamo += 1
            return compiled(*a)

        self.compiled = counted


def _arguments(n: int, seed: int) -> tuple[Any, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=generator), torch.randn(n, generator=generator), torch.tensor(0.05), True,
            torch.zeros(()))


@pytest.mark.parametrize("dynamic", [True, False])
def test_direct_calls_match_dynamo_bit_for_bit(dynamic: bool) -> None:
    direct = Counted(_update_, dynamic=dynamic, fullgraph=True)
    plain = torch.compile(_update_, dynamic=dynamic, fullgraph=True)
    a, b = _arguments(1000, 0), _arguments(1000, 0)
    for step in range(4):
        a[2].fill_(0.05 / (step + 1))  # a new value in the same tensor: no new key
        b[2].fill_(0.05 / (step + 1))
        direct(*a)
        plain(*b)
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[4], b[4])
    assert direct.through_dynamo == 1  # the first call; the next three were direct
    assert len(direct.direct) == 1


def test_new_keys_go_through_dynamo_once() -> None:
    direct = Counted(_update_, dynamic=True, fullgraph=True)
    for n, double in ((1000, True), (3000, True), (1000, False), (1000, True), (3000, True), (1000, False)):
        x, y, lr, _, total = _arguments(n, n)
        expected = x.clone()
        _update_(expected, y, lr, double, torch.zeros(()))
        direct(x, y, lr, double, total)
        torch.testing.assert_close(x, expected)
        torch.testing.assert_close(total, expected.abs().sum())
    assert direct.through_dynamo == 3  # the three distinct (size, flag) keys, each once
    # a tensor with another storage offset or dtype is a new key
    x, y, lr, _, total = _arguments(1001, 5)
    direct(x[1:], y[1:], lr, True, total)
    direct(x.double(), y.double(), lr.double(), True, total.double())
    assert direct.through_dynamo == 5


def test_a_changed_global_state_goes_through_dynamo() -> None:
    direct = Counted(_update_, dynamic=True, fullgraph=True)
    arguments = _arguments(1000, 0)
    with torch.no_grad():
        direct(*arguments)
        direct(*arguments)
    assert direct.through_dynamo == 1
    with torch.enable_grad():
        direct(*arguments)
    assert direct.through_dynamo == 2


def test_arguments_of_other_kinds_always_go_through_dynamo() -> None:
    def scale_(x: torch.Tensor, factors: list[float]) -> None:
        x.mul_(factors[0])

    direct = Counted(scale_, dynamic=True, fullgraph=True)
    x = torch.randn(100)
    expected = x * 8
    for _ in range(3):
        direct(x, [2.0])
    torch.testing.assert_close(x, expected)
    assert direct.through_dynamo == 3 and not direct.direct


def test_a_function_with_a_result_is_refused() -> None:
    def twice(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    with pytest.raises(TypeError, match="return None"):
        DirectCompiled(twice, dynamic=True, fullgraph=True)(torch.randn(10))
