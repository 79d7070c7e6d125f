"""Graph analysis with networkx: where a network can be cut, and where its residual blocks are.

Every strategy rewrites *single-entry single-exit* regions. Two kinds are found here (and the
recurrent layers the temporal strategies step through, in `recurrent.py`):
- the stretch between two **single-tensor cut points** (exactly one tensor flows from the part
  before to the part after), which early exits split at;
- the two arms of a **residual block** (the branch and the shortcut joined by an add), which gates
  and masks wrap.
Facts are computed from a profiled GraphModule (see `cost.profile`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx
from torch import nn

from dynify.frontend.cost import MACS
from dynify.frontend.padding import embedding_pad_id
from dynify.frontend.recurrent import RecurrentLayer, recurrent_layers

_ADD_TARGETS = {operator.add, operator.iadd, torch.add}
_CAT_TARGETS = {torch.cat, torch.concat}


@dataclass(frozen=True)
class CutPoint:
    """A node whose output is the only tensor the rest of the network needs."""

    node: str
    position: int  # index in the graph's topological order
    shape: tuple[int, ...]  # without the batch dimension
    macs_before: int  # MACs of everything up to and including the node
    fraction: float  # macs_before / total MACs


@dataclass(frozen=True)
class ResidualBlock:
    """A join of a branch with its shortcut: out = join(shortcut(entry), branch(entry))."""

    join: str  # the add (or cat) node
    kind: str  # "add" or "cat"
    entry: str  # the node both arms start from
    branch: tuple[str, ...]  # nodes of the heavier arm, in graph order
    shortcut: tuple[str, ...]  # nodes of the other arm; empty for an identity shortcut
    branch_output: str
    shortcut_output: str
    branch_macs: int
    shortcut_macs: int
    identity: bool  # the shortcut passes its input on unchanged


@dataclass(frozen=True)
class Stage:
    """Consecutive residual blocks whose outputs have one shape."""

    blocks: tuple[ResidualBlock, ...]
    shape: tuple[int, ...]


@dataclass
class GraphAnalysis:
    total_macs: int
    cuts: list[CutPoint]
    blocks: list[ResidualBlock]
    stages: list[Stage] = field(default_factory=list)
    recurrent: list[RecurrentLayer] = field(default_factory=list)
    # The padding_idx of the embedding that reads the token ids (`padding.embedding_pad_id`).
    pad_id: int | None = None


def to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph: one vertex per fx node (by name), an edge per use."""
    graph = nx.DiGraph()
    for position, node in enumerate(gm.graph.nodes):
        graph.add_node(node.name, op=node.op, position=position, macs=node.meta.get(MACS, 0))
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def free_nodes(gm: torch.fx.GraphModule) -> set[str]:
    """Nodes that depend on no input (parameters, constants): any region may recompute them."""
    free: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method")
            and all(arg.name in free for arg in node.all_input_nodes)
        ):
            free.add(node.name)
    return free


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(meta.shape)


def _is_feature_tensor(node: torch.fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return (
        meta is not None
        and hasattr(meta, "dtype")
        and meta.dtype.is_floating_point
        and len(meta.shape) >= 2
    )


def cut_points(gm: torch.fx.GraphModule) -> list[CutPoint]:
    """Single-tensor cut points, in graph order, by one sweep over the topological order."""
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    free = free_nodes(gm)
    last_use = {
        node: max((position[user] for user in node.users), default=position[node]) for node in nodes
    }
    total = sum(int(n.meta.get(MACS, 0)) for n in nodes)
    live: set[torch.fx.Node] = set()
    cuts: list[CutPoint] = []
    macs_before = 0
    for i, node in enumerate(nodes):
        macs_before += int(node.meta.get(MACS, 0))
        if node.op == "output":
            break
        if node.name not in free:
            live.add(node)
        live = {n for n in live if last_use[n] > i}
        if (
            live == {node}
            and node.op != "placeholder"
            and _is_feature_tensor(node)
            and 0 < macs_before < total
        ):
            cuts.append(
                CutPoint(
                    node=node.name,
                    position=i,
                    shape=tuple(node.meta["tensor_meta"].shape[1:]),
                    macs_before=macs_before,
                    fraction=macs_before / total,
                )
            )
    return cuts


def _is_join(node: torch.fx.Node) -> str | None:
    if node.op == "call_function" and node.target in _ADD_TARGETS:
        return "add"
    if node.op == "call_method" and node.target in ("add", "add_"):
        return "add"
    if node.op == "call_function" and node.target in _CAT_TARGETS:
        return "cat"
    return None


def _arm(graph: nx.DiGraph, entry: str, output: str, free: set[str]) -> set[str]:
    """Nodes on paths from `entry` to `output` (excluding entry, including output)."""
    if output == entry:
        return set()
    return (nx.ancestors(graph, output) & nx.descendants(graph, entry) | {output}) - free


def residual_blocks(gm: torch.fx.GraphModule) -> list[ResidualBlock]:
    """Residual joins whose two arms are single-entry single-exit regions from one node."""
    graph = to_networkx(gm)
    free = free_nodes(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return []
    dominators = nx.immediate_dominators(graph, placeholders[0])
    blocks = []
    for node in gm.graph.nodes:
        kind = _is_join(node)
        if kind is None:
            continue
        arms = [a for a in node.all_input_nodes if a.name not in free]
        if len(arms) != 2 or _shape(arms[0]) is None or _shape(arms[1]) is None:
            continue
        if kind == "add" and _shape(arms[0]) != _shape(arms[1]):
            continue
        entry = dominators.get(node.name)
        if entry is None or entry in free:
            continue
        arm_nodes = [_arm(graph, entry, a.name, free) for a in arms]
        if arm_nodes[0] & arm_nodes[1] or not _self_contained(
            graph, entry, node.name, arm_nodes, free
        ):
            continue
        macs = [sum(graph.nodes[n]["macs"] for n in arm) for arm in arm_nodes]
        b, s = (0, 1) if (macs[0], len(arm_nodes[0])) >= (macs[1], len(arm_nodes[1])) else (1, 0)
        if not arm_nodes[b]:
            continue
        blocks.append(
            ResidualBlock(
                join=node.name,
                kind=kind,
                entry=entry,
                branch=tuple(sorted(arm_nodes[b], key=order.__getitem__)),
                shortcut=tuple(sorted(arm_nodes[s], key=order.__getitem__)),
                branch_output=arms[b].name,
                shortcut_output=arms[s].name,
                branch_macs=macs[b],
                shortcut_macs=macs[s],
                identity=all(_is_no_op(gm, nodes[n]) for n in arm_nodes[s]),
            )
        )
    return blocks


def _is_no_op(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """An op that returns its input unchanged at inference (nn.Identity, eval-mode dropout)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Identity, nn.Dropout))
    return node.op == "call_function" and node.target is torch.nn.functional.dropout


def _self_contained(
    graph: nx.DiGraph, entry: str, join: str, arms: list[set[str]], free: set[str]
) -> bool:
    """Each arm reads only the entry, free nodes and itself, and feeds only itself and the join."""
    for arm in arms:
        for name in arm:
            if any(p not in arm and p != entry and p not in free for p in graph.predecessors(name)):
                return False
            if any(s not in arm and s != join for s in graph.successors(name)):
                return False
    return True


def stages(gm: torch.fx.GraphModule, blocks: list[ResidualBlock]) -> list[Stage]:
    """Group consecutive residual blocks with the same output shape."""
    nodes = {node.name: node for node in gm.graph.nodes}
    groups: list[list[ResidualBlock]] = []
    for block in blocks:
        shape = _shape(nodes[block.join])
        if groups and _shape(nodes[groups[-1][-1].join]) == shape:
            groups[-1].append(block)
        else:
            groups.append([block])
    return [Stage(tuple(g), tuple(_shape(nodes[g[0].join])[1:])) for g in groups]


def analyse(gm: torch.fx.GraphModule) -> GraphAnalysis:
    """Cut points, residual blocks, stages, recurrent layers and the pad id of a profiled
    graph."""
    blocks = residual_blocks(gm)
    return GraphAnalysis(
        total_macs=sum(int(n.meta.get(MACS, 0)) for n in gm.graph.nodes),
        cuts=cut_points(gm),
        blocks=blocks,
        stages=stages(gm, blocks),
        recurrent=recurrent_layers(gm),
        pad_id=embedding_pad_id(gm),
    )
