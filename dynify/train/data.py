"""Data sets for calibration, fine-tuning and evaluation, from whatever the user already has.

`load_dataset` accepts an ImageFolder directory, a `.zip` of one (read in place, member by member),
a torchvision data set name, or tensors. Folder and zip share one indexing routine, so the same
images give the same classes, order and labels either way. Decoding small JPEGs costs more than a
small network's epoch on two cores, so `to_tensor_dataset` decodes once into a uint8 tensor and
`random_crop_flip` augments whole batches of it (`dynify.train.batches` drives the epochs).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.transforms import v2

from dynify.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # up to this size, CIFAR-style augmentation; above, ImageNet-style

# torchvision class name, and whether the class takes `split=` instead of `train=`.
_TORCHVISION_DATASETS = {
    "cifar10": ("CIFAR10", False),
    "cifar100": ("CIFAR100", False),
    "mnist": ("MNIST", False),
    "fashionmnist": ("FashionMNIST", False),
    "svhn": ("SVHN", True),
}

Transform = Callable[[Any], Any]
DataSource = str | os.PathLike | torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def data_home() -> Path:
    """Where named data sets are downloaded: `$DYNIFY_HOME/data`, else `~/.cache/dynify/data`."""
    home = os.environ.get("DYNIFY_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "dynify"
    return base / "data"


# --- folder and zip layout -------------------------------------------------------------------


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


@dataclass
class _Tree:
    """Directories and image files of a folder or zip, as posix paths relative to its top."""

    children: dict[str, set[str]] = field(default_factory=lambda: {"": set()})
    images: dict[str, list[str]] = field(default_factory=dict)

    def add_dir(self, path: str) -> None:
        while path:
            parent, _, name = path.rpartition("/")
            self.children.setdefault(path, set())
            siblings = self.children.setdefault(parent, set())
            if name in siblings:
                return
            siblings.add(name)
            path = parent

    def add_file(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        self.add_dir(parent)
        if name.lower().endswith(IMAGE_EXTENSIONS):
            self.images.setdefault(parent, []).append(name)

    def subdirs(self, path: str) -> list[str]:
        return sorted(self.children.get(path, ()))

    def images_under(self, path: str) -> list[str]:
        prefix = path + "/"
        return sorted(
            _join(d, name)
            for d, names in self.images.items()
            if d == path or d.startswith(prefix)
            for name in names
        )


def _folder_tree(root: Path) -> _Tree:
    tree = _Tree()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        rel = Path(dirpath).relative_to(root).as_posix()
        rel = "" if rel == "." else rel
        tree.add_dir(rel)
        for name in filenames:
            if not _is_hidden(name):
                tree.add_file(_join(rel, name))
    return tree


def _zip_tree(names: Sequence[str]) -> _Tree:
    tree = _Tree()
    for name in names:
        if _is_hidden(name.rstrip("/")):
            continue
        if name.endswith("/"):
            tree.add_dir(name.rstrip("/"))
        else:
            tree.add_file(name)
    return tree


def _resolve_root(tree: _Tree, split: str | None, where: str) -> str:
    """The directory whose subfolders are the classes: `split` if given, else the unwrapped top.

    `split` may be a full relative path (`cifar10/train`) or any unambiguous tail of one (`train`).
    Without it, single wrapper folders (a zip of `mydata/`) are stepped into.
    """
    if split is not None:
        key = split.strip("/")
        if key in tree.children and key:
            return key
        matches = sorted(d for d in tree.children if d.endswith("/" + key))
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise DataError(
                f"split={split!r} matches several folders in {where}: {', '.join(matches)}. "
                "Pass the full path of the one you mean as split."
            )
        candidates = sorted({d.rpartition("/")[0] for d in tree.images if d})
        hint = (
            f" Folders holding class subfolders: {', '.join(candidates[:10])}."
            if candidates
            else ""
        )
        raise DataError(
            f"{where} has no folder named {split!r}.{hint} Pass one of them as split, or "
            "split=None to use the top level."
        )
    root = ""
    while len(tree.children[root]) == 1 and root not in tree.images:
        child = _join(root, next(iter(tree.children[root])))
        if child in tree.images:
            break
        root = child
    return root


def _index(
    tree: _Tree, root: str, where: str, split_given: bool
) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted subfolder names) and (path, label) samples under `root`."""
    shown = f"{where}/{root}" if root else where
    classes = tree.subdirs(root)
    if not classes:
        if root in tree.images:
            raise DataError(
                f"{shown} holds images but no class subfolders. Put each class's images in its "
                f"own subfolder ({shown}/<class name>/<image>); the sorted folder names give the "
                "label order."
            )
        raise DataError(
            f"{shown} is empty: it has no class subfolders. Point at a folder laid out as "
            "<folder>/<class name>/<image>, one subfolder per class."
        )
    per_class = {c: tree.images_under(_join(root, c)) for c in classes}
    looks_like_splits = not any(_join(root, c) in tree.images for c in classes) and all(
        tree.subdirs(_join(root, c)) for c in classes
    )
    if looks_like_splits and not split_given:
        raise DataError(
            f"{shown} looks like it holds several splits ({', '.join(classes)}), each with "
            f"its own class subfolders. Choose one with split, e.g. split={classes[-1]!r}."
        )
    empty = [c for c, files in per_class.items() if not files]
    if len(empty) == len(classes):
        raise DataError(
            f"{shown} has class subfolders ({', '.join(classes[:10])}) but no images in them. "
            f"Image files must end in one of {', '.join(IMAGE_EXTENSIONS)}."
        )
    if empty:
        raise DataError(
            f"These class folders in {shown} hold no images: {', '.join(empty)}. Remove them or "
            "add images: every subfolder is a class, and an empty class would shift the labels."
        )
    samples = [(path, label) for label, c in enumerate(classes) for path in per_class[c]]
    return classes, samples


# --- datasets --------------------------------------------------------------------------------


class _ImageFileDataset(Dataset):
    """ImageFolder-compatible attributes: `classes`, `class_to_idx`, `samples`, `targets`."""

    def __init__(
        self, classes: list[str], samples: list[tuple[str, int]], transform: Transform | None
    ):
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = self._load(path)
        return (self.transform(image) if self.transform else image), label

    def _load(self, path: str) -> Image.Image:
        raise NotImplementedError

    def __repr__(self) -> str:
        where = getattr(self, "root", None) or getattr(self, "path", None)
        size = f"{len(self)} images, {len(self.classes)} classes"
        return f"{type(self).__name__}({str(where)!r}, {size})"


class ImageFolderDataset(_ImageFileDataset):
    """Images in `root/<class>/...`, decoded to RGB on access."""

    def __init__(
        self,
        root: Path,
        classes: list[str],
        samples: list[tuple[str, int]],
        transform: Transform | None = None,
    ):
        super().__init__(classes, samples, transform)
        self.root = root

    def _load(self, path: str) -> Image.Image:
        full = self.root / path
        try:
            with open(full, "rb") as f:
                return Image.open(f).convert("RGB")
        except OSError as e:
            raise DataError(f"Cannot read image {full}: {e}. Replace or remove the file.") from e


class ZipImageFolder(_ImageFileDataset):
    """Images read member by member from a zip, never extracted.

    The archive is opened lazily in each process, so DataLoader workers (fork or spawn) each get
    their own handle instead of sharing one file offset.
    """

    def __init__(
        self,
        path: Path,
        classes: list[str],
        samples: list[tuple[str, int]],
        transform: Transform | None = None,
    ):
        super().__init__(classes, samples, transform)
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def _load(self, path: str) -> Image.Image:
        try:
            data = self._archive().read(path)
            return Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            raise DataError(
                f"Cannot read {path} from {self.path}: {e}. The archive is damaged or changed "
                "since it was indexed; re-create it or pass the extracted folder."
            ) from e

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None, "_pid": -1}


class TensorImageDataset(Dataset):
    """Images in one (N, C, H, W) tensor, with optional labels.

    Without labels, `targets` is None and items are `(image, -1)`. `classes` are the label
    indices as strings unless names are given.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | None = None,
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
    ):
        images = torch.as_tensor(images)
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4:
            raise DataError(
                f"Image tensors must be (N, C, H, W) or (N, H, W); got shape {tuple(images.shape)}."
            )
        if targets is not None:
            targets = torch.as_tensor(targets).long().flatten()
            if len(targets) != len(images):
                raise DataError(
                    f"Got {len(images)} images but {len(targets)} labels; pass one label per image."
                )
            if len(targets) and targets.min() < 0:
                raise DataError("Labels must be class indices 0, 1, ...; found a negative label.")
        if classes is None:
            count = int(targets.max()) + 1 if targets is not None and len(targets) else 0
            classes = [str(i) for i in range(count)]
        self.images = images
        self.targets = targets
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        label = -1 if self.targets is None else int(self.targets[index])
        return (self.transform(image) if self.transform else image), label

    def __repr__(self) -> str:
        return f"TensorImageDataset({tuple(self.images.shape)}, {len(self.classes)} classes)"


# --- loading ---------------------------------------------------------------------------------


def load_dataset(
    source: DataSource,
    *,
    split: str | None = None,
    transform: Transform | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """A labelled image data set from a folder, a `.zip`, a torchvision name or tensors.

    - folder or `.zip` in ImageFolder layout (`<class>/<image>`; sorted names give labels).
      `split` picks a subfolder by full path (`cifar10/train`) or unambiguous tail (`train`).
    - `cifar10`, `cifar100`, `mnist`, `fashionmnist`, `svhn`: downloaded into `data_home()`;
      `split` is `train` (default) or `test` (`extra` for SVHN).
    - `images` or `(images, labels)` tensors; without labels, items are `(image, -1)`.

    Items are `(transform(image), label)`; images are RGB PIL images (folder, zip, torchvision)
    or tensors. `num_classes`, if given, must match the classes found.
    """
    if isinstance(source, torch.Tensor | tuple | list):
        if split is not None:
            raise DataError(
                f"split={split!r} selects a subfolder or a named data set's part; tensors have "
                "none. Split the tensors yourself, or use split_dataset."
            )
        dataset: Dataset = _from_tensors(source, transform, num_classes)
    elif isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if path.is_dir():
            dataset = _from_folder(path, split, transform)
        elif path.is_file():
            dataset = _from_zip(path, split, transform)
        elif _dataset_key(str(source)) in _TORCHVISION_DATASETS:
            dataset = _from_torchvision(_dataset_key(str(source)), split, transform)
        else:
            raise DataError(
                f"{str(source)!r} is neither an existing folder or .zip file nor a data set name "
                f"dynify knows ({', '.join(_TORCHVISION_DATASETS)}). Check the path, or pass a "
                "folder of class subfolders of images."
            )
    else:
        raise DataError(
            f"Cannot load data from a {type(source).__name__}. Pass a folder or .zip path, a "
            "data set name, an image tensor or an (images, labels) pair of tensors."
        )
    _check_num_classes(dataset, num_classes, source)
    return dataset


def _dataset_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _from_folder(path: Path, split: str | None, transform: Transform | None) -> ImageFolderDataset:
    tree = _folder_tree(path)
    root = _resolve_root(tree, split, str(path))
    classes, samples = _index(tree, root, str(path), split is not None)
    return ImageFolderDataset(path, classes, samples, transform)


def _from_zip(path: Path, split: str | None, transform: Transform | None) -> ZipImageFolder:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(
            f"{path} is not a readable zip archive ({e}). Re-create it (e.g. `zip -r data.zip "
            "folder/`) or pass the image folder itself."
        ) from e
    tree = _zip_tree(names)
    root = _resolve_root(tree, split, str(path))
    classes, samples = _index(tree, root, str(path), split is not None)
    return ZipImageFolder(path, classes, samples, transform)


def _from_tensors(
    source: Any, transform: Transform | None, num_classes: int | None
) -> TensorImageDataset:
    if isinstance(source, tuple | list):
        if len(source) != 2:
            raise DataError(
                f"Pass tensors as images or (images, labels); got a sequence of {len(source)}."
            )
        images, labels = source
    else:
        images, labels = source, None
    classes = None if num_classes is None else [str(i) for i in range(num_classes)]
    if labels is not None and num_classes is not None and len(labels):
        top = int(torch.as_tensor(labels).max())
        if top >= num_classes:
            raise DataError(
                f"A label is {top} but the model has {num_classes} classes (labels 0 to "
                f"{num_classes - 1}). Remap the labels or use a model with a matching head."
            )
    return TensorImageDataset(images, labels, classes, transform)


def _from_torchvision(key: str, split: str | None, transform: Transform | None) -> Dataset:
    class_name, uses_split = _TORCHVISION_DATASETS[key]
    split = split or "train"
    allowed = ("train", "test", "extra") if uses_split else ("train", "test")
    if split not in allowed:
        raise DataError(f"{key} has splits {', '.join(allowed)}; got split={split!r}.")
    root = data_home() / key
    factory = getattr(torchvision.datasets, class_name)
    kwargs = {"split": split} if uses_split else {"train": split == "train"}
    try:
        dataset = factory(str(root), download=True, transform=transform, **kwargs)
    except (OSError, RuntimeError) as e:
        raise DataError(
            f"Downloading {key} into {root} failed ({e}). Without network access, pass an "
            "image folder or .zip in ImageFolder layout (<class>/<image>) instead, or put the "
            "files torchvision expects in that folder (set DYNIFY_HOME to move it)."
        ) from e
    if not hasattr(dataset, "targets"):  # SVHN names them `labels` and has no class names
        dataset.targets = [int(y) for y in dataset.labels]
        dataset.classes = [str(i) for i in range(10)]
    return dataset


def _check_num_classes(dataset: Dataset, num_classes: int | None, source: Any) -> None:
    classes = getattr(dataset, "classes", None)
    if num_classes is None or classes is None or len(classes) == num_classes:
        return
    where = source if isinstance(source, str | os.PathLike) else "the tensors"
    names = ", ".join(map(str, classes[:12])) + (", ..." if len(classes) > 12 else "")
    raise DataError(
        f"Found {len(classes)} classes in {where} ({names}) but the model has {num_classes}. "
        "Point at the folder whose subfolders are exactly the model's classes, or use a model "
        "whose head has as many outputs as the data has classes."
    )


# --- transforms ------------------------------------------------------------------------------


def make_transforms(
    *, input_size: int, mean: Sequence[float], std: Sequence[float], train: bool
) -> v2.Compose:
    """Standard augmentation (train) or resize-and-crop (eval), then float and normalise.

    Up to 64 px the CIFAR recipe applies: pad-and-crop plus flip for training, nothing for eval
    beyond resizing images that are not already `input_size`. Larger inputs get ImageNet's
    RandomResizedCrop plus flip, or resize to size/0.875 and centre crop.
    """
    if input_size < 1:
        raise DataError(f"input_size must be a positive number of pixels, got {input_size}.")
    if input_size <= SMALL_IMAGE_MAX:
        if train:
            geometry = [
                v2.Resize(input_size),
                v2.RandomCrop(input_size, padding=input_size // 8),
                v2.RandomHorizontalFlip(),
            ]
        else:
            geometry = [v2.Resize(input_size), v2.CenterCrop(input_size)]
    elif train:
        geometry = [v2.RandomResizedCrop(input_size), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(round(input_size / 0.875)), v2.CenterCrop(input_size)]
    return v2.Compose(
        [
            v2.ToImage(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ]
    )


def transforms_from_weights(weights: Any, *, train: bool = False) -> Transform:
    """The preprocessing a torchvision weights entry was trained with.

    `weights` is a `WeightsEnum` member or its name (`"ResNet18_Weights.IMAGENET1K_V1"`). For
    eval this is exactly `weights.transforms()`; for training, `make_transforms` at the weights'
    crop size, mean and std. With `weights=None` (models without such metadata, e.g. timm or your
    own) the fallback is ImageNet's mean and std at 224 px.
    """
    if weights is None:
        return make_transforms(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, train=train)
    if isinstance(weights, str):
        try:
            weights = torchvision.models.get_weight(weights)
        except (ValueError, KeyError, AttributeError) as e:
            raise DataError(
                f"{weights!r} is not a torchvision weights name ({e}). Use the form "
                "'ResNet18_Weights.IMAGENET1K_V1', or pass mean, std and size to make_transforms."
            ) from e
    preset = weights.transforms() if callable(getattr(weights, "transforms", None)) else None
    crop = getattr(preset, "crop_size", None)
    if preset is None or not crop:
        raise DataError(
            f"{weights!r} carries no image-classification preprocessing. Pass mean, std and "
            "input size to make_transforms instead."
        )
    if not train:
        return preset
    return make_transforms(input_size=crop[0], mean=preset.mean, std=preset.std, train=True)


# --- calibration split -----------------------------------------------------------------------


def _classes_of(dataset: Dataset) -> list[str] | None:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "classes", None)


class LabeledSubset(Subset):
    """A `Subset` that still exposes its parent's `classes` and its own `targets`."""

    @property
    def classes(self) -> list[str] | None:
        return _classes_of(self.dataset)

    @property
    def targets(self) -> list[int] | None:
        labels = dataset_targets(self.dataset)
        return None if labels is None else labels[self.indices].tolist()


def dataset_targets(dataset: Dataset) -> torch.Tensor | None:
    """All labels as a tensor when the data set knows them without decoding images, else None."""
    if isinstance(dataset, Subset):
        inner = dataset_targets(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    else:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    return None if len(labels) and bool((labels < 0).all()) else labels


def split_dataset(
    dataset: Dataset, calibration_fraction: float = 0.1, seed: int = 0
) -> tuple[LabeledSubset, LabeledSubset]:
    """Split into (fit, calibration) parts: disjoint, reproducible, stratified by label.

    The calibration part is for choosing thresholds and must never be trained on. Each class
    contributes round(fraction * its size) images, keeping at least one for fitting. Without
    cheaply known labels (`targets`), the split is a plain random one. The same seed always
    gives the same split, whatever the global torch RNG state.
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise DataError(
            f"calibration_fraction must be between 0 and 1 exclusive, got {calibration_fraction}."
        )
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    labels = dataset_targets(dataset)
    if labels is None:
        count = min(n - 1, int(calibration_fraction * n + 0.5))
        calibration = order[:count]
    else:
        shuffled = labels[order]
        parts = []
        for label in torch.unique(labels):
            members = order[shuffled == label]
            count = min(len(members) - 1, int(calibration_fraction * len(members) + 0.5))
            parts.append(members[:count])
        calibration = torch.cat(parts) if parts else order[:0]
    if len(calibration) == 0:
        raise DataError(
            f"A calibration fraction of {calibration_fraction} of {n} images leaves the "
            "calibration part empty. Use a larger fraction or more data."
        )
    in_calibration = torch.zeros(n, dtype=torch.bool)
    in_calibration[calibration] = True
    fit_idx = torch.nonzero(~in_calibration).flatten().tolist()
    calibration_idx = torch.nonzero(in_calibration).flatten().tolist()
    return LabeledSubset(dataset, fit_idx), LabeledSubset(dataset, calibration_idx)


# --- decoded tensors and batch augmentation --------------------------------------------------


def _collate_uint8(batch: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = []
    for image, _ in batch:
        if isinstance(image, Image.Image):
            image = v2.functional.pil_to_tensor(image)
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
            raise DataError(
                f"to_tensor_dataset decodes raw images, but the data set yields "
                f"{getattr(image, 'dtype', type(image).__name__)}. "
                "Load it with transform=None and transform the batches instead."
            )
        images.append(image)
    if len({tuple(im.shape) for im in images}) > 1:
        raise DataError(
            f"Images differ in size ({sorted({tuple(im.shape) for im in images})[:4]}), so they "
            "cannot share one tensor. Resize them on disk, or keep the lazy data set."
        )
    return torch.stack(images), torch.tensor([int(y) for _, y in batch])


def to_tensor_dataset(
    dataset: Dataset, *, num_workers: int = 0, batch_size: int = 500
) -> TensorImageDataset:
    """Decode every image once into a uint8 (N, C, H, W) tensor, for epochs without JPEG decoding.

    `dataset` must yield raw images (PIL or uint8 tensors, all one size), i.e. be loaded with
    `transform=None`. CIFAR-10's 50,000 training images take 150 MB.
    """
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_uint8
    )
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
    if not images:
        raise DataError("The data set is empty; there is nothing to decode.")
    targets = torch.cat(labels)
    classes = _classes_of(dataset)
    return TensorImageDataset(
        torch.cat(images), None if bool((targets < 0).all()) else targets, classes
    )


def cached_tensor_dataset(source: Any, split: str | None, cache: str | Path) -> TensorImageDataset:
    """`to_tensor_dataset(load_dataset(source, split=split))`, decoded once and kept in `cache`.

    The cache holds plain tensors and class names, read back with `weights_only=True`: nothing
    is unpickled, so a cache file from elsewhere cannot run code.
    """
    cache = Path(cache)
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return TensorImageDataset(saved["images"], saved["targets"], saved["classes"])
    dataset = to_tensor_dataset(load_dataset(source, split=split))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(cache.suffix + ".tmp")
    torch.save(
        {"images": dataset.images, "targets": dataset.targets, "classes": dataset.classes}, tmp
    )
    os.replace(tmp, cache)
    return dataset


def random_crop_flip(
    images: torch.Tensor, *, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image random crop from a zero-padded copy plus random horizontal flip, in one gather."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    rows = torch.arange(h).expand(n, h) + dy
    batch = torch.arange(n)[:, None, None]
    # Advanced indices around the channel slice put the batch, row and column axes first.
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 images to float32, scaled to [0, 1] then normalised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
