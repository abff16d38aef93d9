"""The run configuration of ``python -m pilot.train``: :class:`Config`, how configurations of earlier versions
load, and :func:`parse_config`, which resolves a command line into one: the options given (:mod:`.arguments`) over
the dataset's recipe (:mod:`.recipe_files`)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from . import distributed
from .arguments import ITERATIVE_DEFAULTS, TARGET_OFF, build_parser
from .method_settings import METHOD_SETTINGS, METHODS, STRENGTH_SETTINGS
from .recipe_files import RECIPES, recipe_arguments

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


def parse_config(argv: Optional[Sequence[str]] = None) -> tuple[Config, frozenset[str]]:
    """Parse the command line into a validated :class:`Config` with every default resolved, and the names of the
    settings given explicitly (``--resume`` compares those with the saved run; the dataset recipe's values are
    defaults, not given). ``--recipe`` stands for arguments put before the command line's, so that its flags
    override them (:func:`~pilot.train.recipe_files.recipe_arguments`)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    given, _ = parser.parse_known_args(argv)  # only --recipe and --method are read here
    if given.recipe is not None:
        try:
            argv = recipe_arguments(given.recipe, parser, given.method) + argv
        except ValueError as error:
            parser.error(str(error))
    args = parser.parse_args(argv)
    try:
        config = resolve(args, RECIPES[args.data].defaults(args.method, parser))
    except ValueError as error:
        parser.error(str(error))
    # Parsed again without defaults: what remains was on the command line (or in a recipe file).
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return config, frozenset(vars(parser.parse_args(argv))) - {"recipe"}


def resolve(args: argparse.Namespace, defaults: dict[str, Any]) -> Config:
    """The :class:`Config` of the options ``args``, where not given ``defaults`` (the dataset recipe's values for
    the method, :meth:`~pilot.train.recipe_files.DatasetRecipe.defaults`), checked for the combinations argparse
    cannot check."""
    method = args.method
    for key, methods in METHOD_SETTINGS.items():
        if getattr(args, key) is not None and method not in methods:
            raise ValueError(f"--{key.replace('_', '-')} applies to --method {'/'.join(methods)}, not {method}")
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
    lr_schedule = _default(args.lr_schedule, defaults["lr_schedule"])
    if args.milestones is not None and lr_schedule != "step":
        raise ValueError("--milestones applies to --lr-schedule step")
    milestones = ()
    if lr_schedule == "step":  # the given milestones, the recipe's, or 50% and 75% of the epochs
        chosen = _default(args.milestones, defaults["milestones"])
        milestones = tuple(sorted(set(chosen or {max(1, epochs // 2), max(1, (3 * epochs) // 4)})))
        if milestones[-1] > epochs:
            whose = "" if args.milestones else f" from the recipe of --data {args.data} (give --milestones)"
            raise ValueError(f"--milestones must lie within --epochs ({epochs}), got {list(milestones)}{whose}")
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
    bf16 = _default(args.bf16, defaults["bf16"])
    if bf16 and device.type != "cuda":
        asked = "" if args.bf16 else f" (the recipe of --data {args.data} asks for it; pass --no-bf16)"
        raise ValueError(f"--bf16 autocast needs a CUDA device{asked}")
    place = distributed.current()
    batch_size = _default(args.batch_size, defaults["batch_size"])
    if batch_size % place.world_size:
        raise ValueError(f"--batch-size is the global batch; {batch_size} is not divisible by the "
                         f"{place.world_size} processes: pass a multiple of {place.world_size}")
    if args.sync_bn and not place.enabled:
        raise ValueError("--sync-bn needs several processes (torchrun --nproc-per-node N with N > 1); one process "
                         "already normalises over the whole batch")
    if args.sync_bn and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on the CPU)")
    model = args.model or defaults["model"]
    # On CUDA the node's CPUs are shared by its processes (torchrun's LOCAL_WORLD_SIZE), each with its own workers.
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = args.workers if args.workers is not None else (
        min(8, max(1, _cpu_count() // local_processes)) if device.type == "cuda" else 0)
    out = args.out or f"runs/{method}-{model}-{args.data}-seed{args.seed}"
    # The settings that are simply the given value, else the recipe's.
    given_or_recipe = {key: _default(getattr(args, key), defaults[key]) for key in (
        "augment", "lr", "gamma", "momentum", "nesterov", "weight_decay", "label_smoothing", "conv_init",
        "bn_recalibration", "channels_last")}
    sparsity = set(_default(args.sparsity, defaults["sparsity"])) | ({target} if target is not None else set())
    config = Config(
        method=method, data=args.data, data_root=args.data_root, model=model, limit=args.limit,
        val_fraction=args.val_fraction, epochs=epochs, batch_size=batch_size, lr_schedule=lr_schedule,
        warmup_epochs=warmup_epochs, milestones=milestones, target_sparsity=target, strength_integral=integral,
        # None for the methods the recipe's alpha leaves out, and where the integral sets the start
        alpha=None if integral is not None else _default(args.alpha, defaults["alpha"]),
        beta={"pilot": _default(args.beta, defaults["beta"]), "spred": 0.0}.get(method), alpha_schedule=alpha_schedule,
        factor=_default(args.factor, defaults["factor"]) if algorithm1 else None,
        sparsity_signal=sparsity_signal, threshold=_default(args.threshold, defaults["threshold"]) if algorithm1 else None,
        threshold_absolute=args.threshold_absolute, alpha_update=alpha_update,
        accuracy_window=args.accuracy_window,
        lasso_lambda=_default(args.lasso_lambda, defaults["lasso_lambda"]) if method == "lasso" and integral is None
        else None,
        str_init=_default(args.str_init, defaults["str_init"]) if method == "str" else None,
        str_weight_decay=_default(args.str_weight_decay, defaults["str_weight_decay"])
        if method == "str" and integral is None else None,
        sparsity=tuple(sorted(sparsity)), curve=args.curve, prune_scope=args.prune_scope,
        prune_criterion=args.prune_criterion, cycles=args.cycles, **iterative, seed=args.seed,
        device=str(device), sync_bn=args.sync_bn, fsdp=args.fsdp, bf16=bf16, compile_model=args.compile_model,
        backend=args.backend, workers=workers, out=out, resume=args.resume, overwrite=args.overwrite,
        progress=args.progress, **given_or_recipe,
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


# METHODS, RECIPES, STRENGTH_SETTINGS and build_parser are defined in the modules above and imported from here too.
__all__ = ["Config", "METHODS", "RECIPES", "STRENGTH_SETTINGS", "build_parser", "check_fsdp", "parse_config",
           "resolve"]
