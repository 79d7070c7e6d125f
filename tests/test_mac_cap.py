"""The MAC cap of the strategies that hold one themselves (`dynify.runtime.mac_cap`: block
gates, spatial masks, skip-rnn, dynamic width, frame-exit's gates): no input, however crafted, and no threshold makes a sample
spend more than the cap, in a batch, alone and through the export face; a batch decides as its
samples do alone; without a cap nothing changes."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import dynify
import dynify.export.artifact as artifact
from dynify.errors import DynifyError, StrategyError
from dynify.runtime.decisions import NEVER
from tests.test_contract import (
    contract_input,
    contract_model,
    example_of,
    spread_new_parts,
    variants,
)

VARIANTS = [
    ("block-gates", {"gate": "function"}),
    ("block-gates", {"gate": "halting"}),
    ("block-gates", {"gate": "policy"}),
    ("spatial-masks", {"granularity": "region"}),
    ("spatial-masks", {"granularity": "pixel"}),
    ("skip-rnn", {}),
    ("dynamic-width", {}),
    ("frame-exit", {"policy": "gate"}),
]
IDS = ["-".join([s, *map(str, o.values())]) for s, o in VARIANTS]
SKIP_RNN = VARIANTS.index(("skip-rnn", {}))
WIDTH = VARIANTS.index(("dynamic-width", {}))
FRAME_GATES = VARIANTS.index(("frame-exit", {"policy": "gate"}))
# thresholds: calibrated-looking, and every gate open / every unit active (whatever the score)
THRESHOLDS = (0.5, 1.01)

_cache: dict[str, dynify.DynamicModel] = {}


def converted(strategy: str, options: dict[str, Any]) -> dynify.DynamicModel:
    key = json.dumps([strategy, options])
    if key not in _cache:
        example = example_of(strategy)
        model, x = example.model(), example.inputs()
        dyn = dynify.convert(model, strategy, x[:1], options=options).eval()
        spread_new_parts(dyn, model)
        _cache[key] = dyn
    dyn = _cache[key]
    if isinstance(dyn, dynify.MacCapped):
        dyn.set_mac_cap(None)
    return dyn


def variable_costs(dyn: dynify.DynamicModel) -> list[int]:
    """What each gated branch / masked block costs when it all runs."""
    if dyn.strategy == "block-gates":
        return dyn.branch_macs()
    if dyn.strategy == "skip-rnn":  # an update after the first, and the gate after it
        return [dyn.wrapper.step_macs + dyn.wrapper.gate_macs]
    if dyn.strategy == "dynamic-width":  # full width above the narrowest
        return [w.extra_macs[-1] for w in dyn.wrappers]
    if dyn.strategy == "frame-exit":  # each group of frames after the first
        costs = dyn.exit_macs()
        return [later - earlier for earlier, later in itertools.pairwise(costs)]
    return [w.branch_macs for w in dyn.wrappers]


def biting_cap(dyn: dynify.DynamicModel) -> float:
    """A cap that lets about one and a half of the dearest branches run: it must bite."""
    return (dyn.cap_floor() + 1.5 * max(variable_costs(dyn))) / dyn.static_macs


@pytest.fixture(params=VARIANTS, ids=IDS)
def dyn(request) -> dynify.DynamicModel:
    strategy, options = request.param
    return converted(strategy, options)


def hostile(dyn: dynify.DynamicModel) -> torch.Tensor:
    """The example's hostile inputs: NaN, 3e38 and inf samples next to ordinary ones of very
    different contrast (images), the extreme ids (tokens)."""
    example = example_of(dyn.strategy)
    return example.hostile(example.inputs())


def original(dyn: dynify.DynamicModel) -> torch.nn.Module:
    return example_of(dyn.strategy).model()


def run_alone(dyn, x):
    outs, macs, decisions = [], [], []
    for i in range(len(x)):
        outs.append(dyn(x[i : i + 1]))
        macs.append(dyn.last_macs.clone())
        decisions.append(dyn.last_decisions().clone())
    return torch.cat(outs), torch.cat(macs), torch.cat(decisions)


@pytest.mark.parametrize("threshold", THRESHOLDS)
@torch.no_grad()
def test_no_sample_exceeds_the_cap_in_batch_alone_or_export(dyn, threshold):
    dyn.set_thresholds(threshold)
    dyn.set_mac_cap(biting_cap(dyn))
    cap = int(dyn.mac_cap)
    x = hostile(dyn)
    out = dyn(x)
    macs, decisions = dyn.last_macs.clone(), dyn.last_decisions().clone()
    assert int(macs.max()) <= cap
    _, alone_macs, _alone_decisions = run_alone(dyn, x)
    assert int(alone_macs.max()) <= cap
    logits, exported = dyn.export_face().eval()(x)
    assert torch.equal(exported, decisions)  # the export face decides as eager: same costs
    if dyn.strategy == "block-gates":  # and its decisions price within the cap on their own
        branches = torch.tensor(variable_costs(dyn))
        assert int((dyn.cap_floor() + (exported * branches).sum(1)).max()) <= cap
    finite = torch.isfinite(out).all(1)
    torch.testing.assert_close(logits[finite], out[finite], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_cap_bites_when_every_gate_is_forced_open(dyn):
    dyn.set_thresholds(1.01)
    x = example_of(dyn.strategy).inputs()
    dyn(x)
    uncapped = dyn.last_macs.clone()
    dyn.set_mac_cap(biting_cap(dyn))
    dyn(x)
    assert int(uncapped.min()) > int(dyn.mac_cap)  # every sample would have exceeded it
    assert bool((dyn.last_macs <= dyn.mac_cap).all())
    assert bool((dyn.last_macs < uncapped).all())


@pytest.mark.parametrize("threshold", THRESHOLDS)
@torch.no_grad()
def test_a_batch_equals_its_samples_alone_under_the_cap(dyn, threshold):
    dyn.set_thresholds(threshold)
    dyn.set_mac_cap(biting_cap(dyn))
    x = hostile(dyn)
    out = dyn(x)
    macs, decisions = dyn.last_macs.clone(), dyn.last_decisions().clone()
    alone_out, alone_macs, alone_decisions = run_alone(dyn, x)
    assert torch.equal(alone_macs, macs)
    assert torch.equal(alone_decisions, decisions)
    torch.testing.assert_close(alone_out, out, atol=1e-5, rtol=1e-5, equal_nan=True)


@torch.no_grad()
def test_without_a_cap_nothing_changes_and_static_ignores_it(dyn):
    dyn.set_thresholds(0.5)
    x = example_of(dyn.strategy).inputs()
    before = dyn(x)
    before_macs = dyn.last_macs.clone()
    dyn.set_mac_cap(biting_cap(dyn))
    with dyn.static():
        static = dyn(x)
    dyn.set_mac_cap(None)
    assert torch.equal(dyn(x), before)
    assert torch.equal(dyn.last_macs, before_macs)
    assert dyn.mac_cap_fraction() is None
    with dyn.static():
        assert torch.equal(dyn(x), static)


@torch.no_grad()
def test_the_cap_survives_save_and_load_and_older_artifacts_load(dyn, tmp_path, monkeypatch):
    dyn.set_thresholds(1.01)
    fraction = biting_cap(dyn)
    dyn.set_mac_cap(fraction)
    x = hostile(dyn)
    out = dyn(x)
    loaded = dynify.load(dynify.save(dyn, tmp_path / "a.dyn"), model=original(dyn))
    assert isinstance(loaded, dynify.MacCapped)
    assert int(loaded.mac_cap) == int(dyn.mac_cap)
    torch.testing.assert_close(loaded(x), out, equal_nan=True)
    assert torch.equal(loaded.last_macs, dyn.last_macs)

    saving = artifact._state_for_saving

    def without_cap(model):  # an artifact written before the cap existed
        return {k: v for k, v in saving(model).items() if k != "mac_cap"}

    monkeypatch.setattr(artifact, "_state_for_saving", without_cap)
    older = dynify.load(dynify.save(dyn, tmp_path / "old.dyn"), model=original(dyn))
    assert older.mac_cap_fraction() is None


def test_the_allowance_is_the_cap_above_the_floor(dyn):
    x = dyn.random_input(3)
    assert dyn.allowance(None, x) is None
    cap = dyn.cap_floor() + 170
    left = dyn.allowance(cap, x)
    assert left.dtype == torch.float64 and left.tolist() == [170.0] * 3


def test_a_cap_below_the_floor_is_refused_with_the_minimum(dyn):
    floor = dyn.cap_floor() / dyn.static_macs
    with pytest.raises(StrategyError, match=f"{floor:.4f}"):
        dyn.set_mac_cap(floor * 0.9)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(StrategyError):
            dyn.set_mac_cap(bad)
    dyn.set_mac_cap(floor + 1e-3)  # at the floor every sample still runs: skipping everything
    assert dyn.mac_cap_fraction() == pytest.approx(floor, abs=2e-3)


def test_capped_models_are_mac_capped_and_exit_cascades_are_not(dyn):
    assert isinstance(dyn, dynify.MacCapped)
    exits = dynify.convert(contract_model(), "early-exit", contract_input()[:1])
    assert not isinstance(exits, dynify.MacCapped)


ONE_OF_EACH = [0, 3, SKIP_RNN, WIDTH, FRAME_GATES]


@pytest.mark.parametrize(
    "strategy,options", [VARIANTS[i] for i in ONE_OF_EACH], ids=[IDS[i] for i in ONE_OF_EACH]
)
def test_calibrate_with_a_mac_cap_sets_it_and_stays_under_it(strategy, options):
    dyn = converted(strategy, options)
    generator = torch.Generator().manual_seed(3)
    images = example_of(strategy).inputs(64)
    labels = torch.randint(0, 5, (64,), generator=generator)
    if not images.is_floating_point():
        data = dynify.TextDataset(images, labels)
    elif images.dim() == 5:  # clips
        data = TensorDataset(images, labels)
    else:
        data = (images, labels)
    cap = biting_cap(dyn)
    result = dynify.calibrate(dyn, data, budget=0.6, mac_cap=cap, part="all")
    assert dyn.mac_cap_fraction() == pytest.approx(cap, abs=1e-6)
    assert result.target["mac_cap"] == cap
    with torch.no_grad():
        dyn(images)
    assert bool((dyn.last_macs <= dyn.mac_cap).all())
    assert result.macs_fraction <= 0.6 + 1e-9
    with pytest.raises(StrategyError, match="below the cheapest"):
        dynify.calibrate(dyn, data, mac_cap=0.01, part="all")


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,options", [VARIANTS[i] for i in ONE_OF_EACH], ids=[IDS[i] for i in ONE_OF_EACH]
)
def test_onnx_keeps_the_cap_for_hostile_inputs(strategy, options, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    dyn = converted(strategy, options)
    dyn.set_thresholds(1.01)
    dyn.set_mac_cap(biting_cap(dyn))
    path = dynify.export_onnx(dyn, tmp_path / "capped.onnx")
    x = hostile(dyn)
    with torch.no_grad():
        out = dyn(x)
    session = ort.InferenceSession(str(path))
    feeds = {session.get_inputs()[0].name: x.numpy()}
    if len(session.get_inputs()) > 1:
        feeds[session.get_inputs()[1].name] = dyn.thresholds.numpy()
    logits, decisions = session.run(None, feeds)
    assert (decisions == dyn.last_decisions().numpy()).all()
    finite = torch.isfinite(out).all(1)
    torch.testing.assert_close(torch.from_numpy(logits)[finite], out[finite], atol=1e-4, rtol=1e-4)
    if dyn.strategy == "skip-rnn":  # the updates price within the cap on their own
        w = dyn.wrapper
        spent = dyn.cap_floor() + (decisions[:, 1:].sum(1) * (w.step_macs + w.gate_macs))
        assert int(spent.max()) <= int(dyn.mac_cap)
    if dyn.strategy == "dynamic-width":  # the widths price within the cap on their own
        extra = [torch.tensor(w.extra_macs)[decisions[:, i]] for i, w in enumerate(dyn.wrappers)]
        assert int((dyn.cap_floor() + torch.stack(extra).sum(0)).max()) <= int(dyn.mac_cap)


@torch.no_grad()
def test_skip_rnn_holds_the_cap_when_the_gate_scores_nan():
    """A gate that scores NaN asks for an update at every step (delta u counts as 1): the
    cap still holds, in a batch, alone and through the export face."""
    dyn = converted(*VARIANTS[SKIP_RNN])
    gate = dyn.wrapper.gate
    saved = gate.bias.clone()
    try:
        gate.bias.fill_(float("nan"))
        dyn.set_thresholds(0.5)
        x = hostile(dyn)
        dyn(x)
        lengths = dyn.reads(x)  # the steps the classifier reads: padding steps never update
        assert torch.equal(dyn.last_decisions().sum(1), lengths)  # uncapped: every real step
        dyn.set_mac_cap(biting_cap(dyn))
        dyn(x)
        macs, decisions = dyn.last_macs.clone(), dyn.last_decisions().clone()
        assert int(macs.max()) <= int(dyn.mac_cap)
        assert torch.equal(decisions.sum(1), lengths.clamp(max=2))  # the first and one more
        _, alone_macs, alone_decisions = run_alone(dyn, x)
        assert torch.equal(alone_macs, macs) and torch.equal(alone_decisions, decisions)
        assert torch.equal(dyn.export_face().eval()(x)[1], decisions)
    finally:
        gate.bias.copy_(saved)
        dyn.set_mac_cap(None)


def image_folder(root):
    """Three random 32x32 PNGs for each of the CIFAR ResNet's 10 classes."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in "abcdefghij":
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def test_cli_calibrate_with_a_mac_cap_on_gates_saves_and_prints_it(tmp_path):
    from typer.testing import CliRunner

    from dynify.cli import app

    image_folder(tmp_path / "data")
    artifact_path = tmp_path / "g.dyn"
    runner = CliRunner()
    convert = ["convert", "cifar_resnet20", "--weights", "random", "--strategy", "block-gates"]
    result = runner.invoke(app, [*convert, "-o", str(artifact_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    calibrate = ["calibrate", str(artifact_path), "--data", str(tmp_path / "data"), "--part", "all"]
    result = runner.invoke(app, [*calibrate, "--mac-cap", "0.6"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "MAC cap: no sample spends more than 0.6" in " ".join(result.output.split())
    assert dynify.load(artifact_path).mac_cap_fraction() == pytest.approx(0.6, abs=1e-6)
    result = runner.invoke(app, [*calibrate, "--mac-cap", "0.01"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "below the cheapest" in " ".join(result.output.split())


def test_cli_dynamic_conv_prints_its_fixed_cost_and_refuses_a_mac_cap(tmp_path):
    from typer.testing import CliRunner

    from dynify.cli import app

    data = image_folder(tmp_path / "data")
    artifact_path = tmp_path / "c.dyn"
    runner = CliRunner()
    convert = ["convert", "cifar_resnet20", "--weights", "random", "--strategy", "dynamic-conv"]
    result = runner.invoke(app, [*convert, "-o", str(artifact_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "nothing to cap" in " ".join(result.output.split())
    calibrate = ["calibrate", str(artifact_path), "--data", str(data), "--mac-cap", "0.9"]
    result = runner.invoke(app, calibrate, catch_exceptions=False)
    assert result.exit_code == 2
    assert "nothing to cap" in " ".join(result.output.split())


# --- exit cascades: a forced exit (threshold 0) is the cap ---------------------------------

CASCADES = [
    (strategy, options)
    for strategy in dynify.strategy_names()
    for options in variants(strategy)
    # a cascade's variant that does not name its policy (frame-exit's groups) runs the default,
    # confidence
    if any("policy" in v for v in variants(strategy))
    and options.get("policy", "confidence") in ("confidence", "entropy")
]
CASCADE_IDS = ["-".join([s, *map(str, o.values())]) for s, o in CASCADES]


def very_hostile(dyn: dynify.DynamicModel) -> torch.Tensor:
    """The example's hostile inputs and, for float inputs, -inf, -3e38 and NaN in half the
    values of another sample."""
    x = hostile(dyn)
    if x.is_floating_point():
        x[3], x[4] = float("-inf"), -3e38
        x[5].view(-1)[::2] = float("nan")
    return x


def forcing(dyn: dynify.DynamicModel, k: int) -> list[float]:
    """Exit k forced (threshold 0), every other exit off: every sample's dearest way to k."""
    thresholds = [NEVER] * dyn.num_thresholds
    thresholds[k] = 0.0
    return thresholds


@pytest.mark.parametrize("strategy,options", CASCADES, ids=CASCADE_IDS)
@torch.no_grad()
def test_a_forced_exit_holds_for_every_input_in_batch_alone_and_export(strategy, options):
    dyn = converted(strategy, options)
    assert isinstance(dyn, dynify.ExitCascade) and not isinstance(dyn, dynify.MacCapped)
    x = very_hostile(dyn)
    try:
        for k in range(dyn.num_exits):
            dyn.set_thresholds(forcing(dyn, k))
            cap = dynify.cost_bound(dyn).cap
            assert cap is not None and cap < dyn.worst_case_macs()
            dyn(x)
            macs, exits = dyn.last_macs.clone(), dyn.last_exit.clone()
            assert int(macs.max()) <= cap, k
            _, alone_macs, alone_exits = run_alone(dyn, x)
            assert torch.equal(alone_macs, macs) and torch.equal(alone_exits, exits)
            assert torch.equal(dyn.export_face().eval()(x)[1], exits)
            if not isinstance(dyn, dynify.PerSampleExits):  # every sample leaves at k
                assert exits.tolist() == [k] * len(x)
    finally:
        dyn.set_thresholds(0.5)


class WideTail(torch.nn.Module):
    """A text classifier whose classifier (an MLP) costs far more than an exit head."""

    def __init__(self):
        super().__init__()
        from dynify.models.text import TextClassifier

        self.net = TextClassifier(40, 5, embed_dim=8, hidden=12, dropout=0.0)
        self.net.classifier = torch.nn.Sequential(
            torch.nn.Linear(12, 256), torch.nn.ReLU(), torch.nn.Linear(256, 5)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)


@torch.no_grad()
def test_stop_reading_caps_short_texts_whose_classifier_is_dearer_than_a_head():
    """A text that has finished reading before the forced exit takes the original classifier;
    when it costs more than the head, the cap accounts for it (`forced_exit_macs`)."""
    torch.manual_seed(0)
    model = WideTail().eval()
    ids = torch.randint(1, 40, (6, 12), generator=torch.Generator().manual_seed(0))
    ids[1, 4:], ids[2, 3:], ids[3, 8:] = 0, 0, 0  # short texts: 4, 3 and 8 tokens
    dyn = dynify.convert(model, "stop-reading", ids[:1], options={"every": 4}).eval()
    leave = dyn.exit_macs()[:-1]
    assert all(b > m for b, m in zip(dyn.forced_exit_macs(), leave, strict=True))
    for k in range(dyn.num_exits):
        dyn.set_thresholds(forcing(dyn, k))
        dyn(ids)
        assert int(dyn.last_macs.max()) == dynify.cost_bound(dyn).cap > leave[k]
    data = dynify.TextDataset(ids.repeat(5, 1), torch.randint(0, 5, (30,)))
    cap = dyn.forced_exit_macs()[0] / dyn.static_macs + 1e-6  # exit 0 forced fits, exit 1 not
    result = dynify.calibrate(dyn, data, mac_cap=cap, part="all")
    assert result.forced_exit == 0
    dyn(ids)
    assert int(dyn.last_macs.max()) <= cap * dyn.static_macs
    with pytest.raises(DynifyError, match="cheapest exit"):  # exit 0's head alone would fit
        dynify.calibrate(dyn, data, mac_cap=leave[0] / dyn.static_macs, part="all")


# --- what every strategy prints: the worst case, and the cap it holds ----------------------


@pytest.mark.parametrize("strategy", dynify.strategy_names())
def test_every_strategy_prints_its_worst_case_and_the_cap_it_holds(strategy):
    from dynify.cli.convert import cost_bound_text

    dyn = converted(strategy, variants(strategy)[0])
    worst = dyn.worst_case_macs()
    text = " ".join(cost_bound_text(dyn).split())
    assert f"worst case per sample: {worst / 1e6:.1f} M MACs" in text
    bound = dynify.cost_bound(dyn)
    if strategy == "dynamic-conv":  # its cost does not depend on the input
        assert bound.fixed and "nothing to cap" in text
        with torch.no_grad():
            dyn(very_hostile(dyn))
        assert set(dyn.last_macs.tolist()) == {worst}
        return
    assert not bound.fixed and "no sample spends more than" not in text
    try:
        if isinstance(dyn, dynify.MacCapped):
            dyn.set_mac_cap(biting_cap(dyn))
            expected = int(dyn.mac_cap)
        else:
            dyn.set_thresholds(forcing(dyn, 0))
            expected = dynify.cost_bound(dyn).cap
        text = " ".join(cost_bound_text(dyn).split())
        assert f"no sample spends more than {expected / 1e6:.1f} M MACs" in text
        assert f"({expected / dyn.static_macs:.3f} of static)" in text
    finally:
        if isinstance(dyn, dynify.MacCapped):
            dyn.set_mac_cap(None)
        dyn.set_thresholds(0.5)


def test_a_mac_cap_on_dynamic_conv_says_there_is_nothing_to_cap():
    dyn = converted("dynamic-conv", variants("dynamic-conv")[0])
    images = contract_input(32)
    data = (images, torch.randint(0, 5, (32,)))
    with pytest.raises(StrategyError, match="nothing to cap") as error:
        dynify.calibrate(dyn, data, mac_cap=0.9, part="all")
    assert f"{dyn.worst_case_macs() / dyn.static_macs:.4f}" in str(error.value)


def test_every_mac_capped_variant_in_the_registry_is_tested_here():
    for strategy in dynify.strategy_names():
        for options in variants(strategy):
            dyn = converted(strategy, options)
            if isinstance(dyn, dynify.MacCapped):
                # frame-exit's groups of frames: the same rule over coarser steps
                ungrouped = {k: v for k, v in options.items() if k != "group"}
                assert (strategy, ungrouped) in VARIANTS, (strategy, options)
            else:
                assert (
                    (strategy, options) in CASCADES
                    or dynify.cost_bound(dyn).fixed
                    or (options.get("policy") == "patience")
                ), (strategy, options)


FIRST_OF_EACH_CASCADE = [i for i, (s, o) in enumerate(CASCADES) if o.get("policy") == "confidence"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,options",
    [CASCADES[i] for i in FIRST_OF_EACH_CASCADE],
    ids=[CASCADE_IDS[i] for i in FIRST_OF_EACH_CASCADE],
)
def test_onnx_keeps_a_forced_exit_for_hostile_inputs(strategy, options, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    dyn = converted(strategy, options)
    k = dyn.num_exits - 1  # the deepest exit forced: the others would have to be skipped
    thresholds = torch.tensor(forcing(dyn, k), dtype=torch.float32)
    path = dynify.export_onnx(dyn, tmp_path / "forced.onnx")
    x = very_hostile(dyn)
    try:
        dyn.set_thresholds(thresholds)
        with torch.no_grad():
            out = dyn(x)
        assert int(dyn.last_macs.max()) <= dynify.cost_bound(dyn).cap
        session = ort.InferenceSession(str(path))
        feed = {"x": x.numpy(), "thresholds": thresholds.numpy()}  # an overridable initializer
        logits, exits = session.run(None, feed)
        assert (exits == dyn.last_exit.numpy()).all()
        finite = torch.isfinite(out).all(1)
        torch.testing.assert_close(
            torch.from_numpy(logits)[finite], out[finite], atol=1e-4, rtol=1e-4
        )
    finally:
        dyn.set_thresholds(0.5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,options", [VARIANTS[i] for i in ONE_OF_EACH], ids=[IDS[i] for i in ONE_OF_EACH]
)
def test_pt2_keeps_the_cap_for_hostile_inputs(strategy, options, tmp_path):
    dyn = converted(strategy, options)
    dyn.set_thresholds(1.01)
    dyn.set_mac_cap(biting_cap(dyn))
    try:
        path = dynify.export_pt2(dyn, tmp_path / "capped.pt2")
        program = torch.export.load(path).module()
        x = hostile(dyn)
        with torch.no_grad():
            dyn(x)
            _, decisions = program(x, dyn.thresholds)
        assert torch.equal(decisions, dyn.last_decisions())
        assert int(dyn.last_macs.max()) <= int(dyn.mac_cap)
    finally:
        dyn.set_mac_cap(None)
