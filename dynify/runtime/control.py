"""Control flow that compiles to a graph: one `cond`, and the gather-run-scatter of a sub-batch.

A dynamic network decides per sample whether to run some work. Eager PyTorch takes the decision
with a Python `if` and runs the work on the samples that need it (gather, run, scatter back);
`torch.export` must keep the decision as a `torch.cond` (an ONNX `If`), whose branches return
the same shapes. Every wrapper and export face goes through these helpers, so the two faces of
a strategy differ only where they must.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def tracing() -> bool:
    """True while torch.export or torch.compile traces the module."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def cond(
    pred: Tensor, true_fn: Callable[..., Any], false_fn: Callable[..., Any], operands: tuple
) -> Any:
    """`torch.cond` while exporting/compiling (kept as control flow), a plain `if` in eager.

    Eager `torch.cond` with a tensor predicate goes through `torch.compile` and recompiles for
    every new closure; a Python `if` computes the same thing.
    """
    if tracing():
        return torch.cond(pred, true_fn, false_fn, operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


def selected(mask: Tensor) -> Tensor:
    """The indices [M] of the samples `mask` [N] selects, for `index_select` / `index_copy`.

    Under export the caller's predicate guarantees at least one (the branch runs only then);
    telling export so lets ops that branch on numel() == 0 (batch norm) trace.
    """
    index = torch.nonzero(mask).squeeze(1)
    if tracing():
        torch._check(index.shape[0] >= 1)
        torch._check(index.shape[0] <= mask.shape[0])
    return index


def scatter_rows(output: Tensor | None, index: Tensor, values: Tensor, batch: int) -> Tensor:
    """`output` [batch, ...] with rows `index` replaced by `values` (a zero tensor if None)."""
    if output is None:
        output = values.new_zeros((batch, *values.shape[1:]))
    return output.index_copy(0, index, values.to(output.dtype))


def run_on(fn: Callable[[Tensor], Tensor], x: Tensor, index: Tensor, into: Tensor) -> Tensor:
    """Gather-run-scatter: `into` with rows `index` replaced by `fn(x[index])`."""
    return into.index_copy(0, index, fn(x.index_select(0, index)).to(into.dtype))


def full_index(like: Tensor, value: int) -> Tensor:
    """An int64 [N] tensor filled with `value`, N = like's batch, on like's device."""
    return torch.full((like.shape[0],), value, dtype=torch.int64, device=like.device)
