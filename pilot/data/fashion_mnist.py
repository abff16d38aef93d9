"""Fashion-MNIST (Xiao et al. 2017) from its idx files: 60,000 train / 10,000 test 28x28 grayscale images.

Search order for the four files (each raw or ``.gz``): with a ``root``, ``root`` itself (or its
directory if ``root`` is one of the files), ``root/FashionMNIST/raw`` (torchvision's layout) and
``root/fashion-mnist`` -- only those, so a mistyped root is an error rather than a silent switch to
another copy; without a ``root``, :data:`SYSTEM_DIRS` (Debian's ``dataset-fashion-mnist`` package).

Augmentation (``augment=True``): random 28x28 crop of the image zero-padded by 2, and a random
horizontal flip -- clothes are left-right symmetric, so a flip keeps the label (unlike digits).
"""

from pathlib import Path

import torch

from pilot.data.idx import read_idx_images, read_idx_labels
from pilot.data.in_memory import DatasetBundle, DecodedSplits, in_memory_splits

DATASET_NAME = "fashion-mnist"
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN = (0.2860,)
STD = (0.3530,)
CROP_PADDING = 2


def candidate_dirs(root: str | Path | None) -> list[Path]:
    """Directories searched for the idx files, in order, without duplicates."""
    if root is None:
        return list(SYSTEM_DIRS)
    base = Path(root).expanduser()
    if base.is_file():
        base = base.parent
    return [base, base / "FashionMNIST" / "raw", base / "fashion-mnist"]


def find_idx_files(root: str | Path | None) -> dict[str, Path]:
    """Paths of the four idx files in the first candidate directory that holds all of them.

    Raises FileNotFoundError listing every directory looked in and what was missing there.
    """
    looked: list[str] = []
    for directory in candidate_dirs(root):
        if not directory.is_dir():
            looked.append(f"  {directory}: no such directory")
            continue
        found: dict[str, Path] = {}
        for key, stem in FILE_STEMS.items():
            # Prefer the uncompressed file when both exist: it is read without decompressing.
            for path in (directory / stem, directory / f"{stem}.gz"):
                if path.is_file():
                    found[key] = path
                    break
        if len(found) == len(FILE_STEMS):
            return found
        missing = [f"{FILE_STEMS[key]}[.gz]" for key in FILE_STEMS if key not in found]
        looked.append(f"  {directory}: missing {', '.join(missing)}")
    given = "" if root is not None else " (no --data-root given)"
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found{given}. Looked in:\n"
        + "\n".join(looked)
        + "\nTo get them: `apt-get install dataset-fashion-mnist` (installs to /usr/share/datasets/fashion-mnist), "
        "or download with torchvision.datasets.FashionMNIST(ROOT, download=True) and pass --data-root ROOT, "
        "or pass --data-root DIR where DIR holds the four idx files."
    )


def _read_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{labels_path}: label {int(labels.max())} out of range 0..{len(CLASSES) - 1}")
    return images.unsqueeze(1), labels.to(torch.int64)


def load_fashion_mnist(root: str | Path | None, *, augment: bool, limit: int | None) -> DatasetBundle:
    """Fashion-MNIST as in-memory uint8 tensors; see the module docstring for search and augmentation."""
    files = find_idx_files(root)
    train_images, train_labels = _read_split(files["train_images"], files["train_labels"])
    test_images, test_labels = _read_split(files["test_images"], files["test_labels"])
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"{files['train_images']} has {tuple(train_images.shape[2:])} images but "
            f"{files['test_images']} has {tuple(test_images.shape[2:])}"
        )
    height, width = train_images.shape[2:]
    if height != width:
        raise ValueError(f"{files['train_images']}: images must be square, got {height}x{width}")

    decoded = DecodedSplits(CLASSES, train_images, train_labels, test_images, test_labels)
    train, test = in_memory_splits(
        decoded,
        mean=MEAN,
        std=STD,
        augment=augment,
        crop_padding=CROP_PADDING,
        limit=limit,
    )
    return DatasetBundle(
        name=DATASET_NAME,
        train=train,
        test=test,
        num_classes=len(CLASSES),
        in_channels=1,
        image_size=height,
        classes=CLASSES,
        source=str(files["train_images"].parent),
    )
