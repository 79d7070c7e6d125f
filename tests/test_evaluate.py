"""Evaluation: measured numbers equal a manual run, the oracle and curve ends are right, and the
report writes a JSON and a PNG."""

from __future__ import annotations

import json

import pytest
import torch

from dynify.evaluate import EvaluationReport, evaluate, oracle
from dynify.train.calibrate import ExitOutputs
from tests.test_calibrate import _labelled, _model


def test_oracle_takes_the_first_right_exit():
    ref = torch.tensor([0, 1, 1, 0])
    onehot = torch.eye(2)
    # exit 0 right on samples 0, 2; exit 1 right on 1, 2; the final right on 1 only
    outputs = ExitOutputs(
        [onehot[[0, 0, 1, 1]], onehot[[1, 1, 1, 1]], onehot[[1, 1, 0, 1]]],
        ref,
        [20, 50, 105],
        100,
    )
    acc, macs = oracle(outputs)
    assert acc == 0.75  # sample 3 is wrong everywhere
    assert macs == pytest.approx((0.2 + 0.5 + 0.2 + 1.05) / 4)


@pytest.fixture(scope="module")
def evaluated():
    model, dyn = _model()
    x, y = _labelled(model, 300, 5)
    dyn.set_thresholds([0.6, 0.5, 0.4])
    return model, dyn, x, y, evaluate(dyn, (x, y), batch_size=64)


def test_report_numbers_equal_a_manual_run(evaluated):
    model, dyn, x, y, report = evaluated
    with torch.no_grad():
        out = dyn(x)
        static = model(x)
    assert report.samples == 300 and report.labels_used
    assert report.dynamic_accuracy == pytest.approx(float((out.argmax(-1) == y).double().mean()))
    assert report.dynamic_macs_fraction == pytest.approx(
        float(dyn.last_macs.double().mean()) / dyn.static_macs
    )
    assert report.static_accuracy == pytest.approx(float((static.argmax(-1) == y).double().mean()))
    assert report.exit_histogram == torch.bincount(dyn.last_exit, minlength=4).tolist()
    assert report.per_exit_accuracy[-1] == report.static_accuracy
    assert report.oracle_accuracy >= max(report.per_exit_accuracy)


def test_curve_runs_from_all_at_the_first_exit_to_the_static_network(evaluated):
    *_, report = evaluated
    ends = sorted(report.curve, key=lambda p: p.threshold)
    assert ends[0].threshold == 0.0 and ends[-1].threshold > 1.0
    assert ends[0].macs_fraction == pytest.approx(report.exit_macs_fraction[0], abs=1e-5)
    assert ends[-1].macs_fraction == pytest.approx(report.exit_macs_fraction[-1], abs=1e-5)
    assert ends[-1].accuracy == pytest.approx(report.static_accuracy)
    macs = [p.macs_fraction for p in ends]
    assert macs == sorted(macs)  # a larger threshold never means less compute
    assert report.macs_to_match(report.static_accuracy, tolerance=0.0) <= macs[-1]


def test_json_and_plot(evaluated, tmp_path):
    *_, report = evaluated
    data = json.loads(report.save_json(tmp_path / "r.json").read_text())
    assert data["static_accuracy"] == report.static_accuracy
    assert len(data["curve"]) == len(report.curve) and set(data["curve"][0]) == {
        "threshold",
        "macs_fraction",
        "accuracy",
    }
    png = report.plot(tmp_path / "sub" / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_table_lists_static_dynamic_oracle_and_every_exit(evaluated):
    from rich.console import Console

    *_, report = evaluated
    console = Console(record=True, width=120)
    console.print(report.table())
    text = console.export_text()
    for word in ("static", "dynamic", "oracle", "exit 0", "exit final"):
        assert word in text


def test_generic_models_get_a_swept_curve():
    from tests.test_calibrate import ScalarKnob

    model, _ = _model()
    toy = ScalarKnob(model).eval()
    report = evaluate(toy, _labelled(model, 200, 9))
    assert isinstance(report, EvaluationReport) and report.oracle_accuracy is None
    ends = sorted(report.curve, key=lambda p: p.threshold)
    assert ends[0].macs_fraction == pytest.approx(0.3) and ends[-1].macs_fraction == 1.0
    assert ends[-1].accuracy == report.static_accuracy
