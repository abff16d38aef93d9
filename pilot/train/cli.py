"""The command: parse, open the run directory, train, finish; errors become one clear message and an exit code.

Under torchrun every process runs this; rank 0 alone opens and writes the run directory and logs progress, the
others log only warnings and errors (prefixed with their rank). A rank that fails exits with its message and
status, and torchrun then ends the other processes (the default of ``--max-restarts 0``), which may be waiting in a
collective for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from pilot.models import build_model
from pilot.quiet import drop_cuda_home_notice

from . import distributed
from .config import Config, check_fsdp, parse_config
from .distributed import Distributed
from .finish import finish, versions
from .fsdp import gather_full_model, shard_model_
from .loop import Trainer, augmentation_seed
from .methods import prepare_model
from .run_data import load_data
from .rundir import LOG, RunError, open_run_dir

log = logging.getLogger("pilot.train")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


@contextlib.contextmanager
def _logging_to(path: Path, place: Distributed) -> Iterator[None]:
    """Log lines of ``pilot.train`` to stderr and appended to ``path`` (so a resumed run continues its log); on
    the other ranks of a distributed run only warnings and errors, to stderr, prefixed with the rank."""
    if place.is_main:
        handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(path, encoding="utf-8")]
        handlers[1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
        handlers[0].setFormatter(logging.Formatter(f"[rank {place.rank}] %(message)s"))
    for handler in handlers:
        log.addHandler(handler)
    previous_level, log.propagate = log.level, False
    log.setLevel(logging.INFO if place.is_main else logging.WARNING)
    try:
        yield
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(previous_level)
        log.propagate = True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``python -m pilot.train`` with ``argv`` (default: the command line); returns the exit code.
    Under torchrun (WORLD_SIZE > 1 in the environment) it is one rank of a distributed run."""
    started = time.perf_counter()
    drop_cuda_home_notice()
    config, explicit = parse_config(argv)
    place = distributed.current()
    try:
        device = distributed.init(place, torch.device(config.device))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return _run(config, explicit, place, device, argv, started)
    finally:
        if place.enabled:
            torch.distributed.destroy_process_group()


def _run(config: Config, explicit: frozenset[str], place: Distributed, device: torch.device,
         argv: Optional[Sequence[str]], started: float) -> int:
    try:
        config = place.from_main(lambda: open_run_dir(config, explicit))
        check_fsdp(config, place.world_size)  # again: --resume may have brought --fsdp from the saved run
    except (RunError, ValueError) as error:
        if place.is_main:  # every rank stops with it; one copy of the message is enough
            print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    # This rank's device (cuda:<local rank> under torchrun); config.json keeps the device as given.
    config = dataclasses.replace(config, device=str(device))
    with _logging_to(Path(config.out) / LOG, place):
        log.info("pilot.train %s -> %s", " ".join(sys.argv[1:] if argv is None else argv), config.out)
        log.info("code: pilot %s, git commit %s", versions()["pilot"], versions()["git_commit"])
        if place.enabled:
            log.info("distributed: %d processes (%s), global batch %d = %d per process", place.world_size,
                     torch.distributed.get_backend(), config.batch_size, config.batch_size // place.world_size)
        try:
            data = load_data(config, place)
            bundle = data.bundle
            log.info("data: %s from %s: %s", config.data, bundle.source, ", ".join(
                f"{len(loader.dataset)} {split}" for split, loader in (("train", data.train), *data.eval.items()))
                + (" (evaluation: rank 0's part)" if place.enabled else ""))

            def build() -> nn.Module:
                model = build_model(config.model, bundle.num_classes, bundle.in_channels, bundle.image_size)
                return prepare_model(config, model, device, distributed=place.enabled)

            torch.manual_seed(config.seed)  # the same initial weights on every rank
            model = build()
            if config.fsdp:
                shard_model_(model, place.world_size, device)
                log.info("fsdp: parameters, gradients and optimizer state sharded over the %d processes (FSDP2)",
                         place.world_size)
            if place.enabled:
                torch.manual_seed(augmentation_seed(config.seed, place.rank))
            trainer = Trainer(config, data, model, place)
            method = trainer.run()
            # Pruning ranks all the weights at once: under --fsdp every rank gathers them into an unsharded model.
            trained = gather_full_model(method.model, build) if config.fsdp else method.model
            finish(config, data, trained, trainer.progress, started=started, place=place)
        except RunError as error:
            log.error("error: %s", error)
            return EXIT_ERROR
        except KeyboardInterrupt:
            log.error("interrupted; the last finished epoch is checkpointed -- continue with: "
                      "python -m pilot.train --out %s --resume", config.out)
            return EXIT_INTERRUPTED
    return 0
