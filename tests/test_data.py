"""The data layer reads folders, zips, names and tensors alike, and splits them reproducibly."""

from __future__ import annotations

import io
import pickle
import struct
import urllib.error
import zipfile
import zlib
from pathlib import Path

import numpy as np
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


# --- files read right or refused -------------------------------------------------------------


def _png(width: int, height: int, depth: int, color: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand: any bit depth, and any size in the header whatever the data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _one_image_folder(root: Path, name: str, write) -> Path:
    (root / "cls").mkdir(parents=True)
    write(root / "cls" / name)
    return root


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    gray = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    root = _one_image_folder(tmp_path / "d", "g.png", lambda p: Image.fromarray(gray).save(p))
    assert Image.open(root / "cls" / "g.png").mode == "I;16"
    decoded = pixels(load_dataset(root)[0][0])
    expected = torch.from_numpy(np.rint(gray / 257.0).astype(np.uint8))
    assert torch.equal(decoded, expected.expand(3, 8, 8))
    assert len(decoded.unique()) > 40  # not all 255


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    values = np.array([[[65535, 0, 32896], [2570, 51400, 65535]]], dtype=">u2")
    data = _png(2, 1, 16, 2, [row.tobytes() for row in values])
    root = _one_image_folder(tmp_path / "d", "c.png", lambda p: p.write_bytes(data))
    decoded = pixels(load_dataset(root)[0][0])
    assert decoded[:, 0, :].T.tolist() == [[255, 0, 128], [10, 200, 255]]


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    root = _one_image_folder(tmp_path / "d", "f.tif", lambda p: Image.fromarray(values).save(p))
    decoded = pixels(load_dataset(root)[0][0])
    assert torch.equal(decoded[0], torch.from_numpy(np.rint(values * 255).astype(np.uint8)))
    assert int(decoded.max()) == 255 and int(decoded.min()) == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.full((4, 4), 300.0, np.float32), r"float pixels from 300 to 300.*\[0, 1\]"),
        (np.full((4, 4), np.nan, np.float32), "NaN or infinite"),
        (np.full((4, 4), 70_000, np.int32), "32-bit integer pixels"),
    ],
)
def test_images_outside_a_known_range_are_refused(tmp_path, values, message):
    root = _one_image_folder(tmp_path / "d", "x.tif", lambda p: Image.fromarray(values).save(p))
    dataset = load_dataset(root)
    with pytest.raises(DataError, match=message):
        dataset[0]


def test_decompression_bomb_is_a_data_error(tmp_path):
    bomb = _png(14000, 14000, 8, 0, [])  # 196 M pixels in a header of a few bytes
    root = _one_image_folder(tmp_path / "d", "bomb.png", lambda p: p.write_bytes(bomb))
    with pytest.raises(DataError, match="too large to decode") as info:
        load_dataset(root)[0]
    assert "bomb.png" in str(info.value)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w") as zf:
        zf.writestr("cls/bomb.png", bomb)
    with pytest.raises(DataError, match="too large to decode"):
        load_dataset(tmp_path / "bomb.zip")[0]


def test_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    import dynify.train.data.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)  # PIL itself would only warn
    root = _one_image_folder(tmp_path / "d", "a.png", lambda p: Image.new("RGB", (20, 20)).save(p))
    with pytest.raises(DataError, match="20 x 20 pixels"):
        load_dataset(root)[0]


@pytest.fixture
def opened_members(monkeypatch):
    opened = []
    original = zipfile.ZipFile.open

    def spy(self, name, mode="r", *args, **kwargs):
        if mode == "r":
            opened.append(getattr(name, "filename", name))
        return original(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return opened


def test_zip_member_over_the_size_limit_is_refused_before_inflating(
    tmp_path, monkeypatch, opened_members
):
    import dynify.train.data.datasets as datasets

    monkeypatch.setattr(datasets, "MAX_MEMBER_BYTES", 1_000_000)
    with zipfile.ZipFile(tmp_path / "big.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        zf.writestr("cls/small.png", buffer.getvalue())
        zf.writestr("cls/huge.png", bytes(3_000_000))  # 3 MB of zeros, a few kB in the zip
    assert (tmp_path / "big.zip").stat().st_size < 20_000
    with pytest.raises(DataError, match=r"cls/huge\.png .* would inflate .* 3,000,000 bytes"):
        load_dataset(tmp_path / "big.zip")
    assert "cls/huge.png" not in opened_members


@pytest.mark.parametrize("name", ["/cls/a.png", "../cls/a.png", "cls/../../a.png", "C:/cls/a.png"])
def test_absolute_or_climbing_member_names_are_refused(tmp_path, name):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("cls/ok.png", b"")
        zf.writestr(name, b"")
    with pytest.raises(DataError, match="absolute path or one that climbs") as info:
        load_dataset(tmp_path / "evil.zip")
    assert repr(name) in str(info.value)


def _patch_member(path: Path, name: str, *, method: int | None = None, flags: int | None = None):
    """Rewrite one member's compression method or flag bits in both of its zip headers."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        local = archive.getinfo(name).header_offset
    central = data.find(b"PK\x01\x02")
    while data[central + 46 : central + 46 + len(name)] != name.encode():
        central = data.find(b"PK\x01\x02", central + 4)
    for offset, field in ((local, 6), (central, 8)):
        if flags is not None:
            data[offset + field : offset + field + 2] = flags.to_bytes(2, "little")
        if method is not None:
            data[offset + field + 2 : offset + field + 4] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("patch", "message"),
    [({"flags": 1}, "is encrypted"), ({"method": 99}, "uses compression method 99")],
)
def test_encrypted_or_unknown_compression_members_are_refused(folder, tmp_path, patch, message):
    archive = zip_folder(folder, tmp_path / "data.zip")
    _patch_member(archive, "cat/002.png", **patch)
    with zipfile.ZipFile(archive) as zf, pytest.raises((RuntimeError, NotImplementedError)):
        zf.read("cat/002.png")  # the patch took: zipfile itself now fails
    with pytest.raises(DataError, match=rf"cat/002\.png in .*data\.zip {message}"):
        load_dataset(archive)


def test_symlink_loop_does_not_multiply_samples(folder):
    (folder / "cat" / "loop").symlink_to(folder)
    (folder / "dog" / "again").symlink_to(folder / "dog")
    dataset = load_dataset(folder)
    assert dataset.classes == CLASSES
    assert len(dataset) == sum(COUNTS.values())
    assert len({path for path, _ in dataset.samples}) == len(dataset)


def test_symlink_out_of_the_folder_is_refused(folder, tmp_path):
    (tmp_path / "elsewhere" / "cow").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "cow" / f"{i:03d}.png")
    (folder / "cat" / "outside").symlink_to(tmp_path / "elsewhere" / "cow")
    with pytest.raises(DataError, match=r"cat/outside is a symbolic link that leads outside"):
        load_dataset(folder)
    (folder / "cat" / "outside").unlink()
    (folder / "bird" / "x.png").symlink_to(tmp_path / "elsewhere" / "cow" / "000.png")
    with pytest.raises(DataError, match="leads outside"):
        load_dataset(folder)
    (folder / "bird" / "x.png").unlink()
    (folder / "bird" / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(DataError, match="broken"):
        load_dataset(folder)


def test_symlink_within_the_folder_is_followed(folder, tmp_path):
    (folder / "dog").rename(tmp_path / "dog")
    (folder / ".store").mkdir()
    (tmp_path / "dog").rename(folder / ".store" / "dog")
    (folder / "dog").symlink_to(folder / ".store" / "dog")
    dataset = load_dataset(folder)
    assert dataset.classes == CLASSES and len(dataset) == sum(COUNTS.values())


@pytest.mark.parametrize("small_first", [True, False])
def test_mixed_sizes_are_handled_alike_in_any_order(tmp_path, small_first):
    from types import SimpleNamespace

    from dynify.train.batches import open_data
    from dynify.train.data import MixedImageSizes

    root = tmp_path / "mixed"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i, size in enumerate((8, 80) if small_first else (80, 8)):
            Image.new("RGB", (size, size), (i * 50, 0, 0)).save(root / c / f"{i}.png")
    with pytest.raises(MixedImageSizes, match=r"8 x 8 pixels.* 80 x 80|80 x 80 pixels.* 8 x 8"):
        to_tensor_dataset(load_dataset(root))
    dataset = open_data(root, SimpleNamespace(num_classes=2))
    assert not isinstance(dataset, TensorImageDataset) and len(dataset) == 4
    resize = make_transforms(input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=False)
    assert {tuple(resize(dataset[i][0]).shape) for i in range(4)} == {(3, 32, 32)}
