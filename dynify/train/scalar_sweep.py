"""Calibration for any strategy through the contract alone: sweep and bisect the scalar
threshold (0 = cheapest, > 1 = full compute) with real forward passes.

A `mac_cap` is set on the model first (`MacCapped.set_mac_cap`: block gates, spatial masks,
skip-rnn, dynamic width), so the sweep measures the model as it will serve; alone, it only sets the cap."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from dynify.errors import StrategyError
from dynify.runtime.decisions import NEVER
from dynify.runtime.model import DynamicModel, MacCapped
from dynify.train.batches import Batches, Preprocessing
from dynify.train.exit_outputs import data_batches
from dynify.train.targets import CalibrationResult, choose_point, pareto_front


@torch.no_grad()
def measure(
    dyn: DynamicModel, batches: Batches, reference: torch.Tensor | None = None
) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean MAC fraction, predictions) of the real dynamic forward on `batches`."""
    preds, labels, macs = [], [], []
    for x, y in batches.epoch(0):
        out = dyn(x)
        preds.append(out.argmax(-1))
        labels.append(y)
        macs.append(dyn.last_macs.double())
    pred = torch.cat(preds)
    y = torch.cat(labels)
    ref = y if reference is None else reference
    acc = float((pred == ref).double().mean())
    return acc, float(torch.cat(macs).mean()) / dyn.static_macs, pred


def calibrate_by_sweep(
    dyn: DynamicModel,
    data: Any,
    budget: float | None,
    max_drop: float | None,
    mac_cap: float | None,
    split: str | None,
    batch_size: int,
    preprocessing: Preprocessing | None,
) -> CalibrationResult:
    if mac_cap is not None:
        if not isinstance(dyn, MacCapped):
            raise StrategyError(
                f"Strategy '{dyn.strategy}' has no MAC cap: exit cascades, block gates, spatial "
                "masks, skip-rnn and dynamic width can promise that no sample spends more. Calibrate "
                "with --budget or --max-drop instead."
            )
        # set first, so the thresholds are searched under the cap they will serve with
        dyn.set_mac_cap(mac_cap)
    batches = data_batches(
        dyn, data, split=split, batch_size=batch_size, preprocessing=preprocessing
    )
    dyn.eval()
    with dyn.static():
        _, _, static_pred = measure(dyn, batches)
    labels = torch.cat([y for _, y in batches.epoch(0)])
    reference = labels if bool((labels >= 0).all()) else static_pred
    static_acc = float((static_pred == reference).double().mean())
    points: dict[float, tuple[float, float]] = {}

    def at(t: float) -> tuple[float, float]:
        if t not in points:
            dyn.set_thresholds(t)
            acc, macs, _ = measure(dyn, batches, reference)
            points[t] = (acc, macs)
        return points[t]

    for t in [i / 10 for i in range(11)] + [NEVER]:
        at(t)

    def ok(t: float) -> bool:
        acc, macs = at(t)
        return macs <= budget + 1e-12 if budget is not None else acc >= static_acc - max_drop

    if budget is not None or max_drop is not None:
        grid = sorted(points)
        # Larger thresholds never mean less compute: refine the boundary by bisection.
        for lo, hi in itertools.pairwise(grid):
            if (budget is not None and ok(lo) and not ok(hi)) or (
                max_drop is not None and not ok(lo) and ok(hi)
            ):
                for _ in range(6):
                    mid = (lo + hi) / 2
                    lo, hi = (mid, hi) if ok(mid) == (budget is not None) else (lo, mid)
                break
        keys = list(points)
        accs = torch.tensor([points[k][0] for k in keys], dtype=torch.float64)
        costs = torch.tensor([points[k][1] for k in keys], dtype=torch.float64)
        j = choose_point(accs, costs, budget, max_drop, static_acc)
        t, acc, macs = keys[j], float(accs[j]), float(costs[j])
    else:
        t = float(dyn.thresholds.flatten()[0]) if dyn.thresholds.numel() else 0.0
        acc, macs = at(t)
    dyn.set_thresholds(t)
    target = {
        k: v
        for k, v in (("budget", budget), ("max_drop", max_drop), ("mac_cap", mac_cap))
        if v is not None
    }
    result = CalibrationResult(
        thresholds=[round(float(v), 6) for v in dyn.thresholds.flatten()],
        temperatures=[],
        target=target,
        accuracy=acc,
        macs_fraction=macs,
        static_accuracy=static_acc,
        samples=len(reference),
        method="scalar-sweep",
        labels_used=reference is labels,
        frontier=pareto_front(
            torch.tensor([m for _, m in points.values()]),
            torch.tensor([a for a, _ in points.values()]),
        ),
    )
    dyn.spec["calibration"] = result.to_dict()
    return result
