"""The end of a run: one-shot pruning to the target sparsities (with and without BatchNorm recalibration), the
one-shot curve, exports, plots (training curves, one-shot curve, per-layer density) and the summary."""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import pilot
from pilot.baselines import remove_str_
from pilot.evaluate import RECALIBRATED, evaluate_splits, one_shot_curve, one_shot_levels, recalibrate_batchnorm_
from pilot.plots import plot_layer_density, plot_one_shot, plot_training_curves
from pilot.pruning import export_sparse, sparsity_report

from .config import Config
from .distributed import SINGLE, Distributed
from .loop import Progress
from .run_data import Data
from .rundir import (CURVES_PNG, LAYER_DENSITY_PNG, ONE_SHOT_JSON, ONE_SHOT_PNG, SUMMARY, pruned_model_name,
                     save_json, save_torch)
from .subnormals import subnormals_flushed

log = logging.getLogger("pilot.train")

# The paper's one-shot levels 1 - 0.8^k: those iterative pruning with keep rate 0.8 visits.
ONE_SHOT_KEEP_RATE = 0.8


def plain_model(model: nn.Module) -> nn.Module:
    """A copy of the trained model as plain layers (STR's soft thresholds baked into exact zeros)."""
    return remove_str_(copy.deepcopy(model))


def finish(config: Config, data: Data, model: nn.Module, progress: Progress, *, started: float,
           place: Distributed = SINGLE) -> Optional[dict[str, Any]]:
    """Prune, evaluate and export the trained ``model``; write one_shot.json/.png, curves.png and summary.json.

    ``started`` is the ``time.perf_counter()`` at which this invocation began. Returns the summary (on rank 0; None
    on the other ranks of a distributed run, which prune the same weights, evaluate their shards and write nothing).
    """
    out = Path(config.out)
    device = torch.device(config.device)
    autocast_dtype = torch.bfloat16 if config.bf16 else None
    began = time.perf_counter()
    trained = plain_model(model)
    targets = {round(s, 6) for s in config.sparsity}
    pruned_results: dict[float, dict[str, Any]] = {}

    def save_if_target(level: float, pruned: nn.Module) -> None:
        if level not in targets or not place.is_main:
            return
        state_dict, masks = export_sparse(pruned)
        name = pruned_model_name(level)
        save_torch({"state_dict": state_dict, "masks": masks, "model": config.model, "data": config.data,
                    "num_classes": data.bundle.num_classes, "in_channels": data.bundle.in_channels,
                    "input_size": data.bundle.image_size, "target_sparsity": level,
                    "bn_recalibration_batches": config.bn_recalibration}, out / name)
        report = sparsity_report(pruned)
        pruned_results[level] = {"file": name, "layers": [
            {"name": layer.name, "zeros": layer.zeros, "total": layer.total, "sparsity": layer.sparsity}
            for layer in report.layers]}
        if level == max(targets):
            log.info("per-layer sparsity at %g%%:\n%s", 100 * level, report.table())

    levels = one_shot_levels(config.sparsity, ONE_SHOT_KEEP_RATE) if config.curve else sorted(targets)
    curve = one_shot_curve(trained, levels, data.eval, device=device,
                           scope=config.prune_scope, autocast_dtype=autocast_dtype, on_pruned=save_if_target,
                           recalibration=data.recalibration, criterion=config.prune_criterion)
    curve = [place.reduce_metrics(row, data.eval, device) for row in curve]
    final = progress.history[-1]
    unpruned = {key: final[key] for key in final if key.endswith(("_loss", "_accuracy"))}
    if data.recalibration is not None:  # the same recalibration on the unpruned model, for comparison
        recalibrate_batchnorm_(trained, data.recalibration, device=device, autocast_dtype=autocast_dtype)
        unpruned.update(place.reduce_metrics(evaluate_splits(trained, data.eval, device=device,
                                                             autocast_dtype=autocast_dtype, suffix=RECALIBRATED),
                                             data.eval, device))
    if not place.is_main:
        return None
    save_json({"method": config.method, "model": config.model, "data": config.data, "scope": config.prune_scope,
               "criterion": config.prune_criterion, "bn_recalibration_batches": config.bn_recalibration,
               "unpruned": unpruned, "levels": curve}, out / ONE_SHOT_JSON)
    title = f"{config.method} / {config.model} / {config.data}"
    plot_one_shot({config.method: curve}, out / ONE_SHOT_PNG, dense_accuracy=final["test_accuracy"], title=title)
    plot_training_curves(progress.history, out / CURVES_PNG, title=title)
    plot_layer_density({level: result["layers"] for level, result in pruned_results.items()},
                       out / LAYER_DENSITY_PNG, title=f"{title}: density per layer after pruning")
    pruned = [{**row, **pruned_results[row["target_sparsity"]]} for row in curve
              if row["target_sparsity"] in pruned_results]
    for row in pruned:
        log.info("pruned to %.2f%% sparsity: %s", 100 * row["sparsity"], "  ".join(
            f"{split} acc {row[f'{split}_accuracy']:.2%}" + (
                f" ({row[f'{split}_accuracy{RECALIBRATED}']:.2%} after BN recalibration)"
                if f"{split}_accuracy{RECALIBRATED}" in row else "") for split in data.eval))
    summary = {
        "config": config.to_json(),
        "versions": versions(),
        "device": device_info(device),
        "world_size": place.world_size,
        "epochs": final["epoch"],
        "times": {"train_seconds": progress.train_seconds, "eval_seconds": progress.eval_seconds,
                  "seconds_per_epoch": progress.train_seconds / len(progress.history),
                  "finish_seconds": time.perf_counter() - began,
                  "this_invocation_seconds": time.perf_counter() - started},
        "final": {**unpruned, **{key: final[key] for key in ("density", "effective_density",
                                                             "regularisation_integral") if key in final}},
        "bn_recalibration_batches": config.bn_recalibration,
        "target": target_reached(config, final),
        # the diverged epochs retried from the last checkpoint with a lower learning rate (pilot.train.loop)
        "recoveries": progress.recoveries,
        "pruned": pruned,
        "one_shot": curve,
    }
    save_json(summary, out / SUMMARY)
    log.info("done: %s", out)
    return summary


# "Reached S" per method: the factorised methods leave no exact zeros, so their effective density (the density
# their magnitudes have, pilot.schedule.effective_density) must be at most this many times 1 - S, and what one-shot
# pruning to S costs is reported beside it; the others' exact zeros must reach S up to this tolerance.
EFFECTIVE_DENSITY_SLACK = 1.25
EXACT_SPARSITY_TOLERANCE = 0.005


def target_reached(config: Config, final: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Whether the run reached its --target-sparsity by its method's measure (None without a target)."""
    if config.target_sparsity is None:
        return None
    target = config.target_sparsity
    if config.method in ("pilot", "spred"):
        measured, bound = final["effective_density"], EFFECTIVE_DENSITY_SLACK * (1.0 - target)
        return {"sparsity": target, "measure": "effective_density", "value": measured, "bound": bound,
                "reached": measured <= bound}
    measured = 1.0 - final["density"]
    return {"sparsity": target, "measure": "exact_sparsity", "value": measured,
            "bound": target - EXACT_SPARSITY_TOLERANCE, "reached": measured >= target - EXACT_SPARSITY_TOLERANCE}


def versions() -> dict[str, Optional[str]]:
    """Versions of Python and the packages a run depends on, and the git commit of pilot if it is a checkout, as
    they were at this process's first call (the command logs them when it starts): the code that ran, even if the
    checkout moves on while the run trains."""
    return dict(_versions_at_first_call())


@functools.lru_cache(maxsize=None)
def _versions_at_first_call() -> dict[str, Optional[str]]:
    found: dict[str, Optional[str]] = {"python": platform.python_version(), "pilot": pilot.__version__}
    for package in ("torch", "triton", "torchvision", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["git_commit"] = _git_commit(Path(pilot.__file__).parent)
    return found


def _git_commit(directory: Path) -> Optional[str]:
    """HEAD's hash, suffixed with "+dirty" when tracked files differ from it; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads(),
                            "subnormals_flushed": subnormals_flushed()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = platform.processor() or platform.machine()
    return info
