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
from dynify.frontend.inputs import dtype_name, example_input_of, parse_extra_input
from dynify.frontend.padding import example_token
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


@dataclass(frozen=True)
class RecurrentInfo:
    """A recurrent layer the temporal strategies can step through (or say why not)."""

    module: str
    kind: str
    hidden_size: int
    num_layers: int
    steps: int
    step_macs: int
    share: float  # of the model's MACs
    blockers: tuple[str, ...]  # why a step-by-step strategy cannot run it; empty if it can


@dataclass
class ModelSummary:
    """What `dynify inspect` prints: the graph's size, cut points, residual blocks, stages."""

    name: str
    input_size: int | None  # pixels, for image inputs
    input_shape: tuple[int, ...]  # one sample's shape
    input_dtype: str
    nodes: int
    total_macs: int
    num_classes: int
    seconds: float
    cuts: list[CutInfo] = field(default_factory=list)
    total_cuts: int = 0
    blocks: list[BlockInfo] = field(default_factory=list)
    stages: list[StageInfo] = field(default_factory=list)
    recurrent: list[RecurrentInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect(
    model: nn.Module | str,
    *,
    input_size: int | None = None,
    weights: str = "random",
    leaf_modules: Sequence[LeafSpec] = (),
    all_cuts: bool = False,
    input_shape: Sequence[int] | None = None,
    input_dtype: str | torch.dtype = "float32",
    extra_input: str | None = None,
) -> ModelSummary:
    """Trace `model` (an nn.Module or a model name) and summarise what strategies can use.

    The model is traced on an image of `input_size` (default: a named model's own), or on an
    input of `input_shape` (batch first, e.g. `(1, 60)`) and `input_dtype` (`"int64"` for
    token ids), with `extra_input` ("lengths", "mask", "mask:int64") for a model called with
    the lengths or padding mask too. `all_cuts` lists every cut point instead of one per MAC level (the ones
    early-exit chooses from).
    """
    if isinstance(model, str):
        name = model
        net, ref = build_model(model, weights=weights)
        size = input_size or ref.input_size
    else:
        name, net, size = type(model).__name__, model, input_size
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) < 2:
            raise InputError(
                f"The input shape is batch first, e.g. 1,60 for 60 token ids; got {list(shape)}."
            )
        example, size = example_input_of(shape[1:], input_dtype, example_token(net)), None
        if extra_input is not None:
            example = (example, parse_extra_input(extra_input).full(1, shape[1]))
    else:
        if size is None:
            raise InputError(
                "Give the input size (--input-size), or --input-shape and --input-dtype for "
                "sequences: the model's input is unknown."
            )
        if size < 1:
            raise InputError(f"The input size is a number of pixels, at least 1; got {size}.")
        example = torch.randn(1, _input_channels(net), size, size)
    front = read_model(net, example, import_leaves(leaf_modules))
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
    recurrent = [
        RecurrentInfo(
            module=layer.module,
            kind=layer.kind,
            hidden_size=layer.hidden_size,
            num_layers=layer.num_layers,
            steps=layer.steps,
            step_macs=layer.step_macs,
            share=layer.macs / total,
            blockers=tuple(layer.stepwise_blockers()),
        )
        for layer in analysis.recurrent
    ]
    return ModelSummary(
        name=name,
        input_size=size,
        input_shape=tuple(front.context.example_input.shape[1:]),
        input_dtype=dtype_name(front.context.example_input.dtype),
        nodes=len(front.context.gm.graph.nodes),
        total_macs=analysis.total_macs,
        num_classes=front.context.num_classes,
        seconds=front.seconds,
        cuts=[CutInfo(c.node, tuple(c.shape), c.macs_before, c.fraction) for c in cuts],
        total_cuts=len(analysis.cuts),
        blocks=blocks,
        stages=stages,
        recurrent=recurrent,
    )


def _input_channels(net: nn.Module) -> int:
    """The first convolution's input channels (3 when the model starts otherwise)."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3
