"""Reports: markdown rendered from results files, with a hand-written part kept below.

The rendered part of a report shows the current figures and, for every results file it reads,
the command that reproduces it and where it was measured. Readings written by hand go below
`HAND_WRITTEN` and survive a re-render.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.results import Result, describe_metadata
from dynify import atomic_output

HAND_WRITTEN = "<!-- written by hand below this line: kept when the report is rendered -->"
GENERATED = (
    "<!-- rendered by `python -m benchmarks render` from benchmarks/results/: edit the suite "
    "(benchmarks/*.py), not this part -->"
)


def write_report(path: Path, rendered: str) -> Path:
    """`rendered` in place of the generated part of `path`, its hand-written part kept."""
    old = path.read_text() if path.exists() else ""
    tail = old[old.index(HAND_WRITTEN) :] if HAND_WRITTEN in old else HAND_WRITTEN + "\n"
    text = GENERATED + "\n\n" + rendered.strip("\n") + "\n\n" + tail
    with atomic_output(path) as tmp:
        tmp.write_text(text.rstrip("\n") + "\n")
    return path


def provenance(result: Result, what: str = "") -> list[str]:
    """The command that reproduces `result` and where it was measured, as markdown lines."""
    meta = result.metadata
    lines = [f"Reproduce{' ' + what if what else ''}:", "", "```", result.command, "```", ""]
    note = meta.get("note")
    lines.append(f"Measured: {describe_metadata(meta)}" + (f" {note}" if note else ""))
    if meta.get("rerun"):
        lines += ["", f"The same with the current suite: `{meta['rerun']}`."]
    return [*lines, ""]


def missing(name: str, command: str) -> list[str]:
    return [f"No results file `benchmarks/results/{name}.json` yet: run `{command}`.", ""]


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def frac(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.3f}"
