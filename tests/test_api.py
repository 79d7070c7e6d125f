"""The public API: typed options and config, held-out calibration by default, inspect, input
checks. Everything here goes through `dynify.<name>` alone, as a user's code would."""

from __future__ import annotations

import pytest
import torch

import dynify
from dynify.errors import DynifyError, InputError, StrategyError


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(120, 3, 16, 16, generator=gen)
    y = torch.arange(120) % 5
    return x, y


@pytest.fixture
def tuned(tiny_model, data):
    dyn = dynify.convert(tiny_model, "early-exit", torch.zeros(1, 3, 16, 16), options={"exits": 1})
    config = dynify.FinetuneConfig(epochs=1, batch_size=40, calibration_fraction=0.25, seed=2)
    result = dynify.finetune(dyn, data, config, progress=False)
    return dyn, result


def test_calibrate_uses_the_part_fine_tuning_held_out_by_default(tuned, data):
    dyn, result = tuned
    held = len(result.calibration_data)
    assert held == 30 and dyn.spec["finetune"]["samples"] == 90
    cal = dynify.calibrate(dyn, data, mac_cap=1.0)
    assert cal.samples == held
    assert "25% held out from fine-tuning, seed 2" in cal.data
    assert dyn.spec["calibration"]["data"] == cal.data
    # the same images as the held-out part, chosen the same way: the same thresholds
    again = dynify.calibrate(dyn, result.calibration_data, mac_cap=1.0)
    assert again.samples == held and again.thresholds == cal.thresholds
    assert again.data == "all of the data"


def test_calibrate_on_all_of_the_training_data_only_when_asked_and_says_so(tuned, data):
    dyn, _ = tuned
    cal = dynify.calibrate(dyn, data, mac_cap=1.0, part="all")
    assert cal.samples == 120 and "optimistic" in cal.data
    other = (data[0] + 1.0, data[1])
    assert dynify.calibrate(dyn, other, mac_cap=1.0).samples == 120  # not the tuning data
    held = dynify.calibrate(dyn, other, mac_cap=1.0, part="calibration")
    assert held.samples == 30 and "held out" in held.data
    with pytest.raises(DynifyError, match=r"in \(0, 1\)"):
        dynify.calibrate(dyn, data, mac_cap=1.0, calibration_fraction=1.0)
    with pytest.raises(DynifyError, match="part is one of"):
        dynify.calibrate(dyn, data, mac_cap=1.0, part="some")  # type: ignore[arg-type]


class Pairs(torch.utils.data.Dataset):
    """A user's own Dataset: items are (image, label); `noise` makes every read differ, as a
    random augmentation does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, noise: float = 0.0):
        self.x, self.y, self.noise = x, y, noise

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + self.noise * torch.randn_like(self.x[i]), int(self.y[i])


def test_a_users_own_dataset_is_recognised_as_the_fine_tuning_data(tiny_model, data, caplog):
    caplog.set_level("WARNING", logger="dynify")
    dyn = dynify.convert(tiny_model, "early-exit", torch.zeros(1, 3, 16, 16), options={"exits": 1})
    config = dynify.FinetuneConfig(epochs=1, batch_size=40, calibration_fraction=0.25, seed=2)
    dynify.finetune(dyn, Pairs(*data), config, progress=False)
    loader = torch.utils.data.DataLoader(Pairs(*data), batch_size=7)
    cal = dynify.calibrate(dyn, loader, mac_cap=1.0)  # a new object over the same items
    assert cal.samples == 30 and "held out" in cal.data
    # other items of the same length are other data
    assert dynify.calibrate(dyn, Pairs(data[0] + 1.0, data[1]), mac_cap=1.0).samples == 120
    assert "cannot tell" not in caplog.text
    # items that change between reads cannot be compared: all of it, with a warning that says
    # how to ask for the held-out share
    noisy = Pairs(*data, noise=0.1)
    assert dynify.calibrate(dyn, noisy, mac_cap=1.0).samples == 120
    assert "cannot tell" in caplog.text and "part='calibration'" in caplog.text
    assert dynify.calibrate(dyn, noisy, mac_cap=1.0, part="calibration").samples == 30


def test_evaluate_warns_on_the_fine_tuning_data(tuned, data):
    dyn, _ = tuned
    assert "optimistic" in (dynify.evaluate(dyn, data).warning or "")
    assert dynify.evaluate(dyn, (data[0] * 0.5, data[1])).warning is None


def test_finetune_config_and_keywords(tiny_model, data):
    dyn = dynify.convert(tiny_model, "early-exit", torch.zeros(1, 3, 16, 16), options={"exits": 1})
    config = dynify.FinetuneConfig(epochs=2, batch_size=60, calibration_fraction=0.5)
    result = dynify.finetune(dyn, data, config, epochs=1, progress=False)
    assert result.config.epochs == 1 and result.config.batch_size == 60
    assert result.config.calibration_fraction == 0.5 and len(result.history) == 1
    assert config.epochs == 2  # the caller's config is not modified
    with pytest.raises(DynifyError, match="learning rate must be a positive number, got inf"):
        dynify.finetune(dyn, data, config, lr=float("inf"), progress=False)


def test_typed_options_equal_their_dict(tiny_model):
    x = torch.zeros(1, 3, 16, 16)
    typed = dynify.convert(tiny_model, "early-exit", x, options=dynify.EarlyExitOptions(exits=1))
    plain = dynify.convert(tiny_model, "early-exit", x, options={"exits": 1})
    assert typed.spec["plan"] == plain.spec["plan"]
    masks = dynify.convert(
        tiny_model, "spatial-masks", x, options=dynify.SpatialMaskOptions(granularity="pixel")
    )
    assert masks.spec["plan"]["options"]["granularity"] == "pixel"
    with pytest.raises(StrategyError, match="not options of 'early-exit'"):
        dynify.convert(tiny_model, "early-exit", x, options=dynify.BlockGateOptions())
    for bad in ({"threshold": float("nan")}, {"threshold": -1}, {"head_budget": 0}):
        with pytest.raises(StrategyError):
            dynify.convert(tiny_model, "early-exit", x, options=bad)


def test_inspect_returns_the_facts_strategies_plan_from(tiny_model):
    summary = dynify.inspect(tiny_model, input_size=16)
    assert summary.num_classes == 5 and summary.input_size == 16
    assert [b.identity for b in summary.blocks] == [True, False]
    assert len(summary.blocks) == 2 and summary.total_cuts >= len(summary.cuts) > 0
    assert all(0 < c.fraction < 1 for c in summary.cuts)
    assert summary.to_dict()["blocks"][1]["shortcut_ops"] == 1
    with pytest.raises(InputError, match="input size"):
        dynify.inspect(tiny_model)


def test_strategies_have_summaries():
    infos = {s.name: s.summary for s in dynify.strategies()}
    assert set(infos) == set(dynify.strategy_names()) >= {"early-exit", "block-gates"}
    assert all(len(summary) > 20 for summary in infos.values())


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.double(),
        lambda x: x.half(),
        lambda x: x.bfloat16(),
        lambda x: x.to(torch.uint8),
        lambda x: x.long(),
        lambda x: x > 0,
        lambda x: x.to(torch.complex64),
        lambda x: torch.empty_like(x, device="meta"),
    ],
    ids=["float64", "float16", "bfloat16", "uint8", "int64", "bool", "complex64", "meta"],
)
@pytest.mark.parametrize("strategy", ["early-exit", "block-gates", "spatial-masks", "resolution"])
def test_inputs_of_another_dtype_or_device_are_input_errors(tiny_model, make, strategy):
    dyn = dynify.convert(tiny_model, strategy, torch.zeros(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(InputError, match="float32 input on cpu"):
        dyn(make(x))
    with torch.no_grad():
        assert dyn(x).shape == (2, 5)


def test_exit_scores_are_what_the_thresholds_are_compared_with():
    from dynify.runtime.decisions import NEVER
    from tests.test_contract import contract_input, contract_model, spread_new_parts

    model = contract_model()
    x = contract_input()
    dyn = dynify.convert(model, "early-exit", x[:1]).eval()
    spread_new_parts(dyn, model)
    scores = dynify.exit_scores(dyn, x.requires_grad_(True))
    assert len(scores) == dyn.num_exits and all(s.shape == (len(x),) for s in scores)
    (grad,) = torch.autograd.grad(scores[0].sum(), x)  # differentiable in the input
    assert grad.abs().sum() > 0
    threshold = float(scores[0].detach().median())
    dyn.set_thresholds([threshold] + [NEVER] * (dyn.num_thresholds - 1))
    with torch.no_grad():
        dyn(x.detach())
    expected = scores[0].detach() >= torch.tensor(threshold)
    assert torch.equal(dyn.last_exit == 0, expected) and 0 < int(expected.sum()) < len(x)
    gated = dynify.convert(model, "block-gates", x[:1].detach())
    with pytest.raises(dynify.DynifyError, match="exit heads"):
        dynify.exit_scores(gated, x)


def test_a_model_reports_its_source_training_record_costs_and_new_parameters(
    tiny_model, tuned, tmp_path
):
    """What benchmarks and users read from a model, through the public API alone."""
    fresh = dynify.convert(tiny_model, "early-exit", torch.zeros(1, 3, 16, 16))
    assert fresh.model_name == "tests.conftest:TinyResNet"  # where its class is defined
    assert fresh.weight_notes == []  # its own weights, as passed: nothing to say
    assert fresh.training_record is None
    dyn, _ = tuned
    record = dyn.training_record
    assert isinstance(record, dynify.TrainingRecord)
    assert (record.mode, record.epochs, record.seed, record.samples) == ("heads", 1, 2, 90)
    assert record.calibration_fraction == 0.25 and record.data.startswith("tensors::sha256:")
    loaded = dynify.load(dynify.save(dyn, tmp_path / "m.dyn"), model=tiny_model)
    assert loaded.training_record == record  # the artifact carries it
    costs = dyn.costs()
    assert all(isinstance(c, dynify.CostItem) for c in costs)
    assert sum(c.macs for c in costs) == dyn.exit_macs()[-1]  # every part, once
    heads = [c.macs for c in costs if c.name.startswith("head")]
    assert len(heads) == dyn.num_exits and all(m > 0 for m in heads)
    new = dynify.new_parameters(dyn)
    assert new and all(p.requires_grad for _, p in new)
    with torch.no_grad():  # the same, whatever the caller's grad mode
        assert [n for n, _ in dynify.new_parameters(dyn)] == [n for n, _ in new]
    with torch.no_grad():  # re-initialising the new parts leaves the static network alone
        x = torch.randn(2, 3, 16, 16)
        with dyn.static():
            expected = dyn(x)
        for _, p in new:
            p.add_(1.0)
        with dyn.static():
            assert torch.equal(dyn(x), expected)
