"""One row of the slowdown suite for any dynamic model and any inputs (clips, token ids):
measured with the calibrated thresholds (off), under the MAC cap where the strategy holds one
(`dynify.MacCapped`), and streamed through `dynify.BudgetGuard` (on). The frame-exit and text
rows use it (`benchmarks/slowdown_clips.py`, `benchmarks/slowdown_text.py`): `measure_stream`
measures the clean input sets and then each attacked one as its attack yields it."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

import torch

import dynify


def dearest(dyn) -> torch.Tensor:
    """[N] bool: the samples of the last forward that took the dearest way open to them: ran
    to the final exit (exit cascades: every frame looked at, the text read to its end), or
    spent the worst-case cost (every state update)."""
    if isinstance(dyn, dynify.ExitCascade):
        return dyn.last_exit == dyn.num_exits
    return dyn.last_macs >= dyn.worst_case_macs()


@torch.no_grad()
def measure(dyn, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 100) -> dict:
    """Mean MAC fraction, share at the dearest way, the dearest input, accuracy."""
    macs, dear, hits = [], [], 0
    for start in range(0, len(inputs), batch):
        out = dyn(inputs[start : start + batch])
        hits += int((out.argmax(-1) == labels[start : start + batch]).sum())
        macs.append(dyn.last_macs.double() / dyn.static_macs)
        dear.append(dearest(dyn))
    all_macs = torch.cat(macs)
    return {
        "macs": float(all_macs.mean()),
        "max_macs": float(all_macs.max()),
        "worst": float(torch.cat(dear).double().mean()),
        "acc": hits / len(labels),
    }


def add_row(
    rows: list[dict[str, Any]],
    label: str,
    eps: float,
    steps: int,
    labels: torch.Tensor,
    figures: dict[str, Any],
    **extra: Any,
) -> None:
    """Append one table row (which inputs, attacked how, how many, and their figures) and
    print it as it lands: a long run shows its progress row by row."""
    rows.append(
        {"input": label, "eps": eps, "steps": steps, "images": len(labels), **extra, **figures}
    )
    print(f"{label}, eps {eps}, {steps} steps: {rows[-1]}", flush=True)


def figures(
    dyn,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    budget: float,
    cap: float | None = None,
) -> dict[str, Any]:
    """Off, capped (`cap`, default `args.cap`; MacCapped strategies only) and guarded figures
    of one input set; the inputs are the model's own (no pixel conversion)."""
    cap = args.cap if cap is None else cap
    from benchmarks.slowdown import measure_on  # the suite's guard stream

    out = {"off": measure(dyn, inputs, labels)}
    if isinstance(dyn, dynify.MacCapped) and cap is not None:
        dyn.set_mac_cap(cap)
        out["cap"] = measure(dyn, inputs, labels)
        dyn.set_mac_cap(None)
    out["on"] = measure_on(
        dyn,
        inputs,
        labels,
        args,
        args.seed,
        budget=budget,
        inputs=lambda x: x,
        dearest=dearest,
        dearest_key="worst",
    )
    return out


# One attacked input set: (row label, eps, steps, inputs, labels, seconds the attack took).
Attacked = tuple[str, float, int, torch.Tensor, torch.Tensor, float]


def measure_stream(
    dyn,
    rows: list[dict[str, Any]],
    clean: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    attacked: Iterable[Attacked],
    args: argparse.Namespace,
    budget: float,
    cap: float | None = None,
) -> None:
    """Append a row of `figures` per input set: each clean set (label, inputs, labels) with no
    attack, then each attacked set as `attacked` yields it (so an attack runs only when its
    rows are due, and a long run prints its rows as they land)."""
    for label, inputs, labels in clean:
        add_row(rows, label, 0, 0, labels, figures(dyn, inputs, labels, args, budget, cap=cap))
    for label, eps, steps, inputs, labels, seconds in attacked:
        measured = figures(dyn, inputs, labels, args, budget, cap=cap)
        add_row(rows, label, eps, steps, labels, measured, attack_seconds=seconds)
