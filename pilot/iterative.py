"""Iterative magnitude pruning with rewinding: Weight Rewinding (WR) and Learning Rate Rewinding (LRR).

Cycles of train -> prune a fraction of the remaining weights -> rewind, with the masks kept throughout. The
training itself is the caller's (a ``train_fn``), so the same driver serves FusedPILoTSGD (PILoT, spred), the
baselines (dense SGD, :class:`pilot.ProxSGD`, SGD on an STR model) and the training CLI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor, nn
from torch.optim import Optimizer

from .pruning import SCOPES, apply_masks_, prunable_parameters, prune_
from .schedule import set_group_value
from .sharding import whole

__all__ = ["IterativePruning", "PruningCycle", "REWIND_MODES"]

REWIND_MODES = ("wr", "lrr")
_REWOUND_HYPERPARAMETERS = ("lr", "alpha")  # what LR / alpha schedulers edit


@dataclass(frozen=True)
class PruningCycle:
    """One training run of :meth:`IterativePruning.run`: its index, the sparsity it trained at (fraction of zeros
    among the prunable weights, measured after training) and what ``train_fn`` returned."""

    cycle: int
    sparsity: float
    result: Any


class IterativePruning:
    r"""Train, prune ``1 - keep_rate`` of the remaining weights, rewind; repeat, keeping the masks.

    After cycle c (c = 0, 1, ..., ``cycles - 1``) the prunable weights are magnitude-pruned with
    :func:`pilot.prune_` to sparsity :math:`1 - \text{keep\_rate}^{c+1}` (exact count, ``scope`` as there),
    then rewound:

    - ``mode="wr"`` (weight rewinding): the model's state (parameters and buffers) is reset to the rewind point
      and a fresh optimizer is built with ``make_optimizer(model)``. For a :class:`pilot.FusedPILoTSGD` that
      re-factorises the rewound weights (momentum reset); the masks are then applied to model and optimizer, so
      pruned entries are x = m = w = 0 with zero momentum, a fixed point of the step.
    - ``mode="lrr"`` (learning-rate rewinding): the weights and the optimizer (factors, momentum) are kept; every
      group's ``lr`` and ``alpha`` are reset to their values when the optimizer was built.

    ``train_fn(model, optimizer, cycle)`` runs one complete training schedule and returns anything (e.g.
    metrics). It creates its LR scheduler (and :class:`pilot.PILoTSchedule`) itself, so the schedule starts from
    the beginning every cycle: that is the rewound learning rate. It runs ``cycles + 1`` times, the last one at
    the final sparsity :math:`1 - \text{keep\_rate}^{\text{cycles}}`.

    The rewind point is the model's state once the first optimizer is built (the init, as for lottery tickets) unless
    ``train_fn`` calls :meth:`save_rewind_point` (e.g. after epoch k of cycle 0: the "early checkpoint").
    Which weights are pruned: those :func:`pilot.prune_` selects for the optimizer (the factorised parameters of
    a FusedPILoTSGD, else parameters with ``ndim >= 2``).
    """

    def __init__(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Optimizer], *, mode: str,
                 keep_rate: float = 0.8, scope: str = "global") -> None:
        if mode not in REWIND_MODES:
            raise ValueError(f"Invalid mode value: {mode!r} (need one of {', '.join(REWIND_MODES)})")
        if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0 < keep_rate < 1:
            raise ValueError(f"Invalid keep_rate value: {keep_rate!r} (need 0 < keep_rate < 1)")
        if scope not in SCOPES:
            raise ValueError(f"Invalid scope value: {scope!r} (need one of {', '.join(SCOPES)})")
        if not callable(make_optimizer):
            raise TypeError(f"Invalid make_optimizer: expected a callable, got {type(make_optimizer).__name__}")
        self.model, self.make_optimizer = model, make_optimizer
        self.mode, self.keep_rate, self.scope = mode, float(keep_rate), scope
        self.masks: dict[str, Tensor] = {}  # parameter name -> keep-mask (True = kept)
        self.rewind_point: Optional[dict[str, Tensor]] = None

    def save_rewind_point(self) -> None:
        """Remember the model's current state (parameters and buffers) as the point WR rewinds to."""
        self.rewind_point = {key: value.detach().clone() for key, value in self.model.state_dict().items()}

    def run(self, train_fn: Callable[[nn.Module, Optimizer, int], Any], cycles: int) -> list[PruningCycle]:
        """Train ``cycles + 1`` times with ``cycles`` pruning rounds in between; one :class:`PruningCycle` each."""
        if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 0:
            raise ValueError(f"Invalid cycles value: {cycles!r} (need an int >= 0)")
        optimizer = self._new_optimizer()  # first: make_optimizer may convert the model (STR) or round it (m0 * w0)
        if self.rewind_point is None:
            self.save_rewind_point()
        hyperparameters = self._hyperparameters(optimizer)
        history = []
        for cycle in range(cycles + 1):
            result = train_fn(self.model, optimizer, cycle)
            history.append(PruningCycle(cycle, self._sparsity(optimizer), result))
            if cycle == cycles:
                break
            prune_(optimizer, 1.0 - self.keep_rate ** (cycle + 1), scope=self.scope)
            self._record_masks(optimizer)
            if self.mode == "wr":
                self.model.load_state_dict(self.rewind_point)
                optimizer = self._new_optimizer()
            else:
                for group, saved in zip(optimizer.param_groups, hyperparameters):
                    for key, value in saved.items():
                        set_group_value(group, key, value)
        return history

    def _new_optimizer(self) -> Optimizer:
        optimizer = self.make_optimizer(self.model)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"make_optimizer returned {type(optimizer).__name__}, expected a torch.optim.Optimizer")
        apply_masks_(self.model, self.masks, optimizer)
        return optimizer

    @staticmethod
    def _hyperparameters(optimizer: Optimizer) -> list[dict[str, float]]:
        return [{key: float(group[key]) for key in _REWOUND_HYPERPARAMETERS if key in group}
                for group in optimizer.param_groups]

    def _record_masks(self, optimizer: Optimizer) -> None:
        names = {id(p): name for name, p in self.model.named_parameters()}
        params, _ = prunable_parameters(optimizer)
        if any(id(p) not in names for p in params):
            raise ValueError("the optimizer prunes a parameter that is not one of the model's: make_optimizer must "
                             "optimize the model it is given")
        self.masks = {names[id(p)]: p.detach() != 0 for p in params}

    @staticmethod
    def _sparsity(optimizer: Optimizer) -> float:
        params, _ = prunable_parameters(optimizer)
        total = sum(p.numel() for p in params)
        return sum(int(whole((p.detach() == 0).sum())) for p in params) / total if total else 0.0
