"""Models for PILoT sparse training experiments, built by name with :func:`build_model`.

=================  ==========================================================================
name               model
=================  ==========================================================================
``resnet20``       CIFAR ResNet-20 (He et al. 2016, option-A shortcuts), 0.27M parameters
``resnet32``       CIFAR ResNet-32, 0.46M parameters
``resnet56``       CIFAR ResNet-56, 0.85M parameters
``resnet18-cifar`` CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool), 11.2M parameters
``resnet18``       torchvision ImageNet ResNet-18, 11.7M parameters at 1000 classes
``resnet50``       torchvision ImageNet ResNet-50, 25.6M parameters at 1000 classes
``lenet300-100``   LeNet-300-100 MLP, 266,610 parameters for 28x28x1 inputs and 10 classes
=================  ==========================================================================

All models take ``num_classes`` and ``in_channels``; the ResNets pool adaptively and accept any
input of at least ~8x8 pixels (28x28 Fashion-MNIST included). Weights are Kaiming-normal
initialised (see :mod:`pilot.models.init`).
"""

from collections.abc import Callable

from torch import nn

from pilot.models.cifar_resnet import BasicBlock, CifarResNet, CifarResNet18, ZeroPadShortcut
from pilot.models.imagenet_resnet import imagenet_resnet18, imagenet_resnet50
from pilot.models.init import init_weights
from pilot.models.mlp import LeNet300100

_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "resnet20": lambda num_classes, in_channels, input_size: CifarResNet(20, num_classes, in_channels),
    "resnet32": lambda num_classes, in_channels, input_size: CifarResNet(32, num_classes, in_channels),
    "resnet56": lambda num_classes, in_channels, input_size: CifarResNet(56, num_classes, in_channels),
    "resnet18-cifar": lambda num_classes, in_channels, input_size: CifarResNet18(num_classes, in_channels),
    "resnet18": lambda num_classes, in_channels, input_size: imagenet_resnet18(num_classes, in_channels),
    "resnet50": lambda num_classes, in_channels, input_size: imagenet_resnet50(num_classes, in_channels),
    "lenet300-100": lambda num_classes, in_channels, input_size: LeNet300100(num_classes, in_channels, input_size),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """Build the freshly initialised model called ``name`` (one of :data:`MODEL_NAMES`).

    ``input_size`` (image height = width) only matters for ``lenet300-100``, whose first layer
    has ``in_channels * input_size**2`` inputs; the ResNets accept any size of at least ~8.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    for arg_name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg_name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{arg_name} must be >= 1, got {value}")
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return builder(num_classes, in_channels, input_size)


__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "CifarResNet",
    "CifarResNet18",
    "LeNet300100",
    "ZeroPadShortcut",
    "build_model",
    "imagenet_resnet18",
    "imagenet_resnet50",
    "init_weights",
]
