"""Multi-tensor fused PILoT-SGD step: kernel, tables and launcher.

One launch updates every tensor of a (device, dtype) group. Each tensor is either

* factorised, x = m * w with fp32 factors m, w (and momentum buffers b_m, b_w) held in
  flat caller-owned fp32 storage: the kernel reads g, m, w, b_m, b_w once, writes
  m, w, b_m, b_w and x = m * w once (40 bytes per fp32 element), or
* plain: torch.optim.SGD's update of x with weight decay and one momentum buffer b
  (read x, g, b; write x, b).

Per element of a factorised tensor (``alpha`` is weight decay on the factors)::

    g   = -g if maximize else g          (g / grad_scale first when a scale is given, written back to g)
    g_m = g * w + alpha * m ;  g_w = g * m + alpha * w
    b   = g_ on the block's first momentum step, else momentum * b + (1 - dampening) * g_
    g_  = g_ + momentum * b if nesterov else b            (for g_m and g_w)
    m  -= lr * g_m ;  w -= lr * g_w ;  x = m * w  (rounded to x's dtype on store)

The kernel knows nothing of optimizers: the caller describes the tensors in three tables.

``tensor_table`` (int64, one row of ``TABLE_COLUMNS`` per tensor, see the ``COL_*`` indices):
addresses of x and its gradient (``data_ptr()``), numel, element offsets of m, w, b_m, b_w in
the flat storages (multiples of ``SEGMENT_ALIGN``), ``FLAG_*`` bits, the row of the tensor's
hyper-parameters in ``hyper_table``, and its first slot (one slot per block in ``l1_slots``,
``nnz_slots`` and ``momentum_started``).
``hyper_table`` (fp32, one row of ``HYPER_COLUMNS`` per parameter group): lr, alpha,
weight_decay, momentum, 1 - dampening.
``block_table`` (int32, one (tensor row, block index) pair per program), from
``build_block_table``.

Rounding: every multiply-add is an explicit ``tl.fma`` in the order torch.optim.SGD's kernels compute it
(``a.add(b, alpha=c)`` is fma(b, c, a) in torch's CPU and CUDA kernels; ``buf.mul_(momentum).add_(d, alpha=1 -
dampening)`` rounds the product first), so a compiled kernel rounds plain parameters as torch.optim.SGD does
and factorised ones as SGD does on the factors. Triton's interpreter evaluates ``tl.fma`` as a product and a sum,
each rounded to fp32: there results may differ from torch's by an ulp per multiply-add.

Every program handles ``BLOCK_SIZE`` consecutive elements of one tensor. Full blocks of tensors
whose x and grad are 16-byte aligned take a path without masks and with alignment hints, so every
stream is moved with 128-bit loads and stores; tail blocks and unaligned tensors take the masked
path. A program of a factorised tensor writes the block's sum of |x| and count of x != 0 to its
telemetry slot (deterministic: no atomics); the caller sums the slots. With a grad_scale the kernel also
writes the unscaled gradient back (one more store per element, 44 bytes per fp32 factorised element).

Whether a block's momentum buffers already hold a value lives on the device, in its
``momentum_started`` slot (int32, 0 = not yet), which the block's own program reads and sets (no
race: one program per block). So a first step that GradScaler skips (``found_inf``) leaves the slot at
0 and the next step still takes b = g, without the host ever reading ``found_inf``; and the tables
stay the same from the first step on, which CUDA graph capture needs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024  # elements per program: 8 per thread with 4 warps, i.e. two 128-bit fp32 vectors
NUM_WARPS = 4
SEGMENT_ALIGN = 32  # flat-storage segments start on 128-byte boundaries (fp32), for aligned vectors
ADDRESS_ALIGN = 16  # bytes: x and grad addresses needed for the vectorised path
_INT32_MAX = 2**31 - 1

# tensor_table columns
COL_X, COL_GRAD, COL_NUMEL, COL_M, COL_W, COL_BUF_M, COL_BUF_W, COL_FLAGS, COL_HYPER, COL_SLOT = range(10)
TABLE_COLUMNS = 10
# hyper_table columns
HYPER_LR, HYPER_ALPHA, HYPER_WEIGHT_DECAY, HYPER_MOMENTUM, HYPER_ONE_MINUS_DAMPENING = range(5)
HYPER_COLUMNS = 5

FLAG_FACTORISED = 1  # x = m * w; else plain SGD (b_m is its momentum buffer, m/w/b_w unused)
FLAG_MOMENTUM = 2  # momentum != 0: read/write the buffers (b = g where the block's momentum has not started)
FLAG_NESTEROV = 4
FLAG_MAXIMIZE = 8
FLAG_ALIGNED = 16  # x and grad are ADDRESS_ALIGN-byte aligned: full blocks may use vector accesses

# The same layout as compile-time constants: Triton kernels only read globals that are constexpr objects.
_COL_X = tl.constexpr(COL_X)
_COL_GRAD = tl.constexpr(COL_GRAD)
_COL_NUMEL = tl.constexpr(COL_NUMEL)
_COL_M = tl.constexpr(COL_M)
_COL_W = tl.constexpr(COL_W)
_COL_BUF_M = tl.constexpr(COL_BUF_M)
_COL_BUF_W = tl.constexpr(COL_BUF_W)
_COL_FLAGS = tl.constexpr(COL_FLAGS)
_COL_HYPER = tl.constexpr(COL_HYPER)
_COL_SLOT = tl.constexpr(COL_SLOT)
_TABLE_COLUMNS = tl.constexpr(TABLE_COLUMNS)
_HYPER_LR = tl.constexpr(HYPER_LR)
_HYPER_ALPHA = tl.constexpr(HYPER_ALPHA)
_HYPER_WEIGHT_DECAY = tl.constexpr(HYPER_WEIGHT_DECAY)
_HYPER_MOMENTUM = tl.constexpr(HYPER_MOMENTUM)
_HYPER_ONE_MINUS_DAMPENING = tl.constexpr(HYPER_ONE_MINUS_DAMPENING)
_HYPER_COLUMNS = tl.constexpr(HYPER_COLUMNS)
_FLAG_FACTORISED = tl.constexpr(FLAG_FACTORISED)
_FLAG_MOMENTUM = tl.constexpr(FLAG_MOMENTUM)
_FLAG_NESTEROV = tl.constexpr(FLAG_NESTEROV)
_FLAG_MAXIMIZE = tl.constexpr(FLAG_MAXIMIZE)
_FLAG_ALIGNED = tl.constexpr(FLAG_ALIGNED)
_SEGMENT_ALIGN = tl.constexpr(SEGMENT_ALIGN)

TORCH_TO_TRITON_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _load(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=mask)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _momentum_direction(d, buf_ptr, offs, mask, momentum, one_minus_dampening, first, nesterov,
                        MASKED: tl.constexpr):
    """Update the momentum buffer at buf_ptr with direction d; return the step direction.

    Multiply-adds are explicit fmas in the order of torch.optim.SGD (see the module docstring)."""
    if first:
        buf = d
    else:
        buf = tl.fma(d, one_minus_dampening, momentum * _load(buf_ptr, offs, mask, MASKED))
    _store(buf_ptr, offs, buf, mask, MASKED)
    # One return statement: Triton inlines the helper, so the caller's alignment facts reach these accesses.
    return tl.where(nesterov, tl.fma(buf, momentum, d), buf)


@triton.jit
def _step_block(factor_ptr, momentum_ptr, row, hyper_ptr, l1_ptr, nnz_ptr, started_ptr, grad_scale_ptr, start, numel,
                flags, X_DTYPE: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)  # int64: tensors may exceed 2**31 elements
    mask = offs < numel
    # The addresses are loaded here, not in the caller, so that the alignment hints of the unmasked
    # variant sit on values of their own and never leak into the masked one.
    x_ptr = tl.load(row + _COL_X).to(tl.pointer_type(X_DTYPE))
    grad_ptr = tl.load(row + _COL_GRAD).to(tl.pointer_type(X_DTYPE))
    if not MASKED:
        x_ptr = tl.multiple_of(x_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)

    hyper = hyper_ptr + tl.load(row + _COL_HYPER) * _HYPER_COLUMNS
    lr = tl.load(hyper + _HYPER_LR)
    momentum = tl.load(hyper + _HYPER_MOMENTUM)
    one_minus_dampening = tl.load(hyper + _HYPER_ONE_MINUS_DAMPENING)
    has_momentum = (flags & _FLAG_MOMENTUM) != 0
    nesterov = (flags & _FLAG_NESTEROV) != 0
    slot = tl.load(row + _COL_SLOT) + start // BLOCK
    first = has_momentum & (tl.load(started_ptr + slot) == 0)

    g = _load(grad_ptr, offs, mask, MASKED).to(tl.float32)
    if HAS_GRAD_SCALE:
        # Unscale on load and write the unscaled gradient back, as torch's fused optimizers do: code that reads
        # .grad after GradScaler.step (norm logging, a second step) must see the true gradient.
        g = g / tl.load(grad_scale_ptr)
        _store(grad_ptr, offs, g.to(X_DTYPE), mask, MASKED)
    if (flags & _FLAG_MAXIMIZE) != 0:
        g = -g
    if (flags & _FLAG_FACTORISED) != 0:
        alpha = tl.load(hyper + _HYPER_ALPHA)
        m_ptr = factor_ptr + tl.multiple_of(tl.load(row + _COL_M), _SEGMENT_ALIGN)
        w_ptr = factor_ptr + tl.multiple_of(tl.load(row + _COL_W), _SEGMENT_ALIGN)
        m = _load(m_ptr, offs, mask, MASKED)
        w = _load(w_ptr, offs, mask, MASKED)
        d_m = tl.fma(m, alpha, g * w)
        d_w = tl.fma(w, alpha, g * m)
        if has_momentum:
            buf_m_ptr = momentum_ptr + tl.multiple_of(tl.load(row + _COL_BUF_M), _SEGMENT_ALIGN)
            buf_w_ptr = momentum_ptr + tl.multiple_of(tl.load(row + _COL_BUF_W), _SEGMENT_ALIGN)
            d_m = _momentum_direction(d_m, buf_m_ptr, offs, mask, momentum, one_minus_dampening, first, nesterov,
                                      MASKED)
            d_w = _momentum_direction(d_w, buf_w_ptr, offs, mask, momentum, one_minus_dampening, first, nesterov,
                                      MASKED)
        m = tl.fma(d_m, -lr, m)
        w = tl.fma(d_w, -lr, w)
        _store(m_ptr, offs, m, mask, MASKED)
        _store(w_ptr, offs, w, mask, MASKED)
        x = (m * w).to(X_DTYPE)
        _store(x_ptr, offs, x, mask, MASKED)
        # Telemetry of the value the model holds; masked-off lanes loaded zeros, so their x is 0.
        stored = x.to(tl.float32)
        tl.store(l1_ptr + slot, tl.sum(tl.abs(stored), axis=0))
        tl.store(nnz_ptr + slot, tl.sum((stored != 0).to(tl.int64), axis=0))
    else:
        weight_decay = tl.load(hyper + _HYPER_WEIGHT_DECAY)
        x_old = _load(x_ptr, offs, mask, MASKED).to(tl.float32)
        d = tl.fma(x_old, weight_decay, g)
        if has_momentum:
            buf_ptr = momentum_ptr + tl.multiple_of(tl.load(row + _COL_BUF_M), _SEGMENT_ALIGN)
            d = _momentum_direction(d, buf_ptr, offs, mask, momentum, one_minus_dampening, first, nesterov, MASKED)
        _store(x_ptr, offs, tl.fma(d, -lr, x_old).to(X_DTYPE), mask, MASKED)
    if first:
        tl.store(started_ptr + slot, 1)


@triton.jit
def pilot_sgd_kernel(tensor_table_ptr, hyper_ptr, block_table_ptr, factor_ptr, momentum_ptr, l1_ptr, nnz_ptr,
                     started_ptr, grad_scale_ptr, found_inf_ptr, X_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0  # GradScaler saw inf/nan: the whole step is a no-op
    if not skip:
        pid = tl.program_id(0)
        row = tensor_table_ptr + tl.load(block_table_ptr + 2 * pid).to(tl.int64) * _TABLE_COLUMNS
        start = tl.load(block_table_ptr + 2 * pid + 1).to(tl.int64) * BLOCK
        numel = tl.load(row + _COL_NUMEL)
        flags = tl.load(row + _COL_FLAGS)
        if (start + BLOCK <= numel) & ((flags & _FLAG_ALIGNED) != 0):
            _step_block(factor_ptr, momentum_ptr, row, hyper_ptr, l1_ptr, nnz_ptr, started_ptr, grad_scale_ptr, start,
                        numel, flags, X_DTYPE, BLOCK, HAS_GRAD_SCALE, MASKED=False)
        else:
            _step_block(factor_ptr, momentum_ptr, row, hyper_ptr, l1_ptr, nnz_ptr, started_ptr, grad_scale_ptr, start,
                        numel, flags, X_DTYPE, BLOCK, HAS_GRAD_SCALE, MASKED=True)


def build_block_table(numels: Sequence[int], device: torch.device, block: int = BLOCK_SIZE) -> torch.Tensor:
    """(tensor row, block index) int32 pairs covering tensors of the given sizes, one per program.

    Block indices are int32 (the kernel widens them to int64 before multiplying by ``block``), so a tensor
    may have up to 2**31 - 1 blocks, i.e. about 2**41 elements with the default block.
    """
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    if counts.numel() and int(counts.sum()) > _INT32_MAX:
        raise ValueError(f"{int(counts.sum())} blocks do not fit the int32 block table (at most {_INT32_MAX})")
    rows = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_block = torch.cumsum(counts, 0) - counts
    blocks = torch.arange(rows.numel(), dtype=torch.int64) - torch.repeat_interleave(first_block, counts)
    return torch.stack([rows, blocks], dim=1).to(torch.int32).contiguous().to(device)


def telemetry_slots(numel: int, block: int = BLOCK_SIZE) -> int:
    """Number of slots (blocks) a tensor of this size uses in ``l1_slots``, ``nnz_slots``, ``momentum_started``."""
    return triton.cdiv(numel, block)


def launch_pilot_sgd(tensor_table: torch.Tensor, hyper_table: torch.Tensor, block_table: torch.Tensor,
                     factors: torch.Tensor, momentum: torch.Tensor, l1_slots: torch.Tensor,
                     nnz_slots: torch.Tensor, momentum_started: torch.Tensor, x_dtype: torch.dtype, *,
                     grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """One launch of the fused step over every tensor in ``tensor_table`` (see the module docstring).

    ``factors`` and ``momentum`` are the flat fp32 storages the offsets point into (``momentum`` may be any
    fp32 tensor when no row has FLAG_MOMENTUM); ``l1_slots`` (fp32) and ``nnz_slots`` (int64) receive the
    telemetry of factorised tensors; ``momentum_started`` (int32, read and set by blocks with momentum) says
    which blocks' buffers hold a value. All three have one slot per block. ``grad_scale`` (the gradients are divided by it) and ``found_inf``
    (non-zero: skip the step) are one-element fp32 tensors on the same device, as torch.amp.GradScaler
    hands them to fused optimizers.
    """
    if x_dtype not in TORCH_TO_TRITON_DTYPE:
        raise TypeError(f"unsupported parameter dtype {x_dtype}; expected one of {list(TORCH_TO_TRITON_DTYPE)}")
    if tensor_table.dtype != torch.int64 or tensor_table.dim() != 2 or tensor_table.shape[1] != TABLE_COLUMNS:
        raise ValueError(f"tensor_table must be int64 of shape (tensors, {TABLE_COLUMNS})")
    if hyper_table.dtype != torch.float32 or hyper_table.dim() != 2 or hyper_table.shape[1] != HYPER_COLUMNS:
        raise ValueError(f"hyper_table must be float32 of shape (groups, {HYPER_COLUMNS})")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[1] != 2:
        raise ValueError("block_table must be int32 of shape (blocks, 2)")
    for name, storage in (("factors", factors), ("momentum", momentum)):
        if storage.dtype != torch.float32 or not storage.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor")
    if momentum_started.dtype != torch.int32 or not momentum_started.is_contiguous():
        raise ValueError("momentum_started must be a contiguous int32 tensor")
    if block_table.shape[0] == 0:
        return
    dummy = factors  # unused pointer argument when the matching constexpr flag is off
    pilot_sgd_kernel[(block_table.shape[0],)](
        tensor_table, hyper_table, block_table, factors, momentum, l1_slots, nnz_slots, momentum_started,
        grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
        X_DTYPE=TORCH_TO_TRITON_DTYPE[x_dtype], BLOCK=BLOCK_SIZE,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, num_warps=NUM_WARPS)
