"""Fine-tuning: distillation loss goes down, the right parts train, runs resume bit-exactly."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import dynify
from dynify.errors import DataError, DynifyError
from dynify.train.distill import Interrupted, finetune, lr_factor, static_parameter_names
from tests.conftest import TinyResNet, randomize_bn


def _problem(n: int = 192, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_bn(TinyResNet())
    with torch.no_grad():  # a confident teacher, so distillation has something to teach
        model.fc.weight.mul_(40.0)
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        y = model(x).argmax(-1)
    dyn = dynify.convert(model, "early-exit", torch.zeros(1, 3, 16, 16), options={"exits": 2})
    return model, dyn, x, y


def _distill_loss(dyn, x) -> float:
    with torch.no_grad():
        return dyn.training_loss(x, None, None)[0].item()


def _kwargs(**extra):
    base = dict(epochs=3, batch_size=32, seed=0, progress=False, augment=False)
    return {**base, **extra}


def test_heads_mode_lowers_distillation_loss_and_keeps_the_backbone():
    model, dyn, x, y = _problem()
    before_state = {k: v.clone() for k, v in dyn.state_dict().items() if "heads" not in k}
    before = _distill_loss(dyn, x)
    result = finetune(dyn, (x, y), **_kwargs(lr=1e-2, label_weight=0.0))
    after = _distill_loss(dyn, x)
    assert after < 0.7 * before, (before, after)
    assert len(result.history) == 3 and result.history[-1]["loss"] < result.history[0]["loss"]
    # Backbone weights and BN statistics untouched: the static network is still the original.
    for k, v in dyn.state_dict().items():
        if "heads" not in k:
            assert torch.equal(v, before_state[k]), k
    with torch.no_grad(), dyn.static():
        assert (dyn(x) - model(x)).abs().max() <= 1e-5
    assert all(p.requires_grad for p in dyn.parameters())  # restored after training


def test_held_out_calibration_part_is_not_trained_on():
    _, dyn, x, y = _problem()
    result = finetune(dyn, (x, y), **_kwargs(epochs=1, calibration_fraction=0.25))
    assert len(result.calibration_data) == pytest.approx(0.25 * len(x), abs=len(y.unique()))
    assert dyn.spec["finetune"]["samples"] == len(x) - len(result.calibration_data)


def test_labels_are_optional():
    _, dyn, x, _ = _problem()
    before = _distill_loss(dyn, x)
    finetune(dyn, x, **_kwargs(lr=1e-2, calibration_fraction=0.0))
    assert _distill_loss(dyn, x) < 0.7 * before


def test_joint_mode_trains_the_backbone_towards_the_teacher():
    model, dyn, x, y = _problem()
    with torch.no_grad():
        teacher = model(x)
        before = dyn.training_loss(x, teacher, None)[0].item()
    finetune(dyn, (x, y), **_kwargs(mode="joint", lr=0.02, epochs=2))
    with torch.no_grad():
        after = dyn.training_loss(x, teacher, None)[0].item()
        moved = (dyn.segments[0].state_dict()["stem.0.weight"] - model.stem[0].weight).abs()
    assert after < before
    assert moved.max() > 0  # the backbone learned too


def test_static_parameters_are_found_by_gradient():
    _, dyn, _, _ = _problem()
    static = static_parameter_names(dyn)
    assert static and all(not n.startswith("heads.") for n in static)
    assert {n for n, _ in dyn.named_parameters()} - static == {
        n for n, _ in dyn.named_parameters() if n.startswith("heads.")
    }


def _interrupt_at(step: int):
    def callback(info):
        if info["step"] == step:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("mode", ["heads", "joint"])
def test_resume_after_interrupt_reproduces_uninterrupted_weights(tmp_path, mode):
    _, reference, x, y = _problem()
    _, dyn, _, _ = _problem()
    kwargs = _kwargs(mode=mode, augment=True, calibration_fraction=0.1)
    finetune(reference, (x, y), checkpoint=tmp_path / "ref.ckpt", **kwargs)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):  # mid-epoch 2 (5 batches of 32 per epoch)
        finetune(dyn, (x, y), checkpoint=ckpt, callback=_interrupt_at(7), **kwargs)
    state = torch.load(ckpt, weights_only=True)  # tensors and plain values only
    position = state["position"]
    assert (position["epoch"], position["batch"], position["step"]) == (1, 2, 7)
    _, resumed, _, _ = _problem()  # a fresh process would reload the artifact
    result = finetune(resumed, (x, y), checkpoint=ckpt, resume=True, **kwargs)
    assert result.resumed_from == 1
    for (k, a), b in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k


def test_kill_writes_a_checkpoint_and_resume_completes_the_run(tmp_path):
    _, reference, x, y = _problem()
    finetune(reference, (x, y), **_kwargs())
    _, dyn, _, _ = _problem()
    ckpt = tmp_path / "run.ckpt"

    def kill(info):
        if info["step"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    # A background job's shell may have set SIGINT to be ignored: the run restores what it found.
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Interrupted):
        finetune(dyn, (x, y), checkpoint=ckpt, callback=kill, **_kwargs())
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers removed again
    assert torch.load(ckpt, weights_only=True)["position"]["step"] == 4  # the batch finished
    _, resumed, _, _ = _problem()
    finetune(resumed, (x, y), checkpoint=ckpt, resume=True, **_kwargs())
    for (k, a), b in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k


def test_resume_refuses_a_different_run(tmp_path):
    _, dyn, x, y = _problem()
    ckpt = tmp_path / "a.ckpt"
    finetune(dyn, (x, y), checkpoint=ckpt, **_kwargs(epochs=1))
    with pytest.raises(DynifyError, match="different run.*epochs"):
        finetune(dyn, (x, y), checkpoint=ckpt, resume=True, **_kwargs(epochs=2))
    with pytest.raises(DynifyError, match="No checkpoint"):
        finetune(dyn, (x, y), checkpoint=tmp_path / "none.ckpt", resume=True, **_kwargs())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    _, dyn, x, y = _problem()
    ckpt = tmp_path / "c.ckpt"
    finetune(dyn, (x, y), checkpoint=ckpt, **_kwargs(epochs=1))
    good = ckpt.read_bytes()

    def broken_save(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(DynifyError, match="Cannot write the checkpoint.*disk full"):
        finetune(dyn, (x, y), checkpoint=ckpt, **_kwargs(epochs=1))
    assert ckpt.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


def test_an_unwritable_checkpoint_fails_before_training(tmp_path):
    _, dyn, x, y = _problem()
    before = {k: v.clone() for k, v in dyn.state_dict().items()}
    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises(DynifyError, match="Cannot write the checkpoint"):
        finetune(dyn, (x, y), checkpoint=tmp_path / "dir.ckpt", **_kwargs(epochs=1))
    for k, v in dyn.state_dict().items():
        assert torch.equal(v, before[k]), k  # not one step was taken
    assert [p.name for p in tmp_path.iterdir()] == ["dir.ckpt"]


def test_bad_inputs_are_clear_errors(tmp_path):
    _, dyn, x, y = _problem()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        finetune(dyn, tmp_path / "empty", **_kwargs())
    with pytest.raises(DataError, match="classes"):
        finetune(dyn, (x, y + 10), **_kwargs())
    with pytest.raises(DynifyError, match="mode"):
        finetune(dyn, (x, y), **_kwargs(mode="everything"))
    with pytest.raises(DynifyError, match="epochs"):
        finetune(dyn, (x, y), **_kwargs(epochs=0))


def test_schedules_start_low_peak_and_end_near_zero():
    for schedule in ("cosine", "onecycle"):
        values = [lr_factor(schedule, s, 100) for s in range(101)]
        assert max(values) == pytest.approx(1.0, abs=0.02)
        assert values[0] < 0.5 and values[-1] < 1e-3
    assert lr_factor("constant", 50, 100) == 1.0
