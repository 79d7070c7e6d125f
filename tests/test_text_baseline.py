"""The text baseline suite: a quick run goes end to end on text files the test writes, and
`static_text_model` returns the cached model (same weights, no retraining) the second time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import SUITES, text_baseline
from benchmarks.__main__ import main

WORDS = {
    "World": ["war", "minister", "election", "border"],
    "Sports": ["match", "goal", "team", "coach"],
    "Business": ["stocks", "profit", "market", "bank"],
    "Sci/Tech": ["software", "chip", "space", "internet"],
}


def write_split(path: Path, rows: int, seed: int, header: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    names = list(WORDS)
    lines = ["sentence\tlabel"] if header else []
    for i in range(rows):
        label = names[i % len(names)]
        picks = torch.randint(0, 4, (5,), generator=g).tolist()
        text = " ".join(WORDS[label][p] for p in picks)
        lines.append(f"The {text} today\t{label}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def text_data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_split(root / "text/agnews/train.tsv", 240, 0)
    write_split(root / "text/agnews/test.tsv", 40, 1)
    return root


def test_the_suite_is_registered_with_its_report():
    suite = SUITES["text_baseline"]
    assert suite.report_path.name == "text_baseline.md" and suite.module() is text_baseline


def test_quick_run_writes_results_with_metadata_and_caches_the_model(text_data, tmp_path):
    results, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["text_baseline", "--quick", "--data", str(text_data), "--datasets", "agnews"]
    main([*argv, "--results", str(results), "--cache", str(cache)])
    payload = json.loads((results / "text_baseline.json").read_text())
    assert payload["metadata"]["command"].startswith("python -m benchmarks text_baseline --quick")
    record = payload["data"]["datasets"]["agnews"]
    assert record["classes"] == ["Business", "Sci/Tech", "Sports", "World"]
    assert (record["fit_rows"], record["held_out_rows"], record["test_rows"]) == (180, 20, 40)
    assert 0.0 <= record["test_acc"] <= 1.0 and record["best_epoch"] == 1
    entries = list(cache.iterdir())
    assert len(entries) == 1
    assert sorted(p.name for p in entries[0].iterdir()) == [
        "model.safetensors",
        "record.json",
        "vocab.json",
    ]


def test_static_text_model_trains_once_then_reads_the_cache(text_data, tmp_path, monkeypatch):
    settings = text_baseline.TextSettings(
        hidden=8, embed_dim=8, max_len=12, epochs=4, batch_size=16, lr=0.02
    )
    first = text_baseline.static_text_model("agnews", text_data, settings, tmp_path / "c")
    assert first.record["test_acc"] > 0.9  # the words give the class away
    assert first.record["test_acc"] == text_baseline.accuracy(first.model, first.test)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(text_baseline, "train_static", no_training)
    again = text_baseline.static_text_model("agnews", text_data, settings, tmp_path / "c")
    assert again.vocab == first.vocab and again.classes == first.classes
    for key, value in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value)
    ids = first.test.ids[:8]
    assert torch.equal(again.model(ids), first.model.eval()(ids))
    assert again.record["test_acc"] == first.record["test_acc"]
    # the held-out part is the same 10 % and never overlaps what trained the model
    assert again.held_out.indices == first.held_out.indices
    assert not set(again.held_out.indices) & set(again.fit.indices)
