"""FusedPILoTSGD as a torch.optim drop-in: init, launches, telemetry, state dicts, groups, closures, bad input."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import pilot_kernels
from parity import build_pair
from pilot import FusedPILoTSGD, factorise
from test_parity import BACKENDS, SmallCNN, cnn_loss


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    loss = cnn_loss(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("beta", [1.0, 0.25, 0.0, 1e-30, 1e30])
def test_factorise_invariants(beta: float) -> None:
    x = torch.randn(1000) * 3
    x[:10] = 0
    m, w = factorise(x, beta)
    assert m.dtype == w.dtype == torch.float32 and (m >= 0).all()
    torch.testing.assert_close(m * w, x, rtol=2e-6, atol=1e-30)
    m64, w64 = m.double(), w.double()
    torch.testing.assert_close(m64 ** 2 - w64 ** 2, torch.full_like(m64, beta), rtol=1e-5, atol=1e-5 * max(1, beta))
    if beta == 0:  # spred: m = sqrt|x|, w = sign(x) sqrt|x|, zeros stay (0, 0)
        torch.testing.assert_close(m, x.abs().sqrt())
        torch.testing.assert_close(w, x.sign() * x.abs().sqrt())


def test_construction_overwrites_factorised_parameters_with_m0_w0() -> None:
    model = SmallCNN()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.1, beta=0.5)
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        if p.ndim >= 2:
            m0, w0 = factorise(before[name], 0.5)
            assert torch.equal(state["m"], m0) and torch.equal(state["w"], w0)
            assert torch.equal(p.detach(), m0 * w0)
            assert state["momentum_buffer_m"] is None and state["momentum_buffer_w"] is None
        else:
            assert set(state) == {"momentum_buffer"} and torch.equal(p.detach(), before[name])


# ---------------------------------------------------------------- the Triton path and telemetry


def test_auto_takes_the_triton_kernel_once_per_device_dtype_group(monkeypatch: pytest.MonkeyPatch) -> None:
    launches = []
    kernel = pilot_kernels.pilot_sgd_kernel
    original = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: launches.append(k["grid"]) or original(*a, **k))
    model = SmallCNN()
    model.conv2.to(torch.bfloat16)
    optimizer = FusedPILoTSGD([{"params": [model.conv.weight, model.conv2.weight]},
                               {"params": [p for n, p in model.named_parameters() if n not in ("conv.weight",
                                                                                                "conv2.weight")],
                                "lr": 0.01}], lr=0.1, momentum=0.9, alpha=1e-3)
    x = torch.randn(4, 3, 6, 6)
    for step in range(3):
        optimizer.zero_grad()
        h = torch.relu(model.bn(model.conv(x)))
        model.head(torch.relu(model.conv2(h.bfloat16())).float().flatten(1)).sum().backward()
        optimizer.step()
        assert len(launches) == 2 * (step + 1)  # one per (device, dtype): fp32 and bf16, across both groups


@pytest.mark.parametrize("backend", BACKENDS)
def test_telemetry_equals_torch_sums(backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 41), nn.ReLU(), nn.Linear(41, 3))
    with torch.no_grad():
        model[0].weight[::3] = 0  # spred keeps exact zeros at (0, 0): a fixed point of the step
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.1, momentum=0.9, alpha=1e-3, beta=0.0, backend=backend)
    weights = [model[0].weight, model[2].weight]

    def check() -> None:
        l1 = sum(w.detach().double().abs().sum().item() for w in weights)
        nonzero = sum(torch.count_nonzero(w).item() for w in weights)
        assert optimizer.l1_norm() == pytest.approx(l1, rel=1e-6)
        assert optimizer.density() == nonzero / sum(w.numel() for w in weights)

    check()  # from the initialisation
    z = torch.randn(16, 50)
    for _ in range(5):
        optimizer.zero_grad()
        model(z).square().mean().backward()
        optimizer.step()
        check()
    assert optimizer.density() < 0.7


def test_density_without_factorised_parameters_is_nan() -> None:
    optimizer = FusedPILoTSGD(nn.Linear(3, 2).parameters(), reparam=False)
    assert optimizer.l1_norm() == 0.0 and optimizer.density() != optimizer.density()


# ---------------------------------------------------------------- state dicts


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_and_bit_identical_resume(backend: str) -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, alpha=1e-2, backend=backend)
    train(model, optimizer, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)

    train(model, optimizer, 6, seed=3)  # the run that never stopped

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed_model = SmallCNN()
    resumed = FusedPILoTSGD(resumed_model.parameters(), lr=1.0, backend=backend)  # hyper-parameters come back too
    resumed.load_state_dict(checkpoint["optimizer"])
    resumed_model.load_state_dict(checkpoint["model"])
    assert resumed.param_groups[0]["lr"] == 0.05 and resumed.param_groups[0]["nesterov"]
    train(resumed_model, resumed, 6, seed=3)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


def test_state_dict_keeps_fp32_factors_of_a_bf16_model() -> None:
    model = nn.Linear(8, 8).to(torch.bfloat16)
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.1, momentum=0.9, backend="eager")
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    other = FusedPILoTSGD(nn.Linear(8, 8).to(torch.bfloat16).parameters(), backend="eager")
    other.load_state_dict(state_dict)
    restored = other.state[other.param_groups[0]["params"][0]]
    assert restored["m"].dtype == torch.float32
    assert torch.equal(restored["m"], optimizer.state[model.weight]["m"])
    assert torch.equal(restored["momentum_buffer_w"], optimizer.state[model.weight]["momentum_buffer_w"])
    # the parameter follows the loaded factors: round(m * w)
    assert torch.equal(other.param_groups[0]["params"][0].detach(), (restored["m"] * restored["w"]).bfloat16())


def test_load_state_dict_rejects_mismatches() -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), momentum=0.9)
    train(model, optimizer, 1)
    state_dict = optimizer.state_dict()

    with pytest.raises(ValueError, match="parameter groups"):
        FusedPILoTSGD([{"params": [model.conv.weight]}, {"params": [model.head.weight]}]).load_state_dict(state_dict)
    with pytest.raises(ValueError, match="size of optimizer.s group"):  # torch's own check
        FusedPILoTSGD([model.conv.weight, model.head.weight]).load_state_dict(state_dict)
    other = SmallCNN()
    other.head = nn.Linear(80, 9)  # a different model with as many parameters
    with pytest.raises(ValueError, match="shape"):
        FusedPILoTSGD(other.parameters()).load_state_dict(state_dict)
    dense_model = SmallCNN()
    dense = torch.optim.SGD(dense_model.parameters(), lr=0.1, momentum=0.9)
    train(dense_model, dense, 1)
    with pytest.raises(ValueError, match="dense torch.optim.SGD"):
        FusedPILoTSGD(SmallCNN().parameters()).load_state_dict(dense.state_dict())
    missing = copy.deepcopy(state_dict)
    del missing["state"][0]["w"]
    with pytest.raises(ValueError, match="no factors"):
        FusedPILoTSGD(SmallCNN().parameters()).load_state_dict(missing)


# ---------------------------------------------------------------- torch.optim conventions


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group(backend: str) -> None:
    specs = [(["conv.weight", "conv.bias", "bn.weight", "bn.bias", "conv2.weight"], dict(lr=0.05, momentum=0.9,
                                                                                          alpha=1e-2))]
    pair = build_pair(SmallCNN(), specs, backend=backend)
    loss = cnn_loss()
    pair.step(loss)
    before = pair.fused_model.head.weight.detach().clone()
    pair.fused.add_param_group({"params": [pair.fused_model.head.weight, pair.fused_model.head.bias], "lr": 0.02,
                                "momentum": 0.9, "alpha": 5e-3})
    m0, w0 = factorise(before, 1.0)
    assert torch.equal(pair.fused.state[pair.fused_model.head.weight]["m"], m0)
    # mirror it in the reference: parametrise the head now, from the same value
    from pilot.reference import factor_pairs, parametrize_model
    parametrize_model(pair.ref_model.head, select=lambda name, _: name == "weight")
    m, w = factor_pairs(pair.ref_model.head)["weight"]
    pair.ref.add_param_group({"params": [m, w], "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-3})
    pair.ref.add_param_group({"params": [pair.ref_model.head.bias], "lr": 0.02, "momentum": 0.9})
    pair.factorised.add("head.weight")
    for _ in range(5):
        pair.step(loss)
    pair.assert_close()


def test_zero_grad_closure_and_grads_none() -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.1, momentum=0.9, alpha=1e-3)
    loss_fn = cnn_loss()
    snapshot = [p.detach().clone() for p in model.parameters()]
    assert optimizer.step() is None  # no gradients at all: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snapshot))

    def closure() -> torch.Tensor:
        assert torch.is_grad_enabled()
        optimizer.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert loss.requires_grad and loss.item() > 0
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), snapshot))
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    optimizer.zero_grad(set_to_none=False)


def test_lr_scheduler_drives_the_optimizer() -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(model, optimizer, 1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.05


def test_parameter_written_outside_the_optimizer_is_refactorised() -> None:
    """The model is the source of truth: entries changed by hand are factorised again from their new value."""
    model = nn.Linear(20, 10)
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.1, momentum=0.9, alpha=1e-3, backend="eager")
    model(torch.randn(4, 20)).sum().backward()
    optimizer.step()
    state = optimizer.state[model.weight]
    m_before = state["m"].clone()
    with torch.no_grad():
        model.weight[0] = 0.5  # e.g. a model.load_state_dict or manual surgery
    assert optimizer.l1_norm() == pytest.approx(model.weight.detach().abs().sum().item(), rel=1e-6)
    m0, w0 = factorise(torch.full((20,), 0.5), 1.0)
    assert torch.equal(state["m"][0], m0) and torch.equal(state["w"][0], w0)
    assert torch.equal(state["m"][1:], m_before[1:])  # untouched rows keep their factors
    assert (state["momentum_buffer_m"][0] == 0).all()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(alpha=-1e-4), "alpha"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=float("inf")), "beta"),
    (dict(nesterov=True), "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
    (dict(reparam="yes"), "reparam"),
    (dict(backend="cuda"), "backend"),
])
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FusedPILoTSGD(nn.Linear(2, 2).parameters(), **kwargs)


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="0-d"):
        FusedPILoTSGD([nn.Parameter(torch.tensor(1.0))], reparam=True)
    with pytest.raises(TypeError, match="dtype"):
        FusedPILoTSGD([torch.zeros(3, 3, dtype=torch.int64)])
    with pytest.raises(TypeError, match="dtype"):
        FusedPILoTSGD([nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))])
    weight = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="twice"):
        FusedPILoTSGD([weight, weight])
    optimizer = FusedPILoTSGD([weight])
    with pytest.raises(ValueError, match="lr"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.randn(3))], "lr": -1})
    assert len(optimizer.param_groups) == 1  # the rejected group left no trace


def test_sparse_gradient_is_rejected() -> None:
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = FusedPILoTSGD(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()


def test_construction_peak_memory_is_the_state_and_one_parameters_temporaries() -> None:
    """Creating the optimizer factorises each parameter straight into the flat storage: its peak is the storage
    (m, w and the two buffers: 16 B per element) plus one parameter's temporaries, not every parameter's m0 and w0
    beside the storage. Measured by the CPU profiler's allocation events (bench.memory)."""
    from bench.memory import peak_step_memory

    count, numel = 8, 2**19
    params = [nn.Parameter(torch.randn(2**9, 2**10)) for _ in range(count)]
    state_bytes = 16 * count * numel
    largest = 4 * numel
    peak = peak_step_memory(lambda: lambda: FusedPILoTSGD(params, lr=0.1, momentum=0.9, alpha=1e-3),
                            torch.device("cpu"), warmup=0)
    assert state_bytes <= peak <= state_bytes + 8 * largest, (peak - state_bytes) / largest
