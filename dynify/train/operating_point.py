"""Operating points: thresholds chosen on calibration data, what they reach on test data,
and the rule that picks the one to report.

`calibrate` sets one operating point; a benchmark (or a deployment choosing its trade-off)
needs the whole curve measured honestly: each point is chosen on the calibration data alone and
then measured on data nothing was fitted on. Early-exit models are measured from one pass of
cached exit logits per data set (the runtime's rule simulated exactly); other strategies by real
forward passes through the contract's scalar threshold. A model with decision scalars besides
its thresholds (`DecisionScalars`: stop-reading's jump threshold) has them chosen with the
thresholds for each target, as `calibrate` does, and each point is measured at its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dynify.errors import DynifyError
from dynify.runtime.model import DecisionScalars, DynamicModel, ExitCascade, GatedExits
from dynify.train.batches import Preprocessing
from dynify.train.calibrate import calibrate, scalar_grid
from dynify.train.exit_outputs import collect_outputs, data_batches
from dynify.train.scalar_sweep import measure
from dynify.train.threshold_search import simulate

__all__ = ["OperatingPoint", "choose_operating_point", "operating_points"]


@dataclass
class OperatingPoint:
    """Thresholds chosen for `target` on calibration data, and what they reach on both sets.
    `scalars`: the decision scalars the point was measured at (`DecisionScalars`; empty for a
    model without any)."""

    target: dict[str, float]
    thresholds: list[float]
    temperatures: list[float]
    calibration_accuracy: float
    calibration_macs: float
    test_accuracy: float
    test_macs: float
    scalars: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def operating_points(
    dyn: DynamicModel,
    calibration: Any,
    test: Any,
    *,
    budgets: Iterable[float] = (),
    max_drops: Iterable[float] = (),
    thresholds: Iterable[float] = (),
    batch_size: int = 256,
    preprocessing: Preprocessing | None = None,
) -> list[OperatingPoint]:
    """One point per target: per MAC `budget` and per `max_drop` the thresholds `calibrate`
    chooses on `calibration` (with the decision scalars, if the model has any), per scalar
    threshold in `thresholds` that threshold itself (at the decision scalars the model holds);
    each measured on `calibration` and `test`. Targets the calibration data cannot meet are
    left out. `dyn`'s thresholds, temperatures and decision scalars are restored afterwards."""
    thresholds = list(thresholds)
    cal = data_batches(dyn, calibration, batch_size=batch_size, preprocessing=preprocessing)
    tst = data_batches(dyn, test, batch_size=batch_size, preprocessing=preprocessing)
    cascade = isinstance(dyn, ExitCascade | GatedExits)
    held = held_scalars(dyn)
    # Exit cascades (and gated exits) are measured by simulating the exit rule on every exit's
    # logits, collected once per setting of the decision scalars; others by running the model.
    outputs: dict[tuple[tuple[str, float], ...], tuple[Any, Any]] = {}

    def data_now() -> tuple[Any, Any]:
        """The calibration and test data as the model scores them at its decision scalars."""
        if not cascade:
            return cal, tst
        key = tuple(sorted(held_scalars(dyn).items()))
        if key not in outputs:
            outputs[key] = collect_outputs(dyn, cal), collect_outputs(dyn, tst)
        return outputs[key]

    def reach(data: Any) -> tuple[float, float]:
        acc, macs, _ = (simulate if cascade else measure)(dyn, data)
        return acc, macs

    saved_thresholds = dyn.thresholds.clone()
    saved_temperatures = dyn.temperatures.clone() if isinstance(dyn, ExitCascade) else None
    points: list[OperatingPoint] = []
    targets = [{"budget": float(b)} for b in budgets] + [{"max_drop": float(d)} for d in max_drops]
    # With decision scalars calibration collects the calibration data at each of their values
    # itself, so it is given the data, not outputs collected at one value.
    sweeps = bool(scalar_grid(dyn))
    try:
        for target in targets:
            try:
                result = calibrate(dyn, cal if sweeps else data_now()[0], **target)
            except DynifyError:
                continue
            test_acc, test_macs = reach(data_now()[1])
            points.append(
                OperatingPoint(
                    target,
                    [float(t) for t in result.thresholds],
                    [float(t) for t in result.temperatures],
                    result.accuracy,
                    result.macs_fraction,
                    test_acc,
                    test_macs,
                    held_scalars(dyn),
                )
            )
        set_scalars(dyn, held)
        cal_data, test_data = data_now() if thresholds else (None, None)
        if saved_temperatures is not None:
            dyn.temperatures.copy_(saved_temperatures)
        for t in thresholds:
            dyn.set_thresholds(float(t))
            cal_acc, cal_macs = reach(cal_data)
            test_acc, test_macs = reach(test_data)
            points.append(
                OperatingPoint(
                    {"threshold": float(t)},
                    [float(v) for v in dyn.thresholds.flatten()],
                    [float(v) for v in saved_temperatures]
                    if saved_temperatures is not None
                    else [],
                    cal_acc,
                    cal_macs,
                    test_acc,
                    test_macs,
                    held_scalars(dyn),
                )
            )
    finally:
        dyn.thresholds.copy_(saved_thresholds)
        if saved_temperatures is not None:
            dyn.temperatures.copy_(saved_temperatures)
        set_scalars(dyn, held)
    return points


def held_scalars(dyn: DynamicModel) -> dict[str, float]:
    """The decision scalars `dyn` holds (`DecisionScalars`), {} for a model without any."""
    return dict(dyn.scalar_values()) if isinstance(dyn, DecisionScalars) else {}


def set_scalars(dyn: DynamicModel, values: dict[str, float]) -> None:
    for name, value in values.items():
        dyn.set_scalar(name, value)  # type: ignore[attr-defined]


def choose_operating_point(
    points: Sequence[OperatingPoint],
    *,
    max_macs: float | None = None,
    min_accuracy: float | None = None,
) -> OperatingPoint:
    """The point to report, judged on calibration figures only (never on test).

    `max_macs`: the most accurate point within that MAC fraction (a tie goes to fewer MACs);
    if none fits, the cheapest. `min_accuracy`: the cheapest point at least that accurate; if
    none is, the most accurate. Exactly one of the two.
    """
    if (max_macs is None) == (min_accuracy is None):
        raise DynifyError("Choose an operating point by exactly one of max_macs or min_accuracy.")
    if not points:
        raise DynifyError("There are no operating points to choose from.")
    if max_macs is not None:
        within = [p for p in points if p.calibration_macs <= max_macs]
        if not within:
            return min(points, key=lambda p: p.calibration_macs)
        return max(within, key=lambda p: (p.calibration_accuracy, -p.calibration_macs))
    good = [p for p in points if p.calibration_accuracy >= min_accuracy]
    if not good:
        return max(points, key=lambda p: (p.calibration_accuracy, -p.calibration_macs))
    return min(good, key=lambda p: (p.calibration_macs, -p.calibration_accuracy))
