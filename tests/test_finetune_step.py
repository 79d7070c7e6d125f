"""The optimisation step of fine-tuning: the warm-up, gradient clipping, and what a run that
still goes non-finite says.

A joint run whose warm-up is a few steps long (a short run: the warm-up is a fraction of it)
meets the full rate almost at once; the resolution cascade's recipe (plain SGD, its new parts
at 10x) then diverged within a handful of steps, its gradient norm growing tenfold a step until
the loss was NaN. Clipping each group's gradient norm (`FinetuneConfig.clip_grad_norm`) bounds
those steps; a healthy run's norms stay far below the default clip. The cause is the early
steps, not the run's length, so joint mode's warm-up has a floor in steps
(`FinetuneConfig.warmup_min_steps`, capped at half the run): with it the same short run stays
finite unclipped, and a run long enough for 5 % to be that many steps keeps its schedule.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import dynify
from dynify.errors import DynifyError
from dynify.train.distill import JOINT_WARMUP_STEPS, lr_factor, warmup_fraction, warmup_steps
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


def test_without_the_clip_and_the_warm_up_floor_it_diverges_and_says_what_to_try():
    dyn, data = short_joint_run()
    before = {k: v.clone() for k, v in dyn.state_dict().items()}
    with pytest.raises(DynifyError, match="the loss became nan") as caught:
        unguarded = config(clip_grad_norm=None, warmup_min_steps=0)
        dynify.finetune(dyn, data, unguarded, progress=False)
    message = " ".join(str(caught.value).split())
    for advice in (
        "--lr",
        "--warmup",
        "at least 0 steps (warmup_min_steps, --warmup-min-steps): 1 of 8",
        "--clip-grad-norm: now off",
    ):
        assert advice in message
    assert "clip_grad_norm" in message and "last checkpoint" in message
    assert all(torch.isfinite(v).all() for v in dyn.state_dict().values())
    assert dyn.state_dict().keys() == before.keys()


def test_the_warm_up_floor_alone_keeps_the_short_run_finite_without_the_clip():
    dyn, data = short_joint_run()
    result = dynify.finetune(dyn, data, config(clip_grad_norm=None), progress=False)
    assert result.epochs_run == 2  # 8 steps: the floor (100) capped at half of them, 4
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert all(torch.isfinite(p).all() for p in dyn.parameters())


@pytest.mark.parametrize("total", [1, 2, 5, 8, 19, 20, 21, 117, 2112])
@pytest.mark.parametrize("floor", [0, JOINT_WARMUP_STEPS])
def test_the_warm_up_never_exceeds_the_full_rate(total, floor):
    values = [lr_factor("cosine", step, total, 0.05, floor) for step in range(total)]
    assert max(values) <= 1.0
    fraction = warmup_fraction(0.05, total, floor)
    assert warmup_steps(0.05, total, floor) == sum(1 for s in range(total) if s / total < fraction)


def test_the_warm_up_lasts_at_least_the_floor_but_at_most_half_the_run():
    # the shortened resolution re-run: 15,000 images, one joint epoch, 117 steps
    assert warmup_steps(0.05, 117) == 6
    assert warmup_steps(0.05, 117, JOINT_WARMUP_STEPS) == 59  # capped at half the run
    assert warmup_steps(0.05, 1000, JOINT_WARMUP_STEPS) == 100
    values = [lr_factor("cosine", s, 1000, 0.05, JOINT_WARMUP_STEPS) for s in range(1000)]
    assert values[:100] == pytest.approx([(s + 1) / 100 for s in range(100)])
    assert values[99] == 1.0 and all(b <= a for a, b in itertools.pairwise(values[99:]))
    assert warmup_steps(0.0, 117, JOINT_WARMUP_STEPS) == 0  # no warm-up stays none


@pytest.mark.parametrize("total", [2000, 2106, 3510, 10_000])
def test_runs_whose_warm_up_reaches_the_floor_keep_their_schedule_exactly(total):
    # 2,106 steps: the published joint phase (6 epochs over 45,000 images, batch 128)
    for step in range(total):
        assert lr_factor("cosine", step, total, 0.05, JOINT_WARMUP_STEPS) == lr_factor(
            "cosine", step, total, 0.05
        )


def test_the_floor_is_joint_modes_by_default():
    assert config().warmup_floor == JOINT_WARMUP_STEPS
    assert config(mode="heads").warmup_floor == 0
    assert config(mode="heads", warmup_min_steps=30).warmup_floor == 30
    assert config(warmup_min_steps=0).warmup_floor == 0
    for bad in (-1, 2.5):
        with pytest.raises(DynifyError, match="warmup_min_steps"):
            config(warmup_min_steps=bad).validate()


def test_the_clip_is_validated():
    with pytest.raises(DynifyError, match="clip_grad_norm"):
        config(clip_grad_norm=0.0).validate()
    with pytest.raises(DynifyError, match="clip_grad_norm"):
        config(clip_grad_norm=float("nan")).validate()


@pytest.mark.parametrize("lr, backbone_lr", [(None, 0.01), (0.02, 0.02)])
def test_joint_fine_tuning_peaks_at_0_01_unless_a_rate_is_set(tmp_path, lr, backbone_lr):
    dyn, data = short_joint_run()
    checkpoint = tmp_path / "run.ckpt"
    dynify.finetune(dyn, data, config(lr=lr, epochs=1), checkpoint=checkpoint, progress=False)
    groups = torch.load(checkpoint, weights_only=True)["optimizer"]["param_groups"]
    assert [g["base_lr"] for g in groups] == pytest.approx([backbone_lr, 10 * backbone_lr])
