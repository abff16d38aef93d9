"""Tests for pilot.models: shapes, parameter counts, initialisation, gradients, factory errors."""

import math

import pytest
import torch
from torch import nn

from pilot.models import MODEL_NAMES, CifarResNet, LeNet300100, ZeroPadShortcut, build_model

# (in_channels, image size) pairs every model must accept: Fashion-MNIST and CIFAR.
INPUT_SHAPES = [(1, 28), (3, 32)]


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_model_names_are_the_documented_ones():
    assert MODEL_NAMES == ("resnet20", "resnet32", "resnet56", "resnet18-cifar", "resnet18", "resnet50", "lenet300-100")


@pytest.mark.parametrize("in_channels,size", INPUT_SHAPES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_gives_one_logit_per_class(name, in_channels, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels, input_size=size)
    logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "name,num_classes,expected",
    [
        # He et al. (2016), Table 6: 0.27M, 0.46M, 0.85M (option-A shortcuts add no parameters).
        ("resnet20", 10, 269_722),
        ("resnet32", 10, 464_154),
        ("resnet56", 10, 853_018),
        ("resnet18-cifar", 10, 11_173_962),
        # torchvision's published counts for the ImageNet models.
        ("resnet18", 1000, 11_689_512),
        ("resnet50", 1000, 25_557_032),
        # 784*300+300 + 300*100+100 + 100*10+10
        ("lenet300-100", 10, 266_610),
    ],
)
def test_parameter_counts_match_known_values(name, num_classes, expected):
    in_channels, input_size = (1, 28) if name == "lenet300-100" else (3, 32)
    model = build_model(name, num_classes, in_channels=in_channels, input_size=input_size)
    assert count_parameters(model) == expected


def test_option_b_shortcut_adds_projection_parameters():
    option_a = CifarResNet(20, shortcut="A")
    option_b = CifarResNet(20, shortcut="B")
    assert not any(m.kernel_size == (1, 1) for m in option_a.modules() if isinstance(m, nn.Conv2d))
    # Two projections (16->32, 32->64), each a 1x1 conv plus BatchNorm weight and bias.
    assert count_parameters(option_b) - count_parameters(option_a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_zero_pad_shortcut_subsamples_and_pads_with_zero_channels():
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_conv_and_linear_weights_are_kaiming_normal():
    torch.manual_seed(0)
    model = build_model("resnet56", 10)
    conv = model.layer3[1].conv1  # 64 -> 64, 3x3: 36,864 weights, so the sample std is within ~1%
    expected_conv_std = math.sqrt(2.0 / (conv.out_channels * 9))  # fan_out mode
    assert conv.weight.std().item() == pytest.approx(expected_conv_std, rel=0.03)
    assert abs(conv.weight.mean().item()) < 0.03 * expected_conv_std  # zero-mean: sample mean ~ std / 192

    lenet = build_model("lenet300-100", 10, in_channels=1, input_size=28)
    assert lenet.fc1.weight.std().item() == pytest.approx(math.sqrt(2.0 / 784), rel=0.03)  # fan_in mode
    assert torch.count_nonzero(lenet.fc1.bias) == 0

    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in batch_norms)


def test_torchvision_models_use_the_same_init_and_requested_input_channels():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model.fc.weight.std().item() == pytest.approx(math.sqrt(2.0 / 512), rel=0.05)
    stage4_conv = model.layer4[1].conv2
    assert stage4_conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (512 * 9)), rel=0.03)


@pytest.mark.parametrize("name", ["resnet20", "resnet18-cifar", "lenet300-100"])
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels=1, input_size=28)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_lenet_input_size_sets_first_layer_and_mismatch_is_reported():
    lenet = build_model("lenet300-100", 100, in_channels=3, input_size=32)
    assert lenet.fc1.in_features == 3 * 32 * 32
    with pytest.raises(ValueError, match="3072 input features"):
        lenet(torch.randn(2, 1, 28, 28))


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet20.*lenet300-100"):
        build_model("resnet19", 10)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"num_classes": 0}, ValueError),
        ({"num_classes": 10, "in_channels": 0}, ValueError),
        ({"num_classes": 10, "input_size": -1}, ValueError),
        ({"num_classes": 10.0}, TypeError),
        ({"num_classes": True}, TypeError),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match="num_classes|in_channels|input_size"):
        build_model("resnet20", **kwargs)


@pytest.mark.parametrize("depth", [0, 19, 21])
def test_cifar_resnet_rejects_depths_not_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth)


def test_lenet_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="input_size"):
        LeNet300100(10, 1, 0)
