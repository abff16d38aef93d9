r"""Schedules for PILoT's regularisation strength alpha (the weight decay on the factors m and w).

They edit ``group["alpha"]`` of every *factorised group* of a :class:`pilot.FusedPILoTSGD` (a group holding at
least one factorised parameter) and touch nothing else, so they compose with torch's LR schedulers, which edit
``group["lr"]``. Like those, they have ``step()``, ``state_dict()`` and ``load_state_dict()``; the optimizer's own
state dict carries the current alphas.

- :class:`PILoTSchedule`: the paper's dynamic schedule (Algorithm 1), driven by the training accuracy and
  :meth:`FusedPILoTSGD.l1_norm`.
- :class:`ConstantAlpha`, :class:`HarmonicAlpha`, :class:`QuadraticAlpha`, :class:`GeometricAlpha`: the fixed
  schedules of the paper's diagonal-network experiment, :math:`\alpha_k = \alpha_0 \cdot f(k)` after k calls of
  ``step()``; :func:`alpha_schedule` builds one by name.

Why alpha matters (``docs/math.md``, "Factorisation"): in x-space the flow is
:math:`\dot x = -\sqrt{4x^2 + a_t^2}\,\nabla f(x) - 2\alpha_t x` with :math:`a_t = \beta e^{-2\int_0^t \alpha_s ds}`.
A large integral of alpha shrinks :math:`a_t` (the implicit bias moves from L2 to L1); alpha decaying to 0
removes the explicit shrinkage :math:`-2\alpha_t x`, so the limit is unbiased.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torch import Tensor
from torch.optim import Optimizer

from .factorisation import is_factorised
from .checks import check_number

__all__ = ["PILoTSchedule", "AlphaScheduler", "ConstantAlpha", "HarmonicAlpha", "QuadraticAlpha",
           "GeometricAlpha", "ALPHA_SCHEDULES", "alpha_schedule", "factorised_groups", "set_group_value"]


def factorised_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The param groups of ``optimizer`` that hold at least one factorised parameter."""
    groups = [group for group in optimizer.param_groups if any(is_factorised(optimizer, p) for p in group["params"])]
    if not groups:
        raise ValueError("optimizer has no factorised parameter: alpha schedules need a pilot.FusedPILoTSGD "
                         "that factorises at least one parameter")
    return groups


def set_group_value(group: dict[str, Any], key: str, value: float) -> None:
    """``group[key] = value``, in place if it is a tensor (capturable optimizers read it from the device)."""
    if isinstance(group[key], Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


class AlphaScheduler:
    """Base class: holds the optimizer and its factorised groups, saves and loads the scheduler's own state.

    Subclasses implement :meth:`step`. ``last_alpha`` is the list of the factorised groups' alphas after the
    last call (or at construction), like torch's ``get_last_lr()``.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.last_alpha = [float(group["alpha"]) for group in factorised_groups(optimizer)]

    def get_last_alpha(self) -> list[float]:
        """Alpha of every factorised group, as last set (or as found at construction)."""
        return list(self.last_alpha)

    def _set_alphas(self, alphas: list[float]) -> None:
        for group, alpha in zip(factorised_groups(self.optimizer), alphas):
            set_group_value(group, "alpha", alpha)
        self.last_alpha = list(alphas)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer (whose own state dict holds the current alphas)."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (load the optimizer's state dict too, for the alphas themselves)."""
        self.__dict__.update(state_dict)


class PILoTSchedule(AlphaScheduler):
    r"""The paper's dynamic alpha schedule (Algorithm 1), one :meth:`step` per epoch (or any unit).

    After the k-th call (k = 1, 2, ...) with the training accuracy :math:`a_k`, with :math:`a_0 = 0`:

    .. math::
        \alpha \leftarrow \begin{cases} \alpha \cdot \delta & \text{if } a_k \ge a_{k-1},\
            \lVert m \odot w \rVert_1 \ge K \text{ and } k \le T/2 \\
            \alpha / \delta & \text{otherwise} \end{cases}

    on every factorised group, with :math:`\delta` = ``factor``, K = the threshold and T = ``total``. So alpha
    grows while the accuracy holds and the weights are not yet sparse enough, and always decays in the second
    half (so :math:`\alpha_t \to 0`). ``factor = 1`` keeps alpha constant (with beta = 0 that is spred).

    Args:
        optimizer: a :class:`pilot.FusedPILoTSGD` (anything with ``l1_norm()`` and factorised groups).
        factor: :math:`\delta \ge 1`.
        l1_threshold: K, an absolute L1 norm, or with ``relative_threshold=True`` a fraction of the L1 norm
            :math:`\lVert m \odot w \rVert_1` at construction (users rarely know absolute norms).
        total: T, the number of :meth:`step` calls planned (e.g. epochs).
        relative_threshold: read ``l1_threshold`` as a fraction of the initial L1 norm.

    ``threshold`` holds the absolute K in use; ``k`` the number of calls so far.
    """

    def __init__(self, optimizer: Optimizer, *, factor: float, l1_threshold: float, total: int,
                 relative_threshold: bool = False) -> None:
        check_number("factor", factor, minimum=1.0)  # alpha is multiplied or divided by it
        check_number("l1_threshold", l1_threshold)
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"Invalid total value: {total!r} (need an int > 0, the number of step() calls)")
        if not isinstance(relative_threshold, bool):
            raise TypeError(f"Invalid relative_threshold value: expected a bool, got {relative_threshold!r}")
        if not callable(getattr(optimizer, "l1_norm", None)):
            raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} has no l1_norm(); PILoTSchedule needs "
                            "pilot.FusedPILoTSGD")
        super().__init__(optimizer)
        self.factor, self.total = float(factor), total
        self.threshold = float(l1_threshold) * (optimizer.l1_norm() if relative_threshold else 1.0)
        self.k = 0
        self.previous_accuracy = 0.0

    def step(self, train_accuracy: float) -> list[float]:
        """Apply the rule after one epoch with this training accuracy; returns the new alphas."""
        if isinstance(train_accuracy, bool) or not isinstance(train_accuracy, (int, float)) \
                or math.isnan(train_accuracy):
            raise ValueError(f"Invalid train_accuracy value: {train_accuracy!r} (need a number)")
        self.k += 1
        grow = (train_accuracy >= self.previous_accuracy and self.optimizer.l1_norm() >= self.threshold
                and self.k <= self.total / 2)
        self.previous_accuracy = float(train_accuracy)
        scale = self.factor if grow else 1.0 / self.factor
        self._set_alphas([float(group["alpha"]) * scale for group in factorised_groups(self.optimizer)])
        return self.get_last_alpha()


class _FixedAlpha(AlphaScheduler):
    r"""alpha_k = alpha_0 * f(k) after k calls of :meth:`step`, alpha_0 = each factorised group's alpha at
    construction (set it in the optimizer). f(0) = 1, so the first step uses alpha_0."""

    def __init__(self, optimizer: Optimizer) -> None:
        super().__init__(optimizer)
        self.base_alphas = list(self.last_alpha)
        self.k = 0

    def multiplier(self, k: int) -> float:
        raise NotImplementedError

    def step(self) -> list[float]:
        """Advance k by one and set every factorised group's alpha to alpha_0 * f(k); returns the alphas."""
        self.k += 1
        self._set_alphas([alpha0 * self.multiplier(self.k) for alpha0 in self.base_alphas])
        return self.get_last_alpha()


class ConstantAlpha(_FixedAlpha):
    r""":math:`\alpha_k = \alpha_0`. With ``beta=0`` this is spred; with PILoT's init it stays biased (the
    shrinkage :math:`-2\alpha x` never vanishes)."""

    def multiplier(self, k: int) -> float:
        return 1.0


class HarmonicAlpha(_FixedAlpha):
    r""":math:`\alpha_k = \alpha_0 / (k + 1)` (the paper's :math:`\alpha_0 / k` with k counted from 1)."""

    def multiplier(self, k: int) -> float:
        return 1.0 / (k + 1)


class QuadraticAlpha(_FixedAlpha):
    r""":math:`\alpha_k = \alpha_0 / (k + 1)^2` (the paper's :math:`\alpha_0 / k^2` with k counted from 1)."""

    def multiplier(self, k: int) -> float:
        return 1.0 / (k + 1) ** 2


class GeometricAlpha(_FixedAlpha):
    r""":math:`\alpha_k = \alpha_0 \cdot r^k` (the paper uses r = 0.95), with ``rate`` r in (0, 1]."""

    def __init__(self, optimizer: Optimizer, rate: float = 0.95) -> None:
        check_number("rate", rate)
        if not 0 < rate <= 1:
            raise ValueError(f"Invalid rate value: {rate!r} (need 0 < rate <= 1)")
        self.rate = float(rate)
        super().__init__(optimizer)

    def multiplier(self, k: int) -> float:
        return self.rate ** k


ALPHA_SCHEDULES: dict[str, Callable[..., _FixedAlpha]] = {
    "constant": ConstantAlpha, "harmonic": HarmonicAlpha, "quadratic": QuadraticAlpha, "geometric": GeometricAlpha,
}


def alpha_schedule(name: str, optimizer: Optimizer, **options: Any) -> AlphaScheduler:
    """The fixed schedule ``name`` (one of :data:`ALPHA_SCHEDULES`) on ``optimizer``; options go to its class."""
    if name not in ALPHA_SCHEDULES:
        raise ValueError(f"Invalid schedule name: {name!r} (need one of {', '.join(ALPHA_SCHEDULES)})")
    return ALPHA_SCHEDULES[name](optimizer, **options)
