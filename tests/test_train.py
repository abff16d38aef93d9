"""python -m pilot.train end to end on a tiny synthetic Fashion-MNIST (idx files written to tmp_path).

12x12 images of 10 noisy blocky class templates (4x4 blocks survive the random 2-pixel crops of the
augmentation): every run takes seconds, and a model that learns shows it within three epochs.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from pilot.atomic import atomic_write
from pilot.evaluate import one_shot_levels
from pilot.experiments import results_table
from pilot.experiments.layer_stats import layer_rows
from pilot.models import build_model
from pilot.train import loop as train_loop
from pilot.train import main, parse_config
from pilot.train.config import Config
from pilot.train.methods import lr_multiplier
from pilot.train.run_data import load_data

IMAGE_SIZE, BLOCK = 12, 4
TRAIN_SIZE, TEST_SIZE = 320, 120
METHODS = ("dense", "pilot", "spred", "lasso", "str", "gmp")


def _write_idx(path: Path, magic: int, data: torch.Tensor) -> None:
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in data.shape)
    path.write_bytes(header + data.numpy().tobytes())


def write_fashion_mnist(root: Path, *, seed: int = 0) -> Path:
    """Synthetic idx files in Fashion-MNIST's layout: class template + noise, uint8."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.rand(10, IMAGE_SIZE // BLOCK, IMAGE_SIZE // BLOCK, generator=generator) * 200
    templates = blocks.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, size in (("train", TRAIN_SIZE), ("t10k", TEST_SIZE)):
        labels = torch.arange(size) % 10
        images = templates[labels] + torch.rand(size, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 55
        _write_idx(root / f"{prefix}-images-idx3-ubyte", 2051, images.to(torch.uint8))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", 2049, labels.to(torch.uint8))
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    """Intra-op threads only add synchronisation to these tiny models; on a loaded machine OpenMP's spin-waits
    make them 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(out: Path, data_root: Path, *args: str) -> int:
    """A short run on the synthetic data, with the learning rate pinned so that the recipe may change."""
    return main(["--data-root", str(data_root), "--out", str(out), "--batch-size", "32", "--epochs", "2", "--lr", "0.1",
                 "--no-progress", "--backend", "eager", *args])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def assert_states_equal(a: object, b: object, where: str = "") -> None:
    """Bit-exact equality of nested checkpoints (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_states_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


# ---------------------------------------------------------------------------------------------- every method

@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    """One 3-epoch run per method, shared by the tests that read their outputs."""
    runs = {}
    for method in METHODS:
        out = tmp_path_factory.mktemp(method) / "run"
        target = [] if method == "dense" else ["--target-sparsity", "0.9"]
        assert run(out, data_root, "--method", method, "--epochs", "3", "--sparsity", "0.5", "0.9", *target) == 0
        runs[method] = out
    return runs


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_the_loss_falls(finished_runs: dict[str, Path], method: str) -> None:
    history = records(finished_runs[method])
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert (history[0]["alpha"] is not None) == (method in ("pilot", "spred"))


@pytest.mark.parametrize("method", METHODS)
def test_pruned_models_have_exactly_the_target_sparsity(finished_runs: dict[str, Path], method: str) -> None:
    out = finished_runs[method]
    for sparsity in (0.5, 0.9):
        saved = torch.load(out / f"pruned-{100 * sparsity:g}.pt", weights_only=True)
        model = build_model(saved["model"], saved["num_classes"], saved["in_channels"], saved["input_size"])
        model.load_state_dict(saved["state_dict"])  # a plain model (STR baked in)
        weights = {name: p for name, p in model.named_parameters() if p.ndim >= 2}
        total = sum(p.numel() for p in weights.values())
        # GMP's pruning along the course reached its target (0.9) exactly: pruning to 0.5 removes no more
        reached = 0.9 if method == "gmp" else 0.0
        assert sum(int((p == 0).sum()) for p in weights.values()) == round(max(sparsity, reached) * total)
        assert saved["masks"].keys() == {f"{name}_mask" for name in weights}
        for name, p in weights.items():
            assert torch.equal(saved["masks"][f"{name}_mask"], (p != 0).to(p.dtype))


def test_summary_curve_and_plots(finished_runs: dict[str, Path]) -> None:
    out = finished_runs["pilot"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["method"] == "pilot" and summary["epochs"] == 3
    assert {"torch", "triton", "python", "pilot"} <= summary["versions"].keys()
    assert summary["device"]["device"] == "cpu"
    assert summary["times"]["train_seconds"] > 0
    assert [p["target_sparsity"] for p in summary["pruned"]] == [0.5, 0.9]
    target = summary["target"]  # 3 x 10 steps are far too few for 90%: missed, and said so
    assert (target["sparsity"], target["measure"], target["bound"]) == (0.9, "effective_density", pytest.approx(0.125))
    assert target["reached"] == (target["value"] <= 0.125)
    gmp = json.loads((finished_runs["gmp"] / "summary.json").read_text())["target"]
    assert (gmp["measure"], gmp["value"], gmp["reached"]) == ("exact_sparsity", pytest.approx(0.9, abs=1e-4), True)
    assert all(p["layers"] and "test_accuracy" in p for p in summary["pruned"])
    curve = json.loads((out / "one_shot.json").read_text())
    levels = [row["target_sparsity"] for row in curve["levels"]]
    # 1 - 0.8^k up to 0.9 (k = 10 gives 0.893) and the requested levels
    assert levels == one_shot_levels([0.5, 0.9]) == sorted({round(1 - 0.8 ** k, 6) for k in range(1, 11)} | {0.5, 0.9})
    for row in curve["levels"]:
        assert math.isclose(row["sparsity"], row["target_sparsity"], abs_tol=1e-4)
        assert 0.0 <= row["test_accuracy"] <= 1.0
    for name in ("curves.png", "one_shot.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "epoch 3/3" in (out / "train.log").read_text()


def test_results_table_selects_the_best_run_of_each_method(finished_runs: dict[str, Path],
                                                           capsys: pytest.CaptureFixture) -> None:
    runs = [finished_runs[method] for method in METHODS]
    rows = [results_table.run_row(run, "test") for run in runs]
    for row, method in zip(rows, METHODS):
        summary = json.loads((finished_runs[method] / "summary.json").read_text())
        accuracies = [pruned["test_accuracy"] for pruned in summary["pruned"]]
        assert row["method"] == method and row["score"] == pytest.approx(sum(accuracies) / len(accuracies))
        # momentum carries weight decay (I = sum / (1 - momentum)), not LASSO's proximal map (I = sum)
        carried = 1.0 if method == "lasso" else 1.0 - summary["config"]["momentum"]
        assert row["integral"] == pytest.approx(summary["final"]["regularisation_integral"] / carried)
    assert results_table.main([str(run) for run in runs] + ["--select"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(METHODS) and all(f"| {method} |" in "".join(table) for method in METHODS)
    assert sum("**" in line for line in table) == len(METHODS)  # one best per method


def test_the_default_backend_trains_like_the_eager_one(tmp_path: Path, data_root: Path) -> None:
    """--backend auto (here the Triton kernel in Triton's interpreter) against the eager torch path."""
    for backend in ("auto", "eager"):
        assert run(tmp_path / backend, data_root, "--epochs", "1", "--sparsity", "0.9", "--backend", backend) == 0
    auto, eager = records(tmp_path / "auto")[0], records(tmp_path / "eager")[0]
    for key in ("train_loss", "test_loss", "l1_norm"):
        assert auto[key] == pytest.approx(eager[key], rel=1e-5), key


# ---------------------------------------------------------------------------------------------- resume

def interrupted_at(call: int):
    """A Trainer.train_epoch that raises KeyboardInterrupt (as Ctrl-C would) when epoch number ``call`` starts."""
    original, calls = train_loop.Trainer.train_epoch, []

    def train_epoch(trainer: train_loop.Trainer, *args: object) -> None:
        calls.append(args)
        if len(calls) == call:
            raise KeyboardInterrupt
        original(trainer, *args)

    return train_epoch


@pytest.mark.parametrize("extra", [("--val-fraction", "0.25"), ("--cycles", "1", "--rewind", "wr"), ("--cycles", "1"),
                                   ("--target-sparsity", "off", "--alpha-update", "step", "--factor", "1.02",
                                    "--accuracy-window", "3"), ("--method", "gmp"), ("--method", "lasso")],
                         ids=["one-cycle", "wr-across-a-cycle", "lrr-across-a-cycle", "alpha-per-step", "gmp", "lasso"])
def test_resume_equals_an_uninterrupted_run(tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch,
                                            extra: tuple[str, ...]) -> None:
    args = ("--method", "pilot", "--sparsity", "0.9", "--target-sparsity", "0.8", *extra)
    assert run(tmp_path / "whole", data_root, *args) == 0
    stop_at = 3 if "--cycles" in extra else 2  # in the second cycle / in the second epoch
    with monkeypatch.context() as patch:
        patch.setattr(train_loop.Trainer, "train_epoch", interrupted_at(stop_at))
        assert run(tmp_path / "stopped", data_root, *args) == 130
    assert len(records(tmp_path / "stopped")) == stop_at - 1
    assert main(["--out", str(tmp_path / "stopped"), "--resume", "--no-progress", "--backend", "eager"]) == 0
    whole, resumed = final_state(tmp_path / "whole"), final_state(tmp_path / "stopped")
    assert_states_equal(whole["model"], resumed["model"], "model")
    assert_states_equal(whole["method"]["optimizer"]["state"], resumed["method"]["optimizer"]["state"], "optimizer")
    assert_states_equal({k: v for k, v in whole["method"].items() if k != "optimizer"},
                        {k: v for k, v in resumed["method"].items() if k != "optimizer"}, "schedules")
    if "--cycles" in extra:  # the second cycle trains with 20% of the weights pruned, and they stay pruned
        assert records(tmp_path / "whole")[-1]["density"] == pytest.approx(0.8, abs=1e-4)
    strip = ("seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in strip} for r in records(tmp_path / "whole")] == \
           [{k: v for k, v in r.items() if k not in strip} for r in records(tmp_path / "stopped")]


# ---------------------------------------------------------------------------------------------- run directory

def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("old")

    def crash(file: object) -> None:
        file.write("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash, binary=False)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    atomic_write(path, lambda file: file.write("new"), binary=False)
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]



def test_an_existing_run_is_never_overwritten_silently(tmp_path: Path, data_root: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert run(out, data_root, "--method", "dense", "--epochs", "1", "--sparsity", "0.5") == 0
    summary = (out / "summary.json").read_bytes()
    assert run(out, data_root, "--method", "dense", "--epochs", "1", "--sparsity", "0.5") == 1
    assert "already holds a run (finished)" in capsys.readouterr().err
    assert main(["--out", str(out), "--resume", "--lr", "0.5", "--no-progress"]) == 1
    assert "lr: 0.1 -> 0.5" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == summary
    # Resuming a finished run redoes only the end (pruning, curve, plots, summary).
    assert main(["--out", str(out), "--resume", "--no-progress"]) == 0
    assert len(records(out)) == 1
    assert run(out, data_root, "--method", "dense", "--epochs", "1", "--lr", "0.05", "--overwrite",
               "--sparsity", "0.5") == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 0.05
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    assert run(tmp_path / "notes", data_root, "--method", "dense") == 1
    assert "is not empty" in capsys.readouterr().err


def test_missing_and_corrupt_datasets_give_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    assert main(["--data", "cifar10", "--data-root", str(missing), "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert "cannot load --data cifar10" in error and str(missing) in error
    corrupt = write_fashion_mnist(tmp_path / "corrupt")
    raw = bytearray((corrupt / "train-images-idx3-ubyte").read_bytes())
    raw[:4] = (1234).to_bytes(4, "big")
    (corrupt / "train-images-idx3-ubyte").write_bytes(bytes(raw))
    assert main(["--data-root", str(corrupt), "--out", str(tmp_path / "b"), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert "wrong idx magic number 1234" in error and "Traceback" not in error


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--sparsity", "1.0"], "--sparsity: must be in (0, 1)"),
    (["--method", "dense", "--alpha", "1e-4"], "--alpha applies to --method pilot/spred"),
    (["--method", "spred", "--beta", "1"], "--beta applies to --method pilot"),
    (["--rewind", "wr"], "apply to iterative pruning"),
    (["--warmup-epochs", "10"], "--warmup-epochs (10) must be smaller than --epochs (10)"),
    (["--bf16", "--device", "cpu"], "--bf16 autocast needs a CUDA device"),
    (["--resume", "--overwrite"], "not allowed with argument"),
])
def test_invalid_arguments_are_rejected_with_a_message(args: list[str], message: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_train_pilot_on_fashion_mnist() -> None:
    config, explicit = parse_config([])
    assert (config.method, config.data, config.model, config.epochs) == ("pilot", "fashion-mnist", "lenet300-100", 10)
    # To the recipe's target, alpha steered from the recipe's integral by pilot's extension of Algorithm 1
    assert (config.target_sparsity, config.alpha_schedule, config.beta) == (0.95, "algorithm1", 1.0)
    assert config.alpha is None and config.strength_integral > 0 and config.factor is None
    assert 0.95 in config.sparsity
    assert (config.augment, config.bn_recalibration) == (False, 0)
    assert explicit == frozenset()
    spred, explicit = parse_config(["--method", "spred", "--lr", "0.05"])
    assert (spred.beta, spred.factor, spred.alpha_schedule, spred.out) == (
        0.0, None, "constant", "runs/spred-lenet300-100-fashion-mnist-seed0")
    assert explicit == {"method", "lr"}
    algorithm1, _ = parse_config(["--target-sparsity", "off"])
    assert (algorithm1.target_sparsity, algorithm1.alpha_update, algorithm1.sparsity_signal) == (
        None, "step", "effective-density")
    assert algorithm1.alpha > 0 and algorithm1.factor > 1 and algorithm1.strength_integral is None


@pytest.mark.parametrize("args, expected", [
    (["--method", "pilot", "--alpha-schedule", "constant"], ("pilot", 1.0, "constant")),
    (["--method", "spred", "--alpha-schedule", "algorithm1"], ("spred", 0.0, "algorithm1")),
])
def test_the_ablations_cross_the_init_with_the_schedule(args: list[str], expected: tuple) -> None:
    config, _ = parse_config(["--data", "cifar10", *args])
    assert (config.method, config.beta, config.alpha_schedule) == expected
    assert config.target_sparsity == 0.95


def test_each_dataset_has_its_recipe() -> None:
    cifar, _ = parse_config(["--data", "cifar10"])
    assert (cifar.model, cifar.epochs, cifar.augment, cifar.warmup_epochs) == ("resnet20", 30, True, 1)
    assert cifar.bn_recalibration > 0
    explicit, _ = parse_config(["--data", "cifar10", "--no-augment", "--epochs", "3", "--bn-recalibration", "0"])
    assert (explicit.augment, explicit.epochs, explicit.warmup_epochs, explicit.bn_recalibration) == (False, 3, 1, 0)
    short, _ = parse_config(["--data", "cifar10", "--epochs", "1"])
    assert short.warmup_epochs == 0  # the recipe's warmup never takes the whole run


@pytest.mark.parametrize("args, message", [
    (["--sparsity-signal", "effective-density", "--threshold", "0.1", "--threshold-absolute"], "effective-density thresholds"),
    (["--alpha-update", "epoch", "--accuracy-window", "10"], "--accuracy-window applies to --alpha-update step"),
    (["--method", "spred", "--alpha-update", "step"], "with --alpha-schedule constant they do not apply"),
    (["--method", "lasso", "--alpha-update", "step"], "--alpha-update applies to --method pilot/spred"),
    (["--threshold-absolute"], "--threshold-absolute needs --threshold"),
    (["--method", "lasso", "--alpha-schedule", "constant"], "--alpha-schedule applies to --method pilot/spred"),
])
def test_invalid_schedule_arguments(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--target-sparsity", "off", *args])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "gmp", "--target-sparsity", "off"], "--method gmp prunes along the course"),
    (["--method", "dense", "--target-sparsity", "0.9"], "--target-sparsity applies to the sparsifying methods"),
    (["--factor", "1.2"], "--factor set Algorithm 1 without a target"),
    (["--method", "pilot", "--alpha-schedule", "constant", "--target-sparsity", "off", "--threshold", "0.1"],
     "--alpha-schedule constant"),
    (["--target-sparsity", "1"], "must be in (0, 1)"),
    (["--target-sparsity", "most"], "expected a number"),
])
def test_invalid_target_arguments(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_config(args)
    assert message in capsys.readouterr().err


def test_configurations_of_earlier_versions_still_load() -> None:
    # What a configuration without these keys implied: Algorithm 1 per epoch on the L1 norm.
    current, _ = parse_config(["--threshold", "0.02", "--alpha-update", "epoch", "--sparsity-signal", "l1",
                               "--target-sparsity", "off"])
    saved = current.to_json()
    for key in ("sparsity_signal", "alpha_update", "accuracy_window", "bn_recalibration", "prune_criterion", "curve",
                "target_sparsity", "strength_integral", "alpha_schedule"):
        del saved[key]
    saved["l1_threshold"], saved["l1_threshold_absolute"] = saved.pop("threshold"), saved.pop("threshold_absolute")
    assert Config.from_json(saved) == current
    effective_density, _ = parse_config(["--sparsity-signal", "effective-density", "--threshold", "0.2",
                                         "--target-sparsity", "off"])
    saved = effective_density.to_json()
    saved["signal"] = saved.pop("sparsity_signal")  # its name before torchrun's --signals-to-handle forced a rename
    assert Config.from_json(saved) == effective_density


def test_algorithm_1_per_optimizer_step(tmp_path: Path, data_root: Path) -> None:
    """With --alpha-update step alpha moves by the factor after every step: T counts steps, and its last value
    is alpha0 * factor^(grows - shrinks) over the 2 x 10 steps of the run."""
    out = tmp_path / "run"
    assert run(out, data_root, "--target-sparsity", "off", "--alpha-update", "step", "--factor", "1.05",
               "--alpha", "1e-3", "--sparsity", "0.5") == 0
    schedule = final_state(out)["method"]["alpha_schedule"]
    steps = 2 * math.ceil(TRAIN_SIZE / 32)
    assert schedule["k"] == steps and schedule["total"] == steps
    exponent = math.log(schedule["last_alpha"][0] / 1e-3) / math.log(1.05)
    assert exponent == pytest.approx(round(exponent), abs=1e-6) and abs(exponent) <= steps
    assert exponent <= 0  # the second half always shrinks, so at most as many grows as shrinks
    per_epoch = records(out)
    assert per_epoch[0]["alpha"] == 1e-3 and per_epoch[1]["alpha"] != 1e-3  # changed within the first epoch


@pytest.mark.parametrize("method, key", [("spred", "alpha"), ("dense", "weight_decay"), ("lasso", "lasso_lambda")])
def test_regularisation_integral_is_the_sum_of_lr_times_strength(tmp_path: Path, data_root: Path, method: str,
                                                                  key: str) -> None:
    out = tmp_path / method
    assert run(out, data_root, "--method", method, "--sparsity", "0.5", "--warmup-epochs", "1",
               *(["--target-sparsity", "off"] if method != "dense" else [])) == 0
    config = Config.from_json(json.loads((out / "config.json").read_text()))
    steps_per_epoch = math.ceil(TRAIN_SIZE / 32)
    multiplier = lr_multiplier(config, steps_per_epoch)
    strength = config.weight_decay if key == "weight_decay" else getattr(config, key)
    for record in records(out):
        expected = sum(config.lr * multiplier(step) for step in range(record["epoch"] * steps_per_epoch)) * strength
        assert record["regularisation_integral"] == pytest.approx(expected, rel=1e-9)
        assert 0 < record["effective_density"] <= 1.6


def test_batchnorm_recalibration_and_per_layer_density(tmp_path: Path, data_root: Path) -> None:
    """A model with BatchNorm: the summary reports every accuracy with and without recalibration, the pruned
    models carry the recalibrated statistics, and resuming the finished run evaluates it again with new settings."""
    out = tmp_path / "run"
    assert run(out, data_root, "--model", "resnet20", "--epochs", "1", "--sparsity", "0.5", "0.9",
               "--bn-recalibration", "2", "--target-sparsity", "0.9") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bn_recalibration_batches"] == 2
    assert {"test_accuracy", "test_accuracy_bn"} <= summary["final"].keys()
    for row in summary["pruned"] + summary["one_shot"]:
        assert 0 <= row["test_accuracy_bn"] <= 1 and 0 <= row["test_accuracy"] <= 1
    pruned = torch.load(out / "pruned-90.pt", weights_only=True)
    trained = final_state(out)["model"]
    assert pruned["bn_recalibration_batches"] == 2
    assert not torch.equal(pruned["state_dict"]["bn1.running_mean"], trained["bn1.running_mean"])
    assert (out / "layer_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layers = summary["pruned"][1]["layers"]
    assert len(layers) == 20 and sum(layer["zeros"] for layer in layers) == round(
        0.9 * sum(layer["total"] for layer in layers))
    # The per-layer statistics of the same run agree with the summary's per-layer densities.
    stats = layer_rows(out, 0.9)
    assert [row["layer"] + ".weight" for row in stats] == [layer["name"] for layer in layers]
    for row, layer in zip(stats, layers):
        assert row["kept (magnitude)"] == pytest.approx(1 - layer["zeros"] / layer["total"])
        assert 0 <= row["L1 regime"] <= 1 and row["a median"] > 0
    assert stats[0]["bn fold"] is not None and stats[-1]["bn fold"] is None  # conv1 -> bn1; fc has none
    assert main(["--out", str(out), "--resume", "--no-progress", "--bn-recalibration", "0", "--no-curve"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["bn_recalibration_batches"] == 0 and "test_accuracy_bn" not in again["pruned"][0]
    assert json.loads((out / "config.json").read_text())["bn_recalibration"] == 0
    assert [row["target_sparsity"] for row in again["one_shot"]] == [0.5, 0.9]  # --no-curve: the targets only
    assert [row["test_accuracy"] for row in again["one_shot"]] == [row["test_accuracy"] for row in summary["one_shot"]
                                                                   if row["target_sparsity"] in (0.5, 0.9)]


def test_recalibration_batches_repeat_and_leave_the_run_rng_alone(data_root: Path) -> None:
    config, _ = parse_config(["--data-root", str(data_root), "--augment", "--bn-recalibration", "3",
                              "--batch-size", "16", "--val-fraction", "0.25"])
    data = load_data(config)
    state = torch.get_rng_state()
    first, second = list(data.recalibration), list(data.recalibration)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    # Augmented like training (random crops of the same images differ from the plain images) and drawn from the
    # training examples only, never from the validation split.
    recalibration_set = data.recalibration.loader.dataset
    plain = torch.stack([data.eval["val"].dataset.dataset[i][0] for i in recalibration_set.indices[:16]])
    assert not torch.equal(first[0][0], plain)
    assert not set(recalibration_set.indices) & set(data.eval["val"].dataset.indices)


def test_learning_rate_schedules() -> None:
    def multipliers(*args: str) -> list[float]:
        config, _ = parse_config(["--epochs", "4", *args])
        schedule = lr_multiplier(config, steps_per_epoch=2)
        return [schedule(step) for step in range(8)]

    cosine = multipliers("--warmup-epochs", "1")
    assert cosine[:2] == [0.5, 1.0] and cosine[2] == 1.0 and cosine[2:] == sorted(cosine[2:], reverse=True)
    assert cosine[-1] > 0
    assert multipliers("--lr-schedule", "step", "--milestones", "1", "3", "--warmup-epochs", "0") == pytest.approx(
        [1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01])
    assert multipliers("--lr-schedule", "step", "--warmup-epochs", "0") == pytest.approx(
        [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_torch_cuda_home_notice_is_dropped_and_nothing_else() -> None:
    """python -m pilot.train drops torch's "No CUDA runtime is found" record (on every GPU-less machine with a
    CUDA toolkit) at its logger; the logger's other records still show."""
    import logging

    from pilot.quiet import drop_cuda_home_notice

    class Kept(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger = logging.getLogger("torch.utils.cpp_extension")
    kept = Kept()
    logger.addHandler(kept)
    try:
        drop_cuda_home_notice()
        logger.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        logger.warning("something that matters")
    finally:
        logger.removeHandler(kept)
    assert kept.messages == ["something that matters"]
