"""Decode image class folders -- a directory or a tar archive with ``train/<class>/<image>`` and
``test/<class>/<image>`` -- into uint8 tensors, cached on disk.

Class order is the sorted class-folder names (as torchvision's ImageFolder), and train and test
must have the same classes. Only files directly inside a class folder with an image extension
count; hidden files (``.DS_Store``, macOS ``._*`` resource forks) are skipped. All images must
have one square size; they are converted to RGB.

Decoding tens of thousands of small files takes seconds, so the result is saved with
:func:`pilot.data.cache.save_atomically` under :func:`pilot.data.cache.cache_dir`, keyed by the
archive's resolved path, size and mtime, or for a directory by every image file's relative path,
size and mtime; a source that changes therefore gets a fresh entry.
"""

import io
import tarfile
import warnings
from collections import defaultdict
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pilot.data.cache import cache_dir, cache_key, save_atomically
from pilot.data.in_memory import DecodedSplits

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLITS = ("train", "test")
# Part of every cache key: bump it when the decoding or the cached layout changes, so that
# entries written by an older version are not reused.
CACHE_FORMAT_VERSION = 1

# split -> class name -> [(name for messages, encoded image bytes)]
_EncodedSplits = dict[str, dict[str, list[tuple[str, bytes]]]]


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file named like a tar archive this module reads."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def is_class_folder_tree(path: Path) -> bool:
    """Whether ``path`` is a directory with ``train/`` and ``test/`` subdirectories."""
    return all((path / split).is_dir() for split in SPLITS)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_directory(root: Path) -> dict[str, dict[str, list[Path]]]:
    listing: dict[str, dict[str, list[Path]]] = {}
    for split in SPLITS:
        listing[split] = {}
        for class_dir in sorted((root / split).iterdir()):
            if not class_dir.is_dir() or class_dir.name.startswith("."):
                continue
            files = sorted(p for p in class_dir.iterdir() if p.is_file() and _is_image_name(p.name))
            if files:
                listing[split][class_dir.name] = files
    return listing


def _read_archive(path: Path) -> _EncodedSplits:
    splits_by_prefix: dict[tuple[str, ...], _EncodedSplits] = defaultdict(
        lambda: {s: defaultdict(list) for s in SPLITS}
    )
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[-3] not in SPLITS or not _is_image_name(parts[-1]):
                    continue
                prefix, split, class_name = parts[:-3], parts[-3], parts[-2]
                data = archive.extractfile(member).read()
                splits_by_prefix[prefix][split][class_name].append((f"{path}:{member.name}", data))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read tar archive ({exc})") from exc
    if not splits_by_prefix:
        raise ValueError(f"{path}: archive holds no images under train/<class>/ or test/<class>/")
    if len(splits_by_prefix) > 1:
        roots = sorted("/".join(prefix) + "/" for prefix in splits_by_prefix)
        raise ValueError(f"{path}: archive holds several train/test trees, under {roots}; keep one")
    (splits,) = splits_by_prefix.values()
    # Archives list members in arbitrary order; sort by file name as ImageFolder does.
    return {split: {c: sorted(splits[split][c]) for c in sorted(splits[split])} for split in SPLITS}


def _decode_image(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{name}: cannot decode image ({exc})") from exc


def _check_same_classes(source: Path, classes_by_split: dict[str, list[str]]) -> tuple[str, ...]:
    train_classes, test_classes = (set(classes_by_split[split]) for split in SPLITS)
    if not train_classes:
        raise ValueError(f"{source}: no images found under train/<class>/")
    if train_classes != test_classes:
        raise ValueError(
            f"{source}: train and test have different class folders holding images (class index = sorted "
            f"folder names, so they must match): only in train: {sorted(train_classes - test_classes)}, "
            f"only in test: {sorted(test_classes - train_classes)}"
        )
    return tuple(sorted(train_classes))


def _decode(source: Path, encoded: _EncodedSplits) -> DecodedSplits:
    classes = _check_same_classes(source, {split: list(encoded[split]) for split in SPLITS})
    image_shape: tuple[int, ...] | None = None
    tensors: dict[str, torch.Tensor] = {}
    for split in SPLITS:
        images: list[np.ndarray] = []
        labels: list[int] = []
        for label, class_name in enumerate(classes):
            for name, data in encoded[split][class_name]:
                image = _decode_image(data, name)
                if image_shape is None:
                    if image.shape[0] != image.shape[1]:
                        raise ValueError(f"{name}: images must be square, got {image.shape[0]}x{image.shape[1]}")
                    image_shape = image.shape
                elif image.shape != image_shape:
                    raise ValueError(
                        f"{name}: image is {image.shape[0]}x{image.shape[1]}, "
                        f"but earlier images are {image_shape[0]}x{image_shape[1]}; all must have one size"
                    )
                images.append(image)
                labels.append(label)
        tensors[f"{split}_images"] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        tensors[f"{split}_labels"] = torch.tensor(labels, dtype=torch.int64)
    return DecodedSplits(classes=classes, **tensors)


def _load_cache(path: Path) -> DecodedSplits | None:
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        return DecodedSplits(
            classes=tuple(entry["classes"]),
            train_images=entry["train_images"],
            train_labels=entry["train_labels"],
            test_images=entry["test_images"],
            test_labels=entry["test_labels"],
        )
    except Exception as exc:  # noqa: BLE001 -- any unreadable entry is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable cache file {path} ({exc}); decoding again", stacklevel=3)
        return None


def _save_cache(path: Path, decoded: DecodedSplits) -> None:
    entry = {
        "classes": list(decoded.classes),
        "train_images": decoded.train_images,
        "train_labels": decoded.train_labels,
        "test_images": decoded.test_images,
        "test_labels": decoded.test_labels,
    }
    try:
        save_atomically(entry, path)
    except OSError as exc:
        # A read-only or full cache directory only costs speed next time; the data is still good.
        warnings.warn(
            f"could not write cache file {path} ({exc}); the data will be decoded again next time", stacklevel=3
        )


def _cache_path(source: Path, listing: dict[str, dict[str, list[Path]]] | None) -> Path:
    if listing is None:
        stat = source.stat()
        key = cache_key(CACHE_FORMAT_VERSION, source, stat.st_size, stat.st_mtime_ns)
    else:
        fingerprint = [
            (str(path.relative_to(source)), path.stat().st_size, path.stat().st_mtime_ns)
            for classes in listing.values()
            for files in classes.values()
            for path in files
        ]
        key = cache_key(CACHE_FORMAT_VERSION, source, fingerprint)
    stem = source.name.split(".")[0] or "data"
    return cache_dir() / f"class-folders-{stem}-{key}.pt"


def load_class_folders(source: str | Path) -> DecodedSplits:
    """Decode the class folders in ``source`` (a tar archive or a directory), using the cache."""
    source = Path(source).expanduser().resolve()
    if is_archive(source):
        listing = None
    elif is_class_folder_tree(source):
        listing = _list_directory(source)
    else:
        raise ValueError(
            f"{source}: neither a tar archive ({', '.join(ARCHIVE_SUFFIXES)}) nor a directory with train/ and test/"
        )
    cache_path = _cache_path(source, listing)
    if cache_path.is_file():
        cached = _load_cache(cache_path)
        if cached is not None:
            return cached
    if listing is None:
        encoded = _read_archive(source)
    else:
        encoded = {
            split: {c: [(str(p), p.read_bytes()) for p in files] for c, files in classes.items()}
            for split, classes in listing.items()
        }
    decoded = _decode(source, encoded)
    _save_cache(cache_path, decoded)
    return decoded
