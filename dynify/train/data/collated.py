"""A user's DataLoader with its own `collate_fn`, read the way the user's model is fed.

Text pipelines usually keep raw or ragged items in the data set and pad each batch to its
longest text in a `collate_fn`. dynify cannot iterate such a loader as it is and still draw
deterministic epochs, hold out a calibration share, resume mid-epoch or give each DDP rank its
slice; so it keeps the loader's data set and its `collate_fn` (`CollatedDataset`), draws the
samples of each batch itself, and lets the user's `collate_fn` make the batch from them.
`split_batch` reads what a `collate_fn` returns: `inputs` alone or `(inputs, labels)`, inputs
being token ids `[B, T]` or `(ids, lengths | mask)`; `(ids, lengths | mask, labels)` too; and a
tokenizer's dict (Hugging Face style: `input_ids`, `attention_mask`, `labels` or `label`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, default_collate

from dynify.errors import DataError
from dynify.train.data.splits import dataset_targets

Collate = Callable[[list[Any]], Any]


class CollatedDataset(Dataset):
    """The items of a DataLoader's data set, batched by its `collate_fn`. Splitting it (a
    `Subset`) keeps the `collate_fn`: `collate_of` finds it under any number of subsets."""

    def __init__(self, dataset: Dataset, collate_fn: Collate):
        self.dataset, self.collate_fn = dataset, collate_fn

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.dataset, "classes", None)

    @property
    def targets(self) -> torch.Tensor | None:
        return dataset_targets(self.dataset)  # lets split_dataset stratify without collating

    def first_batch(self) -> Any:
        """The `collate_fn`'s batch of the first item."""
        return self.collate_fn([self.dataset[0]])


def collate_of(dataset: Dataset) -> Collate | None:
    """The user's `collate_fn` of a (split) `CollatedDataset`, else None (default batching)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset.collate_fn if isinstance(dataset, CollatedDataset) else None


_REBUILD = (
    "DataLoader(loader.dataset, batch_size=32, collate_fn=loader.collate_fn), a loader that "
    "batches a map-style data set"
)


def loader_dataset(loader: DataLoader) -> Dataset:
    """What dynify reads a DataLoader as: its data set, with its `collate_fn` when it has its
    own. The loader's order, batch size and batch sampler are not used: dynify draws its own
    batches (a deterministic order per epoch, the held-out split, resuming, one slice per DDP
    rank), of the size the stage is given."""
    if isinstance(loader.dataset, IterableDataset):
        raise DataError(
            "The DataLoader reads an IterableDataset, whose items dynify cannot draw by index "
            "(to shuffle per epoch, hold out a calibration share or resume mid-epoch). Put its "
            "items in a map-style data set (with __getitem__ and __len__; a list will do) and "
            "pass DataLoader(items, batch_size=32, collate_fn=loader.collate_fn)."
        )
    if loader.batch_sampler is None:  # batch_size=None without a batch_sampler
        raise DataError(
            "The DataLoader has batch_size=None, so each item of its data set is a batch "
            "already; dynify draws its own batches from the data set's samples, by index. "
            f"Pass {_REBUILD} of single samples: your collate_fn still makes every batch."
        )
    if loader.collate_fn is default_collate and not _holds_dicts(loader.dataset):
        return loader.dataset
    # a tokenizer's dict items are batched by the loader's collate_fn, default_collate included
    return CollatedDataset(loader.dataset, loader.collate_fn)


def _holds_dicts(dataset: Dataset) -> bool:
    return len(dataset) > 0 and isinstance(dataset[0], Mapping)  # type: ignore[arg-type]


# A tokenizer's dict batch: the keys read (others, such as token_type_ids, are not)
IDS_KEY, MASK_KEY, LABEL_KEYS = "input_ids", "attention_mask", ("labels", "label")


class IdsWithMask(tuple):
    """`(ids, attention_mask)` of a tokenizer's dict batch. Unlike a pair the user built, the
    mask is the tokenizer's by-product: a model that takes a mask or lengths gets them from it,
    and a model that takes the ids alone reads its padding from the ids."""

    __slots__ = ()


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, labels) of what a `collate_fn` returned; labels -1 when it gives none.

    `ids`; `(inputs, labels)` with inputs `ids` or `(ids, lengths | mask)`; `(ids, mask)` (a
    second tensor [B, T] is a mask, not labels); `(ids, lengths | mask, labels)`. A pair of a
    tensor and a [B] tensor is (inputs, labels): give unlabelled lengths as `((ids, lengths),)`.
    """
    if isinstance(batch, torch.Tensor):
        return batch, _no_labels(batch)
    if isinstance(batch, Mapping):
        return _split_mapping(batch)
    items = tuple(batch) if isinstance(batch, tuple | list) else None
    if items is not None and len(items) == 1 and _is_inputs(items[0]):
        inputs = items[0]
        return _as_inputs(inputs), _no_labels(_first(inputs))
    if items is not None and len(items) == 2 and _is_inputs(items[0]):
        first, second = items
        if _is_tensor(first) and _is_tensor(second) and _is_mask_of(second, first):
            return (first, second), _no_labels(first)
        return _as_inputs(first), _labels(second, _first(first))
    if items is not None and len(items) == 3 and all(_is_tensor(t) for t in items):
        ids, extra, labels = items
        return (ids, extra), _labels(labels, ids)
    raise DataError(
        f"The DataLoader's collate_fn returned {_describe(batch)}; dynify reads a batch of "
        "token ids [B, T], (ids, labels), ((ids, lengths or mask), labels) or (ids, lengths or "
        "mask, labels), with labels a tensor [B] of class indices, or a tokenizer's dict "
        f"({IDS_KEY!r}, optionally {MASK_KEY!r} and 'labels'). Make the collate_fn return one "
        "of these."
    )


def _split_mapping(batch: Mapping) -> tuple[Any, torch.Tensor]:
    """A tokenizer's dict: `input_ids` [B, T], `attention_mask` [B, T] and `labels` (or
    `label`) [B] when given."""
    ids = batch.get(IDS_KEY)
    if not _is_tensor(ids) or ids.dim() != 2 or ids.is_floating_point():
        raise DataError(
            f"The DataLoader's collate_fn returned a dict with keys {sorted(map(str, batch))}; "
            f"dynify reads a dict batch by its {IDS_KEY!r}, token ids [B, T] (with "
            f"{MASK_KEY!r} [B, T] and 'labels' [B] if you have them), as a tokenizer returns "
            "with return_tensors='pt'. Make the collate_fn return those keys."
        )
    label_key = next((k for k in LABEL_KEYS if k in batch), None)
    labels = _no_labels(ids) if label_key is None else _labels(batch[label_key], ids)
    mask = batch.get(MASK_KEY)
    if mask is None:
        return ids, labels
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(ids.shape):
        raise DataError(
            f"The dict batch's {MASK_KEY!r} is {list(mask.shape)}, its {IDS_KEY!r} "
            f"{list(ids.shape)}: give one mask entry per token."
        )
    return IdsWithMask((ids, mask)), labels


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _is_inputs(x: Any) -> bool:
    if _is_tensor(x):
        return x.dim() >= 1
    return isinstance(x, tuple | list) and len(x) == 2 and all(_is_tensor(t) for t in x)


def _as_inputs(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


def _first(x: Any) -> torch.Tensor:
    return x if _is_tensor(x) else x[0]


def _is_mask_of(second: torch.Tensor, ids: torch.Tensor) -> bool:
    return second.dim() == 2 and ids.dim() >= 2 and tuple(second.shape) == tuple(ids.shape[:2])


def _no_labels(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), -1, dtype=torch.long)


def _labels(labels: Any, ids: torch.Tensor) -> torch.Tensor:
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        labels = None
    if labels is None or labels.is_floating_point() or labels.shape != (ids.shape[0],):
        raise DataError(
            f"The DataLoader's collate_fn returned labels that are not a tensor of "
            f"{ids.shape[0]} class indices (one per text of the batch); make it return "
            "(inputs, labels) with labels an integer tensor [B]."
        )
    return labels.long()


def _describe(x: Any) -> str:
    if _is_tensor(x):
        return f"a tensor {list(x.shape)}"
    if isinstance(x, tuple | list):
        inner = ", ".join(_describe(t) for t in list(x)[:4]) + (", ..." if len(x) > 4 else "")
        return f"a {type(x).__name__} of {len(x)} ({inner})"
    return f"a {type(x).__name__}"


__all__ = ["CollatedDataset", "IdsWithMask", "collate_of", "loader_dataset", "split_batch"]
