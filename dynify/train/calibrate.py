"""Choosing thresholds: the most accuracy for a MAC budget, or the fewest MACs for an accuracy.

For early exits everything needed is in one pass: the logits of every exit for every
calibration sample (`collect_outputs`). Temperatures are fitted per exit first (temperature
scaling, Guo et al. 2017), then the exit rule is *simulated* for candidate thresholds exactly as
the runtime applies it (same scores, same float32 comparisons), so the search costs no further
forward passes. The search is a Lagrangian one: for a range of prices of compute, coordinate
ascent over per-exit thresholds maximises accuracy - price * MACs; every configuration visited
is a candidate, and the best one meeting the target is kept.

Other strategies plug in through the contract alone: `set_thresholds(t)` with a scalar t
(0 = cheapest, > 1 = the static network's work) swept and bisected with real forward passes.

Anytime mode (`mac_cap`): the deepest exit whose cost fits the cap gets threshold 0, so every
sample leaves there at the latest: no input, however crafted, spends more than the cap.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dynify.errors import DataError, DynifyError, StrategyError
from dynify.runtime.model import DynamicModel
from dynify.runtime.policy import exit_scores
from dynify.train.batches import Batches, Preprocessing, open_data, resolve_preprocessing

NEVER = 1.01  # a threshold above every score in [0, 1]: this exit never fires
CANDIDATES = 48
PRICES = (0.0, *[10 ** (k / 6) for k in range(-21, 4)])  # 1e-3.5 .. 3.2


@dataclass
class ExitOutputs:
    """The logits of every exit (the last: the final classifier) on a data set, with labels.

    Without labels (`labels` None) accuracy means agreement with the final classifier.
    """

    logits: list[torch.Tensor]
    labels: torch.Tensor | None
    exit_macs: list[int]
    static_macs: int

    @property
    def num_samples(self) -> int:
        return int(self.logits[0].shape[0])

    def reference(self) -> torch.Tensor:
        return self.labels if self.labels is not None else self.logits[-1].argmax(-1)

    def correct(self) -> torch.Tensor:
        """[exits + 1, N] bool: is exit i right on sample n."""
        ref = self.reference()
        return torch.stack([lg.argmax(-1) == ref for lg in self.logits])

    def cost_fractions(self) -> torch.Tensor:
        return torch.tensor(self.exit_macs, dtype=torch.float64) / self.static_macs


@contextmanager
def one_thread() -> Iterator[None]:
    """Thousands of tiny tensor ops run faster on one thread than fighting over several."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _has_exits(dyn: DynamicModel) -> bool:
    return all(hasattr(dyn, a) for a in ("exit_logits", "exit_macs", "policy", "temperatures"))


def data_batches(
    dyn: DynamicModel,
    data: Any,
    *,
    split: str | None = None,
    batch_size: int = 256,
    preprocessing: Preprocessing | None = None,
) -> Batches:
    """Evaluation batches (no augmentation, fixed order) over `data`."""
    if isinstance(data, Batches):
        return data
    pre = preprocessing or resolve_preprocessing(dyn)
    return Batches(open_data(data, dyn, split=split), pre, batch_size=batch_size)


@torch.no_grad()
def collect_outputs(
    dyn: DynamicModel,
    data: Any,
    *,
    split: str | None = None,
    batch_size: int = 256,
    preprocessing: Preprocessing | None = None,
) -> ExitOutputs:
    """One pass over `data` keeping every exit's logits (early-exit models)."""
    if not _has_exits(dyn):
        raise StrategyError(f"{type(dyn).__name__} has no exits whose logits could be collected.")
    batches = (
        data
        if isinstance(data, Batches)
        else data_batches(
            dyn, data, split=split, batch_size=batch_size, preprocessing=preprocessing
        )
    )
    was_training = dyn.training
    dyn.eval()
    per_exit: list[list[torch.Tensor]] = []
    labels = []
    try:
        for x, y in batches.epoch(0):
            outs = dyn.exit_logits(x)
            if not per_exit:
                per_exit = [[] for _ in outs]
            for store, out in zip(per_exit, outs, strict=True):
                store.append(out.float())
            labels.append(y)
    finally:
        dyn.train(was_training)
    if not per_exit:
        raise DataError("The data set is empty: there is nothing to calibrate on.")
    y = torch.cat(labels)
    known = y >= 0
    if known.any() and not known.all():
        raise DataError("Some samples have labels and some do not; label all or none.")
    return ExitOutputs(
        [torch.cat(s) for s in per_exit],
        y if bool(known.all()) else None,
        list(dyn.exit_macs()),
        dyn.static_macs,
    )


# --- temperature scaling ---------------------------------------------------------------------


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T minimising the NLL of softmax(logits / T) (golden-section search over log T).

    The NLL is convex in 1/T, hence unimodal in log T, so the search finds the optimum.
    """
    logits = logits.double()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), targets))

    lo, hi = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


def fit_temperatures(outputs: ExitOutputs) -> list[float]:
    """One temperature per exit head (the final classifier keeps its own)."""
    targets = outputs.reference()
    return [fit_temperature(lg, targets) for lg in outputs.logits[:-1]]


# --- simulating the exit rule ----------------------------------------------------------------


@dataclass
class _Problem:
    scores: torch.Tensor  # [K, N] float32, as the runtime computes them
    allowed: torch.Tensor  # [K, N] bool: patience satisfied (all True otherwise)
    correct: torch.Tensor  # [K + 1, N] bool
    costs: torch.Tensor  # [K + 1] float64, fractions of the static MACs

    def __post_init__(self):
        self.correct_f = self.correct.double()

    @classmethod
    def build(cls, dyn: DynamicModel, outputs: ExitOutputs, temperatures: list[float]) -> _Problem:
        policy = dyn.policy
        kind = "entropy" if policy.kind == "entropy" else "confidence"
        scores = torch.stack(
            [
                exit_scores(lg, torch.tensor(t, dtype=torch.float32), kind)
                for lg, t in zip(outputs.logits[:-1], temperatures, strict=True)
            ]
        )
        allowed = torch.ones_like(scores, dtype=torch.bool)
        if policy.kind == "patience":
            preds = torch.stack([lg.argmax(-1) for lg in outputs.logits[:-1]])
            streak = torch.ones_like(preds)
            for i in range(1, len(preds)):
                streak[i] = torch.where(preds[i] == preds[i - 1], streak[i - 1] + 1, 1)
            allowed = streak >= policy.patience
        return cls(scores, allowed, outputs.correct(), outputs.cost_fractions())

    def exits(self, thresholds: torch.Tensor, only: range | None = None) -> torch.Tensor:
        """The exit each sample takes (K: runs to the end), as the runtime decides it.

        `only` restricts the rule to some exits (the others never fire)."""
        k, n = self.scores.shape
        index = torch.full((n,), k, dtype=torch.long)
        t = thresholds.float()
        for j in reversed(only if only is not None else range(k)):
            index = torch.where((self.scores[j] >= t[j]) & self.allowed[j], j, index)
        return index

    def evaluate(self, thresholds: torch.Tensor) -> tuple[float, float]:
        index = self.exits(thresholds)
        acc = float(self.correct.gather(0, index[None]).double().mean())
        return acc, float(self.costs[index].mean())

    def sweep(
        self, thresholds: torch.Tensor, i: int, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(accuracy, MACs) for every candidate threshold at exit i, the others fixed.

        Samples that left before i are unaffected; the others leave at i if their score
        reaches the candidate, else where the later exits send them. Sorting the scores once
        gives every candidate's outcome by a binary search.
        """
        k, n = self.scores.shape
        before = self.exits(thresholds, range(i))
        after = self.exits(thresholds, range(i + 1, k))
        reach = before == k
        correct = self.correct_f
        base_acc = correct.gather(0, before[None])[0].masked_fill(reach, 0).sum()
        base_macs = self.costs[before].masked_fill(reach, 0).sum()
        alt_acc = correct.gather(0, after[None])[0]
        alt_macs = self.costs[after]
        base_acc = base_acc + alt_acc[reach].sum()
        base_macs = base_macs + alt_macs[reach].sum()
        can = reach & self.allowed[i]
        s = self.scores[i][can]
        order = torch.argsort(s)
        s = s[order]
        d_acc = (correct[i][can] - alt_acc[can])[order]
        d_macs = (self.costs[i] - alt_macs[can])[order]
        # suffix sums: the samples with score >= candidate are a tail of the sorted scores
        tail_acc = torch.cat([d_acc.flip(0).cumsum(0).flip(0), d_acc.new_zeros(1)])
        tail_macs = torch.cat([d_macs.flip(0).cumsum(0).flip(0), d_macs.new_zeros(1)])
        first = torch.searchsorted(s, candidates.float(), right=False)
        return (base_acc + tail_acc[first]) / n, (base_macs + tail_macs[first]) / n


def simulate(
    dyn: DynamicModel, outputs: ExitOutputs, thresholds: list[float] | None = None
) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean MAC fraction, exit per sample) the runtime would reach on `outputs`."""
    problem = _Problem.build(dyn, outputs, [float(t) for t in dyn.temperatures])
    t = dyn.thresholds.clone() if thresholds is None else torch.tensor(thresholds)
    acc, macs = problem.evaluate(t)
    return acc, macs, problem.exits(t)


def _search(
    problem: _Problem, forced: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every configuration the Lagrangian coordinate ascent visits, with (accuracy, MACs)."""
    k = problem.scores.shape[0]
    free = list(range(k if forced is None else forced))
    levels = torch.linspace(0, 1, CANDIDATES, dtype=torch.float64)
    candidates = []
    for i in range(k):
        q = torch.quantile(problem.scores[i].double(), levels).float()
        candidates.append(torch.unique(torch.cat([q, torch.tensor([0.0, NEVER])])))
    start = torch.full((k,), NEVER)
    if forced is not None:
        start[forced] = 0.0
    configs, accs, macs = (
        [start[None]],
        *[[torch.tensor([v], dtype=torch.float64)] for v in problem.evaluate(start)],
    )
    if free:  # one threshold shared by the free exits, as in SDN
        shared = torch.unique(torch.cat([candidates[i] for i in free]))
        for c in shared:
            t = start.clone()
            t[free] = c
            a, m = problem.evaluate(t)
            configs.append(t[None])
            accs.append(torch.tensor([a], dtype=torch.float64))
            macs.append(torch.tensor([m], dtype=torch.float64))
    current = start.clone()
    for price in PRICES:
        for _ in range(3):
            changed = False
            for i in free:
                a, m = problem.sweep(current, i, candidates[i])
                t = current.repeat(len(candidates[i]), 1)
                t[:, i] = candidates[i]
                configs.append(t)
                accs.append(a)
                macs.append(m)
                gain = a - price * m
                here = problem.sweep(current, i, current[i : i + 1])
                best = int(torch.argmax(gain))
                if float(gain[best]) > float(here[0][0] - price * here[1][0]) + 1e-12:
                    current[i] = candidates[i][best]
                    changed = True
            if not changed:
                break
    return torch.cat(configs), torch.cat(accs), torch.cat(macs)


# --- the public entry point ------------------------------------------------------------------


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
    frontier: list[tuple[float, float]] = field(default_factory=list)  # (MACs, accuracy)

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


def calibrate(
    dyn: DynamicModel,
    data: Any,
    *,
    budget: float | None = None,
    max_drop: float | None = None,
    mac_cap: float | None = None,
    fit_temperature_scaling: bool = True,
    split: str | None = None,
    batch_size: int = 256,
    preprocessing: Preprocessing | None = None,
) -> CalibrationResult:
    """Set `dyn`'s thresholds (and temperatures) from calibration data; returns what they reach.

    Exactly one target: `budget`, the mean MACs allowed as a fraction of the static model's
    (accuracy is maximised under it), or `max_drop`, the accuracy the dynamic model may lose
    against its own static network (MACs are minimised under it). `mac_cap` (a fraction of the
    static MACs) caps every sample's MACs: anytime inference; alone, it only sets the cap.
    `data` is never trained on: pass the calibration split (or precomputed `ExitOutputs`).
    """
    check_target(budget, max_drop, mac_cap)
    if not _has_exits(dyn):
        return _calibrate_by_sweep(
            dyn, data, budget, max_drop, mac_cap, split, batch_size, preprocessing
        )
    outputs = (
        data
        if isinstance(data, ExitOutputs)
        else collect_outputs(
            dyn, data, split=split, batch_size=batch_size, preprocessing=preprocessing
        )
    )
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


@dataclass
class ThresholdSearch:
    """Every threshold configuration the search visited, with its calibration accuracy and
    MACs: choose from it for any number of targets without searching again."""

    thresholds: torch.Tensor  # [P, K]
    accuracy: torch.Tensor  # [P]
    macs: torch.Tensor  # [P]
    temperatures: list[float]
    static_accuracy: float
    samples: int
    forced_exit: int | None
    labels_used: bool
    mac_cap: float | None = None
    method: str = "lagrangian"

    def choose(
        self, *, budget: float | None = None, max_drop: float | None = None
    ) -> CalibrationResult:
        check_target(budget, max_drop, self.mac_cap)
        j = _choose(self.accuracy, self.macs, budget, max_drop, self.static_accuracy)
        target = {
            k: v
            for k, v in (("budget", budget), ("max_drop", max_drop), ("mac_cap", self.mac_cap))
            if v is not None
        }
        return CalibrationResult(
            thresholds=[round(float(t), 6) for t in self.thresholds[j]],
            temperatures=[round(t, 6) for t in self.temperatures],
            target=target,
            accuracy=float(self.accuracy[j]),
            macs_fraction=float(self.macs[j]),
            static_accuracy=self.static_accuracy,
            samples=self.samples,
            method=self.method,
            forced_exit=self.forced_exit,
            labels_used=self.labels_used,
            frontier=_pareto(self.macs, self.accuracy),
        )


def search_thresholds(
    dyn: DynamicModel,
    outputs: ExitOutputs,
    *,
    mac_cap: float | None = None,
    fit_temperature_scaling: bool = True,
    keep: bool = False,
) -> ThresholdSearch:
    """Fit temperatures on `outputs`, then search per-exit thresholds (early-exit models).

    `keep`: no search, only the model's current thresholds (with the cap's forced exit)."""
    forced = _forced_exit(dyn, mac_cap)
    with one_thread():
        return _search_thresholds(dyn, outputs, mac_cap, fit_temperature_scaling, keep, forced)


def _search_thresholds(dyn, outputs, mac_cap, fit_temperature_scaling, keep, forced):
    temperatures = (
        fit_temperatures(outputs)
        if fit_temperature_scaling
        else [float(t) for t in dyn.temperatures]
    )
    problem = _Problem.build(dyn, outputs, temperatures)
    if keep:
        thresholds = dyn.thresholds.clone().float()
        if forced is not None:
            thresholds[forced] = 0.0
        acc, cost = problem.evaluate(thresholds)
        thresholds = thresholds[None]
        accuracy = torch.tensor([acc], dtype=torch.float64)
        macs = torch.tensor([cost], dtype=torch.float64)
    else:
        thresholds, accuracy, macs = _search(problem, forced)
    return ThresholdSearch(
        thresholds,
        accuracy,
        macs,
        temperatures,
        float(problem.correct_f[-1].mean()),
        outputs.num_samples,
        forced,
        outputs.labels is not None,
        mac_cap,
    )


def _forced_exit(dyn: DynamicModel, mac_cap: float | None) -> int | None:
    if mac_cap is None:
        return None
    costs = dyn.exit_macs()
    cap = mac_cap * dyn.static_macs
    fits = [i for i, c in enumerate(costs) if c <= cap]
    if not fits:
        raise DynifyError(
            f"A MAC cap of {mac_cap:.3f} of the static MACs is below the cheapest exit "
            f"({costs[0] / dyn.static_macs:.3f}); no sample can finish within it."
        )
    deepest = fits[-1]
    if deepest == len(costs) - 1:
        return None  # the whole network fits the cap
    if dyn.policy.kind == "patience":
        raise StrategyError(
            "A MAC cap needs an exit that always fires, which the patience policy cannot "
            "guarantee; convert with --policy confidence or entropy for anytime inference."
        )
    return deepest


def _choose(
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


def _pareto(macs: torch.Tensor, accuracy: torch.Tensor) -> list[tuple[float, float]]:
    """(MACs, accuracy) points no other point beats on both."""
    frontier, best = [], -1.0
    order = sorted(zip(macs.tolist(), accuracy.tolist(), strict=True), key=lambda p: (p[0], -p[1]))
    for m, a in order:
        if a > best + 1e-12:
            frontier.append((round(m, 5), round(a, 5)))
            best = a
    return frontier


# --- any strategy: sweep the scalar knob -----------------------------------------------------


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


def _calibrate_by_sweep(
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
        setter = getattr(dyn, "set_mac_cap", None)
        if setter is None:
            raise StrategyError(f"Strategy '{dyn.strategy}' has no anytime MAC cap.")
        setter(mac_cap)
    if not hasattr(dyn, "set_thresholds"):
        raise StrategyError(f"Strategy '{dyn.strategy}' has no thresholds to calibrate.")
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
        j = _choose(accs, costs, budget, max_drop, static_acc)
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
        frontier=_pareto(
            torch.tensor([m for _, m in points.values()]),
            torch.tensor([a for a, _ in points.values()]),
        ),
    )
    dyn.spec["calibration"] = result.to_dict()
    return result
