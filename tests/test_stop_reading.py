"""stop-reading: exit heads on an RNN's state every k tokens; the RNN runs stretch by stretch.

Static mode is the original fused call; after a sample stops (an exit, or the end of its text)
no step of it runs; a batch equals its samples alone; short and padded texts read only what
they have; calibration simulates the cost each sample really pays."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

import dynify
from dynify.errors import StrategyError
from dynify.models.text import TextClassifier
from dynify.runtime.decisions import NEVER
from tests.test_contract import spread_new_parts

VOCAB, CLASSES, T = 30, 3, 10


def classifier(cell: str = "lstm", batch_first: bool = True, layers: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = TextClassifier(
        VOCAB,
        CLASSES,
        embed_dim=6,
        hidden=8,
        layers=layers,
        cell=cell,
        batch_first=batch_first,
        dropout=0.0,
    ).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(8.0)
    return model


def texts(lengths: list[int]) -> Tensor:
    """Token ids [N, T], row i a text of lengths[i] tokens padded with 0."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    return ids


LENGTHS = [10, 2, 7, 0, 4, 9, 10, 5]


def convert(model: nn.Module, every: int = 4, **options) -> dynify.DynamicModel:
    dyn = dynify.convert(model, "stop-reading", texts([T]), options={"every": every, **options})
    spread_new_parts(dyn.eval(), model)
    return dyn


class StepCounter(TorchFunctionMode):
    """Within it, records (batch, steps) of every fused RNN kernel call (`torch.lstm` /
    `torch.gru`: the module's own call and the step runtime's stretches alike)."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.calls: list[tuple[int, int]] = []
        self.batch_first = rnn.batch_first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.lstm, torch.gru):
            x = args[0]
            batch_steps = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
            self.calls.append(batch_steps)
        return func(*args, **(kwargs or {}))

    def sample_steps(self) -> int:
        return sum(b * s for b, s in self.calls)


CELLS = [("lstm", True, 1), ("lstm", False, 1), ("gru", True, 1), ("gru", False, 2)]


@pytest.mark.parametrize("cell,batch_first,layers", CELLS)
def test_static_mode_is_the_original_fused_call_bit_exact(cell, batch_first, layers):
    model = classifier(cell, batch_first, layers)
    dyn = convert(model)
    x = texts(LENGTHS)
    with torch.no_grad():
        expected = [model(xb) for xb in (x, x[:1])]
    with torch.no_grad(), dyn.static(), StepCounter(dyn.rnn) as counter:
        for xb, want in zip((x, x[:1]), expected, strict=True):
            assert torch.equal(dyn(xb), want)
    assert counter.calls == [(len(x), T), (1, T)]  # one fused call over every step


@pytest.mark.parametrize("cell,batch_first,layers", CELLS)
def test_reading_to_the_end_gives_the_static_answer_from_fewer_steps(cell, batch_first, layers):
    """At thresholds no exit reaches, every text is read to its own end (rounded up to a
    stretch), and the original classifier answers as the static model does."""
    model = classifier(cell, batch_first, layers)
    dyn = convert(model)
    dyn.set_thresholds(NEVER)
    x = texts(LENGTHS)
    with torch.no_grad():
        expected = model(x)
        with StepCounter(dyn.rnn) as counter:
            out = dyn(x)
    assert (out - expected).abs().max() <= 1e-5
    read = [min(T, -(-max(n, 1) // 4) * 4) for n in LENGTHS]
    assert dyn.last_tokens.tolist() == read
    assert dyn.last_decisions().tolist() == [dyn.num_exits] * len(x)
    assert counter.sample_steps() == sum(read)  # the padding after a text's stretch never ran


def test_steps_after_an_exit_are_not_computed():
    dyn = convert(classifier(), every=3)
    x = texts(LENGTHS)
    dyn.set_thresholds(0.0)  # everyone leaves at the first exit
    with torch.no_grad(), FlopCounterMode(display=False) as flops, StepCounter(dyn.rnn) as counter:
        dyn(x)
    assert counter.calls == [(len(x), 3)]
    # texts of 3 tokens or fewer have finished reading: the original classifier answers
    assert dyn.last_decisions().tolist() == [0 if n > 3 else 3 for n in LENGTHS]
    assert flops.get_total_flops() // 2 == int(dyn.last_macs.sum())
    # exit 1 forced: the second stretch runs only on the texts longer than 3 tokens
    dyn.set_thresholds([NEVER, 0.0, 0.0])
    with torch.no_grad(), StepCounter(dyn.rnn) as counter:
        dyn(x)
    longer = sum(1 for n in LENGTHS if n > 3)
    assert counter.calls == [(len(x), 3), (longer, 3)]
    assert dyn.last_tokens.tolist() == [6 if n > 3 else 3 for n in LENGTHS]


@pytest.mark.parametrize("cell,batch_first,layers", CELLS)
def test_a_batch_equals_its_samples_alone_and_macs_are_what_ran(cell, batch_first, layers):
    dyn = convert(classifier(cell, batch_first, layers), every=2)
    x = texts(LENGTHS)
    with torch.no_grad():
        scores = [torch.softmax(lg, -1).max(-1).values for lg in dyn.exit_logits(x)[:-1]]
    dyn.set_thresholds(float(torch.cat(scores).median()))
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        out = dyn(x)
    decisions, macs = dyn.last_decisions().clone(), dyn.last_macs.clone()
    assert len(set(decisions.tolist())) >= 2
    assert flops.get_total_flops() // 2 == int(macs.sum())
    for i in range(len(x)):
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            alone = dyn(x[i : i + 1])
        assert (alone - out[i : i + 1]).abs().max() <= 1e-5
        assert int(dyn.last_decisions()[0]) == int(decisions[i])
        assert int(dyn.last_macs[0]) == int(macs[i]) == flops.get_total_flops() // 2


def test_a_text_shorter_than_a_stretch_and_an_empty_text_read_one_stretch():
    model = classifier()
    dyn = convert(model, every=4)
    dyn.set_thresholds(NEVER)
    x = texts([2, 0])
    with torch.no_grad():
        out = dyn(x)
        expected = model(x)
    assert (out - expected).abs().max() <= 1e-6
    assert dyn.last_tokens.tolist() == [4, 4]
    costs, open_exits = dyn.sample_exit_costs(x)
    assert dyn.last_macs.tolist() == costs[-1].tolist()
    assert not open_exits.any()  # both have finished reading before the first exit
    assert int(costs[-1, 0]) < dyn.exit_macs()[-1]


def test_a_model_that_reads_the_final_state_reads_every_token():
    class LastState(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, 6)
            self.rnn = nn.GRU(6, 8, batch_first=True)
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, ids: Tensor) -> Tensor:
            _, h = self.rnn(self.embedding(ids))
            return self.fc(h[-1])

    torch.manual_seed(0)
    model = LastState().eval()
    dyn = convert(model, every=3)
    assert dyn.spec["plan"]["read_position"] is None
    dyn.set_thresholds(NEVER)
    x = texts(LENGTHS)
    with torch.no_grad():
        out = dyn(x)
        with dyn.static():
            assert torch.equal(dyn(x), model(x))
    assert (out - model(x)).abs().max() <= 1e-5
    assert dyn.last_tokens.tolist() == [T] * len(x)


def test_calibration_simulates_the_cost_each_sample_pays():
    """The threshold search's simulation, on per-sample costs, predicts the MACs and accuracy
    the model then spends at the chosen thresholds, on texts of very different lengths."""
    from dynify.train.exit_outputs import collect_outputs
    from dynify.train.threshold_search import simulate

    dyn = convert(classifier(), every=2)
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, T + 1, (64,), generator=g).tolist()
    x, y = texts(lengths), torch.randint(0, CLASSES, (64,), generator=g)
    data = dynify.TextDataset(x, y)
    outputs = collect_outputs(dyn, data, batch_size=16)
    assert outputs.sample_macs is not None
    assert len(set(outputs.sample_macs[-1].tolist())) > 2  # final costs differ by length
    result = dynify.calibrate(dyn, data, budget=0.5, part="all")
    with torch.no_grad():
        preds = dyn(x).argmax(-1)
    measured = float(dyn.last_macs.double().mean()) / dyn.static_macs
    acc, macs, exits = simulate(dyn, outputs)
    assert macs == pytest.approx(measured, abs=1e-9)
    assert result.macs_fraction == pytest.approx(measured, abs=1e-9)
    assert torch.equal(exits, dyn.last_decisions())
    assert acc == pytest.approx(float((preds == y).double().mean()))
    # the flat per-exit costs would have charged every short text for a full read
    flat = outputs.cost_fractions()[exits].mean()
    assert float(flat) > measured


def test_finetune_trains_the_heads_and_leaves_the_static_network():
    model = classifier()
    dyn = convert(model, every=3)
    x = texts(LENGTHS * 4)
    y = torch.randint(0, CLASSES, (len(x),), generator=torch.Generator().manual_seed(0))
    heads = [p.clone() for p in dyn.heads.parameters()]
    data = dynify.TextDataset(x, y)
    dynify.finetune(dyn, data, epochs=1, batch_size=8, progress=False, calibration_fraction=0.0)
    assert any(not torch.equal(a, b) for a, b in zip(heads, dyn.heads.parameters(), strict=True))
    with torch.no_grad(), dyn.static():
        assert torch.equal(dyn.eval()(x), model(x))


def test_the_export_face_decides_like_the_model():
    dyn = convert(classifier("gru", False), every=3)
    x = texts(LENGTHS)
    face = dyn.export_face().eval()
    for thresholds in ([0.0] * 3, [NEVER, 0.0, 0.0], [NEVER] * 3, [0.6] * 3):
        dyn.set_thresholds(thresholds)
        with torch.no_grad():
            logits, decisions = face(x, torch.tensor(thresholds))
            eager = dyn(x)
        assert (logits - eager).abs().max() <= 1e-6
        assert torch.equal(decisions, dyn.last_decisions())


class TwoLayers(nn.Module):
    def __init__(self, bidirectional: bool = False, cell: type = nn.LSTM, twice: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 6)
        self.rnn = cell(6, 8, batch_first=True, bidirectional=bidirectional)
        self.again = nn.LSTM(8 * (1 + bidirectional), 8, batch_first=True) if twice else None
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        out, _ = self.rnn(self.embedding(ids))
        if self.again is not None:
            out, _ = self.again(out)
        return self.fc(out[:, -1, :8])


@pytest.mark.parametrize(
    "model,options,message",
    [
        (TwoLayers(bidirectional=True), {}, "bidirectional"),
        (TwoLayers(twice=True), {}, "one recurrent layer"),
        (TwoLayers(cell=nn.RNN), {}, "nn.RNN"),
        (TwoLayers(), {"every": T}, "every=10 leaves no exit"),
        (TwoLayers(), {"every": 0}, "every must be"),
        (TwoLayers(), {"hop": 2}, "Unknown stop-reading option"),
        (TwoLayers(), {"jump": -1}, "jump must be"),
        (
            nn.Sequential(nn.Embedding(VOCAB, 4), nn.Flatten(), nn.Linear(4 * T, 3)),
            {},
            "needs a recurrent layer",
        ),
    ],
)
def test_errors_say_what_to_do(model, options, message):
    with pytest.raises(StrategyError, match=message):
        dynify.convert(model.eval(), "stop-reading", texts([T]), options=options)


def test_the_benchmark_suite_runs_end_to_end_on_text_files(tmp_path):
    import json

    from benchmarks import SUITES, stop_reading
    from benchmarks.__main__ import main
    from tests.test_text_baseline import write_split

    assert SUITES["stop_reading"].module() is stop_reading
    root = tmp_path / "data"
    write_split(root / "text/agnews/train.tsv", 240, 0)
    write_split(root / "text/agnews/test.tsv", 40, 1)
    results = tmp_path / "results"
    argv = ["stop_reading", "--quick", "--data", str(root), "--datasets", "agnews"]
    main([*argv, "--results", str(results), "--cache", str(tmp_path / "cache")])
    payload = json.loads((results / "stop_reading.json").read_text())
    r = payload["data"]["datasets"]["agnews"]
    assert payload["metadata"]["command"].startswith("python -m benchmarks stop_reading --quick")
    assert r["read_to_end"]["accuracy"] == pytest.approx(r["static_test_acc"])
    for key in ("calibrated", "shared", "read_to_end"):
        assert 0.0 < r[key]["tokens_of_static"] <= 1.0
        assert sum(r[key]["exit_histogram"]) == r["test_rows"] == 40
    assert r["timing"]["static_ms"] > 0 and r["timing"]["cpu_ratio"] > 0
    # with a jump head the jump threshold comes from dynify.calibrate, with its grid
    main(
        [
            *argv,
            "--jump",
            "1",
            "--results",
            str(tmp_path / "jump"),
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    r = json.loads((tmp_path / "jump" / "stop_reading.json").read_text())["data"]["datasets"][
        "agnews"
    ]
    from dynify.runtime.stop_reading import JUMP_GRID

    assert r["jump_threshold"] in JUMP_GRID
    assert [row["jump_threshold"] for row in r["jump_grid"]] == list(JUMP_GRID)


def test_a_float_sequence_model_reads_with_its_rnn_directly():
    """No encoder before the RNN (the input is the sequence) and a tail reading the last step."""

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(5, 8, num_layers=2)  # time first
            self.fc = nn.Linear(8, CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            out, _ = self.rnn(x.transpose(0, 1))
            return self.fc(out[-1])

    torch.manual_seed(0)
    model = Features().eval()
    x = torch.randn(6, T, 5)
    dyn = dynify.convert(model, "stop-reading", x[:1], options={"every": 4}).eval()
    with torch.no_grad():
        with dyn.static():
            assert torch.equal(dyn(x), model(x))
        dyn.set_thresholds(NEVER)
        assert (dyn(x) - model(x)).abs().max() <= 1e-5
        assert dyn.last_tokens.tolist() == [T] * len(x)
        dyn.set_thresholds(0.0)
        dyn(x)
        assert dyn.last_tokens.tolist() == [4] * len(x)


# --- the jump head ----------------------------------------------------------------------------
def jump_model(jump: int = 1, cell: str = "lstm", batch_first: bool = True) -> dynify.DynamicModel:
    """every=2 over T=10 tokens: 5 stretches, 4 exits, 4 jump heads with random weights."""
    return convert(classifier(cell, batch_first), every=2, jump=jump)


def test_no_jump_head_by_default_and_a_jump_model_keeps_the_static_call():
    model = classifier()
    assert not hasattr(convert(model), "jump_heads")
    dyn = jump_model()
    assert len(dyn.jump_heads) == dyn.num_exits == 4
    x = texts(LENGTHS)
    with torch.no_grad(), dyn.static():
        assert torch.equal(dyn(x), model(x))


@pytest.mark.parametrize("cell,batch_first", [("lstm", True), ("gru", False)])
def test_jumped_stretches_are_not_run_and_macs_are_what_ran(cell, batch_first):
    dyn = jump_model(1, cell, batch_first)
    dyn.set_thresholds(NEVER)  # no exit: only jumps save work
    x = texts(LENGTHS)
    with torch.no_grad():
        dyn.set_jump_threshold(2.0)  # never jump: every text read to its end
        everything = dyn(x).clone()
        read_all = dyn.last_tokens.clone()
        dyn.set_jump_threshold(0.0)  # always jump one stretch after reading one
        with FlopCounterMode(display=False) as flops, StepCounter(dyn.rnn) as counter:
            out = dyn(x)
    assert (everything - classifier(cell, batch_first)(x)).abs().max() <= 1e-5
    assert counter.sample_steps() == int(dyn.last_tokens.sum()) < int(read_all.sum())
    # stretches 0, 2, 4 (tokens 0-1, 4-5, 8-9) of a text that reaches them
    expected = [sum(2 for s in (0, 4, 8) if s < max(n, 1)) for n in LENGTHS]
    assert dyn.last_tokens.tolist() == expected
    assert flops.get_total_flops() // 2 == int(dyn.last_macs.sum())
    assert not torch.allclose(out, everything)


def test_a_jump_batch_equals_its_samples_alone_and_calibration_costs_match():
    dyn = jump_model(2)
    x = texts(LENGTHS)
    with torch.no_grad():
        scores = [torch.softmax(lg, -1).max(-1).values for lg in dyn.exit_logits(x)[:-1]]
        dyn.set_thresholds(float(torch.cat(scores).quantile(0.9)))
        out = dyn(x)
        decisions, macs = dyn.last_decisions().clone(), dyn.last_macs.clone()
        tokens = dyn.last_tokens.clone()
        costs, open_exits = dyn.sample_exit_costs(x)
    assert len(set(tokens.tolist())) >= 3 and len(set(decisions.tolist())) >= 2
    # what calibration sees (jumps replayed without exits) is what the forward spends
    assert macs.tolist() == costs.gather(0, decisions[None])[0].tolist()
    early = decisions < dyn.num_exits
    assert bool(open_exits[decisions[early], early.nonzero()[:, 0]].all())
    for i in range(len(x)):
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            alone = dyn(x[i : i + 1])
        assert (alone - out[i : i + 1]).abs().max() <= 1e-5
        assert int(dyn.last_decisions()[0]) == int(decisions[i])
        assert int(dyn.last_tokens[0]) == int(tokens[i])
        assert int(dyn.last_macs[0]) == int(macs[i]) == flops.get_total_flops() // 2


def test_a_jump_model_exports_and_round_trips(tmp_path):
    dyn = jump_model(1)
    x = texts(LENGTHS)
    dyn.set_thresholds(0.6)
    dyn.set_jump_threshold(0.5)
    with torch.no_grad():
        out = dyn(x)
        decisions = dyn.last_decisions().clone()
        logits, exits = dyn.export_face()(x)
    assert torch.allclose(logits, out, atol=1e-5) and torch.equal(exits, decisions)
    path = tmp_path / "jump.dyn"
    dynify.save(dyn, path)
    again = dynify.load(path)
    assert float(again.jump_threshold) == 0.5
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_the_export_face_does_not_run_a_jumped_stretch():
    """Exits off: the face always jumping (jump threshold 0) runs fewer RNN steps than never
    jumping (above 1), counted by FlopCounterMode, with the eager model's answers."""
    from torch.utils.flop_counter import FlopCounterMode

    dyn = jump_model(1)
    x = texts(LENGTHS)
    dyn.set_thresholds(1.01)
    spent = {}
    for jump_threshold in (0.0, 1.01):
        dyn.set_jump_threshold(jump_threshold)
        with torch.no_grad():
            out = dyn(x)
            with FlopCounterMode(display=False) as counter:
                logits, _ = dyn.export_face()(x)
        assert torch.allclose(logits, out, atol=1e-5)
        spent[jump_threshold] = counter.get_total_flops()
    assert spent[0.0] < spent[1.01]


def test_jump_training_is_straight_through_with_a_budget_on_tokens_read():
    dyn = jump_model(1).train()
    x = texts(LENGTHS)
    loss, metrics = dyn.training_loss(x)
    loss.backward()
    assert 0.0 < metrics["token_share"] <= 1.0 and "compute_price" in metrics
    grads = [p.grad for p in dyn.jump_heads.parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_jump_options_are_checked():
    with pytest.raises(StrategyError, match="no jump head"):
        convert(classifier()).set_jump_threshold(0.5)
    with pytest.raises(StrategyError, match="budget is the share of its own tokens a text reads"):
        convert(classifier(), budget=0.0)


# --- calibration chooses the jump threshold ---------------------------------------------------
def calibration_texts(n: int = 160, seed: int = 7) -> tuple[Tensor, Tensor]:
    """Texts of every length with labels the static model mostly agrees with."""
    g = torch.Generator().manual_seed(seed)
    x = texts(torch.randint(1, T + 1, (n,), generator=g).tolist())
    with torch.no_grad():
        y = classifier()(x).argmax(-1)
    noisy = torch.rand(n, generator=g) < 0.1
    return x, torch.where(noisy, torch.randint(0, CLASSES, (n,), generator=g), y)


@pytest.mark.parametrize("target", [{"budget": 0.45}, {"max_drop": 0.05}])
def test_calibrate_chooses_the_jump_threshold_from_its_grid(tmp_path, target):
    """With a jump head, the thresholds are searched at every jump threshold of the grid and
    the setting that best meets the target is kept: it is on the model (and in its artifact),
    and what the model then spends on the data is what calibration promised."""
    from dynify.runtime.stop_reading import JUMP_GRID

    dyn = jump_model(1)
    x, y = calibration_texts()
    result = dynify.calibrate(dyn, dynify.TextDataset(x, y), part="all", **target)
    chosen = result.scalars["jump_threshold"]
    assert chosen in JUMP_GRID and float(dyn.jump_threshold) == pytest.approx(chosen)
    rows = result.scalar_grid
    assert [r["jump_threshold"] for r in rows] == list(JUMP_GRID)
    met = [r for r in rows if r["met"]]
    with torch.no_grad():
        preds = dyn(x).argmax(-1)
    measured = float(dyn.last_macs.double().mean()) / dyn.static_macs
    assert result.macs_fraction == pytest.approx(measured, abs=1e-9)
    assert result.accuracy == pytest.approx(float((preds == y).double().mean()))
    if "budget" in target:  # the most accurate setting within the budget
        assert measured <= target["budget"] + 1e-9
        assert result.accuracy == max(r["accuracy"] for r in met)
    else:  # the cheapest setting within the drop
        assert result.accuracy >= result.static_accuracy - target["max_drop"] - 1e-12
        assert result.macs_fraction == min(r["macs"] for r in met)
    assert len({round(r["macs"], 6) for r in met}) > 1  # the jump threshold changes the cost
    with torch.no_grad(), dyn.static():  # the drop is judged against the static network
        static_acc = float((dyn(x).argmax(-1) == y).double().mean())
    assert result.static_accuracy == pytest.approx(static_acc)
    path = tmp_path / "calibrated.dyn"
    dynify.save(dyn, path)
    again = dynify.load(path)
    assert float(again.jump_threshold) == pytest.approx(chosen)
    assert again.spec["calibration"]["scalars"] == {"jump_threshold": chosen}
    with torch.no_grad():
        assert torch.equal(again(x), dyn(x))
        logits, _ = again.export_face()(x)  # the face holds the chosen value too
    assert torch.allclose(logits, dyn(x), atol=1e-5)


def test_a_model_without_a_jump_head_calibrates_as_before():
    """No jump head: no grid, and the thresholds are those of one threshold search."""
    from dynify.train.exit_outputs import collect_outputs
    from dynify.train.threshold_search import search_thresholds

    dyn = convert(classifier(), every=2)
    x, y = calibration_texts()
    data = dynify.TextDataset(x, y)
    expected = search_thresholds(dyn, collect_outputs(dyn, data)).choose(budget=0.45)
    result = dynify.calibrate(dyn, data, budget=0.45, part="all")
    assert result.thresholds == expected.thresholds
    assert result.scalars == {} and result.scalar_grid == []
    assert dyn.thresholds.tolist() == pytest.approx(expected.thresholds, abs=1e-6)


def test_calibrating_outputs_keeps_the_jump_threshold_held():
    """Exit logits collected at one jump threshold say nothing of another: it stays."""
    from dynify.train.exit_outputs import collect_outputs

    dyn = jump_model(1)
    dyn.set_jump_threshold(0.3)
    x, y = calibration_texts()
    result = dynify.calibrate(dyn, collect_outputs(dyn, dynify.TextDataset(x, y)), budget=0.6)
    assert result.scalars == {"jump_threshold": 0.3} and result.scalar_grid == []
    assert float(dyn.jump_threshold) == pytest.approx(0.3)


@pytest.mark.parametrize("jump", [0, 1])
def test_the_export_face_runs_the_classifier_only_for_texts_that_end(jump):
    """Each text passes the original classifier at most once in the face, and only if it
    answers there: a stage where a text reads on (or leaves at a head) does not run it."""
    dyn = convert(classifier(), every=2, jump=jump)
    x = texts(LENGTHS * 2)
    with torch.no_grad():
        scores = [torch.softmax(lg, -1).max(-1).values for lg in dyn.exit_logits(x)[:-1]]
        dyn.set_thresholds(float(torch.cat(scores).quantile(0.8)))
    rows: list[int] = []
    hook = dyn.tail.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    try:
        with torch.no_grad():
            logits, decisions = dyn.export_face()(x)
    finally:
        hook.remove()
    with torch.no_grad():
        assert torch.allclose(logits, dyn(x), atol=1e-5)
    assert torch.equal(decisions, dyn.last_decisions())
    answered = int((decisions == dyn.num_exits).sum())
    assert 0 < answered < len(x) and sum(rows) == answered


def test_dynify_calibrate_says_which_jump_threshold_it_chose(tmp_path):
    """The command line gets the jump threshold's calibration from the API: it prints the value
    chosen, and the artifact it writes holds it."""
    from typer.testing import CliRunner

    from dynify.cli import app

    words = [f"w{i}" for i in range(VOCAB - 2)]
    vocab = dynify.Vocabulary(["<pad>", "<unk>", *words])
    x, y = calibration_texts()
    lines = [
        " ".join(vocab.decode(row)) + f"\t{int(label)}" for row, label in zip(x, y, strict=True)
    ]
    data = tmp_path / "held_out.tsv"
    data.write_text("text\tlabel\n" + "\n".join(line for line in lines if line[0] != "\t"))
    vocab.save(tmp_path / "vocab.json")
    artifact = tmp_path / "jump.dyn"
    dynify.save(jump_model(1), artifact)
    out = tmp_path / "calibrated.dyn"
    args = [
        "calibrate",
        str(artifact),
        "--data",
        str(data),
        "--vocab",
        str(tmp_path / "vocab.json"),
    ]
    result = CliRunner().invoke(app, [*args, "--budget", "0.45", "--out", str(out)])
    assert result.exit_code == 0, result.output
    chosen = float(dynify.load(out).jump_threshold)
    assert f"Jump threshold: {chosen:.3f} (chosen from 11 values)" in result.output


def test_with_jumps_the_static_reference_is_the_static_network():
    """Always jumping, the final exit reads half of each text: calibration and evaluation still
    measure the drop against the static network, labelled or not."""
    from torch.utils.data import TensorDataset

    from dynify.train.exit_outputs import collect_outputs

    dyn = jump_model(1)
    dyn.set_jump_threshold(0.0)
    x, y = calibration_texts()
    with torch.no_grad(), dyn.static():
        static_pred = dyn(x).argmax(-1)
    outputs = collect_outputs(dyn, dynify.TextDataset(x, y))
    assert not torch.equal(outputs.logits[-1].argmax(-1), static_pred)  # the jumps change it
    report = dynify.evaluate(dyn, dynify.TextDataset(x, y))
    assert report.static_accuracy == pytest.approx(float((static_pred == y).double().mean()))
    unlabelled = collect_outputs(dyn, TensorDataset(x, torch.full_like(y, -1)))
    assert torch.equal(unlabelled.reference(), static_pred)
    assert bool(unlabelled.static_correct().all())


def test_operating_points_choose_the_jump_threshold_per_target_and_measure_at_it():
    """Each target's point is what `calibrate` chooses (thresholds and jump threshold), measured
    on test at that jump threshold; threshold points stay at the one the model holds, and so
    does the model afterwards."""
    from dynify.runtime.stop_reading import JUMP_GRID

    dyn = jump_model(1)
    dyn.set_jump_threshold(0.3)
    x, y = calibration_texts()
    cal, test = dynify.TextDataset(x[:96], y[:96]), dynify.TextDataset(x[96:], y[96:])
    points = dynify.operating_points(dyn, cal, test, budgets=[0.45], thresholds=[1.01])
    assert float(dyn.jump_threshold) == pytest.approx(0.3)  # restored
    budget, every = points
    assert every.scalars == pytest.approx({"jump_threshold": 0.3})
    chosen = dynify.calibrate(dyn, cal, budget=0.45, part="all")
    assert budget.scalars == chosen.scalars and budget.scalars["jump_threshold"] in JUMP_GRID
    assert budget.scalars["jump_threshold"] != pytest.approx(0.3)  # measured at its own
    assert budget.thresholds == pytest.approx(chosen.thresholds)
    dyn.set_jump_threshold(0.3)
    dynify.use_operating_point(dyn, budget)  # serves the point: its jump threshold too
    assert float(dyn.jump_threshold) == pytest.approx(budget.scalars["jump_threshold"])
    with torch.no_grad():
        preds = dyn(x[96:]).argmax(-1)
    assert budget.test_accuracy == pytest.approx(float((preds == y[96:]).double().mean()))
    measured = float(dyn.last_macs.double().mean()) / dyn.static_macs
    assert budget.test_macs == pytest.approx(measured, abs=1e-9)
    without_jumps = convert(classifier(), every=2)
    with pytest.raises(StrategyError, match="decision scalars"):
        dynify.use_operating_point(without_jumps, budget)
