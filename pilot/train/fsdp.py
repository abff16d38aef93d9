"""``--fsdp``: the model sharded with FSDP2 (``fully_shard``) over the processes of a torchrun job, for models whose
training state (weights, gradients, and FusedPILoTSGD's factors m, w and two momentum buffers) does not fit one
device. Each rank holds its shard of every parameter and of its optimizer state; a layer's whole weights exist only
during its forward and backward.

What changes against DDP (:mod:`pilot.train.distributed`), and why:

- the parameters are DTensors, and FusedPILoTSGD steps each rank's shard (``pilot.sharding``);
- every forward pass gathers parameters with the other ranks, so evaluation runs as many batches on every rank
  (:class:`LockstepBatches`);
- checkpoints are torch.distributed.checkpoint (DCP) directories, every rank writing its shards
  (:class:`ShardedCheckpoint`), which DCP can load into another number of ranks;
- the end of the run (one-shot pruning, which ranks all the weights at once, BN recalibration, the pruned models)
  works on the whole trained weights: :func:`gather_full_model` gathers them into an unsharded model on every rank,
  which then finishes as under DDP. That needs a few copies of the weights (the trained model, a pruned copy), but
  not their optimizer state, to fit one device.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock, Bottleneck

from pilot.atomic import published_directory, replace_directory
from pilot.models import BasicBlock

from .distributed import Distributed
from .rundir import read_torch, save_torch

__all__ = ["SHARDED_UNITS", "LockstepBatches", "ShardedCheckpoint", "gather_full_model", "lockstep_loaders",
           "shard_model_"]

# The modules sharded as units of their own (their parameters gathered together, for their forward and backward
# only): the residual blocks of the ResNets and every linear layer (LeNet-300-100's layers, the classifiers). The
# rest (a ResNet's stem) belongs to the root's unit.
SHARDED_UNITS = (BasicBlock, TorchvisionBasicBlock, Bottleneck, nn.Linear)
# Rank 0's part of a sharded checkpoint: the trainer's state other than the model's and the optimizer's.
TRAINER_STATE = "trainer.pt"


def shard_model_(model: nn.Module, world_size: int, device: torch.device) -> nn.Module:
    """Shard ``model`` (on ``device``, the same initial weights on every rank) in place over ``world_size`` ranks:
    each of its :data:`SHARDED_UNITS` is one FSDP2 unit, the root another. Returns the model, whose parameters are
    now DTensors: build the optimizer afterwards."""
    mesh = init_device_mesh(device.type, (world_size,))
    # Innermost first: fully_shard takes the parameters that no unit inside the module has taken.
    for module in reversed(list(model.modules())):
        if isinstance(module, SHARDED_UNITS) and module is not model:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gather_full_model(sharded: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """An unsharded copy of ``sharded`` on every rank: ``build()`` (the same architecture, unsharded, on this rank's
    device) loaded with the whole weights and buffers, all-gathered from the shards. A collective."""
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    model = build()
    model.load_state_dict(state)
    return model


class LockstepBatches:
    """The batches of ``loader`` (a rank's shard of an evaluation split), then empty batches (its last batch's first
    0 examples) up to ``length`` in all: under FSDP each forward pass gathers parameters with the other ranks, so a
    rank whose shard has fewer batches than another's must run as many passes. Empty batches add nothing to the
    loss and accuracy sums."""

    def __init__(self, loader: DataLoader, length: int) -> None:
        if length < len(loader):
            raise ValueError(f"length {length} is shorter than the loader's {len(loader)} batches")
        self.loader, self.length = loader, length

    @property
    def dataset(self) -> Any:
        """The shard's examples (what the reduced metrics count)."""
        return self.loader.dataset

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        last = None
        for last in self.loader:
            yield last
        for _ in range(self.length - len(self.loader)):
            yield tuple(tensor[:0] for tensor in last)


def lockstep_loaders(loaders: dict[str, DataLoader], place: Distributed, device: torch.device
                     ) -> dict[str, LockstepBatches]:
    """Every split's loader as :class:`LockstepBatches` as long as the longest rank's. A collective."""
    lengths = place.all_reduce_max([len(loader) for loader in loaders.values()], device)
    return {split: LockstepBatches(loader, int(length)) for (split, loader), length in zip(loaders.items(), lengths)}


class ShardedCheckpoint:
    """The checkpoint of an ``--fsdp`` run: the directory ``path``, written with torch.distributed.checkpoint (every
    rank its shards of the model's and the optimizer's state) plus :data:`TRAINER_STATE` (rank 0: schedules,
    progress, RNG states). DCP loads it into any number of ranks, resharding.

    Every rank writes into ``<path>.tmp``; once all have written, rank 0 renames it to ``path``
    (:func:`pilot.atomic.replace_directory`), so that a crash at any moment leaves one complete checkpoint. Every
    rank reads and writes the directory itself: with several nodes it must be on a file system they share.
    """

    def __init__(self, path: Path, place: Distributed) -> None:
        self.path, self.place = Path(path), place
        self.staging = self.path.with_name(self.path.name + ".tmp")

    def save(self, model: nn.Module, optimizer: Optimizer, trainer_state: Optional[dict[str, Any]]) -> None:
        """Write the checkpoint; ``trainer_state`` is rank 0's (the other ranks pass None). A collective."""
        def clear_staging() -> None:  # the leftovers of a save that was interrupted
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)

        self.place.from_main(clear_staging)
        dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=self.staging)
        if self.place.is_main:
            save_torch(trainer_state, self.staging / TRAINER_STATE)
        self.place.barrier()  # every rank's shards are written
        self.place.from_main(lambda: replace_directory(self.staging, self.path))

    def read_trainer_state(self) -> Optional[dict[str, Any]]:
        """Rank 0's :data:`TRAINER_STATE` on every rank, or None before the first checkpoint. A collective."""
        def read() -> Optional[dict[str, Any]]:
            directory = published_directory(self.path)
            return None if directory is None else read_torch(directory / TRAINER_STATE)

        return self.place.from_main(read)

    def load(self, model: nn.Module, optimizer: Optimizer) -> None:
        """Load the model's and the optimizer's state (this rank's shards, resharded by DCP if the checkpoint was
        written by another number of ranks). The model first: FusedPILoTSGD then sets its weights to m * w."""
        directory = self.place.from_main(lambda: published_directory(self.path))
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=directory)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
