"""The CIFAR ResNet matches He et al. 2016 as the data README describes it, and traces with fx."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynify.errors import ModelError
from dynify.models import (
    PadShortcut,
    cifar_resnet,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    cifar_resnet110,
)

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops gain nothing from threads, and stall badly when parallel jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def expected_keys(n: int) -> set[str]:
    """Keys of the pretrained checkpoints (once `module.` is stripped), from the README."""
    keys = {"conv1.weight", "linear.weight", "linear.bias"} | {f"bn1.{k}" for k in BN_KEYS}
    for stage in (1, 2, 3):
        for i in range(n):
            prefix = f"layer{stage}.{i}"
            keys |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"}
            keys |= {f"{prefix}.bn{j}.{k}" for j in (1, 2) for k in BN_KEYS}
    return keys


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("factory", "params", "paper_millions"),
    [
        (cifar_resnet20, 269_722, 0.27),
        (cifar_resnet32, 464_154, 0.46),
        (cifar_resnet44, 658_586, 0.66),
        (cifar_resnet56, 853_018, 0.85),
        (cifar_resnet110, 1_727_962, 1.7),
    ],
)
def test_parameter_count_matches_paper(factory, params, paper_millions):
    n = count(factory())
    assert n == params
    assert round(n / 1e6, 2 if paper_millions < 1 else 1) == paper_millions


@pytest.mark.parametrize(
    ("factory", "n", "last_key"),
    [(cifar_resnet20, 3, "layer3.2.conv2.weight"), (cifar_resnet44, 7, "layer3.6.conv2.weight")],
)
def test_state_dict_keys_match_checkpoint_layout(factory, n, last_key):
    keys = set(factory().state_dict())
    assert keys == expected_keys(n)
    assert last_key in keys
    assert not any("shortcut" in k for k in keys)


def test_strides_and_widths():
    model = cifar_resnet20().eval()
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert shapes == {"layer1": (1, 16, 32, 32), "layer2": (1, 32, 16, 16), "layer3": (1, 64, 8, 8)}
    assert out.shape == (1, 10)
    with torch.no_grad():
        assert cifar_resnet32(num_classes=100)(torch.randn(1, 3, 8, 8)).shape == (1, 100)


def test_option_a_shortcut_subsamples_and_zero_pads():
    model = cifar_resnet20()
    shortcut = model.layer2[0].shortcut
    assert isinstance(shortcut, PadShortcut)
    assert list(shortcut.parameters()) == [] and list(shortcut.buffers()) == []
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    assert isinstance(model.layer3[0].shortcut, PadShortcut)
    assert model.layer3[0].shortcut.pad_channels == 16
    assert all(
        not isinstance(block.shortcut, PadShortcut)
        for layer in (model.layer1, model.layer2[1:], model.layer3[1:])
        for block in layer
    )


def test_identity_block_computes_readme_formula():
    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    for m in model.modules():  # non-trivial BN statistics, so a skipped BN would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    block = model.layer1[1]
    x = torch.randn(2, 16, 8, 8)
    expected = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + x)
    assert torch.allclose(block(x), expected)


@pytest.mark.parametrize("factory", [cifar_resnet20, cifar_resnet32])
def test_fx_trace_gives_identical_output(factory):
    torch.manual_seed(0)
    model = factory().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"conv1", "layer3.2.conv2", "linear"} <= targets


def test_checkpoint_style_state_dict_loads_strictly():
    source = cifar_resnet44()
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = cifar_resnet44()
    target.load_state_dict({k.removeprefix("module."): v for k, v in wrapped.items()}, strict=True)
    assert torch.equal(target.layer3[6].conv2.weight, source.layer3[6].conv2.weight)


@pytest.mark.parametrize("depth", [18, 21, 2])
def test_invalid_depth_raises_model_error(depth):
    with pytest.raises(ModelError, match="6n"):
        cifar_resnet(depth)
