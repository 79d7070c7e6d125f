"""Operating points and the fair baseline: each point chosen on calibration data and measured
on test data as the real forward measures it; the rule that picks the point to report reads
calibration figures only; the static network fine-tuned as long learns and is seeded."""

from __future__ import annotations

import pytest
import torch

import dynify
from dynify.errors import DynifyError
from tests.conftest import TinyResNet, randomize_bn


def _point(macs: float, acc: float) -> dynify.OperatingPoint:
    return dynify.OperatingPoint({"threshold": macs}, [], [], acc, macs, 0.0, 0.0)


def test_gate_operating_point_is_the_most_accurate_within_the_mac_cap():
    sweep = [_point(0.50, 0.80), _point(0.60, 0.85), _point(0.65, 0.85), _point(0.80, 0.90)]
    choose = dynify.choose_operating_point
    assert choose(sweep, max_macs=0.70) is sweep[1]  # a tie goes to fewer MACs
    assert choose(sweep, max_macs=0.90) is sweep[3]
    assert choose(sweep, max_macs=0.40) is sweep[0]  # none within: the cheapest


def test_mask_operating_point_is_the_cheapest_within_the_accuracy_margin():
    rows = [_point(0.3, 0.85), _point(0.5, 0.895), _point(0.7, 0.90)]
    choose = dynify.choose_operating_point
    assert choose(rows, min_accuracy=0.90 - 0.01) is rows[1]
    assert choose(rows, min_accuracy=0.99 - 0.01) is rows[-1]  # none: the most accurate


def test_operating_point_rule_needs_exactly_one_target_and_points():
    with pytest.raises(DynifyError, match="exactly one"):
        dynify.choose_operating_point([_point(0.5, 0.8)])
    with pytest.raises(DynifyError, match="exactly one"):
        dynify.choose_operating_point([_point(0.5, 0.8)], max_macs=0.5, min_accuracy=0.5)
    with pytest.raises(DynifyError, match="no operating points"):
        dynify.choose_operating_point([], max_macs=0.5)


def _early_exit():
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet())
    dyn = dynify.convert(model, "early-exit", torch.zeros(1, 3, 16, 16), options={"exits": 2})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # heads with varied confidence, as trained heads have
        for head in dyn.heads:
            head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=g) * 3)
    return model, dyn.eval()


def _labelled(model, n: int, seed: int):
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, model(x).argmax(-1)


def test_operating_points_are_calibrated_then_measured_like_the_real_forward():
    model, dyn = _early_exit()
    calib, test = _labelled(model, 400, 1), _labelled(model, 300, 2)
    before = dyn.thresholds.clone(), dyn.temperatures.clone()
    points = dynify.operating_points(
        dyn, calib, test, budgets=[0.5, 0.8, 0.0001], max_drops=[0.02], thresholds=[0.0, 1.01]
    )
    targets = [p.target for p in points]
    assert {"budget": 0.0001} not in targets  # unreachable on calibration: left out
    assert targets == [
        {"budget": 0.5},
        {"budget": 0.8},
        {"max_drop": 0.02},
        {"threshold": 0.0},
        {"threshold": 1.01},
    ]
    assert torch.equal(dyn.thresholds, before[0]) and torch.equal(dyn.temperatures, before[1])
    for p in points[:2]:
        assert p.calibration_macs <= p.target["budget"] + 1e-6
    # each point's test figures are what the real dynamic forward gives at its thresholds
    x, y = test
    for p in points:
        dyn.set_thresholds(p.thresholds)
        dyn.temperatures.copy_(torch.tensor(p.temperatures))
        with torch.no_grad():
            pred = dyn(x).argmax(-1)
            macs = float(dyn.last_macs.double().mean()) / dyn.static_macs
        assert p.test_accuracy == pytest.approx(float((pred == y).double().mean()), abs=1e-9)
        assert p.test_macs == pytest.approx(macs, rel=1e-6)
    assert points[-1].test_macs == pytest.approx(1.0 + sum(dyn.head_macs) / dyn.static_macs)


def test_static_baseline_learns_and_is_seeded():
    torch.manual_seed(0)
    data = (torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 5, (64,)))
    start = randomize_bn(TinyResNet())
    runs = []
    for _ in range(2):
        model = TinyResNet()
        model.load_state_dict(start.state_dict())
        result = dynify.finetune_static(model, data, epochs=2, input_size=16, batch_size=16)
        assert result.epochs == 2 and len(result.history) == 2
        assert not model.training
        runs.append(model.state_dict())
    assert any(not torch.equal(runs[0][k], start.state_dict()[k]) for k in runs[0])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    with pytest.raises(DynifyError, match="epochs"):
        dynify.finetune_static(TinyResNet(), data, epochs=0, input_size=16)
