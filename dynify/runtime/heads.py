"""Exit heads: the small classifiers the early-exit pass inserts, and the feature helpers they share.

Heads start with a zero final layer: an untrained head predicts the uniform distribution, so it
never clears a confidence threshold, and a freshly converted model behaves like the static one
until its heads are trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynify.errors import StrategyError
from dynify.runtime.folding import folded_conv_bn, use_folded

LAYOUTS = ("channels_first", "channels_last", "tokens", "vector")


def feature_layout(shape: tuple[int, ...]) -> str:
    """How a feature tensor (without batch) is laid out, from its shape alone.

    [C, H, W] is a conv map; [H, W, C] with H == W != C is a channels-last map (Swin, ConvNeXt
    blocks); [N, D] are tokens; [D] is a vector.
    """
    if len(shape) == 1:
        return "vector"
    if len(shape) == 2:
        return "tokens"
    if len(shape) == 3:
        return "channels_last" if shape[0] == shape[1] != shape[2] else "channels_first"
    raise StrategyError(f"No exit head fits a feature of shape {list(shape)}.")


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool an [N, C, H, W] map to size x size: adaptive pooling's values, with no op
    when the map already has that size and a plain average pool (cheaper) when it divides."""
    height, width = x.shape[-2:]
    if height == width == size:
        return x
    if height % size == 0 and width % size == 0:
        return F.avg_pool2d(x, (height // size, width // size))
    return F.adaptive_avg_pool2d(x, size)


class ExitHead(nn.Module):
    """A cheap classifier on an intermediate feature: (conv,) pool, flatten, (bottleneck,) linear.

    Conv maps are average-pooled to `pool` x `pool` (SDN pools to a small grid rather than to
    1x1, which keeps some spatial information for shallow exits); tokens are normalised and
    averaged; vectors go straight to the linear layer. With `conv` channels, a strided 3x3
    conv + BN + ReLU runs first (MSDNet's classifiers): shallow features are too low-level for
    a linear classifier, and one non-linear layer lifts an early exit far more than its MACs.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        num_classes: int,
        layout: str,
        pool: int = 1,
        hidden: int | None = None,
        conv: int | None = None,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise StrategyError(f"Unknown feature layout '{layout}'; one of {LAYOUTS}.")
        self.layout = layout
        self.pool = pool
        self.has_conv = bool(conv) and layout in ("channels_first", "channels_last")
        if layout in ("channels_first", "channels_last"):
            channels = shape[0] if layout == "channels_first" else shape[-1]
            layers: list[nn.Module] = []
            if conv:
                layers += [
                    nn.Conv2d(channels, conv, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(conv),
                    nn.ReLU(inplace=True),
                ]
                channels = conv
            self.reduce: nn.Module = nn.Sequential(
                *layers, nn.AdaptiveAvgPool2d(pool), nn.Flatten(1)
            )
            features = channels * pool * pool
        elif layout == "tokens":
            self.reduce = _TokenMean(shape[-1])
            features = shape[-1]
        else:
            self.reduce = nn.Identity()
            features = shape[0]
        # A low-rank bottleneck keeps the head within budget when classes are many and the
        # network is small (1000 ImageNet classes on MobileNet's 576 channels).
        self.bottleneck = nn.Linear(features, hidden, bias=False) if hidden else nn.Identity()
        self.classifier = nn.Linear(hidden or features, num_classes)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.layout == "channels_last":
            feature = feature.permute(0, 3, 1, 2)
        if self.has_conv and use_folded(self):
            return self._folded_forward(feature)
        return self.classifier(self.bottleneck(self.reduce(feature)))

    def _folded_forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Inference at a few ops: BN folded into a channels-last conv, ReLU in place, a plain
        average pool where the map divides evenly, the linear layers without module calls.
        At batch 1 this halves the head's time: it sits on the path of every exit taken."""
        conv = self.reduce[0]
        ((weight, bias),) = folded_conv_bn(
            self, [(conv, self.reduce[1])], memory_format=torch.channels_last
        )
        x = F.conv2d(feature, weight, bias, conv.stride, conv.padding).relu_()
        x = torch.flatten(pool_to(x, self.pool), 1)
        if not isinstance(self.bottleneck, nn.Identity):
            x = F.linear(x, self.bottleneck.weight)
        return F.linear(x, self.classifier.weight, self.classifier.bias)


class _TokenMean(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens).mean(1)
