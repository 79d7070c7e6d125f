"""`dynify export` and `dynify bench`: deployable files, verified; latency next to MACs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

import dynify
from dynify.cli.app import (
    ArtifactArg,
    TrustImportOption,
    check_output,
    command,
    console,
    load_artifact,
    wrote,
)
from dynify.errors import DynifyError


class ExportFormat(str, Enum):
    onnx = "onnx"
    pt2 = "pt2"


class BenchRuntime(str, Enum):
    eager = "eager"
    onnx = "onnx"


def parity_table(report: dynify.ParityReport) -> Table:
    """One row per thresholds setting: the worst logit difference over the inputs, the exits."""
    table = Table(title=f"Exported vs eager (max abs diff <= {report.atol:g}, same decisions)")
    for column in ("case", "thresholds", "N", "exits", "max |diff|", "ok"):
        table.add_column(column, justify="left" if column in ("case", "thresholds") else "right")
    groups: dict[str, list] = {}
    for case in report.cases:
        groups.setdefault(case.label or str(case.thresholds), []).append(case)
    for label, cases in groups.items():
        first = cases[0]
        values = "calibrated" if first.thresholds is None else _short(first.thresholds)
        worst = max(c.max_abs_diff for c in cases)
        ok = all(c.max_abs_diff <= report.atol and c.exits_match for c in cases)
        exits = sorted({e for c in cases for e in c.exits_onnx})
        table.add_row(
            label,
            escape(values),
            ",".join(str(c.batch) for c in cases),
            ",".join(map(str, exits)),
            f"{worst:.2e}",
            "[green]yes[/green]" if ok else "[red]NO[/red]",
        )
    return table


def _short(values: tuple[float, ...] | list[float]) -> str:
    return "[" + ",".join(f"{v:g}" for v in values) + "]"


@command(help="Export an artifact to ONNX (exits as If nodes, thresholds as an input) or .pt2.")
def export(
    artifact: ArtifactArg,
    format: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="onnx (ONNX Runtime) or pt2.")
    ] = ExportFormat.onnx,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output file (default: ARTIFACT.onnx/.pt2); an existing file is replaced only "
            "once the new one passes the check.",
        ),
    ] = None,
    atol: Annotated[
        float, typer.Option("--atol", help="Largest logit difference accepted in the check.")
    ] = dynify.PARITY_ATOL,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            "-b",
            min=1,
            help="ONNX: fix the batch size (default: any). At 1 the exits skip their per-sample "
            "gather/scatter.",
        ),
    ] = None,
    trust_import: TrustImportOption = None,
) -> None:
    if batch is not None and format is not ExportFormat.onnx:
        raise typer.BadParameter("--batch applies to --format onnx only", param_hint="--batch")
    if not atol >= 0:
        raise DynifyError(
            f"--atol is the largest logit difference accepted, 0 or more; got {atol}."
        )
    path = out or artifact.with_suffix(f".{format.value}")
    if path.suffix.lower() == ".dyn":
        raise DynifyError(
            f"--out {path} names a .dyn artifact; an {format.value} export would replace it with "
            f"another format. Name the file .{format.value}."
        )
    replaced = check_output(path, f"{format.value} file", inputs=[artifact])
    dyn = load_artifact(artifact, trust_import)
    with console.status(f"Exporting {artifact} to {format.value} and checking it..."):
        if format is ExportFormat.onnx:
            result = dynify.export_onnx_report(dyn, path, atol=atol, batch=batch)
            report = result.report
        else:
            path, report = dynify.export_pt2_report(dyn, path)
    if report is None:  # both exports verify by default
        raise DynifyError("The export was not checked against the eager model; nothing to show.")
    console.print(parity_table(report))
    console.print(
        f"Parity [green]OK[/green]: max abs diff {report.max_abs_diff:.2e} <= {report.atol:g} "
        f"and the same decisions in {len(report.cases)} cases."
    )
    if format is ExportFormat.onnx:
        shape = ", ".join(map(str, dyn.input_shape))
        default = _short(dyn.thresholds.tolist())
        console.print(
            escape(
                f"If nodes: {result.if_nodes} (one per torch.cond: {result.conds}); inputs "
                f"x [{batch or 'batch'}, {shape}] and thresholds [{dyn.thresholds.numel()}] (default "
                f"{default}); outputs {', '.join(result.output_names)}."
            )
        )
    wrote(path, replaced, f" ({path.stat().st_size / 2**20:.1f} MiB)")


@command(help="Latency at thresholds that force each exit, next to the static model, with MACs.")
def bench(
    artifact: ArtifactArg,
    format: Annotated[
        BenchRuntime, typer.Option("--format", "-f", help="eager (PyTorch) or onnx (ONNX Runtime).")
    ] = BenchRuntime.eager,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1, help="Batch size.")] = 1,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed rounds (median).")] = 30,
    consecutive: Annotated[
        int,
        typer.Option(
            "--consecutive",
            min=1,
            help="Timed calls in a row per configuration and round, after an untimed one, as a "
            "server runs a model (1: one call each, the configurations interleaved call by call).",
        ),
    ] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed rounds first.")] = 5,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Intra-op threads (default: torch's).")
    ] = None,
    channels_last: Annotated[
        bool,
        typer.Option("--channels-last", help="eager: model and input in channels-last format."),
    ] = False,
    prefixes: Annotated[
        bool,
        typer.Option(
            "--prefixes",
            help="exit cascades: also time the static network cut at each exit, to split each "
            "exit's latency / MAC ratio into the network's own and the exit's overhead.",
        ),
    ] = False,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Also write the rows to this JSON file (an existing file is replaced)."
        ),
    ] = None,
    onnx_file: Annotated[
        Path | None,
        typer.Option(
            "--onnx",
            exists=True,
            dir_okay=False,
            help="onnx: time this exported file (e.g. the one you deploy) instead of a graph "
            "exported for the timed batch.",
        ),
    ] = None,
    trust_import: TrustImportOption = None,
) -> None:
    if onnx_file is not None and format is not BenchRuntime.onnx:
        raise typer.BadParameter("--onnx needs --format onnx", param_hint="--onnx")
    if onnx_file is not None:
        dynify.check_onnx_file(onnx_file)
    replaced = None
    if json_out is not None:
        replaced = check_output(json_out, "JSON file", inputs=[artifact, onnx_file])
    dyn = load_artifact(artifact, trust_import)
    with console.status(
        f"Timing {artifact} in {format.value} ({runs} rounds x {consecutive} calls)..."
    ):
        result = dynify.bench(
            dyn,
            runtime=format.value,
            batch=batch,
            runs=runs,
            warmup=warmup,
            threads=threads,
            channels_last=channels_last,
            prefixes=prefixes,
            consecutive=consecutive,
            onnx_path=onnx_file,
        )
    layout = ", channels-last" if result.channels_last else ""
    table = Table(
        title=f"{artifact.name}: {format.value}{layout}, batch {batch}, {result.threads} "
        f"thread(s), median of {runs} interleaved rounds x {consecutive} call(s) in a row"
    )
    for column in ("config", "thresholds", "exits", "MACs", "MAC ratio", "latency ms"):
        table.add_column(column, justify="left" if column in ("config", "thresholds") else "right")
    table.add_column("latency ratio", justify="right")
    table.add_column("latency / MAC ratio", justify="right")
    split = any(row.prefix_ms is not None for row in result.rows)
    if split:
        table.add_column("network lat./MAC", justify="right")
        table.add_column("exit overhead", justify="right")
    for row in result.rows:
        extra = []
        if split:
            extra = ["", ""]
            if row.prefix_ms is not None:
                extra = [f"{row.prefix_ratio_to_macs:.2f}", f"{row.exit_overhead:.2f}"]
        table.add_row(
            row.label,
            "" if row.thresholds is None else escape(_short(row.thresholds)),
            ",".join(map(str, row.exits)),
            f"{row.macs_fraction * result.static_macs / 1e6:.1f} M",
            f"{row.macs_fraction:.3f}",
            f"{row.latency_ms:.2f}",
            f"{row.latency_ratio:.3f}",
            f"{row.ratio_to_macs:.2f}",
            *extra,
        )
    console.print(table)
    if split:
        console.print(
            "network lat./MAC: the static network cut where the exit sits (no head, no "
            "decision), its latency ratio over its MAC ratio: what the network itself allows. "
            "exit overhead: the exit's latency over that cut network's."
        )
    console.print(
        f"Worst latency / MAC ratio: {result.worst_ratio_to_macs:.2f} (1.00 = every saved MAC is "
        "saved time; above 1 the dynamic model saves less time than MACs)."
    )
    if json_out is not None:
        wrote(dynify.save_json(result, json_out), replaced)
