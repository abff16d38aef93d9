"""DataLoaders for a :class:`~pilot.data.in_memory.DatasetBundle`."""

import functools

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pilot.data.in_memory import DatasetBundle
from pilot.data.sharding import ShardedBatchSampler, shard_bounds


def make_loaders(
    bundle: DatasetBundle,
    batch_size: int,
    *,
    num_workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Return ``(train_loader, test_loader)``.

    With ``world_size > 1`` they are ``rank``'s loaders of a distributed run: ``batch_size`` is the global batch
    (divisible by ``world_size``); the train loader yields this rank's part of the batches the single-process
    loader would yield (:class:`~pilot.data.sharding.ShardedBatchSampler`, same generator, same resume rule) and
    the test loader a contiguous shard of the test split (:func:`eval_loader`).

    The train loader reshuffles every epoch using its own ``torch.Generator`` seeded with ``seed``
    (``train_loader.generator``); the test loader keeps dataset order. Memory is pinned when
    ``device`` is a CUDA device. The test loader's workers persist across epochs; the train loader's
    do not, because persistent workers draw their random seeds once, at the first epoch, so a run
    resumed later would augment differently from one that never stopped.

    A train batch that would hold a single example is dropped: BatchNorm cannot normalise it.

    Reproducing and resuming a run: each epoch's shuffle order -- and, with ``num_workers > 0``,
    the workers' random seeds and hence their augmentation -- is drawn from
    ``train_loader.generator`` when the epoch's iterator is created. Save
    ``train_loader.generator.get_state()`` in the checkpoint at an epoch boundary, i.e. before
    calling ``iter(train_loader)`` (starting a ``for`` loop over it) for the next epoch, and on
    resume call ``train_loader.generator.set_state(state)`` before that epoch's loop. With
    ``num_workers == 0`` the augmentation runs in the main process and draws from the global
    torch RNG, so also save ``torch.get_rng_state()`` and restore it with ``torch.set_rng_state``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if len(bundle.train) == 0:
        raise ValueError(f"{bundle.name}: the train split is empty")
    pin_memory = torch.device(device).type == "cuda"
    generator = torch.Generator().manual_seed(seed)
    test_loader = eval_loader(bundle.test, batch_size // world_size, num_workers=num_workers,
                              pin_memory=pin_memory, rank=rank, world_size=world_size)
    if world_size > 1:
        sampler = ShardedBatchSampler(len(bundle.train), batch_size, rank=rank, world_size=world_size,
                                      generator=generator)
        # Workers seed their augmentation from the loader's generator, the same on every rank; the rank is added so
        # that the ranks do not crop and flip their different examples in lockstep.
        worker_init_fn = functools.partial(_seed_worker, rank * num_workers) if num_workers else None
        return DataLoader(bundle.train, batch_sampler=sampler, generator=generator, num_workers=num_workers,
                          pin_memory=pin_memory, worker_init_fn=worker_init_fn), test_loader
    train_loader = DataLoader(
        bundle.train,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=len(bundle.train) % batch_size == 1,
    )
    return train_loader, test_loader


def eval_loader(dataset: Dataset, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over ``dataset`` in order (its workers persist across epochs); with ``world_size > 1`` over
    ``rank``'s contiguous shard of it (:func:`~pilot.data.sharding.shard_bounds`: no example twice, none left out),
    so that sums over the ranks are the sums over the split."""
    if world_size > 1:
        start, end = shard_bounds(len(dataset), rank, world_size)
        if start == end:
            raise ValueError(f"{len(dataset)} evaluation examples cannot be shared by {world_size} ranks")
        dataset = Subset(dataset, range(start, end))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


def _seed_worker(offset: int, worker_id: int) -> None:
    """worker_init_fn: the worker's torch seed (base seed + worker id) moved by ``offset``."""
    torch.manual_seed(torch.initial_seed() + offset)
