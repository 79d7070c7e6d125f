"""The CIFAR ResNet of He et al. 2016 (section 4.2), with option-A shortcuts.

Module names follow akamaster/pytorch_resnet_cifar10 (`conv1`, `bn1`, `layer1.0.conv1`, ...,
`linear`), so its published checkpoints load once the `module.` prefix is stripped. Unlike that
code, the shortcut is a real module rather than a lambda and every op is out of place, so the
model traces with `torch.fx.symbolic_trace` and graph rewrites never see hidden mutation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynify.errors import ModelError

STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels; it has no parameters."""

    def __init__(self, pad_channels: int):
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif stride == 2 and in_planes + 2 * (planes // 4) == planes:
            self.shortcut = PadShortcut(planes // 4)
        else:
            raise ModelError(
                f"An option-A shortcut cannot map {in_planes} channels at stride {stride} to "
                f"{planes} channels; it only doubles the width at stride 2. Use stage widths "
                "that double from one stage to the next."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem, three stages of basic blocks at 16/32/64 channels, global pooling, `linear`."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10):
        super().__init__()
        if len(num_blocks) != len(STAGE_WIDTHS) or min(num_blocks) < 1:
            raise ModelError(
                f"A CIFAR ResNet has {len(STAGE_WIDTHS)} stages of at least one block each; "
                f"got num_blocks={list(num_blocks)}. Pass e.g. (3, 3, 3) for ResNet-20."
            )
        if num_classes < 1:
            raise ModelError(f"num_classes must be at least 1, got {num_classes}.")
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        in_planes = STAGE_WIDTHS[0]
        for stage, (planes, blocks) in enumerate(
            zip(STAGE_WIDTHS, num_blocks, strict=True), start=1
        ):
            first_stride = 1 if stage == 1 else 2
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, first_stride if i == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convs and linear, as the reference training code initialised them."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """A CIFAR ResNet of depth 6n + 2 (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ModelError(f"A CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110); got {depth}.")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes)


def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for 32x32 images: 0.27M parameters."""
    return cifar_resnet(20, num_classes)


def cifar_resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for 32x32 images: 0.46M parameters."""
    return cifar_resnet(32, num_classes)


def cifar_resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 for 32x32 images: 0.66M parameters."""
    return cifar_resnet(44, num_classes)


def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for 32x32 images: 0.85M parameters."""
    return cifar_resnet(56, num_classes)


def cifar_resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 for 32x32 images: 1.7M parameters."""
    return cifar_resnet(110, num_classes)
