"""What surrounds a training run: the torchrun process group, SIGTERM handled like Ctrl-C (so
a killed run still writes its checkpoint), and the rich progress bar."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


class Interrupted(KeyboardInterrupt):
    """SIGTERM (`kill`) while training: handled like Ctrl-C, a checkpoint is written first."""


def init_distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", 1)) > 1
    ):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """`kill` (SIGTERM) stops the run like Ctrl-C does: checkpoint first, then exit."""

    def handler(signum, frame):
        raise Interrupted("terminated")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Bar:
    def __init__(self, progress):
        self.progress = progress

    def start(self, epoch: int, epochs: int, total: int, done: int):
        if self.progress is None:
            return None
        return self.progress.add_task(
            f"epoch {epoch + 1}/{epochs}", total=total, completed=done, loss=float("nan"), acc=0.0
        )

    def advance(self, task, metrics: dict[str, float]) -> None:
        if self.progress is None:
            return
        self.progress.update(
            task, advance=1, loss=metrics.get("loss", float("nan")), acc=metrics.get("acc", 0.0)
        )


@contextmanager
def progress_bar(enabled: bool) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.1%}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        yield _Bar(progress)
