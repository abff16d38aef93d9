"""FusedPILoTSGD: PILoT's factorised SGD as a torch.optim drop-in, one fused pass per step.

The class keeps torch.optim's surface; the rest lives in modules named for what they hold:
:mod:`pilot.layout` (flat storage, entries, the parameter as the source of truth), :mod:`pilot.storage` (laying the
state out in it with a bounded peak of memory), :mod:`pilot.triton_step` and
:mod:`pilot.torch_step` (the two backends, one ``step()`` each), :mod:`pilot.state_dict` (state-dict conversion),
:mod:`pilot.sharding` (DTensor / FSDP2), :mod:`pilot.checks` (argument checks).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Collection, Iterable, Optional, Union

import torch
import torch._dynamo
from torch import Tensor
from torch.optim import Optimizer

from pilot_kernels import KERNELS_INTERPRETED, HyperRow

from .checks import check_bool_or_none, check_group, check_no_shared_memory, check_params
from .factorisation import FACTOR_KEYS, PLAIN_KEYS, is_prunable
from .layout import (GroupNumbers, Layout, StepArgs, collect, notice_outside_writes, settle_momentum, step_bucket,
                     telemetry)
from .sharding import local
from .state_dict import complete_state_dict, loaded_state, pass_state_uncast
from .storage import lay_out, own_storages, viewed_storages
from .torch_step import FactorisedStep, TorchStep
from .triton_step import (SCHEDULED_COLUMNS, TritonStep, capture_underway, group_flags, make_capturable,
                          make_numbers)

__all__ = ["FusedPILoTSGD", "BACKENDS"]

BACKENDS = ("auto", "triton", "compile", "eager")


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
        capturable: ``lr`` and ``alpha`` are device tensors, read by the step on the device, so that it can be
            captured in a CUDA graph (see below). Needs the Triton path.
        foreach, fused: accepted so that code written for :class:`torch.optim.SGD` runs unchanged, and ignored:
            the step is always fused (``backend`` chooses how).

    State (``optimizer.state[p]``): ``"m"``, ``"w"``, ``"momentum_buffer_m"``, ``"momentum_buffer_w"`` for a
    factorised p, ``"momentum_buffer"`` otherwise, each shaped like p (buffers are None until the first step
    with momentum). They are views into flat fp32 storage per (device, dtype), laid out again by
    ``add_param_group``, ``load_state_dict`` and when momentum is switched on. Building and laying out hold the new
    state plus one parameter's temporaries (at most about an fp32 copy of it), except ``add_param_group``, whose
    storages grow: the new state plus the larger of the old factors and buffers (:mod:`pilot.storage`).

    The model is the source of truth: if a factorised parameter is written outside the optimizer (a model
    ``load_state_dict``, manual pruning, re-initialisation, ``p.data = ...`` with the same shape, dtype and
    device), the entries whose value no longer equals round(m * w) are factorised again from their new value
    (with the group's beta) and their momentum restarts from zero; the others keep their factors. A parameter
    that changed shape, dtype or device is an error: create the optimizer after moving or converting the model.

    After each step, :meth:`l1_norm` and :meth:`density` give sum |x| and the fraction of x != 0 over the
    factorised parameters, computed by the step pass itself.

    Exactness against torch. Plain parameters: the torch paths (``"compile"``, ``"eager"``) call torch's fused SGD
    kernel and equal ``torch.optim.SGD(fused=True)`` bit for bit (torch's default implementation rounds the
    momentum buffer differently on a few elements in ten thousand). The Triton kernel computes every
    multiply-add as an fma in the order of torch.optim.SGD's own kernels, so compiled it rounds fp32 parameters as
    ``torch.optim.SGD`` does (checked on CPU in an interpreter that rounds fmas once; not yet on a GPU); Triton's
    interpreter rounds an fma's product and sum separately, so there results differ by about an ulp on a
    fraction of the elements. Factorised parameters: the kernel, likewise, against :mod:`pilot.reference`
    (SGD on the factors); the compiled torch path lets inductor round as it likes (close, not bit-exact).
    Parameters may have gaps in memory (views such as ``t[..., 0]``, as torch's own optimizer tests use): they are
    stepped in a dense copy, written back after the step, and their state is contiguous.

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
    since a captured graph would never see it. Other hyper-parameters are host numbers: one that changes (e.g.
    OneCycleLR's momentum) is written into the table on the device, during capture too, and a captured graph
    replays the value it captured, as torch's capturable optimizers do.
    Warm up a few steps before capturing (the first steps build the tables) and keep the gradients at fixed
    addresses during capture (``zero_grad(set_to_none=False)``): a table that has to change while the stream
    is capturing is a RuntimeError. Capturing a step with ``capturable=False`` is a RuntimeError, as with torch's
    optimizers. Once a step was captured, anything that lays the state out again in new memory
    (``load_state_dict``, ``add_param_group``, switching momentum on, a parameter replaced by one of another
    memory layout) is a RuntimeError, since the graph would go on writing to the old memory: do it before
    capturing.

    Host synchronisation: the Triton path never makes the host wait for the device, with or without
    ``capturable``. The kernel's tables are uploaded, from pinned memory without blocking, only when what they
    hold changes: gradient addresses, which parameters have gradients, a group's hyper-parameters. Under a
    per-step schedule a steady step is thus one launch and one small copy of the hyper table per (device, dtype);
    with ``capturable=True`` the lr and alpha tensors are copied into it on the device instead. momentum,
    dampening and weight_decay given as one-element tensors are read on the host when they change (another
    tensor, or an in-place edit), not at every step. A gradient whose strides differ from its parameter's (in a
    dimension of size > 1: autograd ignores the others) is copied into a buffer laid out like the parameter (with
    a warning). The torch path reads GradScaler's found_inf on the host.

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
        check_bool_or_none("foreach", foreach)
        check_bool_or_none("fused", fused)
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (need one of {', '.join(BACKENDS)})")
        if not isinstance(capturable, bool):
            raise TypeError(f"Invalid capturable value: expected a bool, got {capturable!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, alpha=alpha, beta=beta, reparam=reparam, maximize=maximize)
        check_group(defaults)
        self._backend = backend
        self._capturable = capturable
        self._layout = Layout()
        self._captured = False  # a CUDA graph captured a step: it holds the addresses of the state's memory
        self._host_numbers: dict[int, tuple[Tensor, int, float]] = {}  # see _host_number
        self._factorised_step: Optional[FactorisedStep] = None
        # None once the layout is complete; else the set_params of the lay_out to do (again) at the next step:
        # construction lays out all its groups at once, and a lay_out that raised (out of memory) is retried
        self._pending_layout: Optional[bool] = False
        super().__init__(params, defaults)
        self._lay_out()  # every group at once: one layout's peak of memory, not one per group
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
        self._check_not_captured("add_param_group")
        own_tensors = {key for key in SCHEDULED_COLUMNS if isinstance(param_group.get(key), Tensor)}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_group(group)
            check_params(group, len(self.param_groups) - 1, self._capturable_problem)
            for device in {local(p).device for p in group["params"]}:
                self._path_for(device)  # raises before any parameter is overwritten with m0 * w0
            check_no_shared_memory([p for g in self.param_groups for p in g["params"]])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if self._capturable:
            make_capturable(group, keep=own_tensors)
        for p in group["params"]:  # m and w None: factorised into the flat storage when it is laid out
            self.state[p] = dict.fromkeys(FACTOR_KEYS if self._factorises(p, group) else PLAIN_KEYS)
        if self._pending_layout is None:  # else in __init__, which lays every group out at once
            self._lay_out()

    @staticmethod
    def _factorises(p: Tensor, group: dict[str, Any]) -> bool:
        return is_prunable(p) if group["reparam"] is None else bool(group["reparam"])

    def _path_for(self, device: torch.device) -> str:
        """The one place that picks the implementation: "triton", "compile" or "eager"."""
        backend = self._backend
        if backend == "auto":
            use_triton = device.type == "cuda" or (device.type == "cpu" and KERNELS_INTERPRETED)
            backend = "triton" if use_triton else "compile"
        if backend == "triton" and device.type == "cpu" and not KERNELS_INTERPRETED:
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before pilot_kernels is "
                             "imported; use backend='auto' or 'compile' for the CPU path")
        if backend == "triton" and device.type != "cpu" and KERNELS_INTERPRETED:
            # The interpreter runs the kernel on the host and would dereference the tables' device addresses
            raise ValueError(f"parameters on {device}: TRITON_INTERPRET=1 was set when pilot_kernels was imported, "
                             "and Triton's interpreter can only step CPU tensors; unset TRITON_INTERPRET to train on "
                             "the GPU (or pass backend='compile' or 'eager')")
        return backend

    def _capturable_problem(self, device: torch.device) -> str:
        if not self._capturable or self._path_for(device) == "triton":
            return ""
        return (f"on {device} takes the torch path (backend={self._backend!r}); use CUDA tensors (or "
                "TRITON_INTERPRET=1 on CPU) with backend 'auto' or 'triton'")

    def _make_backend(self, device: torch.device) -> Union[TritonStep, TorchStep]:
        path = self._path_for(device)
        if path == "triton":
            return TritonStep(device, self._capturable)
        if self._factorised_step is None:
            self._factorised_step = FactorisedStep(compile=path != "eager")
        return TorchStep(device, self._factorised_step)

    def _lay_out(self, own: Optional[Collection[tuple[torch.device, int]]] = None, set_params: bool = False) -> None:
        """(Re-)lay the state out in flat storage (see :mod:`pilot.storage`); buffers a skipped first step never
        filled are dropped first. ``own``: the storages the state may stay in (default: the current layout's);
        ``set_params``: overwrite the factorised parameters with round(m * w)."""
        settle_momentum(self._layout.buckets, self.state)
        old = self._layout
        if own is None:
            own = own_storages(old)
        # Until the new layout is complete: if lay_out raises (out of memory), the state's tensors all hold their
        # values (old views or new), and the next step or telemetry lays out again rather than step stale storage
        self._layout, self._pending_layout = Layout(), set_params
        self._layout = lay_out(self, self._make_backend, old, own=own, set_params=set_params)
        self._pending_layout = None
        self._host_numbers = {}  # groups may have been replaced: drop the tensors read before

    def _notice_outside_writes(self, numbers: tuple[GroupNumbers, ...]) -> None:
        """Factorise again what was written outside the optimizer, and lay the state out again where a parameter
        changed memory layout or a group switched momentum on (its buffers need storage)."""
        if self._pending_layout is not None:
            self._lay_out(set_params=self._pending_layout)
            return
        if notice_outside_writes(self._layout, self.state, self.param_groups, numbers):
            self._check_not_captured("a parameter replaced by one of another memory layout (or momentum switched on)")
            self._lay_out()

    def _check_not_captured(self, cause: str) -> None:
        """Raise if a CUDA graph captured a step: laying the state out again frees the memory it writes to."""
        if self._captured:
            raise RuntimeError(
                f"FusedPILoTSGD: {cause} lays the optimizer's state out again in new memory, but a CUDA graph "
                "captured a step of this optimizer and would go on writing to the old memory. Do this before "
                "capturing, or continue with a new optimizer (new.load_state_dict(old.state_dict())) and capture "
                "again")

    # ------------------------------------------------------------------ the step

    @torch._dynamo.disable  # host-side tables (addresses, versions): never traced, see the class docstring
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimisation step (one fused launch per (device, dtype)).

        Args:
            closure: re-evaluates the model and returns the loss (run with gradients enabled).
        """
        # As torch's optimizers check (Optimizer._cuda_graph_capture_health_check), on every device of the state
        capturing = capture_underway([b.device for b in self._layout.buckets if b.device.type == "cuda"])
        if capturing and not self._capturable:
            raise RuntimeError(
                "Attempting CUDA graph capture of step() for an instance of FusedPILoTSGD but capturable is "
                "False: lr and alpha would be frozen into the graph. Create the optimizer with capturable=True")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        numbers = self._group_numbers()
        self._notice_outside_writes(numbers)
        groups = self.param_groups
        args = StepArgs(groups, numbers, tuple(self._hyper_row(n) for n in numbers),
                        tuple(group_flags(group, n.momentum) for group, n in zip(groups, numbers)),
                        getattr(self, "grad_scale", None), getattr(self, "found_inf", None), self.state)
        for bucket in self._layout.buckets:
            work = collect(bucket)
            if work.items or work.empty:
                step_bucket(bucket, work, args)
        if capturing:  # only a step that completed is in the graph (a capture that raised left nothing behind)
            self._captured = True
        return loss

    def _group_numbers(self) -> tuple[GroupNumbers, ...]:
        return tuple(GroupNumbers(*(self._host_number(group, key) for key in GroupNumbers._fields))
                     for group in self.param_groups)

    def _host_number(self, group: dict[str, Any], key: str) -> float:
        """``group[key]`` as a host number. A one-element tensor (accepted, as torch.optim accepts them) is read,
        which is a sync for a CUDA tensor, only when it is another tensor than the one read last or was changed in
        place since (its version counter): not at every step. Edits through ``.data`` bypass the version counter
        and go unseen; ``fill_`` them."""
        value = group[key]
        if not isinstance(value, Tensor):
            return float(value)
        cached = self._host_numbers.get(id(value))
        if cached is None or cached[1] != value._version:
            cached = (value, value._version, float(value))  # holding the tensor keeps its id from being reused
            self._host_numbers[id(value)] = cached
        return cached[2]

    @staticmethod
    def _hyper_row(numbers: GroupNumbers) -> HyperRow:
        """The group's row of the hyper table but for lr and alpha, which change at every step under a schedule:
        the backends read them from the group (the Triton path writes them into the table on the device)."""
        return HyperRow(lr=0.0, alpha=0.0, weight_decay=numbers.weight_decay, momentum=numbers.momentum,
                        one_minus_dampening=1.0 - numbers.dampening)

    # ------------------------------------------------------------------ telemetry

    def l1_norm(self) -> float:
        """Sum of |m * w| over the factorised parameters (as the model holds them), from the last step."""
        return self._telemetry()[0]

    def density(self) -> float:
        """Fraction of factorised entries with m * w != 0 (nan when no parameter is factorised)."""
        total = sum(e.param.numel() for bucket in self._layout.buckets for e in bucket.entries if e.factorised)
        nonzero = self._telemetry()[1]
        return nonzero / total if total else math.nan

    def _telemetry(self) -> tuple[float, int]:
        """(sum |x|, count of x != 0) over the factorised parameters; the shards of DTensors summed over ranks."""
        self._notice_outside_writes(self._group_numbers())
        return telemetry(self._layout)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, complete enough to serve as the template that a checkpoint is loaded into
        in place (as torch.distributed.checkpoint does with a fresh optimizer's state dict):

        * the parameters of a group with momentum always have their buffers (zeros before the first momentum
          step) and ``"momentum_started"`` (bool) says whether the buffers hold a value;
        * the state of a DTensor parameter is DTensors, sharded like the parameter.
        """
        settle_momentum(self._layout.buckets, self.state)
        return complete_state_dict(super().state_dict(), self.param_groups)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (any device); factors stay fp32 whatever the model dtype.

        torch.optim's own loading (hooks, group checks, ``param_names``), with the state converted here rather
        than cast to the parameters' dtype. The parameters are set to round(m * w) of the loaded factors, so the
        model and the optimizer agree whichever of the two is loaded first. State of a DTensor parameter may come
        sharded (a DTensor, e.g. from torch.distributed.checkpoint) or whole; each rank keeps its shard. A dense
        optimizer's state dict (e.g. ``torch.optim.SGD``'s) is rejected: its momentum lives in x-space and has no
        counterpart for the factors; load the model's weights instead and create the optimizer after, which
        factorises them. A state dict that is rejected leaves the optimizer as it was. lr and alpha are loaded as
        numbers, or as device tensors with capturable=True, whichever kind the state dict holds.
        """
        self._check_not_captured("load_state_dict")
        # Registered for this call only, so it runs after any hook of the user's.
        handle = self.register_load_state_dict_pre_hook(pass_state_uncast)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "backend" not in state:  # torch's load_state_dict hands over only the loaded state and groups
            self._adopt_loaded(state["state"], state["param_groups"])
            return
        self._backend = state.pop("backend")
        self._capturable = state.pop("capturable")
        self._captured = False  # a new copy of the state: no graph holds its memory
        super().__setstate__(state)
        self._factorised_step = None
        self._layout = Layout()
        self._pending_layout = False
        self._lay_out(own=viewed_storages(self.state))  # an unpickled copy: its storages are this optimizer's

    def __getstate__(self) -> dict[str, Any]:
        settle_momentum(self._layout.buckets, self.state)
        state = super().__getstate__()
        state["backend"] = self._backend
        state["capturable"] = self._capturable
        return state

    def _adopt_loaded(self, state: dict[Any, Any], param_groups: list[dict[str, Any]]) -> None:
        """Check what torch's load_state_dict matched to our parameters; then take it over. The old state is freed
        before the loaded one is copied into the new layout (one parameter at a time), so that loading holds one
        state, not two (the caller's state dict aside)."""
        new_state = loaded_state(self, state, param_groups)
        new_groups = []
        for group in param_groups:
            new_group = {**self.defaults, **group}
            check_group(new_group)
            if self._capturable:
                make_capturable(new_group, keep=set())
            else:  # e.g. a capturable optimizer's checkpoint
                make_numbers(new_group)
            new_groups.append(new_group)
        own = own_storages(self._layout)  # a state dict of this optimizer's own views stays where it is
        self.param_groups = new_groups
        self.state.clear()
        self.state.update(new_state)
        self._layout = Layout()
        self._lay_out(own=own, set_params=True)
