"""Markdown tables of finished ``python -m pilot.train`` runs, for docs/results.md.

``python -m pilot.experiments.results_table RUN_DIR [RUN_DIR ...] [--split val] [--select]`` prints one row per run:
the method and the settings that distinguish it, the accuracy of ``--split`` unpruned and after one-shot pruning
to each target sparsity (raw / after BatchNorm recalibration where the run has it), the effective regularisation
integral I = sum over steps of lr x strength / (1 - momentum), the effective density of the trained weights, and
the layers that pruning to the highest target empties completely (layer collapse).

Why divide by 1 - momentum: heavy-ball SGD moves, over more than 1 / (1 - momentum) steps, like plain SGD with the
learning rate lr / (1 - momentum), weight decay included. So a weight decay alpha on the factors shrinks them by
about exp(-I), and PILoT's imbalance a_t = beta * exp(-2 I): I is the clock of the implicit bias (10x the plain sum
of lr * alpha at momentum 0.9). LASSO's soft-thresholding acts after the momentum step, on the weights
themselves, so momentum does not carry it: its I is the plain sum of lr * lambda. I compares configurations of
one method; across methods the strengths measure different things.

With ``--select``, the rows are sorted per method by the selection score, the mean ``--split`` accuracy over the
target sparsities (recalibrated where available), and the best configuration of each method is marked. Select on
the validation split (runs trained with --val-fraction); the test columns are for transparency only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from pilot.evaluate import RECALIBRATED
from pilot.train.config import Config

# The settings shown for each method (those a sweep varies).
# Methods whose regularisation is applied outside the momentum buffer (ProxSGD's proximal map).
OUTSIDE_MOMENTUM = frozenset({"lasso"})
# Unset ones (None: an untargeted run's target, a targeted run's fixed strength) are left out.
SETTINGS = {"pilot": ("target_sparsity", "alpha", "beta", "alpha_schedule", "factor", "sparsity_signal", "threshold",
                      "alpha_update"),
            "spred": ("target_sparsity", "alpha", "alpha_schedule"), "lasso": ("target_sparsity", "lasso_lambda"),
            "str": ("target_sparsity", "str_weight_decay", "str_init"), "dense": ("weight_decay",),
            "gmp": ("target_sparsity",)}


def run_row(run: Path, split: str) -> dict[str, Any]:
    """The numbers of one finished run (see the module doc)."""
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    config = Config.from_json(summary["config"]).to_json()  # in today's keys, whichever version wrote it
    row: dict[str, Any] = {"run": run.name, "method": config["method"],
                           "settings": ", ".join(f"{key} {config[key]:g}" if isinstance(config[key], float)
                                                 else f"{key} {config[key]}" for key in SETTINGS[config["method"]]
                                                 if config[key] is not None),
                           "epochs": summary["epochs"], "seed": config["seed"]}
    final = summary["final"]
    row["unpruned"] = (final[f"{split}_accuracy"], final.get(f"{split}_accuracy{RECALIBRATED}"))
    row["levels"] = {pruned["target_sparsity"]: (pruned[f"{split}_accuracy"],
                                                 pruned.get(f"{split}_accuracy{RECALIBRATED}"))
                     for pruned in summary["pruned"]}
    integral = final.get("regularisation_integral")
    carried = 1.0 if config["method"] in OUTSIDE_MOMENTUM else 1.0 - config["momentum"]
    row["integral"] = None if integral is None else integral / carried
    row["effective_density"] = final.get("effective_density")
    highest = max(summary["pruned"], key=lambda pruned: pruned["target_sparsity"])
    row["collapsed"] = [layer["name"].removesuffix(".weight") for layer in highest["layers"]
                        if layer["zeros"] == layer["total"]]
    scores = [accuracy if recalibrated is None else recalibrated for accuracy, recalibrated in row["levels"].values()]
    row["score"] = sum(scores) / len(scores)
    return row


def _pair(pair: tuple[float, Optional[float]]) -> str:
    raw, recalibrated = pair
    return f"{100 * raw:.2f}" if recalibrated is None else f"{100 * raw:.2f} / {100 * recalibrated:.2f}"


def markdown(rows: list[dict[str, Any]], split: str, select: bool) -> str:
    levels = sorted({level for row in rows for level in row["levels"]})
    if select:
        rows = sorted(rows, key=lambda row: (row["method"], -row["score"]))
    header = ["method", "settings", "epochs", "seed", f"{split} unpruned"] + [f"{100 * s:g}%" for s in levels] + [
        "mean", "I", "eff. density", f"empty at {100 * levels[-1]:g}%", "run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {}
    for row in rows:
        best.setdefault(row["method"], row["run"])
        mark = "**" if select and best[row["method"]] == row["run"] else ""
        cells = [row["method"], row["settings"], str(row["epochs"]), str(row["seed"]), _pair(row["unpruned"])]
        cells += [_pair(row["levels"][level]) if level in row["levels"] else "-" for level in levels]
        cells += [f"{mark}{100 * row['score']:.2f}{mark}",
                  "-" if row["integral"] is None else f"{row['integral']:.3g}",
                  "-" if row["effective_density"] is None else f"{row['effective_density']:.3f}",
                  ", ".join(row["collapsed"]) or "none", row["run"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot.experiments.results_table",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run directories (with summary.json)")
    parser.add_argument("--split", default="test", help="the split whose accuracies are shown (val or test)")
    parser.add_argument("--select", action="store_true", help="sort per method by the selection score, mark the best")
    args = parser.parse_args(argv)
    missing = [run for run in args.runs if not (run / "summary.json").is_file()]
    if missing:
        parser.error(f"not finished (no summary.json): {', '.join(map(str, missing))}")
    print(markdown([run_row(run, args.split) for run in args.runs], args.split, args.select))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
