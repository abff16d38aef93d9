"""The factorised step written with torch ops: FusedPILoTSGD's path where the Triton kernel does not run.

The math is the kernel's (``pilot_kernels.pilot_sgd``), one tensor per call, on 1-D views in memory order.
Compiled with ``torch.compile`` (dynamic sizes; inductor fuses it into a single loop over memory that also
computes the telemetry), or run eagerly where compiling is not possible. Hyper-parameters and flags are 0-d
tensors so that changing lr or alpha between steps never re-compiles. (Plain parameters take torch's own
fused SGD kernel on this path, see ``FusedPILoTSGD``.)
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch._dynamo
import torch.fx.experimental._config
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


class FactorisedStep:
    """``factorised_step_``, compiled on first use; falls back to eager (with a warning) if compiling fails.

    Arguments must be 1-D tensors without a ``_base`` (``.detach()`` the views) so that dynamo guards on
    nothing but their sizes. Graphs differ by parameter dtype, momentum on/off and inductor's size class of
    the reduction (1, <= 4096, larger): a dozen or so, so the recompile limit is raised for these calls, and
    duck sizing (which would tie unrelated sizes and offsets that happen to be equal) is off.
    """

    RECOMPILE_LIMIT = 64

    def __init__(self, compile: bool) -> None:
        self.compiled = compile
        self.fn: Callable[..., None] = (torch.compile(factorised_step_, dynamic=True, fullgraph=True) if compile
                                        else factorised_step_)

    def run(self, calls: list[tuple[object, ...]]) -> None:
        """Apply the step to each argument tuple in order."""
        if not self.compiled:
            for args in calls:
                self.fn(*args)
            return
        done = 0
        try:
            with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT), \
                    torch.fx.experimental._config.patch(use_duck_shape=False):
                for args in calls:
                    self.fn(*args)
                    done += 1
        except Exception as error:  # noqa: BLE001 - compiler failures only; input errors re-raise below
            if not _is_compiler_failure(error):
                raise
            warnings.warn(f"torch.compile of the PILoT step failed ({type(error).__name__}: {error}); "
                          "using the eager torch path, which is correct but several times slower", RuntimeWarning)
            self.compiled, self.fn = False, factorised_step_
            self.run(calls[done:])


def _is_compiler_failure(error: Exception) -> bool:
    """Errors of dynamo/inductor (no C++ compiler, unsupported platform), not errors in the inputs."""
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor")) or isinstance(error, (OSError, ImportError))
