"""Text data as token ids, the built-in text classifiers, and training them through the public API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

import dynify
from dynify.errors import ArtifactError, DataError, ModelError, StrategyError
from dynify.export.artifact import check_spec_fields
from dynify.train.batches import Batches, Preprocessing
from dynify.zoo import ModelRef, build_model, check_rebuildable, rebuild, ref_for_module


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- tokenize and Vocabulary ----------------------------------------------------------------


def test_tokenize_lowercases_splits_on_non_letters_and_decodes_escapes():
    assert dynify.tokenize("Hello, World! 42 times") == ["hello", "world", "times"]
    # AG News: the escape's '&' became a space; apostrophes join a contraction into one token.
    assert dynify.tokenize("It #39;s over, it hasn #39;t") == ["its", "over", "it", "hasnt"]
    assert dynify.tokenize("AT&amp;T &lt;b&gt;Bold&lt;/b&gt; #36;5") == ["at", "t", "bold"]
    assert dynify.tokenize("Café naïve") == ["café", "naïve"]
    assert dynify.tokenize("") == []


def test_vocabulary_is_built_from_counts_with_pad_and_unknown_first():
    texts = ["b a a", "c a b", "d"]
    vocab = dynify.Vocabulary.build(texts)
    assert vocab.tokens == ["<pad>", "<unk>", "a", "b", "c", "d"]  # by count, ties alphabetical
    assert dynify.Vocabulary.build(texts, min_count=2).tokens == ["<pad>", "<unk>", "a", "b"]
    assert dynify.Vocabulary.build(texts, max_size=3).tokens == ["<pad>", "<unk>", "a"]
    ids = vocab.encode_batch(["a zebra b", "c c c c c c"], max_len=4)
    assert ids.dtype == torch.int64
    assert ids.tolist() == [[2, 1, 3, 0], [4, 4, 4, 4]]  # unknown -> 1, pad -> 0, cut at 4
    assert vocab.decode(ids[0]) == ["a", "<unk>", "b"]
    with pytest.raises(DataError, match="max_len"):
        vocab.encode_batch(["a"], max_len=0)


def test_vocabulary_round_trips_through_json_and_refuses_damaged_files(tmp_path):
    vocab = dynify.Vocabulary.build(["the cat sat", "the dog"])
    path = vocab.save(tmp_path / "vocab.json")
    assert dynify.Vocabulary.load(path) == vocab
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary file left

    text = path.read_text()
    cases = {
        "truncated.json": text[: len(text) // 2],
        "other.json": json.dumps({"format": "something-else", "tokens": []}),
        "version.json": json.dumps({**vocab.to_dict(), "version": 99}),
        "notlist.json": json.dumps({**vocab.to_dict(), "tokens": "abc"}),
        "nospecial.json": json.dumps({**vocab.to_dict(), "tokens": ["the", "cat"]}),
        "twice.json": json.dumps({**vocab.to_dict(), "tokens": ["<pad>", "<unk>", "a", "a"]}),
        "number.json": json.dumps({**vocab.to_dict(), "tokens": ["<pad>", "<unk>", 3]}),
    }
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match="vocabulary"):
            dynify.Vocabulary.load(tmp_path / name)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not a readable vocabulary"):
        dynify.Vocabulary.load(tmp_path / "binary.json")
    with pytest.raises(DataError, match="does not exist"):
        dynify.Vocabulary.load(tmp_path / "missing.json")


# --- load_text_dataset ----------------------------------------------------------------------


def test_load_text_dataset_reads_tsv_with_header_and_maps_labels(tmp_path):
    train = write_tsv(
        tmp_path / "train.tsv",
        ["sentence\tlabel", "a fine film \t1", "a dull film\t0", "fine fine\t1", "", "dull\t0"],
    )
    data = dynify.load_text_dataset(train, max_len=3)
    assert len(data) == 4 and data.classes == ["0", "1"]
    assert data.targets.tolist() == [1, 0, 1, 0]
    assert data.ids.shape == (4, 3) and data.ids.dtype == torch.int64
    assert data.vocab.decode(data.ids[0]) == ["a", "fine", "film"]
    ids, label = data[2]
    assert ids.tolist() == [data.vocab.index["fine"]] * 2 + [0] and label == 1

    test = write_tsv(tmp_path / "test.tsv", ["sentence\tlabel", "a superb film\t1"])
    held = dynify.load_text_dataset(test, data.vocab, max_len=3, classes=data.classes)
    assert held.vocab is data.vocab
    assert held.ids.tolist() == [[data.vocab.index["a"], 1, data.vocab.index["film"]]]


def test_named_labels_sort_and_quoted_fields_are_read(tmp_path):
    path = write_tsv(
        tmp_path / "news.tsv",
        [
            'Stocks "rally" today\tBusiness',
            '"Team wins, ""again"" at home"\tSports',
            "Markets fall\tBusiness",
        ],
    )
    data = dynify.load_text_dataset(path)
    assert data.classes == ["Business", "Sports"]
    assert data.targets.tolist() == [0, 1, 0]
    assert data.vocab.decode(data.ids[1]) == ["team", "wins", "again", "at", "home"]
    # numbers sort numerically, not as strings
    numbered = write_tsv(tmp_path / "n.tsv", ["x\t10", "y\t2", "z\t1"])
    assert dynify.load_text_dataset(numbered).classes == ["1", "2", "10"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["good\t0", "no label here", "fine\t1"], "line 2: expected 'text<TAB>label', got 1 field"),
        (["good\t0", "fine\t1", "a\tb\tc"], "line 3: expected 'text<TAB>label', got 3 fields"),
        (["good\t0", "empty label\t "], "line 2"),
    ],
)
def test_a_malformed_row_is_refused_with_its_line_number(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        dynify.load_text_dataset(write_tsv(tmp_path / "bad.tsv", lines))


def test_unknown_labels_empty_and_missing_files_are_refused(tmp_path):
    train = dynify.load_text_dataset(write_tsv(tmp_path / "a.tsv", ["x\tpos", "y\tneg"]))
    other = write_tsv(tmp_path / "b.tsv", ["x\tpos", "y\tneutral"])
    with pytest.raises(DataError, match="line 2: the label 'neutral' is not one of"):
        dynify.load_text_dataset(other, train.vocab, classes=train.classes)
    with pytest.raises(DataError, match="holds no examples"):
        dynify.load_text_dataset(write_tsv(tmp_path / "empty.tsv", ["sentence\tlabel"]))
    with pytest.raises(DataError, match="does not exist"):
        dynify.load_text_dataset(tmp_path / "missing.tsv")
    (tmp_path / "latin1.tsv").write_bytes("caf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        dynify.load_text_dataset(tmp_path / "latin1.tsv")


def test_split_dataset_stratifies_text_and_batches_pass_ids_unchanged(tmp_path):
    lines = [f"word{i % 7} text {'good' if i % 3 else 'bad'}\t{int(i % 3 > 0)}" for i in range(60)]
    data = dynify.load_text_dataset(write_tsv(tmp_path / "t.tsv", lines), max_len=5)
    fit, calibration = dynify.split_dataset(data, 0.1, seed=0)
    assert len(fit) + len(calibration) == 60 and not set(fit.indices) & set(calibration.indices)
    assert sorted(data.targets[calibration.indices].tolist()) == [0, 0, 1, 1, 1, 1]  # 20 + 40

    # an image preprocessing asked for (as the CLI's defaults would) is replaced by the identity
    image_pre = Preprocessing(32, (0.5,) * 3, (0.25,) * 3)
    batches = Batches(fit, image_pre, batch_size=16, train=True, augment=True, seed=3)
    assert batches.pre.is_identity and not batches.augment
    seen_x, seen_y = [], []
    for x, y in batches.epoch(0):
        assert x.dtype == torch.int64 and x.shape[1] == 5
        seen_x.append(x)
        seen_y.append(y)
    x, y = torch.cat(seen_x), torch.cat(seen_y)
    rows = {(*data.ids[i].tolist(), int(data.targets[i])) for i in fit.indices}
    assert {(*r.tolist(), int(t)) for r, t in zip(x, y, strict=True)} <= rows
    assert len(x) == 48  # 54 samples, full batches of 16 in training


# --- TextClassifier ---------------------------------------------------------------------------


def padded(texts: list[list[int]], length: int) -> torch.Tensor:
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, : len(text)] = torch.tensor(text)
    return ids


@pytest.mark.parametrize(("cell", "batch_first"), [("lstm", True), ("gru", True), ("lstm", False)])
def test_text_classifier_reads_each_text_to_its_last_token(cell, batch_first):
    torch.manual_seed(0)
    model = dynify.TextClassifier(30, 3, embed_dim=8, hidden=12, cell=cell, batch_first=batch_first)
    model.eval()
    texts = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8], []]
    ids = padded(texts, 8)
    out = model(ids)
    assert out.shape == (4, 3)
    with torch.no_grad():
        for row, text in enumerate(texts):
            alone = torch.tensor([text or [0]])  # an all-pad row reads step 0
            x = model.embedding(alone if batch_first else alone.t())
            states, _ = model.rnn(x)
            last = states[0, -1] if batch_first else states[-1, 0]
            torch.testing.assert_close(out[row], model.classifier(last), rtol=1e-5, atol=1e-6)
    # more padding changes nothing
    torch.testing.assert_close(model(padded(texts, 20)), out, rtol=1e-5, atol=1e-6)


def test_text_classifier_traces_with_the_rnn_whole():
    model = dynify.TextClassifier(30, 2, embed_dim=8, hidden=12).eval()
    gm = torch.fx.symbolic_trace(model)
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == ["embedding", "rnn", "dropout", "classifier"]
    ids = padded([[5, 6, 7], [9, 2]], 6)
    assert torch.equal(gm(ids), model(ids))


def test_text_classifier_refuses_bad_arguments():
    with pytest.raises(ModelError, match="cell must be one of lstm, gru"):
        dynify.TextClassifier(10, 2, cell="rnn")
    with pytest.raises(ModelError, match="vocab_size"):
        dynify.TextClassifier(0, 2)
    with pytest.raises(ModelError, match="pad_id"):
        dynify.TextClassifier(10, 2, pad_id=10)


def test_a_converted_text_classifier_round_trips_without_trusting_imports(tmp_path):
    torch.manual_seed(0)
    model = dynify.TextClassifier(30, 3, embed_dim=8, hidden=12, cell="gru").eval()
    ids = padded([[3, 4], [5, 6, 7, 8, 9, 1], []], 6)
    summary = dynify.inspect(model, input_shape=(1, 6), input_dtype="int64")
    assert [r.module for r in summary.recurrent] == ["rnn"]
    # ids feed both the embedding and the lengths: the only cut is after the RNN
    assert [c.node for c in summary.cuts] == ["dropout"]
    dyn = dynify.convert(model, "early-exit", ids[:1])
    assert dyn.spec["model"]["kind"] == "builtin" and dyn.spec["model"]["name"] == "text_gru"
    path = dynify.save(dyn, tmp_path / "text.dyn")
    again = dynify.load(path)  # no model=, no trust_imports
    with torch.no_grad(), dyn.static(), again.static():
        assert torch.equal(again(ids), model(ids))
        assert torch.equal(dyn(ids), model(ids))
    with pytest.raises(dynify.DynifyError, match="Expected token ids"):
        again(ids.float())
    with pytest.raises(StrategyError):
        dynify.convert(model, "block-gates", ids[:1])


# --- built-ins and their config -----------------------------------------------------------------


def test_text_builtins_build_from_a_config_and_rebuild_from_their_ref():
    model, ref = build_model(
        "text_gru", weights="random", num_classes=4, config={"vocab_size": 50, "hidden": 16}
    )
    assert isinstance(model.rnn, nn.GRU) and model.rnn.hidden_size == 16
    assert model.embedding.num_embeddings == 50 and model.classifier.out_features == 4
    assert ref.kind == "builtin" and ref.input_size is None
    assert ref.config == {"vocab_size": 50, "hidden": 16}

    own = dynify.TextClassifier(40, 3, embed_dim=8, hidden=12, layers=2)
    ref = ref_for_module(own)
    assert (ref.kind, ref.name, ref.num_classes) == ("builtin", "text_lstm", 3)
    check_rebuildable(ref)  # no trust_imports needed
    again = rebuild(ModelRef.from_dict(json.loads(json.dumps(ref.to_dict()))))
    shapes = {k: v.shape for k, v in own.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes
    assert ref_for_module(nn.Linear(2, 2)).kind == "module"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"vocab_size": 50, "depth": 3}, "has no argument 'depth'"),
        ({"vocab_size": "50"}, "argument 'vocab_size' must be a whole number"),
        ({"vocab_size": 50, "batch_first": 1}, "argument 'batch_first' must be a bool"),
        ({"vocab_size": -1}, "must be a whole number from 0"),
        ({"hidden": 8}, "needs the argument"),
        ({"vocab_size": 2**30, "embed_dim": 2**20}, "parameters, more than"),
        ({"vocab_size": 50, "pad_id": 60}, "pad_id must be a token id below vocab_size"),
    ],
)
def test_a_bad_builtin_config_is_refused_before_building(config, message):
    ref = ModelRef("builtin", "text_lstm", num_classes=2, weights="given", config=config)
    with pytest.raises(ModelError, match=message):
        check_rebuildable(ref)
    with pytest.raises(ModelError, match=message):
        rebuild(ref)


def test_only_builtins_take_a_config_and_the_spec_checks_its_types():
    ref = ModelRef("torchvision", "resnet18", config={"depth": 3})
    with pytest.raises(ModelError, match="Only dynify's built-in models take"):
        check_rebuildable(ref)
    spec = {
        "format": "dynify",
        "version": 1,
        "model": {"kind": "builtin", "name": "text_lstm", "config": {"vocab_size": 50}},
        "input_shape": [60],
        "strategy": "early-exit",
        "plan": {},
    }
    check_spec_fields(spec, "a.dyn")
    for bad in ([1, 2], {"vocab_size": [50]}, {"vocab_size": 1.5}, {"x" * 2000: 1}):
        spec["model"]["config"] = bad
        with pytest.raises(ArtifactError, match="malformed 'model.config'"):
            check_spec_fields(spec, "a.dyn")


# --- training on token ids --------------------------------------------------------------------


def synthetic(n: int, seed: int, length: int = 12) -> dynify.TextDataset:
    """Label 1 when token 5 appears anywhere in the text, else 0; texts of 1 to `length` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 40, (n, length), generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    ids[torch.arange(length) >= lengths[:, None]] = 0
    labels = (torch.rand(n, generator=g) < 0.5).long()
    where = (torch.rand(n, generator=g) * lengths).long()
    rows = labels == 1
    ids[rows, where[rows]] = 5
    return dynify.TextDataset(ids, labels)


def test_finetune_static_trains_a_text_classifier_from_scratch():
    train, held_out, test = synthetic(1200, 0), synthetic(200, 1), synthetic(400, 2)
    torch.manual_seed(0)
    model = dynify.TextClassifier(40, 2, embed_dim=16, hidden=32)
    with torch.no_grad():
        before = float((model.eval()(test.ids).argmax(-1) == test.targets).float().mean())
    result = dynify.finetune_static(
        model,
        train,
        epochs=3,
        optimizer="adam",
        lr=0.01,
        weight_decay=0.0,
        label_weight=1.0,
        batch_size=32,
        validation=held_out,
        trim_padding=True,
        clip_grad_norm=5.0,
    )
    assert not model.training
    with torch.no_grad():
        accuracy = float((model(test.ids).argmax(-1) == test.targets).float().mean())
    assert before < 0.7 and accuracy > 0.95
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    best = max(result.history, key=lambda r: r["val_acc"])
    assert result.best_epoch == best["epoch"] and best["val_acc"] > 0.95


def test_finetune_static_ends_with_its_best_validation_epoch():
    train, held_out = synthetic(300, 3), synthetic(100, 4)
    states = []

    def keep(info):
        if "val_acc" in info:
            states.append(({k: v.clone() for k, v in model.state_dict().items()}, info["val_acc"]))

    torch.manual_seed(1)
    model = dynify.TextClassifier(40, 2, embed_dim=8, hidden=8)
    result = dynify.finetune_static(
        model,
        train,
        epochs=4,
        optimizer="adam",
        lr=0.05,
        label_weight=1.0,
        batch_size=16,
        validation=held_out,
        callback=keep,
    )
    best_state, best_acc = states[result.best_epoch - 1]
    assert best_acc == max(acc for _, acc in states)
    for key, value in model.state_dict().items():
        assert torch.equal(value, best_state[key])


def test_trimmed_padding_gives_the_same_outputs_and_options_are_checked():
    model = dynify.TextClassifier(40, 2, embed_dim=8, hidden=8).eval()
    ids = synthetic(16, 5, length=30).ids
    trimmed = ids[:, : int((ids != 0).any(0).nonzero().max()) + 1]
    torch.testing.assert_close(model(trimmed), model(ids), rtol=1e-6, atol=1e-6)
    data = synthetic(20, 6)
    with pytest.raises(dynify.DynifyError, match="optimizer must be one of sgd, adam"):
        dynify.finetune_static(model, data, epochs=1, optimizer="lbfgs")
    with pytest.raises(dynify.DynifyError, match="label_weight"):
        dynify.finetune_static(model, data, epochs=1, label_weight=1.5)
    images = (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(dynify.DynifyError, match="Give input_size"):
        dynify.finetune_static(nn.Linear(2, 2), images, epochs=1)


def test_a_text_file_given_as_image_data_points_to_load_text_dataset(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", ["good\t1"])
    with pytest.raises(DataError, match="load_text_dataset"):
        dynify.load_dataset(path)


class BagOfEmbeddings(nn.Module):
    """Summed embeddings then an MLP: token ids in, with cut points for early exits."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(40, 16, padding_idx=0)
        layers = [nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.Linear(32, 32), nn.ReLU())
        self.fc = nn.Linear(32, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.embedding(ids).sum(1)))


def test_finetune_calibrate_evaluate_and_operating_points_run_on_token_ids():
    train, test = synthetic(600, 0), synthetic(300, 1)
    torch.manual_seed(0)
    model = BagOfEmbeddings()
    dynify.finetune_static(
        model, train, epochs=3, optimizer="adam", lr=0.01, label_weight=1.0, batch_size=32
    )
    dyn = dynify.convert(model, "early-exit", train.ids[:1], options={"head_budget": 0.5})
    run = dynify.finetune(dyn, train, epochs=2, batch_size=32, progress=False)
    assert dyn.spec["preprocessing"]["kind"] == "identity"
    assert run.history[-1]["acc_final"] > 0.9
    calibration = run.calibration_data
    result = dynify.calibrate(dyn, calibration, budget=0.8)
    assert result.macs_fraction <= 0.8 and result.samples == len(calibration) == 60
    report = dynify.evaluate(dyn, test)
    assert report.samples == 300
    assert report.static_accuracy > 0.9 and report.dynamic_accuracy > 0.9
    assert report.dynamic_macs_fraction < 0.9
    with torch.no_grad(), dyn.static():
        static = float((dyn(test.ids).argmax(-1) == test.targets).double().mean())
    assert report.static_accuracy == pytest.approx(static)
    (point,) = dynify.operating_points(dyn, calibration, test, budgets=[0.8])
    assert point.calibration_macs <= 0.8 and point.test_accuracy > 0.9
