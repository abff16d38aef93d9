"""Laying FusedPILoTSGD's state out in the flat storages of :mod:`pilot.layout`: once at construction, and again
after ``add_param_group``, ``load_state_dict``, unpickling, momentum switched on, or a parameter replaced by one of
another memory layout. Each time with a bounded peak of memory (tests/test_memory.py measures it):

* A new parameter is factorised straight into its place in the storage, in place (:func:`factorise_into`); other
  temporaries are per parameter (:func:`pilot.layout.record`): at most about one fp32 copy of the largest one.
* A storage whose contents would not move (the factors when momentum is switched on, a bucket that nothing was
  added to, an unpickled copy) is kept, not copied.
* Storages that must move are moved one at a time, in the order that needs less memory, and the old one is
  freed before the next is allocated. One storage cannot grow in place, so growing it (``add_param_group``) holds
  its old and new copies together: the peak is then the new state plus the larger of the bucket's two old
  storages (not the whole old state: 2x the state before).
* Loaded state is copied in from the caller's tensors one parameter at a time, after the old state was freed.
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Optional

import torch
from torch import Tensor

import pilot_kernels

from .factorisation import FACTOR_KEYS, PLAIN_KEYS, factorise_into, is_factorised
from .layout import Backend, Bucket, Entry, Layout, TorchViews, flat, is_non_overlapping_and_dense, record
from .sharding import is_dtensor, like_param, local, local_shard_of, shard_groups

KINDS = ("factors", "buffers")  # a bucket's two flat storages (attributes of Bucket), moved one at a time


def lay_out(optimizer: torch.optim.Optimizer, make_backend: Callable[[torch.device], Backend], old: Layout, *,
            own: Collection[tuple[torch.device, int]], set_params: bool = False) -> Layout:
    """Move every parameter's state into flat fp32 storage per (device, dtype); state entries become views.

    Args:
        old: the layout being replaced; its storages are freed as soon as their contents have moved.
        own: (device, address) of the storages that the optimizer owns (:func:`own_storages` of ``old``, or
            :func:`viewed_storages` of an unpickled copy): a storage that the state already views exactly where
            the new layout puts it is kept rather than copied. A caller's tensors (a loaded state dict) are always
            copied, so that two optimizers loaded from one state dict never share memory.
        set_params: overwrite every factorised parameter with round(m * w) (after loading factors).
    """
    for bucket in old.buckets:  # their views hold both old storages: they would outlive the first move
        for e in bucket.entries:
            e.views = None
    layout = _plan(optimizer, make_backend)
    old_buckets = {(b.device, b.dtype): b for b in old.buckets}
    for bucket in layout.buckets:
        _fill(bucket, optimizer.state, optimizer.param_groups, old_buckets.get((bucket.device, bucket.dtype)), own,
              set_params)
    return layout


def own_storages(layout: Layout) -> set[tuple[torch.device, int]]:
    """(device, address) of the layout's factor and buffer storages, for :func:`lay_out`'s ``own``."""
    return {(bucket.device, getattr(bucket, kind).data_ptr()) for bucket in layout.buckets for kind in KINDS
            if getattr(bucket, kind).numel()}


def viewed_storages(states: Any) -> set[tuple[torch.device, int]]:
    """(device, address) of every storage that a state tensor views, for :func:`lay_out`'s ``own`` when all of
    them are the optimizer's (an unpickled copy of its state)."""
    return {(local(value).device, local(value).untyped_storage().data_ptr()) for state in states.values()
            for value in state.values() if isinstance(value, Tensor)}


def _plan(optimizer: torch.optim.Optimizer, make_backend: Callable[[torch.device], Backend]) -> Layout:
    """The buckets and their entries, offsets and sizes; no storage yet."""
    buckets: dict[tuple[torch.device, torch.dtype], Bucket] = {}
    telemetry_index: dict[tuple[Any, ...], int] = {(): 0}
    layout = Layout(telemetry_groups=[((), torch.device("cpu"))])
    for group_index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            local_p = local(p)
            key = (local_p.device, p.dtype)
            if key not in buckets:
                buckets[key] = Bucket(local_p.device, p.dtype, make_backend(local_p.device))
            groups = shard_groups(p)
            if groups not in telemetry_index:  # same order on every rank: the order of the groups
                telemetry_index[groups] = len(layout.telemetry_groups)
                layout.telemetry_groups.append((groups, local_p.device))
            entry = Entry(p, group_index, is_factorised(optimizer, p), tuple(local_p.shape), local_p.numel(),
                          telemetry_index[groups], is_dtensor(p))
            bucket = buckets[key]
            if not is_non_overlapping_and_dense(local_p):
                entry.stage = torch.empty(local_p.shape, dtype=local_p.dtype, device=local_p.device)
                bucket.staged.append(entry)
            entry.stride = entry.stage.stride() if entry.stage is not None else local_p.stride()
            bucket.entries.append(entry)
            bucket.groups.add(group_index)
    layout.buckets = list(buckets.values())
    for bucket in layout.buckets:
        slots = 0
        for e in bucket.entries:
            e.slot = slots
            slots += bucket.backend.slots_of(e.numel)
    return layout


def _placements(e: Entry, kind: str) -> list[tuple[str, int]]:
    """(state key, element offset) of the entry's tensors in the bucket's storage ``kind``."""
    if kind == "factors":
        return list(zip(FACTOR_KEYS[:2], (e.m_offset, e.w_offset))) if e.factorised else []
    return list(zip(FACTOR_KEYS[2:] if e.factorised else PLAIN_KEYS, (e.buffer_offset, e.buffer_w_offset)))


def _sizes(bucket: Bucket, states: Any, groups: list[dict[str, Any]]) -> dict[str, int]:
    """Set the entries' offsets; the elements of each storage (no buffers while no entry uses momentum)."""
    factor_size = buffer_size = 0
    for e in bucket.entries:
        size = pilot_kernels.padded(e.numel)
        e.buffer_offset = buffer_size
        if e.factorised:
            e.m_offset, e.w_offset = factor_size, factor_size + size
            e.buffer_w_offset = buffer_size + size
            factor_size += 2 * size
            buffer_size += 2 * size
        else:
            buffer_size += size
    needs_buffers = any(states[e.param][e.buffer_keys[0]] is not None or float(groups[e.group]["momentum"]) != 0
                        for e in bucket.entries)
    return {"factors": factor_size, "buffers": buffer_size if needs_buffers else 0}


def _fill(bucket: Bucket, states: Any, groups: list[dict[str, Any]], old: Optional[Bucket],
          own: Collection[tuple[torch.device, int]], set_params: bool) -> None:
    """Give ``bucket`` its storages, with the state moved into them, new parameters factorised, the parameters
    set if ``set_params``, and each entry's views and telemetry."""
    sizes = _sizes(bucket, states, groups)
    moves = []
    for kind in KINDS:
        kept = _kept_storage(bucket, kind, states, sizes[kind], own)
        if kept is not None:
            setattr(bucket, kind, kept)
        else:
            moves.append(kind)
    if len(moves) == 2 and old is not None:
        moves.sort(key=lambda kind: _peak_moving_first(kind, sizes, old))
    for kind in moves:
        _move(bucket, kind, sizes[kind], states)
        if old is not None:
            setattr(old, kind, torch.empty(0))  # the last reference the optimizer holds: freed here
    device = bucket.device
    slots = sum(bucket.backend.slots_of(e.numel) for e in bucket.entries)
    bucket.l1_slots = torch.zeros(slots, dtype=torch.float32, device=device)
    bucket.nnz_slots = torch.zeros(slots, dtype=torch.int64, device=device)
    started = torch.zeros(slots, dtype=torch.int32)
    slot_groups = torch.zeros(slots, dtype=torch.int64)
    for e in bucket.entries:
        state = states[e.param]
        slot_range = slice(e.slot, e.slot + bucket.backend.slots_of(e.numel))
        started[slot_range] = int(state[e.buffer_keys[0]] is not None)
        if state[e.buffer_keys[0]] is None:
            bucket.pending_buffers.add(e)
        slot_groups[slot_range] = e.telemetry_group
        if e.factorised:
            _set_factors(bucket, e, state, groups[e.group]["beta"], set_params)
        segment = lambda storage, offset: (  # noqa: E731
            storage[offset:offset + e.numel].detach() if storage.numel() else None)
        slot = lambda slots_: slots_[e.slot:e.slot + 1].detach() if e.factorised else None  # noqa: E731
        e.views = TorchViews(
            x=e.stage.view(-1) if e.stage is not None else flat(e.local()).detach(),
            m=segment(bucket.factors, e.m_offset) if e.factorised else None,
            w=segment(bucket.factors, e.w_offset) if e.factorised else None,
            buffer=segment(bucket.buffers, e.buffer_offset),
            buffer_w=segment(bucket.buffers, e.buffer_w_offset) if e.factorised else None,
            l1=slot(bucket.l1_slots), nnz=slot(bucket.nnz_slots))
        record(bucket, e)
    bucket.started = started.to(device)
    bucket.slot_groups = slot_groups.to(device)
    bucket.telemetry_indices = sorted({e.telemetry_group for e in bucket.entries})


def _kept_storage(bucket: Bucket, kind: str, states: Any, size: int,
                  own: Collection[tuple[torch.device, int]]) -> Optional[Tensor]:
    """The optimizer's own storage that holds every state tensor of ``kind`` exactly where ``bucket`` places it
    (same storage, offset and strides, the storage of the new size), as a 1-D tensor; None if there is none.

    Keeping it is exact: every value stays where it is. The places of entries without a value hold stale numbers,
    which nothing reads: new factors are factorised over them, and a first momentum step sets its buffer to the
    gradient (``started`` is 0 there)."""
    found = None
    for e in bucket.entries:
        for key, offset in _placements(e, kind):
            value = states[e.param][key]
            if value is None:
                continue
            t = local(value)
            if (t.dtype != torch.float32 or t.device != bucket.device or tuple(t.shape) != e.shape
                    or t.storage_offset() != offset or t.stride() != e.stride):
                return None
            storage = t.untyped_storage()
            if found is None:
                found = storage
            elif storage.data_ptr() != found.data_ptr():
                return None
    if found is None or found.nbytes() != 4 * size or (bucket.device, found.data_ptr()) not in own:
        return None
    return torch.empty(0, dtype=torch.float32, device=bucket.device).set_(found, 0, (size,), (1,))


def _peak_moving_first(kind: str, sizes: dict[str, int], old: Bucket) -> int:
    """Elements held at the peak of moving ``kind`` first and then the other storage: the old storages and the
    first new one, then the first new one, the other's old and its new."""
    other = KINDS[1 - KINDS.index(kind)]
    before = {k: getattr(old, k).numel() for k in KINDS}
    return max(before[kind] + before[other] + sizes[kind], sizes[kind] + before[other] + sizes[other])


def _move(bucket: Bucket, kind: str, size: int, states: Any) -> None:
    """Allocate the storage ``kind`` and copy every state tensor of that kind into it, one parameter at a time
    (converted to fp32 and to this rank's shard as it is copied)."""
    storage = torch.zeros(size, dtype=torch.float32, device=bucket.device)
    setattr(bucket, kind, storage)
    for e in bucket.entries:
        state = states[e.param]
        for key, offset in _placements(e, kind):
            if state[key] is not None:
                view = storage.as_strided(e.shape, e.stride, offset)
                view.copy_(local_shard_of(state[key].detach(), e.param))
                state[key] = like_param(view, e.param)


def _set_factors(bucket: Bucket, e: Entry, state: dict[str, Any], beta: float, set_params: bool) -> None:
    """Factorise a new parameter into its factors' places in the storage and overwrite it with m0 * w0; with
    ``set_params``, overwrite a parameter that has factors with round(m * w)."""
    m, w = (bucket.factors.as_strided(e.shape, e.stride, offset) for offset in (e.m_offset, e.w_offset))
    new = state[FACTOR_KEYS[0]] is None
    if not (new or set_params):
        return
    local_p = e.local()
    with torch.no_grad():
        if new:
            factorise_into(local_p.detach().float(), m, w, beta)
            state.update(zip(FACTOR_KEYS[:2], (like_param(m, e.param), like_param(w, e.param))))
        torch.mul(m, w, out=local_p)  # rounded to the parameter's dtype once, as local_p.copy_(m * w) did
