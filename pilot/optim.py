"""FusedPILoTSGD: PILoT's factorised SGD as a torch.optim drop-in, one fused pass per step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch._dynamo
from torch import Tensor
from torch.optim import Optimizer

from pilot_kernels import KERNELS_INTERPRETED
from pilot_kernels import pilot_sgd as _kernel

from .factorisation import (BUFFER_KEYS, FACTOR_KEYS, MOMENTUM_STARTED, PLAIN_KEYS, check_beta, factorise,
                            is_factorised, is_factorised_state, is_prunable)
from .torch_step import FactorisedStep

try:  # FSDP2 parameters are DTensors; torch may be built without distributed support
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - such builds have no sharded parameters to handle
    DTensor = None

__all__ = ["FusedPILoTSGD"]

BACKENDS = ("auto", "triton", "compile", "eager")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# read from device tensors by the step when capturable=True: group key -> hyper_table column
CAPTURABLE_COLUMNS = {key: _kernel.HyperRow._fields.index(key) for key in ("lr", "alpha")}
_FP32_MAX = torch.finfo(torch.float32).max


@dataclass(eq=False)
class _Entry:
    """One parameter: where its state lives in the bucket's flat storage, and what the optimizer last saw.

    Sizes, offsets and addresses are those of the local tensor (:func:`_local`): the whole parameter, or this
    rank's shard of a DTensor.
    """

    param: Tensor
    group: int
    factorised: bool
    shape: tuple[int, ...]
    numel: int
    telemetry_group: int  # index into FusedPILoTSGD._telemetry_groups
    m_offset: int = 0
    w_offset: int = 0
    buf_m_offset: int = 0  # the momentum buffer of a plain parameter
    buf_w_offset: int = 0
    slot: int = 0  # first slot (one per kernel block, or one per tensor on the torch path)
    data_ptr: int = 0  # to notice `.data` being replaced ...
    version: int = 0  # ... or the parameter being written outside the optimizer
    # A plain parameter that is not dense in memory is stepped in this dense copy (the kernel and the torch path
    # walk x in memory order), copied in before and back after each step; None for every other parameter.
    stage: Optional[Tensor] = None
    x_ptr: int = 0  # address the step writes x to: the parameter's, or its stage's
    # 1-D detached views for the torch path: x (or its stage) in memory order, then m, w, b_m, b_w (plain: b) and
    # telemetry slots
    x_flat: Optional[Tensor] = None
    flat: tuple[Optional[Tensor], ...] = ()

    @property
    def buffer_keys(self) -> tuple[str, ...]:
        return BUFFER_KEYS[self.factorised]

    @property
    def state_stride(self) -> tuple[int, ...]:
        """Strides of the state tensors: the parameter's own (so that the kernel walks x, g and the state in one
        memory order), or, for a staged parameter, its stage's (contiguous)."""
        return self.stage.stride() if self.stage is not None else _local(self.param).stride()


class _Bucket:
    """The parameters of one (device, dtype): flat fp32 storages, per-block slots and cached kernel tables.

    Slots (``l1_slots``, ``nnz_slots``, ``started``): one per kernel block of every tensor on the Triton path,
    one per tensor on the torch path. ``started`` is 1 where the momentum buffers hold a value (see
    ``pilot_kernels.pilot_sgd``); ``slot_groups`` maps each slot to its telemetry group.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, path: str) -> None:
        self.device, self.dtype, self.path = device, dtype, path
        self.entries: list[_Entry] = []
        self.staged: list[_Entry] = []  # entries with a stage (see _Entry.stage)
        self.factors = self.momentum = self.l1_slots = self.nnz_slots = self.started = torch.empty(0)
        self.slot_groups = torch.empty(0, dtype=torch.int64)
        self.block_tables: dict[tuple[int, ...], Tensor] = {}
        # (key, table on the device): the key is what the host built the table from, to notice changes
        self.tensor_table: tuple[tuple[tuple[int, int, int], ...], Optional[Tensor]] = ((), None)
        self.hyper_table: tuple[tuple[_kernel.HyperRow, ...], Optional[Tensor]] = ((), None)
        self.captured_tables: list[Tensor] = []  # tables a CUDA graph may still read: never freed

    def slots_of(self, numel: int) -> int:
        """Slots of a tensor: one per kernel block on the Triton path, one per tensor on the torch path."""
        return _kernel.telemetry_slots(numel) if self.path == "triton" else 1


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


def _is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """The tensor the step works on: this rank's shard of a DTensor (FSDP2), else t itself.

    Detached: a view sharing the shard's memory and version counter.
    """
    return t.to_local().detach() if _is_dtensor(t) else t


def _like_param(local: Tensor, p: Tensor) -> Tensor:
    """State shaped like p's local tensor, exposed as p is: wrapped in a DTensor with p's sharding for a DTensor
    p (so that state dicts and torch.distributed.checkpoint see sharded state), else as it is."""
    if not _is_dtensor(p):
        return local
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def _local_shard_of(value: Tensor, p: Tensor) -> Tensor:
    """The part of a loaded state tensor (shaped like p) that this rank keeps for p."""
    if _is_dtensor(p):
        if not _is_dtensor(value):  # a full tensor (e.g. a checkpoint of an unsharded run): every rank slices its own
            value = distribute_tensor(value.to(_local(p).device), p.device_mesh, p.placements, src_data_rank=None)
        elif value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local()
    return value.full_tensor() if _is_dtensor(value) else value


def _shard_groups(p: Tensor) -> tuple[Any, ...]:
    """The process groups over which p's shards must be summed (mesh dimensions that shard it); () if none."""
    if not _is_dtensor(p):
        return ()
    return tuple(p.device_mesh.get_group(dim) for dim, placement in enumerate(p.placements) if placement.is_shard())


def check_number(name: str, value: Any, *, minimum: float = 0.0) -> None:
    """Raise TypeError unless value is a number (or one-element tensor), ValueError unless it is finite, >= minimum
    and within fp32 range; the message names the argument. Shared by the optimizer, schedules and baselines."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name} value: a tensor {name} must have one element, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name} value: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value} (need a finite number >= {minimum})")
    if abs(value) > _FP32_MAX:  # the step computes in fp32: such a value would be inf there
        raise ValueError(f"Invalid {name} value: {value} does not fit in float32 (|value| <= {_FP32_MAX:.4g})")


def _check_group(group: dict[str, Any]) -> None:
    for name in ("lr", "momentum", "weight_decay", "alpha"):
        check_number(name, group[name])
    check_number("dampening", group["dampening"], minimum=-math.inf)
    check_beta(group["beta"])
    check_number("beta", group["beta"])
    for name in ("nesterov", "maximize"):
        if not isinstance(group[name], bool):
            raise TypeError(f"Invalid {name} value: expected a bool, got {group[name]!r}")
    if group["reparam"] not in (None, True, False):
        raise ValueError(f"Invalid reparam value: {group['reparam']!r} (need None, True or False)")
    if group["nesterov"] and (float(group["momentum"]) <= 0 or float(group["dampening"]) != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _stream_is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class FusedPILoTSGD(Optimizer):
    r"""SGD on PILoT's factorisation x = m \odot w, fused into one pass over memory per step.

    The model stays an ordinary dense model; the optimizer owns the factors. For every factorised parameter x
    it keeps fp32 tensors m, w (and momentum buffers b_m, b_w) and, given the dense gradient g = dL/dx, applies
    exactly what ``torch.optim.SGD(weight_decay=alpha)`` applies to the factors of a model parametrised as
    x = m * w (see :mod:`pilot.reference`; the math: ``docs/math.md``):

    .. math::
        \begin{aligned}
            &g \leftarrow g / s \text{ (GradScaler's scale, if any)}, \qquad g \leftarrow -g \text{ if maximize} \\
            &g_m = g \odot w + \alpha\, m, \qquad g_w = g \odot m + \alpha\, w \\
            &\text{if } \mu \neq 0:\ b_m \leftarrow g_m \text{ (first step)},\ \text{else }
                b_m \leftarrow \mu\, b_m + (1 - \tau)\, g_m \qquad (\text{same for } b_w) \\
            &\qquad g_m \leftarrow g_m + \mu\, b_m \text{ if nesterov else } b_m \qquad (\text{same for } g_w) \\
            &m \leftarrow m - \gamma\, g_m, \qquad w \leftarrow w - \gamma\, g_w, \qquad x \leftarrow m \odot w
        \end{aligned}

    with lr :math:`\gamma`, momentum :math:`\mu`, dampening :math:`\tau`. All of it in fp32; x is written back
    into the parameter rounded to its dtype (fp32, bf16 or fp16), so the model always holds exactly
    round(m * w). Parameters that are not factorised get ``torch.optim.SGD``'s update with ``weight_decay``
    (fp32 math, fp32 momentum buffer). At construction each factorised x is split as
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
        capturable: the step reads ``lr`` and ``alpha`` from device tensors and never synchronises with the
            host, so that it can be captured in a CUDA graph (see below). Needs the Triton path.
        foreach, fused: accepted so that code written for :class:`torch.optim.SGD` runs unchanged, and ignored:
            the step is always fused (``backend`` chooses how).

    State (``optimizer.state[p]``): ``"m"``, ``"w"``, ``"momentum_buffer_m"``, ``"momentum_buffer_w"`` for a
    factorised p, ``"momentum_buffer"`` otherwise, each shaped like p (buffers are None until the first step
    with momentum). They are views into flat fp32 storage per (device, dtype), laid out again by
    ``add_param_group``, ``load_state_dict`` and when momentum is switched on.

    The model is the source of truth: if a factorised parameter is written outside the optimizer (a model
    ``load_state_dict``, manual pruning, re-initialisation, ``p.data = ...`` with the same shape, dtype and
    device), the entries whose value no longer equals round(m * w) are factorised again from their new value
    (with the group's beta) and their momentum restarts from zero; the others keep their factors. A parameter
    that changed shape, dtype or device is an error: create the optimizer after moving or converting the model.

    After each step, :meth:`l1_norm` and :meth:`density` give sum |x| and the fraction of x != 0 over the
    factorised parameters, computed by the step pass itself.

    Exactness against torch. Plain parameters: the torch paths (``"compile"``, ``"eager"``) call torch's fused SGD
    kernel and equal ``torch.optim.SGD(fused=True)`` bit for bit (torch's default implementation rounds the
    momentum buffer differently on about one element in a thousand). The Triton kernel computes every
    multiply-add as an fma in the order of torch.optim.SGD's own kernels, so compiled it rounds as
    ``torch.optim.SGD`` does (checked on CPU in an interpreter that rounds fmas once; not yet on a GPU); Triton's
    interpreter rounds an fma's product and sum separately, so there results differ by about an ulp on a
    fraction of the elements. Factorised parameters: the kernel, likewise, against :mod:`pilot.reference`
    (SGD on the factors); the compiled torch path lets inductor round as it likes (close, not bit-exact).
    Plain parameters may have gaps in memory (views such as ``t[..., 0]``): they are stepped in a dense copy,
    written back after the step; factorised ones must be dense.

    Mixed precision and ``torch.amp.GradScaler``: ``GradScaler.step(optimizer)`` hands the optimizer its scale
    and found-inf flag (``_step_supports_amp_scaling``); the kernel divides the gradients by the scale as it
    loads them and writes the unscaled gradients back into ``.grad`` (as torch's fused optimizers do, so that
    code reading ``.grad`` after the step sees true values), and skips the whole step on the device when
    found_inf is set (the torch path reads found_inf on the host), leaving ``.grad`` as it was. A first momentum
    step that is skipped stays a first step (b = g at the next step).

    CUDA graphs (``capturable=True``): ``group["lr"]`` and ``group["alpha"]`` become 0-d fp32 tensors on the
    parameters' device (numbers are converted when a group is added or loaded) and are read on the device at
    every step, so schedulers must update them in place: torch's LR schedulers do (``fill_``); to edit them
    by hand, ``group["alpha"].fill_(value)``. Assigning a number to them later is a TypeError at the next step,
    since a captured graph would never see it. Other hyper-parameters are host values baked into the tables.
    Warm up a few steps before capturing (the first steps build the tables) and keep the gradients at fixed
    addresses during capture (``zero_grad(set_to_none=False)``): a table that has to change while the stream
    is capturing is a RuntimeError. Re-capture after anything that lays the state out again.

    Distributed: under DistributedDataParallel every rank applies the same step to the same averaged gradient,
    so the factors stay identical. FSDP2 (``fully_shard``) parameters are DTensors: the optimizer keeps factors
    and buffers for the local shard only (whether a parameter is factorised follows its global ``ndim``), its
    state entries are DTensors with the parameter's sharding (so ``torch.distributed.checkpoint`` saves and
    loads them sharded), and :meth:`l1_norm` / :meth:`density` sum over the shards: they are collectives,
    to be called on every rank.

    ``torch.compile``: a compiled model trains with this optimizer unchanged. The step itself is not traced:
    called inside a compiled function it runs eagerly between graphs (``torch._dynamo.disable``), because it
    reads tensor addresses and versions on the host to build its tables.
    """

    def __init__(self, params: Union[Iterable[Tensor], Iterable[dict[str, Any]]], lr: Union[float, Tensor] = 1e-3,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 alpha: Union[float, Tensor] = 0.0, beta: float = 1.0, reparam: Optional[bool] = None,
                 maximize: bool = False, backend: str = "auto", capturable: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None) -> None:
        for name, value in (("foreach", foreach), ("fused", fused)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"Invalid {name} value: expected None or a bool, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (need one of {', '.join(BACKENDS)})")
        if not isinstance(capturable, bool):
            raise TypeError(f"Invalid capturable value: expected a bool, got {capturable!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, alpha=alpha, beta=beta, reparam=reparam, maximize=maximize)
        _check_group(defaults)
        self._backend = backend
        self._capturable = capturable
        self._buckets: list[_Bucket] = []
        self._telemetry_groups: list[tuple[tuple[Any, ...], torch.device]] = []
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
        own_tensors = {key for key in CAPTURABLE_COLUMNS if isinstance(param_group.get(key), Tensor)}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            self._check_params(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if self._capturable:
            self._make_capturable(group, keep=own_tensors)
        for p in group["params"]:
            local = _local(p)
            if self._factorises(p, group):
                m0, w0 = factorise(local.detach(), group["beta"])
                with torch.no_grad():
                    local.copy_(m0 * w0)
                self.state[p] = {"m": m0, "w": w0, "momentum_buffer_m": None, "momentum_buffer_w": None}
            else:
                self.state[p] = {"momentum_buffer": None}
        self._settle_momentum()
        self._layout()

    @staticmethod
    def _factorises(p: Tensor, group: dict[str, Any]) -> bool:
        return is_prunable(p) if group["reparam"] is None else bool(group["reparam"])

    def _check_params(self, group: dict[str, Any]) -> None:
        for index, p in enumerate(group["params"]):
            where = f"parameter {index} of group {len(self.param_groups) - 1} (shape {tuple(p.shape)})"
            local = _local(p)
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{where} has dtype {p.dtype}; FusedPILoTSGD supports "
                                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
            if local.device.type == "meta":
                raise ValueError(f"{where} is on the meta device and has no data: materialise the model "
                                 "(e.g. to_empty() and initialise it) before creating the optimizer")
            if group["reparam"] and p.ndim == 0:
                raise ValueError(f"reparam=True: {where} is 0-d; only tensors with at least one dimension "
                                 "are factorised")
            if local.is_sparse:
                raise ValueError(f"{where} is a sparse tensor; pass dense parameters")
            if self._factorises(p, group) and not is_non_overlapping_and_dense(local):
                raise ValueError(f"{where} is not a dense tensor (it overlaps or has gaps in memory), which a "
                                 "factorised parameter must be; pass the parameter itself, not a strided view "
                                 "(or put it in a group with reparam=False)")
            if self._capturable and self._path_for(local.device) != "triton":
                raise ValueError(f"capturable=True needs the Triton kernel, but {where} on {local.device} takes "
                                 f"the torch path (backend={self._backend!r}); use CUDA tensors (or "
                                 "TRITON_INTERPRET=1 on CPU) with backend 'auto' or 'triton'")
        self._check_no_shared_memory([p for g in self.param_groups for p in g["params"]])

    @staticmethod
    def _check_no_shared_memory(params: list[Tensor]) -> None:
        """Two parameters over the same memory would be stepped twice per step (and factorised inconsistently)."""
        spans = []
        for p in params:
            local = _local(p)
            if local.numel():
                start = local.data_ptr()
                extent = 1 + sum((size - 1) * stride for size, stride in zip(local.shape, local.stride()))
                spans.append((local.device, start, start + extent * local.element_size(), tuple(p.shape)))
        spans.sort(key=lambda span: (str(span[0]), span[1]))
        for (device, _, end, shape), (next_device, next_start, _, next_shape) in zip(spans, spans[1:]):
            if device == next_device and next_start < end:
                raise ValueError(f"parameters of shapes {shape} and {next_shape} share memory (views of one "
                                 "tensor?); each parameter must own its memory")

    def _make_capturable(self, group: dict[str, Any], keep: set[str]) -> None:
        """lr and alpha as 0-d fp32 tensors on the group's device, so that the step can read them there.

        A tensor the caller passed for this group (``keep``) is used as it is when it already is one, so the
        caller's own reference keeps working; anything else (numbers, tensors shared through the defaults or
        a loaded state dict) becomes a tensor of its own.
        """
        device = _local(group["params"][0]).device if group["params"] else torch.device("cpu")
        for key in CAPTURABLE_COLUMNS:
            value = group[key]
            usable = (isinstance(value, Tensor) and value.dim() == 0 and value.dtype == torch.float32
                      and value.device == device)
            if not (usable and key in keep):
                group[key] = torch.tensor(float(value), dtype=torch.float32, device=device)

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
        telemetry_index: dict[tuple[Any, ...], int] = {(): 0}
        self._telemetry_groups = [((), torch.device("cpu"))]
        for group_index, group in enumerate(self.param_groups):
            for p in group["params"]:
                local = _local(p)
                key = (local.device, p.dtype)
                if key not in buckets:
                    buckets[key] = _Bucket(local.device, p.dtype, self._path_for(local.device))
                shard_groups = _shard_groups(p)
                if shard_groups not in telemetry_index:  # same order on every rank: the order of the groups
                    telemetry_index[shard_groups] = len(self._telemetry_groups)
                    self._telemetry_groups.append((shard_groups, local.device))
                entry = _Entry(p, group_index, is_factorised(self, p), tuple(local.shape), local.numel(),
                               telemetry_index[shard_groups])
                if not is_non_overlapping_and_dense(local):  # only plain parameters can be (see _check_params)
                    entry.stage = torch.empty(local.shape, dtype=local.dtype, device=local.device)
                    buckets[key].staged.append(entry)
                buckets[key].entries.append(entry)
        for bucket in buckets.values():
            self._allocate(bucket)
        self._buckets = list(buckets.values())

    def _allocate(self, bucket: _Bucket) -> None:
        factor_size = momentum_size = slots = 0
        for e in bucket.entries:
            size = _kernel.padded(e.numel)
            e.buf_m_offset = momentum_size
            if e.factorised:
                e.m_offset, e.w_offset = factor_size, factor_size + size
                e.buf_w_offset = momentum_size + size
                factor_size += 2 * size
                momentum_size += 2 * size
            else:
                momentum_size += size
            e.slot = slots
            slots += bucket.slots_of(e.numel)
        needs_momentum = any(self._uses_momentum(e) for e in bucket.entries)
        device = bucket.device
        bucket.factors = torch.zeros(factor_size, dtype=torch.float32, device=device)
        bucket.momentum = torch.zeros(momentum_size if needs_momentum else 0, dtype=torch.float32, device=device)
        bucket.l1_slots = torch.zeros(slots, dtype=torch.float32, device=device)
        bucket.nnz_slots = torch.zeros(slots, dtype=torch.int64, device=device)
        started = torch.zeros(slots, dtype=torch.int32)
        slot_groups = torch.zeros(slots, dtype=torch.int64)
        for e in bucket.entries:
            state = self.state[e.param]
            slot_range = slice(e.slot, e.slot + bucket.slots_of(e.numel))
            started[slot_range] = int(state[e.buffer_keys[0]] is not None)
            slot_groups[slot_range] = e.telemetry_group
            placements = ((("m", bucket.factors, e.m_offset), ("w", bucket.factors, e.w_offset),
                           ("momentum_buffer_m", bucket.momentum, e.buf_m_offset),
                           ("momentum_buffer_w", bucket.momentum, e.buf_w_offset)) if e.factorised else
                          (("momentum_buffer", bucket.momentum, e.buf_m_offset),))
            local = _local(e.param)
            for key, storage, offset in placements:
                if state.get(key) is not None:
                    view = storage.as_strided(local.shape, e.state_stride, offset)
                    view.copy_(_local(state[key]))
                    state[key] = _like_param(view, e.param)
            # detached (no _base), so that torch.compile guards on sizes only
            e.flat = tuple(storage[offset:offset + e.numel].detach() if storage.numel() else None
                           for _, storage, offset in placements)
            if e.factorised:
                e.flat += (bucket.l1_slots[e.slot:e.slot + 1].detach(), bucket.nnz_slots[e.slot:e.slot + 1].detach())
            self._record(bucket, e)
        bucket.started = started.to(device)
        bucket.slot_groups = slot_groups.to(device)

    def _uses_momentum(self, e: _Entry) -> bool:
        state = self.state[e.param]
        has_buffer = state[e.buffer_keys[0]] is not None
        return has_buffer or float(self.param_groups[e.group]["momentum"]) != 0

    def _record(self, bucket: _Bucket, e: _Entry) -> None:
        """Remember the parameter as the optimizer leaves it, and recompute its telemetry from its value."""
        local = _local(e.param)
        e.data_ptr, e.version = local.data_ptr(), local._version
        x = local if e.stage is None else e.stage
        e.x_ptr = x.data_ptr()
        e.x_flat = _flat(x).detach()
        if not e.factorised or e.numel == 0:
            return
        x = _flat(local.detach()).float()
        slots = bucket.slots_of(e.numel)
        if slots > 1:
            x = torch.nn.functional.pad(x, (0, slots * _kernel.BLOCK_SIZE - e.numel)).view(slots, -1)
        else:
            x = x.view(1, -1)
        bucket.l1_slots[e.slot:e.slot + slots] = x.abs().sum(dim=1)
        bucket.nnz_slots[e.slot:e.slot + slots] = (x != 0).sum(dim=1)

    def _settle_momentum(self) -> None:
        """Forget the buffers of parameters whose first momentum step the device skipped (GradScaler's found_inf).

        The host exposes a parameter's buffers after the launch of its first momentum step without reading
        found_inf; the device's ``started`` slots know whether that step ran. Reading them is a sync, so this
        runs only where the host state must be exact: before state dicts, pickling and re-laying the state.
        """
        for bucket in self._buckets:
            started = None
            for e in bucket.entries:
                state = self.state[e.param]
                if e.numel == 0 or state[e.buffer_keys[0]] is None:
                    continue
                if started is None:
                    started = bucket.started.tolist()
                if not started[e.slot]:
                    for key in e.buffer_keys:
                        state[key] = None

    # ------------------------------------------------------------------ the parameter as the source of truth

    def _sync_if_modified(self, bucket: _Bucket, e: _Entry) -> bool:
        """Re-factorise the entries of a parameter written outside the optimizer; True if storage must be re-laid."""
        local = _local(e.param)
        if local.data_ptr() == e.data_ptr and local._version == e.version:
            return False
        if local.device != bucket.device or local.dtype != bucket.dtype or tuple(local.shape) != e.shape:
            raise ValueError(
                f"a parameter changed device, dtype or shape after the optimizer was created (now {local.device}, "
                f"{local.dtype}, {tuple(local.shape)}; was {bucket.device}, {bucket.dtype}, {e.shape}); create the "
                "optimizer after moving or converting the model")
        if not is_non_overlapping_and_dense(local):
            if e.factorised:
                raise ValueError(f"a factorised parameter of shape {e.shape} was replaced by a tensor that is not "
                                 "dense; replace it by a dense one (e.g. .contiguous())")
            if e.stage is None:
                return True  # needs a stage from now on
        elif e.stage is not None:
            return True  # dense again: step it in place
        state = {key: None if value is None else _local(value) for key, value in self.state[e.param].items()}
        if e.factorised:
            with torch.no_grad():
                m, w = state["m"], state["w"]
                changed = local != (m * w).to(local.dtype)
                if bool(changed.any()):
                    m0, w0 = factorise(local, self.param_groups[e.group]["beta"])
                    m.copy_(torch.where(changed, m0, m))
                    w.copy_(torch.where(changed, w0, w))
                    for key in e.buffer_keys:
                        if state[key] is not None:
                            state[key].masked_fill_(changed, 0.0)
        if any(t is not None and t.stride() != e.state_stride for t in state.values()):
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
            self._settle_momentum()
            self._layout()

    # ------------------------------------------------------------------ the step

    @torch._dynamo.disable  # host-side tables (addresses, versions): never traced, see the class docstring
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
            stepped = [e for e in bucket.entries if e.param.grad is not None]
            staged = [e for e in bucket.staged if e.param.grad is not None]
            for e in staged:
                e.stage.copy_(_local(e.param))
            work = self._collect(bucket, stepped)
            if work and bucket.path == "triton":
                self._launch(bucket, work, hypers, grad_scale, found_inf)
            elif work and not self._run_torch(bucket, work, hypers, grad_scale, found_inf):
                continue  # skipped (GradScaler found inf): nothing happened
            if grad_scale is not None:  # the step unscaled copies of these gradients: unscale .grad too
                for e, grad, _ in work:
                    if grad.data_ptr() != _local(e.param.grad).data_ptr():
                        _local(e.param.grad).copy_(grad)
            for e in staged:
                _local(e.param).copy_(e.stage)
            for e in stepped:
                if self.state[e.param][e.buffer_keys[0]] is None and self.param_groups[e.group]["momentum"] != 0:
                    self._expose_buffers(bucket, e)
                e.version = _local(e.param)._version
        return loss

    def _hyper_row(self, group: dict[str, Any]) -> _kernel.HyperRow:
        """The group's row of the hyper table; with capturable=True, lr and alpha are filled in on the device."""
        lr, alpha = (0.0, 0.0) if self._capturable else (float(group["lr"]), float(group["alpha"]))
        return _kernel.HyperRow(lr=lr, alpha=alpha, weight_decay=float(group["weight_decay"]),
                                momentum=float(group["momentum"]),
                                one_minus_dampening=1.0 - float(group["dampening"]))

    def _collect(self, bucket: _Bucket, stepped: list[_Entry]) -> list[tuple[_Entry, Tensor, int]]:
        """(entry, dense gradient, kernel flags) of the non-empty entries among ``stepped`` (those with a gradient).

        Empty tensors are not stepped but count as stepped: their state must look like that of the other
        shards of the same parameter on other ranks (collectives and checkpoints expect the same keys)."""
        work = []
        for e in stepped:
            p = e.param
            if e.numel == 0:
                continue
            if p.grad.layout != torch.strided:
                raise TypeError(f"FusedPILoTSGD does not support sparse gradients (parameter of shape "
                                f"{tuple(p.shape)} has a {p.grad.layout} gradient)")
            grad = _local(p.grad)
            if grad.stride() != e.state_stride:  # the kernel walks x and its gradient in the same memory order
                grad = torch.empty_like(_local(p) if e.stage is None else e.stage).copy_(grad)
            group = self.param_groups[e.group]
            flags = 0
            if e.factorised:
                flags |= _kernel.FLAG_FACTORISED
            if group["momentum"] != 0:
                flags |= _kernel.FLAG_MOMENTUM
            if group["nesterov"]:
                flags |= _kernel.FLAG_NESTEROV
            if group["maximize"]:
                flags |= _kernel.FLAG_MAXIMIZE
            if e.x_ptr % _kernel.ADDRESS_ALIGN == 0 and grad.data_ptr() % _kernel.ADDRESS_ALIGN == 0:
                flags |= _kernel.FLAG_ALIGNED
            work.append((e, grad, flags))
        return work

    def _expose_buffers(self, bucket: _Bucket, e: _Entry) -> None:
        state = self.state[e.param]
        local = _local(e.param)
        for key, offset in zip(e.buffer_keys, (e.buf_m_offset, e.buf_w_offset)):
            if state[key] is None:
                state[key] = _like_param(bucket.momentum.as_strided(local.shape, e.state_stride, offset), e.param)

    def _launch(self, bucket: _Bucket, work: list[tuple[_Entry, Tensor, int]], hypers: tuple[tuple[float, ...], ...],
                grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        device = bucket.device
        # The rest of a row is fixed by the layout (a new one makes a new bucket); e.x_ptr is current: step() has
        # just run _sync().
        key = tuple((e.x_ptr, grad.data_ptr(), flags) for e, grad, flags in work)
        if bucket.tensor_table[0] != key:
            rows = [_kernel.TensorRow(x=e.x_ptr, grad=grad.data_ptr(), numel=e.numel, m=e.m_offset, w=e.w_offset,
                                      buf_m=e.buf_m_offset, buf_w=e.buf_w_offset, flags=flags, hyper=e.group,
                                      slot=e.slot) for e, grad, flags in work]
            bucket.tensor_table = (key, self._upload(
                device, lambda: torch.tensor(rows, dtype=_kernel.TENSOR_TABLE_DTYPE)))
        self._update_hyper_table(bucket, hypers)
        active = tuple(id(e) for e, _, _ in work)
        if active not in bucket.block_tables:
            bucket.block_tables[active] = self._upload(
                device, lambda: _kernel.build_block_table([e.numel for e, _, _ in work], torch.device("cpu")))
        if _stream_is_capturing(device):  # the graph reads these tables at every replay: keep them alive
            bucket.captured_tables += [bucket.tensor_table[1], bucket.hyper_table[1], bucket.block_tables[active]]
        _kernel.launch_pilot_sgd(
            bucket.tensor_table[1], bucket.hyper_table[1], bucket.block_tables[active], bucket.factors,
            bucket.momentum if bucket.momentum.numel() else bucket.factors, bucket.l1_slots, bucket.nnz_slots,
            bucket.started, bucket.dtype, grad_scale=_on(grad_scale, device), found_inf=_on(found_inf, device))

    @staticmethod
    def _upload(device: torch.device, build: Callable[[], Tensor]) -> Tensor:
        """A host-built kernel table, copied to the device (which CUDA graph capture forbids)."""
        if _stream_is_capturing(device):
            raise RuntimeError(
                "FusedPILoTSGD: a kernel table (gradient addresses, hyper-parameters other than lr and alpha, or "
                "which parameters have gradients) changed while a CUDA graph was being captured. Run a few steps "
                "before capturing, keep the gradients at fixed addresses (zero_grad(set_to_none=False)) and "
                "change only lr and alpha (in place) between replays")
        return build().to(device)

    def _update_hyper_table(self, bucket: _Bucket, hypers: tuple[tuple[float, ...], ...]) -> None:
        """Upload the host part of the hyper table when it changed; with capturable=True, copy lr and alpha into it
        on the device (no host sync: the copy reads the group tensors, so a captured graph sees in-place edits)."""
        if bucket.hyper_table[0] != hypers:
            table = bucket.hyper_table[1]
            new = self._upload(bucket.device, lambda: torch.tensor(hypers, dtype=_kernel.HYPER_TABLE_DTYPE))
            if self._capturable and table is not None and table.shape == new.shape:
                table.copy_(new)  # in place: a captured graph keeps reading this table
                new = table
            bucket.hyper_table = (hypers, new)
        if self._capturable:
            table = bucket.hyper_table[1]
            for key, column in CAPTURABLE_COLUMNS.items():
                values = []
                for index, group in enumerate(self.param_groups):
                    value = group[key]
                    if not isinstance(value, Tensor):
                        raise TypeError(
                            f"capturable=True: group {index}'s {key} was set to {type(value).__name__} {value!r}; "
                            f"update the tensor in place instead (group[{key!r}].fill_(value), as torch's LR "
                            "schedulers do), so that a captured CUDA graph sees the change")
                    values.append(value.to(bucket.device, torch.float32, non_blocking=True).reshape(()))
                table[:, column].copy_(torch.stack(values))

    def _run_torch(self, bucket: _Bucket, work: list[tuple[_Entry, Tensor, int]],
                   hypers: tuple[tuple[float, ...], ...], grad_scale: Optional[Tensor],
                   found_inf: Optional[Tensor]) -> bool:
        """Factorised tensors: the compiled (or eager) torch step, one call each. Plain tensors: torch's own fused
        SGD kernel, one call per (group, first momentum step). False if GradScaler's found_inf skipped the step
        (read on the host: this path is not capturable)."""
        if found_inf is not None and bool(found_inf.item()):
            return False
        if self._factorised_step is None:
            self._factorised_step = FactorisedStep(compile=self._backend != "eager")
        device = bucket.device
        scale = _on(grad_scale, device)
        group_scalars: dict[int, tuple[Tensor, ...]] = {}
        first_flags = (torch.tensor(False, device=device), torch.tensor(True, device=device))
        factorised_calls = []
        plain_batches: dict[tuple[int, bool], list[tuple[_Entry, Tensor]]] = {}
        for e, grad, flags in work:
            has_momentum = bool(flags & _kernel.FLAG_MOMENTUM)
            first = has_momentum and self.state[e.param][e.buffer_keys[0]] is None
            if first:
                bucket.started[e.slot] = 1
            g = _flat(grad).detach()
            if not e.factorised:
                plain_batches.setdefault((e.group, first), []).append((e, g))
                continue
            if e.group not in group_scalars:
                group, hyper = self.param_groups[e.group], hypers[e.group]
                group_scalars[e.group] = (
                    *(torch.tensor(v, dtype=torch.float32, device=device)
                      for v in (hyper.lr, hyper.alpha, hyper.momentum, hyper.one_minus_dampening)),
                    torch.tensor(-1.0 if group["maximize"] else 1.0, device=device),
                    torch.tensor(bool(group["nesterov"]), device=device))
            lr, alpha, momentum, one_minus_dampening, sign, nesterov = group_scalars[e.group]
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
                for (e, g), updated, unscaled in zip(items, params, grads):
                    e.x_flat.copy_(updated)
                    if scale is not None:  # torch's kernel unscaled the fp32 copy of the gradient
                        g.copy_(unscaled)
        return True

    # ------------------------------------------------------------------ telemetry

    def l1_norm(self) -> float:
        """Sum of |m * w| over the factorised parameters (as the model holds them), from the last step."""
        return self._telemetry()[0]

    def density(self) -> float:
        """Fraction of factorised entries with m * w != 0 (nan when no parameter is factorised)."""
        total = sum(e.param.numel() for bucket in self._buckets for e in bucket.entries if e.factorised)
        nonzero = self._telemetry()[1]
        return nonzero / total if total else math.nan

    def _telemetry(self) -> tuple[float, int]:
        """(sum |x|, count of x != 0) over the factorised parameters; the shards of DTensors summed over ranks."""
        self._sync()
        sums: list[Optional[Tensor]] = [None] * len(self._telemetry_groups)
        for bucket in self._buckets:
            if not bucket.l1_slots.numel():
                continue
            per_slot = torch.stack([bucket.l1_slots.double(), bucket.nnz_slots.double()], dim=1)
            per_group = per_slot.new_zeros(len(sums), 2).index_add_(0, bucket.slot_groups, per_slot)
            for index in range(len(sums)):
                total = sums[index]
                sums[index] = per_group[index] if total is None else total + per_group[index].to(total.device)
        l1, nonzero = 0.0, 0
        for (process_groups, device), total in zip(self._telemetry_groups, sums):
            if total is None:  # no local slot (e.g. empty shards): a collective still needs this rank's zeros
                if not process_groups:
                    continue
                total = torch.zeros(2, dtype=torch.float64, device=device)
            for process_group in process_groups:
                dist.all_reduce(total, group=process_group)
            group_l1, group_nonzero = total.tolist()
            l1 += group_l1
            nonzero += int(group_nonzero)
        return l1, nonzero

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, complete enough to serve as the template that a checkpoint is loaded into
        in place (as torch.distributed.checkpoint does with a fresh optimizer's state dict):

        * the parameters of a group with momentum always have their buffers (zeros before the first momentum
          step) and ``"momentum_started"`` (bool) says whether the buffers hold a value;
        * the state of a DTensor parameter is DTensors, sharded like the parameter.
        """
        self._settle_momentum()
        state_dict = super().state_dict()
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            if float(group["momentum"]) == 0:
                continue
            for p, index in zip(group["params"], saved["params"]):
                entry = dict(state_dict["state"][index])  # a copy: torch's state dict shares our state's dicts
                keys = BUFFER_KEYS[is_factorised_state(entry)]
                entry[MOMENTUM_STARTED] = entry[keys[0]] is not None
                for key in keys:
                    if entry[key] is None:
                        entry[key] = _like_param(torch.zeros_like(_local(p), dtype=torch.float32), p)
                state_dict["state"][index] = entry
        return state_dict

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "backend" not in state:  # torch's load_state_dict hands over only the loaded state and groups
            self._adopt_loaded(state["state"], state["param_groups"])
            return
        self._backend = state.pop("backend")
        self._capturable = state.pop("capturable")
        super().__setstate__(state)
        self._factorised_step = None
        self._layout()

    def __getstate__(self) -> dict[str, Any]:
        self._settle_momentum()
        state = super().__getstate__()
        state["backend"] = self._backend
        state["capturable"] = self._capturable
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (any device); factors stay fp32 whatever the model dtype.

        torch.optim's own loading (hooks, group checks, ``param_names``), with the state converted here rather
        than cast to the parameters' dtype. The parameters are set to round(m * w) of the loaded factors, so the
        model and the optimizer agree whichever of the two is loaded first. State of a DTensor parameter may come
        sharded (a DTensor, e.g. from torch.distributed.checkpoint) or whole; each rank keeps its shard. A dense
        optimizer's state dict (e.g. ``torch.optim.SGD``'s) is rejected: its momentum lives in x-space and has no
        counterpart for the factors; load the model's weights instead and create the optimizer after, which
        factorises them. A state dict that is rejected leaves the optimizer as it was.
        """
        # Registered for this call only, so it runs after any hook of the user's.
        handle = self.register_load_state_dict_pre_hook(_pass_state_uncast)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    def _adopt_loaded(self, state: dict[Any, Any], param_groups: list[dict[str, Any]]) -> None:
        """Check and convert what torch's load_state_dict matched to our parameters; then take it over."""
        dense = not any("alpha" in group for group in param_groups)
        new_state: dict[Tensor, dict[str, Any]] = {}
        for group in param_groups:
            for p in group["params"]:
                saved = state[p]
                new_state[p] = self._loaded_param_state(p, saved.state, saved.saved_id, dense)
        new_groups = []
        for group in param_groups:
            new_group = {**self.defaults, **group}
            _check_group(new_group)
            if self._capturable:
                self._make_capturable(new_group, keep=set())
            new_groups.append(new_group)
        self.param_groups = new_groups
        self.state.clear()
        self.state.update(new_state)
        with torch.no_grad():
            for p, param_state in new_state.items():
                if is_factorised_state(param_state):
                    _local(p).copy_(param_state["m"] * param_state["w"])
        self._layout()

    def _loaded_param_state(self, p: Tensor, saved: dict[str, Any], saved_id: Any, dense: bool) -> dict[str, Any]:
        factorised = is_factorised(self, p)
        expected = FACTOR_KEYS if factorised else PLAIN_KEYS
        where = f"parameter {saved_id} (shape {tuple(p.shape)})"
        if factorised and not all(key in saved for key in FACTOR_KEYS[:2]):
            hint = (" (it looks like a dense torch.optim.SGD state dict: load the model's weights and create "
                    "FusedPILoTSGD afterwards, which factorises them)") if dense else ""
            raise ValueError(f"state dict has no factors m, w for the factorised {where}{hint}")
        if not factorised and is_factorised_state(saved):
            raise ValueError(f"state dict has factors for {where}, which this optimizer does not factorise")
        started = saved.get(MOMENTUM_STARTED)
        if started is not None and not isinstance(started, bool):
            raise TypeError(f"state dict's {MOMENTUM_STARTED} of {where} must be a bool, got {started!r}")
        if started is False:  # zeros standing in for buffers that do not exist yet
            saved = {key: value for key, value in saved.items() if key not in BUFFER_KEYS[factorised]}
        if factorised and (saved.get("momentum_buffer_m") is None) != (saved.get("momentum_buffer_w") is None):
            raise ValueError(f"state dict has only one of the momentum buffers of {where}")
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
            loaded[key] = _local_shard_of(value.detach(), p).to(device=_local(p).device, dtype=torch.float32,
                                                                 copy=True)
        return loaded


@dataclass(frozen=True)
class _Uncast:
    """A parameter's saved state on its way through torch's load_state_dict, which leaves objects of unknown type
    alone: torch would cast state tensors to the parameter's dtype (bf16 factors) and could not reshard
    DTensor state. ``saved_id`` is the parameter's index in the state dict, for error messages."""

    saved_id: Any
    state: dict[str, Any]


def _pass_state_uncast(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """load_state_dict pre-hook: wrap every saved parameter's state (empty if it has none) in an _Uncast."""
    saved = state_dict["state"]
    ids = [saved_id for group in state_dict["param_groups"] for saved_id in group["params"]]
    return {**state_dict, "state": {saved_id: _Uncast(saved_id, saved.get(saved_id, {})) for saved_id in ids}}


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return None if t is None else t.to(device)
