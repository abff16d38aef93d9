"""Evaluation: loss and accuracy of a model on a loader, and the paper's one-shot pruning curve.

The one-shot protocol (Jacobs & Burkholz 2025): after training, magnitude-prune the prunable weights
globally to a sparsity s and measure the accuracy, without fine-tuning, at s = 1 - 0.8^k for k = 1, 2, ...
(the levels iterative pruning with keep rate 0.8 visits) and at any extra levels asked for.

Pruning changes the distribution of every activation, while BatchNorm keeps normalising with the running
statistics of the dense network; :func:`recalibrate_batchnorm_` re-estimates them on a few training batches (no
gradient, no weight changes), which the curve can report beside the raw accuracy.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .pruning import prune_, pruning_scores, sparsity_report

__all__ = ["EvalResult", "RECALIBRATED", "autocast", "evaluate", "evaluate_splits", "recalibrate_batchnorm_",
           "one_shot_levels", "one_shot_curve"]

# Levels are rounded to this many decimals, so that a requested level and a computed 1 - 0.8^k that differ only
# by floating-point error count once.
_LEVEL_DECIMALS = 6


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy loss and top-1 accuracy (a fraction) over ``examples`` examples."""

    loss: float
    accuracy: float
    examples: int


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device,
             autocast_dtype: Optional[torch.dtype] = None) -> EvalResult:
    """Mean loss and accuracy of ``model`` (switched to eval mode, then restored) over ``loader``."""
    was_training = model.training
    model.eval()
    # Sums stay on the device so that the loop does not wait for the device after every batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    examples = 0
    try:
        for inputs, targets in loader:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, autocast_dtype):
                logits = model(inputs)
            loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            correct += (logits.argmax(dim=1) == targets).sum()
            examples += targets.shape[0]
    finally:
        model.train(was_training)
    if examples == 0:
        raise ValueError("cannot evaluate on an empty loader")
    return EvalResult(loss=loss_sum.item() / examples, accuracy=correct.item() / examples, examples=examples)


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, batches: Iterable, *, device: torch.device,
                           autocast_dtype: Optional[torch.dtype] = None) -> int:
    """Re-estimate the running mean and variance of every BatchNorm of ``model`` from ``batches`` of
    (inputs, targets); returns the number of examples seen (0 and nothing changed without BatchNorm).

    The statistics are reset and then averaged over all batches with equal weight (``momentum=None``, the
    cumulative average), so the result does not depend on the order of the batches or on the old statistics.
    Only the BatchNorm layers run in training mode, so nothing else behaves differently (no dropout), and no
    gradient is taken: the parameters do not change, only the BatchNorms' buffers. Modes and momenta are restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {module: module.training for module in model.modules()}
    momenta = [norm.momentum for norm in norms]
    examples = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for inputs, _ in batches:
            with autocast(device, autocast_dtype):
                model(inputs.to(device, non_blocking=True))
            examples += inputs.shape[0]
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    if examples == 0:
        raise ValueError("cannot recalibrate BatchNorm statistics on no batches")
    return examples


def one_shot_levels(requested: Sequence[float], keep_rate: float = 0.8) -> list[float]:
    """Sorted sparsities 1 - keep_rate^k for k = 1, 2, ... up to max(requested), plus the requested ones."""
    if not requested:
        raise ValueError("one_shot_levels needs at least one requested sparsity")
    if not all(0.0 < s < 1.0 for s in requested):
        raise ValueError(f"sparsities must lie in (0, 1), got {list(requested)}")
    if not 0.0 < keep_rate < 1.0:
        raise ValueError(f"keep_rate must lie in (0, 1), got {keep_rate}")
    highest = max(requested)
    levels = {round(s, _LEVEL_DECIMALS) for s in requested}
    k = 1
    while (level := round(1.0 - keep_rate ** k, _LEVEL_DECIMALS)) <= highest:
        levels.add(level)
        k += 1
    return sorted(levels)


def evaluate_splits(model: nn.Module, loaders: dict[str, Iterable], *, device: torch.device,
                    autocast_dtype: Optional[torch.dtype] = None, suffix: str = "") -> dict[str, float]:
    """``{"<split>_loss<suffix>": ..., "<split>_accuracy<suffix>": ...}`` of ``model`` on each of ``loaders``."""
    row = {}
    for split, loader in loaders.items():
        result = evaluate(model, loader, device=device, autocast_dtype=autocast_dtype)
        row[f"{split}_loss{suffix}"], row[f"{split}_accuracy{suffix}"] = result.loss, result.accuracy
    return row


# Suffix of the metrics measured after BatchNorm recalibration.
RECALIBRATED = "_bn"


def one_shot_curve(model: nn.Module, levels: Sequence[float], loaders: dict[str, Iterable], *,
                   device: torch.device, scope: str = "global", autocast_dtype: Optional[torch.dtype] = None,
                   on_pruned: Optional[Callable[[float, nn.Module], None]] = None,
                   recalibration: Optional[Iterable] = None, criterion: str = "magnitude") -> list[dict[str, float]]:
    """Loss and accuracy on each of ``loaders`` ({split name: loader}) of ``model`` one-shot pruned to each level.

    ``model`` (a plain model: bake STR in with :func:`pilot.remove_str_` first) is left untouched: every level
    prunes a fresh copy with :func:`pilot.prune_` (``scope`` "global" or "layer"), ranking the entries by
    :func:`pilot.pruning.pruning_scores` of ``model`` with ``criterion`` ("magnitude", the paper's, or "bn-folded").
    With ``recalibration`` (an iterable of training batches that yields the same batches each time it is iterated,
    such as a DataLoader without shuffling), each pruned copy is then evaluated again after
    :func:`recalibrate_batchnorm_` on them, under the keys suffixed :data:`RECALIBRATED`.
    ``on_pruned(level, pruned_copy)`` is called for each level (with the recalibrated copy when there is one),
    e.g. to save some of the pruned models. Returns one row per level:
    ``{"target_sparsity", "sparsity", "<split>_loss", "<split>_accuracy", ...}``, the sparsity measured on the
    pruned copy.
    """
    scores = pruning_scores(model, criterion)
    rows = []
    for level in levels:
        pruned = copy.deepcopy(model)
        prune_(pruned, level, scope=scope, scores=scores)
        row = {"target_sparsity": level, "sparsity": sparsity_report(pruned).sparsity,
               **evaluate_splits(pruned, loaders, device=device, autocast_dtype=autocast_dtype)}
        if recalibration is not None:
            recalibrate_batchnorm_(pruned, recalibration, device=device, autocast_dtype=autocast_dtype)
            row.update(evaluate_splits(pruned, loaders, device=device, autocast_dtype=autocast_dtype,
                                       suffix=RECALIBRATED))
        if on_pruned is not None:
            on_pruned(level, pruned)
        rows.append(row)
    return rows
