"""FusedPILoTSGD's state dicts: what :meth:`state_dict` adds to torch.optim's, and the conversion of a loaded one.

Loading runs torch.optim's own ``load_state_dict`` (hooks, group checks, ``param_names``); the per-parameter state
goes through it wrapped in :class:`Uncast`, because torch would cast it to the parameter's dtype (the factors stay
fp32) and could not reshard DTensor state, and is converted here instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .factorisation import BUFFER_KEYS, FACTOR_KEYS, MOMENTUM_STARTED, PLAIN_KEYS, is_factorised, is_factorised_state
from .sharding import like_param, local


def complete_state_dict(state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Complete torch.optim's state dict in place so that it can serve as the template a checkpoint is loaded into
    (as torch.distributed.checkpoint does with a fresh optimizer's): a parameter of a group with momentum always
    has its buffers (zeros before its first momentum step) and ``"momentum_started"`` says whether they hold a
    value."""
    for group, saved in zip(param_groups, state_dict["param_groups"]):
        if float(group["momentum"]) == 0:
            continue
        for p, index in zip(group["params"], saved["params"]):
            entry = dict(state_dict["state"][index])  # a copy: torch's state dict shares our state's dicts
            keys = BUFFER_KEYS[is_factorised_state(entry)]
            entry[MOMENTUM_STARTED] = entry[keys[0]] is not None
            for key in keys:
                if entry[key] is None:
                    entry[key] = like_param(torch.zeros_like(local(p), dtype=torch.float32), p)
            state_dict["state"][index] = entry
    return state_dict


@dataclass(frozen=True)
class Uncast:
    """A parameter's saved state on its way through torch's load_state_dict, which leaves objects of unknown type
    alone. ``saved_id`` is the parameter's index in the state dict, for error messages."""

    saved_id: Any
    state: dict[str, Any]


def pass_state_uncast(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """load_state_dict pre-hook: wrap every saved parameter's state (empty if it has none) in an Uncast."""
    saved = state_dict["state"]
    ids = [saved_id for group in state_dict["param_groups"] for saved_id in group["params"]]
    return {**state_dict, "state": {saved_id: Uncast(saved_id, saved.get(saved_id, {})) for saved_id in ids}}


def loaded_state(optimizer: Optimizer, state: dict[Any, Any], param_groups: list[dict[str, Any]]
                 ) -> dict[Tensor, dict[str, Any]]:
    """The new ``optimizer.state`` from what torch's load_state_dict matched to the parameters (Uncast values):
    checked, and still the state dict's own tensors (any dtype, device or sharding): laying the state out copies
    them (:mod:`pilot.storage`)."""
    dense = not any("alpha" in group for group in param_groups)
    new_state = {}
    for group in param_groups:
        for p in group["params"]:
            saved = state[p]
            new_state[p] = _loaded_param_state(p, saved.state, saved.saved_id, dense, is_factorised(optimizer, p))
    return new_state


def _loaded_param_state(p: Tensor, saved: dict[str, Any], saved_id: Any, dense: bool,
                        factorised: bool) -> dict[str, Any]:
    expected = FACTOR_KEYS if factorised else PLAIN_KEYS
    where = f"parameter {saved_id} (shape {tuple(p.shape)})"
    if factorised and not all(key in saved for key in FACTOR_KEYS[:2]):
        hint = (" (it looks like a dense torch.optim.SGD state dict: load the model's weights and create "
                "FusedPILoTSGD afterwards, which factorises them)") if dense else ""
        raise ValueError(f"state dict has no factors m, w for the factorised {where}{hint}")
    if not factorised and is_factorised_state(saved):
        raise ValueError(f"state dict has factors for {where}, which this optimizer does not factorise")
    started = saved.get(MOMENTUM_STARTED)
    if started is not None and not isinstance(started, bool):
        raise TypeError(f"state dict's {MOMENTUM_STARTED} of {where} must be a bool, got {started!r}")
    if started is False:  # zeros standing in for buffers that do not exist yet
        saved = {key: value for key, value in saved.items() if key not in BUFFER_KEYS[factorised]}
    if factorised and len({saved.get(key) is None for key in BUFFER_KEYS[True]}) > 1:
        raise ValueError(f"state dict has only one of the momentum buffers of {where}")
    loaded: dict[str, Any] = {}
    for key in expected:
        value = saved.get(key)
        if value is None:
            if key in FACTOR_KEYS[:2]:
                raise ValueError(f"state dict's {key} of {where} is None")
            loaded[key] = None
            continue
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(p.shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"state dict's {key} of {where} has shape {got}, expected {tuple(p.shape)}")
        # the caller's tensor, not a copy: pilot.storage copies it into the new layout (to fp32, on the
        # parameter's device, this rank's shard) once the old state is freed, one parameter at a time
        loaded[key] = value.detach()
    return loaded
