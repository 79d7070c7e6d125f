"""`dynify finetune`, `dynify calibrate`, `dynify evaluate`: teach, tune and measure an artifact.

Each command checks its options before loading anything, and writes the artifact only at the
end, atomically: a bad option or an interrupted run never leaves a damaged file behind.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import dynify
from dynify.cli.app import (
    ArtifactArg,
    DataOption,
    InputSizeOption,
    TrustImportOption,
    check_output,
    command,
    console,
    load_artifact,
    wrote,
)
from dynify.errors import DataError, DynifyError

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
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Write here instead of updating ARTIFACT (an existing file is replaced).",
    ),
]
BatchOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
FractionOption = Annotated[
    float,
    typer.Option(
        "--calibration-fraction",
        help="Share of --data held out for calibration (never trained on).",
    ),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the split and the run.")]
VocabOption = Annotated[
    Path | None,
    typer.Option(
        "--vocab",
        help="Text: the model's vocabulary (JSON, dynify.Vocabulary.save); --data is then a "
        "text<TAB>label file, or a folder of them (--split train picks train.tsv).",
    ),
]


def _floats(value: str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise DynifyError(f"{name} takes comma-separated numbers, got '{value}'.") from None


def _preprocessing(
    dyn: dynify.DynamicModel, input_size: int | None, mean: str | None, std: str | None
) -> dynify.Preprocessing:
    return dynify.preprocessing(
        dyn, input_size=input_size, mean=_floats(mean, "--mean"), std=_floats(std, "--std")
    )


def _text_file(data: str, split: str | None) -> Path | None:
    """The `text<TAB>label` file --data (and --split) name, or None when it names none."""
    path = Path(data).expanduser()
    if path.is_file() and path.suffix.lower() in dynify.TEXT_SUFFIXES:
        if split is not None:
            raise DataError(f"--split picks a file in a folder; {path} is a file already.")
        return path
    if not path.is_dir():
        return None
    texts = sorted(p for p in path.iterdir() if p.suffix.lower() in dynify.TEXT_SUFFIXES)
    named = [p for p in texts if p.stem == split] if split is not None else texts
    if len(named) == 1:
        return named[0]
    if texts and not named:
        raise DataError(
            f"{path} holds no text file for --split {split}; it holds "
            f"{', '.join(p.name for p in texts)}."
        )
    if texts:
        raise DataError(
            f"{path} holds several text files ({', '.join(p.name for p in texts)}); pick one "
            "with --split (e.g. --split train for train.tsv)."
        )
    return None


def _model_data(
    dyn: dynify.DynamicModel, data: str, split: str | None, vocab: Path | None
) -> tuple[Any, str | None]:
    """What the API reads for --data (and --split): the path itself for images, or for text
    with --vocab a `TextDataset` of the model's token ids (cut and padded to its length;
    whole-number labels are the class indices)."""
    if vocab is None:
        text = Path(data).expanduser()  # a folder is images unless --vocab says it is text
        if text.is_file() and text.suffix.lower() in dynify.TEXT_SUFFIXES:
            raise DataError(
                f"{text} is text: give the model's vocabulary with --vocab (the JSON "
                "dynify.Vocabulary.save wrote when the model was trained) to turn it into token "
                "ids."
            )
        return data, split
    text = _text_file(data, split)
    if text is None:
        raise DataError(
            f"--vocab reads text, but --data {data} is not a text<TAB>label file "
            f"({', '.join(dynify.TEXT_SUFFIXES)}) or a folder of them."
        )
    if dyn.input_dtype is None or len(dyn.input_shape) != 1:
        raise DataError(
            f"--vocab makes token ids [T], but this model takes {dyn.input_shape} "
            "float inputs; drop --vocab."
        )
    classes = None
    if all(re.fullmatch(r"\d+", label) for label in dynify.read_labels(text)):
        classes = [str(i) for i in range(dyn.num_classes)]
    dataset = dynify.load_text_dataset(
        text, dynify.Vocabulary.load(vocab), dyn.input_shape[0], classes=classes
    )
    return dataset, None


def _data_path(data: str) -> Path | None:
    """--data as a file or folder, when it is one (it must never be written over)."""
    path = Path(data).expanduser()
    return path if path.exists() else None


def _artifact_output(artifact: Path, out: Path | None, data: str) -> tuple[Path, str | None]:
    """Where a command that updates an artifact writes it, checked before any work, and a note
    of what it replaces (ARTIFACT itself when updated in place)."""
    target = out or artifact
    inputs = [_data_path(data)]
    if target.exists() and artifact.exists() and target.samefile(artifact):
        check_output(target, "artifact", inputs=inputs)
        return target, f"the previous {artifact} (updated in place)"
    return target, check_output(target, "artifact", inputs=[artifact, *inputs])


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
    vocab: VocabOption = None,
    trust_import: TrustImportOption = None,
    warmup: Annotated[
        float, typer.Option("--warmup", help="The fraction of the steps the rate warms up over.")
    ] = dynify.FinetuneConfig.warmup,
    warmup_min_steps: Annotated[
        int | None,
        typer.Option(
            "--warmup-min-steps",
            min=0,
            help="The warm-up lasts at least this many steps, at most half the run "
            "(default: 100 in joint mode, none in heads mode; 0: no floor).",
        ),
    ] = None,
    clip_grad_norm: Annotated[
        float,
        typer.Option(
            "--clip-grad-norm",
            help="Clip each parameter group's gradient norm to this (0: no clipping).",
        ),
    ] = dynify.FinetuneConfig.clip_grad_norm,
) -> None:
    config = dynify.FinetuneConfig(
        mode=mode,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule=schedule,
        seed=seed,
        augment=augment,
        calibration_fraction=calibration_fraction,
        warmup=warmup,
        warmup_min_steps=warmup_min_steps,
        clip_grad_norm=clip_grad_norm or None,
    )
    if lr is not None and not lr < float("inf"):
        raise DynifyError(f"--lr: the learning rate must be a finite number, got {lr}.")
    config.validate()
    target, replaced = _artifact_output(artifact, out, data)
    ckpt = checkpoint or artifact.with_suffix(".ckpt")
    if resume and not ckpt.is_file():
        raise DynifyError(f"--resume: there is no checkpoint at {ckpt} to continue from.")
    check_output(ckpt, "checkpoint", inputs=[artifact, target, _data_path(data)])
    dyn = load_artifact(artifact, trust_import)
    pre = _preprocessing(dyn, input_size, mean, std)
    source, source_split = _model_data(dyn, data, split, vocab)
    # torchrun's variables: only the first process prints and writes
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank == 0:
        console.print(
            f"Fine-tuning [bold]{artifact}[/bold] ({mode}, {epochs} epochs"
            f"{f', {world} processes' if world > 1 else ''}); checkpoint {ckpt}"
        )
    try:
        result = dynify.finetune(
            dyn,
            source,
            config,
            split=source_split,
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
    dynify.save(dyn, target)
    ckpt.unlink(missing_ok=True)
    held = len(result.calibration_data) if result.calibration_data is not None else 0
    console.print(
        f"Trained in {result.seconds:.0f} s. {held} samples held out for `dynify calibrate "
        f"{target} --data {data}{f' --split {split}' if split else ''}`."
    )
    wrote(target, replaced)


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
    vocab: VocabOption = None,
    trust_import: TrustImportOption = None,
) -> None:
    if part not in ("auto", "calibration", "all"):
        raise DynifyError(f"--part is auto, calibration or all; got '{part}'.")
    target, replaced = _artifact_output(artifact, out, data)
    dyn = load_artifact(artifact, trust_import)
    pre = _preprocessing(dyn, input_size, mean, std)
    source, source_split = _model_data(dyn, data, split, vocab)
    with console.status("Running the calibration data through every exit..."):
        result = dynify.calibrate(
            dyn,
            source,
            budget=budget,
            max_drop=max_drop,
            mac_cap=mac_cap,
            part=part,  # type: ignore[arg-type]
            calibration_fraction=calibration_fraction,
            seed=seed,
            split=source_split,
            fit_temperature_scaling=temperature,
            batch_size=batch_size,
            preprocessing=pre,
            ensemble=ensemble,
        )
    style = "yellow" if "optimistic" in result.data else "default"
    console.print(f"[{style}]Calibrated on {result.samples} samples ({result.data}).[/{style}]")
    table = Table(title=f"Calibration ({result.method}, {result.samples} samples)")
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
    for name, value in result.scalars.items():  # decision scalars chosen with the thresholds
        tried = len(result.scalar_grid)
        how = f"chosen from {tried} values" if tried else "kept as held"
        console.print(f"{name.replace('_', ' ').capitalize()}: {value:.3f} ({how}).")
    bound = dynify.cost_bound(dyn)
    if bound.cap is not None:
        console.print(
            f"{bound.label}: no sample spends more than "
            f"{bound.cap / dyn.static_macs:.4f} of the static MACs, whatever its input (worst "
            f"case without it: {bound.worst / dyn.static_macs:.3f})."
        )
    dynify.save(dyn, target)
    wrote(target, replaced)


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
    vocab: VocabOption = None,
    trust_import: TrustImportOption = None,
) -> None:
    inputs = [artifact, _data_path(data)]
    replaced_plot = replaced_json = None
    if plot is not None:
        dynify.check_plot_path(plot)
        replaced_plot = check_output(plot, "plot", inputs=inputs)
    if json_out is not None:
        replaced_json = check_output(json_out, "JSON report", inputs=[*inputs, plot])
    dyn = load_artifact(artifact, trust_import)
    pre = _preprocessing(dyn, input_size, mean, std)
    source, source_split = _model_data(dyn, data, split, vocab)
    with console.status("Evaluating..."):
        report = dynify.evaluate(
            dyn, source, split=source_split, batch_size=batch_size, preprocessing=pre
        )
    if report.warning:
        console.print(f"[yellow]Warning: {report.warning}.[/yellow]")
    console.print(report.table())
    match = report.macs_to_match(report.static_accuracy)
    if match is not None:
        console.print(
            f"Within 0.5 points of static at {match:.3f} of its MACs (shared-threshold curve)."
        )
    if plot is not None:
        wrote(report.plot(plot), replaced_plot)
    if json_out is not None:
        wrote(report.save_json(json_out), replaced_json)
