"""Results of a benchmark run as JSON, each with what is needed to trust and repeat it.

Every suite writes through `write_result`, which wraps the suite's figures with metadata: the
git commit (and whether the worktree had uncommitted changes), the versions of torch,
torchvision and onnxruntime, torch's thread count, the CPU model, the exact command and the
date. Reports are rendered from these files alone, so a figure in a report always carries the
command that reproduces it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from dynify import atomic_output

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNNER = "python -m benchmarks"


@dataclass
class Result:
    """One results file: the suite that wrote it, its metadata and its figures."""

    suite: str
    metadata: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return self.metadata.get("command", "")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Arguments that say where a run's output goes, not what it measures: a stranger's re-run
# writes to the published place, so the recorded command leaves them out.
_OUTPUT_ONLY = {"--no-render": 0, "--results": 1}


def command_line(argv: list[str]) -> str:
    """The command that reproduces a run: the runner with these arguments, less the ones
    that only choose where the output goes (`--results DIR`, `--no-render`)."""
    kept, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg.split("=", 1)[0] in _OUTPUT_ONLY:
            skip = 0 if "=" in arg else _OUTPUT_ONLY[arg]
        else:
            kept.append(arg)
    return " ".join([RUNNER, *(shlex.quote(a) for a in kept)])


def collect_metadata(argv: list[str]) -> dict[str, Any]:
    """Where, with what and how a run was made."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": command_line(argv),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "onnxruntime": _version("onnxruntime"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def result_path(name: str, folder: Path | None = None) -> Path:
    return (folder or RESULTS) / f"{name}.json"


def write_result(
    name: str,
    suite: str,
    data: dict[str, Any],
    argv: list[str],
    folder: Path | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `data` as results file `name` of `suite`, with this run's metadata (atomically)."""
    meta = collect_metadata(argv)
    meta.update(metadata or {})
    path = result_path(name, folder)
    payload = {"suite": suite, "metadata": meta, "data": data}
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return float(value)


def read_result(name: str, folder: Path | None = None) -> Result | None:
    """Results file `name`, or None if it does not exist."""
    path = result_path(name, folder)
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    return Result(payload["suite"], payload["metadata"], payload["data"])


def describe_metadata(meta: dict[str, Any]) -> str:
    """One line saying where and with what a result was measured."""
    if meta.get("migrated"):
        parts = [
            "produced by an earlier script that wrote no metadata; recovered from git and the "
            f"report: recorded in commit {meta.get('recorded_in_commit', '?')[:10]} "
            f"({meta.get('date', '?')})"
        ]
        for key in ("torch", "threads", "cpu"):
            if meta.get(key) is not None:
                parts.append(f"{key} {meta[key]}")
        return "; ".join(parts) + "."
    commit = (meta.get("commit") or "unknown")[:10]
    if meta.get("uncommitted_changes"):
        commit += " (with uncommitted changes)"
    versions = ", ".join(
        f"{k} {meta[k]}" for k in ("torch", "torchvision", "onnxruntime") if meta.get(k)
    )
    return (
        f"commit {commit}, {meta.get('date', '?')}; {versions}; {meta.get('threads')} torch "
        f"thread(s) on {meta.get('cpu', '?')} ({meta.get('cpu_count')} cores)."
    )
