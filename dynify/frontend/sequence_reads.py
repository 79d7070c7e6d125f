"""Which steps of an RNN's output sequence the rest of a network reads, per sample.

A text classifier on a padded batch runs its RNN over every step, padding included, and then
reads only each text's real steps: it gathers the output at the text's last token (`lengths -
1`, computed from the ids or passed as an input), or multiplies the outputs by a padding mask
before pooling (or fills the padded positions). The steps after a sample's last read step
change nothing it computes, so a temporal strategy need not run them (nor charge them).

This is found in the graph, not assumed: the RNN's output sequence (`output[0]`, through
transposes) must flow into exactly one reading op whose other operand depends on the inputs
alone, never on the RNN:
- `gather` along time: the steps read are those the index names ("gather");
- advanced indexing with an `arange` over the batch, `out[torch.arange(B), lengths - 1]`
  (time-first: `out[lengths - 1, torch.arange(B)]`): the step each row's index names, a
  negative one counted from the end as indexing does ("index");
- a multiplication: the steps read are those whose factor is not zero ("mask");
- `masked_fill(condition, value)`: those whose condition is false ("fill").
Reading the output's shape (`out.size(0)`, `out.shape`) reads no step: the batch's `arange`
may be made from it.
The operand's computation is lifted into its own graph (`dynify.passes.stop_reading`,
`dynify.passes.skip_rnn`) and `read_lengths` turns its value into each sample's number of
steps to run. Anything else (the final state read, the whole sequence pooled) reads every
step; a model that takes lengths or a mask and reads that way is refused by the strategies.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx

from dynify.errors import StrategyError
from dynify.frontend.inputs import ExtraInput
from dynify.frontend.recurrent import RecurrentLayer

READ_KINDS = ("gather", "index", "mask", "fill")
_TRANSPOSES = {"transpose", "contiguous"}
_METADATA = {"shape", "dtype", "device", "ndim"}


@dataclass(frozen=True)
class SequenceRead:
    """How the network reads an RNN's output sequence: `kind` (READ_KINDS), the node computing
    the reading op's operand (index, factor or fill condition), the time axis of the output
    at that op, and the output's shape there (one sample) to broadcast the operand against."""

    kind: str
    node: str
    axis: int
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SequenceRead:
        return cls(str(data["kind"]), str(data["node"]), int(data["axis"]), tuple(data["shape"]))


def read_lengths(read: SequenceRead, operand: torch.Tensor, steps: int, batch: int) -> torch.Tensor:
    """Steps each of `batch` samples must run, int64 [B] in [1, steps], from the reading op's
    operand: one past the last time step the network reads (at least one step)."""
    if read.kind == "gather":
        index = operand.movedim(1 - read.axis, 0)
        return (index.reshape(batch, -1).amax(1).long() + 1).clamp(1, steps)
    if read.kind == "index":
        index = torch.broadcast_to(operand.reshape(-1).long(), (batch,))
        index = torch.where(index < 0, index + steps, index)
        return (index + 1).clamp(1, steps)
    shape = list(read.shape)
    shape[1 - read.axis] = batch
    full = torch.broadcast_to(operand, shape)
    needed = full != 0 if read.kind == "mask" else ~full.bool()
    if read.axis == 0:
        needed = needed.transpose(0, 1)
    needed = needed.any(-1)  # [B, T]
    positions = torch.arange(1, needed.shape[1] + 1, device=needed.device)
    return (needed.long() * positions).amax(1).clamp(1, steps)


def _time_axis(node: torch.fx.Node, axis: int) -> int | None:
    """The time axis after a transpose/contiguous of a tensor whose time axis is `axis`; None
    when the op moves it in a way this analysis does not follow."""
    if node.target == "contiguous":
        return axis
    dims = list(node.args[1:3])
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return None
    a, b = (d % 3 for d in dims)
    return b if axis == a else a if axis == b else axis


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """Every node `node` depends on."""
    seen: set[torch.fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _reads_metadata(node: torch.fx.Node) -> bool:
    """`t.size(...)`, `t.shape`, `t.dtype`...: reads no value of `t`."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in _METADATA
    )


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if not _reads_metadata(u)]


def _is_batch_arange(node: object) -> bool:
    """`torch.arange(n)` (device and dtype aside): the rows of a batch, in order."""
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "call_function"
        and node.target is torch.arange
        and len(node.args) == 1
        and set(node.kwargs) <= {"device", "dtype"}
    )


def _is(node: torch.fx.Node, method: str, *functions: Any) -> bool:
    return (node.op == "call_method" and node.target == method) or (
        node.op == "call_function" and node.target in functions
    )


def sequence_read(gm: torch.fx.GraphModule, layer: RecurrentLayer) -> SequenceRead | None:
    """How the rest of the network reads `layer`'s output sequence, or None when it may read
    every step (the final state, the whole sequence, or an op this analysis does not know)."""
    if layer.reads_state:
        return None
    rnn = next(n for n in gm.graph.nodes if n.name == layer.node)
    seqs = [u for u in rnn.users if u.target is operator.getitem and u.args[1] == 0 and u.users]
    if len(seqs) != 1:
        return None
    node, axis = seqs[0], 1 if layer.batch_first else 0
    while True:
        users = _value_users(node)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_method" and user.target in _TRANSPOSES and user.args[0] is node:
            axis = _time_axis(user, axis)
            if axis is None:
                return None
            node = user
            continue
        break
    shape = tuple(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else ()
    if len(shape) != 3 or axis not in (0, 1):
        return None
    operand, kind = _reading_operand(user, node, axis)
    if operand is None or rnn in ancestors(operand) or operand is rnn:
        return None
    return SequenceRead(kind, operand.name, axis, shape)


def _reading_operand(
    user: torch.fx.Node, seq: torch.fx.Node, axis: int
) -> tuple[torch.fx.Node | None, str]:
    """The operand of the op reading `seq` (index, factor or condition), and the read kind."""
    if user.op == "call_function" and user.target is operator.getitem and user.args[0] is seq:
        index = user.args[1]
        if not isinstance(index, tuple) or len(index) not in (2, 3):
            return None, ""
        whole = len(index) == 2 or index[2] == slice(None) or index[2] is Ellipsis
        if whole and _is_batch_arange(index[1 - axis]):
            step = index[axis]
            return (step, "index") if isinstance(step, torch.fx.Node) else (None, "")
        return None, ""
    if _is(user, "gather", torch.gather):
        if user.args[0] is not seq or len(user.args) < 3:
            return None, ""
        dim, index = user.args[1], user.args[2]
        if not isinstance(dim, int) or dim % 3 != axis or not isinstance(index, torch.fx.Node):
            return None, ""
        return index, "gather"
    if _is(user, "mul", operator.mul, torch.mul) and len(user.args) == 2 and not user.kwargs:
        a, b = user.args
        other = b if a is seq else a if b is seq else None
        if isinstance(other, torch.fx.Node) and other is not seq:
            return other, "mask"
        return None, ""
    fills = _is(user, "masked_fill", torch.masked_fill) and len(user.args) == 3
    if fills and user.args[0] is seq and isinstance(user.args[1], torch.fx.Node):
        return user.args[1], "fill"
    return None, ""


def require_read(
    gm: torch.fx.GraphModule, layer: RecurrentLayer, extra: ExtraInput | None, strategy: str
) -> SequenceRead | None:
    """How the network reads `layer`'s outputs (None: every step). A model that takes lengths
    or a mask must read them only at its real steps, in a way the graph shows: else it is
    refused with what to change (its padding steps would change its answer)."""
    read = sequence_read(gm, layer)
    if extra is None or read is not None:
        return read
    raise StrategyError(
        f"This model takes {extra.kind} but its classifier reads '{layer.module}' in a way "
        f"{strategy} cannot follow (its final state, or every step of its output sequence), so "
        "the padding steps change its answer and cannot be skipped. Read the output at each "
        "sample's last token (out[torch.arange(B), lengths - 1], or out.gather(1, (lengths - "
        "1).view(-1, 1, 1).expand(-1, 1, H))) or "
        "multiply it by the padding mask (out * mask.unsqueeze(-1)) before pooling; the final "
        "state of an unpacked RNN includes the padding."
    )


def region(gm: torch.fx.GraphModule, end: torch.fx.Node) -> list[torch.fx.Node]:
    """`end` and every node it depends on but the inputs (and parameter reads), in order."""
    members = ancestors(end) | {end}
    return [n for n in gm.graph.nodes if n in members and n.op not in ("placeholder", "get_attr")]


__all__ = [
    "READ_KINDS",
    "SequenceRead",
    "ancestors",
    "read_lengths",
    "region",
    "require_read",
    "sequence_read",
]
