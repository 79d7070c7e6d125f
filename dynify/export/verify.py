"""Run an exported model and compare it with the eager one; count the ops it really executed.

An export is only reported done once ONNX Runtime (or the loaded `.pt2` program) agrees with the
eager model at thresholds that force every behaviour (`verify_onnx`, `verify_pt2`), and the
skipping is proven by ORT's profiler (`executed_op_counts`), not by the clock.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dynify.errors import ExportError
from dynify.frontend.inputs import Inputs, batch_size, input_tensors
from dynify.runtime.cascade import CondCascade
from dynify.runtime.model import INPUT_NAMES, DynamicModel, ExportFace

ThresholdsLike = Tensor | Sequence[float] | None

PARITY_ATOL = 1e-4

__all__ = [
    "ParityCase",
    "ParityReport",
    "count_executed_ops",
    "executed_op_counts",
    "verify_onnx",
    "verify_pt2",
]


def _num_thresholds(module: nn.Module) -> int:
    """Length of the module's `thresholds` buffer (the graph input's size)."""
    if not isinstance(module, ExportFace | DynamicModel):
        raise ExportError(
            f"{type(module).__name__} is not an export face: subclass "
            "dynify.runtime.model.ExportFace (forward(x, thresholds) with the calibrated "
            "thresholds as default)"
        )
    return module.num_thresholds


def _as_thresholds(module: nn.Module, thresholds: ThresholdsLike) -> Tensor:
    """Thresholds as a float32 [k] tensor (None -> the module's calibrated ones)."""
    if thresholds is None:
        return module.thresholds.detach().clone().float()
    t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
    if t.numel() != _num_thresholds(module):
        raise ExportError(f"expected {_num_thresholds(module)} thresholds, got {t.numel()}")
    return t


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence the exporter's and loader's benign warnings (empty-list attributes, unused
    unbacked symbols) for the duration of a call."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --------------------------------------------------------------------------------------------
# ONNX Runtime: parity and executed-op counts
# --------------------------------------------------------------------------------------------


def first_line(exc: BaseException) -> str:
    """Short form of an exception for error messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def ort_session(
    path: str | Path,
    *,
    threads: int | None = None,
    optimize: bool = True,
    profile_prefix: str | None = None,
) -> Any:
    """A CPU ONNX Runtime session, optionally with profiling and without graph rewrites.

    With `threads`, the session gets its own pool whose workers do not spin (they would stall
    other work on shared cores); for timing, `dynify.export.timing` runs sessions the way a
    deployed model runs instead.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # the "initializer appears in graph inputs" warning is expected
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # Spinning worker threads stall each other when the cores are shared with other work.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(
    x: Inputs, thresholds: ThresholdsLike, names: Sequence[str] = INPUT_NAMES
) -> dict[str, np.ndarray]:
    """ORT feed; thresholds None leaves the input out so its default applies. `x` is one
    tensor or (sequence, lengths / mask), fed under the graph's input names `names`."""
    tensors = input_tensors(x)
    feed = {name: t.detach().cpu().numpy() for name, t in zip(names, tensors, strict=False)}
    if thresholds is not None:
        t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
        feed[INPUT_NAMES[1]] = t.cpu().numpy()
    return feed


@dataclass(frozen=True)
class ParityCase:
    """ORT vs eager on one (input, thresholds) pair.

    `max_rel_diff` is max|ort - eager| / max|eager| (relative to the largest eager logit, so
    near-zero logits do not blow it up). `exits_*` are the per-sample decisions (exit index for
    cascades; the module's second output flattened otherwise).
    """

    input_index: int
    batch: int
    thresholds: tuple[float, ...] | None
    max_abs_diff: float
    max_rel_diff: float
    exits_onnx: tuple[int, ...]
    exits_eager: tuple[int, ...]
    label: str = ""

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
            label = f"{c.label}: " if c.label else ""
            lines.append(
                f"  {label}input {c.input_index} (N={c.batch}) thresholds={thr}: "
                f"max_abs={c.max_abs_diff:.3g} max_rel={c.max_rel_diff:.3g} "
                f"exits={list(c.exits_onnx)}{mark}"
            )
        return "\n".join(lines)


def _eager_reference(
    reference: nn.Module, module: nn.Module | None
) -> Callable[[Tensor, ThresholdsLike], tuple[Tensor, Tensor | None]]:
    """`(x, thresholds) -> (logits, decisions)` computed in eager PyTorch.

    A DynamicModel runs its own eager forward (the thing the export must match) with the
    thresholds set temporarily; its decisions are `last_exit` where that is what the graph
    returns, else the export face's eager decisions.
    """
    if not isinstance(reference, DynamicModel):

        def run_module(x: Tensor, thr: ThresholdsLike) -> tuple[Tensor, Tensor | None]:
            return reference(x, _as_thresholds(reference, thr))

        return run_module

    dyn = reference

    def run_dynamic(x: Tensor, thr: ThresholdsLike) -> tuple[Tensor, Tensor | None]:
        saved = dyn.thresholds.detach().clone()
        try:
            if thr is not None:
                dyn.set_thresholds(_as_thresholds(dyn, thr).tolist())
            logits = dyn(x)
            t = dyn.thresholds.detach().clone()
        finally:
            dyn.thresholds.copy_(saved)
        decisions = dyn.last_exit
        if module is not None and (decisions is None or not isinstance(module, CondCascade)):
            decisions = module(x, t)[1]
        return logits, decisions

    return run_dynamic


def verify_onnx(
    reference: nn.Module,
    path: str | Path,
    inputs: Sequence[Tensor],
    thresholds_list: Sequence[ThresholdsLike],
    *,
    atol: float = PARITY_ATOL,
    labels: Sequence[str] | None = None,
    module: nn.Module | None = None,
) -> ParityReport:
    """Run every input at every thresholds vector in ORT and in eager; report the differences.

    `reference` is the export face (`forward(x, thresholds)`) or the DynamicModel it came from
    (compared through its eager forward, pass its export face as `module` for the decisions of
    non-cascade strategies). A `None` thresholds entry omits the ONNX input (exercising its
    default) and uses the calibrated thresholds in eager. `labels` name the thresholds entries.
    """
    session = ort_session(path)

    def run_onnx(x: Tensor, thr: ThresholdsLike) -> tuple[np.ndarray, np.ndarray]:
        names = [i.name for i in session.get_inputs()]
        logits, decisions = session.run(None, _feed(x, thr, names))[:2]
        return logits, decisions

    return _parity(run_onnx, reference, inputs, thresholds_list, atol, labels, module)


def verify_pt2(
    reference: nn.Module,
    path: str | Path,
    inputs: Sequence[Tensor],
    thresholds_list: Sequence[ThresholdsLike],
    *,
    atol: float = PARITY_ATOL,
    labels: Sequence[str] | None = None,
    module: nn.Module | None = None,
) -> ParityReport:
    """`verify_onnx` for a `.pt2` file, run through `torch.export.load(path).module()`."""
    with _quiet("torch._export.serde.serialize"):
        program = torch.export.load(str(path)).module()
    default = _as_thresholds(module if module is not None else reference, None)

    def run_pt2(x: Tensor, thr: ThresholdsLike) -> tuple[np.ndarray, np.ndarray]:
        t = default if thr is None else torch.as_tensor(thr, dtype=torch.float32).reshape(-1)
        with torch.no_grad():
            logits, decisions = program(x, t)[:2]
        return logits.numpy(), decisions.numpy()

    return _parity(run_pt2, reference, inputs, thresholds_list, atol, labels, module)


def _parity(
    run_exported: Callable[[Tensor, ThresholdsLike], tuple[np.ndarray, np.ndarray]],
    reference: nn.Module,
    inputs: Sequence[Tensor],
    thresholds_list: Sequence[ThresholdsLike],
    atol: float,
    labels: Sequence[str] | None,
    module: nn.Module | None,
) -> ParityReport:
    """Compare an exported runner with eager on every (input, thresholds) pair."""
    reference.eval()
    run_eager = _eager_reference(reference, module)
    report = ParityReport(atol=atol)
    labels = list(labels) if labels is not None else [""] * len(thresholds_list)
    for idx, x in enumerate(inputs):
        for thr, label in zip(thresholds_list, labels, strict=True):
            got_logits, got_exit = run_exported(x, thr)
            with torch.no_grad():
                ref_logits, ref_exit = run_eager(x, thr)
            ref = ref_logits.detach().cpu().double().numpy()
            diff = np.abs(np.asarray(got_logits, dtype=np.float64) - ref)
            max_abs = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            eager_exits = () if ref_exit is None else tuple(int(e) for e in ref_exit.reshape(-1))
            report.cases.append(
                ParityCase(
                    input_index=idx,
                    batch=batch_size(x),
                    thresholds=None
                    if thr is None
                    else tuple(_as_thresholds(reference, thr).tolist()),
                    max_abs_diff=max_abs,
                    max_rel_diff=max_abs / scale if scale > 0 else max_abs,
                    exits_onnx=tuple(int(e) for e in np.asarray(got_exit).reshape(-1)),
                    exits_eager=eager_exits,
                    label=label,
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
        session = ort_session(path, optimize=False, profile_prefix=str(Path(tmp) / "profile"))
        session.run(None, _feed(x, thresholds, [i.name for i in session.get_inputs()]))
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
    """How many `op_type` nodes ONNX Runtime ran for one inference (see executed_op_counts)."""
    return executed_op_counts(path, x, thresholds)[op_type]
