"""Fine-tuning, calibration and evaluation of text models called as `forward(ids, lengths)` or
`forward(ids, mask)`: the batches of right-padded ids become the model's inputs in one place
(lengths = the count of non-pad ids, or the mask of those positions), for the dynamic model, the
static teacher and the static baseline alike; data sets whose items already hold
`((ids, lengths), label)` are read as they are; the CLI reads a text folder with --vocab."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

import dynify
from dynify.cli import app
from dynify.errors import DataError
from dynify.frontend.inputs import ExtraInput
from dynify.models.text import text_classifier
from dynify.train.batches import Batches, Preprocessing, model_inputs

VOCAB, STEPS, CLASSES, N = 24, 12, 2, 160
STRATEGIES = [("skip-rnn", {}), ("stop-reading", {"every": 4})]
KINDS = ["lengths", "mask"]


def texts(n: int = N, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded token ids of random lengths; the label is whether token 2 occurs more
    often than token 3 (something an LSTM can learn, and that needs the real tokens only)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, STEPS + 1, (n,), generator=generator)
    ids = torch.randint(2, VOCAB, (n, STEPS), generator=generator)
    ids[torch.arange(STEPS)[None, :] >= lengths[:, None]] = 0
    labels = ((ids == 2).sum(1) > (ids == 3).sum(1)).long()
    return ids, labels


def dataset(seed: int = 0) -> dynify.TextDataset:
    return dynify.TextDataset(*texts(seed=seed))


def model_of(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return text_classifier(VOCAB, CLASSES, inputs=kind, embed_dim=8, hidden=12, dropout=0.0).eval()


def second(kind: str, ids: Tensor) -> Tensor:
    lengths = (ids != 0).sum(1).clamp(min=1)
    return lengths if kind == "lengths" else torch.arange(ids.shape[1])[None, :] < lengths[:, None]


def converted(kind: str, strategy: str, options: dict) -> tuple[nn.Module, dynify.DynamicModel]:
    model = model_of(kind)
    ids, _ = texts(2)
    return model, dynify.convert(model, strategy, (ids[:1], second(kind, ids)[:1]), options=options)


def _weights(dyn: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in dyn.state_dict().items()}


def _interrupt_at(step: int):
    def callback(info):
        if info["step"] == step:
            raise KeyboardInterrupt

    return callback


RUN = {"epochs": 2, "batch_size": 32, "progress": False, "calibration_fraction": 0.25, "lr": 0.01}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("strategy", "options"), STRATEGIES)
def test_finetune_calibrate_evaluate(kind, strategy, options, tmp_path):
    _, dyn = converted(kind, strategy, options)
    data = dataset()
    before = _weights(dyn)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        dynify.finetune(dyn, data, checkpoint=ckpt, callback=_interrupt_at(5), **RUN)
    _, resumed = converted(kind, strategy, options)  # a new process reloads the artifact
    result = dynify.finetune(resumed, data, checkpoint=ckpt, resume=True, **RUN)
    assert result.resumed_from == 1 and result.epochs_run == 1
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    _, reference = converted(kind, strategy, options)
    dynify.finetune(reference, data, **RUN)
    after = _weights(resumed)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the new parts learnt
    for k, v in _weights(reference).items():
        assert torch.equal(v, after[k]), k  # the resumed run ends where an uninterrupted one does

    calibration = dynify.calibrate(resumed, data, budget=0.7)
    assert "held out" in calibration.data and calibration.samples == N // 4
    assert calibration.macs_fraction <= 0.7 + 1e-6
    # The thresholds hold on the held-out part, measured again by the real forward.
    held = result.calibration_data
    report = dynify.evaluate(resumed, held)
    assert report.samples == N // 4
    assert report.dynamic_macs_fraction <= 0.7 + 1e-6
    assert report.dynamic_accuracy == pytest.approx(calibration.accuracy)
    assert 0.0 <= report.static_accuracy <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_the_teacher_is_the_original_model_on_the_same_inputs(kind):
    """joint mode with the user's original network as teacher: it is called with the ids and
    their lengths or mask, exactly as the converted model is."""
    model, dyn = converted(kind, "stop-reading", {"every": 4})
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args))
    dynify.finetune(dyn, dataset(), mode="joint", teacher=model, epochs=1, batch_size=40,
                    progress=False, calibration_fraction=0.0)  # fmt: skip
    assert len(calls) == N // 40
    ids, extra = calls[0]
    assert extra.dtype == (torch.int64 if kind == "lengths" else torch.bool)
    assert torch.equal(extra, second(kind, ids))


@pytest.mark.parametrize("kind", KINDS)
def test_items_that_hold_lengths_or_a_mask_are_read_as_they_are(kind):
    """A data set of `((ids, lengths), label)` items (and a DataLoader over it) gives the
    model the same inputs as the ids alone."""
    _, dyn = converted(kind, "skip-rnn", {})
    ids, labels = texts()

    class Pairs(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return (ids[i], second(kind, ids)[i]), int(labels[i])

    dyn.set_thresholds(0.5)
    base = dynify.evaluate(dyn, dynify.TextDataset(ids, labels))
    for data in (Pairs(), DataLoader(Pairs(), batch_size=7)):
        report = dynify.evaluate(dyn, data)
        assert report.dynamic_accuracy == base.dynamic_accuracy
        assert report.dynamic_macs_fraction == pytest.approx(base.dynamic_macs_fraction)
    with pytest.raises(DataError, match="collate_fn"):
        dynify.evaluate(dyn, DataLoader(Pairs(), batch_size=7, collate_fn=lambda b: b))
    result = dynify.finetune(dyn, Pairs(), epochs=1, batch_size=32, progress=False)
    assert result.epochs_run == 1


def test_inputs_made_from_padded_ids():
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]])
    x, lengths = model_inputs(ids, ExtraInput("lengths", torch.int32))
    assert x is ids and lengths.tolist() == [2, 1, 1, 4] and lengths.dtype == torch.int32
    _, mask = model_inputs(ids, ExtraInput("mask", torch.uint8))
    assert mask.dtype == torch.uint8
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert model_inputs(ids, None) is ids
    with pytest.raises(DataError, match="takes one input"):
        model_inputs((ids, lengths), None)
    with pytest.raises(DataError, match="token ids"):
        model_inputs(torch.randn(4, 4, 3), ExtraInput("lengths", torch.int64))
    # Batches make them on every rank's slice alike.
    data = dynify.TextDataset(ids, torch.tensor([0, 1, 0, 1]))
    batches = Batches(data, Preprocessing.identity(), batch_size=4, world=2, rank=1,
                      extra_input=ExtraInput("lengths", torch.int64))  # fmt: skip
    (x, lengths), y = next(batches.epoch(0))
    assert torch.equal(x, ids[1::2]) and lengths.tolist() == [1, 4] and y.tolist() == [1, 1]


def test_a_one_input_model_refuses_pairs():
    model = text_classifier(VOCAB, CLASSES, embed_dim=8, hidden=12)
    ids, labels = texts()
    dyn = dynify.convert(model, "skip-rnn", ids[:1])

    class Pairs(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return (ids[i], (ids[i] != 0).sum()), int(labels[i])

    with pytest.raises(DataError, match="takes one input"):
        dynify.evaluate(dyn, Pairs())


@pytest.mark.parametrize("kind", KINDS)
def test_finetune_static_with_lengths_or_a_mask(kind):
    model = model_of(kind)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args))
    before = _weights(model)
    result = dynify.finetune_static(
        model, dataset(), epochs=1, batch_size=40, optimizer="adam", lr=0.01, label_weight=1.0,
        extra_input=kind, trim_padding=True, validation=dataset(seed=1),
    )  # fmt: skip
    assert result.history[0]["mean_loss"] > 0 and "val_acc" in result.history[0]
    assert any(not torch.equal(before[k], v) for k, v in _weights(model).items())
    ids, extra = calls[0]
    assert torch.equal(extra, second(kind, ids))  # trimmed, the mask with the ids


def _write_texts(path, ids: Tensor, labels: Tensor, vocab: dynify.Vocabulary) -> None:
    rows = [" ".join(vocab.decode(row)) + f"\t{int(y)}" for row, y in zip(ids, labels, strict=True)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def lengths_model(num_classes: int = CLASSES) -> nn.Module:
    assert num_classes == CLASSES
    return model_of("lengths")


def test_cli_converts_finetunes_calibrates_and_evaluates_a_text_folder(tmp_path):
    runner = CliRunner()
    words = ["<pad>", "<unk>", *[f"w{i}" for i in range(2, VOCAB)]]
    vocab = dynify.Vocabulary(words)
    vocab.save(tmp_path / "vocab.json")
    folder = tmp_path / "text"
    folder.mkdir()
    _write_texts(folder / "train.tsv", *texts(), vocab)
    _write_texts(folder / "test.tsv", *texts(60, seed=2), vocab)
    out = tmp_path / "m.dyn"
    shape = ["--input-shape", f"1,{STEPS}", "--input-dtype", "int64", "--lengths"]
    ref = "tests.test_padded_training:lengths_model"
    result = runner.invoke(app, ["convert", ref, *shape, "-s", "skip-rnn", "-o", str(out)])
    assert result.exit_code == 0, result.output
    common = ["--data", str(folder), "--vocab", str(tmp_path / "vocab.json")]
    common += ["--trust-import", ref]
    result = runner.invoke(
        app, ["finetune", str(out), *common, "--split", "train", "--epochs", "1",
              "--batch-size", "32", "--calibration-fraction", "0.25"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    tuned = dynify.load(out, model=model_of("lengths"))
    assert tuned.spec["finetune"]["samples"] == N - N // 4
    result = runner.invoke(
        app, ["calibrate", str(out), *common, "--split", "train", "--budget", "0.7"]
    )
    assert result.exit_code == 0, result.output
    assert "held out from fine-tuning" in result.output
    assert (
        dynify.load(out, model=model_of("lengths")).spec["calibration"]["macs_fraction"]
        <= 0.7 + 1e-6
    )
    report = tmp_path / "report.json"
    result = runner.invoke(
        app, ["evaluate", str(out), *common, "--split", "test", "--json", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["samples"] == 60
    # Text without its vocabulary, or a folder of several files without --split: what to do.
    result = runner.invoke(
        app, ["evaluate", str(out), "--data", str(folder / "test.tsv"), "--trust-import", ref]
    )
    assert result.exit_code == 2 and "--vocab" in result.output
    result = runner.invoke(app, ["evaluate", str(out), *common])
    assert result.exit_code == 2 and "--split" in result.output
