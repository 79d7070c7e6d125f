"""Moving what was trained or chosen into the model that serves: new parts (heads, gates)
from one dynamic model to another, and an operating point's settings.

The parts a conversion adds learn on the static network's outputs only when that network is
frozen (`finetune`'s heads mode). What they learn can then be trained once on a cheap stand-in
converted alike (a clip model whose per-frame network replays cached per-frame logits, say)
and copied into the model that serves.
"""

from __future__ import annotations

import torch

from dynify.errors import StrategyError
from dynify.runtime.model import DynamicModel, ExitCascade
from dynify.train.distill import static_parameter_names
from dynify.train.operating_point import OperatingPoint, held_scalars, set_scalars


def new_parameters(dyn: DynamicModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the strategy added (exit heads, gates, routers...), named and in module
    order: those the static network does not use, which fine-tuning in "heads" mode trains. To
    count, freeze, copy or re-initialise a model's new parts without knowing how a strategy
    holds them."""
    static = static_parameter_names(dyn)
    return [(name, p) for name, p in dyn.named_parameters() if name not in static]


def copy_new_parts(source: DynamicModel, target: DynamicModel) -> list[str]:
    """Copy every parameter `source`'s conversion added into `target`'s, which must have been
    converted with the same strategy and the same parts (same names and shapes); returns the
    names copied. The static networks, thresholds and temperatures are left alone."""
    if source.strategy != target.strategy:
        raise StrategyError(
            f"Cannot copy the new parts of a {source.strategy} model into a {target.strategy} "
            "model: convert both with the same strategy and options."
        )
    theirs, ours = dict(new_parameters(source)), dict(new_parameters(target))
    if set(theirs) != set(ours) or any(theirs[n].shape != ours[n].shape for n in theirs):
        raise StrategyError(
            "The two models' new parts differ (names or shapes): convert both with the same "
            f"options. Source: {sorted(theirs)}; target: {sorted(ours)}."
        )
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(theirs[name].to(p.device, p.dtype))
    return sorted(ours)


def use_operating_point(dyn: DynamicModel, point: OperatingPoint) -> None:
    """Serve `dyn` at an operating point (`operating_points`): its thresholds, for an exit
    cascade its temperatures, which calibration fitted with them, and its decision scalars
    (`DecisionScalars`: stop-reading's jump threshold), which the thresholds were chosen at."""
    if set(point.scalars) - set(held_scalars(dyn)):
        raise StrategyError(
            f"The operating point was measured at decision scalars {point.scalars}; this "
            f"{dyn.strategy} model has {held_scalars(dyn) or 'none'}: it was chosen for "
            "another model."
        )
    dyn.set_thresholds(point.thresholds)
    if point.temperatures:
        if not isinstance(dyn, ExitCascade):
            raise StrategyError(
                f"The operating point carries exit temperatures; a {dyn.strategy} model has none."
            )
        values = torch.tensor(point.temperatures, dtype=dyn.temperatures.dtype)
        if values.shape != dyn.temperatures.shape:
            raise StrategyError(
                f"The operating point has {values.numel()} temperatures, the model "
                f"{dyn.temperatures.numel()} exits: it was chosen for another model."
            )
        dyn.temperatures.copy_(values)
    set_scalars(dyn, point.scalars)
