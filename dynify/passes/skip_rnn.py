"""Skip RNN: per sample, skip the state updates of the steps it does not need.

Plan: take the recurrent layer the front end found (`node.meta["recurrent"]`; an `nn.LSTM` or
`nn.GRU`, uni-directional, called on the sequence alone) and record its node, sizes and per-step
MACs. Build: on a copy of the traced graph, replace the layer's call by a `skip_rnn_<i>`
wrapper holding the original module and a new update gate (`replace_region`); the wrapper
returns what the module returned, so the rest of the network (e.g. the output read at each
text's last token) is unchanged and reads the copied state at skipped steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dynify.errors import StrategyError
from dynify.frontend.recurrent import RecurrentLayer, require_stepwise
from dynify.passes import register_strategy
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.passes.rewrite import copy_graph_replacing, replace_region
from dynify.runtime.skip_rnn import SkipRNN, SkipRNNModel

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

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = skip_rnn_options(options)
        layer = skippable_layer(ctx, opts.layer)
        return {
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
        wrapper = SkipRNN(
            gm.get_submodule(layer.module),
            steps=layer.steps,
            step_macs=layer.step_macs,
            gate_bias=opts.gate_bias,
        )
        entry = node.args[0].name
        replace_region(gm, [layer.node], [entry], [layer.node], wrapper, "skip_rnn", pass_name=NAME)
        return SkipRNNModel(
            gm,
            layer=layer.module,
            fixed_macs=ctx.analysis.total_macs - layer.macs,
            threshold=opts.threshold,
            budget=opts.budget,
            distill_temperature=opts.distill_temperature,
            compute_weight=opts.compute_weight,
            budget_rate=opts.budget_rate,
            static_macs=ctx.analysis.total_macs,
            input_shape=tuple(ctx.example_input.shape[1:]),
            num_classes=ctx.num_classes,
        )
