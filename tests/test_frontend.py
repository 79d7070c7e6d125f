"""The front end: tracing errors, MAC counts, cut points and residual blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynify.errors import TraceError
from dynify.frontend import analyse, profile, symbolic_trace
from dynify.frontend.trace import TraceOptions
from dynify.models.cifar_resnet import cifar_resnet20


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: fx cannot trace this
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = DataDependent()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.gate(self.conv(x))
        return self.fc(x.mean((2, 3)))


def test_trace_error_names_module_line_and_leaf_hint():
    with pytest.raises(TraceError) as info:
        symbolic_trace(Net())
    message = str(info.value)
    assert "module 'gate' (DataDependent)" in message
    assert "if x.sum() > 0" in message  # the user's source line
    assert "--leaf gate" in message and "leaf_modules=['gate']" in message


def test_leaf_module_makes_untraceable_model_traceable():
    net = Net().eval()
    gm = symbolic_trace(net, TraceOptions(leaf_modules=["gate"]))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), net(x))
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


def test_macs_match_hand_count_for_conv_and_linear():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    gm = symbolic_trace(net)
    profile(gm, torch.randn(1, 3, 4, 4))
    macs = {n.name: n.meta["macs"] for n in gm.graph.nodes}
    assert macs["_0"] == 8 * 4 * 4 * 3 * 3 * 3
    assert macs["_2"] == 8 * 4 * 4 * 10
    assert analyse(gm).total_macs == macs["_0"] + macs["_2"]


def test_cut_points_exclude_places_where_two_tensors_cross(tiny_model):
    gm = symbolic_trace(tiny_model)
    profile(gm, torch.randn(1, 3, 16, 16))
    analysis = analyse(gm)
    cut_names = [c.node for c in analysis.cuts]
    # inside a residual block both the shortcut and the branch are live: no cut there
    assert "block1_0" not in cut_names and "block2_1" not in cut_names
    assert "relu" in cut_names and "relu_1" in cut_names  # after each block's join
    fractions = [c.fraction for c in analysis.cuts]
    assert fractions == sorted(fractions) and fractions[0] > 0 and fractions[-1] < 1


def test_residual_blocks_and_shortcut_kinds(tiny_model):
    gm = symbolic_trace(tiny_model)
    profile(gm, torch.randn(1, 3, 16, 16))
    blocks = analyse(gm).blocks
    assert [b.identity for b in blocks] == [True, False]
    assert blocks[0].shortcut == () and blocks[1].shortcut == ("down",)
    assert blocks[1].branch == ("block2_0", "block2_1")


def test_cifar_resnet_option_a_blocks_and_stages():
    gm = symbolic_trace(cifar_resnet20().eval())
    profile(gm, torch.randn(1, 3, 32, 32))
    analysis = analyse(gm)
    assert len(analysis.blocks) == 9
    # option-A shortcuts (subsample + zero-pad) are not identity, and have no MACs
    assert [b.identity for b in analysis.blocks] == [True] * 3 + [False, True, True] * 2
    assert all(b.shortcut_macs == 0 for b in analysis.blocks)
    assert [len(s.blocks) for s in analysis.stages] == [3, 3, 3]
    assert [s.shape for s in analysis.stages] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert analysis.total_macs == pytest.approx(40.55e6, rel=0.01)  # ResNet-20: 41 M MACs


@pytest.mark.parametrize("name", ["test_vit", "test_convnext", "test_efficientnet", "test_maxvit"])
def test_timm_models_convert_with_static_equivalence(name):
    """timm's tiny test architectures: optional forward arguments, channels-last blocks."""
    import dynify
    from dynify.zoo import build_model

    torch.manual_seed(0)
    model, ref = build_model(f"timm:{name}", weights="random")
    x = torch.randn(2, 3, ref.input_size, ref.input_size)
    dyn = dynify.convert(model, example_input=x[:1])
    with torch.no_grad(), dyn.static():
        assert (dyn(x) - model(x)).abs().max().item() <= 1e-5
    assert dyn.num_exits == 4
