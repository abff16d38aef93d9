"""Parts 3 to 5 of ``python -m bench.gpu``, the measurements: the kernel's achieved bandwidth, the training step's
overhead over dense training, and the host side of a step (host time, launches per step).

Timing is :func:`bench.timing.time_interleaved`'s: warm-up, then interleaved samples, on CUDA one call per sample
after an L2 flush timed with CUDA events. Bytes are counted, not measured: FusedPILoTSGD moves 40 B per fp32
factorised element and 20 per plain one (read g, m, w, b_m, b_w; write m, w, b_m, b_w, x; as the interpreter counts
them, ``python -m bench`` section 3), torch's fused SGD 20 per element (read x, g, b; write x, b), a copy twice its
size.
"""
from __future__ import annotations

import collections
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from pilot import FusedPILoTSGD

from .contenders import BASELINE, Hyper, build_contender
from .gpu_checks import make_model
from .quiet import kineto_log_captured
from .timing import Stats, paired_ratios, time_interleaved

HYPER = Hyper()
GRAD_SCALE = 1e-4  # random gradients of a realistic size (bench.contenders.GRAD_SCALE)
FACTORISED_BYTES, PLAIN_BYTES, SGD_BYTES = 40, 20, 20  # per fp32 element of a step with momentum
SYNTHETIC_SHAPE = (4096, 4096)  # the synthetic set's tensors (the last one has fewer rows)
# Bytes of device memory per element that part 3 holds for the synthetic set: pilot's x, m, w, b_m, b_w, the shared
# gradient, fused SGD's x and buffer (32), plus construction's transient factors and temporaries.
SYNTHETIC_BYTES_PER_ELEMENT = 48
COPY_ELEMENTS = 2**28  # the copy ceiling's size at most (1 GiB each way): large enough to stream at full speed
OVERHEAD_CONTENDERS = ("dense-fused", "pilot", "reference-foreach")


# ------------------------------------------------------------------------------------------ 3. bandwidth


@dataclass(frozen=True)
class ParameterSet:
    name: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def elements(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def model_set(name: str) -> ParameterSet:
    """The parameter shapes of a model (``make_model``'s names)."""
    return ParameterSet(name, tuple(tuple(p.shape) for p in make_model(name, 224).parameters()))


def synthetic_set(elements: int) -> ParameterSet:
    """About ``elements`` elements in SYNTHETIC_SHAPE matrices, and one plain 1-D tensor."""
    rows, columns = SYNTHETIC_SHAPE
    full, rest = divmod(max(elements - columns, columns), rows * columns)
    shapes = [SYNTHETIC_SHAPE] * full + ([(rest // columns, columns)] if rest >= columns else []) + [(columns,)]
    return ParameterSet(f"synthetic {sum(math.prod(s) for s in shapes):.3g}", tuple(shapes))


def synthetic_elements(target: int, device: torch.device) -> int:
    """``target``, or fewer where the device's free memory would not hold the set (60% of it, to leave room)."""
    if device.type != "cuda":
        return target
    free, _ = torch.cuda.mem_get_info(device)
    return min(target, int(0.6 * free / SYNTHETIC_BYTES_PER_ELEMENT))


def _random_like(shape: tuple[int, ...], device: torch.device, seed: int) -> Tensor:
    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(shape, device=device, generator=generator) * GRAD_SCALE


def bandwidth(parameter_set: ParameterSet, device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """Bytes per second of pilot's step, torch's fused SGD on tensors of the same shapes (the same gradients), and a
    device-to-device copy; each as a fraction of the copy's (the ceiling measured here)."""
    params = [nn.Parameter(_random_like(shape, device, seed) / GRAD_SCALE * 0.05)
              for seed, shape in enumerate(parameter_set.shapes)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]  # SGD writes x too: pilot would re-factorise it
    for seed, (p, q) in enumerate(zip(params, twins)):
        p.grad = q.grad = _random_like(p.shape, device, 1000 + seed)
    pilot = FusedPILoTSGD(params, lr=HYPER.lr, momentum=HYPER.momentum, weight_decay=HYPER.weight_decay,
                          alpha=HYPER.alpha, beta=HYPER.beta)
    sgd = torch.optim.SGD(twins, lr=HYPER.lr, momentum=HYPER.momentum, weight_decay=HYPER.weight_decay, fused=True)
    factorised = sum(p.numel() for p in params if p.ndim >= 2)
    plain = parameter_set.elements - factorised
    moved = {"pilot": FACTORISED_BYTES * factorised + PLAIN_BYTES * plain, "fused SGD": SGD_BYTES * (factorised + plain)}
    source = torch.empty(min(COPY_ELEMENTS, max(moved["pilot"] // 8, 1)), device=device)
    target = torch.empty_like(source)
    moved["copy"] = 2 * source.numel() * source.element_size()
    timings = time_interleaved({"pilot": pilot.step, "fused SGD": sgd.step, "copy": lambda: target.copy_(source)},
                               device, repeats=repeats, warmup=warmup, min_sample_seconds=0.0)
    rates = {name: [moved[name] / seconds for seconds in timing.device] for name, timing in timings.items()}
    record: dict[str, Any] = {"set": parameter_set.name, "elements": parameter_set.elements, "factorised": factorised,
                              "plain": plain}
    for name, timing in timings.items():
        record[name] = {"bytes": moved[name], "time": Stats.of([t * 1e3 for t in timing.device], "ms"),
                        "bandwidth": Stats.of([r / 1e9 for r in rates[name]], "GB/s"),
                        "fraction_of_copy": Stats.of(paired_ratios(rates[name], rates["copy"]), "x")}
    return record


# ------------------------------------------------------------------------------------------ 4. overhead


def overhead(model: str, batch_size: int, image_size: int, device: torch.device, repeats: int,
             warmup: int) -> dict[str, Any]:
    """Training step (zero_grad, forward and loss under bf16 autocast, backward, step) of a channels_last model:
    pilot, torch's fused SGD and the eager reference (torch.optim.SGD on the factors), interleaved; time ratios to
    fused SGD paired within a round."""
    torch.manual_seed(0)
    template = make_model(model, image_size).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(
        device, memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    steps = {}
    for name in OVERHEAD_CONTENDERS:
        contender = build_contender(name, template, HYPER, device, pilot_backend_name="triton")
        steps[name] = _autocast_step(contender.model, contender.optimizer, x, y)
    with cudnn_benchmark():  # as training runs: cuDNN picks its fastest algorithms, the same for every contender
        timings = time_interleaved(steps, device, repeats=repeats, warmup=warmup, min_sample_seconds=0.0)
    baseline = timings[BASELINE].device
    return {"model": model, "batch_size": batch_size, "image_size": image_size, "autocast": "bfloat16",
            "memory_format": "channels_last",
            "contenders": {name: {"time": Stats.of([t * 1e3 for t in timing.device], "ms"),
                                  "host_time": Stats.of([t * 1e3 for t in timing.host], "ms"),
                                  f"ratio_to_{BASELINE}": Stats.of(paired_ratios(timing.device, baseline), "x")}
                           for name, timing in timings.items()}}


@contextmanager
def cudnn_benchmark() -> Iterator[None]:
    saved, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _autocast_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


# ------------------------------------------------------------------------------------------ 5. host side


def _variants(params: list[nn.Parameter], device: torch.device) -> dict[str, Callable[[], Callable[[], None]]]:
    """Builders of one steady step each: pilot plain, under a per-step schedule (lr by LambdaLR and alpha edited at
    every step; with capturable=True in place, as in a captured graph), with GradScaler's tensors, and torch's fused
    SGD under the same LambdaLR."""
    options = dict(lr=HYPER.lr, momentum=HYPER.momentum, weight_decay=HYPER.weight_decay)

    def pilot(capturable: bool = False, scheduled: bool = False, scaled: bool = False) -> Callable[[], None]:
        optimizer = FusedPILoTSGD(_copies(params), alpha=HYPER.alpha, beta=HYPER.beta, capturable=capturable,
                                  **options)
        if scaled:  # as torch.amp.GradScaler.step hands them to an optimizer that unscales itself
            optimizer.grad_scale = torch.ones(1, device=device)
            optimizer.found_inf = torch.zeros(1, device=device)
        return _stepper(optimizer, scheduled)

    return {"pilot": pilot, "pilot, per-step lr and alpha": lambda: pilot(scheduled=True),
            "pilot, capturable, per-step lr and alpha": lambda: pilot(capturable=True, scheduled=True),
            "pilot, GradScaler": lambda: pilot(scaled=True),
            "fused SGD, per-step lr": lambda: _stepper(torch.optim.SGD(_copies(params), fused=True, **options), True)}


def _copies(params: list[nn.Parameter]) -> list[nn.Parameter]:
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(copies, params):
        p.grad = q.grad
    return copies


def _stepper(optimizer: torch.optim.Optimizer, scheduled: bool) -> Callable[[], None]:
    if not scheduled:
        return optimizer.step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.999 ** step)
    group = optimizer.param_groups[0]

    def step() -> None:
        optimizer.step()
        scheduler.step()
        if "alpha" in group:
            alpha = group["alpha"]
            if isinstance(alpha, Tensor):
                alpha.mul_(0.999)
            else:
                group["alpha"] = alpha * 0.999

    return step


def host_side(model: str, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Per variant (see ``_variants``): host time of a steady step (the host clock around the step, the device
    idle before it) and what the device ran per step as the profiler counted it: kernels and copies, by name."""
    torch.manual_seed(0)
    params = [nn.Parameter(p.detach().to(device)) for p in make_model(model, 224).parameters()]
    for seed, p in enumerate(params):
        p.grad = _random_like(p.shape, device, seed)
    records = {}
    for name, build in _variants(params, device).items():
        step = build()
        for _ in range(warmup):  # tables, buffers, warm caches
            step()
        host = []
        for _ in range(steps):
            _synchronize(device)
            started = time.perf_counter()
            step()
            host.append(time.perf_counter() - started)
        records[name] = {"host_time": Stats.of([t * 1e6 for t in host], "us"), **device_work(step, device, steps)}
        del step
    return {"model": model, "parameters": sum(p.numel() for p in params), "variants": records}


def device_work(step: Callable[[], None], device: torch.device, steps: int) -> dict[str, Any]:
    """Kernels and memory copies / sets the device ran per call of ``step``, as the profiler saw them (none on a
    CPU: only CUDA activity is counted)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with kineto_log_captured(), profile(activities=activities) as session:
        for _ in range(steps):
            step()
        _synchronize(device)
    names = collections.Counter(  # GPU-side user annotations (torch.optim's record_function ranges) are not work
        event.name for event in session.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False))
    copies = sum(count for name, count in names.items() if name.startswith(("Memcpy", "Memset")))
    return {"launches_per_step": Stats.exact((sum(names.values()) - copies) / steps, "count"),
            "copies_per_step": Stats.exact(copies / steps, "count"),
            "by_name": {name: count / steps for name, count in names.most_common()}}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

