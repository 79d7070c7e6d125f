"""Graph surgery (dynify.passes.rewrite): each transform as a before/expected pair, provenance,
lint, and the regions it must refuse."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn
from torch.fx.traceback import NodeSource

import dynify
from dynify.errors import StrategyError
from dynify.frontend import profile
from dynify.passes.rewrite import (
    PASS_KEY,
    copy_graph_replacing,
    insert_after,
    lift_region,
    replace_region,
    source_names,
)


class ScaledBlock(nn.Module):
    """relu -> a residual block whose branch reads a parameter (a get_attr constant) -> relu."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.full((1, 4, 1, 1), 0.5))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(x)
        z = torch.relu(y + self.conv2(torch.relu(self.conv1(y))) * self.scale)
        return self.head(z)


class Placeholder(nn.Module):
    """Stands for a wrapper in an expected graph (only its call site matters)."""

    def forward(self, *args):
        return args[0]


class _KeepPlaceholders(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Placeholder) or super().is_leaf_module(m, qualname)


def trace_expected(model: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(model, _KeepPlaceholders().trace(model))


BLOCK = ["conv1", "relu_1", "conv2", "mul", "add"]  # the residual block, join included


def traced(model: nn.Module) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(model)
    profile(gm, torch.randn(1, 4, 6, 6))
    return gm


def structure(gm: torch.fx.GraphModule) -> list[tuple]:
    """The graph as (op, target, argument positions): equal for graphs that compute alike."""
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}

    def arg(a):
        return ("node", index[a]) if isinstance(a, torch.fx.Node) else a

    def target(node):
        return node.target if isinstance(node.target, str) else node.target.__name__

    return [
        (n.op, target(n) if n.op != "placeholder" else "", tuple(arg(a) for a in n.args))
        for n in nodes
    ]


class TestReplaceRegionByItsLiftedModule:
    """Replacing a single-entry single-exit region by its own lifted module leaves one call at
    the region's output, computes the same values, and drops what only the region used."""

    @staticmethod
    def before() -> torch.fx.GraphModule:
        torch.manual_seed(0)
        return traced(ScaledBlock().eval())

    @staticmethod
    def expected() -> torch.fx.GraphModule:
        class Expected(nn.Module):
            def __init__(self):
                super().__init__()
                self.block_0 = Placeholder()
                self.head = nn.Conv2d(4, 2, 1)

            def forward(self, x):
                return self.head(torch.relu(self.block_0(torch.relu(x))))

        return trace_expected(Expected())

    def rewrite(self, gm: torch.fx.GraphModule) -> torch.fx.Node:
        region = lift_region(gm, BLOCK, ["relu"], ["add"])
        return replace_region(gm, BLOCK, ["relu"], ["add"], region, "block", pass_name="test")

    def test_graph_is_the_expected_one(self):
        gm = self.before()
        self.rewrite(gm)
        assert structure(gm) == structure(self.expected())
        gm.graph.lint()

    def test_values_are_unchanged(self):
        gm = self.before()
        x = torch.randn(2, 4, 6, 6)
        reference = gm(x)
        self.rewrite(gm)
        assert torch.equal(gm(x), reference)

    def test_call_keeps_the_output_name_and_shape(self):
        gm = self.before()
        shape = next(n for n in gm.graph.nodes if n.name == "add").meta["tensor_meta"].shape
        call = self.rewrite(gm)
        assert (call.name, call.op, call.target) == ("add", "call_module", "block_0")
        assert call.meta["tensor_meta"].shape == shape

    def test_only_the_region_uses_are_dropped(self):
        gm = self.before()
        self.rewrite(gm)
        assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # `scale` was the region's
        assert set(dict(gm.named_children())) == {"block_0", "head"}
        assert {n for n, _ in gm.block_0.named_parameters()} == {
            "scale",
            "conv1.weight",
            "conv1.bias",
            "conv2.weight",
            "conv2.bias",
        }


class TestReplaceRegionProvenance:
    """The node a rewrite makes records its pass, the nodes it replaced, and their MACs."""

    def test_pass_and_sources_recorded(self):
        gm = TestReplaceRegionByItsLiftedModule.before()
        macs = sum(n.meta["macs"] for n in gm.graph.nodes if n.name in BLOCK)
        call = replace_region(gm, BLOCK, ["relu"], ["add"], Placeholder(), "gate", pass_name="p")
        assert call.meta[PASS_KEY] == "p"
        assert source_names(call) == BLOCK
        sources = call.meta["from_node"]
        assert all(isinstance(s, NodeSource) for s in sources)
        assert {(s.pass_name, s.to_dict()["action"]) for s in sources} == {("p", "replace")}
        assert call.meta["macs"] == macs > 0

    def test_original_nodes_have_no_provenance(self):
        gm = TestReplaceRegionByItsLiftedModule.before()
        replace_region(gm, BLOCK, ["relu"], ["add"], Placeholder(), "gate", pass_name="p")
        made = [n.name for n in gm.graph.nodes if PASS_KEY in n.meta]
        assert made == ["add"]
        assert source_names(next(n for n in gm.graph.nodes if n.name == "relu")) == []

    def test_each_pass_records_itself_on_its_wrappers(self, tiny_model, tiny_input):
        for strategy, prefix in (("block-gates", "gate_"), ("spatial-masks", "spatial_mask_")):
            dyn = dynify.convert(tiny_model, strategy=strategy, example_input=tiny_input[:1])
            graph = (dyn.gm if strategy == "block-gates" else dyn.net).graph
            wrappers = [n for n in graph.nodes if str(n.target).startswith(prefix)]
            assert wrappers and all(n.meta[PASS_KEY] == strategy for n in wrappers)
            assert all(source_names(n) for n in wrappers)


class TestReplaceRegionNames:
    """New modules get the smallest free `<prefix>_<i>`, never an existing attribute's name."""

    def test_names_skip_existing_attributes(self):
        class OwnsGate0(ScaledBlock):  # a model may already own the first name
            def __init__(self):
                super().__init__()
                self.gate_0 = nn.ReLU()

            def forward(self, x):
                return self.gate_0(super().forward(x))

        gm = traced(OwnsGate0())
        call = replace_region(gm, BLOCK, ["relu"], ["add"], Placeholder(), "gate", pass_name="p")
        assert call.target == "gate_1"
        after = insert_after(gm, "relu", Placeholder(), "gate", pass_name="p")
        assert after.target == "gate_2"


class TestReplaceRegionRefusals:
    """A region that is not single-entry single-exit is refused with a message, graph intact."""

    def assert_refused(self, nodes, inputs, outputs, message):
        gm = TestReplaceRegionByItsLiftedModule.before()
        code = gm.code
        with pytest.raises(StrategyError, match=message):
            replace_region(gm, nodes, inputs, outputs, Placeholder(), "gate", pass_name="p")
        assert gm.code == code and not hasattr(gm, "gate_0")

    def test_not_single_entry(self):
        # conv2's region reads relu_1, which is neither inside it nor an input
        self.assert_refused(["conv2", "mul", "add"], ["relu"], ["add"], "not a single-entry")

    def test_not_single_exit(self):
        # the block's input relu is also read by the join, outside the region
        self.assert_refused(["relu", "conv1", "relu_1"], ["x"], ["relu_1"], "not a single-exit")

    def test_output_not_last(self):
        self.assert_refused(["conv1", "relu_1"], ["relu"], ["conv1"], "not a single-exit")

    def test_two_outputs(self):
        self.assert_refused(BLOCK, ["relu"], ["relu_1", "add"], "one output")

    def test_unknown_node(self):
        self.assert_refused(["conv9"], ["relu"], ["conv9"], "not nodes of this graph")


class TestInsertAfter:
    """A module inserted after a node reads it, and every other user reads the module instead."""

    def test_graph_is_the_expected_one(self):
        gm = TestReplaceRegionByItsLiftedModule.before()
        call = insert_after(gm, "relu_2", Placeholder(), "mix", pass_name="p")

        class Expected(ScaledBlock):
            def __init__(self):
                super().__init__()
                self.mix_0 = Placeholder()

            def forward(self, x):
                y = torch.relu(x)
                z = torch.relu(y + self.conv2(torch.relu(self.conv1(y))) * self.scale)
                return self.head(self.mix_0(z))

        assert structure(gm) == structure(trace_expected(Expected()))
        assert call.meta[PASS_KEY] == "p" and source_names(call) == ["relu_2"]
        assert "macs" not in call.meta  # a new module's cost is its wrapper's to count


class TestCopyGraphReplacing:
    """The copy runs the same graph over the same modules, except the replaced ones; the
    original is untouched."""

    def test_replaced_module_is_called_and_the_rest_shared(self):
        gm = TestReplaceRegionByItsLiftedModule.before()
        code = gm.code
        double = nn.Conv2d(4, 4, 3, padding=1)
        copy = copy_graph_replacing(gm, {"conv2": double}, class_name="Copy")
        assert copy.conv2 is double and gm.conv2 is not double
        assert copy.conv1 is gm.conv1 and copy.scale is gm.scale
        assert type(copy).__name__ == "Copy" and gm.code == code
        x = torch.randn(1, 4, 6, 6)
        with torch.no_grad():
            double.weight.copy_(gm.conv2.weight)
            double.bias.copy_(gm.conv2.bias)
        assert torch.equal(copy(x), gm(x))
        with torch.no_grad():
            double.bias.add_(1.0)
        assert not torch.equal(copy(x), gm(x))

    def test_extra_input_reaches_replacing_modules_last(self):
        gm = TestReplaceRegionByItsLiftedModule.before()

        class Shift(nn.Module):
            def forward(self, x, shift):
                return x + shift

        copy = copy_graph_replacing(gm, {"head": Shift()}, extra_input="shift")
        x = torch.randn(1, 4, 6, 6)
        body = gm.graph.find_nodes(op="call_module", target="head")[0].args[0].name
        inner = lift_region(gm, [n.name for n in gm.graph.nodes][1:-2], ["x"], [body])
        assert torch.equal(copy(x, 3.0), inner(x) + 3.0)
        assert [n.name for n in copy.graph.find_nodes(op="placeholder")] == ["x", "shift"]

    def test_module_order_is_the_original_one(self):
        gm = TestReplaceRegionByItsLiftedModule.before()
        copy = copy_graph_replacing(gm, {"conv1": nn.Identity()})
        assert list(dict(copy.named_children())) == list(dict(gm.named_children()))

    def test_unknown_target_refused(self):
        gm = TestReplaceRegionByItsLiftedModule.before()
        with pytest.raises(KeyError, match="conv9"):
            copy_graph_replacing(gm, {"conv9": nn.Identity()})


class TestLiftRegion:
    """A lifted region computes its output from its inputs alone, constants copied in."""

    def test_lifted_block_equals_the_block(self):
        gm = TestReplaceRegionByItsLiftedModule.before()
        region = lift_region(gm, BLOCK, ["relu"], ["add"])
        y = torch.relu(torch.randn(1, 4, 6, 6))
        block = gm.conv2(torch.relu(gm.conv1(y))) * gm.scale + y
        assert torch.equal(region(y), block)
        assert region.scale is gm.scale  # a view of the same parameters
        region.graph.lint()

    def test_not_single_entry_refused(self):
        gm = TestReplaceRegionByItsLiftedModule.before()
        with pytest.raises(StrategyError, match="reads 'relu_1' from outside its inputs"):
            lift_region(gm, ["conv2", "mul", "add"], ["relu"], ["add"])


class TestSparseBranchCopies:
    """The spatial-mask wrapper's copies of its branch (valid convs on tiles, convs at chosen
    pixels) compute the dense branch times the mask, even when the branch calls a conv twice."""

    class SharedConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(torch.relu(self.bn(self.conv(x))))

    @pytest.mark.parametrize("granularity", ["pixel", "region"])
    def test_sparse_equals_dense_masked(self, granularity):
        from dynify.frontend import profile
        from dynify.runtime.sparse_residual import SparseResidual

        torch.manual_seed(0)
        branch = torch.fx.symbolic_trace(self.SharedConv().eval())
        profile(branch, torch.randn(1, 4, 8, 8))  # the MACs per node, as a pass's branch has them
        wrapper = SparseResidual(
            branch,
            in_channels=4,
            out_channels=4,
            granularity=granularity,
            tile=4,
            branch_macs=0,
            spatial=(8, 8),
        ).eval()
        x = torch.randn(2, 4, 8, 8)
        active = torch.rand(2, *wrapper.units(), generator=torch.Generator().manual_seed(1)) < 0.4
        assert 0 < int(active.sum()) < active.numel()
        with torch.no_grad():
            reference = wrapper.dense_masked(x, active)
            if granularity == "pixel":
                out, macs = wrapper.pixel_forward(x, active)
                dense = 2 * (4 * 4 * 9) * 64  # two 3x3 convs, 4 -> 4 channels, 8x8 positions
                assert 0 < int(macs.sum()) < x.shape[0] * dense
            else:
                out = wrapper.tile_forward(x, active)
        assert (out - reference).abs().max().item() <= 1e-5
        # the copies re-use the branch's modules: no second copy in the state dict
        assert {k.split(".")[0] for k in wrapper.state_dict()} == {"branch", "mask_unit"}
