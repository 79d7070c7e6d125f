"""Export an early-exit cascade to ONNX (and `.pt2`) with real control flow.

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
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CondCascade",
    "ExportError",
    "ParityCase",
    "ParityReport",
    "count_executed_ops",
    "executed_op_counts",
    "export_onnx",
    "export_pt2",
    "verify_onnx",
]

BatchPolicy = Literal["per_sample", "batch_all"]
ThresholdsLike = Tensor | Sequence[float] | None

INPUT_NAMES = ("x", "thresholds")
OUTPUT_NAMES = ("logits", "exit_index")
DEFAULT_OPSET = 20
PARITY_ATOL = 1e-4


class ExportError(Exception):
    """A cascade that cannot be exported with its control flow intact; the message says why."""


# --------------------------------------------------------------------------------------------
# The exportable cascade
# --------------------------------------------------------------------------------------------


class CondCascade(nn.Module):
    """Early-exit cascade written with `torch.cond` so export keeps the exits as control flow.

    `segments[0]` maps the image to feature 1, `segments[i]` feature i to feature i+1 and
    `segments[k]` feature k to the final logits; `heads[i]` maps feature i+1 to exit-i logits.
    Exit i is taken when `max softmax(logits_i / T_i) >= thresholds[i]`; the returned logits are
    the raw (unscaled) head logits, and `exit_index` is `k` for samples that reach the end.

    Batches (N > 1): both branches of a `torch.cond` must return the same shapes, so the cond
    cannot return "only the samples that continue". The default policy `"per_sample"` keeps
    shapes fixed anyway: the predicate is "every sample exits here"; otherwise the false branch
    gathers the samples that did not exit (`nonzero` + `index_select`, a data-dependent size
    that torch.export and ONNX handle inside the branch), runs the rest of the network on them
    only and scatters their logits back (`index_copy`) into the full [N, C] tensor. Every sample
    gets exactly its own eager decision and logits, later segments run only on the samples that
    need them, and they are skipped entirely when all exit. `"batch_all"` (exit only when all
    samples are confident, everyone leaves together) is kept as a fallback for runtimes without
    NonZero/ScatterND; for N = 1 the two policies are identical.

    Outside of export/compile the conditionals run as plain Python `if`s: eager `torch.cond`
    would go through `torch.compile` and recompile for every new closure.
    """

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        temperatures: Tensor | Sequence[float],
        thresholds: Tensor | Sequence[float],
        *,
        batch_policy: BatchPolicy = "per_sample",
    ) -> None:
        super().__init__()
        k = len(heads)
        if k < 1 or len(segments) != k + 1:
            raise ExportError(
                f"a cascade needs k >= 1 heads and k + 1 segments; got {len(heads)} heads "
                f"and {len(segments)} segments"
            )
        if batch_policy not in ("per_sample", "batch_all"):
            raise ExportError(f"unknown batch_policy {batch_policy!r}")
        temps = torch.as_tensor(temperatures, dtype=torch.float32).detach().clone().reshape(-1)
        thrs = torch.as_tensor(thresholds, dtype=torch.float32).detach().clone().reshape(-1)
        if temps.numel() != k or thrs.numel() != k:
            raise ExportError(
                f"expected {k} temperatures and {k} thresholds, got {temps.numel()} and "
                f"{thrs.numel()}"
            )
        if bool((temps <= 0).any()):
            raise ExportError(f"temperatures must be > 0, got {temps.tolist()}")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.batch_policy: BatchPolicy = batch_policy
        self.register_buffer("temperatures", temps)
        self.register_buffer("thresholds", thrs)

    @property
    def num_exits(self) -> int:
        """Number of early exits k (the final classifier is exit index k)."""
        return len(self.heads)

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return `(logits [N, C], exit_index int64 [N])`; `thresholds` defaults to calibrated."""
        thr = self.thresholds if thresholds is None else thresholds
        return self._stage(0, self.segments[0](x), thr.to(torch.float32))

    def _exit_mask(self, i: int, logits: Tensor, thr: Tensor) -> Tensor:
        """Per-sample bool [N]: does the sample leave at exit i."""
        score = torch.softmax(logits / self.temperatures[i], dim=-1).amax(dim=-1)
        return score >= thr[i]

    def _stage(self, i: int, feat: Tensor, thr: Tensor) -> tuple[Tensor, Tensor]:
        """Decide at exit i given feature i+1; `i == k` means `feat` already are final logits."""
        k = self.num_exits
        if i == k:
            return feat, _full_index(feat, k)
        logits = self.heads[i](feat)
        leave = self._exit_mask(i, logits, thr)

        def take_exit(feat: Tensor, logits: Tensor, leave: Tensor) -> tuple[Tensor, Tensor]:
            return logits.clone(), _full_index(feat, i)

        def go_on_all(feat: Tensor, logits: Tensor, leave: Tensor) -> tuple[Tensor, Tensor]:
            return self._stage(i + 1, self.segments[i + 1](feat), thr)

        def go_on_rest(feat: Tensor, logits: Tensor, leave: Tensor) -> tuple[Tensor, Tensor]:
            keep = torch.nonzero(~leave).squeeze(1)
            sub_logits, sub_exit = self._stage(
                i + 1, self.segments[i + 1](feat.index_select(0, keep)), thr
            )
            out = logits.index_copy(0, keep, sub_logits.to(logits.dtype))
            return out, _full_index(feat, i).index_copy(0, keep, sub_exit)

        go_on = go_on_rest if self.batch_policy == "per_sample" else go_on_all
        return _cond(leave.all(), take_exit, go_on, (feat, logits, leave))


def _full_index(feat: Tensor, value: int) -> Tensor:
    """Exit-index tensor [N] filled with `value` (int64, on feat's device)."""
    return torch.full((feat.shape[0],), value, dtype=torch.int64, device=feat.device)


def _cond(
    pred: Tensor, true_fn: Callable[..., Any], false_fn: Callable[..., Any], operands: tuple
) -> Any:
    """`torch.cond` while exporting/compiling (kept as control flow), a plain `if` in eager."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return torch.cond(pred, true_fn, false_fn, operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


# --------------------------------------------------------------------------------------------
# torch.export / .pt2
# --------------------------------------------------------------------------------------------


def _as_thresholds(cascade: CondCascade, thresholds: ThresholdsLike) -> Tensor:
    """Thresholds as a float32 [k] tensor (None -> the cascade's calibrated ones)."""
    if thresholds is None:
        return cascade.thresholds.detach().clone()
    t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
    if t.numel() != cascade.num_exits:
        raise ExportError(f"expected {cascade.num_exits} thresholds, got {t.numel()}")
    return t


def _example_args(
    cascade: CondCascade, example_input: Tensor, dynamic_batch: bool
) -> tuple[Tensor, Tensor]:
    """Example (x, thresholds); batch 1 is widened to 2 so export does not specialise it."""
    if example_input.dim() < 1:
        raise ExportError("example_input needs a batch dimension")
    x = example_input.detach()
    if dynamic_batch and x.shape[0] < 2:
        x = x[:1].expand(2, *x.shape[1:]).contiguous()
    return x, cascade.thresholds.detach().clone()


def _dynamic_shapes(dynamic_batch: bool) -> dict[str, Any] | None:
    """Dynamic batch for `x` only; thresholds are always [k]."""
    if not dynamic_batch:
        return None
    return {"x": {0: torch.export.Dim("batch", min=1)}, "thresholds": None}


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


def _torch_export(
    cascade: CondCascade, example_input: Tensor, dynamic_batch: bool
) -> torch.export.ExportedProgram:
    """`torch.export.export` the cascade and check that every exit survived as a cond."""
    cascade.eval()
    args = _example_args(cascade, example_input, dynamic_batch)
    try:
        with torch.no_grad():
            ep = torch.export.export(
                cascade, args, dynamic_shapes=_dynamic_shapes(dynamic_batch), strict=False
            )
    except Exception as exc:
        raise ExportError(
            f"torch.export could not capture the cascade: {_first_line(exc)}"
        ) from exc
    n_cond = _count_conds(ep)
    if n_cond < cascade.num_exits:
        raise ExportError(
            f"torch.export kept {n_cond} of {cascade.num_exits} exits as torch.cond; the graph "
            "would be static, refusing to export"
        )
    return ep


def export_pt2(
    cascade: CondCascade, example_input: Tensor, path: str | Path, *, dynamic_batch: bool = True
) -> Path:
    """Save the cascade as a `.pt2` ExportedProgram with its `torch.cond` exits.

    Loading needs only torch: `torch.export.load(path).module()(x, thresholds)` (the thresholds
    argument is required in the loaded program; pass the calibrated ones for the default).
    """
    ep = _torch_export(cascade, example_input, dynamic_batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, path)
    return path


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------

_NODE_RE = re.compile(r"translating node %(?P<node>\S+) : .*?target=(?P<target>[^\]]+)\]")
_OVERLOAD_RE = re.compile(r"OpOverload\(op='(?P<op>[^']+)', overload='(?P<ov>[^']+)'\)")


def _first_line(exc: BaseException) -> str:
    """Short form of an exception for error messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _exc_chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _module_of(ep: torch.export.ExportedProgram, node_name: str, target: str) -> str | None:
    """Qualified module path (e.g. `segments.1.conv`) of a node, by name then by target."""
    nodes = list(_iter_graph_nodes(ep.graph_module))
    by_name = [n for n in nodes if n.name == node_name]
    short = target.removeprefix("torch.ops.")
    by_target = [n for n in nodes if n.op == "call_function" and short in str(n.target)]
    for n in by_name + by_target:
        stack = n.meta.get("nn_module_stack")
        if stack:
            return str(list(stack.values())[-1][0])
    return None


def _conversion_error(exc: BaseException, ep: torch.export.ExportedProgram) -> ExportError:
    """Turn an exporter failure into an ExportError naming the op, node and module."""
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
        return ExportError(f"ONNX conversion failed: {_first_line(root)}")
    where = _module_of(ep, node, target)
    place = f" in `{where}`" if where else ""
    return ExportError(
        f"cannot export to ONNX: op `{target}` (graph node `{node}`{place}) has no ONNX "
        f"translation or failed to translate: {_first_line(root)}. Replace the op or pass a "
        "`translations={op: onnxscript_function}` table."
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


def _batch_symbol(ep: torch.export.ExportedProgram) -> str:
    """Name torch.export gave the batch dimension of `x` (e.g. `s77`)."""
    for node in ep.graph_module.graph.nodes:
        if node.op == "placeholder" and node.name == INPUT_NAMES[0]:
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


def export_onnx(
    cascade: CondCascade,
    example_input: Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: float = PARITY_ATOL,
    translations: dict[Callable[..., Any], Callable[..., Any]] | None = None,
) -> Path:
    """Export `cascade` to ONNX with one `If` per exit; refuse if control flow or parity is lost.

    Inputs are `x` [N, ...] (N dynamic when `dynamic_batch`) and `thresholds` float32 [k] with
    the calibrated thresholds as default; outputs are `logits` [N, C] and `exit_index` int64
    [N]. With `verify`, ONNX Runtime is compared with eager on the example (and its first
    sample) at thresholds 0, default and 1.01, and an export above `atol` is deleted and refused.
    """
    import onnx

    path = Path(path)
    ep = _torch_export(cascade, example_input, dynamic_batch)
    try:
        program = torch.onnx.export(
            ep,
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            custom_translation_table=translations,
            optimize=True,
        )
    except Exception as exc:
        raise _conversion_error(exc, ep) from exc
    if program is None:  # pragma: no cover - only the TorchScript path returns None
        raise ExportError("torch.onnx.export returned no program")
    model = program.model_proto
    n_if = _count_onnx_ops(model.graph, "If")
    if n_if < cascade.num_exits:
        raise ExportError(
            f"the ONNX graph has {n_if} If nodes for {cascade.num_exits} exits; the exits were "
            "folded into a static graph, refusing to export"
        )
    _set_default_thresholds(model, cascade.thresholds)
    if dynamic_batch:
        _rename_dim(model.graph, _batch_symbol(ep), "batch")
    model.doc_string = f"dynify early-exit cascade, {cascade.num_exits} exits"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported ONNX model is invalid: {_first_line(exc)}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() >= 2**31 - 2**20:
        onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, path)
    if verify:
        x = example_input.detach()
        inputs = [x[:1], x] if x.shape[0] > 1 else [x]
        k = cascade.num_exits
        report = verify_onnx(cascade, path, inputs, [[0.0] * k, None, [1.01] * k], atol=atol)
        if not report.ok:
            path.unlink(missing_ok=True)
            raise ExportError(f"ONNX Runtime does not match eager, export refused:\n{report}")
    return path


# --------------------------------------------------------------------------------------------
# ONNX Runtime: parity and executed-op counts
# --------------------------------------------------------------------------------------------


def _session(
    path: str | Path,
    *,
    threads: int | None = None,
    optimize: bool = True,
    profile_prefix: str | None = None,
) -> Any:
    """A CPU ONNX Runtime session, optionally with profiling and without graph rewrites."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # the "initializer appears in graph inputs" warning is expected
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(x: Tensor, thresholds: ThresholdsLike) -> dict[str, np.ndarray]:
    """ORT feed; thresholds None leaves the input out so its default applies."""
    feed = {INPUT_NAMES[0]: x.detach().cpu().numpy()}
    if thresholds is not None:
        t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
        feed[INPUT_NAMES[1]] = t.cpu().numpy()
    return feed


@dataclass(frozen=True)
class ParityCase:
    """ORT vs eager on one (input, thresholds) pair.

    `max_rel_diff` is max|ort - eager| / max|eager| (relative to the largest eager logit, so
    near-zero logits do not blow it up).
    """

    input_index: int
    batch: int
    thresholds: tuple[float, ...] | None
    max_abs_diff: float
    max_rel_diff: float
    exits_onnx: tuple[int, ...]
    exits_eager: tuple[int, ...]

    @property
    def exits_match(self) -> bool:
        """Same exit for every sample."""
        return self.exits_onnx == self.exits_eager


@dataclass
class ParityReport:
    """Per-case parity of an ONNX export; `ok` when every case is within `atol` and exits agree."""

    atol: float
    cases: list[ParityCase] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        """Worst absolute logit difference over all cases."""
        return max((c.max_abs_diff for c in self.cases), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        """Worst relative logit difference over all cases."""
        return max((c.max_rel_diff for c in self.cases), default=0.0)

    @property
    def ok(self) -> bool:
        """True when all logits are within `atol` and all exits match."""
        return all(c.max_abs_diff <= self.atol and c.exits_match for c in self.cases)

    def __str__(self) -> str:
        lines = [f"parity (atol={self.atol:g}): {'OK' if self.ok else 'FAILED'}"]
        for c in self.cases:
            thr = "default" if c.thresholds is None else [round(t, 4) for t in c.thresholds]
            mark = "" if c.exits_match else f"  EXITS DIFFER eager={list(c.exits_eager)}"
            lines.append(
                f"  input {c.input_index} (N={c.batch}) thresholds={thr}: "
                f"max_abs={c.max_abs_diff:.3g} max_rel={c.max_rel_diff:.3g} "
                f"exits={list(c.exits_onnx)}{mark}"
            )
        return "\n".join(lines)


def verify_onnx(
    cascade: CondCascade,
    path: str | Path,
    inputs: Sequence[Tensor],
    thresholds_list: Sequence[ThresholdsLike],
    *,
    atol: float = PARITY_ATOL,
) -> ParityReport:
    """Run every input at every thresholds vector in ORT and in eager; report the differences.

    A `None` thresholds entry omits the ONNX input (exercising its default) and uses the
    cascade's calibrated thresholds in eager.
    """
    session = _session(path)
    cascade.eval()
    report = ParityReport(atol=atol)
    for idx, x in enumerate(inputs):
        for thr in thresholds_list:
            ort_logits, ort_exit = session.run(list(OUTPUT_NAMES), _feed(x, thr))
            with torch.no_grad():
                ref_logits, ref_exit = cascade(x, _as_thresholds(cascade, thr))
            ref = ref_logits.detach().cpu().double().numpy()
            diff = np.abs(ort_logits.astype(np.float64) - ref)
            max_abs = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            report.cases.append(
                ParityCase(
                    input_index=idx,
                    batch=int(x.shape[0]),
                    thresholds=None
                    if thr is None
                    else tuple(_as_thresholds(cascade, thr).tolist()),
                    max_abs_diff=max_abs,
                    max_rel_diff=max_abs / scale if scale > 0 else max_abs,
                    exits_onnx=tuple(int(e) for e in np.asarray(ort_exit).reshape(-1)),
                    exits_eager=tuple(int(e) for e in ref_exit.reshape(-1).tolist()),
                )
            )
    return report


def executed_op_counts(
    path: str | Path, x: Tensor, thresholds: ThresholdsLike = None
) -> Counter[str]:
    """How many times each ONNX op type ran for one inference, from ORT's profile.

    Graph optimisations are disabled so the profile lists the model's own nodes (ORT would
    otherwise rename fused convs `FusedConv`); nodes inside `If` branches are only in the
    profile when their branch ran, which is what proves the skipping without a clock.
    """
    with tempfile.TemporaryDirectory(prefix="dynify_ort_prof_") as tmp:
        session = _session(path, optimize=False, profile_prefix=str(Path(tmp) / "profile"))
        session.run(None, _feed(x, thresholds))
        profile = Path(session.end_profiling())
        events = json.loads(profile.read_text())
    return Counter(
        str(ev.get("args", {}).get("op_name"))
        for ev in events
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time")
    )


def count_executed_ops(
    path: str | Path, x: Tensor, thresholds: ThresholdsLike = None, op_type: str = "Conv"
) -> int:
    """Number of `op_type` nodes ONNX Runtime executed for one inference (see executed_op_counts)."""
    return executed_op_counts(path, x, thresholds)[op_type]
