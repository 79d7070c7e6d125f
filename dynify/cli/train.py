"""`dynify finetune`, `dynify calibrate`, `dynify evaluate`: teach, tune and measure an artifact.

Each command checks its options before loading anything, and writes the artifact only at the
end, atomically: a bad option or an interrupted run never leaves a damaged file behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dynify.cli.app import ArtifactArg, DataOption, InputSizeOption, command, console
from dynify.errors import DynifyError

SplitOption = Annotated[
    str | None,
    typer.Option(
        "--split", help="Subfolder of a folder/zip (e.g. cifar10/train), or train/test for names."
    ),
]
MeanOption = Annotated[
    str | None,
    typer.Option("--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406 (default: the model's)."),
]
StdOption = Annotated[
    str | None,
    typer.Option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225 (default: the model's)."),
]
OutOption = Annotated[
    Path | None, typer.Option("--out", "-o", help="Write here instead of updating ARTIFACT.")
]
BatchOption = Annotated[int, typer.Option("--batch-size", help="Images per batch.")]
FractionOption = Annotated[
    float,
    typer.Option(
        "--calibration-fraction",
        help="Share of --data held out for calibration (never trained on).",
    ),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the split and the run.")]


def _floats(value: str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise DynifyError(f"{name} takes comma-separated numbers, got '{value}'.") from None


def _load(artifact: Path):
    import dynify

    return dynify.load(artifact)


def _preprocessing(dyn, input_size, mean, std):
    from dynify.train.batches import resolve_preprocessing

    return resolve_preprocessing(
        dyn, input_size=input_size, mean=_floats(mean, "--mean"), std=_floats(std, "--std")
    )


@command(help="Fine-tune an artifact's new parts by self-distillation from its static network.")
def finetune(
    artifact: ArtifactArg,
    data: DataOption,
    split: SplitOption = None,
    mode: Annotated[
        str, typer.Option("--mode", help="heads (backbone frozen) or joint (all parameters).")
    ] = "heads",
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = 5,
    batch_size: BatchOption = 128,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate (heads: 3e-3 AdamW; joint: 0.01 SGD)."),
    ] = None,
    schedule: Annotated[
        str, typer.Option("--schedule", help="cosine, onecycle or constant.")
    ] = "cosine",
    seed: SeedOption = 0,
    calibration_fraction: FractionOption = 0.1,
    augment: Annotated[
        bool, typer.Option("--augment/--no-augment", help="Random crop and flip.")
    ] = True,
    input_size: InputSizeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Checkpoint file (default: ARTIFACT with .ckpt)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint.")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")] = 0,
    out: OutOption = None,
) -> None:
    import dynify
    from dynify.train.distill import FinetuneConfig
    from dynify.train.distill import finetune as run_finetune
    from dynify.train.run_env import init_distributed

    FinetuneConfig(
        mode=mode,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule=schedule,
        seed=seed,
        calibration_fraction=calibration_fraction,
    ).validate()
    dyn = _load(artifact)
    pre = _preprocessing(dyn, input_size, mean, std)
    ckpt = checkpoint or artifact.with_suffix(".ckpt")
    if resume and not ckpt.is_file():
        raise DynifyError(f"--resume: there is no checkpoint at {ckpt} to continue from.")
    rank, world = init_distributed()
    if rank == 0:
        console.print(
            f"Fine-tuning [bold]{artifact}[/bold] ({mode}, {epochs} epochs"
            f"{f', {world} processes' if world > 1 else ''}); checkpoint {ckpt}"
        )
    try:
        result = run_finetune(
            dyn,
            data,
            mode=mode,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            schedule=schedule,
            seed=seed,
            augment=augment,
            split=split,
            calibration_fraction=calibration_fraction,
            preprocessing=pre,
            checkpoint=ckpt,
            resume=resume,
            progress=True,
            num_workers=workers,
        )
    except KeyboardInterrupt:
        if rank == 0:
            console.print(
                f"[yellow]Stopped; checkpoint written to {ckpt}. Continue with the same command "
                "and --resume.[/yellow]"
            )
        raise
    if rank != 0:
        return
    table = Table(title="Fine-tuning")
    for column in ("epoch", "loss", "exit accuracy (mean)", "per exit", "final"):
        table.add_column(column, justify="right")
    for row in result.history:
        exits = [v for k, v in row.items() if k.startswith("acc_exit")]
        table.add_row(
            str(row["epoch"]),
            f"{row.get('loss', float('nan')):.4f}",
            f"{row.get('acc', float('nan')):.1%}",
            " ".join(f"{v:.2f}" for v in exits),
            f"{row['acc_final']:.1%}" if "acc_final" in row else "",
        )
    console.print(table)
    target = out or artifact
    dynify.save(dyn, target)
    ckpt.unlink(missing_ok=True)
    held = len(result.calibration_data) if result.calibration_data is not None else 0
    console.print(
        f"Trained in {result.seconds:.0f} s; wrote [bold]{target}[/bold]. {held} images held "
        f"out for `dynify calibrate {target} --data {data}"
        f"{f' --split {split}' if split else ''}`."
    )


@command(help="Choose exit thresholds for a MAC budget or an accuracy target.")
def calibrate(
    artifact: ArtifactArg,
    data: DataOption,
    budget: Annotated[
        float | None,
        typer.Option("--budget", help="Mean MACs allowed, as a fraction of the static model's."),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option("--max-drop", help="Accuracy drop allowed vs static (0.005 = 0.5 points)."),
    ] = None,
    mac_cap: Annotated[
        float | None,
        typer.Option("--mac-cap", help="Anytime: no sample may spend more than this fraction."),
    ] = None,
    split: SplitOption = None,
    part: Annotated[
        str,
        typer.Option(
            "--part",
            help="auto (the held-out part if --data is the fine-tuning data, else all of it), "
            "calibration, or all.",
        ),
    ] = "auto",
    calibration_fraction: Annotated[
        float | None,
        typer.Option("--calibration-fraction", help="Held-out share (default: fine-tuning's)."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the split (default: fine-tuning's).")
    ] = None,
    temperature: Annotated[
        bool, typer.Option("--temperature/--no-temperature", help="Fit temperatures first.")
    ] = True,
    ensemble: Annotated[
        bool,
        typer.Option(
            "--ensemble",
            help="Early exits: each exit answers with a fitted ensemble of the heads so far "
            "(Zero Time Waste).",
        ),
    ] = False,
    batch_size: BatchOption = 256,
    input_size: InputSizeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
    out: OutOption = None,
) -> None:
    import dynify
    from dynify.train.calibrate import calibrate as run_calibrate
    from dynify.train.calibrate import check_target

    check_target(budget, max_drop, mac_cap)
    if part not in ("auto", "calibration", "all"):
        raise DynifyError(f"--part is auto, calibration or all; got '{part}'.")
    dyn = _load(artifact)
    pre = _preprocessing(dyn, input_size, mean, std)
    dataset, note = _calibration_part(dyn, data, split, part, calibration_fraction, seed)
    console.print(f"Calibrating on {len(dataset)} images ({note}).")
    with console.status("Running the calibration data through every exit..."):
        result = run_calibrate(
            dyn,
            dataset,
            budget=budget,
            max_drop=max_drop,
            mac_cap=mac_cap,
            fit_temperature_scaling=temperature,
            batch_size=batch_size,
            preprocessing=pre,
            ensemble=ensemble,
        )
    table = Table(title=f"Calibration ({result.method}, {result.samples} images)")
    for column in ("exit", "threshold", "temperature"):
        table.add_column(column, justify="right")
    for i, t in enumerate(result.thresholds):
        temp = f"{result.temperatures[i]:.3f}" if result.temperatures else ""
        forced = " (cap)" if result.forced_exit == i else ""
        table.add_row(str(i), f"{t:.4f}{forced}", temp)
    console.print(table)
    what = "accuracy" if result.labels_used else "agreement with static"
    console.print(
        f"On the calibration data: {what} {result.accuracy:.2%} at {result.macs_fraction:.3f} "
        f"of the static MACs (static: {result.static_accuracy:.2%})."
    )
    target = out or artifact
    dynify.save(dyn, target)
    console.print(f"Wrote [bold]{target}[/bold].")


def _calibration_part(dyn, data, split, part, fraction, seed):
    from dynify.train.batches import open_data, source_key
    from dynify.train.data import split_dataset

    dataset = open_data(data, dyn, split=split, decode=False)
    tuned = dyn.spec.get("finetune") or {}
    same = tuned.get("data") is not None and tuned.get("data") == source_key(data, split)
    if part == "all" or (part == "auto" and not same):
        if same:
            console.print(
                "[yellow]Warning: these are the images the heads were trained on; thresholds "
                "chosen on them will be optimistic.[/yellow]"
            )
        return dataset, "all of --data"
    fraction = fraction if fraction is not None else tuned.get("calibration_fraction") or 0.1
    seed = seed if seed is not None else tuned.get("seed", 0)
    if not fraction:
        raise DynifyError(
            "Fine-tuning used all of this data (--calibration-fraction 0); calibrate on other "
            "data, or pass --part all knowing the thresholds will be optimistic."
        )
    _, calibration = split_dataset(dataset, fraction, seed)
    return calibration, f"the {fraction:.0%} held out from fine-tuning, seed {seed}"


@command(help="Measure an artifact: static vs dynamic accuracy and MACs, curve, exits, oracle.")
def evaluate(
    artifact: ArtifactArg,
    data: DataOption,
    split: SplitOption = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write the accuracy-vs-MACs plot (PNG).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full report as JSON.")
    ] = None,
    batch_size: BatchOption = 256,
    input_size: InputSizeOption = None,
    mean: MeanOption = None,
    std: StdOption = None,
) -> None:
    from dynify.report import evaluate as run_evaluate
    from dynify.train.batches import source_key

    dyn = _load(artifact)
    pre = _preprocessing(dyn, input_size, mean, std)
    tuned = (dyn.spec.get("finetune") or {}).get("data")
    if tuned is not None and tuned == source_key(data, split):
        console.print(
            "[yellow]Warning: this is the fine-tuning data; evaluate on held-out data (e.g. "
            "--split test) for figures that mean something.[/yellow]"
        )
    with console.status("Evaluating..."):
        report = run_evaluate(dyn, data, split=split, batch_size=batch_size, preprocessing=pre)
    console.print(report.table())
    match = report.macs_to_match(report.static_accuracy)
    if match is not None:
        console.print(
            f"Within 0.5 points of static at {match:.3f} of its MACs (shared-threshold curve)."
        )
    if plot is not None:
        console.print(f"Wrote {report.plot(plot)}")
    if json_out is not None:
        console.print(f"Wrote {report.save_json(json_out)}")
