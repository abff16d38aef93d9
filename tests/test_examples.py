"""examples/: the Lightning and Hugging Face Trainer examples train for a few steps on tiny synthetic data (CPU).

Each test runs the example's ``main`` with its command-line flags, then checks from the outside what the example
promises: the factors m, w moved away from their initial values (recomputed here from the same seed), the alpha
schedule stepped once per epoch, and pruning reached its target exactly, in the model and in what was exported.
Needs the ``examples`` extra (``pip install -e ".[examples]"``, which CI installs).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from pilot import factorise, is_factorised, sparsity_report

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MOVED = 1e-4  # smallest change of a kept factor that counts as trained (the init's factors are O(0.01..1))


def load_example(name: str, requires: str) -> ModuleType:
    pytest.importorskip(requires, reason=f"examples/{name}.py needs {requires}: pip install -e '.[examples]'")
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def assert_trained_factors(optimizer: torch.optim.Optimizer, initial: dict[str, torch.Tensor],
                           names: dict[torch.Tensor, str], beta: float) -> None:
    """Every factorised weight's kept (non-zero) entries have m, w away from factorise(initial weight)."""
    checked = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "m" not in state:
                continue
            m0, w0 = factorise(initial[names[p]], beta)
            kept = p.detach() != 0
            assert kept.any(), names[p]
            moved = torch.maximum((state["m"] - m0).abs(), (state["w"] - w0).abs())[kept]
            assert moved.max() > MOVED, f"{names[p]}: factors did not move in training"
            checked += 1
    assert checked > 0, "no factorised parameter"


def test_lightning_example_trains_the_factors_and_prunes_to_the_target(tmp_path: Path) -> None:
    example = load_example("lightning_pilot", "lightning")
    epochs, sparsity = 2, 0.9
    trainer, module = example.main(["--synthetic", "128", "--batch-size", "64", "--epochs", str(epochs),
                                    "--sparsity", str(sparsity), "--out", str(tmp_path), "--quiet"])

    torch.manual_seed(0)  # what lightning.seed_everything(0) left before the example built its model
    initial = example.build_model("lenet300-100", num_classes=10, in_channels=1, input_size=28).state_dict()
    optimizer = trainer.optimizers[0]
    names = {p: name for name, p in module.model.named_parameters()}
    assert_trained_factors(optimizer, initial, names, beta=module.hparams.beta)

    alpha_schedule = next(c for c in trainer.callbacks if isinstance(c, example.AlphaSchedule))
    alpha = module.hparams.alpha  # Algorithm 1 over 2 epochs: grows after the first (accuracy >= 0, the L1 norm
    assert alpha_schedule.alphas == [alpha * 2, alpha]  # above 1% of its start), decays in the second half
    assert optimizer.param_groups[0]["lr"] < module.hparams.lr  # the cosine LR schedule stepped

    report = sparsity_report(module.model)
    assert report.zeros == round(sparsity * report.total)
    saved = torch.load(tmp_path / "pruned.pt")
    fresh = example.build_model("lenet300-100", num_classes=10, in_channels=1, input_size=28)
    fresh.load_state_dict(saved["state_dict"])
    assert sparsity_report(fresh).zeros == report.zeros
    assert all(torch.equal(saved["masks"][f"{name}_mask"] == 0, fresh.get_parameter(name) == 0)
               for name in (layer.name for layer in report.layers))
    assert 0 <= float(trainer.callback_metrics["test_accuracy"]) <= 1  # trainer.test ran on the pruned model


def test_hf_trainer_example_trains_the_factors_and_prunes_to_the_target(tmp_path: Path) -> None:
    example = load_example("hf_trainer_pilot", "transformers")
    epochs, sparsity, length, vocab = 2, 0.8, 16, 64
    trainer, optimizer, alpha_schedule = example.main([
        "--examples", "64", "--length", str(length), "--vocab-size", str(vocab), "--batch-size", "32",
        "--epochs", str(epochs), "--sparsity", str(sparsity), "--out", str(tmp_path), "--quiet"])

    torch.manual_seed(0)  # the example's --seed, set before it builds the model
    initial = example.build_model(vocab, length).state_dict()
    model = trainer.model
    names = {p: name for name, p in model.named_parameters()}
    assert_trained_factors(optimizer, initial, names, beta=1.0)
    factorised = {names[p] for p in optimizer.state if is_factorised(optimizer, p)}
    assert factorised == {name for name, p in model.named_parameters() if example.is_prunable(name, p)}

    alpha = optimizer.defaults["alpha"]  # Algorithm 1 over 2 epochs: grows once, then decays in the second half
    assert [a for _, a in alpha_schedule.history] == [alpha * 2, alpha]
    assert all(0 <= accuracy <= 1 for accuracy, _ in alpha_schedule.history)
    assert trainer.lr_scheduler.get_last_lr()[0] < optimizer.defaults["lr"]  # our cosine schedule stepped

    report = sparsity_report(model, example.is_prunable)
    assert report.zeros == round(sparsity * report.total)
    reloaded = type(model).from_pretrained(tmp_path)  # what trainer.save_model wrote: the exact zeros
    assert sparsity_report(reloaded, example.is_prunable).zeros == report.zeros
    masks = torch.load(tmp_path / "masks.pt")
    assert sorted(masks) == sorted(f"{layer.name}_mask" for layer in report.layers)
