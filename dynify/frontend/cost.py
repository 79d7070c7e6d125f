"""MACs per node, counted by torch.utils.flop_counter rather than by hand.

`profile` runs the traced graph once on an example input (batch 1), so every node's `meta` gets
its output shape (`tensor_meta`, from fx's ShapeProp) and the multiply-accumulates it performs
(`macs`). Everything downstream (cut points, exit placement, cost accounting) reads these facts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

MACS = "macs"


@register_flop_formula(torch.ops.aten.mkldnn_rnn_layer)
def _mkldnn_rnn_layer_flops(input_shape, w_ih_shape, w_hh_shape, *args, **kwargs) -> int:
    """One layer of a fused CPU LSTM (oneDNN), which FlopCounterMode does not know.

    Counted as the cell loop would be (`nn.LSTMCell`: two matmuls per step), so a fused LSTM and
    the step-by-step runtime of the temporal strategies keep one set of books.
    """
    gates, inputs = w_ih_shape
    steps_times_batch = math.prod(input_shape) // inputs
    return 2 * steps_times_batch * gates * (inputs + w_hh_shape[1])


class CostProp(ShapeProp):
    """ShapeProp that also records each node's MACs in `node.meta['macs']`."""

    def run_node(self, n: torch.fx.Node):
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        n.meta[MACS] = counter.get_total_flops() // 2
        return result


@torch.no_grad()
def profile(gm: torch.fx.GraphModule, *example_inputs: torch.Tensor) -> torch.Tensor:
    """Write shapes and MACs onto every node; returns the graph's output for the inputs."""
    return CostProp(gm).propagate(*example_inputs)


def graph_macs(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node] | None = None) -> int:
    """Total MACs of `nodes` (default: the whole graph), from a previous `profile`."""
    nodes = gm.graph.nodes if nodes is None else nodes
    return sum(int(n.meta.get(MACS, 0)) for n in nodes)


@torch.no_grad()
def module_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs of one forward call of `module`, per sample of the given batch."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() > 0 else 1
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2 // max(batch, 1)
