"""Calibration: temperatures, the simulated exit rule, budgets met on held-out data, MAC caps."""

from __future__ import annotations

import math

import pytest
import torch

import dynify
from dynify.errors import DataError, DynifyError, StrategyError
from dynify.runtime.model import DynamicModel
from dynify.train.calibrate import (
    NEVER,
    ExitOutputs,
    calibrate,
    collect_outputs,
    fit_temperature,
    simulate,
)
from dynify.train.threshold_search import ExitProblem
from tests.conftest import TinyResNet, randomize_bn

# Budgets hold on held-out data from the same distribution within this many MAC fractions
# (2,000 calibration samples; the mean of a [0, 1] cost has a standard error below 0.011).
BUDGET_TOLERANCE = 0.03


def _model(exits: int = 3, policy: str = "confidence", seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_bn(TinyResNet())
    dyn = dynify.convert(
        model,
        "early-exit",
        torch.zeros(1, 3, 16, 16),
        options={"exits": exits, "policy": policy},
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # heads with varied confidence, as trained heads have
        for head in dyn.heads:
            w = head.classifier.weight
            w.copy_(torch.randn(w.shape, generator=generator) * 3.0)
    return model, dyn.eval()


def _data(n: int, seed: int):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _labelled(model, n, seed):
    x = _data(n, seed)
    with torch.no_grad():
        logits = model(x) * 20 + torch.randn(n, 5, generator=torch.Generator().manual_seed(seed))
    return x, logits.argmax(-1)


def test_fit_temperature_recovers_the_true_temperature():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=generator) * 3
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=generator).flatten()
    for true_t in (0.5, 2.0):
        assert fit_temperature(z * true_t, labels) == pytest.approx(true_t, rel=0.05)


def test_sweep_equals_one_evaluation_per_candidate():
    _, dyn = _model(exits=3, policy="patience")
    outputs = collect_outputs(dyn, (_data(300, 1), torch.randint(0, 5, (300,))))
    problem = ExitProblem.build(dyn, outputs, [0.7, 1.0, 1.5])
    current = torch.tensor([0.4, 0.6, 0.3])
    candidates = torch.tensor([0.0, 0.2, 0.35, 0.5, 0.9, NEVER])
    for i in range(3):
        acc, macs = problem.sweep(current, i, candidates)
        for j, c in enumerate(candidates):
            t = current.clone()
            t[i] = c
            assert (acc[j].item(), macs[j].item()) == pytest.approx(problem.evaluate(t), abs=1e-12)


@pytest.mark.parametrize("policy", ["confidence", "entropy", "patience"])
def test_simulation_matches_the_real_dynamic_forward(policy):
    model, dyn = _model(policy=policy)
    x, y = _labelled(model, 400, 3)
    dyn.temperatures.copy_(torch.tensor([0.8, 1.3, 1.0]))
    outputs = collect_outputs(dyn, (x, y))
    scores = ExitProblem.build(dyn, outputs, dyn.temperatures.tolist()).scores
    dyn.set_thresholds(torch.quantile(scores, 0.7, dim=1).tolist())  # ~30% leave at each exit
    acc, macs, exits = simulate(dyn, outputs)
    with torch.no_grad():
        out = dyn(x)
    assert torch.equal(exits, dyn.last_exit)
    assert acc == pytest.approx(float((out.argmax(-1) == y).double().mean()), abs=1e-12)
    assert macs == pytest.approx(float(dyn.last_macs.double().mean()) / dyn.static_macs, 1e-12)
    assert 0 < int((exits < dyn.num_exits).sum()) < len(x)  # a real mix of exits


@pytest.mark.parametrize("budget", [0.45, 0.6, 0.8])
def test_budget_is_met_on_held_out_data(budget):
    model, dyn = _model()
    result = calibrate(dyn, _labelled(model, 2000, 10), budget=budget)
    assert result.macs_fraction <= budget + 1e-9  # exactly, on the calibration data
    x, _ = _labelled(model, 2000, 11)
    with torch.no_grad():
        dyn(x)
    held_out = float(dyn.last_macs.double().mean()) / dyn.static_macs
    assert held_out <= budget + BUDGET_TOLERANCE
    assert abs(held_out - result.macs_fraction) <= BUDGET_TOLERANCE


def test_budget_search_beats_a_shared_threshold():
    """Per-exit thresholds are at least as accurate as SDN's one shared threshold."""
    model, dyn = _model()
    data = _labelled(model, 1500, 20)
    outputs = collect_outputs(dyn, data)
    result = calibrate(dyn, outputs, budget=0.6)
    problem = ExitProblem.build(dyn, outputs, result.temperatures)
    shared = [
        problem.evaluate(torch.full((3,), t)) for t in [*torch.linspace(0, 1, 201).tolist(), NEVER]
    ]
    best_shared = max(a for a, m in shared if m <= 0.6)
    assert result.accuracy >= best_shared - 1e-12


def test_max_drop_keeps_accuracy_and_saves_compute():
    model, dyn = _model()
    result = calibrate(dyn, _labelled(model, 2000, 30), max_drop=0.02)
    assert result.accuracy >= result.static_accuracy - 0.02 - 1e-12
    assert result.macs_fraction < 1.0
    assert dyn.spec["calibration"]["target"] == {"max_drop": 0.02}
    assert torch.allclose(dyn.thresholds, torch.tensor(result.thresholds))


def test_mac_cap_bounds_every_sample_even_uncertain_ones():
    model, dyn = _model()
    with torch.no_grad():  # uniform heads: no sample is ever confident before the cap
        for head in dyn.heads:
            head.classifier.weight.zero_()
    cap = dyn.exit_macs()[1] / dyn.static_macs + 1e-6
    calibrate(dyn, _labelled(model, 200, 40), mac_cap=cap)
    crafted = torch.randn(64, 3, 16, 16) * 100  # far outside the data
    with torch.no_grad():
        dyn(crafted)
    assert int(dyn.last_macs.max()) <= cap * dyn.static_macs
    assert set(dyn.last_exit.tolist()) == {1}


def test_mac_cap_with_a_budget_stays_under_both():
    model, dyn = _model()
    cap = dyn.exit_macs()[2] / dyn.static_macs
    result = calibrate(dyn, _labelled(model, 1000, 50), budget=0.5, mac_cap=cap)
    assert result.forced_exit == 2 and result.thresholds[2] == 0.0
    with torch.no_grad():
        dyn(_data(500, 51) * 50)
    assert int(dyn.last_macs.max()) <= dyn.exit_macs()[2]


def test_mac_cap_below_the_first_exit_or_with_patience_is_refused():
    model, dyn = _model()
    with pytest.raises(DynifyError, match="cheapest exit"):
        calibrate(dyn, _labelled(model, 100, 1), mac_cap=0.01)
    _, patient = _model(policy="patience")
    with pytest.raises(StrategyError, match="patience"):
        calibrate(patient, _labelled(model, 100, 1), mac_cap=0.6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0.0}, r"\(0, 1\]"),
        ({"budget": 1.5}, r"\(0, 1\]"),
        ({"budget": -0.2}, r"\(0, 1\]"),
        ({"max_drop": 1.2}, "max-drop"),
        ({"budget": 0.5, "max_drop": 0.01}, "either"),
        ({}, "target"),
    ],
)
def test_bad_targets_fail_before_anything_changes(kwargs, message):
    _, dyn = _model()
    before = dyn.thresholds.clone()
    with pytest.raises(DynifyError, match=message):
        calibrate(dyn, "/nonexistent/folder", **kwargs)  # the target is checked first
    assert torch.equal(dyn.thresholds, before)


def test_unreachable_budget_and_tiny_data_are_explained():
    model, dyn = _model()
    with pytest.raises(DynifyError, match="cheapest setting"):
        calibrate(dyn, _labelled(model, 300, 2), budget=0.05)
    with pytest.raises(DataError, match="calibration samples"):
        calibrate(dyn, _labelled(model, 10, 2), budget=0.5)


def test_unlabelled_data_calibrate_against_the_static_model():
    _, dyn = _model()
    result = calibrate(dyn, _data(500, 60), max_drop=0.0)
    assert not result.labels_used
    assert result.accuracy == pytest.approx(1.0) and result.static_accuracy == 1.0


class ScalarKnob(DynamicModel):
    """A toy strategy outside early exits: one threshold decides cheap vs full per sample."""

    strategy = "toy"

    def __init__(self, model):
        super().__init__(static_macs=100, input_shape=(3, 16, 16), num_classes=5, thresholds=[0.5])
        self.model = model

    def describe(self):
        return [{"threshold": f"{float(self.thresholds[0]):.3f}"}]

    def training_loss(self, x, teacher_logits=None, labels=None, config=None):
        raise NotImplementedError  # calibration never trains

    def export_face(self):
        raise NotImplementedError  # calibration never exports

    def forward(self, x):
        full = self.model(x)
        if self._static:
            self.last_macs = torch.full((len(x),), 100)
            return full
        cheap = full + torch.sin(x.flatten(1)[:, :5] * 7) * 2
        score = torch.sigmoid(x.flatten(1)[:, 0] * 3)  # certainty of the cheap path
        use_cheap = score >= self.thresholds[0]
        self.last_macs = torch.where(use_cheap, 30, 100)
        return torch.where(use_cheap[:, None], cheap, full)


def test_other_strategies_calibrate_through_the_scalar_knob():
    model, _ = _model()
    toy = ScalarKnob(model).eval()
    result = calibrate(toy, _labelled(model, 600, 70), budget=0.6)
    assert result.method == "scalar-sweep"
    assert result.macs_fraction <= 0.6 + 1e-9
    assert result.macs_fraction == pytest.approx(0.6, abs=0.02)  # bisected up to the budget
    assert math.isclose(float(toy.thresholds[0]), result.thresholds[0], abs_tol=1e-6)


def test_exit_outputs_reference_and_costs():
    outputs = ExitOutputs(
        [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0], [0.0, 3.0]])],
        torch.tensor([0, 1]),
        [30, 110],
        100,
    )
    assert outputs.correct().tolist() == [[True, True], [False, True]]
    assert outputs.cost_fractions().tolist() == [0.3, 1.1]
