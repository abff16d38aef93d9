"""``python -m pilot.train``: train a sparse network with PILoT or a baseline, prune it, evaluate it, plot it.

Run ``python -m pilot.train --help`` for the options; :func:`main` is the same from Python.
"""
from .cli import main
from .config import Config, parse_config

__all__ = ["Config", "main", "parse_config"]
