"""`dynify export` / `dynify bench` and the public export API on converted models.

One CIFAR ResNet-20 artifact (2 exits, random non-zero heads, BN statistics settled on random
inputs so logits are O(1) like a trained model's) is exported once per module and reused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import dynify
from dynify.cli import app
from dynify.errors import ExportError
from dynify.export import export_onnx_report, verification_inputs
from dynify.export.bench import (
    StaticPrefix,
    bench,
    prefix_cases,
    settle_batch_norm,
    threshold_cases,
)
from dynify.export.timing import time_interleaved, time_onnx
from dynify.export.verify import count_executed_ops, verify_onnx

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def flat(output: str) -> str:
    """The output without rich's borders and line wrapping."""
    return " ".join(output.replace("│", " ").split())


def settle(dyn: dynify.DynamicModel, head_std: float = 0.5) -> dynify.DynamicModel:
    """BN statistics from random inputs and random heads: exits fire, logits stay O(1)."""
    torch.manual_seed(0)
    settle_batch_norm(dyn, batches=1, size=16)
    for head in dyn.heads:
        nn.init.normal_(head.classifier.weight, std=head_std)
    return dyn.eval()


def convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    dyn = dynify.convert("cifar_resnet20", weights="random", options={"exits": 2})
    path = tmp_path_factory.mktemp("cli") / "r20.dyn"
    dynify.save(settle(dyn), path)
    return path


@pytest.fixture(scope="module")
def exported(artifact: Path):
    """`dynify export ARTIFACT --format onnx` once: (result, onnx path)."""
    out = artifact.with_name("r20-exported.onnx")
    result = run("export", str(artifact), "--format", "onnx", "--out", str(out))
    return result, out


def test_export_prints_the_check_and_writes_if_nodes(exported):
    result, path = exported
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "Parity OK" in text and "15 cases" in text  # 5 threshold settings x 3 inputs
    assert "If nodes: 2" in text
    for case in ("exit 0", "exit 1", "final", "all 0.5", "default"):
        assert case in text
    model = onnx.load(path)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 1  # exit 0 at the top, exit 1 nested in its else branch
    nested = [n for a in ifs[0].attribute for n in a.g.node if n.op_type == "If"]
    assert len(nested) == 1
    assert [i.name for i in model.graph.input] == ["x", "thresholds"]


def test_exported_graph_matches_eager_at_every_threshold(exported, artifact):
    _, path = exported
    dyn = dynify.load(artifact)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # thresholds halfway between two samples' scores split the batch
        scores = [torch.softmax(lg, -1).amax(-1).sort().values for lg in dyn.exit_logits(x)[:2]]
    mid = [float(s[7:9].mean()) for s in scores]
    cases = [[0.0, 0.0], [0.5, 0.5], mid, [1.01, 1.01]]
    report = verify_onnx(dyn, path, [x[:1], x], cases)
    assert report.ok, str(report)
    assert report.max_abs_diff <= 1e-4
    batch_exits = [set(c.exits_onnx) for c in report.cases if c.batch == 16]
    assert batch_exits[0] == {0} and batch_exits[-1] == {2}  # all-early, all-to-the-end
    assert len(batch_exits[2]) >= 2  # mid thresholds split the batch over exits


def test_threshold_input_decides_how_many_convs_run(exported, artifact):
    _, path = exported
    dyn = dynify.load(artifact)
    per_segment = [convs(s) for s in dyn.segments]
    assert per_segment[0] > 0 and sum(per_segment) == 19  # ResNet-20: 19 convs
    heads = [convs(h) for h in dyn.heads]  # a CIFAR-sized head has one conv of its own

    def expected(exit_taken: int) -> int:  # the segments run and the heads passed
        return sum(per_segment[: exit_taken + 1]) + sum(heads[: exit_taken + 1])

    x = torch.randn(1, 3, 32, 32)
    assert count_executed_ops(path, x, [0.0, 0.0]) == expected(0)
    assert count_executed_ops(path, x, [1.01, 0.0]) == expected(1)
    assert count_executed_ops(path, x, [1.01, 1.01]) == expected(2) == 19 + sum(heads)
    ran_default = count_executed_ops(path, x)  # the calibrated 0.9 from the graph's default
    dyn(x)
    assert ran_default == expected(int(dyn.last_exit[0]))


def test_export_pt2_is_checked_and_loads_with_torch_alone(artifact):
    out = artifact.with_name("r20.pt2")
    result = run("export", str(artifact), "--format", "pt2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "Parity OK" in flat(result.output)
    code = (
        "import sys, torch; p = torch.export.load(sys.argv[1]).module(); torch.set_grad_enabled(False); "
        "l, e = p(torch.randn(3, 3, 32, 32), torch.tensor([1.01, 0.0])); "
        "assert 'dynify' not in sys.modules; print(tuple(l.shape), e.tolist())"
    )
    alone = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120
    )
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.split() == ["(3,", "10)", "[1,", "1,", "1]"]
    program = torch.export.load(out).module()
    dyn = dynify.load(artifact)
    x = torch.randn(4, 3, 32, 32)
    for thr in ([0.0, 0.0], [1.01, 1.01]):
        dyn.set_thresholds(thr)
        with torch.no_grad():
            logits, exits = program(x, torch.tensor(thr))
            torch.testing.assert_close(logits, dyn(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(exits, dyn.last_exit)


@pytest.mark.parametrize("consecutive", [1, 4])
def test_time_interleaved_runs_each_configuration_in_runs_of_calls(consecutive):
    """Each round calls every runner `consecutive` times in a row after one untimed call (one
    call, timed, when consecutive is 1), rotating which runner goes first."""
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(runners, runs=3, warmup=1, consecutive=consecutive)
    per_run = 1 if consecutive == 1 else consecutive + 1
    assert {name: len(t) for name, t in times.items()} == {n: 3 * consecutive for n in "abc"}
    assert len(calls) == 4 * 3 * per_run
    firsts = calls[::per_run][:3], calls[3 * per_run :: per_run][:3]
    assert firsts == (["a", "b", "c"], ["b", "c", "a"])  # the order rotates round by round
    assert all(len(set(calls[i : i + per_run])) == 1 for i in range(0, len(calls), per_run))


def test_bench_eager_prints_a_table_with_the_static_row(artifact, tmp_path):
    out = tmp_path / "bench.json"
    result = run(
        "bench", str(artifact), "--format", "eager", "--runs", "2", "--warmup", "0",
        "--threads", "1", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "static" in text and "latency / MAC ratio" in text
    rows = json.loads(out.read_text())["rows"]
    dyn = dynify.load(artifact)
    assert [r["label"] for r in rows] == ["exit 0", "exit 1", "final", "static"]
    expected = [m / dyn.static_macs for m in dyn.exit_macs()] + [1.0]
    np.testing.assert_allclose([r["macs_fraction"] for r in rows], expected, rtol=1e-9)
    assert [r["exits"] for r in rows] == [[0], [1], [2], []]
    assert rows[-1]["latency_ratio"] == 1.0
    assert expected[0] < 0.5 < expected[1] < 1.0 < expected[2]  # heads cost a little extra
    for row in rows:
        assert row["ratio_to_macs"] == pytest.approx(row["latency_ratio"] / row["macs_fraction"])


def test_bench_onnx_uses_the_export_and_checks_its_exits(exported, artifact):
    _, path = exported
    dyn = dynify.load(artifact)
    result = bench(
        dyn, runtime="onnx", runs=2, warmup=0, threads=1, batch=2, onnx_path=path, consecutive=3
    )
    assert result.consecutive == 3
    assert [r.label for r in result.rows] == ["exit 0", "exit 1", "final", "static"]
    assert [r.exits for r in result.rows] == [[0], [1], [2], []]
    assert result.batch == 2 and all(r.latency_ms > 0 for r in result.rows)
    torch.testing.assert_close(dyn.thresholds, torch.full((2,), 0.9))  # restored


def test_static_prefix_is_the_network_cut_at_each_exit(artifact, tmp_path):
    """A prefix runs the static network's first segments, no head: the last one composed with
    the final segment is the static network; its ONNX graph computes the same feature."""
    import onnxruntime as ort

    from dynify.export.onnx import write_plain_onnx

    dyn = dynify.load(artifact)
    cases = prefix_cases(dyn)
    spent = np.cumsum(dyn.segment_macs[:-1]) / dyn.static_macs
    assert [(label, i) for label, i, _ in cases] == [("exit 0", 0), ("exit 1", 1)]
    np.testing.assert_allclose([f for *_, f in cases], spent)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), dyn.static():
        last = StaticPrefix(dyn, 1).eval()
        assert torch.equal(dyn.segments[-1](last(x)), dyn(x))
        first = StaticPrefix(dyn, 0).eval()
        path = write_plain_onnx(first, x, tmp_path / "prefix0.onnx", output_name="feature")
        (feature,) = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})
        np.testing.assert_allclose(feature, first(x).numpy(), atol=1e-4)
    assert not any(n.op_type == "If" for n in onnx.load(path).graph.node)


@pytest.mark.parametrize("runtime", ["eager", "onnx"])
def test_bench_prefixes_split_each_exit_into_network_and_overhead(exported, artifact, runtime):
    _, path = exported
    dyn = dynify.load(artifact)
    onnx_path = path if runtime == "onnx" else None
    result = bench(dyn, runtime=runtime, runs=2, warmup=0, threads=1, prefixes=True,
                   onnx_path=onnx_path)  # fmt: skip
    fractions = {label: f for label, _, f in prefix_cases(dyn)}
    for row in result.rows:
        if row.label not in fractions:  # final, static: nothing to split
            assert row.prefix_ms is row.exit_overhead is row.prefix_ratio_to_macs is None
            continue
        assert row.prefix_ms > 0
        assert row.exit_overhead == pytest.approx(row.latency_ms / row.prefix_ms)
        static_ms = result.rows[-1].latency_ms
        network = row.prefix_ms / static_ms / fractions[row.label]
        assert row.prefix_ratio_to_macs == pytest.approx(network)
        # the split multiplies back to the exit's own ratio (heads cost the MAC difference)
        assert row.ratio_to_macs == pytest.approx(
            network * row.exit_overhead * fractions[row.label] / row.macs_fraction
        )


def test_bench_cli_prefixes_adds_the_split_columns(artifact):
    result = run("bench", str(artifact), "--runs", "1", "--warmup", "0", "--threads", "1",
                 "--prefixes")  # fmt: skip
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "network lat./MAC" in text and "the static network cut where the exit sits" in text


def test_bench_channels_last_restores_the_model(artifact):
    dyn = dynify.load(artifact)
    result = bench(dyn, runtime="eager", runs=1, warmup=0, threads=1, channels_last=True)
    assert result.channels_last
    assert [r.exits for r in result.rows] == [[0], [1], [2], []]
    conv = next(m for m in dyn.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous()  # back in the default memory format
    fresh = dynify.load(artifact)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), dyn.static(), fresh.static():
        torch.testing.assert_close(dyn(x), fresh(x), atol=1e-5, rtol=1e-5)


def test_forcing_thresholds_per_exit_and_sweep_fallback(artifact):
    dyn = dynify.load(artifact)
    assert threshold_cases(dyn) == [
        ("exit 0", [0.0, 0.0]),
        ("exit 1", [1.01, 0.0]),
        ("final", [1.01, 1.01]),
    ]

    class Gates(dynify.DynamicModel):  # not an ExitCascade: the generic sweep
        def __init__(self):
            super().__init__(static_macs=1, input_shape=(3,), num_classes=2, thresholds=[0.0] * 3)

        forward = describe = training_loss = export_face = None  # never called here

    assert [label for label, _ in threshold_cases(Gates())] == [
        "threshold 0",
        "threshold 0.5",
        "threshold 1.01",
    ]


def test_export_errors_are_user_errors(artifact, monkeypatch):
    def refuse(*args, **kwargs):
        raise ExportError("op `aten.weird` (graph node `weird_1`) has no ONNX translation")

    monkeypatch.setattr("dynify.export.export_onnx_report", refuse)
    result = run("export", str(artifact))
    assert result.exit_code == 2
    assert "weird_1" in flat(result.output)
    assert run("export", str(artifact), "--format", "tflite").exit_code == 2


def test_torchvision_resnet18_export_parity(tmp_path):
    dyn = dynify.convert("resnet18", weights="random", input_size=64, options={"exits": 2})
    settle(dyn, head_std=0.05)
    result = export_onnx_report(dyn, tmp_path / "r18.onnx")
    assert result.if_nodes == 2
    assert result.report.ok and result.report.max_abs_diff <= 1e-4, str(result.report)
    x = verification_inputs(dyn)[2]
    mid = verify_onnx(dyn, result.path, [x], [[0.5, 0.5], [0.0, 1.01], [1.01, 0.0]])
    assert mid.ok, str(mid)
    assert [set(c.exits_onnx) for c in mid.cases][1:] == [{0}, {1}]


def test_export_cli_fixes_the_batch_on_request(artifact, tmp_path):
    out = tmp_path / "one.onnx"
    result = run("export", str(artifact), "--batch", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "x [1, 3, 32, 32]" in flat(result.output) and "Parity OK" in flat(result.output)
    assert onnx.load(out).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    refused = run("export", str(artifact), "--format", "pt2", "--batch", "1")
    assert refused.exit_code != 0 and "--batch applies to --format onnx only" in refused.output


def test_time_onnx_times_each_graph_in_a_child_process(exported, tmp_path):
    _, path = exported
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    runs_of = {
        "never": (path, {"x": x, "thresholds": np.full(2, 1.01, np.float32)}),
        "default": (path, {"x": x}),
    }
    times = time_onnx(runs_of, threads=1, runs=2, warmup=1, consecutive=3, folder=tmp_path)
    assert {label: len(t) for label, t in times.items()} == {"never": 6, "default": 6}
    assert all(t > 0 for ts in times.values() for t in ts)
    with pytest.raises(ExportError, match="ONNX Runtime timing failed"):
        time_onnx({"missing": (tmp_path / "missing.onnx", {"x": x})}, threads=1, runs=1,
                  warmup=0, consecutive=1, folder=tmp_path)  # fmt: skip


def test_bench_cli_times_a_given_onnx_file(exported, artifact):
    _, path = exported
    common = ("--runs", "1", "--warmup", "0", "--threads", "1", "--consecutive", "1")
    result = run("bench", str(artifact), "--format", "onnx", "--onnx", str(path), *common)
    assert result.exit_code == 0, result.output
    assert "exit 0" in result.output and "static" in result.output
    eager = run("bench", str(artifact), "--onnx", str(path), *common)
    assert eager.exit_code != 0 and "--onnx needs --format onnx" in eager.output


def test_bench_refuses_a_graph_fixed_to_another_batch(artifact, tmp_path):
    dyn = dynify.load(artifact)
    one = export_onnx_report(dyn, tmp_path / "one.onnx", batch=1).path
    with pytest.raises(ExportError, match="exported for batch 1; time it with batch=1"):
        bench(dyn, runtime="onnx", runs=1, warmup=0, threads=1, batch=2, onnx_path=one)
