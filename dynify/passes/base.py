"""What a pass receives and returns.

A strategy works in two steps, kept apart so that a saved artifact can replay them: `plan`
decides (which cut points, which blocks) into a JSON-able dict, `build` applies a plan to the
traced graph and returns the DynamicModel. Loading an artifact calls `build` with the stored
plan, so the same decisions are never taken twice differently.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol, TypeVar

import torch
import torch.fx

from dynify.errors import StrategyError
from dynify.frontend.analysis import GraphAnalysis
from dynify.frontend.inputs import ExtraInput
from dynify.runtime.model import DynamicModel

OptionsT = TypeVar("OptionsT")


def options_from_dict(cls: type[OptionsT], data: dict[str, Any] | None, strategy: str) -> OptionsT:
    """A strategy's typed options from a plain dict, refusing keys it does not know."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise StrategyError(
            f"Unknown {strategy} option(s) {unknown}; known options: {sorted(known)}."
        )
    return cls(**data)


@dataclass
class ConversionContext:
    """Everything a pass may read: the traced, profiled graph and its analysis."""

    gm: torch.fx.GraphModule
    example_input: torch.Tensor
    analysis: GraphAnalysis
    num_classes: int
    # A sequence model's second input (lengths or padding mask, one sample), and what it is;
    # None for models that take one tensor. The graph's second placeholder receives it.
    example_extra: torch.Tensor | None = None
    extra_input: ExtraInput | None = None
    # The token id texts are padded with: convert's pad_id, else the embedding's padding_idx
    # (`analysis.pad_id`), else 0.
    pad_id: int = 0

    @property
    def example_args(self) -> tuple[torch.Tensor, ...]:
        """The example as the graph takes it: (x,) or (x, lengths/mask)."""
        if self.example_extra is None:
            return (self.example_input,)
        return (self.example_input, self.example_extra)

    def node(self, name: str) -> torch.fx.Node:
        for node in self.gm.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


class Strategy(Protocol):
    """A registered conversion strategy (see `dynify.passes.register_strategy`)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Options that change how the strategy decides (its gate kinds, policies, granularities):
    # the contract tests (tests/test_contract.py) run every one; `({},)` if there are none.
    variants: ClassVar[tuple[dict[str, Any], ...]]
    # The contract tests' example network of the kind the strategy applies to, by name:
    # "image" (a small residual CNN, the default if a strategy does not say), "tokens" (an
    # LSTM text classifier on token ids) or "clip" (a TSN-style clip model); see EXAMPLES in
    # tests/test_contract.py.

    def plan(self, ctx: ConversionContext, options: dict[str, Any]) -> dict[str, Any]:
        """Decide what to rewrite; the result is stored in the artifact's spec."""
        ...

    def build(self, ctx: ConversionContext, plan: dict[str, Any]) -> DynamicModel:
        """Rewrite the graph according to `plan` into a DynamicModel."""
        ...
