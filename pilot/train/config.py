"""The command line of ``python -m pilot.train`` and the run configuration it resolves to."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from pilot.data import DATASET_NAMES
from pilot.iterative import REWIND_MODES
from pilot.models import MODEL_NAMES
from pilot.optim import BACKENDS
from pilot.pruning import CRITERIA, SCOPES
from pilot.schedule import SIGNALS

from . import distributed
from .recipe_files import read_recipe, recipe_arguments, recipe_names

METHODS = ("dense", "pilot", "spred", "lasso", "str", "gmp")
LR_SCHEDULES = ("cosine", "step", "constant")
ALPHA_UPDATES = ("epoch", "step")
# pilot/spred: how alpha moves (the ablations cross them with the inits): Algorithm 1 (pilot's) or held constant
# (spred's); with --target-sparsity, Algorithm 1's accuracy rule and release, or alpha held on the plan.
ALPHA_SCHEDULES = ("algorithm1", "constant")
FACTORISED = ("pilot", "spred")  # the methods that train with FusedPILoTSGD
# The setting that holds each steered method's strength (--target-sparsity starts it from the recipe's integral).
STRENGTH_SETTINGS = {"pilot": "alpha", "spred": "alpha", "lasso": "lasso_lambda", "str": "str_weight_decay"}

# The model each dataset is trained with when --model is not given (the paper's choice where it has one).
DEFAULT_MODELS = {"fashion-mnist": "lenet300-100", "cifar10": "resnet20", "cifar100": "resnet18-cifar",
                  "imagenet": "resnet50"}
# The recipe of each dataset: the defaults of the flags that depend on it. A value is either every method's or a
# dict keyed by method (a method the dict leaves out gets None: the setting does not apply to it). Both recipes were
# selected on a 10% validation split by the mean accuracy after one-shot pruning (docs/results.md gives each row's
# command). Fashion-MNIST: LeNet-300-100, 10 epochs, the learning rate selected per method among 0.1 and 0.3 with
# a one-epoch warmup. CIFAR-10: ResNet-20, 30 epochs on the full training set; the strengths were selected on
# 20,000 images for 15 epochs and divided by the 5.6 times as many steps (what matters is their sum over the steps
# times the learning rate), Algorithm 1's per-epoch factor replaced by its square root (twice the epochs). For
# pilot that left the sum short (Algorithm 1's course depends on the run), so its alpha0 was rescaled once by the
# ratio of the sums, S's over the first 30-epoch run's, which brought it within 20% of S's (docs/results.md).
# With --target-sparsity the strengths only set where the controller starts, and they start where the sum
# over the steps of lr times a constant strength, the regularisation integral, equals strength_integral: each
# method's selected strength times the sum of lr over the steps of the run it was selected for (so a run of any
# length starts where those did; pilot.schedule.SparsityTarget).
RECIPES: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"epochs": 10, "augment": False, "bn_recalibration": 0, "target_sparsity": 0.95,
                      "lr": {"dense": 0.1, "pilot": 0.3, "spred": 0.3, "lasso": 0.1, "str": 0.3, "gmp": 0.1},
                      "warmup_epochs": {"dense": 0, "pilot": 1, "spred": 1, "lasso": 0, "str": 1, "gmp": 0},
                      "alpha": {"pilot": 5e-4, "spred": 6.7e-4}, "factor": 1.00329, "alpha_update": "step",
                      "sparsity_signal": "effective-density", "threshold": 0.1,
                      "lasso_lambda": 3e-3, "str_weight_decay": 2e-2,
                      "strength_integral": {"pilot": 0.18, "spred": 0.24, "lasso": 0.35, "str": 7.1}},
    "cifar10": {"epochs": 30, "augment": True, "bn_recalibration": 20, "lr": 0.1, "warmup_epochs": 1, "target_sparsity": 0.95,
                "alpha": {"pilot": 1.3e-3, "spred": 2.2e-3}, "factor": 1.2247, "alpha_update": "epoch",
                "sparsity_signal": "effective-density", "threshold": 0.3,
                "lasso_lambda": 1.8e-3, "str_weight_decay": 2.1e-3,
                "strength_integral": {"pilot": 0.38, "spred": 0.65, "lasso": 0.53, "str": 0.62}},
}
# Datasets without a validated recipe of their own use CIFAR-10's.
RECIPE_FALLBACK = "cifar10"
DEFAULT_BETA = 1.0
DEFAULT_STR_INIT = -5.0
ITERATIVE_DEFAULTS = {"prune_rate": 0.2, "rewind": "lrr", "rewind_epoch": 1}
# Settings that may differ between a run and its --resume without changing what is computed
# (device and backend can change the last bits of the result, but moving a run to another machine is legitimate).
RUNTIME_KEYS = frozenset({"out", "resume", "overwrite", "device", "backend", "workers", "progress",
                          "channels_last", "compile_model"})
# Settings of the evaluation after training: --resume of a finished run evaluates it again with new ones.
FINISH_KEYS = frozenset({"sparsity", "curve", "prune_scope", "prune_criterion", "bn_recalibration"})
# Keys of configurations written by earlier versions: renamed ones, and new ones with the value they implied.
RENAMED_KEYS = {"l1_threshold": "threshold", "l1_threshold_absolute": "threshold_absolute",
                "signal": "sparsity_signal"}
IMPLIED_KEYS = {"sparsity_signal": lambda saved: "l1" if saved.get("method") == "pilot" else None,
                "alpha_update": lambda saved: "epoch" if saved.get("method") == "pilot" else None,
                "accuracy_window": lambda saved: None, "bn_recalibration": lambda saved: 0,
                "prune_criterion": lambda saved: "magnitude", "curve": lambda saved: True,
                "label_smoothing": lambda saved: 0.0, "conv_init": lambda saved: "fan-out",
                "sync_bn": lambda saved: False, "channels_last": lambda saved: False, "fsdp": lambda saved: False,
                "compile_model": lambda saved: False, "target_sparsity": lambda saved: None,
                "strength_integral": lambda saved: None,
                "alpha_schedule": lambda saved: {"pilot": "algorithm1", "spred": "constant"}.get(saved.get("method"))}
CONV_INITS = ("fan-out", "fan-in")


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run, with every default resolved (see :func:`resolve`); saved as
    config.json in the run directory. Method-specific settings of other methods are None."""

    method: str
    data: str
    data_root: Optional[str]
    model: str
    limit: Optional[int]
    augment: bool
    val_fraction: float
    epochs: int
    batch_size: int
    lr: float
    lr_schedule: str
    warmup_epochs: int
    milestones: tuple[int, ...]
    gamma: float
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    conv_init: str
    target_sparsity: Optional[float]
    alpha: Optional[float]
    strength_integral: Optional[float]
    beta: Optional[float]
    alpha_schedule: Optional[str]
    factor: Optional[float]
    sparsity_signal: Optional[str]
    threshold: Optional[float]
    threshold_absolute: bool
    alpha_update: Optional[str]
    accuracy_window: Optional[int]
    lasso_lambda: Optional[float]
    str_init: Optional[float]
    str_weight_decay: Optional[float]
    sparsity: tuple[float, ...]
    curve: bool
    prune_scope: str
    prune_criterion: str
    bn_recalibration: int
    cycles: int
    prune_rate: float
    rewind: str
    rewind_epoch: int
    seed: int
    device: str
    sync_bn: bool
    fsdp: bool
    bf16: bool
    channels_last: bool
    compile_model: bool
    backend: str
    workers: int
    out: str
    resume: bool
    overwrite: bool
    progress: bool

    def to_json(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Config":
        data = {RENAMED_KEYS.get(key, key): value for key, value in data.items()}
        data.update({key: implied(data) for key, implied in IMPLIED_KEYS.items() if key not in data})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    @classmethod
    def run_defining(cls) -> list[str]:
        """The settings that define what a run trains (all but :data:`RUNTIME_KEYS` and :data:`FINISH_KEYS`)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in RUNTIME_KEYS | FINISH_KEYS]

    def differences(self, other: "Config") -> list[str]:
        """'key: self -> other' for every run-defining setting that differs."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{key}: {mine[key]!r} -> {theirs[key]!r}" for key in self.run_defining() if mine[key] != theirs[key]]


# ---------------------------------------------------------------------------------------------- argument types

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


TARGET_OFF = "off"


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


def recipe(data: str, method: str) -> dict[str, Any]:
    """The defaults of ``data``'s recipe (:data:`RECIPES`) for ``method``: a value given per method is
    ``method``'s, None where the recipe leaves ``method`` out."""
    values = RECIPES.get(data, RECIPES[RECIPE_FALLBACK])
    return {key: value.get(method) if isinstance(value, dict) else value for key, value in values.items()}


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else f"{value}"


def _per_dataset(key: str) -> str:
    """The recipes' defaults of ``key`` for --help: one value if all agree, else each dataset's (and, where the
    methods differ, each method's)."""
    described = []
    for values in RECIPES.values():
        value = values[key]
        if not isinstance(value, dict):
            described.append(_shown(value))
            continue
        methods_by_value: dict[str, list[str]] = {}
        for method, method_value in value.items():
            methods_by_value.setdefault(_shown(method_value), []).append(method)
        described.append(", ".join(f"{shown} ({'/'.join(methods)})" for shown, methods in methods_by_value.items()))
    if len(set(described)) == 1:
        return described[0]
    return "; ".join(f"{text} for {data}" for data, text in zip(RECIPES, described))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pilot.train",
        usage="%(prog)s [--method M] [--model NAME] [--data NAME] [--data-root PATH] [options]",
        description="Train a sparse network with PILoT (or a baseline), prune it and evaluate it. "
                    "With no arguments: PILoT on Fashion-MNIST with LeNet-300-100, 10 epochs on the CPU in minutes.",
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
    what.add_argument("--data", choices=DATASET_NAMES, default="fashion-mnist", help="dataset")
    what.add_argument("--data-root", metavar="PATH",
                      help="dataset directory or archive (default: the dataset's built-in locations)")
    what.add_argument("--model", choices=MODEL_NAMES,
                      help="default: " + ", ".join(f"{m} for {d}" for d, m in DEFAULT_MODELS.items()))
    what.add_argument("--limit", type=_positive_int, metavar="N",
                      help="use a fixed random subset of N examples of each split (quick runs)")
    what.add_argument("--augment", action=argparse.BooleanOptionalAction,
                      help="train with the dataset's random crops and flips (default: "
                           + ", ".join(f"{'on' if r['augment'] else 'off'} for {d}" for d, r in RECIPES.items())
                           + ")")
    what.add_argument("--val-fraction", type=_val_fraction, default=0.0, metavar="F",
                      help="hold out this fraction of the training set (not augmented) as a validation split, "
                           "to select hyper-parameters without looking at the test set")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=_positive_int, metavar="N",
                       help="epochs (of each cycle with --cycles); default: " + _per_dataset("epochs"))
    optim.add_argument("--batch-size", type=_positive_int, default=256, metavar="N", help="training batch size")
    optim.add_argument("--lr", type=_positive, help="peak learning rate; default: " + _per_dataset("lr"))
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                       help="cosine: to 0 at the last epoch; step: multiply by --gamma at each milestone")
    optim.add_argument("--warmup-epochs", type=_non_negative_int, metavar="N",
                       help="ramp the learning rate up linearly over this many epochs first; default: "
                            + _per_dataset("warmup_epochs"))
    optim.add_argument("--milestones", type=_positive_int, nargs="+", metavar="EPOCH",
                       help="epochs after which --lr-schedule step decays (default: 50%% and 75%% of --epochs)")
    optim.add_argument("--gamma", type=_fraction_open, default=0.1, help="decay of the step schedule")
    optim.add_argument("--momentum", type=_momentum, default=0.9, help="SGD momentum")
    optim.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False,
                       help="Nesterov momentum")
    optim.add_argument("--weight-decay", type=_non_negative, default=5e-4, metavar="WD",
                       help="L2 weight decay (for pilot/spred: on the parameters that are not factorised)")
    optim.add_argument("--label-smoothing", type=_number(float, low=0.0, high=1.0, high_open=True), default=0.0,
                       metavar="EPS", help="label smoothing of the training loss (evaluation losses are plain)")
    optim.add_argument("--conv-init", choices=CONV_INITS, default="fan-out",
                       help="Kaiming-normal init of the convolutions with fan-out (torchvision's) or fan-in "
                            "(STR's ImageNet setup)")

    reg = parser.add_argument_group("sparsifying regularisation")
    reg.add_argument("--target-sparsity", type=_target, metavar="S|off",
                     help="train to this sparsity at any --epochs: every method follows one planned course of the "
                          "density, 1 for the first 10%% of training, cubic down to 1 - S at 70%% "
                          "(pilot.schedule.SparsityCourse); pilot/spred/lasso/str steer their strength (alpha, "
                          "--lasso-lambda, --str-weight-decay, which then only set where it starts) so that their "
                          "density follows it, gmp prunes along it; off: the fixed strengths and Algorithm 1's "
                          "threshold of the earlier recipes; default: " + _per_dataset("target_sparsity"))
    reg.add_argument("--alpha-schedule", choices=ALPHA_SCHEDULES,
                     help="pilot/spred: algorithm1 (pilot's default: the accuracy rule, and with --target-sparsity "
                          "the release of alpha once the target is reached) or constant (spred's default: alpha held, "
                          "with --target-sparsity on the plan); pilot with constant and spred with algorithm1 are the "
                          "paper's ablations of the init against the schedule")
    reg.add_argument("--alpha", type=_non_negative,
                     help="pilot/spred: initial weight decay on the factors m, w; default: " + _per_dataset("alpha"))
    reg.add_argument("--beta", type=_positive, help="pilot: initial imbalance m^2 - w^2 of the factors "
                                                    f"(default {DEFAULT_BETA:g}; spred is beta = 0)")
    reg.add_argument("--factor", type=_factor,
                     help="pilot: alpha is multiplied or divided by this at each update (after each epoch, or "
                          "each optimizer step with --alpha-update step: then use a factor close to 1); "
                          "default: " + _per_dataset("factor"))
    reg.add_argument("--alpha-update", choices=ALPHA_UPDATES,
                     help="pilot: apply Algorithm 1 after each epoch with the epoch's training accuracy (the "
                          "paper's Algorithm 1), or after each optimizer step with a running training accuracy "
                          "(the paper's prose; see --accuracy-window); default: " + _per_dataset("alpha_update"))
    reg.add_argument("--accuracy-window", type=_positive_int, metavar="STEPS",
                     help="pilot with --alpha-update step: the running training accuracy is an exponential "
                          "average over about this many steps (default: one epoch's steps)")
    reg.add_argument("--sparsity-signal", choices=SIGNALS,
                     help="pilot: the sparsity signal of Algorithm 1's threshold. l1: the L1 norm of the "
                          "factorised weights (the paper's; under BatchNorm it also falls when layers merely "
                          "shrink); effective-density: per-layer (pi/2)*|x|_1^2/(n*|x|_2^2), size-weighted, 1 for "
                          "Gaussian weights and p when the mass sits on a fraction p of them (scale-invariant); "
                          "default: " + _per_dataset("sparsity_signal"))
    reg.add_argument("--threshold", type=_non_negative, metavar="K",
                     help="pilot: alpha only grows while the signal is at least K; for l1 a fraction of its value "
                          "at initialisation (see --threshold-absolute), for effective-density a density; "
                          "default: " + _per_dataset("threshold"))
    reg.add_argument("--threshold-absolute", action="store_true",
                     help="read --threshold as an absolute value of the signal, not a fraction of its initial one "
                          "(effective-density thresholds are always absolute)")
    reg.add_argument("--lasso-lambda", type=_positive, metavar="LAMBDA",
                     help="lasso: strength of the L1 penalty; default: " + _per_dataset("lasso_lambda"))
    reg.add_argument("--str-init", type=_number(float, low=-math.inf), metavar="S",
                     help="str: initial logit s of every layer's threshold sigmoid(s) "
                          f"(default {DEFAULT_STR_INIT:g})")
    reg.add_argument("--str-weight-decay", type=_non_negative, metavar="WD",
                     help="str: weight decay on the threshold logits s, which raises the thresholds; default: "
                          + _per_dataset("str_weight_decay"))

    prune = parser.add_argument_group("pruning")
    prune.add_argument("--sparsity", type=_fraction_open, nargs="+", default=[0.9, 0.95, 0.98], metavar="S",
                       help="target sparsities of the final one-shot pruning (a pruned model is saved for each)")
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
                            "default: "
                            + _per_dataset("bn_recalibration"))
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
                     help="read the settings of a TOML recipe first (flags given on the command line override "
                          f"them): one of pilot's ({', '.join(recipe_names())}) or a file")
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
    run.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                     help="bf16 autocast for forward and backward (CUDA only)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                     help="channels_last memory format for the model and its inputs (on CUDA, faster "
                          "convolutions under bf16)")
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


def parse_config(argv: Optional[Sequence[str]] = None) -> tuple[Config, frozenset[str]]:
    """Parse the command line into a validated :class:`Config` with every default resolved, and the names of the
    settings given explicitly (``--resume`` compares those with the saved run). With ``--recipe``, the recipe's
    settings come first, so that the command line's flags override them (and they count as explicit)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    given, _ = parser.parse_known_args(argv)  # only --recipe and --method are read here
    if given.recipe is not None:
        try:
            argv = recipe_arguments(read_recipe(given.recipe), parser, given.method, METHODS) + argv
        except ValueError as error:
            parser.error(str(error))
    args = parser.parse_args(argv)
    try:
        config = resolve(args)
    except ValueError as error:
        parser.error(str(error))
    # Parsed again without defaults: what remains was on the command line (or in the recipe).
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return config, frozenset(vars(parser.parse_args(argv))) - {"recipe"}


def resolve(args: argparse.Namespace) -> Config:
    """Fill the method- and dataset-dependent defaults and check the combinations argparse cannot."""
    method = args.method
    defaults = recipe(args.data, method)
    specific = {"--alpha": (args.alpha, FACTORISED), "--beta": (args.beta, ("pilot",)),
                "--alpha-schedule": (args.alpha_schedule, FACTORISED),
                "--factor": (args.factor, FACTORISED), "--sparsity-signal": (args.sparsity_signal, FACTORISED),
                "--threshold": (args.threshold, FACTORISED), "--alpha-update": (args.alpha_update, FACTORISED),
                "--accuracy-window": (args.accuracy_window, FACTORISED),
                "--lasso-lambda": (args.lasso_lambda, ("lasso",)), "--str-init": (args.str_init, ("str",)),
                "--str-weight-decay": (args.str_weight_decay, ("str",))}
    for flag, (value, methods) in specific.items():
        if value is not None and method not in methods:
            raise ValueError(f"{flag} applies to --method {'/'.join(methods)}, not {method}")
    if args.threshold_absolute and args.threshold is None:
        raise ValueError("--threshold-absolute needs --threshold")
    # Given, "off", or the recipe's (which dense, pruned one-shot at the end, does not take).
    target = args.target_sparsity if args.target_sparsity is not None else \
        None if method == "dense" else defaults["target_sparsity"]
    target = None if target == TARGET_OFF else target
    if target is not None and method == "dense":
        raise ValueError("--target-sparsity applies to the sparsifying methods, not dense (which is pruned one-shot "
                         "at the end: use --sparsity)")
    if target is None and method == "gmp":
        raise ValueError("--method gmp prunes along the course to --target-sparsity: give one (e.g. 0.95)")
    alpha_schedule = _default(args.alpha_schedule, {"pilot": "algorithm1", "spred": "constant"}.get(method))
    # With a target and no strength given, the strength starts from the recipe's integral (methods.py).
    integral = defaults["strength_integral"] if target is not None and method in STRENGTH_SETTINGS \
        and getattr(args, STRENGTH_SETTINGS[method]) is None else None
    # Algorithm 1's own settings: only where it runs without a target (the target replaces its threshold).
    algorithm1 = alpha_schedule == "algorithm1" and target is None
    if not algorithm1:
        given = [flag for flag, value in (("--factor", args.factor), ("--sparsity-signal", args.sparsity_signal),
                                          ("--threshold", args.threshold), ("--alpha-update", args.alpha_update),
                                          ("--accuracy-window", args.accuracy_window)) if value is not None]
        if given and method in ("pilot", "spred"):
            raise ValueError(f"{', '.join(given)} set Algorithm 1 without a target; with "
                             f"{'--target-sparsity' if target is not None else '--alpha-schedule constant'} "
                             "they do not apply (pass --target-sparsity off --alpha-schedule algorithm1 for them)")
    sparsity_signal = _default(args.sparsity_signal, defaults["sparsity_signal"]) if algorithm1 else None
    if args.threshold_absolute and sparsity_signal == "effective-density":
        raise ValueError("--threshold-absolute applies to --sparsity-signal l1 (effective-density thresholds are absolute)")
    alpha_update = _default(args.alpha_update, defaults["alpha_update"]) if algorithm1 else None
    if args.accuracy_window is not None and alpha_update != "step":
        raise ValueError("--accuracy-window applies to --alpha-update step")
    epochs = _default(args.epochs, defaults["epochs"])
    warmup_epochs = _default(args.warmup_epochs, min(defaults["warmup_epochs"], epochs - 1))
    if warmup_epochs >= epochs:
        raise ValueError(f"--warmup-epochs ({warmup_epochs}) must be smaller than --epochs ({epochs})")
    if args.milestones is not None and args.lr_schedule != "step":
        raise ValueError("--milestones applies to --lr-schedule step")
    milestones = tuple(sorted(set(args.milestones))) if args.milestones else ()
    if args.lr_schedule == "step":
        milestones = milestones or tuple(sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)}))
        if milestones[-1] > epochs:
            raise ValueError(f"--milestones must lie within --epochs ({epochs}), got {list(milestones)}")
    iterative = {key: getattr(args, key) for key in ITERATIVE_DEFAULTS}
    if args.cycles == 0 and any(value is not None for value in iterative.values()):
        raise ValueError("--prune-rate, --rewind and --rewind-epoch apply to iterative pruning (--cycles > 0)")
    iterative = {key: default if iterative[key] is None else iterative[key]
                 for key, default in ITERATIVE_DEFAULTS.items()}
    if iterative["rewind"] == "lrr" and args.rewind_epoch is not None:
        raise ValueError("--rewind-epoch applies to --rewind wr")
    if iterative["rewind"] == "wr" and iterative["rewind_epoch"] >= epochs:
        raise ValueError(f"--rewind-epoch ({iterative['rewind_epoch']}) must be smaller than --epochs ({epochs})")
    device = torch.device(args.device)  # raises RuntimeError with torch's message for nonsense
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    if args.bf16 and device.type != "cuda":
        raise ValueError("--bf16 autocast needs a CUDA device")
    place = distributed.current()
    if args.batch_size % place.world_size:
        raise ValueError(f"--batch-size is the global batch; {args.batch_size} is not divisible by the "
                         f"{place.world_size} processes: pass a multiple of {place.world_size}")
    if args.sync_bn and not place.enabled:
        raise ValueError("--sync-bn needs several processes (torchrun --nproc-per-node N with N > 1); one process "
                         "already normalises over the whole batch")
    if args.sync_bn and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on the CPU)")
    model = args.model or DEFAULT_MODELS[args.data]
    # On CUDA the node's CPUs are shared by its processes (torchrun's LOCAL_WORLD_SIZE), each with its own workers.
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = args.workers if args.workers is not None else (
        min(8, max(1, _cpu_count() // local_processes)) if device.type == "cuda" else 0)
    out = args.out or f"runs/{method}-{model}-{args.data}-seed{args.seed}"
    config = Config(
        method=method, data=args.data, data_root=args.data_root, model=model, limit=args.limit,
        augment=_default(args.augment, defaults["augment"]), val_fraction=args.val_fraction, epochs=epochs,
        batch_size=args.batch_size, lr=_default(args.lr, defaults["lr"]), lr_schedule=args.lr_schedule,
        warmup_epochs=warmup_epochs,
        milestones=milestones, gamma=args.gamma, momentum=args.momentum, nesterov=args.nesterov,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, conv_init=args.conv_init,
        target_sparsity=target, strength_integral=integral,
        # None for the methods the recipe's alpha leaves out, and where the integral sets the start
        alpha=None if integral is not None else _default(args.alpha, defaults["alpha"]),
        beta={"pilot": _default(args.beta, DEFAULT_BETA), "spred": 0.0}.get(method), alpha_schedule=alpha_schedule,
        factor=_default(args.factor, defaults["factor"]) if algorithm1 else None,
        sparsity_signal=sparsity_signal, threshold=_default(args.threshold, defaults["threshold"]) if algorithm1 else None,
        threshold_absolute=args.threshold_absolute, alpha_update=alpha_update,
        accuracy_window=args.accuracy_window,
        lasso_lambda=_default(args.lasso_lambda, defaults["lasso_lambda"]) if method == "lasso" and integral is None
        else None,
        str_init=_default(args.str_init, DEFAULT_STR_INIT) if method == "str" else None,
        str_weight_decay=_default(args.str_weight_decay, defaults["str_weight_decay"])
        if method == "str" and integral is None else None,
        sparsity=tuple(sorted(set(args.sparsity) | ({target} if target is not None else set()))), curve=args.curve, prune_scope=args.prune_scope,
        prune_criterion=args.prune_criterion,
        bn_recalibration=_default(args.bn_recalibration, defaults["bn_recalibration"]), cycles=args.cycles,
        **iterative, seed=args.seed,
        device=str(device), sync_bn=args.sync_bn, fsdp=args.fsdp, bf16=args.bf16,
        channels_last=args.channels_last, compile_model=args.compile_model, backend=args.backend, workers=workers,
        out=out, resume=args.resume, overwrite=args.overwrite, progress=args.progress,
    )
    check_fsdp(config, place.world_size)
    return config


def check_fsdp(config: Config, world_size: int) -> None:
    """Raise ValueError, naming the flag and the fix, if ``config`` asks for --fsdp with what it cannot run. Checked
    when the command line is parsed, and again by --resume, where a saved --fsdp run meets this invocation's
    number of processes and runtime flags."""
    if not config.fsdp:
        return
    if world_size <= 1:
        raise ValueError("--fsdp shards the model over the processes of a torchrun job: start it with torchrun "
                         "--nproc-per-node N (N > 1), or drop --fsdp")
    if config.channels_last:
        raise ValueError("--fsdp cannot shard channels_last parameters (FSDP2 needs contiguous ones): pass "
                         "--no-channels-last")
    if config.compile_model:
        raise ValueError("--fsdp does not compile the model (compiling FSDP2's blocks is not tested here): drop "
                         "--compile-model")
    if config.method == "str":
        raise ValueError("--fsdp cannot shard STR's threshold parameters (FSDP2 does not shard scalars): train "
                         "--method str without --fsdp, with DDP")
    if config.cycles:
        raise ValueError("--fsdp does not run iterative pruning (--cycles prunes and rewinds whole weights between "
                         "cycles): train with --cycles without --fsdp, with DDP")


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


__all__ = ["Config", "METHODS", "RECIPES", "build_parser", "check_fsdp", "parse_config", "recipe", "resolve",
           "default_device"]
