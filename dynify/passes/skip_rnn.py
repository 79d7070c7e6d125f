"""Skip RNN: per sample, skip the state updates of the steps it does not need.

Plan: take the recurrent layer the front end found (`node.meta["recurrent"]`; an `nn.LSTM` or
`nn.GRU`, uni-directional, called on the sequence alone) and record its node, sizes and per-step
MACs. Build: on a copy of the traced graph, replace the layer's call by a `skip_rnn_<i>`
wrapper holding the original module and a new update gate (`replace_region`); the wrapper
returns what the module returned, so the rest of the network (e.g. the output read at each
text's last token) is unchanged and reads the copied state at skipped steps.

Where the rest of the network reads the layer's outputs only up to each text's end (a gather
at its last token, a padding mask; `dynify.frontend.sequence_reads`), the operand it reads
them with is lifted into its own graph, so the model knows each sample's length before the
layer runs and never updates (nor charges) a padding step. A model that takes lengths or a
mask and reads the padding steps anyway is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dynify.errors import StrategyError
from dynify.frontend.cost import MACS, module_macs
from dynify.frontend.recurrent import RecurrentLayer, require_stepwise
from dynify.frontend.sequence_reads import region, require_read, sequence_read
from dynify.passes import register_strategy
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.passes.rewrite import copy_graph_replacing, lift_region, replace_region
from dynify.runtime.recurrence import ReadLengths
from dynify.runtime.skip_rnn import SkipRNN, SkipRNNModel, cost_book

NAME = "skip-rnn"


@dataclass
class SkipRNNOptions:
    """Options of the skip-rnn strategy (Skip RNN, Campos et al. 2018).

    budget: the share of state updates (per sample and step) fine-tuning steers towards.
    threshold: the initial binarisation threshold (a step updates when the cumulative update
    probability u > 1 - threshold; 0: only the first step, above 1: every step). layer: the
    recurrent module to gate (default: the only one). gate_bias: the gate's initial bias (2:
    every step updates before fine-tuning). compute_weight, budget_rate: the PI controller that
    prices updates during fine-tuning. distill_temperature: the strategy's own distillation
    temperature.
    """

    budget: float = 0.5
    threshold: float = 0.5
    layer: str | None = None
    gate_bias: float = 2.0
    compute_weight: float = 4.0
    budget_rate: float = 0.01
    distill_temperature: float = 2.0


def skip_rnn_options(data: dict[str, Any] | None) -> SkipRNNOptions:
    """The typed options from a plan's or a caller's dict, checked."""
    opts = options_from_dict(SkipRNNOptions, data, NAME)
    if not 0.0 < opts.budget <= 1.0:
        raise StrategyError(f"budget is a share of the state updates in (0, 1]; got {opts.budget}.")
    if opts.threshold < 0:
        raise StrategyError(f"threshold must be 0 or more, got {opts.threshold}.")
    return opts


def skippable_layer(ctx: ConversionContext, name: str | None) -> RecurrentLayer:
    """The recurrent layer to gate, or an error that says what to do."""
    layers = require_stepwise(ctx.analysis.recurrent, NAME)
    if name is not None:
        named = [layer for layer in layers if name in (layer.module, layer.node)]
        if not named:
            known = ", ".join(layer.module for layer in layers)
            raise StrategyError(
                f"'{name}' is not a recurrent layer of this model; layers: {known}."
            )
        layers = named
    if len(layers) > 1:
        known = ", ".join(layer.module for layer in layers)
        raise StrategyError(
            f"{NAME} gates one recurrent layer and this model has {len(layers)} ({known}); "
            "name the one to gate with the `layer` option."
        )
    layer = layers[0]
    if layer.kind not in ("lstm", "gru"):
        raise StrategyError(
            f"{NAME} runs nn.LSTM and nn.GRU layers; '{layer.module}' is an nn.RNN. Use an "
            "LSTM or a GRU."
        )
    return layer


@register_strategy
class SkipRNNStrategy:
    name = NAME
    summary = "skip RNN state updates per sample and step (Skip RNN, Campos et al. 2018)"
    variants: tuple[dict[str, Any], ...] = ({},)
    contract_example = "tokens"
    # The contract also runs on texts passed with their lengths and with a padding mask.
    contract_examples: ClassVar[dict[str, tuple[dict[str, Any], ...]]] = {
        "tokens+lengths": ({},),
        "tokens+mask": ({},),
    }

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = skip_rnn_options(options)
        layer = skippable_layer(ctx, opts.layer)
        read = require_read(ctx.gm, layer, ctx.extra_input, NAME)
        return {
            "read_position": None if read is None else read.node,
            "read_kind": None if read is None else read.kind,
            "layer": layer.node,
            "module": layer.module,
            "kind": layer.kind,
            "steps": layer.steps,
            "step_macs": layer.step_macs,
            "layer_macs": layer.macs,
            "options": asdict(opts),
        }

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> SkipRNNModel:
        opts = skip_rnn_options(plan.get("options"))
        layer = skippable_layer(ctx, plan["module"])
        gm = copy_graph_replacing(ctx.gm)
        node = next(n for n in gm.graph.nodes if n.name == layer.node)
        rnn = gm.get_submodule(layer.module)
        reads, reads_macs = _read_lengths(ctx, layer, plan)
        gate_macs = _gate_macs(rnn.hidden_size)
        book = cost_book(
            ctx.analysis.total_macs,
            ctx.analysis.total_macs - layer.macs + reads_macs,
            layer.step_macs,
            gate_macs,
            layer.steps,
        )
        wrapper = SkipRNN(rnn, steps=layer.steps, book=book, gate_bias=opts.gate_bias)
        entry = node.args[0].name
        if entry in [n.name for n in ctx.gm.graph.nodes if n.op == "placeholder"][1:]:
            raise StrategyError(
                f"'{layer.module}' reads the model's second input; it must read the sequence."
            )
        replace_region(gm, [layer.node], [entry], [layer.node], wrapper, "skip_rnn", pass_name=NAME)
        return SkipRNNModel(
            gm,
            layer=layer.module,
            reads=reads,
            book=book,
            threshold=opts.threshold,
            budget=opts.budget,
            distill_temperature=opts.distill_temperature,
            compute_weight=opts.compute_weight,
            budget_rate=opts.budget_rate,
            static_macs=ctx.analysis.total_macs,
            input_shape=tuple(ctx.example_input.shape[1:]),
            num_classes=ctx.num_classes,
        )


def _gate_macs(hidden: int) -> int:
    """The gate's MACs per sample (a linear layer on the top hidden state), counted by
    FlopCounterMode on the meta device (no memory, no draw from the random generator)."""
    with torch.device("meta"):
        return module_macs(nn.Linear(hidden, 1), torch.zeros(1, hidden))


def _read_lengths(
    ctx: ConversionContext, layer: RecurrentLayer, plan: dict[str, Any]
) -> tuple[ReadLengths | None, int]:
    """The graph that gives each sample's steps to run from the model's inputs (the operand
    the network reads the layer's outputs with), and its MACs; (None, 0) when it reads all."""
    if not plan.get("read_position"):
        return None, 0
    read = sequence_read(ctx.gm, layer)
    if read is None or read.node != plan["read_position"]:
        raise StrategyError(
            f"The plan reads the RNN's outputs through '{plan['read_position']}'; this graph "
            "reads them otherwise. Convert again."
        )
    nodes = region(ctx.gm, ctx.node(read.node))
    entries = [n.name for n in ctx.gm.graph.nodes if n.op == "placeholder"]
    operand = lift_region(ctx.gm, [n.name for n in nodes], entries, [read.node], "ReadOperand")
    macs = sum(int(n.meta.get(MACS, 0)) for n in nodes)
    return ReadLengths(operand, read, layer.steps), macs
