"""The Triton path of FusedPILoTSGD: one launch of ``pilot_kernels.pilot_sgd`` per bucket, and the kernel tables
it builds on the host and keeps while they stay valid."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

import pilot_kernels
from pilot_kernels import pilot_sgd as kernel

from .layout import Bucket, Entry, StepArgs, Work
from .sharding import local

# group key -> hyper_table column, read from device tensors by the step when capturable=True
CAPTURABLE_COLUMNS = {key: kernel.HyperRow._fields.index(key) for key in ("lr", "alpha")}


def group_flags(group: dict[str, Any]) -> int:
    """The FLAG_* bits a parameter group sets on its tensors' rows."""
    return ((kernel.FLAG_MOMENTUM if group["momentum"] != 0 else 0) | (kernel.FLAG_NESTEROV if group["nesterov"] else 0)
            | (kernel.FLAG_MAXIMIZE if group["maximize"] else 0))


def make_capturable(group: dict[str, Any], keep: set[str]) -> None:
    """lr and alpha as 0-d fp32 tensors on the group's device, so that the step can read them there.

    A tensor the caller passed for this group (``keep``) is used as it is when it already is one, so the
    caller's own reference keeps working; anything else (numbers, tensors shared through the defaults or
    a loaded state dict) becomes a tensor of its own.
    """
    device = local(group["params"][0]).device if group["params"] else torch.device("cpu")
    for key in CAPTURABLE_COLUMNS:
        value = group[key]
        usable = (isinstance(value, Tensor) and value.dim() == 0 and value.dtype == torch.float32
                  and value.device == device)
        if not (usable and key in keep):
            group[key] = torch.tensor(float(value), dtype=torch.float32, device=device)


def stream_is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def upload(device: torch.device, build: Callable[[], Tensor]) -> Tensor:
    """A host-built kernel table, copied to the device (which CUDA graph capture forbids)."""
    if stream_is_capturing(device):
        raise RuntimeError(
            "FusedPILoTSGD: a kernel table (gradient addresses, hyper-parameters other than lr and alpha, or "
            "which parameters have gradients) changed while a CUDA graph was being captured. Run a few steps "
            "before capturing, keep the gradients at fixed addresses (zero_grad(set_to_none=False)) and "
            "change only lr and alpha (in place) between replays")
    return build().to(device)


class TritonStep:
    """One bucket's step on the Triton kernel. Caches the tensor table (keyed on the addresses of x and of the
    gradients and on the groups' flags: the rest of a row is fixed by the layout, and a new layout makes new
    buckets), the block table of each set of stepped entries, and the hyper table."""

    bumps_versions = False  # the kernel writes through raw pointers (in Triton's interpreter too)

    def __init__(self, device: torch.device, capturable: bool) -> None:
        self.device, self.capturable = device, capturable
        self.tensor_table: tuple[tuple[int, ...], Optional[Tensor]] = ((), None)
        self.block_table: Optional[Tensor] = None  # of the entries in tensor_table
        self.block_tables: dict[tuple[int, ...], Tensor] = {}
        self.hyper_table: tuple[tuple[kernel.HyperRow, ...], Optional[Tensor]] = ((), None)
        self.captured_tables: list[Tensor] = []  # tables a CUDA graph may still read: never freed

    @staticmethod
    def slots_of(numel: int) -> int:
        """One telemetry / momentum_started slot per kernel block."""
        return pilot_kernels.telemetry_slots(numel)

    def step(self, bucket: Bucket, work: Work, args: StepArgs) -> bool:
        """Launch the kernel over ``work.items``. Always True: a step that GradScaler's found_inf skips is skipped
        on the device."""
        device = self.device
        key = (*args.flags, *work.pointers)
        if self.tensor_table[0] != key:
            self._build_tensor_table(key, work.items, args.flags)
        self._update_hyper_table(args)
        if stream_is_capturing(device):  # the graph reads these tables at every replay: keep them alive
            self.captured_tables += [self.tensor_table[1], self.hyper_table[1], self.block_table]
        kernel.launch_pilot_sgd(
            self.tensor_table[1], self.hyper_table[1], self.block_table, bucket.factors,
            bucket.buffers if bucket.buffers.numel() else bucket.factors, bucket.l1_slots, bucket.nnz_slots,
            bucket.started, bucket.dtype, grad_scale=_on(args.grad_scale, device),
            found_inf=_on(args.found_inf, device))
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
        self.tensor_table = (key, upload(self.device, lambda: torch.tensor(rows, dtype=kernel.TENSOR_TABLE_DTYPE)))
        active = tuple(id(e) for e, _ in work)
        if active not in self.block_tables:
            self.block_tables[active] = upload(
                self.device, lambda: kernel.build_block_table([e.numel for e, _ in work], torch.device("cpu")))
        self.block_table = self.block_tables[active]

    def _update_hyper_table(self, args: StepArgs) -> None:
        """Upload the host part of the hyper table when it changed; with capturable=True, copy lr and alpha into it
        on the device (no host sync: the copy reads the group tensors, so a captured graph sees in-place edits)."""
        if self.hyper_table[0] != args.hypers:
            table = self.hyper_table[1]
            new = upload(self.device, lambda: torch.tensor(args.hypers, dtype=kernel.HYPER_TABLE_DTYPE))
            if self.capturable and table is not None and table.shape == new.shape:
                table.copy_(new)  # in place: a captured graph keeps reading this table
                new = table
            self.hyper_table = (args.hypers, new)
        if self.capturable:
            table = self.hyper_table[1]
            for key, column in CAPTURABLE_COLUMNS.items():
                values = []
                for index, group in enumerate(args.groups):
                    value = group[key]
                    if not isinstance(value, Tensor):
                        raise TypeError(
                            f"capturable=True: group {index}'s {key} was set to {type(value).__name__} {value!r}; "
                            f"update the tensor in place instead (group[{key!r}].fill_(value), as torch's LR "
                            "schedulers do), so that a captured CUDA graph sees the change")
                    values.append(value.to(self.device, torch.float32, non_blocking=True).reshape(()))
                table[:, column].copy_(torch.stack(values))


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device)
