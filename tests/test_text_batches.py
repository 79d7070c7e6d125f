"""Text as users pass it: a DataLoader with its own collate_fn padding each batch to its longest
text, and vocabularies that pad with an id other than 0 (1, as in fairseq). The pad id is the
`padding_idx` of the embedding that reads the ids (or `convert(..., pad_id=)`); every length,
mask and padding dynify makes counts with it; id 0 is then an ordinary token."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Subset
from typer.testing import CliRunner

import dynify
from dynify.cli import app
from dynify.convert import read_model
from dynify.errors import DataError, InputError
from dynify.frontend.inputs import ExtraInput, input_tensors
from dynify.models.text import text_classifier
from dynify.train.batches import Batches, Preprocessing, model_batch_options, model_inputs
from dynify.train.data.collated import CollatedDataset, IdsWithMask, split_batch

VOCAB, STEPS, CLASSES, N, PAD = 24, 12, 2, 96, 1
TEMPORAL = [("stop-reading", {"every": 4}), ("skip-rnn", {})]


def token_lists(n: int = N, seed: int = 0, steps: int = STEPS) -> tuple[list[Tensor], Tensor]:
    """Texts of 1 to `steps` tokens drawn from every id but the pad id (0 is a real token);
    the label is whether token 0 occurs more often than token 2."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (n,), generator=generator).tolist()
    texts = []
    for n_tokens in lengths:
        ids = torch.randint(0, VOCAB - 1, (n_tokens,), generator=generator)
        texts.append(torch.where(ids >= PAD, ids + 1, ids))  # never the pad id
    labels = torch.tensor([int((t == 0).sum() > (t == 2).sum()) for t in texts])
    return texts, labels


class Texts(Dataset):
    """Ragged items (ids of the text's own length, label): what a collate_fn pads."""

    def __init__(self, seed: int = 0, n: int = N):
        self.texts, self.labels = token_lists(n, seed)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.texts[i], int(self.labels[i])


def pad_to_longest(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """The user's collate_fn: right-pad to the batch's longest text with the pad id 1."""
    texts, labels = zip(*batch, strict=True)
    return pad_sequence(list(texts), batch_first=True, padding_value=PAD), torch.tensor(labels)


def with_lengths(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, lengths, labels), padded to the batch's longest: a common collate_fn."""
    ids, labels = pad_to_longest(batch)
    return ids, torch.tensor([len(t) for t, _ in batch]), labels


def with_mask(batch: list[tuple[Tensor, int]]) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """((ids, mask), labels), padded to the batch's longest."""
    ids, lengths, labels = with_lengths(batch)
    return (ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None]), labels


def full_width(data: Texts) -> dynify.TextDataset:
    """The same texts padded to STEPS with the pad id, as one TextDataset."""
    ids = torch.full((len(data), STEPS), PAD, dtype=torch.long)
    for row, text in enumerate(data.texts):
        ids[row, : len(text)] = text
    return dynify.TextDataset(ids, data.labels)


def model_of(inputs: str = "ids", pad_id: int = PAD) -> nn.Module:
    torch.manual_seed(0)
    model = text_classifier(
        VOCAB, CLASSES, inputs=inputs, embed_dim=8, hidden=12, dropout=0.0, pad_id=pad_id
    )
    with torch.no_grad():
        model.classifier.weight.mul_(10.0)
    return model.eval()


def example(inputs: str = "ids") -> Tensor | tuple[Tensor, Tensor]:
    ids = full_width(Texts(n=1)).ids
    if inputs == "ids":
        return ids
    lengths = (ids != PAD).sum(1)
    return ids, lengths if inputs == "lengths" else torch.arange(STEPS)[None, :] < lengths[:, None]


@pytest.mark.parametrize(("strategy", "options"), TEMPORAL)
def test_a_model_padding_with_1_converts_and_a_batch_equals_its_texts_alone(strategy, options):
    """The pad id comes from the embedding's padding_idx; each text's answer in a padded batch
    is the original model's on the text alone, its padding is neither run nor charged, and
    id 0 counts as a token."""
    model = model_of()
    dyn = dynify.convert(model, strategy, example(), options=options).eval()
    assert dyn.pad_id == PAD and "pad_id" not in dyn.spec  # found again when loaded
    texts, _ = token_lists(8, seed=3)
    texts[0] = torch.zeros(STEPS, dtype=torch.long)  # all zeros: a full text, not padding
    ids = torch.full((8, STEPS), PAD)
    for row, text in enumerate(texts):
        ids[row, : len(text)] = text
    dyn.set_thresholds(1.01)
    with torch.no_grad():
        out = dyn(ids)
        macs = dyn.last_macs.clone()
        for i, text in enumerate(texts):
            alone = model(text[None])
            assert (out[i] - alone[0]).abs().max() <= 1e-5, i
            dyn(ids[i : i + 1])
            assert torch.equal(dyn.last_macs, macs[i : i + 1])
        with dyn.static():
            assert torch.equal(dyn(ids), model(ids))
        dyn(ids)
    lengths = [len(t) for t in texts]
    if strategy == "stop-reading":
        assert dyn.last_tokens.tolist() == [min(STEPS, -(-n // 4) * 4) for n in lengths]
    else:
        assert dyn.last_decisions().sum(1).tolist() == lengths


def test_the_pad_id_is_a_fact_of_the_front_end():
    front = read_model(model_of(), example())
    ids = next(n for n in front.context.gm.graph.nodes if n.op == "placeholder")
    assert ids.meta["pad_id"] == PAD and front.context.analysis.pad_id == PAD
    assert front.context.pad_id == PAD
    plain = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Flatten(), nn.Linear(8 * STEPS, 2))
    front = read_model(plain, example())
    assert front.context.analysis.pad_id is None and front.context.pad_id == 0

    class Functional(nn.Module):
        """The ids cast, then a functional embedding: still the embedding that reads them."""

        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(VOCAB, 8))
            self.other = nn.Embedding(VOCAB, 8, padding_idx=5)  # reads positions, not the ids
            self.head = nn.Linear(8, 2)

        def forward(self, ids):
            x = nn.functional.embedding(ids.long(), self.table, padding_idx=3)
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            return self.head((x + self.other(positions)).mean(1))

    assert read_model(Functional(), example()).context.pad_id == 3


def test_convert_takes_the_pad_id_when_the_embedding_does_not_say(tmp_path):
    """A model padding with 1 whose embedding has no padding_idx: `pad_id=1` is kept in the
    spec and the artifact, so lengths made for it count with 1 after loading too."""

    model = unmarked_model()
    dyn = dynify.convert(model, "skip-rnn", example("lengths"))
    assert dyn.pad_id == 0  # the rule when nothing says otherwise
    dyn = dynify.convert(model, "skip-rnn", example("lengths"), pad_id=PAD)
    assert dyn.pad_id == PAD and dyn.spec["pad_id"] == PAD
    loaded = dynify.load(dynify.save(dyn, tmp_path / "m.dyn"), model=unmarked_model())
    assert loaded.pad_id == PAD
    batches = Batches(full_width(Texts()), Preprocessing.identity(), batch_size=N,
                      **model_batch_options(loaded))  # fmt: skip
    (x, lengths), _ = next(batches.epoch(0))
    assert torch.equal(lengths, (x != PAD).sum(1)) and bool((x == 0).any())
    with pytest.raises(InputError, match="pad_id"):
        dynify.convert(model, "skip-rnn", example("lengths"), pad_id=-1)


@pytest.mark.parametrize(("strategy", "options"), TEMPORAL)
def test_artifact_round_trip_of_a_model_padding_with_1(strategy, options, tmp_path):
    model = model_of()
    dyn = dynify.convert(model, strategy, example(), options=options).eval()
    loaded = dynify.load(dynify.save(dyn, tmp_path / "m.dyn"), model=model_of())
    assert loaded.pad_id == PAD
    ids = full_width(Texts(n=8, seed=4)).ids
    with torch.no_grad():
        assert torch.equal(loaded(ids), dyn(ids))
        assert torch.equal(loaded.last_macs, dyn.last_macs)


@pytest.mark.parametrize("inputs", ["ids", "lengths", "mask"])
def test_a_collate_loader_reads_as_the_same_texts_padded_to_the_model(inputs):
    """Batches of different widths (each padded to its longest) give every text the answer
    and cost it gets from the same texts padded to the converted length."""
    dyn = dynify.convert(model_of(inputs), "stop-reading", example(inputs), options={"every": 4})
    data = Texts()
    collate = {"ids": pad_to_longest, "lengths": with_lengths, "mask": with_mask}[inputs]
    loader = DataLoader(data, batch_size=10, collate_fn=collate)
    widths = {input_tensors(split_batch(batch)[0])[0].shape[1] for batch in loader}
    assert len(widths) > 1 and max(widths) <= STEPS  # really ragged
    for threshold in (1.01, 0.6):  # reading every real token; stopping early
        dyn.set_thresholds(threshold)
        base = dynify.evaluate(dyn, full_width(data))
        report = dynify.evaluate(dyn, loader, batch_size=10)  # batches narrower than STEPS
        assert report.samples == N
        assert report.dynamic_accuracy == base.dynamic_accuracy
        assert report.static_accuracy == base.static_accuracy
        assert report.dynamic_macs_fraction == pytest.approx(base.dynamic_macs_fraction)


@pytest.mark.parametrize(
    ("inputs", "strategy", "options"),
    [("ids", "stop-reading", {"every": 4}), ("lengths", "skip-rnn", {})],
)
def test_finetune_calibrate_evaluate_from_a_collate_loader(inputs, strategy, options, tmp_path):
    """A model padding with 1, fed batches its user's collate_fn pads to their longest text
    (ids, or ids and lengths): fine-tuning resumes where it stopped, the held-out share
    calibrates (the loader's data set split, batched by the same collate_fn), and evaluation
    reads it back."""
    run = {"epochs": 2, "batch_size": 16, "progress": False, "calibration_fraction": 0.25}
    collate = pad_to_longest if inputs == "ids" else with_lengths
    loader = DataLoader(Texts(), batch_size=5, shuffle=True, collate_fn=collate)

    def converted() -> dynify.DynamicModel:
        return dynify.convert(model_of(inputs), strategy, example(inputs), options=options)

    def stop_at(info):
        if info["step"] == 5:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        dynify.finetune(converted(), loader, checkpoint=ckpt, callback=stop_at, **run)
    resumed = converted()
    result = dynify.finetune(resumed, loader, checkpoint=ckpt, resume=True, **run)
    assert result.resumed_from == 1
    reference = converted()
    dynify.finetune(reference, loader, **run)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    calibration = dynify.calibrate(resumed, loader, budget=0.7, part="calibration")
    assert "held out" in calibration.data and calibration.samples == N // 4
    report = dynify.evaluate(resumed, result.calibration_data)
    assert report.samples == N // 4
    assert report.dynamic_accuracy == pytest.approx(calibration.accuracy)
    assert report.dynamic_macs_fraction <= 0.7 + 1e-6


def test_the_inputs_made_for_a_model_padding_with_1():
    """A narrower batch is padded to the model's length with the pad id (a mask with 0);
    lengths count the ids other than the pad id, 0 included; columns past the model's length
    are cut when they hold padding only, else refused."""
    ids = torch.tensor([[5, 0, 1], [0, 1, 1], [1, 1, 1]])
    x, lengths = model_inputs(ids, ExtraInput("lengths", torch.int64), pad_id=1, steps=5)
    assert x.tolist() == [[5, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert lengths.tolist() == [2, 1, 1]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    x, padded_mask = model_inputs((ids, mask), ExtraInput("mask", torch.bool), pad_id=1, steps=5)
    assert padded_mask.tolist() == [[True, True, False, False, False]] + [[True] + [False] * 4] * 2
    assert torch.equal(model_inputs(ids, None, pad_id=1, steps=2), ids[:, :2])
    with pytest.raises(DataError, match="converted for 1"):
        model_inputs(ids, None, pad_id=1, steps=1)
    assert torch.equal(model_inputs(ids, None, pad_id=1), ids)  # no length given: as it is


def test_what_a_collate_fn_may_return():
    ids, lengths = torch.ones(3, 4, dtype=torch.long), torch.tensor([4, 2, 1])
    labels = torch.tensor([0, 1, 0])
    mask = torch.ones(3, 4, dtype=torch.bool)
    unlabelled = torch.full((3,), -1)
    x, y = split_batch(ids)
    assert x is ids and torch.equal(y, unlabelled)
    assert split_batch((ids, labels))[0] is ids
    assert torch.equal(split_batch([ids, labels])[1], labels)
    (a, b), y = split_batch(((ids, lengths), labels))
    assert b is lengths and torch.equal(y, labels)
    (a, b), y = split_batch((ids, lengths, labels))
    assert b is lengths and torch.equal(y, labels)
    (a, b), y = split_batch((ids, mask))  # a [B, T] second tensor is a mask
    assert b is mask and torch.equal(y, unlabelled)
    (a, b), y = split_batch(((ids, lengths),))
    assert a is ids and b is lengths and torch.equal(y, unlabelled)
    with pytest.raises(DataError, match="collate_fn returned a dict with keys \\['ids'\\]"):
        split_batch({"ids": ids})
    with pytest.raises(DataError, match="class indices"):
        split_batch((ids, torch.rand(3)))


def test_loaders_dynify_cannot_draw_from_say_what_to_pass():
    """A batch sampler (bucketing texts by length) is read through its data set like any
    loader; items that are batches already, or a stream, cannot be drawn by index."""
    dyn = dynify.convert(model_of(), "skip-rnn", example())
    by_length = sorted(range(N), key=lambda i: len(Texts().texts[i]))
    sampler = torch.utils.data.BatchSampler(by_length, batch_size=8, drop_last=False)
    loader = DataLoader(Texts(), batch_sampler=sampler, collate_fn=pad_to_longest)
    assert dynify.evaluate(dyn, loader).samples == N
    batches = DataLoader(Texts(), batch_size=None, collate_fn=pad_to_longest)
    with pytest.raises(DataError, match=r"collate_fn=loader\.collate_fn"):
        dynify.evaluate(dyn, batches)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(Texts())

    with pytest.raises(DataError, match="map-style"):
        dynify.evaluate(dyn, DataLoader(Stream(), batch_size=8, collate_fn=pad_to_longest))
    with pytest.raises(DataError, match="collate_fn returned"):
        dynify.evaluate(dyn, DataLoader(Texts(), batch_size=8, collate_fn=lambda b: b))


def test_ranks_slice_the_batches_a_collate_fn_made():
    """Under DDP every rank draws the same global batch (the user's collate_fn pads it) and
    keeps its own rows, padded to the model's length."""
    data = CollatedDataset(Texts(), pad_to_longest)
    options = {"batch_size": 8, "pad_id": PAD, "steps": STEPS, "train": True, "seed": 5}
    whole = Batches(Subset(data, range(40)), Preprocessing.identity(), **options)
    (x, y), *_ = whole.epoch(1)
    assert whole.tokens and x.shape == (8, STEPS)
    for rank in range(2):
        part = Batches(Subset(data, range(40)), Preprocessing.identity(), rank=rank, world=2,
                       **options)  # fmt: skip
        (xr, yr), *_ = part.epoch(1)
        assert torch.equal(xr, x[rank::2]) and torch.equal(yr, y[rank::2])


def test_finetune_static_pads_with_the_embedding_pad_id():
    """The static baseline from a collate loader: lengths counted against the pad id 1, the
    trim of all-pad columns too."""
    model = model_of("lengths")
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args))
    loader = DataLoader(Texts(), batch_size=16, collate_fn=pad_to_longest)
    result = dynify.finetune_static(
        model, loader, epochs=1, batch_size=16, optimizer="adam", lr=0.01, label_weight=1.0,
        extra_input="lengths", trim_padding=True, validation=loader,
    )  # fmt: skip
    assert result.history[0]["mean_loss"] > 0 and "val_acc" in result.history[0]
    for ids, lengths in calls:
        assert torch.equal(lengths, (ids != PAD).sum(1).clamp(min=1))
        assert bool((ids[:, -1] != PAD).any())  # trimmed to the longest text of the batch


def unmarked_model() -> nn.Module:
    """A model padding with 1 whose embedding does not say so (no padding_idx)."""
    model = model_of("lengths")
    model.embedding.padding_idx = None
    return model


def test_cli_convert_takes_the_pad_id(tmp_path):
    runner = CliRunner()
    ref = "tests.test_text_batches:unmarked_model"
    shape = ["--input-shape", f"1,{STEPS}", "--input-dtype", "int64", "--lengths"]
    out = tmp_path / "m.dyn"
    result = runner.invoke(app, ["convert", ref, *shape, "-s", "skip-rnn", "--pad-id", "1",
                                 "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert dynify.load(out, model=unmarked_model()).pad_id == PAD
    result = runner.invoke(app, ["convert", ref, *shape, "--pad-id", "-1", "-o", str(out)])
    assert result.exit_code == 2


class MeanOfRealTokens(nn.Module):
    """Pads with 1 and averages the LSTM's outputs over the real tokens: NaN on a text of
    padding only, so it cannot be traced on an example made of the pad id."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8, padding_idx=PAD)
        self.rnn = nn.LSTM(8, 12, batch_first=True)
        self.classifier = nn.Linear(12, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        real = (ids != PAD).unsqueeze(-1).float()
        out, _ = self.rnn(self.embedding(ids))
        return self.classifier((out * real).sum(1) / real.sum(1))


def test_the_example_made_from_a_shape_is_not_padding(tmp_path):
    """An example input built from `input_shape` (and the one loading rebuilds) holds a token
    other than the model's pad id."""
    torch.manual_seed(0)
    dyn = dynify.convert(MeanOfRealTokens(), "skip-rnn", input_shape=(1, STEPS),
                         input_dtype="int64")  # fmt: skip
    loaded = dynify.load(dynify.save(dyn, tmp_path / "m.dyn"), model=MeanOfRealTokens())
    ids = full_width(Texts(n=8, seed=4)).ids
    with torch.no_grad():
        assert torch.equal(loaded(ids), dyn(ids))


def tokenized(batch: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """A tokenizer's collate_fn (Hugging Face style): padded to the batch's longest text."""
    ids, lengths, labels = with_lengths(batch)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return {
        "input_ids": ids,
        "token_type_ids": torch.zeros_like(ids),
        "attention_mask": mask,
        "labels": labels,
    }


def test_what_a_tokenizer_dict_batch_reads_as():
    ids, labels = torch.tensor([[5, 6, 1], [7, 1, 1]]), torch.tensor([1, 0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    x, y = split_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert isinstance(x, IdsWithMask) and x[0] is ids and torch.equal(y, labels)
    x, y = split_batch({"input_ids": ids, "label": labels})  # no mask: the ids alone
    assert x is ids and torch.equal(y, labels)
    assert split_batch({"input_ids": ids})[1].tolist() == [-1, -1]
    with pytest.raises(DataError, match="one mask entry per token"):
        split_batch({"input_ids": ids, "attention_mask": mask[:, :2]})
    with pytest.raises(DataError, match="class indices"):
        split_batch({"input_ids": ids, "labels": torch.rand(2)})
    # a model with lengths or a mask gets them from the attention mask; one without, the ids
    lengths = ExtraInput("lengths", torch.int64)
    assert model_inputs(x, None, pad_id=1, steps=4).tolist() == [[5, 6, 1, 1], [7, 1, 1, 1]]
    x = IdsWithMask((ids, mask))
    padded, got = model_inputs(x, lengths, pad_id=1, steps=4)
    assert padded.shape == (2, 4) and got.tolist() == [2, 1]
    with pytest.raises(DataError, match="padding_side='right'"):
        model_inputs(IdsWithMask((ids.flip(1), mask.flip(1))), lengths, pad_id=1)


@pytest.mark.parametrize("inputs", ["ids", "lengths", "mask"])
def test_a_tokenizer_dict_loader_reads_as_the_same_texts_padded_to_the_model(inputs):
    """Dict batches, as a tokenizer's collate_fn makes them, give every text the answer and
    cost of the same texts padded to the converted length; dict items batched by the default
    collate_fn too."""
    dyn = dynify.convert(model_of(inputs), "stop-reading", example(inputs), options={"every": 4})
    dyn.set_thresholds(0.6)
    data = Texts()
    base = dynify.evaluate(dyn, full_width(data))
    loader = DataLoader(data, batch_size=10, collate_fn=tokenized)
    report = dynify.evaluate(dyn, loader, batch_size=10)
    assert report.samples == N
    assert report.dynamic_accuracy == base.dynamic_accuracy
    assert report.dynamic_macs_fraction == pytest.approx(base.dynamic_macs_fraction)
    padded = full_width(data)
    items = [
        {
            "input_ids": padded.ids[i],
            "attention_mask": (padded.ids[i] != PAD).long(),
            "label": padded.targets[i],
        }
        for i in range(N)
    ]
    fixed = dynify.evaluate(dyn, DataLoader(items, batch_size=10), batch_size=10)
    assert fixed.dynamic_accuracy == base.dynamic_accuracy
    assert fixed.dynamic_macs_fraction == pytest.approx(base.dynamic_macs_fraction)
