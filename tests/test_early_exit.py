"""The early-exit strategy: exact static equivalence, real skipping, batch == per sample."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import dynify
from dynify.errors import InputError, StrategyError
from dynify.models.cifar_resnet import cifar_resnet20
from tests.conftest import randomize_bn


def trained_heads(dyn, seed: int = 0):
    """Random head weights: untrained (zero) heads would never exit at a real threshold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in dyn.heads:
            w = head.classifier.weight
            w.copy_(torch.randn(w.shape, generator=generator) * 3.0 / w.shape[1] ** 0.5)
    return dyn


def test_freshly_converted_model_never_exits(tiny_model, tiny_input):
    """Zero-initialised heads predict the uniform distribution, below any useful threshold."""
    dyn = dynify.convert(tiny_model, example_input=tiny_input[:1])
    with torch.no_grad():
        out = dyn(tiny_input)
    assert torch.allclose(out, tiny_model(tiny_input), atol=1e-6)
    assert dyn.last_exit.tolist() == [dyn.num_exits] * len(tiny_input)


@pytest.mark.parametrize(
    "name,size",
    [
        ("resnet18", 64),
        ("mobilenet_v3_small", 64),
        ("efficientnet_b0", 64),
        ("densenet121", 64),
        ("convnext_tiny", 64),
        ("swin_t", 64),
        ("vit_b_16", 224),
        ("googlenet", 64),
    ],
)
def test_torchvision_models_static_equivalence(name, size):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.get_model(name, weights=None))
    x = torch.randn(2, 3, size, size)
    dyn = dynify.convert(model, example_input=x[:1])
    assert dyn.num_exits == 4
    with torch.no_grad():
        expected = model(x)
        with dyn.static():
            got = dyn(x)
    assert (got - expected).abs().max().item() <= 1e-5
    assert all(m < 0.02 * dyn.static_macs for m in dyn.head_macs)


def test_cifar_resnet_with_option_a_shortcut_static_equivalence():
    model = randomize_bn(cifar_resnet20())
    x = torch.randn(4, 3, 32, 32)
    dyn = dynify.convert(model, example_input=x[:1])
    with torch.no_grad(), dyn.static():
        assert torch.equal(dyn(x), model(x))
    fractions = [float(r["of static"]) for r in dyn.describe()[:-1]]
    assert fractions == sorted(fractions)
    assert fractions[0] == pytest.approx(0.2, abs=0.1) and fractions[-1] == pytest.approx(
        0.8, abs=0.1
    )


def test_threshold_zero_exits_at_first_exit_and_later_segments_never_run(tiny_model, tiny_input):
    dyn = trained_heads(
        dynify.convert(tiny_model, example_input=tiny_input[:1], options={"exits": 2})
    )
    calls = [0] * len(dyn.segments)
    for i, segment in enumerate(dyn.segments):
        segment.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    dyn.set_thresholds(0.0)
    with torch.no_grad():
        out = dyn(tiny_input)
        first = dyn.heads[0](dyn.segments[0](tiny_input))
    assert calls == [2, 0, 0]  # segment 0 ran twice (forward + the reference), nothing else
    assert torch.allclose(out, first)
    assert dyn.last_macs.tolist() == [dyn.segment_macs[0] + dyn.head_macs[0]] * len(tiny_input)


def test_threshold_above_one_runs_everything_and_matches_static(tiny_model, tiny_input):
    dyn = trained_heads(dynify.convert(tiny_model, example_input=tiny_input[:1]))
    dyn.set_thresholds(1.01)
    with torch.no_grad():
        out = dyn(tiny_input)
    assert torch.allclose(out, tiny_model(tiny_input), atol=1e-6)
    assert dyn.last_macs.tolist() == [sum(dyn.segment_macs) + sum(dyn.head_macs)] * len(tiny_input)


def test_entropy_and_patience_policies(tiny_model, tiny_input):
    dyn = trained_heads(
        dynify.convert(
            tiny_model,
            example_input=tiny_input[:1],
            options={"exits": 3, "policy": "patience", "patience": 2},
        )
    )
    dyn.set_thresholds(0.0)
    with torch.no_grad():
        dyn(tiny_input)
        predictions = [logits.argmax(-1) for logits in dyn.exit_logits(tiny_input)]
    # patience 2: a sample leaves at the first exit whose prediction repeats the previous one
    for sample, exit_taken in enumerate(dyn.last_exit.tolist()):
        agree = [k for k in range(1, 3) if predictions[k][sample] == predictions[k - 1][sample]]
        assert exit_taken == (agree[0] if agree else 3)
    entropy = dynify.convert(
        tiny_model, example_input=tiny_input[:1], options={"policy": "entropy"}
    )
    entropy.set_thresholds(0.0)
    with torch.no_grad():
        entropy(tiny_input)
    assert entropy.last_exit.tolist() == [0] * len(tiny_input)


def test_exit_placement_by_fraction_and_by_name(tiny_model, tiny_input):
    dyn = dynify.convert(tiny_model, example_input=tiny_input[:1], options={"exits": ["relu"]})
    assert dyn.exit_names == ["relu"]
    dyn = dynify.convert(tiny_model, example_input=tiny_input[:1], options={"exits": [0.5]})
    assert dyn.num_exits == 1
    with pytest.raises(StrategyError, match="not a single-tensor cut point"):
        dynify.convert(tiny_model, example_input=tiny_input[:1], options={"exits": ["block1_0"]})
    with pytest.raises(StrategyError, match="Unknown early-exit option"):
        dynify.convert(tiny_model, example_input=tiny_input[:1], options={"exit": 2})


def test_wrong_input_shape_is_a_clear_error(tiny_model, tiny_input):
    dyn = dynify.convert(tiny_model, example_input=tiny_input[:1])
    with pytest.raises(InputError, match=r"Expected an input of shape \[B, 3, 16, 16\]"):
        dyn(torch.randn(2, 3, 32, 32))


def test_unknown_strategy_lists_registered_ones(tiny_model):
    with pytest.raises(StrategyError, match="Registered strategies: .*early-exit"):
        dynify.convert(tiny_model, strategy="teleport", example_input=torch.randn(1, 3, 16, 16))


def test_model_returning_a_tuple_is_refused():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))
            return y, y

    with pytest.raises(StrategyError, match="one logits tensor"):
        dynify.convert(TwoHeads(), example_input=torch.randn(1, 3, 8, 8))


def test_head_kinds_conv_where_it_fits_linear_on_imagenet_maps():
    small = dynify.convert(cifar_resnet20(), example_input=torch.zeros(1, 3, 32, 32))
    conv = [head.reduce[0] for head in small.heads]
    assert all(isinstance(c, nn.Conv2d) and c.stride == (2, 2) for c in conv)
    assert all(c.out_channels in (c.in_channels, 2 * c.in_channels) for c in conv)
    budget = 0.02 * small.static_macs
    assert all(m <= budget for m in small.head_macs)  # the conv counts in the head budget

    linear = dynify.convert(
        cifar_resnet20(), example_input=torch.zeros(1, 3, 32, 32), options={"head": "linear"}
    )
    assert not any(isinstance(m, nn.Conv2d) for m in linear.heads.modules())
    # ImageNet-sized early maps are too large for a useful conv within 2 %: auto stays linear
    big = dynify.convert(torchvision.models.resnet18(), example_input=torch.zeros(1, 3, 224, 224))
    assert not any(isinstance(m, nn.Conv2d) for m in big.heads.modules())


def test_conv_head_on_tokens_and_unknown_head_kind_are_clear_errors(tiny_model, tiny_input):
    with pytest.raises(StrategyError, match="one of"):
        dynify.convert(tiny_model, example_input=tiny_input[:1], options={"head": "mlp"})
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
    with pytest.raises(StrategyError, match="needs a conv map"):
        dynify.convert(vit, example_input=torch.zeros(1, 3, 32, 32), options={"head": "conv"})


def test_conv_head_folds_batch_norm_at_inference_only():
    """Eval + no_grad: the conv head runs with its BN folded into the conv, giving the module
    path's logits; the cache follows in-place weight changes; training keeps gradients."""
    from dynify.runtime.heads import ExitHead

    torch.manual_seed(0)
    head = randomize_bn(ExitHead((16, 8, 8), 10, "channels_first", pool=2, conv=24))
    with torch.no_grad():
        head.classifier.weight.normal_()
    feature = torch.randn(3, 16, 8, 8)
    head.eval()
    reference = head(feature).detach()  # autograd on: the module path
    with torch.no_grad():
        torch.testing.assert_close(head(feature), reference, atol=1e-5, rtol=1e-5)
        head.reduce[1].weight.mul_(2.0)
        changed = head(feature)
    torch.testing.assert_close(changed, head(feature).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed, reference)
    head.train()
    head(feature).sum().backward()
    assert head.reduce[0].weight.grad is not None


@pytest.mark.parametrize("shape, pool, hidden", [((16, 8, 8), 2, None), ((16, 10, 10), 3, 12)])
def test_folded_head_pools_and_bottleneck_like_the_module_path(shape, pool, hidden):
    """The folded fast path (channels-last conv, plain or adaptive pool, bottleneck) computes
    the module path's logits, also when the map does not divide by the pool size."""
    from dynify.runtime.heads import ExitHead

    torch.manual_seed(1)
    head = randomize_bn(ExitHead(shape, 10, "channels_first", pool=pool, hidden=hidden, conv=24))
    with torch.no_grad():
        head.classifier.weight.normal_()
    head.eval()
    feature = torch.randn(2, *shape)
    reference = head(feature).detach()
    with torch.no_grad():
        torch.testing.assert_close(head(feature), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["confidence", "entropy"])
def test_python_exit_score_equals_the_tensor_path(kind):
    from dynify.runtime.decisions import exit_score_one, exit_scores

    logits = torch.randn(200, 10) * torch.rand(200, 1) * 8
    logits[0] = 0.0  # uniform: entropy score 0, confidence 1 / C
    for temperature in (0.5, 1.0, 2.3):
        tensor = exit_scores(logits, torch.tensor(temperature), kind)
        python = [exit_score_one(row, temperature, kind) for row in logits.tolist()]
        torch.testing.assert_close(
            torch.tensor(python, dtype=torch.float64), tensor.double(), atol=1e-6, rtol=0
        )


def test_batch_one_decides_a_tie_exactly_like_the_tensor_path():
    """A threshold equal to the sample's float32 score exits it (>=), one a float32 step above
    does not: the batch-1 path decides in Python floats but settles ties with `exit_scores`."""
    from dynify.runtime.decisions import exit_scores

    torch.manual_seed(0)
    model = randomize_bn(cifar_resnet20())
    x = torch.randn(1, 3, 32, 32)
    dyn = trained_heads(dynify.convert(model, example_input=x, options={"exits": 2})).eval()
    with torch.no_grad():
        score = exit_scores(dyn.exit_logits(x)[0], dyn.temperatures[0], "confidence")[0]
        above = torch.nextafter(score, torch.tensor(2.0))
        for threshold, exits_first in ((score, True), (above, False)):
            dyn.set_thresholds([float(threshold), 1.01])
            dyn(x)
            assert (dyn.last_exit.tolist() == [0]) == exits_first


def test_batch_one_records_are_read_back_and_replaced(tiny_model, tiny_input):
    """A batch-1 forward's last_exit / last_macs (kept as ints until read) are right, and a
    later batch forward's values replace them."""
    dyn = trained_heads(dynify.convert(tiny_model, example_input=tiny_input[:1]))
    dyn.set_thresholds(0.0)
    with torch.no_grad():
        dyn(tiny_input[:1])
        assert dyn.last_exit.tolist() == [0]
        assert dyn.last_macs.tolist() == [dyn.exit_macs()[0]]
        dyn(tiny_input[:1])
        dyn.set_thresholds(1.01)
        dyn(tiny_input[:3])
    assert dyn.last_exit.tolist() == [dyn.num_exits] * 3
    assert dyn.last_macs.tolist() == [dyn.exit_macs()[-1]] * 3
    assert dyn.mean_macs_fraction() == dyn.exit_macs()[-1] / dyn.static_macs


@pytest.mark.parametrize("policy", ["confidence", "entropy"])
def test_non_finite_scores_leave_and_a_forced_exit_holds_for_every_input(
    tiny_model, tiny_input, policy
):
    """NaN, inf and huge inputs make the exit scores NaN: that counts as certain, so such a
    sample leaves at the first exit that is switched on, and a forced exit (a MAC cap) holds,
    batched and at batch 1 alike."""
    dyn = trained_heads(
        dynify.convert(
            tiny_model, example_input=tiny_input[:1], options={"exits": 2, "policy": policy}
        )
    ).eval()
    x = tiny_input.clone()
    for i, value in enumerate([float("nan"), float("inf"), float("-inf"), 3e38]):
        x[i, 0, 3, 3] = value
    cap = dyn.exit_macs()[1]
    for thresholds, expected in [([1.01, 0.0], 1), ([1.01, 1.01], 2)]:
        dyn.set_thresholds(thresholds)
        with torch.no_grad():
            dyn(x)
            batched = dyn.last_exit.tolist()
            alone = []
            for sample in x:
                dyn(sample[None])
                alone.append(int(dyn.last_exit[0]))
        assert batched == alone
        if expected == 1:
            assert batched == [1] * len(x) and int(dyn.last_macs.max()) <= cap
    dyn.set_thresholds([0.99, 0.99])
    with torch.no_grad():
        dyn(x[:4])
    assert dyn.last_exit.tolist() == [0, 0, 0, 0]


def test_set_thresholds_refuses_a_wrong_count_and_non_finite_values(tiny_model, tiny_input):
    dyn = dynify.convert(tiny_model, example_input=tiny_input[:1], options={"exits": 2})
    before = dyn.thresholds.clone()
    for bad in ([0.5], [0.5, 0.5, 0.5], [0.5, float("nan")], float("inf")):
        with pytest.raises(StrategyError):
            dyn.set_thresholds(bad)
    assert torch.equal(dyn.thresholds, before)
    dyn.set_thresholds(torch.tensor([0.2, 0.3]))
    assert dyn.thresholds.tolist() == pytest.approx([0.2, 0.3])


def test_static_mode_and_records_are_per_thread(tiny_model, tiny_input):
    """A thread inside `static()` leaves other threads' calls dynamic, and `last_macs` /
    `last_exit` read after a call are that call's, with calls running concurrently."""
    import copy
    import threading

    dyn = trained_heads(
        dynify.convert(tiny_model, example_input=tiny_input[:1], options={"exits": 2})
    ).eval()
    dyn.set_thresholds(0.0)  # dynamic: everyone leaves at exit 0
    with torch.no_grad():
        dynamic_out = {n: dyn(tiny_input[:n]) for n in (1, 3)}
        with dyn.static():
            static_out = dyn(tiny_input)
    assert not torch.allclose(dynamic_out[3], static_out[:3])
    inside, errors = threading.Event(), []

    def hold_static() -> None:
        with torch.no_grad(), dyn.static():
            inside.set()
            for _ in range(20):
                if not torch.equal(dyn(tiny_input), static_out):
                    errors.append("static thread got a dynamic output")
                if dyn.last_macs.tolist() != [dyn.static_macs] * len(tiny_input):
                    errors.append("static thread read another call's last_macs")

    def run_dynamic(n: int) -> None:
        inside.wait()
        x = tiny_input[:n]
        with torch.no_grad():
            for _ in range(20):
                if not torch.equal(dyn(x), dynamic_out[n]):
                    errors.append("dynamic thread got a static output")
                if dyn.last_exit.tolist() != [0] * n:
                    errors.append("dynamic thread read another call's last_exit")

    threads = [threading.Thread(target=hold_static)]
    threads += [threading.Thread(target=run_dynamic, args=(n,)) for n in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not dyn.is_static
    twin = copy.deepcopy(dyn)  # the per-thread records do not travel with a copy
    assert twin.last_macs is None and not twin.is_static
