"""FusedPILoTSGD: PILoT's factorised SGD as a torch.optim drop-in, one fused pass per step."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from pilot_kernels import KERNELS_INTERPRETED
from pilot_kernels import pilot_sgd as _kernel

from .factorization import check_beta, factorize
from .torch_step import FactorisedStep

__all__ = ["FusedPILoTSGD"]

BACKENDS = ("auto", "triton", "compile", "eager")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FACTOR_KEYS = ("m", "w", "momentum_buffer_m", "momentum_buffer_w")
PLAIN_KEYS = ("momentum_buffer",)
_SEGMENT_ALIGN = 32  # elements; keeps every flat segment 128-byte aligned for vector accesses


@dataclass(eq=False)
class _Entry:
    """One parameter: where its state lives in the bucket's flat storage, and what the optimizer last saw."""

    param: Tensor
    group: int
    factorised: bool
    numel: int
    m_offset: int = 0
    w_offset: int = 0
    buf_m_offset: int = 0  # the momentum buffer of a plain parameter
    buf_w_offset: int = 0
    slot: int = 0  # first telemetry slot
    data_ptr: int = 0  # to notice `.data` being replaced ...
    version: int = 0  # ... or the parameter being written outside the optimizer
    # 1-D detached views for the torch path: x in memory order, then m, w, b_m, b_w (plain: b) and telemetry slots
    x_flat: Optional[Tensor] = None
    flat: tuple[Optional[Tensor], ...] = ()


class _Bucket:
    """The parameters of one (device, dtype): flat fp32 storages, telemetry slots and cached kernel tables."""

    def __init__(self, device: torch.device, dtype: torch.dtype, path: str) -> None:
        self.device, self.dtype, self.path = device, dtype, path
        self.entries: list[_Entry] = []
        self.factors = self.momentum = self.l1_slots = self.nnz_slots = torch.empty(0)
        self.block_tables: dict[tuple[int, ...], Tensor] = {}
        self.tensor_table: tuple[tuple[int, ...], Optional[Tensor]] = ((), None)
        self.hyper_table: tuple[tuple[float, ...], Optional[Tensor]] = ((), None)
        self.grad_scale: Optional[Tensor] = None
        self.found_inf: Optional[Tensor] = None

    def slots_of(self, numel: int) -> int:
        """Telemetry slots of a factorised tensor: one per kernel block, or one per tensor on the torch path."""
        return _kernel.telemetry_slots(numel) if self.path == "triton" else 1


def _padded(numel: int) -> int:
    return -(-numel // _SEGMENT_ALIGN) * _SEGMENT_ALIGN


def is_non_overlapping_and_dense(t: Tensor) -> bool:
    """True if t's elements fill exactly numel consecutive memory slots (contiguous up to a permutation)."""
    expected = 1
    for stride, size in sorted((stride, size) for stride, size in zip(t.stride(), t.shape) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: Tensor) -> Tensor:
    """1-D view of a non-overlapping, dense tensor in memory order."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,), t.storage_offset())


def _check_number(name: str, value: Any, *, minimum: float = 0.0) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name} value: a tensor {name} must have one element, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name} value: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value} (need a finite number >= {minimum})")


def _check_group(group: dict[str, Any]) -> None:
    for name in ("lr", "momentum", "weight_decay", "alpha"):
        _check_number(name, group[name])
    _check_number("dampening", group["dampening"], minimum=-math.inf)
    check_beta(group["beta"])
    for name in ("nesterov", "maximize"):
        if not isinstance(group[name], bool):
            raise TypeError(f"Invalid {name} value: expected a bool, got {group[name]!r}")
    if group["reparam"] not in (None, True, False):
        raise ValueError(f"Invalid reparam value: {group['reparam']!r} (need None, True or False)")
    if group["nesterov"] and (float(group["momentum"]) <= 0 or float(group["dampening"]) != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class FusedPILoTSGD(Optimizer):
    r"""SGD on PILoT's factorisation x = m \odot w, fused into one pass over memory per step.

    The model stays an ordinary dense model; the optimizer owns the factors. For every factorised parameter x
    it keeps fp32 tensors m, w (and momentum buffers b_m, b_w) and, given the dense gradient g = dL/dx, applies
    exactly what ``torch.optim.SGD(weight_decay=alpha)`` applies to the factors of a model parametrised as
    x = m * w (see :mod:`pilot.reference`):

    .. math::
        \begin{aligned}
            &g \leftarrow -g \text{ if maximize} \\
            &g_m = g \odot w + \alpha\, m, \qquad g_w = g \odot m + \alpha\, w \\
            &\text{if } \mu \neq 0:\ b_m \leftarrow g_m \text{ (first step)},\ \text{else }
                b_m \leftarrow \mu\, b_m + (1 - \tau)\, g_m \qquad (\text{same for } b_w) \\
            &\qquad g_m \leftarrow g_m + \mu\, b_m \text{ if nesterov else } b_m \qquad (\text{same for } g_w) \\
            &m \leftarrow m - \gamma\, g_m, \qquad w \leftarrow w - \gamma\, g_w, \qquad x \leftarrow m \odot w
        \end{aligned}

    with lr :math:`\gamma`, momentum :math:`\mu`, dampening :math:`\tau`. x is written back into the parameter
    (rounded to its dtype). Parameters that are not factorised get ``torch.optim.SGD``'s update with
    ``weight_decay`` (fp32 math, fp32 momentum buffer). At construction each factorised x is split as
    :math:`m_0 = \sqrt{(\beta + \sqrt{\beta^2 + 4x^2})/2},\ w_0 = x / m_0` (so :math:`m_0^2 - w_0^2 = \beta`;
    beta = 0 is spred's init) and the parameter is overwritten with :math:`m_0 \odot w_0`.

    Args:
        params: parameters or parameter-group dicts; every keyword below can be set per group.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as in :class:`torch.optim.SGD`
            (``weight_decay`` applies to parameters that are not factorised).
        alpha: weight decay on the factors m and w (PILoT's regularisation; schedule it by editing
            ``group["alpha"]`` between steps, e.g. with :class:`pilot.PILoTSchedule`).
        beta: initial imbalance m^2 - w^2 of the factors (1 keeps the effective lr at init equal to lr;
            0 is spred). Only used when a parameter is factorised (construction, ``add_param_group``).
        reparam: which parameters are factorised: None = those with ``ndim >= 2`` (conv and linear weights),
            True / False = all / none of the group.
        backend: ``"auto"`` (the Triton kernel for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``;
            else the torch path compiled with ``torch.compile``), ``"triton"``, ``"compile"`` or ``"eager"``
            (the torch path without compiling).

    State (``optimizer.state[p]``): ``"m"``, ``"w"``, ``"momentum_buffer_m"``, ``"momentum_buffer_w"`` for a
    factorised p, ``"momentum_buffer"`` otherwise, each shaped like p (buffers are None until the first step
    with momentum). They are views into flat fp32 storage per (device, dtype), laid out again by
    ``add_param_group`` and ``load_state_dict``.

    The model is the source of truth: if a factorised parameter is written outside the optimizer (a model
    ``load_state_dict``, manual pruning, re-initialisation), the entries whose value no longer equals
    round(m * w) are factorised again from their new value (with the group's beta) and their momentum restarts
    from zero; the others keep their factors.

    After each step, :meth:`l1_norm` and :meth:`density` give sum |x| and the fraction of x != 0 over the
    factorised parameters, computed by the step pass itself.
    """

    def __init__(self, params: Union[Iterable[Tensor], Iterable[dict[str, Any]]], lr: Union[float, Tensor] = 1e-3,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 alpha: float = 0.0, beta: float = 1.0, reparam: Optional[bool] = None, maximize: bool = False,
                 backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (need one of {', '.join(BACKENDS)})")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, alpha=alpha, beta=beta, reparam=reparam, maximize=maximize)
        _check_group(defaults)
        self._backend = backend
        self._buckets: list[_Bucket] = []
        self._factorised_step: Optional[FactorisedStep] = None
        super().__init__(params, defaults)
        # torch.amp.GradScaler hands grad_scale / found_inf to step() instead of unscaling the gradients.
        self._step_supports_amp_scaling = True

    # ------------------------------------------------------------------ parameter groups and state layout

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch.optim semantics); factorises its parameters at once and overwrites them with m0*w0."""
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # torch rejects sets; a generator must be read only once
            param_group["params"] = list(params)
            if len({id(p) for p in param_group["params"]}) != len(param_group["params"]):
                raise ValueError("a parameter appears twice in the group")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            self._check_params(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if self._factorises(p, group):
                m0, w0 = factorize(p.detach(), group["beta"])
                with torch.no_grad():
                    p.copy_(m0 * w0)
                self.state[p] = {"m": m0, "w": w0, "momentum_buffer_m": None, "momentum_buffer_w": None}
            else:
                self.state[p] = {"momentum_buffer": None}
        self._layout()

    @staticmethod
    def _factorises(p: Tensor, group: dict[str, Any]) -> bool:
        return p.ndim >= 2 if group["reparam"] is None else bool(group["reparam"])

    def _check_params(self, group: dict[str, Any]) -> None:
        for index, p in enumerate(group["params"]):
            where = f"parameter {index} of group {len(self.param_groups) - 1} (shape {tuple(p.shape)})"
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{where} has dtype {p.dtype}; FusedPILoTSGD supports "
                                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
            if group["reparam"] and p.ndim == 0:
                raise ValueError(f"reparam=True: {where} is 0-d; only tensors with at least one dimension "
                                 "are factorised")
            if p.is_sparse or not is_non_overlapping_and_dense(p):
                raise ValueError(f"{where} is not a dense tensor (it overlaps or has gaps in memory); "
                                 "pass the parameter itself, not a strided view")

    def _path_for(self, device: torch.device) -> str:
        backend = self._backend
        if backend == "auto":
            use_triton = device.type == "cuda" or (device.type == "cpu" and KERNELS_INTERPRETED)
            return "triton" if use_triton else "compile"
        if backend == "triton" and device.type == "cpu" and not KERNELS_INTERPRETED:
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before pilot_kernels is "
                             "imported; use backend='auto' or 'compile' for the CPU path")
        return backend

    def _layout(self) -> None:
        """Move every parameter's state into flat fp32 storage per (device, dtype); state entries become views."""
        buckets: dict[tuple[torch.device, torch.dtype], _Bucket] = {}
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                key = (p.device, p.dtype)
                if key not in buckets:
                    buckets[key] = _Bucket(p.device, p.dtype, self._path_for(p.device))
                buckets[key].entries.append(_Entry(p, group_index, "m" in self.state[p], p.numel()))
        for bucket in buckets.values():
            self._allocate(bucket)
        self._buckets = list(buckets.values())

    def _allocate(self, bucket: _Bucket) -> None:
        factor_size = momentum_size = slots = 0
        for e in bucket.entries:
            size = _padded(e.numel)
            e.buf_m_offset = momentum_size
            if e.factorised:
                e.m_offset, e.w_offset = factor_size, factor_size + size
                e.buf_w_offset = momentum_size + size
                factor_size += 2 * size
                momentum_size += 2 * size
                e.slot = slots
                slots += bucket.slots_of(e.numel)
            else:
                momentum_size += size
        needs_momentum = any(self._uses_momentum(e) for e in bucket.entries)
        device = bucket.device
        bucket.factors = torch.zeros(factor_size, dtype=torch.float32, device=device)
        # Zeros, so that a buffer whose first step was skipped (GradScaler found inf) starts from b = 0.
        bucket.momentum = torch.zeros(momentum_size if needs_momentum else 0, dtype=torch.float32, device=device)
        bucket.l1_slots = torch.zeros(slots, dtype=torch.float32, device=device)
        bucket.nnz_slots = torch.zeros(slots, dtype=torch.int64, device=device)
        for e in bucket.entries:
            state = self.state[e.param]
            placements = ((("m", bucket.factors, e.m_offset), ("w", bucket.factors, e.w_offset),
                           ("momentum_buffer_m", bucket.momentum, e.buf_m_offset),
                           ("momentum_buffer_w", bucket.momentum, e.buf_w_offset)) if e.factorised else
                          (("momentum_buffer", bucket.momentum, e.buf_m_offset),))
            for key, storage, offset in placements:
                if state.get(key) is not None:
                    view = storage.as_strided(e.param.shape, e.param.stride(), offset)
                    view.copy_(state[key])
                    state[key] = view
            # detached (no _base), so that torch.compile guards on sizes only
            e.flat = tuple(storage[offset:offset + e.numel].detach() if storage.numel() else None
                           for _, storage, offset in placements)
            if e.factorised:
                e.flat += (bucket.l1_slots[e.slot:e.slot + 1].detach(), bucket.nnz_slots[e.slot:e.slot + 1].detach())
            self._record(bucket, e)

    def _uses_momentum(self, e: _Entry) -> bool:
        state = self.state[e.param]
        has_buffer = any(state.get(k) is not None for k in ("momentum_buffer_m", "momentum_buffer"))
        return has_buffer or float(self.param_groups[e.group]["momentum"]) != 0

    def _record(self, bucket: _Bucket, e: _Entry) -> None:
        """Remember the parameter as the optimizer leaves it, and recompute its telemetry from its value."""
        p = e.param
        e.data_ptr, e.version = p.data_ptr(), p._version
        e.x_flat = _flat(p).detach()
        if not e.factorised or e.numel == 0:
            return
        x = _flat(p.detach()).float()
        slots = bucket.slots_of(e.numel)
        if slots > 1:
            x = torch.nn.functional.pad(x, (0, slots * _kernel.BLOCK_SIZE - e.numel)).view(slots, -1)
        else:
            x = x.view(1, -1)
        bucket.l1_slots[e.slot:e.slot + slots] = x.abs().sum(dim=1)
        bucket.nnz_slots[e.slot:e.slot + slots] = (x != 0).sum(dim=1)

    # ------------------------------------------------------------------ the parameter as the source of truth

    def _sync_if_modified(self, bucket: _Bucket, e: _Entry) -> bool:
        """Re-factorise the entries of a parameter written outside the optimizer; True if storage must be re-laid."""
        p = e.param
        if p.data_ptr() == e.data_ptr and p._version == e.version:
            return False
        if p.device != bucket.device or p.dtype != bucket.dtype or p.numel() != e.numel:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} changed device, dtype or size after the optimizer was created "
                f"(now {p.device}, {p.dtype}; was {bucket.device}, {bucket.dtype}, {e.numel} elements); create the "
                "optimizer after moving or converting the model")
        if not is_non_overlapping_and_dense(p):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} was replaced by a tensor that is not dense")
        state = self.state[p]
        if e.factorised:
            with torch.no_grad():
                m, w = state["m"], state["w"]
                changed = p != (m * w).to(p.dtype)
                if bool(changed.any()):
                    m0, w0 = factorize(p, self.param_groups[e.group]["beta"])
                    m.copy_(torch.where(changed, m0, m))
                    w.copy_(torch.where(changed, w0, w))
                    for key in ("momentum_buffer_m", "momentum_buffer_w"):
                        if state[key] is not None:
                            state[key].masked_fill_(changed, 0.0)
        if any(t is not None and t.stride() != p.stride() for t in state.values()):
            return True  # `.data` replaced by another memory layout (e.g. channels_last): state must follow
        self._record(bucket, e)
        return False

    def _sync(self) -> None:
        """Notice parameters written outside the optimizer and momentum switched on; re-lay storage if needed."""
        relayout = False
        for bucket in self._buckets:
            for e in bucket.entries:
                relayout |= self._sync_if_modified(bucket, e)
            relayout |= bucket.momentum.numel() == 0 and any(self._uses_momentum(e) for e in bucket.entries)
        if relayout:
            self._layout()

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimisation step (one fused launch per (device, dtype)).

        Args:
            closure: re-evaluates the model and returns the loss (run with gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync()
        hypers = tuple(self._hyper_row(group) for group in self.param_groups)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for bucket in self._buckets:
            work = self._collect(bucket)
            if not work:
                continue
            if bucket.path == "triton":
                self._launch(bucket, work, hypers, grad_scale, found_inf)
            else:
                self._run_torch(bucket, work, hypers, grad_scale, found_inf)
            for e, _, _ in work:
                if self.param_groups[e.group]["momentum"] != 0:
                    self._expose_buffers(bucket, e)
                e.version = e.param._version
        return loss

    @staticmethod
    def _hyper_row(group: dict[str, Any]) -> tuple[float, ...]:
        return (float(group["lr"]), float(group["alpha"]), float(group["weight_decay"]), float(group["momentum"]),
                1.0 - float(group["dampening"]))

    def _collect(self, bucket: _Bucket) -> list[tuple[_Entry, Tensor, int]]:
        """(entry, dense gradient, kernel flags) of every parameter of the bucket that has a gradient."""
        work = []
        for e in bucket.entries:
            p = e.param
            grad = p.grad
            if grad is None or e.numel == 0:
                continue
            if grad.layout != torch.strided:
                raise TypeError(f"FusedPILoTSGD does not support sparse gradients (parameter of shape "
                                f"{tuple(p.shape)} has a {grad.layout} gradient)")
            if grad.stride() != p.stride():  # the kernel walks x and its gradient in the same memory order
                grad = torch.empty_like(p).copy_(grad)
            group = self.param_groups[e.group]
            flags = 0
            if e.factorised:
                flags |= _kernel.FLAG_FACTORISED
            if group["momentum"] != 0:
                flags |= _kernel.FLAG_MOMENTUM
                buffer_key = "momentum_buffer_m" if e.factorised else "momentum_buffer"
                if self.state[p][buffer_key] is None:
                    flags |= _kernel.FLAG_FIRST_MOMENTUM_STEP
            if group["nesterov"]:
                flags |= _kernel.FLAG_NESTEROV
            if group["maximize"]:
                flags |= _kernel.FLAG_MAXIMIZE
            if p.data_ptr() % 16 == 0 and grad.data_ptr() % 16 == 0:
                flags |= _kernel.FLAG_ALIGNED
            work.append((e, grad, flags))
        return work

    def _expose_buffers(self, bucket: _Bucket, e: _Entry) -> None:
        state = self.state[e.param]
        keys = (("momentum_buffer_m", e.buf_m_offset), ("momentum_buffer_w", e.buf_w_offset)) if e.factorised else (
            ("momentum_buffer", e.buf_m_offset),)
        for key, offset in keys:
            if state[key] is None:
                state[key] = bucket.momentum.as_strided(e.param.shape, e.param.stride(), offset)

    def _launch(self, bucket: _Bucket, work: list[tuple[_Entry, Tensor, int]], hypers: tuple[tuple[float, ...], ...],
                grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        device = bucket.device
        rows = tuple((e.param.data_ptr(), grad.data_ptr(), e.numel, e.m_offset, e.w_offset, e.buf_m_offset,
                      e.buf_w_offset, flags, e.group, e.slot) for e, grad, flags in work)
        if bucket.tensor_table[0] != rows:
            bucket.tensor_table = (rows, torch.tensor(rows, dtype=torch.int64, device=device))
        if bucket.hyper_table[0] != hypers:
            bucket.hyper_table = (hypers, torch.tensor(hypers, dtype=torch.float32, device=device))
        active = tuple(id(e) for e, _, _ in work)
        if active not in bucket.block_tables:
            bucket.block_tables[active] = _kernel.build_block_table([e.numel for e, _, _ in work], device)
        _kernel.launch_pilot_sgd(
            bucket.tensor_table[1], bucket.hyper_table[1], bucket.block_tables[active], bucket.factors,
            bucket.momentum if bucket.momentum.numel() else bucket.factors, bucket.l1_slots, bucket.nnz_slots,
            bucket.dtype, grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device))

    def _run_torch(self, bucket: _Bucket, work: list[tuple[_Entry, Tensor, int]],
                   hypers: tuple[tuple[float, ...], ...], grad_scale: Optional[Tensor],
                   found_inf: Optional[Tensor]) -> None:
        """Factorised tensors: the compiled (or eager) torch step, one call each. Plain tensors: torch's own fused
        SGD kernel, one call per (group, first momentum step)."""
        if found_inf is not None and bool(found_inf.item()):
            return
        if self._factorised_step is None:
            self._factorised_step = FactorisedStep(compile=self._backend != "eager")
        device = bucket.device
        scale = _on(grad_scale, device)
        group_scalars: dict[int, tuple[Tensor, ...]] = {}
        first_flags = (torch.tensor(False, device=device), torch.tensor(True, device=device))
        factorised_calls = []
        plain_batches: dict[tuple[int, bool], list[tuple[_Entry, Tensor]]] = {}
        for e, grad, flags in work:
            first = bool(flags & _kernel.FLAG_FIRST_MOMENTUM_STEP)
            has_momentum = bool(flags & _kernel.FLAG_MOMENTUM)
            g = _flat(grad).detach()
            if not e.factorised:
                plain_batches.setdefault((e.group, first), []).append((e, g))
                continue
            if e.group not in group_scalars:
                group = self.param_groups[e.group]
                group_scalars[e.group] = (
                    *(torch.tensor(v, dtype=torch.float32, device=device) for v in hypers[e.group]),
                    torch.tensor(-1.0 if group["maximize"] else 1.0, device=device),
                    torch.tensor(bool(group["nesterov"]), device=device))
            lr, alpha, _, momentum, one_minus_dampening, sign, nesterov = group_scalars[e.group]
            m, w, buf_m, buf_w, l1_slot, nnz_slot = e.flat
            if not has_momentum:
                buf_m = buf_w = None
            factorised_calls.append((g, e.x_flat, m, w, buf_m, buf_w, l1_slot, nnz_slot, lr, alpha, momentum,
                                     one_minus_dampening, sign, first_flags[first], nesterov, scale))
        self._factorised_step.run(factorised_calls)
        for (group_index, first), items in plain_batches.items():
            group = self.param_groups[group_index]
            params = [e.x_flat for e, _ in items]
            grads = [g for _, g in items]
            if bucket.dtype != torch.float32:  # torch's kernel wants buffers in the parameters' dtype: work in fp32
                params, grads = [x.float() for x in params], [g.float() for g in grads]
            buffers = [e.flat[0] for e, _ in items] if float(group["momentum"]) != 0 else []
            torch._fused_sgd_(params, grads, buffers, weight_decay=float(group["weight_decay"]),
                              momentum=float(group["momentum"]), lr=float(group["lr"]),
                              dampening=float(group["dampening"]), nesterov=group["nesterov"],
                              maximize=group["maximize"], is_first_step=first, grad_scale=scale)
            if bucket.dtype != torch.float32:
                for (e, _), updated in zip(items, params):
                    e.x_flat.copy_(updated)

    # ------------------------------------------------------------------ telemetry

    def l1_norm(self) -> float:
        """Sum of |m * w| over the factorised parameters (as the model holds them), from the last step."""
        self._sync()
        return float(sum(bucket.l1_slots.double().sum().item() for bucket in self._buckets))

    def density(self) -> float:
        """Fraction of factorised entries with m * w != 0 (nan when no parameter is factorised)."""
        self._sync()
        total = sum(e.numel for bucket in self._buckets for e in bucket.entries if e.factorised)
        nonzero = sum(int(bucket.nnz_slots.sum().item()) for bucket in self._buckets)
        return nonzero / total if total else math.nan

    # ------------------------------------------------------------------ checkpoints

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._backend = state.pop("backend", getattr(self, "_backend", "auto"))
        super().__setstate__(state)
        self._factorised_step = None
        self._layout()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["backend"] = self._backend
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (any device); factors stay fp32 whatever the model dtype.

        The parameters are set to round(m * w) of the loaded factors, so the model and the optimizer agree
        whichever of the two is loaded first.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has "
                             f"{len(self.param_groups)}")
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"loaded state dict's group {index} has {len(saved['params'])} parameters, the "
                                 f"optimizer's has {len(group['params'])}")
        id_map = {saved_id: p for group, saved in zip(self.param_groups, saved_groups)
                  for saved_id, p in zip(saved["params"], group["params"])}
        new_state: dict[Tensor, dict[str, Any]] = {}
        for saved_id, p in id_map.items():
            new_state[p] = self._loaded_param_state(p, state_dict["state"].get(saved_id, {}), saved_id)
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups):
            new_group = {**self.defaults, **saved, "params": group["params"]}
            _check_group(new_group)
            new_groups.append(new_group)
        self.param_groups = new_groups
        self.state.clear()
        self.state.update(new_state)
        with torch.no_grad():
            for p, state in new_state.items():
                if "m" in state:
                    p.copy_(state["m"] * state["w"])
        self._layout()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_param_state(self, p: Tensor, saved: dict[str, Any], saved_id: Any) -> dict[str, Any]:
        factorised = "m" in self.state[p]
        expected = FACTOR_KEYS if factorised else PLAIN_KEYS
        where = f"parameter {saved_id} (shape {tuple(p.shape)})"
        if factorised and ("m" not in saved or "w" not in saved):
            hint = " (it looks like a dense torch.optim.SGD state)" if "momentum_buffer" in saved else ""
            raise ValueError(f"state dict has no factors m, w for the factorised {where}{hint}")
        if not factorised and "m" in saved:
            raise ValueError(f"state dict has factors for {where}, which this optimizer does not factorise")
        loaded: dict[str, Any] = {}
        for key in expected:
            value = saved.get(key)
            if value is None:
                if key in ("m", "w"):
                    raise ValueError(f"state dict's {key} of {where} is None")
                loaded[key] = None
                continue
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(p.shape):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"state dict's {key} of {where} has shape {got}, expected {tuple(p.shape)}")
            loaded[key] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)
        return loaded


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device)
