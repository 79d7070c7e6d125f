"""Decode a data set once into a uint8 tensor (optionally cached on disk): decoding small JPEGs
costs more than a small network's epoch on two cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from dynify.errors import DataError
from dynify.files import atomic_output
from dynify.train.data.datasets import TensorImageDataset
from dynify.train.data.loading import load_dataset
from dynify.train.data.splits import _classes_of


class MixedImageSizes(DataError):
    """Images of more than one size, which one tensor cannot hold."""


def _collate_uint8(batch: list[tuple[Any, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
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
    return images, torch.tensor([int(y) for _, y in batch])


def _size(image: torch.Tensor) -> str:
    return f"{image.shape[-1]} x {image.shape[-2]}"


def to_tensor_dataset(
    dataset: Dataset, *, num_workers: int = 0, batch_size: int = 500
) -> TensorImageDataset:
    """Decode every image once into a uint8 (N, C, H, W) tensor, for epochs without JPEG decoding.

    `dataset` must yield raw images (PIL or uint8 tensors, all one size), i.e. be loaded with
    `transform=None`. CIFAR-10's 50,000 training images take 150 MB. Images of different sizes
    raise `MixedImageSizes` naming two of them, whichever order the files come in.
    """
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_uint8
    )
    images, labels = [], []
    first: torch.Tensor | None = None
    for batch, y in loader:
        for offset, image in enumerate(batch):
            if first is None:
                first = image
            elif image.shape != first.shape:
                raise MixedImageSizes(
                    f"The images differ in size: image 0 is {_size(first)} pixels, image "
                    f"{len(labels) * batch_size + offset} is {_size(image)} (or they differ in "
                    "channels), so they cannot share one tensor. Resize them to one size on "
                    "disk, or keep the lazy data set, whose transforms resize every image."
                )
        images.append(torch.stack(batch))
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
    with atomic_output(cache) as tmp:
        torch.save(
            {"images": dataset.images, "targets": dataset.targets, "classes": dataset.classes},
            tmp,
        )
    return dataset
