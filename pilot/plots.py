"""PNG plots of a training run: the curves per epoch, the one-shot pruning curve and the per-layer density.

``python -m pilot.plots OUT.png RUN_DIR [RUN_DIR ...]`` draws the one-shot curves of several runs together.

Uses matplotlib's non-interactive Agg backend, so plotting works on headless machines and never opens a window.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from .atomic import atomic_write

__all__ = ["plot_training_curves", "plot_one_shot", "plot_layer_density"]

# Sparsity ticks of the one-shot plot (those inside the plotted range are shown).
_SPARSITY_TICKS = (0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)


def _save(figure: plt.Figure, path: Path) -> None:
    try:
        atomic_write(path, lambda file: figure.savefig(file, dpi=120, format="png"), binary=True)
    finally:
        plt.close(figure)


def _series(history: Sequence[Mapping[str, object]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of the records that hold a number under ``key``."""
    points = [(int(row["epoch"]), float(row[key])) for row in history if isinstance(row.get(key), (int, float))]
    return [epoch for epoch, _ in points], [value for _, value in points]


def plot_training_curves(history: Sequence[Mapping[str, object]], path: Path, *, title: str = "") -> None:
    """Loss, accuracy, density (with the relative L1 norm and the effective density where recorded) and alpha per
    epoch, one panel each, from the records of metrics.jsonl.

    Panels whose metrics are absent from every record (alpha of a dense run) say so instead of staying blank.
    """
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    splits = ("train", "val", "test")
    panels = (  # axis, y label, ((record key, legend label), ...), log scale, fractions shown in percent
        (axes[0, 0], "loss", tuple((f"{s}_loss", s) for s in splits), False, False),
        (axes[0, 1], "accuracy", tuple((f"{s}_accuracy", s) for s in splits), False, True),
        # pilot/spred weights shrink towards zero without reaching it: their L1 norm shows the sparsification.
        (axes[1, 0], "prunable weights", (("density", "density (non-zeros)"), ("l1_relative", "L1 norm / initial"),
                                          ("effective_density", "effective density")), False, True),
        (axes[1, 1], "alpha", (("alpha", None),), True, False),
    )
    for axis, label, series, log_scale, percent in panels:
        values_plotted: list[float] = []
        for key, legend in series:
            epochs, values = _series(history, key)
            if epochs:
                axis.plot(epochs, values, marker="o", markersize=3, label=legend)
                values_plotted += values
        if not values_plotted:
            axis.text(0.5, 0.5, f"no {label} recorded", ha="center", va="center", transform=axis.transAxes)
        elif log_scale and min(values_plotted) > 0:
            axis.set_yscale("log")
        if any(legend for _, legend in series) and values_plotted:
            axis.legend()
        if percent:
            axis.yaxis.set_major_formatter(PercentFormatter(1.0))
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1, 0].set_ylim(0.0, 1.05)  # fractions of the prunable weights
    axes[1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # the x axis is shared
    for axis in axes[1]:
        axis.set_xlabel("epoch")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_one_shot(curves: Mapping[str, Sequence[Mapping[str, float]]], path: Path, *, split: str = "test",
                  dense_accuracy: Optional[float] = None, title: str = "") -> None:
    """Accuracy after one-shot pruning against sparsity, one line per entry of ``curves`` ({label: rows}).

    Rows are those of :func:`pilot.evaluate.one_shot_curve`. The x axis is -log10(1 - sparsity), so that
    90%, 99% and 99.9% are evenly spaced, labelled with the sparsity in percent.
    """
    figure, axis = plt.subplots(figsize=(7, 4.5))
    plotted: list[float] = []
    for label, rows in curves.items():
        xs = [row["sparsity"] for row in rows]
        ys = [100.0 * row[f"{split}_accuracy"] for row in rows]
        axis.plot([_sparsity_axis(x) for x in xs], ys, marker="o", markersize=4, label=label)
        plotted += xs
    if dense_accuracy is not None:
        axis.axhline(100.0 * dense_accuracy, color="grey", linestyle="--", linewidth=1, label="unpruned")
    if plotted:
        shown = [t for t in _SPARSITY_TICKS if min(plotted) - 1e-3 <= t <= max(plotted) + 1e-3]
        axis.set_xticks([_sparsity_axis(t) for t in shown], [f"{100 * t:g}" for t in shown])
    axis.set_xlabel("sparsity (%)")
    axis.set_ylabel(f"{split} accuracy after one-shot pruning (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    if title:
        axis.set_title(title)
    figure.tight_layout()
    _save(figure, path)


# Where a layer with no weight left is drawn on the log axis of plot_layer_density.
_COLLAPSED = 1e-4


def plot_layer_density(layers_by_level: Mapping[float, Sequence[Mapping[str, object]]], path: Path, *,
                       title: str = "") -> None:
    """Density (fraction of weights kept) of each prunable layer after one-shot pruning, one line per sparsity.

    ``layers_by_level`` maps a target sparsity to its layers in model order, each ``{"name", "zeros", "total"}``
    (the per-layer rows of summary.json). The y axis is logarithmic; a layer with no weight left (layer collapse,
    which cuts the network) is drawn at the bottom with a red cross, so it is visible at a glance.
    """
    figure, axis = plt.subplots(figsize=(max(7.0, 0.35 * max((len(v) for v in layers_by_level.values()),
                                                               default=0)), 4.8))
    names: list[str] = []
    for level, layers in sorted(layers_by_level.items()):
        names = [str(layer["name"]).removesuffix(".weight") for layer in layers]
        densities = [1.0 - int(layer["zeros"]) / int(layer["total"]) for layer in layers]
        xs = range(len(densities))
        axis.plot(xs, [max(d, _COLLAPSED) for d in densities], marker="o", markersize=3,
                  label=f"{100 * level:g}% sparsity")
        collapsed = [x for x, d in zip(xs, densities) if d == 0.0]
        axis.plot(collapsed, [_COLLAPSED] * len(collapsed), "x", color="red", markersize=9, markeredgewidth=2,
                  label="no weight left" if collapsed and "no weight left" not in
                  [line.get_label() for line in axis.lines] else None)
    axis.set_yscale("log")
    axis.set_ylim(_COLLAPSED / 2, 1.5)
    # "%g" keeps the decades below 1% readable (PercentFormatter would round 0.1% and 0.01% to "0%").
    axis.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{100 * y:g}%"))
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axis.set_ylabel("density of the layer after pruning")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    _save(figure, path)


def _sparsity_axis(sparsity: float) -> float:
    return -math.log10(max(1.0 - sparsity, 1e-12))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pilot.plots OUT.png RUN_DIR [RUN_DIR ...]``: the one-shot curves of several runs in one plot."""
    parser = argparse.ArgumentParser(prog="python -m pilot.plots",
                                     description="Plot the one-shot pruning curves (one_shot.json) of several "
                                                 "pilot.train runs together.")
    parser.add_argument("output", type=Path, help="PNG file to write")
    parser.add_argument("runs", type=Path, nargs="+", help="run directories of python -m pilot.train")
    parser.add_argument("--split", default="test", help="which split's accuracy to plot (test or val)")
    parser.add_argument("--title", default="", help="plot title")
    args = parser.parse_args(argv)
    curves = {}
    for run in args.runs:
        path = run / "one_shot.json"
        if not path.is_file():
            parser.error(f"{path} does not exist (is {run} a finished pilot.train run?)")
        data = json.loads(path.read_text(encoding="utf-8"))
        if f"{args.split}_accuracy" not in data["levels"][0]:
            parser.error(f"{path} has no {args.split} accuracy (runs without --val-fraction only have test)")
        curves[f"{data['method']} ({run.name})"] = data["levels"]
    plot_one_shot(curves, args.output, split=args.split, title=args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
