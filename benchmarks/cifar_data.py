"""The JPEG CIFAR-10 and pretrained CIFAR ResNets of the shared data folder, for the suites.

`--data` is a folder holding `cifar10-jpeg.zip` (ImageFolder layout, splits `cifar10/train`
and `cifar10/test`) and `pretrained/resnet{20,32,44}-*.th` (see that folder's README). The
images are decoded once into uint8 tensors (cached next to `--cache`); the calibration split is
a seeded, stratified 10 % of `cifar10/train` (what `dynify.finetune` holds out), and nothing is
ever fitted on `cifar10/test`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from dynify import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    cached_tensor_dataset,
    normalize_batch,
    split_dataset,
)

WEIGHTS = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th"}
# the normalisation the pretrained weights were trained with (the data README)
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
INPUT_SIZE = 32
DEFAULT_CACHE = Path("/tmp/dynify-cifar10-uint8.pt")


def weights_path(data: Path, depth: int) -> str:
    return str(data / "pretrained" / WEIGHTS[depth])


def load_cifar(data: Path, cache: Path = DEFAULT_CACHE) -> tuple[Dataset, Dataset]:
    """CIFAR-10 train and test as uint8 tensor data sets, decoded from the zip once."""
    archive = data / "cifar10-jpeg.zip"
    key = hashlib.sha1(str(archive.resolve()).encode()).hexdigest()[:8]
    train = cached_tensor_dataset(archive, "cifar10/train", cache.with_suffix(f".{key}.train.pt"))
    test = cached_tensor_dataset(archive, "cifar10/test", cache.with_suffix(f".{key}.test.pt"))
    return train, test


def fit_and_calibration(
    train: Dataset, seed: int, train_images: int = 0, calib_images: int = 0
) -> tuple[Dataset, Dataset]:
    """The fit part (a seeded subset of `train_images` of it, if given) and the held-out
    calibration part (`calib_images` of it spread over every class, if given) of
    `cifar10/train`."""
    fit, calib = split_dataset(train, 0.1, seed=seed)
    if train_images and train_images < len(fit):
        order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed))
        fit = Subset(fit, order[:train_images].tolist())
    if calib_images and calib_images < len(calib):
        calib = subsample(calib, calib_images)
    return fit, calib


def subsample(dataset: Dataset, limit: int) -> Dataset:
    """`limit` items evenly spaced over the whole data set: an image folder is sorted by class,
    so a prefix or a truncated stride would leave the last classes out."""
    if not limit or limit >= len(dataset):
        return dataset
    return Subset(dataset, [i * len(dataset) // limit for i in range(limit)])


def _items(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([torch.as_tensor(img) for img, _ in items])
    return images, torch.tensor([int(label) for _, label in items])


def normalized_images(dataset: Dataset) -> torch.Tensor:
    """The images of a uint8 image data set as the networks' inputs (scaled, normalised)."""
    return normalize_batch(_items(dataset)[0], MEAN, STD)


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (eval mode) on a labelled uint8 image data set."""
    model.eval()
    images, labels = _items(dataset)
    hits = 0
    for start in range(0, len(images), batch_size):
        x = normalize_batch(images[start : start + batch_size], MEAN, STD)
        hits += int((model(x).argmax(-1) == labels[start : start + batch_size]).sum())
    return hits / len(labels)
