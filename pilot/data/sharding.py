"""Sharding the data over the processes of a distributed run, so that N processes see what one process would.

:class:`ShardedBatchSampler` draws the same shuffled global batches as the single-process train loader of
:func:`pilot.data.make_loaders` (it iterates the same ``RandomSampler`` and ``BatchSampler`` with the loader's
generator, which every rank seeds alike and the checkpoint carries), and gives each rank its contiguous part of each
global batch. The union of the ranks' batches at step k is therefore the single-process batch k, whatever the
number of ranks: a run can be compared with a single-process run, and resumed with another number of ranks.
torch's ``DistributedSampler`` cannot do that (its order depends on the number of replicas and it pads with
duplicates).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler

__all__ = ["ShardedBatchSampler", "shard_bounds", "min_final_batch", "steps_per_epoch"]


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s contiguous part of ``size`` items split into ``world_size`` parts whose sizes
    differ by at most one (the first ``size % world_size`` parts hold one more), without padding or repetition."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def min_final_batch(world_size: int) -> int:
    """The smallest final (partial) global batch that is trained on: every rank needs two examples, because
    BatchNorm cannot normalise a single one (for one process: the single-process loader's rule)."""
    return 2 * world_size


def steps_per_epoch(size: int, global_batch_size: int, world_size: int) -> int:
    """Global batches per epoch of ``size`` examples: the full ones, and the final partial one unless it is smaller
    than :func:`min_final_batch` (so it can depend on ``world_size``)."""
    full, final = divmod(size, global_batch_size)
    return full + (final >= min_final_batch(world_size))


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s part of each shuffled global batch of ``global_batch_size`` indices of ``range(size)``.

    The shuffling draws from ``generator`` exactly as a ``DataLoader(shuffle=True, generator=generator)`` over the
    same dataset does (pass the same generator to the DataLoader, which draws its workers' base seed from it first),
    so saving and restoring ``generator``'s state at an epoch boundary resumes the order exactly. A final partial
    global batch smaller than :func:`min_final_batch` is dropped.
    """

    def __init__(self, size: int, global_batch_size: int, *, rank: int, world_size: int,
                 generator: torch.Generator) -> None:
        if global_batch_size % world_size:
            raise ValueError(f"the global batch size {global_batch_size} is not divisible by the {world_size} ranks")
        if size < min_final_batch(world_size):
            raise ValueError(f"{size} training examples cannot be shared by {world_size} ranks "
                             f"(need at least {min_final_batch(world_size)})")
        self.size, self.global_batch_size = size, global_batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = generator
        final = size % global_batch_size
        self.drop_last = 0 < final < min_final_batch(world_size)

    def __len__(self) -> int:
        return steps_per_epoch(self.size, self.global_batch_size, self.world_size)

    def global_size(self, step: int) -> int:
        """The number of examples of global batch ``step`` (0-based) over all ranks."""
        return min(self.global_batch_size, self.size - step * self.global_batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = BatchSampler(RandomSampler(range(self.size), generator=self.generator), self.global_batch_size,
                               drop_last=self.drop_last)
        for batch in batches:
            start, end = shard_bounds(len(batch), self.rank, self.world_size)
            yield batch[start:end]
