"""On-disk cache for decoded datasets: ``$PILOT_CACHE`` or ``~/.cache/pilot``, written atomically."""

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

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
    """``torch.save`` to a temp file in ``path``'s directory, then ``os.replace`` it into place.

    Readers therefore see either no file or a complete one, even if this process is killed
    mid-write or several processes fill the same cache entry at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as temp_file:
            torch.save(obj, temp_file)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
