"""The training losses of every strategy: one distillation loss and the compute terms.

A strategy's `training_loss` is `distillation` (towards the static network's logits, mixed with
the labels where known) plus its own compute term: exits need none (thresholds meet the budget
after training), block gates price their MACs with a PI controller (and BlockDrop's policy learns
by REINFORCE), spatial masks pull their density to a target.

The distillation temperature: `LossConfig.kd_temperature` when set, for every strategy alike;
None (the default) uses the strategy's own, i.e. its `distill_temperature` conversion option
(early exits: 3). The label weight is `LossConfig.label_weight` for every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dynify.errors import DynifyError

DEFAULT_LABEL_WEIGHT = 0.5


@dataclass(frozen=True)
class LossConfig:
    """What a fine-tuning run asks of every strategy's loss.

    `kd_temperature`: softens teacher and student (None: the strategy's own); `label_weight`:
    w in (1 - w) * kd + w * ce where labels are known; `budget`: the mean MAC fraction a
    strategy with a compute term aims at (None: its conversion option).
    """

    kd_temperature: float | None = None
    label_weight: float = DEFAULT_LABEL_WEIGHT
    budget: float | None = None

    def __post_init__(self) -> None:
        if self.kd_temperature is not None and not self.kd_temperature > 0:
            raise DynifyError(f"kd_temperature must be positive, got {self.kd_temperature}.")
        if not 0.0 <= self.label_weight <= 1.0:
            raise DynifyError(f"label_weight must be in [0, 1], got {self.label_weight}.")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise DynifyError(f"budget must be in (0, 1], got {self.budget}.")

    def temperature(self, own: float) -> float:
        """The distillation temperature for a strategy whose own default is `own`."""
        return own if self.kd_temperature is None else float(self.kd_temperature)


def distillation(
    logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    temperature: float,
    label_weight: float,
    *,
    per_sample: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """KL to the teacher's softened distribution (x T^2, Hinton et al. 2015), mixed with
    cross-entropy on the known labels (>= 0) as (1 - label_weight) * kd + label_weight * ce.

    Returns the batch mean, or with `per_sample` the loss of each sample [N] (REINFORCE needs
    a reward per sample), and stats: `kd`, `acc` (against the labels, else the teacher's
    prediction) and `ce` when labels were used.
    """
    teacher = teacher_logits.detach().float()
    log_probs = F.log_softmax(logits.float() / temperature, -1)
    target = F.softmax(teacher / temperature, -1)
    scale = temperature**2
    if per_sample:
        kd = F.kl_div(log_probs, target, reduction="none").sum(-1) * scale
    else:
        kd = F.kl_div(log_probs, target, reduction="batchmean") * scale
    known = None if labels is None else labels >= 0
    use_labels = known is not None and bool(known.any()) and label_weight > 0
    reference = labels if use_labels else teacher.argmax(-1)
    hits = (logits.detach().argmax(-1) == reference).float()
    stats = {
        "kd": float(kd.detach().mean()),
        "acc": float(hits[known].mean() if use_labels else hits.mean()),
    }
    if not use_labels:
        return kd, stats
    if per_sample:
        ce = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none") * known
        stats["ce"] = float(ce.detach()[known].mean())
        return kd + label_weight * (ce - kd * known), stats
    ce = F.cross_entropy(logits[known].float(), labels[known])
    stats["ce"] = float(ce.detach())
    return (1.0 - label_weight) * kd + label_weight * ce, stats


# --- compute terms ---------------------------------------------------------------------------


def budget_price(multiplier: Tensor, gap: float, weight: float, rate: float) -> float:
    """The price of compute: a PI controller on `gap`, the MAC fraction the deterministic
    (inference) decisions spend minus the budget.

    Proportional (`weight * gap`) plus integral (the `multiplier`, dual ascent on the budget
    constraint, updated in place and kept in [-10, 10]), so it keeps pushing until the mean
    sits on budget. `multiplier` is a buffer of the model, so checkpoints carry it.
    """
    previous = float(multiplier)
    multiplier.fill_(max(-10.0, min(10.0, previous + rate * gap)))
    return weight * gap + previous


def step_metrics(
    loss: Tensor, compute: Tensor, stats: dict[str, float], **figures: float
) -> dict[str, float]:
    """What a budget-trained strategy's `training_loss` reports each step: the loss, its
    distillation and compute terms, the cross-entropy when labels were given, and the
    strategy's own figures (its MAC fraction, the compute price) in between."""
    metrics = {
        "loss": float(loss.detach()),
        "distill": stats["kd"],
        "compute": float(compute.detach()),
        **figures,
    }
    if "ce" in stats:
        metrics["ce"] = stats["ce"]
    return metrics


def priced_compute(fraction: Tensor, price: float) -> Tensor:
    """The compute term of straight-through decisions: price x mean MAC fraction."""
    return price * fraction.mean()


def explore_actions(probs: Tensor, explore: float = 0.1) -> tuple[Tensor, Tensor]:
    """BlockDrop's alpha-bounded Bernoulli sampling: (actions [N, K], log-probability [N]).

    Each action is run with probability (1 - explore) * p + explore * (1 - p), so every block
    keeps being tried; the log-probability is what REINFORCE differentiates.
    """
    bounded = (1.0 - explore) * probs + explore * (1 - probs)
    actions = torch.bernoulli(bounded.detach())
    log_prob = (
        actions * torch.log(bounded.clamp_min(1e-6))
        + (1 - actions) * torch.log((1 - bounded).clamp_min(1e-6))
    ).sum(1)
    return actions, log_prob


def reinforce(task: Tensor, fraction: Tensor, price: float, log_prob: Tensor) -> Tensor:
    """REINFORCE with a batch-mean baseline (BlockDrop): the reward of a sample is minus its
    task loss minus `price` times its MAC fraction."""
    reward = -task.detach() - price * fraction.detach()
    advantage = reward - reward.mean()
    return -(advantage * log_prob).mean()


def density_term(density: Tensor, target: float, weight: float) -> Tensor:
    """Spatial masks: weight x (MAC-weighted density - target density)^2."""
    return weight * (density - target) ** 2
