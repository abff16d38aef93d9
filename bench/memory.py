"""Peak memory of a training step: what the allocator holds for one contender, not the process RSS.

Both devices measure the same thing: the peak, during one training step after warm-up, of the bytes allocated
since just before the contender was built (model copy, gradients, optimizer state, activations; the shared
input batch existed before and is not counted).

* CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before building.
* CPU: the profiler's allocation events (``profile_memory=True``), one per allocation or free of the CPU
  allocator, summed in time order from just before building. The profiler only reports frees of blocks it saw
  allocated, so the session spans the contender's whole life up to the measured step; storages are counted
  once however many views they have, because the allocator knows nothing of views. A TorchDispatchMode
  cannot be used here: torch.compile (FusedPILoTSGD's CPU path) refuses to run under one.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MEASURED_STEP = "bench::measured_step"


def peak_step_memory(build: Callable[[], Callable[[], None]], device: torch.device, *, warmup: int = 1) -> int:
    """Peak bytes held during one call of the step ``build()`` returns, counted from before ``build`` ran.

    ``build`` creates the contender and returns its training step; the step is called ``warmup`` times first
    (the first step creates the optimizer state), then once more under measurement.
    """
    if device.type == "cuda":
        return _peak_cuda(build, device, warmup)
    return _peak_cpu(build, warmup)


def _peak_cuda(build: Callable[[], Callable[[], None]], device: torch.device, warmup: int) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    step = build()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _peak_cpu(build: Callable[[], Callable[[], None]], warmup: int) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
        step = build()
        for _ in range(warmup):
            step()
        with record_function(MEASURED_STEP):
            step()
    events = session.profiler.kineto_results.events()
    window = next((e.start_ns(), e.end_ns()) for e in events if e.name() == MEASURED_STEP)
    allocations = sorted(((e.start_ns(), e.nbytes()) for e in events
                          if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                         key=lambda event: event[0])
    held = peak = 0
    for start_ns, nbytes in allocations:
        if start_ns >= window[1]:
            break
        held += nbytes
        if start_ns >= window[0]:
            peak = max(peak, held)
        else:
            peak = held  # what the step starts with
    return peak
