r"""Schedules for PILoT's regularisation strength alpha (the weight decay on the factors m and w).

They edit ``group["alpha"]`` of every *factorised group* of a :class:`pilot.FusedPILoTSGD` (a group holding at
least one factorised parameter) and touch nothing else, so they compose with torch's LR schedulers, which edit
``group["lr"]``. Like those, they have ``step()``, ``state_dict()`` and ``load_state_dict()``; the optimizer's own
state dict carries the current alphas.

- :class:`PILoTSchedule`: the paper's dynamic schedule (Algorithm 1), driven by the training accuracy and a
  sparsity signal (the paper's L1 norm, or :func:`effective_density`, which BatchNorm cannot fool).
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
from typing import Any, Callable, Iterable, Optional

from torch import Tensor
from torch.optim import Optimizer

from .factorisation import is_factorised
from .checks import check_number
from .pruning import prunable_parameters
from .sharding import whole

__all__ = ["PILoTSchedule", "SIGNALS", "effective_density", "AlphaScheduler", "ConstantAlpha", "HarmonicAlpha",
           "QuadraticAlpha", "GeometricAlpha", "ALPHA_SCHEDULES", "alpha_schedule", "factorised_groups",
           "set_group_value"]


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


SIGNALS = ("l1", "effective-density")


def effective_density(tensors: Iterable[Tensor]) -> float:
    r"""How dense the tensors are, measured so that rescaling any of them changes nothing.

    Each tensor x with n entries gets :math:`d(x) = \frac{\pi}{2} \cdot \frac{\lVert x \rVert_1^2}{n \lVert x
    \rVert_2^2}` (0 for an all-zero tensor), and the result is the mean of d weighted by n. The ratio
    :math:`\lVert x \rVert_1^2 / \lVert x \rVert_2^2` is the classic "effective number of non-zeros" (it is k
    for k equal non-zeros); the factor :math:`\pi/2` makes a Gaussian tensor count as fully dense, so d is 1 at a
    Kaiming-normal initialisation, and a tensor whose mass sits on a fraction p of Gaussian entries (the rest 0
    or negligible) has d = p.

    Why not the L1 norm: a weight that feeds a BatchNorm can shrink uniformly at no cost to the loss, so weight
    decay drives its L1 norm towards 0 while every entry stays equally large relative to the others: the L1 norm
    then measures shrinkage, not sparsity. d is invariant to the scale of each tensor and falls only when the
    mass concentrates on fewer entries, which is what magnitude pruning needs.
    """
    weighted, total = 0.0, 0
    for x in tensors:
        n = x.numel()
        if n == 0:
            continue
        x = x.detach().float()
        l2 = float(whole(x.square().sum()))
        if l2 > 0:
            weighted += (math.pi / 2) * float(whole(x.abs().sum())) ** 2 / l2
        total += n
    return weighted / total if total else 0.0


class PILoTSchedule(AlphaScheduler):
    r"""The paper's dynamic alpha schedule (Algorithm 1), one :meth:`step` per epoch or per optimizer step.

    After the k-th call (k = 1, 2, ...) with the training accuracy :math:`a_k`, with :math:`a_0 = 0`:

    .. math::
        \alpha \leftarrow \begin{cases} \alpha \cdot \delta & \text{if } a_k \ge a_{k-1},\
            s \ge K \text{ and } k \le T/2 \\
            \alpha / \delta & \text{otherwise} \end{cases}

    on every factorised group, with :math:`\delta` = ``factor``, s the sparsity signal, K its threshold and T =
    ``total``. So alpha grows while the accuracy holds and the weights are not yet sparse enough, and always
    decays in the second half (so :math:`\alpha_t \to 0`). ``factor = 1`` keeps alpha constant (with beta = 0
    that is spred).

    Granularity: the paper updates alpha after each epoch in its Algorithm 1 and describes the rule per
    "gradient update step" in its prose. Both work here: call :meth:`step` once per epoch with T = epochs, or
    after every optimizer step with T = total steps, a ``factor`` close to 1 (the per-epoch factor to the power
    1 / steps per epoch moves alpha as fast) and a running training accuracy (a single batch's accuracy rises or
    falls by chance, so alpha would random-walk).

    The sparsity signal s (``signal``):

    - ``"l1"`` (the paper's): :math:`\lVert m \odot w \rVert_1` over the factorised weights.
    - ``"effective-density"``: :func:`effective_density` of the factorised weights, 1 at a Gaussian init and p
      when the mass sits on a fraction p of the entries. Scale-invariant per tensor, so BatchNorm cannot fool it
      (a layer that shrinks uniformly keeps its value); K is then a density such as 0.1.

    Args:
        optimizer: a :class:`pilot.FusedPILoTSGD` (anything with ``l1_norm()`` and factorised groups).
        factor: :math:`\delta \ge 1`.
        threshold: K in the units of the signal, or with ``relative_threshold=True`` a fraction of the signal's
            value at construction (users rarely know absolute L1 norms).
        total: T, the number of :meth:`step` calls planned (epochs or optimizer steps).
        signal: ``"l1"`` or ``"effective-density"``.
        relative_threshold: read ``threshold`` as a fraction of the signal at construction.

    ``threshold`` holds the absolute K in use; ``k`` the number of calls so far; ``last_signal`` the signal's
    value at the last call that needed it (None before).
    """

    def __init__(self, optimizer: Optimizer, *, factor: float, threshold: float, total: int, signal: str = "l1",
                 relative_threshold: bool = False) -> None:
        check_number("factor", factor, minimum=1.0)  # alpha is multiplied or divided by it
        check_number("threshold", threshold)
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"Invalid total value: {total!r} (need an int > 0, the number of step() calls)")
        if signal not in SIGNALS:
            raise ValueError(f"Invalid signal value: {signal!r} (need one of {', '.join(SIGNALS)})")
        if not isinstance(relative_threshold, bool):
            raise TypeError(f"Invalid relative_threshold value: expected a bool, got {relative_threshold!r}")
        if signal == "l1" and not callable(getattr(optimizer, "l1_norm", None)):
            raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} has no l1_norm(); PILoTSchedule needs "
                            "pilot.FusedPILoTSGD")
        super().__init__(optimizer)
        self.factor, self.total, self.signal = float(factor), total, signal
        self.threshold = float(threshold) * (self.measure() if relative_threshold else 1.0)
        self.k = 0
        self.previous_accuracy = 0.0
        self.last_signal: Optional[float] = None

    def measure(self) -> float:
        """The sparsity signal of the weights as they are now."""
        if self.signal == "l1":
            return float(self.optimizer.l1_norm())
        return effective_density(prunable_parameters(self.optimizer)[0])  # the factorised weights

    def step(self, train_accuracy: float) -> list[float]:
        """Apply the rule after one epoch (or optimizer step) with this training accuracy; returns the alphas."""
        if isinstance(train_accuracy, bool) or not isinstance(train_accuracy, (int, float)) \
                or math.isnan(train_accuracy):
            raise ValueError(f"Invalid train_accuracy value: {train_accuracy!r} (need a number)")
        self.k += 1
        # The signal is measured only when the other conditions hold: per optimizer step it costs a pass over
        # the weights (and a device sync), which the second half and falling accuracies do not need.
        grow = train_accuracy >= self.previous_accuracy and self.k <= self.total / 2
        if grow:
            self.last_signal = self.measure()
            grow = self.last_signal >= self.threshold
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
