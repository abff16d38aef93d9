"""``torchrun tests/torchrun_probe.py ARGS``: pilot.train's ``main(ARGS)`` with instruments for tests/test_torchrun.py.

Chosen by environment variables:
- PROBE_RECORD=DIR: every call of Algorithm 1 (``PILoTSchedule.step``) appends the accuracy it was given and the
  alpha it set to DIR/rank<R>.jsonl;
- PROBE_STOP_AFTER_EPOCH=E: once the checkpoint of epoch E is written (and every rank is past it), every rank
  stops as if interrupted;
- PROBE_FAIL_RANK=R: rank R raises RuntimeError in its second epoch; the other ranks carry on into it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pilot.schedule import PILoTSchedule
from pilot.train import cli, loop

RANK = int(os.environ["RANK"])
INJECTED = f"injected failure on rank {RANK}"


def _record(directory: Path) -> None:
    step = PILoTSchedule.step

    def recording(self: PILoTSchedule, accuracy: float) -> None:
        step(self, accuracy)
        with open(directory / f"rank{RANK}.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps({"accuracy": accuracy, "alphas": self.get_last_alpha()}) + "\n")

    PILoTSchedule.step = recording


def _stop_after(epoch: int) -> None:
    save = loop.Trainer.save_checkpoint

    def stopping(self: loop.Trainer, method) -> None:
        save(self, method)
        if self.progress.epoch == epoch:
            self.place.barrier()  # rank 0 has written the checkpoint before anyone stops
            raise KeyboardInterrupt

    loop.Trainer.save_checkpoint = stopping


def _fail_in_second_epoch() -> None:
    train_one_epoch = loop.train_one_epoch
    calls = []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError(INJECTED)
        return train_one_epoch(*args, **kwargs)

    loop.train_one_epoch = failing


if __name__ == "__main__":
    if "PROBE_RECORD" in os.environ:
        _record(Path(os.environ["PROBE_RECORD"]))
    if "PROBE_STOP_AFTER_EPOCH" in os.environ:
        _stop_after(int(os.environ["PROBE_STOP_AFTER_EPOCH"]))
    if os.environ.get("PROBE_FAIL_RANK") == str(RANK):
        _fail_in_second_epoch()
    sys.exit(cli.main(sys.argv[1:]))
