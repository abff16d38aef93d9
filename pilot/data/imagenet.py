"""ImageNet (ILSVRC-2012) as torchvision ImageFolders: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

``root`` may be the directory holding ``train/`` and ``val/`` or a parent holding it as
``imagenet/`` or ``ILSVRC2012/``. Images are decoded per sample (the dataset does not fit in
memory). Transforms are the standard ones: RandomResizedCrop(224) + horizontal flip for training
(Resize(256) + CenterCrop(224) when ``augment=False``), Resize(256) + CenterCrop(224) for val.
"""

from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from pilot.data.in_memory import DatasetBundle, limited_indices

DATASET_NAME = "imagenet"
IMAGE_SIZE = 224
RESIZE_SIZE = 256
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PARENT_LAYOUT_NAMES = ("imagenet", "ILSVRC2012")
SPLITS = ("train", "val")


def _transform(*, augment: bool) -> v2.Compose:
    if augment:
        geometry = [v2.RandomResizedCrop(IMAGE_SIZE), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(RESIZE_SIZE), v2.CenterCrop(IMAGE_SIZE)]
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def locate_imagenet(root: str | Path | None) -> Path:
    """The directory with ``train/`` and ``val/`` class folders: ``root`` or ``root/{imagenet,ILSVRC2012}``."""
    how_to_get = (
        "ImageNet cannot be downloaded automatically: get ILSVRC-2012 from image-net.org, arrange train/ and val/ "
        "as class folders (one folder per wnid), and pass --data-root pointing at their parent."
    )
    if root is None:
        raise FileNotFoundError(f"ImageNet has no default location: pass --data-root. {how_to_get}")
    base = Path(root).expanduser()
    looked = []
    for candidate in (base, *(base / name for name in PARENT_LAYOUT_NAMES)):
        missing = [split for split in SPLITS if not (candidate / split).is_dir()]
        if not missing:
            return candidate
        looked.append(f"  {candidate}: no {' or '.join(s + '/' for s in missing)} directory")
    raise FileNotFoundError("ImageNet not found. Looked at:\n" + "\n".join(looked) + f"\n{how_to_get}")


def _limit(dataset: ImageFolder, limit: int | None) -> Dataset:
    keep = limited_indices(len(dataset), limit)
    return dataset if keep is None else Subset(dataset, keep.tolist())


def load_imagenet(root: str | Path | None, *, augment: bool, limit: int | None) -> DatasetBundle:
    """ImageNet train/val ImageFolders with the standard 224x224 transforms."""
    source = locate_imagenet(root)
    train = ImageFolder(str(source / "train"), transform=_transform(augment=augment))
    val = ImageFolder(str(source / "val"), transform=_transform(augment=False))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"{source}: train/ and val/ have different class folders: "
            f"only in train: {only_train}, only in val: {only_val}"
        )
    return DatasetBundle(
        name=DATASET_NAME,
        train=_limit(train, limit),
        test=_limit(val, limit),
        num_classes=len(train.classes),
        in_channels=3,
        image_size=IMAGE_SIZE,
        classes=tuple(train.classes),
        source=str(source),
    )
