"""Reproducible, stratified fit/calibration splits, so thresholds are never chosen on images
the model was fine-tuned on; labels are read without decoding images where possible.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from dynify.errors import DataError


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
