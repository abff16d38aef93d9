"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 50,000 train / 10,000 test 32x32 RGB images.

Two on-disk formats are read:

* torchvision's: the pickled batches in ``cifar-10-batches-py/`` or ``cifar-100-python/``
  (what ``torchvision.datasets.CIFAR10(root, download=True)`` leaves in ``root``). They are
  unpickled with an unpickler that only admits numpy arrays, so a tampered file cannot run code.
* class folders: a directory, or a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive, holding
  ``train/<class>/*`` and ``test/<class>/*`` images (see :mod:`pilot.data.class_folders`;
  decoded once and cached).

``root`` may be any of these, or a directory holding them: its ``cifar-10-batches-py``
(``cifar-100-python``) and its children whose name starts like the dataset's
(``cifar10*``, ``cifar-10*``, ``CIFAR10*``, ...; for CIFAR-100 ``cifar100*`` ...) are searched.

Augmentation (``augment=True``): random 32x32 crop of the image zero-padded by 4 and a random
horizontal flip, as in He et al. (2016). Normalisation uses the per-channel mean and std of the
training set.
"""

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pilot.data.class_folders import is_archive, is_class_folder_tree, load_class_folders
from pilot.data.in_memory import DatasetBundle, DecodedSplits, in_memory_splits

CROP_PADDING = 4


@dataclass(frozen=True)
class CifarSpec:
    """What distinguishes CIFAR-10 from CIFAR-100 on disk and in training."""

    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pickle_dir: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    class_names_key: str
    # Matches (lower-cased) names of directories or archives that hold this dataset.
    name_pattern: re.Pattern[str]
    torchvision_class: str


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        name="cifar10",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        pickle_dir="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key="labels",
        class_names_key="label_names",
        name_pattern=re.compile(r"cifar[-_]?10(?!0)"),
        torchvision_class="CIFAR10",
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        pickle_dir="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key="fine_labels",
        class_names_key="fine_label_names",
        name_pattern=re.compile(r"cifar[-_]?100"),
        torchvision_class="CIFAR100",
    ),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of lists, strings and numpy arrays, refusing any other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            # The original batches were pickled by Python 2; latin1 maps its byte strings 1:1.
            content = _NumpyOnlyUnpickler(file, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ValueError(f"{path}: not a valid CIFAR pickle batch ({exc})") from exc
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return content


def _read_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path)
    data, labels = content.get("data"), content.get(spec.label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {described}")
    if labels is None or len(labels) != data.shape[0]:
        count = "none" if labels is None else len(labels)
        raise ValueError(f"{path}: {data.shape[0]} images but {count} '{spec.label_key}'")
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.min(initial=0) < 0 or label_array.max(initial=0) >= spec.num_classes:
        raise ValueError(f"{path}: labels must lie in 0..{spec.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), label_array


def _read_pickle_layout(directory: Path, spec: CifarSpec) -> DecodedSplits:
    train = [_read_batch(directory / name, spec) for name in spec.train_files]
    test_images, test_labels = _read_batch(directory / spec.test_file, spec)
    classes = tuple(_unpickle(directory / spec.meta_file).get(spec.class_names_key, ()))
    if len(classes) != spec.num_classes:
        raise ValueError(
            f"{directory / spec.meta_file}: expected {spec.num_classes} '{spec.class_names_key}', got {len(classes)}"
        )
    return DecodedSplits(
        classes=classes,
        train_images=torch.from_numpy(np.concatenate([images for images, _ in train])),
        train_labels=torch.from_numpy(np.concatenate([labels for _, labels in train])),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels),
    )


def _has_pickle_layout(directory: Path, spec: CifarSpec) -> bool:
    names = (*spec.train_files, spec.test_file, spec.meta_file)
    return all((directory / name).is_file() for name in names)


def _candidates(root: Path, spec: CifarSpec) -> list[Path]:
    if not root.is_dir():
        return [root]
    candidates = [root / spec.pickle_dir, root]
    for child in sorted(root.iterdir()):
        if spec.name_pattern.match(child.name.lower()):
            candidates += [child / spec.pickle_dir, child] if child.is_dir() else [child]
    return list(dict.fromkeys(candidates))


def _describe_miss(path: Path, spec: CifarSpec) -> str:
    if not path.exists():
        return f"  {path}: does not exist"
    if path.is_dir():
        return f"  {path}: neither {spec.pickle_dir}'s pickled batches nor train/ and test/ class folders"
    return f"  {path}: not a tar archive (.tar.gz, .tgz, .tar)"


def locate_cifar(root: str | Path | None, spec: CifarSpec) -> Path:
    """The first place under ``root`` that holds ``spec``'s dataset in a readable format.

    Raises FileNotFoundError listing every place looked at when there is none.
    """
    pretty = f"CIFAR-{spec.num_classes}"
    how_to_get = (
        f"To get it: torchvision.datasets.{spec.torchvision_class}(ROOT, download=True) and pass --data-root ROOT, "
        "or pass --data-root pointing at a directory or .tar.gz with train/<class>/ and test/<class>/ images."
    )
    if root is None:
        raise FileNotFoundError(f"{pretty} has no default location: pass --data-root. {how_to_get}")
    looked = []
    for candidate in _candidates(Path(root).expanduser(), spec):
        if candidate.is_dir() and (_has_pickle_layout(candidate, spec) or is_class_folder_tree(candidate)):
            return candidate
        if is_archive(candidate):
            return candidate
        looked.append(_describe_miss(candidate, spec))
    raise FileNotFoundError(f"{pretty} not found. Looked at:\n" + "\n".join(looked) + f"\n{how_to_get}")


def load_cifar(name: str, root: str | Path | None, *, augment: bool, limit: int | None) -> DatasetBundle:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``) as in-memory uint8 tensors."""
    spec = CIFAR_SPECS[name]
    source = locate_cifar(root, spec)
    if source.is_dir() and _has_pickle_layout(source, spec):
        decoded = _read_pickle_layout(source, spec)
    else:
        decoded = load_class_folders(source)
    if len(decoded.classes) != spec.num_classes:
        raise ValueError(f"{source}: {spec.name} needs {spec.num_classes} classes, found {len(decoded.classes)}")
    train, test = in_memory_splits(
        decoded, mean=spec.mean, std=spec.std, augment=augment, crop_padding=CROP_PADDING, limit=limit
    )
    return DatasetBundle(
        name=spec.name,
        train=train,
        test=test,
        num_classes=spec.num_classes,
        in_channels=3,
        image_size=decoded.train_images.shape[-1],
        classes=decoded.classes,
        source=str(source),
    )
