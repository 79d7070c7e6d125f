"""The command line: thin over the API, exit code 2 and one paragraph for user errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from typer.testing import CliRunner

import dynify
from dynify.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def flat(output: str) -> str:
    """The output without rich's panel borders and line wrapping."""
    return " ".join(output.replace("│", " ").split())


def test_help_lists_every_command():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("convert", "inspect", "strategies"):
        assert command in result.output


def test_convert_writes_an_artifact_and_prints_exits(tmp_path):
    out = tmp_path / "r20.dyn"
    result = run(
        "convert", "cifar_resnet20", "--weights", "random", "--exits", "0.3,0.6", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert "random weights, as asked" in result.output
    assert "final" in result.output and str(out.name) in result.output
    dyn = dynify.load(out)
    assert dyn.num_exits == 2 and dyn.spec["plan"]["options"]["exits"] == [0.3, 0.6]


def test_convert_resnet50_offline_uses_random_weights_and_says_so(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.chdir(tmp_path)
    result = run("convert", "resnet50", "--strategy", "early-exit")
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output
    assert (tmp_path / "resnet50-early-exit.dyn").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (("convert", "cifar_resnet20", "--strategy", "teleport"), "Unknown strategy 'teleport'"),
        (("convert", "resnt50", "--weights", "random"), "Unknown model 'resnt50'"),
        (("convert", "cifar_resnet20", "--weights", "/nonexistent.pt"), "does not exist"),
        (
            ("convert", "vit_b_16", "--weights", "random", "--input-size", "64"),
            "Give an example input",
        ),
        (("convert", "tests.test_frontend:Net", "--input-size", "8"), "--leaf gate"),
    ],
)
def test_user_errors_exit_2_without_traceback(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2
    assert message in flat(result.output)
    assert "Traceback" not in result.output


def test_leaf_option_makes_untraceable_model_convert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(
        "convert",
        "tests.test_frontend:Net",
        "--input-size",
        "8",
        "--leaf",
        "gate",
        "--exits",
        "1",
        "--out",
        "net.dyn",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "net.dyn").exists()


def test_dump_graphs_writes_traced_and_segment_code(tmp_path):
    out = tmp_path / "graphs"
    args = ("convert", "cifar_resnet20", "--weights", "random", "--exits", "1")
    result = run(*args, "--out", str(tmp_path / "m.dyn"), "--dump-graphs", str(out))
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["000_traced.py", "001_segments_0.py", "002_segments_1.py"]
    assert "layer3" in (out / "002_segments_1.py").read_text()


def test_strategy_options_reach_the_plan(tmp_path):
    out = tmp_path / "masks.dyn"
    result = run(
        "convert",
        "cifar_resnet20",
        "--weights",
        "random",
        "--strategy",
        "spatial-masks",
        "--granularity",
        "pixel",
        "--budget",
        "0.4",
        "--option",
        "sparsity_weight=5",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    options = dynify.load(out).spec["plan"]["options"]
    assert options["granularity"] == "pixel" and options["budget"] == 0.4
    assert options["sparsity_weight"] == 5
    bad = run("convert", "cifar_resnet20", "--weights", "random", "--option", "nonsense")
    assert bad.exit_code == 2 and "KEY=VALUE" in flat(bad.output)


def test_inspect_prints_cuts_blocks_and_stages():
    result = run("inspect", "cifar_resnet20")
    assert result.exit_code == 0, result.output
    assert "Residual blocks (9) in 3 stages" in result.output
    assert "identity" in result.output and "MACs by stage" in result.output


def test_strategies_lists_early_exit():
    result = run("strategies")
    assert result.exit_code == 0 and "early-exit" in result.output
