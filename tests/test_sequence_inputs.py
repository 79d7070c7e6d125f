"""Padded text batches passed with their lengths or a padding mask, `forward(ids, lengths)` /
`forward(ids, mask)`, through the temporal strategies: what is read is found in the graph, a
sample's padding steps are not run nor charged, and its answer is the original model's on the
text alone (no padding); the input contract, the artifact and the CLI carry the second input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import dynify
from dynify.cli import app
from dynify.errors import ArtifactError, InputError, StrategyError, TraceError
from dynify.models.text import text_classifier

VOCAB, STEPS = 40, 12
LENGTHS = [12, 3, 7, 1, 12, 9, 5, 11]
TEMPORAL = [("stop-reading", {"every": 4}), ("skip-rnn", {})]


def padded(lengths: list[int] = LENGTHS, steps: int = STEPS) -> tuple[Tensor, Tensor]:
    """Token ids padded with 0 after each text's length, and the lengths."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (len(lengths), steps), generator=generator)
    lengths_t = torch.tensor(lengths)
    ids[torch.arange(steps)[None, :] >= lengths_t[:, None]] = 0
    return ids, lengths_t


def second_input(kind: str, lengths: Tensor, steps: int = STEPS) -> Tensor:
    return lengths if kind == "lengths" else torch.arange(steps)[None, :] < lengths[:, None]


def model_of(kind: str, cell: str = "lstm", batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = text_classifier(
        VOCAB, 4, inputs=kind, embed_dim=8, hidden=12, dropout=0.0, cell=cell,
        batch_first=batch_first,
    ).eval()  # fmt: skip
    with torch.no_grad():
        model.classifier.weight.mul_(10.0)
    return model


def convert(
    kind: str, strategy: str, options: dict, **model_args
) -> tuple[nn.Module, dynify.DynamicModel]:
    model = model_of(kind, **model_args)
    ids, lengths = padded()
    dyn = dynify.convert(
        model, strategy, (ids[:1], second_input(kind, lengths)[:1]), options=options
    )
    return model, dyn.eval()


@pytest.mark.parametrize("kind", ["lengths", "mask"])
@pytest.mark.parametrize(("strategy", "options"), TEMPORAL)
def test_a_padded_batch_equals_each_text_alone_without_padding(kind, strategy, options):
    """Every decision off (thresholds 1.01): each sample's answer is the original model's on
    its text alone, at its own length; no padding step runs or is charged; static mode is the
    original model bit-exactly on the padded batch."""
    model, dyn = convert(kind, strategy, options)
    ids, lengths = padded()
    extra = second_input(kind, lengths)
    dyn.set_thresholds(1.01)
    with torch.no_grad():
        out = dyn(ids, extra)
        macs = dyn.last_macs.clone()
        for i, n in enumerate(LENGTHS):
            alone = model(ids[i : i + 1, :n], second_input(kind, lengths[i : i + 1], n))
            assert (out[i] - alone[0]).abs().max() <= 1e-5, (i, n)
        with dyn.static():
            assert torch.equal(dyn(ids, extra), model(ids, extra))
            assert torch.equal(dyn((ids, extra)), model(ids, extra))
    with torch.no_grad():
        dyn(ids, extra)  # the dynamic forward's records again (static mode wrote its own)
    if strategy == "stop-reading":
        steps_run = dyn.last_tokens
        assert steps_run.tolist() == [min(STEPS, -(-n // 4) * 4) for n in LENGTHS]
    else:
        steps_run = dyn.last_decisions().sum(1)
        assert steps_run.tolist() == LENGTHS  # every real step updates, no padding step
        assert dyn.last_lengths.tolist() == LENGTHS and dyn.update_share() == 1.0
    assert torch.equal(dyn.last_macs, macs)
    # Charged by length: a longer text never costs less, the shortest costs least.
    order = sorted(range(len(LENGTHS)), key=LENGTHS.__getitem__)
    assert macs[order].tolist() == sorted(macs.tolist())
    assert int(macs.min()) < int(macs.max())


@pytest.mark.parametrize(("strategy", "options"), TEMPORAL)
def test_time_first_rnn_reads_at_each_length(strategy, options):
    model, dyn = convert("lengths", strategy, options, batch_first=False)
    ids, lengths = padded()
    dyn.set_thresholds(1.01)
    with torch.no_grad():
        out = dyn(ids, lengths)
        for i, n in enumerate(LENGTHS):
            alone = model(ids[i : i + 1, :n], lengths[i : i + 1])
            assert (out[i] - alone[0]).abs().max() <= 1e-5
    assert dyn.spec["plan"].get("read_kind", "gather") == "gather"


def test_the_second_input_is_checked():
    _, dyn = convert("lengths", "stop-reading", {"every": 4})
    ids, lengths = padded()
    with pytest.raises(InputError, match=r"call it as dyn\(x, lengths\)"):
        dyn(ids)
    with pytest.raises(InputError, match="in \\[1, 12\\]"):
        dyn(ids, lengths * 0)
    with pytest.raises(InputError, match="in \\[1, 12\\]"):
        dyn(ids, lengths + 1)
    with pytest.raises(InputError, match="as int64"):
        dyn(ids, lengths.int())
    with pytest.raises(InputError, match="shape"):
        dyn(ids, lengths[:3])
    x = dyn.random_input(5)
    assert isinstance(x, tuple) and x[1].dtype == torch.int64
    assert int(x[1].min()) >= 1 and int(x[1].max()) <= STEPS
    dyn(x)  # accepted as it is
    _, masked = convert("mask", "stop-reading", {"every": 4})
    mask = second_input("mask", lengths)
    with pytest.raises(InputError, match="padding at the end"):
        masked(ids, mask.flip(1))
    with pytest.raises(InputError, match="as bool"):
        masked(ids, mask.long())
    with pytest.raises(InputError, match="shape"):
        masked(ids, mask[:, :5])
    one_input = dynify.convert(model_of("ids"), "stop-reading", ids[:1], options={"every": 4})
    with pytest.raises(InputError, match="takes one input tensor"):
        one_input(ids, lengths)


class ReadsFinalState(nn.Module):
    """Takes the lengths but reads the RNN's final state, which includes the padding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = nn.GRU(8, 12, batch_first=True)
        self.fc = nn.Linear(12, 4)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        _, h = self.rnn(self.emb(ids))
        return self.fc(h[-1]) + lengths[:, None].float() * 0.0


class Packs(ReadsFinalState):
    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.emb(ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, h = self.rnn(packed)
        return self.fc(h[-1])


@pytest.mark.parametrize(("strategy", "options"), TEMPORAL)
def test_a_model_reading_padding_steps_is_refused(strategy, options):
    ids, lengths = padded()
    with pytest.raises(StrategyError, match="takes lengths but its classifier reads"):
        dynify.convert(ReadsFinalState(), strategy, (ids[:1], lengths[:1]), options=options)


def test_packing_inside_forward_says_pass_the_lengths():
    ids, lengths = padded()
    with pytest.raises(TraceError, match="pack_padded_sequence.*Pass the lengths instead"):
        dynify.convert(Packs(), "stop-reading", (ids[:1], lengths[:1]))


def test_strategies_for_one_tensor_refuse_a_second_input():
    ids, lengths = padded()
    with pytest.raises(StrategyError, match="take padded sequences with lengths or a mask"):
        dynify.convert(model_of("lengths"), "early-exit", (ids[:1], lengths[:1]))


def test_the_refusal_names_the_sequence_strategies_of_the_registry(monkeypatch):
    """The list comes from the models that declare `takes_extra_input`, not from a literal."""
    from dynify.passes import sequence_strategies
    from dynify.runtime.dynamic_width import DynamicWidthModel

    assert sequence_strategies() == ["skip-rnn", "stop-reading"]
    monkeypatch.setattr(DynamicWidthModel, "takes_extra_input", True)
    assert sequence_strategies() == ["dynamic-width", "skip-rnn", "stop-reading"]
    monkeypatch.undo()
    ids, lengths = padded()
    with pytest.raises(StrategyError, match="a mask: skip-rnn, stop-reading"):
        dynify.convert(model_of("lengths"), "early-exit", (ids[:1], lengths[:1]))


@pytest.mark.parametrize("kind", ["lengths", "mask"])
def test_artifact_records_the_input_signature(kind, tmp_path):
    _, dyn = convert(kind, "stop-reading", {"every": 4})
    assert dyn.spec["extra_input"] == {
        "kind": kind,
        "dtype": "int64" if kind == "lengths" else "bool",
    }
    path = dynify.save(dyn, tmp_path / "m.dyn")
    loaded = dynify.load(path)  # a built-in text classifier: rebuilt by name, with `inputs`
    assert loaded.extra_input == dyn.extra_input
    ids, lengths = padded()
    extra = second_input(kind, lengths)
    with torch.no_grad():
        assert torch.equal(loaded(ids, extra), dyn(ids, extra))
        assert torch.equal(loaded.last_macs, dyn.last_macs)


def test_a_damaged_input_signature_is_refused(tmp_path):
    from dynify.export.artifact import check_spec_fields

    _, dyn = convert("lengths", "stop-reading", {"every": 4})
    spec = json.loads(json.dumps(dyn.spec))
    spec["extra_input"] = {"kind": "lengths", "dtype": "float32"}
    with pytest.raises(ArtifactError, match="extra_input"):
        check_spec_fields(spec, tmp_path / "m.dyn")


def test_cli_describes_lengths_and_masks(tmp_path):
    runner = CliRunner()
    ref = "tests.test_sequence_inputs:lengths_model"
    shape = ["--input-shape", f"1,{STEPS}", "--input-dtype", "int64"]
    out = tmp_path / "m.dyn"
    args = ["convert", ref, *shape, "--lengths", "-s", "stop-reading", "--option", "every=4"]
    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    loaded = dynify.load(out, model=model_of("lengths"))
    assert loaded.spec["extra_input"] == {"kind": "lengths", "dtype": "int64"}
    result = runner.invoke(app, [*args, "--mask", "-o", str(out)])
    assert result.exit_code == 2 and "not both" in result.output
    ref = "tests.test_sequence_inputs:mask_model"
    result = runner.invoke(
        app, ["convert", ref, *shape, "--mask", "-s", "skip-rnn", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert dynify.load(out, model=model_of("mask")).spec["extra_input"]["kind"] == "mask"
    result = runner.invoke(app, ["inspect", ref, *shape, "--mask"])
    assert result.exit_code == 0 and "Recurrent layers (1)" in result.output
    result = runner.invoke(app, ["inspect", ref, *shape])  # the mask is missing
    assert result.exit_code == 2


def lengths_model() -> nn.Module:
    return model_of("lengths")


def mask_model() -> nn.Module:
    return model_of("mask")


def test_timing_runs_on_texts_with_lengths():
    """`dynify.bench` draws (ids, lengths) from the model and times each forced behaviour;
    random lengths mean texts shorter than the input, so every row reads less than static."""
    _, dyn = convert("lengths", "stop-reading", {"every": 4})
    result = dynify.bench(dyn, runtime="eager", batch=4, runs=2, warmup=1)
    rows = {row.label: row for row in result.rows}
    assert rows["static"].macs_fraction == 1.0
    dynamic = [row for label, row in rows.items() if label != "static"]
    assert dynamic and all(row.macs_fraction < 1.0 for row in dynamic)


class IndexesLastToken(nn.Module):
    """Reads each text's last token by advanced indexing, as user code often does:
    `out[torch.arange(B), lengths - 1]` (time-first: `out[lengths - 1, torch.arange(B)]`),
    the arange made from the output's own size or from the ids'."""

    def __init__(self, batch_first: bool = True, size_of: str = "out"):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 12, batch_first=batch_first)
        self.fc = nn.Linear(12, 4)
        with torch.no_grad():
            self.fc.weight.mul_(10.0)
        self.batch_first, self.size_of = batch_first, size_of

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        x = self.emb(ids)
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        if self.batch_first:
            rows = torch.arange(out.size(0) if self.size_of == "out" else ids.shape[0])
            return self.fc(out[rows, lengths - 1])
        rows = torch.arange(ids.shape[0], device=ids.device)
        return self.fc(out[lengths - 1, rows, :])


INDEXING = [
    pytest.param(True, "out", id="batch-first-out-size"),
    pytest.param(True, "ids", id="batch-first-ids-size"),
    pytest.param(False, "ids", id="time-first"),
]


@pytest.mark.parametrize(("batch_first", "size_of"), INDEXING)
@pytest.mark.parametrize(("strategy", "options"), TEMPORAL)
def test_indexing_at_lengths_minus_one_is_recognised(batch_first, size_of, strategy, options):
    """Static mode is the original bit-exactly; with every decision off each sample's answer
    is the original's on its text alone and no padding step runs; at mixed thresholds a
    batch equals its samples run alone."""
    model = IndexesLastToken(batch_first, size_of).eval()
    ids, lengths = padded()
    dyn = dynify.convert(model, strategy, (ids[:1], lengths[:1]), options=options).eval()
    assert dyn.spec["plan"]["read_kind"] == "index"
    with torch.no_grad():
        with dyn.static():
            assert torch.equal(dyn(ids, lengths), model(ids, lengths))
        dyn.set_thresholds(1.01)
        out = dyn(ids, lengths)
        for i, n in enumerate(LENGTHS):
            alone = model(ids[i : i + 1, :n], lengths[i : i + 1])
            assert (out[i] - alone[0]).abs().max() <= 1e-5, (i, n)
        if strategy == "stop-reading":
            assert dyn.last_tokens.tolist() == [min(STEPS, -(-n // 4) * 4) for n in LENGTHS]
        else:
            assert dyn.last_decisions().sum(1).tolist() == LENGTHS
        dyn.set_thresholds(0.5)
        batch = dyn(ids, lengths)
        batch_macs = dyn.last_macs.clone()
        for i in range(len(LENGTHS)):
            one = dyn(ids[i : i + 1], lengths[i : i + 1])
            assert (batch[i] - one[0]).abs().max() <= 1e-5
            assert int(dyn.last_macs[0]) == int(batch_macs[i])
        # What is charged is what ran: FlopCounterMode counts the batch's MACs.
        for t in (0.5, 1.01):
            dyn.set_thresholds(t)
            with FlopCounterMode(display=False) as counter:
                dyn(ids, lengths)
            assert counter.get_total_flops() // 2 == int(dyn.last_macs.sum())


def test_indexing_with_another_row_order_is_not_a_read_of_the_last_token():
    """`out[torch.arange(1, B + 1) - 1, ...]` or a constant step are not recognised: such a
    model that takes lengths is refused with what to write."""

    class Shifted(IndexesLastToken):
        def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
            out, _ = self.rnn(self.emb(ids))
            return self.fc(out[torch.arange(1, ids.shape[0] + 1) - 1, lengths - 1])

    class Constant(IndexesLastToken):
        def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
            out, _ = self.rnn(self.emb(ids))
            return self.fc(out[torch.arange(ids.shape[0]), -1]) + 0.0 * lengths[:, None]

    ids, lengths = padded()
    for model in (Shifted(), Constant()):
        with pytest.raises(StrategyError, match=r"out\[torch.arange\(B\), lengths - 1\]"):
            dynify.convert(model, "skip-rnn", (ids[:1], lengths[:1]))


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "options"), TEMPORAL)
def test_indexing_read_exports_to_onnx(strategy, options, tmp_path):
    import numpy as np
    import onnxruntime as ort

    model = IndexesLastToken().eval()
    ids, lengths = padded()
    dyn = dynify.convert(model, strategy, (ids[:1], lengths[:1]), options=options).eval()
    path = dynify.export_onnx(dyn, tmp_path / "model.onnx", verify=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t in (0.0, 0.5, 1.01):
        thresholds = [t] * dyn.num_thresholds
        for xb, lb in ((ids[:1], lengths[:1]), (ids, lengths)):
            feed = {"x": xb.numpy(), "lengths": lb.numpy()}
            feed["thresholds"] = np.asarray(thresholds, np.float32)
            logits = session.run(None, feed)[0]
            dyn.set_thresholds(t)
            with torch.no_grad():
                eager = dyn(xb, lb)
            assert np.abs(logits - eager.numpy()).max() <= 1e-4, (t, len(xb))
