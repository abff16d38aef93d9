"""Datasets for PILoT training: Fashion-MNIST, CIFAR-10, CIFAR-100 and ImageNet.

``load_datasets(name, root)`` finds the data (see each loader's module for the layouts and the
search order), returns a :class:`DatasetBundle`, and ``make_loaders`` wraps it in DataLoaders::

    bundle = load_datasets("cifar10", "/data/cifar10-jpeg.tar.gz")
    train_loader, test_loader = make_loaders(bundle, batch_size=128, seed=0)

Fashion-MNIST and CIFAR are held in memory as uint8 tensors and transformed per sample with
torchvision v2 (no PIL per sample); class-folder CIFAR (directory or .tar.gz) is decoded once
and cached under ``$PILOT_CACHE`` (default ``~/.cache/pilot``).
"""

from pathlib import Path

from pilot.data.cache import CACHE_ENV_VAR, cache_dir
from pilot.data.cifar import load_cifar
from pilot.data.fashion_mnist import load_fashion_mnist
from pilot.data.imagenet import load_imagenet
from pilot.data.in_memory import DatasetBundle, InMemoryImageDataset
from pilot.data.loaders import make_loaders

DATASET_NAMES = ("fashion-mnist", "cifar10", "cifar100", "imagenet")


def load_datasets(
    name: str, root: str | Path | None = None, *, augment: bool = True, limit: int | None = None
) -> DatasetBundle:
    """Load the train and test splits of dataset ``name`` (one of :data:`DATASET_NAMES`).

    ``root`` is the ``--data-root``: the dataset's directory, its archive, or a parent holding
    a standard layout; None searches only built-in locations (Fashion-MNIST's system directory).
    ``augment`` enables the training split's random augmentation. ``limit`` keeps a fixed-seed
    random subset of at most ``limit`` examples of each split (class-mixed, deterministic).

    Raises ValueError for an unknown name, a bad ``limit`` or corrupt files, and
    FileNotFoundError listing every place looked at when the data is missing.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")
    if name == "fashion-mnist":
        return load_fashion_mnist(root, augment=augment, limit=limit)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, augment=augment, limit=limit)
    if name == "imagenet":
        return load_imagenet(root, augment=augment, limit=limit)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


__all__ = [
    "CACHE_ENV_VAR",
    "DATASET_NAMES",
    "DatasetBundle",
    "InMemoryImageDataset",
    "cache_dir",
    "load_datasets",
    "make_loaders",
]
