"""pilot.save_sparse / load_sparse and python -m pilot.export: bit-exact round trips, the size targets, and files
that must be refused with the model left as it was."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from pilot import (SparseCheckpointError, dense_fp32_bytes, load_sparse, prune_, read_sparse_metadata, save_sparse,
                   sparsity_report)
from pilot.export import main as export_main
from pilot.models import build_model
from pilot.sparse_encoding import decode, encode, same_bits

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"lenet300-100": (10, 1, 28), "resnet20": (10, 3, 32)}
# The targets: checkpoint size / dense fp32 state dict.
SIZE_TARGETS = {0.95: 0.09, 0.98: 0.06}


def trained_like(name: str, sparsity: float, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``name`` pruned globally to ``sparsity``, with what a trained model has and a fresh one lacks: non-zero biases
    and BatchNorm statistics (stored dense, so they count against the size targets) and a -0.0 among the weights."""
    model = build_model(name, *SHAPES[name])
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and tensor.dim() == 1:
                tensor.copy_(torch.rand_like(tensor) + 0.5)
        prune_(model, sparsity)
        weight = next(p for p in model.parameters() if p.dim() > 1)
        weight.view(-1)[torch.nonzero(weight.view(-1) == 0)[0]] = -0.0
    return model.to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    differ = [name for name in state if not same_bits(state[name], expected[name])]
    assert not differ, differ


# ------------------------------------------------------------------------------------------------ encodings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_every_encoding_round_trips_bit_for_bit(dtype: torch.dtype) -> None:
    dense = (torch.randn(40, 30) + 5).to(dtype)
    sparse = torch.zeros(300, 400).to(dtype)  # 2% dense: gaps of 50 on average
    sparse.view(-1)[torch.randperm(sparse.numel())[:2400]] = torch.ones(2400).to(dtype)
    cases = {"dense": dense, "bitmask": torch.where(torch.rand(64, 64) < 0.3, torch.ones(64, 64).to(dtype),
                                                    torch.zeros(64, 64).to(dtype)),
             "delta8": sparse, "delta16": torch.zeros(200_000).to(dtype).index_fill_(0, torch.tensor([3, 199_999]), 1)}
    for expected, tensor in cases.items():
        encoded = encode(tensor)
        assert encoded.encoding == expected
        assert same_bits(decode(encoded.encoding, encoded.shape, encoded.values, encoded.index), tensor)


def test_negative_zero_nan_empty_and_scalar_tensors_keep_their_bits() -> None:
    tensor = torch.zeros(1000)
    tensor[[1, 500, 999]] = torch.tensor([-0.0, float("nan"), -1.5])
    for case in (tensor, torch.zeros(0), torch.zeros(5, 0), torch.tensor(3), torch.zeros(1000)):
        encoded = encode(case)
        assert same_bits(decode(encoded.encoding, encoded.shape, encoded.values, encoded.index), case)
    assert encode(tensor).values.numel() == 3  # -0.0 is a value: its sign bit is set


def test_gaps_longer_than_the_index_width_are_bridged_by_stored_zeros() -> None:
    tensor = torch.zeros(3400)
    tensor[torch.cat([torch.arange(0, 200, 2), torch.arange(3200, 3400, 2)])] = 1.0  # one gap of 3002 positions
    encoded = encode(tensor)
    assert encoded.encoding == "delta8" and encoded.values.numel() == 200 + 3001 // 256
    assert int((encoded.values == 0).sum()) == 11 and int(encoded.index.to(torch.int64).max()) == 255
    assert same_bits(decode(encoded.encoding, encoded.shape, encoded.values, encoded.index), tensor)


# ------------------------------------------------------------------------------------------------ round trip and size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SHAPES))
def test_round_trip_is_bit_exact(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    model = trained_like(name, 0.95, dtype)
    path = tmp_path / "model.safetensors"
    save_sparse(model, path, model_name=name, method="pilot")
    loaded = build_model(name, *SHAPES[name]).to(dtype)
    info = load_sparse(path, loaded)
    assert_same_state(loaded, snapshot(model))
    assert info["model"] == name and info["method"] == "pilot"
    _, channels, size = SHAPES[name]
    x = torch.randn(2, channels, size, size).to(dtype)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


@pytest.mark.parametrize("sparsity", list(SIZE_TARGETS))
@pytest.mark.parametrize("name", list(SHAPES))
def test_checkpoint_size_meets_the_targets(tmp_path: Path, name: str, sparsity: float) -> None:
    model = trained_like(name, sparsity)
    path = tmp_path / "model.safetensors"
    save_sparse(model, path, model_name=name)
    ratio = path.stat().st_size / dense_fp32_bytes(model)
    assert ratio <= SIZE_TARGETS[sparsity], f"{name} at {sparsity:.0%}: {ratio:.4f}x"


def test_metadata_records_sparsity_method_model_version_and_extras(tmp_path: Path) -> None:
    import pilot

    model = trained_like("lenet300-100", 0.9)
    path = tmp_path / "m.safetensors"
    written = save_sparse(model, path, model_name="lenet300-100", method="lasso", metadata={"data": "fashion-mnist"})
    info = read_sparse_metadata(path)
    assert info == written
    assert float(info["sparsity"]) == sparsity_report(model).sparsity
    assert (info["pilot_version"], info["data"], info["format"]) == (pilot.__version__, "fashion-mnist", "pilot.sparse")
    with pytest.raises(ValueError, match="may not set sparsity"):
        save_sparse(model, path, metadata={"sparsity": "0.5"})
    with pytest.raises(TypeError, match="str to str"):
        save_sparse(model, path, metadata={"epochs": 3})


# ------------------------------------------------------------------------------------------------ hostile files


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "lenet.safetensors"
    save_sparse(trained_like("lenet300-100", 0.95), path, model_name="lenet300-100")
    return path


def rewrite(path: Path, edit) -> Path:  # noqa: ANN001
    """A copy of the checkpoint at ``path`` with ``edit(tensors, metadata)`` applied."""
    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = dict(file.metadata()), {name: file.get_tensor(name) for name in file.keys()}
    edit(tensors, metadata)
    edited = path.with_name("edited.safetensors")
    safetensors.torch.save_file(tensors, str(edited), metadata=metadata)
    return edited


def assert_refused(path: Path, model: nn.Module, match: str) -> None:
    before = snapshot(model)
    with pytest.raises(SparseCheckpointError, match=match):
        load_sparse(path, model)
    assert_same_state(model, before)


@pytest.mark.parametrize("keep", [0.0, 0.003, 0.5, 0.99])
def test_truncated_file_is_refused(saved: Path, keep: float) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[:int(keep * len(data))])
    assert_refused(saved, build_model("lenet300-100", *SHAPES["lenet300-100"]), "not a readable safetensors file")


def test_wrong_shapes_are_refused(saved: Path) -> None:
    assert_refused(saved, build_model("lenet300-100", 10, 1, 32), r"shapes differ for fc1\.weight")


def test_wrong_tensor_names_are_refused(saved: Path) -> None:
    assert_refused(saved, build_model("resnet20", 10, 3, 32), "does not fit CifarResNet.*missing")

    def rename(tensors: dict, metadata: dict) -> None:
        tensors["fc9.bias"] = tensors.pop("fc3.bias")
    assert_refused(rewrite(saved, rename), build_model("lenet300-100", *SHAPES["lenet300-100"]), "fc9.bias")


def test_missing_metadata_is_refused(tmp_path: Path, saved: Path) -> None:
    model = build_model("lenet300-100", *SHAPES["lenet300-100"])
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(plain))
    assert_refused(plain, model, "not a pilot sparse checkpoint")
    assert_refused(rewrite(saved, lambda tensors, metadata: metadata.pop("layout")), model, "lacks layout")
    assert_refused(rewrite(saved, lambda tensors, metadata: metadata.update(format_version="9")), model, "version")


def test_damaged_index_or_layout_is_refused(saved: Path) -> None:
    model = build_model("lenet300-100", *SHAPES["lenet300-100"])
    layout = json.loads(read_sparse_metadata(saved)["layout"])
    name = next(iter(layout))

    def drop_value(tensors: dict, metadata: dict) -> None:
        tensors[name + "#values"] = tensors[name + "#values"][:-1].clone()
    assert_refused(rewrite(saved, drop_value), model, f"{name} cannot be decoded")

    def long_gap(tensors: dict, metadata: dict) -> None:
        tensors[name + "#index"] = torch.full_like(tensors[name + "#index"], 255)
    if layout[name][0] == "delta8":
        assert_refused(rewrite(saved, long_gap), model, "gaps reach position")
    assert_refused(rewrite(saved, lambda tensors, metadata: metadata.update(layout="{")), model, "layout is damaged")


# ------------------------------------------------------------------------------------------ python -m pilot.export


def write_run(directory: Path, sparsity: float = 0.95) -> nn.Module:
    """A run directory as python -m pilot.train leaves it, reduced to what export reads (see pilot/train/finish.py)."""
    model = trained_like("lenet300-100", sparsity)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"method": "pilot", "model": "lenet300-100",
                                                       "data": "fashion-mnist"}))
    torch.save({"state_dict": model.state_dict(), "masks": {}, "model": "lenet300-100", "data": "fashion-mnist",
                "num_classes": 10, "in_channels": 1, "input_size": 28, "target_sparsity": sparsity,
                "bn_recalibration_batches": 0}, directory / f"pruned-{100 * sparsity:g}.pt")
    return model


def test_export_writes_a_checkpoint_that_rebuilds_the_run_model(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    model = write_run(tmp_path / "run")
    out = tmp_path / "lenet-95.safetensors"
    assert export_main([str(tmp_path / "run"), "--sparsity", "0.95", "--out", str(out)]) == 0
    assert "loads back bit for bit" in capsys.readouterr().out
    info = read_sparse_metadata(out)
    assert (info["method"], info["model"], info["data"], info["num_classes"]) == ("pilot", "lenet300-100",
                                                                                  "fashion-mnist", "10")
    rebuilt = build_model(info["model"], int(info["num_classes"]), int(info["in_channels"]), int(info["input_size"]))
    load_sparse(out, rebuilt)
    assert_same_state(rebuilt, snapshot(model))


def test_export_names_the_sparsities_a_run_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "run")
    assert export_main([str(tmp_path / "run"), "--sparsity", "0.9", "--out", str(tmp_path / "x")]) == 2
    assert "pruned-90.pt does not exist; this run has pruned-95.pt" in capsys.readouterr().err
    assert export_main([str(tmp_path / "run"), "--sparsity", "95", "--out", str(tmp_path / "x")]) == 2
    assert "need a fraction in (0, 1)" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nowhere"), "--sparsity", "0.95", "--out", str(tmp_path / "x")]) == 2
    assert "config.json is unreadable" in capsys.readouterr().err
    assert export_main([str(tmp_path / "run"), "--sparsity", "0.95", "--out", str(tmp_path / "no" / "x")]) == 2
    assert "does not exist; create it" in capsys.readouterr().err


def test_python_dash_m_pilot_export_runs(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    out = tmp_path / "m.safetensors"
    result = subprocess.run([sys.executable, "-m", "pilot.export", str(tmp_path / "run"), "--sparsity", "0.95",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "x the dense fp32 state dict" in result.stdout


def test_pilot_imports_without_safetensors() -> None:
    """The GPU image has no safetensors: `import pilot` (and with it bench.gpu) must not need it."""
    import subprocess
    import sys
    code = "import sys; sys.modules['safetensors'] = None; import pilot; print(pilot.save_sparse.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "save_sparse", result.stderr
