"""`dynify convert` and `dynify inspect`: read a model, show its graph, write an artifact."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import dynify
from dynify.cli.app import (
    InputDtypeOption,
    InputShapeOption,
    InputSizeOption,
    LeafOption,
    LengthsOption,
    MaskDtypeOption,
    MaskOption,
    check_output,
    check_output_folder,
    command,
    console,
    extra_input_of,
    parse_shape,
    wrote,
)
from dynify.errors import DynifyError

WeightsOption = Annotated[
    str,
    typer.Option(
        "--weights",
        help="'auto' (library weights if cached or downloadable, else random with a warning), "
        "'pretrained' (fail if unavailable), 'random', or a state-dict file.",
    ),
]


def _parse_exits(value: str | None) -> int | list[float] | list[str] | None:
    """'4' -> 4 exits; '0.25,0.5' -> MAC fractions; 'layer1,layer2' -> cut-point names."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise DynifyError(
            f"--exits '{value}' names no exit: give a count (--exits 3), MAC fractions "
            "(--exits 0.25,0.5) or cut-point names (`dynify inspect` lists them)."
        )
    if len(parts) == 1 and parts[0].isdigit():
        return int(parts[0])
    try:
        return [float(p) for p in parts]
    except ValueError:
        return parts


def _parse_options(pairs: list[str]) -> dict:
    """'--option epsilon=0.05' -> {'epsilon': 0.05}; values are JSON when they parse."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DynifyError(f"--option takes KEY=VALUE, got '{pair}'.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
        number = options[key]
        if isinstance(number, float) and not math.isfinite(number):
            raise DynifyError(f"--option {key}={value}: the value must be a finite number.")
    return options


@command(help="Convert a static model into a dynamic one and write a .dyn artifact.")
def convert(
    model: Annotated[
        str, typer.Argument(help="torchvision/timm name, built-in, or pkg.mod:factory.")
    ],
    strategy: Annotated[
        str,
        typer.Option("--strategy", "-s", help=f"One of: {', '.join(dynify.strategy_names())}."),
    ] = "early-exit",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Artifact path (an existing file is replaced)."),
    ] = None,
    weights: WeightsOption = "auto",
    input_size: InputSizeOption = None,
    input_shape: InputShapeOption = None,
    input_dtype: InputDtypeOption = "float32",
    lengths: LengthsOption = False,
    mask: MaskOption = False,
    mask_dtype: MaskDtypeOption = "bool",
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", min=1, help="A fresh classifier for N labels.")
    ] = None,
    exits: Annotated[
        str | None,
        typer.Option("--exits", help="early-exit: N, MAC fractions '0.25,0.5', or node names."),
    ] = None,
    gate: Annotated[
        str | None,
        typer.Option("--gate", help="block-gates: function, halting or policy."),
    ] = None,
    granularity: Annotated[
        str | None,
        typer.Option("--granularity", help="spatial-masks: pixel or region."),
    ] = None,
    tile: Annotated[
        int | None,
        typer.Option("--tile", min=1, help="spatial-masks, region: tile size in pixels."),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option("--budget", help="block-gates, spatial-masks: target MAC fraction."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            help="Any strategy option as KEY=VALUE (VALUE read as JSON if it parses). Repeatable.",
        ),
    ] = None,
    leaf: LeafOption = None,
    pad_id: Annotated[
        int | None,
        typer.Option(
            "--pad-id",
            min=0,
            help="Token id texts are padded with (default: the embedding's padding_idx, else 0).",
        ),
    ] = None,
    dump_graphs: Annotated[
        Path | None,
        typer.Option("--dump-graphs", help="Write the traced and rewritten graphs to this folder."),
    ] = None,
) -> None:
    if strategy not in dynify.strategy_names():  # fail before any model is built
        names = ", ".join(dynify.strategy_names())
        raise DynifyError(f"Unknown strategy '{strategy}'. Registered strategies: {names}.")
    extra_input = extra_input_of(lengths, mask, mask_dtype)
    options = _parse_options(option or [])
    named = {"exits": _parse_exits(exits), "gate": gate, "granularity": granularity}
    named |= {"tile": tile, "budget": budget}
    options |= {key: value for key, value in named.items() if value is not None}
    out = out or Path(f"{model.replace(':', '_').replace('/', '_')}-{strategy}.dyn")
    weights_file = Path(weights) if weights not in ("auto", "pretrained", "random") else None
    replaced = check_output(out, "artifact", inputs=[weights_file])
    graphs_replaced = None
    if dump_graphs is not None:
        graphs_replaced = check_output_folder(dump_graphs, "graph folder")
    start = time.perf_counter()
    with console.status(f"Converting {model} with {strategy}..."):
        dyn = dynify.convert(
            model,
            strategy,
            options=options,
            weights=weights,
            num_classes=num_classes,
            input_size=input_size,
            input_shape=parse_shape(input_shape),
            input_dtype=input_dtype,
            leaf_modules=leaf or [],
            dump_graphs=dump_graphs,
            extra_input=extra_input,
            pad_id=pad_id,
        )
    seconds = time.perf_counter() - start
    for note in dyn.weight_notes:
        style = "bold yellow" if "RANDOM" in note or "unavailable" in note else "dim"
        console.print(f"[{style}]weights: {note}[/{style}]")
    console.print(summary_table(dyn))
    if dump_graphs is not None:
        wrote(dump_graphs, graphs_replaced, " (the traced and rewritten graphs)")
    dynify.save(dyn, out)
    console.print(f"Converted in {seconds:.1f} s.")
    wrote(out, replaced)


def summary_table(dyn: dynify.DynamicModel) -> Table:
    """What the conversion made, for the user to check: exits and their MAC fractions."""
    table = Table(title=f"{dyn.model_name} · {dyn.strategy}")
    rows = dyn.describe()
    if not rows:
        table.add_column("static MACs")
        table.add_row(f"{dyn.static_macs / 1e6:.1f} M")
        return table
    for i, column in enumerate(rows[0]):
        table.add_column(column, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    table.caption = cost_bound_text(dyn)
    return table


def cost_bound_text(dyn: dynify.DynamicModel) -> str:
    """The worst case per sample, and the cap the model holds (a MAC cap, a forced exit)."""
    bound = dynify.cost_bound(dyn)
    worst = bound.worst
    text = (
        f"worst case per sample: {worst / 1e6:.1f} M MACs ({worst / dyn.static_macs:.3f} of static)"
    )
    if bound.fixed:
        return text + ", every sample's cost: no decision changes it, so there is nothing to cap"
    if bound.cap is not None:
        text += (
            f"; {bound.label}: no sample spends more than {bound.cap / 1e6:.1f} M MACs "
            f"({bound.cap / dyn.static_macs:.3f} of static), whatever its input"
        )
    return text


@command(help="Print a model's graph summary: cut points, residual blocks, MACs by stage.")
def inspect(
    model: Annotated[
        str, typer.Argument(help="torchvision/timm name, built-in, or pkg.mod:factory.")
    ],
    input_size: InputSizeOption = None,
    input_shape: InputShapeOption = None,
    input_dtype: InputDtypeOption = "float32",
    lengths: LengthsOption = False,
    mask: MaskOption = False,
    mask_dtype: MaskDtypeOption = "bool",
    weights: WeightsOption = "random",
    leaf: LeafOption = None,
    all_cuts: Annotated[
        bool, typer.Option("--all-cuts", help="List every cut point, not one per MAC level.")
    ] = False,
) -> None:
    summary = dynify.inspect(
        model,
        input_size=input_size,
        input_shape=parse_shape(input_shape),
        input_dtype=input_dtype,
        weights=weights,
        leaf_modules=leaf or [],
        all_cuts=all_cuts,
        extra_input=extra_input_of(lengths, mask, mask_dtype),
    )
    size = summary.input_size
    where = (
        f"{size}x{size}"
        if size is not None
        else f"{summary.input_dtype} {list(summary.input_shape)}"
    )
    console.print(
        f"[bold]{model}[/bold]: {summary.nodes} nodes, {summary.total_macs / 1e6:.1f} M "
        f"MACs at {where}, {summary.num_classes} classes, traced in "
        f"{summary.seconds:.1f} s"
    )
    table = Table(title=f"Single-tensor cut points ({len(summary.cuts)} of {summary.total_cuts})")
    for column in ("node", "shape", "MACs before", "fraction"):
        table.add_column(column)
    for cut in summary.cuts:
        table.add_row(
            cut.node, str(list(cut.shape)), f"{cut.macs_before / 1e6:.1f} M", f"{cut.fraction:.3f}"
        )
    console.print(table)
    table = Table(title=f"Residual blocks ({len(summary.blocks)}) in {len(summary.stages)} stages")
    for column in ("stage", "join", "entry", "shortcut", "branch MACs", "share"):
        table.add_column(column)
    for block in summary.blocks:
        shortcut = "identity" if block.identity else f"{block.shortcut_ops} ops"
        table.add_row(
            str(block.stage),
            block.join,
            block.entry,
            shortcut,
            f"{block.branch_macs / 1e6:.1f} M",
            f"{block.share:.1%}",
        )
    console.print(table)
    if summary.recurrent:
        table = Table(title=f"Recurrent layers ({len(summary.recurrent)})")
        for column in ("module", "kind", "hidden x layers", "steps", "MACs per step", "share"):
            table.add_column(column)
        table.add_column("step by step")
        for layer in summary.recurrent:
            table.add_row(
                layer.module,
                layer.kind,
                f"{layer.hidden_size} x {layer.num_layers}",
                str(layer.steps),
                f"{layer.step_macs / 1e3:.1f} K",
                f"{layer.share:.1%}",
                "; ".join(layer.blockers) or "yes",
            )
        console.print(table)
    table = Table(title="MACs by stage")
    for column in ("stage", "shape", "MACs", "share"):
        table.add_column(column)
    for stage in summary.stages:
        table.add_row(
            str(stage.index),
            str(list(stage.shape)),
            f"{stage.macs / 1e6:.1f} M",
            f"{stage.share:.1%}",
        )
    console.print(table)


@command(help="List the registered conversion strategies.")
def strategies() -> None:
    table = Table(title="Strategies")
    table.add_column("name")
    table.add_column("what it does")
    for info in dynify.strategies():
        table.add_row(info.name, info.summary)
    console.print(table)
