"""Exit policies: when is a sample's prediction at an exit good enough to stop?

Every policy maps an exit's logits to a score in [0, 1], higher meaning more certain, and a
sample exits when its score reaches the exit's threshold. So for every policy a threshold of 0
exits everything at once and a threshold above 1 never exits, and calibration can treat the
policies alike. The rules themselves are in `dynify.runtime.decisions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynify.errors import StrategyError
from dynify.runtime.decisions import POLICIES, exit_decision, start_streak


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
        return PolicyState(*start_streak(batch, device))

    def decide(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        threshold: torch.Tensor,
        state: PolicyState,
    ) -> torch.Tensor:
        """A bool mask of the samples that exit here; updates `state` in place."""
        carried = (state.prediction, state.streak) if self.kind == "patience" else None
        done, carried = exit_decision(
            logits, temperature, threshold, self.kind, self.patience, carried
        )
        if carried is not None:
            state.prediction, state.streak = carried
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
