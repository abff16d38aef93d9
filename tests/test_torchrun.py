"""``torchrun --standalone --nproc-per-node 2 -m pilot.train`` on the CPU (gloo), on test_train.py's synthetic
Fashion-MNIST, compared with single-process runs of the same global batch.

LeNet-300-100 has no BatchNorm, and the two processes train on the two halves of exactly the batches one process
trains on (pilot.data.sharding), so the runs differ only in the order in which the gradient's terms are summed
(each rank sums its half, DDP adds the halves): the weights agree to float32 rounding, not bit for bit. Resuming
with the same number of processes is bit-exact.

The torchrun jobs (~10 s each under load) are started once per module by fixtures; tests/torchrun_probe.py adds
the instruments that need code inside the ranks (recording Algorithm 1's inputs, stopping, failing).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pilot.data import load_datasets
from pilot.evaluate import evaluate
from pilot.models import build_model
from pilot.train import main, parse_config
from pilot.train.loop import check_world_size
from pilot.train.rundir import RunError
from test_train import assert_states_equal, final_state, records

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("torchrun_probe.py")
WORLD = 2
# 320 training examples in global batches of 44: 7 full batches and a final one of 12, split 6 + 6 over the ranks.
# The pilot settings these tests were written for, pinned so that the recipe may change (a recipe with a warmup
# epoch and a larger lr drove the loss of the synthetic data so low that float rounding of the reduced gradients
# exceeded the relative tolerances of the loss comparisons).
# Algorithm 1 without a target (--target-sparsity off): what these runs were written for.
ARGS = ("--batch-size", "44", "--lr", "0.1", "--warmup-epochs", "0", "--target-sparsity", "off",
        "--sparsity-signal", "l1", "--threshold", "0.01",
        "--no-progress", "--backend", "eager", "--sparsity", "0.5", "0.9", "--no-curve")
EPOCH_ARGS = ("--alpha-update", "epoch")  # Algorithm 1 per epoch, as the runs that are not STEP_ARGS were written for
STEP_ARGS = ("--epochs", "2", "--alpha-update", "step", "--factor", "1.05", "--accuracy-window", "3")
JOB_TIMEOUT = 240  # seconds; a hang fails the test instead of blocking the suite
# float32 rounding of a differently ordered sum of gradients, grown over 3 epochs of ~8 steps (measured ~1e-7)
WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def torchrun(out: Path, data_root: Path, *args: str, script: tuple[str, ...] = ("-m", "pilot.train"),
             env: dict[str, str] | None = None, processes: int = WORLD) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *script,
               "--data-root", str(data_root), "--out", str(out), *ARGS, *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=JOB_TIMEOUT)


def single(out: Path, data_root: Path, *args: str) -> int:
    return main(["--data-root", str(data_root), "--out", str(out), *ARGS, *args])


def succeeded(job: subprocess.CompletedProcess) -> bool:
    if job.returncode != 0:
        print(job.stdout, job.stderr, sep="\n")
    return job.returncode == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    """Every run of the module: torchrun jobs and their single-process counterparts."""
    base = tmp_path_factory.mktemp("runs")
    paths = {name: base / name for name in ("ddp", "single", "step", "stopped", "single-resumed", "alphas", "bn")}
    paths["alphas"].mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process runs: see test_train.py's _one_thread
    assert succeeded(torchrun(paths["ddp"], data_root, "--epochs", "3", *EPOCH_ARGS))
    assert single(paths["single"], data_root, "--epochs", "3", *EPOCH_ARGS) == 0
    assert succeeded(torchrun(paths["step"], data_root, *STEP_ARGS))
    assert succeeded(torchrun(paths["bn"], data_root, "--epochs", "2", "--model", "resnet20", "--bn-recalibration",
                              "2", *EPOCH_ARGS))
    recording = {"PROBE_RECORD": str(paths["alphas"])}
    stopped = torchrun(paths["stopped"], data_root, *STEP_ARGS, script=(str(PROBE),),
                       env={**recording, "PROBE_STOP_AFTER_EPOCH": "1"})
    assert stopped.returncode != 0 and len(records(paths["stopped"])) == 1, stopped.stderr
    shutil.copytree(paths["stopped"], paths["single-resumed"])
    assert succeeded(torchrun(paths["stopped"], data_root, "--resume", script=(str(PROBE),), env=recording))
    assert main(["--out", str(paths["single-resumed"]), "--resume", "--no-progress", "--backend", "eager"]) == 0
    torch.set_num_threads(threads)
    return paths


def test_torchrun_writes_one_run_directory(runs: dict[str, Path]) -> None:
    out = runs["ddp"]
    assert sorted(path.name for path in out.parent.iterdir() if path.name.startswith("ddp")) == ["ddp"]
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in runs["single"].iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["epochs"] == 3
    assert summary["device"]["subnormals_flushed"] is True  # the entry point's flush reached every thread
    assert json.loads((runs["single"] / "summary.json").read_text())["world_size"] == 1
    assert [r["epoch"] for r in records(out)] == [1, 2, 3]
    log = (out / "train.log").read_text()
    assert log.count("done:") == 1 and f"distributed: {WORLD} processes (gloo), global batch 44 = 22" in log


def test_torchrun_agrees_with_one_process_of_the_same_global_batch(runs: dict[str, Path]) -> None:
    ddp, one = final_state(runs["ddp"]), final_state(runs["single"])
    for name, weight in one["model"].items():
        torch.testing.assert_close(ddp["model"][name], weight, **WEIGHT_TOLERANCE, msg=name)
    for distributed, alone in zip(records(runs["ddp"]), records(runs["single"]), strict=True):
        # counts are reduced exactly: the same examples are right; Algorithm 1 made the same decisions
        assert distributed["train_accuracy"] == alone["train_accuracy"]
        assert distributed["test_accuracy"] == alone["test_accuracy"]
        assert distributed["alpha"] == alone["alpha"]
        assert distributed["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)
        assert distributed["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)
    pruned = [json.loads((runs[name] / "summary.json").read_text())["pruned"] for name in ("ddp", "single")]
    for distributed, alone in zip(*pruned, strict=True):
        assert distributed["sparsity"] == alone["sparsity"]
        assert distributed["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=1 / 120)


def test_algorithm_1_sees_the_same_reduced_accuracy_on_every_rank(runs: dict[str, Path]) -> None:
    calls = [[json.loads(line) for line in (runs["alphas"] / f"rank{rank}.jsonl").read_text().splitlines()]
             for rank in range(WORLD)]
    steps_per_epoch = 8  # 320 examples in batches of 44
    assert len(calls[0]) == 2 * steps_per_epoch  # the stopped run's first epoch and the resumed run's second
    assert calls[1] == calls[0]
    assert len({tuple(call["alphas"]) for call in calls[0]}) > 2, "alpha never moved: the test cannot tell"
    # the same alpha as the uninterrupted torchrun run recorded after each epoch
    alphas = [record["alpha"] for record in records(runs["step"])]
    assert [calls[0][steps_per_epoch - 1]["alphas"][0]] == alphas[1:]


def test_resume_under_torchrun_equals_an_uninterrupted_torchrun_run(runs: dict[str, Path]) -> None:
    whole, resumed = final_state(runs["step"]), final_state(runs["stopped"])
    assert whole["world_size"] == resumed["world_size"] == WORLD
    assert_states_equal(whole["model"], resumed["model"], "model")
    assert_states_equal(whole["method"], resumed["method"], "method")
    assert_states_equal(whole["rng"], resumed["rng"], "rng")
    strip = ("seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in strip} for r in records(runs["step"])] == \
           [{k: v for k, v in r.items() if k not in strip} for r in records(runs["stopped"])]
    assert json.loads((runs["stopped"] / "summary.json").read_text())["world_size"] == WORLD


def test_resume_with_another_number_of_processes(runs: dict[str, Path]) -> None:
    """Without BatchNorm the global batches are all that matter: a 2-process run resumed by one process ends where
    the uninterrupted 2-process run does, to float32 rounding."""
    whole, resumed = final_state(runs["step"]), final_state(runs["single-resumed"])
    assert "world_size" not in resumed  # a single-process checkpoint
    for name, weight in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], weight, **WEIGHT_TOLERANCE, msg=name)
    assert [r["train_accuracy"] for r in records(runs["single-resumed"])] == \
           [r["train_accuracy"] for r in records(runs["step"])]
    assert "random augmentation is seeded afresh" in (runs["single-resumed"] / "train.log").read_text()


def test_sharded_evaluation_is_rank_0s_model_on_the_whole_split(runs: dict[str, Path], data_root: Path) -> None:
    """ResNet-20: each rank's BatchNorm statistics follow its own batches during an epoch; after the broadcast the
    ranks evaluate rank 0's model (the checkpointed one), and the reduced counts are those of the whole test split."""
    state = final_state(runs["bn"])
    model = build_model("resnet20", 10, 1, state["model"]["conv1.weight"].shape[-1])
    model.load_state_dict(state["model"])
    torch.set_num_threads(1)
    whole = evaluate(model, DataLoader(load_datasets("fashion-mnist", data_root, augment=False).test, batch_size=64),
                     device=torch.device("cpu"))
    last = records(runs["bn"])[-1]
    assert last["test_accuracy"] == whole.accuracy
    assert last["test_loss"] == pytest.approx(whole.loss, rel=1e-5)
    pruned = json.loads((runs["bn"] / "summary.json").read_text())["pruned"]
    assert [row["target_sparsity"] for row in pruned] == [0.5, 0.9] and "test_accuracy_bn" in pruned[0]


def test_a_rank_that_raises_ends_the_job(tmp_path: Path, data_root: Path) -> None:
    """Rank 1 fails in epoch 2 while rank 0 waits for it in DDP's gradient all-reduce: torchrun ends rank 0 and
    the job fails with rank 1's error (JOB_TIMEOUT turns a hang into a failure)."""
    out = tmp_path / "failed"
    job = torchrun(out, data_root, "--epochs", "3", script=(str(PROBE),), env={"PROBE_FAIL_RANK": "1"})
    assert job.returncode != 0
    output = job.stdout + job.stderr
    assert "RuntimeError: injected failure on rank 1" in output
    assert "Root Cause" in output and "rank      : 1" in output.split("Root Cause")[1]
    assert len(records(out)) == 1 and not (out / "summary.json").exists()


def test_resuming_with_another_number_of_processes_is_refused_where_batchnorm_would_change() -> None:
    config, _ = parse_config(["--batch-size", "64"])
    resnet, mlp = build_model("resnet20", 10), build_model("lenet300-100", 10)
    check_world_size(config, mlp, 640, 2, 4)  # no BatchNorm: the same global batches, the same training
    check_world_size(config, resnet, 640, 2, 2)
    with pytest.raises(RunError, match="batches of 32; with 4 they would be taken over 16"):
        check_world_size(config, resnet, 640, 2, 4)
    with pytest.raises(RunError, match="Resume with 1 process"):
        check_world_size(config, resnet, 640, 1, 2)
    check_world_size(dataclasses.replace(config, sync_bn=True), resnet, 640, 1, 4)  # global statistics either way
    # 646 = 10 x 64 + 6: a final batch of 6 gives 2 processes 3 each, but not 4 processes 2 each
    check_world_size(config, mlp, 646, 1, 2)
    with pytest.raises(RunError, match="11 steps per epoch with 2 process.*with 4 the final batch of 6 examples"):
        check_world_size(config, mlp, 646, 2, 4)


def test_every_flag_passes_through_torchrun() -> None:
    """torchrun's own parser reads the whole command line before handing the rest to the module, and argparse
    rejects an option that abbreviates two of torchrun's (``--signal`` was ambiguous with ``--signals-to-handle``):
    every pilot.train flag must reach pilot.train."""
    from torch.distributed.run import get_args_parser

    from pilot.train.config import build_parser

    torchrun = get_args_parser()
    flags = [flag for action in build_parser()._actions for flag in action.option_strings if flag.startswith("--")]
    assert "--sparsity-signal" in flags
    for flag in flags:
        parsed = torchrun.parse_args(["--standalone", "-m", "pilot.train", flag, "VALUE"])
        assert parsed.training_script_args == [flag, "VALUE"], flag
