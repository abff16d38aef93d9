"""The Triton kernel compiled ahead of time for sm_80 and sm_90a (no GPU needed): registers, spills, access widths,
load / store order and shared-memory use of each code variant; and, in the interpreter, which variant a block takes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import triton

from pilot_kernels import pilot_sgd
from pilot_kernels.aot import (ctas_per_sm, global_access_widths, loads_after_a_store,
                               vector_load_bytes_before_first_store)

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2])
# Registers per thread at most, every dtype, plain and GradScaler's. Issue 11's target, 72 (4 programs of 8 warps per
# SM with GradScaler, 5 without), holds with Triton 3.8: 48 plain, 62-64 amp. Triton 3.6 (torch 2.11, the GPU
# machine's stack) compiles the same source to 48-58 plain and 64-78 amp (bf16 / fp16 78 on sm_80 and sm_90a, fp32 76
# on sm_90a): each variant compiled alone stays within 71, but ptxas allocates the whole kernel, every variant, at
# once. There the test holds the floor, 80: 3 programs per SM, which the bandwidth model (docs/kernel.md, "Two
# stacks") still finds enough to stream at peak. Versions between were not measured: the floor too.
REGISTER_TARGET = 72 if TRITON >= (3, 8) else 80
THREADS = 32 * pilot_sgd.NUM_WARPS
PER_THREAD = pilot_sgd.BLOCK_SIZE // THREADS  # consecutive elements of every stream a thread owns


@pytest.fixture(scope="module")
def reports() -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile the real kernels
    result = subprocess.run([sys.executable, "-m", "pilot_kernels.aot", "--json"], env=env, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout)


def variant(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in report["variants"] if v["variant"] == name)


def bits(element_bytes: int) -> str:
    """JSON key of the width of one thread's access to a stream: all its PER_THREAD elements at once."""
    return str(PER_THREAD * element_bytes * 8)


def test_compiles_for_sm80_and_sm90a_for_every_dtype(reports: list[dict[str, Any]]) -> None:
    """Both variants: plain, and GradScaler's (amp: unscale on load, skip on found_inf)."""
    assert {(r["arch"], r["x_dtype"], r["amp"]) for r in reports} == \
        {(a, d, amp) for a in ("sm_80", "sm_90a") for d in BYTES for amp in (False, True)}


def test_no_spills_and_registers_within_target(reports: list[dict[str, Any]]) -> None:
    for r in reports:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert r["registers"] <= REGISTER_TARGET, r
        assert r["ctas_per_sm"] == ctas_per_sm(r["registers"], r["num_warps"]) >= 3, r


def test_full_blocks_issue_every_load_before_the_first_store(reports: list[dict[str, Any]]) -> None:
    """One round trip to DRAM per block: g, m, w, b_m and b_w (or x, g and b) all in flight together."""
    for r in reports:
        for name in ("full aligned", "full unaligned"):
            assert variant(r, name)["loads_after_a_store"] == 0, (r["arch"], r["x_dtype"], r["amp"], name)
        # the factorised path's vector loads: g, and the four fp32 streams m, w, b_m, b_w
        expected = PER_THREAD * (BYTES[r["x_dtype"]] + 4 * 4)
        assert variant(r, "full aligned")["vector_load_bytes_before_first_store"] == expected, r
        assert r["load_bytes_in_flight_per_cta"] == expected * THREADS, r


def test_full_aligned_blocks_move_every_stream_in_one_vector_per_thread(reports: list[dict[str, Any]]) -> None:
    """Loads: g and (plain) x in x's dtype; m, w, b_m, b_w and the plain buffer b in fp32. Stores: the five fp32
    streams, x twice (factorised and plain branches) and, in GradScaler's variant, the unscaled gradient twice."""
    for r in reports:
        v, x_bits, fp32_bits = variant(r, "full aligned"), bits(BYTES[r["x_dtype"]]), bits(4)
        assert fp32_bits == "128"
        loads, stores = {x_bits: 2}, {x_bits: 4 if r["amp"] else 2}
        for counts in (loads, stores):
            counts[fp32_bits] = counts.get(fp32_bits, 0) + 5
        assert v["vector_loads_by_bits"] == loads and v["vector_stores_by_bits"] == stores, r


def test_unaligned_full_blocks_keep_vector_factor_and_buffer_streams(reports: list[dict[str, Any]]) -> None:
    """x or grad unaligned: only their accesses are scalar; m, w, b_m, b_w and b stay 128-bit vectors."""
    for r in reports:
        v = variant(r, "full unaligned")
        assert v["vector_loads_by_bits"] == {"128": 5} and v["vector_stores_by_bits"] == {"128": 5}, r
        assert str(8 * BYTES[r["x_dtype"]]) in v["loads_by_bits"], r  # x and g, one element at a time


def test_unaligned_full_blocks_access_x_and_grad_as_documented(reports: list[dict[str, Any]]) -> None:
    """docs/kernel.md: in the full unaligned variant the gradient and a plain tensor's old x are loaded in the other
    streams' blocked layout, PER_THREAD consecutive elements a thread, as PER_THREAD scalar loads each; x (and
    GradScaler's unscaled gradient) is stored in a 1-element-per-thread layout after a layout conversion, one per
    branch and stream (Triton 3.6 shares one of GradScaler's), PER_THREAD scalar stores a thread. Counted on the
    16-bit dtypes, whose element width no table read shares."""
    for r in reports:
        if BYTES[r["x_dtype"]] != 2:
            continue
        v, streams_stored = variant(r, "full unaligned"), 4 if r["amp"] else 2  # x, and g, in both branches
        assert v["loads_by_bits"]["16"] == 2 * PER_THREAD, r
        assert v["stores_by_bits"]["16"] == streams_stored * PER_THREAD, r
        assert 1 <= v["layout_conversions"] <= streams_stored, r


def test_no_shared_memory_round_trip_in_full_aligned_blocks(reports: list[dict[str, Any]]) -> None:
    """Every stream in the one blocked layout of the loads, whatever x's dtype: no layout conversion, so the only
    shared-memory traffic and barriers are those of fp32's kernel (the telemetry sums and the momentum flag)."""
    fp32 = {(r["arch"], r["amp"]): variant(r, "full aligned") for r in reports if r["x_dtype"] == "float32"}
    for r in reports:
        v = variant(r, "full aligned")
        assert v["layout_conversions"] == 0, r
        reference = fp32[r["arch"], r["amp"]]
        assert (v["shared_stores"], v["barriers"]) == (reference["shared_stores"], reference["barriers"]), r


def test_grad_scale_divides_correctly_rounded(reports: list[dict[str, Any]]) -> None:
    """g / scale as torch computes it (div.rn), not the approximate div.full that Triton's `/` emits."""
    for r in reports:
        assert set(r["divisions"]) == ({"div.rn.f32"} if r["amp"] else set()), r


def test_access_width_parser() -> None:
    ptx = """
        ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        @%p1 ld.global.b32 { %r5 }, [ %rd2 + 0 ];
        ld.global.L1::evict_last.b64 %rd3, [%rd4];
        st.global.v2.b16 [ %rd5 + 0 ], { %rs1, %rs2 };
        st.global.b64 [ %rd6 + 0 ], %rd7;
    """
    loads, stores = global_access_widths(ptx)
    assert loads == {128: 1, 32: 1, 64: 1} and stores == {32: 1, 64: 1}
    assert global_access_widths(ptx, vector_only=True) == ({128: 1}, {32: 1})


def test_load_order_parser_follows_every_path() -> None:
    """A load that follows a store on one path only (a conditional branch skips it) still counts, as does the
    store's block branching back; the heaviest path decides the bytes before the first store."""
    ptx = """
        ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        @%p1 bra $L__BB0_2;
        ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
        st.global.v4.b32 [ %rd2 + 0 ], { %r5, %r6, %r7, %r8 };
        @%p2 bra $L__BB0_3;
        ret;
    $L__BB0_2:
        ld.global.v2.b32 { %r9, %r10 }, [ %rd3 + 0 ];
        st.global.b32 [ %rd3 + 0 ], { %r9 };
        bra.uni $L__BB0_3;
    $L__BB0_3:
        ld.global.b32 { %r11 }, [ %rd4 + 0 ];
        ret;
    """
    assert loads_after_a_store(ptx) == 1
    assert vector_load_bytes_before_first_store(ptx) == 32
    assert loads_after_a_store(ptx.replace("ld.global.b32 { %r11 }", "st.global.b32 { %r11 }")) == 0


def test_occupancy_from_registers_and_warps() -> None:
    """64K registers, 2048 threads per SM; registers allocated in multiples of 8 per thread."""
    assert ctas_per_sm(64, 8) == 4 and ctas_per_sm(65, 8) == 3 and ctas_per_sm(135, 4) == 3
    assert ctas_per_sm(16, 8) == 8  # the thread limit binds


def _train_pair(grads: list[torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    from pilot import FusedPILoTSGD

    p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    optimizer = FusedPILoTSGD([p], lr=0.1, momentum=0.9, alpha=1e-2, backend="triton")
    for grad in grads:
        p.grad = grad
        optimizer.step()
    return p.detach().clone(), torch.tensor(optimizer.l1_norm())


def test_masked_and_unmasked_paths_agree_in_the_interpreter() -> None:
    """A misaligned parameter takes the unaligned full-block variant; the result equals the aligned run's."""
    from pilot import FusedPILoTSGD

    storage = torch.randn(3000 + 1)
    aligned = torch.nn.Parameter(storage[:3000].clone().view(30, 100))
    misaligned = torch.nn.Parameter(torch.empty(3001)[1:].view(30, 100))  # 4-byte offset: no vector path
    with torch.no_grad():
        misaligned.copy_(aligned)
    assert misaligned.data_ptr() % 16 != 0
    optimizers = [FusedPILoTSGD([p], lr=0.1, momentum=0.9, alpha=1e-2, backend="triton")
                  for p in (aligned, misaligned)]
    grad = torch.randn(30, 100)
    for _ in range(3):
        for p, optimizer in zip((aligned, misaligned), optimizers):
            p.grad = grad.clone()
            optimizer.step()
    assert torch.equal(aligned, misaligned)
    assert optimizers[0].l1_norm() == optimizers[1].l1_norm()


def test_misaligned_gradient_views_train_exactly_in_the_unaligned_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients that are views at odd offsets into one buffer (as DDP's gradient_as_bucket_view or FSDP2's
    reduce-scatter output can be): full blocks take VARIANT_FULL_UNALIGNED, the tail VARIANT_TAIL, and training
    equals a run on aligned gradients bit for bit."""
    shape = (3, 1000)  # two full blocks and a tail
    numel = 3000
    grads = [torch.randn(shape) for _ in range(3)]
    taken: list[int] = []
    step_block = pilot_sgd._step_block

    def recording_step_block(*args: Any) -> None:
        taken.append(int(getattr(args[-1], "value", args[-1])))  # VARIANT, the last argument
        step_block(*args)

    views = []
    for grad in grads:
        buffer = torch.zeros(numel + 1)
        view = buffer[1:1 + numel].view(shape)  # 4 bytes past a 16-byte boundary
        view.copy_(grad)
        assert view.data_ptr() % 16 != 0
        views.append(view)
    monkeypatch.setattr(pilot_sgd, "_step_block", recording_step_block)
    misaligned = _train_pair(views, shape)
    blocks = pilot_sgd.telemetry_slots(numel)
    steps = len(grads)

    def per_step(full_block_variant: int) -> list[int]:
        return sorted(([full_block_variant] * (blocks - 1) + [pilot_sgd.VARIANT_TAIL]) * steps)

    assert sorted(taken) == per_step(pilot_sgd.VARIANT_FULL_UNALIGNED)
    taken.clear()
    aligned = _train_pair([g.clone() for g in grads], shape)
    assert sorted(taken) == per_step(pilot_sgd.VARIANT_FULL_ALIGNED)
    assert all(torch.equal(a, b) for a, b in zip(misaligned, aligned))


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
def test_tail_chunks_step_as_full_blocks_do(scaled: bool) -> None:
    """The tail variant's chunks (TAIL_CHUNK elements each, one after the other): a tail that ends inside, at and
    just past a chunk boundary steps every element as the same elements of a full block do, bit for bit; with a
    grad_scale (not a power of two) the unscaled gradients written back agree too."""
    from pilot import FusedPILoTSGD

    chunk = pilot_sgd.TAIL_CHUNK
    assert pilot_sgd.BLOCK_SIZE // chunk > 1
    full = pilot_sgd.BLOCK_SIZE
    x0 = torch.randn(full, generator=torch.Generator().manual_seed(3))
    grads = [torch.randn(full, generator=torch.Generator().manual_seed(4 + i)) for i in range(3)]
    for numel in (1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, full - 1):
        params = [torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0[:numel].clone())]
        optimizer = FusedPILoTSGD(params, lr=0.1, momentum=0.9, alpha=1e-2, backend="triton")
        if scaled:  # as torch.amp.GradScaler hands them to a fused optimizer
            optimizer.grad_scale, optimizer.found_inf = torch.tensor([3.0]), torch.zeros(1)
        written = []
        for grad in grads:
            params[0].grad, params[1].grad = grad.clone(), grad[:numel].clone()
            optimizer.step()
            written.append((params[0].grad.clone(), params[1].grad.clone()))
        assert torch.equal(params[1].detach(), params[0].detach()[:numel]), numel
        for whole, tail in written:
            assert torch.equal(tail, whole[:numel]), numel
        if scaled:
            assert not torch.equal(written[0][0], grads[0])  # the gradient was unscaled and written back
