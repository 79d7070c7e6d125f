"""Symbolic tracing with torch.fx, with errors that point at the user's code.

A trace failure inside a deep model is hard to act on: fx reports the failing operation but not
which submodule was being traced. The tracer here keeps the stack of submodules it is inside, so
the error can name the module and the source line, and say how to mark it a leaf.
"""

from __future__ import annotations

import inspect
import os
import pkgutil
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from dynify.errors import TraceError

LeafSpec = type[nn.Module] | str


@dataclass
class TraceOptions:
    """What the tracer keeps whole: module types, qualified names or class names, and functions."""

    leaf_modules: Sequence[LeafSpec] = ()
    autowrap_functions: Sequence[Callable] = ()
    use_timm_registry: bool = True

    def leaf_names(self) -> list[str]:
        """Names for the artifact spec: qualified module names and class paths."""
        return [
            leaf if isinstance(leaf, str) else f"{leaf.__module__}:{leaf.__qualname__}"
            for leaf in self.leaf_modules
        ]


def _timm_registry() -> tuple[set[type[nn.Module]], set[Callable]]:
    """timm's own list of modules and functions that fx cannot trace through."""
    try:
        import timm.models  # noqa: F401  (importing registers the notrace entries)
        from timm.layers import _fx
    except ImportError:  # timm is optional for users who never trace timm models
        return set(), set()
    return set(_fx.get_notrace_modules()), set(_fx.get_notrace_functions())


@dataclass
class _Frame:
    qualname: str
    module_type: str


class DynifyTracer(torch.fx.Tracer):
    """A tracer that honours leaf modules and remembers where it is in the module tree."""

    def __init__(self, options: TraceOptions):
        timm_modules, timm_functions = (
            _timm_registry() if options.use_timm_registry else (set(), set())
        )
        super().__init__(
            autowrap_functions=tuple(timm_functions) + tuple(options.autowrap_functions)
        )
        self.leaf_types = tuple(timm_modules) + tuple(
            leaf for leaf in options.leaf_modules if isinstance(leaf, type)
        )
        self.leaf_qualnames = {leaf for leaf in options.leaf_modules if isinstance(leaf, str)}
        self.stack: list[_Frame] = []
        self.deepest_failure: list[_Frame] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_qualnames or type(m).__name__ in self.leaf_qualnames:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.stack.append(_Frame(qualname, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.deepest_failure is None:
                self.deepest_failure = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _user_source_line(exc: BaseException) -> str | None:
    """The innermost frame of the traceback that is not torch's own code."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)
    ]
    frames = [f for f in frames if os.sep + "dynify" + os.sep + "frontend" not in f.filename]
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"


def symbolic_trace(model: nn.Module, options: TraceOptions | None = None) -> torch.fx.GraphModule:
    """Trace `model` into a GraphModule, or raise a TraceError that says what to do."""
    options = options or TraceOptions()
    tracer = DynifyTracer(options)
    try:
        graph = tracer.trace(model, concrete_args=_optional_arguments(model))
    except Exception as exc:
        raise _trace_error(model, tracer, exc) from exc
    _drop_specialised_inputs(graph)
    name = type(model).__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


def _drop_specialised_inputs(graph: torch.fx.Graph) -> None:
    """Remove the placeholders of optional arguments fixed at their defaults.

    fx keeps them, with asserts that they still hold their default; nothing else reads them, so
    the asserts and the placeholder go, and the graph takes the one input tensor.
    """
    for placeholder in [n for n in graph.nodes if n.op == "placeholder" and n.args]:
        dependents, frontier = [], [placeholder]
        while frontier:
            node = frontier.pop()
            dependents.append(node)
            frontier.extend(node.users)
        if any(node.op == "output" for node in dependents):
            continue
        order = {node: i for i, node in enumerate(graph.nodes)}
        for node in sorted(set(dependents), key=order.__getitem__, reverse=True):
            graph.erase_node(node)


def _optional_arguments(model: nn.Module) -> dict | None:
    """forward's optional arguments (timm's `attn_mask=None`), fixed at their defaults.

    A converted model takes one input; tracing with the defaults baked in keeps the graph to it.
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    optional = {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return optional or None


_PACKING = ("pack_padded_sequence", "pack_sequence", "pad_packed_sequence")


def _packs_sequences(exc: BaseException) -> bool:
    """Whether the trace failed in torch's packed-sequence helpers."""
    rnn_utils = os.path.join("torch", "nn", "utils", "rnn.py")
    return any(
        f.filename.endswith(rnn_utils) or any(name in (f.line or "") for name in _PACKING)
        for f in traceback.extract_tb(exc.__traceback__)
    )


def _trace_error(model: nn.Module, tracer: DynifyTracer, exc: Exception) -> TraceError:
    if _packs_sequences(exc):
        return TraceError(
            f"{type(model).__name__}.forward packs its sequences (pack_padded_sequence): the "
            "lengths decide how the graph runs, which torch.fx cannot trace, and the temporal "
            "strategies skip and stop per step themselves. Pass the lengths instead and run the "
            "RNN on the padded batch: forward(ids, lengths) with out, _ = self.rnn(emb) and each "
            "sample's output at its last token, out.gather(1, (lengths - 1).view(-1, 1, "
            "1).expand(-1, 1, out.shape[-1])).squeeze(1) (the same output for a uni-directional "
            "RNN), or a padding mask applied to the outputs (out * mask.unsqueeze(-1)); convert "
            "with example_input=(ids, lengths) (CLI: --lengths or --mask)."
        )
    frames = tracer.deepest_failure or []
    where = frames[-1] if frames else _Frame("", type(model).__name__)
    module_desc = (
        f"module '{where.qualname}' ({where.module_type})"
        if where.qualname
        else (f"the top-level forward of {where.module_type}")
    )
    source = _user_source_line(exc)
    leaf_hint = where.qualname or where.module_type
    lines = [
        f"Could not trace {type(model).__name__} with torch.fx: tracing failed inside {module_desc}.",
        f"Reason: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
    ]
    if source:
        lines.append(f"Source: {source}")
    lines.append(
        "Usually this is Python control flow on tensor values. Mark the module as a leaf so it is "
        f"kept whole: leaf_modules=['{leaf_hint}'] in the Python API, or --leaf {leaf_hint} on "
        "the command line."
    )
    return TraceError("\n".join(lines))


def leaf_options(leaves: Iterable[str]) -> TraceOptions:
    """TraceOptions from command-line strings: qualified names, or 'pkg.mod:Class' types.

    'pkg.mod:Class' is imported: for names the user typed. Names read from an artifact go
    through `leaves_of_model`, which imports nothing.
    """
    resolved: list[LeafSpec] = []
    for leaf in leaves:
        if ":" in leaf:
            try:
                resolved.append(pkgutil.resolve_name(leaf))
            except (ImportError, AttributeError, ValueError) as exc:
                raise TraceError(f"Leaf module type '{leaf}' cannot be imported: {exc}.") from exc
        else:
            resolved.append(leaf)
    return TraceOptions(leaf_modules=resolved)


def leaves_of_model(leaves: Iterable[str], model: nn.Module) -> list[LeafSpec]:
    """An artifact's leaf entries, with 'pkg.mod:Class' found among the classes `model` is built of.

    Nothing is imported: a class that neither any submodule's type nor one of its bases is cannot
    make any module a leaf, so such an entry is dropped.
    """
    classes: dict[str, type] = {}
    for module in model.modules():
        for cls in type(module).__mro__:
            classes.setdefault(f"{cls.__module__}:{cls.__qualname__}", cls)
    resolved: list[LeafSpec] = []
    for leaf in leaves:
        if ":" not in leaf:
            resolved.append(leaf)
        elif leaf in classes:
            resolved.append(classes[leaf])
    return resolved
