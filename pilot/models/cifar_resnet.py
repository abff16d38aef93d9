"""ResNets for 32x32 inputs: the CIFAR ResNet-20/32/56 of He et al. (2016) and the CIFAR ResNet-18.

``CifarResNet`` (He et al. 2016, Sec. 4.2): a 3x3 conv with 16 filters, then three stages
of ``n = (depth - 2) / 6`` basic blocks with 16, 32 and 64 channels (the first block of
stages 2 and 3 halves the resolution with stride 2), global average pooling and a Linear
head. Shortcuts use **option A** by default, as in the paper's CIFAR experiments: identity,
and where the shape changes, stride-2 subsampling plus zero-padding of the new channels,
so shortcuts add no parameters (ResNet-20: 0.27M, ResNet-56: 0.85M parameters). Option B
(1x1 conv + BatchNorm projection where the shape changes) is available via ``shortcut="B"``.

``CifarResNet18``: the widely used CIFAR adaptation of ResNet-18 (as in kuangliu/pytorch-cifar):
a 3x3 stride-1 stem without max-pool, four stages of two basic blocks with 64/128/256/512
channels and option-B projection shortcuts, ~11.2M parameters.

Both pool adaptively, so any input of at least ~8x8 works (e.g. 28x28 Fashion-MNIST).
"""

import torch
import torch.nn.functional as F
from torch import nn

from pilot.models.init import init_weights

SHORTCUT_OPTIONS = ("A", "B")


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_channels} -> {out_channels})")
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Split the padding between both sides as the reference implementation does; either
        # side is equivalent since the padded channels are all zero.
        before = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016, Fig. 2 left)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int, shortcut: str) -> nn.Sequential:
    blocks = [BasicBlock(in_channels, out_channels, stride, shortcut)]
    blocks += [BasicBlock(out_channels, out_channels, 1, shortcut) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _check_common_args(num_classes: int, in_channels: int, shortcut: str) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if shortcut not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut must be one of {SHORTCUT_OPTIONS}, got {shortcut!r}")


class CifarResNet(nn.Module):
    """CIFAR ResNet-``depth`` (depth = 6n + 2: 20, 32, 44, 56, 110, ...) of He et al. (2016)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth}")
        _check_common_args(num_classes, in_channels, shortcut)
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _make_stage(16, 16, blocks_per_stage, 1, shortcut)
        self.layer2 = _make_stage(16, 32, blocks_per_stage, 2, shortcut)
        self.layer3 = _make_stage(32, 64, blocks_per_stage, 2, shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


class CifarResNet18(nn.Module):
    """ResNet-18 adapted to 32x32 inputs: 3x3 stride-1 stem, no max-pool, 64/128/256/512 channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_common_args(num_classes, in_channels, "B")
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _make_stage(64, 64, 2, 1, "B")
        self.layer2 = _make_stage(64, 128, 2, 2, "B")
        self.layer3 = _make_stage(128, 256, 2, 2, "B")
        self.layer4 = _make_stage(256, 512, 2, 2, "B")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))
