"""The four measurements of ``python -m bench``, each returning JSON-ready records.

1. :func:`optimizer_step`: the optimizer step alone on random gradients.
2. :func:`training_step`: forward, backward and step, with the peak memory of a step.
3. :func:`traffic`: bytes moved and launches per optimizer step, counted.
4. :func:`compiled_kernel`: registers, spills, occupancy and access widths of the fused kernel for sm_80 / sm_90a,
   and the bandwidth its resident programs can sustain on an A100 / H100 (a model).
"""
from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from pilot_kernels import aot, pilot_sgd

from .contenders import (BASELINE, CONTENDERS, REFERENCES, Hyper, ModelSpec, build_contender, build_contenders,
                         build_template, model_spec, parameter_count, reference_step_with_products, with_products)
from .memory import peak_step_memory
from .timing import Stats, Timing, paired_ratios, time_interleaved
from .traffic import (GPUS, KernelTraffic, Traffic, fused_kernel_traffic, little_law_bandwidth, memory_bound_seconds,
                      optimizer_step_traffic, reparametrisation_traffic)

MIB = 2**20


def ratio_key(contender: str) -> str:
    """The key of a record's ratio to ``contender``."""
    return f"ratio_to_{contender}"


MEMORY_RATIO_KEY = f"memory_ratio_to_{BASELINE}"


@dataclass(frozen=True)
class Settings:
    device: torch.device
    models: tuple[str, ...]
    batch_sizes: dict[str, int]
    repeats: int
    warmup: int
    traffic_models: tuple[str, ...]
    hyper: Hyper = field(default_factory=Hyper)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _timing_records(timings: dict[str, Timing], device: torch.device) -> dict[str, dict[str, Any]]:
    """Times in ms (and host times on CUDA), first-call time in s, paired ratios to the baseline (and, for pilot,
    to every other contender)."""
    records = {}
    for name, timing in timings.items():
        record = {"time": Stats.of([t * 1e3 for t in timing.device], "ms"),
                  "first_call": Stats.exact(timing.first_call, "s"),
                  ratio_key(BASELINE): Stats.of(paired_ratios(timing.device, timings[BASELINE].device), "x")}
        if name == "pilot":
            for other, other_timing in timings.items():
                if other not in (name, BASELINE):
                    record[ratio_key(other)] = Stats.of(paired_ratios(timing.device, other_timing.device), "x")
        if device.type == "cuda":
            record["host_time"] = Stats.of([t * 1e3 for t in timing.host], "ms")
        records[name] = record
    return records


def optimizer_step(settings: Settings) -> list[dict[str, Any]]:
    """Every contender's optimizer step on the parameter set of each model, with random gradients; each
    reference's also with its product work (:func:`bench.contenders.reference_step_with_products`)."""
    results = []
    for model in settings.models:
        progress(f"[1/4] optimizer step: {model}")
        contenders = build_contenders(model_spec(model), settings.hyper, settings.device)
        for contender in contenders.values():
            contender.fill_random_grads(seed=0)
        steps = {name: contender.optimizer.step for name, contender in contenders.items()}
        # Same model and optimizer as the reference's step alone: how fast a step runs does not depend on the values.
        steps.update({with_products(reference): reference_step_with_products(contenders[reference], seed=0)
                      for reference in REFERENCES})
        timings = time_interleaved(steps, settings.device, repeats=settings.repeats, warmup=settings.warmup)
        results.append({"model": model, "parameters": parameter_count(contenders[BASELINE].model),
                        "contenders": _timing_records(timings, settings.device)})
        del contenders, steps
        gc.collect()
    return results


def training_step(settings: Settings) -> list[dict[str, Any]]:
    """Every contender's training step (zero_grad, forward, backward, step), timed; then each one's peak memory."""
    results = []
    for model in settings.models:
        spec = model_spec(model)
        batch_size = settings.batch_sizes[model]
        batch = spec.batch(batch_size, settings.device)
        progress(f"[2/4] training step: {model}, batch {batch_size}, {spec.image_size}x{spec.image_size}")
        contenders = build_contenders(spec, settings.hyper, settings.device)
        steps = {name: contender.training_step(*batch) for name, contender in contenders.items()}
        timings = time_interleaved(steps, settings.device, repeats=settings.repeats, warmup=settings.warmup,
                                   min_sample_seconds=0.0)
        records = _timing_records(timings, settings.device)
        del contenders, steps
        gc.collect()

        progress(f"[2/4] peak memory: {model}")
        peaks = _peak_memories(spec, batch, settings)
        for name, record in records.items():
            record["peak_memory"] = Stats.exact(peaks[name] / MIB, "MiB")
            record[MEMORY_RATIO_KEY] = Stats.exact(peaks[name] / peaks[BASELINE], "x")
        results.append({"model": model, "batch_size": batch_size, "image_size": spec.image_size,
                        "contenders": records})
    return results


def _peak_memories(spec: ModelSpec, batch: tuple[torch.Tensor, torch.Tensor], settings: Settings) -> dict[str, int]:
    """Peak bytes of one training step per contender, each built and measured alone."""
    template = build_template(spec)  # the weights build_contenders started from
    peaks = {}
    for name in CONTENDERS:
        def build(name: str = name) -> Callable[[], None]:
            return build_contender(name, template, settings.hyper, settings.device).training_step(*batch)

        peaks[name] = peak_step_memory(build, settings.device)
        gc.collect()
    return peaks


def _traffic_record(traffic: Traffic, parameters: int, baseline: Traffic) -> dict[str, Any]:
    modelled = memory_bound_seconds(traffic.bytes)
    return {"bytes": Stats.exact(traffic.bytes, "B"),
            "bytes_per_parameter": Stats.exact(traffic.bytes / parameters, "B"),
            "ops": Stats.exact(traffic.ops, "count"),
            "launches": Stats.exact(traffic.launches, "count"),
            ratio_key(BASELINE): Stats.exact(traffic.bytes / baseline.bytes, "x"),
            **{f"model_time_{gpu}": Stats.exact(seconds * 1e6, "us") for gpu, seconds in modelled.items()}}


def _kernel_streams(count: KernelTraffic) -> dict[str, Any]:
    """The fused kernel's bytes per element of each kind of tensor, and every stream's bytes."""
    return {"factorised_bytes_per_element": Stats.exact(count.stream_bytes("factorised") / count.factorised_elements,
                                                        "B"),
            "plain_bytes_per_element": Stats.exact(count.stream_bytes("plain") / max(count.plain_elements, 1), "B"),
            "tables_and_telemetry_bytes_per_factorised_element":
                Stats.exact(count.stream_bytes("tables") / count.factorised_elements, "B"),
            "loads": {k: Stats.exact(v, "B") for k, v in sorted(count.loads.items())},
            "stores": {k: Stats.exact(v, "B") for k, v in sorted(count.stores.items())}}


def traffic(settings: Settings) -> list[dict[str, Any]]:
    """Counted bytes and launches per optimizer step; the fused kernel counted in Triton's interpreter."""
    progress(f"[3/4] traffic: fused kernel in Triton's interpreter on {', '.join(settings.traffic_models) or '-'}")
    kernel_counts = {count.model: count for count in fused_kernel_traffic(settings.traffic_models)}
    results = []
    for model in dict.fromkeys(settings.models + settings.traffic_models):
        progress(f"[3/4] traffic: torch paths on {model}")
        torch_paths = tuple(name for name in CONTENDERS if name != "pilot")
        contenders = build_contenders(model_spec(model), settings.hyper, torch.device("cpu"), torch_paths)
        parameters = parameter_count(contenders[BASELINE].model)
        counted = {name: optimizer_step_traffic(contender) for name, contender in contenders.items()}
        phases = {}
        for name in REFERENCES:
            phases[name] = {"optimizer step": counted[name], **reparametrisation_traffic(contenders[name])}
            counted[name] = sum(phases[name].values(), Traffic())
        if model in kernel_counts:
            counted["pilot"] = kernel_counts[model].traffic
        baseline = counted[BASELINE]
        records = {name: _traffic_record(t, parameters, baseline) for name, t in counted.items()}
        for name, parts in phases.items():
            records[name]["phases"] = {phase: _traffic_record(t, parameters, baseline) for phase, t in parts.items()}
            if "pilot" in counted:
                records[name][ratio_key("pilot")] = Stats.exact(counted[name].bytes / counted["pilot"].bytes, "x")
        entry = {"model": model, "parameters": parameters, "contenders": records}
        if model in kernel_counts:
            entry["pilot_kernel"] = _kernel_streams(kernel_counts[model])
        results.append(entry)
        del contenders
        gc.collect()
    return results


def compiled_kernel(dtypes: Sequence[torch.dtype] = (torch.float32,)) -> list[dict[str, Any]]:
    """pilot_kernels.aot's report for every architecture it targets (sm_80, sm_90a), and the model of the bandwidth
    its resident programs can sustain on the GPU of that architecture (A100, H100)."""
    progress("[4/4] compiled kernel: sm_80, sm_90a")
    gpus = {gpu.arch: (name, gpu) for name, gpu in GPUS.items()}
    reports = []
    for arch in aot.ARCHS:
        for dtype in dtypes:
            report = aot.report(arch, dtype)
            gpu_name, gpu = gpus[report.arch]
            in_flight = report.ctas_per_sm * report.load_bytes_in_flight_per_cta
            needed, fraction = little_law_bandwidth(in_flight, gpu)
            reports.append({"arch": report.arch, "x_dtype": report.x_dtype,
                            "registers": Stats.exact(report.registers, "count"),
                            "spill_bytes": Stats.exact(report.spill_store_bytes + report.spill_load_bytes, "B"),
                            "global_loads_by_bits": {str(k): v for k, v in sorted(report.loads_by_bits.items())},
                            "global_stores_by_bits": {str(k): v for k, v in sorted(report.stores_by_bits.items())},
                            "block_size": pilot_sgd.BLOCK_SIZE, "num_warps": pilot_sgd.NUM_WARPS,
                            "ctas_per_sm": Stats.exact(report.ctas_per_sm, "count"),
                            "model_gpu": gpu_name,
                            "model_bytes_in_flight_per_sm": Stats.exact(in_flight, "B"),
                            "model_bytes_needed_in_flight_per_sm": Stats.exact(needed, "B"),
                            "model_bandwidth_fraction": Stats.exact(fraction, "fraction of peak")})
    return reports
