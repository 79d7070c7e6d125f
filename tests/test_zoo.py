"""Model names and weights: what loads, and the errors for what does not."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from dynify import zoo
from dynify.errors import ModelError
from dynify.models.cifar_resnet import cifar_resnet20


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ModelError, match="Did you mean: .*resnet50"):
        zoo.build_model("resnt50", weights="random")


def test_weights_file_with_module_prefix_and_checkpoint_dict(tmp_path):
    source = cifar_resnet20()
    path = tmp_path / "ckpt.th"
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"best_prec1": 91.7, "state_dict": state}, path)
    model, ref = zoo.build_model("cifar_resnet20", weights=str(path))
    assert torch.equal(model.linear.weight, source.linear.weight)
    assert ref.weights == str(path) and ref.input_size == 32


def test_weights_of_the_wrong_architecture_name_the_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ModelError) as info:
        zoo.build_model("cifar_resnet20", weights=str(path))
    message = str(info.value)
    assert "missing keys: layer1.2.conv1.weight" in message
    assert "unexpected keys: layer2.0.downsample.0.weight" in message
    assert "shape mismatches: conv1.weight (file (64, 3, 7, 7), model (16, 3, 3, 3))" in message


def test_pickled_model_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), path)  # a pickled module, not a state dict
    with pytest.raises(ModelError, match="pickled whole models are refused"):
        zoo.build_model("cifar_resnet20", weights=str(path))


def test_offline_auto_falls_back_to_random_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    _model, ref = zoo.build_model("squeezenet1_0", weights="auto")
    assert ref.weights == "random" and any("RANDOM" in note for note in ref.notes)
    with pytest.raises(ModelError, match="--weights random"):
        zoo.build_model("squeezenet1_0", weights="pretrained")


def test_pretrained_weights_come_from_the_library_cache(monkeypatch, tmp_path):
    """The real torchvision loading path, fed from a cache file the test writes."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = torchvision.models.get_model_weights("squeezenet1_0").DEFAULT
    reference = torchvision.models.squeezenet1_0()
    os.makedirs(tmp_path / "checkpoints")
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / os.path.basename(weights.url))
    model, ref = zoo.build_model("squeezenet1_0", weights="pretrained", num_classes=7)
    assert ref.weights == "pretrained"
    assert torch.equal(model.features[0].weight, reference.features[0].weight)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    rebuilt = zoo.rebuild(ref)
    assert rebuilt(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_import_path_factory_and_timm_name():
    model, ref = zoo.build_model("dynify.models.cifar_resnet:cifar_resnet20", weights="random")
    assert ref.kind == "import" and sum(p.numel() for p in model.parameters()) > 0
    model, ref = zoo.build_model("resnet18", weights="random", num_classes=3)
    assert ref.kind == "torchvision" and model.fc.out_features == 3
    model, ref = zoo.build_model("timm:test_resnet.r160_in1k", weights="random")
    assert ref.kind == "timm" and ref.input_size == 160


def test_bad_import_path_is_a_clear_error():
    with pytest.raises(ModelError, match="package.module:factory"):
        zoo.build_model("no_such_pkg.mod:factory", weights="random")


def test_rebuild_takes_registry_names_offline_and_imports_only_what_is_trusted(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("rebuilding reached for the network")

    monkeypatch.setattr(socket, "socket", no_network)
    tv = zoo.rebuild(zoo.ModelRef("torchvision", "resnet18", num_classes=3))
    assert tv.fc.out_features == 3
    timm_model = zoo.rebuild(zoo.ModelRef("timm", "test_resnet.r160_in1k", num_classes=4))
    assert timm_model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    assert isinstance(zoo.rebuild(zoo.ModelRef("builtin", "cifar_resnet20")), torch.nn.Module)
    for kind, name in [
        ("timm", "hf-hub:someone/resnet18"),
        ("timm", "local-dir:/tmp/model"),
        ("torchvision", "dynify.models.cifar_resnet:cifar_resnet20"),
        ("builtin", "dynify.models.cifar_resnet:cifar_resnet20"),
        ("builtin", "resnet18"),
    ]:
        with pytest.raises(ModelError, match="not in dynify's built-ins"):
            zoo.rebuild(zoo.ModelRef(kind, name))
    path = "dynify.models.cifar_resnet:cifar_resnet20"
    with pytest.raises(ModelError, match=rf"trust_imports=\['{path}'\]"):
        zoo.rebuild(zoo.ModelRef("import", path))
    trusted = zoo.rebuild(zoo.ModelRef("import", path, num_classes=7), trust_imports=[path])
    assert trusted(torch.randn(1, 3, 32, 32)).shape == (1, 7)
