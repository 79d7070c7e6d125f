"""The one distillation loss and the compute terms every strategy's training_loss is built from."""

from __future__ import annotations

import pytest
import torch

from dynify.errors import DynifyError
from dynify.train.losses import (
    LossConfig,
    budget_price,
    distillation,
    explore_actions,
    reinforce,
)


def _batch(labels: list[int] | None):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(6, 5, generator=gen)
    return logits, teacher, None if labels is None else torch.tensor(labels)


@pytest.mark.parametrize("labels", [None, [0, 1, 2, 3, 4, 0], [-1] * 6])
def test_per_sample_losses_average_to_the_batch_loss(labels):
    logits, teacher, y = _batch(labels)
    mean, stats = distillation(logits, teacher, y, 3.0, 0.5)
    each, each_stats = distillation(logits, teacher, y, 3.0, 0.5, per_sample=True)
    assert each.shape == (6,)
    torch.testing.assert_close(each.mean(), mean)
    assert stats == pytest.approx(each_stats)
    assert ("ce" in stats) == (labels is not None and labels[0] >= 0)


def test_the_mix_is_kd_and_ce_weighted_by_the_label_weight():
    logits, teacher, y = _batch([0, 1, 2, 3, 4, 0])
    kd, _ = distillation(logits, teacher, y, 2.0, 0.0)
    ce, _ = distillation(logits, teacher, y, 2.0, 1.0)
    mixed, _ = distillation(logits, teacher, y, 2.0, 0.3)
    torch.testing.assert_close(mixed, 0.7 * kd + 0.3 * ce)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, y))
    assert float(distillation(teacher, teacher, None, 2.0, 0.5)[0]) == pytest.approx(0, abs=1e-6)


def test_the_temperature_is_the_configs_else_the_strategys_own():
    assert LossConfig().temperature(4.0) == 4.0
    assert LossConfig(kd_temperature=2.5).temperature(4.0) == 2.5
    for bad in ({"kd_temperature": 0.0}, {"label_weight": 1.5}, {"budget": 0.0}):
        with pytest.raises(DynifyError):
            LossConfig(**bad)


def test_budget_price_is_proportional_plus_integral_and_bounded():
    multiplier = torch.zeros((), dtype=torch.float64)
    prices = [budget_price(multiplier, 0.2, weight=20.0, rate=0.5) for _ in range(3)]
    assert prices == pytest.approx([4.0, 4.1, 4.2])  # 20 * gap + the integral so far
    assert float(multiplier) == pytest.approx(0.3)
    for _ in range(200):
        budget_price(multiplier, 1.0, weight=20.0, rate=1.0)
    assert float(multiplier) == 10.0


def test_reinforce_prefers_the_actions_of_cheap_accurate_samples():
    torch.manual_seed(0)
    probs = torch.full((4, 3), 0.5, requires_grad=True)
    actions, log_prob = explore_actions(probs)
    assert set(actions.unique().tolist()) <= {0.0, 1.0}
    task = torch.tensor([0.1, 1.0, 0.1, 1.0])
    reinforce(task, torch.zeros(4), 0.0, log_prob).backward()
    # lowering the loss means raising the log-probability of the good samples' actions
    good = actions[0] * 2 - 1  # +1 where sample 0 ran a block, -1 where it skipped
    assert (probs.grad[0] * good < 0).all()
