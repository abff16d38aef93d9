"""A diverged epoch of python -m pilot.train goes back to the last checkpoint and is trained again with half the
learning rate; the third divergence ends the run with the error.

The divergence is real: the model's weights are set to nan part-way through the epoch (what an exploding update
leaves), so only a restore of the checkpoint's weights lets the run go on.
"""
import json
import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from pilot.train import loop as train_loop
from pilot.train.methods import lr_multiplier
from pilot.train import main
from test_train import assert_states_equal, final_state, interrupted_at, records, run

STEPS_PER_EPOCH = 10  # 320 synthetic examples in batches of 32


def poison(epochs: set[int], times: int, blow_up: bool = False) -> Callable:
    """A replacement of ``train_one_epoch`` that sets the first prunable weight to nan (or, with ``blow_up``,
    multiplies the last one by 1e4: a finite loss of thousands) before the epochs ``epochs`` (counted from 1 over
    the calls that complete or fail) the first ``times`` times they are trained."""
    original, calls = train_loop.train_one_epoch, {"epoch": 0, "poisoned": 0}

    def train_one_epoch(method, loader, **options):
        calls["epoch"] += 1
        if calls["epoch"] in epochs and calls["poisoned"] < times:
            calls["poisoned"] += 1
            calls["epoch"] -= 1  # the retry trains the same epoch
            weights = [p for p in method.model.parameters() if p.ndim >= 2]
            with torch.no_grad():  # FusedPILoTSGD factorises a weight written outside it again
                if blow_up:
                    weights[-1].mul_(1e4)
                else:
                    weights[0].fill_(math.nan)
        return original(method, loader, **options)

    return train_one_epoch


@pytest.mark.parametrize("method, epoch, blow_up", [("pilot", 1, False), ("pilot", 2, False), ("dense", 2, False),
                                                    ("pilot", 2, True)])
def test_a_diverged_epoch_is_trained_again_from_the_checkpoint_with_half_the_lr(
        tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch, method: str, epoch: int,
        blow_up: bool) -> None:
    monkeypatch.setattr(train_loop, "train_one_epoch", poison({epoch}, times=1, blow_up=blow_up))
    out = tmp_path / "run"
    assert run(out, data_root, "--method", method, "--epochs", "3", "--target-sparsity", "off",
               "--sparsity", "0.5") == 0
    history = records(out)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in history)
    assert history[-1]["test_accuracy"] > 0.3  # it went on learning (chance is 0.1)
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["epoch"], r["lr_factor"]) for r in summary["recoveries"]] == [(epoch, 0.5)]
    assert ("over 10x that of a uniform guess" if blow_up else "became nan") in summary["recoveries"][0]["error"]
    # the learning rate of the epoch retried and of every later one is half the schedule's
    config = summary["config"]
    multiplier = lr_multiplier(train_loop.Config.from_json(config), STEPS_PER_EPOCH)
    for record in history:
        scheduled = config["lr"] * multiplier((record["epoch"] - 1) * STEPS_PER_EPOCH)
        factor = 0.5 if record["epoch"] >= epoch else 1.0
        assert record["lr"] == pytest.approx(factor * scheduled, rel=1e-12), record["epoch"]


def test_a_recovered_run_resumes_exactly(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after its recovery and resumed, a run ends bit for bit where it ends without the stop (the lower
    learning rate and the record of the recovery are in the checkpoint)."""
    args = ("--epochs", "3", "--target-sparsity", "0.8", "--sparsity", "0.8")
    monkeypatch.setattr(train_loop, "train_one_epoch", poison({2}, times=1))
    assert run(tmp_path / "whole", data_root, *args) == 0
    with monkeypatch.context() as patch:
        patch.setattr(train_loop, "train_one_epoch", poison({2}, times=1))
        # Trainer.train_epoch calls: epoch 1, epoch 2 (diverges), epoch 2 again, epoch 3 (stopped as by Ctrl-C)
        patch.setattr(train_loop.Trainer, "train_epoch", interrupted_at(4))
        assert run(tmp_path / "stopped", data_root, *args) == 130
    assert main(["--out", str(tmp_path / "stopped"), "--resume", "--no-progress", "--backend", "eager"]) == 0
    whole, resumed = final_state(tmp_path / "whole"), final_state(tmp_path / "stopped")
    for part in ("model", "method", "rng"):
        assert_states_equal(whole[part], resumed[part], part)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("whole", "stopped")]
    assert summaries[0]["recoveries"] == summaries[1]["recoveries"] and len(summaries[0]["recoveries"]) == 1


def test_the_third_divergence_ends_the_run_with_the_error(tmp_path: Path, data_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(train_loop, "train_one_epoch", poison({2}, times=3))
    out = tmp_path / "run"
    assert run(out, data_root, "--epochs", "3", "--target-sparsity", "off") != 0
    error = capsys.readouterr().err
    assert "the training loss became nan" in error and "2 times" in error and "x0.5" in error
    assert [r["epoch"] for r in records(out)] == [1]
    assert not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------------- the default recipe

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")
@pytest.mark.parametrize("args", [("--limit", "3000"), ("--limit", "3000", "--epochs", "4", "--batch-size", "128"),
                                  ("--limit", "2000", "--batch-size", "64", "--epochs", "30"),
                                  ("--limit", "2000", "--batch-size", "512", "--epochs", "30"),
                                  ("--limit", "2000", "--batch-size", "64", "--epochs", "2")],
                         ids=["3000", "3000-e4-b128", "2000-b64-e30", "2000-b512-e30", "2000-b64-e2"])
def test_the_default_recipe_holds_when_only_the_data_batch_or_epochs_change(tmp_path: Path, args: tuple[str, ...]
                                                                            ) -> None:
    """The default command (pilot, LeNet-300-100, real Fashion-MNIST) on fewer images, other batch sizes and
    epochs trains without a divergence to recover from, and learns. The recipe's earlier lr 0.3 diverged on the
    first two (the issue's commands) and blew up in the first epoch on the third and fourth."""
    out = tmp_path / "run"
    # --backend eager: the tests import the kernels under TRITON_INTERPRET=1, where auto would pick the interpreter
    assert main([*args, "--out", str(out), "--no-progress", "--no-curve", "--backend", "eager"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recoveries"] == []
    assert all(math.isfinite(r["train_loss"]) for r in records(out))
    assert summary["final"]["test_accuracy"] > 0.6  # 10 classes
