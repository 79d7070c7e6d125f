"""frame-exit's learned exit gate (FrameExit, `policy="gate"`): the contract tests cover
static exactness, batch vs alone, MAC books (gates included), artifacts and export; these
check what the gate adds: what it learns from, how it decides, how it is calibrated, and
moving trained gates into another model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import dynify
from dynify.errors import StrategyError
from dynify.runtime.decisions import NEVER
from dynify.runtime.frame_exit import balanced_bce, gate_item, gate_targets
from tests.test_frame_exit import T, clips, make


def gated(model=None, **options) -> dynify.DynamicModel:
    model = make() if model is None else model
    return dynify.convert(model, "frame-exit", clips(1), options={"policy": "gate", **options})


def test_targets_say_whether_the_running_prediction_is_not_yet_final_or_right():
    # 2 clips, 3 groups, 3 classes: running predictions (0, 1, 1) and (2, 2, 0)
    means = torch.zeros(2, 3, 3)
    for n, preds in enumerate([(0, 1, 1), (2, 2, 0)]):
        for j, c in enumerate(preds):
            means[n, j, c] = 1.0
    assert gate_targets(means, None, "final").tolist() == [[1.0, 0.0], [1.0, 1.0]]
    labels = torch.tensor([0, -1])  # the second clip has no label: the final prediction
    assert gate_targets(means, labels, "correct").tolist() == [[0.0, 1.0], [1.0, 1.0]]


def test_the_loss_weighs_both_answers_alike():
    targets = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    always_stop = torch.full((4, 1), -4.0)
    always_go = torch.full((4, 1), 4.0)
    # unweighted, answering the majority ("stop") would be far cheaper; balanced, the two
    # constant answers cost the same
    assert balanced_bce(always_stop, targets) == pytest.approx(balanced_bce(always_go, targets))


def test_gates_decide_by_the_gate_rule_and_are_charged():
    dyn, x = gated().eval(), clips(8, seed=2)
    gate_macs = dyn.book.macs(gate_item(0))
    assert gate_macs > 0 and dyn.worst_case_macs() == dyn.static_macs + (T - 1) * gate_macs
    assert not isinstance(dyn, dynify.ExitCascade)  # its score is not the exits' logits'
    with torch.no_grad():
        dyn.set_thresholds(0.0)  # no gate opens: every clip leaves after its first frame
        dyn(x)
        assert dyn.last_exit.tolist() == [0] * len(x)
        assert dyn.last_macs.tolist() == [dyn.exit_macs()[0]] * len(x)
        dyn.set_thresholds(NEVER)  # every gate opens: every frame, every gate
        out = dyn(x)
        assert dyn.last_exit.tolist() == [T - 1] * len(x)
        assert dyn.last_macs.tolist() == [dyn.worst_case_macs()] * len(x)
        with dyn.static():
            assert (out - dyn(x)).abs().max() <= 1e-5
        logits = dyn.gate_logits(x)  # per gate: look further when p > 1 - t
        dyn.set_thresholds(0.5)
        dyn(x)
        opens = torch.stack([lg > 0.0 for lg in logits])  # p > 0.5
        first_shut = torch.where(~opens.all(0), (~opens).int().argmax(0), T - 1)
        assert torch.equal(dyn.last_exit, first_shut)


def test_a_clip_whose_gate_scores_nan_leaves_at_the_first_gate_switched_on():
    dyn, x = gated().eval(), clips(4, seed=5)
    x[0] = float("nan")
    with torch.no_grad():
        dyn.set_thresholds([NEVER, 0.3, NEVER])
        dyn(x)
    assert int(dyn.last_exit[0]) == 1


def test_gates_learn_with_the_per_frame_network_frozen():
    model, x = make(), clips(96, seed=3)
    dyn = gated(model)
    static_before = {k: v.clone() for k, v in model.state_dict().items()}
    gate_before = [p.detach().clone() for p in dyn.gates.parameters()]
    result = dynify.finetune(
        dyn,
        TensorDataset(x, torch.zeros(len(x), dtype=torch.long)),
        mode="heads",
        epochs=6,
        batch_size=32,
        lr=0.01,
        augment=False,
        calibration_fraction=0,
        progress=False,
    )
    first, last = result.history[0], result.history[-1]
    assert last["gate_loss"] < first["gate_loss"]
    assert all(
        not torch.equal(a, b) for a, b in zip(gate_before, dyn.gates.parameters(), strict=True)
    )
    for key, value in dyn.network.state_dict().items():  # the static network did not move
        assert torch.equal(value, static_before[key]), key
    with torch.no_grad(), dyn.eval().static():
        assert torch.equal(dyn(x), model(x))


def _real(dyn, x, y) -> tuple[float, float]:
    """(accuracy, mean MAC fraction) of the real dynamic forward."""
    with torch.no_grad():
        pred = dyn(x).argmax(-1)
    return float((pred == y).double().mean()), float(dyn.last_macs.double().mean()) / (
        dyn.static_macs
    )


def random_gates(n: int, seed: int) -> tuple[dynify.DynamicModel, torch.Tensor, torch.Tensor]:
    """A gated model with random gates (they disagree with each other), n clips, and the
    static clip model's predictions as their labels."""
    model, x = make(), clips(n, seed=seed)
    with torch.no_grad():
        y = model(x).argmax(-1)
    dyn = gated(model).eval()
    with torch.no_grad():
        for p in dyn.gates.parameters():
            p.normal_(0.0, 1.0)
    return dyn, x, y


def test_calibration_searches_one_threshold_per_gate_and_the_simulation_is_the_real_forward():
    dyn, x, y = random_gates(64, seed=6)
    y[::3] = (y[::3] + 1) % 5  # some clips the full clip gets wrong: leaving early can help
    data = TensorDataset(x, y)
    assert isinstance(dyn, dynify.GatedExits)
    for target in ({"max_drop": 0.0}, {"budget": 0.5}, {"budget": 0.7}):
        result = dynify.calibrate(dyn, data, part="all", **target)
        assert result.method == "lagrangian" and result.temperatures == []
        assert dyn.thresholds.tolist() == result.thresholds
        # the simulated gate rule is what the model does, exactly
        assert _real(dyn, x, y) == pytest.approx((result.accuracy, result.macs_fraction), abs=1e-12)
        if "budget" in target:
            assert result.macs_fraction <= target["budget"]
        else:
            assert result.accuracy >= result.static_accuracy
    assert len(set(result.thresholds)) > 1  # chosen gate by gate, not one shared value


def test_evaluate_reads_gated_exits_like_an_exit_cascade():
    dyn, x, y = random_gates(48, seed=8)
    dyn.set_thresholds([0.4, 0.7, 0.2])
    report = dynify.evaluate(dyn, TensorDataset(x, y))
    real = _real(dyn, x, y)
    assert (report.dynamic_accuracy, report.dynamic_macs_fraction) == pytest.approx(real, abs=1e-12)
    with torch.no_grad():
        dyn(x)
    assert report.exit_histogram == torch.bincount(dyn.last_exit, minlength=T).tolist()
    assert report.exit_names == ["0", "1", "2", "final"]
    # the curve's shared thresholds, run for real: 0 stops every clip at once, NEVER at none
    ends = {p.threshold: (p.accuracy, p.macs_fraction) for p in report.curve}
    for t in (0.0, NEVER):
        dyn.set_thresholds(t)
        assert ends[t] == pytest.approx(_real(dyn, x, y), abs=1e-12)
    assert ends[0.0][1] < ends[NEVER][1]
    assert len(report.curve) > 10 and report.oracle_macs_fraction <= ends[NEVER][1]


def test_calibration_under_a_mac_cap_never_asks_the_gate_the_cap_stops_at():
    dyn, x, y = random_gates(64, seed=9)
    cap = 0.6
    result = dynify.calibrate(dyn, TensorDataset(x, y), budget=0.5, mac_cap=cap, part="all")
    deepest = dyn.deepest_group()
    assert 0 < deepest < dyn.num_exits and result.thresholds[deepest] == 0.0
    assert dyn.exit_macs()[deepest] <= cap * dyn.static_macs
    assert _real(dyn, x, y) == pytest.approx((result.accuracy, result.macs_fraction), abs=1e-12)
    assert int(dyn.last_exit.max()) <= deepest
    assert float(dyn.last_macs.max()) <= cap * dyn.static_macs


def test_trained_gates_move_into_a_model_converted_alike():
    source, target = gated().eval(), gated().eval()
    with torch.no_grad():
        for p in source.gates.parameters():
            p.normal_(0.0, 1.0)
    x = clips(8, seed=7)
    names = dynify.copy_new_parts(source, target)
    assert names and all(name.startswith("gates.") for name in names)
    for dyn in (source, target):
        dyn.set_thresholds(0.5)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
        assert torch.equal(source.last_exit, target.last_exit)
    with pytest.raises(StrategyError, match="differ"):
        dynify.copy_new_parts(source, gated(gate_hidden=4))
    plain = dynify.convert(make(), "frame-exit", clips(1))
    with pytest.raises(StrategyError, match="differ"):
        dynify.copy_new_parts(source, plain)


def test_an_operating_point_sets_thresholds_and_temperatures():
    model, x = make(), clips(48, seed=8)
    with torch.no_grad():
        y = model(x).argmax(-1)
    data = TensorDataset(x, y)
    dyn = dynify.convert(model, "frame-exit", clips(1)).eval()
    (point,) = dynify.operating_points(dyn, data, data, max_drops=[0.0])
    dynify.use_operating_point(dyn, point)
    assert dyn.thresholds.tolist() == pytest.approx(point.thresholds)
    assert dyn.temperatures.tolist() == pytest.approx(point.temperatures)
    with pytest.raises(StrategyError, match="temperatures"):
        dynify.use_operating_point(gated(), point)


@pytest.mark.parametrize(
    "options,match",
    [({"gate_hidden": 0}, "gate_hidden"), ({"gate_target": "labels"}, "gate_target")],
)
def test_bad_gate_options_are_refused(options, match):
    with pytest.raises(StrategyError, match=match):
        gated(**options)
