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

``tensor_table`` (``TENSOR_TABLE_DTYPE``, one :class:`TensorRow` per tensor): addresses of x and
its gradient, numel, element offsets of m, w, b_m, b_w in the flat storages (multiples of
``SEGMENT_ALIGN``: lay segments out with :func:`padded`), ``FLAG_*`` bits, the tensor's row in
``hyper_table`` and its first slot (one slot per block in ``l1_slots``, ``nnz_slots`` and
``momentum_started``).
``hyper_table`` (``HYPER_TABLE_DTYPE``, one :class:`HyperRow` per parameter group): lr, alpha,
weight_decay, momentum, 1 - dampening.
``block_table`` (``BLOCK_TABLE_DTYPE``, one (tensor row, block index) pair per program), from
``build_block_table``.

Rounding: every multiply-add is an explicit ``tl.fma`` in the order torch.optim.SGD's kernels compute it
(``a.add(b, alpha=c)`` is fma(b, c, a) in torch's CPU and CUDA kernels; ``buf.mul_(momentum).add_(d, alpha=1 -
dampening)`` rounds the product first), so a compiled kernel rounds plain parameters as torch.optim.SGD does
and factorised ones as SGD does on the factors. Triton's interpreter evaluates ``tl.fma`` as a product and a sum,
each rounded to fp32: there results may differ from torch's by an ulp per multiply-add.

Every program handles ``BLOCK_SIZE`` consecutive elements of one tensor, in one of three code variants: full blocks
of tensors whose x and grad are 16-byte aligned (``FLAG_ALIGNED``) move every stream in vector accesses without
masks; full blocks of other tensors keep vector accesses on the fp32 factor and buffer streams (their segments are
always aligned) and access x and grad in scalar accesses (``docs/kernel.md`` has the details); a tensor's last,
partial block is masked and stepped in ``TAIL_CHUNK``-element chunks (one element per thread), one chunk after the
other. The full-block variants issue all their loads (the old momentum buffers included) before their first store;
the tail does so within each chunk (one DRAM round trip per chunk: its per-element accesses are scalar anyway, and a
whole block of masked per-element state, with GradScaler's division, would set the register count of every block). A
program of a factorised tensor writes the block's sum of |x| and count of x != 0 to its telemetry slot
(deterministic: no atomics); the caller sums the slots. With a grad_scale the kernel divides by it correctly
rounded, as torch does, and writes the unscaled gradient back (one more store per element, 44 bytes per fp32
factorised element).

Whether a block's momentum buffers already hold a value lives on the device, in its
``momentum_started`` slot (int32, 0 = not yet), which the block's own program reads and sets (no
race between programs: one program per block; within the program, a barrier orders every warp's read before the
write). So a first step that GradScaler skips (``found_inf``) leaves the slot at
0 and the next step still takes b = g, without the host ever reading ``found_inf``; and the tables
stay the same from the first step on, which CUDA graph capture needs. The kernel reads the buffers of a
FLAG_MOMENTUM row on every step, the first included (and discards what it read there), so their segments must
exist from the first step on.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024  # elements per program
# 4 elements per thread: one 128-bit vector per fp32 stream. The 16-bit x and grad then take the same blocked
# layout (64-bit vectors) as the fp32 streams, with no layout conversion through shared memory, and few enough
# registers (48; 62-64 with GradScaler) for 5 programs per SM (4 with GradScaler).
NUM_WARPS = 8
# A tensor's last, partial block is stepped in chunks of one element per thread, each chunk's loads before its
# stores. Masked lanes make every access scalar there anyway; a whole block's per-element state live at once set
# the register count of the whole kernel (76-80 with GradScaler, whose correctly rounded division calls ptxas' slow
# path subroutine per element: 3 programs per SM).
TAIL_CHUNK = 32 * NUM_WARPS
# Flat-storage segments start on 128-byte boundaries (fp32), for aligned vectors. The kernel asserts it on every
# offset (tl.multiple_of): callers must lay segments out with padded().
SEGMENT_ALIGN = 32
ADDRESS_ALIGN = 16  # bytes: x and grad addresses needed for their vector accesses
_INT32_MAX = 2**31 - 1

TENSOR_TABLE_DTYPE = torch.int64
HYPER_TABLE_DTYPE = torch.float32
BLOCK_TABLE_DTYPE = torch.int32


class TensorRow(NamedTuple):
    """One row of ``tensor_table``: where the kernel finds a tensor and its state. Columns in field order."""

    x: int  # address of x (data_ptr())
    grad: int  # address of its gradient, laid out in x's memory order
    numel: int
    m: int  # element offset of m in the factor storage (factorised tensors only)
    w: int  # element offset of w in the factor storage (factorised tensors only)
    buf_m: int  # element offset of b_m in the momentum storage; a plain tensor's buffer b
    buf_w: int  # element offset of b_w in the momentum storage (factorised tensors only)
    flags: int  # FLAG_* bits
    hyper: int  # the tensor's row of hyper_table (its parameter group)
    slot: int  # its first slot in l1_slots, nnz_slots and momentum_started (one slot per block)


class HyperRow(NamedTuple):
    """One row of ``hyper_table``: the hyper-parameters of a parameter group. Columns in field order."""

    lr: float
    alpha: float  # weight decay on the factors
    weight_decay: float  # weight decay of plain tensors
    momentum: float
    one_minus_dampening: float


TABLE_COLUMNS = len(TensorRow._fields)
HYPER_COLUMNS = len(HyperRow._fields)


def padded(numel: int) -> int:
    """Elements a segment of ``numel`` takes in a flat storage, so that the next one starts SEGMENT_ALIGN-aligned."""
    return -(-numel // SEGMENT_ALIGN) * SEGMENT_ALIGN


FLAG_FACTORISED = 1  # x = m * w; else plain SGD (b_m is its momentum buffer, m/w/b_w unused)
FLAG_MOMENTUM = 2  # momentum != 0: read/write the buffers (b = g where the block's momentum has not started)
FLAG_NESTEROV = 4
FLAG_MAXIMIZE = 8
FLAG_ALIGNED = 16  # x and grad are ADDRESS_ALIGN-byte aligned: full blocks may access them in vectors too

# The row layouts as compile-time column indices (Triton kernels only read globals that are constexpr objects),
# taken from the row types by field name.
_COL_X = tl.constexpr(TensorRow._fields.index("x"))
_COL_GRAD = tl.constexpr(TensorRow._fields.index("grad"))
_COL_NUMEL = tl.constexpr(TensorRow._fields.index("numel"))
_COL_M = tl.constexpr(TensorRow._fields.index("m"))
_COL_W = tl.constexpr(TensorRow._fields.index("w"))
_COL_BUF_M = tl.constexpr(TensorRow._fields.index("buf_m"))
_COL_BUF_W = tl.constexpr(TensorRow._fields.index("buf_w"))
_COL_FLAGS = tl.constexpr(TensorRow._fields.index("flags"))
_COL_HYPER = tl.constexpr(TensorRow._fields.index("hyper"))
_COL_SLOT = tl.constexpr(TensorRow._fields.index("slot"))
_TABLE_COLUMNS = tl.constexpr(TABLE_COLUMNS)
_HYPER_LR = tl.constexpr(HyperRow._fields.index("lr"))
_HYPER_ALPHA = tl.constexpr(HyperRow._fields.index("alpha"))
_HYPER_WEIGHT_DECAY = tl.constexpr(HyperRow._fields.index("weight_decay"))
_HYPER_MOMENTUM = tl.constexpr(HyperRow._fields.index("momentum"))
_HYPER_ONE_MINUS_DAMPENING = tl.constexpr(HyperRow._fields.index("one_minus_dampening"))
_HYPER_COLUMNS = tl.constexpr(HYPER_COLUMNS)
_FLAG_FACTORISED = tl.constexpr(FLAG_FACTORISED)
_FLAG_MOMENTUM = tl.constexpr(FLAG_MOMENTUM)
_FLAG_NESTEROV = tl.constexpr(FLAG_NESTEROV)
_FLAG_MAXIMIZE = tl.constexpr(FLAG_MAXIMIZE)
_FLAG_ALIGNED = tl.constexpr(FLAG_ALIGNED)
_SEGMENT_ALIGN = tl.constexpr(SEGMENT_ALIGN)
_TAIL_CHUNK = tl.constexpr(TAIL_CHUNK)

# The kernel's code variants for a block. The kernel picks one per block (VARIANT_PER_BLOCK); the VARIANT argument
# compiles one of the others alone, for every block, which is how pilot_kernels.aot inspects each variant's code.
VARIANT_PER_BLOCK = 0
VARIANT_TAIL = 1  # a tensor's last, partial block: masked lanes, scalar accesses
VARIANT_FULL_ALIGNED = 2  # a full block of a FLAG_ALIGNED tensor: every stream in vector accesses
VARIANT_FULL_UNALIGNED = 3  # a full block whose x or grad is unaligned: vector factor and buffer streams, scalar x, g
VARIANTS = {"per block": VARIANT_PER_BLOCK, "tail": VARIANT_TAIL, "full aligned": VARIANT_FULL_ALIGNED,
            "full unaligned": VARIANT_FULL_UNALIGNED}
_VARIANT_PER_BLOCK = tl.constexpr(VARIANT_PER_BLOCK)
_VARIANT_TAIL = tl.constexpr(VARIANT_TAIL)
_VARIANT_FULL_ALIGNED = tl.constexpr(VARIANT_FULL_ALIGNED)
_VARIANT_FULL_UNALIGNED = tl.constexpr(VARIANT_FULL_UNALIGNED)

TORCH_TO_TRITON_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _load(ptrs, active, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=active, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store(ptrs, value, active, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=active)
    else:
        tl.store(ptrs, value)


@triton.jit
def _momentum_direction(d, buf_old, momentum, one_minus_dampening, first, nesterov):
    """The new momentum buffer from direction d and the buffer's old value, and the step direction.

    ``first``: the buffer holds no value yet (buf_old is whatever its memory holds, unused) and becomes d.
    Multiply-adds are explicit fmas in the order of torch.optim.SGD (see the module docstring)."""
    buf = tl.where(first, d, tl.fma(d, one_minus_dampening, momentum * buf_old))
    return buf, tl.where(nesterov, tl.fma(buf, momentum, d), buf)


@triton.jit
def _step_gradient(g, grad_ptrs, active, grad_scale, flags, X_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                   MASKED: tl.constexpr):
    """The gradient as the step uses it: unscaled (and written back) and negated to maximize."""
    if HAS_GRAD_SCALE:
        # Unscale on load and write the unscaled gradient back, as torch's fused optimizers do: code that reads
        # .grad after GradScaler.step (norm logging, a second step) must see the true gradient. Correctly rounded
        # (div.rn) as torch's g / scale is; Triton's `/` is an approximate division, exact for powers of 2 only.
        g = tl.div_rn(g, grad_scale)
        _store(grad_ptrs, g.to(X_DTYPE), active, MASKED)
    if (flags & _FLAG_MAXIMIZE) != 0:
        g = -g
    return g


@triton.jit
def _buffer_lanes(active, has_momentum, MASKED: tl.constexpr):
    """Lanes whose momentum buffers are read and written. The old buffers are read under a mask, not a branch, and
    whether or not the block's momentum has started, so that their loads issue with the other streams' without
    waiting for momentum_started. On the first step the value read (whatever the segment holds) is discarded by
    _momentum_direction (buf = d)."""
    if MASKED:
        return has_momentum & active
    else:
        return has_momentum


@triton.jit
def _factorised_lanes(g, lanes, active, grad_ptr, x_ptr, m_ptr, w_ptr, buf_m_ptr, buf_w_ptr, lr, alpha,
                      momentum, one_minus_dampening, grad_scale, flags, has_momentum, first, nesterov,
                      X_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    """The step of a factorised tensor's elements at ``lanes`` (g: their gradient, loaded): every load, then every
    store. Returns x as stored (in fp32), for the telemetry. ``active``: the lanes in the tensor (used by the MASKED
    variant only)."""
    buffer_lanes = _buffer_lanes(active, has_momentum, MASKED)
    m = _load(m_ptr + lanes, active, MASKED)
    w = _load(w_ptr + lanes, active, MASKED)
    buf_m = tl.load(buf_m_ptr + lanes, mask=buffer_lanes, other=0.0)
    buf_w = tl.load(buf_w_ptr + lanes, mask=buffer_lanes, other=0.0)
    g = _step_gradient(g, grad_ptr + lanes, active, grad_scale, flags, X_DTYPE, HAS_GRAD_SCALE, MASKED)
    d_m = tl.fma(m, alpha, g * w)
    d_w = tl.fma(w, alpha, g * m)
    if has_momentum:
        buf_m, d_m = _momentum_direction(d_m, buf_m, momentum, one_minus_dampening, first, nesterov)
        buf_w, d_w = _momentum_direction(d_w, buf_w, momentum, one_minus_dampening, first, nesterov)
    tl.store(buf_m_ptr + lanes, buf_m, mask=buffer_lanes)
    tl.store(buf_w_ptr + lanes, buf_w, mask=buffer_lanes)
    m = tl.fma(d_m, -lr, m)
    w = tl.fma(d_w, -lr, w)
    _store(m_ptr + lanes, m, active, MASKED)
    _store(w_ptr + lanes, w, active, MASKED)
    x = (m * w).to(X_DTYPE)
    _store(x_ptr + lanes, x, active, MASKED)
    return x.to(tl.float32)


@triton.jit
def _plain_lanes(g, lanes, active, grad_ptr, x_ptr, buf_ptr, lr, weight_decay, momentum,
                 one_minus_dampening, grad_scale, flags, has_momentum, first, nesterov, X_DTYPE: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    """The step of a plain tensor's elements at ``lanes`` (g: their gradient, loaded): every load, then every
    store."""
    buffer_lanes = _buffer_lanes(active, has_momentum, MASKED)
    x_old = _load(x_ptr + lanes, active, MASKED).to(tl.float32)
    buf = tl.load(buf_ptr + lanes, mask=buffer_lanes, other=0.0)
    g = _step_gradient(g, grad_ptr + lanes, active, grad_scale, flags, X_DTYPE, HAS_GRAD_SCALE, MASKED)
    d = tl.fma(x_old, weight_decay, g)
    if has_momentum:
        buf, d = _momentum_direction(d, buf, momentum, one_minus_dampening, first, nesterov)
    tl.store(buf_ptr + lanes, buf, mask=buffer_lanes)
    _store(x_ptr + lanes, tl.fma(d, -lr, x_old).to(X_DTYPE), active, MASKED)


@triton.jit
def _step_block(factor_ptr, momentum_ptr, row, hyper_ptr, l1_ptr, nnz_ptr, started_ptr, grad_scale_ptr, start, numel,
                flags, X_DTYPE: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                VARIANT: tl.constexpr):
    """The step of elements [start, start + BLOCK) of the tensor in ``row``, compiled as one of the VARIANT_*s
    (not VARIANT_PER_BLOCK). The fp32 factor and buffer streams are vectors in both full-block variants: their
    segments are SEGMENT_ALIGN-aligned, whatever x and grad are.

    Every load comes before the first store (memory-level parallelism: one DRAM round trip per block, not one per
    store that a later load might alias): the scalars first, then the streams, the old momentum buffers included. The
    tail (VARIANT_TAIL) does so per chunk of CHUNK elements, chunk after chunk."""
    MASKED: tl.constexpr = VARIANT == _VARIANT_TAIL
    # A full block in one chunk; a tail in chunks of TAIL_CHUNK (one element per thread), one after the other.
    CHUNK: tl.constexpr = _TAIL_CHUNK if MASKED and BLOCK > _TAIL_CHUNK else BLOCK
    # Every stream is a base pointer advanced by ``start`` in int64 scalar arithmetic (tensors may exceed 2**31
    # elements) plus int32 lane offsets: one 64-bit address per stream and thread, not one per element.
    x_ptr = tl.load(row + _COL_X).to(tl.pointer_type(X_DTYPE))
    grad_ptr = tl.load(row + _COL_GRAD).to(tl.pointer_type(X_DTYPE))
    if VARIANT == _VARIANT_FULL_ALIGNED:
        x_ptr = tl.multiple_of(x_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
    x_ptr += start
    grad_ptr += start
    # Every column of the row is read here, before the branches, so that the streams' loads wait for one round
    # trip to the table, not two (m, w, b_w are unused by plain tensors).
    m_ptr = factor_ptr + tl.multiple_of(tl.load(row + _COL_M), _SEGMENT_ALIGN) + start
    w_ptr = factor_ptr + tl.multiple_of(tl.load(row + _COL_W), _SEGMENT_ALIGN) + start
    buf_m_ptr = momentum_ptr + tl.multiple_of(tl.load(row + _COL_BUF_M), _SEGMENT_ALIGN) + start
    buf_w_ptr = momentum_ptr + tl.multiple_of(tl.load(row + _COL_BUF_W), _SEGMENT_ALIGN) + start

    hyper = hyper_ptr + tl.load(row + _COL_HYPER) * _HYPER_COLUMNS
    lr = tl.load(hyper + _HYPER_LR)
    alpha = tl.load(hyper + _HYPER_ALPHA)
    weight_decay = tl.load(hyper + _HYPER_WEIGHT_DECAY)
    momentum = tl.load(hyper + _HYPER_MOMENTUM)
    one_minus_dampening = tl.load(hyper + _HYPER_ONE_MINUS_DAMPENING)
    grad_scale = tl.load(grad_scale_ptr) if HAS_GRAD_SCALE else 1.0
    has_momentum = (flags & _FLAG_MOMENTUM) != 0
    nesterov = (flags & _FLAG_NESTEROV) != 0
    slot = tl.load(row + _COL_SLOT) + start // BLOCK
    first = has_momentum & (tl.load(started_ptr + slot) == 0)
    valid = (numel - start).to(tl.int32)  # elements of the block in the tensor (only the MASKED variant uses it)

    factorised = (flags & _FLAG_FACTORISED) != 0
    for k in tl.static_range(BLOCK // CHUNK):
        lanes = k * CHUNK + tl.arange(0, CHUNK)
        active = lanes < valid
        g = _load(grad_ptr + lanes, active, MASKED).to(tl.float32)
        if factorised:
            stored = _factorised_lanes(g, lanes, active, grad_ptr, x_ptr, m_ptr, w_ptr, buf_m_ptr, buf_w_ptr, lr,
                                       alpha, momentum, one_minus_dampening, grad_scale, flags, has_momentum, first,
                                       nesterov, X_DTYPE, HAS_GRAD_SCALE, MASKED)
        else:
            _plain_lanes(g, lanes, active, grad_ptr, x_ptr, buf_m_ptr, lr, weight_decay, momentum,
                         one_minus_dampening, grad_scale, flags, has_momentum, first, nesterov, X_DTYPE,
                         HAS_GRAD_SCALE, MASKED)
            stored = tl.zeros([CHUNK], tl.float32)
        # Telemetry of the value the model holds (factorised tensors); masked-off lanes loaded zeros: their x is 0.
        if k == 0:
            l1 = tl.abs(stored)
            nnz = (stored != 0).to(tl.int64)
        else:
            l1 += tl.abs(stored)
            nnz += (stored != 0).to(tl.int64)
    if factorised:
        tl.store(l1_ptr + slot, tl.sum(l1, axis=0))
        tl.store(nnz_ptr + slot, tl.sum(nnz, axis=0))
    if has_momentum:
        # Every warp of the program read the block's momentum_started slot above; the barrier keeps a lagging warp
        # from reading it after another has set it (it would then take the unwritten buffer for the old one). The
        # branch is uniform: flags come from the tensor table, which the kernel never writes.
        tl.debug_barrier()
        if first:
            tl.store(started_ptr + slot, 1)


@triton.jit
def pilot_sgd_kernel(tensor_table_ptr, hyper_ptr, block_table_ptr, factor_ptr, momentum_ptr, l1_ptr, nnz_ptr,
                     started_ptr, grad_scale_ptr, found_inf_ptr, X_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                     VARIANT: tl.constexpr = VARIANT_PER_BLOCK):
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0  # GradScaler saw inf/nan: the whole step is a no-op
    if not skip:
        pair = block_table_ptr + 2 * tl.program_id(0).to(tl.int64)  # int64: 2 * pid overflows int32 past 2**30
        row = tensor_table_ptr + tl.load(pair).to(tl.int64) * _TABLE_COLUMNS
        start = tl.load(pair + 1).to(tl.int64) * BLOCK
        numel = tl.load(row + _COL_NUMEL)
        flags = tl.load(row + _COL_FLAGS)
        if VARIANT != _VARIANT_PER_BLOCK:
            _step_block(factor_ptr, momentum_ptr, row, hyper_ptr, l1_ptr, nnz_ptr, started_ptr, grad_scale_ptr, start,
                        numel, flags, X_DTYPE, BLOCK, HAS_GRAD_SCALE, VARIANT)
        elif start + BLOCK > numel:
            _step_block(factor_ptr, momentum_ptr, row, hyper_ptr, l1_ptr, nnz_ptr, started_ptr, grad_scale_ptr, start,
                        numel, flags, X_DTYPE, BLOCK, HAS_GRAD_SCALE, _VARIANT_TAIL)
        elif (flags & _FLAG_ALIGNED) != 0:
            _step_block(factor_ptr, momentum_ptr, row, hyper_ptr, l1_ptr, nnz_ptr, started_ptr, grad_scale_ptr, start,
                        numel, flags, X_DTYPE, BLOCK, HAS_GRAD_SCALE, _VARIANT_FULL_ALIGNED)
        else:
            _step_block(factor_ptr, momentum_ptr, row, hyper_ptr, l1_ptr, nnz_ptr, started_ptr, grad_scale_ptr, start,
                        numel, flags, X_DTYPE, BLOCK, HAS_GRAD_SCALE, _VARIANT_FULL_UNALIGNED)


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
    return torch.stack([rows, blocks], dim=1).to(BLOCK_TABLE_DTYPE).contiguous().to(device)


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
    which blocks' buffers hold a value. All three have one slot per block. ``grad_scale`` (the gradients are
    divided by it, and the unscaled gradients written back) and ``found_inf`` (non-zero: skip the step) are
    one-element fp32 tensors on the same device, as torch.amp.GradScaler hands them to fused optimizers.
    """
    if x_dtype not in TORCH_TO_TRITON_DTYPE:
        raise TypeError(f"unsupported parameter dtype {x_dtype}; expected one of {list(TORCH_TO_TRITON_DTYPE)}")
    for name, table, dtype, columns in (("tensor_table", tensor_table, TENSOR_TABLE_DTYPE, TABLE_COLUMNS),
                                        ("hyper_table", hyper_table, HYPER_TABLE_DTYPE, HYPER_COLUMNS),
                                        ("block_table", block_table, BLOCK_TABLE_DTYPE, 2)):
        if table.dtype != dtype or table.dim() != 2 or table.shape[1] != columns:
            raise ValueError(f"{name} must be {dtype} of shape (rows, {columns})")
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
