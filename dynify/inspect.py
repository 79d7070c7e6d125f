"""`inspect`: what the front end sees in a model, before any strategy is chosen.

The cut points an exit can sit at, the residual blocks a gate or a mask can wrap, grouped in
stages, and where the MACs are: the facts every strategy plans from, as a typed result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dynify.convert import import_leaves, read_model
from dynify.errors import InputError
from dynify.frontend.trace import LeafSpec
from dynify.passes.early_exit import candidate_cuts
from dynify.zoo import build_model


@dataclass(frozen=True)
class CutInfo:
    """A node whose output is the only tensor the rest of the network needs."""

    node: str
    shape: tuple[int, ...]
    macs_before: int
    fraction: float


@dataclass(frozen=True)
class BlockInfo:
    """A residual block: `join` adds the branch (from `entry`) to the shortcut."""

    stage: int
    join: str
    entry: str
    identity: bool
    shortcut_ops: int
    branch_macs: int
    share: float  # of the model's MACs


@dataclass(frozen=True)
class StageInfo:
    """Consecutive residual blocks whose outputs have one shape."""

    index: int
    shape: tuple[int, ...]
    macs: int
    share: float


@dataclass
class ModelSummary:
    """What `dynify inspect` prints: the graph's size, cut points, residual blocks, stages."""

    name: str
    input_size: int
    nodes: int
    total_macs: int
    num_classes: int
    seconds: float
    cuts: list[CutInfo] = field(default_factory=list)
    total_cuts: int = 0
    blocks: list[BlockInfo] = field(default_factory=list)
    stages: list[StageInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect(
    model: nn.Module | str,
    *,
    input_size: int | None = None,
    weights: str = "random",
    leaf_modules: Sequence[LeafSpec] = (),
    all_cuts: bool = False,
) -> ModelSummary:
    """Trace `model` (an nn.Module or a model name) and summarise what strategies can use.

    `input_size` defaults to a named model's own; `all_cuts` lists every cut point instead of
    one per MAC level (the ones early-exit chooses from).
    """
    if isinstance(model, str):
        name = model
        net, ref = build_model(model, weights=weights)
        size = input_size or ref.input_size
    else:
        name, net, size = type(model).__name__, model, input_size
    if size is None:
        raise InputError("Give the input size (--input-size): the model's resolution is unknown.")
    if size < 1:
        raise InputError(f"The input size is a number of pixels, at least 1; got {size}.")
    channels = _input_channels(net)
    front = read_model(net, torch.randn(1, channels, size, size), import_leaves(leaf_modules))
    analysis = front.context.analysis
    total = max(analysis.total_macs, 1)
    cuts = analysis.cuts if all_cuts else candidate_cuts(analysis.cuts)
    blocks = [
        BlockInfo(
            stage=s,
            join=block.join,
            entry=block.entry,
            identity=block.identity,
            shortcut_ops=len(block.shortcut),
            branch_macs=block.branch_macs,
            share=block.branch_macs / total,
        )
        for s, stage in enumerate(analysis.stages)
        for block in stage.blocks
    ]
    stages = []
    for s, stage in enumerate(analysis.stages):
        macs = sum(b.branch_macs + b.shortcut_macs for b in stage.blocks)
        stages.append(StageInfo(s, tuple(stage.shape), macs, macs / total))
    return ModelSummary(
        name=name,
        input_size=size,
        nodes=len(front.context.gm.graph.nodes),
        total_macs=analysis.total_macs,
        num_classes=front.context.num_classes,
        seconds=front.seconds,
        cuts=[CutInfo(c.node, tuple(c.shape), c.macs_before, c.fraction) for c in cuts],
        total_cuts=len(analysis.cuts),
        blocks=blocks,
        stages=stages,
    )


def _input_channels(net: nn.Module) -> int:
    """The first convolution's input channels (3 when the model starts otherwise)."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3
