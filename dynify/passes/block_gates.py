"""Block gates: per sample, skip the residual blocks it does not need.

Plan: take the residual blocks the analysis found (add joins only: a skipped branch adds
nothing, while a concatenation would change shape) and, for the halting gate, group them into
stages of chained same-shape blocks. Build: on a copy of the traced graph, lift each gated
block's branch (and its shortcut when it is not the identity), replace the block (both arms and
the join, and the ReLU after it when there is one) by a `gate_<k>` wrapper over the block's
entry with `replace_region`, and hand the graph to a GatedModel. A skipped block with a
projection or option-A shortcut still runs its shortcut.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx

from dynify.errors import StrategyError
from dynify.frontend.analysis import ResidualBlock
from dynify.frontend.cost import module_macs
from dynify.passes import register_strategy, strategy_names
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.passes.rewrite import copy_graph_replacing, insert_after, lift_region, replace_region
from dynify.runtime.block_gates import ESTIMATORS, GATE_KINDS, POLICY, REST, GatedModel
from dynify.runtime.gate_wrapper import BlockGate, HaltMix, branch_item, decider_item
from dynify.runtime.heads import feature_layout
from dynify.runtime.model import DECIDER, FIXED, UNIT, CostBook
from dynify.runtime.units import GateFunction, HaltingUnit, PolicyNetwork

# Strategies that need residual blocks; the others apply to any network.
_NEEDS_BLOCKS = {"block-gates", "spatial-masks"}


@dataclass
class BlockGatesOptions:
    """Options of the block-gates strategy.

    gate: function (a gate per block), halting (ACT per stage) or policy (one network plans all
    blocks). budget: the mean fraction of static MACs fine-tuning steers towards. epsilon: ACT's
    halting margin (a stage halts at cumulative score 1 - epsilon). threshold: the initial
    decision threshold (function/policy: run when p > 1 - threshold; halting: 1 - epsilon).
    blocks: join node names to gate (default: every block). estimator: policy training,
    reinforce (BlockDrop) or gumbel.
    """

    gate: str = "function"
    budget: float = 0.6
    epsilon: float = 0.01
    threshold: float | None = None
    hidden: int = 16
    temperature: float = 1.0
    distill_temperature: float = 2.0
    compute_weight: float = 20.0
    budget_rate: float = 0.1
    estimator: str = "gumbel"
    policy_size: int = 16
    blocks: list[str] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BlockGatesOptions:
        opts = options_from_dict(cls, data, "block-gates")
        if opts.gate not in GATE_KINDS:
            raise StrategyError(
                f"Unknown gate '{opts.gate}'; choose one of {', '.join(GATE_KINDS)}."
            )
        if opts.estimator not in ESTIMATORS:
            raise StrategyError(f"Unknown estimator '{opts.estimator}'; one of {ESTIMATORS}.")
        if not 0.0 < opts.budget <= 1.0:
            raise StrategyError(
                f"budget is a fraction of the static MACs in (0, 1]; got {opts.budget}."
            )
        if not 0.0 <= opts.epsilon < 1.0:
            raise StrategyError(f"epsilon must be in [0, 1); got {opts.epsilon}.")
        return opts


def block_exit(gm: torch.fx.GraphModule, join: str) -> str:
    """The block's output: the join followed by its chain of same-shape unary ops (the ReLU)."""
    node = next(n for n in gm.graph.nodes if n.name == join)
    shape = _shape(node)
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "output" or user.all_input_nodes != [node] or _shape(user) != shape:
            break
        node = user
    return node.name


_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.relu_)


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether the node is a ReLU (so its output is non-negative); a gated block that took over
    the ReLU after its join counts."""
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, torch.nn.ReLU) or (
            isinstance(module, BlockGate) and module.relu_after
        )
    return False


def _trailing_relu(gm: torch.fx.GraphModule, join: torch.fx.Node) -> torch.fx.Node | None:
    """The ReLU that is the join's only user and reads nothing else, if there is one."""
    if len(join.users) != 1:
        return None
    user = next(iter(join.users))
    return user if _is_relu(gm, user) and user.all_input_nodes == [join] else None


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def gateable_blocks(ctx: ConversionContext, names: list[str] | None) -> list[ResidualBlock]:
    """The residual blocks that can be skipped, or an error that says what to do instead."""
    blocks = ctx.analysis.blocks
    if not blocks:
        others = [s for s in strategy_names() if s not in _NEEDS_BLOCKS]
        raise StrategyError(
            "This model has no residual blocks (a join of a branch with its shortcut), so there "
            "is no block to skip: block gates apply to residual networks (ResNet, MobileNetV2, "
            f"ConvNeXt, ViT). Strategies that apply to this model: {', '.join(others)}."
        )
    adds = [b for b in blocks if b.kind == "add"]
    if names is not None:
        by_join = {b.join: b for b in adds}
        missing = [n for n in names if n not in by_join]
        if missing:
            raise StrategyError(
                f"{missing} are not residual joins of this model; joins: {', '.join(by_join)}."
            )
        adds = [by_join[n] for n in names]
    if not adds:
        raise StrategyError(
            "The residual blocks of this model join by concatenation (DenseNet-style); skipping "
            "such a branch would change the feature's shape. Use early-exit instead."
        )
    order = {n.name: i for i, n in enumerate(ctx.gm.graph.nodes)}
    return sorted(adds, key=lambda b: order[b.join])


def halting_groups(ctx: ConversionContext, blocks: list[ResidualBlock]) -> list[list[int]]:
    """Chains of blocks where each block's input is the previous block's same-shape output."""
    groups: list[list[int]] = []
    previous_exit, previous_shape = None, None
    for i, block in enumerate(blocks):
        shape = _shape(ctx.node(block.join))
        if groups and block.entry == previous_exit and shape == previous_shape:
            groups[-1].append(i)
        else:
            groups.append([i])
        previous_exit, previous_shape = block_exit(ctx.gm, block.join), shape
    return groups


@register_strategy
class BlockGates:
    name = "block-gates"
    summary = "skip residual blocks per sample: gate, halting or policy (SkipNet, SACT, BlockDrop)"
    variants = tuple({"gate": kind} for kind in GATE_KINDS)

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = BlockGatesOptions.from_dict(options)
        blocks = gateable_blocks(ctx, opts.blocks)
        groups = [list(range(len(blocks)))]
        if opts.gate == "halting":
            groups = [g for g in halting_groups(ctx, blocks) if len(g) > 1]
            if not groups:
                raise StrategyError(
                    "Halting needs stages of at least two chained residual blocks of one shape; "
                    "this model has none. Use --gate function or --gate policy."
                )
        plan = {
            "gate": opts.gate,
            "blocks": [
                {
                    "join": b.join,
                    "entry": b.entry,
                    "identity": b.identity,
                    "branch_macs": b.branch_macs,
                    "exit": block_exit(ctx.gm, b.join),
                }
                for b in blocks
            ],
            "groups": groups,
            "options": asdict(opts),
        }
        return plan

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> GatedModel:
        opts = BlockGatesOptions.from_dict(plan.get("options"))
        kind = plan["gate"]
        by_join = {b.join: b for b in ctx.analysis.blocks}
        specs = plan["blocks"]
        for spec in specs:
            if spec["join"] not in by_join:
                raise StrategyError(f"Planned block '{spec['join']}' is not a residual join here.")
        groups: list[list[int]] = plan["groups"] if kind == "halting" else []
        # Which planned blocks get a wrapper, and their group (halting: all but a stage's first).
        gated: list[tuple[int, int]] = []
        if kind == "halting":
            for g, group in enumerate(groups):
                gated += [(i, g) for i in group[1:]]
        else:
            gated = [(i, -1) for i in range(len(specs))]

        # A new graph over the traced modules: the traced graph itself stays as it was.
        gm = copy_graph_replacing(ctx.gm)
        # What the parts cost, from the front end's counts: each gated branch (node.meta) and
        # each decision unit (FlopCounterMode on the unit); the rest is every sample's.
        book = CostBook(ctx.analysis.total_macs)
        gate_names, gated_macs = [], 0
        for k, (i, group) in enumerate(gated):
            block = by_join[specs[i]["join"]]
            branch = lift_region(
                gm, block.branch, [block.entry], [block.branch_output], f"Branch{k}"
            )
            shortcut = None
            if not block.identity:
                shortcut = lift_region(
                    gm, block.shortcut, [block.entry], [block.shortcut_output], f"Shortcut{k}"
                )
            shape = tuple(ctx.node(block.entry).meta["tensor_meta"].shape[1:])
            decider, decider_macs = self._decider(kind, shape, opts)
            book.add(branch_item(k), block.branch_macs, UNIT)
            if decider is not None:
                book.add(decider_item(k), decider_macs, DECIDER)
            wrapper = BlockGate(k, kind, branch, shortcut, book=book, decider=decider, group=group)
            region, output = [*block.branch, *block.shortcut, block.join], block.join
            nodes = {n.name: n for n in gm.graph.nodes}
            relu = _trailing_relu(gm, nodes[block.join]) if kind != "halting" else None
            if relu is not None:
                # The wrapper takes over the ReLU after the join: a skipped identity block whose
                # input is already non-negative then costs no op at all (~8 us each at batch 1).
                wrapper.relu_after = True
                wrapper.skip_returns_entry = block.identity and _is_relu(gm, nodes[block.entry])
                region, output = [*region, relu.name], relu.name
            replace_region(
                gm, region, [block.entry], [output], wrapper, "gate", pass_name=self.name
            )
            gate_names.append(block.join)
            gated_macs += block.branch_macs
        for g, group in enumerate(groups):
            insert_after(gm, specs[group[-1]]["exit"], HaltMix(g), "halt_mix", pass_name=self.name)

        book.add(REST, ctx.analysis.total_macs - gated_macs, FIXED)
        policy = None
        input_shape = tuple(ctx.example_input.shape[1:])
        if kind == "policy":
            policy = PolicyNetwork(input_shape, len(gated), size=opts.policy_size)
            book.add(POLICY, module_macs(policy.eval(), torch.zeros(1, *input_shape)), DECIDER)
        if kind == "halting":
            threshold = 1.0 - opts.epsilon if opts.threshold is None else opts.threshold
            thresholds = [threshold] * len(groups)
        else:
            thresholds = [0.5 if opts.threshold is None else opts.threshold] * len(gated)
        return GatedModel(
            gm,
            kind=kind,
            gate_names=gate_names,
            book=book,
            thresholds=thresholds,
            policy=policy,
            groups=[[k for k, (_, g) in enumerate(gated) if g == gi] for gi in range(len(groups))],
            budget=opts.budget,
            epsilon=opts.epsilon,
            temperature=opts.temperature,
            distill_temperature=opts.distill_temperature,
            compute_weight=opts.compute_weight,
            budget_rate=opts.budget_rate,
            estimator=opts.estimator,
            static_macs=ctx.analysis.total_macs,
            input_shape=input_shape,
            num_classes=ctx.num_classes,
        )

    @staticmethod
    def _decider(kind: str, shape: tuple[int, ...], opts: BlockGatesOptions):
        if kind == "policy":
            return None, 0
        layout = feature_layout(shape)
        channels = shape[-1] if layout in ("channels_last", "tokens", "vector") else shape[0]
        if kind == "function":
            unit = GateFunction(channels, layout, hidden=opts.hidden)
        else:
            unit = HaltingUnit(channels, layout)
        return unit, module_macs(unit.eval(), torch.zeros(1, *shape))
