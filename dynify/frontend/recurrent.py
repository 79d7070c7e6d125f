"""Recurrent layers: the `nn.LSTM` / `nn.GRU` calls of a traced model, kept whole.

torch.fx keeps torch.nn modules whole, so a recurrent layer is one `call_module` node whose
output is `(sequence, state)`. The temporal strategies (skip-rnn, stop-reading) replace that call
by a step-by-step runtime; this module finds the calls and writes what those strategies plan
from on `node.meta["recurrent"]`: the layer's sizes, its layout, the MACs of one step, and
which of its outputs the rest of the network reads.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx
from torch import nn

from dynify.errors import StrategyError
from dynify.frontend.cost import MACS

RECURRENT = "recurrent"
_KINDS = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn"}
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


@dataclass(frozen=True)
class RecurrentLayer:
    """One `nn.LSTM` / `nn.GRU` / `nn.RNN` call of the graph."""

    node: str
    module: str  # qualified name of the module
    kind: str  # "lstm" | "gru" | "rnn"
    input_size: int
    hidden_size: int
    num_layers: int
    batch_first: bool
    bidirectional: bool
    steps: int  # T of the example input
    macs: int  # per sample, the whole sequence (front end's count)
    step_macs: int  # per sample and step, every layer: what a skipped step saves
    reads_sequence: bool  # the rest of the network reads output[0] (every step's state)
    reads_state: bool  # ... reads output[1] (the final state)
    initial_state: bool  # forward passes an initial state (h0 / (h0, c0))

    def stepwise_blockers(self) -> list[str]:
        """Why a step-by-step strategy cannot run this layer, with what to do."""
        reasons = []
        if self.bidirectional:
            reasons.append(
                "it is bidirectional: the backward direction reads the whole sequence before "
                "the first answer, so no step can be skipped or reading stopped early; use a "
                "uni-directional layer (bidirectional=False)"
            )
        if self.initial_state:
            reasons.append(
                "forward passes it an initial state; call it with the input sequence alone"
            )
        return reasons


def recurrent_layers(gm: torch.fx.GraphModule) -> list[RecurrentLayer]:
    """Every recurrent layer of a profiled graph, in graph order (facts also on node.meta)."""
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        kind = _KINDS.get(type(module))
        if kind is None:
            continue
        layer = _describe(node, module, kind)
        node.meta[RECURRENT] = layer
        layers.append(layer)
    return layers


def _describe(node: torch.fx.Node, module: nn.RNNBase, kind: str) -> RecurrentLayer:
    shape = tuple(node.args[0].meta["tensor_meta"].shape)
    steps = shape[1] if module.batch_first else shape[0]
    directions = 2 if module.bidirectional else 1
    step_macs = 0
    for layer in range(module.num_layers):
        inputs = module.input_size if layer == 0 else module.hidden_size * directions
        step_macs += directions * _GATES[kind] * module.hidden_size * (inputs + module.hidden_size)
    used = {user.args[1] for user in node.users if _is_getitem(user) and user.users}
    opaque = any(not _is_getitem(user) for user in node.users)
    return RecurrentLayer(
        node=node.name,
        module=str(node.target),
        kind=kind,
        input_size=module.input_size,
        hidden_size=module.hidden_size,
        num_layers=module.num_layers,
        batch_first=module.batch_first,
        bidirectional=module.bidirectional,
        steps=int(steps),
        macs=int(node.meta.get(MACS, 0)),
        step_macs=step_macs,
        reads_sequence=opaque or 0 in used,
        reads_state=opaque or 1 in used,
        initial_state=len(node.args) > 1 or bool(node.kwargs),
    )


def _is_getitem(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def require_stepwise(layers: list[RecurrentLayer], strategy: str) -> list[RecurrentLayer]:
    """The layers a step-by-step strategy can run, or a StrategyError saying what to change."""
    if not layers:
        raise StrategyError(
            f"{strategy} needs a recurrent layer (nn.LSTM, nn.GRU or nn.RNN) called as a module "
            "in forward; none was found in the traced graph. `dynify inspect` shows the graph."
        )
    for layer in layers:
        blockers = layer.stepwise_blockers()
        if blockers:
            raise StrategyError(
                f"{strategy} cannot run '{layer.module}' step by step: " + "; ".join(blockers) + "."
            )
    return layers


__all__ = ["RECURRENT", "RecurrentLayer", "recurrent_layers", "require_stepwise"]
