"""PILoT in the Hugging Face ``Trainer``: FusedPILoTSGD through ``optimizers=(optimizer, scheduler)``, the alpha
schedule as a ``TrainerCallback``, pruning and export after training.

    pip install -e ".[examples]"
    python examples/hf_trainer_pilot.py                   # a small BERT built from a config on synthetic sequences
    python examples/hf_trainer_pilot.py --epochs 2 --sparsity 0.9

The model is built from a ``BertConfig`` (no download) and classifies synthetic token sequences by topic.
What goes where:

* The optimizer is built before the ``Trainer`` and handed to it with its LR scheduler. Two param groups: the
  encoder's and the classifier's matrices are factorised (x = m * w, prunable); embeddings, LayerNorms and biases
  are trained as by ``torch.optim.SGD`` (``reparam=False``).
* :class:`AlphaScheduleCallback` runs PILoT's Algorithm 1 (:class:`pilot.PILoTSchedule`) at every epoch end. The
  ``Trainer`` measures no training accuracy, so the callback measures it on the training data it is handed.
* After ``trainer.train()``, :func:`pilot.prune_` prunes through the optimizer (pruned entries are a fixed point of
  its step); ``trainer.save_model`` then saves the exact zeros and ``masks.pt`` the masks.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import (BertConfig, BertForSequenceClassification, EvalPrediction, Trainer, TrainerCallback,
                          TrainerControl, TrainerState, TrainingArguments, get_cosine_schedule_with_warmup)

from pilot import FusedPILoTSGD, PILoTSchedule, export_masks, prune_, sparsity_report

CLASSES = 4
PAD = 0
NOISE = 0.5  # fraction of the tokens drawn from the whole vocabulary instead of the sequence's class


class TopicSequences(Dataset):
    """Token sequences of ``CLASSES`` topics: each token comes from its topic's share of the vocabulary, or with
    probability ``NOISE`` from the whole vocabulary. Learnable in a few epochs; no download."""

    def __init__(self, size: int, length: int, vocab_size: int, seed: int) -> None:
        if vocab_size < CLASSES + 1:
            raise ValueError(f"vocab_size must be at least {CLASSES + 1} (padding and one token per topic), "
                             f"got {vocab_size}")
        generator = torch.Generator().manual_seed(seed)
        share = (vocab_size - 1) // CLASSES  # token 0 is padding
        self.labels = torch.randint(0, CLASSES, (size,), generator=generator)
        topical = 1 + self.labels[:, None] * share + torch.randint(0, share, (size, length), generator=generator)
        anything = torch.randint(1, vocab_size, (size, length), generator=generator)
        self.input_ids = torch.where(torch.rand(size, length, generator=generator) < NOISE, anything, topical)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": self.labels[index]}


def build_model(vocab_size: int, length: int) -> BertForSequenceClassification:
    """A two-layer BERT from a config: about 60k parameters, random init."""
    config = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=length, num_labels=CLASSES,
                        pad_token_id=PAD)
    return BertForSequenceClassification(config)


def is_prunable(name: str, parameter: torch.Tensor) -> bool:
    """The encoder's and classifier's matrices; the embeddings are looked up, not multiplied, and stay dense."""
    return parameter.ndim >= 2 and "embeddings" not in name


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    named = list(model.named_parameters())
    return [{"params": [p for name, p in named if is_prunable(name, p)], "reparam": True},
            {"params": [p for name, p in named if not is_prunable(name, p)], "reparam": False}]


@torch.no_grad()
def accuracy_on(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Fraction of correctly classified examples over ``batches`` (eval mode; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    model.train(was_training)
    return correct / total


class AlphaScheduleCallback(TrainerCallback):
    """PILoT's dynamic alpha (Algorithm 1) at every epoch end, on the training accuracy after that epoch.

    Takes the FusedPILoTSGD itself (the ``Trainer`` hands callbacks its accelerate wrapper). The accuracy costs one
    forward pass over the training data per epoch. ``history`` holds (accuracy, alpha) after every epoch.
    """

    def __init__(self, optimizer: FusedPILoTSGD, *, factor: float = 2.0, threshold: float = 0.01) -> None:
        self.optimizer, self.factor, self.threshold = optimizer, factor, threshold
        self.schedule: Optional[PILoTSchedule] = None
        self.history: list[tuple[float, float]] = []

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.schedule = PILoTSchedule(self.optimizer, factor=self.factor, threshold=self.threshold,
                                      relative_threshold=True, total=math.ceil(args.num_train_epochs))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                     model: nn.Module, train_dataloader: Iterable[dict[str, torch.Tensor]], **kwargs: Any) -> None:
        accuracy = accuracy_on(model, train_dataloader)
        self.history.append((accuracy, self.schedule.step(accuracy)[0]))


def compute_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2048, help="training sequences (and a quarter as many "
                                                                   "test sequences)")
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=1e-3, help="initial alpha (PILoTSchedule changes it)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="fraction of the factorised weights pruned")
    parser.add_argument("--out", type=Path, default=Path("runs/hf-trainer-pilot"),
                        help="where the pruned model (model.safetensors, config.json) and masks.pt go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto",
                        help="FusedPILoTSGD's step: auto (the Triton kernel on CUDA, torch.compile on CPU) or eager "
                             "(no compile time: quicker for a few steps of a small model on a CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> tuple[Trainer, FusedPILoTSGD, AlphaScheduleCallback]:
    """Train, prune, evaluate and save; returns the trainer, the optimizer and the alpha callback."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # the model's init
    train = TopicSequences(args.examples, args.length, args.vocab_size, seed=args.seed)
    test = TopicSequences(max(1, args.examples // 4), args.length, args.vocab_size, seed=args.seed + 1)
    model = build_model(args.vocab_size, args.length)
    optimizer = FusedPILoTSGD(param_groups(model), lr=args.lr, momentum=0.9, weight_decay=0.0, alpha=args.alpha,
                              beta=1.0, backend=args.backend)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    alpha_schedule = AlphaScheduleCallback(optimizer)
    training_args = TrainingArguments(
        output_dir=str(args.out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, eval_strategy="no", save_strategy="no",
        logging_strategy="no" if args.quiet else "epoch", report_to="none", seed=args.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=args.quiet, log_level="error" if args.quiet else "passive")
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                      compute_metrics=compute_accuracy, optimizers=(optimizer, scheduler), callbacks=[alpha_schedule])
    trainer.train()
    dense_accuracy = trainer.evaluate()["eval_accuracy"]
    prune_(optimizer, args.sparsity)
    pruned_accuracy = trainer.evaluate()["eval_accuracy"]
    trainer.save_model(str(args.out))
    torch.save(export_masks(model, is_prunable), args.out / "masks.pt")
    if not args.quiet:
        print(sparsity_report(model, is_prunable).table())
        print("after each epoch (train accuracy, alpha): "
              + ", ".join(f"({a:.3f}, {alpha:.2g})" for a, alpha in alpha_schedule.history))
        print(f"test accuracy {dense_accuracy:.4f} before pruning, {pruned_accuracy:.4f} after pruning to "
              f"{args.sparsity:.0%}; saved to {args.out}")
    return trainer, optimizer, alpha_schedule


if __name__ == "__main__":
    main()
