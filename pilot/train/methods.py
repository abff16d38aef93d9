"""The optimizer and the schedules of each training method, built from a :class:`Config`.

A :class:`Method` per training schedule (per cycle of iterative pruning): the optimizer, the per-step
learning-rate schedule (warmup, then cosine or step) and, for pilot, the alpha schedule (Algorithm 1, after each
epoch or after each optimizer step). It also keeps the run's regularisation integral: the sum over optimizer steps
of lr times the strength of the method's regularisation, the quantity the implicit bias and the shrinkage depend on,
which is what makes budgets comparable. With momentum mu the effective clock is that sum / (1 - mu) (heavy-ball SGD
moves like SGD with lr / (1 - mu)): pilot's imbalance is a_t = beta * exp(-2 * sum / (1 - mu)).
The optimizers and schedules are the library's (pilot.optim, pilot.schedule, pilot.baselines); this module only
wires them to the command line.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pilot.baselines import ProxSGD, lasso_param_groups, spred_optimizer, str_param_groups, to_str_model
from pilot.gmp import GradualMagnitudePruning
from pilot.models import init_weights
from pilot.optim import FusedPILoTSGD
from pilot.pruning import sparsity_report
from pilot.schedule import PILoTSchedule, SparsityCourse, SparsityTarget, sparsity_target

from .config import STRENGTH_SETTINGS, Config


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


# (param group, key) of each method's regularisation strength of the prunable weights: alpha (pilot, spred),
# lambda (lasso, its first group), the weight decay of STR's threshold logits (its second group, see
# pilot.baselines.str_param_groups), dense SGD's weight decay.
STRENGTH = {"pilot": (0, "alpha"), "spred": (0, "alpha"), "lasso": (0, "l1"), "str": (1, "weight_decay"),
            "dense": (0, "weight_decay"), "gmp": (0, "weight_decay")}


@dataclass
class Method:
    """The optimizer of a run and its schedules; ``model`` is the module to train (STR converts it).

    With ``accuracy_window`` set, the alpha schedule steps after every optimizer step (:meth:`end_step`) with a
    running training accuracy, a bias-corrected exponential average with weight 1 / accuracy_window on the
    newest batch; otherwise after every epoch (:meth:`end_epoch`) with the epoch's accuracy. With
    --target-sparsity, ``target`` (the strength's controller, or GMP's pruning) steps after every optimizer step.
    """

    model: nn.Module
    optimizer: Optimizer
    lr_schedule: LambdaLR
    strength_key: tuple[int, str] = (0, "weight_decay")
    alpha_schedule: Optional[PILoTSchedule] = None
    accuracy_window: Optional[int] = None
    target: Optional[Union[SparsityTarget, GradualMagnitudePruning]] = None
    regularisation_integral: float = 0.0
    running_accuracy: float = 0.0  # the exponential average before bias correction
    running_weight: float = 0.0  # 1 - (1 - 1 / window) ** steps: its bias correction

    @property
    def factorised(self) -> bool:
        return isinstance(self.optimizer, FusedPILoTSGD)

    @property
    def steps_alpha(self) -> bool:
        """Whether the alpha schedule steps after every optimizer step (it needs each batch's accuracy)."""
        return self.alpha_schedule is not None and self.accuracy_window is not None

    def alpha(self) -> Optional[float]:
        """The alpha in use (pilot and spred), else None."""
        if not self.factorised:
            return None
        return float(self.optimizer.param_groups[0]["alpha"])

    def l1_norm(self) -> Optional[float]:
        """Sum |m * w| over the factorised weights (pilot and spred), else None."""
        return self.optimizer.l1_norm() if self.factorised else None

    def strength(self) -> float:
        """The strength of the method's regularisation of the prunable weights (see :data:`STRENGTH`)."""
        group, key = self.strength_key
        return float(self.optimizer.param_groups[group][key])

    def before_step(self) -> None:
        """Add this step's lr * strength to the regularisation integral (call before ``optimizer.step()``)."""
        self.regularisation_integral += float(self.optimizer.param_groups[0]["lr"]) * self.strength()

    def end_step(self, batch_accuracy: Optional[float] = None) -> None:
        """After an optimizer step: the target's step, and the per-step alpha schedule, fed the running training
        accuracy (``batch_accuracy`` is needed only when :attr:`steps_alpha`)."""
        if self.target is not None:
            self.target.step()
        if self.alpha_schedule is None or self.accuracy_window is None:
            return
        decay = 1.0 - 1.0 / self.accuracy_window
        self.running_accuracy = decay * self.running_accuracy + (1.0 - decay) * batch_accuracy
        self.running_weight = decay * self.running_weight + (1.0 - decay)
        self.alpha_schedule.step(self.running_accuracy / self.running_weight)

    def end_epoch(self, train_accuracy: float) -> None:
        """After an epoch: the per-epoch alpha schedule of pilot, or the target's accuracy rule."""
        if self.alpha_schedule is not None and self.accuracy_window is None:
            self.alpha_schedule.step(train_accuracy)
        if isinstance(self.target, SparsityTarget):
            self.target.end_epoch(train_accuracy)

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate by ``factor`` from this step on, for the rest of the LR schedule (its state
        dict and the optimizer's carry the change into checkpoints)."""
        self.lr_schedule.base_lrs = [lr * factor for lr in self.lr_schedule.base_lrs]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group["initial_lr"] * factor
            group["lr"] = group["lr"] * factor
        if isinstance(self.target, SparsityTarget):
            self.target.scale_lr(factor)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), **self.schedules_state_dict()}

    def schedules_state_dict(self) -> dict[str, Any]:
        """The state of the schedules and running sums: :meth:`state_dict` without the optimizer's (which an
        --fsdp checkpoint holds sharded)."""
        return {"lr_schedule": self.lr_schedule.state_dict(),
                "alpha_schedule": None if self.alpha_schedule is None else self.alpha_schedule.state_dict(),
                "target": None if self.target is None else self.target.state_dict(),
                "regularisation_integral": self.regularisation_integral,
                "running_accuracy": self.running_accuracy, "running_weight": self.running_weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_schedules_state_dict(state)

    def load_schedules_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`schedules_state_dict` (the optimizer's state, with the alphas, is loaded apart)."""
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.alpha_schedule is not None:
            self.alpha_schedule.load_state_dict(state["alpha_schedule"])
        if self.target is not None:  # after the model and the optimizer: GMP masks the loaded zeros again
            self.target.load_state_dict(state["target"])
        self.regularisation_integral = state["regularisation_integral"]
        self.running_accuracy, self.running_weight = state["running_accuracy"], state["running_weight"]


def prepare_model(config: Config, model: nn.Module, device: torch.device, *, distributed: bool = False
                  ) -> nn.Module:
    """``model`` (freshly built) re-initialised as --conv-init asks, converted for the method (STR's soft-threshold
    layers for --method str), to SyncBatchNorm with --sync-bn in a ``distributed`` run, and moved to ``device``
    (channels_last with --channels-last)."""
    if config.conv_init == "fan-in":
        init_weights(model, conv_mode="fan_in")
    if config.method == "str":
        model = to_str_model(model, s_init=config.str_init)
    if config.sync_bn and distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.channels_last:
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def lr_sum(config: Config, steps_per_epoch: int) -> float:
    """The sum of the learning rate over the optimizer steps of a cycle."""
    multiplier = lr_multiplier(config, steps_per_epoch)
    return sum(config.lr * multiplier(k) for k in range(config.epochs * steps_per_epoch))


# The largest lr * strength a target may use (pilot.schedule.SparsityTarget's ``maximum``): the fraction by which
# one step may shrink the weights (alpha of pilot and spred, lambda of LASSO as a soft threshold) or STR's
# threshold logits. Short budgets hit it: they cannot sparsify as far as long ones without a collapse.
MAX_LR_STRENGTH = 1e-3


def strength_ceiling(config: Config) -> float:
    return MAX_LR_STRENGTH / config.lr


def starting_strengths(config: Config, steps_per_epoch: int) -> Config:
    """``config`` with the method's strength set where --target-sparsity starts it: the recipe's regularisation
    integral over this run's sum of lr, at most :func:`strength_ceiling` (unchanged if the strength was given, or
    without a target)."""
    if config.strength_integral is None:
        return config
    start = min(config.strength_integral / lr_sum(config, steps_per_epoch), strength_ceiling(config))
    return dataclasses.replace(config, **{STRENGTH_SETTINGS[config.method]: start})


def make_optimizer(config: Config, model: nn.Module) -> Optimizer:
    """The optimizer of ``config.method`` for ``model``, whose parameters must be on their final device
    (FusedPILoTSGD keeps its factors on the parameters' device); a config with a strength integral must have been
    through :func:`starting_strengths`."""
    sgd = {"lr": config.lr, "momentum": config.momentum, "nesterov": config.nesterov}
    if config.method in ("dense", "gmp"):
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


def make_target(config: Config, model: nn.Module, optimizer: Optimizer, total: int
                ) -> Optional[Union[SparsityTarget, GradualMagnitudePruning]]:
    """What steers ``config.method`` to --target-sparsity over ``total`` optimizer steps (None without one):
    alpha's controller (pilot/spred, on the effective density), lambda's (lasso) or the threshold decay's (str) on
    the exact density, or gmp's pruning."""
    if config.target_sparsity is None:
        return None
    if config.method in ("pilot", "spred"):
        return sparsity_target(optimizer, config.target_sparsity, total, maximum=strength_ceiling(config),
                               algorithm1=config.alpha_schedule == "algorithm1")
    course = SparsityCourse(config.target_sparsity, total)
    if config.method == "gmp":
        return GradualMagnitudePruning(optimizer, course)
    group, key = STRENGTH[config.method]
    return SparsityTarget(optimizer, course, lambda: 1.0 - sparsity_report(model).sparsity, key=key, groups=[group],
                          maximum=strength_ceiling(config))


def make_method(config: Config, model: nn.Module, optimizer: Optimizer, steps_per_epoch: int) -> Method:
    """``optimizer`` with fresh schedules: the LR schedule of :func:`lr_multiplier`, the target's controller
    (:func:`make_target`) and, for Algorithm 1 without a target, PILoTSchedule (a relative threshold is taken from
    the weights as they are now), per epoch or per optimizer step."""
    alpha_schedule, window = None, None
    if config.factor is not None:  # Algorithm 1 without a target (pilot's, or spred's ablation)
        per_step = config.alpha_update == "step"
        window = (config.accuracy_window or steps_per_epoch) if per_step else None
        alpha_schedule = PILoTSchedule(
            optimizer, factor=config.factor, threshold=config.threshold, signal=config.sparsity_signal,
            total=config.epochs * (steps_per_epoch if per_step else 1),
            relative_threshold=config.sparsity_signal == "l1" and not config.threshold_absolute)
    return Method(model, optimizer, LambdaLR(optimizer, lr_multiplier(config, steps_per_epoch)),
                  STRENGTH[config.method], alpha_schedule, accuracy_window=window,
                  target=make_target(config, model, optimizer, config.epochs * steps_per_epoch))
