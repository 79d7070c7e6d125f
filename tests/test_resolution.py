"""Resolution cascade: static equivalence, exits at low resolution, per-resolution BN, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynify
from dynify.errors import StrategyError
from dynify.models.cifar_resnet import cifar_resnet
from dynify.runtime.resolution import ResolutionModel
from tests.conftest import randomize_bn

INPUT = (3, 16, 16)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(cifar_resnet(8, num_classes=5))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, *INPUT, generator=torch.Generator().manual_seed(1))


def convert(model, **options) -> ResolutionModel:
    return dynify.convert(model, "resolution", torch.zeros(1, *INPUT), options=options).eval()


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_threshold_zero_exits_at_low_resolution_and_never_runs_the_full_pass(model, x):
    dyn = convert(model)
    full_bn = count_calls(dyn.net.get_submodule("bn1"))  # the full pass's own batch norm
    dyn.set_thresholds(0.0)
    with torch.no_grad():
        out = dyn(x)
        low = dyn.low_logits(x)
    assert full_bn[0] == 0
    assert torch.equal(out, low)
    assert torch.equal(dyn.last_exit, torch.zeros(6, dtype=torch.long))
    assert torch.equal(dyn.last_macs, torch.full((6,), dyn.low_macs))
    # a fully convolutional net at half the side costs about a quarter
    assert 0.2 < dyn.low_macs / dyn.static_macs < 0.3


def test_threshold_above_one_is_the_static_model(model, x):
    dyn = convert(model)
    dyn.set_thresholds(1.01)
    with torch.no_grad():
        out = dyn(x)
        expected = model(x)
    assert (out - expected).abs().max() <= 1e-5
    assert torch.equal(dyn.last_exit, torch.ones(6, dtype=torch.long))
    assert torch.equal(dyn.last_macs, torch.full((6,), dyn.low_macs + dyn.static_macs))


def test_mixed_batch_gives_each_sample_its_own_exit(model, x):
    dyn = convert(model)
    with torch.no_grad():
        low, full = dyn.exit_logits(x)
        confidence = torch.softmax(low, -1).amax(-1)
        ranked = confidence.sort().values
        threshold = float(ranked[2:4].mean())  # between two samples: no ties with rounding
        dyn.set_thresholds(threshold)
        out = dyn(x)
        exits = dyn.last_exit.clone()
        for i in range(6):
            expected = low[i] if confidence[i] >= threshold else full[i]
            assert (out[i] - expected).abs().max() <= 1e-5
            assert (dyn(x[i : i + 1]) - out[i : i + 1]).abs().max() <= 1e-5
    assert 0 < int(exits.sum()) < 6
    assert torch.equal(exits, (confidence < threshold).long())


def test_low_resolution_pass_has_its_own_batch_norm(model, x):
    dyn = convert(model)
    full_bn = dyn.net.get_submodule("bn1")
    low_bn = dyn.low_bn["bn1"]
    before = full_bn.running_mean.clone()
    assert low_bn is not full_bn and torch.equal(low_bn.running_mean, before)
    used = dyn.recalibrate_low_bn([x], max_batches=5)
    assert used == 1
    with torch.no_grad():
        stem = F.conv2d(F.avg_pool2d(x, 2), dyn.net.get_submodule("conv1").weight, padding=1)
    assert torch.allclose(low_bn.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert torch.equal(full_bn.running_mean, before)  # the full pass is untouched
    assert not dyn.training and not low_bn.training
    with torch.no_grad(), dyn.static():
        assert (dyn(x) - model(x)).abs().max() <= 1e-5


def test_shared_batch_norm_option(model, x):
    dyn = convert(model, low_bn=False)
    assert len(dyn.low_bn) == 0 and len(dyn.low_head) == 1  # its own copy of `linear`
    assert dyn.low_head["linear"] is not dyn.net.get_submodule("linear")
    with torch.no_grad():
        assert torch.equal(dyn.low_logits(x), model(F.avg_pool2d(x, 2)))
    assert convert(model, low_bn=False, low_head=False).low_parameters() == []


def test_training_distils_low_resolution_logits_and_keeps_the_full_pass(model, x):
    dyn = convert(model)
    with torch.no_grad():
        teacher = model(x)
    for p in dyn.net.parameters():
        p.requires_grad_(False)
    dyn.train()
    optimizer = torch.optim.Adam(dyn.low_parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        loss, stats = dyn.training_loss(x, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(stats["loss"])
    assert losses[-1] < 0.5 * losses[0]
    assert {"kd_low", "acc", "loss"} <= set(stats)
    dyn.eval()
    with torch.no_grad(), dyn.static():
        assert (dyn(x) - model(x)).abs().max() <= 1e-5


def test_joint_training_distils_both_resolutions(model, x):
    dyn = convert(model)
    with torch.no_grad():
        teacher = model(x)
    dyn.train()
    loss, stats = dyn.training_loss(x, teacher)
    loss.backward()
    assert {"kd_low", "kd_full"} <= set(stats)
    assert dyn.net.get_submodule("linear").weight.grad is not None
    assert dyn.low_head["linear"].weight.grad is not None


def test_save_and_load_keep_low_batch_norm_and_thresholds(model, x, tmp_path):
    dyn = convert(model, threshold=0.4)
    dyn.recalibrate_low_bn([x])
    dyn.temperatures.fill_(1.5)
    path = dynify.save(dyn, tmp_path / "r.dyn")
    loaded = dynify.load(path, model=cifar_resnet(8, num_classes=5))
    with torch.no_grad():
        assert torch.equal(loaded(x), dyn(x))
        assert torch.equal(loaded.last_exit, dyn.last_exit)
    assert torch.equal(loaded.low_bn["bn1"].running_mean, dyn.low_bn["bn1"].running_mean)
    assert float(loaded.thresholds[0]) == pytest.approx(0.4)
    assert float(loaded.temperatures[0]) == pytest.approx(1.5)


def test_options_are_checked(model):
    with pytest.raises(StrategyError, match="scale"):
        convert(model, scale=3)
    with pytest.raises(StrategyError, match="policy"):
        convert(model, policy="patience")
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 5))
    with pytest.raises(StrategyError, match="does not accept 8x8"):
        dynify.convert(fixed.eval(), "resolution", torch.zeros(1, *INPUT))


def test_export_puts_the_full_pass_under_an_if(model, x, tmp_path):
    from dynify.export.onnx import write_onnx
    from dynify.export.verify import count_executed_ops

    dyn = convert(model)
    result = write_onnx(dyn.export_face(), x[:2], tmp_path / "r.onnx", reference=dyn)
    assert result.report.ok  # ORT == the eager cascade, at thresholds 0, default and 1.01
    assert result.if_nodes >= 1
    low_only = count_executed_ops(result.path, x[:1], [0.0])
    both = count_executed_ops(result.path, x[:1], [1.01])
    assert both == 2 * low_only


@pytest.mark.parametrize("policy", ["confidence", "entropy"])
def test_export_face_decides_like_the_eager_model_for_every_policy(model, x, policy):
    from dynify.runtime.decisions import exit_scores

    dyn = convert(model, policy=policy)
    with torch.no_grad():
        low = dyn.low_logits(x)
    median = float(exit_scores(low, dyn.temperatures[0], policy).median())
    face = dyn.export_face().eval()
    for threshold in (0.0, median, 1.01):
        dyn.set_thresholds(threshold)
        with torch.no_grad():
            eager = dyn(x)
            logits, decisions = face(x, torch.tensor([threshold]))
        assert torch.equal(decisions, dyn.last_exit)
        torch.testing.assert_close(logits, eager)


def test_fine_tuning_distils_at_the_early_exits_temperature_by_default(model, x):
    """3, as the exits: at 4 the cascade's joint phase meets a loss spike at lr 0.01."""
    from dynify.train.losses import LossConfig

    dyn = convert(model)
    teacher = torch.randn(len(x), 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own = dyn.training_loss(x, teacher)[0]
        at_three = dyn.training_loss(x, teacher, None, LossConfig(kd_temperature=3.0))[0]
        at_four = dyn.training_loss(x, teacher, None, LossConfig(kd_temperature=4.0))[0]
    assert torch.equal(own, at_three) and not torch.allclose(own, at_four)


def test_training_loss_uses_its_own_temperature_unless_the_config_sets_one(model, x):
    from dynify.train.losses import LossConfig

    dyn = convert(model, distill_temperature=5.0)
    teacher = torch.randn(len(x), 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own = dyn.training_loss(x, teacher)[0]
        same = dyn.training_loss(x, teacher, None, LossConfig(kd_temperature=5.0))[0]
        other = dyn.training_loss(x, teacher, None, LossConfig(kd_temperature=3.0))[0]
    assert torch.equal(own, same)
    assert not torch.allclose(own, other)
