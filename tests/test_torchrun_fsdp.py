"""``torchrun --standalone --nproc-per-node 2 -m pilot.train --fsdp`` on the CPU (gloo), on test_train.py's synthetic
Fashion-MNIST: the model sharded with FSDP2, checkpoints in torch.distributed.checkpoint (DCP) directories.

FSDP and DDP runs of the same global batch train on the same batches from the same initial weights, and every
decision (Algorithm 1's alphas) and count (accuracies) comes out the same; the weights agree to float32 rounding,
not bit for bit (measured: at most 7.5e-9 apart after 2 epochs), because the same sums are computed in other buffers
and kernels. Resuming a stopped --fsdp run with the same number of processes is bit-exact; DCP reshards the
checkpoint for another number.

The torchrun jobs (~15 s each under load) are started once per module by a fixture; tests/torchrun_probe.py stops a
run after its first epoch.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.utils.data import DataLoader, Subset

from pilot.atomic import published_directory, replace_directory
from pilot.data import load_datasets
from pilot.evaluate import evaluate
from pilot.models import build_model
from pilot.train import main, parse_config
from pilot.train.config import check_fsdp
from pilot.train.fsdp import TRAINER_STATE, LockstepBatches
from pilot.train.rundir import SHARDED_CHECKPOINT, open_run_dir
from test_torchrun import PROBE, STEP_ARGS, WEIGHT_TOLERANCE, WORLD, succeeded, torchrun
from test_train import assert_states_equal, final_state, records

# A validation split of 45 examples: shards of 23 and 22, which in per-rank batches of 22 are 2 batches and 1, so
# the lockstep padding of evaluation is exercised (0.140625 * 320 = 45).
UNEVEN_VAL_FRACTION = "0.140625"


def sharded_final_state(out: Path) -> dict:
    """The checkpoint of an --fsdp run as one dict: the DCP shards made whole ("model", "optimizer") and rank 0's
    trainer state (as in a checkpoint.pt, less the model and the optimizer)."""
    directory = out / SHARDED_CHECKPOINT
    whole = out.with_name(f"{out.name}-checkpoint.pt")
    dcp_to_torch_save(directory, whole)
    return {**torch.load(directory / TRAINER_STATE, weights_only=True), **torch.load(whole, weights_only=True)}


def without_times(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in ("seconds", "eval_seconds")} for row in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fsdp-runs")
    paths = {name: base / name for name in ("fsdp", "ddp", "stopped", "resumed-by-4", "resnet")}
    assert succeeded(torchrun(paths["fsdp"], data_root, "--fsdp", *STEP_ARGS))
    assert succeeded(torchrun(paths["ddp"], data_root, *STEP_ARGS))
    stopped = torchrun(paths["stopped"], data_root, "--fsdp", *STEP_ARGS, script=(str(PROBE),),
                       env={"PROBE_STOP_AFTER_EPOCH": "1"})
    assert stopped.returncode != 0 and len(records(paths["stopped"])) == 1, stopped.stderr
    shutil.copytree(paths["stopped"], paths["resumed-by-4"])
    assert succeeded(torchrun(paths["stopped"], data_root, "--resume"))
    assert succeeded(torchrun(paths["resumed-by-4"], data_root, "--resume", processes=4))
    assert succeeded(torchrun(paths["resnet"], data_root, "--fsdp", "--epochs", "2", "--model", "resnet20",
                              "--bn-recalibration", "2", "--val-fraction", UNEVEN_VAL_FRACTION))
    return paths


def test_fsdp_run_writes_one_run_directory_with_a_dcp_checkpoint(runs: dict[str, Path]) -> None:
    out = runs["fsdp"]
    replicated = {path.name for path in runs["ddp"].iterdir()}
    assert {path.name for path in out.iterdir()} == replicated - {"checkpoint.pt"} | {SHARDED_CHECKPOINT}
    checkpoint = sorted(path.name for path in (out / SHARDED_CHECKPOINT).iterdir())
    assert checkpoint == [".metadata", "__0_0.distcp", "__1_0.distcp", TRAINER_STATE]  # every rank wrote its shards
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["config"]["fsdp"] and summary["epochs"] == 2
    assert "sharded over the 2 processes (FSDP2)" in (out / "train.log").read_text()


def test_fsdp_agrees_with_ddp_of_the_same_global_batch(runs: dict[str, Path]) -> None:
    sharded, replicated = sharded_final_state(runs["fsdp"]), final_state(runs["ddp"])
    for name, weight in replicated["model"].items():
        torch.testing.assert_close(sharded["model"][name], weight, **WEIGHT_TOLERANCE, msg=name)
    for fsdp, ddp in zip(records(runs["fsdp"]), records(runs["ddp"]), strict=True):
        # the same examples are right, and Algorithm 1 (stepped after every batch) took the same decisions
        for key in ("train_accuracy", "test_accuracy", "alpha", "density"):
            assert fsdp[key] == ddp[key], key
        for key in ("train_loss", "test_loss", "l1_norm", "effective_density"):
            assert fsdp[key] == pytest.approx(ddp[key], rel=1e-5), key
    pruned = [json.loads((runs[name] / "summary.json").read_text())["pruned"] for name in ("fsdp", "ddp")]
    for fsdp, ddp in zip(*pruned, strict=True):  # pruned on the gathered weights
        assert fsdp["sparsity"] == ddp["sparsity"] and fsdp["layers"] == ddp["layers"]
        assert fsdp["test_accuracy"] == pytest.approx(ddp["test_accuracy"], abs=1 / 120)


def test_resume_under_fsdp_equals_an_uninterrupted_fsdp_run(runs: dict[str, Path]) -> None:
    whole, resumed = sharded_final_state(runs["fsdp"]), sharded_final_state(runs["stopped"])
    assert "model" not in torch.load(runs["stopped"] / SHARDED_CHECKPOINT / TRAINER_STATE, weights_only=True)
    for key in ("model", "optimizer", "method", "rng"):
        assert_states_equal(whole[key], resumed[key], key)
    assert without_times(records(runs["fsdp"])) == without_times(records(runs["stopped"]))
    assert json.loads((runs["stopped"] / "summary.json").read_text())["config"]["fsdp"]


def test_dcp_reshards_the_checkpoint_for_another_number_of_processes(runs: dict[str, Path]) -> None:
    """A 2-process --fsdp run resumed by 4 (LeNet-300-100 has no BatchNorm: the same global batches are the same
    training): it ends where the uninterrupted 2-process run does, to float32 rounding (measured: 3e-8)."""
    whole, resumed = sharded_final_state(runs["fsdp"]), sharded_final_state(runs["resumed-by-4"])
    assert resumed["world_size"] == 4
    assert sorted(path.name for path in (runs["resumed-by-4"] / SHARDED_CHECKPOINT).glob("*.distcp")) == [
        f"__{rank}_0.distcp" for rank in range(4)]
    for name, weight in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], weight, **WEIGHT_TOLERANCE, msg=name)
    assert [r["train_accuracy"] for r in records(runs["resumed-by-4"])] == \
           [r["train_accuracy"] for r in records(runs["fsdp"])]


def test_fsdp_evaluation_with_uneven_shards_is_the_whole_split(runs: dict[str, Path], data_root: Path) -> None:
    """ResNet-20 (BatchNorm, its statistics broadcast from rank 0 after each epoch) with a validation split whose
    shards have 2 and 1 batches: the reduced metrics are the checkpointed model's on the whole split."""
    state = sharded_final_state(runs["resnet"])
    model = build_model("resnet20", 10, 1, state["model"]["conv1.weight"].shape[-1])
    model.load_state_dict(state["model"])
    bundle = load_datasets("fashion-mnist", data_root, augment=False)
    order = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(0))  # VALIDATION_SPLIT_SEED
    validation = Subset(bundle.train, order[:45].sort().values.tolist())
    torch.set_num_threads(1)
    last = records(runs["resnet"])[-1]
    for split, dataset in (("val", validation), ("test", bundle.test)):
        result = evaluate(model, DataLoader(dataset, batch_size=64), device=torch.device("cpu"))
        assert last[f"{split}_accuracy"] == result.accuracy, split
        assert last[f"{split}_loss"] == pytest.approx(result.loss, rel=1e-5), split
    pruned = json.loads((runs["resnet"] / "summary.json").read_text())["pruned"]
    assert [row["target_sparsity"] for row in pruned] == [0.5, 0.9] and "val_accuracy_bn" in pruned[0]
    saved = torch.load(runs["resnet"] / "pruned-90.pt", weights_only=True)["state_dict"]
    assert not any(type(value).__name__ == "DTensor" for value in saved.values())


def test_lockstep_batches_pad_with_empty_batches() -> None:
    loader = DataLoader(torch.utils.data.TensorDataset(torch.ones(5, 3), torch.zeros(5, dtype=torch.long)),
                        batch_size=2)
    batches = list(LockstepBatches(loader, 5))
    assert [len(targets) for _, targets in batches] == [2, 2, 1, 0, 0]
    assert batches[-1][0].shape == (0, 3)
    with pytest.raises(ValueError, match="shorter"):
        LockstepBatches(loader, 2)


def test_fsdp_refuses_what_it_cannot_run(tmp_path: Path, data_root: Path, runs: dict[str, Path],
                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--fsdp"])  # one process
    assert "torchrun --nproc-per-node N (N > 1)" in capsys.readouterr().err
    config, _ = parse_config([])
    fsdp = dataclasses.replace(config, fsdp=True)
    check_fsdp(fsdp, 2)
    for changes, message in (({"channels_last": True}, "--no-channels-last"), ({"method": "str"}, "STR"),
                             ({"cycles": 2}, "--cycles"), ({"compile_model": True}, "drop --compile-model")):
        with pytest.raises(ValueError, match=message):
            check_fsdp(dataclasses.replace(fsdp, **changes), 2)
    # --resume brings --fsdp from the saved run: one process cannot continue it
    out = tmp_path / "resumed-alone"
    shutil.copytree(runs["stopped"], out)
    assert main(["--out", str(out), "--resume", "--no-progress"]) == 1
    assert "--fsdp shards the model over the processes of a torchrun job" in capsys.readouterr().err


def test_overwrite_deletes_the_sharded_checkpoint(tmp_path: Path, runs: dict[str, Path]) -> None:
    out = tmp_path / "run"
    shutil.copytree(runs["fsdp"], out)
    (out / f"{SHARDED_CHECKPOINT}.tmp").mkdir()  # the leftovers of an interrupted save
    config, _ = parse_config(["--out", str(out), "--overwrite"])
    open_run_dir(config)
    assert sorted(path.name for path in out.iterdir()) == ["config.json"]


def test_replace_directory_leaves_one_complete_directory(tmp_path: Path) -> None:
    path, staging = tmp_path / "checkpoint", tmp_path / "checkpoint.tmp"
    assert published_directory(path) is None
    for version in ("1", "2"):
        staging.mkdir()
        (staging / "version").write_text(version)
        replace_directory(staging, path)
        assert (published_directory(path) / "version").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    path.rename(tmp_path / "checkpoint.previous")  # a crash between replace_directory's two renames
    assert (published_directory(path) / "version").read_text() == "2"
    staging.mkdir()
    (staging / "version").write_text("3")
    replace_directory(staging, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert (published_directory(path) / "version").read_text() == "3"
