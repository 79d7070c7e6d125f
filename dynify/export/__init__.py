"""Export dynamic networks to deployable formats, verified against the eager model.

`export_onnx(dyn, path)` writes one ONNX graph whose skippable work sits under `If` nodes (so
ONNX Runtime skips it), with the thresholds as a graph input defaulting to the calibrated ones;
`export_pt2(dyn, path)` writes a `torch.export` program with the same `torch.cond` control flow.
Both work for any DynamicModel (through its `export_face()`) and refuse to finish unless the export
matches the eager model (max abs diff <= 1e-4, same decisions) on random inputs at thresholds
that force every behaviour (every exit, all-exit-early, all-run-to-the-end, the default).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dynify.errors import ExportError
from dynify.export.bench import threshold_cases
from dynify.export.onnx import OnnxExport, write_onnx, write_pt2
from dynify.export.verify import PARITY_ATOL, ParityReport, verify_pt2
from dynify.files import atomic_output
from dynify.frontend.inputs import Inputs, cat_inputs
from dynify.runtime.cascade import BatchPolicy, CondCascade
from dynify.runtime.model import DynamicModel

__all__ = ["export_onnx", "export_onnx_report", "export_pt2", "export_pt2_report"]

MID_THRESHOLD = 0.5


def export_face(dyn: DynamicModel) -> nn.Module:
    """The model's export face (`forward(x, thresholds) -> (logits, decisions)`), in eval mode."""
    if not isinstance(dyn, DynamicModel):
        raise ExportError(
            f"expected a DynamicModel (from dynify.convert), got {type(dyn).__name__}"
        )
    dyn.eval()
    return dyn.export_face().eval()


def verification_cases(dyn: DynamicModel) -> tuple[list[str], list[list[float] | None]]:
    """Labels and thresholds the export is checked at: every forced behaviour, mid, default."""
    cases = threshold_cases(dyn)
    k = int(dyn.thresholds.numel())
    labels = [label for label, _ in cases] + [f"all {MID_THRESHOLD:g}", "default"]
    thresholds: list[list[float] | None] = [thr for _, thr in cases]
    thresholds += [[MID_THRESHOLD] * k, None]
    return labels, thresholds


def verification_inputs(dyn: DynamicModel, seed: int = 0, batch: int | None = None) -> list[Inputs]:
    """Random (seeded) inputs of the model's shape: two single samples and a batch of 4, or
    two batches of `batch` samples for a graph fixed to that size."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (1, 1, 4) if batch is None else (batch, batch)
    return [dyn.random_input(n, gen) for n in sizes]


def _default_path(dyn: DynamicModel, suffix: str) -> Path:
    name = str(dyn.spec.get("model", {}).get("name", "model")).replace("/", "_")
    return Path(f"{name}-{dyn.strategy or 'dynamic'}{suffix}")


def _output_path(dyn: DynamicModel, path: str | Path | None, suffix: str) -> Path:
    """Where to write an export: never over the artifact the model was loaded from, nor under a
    .dyn name, which would make an ONNX or .pt2 file pass for an artifact."""
    target = _default_path(dyn, suffix) if path is None else Path(path)
    source = dyn.artifact_path
    if source is not None and target.resolve() == source.resolve():
        raise ExportError(
            f"'{target}' is the artifact this model was loaded from; exporting there would "
            f"replace it with a {suffix} file. Choose another output path, e.g. "
            f"'{target.with_suffix(suffix)}'."
        )
    if target.suffix.lower() == ".dyn":
        raise ExportError(
            f"'{target}' has the .dyn suffix of dynify artifacts, but an export writes a "
            f"{suffix} file. Choose an output path ending in {suffix}."
        )
    return target


def export_onnx_report(
    dyn: DynamicModel,
    path: str | Path | None = None,
    *,
    verify: bool = True,
    opset: int = 20,
    atol: float = PARITY_ATOL,
    batch: int | None = None,
    translations: dict | None = None,
    batch_policy: BatchPolicy = "per_sample",
) -> OnnxExport:
    """`export_onnx`, returning the file with its If-node count and the parity report."""
    if batch is not None and batch < 1:
        raise ExportError(f"batch must be >= 1 (or None for any batch size), got {batch}")
    module = export_face(dyn)
    reference: nn.Module = dyn
    if batch_policy != "per_sample":
        if not isinstance(module, CondCascade):
            raise ExportError(
                f"batch_policy={batch_policy!r} is for exit cascades (early-exit, resolution); "
                f"{dyn.strategy} decides per sample only"
            )
        # Exits taken for the batch as a whole: the eager model, which decides per sample,
        # is no reference; ONNX Runtime is checked against the face itself.
        module = reference = module.with_batch_policy(batch_policy).eval()
    inputs = verification_inputs(dyn, batch=batch)
    labels, thresholds = verification_cases(dyn)
    target = _output_path(dyn, path, ".onnx")
    return write_onnx(
        module,
        cat_inputs(inputs[:2]) if batch is None else inputs[0],
        target,
        opset=opset,
        dynamic_batch=batch is None,
        verify=verify,
        atol=atol,
        translations=translations,
        reference=reference,
        inputs=inputs,
        thresholds_list=thresholds,
        labels=labels,
    )


def export_onnx(
    dyn: DynamicModel,
    path: str | Path | None = None,
    *,
    verify: bool = True,
    opset: int = 20,
    batch: int | None = None,
    batch_policy: BatchPolicy = "per_sample",
) -> Path:
    """Export a DynamicModel to ONNX with its skipping as `If` nodes; return the file.

    Graph inputs: `x` [N, ...] and `thresholds` float32 [K], which defaults to the
    model's calibrated thresholds (omit it from the feed to use them). Outputs: `logits` [N, C]
    and `decisions` int64: for exit cascades the exit index [N] (K = the final classifier),
    for block gates the executed blocks [N, K], for spatial masks the active units [N, K]. With `verify`
    (default) ONNX Runtime must match the eager model within 1e-4 with the same decisions at
    every forced behaviour, else ExportError is raised and nothing is written: the file is
    verified under a temporary name, so a refused export leaves an existing file untouched.
    An output path equal to the artifact the model was loaded from, or ending in .dyn, is
    refused. An op without an
    ONNX translation raises ExportError naming the op, the graph node and the submodule.
    N is dynamic unless `batch` fixes it: a graph for one batch size, which at batch 1 leaves
    out the per-sample gather/scatter of every exit (one sample either leaves or goes on).
    `batch_policy` "batch_all" (exit cascades) decides once per batch instead: the batch leaves
    at an exit when every sample is sure there, which saves the gather/scatter at the price of
    running the unsure samples' companions further.
    """
    return export_onnx_report(
        dyn, path, verify=verify, opset=opset, batch=batch, batch_policy=batch_policy
    ).path


def export_pt2_report(
    dyn: DynamicModel, path: str | Path | None = None, *, verify: bool = True
) -> tuple[Path, ParityReport | None]:
    """`export_pt2`, returning the parity report too."""
    target = _output_path(dyn, path, ".pt2")
    module = export_face(dyn)
    inputs = verification_inputs(dyn)
    labels, thresholds = verification_cases(dyn)
    report = None
    # Verified under a temporary name: a refused export leaves an existing file untouched.
    with atomic_output(target) as tmp:
        write_pt2(module, cat_inputs(inputs[:2]), tmp)
        if verify:
            report = verify_pt2(dyn, tmp, inputs, thresholds, labels=labels, module=module)
            if not report.ok:
                raise ExportError(
                    f"the .pt2 program does not match eager, export refused:\n{report}"
                )
    return target, report


def export_pt2(dyn: DynamicModel, path: str | Path | None = None, *, verify: bool = True) -> Path:
    """Save a `torch.export` program (`torch.export.save`) with the skipping as `torch.cond`.

    Load it without dynify: `prog = torch.export.load(path).module()`, then under
    `torch.no_grad()`: `logits, decisions = prog(x, thresholds)` (thresholds is required
    there: float32 [K]). With autograd on, torch re-traces the conditionals for a backward and
    fails on their data-dependent batch sizes.
    """
    return export_pt2_report(dyn, path, verify=verify)[0]
