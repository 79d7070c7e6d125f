"""skip-rnn: skipped steps run nothing, a batch equals its samples alone, static mode is the
original layer for LSTM and GRU either layout, the budget term trains the share of updates, and
the models it cannot convert get errors that say what to do. (The strategy contract is checked
in tests/test_contract.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynify
from dynify.errors import StrategyError, TraceError
from dynify.runtime.decisions import steps_to_next_update
from dynify.runtime.skip_rnn import SkipRNNModel
from tests.test_sequence_frontend import LastToken

VOCAB, STEPS = 40, 12


# Embedding, an LSTM or GRU in either layout, the output at the last real token, linear.
Reader = LastToken


class Packs(Reader):
    def forward(self, ids):
        lengths = (ids != 0).sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.emb(ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.rnn(packed)
        return self.fc(h[-1])


class TwoLayers(nn.Module):
    """Two separate recurrent layers, one after the other."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.first = nn.GRU(8, 12, batch_first=True)
        self.second = nn.LSTM(12, 12, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, ids):
        out, _ = self.first(self.emb(ids))
        out, _ = self.second(out)
        return self.fc(out[:, -1])


class NoRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def ids(batch: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (batch, STEPS), generator=g)
    x[1, 7:] = 0
    x[3, 2:] = 0
    return x


def convert(model: nn.Module, **options) -> SkipRNNModel:
    torch.manual_seed(0)
    return dynify.convert(model.eval(), "skip-rnn", ids()[:1], options=options).eval()


def fix_gate(dyn: SkipRNNModel, bias: float) -> None:
    """A gate that ignores the state: delta u = sigmoid(bias) for every sample."""
    with torch.no_grad():
        dyn.wrapper.gate.weight.zero_()
        dyn.wrapper.gate.bias.fill_(bias)


def random_gate(dyn: SkipRNNModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dyn.wrapper.gate.weight.copy_(torch.randn(1, 12, generator=g) * 4.0)
        dyn.wrapper.gate.bias.zero_()


def test_the_next_update_is_known_at_each_update():
    """u_{t+j} = min(j delta, 1) > 1 - threshold: delta 0.5 at threshold 0.5 updates every
    other step, threshold 0 never again, above 1 every step; NaN delta updates next."""
    delta = torch.tensor([0.5, 0.26, 1.0, 0.0])
    assert steps_to_next_update(delta, 0.5, 20).tolist() == [2, 2, 1, 21]
    assert steps_to_next_update(delta, 0.8, 20).tolist() == [1, 1, 1, 21]
    assert steps_to_next_update(delta, 0.0, 20).tolist() == [21] * 4
    assert steps_to_next_update(delta, 1.01, 20).tolist() == [1] * 4
    assert steps_to_next_update(torch.tensor([1e-30]), 0.5, 20).tolist() == [21]


def test_the_python_float_schedule_equals_the_tensor_rule_ties_included():
    """The eager loop's schedule in doubles equals the float32 tensor rule: on random logits,
    and on logits whose ratio boundary / delta lands on a whole number (the tie fallback)."""
    from dynify.runtime.decisions import (
        steps_to_next_update_one,
        update_boundary,
        update_probability,
    )

    g = torch.Generator().manual_seed(0)
    ties = torch.logit(torch.tensor([0.5, 0.25, 0.125, 0.1]))  # 0.5 / delta = 1, 2, 4, 5
    for threshold in (0.05, 0.3, 0.5, 0.77, 1.0):
        logits = torch.cat([torch.randn(200, generator=g) * 4, ties, torch.tensor([-1e4, 1e4])])
        logits = logits.float()
        expected = steps_to_next_update(update_probability(logits), threshold, STEPS).tolist()
        boundary = float(update_boundary(threshold))
        got = steps_to_next_update_one(
            logits.tolist(),
            boundary,
            STEPS,
            lambda x=logits, t=threshold: steps_to_next_update(
                update_probability(x), t, STEPS
            ).tolist(),
        )
        assert got == expected, threshold


def test_skipped_steps_run_neither_the_cell_nor_the_input_projection():
    """delta u = 0.5 at threshold 0.5: updates at steps 0, 2, 4, ...; FlopCounterMode counts
    exactly those steps' cell matmuls (input and hidden projections) plus the gate's."""
    model = Reader()
    dyn = convert(model)
    fix_gate(dyn, 0.0)
    x = ids().clamp(min=1)  # no padding: every step is a real token (padding: test_sequence_inputs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dyn(x)
    expected = torch.tensor([[1, 0] * (STEPS // 2)] * len(x))
    assert torch.equal(dyn.last_decisions(), expected)
    w = dyn.wrapper
    updates = STEPS // 2
    assert w.step_macs == 4 * 12 * (8 + 12)
    assert dyn.last_macs.tolist() == [dyn.fixed_macs + updates * (w.step_macs + 12)] * len(x)
    assert counter.get_total_flops() // 2 == int(dyn.last_macs.sum())
    mm = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # 2 projections per update, 1 gate per update (the last step needs none), the classifier
    calls = {"count": 0}

    def count(module, args):
        calls["count"] += 1

    hook = dyn.wrapper.gate.register_forward_pre_hook(count)
    with torch.no_grad():
        dyn(x)
    hook.remove()
    assert calls["count"] == updates  # once per update step, for the samples updating
    assert mm  # the matmuls were counted


def test_a_skipped_step_copies_the_state_into_the_output_read_at_the_last_token():
    """The classifier reads the output at each text's last real token; at a skipped step that
    output is the state of the last update: logits = fc(h at the last update <= last token)."""
    model = Reader()
    dyn = convert(model)
    random_gate(dyn)
    dyn.set_thresholds(0.6)
    x = ids()
    with torch.no_grad():
        logits = dyn(x)
        updates = dyn.last_decisions()
        assert 0 < int(updates.sum()) < updates.numel()
        emb = model.emb(x)
        w = dyn.wrapper
        lengths = (x != 0).sum(1).clamp(min=1)
        for i in range(len(x)):
            h = torch.zeros(1, 12)
            c = torch.zeros(1, 12)
            rnn = w.rnn
            for t in range(int(lengths[i])):
                if updates[i, t]:
                    h, c = torch.lstm_cell(
                        emb[i, t : t + 1],
                        (h, c),
                        rnn.weight_ih_l0,
                        rnn.weight_hh_l0,
                        rnn.bias_ih_l0,
                        rnn.bias_hh_l0,
                    )
            assert (model.fc(h)[0] - logits[i]).abs().max() < 1e-5


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_static_mode_is_the_original_layer_exactly(cell, batch_first, layers):
    model = Reader(cell, layers, batch_first)
    dyn = convert(model)
    random_gate(dyn)
    x = ids()
    with torch.no_grad():
        expected = model(x)
        with dyn.static():
            assert torch.equal(dyn(x), expected)
            assert torch.equal(dyn(x[:1]), model(x[:1]))
        dyn.set_thresholds(1.01)  # every step updates: the fused kernel, exactly
        assert torch.equal(dyn(x), expected)
        real = x != 0  # every real token updates; padding steps never run
        assert torch.equal(dyn.last_decisions().bool(), real)
        full = real.all(1)
        assert dyn.last_macs[full].tolist() == [dyn.static_macs] * int(full.sum())
        assert (dyn.last_macs[~full] < dyn.static_macs).all()
        dyn.set_thresholds(0.3)
        dynamic = dyn(x)
    assert not dyn.last_decisions().all()
    assert not torch.allclose(dynamic, expected)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_a_batch_equals_its_samples_alone(cell, batch_first, layers):
    model = Reader(cell, layers, batch_first)
    dyn = convert(model)
    random_gate(dyn)
    x = ids(8)
    for threshold in (0.2, 0.4, 0.7):
        dyn.set_thresholds(threshold)
        with torch.no_grad():
            out = dyn(x)
            decisions, macs = dyn.last_decisions().clone(), dyn.last_macs.clone()
            alone = [dyn(x[i : i + 1]) for i in range(len(x))]
            each = [dyn.last_decisions()]
        alone_decisions, alone_macs = [], []
        with torch.no_grad():
            for i in range(len(x)):
                dyn(x[i : i + 1])
                alone_decisions.append(dyn.last_decisions())
                alone_macs.append(dyn.last_macs)
        assert each
        assert (out - torch.cat(alone)).abs().max() <= 1e-5
        assert torch.equal(decisions, torch.cat(alone_decisions))
        assert torch.equal(macs, torch.cat(alone_macs))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            dyn(x)
        assert counter.get_total_flops() // 2 == int(macs.sum())


def test_the_export_face_decides_like_the_eager_model_for_a_gru_in_time_major_layout():
    model = Reader(nn.GRU, 2, batch_first=False)
    dyn = convert(model)
    random_gate(dyn)
    face = dyn.export_face().eval()
    x = ids(8)
    for threshold in (0.0, 0.4, 0.7, 1.01):
        dyn.set_thresholds(threshold)
        with torch.no_grad():
            logits, decisions = face(x, torch.tensor([threshold]))
            eager = dyn(x)
        assert (logits - eager).abs().max() <= 1e-6
        assert torch.equal(decisions, dyn.last_decisions())


def test_the_budget_term_trains_the_share_of_updates_towards_the_budget():
    """A toy task (the label is whether token 5 occurs): from updating every step, training
    the gate (and the model) with the budget term brings the share of updates near 0.5."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(6, VOCAB, (256, STEPS), generator=g)
    labels = (torch.rand(256, generator=g) < 0.5).long()
    x[labels == 1, 3] = 5
    model = Reader()
    dyn = convert(model, budget=0.5)
    dyn.train()
    with torch.no_grad():
        dyn(x)
    assert dyn.update_share() == 1.0
    optimizer = torch.optim.Adam(dyn.wrapper.gate.parameters(), lr=0.02)
    shares = []
    for step in range(120):
        batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss, metrics = dyn.training_loss(x[batch], labels=labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        shares.append(metrics["update_share"])
    dyn.eval()
    with torch.no_grad():
        dyn(x)
    assert abs(dyn.update_share() - 0.5) < 0.12, shares
    assert dyn.mean_macs_fraction() < 0.7


def test_finetune_and_calibrate_through_the_public_api():
    """`dynify.finetune` trains the gate; `dynify.calibrate` sets the threshold to a MAC budget."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(6, VOCAB, (320, STEPS), generator=g)
    labels = torch.randint(0, 3, (320,), generator=g)
    x[labels == 1, 2] = 5
    x[labels == 2, 2] = 4
    data = dynify.TextDataset(x, labels)
    torch.manual_seed(0)
    model = Reader()
    dynify.finetune_static(
        model, data, epochs=2, optimizer="adam", lr=0.01, label_weight=1.0, batch_size=32
    )
    dyn = dynify.convert(model.eval(), "skip-rnn", x[:1], options={"budget": 0.5})
    before = dyn.wrapper.gate.bias.detach().clone()
    run = dynify.finetune(dyn, data, epochs=2, batch_size=32, progress=False)
    assert 0.0 < run.history[-1]["update_share"] <= 1.0
    assert float(dyn.wrapper.gate.bias.detach()) < float(
        before
    )  # the budget term pushed the gate down
    result = dynify.calibrate(dyn, run.calibration_data, budget=0.6)
    assert result.macs_fraction <= 0.6
    with torch.no_grad():
        dyn(x[:64])
    assert dyn.update_share() < 0.7


def test_errors_say_what_to_do():
    with pytest.raises(StrategyError, match="bidirectional=False"):
        convert(Reader(bidirectional=True))
    with pytest.raises(StrategyError, match="none was found"):
        convert(NoRNN())
    with pytest.raises(StrategyError, match="`layer` option"):
        convert(TwoLayers())
    with pytest.raises((StrategyError, TraceError), match="pack"):
        convert(Packs())
    dyn = convert(TwoLayers(), layer="second")
    assert dyn.layer == "second"
    with pytest.raises(StrategyError, match="not a recurrent layer"):
        convert(TwoLayers(), layer="fc")
    with pytest.raises(StrategyError, match="nn.LSTM and nn.GRU"):
        convert(Reader(nn.RNN))
    with pytest.raises(StrategyError, match="budget"):
        convert(Reader(), budget=1.5)
