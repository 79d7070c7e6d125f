"""Evaluation: what a dynamic model buys, measured on held-out data.

`evaluate` reports the static network's accuracy and MACs, the dynamic model's at its current
(calibrated) thresholds, measured by the real dynamic forward, the accuracy-vs-MACs curve over
thresholds, and for exit cascades (early exits, and exits decided by learned gates) the per-exit
accuracy, the exit histogram and the oracle bound (each sample leaves at the first exit that is
right). `EvaluationReport` prints as a table, saves as JSON and plots as a PNG.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynify.errors import DynifyError
from dynify.files import atomic_output, write_text_atomic
from dynify.heldout import is_finetune_data
from dynify.runtime.decisions import NEVER
from dynify.runtime.model import DynamicModel, ExitCascade, GatedExits
from dynify.train.batches import Preprocessing
from dynify.train.exit_outputs import (
    ExitOutputs,
    collect_outputs,
    data_batches,
    one_thread,
)
from dynify.train.scalar_sweep import measure
from dynify.train.threshold_search import ExitProblem

logger = logging.getLogger("dynify")


@dataclass
class CurvePoint:
    threshold: float
    macs_fraction: float
    accuracy: float


@dataclass
class EvaluationReport:
    """Accuracy (labels, else agreement with the static model) and MACs on one data set."""

    model: str
    strategy: str
    samples: int
    labels_used: bool
    static_macs: int
    static_accuracy: float
    dynamic_accuracy: float
    dynamic_macs_fraction: float
    thresholds: list[float]
    curve: list[CurvePoint] = field(default_factory=list)
    exit_names: list[str] = field(default_factory=list)
    exit_macs_fraction: list[float] = field(default_factory=list)
    per_exit_accuracy: list[float] = field(default_factory=list)
    exit_histogram: list[int] = field(default_factory=list)
    oracle_accuracy: float | None = None
    oracle_macs_fraction: float | None = None
    # Set when the data is what fine-tuning trained on: the figures are then optimistic.
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically: a failed write leaves any old file as it was)."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2))

    def macs_to_match(self, accuracy: float, tolerance: float = 0.005) -> float | None:
        """The smallest MAC fraction on the curve within `tolerance` of `accuracy`, if any."""
        fits = [p.macs_fraction for p in self.curve if p.accuracy >= accuracy - tolerance - 1e-12]
        return min(fits) if fits else None

    def table(self):
        """A rich Table: static, dynamic, oracle, and one row per exit."""
        from rich.table import Table

        what = "accuracy" if self.labels_used else "agreement with static"
        table = Table(title=f"{self.model} · {self.strategy} · {self.samples} samples")
        for column in ("", what, "MACs (of static)", "share of samples"):
            table.add_column(column, justify="left" if not column else "right")
        table.add_row("static", f"{self.static_accuracy:.2%}", "1.000", "")
        table.add_row(
            "[bold]dynamic[/bold]",
            f"[bold]{self.dynamic_accuracy:.2%}[/bold]",
            f"[bold]{self.dynamic_macs_fraction:.3f}[/bold]",
            "",
        )
        if self.oracle_accuracy is not None:
            table.add_row(
                "oracle", f"{self.oracle_accuracy:.2%}", f"{self.oracle_macs_fraction:.3f}", ""
            )
        total = max(sum(self.exit_histogram), 1)
        for i, name in enumerate(self.exit_names):
            acc = self.per_exit_accuracy[i] if self.per_exit_accuracy else float("nan")
            share = self.exit_histogram[i] / total if self.exit_histogram else float("nan")
            table.add_row(
                f"  exit {name}", f"{acc:.2%}", f"{self.exit_macs_fraction[i]:.3f}", f"{share:.1%}"
            )
        return table

    def plot(self, path: str | Path) -> Path:
        """Accuracy vs MACs: the threshold curve, the static point, the calibrated point,
        the exits on their own and the oracle bound. The suffix chooses the format (.png,
        .pdf, .svg, .jpg)."""
        path = check_plot_path(path)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        pts = sorted(self.curve, key=lambda p: p.macs_fraction)
        ax.plot(
            [p.macs_fraction for p in pts],
            [100 * p.accuracy for p in pts],
            "-",
            color="tab:blue",
            label="dynamic, over thresholds",
        )
        if self.per_exit_accuracy:
            ax.plot(
                self.exit_macs_fraction,
                [100 * a for a in self.per_exit_accuracy],
                "s",
                color="tab:gray",
                alpha=0.7,
                label="each exit alone",
            )
        ax.plot(1.0, 100 * self.static_accuracy, "*", ms=14, color="black", label="static")
        ax.plot(
            self.dynamic_macs_fraction,
            100 * self.dynamic_accuracy,
            "o",
            ms=9,
            color="tab:red",
            label="dynamic, calibrated",
        )
        if self.oracle_accuracy is not None:
            ax.plot(
                self.oracle_macs_fraction,
                100 * self.oracle_accuracy,
                "D",
                ms=8,
                color="tab:green",
                label="oracle",
            )
        ax.set_xlabel("mean MACs (fraction of the static model)")
        ax.set_ylabel("accuracy (%)" if self.labels_used else "agreement with static (%)")
        ax.set_title(f"{self.model} · {self.strategy}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        try:
            with atomic_output(path) as tmp:
                fig.savefig(tmp)
        finally:
            plt.close(fig)
        return path


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_plot_path(path: str | Path) -> Path:
    """Refuse a plot file whose suffix names no image format, before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise DynifyError(
            f"The plot file {path} has no image suffix: name it .png (or {', '.join(PLOT_FORMATS[1:])})."
        )
    return path


def oracle(outputs: ExitOutputs) -> tuple[float, float]:
    """(accuracy, MAC fraction) if every sample left at the first exit that is right.

    A sample no exit gets right runs to the end and counts as wrong: an upper bound on what any
    exit rule can reach with these heads.
    """
    correct = outputs.correct()
    correct[:-1] &= outputs.open_exits()  # an exit closed to a sample cannot answer for it
    costs = outputs.sample_cost_fractions()
    stops = torch.cat([correct[:-1], torch.ones_like(correct[:1])]).to(torch.uint8).argmax(0)
    return float(correct.any(0).double().mean()), float(costs.gather(0, stops[None]).mean())


def evaluate(
    dyn: DynamicModel,
    data: Any,
    *,
    split: str | None = None,
    batch_size: int = 256,
    preprocessing: Preprocessing | None = None,
    curve_points: int = 41,
) -> EvaluationReport:
    """Measure `dyn` on `data` (never the data its heads or thresholds were fitted on).

    When `data` is the data `dyn` was fine-tuned on, the report's `warning` says so (and a
    warning is logged): figures measured there are optimistic.
    """
    batches = data_batches(
        dyn, data, split=split, batch_size=batch_size, preprocessing=preprocessing
    )
    dyn.eval()
    name = (dyn.spec.get("model") or {}).get("name", type(dyn).__name__)
    if isinstance(dyn, (ExitCascade, GatedExits)):
        report = _evaluate_exits(dyn, batches, name, curve_points)
    else:
        report = _evaluate_generic(dyn, batches, name, curve_points)
    if is_finetune_data(dyn, data, split):
        report.warning = (
            "this is the data the model was fine-tuned on, so these figures are optimistic; "
            "evaluate on held-out data (e.g. a test split)"
        )
        logger.warning("dynify.evaluate: %s.", report.warning)
    return report


def _evaluate_exits(dyn: DynamicModel, batches, name: str, curve_points: int) -> EvaluationReport:
    """Exits decided by a policy (`ExitCascade`) or by learned gates (`GatedExits`): the
    curve, histogram and oracle come from the same collected outputs calibration simulates."""
    outputs = collect_outputs(dyn, batches)
    reference = outputs.reference()
    preds, spent, histogram = [], [], torch.zeros(dyn.num_exits + 1, dtype=torch.long)
    with torch.no_grad():
        for x, _ in batches.epoch(0):
            preds.append(dyn(x).argmax(-1))
            spent.append(dyn.last_macs.double())
            histogram += torch.bincount(dyn.last_exit, minlength=dyn.num_exits + 1)
    accuracy = float((torch.cat(preds) == reference).double().mean())
    macs = float(torch.cat(spent).mean()) / dyn.static_macs
    with one_thread():
        temperatures = [float(t) for t in dyn.temperatures] if isinstance(dyn, ExitCascade) else []
        problem = ExitProblem.build(dyn, outputs, temperatures)
        curve = _threshold_curve(problem, dyn.num_exits, curve_points)
    oracle_acc, oracle_macs = oracle(outputs)
    correct = outputs.correct().double().mean(1)
    costs = outputs.cost_fractions()
    return EvaluationReport(
        model=name,
        strategy=dyn.strategy,
        samples=outputs.num_samples,
        labels_used=outputs.labels is not None,
        static_macs=dyn.static_macs,
        static_accuracy=float(outputs.static_correct().double().mean()),
        dynamic_accuracy=accuracy,
        dynamic_macs_fraction=macs,
        thresholds=[round(float(t), 6) for t in dyn.thresholds],
        curve=curve,
        exit_names=[*[str(i) for i in range(dyn.num_exits)], "final"],
        exit_macs_fraction=[round(float(c), 5) for c in costs],
        per_exit_accuracy=[float(c) for c in correct],
        exit_histogram=[int(h) for h in histogram],
        oracle_accuracy=oracle_acc,
        oracle_macs_fraction=oracle_macs,
    )


def _threshold_curve(problem: ExitProblem, exits: int, points: int) -> list[CurvePoint]:
    """One threshold shared by all exits, at quantiles of the scores in threshold units (where
    the curve moves)."""
    scores = torch.stack([problem.threshold_values(i) for i in range(exits)]).flatten().double()
    levels = torch.quantile(scores, torch.linspace(0, 1, points - 1, dtype=torch.float64))
    curve = []
    for t in sorted({0.0, *levels.float().tolist(), NEVER}):
        acc, m = problem.evaluate(torch.full((exits,), t))
        curve.append(CurvePoint(round(t, 6), m, acc))
    return curve


def _evaluate_generic(dyn: DynamicModel, batches, name: str, curve_points: int) -> EvaluationReport:
    with torch.no_grad(), dyn.static():
        _, _, static_pred = measure(dyn, batches)
    labels = torch.cat([y for _, y in batches.epoch(0)])
    labelled = bool((labels >= 0).all())
    reference = labels if labelled else static_pred
    static_acc = float((static_pred == reference).double().mean())
    saved = dyn.thresholds.clone()
    accuracy, macs, _ = measure(dyn, batches, reference)
    curve = []
    steps = max(curve_points // 4, 5)
    for t in [i / steps for i in range(steps + 1)] + [NEVER]:
        dyn.set_thresholds(t)
        acc, m, _ = measure(dyn, batches, reference)
        curve.append(CurvePoint(t, m, acc))
    dyn.thresholds.copy_(saved)
    return EvaluationReport(
        model=name,
        strategy=dyn.strategy,
        samples=len(reference),
        labels_used=labelled,
        static_macs=dyn.static_macs,
        static_accuracy=static_acc,
        dynamic_accuracy=accuracy,
        dynamic_macs_fraction=macs,
        thresholds=[round(float(t), 6) for t in dyn.thresholds.flatten()],
        curve=curve,
    )
