"""PILoT in PyTorch Lightning: FusedPILoTSGD from ``configure_optimizers``, the alpha schedule and pruning as callbacks.

    pip install -e ".[examples]"
    python examples/lightning_pilot.py                      # LeNet-300-100 on Fashion-MNIST, 10 epochs on a CPU
    python examples/lightning_pilot.py --data-root ROOT     # Fashion-MNIST from ROOT (torchvision's download)
    python examples/lightning_pilot.py --synthetic 2048     # random images with a learnable label, no data needed

What goes where:

* ``configure_optimizers`` returns :class:`pilot.FusedPILoTSGD` (the model stays an ordinary dense model; the
  optimizer owns the factors m, w) with a per-step cosine learning-rate schedule, as for any torch optimizer.
* :class:`AlphaSchedule` runs PILoT's Algorithm 1 (:class:`pilot.PILoTSchedule`) at the end of every training epoch,
  on the epoch's training accuracy that the module logs. It edits ``group["alpha"]`` only, so it composes with the LR
  scheduler, which edits ``group["lr"]``.
* :class:`PruneAndExport` prunes through the optimizer when training ends (:func:`pilot.prune_`: pruned entries get
  x = m = w = 0 and zero momentum, a fixed point of the step) and saves the sparse state dict with its masks
  (:func:`pilot.export_sparse`); ``trainer.test`` then measures the pruned model.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pilot import FusedPILoTSGD, PILoTSchedule, export_sparse, prune_, sparsity_report
from pilot.data import load_datasets, make_loaders
from pilot.models import build_model

TRAIN_ACCURACY = "train_accuracy"


class PILoTClassifier(L.LightningModule):
    """An image classifier trained by FusedPILoTSGD; logs the training accuracy that :class:`AlphaSchedule` reads."""

    def __init__(self, model: nn.Module, *, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 alpha: float = 1.5e-3, beta: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        # Lightning averages it over the epoch (weighted by batch size): the epoch's training accuracy.
        self.log(TRAIN_ACCURACY, (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True,
                 batch_size=len(y))
        return nn.functional.cross_entropy(logits, y)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_index: int) -> None:
        x, y = batch
        self.log("test_accuracy", (self.model(x).argmax(1) == y).float().mean(), batch_size=len(y))

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = FusedPILoTSGD(self.model.parameters(), lr=hp.lr, momentum=hp.momentum,
                                  weight_decay=hp.weight_decay, alpha=hp.alpha, beta=hp.beta, backend=hp.backend)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AlphaSchedule(L.Callback):
    """PILoT's dynamic alpha (Algorithm 1) once per training epoch, on the accuracy logged as ``monitor``.

    ``alphas`` holds the alpha after every epoch. ``total`` is the trainer's ``max_epochs``: alpha may only grow in
    the first half of training and always decays in the second, towards 0.
    """

    def __init__(self, *, factor: float = 2.0, threshold: float = 0.01, monitor: str = TRAIN_ACCURACY) -> None:
        self.factor, self.threshold, self.monitor = factor, threshold, monitor
        self.schedule: Optional[PILoTSchedule] = None
        self.alphas: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The optimizer exists from here on: Lightning calls configure_optimizers inside fit().
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError("AlphaSchedule steps once per epoch: give the Trainer max_epochs >= 1")
        self.schedule = PILoTSchedule(trainer.optimizers[0], factor=self.factor, threshold=self.threshold,
                                      relative_threshold=True, total=trainer.max_epochs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"AlphaSchedule needs the epoch's training accuracy: log it as {self.monitor!r} with "
                           f"on_epoch=True in training_step (found: {sorted(trainer.callback_metrics)})")
        self.alphas.append(self.schedule.step(float(trainer.callback_metrics[self.monitor]))[0])


class PruneAndExport(L.Callback):
    """When training ends: prune the factorised weights to ``sparsity`` through the optimizer; save the exact zeros
    and the masks to ``path`` (``{"state_dict": ..., "masks": ...}``, loadable into the dense model)."""

    def __init__(self, sparsity: float, path: Optional[Path] = None) -> None:
        self.sparsity, self.path = sparsity, path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        prune_(trainer.optimizers[0], self.sparsity)
        if self.path is not None:
            state_dict, masks = export_sparse(pl_module.model)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": state_dict, "masks": masks}, self.path)


def synthetic_loaders(examples: int, batch_size: int, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """28x28 one-channel images of 10 classes, each a fixed random pattern under noise (no download), and a test
    split a quarter that size."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (examples + examples // 4,), generator=generator)
    images = patterns[labels] + 2 * torch.randn(len(labels), 1, 28, 28, generator=generator)
    train = TensorDataset(images[:examples], labels[:examples])
    test = TensorDataset(images[examples:], labels[examples:])
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
            DataLoader(test, batch_size=batch_size))


def fashion_mnist_loaders(data_root: Optional[str], batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    # No augmentation: the setting of docs/results.md's LeNet-300-100 table.
    return make_loaders(load_datasets("fashion-mnist", data_root, augment=False), batch_size, seed=seed)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="Fashion-MNIST's directory (default: the dataset-fashion-mnist package's)")
    parser.add_argument("--synthetic", type=int, metavar="N", help="train on N random images instead")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=1.5e-3, help="initial alpha (PILoTSchedule changes it)")
    parser.add_argument("--sparsity", type=float, default=0.95, help="fraction of the weights pruned at the end")
    parser.add_argument("--out", type=Path, default=Path("runs/lightning-pilot"),
                        help="where the pruned model (pruned.pt) and Lightning's logs go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto",
                        help="FusedPILoTSGD's step: auto (the Triton kernel on CUDA, torch.compile on CPU) or eager "
                             "(no compile time: quicker for a few steps of a small model on a CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, model summary or logger")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> tuple[L.Trainer, PILoTClassifier]:
    """Train, prune, export and test; returns the trainer and the module (callbacks: ``trainer.callbacks``)."""
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=not args.quiet)
    if args.synthetic:
        train_loader, test_loader = synthetic_loaders(args.synthetic, args.batch_size, args.seed)
    else:
        train_loader, test_loader = fashion_mnist_loaders(args.data_root, args.batch_size, args.seed)
    module = PILoTClassifier(build_model("lenet300-100", num_classes=10, in_channels=1, input_size=28),
                             lr=args.lr, alpha=args.alpha, backend=args.backend)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="auto",
                        callbacks=[AlphaSchedule(), PruneAndExport(args.sparsity, args.out / "pruned.pt")],
                        default_root_dir=args.out, enable_checkpointing=False, logger=not args.quiet,
                        enable_progress_bar=not args.quiet, enable_model_summary=not args.quiet)
    trainer.fit(module, train_loader)
    trainer.test(module, test_loader, verbose=not args.quiet)
    if not args.quiet:
        print(sparsity_report(module.model).table())
        accuracy = float(trainer.callback_metrics["test_accuracy"])
        print(f"test accuracy after pruning to {args.sparsity:.0%}: {accuracy:.4f}; pruned model and masks: "
              f"{args.out / 'pruned.pt'}")
    return trainer, module


if __name__ == "__main__":
    main()
