"""Lift a single-entry single-exit region of an fx graph into its own GraphModule.

This is the one mechanism under every strategy: a pass picks regions (from the analysis), lifts
each, and wraps the lifted module in a dynamic wrapper that decides whether or where to run it.
The lifted module shares its parameters with the parent: it is a view of the same network.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch.fx

from dynify.errors import StrategyError


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
    means the region is not single-entry.
    """
    by_name = {node.name: node for node in gm.graph.nodes}
    members = set(nodes) | set(outputs)
    members -= set(inputs)
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
        if node.name not in members and not _is_constant(node):
            raise StrategyError(
                f"Region for {list(outputs)} reads '{node.name}' from outside its inputs "
                f"{list(inputs)}; it is not a single-entry region."
            )
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


def _is_constant(node: torch.fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op in ("placeholder", "output", "call_module"):
        return False
    return all(_is_constant(arg) for arg in node.all_input_nodes)
