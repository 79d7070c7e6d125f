"""Values derived from a module's tensors, cached on the module until one of them changes.

Batch-1 paths read things like folded conv weights or thresholds as Python floats on every
forward; computing them each time costs ops, and hooks on every way a tensor can change
(training steps, `load_state_dict`, `.to()`, in-place edits) would be fragile. A tensor's
storage pointer and in-place version counter together move whenever its values can have
changed, and reading them costs no op.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def cached_on_tensors(
    owner: nn.Module,
    slot: str,
    tensors: Iterable[torch.Tensor | None],
    build: Callable[[], T],
    extra: tuple[Hashable, ...] = (),
) -> T:
    """`build()`, kept in `owner.__dict__[slot]` until a tensor of `tensors` is replaced or
    changed in place, or `extra` differs from the previous call's."""
    key = list(extra)
    for t in tensors:
        if t is not None:
            key += (t.data_ptr(), t._version)
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] != key:
        cached = owner.__dict__[slot] = (key, build())
    return cached[1]
