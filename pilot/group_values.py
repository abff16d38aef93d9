"""Writing and reading back the hyper-parameters that schedules steer (``group["alpha"]``, a baseline's strength)
without making the host wait for the device.

Under ``capturable=True`` they are 0-d device tensors: writing one (``fill_``) is queued on the device, but
``float()`` of it waits for everything queued before. A schedule that reads back what it set itself therefore
keeps a host copy (:class:`HostCopies`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def set_group_value(group: dict[str, Any], key: str, value: float) -> None:
    """``group[key] = value``, in place if it is a tensor (capturable optimizers read it from the device)."""
    if isinstance(group[key], Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


class HostCopies:
    """Host copies of the group values a schedule sets, so that reading them back is no device sync.

    :meth:`write` sets ``group[key]`` and, for a tensor, remembers the number the tensor now holds (the value
    rounded to its dtype, as ``fill_`` rounds it, computed on the host) with the tensor's version counter.
    :meth:`read` returns that number while ``group[key]`` is the same tensor, unchanged since (same version);
    a tensor that something else replaced (e.g. the optimizer's ``load_state_dict``) or edited in place
    (``fill_``) is read once, which for a CUDA tensor is a sync. Edits through ``.data`` bypass the version
    counter and go unseen: ``fill_`` them.
    """

    def __init__(self) -> None:
        # id(tensor) -> (tensor, its version after the write, its value); holding the tensor keeps its id unique
        self._copies: dict[int, tuple[Tensor, int, float]] = {}

    def read(self, group: dict[str, Any], key: str) -> float:
        """``group[key]`` as a host number: from the host copy where it is valid, else read (and remembered)."""
        value = group[key]
        if not isinstance(value, Tensor):
            return float(value)
        copy = self._copies.get(id(value))
        if copy is None or copy[0] is not value or copy[1] != value._version:
            copy = (value, value._version, float(value))
            self._copies[id(value)] = copy
        return copy[2]

    def write(self, group: dict[str, Any], key: str, value: float) -> None:
        """:func:`set_group_value`, remembering what a tensor now holds."""
        set_group_value(group, key, value)
        tensor = group[key]
        if isinstance(tensor, Tensor):
            held = torch.empty((), dtype=tensor.dtype).fill_(value).item()  # rounded as the device's fill_ rounds
            self._copies[id(tensor)] = (tensor, tensor._version, held)
