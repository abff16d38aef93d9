"""FusedPILoTSGD under DistributedDataParallel and FSDP2 (fully_shard), with torch.distributed.checkpoint.

Two gloo processes on CPU, started once for the module (torch.multiprocessing.spawn): they train, checkpoint
and save what they see; the tests compare that with a single process trained on the concatenated batches.
The kernel runs in Triton's interpreter in the workers too (they inherit TRITON_INTERPRET from conftest.py).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pilot import FusedPILoTSGD
from pilot.pruning import sparsity_report
from pilot.schedule import effective_density

WORLD = 2
OPTIONS = dict(lr=0.05, momentum=0.9, dampening=0.1, alpha=1e-2, weight_decay=1e-3)
STEPS = 4  # before the checkpoint
RESUMED_STEPS = 2  # after it

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def make_model(seed: int = 0) -> nn.Module:
    """No BatchNorm (its batch statistics are per rank under DDP); a 1-row layer gives rank 1 an empty shard."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def batch(step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch of 2 x 5 samples, or rank's half of it."""
    generator = torch.Generator().manual_seed(100 + step)
    z, target = torch.randn(2 * 5, 6, generator=generator), torch.randn(2 * 5, 1, generator=generator)
    if rank is None:
        return z, target
    return z[rank * 5:(rank + 1) * 5], target[rank * 5:(rank + 1) * 5]


def train(model: nn.Module, optimizer: FusedPILoTSGD, steps: range, rank: int | None = None) -> None:
    for step in steps:
        z, target = batch(step, rank)
        optimizer.zero_grad()
        (model(z) - target).square().mean().backward()
        optimizer.step()


def record(model: nn.Module, optimizer: FusedPILoTSGD) -> dict:
    """Parameters and optimizer state as whole tensors (gathered from the shards of DTensors), telemetry."""
    def whole(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    return {"params": [whole(p) for p in model.parameters()],
            "state": [{k: None if v is None else whole(v) for k, v in optimizer.state[p].items()}
                      for p in model.parameters()],
            "l1": optimizer.l1_norm(), "density": optimizer.density()}


def half_zero(model: nn.Module) -> nn.Module:
    """model with its negative entries set to 0 (on each rank's shard of DTensor parameters)."""
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if hasattr(p, "to_local") else p).clamp_(min=0)
    return model


def sparsity_signals(model: nn.Module) -> dict:
    """What the training CLI reads from the weights: the zeros per layer, the effective density."""
    return {"zeros": [layer.zeros for layer in sparsity_report(model).layers],
            "effective_density": effective_density(p for p in model.parameters() if p.ndim >= 2)}


# ---------------------------------------------------------------- the workers


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {"ddp": _ddp(rank), **_fsdp(rank, Path(out_dir) / "checkpoint")}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp(rank: int) -> dict:
    model = nn.parallel.DistributedDataParallel(make_model())
    optimizer = FusedPILoTSGD(model.parameters(), **OPTIONS)
    train(model, optimizer, range(STEPS), rank)
    return record(model.module, optimizer)


def _fsdp(rank: int, checkpoint: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))

    def sharded(seed: int, **options) -> tuple[nn.Module, FusedPILoTSGD]:
        model = make_model(seed)
        for layer in model[::2]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, FusedPILoTSGD(model.parameters(), **options)

    model, optimizer = sharded(0, **OPTIONS)
    local_numels = [p.to_local().numel() for p in model.parameters()]
    train(model, optimizer, range(STEPS), rank)
    trained = record(model, optimizer)

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    saved_types = sorted({type(value).__name__ for entry in state["optimizer"]["state"].values()
                          for value in entry.values() if isinstance(value, torch.Tensor)})
    dcp.save(state, checkpoint_id=checkpoint)
    train(model, optimizer, range(STEPS, STEPS + RESUMED_STEPS), rank)
    continued = record(model, optimizer)

    # a fresh run: other weights, other hyper-parameters, no momentum buffers yet; everything comes back
    resumed_model, resumed = sharded(1, lr=1.0, momentum=0.5)
    state = {"model": get_model_state_dict(resumed_model),
             "optimizer": get_optimizer_state_dict(resumed_model, resumed)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(resumed_model, state["model"])
    set_optimizer_state_dict(resumed_model, resumed, state["optimizer"])
    train(resumed_model, resumed, range(STEPS, STEPS + RESUMED_STEPS), rank)

    # plain torch.save-style state dicts across the two worlds: whole -> sharded (each rank slices its shard)
    # and sharded -> whole (the shards are gathered)
    whole_model = make_model()
    whole = FusedPILoTSGD(whole_model.parameters(), **OPTIONS)
    train(whole_model, whole, range(STEPS))
    from_whole_model, from_whole = sharded(1)
    to_whole_model = make_model(1)
    to_whole = FusedPILoTSGD(to_whole_model.parameters())
    with torch.no_grad():  # the plain parameters' values live in the model, not in the optimizer's state
        for whole_p, sharded_p, to_whole_p in zip(whole_model.parameters(), from_whole_model.parameters(),
                                                  to_whole_model.parameters()):
            sharded_p.to_local().copy_(distribute_tensor(whole_p, mesh, sharded_p.placements,
                                                         src_data_rank=None).to_local())
        for sharded_p, to_whole_p in zip(model.parameters(), to_whole_model.parameters()):
            to_whole_p.copy_(sharded_p.full_tensor())
    from_whole.load_state_dict(whole.state_dict())
    to_whole.load_state_dict(optimizer.state_dict())
    return {"fsdp": trained, "local_numels": local_numels, "saved_types": saved_types,
            "sparsity_signals": sparsity_signals(half_zero(sharded(0)[0])),
            "param_types": sorted({type(p).__name__ for p in model.parameters()}),
            "continued": continued, "resumed": record(resumed_model, resumed),
            "from_whole": record(from_whole_model, from_whole), "whole": record(whole_model, whole),
            "to_whole": record(to_whole_model, to_whole), "sharded_now": record(model, optimizer)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict:
    """One process on the concatenated batches: what both engines must reproduce."""
    model = make_model()
    optimizer = FusedPILoTSGD(model.parameters(), **OPTIONS)
    train(model, optimizer, range(STEPS))
    return record(model, optimizer)


# ---------------------------------------------------------------- the tests


def assert_same_run(a: dict, b: dict, exact: bool, same_blocks: bool = True) -> None:
    """Same tensors (bit for bit if exact) and telemetry; l1_norm sums per-block partial sums, which are only
    bit-identical when both runs cut the tensors into the same blocks (not across sharded and whole)."""
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6))
    for p, q in zip(a["params"], b["params"]):
        assert check(p, q)
    for state, other in zip(a["state"], b["state"]):
        assert state.keys() == other.keys()
        for key, value in state.items():
            assert (value is None) == (other[key] is None), key
            assert value is None or check(value, other[key]), key
    assert a["l1"] == (b["l1"] if exact and same_blocks else pytest.approx(b["l1"], rel=1e-5))
    assert a["density"] == b["density"]


def test_ddp_ranks_agree_bit_for_bit(ranks: list[dict]) -> None:
    assert_same_run(ranks[0]["ddp"], ranks[1]["ddp"], exact=True)


def test_ddp_equals_one_process_on_the_whole_batch(ranks: list[dict], single: dict) -> None:
    assert_same_run(ranks[0]["ddp"], single, exact=False)


def test_fsdp2_keeps_factors_of_the_local_shard(ranks: list[dict]) -> None:
    assert ranks[0]["param_types"] == ["DTensor"]
    whole = [p.numel() for p in make_model().parameters()]
    assert [a + b for a, b in zip(ranks[0]["local_numels"], ranks[1]["local_numels"])] == whole
    assert 0 in ranks[1]["local_numels"]  # the 1-row layer: rank 1 holds an empty shard and still takes part


def test_fsdp2_equals_one_process_on_the_whole_batch(ranks: list[dict], single: dict) -> None:
    """Gathered factors, buffers and weights match; l1_norm and density are summed over the shards."""
    assert_same_run(ranks[0]["fsdp"], ranks[1]["fsdp"], exact=True)  # gathered: the same on both ranks
    assert_same_run(ranks[0]["fsdp"], single, exact=False)


def test_zeros_and_effective_density_of_sharded_weights_count_every_shard(ranks: list[dict]) -> None:
    """Reductions of DTensors are Partial: read as numbers they would give each rank's own part."""
    whole = sparsity_signals(half_zero(make_model(0)))
    assert sum(whole["zeros"]) > 0
    for rank in ranks:
        assert rank["sparsity_signals"]["zeros"] == whole["zeros"]
        assert rank["sparsity_signals"]["effective_density"] == pytest.approx(whole["effective_density"], rel=1e-6)


def test_dcp_checkpoint_of_sharded_factors_resumes_bit_for_bit(ranks: list[dict]) -> None:
    for rank in ranks:
        assert rank["saved_types"] == ["DTensor"]  # the factors and buffers went to DCP as shards
        assert_same_run(rank["resumed"], rank["continued"], exact=True)


def test_state_dicts_move_between_sharded_and_whole_optimizers(ranks: list[dict]) -> None:
    for rank in ranks:
        assert_same_run(rank["from_whole"], rank["whole"], exact=True, same_blocks=False)
        assert_same_run(rank["to_whole"], rank["sharded_now"], exact=True, same_blocks=False)
