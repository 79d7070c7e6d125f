"""Resolution cascade (RANet-style): classify a downscaled input first, escalate when unsure.

Plan: check that the network accepts the input downscaled by `scale` (fully convolutional with
global pooling, as ResNets are) and count the MACs of that pass. Build: a ResolutionModel over
the traced network, with per-resolution batch-norm copies unless `low_bn` is off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dynify.errors import StrategyError
from dynify.frontend.cost import module_macs
from dynify.passes import register_strategy
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.runtime.policy import ExitPolicy
from dynify.runtime.resolution import DISTILL_TEMPERATURE, ResolutionModel, cost_book, downscale

POLICIES = ("confidence", "entropy")


@dataclass
class ResolutionOptions:
    """Options of the resolution strategy.

    scale: integer downscaling factor of the first pass (2: half the side, a quarter of the
    MACs). low_bn: give the low-resolution pass its own batch norms; low_head: and its own copy
    of the final linear classifier (when the network ends in one). policy/threshold: when a
    low-resolution prediction is good enough (threshold 0: always; above 1: never).
    distill_temperature: the distillation temperature of fine-tuning (unless it sets one).
    """

    scale: int = 2
    low_bn: bool = True
    low_head: bool = True
    policy: str = "confidence"
    threshold: float = 0.9
    distill_temperature: float = DISTILL_TEMPERATURE

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ResolutionOptions:
        opts = options_from_dict(cls, data, "resolution")
        if int(opts.scale) != opts.scale or opts.scale < 2:
            raise StrategyError(f"scale must be an integer of at least 2, got {opts.scale}.")
        if opts.policy not in POLICIES:
            raise StrategyError(
                f"The resolution cascade has one decision, so policy must be one of {POLICIES}; "
                f"got '{opts.policy}'."
            )
        return opts


@register_strategy
class Resolution:
    name = "resolution"
    summary = "low resolution first, full resolution only when unsure (RANet)"
    variants = tuple({"policy": kind} for kind in POLICIES)

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = ResolutionOptions.from_dict(options)
        shape = tuple(ctx.example_input.shape[1:])
        if len(shape) != 3:
            raise StrategyError(
                f"The resolution strategy needs image inputs [C, H, W]; this model takes {list(shape)}."
            )
        scale = int(opts.scale)
        if shape[1] % scale or shape[2] % scale:
            raise StrategyError(
                f"The input {shape[1]}x{shape[2]} is not divisible by scale {scale}; choose a "
                "scale that divides the input size."
            )
        low = torch.zeros(1, *shape)
        try:
            low_macs = module_macs(ctx.gm, downscale(low, scale))
            logits = ctx.gm(downscale(low, scale))
        except Exception as exc:
            raise StrategyError(
                f"The model does not accept {shape[1] // scale}x{shape[2] // scale} inputs "
                f"({type(exc).__name__}: {exc}); the resolution strategy needs a network with "
                "global pooling before its classifier."
            ) from exc
        if tuple(logits.shape) != (1, ctx.num_classes):
            raise StrategyError(
                f"At {shape[1] // scale}x{shape[2] // scale} the model returns "
                f"{list(logits.shape)} instead of [1, {ctx.num_classes}] logits."
            )
        return {"options": asdict(opts), "low_macs": int(low_macs)}

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> ResolutionModel:
        opts = ResolutionOptions.from_dict(plan.get("options"))
        return ResolutionModel(
            ctx.gm,
            scale=int(opts.scale),
            low_bn=bool(opts.low_bn),
            low_head=bool(opts.low_head),
            book=cost_book(ctx.analysis.total_macs, int(plan["low_macs"])),
            policy=ExitPolicy(opts.policy),
            threshold=float(opts.threshold),
            static_macs=ctx.analysis.total_macs,
            input_shape=tuple(ctx.example_input.shape[1:]),
            num_classes=ctx.num_classes,
            distill_temperature=opts.distill_temperature,
        ).eval()
