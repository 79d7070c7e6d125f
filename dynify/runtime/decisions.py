"""Decision rules as pure tensor functions, written once and called by every face.

The eager forward, the batch-1 fast path, the training forward and the export face of a strategy
all decide through these functions, so the faces cannot drift apart. Thresholds follow dynify's
convention everywhere: 0 is the cheapest behaviour, a threshold above 1 runs everything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# --- the batch-1 float layer -------------------------------------------------------------------
# At batch 1 a decision is a few tensor ops on a handful of numbers, each costing more to dispatch
# than to compute, so the batch-1 paths decide on Python floats (double precision). Double and
# the float32 tensor path differ by ~1e-7; a value closer than this to its boundary is settled by
# the tensor rule, so both paths always take the same decision.
FLOAT32_TIE = 1e-5


def sigmoid_one(x: float) -> float:
    """Sigmoid of a Python float (double precision)."""
    return 1.0 / (1.0 + math.exp(-x)) if x > -700.0 else 0.0


def near_tie(value: float, boundary: float) -> bool:
    """True when a double-precision comparison with `boundary` may disagree with float32's."""
    return abs(value - boundary) < FLOAT32_TIE


# --- gates and masks ---------------------------------------------------------------------------


def gate_probability(logits: Tensor) -> Tensor:
    """A decision unit's logits -> the probability that its gate (or mask position) is open."""
    return torch.sigmoid(logits.float())


def gate_open(prob: Tensor, threshold: Tensor | float) -> Tensor:
    """The open rule of gates, policy plans and spatial masks: `prob > 1 - threshold`.

    Threshold 0 opens nothing, a threshold above 1 opens everything (the static network).
    """
    return prob > 1.0 - threshold


def gates_open_one(logits: Sequence[float], thresholds: Sequence[float]) -> list[bool]:
    """`gate_open(gate_probability(logits), thresholds)` for one sample, in Python floats.

    If any probability lies within `FLOAT32_TIE` of its boundary, the float32 tensor rule decides
    (the logits and thresholds are float32 values, so rebuilding the tensors is exact).
    """
    probs = [sigmoid_one(v) for v in logits]
    if any(near_tie(p, 1.0 - t) for p, t in zip(probs, thresholds, strict=True)):
        exact = gate_open(
            gate_probability(torch.tensor(list(logits), dtype=torch.float32)),
            torch.tensor(list(thresholds), dtype=torch.float32),
        )
        return exact.tolist()
    return [p > 1.0 - t for p, t in zip(probs, thresholds, strict=True)]


def gate_open_one(logit: float, threshold: float) -> bool:
    """`gates_open_one` of a single gate."""
    return gates_open_one((logit,), (threshold,))[0]


def straight_through_gumbel(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """A hard 0/1 sample of each gate with the gradient of its relaxed sigmoid (binary
    Gumbel-softmax, Jang et al. 2017): how gates, policies and masks learn their decisions."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)  # the difference of two Gumbels is logistic
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


# --- halting (ACT) -----------------------------------------------------------------------------


def halt_step(
    cum: Tensor, h: Tensor, threshold: Tensor | float, active: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of ACT's halting over a stage: `(cum, stop, weight)` after adding score `h`.

    `cum` is the cumulative halting score so far (capped at 1); a sample stops once it reaches
    `threshold`. `weight` is this step's output's share of the stage's mix: its score `h`, or at
    the stopping step the remainder `1 - cum`. With `active` ([B] bool), samples that halted
    earlier keep their score, do not stop again and weigh 0.
    """
    new_cum = torch.clamp(cum + h, max=1.0)
    stop = new_cum >= threshold
    weight = torch.where(stop, 1.0 - cum, h)
    if active is None:
        return new_cum, stop, weight
    return torch.where(active, new_cum, cum), stop & active, weight * active


def halt_step_one(cum: float, h: float, threshold: float) -> tuple[float, bool, float]:
    """`halt_step` of one sample in Python floats (the batch-1 path)."""
    new_cum = min(cum + h, 1.0)
    stop = new_cum >= threshold
    return new_cum, stop, (1.0 - cum) if stop else h
