"""Dynamic width: residual branches conv -> BN -> ReLU -> conv (-> BN) run a per-sample number of
their inner channels.

Plan: take the residual blocks (add joins) whose branch has exactly that form (ungrouped
convs with numeric zero padding, batch norms with running statistics), order each branch's inner
channels by importance, and list the inner channel counts (`widths`). Importance of inner
channel i: |gamma_i| / sqrt(var_i + eps), the scale BN1 gives it, times the L1 norm of conv2's
input slice i, what the next conv makes of it. The order is part of the plan (an artifact keeps
it). Build: on a copy of the traced graph, replace each branch by a `width_<k>` wrapper holding
copies of its modules with the inner channels permuted into that order, and cost each width at
the branch's MACs from the front end scaled for the slices that run; the cost book gets each
branch's narrowest width (`FIXED`), its gate (`DECIDER`) and the rest of its full width
(`UNIT`), and the layers outside the branches (`FIXED`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from dynify.errors import StrategyError
from dynify.frontend.analysis import ResidualBlock
from dynify.frontend.cost import MACS, module_macs
from dynify.passes import register_strategy
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.passes.rewrite import copy_graph_replacing, replace_region
from dynify.runtime.dynamic_width import (
    REST,
    DynamicWidthModel,
    WidthBranch,
    WidthGate,
    enter_branch,
)
from dynify.runtime.ledger import FIXED, CostBook

WRAPPER_PREFIX = "width"
_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.relu_)


@dataclass
class DynamicWidthOptions:
    """Options of the dynamic-width strategy.

    widths: fractions of a branch's inner channels a sample may run (the full width is always
    added). budget: the mean fraction of static MACs fine-tuning steers towards. threshold: the
    initial decision threshold (the quantile of the gate's distribution over widths; 0 the
    narrowest, above 1 full width). gate_bias: the initial logit of the full width over the
    others (a fresh gate then keeps the original network's accuracy). blocks: join node names
    (default: every block whose branch has the form). temperature: the Gumbel-softmax
    temperature of training; compute_weight and budget_rate: the MAC budget's PI controller.
    """

    widths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    budget: float = 0.5
    threshold: float = 0.5
    gate_bias: float = 3.0
    temperature: float = 1.0
    distill_temperature: float = 2.0
    compute_weight: float = 20.0
    budget_rate: float = 0.1
    blocks: list[str] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DynamicWidthOptions:
        opts = options_from_dict(cls, data, "dynamic-width")
        widths = opts.widths
        if not isinstance(widths, list | tuple) or not widths:
            raise StrategyError(
                f"widths must be a list of fractions of the inner channels, e.g. "
                f"[0.25, 0.5, 0.75, 1.0]; got {widths!r}."
            )
        for w in widths:
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 < w <= 1.0:
                raise StrategyError(
                    f"Each width is a fraction of a branch's inner channels in (0, 1]; got {w!r}."
                )
        if not 0.0 < float(opts.budget) <= 1.0:
            raise StrategyError(
                f"budget is a fraction of the static MACs in (0, 1]; got {opts.budget}."
            )
        if not float(opts.temperature) > 0:
            raise StrategyError(f"temperature must be positive, got {opts.temperature}.")
        return opts


@dataclass(frozen=True)
class BranchForm:
    """The nodes of a branch conv1 -> bn1 -> relu -> conv2 (-> bn2)."""

    conv1: str
    bn1: str
    relu: str
    conv2: str
    bn2: str | None


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and not node.kwargs.get("inplace", False)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return isinstance(_module(gm, node), nn.ReLU)


def _conv_problem(conv: nn.Module | None, label: str) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"its {label} is not an nn.Conv2d"
    if conv.groups != 1:
        return f"its {label} is grouped ({conv.groups} groups)"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return f"its {label} does not pad with a number of zeros"
    return None


def _bn_problem(bn: nn.Module | None, label: str) -> str | None:
    if type(bn) is not nn.BatchNorm2d or bn.running_mean is None:
        return f"its {label} is not an nn.BatchNorm2d with running statistics"
    return None


def branch_form(ctx: ConversionContext, block: ResidualBlock) -> BranchForm | str:
    """The branch's conv -> BN -> ReLU -> conv (-> BN) nodes, or why it is not of that form."""
    nodes = [ctx.node(name) for name in block.branch]
    gm = ctx.gm
    if len(nodes) not in (4, 5):
        return f"its branch has {len(nodes)} nodes, not conv -> BN -> ReLU -> conv (-> BN)"
    previous = ctx.node(block.entry)
    for node in nodes:  # a chain: each node reads the one before it, and nothing else
        if node.all_input_nodes != [previous] or len(node.args) < 1 or node.args[0] is not previous:
            return f"'{node.name}' does not read only '{previous.name}': the branch is not a chain"
        previous = node
    conv1, bn1, relu, conv2 = nodes[:4]
    problem = (
        _conv_problem(_module(gm, conv1), "first conv")
        or _bn_problem(_module(gm, bn1), "first batch norm")
        or (None if _is_relu(gm, relu) else f"'{relu.name}' is not a ReLU")
        or _conv_problem(_module(gm, conv2), "second conv")
        or (_bn_problem(_module(gm, nodes[4]), "last batch norm") if len(nodes) == 5 else None)
    )
    if problem:
        return problem
    return BranchForm(
        conv1.name, bn1.name, relu.name, conv2.name, nodes[4].name if len(nodes) == 5 else None
    )


def importance_order(conv1: nn.Conv2d, bn1: nn.BatchNorm2d, conv2: nn.Conv2d) -> list[int]:
    """Inner channels, most important first (a stable sort: ties keep their order)."""
    with torch.no_grad():
        gamma = bn1.weight.abs() if bn1.weight is not None else torch.ones_like(bn1.running_var)
        scale = gamma.double() / torch.sqrt(bn1.running_var.double() + bn1.eps)
        reach = conv2.weight.detach().double().abs().sum((0, 2, 3))
        score = scale * reach
    return torch.sort(-score, stable=True).indices.tolist()


def inner_widths(fractions: list[float], channels: int) -> list[int]:
    """Distinct inner channel counts, narrowest first, the full width last."""
    counts = {max(1, min(channels, round(float(f) * channels))) for f in fractions}
    return sorted(counts | {channels})


@register_strategy
class DynamicWidth:
    name = "dynamic-width"
    summary = "per-sample widths of residual branches: dense slices of importance-ordered channels"
    variants = ({},)
    contract_example = "image"

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = DynamicWidthOptions.from_dict(options)
        blocks = [b for b in ctx.analysis.blocks if b.kind == "add"]
        if opts.blocks is not None:
            by_join = {b.join: b for b in blocks}
            missing = [n for n in opts.blocks if n not in by_join]
            if missing:
                raise StrategyError(
                    f"{missing} are not residual joins of this model; joins: {list(by_join)}."
                )
            blocks = [by_join[n] for n in opts.blocks]
        chosen, skipped = [], []
        for block in blocks:
            form = branch_form(ctx, block)
            if isinstance(form, str):
                skipped.append({"join": block.join, "reason": form})
                continue
            conv1 = ctx.gm.get_submodule(str(ctx.node(form.conv1).target))
            bn1 = ctx.gm.get_submodule(str(ctx.node(form.bn1).target))
            conv2 = ctx.gm.get_submodule(str(ctx.node(form.conv2).target))
            chosen.append(
                {
                    "join": block.join,
                    "entry": block.entry,
                    "output": block.branch_output,
                    "nodes": list(block.branch),
                    "form": asdict(form),
                    "widths": inner_widths(opts.widths, conv1.out_channels),
                    "order": importance_order(conv1, bn1, conv2),
                }
            )
        if not chosen:
            detail = "; ".join(f"{s['join']}: {s['reason']}" for s in skipped) or (
                "the model has no residual blocks joined by addition"
            )
            raise StrategyError(
                "No residual branch of this model has the form conv -> BN -> ReLU -> conv (-> BN) "
                f"that dynamic width slices ({detail}). Block gates or early exits apply to "
                "other networks."
            )
        return {"branches": chosen, "skipped": skipped, "options": asdict(opts)}

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> DynamicWidthModel:
        opts = DynamicWidthOptions.from_dict(plan.get("options"))
        net = copy_graph_replacing(ctx.gm, class_name="DynamicWidthNet")
        book = CostBook(ctx.analysis.total_macs)
        names, joins, replaced = [], [], 0
        for k, spec in enumerate(plan["branches"]):
            form = BranchForm(**spec["form"])
            try:
                nodes = {n: ctx.node(n) for n in [*spec["nodes"], spec["entry"]]}
            except KeyError as exc:
                raise StrategyError(f"Planned branch node {exc} is not in this graph.") from None
            mods = {
                key: copy.deepcopy(ctx.gm.get_submodule(str(nodes[name].target)))
                for key, name in asdict(form).items()
                if name is not None and key != "relu"
            }
            order = [int(i) for i in spec["order"]]
            channels = mods["conv1"].out_channels
            if sorted(order) != list(range(channels)):
                raise StrategyError(
                    f"The planned channel order of branch '{spec['join']}' is not a permutation "
                    f"of its {channels} inner channels; convert again."
                )
            _permute(mods["conv1"], mods["bn1"], mods["conv2"], order)
            widths = [int(c) for c in spec["widths"]]
            full_macs = sum(int(nodes[n].meta.get(MACS, 0)) for n in spec["nodes"])
            width_macs = [_width_macs(nodes, form, c, channels) for c in widths]
            if width_macs[-1] != full_macs:
                raise StrategyError(
                    f"Branch '{spec['join']}' has MACs outside its convs and batch norms; "
                    "dynamic width cannot scale them."
                )
            shape = tuple(nodes[spec["entry"]].meta["tensor_meta"].shape[1:])
            gate = WidthGate(
                shape[0], len(widths), torch.Generator().manual_seed(k), float(opts.gate_bias)
            )
            enter_branch(book, k, width_macs, module_macs(gate, torch.zeros(1, *shape)))
            wrapper = WidthBranch(
                k,
                mods["conv1"],
                mods["bn1"],
                mods["conv2"],
                mods.get("bn2"),
                order=order,
                widths=widths,
                width_macs=width_macs,
                gate=gate,
                book=book,
            )
            call = replace_region(
                net,
                spec["nodes"],
                [spec["entry"]],
                [spec["output"]],
                wrapper,
                WRAPPER_PREFIX,
                pass_name=self.name,
            )
            names.append(str(call.target))
            joins.append(spec["join"])
            replaced += full_macs
        net.graph.lint()
        net.recompile()
        book.add(REST, ctx.analysis.total_macs - replaced, FIXED)
        return DynamicWidthModel(
            net,
            names,
            joins=joins,
            book=book,
            thresholds=[float(opts.threshold)] * len(names),
            budget=opts.budget,
            temperature=opts.temperature,
            distill_temperature=opts.distill_temperature,
            compute_weight=opts.compute_weight,
            budget_rate=opts.budget_rate,
            static_macs=ctx.analysis.total_macs,
            input_shape=tuple(ctx.example_input.shape[1:]),
            num_classes=ctx.num_classes,
        ).eval()


def _permute(conv1: nn.Conv2d, bn1: nn.BatchNorm2d, conv2: nn.Conv2d, order: list[int]) -> None:
    """Put the inner channels in `order`: conv1's outputs, BN1's channels, conv2's inputs."""
    index = torch.tensor(order, dtype=torch.long)
    with torch.no_grad():
        conv1.weight.copy_(conv1.weight.index_select(0, index))
        if conv1.bias is not None:
            conv1.bias.copy_(conv1.bias.index_select(0, index))
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(bn1, name)
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, index))
        conv2.weight.copy_(conv2.weight.index_select(1, index))


def _width_macs(
    nodes: dict[str, torch.fx.Node], form: BranchForm, width: int, channels: int
) -> int:
    """The branch's MACs at `width` inner channels: the front end's counts, the inner-channel
    ops (conv1, BN1, ReLU) and conv2 (whose input channels shrink) scaled by width / channels,
    exactly (each count is a multiple of the channel count)."""
    total = 0
    for key, name in asdict(form).items():
        if name is None:
            continue
        macs = int(nodes[name].meta.get(MACS, 0))
        if key == "bn2":
            total += macs
            continue
        if (macs * width) % channels:
            raise StrategyError(
                f"'{name}' counts {macs} MACs, not a multiple of its {channels} inner channels."
            )
        total += macs * width // channels
    return total
