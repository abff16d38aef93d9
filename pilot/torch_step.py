"""The fused step written with torch ops: FusedPILoTSGD's path where the Triton kernel does not run.

The math is the kernel's (``pilot_kernels.pilot_sgd``), one tensor per call, on 1-D views in memory order.
Compiled with ``torch.compile`` (one graph with dynamic sizes; inductor fuses it into a single loop over
memory, telemetry included), or run eagerly where compiling is not possible. Hyper-parameters and flags are
0-d tensors so that changing lr or alpha between steps never re-compiles.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor


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
    """One PILoT-SGD step of x = m * w in place; writes sum |x| and count(x != 0) to l1_out, nnz_out."""
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
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


def plain_step_(grad: Tensor, x: Tensor, buf: Optional[Tensor], lr: Tensor, weight_decay: Tensor, momentum: Tensor,
                one_minus_dampening: Tensor, sign: Tensor, first: Tensor, nesterov: Tensor,
                grad_scale: Optional[Tensor]) -> None:
    """torch.optim.SGD's step of a plain tensor in place (fp32 math, fp32 momentum buffer)."""
    g = grad.float()
    if grad_scale is not None:
        g = g / grad_scale
    g = g * sign
    old_x = x.float()
    d = g + weight_decay * old_x
    if buf is not None:
        d = _momentum_direction_(d, buf, momentum, one_minus_dampening, first, nesterov)
    x.copy_((old_x - lr * d).to(x.dtype))


class StepFunctions:
    """The two step functions, compiled on first use; falls back to eager (with a warning) if compiling fails."""

    def __init__(self, compile: bool) -> None:
        self.compiled = compile
        if compile:
            self.factorised: Callable[..., None] = torch.compile(factorised_step_, dynamic=True, fullgraph=True)
            self.plain: Callable[..., None] = torch.compile(plain_step_, dynamic=True, fullgraph=True)
        else:
            self.factorised, self.plain = factorised_step_, plain_step_

    def run(self, name: str, *args: object) -> None:
        fn = getattr(self, name)
        if not self.compiled:
            fn(*args)
            return
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure; a real input error re-raises below
            if not _is_compiler_failure(error):
                raise
            warnings.warn(f"torch.compile of the PILoT step failed ({type(error).__name__}: {error}); "
                          "using the eager torch path, which is correct but several times slower", RuntimeWarning)
            self.compiled = False
            self.factorised, self.plain = factorised_step_, plain_step_
            getattr(self, name)(*args)


def _is_compiler_failure(error: Exception) -> bool:
    """Errors of dynamo/inductor (no C++ compiler, unsupported platform), not errors in the inputs."""
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor")) or isinstance(error, (OSError, ImportError))
