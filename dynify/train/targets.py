"""Calibration targets and results: check a target, pick the measured configuration that
meets it best, and record what it reaches (shared by the threshold search and the sweep)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dynify.errors import DynifyError


@dataclass
class CalibrationResult:
    """The thresholds chosen, and what they reach on the calibration data."""

    thresholds: list[float]
    temperatures: list[float]
    target: dict[str, float]
    accuracy: float
    macs_fraction: float
    static_accuracy: float
    samples: int
    method: str
    forced_exit: int | None = None
    labels_used: bool = True
    data: str = ""  # which data (or part of it) the thresholds were chosen on
    frontier: list[tuple[float, float]] = field(default_factory=list)  # (MACs, accuracy)
    # The decision scalars chosen with the thresholds (`DecisionScalars`: stop-reading's jump
    # threshold), and what the best thresholds reached at each value of their grid.
    scalars: dict[str, float] = field(default_factory=dict)
    scalar_grid: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, frontier: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not frontier:
            data.pop("frontier")
        return data


def check_target(
    budget: float | None, max_drop: float | None, mac_cap: float | None = None
) -> None:
    """Refuse impossible targets before any work (and before anything is written)."""
    if budget is not None and max_drop is not None:
        raise DynifyError("Give either a MAC budget (--budget) or an accuracy drop (--max-drop).")
    if budget is None and max_drop is None and mac_cap is None:
        raise DynifyError(
            "Give a target: --budget FRACTION (mean MACs as a fraction of the static model's, in "
            "(0, 1]), --max-drop FRACTION (accuracy drop allowed, e.g. 0.005) or --mac-cap."
        )
    if budget is not None and not (0.0 < budget <= 1.0):
        raise DynifyError(
            f"The budget is a fraction of the static model's MACs in (0, 1]; got {budget}."
        )
    if max_drop is not None and not (0.0 <= max_drop < 1.0):
        raise DynifyError(
            f"--max-drop is an accuracy fraction in [0, 1) (0.005 = half a point); got {max_drop}."
        )
    if mac_cap is not None and not mac_cap > 0:
        raise DynifyError(
            f"--mac-cap must be a positive fraction of the static MACs; got {mac_cap}."
        )


def choose_point(
    accuracy: torch.Tensor,
    macs: torch.Tensor,
    budget: float | None,
    max_drop: float | None,
    static_acc: float,
) -> int:
    """The index of the best configuration for the target (0, the starting one, without)."""
    if budget is not None:
        feasible = macs <= budget + 1e-12
        if not bool(feasible.any()):
            raise DynifyError(
                f"No thresholds reach a mean of {budget:.3f} of the static MACs on this data: "
                f"the cheapest setting (every sample at the first exit it can take) costs "
                f"{float(macs.min()):.3f}. Raise the budget, or convert with an earlier exit."
            )
        # Most accurate; among equals the one spending most of the budget, which holds up
        # best on new data when a small calibration set makes many settings look perfect.
        key = torch.where(feasible, accuracy + 1e-9 * macs, torch.full_like(accuracy, -1.0))
        return int(torch.argmax(key))
    if max_drop is not None:
        feasible = accuracy >= static_acc - max_drop - 1e-12
        if not bool(feasible.any()):
            raise DynifyError("No thresholds keep the accuracy within the drop asked for.")
        key = torch.where(feasible, macs - 1e-9 * accuracy, torch.full_like(macs, 1e9))
        return int(torch.argmin(key))
    return 0


def pareto_front(macs: torch.Tensor, accuracy: torch.Tensor) -> list[tuple[float, float]]:
    """(MACs, accuracy) points no other point beats on both."""
    frontier, best = [], -1.0
    order = sorted(zip(macs.tolist(), accuracy.tolist(), strict=True), key=lambda p: (p[0], -p[1]))
    for m, a in order:
        if a > best + 1e-12:
            frontier.append((round(m, 5), round(a, 5)))
            best = a
    return frontier
