"""What a converted model takes: one tensor, either float features or integer token ids.

Images and feature sequences are float tensors; text is a tensor of token ids `[B, T]`
(int64), padded on the right to a fixed length, from which the model computes its own mask or
lengths. The dtype is part of the artifact's spec, so loading can rebuild an example input that
the model accepts (token ids of 1, the unknown token, for integer inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

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
            f"example_input is a {type(example).__name__} of {len(example)} tensors; dynify "
            "converts models whose forward takes one tensor. For text, pass the token ids "
            "[B, T] alone, padded on the right with a padding id, and compute the lengths or "
            "the mask inside forward (e.g. lengths = (ids != pad_id).sum(1))."
        )
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        raise InputError(
            "example_input must be a tensor with a batch dimension, e.g. [1, 3, 224, 224] for "
            "images or [1, 60] int64 token ids for text."
        )
    parse_dtype(example.dtype)
    return example[:1].detach()


def example_input_of(shape: Sequence[int], dtype: str | torch.dtype = "float32") -> torch.Tensor:
    """An input of one sample of `shape` (without the batch): random floats, or token ids of 1
    (the unknown token: valid for any vocabulary with padding and unknown)."""
    dtype = parse_dtype(dtype)
    if any(int(d) < 1 for d in shape) or not shape:
        raise InputError(f"An input shape needs sizes of at least 1, got {list(shape)}.")
    if dtype.is_floating_point:
        return torch.randn(1, *shape).to(dtype)
    return torch.ones(1, *shape, dtype=dtype)
