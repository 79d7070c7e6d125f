"""The data layer reads folders, zips, names and tensors alike, and splits them reproducibly."""

from __future__ import annotations

import pickle
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from dynify.errors import DataError, DynifyError
from dynify.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TensorImageDataset,
    ZipImageFolder,
    data_home,
    load_dataset,
    make_transforms,
    normalize_batch,
    random_crop_flip,
    split_dataset,
    to_tensor_dataset,
    transforms_from_weights,
)

# Deliberately unsorted, with uneven sizes, so class order and stratification are visible.
COUNTS = {"dog": 10, "bird": 4, "cat": 6}
CLASSES = ["bird", "cat", "dog"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops gain nothing from threads, and stall badly when parallel jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_images(root: Path, counts: dict[str, int] = COUNTS, size: int = 8) -> None:
    """Class folders of small PNGs whose pixels encode (class, index), plus files to ignore."""
    for c, (name, n) in enumerate(sorted(counts.items())):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = torch.full((size, size, 3), 0, dtype=torch.uint8)
            pixels[..., 0], pixels[..., 1] = c * 40, i * 20
            pixels[0, 0, 2] = 255  # not uniform, so a flip or crop would show
            Image.fromarray(pixels.numpy()).save(folder / f"{i:03d}.png")
    (root / CLASSES[0] / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_text("hidden")


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def pixels(image) -> torch.Tensor:
    return v2.functional.pil_to_tensor(image)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_images(tmp_path / "images")
    return tmp_path / "images"


@pytest.fixture
def split_zip(tmp_path: Path) -> Path:
    """A zip laid out like the CIFAR archive: data/train/<class>/..., data/test/<class>/..."""
    write_images(tmp_path / "tree" / "train")
    write_images(tmp_path / "tree" / "test", {"dog": 2, "bird": 1, "cat": 1})
    return zip_folder(tmp_path / "tree", tmp_path / "data.zip", prefix="data/")


# --- folders and zips ------------------------------------------------------------------------


def test_folder_gives_sorted_classes_and_labels(folder):
    dataset = load_dataset(folder)
    assert dataset.classes == CLASSES
    assert dataset.class_to_idx == {"bird": 0, "cat": 1, "dog": 2}
    assert len(dataset) == 20
    assert torch.bincount(torch.tensor(dataset.targets)).tolist() == [4, 6, 10]
    image, label = dataset[4]
    assert label == 1 and image.mode == "RGB" and image.size == (8, 8)
    assert pixels(image)[0, 0, 0] == 40  # the first cat image, red channel encodes the class


def test_zip_equals_folder(folder, tmp_path):
    from_folder = load_dataset(folder)
    from_zip = load_dataset(zip_folder(folder, tmp_path / "flat.zip"))
    assert isinstance(from_zip, ZipImageFolder)
    assert from_zip.classes == from_folder.classes
    assert from_zip.targets == from_folder.targets
    for i in range(len(from_folder)):
        assert torch.equal(pixels(from_zip[i][0]), pixels(from_folder[i][0]))


def test_zip_split_by_full_path_or_unambiguous_tail(split_zip):
    full = load_dataset(split_zip, split="data/train")
    tail = load_dataset(split_zip, split="train")
    assert full.samples == tail.samples and len(full) == 20
    assert full.samples[0][0] == "data/train/bird/000.png"
    test = load_dataset(split_zip, split="test")
    assert len(test) == 4 and test.classes == CLASSES


def test_zip_of_splits_without_split_names_them(split_zip):
    with pytest.raises(DataError, match=r"several splits \(test, train\).*split="):
        load_dataset(split_zip)
    with pytest.raises(DataError, match=r"no folder named 'val'.*data/test, data/train"):
        load_dataset(split_zip, split="val")


def test_ambiguous_split_lists_candidates(tmp_path):
    write_images(tmp_path / "tree" / "a" / "train")
    write_images(tmp_path / "tree" / "b" / "train")
    with pytest.raises(DataError, match=r"several folders.*a/train, b/train"):
        load_dataset(tmp_path / "tree", split="train")
    assert len(load_dataset(tmp_path / "tree", split="b/train")) == 20


def test_wrapper_folder_in_zip_is_stepped_into(folder, tmp_path):
    dataset = load_dataset(zip_folder(folder, tmp_path / "wrapped.zip", prefix="mydata/"))
    assert dataset.classes == CLASSES and len(dataset) == 20


def test_zip_dataset_survives_pickling_and_workers(folder, tmp_path):
    dataset = load_dataset(zip_folder(folder, tmp_path / "w.zip"), transform=v2.PILToTensor())
    first = dataset[0][0]  # opens the archive in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[0][0], first)
    batches = list(DataLoader(dataset, batch_size=5, num_workers=2))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.tensor(dataset.targets))
    assert torch.equal(batches[0][0][0], first)


# --- errors ----------------------------------------------------------------------------------


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"is empty.*one subfolder per class"):
        load_dataset(tmp_path)


def test_class_folders_without_images(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images in them.*\.png"):
        load_dataset(tmp_path)


def test_one_empty_class_folder_is_named(folder):
    (folder / "emu").mkdir()
    with pytest.raises(DataError, match="hold no images: emu"):
        load_dataset(folder)


def test_images_without_class_folders(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(tmp_path)


def test_corrupt_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="not a readable zip archive") as info:
        load_dataset(bad)
    assert isinstance(info.value, DynifyError)


def test_corrupt_member_names_the_file(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
        zf.writestr("cls/broken.png", b"not a png")
    dataset = load_dataset(tmp_path / "m.zip")
    with pytest.raises(DataError, match=r"cls/broken\.png"):
        dataset[0]


def test_unknown_name_or_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"neither an existing folder.*cifar10, cifar100"):
        load_dataset("imagenet-21k-nope")
    with pytest.raises(DataError, match="neither"):
        load_dataset(tmp_path / "missing.zip")


def test_num_classes_mismatch(folder):
    assert len(load_dataset(folder, num_classes=3).classes) == 3
    with pytest.raises(DataError, match=r"Found 3 classes .*\(bird, cat, dog\).* has 10"):
        load_dataset(folder, num_classes=10)


# --- torchvision names, never touching the network -------------------------------------------


def test_download_failure_suggests_image_folder(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("DYNIFY_HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"Downloading cifar10 .* failed.*ImageFolder") as info:
        load_dataset("CIFAR-10")
    assert str(tmp_path / "data" / "cifar10") in str(info.value)


def test_named_dataset_gets_split_and_cache_dir(monkeypatch, tmp_path):
    calls = []

    class FakeSVHN:
        def __init__(self, root, **kwargs):
            calls.append((root, kwargs))
            self.labels = [3, 1]

    monkeypatch.setattr(torchvision.datasets, "SVHN", FakeSVHN)
    monkeypatch.setenv("DYNIFY_HOME", str(tmp_path))
    dataset = load_dataset("svhn", split="test", num_classes=10)
    assert calls == [
        (str(tmp_path / "data" / "svhn"), {"download": True, "transform": None, "split": "test"})
    ]
    assert dataset.targets == [3, 1] and len(dataset.classes) == 10
    assert data_home() == tmp_path / "data"
    with pytest.raises(DataError, match="splits train, test"):
        load_dataset("mnist", split="val")


# --- tensors ---------------------------------------------------------------------------------


def test_tensor_pair_and_unlabelled_tensor():
    images = torch.rand(6, 3, 4, 4)
    labelled = load_dataset((images, torch.tensor([0, 2, 1, 2, 0, 1])))
    assert labelled.classes == ["0", "1", "2"]
    assert torch.equal(labelled[1][0], images[1]) and labelled[1][1] == 2
    unlabelled = load_dataset(images)
    assert unlabelled.targets is None and unlabelled[0][1] == -1
    assert load_dataset(images, num_classes=5).classes == ["0", "1", "2", "3", "4"]
    with pytest.raises(DataError, match="A label is 2 but the model has 2 classes"):
        load_dataset((images, torch.tensor([0, 2, 1, 2, 0, 1])), num_classes=2)
    with pytest.raises(DataError, match="6 images but 2 labels"):
        load_dataset((images, torch.tensor([0, 1])))
    with pytest.raises(DataError, match="tensors have none"):
        load_dataset(images, split="train")


# --- calibration split -----------------------------------------------------------------------


def labelled_tensors(counts: list[int]) -> TensorImageDataset:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return TensorImageDataset(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels)


def test_split_is_stratified_disjoint_and_complete():
    dataset = labelled_tensors([40, 80, 120])
    fit, calibration = split_dataset(dataset, calibration_fraction=0.25, seed=3)
    assert torch.bincount(torch.tensor(calibration.targets)).tolist() == [10, 20, 30]
    assert torch.bincount(torch.tensor(fit.targets)).tolist() == [30, 60, 90]
    assert set(fit.indices).isdisjoint(calibration.indices)
    assert sorted(fit.indices + calibration.indices) == list(range(240))
    assert calibration.classes == ["0", "1", "2"]


def test_split_depends_only_on_seed():
    dataset = labelled_tensors([40, 80, 120])
    torch.manual_seed(1)
    first = split_dataset(dataset, 0.1, seed=7)[1].indices
    torch.manual_seed(2)
    again = split_dataset(dataset, 0.1, seed=7)[1].indices
    other = split_dataset(dataset, 0.1, seed=8)[1].indices
    assert first == again and first != other


def test_split_of_folder_keeps_labels(folder):
    dataset = load_dataset(folder)
    _, calibration = split_dataset(dataset, calibration_fraction=0.5, seed=0)
    assert torch.bincount(torch.tensor(calibration.targets)).tolist() == [2, 3, 5]
    assert [dataset.targets[i] for i in calibration.indices] == calibration.targets
    _, label = calibration[0]
    assert label == calibration.targets[0]


def test_split_without_labels_and_bad_fraction():
    fit, calibration = split_dataset(TensorImageDataset(torch.zeros(10, 1, 2, 2)), 0.3)
    assert len(calibration) == 3 and len(fit) == 7
    with pytest.raises(DataError, match="between 0 and 1"):
        split_dataset(labelled_tensors([5]), calibration_fraction=1.0)
    with pytest.raises(DataError, match="empty"):
        split_dataset(labelled_tensors([2, 2]), calibration_fraction=0.1)


# --- preloading and batch augmentation -------------------------------------------------------


def test_to_tensor_dataset_matches_lazy_decoding(folder):
    lazy = load_dataset(folder)
    decoded = to_tensor_dataset(lazy, batch_size=7)
    assert decoded.images.shape == (20, 3, 8, 8) and decoded.images.dtype == torch.uint8
    assert decoded.targets.tolist() == lazy.targets and decoded.classes == CLASSES
    for i in (0, 9, 19):
        assert torch.equal(decoded.images[i], pixels(lazy[i][0]))
    subset = to_tensor_dataset(split_dataset(lazy, 0.5)[1])
    assert subset.classes == CLASSES and len(subset) == 10


def test_to_tensor_dataset_refuses_transformed_data(folder):
    normalised = load_dataset(
        folder,
        transform=make_transforms(input_size=8, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=False),
    )
    with pytest.raises(DataError, match="transform=None"):
        to_tensor_dataset(normalised)


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (16, 3, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        crops = {
            (dy, dx, flip): padded[i, :, dy : dy + 6, dx : dx + 6].flip(-1)
            if flip
            else padded[i, :, dy : dy + 6, dx : dx + 6]
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
        }
        matches = [key for key, crop in crops.items() if torch.equal(crop, out[i])]
        assert len(matches) == 1
        flips += matches[0][2]
    assert 0 < flips < 16


def test_normalize_batch_scales_then_standardises():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize_batch(images, mean=(0.0, 0.5, 0.2), std=(1.0, 0.5, 0.1))
    assert out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)


# --- transforms ------------------------------------------------------------------------------


def test_small_eval_transform_only_normalises():
    image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    out = make_transforms(input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=False)(image)
    expected = normalize_batch(pixels(image)[None], IMAGENET_MEAN, IMAGENET_STD)[0]
    assert type(out) is torch.Tensor and torch.allclose(out, expected, atol=1e-6)
    train = make_transforms(input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=True)
    assert train(image).shape == (3, 32, 32)


def test_large_transforms_crop_to_input_size():
    image = Image.new("RGB", (300, 260))
    for train in (False, True):
        t = make_transforms(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=train)
        assert t(image).shape == (3, 224, 224)
    assert any(isinstance(s, v2.RandomResizedCrop) for s in t.transforms)


def test_transforms_from_weights_uses_metadata():
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    preset = transforms_from_weights(weights)
    assert list(preset.crop_size) == [224] and list(preset.resize_size) == [256]
    by_name = transforms_from_weights("ResNet18_Weights.IMAGENET1K_V1")
    assert list(by_name.mean) == list(IMAGENET_MEAN)
    train = transforms_from_weights(weights, train=True)
    assert train(Image.new("RGB", (300, 260))).shape == (3, 224, 224)
    assert transforms_from_weights(None)(Image.new("RGB", (300, 260))).shape == (3, 224, 224)
    with pytest.raises(DataError, match="not a torchvision weights name"):
        transforms_from_weights("NoSuch_Weights.X")


def test_cached_tensor_dataset_round_trips_without_unpickling(folder, tmp_path):
    from dynify.train.data import cached_tensor_dataset

    cache = tmp_path / "cache" / "train.pt"
    first = cached_tensor_dataset(folder, None, cache)
    assert cache.is_file()
    torch.load(cache, weights_only=True)  # plain tensors and strings only
    again = cached_tensor_dataset(folder, None, cache)
    assert torch.equal(again.images, first.images) and torch.equal(again.targets, first.targets)
    assert again.classes == first.classes == load_dataset(folder).classes
