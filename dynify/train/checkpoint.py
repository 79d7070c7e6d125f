"""Fine-tuning checkpoints: everything a run needs to resume bit-exactly, written atomically,
as tensors and plain values only (so `torch.load(..., weights_only=True)` reads them)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dynify.errors import DynifyError
from dynify.files import atomic_output
from dynify.runtime.model import DynamicModel

if TYPE_CHECKING:
    from dynify.train.distill import FinetuneConfig, FinetuneResult, Optimizer

CHECKPOINT_FORMAT = "dynify-checkpoint-2"  # 2: param groups carry base_lr (and clip)


def save_checkpoint(
    path: Path,
    dyn: DynamicModel,
    optimizer: Optimizer,
    config: FinetuneConfig,
    epoch: int,
    batch: int,
    step: int,
    result: FinetuneResult,
    samples: int,
) -> None:
    """Tensors and plain Python values only (loads with weights_only=True); tmp + os.replace."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(config),
        "samples": samples,
        "epoch": epoch,
        "batch": batch,
        "step": step,
        "history": [dict(h) for h in result.history],
        "weights": {k: v.detach().clone() for k, v in dyn.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, config: FinetuneConfig, samples: int) -> dict[str, Any]:
    if not path.is_file():
        raise DynifyError(f"No checkpoint at '{path}' to resume from.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DynifyError(
            f"Checkpoint '{path}' cannot be read: {type(exc).__name__}: {exc}."
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DynifyError(f"'{path}' is not a dynify fine-tuning checkpoint.")
    saved = state["config"]
    differs = {k: (saved.get(k), v) for k, v in asdict(config).items() if saved.get(k) != v}
    if differs or state["samples"] != samples:
        detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differs.items())
        if state["samples"] != samples:
            detail += (
                f"{', ' if detail else ''}samples: checkpoint {state['samples']}, now {samples}"
            )
        raise DynifyError(
            f"The checkpoint '{path}' belongs to a different run ({detail}). Resume with the "
            "same data and options, or start afresh without --resume."
        )
    return state


def load_checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights stored in a checkpoint (to inspect or load them elsewhere)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    return state["weights"]
