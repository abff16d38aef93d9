"""FusedPILoTSGD against the eager reference (parametrize + torch.optim.SGD), on every backend."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from parity import build_pair

BACKENDS = ["triton", "compile", "eager"]  # triton runs in Triton's interpreter here (conftest.py)
STEPS = 20


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, bias=False)
        self.head = nn.Linear(5 * 4 * 4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.conv2(x)).flatten(1))


class Sizes(nn.Module):
    """Parameters of 1, 7, 1023 and 4099 elements: single elements, tails, and several full blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(1, 1))
        self.b = nn.Parameter(torch.randn(7))
        self.c = nn.Parameter(torch.randn(31, 33))
        self.d = nn.Parameter(torch.randn(4099) * 0.1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.a.sum() * z[:, :1]) ** 2).mean() + (z[:, :7] * self.b).pow(2).mean() + \
            (self.c.sum(1)[:7] * z[:, 7:14]).sin().mean() + (self.d[:4096].view(64, 64) @ z[:, :64].T).tanh().mean()


def cnn_loss(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 6, 6, generator=generator)
    y = torch.randint(0, 7, (8,), generator=generator)
    return lambda model: nn.functional.cross_entropy(model(x), y)


def sizes_loss():
    z = torch.randn(5, 64)
    return lambda model: model(z)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.9, nesterov=True, alpha=1e-3),
    dict(lr=0.05, momentum=0.5, dampening=0.3, alpha=5e-3, weight_decay=5e-4),
    dict(lr=0.05, momentum=0.9, maximize=True, alpha=1e-2),
    dict(lr=0.1, alpha=1e-2, weight_decay=1e-2),  # plain gradient descent, no buffers
], ids=["momentum", "nesterov", "dampening", "maximize", "no-momentum"])
def test_cnn_with_batchnorm(backend: str, options: dict) -> None:
    torch.manual_seed(0)
    pair = build_pair(SmallCNN(), [(None, options)], backend=backend)
    assert pair.factorised == {"conv.weight", "conv2.weight", "head.weight"}
    loss = cnn_loss()
    maximize = options.get("maximize", False)
    for _ in range(STEPS):
        pair.step(lambda model: -loss(model) if maximize else loss(model))
    pair.assert_close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
def test_sizes_reparam_everything(backend: str, beta: float) -> None:
    pair = build_pair(Sizes(), [(None, dict(lr=0.1, momentum=0.9, alpha=1e-2))], backend=backend, beta=beta,
                      reparam=True)
    assert pair.factorised == {"a", "b", "c", "d"}
    loss = sizes_loss()
    for _ in range(STEPS):
        pair.step(loss)
    pair.assert_close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_groups_and_schedule_edits(backend: str) -> None:
    """Different lr / alpha / momentum per group; lr and alpha changed between steps as schedulers do."""
    specs = [(["conv.weight", "conv.bias", "head.weight"], dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-3)),
             (None, dict(lr=0.02, momentum=0.0, alpha=3e-3, weight_decay=0.0))]
    pair = build_pair(SmallCNN(), specs, backend=backend)
    loss = cnn_loss(seed=2)
    for step in range(STEPS + 5):
        pair.set_group(0, lr=0.05 * 0.9 ** step, alpha=1e-2 * 1.1 ** step)
        pair.set_group(1, alpha=3e-3 / (step + 1))
        if step == 10:
            pair.set_group(1, momentum=0.8)  # momentum switched on mid-run: its first step takes b = g
        pair.step(loss)
    pair.assert_close()


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)
        self.use_b = True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.a(z) + self.b(z) if self.use_b else self.a(z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_without_grad_are_skipped(backend: str) -> None:
    """A branch outside the loss keeps its value and state; its first momentum step comes with its first grad."""
    pair = build_pair(TwoBranches(), [(None, dict(lr=0.05, momentum=0.9, alpha=1e-2, weight_decay=1e-2))],
                      backend=backend)
    z, target = torch.randn(9, 6), torch.randn(9, 4)
    loss = lambda model: (model(z) - target).square().mean()  # noqa: E731
    frozen = pair.fused_model.b.weight
    before = frozen.detach().clone()
    for model in (pair.fused_model, pair.ref_model):
        model.use_b = False
    for _ in range(5):
        pair.step(loss)
    assert frozen.grad is None and torch.equal(frozen.detach(), before)
    assert pair.fused.state[frozen]["momentum_buffer_m"] is None
    for model in (pair.fused_model, pair.ref_model):
        model.use_b = True
    for _ in range(5):
        pair.step(loss)
    pair.assert_close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_bf16_and_fp32(backend: str) -> None:
    """A bf16 conv in an fp32 model: two buckets; factors and buffers stay fp32; x = round(m * w) in bf16."""
    torch.manual_seed(0)
    model = SmallCNN()
    model.conv2.to(torch.bfloat16)  # bias-free, so every plain parameter stays fp32 like the reference's
    pair = build_pair(model, [(None, dict(lr=0.05, momentum=0.9, alpha=1e-2))], backend=backend)
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(5))

    def loss(m: nn.Module) -> torch.Tensor:
        h = torch.relu(m.bn(m.conv(x)))
        return m.head(torch.relu(m.conv2(h.bfloat16())).float().flatten(1)).square().mean()

    for _ in range(10):
        pair.step(loss)
    p = pair.fused_model.conv2.weight
    state = pair.fused.state[p]
    assert p.dtype == torch.bfloat16
    assert state["m"].dtype == state["momentum_buffer_m"].dtype == torch.float32
    rounded = (state["m"] * state["w"]).to(torch.bfloat16)
    if backend == "triton":  # the interpreter truncates fp32 -> bf16: within one bf16 ulp of round-to-nearest
        assert ((p.detach().float() - rounded.float()).abs() <= rounded.float().abs() * 2 ** -7).all()
    else:
        assert torch.equal(p.detach(), rounded)
    # bf16 rounding of x feeds back into the gradients: bf16 tolerance.
    pair.assert_close(rtol=2e-2, atol=2e-3)
