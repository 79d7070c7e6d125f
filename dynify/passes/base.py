"""What a pass receives and returns.

A strategy works in two steps, kept apart so that a saved artifact can replay them: `plan`
decides (which cut points, which blocks) into a JSON-able dict, `build` applies a plan to the
traced graph and returns the DynamicModel. Loading an artifact calls `build` with the stored
plan, so the same decisions are never taken twice differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.fx

from dynify.frontend.analysis import GraphAnalysis
from dynify.runtime.model import DynamicModel


@dataclass
class ConversionContext:
    """Everything a pass may read: the traced, profiled graph and its analysis."""

    gm: torch.fx.GraphModule
    example_input: torch.Tensor
    analysis: GraphAnalysis
    num_classes: int

    def node(self, name: str) -> torch.fx.Node:
        for node in self.gm.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


class Strategy(Protocol):
    """A registered conversion strategy (see `dynify.passes.register_strategy`)."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        """Decide what to rewrite; the result is stored in the artifact's spec."""
        ...

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> DynamicModel:
        """Rewrite the graph according to `plan` into a DynamicModel."""
        ...
