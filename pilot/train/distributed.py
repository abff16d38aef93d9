"""``torchrun -m pilot.train``: the process group, and the few collectives that keep the ranks' decisions equal.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous address); with WORLD_SIZE > 1 the run joins the
process group they describe (nccl on CUDA, gloo on the CPU), trains on one device per local rank under
DistributedDataParallel, and every rank computes the same decisions from the same reduced numbers:

- the training accuracy and loss are summed over the ranks before Algorithm 1 sees them;
- each rank evaluates its part of each split and the sums are reduced (exact counts);
- BatchNorm buffers, which each rank updates with its own batches, are broadcast from rank 0 at the end of each
  epoch, so evaluation, checkpoints and pruning see identical weights on every rank (DDP keeps the parameters
  equal: every rank applies the same all-reduced gradients).

Without torchrun (or with one process) :func:`current` is :data:`SINGLE`, whose collectives do nothing, and the
run is the single-process program it always was.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

__all__ = ["Distributed", "SINGLE", "current", "init"]

# How long a collective waits for the other ranks before it fails (torch's default is 30 minutes for gloo, 10 for
# nccl). torchrun ends the job as soon as a rank's process exits, so this bounds only the case of a rank that hangs
# without exiting, and a slow end-of-run evaluation of a large model must fit in it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes the run directory and logs progress."""
        return self.rank == 0

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        """The element-wise sums of ``values`` over all ranks (float64: counts stay exact up to 2^53)."""
        return self._all_reduce(values, device, dist.ReduceOp.SUM) if self.enabled else list(values)

    def all_reduce_max(self, values: list[float], device: torch.device) -> list[float]:
        """The element-wise maxima of ``values`` over all ranks."""
        return self._all_reduce(values, device, dist.ReduceOp.MAX) if self.enabled else list(values)

    @staticmethod
    def _all_reduce(values: list[float], device: torch.device, op: dist.ReduceOp) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object; the others pass anything)."""
        if not self.enabled:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_object(self, obj: Any) -> Optional[list[Any]]:
        """On rank 0 the list of every rank's ``obj`` by rank; None on the others."""
        if not self.enabled:
            return [obj]
        gathered: Optional[list[Any]] = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` run on rank 0 alone (it reads or writes the run directory), its result on every rank; an
        exception it raises is raised on every rank, so all of them stop with rank 0's message."""
        if not self.enabled:
            return compute()
        result, error = None, None
        if self.is_main:
            try:
                result = compute()
            except Exception as caught:  # re-raised below, on rank 0 too
                error = caught
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def reduce_metrics(self, row: dict[str, Any], loaders: dict[str, Iterable], device: torch.device
                       ) -> dict[str, Any]:
        """``row`` with each ``<split>_loss...`` and ``<split>_accuracy...`` (means over this rank's shard of the
        split, ``loaders[split]``) replaced by the mean over all ranks; other entries are kept. Accuracies are
        turned back into exact counts of correct examples before they are summed."""
        if not self.enabled:
            return row
        counts = {split: len(loader.dataset) for split, loader in loaders.items()}
        keys = [(key, split) for key in row for split in counts
                if key.startswith((f"{split}_loss", f"{split}_accuracy"))]
        local = [row[key] * counts[split] for key, split in keys]
        local = [round(value) if "_accuracy" in key else value for value, (key, _) in zip(local, keys)]
        sums = self.all_reduce_sum(local + list(counts.values()), device)
        totals = dict(zip(counts, sums[len(keys):]))
        return {**row, **{key: total / totals[split] for (key, split), total in zip(keys, sums)}}

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Overwrite every buffer of ``model`` (BatchNorm statistics) with rank 0's."""
        if not self.enabled:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = Distributed()


def current() -> Distributed:
    """The place torchrun's environment gives this process (:data:`SINGLE` without torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    return Distributed(rank=int(os.environ["RANK"]), world_size=world_size,
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(place: Distributed, device: torch.device) -> torch.device:
    """Join the process group of ``place`` (when distributed) and return this rank's device: on CUDA the GPU of its
    local rank (``--device cuda``; an explicit index is an error, since each rank takes its own)."""
    if not place.enabled:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device}: under torchrun each process uses the GPU of its local rank; "
                             "pass --device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        if place.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {place.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                             "start at most as many processes per node as there are GPUs")
        device = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return device
