"""Fine-tuning checkpoints: everything that defines a run at a batch boundary, so a resumed run
ends bit for bit where an uninterrupted one would.

A checkpoint holds the weights and buffers, the optimizer state, the position (epoch, batch,
step, and the running sums of the epoch's metrics), every random state (torch CPU and CUDA,
Python's `random`, numpy's) and the history; plus what it belongs to: the run's options, the
number of training samples and a fingerprint of the weights the run started from. It is
written atomically, as tensors and plain values only (`torch.load(..., weights_only=True)`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dynify.errors import DynifyError
from dynify.files import atomic_output
from dynify.runtime.model import DynamicModel
from dynify.train.run_env import interrupt_hook

if TYPE_CHECKING:
    from dynify.train.distill import FinetuneConfig, Optimizer

# 3: the run's origin, the epoch's running metrics and every random state.
CHECKPOINT_FORMAT = "dynify-checkpoint-3"


@dataclass
class Position:
    """Where a run stands between two batches: `batch` batches of `epoch` done, `step` in all."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # the epoch's metrics so far
    seen: int = 0


def weights_fingerprint(dyn: DynamicModel) -> str:
    """SHA-256 of the names, types, shapes and bytes of every weight and buffer."""
    digest = hashlib.sha256()
    for name, value in dyn.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: Path,
    dyn: DynamicModel,
    optimizer: Optimizer,
    config: FinetuneConfig,
    position: Position,
    history: list[dict[str, float]],
    *,
    samples: int,
    origin: str,
) -> None:
    """Write the run's state atomically: an interrupted write leaves the previous checkpoint."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(config),
        "samples": samples,
        "origin": origin,
        "position": asdict(position),
        "history": [dict(h) for h in history],
        "weights": {k: v.detach().clone() for k, v in dyn.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng(),
    }
    try:
        with atomic_output(path) as tmp:
            torch.save(state, tmp)
            interrupt_hook("checkpoint_write", position.step)
    except OSError as exc:
        raise DynifyError(
            f"Cannot write the checkpoint '{path}' ({exc.strerror or exc}). Free some space or "
            "choose another file with --checkpoint; the previous checkpoint, if any, is intact."
        ) from exc


def load_checkpoint(
    path: Path, config: FinetuneConfig, samples: int, dyn: DynamicModel, origin: str
) -> dict[str, Any]:
    """The checkpoint's state, refused with a message when it belongs to another run."""
    if not path.is_file():
        raise DynifyError(f"No checkpoint at '{path}' to resume from.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DynifyError(
            f"Checkpoint '{path}' cannot be read ({type(exc).__name__}: {exc}). Start afresh "
            "without --resume."
        ) from exc
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith(
        "dynify-checkpoint"
    ):
        raise DynifyError(f"'{path}' is not a dynify fine-tuning checkpoint.")
    if state["format"] != CHECKPOINT_FORMAT:
        raise DynifyError(
            f"The checkpoint '{path}' was written by another version of dynify "
            f"({state['format']}, this one reads {CHECKPOINT_FORMAT}); start afresh without "
            "--resume."
        )
    try:
        _check_belongs(path, state, config, samples, dyn, origin)
        Position(**state["position"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise DynifyError(
            f"The checkpoint '{path}' is damaged ({type(exc).__name__}: {exc}); start afresh "
            "without --resume."
        ) from exc
    return state


def _check_belongs(
    path: Path,
    state: dict[str, Any],
    config: FinetuneConfig,
    samples: int,
    dyn: DynamicModel,
    origin: str,
) -> None:
    mine = dyn.state_dict()
    theirs = state["weights"]
    if set(theirs) != set(mine) or any(
        tuple(theirs[k].shape) != tuple(v.shape) or theirs[k].dtype != v.dtype
        for k, v in mine.items()
    ):
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        shown = ", ".join([*(f"-{k}" for k in missing[:3]), *(f"+{k}" for k in extra[:3])])
        raise DynifyError(
            f"The checkpoint '{path}' was written for another model: its weights do not fit "
            f"this one{f' ({shown})' if shown else ' (other shapes)'}. Resume with the "
            "artifact the run started from, or start afresh without --resume."
        )
    # An option added after the checkpoint was written takes its default: a run started by an
    # older dynify resumes with today's defaults for what it could not have set.
    saved = {**asdict(type(config)()), **state["config"]}
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
    if state["origin"] != origin:
        raise DynifyError(
            f"The checkpoint '{path}' belongs to a run that started from other weights: another "
            "artifact of the same architecture, or this one changed since (fine-tuned, "
            "calibrated, re-converted). Resume with the artifact as it was when the run started "
            "(fine-tuning rewrites it only at the end), or start afresh without --resume."
        )


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Temporary files `atomic_output` left beside `path` when a process writing it was killed
    outright (SIGKILL, power loss): the checkpoint itself was never replaced by them."""
    stale = sorted(path.parent.glob(f".{path.stem}.*.tmp{path.suffix}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def load_checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights stored in a checkpoint (to inspect or load them elsewhere)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    return state["weights"]


# --- random states -----------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every random generator a run may draw from, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype("int64")),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        keys = n["keys"].numpy().astype("uint32")
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
