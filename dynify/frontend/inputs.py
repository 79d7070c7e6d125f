"""What a converted model takes: one tensor (float features or integer token ids), or a
padded sequence with its lengths or its padding mask, passed positionally.

Images and feature sequences are float tensors; text is a tensor of token ids `[B, T]`
(int64), padded on the right to a fixed length. A text model either computes its own mask or
lengths from the ids, or takes them as a second input, the way text classifiers are usually
called: `forward(ids, lengths)` with lengths int [B] in [1, T], or `forward(ids, mask)` with a
mask [B, T] (bool or integer, 1 = a real token) whose padding is at the end. The dtypes and
the kind of second input are part of the artifact's spec (`ExtraInput`), so loading can rebuild
an example input that the model accepts (token ids of 1, the unknown token, at full length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dynify.errors import InputError

# The dtypes an example input (and the artifact's `input_dtype`) may have, by name.
INPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its name ('int64', 'torch.int64') or itself, refusing what no model takes."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        dtype = INPUT_DTYPES.get(str(name).removeprefix("torch."))
    if dtype not in INPUT_DTYPES.values():
        raise InputError(
            f"Input dtype {name!r} is not supported; use one of {', '.join(INPUT_DTYPES)} "
            "(int64 for token ids, float32 for images and feature sequences)."
        )
    return dtype


def check_example_input(example: object) -> torch.Tensor:
    """The example input as one sample, or an InputError saying what to pass instead."""
    if isinstance(example, tuple | list):
        raise InputError(
            f"example_input is a {type(example).__name__} of {len(example)} tensors here; pass "
            "one tensor, or (ids, lengths) / (ids, mask) to `dynify.convert`."
        )
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        raise InputError(
            "example_input must be a tensor with a batch dimension, e.g. [1, 3, 224, 224] for "
            "images or [1, 60] int64 token ids for text."
        )
    parse_dtype(example.dtype)
    return example[:1].detach()


def example_input_of(
    shape: Sequence[int], dtype: str | torch.dtype = "float32", token: int = 1
) -> torch.Tensor:
    """An input of one sample of `shape` (without the batch): random floats, or token ids of
    `token` (1 by default, the unknown token of a vocabulary padding with 0; a model padding
    with 1 gets another, `padding.example_token`, so the example is not all padding)."""
    dtype = parse_dtype(dtype)
    if any(int(d) < 1 for d in shape) or not shape:
        raise InputError(f"An input shape needs sizes of at least 1, got {list(shape)}.")
    if dtype.is_floating_point:
        return torch.randn(1, *shape).to(dtype)
    return torch.full((1, *shape), token, dtype=dtype)


# The dtypes a padding mask may have, by name (1 / True = a real token).
MASK_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
LENGTH_DTYPES: dict[str, torch.dtype] = {"int64": torch.int64, "int32": torch.int32}
EXTRA_KINDS = ("lengths", "mask")


@dataclass(frozen=True)
class ExtraInput:
    """The second input of a sequence model, after the padded sequence `[B, T, ...]`:
    `lengths` (integer [B], each in [1, T]) or `mask` ([B, T], 1 = real token, padding at the
    end). Part of the artifact's spec; `check` refuses what the conversion did not plan for."""

    kind: str  # "lengths" | "mask"
    dtype: torch.dtype

    def __post_init__(self) -> None:
        allowed = LENGTH_DTYPES if self.kind == "lengths" else MASK_DTYPES
        if self.kind not in EXTRA_KINDS:
            raise InputError(f"A second input is 'lengths' or 'mask', got {self.kind!r}.")
        if self.dtype not in allowed.values():
            raise InputError(
                f"{self.kind} as {dtype_name(self.dtype)} is not supported; use one of "
                f"{', '.join(allowed)}."
            )

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtraInput:
        if not isinstance(data, dict) or set(data) != {"kind", "dtype"}:
            raise InputError(f"An extra input is {{'kind': ..., 'dtype': ...}}, got {data!r}.")
        kind, name = str(data["kind"]), str(data["dtype"])
        table = LENGTH_DTYPES if kind == "lengths" else MASK_DTYPES
        if name not in table:
            raise InputError(f"{kind} as {name} is not supported; use one of {', '.join(table)}.")
        return cls(kind, table[name])

    @property
    def name(self) -> str:
        """The input's name in exported graphs."""
        return self.kind

    def full(self, batch: int, steps: int, device: torch.device | None = None) -> torch.Tensor:
        """Every sample at full length: the example input's second tensor."""
        if self.kind == "lengths":
            return torch.full((batch,), steps, dtype=self.dtype, device=device)
        return torch.ones(batch, steps, dtype=self.dtype, device=device)

    def of_lengths(self, lengths: torch.Tensor, steps: int) -> torch.Tensor:
        """This input for samples of the given lengths (int [B] in [1, steps])."""
        if self.kind == "lengths":
            return lengths.to(self.dtype)
        positions = torch.arange(steps, device=lengths.device)
        return (positions[None, :] < lengths[:, None]).to(self.dtype)

    def lengths(self, value: torch.Tensor) -> torch.Tensor:
        """Each sample's length, int64 [B], from a checked value of this input."""
        if self.kind == "lengths":
            return value.long()
        return (value != 0).sum(1)

    def check(self, x: torch.Tensor, value: object) -> None:
        """Refuse a second input that does not fit the sequence `x` [B, T, ...]."""
        what = f"{self.kind} ({dtype_name(self.dtype)} {self._shape_text()})"
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"The model takes the padded sequence and its {what}; got "
                f"{type(value).__name__} as the second input. Call it as dyn(x, {self.kind})."
            )
        batch, steps = x.shape[0], x.shape[1]
        shape = (batch,) if self.kind == "lengths" else (batch, steps)
        if tuple(value.shape) != shape:
            raise InputError(
                f"Expected {what} for a batch of {batch} sequences of {steps} steps, got shape "
                f"{list(value.shape)}."
            )
        if value.dtype != self.dtype or value.device != x.device:
            raise InputError(
                f"Expected {self.kind} as {dtype_name(self.dtype)} on {x.device}, got "
                f"{dtype_name(value.dtype)} on {value.device}; convert it "
                f"({self.kind}.to({x.device.type!r}, torch.{dtype_name(self.dtype)}))."
            )
        if torch.compiler.is_compiling():  # traced for export: values are not known yet
            return
        if self.kind == "lengths":
            if batch and not bool(((value >= 1) & (value <= steps)).all()):
                raise InputError(
                    f"Every length must be in [1, {steps}] (the padded length); got lengths "
                    f"from {int(value.min())} to {int(value.max())}."
                )
            return
        real = value != 0
        if batch and not bool(((value == 0) | (value == 1)).all()):
            raise InputError("A padding mask holds 1 (real token) or 0 (padding) only.")
        if batch and not bool(real[:, 0].all() & (real[:, 1:] <= real[:, :-1]).all()):
            raise InputError(
                "A padding mask must mark at least one real token and put the padding at the "
                "end of each row (1 ... 1 0 ... 0); pad sequences on the right."
            )

    def _shape_text(self) -> str:
        return "[B]" if self.kind == "lengths" else "[B, T]"


def split_example(example: object) -> tuple[torch.Tensor, torch.Tensor | None, ExtraInput | None]:
    """An example input as (sequence, second input or None, what the second input is), one
    sample each; an InputError saying what to pass instead.

    A pair is a padded sequence and its lengths (integer [B]) or its padding mask ([B, T]).
    """
    if not isinstance(example, tuple | list):
        return check_example_input(example), None, None
    example = tuple(iter(example))  # the items, whatever the container says its length is
    if len(example) != 2 or not all(isinstance(t, torch.Tensor) for t in example):
        raise InputError(
            f"example_input is a {type(example).__name__} of {len(example)} items; dynify "
            "converts models whose forward takes one tensor, or a padded sequence and its "
            "lengths or padding mask: (ids [B, T], lengths [B]) or (ids [B, T], mask [B, T])."
        )
    x = check_example_input(example[0])
    extra = example[1]
    if extra.dim() == 1 and extra.shape[0] == example[0].shape[0]:
        if extra.dtype not in LENGTH_DTYPES.values():
            raise InputError(
                f"The lengths [B] must be int64 or int32, got {dtype_name(extra.dtype)}."
            )
        kind = ExtraInput("lengths", extra.dtype)
    elif extra.dim() == 2 and tuple(extra.shape) == tuple(example[0].shape[:2]):
        if extra.dtype not in MASK_DTYPES.values():
            raise InputError(
                f"A padding mask [B, T] must be bool or an integer dtype (1 = real token), got "
                f"{dtype_name(extra.dtype)}."
            )
        kind = ExtraInput("mask", extra.dtype)
    else:
        raise InputError(
            f"The second input has shape {list(extra.shape)}; for a sequence of shape "
            f"{list(example[0].shape)} it must be the lengths [{example[0].shape[0]}] or a "
            f"padding mask {list(example[0].shape[:2])}."
        )
    extra = extra[:1].detach()
    kind.check(x, extra)
    return x, extra, kind


def as_inputs(x: object, extra: object = None) -> tuple[object, object]:
    """(sequence, second input) from a model's call: `dyn(x, lengths)` or `dyn((x, lengths))`."""
    if extra is None and isinstance(x, tuple | list):
        items = tuple(iter(x))
        if len(items) == 2:
            return items[0], items[1]
    return x, extra


def parse_extra_input(value: str | ExtraInput) -> ExtraInput:
    """An `ExtraInput` from 'lengths', 'mask' or 'kind:dtype' ('mask:int64', 'lengths:int32')."""
    if isinstance(value, ExtraInput):
        return value
    kind, _, name = str(value).partition(":")
    if kind not in EXTRA_KINDS:
        raise InputError(
            f"The second input is 'lengths' (int64 [B]) or 'mask' (bool [B, T], 1 = real "
            f"token), optionally with a dtype ('mask:int64'); got {value!r}."
        )
    name = name or ("int64" if kind == "lengths" else "bool")
    return ExtraInput.from_dict({"kind": kind, "dtype": name})


# A model's input as callers hold it: one tensor, or (sequence, lengths / mask).
Inputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def input_tensors(x: Inputs) -> tuple[torch.Tensor, ...]:
    """The tensors of an input, in the order a graph takes them."""
    return tuple(iter(x)) if isinstance(x, tuple | list) else (x,)


def batch_size(x: Inputs) -> int:
    return int(input_tensors(x)[0].shape[0])


def map_inputs(x: Inputs, fn: Any) -> Inputs:
    """`fn` applied to each tensor of an input, keeping its form."""
    if isinstance(x, tuple | list):
        return tuple(fn(t) for t in iter(x))  # type: ignore[return-value]
    return fn(x)


def cat_inputs(inputs: Sequence[Inputs]) -> Inputs:
    """Inputs of the same form joined along the batch."""
    if isinstance(inputs[0], tuple | list):
        parts = [input_tensors(x) for x in inputs]
        return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))  # type: ignore[return-value]
    return torch.cat(list(inputs))  # type: ignore[arg-type]
