"""Spatial masks (DynConv, SACT): compute each residual branch only where the image needs it.

Plan: every residual block whose branch is a stride-1 chain of "same" convs and position-wise
layers gets a mask (see `runtime.mask_geometry.check_branch`); the others, ResNet's downsampling blocks
among them, are listed under `skipped` with the reason. Build: lift each chosen branch, wrap it
in a `SparseResidual`, and replace the branch in a copy of the graph by a call to the wrapper
(`spatial_mask_<i>`, `replace_region`); the join reads the wrapper's output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx

from dynify.errors import StrategyError
from dynify.frontend.analysis import ResidualBlock
from dynify.passes import register_strategy
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.passes.rewrite import copy_graph_replacing, lift_region, replace_region
from dynify.runtime.mask_geometry import GRANULARITIES, check_branch
from dynify.runtime.sparse_residual import SparseResidual
from dynify.runtime.spatial_masks import SpatialMaskModel, cost_book

WRAPPER_PREFIX = "spatial_mask"


@dataclass
class SpatialMaskOptions:
    """Options of the spatial-masks strategy.

    granularity: "region" (t x t tiles, `tile`) or "pixel". budget: the mean density (fraction
    of branch positions computed) the training's sparsity term steers to. threshold: the initial
    threshold of every mask (a position runs iff sigmoid(score) > 1 - threshold). blocks: "all"
    or the join-node names of the blocks to mask.
    """

    granularity: str = "region"
    tile: int = 8
    budget: float = 0.5
    threshold: float = 0.5
    blocks: str | list[str] = "all"
    distill_temperature: float = 4.0
    sparsity_weight: float = 10.0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SpatialMaskOptions:
        opts = options_from_dict(cls, data, "spatial-masks")
        if opts.granularity not in GRANULARITIES:
            raise StrategyError(
                f"Unknown granularity '{opts.granularity}'; choose one of {GRANULARITIES}."
            )
        if int(opts.tile) < 1:
            raise StrategyError(f"tile must be a positive number of pixels, got {opts.tile}.")
        if not 0.0 <= float(opts.budget) <= 1.0:
            raise StrategyError(f"budget (a mean density) must be in [0, 1], got {opts.budget}.")
        return opts


def _lift_branch(ctx: ConversionContext, block: ResidualBlock, i: int) -> torch.fx.GraphModule:
    return lift_region(ctx.gm, block.branch, [block.entry], [block.branch_output], f"Branch{i}")


def _spatial(ctx: ConversionContext, name: str) -> tuple[int, ...]:
    return tuple(ctx.node(name).meta["tensor_meta"].shape[2:])


def _why_not(ctx: ConversionContext, block: ResidualBlock, granularity: str) -> str | None:
    if block.kind != "add":
        return "its join is a concatenation, not an add"
    if len(_spatial(ctx, block.entry)) != 2:
        return "its input is not a [B, C, H, W] feature map"
    if _spatial(ctx, block.entry) != _spatial(ctx, block.branch_output):
        return "its branch changes the spatial size (a downsampling block)"
    try:
        branch = _lift_branch(ctx, block, 0)
    except StrategyError as exc:
        return str(exc)
    reason = check_branch(branch, granularity)
    return None if reason is None else f"its branch is not maskable: {reason}"


@register_strategy
class SpatialMasks:
    name = "spatial-masks"
    summary = "per-pixel or per-tile masks on residual branches, run sparsely (DynConv, SACT)"
    variants = tuple({"granularity": granularity} for granularity in GRANULARITIES)

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = SpatialMaskOptions.from_dict(options)
        wanted = None if opts.blocks == "all" else set(opts.blocks)
        known = {b.join for b in ctx.analysis.blocks}
        if wanted is not None and wanted - known:
            raise StrategyError(
                f"{sorted(wanted - known)} are not residual joins of this model; its residual "
                f"joins are {sorted(known)}."
            )
        chosen, skipped = [], []
        for block in ctx.analysis.blocks:
            if wanted is not None and block.join not in wanted:
                continue
            reason = _why_not(ctx, block, opts.granularity)
            if reason is None:
                chosen.append(block.join)
            else:
                skipped.append({"join": block.join, "reason": reason})
        if not chosen:
            detail = "; ".join(f"{s['join']}: {s['reason']}" for s in skipped) or "none found"
            raise StrategyError(
                "No residual block of this model can be masked spatially (" + detail + "). "
                "Spatial masks need residual blocks with stride-1 conv branches."
            )
        return {"blocks": chosen, "skipped": skipped, "options": asdict(opts)}

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> SpatialMaskModel:
        opts = SpatialMaskOptions.from_dict(plan.get("options"))
        by_join = {b.join: b for b in ctx.analysis.blocks}
        missing = [j for j in plan["blocks"] if j not in by_join]
        if missing:
            raise StrategyError(f"Planned blocks {missing} are not residual joins of this graph.")
        blocks = [by_join[j] for j in plan["blocks"]]
        # A new graph over the traced modules: the traced graph itself stays as it was.
        net = copy_graph_replacing(ctx.gm, class_name="SpatialMaskNet")
        names, wrappers = [], []
        for i, block in enumerate(blocks):
            entry_shape = ctx.node(block.entry).meta["tensor_meta"].shape
            out_shape = ctx.node(block.branch_output).meta["tensor_meta"].shape
            wrapper = SparseResidual(
                _lift_branch(ctx, block, i),
                in_channels=int(entry_shape[1]),
                out_channels=int(out_shape[1]),
                granularity=opts.granularity,
                tile=int(opts.tile),
                branch_macs=block.branch_macs,
                spatial=(int(entry_shape[2]), int(entry_shape[3])),
            )
            call = replace_region(
                net,
                block.branch,
                [block.entry],
                [block.branch_output],
                wrapper,
                WRAPPER_PREFIX,
                pass_name=self.name,
            )
            names.append(call.target)
            wrappers.append(wrapper)
        # This model never kept the traced graph's dead nodes (nor their modules' weights).
        net.graph.eliminate_dead_code()
        net.graph.lint()
        net.delete_all_unused_submodules()
        net.recompile()
        return SpatialMaskModel(
            net,
            names,
            block_names=[b.join for b in blocks],
            granularity=opts.granularity,
            budget=opts.budget,
            thresholds=[opts.threshold] * len(blocks),
            static_macs=ctx.analysis.total_macs,
            book=cost_book(ctx.analysis.total_macs, wrappers),
            input_shape=tuple(ctx.example_input.shape[1:]),
            num_classes=ctx.num_classes,
            distill_temperature=opts.distill_temperature,
            sparsity_weight=opts.sparsity_weight,
        ).eval()
