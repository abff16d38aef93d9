"""Atomic writes: a crash at any moment leaves the old file (or directory) or the new one, never a truncated mix."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Optional

__all__ = ["atomic_write", "published_directory", "replace_directory"]


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


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".previous")


def replace_directory(staging: Path, path: Path) -> None:
    """Put the complete directory ``staging`` (next to ``path``) in the place of ``path``, replacing the directory
    there if any.

    A directory cannot be renamed over another that is not empty, so the old one is first renamed to
    ``<path>.previous`` and deleted after: a crash between the two renames leaves only that one, which
    :func:`published_directory` then finds."""
    path, staging, previous = Path(path), Path(staging), _previous(Path(path))
    if path.exists():
        shutil.rmtree(previous, ignore_errors=True)  # path exists: any previous is an older, finished copy
        path.rename(previous)
    staging.rename(path)
    shutil.rmtree(previous, ignore_errors=True)


def published_directory(path: Path) -> Optional[Path]:
    """The directory that :func:`replace_directory` last completed at ``path``: ``path``, or ``<path>.previous``
    after a crash between its renames; None if there is neither."""
    for candidate in (Path(path), _previous(Path(path))):
        if candidate.is_dir():
            return candidate
    return None
