"""The torch path of FusedPILoTSGD, where the Triton kernel does not run: :class:`TorchStep`.

Factorised tensors: the kernel's math (``pilot_kernels.pilot_sgd``) written with torch ops on 1-D views in memory
order. Compiled with ``torch.compile`` (inductor fuses each tensor's step into a single loop over memory that also
computes the telemetry): one call for all the small tensors of a bucket, one call each for the large ones (see
:class:`FactorisedStep`); or run eagerly where compiling is not possible.
Hyper-parameters and flags are 0-d tensors so that changing lr or alpha between steps never re-compiles. Plain
tensors: torch's own fused SGD kernel.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
import torch._dynamo
import torch.fx.experimental._config
from torch import Tensor

from pilot_kernels.pilot_sgd import FLAG_MOMENTUM as _FLAG_MOMENTUM

from .layout import Bucket, Entry, StepArgs, Work, flat


def _momentum_direction_(d: Tensor, buf: Tensor, momentum: Tensor, one_minus_dampening: Tensor, first: Tensor,
                         nesterov: Tensor) -> Tensor:
    """Update ``buf`` in place with direction d (torch.optim.SGD's rule); return the step direction."""
    new_buf = torch.where(first, d, momentum * buf + one_minus_dampening * d)
    buf.copy_(new_buf)
    return torch.where(nesterov, d + momentum * new_buf, new_buf)


def factorised_step_(grad: Tensor, x: Tensor, m: Tensor, w: Tensor, buf_m: Optional[Tensor], buf_w: Optional[Tensor],
                     l1_out: Tensor, nnz_out: Tensor, lr: Tensor, alpha: Tensor, momentum: Tensor,
                     one_minus_dampening: Tensor, sign: Tensor, first: Tensor, nesterov: Tensor,
                     grad_scale: Optional[Tensor]) -> None:
    """One PILoT-SGD step of x = m * w in place; writes sum |x| and count(x != 0) to l1_out, nnz_out, and the
    unscaled gradient back to grad when a grad_scale is given."""
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
        grad.copy_(g.to(grad.dtype))  # the unscaled gradient, as torch's fused optimizers leave it
    g = g * sign
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
    nnz_out.copy_((stored != 0).sum().reshape(1))


def factorised_steps_(calls: list[tuple[Any, ...]]) -> None:
    """``factorised_step_`` on each argument tuple; compiled, the whole list is one graph and one call."""
    for args in calls:
        factorised_step_(*args)


class FactorisedStep:
    """``factorised_step_`` over a bucket's tensors, compiled on first use; falls back to eager (with a warning) if
    compiling fails.

    A compiled call costs about 35 us on the host whatever its size, so tensors under ``BATCHED_NUMEL`` elements
    (ResNet-20's are all under 37k) are stepped by one call of ``factorised_steps_`` with static sizes: its graph
    holds every small tensor of the bucket and is compiled again only when that set changes (sizes, dtype,
    momentum, grad scale), at 0.3 to 0.9 s of compile per tensor. Larger tensors, where the call's cost is small
    against the pass over memory, get one call each of ``factorised_step_`` with dynamic sizes, whose dozen or so
    graphs (by dtype, momentum on/off and inductor's size class of the reduction) serve every size.

    Arguments must be 1-D tensors without a ``_base`` (``.detach()`` the views) so that dynamo guards on
    nothing but their sizes. The recompile limit is raised for these calls, and duck sizing (which would tie
    unrelated sizes and offsets that happen to be equal) is off.
    """

    RECOMPILE_LIMIT = 64
    BATCHED_NUMEL = 2**16

    def __init__(self, compile: bool) -> None:
        self.compiled = compile
        self.each: Optional[Callable[..., None]] = None
        self.batched: Optional[Callable[[list[tuple[Any, ...]]], None]] = None
        if compile:  # only then: torch.compile itself refuses some platforms, where the eager path must still run
            self.each = torch.compile(factorised_step_, dynamic=True, fullgraph=True)
            self.batched = torch.compile(factorised_steps_, dynamic=False, fullgraph=True)

    def run(self, calls: list[tuple[Any, ...]]) -> None:
        """Apply the step to each argument tuple (the gradient first)."""
        if not self.compiled or self.each is None or self.batched is None:
            factorised_steps_(calls)
            return
        small = [args for args in calls if args[0].numel() < self.BATCHED_NUMEL]
        large = [args for args in calls if args[0].numel() >= self.BATCHED_NUMEL]
        done = 0
        try:
            with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT), \
                    torch.fx.experimental._config.patch(use_duck_shape=False):
                if small:
                    self.batched(small)
                done = len(small)
                for args in large:
                    self.each(*args)
                    done += 1
        except Exception as error:  # noqa: BLE001 - compiler failures only; input errors re-raise below
            if not _is_compiler_failure(error):
                raise
            warnings.warn(f"torch.compile of the PILoT step failed ({type(error).__name__}: {error}); "
                          "using the eager torch path, which is correct but several times slower", RuntimeWarning)
            self.compiled = False
            factorised_steps_((small + large)[done:])


def _is_compiler_failure(error: Exception) -> bool:
    """Errors of dynamo/inductor (no C++ compiler, unsupported platform), not errors in the inputs."""
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor")) or isinstance(error, (OSError, ImportError))


class TorchStep:
    """One bucket's step on the torch path. Factorised tensors: :class:`FactorisedStep` (shared by the optimizer's
    buckets). Plain tensors: torch's fused SGD kernel, one call per (group, first momentum step). Not capturable:
    GradScaler's found_inf is read on the host."""

    bumps_versions = True

    def __init__(self, device: torch.device, factorised_step: FactorisedStep) -> None:
        self.device, self.factorised_step = device, factorised_step
        self.first_flags = (torch.tensor(False, device=device), torch.tensor(True, device=device))

    @staticmethod
    def slots_of(numel: int) -> int:
        """One telemetry / momentum_started slot per tensor."""
        return 1

    def step(self, bucket: Bucket, work: Work, args: StepArgs) -> bool:
        """Step ``work.items``; False if GradScaler's found_inf skipped the step."""
        if args.found_inf is not None and bool(args.found_inf.item()):
            return False
        device = self.device
        scale = None if args.grad_scale is None else args.grad_scale.to(device)
        group_scalars: dict[int, tuple[Tensor, ...]] = {}
        factorised_calls = []
        plain_batches: dict[tuple[int, bool], list[tuple[Entry, Tensor]]] = {}
        for e, grad in work.items:
            has_momentum = args.flags[e.group] & _FLAG_MOMENTUM != 0
            first = has_momentum and args.states[e.param][e.buffer_keys[0]] is None
            if first:
                bucket.started[e.slot] = 1
            g = flat(grad).detach()
            if not e.factorised:
                plain_batches.setdefault((e.group, first), []).append((e, g))
                continue
            if e.group not in group_scalars:
                group, hyper = args.groups[e.group], args.hypers[e.group]
                group_scalars[e.group] = (
                    *(torch.tensor(float(v), dtype=torch.float32, device=device)
                      for v in (group["lr"], group["alpha"], hyper.momentum, hyper.one_minus_dampening)),
                    torch.tensor(-1.0 if group["maximize"] else 1.0, device=device),
                    torch.tensor(bool(group["nesterov"]), device=device))
            lr, alpha, momentum, one_minus_dampening, sign, nesterov = group_scalars[e.group]
            views = e.views
            buffer, buffer_w = (views.buffer, views.buffer_w) if has_momentum else (None, None)
            factorised_calls.append((g, views.x, views.m, views.w, buffer, buffer_w, views.l1, views.nnz, lr, alpha,
                                     momentum, one_minus_dampening, sign, self.first_flags[first], nesterov, scale))
        self.factorised_step.run(factorised_calls)
        for (group_index, first), items in plain_batches.items():
            group, numbers = args.groups[group_index], args.numbers[group_index]
            params = [e.views.x for e, _ in items]
            grads = [g for _, g in items]
            if bucket.dtype != torch.float32:  # torch's kernel wants buffers in the parameters' dtype: work in fp32
                params, grads = [x.float() for x in params], [g.float() for g in grads]
            buffers = [e.views.buffer for e, _ in items] if numbers.momentum != 0 else []
            torch._fused_sgd_(params, grads, buffers, weight_decay=numbers.weight_decay, momentum=numbers.momentum,
                              lr=float(group["lr"]), dampening=numbers.dampening, nesterov=group["nesterov"],
                              maximize=group["maximize"], is_first_step=first, grad_scale=scale)
            if bucket.dtype != torch.float32:
                for (e, g), updated, unscaled in zip(items, params, grads):
                    e.views.x.copy_(updated)
                    if scale is not None:  # torch's kernel unscaled the fp32 copy of the gradient
                        g.copy_(unscaled)
            else:  # torch's fused kernel does not bump the versions of what it writes: autograd must see it
                torch.autograd.graph.increment_version(params + (grads if scale is not None else []))
        return True
