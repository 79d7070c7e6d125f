"""Preprocessing: per-image pipelines for lazy data sets, and whole-batch augmentation and
normalisation for decoded uint8 tensors, where per-image transforms cost more than the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torchvision.transforms import v2

from dynify.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # up to this size, CIFAR-style augmentation; above, ImageNet-style

Transform = Callable[[Any], Any]


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
