"""dynamic-conv: K expert kernels per chosen conv, mixed per sample by a router.

The contract tests (tests/test_contract.py -k dynamic) check static mode, batch vs alone,
`last_macs` against FlopCounterMode, the artifact round trip and ONNX parity; here: what the
strategy itself promises (the original network before training, which convs, the cost of
routers and mixing, the annealed temperature, fine-tuning that makes the experts diverge).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynify
from dynify.errors import StrategyError
from dynify.models.cifar_resnet import cifar_resnet20
from dynify.runtime.dynamic_conv import DynamicConvModel, annealed_temperature
from tests.conftest import randomize_bn
from tests.test_contract import ContractNet, contract_input, contract_model


def convert(model: nn.Module | None = None, **options) -> DynamicConvModel:
    model = contract_model() if model is None else model
    return dynify.convert(model, "dynamic-conv", contract_input()[:1], options=options)


def spread_routers(dyn: DynamicConvModel) -> None:
    """Routers that really choose (a fresh router weighs every expert alike), experts apart."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in dyn.wrappers:
            w.router.fc2.weight.copy_(torch.randn(w.router.fc2.weight.shape, generator=generator))
            w.experts.add_(torch.randn(w.experts.shape, generator=generator) * 0.1)


def test_default_takes_the_3x3_convs_of_residual_branches_and_all_takes_every_conv():
    assert convert().conv_names == [
        "b0_conv1",
        "b0_conv2",
        "b1_conv1",
        "b1_conv2",
        "b2_0",  # the projection block's 3x3 stride-2 conv; its 1x1 shortcut stays
        "b3_conv1",
        "b3_conv2",
    ]
    assert convert(convs="all").conv_names[:1] == ["stem_0"]
    assert "down" in convert(convs="all").conv_names
    assert convert(convs=["b1_conv2"]).conv_names == ["b1_conv2"]


@pytest.mark.parametrize("experts", [2, 3, 4])
def test_converted_network_computes_the_original_before_training(experts):
    model = contract_model()
    dyn = convert(model, experts=experts, convs="all").eval()
    x = contract_input()
    with torch.no_grad():
        for xb in (x, x[:1]):
            assert (dyn(xb) - model(xb)).abs().max() <= 1e-5
            with dyn.static():
                assert torch.equal(dyn(xb), model(xb))
    # The experts really differ (zero-sum perturbation): else they could never diverge.
    experts_of = dyn.wrappers[0].experts
    assert (experts_of[0] - experts_of[1]).abs().max() > 0


def test_resnet20_converted_is_the_original_and_keeps_its_batch_norm():
    torch.manual_seed(0)
    model = randomize_bn(cifar_resnet20()).eval()
    x = torch.randn(4, 3, 32, 32)
    dyn = dynify.convert(model, "dynamic-conv", x[:1]).eval()
    assert dyn.num_convs == 18  # two 3x3 convs in each of the 9 blocks
    with torch.no_grad():
        expected = model(x)
        # Rounding only: the aggregated kernel sums K equal experts in another order.
        assert (dyn(x) - expected).abs().max() <= 1e-6 * expected.abs().max()
        with dyn.static():
            assert torch.equal(dyn(x), model(x))
    # The batch norm after each dynamic conv is still the network's own.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in dyn.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()
    )


def test_a_batch_equals_its_samples_run_alone_and_samples_choose_differently():
    dyn = convert(convs="all").eval()
    spread_routers(dyn)
    x = contract_input()
    with torch.no_grad():
        batch, chosen = dyn(x), dyn.last_experts.clone()
        alone = [dyn(x[i : i + 1]) for i in range(len(x))]
        alone_chosen = []
        for i in range(len(x)):
            dyn(x[i : i + 1])
            alone_chosen.append(dyn.last_experts)
    assert (batch - torch.cat(alone)).abs().max() <= 1e-5
    assert torch.equal(chosen, torch.cat(alone_chosen))
    assert chosen.shape == (len(x), dyn.num_convs)
    assert len({tuple(row.tolist()) for row in chosen}) >= 2


def test_macs_are_the_static_network_plus_routers_and_kernel_mixing():
    """What FlopCounterMode counts for the router's two layers and the [N, K] x [K, P] mix."""
    dyn = convert(convs="all")
    extra = 0
    for w in dyn.wrappers:
        conv, k = w.conv, w.num_experts
        hidden = w.router.fc1.out_features
        extra += conv.in_channels * hidden + hidden * k  # router
        extra += k * conv.weight.numel()  # kernel mixing
        extra += 0 if conv.bias is None else k * conv.out_channels  # bias mixing
    assert dyn.dynamic_macs() == dyn.static_macs + extra
    with torch.no_grad():
        dyn(contract_input())
    assert dyn.last_macs.tolist() == [dyn.static_macs + extra] * len(contract_input())
    with torch.no_grad(), dyn.static():
        dyn(contract_input())
    assert dyn.last_macs.tolist() == [dyn.static_macs] * len(contract_input())


def test_router_temperature_anneals_linearly_and_is_carried_by_the_state(tmp_path):
    assert annealed_temperature(0, 30.0, 1.0, 100) == 30.0
    assert annealed_temperature(50, 30.0, 1.0, 100) == pytest.approx(15.5)
    assert annealed_temperature(500, 30.0, 1.0, 100) == 1.0
    dyn = convert(anneal_samples=16)
    x = contract_input()
    dyn.train()
    dyn.training_loss(x)  # 8 samples: half way
    assert float(dyn.router_temperature) == pytest.approx(15.5)
    assert int(dyn.trained_samples) == 8
    dyn.eval()
    loaded = dynify.load(dynify.save(dyn, tmp_path / "m.dyn"), model=ContractNet())
    assert float(loaded.router_temperature) == pytest.approx(15.5)
    assert int(loaded.trained_samples) == 8


def test_joint_finetune_moves_the_routers_and_the_experts_diverge():
    torch.manual_seed(0)
    dyn = convert(initial_temperature=1.0)
    images = torch.randn(96, 3, 24, 24)
    labels = torch.randint(0, 5, (96,))
    before = [w.experts.detach().clone() for w in dyn.wrappers]
    dynify.finetune(
        dyn,
        (images, labels),
        mode="joint",
        epochs=2,
        batch_size=32,
        calibration_fraction=0,
        augment=False,
        progress=False,
    )
    for w, experts in zip(dyn.wrappers, before, strict=True):
        assert w.router.fc2.weight.abs().max() > 1e-4  # started at zero
        moved = w.experts.detach() - experts
        # Each expert moved its own way, not only along the common update.
        assert (moved - moved.mean(0)).abs().max() > 1e-6
    assert int(dyn.trained_samples) == 192


def test_heads_finetune_trains_experts_and_routers_only_and_checkpoints_the_schedule(tmp_path):
    from dynify.train.checkpoint import load_checkpoint_weights

    torch.manual_seed(0)
    model = contract_model()
    dyn = convert(model, initial_temperature=2.0, anneal_samples=128)
    backbone = {n: p.detach().clone() for n, p in dyn.named_parameters() if "experts" not in n}
    backbone = {n: p for n, p in backbone.items() if "router" not in n and "expert_bias" not in n}
    images = torch.randn(64, 3, 24, 24)
    dynify.finetune(
        dyn,
        images,
        mode="heads",
        epochs=1,
        batch_size=32,
        calibration_fraction=0,
        augment=False,
        progress=False,
        checkpoint=tmp_path / "run.ckpt",
    )
    for name, p in dyn.named_parameters():
        if name in backbone:
            assert torch.equal(p, backbone[name]), name
    assert all(w.router.fc2.weight.abs().max() > 0 for w in dyn.wrappers)
    with torch.no_grad(), dyn.static():  # the static network did not move
        assert torch.equal(dyn(contract_input()), model(contract_input()))
    weights = load_checkpoint_weights(tmp_path / "run.ckpt")
    assert int(weights["trained_samples"]) == 64
    assert float(weights["router_temperature"]) == pytest.approx(2.0 - 64 / 128)


def test_the_export_path_computes_the_grouped_path_at_the_same_cost():
    """im2col x per-sample kernels (the ONNX face) == one grouped conv (eager), on a conv with
    groups, stride, dilation and a bias."""
    from torch.utils.flop_counter import FlopCounterMode

    from dynify.runtime.dynamic_conv import DynamicConv

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4)
    wrapper = DynamicConv(conv, experts=3, hidden=16, noise=0.5, seed=0)
    with torch.no_grad():
        wrapper.router.fc2.weight.normal_()
    x = torch.randn(5, 8, 11, 11)
    counts = []
    outputs = []
    for exporting in (False, True):
        wrapper.calls.exporting = exporting
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            outputs.append(wrapper(x))
        counts.append(counter.get_total_flops())
    assert outputs[0].shape == conv(x).shape
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5
    assert counts[0] == counts[1]


def test_bad_options_are_refused():
    with pytest.raises(StrategyError, match="at least 2"):
        convert(experts=1)
    with pytest.raises(StrategyError, match="not Conv2d nodes"):
        convert(convs=["fc"])
    with pytest.raises(StrategyError, match="convs must be one of"):
        convert(convs="some")
    with pytest.raises(StrategyError, match="initial_temperature must be positive"):
        convert(initial_temperature=0.0)


@pytest.mark.slow
def test_onnx_export_is_the_aggregated_kernel_graph_and_matches_eager(tmp_path):
    import onnx

    dyn = convert(convs="all").eval()
    spread_routers(dyn)
    report = dynify.export_onnx_report(dyn, tmp_path / "m.onnx")  # verified: parity or refusal
    assert report.report.ok
    graph = onnx.load(report.path).graph
    ops = {node.op_type for node in graph.node}
    assert "If" not in ops and "MatMul" in ops
    assert [i.name for i in graph.input] == ["x", "thresholds"]
