"""The command: parse, open the run directory, train, finish; errors become one clear message and an exit code."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from pilot.models import build_model

from .config import parse_config
from .finish import finish
from .loop import Trainer, load_data
from .methods import prepare_model
from .rundir import LOG, RunError, open_run_dir

log = logging.getLogger("pilot.train")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Log lines of ``pilot.train`` to stderr and appended to ``path`` (so a resumed run continues its log)."""
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(path, encoding="utf-8")]
    handlers[1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for handler in handlers:
        log.addHandler(handler)
    previous_level, log.propagate = log.level, False
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(previous_level)
        log.propagate = True


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``python -m pilot.train`` with ``argv`` (default: the command line); returns the exit code."""
    started = time.perf_counter()
    config, explicit = parse_config(argv)
    try:
        config = open_run_dir(config, explicit)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    with _logging_to(Path(config.out) / LOG):
        log.info("pilot.train %s -> %s", " ".join(sys.argv[1:] if argv is None else argv), config.out)
        try:
            data = load_data(config)
            bundle = data.bundle
            log.info("data: %s from %s: %s", config.data, bundle.source, ", ".join(
                f"{len(loader.dataset)} {split}" for split, loader in (("train", data.train), *data.eval.items())))
            torch.manual_seed(config.seed)
            model = build_model(config.model, bundle.num_classes, bundle.in_channels, bundle.image_size)
            trainer = Trainer(config, data, prepare_model(config, model, torch.device(config.device)))
            method = trainer.run()
            finish(config, data, method.model, trainer.progress, started=started)
        except RunError as error:
            log.error("error: %s", error)
            return EXIT_ERROR
        except KeyboardInterrupt:
            log.error("interrupted; the last finished epoch is checkpointed -- continue with: "
                      "python -m pilot.train --out %s --resume", config.out)
            return EXIT_INTERRUPTED
    return 0
