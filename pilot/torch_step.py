"""The torch path of FusedPILoTSGD, where the Triton kernel does not run: :class:`TorchStep`.

Factorised tensors: the kernel's math (``pilot_kernels.pilot_sgd``) written with torch ops on 1-D views in memory
order. Compiled by inductor (which fuses each tensor's step into a single loop over memory that also computes the
telemetry): one call for all the small tensors of a bucket, traced by ``make_fx``, and one ``torch.compile``d call
each for the large ones (see :class:`FactorisedStep`); or run eagerly where compiling is not possible.
Hyper-parameters are 0-d tensors so that changing lr or alpha between steps never re-compiles; a group's
``maximize`` and ``nesterov`` are constants of the graph. Plain tensors: torch's own fused SGD kernel.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import warnings
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch._dynamo
import torch._inductor
import torch.fx.experimental._config
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from pilot_kernels.pilot_sgd import FLAG_MOMENTUM as _FLAG_MOMENTUM

from .direct_call import DirectCompiled
from .layout import Bucket, Entry, StepArgs, TorchViews, Work, flat


def _momentum_direction_(d: Tensor, buf: Tensor, momentum: Tensor, one_minus_dampening: Tensor, first: Tensor,
                         nesterov: bool) -> Tensor:
    """Update ``buf`` in place with direction d (torch.optim.SGD's rule); return the step direction."""
    new_buf = torch.where(first, d, momentum * buf + one_minus_dampening * d)
    buf.copy_(new_buf)
    return d + momentum * new_buf if nesterov else new_buf


def factorised_step_(grad: Tensor, x: Tensor, m: Tensor, w: Tensor, buf_m: Optional[Tensor], buf_w: Optional[Tensor],
                     l1_out: Tensor, nnz_out: Tensor, lr: Tensor, alpha: Tensor, momentum: Tensor,
                     one_minus_dampening: Tensor, maximize: bool, first: Tensor, nesterov: bool,
                     grad_scale: Optional[Tensor]) -> None:
    """One PILoT-SGD step of x = m * w in place; writes sum |x| and count(x != 0) to l1_out, nnz_out, and the
    unscaled gradient back to grad when a grad_scale is given.

    ``maximize`` and ``nesterov`` are Python bools, constants of a compiled graph: as 0-d tensors they cost a
    select and a multiply-add per element and factor, about 6% of a large tensor's pass on one CPU thread. They
    are fixed for a parameter group, so they never compile again in a run. ``first`` stays a tensor: it changes
    after the first step."""
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
        grad.copy_(g.to(grad.dtype))  # the unscaled gradient, as torch's fused optimizers leave it
    if maximize:
        g = -g
    d_m = g * w + alpha * m
    d_w = g * m + alpha * w
    if buf_m is not None and buf_w is not None:
        d_m = _momentum_direction_(d_m, buf_m, momentum, one_minus_dampening, first, nesterov)
        d_w = _momentum_direction_(d_w, buf_w, momentum, one_minus_dampening, first, nesterov)
    new_m = m - lr * d_m
    new_w = w - lr * d_w
    m.copy_(new_m)
    w.copy_(new_w)
    new_x = (new_m * new_w).to(x.dtype)
    x.copy_(new_x)
    stored = new_x.float()
    l1_out.copy_(stored.abs().sum().reshape(1))
    # counted in int32 where it cannot overflow: int64 lanes cost about 4% of the pass on one CPU thread
    count_dtype = torch.int32 if stored.numel() < 2**31 else torch.int64
    nnz_out.copy_((stored != 0).sum(dtype=count_dtype).reshape(1))


def factorised_steps_(calls: list[tuple[Any, ...]]) -> None:
    """``factorised_step_`` on each argument tuple; compiled, the whole list is one graph and one call."""
    for args in calls:
        factorised_step_(*args)


class StaticCall(NamedTuple):
    """``factorised_steps_`` over one fixed list of calls, compiled for it by :meth:`FactorisedStep.static_call`:
    called with the calls' gradients then ``states`` (the distinct other tensors), without dynamo."""

    function: Callable[..., None]  # compiled, or ``eager`` where compiling is off or failed
    eager: Callable[..., None]
    states: tuple[Tensor, ...]


class FactorisedStep:
    """``factorised_step_`` over a bucket's tensors, compiled on first use; falls back to eager (with a warning) if
    compiling fails.

    A compiled call costs about 35 us on the host whatever its size, so tensors under ``BATCHED_NUMEL`` elements
    (ResNet-20's are all under 37k) are stepped by one call of ``factorised_steps_`` with static sizes: a
    :class:`StaticCall` that holds every small tensor of the bucket, compiled again only when that set changes
    (sizes, dtype, momentum, grad scale), at 0.3 to 0.9 s of compile per tensor. It is traced by ``make_fx`` and
    compiled by inductor directly, not through ``torch.compile``: dynamo's guards and frame handling over its 300
    or so arguments cost about 0.15 ms per call for ResNet-20, half the kernel's time. Its key
    (:func:`static_key`) stands in for the guards, and :class:`TorchStep` only calls it again for the same
    entries, whose gradients have the parameters' sizes and dtypes. Larger tensors, where the call's cost is small
    against the pass over memory, get one ``torch.compile``d call each of ``factorised_step_`` with dynamic sizes,
    whose dozen or so graphs (by dtype, momentum on/off and inductor's size class of the reduction) serve every
    size. Dynamo handles the first call of each tensor (its sizes, dtypes and flags); later ones call the graph
    that served it directly (:class:`~pilot.direct_call.DirectCompiled`: about 10 us instead of 50, which is 2 ms
    of ResNet-50's step on one CPU thread).

    Arguments are 1-D tensors; those of the dynamic-size calls also without a ``_base`` (``.detach()`` the views)
    so that dynamo guards on nothing but their sizes. Each kind compiles at most ``RECOMPILE_LIMIT`` graphs (for
    dynamo, ``torch.compile``'s own ``recompile_limit``, or dynamo's config where torch.compile lacks it), and
    duck sizing (which would tie unrelated sizes and offsets that happen to be equal) is off for the dynamic-size
    calls, by a config patch entered only around the calls that go through dynamo.
    """

    RECOMPILE_LIMIT = 64
    BATCHED_NUMEL = 2**16
    # Newer torch takes the limit as torch.compile's argument; older (the GPU machine's torch 2.11) only as dynamo's
    # config, patched around the calls.
    COMPILE_TAKES_RECOMPILE_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters

    def __init__(self, compile: bool) -> None:
        self.compiled = compile
        self.each: Optional[DirectCompiled] = None
        self.static_calls: dict[tuple[Any, ...], Callable[..., None]] = {}
        if compile:  # only then: torch.compile itself refuses some platforms, where the eager path must still run
            limit = {"recompile_limit": self.RECOMPILE_LIMIT} if self.COMPILE_TAKES_RECOMPILE_LIMIT else {}
            self.each = DirectCompiled(factorised_step_, around=self._dynamo_config, dynamic=True, fullgraph=True,
                                       **limit)

    def is_small(self, numel: int) -> bool:
        """Whether a tensor of ``numel`` elements is stepped in the one static-size call."""
        return numel < self.BATCHED_NUMEL

    def static_call(self, states: list[tuple[Any, ...]], grads: list[Tensor]) -> StaticCall:
        """The compiled step of the calls ``(grads[i], *states[i])`` (compiled here unless an earlier one has the
        same :func:`static_key`), or their eager step where compiling is off or failed."""
        structure, distinct = _structure(states)
        eager = partial(_static_steps, structure, len(states))
        if not self.compiled or not states:
            return StaticCall(eager, eager, distinct)
        key = static_key(structure, grads, distinct)
        function = self.static_calls.get(key)
        if function is None:
            if len(self.static_calls) >= self.RECOMPILE_LIMIT:
                self._give_up(f"{self.RECOMPILE_LIMIT} sets of small tensors compiled already")
                return self.static_call(states, grads)
            try:
                graph = make_fx(eager, tracing_mode="fake")(*grads, *distinct)
                # no size asserts: the key holds every size and stride, and they cost ~7% of ResNet-20's call
                function = torch._inductor.compile(graph, [*grads, *distinct], options={"size_asserts": False})
            except Exception as error:  # noqa: BLE001 - compiler failures only; input errors re-raise
                if not _is_compiler_failure(error):
                    raise
                self._give_up(f"{type(error).__name__}: {error}")
                return self.static_call(states, grads)
            self.static_calls[key] = function
        return StaticCall(function, eager, distinct)

    def run(self, small: Optional[StaticCall], small_grads: list[Tensor], large: list[tuple[Any, ...]]) -> None:
        """Apply the step: the small tensors' :class:`StaticCall` to their gradients, then the ``large`` argument
        tuples (the gradient first) in a call each."""
        if small is not None:
            try:
                (small.function if self.compiled else small.eager)(*small_grads, *small.states)
            except Exception as error:  # noqa: BLE001 - compiler failures only (a kernel built at its first call)
                if not self.compiled or not _is_compiler_failure(error):
                    raise
                self._give_up(f"{type(error).__name__}: {error}")
                small.eager(*small_grads, *small.states)
        if not large:
            return
        if not self.compiled or self.each is None:
            factorised_steps_(large)
            return
        done = 0
        try:
            for args in large:
                self.each(*args)
                done += 1
        except Exception as error:  # noqa: BLE001 - compiler failures only; input errors re-raise
            if not _is_compiler_failure(error):
                raise
            self._give_up(f"{type(error).__name__}: {error}")
            factorised_steps_(large[done:])

    def _dynamo_config(self) -> contextlib.ExitStack:
        """The config patches entered around a dynamic-size call that goes through dynamo (they cost tens of
        microseconds, which calls of seen arguments skip)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.fx.experimental._config.patch(use_duck_shape=False))
        if not self.COMPILE_TAKES_RECOMPILE_LIMIT:
            stack.enter_context(torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT))
        return stack

    def _give_up(self, cause: str) -> None:
        """Switch to the eager path for good (a compiler failure, or too many graphs)."""
        warnings.warn(f"torch.compile of the PILoT step failed ({cause}); using the eager torch path, which is "
                      "correct but several times slower", RuntimeWarning)
        self.compiled = False


def _structure(states: list[tuple[Any, ...]]) -> tuple[tuple[tuple[Any, ...], ...], tuple[Tensor, ...]]:
    """Each call's arguments after the gradient as indices into the distinct tensors among them (None and the
    bool flags as they are), and those tensors in order of first use (the group's scalars are shared by its
    calls)."""
    index: dict[int, int] = {}
    distinct: list[Tensor] = []
    structure = []
    for args in states:
        call = []
        for t in args:
            if t is None or isinstance(t, bool):
                call.append(t)
                continue
            if id(t) not in index:
                index[id(t)] = len(distinct)
                distinct.append(t)
            call.append(index[id(t)])
        structure.append(tuple(call))
    return tuple(structure), tuple(distinct)


def _static_steps(structure: tuple[tuple[Any, ...], ...], count: int, *tensors: Tensor) -> None:
    """``factorised_steps_`` on the calls ``structure`` describes: ``tensors`` are the ``count`` gradients, then
    the distinct other arguments."""
    grads, states = tensors[:count], tensors[count:]
    factorised_steps_([(grad, *(i if i is None or isinstance(i, bool) else states[i] for i in call))
                       for grad, call in zip(grads, structure)])


def static_key(structure: tuple[Any, ...], grads: list[Tensor], distinct: tuple[Tensor, ...]) -> tuple[Any, ...]:
    """What a compiled :class:`StaticCall` depends on, as dynamo's guards would check it: which argument is which
    tensor (or None, or which flag), every tensor's dtype, size, stride and device, and the number of threads (inductor's CPU
    kernels are compiled for it). Storage offsets are not part of it: inductor's wrapper copies an input that is
    not aligned as the compiled kernel assumes."""
    tensors = (*grads, *distinct)
    return (structure, torch.get_num_threads(), torch.is_grad_enabled(),
            tuple((t.dtype, t.shape, t.stride(), t.device) for t in tensors))


def _is_compiler_failure(error: Exception) -> bool:
    """Errors of the compiler stack (no C++ compiler, unsupported platform), not errors in the inputs."""
    module = type(error).__module__
    return (module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "torch.fx"))
            or isinstance(error, (OSError, ImportError)))


class PlainBatch(NamedTuple):
    """The plain tensors of one (group, first momentum step): one call of torch's fused SGD."""

    group: int
    first: bool
    positions: list[int]  # in the work's items: where their gradients are
    entries: list[Entry]
    params: list[Tensor]  # the entries' x
    buffers: list[Tensor]  # empty without momentum


class StepPlan(NamedTuple):
    """Every argument of a bucket's step but the gradients, built from its work and reused while the same entries
    are stepped with the same flags and grad scale (see :meth:`fits`). Hyper-parameter values are not part of it:
    they live in :class:`TorchStep`'s scalar tensors, updated in place."""

    views: list[TorchViews]  # each item's entry's views, compared by identity: a refreshed entry gets new ones
    flags: tuple[int, ...]  # StepArgs.flags (momentum on / off, nesterov, maximize per group)
    grad_scale: Optional[Tensor]  # StepArgs.grad_scale, compared by identity (GradScaler updates it in place)
    pending: int  # len(bucket.pending_buffers): grows where a first momentum step is to be taken again
    reusable: bool  # False when an item takes its first momentum step (the next step is not one), or the scale
    # is a copy on this device
    threads: int  # torch.get_num_threads(), which the compiled small tensors' call is specific to
    groups: list[int]  # the groups of the factorised items
    small_positions: list[int]  # the items stepped by ``small``
    small: Optional[StaticCall]
    large: list[tuple[int, tuple[Any, ...]]]  # (item position, the arguments after the gradient) per large tensor
    plain: list[PlainBatch]

    def fits(self, bucket: Bucket, work: Work, args: StepArgs) -> bool:
        """Whether this step's work is the one the plan was built for."""
        return (self.reusable and len(work.items) == len(self.views) and self.flags == args.flags
                and self.grad_scale is args.grad_scale and self.pending == len(bucket.pending_buffers)
                and self.threads == torch.get_num_threads()
                and all(map(operator.is_, self.views, [e.views for e, _ in work.items])))


class TorchStep:
    """One bucket's step on the torch path. Factorised tensors: :class:`FactorisedStep` (shared by the optimizer's
    buckets). Plain tensors: torch's fused SGD kernel, one call per (group, first momentum step). Not capturable:
    GradScaler's found_inf is read on the host.

    A step's host time matters against ResNet-20's 0.3 ms of compiled kernel, so what does not change between
    steps is kept: the :class:`StepPlan` and, per group, the 0-d tensors of the hyper-parameters, written in place
    when a value changes (the compiled graph reads them at every call, and never compiles again for a new value).
    Only the gradients' 1-D views are made at every step: a gradient is often a new tensor at each step
    (``zero_grad`` sets them to None), and a cached view would keep its memory alive.
    """

    bumps_versions = True

    def __init__(self, device: torch.device, factorised_step: FactorisedStep) -> None:
        self.device, self.factorised_step = device, factorised_step
        self.first_flags = (torch.tensor(False, device=device), torch.tensor(True, device=device))
        self.plan: Optional[StepPlan] = None
        # per group: (lr, alpha, momentum, 1 - dampening) as host numbers, and as 0-d tensors
        self.scalars: dict[int, tuple[tuple[Any, ...], tuple[Tensor, ...]]] = {}

    @staticmethod
    def slots_of(numel: int) -> int:
        """One telemetry / momentum_started slot per tensor."""
        return 1

    def step(self, bucket: Bucket, work: Work, args: StepArgs) -> bool:
        """Step ``work.items``; False if GradScaler's found_inf skipped the step."""
        if args.found_inf is not None and bool(args.found_inf.item()):
            return False
        # collect() left each gradient in its x's memory order: a 1-D one (biases, norms) is its own 1-D view
        grads = [grad if grad.dim() == 1 else flat(grad) for _, grad in work.items]
        plan = self.plan
        if plan is None or not plan.fits(bucket, work, args):
            plan = self._plan(bucket, work, args, grads)
            self.plan = plan if plan.reusable else None
        for index in plan.groups:
            self._group_scalars(index, args)
        self.factorised_step.run(plan.small, [grads[i] for i in plan.small_positions],
                                 [(grads[i].detach(), *rest) for i, rest in plan.large])
        scale = None if args.grad_scale is None else args.grad_scale.to(self.device)
        for batch in plan.plain:
            self._plain_step(bucket, batch, [grads[i] for i in batch.positions], args, scale)
        return True

    def _plan(self, bucket: Bucket, work: Work, args: StepArgs, grads: list[Tensor]) -> StepPlan:
        """The plan of this step's work (``grads``: its gradients, 1-D); marks the slots of the items that take their
        first momentum step."""
        scale = None if args.grad_scale is None else args.grad_scale.to(self.device)
        any_first = False
        groups: list[int] = []
        small: list[tuple[int, tuple[Any, ...]]] = []
        large: list[tuple[int, tuple[Any, ...]]] = []
        plain: dict[tuple[int, bool], PlainBatch] = {}
        for position, (e, _) in enumerate(work.items):
            has_momentum = args.flags[e.group] & _FLAG_MOMENTUM != 0
            first = has_momentum and args.states[e.param][e.buffer_keys[0]] is None
            if first:
                bucket.started[e.slot] = 1
                any_first = True
            views = e.views
            if not e.factorised:
                batch = plain.setdefault((e.group, first), PlainBatch(e.group, first, [], [], [], []))
                batch.positions.append(position)
                batch.entries.append(e)
                batch.params.append(views.x)
                if has_momentum:
                    batch.buffers.append(views.buffer)
                continue
            if e.group not in groups:
                groups.append(e.group)
            lr, alpha, momentum, one_minus_dampening = self._group_scalars(e.group, args)
            group = args.groups[e.group]
            buffer, buffer_w = (views.buffer, views.buffer_w) if has_momentum else (None, None)
            rest = (views.x, views.m, views.w, buffer, buffer_w, views.l1, views.nnz, lr, alpha, momentum,
                    one_minus_dampening, bool(group["maximize"]), self.first_flags[first], bool(group["nesterov"]),
                    scale)
            (small if self.factorised_step.is_small(e.numel) else large).append((position, rest))
        small_positions = [position for position, _ in small]
        static_call = self.factorised_step.static_call(
            [rest for _, rest in small], [grads[i] for i in small_positions]) if small else None
        return StepPlan([e.views for e, _ in work.items], args.flags, args.grad_scale, len(bucket.pending_buffers),
                        not any_first and scale is args.grad_scale, torch.get_num_threads(), groups,
                        small_positions, static_call, large, list(plain.values()))

    def _group_scalars(self, index: int, args: StepArgs) -> tuple[Tensor, ...]:
        """The group's hyper-parameters as 0-d tensors on the device: made once, then written in place where a value
        changed since the last step."""
        group, hyper = args.groups[index], args.hypers[index]
        values = (float(group["lr"]), float(group["alpha"]), float(hyper.momentum), float(hyper.one_minus_dampening))
        cached = self.scalars.get(index)
        if cached is None:
            tensors = tuple(torch.tensor(v, dtype=torch.float32, device=self.device) for v in values)
            self.scalars[index] = (values, tensors)
            return tensors
        old, tensors = cached
        if old != values:
            for tensor, before, now in zip(tensors, old, values):
                if before != now:
                    tensor.fill_(now)
            self.scalars[index] = (values, tensors)
        return tensors

    def _plain_step(self, bucket: Bucket, batch: PlainBatch, grads: list[Tensor], args: StepArgs,
                    scale: Optional[Tensor]) -> None:
        """torch's fused SGD kernel on one batch of plain tensors (``grads``: theirs, 1-D)."""
        group, numbers = args.groups[batch.group], args.numbers[batch.group]
        params, originals = batch.params, grads
        if bucket.dtype != torch.float32:  # torch's kernel wants buffers in the parameters' dtype: work in fp32
            params, grads = [x.float() for x in params], [g.float() for g in grads]
        torch._fused_sgd_(params, grads, batch.buffers, weight_decay=numbers.weight_decay, momentum=numbers.momentum,
                          lr=float(group["lr"]), dampening=numbers.dampening, nesterov=group["nesterov"],
                          maximize=group["maximize"], is_first_step=batch.first, grad_scale=scale)
        if bucket.dtype != torch.float32:
            for e, original, updated, unscaled in zip(batch.entries, originals, params, grads):
                e.views.x.copy_(updated)
                if scale is not None:  # torch's kernel unscaled the fp32 copy of the gradient
                    original.copy_(unscaled)
        else:  # torch's fused kernel does not bump the versions of what it writes: autograd must see it
            torch.autograd.graph.increment_version(params + (grads if scale is not None else []))
