"""`convert`: the front end and one strategy's pass, from a static model to a DynamicModel."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from dynify.errors import DynifyError, InputError, ModelError, StrategyError, TraceError
from dynify.frontend import TraceOptions, analyse, profile, symbolic_trace
from dynify.frontend.trace import LeafSpec
from dynify.passes import ConversionContext, get_strategy
from dynify.runtime.fast_access import bind_children
from dynify.runtime.model import DynamicModel
from dynify.zoo import ModelRef, build_model

SPEC_VERSION = 1


@dataclass
class FrontEnd:
    """A traced, profiled and analysed model, ready for any strategy."""

    context: ConversionContext
    trace_options: TraceOptions
    seconds: float


def read_model(
    model: nn.Module,
    example_input: torch.Tensor,
    leaf_modules: Sequence[LeafSpec] = (),
) -> FrontEnd:
    """Trace, profile and analyse a copy of `model` (the caller's model is never modified)."""
    start = time.perf_counter()
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise InputError(
            "example_input must be a tensor with a batch dimension, e.g. [1, 3, 224, 224]."
        )
    model = copy.deepcopy(model).eval()
    example = example_input[:1].detach()
    try:  # eagerly first: a wrong input size fails here with the model's own message
        with torch.no_grad():
            eager_output = model(example)
    except Exception as exc:
        raise InputError(
            f"Running {type(model).__name__} on an input of shape {list(example.shape)} failed: "
            f"{type(exc).__name__}: {exc}. Give an example input (--input-size) the model accepts."
        ) from exc
    options = TraceOptions(leaf_modules=tuple(leaf_modules))
    gm = symbolic_trace(model, options)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise DynifyError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs; dynify converts "
            "models with one input tensor. Wrap the model so forward(x) takes one tensor."
        )
    output = profile(gm, example)
    if isinstance(output, torch.Tensor) and not torch.equal(output, eager_output):
        raise TraceError(
            f"The traced graph of {type(model).__name__} computes a different output than the "
            "model itself (max abs diff "
            f"{(output - eager_output).abs().max().item():.3g}): some behaviour is hidden from "
            "torch.fx (e.g. a global flag). Mark the module responsible as a leaf (--leaf)."
        )
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise StrategyError(
            f"{type(model).__name__} returns {_describe(output)}; dynify converts classifiers "
            "whose forward returns one logits tensor [B, num_classes]."
        )
    context = ConversionContext(
        gm=gm, example_input=example, analysis=analyse(gm), num_classes=int(output.shape[1])
    )
    return FrontEnd(context, options, time.perf_counter() - start)


def write_graphs(traced: torch.fx.GraphModule, dyn: DynamicModel, folder: Path) -> list[Path]:
    """The traced graph, then every GraphModule inside the dynamic model, as numbered .py files."""
    folder.mkdir(parents=True, exist_ok=True)
    modules = [("traced", traced)] + [
        (name.replace(".", "_"), module)
        for name, module in dyn.named_modules()
        if isinstance(module, torch.fx.GraphModule)
    ]
    paths = []
    for index, (name, module) in enumerate(modules):
        path = folder / f"{index:03d}_{name}.py"
        path.write_text(f"# {type(module).__name__}\n{module.code}")
        paths.append(path)
    return paths


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {list(output.shape)}"
    return f"a {type(output).__name__}"


def convert(
    model: nn.Module | str,
    strategy: str = "early-exit",
    example_input: torch.Tensor | None = None,
    *,
    options: dict[str, Any] | None = None,
    weights: str | None = "auto",
    num_classes: int | None = None,
    input_size: int | None = None,
    leaf_modules: Sequence[LeafSpec] = (),
    dump_graphs: str | Path | None = None,
) -> DynamicModel:
    """Convert a static classifier into a dynamic one with the named strategy.

    `model` is an nn.Module or a model name (see `dynify.zoo`); `weights`, `num_classes` and
    `input_size` apply to names. `options` are the strategy's (e.g. {"exits": 4} for
    early-exit). The result's `spec` records how to rebuild it from an artifact.
    `dump_graphs` names a folder to write the traced graph and every rewritten graph module to,
    as readable Python, for debugging a pass.
    """
    pass_ = get_strategy(strategy)
    if isinstance(model, str):
        model, ref = build_model(model, weights=weights, num_classes=num_classes)
        if input_size:
            ref.input_size = input_size
    elif isinstance(model, nn.Module):
        cls = type(model)
        ref = ModelRef("module", f"{cls.__module__}:{cls.__qualname__}", weights="given")
    else:
        raise ModelError(f"Expected an nn.Module or a model name, got {type(model).__name__}.")
    if example_input is None:
        if ref.input_size is None:
            raise InputError("Pass example_input= so the model can be traced and its MACs counted.")
        example_input = torch.randn(1, 3, ref.input_size, ref.input_size)
    front = read_model(model, example_input, leaf_modules)
    ref.num_classes = front.context.num_classes if ref.num_classes is None else ref.num_classes
    plan = pass_.plan(front.context, options or {})
    dyn = bind_children(pass_.build(front.context, plan))
    if dump_graphs is not None:
        write_graphs(front.context.gm, dyn, Path(dump_graphs))
    dyn.spec = {
        "format": "dynify",
        "version": SPEC_VERSION,
        "model": ref.to_dict(),
        "input_shape": list(front.context.example_input.shape[1:]),
        "leaf_modules": front.trace_options.leaf_names(),
        "strategy": strategy,
        "plan": plan,
    }
    return dyn
