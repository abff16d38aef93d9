"""The optimizer and the schedules of each training method, built from a :class:`Config`.

A :class:`Method` per training schedule (per cycle of iterative pruning): the optimizer, the per-step
learning-rate schedule (warmup, then cosine or step) and, for pilot, the per-epoch alpha schedule (Algorithm 1).
The optimizers and schedules are the library's (pilot.optim, pilot.schedule, pilot.baselines); this module only
wires them to the command line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pilot.baselines import ProxSGD, lasso_param_groups, spred_optimizer, str_param_groups, to_str_model
from pilot.optim import FusedPILoTSGD
from pilot.schedule import PILoTSchedule

from .config import Config


def lr_multiplier(config: Config, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate multiplier of optimizer step ``k`` (0-based), for LambdaLR.

    Linear warmup from lr/W to lr over the first W = warmup_epochs * steps_per_epoch steps, then cosine to 0 at the
    last step, or x gamma after each milestone epoch, or constant. Per step rather than per epoch, so that warmup
    is smooth and cosine does not stay flat within an epoch.
    """
    warmup = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch
    milestones = [epoch * steps_per_epoch for epoch in config.milestones]

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if config.lr_schedule == "step":
            return config.gamma ** sum(step >= milestone for milestone in milestones)
        return 1.0

    return multiplier


@dataclass
class Method:
    """The optimizer of a run and its schedules; ``model`` is the module to train (STR converts it)."""

    model: nn.Module
    optimizer: Optimizer
    lr_schedule: LambdaLR
    alpha_schedule: Optional[PILoTSchedule] = None

    @property
    def factorised(self) -> bool:
        return isinstance(self.optimizer, FusedPILoTSGD)

    def alpha(self) -> Optional[float]:
        """The alpha in use (pilot and spred), else None."""
        if not self.factorised:
            return None
        return float(self.optimizer.param_groups[0]["alpha"])

    def l1_norm(self) -> Optional[float]:
        """Sum |m * w| over the factorised weights (pilot and spred), else None."""
        return self.optimizer.l1_norm() if self.factorised else None

    def end_epoch(self, train_accuracy: float) -> None:
        """Advance the per-epoch schedules (the alpha schedule of pilot)."""
        if self.alpha_schedule is not None:
            self.alpha_schedule.step(train_accuracy)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "alpha_schedule": None if self.alpha_schedule is None else self.alpha_schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.alpha_schedule is not None:
            self.alpha_schedule.load_state_dict(state["alpha_schedule"])


def prepare_model(config: Config, model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` converted for the method (STR's soft-threshold layers for --method str) and moved to ``device``."""
    if config.method == "str":
        model = to_str_model(model, s_init=config.str_init)
    return model.to(device)


def make_optimizer(config: Config, model: nn.Module) -> Optimizer:
    """The optimizer of ``config.method`` for ``model``, whose parameters must be on their final device
    (FusedPILoTSGD keeps its factors on the parameters' device)."""
    sgd = {"lr": config.lr, "momentum": config.momentum, "nesterov": config.nesterov}
    if config.method == "dense":
        return torch.optim.SGD(model.parameters(), weight_decay=config.weight_decay, **sgd)
    if config.method == "pilot":
        return FusedPILoTSGD(model.parameters(), weight_decay=config.weight_decay, alpha=config.alpha,
                             beta=config.beta, backend=config.backend, **sgd)
    if config.method == "spred":
        return spred_optimizer(model.parameters(), weight_decay=config.weight_decay, alpha=config.alpha,
                               backend=config.backend, **sgd)
    if config.method == "lasso":
        return ProxSGD(lasso_param_groups(model, l1=config.lasso_lambda, weight_decay=config.weight_decay), **sgd)
    if config.method == "str":
        return torch.optim.SGD(str_param_groups(model, weight_decay=config.weight_decay,
                                                s_weight_decay=config.str_weight_decay), **sgd)
    raise ValueError(f"unknown method {config.method!r}")


def make_method(config: Config, model: nn.Module, optimizer: Optimizer, steps_per_epoch: int) -> Method:
    """``optimizer`` with fresh schedules: the LR schedule of :func:`lr_multiplier` and, for pilot, PILoTSchedule
    (its relative L1 threshold is taken from the weights as they are now)."""
    alpha_schedule = None
    if config.method == "pilot":
        alpha_schedule = PILoTSchedule(optimizer, factor=config.factor, l1_threshold=config.l1_threshold,
                                       total=config.epochs, relative_threshold=not config.l1_threshold_absolute)
    return Method(model, optimizer, LambdaLR(optimizer, lr_multiplier(config, steps_per_epoch)), alpha_schedule)
