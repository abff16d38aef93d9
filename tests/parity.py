"""Glue for parity tests: the same model trained by FusedPILoTSGD and by the eager reference.

The reference is ``pilot.reference``: the weights that the fused optimizer factorises are parametrised as
m * w with ``torch.nn.utils.parametrize`` and trained by ``torch.optim.SGD`` with ``weight_decay=alpha`` on the
factors. Both sides get the same groups, hyper-parameters, batches and schedule edits.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from pilot import FusedPILoTSGD, is_factorised
from pilot.layout import Bucket
from pilot.reference import factor_pairs, parametrize_model
from pilot.triton_step import TritonStep

SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "maximize")

GroupSpec = tuple[Optional[list[str]], dict[str, Any]]  # (parameter names or None for the rest, options)


@dataclass
class Pair:
    fused_model: nn.Module
    fused: FusedPILoTSGD
    ref_model: nn.Module
    ref: torch.optim.SGD
    names: list[str]  # parameter names, in the fused model
    factorised: set[str]
    ref_groups: list[tuple[Optional[int], Optional[int]]]  # per fused group: (factor group, plain group) in ref

    def step(self, loss_fn: Callable[[nn.Module], Tensor]) -> None:
        for model, optimizer in ((self.fused_model, self.fused), (self.ref_model, self.ref)):
            optimizer.zero_grad()
            loss_fn(model).backward()
            optimizer.step()

    def set_group(self, index: int, **values: float) -> None:
        """Edit a group between steps, as a scheduler would (alpha is the factors' weight decay in the reference)."""
        self.fused.param_groups[index].update(values)
        factor_group, plain_group = self.ref_groups[index]
        for ref_index, is_factor in ((factor_group, True), (plain_group, False)):
            if ref_index is None:
                continue
            group = self.ref.param_groups[ref_index]
            for key, value in values.items():
                if key == "alpha":
                    if is_factor:
                        group["weight_decay"] = value
                elif key == "weight_decay":
                    if not is_factor:
                        group["weight_decay"] = value
                else:
                    group[key] = value

    def assert_close(self, rtol: float = 1e-5, atol: float = 1e-6, equal_nan: bool = False) -> None:
        """Parameters, factors and buffers equal the reference's (``equal_nan``: NaNs in the same places)."""
        close = dict(rtol=rtol, atol=atol, equal_nan=equal_nan)
        pairs = factor_pairs(self.ref_model)
        optimized = {id(p) for group in self.fused.param_groups for p in group["params"]}
        for name in self.names:
            p = self.fused_model.get_parameter(name)
            if id(p) not in optimized:
                continue
            state = self.fused.state[p]
            ref_weight = operator.attrgetter(name)(self.ref_model).detach()
            torch.testing.assert_close(p.detach(), ref_weight, **close, msg=lambda m: f"{name}: {m}")
            if name in self.factorised:
                m, w = pairs[name]
                for key, ref_tensor in (("m", m), ("w", w)):
                    torch.testing.assert_close(state[key], ref_tensor.detach(), **close,
                                               msg=lambda msg: f"{name}.{key}: {msg}")
                for key, ref_param in (("momentum_buffer_m", m), ("momentum_buffer_w", w)):
                    ref_buffer = self.ref.state.get(ref_param, {}).get("momentum_buffer")
                    _assert_same_buffer(state[key], ref_buffer, f"{name}.{key}", close)
            else:
                ref_param = self.ref_model.get_parameter(name)
                ref_buffer = self.ref.state.get(ref_param, {}).get("momentum_buffer")
                _assert_same_buffer(state["momentum_buffer"], ref_buffer, f"{name}.momentum_buffer", close)


def _assert_same_buffer(ours: Optional[Tensor], theirs: Optional[Tensor], what: str, close: dict[str, Any]) -> None:
    assert (ours is None) == (theirs is None), f"{what}: {ours is None=} but reference {theirs is None=}"
    if ours is not None:  # ours are fp32; torch.optim.SGD keeps a bf16/fp16 parameter's buffer in its dtype
        torch.testing.assert_close(ours, theirs.detach(), **close, check_dtype=False, msg=lambda m: f"{what}: {m}")


def assert_rounded_product(optimizer: FusedPILoTSGD, interpreted: bool) -> None:
    """Every factorised parameter holds round(m * w) in its dtype: exactly, or within one bf16 ulp of it when
    the Triton interpreter wrote it (it truncates fp32 -> bf16 instead of rounding)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "m" not in state:
                continue
            rounded = (state["m"] * state["w"]).to(p.dtype)
            if interpreted and p.dtype == torch.bfloat16:
                error = (p.detach().float() - rounded.float()).abs()
                assert (error <= rounded.float().abs() * 2 ** -7).all()
            else:
                assert torch.equal(p.detach(), rounded)


def build_pair(model: nn.Module, specs: list[GroupSpec], *, backend: str, beta: float = 1.0,
               reparam: Optional[bool] = None) -> Pair:
    """FusedPILoTSGD on a copy of ``model`` and the parametrised reference on another copy, same groups.

    ``specs``: one (names, options) per group; names None takes every parameter no other group names.
    Options are FusedPILoTSGD's group keys (lr, momentum, dampening, nesterov, maximize, alpha, weight_decay).
    """
    fused_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    named = {n for spec_names, _ in specs if spec_names for n in spec_names}
    resolved = [(spec_names if spec_names is not None else [n for n in names if n not in named], options)
                for spec_names, options in specs]
    fused = FusedPILoTSGD([{"params": [fused_model.get_parameter(n) for n in group_names], **options}
                           for group_names, options in resolved], beta=beta, reparam=reparam, backend=backend)
    factorised = {n for n in names if is_factorised(fused, fused_model.get_parameter(n))}

    name_of = {id(p): n for n, p in ref_model.named_parameters()}
    parametrize_model(ref_model, beta=beta, select=lambda _, p: name_of.get(id(p)) in factorised)
    pairs = factor_pairs(ref_model)
    ref_param_groups: list[dict[str, Any]] = []
    ref_groups: list[tuple[Optional[int], Optional[int]]] = []
    for group_names, options in resolved:
        sgd_options = {k: v for k, v in options.items() if k in SGD_KEYS}
        factor_params = [t for n in group_names if n in factorised for t in pairs[n]]
        plain_params = [ref_model.get_parameter(n) for n in group_names if n not in factorised]
        indices: list[Optional[int]] = []
        for params, decay in ((factor_params, options.get("alpha", 0.0)),
                              (plain_params, options.get("weight_decay", 0.0))):
            indices.append(len(ref_param_groups) if params else None)
            if params:
                ref_param_groups.append({"params": params, "weight_decay": decay, **sgd_options})
        ref_groups.append((indices[0], indices[1]))
    ref = torch.optim.SGD(ref_param_groups, lr=1e-3)
    return Pair(fused_model, fused, ref_model, ref, names, factorised, ref_groups)


def buckets(optimizer: FusedPILoTSGD) -> list[tuple[str, Bucket]]:
    """The one place where tests look inside FusedPILoTSGD: (path, bucket) for each of its buckets, one per
    (device, dtype) (:class:`pilot.layout.Bucket`); the path ("triton", "compile" or "eager") says which backend
    steps it (``bucket.backend``: :class:`pilot.triton_step.TritonStep` with its cached tables, or
    :class:`pilot.torch_step.TorchStep`)."""
    result = []
    for bucket in optimizer._layout.buckets:
        backend = bucket.backend
        path = ("triton" if isinstance(backend, TritonStep) else
                "compile" if backend.factorised_step.compiled else "eager")
        result.append((path, bucket))
    return result
