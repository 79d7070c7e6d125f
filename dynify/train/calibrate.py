"""Choosing thresholds: the most accuracy for a MAC budget, or the fewest MACs for an accuracy.

For early exits everything needed is in one pass: the logits of every exit for every
calibration sample (`collect_outputs`). Temperatures are fitted per exit first (temperature
scaling, Guo et al. 2017), then the exit rule is *simulated* for candidate thresholds exactly as
the runtime applies it (same scores, same float32 comparisons), so the search costs no further
forward passes. The search is a Lagrangian one: for a range of prices of compute, coordinate
ascent over per-exit thresholds maximises accuracy - price * MACs; every configuration visited
is a candidate, and the best one meeting the target is kept.

Cascades of exits (`ExitCascade`) are searched that way, and so are exits decided by learned
gates (`GatedExits`: frame-exit's gate model), whose gate logits are collected in the same
pass and whose gate rule is simulated instead of an exit policy; other strategies plug in through
the contract alone: `set_thresholds(t)` with a scalar t
(0 = cheapest, > 1 = the static network's work) swept and bisected with real forward passes.

Decision scalars besides the thresholds (`DecisionScalars`: stop-reading's jump threshold) are
chosen with them: the thresholds are searched at every value of the scalar's small grid, on
the same data, and the value whose best thresholds best meet the target is kept on the model
(saved with it, used by its export). Given precomputed `ExitOutputs`, which were collected at
one value, the scalars stay as they are.

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
from itertools import product
from typing import Any

import torch

from dynify.errors import DataError, DynifyError, StrategyError
from dynify.heldout import Part, calibration_part
from dynify.runtime.decisions import NEVER
from dynify.runtime.early_exit import EarlyExitModel
from dynify.runtime.model import DecisionScalars, DynamicModel, ExitCascade, GatedExits
from dynify.train.batches import Batches, Preprocessing
from dynify.train.ensemble import fit_ensemble
from dynify.train.exit_outputs import (
    ExitOutputs,
    collect_outputs,
    data_batches,
    one_thread,
)
from dynify.train.scalar_sweep import calibrate_by_sweep, measure
from dynify.train.targets import CalibrationResult, check_target, choose_point, pareto_front
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
    "scalar_grid",
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
    A model with decision scalars (`DecisionScalars`: stop-reading's jump threshold) gets them
    chosen from their grid with the thresholds; the result's `scalars` says which.
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
    args = (
        budget,
        max_drop,
        mac_cap,
        fit_temperature_scaling,
        split,
        batch_size,
        preprocessing,
        ensemble,
    )
    grid = scalar_grid(dyn)
    has_target = budget is not None or max_drop is not None
    if not grid or not has_target or isinstance(data, ExitOutputs):
        if grid and has_target:
            logger.info(
                "dynify.calibrate: outputs given, so the decision scalars stay at %s.",
                dyn.scalar_values(),  # type: ignore[union-attr]
            )
        result = _calibrate_thresholds(dyn, data, *args)
        if isinstance(dyn, DecisionScalars) and dyn.scalar_values():
            _record_scalars(dyn, result, dyn.scalar_values(), [])
        return result
    assert isinstance(dyn, DecisionScalars)
    return _sweep_scalars(dyn, grid, data, args)


def scalar_grid(dyn: DynamicModel) -> list[dict[str, float]]:
    """Every setting of `dyn`'s decision scalars calibration tries (`DecisionScalars`: the
    product of their grids), or [] for a model without any."""
    if not isinstance(dyn, DecisionScalars):
        return []
    grids = dyn.decision_scalars()
    if not grids:
        return []
    names = list(grids)
    return [dict(zip(names, values, strict=True)) for values in product(*grids.values())]


def _sweep_scalars(
    dyn: DecisionScalars, grid: list[dict[str, float]], data: Any, args: tuple
) -> CalibrationResult:
    """The thresholds searched at every setting of the decision scalars on the same data; the
    setting whose best thresholds best meet the target is kept (the cheapest within the drop,
    or the most accurate within the budget), and set on the model with them."""
    budget, max_drop = args[0], args[1]
    held = dyn.scalar_values()
    results, grid_rows, error = [], [], None
    for setting in grid:
        for name, value in setting.items():
            dyn.set_scalar(name, value)
        try:
            result = _calibrate_thresholds(dyn, data, *args)  # type: ignore[arg-type]
        except DynifyError as exc:  # the target cannot be met at this setting
            error = exc
            grid_rows.append({**setting, "met": False})
            continue
        results.append((setting, result))
        grid_rows.append(
            {**setting, "met": True, "accuracy": result.accuracy, "macs": result.macs_fraction}
        )
        logger.info("dynify.calibrate: at %s: %s", setting, grid_rows[-1])
    if not results:
        for name, value in held.items():
            dyn.set_scalar(name, value)
        assert error is not None
        raise error
    accuracy = torch.tensor([r.accuracy for _, r in results], dtype=torch.float64)
    macs = torch.tensor([r.macs_fraction for _, r in results], dtype=torch.float64)
    static_acc = results[0][1].static_accuracy
    setting, best = results[choose_point(accuracy, macs, budget, max_drop, static_acc)]
    for name, value in setting.items():
        dyn.set_scalar(name, value)
    every = [p for _, r in results for p in r.frontier]
    if every:
        best.frontier = pareto_front(
            torch.tensor([m for m, _ in every], dtype=torch.float64),
            torch.tensor([a for _, a in every], dtype=torch.float64),
        )
    apply_calibration(dyn, best)  # type: ignore[arg-type]
    _record_scalars(dyn, best, setting, grid_rows)  # type: ignore[arg-type]
    return best


def _record_scalars(
    dyn: DynamicModel,
    result: CalibrationResult,
    values: dict[str, float],
    grid_rows: list[dict[str, Any]],
) -> None:
    result.scalars = {name: round(float(v), 6) for name, v in values.items()}
    result.scalar_grid = grid_rows
    if isinstance(dyn.spec.get("calibration"), dict):
        dyn.spec["calibration"]["scalars"] = result.scalars
        dyn.spec["calibration"]["scalar_grid"] = grid_rows


def _calibrate_thresholds(
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
    """The thresholds (and temperatures) alone, at the decision scalars the model holds."""
    if not isinstance(dyn, ExitCascade | GatedExits):
        return calibrate_by_sweep(
            dyn, data, budget, max_drop, mac_cap, split, batch_size, preprocessing
        )
    if isinstance(dyn, GatedExits) and mac_cap is not None:
        dyn.set_mac_cap(mac_cap)  # type: ignore[attr-defined]  # the cap the gates serve under
        if isinstance(data, ExitOutputs):  # collected before: what exits cost under the cap
            data = replace(data, exit_macs=list(dyn.exit_macs()))
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
