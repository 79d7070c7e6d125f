"""Dynamic convolution (CondConv, DynamicConv): chosen convs mix K expert kernels per sample.

Plan: the convs to make dynamic, by node name. By default the 3x3 convs inside residual
branches (where the papers put them); "all" takes every `nn.Conv2d`; or a list of conv node
names (`dynify inspect --graph` shows them). Convs with a padding mode other than zeros are
listed under `skipped` with the reason. Build: replace each chosen conv's call by a
`DynamicConv` holding the original conv (`dynamic_conv_<i>`), and count what the router, the
kernel aggregation and the conv cost per sample with `FlopCounterMode`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from dynify.errors import StrategyError
from dynify.frontend.cost import MACS, module_macs
from dynify.passes import register_strategy
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.passes.rewrite import copy_graph_replacing, replace_region
from dynify.runtime.dynamic_conv import DynamicConv, DynamicConvModel, cost_book

WRAPPER_PREFIX = "dynamic_conv"
SELECTIONS = ("branches", "all")
# A router narrower than this risks every ReLU unit being off for every input: a dead router.
MIN_HIDDEN = 16


@dataclass
class DynamicConvOptions:
    """Options of the dynamic-conv strategy.

    convs: "branches" (the 3x3 convs of residual branches), "all" (every Conv2d) or a list of
    conv node names. experts: kernels per conv (K). router_reduction: the router's hidden
    width is in_channels / router_reduction (at least 16). expert_noise: the zero-sum
    perturbation that tells the experts apart at conversion, relative to the kernel's standard
    deviation. The router temperature falls linearly from initial_temperature to
    final_temperature over the first anneal_samples samples fine-tuning trains on.
    """

    convs: str | list[str] = "branches"
    experts: int = 4
    router_reduction: int = 4
    expert_noise: float = 0.05
    initial_temperature: float = 30.0
    final_temperature: float = 1.0
    anneal_samples: int = 100_000
    distill_temperature: float = 4.0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DynamicConvOptions:
        opts = options_from_dict(cls, data, "dynamic-conv")
        if isinstance(opts.convs, str) and opts.convs not in SELECTIONS:
            raise StrategyError(
                f"convs must be one of {SELECTIONS} or a list of conv node names, got "
                f"'{opts.convs}'."
            )
        if isinstance(opts.convs, list) and not opts.convs:
            raise StrategyError("convs lists no conv; name at least one, or use 'branches'.")
        for key in ("experts", "router_reduction", "anneal_samples"):
            value = getattr(opts, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StrategyError(f"{key} must be a whole number of at least 1, got {value}.")
        if opts.experts < 2:
            raise StrategyError(
                f"experts must be at least 2 (one expert is the static conv), got {opts.experts}."
            )
        for key in ("initial_temperature", "final_temperature", "distill_temperature"):
            if not float(getattr(opts, key)) > 0:
                raise StrategyError(f"{key} must be positive, got {getattr(opts, key)}.")
        if not float(opts.expert_noise) >= 0:
            raise StrategyError(f"expert_noise must be 0 or more, got {opts.expert_noise}.")
        return opts


def _conv_of(ctx: ConversionContext, node: torch.fx.Node) -> nn.Conv2d | None:
    if node.op != "call_module":
        return None
    module = ctx.gm.get_submodule(str(node.target))
    return module if type(module) is nn.Conv2d else None


def _candidates(ctx: ConversionContext, convs: str | list[str]) -> list[str]:
    """Conv node names the selection asks for, in graph order."""
    all_convs = [n.name for n in ctx.gm.graph.nodes if _conv_of(ctx, n) is not None]
    if convs == "all":
        return all_convs
    if convs == "branches":
        in_branches = {name for block in ctx.analysis.blocks for name in block.branch}
        return [
            n
            for n in all_convs
            if n in in_branches and tuple(_conv_of(ctx, ctx.node(n)).kernel_size) == (3, 3)
        ]
    unknown = sorted(set(convs) - set(all_convs))
    if unknown:
        raise StrategyError(
            f"{unknown} are not Conv2d nodes of this model; its Conv2d nodes are {all_convs}."
        )
    return [n for n in all_convs if n in set(convs)]


def _why_not(conv: nn.Conv2d) -> str | None:
    if isinstance(conv.padding, str):
        return f"its padding is '{conv.padding}' (give it as numbers of pixels)"
    if conv.padding_mode != "zeros":
        return f"its padding mode is '{conv.padding_mode}' (only zero padding is supported)"
    return None


@register_strategy
class DynamicConvStrategy:
    name = "dynamic-conv"
    summary = "per-sample mixtures of K expert kernels in chosen convs (CondConv, DynamicConv)"
    variants = ({"convs": "branches"}, {"convs": "all"})

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = DynamicConvOptions.from_dict(options)
        chosen, skipped = [], []
        for name in _candidates(ctx, opts.convs):
            reason = _why_not(_conv_of(ctx, ctx.node(name)))
            if reason is None:
                chosen.append(name)
            else:
                skipped.append({"conv": name, "reason": reason})
        if not chosen:
            detail = "; ".join(f"{s['conv']}: {s['reason']}" for s in skipped) or "none found"
            raise StrategyError(
                f"No conv of this model can be made dynamic with convs={opts.convs!r} ({detail}). "
                "Residual branches with 3x3 convs are the default; convs='all' takes every Conv2d."
            )
        return {"convs": chosen, "skipped": skipped, "options": asdict(opts)}

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> DynamicConvModel:
        opts = DynamicConvOptions.from_dict(plan.get("options"))
        names = list(plan["convs"])
        nodes = {n.name: n for n in ctx.gm.graph.nodes}
        missing = [n for n in names if n not in nodes or _conv_of(ctx, nodes[n]) is None]
        if missing:
            raise StrategyError(f"Planned convs {missing} are not Conv2d nodes of this graph.")
        net = copy_graph_replacing(ctx.gm, class_name="DynamicConvNet")
        wrappers, conv_macs, dynamic_macs = [], [], []
        for i, name in enumerate(names):
            node = nodes[name]
            conv = _conv_of(ctx, node)
            source = node.args[0]
            wrapper = DynamicConv(
                conv,
                experts=opts.experts,
                hidden=max(MIN_HIDDEN, conv.in_channels // opts.router_reduction),
                noise=float(opts.expert_noise),
                seed=i,
            )
            shape = tuple(source.meta["tensor_meta"].shape[1:])
            example = torch.zeros(1, *shape, dtype=conv.weight.dtype)
            conv_macs.append(int(node.meta[MACS]))
            dynamic_macs.append(module_macs(wrapper, example))  # router + mixing + conv
            call = replace_region(
                net, [name], [source.name], [name], wrapper, WRAPPER_PREFIX, pass_name=self.name
            )
            wrappers.append(call.target)
        net.graph.lint()
        net.recompile()
        return DynamicConvModel(
            net,
            wrappers,
            conv_names=names,
            static_macs=ctx.analysis.total_macs,
            book=cost_book(ctx.analysis.total_macs, conv_macs, dynamic_macs),
            input_shape=tuple(ctx.example_input.shape[1:]),
            num_classes=ctx.num_classes,
            initial_temperature=opts.initial_temperature,
            final_temperature=opts.final_temperature,
            anneal_samples=opts.anneal_samples,
            distill_temperature=opts.distill_temperature,
        ).eval()
