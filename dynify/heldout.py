"""Which part of a data set calibrates a model: the part fine-tuning held out, when it is the
same data.

Fine-tuning holds out a deterministic share of its data (`calibration_fraction`, `seed`) and
records in `spec["finetune"]` a key naming that data. Thresholds chosen on images the heads were
trained on are optimistic, so calibrating on the same data uses the held-out share by default,
in the API as on the command line. The key is the absolute path (and split) of a folder, zip or
data set name, a SHA-256 of the tensors (a `TextDataset`'s ids and labels included, also
behind a DataLoader), or for any other map-style Dataset a SHA-256 of its length and of sixteen
items spread over it. A Dataset whose items change from one read to the next (random
augmentation) cannot be recognised: it calibrates on all of what it holds, with a warning,
unless `part="calibration"` asks for the held-out share.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dynify.errors import DynifyError
from dynify.runtime.model import DynamicModel
from dynify.train.batches import open_data, source_key
from dynify.train.data import TextDataset, split_dataset

logger = logging.getLogger("dynify")

SAMPLED_ITEMS = 16  # items of a Dataset read to recognise it: enough to tell subsets apart

Part = Literal["auto", "calibration", "all"]
PARTS: tuple[str, ...] = ("auto", "calibration", "all")


@dataclass
class DataPart:
    """The data chosen and a sentence saying which part of the given data it is."""

    dataset: Dataset
    description: str
    held_out: bool
    trained_on: bool  # the data (all of it) is what fine-tuning trained on


def data_key(data: Any, split: str | None = None) -> str | None:
    """A stable name for `data`: a path source's absolute path, or a digest of tensors."""
    key = source_key(data, split)
    if key is not None:
        return key
    tensors = _tensors(data)
    if tensors is not None:
        digest = hashlib.sha256()
        for t in tensors:
            _update(digest, t)
        return f"tensors::sha256:{digest.hexdigest()}"
    return _sampled_key(data.dataset if isinstance(data, DataLoader) else data)


def _update(digest: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{list(t.shape)}".encode())
    digest.update(t.flatten().view(torch.uint8).numpy().tobytes())


def _sampled_key(dataset: Any) -> str | None:
    """A digest of a map-style Dataset's length and of items spread over it, or None when its
    items cannot be read twice alike (random augmentation) or are not tensors, arrays, images
    or numbers."""
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        return None
    try:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            return None
        indices = sorted({round(i * (n - 1) / (SAMPLED_ITEMS - 1)) for i in range(SAMPLED_ITEMS)})
        first = _item_digest(dataset[indices[0]])
        if first is None or first != _item_digest(dataset[indices[0]]):
            return None
        digest = hashlib.sha256(f"{type(dataset).__qualname__}:{n}:{first}".encode())
        for i in indices[1:]:
            item = _item_digest(dataset[i])
            if item is None:
                return None
            digest.update(item.encode())
    except Exception:  # a Dataset that cannot be indexed so is simply not recognised
        return None
    return f"dataset::sha256:{digest.hexdigest()}"


def _item_digest(item: Any) -> str | None:
    digest = hashlib.sha256()

    def add(x: Any) -> bool:
        if isinstance(x, torch.Tensor):
            _update(digest, x)
        elif isinstance(x, bool | int | float | str):
            digest.update(repr(x).encode())
        elif isinstance(x, tuple | list):
            digest.update(b"(")
            return all(add(v) for v in x)
        elif isinstance(x, dict):
            digest.update(b"{")
            return all(add(k) and add(x[k]) for k in sorted(x, key=str))
        elif hasattr(x, "__array__"):  # numpy arrays and PIL images
            _update(digest, torch.as_tensor(np.asarray(x)))
        else:
            return False
        return True

    return digest.hexdigest() if add(item) else None


def _tensors(data: Any) -> list[torch.Tensor] | None:
    if isinstance(data, DataLoader):  # the same data set, whatever batches the loader made
        data = data.dataset
    if isinstance(data, TextDataset):
        return [data.ids, data.targets]
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, tuple | list) and data and all(isinstance(t, torch.Tensor) for t in data):
        return list(data)
    return None


def is_finetune_data(dyn: DynamicModel, data: Any, split: str | None = None) -> bool:
    """Whether `data` is the data `dyn` was fine-tuned on (as far as it can be recognised)."""
    tuned = (dyn.spec.get("finetune") or {}).get("data")
    return tuned is not None and tuned == data_key(data, split)


def _unrecognised(dyn: DynamicModel, data: Any, split: str | None) -> bool:
    """The model was fine-tuned on some data, and `data` cannot be compared with it."""
    return bool(dyn.spec.get("finetune")) and data_key(data, split) is None


def calibration_part(
    dyn: DynamicModel,
    data: Any,
    *,
    split: str | None = None,
    part: Part = "auto",
    fraction: float | None = None,
    seed: int | None = None,
) -> DataPart:
    """The part of `data` to calibrate on.

    `part`: "auto" (the share fine-tuning held out if `data` is its data, else all of it),
    "calibration" (the held-out share, chosen as fine-tuning chose it) or "all". `fraction` and
    `seed` default to fine-tuning's.
    """
    if part not in PARTS:
        raise DynifyError(f"part is one of {', '.join(PARTS)}; got '{part}'.")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise DynifyError(
            f"The calibration fraction is the held-out share of the data, in (0, 1); got "
            f"{fraction}."
        )
    trained_on = is_finetune_data(dyn, data, split)
    dataset = open_data(data, dyn, split=split, decode=False)
    if part == "auto" and not trained_on and _unrecognised(dyn, data, split):
        logger.warning(
            "dynify: cannot tell whether this data is what the model was fine-tuned on (its "
            "items differ from one read to the next, or are not tensors, arrays or images), so "
            "all of it calibrates. If it is the fine-tuning data, pass part='calibration' to "
            "use the share fine-tuning held out; part='all' says all of it is meant."
        )
    if part == "all" or (part == "auto" and not trained_on):
        what = "all of the data"
        if trained_on:
            what += ", which fine-tuning trained on: the thresholds will be optimistic"
        return DataPart(dataset, what, held_out=False, trained_on=trained_on)
    tuned = dyn.spec.get("finetune") or {}
    if fraction is None:
        fraction = tuned.get("calibration_fraction", 0.1) if tuned else 0.1
    seed = seed if seed is not None else int(tuned.get("seed", 0))
    if not fraction:
        raise DynifyError(
            "Fine-tuning used all of this data (calibration fraction 0), so none is held out: "
            "calibrate on other data, or ask for all of it (--part all, part='all') knowing the "
            "thresholds will be optimistic."
        )
    _, held = split_dataset(dataset, fraction, seed)
    return DataPart(
        held,
        f"the {fraction:.0%} held out from fine-tuning, seed {seed}",
        held_out=True,
        trained_on=False,
    )
