r"""The sparsification methods the paper compares PILoT with: spred, LASSO (proximal SGD) and STR.

- **spred** (Ziyin & Wang 2023) is PILoT's step with the balanced init beta = 0 and a constant alpha:
  :func:`spred_optimizer` builds that :class:`pilot.FusedPILoTSGD` (no separate optimizer). With m0 = |w0|,
  m^2 - w^2 stays 0 and no weight can change sign, which is what PILoT's beta > 0 fixes.
- **LASSO**: :class:`ProxSGD`, ``torch.optim.SGD`` followed by the proximal map of :math:`\lambda\lVert x\rVert_1`
  (soft-thresholding) on the groups with ``l1 > 0``; :func:`lasso_param_groups` puts the prunable weights there.
- **STR** (Kusupati et al. 2020): :func:`to_str_model` reparametrises every Conv / Linear weight as
  :math:`\operatorname{sign}(w)\,\mathrm{relu}(|w| - \sigma(s))` with one learnable threshold s per layer;
  :func:`str_param_groups` gives s its own weight decay; :func:`remove_str_` bakes the sparse weights in.

Every baseline is pruned, reported and exported with :mod:`pilot.pruning` and runs under
:class:`pilot.IterativePruning` like FusedPILoTSGD.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .factorisation import is_prunable
from .checks import check_number
from .optim import FusedPILoTSGD

__all__ = ["spred_optimizer", "ProxSGD", "soft_threshold", "lasso_param_groups", "SoftThreshold", "to_str_model",
           "str_param_groups", "remove_str_", "STR_MODULES"]

Params = Union[Iterable[Tensor], Iterable[dict[str, Any]]]


# ---------------------------------------------------------------------------------------------- spred

def spred_optimizer(params: Params, *, alpha: float, **options: Any) -> FusedPILoTSGD:
    """spred: ``FusedPILoTSGD(params, alpha=alpha, beta=0, **options)``. Keep alpha constant (no
    :class:`pilot.PILoTSchedule`), as spred does; ``options`` are FusedPILoTSGD's (lr, momentum, backend, ...)."""
    if "beta" in options:
        raise ValueError("spred_optimizer sets beta=0 itself (spred's balanced init); do not pass beta")
    return FusedPILoTSGD(params, alpha=alpha, beta=0.0, **options)


# ---------------------------------------------------------------------------------------------- LASSO

def soft_threshold(x: Tensor, threshold: float) -> Tensor:
    r"""The proximal map of :math:`t\lVert\cdot\rVert_1`: :math:`\operatorname{sign}(x)\max(|x| - t, 0)`."""
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0)


class ProxSGD(torch.optim.SGD):
    r"""Proximal SGD for :math:`f(x) + \lambda\lVert x\rVert_1` (LASSO): ``torch.optim.SGD``'s step, then

    .. math:: x \leftarrow \operatorname{sign}(x)\,\max(|x| - \gamma\lambda,\ 0)

    on every parameter of a group with ``l1`` :math:`\lambda > 0` (lr :math:`\gamma`). Without momentum this
    is proximal gradient descent (ISTA); with momentum it is the usual heuristic of thresholding after the
    momentum step. ``l1`` is a group key like ``lr``; all other arguments are ``torch.optim.SGD``'s.
    """

    def __init__(self, params: Params, lr: Union[float, Tensor] = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *, l1: float = 0.0,
                 **sgd_options: Any) -> None:
        check_number("l1", l1)
        self._default_l1 = l1  # read by add_param_group while SGD.__init__ runs, before defaults has "l1"
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, **sgd_options)
        self.defaults["l1"] = l1

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group.setdefault("l1", self._default_l1)
        check_number("l1", param_group["l1"])
        super().add_param_group(param_group)

    def step(self, closure: Any = None) -> Any:
        """``torch.optim.SGD.step``, then soft-thresholding of the groups with ``l1 > 0``."""
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                if group["l1"] > 0:
                    threshold = float(group["lr"]) * group["l1"]
                    for p in group["params"]:
                        if p.grad is not None:
                            p.copy_(soft_threshold(p, threshold))
        return loss


def _split(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    weights = [p for p in model.parameters() if is_prunable(p)]
    others = [p for p in model.parameters() if not is_prunable(p)]
    return weights, others


def lasso_param_groups(model: nn.Module, *, l1: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """ProxSGD groups: the prunable weights (``ndim >= 2``) with ``l1`` and no weight decay, the rest (biases,
    BatchNorm) with ``weight_decay`` and no L1."""
    weights, others = _split(model)
    groups = [{"params": weights, "l1": l1, "weight_decay": 0.0}]
    if others:
        groups.append({"params": others, "l1": 0.0, "weight_decay": weight_decay})
    return groups


# ---------------------------------------------------------------------------------------------- STR

STR_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class SoftThreshold(nn.Module):
    r"""STR's weight, :math:`\operatorname{sign}(w)\,\mathrm{relu}(|w| - \sigma(s))`, as a parametrisation.

    s is a learnable scalar per layer (fp32). Autograd gives STR's gradients:
    :math:`\partial/\partial w = \mathbb{1}[|w| > \sigma(s)]` and
    :math:`\partial/\partial s = -\sigma'(s)\sum \operatorname{sign}(w)\,\mathbb{1}[|w| > \sigma(s)] \cdot g`.
    Weight decay on s pulls it towards 0, i.e. the threshold up towards 1/2: that is what sparsifies.
    """

    def __init__(self, s_init: float) -> None:
        super().__init__()
        if isinstance(s_init, bool) or not isinstance(s_init, (int, float)) or not math.isfinite(s_init):
            raise ValueError(f"Invalid s_init value: {s_init!r} (need a finite number)")
        self.s = nn.Parameter(torch.tensor(float(s_init)))

    def forward(self, w: Tensor) -> Tensor:
        return torch.sign(w) * torch.relu(w.abs() - torch.sigmoid(self.s).to(w.dtype))


def to_str_model(model: nn.Module, *, s_init: float = -5.0) -> nn.Module:
    """Convert every Conv / Linear of ``model`` to STR in place (their ``weight`` becomes the soft-thresholded
    :class:`SoftThreshold` of the raw weight, now ``<module>.parametrizations.weight.original``); returns model.

    Layers already converted are left as they are. The threshold starts at sigmoid(s_init) (sigmoid(-5) =
    0.0067): small against typical weights, so training starts nearly dense and the weight decay on s raises it.
    """
    layers = [module for module in model.modules() if isinstance(module, STR_MODULES)]
    if not layers:
        raise ValueError(f"model has no {', '.join(t.__name__ for t in STR_MODULES)} module to convert to STR")
    for module in layers:
        if not parametrize.is_parametrized(module, "weight"):  # idempotent: WR may rebuild the optimizer each cycle
            parametrize.register_parametrization(module, "weight", SoftThreshold(s_init))
    return model


def _thresholds(model: nn.Module) -> list[Tensor]:
    return [module.s for module in model.modules() if isinstance(module, SoftThreshold)]


def str_param_groups(model: nn.Module, *, weight_decay: float, s_weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups for an STR model: the thresholds s with ``s_weight_decay``, every other parameter with
    ``weight_decay``."""
    thresholds = _thresholds(model)
    if not thresholds:
        raise ValueError("model has no STR threshold: call to_str_model(model) first")
    ids = {id(s) for s in thresholds}
    return [{"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": weight_decay},
            {"params": thresholds, "weight_decay": s_weight_decay}]


def remove_str_(model: nn.Module) -> nn.Module:
    """Bake STR's sparse weights in (the model becomes plain dense layers with exact zeros, ready for
    :func:`pilot.export_sparse`); returns model."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and \
                any(isinstance(p, SoftThreshold) for p in module.parametrizations["weight"]):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
