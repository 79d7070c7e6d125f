"""Stop reading (LSTM-Jump, Yu et al. 2017; halting as in ReasoNet): exit heads on an RNN's
hidden state every k tokens, so a sample stops reading once its answer is confident.

Plan: find the one uni-directional `nn.LSTM` / `nn.GRU` call, put an exit after every `every`
tokens, and find where the rest of the network reads the RNN's output sequence (a `gather`
along time at a position computed from the input, as a text classifier reads each text's last
non-pad token): a sample whose text ends before an exit has finished reading there. Build: lift
the part before the RNN (`encode`), the part after it (`tail`, the final classifier) and the
read position into their own graphs, and hand them with the RNN and the heads to a
`StopReadingModel`, which runs the RNN stretch by stretch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from dynify.errors import StrategyError
from dynify.frontend.cost import MACS, module_macs
from dynify.frontend.recurrent import RecurrentLayer, require_stepwise
from dynify.frontend.sequence_reads import ancestors, require_read, sequence_read
from dynify.passes import register_strategy
from dynify.passes.base import ConversionContext, options_from_dict
from dynify.passes.rewrite import lift_region
from dynify.runtime.heads import ExitHead
from dynify.runtime.policy import POLICIES, ExitPolicy
from dynify.runtime.recurrence import ReadLengths
from dynify.runtime.stop_reading import JumpHead, StopReadingModel, cost_book


@dataclass
class StopReadingOptions:
    """Options of the stop-reading strategy.

    every: tokens between two exits (an exit after every `every` tokens read, none at the end:
    the original classifier answers there). policy: the exit policy ('confidence', 'entropy',
    'patience'); threshold: the exits' starting threshold (calibration sets them).
    jump: the jump head (LSTM-Jump, binary): after a checkpoint that does not exit, a sample
    reads the next stretch or skips the next `jump` stretches (0: no jump head).
    jump_threshold: its starting threshold (the gate rule: 0 always jumps, above 1 never);
    budget: the share of tokens the jump head's training aims at.
    """

    every: int = 8
    policy: str = "confidence"
    patience: int = 2
    threshold: float = 0.9
    jump: int = 0
    jump_threshold: float = 0.5
    budget: float = 0.5

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> StopReadingOptions:
        return options_from_dict(cls, data, "stop-reading")


def the_recurrent_layer(ctx: ConversionContext) -> RecurrentLayer:
    """The one LSTM/GRU a stop-reading model reads with, or an error saying what to change."""
    layers = require_stepwise(ctx.analysis.recurrent, "stop-reading")
    if len(layers) != 1:
        names = ", ".join(layer.module for layer in layers)
        raise StrategyError(
            f"stop-reading reads with one recurrent layer; this model calls {len(layers)} "
            f"({names}). Stack them as one nn.LSTM/nn.GRU (num_layers=...) instead."
        )
    layer = layers[0]
    module = ctx.gm.get_submodule(layer.module)
    if layer.kind not in ("lstm", "gru"):
        raise StrategyError(
            f"stop-reading runs nn.LSTM and nn.GRU; '{layer.module}' is an nn.RNN. Use an "
            "nn.GRU (or nn.LSTM) layer."
        )
    if getattr(module, "proj_size", 0):
        raise StrategyError(
            f"'{layer.module}' is an LSTM with proj_size={module.proj_size}; stop-reading needs "
            "proj_size=0."
        )
    return layer


def read_position(gm: torch.fx.GraphModule, layer: RecurrentLayer) -> str | None:
    """The node computing the operand with which the rest of the network reads the RNN's
    output sequence (`dynify.frontend.sequence_reads`), or None when it may read every step."""
    read = sequence_read(gm, layer)
    return None if read is None else read.node


def _region(gm: torch.fx.GraphModule, end: torch.fx.Node) -> list[torch.fx.Node]:
    """`end` and every node it depends on but the placeholder (and parameter reads), in order."""
    members = ancestors(end) | {end}
    return [n for n in gm.graph.nodes if n in members and n.op not in ("placeholder", "get_attr")]


def _macs(nodes: list[torch.fx.Node]) -> int:
    return sum(int(n.meta.get(MACS, 0)) for n in nodes)


@register_strategy
class StopReading:
    name = "stop-reading"
    summary = "exit heads on an RNN's state every k tokens; confident samples stop reading"
    # The jump head's variants: the jumps themselves, and jumps with exits that remember.
    variants = (
        *({"every": 4, "policy": kind} for kind in POLICIES),
        {"every": 2, "policy": "confidence", "jump": 1},
        {"every": 2, "policy": "patience", "jump": 2},
    )
    contract_example = "tokens"
    # The contract also runs on texts passed with their lengths and with a padding mask.
    contract_examples: ClassVar[dict[str, tuple[dict[str, Any], ...]]] = {
        "tokens+lengths": (
            {"every": 4, "policy": "confidence"},
            {"every": 2, "policy": "confidence", "jump": 1},
        ),
        "tokens+mask": ({"every": 4, "policy": "confidence"},),
    }

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        opts = StopReadingOptions.from_dict(options)
        policy = ExitPolicy(opts.policy, opts.patience)  # validates
        layer = the_recurrent_layer(ctx)
        if type(opts.every) is not int or opts.every < 1:
            raise StrategyError(f"every must be a whole number of tokens >= 1, got {opts.every!r}.")
        if opts.every >= layer.steps:
            raise StrategyError(
                f"every={opts.every} leaves no exit before the end of a {layer.steps}-token "
                f"input; choose every below {layer.steps} (e.g. {max(1, layer.steps // 8)})."
            )
        if type(opts.jump) is not int or opts.jump < 0:
            raise StrategyError(
                f"jump must be a whole number of stretches >= 0 (0: no jump head), got "
                f"{opts.jump!r}."
            )
        if not 0.0 < opts.budget <= 1.0:
            raise StrategyError(f"budget must be in (0, 1], got {opts.budget}.")
        require_read(ctx.gm, layer, ctx.extra_input, "stop-reading")
        read = sequence_read(ctx.gm, layer)
        return {
            "rnn": layer.node,
            "every": opts.every,
            "steps": layer.steps,
            "read_position": None if read is None else read.node,
            "read_kind": None if read is None else read.kind,
            "policy": policy.to_dict(),
            "options": asdict(opts),
        }

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> StopReadingModel:
        gm = ctx.gm
        layer = the_recurrent_layer(ctx)
        if layer.node != plan["rnn"] or layer.steps != plan["steps"]:
            raise StrategyError(
                f"The plan reads with '{plan['rnn']}' over {plan['steps']} tokens; this graph's "
                f"recurrent layer is '{layer.node}' over {layer.steps}. Convert again."
            )
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        entries = [n.name for n in placeholders]
        output = next(n for n in nodes if n.op == "output")
        rnn_node = ctx.node(layer.node)
        rnn_input = rnn_node.args[0]
        encode_is_input = rnn_input is placeholders[0]
        if rnn_input in placeholders[1:]:
            raise StrategyError(
                f"'{layer.module}' reads the model's second input; it must read the sequence."
            )
        encode_nodes = [] if encode_is_input else _region(gm, rnn_input)
        encode = lift_region(
            gm, [n.name for n in encode_nodes], entries, [rnn_input.name], "Encode"
        )
        taken = {*placeholders, rnn_node, output, *encode_nodes}
        tail_nodes = [n for n in nodes if n not in taken and n.op != "get_attr"]
        inputs = [*entries, rnn_node.name]
        if not encode_is_input:
            inputs.insert(len(entries), rnn_input.name)
        final = output.args[0]
        if not isinstance(final, torch.fx.Node):
            raise StrategyError(
                "The model returns a tuple or dict; stop-reading needs a model that returns one "
                "logits tensor. Wrap it so forward returns the logits."
            )
        tail = lift_region(gm, [n.name for n in tail_nodes], inputs, [final.name], "Tail")
        position, position_macs = None, 0
        if plan.get("read_position"):
            read = sequence_read(gm, layer)
            if read is None or read.node != plan["read_position"]:
                raise StrategyError(
                    f"The plan reads the RNN's outputs through '{plan['read_position']}'; this "
                    "graph reads them otherwise. Convert again."
                )
            end = ctx.node(read.node)
            position_nodes = _region(gm, end)
            operand = lift_region(
                gm, [n.name for n in position_nodes], entries, [end.name], "Position"
            )
            position = ReadLengths(operand, read, layer.steps)
            position_macs = _macs(position_nodes)
        rnn = gm.get_submodule(layer.module)
        hidden = layer.hidden_size
        heads, head_macs, jump_heads, jump_macs = [], [], [], []
        every, steps = int(plan["every"]), int(plan["steps"])
        options = plan.get("options", {})
        jump = int(options.get("jump", 0))
        for _ in range(-(-steps // every) - 1):
            head = ExitHead((hidden,), ctx.num_classes, "vector")
            heads.append(head)
            head_macs.append(module_macs(head.eval(), torch.zeros(1, hidden)))
            if jump:
                jump_head = JumpHead(hidden)
                jump_heads.append(jump_head)
                jump_macs.append(module_macs(jump_head.eval(), torch.zeros(1, hidden)))
        bounds = [min(steps, (i + 1) * every) for i in range(len(heads) + 1)]
        stretch_macs = [
            (b - a) * layer.step_macs for a, b in zip([0, *bounds], bounds, strict=False)
        ]
        book = cost_book(
            ctx.analysis.total_macs,
            _macs(encode_nodes) + position_macs,
            stretch_macs,
            head_macs,
            _macs(tail_nodes),
            jump_macs,
        )
        return StopReadingModel(
            encode=encode,
            rnn=rnn,
            tail=tail,
            position=position,
            heads=heads,
            every=every,
            steps=steps,
            book=book,
            encode_is_input=encode_is_input,
            policy=ExitPolicy(**plan["policy"]),
            thresholds=[float(options.get("threshold", 0.9))] * len(heads),
            static_macs=ctx.analysis.total_macs,
            input_shape=tuple(ctx.example_input.shape[1:]),
            num_classes=ctx.num_classes,
            jump=jump,
            jump_heads=jump_heads,
            jump_threshold=float(options.get("jump_threshold", 0.5)),
            budget=float(options.get("budget", 0.5)),
        )
