"""Clip models that fold frames into the batch (the TSN pattern), found in the traced graph.

A clip model reads `[B, T, ...]`, folds the frames into the batch (`flatten(0, 1)`, or
`reshape` / `view` to `[B * T, ...]`), runs a per-frame network on `[B * T, ...]`, unfolds its
`[B * T, K]` logits to `[B, T, K]` (`unflatten`, `reshape`, `view`) and averages over time
(`mean(1)`), which is the model's output. frame-exit runs the per-frame network one frame at a
time instead; this module finds the pattern, writes each node's role on
`node.meta["clip"]`, and says what is supported when a model does not fit it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from dynify.errors import StrategyError
from dynify.frontend.analysis import free_nodes
from dynify.frontend.cost import MACS

CLIP = "clip"
_FOLDS = {"flatten", "reshape", "view", "unflatten"}
_FUNCTIONS = {torch.flatten: "flatten", torch.reshape: "reshape", torch.unflatten: "unflatten"}
SUPPORTED = (
    "frame-exit supports clip models of the form x [B, T, ...] -> x.flatten(0, 1) (or "
    "reshape/view to [B * T, ...]) -> a per-frame network -> [B * T, K] logits -> "
    "unflatten(0, (B, T)) (or reshape/view to [B, T, K]) -> .mean(1) as the output"
)


@dataclass(frozen=True)
class ClipPattern:
    """Where the frames are folded in, run, folded out and averaged."""

    fold: str  # the node [B, T, ...] -> [B * T, ...]
    frame_nodes: tuple[str, ...]  # the per-frame network, in graph order
    frame_output: str  # its [B * T, K] logits
    unfold: str  # [B * T, K] -> [B, T, K]
    mean: str  # the mean over T: the output
    frames: int  # T of the example input
    frame_shape: tuple[int, ...]  # one frame, without batch
    frame_macs: int  # one frame through the per-frame network


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _kind(node: torch.fx.Node) -> str | None:
    """'flatten' / 'reshape' / 'view' / 'unflatten' / 'mean' for the ops the pattern uses."""
    if node.op == "call_method" and (node.target in _FOLDS or node.target == "mean"):
        return str(node.target)
    if node.op == "call_function":
        if node.target in _FUNCTIONS:
            return _FUNCTIONS[node.target]
        if node.target is torch.mean:
            return "mean"
    return None


def _is_shape_read(node: torch.fx.Node) -> bool:
    """A read of a tensor's size (`x.shape`, `x.size()`, `shape[i]`, arithmetic on them)."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    if node.op == "call_function" and node.target in (
        operator.getitem,
        operator.mul,
        operator.floordiv,
    ):
        return _shape(node) is None  # a Python number or a torch.Size, not a tensor
    return False


def _mean_over_time(node: torch.fx.Node) -> bool:
    """`x.mean(1)` on [B, T, K] (also spelled `dim=1`, `(1,)` or `-2`), without keepdim."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    over_time = (1, (1,), [1], -2, (-2,), [-2])
    return dims in over_time and not keep and "dtype" not in node.kwargs


def clip_pattern(gm: torch.fx.GraphModule) -> ClipPattern:
    """The clip pattern of a profiled graph (roles also on node.meta["clip"]), or a
    StrategyError that says which part is missing and what is supported."""
    nodes = list(gm.graph.nodes)
    placeholder = next(n for n in nodes if n.op == "placeholder")
    output = next(n for n in nodes if n.op == "output")
    shape = _shape(placeholder)
    if (
        shape is None
        or len(shape) < 3
        or not placeholder.meta["tensor_meta"].dtype.is_floating_point
    ):
        raise StrategyError(
            f"The model's input is {list(shape or ())}, not a float clip [B, T, ...]. {SUPPORTED}."
        )
    batch, frames = shape[0], shape[1]
    folded = (batch * frames, *shape[2:])
    folds = [u for u in placeholder.users if _kind(u) in _FOLDS and _shape(u) == folded]
    if len(folds) != 1:
        raise StrategyError(
            f"No single fold of the frames into the batch ([B, T, ...] -> [B * T, ...]) reads "
            f"the input. {SUPPORTED}."
        )
    fold = folds[0]
    others = [u for u in placeholder.users if u is not fold and not _is_shape_read(u)]
    if others:
        raise StrategyError(
            f"The input clip is also read by {[u.name for u in others]} outside the per-frame "
            f"network; frame-exit needs every frame to go through one per-frame network. "
            f"{SUPPORTED}."
        )
    mean = output.args[0]
    if not isinstance(mean, torch.fx.Node) or _kind(mean) != "mean" or not _mean_over_time(mean):
        raise StrategyError(
            f"The model's output is not a mean over time (dim 1) of per-frame logits. {SUPPORTED}."
        )
    unfold = mean.args[0]
    classes = _shape(mean)
    if not (
        isinstance(unfold, torch.fx.Node)
        and _kind(unfold) in _FOLDS
        and classes is not None
        and _shape(unfold) == (batch, frames, *classes[1:])
    ):
        raise StrategyError(
            f"The averaged tensor is not the per-frame logits unfolded to [B, T, K]. {SUPPORTED}."
        )
    frame_output = unfold.args[0]
    if not isinstance(frame_output, torch.fx.Node) or _shape(frame_output) != (
        batch * frames,
        *classes[1:],
    ):
        raise StrategyError(f"The unfolded tensor is not [B * T, K] logits. {SUPPORTED}.")
    frame_nodes = _frame_region(gm, fold, frame_output)
    position = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    region_macs = sum(int(by_name[n].meta.get(MACS, 0)) for n in frame_nodes)
    total = sum(int(n.meta.get(MACS, 0)) for n in nodes)
    if region_macs != total:
        raise StrategyError(
            f"{(total - region_macs) / 1e6:.2f} M MACs of the model run outside the per-frame "
            f"network; frame-exit charges a clip its frames only. {SUPPORTED}."
        )
    if region_macs % (batch * frames):
        raise StrategyError(
            "The per-frame network's MACs do not split evenly over the frames: it mixes frames "
            f"(e.g. a temporal convolution). {SUPPORTED}."
        )
    pattern = ClipPattern(
        fold=fold.name,
        frame_nodes=tuple(sorted(frame_nodes, key=position.__getitem__)),
        frame_output=frame_output.name,
        unfold=unfold.name,
        mean=mean.name,
        frames=int(frames),
        frame_shape=tuple(int(d) for d in shape[2:]),
        frame_macs=region_macs // (batch * frames),
    )
    fold.meta[CLIP] = "fold"
    for name in pattern.frame_nodes:
        by_name[name].meta[CLIP] = "frame"
    frame_output.meta[CLIP] = "frame_output"
    unfold.meta[CLIP] = "unfold"
    mean.meta[CLIP] = "time_mean"
    return pattern


def _frame_region(
    gm: torch.fx.GraphModule, fold: torch.fx.Node, frame_output: torch.fx.Node
) -> set[str]:
    """The nodes on paths from the fold to the per-frame logits; refuses a region that reads
    anything else computed from the input (it would not be one frame's network)."""
    free = free_nodes(gm)
    below: set[torch.fx.Node] = set()
    frontier = list(fold.users)
    while frontier:
        node = frontier.pop()
        if node not in below:
            below.add(node)
            frontier.extend(node.users)
    if frame_output not in below:
        raise StrategyError(
            f"The per-frame logits do not come from the folded frames. {SUPPORTED}."
        )
    above: set[torch.fx.Node] = set()
    frontier = [frame_output]
    while frontier:
        node = frontier.pop()
        if node not in above and node is not fold:
            above.add(node)
            frontier.extend(node.all_input_nodes)
    region = {n for n in above & below if n.name not in free}
    for node in region:
        outside = [
            a.name
            for a in node.all_input_nodes
            if a not in region and a is not fold and a.name not in free
        ]
        if outside:
            raise StrategyError(
                f"'{node.name}' of the per-frame network also reads {outside}, computed from "
                f"the whole clip rather than from one frame. {SUPPORTED}."
            )
        leaks = [u.name for u in node.users if u not in region] if node is not frame_output else []
        if leaks:
            raise StrategyError(
                f"'{node.name}' of the per-frame network is also read by {leaks} outside it. "
                f"{SUPPORTED}."
            )
    return {n.name for n in region}


__all__ = ["CLIP", "ClipPattern", "clip_pattern"]
