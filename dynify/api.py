"""Small public helpers the command line needs besides the verbs: `strategies` lists what
`convert` can do, `preprocessing` says how raw images become a model's inputs and `save_json`
writes any result as JSON, atomically."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dynify.errors import DataError, InputError
from dynify.files import write_text_atomic
from dynify.passes import get_strategy, strategy_names
from dynify.runtime.decisions import exit_scores as _scores
from dynify.runtime.model import DynamicModel, ExitCascade
from dynify.train.batches import Preprocessing, resolve_preprocessing


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


def exit_scores(model: ExitCascade, x: Any) -> list[Any]:
    """Each exit head's score for a batch, [N] per head: what its threshold is compared with
    (a sample leaves at the first head whose score reaches it). Differentiable, so a robustness
    test can push scores towards or away from thresholds (the slowdown suite does)."""
    if not isinstance(model, ExitCascade):
        raise InputError(
            f"exit_scores needs a model with exit heads (early-exit, resolution, frame-exit, "
            f"stop-reading); got a {getattr(model, 'strategy', type(model).__name__)} model."
        )
    logits = model.exit_logits(x)
    kind = model.policy.kind
    return [_scores(logits[i], model.temperatures[i], kind) for i in range(model.num_exits)]


def save_json(result: Any, path: str | Path) -> Path:
    """Write a result (anything with `to_dict()`, a dataclass or a dict) as JSON, atomically."""
    if isinstance(result, _ToDict):
        data = result.to_dict()
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        data = dataclasses.asdict(result)
    else:
        data = result
    return write_text_atomic(path, json.dumps(data, indent=2))
