"""Peak memory of a training step: what the allocator holds for one contender, not the process RSS.

Both devices measure the same thing: the peak, during one training step after warm-up, of the bytes allocated
since just before the contender was built (model copy, gradients, optimizer state, activations; the shared
input batch existed before and is not counted).

* CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before building.
* CPU: the profiler's allocation events (``profile_memory=True``): every allocation and free of the CPU
  allocator with its address, summed in time order over a session that spans the contender's whole life up to
  the measured step. Frees of blocks allocated before the session (anything not the contender's) are ignored.
  Storages count once however many views they have, because the allocator knows nothing of views. A
  TorchDispatchMode cannot be used here: torch.compile (FusedPILoTSGD's CPU path) refuses to run under one.
  The profiler's native log lines are kept off stderr (:func:`bench.quiet.kineto_log_captured`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch._C._profiler import _ExtraFields_Allocation
from torch.profiler import ProfilerActivity, profile, record_function

from .quiet import kineto_log_captured

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
    with kineto_log_captured():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as session:
            step = build()
            for _ in range(warmup):
                step()
            with record_function(MEASURED_STEP):
                step()
        nodes = list(session.profiler.kineto_results.experimental_event_tree())
    window = None
    allocations = []  # (time, address, signed bytes)
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        fields = node.extra_fields
        if node.name == MEASURED_STEP:
            window = (node.start_time_ns, node.end_time_ns)
        elif isinstance(fields, _ExtraFields_Allocation) and fields.device.type == "cpu":
            allocations.append((node.start_time_ns, fields.ptr, fields.alloc_size))
    assert window is not None, "the measured step left no profiler event"
    sizes: dict[int, int] = {}  # live blocks allocated in the session, by address
    held = peak = 0
    for start_ns, address, nbytes in sorted(allocations, key=lambda event: event[0]):
        if start_ns >= window[1]:
            break
        if nbytes > 0:
            sizes[address] = nbytes
            held += nbytes
        else:
            held -= sizes.pop(address, 0)  # a block from before the session: not the contender's
        peak = max(peak, held) if start_ns >= window[0] else held
    return peak
