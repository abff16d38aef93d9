"""pilot: Triton-fused PILoT sparse training (x = m * w with a dynamic weight decay on the factors)."""
from .factorization import factorize
from .optim import FusedPILoTSGD
from .schedule import (AlphaScheduler, ConstantAlpha, GeometricAlpha, HarmonicAlpha, PILoTSchedule, QuadraticAlpha,
                       alpha_schedule)

__all__ = [
    "FusedPILoTSGD", "factorize",
    "PILoTSchedule", "AlphaScheduler", "ConstantAlpha", "HarmonicAlpha", "QuadraticAlpha", "GeometricAlpha",
    "alpha_schedule",
]
__version__ = "0.1.0"
