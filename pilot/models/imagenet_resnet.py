"""torchvision's ImageNet ResNet-18 / ResNet-50 (7x7 stride-2 stem + max-pool, 224x224 inputs).

They are built untrained (``weights=None``) with ``num_classes`` outputs; for ``in_channels != 3``
the stem conv is replaced by one with the requested input channels. All weights are then
re-initialised with :func:`pilot.models.init.init_weights` so every model in the package shares
one init (torchvision's own conv/BN init is identical; its Linear head init differs). The
adaptive average pool makes small inputs such as 28x28 work too (the last stage sees 1x1).
"""

from collections.abc import Callable

import torchvision
from torch import nn

from pilot.models.init import init_weights


def _build(
    factory: Callable[..., torchvision.models.ResNet], num_classes: int, in_channels: int
) -> torchvision.models.ResNet:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    model = factory(weights=None, num_classes=num_classes)
    if in_channels != 3:
        stem = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels, stem.out_channels, stem.kernel_size, stride=stem.stride, padding=stem.padding, bias=False
        )
    return init_weights(model)


def imagenet_resnet18(num_classes: int = 1000, in_channels: int = 3) -> torchvision.models.ResNet:
    """torchvision ResNet-18 (11.7M parameters at 1000 classes), untrained."""
    return _build(torchvision.models.resnet18, num_classes, in_channels)


def imagenet_resnet50(num_classes: int = 1000, in_channels: int = 3) -> torchvision.models.ResNet:
    """torchvision ResNet-50 (25.6M parameters at 1000 classes), untrained."""
    return _build(torchvision.models.resnet50, num_classes, in_channels)
