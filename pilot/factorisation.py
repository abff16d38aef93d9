"""PILoT's factorisation x = m * w (``docs/math.md``): which parameters it applies to, the initial factors, and the
optimizer state keys that hold the factors.

The one place for these definitions: the optimizer, pruning, the schedules, the baselines, the reference and the
benchmarks import them from here.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# optimizer.state[p] of FusedPILoTSGD: a factorised parameter's factors and buffers, or a plain one's buffer
FACTOR_KEYS = ("m", "w", "momentum_buffer_m", "momentum_buffer_w")
PLAIN_KEYS = ("momentum_buffer",)
BUFFER_KEYS = {True: FACTOR_KEYS[2:], False: PLAIN_KEYS}  # by "factorised"
MOMENTUM_STARTED = "momentum_started"  # state dict only: whether the (always present) buffers hold a value


def is_prunable(p: Tensor) -> bool:
    """Conv and linear weights (``ndim >= 2``): what FusedPILoTSGD factorises by default (``reparam=None``), what
    pruning and the baselines sparsify. For an FSDP2 DTensor, the global ``ndim``."""
    return p.ndim >= 2


def is_factorised(optimizer: torch.optim.Optimizer, p: Tensor) -> bool:
    """Whether ``optimizer`` (any torch optimizer) keeps p factorised as m * w: FusedPILoTSGD's state has m."""
    return FACTOR_KEYS[0] in optimizer.state.get(p, ())


def is_factorised_state(state: dict[str, Any]) -> bool:
    """The same question asked of one parameter's state (``optimizer.state[p]`` or a state dict's entry)."""
    return FACTOR_KEYS[0] in state


def check_beta(beta: float) -> None:
    """Raise ValueError unless beta is a finite number >= 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"Invalid beta value: {beta!r} (need a finite number >= 0)")


def factorise(x: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    r"""The fp32 factors (m0, w0) of x with m0 * w0 = x and m0^2 - w0^2 = beta, elementwise.

    .. math::
        m_0 = \sqrt{(\beta + \sqrt{\beta^2 + 4x^2}) / 2}, \qquad w_0 = x / m_0

    written as ``beta/2 + hypot(beta/2, x)`` so that no intermediate overflows. ``beta = 0`` is spred's
    init, m0 = sqrt(|x|), w0 = sign(x) * sqrt(|x|) (and m0 = w0 = 0 where x = 0). The result keeps x's
    memory layout; products are fp32, so ``m0 * w0`` equals x up to fp32 rounding.
    """
    check_beta(beta)
    if not x.is_floating_point():
        raise TypeError(f"factorise needs a floating-point tensor, got {x.dtype}")
    x32 = x.detach().float()
    m0, w0 = torch.empty_like(x32), torch.empty_like(x32)
    factorise_into(x32, m0, w0, beta)
    return m0, w0


def factorise_into(x32: Tensor, m: Tensor, w: Tensor, beta: float) -> None:
    """:func:`factorise` of the fp32 tensor ``x32`` written into ``m`` and ``w`` (fp32, shaped like x32; e.g. views
    into FusedPILoTSGD's flat storage), with a byte mask as the only temporary.

    Every element goes through the same operations as it always did (hypot, add, sqrt, divide, zero where m0 is
    not > 0), each written in place, so the factors are bit for bit those of the out-of-place formula."""
    half_beta = beta / 2
    torch.hypot(m.fill_(half_beta), x32, out=m)  # hypot(beta/2, x), beta/2 filled in as full_like would
    m.add_(half_beta).sqrt_()
    torch.div(x32, m, out=w)
    not_positive = m > 0
    w.masked_fill_(not_positive.logical_not_(), 0.0)  # w0 = 0 where m0 = 0 (x = 0 with beta = 0) or m0 is nan
