"""The benchmark runner: `python -m benchmarks --list | render [NAME ...] | NAME [options]`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import SUITES
from benchmarks.report import write_report
from benchmarks.results import (
    RESULTS,
    collect_metadata,
    command_line,
    read_result,
    write_result,
)


def list_suites() -> str:
    width = max(len(n) for n in SUITES)
    lines = ["Suites (python -m benchmarks NAME [--quick] [options]; NAME --help for options):"]
    for suite in SUITES.values():
        lines.append(f"  {suite.name:<{width}}  -> benchmarks/{suite.report}: {suite.measures}")
    lines.append("  render [NAME ...]: rewrite the reports from benchmarks/results/")
    return "\n".join(lines)


def render(names: list[str]) -> list[Path]:
    """Rewrite each named suite's report (all by default) from its results files."""
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise SystemExit(f"Unknown suite(s) {unknown}; see python -m benchmarks --list.")
    written = []
    for name in names or list(SUITES):
        suite = SUITES[name]
        written.append(write_report(suite.report_path, suite.module().render()))
    return written


def run_suite(name: str, argv: list[str]) -> list[Path]:
    """Run suite `name` with its own arguments `argv`; write its results (and its report)."""
    suite = SUITES[name]
    module = suite.module()
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {name}", description=suite.measures
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny end-to-end run (a small subset, one short epoch); its results go to "
        "--results (default: a new temporary folder), never over the published ones",
    )
    parser.add_argument("--results", type=Path, default=None, help="where results JSON go")
    parser.add_argument(
        "--no-render", action="store_true", help="write the results, not the report"
    )
    if hasattr(module, "merge"):
        parser.add_argument(
            "--add",
            action="store_true",
            help="add to the existing results file instead of replacing it (its command then "
            "lists both runs, joined by &&)",
        )
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        module.apply_quick(args)
        args.results = args.results or Path(tempfile.mkdtemp(prefix=f"dynify-bench-{name}-"))
    folder = args.results or RESULTS
    written = []
    started = collect_metadata([name, *argv])  # the code as it was when the run started
    outputs = module.run(args)
    started["threads"] = torch.get_num_threads()  # as the suite set them
    for result_name, data in outputs.items():
        extra = dict(started)
        previous = read_result(result_name, folder) if getattr(args, "add", False) else None
        if previous is not None:
            data = module.merge(previous.data, data)
            extra["command"] = joined_commands(previous.command, command_line([name, *argv]))
            extra["added_to"] = previous.metadata
        written.append(write_result(result_name, name, data, [name, *argv], folder, extra))
        print(f"wrote {written[-1]}", flush=True)
    if not args.quick and not args.no_render and folder == RESULTS:
        written.append(write_report(suite.report_path, module.render()))
        print(f"wrote {written[-1]}", flush=True)
    return written


def joined_commands(previous: str, new: str) -> str:
    """The commands that together reproduce an added-to result, each run once: a run measured
    again keeps only its last place, the first command starts the file and the others add."""

    def key(command: str) -> str:
        return command.replace(" --add", "")

    parts = [key(part) for part in previous.split(" && ") if key(part) != key(new)]
    parts.append(key(new))
    return " && ".join([parts[0], *(f"{part} --add" for part in parts[1:])])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + list_suites())
        return
    if argv[0] == "--list":
        print(list_suites())
        return
    if argv[0] == "render":
        for path in render(argv[1:]):
            print(f"wrote {path}")
        return
    if argv[0] not in SUITES:
        raise SystemExit(f"Unknown suite '{argv[0]}'.\n{list_suites()}")
    run_suite(argv[0], argv[1:])


if __name__ == "__main__":
    main()
