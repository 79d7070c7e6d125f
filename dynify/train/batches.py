"""From whatever data the user gives to model-ready batches, the same way for every stage.

Fine-tuning, calibration and evaluation all go through `open_data` (a folder, zip, torchvision
name, tensors or a Dataset, checked against the model's classes) and `Batches` (deterministic
epochs, optional augmentation, sharded over DDP ranks). Small images are decoded once into a
uint8 tensor and augmented on whole batches; large ones stream through a DataLoader. Token ids
(integer tensors other than uint8, e.g. a `TextDataset`) reach the model unchanged: no resizing,
scaling or augmentation applies to them.

A model converted with lengths or a padding mask (`dyn.extra_input`) gets them from the batch in
one place, `model_inputs`: made from right-padded token ids (lengths = the count of ids other
than the model's pad id, `dyn.pad_id`), or taken as they are from a data set whose items already
hold them, `((ids, lengths), label)` or `((ids, mask), label)`. A DataLoader with its own
`collate_fn` (padding each batch to its longest text) is read as its data set batched by that
`collate_fn` (`dynify.train.data.collated`); a batch narrower than the converted model's length
is padded up to it with the pad id. Every stage then calls the model with what `Batches` yields
(`call_model`), the static teacher included.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from dynify.errors import DataError
from dynify.frontend.inputs import ExtraInput, Inputs, input_tensors, map_inputs
from dynify.runtime.model import DynamicModel
from dynify.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_IMAGE_MAX,
    MixedImageSizes,
    TensorImageDataset,
    TextDataset,
    load_dataset,
    make_transforms,
    random_crop_flip,
    to_tensor_dataset,
)
from dynify.train.data.collated import (
    CollatedDataset,
    IdsWithMask,
    collate_of,
    loader_dataset,
    split_batch,
)
from dynify.train.data.text import PAD_ID

# Decode a data set into memory up to this many bytes of uint8 pixels (CIFAR-10: 150 MB).
DECODE_LIMIT_BYTES = 2 << 30


@dataclass
class Preprocessing:
    """How raw images become model inputs: resize to `input_size`, scale to [0, 1], normalise.

    `kind="identity"` (`Preprocessing.identity()`) passes inputs on as they are: token ids, and
    any input that is not an image `[C, H, W]`.
    """

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str = "image"

    @classmethod
    def identity(cls) -> Preprocessing:
        return cls(0, (), (), kind="identity")

    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


def resolve_preprocessing(
    dyn: DynamicModel,
    *,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocessing:
    """Explicit values first, then what fine-tuning stored in the artifact, then the weights'
    metadata (torchvision/timm pretrained), then ImageNet's mean and std at the model's size.
    A model whose input is not an image `[C, H, W]` (token ids `[T]`, features) gets the
    identity: nothing resizes or normalises its inputs."""
    stored = dyn.spec.get("preprocessing") or {}
    if stored.get("kind") == "identity" or len(dyn.input_shape) != 3:
        return Preprocessing.identity()
    meta = _weights_preprocessing(dyn.spec.get("model") or {})
    size = input_size or stored.get("input_size") or dyn.input_shape[-1]
    channels = dyn.input_shape[0]
    default_mean, default_std = (
        (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
    )
    mean = mean or stored.get("mean") or meta.get("mean") or default_mean
    std = std or stored.get("std") or meta.get("std") or default_std
    if len(mean) != len(std) or len(mean) not in (1, channels):
        raise DataError(
            f"--mean and --std need one value per input channel ({channels}); got {len(mean)} "
            f"and {len(std)}."
        )
    if not all(math.isfinite(m) for m in mean) or not all(0 < s < math.inf for s in std):
        raise DataError(
            f"--mean values must be finite and --std values positive and finite, got mean "
            f"{list(mean)} and std {list(std)}."
        )
    return Preprocessing(int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std))


def _weights_preprocessing(ref: dict[str, Any]) -> dict[str, Any]:
    if ref.get("weights") != "pretrained":
        return {}
    try:
        if ref.get("kind") == "torchvision":
            import torchvision.models as tvm

            preset = tvm.get_model_weights(ref["name"]).DEFAULT.transforms()
            return {"mean": preset.mean, "std": preset.std}
        if ref.get("kind") == "timm":
            import timm

            cfg = timm.get_pretrained_cfg(ref["name"])
            return {"mean": cfg.mean, "std": cfg.std} if cfg else {}
    except Exception:  # metadata is a convenience; the defaults still apply
        return {}
    return {}


def source_key(data: Any, split: str | None) -> str | None:
    """A stable name for a path data source, to recognise the same data in a later command."""
    if isinstance(data, str | os.PathLike):
        path = os.path.abspath(os.path.expanduser(os.fspath(data)))
        name = path if os.path.exists(path) else os.fspath(data)
        return f"{name}::{split or ''}"
    return None


def open_data(
    data: Any, dyn: DynamicModel, *, split: str | None = None, decode: bool = True
) -> Dataset:
    """A labelled (or unlabelled: label -1) data set, its classes checked against the model.

    Folders, zips and torchvision names load raw images; small ones (up to 64 px) are decoded
    once into a uint8 tensor when `decode`, which makes epochs cheap. A DataLoader stands for
    its data set (its batching and order are not used: epochs here are deterministic), batched
    by its `collate_fn` when it has its own.
    """
    data = loader_dataset(data) if isinstance(data, DataLoader) else data
    if isinstance(data, Dataset):
        dataset = data
        classes = _classes(dataset)
        if classes is not None and len(classes) not in (0, dyn.num_classes):
            raise DataError(
                f"The data set has {len(classes)} classes but the model has {dyn.num_classes}."
            )
    else:
        dataset = load_dataset(data, split=split, num_classes=dyn.num_classes)
    if len(dataset) == 0:
        raise DataError("The data set is empty: there is nothing to train or measure on.")
    _check_labels(dataset, dyn.num_classes)
    if decode and not isinstance(_base(dataset), TensorImageDataset | CollatedDataset):
        first = dataset[0][0]
        size = getattr(first, "size", None)
        if isinstance(size, tuple) and max(size) <= SMALL_IMAGE_MAX:
            pixels = len(dataset) * 3 * size[0] * size[1]
            if pixels <= DECODE_LIMIT_BYTES:
                with contextlib.suppress(MixedImageSizes):  # lazy: transforms resize them all
                    dataset = to_tensor_dataset(dataset)
    return dataset


def _check_labels(dataset: Dataset, num_classes: int) -> None:
    base = _base(dataset)
    targets = getattr(base, "targets", None)
    if isinstance(base, TensorImageDataset | TextDataset) and targets is not None and len(targets):
        top = int(targets.max())
        if top >= num_classes:
            raise DataError(
                f"A label is {top} but the model has {num_classes} classes (labels 0 to "
                f"{num_classes - 1}). Remap the labels or use a model with a matching head."
            )


def _base(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _classes(dataset: Dataset) -> list | None:
    return getattr(_base(dataset), "classes", None)


def _tensor_parts(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(images or token ids, labels, indices) when the data are tensors in memory, else None."""
    indices = None
    while isinstance(dataset, Subset):
        step = torch.as_tensor(dataset.indices, dtype=torch.long)
        indices = step if indices is None else step[indices]
        dataset = dataset.dataset
    n = len(dataset)
    if isinstance(dataset, TextDataset):
        return dataset.ids, dataset.targets, torch.arange(n) if indices is None else indices
    if not isinstance(dataset, TensorImageDataset) or dataset.transform is not None:
        return None
    targets = dataset.targets
    if targets is None:
        targets = torch.full((n,), -1, dtype=torch.long)
    return dataset.images, targets, torch.arange(n) if indices is None else indices


def is_token_ids(x: torch.Tensor) -> bool:
    """Integer tensors other than uint8 (which holds pixels) are token ids."""
    return (
        not x.is_floating_point()
        and not x.is_complex()
        and x.dtype not in (torch.uint8, torch.bool)
    )


def holds_token_ids(dataset: Dataset) -> bool:
    """Whether the data set's inputs are token ids (a TextDataset, integer tensors, or pairs
    of token ids and their lengths or mask)."""
    if isinstance(_base(dataset), TextDataset):
        return True
    if len(dataset) == 0:
        return False
    if isinstance(_base(dataset), CollatedDataset):
        first = split_batch(_base(dataset).first_batch())[0]
    else:
        first = dataset[0][0]
    if _is_pair(first):
        first = first[0]
    return isinstance(first, torch.Tensor) and is_token_ids(first)


def _is_pair(item: Any) -> bool:
    """An input given with its second tensor: `(ids, lengths)` or `(ids, mask)`."""
    return (
        isinstance(item, tuple | list)
        and len(item) == 2
        and all(isinstance(t, torch.Tensor) for t in item)
    )


def model_inputs(
    x: Any, extra_input: ExtraInput | None, *, pad_id: int = PAD_ID, steps: int | None = None
) -> Inputs:
    """What a model takes for a batch `x`: `x` itself, or for a model converted with lengths or
    a padding mask, `(ids, lengths)` / `(ids, mask)` in the dtype the spec records.

    Token ids `[B, T]` right-padded with `pad_id` give lengths = the count of non-pad ids (at
    least 1: an all-pad row reads its first step, as the text classifiers do) and the mask of
    those first positions. A batch that already is a pair (a data set of `((ids, lengths),
    label)` items) is passed on, its second tensor cast to the recorded dtype. A tokenizer's
    `IdsWithMask` gives a model with lengths or a mask those of its attention mask, and a model
    without either the ids alone. With `steps` (the
    length a model was converted for), token ids narrower than that (a collate_fn padding to
    each batch's longest text) are padded on the right with `pad_id` (a mask with 0)."""
    if isinstance(x, IdsWithMask):
        return _from_attention_mask(*x, extra_input, pad_id=pad_id, steps=steps)
    if _is_pair(x):
        if extra_input is None:
            raise DataError(
                "The data yield pairs (ids, lengths or mask) but the model takes one input; "
                "give it the ids alone (items (ids, label)), or convert it with its lengths or "
                "mask (example_input=(ids, lengths), --lengths / --mask)."
            )
        ids, extra = x
        ids, extra = fit_width(ids, extra, steps, pad_id)
        return ids, extra.to(extra_input.dtype)
    if isinstance(x, tuple | list):
        raise DataError(
            f"A batch's inputs are a {type(x).__name__} of {len(x)} items; dynify reads one "
            "tensor, or a pair (ids, lengths) / (ids, mask)."
        )
    if isinstance(x, torch.Tensor) and is_token_ids(x) and x.dim() == 2:
        x, _ = fit_width(x, None, steps, pad_id)
    if extra_input is None:
        return x
    if not isinstance(x, torch.Tensor) or not is_token_ids(x) or x.dim() != 2:
        raise DataError(
            f"The model takes a padded sequence and its {extra_input.kind}, which dynify makes "
            "from token ids [B, T] padded on the right; these data yield "
            f"{_describe(x)}. Give items ((x, {extra_input.kind}), label) instead."
        )
    lengths = (x != pad_id).sum(1).clamp(min=1)
    return x, extra_input.of_lengths(lengths, x.shape[1])


def _from_attention_mask(
    ids: torch.Tensor,
    mask: torch.Tensor,
    extra_input: ExtraInput | None,
    *,
    pad_id: int,
    steps: int | None,
) -> Inputs:
    """What a model takes for a tokenizer's ids and attention mask (`model_inputs`)."""
    lengths = (mask != 0).sum(1)
    prefix = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
    if not torch.equal(mask != 0, prefix):
        raise DataError(
            "The attention mask marks tokens after padding: the texts are padded on the left. "
            "dynify's sequence models read texts padded on the right; tokenize with "
            "padding_side='right'."
        )
    ids, _ = fit_width(ids, None, steps, pad_id)
    if extra_input is None:
        return ids
    return ids, extra_input.of_lengths(lengths.clamp(min=1), ids.shape[1])


def fit_width(
    ids: torch.Tensor, extra: torch.Tensor | None, steps: int | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (and their mask) padded on the right to `steps` columns, or cut to them when
    the columns past `steps` hold padding only; lengths are unchanged. None: as they are."""
    width = ids.shape[1] if ids.dim() >= 2 else None
    if steps is None or width is None or width == steps or not is_token_ids(ids):
        return ids, extra
    mask = extra is not None and extra.dim() == 2
    if width < steps:
        ids = F.pad(ids, (0, steps - width), value=pad_id)
        return ids, F.pad(extra, (0, steps - width), value=0) if mask else extra
    tail = ids[:, steps:]
    if bool((tail != pad_id).any()) or (mask and bool(extra[:, steps:].bool().any())):
        raise DataError(
            f"A batch holds texts of {width} tokens but the model was converted for {steps}. "
            f"Cut the texts at {steps} tokens (in the collate_fn or the data set), or convert "
            f"the model with an example input of the longest length ({width} or more)."
        )
    return ids[:, :steps], extra[:, :steps] if mask else extra


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    return type(x).__name__


def call_model(model: Any, x: Inputs) -> torch.Tensor:
    """`model` on inputs from `Batches`: `model(x)` or `model(ids, lengths / mask)`, the way
    the user's original network is called (a DynamicModel takes either form)."""
    return model(*input_tensors(x))


class _Transformed(Dataset):
    """`transform` applied to every image; with `seed`, random transforms draw from a seed
    of their own per image (torchvision's draw from the global generator, which is restored)."""

    def __init__(self, dataset: Dataset, transform: Any, seed: int | None = None):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed + index * 1_000_003) % 2**63)
            return self.transform(image), label


class Batches:
    """Deterministic batches of (inputs, labels) for one data set.

    Epoch e's order and augmentation depend only on (seed, e), so a resumed run sees exactly the
    batches the interrupted one would have. With `world` > 1 every rank draws the same global
    batch and keeps its own slice, so gradients averaged over ranks equal one process's.
    uint8 tensors are scaled and normalised; float tensors are taken as ready model inputs;
    token ids pass unchanged, with the identity preprocessing whatever `pre` says (`self.pre`).
    With `extra_input` (the model's lengths or mask) the inputs are `model_inputs`' pairs, made
    with `pad_id`; with `steps`, token ids are padded to that many columns (`model_inputs`).
    A (split) `CollatedDataset` is batched by its user's `collate_fn`, whose batches are model
    inputs: nothing resizes, normalises or augments them.
    """

    def __init__(
        self,
        dataset: Dataset,
        pre: Preprocessing,
        *,
        batch_size: int,
        train: bool = False,
        augment: bool = False,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        extra_input: ExtraInput | None = None,
        pad_id: int = PAD_ID,
        steps: int | None = None,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        self.tokens = holds_token_ids(dataset)
        self.dataset = dataset
        self.pre = Preprocessing.identity() if self.tokens else pre
        self.batch_size, self.train, self.augment = batch_size, train, augment and not self.tokens
        self.seed, self.rank, self.world, self.num_workers = seed, rank, world, num_workers
        self.extra_input, self.pad_id, self.steps = extra_input, pad_id, steps
        self.collate = collate_of(dataset)
        if self.collate is not None:
            self.augment = False
        self.tensors = _tensor_parts(dataset)
        n = len(dataset)
        self.drop_last = train and n >= batch_size
        self.num_batches = n // batch_size if self.drop_last else math.ceil(n / batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def has_labels(self) -> bool:
        if self.tensors is not None:
            return bool((self.tensors[1] >= 0).any())
        return True

    def epoch(self, epoch: int = 0, skip: int = 0) -> Iterator[tuple[Inputs, torch.Tensor]]:
        """Batches of epoch `epoch`, the first `skip` of them drawn but not returned."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.tensors:
            # Skipped batches are drawn all the same: their augmentation advances `generator`.
            source = itertools.islice(self._tensor_epoch(generator), skip, None)
        else:
            source = self._loader_epoch(generator, skip)
        for x, y in source:
            x = model_inputs(x, self.extra_input, pad_id=self.pad_id, steps=self.steps)
            if self.world > 1:
                x = map_inputs(x, lambda t: t[self.rank :: self.world])
                y = y[self.rank :: self.world]
            yield x, y

    def _tensor_epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
        images, targets, indices = self.tensors
        n = len(indices)
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        for b in range(self.num_batches):
            idx = indices[order[b * self.batch_size : (b + 1) * self.batch_size]]
            x = images[idx]
            if self.augment:
                x = random_crop_flip(x, padding=max(1, x.shape[-1] // 8), generator=generator)
            yield self._finish(x), targets[idx]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre.is_identity:
            return x
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
            mean = torch.tensor(self.pre.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.pre.std).view(1, -1, 1, 1)
            x = (x - mean) / std
        elif not x.is_floating_point():
            raise DataError(f"Image tensors must be uint8 or float, got {x.dtype}.")
        size = self.pre.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x

    def _loader_epoch(
        self, generator: torch.Generator, skip: int
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Streamed batches. The order comes from `generator`, each image's augmentation from its
        own seed (the epoch's seed and its index), so neither touches the global random state
        that dropout draws from, nor depends on the worker count; skipped batches are not read."""
        pre = self.pre
        dataset = self.dataset
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        augment_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if self.collate is None and _needs_transform(dataset):
            if pre.is_identity:
                raise DataError(
                    "The data set yields images but the preprocessing is the identity (a model "
                    "whose input is not an image [C, H, W]). Pass image data to an image model, "
                    "or tensors ready for this model."
                )
            transform = make_transforms(
                input_size=pre.input_size, mean=pre.mean, std=pre.std, train=self.augment
            )
            dataset = _Transformed(dataset, transform, augment_seed if self.augment else None)
        end = self.num_batches * self.batch_size if self.drop_last else n
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=order[skip * self.batch_size : end].tolist(),
            num_workers=self.num_workers,
            generator=generator,  # the loader's own seed draw must not use the global state
            collate_fn=self.collate or default_collate,
        )
        if self.collate is not None:
            yield from map(split_batch, loader)
            return
        for x, y in loader:
            yield x, torch.as_tensor(y, dtype=torch.long)


def _needs_transform(dataset: Dataset) -> bool:
    """Raw PIL images (our loaders with transform=None) need the transforms; others are ready."""
    sample = dataset[0][0]
    return not isinstance(sample, torch.Tensor) and not _is_pair(sample)


def collect_labels(dataset: Dataset) -> torch.Tensor | None:
    parts = _tensor_parts(dataset)
    return None if parts is None else parts[1][parts[2]]


def model_batch_options(dyn: DynamicModel) -> dict[str, Any]:
    """`Batches`' keyword arguments that make a converted model's inputs: its lengths or mask,
    its pad id and, for token ids, the length it was converted for."""
    tokens = dyn.input_dtype is not None and len(dyn.input_shape) == 1
    return {
        "extra_input": dyn.extra_input,
        "pad_id": dyn.pad_id,
        "steps": dyn.input_shape[0] if tokens else None,
    }
