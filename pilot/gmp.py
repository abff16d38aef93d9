r"""Gradual magnitude pruning (GMP; Zhu & Gupta, "To prune, or not to prune", 2017).

Dense training with the weights pruned step by step along the cubic :class:`pilot.schedule.SparsityCourse`:
every ``interval`` optimizer steps the prunable weights are magnitude-pruned (one global threshold, the same
ranking as the final one-shot pruning) to the course's sparsity at that step, :math:`1 - p(\tau)`, which reaches
the target S at the course's end; the rest of training fine-tunes the survivors under the final mask. Pruned
entries stay exactly 0 with zero momentum (:func:`pilot.prune_` keeps them so after every step), and the masks
only grow: an entry already at 0 counts as pruned.
"""
from __future__ import annotations

from typing import Any, Optional

from torch.optim import Optimizer

from .pruning import prune_
from .schedule import SparsityCourse

__all__ = ["GradualMagnitudePruning"]


class GradualMagnitudePruning:
    """Prunes ``optimizer``'s prunable weights (``ndim >= 2``) along ``course``; one :meth:`step` after each
    optimizer step. ``interval``: optimizer steps between prunings (default: about 100 over the course; Zhu &
    Gupta prune every 100-1,000 steps of far longer runs). ``sparsity`` is the fraction pruned so far.

    After loading a checkpoint, :meth:`load_state_dict` masks the zeros of the loaded weights again (the masks
    are the weights' exact zeros), so the resumed run continues exactly.

    Host synchronisation: the steps between prunings compute on host numbers only and touch no tensor. A pruning
    reads the weights (one global magnitude threshold, and the count of pruned entries): a device sync, inherent
    in choosing the threshold, once per ``interval``. No hyper-parameter is read from the optimizer's groups.
    """

    def __init__(self, optimizer: Optimizer, course: SparsityCourse, *, interval: Optional[int] = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        steps_in_course = max(1, round((course.end - course.start) * course.total))
        self.interval = interval if interval is not None else max(1, steps_in_course // 100)
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval <= 0:
            raise ValueError(f"Invalid interval value: {interval!r} (need an int > 0)")
        self.optimizer, self.course = optimizer, course
        self.k = 0
        self.sparsity = 0.0

    def step(self) -> float:
        """After each optimizer step: every ``interval`` steps (and at the course's end), prune to the course's
        sparsity; returns the sparsity pruned to so far."""
        self.k += 1
        ended = self.course.progress(self.k) >= 1 and self.sparsity < self.course.sparsity
        if self.k % self.interval == 0 or ended:
            wanted = 1.0 - self.course.density(self.k)
            if wanted > self.sparsity:
                self.sparsity = wanted
                prune_(self.optimizer, wanted)
        return self.sparsity

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "sparsity": self.sparsity}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the count and mask the loaded weights' zeros again (load the model and optimizer first)."""
        self.k, self.sparsity = state_dict["k"], state_dict["sparsity"]
        if self.sparsity > 0:
            prune_(self.optimizer, self.sparsity)
