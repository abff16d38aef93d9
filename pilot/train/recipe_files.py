"""Recipe files of ``python -m pilot.train --recipe NAME_OR_PATH``: TOML files of option values that stand for
command-line arguments put before the user's (so that flags given on the command line override them)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

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
