"""Graph surgery in one place: lift a region out, replace a region by a module, copy a graph.

Every strategy works on single-entry single-exit regions of the traced graph (the analysis finds
them). A region is either lifted into its own GraphModule (`lift_region`, a view that shares the
parent's parameters) or replaced in the parent by one call to a new module (`replace_region`),
the way torch.ao's `prepare` inserts observers: a real `nn.Module` behind a `call_module` node,
registered under a unique prefixed name (`gate_0`, `spatial_mask_3`). A rewrite lints the graph
and records on the node it makes which pass made it (`node.meta["dynify_pass"]`) and from which
nodes (`node.meta["from_node"]`, fx's own provenance records), so a dumped graph says where each
wrapper came from.

The runtime needs the same graph run with a few modules swapped (a tile's padding-free convs,
an export face's wrappers, the low-resolution pass's batch norms): `copy_graph_replacing` is
that one copy. This module imports nothing from `dynify.runtime`, so the runtime may use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch.fx
from torch import nn
from torch.fx.traceback import NodeSource, NodeSourceAction

from dynify.errors import StrategyError
from dynify.frontend.cost import MACS

PASS_KEY = "dynify_pass"
# What a node replacing a region keeps of the region output's meta: facts about the value
# (the call returns the same tensor), not about the op that computed it.
_VALUE_META = ("tensor_meta", "type")


def lift_region(
    gm: torch.fx.GraphModule,
    nodes: Iterable[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    class_name: str = "Region",
) -> torch.fx.GraphModule:
    """A GraphModule computing `outputs` from `inputs` with exactly the region's nodes.

    Constant nodes (parameters read with get_attr, and computations on them alone) that the
    region uses are copied in; any other value from outside the region is an error, because it
    means the region is not single-entry. The parent graph is left as it is.
    """
    by_name = _by_name(gm, [*nodes, *inputs, *outputs])
    members = (set(nodes) | set(outputs)) - set(inputs)
    constants = _constants(gm.graph)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for name in inputs:
        source = by_name[name]
        placeholder = graph.placeholder(name)
        placeholder.meta = dict(source.meta)
        env[source] = placeholder

    def copy(node: torch.fx.Node) -> torch.fx.Node:
        if node in env:
            return env[node]
        if node.name not in members and node not in constants:
            raise _not_single_entry(node, inputs, outputs)
        for arg in node.all_input_nodes:
            copy(arg)
        env[node] = graph.node_copy(node, lambda arg: env[arg])
        return env[node]

    for node in gm.graph.nodes:
        if node.name in members:
            copy(node)
    results = [env[by_name[name]] for name in outputs]
    graph.output(results[0] if len(results) == 1 else tuple(results))
    graph.lint()
    return torch.fx.GraphModule(gm, graph, class_name)


def replace_region(
    gm: torch.fx.GraphModule,
    nodes: Iterable[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    module: nn.Module,
    name: str,
    *,
    pass_name: str,
) -> torch.fx.Node:
    """Replace a single-entry single-exit region of `gm`, in place, by one call to `module`.

    `module` is registered as `<name>_<i>` (the smallest free i) and called on `inputs`. The
    region's output node becomes that call and keeps its node name, so later rewrites that name
    it (a block's entry is often the previous block's output) still find it; the other region
    nodes, and the constants only they read, are erased, and so are the submodules nothing
    calls any more (they live on in `module` when it holds the lifted region). The call's meta
    keeps the output's shape, the MACs of the region it stands for, and its provenance.
    Returns the call node.
    """
    graph, nodes = gm.graph, list(nodes)
    if len(outputs) != 1:
        raise StrategyError(
            f"A replaced region has one output, got {list(outputs)}; replace each output's "
            "region on its own, or lift the region and wrap it."
        )
    constants = _constants(graph)
    region = _region(gm, nodes, inputs, outputs, constants)
    by_name = _by_name(gm, inputs)
    result = region[-1]
    inside = set(region)
    for node in region[:-1]:
        outside = [user.name for user in node.users if user not in inside]
        if outside:
            raise StrategyError(
                f"'{node.name}' inside the region ending at '{result.name}' is also read by "
                f"{outside} outside it; it is not a single-exit region."
            )
    target = unique_name(gm, name)
    gm.add_submodule(target, module)
    meta = {key: result.meta[key] for key in _VALUE_META if key in result.meta}
    meta[MACS] = sum(int(node.meta.get(MACS, 0)) for node in region)
    sources = [NodeSource(node, pass_name, NodeSourceAction.REPLACE) for node in region]
    listed = set(nodes)
    read = {arg for node in region for arg in node.all_input_nodes if arg in constants}
    read |= {node for node in constants if node.name in listed}
    result.op, result.target = "call_module", target
    result.args, result.kwargs = tuple(by_name[name] for name in inputs), {}
    result.meta = meta
    record_provenance(result, pass_name, sources)
    for node in reversed(region[:-1]):
        graph.erase_node(node)
    _erase_unused_constants(graph, read, constants)
    _finish(gm)
    return result


def insert_after(
    gm: torch.fx.GraphModule, node_name: str, module: nn.Module, name: str, *, pass_name: str
) -> torch.fx.Node:
    """Call `module` on a node's output and give the result to every other user of that node.

    `module` is registered as `<name>_<i>`; returns the new call node.
    """
    node = _by_name(gm, [node_name])[node_name]
    target = unique_name(gm, name)
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(target, (node,))
    call.meta = {key: node.meta[key] for key in _VALUE_META if key in node.meta}
    record_provenance(call, pass_name, [NodeSource(node, pass_name, NodeSourceAction.CREATE)])
    node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    _finish(gm)
    return call


def copy_graph_replacing(
    gm: torch.fx.GraphModule,
    modules: Mapping[str, nn.Module] | None = None,
    *,
    extra_input: str | None = None,
    class_name: str | None = None,
) -> torch.fx.GraphModule:
    """A GraphModule running `gm`'s graph over `gm`'s own modules, except `modules`: called
    module targets mapped to the modules the copy calls there instead.

    Nothing is copied but the graph and the containers on the modules' paths: the copy is
    another view of the same parameters, its modules in `gm`'s order. With `extra_input`, the
    copy takes one more input, after `gm`'s own, and every replacing module receives it as its
    last argument (a tile's border mask, an export face's thresholds).
    """
    modules = dict(modules or {})
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    unknown = sorted(set(modules) - called)
    if unknown:
        raise KeyError(f"{unknown} are not modules this graph calls")
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    extra = None
    if extra_input is not None and not placeholders:
        extra = graph.placeholder(extra_input)
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda arg: env[arg])
        if node.op == "call_module" and node.target in modules and extra is not None:
            env[node].args = (*env[node].args, extra)
        if extra_input is not None and placeholders and node is placeholders[-1]:
            extra = graph.placeholder(extra_input)
    copy = torch.fx.GraphModule(gm, graph, class_name or type(gm).__name__)
    for target, module in modules.items():
        path, _, field = target.rpartition(".")
        parent = copy.get_submodule(path)
        if path and parent is gm.get_submodule(path):
            raise ValueError(
                f"Cannot replace '{target}': the graph also calls '{path}' whole, so the copy "
                "shares that module with the original and replacing inside it would change both."
            )
        setattr(parent, field, module)
    return copy


def unique_name(gm: nn.Module, prefix: str) -> str:
    """`<prefix>_<i>` with the smallest i that names no attribute of `gm` yet (torch.ao's rule)."""
    index = 0
    while hasattr(gm, f"{prefix}_{index}"):
        index += 1
    return f"{prefix}_{index}"


def record_provenance(
    node: torch.fx.Node, pass_name: str, sources: Sequence[NodeSource] = ()
) -> None:
    """Mark `node` as made by `pass_name` from `sources` (fx's own provenance records)."""
    node.meta[PASS_KEY] = pass_name
    node.meta["from_node"] = list(sources)


def source_names(node: torch.fx.Node) -> list[str]:
    """The names of the nodes a pass made `node` from (empty for an original node)."""
    return [source.name for source in node.meta.get("from_node", [])]


def _finish(gm: torch.fx.GraphModule) -> None:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _by_name(gm: torch.fx.GraphModule, names: Iterable[str]) -> dict[str, torch.fx.Node]:
    by_name = {node.name: node for node in gm.graph.nodes}
    missing = sorted({name for name in names if name not in by_name})
    if missing:
        raise StrategyError(f"{missing} are not nodes of this graph.")
    return by_name


def _region(
    gm: torch.fx.GraphModule,
    nodes: Iterable[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    constants: set[torch.fx.Node],
) -> list[torch.fx.Node]:
    """The region's computing nodes in graph order, ending with its output; refused unless
    single-entry.

    Constants (parameters read with get_attr, and computations on them alone) are left out even
    when listed: other nodes may read them too.
    """
    nodes = list(nodes)
    by_name = _by_name(gm, [*nodes, *inputs, *outputs])
    members = (set(nodes) | set(outputs)) - set(inputs)
    region = [n for n in gm.graph.nodes if n.name in members and n not in constants]
    if not region:
        raise StrategyError(f"The region for {list(outputs)} computes nothing from its inputs.")
    for node in region:
        for arg in node.all_input_nodes:
            if arg.name not in members and arg.name not in inputs and arg not in constants:
                raise _not_single_entry(arg, inputs, outputs)
    if region[-1] is not by_name[outputs[-1]]:
        raise StrategyError(
            f"The region's output '{outputs[-1]}' is not its last node ('{region[-1].name}' "
            "comes after it); it is not a single-exit region."
        )
    return region


def _not_single_entry(
    node: torch.fx.Node, inputs: Sequence[str], outputs: Sequence[str]
) -> StrategyError:
    return StrategyError(
        f"Region for {list(outputs)} reads '{node.name}' from outside its inputs "
        f"{list(inputs)}; it is not a single-entry region."
    )


def _erase_unused_constants(
    graph: torch.fx.Graph, candidates: Iterable[torch.fx.Node], constants: set[torch.fx.Node]
) -> None:
    """Erase the constants among `candidates` (and the constants they read) that nothing reads
    any more."""
    pending = [node for node in candidates if node in constants]
    erased: set[torch.fx.Node] = set()
    while pending:
        node = pending.pop()
        if node not in erased and not node.users:
            inputs = node.all_input_nodes
            graph.erase_node(node)
            erased.add(node)
            pending += [arg for arg in inputs if arg in constants]


def _constants(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes whose value depends on no input: parameters and buffers read with get_attr,
    and functions of those alone. One sweep in graph order (inputs come first)."""
    constants: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method")
            and all(arg in constants for arg in node.all_input_nodes)
        ):
            constants.add(node)
    return constants
