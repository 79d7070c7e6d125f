"""BudgetGuard: keep the running mean cost of a served model near its MAC budget.

Calibration sets thresholds so that the *calibration data* costs the budget on average. Inputs
crafted to look uncertain (a slowdown attack, DeepSloth: Hong et al. 2021) keep every score below
its threshold and send samples to the end, so the mean cost climbs towards the static network's
(or above it). The guard watches the cost each served sample really spent (`last_macs`) over a
window of recent samples and, while the windowed mean is above the budget, scales every
threshold towards 0, the cheapest behaviour, by an amount that grows with the overshoot
(integral control); once the mean is back under budget it relaxes towards the calibrated
thresholds. It uses only the contract (`set_thresholds`, `last_macs`, `static_macs`), so it
guards any DynamicModel.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import torch

from dynify.errors import StrategyError
from dynify.runtime.model import DynamicModel


class BudgetGuard:
    """Serve `model` under a mean-cost `budget` (a fraction of the static model's MACs).

    `guard(x)` runs the model's dynamic forward, then records each sample's cost in a window of
    the last `window` samples and updates the tightening `level` in [0, 1]: the thresholds served
    are the calibrated ones times (1 - level). While the windowed mean cost exceeds the budget
    the level rises with the overshoot (mean - budget); below budget it falls the same
    way, back to 0 (the calibrated thresholds, exactly) on clean traffic that fits the budget.
    `gain` is per window of samples: each sample moves the level by gain / window x (mean -
    budget). Above ~1 the level overshoots, since the window's mean lags what it changes.

    What it guarantees: if the cheapest behaviour (every threshold 0) costs less than the budget,
    the windowed mean is pulled back under it whatever the inputs, within a few windows; it
    does not bound a single sample's cost (that is `calibrate(..., mac_cap=...)`), and samples
    served while it tightens leave earlier, so they are less accurate.

    Thread-safe: the window, the level and the threshold update are under one lock; the forward
    itself runs outside it (per-call records are per thread), so a forward that overlaps an
    update may take some decisions at the thresholds before it and the rest at those after.
    """

    def __init__(
        self,
        model: DynamicModel,
        budget: float,
        window: int = 256,
        gain: float = 1.0,
        thresholds: Sequence[float] | torch.Tensor | None = None,
    ):
        if not isinstance(model, DynamicModel):
            raise StrategyError(
                f"BudgetGuard guards a dynify DynamicModel, got {type(model).__name__}: "
                "convert or load the model with dynify first."
            )
        checks = {"budget": (budget, 0.0), "gain": (gain, 0.0)}
        for name, (value, low) in checks.items():
            if not (isinstance(value, (int, float)) and low < float(value) < float("inf")):
                raise StrategyError(
                    f"BudgetGuard's {name} must be a positive number, got {value!r}."
                )
        if not isinstance(window, int) or window < 1:
            raise StrategyError(f"BudgetGuard's window must be a positive integer, got {window!r}.")
        self.model = model
        self.budget = float(budget)
        self.window = window
        self.gain = float(gain)
        self._step = self.gain / window  # per sample: `gain` per window of samples
        if thresholds is not None:
            model.set_thresholds(thresholds)
        self.calibrated = model.thresholds.detach().clone()
        self.level = 0.0
        self._costs: deque[float] = deque(maxlen=window)
        self._sum = 0.0
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        self.observe(self.model.last_macs)
        return logits

    def observe(self, macs: torch.Tensor | Sequence[int]) -> None:
        """Record what served samples cost (MACs each) and update the thresholds."""
        fractions = (torch.as_tensor(macs).double().reshape(-1) / self.model.static_macs).tolist()
        with self._lock:
            for cost in fractions:
                if len(self._costs) == self.window:
                    self._sum -= self._costs[0]
                self._costs.append(cost)
                self._sum += cost
                mean = self._sum / len(self._costs)
                self.level = min(1.0, max(0.0, self.level + self._step * (mean - self.budget)))
            self.model.set_thresholds(self.calibrated * (1.0 - self.level))

    @property
    def thresholds(self) -> torch.Tensor:
        """The thresholds served now (a copy): feed them to an exported graph's `thresholds`
        input and report its samples' costs with `observe`, and the guard serves ONNX too."""
        with self._lock:
            return self.model.thresholds.detach().clone()

    @property
    def mean_cost(self) -> float | None:
        """The windowed mean cost (fraction of the static MACs), None before any sample."""
        with self._lock:
            return self._sum / len(self._costs) if self._costs else None

    def reset(self) -> None:
        """Forget the window and serve the calibrated thresholds again."""
        with self._lock:
            self._costs.clear()
            self._sum = 0.0
            self.level = 0.0
            self.model.set_thresholds(self.calibrated)
