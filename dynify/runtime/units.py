"""Decision units: the small learnt networks that decide what runs.

A per-block gate (SkipNet, ConvNet-AIG), a halting unit (SACT), a policy network (BlockDrop) and
a spatial mask unit (DynConv). Each returns logits; the rules that turn them into decisions live
in `decisions.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dynify.errors import StrategyError
from dynify.runtime.folding import folded_conv_bn, use_folded
from dynify.runtime.heads import pool_to


def pool_feature(feature: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, ...] feature -> [B, D] by global average pooling over its spatial or token axes."""
    if layout == "channels_first":
        return feature.mean(dim=tuple(range(2, feature.dim())))
    if layout == "channels_last":
        return feature.mean(dim=tuple(range(1, feature.dim() - 1)))
    if layout == "tokens":
        return feature.mean(1)
    return feature.flatten(1)


class GateFunction(nn.Module):
    """ConvNet-AIG / SkipNet gate: global pool -> linear -> ReLU -> linear -> one logit.

    The last bias starts at `open_bias` so a fresh gate is open (sigmoid(3) = 0.95): the
    converted model starts as the static one and fine-tuning learns what to close.
    """

    def __init__(self, channels: int, layout: str, hidden: int = 16, open_bias: float = 3.0):
        super().__init__()
        self.layout = layout
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.constant_(self.fc2.bias, open_bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(pool_feature(feature, self.layout)))).squeeze(1)

    def logit_one(self, feature: torch.Tensor) -> float:
        """The logit of a batch of one as a float: the same arithmetic, without module calls."""
        hidden = F.relu(
            F.linear(pool_feature(feature, self.layout), self.fc1.weight, self.fc1.bias)
        )
        return float(F.linear(hidden, self.fc2.weight, self.fc2.bias))


class HaltingUnit(nn.Module):
    """SACT's halting score of a block output: global pool -> linear -> one logit.

    Starts at sigmoid(-3) = 0.05 per block, far from halting, i.e. close to the static network.
    """

    def __init__(self, channels: int, layout: str, bias: float = -3.0):
        super().__init__()
        self.layout = layout
        self.fc = nn.Linear(channels, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc(pool_feature(feature, self.layout)).squeeze(1)

    def logit_one(self, feature: torch.Tensor) -> float:
        return float(F.linear(pool_feature(feature, self.layout), self.fc.weight, self.fc.bias))


class PolicyNetwork(nn.Module):
    """BlockDrop's policy: a small CNN on the downsampled image emits one logit per block."""

    def __init__(
        self, input_shape: Sequence[int], num_blocks: int, size: int = 16, width: int = 16
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise StrategyError(
                f"The policy gate reads an image [C, H, W]; this model's input is "
                f"{list(input_shape)}. Use --gate function or --gate halting instead."
            )
        channels, height, _ = input_shape
        self.size = min(size, height)
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.fc = nn.Linear(2 * width, num_blocks)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pool_to(x, self.size)
        if not use_folded(self):
            return self.fc(self.features(x))
        # the policy runs once per image before the backbone: at batch 1 its eleven small ops
        # cost ~0.11 ms on a CPU; folding its BNs into channels-last convs (see folding.py)
        # and in-place ReLUs bring that to ~0.035 ms (benchmarks/block_gates.md)
        (w1, b1), (w2, b2) = folded_conv_bn(
            self,
            [(self.features[0], self.features[1]), (self.features[3], self.features[4])],
            memory_format=torch.channels_last,
        )
        x = F.conv2d(x, w1, b1, stride=2, padding=1).relu_()
        x = F.conv2d(x, w2, b2, stride=2, padding=1).relu_()
        return F.linear(x.mean((2, 3)), self.fc.weight, self.fc.bias)


class MaskUnit(nn.Module):
    """Scores where a block's branch is needed: a 1x1 conv on the block input.

    For regions, the input is average-pooled to one value per tile first (which, the conv being
    linear, equals pooling the pixel scores). Scores are logits; sigmoid gives P(active). The
    bias starts at `open_bias` (sigmoid(3) = 0.95): a fresh unit keeps (almost) every position.
    """

    def __init__(self, channels: int, granularity: str, tile: int, open_bias: float = 3.0):
        super().__init__()
        self.granularity = granularity
        self.tile = tile
        self.conv = nn.Conv2d(channels, 1, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, open_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "region":
            x = F.avg_pool2d(x, self.tile, ceil_mode=True)
        return self.conv(x)[:, 0]
