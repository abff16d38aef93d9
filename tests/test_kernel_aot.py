"""The Triton kernel compiled ahead of time for sm_80 and sm_90a (no GPU needed): spills and vector widths."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pilot_kernels import pilot_sgd
from pilot_kernels.aot import global_access_widths

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile the real kernels
    result = subprocess.run([sys.executable, "-m", "pilot_kernels.aot", "--json"], env=env, capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout)


def full_block_vector_accesses(x_bytes: int, amp: bool) -> tuple[int, int]:
    """128-bit loads and stores the unmasked path needs, one stream at a time.

    Each thread owns BLOCK / threads consecutive elements of every stream. Loads: the gradient and, for a plain
    tensor, x (x's dtype); m, w, b_m, b_w and the plain momentum buffer (fp32). Stores: m, w, b_m, b_w, the plain
    buffer (fp32), x twice (factorised and plain branches) and, in GradScaler's variant, the unscaled gradient
    (before the branches).
    """
    per_thread = pilot_sgd.BLOCK_SIZE // (32 * pilot_sgd.NUM_WARPS)
    vectors = lambda element_bytes: per_thread * element_bytes // 16  # noqa: E731
    loads = 2 * vectors(x_bytes) + 5 * vectors(4)
    stores = (3 if amp else 2) * vectors(x_bytes) + 5 * vectors(4)
    return loads, stores


def test_compiles_for_sm80_and_sm90a_for_every_dtype(reports: list[dict]) -> None:
    """Both variants: plain, and GradScaler's (amp: unscale on load, skip on found_inf)."""
    assert {(r["arch"], r["x_dtype"], r["amp"]) for r in reports} == \
        {(a, d, amp) for a in ("sm_80", "sm_90a") for d in BYTES for amp in (False, True)}


def test_no_spills_and_bounded_registers(reports: list[dict]) -> None:
    for r in reports:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r


def test_full_block_path_moves_every_stream_in_128_bit_accesses(reports: list[dict]) -> None:
    for r in reports:
        loads, stores = full_block_vector_accesses(BYTES[r["x_dtype"]], r["amp"])
        assert r["loads_by_bits"].get("128", 0) == loads, r
        assert r["stores_by_bits"].get("128", 0) == stores, r
        # the only other vector-free wide accesses are the int64 table reads and telemetry counts
        assert set(r["loads_by_bits"]) <= {"16", "32", "64", "128"}, r


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


def test_masked_and_unmasked_paths_agree_in_the_interpreter() -> None:
    """A misaligned tensor takes the masked path for every block; the result equals the aligned run's."""
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
