"""prune_: exact counts (global / layer, odd sizes, ties), zeros that stay zero through steps with momentum on every
backend and for plain optimizers; sparsity reports; export into torch.nn.utils.prune."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pilot import (FusedPILoTSGD, ProxSGD, apply_masks_, export_masks, export_sparse, is_factorised, prune_,
                   sparsity_report, to_torch_prune)
from pilot.pruning import batchnorm_after, keep_mask, prunable_parameters, pruning_masks, pruning_scores
from test_parity import BACKENDS, SmallCNN, cnn_loss


class OddSizes(nn.Module):
    """Prunable tensors of 21, 45 and 143 entries holding few distinct values: many ties, some zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randint(-3, 4, (7, 3)).float())
        self.b = nn.Parameter(torch.randint(-3, 4, (5, 1, 3, 3)).float())
        self.c = nn.Parameter(torch.randint(-3, 4, (11, 13)).float())
        self.bias = nn.Parameter(torch.zeros(5))  # 1-D: never pruned


def zeros(tensors) -> int:
    return sum(int((t.detach() == 0).sum()) for t in tensors)


def assert_smallest_pruned(kept: list[torch.Tensor], pruned: list[torch.Tensor]) -> None:
    kept_values = torch.cat([k.reshape(-1) for k in kept])
    pruned_values = torch.cat([p.reshape(-1) for p in pruned])
    if kept_values.numel() and pruned_values.numel():
        assert kept_values.abs().min() >= pruned_values.abs().max()


def test_keep_mask_breaks_ties_by_position() -> None:
    scores = torch.tensor([2.0, 1.0, 1.0, 0.5, 1.0, 1.0, 3.0])
    assert keep_mask(scores, 3).tolist() == [True, False, False, False, True, True, True]
    assert keep_mask(torch.ones(2, 3), 4).tolist() == [[False, False, False], [False, True, True]]
    assert keep_mask(scores, 0).all() and not keep_mask(scores, 7).any()
    with pytest.raises(ValueError, match="num_pruned"):
        keep_mask(scores, 8)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.999, 1.0])
def test_global_count_is_exact_with_ties(sparsity: float) -> None:
    model = OddSizes()
    weights = [model.a, model.b, model.c]
    before = [w.detach().clone() for w in weights]
    total = sum(w.numel() for w in weights)
    assert zeros(weights) <= round(sparsity * total) or sparsity == 0.0
    count = prune_(model, sparsity)
    assert count == zeros(weights) == max(round(sparsity * total), zeros(before))
    assert zeros([model.bias]) == 5 and model.bias.numel() == 5
    assert_smallest_pruned([b[w != 0] for b, w in zip(before, weights)], [b[w == 0] for b, w in zip(before, weights)])
    for b, w in zip(before, weights):  # kept entries are untouched
        assert torch.equal(w.detach()[w != 0], b[w != 0])


@pytest.mark.parametrize("sparsity", [0.4, 0.9])
def test_layer_count_is_exact_with_ties(sparsity: float) -> None:
    model = OddSizes()
    weights = [model.a, model.b, model.c]
    before = [w.detach().clone() for w in weights]
    prune_(model, sparsity, scope="layer")
    for b, w in zip(before, weights):
        assert zeros([w]) == round(sparsity * w.numel())
        assert_smallest_pruned([b[w != 0]], [b[w == 0]])


def test_pruning_masks_are_deterministic() -> None:
    tensors = [torch.ones(3, 3), torch.ones(4)]
    masks = pruning_masks(tensors, 0.5)  # 6 of 13 ties: the first six in concatenated order
    assert masks[0].sum() == 3 and masks[1].all()
    assert masks[0].reshape(-1).tolist() == [False] * 6 + [True] * 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruned_factors_stay_zero_with_momentum(backend: str, scope: str) -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, alpha=1e-3,
                              weight_decay=1e-3, backend=backend)
    loss = cnn_loss()
    for _ in range(3):  # momentum buffers exist and are non-zero before pruning
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
    weights = [p for p in model.parameters() if is_factorised(optimizer, p)]
    total = sum(w.numel() for w in weights)
    count = prune_(optimizer, 0.6, scope=scope)
    expected = round(0.6 * total) if scope == "global" else sum(round(0.6 * w.numel()) for w in weights)
    assert count == zeros(weights) == expected
    masks = [w.detach() == 0 for w in weights]
    assert optimizer.density() == pytest.approx(1 - expected / total)
    for _ in range(4):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
    for w, pruned in zip(weights, masks):
        assert torch.equal(w.detach() == 0, pruned), "pruned entries must stay zero, the others must move on"
        for key in ("m", "w", "momentum_buffer_m", "momentum_buffer_w"):
            assert not optimizer.state[w][key][pruned].any(), key
    assert optimizer.density() == pytest.approx(1 - expected / total)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    lambda params: ProxSGD(params, lr=0.05, momentum=0.9, l1=1e-3),
], ids=["sgd", "prox-sgd"])
def test_plain_optimizers_keep_pruned_entries_zero(make_optimizer) -> None:
    model = SmallCNN()
    optimizer = make_optimizer(model.parameters())
    loss = cnn_loss()
    for step in range(6):
        if step == 2:
            count = prune_(optimizer, 0.5)
            weights = [p for p in model.parameters() if p.ndim >= 2]
            masks = [w.detach() == 0 for w in weights]
            assert count == round(0.5 * sum(w.numel() for w in weights))
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
    for w, pruned in zip(weights, masks):
        assert not w.detach()[pruned].any()
        assert not optimizer.state[w]["momentum_buffer"][pruned].any()
    assert zeros(weights) >= count


def test_apply_masks_to_a_fresh_optimizer() -> None:
    model = SmallCNN()
    masks = {name: torch.rand_like(p) > 0.3 for name, p in model.named_parameters() if p.ndim >= 2}
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.1, alpha=1e-2, beta=1.0, backend="eager")
    apply_masks_(model, masks, optimizer)
    for name, keep in masks.items():
        p = model.get_parameter(name)
        assert not p.detach()[~keep].any()
        assert not optimizer.state[p]["m"][~keep].any() and not optimizer.state[p]["w"][~keep].any()
    with pytest.raises(ValueError, match="shape"):
        apply_masks_(model, {"conv.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_bad_arguments() -> None:
    model = SmallCNN()
    with pytest.raises(ValueError, match="sparsity"):
        prune_(model, 1.5)
    with pytest.raises(ValueError, match="scope"):
        prune_(model, 0.5, scope="block")
    with pytest.raises(TypeError, match="target"):
        prune_([model.conv.weight], 0.5)


def test_sparsity_report() -> None:
    model = SmallCNN()
    prune_(model, 0.75, scope="layer")
    report = sparsity_report(model)
    names = [layer.name for layer in report.layers]
    assert names == ["conv.weight", "conv2.weight", "head.weight"]
    for layer in report.layers:
        weight = model.get_parameter(layer.name)
        assert (layer.zeros, layer.total) == (zeros([weight]), weight.numel())
    assert report.total == sum(layer.total for layer in report.layers)
    assert report.sparsity == pytest.approx(report.zeros / report.total)
    table = str(report)
    assert "conv2.weight" in table and "global" in table and f"{report.zeros:,}" in table
    everything = sparsity_report(model, select=lambda name, t: True)
    assert "conv.bias" in [layer.name for layer in everything.layers]


def test_export_loads_into_torch_prune() -> None:
    model = SmallCNN()
    optimizer = FusedPILoTSGD(model.parameters(), lr=0.05, momentum=0.9, alpha=1e-3, backend="eager")
    prune_(optimizer, 0.8)
    state_dict, masks = export_sparse(model)
    assert set(masks) == {"conv.weight_mask", "conv2.weight_mask", "head.weight_mask"}
    for key, mask in masks.items():
        weight = state_dict[key.replace("_mask", "")]
        assert mask.dtype == weight.dtype and torch.equal(mask == 0, weight == 0)
    assert export_masks(model).keys() == masks.keys()

    fresh = SmallCNN()
    fresh.load_state_dict(state_dict)
    to_torch_prune(fresh, masks)
    pruned_state = fresh.state_dict()
    for key, mask in masks.items():
        assert torch.equal(pruned_state[key], mask)  # the very buffer torch.nn.utils.prune registers
    x = torch.randn(4, 3, 6, 6)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    sgd = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # torch's pruning keeps the zeros while fine-tuning the exported model
        sgd.zero_grad()
        cnn_loss()(fresh).backward()
        sgd.step()
    for key, mask in masks.items():
        weight = fresh.get_submodule(key.rsplit(".", 1)[0]).weight
        assert not weight.detach()[mask == 0].any()
    with pytest.raises(ValueError, match="mask name"):
        to_torch_prune(copy.deepcopy(model), {"conv.weight": torch.ones(6, 3, 3, 3)})


# ---------------------------------------------------------------------------------------------- BN-folded scores

class ConvBNNet(nn.Module):
    """conv -> BN -> relu -> conv -> BN, a conv whose output also feeds a skip (not foldable), and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y = self.conv3(x)
        x = self.bn3(y) + y  # conv3's output is used twice: folding its BatchNorm would not be exact
        return self.head(x.mean(dim=(2, 3)))


def trained_conv_bn_net() -> ConvBNNet:
    torch.manual_seed(0)
    net = ConvBNNet()
    with torch.no_grad():
        for norm in (net.bn1, net.bn2, net.bn3):
            norm.weight.uniform_(-2, 2)
            norm.running_var.uniform_(0.01, 4)
    return net


def test_bn_folded_scores_are_the_folded_weights() -> None:
    net = trained_conv_bn_net()
    assert set(batchnorm_after(net)) == {"conv1.weight", "conv2.weight"}
    scores = pruning_scores(net, "bn-folded")
    # Folding by hand: BatchNorm in eval mode is y = gamma * (z - mean) / sqrt(var + eps) + beta, so the folded
    # conv weight is w * gamma / sqrt(var + eps) per output channel.
    for score, (conv, norm) in zip(scores[:2], ((net.conv1, net.bn1), (net.conv2, net.bn2))):
        folded = torch.stack([conv.weight[c] * norm.weight[c] / math.sqrt(norm.running_var[c] + norm.eps)
                              for c in range(4)])
        torch.testing.assert_close(score, folded.abs().detach())
    torch.testing.assert_close(scores[2], net.conv3.weight.abs().detach())
    torch.testing.assert_close(scores[3], net.head.weight.abs().detach())
    assert [s.shape for s in pruning_scores(net)] == [p.shape for p in prunable_parameters(net)[0]]


def test_bn_folded_pruning_ignores_a_layer_scale_that_batchnorm_undoes() -> None:
    """Shrinking conv1 1000x (and its BatchNorm's statistics with it, as training under BatchNorm would) changes
    neither the function nor which entries bn-folded pruning keeps, while magnitude pruning empties conv1."""
    net = trained_conv_bn_net()
    shrunk = trained_conv_bn_net()
    with torch.no_grad():
        shrunk.conv1.weight.mul_(1e-3)
        shrunk.bn1.running_var.mul_(1e-6)
        shrunk.bn1.eps *= 1e-6
    inputs = torch.randn(2, 3, 6, 6)
    net.eval(), shrunk.eval()
    torch.testing.assert_close(shrunk(inputs), net(inputs))
    kept = {}
    for name, model in (("net", net), ("shrunk", shrunk)):
        copy_ = copy.deepcopy(model)
        prune_(copy_, 0.6, scores=pruning_scores(model, "bn-folded"))
        kept[name] = [p != 0 for p in prunable_parameters(copy_)[0]]
    assert all(torch.equal(a, b) for a, b in zip(kept["net"], kept["shrunk"]))
    magnitude = copy.deepcopy(shrunk)
    prune_(magnitude, 0.6)
    assert int((magnitude.conv1.weight != 0).sum()) == 0  # layer collapse


def test_bad_scores_and_untraceable_models() -> None:
    net = trained_conv_bn_net()
    with pytest.raises(ValueError, match="scores must match"):
        prune_(net, 0.5, scores=[torch.ones(3)])
    with pytest.raises(ValueError, match="criterion"):
        pruning_scores(net, "movement")

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ValueError, match="cannot trace Untraceable"):
        pruning_scores(Untraceable(), "bn-folded")
