"""Timing callables fairly, in this process or, for ONNX Runtime, in a fresh one.

`time_interleaved` calls every configuration in rotating order, round after round, so load
spikes from other processes hit all of them alike.

ONNX Runtime sessions are timed in a child process (`time_onnx`) on one process-wide thread
pool with ORT's default spinning workers, which is how one deployed model runs. In the
caller's process that is not possible: each session would get its own pool, and between calls
the idle sessions' spinning workers steal the cores of the busy one (two threads then run
slower than one), while with spinning off every parallel op pays a thread wake-up. A
process-wide pool, once created, also cannot be resized and forbids per-session pools for the
rest of the process, which a library must not impose on its caller.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dynify.errors import ExportError


def time_interleaved(
    runners: Mapping[str, Callable[[], Any]], runs: int, warmup: int, consecutive: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of every runner. Each round calls each runner in a rotating order:
    once, or (`consecutive` > 1) once untimed and then `consecutive` timed times in a row."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    calls = 1 if consecutive <= 1 else consecutive + 1
    for r in range(warmup + runs):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            for call in range(calls):
                start = time.perf_counter()
                runners[name]()
                elapsed = time.perf_counter() - start
                if r >= warmup and (calls == 1 or call > 0):
                    times[name].append(elapsed)
    return times


def time_onnx(
    runs_of: Mapping[str, tuple[str | Path, Mapping[str, np.ndarray]]],
    *,
    threads: int,
    runs: int,
    warmup: int,
    consecutive: int,
    folder: str | Path,
) -> dict[str, list[float]]:
    """`time_interleaved` over ONNX Runtime sessions, in a child process with one shared pool.

    `runs_of` maps a label to (ONNX file, feed); the feeds go to `folder` as .npy files.
    """
    folder = Path(folder)
    spec: dict[str, Any] = {
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "consecutive": consecutive,
        "runners": {},
    }
    for n, (label, (model, feed)) in enumerate(runs_of.items()):
        files = {}
        for name, value in feed.items():
            files[name] = str(folder / f"feed{n}-{name}.npy")
            np.save(files[name], np.asarray(value))
        spec["runners"][label] = {"model": str(model), "feed": files}
    spec_path = folder / "timing.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "dynify.export.timing", str(spec_path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ExportError(f"ONNX Runtime timing failed: {lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_spec(spec: dict[str, Any]) -> dict[str, list[float]]:
    """The child's side of `time_onnx`: sessions on one process-wide pool, then time them."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(int(spec["threads"]), 1)
    sessions: dict[str, Any] = {}
    runners: dict[str, Callable[[], Any]] = {}
    for label, entry in spec["runners"].items():
        if entry["model"] not in sessions:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.use_per_session_threads = False
            sessions[entry["model"]] = ort.InferenceSession(
                entry["model"], options, providers=["CPUExecutionProvider"]
            )
        session = sessions[entry["model"]]
        feed = {name: np.load(path) for name, path in entry["feed"].items()}
        runners[label] = lambda session=session, feed=feed: session.run(None, feed)
    return time_interleaved(runners, spec["runs"], spec["warmup"], spec["consecutive"])


if __name__ == "__main__":
    print(json.dumps(_run_spec(json.loads(Path(sys.argv[1]).read_text()))))
