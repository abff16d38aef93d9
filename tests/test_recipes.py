"""Recipe files of python -m pilot.train (--recipe NAME_OR_PATH): they parse, the command line overrides them,
and mistakes in them are reported with the key at fault."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from pilot.train import parse_config
from pilot.train.config import METHODS, RECIPES
from pilot.train.recipe_files import recipe_names

CPU = ("--device", "cpu", "--no-bf16")  # the ImageNet recipe's CUDA-only bf16 autocast, off


def test_the_three_settings_of_the_paper_are_shipped() -> None:
    assert recipe_names() == ["cifar10-resnet20", "cifar100-resnet18", "imagenet-resnet50"]
    for name in recipe_names():
        config, explicit = parse_config(["--recipe", name, *CPU])
        assert "recipe" not in explicit and {"data", "model", "lr"} <= explicit


def test_imagenet_recipe_is_strs_setup() -> None:
    config, _ = parse_config(["--recipe", "imagenet-resnet50", *CPU])
    assert (config.data, config.model, config.epochs, config.batch_size) == ("imagenet", "resnet50", 100, 256)
    assert (config.lr, config.lr_schedule, config.warmup_epochs) == (0.256, "cosine", 5)
    assert (config.momentum, config.nesterov, config.label_smoothing, config.conv_init) == (0.875, False, 0.1, "fan-in")
    assert config.sparsity == (0.91, 0.95, 0.982)
    # pilot and spred: no weight decay on the other parameters; the baselines keep STR's
    assert (config.method, config.weight_decay, config.alpha) == ("pilot", 0.0, 2 ** -15)
    strs, _ = parse_config(["--recipe", "imagenet-resnet50", *CPU, "--method", "str"])
    assert (strs.weight_decay, strs.alpha, strs.lr) == (2 ** -15, None, 0.256)


def test_the_cifar10_recipe_takes_the_validated_dataset_defaults() -> None:
    config, _ = parse_config(["--recipe", "cifar10-resnet20"])
    defaults = RECIPES["cifar10"]
    assert (config.epochs, config.warmup_epochs, config.augment) == (
        defaults["epochs"], defaults["warmup_epochs"], defaults["augment"])
    assert (config.target_sparsity, config.strength_integral) == (
        defaults["target_sparsity"], defaults["strength_integral"]["pilot"])
    untargeted, _ = parse_config(["--recipe", "cifar10-resnet20", "--target-sparsity", "off"])
    assert (untargeted.alpha, untargeted.factor, untargeted.threshold, untargeted.sparsity_signal) == (
        defaults["alpha"]["pilot"], defaults["factor"], defaults["threshold"], defaults["sparsity_signal"])
    spred, _ = parse_config(["--recipe", "cifar10-resnet20", "--method", "spred", "--target-sparsity", "off"])
    assert spred.alpha == defaults["alpha"]["spred"]


# Each dataset's selection in docs/results.md, written out independently: Fashion-MNIST's "selected over lr 0.1 and
# 0.3"; CIFAR-10's "The final budget F", the S selections divided by 5.6 and pilot's alpha0 rescaled once to S's
# integral. Per dataset: the arguments that choose it, then (model, epochs, augment, bn_recalibration).
SELECTIONS = {
    "fashion-mnist": ((), ("lenet300-100", 10, False, 0), {
        "dense": {"lr": 0.1, "warmup_epochs": 0},
        "pilot": {"lr": 0.3, "warmup_epochs": 1, "alpha": 5e-4, "beta": 1.0, "factor": 1.00329,
                  "alpha_update": "step", "sparsity_signal": "effective-density", "threshold": 0.1},
        "spred": {"lr": 0.3, "warmup_epochs": 1, "alpha": 6.7e-4, "beta": 0.0},
        "lasso": {"lr": 0.1, "warmup_epochs": 0, "lasso_lambda": 3e-3},
        "str": {"lr": 0.3, "warmup_epochs": 1, "str_weight_decay": 2e-2},
        "gmp": {"lr": 0.1, "warmup_epochs": 0},
    }),
    "cifar10": (("--data", "cifar10"), ("resnet20", 30, True, 20), {
        "dense": {"lr": 0.1, "warmup_epochs": 1},
        "pilot": {"lr": 0.1, "warmup_epochs": 1, "alpha": 1.3e-3, "beta": 1.0, "factor": 1.2247,
                  "alpha_update": "epoch", "sparsity_signal": "effective-density", "threshold": 0.3},
        "spred": {"lr": 0.1, "warmup_epochs": 1, "alpha": 2.2e-3, "beta": 0.0},
        "lasso": {"lr": 0.1, "warmup_epochs": 1, "lasso_lambda": 1.8e-3},
        "str": {"lr": 0.1, "warmup_epochs": 1, "str_weight_decay": 2.1e-3},
        "gmp": {"lr": 0.1, "warmup_epochs": 1},
    }),
}


@pytest.mark.parametrize("data, method", [(data, method) for data, (_, _, methods) in SELECTIONS.items()
                                          for method in sorted(methods)])
def test_defaults_are_each_methods_selection(data: str, method: str) -> None:
    arguments, setting, methods = SELECTIONS[data]
    # The selections were made with fixed strengths: without a target (gmp has none, dense takes none)
    untargeted = [] if method in ("dense", "gmp") else ["--target-sparsity", "off"]
    config, explicit = parse_config([*arguments, "--method", method, *untargeted])
    assert (config.data, config.model, config.epochs, config.augment, config.bn_recalibration) == (data, *setting)
    for key, value in methods[method].items():
        assert getattr(config, key) == value, key
    assert explicit == {"method", *(["data"] if arguments else []), *(["target_sparsity"] if untargeted else [])}


def test_per_method_recipe_values_cover_the_methods_they_apply_to() -> None:
    applies_to = {"alpha": {"pilot", "spred"}, "strength_integral": {"pilot", "spred", "lasso", "str"}}
    for data, values in RECIPES.items():
        for key, value in values.items():
            if isinstance(value, dict):
                assert set(value) == applies_to.get(key, set(METHODS)), (data, key)


def test_flags_override_per_method_defaults() -> None:
    config, _ = parse_config(["--lr", "0.05", "--warmup-epochs", "0", "--alpha-update", "epoch", "--factor", "1.5",
                              "--target-sparsity", "off"])
    assert (config.lr, config.warmup_epochs, config.alpha_update, config.factor) == (0.05, 0, "epoch", 1.5)
    lasso, _ = parse_config(["--method", "lasso", "--lr", "0.3"])
    assert (lasso.lr, lasso.warmup_epochs) == (0.3, 0)


def test_flags_override_the_recipe() -> None:
    config, explicit = parse_config(["--recipe", "imagenet-resnet50", *CPU, "--lr", "0.1", "--epochs", "3", "--warmup-epochs", "1",
                                     "--no-augment", "--sparsity", "0.5", "--weight-decay", "1e-4", "--alpha", "0.01"])
    # the target (the recipe's default) is always among the levels evaluated
    assert (config.lr, config.epochs, config.augment, config.sparsity) == (0.1, 3, False, (0.5, 0.95))
    assert (config.weight_decay, config.alpha, config.momentum) == (1e-4, 0.01, 0.875)
    assert {"lr", "momentum", "alpha"} <= explicit
    cifar100, _ = parse_config(["--recipe", "cifar100-resnet18", "--lr-schedule", "step", "--milestones", "2",
                                "--epochs", "4", "--warmup-epochs", "1"])
    assert (cifar100.milestones, cifar100.epochs, cifar100.batch_size) == ((2,), 4, 128)


def test_a_recipe_file_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('data = "cifar10"\nepochs = 7\nnesterov = true\nsparsity = [0.8, 0.9]\n'
                    'target-sparsity = "off"\n[lasso]\nlasso-lambda = 1e-4\n[pilot]\nfactor = 1.5\n')
    config, _ = parse_config(["--recipe", str(path)])
    assert (config.data, config.epochs, config.nesterov, config.sparsity, config.factor) == (
        "cifar10", 7, True, (0.8, 0.9), 1.5)
    lasso, _ = parse_config(["--recipe", str(path), "--method", "lasso", "--no-nesterov"])
    assert (lasso.lasso_lambda, lasso.factor, lasso.nesterov) == (1e-4, None, False)
    assert math.isclose(lasso.lr, 0.1)


@pytest.mark.parametrize("text, message", [
    ("batch_size = 3\n", "recipe key 'batch_size' is not an option"),
    ("out = 'x'\n", "recipe key 'out' is not an option"),
    ("augment = 1\n", "recipe key 'augment' must be true or false"),
    ("epochs = 0\n", "argument --epochs: must be >= 1, got 0"),
    ("[cifar]\nlr = 1\n", "recipe tables ['cifar'] are not methods"),
    ("lr = \n", "--recipe"),
])
def test_mistakes_in_a_recipe_name_the_key(tmp_path: Path, text: str, message: str,
                                           capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--recipe", str(path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_recipe_lists_the_shipped_ones(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--recipe", "imagenet-resnet5"])
    assert "imagenet-resnet50" in capsys.readouterr().err


def test_the_imagenet_recipe_asks_for_cuda_bf16(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--recipe", "imagenet-resnet50", "--device", "cpu"])
    assert "--bf16 autocast needs a CUDA device" in capsys.readouterr().err
