"""Batch-1 timing shared by the benchmarks: models timed in alternating runs of images."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def alternating_runs(
    models: dict[str, Callable[[torch.Tensor], object]],
    images: torch.Tensor,
    repeats: int,
    block: int = 10,
    after: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per image for each model, `repeats` images each, timed as a server runs a model:
    in runs of `block` consecutive images (the first call of a run, just after switching
    models, is not timed), the models taking turns run by run over the same images, so drift in
    the machine's speed hits all alike. `after(name)` runs after each timed call, untimed (to
    read what the model recorded)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    start = 0
    with torch.no_grad():
        while min(len(v) for v in times.values()) < repeats:
            for name, model in models.items():
                for j in range(block + 1):
                    x = images[(start + j) % len(images)].unsqueeze(0)
                    t0 = time.perf_counter()
                    model(x)
                    elapsed = time.perf_counter() - t0
                    if j:
                        times[name].append(elapsed)
                        if after is not None:
                            after(name)
            start += block
    return times
