"""Typed options: one dataclass per strategy, and the fine-tuning configuration.

`dynify.convert(model, "early-exit", x, options=EarlyExitOptions(exits=3))` and the same as a
dict (`options={"exits": 3}`) are equivalent; the dataclasses document every option and its
default, and a dataclass of another strategy is refused. Numbers are checked here for every
strategy alike (finite; thresholds not negative; budgets in (0, 1]), so a NaN never reaches a
plan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dynify.errors import StrategyError
from dynify.passes.block_gates import BlockGatesOptions as BlockGateOptions
from dynify.passes.dynamic_conv import DynamicConvOptions
from dynify.passes.early_exit import EarlyExitOptions
from dynify.passes.resolution import ResolutionOptions
from dynify.passes.spatial_masks import SpatialMaskOptions
from dynify.train.distill import FinetuneConfig

StrategyOptions = (
    EarlyExitOptions
    | BlockGateOptions
    | SpatialMaskOptions
    | ResolutionOptions
    | DynamicConvOptions
)

OPTIONS_BY_STRATEGY: dict[str, type] = {
    "early-exit": EarlyExitOptions,
    "block-gates": BlockGateOptions,
    "spatial-masks": SpatialMaskOptions,
    "resolution": ResolutionOptions,
    "dynamic-conv": DynamicConvOptions,
}

# Options that are fractions of the static model's MACs, and options that must not be negative.
_FRACTIONS = ("budget", "head_budget")
_NON_NEGATIVE = ("threshold", "epsilon")
_POSITIVE = ("temperature", "distill_temperature")

__all__ = [
    "BlockGateOptions",
    "DynamicConvOptions",
    "EarlyExitOptions",
    "FinetuneConfig",
    "ResolutionOptions",
    "SpatialMaskOptions",
    "StrategyOptions",
    "options_dict",
]


def options_dict(strategy: str, options: Any) -> dict[str, Any]:
    """A strategy's options as the plain dict its pass reads, checked for bad numbers."""
    if options is None:
        return {}
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        expected = OPTIONS_BY_STRATEGY.get(strategy)
        if expected is not None and not isinstance(options, expected):
            raise StrategyError(
                f"{type(options).__name__} are not options of '{strategy}'; pass "
                f"{expected.__name__} (or a dict)."
            )
        data = dataclasses.asdict(options)
    elif isinstance(options, dict):
        data = dict(options)
    else:
        raise StrategyError(
            f"options must be a dict or a strategy's options dataclass (e.g. EarlyExitOptions), "
            f"got {type(options).__name__}."
        )
    for key, value in data.items():
        _check_number(strategy, key, value)
    exits = data.get("exits", 1)
    if exits is not None and (exits == [] or exits == 0 or exits == ""):
        raise StrategyError(
            f"{strategy} option exits asks for no exit at all; give a number of exits (e.g. 3), "
            "MAC fractions (0.25,0.5) or cut-point names."
        )
    return data


def _check_number(strategy: str, key: str, value: Any) -> None:
    values = value if isinstance(value, list | tuple) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if not math.isfinite(v):
            raise StrategyError(f"{strategy} option {key} must be a finite number, got {v}.")
        if key in _FRACTIONS and not 0.0 < v <= 1.0:
            raise StrategyError(
                f"{strategy} option {key} is a fraction of the static model's MACs in (0, 1]; "
                f"got {v}."
            )
        if key in _NON_NEGATIVE and v < 0:
            raise StrategyError(f"{strategy} option {key} must be 0 or more, got {v}.")
        if key in _POSITIVE and v <= 0:
            raise StrategyError(f"{strategy} option {key} must be positive, got {v}.")


@dataclasses.dataclass
class SkipRNNOptions:
    """Options of the skip-rnn strategy (Skip RNN, Campos et al. 2018).

    budget: the share of state updates (per sample and step) fine-tuning steers towards.
    threshold: the initial binarisation threshold (a step updates when the cumulative update
    probability u > 1 - threshold; 0: only the first step, above 1: every step). layer: the
    recurrent module to gate (default: the only one). gate_bias: the gate's initial bias (2:
    every step updates before fine-tuning). compute_weight, budget_rate: the PI controller that
    prices updates during fine-tuning. distill_temperature: the strategy's own distillation
    temperature.
    """

    budget: float = 0.5
    threshold: float = 0.5
    layer: str | None = None
    gate_bias: float = 2.0
    compute_weight: float = 4.0
    budget_rate: float = 0.01
    distill_temperature: float = 2.0


OPTIONS_BY_STRATEGY["skip-rnn"] = SkipRNNOptions
__all__.append("SkipRNNOptions")
