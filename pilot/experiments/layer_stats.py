"""Per-layer statistics of a trained ``python -m pilot.train`` run: where the weights are and why pruning hurts.

``python -m pilot.experiments.layer_stats RUN_DIR [--sparsity 0.95]`` prints one markdown row per prunable layer:

- ``numel``, ``rms``: size and root-mean-square of the weight x.
- ``eff. density``: :func:`pilot.schedule.effective_density` of the layer (1 for Gaussian weights, p when the mass
  sits on a fraction p of them).
- ``bn fold``: median over output channels of |gamma| / sqrt(running var + eps) of the BatchNorm that follows the
  layer: how much inference rescales it. Layers that shrank (free under BatchNorm) have a large fold.
- ``a median``, ``L1 regime``: for pilot/spred, the imbalance a = m^2 - w^2 of the factors and the fraction of
  entries with 2|x| > a. The factorised step moves x with the effective learning rate sqrt(4x^2 + a^2) * lr: where
  a dominates (a > 2|x|) the implicit bias is L2-like, where 2|x| dominates it is L1-like (pilot-math, the mirror
  flow). Weight decay shrinks a and, under BatchNorm, x at the same rate 2 * alpha, so their ratio need not move.
- ``kept (magnitude)``, ``kept (bn-folded)``: the layer's density after one-shot global pruning to ``--sparsity``
  with either criterion (:func:`pilot.pruning.pruning_scores`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from pilot.factorisation import is_factorised_state
from pilot.models import build_model
from pilot.pruning import batchnorm_after, prunable_parameters, pruning_masks, pruning_scores
from pilot.schedule import effective_density

# (classes, input channels, image size) of each dataset, to rebuild the model of a run.
DATASET_SHAPES = {"fashion-mnist": (10, 1, 28), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32),
                  "imagenet": (1000, 3, 224)}


def layer_rows(run: Path, sparsity: float) -> list[dict[str, object]]:
    """One dict per prunable layer of the run's last checkpoint (see the module doc for the columns)."""
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    if config["method"] == "str":
        raise ValueError("STR runs keep their weights in soft-threshold layers; evaluate their pruned-*.pt instead")
    checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = build_model(config["model"], *DATASET_SHAPES[config["data"]])
    model.load_state_dict(checkpoint["model"])
    params, _ = prunable_parameters(model)
    names = {id(p): name for name, p in model.named_parameters()}
    index = {id(p): i for i, p in enumerate(model.parameters())}
    factors = checkpoint["method"]["optimizer"]["state"]
    folds = batchnorm_after(model)
    kept = {criterion: pruning_masks(pruning_scores(model, criterion), sparsity)
            for criterion in ("magnitude", "bn-folded")}
    rows = []
    for position, p in enumerate(params):
        x = p.detach().float()
        row: dict[str, object] = {"layer": names[id(p)].removesuffix(".weight"), "numel": x.numel(),
                                  "rms": float(x.square().mean().sqrt()), "eff. density": effective_density([x])}
        norm = folds.get(names[id(p)])
        row["bn fold"] = None if norm is None else float(
            (norm.weight.detach().abs() * torch.rsqrt(norm.running_var + norm.eps)).median())
        state = factors.get(index[id(p)], {})
        if is_factorised_state(state):
            imbalance = state["m"].float().square() - state["w"].float().square()
            row["a median"] = float(imbalance.median())
            row["L1 regime"] = float((2 * x.abs() > imbalance.abs()).float().mean())
        for criterion, masks in kept.items():
            row[f"kept ({criterion})"] = float(masks[position].float().mean())
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot.experiments.layer_stats", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="run directory of python -m pilot.train (with checkpoint.pt)")
    parser.add_argument("--sparsity", type=float, default=0.95, help="global one-shot sparsity of the kept columns")
    args = parser.parse_args(argv)
    print(markdown(layer_rows(args.run, args.sparsity)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
