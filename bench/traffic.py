"""Memory traffic and launches of one optimizer step, counted rather than timed.

* torch paths (dense SGD, the eager reference): :class:`AtenTraffic`, a TorchDispatchMode that adds up the
  bytes every aten op reads and writes, and counts the ops (each is at least one kernel launch on a GPU).
  Bytes are logical: every tensor an op reads or writes counts once per op, as if no cache helped.
* the fused step: :class:`InterpreterTraffic` runs inside Triton's interpreter (``TRITON_INTERPRET=1``, in a
  subprocess: see :mod:`bench.interpreter_worker`) and counts the kernel's real loads and stores: the bytes of
  the lanes a mask leaves active, attributed to streams (g, x, m, w, b_m, b_w, b) by address, and the launches.

From bytes, :func:`memory_bound_seconds` models the time of a purely bandwidth-bound step on an A100 and an H100;
from the bytes the compiled kernel keeps in flight per SM, :func:`little_law_bandwidth` models the fraction of peak
bandwidth it can sustain. Both are models, not measurements.
"""
from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from pilot.factorisation import is_factorised
from pilot.reference import factor_pairs

from .contenders import GRAD_SCALE, Contender

aten = torch.ops.aten



@dataclass(frozen=True)
class GpuModel:
    """What the bandwidth models assume of a GPU (SXM parts): inputs of a model, not measurements."""

    arch: str  # the ptxas architecture pilot_kernels.aot compiles for it
    sms: int
    bandwidth: float  # peak HBM bandwidth, bytes/s
    # DRAM latency under streaming load, s: pointer-chasing microbenchmarks measure about 0.5 us idle on both;
    # queueing at full bandwidth adds to it. Little's law wants bandwidth * latency bytes in flight.
    latency: float


GPUS = {"A100": GpuModel("sm_80", 108, 2.0e12, 600e-9), "H100": GpuModel("sm_90a", 132, 3.35e12, 650e-9)}
# Peak HBM bandwidth (bytes/s) of the GPUs the issue names: the floor of a memory-bound kernel's time.
PEAK_BANDWIDTH = {name: gpu.bandwidth for name, gpu in GPUS.items()}

# Ops that only allocate: no data moves.
_ALLOCATIONS = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided}
# Ops that overwrite ``self`` without reading it.
_OVERWRITES_SELF = {aten.copy_, aten.fill_, aten.zero_, aten._foreach_copy_, aten._foreach_zero_}
# torch's fused optimizers declare the gradients mutable because they unscale them in place, which they only do
# when a grad_scale is given: (mutable argument, the argument that makes it written).
_CONDITIONAL_WRITES = {aten._fused_sgd_: ("grads", "grad_scale")}


@dataclass
class Traffic:
    """Bytes read and written by one step, its aten ops and its Triton launches."""

    read: int = 0
    written: int = 0
    ops: int = 0
    launches: int = 0

    @property
    def bytes(self) -> int:
        return self.read + self.written

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.read + other.read, self.written + other.written, self.ops + other.ops,
                       self.launches + other.launches)


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _nbytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def op_bytes(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
             out: Any) -> tuple[int, int]:
    """(bytes read, bytes written) of one aten op call, from its schema.

    Inputs are read (``out=`` arguments and the ``self`` of pure overwrites excepted); arguments the schema
    marks as written are written; results that do not alias an input are written.
    """
    schema = func._schema
    values = {a.name: (args[i] if i < len(args) else kwargs.get(a.name)) for i, a in enumerate(schema.arguments)}
    conditional = _CONDITIONAL_WRITES.get(func.overloadpacket)
    read = written = 0
    for argument in schema.arguments:
        size = _nbytes(_tensors(values[argument.name]))
        if not argument.is_out and not (argument.name == "self" and func.overloadpacket in _OVERWRITES_SELF):
            read += size
        is_write = argument.alias_info is not None and argument.alias_info.is_write
        if conditional is not None and argument.name == conditional[0]:
            is_write = values[conditional[1]] is not None
        if is_write:
            written += size
    results = out if isinstance(out, tuple) else (out,)
    for returned, value in zip(schema.returns, results):
        if returned.alias_info is None:
            written += _nbytes(_tensors(value))
    return read, written


class AtenTraffic(TorchDispatchMode):
    """Counts the bytes and ops of every op run while active.

    Views, bare allocations and the profiler's record_function markers (torch.optim wraps every step in one)
    move no data and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.traffic = Traffic()
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run meanwhile are not counted (the interpreter's own bookkeeping around a launch)."""
        self._paused, previous = True, self._paused
        try:
            yield
        finally:
            self._paused = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not (self._paused or func.is_view or func.overloadpacket in _ALLOCATIONS or func.namespace == "profiler"):
            read, written = op_bytes(func, args, kwargs, out)
            self.traffic.read += read
            self.traffic.written += written
            self.traffic.ops += 1
        return out


def count_aten(fn: Callable[[], Any]) -> Traffic:
    """The traffic of the aten ops ``fn`` runs."""
    with AtenTraffic() as counter:
        fn()
    return counter.traffic


def optimizer_step_traffic(contender: Contender, seed: int = 0) -> Traffic:
    """One steady-state optimizer step (momentum buffers exist) on random gradients."""
    contender.fill_random_grads(seed)
    contender.optimizer.step()  # the first step creates the momentum buffers
    return count_aten(contender.optimizer.step)


def reparametrisation_traffic(contender: Contender) -> dict[str, Traffic]:
    """What the eager reference adds to dense training besides its optimizer step, per step.

    ``product forward``: x = m * w for every factorised weight (the parametrisation, recomputed each forward);
    ``product backward``: the gradients g * w and g * m of the factors from the gradient g of x.
    """
    model = contender.model
    names = list(factor_pairs(model))
    with AtenTraffic() as forward:
        weights = [operator.attrgetter(name)(model) for name in names]
    grads = [torch.randn_like(x) * GRAD_SCALE for x in weights]
    contender.optimizer.zero_grad()
    with AtenTraffic() as backward:
        torch.autograd.backward(weights, grads)
    return {"product forward": forward.traffic, "product backward": backward.traffic}


def memory_bound_seconds(nbytes: int) -> dict[str, float]:
    """Model: seconds a kernel moving ``nbytes`` needs at each GPU's peak bandwidth (not a measurement)."""
    return {gpu: nbytes / bandwidth for gpu, bandwidth in PEAK_BANDWIDTH.items()}


def little_law_bandwidth(bytes_in_flight_per_sm: float, gpu: GpuModel) -> tuple[float, float]:
    """Model: (bytes per SM that must be in flight to stream at ``gpu``'s peak bandwidth, by Little's law
    bandwidth * latency / SMs; the fraction of peak that ``bytes_in_flight_per_sm`` sustains, at most 1).

    An upper bound for a kernel whose programs issue their loads at once: the time a program spends on anything else
    (its dependent table reads, its stores draining) is not counted. Not a measurement."""
    needed = gpu.bandwidth * gpu.latency / gpu.sms
    return needed, min(1.0, bytes_in_flight_per_sm / needed)


# ---------------------------------------------------------------------------------------- the fused kernel


@dataclass
class KernelTraffic:
    """The fused step as the Triton interpreter ran it: bytes per stream, launches, aten ops around them."""

    model: str
    factorised_elements: int
    plain_elements: int
    launches: int = 0
    outside: Traffic = field(default_factory=Traffic)  # aten ops of the step outside the kernel
    loads: dict[str, int] = field(default_factory=dict)  # stream -> bytes
    stores: dict[str, int] = field(default_factory=dict)

    def stream_bytes(self, prefix: str) -> int:
        return sum(v for d in (self.loads, self.stores) for k, v in d.items() if k.startswith(prefix))

    @property
    def kernel_bytes(self) -> int:
        return sum(self.loads.values()) + sum(self.stores.values())

    @property
    def traffic(self) -> Traffic:
        return self.outside + Traffic(sum(self.loads.values()), sum(self.stores.values()), launches=self.launches)


OTHER_STREAM = "tables and telemetry"


class InterpreterTraffic:
    """While active, counts the loads and stores of Triton kernels run by the interpreter, and their launches.

    The seam is the interpreter's builder: every ``tl.load`` / ``tl.store`` (masked or not) ends in its
    ``create_masked_load`` / ``create_masked_store`` with the pointer and mask arrays; a launch is a
    ``GridExecutor`` call. Bytes are those of the active lanes, attributed to the named address ranges
    (``OTHER_STREAM`` for addresses in none of them). Aten ops run meanwhile outside launches are counted too.
    """

    def __init__(self, ranges: dict[str, list[tuple[int, int]]]) -> None:
        spans = sorted((start, start + size, name) for name, items in ranges.items() for start, size in items
                       if size > 0)
        self._starts = np.array([s for s, _, _ in spans], dtype=np.uint64)
        self._ends = np.array([e for _, e, _ in spans], dtype=np.uint64)
        self._names = [name for _, _, name in spans] + [OTHER_STREAM]
        self.loads: dict[str, int] = {}
        self.stores: dict[str, int] = {}
        self.launches = 0
        self.aten = AtenTraffic()

    def _count(self, into: dict[str, int], ptrs: Any, mask: Any) -> None:
        # The interpreter may hold a mask as int32 0/1 (a scalar flag & a lane mask is one): select by truth value.
        active = np.broadcast_to(mask.data.astype(bool), ptrs.data.shape)
        addresses = ptrs.data[active].astype(np.uint64).ravel()
        element_bytes = ptrs.get_element_ty().primitive_bitwidth // 8
        index = np.searchsorted(self._starts, addresses, side="right").astype(np.int64) - 1
        inside = (index >= 0) & (addresses < self._ends[np.maximum(index, 0)])
        index = np.where(inside, index, len(self._names) - 1)
        for slot, count in enumerate(np.bincount(index, minlength=len(self._names))):
            if count:
                name = self._names[slot]
                into[name] = into.get(name, 0) + int(count) * element_bytes

    def __enter__(self) -> "InterpreterTraffic":
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        load, store = builder.create_masked_load, builder.create_masked_store
        launch = interpreter.GridExecutor.__call__

        def counted_load(ptrs, mask, *rest):  # noqa: ANN001, ANN202 - the builder's signature
            self._count(self.loads, ptrs, mask)
            return load(ptrs, mask, *rest)

        def counted_store(ptrs, value, mask, *rest):  # noqa: ANN001, ANN202
            self._count(self.stores, ptrs, mask)
            return store(ptrs, value, mask, *rest)

        def counted_launch(executor, *args, **kwargs):  # noqa: ANN001, ANN202
            self.launches += 1
            with self.aten.paused():
                return launch(executor, *args, **kwargs)

        # Instance attributes shadow the builder's methods; deleting them restores the originals.
        builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
        interpreter.GridExecutor.__call__ = counted_launch
        self._patched = (builder, interpreter.GridExecutor, launch)
        self.aten.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.aten.__exit__(*exc)
        builder, executor, launch = self._patched
        del builder.create_masked_load, builder.create_masked_store
        executor.__call__ = launch


def fused_step_ranges(contender: Contender) -> tuple[dict[str, list[tuple[int, int]]], int, int]:
    """Address ranges of every stream of FusedPILoTSGD's step, and the factorised and plain element counts.

    Uses only public state: the parameters and their gradients, and ``optimizer.state`` (m, w, the momentum
    buffers); the kernel's tables and telemetry slots fall in ``OTHER_STREAM``.
    """
    ranges: dict[str, list[tuple[int, int]]] = {}
    factorised = plain = 0

    def add(name: str, t: Tensor) -> None:
        ranges.setdefault(name, []).append((t.data_ptr(), t.numel() * t.element_size()))

    for p in contender.trained:
        state = contender.optimizer.state[p]
        kind = "factorised" if is_factorised(contender.optimizer, p) else "plain"
        add(f"{kind} x", p)
        add(f"{kind} g", p.grad)
        if kind == "factorised":
            factorised += p.numel()
            for key, stream in (("m", "m"), ("w", "w"), ("momentum_buffer_m", "b_m"), ("momentum_buffer_w", "b_w")):
                if state[key] is not None:
                    add(f"factorised {stream}", state[key])
        else:
            plain += p.numel()
            if state["momentum_buffer"] is not None:
                add("plain b", state["momentum_buffer"])
    return ranges, factorised, plain


def count_fused_step(contender: Contender, model: str, seed: int = 0,
                     grad_scale: Optional[float] = None) -> KernelTraffic:
    """One steady-state step of an interpreted FusedPILoTSGD (backend "triton" under TRITON_INTERPRET=1).

    With ``grad_scale``, the step gets it as ``torch.amp.GradScaler.step`` hands it over; the kernel then also
    writes the unscaled gradient back (one more gradient-sized store: 44 B per fp32 factorised element, 24 per
    plain one)."""
    contender.fill_random_grads(seed)
    contender.optimizer.step()  # momentum buffers, cached kernel tables
    ranges, factorised, plain = fused_step_ranges(contender)
    optimizer = contender.optimizer
    if grad_scale is not None:
        optimizer.grad_scale = torch.tensor(grad_scale, device=optimizer.param_groups[0]["params"][0].device)
    try:
        with InterpreterTraffic(ranges) as counter:
            optimizer.step()
    finally:
        if grad_scale is not None:
            del optimizer.grad_scale
    return KernelTraffic(model, factorised, plain, counter.launches, counter.aten.traffic, counter.loads,
                         counter.stores)


def fused_kernel_traffic(models: Sequence[str], timeout: float = 3600) -> list[KernelTraffic]:
    """:func:`count_fused_step` for each model, in a subprocess that runs the kernel in Triton's interpreter."""
    if not models:
        return []
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "bench.interpreter_worker", *models], env=env,
                            capture_output=True, text=True, timeout=timeout, check=False,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if result.returncode != 0:
        raise RuntimeError(f"the interpreter worker failed:\n{result.stderr}")
    records = json.loads(result.stdout)
    return [KernelTraffic(**{**record, "outside": Traffic(**record["outside"])}) for record in records]

