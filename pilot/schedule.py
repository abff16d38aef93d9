r"""Schedules for PILoT's regularisation strength alpha (the weight decay on the factors m and w).

They edit ``group["alpha"]`` of every *factorised group* of a :class:`pilot.FusedPILoTSGD` (a group holding at
least one factorised parameter) and touch nothing else, so they compose with torch's LR schedulers, which edit
``group["lr"]``. Like those, they have ``step()``, ``state_dict()`` and ``load_state_dict()``; the optimizer's own
state dict carries the current alphas.

- :class:`PILoTSchedule`: the paper's dynamic schedule (Algorithm 1), driven by the training accuracy and a
  sparsity signal (the paper's L1 norm, or :func:`effective_density`, which BatchNorm cannot fool).
- :class:`SparsityTarget`: steers a strength (pilot's alpha, spred's, LASSO's lambda, STR's threshold decay) so
  that the measured density follows a :class:`SparsityCourse` to the sparsity the user asks for, at any length of
  training; :func:`sparsity_target` builds it for a :class:`pilot.FusedPILoTSGD`.
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
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import Tensor
from torch.optim import Optimizer

from .factorisation import is_factorised
from .checks import check_number
from .group_values import HostCopies, set_group_value
from .pruning import prunable_parameters
from .sharding import whole

__all__ = ["PILoTSchedule", "SIGNALS", "SparsityCourse", "SparsityTarget", "sparsity_target", "COURSE", "effective_density", "AlphaScheduler", "ConstantAlpha", "HarmonicAlpha",
           "QuadraticAlpha", "GeometricAlpha", "ALPHA_SCHEDULES", "alpha_schedule", "factorised_groups",
           "set_group_value"]


def factorised_groups(optimizer: Optimizer) -> list[dict[str, Any]]:
    """The param groups of ``optimizer`` that hold at least one factorised parameter."""
    groups = [group for group in optimizer.param_groups if any(is_factorised(optimizer, p) for p in group["params"])]
    if not groups:
        raise ValueError("optimizer has no factorised parameter: alpha schedules need a pilot.FusedPILoTSGD "
                         "that factorises at least one parameter")
    return groups


class AlphaScheduler:
    """Base class: holds the optimizer and its factorised groups, saves and loads the scheduler's own state.

    Subclasses implement :meth:`step`. ``last_alpha`` is the list of the factorised groups' alphas after the
    last call (or at construction), like torch's ``get_last_lr()``.

    Host synchronisation: alphas that are device tensors (``capturable=True``) are read once, at construction;
    afterwards a step reads back what the schedule set from host copies (:class:`pilot.group_values.HostCopies`),
    so that it never waits for the device, and reads a tensor again only after something else changed it.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._host = HostCopies()
        self.last_alpha = [self._host.read(group, "alpha") for group in factorised_groups(optimizer)]

    def get_last_alpha(self) -> list[float]:
        """Alpha of every factorised group, as last set (or as found at construction)."""
        return list(self.last_alpha)

    def _set_alphas(self, alphas: list[float]) -> None:
        for group, alpha in zip(factorised_groups(self.optimizer), alphas):
            self._host.write(group, "alpha", alpha)
        self.last_alpha = list(alphas)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer (whose own state dict holds the current alphas) and the host copies."""
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "_host")}

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
        # alpha as it is now (another writer may have changed it), without a sync where the schedule set it itself
        self._set_alphas([self._host.read(group, "alpha") * scale for group in factorised_groups(self.optimizer)])
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


# ---------------------------------------------------------------------------------------------- sparsity on demand

# Where the planned course runs, as fractions of training: dense for the first tenth (the weights leave their
# random init first), down to the target by 70%, so the last 30% train the survivors at the final sparsity.
COURSE = (0.1, 0.7)


class SparsityCourse:
    r"""The planned density of a run that ends at ``sparsity`` S: with :math:`\tau` = step / total,

    .. math:: p(\tau) = (1 - S) + S\,\bigl(1 - \operatorname{clip}(\tfrac{\tau - \tau_0}{\tau_1 - \tau_0}, 0, 1)
        \bigr)^3

    Zhu & Gupta's (2017) cubic: 1 until :math:`\tau_0` = ``start``, fast early (the many small weights go first),
    slow near :math:`\tau_1` = ``end``, and 1 - S from there on. Gradual magnitude pruning prunes to 1 - p;
    :class:`SparsityTarget` steers a regularisation so that the measured density follows p.
    """

    def __init__(self, sparsity: float, total: int, start: float = COURSE[0], end: float = COURSE[1]) -> None:
        check_number("sparsity", sparsity)
        if not 0 < sparsity < 1:
            raise ValueError(f"Invalid sparsity value: {sparsity!r} (need 0 < sparsity < 1)")
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"Invalid total value: {total!r} (need an int > 0, the number of optimizer steps)")
        if not 0 <= start < end <= 1:
            raise ValueError(f"Invalid course: start {start!r}, end {end!r} (need 0 <= start < end <= 1, fractions "
                             "of training)")
        self.sparsity, self.total, self.start, self.end = float(sparsity), total, float(start), float(end)

    def progress(self, step: int) -> float:
        """Where ``step`` lies in the course: 0 before its start, 1 at its end and after."""
        return min(1.0, max(0.0, (step / self.total - self.start) / (self.end - self.start)))

    def density(self, step: int) -> float:
        """The planned density after ``step`` optimizer steps."""
        return (1.0 - self.sparsity) + self.sparsity * (1.0 - self.progress(step)) ** 3


class SparsityTarget:
    r"""Steers a regularisation strength so that the trained model reaches ``course.sparsity``, at any length of
    training, batch size or learning rate: a multiplicative controller, one :meth:`step` per optimizer step.

    What it steers is the push the strength gives each step, :math:`\text{lr} \cdot s` (the fraction by which a
    step shrinks the weights), not s: a learning-rate schedule that decays would otherwise undo the controller's
    work. (Steering s, the 30-epoch CIFAR-10 run T-pilot-95-s0 grew alpha 11x from epoch 16 to 25 while the cosine
    lr fell 5x; the push barely doubled and the density stalled at 0.084, above its bound of 0.0625.) The
    controller's state is the *level* :math:`\ell`, the strength at the learning rate's running peak
    :math:`\hat\eta` (the largest lr seen at a measurement); the strength applied is

    .. math:: s = \ell \cdot \hat\eta / \text{lr}, \qquad\text{so}\qquad \text{lr} \cdot s = \hat\eta\,\ell

    whatever the schedule does after its peak, while a warmup (lr rising to its peak) leaves s = :math:`\ell`.

    Every ``interval`` steps it measures the density d (``measure``) and compares it with the course's plan p:

    .. math::
        u = \operatorname{clip}\Bigl(\frac{\ln(d / p)}{\ln(1 + \text{band})}, -1, 1\Bigr), \qquad
        \ell \leftarrow \ell \cdot 10^{\,u \cdot \text{interval} / (\text{span} \cdot \text{total})}

    for every strength: proportional in the log of the error within ``band`` of the plan, and at most a factor of
    10 per ``span`` of training outside it (the default, a quarter, is about as fast as Algorithm 1's factor moved
    alpha in the 30-epoch CIFAR-10 recipe). Rates are fractions of training, so one setting serves every budget.
    The controller corrects the strength; it cannot find its scale from nothing in time, since the density answers
    late (under BatchNorm, weights first shrink as a whole, which leaves the density unchanged). Start it where a
    constant strength s0 would accumulate the regularisation integral :math:`\sum_k \text{lr}_k s_0` that
    sparsified a run before (that integral, not s0, carries across budgets: ``python -m pilot.train`` does so).
    Levels stay within ``limits`` times their initial value (growth beyond 10x means the start was far off) and at
    most ``maximum``: under BatchNorm a decay whose product with the learning rate is too large does not sparsify,
    it shrinks whole layers until their effective learning rate makes training chaotic (measured on ResNet-20:
    lr * alpha = 2.4e-3 fell to chance within two epochs; the 30-epoch recipe peaked near 5e-4).

    pilot's extension of Algorithm 1 (``accuracy_rule=True, release=True``):

    - the accuracy rule: the level grows only while the last epoch's training accuracy (:meth:`end_epoch`) was not
      below the one before (Algorithm 1's condition; the first epoch compares with 0);
    - the release: once the course has ended, the level decays tenfold per ``release_span`` of training while the
      density stays within ``band`` of 1 - S, so the shrinkage vanishes (alpha -> 0, as in Algorithm 1's second
      half) and the survivors recover; it is steered up again only if the density leaves the band.

    Without them (spred's constant alpha, LASSO, STR) the level is held on the plan to the end.

    Args:
        optimizer: whose ``groups`` (indices into ``param_groups``) hold the strength under ``key``.
        course: the :class:`SparsityCourse` to follow.
        measure: the density of the weights as they are now (in [0, 1]).
        key, groups: the strength: ``param_groups[i][key]`` for i in ``groups``.
        interval: optimizer steps between measurements (default: about 1,000 over training).

    If something scales the learning rate from some step on (a recovery from a divergence), call
    :meth:`scale_lr` with the factor: the push is scaled with it instead of being compensated.
    """

    def __init__(self, optimizer: Optimizer, course: SparsityCourse, measure: Callable[[], float], *, key: str,
                 groups: Sequence[int], accuracy_rule: bool = False, release: bool = False, span: float = 0.25,
                 release_span: float = 0.05, band: float = 0.1, limits: tuple[float, float] = (1e-6, 10.0),
                 maximum: float = math.inf, interval: Optional[int] = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not groups or any(not 0 <= i < len(optimizer.param_groups) for i in groups):
            raise ValueError(f"Invalid groups value: {list(groups)!r} (need indices of the optimizer's "
                             f"{len(optimizer.param_groups)} param groups)")
        for i in groups:
            check_number(f"param_groups[{i}][{key!r}]", optimizer.param_groups[i].get(key))
            if float(optimizer.param_groups[i][key]) <= 0:
                raise ValueError(f"Invalid param_groups[{i}][{key!r}] value: 0 (a multiplicative controller needs "
                                 "a strength > 0 to start from)")
        for name, value in (("span", span), ("release_span", release_span), ("band", band)):
            check_number(name, value)
            if value <= 0:
                raise ValueError(f"Invalid {name} value: {value!r} (need a number > 0)")
        if not 0 < limits[0] <= 1 <= limits[1]:
            raise ValueError(f"Invalid limits value: {limits!r} (need 0 < limits[0] <= 1 <= limits[1])")
        self.optimizer, self.course, self.measure = optimizer, course, measure
        self.key, self.groups = key, list(groups)
        self.accuracy_rule, self.release = bool(accuracy_rule), bool(release)
        self.span, self.release_span, self.band = float(span), float(release_span), float(band)
        self.limits = (float(limits[0]), float(limits[1]))
        self.maximum = float(maximum)
        self.interval = interval if interval is not None else max(1, course.total // 1000)
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval <= 0:
            raise ValueError(f"Invalid interval value: {interval!r} (need an int > 0)")
        self._host = HostCopies()  # what step() set: read back without a sync (see AlphaScheduler)
        self.initial = [self._host.read(optimizer.param_groups[i], key) for i in self.groups]
        self.levels = list(self.initial)
        self.peak_lrs: list[Optional[float]] = [None] * len(self.groups)  # set at the first measurement
        self.k = 0
        self.last_density: Optional[float] = None
        self.previous_accuracy = 0.0
        self.may_grow = True

    def strengths(self) -> list[float]:
        """The strengths now (host copies of what :meth:`step` set: no device sync)."""
        return [self._host.read(self.optimizer.param_groups[i], self.key) for i in self.groups]

    def end_epoch(self, train_accuracy: float) -> None:
        """Algorithm 1's accuracy condition, for the next epoch (used with ``accuracy_rule``)."""
        if isinstance(train_accuracy, bool) or not isinstance(train_accuracy, (int, float)) \
                or math.isnan(train_accuracy):
            raise ValueError(f"Invalid train_accuracy value: {train_accuracy!r} (need a number)")
        self.may_grow = train_accuracy >= self.previous_accuracy
        self.previous_accuracy = float(train_accuracy)

    def step(self) -> None:
        """After each optimizer step: every ``interval`` steps, measure and move the strengths. The steps between
        touch nothing; a measurement reads the weights (``measure``: a device sync, inherent in measuring), but
        not the strengths, which under ``capturable`` live on the device: their host copies serve."""
        self.k += 1
        if self.k % self.interval:
            return
        self.last_density = density = float(self.measure())
        plan = self.course.density(self.k)
        exponent = self.control(density, plan) / self.span
        if self.release and self.course.progress(self.k) >= 1 and density <= (1 + self.band) * plan:
            exponent = -1.0 / self.release_span
        elif self.accuracy_rule and not self.may_grow:
            exponent = min(exponent, 0.0)
        scale = 10.0 ** (exponent * self.interval / self.course.total)
        for j, (i, initial) in enumerate(zip(self.groups, self.initial)):
            group = self.optimizer.param_groups[i]
            self.levels[j] = min(max(self.levels[j] * scale, initial * self.limits[0]), initial * self.limits[1],
                                 self.maximum)
            lr = self._host.read(group, "lr")
            peak = self.peak_lrs[j] = max(lr, self.peak_lrs[j] or 0.0)
            self._host.write(group, self.key, self.levels[j] * peak / lr if lr > 0 else self.levels[j])

    def scale_lr(self, factor: float) -> None:
        """The learning rate is ``factor`` times what its schedule gives from now on: scale the peaks with it, so
        that the strength keeps its value instead of compensating for the change."""
        check_number("factor", factor)
        if factor <= 0:
            raise ValueError(f"Invalid factor value: {factor!r} (need a number > 0)")
        self.peak_lrs = [None if peak is None else peak * factor for peak in self.peak_lrs]

    def control(self, density: float, plan: float) -> float:
        """u in [-1, 1]: how hard to push, from the measured and the planned density."""
        if density <= 0:
            return -1.0
        return max(-1.0, min(1.0, math.log(density / plan) / math.log1p(self.band)))

    def state_dict(self) -> dict[str, Any]:
        """The controller's own state (the strengths themselves are in the optimizer's state dict)."""
        return {"k": self.k, "last_density": self.last_density, "previous_accuracy": self.previous_accuracy,
                "may_grow": self.may_grow, "initial": list(self.initial), "levels": list(self.levels),
                "peak_lrs": list(self.peak_lrs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.k, self.last_density = state_dict["k"], state_dict["last_density"]
        self.previous_accuracy, self.may_grow = state_dict["previous_accuracy"], state_dict["may_grow"]
        self.initial = list(state_dict["initial"])
        # A state dict saved before the controller kept levels (it steered the strength itself): the level is the
        # strength it set last, and the peak is found again at the next measurement.
        self.levels = list(state_dict.get("levels", self.strengths()))
        self.peak_lrs = list(state_dict.get("peak_lrs", [None] * len(self.groups)))


def sparsity_target(optimizer: Optimizer, sparsity: float, total: int, *, algorithm1: bool = True,
                    **options: Any) -> SparsityTarget:
    """A :class:`SparsityTarget` on the alphas of a :class:`pilot.FusedPILoTSGD`, measured by the
    :func:`effective_density` of its factorised weights: pilot's rule (accuracy rule and release) with
    ``algorithm1``, else alpha held on the plan (spred). ``total``: the optimizer steps of training; ``options``
    go to :class:`SparsityTarget` (``start`` and ``end`` to the course)."""
    course = SparsityCourse(sparsity, total, **{key: options.pop(key) for key in ("start", "end") if key in options})
    factorised = factorised_groups(optimizer)
    groups = [i for i, group in enumerate(optimizer.param_groups) if any(group is f for f in factorised)]
    return SparsityTarget(optimizer, course, lambda: effective_density(prunable_parameters(optimizer)[0]),
                          key="alpha", groups=groups, accuracy_rule=algorithm1, release=algorithm1, **options)
