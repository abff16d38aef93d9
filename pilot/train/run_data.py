"""What a run trains and evaluates on: :func:`load_data` builds the loaders of a configuration (the train split,
a fixed validation split with --val-fraction, the test split, and the BatchNorm recalibration batches)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Subset

from pilot.data import DatasetBundle, load_datasets, make_loaders
from pilot.data.loaders import eval_loader

from .config import Config
from .distributed import SINGLE, Distributed
from .fsdp import LockstepBatches, lockstep_loaders
from .rundir import RunError

# Seed of the train/validation split: fixed, so that every run (and every seed) holds out the same examples.
VALIDATION_SPLIT_SEED = 0
# Seed of the choice of the BatchNorm recalibration examples: fixed, so every level and every method sees the same.
RECALIBRATION_SEED = 1

@dataclass
class Data:
    bundle: DatasetBundle
    train: DataLoader
    # "val" (with --val-fraction) and "test", evaluated after every epoch
    eval: dict[str, Union[DataLoader, LockstepBatches]]
    # --bn-recalibration batches of training examples, augmented as in training, the same batches on every pass
    recalibration: Optional["SameBatches"] = None


class SameBatches:
    """Iterating yields the same batches every time: ``loader`` (no shuffling) runs under a copy of the RNG state
    seeded with ``seed``, so its random augmentation repeats, and the run's own RNG state is left untouched."""

    def __init__(self, loader: DataLoader, seed: int) -> None:
        self.loader, self.seed = loader, seed

    def __iter__(self) -> Iterator[Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            yield from self.loader


def load_data(config: Config, place: Distributed = SINGLE) -> Data:
    """The loaders of ``config.data``; with ``val_fraction`` a fixed part of the train split becomes ``val``;
    with ``bn_recalibration`` a fixed sample of the (remaining) training examples recalibrates BatchNorm.
    In a distributed run the train and evaluation loaders are ``place``'s shards (under --fsdp padded so that every
    rank evaluates as many batches); every rank recalibrates on all the recalibration batches (so every rank's
    BatchNorm statistics come out the same).

    The recalibration batches are augmented as in training: the running statistics the network was trained with
    describe augmented inputs (measured on ResNet-20 / CIFAR-10, un-augmented recalibration batches cost 1-1.5
    points of validation accuracy at 0-98% sparsity against augmented ones, docs/study/2026-11-fixed-strength.md)."""
    try:
        bundle = load_datasets(config.data, config.data_root, augment=config.augment, limit=config.limit)
        unaugmented = bundle
        if config.augment and config.val_fraction:
            unaugmented = load_datasets(config.data, config.data_root, augment=False, limit=config.limit)
    except (FileNotFoundError, ValueError) as error:
        raise RunError(f"cannot load --data {config.data}: {error}") from error
    held_out = None
    train_indices = list(range(len(bundle.train)))
    full_train = bundle.train
    if config.val_fraction:
        size = len(bundle.train)
        held = round(config.val_fraction * size)
        if not 0 < held < size:
            raise RunError(f"--val-fraction {config.val_fraction} holds out {held} of {size} training examples; "
                           "need at least one for each side")
        order = torch.randperm(size, generator=torch.Generator().manual_seed(VALIDATION_SPLIT_SEED))
        # The validation examples come from the un-augmented copy: they are evaluated like the test split.
        held_out = Subset(unaugmented.train, order[:held].sort().values.tolist())
        train_indices = order[held:].sort().values.tolist()
        bundle = dataclasses.replace(bundle, train=Subset(bundle.train, train_indices))
    recalibration = None
    if config.bn_recalibration:
        wanted = min(config.bn_recalibration * config.batch_size, len(train_indices))
        chosen = torch.randperm(len(train_indices), generator=torch.Generator().manual_seed(RECALIBRATION_SEED))
        recalibration = SameBatches(DataLoader(Subset(full_train, [train_indices[i] for i in chosen[:wanted].tolist()]),
                                               batch_size=config.batch_size, shuffle=False,
                                               num_workers=config.workers,
                                               pin_memory=torch.device(config.device).type == "cuda"),
                                    RECALIBRATION_SEED)
    try:
        train_loader, test_loader = make_loaders(bundle, config.batch_size, num_workers=config.workers,
                                                 seed=config.seed, device=config.device, rank=place.rank,
                                                 world_size=place.world_size)
        eval_loaders = {"test": test_loader}
        if held_out is not None:
            eval_loaders = {"val": eval_loader(held_out, test_loader.batch_size, num_workers=test_loader.num_workers,
                                               pin_memory=test_loader.pin_memory, rank=place.rank,
                                               world_size=place.world_size), **eval_loaders}
    except ValueError as error:
        raise RunError(f"--data {config.data}: {error}; use fewer processes or more examples") from error
    if config.fsdp:
        eval_loaders = lockstep_loaders(eval_loaders, place, torch.device(config.device))
    return Data(bundle, train_loader, eval_loaders, recalibration)
