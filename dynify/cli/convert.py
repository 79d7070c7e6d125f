"""`dynify convert` and `dynify inspect`: read a model, show its graph, write an artifact."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from dynify.cli.app import InputSizeOption, LeafOption, command, console
from dynify.errors import DynifyError
from dynify.passes import get_strategy, strategy_names

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
    return options


def _trace_leaves(leaf: list[str] | None):
    from dynify.frontend.trace import leaf_options

    return leaf_options(leaf or []).leaf_modules


@command(help="Convert a static model into a dynamic one and write a .dyn artifact.")
def convert(
    model: Annotated[
        str, typer.Argument(help="torchvision/timm name, built-in, or pkg.mod:factory.")
    ],
    strategy: Annotated[
        str, typer.Option("--strategy", "-s", help=f"One of: {', '.join(strategy_names())}.")
    ] = "early-exit",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Artifact path.")] = None,
    weights: WeightsOption = "auto",
    input_size: InputSizeOption = None,
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", help="A fresh classifier for N labels.")
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
        int | None, typer.Option("--tile", help="spatial-masks, region: tile size in pixels.")
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
    dump_graphs: Annotated[
        Path | None,
        typer.Option("--dump-graphs", help="Write the traced and rewritten graphs to this folder."),
    ] = None,
) -> None:
    import dynify

    get_strategy(strategy)  # an unknown strategy fails before any model is built
    options = _parse_options(option or [])
    named = {"exits": _parse_exits(exits), "gate": gate, "granularity": granularity}
    named |= {"tile": tile, "budget": budget}
    options |= {key: value for key, value in named.items() if value is not None}
    start = time.perf_counter()
    with console.status(f"Converting {model} with {strategy}..."):
        dyn = dynify.convert(
            model,
            strategy,
            None if input_size is None else torch.randn(1, 3, input_size, input_size),
            options=options,
            weights=weights,
            num_classes=num_classes,
            leaf_modules=_trace_leaves(leaf),
            dump_graphs=dump_graphs,
        )
    seconds = time.perf_counter() - start
    for note in dyn.spec["model"]["notes"]:
        style = "bold yellow" if "RANDOM" in note or "unavailable" in note else "dim"
        console.print(f"[{style}]weights: {note}[/{style}]")
    console.print(summary_table(dyn))
    out = out or Path(f"{model.replace(':', '_').replace('/', '_')}-{strategy}.dyn")
    dynify.save(dyn, out)
    console.print(f"Converted in {seconds:.1f} s; wrote [bold]{out}[/bold]")


def summary_table(dyn) -> Table:
    """What the conversion made, for the user to check: exits and their MAC fractions."""
    table = Table(title=f"{dyn.spec['model']['name']} · {dyn.strategy}")
    describe = getattr(dyn, "describe", None)
    if describe is None:
        table.add_column("static MACs")
        table.add_row(f"{dyn.static_macs / 1e6:.1f} M")
        return table
    rows = describe()
    for i, column in enumerate(rows[0]):
        table.add_column(column, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


@command(help="Print a model's graph summary: cut points, residual blocks, MACs by stage.")
def inspect(
    model: Annotated[
        str, typer.Argument(help="torchvision/timm name, built-in, or pkg.mod:factory.")
    ],
    input_size: InputSizeOption = None,
    weights: WeightsOption = "random",
    leaf: LeafOption = None,
    all_cuts: Annotated[
        bool, typer.Option("--all-cuts", help="List every cut point, not one per MAC level.")
    ] = False,
) -> None:
    from dynify.convert import read_model
    from dynify.passes.early_exit import candidate_cuts
    from dynify.zoo import build_model

    net, ref = build_model(model, weights=weights)
    size = input_size or ref.input_size
    if size is None:
        raise DynifyError("Give --input-size: the model's input resolution is not known.")
    front = read_model(net, torch.randn(1, 3, size, size), _trace_leaves(leaf))
    analysis = front.context.analysis
    gm = front.context.gm
    console.print(
        f"[bold]{model}[/bold]: {len(gm.graph.nodes)} nodes, {analysis.total_macs / 1e6:.1f} M "
        f"MACs at {size}x{size}, {front.context.num_classes} classes, traced in "
        f"{front.seconds:.1f} s"
    )
    cuts = analysis.cuts if all_cuts else candidate_cuts(analysis.cuts)
    table = Table(title=f"Single-tensor cut points ({len(cuts)} of {len(analysis.cuts)})")
    for column in ("node", "shape", "MACs before", "fraction"):
        table.add_column(column)
    for cut in cuts:
        table.add_row(
            cut.node, str(list(cut.shape)), f"{cut.macs_before / 1e6:.1f} M", f"{cut.fraction:.3f}"
        )
    console.print(table)
    table = Table(
        title=f"Residual blocks ({len(analysis.blocks)}) in {len(analysis.stages)} stages"
    )
    for column in ("stage", "join", "entry", "shortcut", "branch MACs", "share"):
        table.add_column(column)
    for s, stage in enumerate(analysis.stages):
        for block in stage.blocks:
            shortcut = "identity" if block.identity else f"{len(block.shortcut)} ops"
            table.add_row(
                str(s),
                block.join,
                block.entry,
                shortcut,
                f"{block.branch_macs / 1e6:.1f} M",
                f"{block.branch_macs / analysis.total_macs:.1%}",
            )
    console.print(table)
    table = Table(title="MACs by stage")
    table.add_column("stage")
    table.add_column("shape")
    table.add_column("MACs")
    table.add_column("share")
    for s, stage in enumerate(analysis.stages):
        macs = sum(b.branch_macs + b.shortcut_macs for b in stage.blocks)
        table.add_row(
            str(s),
            str(list(stage.shape)),
            f"{macs / 1e6:.1f} M",
            f"{macs / analysis.total_macs:.1%}",
        )
    console.print(table)


@command(help="List the registered conversion strategies.")
def strategies() -> None:
    table = Table(title="Strategies")
    table.add_column("name")
    table.add_column("what it does")
    for name in strategy_names():
        table.add_row(name, get_strategy(name).summary)
    console.print(table)
