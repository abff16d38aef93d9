r"""Magnitude pruning to an exact sparsity, masks that stay applied, sparsity reports and export.

Pruning a factorised entry x = m * w of a :class:`pilot.FusedPILoTSGD` sets x, m, w and both momentum buffers
to 0. That is a fixed point of the step (g_m = g * w + alpha * m = 0, likewise g_w, and the buffers stay 0),
and x == round(m * w) still holds, so the optimizer does not re-factorise the entry: it stays exactly 0 through
any number of further steps. Entries of other optimizers (dense SGD, :class:`pilot.ProxSGD`, STR's raw weights)
are not at a fixed point, so :func:`prune_` registers a step post-hook on such an optimizer that zeroes the
pruned entries and their momentum after every step.

"Sparsity" is the fraction of exactly-zero entries among the pruned tensors (the paper's protocol). An entry
that is already zero counts as zero and, after :func:`prune_`, as pruned.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune
from torch.optim import Optimizer

from .factorisation import FACTOR_KEYS, PLAIN_KEYS, is_factorised, is_prunable
from .optim import FusedPILoTSGD
from .sharding import whole

__all__ = ["prune_", "apply_masks_", "prunable_parameters", "named_prunable_weights", "pruning_masks", "keep_mask",
           "sparsity_report", "SparsityReport", "LayerSparsity", "export_masks", "export_sparse", "to_torch_prune",
           "SCOPES", "CRITERIA", "pruning_scores", "batchnorm_after"]

SCOPES = ("global", "layer")
CRITERIA = ("magnitude", "bn-folded")
Select = Callable[[str, Tensor], bool]
Target = Union[Optimizer, nn.Module]


def _default_selection(name: str, parameter: Tensor) -> bool:
    return is_prunable(parameter)


# ---------------------------------------------------------------------------------------------- choosing entries

def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
        raise ValueError(f"Invalid sparsity value: {sparsity!r} (need a number in [0, 1])")
    return float(sparsity)


def keep_mask(scores: Tensor, num_pruned: int) -> Tensor:
    """Bool mask of ``scores`` (any shape) that is False on exactly ``num_pruned`` entries with the smallest scores.

    Ties at the threshold are broken by position (the first ones in flattened order are pruned), so the count is
    exact and the choice deterministic. O(n) memory: one kthvalue, no full sort.
    """
    flat = scores.reshape(-1)
    if not 0 <= num_pruned <= flat.numel():
        raise ValueError(f"Invalid num_pruned value: {num_pruned} (need 0 <= num_pruned <= {flat.numel()})")
    if num_pruned == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(num_pruned).values
    below = flat < threshold
    ties = flat == threshold
    needed = num_pruned - int(below.sum())
    pruned = below | (ties & (ties.cumsum(0) <= needed))
    return ~pruned.view(scores.shape)


def _num_pruned(sparsity: float, numel: int) -> int:
    return int(round(sparsity * numel))


def pruning_masks(tensors: list[Tensor], sparsity: float, scope: str = "global") -> list[Tensor]:
    """Keep-masks (bool, True = kept) that zero exactly ``round(sparsity * n)`` entries of smallest magnitude.

    ``scope="global"``: n = the total size of all tensors, one threshold across them (ties broken by position in
    the concatenation, tensors in the given order). ``scope="layer"``: n = each tensor's own size.
    """
    sparsity = _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"Invalid scope value: {scope!r} (need one of {', '.join(SCOPES)})")
    magnitudes = [t.detach().abs().float() for t in tensors]
    if scope == "layer":
        return [keep_mask(a, _num_pruned(sparsity, a.numel())) for a in magnitudes]
    flat = torch.cat([a.reshape(-1) for a in magnitudes]) if magnitudes else torch.zeros(0)
    keep = keep_mask(flat, _num_pruned(sparsity, flat.numel()))
    return [part.view(a.shape) for part, a in zip(keep.split([a.numel() for a in magnitudes]), magnitudes)]


# ---------------------------------------------------------------------------------------------- zeroing entries

class _MaskHook:
    """Step post-hook of a plain optimizer: zero the pruned entries and their momentum after every step."""

    def __init__(self) -> None:
        self.pruned: dict[Tensor, Tensor] = {}  # parameter -> bool mask of pruned entries

    @torch.no_grad()
    def __call__(self, optimizer: Optimizer, args: object, kwargs: object) -> None:
        for p, pruned in self.pruned.items():
            p.masked_fill_(pruned, 0.0)
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                buffer.masked_fill_(pruned, 0.0)


_MASK_HOOKS: "weakref.WeakKeyDictionary[Optimizer, _MaskHook]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _zero_pruned_(p: Tensor, pruned: Tensor, optimizer: Optional[Optimizer]) -> None:
    """Set the pruned entries of p to 0 together with the optimizer's state for them (see the module doc)."""
    p.masked_fill_(pruned, 0.0)
    if optimizer is None:
        return
    state = optimizer.state.get(p, {})
    if is_factorised(optimizer, p):  # (0, 0) with zero momentum is a fixed point of the step
        for key in FACTOR_KEYS:
            if state[key] is not None:
                state[key].masked_fill_(pruned, 0.0)
        return
    buffer_key, = PLAIN_KEYS
    if state.get(buffer_key) is not None:
        state[buffer_key].masked_fill_(pruned, 0.0)
    hook = _MASK_HOOKS.get(optimizer)
    if hook is None:
        hook = _MASK_HOOKS[optimizer] = _MaskHook()
        optimizer.register_step_post_hook(hook)
    hook.pruned[p] = pruned.clone()


def prunable_parameters(target: Target) -> tuple[list[Tensor], Optional[Optimizer]]:
    """The tensors :func:`prune_` works on (see there), and the optimizer whose state follows them."""
    if isinstance(target, FusedPILoTSGD):
        params = [p for group in target.param_groups for p in group["params"] if is_factorised(target, p)]
        return params, target
    if isinstance(target, Optimizer):
        return [p for group in target.param_groups for p in group["params"] if is_prunable(p)], target
    if isinstance(target, nn.Module):
        return [p for name, p in target.named_parameters() if _default_selection(name, p)], None
    raise TypeError(f"Invalid target: expected a torch.optim.Optimizer or an nn.Module, got "
                    f"{type(target).__name__}")


def prune_(target: Target, sparsity: float, *, scope: str = "global",
           scores: Optional[Sequence[Tensor]] = None) -> int:
    r"""Magnitude-prune in place to exactly ``round(sparsity * n)`` zeros; returns the number of zeros.

    ``target`` selects the tensors:

    - a :class:`pilot.FusedPILoTSGD`: its factorised parameters, scored by :math:`|m \odot w|` (= |x|, which the
      model holds); pruned entries get x = m = w = 0 and zero momentum, a fixed point of the step.
    - any other optimizer (dense SGD, :class:`pilot.ProxSGD`, SGD on an STR model): its parameters with
      ``ndim >= 2``; a step post-hook keeps the pruned entries and their momentum at 0 after every step.
    - an ``nn.Module`` (one-shot pruning of a trained dense model, no optimizer): its parameters with ``ndim >= 2``.
      While a FusedPILoTSGD trains the model, prune the optimizer instead: a zero written into the model alone is
      re-factorised at the next step as (sqrt(beta), 0), from where it grows back.

    ``scope="global"``: one magnitude threshold over all of them (n = their total size); ``scope="layer"``: each
    tensor pruned to the fraction on its own (n = its size, so the total is the sum of per-tensor roundings).
    Ties at the threshold are broken by position (:func:`keep_mask`), so the count is exact. Zeros that exist
    already count towards the request (if there are more, nothing more is pruned) and are masked too.

    ``scores``: the importance of each entry instead of its magnitude (non-negative, one tensor per pruned tensor,
    in the order of :func:`prunable_parameters`), e.g. :func:`pruning_scores` with ``criterion="bn-folded"``.
    """
    params, optimizer = prunable_parameters(target)
    if scores is None:
        scores = params
    elif len(scores) != len(params) or any(s.shape != p.shape for s, p in zip(scores, params)):
        raise ValueError(f"scores must match the {len(params)} pruned tensors in order and shape, got "
                         f"{[tuple(s.shape) for s in scores]} for {[tuple(p.shape) for p in params]}")
    zeros = 0
    for p, keep in zip(params, pruning_masks(list(scores), sparsity, scope)):
        pruned = ~keep | (p.detach() == 0)
        _zero_pruned_(p, pruned, optimizer)
        zeros += int(pruned.sum())
    return zeros


def batchnorm_after(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """``{"<module>.weight": batchnorm}`` for each conv / linear layer whose output goes only into a BatchNorm
    with running statistics, found by tracing the model with ``torch.fx`` (raises a ValueError naming the model
    if it cannot be traced)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many types for untraceable Python; all mean the same here
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx to find which BatchNorm follows which "
                         f"layer ({type(error).__name__}: {error}); use criterion='magnitude'") from error
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        norm = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.track_running_stats:
            continue
        source = node.args[0]
        layer = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and len(source.users) == 1:
            found[f"{source.target}.weight"] = norm
    return found


@torch.no_grad()
def pruning_scores(model: nn.Module, criterion: str = "magnitude") -> list[Tensor]:
    r"""The importance of each entry of the prunable weights of ``model`` (in :func:`prunable_parameters` order).

    - ``"magnitude"``: :math:`|x|`, the paper's one-shot criterion.
    - ``"bn-folded"``: :math:`|x_{c\ldots}| \cdot |\gamma_c| / \sqrt{\sigma_c^2 + \epsilon}` for a conv / linear
      weight whose output channel c feeds a BatchNorm (:func:`batchnorm_after`), i.e. the magnitude of the weight
      with the BatchNorm folded in, as inference computes with it; :math:`|x|` for the other weights.

    Why fold: a layer followed by BatchNorm computes the same function at any scale of its weights (per output
    channel), so weight decay, LASSO's shrinkage or PILoT's factors can shrink one layer or channel far more than
    another at no cost to the loss. Raw magnitudes then compare numbers in different units, and one global
    threshold can empty a layer that matters (layer collapse). The folded magnitude is invariant to that scale.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"Invalid criterion value: {criterion!r} (need one of {', '.join(CRITERIA)})")
    params, _ = prunable_parameters(model)
    if criterion == "magnitude":
        return [p.detach().abs() for p in params]
    norms = batchnorm_after(model)
    names = {id(p): name for name, p in model.named_parameters()}
    scores = []
    for p in params:
        score = p.detach().abs().float()
        norm = norms.get(names[id(p)])
        if norm is not None:
            scale = torch.rsqrt(norm.running_var.float() + norm.eps)
            if norm.affine:
                scale = scale * norm.weight.detach().abs().float()
            score = score * scale.view(-1, *([1] * (p.ndim - 1)))
        scores.append(score)
    return scores


def apply_masks_(model: nn.Module, masks: dict[str, Tensor], optimizer: Optional[Optimizer] = None) -> None:
    """Zero the entries where ``masks[name]`` is False in ``model``'s parameter ``name`` (and in the optimizer's
    state for them, as :func:`prune_` does), e.g. after rewinding the weights or building a fresh optimizer."""
    for name, keep in masks.items():
        p = model.get_parameter(name)
        if keep.shape != p.shape:
            raise ValueError(f"mask for {name} has shape {tuple(keep.shape)}, the parameter {tuple(p.shape)}")
        _zero_pruned_(p, ~keep.to(device=p.device, dtype=torch.bool), optimizer)


# ---------------------------------------------------------------------------------------------- report and export

def named_prunable_weights(model: nn.Module, select: Optional[Select] = None) -> list[tuple[str, Tensor]]:
    """(name, detached tensor) of the selected parameters (default: the prunable ones, ``ndim >= 2``); a
    parametrised weight (e.g. STR, pilot.reference) is reported by its effective value ``module.<name>`` under its
    plain name, not by its originals."""
    select = select or _default_selection
    weights = []
    for module_name, module in model.named_modules():
        if "parametrizations" in module_name.split("."):
            continue  # parametrisation internals: their owner reports the effective tensor
        names = [name for name, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())
        for name in names:
            tensor = getattr(module, name)
            qualified = f"{module_name}.{name}" if module_name else name
            if select(qualified, tensor):
                weights.append((qualified, tensor.detach()))
    return weights


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-tensor and global counts of exact zeros; ``str(report)`` is a table."""

    layers: tuple[LayerSparsity, ...]

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def table(self) -> str:
        rows = [*self.layers, LayerSparsity("global", self.zeros, self.total)]
        width = max([len("layer")] + [len(row.name) for row in rows])
        lines = [f"{'layer':<{width}}  {'zeros':>12}  {'total':>12}  {'sparsity':>8}"]
        lines += [f"{row.name:<{width}}  {row.zeros:>12,}  {row.total:>12,}  {row.sparsity:>8.2%}" for row in rows]
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)

    __str__ = table


def sparsity_report(model: nn.Module, select: Optional[Select] = None) -> SparsityReport:
    """Zeros / total / sparsity of each selected weight (default: ``ndim >= 2``, the prunable conv and linear
    weights) and globally. ``select(name, tensor)`` picks others, e.g. ``lambda n, t: True`` for everything."""
    return SparsityReport(tuple(LayerSparsity(name, int(whole((t == 0).sum())), t.numel())
                                for name, t in named_prunable_weights(model, select)))


def export_masks(model: nn.Module, select: Optional[Select] = None) -> dict[str, Tensor]:
    """``{"<module>.<name>_mask": mask}`` of the selected weights, in ``torch.nn.utils.prune``'s form: the buffer
    name it registers, the weight's dtype, 1 where the weight is kept (non-zero) and 0 where it is zero."""
    return {f"{name}_mask": (t != 0).to(t.dtype) for name, t in named_prunable_weights(model, select)}


def export_sparse(model: nn.Module, select: Optional[Select] = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(state_dict, masks): the model's ordinary state dict (pruned weights are exact zeros) and
    :func:`export_masks`. The state dict loads into the dense architecture; the masks into
    :func:`to_torch_prune` to keep fine-tuning with the zeros fixed."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}, export_masks(model, select)


def to_torch_prune(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Attach ``masks`` (from :func:`export_masks`) with ``torch.nn.utils.prune.custom_from_mask``: each weight
    becomes ``<name>_orig * <name>_mask``, so further training keeps the pruned entries at 0. Returns model."""
    for key, mask in masks.items():
        if not key.endswith("_mask"):
            raise ValueError(f"Invalid mask name: {key!r} (need '<module>.<name>_mask', as export_masks gives)")
        module_name, _, name = key[:-len("_mask")].rpartition(".")
        torch_prune.custom_from_mask(model.get_submodule(module_name), name, mask)
    return model
