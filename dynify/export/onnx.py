"""Export a dynamic network to ONNX (and `.pt2`) with its skipping kept as real control flow.

Any module whose `forward(x, thresholds)` returns `(logits, decisions)` and puts skippable work
under `torch.cond` can be exported (`DynamicModel.export_face()` builds one, an `ExportFace`);
`dynify.runtime.cascade.CondCascade` is the early-exit one. Every graph's inputs are named
`INPUT_NAMES` ("x", "thresholds") and its outputs `OUTPUT_NAMES` ("logits", "decisions"), for
every strategy (`dynify.runtime.model`).

Recipe (torch 2.14, onnxscript 0.7, onnxruntime 1.32):

1. Every exit is a `torch.cond` whose false branch runs the next segment and recurses, so the
   graph nests one conditional per exit (`CondCascade`).
2. `torch.export.export(cascade, (x, thresholds), dynamic_shapes=..., strict=False)` keeps each
   `torch.cond` as a `higher_order.cond` node with two sub-GraphModules.
3. `torch.onnx.export(exported_program, ..., dynamo=True)` translates each `cond` into an ONNX
   `If` node whose branches are subgraphs, so ONNX Runtime only executes the branch taken.
4. The thresholds stay a graph input; an initializer of the same name gives it a default
   (ONNX IR >= 4 semantics), so callers may omit it or feed it.

Why not a Python `if`: export would specialise on the example's branch and silently produce a
static graph; `torch.cond` is the only construct both torch.export and the ONNX exporter keep.

Pitfalls handled here:
- ONNX Runtime only applies its fast NCHWc conv layout to convs whose weights are initializers
  of their own (sub)graph; the exporter leaves all weights in the main graph, so we move them
  into the `If` branches (`_localize_initializers`), else later segments run ~1.5x slower/MAC.
- An ExportedProgram with unbacked sizes inside cond branches can only be decomposed once:
  export a fresh one per consumer (ONNX, .pt2).
- A batch-1 example with a dynamic batch dim gets specialised to 1: we widen it to 2.
- Eager `torch.cond` goes through `torch.compile`; eager forward uses a plain `if` instead.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynify.errors import ExportError
from dynify.export.verify import (
    PARITY_ATOL,
    ParityReport,
    ThresholdsLike,
    _as_thresholds,
    _num_thresholds,
    _quiet,
    first_line,
    verify_onnx,
)
from dynify.files import atomic_output
from dynify.frontend.inputs import Inputs, batch_size, input_tensors, map_inputs
from dynify.runtime.cascade import CondCascade
from dynify.runtime.model import INPUT_NAMES, OUTPUT_NAMES, DynamicModel, ExportFace

__all__ = [
    "ExportError",
    "OnnxExport",
    "write_onnx",
    "write_plain_onnx",
    "write_pt2",
    "write_static_onnx",
]

DEFAULT_OPSET = 20


# --------------------------------------------------------------------------------------------
# torch.export / .pt2
# --------------------------------------------------------------------------------------------


def _example_args(
    module: nn.Module, example_input: Inputs, dynamic_batch: bool
) -> tuple[Inputs, Tensor]:
    """Example (x, thresholds); batch 1 is widened to 2 so export does not specialise it.
    `x` is one tensor, or (sequence, lengths / mask) for a model converted with them."""
    if any(t.dim() < 1 for t in input_tensors(example_input)):
        raise ExportError("example_input needs a batch dimension")

    def widen(t: Tensor) -> Tensor:
        t = t.detach()
        if dynamic_batch and t.shape[0] < 2:
            t = t[:1].expand(2, *t.shape[1:]).contiguous()
        return t

    return map_inputs(example_input, widen), _as_thresholds(module, None)


def _dynamic_shapes(
    dynamic_batch: bool, names: Sequence[str] = INPUT_NAMES, example: Inputs | None = None
) -> Any:
    """Dynamic batch for `x` (each of its tensors: one batch); thresholds are always [k]."""
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch", min=1)
    first: Any = {0: batch}
    if isinstance(example, tuple | list):
        first = tuple({0: batch} for _ in input_tensors(example))
    shapes: dict[str, Any] = {names[0]: first}
    for name in names[1:]:
        shapes[name] = None
    return shapes


def graph_input_names(module: nn.Module) -> list[str]:
    """The exported graph's input names: `x`, the lengths or mask of a model converted with
    them (named after their kind), `thresholds`."""
    extra = getattr(module, "extra_input_name", None)
    return [INPUT_NAMES[0], *([extra] if extra else []), INPUT_NAMES[1]]


def _iter_graph_nodes(gm: torch.fx.GraphModule) -> Iterator[torch.fx.Node]:
    """All nodes of a graph module including the `torch.cond` branch subgraphs."""
    for node in gm.graph.nodes:
        yield node
        if node.op == "get_attr":
            sub = getattr(gm, str(node.target), None)
            if isinstance(sub, torch.fx.GraphModule):
                yield from _iter_graph_nodes(sub)


def _count_conds(ep: torch.export.ExportedProgram) -> int:
    """Number of `higher_order.cond` calls (nested ones included)."""
    return sum(
        1
        for n in _iter_graph_nodes(ep.graph_module)
        if n.op == "call_function" and n.target is torch.ops.higher_order.cond
    )


def _min_conds(module: nn.Module) -> int:
    """How many conditionals the export must keep: one per exit for a cascade, else the
    face's `min_conditionals` (1 for a face that skips work)."""
    if isinstance(module, CondCascade):
        return module.num_exits
    return module.min_conditionals if isinstance(module, ExportFace) else 1


def _torch_export(
    module: nn.Module, example_input: Inputs, dynamic_batch: bool
) -> torch.export.ExportedProgram:
    """`torch.export.export` the export face and check that its conditionals survived."""
    module.eval()
    args = _example_args(module, example_input, dynamic_batch)
    names = _forward_arg_names(module)
    shapes = _dynamic_shapes(dynamic_batch, names, args[0])
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise ExportError(
            f"torch.export could not capture {type(module).__name__}: {first_line(exc)}"
        ) from exc
    n_cond = _count_conds(ep)
    if n_cond < _min_conds(module):
        raise ExportError(
            f"torch.export kept {n_cond} torch.cond for {type(module).__name__} (needs at least "
            f"{_min_conds(module)}); the graph would be static, refusing to export"
        )
    return ep


def _forward_arg_names(module: nn.Module) -> tuple[str, str]:
    """Names of forward's two arguments (dynamic_shapes is keyed by them)."""
    import inspect

    params = list(inspect.signature(module.forward).parameters)
    if len(params) < 2:
        raise ExportError(
            f"{type(module).__name__}.forward must take (x, thresholds); it takes {params}"
        )
    return params[0], params[1]


def write_pt2(
    module: nn.Module, example_input: Tensor, path: str | Path, *, dynamic_batch: bool = True
) -> Path:
    """Save an export face as a `.pt2` ExportedProgram with its `torch.cond` control flow.

    Loading needs only torch: `torch.export.load(path).module()(x, thresholds)` (the thresholds
    argument is required in the loaded program; pass the calibrated ones for the default).
    """
    ep = _torch_export(module, example_input, dynamic_batch)
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.export.save(ep, tmp)
    return path


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------

_NODE_RE = re.compile(r"translating node %(?P<node>\S+) : .*?target=(?P<target>[^\]]+)\]")
_OVERLOAD_RE = re.compile(r"OpOverload\(op='(?P<op>[^']+)', overload='(?P<ov>[^']+)'\)")


def _exc_chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _op_basename(target: str) -> str:
    """`torch.ops.dyn.weird.default` -> `weird` (the part that survives decompositions)."""
    parts = target.removeprefix("torch.ops.").split(".")
    return parts[-2] if len(parts) >= 3 else parts[-1]


def _locate_op(module: nn.Module, example_input: Tensor, target: str) -> str | None:
    """Which submodule (and fx node, inside GraphModules) runs `target`, found by running it.

    Nodes inside `torch.cond` branches carry no `nn_module_stack`, so the exported graph cannot
    say where an op came from; replaying the module eagerly (every branch taken: thresholds
    above 1) under a dispatch recorder, with hooks keeping the module stack, can.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    base = _op_basename(target)
    stack: list[str] = []
    found: list[list[str]] = []

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if not found and base in str(func):
                found.append(list(stack))
            return func(*args, **(kwargs or {}))

    def enter(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any) -> None:
            stack.append(name)

        return hook

    def leave(mod: nn.Module, args: Any, out: Any) -> None:  # must return None: keeps output
        stack.pop()

    handles = []
    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_pre_hook(enter(name)))
            handles.append(sub.register_forward_hook(leave))
    try:
        full = torch.full((_num_thresholds(module),), 1.01)
        with torch.no_grad(), _Recorder():
            module(map_inputs(example_input, lambda t: t[:1]), full)
    except Exception:  # locating is best effort; the op and graph node are already named
        return None
    finally:
        for handle in handles:
            handle.remove()
    if not found or not found[0]:
        return None
    names = found[0]
    where = f"module `{names[-1]}` ({type(module.get_submodule(names[-1])).__name__})"
    for depth in range(len(names) - 1, -1, -1):  # innermost GraphModule on the stack
        gm = module.get_submodule(names[depth])
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        inner = names[depth + 1][len(names[depth]) + 1 :] if depth + 1 < len(names) else None
        for node in gm.graph.nodes:
            if (inner is not None and node.op == "call_module" and node.target == inner) or (
                inner is None and node.op == "call_function" and base in str(node.target)
            ):
                return f"{where}, fx node `{node.name}` of `{names[depth]}`"
        break
    return where


def _conversion_error(exc: BaseException, module: nn.Module, example_input: Tensor) -> ExportError:
    """Turn an exporter failure into an ExportError naming the op, node and submodule."""
    node = target = None
    root = exc
    for e in _exc_chain(exc):
        m = _NODE_RE.search(str(e))
        if m and node is None:
            node, target = m["node"], m["target"].strip()
        root = e
    if target is None:
        for e in _exc_chain(exc):
            m = _OVERLOAD_RE.search(str(e))
            if m:
                target = f"{m['op']}.{m['ov']}"
                break
    if node is None or target is None:
        return ExportError(f"ONNX conversion failed: {first_line(root)}")
    where = _locate_op(module, example_input, target)
    place = f" in {where}" if where else ""
    return ExportError(
        f"cannot export to ONNX: op `{target}` (graph node `{node}`{place}) has no ONNX "
        f"translation or failed to translate: {first_line(root)}. Replace the op in the model, "
        "or pass a `translations={op: onnxscript_function}` table to write_onnx."
    )


def _count_onnx_ops(graph: Any, op_type: str) -> int:
    """Number of `op_type` nodes in an ONNX graph, subgraphs included."""
    total = 0
    for node in graph.node:
        total += node.op_type == op_type
        for attr in node.attribute:
            if attr.HasField("g"):
                total += _count_onnx_ops(attr.g, op_type)
            for g in attr.graphs:
                total += _count_onnx_ops(g, op_type)
    return total


def _batch_symbol(ep: torch.export.ExportedProgram, name: str = INPUT_NAMES[0]) -> str:
    """Name torch.export gave the batch dimension of `x` (e.g. `s77`)."""
    for node in ep.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name == name:
            return str(node.meta["val"].shape[0])
    return ""


def _rename_dim(graph: Any, old: str, new: str) -> None:
    """Rename a symbolic dimension everywhere in an ONNX graph (subgraphs included)."""
    if not old:
        return
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = new
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _rename_dim(attr.g, old, new)
            for g in attr.graphs:
                _rename_dim(g, old, new)


def _localize_initializers(model: Any) -> int:
    """Move each initializer into the innermost subgraph that contains all its uses.

    The exporter keeps every weight in the main graph and lets `If` branches read them from
    the outer scope. ONNX Runtime's CPU layout optimiser (NCHWc convs) only rewrites a Conv whose
    weights are initializers of its *own* graph, so without this the later segments run with
    plain NCHW kernels, ~1.5x slower per MAC than the same layers in a static model.
    """
    root = model.graph
    uses: dict[str, list[tuple]] = {}
    graphs: dict[tuple, Any] = {(): root}

    def walk(graph: Any, scope: tuple) -> None:
        for node in graph.node:
            for name in node.input:
                if name:
                    uses.setdefault(name, []).append(scope)
            for attr in node.attribute:
                subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                for j, sub in enumerate(subs):
                    inner = (*scope, (node.name, attr.name, j))
                    graphs[inner] = sub
                    walk(sub, inner)
        for out in graph.output:
            uses.setdefault(out.name, []).append(scope)

    walk(root, ())
    graph_inputs = {i.name for i in root.input}
    keep, moved = [], 0
    for init in root.initializer:
        scopes = uses.get(init.name)
        if not scopes or init.name in graph_inputs:
            keep.append(init)
            continue
        common = scopes[0]
        for scope in scopes[1:]:
            n = 0
            while n < min(len(common), len(scope)) and common[n] == scope[n]:
                n += 1
            common = common[:n]
        if common:
            graphs[common].initializer.append(init)
            moved += 1
        else:
            keep.append(init)
    del root.initializer[:]
    root.initializer.extend(keep)
    return moved


def _strip_metadata(graph: Any) -> None:
    """Drop the exporter's per-node metadata (stack traces, module paths): ~5x the weights'
    size on a small ResNet, and of no use to a runtime."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_metadata(attr.g)
            for g in attr.graphs:
                _strip_metadata(g)


def _set_default_thresholds(model: Any, thresholds: Tensor) -> None:
    """Give the `thresholds` input a default by adding an initializer with the same name."""
    from onnx import numpy_helper

    name = INPUT_NAMES[1]
    if not any(i.name == name for i in model.graph.input):
        raise ExportError("the exported graph has no `thresholds` input (it was constant-folded)")
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            del model.graph.initializer[i]
            break
    arr = thresholds.detach().cpu().numpy().astype(np.float32).reshape(-1)
    model.graph.initializer.append(numpy_helper.from_array(arr, name=name))
    for inp in model.graph.input:
        if inp.name == name:
            inp.doc_string = "per-exit confidence thresholds; defaults to the calibrated ones"


@contextmanager
def _onnx_output(path: Path, large: bool) -> Iterator[Path]:
    """`atomic_output` for an ONNX file, and for its `.data` side file when it has one.

    A model with external data names the side file, so both are written under their final
    names in a temporary folder beside `path` and moved into place once complete.
    """
    if not large:
        with atomic_output(path) as tmp:
            yield tmp
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield folder / path.name
        data = folder / (path.name + ".data")
        if data.exists():
            os.chmod(data, 0o644)
            os.replace(data, path.parent / data.name)
        os.chmod(folder / path.name, 0o644)
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class OnnxExport:
    """What `write_onnx` produced: the file, its control flow and the parity check."""

    path: Path
    if_nodes: int
    conds: int
    input_names: tuple[str, ...]
    output_names: tuple[str, str]
    report: ParityReport | None
    seconds: float


def write_onnx(
    module: nn.Module,
    example_input: Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: float = PARITY_ATOL,
    translations: dict[Callable[..., Any], Callable[..., Any]] | None = None,
    reference: nn.Module | None = None,
    inputs: Sequence[Tensor] | None = None,
    thresholds_list: Sequence[ThresholdsLike] | None = None,
    labels: Sequence[str] | None = None,
) -> OnnxExport:
    """Export an export face to ONNX with its conditionals as `If` nodes; refuse a static graph.

    `module.forward(x, thresholds)` returns `(logits, decisions)` (what a
    `DynamicModel.export_face()` returns). Inputs are `x` [N, ...] (N dynamic when
    `dynamic_batch`) and `thresholds` float32 [k] with the module's calibrated thresholds as
    default; outputs are `logits` [N, C] and `decisions` (int64: the exit index [N] of a
    cascade, per-unit flags or counts [N, K] otherwise). With `verify`, ONNX Runtime is compared with `reference` (default: the
    module itself; a DynamicModel is run through its eager forward) on `inputs` at every entry
    of `thresholds_list` (defaults: the example and its first sample; thresholds 0, default,
    1.01), and an export above `atol` or with other decisions is refused. The file is written,
    checked and verified under a temporary name and renamed to `path` only then, so a refused
    or failed export leaves an existing file at `path` untouched.
    """
    import time

    import onnx

    start = time.perf_counter()
    path = Path(path)
    ep = _torch_export(module, example_input, dynamic_batch)
    in_names = _forward_arg_names(module)
    out_names = OUTPUT_NAMES
    try:
        with _quiet("onnx_ir", "onnxscript"):
            program = torch.onnx.export(
                ep,
                dynamo=True,
                input_names=graph_input_names(module),
                output_names=list(out_names),
                opset_version=opset,
                custom_translation_table=translations,
                optimize=True,
                verbose=False,  # the exporter otherwise prints its progress to stdout
            )
    except Exception as exc:
        raise _conversion_error(exc, module, example_input) from exc
    if program is None:  # pragma: no cover - only the TorchScript path returns None
        raise ExportError("torch.onnx.export returned no program")
    model = program.model_proto
    n_if, n_cond = _count_onnx_ops(model.graph, "If"), _count_conds(ep)
    if n_if < max(n_cond, _min_conds(module)):
        raise ExportError(
            f"the ONNX graph has {n_if} If nodes for {n_cond} torch.cond; the skipping was "
            "folded into a static graph, refusing to export"
        )
    _localize_initializers(model)
    _strip_metadata(model.graph)
    _set_default_thresholds(model, _as_thresholds(module, None))
    if dynamic_batch:
        _rename_dim(model.graph, _batch_symbol(ep, in_names[0]), "batch")
        if isinstance(example_input, tuple | list):  # (x, lengths): their batch symbol
            _rename_dim(model.graph, _batch_symbol(ep, f"{in_names[0]}_0"), "batch")
    model.doc_string = f"dynify {type(module).__name__}: {n_if} If nodes, thresholds input"
    large = model.ByteSize() >= 2**31 - 2**24  # protobuf's 2 GB limit: weights go to a side file
    report = None
    # Written, checked and verified under a temporary name: a refused export leaves whatever
    # was at `path` before untouched.
    with _onnx_output(path, large) as tmp:
        onnx.save_model(model, tmp, save_as_external_data=large, location=path.name + ".data")
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise ExportError(f"the exported ONNX model is invalid: {first_line(exc)}") from exc
        if verify:
            if inputs is None:
                x = map_inputs(example_input, Tensor.detach)
                first = map_inputs(x, lambda t: t[:1])
                inputs = [first, x] if dynamic_batch and batch_size(x) > 1 else [x]
            if thresholds_list is None:
                k = _num_thresholds(module)
                thresholds_list = [[0.0] * k, None, [1.01] * k]
            report = verify_onnx(
                reference if reference is not None else module,
                tmp,
                inputs,
                thresholds_list,
                atol=atol,
                labels=labels,
                module=module,
            )
            if not report.ok:
                raise ExportError(f"ONNX Runtime does not match eager, export refused:\n{report}")
    return OnnxExport(
        path=path,
        if_nodes=n_if,
        conds=n_cond,
        input_names=tuple(graph_input_names(module)),
        output_names=out_names,
        report=report,
        seconds=time.perf_counter() - start,
    )


class _StaticFace(nn.Module):
    """A DynamicModel inside `static()`: the original network, for a static ONNX baseline."""

    def __init__(self, dyn: nn.Module) -> None:
        super().__init__()
        self.dyn = dyn

    def forward(self, x: Tensor) -> Tensor:
        with self.dyn.static():
            return self.dyn(x)


def write_static_onnx(
    dyn: DynamicModel, example_input: Tensor, path: str | Path, *, opset: int = DEFAULT_OPSET
) -> Path:
    """The static network of a DynamicModel (its `static()` face) as a plain ONNX graph.

    The baseline latency comparisons need: same weights and graph rewrites as the dynamic export.
    """
    saved = (dyn.last_macs, dyn.last_exit)
    try:
        # The accounting attributes assigned in forward are not graph state; restored below.
        names = ["x"] if dyn.extra_input is None else ["x", dyn.extra_input.name]
        return write_plain_onnx(
            _StaticFace(dyn), example_input, path, opset=opset, input_names=names
        )
    finally:
        dyn.last_macs, dyn.last_exit = saved


def write_plain_onnx(
    module: nn.Module,
    example_input: Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    output_name: str = "logits",
    input_names: Sequence[str] = ("x",),
) -> Path:
    """A module without control flow (`x` -> one tensor) as an ONNX graph with a fixed input
    shape: the static baselines of latency comparisons (the whole network, or a prefix of it)."""
    import warnings

    import onnx

    path = Path(path)
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript"):
            warnings.simplefilter("ignore")
            example = map_inputs(example_input, Tensor.detach)
            ep = torch.export.export(module.eval(), (example,), strict=False)
            program = torch.onnx.export(
                ep,
                dynamo=True,
                input_names=list(input_names),
                output_names=[output_name],
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"the static network could not be exported: {first_line(exc)}") from exc
    with atomic_output(path) as tmp:
        onnx.save_model(program.model_proto, tmp)
    return path
