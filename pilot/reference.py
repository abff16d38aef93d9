"""The eager reference: PILoT as a ``torch.nn.utils.parametrize`` parametrisation trained with torch.optim.SGD.

Independent of the fused code (only the definitions of :mod:`pilot.factorisation` are shared: the initial factors
and which parameters are prunable):
each factorised weight becomes two fp32 parameters m, w and the module computes ``m * w`` in its forward.
``torch.optim.SGD`` with ``weight_decay=alpha`` on (m, w) is then exactly PILoT's step, which is what
:class:`pilot.FusedPILoTSGD` fuses. Usable directly, e.g. with other optimizers::

    names = parametrize_model(model, beta=1.0)
    optimizer = torch.optim.SGD(reference_param_groups(model, alpha=1e-4, weight_decay=5e-4), lr=0.1, momentum=0.9)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .factorisation import check_beta, factorise, is_prunable

__all__ = ["PILoTFactorisation", "parametrize_model", "factor_pairs", "reference_param_groups"]


class PILoTFactorisation(nn.Module):
    """x = m * w with fp32 factors; ``right_inverse`` gives PILoT's init (m0^2 - w0^2 = beta)."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        check_beta(beta)
        self.beta = beta
        self.dtype = torch.float32  # the weight's own dtype, set by right_inverse

    def forward(self, m: Tensor, w: Tensor) -> Tensor:
        return (m * w).to(self.dtype)

    def right_inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.dtype = x.dtype
        return factorise(x, self.beta)


def _default_selection(name: str, parameter: Tensor) -> bool:
    return is_prunable(parameter)


def parametrize_model(model: nn.Module, beta: float = 1.0, *,
                      select: Optional[Callable[[str, Tensor], bool]] = None) -> list[str]:
    """Parametrise every selected parameter of ``model`` as m * w, in place (default selection:
    :func:`pilot.factorisation.is_prunable`).

    Returns the qualified names of the factorised parameters. Their factors are
    ``module.parametrizations[name].original0`` (m) and ``.original1`` (w); see :func:`factor_pairs`.
    """
    select = select or _default_selection
    targets = [(module_name, module, name) for module_name, module in model.named_modules()
               for name, parameter in list(module.named_parameters(recurse=False)) if select(name, parameter)]
    for _, module, name in targets:
        parametrize.register_parametrization(module, name, PILoTFactorisation(beta))
    return [f"{module_name}.{name}" if module_name else name for module_name, _, name in targets]


def factor_pairs(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """{qualified weight name: (m, w)} of every PILoT-parametrised weight of ``model``."""
    pairs = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, parametrization in module.parametrizations.items():
            if any(isinstance(p, PILoTFactorisation) for p in parametrization):
                key = f"{module_name}.{name}" if module_name else name
                pairs[key] = (parametrization.original0, parametrization.original1)
    return pairs


def reference_param_groups(model: nn.Module, *, alpha: float, weight_decay: float = 0.0,
                           **group_options: Any) -> list[dict[str, Any]]:
    """torch.optim param groups: the factors with ``weight_decay=alpha``, the rest with ``weight_decay``."""
    factor_ids = {id(t) for pair in factor_pairs(model).values() for t in pair}
    factors = [p for p in model.parameters() if id(p) in factor_ids]
    others = [p for p in model.parameters() if id(p) not in factor_ids]
    groups = [{"params": factors, "weight_decay": alpha, **group_options}]
    if others:
        groups.append({"params": others, "weight_decay": weight_decay, **group_options})
    return groups
