"""DataLoaders for a :class:`~pilot.data.in_memory.DatasetBundle`."""

import torch
from torch.utils.data import DataLoader

from pilot.data.in_memory import DatasetBundle


def make_loaders(
    bundle: DatasetBundle,
    batch_size: int,
    *,
    num_workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[DataLoader, DataLoader]:
    """Return ``(train_loader, test_loader)``.

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
    train_loader = DataLoader(
        bundle.train,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=len(bundle.train) % batch_size == 1,
    )
    test_loader = DataLoader(
        bundle.test,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    return train_loader, test_loader
