"""The recipes of ``python -m pilot.train``, TOML files whose keys are long option names without the dashes
(``batch-size = 256``, ``augment = false``, ``sparsity = [0.9, 0.95]``) and whose tables named after a method
(``[pilot]``) hold that method's own values, which replace the others for it.

- Each dataset's recipe, ``recipes/<dataset>.toml`` (:data:`RECIPES`), states every value ``--data <dataset>``
  trains with, and is the only place that holds them. Its values are defaults: what the command line does not
  give (so a setting that does not apply, such as Algorithm 1's factor under a target, is not an error, and
  ``--resume`` takes the saved run's). ``--recipe <dataset>`` (or an earlier name, :data:`RECIPE_ALIASES`) is
  ``--data <dataset>``.
- ``--recipe PATH``, a file of one's own, stands for command-line arguments put before the user's: flags given on
  the command line override it, and everything it sets counts as given.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pilot.data import DATASET_NAMES

from .method_settings import METHODS, methods_of

try:
    import tomllib
except ImportError:  # Python 3.10: setup.py installs tomli there
    import tomli as tomllib

RECIPE_DIRECTORY = Path(__file__).with_name("recipes")  # package data (setup.py)
# The names of the shipped recipes before each dataset's recipe was its own file: the paper's settings.
RECIPE_ALIASES = {"cifar10-resnet20": "cifar10", "cifar100-resnet18": "cifar100", "imagenet-resnet50": "imagenet"}
# What a dataset's recipe states: each of these keys, for every method it applies to (method_settings.methods_of),
RECIPE_KEYS = ("model", "epochs", "batch-size", "lr", "lr-schedule", "warmup-epochs", "gamma", "momentum", "nesterov",
               "weight-decay", "label-smoothing", "conv-init", "augment", "bf16", "channels-last",
               "target-sparsity", "sparsity", "bn-recalibration", "factor", "alpha-update", "sparsity-signal",
               "threshold", "alpha", "beta", "lasso-lambda", "str-init", "str-weight-decay")
# and, where it has them, the milestones of its --lr-schedule step (else 50% and 75% of the epochs) and the
# regularisation integral from which --target-sparsity starts a method's strength (else from the strength itself).
STRENGTH_INTEGRAL = "strength-integral"  # the one key that is no option: a recipe's alone
OPTIONAL_RECIPE_KEYS = ("milestones", STRENGTH_INTEGRAL)
# Options a recipe file of one's own cannot set: they say what to do with a run directory, not how to train.
NOT_IN_RECIPE_FILES = frozenset({"recipe", "resume", "overwrite", "out"})


@dataclass(frozen=True)
class DatasetRecipe:
    """A dataset's recipe: the values of every method (``common``) and each method's own (``tables``), keyed by
    long option names without the dashes; read from ``path``."""

    path: Path
    common: dict[str, Any]
    tables: dict[str, dict[str, Any]]

    def value(self, key: str, method: str) -> Any:
        """``key``'s value for ``method`` (its table's, else the common one); None where ``key`` does not apply to
        ``method`` or the recipe does not state it."""
        if method not in methods_of(_setting(key)):
            return None
        return self.tables.get(method, {}).get(key, self.common.get(key))

    def defaults(self, method: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
        """The recipe's values for ``method`` keyed by :class:`~pilot.train.config.Config` field (None where it
        states none), each read as ``parser`` reads its option from the command line: the defaults that
        :func:`~pilot.train.config.resolve` fills in. A value its option would refuse is a ValueError naming it."""
        options = _long_options(parser)
        defaults = {}
        for key in (*RECIPE_KEYS, *OPTIONAL_RECIPE_KEYS):
            value = self.value(key, method)
            if value is not None:
                table = f"[{method}] " if key in self.tables.get(method, {}) else ""
                where = f"recipe {self.path}: {table}{key} = {value!r}"
                value = _read_integral(value, where) if key == STRENGTH_INTEGRAL else _read_option(options[key], value,
                                                                                                  where)
            defaults[_setting(key)] = value
        return defaults


def read_dataset_recipe(path: Path) -> DatasetRecipe:
    """The dataset recipe in ``path``, checked for what it must and may state (its values are read as options by
    :meth:`DatasetRecipe.defaults`); a ValueError names the key at fault and the fix."""
    settings = _read_toml(path, f"recipe {path}")
    tables = {key: value for key, value in settings.items() if isinstance(value, dict)}
    common = {key: value for key, value in settings.items() if key not in tables}
    unknown_tables = sorted(set(tables) - set(METHODS))
    if unknown_tables:
        raise ValueError(f"recipe {path}: tables {unknown_tables} are not methods; tables may be {', '.join(METHODS)}")
    known = (*RECIPE_KEYS, *OPTIONAL_RECIPE_KEYS)
    for table, values in (("", common), *((f"[{method}] ", values) for method, values in tables.items())):
        for key in values:
            if key not in known:
                raise ValueError(f"recipe {path}: {table}{key} is not a key of a dataset recipe; the keys are "
                                 f"{', '.join(known)}")
    for method, values in tables.items():
        for key in values:
            if method not in methods_of(_setting(key)):
                raise ValueError(f"recipe {path}: [{method}] {key}: {key} applies to "
                                 f"{'/'.join(methods_of(_setting(key)))}, not {method}; move it to their tables")
    recipe = DatasetRecipe(path, common, tables)
    for key in RECIPE_KEYS:
        missing = [method for method in methods_of(_setting(key)) if recipe.value(key, method) is None]
        if missing:
            raise ValueError(f"recipe {path} states no {key} for {'/'.join(missing)}: a dataset's recipe states "
                             "every value it trains with; add it at the top (every method's) or to their tables")
    return recipe


def recipe_names() -> list[str]:
    """The names ``--recipe`` takes besides a path: the datasets and :data:`RECIPE_ALIASES`."""
    return [*DATASET_NAMES, *RECIPE_ALIASES]


def recipe_arguments(spec: str, parser: argparse.ArgumentParser, method: Optional[str]) -> list[str]:
    """The command-line arguments ``--recipe spec`` stands for, to be put before the user's (so that those
    override it): ``--data <dataset>`` for a dataset's recipe (:func:`recipe_names`), else those of the recipe file
    at the path ``spec``, for ``method``. A ValueError names the key at fault."""
    path = Path(spec)
    if not path.is_file():
        dataset = RECIPE_ALIASES.get(spec, spec)
        if dataset in RECIPES:
            return ["--data", dataset]
        raise ValueError(f"--recipe {spec}: no such file, and not one of pilot's recipes ({', '.join(recipe_names())})")
    return file_arguments(_read_toml(path, f"--recipe {path}"), parser, method)


def file_arguments(recipe_file: dict[str, Any], parser: argparse.ArgumentParser, method: Optional[str]) -> list[str]:
    """The command-line arguments a recipe file of one's own stands for. Its tables apply when their method runs
    (``method`` as given on the command line, else the file's own ``method``, else pilot)."""
    options = _long_options(parser)
    method = method or recipe_file.get("method") or parser.get_default("method")
    tables = {key: value for key, value in recipe_file.items() if isinstance(value, dict)}
    unknown_tables = sorted(set(tables) - set(METHODS))
    if unknown_tables:
        raise ValueError(f"recipe tables {unknown_tables} are not methods; tables may be {', '.join(METHODS)}")
    settings = {key: value for key, value in recipe_file.items() if key not in tables}
    settings.update(tables.get(method, {}))
    arguments = []
    for key, value in settings.items():
        action = options.get(key)
        if action is None or action.dest in NOT_IN_RECIPE_FILES or action.dest == "help":
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


def _setting(key: str) -> str:
    """The Config field (and option dest) of the recipe key ``key``."""
    return key.replace("-", "_")


def _long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option[2:]: action for action in parser._actions for option in action.option_strings
            if option.startswith("--")}


def _read_option(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` read as ``action``'s option reads it from the command line."""
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false")
        return value
    several = action.nargs == "+"
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) != several or any(isinstance(item, (bool, dict, list)) for item in items):
        raise ValueError(f"{where}: must be {'a list of values' if several else 'one value'} of --{action.dest}")
    try:
        read = [action.type(str(item)) if action.type else str(item) for item in items]
    except (argparse.ArgumentTypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    for item in read:
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{where}: must be one of {', '.join(map(str, action.choices))}")
    return read if several else read[0]


def _read_integral(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{where}: must be a number > 0")
    return float(value)


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{what}: {error}") from error


def _read_recipes() -> dict[str, DatasetRecipe]:
    missing = [data for data in DATASET_NAMES if not (RECIPE_DIRECTORY / f"{data}.toml").is_file()]
    if missing:
        raise ValueError(f"no recipe for the datasets {missing}: add {RECIPE_DIRECTORY}/<dataset>.toml for each")
    return {data: read_dataset_recipe(RECIPE_DIRECTORY / f"{data}.toml") for data in DATASET_NAMES}


# Each dataset's recipe, by dataset (in the order of pilot.data.DATASET_NAMES).
RECIPES = _read_recipes()
