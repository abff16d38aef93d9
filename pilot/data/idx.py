"""Reader for the idx format of MNIST / Fashion-MNIST (optionally gzip-compressed).

An idx file is a big-endian header -- a 4-byte magic number (2051 for 3-D uint8 image files,
2049 for 1-D uint8 label files), then one 4-byte size per dimension -- followed by the
uint8 data in row-major order. Every inconsistency raises ValueError naming the file.
"""

import gzip
import math
import zlib
from pathlib import Path

import torch

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytearray:
    raw = path.read_bytes()
    # Decide by content, not by name, so a mis-named file is still read (or rejected) correctly.
    if raw[:2] != _GZIP_MAGIC:
        return bytearray(raw)
    try:
        return bytearray(gzip.decompress(raw))
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def _read_idx(path: Path, magic: int, ndim: int) -> torch.Tensor:
    data = _read_bytes(path)
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated idx header ({len(data)} bytes, need {header_size})")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise ValueError(
            f"{path}: wrong idx magic number {found_magic} (expected {magic} for a {ndim}-D uint8 idx file)"
        )
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if any(size == 0 for size in shape):
        raise ValueError(f"{path}: idx file has an empty dimension, shape {shape}")
    expected_size = header_size + math.prod(shape)
    if len(data) < expected_size:
        raise ValueError(f"{path}: truncated idx file: shape {shape} needs {expected_size} bytes, file has {len(data)}")
    if len(data) > expected_size:
        raise ValueError(
            f"{path}: idx file has {len(data) - expected_size} unexpected trailing bytes after shape {shape} data"
        )
    return torch.frombuffer(data, dtype=torch.uint8, offset=header_size).view(shape)


def read_idx_images(path: str | Path) -> torch.Tensor:
    """Read an idx3-ubyte image file (raw or .gz) into a uint8 ``(N, H, W)`` tensor."""
    return _read_idx(Path(path), IDX_IMAGES_MAGIC, 3)


def read_idx_labels(path: str | Path) -> torch.Tensor:
    """Read an idx1-ubyte label file (raw or .gz) into a uint8 ``(N,)`` tensor."""
    return _read_idx(Path(path), IDX_LABELS_MAGIC, 1)
