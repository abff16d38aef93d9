"""The dataset bundle returned by ``load_datasets`` and the in-memory uint8 image dataset."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

# Seed of the random subset that ``limit`` keeps: fixed so that a limited run is reproducible.
LIMIT_SEED = 0


@dataclass(frozen=True)
class DatasetBundle:
    """Train and test splits of one dataset plus what a model needs to know about them.

    ``train`` and ``test`` yield ``(image, label)`` with ``image`` a normalised float32
    ``in_channels x image_size x image_size`` tensor and ``label`` an ``int`` in
    ``[0, num_classes)``. ``name`` is the dataset's name in ``DATASET_NAMES``, ``classes`` the
    class names by label, ``source`` the file or directory the data was read from.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str = ""
    classes: tuple[str, ...] = ()
    source: str = ""


@dataclass(frozen=True)
class DecodedSplits:
    """Both splits of a dataset as uint8 ``(N, C, H, W)`` images and int64 labels indexing ``classes``."""

    classes: tuple[str, ...]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


class InMemoryImageDataset(Dataset):
    """Images held as one uint8 ``(N, C, H, W)`` tensor, transformed per sample by torchvision v2."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be a 1-D tensor of {images.shape[0]} entries, got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def uint8_image_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], *, augment: bool, crop_padding: int
) -> v2.Compose:
    """uint8 CxHxW tensor -> normalised float32, with random crop + horizontal flip if ``augment``."""
    steps: list[v2.Transform] = []
    if augment:
        steps += [v2.RandomCrop(image_size, padding=crop_padding), v2.RandomHorizontalFlip()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def limited_indices(length: int, limit: int | None) -> torch.Tensor | None:
    """Indices of the examples kept by ``limit``, or None to keep all.

    A fixed-seed random subset, in original order, rather than the first ``limit`` examples:
    class-folder datasets are sorted by class, so their head would hold a single class.
    """
    if limit is None or limit >= length:
        return None
    generator = torch.Generator().manual_seed(LIMIT_SEED)
    return torch.randperm(length, generator=generator)[:limit].sort().values


def in_memory_splits(
    decoded: DecodedSplits,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    crop_padding: int,
    limit: int | None,
) -> tuple[InMemoryImageDataset, InMemoryImageDataset]:
    """Train and test datasets over ``decoded``'s tensors; only train is augmented."""
    datasets = []
    for images, labels, split_augment in (
        (decoded.train_images, decoded.train_labels, augment),
        (decoded.test_images, decoded.test_labels, False),
    ):
        keep = limited_indices(images.shape[0], limit)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        transform = uint8_image_transform(images.shape[-1], mean, std, augment=split_augment, crop_padding=crop_padding)
        datasets.append(InMemoryImageDataset(images, labels, transform))
    return datasets[0], datasets[1]
