"""Choosing thresholds: the most accuracy for a MAC budget, or the fewest MACs for an accuracy.

For early exits everything needed is in one pass: the logits of every exit for every
calibration sample (`collect_outputs`). Temperatures are fitted per exit first (temperature
scaling, Guo et al. 2017), then the exit rule is *simulated* for candidate thresholds exactly as
the runtime applies it (same scores, same float32 comparisons), so the search costs no further
forward passes. The search is a Lagrangian one: for a range of prices of compute, coordinate
ascent over per-exit thresholds maximises accuracy - price * MACs; every configuration visited
is a candidate, and the best one meeting the target is kept.

Cascades of exits (`ExitCascade`) are searched that way; other strategies plug in through
the contract alone: `set_thresholds(t)` with a scalar t
(0 = cheapest, > 1 = the static network's work) swept and bisected with real forward passes.

Anytime mode (`mac_cap`): the deepest exit whose cost fits the cap gets threshold 0, so every
sample leaves there at the latest: no input, however crafted, spends more than the cap. Block
gates and spatial masks hold the cap themselves (`MacCapped.set_mac_cap`, the rule in
`dynify.runtime.mac_cap`): it is set before their thresholds are swept.

The parts: `exit_outputs` (collecting logits), `temperature`, `threshold_search`,
`scalar_sweep` and `targets` (checking a target, the result); the names are re-exported here.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from dynify.errors import DataError, StrategyError
from dynify.heldout import Part, calibration_part
from dynify.runtime.decisions import NEVER
from dynify.runtime.early_exit import EarlyExitModel
from dynify.runtime.model import DynamicModel, ExitCascade
from dynify.train.batches import Batches, Preprocessing
from dynify.train.ensemble import fit_ensemble
from dynify.train.exit_outputs import (
    ExitOutputs,
    collect_outputs,
    data_batches,
    one_thread,
)
from dynify.train.scalar_sweep import calibrate_by_sweep, measure
from dynify.train.targets import CalibrationResult, check_target
from dynify.train.temperature import fit_temperature, fit_temperatures
from dynify.train.threshold_search import ThresholdSearch, search_thresholds, simulate

__all__ = [
    "NEVER",
    "CalibrationResult",
    "ExitOutputs",
    "ThresholdSearch",
    "apply_calibration",
    "calibrate",
    "check_target",
    "collect_outputs",
    "data_batches",
    "fit_ensemble",
    "fit_temperature",
    "fit_temperatures",
    "measure",
    "one_thread",
    "search_thresholds",
    "simulate",
]

logger = logging.getLogger("dynify")


def calibrate(
    dyn: DynamicModel,
    data: Any,
    *,
    budget: float | None = None,
    max_drop: float | None = None,
    mac_cap: float | None = None,
    part: Part = "auto",
    calibration_fraction: float | None = None,
    seed: int | None = None,
    fit_temperature_scaling: bool = True,
    split: str | None = None,
    batch_size: int = 256,
    preprocessing: Preprocessing | None = None,
    ensemble: bool = False,
) -> CalibrationResult:
    """Set `dyn`'s thresholds (and temperatures) from calibration data; returns what they reach.

    Exactly one target: `budget`, the mean MACs allowed as a fraction of the static model's
    (accuracy is maximised under it), or `max_drop`, the accuracy the dynamic model may lose
    against its own static network (MACs are minimised under it). `mac_cap` (a fraction of the
    static MACs) caps every sample's MACs: anytime inference; alone, it only sets the cap.
    Which data: with `part="auto"` (default), if `data` is the data `dyn` was fine-tuned on, the
    part fine-tuning held out (its `calibration_fraction` and `seed`, unless given); otherwise
    all of `data` (or precomputed `ExitOutputs`). `part="calibration"` always takes the held-out
    part, `part="all"` all of the data. The result's `data` (also in `dyn.spec["calibration"]`)
    says which part was used.
    `ensemble` first fits Zero Time Waste's ensemble of the heads (`dynify.train.ensemble`) on
    the same data, so each exit answers with the evidence of every head before it.
    """
    check_target(budget, max_drop, mac_cap)
    if isinstance(data, ExitOutputs | Batches):
        description = "the outputs given" if isinstance(data, ExitOutputs) else "the batches given"
    else:
        chosen = calibration_part(
            dyn, data, split=split, part=part, fraction=calibration_fraction, seed=seed
        )
        data, description = chosen.dataset, chosen.description
        split = None  # the part is already taken from the split
        if chosen.trained_on:
            logger.warning("dynify.calibrate: calibrating on %s.", description)
    logger.info("dynify.calibrate: calibrating on %s.", description)
    result = _calibrate_on(
        dyn,
        data,
        budget,
        max_drop,
        mac_cap,
        fit_temperature_scaling,
        split,
        batch_size,
        preprocessing,
        ensemble,
    )
    result.data = description
    if isinstance(dyn.spec.get("calibration"), dict):
        dyn.spec["calibration"]["data"] = description
    return result


def _calibrate_on(
    dyn: DynamicModel,
    data: Any,
    budget: float | None,
    max_drop: float | None,
    mac_cap: float | None,
    fit_temperature_scaling: bool,
    split: str | None,
    batch_size: int,
    preprocessing: Preprocessing | None,
    ensemble: bool,
) -> CalibrationResult:
    if not isinstance(dyn, ExitCascade):
        return calibrate_by_sweep(
            dyn, data, budget, max_drop, mac_cap, split, batch_size, preprocessing
        )
    outputs = (
        data
        if isinstance(data, ExitOutputs)
        else collect_outputs(
            dyn,
            data,
            split=split,
            batch_size=batch_size,
            preprocessing=preprocessing,
            raw=ensemble,
        )
    )
    if ensemble:
        if not isinstance(dyn, EarlyExitModel):
            raise StrategyError(f"{type(dyn).__name__} has no exit ensemble to fit.")
        dyn.ensemble.copy_(fit_ensemble(outputs))
        outputs = replace(outputs, logits=dyn.combine(outputs.logits), raw=False)
    if outputs.num_samples < 20:
        raise DataError(
            f"Only {outputs.num_samples} calibration samples; thresholds chosen on so few would "
            "not hold on new data. Use a few hundred or more."
        )
    search = search_thresholds(
        dyn,
        outputs,
        mac_cap=mac_cap,
        fit_temperature_scaling=fit_temperature_scaling,
        keep=budget is None and max_drop is None,
    )
    result = search.choose(budget=budget, max_drop=max_drop)
    apply_calibration(dyn, result)
    return result


def apply_calibration(dyn: DynamicModel, result: CalibrationResult) -> None:
    """Set the thresholds and temperatures of `result` on `dyn` (and record it in its spec)."""
    dyn.set_thresholds(result.thresholds)
    if result.temperatures:
        dyn.temperatures.copy_(torch.tensor(result.temperatures, dtype=dyn.temperatures.dtype))
    dyn.spec["calibration"] = result.to_dict()
