"""The Triton path of FusedPILoTSGD: one launch of ``pilot_kernels.pilot_sgd`` per bucket, and the kernel tables
it builds on the host and keeps while they stay valid.

A step never makes the host wait for the device. A table is copied from pinned memory without blocking the host
(:func:`upload`) only when what it holds changes: gradient addresses, the set of parameters with gradients, or a
group's hyper-parameters (see :meth:`TritonStep._update_hyper_table`). So a steady step is one launch per bucket
and, under a per-step schedule of lr and alpha as numbers (LR schedulers, PILoTSchedule), one small
host-to-device copy of the hyper table; with capturable=True, one device copy of the lr and alpha tensors instead.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import Tensor

import pilot_kernels
from pilot_kernels import pilot_sgd as kernel

from .layout import Bucket, Entry, StepArgs, Work
from .sharding import local

# group key -> hyper_table column of the hyper-parameters that schedules change at every step: written into the
# table on the device at every step, never uploaded (read from device tensors when capturable=True)
SCHEDULED_COLUMNS = {key: kernel.HyperRow._fields.index(key) for key in ("lr", "alpha")}
# Block tables kept, one per set of stepped tensors (parameters without a gradient are skipped): a model that
# alternates between a few such sets builds each once; the least recently used one goes beyond that.
BLOCK_TABLES_KEPT = 8


def group_flags(group: dict[str, Any], momentum: float) -> int:
    """The FLAG_* bits a parameter group (with this momentum, as a host number) sets on its tensors' rows."""
    return ((kernel.FLAG_MOMENTUM if momentum != 0 else 0) | (kernel.FLAG_NESTEROV if group["nesterov"] else 0)
            | (kernel.FLAG_MAXIMIZE if group["maximize"] else 0))


def make_capturable(group: dict[str, Any], keep: set[str]) -> None:
    """lr and alpha as 0-d fp32 tensors on the group's device, so that the step can read them there.

    A tensor the caller passed for this group (``keep``) is used as it is when it already is one, so the
    caller's own reference keeps working; anything else (numbers, tensors shared through the defaults or
    a loaded state dict) becomes a tensor of its own.
    """
    device = local(group["params"][0]).device if group["params"] else torch.device("cpu")
    for key in SCHEDULED_COLUMNS:
        value = group[key]
        usable = (isinstance(value, Tensor) and value.dim() == 0 and value.dtype == torch.float32
                  and value.device == device)
        if not (usable and key in keep):
            group[key] = torch.tensor(float(value), dtype=torch.float32, device=device)


def make_numbers(group: dict[str, Any]) -> None:
    """lr and alpha as numbers (e.g. from a capturable optimizer's checkpoint), as LR schedulers and the host
    expect them without capturable=True; one read from the device here rather than at every step."""
    for key in SCHEDULED_COLUMNS:
        if isinstance(group[key], Tensor):
            group[key] = group[key].item()


def capture_underway(devices: Sequence[torch.device] = ()) -> bool:
    """Whether the current CUDA stream of any of ``devices`` (CUDA devices; of the current device if none) is
    capturing a CUDA graph."""
    if not torch.cuda.is_initialized():
        return False
    if not devices:
        return torch.cuda.is_current_stream_capturing()
    for device in devices:
        with torch.cuda.device(device):
            if torch.cuda.is_current_stream_capturing():
                return True
    return False


def on_device(device: torch.device) -> ContextManager[Any]:
    """Make ``device`` the current CUDA device: Triton launches on the current device and its current stream,
    whatever device the tensors are on. Nothing to do for other devices."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def upload(table: str, device: torch.device, build: Callable[[], Tensor]) -> Tensor:
    """The kernel table ``build()`` returns on the host, on ``device`` (the current CUDA device); ``table`` names
    it in errors.

    Copied from pinned memory with non_blocking=True, so that the host does not wait for the device's queued
    work. The staging memory is safe to drop at once: torch's pinned-memory allocator records an event on the
    copy's stream and hands the block out again only after that event has completed.
    """
    if device.type != "cuda":
        return build()
    if capture_underway():
        raise RuntimeError(
            f"FusedPILoTSGD: the kernel's {table} (gradient addresses, hyper-parameters other than lr and alpha, "
            "or which parameters have gradients) changed while a CUDA graph was being captured. Run a few steps "
            "before capturing, keep the gradients at fixed addresses (zero_grad(set_to_none=False)) and "
            "change only lr and alpha (in place) between replays")
    return build().pin_memory().to(device, non_blocking=True)


class TritonStep:
    """One bucket's step on the Triton kernel, and its tables: the tensor table, keyed on the addresses of x and
    of the gradients and on the groups' flags (the rest of a row is fixed by the layout, and a new layout makes
    new buckets); a block table per set of stepped tensors (by their sizes, at most ``BLOCK_TABLES_KEPT``); the
    hyper table, keyed on the groups' host numbers (:meth:`_update_hyper_table`)."""

    bumps_versions = True  # by hand: the kernel writes through raw pointers, which autograd does not see

    def __init__(self, device: torch.device, capturable: bool) -> None:
        self.device, self.capturable = device, capturable
        self.tensor_table: tuple[tuple[int, ...], Optional[Tensor]] = ((), None)
        self.block_table: Optional[Tensor] = None  # of the entries in tensor_table
        self.block_tables: dict[tuple[int, ...], Tensor] = {}  # least recently used first
        self.hyper_table: tuple[list[kernel.HyperRow], Optional[Tensor]] = ([], None)  # see _update_hyper_table
        self.cells: dict[tuple[int, int], Tensor] = {}  # 0-d views of hyper_table's cells, by (row, column)
        self.stream: Optional[torch.cuda.Stream] = None  # of the last launch outside graph capture
        self.captured_tables: list[Tensor] = []  # tables a CUDA graph may still read: never freed

    @staticmethod
    def slots_of(numel: int) -> int:
        """One telemetry / momentum_started slot per kernel block."""
        return pilot_kernels.telemetry_slots(numel)

    def step(self, bucket: Bucket, work: Work, args: StepArgs) -> bool:
        """Launch the kernel over ``work.items``. Always True: a step that GradScaler's found_inf skips is skipped
        on the device."""
        device = self.device
        with on_device(device):
            key = (*args.flags, *work.pointers)
            if self.tensor_table[0] != key:
                self._build_tensor_table(key, work.items, args.flags)
            self._update_hyper_table(args)
            tables = [self.tensor_table[1], self.hyper_table[1], self.block_table]
            if device.type == "cuda":
                if capture_underway():  # the graph reads these tables at every replay: never freed
                    self.captured_tables += tables
                else:
                    self._use_on_current_stream(bucket, tables)
            kernel.launch_pilot_sgd(
                *tables, bucket.factors, bucket.buffers if bucket.buffers.numel() else bucket.factors,
                bucket.l1_slots, bucket.nnz_slots, bucket.started, bucket.dtype,
                grad_scale=_on(args.grad_scale, device), found_inf=_on(args.found_inf, device))
        # As torch.optim's in-place updates do, so that autograd catches a parameter (or an unscaled gradient)
        # saved for a backward that runs after the step. A staged parameter is bumped by its copy back.
        written = [e.local() for e, _ in work.items if e.stage is None]
        if args.grad_scale is not None:
            written += [grad for _, grad in work.items]
        torch.autograd.graph.increment_version(written)
        return True

    def _build_tensor_table(self, key: tuple[int, ...], work: list[tuple[Entry, Tensor]],
                            flags: tuple[int, ...]) -> None:
        rows = []
        for e, grad in work:
            aligned = e.x_ptr % kernel.ADDRESS_ALIGN == 0 and grad.data_ptr() % kernel.ADDRESS_ALIGN == 0
            row_flags = (flags[e.group] | (kernel.FLAG_FACTORISED if e.factorised else 0)
                         | (kernel.FLAG_ALIGNED if aligned else 0))
            rows.append(kernel.TensorRow(x=e.x_ptr, grad=grad.data_ptr(), numel=e.numel, m=e.m_offset,
                                         w=e.w_offset, buf_m=e.buffer_offset, buf_w=e.buffer_w_offset,
                                         flags=row_flags, hyper=e.group, slot=e.slot))
        self.tensor_table = (
            key, upload("tensor table", self.device, lambda: torch.tensor(rows, dtype=kernel.TENSOR_TABLE_DTYPE)))
        self.block_table = self._block_table(tuple(e.numel for e, _ in work))

    def _block_table(self, numels: tuple[int, ...]) -> Tensor:
        """The block table of tensors of these sizes: kept from before, or built (dropping the least recently
        used beyond BLOCK_TABLES_KEPT)."""
        table = self.block_tables.pop(numels, None)
        if table is None:
            table = upload("block table", self.device,
                           lambda: kernel.build_block_table(numels, torch.device("cpu")))
            if len(self.block_tables) >= BLOCK_TABLES_KEPT:
                del self.block_tables[next(iter(self.block_tables))]
        self.block_tables[numels] = table  # now the most recently used
        return table

    def _update_hyper_table(self, args: StepArgs) -> None:
        """The hyper table on the device, with this step's values.

        Its rows are the groups' host numbers, lr and alpha included when they are numbers (0 where they are
        tensors). Built once; when a number changes (lr and alpha under a per-step schedule, OneCycleLR's momentum)
        a new table is uploaded, one pinned non-blocking copy and no kernel, or with capturable=True the changed
        cells are written on the device, so that the table a captured graph reads stays where it is and nothing
        is copied from the host during capture (a captured graph keeps the numbers it captured, as torch's
        capturable optimizers do). lr and alpha tensors (always, with capturable=True) are copied into their cells
        by the device at every step, so that a captured graph reads their in-place edits."""
        rows, copies = [], []  # copies: (row, column, tensor)
        for index, (row, group) in enumerate(zip(args.hypers, args.groups)):
            numbers = {}
            for key, column in SCHEDULED_COLUMNS.items():
                value = group[key]
                if isinstance(value, Tensor):
                    copies.append((index, column, value))
                    numbers[key] = 0.0
                elif self.capturable:
                    raise TypeError(
                        f"capturable=True: group {index}'s {key} was set to {type(value).__name__} {value!r}; "
                        f"update the tensor in place instead (group[{key!r}].fill_(value), as torch's LR "
                        "schedulers do), so that a captured CUDA graph sees the change")
                else:
                    numbers[key] = float(value)
            rows.append(row._replace(**numbers))
        old_rows, table = self.hyper_table
        if table is None or (rows != old_rows and not self.capturable):
            table = upload("hyper table", self.device, lambda: torch.tensor(rows, dtype=kernel.HYPER_TABLE_DTYPE))
            self.cells = {}
        elif rows != old_rows:
            changed = [(r, c) for r, (new, old) in enumerate(zip(rows, old_rows))
                       for c, (a, b) in enumerate(zip(new, old)) if a != b]
            targets = [self._cell(table, r, c) for r, c in changed]
            torch._foreach_zero_(targets)  # torch has no foreach fill taking a list of numbers: zero, then add them
            torch._foreach_add_(targets, [rows[r][c] for r, c in changed])
        self.hyper_table = (rows, table)
        if copies:
            torch._foreach_copy_([self._cell(table, r, c) for r, c, _ in copies],
                                 [v.to(self.device, torch.float32, non_blocking=True).reshape(()) for *_, v in copies])

    def _cell(self, table: Tensor, row: int, column: int) -> Tensor:
        """A 0-d view of one cell of the hyper table, kept while the table is."""
        cell = self.cells.get((row, column))
        if cell is None:
            cell = self.cells[(row, column)] = table[row, column]
        return cell

    def _use_on_current_stream(self, bucket: Bucket, tables: list[Tensor]) -> None:
        """Tell the caching allocator that the current stream uses the tables and the bucket's storages, when it is
        not the stream of the last launch (e.g. after warming up on a side stream, as CUDA graph capture wants):
        memory allocated on one stream and freed later (a rebuilt table, a new layout) is otherwise handed out
        again on that stream while this one may still be reading it."""
        stream = torch.cuda.current_stream(self.device)
        if stream == self.stream:
            return
        # Every kept block table, not only the current one: one made on the old stream may be picked again later
        storages = [*tables, *self.block_tables.values(), bucket.factors, bucket.buffers, bucket.l1_slots,
                    bucket.nnz_slots, bucket.started,
                    *(e.stage for e in bucket.staged),
                    *(e.grad_stage for e in bucket.entries if e.grad_stage is not None)]
        for storage in storages:
            if storage.numel():
                storage.record_stream(stream)
        self.stream = stream


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device)
