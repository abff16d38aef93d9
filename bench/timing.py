"""Timing of step functions: warm-up, then interleaved repeats, summarised as min / median / max.

The machine is shared and noisy, so contenders are never timed one after the other: every round times each
of them once, in an order rotated from round to round, and ratios are taken within a round (paired), so that a
burst of load hits both sides of a ratio. On CPU a sample is the mean wall time of back-to-back calls lasting at
least ``min_sample_seconds``. On CUDA a sample is one call after an L2 flush, timed with
CUDA events (device time) and with the host clock around the call (launch cost: optimizer steps are often
launch-bound), as ``triton.testing.do_bench`` does.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2, as triton.testing.do_bench uses


@dataclass(frozen=True)
class Stats:
    """min / median / max of a figure's samples, in ``unit``."""

    min: float
    median: float
    max: float
    unit: str
    samples: int

    @classmethod
    def of(cls, values: Sequence[float], unit: str) -> "Stats":
        if not values:
            raise ValueError("no samples")
        return cls(min(values), statistics.median(values), max(values), unit, len(values))

    @classmethod
    def exact(cls, value: float, unit: str) -> "Stats":
        """A counted (not measured) figure: one value."""
        return cls(value, value, value, unit, 1)

    def to_dict(self) -> dict[str, float | str | int]:
        return {"min": self.min, "median": self.median, "max": self.max, "unit": self.unit, "samples": self.samples}


@dataclass
class Timing:
    """Seconds per call of one contender's step."""

    first_call: float  # wall time of the very first call: torch.compile, allocation of optimizer state
    device: list[float]  # per sample: wall time on CPU, CUDA-event time on CUDA
    host: list[float]  # per sample: host wall time of the call (on CPU the same as ``device``)


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Sample-by-sample ratios of two contenders timed in the same rounds."""
    return [n / d for n, d in zip(numerator, denominator)]


def time_interleaved(steps: dict[str, Callable[[], None]], device: torch.device, *, repeats: int,
                     warmup: int = 3, min_sample_seconds: float = 0.02) -> dict[str, Timing]:
    """Time every step function ``repeats`` times, interleaved, after ``warmup`` calls each.

    The first warm-up call of each step is timed on its own (``Timing.first_call``).
    """
    if repeats < 1 or warmup < 1:
        raise ValueError("repeats and warmup must be >= 1")
    first_calls = {name: _wall_time(step, device) for name, step in steps.items()}
    for step in steps.values():
        for _ in range(warmup - 1):
            step()
    timer = _CudaTimer(device) if device.type == "cuda" else _CpuTimer(min_sample_seconds)
    names = list(steps)
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    gc.collect()
    gc.disable()  # a collection inside a sample would be charged to whichever contender triggered it
    try:
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                device_seconds, host_seconds = timer.sample(name, steps[name])
                samples[name][0].append(device_seconds)
                samples[name][1].append(host_seconds)
    finally:
        gc.enable()
    return {name: Timing(first_calls[name], *samples[name]) for name in names}


def _wall_time(step: Callable[[], None], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CpuTimer:
    """Back-to-back calls until a sample lasts ``min_sample_seconds`` (at least one call).

    Bounded by time rather than by a call count, so that a burst of load from another process (which stalls
    every multi-threaded op) lengthens one sample instead of multiplying a fixed number of slow calls.
    """

    def __init__(self, min_sample_seconds: float) -> None:
        self.min_sample_seconds = min_sample_seconds

    def sample(self, name: str, step: Callable[[], None]) -> tuple[float, float]:
        calls = 0
        start = now = time.perf_counter()
        while calls == 0 or now - start < self.min_sample_seconds:
            step()
            calls += 1
            now = time.perf_counter()
        seconds = (now - start) / calls
        return seconds, seconds


class _CudaTimer:
    """One call per sample after flushing L2; device time from CUDA events, host time from the host clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def sample(self, name: str, step: Callable[[], None]) -> tuple[float, float]:
        self.flush.zero_()
        self.start.record()
        host_start = time.perf_counter()
        step()
        host_seconds = time.perf_counter() - host_start
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3, host_seconds
