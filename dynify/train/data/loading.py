"""`load_dataset`: one entry point that turns whatever the user already has (folder, zip,
torchvision name, tensors) into a labelled data set, checked against the model's classes.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import Dataset

from dynify.errors import DataError
from dynify.train.data.datasets import (
    ImageFolderDataset,
    TensorImageDataset,
    ZipImageFolder,
    check_member,
)
from dynify.train.data.layout import _folder_tree, _index, _resolve_root, _zip_tree
from dynify.train.data.transforms import Transform

# torchvision class name, and whether the class takes `split=` instead of `train=`.
_TORCHVISION_DATASETS = {
    "cifar10": ("CIFAR10", False),
    "cifar100": ("CIFAR100", False),
    "mnist": ("MNIST", False),
    "fashionmnist": ("FashionMNIST", False),
    "svhn": ("SVHN", True),
}

TEXT_SUFFIXES = (".tsv", ".txt", ".csv")

DataSource = str | os.PathLike | torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def data_home() -> Path:
    """Where named data sets are downloaded: `$DYNIFY_HOME/data`, else `~/.cache/dynify/data`."""
    home = os.environ.get("DYNIFY_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "dynify"
    return base / "data"


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
        elif path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
            raise DataError(
                f"{path} looks like a text file; text becomes token ids with the model's "
                "vocabulary: dynify.load_text_dataset(path, vocab, classes=...) returns a data "
                "set to pass instead of the path."
            )
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
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(
            f"{path} is not a readable zip archive ({e}). Re-create it (e.g. `zip -r data.zip "
            "folder/`) or pass the image folder itself."
        ) from e
    for info in members:
        _check_member_name(info.filename, path)
    tree = _zip_tree([info.filename for info in members])
    root = _resolve_root(tree, split, str(path))
    classes, samples = _index(tree, root, str(path), split is not None)
    by_name = {info.filename: info for info in members}
    for name, _ in samples:
        check_member(by_name[name], path)
    return ZipImageFolder(path, classes, samples, transform)


def _check_member_name(name: str, archive: Path) -> None:
    """Refuse absolute and `..` member names: they name files outside the archive's tree."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or "\0" in name or parts[0][1:2] == ":":
        raise DataError(
            f"{archive} holds a member named {name!r}, an absolute path or one that climbs out "
            "of the archive with '..'. Re-create the archive from the data folder itself "
            "(e.g. `cd data && zip -r ../data.zip .`)."
        )


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
