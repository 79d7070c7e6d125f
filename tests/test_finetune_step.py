"""The optimisation step of fine-tuning: the warm-up, gradient clipping, and what a run that
still goes non-finite says.

A joint run whose warm-up is a few steps long (a short run: the warm-up is a fraction of it)
meets the full rate almost at once; the resolution cascade's recipe (plain SGD, its new parts
at 10x) then diverged within a handful of steps, its gradient norm growing tenfold a step until
the loss was NaN. Clipping each group's gradient norm (`FinetuneConfig.clip_grad_norm`) bounds
those steps; a healthy run's norms stay far below the default clip.
"""

from __future__ import annotations

import pytest
import torch

import dynify
from dynify.errors import DynifyError
from dynify.train.distill import lr_factor, warmup_steps
from tests.test_contract import contract_model


def short_joint_run():
    """The resolution cascade on the contract network, 64 samples: 8 joint steps."""
    model = contract_model()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, 16, 16, generator=g) * torch.exp(torch.randn(64, 1, 1, 1, generator=g))
    dyn = dynify.convert(model, "resolution", x[:1])
    with torch.no_grad():
        y = model(x).argmax(-1)
    return dyn, (x, y)


def config(**changes) -> dynify.FinetuneConfig:
    settings = dict(mode="joint", epochs=2, batch_size=16, lr=0.1, augment=False)
    return dynify.FinetuneConfig(calibration_fraction=0.0, **(settings | changes))


def test_a_short_joint_run_at_a_high_rate_stays_finite_with_the_default_clip():
    dyn, data = short_joint_run()
    result = dynify.finetune(dyn, data, config(), progress=False)
    assert result.epochs_run == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert all(torch.isfinite(p).all() for p in dyn.parameters())


def test_without_the_clip_it_diverges_and_says_what_to_try():
    dyn, data = short_joint_run()
    before = {k: v.clone() for k, v in dyn.state_dict().items()}
    with pytest.raises(DynifyError, match="the loss became nan") as caught:
        dynify.finetune(dyn, data, config(clip_grad_norm=None), progress=False)
    message = " ".join(str(caught.value).split())
    for advice in ("--lr", "--warmup", "1 of 8", "--clip-grad-norm: now off"):
        assert advice in message
    assert "clip_grad_norm" in message and "last checkpoint" in message
    assert all(torch.isfinite(v).all() for v in dyn.state_dict().values())
    assert dyn.state_dict().keys() == before.keys()


@pytest.mark.parametrize("total", [1, 2, 5, 8, 19, 20, 21, 117, 2112])
def test_the_warm_up_never_exceeds_the_full_rate(total):
    values = [lr_factor("cosine", step, total, 0.05) for step in range(total)]
    assert max(values) <= 1.0
    assert warmup_steps(0.05, total) == sum(1 for s in range(total) if s / total < 0.05)


def test_the_clip_is_validated():
    with pytest.raises(DynifyError, match="clip_grad_norm"):
        config(clip_grad_norm=0.0).validate()
    with pytest.raises(DynifyError, match="clip_grad_norm"):
        config(clip_grad_norm=float("nan")).validate()
