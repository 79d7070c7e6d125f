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
from dynify.train.data.transforms import Transform


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
