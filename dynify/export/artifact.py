"""The .dyn artifact: `spec.json` (how to rebuild) + `weights.safetensors`, in a zip. No pickle.

Loading rebuilds the architecture from the spec's model reference, replays the stored plan, and
loads the weights; the weights' SHA-256 in the spec catches an edited or mixed-up weights file.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from dynify.errors import ArtifactError, DynifyError
from dynify.files import atomic_output
from dynify.runtime.fast_access import bind_children
from dynify.runtime.model import DynamicModel, ExitCascade

SPEC_NAME = "spec.json"
WEIGHTS_NAME = "weights.safetensors"
FORMAT = "dynify"
SUPPORTED_VERSIONS = (1,)


def _state_for_saving(dyn: DynamicModel) -> dict[str, torch.Tensor]:
    """The state dict with shared tensors stored once (safetensors refuses aliases)."""
    seen: dict[tuple[int, int], str] = {}
    state = {}
    for name, tensor in dyn.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.numel() > 0:
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state


def save(dyn: DynamicModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `dyn` to a .dyn file atomically (a crash never leaves a half-written artifact)."""
    if not dyn.spec:
        raise ArtifactError(
            "This model has no spec; only models made by dynify.convert can be saved."
        )
    path = Path(path)
    weights = save_safetensors(_state_for_saving(dyn))
    spec = dict(dyn.spec)
    spec["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    spec["state"] = _readable_state(dyn)
    if extra:
        spec.update(extra)
    with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        archive.writestr(SPEC_NAME, json.dumps(spec, indent=2, sort_keys=True))
        archive.writestr(WEIGHTS_NAME, weights)
    return path


def _readable_state(dyn: DynamicModel) -> dict[str, Any]:
    """Thresholds and temperatures, copied into the spec so a person can read them."""
    state = {"thresholds": [round(float(v), 6) for v in dyn.thresholds]}
    if isinstance(dyn, ExitCascade):
        state["temperatures"] = [round(float(v), 6) for v in dyn.temperatures]
    return state


def read_spec(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """The spec and raw weights of an artifact, checked for truncation, edits and version."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Artifact '{path}' does not exist.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {SPEC_NAME, WEIGHTS_NAME} <= names:
                raise ArtifactError(
                    f"'{path}' is not a dynify artifact: it lacks {SPEC_NAME} or {WEIGHTS_NAME}."
                )
            spec_bytes = archive.read(SPEC_NAME)
            weights = archive.read(WEIGHTS_NAME)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise ArtifactError(
            f"'{path}' is not a readable .dyn artifact ({type(exc).__name__}: {exc}); it may be "
            "truncated or corrupted. Convert the model again or restore the file."
        ) from exc
    except zipfile.error as exc:  # CRC mismatch: the bytes were changed
        raise ArtifactError(f"'{path}' is corrupted ({exc}). Convert the model again.") from exc
    try:
        spec = json.loads(spec_bytes)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"'{path}': {SPEC_NAME} is not valid JSON ({exc}).") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ArtifactError(f"'{path}': {SPEC_NAME} is not a dynify spec.")
    if spec.get("version") not in SUPPORTED_VERSIONS:
        raise ArtifactError(
            f"'{path}' has format version {spec.get('version')}; this dynify reads "
            f"{SUPPORTED_VERSIONS}. Upgrade dynify or convert the model again."
        )
    if hashlib.sha256(weights).hexdigest() != spec.get("weights_sha256"):
        raise ArtifactError(
            f"'{path}': the weights do not match the checksum in {SPEC_NAME}; the file was edited "
            "or mixed from two artifacts. Convert the model again or restore the file."
        )
    return spec, weights


def load(path: str | Path, model: nn.Module | None = None) -> DynamicModel:
    """Rebuild a DynamicModel from a .dyn file.

    `model` supplies the architecture for artifacts converted from a Python object rather than
    a model name; its weights are replaced by the artifact's.
    """
    from dynify.convert import read_model
    from dynify.frontend.trace import leaf_options
    from dynify.passes import get_strategy
    from dynify.zoo import ModelRef, rebuild

    spec, weights = read_spec(path)
    try:
        ref = ModelRef.from_dict(spec["model"])
        strategy = get_strategy(spec["strategy"])
        input_shape = tuple(spec["input_shape"])
        plan = spec["plan"]
        leaves = leaf_options(spec.get("leaf_modules", [])).leaf_modules
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"'{path}': {SPEC_NAME} is missing or has a malformed {exc}.") from exc
    architecture = model if model is not None else rebuild(ref)
    front = read_model(architecture, torch.zeros(1, *input_shape), leaves)
    try:
        dyn = bind_children(strategy.build(front.context, plan))
        missing, unexpected = dyn.load_state_dict(load_safetensors(weights), strict=False)
    except DynifyError:
        raise
    except Exception as exc:
        raise ArtifactError(
            f"'{path}' could not be rebuilt: {type(exc).__name__}: {exc}. The architecture does "
            "not match the artifact's weights."
        ) from exc
    # Tensors shared between modules were stored once; any other gap is a real mismatch.
    # Buffers added after an artifact was written keep their defaults (e.g. no exit ensemble).
    missing = [k for k in missing if not _is_alias(dyn, k) and k not in dyn.optional_state]
    if missing or unexpected:
        raise ArtifactError(
            f"'{path}' does not fit its architecture: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Was it saved by a different version of the model code?"
        )
    dyn.spec = {k: v for k, v in spec.items() if k not in ("weights_sha256", "state")}
    return dyn.eval()


def _is_alias(dyn: DynamicModel, key: str) -> bool:
    state = dyn.state_dict(keep_vars=True)
    target = state[key]
    return any(
        other is not target
        and other.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
        for name, other in state.items()
        if name != key
    )
