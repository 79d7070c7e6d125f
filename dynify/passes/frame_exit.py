"""frame-exit (FrameExit, Ghodrati et al. CVPR 2021): a clip model looks at its frames one at a
time and stops once the running average of their logits is sure.

Plan: find the clip pattern (`dynify.frontend.clips`: fold the frames into the batch, a
per-frame network, unfold, mean over time) and fix the order the frames are looked at. Build:
lift the per-frame network into its own GraphModule (`lift_region`) and hand it, with the whole
traced graph for static mode, to a FrameExitModel. Like early exits, an exit ends the forward
pass for the clips that take it, so the model is a loop in Python, not a rewritten graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dynify.errors import StrategyError
from dynify.frontend.clips import clip_pattern
from dynify.frontend.cost import module_macs
from dynify.passes import register_strategy
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.passes.rewrite import lift_region
from dynify.runtime.frame_exit import (
    GATE_TARGETS,
    ExitGate,
    FrameExitModel,
    FrameGateModel,
    cost_book,
    frame_groups,
)
from dynify.runtime.policy import POLICIES, ExitPolicy

ORDERS = ("strided", "sequential")
GATE = "gate"  # the policy of a learned exit gate per decision (FrameExit)


@dataclass
class FrameExitOptions:
    """Options of the frame-exit strategy.

    order: which frame is looked at next. 'strided' (coarse to fine: the first frame, the
    middle, the quarters, the eighths...: each new frame is far from those seen, so the
    running average covers the clip early) or 'sequential' (0, 1, 2...), or an explicit
    permutation of the frame indices. policy / patience / threshold: the exit rule on the
    running average (`dynify.runtime.policy`), as for early exits. group: frames per
    decision: the order is cut into groups of this many frames, each run as one batch with
    one exit after it (1: a decision after every frame). Per-frame networks that run a few
    frames in much less time than one each (small CNNs at batch 1 on CPU) turn saved frames
    into saved time better with 2 than with 1, at a coarser granularity.
    policy 'gate': FrameExit's learned gate after each group instead of an exit policy (an
    MLP of `gate_hidden` units on the running average and its sorted probabilities), trained
    by `dynify.finetune` (heads mode: the per-frame network frozen) to predict whether the
    running prediction is not yet the all-frame one (gate_target 'final', no labels needed)
    or not yet right ('correct', FrameExit's target, with labels); a clip looks further when
    the gate's p > 1 - threshold. Calibration sweeps its thresholds with real forward passes.
    """

    order: str | list[int] = "strided"
    policy: str = "confidence"
    patience: int = 2
    threshold: float = 0.9
    group: int = 1
    gate_hidden: int = 16
    gate_target: str = "final"

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> FrameExitOptions:
        return options_from_dict(cls, data, "frame-exit")


def frame_order(order: str | list[int], frames: int) -> list[int]:
    """The frame indices in the order they are looked at (a permutation of range(frames))."""
    if isinstance(order, list):
        if sorted(int(i) for i in order) != list(range(frames)):
            raise StrategyError(
                f"order {order} is not a permutation of the {frames} frame indices 0..{frames - 1}."
            )
        return [int(i) for i in order]
    if order == "sequential":
        return list(range(frames))
    if order != "strided":
        raise StrategyError(f"Unknown frame order '{order}'; one of {ORDERS} or a list of indices.")
    seen, level = [0], [(0, frames)]
    while level:  # breadth first over halvings: coarse to fine
        following = []
        for lo, hi in level:
            mid = (lo + hi) // 2
            if mid <= lo:
                continue
            if mid not in seen:
                seen.append(mid)
            following += [(lo, mid), (mid, hi)]
        level = following
    return seen + [i for i in range(frames) if i not in seen]


@register_strategy
class FrameExit:
    name = "frame-exit"
    summary = "clip models look at frames one at a time and stop once sure (FrameExit)"
    # groups of frames: 2 (even), 3 of 4 (a shorter last group, one exit)
    variants = (
        *({"policy": kind} for kind in POLICIES),
        {"group": 2},
        {"group": 3},
        {"policy": GATE},
        {"policy": GATE, "group": 3},
    )
    contract_example = "clip"

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = FrameExitOptions.from_dict(options)
        if opts.policy == GATE:
            if opts.gate_hidden < 1 or opts.gate_target not in GATE_TARGETS:
                raise StrategyError(
                    f"gate_hidden must be at least 1 (got {opts.gate_hidden}) and gate_target "
                    f"one of {GATE_TARGETS} (got '{opts.gate_target}')."
                )
            policy = {"kind": GATE, "patience": opts.patience}
        else:
            policy = ExitPolicy(opts.policy, opts.patience).to_dict()  # validates
        pattern = clip_pattern(ctx.gm)
        if pattern.frames < 2:
            raise StrategyError(
                "frame-exit needs clips of at least 2 frames to stop early; the example input "
                f"has {pattern.frames}. Convert with an example of the clip length you run."
            )
        if not 1 <= opts.group < pattern.frames:
            raise StrategyError(
                f"group={opts.group}: frames per decision must be at least 1 and fewer than the "
                f"clip's {pattern.frames} frames, or no clip could stop early."
            )
        return {
            "frames": pattern.frames,
            "group": opts.group,
            "order": frame_order(opts.order, pattern.frames),
            "policy": policy,
            "options": asdict(opts),
        }

    def build(
        self, ctx: ConversionContext, plan: dict[str, Any]
    ) -> FrameExitModel | FrameGateModel:
        pattern = clip_pattern(ctx.gm)
        if pattern.frames != plan["frames"]:
            raise StrategyError(
                f"The plan is for clips of {plan['frames']} frames, the example has "
                f"{pattern.frames}."
            )
        frame = lift_region(
            ctx.gm, pattern.frame_nodes, [pattern.fold], [pattern.frame_output], "FrameNetwork"
        )
        options = plan.get("options", {})
        group = int(plan.get("group", 1))
        groups = len(frame_groups(range(pattern.frames), group))
        common = {
            "order": [int(i) for i in plan["order"]],
            "group": group,
            "thresholds": [float(options.get("threshold", 0.9))] * (groups - 1),
            "static_macs": ctx.analysis.total_macs,
            "input_shape": tuple(ctx.example_input.shape[1:]),
            "num_classes": ctx.num_classes,
        }
        book = cost_book(ctx.analysis.total_macs, pattern.frame_macs, pattern.frames, group)
        if plan["policy"]["kind"] != GATE:
            policy = ExitPolicy(**plan["policy"])
            return FrameExitModel(ctx.gm, frame, book=book, policy=policy, **common)
        hidden = int(options.get("gate_hidden", 16))
        # a gate's MACs as FlopCounterMode counts them (its linear layers)
        gate_macs = module_macs(ExitGate(ctx.num_classes, hidden), torch.zeros(1, ctx.num_classes))
        book = cost_book(
            ctx.analysis.total_macs, pattern.frame_macs, pattern.frames, group, gate_macs
        )
        return FrameGateModel(
            ctx.gm,
            frame,
            hidden=hidden,
            target=str(options.get("gate_target", "final")),
            book=book,
            **common,
        )
