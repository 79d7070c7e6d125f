"""Exit decisions: when is a sample's prediction at an exit good enough to stop?

Every policy maps an exit's logits to a score in [0, 1], higher meaning more certain, and a
sample exits when its score reaches the exit's threshold. So for every policy a threshold of 0
exits everything at once and a threshold above 1 never exits, and calibration can treat the
policies alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynify.errors import StrategyError

POLICIES = ("confidence", "entropy", "patience")
# Batch-1 paths decide in Python floats (double); a score closer than this to its threshold is
# settled by the float32 tensor path, so both paths always take the same decision.
FLOAT32_TIE = 1e-5


def exit_scores(logits: torch.Tensor, temperature: torch.Tensor | float, kind: str) -> torch.Tensor:
    """Certainty of each sample's prediction, in [0, 1], for the exit policy `kind`: normalised
    entropy for "entropy", max softmax otherwise (patience adds its agreement rule on top)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if kind == "entropy":
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return 1.0 - entropy / math.log(probs.shape[-1])
    return probs.max(-1).values


def exit_score_one(logits: Sequence[float], temperature: float, kind: str) -> float:
    """`exit_scores` of one sample, in Python floats (double precision).

    At batch 1 the decision is a handful of tensor ops on 10 numbers, each costing more to
    dispatch than to compute (and several times more right after a convolution): one
    `.tolist()` and this are cheaper. Double precision differs from the float32 tensor path
    by ~1e-7, so callers settle scores that close to a threshold with `exit_scores`.
    """
    top = max(logits)
    shifted = [(value - top) / temperature for value in logits]
    total = sum(math.exp(value) for value in shifted)
    if kind != "entropy":
        return 1.0 / total
    log_total = math.log(total)
    entropy = -sum(math.exp(value - log_total) * (value - log_total) for value in shifted)
    return 1.0 - entropy / math.log(len(logits))


def ensemble_logits(weights: torch.Tensor, log_probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """`sum_j weights[j] * log_probs[j]` over the heads so far (a row of the ensemble)."""
    mixed = weights[0] * log_probs[0]
    for j in range(1, len(log_probs)):
        mixed = mixed + weights[j] * log_probs[j]
    return mixed


@dataclass
class ExitPolicy:
    """max-softmax confidence, normalised entropy, or patience (PABEE).

    Patience exits when the last `patience` exits agree on the class (and the confidence reaches
    the threshold, 0 by default), after Zhou et al. 2020.
    """

    kind: str = "confidence"
    patience: int = 2

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise StrategyError(f"Unknown exit policy '{self.kind}'; choose one of {POLICIES}.")
        if self.patience < 1:
            raise StrategyError("patience must be at least 1.")

    def start(self, batch: int, device: torch.device) -> PolicyState:
        return PolicyState(
            prediction=torch.full((batch,), -1, dtype=torch.long, device=device),
            streak=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def decide(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        threshold: torch.Tensor,
        state: PolicyState,
    ) -> torch.Tensor:
        """A bool mask of the samples that exit here; updates `state` in place."""
        done = exit_scores(logits, temperature, self.kind) >= threshold
        if self.kind == "patience":  # only patience needs the history (saves ops per exit)
            prediction = logits.argmax(-1)
            state.streak = torch.where(prediction == state.prediction, state.streak + 1, 1)
            state.prediction = prediction
            done &= state.streak >= self.patience
        return done

    def to_dict(self) -> dict:
        return {"kind": self.kind, "patience": self.patience}


@dataclass
class PolicyState:
    """What a policy remembers about the samples still running (patience needs history)."""

    prediction: torch.Tensor
    streak: torch.Tensor

    def keep(self, mask: torch.Tensor) -> PolicyState:
        return PolicyState(self.prediction[mask], self.streak[mask])
