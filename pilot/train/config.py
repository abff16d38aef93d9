"""The command line of ``python -m pilot.train`` and the run configuration it resolves to."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from pilot.data import DATASET_NAMES
from pilot.iterative import REWIND_MODES
from pilot.models import MODEL_NAMES
from pilot.optim import BACKENDS
from pilot.pruning import SCOPES

METHODS = ("dense", "pilot", "spred", "lasso", "str")
LR_SCHEDULES = ("cosine", "step", "constant")

# The model each dataset is trained with when --model is not given (the paper's choice where it has one).
DEFAULT_MODELS = {"fashion-mnist": "lenet300-100", "cifar10": "resnet20", "cifar100": "resnet18-cifar",
                  "imagenet": "resnet50"}
# Defaults of the sparsifying methods, selected by validation accuracy after one-shot pruning to 90/95/98% for
# LeNet-300-100 on Fashion-MNIST in 10 epochs (docs/results.md). They scale with the length of training: longer
# schedules and larger models need smaller values (the paper uses alpha in 1e-4..1e-3 for 150-epoch ResNets).
DEFAULT_ALPHA = {"pilot": 1.5e-3, "spred": 2e-3}
DEFAULT_BETA = 1.0
DEFAULT_FACTOR = 2.0
DEFAULT_L1_THRESHOLD = 0.01
DEFAULT_LASSO_LAMBDA = 3e-3
DEFAULT_STR_INIT = -5.0
DEFAULT_STR_WEIGHT_DECAY = 3e-2
ITERATIVE_DEFAULTS = {"prune_rate": 0.2, "rewind": "lrr", "rewind_epoch": 1}
# Settings that may differ between a run and its --resume without changing what is computed
# (device and backend can change the last bits of the result, but moving a run to another machine is legitimate).
RUNTIME_KEYS = frozenset({"out", "resume", "overwrite", "device", "backend", "workers", "progress"})


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
    alpha: Optional[float]
    beta: Optional[float]
    factor: Optional[float]
    l1_threshold: Optional[float]
    l1_threshold_absolute: bool
    lasso_lambda: Optional[float]
    str_init: Optional[float]
    str_weight_decay: Optional[float]
    sparsity: tuple[float, ...]
    prune_scope: str
    cycles: int
    prune_rate: float
    rewind: str
    rewind_epoch: int
    seed: int
    device: str
    bf16: bool
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
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    @classmethod
    def run_defining(cls) -> list[str]:
        """The settings that define what a run computes (all but :data:`RUNTIME_KEYS`)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in RUNTIME_KEYS]

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where there is a default worth reading and the help does not give it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, True) or "default" in text:
            return text
        return super()._get_help_string(action)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pilot.train",
        usage="%(prog)s [--method M] [--model NAME] [--data NAME] [--data-root PATH] [options]",
        description="Train a sparse network with PILoT (or a baseline), prune it and evaluate it. "
                    "With no arguments: PILoT on Fashion-MNIST with LeNet-300-100, 10 epochs on the CPU in minutes.",
        epilog="Outputs in --out: config.json, metrics.jsonl (one record per epoch), checkpoint.pt (every epoch), "
               "train.log, curves.png, one_shot.json / one_shot.png (accuracy after one-shot magnitude pruning at "
               "1 - 0.8^k and at --sparsity), pruned-<sparsity>.pt (state_dict with exact zeros + masks), "
               "summary.json.",
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
    what.add_argument("--no-augment", dest="augment", action="store_false",
                      help="train without the dataset's random crops and flips")
    what.add_argument("--val-fraction", type=_val_fraction, default=0.0, metavar="F",
                      help="hold out this fraction of the training set (not augmented) as a validation split, "
                           "to select hyper-parameters without looking at the test set")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=_positive_int, default=10, metavar="N",
                       help="epochs (of each cycle with --cycles)")
    optim.add_argument("--batch-size", type=_positive_int, default=256, metavar="N", help="training batch size")
    optim.add_argument("--lr", type=_positive, default=0.1, help="peak learning rate")
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                       help="cosine: to 0 at the last epoch; step: multiply by --gamma at each milestone")
    optim.add_argument("--warmup-epochs", type=_non_negative_int, default=0, metavar="N",
                       help="ramp the learning rate up linearly over this many epochs first")
    optim.add_argument("--milestones", type=_positive_int, nargs="+", metavar="EPOCH",
                       help="epochs after which --lr-schedule step decays (default: 50%% and 75%% of --epochs)")
    optim.add_argument("--gamma", type=_fraction_open, default=0.1, help="decay of the step schedule")
    optim.add_argument("--momentum", type=_momentum, default=0.9, help="SGD momentum")
    optim.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    optim.add_argument("--weight-decay", type=_non_negative, default=5e-4, metavar="WD",
                       help="L2 weight decay (for pilot/spred: on the parameters that are not factorised)")

    reg = parser.add_argument_group("sparsifying regularisation")
    reg.add_argument("--alpha", type=_non_negative,
                     help="pilot/spred: initial weight decay on the factors m, w "
                          f"(default {', '.join(f'{m} {a:g}' for m, a in DEFAULT_ALPHA.items())})")
    reg.add_argument("--beta", type=_positive, help="pilot: initial imbalance m^2 - w^2 of the factors "
                                                    f"(default {DEFAULT_BETA:g}; spred is beta = 0)")
    reg.add_argument("--factor", type=_factor,
                     help=f"pilot: alpha is multiplied or divided by this after each epoch (default {DEFAULT_FACTOR})")
    reg.add_argument("--l1-threshold", type=_non_negative, metavar="K",
                     help="pilot: alpha only grows while the L1 norm of the prunable weights is at least K, as a "
                          "fraction of its value at initialisation (default "
                          f"{DEFAULT_L1_THRESHOLD}; see --l1-threshold-absolute)")
    reg.add_argument("--l1-threshold-absolute", action="store_true",
                     help="read --l1-threshold as an absolute L1 norm instead")
    reg.add_argument("--lasso-lambda", type=_positive, metavar="LAMBDA",
                     help=f"lasso: strength of the L1 penalty (default {DEFAULT_LASSO_LAMBDA:g})")
    reg.add_argument("--str-init", type=_number(float, low=-math.inf), metavar="S",
                     help="str: initial logit s of every layer's threshold sigmoid(s) "
                          f"(default {DEFAULT_STR_INIT:g})")
    reg.add_argument("--str-weight-decay", type=_non_negative, metavar="WD",
                     help="str: weight decay on the threshold logits s, which raises the thresholds "
                          f"(default {DEFAULT_STR_WEIGHT_DECAY:g})")

    prune = parser.add_argument_group("pruning")
    prune.add_argument("--sparsity", type=_fraction_open, nargs="+", default=[0.9, 0.95, 0.98], metavar="S",
                       help="target sparsities of the final one-shot pruning (a pruned model is saved for each)")
    prune.add_argument("--prune-scope", choices=SCOPES, default="global",
                       help="rank magnitudes across all prunable layers or within each layer")
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
    run.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the init, shuffling and augmentation")
    run.add_argument("--device", default=default_device(),
                     help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    run.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and backward (CUDA only)")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="FusedPILoTSGD backend (pilot/spred): auto = Triton on CUDA, torch.compile on CPU")
    run.add_argument("--workers", type=_non_negative_int, metavar="N",
                     help="DataLoader worker processes (default: 0 on CPU, min(8, CPUs) on CUDA)")
    run.add_argument("--out", metavar="DIR", help="run directory (default: runs/<method>-<model>-<data>-seed<seed>)")
    existing = run.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="replace the run in --out, if any")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> tuple[Config, frozenset[str]]:
    """Parse the command line into a validated :class:`Config` with every default resolved, and the names of the
    settings given explicitly (``--resume`` compares those with the saved run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve(args)
    except ValueError as error:
        parser.error(str(error))
    # Parsed again without defaults: what remains was on the command line.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return config, frozenset(vars(parser.parse_args(argv)))


def resolve(args: argparse.Namespace) -> Config:
    """Fill the method- and dataset-dependent defaults and check the combinations argparse cannot."""
    method = args.method
    specific = {"--alpha": (args.alpha, ("pilot", "spred")), "--beta": (args.beta, ("pilot",)),
                "--factor": (args.factor, ("pilot",)), "--l1-threshold": (args.l1_threshold, ("pilot",)),
                "--lasso-lambda": (args.lasso_lambda, ("lasso",)), "--str-init": (args.str_init, ("str",)),
                "--str-weight-decay": (args.str_weight_decay, ("str",))}
    for flag, (value, methods) in specific.items():
        if value is not None and method not in methods:
            raise ValueError(f"{flag} applies to --method {'/'.join(methods)}, not {method}")
    if args.l1_threshold_absolute and args.l1_threshold is None:
        raise ValueError("--l1-threshold-absolute needs --l1-threshold")
    epochs = args.epochs
    if args.warmup_epochs >= epochs:
        raise ValueError(f"--warmup-epochs ({args.warmup_epochs}) must be smaller than --epochs ({epochs})")
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
    model = args.model or DEFAULT_MODELS[args.data]
    workers = args.workers if args.workers is not None else (min(8, _cpu_count()) if device.type == "cuda" else 0)
    out = args.out or f"runs/{method}-{model}-{args.data}-seed{args.seed}"
    return Config(
        method=method, data=args.data, data_root=args.data_root, model=model, limit=args.limit,
        augment=args.augment, val_fraction=args.val_fraction, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs, milestones=milestones, gamma=args.gamma,
        momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        alpha=_default(args.alpha, DEFAULT_ALPHA[method]) if method in DEFAULT_ALPHA else None,
        beta={"pilot": _default(args.beta, DEFAULT_BETA), "spred": 0.0}.get(method),
        factor=_default(args.factor, DEFAULT_FACTOR) if method == "pilot" else None,
        l1_threshold=_default(args.l1_threshold, DEFAULT_L1_THRESHOLD) if method == "pilot" else None,
        l1_threshold_absolute=args.l1_threshold_absolute,
        lasso_lambda=_default(args.lasso_lambda, DEFAULT_LASSO_LAMBDA) if method == "lasso" else None,
        str_init=_default(args.str_init, DEFAULT_STR_INIT) if method == "str" else None,
        str_weight_decay=_default(args.str_weight_decay, DEFAULT_STR_WEIGHT_DECAY) if method == "str" else None,
        sparsity=tuple(sorted(set(args.sparsity))), prune_scope=args.prune_scope, cycles=args.cycles,
        **iterative, seed=args.seed,
        device=str(device), bf16=args.bf16, backend=args.backend, workers=workers, out=out, resume=args.resume,
        overwrite=args.overwrite, progress=args.progress,
    )


def _default(value: Optional[float], default: float) -> float:
    return default if value is None else value


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


__all__ = ["Config", "METHODS", "build_parser", "parse_config", "resolve", "default_device"]
