"""pilot.sparse_inference: sparse layers compute what the dense ones do, the per-layer choice is reported, and
python -m bench.inference runs end to end at a tiny size."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pilot import SparseInferenceModel, prune_, sparse_inference
from pilot.models import build_model
from pilot.sparse_encoding import same_bits
from pilot.sparse_inference import MARGIN, MAX_DENSITY, SparseConv2d, SparseLinear

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # fp32 sums taken in another order


def pruned(layer: nn.Module, sparsity: float = 0.9) -> nn.Module:
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < sparsity] = 0.0
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 20), (7, 20), (2, 3, 20), (20,)])
def test_sparse_linear_matches_linear(shape: tuple[int, ...], bias: bool) -> None:
    linear = pruned(nn.Linear(20, 9, bias=bias))
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(SparseLinear(linear)(x), linear(x), **TOLERANCE)


def test_sparse_layers_keep_32_bit_indices() -> None:
    # MKL, behind torch's CPU CSR products, takes int32 indices: int64 ones would be converted on every call.
    for layer in (SparseLinear(pruned(nn.Linear(20, 9))), SparseConv2d(pruned(nn.Conv2d(4, 6, 3)))):
        assert layer.weight.crow_indices().dtype == layer.weight.col_indices().dtype == torch.int32


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("options", [{}, {"stride": 2, "padding": 1}, {"padding": (2, 0), "dilation": 2, "bias": False},
                                     {"kernel_size": 1, "stride": (1, 2)}])
def test_sparse_conv2d_matches_conv2d(batch: int, options: dict) -> None:
    conv = pruned(nn.Conv2d(4, 6, **{"kernel_size": 3, **options}))
    x = torch.randn(batch, 4, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(SparseConv2d(conv)(x), conv(x), **TOLERANCE)


def test_sparse_conv2d_refuses_what_it_cannot_compute() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="numeric padding"):
        SparseConv2d(nn.Conv2d(4, 4, 3, padding="same"))


def lenet(sparsity: float = 0.98) -> nn.Module:
    model = build_model("lenet300-100", 10, 1, 28).eval()
    prune_(model, sparsity)
    return model


@pytest.mark.parametrize("batch", [1, 16])
def test_density_rule_runs_the_sparsest_large_linear_sparse_and_computes_the_same(batch: int) -> None:
    model = lenet()
    before = copy.deepcopy(model.state_dict())
    sparse = sparse_inference(model)
    assert isinstance(sparse, SparseInferenceModel) and not sparse.training
    choices = {choice.name: choice for choice in sparse.choices}
    assert list(choices) == ["fc1", "fc2", "fc3"]
    for choice in choices.values():  # a random model pruned globally: fc1 keeps < 1%, fc2 ~10%, fc3 ~35%
        assert choice.reason == "density rule" and choice.dense_us is None
        assert choice.sparse == (choice.density <= MAX_DENSITY and choice.entries >= 1 << 16)
    assert choices["fc1"].sparse and isinstance(sparse.model.fc1, SparseLinear)
    assert not choices["fc3"].sparse and isinstance(sparse.model.fc3, nn.Linear)
    x = torch.randn(batch, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), **TOLERANCE)
    assert all(same_bits(model.state_dict()[name], tensor) for name, tensor in before.items())  # copy, not changed
    assert "fc1" in sparse.table() and "density rule" in sparse.table()


def test_measured_choice_times_each_layer_on_the_example_input() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
                          nn.Linear(10, 10)).eval()
    prune_(model, 0.95)
    x = torch.randn(2, 3, 8, 8)
    sparse = sparse_inference(model, x)
    assert [(choice.name, choice.kind) for choice in sparse.choices] == [("0", "conv2d"), ("3", "linear"),
                                                                         ("4", "linear")]
    for choice in sparse.choices:
        assert choice.reason == "measured" and choice.dense_us > 0 and choice.sparse_us > 0
        assert choice.sparse == (choice.sparse_us <= MARGIN * choice.dense_us)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), **TOLERANCE)
    copied = copy.deepcopy(sparse)  # torch cannot deep-copy CSR tensors by itself
    with torch.inference_mode():
        torch.testing.assert_close(copied(x), sparse(x), rtol=0, atol=0)


def test_every_layer_sparse_computes_the_same_resnet() -> None:
    model = build_model("resnet20", 10, 3, 32).eval()
    prune_(model, 0.9)
    sparse = sparse_inference(model, max_density=1.0, min_entries=0)
    assert sum(choice.sparse for choice in sparse.choices) == 1  # convolutions stay dense under the rule
    for name, module in list(sparse.model.named_modules()):
        if isinstance(module, nn.Conv2d):
            parent, _, attribute = name.rpartition(".")
            setattr(sparse.model.get_submodule(parent), attribute, SparseConv2d(module))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), **TOLERANCE)


def test_a_dtype_without_sparse_kernels_stays_dense_and_says_why() -> None:
    model = lenet().bfloat16()
    sparse = sparse_inference(model)
    for choice in sparse.choices:
        if not choice.sparse:
            continue
        x = torch.randn(1, 1, 28, 28).bfloat16()  # torch gained a bf16 CSR kernel: then it must compute the same
        with torch.inference_mode():
            torch.testing.assert_close(sparse(x), model(x), rtol=2e-2, atol=2e-2)
        return
    assert all(choice.reason.startswith("sparse form failed") for choice in sparse.choices)


def test_invalid_max_density_is_refused() -> None:
    with pytest.raises(ValueError, match="max_density"):
        sparse_inference(lenet(), max_density=5)


def test_bench_inference_runs_at_a_tiny_size(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench.inference", "--models", "lenet300-100", "--sparsities", "0.98",
               "--batch-sizes", "1", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pilot sparse inference bench on cpu: ")
    assert "one-shot global magnitude pruning" in result.stdout and "sparse at least 2x faster" in result.stdout
    results = json.loads((tmp_path / "inference.json").read_text())
    entry, = results["configurations"]
    assert (entry["model"], entry["sparsity"], entry["batch_size"]) == ("lenet300-100", 0.98, 1)
    for contender in ("dense", "sparse"):
        assert entry[contender]["time"]["median"] > 0 and entry[contender]["peak_memory"]["median"] > 0
    assert entry["max_abs_difference"] < 1e-4 and len(entry["choices"]) == 3 and entry["free_layers_speedup"]["median"] > 0
    assert (tmp_path / "inference.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    noise = [line for line in result.stderr.splitlines() if not line.startswith("[inference] ")]
    assert not noise, noise


def test_free_layers_model_returns_what_the_dense_model_computes_on_its_batch() -> None:
    from bench.inference import free_layers_model

    model = lenet()
    x = torch.randn(2, 1, 28, 28)
    free = free_layers_model(model, ["fc1", "fc3"], x)
    assert type(free.fc1).__name__ == "_GivenOutput" and isinstance(free.fc2, nn.Linear)
    with torch.inference_mode():
        assert torch.equal(free(x), model(x))
