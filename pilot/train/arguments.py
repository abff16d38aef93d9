"""The command line of ``python -m pilot.train``: its options, their argument types and their --help. The options
whose default depends on the dataset (and the method) have none here: each dataset's recipe
(:mod:`.recipe_files`) holds it, and --help shows it."""
from __future__ import annotations

import argparse
import math
from typing import Any, Union

import torch

from pilot.data import DATASET_NAMES
from pilot.iterative import REWIND_MODES
from pilot.models import MODEL_NAMES
from pilot.optim import BACKENDS
from pilot.pruning import CRITERIA, SCOPES
from pilot.schedule import SIGNALS

from .method_settings import METHODS, methods_of
from .recipe_files import RECIPES, recipe_names

LR_SCHEDULES = ("cosine", "step", "constant")
ALPHA_UPDATES = ("epoch", "step")
# pilot/spred: how alpha moves (the ablations cross them with the inits): Algorithm 1 (pilot's) or held constant
# (spred's); with --target-sparsity, Algorithm 1's accuracy rule and release, or alpha held on the plan.
ALPHA_SCHEDULES = ("algorithm1", "constant")
CONV_INITS = ("fan-out", "fan-in")
TARGET_OFF = "off"  # --target-sparsity off: the fixed strengths (and Algorithm 1's threshold), no target
# Iterative pruning's defaults; no recipe holds them, since it runs only where --cycles is given.
ITERATIVE_DEFAULTS = {"prune_rate": 0.2, "rewind": "lrr", "rewind_epoch": 1}


def _number(kind: type, *, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """argparse type: a ``kind`` in [low, high] (open ends where asked), with a message saying the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            span = f">{'' if low_open else '='} {low:g}" if math.isinf(high) else f"in {left}{low:g}, {high:g}{right}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


_positive_int = _number(int, low=1)
_non_negative_int = _number(int, low=0)
_non_negative = _number(float, low=0.0)
_positive = _number(float, low=0.0, low_open=True)
_fraction_open = _number(float, low=0.0, high=1.0, low_open=True, high_open=True)
_momentum = _number(float, low=0.0, high=1.0, high_open=True)
_val_fraction = _number(float, low=0.0, high=1.0, high_open=True)
_factor = _number(float, low=1.0)


def _target(text: str) -> Union[float, str]:
    """argparse type of --target-sparsity: a sparsity in (0, 1), or "off"."""
    return TARGET_OFF if text == TARGET_OFF else _fraction_open(text)


_target.__name__ = "target sparsity"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where there is a default worth reading and the help does not give it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, True) or "default" in text:
            return text
        return super()._get_help_string(action)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(_shown, value))
    return f"{value:g}" if isinstance(value, float) else f"{value}"


def _per_dataset(key: str) -> str:
    """The recipes' values of ``key`` (a recipe key) for --help: one if all agree, else each dataset's (and where
    the methods differ, each method's); datasets whose recipe does not state it are left out."""
    datasets_by_text: dict[str, list[str]] = {}
    for data, recipe in RECIPES.items():
        methods_by_value: dict[str, list[str]] = {}
        for method in methods_of(key.replace("-", "_")):
            value = recipe.value(key, method)
            if value is not None:
                methods_by_value.setdefault(_shown(value), []).append(method)
        if methods_by_value:
            text = next(iter(methods_by_value)) if len(methods_by_value) == 1 else ", ".join(
                f"{shown} ({'/'.join(methods)})" for shown, methods in methods_by_value.items())
            datasets_by_text.setdefault(text, []).append(data)
    if len(datasets_by_text) == 1 and len(next(iter(datasets_by_text.values()))) == len(RECIPES):
        return next(iter(datasets_by_text))
    return "; ".join(f"{text} for {'/'.join(datasets)}" for text, datasets in datasets_by_text.items())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pilot.train",
        usage="%(prog)s [--method M] [--model NAME] [--data NAME] [--data-root PATH] [options]",
        description="Train a sparse network with PILoT (or a baseline), prune it and evaluate it. "
                    "With no arguments: PILoT on Fashion-MNIST with LeNet-300-100, 10 epochs on the CPU in minutes. "
                    "Defaults given per dataset come from its recipe, pilot/train/recipes/DATA.toml, which states "
                    "every value --data DATA trains with.",
        epilog="Outputs in --out: config.json, metrics.jsonl (one record per epoch), checkpoint.pt (every epoch; "
               "with --fsdp the directory checkpoint.dcp), "
               "train.log, curves.png, one_shot.json / one_shot.png (accuracy after one-shot magnitude pruning at "
               "1 - 0.8^k and at --sparsity), layer_density.png (density of each layer at each --sparsity), "
               "pruned-<sparsity>.pt (state_dict with exact zeros + masks), summary.json. --resume of a finished run "
               "evaluates it again (with new --sparsity, --prune-scope or --bn-recalibration if given).",
        formatter_class=_HelpFormatter,
    )
    what = parser.add_argument_group("method, data and model")
    what.add_argument("--method", choices=METHODS, default="pilot",
                      help="pilot: FusedPILoTSGD (beta > 0) with the dynamic alpha schedule; spred: beta = 0 and "
                           "constant alpha; lasso: proximal SGD with an L1 penalty; str: soft threshold "
                           "reparameterisation; dense: plain SGD (pruned one-shot at the end)")
    what.add_argument("--data", choices=DATASET_NAMES, default="fashion-mnist",
                      help="dataset, and with it the recipe of the values given per dataset below")
    what.add_argument("--data-root", metavar="PATH",
                      help="dataset directory or archive (default: the dataset's built-in locations)")
    what.add_argument("--model", choices=MODEL_NAMES,
                      help="default: " + _per_dataset("model"))
    what.add_argument("--limit", type=_positive_int, metavar="N",
                      help="use a fixed random subset of N examples of each split (quick runs)")
    what.add_argument("--augment", action=argparse.BooleanOptionalAction,
                      help="train with the dataset's random crops and flips; default: " + _per_dataset("augment"))
    what.add_argument("--val-fraction", type=_val_fraction, default=0.0, metavar="F",
                      help="hold out this fraction of the training set (not augmented) as a validation split, "
                           "to select hyper-parameters without looking at the test set")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=_positive_int, metavar="N",
                       help="epochs (of each cycle with --cycles); default: " + _per_dataset("epochs"))
    optim.add_argument("--batch-size", type=_positive_int, metavar="N",
                       help="training batch size (under torchrun the global batch); default: "
                            + _per_dataset("batch-size"))
    optim.add_argument("--lr", type=_positive, help="peak learning rate; default: " + _per_dataset("lr"))
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                       help="cosine: to 0 at the last epoch; step: multiply by --gamma at each milestone; default: "
                            + _per_dataset("lr-schedule"))
    optim.add_argument("--warmup-epochs", type=_non_negative_int, metavar="N",
                       help="ramp the learning rate up linearly over this many epochs first; default: "
                            + _per_dataset("warmup-epochs"))
    recipe_milestones = _per_dataset("milestones")  # the recipes that state them
    optim.add_argument("--milestones", type=_positive_int, nargs="+", metavar="EPOCH",
                       help="epochs after which --lr-schedule step decays; default: "
                            + (f"{recipe_milestones}, else " if recipe_milestones else "")
                            + "50%% and 75%% of --epochs")
    optim.add_argument("--gamma", type=_fraction_open,
                       help="decay of the step schedule; default: " + _per_dataset("gamma"))
    optim.add_argument("--momentum", type=_momentum, help="SGD momentum; default: " + _per_dataset("momentum"))
    optim.add_argument("--nesterov", action=argparse.BooleanOptionalAction,
                       help="Nesterov momentum; default: " + _per_dataset("nesterov"))
    optim.add_argument("--weight-decay", type=_non_negative, metavar="WD",
                       help="L2 weight decay (for pilot/spred: on the parameters that are not factorised); default: "
                            + _per_dataset("weight-decay"))
    optim.add_argument("--label-smoothing", type=_number(float, low=0.0, high=1.0, high_open=True), metavar="EPS",
                       help="label smoothing of the training loss (evaluation losses are plain); default: "
                            + _per_dataset("label-smoothing"))
    optim.add_argument("--conv-init", choices=CONV_INITS,
                       help="Kaiming-normal init of the convolutions with fan-out (torchvision's) or fan-in "
                            "(STR's ImageNet setup); default: " + _per_dataset("conv-init"))

    reg = parser.add_argument_group("sparsifying regularisation")
    reg.add_argument("--target-sparsity", type=_target, metavar="S|off",
                     help="train to this sparsity at any --epochs: every method follows one planned course of the "
                          "density, 1 for the first 10%% of training, cubic down to 1 - S at 70%% "
                          "(pilot.schedule.SparsityCourse); pilot/spred/lasso/str steer their strength (alpha, "
                          "--lasso-lambda, --str-weight-decay, which then only set where it starts) so that their "
                          "density follows it, gmp prunes along it; off: the fixed strengths and Algorithm 1's "
                          "threshold of the earlier recipes; default: " + _per_dataset("target-sparsity"))
    reg.add_argument("--alpha-schedule", choices=ALPHA_SCHEDULES,
                     help="pilot/spred: algorithm1 (pilot's default: the accuracy rule, and with --target-sparsity "
                          "the release of alpha once the target is reached) or constant (spred's default: alpha held, "
                          "with --target-sparsity on the plan); pilot with constant and spred with algorithm1 are the "
                          "paper's ablations of the init against the schedule")
    reg.add_argument("--alpha", type=_non_negative,
                     help="pilot/spred: initial weight decay on the factors m, w; default: " + _per_dataset("alpha"))
    reg.add_argument("--beta", type=_positive,
                     help="pilot: initial imbalance m^2 - w^2 of the factors (spred is beta = 0); default: "
                          + _per_dataset("beta"))
    reg.add_argument("--factor", type=_factor,
                     help="pilot: alpha is multiplied or divided by this at each update (after each epoch, or "
                          "each optimizer step with --alpha-update step: then use a factor close to 1); "
                          "default: " + _per_dataset("factor"))
    reg.add_argument("--alpha-update", choices=ALPHA_UPDATES,
                     help="pilot: apply Algorithm 1 after each epoch with the epoch's training accuracy (the "
                          "paper's Algorithm 1), or after each optimizer step with a running training accuracy "
                          "(the paper's prose; see --accuracy-window); default: " + _per_dataset("alpha-update"))
    reg.add_argument("--accuracy-window", type=_positive_int, metavar="STEPS",
                     help="pilot with --alpha-update step: the running training accuracy is an exponential "
                          "average over about this many steps (default: one epoch's steps)")
    reg.add_argument("--sparsity-signal", choices=SIGNALS,
                     help="pilot: the sparsity signal of Algorithm 1's threshold. l1: the L1 norm of the "
                          "factorised weights (the paper's; under BatchNorm it also falls when layers merely "
                          "shrink); effective-density: per-layer (pi/2)*|x|_1^2/(n*|x|_2^2), size-weighted, 1 for "
                          "Gaussian weights and p when the mass sits on a fraction p of them (scale-invariant); "
                          "default: " + _per_dataset("sparsity-signal"))
    reg.add_argument("--threshold", type=_non_negative, metavar="K",
                     help="pilot: alpha only grows while the signal is at least K; for l1 a fraction of its value "
                          "at initialisation (see --threshold-absolute), for effective-density a density; "
                          "default: " + _per_dataset("threshold"))
    reg.add_argument("--threshold-absolute", action="store_true",
                     help="read --threshold as an absolute value of the signal, not a fraction of its initial one "
                          "(effective-density thresholds are always absolute)")
    reg.add_argument("--lasso-lambda", type=_positive, metavar="LAMBDA",
                     help="lasso: strength of the L1 penalty; default: " + _per_dataset("lasso-lambda"))
    reg.add_argument("--str-init", type=_number(float, low=-math.inf), metavar="S",
                     help="str: initial logit s of every layer's threshold sigmoid(s); default: "
                          + _per_dataset("str-init"))
    reg.add_argument("--str-weight-decay", type=_non_negative, metavar="WD",
                     help="str: weight decay on the threshold logits s, which raises the thresholds; default: "
                          + _per_dataset("str-weight-decay"))

    prune = parser.add_argument_group("pruning")
    prune.add_argument("--sparsity", type=_fraction_open, nargs="+", metavar="S",
                       help="target sparsities of the final one-shot pruning (a pruned model is saved for each; the "
                            "--target-sparsity is always among them); default: " + _per_dataset("sparsity"))
    prune.add_argument("--curve", action=argparse.BooleanOptionalAction, default=True,
                       help="evaluate the one-shot curve at 1 - 0.8^k too, not only at --sparsity (--no-curve "
                            "makes the end of a hyper-parameter sweep run several times faster)")
    prune.add_argument("--prune-scope", choices=SCOPES, default="global",
                       help="rank magnitudes across all prunable layers or within each layer")
    prune.add_argument("--prune-criterion", choices=CRITERIA, default="magnitude",
                       help="what the final pruning ranks: magnitude |x| (the paper's protocol) or bn-folded, "
                            "|x| times the following BatchNorm's |gamma| / sqrt(running var + eps) per output "
                            "channel, which no per-layer rescaling changes (see pilot.pruning.pruning_scores)")
    prune.add_argument("--bn-recalibration", type=_non_negative_int, metavar="BATCHES",
                       help="after pruning, re-estimate the BatchNorm statistics on this many batches of the "
                            "training set, augmented as in training (the same batches for every level and method; "
                            "only BatchNorm buffers change) and report the accuracy with and without; 0 = off; "
                            "default: " + _per_dataset("bn-recalibration"))
    prune.add_argument("--cycles", type=_non_negative_int, default=0, metavar="N",
                       help="iterative pruning: after the first training, this many cycles of prune "
                            "--prune-rate of the remaining weights, rewind and train again")
    prune.add_argument("--prune-rate", type=_fraction_open, metavar="R",
                       help="fraction of the remaining weights pruned per cycle "
                            f"(default {ITERATIVE_DEFAULTS['prune_rate']})")
    prune.add_argument("--rewind", choices=REWIND_MODES,
                       help="after each pruning, wr: reset the weights to their state after --rewind-epoch epochs "
                            "of the first training and restart the schedules; lrr: keep the weights and restart "
                            f"only the learning-rate (and alpha) schedule (default {ITERATIVE_DEFAULTS['rewind']})")
    prune.add_argument("--rewind-epoch", type=_non_negative_int, metavar="N",
                       help="wr: epoch whose weights are rewound to, 0 = initialisation "
                            f"(default {ITERATIVE_DEFAULTS['rewind_epoch']})")

    run = parser.add_argument_group("run")
    run.add_argument("--recipe", metavar="NAME_OR_PATH",
                     help="a dataset's recipe by name, the same as --data with it (one of "
                          f"{', '.join(recipe_names())}), or a TOML file of flag values of your own, read before the "
                          "command line's flags (which override them)")
    run.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the init, shuffling and augmentation")
    run.add_argument("--device", default=default_device(),
                     help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    run.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                     help="under torchrun (CUDA): BatchNorm statistics over the global batch (SyncBatchNorm), not "
                          "each process's part of it")
    run.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False,
                     help="under torchrun: shard the parameters, gradients and optimizer state over the processes "
                          "with FSDP2 (fully_shard), for models whose training state does not fit one device, "
                          "instead of replicating them with DDP; checkpoints are torch.distributed.checkpoint "
                          "directories")
    run.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                     help="bf16 autocast for forward and backward (CUDA only); default: " + _per_dataset("bf16"))
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                     help="channels_last memory format for the model and its inputs (on CUDA, faster "
                          "convolutions under bf16); default: " + _per_dataset("channels-last"))
    run.add_argument("--compile-model", action=argparse.BooleanOptionalAction, default=False,
                     help="torch.compile the model's training forward and backward (evaluation stays eager); on a "
                          "CPU ResNet-20 trains about 1.5x faster after a compilation of about 20 s")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="FusedPILoTSGD backend (pilot/spred): auto = Triton on CUDA, torch.compile on CPU")
    run.add_argument("--workers", type=_non_negative_int, metavar="N",
                     help="DataLoader worker processes of each process (default: 0 on CPU, on CUDA min(8, the "
                          "CPUs per process of the node); memory is pinned on CUDA)")
    run.add_argument("--out", metavar="DIR", help="run directory (default: runs/<method>-<model>-<data>-seed<seed>)")
    existing = run.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="replace the run in --out, if any")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser
