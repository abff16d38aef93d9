"""On-disk cache for decoded datasets: ``$PILOT_CACHE`` or ``~/.cache/pilot``, written atomically."""

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from pilot.atomic import atomic_write

CACHE_ENV_VAR = "PILOT_CACHE"


def cache_dir() -> Path:
    """The cache directory: ``$PILOT_CACHE`` if set and non-empty, else ``~/.cache/pilot``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pilot"


def cache_key(*parts: object) -> str:
    """A short hex digest identifying ``parts`` (e.g. a source path, its size and its mtime)."""
    digest = hashlib.sha256("\0".join(str(part) for part in parts).encode("utf-8"))
    return digest.hexdigest()[:20]


def save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`pilot.atomic.atomic_write`).

    Readers therefore see either no file or a complete one, even if this process is killed
    mid-write or several processes fill the same cache entry at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: torch.save(obj, file), binary=True)
