"""Atomic file writes: a crash at any moment leaves the old file or the new one, never a truncated mix."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write"]


def atomic_write(path: Path, write: Callable[[IO[Any]], None], *, binary: bool) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, flush it to disk, then rename it over ``path``.

    The rename is atomic on POSIX file systems because the temporary file lives in the same directory; the fsync
    before it makes sure a power loss cannot leave the new name pointing at unwritten data.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
