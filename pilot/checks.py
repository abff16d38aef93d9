"""Argument checks of FusedPILoTSGD (and of the schedules and baselines, which share :func:`check_number`).

Every message names the argument or parameter and what to do instead.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .factorisation import check_beta
from .sharding import local

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP32_MAX = torch.finfo(torch.float32).max


def check_number(name: str, value: Any, *, minimum: float = 0.0) -> None:
    """Raise TypeError unless value is a number (or one-element tensor), ValueError unless it is finite, >= minimum
    and within fp32 range; the message names the argument. Shared by the optimizer, schedules and baselines."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name} value: a tensor {name} must have one element, got shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name} value: expected a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value} (need a finite number >= {minimum})")
    if abs(value) > _FP32_MAX:  # the step computes in fp32: such a value would be inf there
        raise ValueError(f"Invalid {name} value: {value} does not fit in float32 (|value| <= {_FP32_MAX:.4g})")


def check_bool_or_none(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid {name} value: expected None or a bool, got {value!r}")


def check_group(group: dict[str, Any]) -> None:
    """A parameter group's hyper-parameters (also the optimizer's defaults)."""
    for name in ("lr", "momentum", "weight_decay", "alpha"):
        check_number(name, group[name])
    check_number("dampening", group["dampening"], minimum=-math.inf)
    check_beta(group["beta"])
    check_number("beta", group["beta"])
    for name in ("nesterov", "maximize"):
        if not isinstance(group[name], bool):
            raise TypeError(f"Invalid {name} value: expected a bool, got {group[name]!r}")
    if group["reparam"] not in (None, True, False):
        raise ValueError(f"Invalid reparam value: {group['reparam']!r} (need None, True or False)")
    if group["nesterov"] and (float(group["momentum"]) <= 0 or float(group["dampening"]) != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def check_params(group: dict[str, Any], group_index: int, capturable_problem: Callable[[torch.device], str]) -> None:
    """The parameters of a new group: dtype, device, kind. ``capturable_problem(device)`` says why
    capturable=True cannot work for tensors on that device ("" if it can)."""
    for index, p in enumerate(group["params"]):
        where = f"parameter {index} of group {group_index} (shape {tuple(p.shape)})"
        local_p = local(p)
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where} has dtype {p.dtype}; FusedPILoTSGD supports "
                            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
        if local_p.device.type == "meta":
            raise ValueError(f"{where} is on the meta device and has no data: materialise the model "
                             "(e.g. to_empty() and initialise it) before creating the optimizer")
        if group["reparam"] and p.ndim == 0:
            raise ValueError(f"reparam=True: {where} is 0-d; only tensors with at least one dimension "
                             "are factorised")
        if local_p.is_sparse:
            raise ValueError(f"{where} is a sparse tensor; pass dense parameters")
        problem = capturable_problem(local_p.device)
        if problem:
            raise ValueError(f"capturable=True needs the Triton kernel, but {where} {problem}")


def check_no_shared_memory(params: list[Tensor]) -> None:
    """Two parameters over the same memory would be stepped twice per step (and factorised inconsistently)."""
    spans = []
    for p in params:
        local_p = local(p)
        if local_p.numel():
            start = local_p.data_ptr()
            extent = 1 + sum((size - 1) * stride for size, stride in zip(local_p.shape, local_p.stride()))
            spans.append((local_p.device, start, start + extent * local_p.element_size(), tuple(p.shape)))
    spans.sort(key=lambda span: (str(span[0]), span[1]))
    for (device, _, end, shape), (next_device, next_start, _, next_shape) in zip(spans, spans[1:]):
        if device == next_device and next_start < end:
            raise ValueError(f"parameters of shapes {shape} and {next_shape} share memory (views of one "
                             "tensor?); each parameter must own its memory")
