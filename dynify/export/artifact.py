"""The .dyn artifact: `spec.json` (how to rebuild) + `weights.safetensors`, in a zip. No pickle.

An artifact describes a model; loading it never runs code it names. The spec's model reference
is rebuilt only from fixed registries (`dynify.zoo.rebuild`), leaf types are looked up among the
rebuilt model's own classes, and anything else needs the caller's `model=` or `trust_imports`.
Every entry is size-checked before it is inflated and every spec field is checked by type and
range, so a crafted file is refused with a message instead of exhausting memory or reaching deep
into the code. `spec_sha256` (over the canonical JSON of the spec, which holds `weights_sha256`)
catches an edited spec or weights file; it is a checksum against damage and mix-ups, not a
signature: trust comes from the rules above, not from the hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from dynify.errors import ArtifactError, DynifyError, InputError
from dynify.files import atomic_output
from dynify.frontend.inputs import INPUT_DTYPES, ExtraInput, example_input_of
from dynify.frontend.padding import example_token
from dynify.runtime.model import DynamicModel, ExitCascade

SPEC_NAME = "spec.json"
WEIGHTS_NAME = "weights.safetensors"
FORMAT = "dynify"
SUPPORTED_VERSIONS = (1,)
SPEC_HASH = "spec_sha256"

MAX_SPEC_BYTES = 16 * 2**20  # a spec is a few kB to a few MB (plans of very deep models)
MAX_WEIGHTS_BYTES = 64 * 2**30
MAX_WEIGHTS_RATIO = 20  # float weights barely compress; a zip bomb compresses a thousandfold
MAX_SPEC_DEPTH = 32
MAX_SIDE = 16384  # pixels (or channels) per input dimension
MAX_INPUT_ELEMENTS = 2**26  # one sample: rebuilding traces the model on a zero tensor this big
MAX_CLASSES = 10**6
MAX_NAME_CHARS = 1024
MAX_CONFIG_KEYS = 64
MODEL_KINDS = ("builtin", "torchvision", "timm", "import", "module")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def spec_digest(spec: dict[str, Any]) -> str:
    """SHA-256 of the spec's canonical JSON (sorted keys, no spaces), the hash field left out."""
    body = {k: v for k, v in spec.items() if k != SPEC_HASH}
    text = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def save(dyn: DynamicModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `dyn` to a .dyn file atomically (a crash never leaves a half-written artifact)."""
    if not dyn.spec:
        raise ArtifactError(
            "This model has no spec; only models made by dynify.convert can be saved."
        )
    path = Path(path)
    weights = save_safetensors(_state_for_saving(dyn))
    spec = {k: v for k, v in dyn.spec.items() if k != SPEC_HASH}
    spec["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    spec["state"] = _readable_state(dyn)
    if extra:
        spec.update(extra)
    try:
        spec[SPEC_HASH] = spec_digest(spec)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(
            f"The model's spec cannot be saved as JSON ({exc}): every option must be a finite "
            "number, a string, a list or a dict. Convert again with finite option values."
        ) from exc
    with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        archive.writestr(SPEC_NAME, json.dumps(spec, indent=2, sort_keys=True))
        archive.writestr(WEIGHTS_NAME, weights)
    return path


def _readable_state(dyn: DynamicModel) -> dict[str, Any]:
    """Thresholds and temperatures, copied into the spec so a person can read them.

    Non-finite values (an infinite threshold switches an exit off) are written as strings, since
    JSON has no number for them; the weights hold the real values.
    """

    def readable(values: torch.Tensor) -> list[float | str]:
        return [round(float(v), 6) if math.isfinite(float(v)) else str(float(v)) for v in values]

    state: dict[str, Any] = {"thresholds": readable(dyn.thresholds)}
    if isinstance(dyn, ExitCascade):
        state["temperatures"] = readable(dyn.temperatures)
    return state


def _refuse(path: Path, problem: str) -> ArtifactError:
    return ArtifactError(
        f"'{path}' is not a usable .dyn artifact: {problem} The file is damaged, was edited, or "
        "was not written by dynify.save; convert the model again or restore the file."
    )


def _read_entry(archive: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """One member's bytes, refused before inflating when it is too large or not plainly stored."""
    if archive.namelist().count(name) != 1:
        raise _refuse(path, f"it holds {name} more than once.")
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise _refuse(path, f"{name} is encrypted.")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _refuse(path, f"{name} uses compression method {info.compress_type}.")
    ratio_limited = name == WEIGHTS_NAME and info.file_size > 2**20
    if info.file_size > limit or (
        ratio_limited and info.file_size > MAX_WEIGHTS_RATIO * max(info.compress_size, 1)
    ):
        raise _refuse(
            path,
            f"{name} would inflate from {info.compress_size:,} to {info.file_size:,} bytes "
            f"(limit {limit:,} bytes, and at most {MAX_WEIGHTS_RATIO}x for the weights), so it "
            "was not read.",
        )
    with archive.open(info) as entry:
        data = entry.read(limit + 1)
    if len(data) > limit:
        raise _refuse(path, f"{name} inflates to more than its limit of {limit:,} bytes.")
    return data


def _walk(value: Any) -> tuple[int, str | None]:
    """Nesting depth of parsed JSON, and the key of a NaN or infinity if it holds one."""
    deepest, non_finite, stack = 0, None, [(value, 1, "")]
    while stack:
        item, depth, key = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1, _join(key, k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, depth + 1, key) for v in item)
        elif isinstance(item, float) and not math.isfinite(item):
            non_finite = non_finite or key
    return deepest, non_finite


def _join(parent: str, key: Any) -> str:
    return f"{parent}.{key}" if parent else str(key)


def _parse_spec(spec_bytes: bytes, path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(spec_bytes)
    except RecursionError:
        raise _refuse(path, f"{SPEC_NAME} is nested too deeply to read.") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"'{path}': {SPEC_NAME} is not valid JSON ({exc}).") from exc
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ArtifactError(f"'{path}': {SPEC_NAME} is not a dynify spec.")
    depth, non_finite = _walk(spec)
    if depth > MAX_SPEC_DEPTH:
        raise _refuse(path, f"{SPEC_NAME} is nested more than {MAX_SPEC_DEPTH} levels deep.")
    # NaN and infinities are not JSON; earlier versions wrote them in the readable `state` only
    # (which loading does not use), so they are refused everywhere else.
    if non_finite is not None and not non_finite.startswith("state"):
        raise _refuse(path, f"{SPEC_NAME} holds NaN or an infinity in '{non_finite}'.")
    return spec


def read_spec(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """The spec and raw weights of an artifact, checked for size, truncation, edits and fields."""
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
            spec = _parse_spec(_read_entry(archive, SPEC_NAME, MAX_SPEC_BYTES, path), path)
            version = spec.get("version")
            if type(version) is not int or version not in SUPPORTED_VERSIONS:
                raise ArtifactError(
                    f"'{path}' has format version {version}; this dynify reads "
                    f"{SUPPORTED_VERSIONS}. Upgrade dynify or convert the model again."
                )
            weights = _read_entry(archive, WEIGHTS_NAME, MAX_WEIGHTS_BYTES, path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise ArtifactError(
            f"'{path}' is not a readable .dyn artifact ({type(exc).__name__}: {exc}); it may be "
            "truncated or corrupted. Convert the model again or restore the file."
        ) from exc
    except (zipfile.error, RuntimeError, NotImplementedError) as exc:  # CRC mismatch, ...
        raise ArtifactError(f"'{path}' is corrupted ({exc}). Convert the model again.") from exc
    check_spec_fields(spec, path)
    _check_hashes(spec, weights, path)
    return spec, weights


def _check_hashes(spec: dict[str, Any], weights: bytes, path: Path) -> None:
    if hashlib.sha256(weights).hexdigest() != spec.get("weights_sha256"):
        raise ArtifactError(
            f"'{path}': the weights do not match the checksum in {SPEC_NAME}; the file was edited "
            "or mixed from two artifacts. Convert the model again or restore the file."
        )
    if SPEC_HASH not in spec:
        warnings.warn(
            f"'{path}' was saved by an earlier dynify: its checksum covers the weights only, so "
            f"an edit to {SPEC_NAME} would go unnoticed (loading still imports nothing the spec "
            "names). Re-save it to add the spec's checksum: "
            "dynify.save(dynify.load(path), path).",
            UserWarning,
            stacklevel=3,
        )
        return
    try:
        digest = spec_digest(spec)
    except (TypeError, ValueError):
        digest = None
    if digest != spec[SPEC_HASH]:
        raise ArtifactError(
            f"'{path}': {SPEC_NAME} does not match its checksum ({SPEC_HASH}); the spec was "
            "edited after saving. Convert the model again or restore the file."
        )


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS


def _is_readable_number(value: Any) -> bool:
    if type(value) in (int, float):
        return True
    return value in ("inf", "-inf", "nan") or value is None


def _field_checks() -> list[tuple[str, Any, str]]:
    """(field, test of its value, what it must be): one row per spec field loading reads."""
    from dynify.passes import strategy_names

    model_keys = {"kind", "name", "num_classes", "input_size", "weights", "notes", "config"}
    return [
        (
            "model",
            lambda v: isinstance(v, dict) and set(v) <= model_keys,
            f"an object with 'kind', 'name' and no keys beyond {sorted(model_keys)}",
        ),
        ("model.kind", lambda v: v in MODEL_KINDS, f"one of {', '.join(MODEL_KINDS)}"),
        ("model.name", _is_name, f"a non-empty string of at most {MAX_NAME_CHARS} characters"),
        (
            "model.num_classes",
            lambda v: v is None or _is_int(v, 1, MAX_CLASSES),
            f"null or a whole number from 1 to {MAX_CLASSES:,}",
        ),
        (
            "model.input_size",
            lambda v: v is None or _is_int(v, 1, MAX_SIDE),
            f"null or a whole number of pixels from 1 to {MAX_SIDE}",
        ),
        ("model.weights", lambda v: isinstance(v, str) and len(v) <= 4096, "a string"),
        (
            "model.notes",
            lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
            "a list of strings",
        ),
        (
            "model.config",
            lambda v: (
                isinstance(v, dict)
                and len(v) <= MAX_CONFIG_KEYS
                and all(_is_name(k) and type(x) in (int, str, bool) for k, x in v.items())
                and all(len(x) <= MAX_NAME_CHARS for x in v.values() if isinstance(x, str))
            ),
            f"an object of at most {MAX_CONFIG_KEYS} architecture arguments, each a whole "
            "number, a string or a boolean (checked against the built-in's parameters on load)",
        ),
        (
            "input_shape",
            lambda v: (
                isinstance(v, list)
                and 1 <= len(v) <= 4
                and all(_is_int(d, 1, MAX_SIDE) for d in v)
                and math.prod(v) <= MAX_INPUT_ELEMENTS
            ),
            f"a list of 1 to 4 whole numbers from 1 to {MAX_SIDE} (one sample's shape, e.g. "
            f"[3, 224, 224]) with at most {MAX_INPUT_ELEMENTS:,} elements in all",
        ),
        (
            "input_dtype",
            lambda v: v in INPUT_DTYPES,
            f"the name of an input dtype: {', '.join(INPUT_DTYPES)}",
        ),
        (
            "extra_input",
            _is_extra_input,
            "the second input of a sequence model: {'kind': 'lengths', 'dtype': 'int64' or "
            "'int32'} or {'kind': 'mask', 'dtype': 'bool', 'int64', 'int32' or 'uint8'}",
        ),
        (
            "pad_id",
            lambda v: _is_int(v, 0, 2**62),
            "the token id texts are padded with, a whole number of at least 0",
        ),
        (
            "leaf_modules",
            lambda v: isinstance(v, list) and all(_is_name(n) for n in v),
            "a list of module names or 'package.module:Class' strings",
        ),
        (
            "strategy",
            lambda v: v in strategy_names(),
            f"the name of a strategy: {', '.join(strategy_names())}",
        ),
        ("plan", lambda v: isinstance(v, dict), "an object (the strategy's plan)"),
        (
            "state",
            lambda v: (
                isinstance(v, dict)
                and all(
                    isinstance(x, list) and all(_is_readable_number(n) for n in x)
                    for x in v.values()
                )
            ),
            "an object of lists of numbers",
        ),
    ]


def _is_extra_input(value: Any) -> bool:
    try:
        ExtraInput.from_dict(value)
    except InputError:
        return False
    return True


_ABSENT = object()
_OPTIONAL = {
    "input_dtype",
    "extra_input",
    "pad_id",
    "leaf_modules",
    "state",
    "model.num_classes",
    "model.input_size",
    "model.weights",
    "model.notes",
    "model.config",
}


def check_spec_fields(spec: dict[str, Any], path: str | Path) -> None:
    """Each field loading reads, checked by type and range; the first bad one is refused."""
    for field, test, expected in _field_checks():
        parent, _, key = field.rpartition(".")
        holder = spec.get(parent) if parent else spec
        value = holder.get(key, _ABSENT) if isinstance(holder, dict) else _ABSENT
        if value is _ABSENT and field in _OPTIONAL:
            continue
        if value is _ABSENT:
            raise ArtifactError(
                f"'{path}': {SPEC_NAME} is missing or has a malformed '{field}': it must be "
                f"{expected}. Convert the model again or restore the file."
            )
        if not test(value):
            raise ArtifactError(
                f"'{path}': {SPEC_NAME} has a malformed '{field}' ({_describe(value)}): it must "
                f"be {expected}. The file is damaged or was edited; convert the model again or "
                "restore the file."
            )


def load(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    trust_imports: Sequence[str] = (),
) -> DynamicModel:
    """Rebuild a DynamicModel from a .dyn file, importing nothing the file names.

    The architecture is rebuilt by name only for dynify's built-ins and torchvision's and timm's
    registries. For an artifact converted from a Python object or an import path, pass `model`
    (the architecture; its weights are replaced by the artifact's), or name the import path you
    trust in `trust_imports` (e.g. `["mypkg.models:build_net"]`) to let loading import it.
    """
    from dynify.convert import build, read_model
    from dynify.frontend.trace import leaves_of_model
    from dynify.passes import get_strategy
    from dynify.zoo import ModelRef, rebuild

    if isinstance(trust_imports, str):
        trust_imports = [trust_imports]
    spec, weights = read_spec(path)
    ref = ModelRef.from_dict(spec["model"])
    strategy = get_strategy(spec["strategy"])
    plan = spec["plan"]
    architecture = model if model is not None else rebuild(ref, trust_imports)
    token = example_token(architecture, spec.get("pad_id"))
    example = example_input_of(spec["input_shape"], spec.get("input_dtype", "float32"), token)
    if "extra_input" in spec:  # a padded sequence and its lengths or mask, at full length
        extra = ExtraInput.from_dict(spec["extra_input"])
        example = (example, extra.full(1, int(spec["input_shape"][0])))
    leaves = leaves_of_model(spec.get("leaf_modules", []), architecture)
    front = read_model(architecture, example, leaves, spec.get("pad_id"))
    _check_plan_sizes(strategy, front.context, plan, weights, Path(path))
    try:
        dyn = build(strategy, front.context, plan)
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
    dyn.spec = {k: v for k, v in spec.items() if k not in ("weights_sha256", SPEC_HASH, "state")}
    dyn.artifact_path = Path(path).resolve()  # exports refuse to write over it
    return dyn.eval()


def _weight_shapes(weights: bytes) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header, without reading the tensors."""
    size = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + size]) if 8 + size <= len(weights) else {}
    return {
        name: tuple(entry["shape"])
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


def _check_plan_sizes(strategy: Any, context: Any, plan: dict, weights: bytes, path: Path) -> None:
    """Build the plan on the meta device first (no memory) and compare it with the weights.

    A plan is data too: one asking for a head a million channels wide would otherwise allocate
    it before the weights could show the mismatch. Plans the meta device cannot build are left
    to the real build, whose errors are reported as usual.
    """
    try:
        with torch.device("meta"):
            probe = strategy.build(context, plan).state_dict()
        shapes = _weight_shapes(weights)
    except Exception:
        return
    wrong = [k for k, v in probe.items() if k in shapes and tuple(v.shape) != shapes[k]]
    stored = sum(math.prod(s) for s in shapes.values())
    extra = sum(v.numel() for k, v in probe.items() if k not in shapes)
    if wrong or extra > stored:
        detail = (
            f"{wrong[0]} is {tuple(probe[wrong[0]].shape)} in the plan but "
            f"{shapes[wrong[0]]} in the weights"
            if wrong
            else f"the plan asks for {extra:,} values more than the {stored:,} stored"
        )
        raise _refuse(path, f"its plan does not fit its weights ({detail}).")


def _is_alias(dyn: DynamicModel, key: str) -> bool:
    state = dyn.state_dict(keep_vars=True)
    target = state[key]
    # The same tensor under two names (a lifted region sharing its parent's modules) is an
    # alias too: the name it was stored under fills both.
    return any(
        other.untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
        for name, other in state.items()
        if name != key
    )
