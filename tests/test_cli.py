"""The command line: thin over the API, exit code 2 and one paragraph for user errors."""

from __future__ import annotations

import ast
import os
import resource
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
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


@pytest.fixture(scope="module")
def bad_input_workspace(tmp_path_factory):
    """An artifact, a tiny labelled folder and a text file posing as ONNX."""
    root = tmp_path_factory.mktemp("bad_inputs")
    dyn = dynify.convert("cifar_resnet20", "early-exit", options={"exits": 1}, weights="random")
    dynify.save(dyn, root / "a.dyn")
    for c in range(10):
        (root / "data" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 20 * c, dtype=np.uint8)).save(
            root / "data" / f"c{c}" / "0.png"
        )
    (root / "notonnx.txt").write_text("hello, I am not a graph")
    (root / "folder").mkdir()
    return root


NAMED = ("convert", "cifar_resnet20", "--weights", "random")
BAD_INPUTS = [
    # unwritable or directory outputs
    ((*NAMED, "-o", "/proc/x.dyn"), "Cannot write the artifact /proc/x.dyn"),
    ((*NAMED, "-o", "{root}/folder"), "is a folder"),
    ((*NAMED, "--dump-graphs", "/proc/x"), "Cannot write the graph folder"),
    ((*NAMED, "--dump-graphs", "{root}/a.dyn"), "is a file; name a folder"),
    (("evaluate", "{root}/a.dyn", "--data", "{root}/data", "--json", "{root}/folder"), "folder"),
    (("evaluate", "{root}/a.dyn", "--data", "{root}/data", "--plot", "plot.txt"), "image suffix"),
    (("evaluate", "{root}/a.dyn", "--data", "{root}/data", "--json", "{root}/a.dyn"), "input"),
    (("finetune", "{root}/a.dyn", "--data", "{root}/data", "--checkpoint", "/proc/x"), "/proc"),
    (("finetune", "{root}/a.dyn", "--data", "{root}/data", "-o", "{root}/data"), "folder"),
    (("export", "{root}/a.dyn", "-o", "{root}/a.dyn"), "names a .dyn artifact"),
    (("export", "{root}/a.dyn", "-f", "pt2", "-o", "{root}/b.dyn"), "another format"),
    (("bench", "{root}/a.dyn", "--json", "{root}/a.dyn"), "also an input"),
    # bad numbers
    ((*NAMED, "--input-size", "-5"), "--input-size"),
    ((*NAMED, "--input-size", "0"), "--input-size"),
    ((*NAMED, "--option", "head_budget=NaN"), "finite number"),
    ((*NAMED, "--option", "threshold=NaN"), "finite number"),
    ((*NAMED, "--option", "threshold=-1"), "threshold must be 0 or more"),
    ((*NAMED, "--option", "head_budget=2"), "in (0, 1]"),
    ((*NAMED, "--exits", ""), "names no exit"),
    ((*NAMED, "--exits", "0"), "no exit at all"),
    (("finetune", "{root}/a.dyn", "--data", "{root}/data", "--calibration-fraction", "1"), "[0, 1)"),
    (("finetune", "{root}/a.dyn", "--data", "{root}/data", "--calibration-fraction", "-1"), "[0, 1)"),
    (("finetune", "{root}/a.dyn", "--data", "{root}/data", "--lr", "inf"), "the learning rate must be a finite number"),
    (("finetune", "{root}/a.dyn", "--data", "{root}/data", "--std", "nan,1,1"), "finite"),
    (
        ("calibrate", "{root}/a.dyn", "--data", "{root}/data", "--budget", "0.5",
         "--calibration-fraction", "1"),
        "in (0, 1)",
    ),
    (
        ("calibrate", "{root}/a.dyn", "--data", "{root}/data", "--budget", "0.5",
         "--calibration-fraction", "-1"),
        "in (0, 1)",
    ),
    # names that do not exist
    ((*NAMED, "--leaf", "nosuchmodule"), "Leaf 'nosuchmodule' names no submodule"),
    (("convert", "timm:nonexistent"), "Unknown timm model 'nonexistent'"),
    (("convert", "torchvision:resnet9000"), "Unknown torchvision model"),
    (
        ("bench", "{root}/a.dyn", "-f", "onnx", "--onnx", "{root}/notonnx.txt"),
        "is not an ONNX model",
    ),
]  # fmt: skip


@pytest.mark.parametrize("args, phrase", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_inputs_end_in_one_paragraph_and_exit_2(
    args, phrase, bad_input_workspace, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    artifact = bad_input_workspace / "a.dyn"
    before = artifact.read_bytes()
    args = [a.format(root=bad_input_workspace) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert phrase in flat(result.output), result.output
    assert "Traceback" not in result.output
    assert artifact.read_bytes() == before  # inputs are never touched
    assert not list(tmp_path.iterdir())  # and nothing is written


def test_an_existing_output_is_replaced_and_the_command_says_so(tmp_path):
    out = tmp_path / "m.dyn"
    out.write_bytes(b"an older file")
    result = run(*NAMED, "--exits", "1", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert f"it replaced the previous {out}" in flat(result.output)
    assert dynify.load(out).num_exits == 1
    result = run(*NAMED, "--exits", "1", "-o", str(tmp_path / "new.dyn"))
    assert "replaced" not in flat(result.output)


def test_cli_and_examples_import_only_the_public_api():
    """`dynify/cli` and `examples/` use `dynify` and `dynify.errors`, nothing inside."""
    root = Path(dynify.__file__).parent.parent
    files = [*(root / "dynify" / "cli").glob("*.py"), *(root / "examples").glob("*.py")]
    assert len(files) >= 5
    reached = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                internal = name.startswith("dynify.") and not name.startswith("dynify.cli")
                if internal and name != "dynify.errors":
                    reached.setdefault(path.name, []).append(name)
    assert reached == {}


def test_a_full_disk_is_one_paragraph_and_exit_2_leaving_nothing(tmp_path):
    """`ulimit -f`: the write fails part-way; no traceback, no half-written file."""

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "x.dyn"
    command = [sys.executable, "-m", "dynify", *NAMED, "--exits", "1", "-o", str(out)]
    root = Path(dynify.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    done = subprocess.run(
        command, cwd=tmp_path, env=env, preexec_fn=limit_file_size, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "File too large" in flat(done.stderr) and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


class TinyNet(torch.nn.Module):
    """A model the CLI converts by its import path, `tests.test_cli:TinyNet`."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def import_path_artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("trust") / "tiny.dyn"
    result = run(
        "convert", f"{__name__}:TinyNet", "--input-size", "8", "--exits", "1", "-o", str(path)
    )
    assert result.exit_code == 0, result.output
    return path


TRUSTED = f"{__name__}:TinyNet"
LOADING_COMMANDS = [
    ("export", "{a}", "-o", "{tmp}/t.onnx"),
    ("bench", "{a}", "--runs", "1", "--warmup", "0", "--consecutive", "1"),
    ("finetune", "{a}", "--data", "{tmp}/nodata"),
    ("calibrate", "{a}", "--data", "{tmp}/nodata", "--budget", "0.5"),
    ("evaluate", "{a}", "--data", "{tmp}/nodata"),
]


@pytest.mark.parametrize("args", LOADING_COMMANDS, ids=[a[0] for a in LOADING_COMMANDS])
def test_an_import_path_artifact_loads_only_with_trust_import(args, import_path_artifact, tmp_path):
    args = [a.format(a=import_path_artifact, tmp=tmp_path) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    message = flat(result.output)
    assert f"--trust-import {TRUSTED}" in message and "Traceback" not in result.output
    result = runner.invoke(app, [*args, "--trust-import", "os:abort"])  # another name: refused
    assert result.exit_code == 2 and f"--trust-import {TRUSTED}" in flat(result.output)
    result = runner.invoke(app, [*args, "--trust-import", "os:abort", "--trust-import", TRUSTED])
    if args[0] in ("export", "bench"):
        assert result.exit_code == 0, result.output
    else:  # loaded, then refused for the missing data: the model was rebuilt
        assert result.exit_code == 2 and "--trust-import" not in flat(result.output)
        assert "nodata" in flat(result.output), result.output
