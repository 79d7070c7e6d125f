"""The public verbs that add something over the library function they call.

`finetune` takes a typed `FinetuneConfig` and records a key of the data it trained on (tensors
included) so that `calibrate` can recognise that data later and use the part fine-tuning held
out, as the command line does. `bench` checks a given ONNX file before timing it. `strategies`
lists what `convert` can do, and `save_json` writes any result as JSON, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from dynify.errors import DataError, DynifyError, InputError
from dynify.export.bench import BenchResult, Runtime
from dynify.export.bench import bench as run_bench
from dynify.files import write_text_atomic
from dynify.heldout import Part, calibration_part, data_key
from dynify.passes import get_strategy, strategy_names
from dynify.runtime.model import DynamicModel
from dynify.train.batches import Batches, Preprocessing, resolve_preprocessing
from dynify.train.calibrate import calibrate as run_calibrate
from dynify.train.distill import FinetuneConfig, FinetuneResult
from dynify.train.distill import finetune as run_finetune
from dynify.train.exit_outputs import ExitOutputs
from dynify.train.targets import CalibrationResult, check_target

logger = logging.getLogger("dynify")


@runtime_checkable
class _ToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy: its name (for `convert`) and what it does."""

    name: str
    summary: str


def strategies() -> list[StrategyInfo]:
    """Every registered strategy with a one-line summary, sorted by name."""
    return [StrategyInfo(name, get_strategy(name).summary) for name in strategy_names()]


def preprocessing(
    dyn: DynamicModel,
    *,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocessing:
    """How raw images (folders, zips, uint8 tensors) become `dyn`'s inputs: resize, scale,
    normalise. Explicit values first, then what fine-tuning stored in the artifact, then the
    pretrained weights' own, then ImageNet's mean and std at the model's input size."""
    if input_size is not None and input_size < 1:
        raise InputError(f"The input size is a number of pixels, at least 1; got {input_size}.")
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and not all(math.isfinite(v) for v in values):
            raise DataError(f"The {name} values must be finite numbers, got {list(values)}.")
    return resolve_preprocessing(dyn, input_size=input_size, mean=mean, std=std)


def finetune(
    dyn: DynamicModel,
    data: Any,
    config: FinetuneConfig | None = None,
    *,
    mode: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    warmup: float | None = None,
    seed: int | None = None,
    augment: bool | None = None,
    kd_temperature: float | None = None,
    label_weight: float | None = None,
    budget: float | None = None,
    calibration_fraction: float | None = None,
    split: str | None = None,
    teacher: nn.Module | None = None,
    preprocessing: Preprocessing | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `dyn`'s new parts in place by self-distillation from its static network.

    The settings come from `config` (a `FinetuneConfig`, defaults without one); a setting given
    as a keyword overrides the config's. A deterministic `calibration_fraction` of `data` is
    held out and never trained on; `calibrate` on the same data uses that part by default.
    `data`: an ImageFolder directory, a zip of one, a torchvision data set name, tensors
    (`images` or `(images, labels)`) or a Dataset. See `FinetuneConfig` for each setting, and
    `dynify.train.distill.finetune` for checkpoints, resume and `callback`.
    """
    given = {
        "mode": mode,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "warmup": warmup,
        "seed": seed,
        "augment": augment,
        "kd_temperature": kd_temperature,
        "label_weight": label_weight,
        "budget": budget,
        "calibration_fraction": calibration_fraction,
    }
    settings = dataclasses.replace(
        config or FinetuneConfig(), **{k: v for k, v in given.items() if v is not None}
    )
    settings.validate()
    for name, value in dataclasses.asdict(settings).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DynifyError(
                f"The fine-tuning setting {name} must be a finite number, got {value}."
            )
    result = run_finetune(
        dyn,
        data,
        **dataclasses.asdict(settings),
        split=split,
        teacher=teacher,
        preprocessing=preprocessing,
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
        num_workers=num_workers,
        callback=callback,
    )
    record = dyn.spec.get("finetune")
    if isinstance(record, dict) and record.get("data") is None:
        record["data"] = data_key(data, split)
    return result


def calibrate(
    dyn: DynamicModel,
    data: Any,
    *,
    budget: float | None = None,
    max_drop: float | None = None,
    mac_cap: float | None = None,
    part: Part = "auto",
    calibration_fraction: float | None = None,
    seed: int | None = None,
    fit_temperature_scaling: bool = True,
    split: str | None = None,
    batch_size: int = 256,
    preprocessing: Preprocessing | None = None,
    ensemble: bool = False,
) -> CalibrationResult:
    """Set `dyn`'s thresholds (and temperatures) for a target; returns what they reach.

    Exactly one target: `budget` (mean MACs allowed, a fraction of the static model's),
    `max_drop` (accuracy the dynamic model may lose against its static network) or `mac_cap`
    alone (no sample may spend more than this fraction; it also combines with either).
    Which data: with `part="auto"` (default), if `data` is the data `dyn` was fine-tuned on, the
    part fine-tuning held out (its `calibration_fraction` and `seed`, unless given); otherwise
    all of `data`. `part="calibration"` always takes the held-out part, `part="all"` all of the
    data. The result's `data` (also in `dyn.spec["calibration"]`) says which part was used.
    """
    check_target(budget, max_drop, mac_cap)
    if isinstance(data, ExitOutputs | Batches):
        source, description = data, "the outputs given" if isinstance(data, ExitOutputs) else ""
        description = description or "the batches given"
    else:
        chosen = calibration_part(
            dyn, data, split=split, part=part, fraction=calibration_fraction, seed=seed
        )
        source, description = chosen.dataset, chosen.description
        split = None  # the part is already taken from the split
        if chosen.trained_on:
            logger.warning("dynify.calibrate: calibrating on %s.", description)
    logger.info("dynify.calibrate: calibrating on %s.", description)
    result = run_calibrate(
        dyn,
        source,
        budget=budget,
        max_drop=max_drop,
        mac_cap=mac_cap,
        fit_temperature_scaling=fit_temperature_scaling,
        split=split,
        batch_size=batch_size,
        preprocessing=preprocessing,
        ensemble=ensemble,
    )
    result.data = description
    if isinstance(dyn.spec.get("calibration"), dict):
        dyn.spec["calibration"]["data"] = description
    return result


def bench(
    dyn: DynamicModel,
    *,
    runtime: Runtime = "eager",
    batch: int = 1,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    cases: Sequence[tuple[str, list[float]]] | None = None,
    onnx_path: str | Path | None = None,
    seed: int = 0,
    channels_last: bool = False,
    prefixes: bool = False,
    consecutive: int = 1,
) -> BenchResult:
    """Median latency of `dyn` at thresholds that force each behaviour, and of its static
    network, with their MACs: how much of the saved compute is saved time.

    `runtime`: "eager" (PyTorch) or "onnx" (ONNX Runtime, on a graph exported for the timed
    batch, or on `onnx_path`, e.g. the file you deploy). `consecutive` calls in a row per
    configuration and round, as a server runs a model; `runs` rounds, median. `prefixes` also
    times the static network cut at each exit. See `dynify.export.bench.bench`.
    """
    if onnx_path is not None:
        check_onnx_file(onnx_path)
    return run_bench(
        dyn,
        runtime=runtime,
        batch=batch,
        runs=runs,
        warmup=warmup,
        threads=threads,
        cases=cases,
        onnx_path=onnx_path,
        seed=seed,
        channels_last=channels_last,
        prefixes=prefixes,
        consecutive=consecutive,
    )


def check_onnx_file(path: str | Path) -> Path:
    """Refuse a file that is not an ONNX model before anything is timed or exported."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"There is no ONNX file at {path}.")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InputError(
            f"{path} is not an ONNX model ({type(exc).__name__}: {str(exc)[:200]}). Give a file "
            "written by `dynify export --format onnx`."
        ) from None
    if not model.graph.input:
        raise InputError(f"{path} is an ONNX model without inputs; give one `dynify export` wrote.")
    return path


def save_json(result: Any, path: str | Path) -> Path:
    """Write a result (anything with `to_dict()`, a dataclass or a dict) as JSON, atomically."""
    if isinstance(result, _ToDict):
        data = result.to_dict()
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        data = dataclasses.asdict(result)
    else:
        data = result
    return write_text_atomic(path, json.dumps(data, indent=2))
