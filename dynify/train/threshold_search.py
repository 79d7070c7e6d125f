"""Per-exit thresholds for early exits: the exit rule simulated on collected logits, and a
Lagrangian search over thresholds that needs no further forward passes.

Gated exits (`GatedExits`) are searched the same way: a sample leaves at exit i when its gate
stays shut, p <= 1 - t. Held as the score -p against the threshold -(1 - t), computed in
float32 as the runtime computes 1 - t, that is the exit rule's `score >= threshold` exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynify.errors import DynifyError, StrategyError
from dynify.runtime.decisions import (
    NEVER,
    exit_scores,
    exits_taken,
    gate_probability,
    patience_allowed,
)
from dynify.runtime.model import DynamicModel, GatedExits, PerSampleExits
from dynify.train.exit_outputs import ExitOutputs, one_thread
from dynify.train.targets import CalibrationResult, check_target, choose_point, pareto_front
from dynify.train.temperature import fit_temperatures

CANDIDATES = 48
PRICES = (0.0, *[10 ** (k / 6) for k in range(-21, 4)])  # 1e-3.5 .. 3.2

# --- simulating the exit rule ----------------------------------------------------------------


@dataclass
class ExitProblem:
    scores: torch.Tensor  # [K, N] float32, as the runtime computes them
    allowed: torch.Tensor  # [K, N] bool: the exit is open to the sample and patience satisfied
    correct: torch.Tensor  # [K + 1, N] bool
    costs: torch.Tensor  # [K + 1, N] float64: leaving at exit i, a fraction of the static MACs
    gated: bool = False  # scores are -p of gates (module docstring), not exit certainties

    def rule_thresholds(self, thresholds: torch.Tensor) -> torch.Tensor:
        """The thresholds as the scores are compared with: gated, -(1 - t), and above 1 (the
        gate always open) a value no score reaches."""
        t = thresholds.float()
        if not self.gated:
            return t
        return torch.where(t > 1.0, torch.full_like(t, float("inf")), -(1.0 - t))

    def threshold_values(self, i: int) -> torch.Tensor:
        """[N] exit i's scores in threshold units: the values candidate thresholds come from."""
        s = self.scores[i]
        return (1.0 + s).clamp(0.0, 1.0) if self.gated else s

    def cost_of(self, index: torch.Tensor) -> torch.Tensor:
        """[N] what each sample spends leaving at exit `index[n]`."""
        return self.costs.gather(0, index[None])[0]

    def __post_init__(self):
        self.correct_f = self.correct.double()

    @classmethod
    def build(
        cls, dyn: DynamicModel, outputs: ExitOutputs, temperatures: list[float]
    ) -> ExitProblem:
        """The runtime's exit rule (`dynify.runtime.decisions`) on collected logits."""
        if outputs.gate_logits is not None:
            return cls.build_gated(outputs)
        policy = dyn.policy
        scores = torch.stack(
            [
                exit_scores(lg, torch.tensor(t, dtype=torch.float32), policy.kind)
                for lg, t in zip(outputs.logits[:-1], temperatures, strict=True)
            ]
        )
        allowed = outputs.open_exits().clone()
        if policy.kind == "patience":
            preds = torch.stack([lg.argmax(-1) for lg in outputs.logits[:-1]])
            allowed &= patience_allowed(preds, policy.patience)
        return cls(scores, allowed, outputs.correct(), outputs.sample_cost_fractions())

    @classmethod
    def build_gated(cls, outputs: ExitOutputs) -> ExitProblem:
        """The gate rule (`gate_open`) on collected gate logits: a NaN probability never
        opens its gate, so it always leaves (the largest score)."""
        p = gate_probability(outputs.gate_logits)
        scores = torch.where(torch.isnan(p), torch.finfo(p.dtype).max, -p)
        return cls(
            scores,
            outputs.open_exits().clone(),
            outputs.correct(),
            outputs.sample_cost_fractions(),
            gated=True,
        )

    def exits(self, thresholds: torch.Tensor, only: range | None = None) -> torch.Tensor:
        """The exit each sample takes (K: runs to the end), as the runtime decides it.

        `only` restricts the rule to some exits (the others never fire)."""
        return exits_taken(self.scores, self.allowed, self.rule_thresholds(thresholds), only)

    def evaluate(self, thresholds: torch.Tensor) -> tuple[float, float]:
        index = self.exits(thresholds)
        acc = float(self.correct.gather(0, index[None]).double().mean())
        return acc, float(self.cost_of(index).mean())

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
        base_macs = self.cost_of(before).masked_fill(reach, 0).sum()
        alt_acc = correct.gather(0, after[None])[0]
        alt_macs = self.cost_of(after)
        base_acc = base_acc + alt_acc[reach].sum()
        base_macs = base_macs + alt_macs[reach].sum()
        can = reach & self.allowed[i]
        s = self.scores[i][can]
        order = torch.argsort(s)
        s = s[order]
        d_acc = (correct[i][can] - alt_acc[can])[order]
        d_macs = (self.costs[i][can] - alt_macs[can])[order]
        # suffix sums: the samples with score >= candidate are a tail of the sorted scores
        tail_acc = torch.cat([d_acc.flip(0).cumsum(0).flip(0), d_acc.new_zeros(1)])
        tail_macs = torch.cat([d_macs.flip(0).cumsum(0).flip(0), d_macs.new_zeros(1)])
        first = torch.searchsorted(s, self.rule_thresholds(candidates), right=False)
        return (base_acc + tail_acc[first]) / n, (base_macs + tail_macs[first]) / n


def simulate(
    dyn: DynamicModel, outputs: ExitOutputs, thresholds: list[float] | None = None
) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean MAC fraction, exit per sample) the runtime would reach on `outputs`."""
    temperatures = [] if isinstance(dyn, GatedExits) else [float(t) for t in dyn.temperatures]
    problem = ExitProblem.build(dyn, outputs, temperatures)
    t = dyn.thresholds.clone() if thresholds is None else torch.tensor(thresholds)
    acc, macs = problem.evaluate(t)
    return acc, macs, problem.exits(t)


# --- searching per-exit thresholds -----------------------------------------------------------


def _search(
    problem: ExitProblem, forced: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every configuration the Lagrangian coordinate ascent visits, with (accuracy, MACs)."""
    k = problem.scores.shape[0]
    free = list(range(k if forced is None else forced))
    levels = torch.linspace(0, 1, CANDIDATES, dtype=torch.float64)
    candidates = []
    for i in range(k):
        q = torch.quantile(problem.threshold_values(i).double(), levels).float()
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
        j = choose_point(self.accuracy, self.macs, budget, max_drop, self.static_accuracy)
        target = {
            k: v
            for k, v in (("budget", budget), ("max_drop", max_drop), ("mac_cap", self.mac_cap))
            if v is not None
        }
        return CalibrationResult(
            # exact: a rounded threshold can cross the score of a sample it was chosen at
            thresholds=[float(t) for t in self.thresholds[j]],
            temperatures=[float(t) for t in self.temperatures],
            target=target,
            accuracy=float(self.accuracy[j]),
            macs_fraction=float(self.macs[j]),
            static_accuracy=self.static_accuracy,
            samples=self.samples,
            method=self.method,
            forced_exit=self.forced_exit,
            labels_used=self.labels_used,
            frontier=pareto_front(self.macs, self.accuracy),
        )


def search_thresholds(
    dyn: DynamicModel,
    outputs: ExitOutputs,
    *,
    mac_cap: float | None = None,
    fit_temperature_scaling: bool = True,
    keep: bool = False,
) -> ThresholdSearch:
    """Fit temperatures on `outputs`, then search per-exit thresholds (early-exit models; gated
    exits have no temperatures).

    `keep`: no search, only the model's current thresholds (with the cap's forced exit)."""
    forced = _forced_exit(dyn, mac_cap)
    with one_thread():
        return _search_thresholds(dyn, outputs, mac_cap, fit_temperature_scaling, keep, forced)


def _search_thresholds(dyn, outputs, mac_cap, fit_temperature_scaling, keep, forced):
    if isinstance(dyn, GatedExits):
        temperatures = []
    elif fit_temperature_scaling:
        temperatures = fit_temperatures(outputs)
    else:
        temperatures = [float(t) for t in dyn.temperatures]
    problem = ExitProblem.build(dyn, outputs, temperatures)
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
        float(outputs.static_correct().double().mean()),
        outputs.num_samples,
        forced,
        outputs.labels is not None,
        mac_cap,
    )


def _forced_exit(dyn: DynamicModel, mac_cap: float | None) -> int | None:
    if isinstance(dyn, GatedExits):  # the model holds the cap and says where it stops
        deepest = dyn.deepest_group()
        return None if deepest == dyn.num_exits else deepest
    if mac_cap is None:
        return None
    costs = dyn.exit_macs()
    if isinstance(dyn, PerSampleExits):  # what forcing each exit can cost a sample at most
        costs = [*dyn.forced_exit_macs(), costs[-1]]
    cap = mac_cap * dyn.static_macs
    fits = [i for i, c in enumerate(costs) if c <= cap]
    if not fits:
        raise DynifyError(
            f"A MAC cap of {mac_cap:.3f} of the static MACs is below what the cheapest exit, "
            f"forced, can cost a sample ({costs[0] / dyn.static_macs:.3f}); no sample can "
            "finish within it."
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
