"""Triton kernels of pilot and their launchers (no knowledge of nn or optim)."""
from triton.runtime.interpreter import InterpretedFunction

from .pilot_sgd import (SEGMENT_ALIGN, HyperRow, TensorRow, build_block_table, launch_pilot_sgd, padded,
                        pilot_sgd_kernel, telemetry_slots)

# TRITON_INTERPRET=1 is read when @triton.jit decorates: then the kernels run on CPU tensors through the
# interpreter, which is how tests exercise them without a GPU.
KERNELS_INTERPRETED: bool = isinstance(pilot_sgd_kernel, InterpretedFunction)

__all__ = ["KERNELS_INTERPRETED", "HyperRow", "SEGMENT_ALIGN", "TensorRow", "build_block_table", "launch_pilot_sgd",
           "padded", "pilot_sgd_kernel", "telemetry_slots"]
