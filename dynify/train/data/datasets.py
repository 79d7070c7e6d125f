"""The data set classes `load_dataset` returns: image files in a folder or zip, decoded on access,
and images already in one tensor; all expose `classes` and `targets` like torchvision's.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from dynify.errors import DataError
from dynify.train.data.images import open_rgb
from dynify.train.data.transforms import Transform

MAX_MEMBER_BYTES = 256 * 2**20  # one image file in a zip; refused above, before inflating
# Methods zipfile reads with the standard library alone: stored, deflate, bzip2, lzma.
ZIP_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
_UNREADABLE = (OSError, SyntaxError, ValueError)  # what PIL raises for broken files


def check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    """Refuse a zip member that cannot or should not be read, from the zip's directory alone."""
    problem = None
    if info.flag_bits & 0x1:
        problem = "is encrypted; dynify reads unencrypted archives only"
    elif info.compress_type not in ZIP_METHODS:
        problem = (
            f"uses compression method {info.compress_type}, which Python's zipfile cannot read "
            f"(it reads {', '.join(ZIP_METHODS.values())})"
        )
    elif info.file_size > MAX_MEMBER_BYTES:
        problem = (
            f"would inflate from {info.compress_size:,} to {info.file_size:,} bytes, more than "
            f"the {MAX_MEMBER_BYTES:,} bytes an image file may take"
        )
    if problem:
        raise DataError(
            f"{info.filename} in {archive} {problem}. Re-create the archive without it (e.g. "
            "`zip -r data.zip folder/`), or pass the extracted folder."
        )


def read_member(archive: zipfile.ZipFile, name: str, where: Path) -> bytes:
    """A member's bytes, never more than `MAX_MEMBER_BYTES` inflated whatever its header says."""
    info = archive.getinfo(name)
    check_member(info, where)
    with archive.open(info) as member:
        data = member.read(MAX_MEMBER_BYTES + 1)
    if len(data) > MAX_MEMBER_BYTES:
        raise DataError(
            f"{name} in {where} inflates to more than {MAX_MEMBER_BYTES:,} bytes although its "
            "header says less: the archive is damaged or crafted. Re-create it."
        )
    return data


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
                return open_rgb(f, str(full))
        except _UNREADABLE as e:
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
            data = read_member(self._archive(), path, self.path)
            return open_rgb(io.BytesIO(data), f"{path} in {self.path}")
        except (*_UNREADABLE, zipfile.BadZipFile, KeyError, RuntimeError, NotImplementedError) as e:
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
            clips = (
                " For clips (N, T, C, H, W), pass torch.utils.data.TensorDataset(clips, labels)."
                if images.ndim == 5
                else ""
            )
            raise DataError(
                f"Image tensors must be (N, C, H, W) or (N, H, W); got shape "
                f"{tuple(images.shape)}.{clips}"
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
