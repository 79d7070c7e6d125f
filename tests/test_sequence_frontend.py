"""The front end on sequence models: token-id inputs, recurrent layers found and counted,
and the errors a text classifier that dynify cannot step through gets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import dynify
from dynify.cli import app
from dynify.convert import read_model
from dynify.errors import InputError, StrategyError, TraceError
from dynify.frontend.recurrent import require_stepwise

VOCAB = 40


class LastToken(nn.Module):
    """A text classifier as users write them: the state at each sample's last real token."""

    def __init__(self, cell=nn.LSTM, layers=1, batch_first=True, bidirectional=False):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.rnn = cell(8, 12, num_layers=layers, batch_first=batch_first,
                        bidirectional=bidirectional)  # fmt: skip
        self.fc = nn.Linear(12 * (2 if bidirectional else 1), 3)

    def forward(self, ids):
        e = self.emb(ids)
        out, _ = self.rnn(e if self.batch_first else e.transpose(0, 1))
        out = out if self.batch_first else out.transpose(0, 1)
        lengths = (ids != 0).sum(1).clamp(min=1)
        return self.fc(out[torch.arange(ids.shape[0]), lengths - 1])


class FinalState(nn.Module):
    """Reads h_n only, through a small MLP (cut points after the LSTM)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = nn.LSTM(8, 12, batch_first=True)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, ids):
        _, (h, _) = self.rnn(self.emb(ids))
        return self.fc2(torch.relu(self.fc1(h[-1])))


class Packs(LastToken):
    def forward(self, ids):
        lengths = (ids != 0).sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.emb(ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.rnn(packed)
        return self.fc(h[-1])


class InitialState(LastToken):
    def forward(self, ids):
        h0 = torch.zeros(1, ids.shape[0], 12)
        out, _ = self.rnn(self.emb(ids), (h0, h0))
        return self.fc(out[:, -1])


def final_state() -> FinalState:
    """The CLI's import path for FinalState."""
    torch.manual_seed(0)
    return FinalState()


def ids(batch: int = 3, steps: int = 10) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnn_macs_equal_a_loop_of_cells(cls):
    """The fused layer is counted as the cell loop the temporal runtimes run (for LSTM the
    fused CPU kernel is unknown to FlopCounterMode; dynify registers its formula)."""
    rnn = cls(8, 12, num_layers=2)
    cell = {nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell, nn.RNN: nn.RNNCell}[cls]
    cells = [cell(8, 12), cell(12, 12)]
    x = torch.randn(7, 2, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as fused:
        rnn(x)
    with torch.no_grad(), FlopCounterMode(display=False) as loop:
        state = [torch.zeros(2, 12)] * 2
        for t in range(7):
            h = x[t]
            for i, c in enumerate(cells):
                out = c(h, (state[i], state[i]) if cls is nn.LSTM else state[i])
                h = state[i] = out[0] if cls is nn.LSTM else out
    assert fused.get_total_flops() == loop.get_total_flops() > 0


@pytest.mark.parametrize(
    ("kwargs", "kind", "step_macs"),
    [
        ({}, "lstm", 4 * 12 * (8 + 12)),
        ({"cell": nn.GRU, "layers": 2, "batch_first": False}, "gru", 3 * 12 * (20 + 24)),
    ],
)
def test_recurrent_layers_are_found_with_their_facts(kwargs, kind, step_macs):
    front = read_model(LastToken(**kwargs), ids(steps=10))
    (layer,) = front.context.analysis.recurrent
    assert (layer.kind, layer.steps, layer.step_macs) == (kind, 10, step_macs)
    assert layer.macs == 10 * step_macs  # the front end's count is steps x one step
    assert layer.batch_first == kwargs.get("batch_first", True)
    assert layer.reads_sequence and not layer.reads_state  # `out, _ = ...`
    node = front.context.node(layer.node)
    assert node.meta["recurrent"] == layer
    assert require_stepwise([layer], "skip-rnn") == [layer]


def test_final_state_reader_is_recorded():
    (layer,) = read_model(FinalState(), ids()).context.analysis.recurrent
    assert layer.reads_state and not layer.reads_sequence


def test_bidirectional_and_initial_state_cannot_be_stepped():
    (bi,) = read_model(LastToken(bidirectional=True), ids()).context.analysis.recurrent
    with pytest.raises(StrategyError, match="bidirectional=False"):
        require_stepwise([bi], "skip-rnn")
    (init,) = read_model(InitialState(), ids()).context.analysis.recurrent
    with pytest.raises(StrategyError, match="initial state"):
        require_stepwise([init], "stop-reading")
    with pytest.raises(StrategyError, match="none was found"):
        require_stepwise([], "skip-rnn")


def test_packing_inside_forward_says_what_to_do():
    with pytest.raises(TraceError, match="pack_padded_sequence.*lengths - 1"):
        read_model(Packs(), ids())


@pytest.mark.parametrize(
    ("example", "match"),
    [
        ((ids(), ids()), "padding mask holds 1"),
        ((ids(), ids(), ids()), "one tensor, or a padded sequence and its lengths"),
        ((ids(), ids().float()), "bool or an integer dtype"),
        ((ids(), torch.ones(4, dtype=torch.long)), "second input has shape"),
        (torch.arange(5), "batch dimension"),
        (ids().to(torch.int16), "not supported"),
    ],
)
def test_bad_example_inputs(example, match):
    with pytest.raises(InputError, match=match):
        read_model(FinalState(), example)


def test_token_id_model_converts_round_trips_and_refuses_floats(tmp_path):
    model = FinalState().eval()
    x = ids(4)
    dyn = dynify.convert(model, "early-exit", x, options={"exits": 1})
    assert dyn.spec["input_dtype"] == "int64" and dyn.input_dtype == torch.int64
    with dyn.static():
        assert torch.equal(dyn(x), model(x))
    path = dynify.save(dyn, tmp_path / "text.dyn")
    loaded = dynify.load(path, model=FinalState())
    assert loaded.input_dtype == torch.int64
    assert torch.equal(loaded(x), dyn(x))
    with pytest.raises(InputError, match="token ids as int64"):
        dyn(x.float())
    assert dyn.random_input(5).dtype == torch.int64
    assert int(dyn.random_input(50).max()) < VOCAB  # ids the embedding accepts


def test_convert_from_shape_and_dtype():
    dyn = dynify.convert(
        final_state(), "early-exit", input_shape=(1, 9), input_dtype="int64",
        options={"exits": 1},
    )  # fmt: skip
    assert dyn.input_shape == (9,) and dyn.input_dtype == torch.int64
    with pytest.raises(InputError, match="int64 for token ids"):
        dynify.convert(final_state(), "early-exit", input_shape=(1, 9), input_dtype="int8")
    with pytest.raises(InputError, match="batch first"):
        dynify.convert(final_state(), "early-exit", input_shape=(9,), input_dtype="int64")


def test_inspect_lists_recurrent_layers():
    summary = dynify.inspect(
        LastToken(bidirectional=True), input_shape=(1, 10), input_dtype="int64"
    )
    (layer,) = summary.recurrent
    assert (layer.kind, layer.steps, layer.num_layers) == ("lstm", 10, 1)
    assert summary.input_shape == (10,) and summary.input_dtype == "int64"
    assert any("bidirectional" in reason for reason in layer.blockers)


def test_cli_inspect_and_convert_a_token_model(tmp_path):
    runner = CliRunner()
    ref = "tests.test_sequence_frontend:final_state"
    shape = ["--input-shape", "1,9", "--input-dtype", "int64"]
    result = runner.invoke(app, ["inspect", ref, *shape])
    assert result.exit_code == 0, result.output
    assert "Recurrent layers (1)" in result.output and "int64 [9]" in result.output
    out = tmp_path / "t.dyn"
    result = runner.invoke(app, ["convert", ref, *shape, "--exits", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", ref, "--input-shape", "1,x"])
    assert result.exit_code == 2 and "whole numbers" in result.output
