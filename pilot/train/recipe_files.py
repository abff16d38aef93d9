"""The recipes of ``python -m pilot.train``: each dataset's defaults (:data:`RECIPES`), and the TOML files of
``--recipe NAME_OR_PATH``, option values that stand for command-line arguments put before the user's (so that
flags given on the command line override them)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

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


def recipe(data: str, method: str) -> dict[str, Any]:
    """The defaults of ``data``'s recipe (:data:`RECIPES`) for ``method``: a value given per method is
    ``method``'s, None where the recipe leaves ``method`` out."""
    values = RECIPES.get(data, RECIPES[RECIPE_FALLBACK])
    return {key: value.get(method) if isinstance(value, dict) else value for key, value in values.items()}


# The recipe files shipped with pilot (package data): --recipe NAME reads RECIPE_DIRECTORY / f"{NAME}.toml".
RECIPE_DIRECTORY = Path(__file__).with_name("recipes")
# Options a recipe cannot set: they say what to do with a run directory, not how to train.
NOT_IN_RECIPES = frozenset({"recipe", "resume", "overwrite", "out"})


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPE_DIRECTORY.glob("*.toml"))


def read_recipe(spec: str) -> dict[str, Any]:
    """The TOML recipe ``spec``: the name of a shipped recipe (:func:`recipe_names`) or the path of a file."""
    path = Path(spec)
    if not path.is_file():
        path = RECIPE_DIRECTORY / f"{spec}.toml"
    if not path.is_file():
        raise ValueError(f"--recipe {spec}: no such file, and not one of pilot's recipes "
                         f"({', '.join(recipe_names())})")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError("--recipe needs Python 3.11 or later (tomllib), or `pip install tomli`") from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"--recipe {path}: {error}") from error


def recipe_arguments(recipe_file: dict[str, Any], parser: argparse.ArgumentParser, method: Optional[str],
                     methods: Sequence[str]) -> list[str]:
    """The command-line arguments a recipe stands for, to be put before the user's (so that those override it).

    A recipe's keys are long option names without the dashes (``batch-size = 256``, ``augment = false``,
    ``sparsity = [0.9, 0.95]``); a table named after a method (``[pilot]``) holds options that apply only when
    that method runs (``method`` as given on the command line, else the recipe's own ``method``, else pilot);
    ``methods`` are the names such tables may have.
    """
    options = {option[2:]: action for action in parser._actions for option in action.option_strings
               if option.startswith("--")}
    method = method or recipe_file.get("method") or parser.get_default("method")
    tables = {key: value for key, value in recipe_file.items() if isinstance(value, dict)}
    unknown_tables = sorted(set(tables) - set(methods))
    if unknown_tables:
        raise ValueError(f"recipe tables {unknown_tables} are not methods; tables may be {', '.join(methods)}")
    settings = {key: value for key, value in recipe_file.items() if key not in tables}
    settings.update(tables.get(method, {}))
    arguments = []
    for key, value in settings.items():
        action = options.get(key)
        if action is None or action.dest in NOT_IN_RECIPES or action.dest == "help":
            raise ValueError(f"recipe key {key!r} is not an option of python -m pilot.train that a recipe may set "
                             "(keys are long option names without the dashes, e.g. batch-size)")
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ValueError(f"recipe key {key!r} must be true or false, got {value!r}")
            arguments.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, (bool, dict)) or action.nargs == 0:
            raise ValueError(f"recipe key {key!r} cannot be {value!r}")
        elif isinstance(value, list):
            arguments += [f"--{key}", *map(str, value)]
        else:
            arguments += [f"--{key}", str(value)]
    return arguments
