"""`dynify finetune / calibrate / evaluate` from the shell: real runs on a tiny folder, and bad
input that fails with exit code 2 and leaves the artifact byte-for-byte as it was."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dynify
from dynify.cli import app

runner = CliRunner()


def _folder(root, classes=10, per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            pixels[..., c % 3] = 40 * (c // 3) + 30  # a class-dependent colour channel
            Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_train")
    torch.manual_seed(0)
    dyn = dynify.convert("cifar_resnet20", "early-exit", options={"exits": 2}, weights="random")
    dynify.save(dyn, root / "base.dyn")
    _folder(root / "train", per_class=12, seed=1)
    _folder(root / "test", per_class=4, seed=2)
    return root


@pytest.fixture
def artifact(workspace, tmp_path):
    path = tmp_path / "model.dyn"
    shutil.copy(workspace / "base.dyn", path)
    return path


def test_finetune_calibrate_evaluate(workspace, artifact, tmp_path):
    train, test = str(workspace / "train"), str(workspace / "test")
    result = runner.invoke(
        app, ["finetune", str(artifact), "--data", train, "--epochs", "1", "--batch-size", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "Fine-tuning" in result.output and "per exit" in result.output
    tuned = dynify.load(artifact)
    assert tuned.spec["finetune"]["samples"] == 110  # one per class held out for calibration
    assert tuned.heads[0].classifier.weight.abs().sum() > 0
    assert not artifact.with_suffix(".ckpt").exists()  # removed once the artifact is written

    # other data than the fine-tuning data: all of it calibrates
    result = runner.invoke(
        app, ["calibrate", str(artifact), "--data", test, "--budget", "0.7", "--part", "all"]
    )
    assert result.exit_code == 0, result.output
    assert "Calibrated on 40 samples (all of the data)" in result.output
    calibrated = dynify.load(artifact)
    assert calibrated.spec["calibration"]["target"] == {"budget": 0.7}
    assert calibrated.spec["calibration"]["macs_fraction"] <= 0.7
    assert calibrated.thresholds.tolist() == pytest.approx(
        calibrated.spec["calibration"]["thresholds"], abs=1e-6
    )

    out_json, plot = tmp_path / "r.json", tmp_path / "curve.png"
    result = runner.invoke(
        app,
        ["evaluate", str(artifact), "--data", test, "--json", str(out_json), "--plot", str(plot)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out_json.read_text())
    assert report["samples"] == 40 and report["labels_used"]
    assert sum(report["exit_histogram"]) == 40
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "oracle" in result.output and "dynamic" in result.output


def test_calibrate_on_the_fine_tuning_data_uses_the_held_out_part(workspace, artifact):
    train = str(workspace / "train")
    args = ["--epochs", "1", "--calibration-fraction", "0.25", "--batch-size", "30"]
    assert runner.invoke(app, ["finetune", str(artifact), "--data", train, *args]).exit_code == 0
    result = runner.invoke(app, ["calibrate", str(artifact), "--data", train, "--max-drop", "0.1"])
    assert result.exit_code == 0, result.output
    assert "Calibrated on 30 samples (the 25% held out from fine-tuning" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["calibrate", "--budget", "1.5"], "(0, 1]"),
        (["calibrate", "--budget", "0"], "(0, 1]"),
        (["calibrate"], "target"),
        (["finetune", "--mode", "everything"], "mode"),
        (["finetune", "--epochs", "0"], "epochs"),
    ],
)
def test_bad_options_exit_2_and_touch_nothing(workspace, artifact, args, message):
    before = artifact.read_bytes()
    command = [args[0], str(artifact), "--data", str(workspace / "test"), *args[1:]]
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
    assert artifact.read_bytes() == before


def test_bad_data_exit_2_and_touch_nothing(artifact, tmp_path):
    before = artifact.read_bytes()
    (tmp_path / "empty").mkdir()
    three = _folder(tmp_path / "three", classes=3, per_class=2)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    for data, message in [
        (tmp_path / "empty", "empty"),
        (three, "3 classes"),
        (broken, "zip"),
        (tmp_path / "missing", "neither an existing folder"),
    ]:
        for command in ("finetune", "evaluate"):
            extra = ["--epochs", "1"] if command == "finetune" else []
            result = runner.invoke(app, [command, str(artifact), "--data", str(data), *extra])
            assert result.exit_code == 2, (command, data, result.output)
            assert message in result.output.replace("\n", " "), (command, result.output)
    assert artifact.read_bytes() == before


def test_resume_without_a_checkpoint_is_refused(workspace, artifact):
    result = runner.invoke(
        app, ["finetune", str(artifact), "--data", str(workspace / "test"), "--resume"]
    )
    assert result.exit_code == 2 and "no checkpoint" in result.output
