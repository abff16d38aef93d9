"""Options of python -m pilot.train that the ImageNet recipe needs: label smoothing, Kaiming fan-in init,
channels_last; and the checks of the options that depend on the number of processes (torchrun's environment)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pilot.data import load_datasets
from pilot.models import build_model
from pilot.train import main, parse_config
from pilot.train.methods import prepare_model
import pilot.train.loop as train_loop
from test_train import TRAIN_SIZE, final_state, interrupted_at, records


def test_label_smoothing_is_the_training_loss(tmp_path: Path, data_root: Path) -> None:
    """One epoch of one batch: the recorded training loss is that of the initial weights on the whole training set,
    the smoothed cross-entropy; evaluation losses stay plain."""
    args = ["--data-root", str(data_root), "--method", "dense", "--epochs", "1", "--batch-size", str(TRAIN_SIZE),
            "--no-progress", "--sparsity", "0.5", "--no-curve", "--out", str(tmp_path / "run")]
    torch.set_num_threads(1)
    assert main([*args, "--label-smoothing", "0.2"]) == 0
    train = load_datasets("fashion-mnist", data_root, augment=False).train
    inputs = torch.stack([train[i][0] for i in range(len(train))])
    targets = torch.tensor([train[i][1] for i in range(len(train))])
    torch.manual_seed(0)
    model = build_model("lenet300-100", 10, 1, inputs.shape[-1])
    with torch.no_grad():
        logits = model(inputs)
    record = records(tmp_path / "run")[0]
    smoothed = nn.functional.cross_entropy(logits, targets, label_smoothing=0.2).item()
    assert record["train_loss"] == pytest.approx(smoothed, rel=1e-5)
    assert abs(smoothed - nn.functional.cross_entropy(logits, targets).item()) > 1e-2  # the test can tell


def test_channels_last_trains_like_the_default_layout(tmp_path: Path, data_root: Path) -> None:
    """One PILoT step of ResNet-20 on the whole training set: the update with channels_last weights and inputs is
    the default layout's, to 2% of its largest entry. CPU convolutions and BatchNorm sum in another order in that
    layout, which moves single entries by up to ~0.5% (dense SGD the same); a factor or gradient read in the wrong
    layout would be off by 100%."""
    args = ["--data-root", str(data_root), "--model", "resnet20", "--epochs", "1", "--batch-size", str(TRAIN_SIZE),
            "--no-progress", "--backend", "eager", "--sparsity", "0.5", "--no-curve", "--bn-recalibration", "0"]
    torch.set_num_threads(1)
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    assert main([*args, "--out", str(tmp_path / "channels-last"), "--channels-last"]) == 0
    default, channels_last = final_state(tmp_path / "default"), final_state(tmp_path / "channels-last")
    assert channels_last["model"]["layer1.0.conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not channels_last["model"]["layer1.0.conv1.weight"].is_contiguous()  # it was applied
    torch.manual_seed(0)
    initial = build_model("resnet20", 10, 1, default["model"]["conv1.weight"].shape[-1]).state_dict()
    for name, weight in default["model"].items():
        if weight.dtype.is_floating_point and weight.ndim == 4:
            update = weight - initial[name]
            torch.testing.assert_close(channels_last["model"][name] - initial[name], update, rtol=0,
                                       atol=0.02 * update.abs().max().item(), msg=name)


@pytest.mark.parametrize("method", ["pilot", "str"])
def test_compiled_model_trains_like_the_eager_one(method: str, tmp_path: Path, data_root: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile-model, stopped after epoch 1 and resumed: after two epochs (batches of 96, then one of 32 that
    recompiles) the weights are the eager run's to float rounding (inductor fuses elementwise ops, which reorders
    sums), and the checkpoint's keys are the model's own (no ``_orig_mod.`` prefix). STR's soft threshold runs
    inside the graph."""
    args = ["--data-root", str(data_root), "--method", method, "--epochs", "2", "--batch-size", "96", "--no-progress",
            "--sparsity", "0.5", "--no-curve"]
    compiled_modules = []
    real_compile = torch.compile

    def recording_compile(target, *positional, **options):
        if isinstance(target, nn.Module):
            compiled_modules.append(type(target).__name__)
        return real_compile(target, *positional, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch.set_num_threads(1)
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    assert compiled_modules == []
    with monkeypatch.context() as patch:
        patch.setattr(train_loop.Trainer, "train_epoch", interrupted_at(2))
        assert main([*args, "--out", str(tmp_path / "compiled"), "--compile-model"]) == 130
    # A runtime setting, like --device: each invocation says whether it compiles.
    assert main(["--out", str(tmp_path / "compiled"), "--resume", "--no-progress", "--compile-model"]) == 0
    assert compiled_modules == ["LeNet300100"] * 2  # the model, once per invocation
    eager, compiled = final_state(tmp_path / "eager")["model"], final_state(tmp_path / "compiled")["model"]
    assert eager.keys() == compiled.keys()
    for name, weight in eager.items():
        if weight.dtype.is_floating_point:
            torch.testing.assert_close(compiled[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_fan_in_init_for_the_imagenet_recipe() -> None:
    """The first convolution of ResNet-20 has 3 x 3 x 3 inputs and 16 x 3 x 3 outputs per weight: Kaiming-normal
    std sqrt(2 / 27) with fan-in, sqrt(2 / 144) with fan-out (the default)."""
    stds = {}
    for mode in ("fan-in", "fan-out"):
        config, _ = parse_config(["--conv-init", mode])
        torch.manual_seed(0)
        model = prepare_model(config, build_model("resnet20", 10), torch.device("cpu"))
        stds[mode] = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight.std().item()
    assert stds["fan-in"] == pytest.approx((2 / 27) ** 0.5, rel=0.15)
    assert stds["fan-out"] == pytest.approx((2 / 144) ** 0.5, rel=0.15)


@pytest.mark.parametrize("world_size, args, message", [
    ("3", ["--batch-size", "64"], "--batch-size is the global batch; 64 is not divisible by the 3 processes"),
    ("1", ["--sync-bn"], "--sync-bn needs several processes"),
    ("2", ["--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA devices"),
])
def test_options_that_depend_on_the_processes(world_size: str, args: list[str], message: str,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        parse_config(args)
    assert message in capsys.readouterr().err
