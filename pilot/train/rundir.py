"""The run directory: its file names, atomic writes, and the rules that keep a user's run from being lost.

A run directory holds one run. Starting a run in a directory that already holds one is refused unless the user
asks to continue it (``--resume``, which requires the same run-defining settings) or to replace it
(``--overwrite``, which deletes only the files a run writes).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from pilot.atomic import atomic_write, published_directory

from .config import FINISH_KEYS, Config

CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
# --fsdp: a torch.distributed.checkpoint directory (pilot.train.fsdp.ShardedCheckpoint), with its staging copy
# (.tmp) and, after a crash, the one it replaces (.previous).
SHARDED_CHECKPOINT = "checkpoint.dcp"
SHARDED_CHECKPOINT_GLOB = f"{SHARDED_CHECKPOINT}*"
METRICS = "metrics.jsonl"
LOG = "train.log"
SUMMARY = "summary.json"
CURVES_PNG = "curves.png"
ONE_SHOT_JSON = "one_shot.json"
ONE_SHOT_PNG = "one_shot.png"
LAYER_DENSITY_PNG = "layer_density.png"
PRUNED_GLOB = "pruned-*.pt"
RUN_FILES = (CONFIG, CHECKPOINT, METRICS, LOG, SUMMARY, CURVES_PNG, ONE_SHOT_JSON, ONE_SHOT_PNG, LAYER_DENSITY_PNG)


class RunError(Exception):
    """A run cannot start or go on; the message says why and what to do (the CLI prints it, no traceback)."""


class RunDirError(RunError):
    """The run directory cannot be used as asked."""


def pruned_model_name(sparsity: float) -> str:
    return f"pruned-{100 * sparsity:g}.pt"


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda file: torch.save(obj, file), binary=True)


def save_json(obj: Any, path: Path) -> None:
    atomic_write(path, lambda file: file.write(json.dumps(obj, indent=2) + "\n"), binary=False)


def write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> None:
    atomic_write(path, lambda file: file.writelines(json.dumps(r) + "\n" for r in records), binary=False)


def append_jsonl(record: dict[str, Any], path: Path) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def load_config(directory: Path) -> Config:
    path = Path(directory) / CONFIG
    try:
        return Config.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise RunDirError(f"{path} is unreadable or not a pilot.train configuration ({error}); "
                          "pass --overwrite to start a new run there or choose another --out") from error


def _run_files(directory: Path) -> list[Path]:
    return [directory / name for name in RUN_FILES if (directory / name).exists()] + sorted(
        directory.glob(PRUNED_GLOB)) + sorted(directory.glob(SHARDED_CHECKPOINT_GLOB))


def open_run_dir(config: Config, explicit: Sequence[str] = ()) -> Config:
    """Prepare ``config.out`` for the run and return the configuration to run with.

    - fresh or empty directory: created, config.json written.
    - ``--resume``: the saved configuration is used (with this invocation's runtime settings: device, backend,
      workers, progress); a run-defining setting given explicitly (``explicit`` holds the given keys) that differs
      from the saved one is an error listing the differences. Evaluation settings (:data:`FINISH_KEYS`) given
      explicitly replace the saved ones, so resuming a finished run evaluates it again with them.
    - ``--overwrite``: the files of the previous run are deleted (nothing else in the directory is touched).
    - anything else in a directory that is not empty is an error saying what is there and what to do.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a directory")
    if config.resume:
        if not (out / CONFIG).is_file():
            raise RunDirError(f"nothing to resume: {out / CONFIG} does not exist (drop --resume to start the run)")
        saved = load_config(out)
        given = dataclasses.replace(config, **{key: getattr(saved, key) for key in (*Config.run_defining(),
                                                                                  *FINISH_KEYS)
                                               if key not in explicit})
        differences = saved.differences(given)
        if differences:
            raise RunDirError(f"--resume: {out} holds a run with other settings; these differ (saved -> given):\n  "
                              + "\n  ".join(differences)
                              + "\nresume with the saved settings, or pass --overwrite to start over with the new ones")
        if any(getattr(saved, key) != getattr(given, key) for key in FINISH_KEYS):
            save_json(given.to_json(), out / CONFIG)  # the evaluation settings in use from now on
        return given
    if out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise RunDirError(_occupied_message(out))
        for path in _run_files(out):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_json(config.to_json(), out / CONFIG)
    return config


def _occupied_message(out: Path) -> str:
    if not (out / CONFIG).is_file():
        return (f"--out {out} exists and is not empty (and holds no run); choose another --out, or pass "
                "--overwrite to write this run's files there anyway")
    checkpointed = (out / CHECKPOINT).is_file() or published_directory(out / SHARDED_CHECKPOINT) is not None
    state = "finished" if (out / SUMMARY).is_file() else (
        "stopped after a checkpoint" if checkpointed else "stopped before its first checkpoint")
    return (f"--out {out} already holds a run ({state}); pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out")


def read_checkpoint(out: Path) -> Optional[dict[str, Any]]:
    """The checkpoint of the run in ``out`` (:func:`read_torch`), or None."""
    path = Path(out) / CHECKPOINT
    return read_torch(path) if path.is_file() else None


def read_torch(path: Path) -> Any:
    """The checkpoint file ``path`` loaded on the CPU (RNG states must be CPU tensors)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file; all mean the same here
        raise RunDirError(f"{path} cannot be read ({type(error).__name__}: {error}); the run cannot be resumed "
                          "from it -- pass --overwrite to start over") from error
