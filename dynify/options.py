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
from dynify.passes.dynamic_width import DynamicWidthOptions
from dynify.passes.early_exit import EarlyExitOptions
from dynify.passes.frame_exit import FrameExitOptions
from dynify.passes.resolution import ResolutionOptions
from dynify.passes.skip_rnn import SkipRNNOptions
from dynify.passes.spatial_masks import SpatialMaskOptions
from dynify.passes.stop_reading import StopReadingOptions
from dynify.train.distill import FinetuneConfig

StrategyOptions = (
    EarlyExitOptions
    | BlockGateOptions
    | SpatialMaskOptions
    | ResolutionOptions
    | DynamicConvOptions
    | DynamicWidthOptions
    | StopReadingOptions
    | FrameExitOptions
    | SkipRNNOptions
)

OPTIONS_BY_STRATEGY: dict[str, type] = {
    "early-exit": EarlyExitOptions,
    "block-gates": BlockGateOptions,
    "spatial-masks": SpatialMaskOptions,
    "resolution": ResolutionOptions,
    "dynamic-conv": DynamicConvOptions,
    "dynamic-width": DynamicWidthOptions,
    "stop-reading": StopReadingOptions,
    "frame-exit": FrameExitOptions,
    "skip-rnn": SkipRNNOptions,
}

# Options that are fractions of the static model's MACs, and options that must not be negative.
_FRACTIONS = ("budget", "head_budget")
_NON_NEGATIVE = ("threshold", "epsilon")
_POSITIVE = ("temperature", "distill_temperature")
# Fractions of something other than the static model's MACs, by (strategy, option).
_SHARE_OF = {
    ("stop-reading", "budget"): "the share of its own tokens a text reads",
    ("skip-rnn", "budget"): "the share of state updates (per sample and step)",
}

__all__ = [
    "BlockGateOptions",
    "DynamicConvOptions",
    "DynamicWidthOptions",
    "EarlyExitOptions",
    "FinetuneConfig",
    "FrameExitOptions",
    "ResolutionOptions",
    "SkipRNNOptions",
    "SpatialMaskOptions",
    "StopReadingOptions",
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
            what = _SHARE_OF.get((strategy, key), "a fraction of the static model's MACs")
            raise StrategyError(f"{strategy} option {key} is {what}, in (0, 1]; got {v}.")
        if key in _NON_NEGATIVE and v < 0:
            raise StrategyError(f"{strategy} option {key} must be 0 or more, got {v}.")
        if key in _POSITIVE and v <= 0:
            raise StrategyError(f"{strategy} option {key} must be positive, got {v}.")
