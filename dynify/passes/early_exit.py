"""Early exits (BranchyNet, SDN): exit heads at single-tensor cut points.

Plan: choose cut points, by default N spread evenly over cumulative MACs, and a head for each
that fits its tensor within the head budget. Build: lift the stretches between the cuts into
segments (`lift_region`) and hand them, with the heads, to an EarlyExitModel.

Unlike the other passes, this one does not `replace_region` inside one graph: an exit ends the
forward pass for the samples that take it, and an fx graph has no early return. A sample that
exits must run nothing after its cut, and a batch must narrow to the samples still running, so
the model is the chain of segments in Python, each followed by its head's decision (and, for
export, one `torch.cond` per exit over the rest of the chain).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dynify.errors import StrategyError
from dynify.frontend.analysis import CutPoint
from dynify.frontend.cost import graph_macs, module_macs
from dynify.passes import register_strategy
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.passes.rewrite import lift_region
from dynify.runtime.early_exit import EarlyExitModel, cost_book
from dynify.runtime.heads import ExitHead, feature_layout
from dynify.runtime.policy import POLICIES, ExitPolicy

POOL_SIZES = (4, 2, 1)
# A head's latency follows the bytes of weights it reads, not its MACs: at batch 1 a
# 4096 x 1000 linear layer (16 MB) costs more time than its 0.1 % of ResNet-50's MACs. Capping
# the weights keeps MACs saved turning into milliseconds saved (see benchmarks/latency.md).
MAX_HEAD_WEIGHTS = 2**20
# Cuts later than this leave too little work after them for an exit to save anything.
LATEST_DEFAULT_EXIT = 0.95
MIN_BOTTLENECK = 8
HEAD_KINDS = ("auto", "linear", "conv")


@dataclass
class EarlyExitOptions:
    """Options of the early-exit strategy.

    exits: how many exits to spread over cumulative MACs (int), or where to put them: MAC
    fractions in (0, 1) or cut-point node names. head_budget: the most one head may cost, as a
    fraction of the static model's MACs. head: 'linear' (pool + linear), 'conv' (a strided
    3x3 conv first, on conv maps) or 'auto' (conv where it fits the budget with at least as
    many channels as its input, else linear).
    """

    exits: int | list[float] | list[str] = 4
    policy: str = "confidence"
    patience: int = 2
    threshold: float = 0.9
    head_budget: float = 0.02
    head: str = "auto"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EarlyExitOptions:
        return options_from_dict(cls, data, "early-exit")


def candidate_cuts(cuts: list[CutPoint], latest: float = 1.0) -> list[CutPoint]:
    """One cut per MAC level: the last of a run of free ops (conv -> bn -> relu keeps relu)."""
    by_level: dict[int, CutPoint] = {}
    for cut in cuts:
        by_level[cut.macs_before] = cut
    return [c for c in by_level.values() if c.fraction <= latest]


def place_exits(cuts: list[CutPoint], exits: int | list) -> list[CutPoint]:
    """The cut points to put exits at, in graph order."""
    if isinstance(exits, int):
        if exits < 1:
            raise StrategyError("An early-exit model needs at least one exit (--exits 1 or more).")
        targets: list[float | str] = [(i + 1) / (exits + 1) for i in range(exits)]
    else:
        targets = list(exits)
    candidates = candidate_cuts(cuts, LATEST_DEFAULT_EXIT) or candidate_cuts(cuts)
    if not candidates:
        raise StrategyError(
            "This model has no single-tensor cut point, so early exits cannot be placed: every "
            "layer's output is needed by a later layer alongside another tensor. Try "
            "--strategy block-gates on residual networks."
        )
    by_name = {c.node: c for c in cuts}
    chosen: list[CutPoint] = []
    for target in targets:
        if isinstance(target, str):
            if target not in by_name:
                names = ", ".join(c.node for c in candidates)
                raise StrategyError(
                    f"'{target}' is not a single-tensor cut point. Cut points: {names}."
                )
            cut = by_name[target]
        else:
            if not 0.0 < float(target) < 1.0:
                raise StrategyError(f"Exit position {target} must be a MAC fraction in (0, 1).")
            free = [c for c in candidates if c not in chosen] or candidates
            cut = min(free, key=lambda c: abs(c.fraction - float(target)))
        if cut not in chosen:
            chosen.append(cut)
    return sorted(chosen, key=lambda c: c.position)


def _map_size(shape: tuple[int, ...], layout: str) -> tuple[int, int, int]:
    """(channels, height, width) of a conv map in either layout."""
    if layout == "channels_first":
        return shape[0], shape[1], shape[2]
    return shape[2], shape[0], shape[1]


def choose_head(
    shape: tuple[int, ...], layout: str, num_classes: int, budget_macs: float
) -> tuple[int, int | None]:
    """The largest pooled grid, or a low-rank bottleneck, that keeps a head within both the
    MAC budget and the weight cap."""
    if layout in ("channels_first", "channels_last"):
        channels, h, w = _map_size(shape, layout)
        spatial = min(h, w)
    else:
        channels, spatial = shape[-1], 1
    for pool in POOL_SIZES if spatial > 1 else (1,):
        if pool > spatial:
            continue
        macs, weights = _head_size(shape, layout, num_classes, pool)
        if macs <= budget_macs and weights <= MAX_HEAD_WEIGHTS:
            return pool, None
    # The widest bottleneck within both limits: its two linear layers cost (and weigh)
    # hidden x (channels + classes).
    hidden = int(min(budget_macs, MAX_HEAD_WEIGHTS) // (channels + num_classes))
    if hidden < MIN_BOTTLENECK:
        raise StrategyError(
            f"An exit head on a {list(shape)} feature cannot fit the head budget "
            f"({budget_macs / 1e3:.0f} K MACs) for {num_classes} classes. Raise head_budget "
            "(e.g. options={'head_budget': 0.05}) or place fewer, later exits."
        )
    return 1, hidden


def _head_size(shape: tuple[int, ...], layout: str, num_classes: int, pool: int) -> tuple[int, int]:
    """(MACs, classifier weights) of a pooled linear head, its MACs counted by FlopCounterMode
    on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        head = ExitHead(shape, num_classes, layout, pool)
        return module_macs(head, torch.empty(1, *shape)), head.classifier.weight.numel()


def conv_output(shape: tuple[int, ...], layout: str, conv: int) -> tuple[int, ...]:
    """The feature shape after a head's strided 3x3 conv (same layout as its input)."""
    _, h, w = _map_size(shape, layout)
    h, w = (h + 1) // 2, (w + 1) // 2
    return (conv, h, w) if layout == "channels_first" else (h, w, conv)


def conv_macs(shape: tuple[int, ...], layout: str, conv: int) -> int:
    """MACs of the strided conv of `conv` channels an exit head puts on a `shape` feature, as
    FlopCounterMode counts the head's own conv (on the meta device: no memory, no compute)."""
    channels, h, w = _map_size(shape, layout)
    with torch.device("meta"):
        head = ExitHead(shape, 1, layout, conv=conv)
        return module_macs(head.reduce[0], torch.empty(1, channels, h, w))


def choose_conv(shape: tuple[int, ...], layout: str, budget_macs: float, kind: str) -> int | None:
    """Channels of the head's strided conv, or None for a linear head.

    'auto' takes twice the input's channels, or as many, when that conv stays within 3/4 of the
    head budget (the rest is for the classifier) and the weight cap: true of CIFAR-sized
    networks, not of ImageNet ResNets, whose early maps are too large for any useful conv.
    'conv' also tries half and a quarter of the channels before giving up.
    """
    if kind not in HEAD_KINDS:
        raise StrategyError(f"Unknown exit head '{kind}'; one of {HEAD_KINDS}.")
    if kind == "linear" or layout not in ("channels_first", "channels_last"):
        if kind == "conv":
            raise StrategyError(
                f"A conv exit head needs a conv map; this cut is laid out as {layout}. "
                "Use head='linear' or 'auto'."
            )
        return None
    channels, h, w = _map_size(shape, layout)
    widths = [2 * channels, channels]
    if kind == "conv":
        widths += [channels // 2, channels // 4]
    limit = budget_macs * (0.75 if kind == "auto" else 1.0)
    for width in widths:
        fits = conv_macs(shape, layout, width) <= limit
        if width >= 1 and min(h, w) >= 4 and fits and channels * width * 9 <= MAX_HEAD_WEIGHTS:
            return width
    if kind == "conv":
        raise StrategyError(
            f"No conv exit head on a {list(shape)} feature fits the head budget "
            f"({budget_macs / 1e3:.0f} K MACs). Raise head_budget or use head='linear'."
        )
    return None


@register_strategy
class EarlyExit:
    name = "early-exit"
    summary = "exit heads at cut points; confident samples stop early (BranchyNet, SDN)"
    variants = tuple({"policy": kind} for kind in POLICIES)

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = EarlyExitOptions.from_dict(options)
        ExitPolicy(opts.policy, opts.patience)  # validates
        budget = opts.head_budget * ctx.analysis.total_macs
        exits = []
        for cut in place_exits(ctx.analysis.cuts, opts.exits):
            layout = feature_layout(cut.shape)
            conv = choose_conv(cut.shape, layout, budget, opts.head)
            shape, rest = cut.shape, budget
            if conv:
                shape, rest = (
                    conv_output(cut.shape, layout, conv),
                    budget - conv_macs(cut.shape, layout, conv),
                )
            pool, hidden = choose_head(shape, layout, ctx.num_classes, rest)
            exits.append(
                {"node": cut.node, "layout": layout, "pool": pool, "hidden": hidden, "conv": conv}
            )
        plan = {"exits": exits, "policy": ExitPolicy(opts.policy, opts.patience).to_dict()}
        plan["options"] = asdict(opts)
        return plan

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> EarlyExitModel:
        gm = ctx.gm
        nodes = list(gm.graph.nodes)
        position = {node.name: i for i, node in enumerate(nodes)}
        placeholder = next(n for n in nodes if n.op == "placeholder")
        output_node = next(n for n in nodes if n.op == "output")
        final = output_node.args[0]
        if not isinstance(final, torch.fx.Node):
            raise StrategyError(
                "The model returns a tuple or dict; early exits need a model that returns one "
                "logits tensor. Wrap it so forward returns the logits."
            )
        exits = plan["exits"]
        for spec in exits:
            if spec["node"] not in position:
                raise StrategyError(f"Planned exit '{spec['node']}' is not a node of this graph.")
        bounds = [placeholder.name] + [e["node"] for e in exits] + [final.name]
        segments, segment_macs = [], []
        for i in range(len(bounds) - 1):
            lo, hi = position[bounds[i]], position[bounds[i + 1]]
            members = [n.name for n in nodes[lo + 1 : hi + 1] if n.op not in ("output",)]
            segments.append(lift_region(gm, members, [bounds[i]], [bounds[i + 1]], f"Segment{i}"))
            segment_macs.append(graph_macs(gm, nodes[lo + 1 : hi + 1]))
        heads, head_macs = [], []
        for spec in exits:
            shape = tuple(ctx.node(spec["node"]).meta["tensor_meta"].shape[1:])
            head = ExitHead(
                shape,
                ctx.num_classes,
                spec["layout"],
                spec["pool"],
                spec["hidden"],
                spec.get("conv"),
            )
            heads.append(head)
            head_macs.append(module_macs(head.eval(), torch.zeros(1, *shape)))
        options = plan.get("options", {})
        return EarlyExitModel(
            segments,
            heads,
            book=cost_book(ctx.analysis.total_macs, segment_macs, head_macs),
            exit_names=[e["node"] for e in exits],
            policy=ExitPolicy(**plan["policy"]),
            thresholds=[float(options.get("threshold", 0.9))] * len(exits),
            static_macs=ctx.analysis.total_macs,
            input_shape=tuple(ctx.example_input.shape[1:]),
            num_classes=ctx.num_classes,
        )
