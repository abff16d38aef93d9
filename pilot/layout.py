"""Where FusedPILoTSGD keeps its state: one :class:`Bucket` of flat fp32 storages per (device, dtype), one
:class:`Entry` per parameter with its offsets, and the parameter as the source of truth (weights written outside
the optimizer are factorised again). :mod:`pilot.storage` lays the state out in the buckets.

Offsets are element offsets of ``pilot_kernels.padded`` segments, as the kernel's :class:`TensorRow` wants them.
Sizes, offsets and addresses are those of the local tensor (:func:`pilot.sharding.local`): the whole parameter,
or this rank's shard of a DTensor.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Protocol

import torch
from torch import Tensor

import pilot_kernels

from .factorisation import BUFFER_KEYS, FACTOR_KEYS, factorise, factorise_into
from .sharding import like_param, local, sum_over_shards


def is_non_overlapping_and_dense(t: Tensor) -> bool:
    """True if t's elements fill exactly numel consecutive memory slots (contiguous up to a permutation)."""
    expected = 1
    for stride, size in sorted((stride, size) for stride, size in zip(t.stride(), t.shape) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_memory_order(shape: tuple[int, ...], strides: tuple[int, ...], others: tuple[int, ...]) -> bool:
    """Whether tensors of ``shape`` with these strides order their elements alike, as autograd compares layouts: the
    stride of a size-1 dimension moves nothing (a 1x1 conv weight's gradient may come back contiguous)."""
    return all(a == b for a, b, size in zip(strides, others, shape) if size != 1)


def flat(t: Tensor) -> Tensor:
    """1-D view of a non-overlapping, dense tensor in memory order."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,), t.storage_offset())


class TorchViews(NamedTuple):
    """An entry's tensors as the torch path takes them: 1-D, detached (no ``_base``, so that torch.compile guards
    on sizes only), in x's memory order. None where a storage is empty (no momentum) or the kind has none."""

    x: Tensor  # the parameter (or its stage)
    m: Optional[Tensor]
    w: Optional[Tensor]
    buffer: Optional[Tensor]  # b_m of a factorised parameter, b of a plain one
    buffer_w: Optional[Tensor]
    l1: Optional[Tensor]  # the entry's telemetry slot (factorised parameters)
    nnz: Optional[Tensor]


class GroupNumbers(NamedTuple):
    """A parameter group's hyper-parameters that may be one-element tensors, as host numbers (read from a tensor
    only when it changed: see ``FusedPILoTSGD._host_number``)."""

    weight_decay: float
    momentum: float
    dampening: float


class StepArgs(NamedTuple):
    """What one step() hands every bucket's backend."""

    groups: list[dict[str, Any]]  # the optimizer's param_groups
    numbers: tuple[GroupNumbers, ...]  # per group
    hypers: tuple[pilot_kernels.HyperRow, ...]  # per group; lr and alpha 0: backends read them from ``groups``
    flags: tuple[int, ...]  # per group: its FLAG_MOMENTUM / FLAG_NESTEROV / FLAG_MAXIMIZE bits
    grad_scale: Optional[Tensor]  # from torch.amp.GradScaler
    found_inf: Optional[Tensor]
    states: Any  # the optimizer's state


class Backend(Protocol):
    """A bucket's step implementation (pilot.triton_step.TritonStep, pilot.torch_step.TorchStep), chosen once
    when the state is laid out."""

    bumps_versions: bool  # whether its step bumps the parameters' version counters

    def slots_of(self, numel: int) -> int: ...

    def step(self, bucket: "Bucket", work: "Work", args: StepArgs) -> bool: ...


@dataclass(eq=False)
class Entry:
    """One parameter: where its state lives in the bucket's flat storages, and what the optimizer last saw."""

    param: Tensor
    group: int
    factorised: bool
    shape: tuple[int, ...]
    numel: int
    telemetry_group: int  # index into the optimizer's telemetry groups
    sharded: bool  # a DTensor (FSDP2): the step works on local(param)
    m_offset: int = 0  # element offsets in bucket.factors (factorised parameters)
    w_offset: int = 0
    buffer_offset: int = 0  # in bucket.buffers: b_m of a factorised parameter, b of a plain one
    buffer_w_offset: int = 0  # b_w
    slot: int = 0  # first telemetry / momentum_started slot (see Bucket)
    # A parameter that is not dense in memory is stepped in this dense, contiguous copy (the kernel and the torch
    # path walk x in memory order), copied in before and back after each step; None for every other parameter.
    stage: Optional[Tensor] = None
    # Where a gradient laid out unlike x is copied at each step (see restride): a fixed address, so that the
    # Triton path's tensor table stays valid; None until a gradient needs it.
    grad_stage: Optional[Tensor] = None
    stride: tuple[int, ...] = ()  # of x as the step walks it (the parameter's or its stage's), and of its state
    x_ptr: int = 0  # address the step writes x to: the parameter's, or its stage's
    data_ptr: int = 0  # the parameter's address, to notice `.data` being replaced ...
    version: int = 0  # ... or the parameter being written outside the optimizer
    views: Optional[TorchViews] = None

    @property
    def buffer_keys(self) -> tuple[str, ...]:
        return BUFFER_KEYS[self.factorised]

    def local(self) -> Tensor:
        return local(self.param) if self.sharded else self.param


class Bucket:
    """The parameters of one (device, dtype): flat fp32 storages and per-slot telemetry, stepped by ``backend``.

    Slots (``l1_slots``, ``nnz_slots``, ``started``): ``backend.slots_of(numel)`` per entry (one per kernel block
    on the Triton path, one per tensor on the torch path). ``started`` is 1 where the momentum buffers hold a value
    (see ``pilot_kernels.pilot_sgd``); ``slot_groups`` maps each slot to its telemetry group.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, backend: Backend) -> None:
        self.device, self.dtype, self.backend = device, dtype, backend
        self.entries: list[Entry] = []
        self.staged: list[Entry] = []  # entries with a stage
        self.groups: set[int] = set()  # parameter groups with an entry here
        self.pending_buffers: set[Entry] = set()  # entries whose momentum buffers are not in their state yet
        self.factors = self.buffers = self.l1_slots = self.nnz_slots = self.started = torch.empty(0)
        self.slot_groups = torch.empty(0, dtype=torch.int64)
        self.telemetry_indices: list[int] = []  # its entries' telemetry groups (indices into the layout's)


@dataclass
class Layout:
    """Every bucket, and the telemetry groups: (process groups to sum a parameter's shards over, device)."""

    buckets: list[Bucket] = field(default_factory=list)
    telemetry_groups: list[tuple[tuple[Any, ...], torch.device]] = field(default_factory=list)


def record(bucket: Bucket, e: Entry) -> None:
    """Remember the parameter as the optimizer leaves it, and recompute its telemetry from its value.

    Each slot is summed as ``x.abs().sum(dim=1)`` over all the tensor's slots at once would sum it (bit for bit: a
    step that changes nothing leaves the telemetry as it was), with temporaries of at most one fp32 copy of the
    parameter (one slot per tensor) or a few MiB (one slot per kernel block: ``RECORD_ROWS`` blocks at a time, the
    last block padded with zeros on its own)."""
    local_p = e.local()
    e.data_ptr, e.version = local_p.data_ptr(), local_p._version
    e.x_ptr = e.stage.data_ptr() if e.stage is not None else e.data_ptr
    if not e.factorised or e.numel == 0:
        return
    with torch.no_grad():  # in the order the step walks x: memory order, or a stage's (scratch until the step)
        x = e.stage.copy_(local_p).view(-1) if e.stage is not None else flat(local_p.detach())
        slots = bucket.backend.slots_of(e.numel)
        if slots == 1:
            x32 = x.float()  # an fp32 parameter itself: abs() makes the one copy; a low-precision one: float()
            bucket.l1_slots[e.slot:e.slot + 1] = (x32.abs() if x32 is x else x32.abs_()).view(1, -1).sum(dim=1)
            bucket.nnz_slots[e.slot] = torch.count_nonzero(x)
            return
        block = pilot_kernels.pilot_sgd.BLOCK_SIZE
        full = e.numel // block
        for first, last in _row_chunks(full):
            rows = x[first * block:last * block].view(last - first, block).float()
            bucket.l1_slots[e.slot + first:e.slot + last] = rows.abs().sum(dim=1)
            bucket.nnz_slots[e.slot + first:e.slot + last] = (rows != 0).sum(dim=1, dtype=torch.int32)
        if full < slots:
            tail = torch.nn.functional.pad(x[full * block:].float(), (0, slots * block - e.numel))
            bucket.l1_slots[e.slot + full] = tail.abs().sum()
            bucket.nnz_slots[e.slot + full] = torch.count_nonzero(tail)


# Blocks summed at once by record() (their |x|, x != 0 and its int32 sum: 9 B per element, at most 2.3 MiB with the
# remainder). Never fewer but for a smaller tensor: at least as many rows as a machine has threads, so that torch
# sums each row on its own rather than splitting rows across threads (which would sum them in another order).
RECORD_ROWS = 128


def _row_chunks(rows: int) -> list[tuple[int, int]]:
    """[first, last) ranges of ``RECORD_ROWS`` rows covering ``rows``; the remainder joins the last range."""
    bounds = list(range(0, rows - RECORD_ROWS, RECORD_ROWS)) or [0]
    return [(first, last) for first, last in zip(bounds, bounds[1:] + [rows])]


def expose_buffers(bucket: Bucket, e: Entry, state: dict[str, Any]) -> None:
    """Make the momentum buffers (already in bucket.buffers) visible in the parameter's state."""
    for key, offset in zip(e.buffer_keys, (e.buffer_offset, e.buffer_w_offset)):
        if state[key] is None:
            state[key] = like_param(bucket.buffers.as_strided(e.shape, e.stride, offset), e.param)


def settle_momentum(buckets: list[Bucket], states: Any) -> None:
    """Forget the buffers of parameters whose first momentum step the device skipped (GradScaler's found_inf).

    The host exposes a parameter's buffers after the launch of its first momentum step without reading
    found_inf; the device's ``started`` slots know whether that step ran. Reading them is a sync, so this
    runs only where the host state must be exact: before state dicts, pickling and re-laying the state.
    """
    for bucket in buckets:
        entries = [e for e in bucket.entries if e.numel and states[e.param][e.buffer_keys[0]] is not None]
        if not entries:
            continue
        # each entry's first slot only (its blocks step together): not the whole array, a slot per 1024 elements
        slots = torch.tensor([e.slot for e in entries], device=bucket.started.device)
        for e, started in zip(entries, bucket.started[slots].tolist()):
            if not started:
                for key in e.buffer_keys:
                    states[e.param][key] = None
                bucket.pending_buffers.add(e)


def refresh(bucket: Bucket, e: Entry, states: Any, groups: list[dict[str, Any]]) -> bool:
    """The parameter was written outside the optimizer (its address or version changed): factorise the entries
    whose value no longer equals round(m * w) again and restart their momentum. True if the state must be laid
    out again (another memory layout, or a stage needed or no longer needed)."""
    local_p = e.local()
    if local_p.device != bucket.device or local_p.dtype != bucket.dtype or tuple(local_p.shape) != e.shape:
        raise ValueError(
            f"a parameter changed device, dtype or shape after the optimizer was created (now {local_p.device}, "
            f"{local_p.dtype}, {tuple(local_p.shape)}; was {bucket.device}, {bucket.dtype}, {e.shape}); create the "
            "optimizer after moving or converting the model")
    if not is_non_overlapping_and_dense(local_p):
        if e.stage is None:
            return True
    elif e.stage is not None:
        return True  # dense again: step it in place
    state = {key: None if value is None else local(value) for key, value in states[e.param].items()}
    if e.factorised:
        refactorise(local_p, state, e.buffer_keys, groups[e.group]["beta"])
    if e.stage is None and not same_memory_order(e.shape, local_p.stride(), e.stride):
        return True  # `.data` replaced by another memory layout (e.g. channels_last): state must follow
    if e.stage is None and e.views is not None:
        e.views = e.views._replace(x=flat(local_p).detach())  # the torch path steps the new tensor
    record(bucket, e)
    return False


def refactorise(x: Tensor, state: dict[str, Any], buffer_keys: tuple[str, ...], beta: float) -> None:
    """Factorise again the entries of ``x`` that no longer equal round(m * w) and zero their momentum.

    Temporaries: a byte mask of x, and per ``REFRESH_CHUNK`` elements round(m * w) and the new factors. When
    every entry changed (e.g. a model state dict loaded) they are factorised in place, as at construction.
    """
    m, w = (state[key] for key in FACTOR_KEYS[:2])
    buffers = [state[key] for key in buffer_keys if state[key] is not None]
    with torch.no_grad():
        changed = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        for part in _chunks(x):
            product = torch.mul(part(m), part(w), out=torch.empty_like(part(x)))  # rounded once, as .to(x.dtype)
            torch.ne(part(x), product, out=part(changed))
            del product  # before the next chunk's
        if not bool(changed.any()):
            return
        if bool(changed.all()):
            factorise_into(x.detach().float(), m, w, beta)
            for buffer in buffers:
                buffer.zero_()
            return
        for part in _chunks(x):
            m0, w0 = factorise(part(x), beta)
            part(m).copy_(torch.where(part(changed), m0, part(m)))
            part(w).copy_(torch.where(part(changed), w0, part(w)))
            del m0, w0  # before the next chunk's
        for buffer in buffers:
            buffer.masked_fill_(changed, 0.0)


# Elements that refactorise() works on at once (half a MiB per fp32 temporary, a few of them), whatever the size
# of the tensor.
REFRESH_CHUNK = 2**17


def _chunks(x: Tensor) -> list[Callable[[Tensor], Tensor]]:
    """Functions that cut a tensor shaped like x into the same part: slices of about ``REFRESH_CHUNK`` elements
    along x's largest dimension (views, whatever the strides)."""
    if x.dim() == 0 or x.numel() == 0:
        return [lambda t: t]
    dim = max(range(x.dim()), key=lambda d: x.shape[d])
    size = x.shape[dim]
    width = max(1, REFRESH_CHUNK // (x.numel() // size))
    return [lambda t, start=start: t.narrow(dim, start, min(width, size - start)) for start in range(0, size, width)]


class Work(NamedTuple):
    """What a bucket steps: (entry, gradient in the entry's memory order) of the non-empty entries with a
    gradient, the addresses of their x and gradient in that order (the Triton path's table key), and the empty
    entries with a gradient."""

    items: list[tuple[Entry, Tensor]]
    pointers: list[int]
    empty: list[Entry]

    def stepped(self) -> list[Entry]:
        return [e for e, _ in self.items] + self.empty


def notice_outside_writes(layout: Layout, states: Any, groups: list[dict[str, Any]],
                          numbers: tuple[GroupNumbers, ...]) -> bool:
    """Refresh the entries of parameters written outside the optimizer; True if the state must be laid out again
    (see :func:`refresh`, or a group switched momentum on and its buffers need storage)."""
    relayout = False
    for bucket in layout.buckets:
        for e in bucket.entries:
            x = local(e.param) if e.sharded else e.param
            if x.data_ptr() != e.data_ptr or x._version != e.version:
                relayout |= refresh(bucket, e, states, groups)
        if not bucket.buffers.numel() and any(numbers[i].momentum != 0 for i in bucket.groups):
            relayout = True
    return relayout


def telemetry(layout: Layout) -> tuple[float, int]:
    """(sum |x|, count of x != 0) over the factorised parameters, from the telemetry slots the last step (or
    :func:`record`) wrote; the shards of DTensors summed over ranks (a collective where any parameter is one)."""
    sums: list[Optional[Tensor]] = [None] * len(layout.telemetry_groups)
    for bucket in layout.buckets:
        if not bucket.l1_slots.numel():
            continue
        per_slot = torch.stack([bucket.l1_slots.double(), bucket.nnz_slots.double()], dim=1)
        for index in bucket.telemetry_indices:  # sums in a fixed order (index_add_'s atomics vary in the last bits)
            in_group = per_slot if len(bucket.telemetry_indices) == 1 else torch.where(
                (bucket.slot_groups == index)[:, None], per_slot, 0)
            total, part = sums[index], in_group.sum(dim=0)
            sums[index] = part if total is None else total + part.to(total.device)
    l1, nonzero = 0.0, 0
    for (process_groups, device), total in zip(layout.telemetry_groups, sums):
        if total is None:  # no local slot (e.g. empty shards): a collective still needs this rank's zeros
            if not process_groups:
                continue
            total = torch.zeros(2, dtype=torch.float64, device=device)
        group_l1, group_nonzero = sum_over_shards(total, process_groups).tolist()
        l1 += group_l1
        nonzero += int(group_nonzero)
    return l1, nonzero


def collect(bucket: Bucket) -> Work:
    """The entries of ``bucket`` that have a gradient. Empty tensors are not stepped but count as stepped: their state
    must look like that of the other shards of the same parameter on other ranks (collectives and checkpoints expect
    the same keys)."""
    work = Work([], [], [])
    # Runs over every parameter at every step, and host time matters (the H100 kernel step of ResNet-50 takes
    # about 310 us): names are bound once
    add_item, add_pointer, strided = work.items.append, work.pointers.append, torch.strided
    for e in bucket.entries:
        grad = e.param.grad
        if grad is None:
            continue
        if not e.numel:
            work.empty.append(e)
            continue
        if e.sharded:
            grad = local(grad)
        if grad.layout is not strided:
            raise TypeError(f"FusedPILoTSGD does not support sparse gradients (parameter of shape "
                            f"{tuple(e.param.shape)} has a {grad.layout} gradient)")
        strides = grad.stride()  # the step walks x and its gradient in the same memory order
        if strides != e.stride and not same_memory_order(e.shape, strides, e.stride):
            grad = restride(e, grad)
        add_item((e, grad))
        add_pointer(e.x_ptr)
        add_pointer(grad.data_ptr())
    return work


def restride(e: Entry, grad: Tensor) -> Tensor:
    """``grad`` copied into the entry's grad stage, laid out as the step walks x (allocated at the first such
    gradient, with a warning: the copy costs a pass over the gradient at every step)."""
    if e.grad_stage is None:
        warnings.warn(
            f"FusedPILoTSGD: the gradient of a parameter of shape {e.shape} has strides {grad.stride()}, unlike "
            f"the parameter's {e.stride}; it is copied into the parameter's memory layout at every step. Give "
            "gradients the parameter's strides to avoid the copy (e.g. a .grad set by hand: made with "
            "torch.empty_like(param))", RuntimeWarning)
        e.grad_stage = torch.empty_strided(e.shape, e.stride, dtype=grad.dtype, device=grad.device)
    return e.grad_stage.copy_(grad)


def step_bucket(bucket: Bucket, work: Work, args: StepArgs) -> None:
    """One bucket's step around its backend's: stages copied in and back, gradients the backend unscaled in a copy
    written back to ``.grad``, buffers of a first momentum step exposed, and the versions the step left."""
    staged = [e for e in bucket.staged if e.param.grad is not None] if bucket.staged else []
    for e in staged:
        e.stage.copy_(e.local())
    if work.items and not bucket.backend.step(bucket, work, args):
        return  # skipped (GradScaler found inf): nothing happened
    for e in staged:
        e.local().copy_(e.stage)
    if args.grad_scale is not None:
        for e, grad in work.items:
            original = local(e.param.grad) if e.sharded else e.param.grad
            if grad.data_ptr() != original.data_ptr():
                original.copy_(grad)
    if bucket.pending_buffers:
        for e in work.stepped():
            if e in bucket.pending_buffers and args.numbers[e.group].momentum != 0:
                expose_buffers(bucket, e, args.states[e.param])
                bucket.pending_buffers.discard(e)
    for e in (work.stepped() if bucket.backend.bumps_versions else staged):
        e.version = e.local()._version
