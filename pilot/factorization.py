"""PILoT's factorisation x = m * w: the initial factors of a dense tensor."""
from __future__ import annotations

import math

import torch


def check_beta(beta: float) -> None:
    """Raise ValueError unless beta is a finite number >= 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"Invalid beta value: {beta!r} (need a finite number >= 0)")


def factorize(x: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The fp32 factors (m0, w0) of x with m0 * w0 = x and m0^2 - w0^2 = beta, elementwise.

    .. math::
        m_0 = \sqrt{(\beta + \sqrt{\beta^2 + 4x^2}) / 2}, \qquad w_0 = x / m_0

    written as ``beta/2 + hypot(beta/2, x)`` so that no intermediate overflows. ``beta = 0`` is spred's
    init, m0 = sqrt(|x|), w0 = sign(x) * sqrt(|x|) (and m0 = w0 = 0 where x = 0). The result keeps x's
    memory layout; products are fp32, so ``m0 * w0`` equals x up to fp32 rounding.
    """
    check_beta(beta)
    if not x.is_floating_point():
        raise TypeError(f"factorize needs a floating-point tensor, got {x.dtype}")
    x32 = x.detach().float()
    half_beta = beta / 2
    m0 = torch.sqrt(half_beta + torch.hypot(torch.full_like(x32, half_beta), x32))
    w0 = torch.where(m0 > 0, x32 / m0, torch.zeros_like(x32))
    return m0, w0
