"""dynamic-width: residual branches run a per-sample prefix of their importance-ordered channels.

The contract tests (tests/test_contract.py -k dynamic-width) check static mode, batch vs alone,
`last_macs` against FlopCounterMode, the worst case, the artifact round trip and ONNX parity;
here: what the strategy itself promises (the permutation changes nothing, a narrow width runs
smaller convolutions, the decision rule, training towards the budget, calibration, errors).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import dynify
from dynify.errors import StrategyError
from dynify.passes.dynamic_width import importance_order, inner_widths
from dynify.runtime.decisions import width_index, width_index_one
from dynify.runtime.dynamic_width import DynamicWidthModel
from tests.test_contract import contract_input, contract_model, mixing_thresholds


def convert(model: nn.Module | None = None, **options) -> DynamicWidthModel:
    model = contract_model() if model is None else model
    return dynify.convert(model, "dynamic-width", contract_input()[:1], options=options).eval()


def spread_gates(dyn: DynamicWidthModel, scale: float = 3.0) -> None:
    """Gates that really choose (a fresh gate prefers the full width for every input)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in dyn.wrappers:
            fc = w.gate.fc
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) * scale)
            fc.bias.zero_()


class ConvShapes(TorchDispatchMode):
    """Records the weight shape of every convolution that runs."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


def test_every_basic_block_branch_is_taken_and_the_plain_projection_block_is_skipped():
    dyn = convert()
    assert dyn.joins == ["add", "add_1", "add_3"]
    skipped = dyn.spec["plan"]["skipped"]
    assert [s["join"] for s in skipped] == ["add_2"]  # b2: conv -> BN, no inner channels
    assert [w.widths for w in dyn.wrappers] == [[2, 4, 6, 8], [2, 4, 6, 8], [4, 8, 12, 16]]


def test_the_permutation_changes_nothing_the_network_computes():
    model = contract_model()
    dyn = convert(model)
    x = contract_input()
    wrapper = dyn.wrappers[0]
    order = wrapper.order.tolist()
    assert order != sorted(order)  # really permuted: the test would be empty otherwise
    assert torch.equal(wrapper.conv1.weight, model.b0.conv1.weight[order])
    assert torch.equal(wrapper.conv2.weight, model.b0.conv2.weight[:, order])
    assert torch.equal(wrapper.bn1.running_var, model.b0.bn1.running_var[order])
    dyn.set_thresholds(1.01)  # full width, the permuted weights, no gate
    with torch.no_grad():
        assert (dyn(x) - model(x)).abs().max() <= 1e-5
        assert (dyn(x[:1]) - model(x[:1])).abs().max() <= 1e-5
        with dyn.static():
            assert torch.equal(dyn(x), model(x))
    # the user's model keeps its weights and order
    assert torch.equal(contract_model().b0.conv1.weight, model.b0.conv1.weight)


def test_importance_puts_the_channel_with_the_largest_reach_first():
    conv1, bn1, conv2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3)
    with torch.no_grad():
        conv2.weight.fill_(1.0)
        bn1.weight.copy_(torch.tensor([0.1, -2.0, 0.5, 1.0]))  # |gamma| counts, not its sign
        bn1.running_var.fill_(1.0)
    assert importance_order(conv1, bn1, conv2) == [1, 3, 2, 0]
    with torch.no_grad():
        conv2.weight[:, 0].mul_(100.0)  # what conv2 makes of a channel counts too
    assert importance_order(conv1, bn1, conv2)[0] == 0


def test_widths_are_distinct_counts_ending_at_full_width():
    assert inner_widths([0.25, 0.5, 0.75, 1.0], 16) == [4, 8, 12, 16]
    assert inner_widths([0.5], 16) == [8, 16]
    assert inner_widths([0.01, 0.3, 0.31], 8) == [1, 2, 8]


def test_a_narrow_width_runs_smaller_convolutions_and_costs_what_flop_counter_counts():
    dyn = convert()
    x = contract_input()[:2]
    for threshold, width in ((0.0, 0), (1.01, 3)):
        dyn.set_thresholds(threshold)
        shapes = ConvShapes()
        with torch.no_grad(), shapes:
            dyn(x)
        assert dyn.last_decisions().tolist() == [[width] * 3] * 2
        inner = [w.widths[width] for w in dyn.wrappers]
        # stem, b0 (conv1, conv2), b1 (conv1, conv2), b2, down, b3 (conv1, conv2)
        assert shapes.shapes[1:5] == [(inner[0], 8, 3, 3), (8, inner[0], 3, 3)] * 2
        assert shapes.shapes[-2:] == [(inner[2], 16, 3, 3), (16, inner[2], 3, 3)]
    for wrapper in dyn.wrappers:  # each width at the branch's own input size (b0, b1: 24)
        size = 24 if wrapper.conv1.in_channels == 8 else 12
        entry = torch.randn(3, wrapper.conv1.in_channels, size, size)
        for width, macs in zip(wrapper.widths, wrapper.width_macs, strict=True):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                wrapper.narrow(entry, width)
            assert counter.get_total_flops() // 2 == 3 * macs
        assert wrapper.width_macs[0] * 4 == wrapper.width_macs[-1]  # a quarter of the channels


def test_samples_of_a_batch_are_grouped_by_width_and_get_their_own_result():
    dyn = convert()
    spread_gates(dyn)
    x = contract_input()
    dyn.set_thresholds(mixing_thresholds(dyn, x))
    with torch.no_grad():
        out = dyn(x)
        chosen = dyn.last_decisions()
        macs = dyn.last_macs.clone()
        alone = torch.cat([dyn(x[i : i + 1]) for i in range(len(x))])
    assert len({tuple(r) for r in chosen.tolist()}) >= 3  # the batch really splits
    assert (out - alone).abs().max() <= 1e-5
    expected = [
        dyn.fixed_macs
        + sum(w.gate_macs + w.width_macs[k] for w, k in zip(dyn.wrappers, row, strict=True))
        for row in chosen.tolist()
    ]
    assert macs.tolist() == expected


def test_the_width_rule_reads_the_gates_distribution_at_the_threshold_quantile():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]))
    assert width_index(logits, 0.0).tolist() == [0, 0]
    assert width_index(logits, 0.5).tolist() == [2, 0]  # the median width
    assert width_index(logits, 0.75).tolist() == [3, 1]
    assert width_index(logits, 1.01).tolist() == [3, 3]
    assert width_index(torch.tensor([[float("nan")] * 4]), 0.9).tolist() == [0]
    assert width_index(torch.tensor([[float("nan")] * 4]), 1.01).tolist() == [3]


def test_batch_one_rule_in_python_floats_decides_like_the_tensor_rule():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=generator) * 3
    for threshold in (0.0, 0.2, 0.5, 0.9, 1.0, 1.01):
        t = torch.tensor(threshold, dtype=torch.float32)
        for row in logits:
            exact = lambda row=row, t=t: int(width_index(row[None], t)[0])  # noqa: E731
            assert width_index_one(row.tolist(), float(t), exact) == exact()
    # at a tie (threshold exactly a cumulative probability) the tensor rule decides
    row = logits[0][None]
    cumulative = torch.cumsum(torch.softmax(row, -1), -1)[0, 0]
    exact = lambda: int(width_index(row, cumulative)[0])  # noqa: E731
    assert width_index_one(row[0].tolist(), float(cumulative), exact) == exact()


def test_training_moves_the_macs_towards_the_budget():
    dyn = convert(budget=0.5)
    x = contract_input(32)
    gates = [p for w in dyn.wrappers for p in w.gate.parameters()]
    optimizer = torch.optim.Adam(gates, lr=0.05)
    dyn.set_thresholds(0.5)
    with torch.no_grad():
        dyn(x)
    before = dyn.mean_macs_fraction()
    torch.manual_seed(0)
    for _ in range(40):
        loss, metrics = dyn.training_loss(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        dyn(x)
    after = dyn.mean_macs_fraction()
    assert before > 0.95  # a fresh gate keeps the full width
    assert after < before - 0.2
    assert after > dyn.min_macs() / dyn.static_macs - 1e-9
    assert "greedy_macs_fraction" in metrics and metrics["compute_price"] > 0


def test_training_masks_inner_channels_like_the_narrow_convolution():
    dyn = convert()
    wrapper = dyn.wrappers[2]
    entry = torch.randn(4, 16, 12, 12)
    for k, width in enumerate(wrapper.widths):
        mask = wrapper.prefix[k].expand(4, -1)
        with torch.no_grad():
            assert (wrapper.masked(entry, mask) - wrapper.narrow(entry, width)).abs().max() < 1e-5


def test_calibration_to_a_budget():
    dyn = convert()
    spread_gates(dyn, scale=1.0)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, 24, 24, generator=generator)
    y = torch.randint(0, 5, (64,), generator=generator)
    result = dynify.calibrate(dyn, (x, y), budget=0.7, part="all")
    with torch.no_grad():
        dyn(x)
    assert dyn.mean_macs_fraction() <= 0.7 + 1e-9
    assert result.macs_fraction <= 0.7 + 1e-9


@pytest.mark.parametrize(
    "options,message",
    [
        ({"widths": []}, "widths must be a list"),
        ({"widths": [0.5, 1.5]}, "in (0, 1]"),
        ({"budget": 0.0}, "budget"),
        ({"blocks": ["relu_1"]}, "not residual joins"),
        ({"nope": 1}, "Unknown dynamic-width option"),
    ],
)
def test_bad_options_are_refused_with_what_to_do(options, message):
    with pytest.raises(StrategyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert(**options)


def test_a_network_without_such_branches_is_refused_with_the_reason():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8))
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = x + self.branch(x)
            return self.fc(x.mean((2, 3)))

    with pytest.raises(StrategyError, match="conv -> BN -> ReLU -> conv"):
        convert(Plain().eval())


def test_unit_probabilities_say_which_branches_run_at_full_width_and_carry_gradients():
    dyn = convert()
    spread_gates(dyn)
    x = contract_input().requires_grad_(True)
    dyn.set_thresholds(mixing_thresholds(dyn, x.detach()))
    probs = dyn.unit_probabilities(x)
    assert len(probs) == dyn.num_branches and all(p.shape == (len(x),) for p in probs)
    torch.stack(probs).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        dyn(x.detach())
    full = dyn.last_decisions() == torch.tensor([w.num_widths - 1 for w in dyn.wrappers])
    rule = torch.stack(
        [p.detach() > 1 - t for p, t in zip(probs, dyn.thresholds.tolist(), strict=True)], 1
    )
    assert bool(full.any()) and not bool(full.all())  # the thresholds mix widths
    assert torch.equal(full, rule)


def test_width_plan_is_a_read_only_view_of_the_branches_and_their_costs():
    dyn = convert()
    plan = dyn.width_plan()
    assert [b.join for b in plan] == dyn.joins
    assert [list(b.widths) for b in plan] == [[2, 4, 6, 8], [2, 4, 6, 8], [4, 8, 12, 16]]
    assert all(b.num_widths == 4 for b in plan)
    # the book's floor and worst case are the plan's narrowest and full widths, gates charged
    rest = dyn.static_macs - sum(b.width_macs[-1] for b in plan)
    gates = sum(b.gate_macs for b in plan)
    assert dyn.cap_floor() == rest + gates + sum(b.width_macs[0] for b in plan)
    assert dyn.worst_case_macs() == dyn.static_macs + gates
    with pytest.raises(AttributeError):
        plan[0].widths = (1,)  # frozen


@pytest.mark.parametrize("index", [0, 2, -1])
def test_force_width_runs_that_width_for_every_sample(index):
    dyn = convert()
    dyn.force_width(index)
    plan = dyn.width_plan()
    with torch.no_grad():
        dyn(contract_input())
    width = index % 4
    assert dyn.last_decisions().eq(width).all()
    spent = dyn.static_macs + sum(
        b.gate_macs + b.width_macs[width] - b.width_macs[-1] for b in plan
    )
    assert dyn.last_macs.tolist() == [spent] * len(contract_input())
    with pytest.raises(StrategyError, match="width index 4"):
        dyn.force_width(4)
