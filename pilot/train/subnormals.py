"""Subnormal floats on the CPU: why ``python -m pilot.train`` flushes them to zero, and how a run records it.

The factors m and w of a weight that PILoT or spred drives to zero decay geometrically, so late in training a few
weights x = m * w fall below float32's smallest normal number (1.2e-38). x86 CPUs compute on such subnormal values
one to two orders of magnitude slower (a microcode assist per operation), and every convolution multiplies each of
them with every input position. Measured on ResNet-20 after 21 of 30 epochs of F-pilot-a1.3e-3-s0
(docs/study/2026-11-fixed-strength.md): 177 subnormal weights of 270k (0.07%) made a forward and backward of 128 images take 0.96-1.3 s
against 0.55 s with them flushed (one thread), and the run's epochs grew from 71 s to 143 s. A weight below 1e-38
is zero for every purpose the model has, so flushing changes no result that matters; CUDA kernels are unaffected.
"""
from __future__ import annotations

import torch

__all__ = ["flush_subnormals", "subnormals_flushed"]


def flush_subnormals() -> bool:
    """Make this process treat subnormal float inputs and results as zero on the CPU (torch.set_flush_denormal);
    returns whether the CPU supports it.

    Call it before any tensor work: the setting lives in each thread's floating-point state, and only threads
    created afterwards (the intra-op pool is created at the first parallel operation) inherit it.
    """
    return torch.set_flush_denormal(True)


def subnormals_flushed() -> bool:
    """Whether every intra-op thread flushes subnormals now: the smallest subnormal multiplied by 1, over a tensor
    large enough to be split across all threads, comes out as exact zeros. (The probe is made and read as integer
    bits: a float fill or comparison would itself be flushed.)"""
    smallest_subnormal = torch.ones(((1 << 16) * torch.get_num_threads(),), dtype=torch.int32).view(torch.float32)
    return not bool((smallest_subnormal * 1.0).view(torch.int32).count_nonzero())
