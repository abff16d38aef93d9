"""Peak memory of building and re-laying out FusedPILoTSGD's state (pilot.storage), measured by the CPU profiler's
allocation events (bench.memory): the state itself plus one parameter's temporaries, or where a storage has to grow
(add_param_group) the new state plus the larger of the old storages, never the old and the new state together.

Eight 2^19-element weights: the state is 16 B per element (m, w and their two momentum buffers). Temporaries are
bounded in units of one fp32 copy of a weight (``LARGEST``): factorising writes straight into the storage, telemetry
and refreshes work in chunks.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

from bench.memory import peak_step_memory
from pilot import FusedPILoTSGD, factorise
from pilot.factorisation import factorise_into

COUNT, SHAPE = 8, (2**9, 2**10)
NUMEL = SHAPE[0] * SHAPE[1]
LARGEST = 4 * NUMEL  # one fp32 copy of a weight
STATE = 16 * COUNT * NUMEL  # m, w, b_m, b_w of every weight
TEMPORARIES = 3 * LARGEST // 2  # what one parameter's work may add: at most an fp32 copy, a byte mask, chunks
OPTIONS = dict(lr=0.1, momentum=0.9, alpha=1e-3)


def weights(count: int = COUNT, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(SHAPE).to(dtype)) for _ in range(count)]


def peak(build: Callable[[], Callable[[], object]]) -> int:
    """Bytes held at the peak of the call ``build()`` returns, counting what ``build`` left allocated."""
    return peak_step_memory(build, torch.device("cpu"), warmup=0)


def in_largest(nbytes: int) -> str:
    return f"{nbytes / LARGEST:.2f} fp32 weights"


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_construction_lays_every_group_out_at_once(groups: int) -> None:
    """torch's Optimizer.__init__ adds one group at a time; laying each out again held the state of the groups
    before beside the new one (20 weights over the state with two groups)."""
    params = weights()
    size = COUNT // groups
    param_groups = [{"params": params[i:i + size]} for i in range(0, COUNT, size)]
    held = peak(lambda: lambda: FusedPILoTSGD(param_groups, **OPTIONS))
    assert STATE <= held <= STATE + TEMPORARIES, in_largest(held - STATE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_construction_factorises_in_place(dtype: torch.dtype) -> None:
    """Factorising made m0, w0 and its intermediates (4.3 fp32 weights over the state; 5.3 for bf16 weights, whose
    fp32 copy is the one temporary left)."""
    params = weights(dtype=dtype)
    held = peak(lambda: lambda: FusedPILoTSGD(params, **OPTIONS))
    assert STATE <= held <= STATE + TEMPORARIES, in_largest(held - STATE)


def test_construction_that_raises_leaves_every_parameter_as_it_was() -> None:
    """The groups are checked before any is laid out: a bad second group no longer leaves the first group's weights
    overwritten with m0 * w0."""
    params = [nn.Parameter(torch.randn(4, 6)) for _ in range(2)]
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="lr"):
        FusedPILoTSGD([{"params": params[:1]}, {"params": params[1:], "lr": -1.0}], **OPTIONS)
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_add_param_group_moves_one_storage_at_a_time() -> None:
    """Adding 4 weights to 4: the factors and the buffers move one after the other, each old storage freed before
    the next is allocated, so the peak is the new state plus one old storage (it held both states: 20 weights over
    the state, against 8 + temporaries now)."""
    params = weights()
    old_storage = 8 * (COUNT // 2) * NUMEL  # the old factors (or buffers) of 4 weights

    def build() -> Callable[[], None]:
        optimizer = FusedPILoTSGD(params[:COUNT // 2], **OPTIONS)
        return lambda: optimizer.add_param_group({"params": params[COUNT // 2:]})

    held = peak(build)
    assert STATE <= held <= STATE + old_storage + TEMPORARIES, in_largest(held - STATE)


def test_momentum_switched_on_keeps_the_factors_where_they_are() -> None:
    """Only the buffers need storage: the factors stay in theirs (they were copied, 19 weights over the state)."""
    params = weights()

    def build() -> Callable[[], None]:
        optimizer = FusedPILoTSGD(params, lr=0.1, alpha=1e-3)
        factors = optimizer.state[params[0]]["m"].data_ptr()

        def switch_on() -> None:
            optimizer.param_groups[0]["momentum"] = 0.9
            optimizer.l1_norm()  # notices the change and lays the state out again
            assert optimizer.state[params[0]]["m"].data_ptr() == factors

        return switch_on

    held = peak(build)
    assert STATE <= held <= STATE + TEMPORARIES, in_largest(held - STATE)


def test_load_state_dict_frees_the_old_state_before_it_copies_the_new_one() -> None:
    """The loaded tensors are copied into the new layout one parameter at a time once the old state is freed (they
    were copied, then laid out beside the old state: 33 weights over the state). The state dict itself existed
    before and is not counted."""
    saved = FusedPILoTSGD(weights(), **OPTIONS)
    for p in saved.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    saved.step()
    state_dict = copy.deepcopy(saved.state_dict())
    del saved
    params = weights()

    def build() -> Callable[[], None]:
        optimizer = FusedPILoTSGD(params, **OPTIONS)
        return lambda: optimizer.load_state_dict(state_dict)

    held = peak(build)
    assert STATE <= held <= STATE + TEMPORARIES, in_largest(held - STATE)
    optimizer = FusedPILoTSGD(params, **OPTIONS)
    optimizer.load_state_dict(state_dict)
    for p, index in zip(params, state_dict["param_groups"][0]["params"]):
        for key, value in state_dict["state"][index].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(optimizer.state[p][key], value), key
        assert torch.equal(p.detach(), optimizer.state[p]["m"] * optimizer.state[p]["w"])


@pytest.mark.parametrize("part", ["all", "half"])
def test_refresh_refactorises_in_chunks(part: str) -> None:
    """Weights written outside the optimizer are factorised again with temporaries in chunks (whole m0, w0, their
    intermediates and torch.where copies before: 5.5 weights over the state)."""
    params = weights()

    def build() -> Callable[[], None]:
        optimizer = FusedPILoTSGD(params, **OPTIONS)

        def write_and_notice() -> None:
            with torch.no_grad():
                for p in params:
                    (p if part == "all" else p[::2]).mul_(-2.0).add_(0.5)
            optimizer.l1_norm()  # notices the writes

        return write_and_notice

    held = peak(build)
    assert STATE <= held <= STATE + TEMPORARIES, in_largest(held - STATE)


def test_refresh_in_chunks_refactorises_what_changed() -> None:
    """The chunked refresh (a tensor of several chunks, part of it written) gives each changed entry the factors of
    its new value and keeps the others, as the whole-tensor formula did."""
    weight = nn.Parameter(torch.randn(3, 2**17 + 5))  # cut along its largest dimension into 4 chunks
    optimizer = FusedPILoTSGD([weight], **OPTIONS)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    state = optimizer.state[weight]
    m, w, buffer = state["m"].clone(), state["w"].clone(), state["momentum_buffer_m"].clone()
    with torch.no_grad():
        weight[:, ::3] = torch.randn(3, (2**17 + 5 + 2) // 3)
    new = weight.detach().clone()
    optimizer.l1_norm()
    changed = new != m * w
    m0, w0 = factorise(new, 1.0)
    assert changed.any() and not changed.all()
    assert torch.equal(state["m"], torch.where(changed, m0, m)) and torch.equal(state["w"], torch.where(changed, w0, w))
    assert torch.equal(state["momentum_buffer_m"], torch.where(changed, 0.0, buffer))


def test_deepcopy_keeps_the_copied_storage() -> None:
    """An unpickled copy of the state is already laid out: it is kept, not copied again (3 states' worth before).
    The copy holds a copy of the weights too."""
    params = weights()

    def build() -> Callable[[], object]:
        optimizer = FusedPILoTSGD(params, **OPTIONS)
        return lambda: copy.deepcopy(optimizer)

    held = peak(build)
    copies = 2 * STATE + COUNT * LARGEST
    assert copies <= held <= copies + TEMPORARIES, in_largest(held - copies)


def test_a_lay_out_that_raises_is_done_again_at_the_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory while moving a storage: the state keeps its values, and the next step lays it out again
    instead of stepping storage the state no longer views."""
    import pilot.storage

    params = [nn.Parameter(torch.randn(4, 6)) for _ in range(3)]
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    optimizer = FusedPILoTSGD(params[:2], **OPTIONS)
    reference = FusedPILoTSGD(copies[:2], **OPTIONS)
    move = pilot.storage._move

    def fail_on_buffers(bucket: object, kind: str, *args: object) -> None:
        if kind == "buffers":
            raise torch.OutOfMemoryError("no memory left (test)")
        move(bucket, kind, *args)

    monkeypatch.setattr(pilot.storage, "_move", fail_on_buffers)
    with pytest.raises(torch.OutOfMemoryError):
        optimizer.add_param_group({"params": params[2:]})
    monkeypatch.setattr(pilot.storage, "_move", move)
    reference.add_param_group({"params": copies[2:]})
    for o in (optimizer, reference):
        for p in o.param_groups[0]["params"] + o.param_groups[1]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, reference.state[q][key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["dense", "transposed", "gaps"])
def test_factorise_in_place_is_the_formula_bit_for_bit(dtype: torch.dtype, layout: str) -> None:
    """factorise_into writes each operation of the out-of-place formula in place: the same bits, nan and inf
    included, into views of a flat storage as into new tensors."""
    x = torch.randn(256, 512) * torch.exp(torch.randn(256, 512) * 8)
    x.view(-1)[:300] = 0
    x.view(-1)[300:310] = float("nan")
    x.view(-1)[310:320] = float("inf")
    x.view(-1)[320:400] = torch.randn(80) * 1e-40
    x = {"dense": x, "transposed": x.t(), "gaps": x[:, ::2]}[layout].to(dtype)
    for beta in (1.0, 0.25, 0.0, 1e30):
        x32 = x.float()
        m_formula = torch.sqrt(beta / 2 + torch.hypot(torch.full_like(x32, beta / 2), x32))
        w_formula = torch.where(m_formula > 0, x32 / m_formula, torch.zeros_like(x32))
        storage = torch.zeros(2 * x.numel() + 64)
        m, w = (storage.as_strided(x.shape, torch.empty_like(x32).stride(), offset) for offset in (0, x.numel() + 64))
        factorise_into(x32, m, w, beta)
        for ours, formula in ((m, m_formula), (w, w_formula)):
            assert torch.equal(ours.contiguous().view(torch.int32), formula.contiguous().view(torch.int32))
