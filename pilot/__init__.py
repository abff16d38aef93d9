"""pilot: Triton-fused PILoT sparse training (x = m * w with a dynamic weight decay on the factors)."""
from .factorization import factorize
from .optim import FusedPILoTSGD

__all__ = ["FusedPILoTSGD", "factorize"]
__version__ = "0.1.0"
