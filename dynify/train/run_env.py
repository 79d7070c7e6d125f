"""What surrounds a training run: the torchrun process group, stop signals that only ask the
loop to stop at the next batch boundary, a test hook that signals the process at a named moment,
and the rich progress bar."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from dynify.errors import DynifyError

TEST_INTERRUPT_ENV = "DYNIFY_TEST_INTERRUPT"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run at a batch boundary, after writing its checkpoint."""


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


class StopRequest:
    """Set by SIGINT / SIGTERM; read by the loop only between batches.

    A signal never raises inside a batch, so a stopped run is always at a clean boundary: the
    batch in flight finishes (forward, backward, step, counters) before the checkpoint is taken.
    A second Ctrl-C gives up at once, without a checkpoint (the last one written stays valid).
    SIGTERM never does: torchrun, told to stop with Ctrl-C, sends its workers SIGTERM as well.
    """

    def __init__(self) -> None:
        self.signals = 0
        self.sigints = 0
        self.gave_up = False

    @property
    def requested(self) -> bool:
        return self.signals > 0

    def handler(self, signum, frame) -> None:
        self.signals += 1
        if signum == signal.SIGINT and self.sigints > 0:
            self.gave_up = True
            raise KeyboardInterrupt("Ctrl-C pressed twice")
        if signum == signal.SIGINT:
            self.sigints += 1

    def agreed(self, world: int, device: torch.device) -> bool:
        """Under DDP every rank must stop at the same batch, or the others wait forever."""
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Ctrl-C and `kill` (SIGTERM) set a flag for the duration of the run; outside the main
    thread (no signal handlers there) the flag simply never rises."""
    stop = StopRequest()
    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, stop.handler)
    except ValueError:  # not the main thread: signals are delivered to the main thread anyway
        pass
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupt_hook(point: str, step: int) -> None:
    """`DYNIFY_TEST_INTERRUPT=point:step[:SIGNAL]` makes the process send itself SIGNAL
    (default SIGTERM) when the loop reaches `point` of optimizer step number `step`.

    Tests use it to interrupt a real process at exact moments instead of timed ones. Points of
    the step in progress: `batch_start` (batch drawn), `forward` (loss computed, batch-norm
    statistics updated), `after_step` (optimizer stepped, not yet counted); then `batch_end`
    (counted) and `checkpoint_write` (a checkpoint recording that step, complete in its
    temporary file, not yet renamed over the old one).
    """
    spec = os.environ.get(TEST_INTERRUPT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    try:
        name, at = parts[0], int(parts[1])
        signum = signal.Signals[parts[2]] if len(parts) > 2 else signal.SIGTERM
    except (IndexError, KeyError, ValueError):
        raise DynifyError(
            f"{TEST_INTERRUPT_ENV}='{spec}' is not point:step[:SIGNAL] (e.g. after_step:3:SIGINT)."
        ) from None
    if name == point and at == step:
        os.kill(os.getpid(), signum)


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
