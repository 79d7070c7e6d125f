"""The benchmark suite: its runner lists every suite with its report, a quick run goes end to
end on data the test makes and writes results with their metadata, reports keep their
hand-written part, and the suites' measurement helpers (which block a gate wraps, blocks
removed for the latency ceiling) are sound."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import dynify
from benchmarks import SUITES, block_gates, slowdown, spatial
from benchmarks.__main__ import list_suites, main
from benchmarks.report import HAND_WRITTEN, write_report
from dynify.models.cifar_resnet import BasicBlock, cifar_resnet20

CLASSES = [f"c{i}" for i in range(10)]


def test_list_names_every_suite_with_the_report_it_writes(capsys):
    main(["--list"])
    out = capsys.readouterr().out
    assert out.strip() == list_suites().strip()
    for name in ("convert_all", "latency", "cifar10", "block_gates", "spatial", "slowdown"):
        assert name in SUITES
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert f"benchmarks/{SUITES[name].report}" in line
        assert SUITES[name].report_path.exists()
        assert callable(SUITES[name].module().render)


def test_unknown_suite_is_refused_with_the_list():
    with pytest.raises(SystemExit, match="Unknown suite 'nope'"):
        main(["nope"])


def _jpeg(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def cifar_like(tmp_path: Path) -> Path:
    """A tiny stand-in for the shared data folder: the zip layout and a ResNet-20 checkpoint."""
    with zipfile.ZipFile(tmp_path / "cifar10-jpeg.zip", "w") as zf:
        for split, per_class in (("train", 30), ("test", 6)):
            for c, name in enumerate(CLASSES):
                for i in range(per_class):
                    zf.writestr(f"cifar10/{split}/{name}/{i:04d}.jpg", _jpeg(c * 1000 + i))
    (tmp_path / "pretrained").mkdir()
    state = {f"module.{k}": v for k, v in cifar_resnet20().state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "pretrained" / "resnet20-12fca82f.th")
    return tmp_path


def test_quick_cifar10_runs_end_to_end_and_records_its_metadata(cifar_like, tmp_path):
    report = SUITES["cifar10"].report_path
    before = report.read_text()
    results = tmp_path / "results"
    argv = ["cifar10", "--quick", "--data", str(cifar_like), "--results", str(results)]
    main([*argv, "--cache", str(tmp_path / "cache.pt"), "--static-epochs", "0"])
    payload = json.loads((results / "cifar10.json").read_text())
    meta = payload["metadata"]
    assert payload["suite"] == "cifar10"
    assert meta["command"].startswith("python -m benchmarks cifar10 --quick --data ")
    for key in ("commit", "torch", "torchvision", "onnxruntime", "threads", "cpu", "date"):
        assert meta[key], key
    assert meta["torch"] == torch.__version__
    net = payload["data"]["cifar_resnet20"]
    assert net["train_images"] == 270 and net["calib_images"] == 30 and net["test_images"] == 60
    assert 0.0 <= net["static_original_acc"] <= 1.0 and "static_ft_acc" not in net
    heads = net["heads"]
    assert heads["epochs"] == 1 and heads["curve"]
    for point in heads["curve"]:  # thresholds chosen on calibration, measured on test
        assert 0.0 < point["test_macs"] <= 1.1 and 0.0 <= point["test_acc"] <= 1.0
    drop = heads["max_drop_0.005"]
    assert sum(drop["exit_histogram"]) == 60
    assert report.read_text() == before  # a quick run never replaces a published report


def test_quick_slowdown_runs_end_to_end(cifar_like, tmp_path):
    results = tmp_path / "results"
    argv = ["slowdown", "--quick", "--data", str(cifar_like), "--results", str(results)]
    main([*argv, "--cache", str(tmp_path / "cache.pt"), "--strategies", "early-exit"])
    payload = json.loads((results / "slowdown.json").read_text())
    assert payload["metadata"]["command"].startswith("python -m benchmarks slowdown --quick")
    run = payload["data"]["strategies"]["early-exit"]
    assert [(row["eps"], row["steps"]) for row in run["rows"]] == [(0, 0), (0, 0), (8, 2)]
    for row in run["rows"]:
        assert row["on"]["samples"] == row["images"] * 2  # two passes through the guard
        for side in ("off", "on"):
            assert 0.0 < row[side]["macs"] <= 1.1 and 0.0 <= row[side]["to_end"] <= 1.0


def test_slowdown_pgd_stays_within_eps_and_lowers_the_exit_scores():
    torch.manual_seed(0)
    dyn = dynify.convert(cifar_resnet20(), "early-exit", torch.randn(1, 3, 32, 32)).eval()
    with torch.no_grad():
        for head in dyn.heads:  # confident random heads: scores well above the thresholds
            w = head.classifier.weight
            w.copy_(torch.randn(w.shape) * 3.0 / w.shape[1] ** 0.5)
    dyn.set_thresholds(0.3)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    adv = slowdown.slowdown_pgd(dyn, pixels, 8 / 255, steps=5, seed=0)
    assert (adv - pixels).abs().max() <= 8 / 255 + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0

    def hinge(p: torch.Tensor) -> float:
        with torch.no_grad():
            logits = dyn.exit_logits(slowdown.to_input(p))
            scores = [torch.softmax(lg, -1).max(-1).values for lg in logits[:-1]]
        return float(sum(torch.relu(s - 0.3).sum() for s in scores))

    assert hinge(adv) < hinge(pixels)


def test_a_report_keeps_its_hand_written_part(tmp_path):
    path = tmp_path / "r.md"
    path.write_text("old generated\n\n" + HAND_WRITTEN + "\n\nreading by hand\n")
    write_report(path, "# New figures\n")
    text = path.read_text()
    assert "old generated" not in text and "# New figures" in text
    assert text.endswith(HAND_WRITTEN + "\n\nreading by hand\n")


def test_every_published_report_renders_from_results_with_its_command():
    for suite in SUITES.values():
        rendered = suite.module().render()
        assert "Reproduce" in rendered and "```" in rendered, suite.name
        assert "session" not in rendered.lower(), suite.name


@pytest.mark.parametrize("kind", ["function", "halting", "policy"])
def test_each_gate_maps_to_the_residual_block_it_wraps(kind):
    model = cifar_resnet20().eval()
    dyn = dynify.convert(model, "block-gates", torch.randn(1, 3, 32, 32), options={"gate": kind})
    blocks = [g.block for g in dyn.gate_plan()]
    assert len(set(blocks)) == len(blocks)
    assert all(isinstance(model.get_submodule(b), BasicBlock) for b in blocks)
    if kind == "halting":  # a stage's first block is never gated under halting
        assert not any(b.endswith(".0") for b in blocks)
    ceiling = block_gates.without_blocks(model, blocks)
    assert not any(isinstance(ceiling.get_submodule(b), BasicBlock) for b in blocks)
    assert isinstance(model.get_submodule(blocks[0]), BasicBlock)  # the original is untouched
    # the ceiling computes what the gated model computes with those blocks skipped
    dyn.thresholds.fill_(0.0)  # every gate closed (halting: every stage halts at once)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        skipped = dyn(x)
        assert dyn.last_gates.sum() == 0
        torch.testing.assert_close(ceiling(x), skipped)
    with pytest.raises(ValueError, match="not a residual block"):
        block_gates.without_blocks(model, ["layer1.0.conv1"])


def test_quick_spatial_latency_times_forced_masks_through_the_public_api(tmp_path):
    results = tmp_path / "results"
    main(["spatial", "--quick", "--part", "latency", "--results", str(results)])
    payload = json.loads((results / "spatial_masks_latency.json").read_text())
    (res,) = payload["data"]["results"]
    assert res["model"] == "resnet18" and res["granularity"] == "region"
    assert [(r["density"], r["dense_fallback"]) for r in res["rows"]] == [
        (0.25, False),
        (1.0, True),
    ]
    assert abs(res["rows"][0]["realized_density"] - 0.25) < 0.05
    assert res["rows"][0]["max_abs_err_vs_dense_masked"] < 1e-3
    assert spatial.latency_tables(payload["data"])  # the report renders these rows


def test_quick_dynamic_width_runs_end_to_end(cifar_like, tmp_path):
    results = tmp_path / "results"
    argv = ["dynamic_width", "--quick", "--data", str(cifar_like), "--results", str(results)]
    main([*argv, "--cache", str(tmp_path / "cache.pt"), "--depth", "20"])
    payload = json.loads((results / "dynamic_width.json").read_text())
    out = payload["data"]
    assert payload["metadata"]["command"].startswith("python -m benchmarks dynamic_width --quick")
    assert out["branches"] == 9 and out["train"]["images"] == 64
    assert [p["threshold"] for p in out["curve"]][:2] == [0.0, 0.1]
    for point in out["curve"]:  # thresholds swept on calibration, measured on test
        assert 0.0 < point["test_macs"] <= 1.01 and 0.0 <= point["test_acc"] <= 1.0
    stats = out["width_stats"]
    assert sum(stats["overall"]) == 60 * 9 and len(stats["per_branch"]) == 9
    assert out["latency"]["static_ms"] > 0


def test_quick_frame_exit_runs_end_to_end(cifar_like, tmp_path):
    results = tmp_path / "results"
    argv = ["frame_exit", "--quick", "--data", str(cifar_like), "--results", str(results)]
    main([*argv, "--cache", str(tmp_path / "cache.pt"), "--latency-clips", "2"])
    payload = json.loads((results / "frame_exit.json").read_text())
    assert payload["metadata"]["command"].startswith("python -m benchmarks frame_exit --quick")
    run = payload["data"]
    assert run["settings"]["depth"] == 20 and run["settings"]["test_clips"] == 40
    assert run["settings"]["calib_clips"] == 30  # the held-out 10 % of the 300 train images
    (entry,) = run["by_group"]  # quick: groups of 2 frames only
    for point in entry["points"]:  # thresholds chosen on calibration clips, measured on test
        assert 0.0 < point["test_macs"] <= 1.0 and 0.0 <= point["test_accuracy"] <= 1.0
    assert entry["latency"]["clips"] == 2 and entry["latency"]["macs_ratio"] > 0
    assert entry["onnx"]["macs_ratio"] > 0 and len(entry["onnx"]["exits"]) == 4  # 8 frames / 2
    (gate,) = run["gate_by_group"]  # the learned gates, same group, same checks
    assert gate["policy"] == "gate" and gate["points"] and gate["chosen"]["thresholds"]
    assert 0.0 < gate["measured"]["macs"] <= 1.0 and gate["latency"]["macs_ratio"] > 0
    assert gate["onnx"]["macs_ratio"] > 0 and len(gate["onnx"]["exits"]) == 4


def test_quick_frame_exit_gate_seeds_trains_the_gates_once_per_seed(cifar_like, tmp_path):
    results = tmp_path / "results"
    argv = ["frame_exit", "--quick", "--data", str(cifar_like), "--results", str(results)]
    main([*argv, "--cache", str(tmp_path / "cache.pt"), "--gate-seeds", "3", "4"])
    assert not (results / "frame_exit.json").exists()  # the seed study alone, no latency
    run = json.loads((results / "frame_exit_gate_seeds.json").read_text())["data"]
    assert run["settings"]["test_clips"] == 40 and 0.0 <= run["all_frames_test_acc"] <= 1.0
    (group,) = run["by_group"]
    assert group["group"] == 2 and [s["seed"] for s in group["seeds"]] == [3, 4]
    for entry in group["seeds"]:
        targets = [p["target"] for p in entry["points"]]
        assert {"threshold": 1.01} in targets  # the shared grid, every frame at its end
        for point in entry["points"]:  # every frame costs the static model and the gates
            assert 0.0 < point["test_macs"] <= 1.001 and 0.0 <= point["test_accuracy"] <= 1.0


def test_quick_skip_rnn_runs_end_to_end(tmp_path):
    """The skip_rnn suite on a tiny AG-News-shaped folder: static model, gate fine-tuning,
    calibration, the curve and the timing, results with their metadata."""
    import random

    rng = random.Random(0)
    words = {"Sports": "ball goal team", "World": "war vote king", "Business": "bank oil tax",
             "Sci/Tech": "chip web code"}  # fmt: skip
    folder = tmp_path / "text" / "agnews"
    folder.mkdir(parents=True)
    for split, rows in (("train", 240), ("test", 80)):
        lines = []
        for i in range(rows):
            label = list(words)[i % 4]
            text = " ".join(rng.choice([*words[label].split(), "the", "a", "of"]) for _ in range(8))
            lines.append(f"{text}\t{label}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    results = tmp_path / "results"
    argv = ["skip_rnn", "--quick", "--data", str(tmp_path), "--results", str(results)]
    argv += ["--cache", str(tmp_path / "cache")]
    main(argv)
    payload = json.loads((results / "skip_rnn.json").read_text())
    data = payload.get("data", payload)
    assert payload["metadata"]["command"].startswith("python -m benchmarks skip_rnn --quick")
    assert {p["threshold"] for p in data["curve"]} >= {0.0, 1.01}
    full = next(p for p in data["curve"] if p["threshold"] == 1.01)
    assert full["test"]["update_share"] == 1.0
    assert set(data["points"]) == {"budget", "max_drop"}


def test_quick_slowdown_of_gates_records_off_capped_and_guarded_rows(cifar_like, tmp_path):
    results = tmp_path / "results"
    argv = ["slowdown", "--quick", "--data", str(cifar_like), "--results", str(results)]
    main([*argv, "--cache", str(tmp_path / "cache.pt"), "--strategies", "block-gates"])
    run = json.loads((results / "slowdown.json").read_text())["data"]["strategies"]
    run = run["block-gates/resnet20"]
    assert run["kind"] == "units" and run["cap"] == 0.9
    for row in run["rows"]:
        assert row["cap"]["max_macs"] <= run["cap"] + 1e-9  # the cap holds for every image
        assert row["off"]["max_macs"] <= run["worst_case"] + 1e-9


def test_unit_pgd_stays_within_eps_and_raises_the_gate_probabilities():
    from benchmarks.slowdown_units import unit_pgd

    torch.manual_seed(0)
    dyn = dynify.convert(cifar_resnet20(), "block-gates", torch.randn(1, 3, 32, 32)).eval()
    with torch.no_grad():  # input-dependent gates, many of them closed
        for gate in dyn.gates:
            for p in gate.decider.parameters():
                p.copy_(torch.randn(p.shape) * 3.0 / p[0].numel() ** 0.5 if p.dim() > 1 else -1)
    dyn.set_thresholds(0.3)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    adv = unit_pgd(dyn, pixels, 8 / 255, steps=5, seed=0, to_input=slowdown.to_input)
    assert (adv - pixels).abs().max() <= 8 / 255 + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0

    def hinge(p: torch.Tensor) -> float:
        with torch.no_grad():
            probs = dyn.unit_probabilities(slowdown.to_input(p))
        return float(sum(torch.relu(0.7 - q).sum() for q in probs))

    assert hinge(adv) < hinge(pixels)


def test_an_added_to_result_lists_each_run_once_in_its_command():
    from benchmarks.__main__ import joined_commands

    a, b = "python -m benchmarks s --x 1", "python -m benchmarks s --x 2"
    command = joined_commands(a, f"{b} --add")
    assert command == f"{a} && {b} --add"
    assert joined_commands(command, f"{a} --add") == f"{b} && {a} --add"  # measured again: last
    assert joined_commands(command, f"{b} --add") == command


def test_quick_dynamic_conv_runs_end_to_end_against_both_baselines(cifar_like, tmp_path):
    from dynify.models.cifar_resnet import cifar_resnet32

    state = {f"module.{k}": v for k, v in cifar_resnet32().state_dict().items()}
    torch.save({"state_dict": state}, cifar_like / "pretrained" / "resnet32-d509ac18.th")
    results, saved = tmp_path / "results", tmp_path / "saved"
    argv = ["dynamic_conv", "--quick", "--data", str(cifar_like), "--results", str(results)]
    main([*argv, "--cache", str(tmp_path / "cache.pt"), "--save-dir", str(saved)])
    data = json.loads((results / "dynamic_conv.json").read_text())["data"]
    r20, r32, dc = data["cifar_resnet20"], data["cifar_resnet32"], data["dynamic_conv"]
    assert data["fit_images"] == 64 and data["test_images"] == 60
    assert r20["macs"] == dc["static_macs"] < dc["macs"] < 1.1 * r20["macs"] < r32["macs"]
    assert len(dc["routing"]) == dc["dynamic_convs"] == 18
    for row in dc["routing"]:  # every test image has one heaviest expert per conv
        assert sum(row["histogram"]) == 60 and 0 < row["commonest_share"] <= 1
    for size in ("batch1", "batch8"):
        assert set(data["latency"][size]) == {"resnet20", "resnet32", "dynamic_conv"}
    # the saved models measure again to the same accuracies, without training
    main([*argv, "--cache", str(tmp_path / "cache.pt"), "--from-saved", str(saved)])
    again = json.loads((results / "dynamic_conv.json").read_text())["data"]
    assert again["measured_from_saved"]
    for key in ("cifar_resnet20", "cifar_resnet32", "dynamic_conv"):
        assert again[key]["test_acc"] == data[key]["test_acc"]


def test_a_subsample_spans_every_class_of_a_sorted_folder():
    from benchmarks.cifar_data import subsample

    labels = [i // 500 for i in range(5000)]  # ten classes, sorted as an image folder is
    for limit in (2000, 1500, 333):
        picked = [labels[i] for i in subsample(labels, limit).indices]
        assert len(picked) == limit and set(picked) == set(range(10))
        assert (
            max(picked.count(c) for c in range(10)) - min(picked.count(c) for c in range(10)) <= 1
        )


def test_a_calibration_subset_spans_every_class():
    from benchmarks.cifar_data import fit_and_calibration

    class Folder(torch.utils.data.Dataset):  # sorted by class, as an image folder is
        targets = tuple(i // 100 for i in range(1000))

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int) -> tuple[int, int]:
            return i, self.targets[i]

    _, calib = fit_and_calibration(Folder(), seed=0, calib_images=40)
    assert len(calib) == 40 and {label for _, label in calib} == set(range(10))


def test_halting_slowdown_pgd_lowers_every_stage_s_halting_scores():
    from benchmarks.slowdown_units import unit_hinge, unit_pgd

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    dyn = dynify.convert(cifar_resnet20(), "block-gates", x, options={"gate": "halting"}).eval()
    with torch.no_grad():
        for gate in dyn.gates:  # halting units that react to the input, halting early
            gate.decider.fc.weight.normal_(0, 2.0)
            gate.decider.fc.bias.fill_(0.0)
    dyn.set_thresholds(0.6)
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def stage_sums(p: torch.Tensor) -> float:
        with torch.no_grad():
            probs = dyn.unit_probabilities(slowdown.to_input(p))
            hinge = unit_hinge(dyn, probs, dyn.thresholds, halting=True)
            return float(hinge), float(sum(q.sum() for q in probs))

    adv = unit_pgd(dyn, pixels, 8 / 255, steps=5, seed=0, to_input=slowdown.to_input, halting=True)
    assert (adv - pixels).abs().max() <= 8 / 255 + 1e-6
    (before, scores_before), (after, scores_after) = stage_sums(pixels), stage_sums(adv)
    assert before > 0 and after < before and scores_after < scores_before  # halting later


def test_token_swaps_touch_only_words_at_most_k_and_never_lower_the_cost():
    from benchmarks.slowdown_text import cost_of, swap_attack
    from dynify.models.text import TextClassifier

    torch.manual_seed(0)
    model = TextClassifier(40, 3, embed_dim=6, hidden=8, dropout=0.0).eval()
    ids = torch.randint(2, 40, (5, 12), generator=torch.Generator().manual_seed(2))
    ids[:, 8:] = 0  # padding
    ids[0, 3] = 1  # an unknown word
    dyn = dynify.convert(model, "stop-reading", ids[:1], options={"every": 2}).eval()
    dyn.set_thresholds(0.4)
    attacked = swap_attack(dyn, ids, [1, 3], seed=0, positions=4, words=6, vocab_size=40)
    cost = cost_of(dyn)
    for k, x in attacked.items():
        changed = (x != ids).sum(1)
        assert bool((changed <= k).all())
        assert torch.equal(x[:, 8:], ids[:, 8:]) and bool((x[0, 3] == 1).all())
        assert bool((cost(x) >= cost(ids) - 1e-12).all())


def test_the_recorded_command_leaves_out_where_the_output_went():
    from benchmarks.results import command_line

    argv = ["latency", "--results", "/tmp/x", "--no-render", "--runs=3", "--results=/y"]
    assert command_line(argv) == "python -m benchmarks latency --runs=3"


# --- the suites call only the public API -------------------------------------------------------

# Modules of dynify a suite may import from besides `dynify` itself.
PUBLIC_MODULES = {"dynify", "dynify.errors"}
# Attributes of a model's internals that the public API gives another way: `costs()` (head
# MACs), `model_name` and `training_record` (the artifact's spec), `dynify.new_parameters`
# (exit heads), the fine-tuning callback (the router temperature).
PRIVATE_ATTRIBUTES = {"book", "head_macs", "heads", "kind", "router_temperature", "spec"}


def _underscored(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(path: Path) -> list[str]:
    """Where `path` reaches past the public API: imports from dynify's modules, names that
    `dynify.__all__` does not list, private attributes read or probed with getattr/hasattr."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dynify"):
            if node.module not in PUBLIC_MODULES:
                found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Import):
            found += [
                f"{where} imports {a.name}"
                for a in node.names
                if a.name.startswith("dynify") and a.name not in PUBLIC_MODULES
            ]
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "dynify":
                if node.attr not in dynify.__all__ and node.attr not in ("errors", "__version__"):
                    found.append(f"{where} reads dynify.{node.attr}, not in dynify.__all__")
            elif node.attr in PRIVATE_ATTRIBUTES or _underscored(node.attr):
                found.append(f"{where} reads .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in PRIVATE_ATTRIBUTES
        ):
            found.append(f"{where} probes {node.args[1].value!r} with {node.func.id}")
    return found


def test_the_suites_call_only_the_public_api():
    """A published figure comes from code dynify ships: no suite imports dynify's modules or
    reads a model's internals."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    paths = sorted(folder.glob("*.py"))
    assert len(paths) > 10
    found = [use for path in paths for use in _private_uses(path)]
    assert not found, "\n".join(found)


def test_the_public_api_check_catches_each_kind_of_private_use(tmp_path):
    suite = tmp_path / "suite.py"
    suite.write_text(
        "import dynify\nimport dynify.runtime\nfrom dynify.files import atomic_output\n"
        "x = dynify.runtime\ny = dyn.heads\nz = getattr(dyn, 'kind', None)\nw = dyn._static\n"
        "ok = dynify.convert, dyn.exit_logits, dyn.training_record\n"
    )
    found = _private_uses(suite)
    assert [f.split(" ", 1)[0] for f in found] == [f"suite.py:{i}" for i in (2, 3, 4, 5, 6, 7)]


def test_quick_latency_times_the_batch_1_graph_against_the_any_batch_graph(tmp_path):
    from benchmarks import latency

    results = tmp_path / "results"
    main(["latency", "--quick", "--any-batch", "--results", str(results)])
    payload = json.loads((results / "latency_any_batch_graph.json").read_text())
    assert payload["metadata"]["command"] == "python -m benchmarks latency --quick --any-batch"
    data = payload["data"]
    assert list(data) == ["batch-1 graph, 1 thread(s)", "any-batch graph, 1 thread(s)"]
    for rows in data.values():  # every forced exit, the final classifier, the static network
        assert [r[0] for r in rows] == ["exit 0", "exit 1", "exit 2", "exit 3", "final", "static"]
        assert all(r[1] > 0 for r in rows) and rows[-1][2] == 1.0
    assert len(latency.any_batch_table(data)) == 2 + len(data) + 1  # the report's rows


def test_skip_rnn_budget_point_asks_for_the_mac_fraction_of_a_share_of_updates():
    """The MAC budget of 50 % of the updates, interpolated on the held-out curve; a share the
    curve does not reach is refused."""
    from benchmarks.skip_rnn import macs_at_share

    def point(share, macs):
        return {"held_out": {"update_share": share, "macs_fraction": macs}}

    curve = [point(1.0, 0.5), point(0.4, 0.2), point(0.6, 0.3)]
    assert macs_at_share(curve, 0.5) == pytest.approx(0.25)
    assert macs_at_share(curve, 0.6) == pytest.approx(0.3)
    with pytest.raises(SystemExit):
        macs_at_share(curve, 0.1)
