r"""Compressed checkpoints of pruned models: :func:`save_sparse` writes a model's state dict with only the non-zeros
of its tensors and an index, :func:`load_sparse` puts it back bit for bit.

The file is safetensors. Each tensor of the state dict is stored in the smallest of the encodings of
:mod:`pilot.sparse_encoding`: as it is (``dense``: BatchNorm statistics, biases, anything without zeros), or as
its non-zero values (``<name>#values``) and an index (``<name>#index``: one bit per entry, or the gaps between
non-zeros as uint8 / uint16). For a weight of density d in fp32 that is :math:`4d + \min(1/8, d)` bytes per entry
instead of 4 (plus a stored zero every 256 positions of a longer gap in uint8: 8% more entries at 1% density,
0.6% at 2%; uint16 or the bitmask wins where that costs more), so at 95% sparsity the pruned weights take
0.0625x their dense size and at 98% 0.025x; what is stored dense adds its own size.

The safetensors metadata (all strings) holds ``format`` ("pilot.sparse"), ``format_version``, ``pilot_version``,
``model``, ``method``, ``sparsity`` (the fraction of exact zeros among the prunable weights, as
:func:`pilot.sparsity_report` counts it), ``layout`` (JSON: ``{name: [encoding, shape]}`` of the encoded tensors)
and whatever the caller adds (``python -m pilot.export`` adds what :func:`pilot.models.build_model` needs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Union

from torch import Tensor, nn

from .atomic import atomic_write
from .pruning import sparsity_report
from .sparse_encoding import ENCODINGS, decode, encode

__all__ = ["save_sparse", "load_sparse", "read_sparse_metadata", "dense_fp32_bytes", "SparseCheckpointError",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "pilot.sparse"
FORMAT_VERSION = "1"
REQUIRED_METADATA = ("format", "format_version", "pilot_version", "model", "method", "sparsity", "layout")
VALUES, INDEX = "#values", "#index"
_SHOWN = 5  # names listed in an error about missing or unexpected tensors

PathLike = Union[str, Path]


class SparseCheckpointError(ValueError):
    """A file is not a sparse checkpoint that fits the model; the message says what and how to go on."""


def save_sparse(model: nn.Module, path: PathLike, *, model_name: Optional[str] = None, method: str = "unknown",
                metadata: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Write ``model.state_dict()`` to ``path`` (safetensors) with only the non-zeros of each tensor plus an index,
    whichever encoding is smallest per tensor (module doc); atomically, so a crash leaves the old file or the new.

    ``model_name`` (default: the class name) and ``method`` (how it was sparsified) go into the metadata with the
    measured sparsity and the pilot version; ``metadata`` adds more string entries. Returns the metadata written.
    """
    import pilot  # for pilot.__version__; pilot/__init__.py imports this module, so not at the top

    given = dict(metadata or {})
    clash = sorted(set(given) & set(REQUIRED_METADATA))
    if clash:
        raise ValueError(f"metadata may not set {', '.join(clash)}: save_sparse writes those itself "
                         "(pass model_name= and method= instead)")
    wrong = [key for key, value in given.items() if not isinstance(key, str) or not isinstance(value, str)]
    if wrong:
        raise TypeError(f"metadata must map str to str (safetensors stores strings); not so for {wrong}")
    tensors: dict[str, Tensor] = {}
    layout: dict[str, list] = {}
    for name, tensor in model.state_dict().items():
        encoded = encode(tensor)
        if encoded.encoding == "dense":
            tensors[name] = encoded.values
        else:
            tensors[name + VALUES], tensors[name + INDEX] = encoded.values, encoded.index
            layout[name] = [encoded.encoding, list(encoded.shape)]
    info = {**given, "format": FORMAT, "format_version": FORMAT_VERSION, "pilot_version": pilot.__version__,
            "model": model_name or type(model).__name__, "method": method,
            "sparsity": repr(sparsity_report(model).sparsity), "layout": json.dumps(layout, separators=(",", ":"))}
    import safetensors.torch  # here, not at import: `import pilot` must work without it (a GPU image may lack it)
    data = safetensors.torch.save(tensors, metadata=info)
    atomic_write(Path(path), lambda file: file.write(data), binary=True)
    return info


def dense_fp32_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state dict stored dense with floating-point tensors in fp32 (other dtypes as they are):
    the size a sparse checkpoint is compared with."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in model.state_dict().values())


def _read(path: Path, *, tensors: bool = True) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and (if ``tensors``) every tensor of the safetensors file at ``path``."""
    from safetensors import SafetensorError, safe_open  # see save_sparse
    try:
        with safe_open(str(path), framework="pt") as file:
            return dict(file.metadata() or {}), {name: file.get_tensor(name) for name in file.keys() if tensors}
    except SafetensorError as error:
        raise SparseCheckpointError(f"{path} is not a readable safetensors file ({error}); it may be truncated or "
                                    "damaged: write it again with pilot.save_sparse or python -m pilot.export"
                                    ) from error


def _checked_metadata(path: Path, info: dict[str, str]) -> dict[str, str]:
    missing = [key for key in REQUIRED_METADATA if key not in info]
    if missing or info["format"] != FORMAT:
        raise SparseCheckpointError(
            f"{path} is not a pilot sparse checkpoint (its metadata lacks {', '.join(missing) or 'nothing'}, format "
            f"is {info.get('format')!r}, need {FORMAT!r}); write one with pilot.save_sparse or python -m pilot.export")
    if info["format_version"] != FORMAT_VERSION:
        raise SparseCheckpointError(f"{path} has sparse format version {info['format_version']!r}; this pilot "
                                    f"({info['pilot_version']} wrote it) reads version {FORMAT_VERSION!r}")
    return info


def read_sparse_metadata(path: PathLike) -> dict[str, str]:
    """The metadata of the sparse checkpoint at ``path`` (module doc), checked to be one; reads no tensor data."""
    path = Path(path)
    return _checked_metadata(path, _read(path, tensors=False)[0])


def _layout(path: Path, info: dict[str, str], tensors: dict[str, Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (encoding, shape)}`` of the encoded tensors, checked to name exactly the encoded parts in the file."""
    try:
        layout = json.loads(info["layout"])
        if not isinstance(layout, dict) or not all(
                isinstance(entry, list) and len(entry) == 2 and entry[0] in ENCODINGS[1:]
                and isinstance(entry[1], list) and all(isinstance(size, int) and size >= 0 for size in entry[1])
                for entry in layout.values()):
            raise ValueError("need {name: [encoding, shape]}")
    except ValueError as error:
        raise SparseCheckpointError(f"{path}: the metadata's layout is damaged ({error})") from error
    parts = {name for name in tensors if name.endswith((VALUES, INDEX))}
    named = {name + part for name in layout for part in (VALUES, INDEX)}
    if parts != named:
        raise SparseCheckpointError(f"{path}: the encoded parts in the file {sorted(parts - named)[:_SHOWN]} and "
                                    f"those its layout names {sorted(named - parts)[:_SHOWN]} differ")
    twice = sorted(set(layout) & set(tensors))
    if twice:
        raise SparseCheckpointError(f"{path} holds {twice[:_SHOWN]} both dense and encoded")
    return {name: (encoding, tuple(shape)) for name, (encoding, shape) in layout.items()}


def _check_fits(path: Path, info: dict[str, str], shapes: dict[str, tuple[int, ...]], model: nn.Module) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise SparseCheckpointError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} of its tensors are missing "
            f"{missing[:_SHOWN]} and {len(unexpected)} unexpected {unexpected[:_SHOWN]}; the file holds "
            f"model {info['model']!r}: build that architecture (python -m pilot.export records how) and load again")
    wrong = [f"{name} {shapes[name]} (model {tuple(tensor.shape)})" for name, tensor in expected.items()
             if shapes[name] != tuple(tensor.shape)]
    if wrong:
        raise SparseCheckpointError(f"{path} does not fit {type(model).__name__}: shapes differ for "
                                    f"{', '.join(wrong[:_SHOWN])}{' ...' if len(wrong) > _SHOWN else ''}; the file "
                                    f"holds model {info['model']!r}: build it with the same sizes and load again")


def load_sparse(path: PathLike, model: nn.Module) -> dict[str, str]:
    """Load the sparse checkpoint at ``path`` into ``model`` (built with the architecture it was saved from) and
    return its metadata. Every bit of every tensor comes back as :func:`save_sparse` saw it; a model of another
    dtype gets the values converted, as ``load_state_dict`` converts them.

    The whole file is read, checked against the model and decoded first: a truncated or damaged file, missing
    metadata, or tensors whose names or shapes do not match raise :class:`SparseCheckpointError` (a ValueError)
    and leave ``model`` unchanged.
    """
    path = Path(path)
    info, tensors = _read(path)
    info = _checked_metadata(path, info)
    layout = _layout(path, info, tensors)
    state = {name: tensor for name, tensor in tensors.items() if not name.endswith((VALUES, INDEX))}
    _check_fits(path, info, {**{name: tuple(t.shape) for name, t in state.items()},
                             **{name: shape for name, (_, shape) in layout.items()}}, model)
    for name, (encoding, shape) in layout.items():
        try:
            state[name] = decode(encoding, shape, tensors[name + VALUES], tensors[name + INDEX])
        except ValueError as error:
            raise SparseCheckpointError(f"{path}: {name} cannot be decoded ({error})") from error
    model.load_state_dict(state)
    return info
