"""The .dyn artifact: identical outputs after a round trip; damaged files are refused."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

import dynify
from dynify.errors import ArtifactError, ExportError, ModelError
from dynify.models.cifar_resnet import cifar_resnet20
from tests.conftest import randomize_bn
from tests.test_early_exit import trained_heads


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet20.pt"
    torch.save({"state_dict": randomize_bn(cifar_resnet20()).state_dict()}, weights)
    dyn = trained_heads(dynify.convert("cifar_resnet20", weights=str(weights)))
    dyn.set_thresholds([0.3, 0.5, 0.7, 0.9])
    path = dynify.save(dyn, tmp_path / "model.dyn")
    return dyn, path


def test_round_trip_gives_identical_outputs(saved):
    dyn, path = saved
    loaded = dynify.load(path)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), dyn(x))
        assert torch.equal(loaded.last_exit, dyn.last_exit)
        with loaded.static(), dyn.static():
            assert torch.equal(loaded(x), dyn(x))
    assert loaded.thresholds.tolist() == pytest.approx([0.3, 0.5, 0.7, 0.9])
    assert loaded.spec["plan"] == dyn.spec["plan"]


def test_artifact_holds_spec_and_safetensors_only(saved):
    _, path = saved
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["spec.json", "weights.safetensors"]
        spec = json.loads(archive.read("spec.json"))
    assert spec["strategy"] == "early-exit" and spec["version"] == 1
    assert spec["model"]["kind"] == "builtin" and spec["model"]["name"] == "cifar_resnet20"
    assert spec["state"]["thresholds"] == pytest.approx([0.3, 0.5, 0.7, 0.9])


def test_truncated_file_is_refused(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    broken = tmp_path / "broken.dyn"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupted"):
        dynify.load(broken)


def _rewrite(path, out, spec_edit=None, weights_edit=None):
    with zipfile.ZipFile(path) as archive:
        spec = json.loads(archive.read("spec.json"))
        weights = archive.read("weights.safetensors")
    if spec_edit:
        spec_edit(spec)
    if weights_edit:
        weights = weights_edit(weights)
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("spec.json", json.dumps(spec))
        archive.writestr("weights.safetensors", weights)
    return out


def test_edited_weights_are_refused(saved, tmp_path):
    _, path = saved
    flip = lambda w: w[:-10] + bytes(b ^ 0xFF for b in w[-10:])  # noqa: E731
    edited = _rewrite(path, tmp_path / "edited.dyn", weights_edit=flip)
    with pytest.raises(ArtifactError, match="do not match the checksum"):
        dynify.load(edited)


def test_unknown_version_and_malformed_spec_are_refused(saved, tmp_path):
    _, path = saved
    future = _rewrite(path, tmp_path / "v9.dyn", spec_edit=lambda s: s.update(version=9))
    with pytest.raises(ArtifactError, match="format version 9"):
        dynify.load(future)
    no_plan = _rewrite(path, tmp_path / "noplan.dyn", spec_edit=lambda s: s.pop("plan"))
    with pytest.raises(ArtifactError, match="malformed 'plan'"):
        dynify.load(no_plan)


def test_module_artifact_needs_the_architecture(tiny_model, tmp_path):
    x = torch.randn(2, 3, 16, 16)
    dyn = trained_heads(dynify.convert(tiny_model, example_input=x[:1]))
    path = dynify.save(dyn, tmp_path / "tiny.dyn")
    with pytest.raises(ModelError, match="pass the architecture"):
        dynify.load(path)
    loaded = dynify.load(path, model=type(tiny_model)())
    with torch.no_grad():
        assert torch.equal(loaded(x), dyn(x))


# ---------------------------------------------------------------------------------------------
# Exports never destroy what was at their path
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_saved(tiny_model, tmp_path):
    x = torch.randn(2, 3, 16, 16)
    dyn = trained_heads(dynify.convert(tiny_model, example_input=x[:1]))
    path = dynify.save(dyn, tmp_path / "tiny.dyn")
    return dynify.load(path, model=type(tiny_model)()), path


def _strict_verify(monkeypatch, module, name):
    """Make the parity check fail: no difference, however small, is tolerated (atol < 0)."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: real(*a, **{**k, "atol": -1.0}))


def test_failed_onnx_export_leaves_the_existing_file_untouched(tiny_saved, tmp_path, monkeypatch):
    import dynify.export.onnx as onnx_export

    dyn, _ = tiny_saved
    target = tmp_path / "deployed.onnx"
    target.write_bytes(b"the deployed model")
    _strict_verify(monkeypatch, onnx_export, "verify_onnx")
    with pytest.raises(ExportError, match="does not match eager"):
        dynify.export_onnx(dyn, target)
    assert target.read_bytes() == b"the deployed model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed.onnx", "tiny.dyn"]


def test_onnx_exporter_error_leaves_the_existing_file_untouched(tiny_saved, tmp_path, monkeypatch):
    dyn, _ = tiny_saved
    target = tmp_path / "deployed.onnx"
    target.write_bytes(b"the deployed model")

    def broken_exporter(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken_exporter)
    with pytest.raises(ExportError):
        dynify.export_onnx(dyn, target)
    assert target.read_bytes() == b"the deployed model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed.onnx", "tiny.dyn"]


def test_failed_pt2_export_leaves_the_existing_file_untouched(tiny_saved, tmp_path, monkeypatch):
    import dynify.export as export

    dyn, _ = tiny_saved
    target = tmp_path / "deployed.pt2"
    target.write_bytes(b"the deployed program")
    _strict_verify(monkeypatch, export, "verify_pt2")
    with pytest.raises(ExportError, match="does not match eager"):
        dynify.export_pt2(dyn, target)
    assert target.read_bytes() == b"the deployed program"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed.pt2", "tiny.dyn"]


def test_export_over_its_own_artifact_or_a_dyn_name_is_refused(tiny_saved, tmp_path):
    dyn, path = tiny_saved
    before = path.read_bytes()
    for export in (dynify.export_onnx, dynify.export_pt2):
        with pytest.raises(ExportError, match="the artifact this model was loaded from"):
            export(dyn, path)
        with pytest.raises(ExportError, match=".dyn suffix"):
            export(dyn, tmp_path / "other.dyn")
    assert path.read_bytes() == before


def test_onnx_with_external_data_lands_whole_or_not_at_all(tmp_path):
    """Models above protobuf's 2 GB keep their weights in a side file; both are written aside."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from dynify.export.onnx import _onnx_output

    def model():  # fresh each time: saving moves the weights out of the proto
        weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32), "w")
        output = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4096])
        node = helper.make_node("Identity", ["w"], ["y"])
        return helper.make_model(helper.make_graph([node], "g", [], [output], [weight]))

    target = tmp_path / "big.onnx"
    target.write_bytes(b"old model")
    (tmp_path / "big.onnx.data").write_bytes(b"old data")
    with pytest.raises(RuntimeError), _onnx_output(target, large=True) as tmp:
        onnx.save_model(model(), tmp, save_as_external_data=True, location="big.onnx.data")
        raise RuntimeError("verification failed")
    assert target.read_bytes() == b"old model"
    assert (tmp_path / "big.onnx.data").read_bytes() == b"old data"
    with _onnx_output(target, large=True) as tmp:
        onnx.save_model(model(), tmp, save_as_external_data=True, location="big.onnx.data")
    loaded = onnx.load(str(target))
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), np.arange(4096))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
