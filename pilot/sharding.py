"""FSDP2 support: parameters that are DTensors are stepped on this rank's shard (``docs/math.md`` is per element,
so a shard is stepped like a whole tensor); their state is exposed sharded and telemetry is summed over ranks."""
from __future__ import annotations

from typing import Any

from torch import Tensor

try:  # FSDP2 parameters are DTensors; torch may be built without distributed support
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - such builds have no sharded parameters to handle
    DTensor = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def whole(t: Tensor) -> Tensor:
    """t as a whole tensor: a DTensor's ``full_tensor()`` (a collective: every rank must call it), else t itself.

    For reductions of DTensor parameters, such as ``(p == 0).sum()``: their result is a Partial DTensor, and
    ``int()`` or ``float()`` of it read this rank's partial value, silently, not the sum over the shards."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: Tensor) -> Tensor:
    """The tensor the step works on: this rank's shard of a DTensor (FSDP2), else t itself.

    Detached: a view sharing the shard's memory and version counter.
    """
    return t.to_local().detach() if is_dtensor(t) else t


def like_param(local_state: Tensor, p: Tensor) -> Tensor:
    """State shaped like p's local tensor, exposed as p is: wrapped in a DTensor with p's sharding for a DTensor
    p (so that state dicts and torch.distributed.checkpoint see sharded state), else as it is."""
    if not is_dtensor(p):
        return local_state
    return DTensor.from_local(local_state, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def local_shard_of(value: Tensor, p: Tensor) -> Tensor:
    """The part of a loaded state tensor (shaped like p) that this rank keeps for p."""
    if is_dtensor(p):
        if not is_dtensor(value):  # a full tensor (e.g. a checkpoint of an unsharded run): every rank slices its own
            value = distribute_tensor(value.to(local(p).device), p.device_mesh, p.placements, src_data_rank=None)
        elif value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local()
    return value.full_tensor() if is_dtensor(value) else value


def shard_groups(p: Tensor) -> tuple[Any, ...]:
    """The process groups over which p's shards must be summed (mesh dimensions that shard it); () if none."""
    if not is_dtensor(p):
        return ()
    return tuple(p.device_mesh.get_group(dim) for dim, placement in enumerate(p.placements) if placement.is_shard())


def sum_over_shards(total: Tensor, process_groups: tuple[Any, ...]) -> Tensor:
    """All-reduce (sum) ``total`` in place over each of the process groups; a collective on every rank."""
    for process_group in process_groups:
        dist.all_reduce(total, group=process_group)
    return total
