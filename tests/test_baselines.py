"""Baselines: the proximal (LASSO) step against the closed-form soft-threshold, STR's forward / backward against a
hand computation, its conversion, parameter groups and baking, and spred's balanced init."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pilot import (ProxSGD, SoftThreshold, lasso_param_groups, remove_str_, soft_threshold, sparsity_report,
                   spred_optimizer, str_param_groups, to_str_model)
from test_parity import SmallCNN, cnn_loss


def test_soft_threshold_closed_form() -> None:
    x = torch.tensor([-2.0, -0.5, -0.4, 0.0, 0.3, 1.5])
    assert torch.allclose(soft_threshold(x, 0.4), torch.tensor([-1.6, -0.1, 0.0, 0.0, 0.0, 1.1]))


def test_prox_step_without_momentum_is_ista() -> None:
    x = nn.Parameter(torch.tensor([[1.0, -0.2], [0.05, -3.0]]))
    other = nn.Parameter(torch.tensor([0.01, -0.01]))
    optimizer = ProxSGD([{"params": [x]}, {"params": [other], "l1": 0.0}], lr=0.1, l1=0.5)
    x.grad = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    other.grad = torch.tensor([1.0, 1.0])
    optimizer.step()
    # x - lr * g = [[0.8, -0.25], [0.15, -3.1]], then sign * max(|.| - lr * l1 = 0.05, 0)
    assert torch.allclose(x.detach(), torch.tensor([[0.75, -0.2], [0.1, -3.05]]))
    assert torch.allclose(other.detach(), torch.tensor([-0.09, -0.11]))  # l1 = 0: plain SGD
    assert optimizer.param_groups[0]["l1"] == 0.5 and optimizer.defaults["l1"] == 0.5


def test_prox_step_with_momentum_thresholds_torch_sgd() -> None:
    torch.manual_seed(0)
    model, reference = SmallCNN(), SmallCNN()
    reference.load_state_dict(model.state_dict())
    optimizer = ProxSGD(lasso_param_groups(model, l1=0.3, weight_decay=1e-2), lr=0.05, momentum=0.9)
    sgd = torch.optim.SGD([{"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": 0.0},
                           {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 1e-2}],
                          lr=0.05, momentum=0.9)
    loss = cnn_loss()
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, sgd)):
            opt.zero_grad()
            loss(net).backward()
            opt.step()
        with torch.no_grad():
            for p in reference.parameters():
                if p.ndim >= 2:
                    p.copy_(torch.sign(p) * torch.clamp(p.abs() - 0.05 * 0.3, min=0))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert sparsity_report(model).zeros > 0


def test_prox_sgd_rejects_bad_l1() -> None:
    with pytest.raises(ValueError, match="l1"):
        ProxSGD([nn.Parameter(torch.ones(2))], l1=-1.0)
    with pytest.raises(ValueError, match="l1"):
        ProxSGD([{"params": [nn.Parameter(torch.ones(2))], "l1": float("nan")}])


def test_str_forward_backward_by_hand() -> None:
    layer = nn.Linear(3, 2, bias=False)
    raw = torch.tensor([[0.5, -0.05, -0.3], [0.02, 0.9, -0.12]])
    with torch.no_grad():
        layer.weight.copy_(raw)
    s = math.log(0.1 / 0.9)  # sigmoid(s) = 0.1
    to_str_model(layer, s_init=s)
    threshold = 0.1
    effective = torch.tensor([[0.4, 0.0, -0.2], [0.0, 0.8, -0.02]])  # sign(w) * relu(|w| - 0.1)
    torch.testing.assert_close(layer.weight, effective)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]])
    upstream = torch.tensor([[1.0, -2.0], [0.5, 1.0]])
    torch.testing.assert_close(layer(x), x @ effective.T)
    (layer(x) * upstream).sum().backward()
    grad_effective = upstream.T @ x  # dL/dW_eff
    active = (raw.abs() > threshold).float()
    raw_grad = layer.parametrizations.weight.original.grad
    torch.testing.assert_close(raw_grad, grad_effective * active)  # d W_eff / d w = 1[|w| > sigmoid(s)]
    sigmoid_prime = threshold * (1 - threshold)
    expected_s_grad = -(grad_effective * torch.sign(raw) * active).sum() * sigmoid_prime
    torch.testing.assert_close(layer.parametrizations.weight[0].s.grad, expected_s_grad)


def test_str_conversion_groups_and_baking() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    to_str_model(model, s_init=-3.0)  # threshold 0.047: some weights of this small CNN are below it
    to_str_model(model, s_init=3.0)  # converted layers are left as they are
    thresholds = [m for m in model.modules() if isinstance(m, SoftThreshold)]
    assert len(thresholds) == 3 and all(t.s.item() == -3.0 for t in thresholds)
    groups = str_param_groups(model, weight_decay=5e-4, s_weight_decay=1e-2)
    assert [g["weight_decay"] for g in groups] == [5e-4, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(t.s) for t in thresholds}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    loss = cnn_loss()
    for _ in range(2):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
    report = sparsity_report(model)  # the effective weights, under their plain names
    assert [layer.name for layer in report.layers] == ["conv.weight", "conv2.weight", "head.weight"]
    assert 0 < report.sparsity < 1
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    before = model(x)
    remove_str_(model)
    assert not any(isinstance(m, SoftThreshold) for m in model.modules())
    assert isinstance(model.conv.weight, nn.Parameter)
    torch.testing.assert_close(model(x), before)
    assert sparsity_report(model).zeros == report.zeros
    with pytest.raises(ValueError, match="to_str_model"):
        str_param_groups(model, weight_decay=0.0, s_weight_decay=0.0)
    with pytest.raises(ValueError, match="s_init"):
        SoftThreshold(float("inf"))


def test_spred_is_beta_zero() -> None:
    layer = nn.Linear(4, 3)
    weight = layer.weight.detach().clone()
    optimizer = spred_optimizer(layer.parameters(), alpha=1e-3, lr=0.1, backend="eager")
    state = optimizer.state[layer.weight]
    torch.testing.assert_close(state["m"], weight.abs().sqrt())
    torch.testing.assert_close(state["w"], weight.sign() * weight.abs().sqrt())
    assert optimizer.param_groups[0]["beta"] == 0.0 and optimizer.param_groups[0]["alpha"] == 1e-3
    with pytest.raises(ValueError, match="beta"):
        spred_optimizer(layer.parameters(), alpha=1e-3, beta=1.0)
