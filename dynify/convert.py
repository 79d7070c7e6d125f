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
from dynify.files import write_text_atomic
from dynify.frontend import TraceOptions, analyse, profile, symbolic_trace
from dynify.frontend.inputs import (
    ExtraInput,
    dtype_name,
    example_input_of,
    parse_dtype,
    parse_extra_input,
    split_example,
)
from dynify.frontend.padding import DEFAULT_PAD_ID, check_pad_id, example_token
from dynify.frontend.trace import LeafSpec, leaf_options
from dynify.options import StrategyOptions, options_dict
from dynify.passes import ConversionContext, Strategy, get_strategy, sequence_strategies
from dynify.runtime.fast_access import bind_children
from dynify.runtime.model import DynamicModel
from dynify.zoo import build_model, ref_for_module

SPEC_VERSION = 1


@dataclass
class FrontEnd:
    """A traced, profiled and analysed model, ready for any strategy."""

    context: ConversionContext
    trace_options: TraceOptions
    seconds: float


def read_model(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    leaf_modules: Sequence[LeafSpec] = (),
    pad_id: int | None = None,
) -> FrontEnd:
    """Trace, profile and analyse a copy of `model` (the caller's model is never modified).

    `example_input` is one tensor, or a padded sequence and its lengths or padding mask,
    passed to forward positionally. `pad_id` overrides the pad id the analysis finds."""
    start = time.perf_counter()
    example, extra, extra_input = split_example(example_input)
    args = (example,) if extra is None else (example, extra)
    model = copy.deepcopy(model).eval()
    check_leaves(model, leaf_modules)
    try:  # eagerly first: a wrong input size fails here with the model's own message
        with torch.no_grad():
            eager_output = model(*args)
    except Exception as exc:
        raise InputError(
            f"Running {type(model).__name__} on an input of shape {list(example.shape)} failed: "
            f"{type(exc).__name__}: {exc}. Give an example input the model accepts "
            "(--input-size, or --input-shape and --input-dtype for sequences)."
        ) from exc
    options = TraceOptions(leaf_modules=tuple(leaf_modules))
    gm = symbolic_trace(model, options)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise DynifyError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs and the example "
            f"input gives {len(args)}; dynify converts models with one input tensor, or a padded "
            "sequence and its lengths or padding mask: pass example_input=(ids, lengths) or "
            "(ids, mask) for forward(ids, lengths), or the tensor alone for forward(x)."
        )
    output = profile(gm, *args)
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
    analysis = analyse(gm)
    if pad_id is None:
        pad_id = DEFAULT_PAD_ID if analysis.pad_id is None else analysis.pad_id
    context = ConversionContext(
        gm=gm,
        example_input=example,
        analysis=analysis,
        num_classes=int(output.shape[1]),
        example_extra=extra,
        extra_input=extra_input,
        pad_id=check_pad_id(pad_id),
    )
    return FrontEnd(context, options, time.perf_counter() - start)


def build(strategy: Strategy, context: ConversionContext, plan: dict[str, Any]) -> DynamicModel:
    """Apply a plan; the model takes inputs of the example's dtype (token ids stay integers)."""
    dyn = bind_children(strategy.build(context, plan))
    if not context.example_input.dtype.is_floating_point:
        dyn.input_dtype = context.example_input.dtype
    if context.extra_input is not None:
        if not dyn.takes_extra_input:
            raise StrategyError(
                f"{strategy.name} converts models that take one input tensor; this model takes "
                f"a second input ({context.extra_input.kind}). The strategies that take padded "
                "sequences with lengths or a mask: "
                f"{', '.join(sequence_strategies()) or 'none is registered'}."
            )
        dyn.extra_input = context.extra_input
    dyn.pad_id = context.pad_id
    return dyn


def import_leaves(leaves: Sequence[LeafSpec]) -> list[LeafSpec]:
    """The user's leaf modules with 'pkg.mod:Class' strings imported (an explicit request)."""
    strings = [leaf for leaf in leaves if isinstance(leaf, str)]
    return list(leaf_options(strings).leaf_modules) + [
        leaf for leaf in leaves if not isinstance(leaf, str)
    ]


def check_leaves(model: nn.Module, leaves: Sequence[LeafSpec]) -> None:
    """Refuse a leaf name that matches no submodule: a misspelt leaf would be ignored."""
    names = {name for name, _ in model.named_modules() if name}
    classes = {type(m).__name__ for m in model.modules()}
    for leaf in leaves:
        if isinstance(leaf, str) and leaf not in names and leaf not in classes:
            known = sorted(name for name in names if "." not in name)[:12]
            raise TraceError(
                f"Leaf '{leaf}' names no submodule of {type(model).__name__} (neither a qualified "
                f"name nor a class name). Top-level submodules: {', '.join(known) or 'none'}; "
                "`dynify inspect` shows the graph."
            )


def write_graphs(traced: torch.fx.GraphModule, dyn: DynamicModel, folder: Path) -> list[Path]:
    """The traced graph, then every GraphModule inside the dynamic model, as numbered .py files."""
    check_graph_folder(folder)
    modules = [("traced", traced)] + [
        (name.replace(".", "_"), module)
        for name, module in dyn.named_modules()
        if isinstance(module, torch.fx.GraphModule)
    ]
    paths = []
    for index, (name, module) in enumerate(modules):
        path = folder / f"{index:03d}_{name}.py"
        write_text_atomic(path, f"# {type(module).__name__}\n{module.code}")
        paths.append(path)
    return paths


def check_graph_folder(folder: str | Path) -> Path:
    """Create the `dump_graphs` folder, or say why it cannot be (before any work is done)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DynifyError(f"The graph folder {folder} is a file; name a folder to write into.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DynifyError(
            f"Cannot create the graph folder {folder}: {exc.strerror or exc}. Name a folder you "
            "can write to."
        ) from None
    return folder


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {list(output.shape)}"
    return f"a {type(output).__name__}"


def convert(
    model: nn.Module | str,
    strategy: str = "early-exit",
    example_input: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    options: StrategyOptions | dict[str, Any] | None = None,
    weights: str | None = "auto",
    num_classes: int | None = None,
    input_size: int | None = None,
    input_shape: Sequence[int] | None = None,
    input_dtype: str | torch.dtype = "float32",
    leaf_modules: Sequence[LeafSpec] = (),
    dump_graphs: str | Path | None = None,
    extra_input: str | ExtraInput | None = None,
    pad_id: int | None = None,
) -> DynamicModel:
    """Convert a static classifier into a dynamic one with the named strategy.

    `model` is an nn.Module or a model name (see `dynify.zoo`); `weights`, `num_classes` and
    `input_size` apply to names. The input the model is traced with is `example_input`, else
    one of `input_shape` (batch first, e.g. `(1, 60)`) and `input_dtype` (`"int64"` for token
    ids), else an image of `input_size`. A sequence model called as `forward(ids, lengths)` or
    `forward(ids, mask)` takes `example_input=(ids, lengths)` / `(ids, mask)`, or
    `input_shape` with `extra_input` ("lengths": int64 [B]; "mask": bool [B, T];
    "mask:int64": an integer mask). `options` are the strategy's, as its options dataclass
    (`EarlyExitOptions(exits=4)`) or a dict ({"exits": 4}). `leaf_modules` keeps submodules
    whole when tracing: qualified names, class names, classes or 'pkg.mod:Class' strings.
    The result's `spec` records how to rebuild it from an artifact.
    `dump_graphs` names a folder to write the traced graph and every rewritten graph module to,
    as readable Python, for debugging a pass.
    `pad_id` is the token id texts are padded with, where dynify pads a batch or derives lengths
    or a mask from ids; by default the `padding_idx` of the embedding that reads the ids, else
    0. Give it when the model pads with another id and its embedding does not say so.
    """
    pass_ = get_strategy(strategy)
    options = options_dict(strategy, options)
    if input_size is not None and input_size < 1:
        raise InputError(f"The input size is a number of pixels, at least 1; got {input_size}.")
    if dump_graphs is not None:
        check_graph_folder(dump_graphs)
    if isinstance(model, str):
        model, ref = build_model(model, weights=weights, num_classes=num_classes)
    elif isinstance(model, nn.Module):
        ref = ref_for_module(model)
    else:
        raise ModelError(f"Expected an nn.Module or a model name, got {type(model).__name__}.")
    if input_size:
        ref.input_size = input_size
    if example_input is None and input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) < 2:
            raise InputError(
                f"The input shape is batch first, e.g. 1,60 for 60 token ids or 1,3,224,224 for "
                f"an image; got {list(shape)}."
            )
        example_input = example_input_of(shape[1:], input_dtype, example_token(model, pad_id))
        if extra_input is not None:
            extra = parse_extra_input(extra_input)
            example_input = (example_input, extra.full(1, shape[1]))
    elif example_input is None:
        if ref.input_size is None:
            raise InputError(
                "The model's input size is not known: pass example_input= or input_size= "
                "(--input-size on the command line) so it can be traced and its MACs counted."
            )
        example_input = torch.randn(1, 3, ref.input_size, ref.input_size)
    parse_dtype(input_dtype)  # a misspelt dtype fails the same whether or not it is used
    if pad_id is not None:
        check_pad_id(pad_id)
    front = read_model(model, example_input, import_leaves(leaf_modules), pad_id)
    ref.num_classes = front.context.num_classes if ref.num_classes is None else ref.num_classes
    plan = pass_.plan(front.context, options)
    dyn = build(pass_, front.context, plan)
    if dump_graphs is not None:
        write_graphs(front.context.gm, dyn, Path(dump_graphs))
    dyn.spec = {
        "format": "dynify",
        "version": SPEC_VERSION,
        "model": ref.to_dict(),
        "input_shape": list(front.context.example_input.shape[1:]),
        "input_dtype": dtype_name(front.context.example_input.dtype),
        **extra_spec(front.context.extra_input),
        **({} if pad_id is None else {"pad_id": pad_id}),
        "leaf_modules": front.trace_options.leaf_names(),
        "strategy": strategy,
        "plan": plan,
    }
    return dyn


def extra_spec(extra: ExtraInput | None) -> dict[str, Any]:
    """The spec's entry for a second input (none for models that take one tensor, so their
    artifacts stay as they were)."""
    return {} if extra is None else {"extra_input": extra.to_dict()}
