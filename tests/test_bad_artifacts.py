"""Crafted .dyn files: every bad spec field, zip bomb and code reference is refused with one
paragraph (exit 2 in the CLI), and nothing a spec names is imported or called."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import dynify
from dynify.cli import app
from dynify.errors import ArtifactError, ModelError
from dynify.export import artifact
from dynify.export.artifact import SPEC_NAME, WEIGHTS_NAME, spec_digest

runner = CliRunner()
REAL_EXIT = sys.exit


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    dyn = dynify.convert("cifar_resnet20", weights="random", options={"exits": 2})
    return dynify.save(dyn, tmp_path_factory.mktemp("art") / "r20.dyn")


def _parts(path: Path) -> tuple[dict, bytes]:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(SPEC_NAME)), archive.read(WEIGHTS_NAME)


def _write(out: Path, spec_text: str | bytes, weights: bytes, **zip_kwargs) -> Path:
    with zipfile.ZipFile(out, "w", **zip_kwargs) as archive:
        archive.writestr(SPEC_NAME, spec_text)
        archive.writestr(WEIGHTS_NAME, weights)
    return out


def _mutated(saved: Path, out: Path, edit, rehash: bool = True) -> Path:
    """The artifact with `edit` applied to its spec and, as a careful attacker would, the spec's
    checksum recomputed, so that the field checks themselves are what refuses it."""
    spec, weights = _parts(saved)
    spec = copy.deepcopy(spec)
    edit(spec)
    if rehash:
        with contextlib.suppress(ValueError):  # NaN has no canonical JSON; the parser refuses it
            spec["spec_sha256"] = spec_digest(spec)
    return _write(out, json.dumps(spec), weights)


def _set(dotted: str, value):
    def edit(spec: dict) -> None:
        *parents, key = dotted.split(".")
        holder = spec
        for parent in parents:
            holder = holder[parent]
        holder[key] = value

    return edit


def _drop(dotted: str):
    def edit(spec: dict) -> None:
        *parents, key = dotted.split(".")
        holder = spec
        for parent in parents:
            holder = holder[parent]
        del holder[key]

    return edit


def _nest(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_FIELDS = [
    ("input_shape", [3, -1, 32], "'input_shape'"),
    ("input_shape", [3, 0, 32], "'input_shape'"),
    ("input_shape", [3, 1e9, 1e9], "'input_shape'"),
    ("input_shape", [3, 10**9, 10**9], "'input_shape'"),
    ("input_shape", [3, 8192, 8192], "'input_shape'"),
    ("input_shape", "3,32,32", "'input_shape'"),
    ("input_shape", [], "'input_shape'"),
    ("input_shape", [3, 32, 32, 1, 1], "'input_shape'"),
    ("input_shape", [True, 32, 32], "'input_shape'"),
    ("input_shape", [3, 32.0, 32], "'input_shape'"),
    ("input_shape", [3, float("nan"), 32], "NaN or an infinity in 'input_shape'"),
    ("input_shape", [3, float("inf"), 32], "NaN or an infinity in 'input_shape'"),
    ("plan.policy", {"threshold": float("-inf")}, "NaN or an infinity in 'plan.policy.threshold'"),
    ("model", "cifar_resnet20", "'model'"),
    ("model.num_classes", "abc", "'model.num_classes'"),
    ("model.num_classes", 1e12, "'model.num_classes'"),
    ("model.num_classes", 10**12, "'model.num_classes'"),
    ("model.num_classes", 0, "'model.num_classes'"),
    ("model.num_classes", True, "'model.num_classes'"),
    ("model.input_size", -5, "'model.input_size'"),
    ("model.kind", "pickle", "'model.kind'"),
    ("model.kind", 3, "'model.kind'"),
    ("model.name", 123, "'model.name'"),
    ("model.name", "", "'model.name'"),
    ("model.name", "x" * 5000, "'model.name'"),
    ("model.factory", "os:system", "'model'"),
    ("model.notes", "text", "'model.notes'"),
    ("model.weights", 5, "'model.weights'"),
    ("strategy", 42, "'strategy'"),
    ("strategy", "no-such-strategy", "'strategy'"),
    ("plan", [], "'plan'"),
    ("plan", _nest(40), "nested more than"),
    ("plan", "@DEEP@", "nested too deeply"),  # 100,000 levels, written by hand below
    ("leaf_modules", "layer1", "'leaf_modules'"),
    ("leaf_modules", [1], "'leaf_modules'"),
    ("state", {"thresholds": "high"}, "'state'"),
    ("version", "1", "format version"),
    ("version", True, "format version"),
    ("version", 1.0, "format version"),
    ("format", "other", "not a dynify spec"),
    ("weights_sha256", "0" * 64, "do not match the checksum"),
]
MISSING_FIELDS = ["input_shape", "model", "model.name", "model.kind", "strategy", "plan"]


def _deep_spec(saved: Path, out: Path, depth: int = 100_000) -> Path:
    """json.dumps cannot write 100,000 levels; the spec's text is built by hand."""
    spec, weights = _parts(saved)
    spec["plan"] = "@DEEP@"
    text = json.dumps(spec).replace('"@DEEP@"', "[" * depth + "1" + "]" * depth)
    return _write(out, text, weights)


@pytest.mark.parametrize(
    ("field", "value", "message"), BAD_FIELDS, ids=[f"{f}={str(v)[:20]}" for f, v, _ in BAD_FIELDS]
)
def test_each_bad_field_is_one_paragraph_and_exit_2(saved, tmp_path, field, value, message):
    out = tmp_path / "bad.dyn"
    bad = _deep_spec(saved, out) if value == "@DEEP@" else _mutated(saved, out, _set(field, value))
    with pytest.raises(ArtifactError, match=message) as caught:
        dynify.load(bad)
    assert "\n" not in str(caught.value)
    result = runner.invoke(app, ["export", str(bad), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "ArtifactError" in result.output
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("field", MISSING_FIELDS)
def test_each_missing_field_is_named(saved, tmp_path, field):
    bad = _mutated(saved, tmp_path / "bad.dyn", _drop(field))
    with pytest.raises(ArtifactError, match=f"missing or has a malformed '{field}'"):
        dynify.load(bad)


def test_an_edited_spec_fails_its_checksum(saved, tmp_path):
    edit = _set("model.num_classes", 11)
    bad = _mutated(saved, tmp_path / "bad.dyn", edit, rehash=False)
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        dynify.load(bad)


def test_checksum_is_over_canonical_json_not_the_file_layout(saved, tmp_path):
    spec, weights = _parts(saved)
    relaid = _write(tmp_path / "relaid.dyn", json.dumps(spec, indent=7), weights)
    assert spec["spec_sha256"] == spec_digest(spec)
    dynify.load(relaid)


def test_non_finite_readable_state_of_old_artifacts_still_loads(saved, tmp_path):
    """Earlier versions wrote a NaN or infinite threshold as NaN/Infinity into `state`."""

    def old_style(spec: dict) -> None:
        del spec["spec_sha256"]
        spec["state"] = {"thresholds": [float("inf"), float("nan")]}

    old = _mutated(saved, tmp_path / "old.dyn", old_style, rehash=False)
    assert b"Infinity" in zipfile.ZipFile(old).read(SPEC_NAME)
    with pytest.warns(UserWarning, match="Re-save"):
        dynify.load(old)


def test_old_artifact_without_spec_checksum_loads_with_a_warning(saved, tmp_path):
    old = _mutated(saved, tmp_path / "old.dyn", _drop("spec_sha256"), rehash=False)
    with pytest.warns(UserWarning, match=r"Re-save it .*dynify.save\(dynify.load\(path\), path\)"):
        dyn = dynify.load(old)
    resaved = dynify.save(dyn, tmp_path / "resaved.dyn")
    assert "spec_sha256" in _parts(resaved)[0]


# ---------------------------------------------------------------------------------------------
# Sizes: refused from the zip's directory, before anything is inflated
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_inflating(monkeypatch):
    """Records every member opened for reading."""
    opened = []
    original = zipfile.ZipFile.open

    def spy(self, name, mode="r", *args, **kwargs):
        if mode == "r":
            opened.append(getattr(name, "filename", name))
        return original(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return opened


def test_spec_that_inflates_past_its_limit_is_not_read(saved, tmp_path, no_inflating):
    _, weights = _parts(saved)
    huge = b" " * (artifact.MAX_SPEC_BYTES + 1)  # compresses to a few kB
    bomb = _write(tmp_path / "bomb.dyn", huge, weights, compression=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 2_000_000
    no_inflating.clear()
    with pytest.raises(ArtifactError, match="would inflate .* so it was not read"):
        dynify.load(bomb)
    assert SPEC_NAME not in no_inflating


def test_spec_whose_header_understates_its_size_is_cut_off(saved, tmp_path, monkeypatch):
    spec, weights = _parts(saved)
    padded = json.dumps(spec) + " " * 5_000_000
    bomb = _write(tmp_path / "liar.dyn", padded, weights, compression=zipfile.ZIP_DEFLATED)
    monkeypatch.setattr(artifact, "MAX_SPEC_BYTES", 100_000)
    real = zipfile.ZipFile._RealGetContents

    def understate(self):  # the directory claims the spec is small
        real(self)
        self.getinfo(SPEC_NAME).file_size = 1000

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", understate)
    with pytest.raises(ArtifactError):
        dynify.load(bomb)


def test_weights_that_inflate_a_thousandfold_are_not_read(saved, tmp_path, no_inflating):
    spec, _ = _parts(saved)
    zeros = bytes(30 * 2**20)
    bomb = _write(tmp_path / "bomb.dyn", json.dumps(spec), zeros, compression=zipfile.ZIP_DEFLATED)
    no_inflating.clear()
    with pytest.raises(ArtifactError, match="would inflate"):
        dynify.load(bomb)
    assert WEIGHTS_NAME not in no_inflating


def test_a_deflated_artifact_of_real_weights_still_loads(saved, tmp_path):
    spec, weights = _parts(saved)
    deflated = _write(
        tmp_path / "d.dyn", json.dumps(spec), weights, compression=zipfile.ZIP_DEFLATED
    )
    dynify.load(deflated)


def _patch_entry(path: Path, name: str, *, method: int | None = None, flags: int | None = None):
    """Rewrite the compression method or flag bits of one member in both zip headers."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    local, central = info.header_offset, data.find(b"PK\x01\x02")
    while central != -1:
        name_len = int.from_bytes(data[central + 28 : central + 30], "little")
        if data[central + 46 : central + 46 + name_len] == name.encode():
            break
        central = data.find(b"PK\x01\x02", central + 4)
    for offset, header in ((local, 4), (central, 6)):
        if flags is not None:
            data[offset + header + 2 : offset + header + 4] = flags.to_bytes(2, "little")
        if method is not None:
            data[offset + header + 4 : offset + header + 6] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("patch", "message"), [({"flags": 1}, "encrypted"), ({"method": 99}, "compression method 99")]
)
def test_encrypted_or_unknown_compression_is_refused(saved, tmp_path, patch, message):
    spec, weights = _parts(saved)
    bad = _write(tmp_path / "bad.dyn", json.dumps(spec), weights)
    _patch_entry(bad, WEIGHTS_NAME, **patch)
    with pytest.raises(ArtifactError, match=message):
        dynify.load(bad)


# ---------------------------------------------------------------------------------------------
# Code references: nothing a spec names is imported or called
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tripwires(monkeypatch, tmp_path):
    """os.abort, sys.exit and tempfile.mkdtemp replaced by recorders, and a module in the
    working directory (on sys.path, as with `python -m dynify`) that leaves a mark if imported."""
    calls: list[str] = []
    monkeypatch.setattr(os, "abort", lambda *a, **k: calls.append("os.abort"))
    monkeypatch.setattr(sys, "exit", lambda *a, **k: calls.append("sys.exit"))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: calls.append("tempfile.mkdtemp"))
    marker = tmp_path / "imported.txt"
    (tmp_path / "localevil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from dynify.models.cifar_resnet import cifar_resnet20 as build\n"
        "class Leaf:\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield calls, marker
    sys.modules.pop("localevil", None)


REFERENCES = [
    ("import", "os:abort"),
    ("import", "sys:exit"),
    ("import", "tempfile:mkdtemp"),
    ("import", "localevil:build"),
    ("builtin", "os:abort"),
    ("builtin", "localevil:build"),
    ("module", "localevil:build"),
    ("torchvision", "os:abort"),
    ("timm", "localevil:build"),
    ("timm", "hf-hub:someone/resnet18"),
]


@pytest.mark.parametrize(("kind", "name"), REFERENCES, ids=[f"{k}-{n}" for k, n in REFERENCES])
def test_model_reference_is_refused_without_importing_it(saved, tmp_path, tripwires, kind, name):
    calls, marker = tripwires
    bad = _mutated(saved, tmp_path / "bad.dyn", lambda s: s["model"].update(kind=kind, name=name))
    with pytest.raises(ModelError, match=r"model=MyNet\(\)") as caught:
        dynify.load(bad)
    if kind in ("import", "module"):
        assert f"trust_imports=[{name!r}]" in str(caught.value)
    assert calls == [] and not marker.exists() and "localevil" not in sys.modules
    with pytest.MonkeyPatch.context() as patch:  # click ends every command with sys.exit
        patch.setattr(sys, "exit", REAL_EXIT)
        result = runner.invoke(app, ["export", str(bad), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert calls == [] and not marker.exists()


def test_leaf_entries_are_never_imported(saved, tmp_path, tripwires):
    calls, marker = tripwires
    leaves = ["localevil:Leaf", "os:abort", "tempfile:mkdtemp"]
    edited = _mutated(saved, tmp_path / "leaf.dyn", _set("leaf_modules", leaves))
    dynify.load(edited)  # a type none of the model's modules is cannot make a leaf: dropped
    assert calls == [] and not marker.exists() and "localevil" not in sys.modules


def test_trusted_import_is_imported_when_named(saved, tmp_path, tripwires):
    _, marker = tripwires
    ref = {"kind": "import", "name": "localevil:build"}
    spec_edit = lambda s: s["model"].update(ref)  # noqa: E731
    trusted = _mutated(saved, tmp_path / "trusted.dyn", spec_edit)
    with pytest.raises(ModelError):
        dynify.load(trusted, trust_imports=["localevil:other"])
    assert not marker.exists()
    original = dynify.load(saved)
    loaded = dynify.load(trusted, trust_imports=["localevil:build"])
    assert marker.exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))


class OpaqueBlock(nn.Module):
    """Data-dependent control flow: only traceable as a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if float(x.mean()) > -1e9 else x


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block = OpaqueBlock()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.relu(self.block(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_model_argument_loads_a_custom_architecture_with_a_class_leaf(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    dyn = dynify.convert(CustomNet(), example_input=x[:1], leaf_modules=[OpaqueBlock])
    path = dynify.save(dyn, tmp_path / "custom.dyn")
    assert _parts(path)[0]["leaf_modules"] == [f"{__name__}:OpaqueBlock"]
    with pytest.raises(ModelError, match="trust_imports"):
        dynify.load(path)
    loaded = dynify.load(path, model=CustomNet())
    trusted = dynify.load(path, trust_imports=[f"{__name__}:CustomNet"])
    with torch.no_grad():
        assert torch.equal(loaded(x), dyn(x))
        assert torch.equal(trusted(x), dyn(x))


def test_infinite_threshold_is_saved_as_readable_text_and_loads(saved, tmp_path):
    dyn = dynify.load(saved)
    with torch.no_grad():
        dyn.thresholds[0] = float("inf")  # never leave at exit 0
    path = dynify.save(dyn, tmp_path / "inf.dyn")
    spec, _ = _parts(path)
    assert spec["state"]["thresholds"][0] == "inf" and spec["spec_sha256"] == spec_digest(spec)
    assert dynify.load(path).thresholds[0] == float("inf")


@pytest.mark.parametrize("conv", [10**8, 3])
def test_plan_that_does_not_fit_the_weights_allocates_nothing(saved, tmp_path, conv):
    """A head 10^8 channels wide would take 57 GB; the plan is built on the meta device first."""
    edit = lambda s: s["plan"]["exits"][0].update(conv=conv)  # noqa: E731
    bad = _mutated(saved, tmp_path / "wide.dyn", edit)
    with pytest.raises(ArtifactError, match=r"plan does not fit its weights \(heads\.0\."):
        dynify.load(bad)


def test_plan_asking_for_new_parts_larger_than_the_weights_is_refused(saved, tmp_path):
    def add_huge_exit(spec: dict) -> None:
        exits = spec["plan"]["exits"]
        exits.append({**exits[0], "node": "relu_16", "conv": 10**7})

    bad = _mutated(saved, tmp_path / "more.dyn", add_huge_exit)
    with pytest.raises(ArtifactError, match="plan does not fit its weights"):
        dynify.load(bad)
