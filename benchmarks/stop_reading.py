"""Stop reading on real text: how many tokens an LSTM classifier must read for its answer.

    python -m benchmarks stop_reading --data ../shared/data

The static classifiers are text_baseline's (an embedding + 1-layer LSTM of 256 units, trained
from scratch, cached). Each is converted with `stop-reading` (an exit head on the LSTM's state
every `--every` tokens), its heads fine-tuned (`dynify.finetune`, heads mode: the static network
frozen) on the part of the training file the static model was fitted on, its thresholds
calibrated (`dynify.calibrate`, at most 1 point below static) on the held-out part, and it is
measured on the development test split only: accuracy against tokens read (the threshold
curve), the calibrated operating point, and batch-1 wall-clock against the static model.

Tokens read are counted two ways. The static model runs its LSTM over all T = 60 positions of a
padded input, so "of static" divides the LSTM steps a sample ran by T; a sample stops at its
text's end (the classifier reads the state there) or earlier, when an exit is confident. "Of
text" divides by the text's own length: what stopping early saves beyond not reading padding.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import dynify
from benchmarks.report import missing, pct, provenance
from benchmarks.results import read_result
from benchmarks.text_baseline import (
    DEFAULT_CACHE,
    FILES,
    TITLES,
    TextSettings,
    accuracy,
    static_text_model,
)

NAME = "stop_reading"
NEVER = 1.01  # a threshold no score reaches: every sample reads to its text's end
# AG News: at most half of the texts' own tokens within 1 point of static (judged on the texts'
# own tokens: the static model's padding steps, which no dynamic model runs, are not a saving)
TARGET_TOKENS = 0.5
MAX_DROP = 0.01
DEFAULT_EVERY = 5  # results of other spacings are stored as "<data set>-every<k>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY, help="tokens between two exits")
    parser.add_argument("--epochs", type=int, default=4, help="head fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fit-rows", type=int, default=0, help="fine-tune on a subset (0: all)")
    parser.add_argument("--timing-samples", type=int, default=300)
    parser.add_argument("--throughput-texts", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--text-settings", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--jump", type=int, default=0, help="the jump head: stretches it skips (0: none)"
    )
    parser.add_argument(
        "--jump-budget", type=float, default=0.6, help="share of tokens the jump head aims at"
    )


def apply_quick(args: argparse.Namespace) -> None:
    args.epochs, args.fit_rows, args.timing_samples, args.every = 1, 200, 20, 4
    args.throughput_texts = 64
    args.text_settings = "quick"


def _settings(args: argparse.Namespace, dataset: str) -> TextSettings:
    if args.text_settings == "quick":  # text_baseline's quick model
        return TextSettings(hidden=16, embed_dim=8, max_len=20, epochs=1, train_rows=200)
    return replace(TextSettings(), epochs={"agnews": 6, "sst2": 2}[dataset])


def _ids(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    items = [data[i] for i in range(len(data))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _subset(data: Any, rows: int, seed: int = 0) -> Any:
    if not rows or rows >= len(data):
        return data
    part, _ = dynify.split_dataset(data, 1 - rows / len(data), seed)
    return part


@torch.no_grad()
def _measure(dyn: dynify.DynamicModel, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, MACs, tokens read (of static's T and of each text's length) at the current
    thresholds, and which exit each sample took."""
    preds, macs, tokens, exits = [], [], [], []
    for start in range(0, len(ids), 500):
        xb = ids[start : start + 500]
        preds.append(dyn(xb).argmax(-1))
        macs.append(dyn.last_macs.double())
        tokens.append(dynify.tokens_read(dyn).double())
        exits.append(dyn.last_decisions())
    steps = ids.shape[1]
    text = (ids != 0).sum(1).clamp(min=1).double()
    read = torch.cat(tokens)
    exit_index = torch.cat(exits)
    return {
        "accuracy": float((torch.cat(preds) == labels).double().mean()),
        "macs": float(torch.cat(macs).mean()) / dyn.static_macs,
        "tokens_of_static": float(read.mean()) / steps,
        "tokens_of_text": float(read.sum() / text.sum()),
        "stopped_early": float((exit_index < dyn.num_exits).double().mean()),
        "exit_histogram": torch.bincount(exit_index, minlength=dyn.num_exits + 1).tolist(),
    }


def _timing(
    static: torch.nn.Module, dyn: dynify.DynamicModel, ids: torch.Tensor, samples: int
) -> dict:
    """Batch-1 milliseconds per text, the static and the dynamic model taking turns in runs
    of 10 texts (the first call of a run untimed): wall-clock, and the thread's CPU time, which
    a machine shared with other jobs does not inflate (a preempted call's wall-clock does)."""
    models = {"static": static, "dynamic": dyn}
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for start in range(0, samples, 10):
            for name, model in models.items():
                model(ids[start : start + 1])
                for i in range(start, min(start + 10, samples)):
                    w0, c0 = time.perf_counter(), time.thread_time()
                    model(ids[i : i + 1])
                    cpu[name].append(time.thread_time() - c0)
                    wall[name].append(time.perf_counter() - w0)
    ms = {
        f"{name}_{kind}": 1e3 * fn(values[name])
        for kind, fn, values in (
            ("ms", statistics.median, wall),
            ("mean_ms", statistics.fmean, wall),
            ("cpu_ms", statistics.median, cpu),
            ("cpu_mean_ms", statistics.fmean, cpu),
        )
        for name in models
    }
    return {
        **ms,
        "ratio": ms["dynamic_ms"] / ms["static_ms"],
        "cpu_ratio": ms["dynamic_cpu_mean_ms"] / ms["static_cpu_mean_ms"],
    }


def _throughput(
    static: torch.nn.Module, dyn: dynify.DynamicModel, ids: torch.Tensor, batch: int = 32
) -> dict:
    """Seconds for `ids` in batches of `batch`, each model three times in turn: wall-clock and
    thread CPU time, best of three (the least disturbed by other jobs)."""
    models = {"static": static, "dynamic": dyn}
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(3):
            for name, model in models.items():
                w0, c0 = time.perf_counter(), time.thread_time()
                for start in range(0, len(ids), batch):
                    model(ids[start : start + batch])
                cpu[name].append(time.thread_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    return {
        "batch": batch,
        "texts": len(ids),
        **{f"{name}_s": min(wall[name]) for name in models},
        **{f"{name}_cpu_s": min(cpu[name]) for name in models},
        "ratio": min(wall["dynamic"]) / min(wall["static"]),
        "cpu_ratio": min(cpu["dynamic"]) / min(cpu["static"]),
    }


def run_dataset(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    static = static_text_model(dataset, args.data, _settings(args, dataset), args.cache)
    model = static.model.eval()
    test_ids, test_labels = _ids(static.test)
    options: dict[str, Any] = {"every": args.every}
    if args.jump:
        options.update(jump=args.jump, budget=args.jump_budget)
    dyn = dynify.convert(model, "stop-reading", test_ids[:1], options=options)
    fit = _subset(static.fit, args.fit_rows)
    print(f"{dataset}: fine-tuning {dyn.num_exits} exit heads on {len(fit)} texts", flush=True)
    run = dynify.finetune(
        dyn,
        fit,
        mode="heads",
        epochs=args.epochs,
        batch_size=args.batch_size,
        calibration_fraction=0.0,
        augment=False,
        progress=False,
    )
    dyn.eval()
    # With a jump head, calibration also chooses the jump threshold (from its grid, the exit
    # thresholds searched at each value): the setting kept is the cheapest within the drop.
    calibration = dynify.calibrate(dyn, static.held_out, max_drop=MAX_DROP, part="all")
    jump_threshold = calibration.scalars.get("jump_threshold")
    if jump_threshold is not None:
        print(f"{dataset}: jump threshold {jump_threshold:.2f} chosen on held-out", flush=True)
    calibrated = list(calibration.thresholds)
    report = dynify.evaluate(dyn, static.test)
    point = _measure(dyn, test_ids, test_labels)
    # One threshold for every exit, chosen on the held-out curve: one number fitted on ~1,000
    # texts generalises better than one per exit (calibrate's per-exit search).
    held = dynify.evaluate(dyn, static.held_out)
    fits = [p for p in held.curve if p.accuracy >= held.static_accuracy - MAX_DROP]
    shared = min(fits, key=lambda p: p.macs_fraction).threshold
    dyn.set_thresholds(shared)
    shared_point = _measure(dyn, test_ids, test_labels)
    # The same with half the allowed drop on held-out: a margin for ~1,000 texts' noise.
    safe = [p for p in held.curve if p.accuracy >= held.static_accuracy - MAX_DROP / 2]
    margin = min(safe, key=lambda p: p.macs_fraction).threshold
    dyn.set_thresholds(margin)
    margin_point = _measure(dyn, test_ids, test_labels)
    dyn.set_thresholds(NEVER)
    to_end = _measure(dyn, test_ids, test_labels)
    dyn.set_thresholds(calibrated)
    static_acc = accuracy(model, static.test)
    curve = [
        {"threshold": p.threshold, "macs": p.macs_fraction, "accuracy": p.accuracy}
        for p in report.curve
    ]
    within = [p for p in curve if p["accuracy"] >= static_acc - MAX_DROP]
    best = min(within, key=lambda p: p["macs"]) if within else None
    print(f"{dataset}: timing batch 1 on {args.timing_samples} test texts", flush=True)
    timing = _timing(model, dyn, test_ids, args.timing_samples)
    dyn.set_thresholds(shared)
    timing_shared = _timing(model, dyn, test_ids, args.timing_samples)
    print(f"{dataset}: timing batches of 32", flush=True)
    throughput = _throughput(model, dyn, test_ids[: args.throughput_texts])
    dyn.set_thresholds(NEVER)
    timing_to_end = _timing(model, dyn, test_ids, args.timing_samples)
    dyn.set_thresholds(calibrated)
    steps = test_ids.shape[1]
    return {
        "every": args.every,
        "jump": args.jump,
        "jump_budget": args.jump_budget if args.jump else None,
        "jump_threshold": jump_threshold,
        "jump_grid": calibration.scalar_grid,
        "exits": dyn.num_exits,
        "steps": steps,
        "fit_rows": len(fit),
        "fit_rows_available": len(static.fit),
        "held_out_rows": len(static.held_out),
        "test_rows": len(static.test),
        "epochs": args.epochs,
        "finetune_seconds": round(run.seconds, 1),
        "finetune_last": run.history[-1] if run.history else {},
        "static_test_acc": static_acc,
        "static_record": {k: static.record.get(k) for k in ("test_acc", "held_out_acc")},
        "mean_text_tokens": float((test_ids != 0).sum(1).clamp(min=1).double().mean()),
        "calibration": {
            "thresholds": calibration.thresholds,
            "held_out_acc": calibration.accuracy,
            "held_out_macs": calibration.macs_fraction,
            "held_out_static_acc": calibration.static_accuracy,
        },
        "calibrated": point,
        "shared_threshold": shared,
        "shared": shared_point,
        "margin_threshold": margin,
        "margin": margin_point,
        "read_to_end": to_end,
        "curve": curve,
        "best_on_test_curve": best,
        "timing": timing,
        "timing_read_to_end": timing_to_end,
        "timing_shared": timing_shared,
        "throughput_shared": throughput,
    }


def run(args: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(args.threads)
    suffix = "" if args.every == DEFAULT_EVERY or args.text_settings else f"-every{args.every}"
    if args.jump and not args.text_settings:
        suffix += f"-jump{args.jump}"
    measured = {dataset + suffix: run_dataset(args, dataset) for dataset in args.datasets}
    return {NAME: {"datasets": measured}}


def merge(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`--add`: the data sets of both runs, the new run's where both have one."""
    return {"datasets": {**previous["datasets"], **new["datasets"]}}


# --- the report ----------------------------------------------------------------------------------


def _title(key: str) -> str:
    """A result key ("agnews", "agnews-every10") as a title."""
    dataset, _, variant = key.partition("-")
    return TITLES.get(dataset, dataset) + (f", {variant}" if variant else "")


def _row(label: str, m: dict, static_acc: float) -> str:
    return (
        f"| {label} | {pct(m['accuracy'])} | {100 * (m['accuracy'] - static_acc):+.2f} | "
        f"{m['tokens_of_static']:.3f} | {m['tokens_of_text']:.3f} | {m['macs']:.3f} | "
        f"{pct(m['stopped_early'])} |"
    )


def _verdict(dataset: str, c: dict, static_acc: float) -> str:
    """Whether an operating point meets issue 15's target: within 1 point of static (and on AG
    News, at most half of the texts' own tokens)."""
    within = static_acc - c["accuracy"] <= MAX_DROP
    if dataset.startswith("agnews"):
        ok = within and c["tokens_of_text"] <= TARGET_TOKENS
        return "Target <= 0.50 of the texts' own tokens within 1 point of static: " + (
            "met." if ok else "missed."
        )
    return "Target within 1 point of static: " + ("met." if within else "missed.")


def _headlines(dataset: str, r: dict) -> list[str]:
    """The operating points chosen on held-out data, measured on test, one bold line each."""
    lines, s = [], r["static_test_acc"]
    if r.get("jump"):
        grid = len(r.get("jump_grid") or [])
        jump = (
            f", jump head (skips {r['jump']} stretch of {r['every']} tokens after one read; jump "
            f"threshold {r['jump_threshold']:.2f} chosen by `dynify.calibrate` from {grid} values "
            "with the per-exit thresholds on held-out data)"
        )
        points = (
            ("no exit, the jumps alone", "read_to_end", None),
            ("one shared threshold", "shared", 1.0),
            ("one shared threshold", "margin", 0.5),
            ("per-exit thresholds", "calibrated", 1.0),
        )
    else:
        jump = ""
        points = (
            ("one shared threshold", "shared", 1.0),
            ("one shared threshold", "margin", 0.5),
            ("per-exit thresholds", "calibrated", 1.0),
        )
    for label, key, allowed in points:
        if key not in r:
            continue
        c = r[key]
        chosen = (
            f"{label} chosen on held-out data (at most {allowed:g} point below static there)"
            if allowed is not None
            else label
        )
        lines += [
            f"**{TITLES.get(dataset.partition('-')[0], dataset)}, exit every {r['every']} tokens"
            f"{jump}, {chosen}: "
            f"{pct(c['accuracy'])} % on test against {pct(s)} % static "
            f"({100 * (c['accuracy'] - s):+.2f} points), reading {c['tokens_of_static']:.3f} of "
            f"the static model's LSTM steps ({c['tokens_of_text']:.3f} of the texts' own "
            f"tokens).** {_verdict(dataset, c, s)}",
            "",
        ]
    return lines


def _jump_grid(measured: dict) -> list[str]:
    """What `dynify.calibrate` saw at each jump threshold of its grid, on held-out data."""
    lines = []
    for dataset, r in measured.items():
        rows = r.get("jump_grid") or []
        if not rows:
            continue
        lines += [
            "",
            f"{_title(dataset)}: the jump threshold chosen by `dynify.calibrate` (at most 1 "
            "point below static on held-out data, the fewest MACs): at each value of its grid, "
            "the best per-exit thresholds on the held-out texts (0 jumps after every stretch "
            "read, 1.01 never jumps):",
            "",
            "| jump threshold | held-out acc | MACs of static | chosen |",
            "| ---: | ---: | ---: | --- |",
        ]
        for row in rows:
            chosen = "yes" if row["jump_threshold"] == r["jump_threshold"] else ""
            if not row.get("met", True):
                lines.append(f"| {row['jump_threshold']:.2f} | target not met | | |")
                continue
            lines.append(
                f"| {row['jump_threshold']:.2f} | {pct(row['accuracy'])} | {row['macs']:.3f} "
                f"| {chosen} |"
            )
    return lines


def _shortened(r: dict) -> str:
    """Says so when the heads were fine-tuned on part of the texts available."""
    available = r.get("fit_rows_available")
    if not available or r["fit_rows"] >= available:
        return ""
    return f" (a shortened run: {available:,} available, the full command omits --fit-rows)"


def render() -> str:
    result = read_result(NAME)
    lines = ["# Stop reading: tokens read against accuracy on AG News and SST-2", ""]
    if result is None:
        return "\n".join(lines + missing(NAME, f"python -m benchmarks {NAME} --data DATA"))
    measured = result.data["datasets"]
    for dataset, r in measured.items():
        lines += _headlines(dataset, r)
    lines += [
        "| data set | operating point | test acc | vs static (points) | tokens read, of static "
        "| of text | MACs of static | stopped before the text's end |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dataset, r in measured.items():
        title = _title(dataset)
        s = r["static_test_acc"]
        lines.append(
            f"| {title} | static (LSTM over all {r['steps']} steps) | {pct(s)} | "
            "+0.00 | 1.000 | - | 1.000 | - |"
        )
        if r.get("jump"):  # no exit: the jumps alone, at the jump threshold calibration chose
            label = f"no exit, jumps only (jump threshold {r['jump_threshold']:.2f}, held-out)"
        else:
            label = "every text read to its end"
        lines.append(_row(f"{title} | {label}", r["read_to_end"], s))
        lines.append(
            _row(f"{title} | one threshold ({r['shared_threshold']:.3f}), held-out", r["shared"], s)
        )
        if "margin" in r:
            lines.append(
                _row(
                    f"{title} | one threshold ({r['margin_threshold']:.3f}), held-out, "
                    "half a point",
                    r["margin"],
                    s,
                )
            )
        lines.append(_row(f"{title} | per-exit thresholds, held-out", r["calibrated"], s))
    lines += [
        "",
        "The fewest MACs within 1 point of static on the test threshold curve (one threshold "
        "for every exit; chosen on test, so descriptive, not a held-out operating point); "
        "tokens read are the MACs fraction to within the heads' cost (a head is 0.3 % of one "
        "LSTM step):",
        "",
    ]
    for dataset, r in measured.items():
        b = r["best_on_test_curve"]
        title = _title(dataset)
        if b is None:
            lines.append(f"- {title}: no point of the curve is within 1 point of static.")
        else:
            lines.append(
                f"- {title}: {b['macs']:.3f} of static's MACs at {pct(b['accuracy'])} % "
                f"(threshold {b['threshold']:.3f}; static {pct(r['static_test_acc'])} %)."
            )
    lines += _jump_grid(measured)
    lines += ["", "Batch-1 wall-clock, median per text over the same test texts, one thread:", ""]
    lines += [
        "| data set | exit every | static | one threshold | ratio | per-exit thresholds | ratio "
        "| read to the end | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dataset, r in measured.items():
        t, e, sh = r["timing"], r["timing_read_to_end"], r["timing_shared"]
        lines.append(
            f"| {_title(dataset)} | {r['every']} | {sh['static_ms']:.3f} ms | "
            f"{sh['dynamic_ms']:.3f} ms | {sh['ratio']:.2f} | "
            f"{t['dynamic_ms']:.3f} ms | {t['ratio']:.2f} | {e['dynamic_ms']:.3f} ms | "
            f"{e['dynamic_ms'] / e['static_ms']:.2f} |"
        )
    lines += [
        "",
        "The same runs in the thread's CPU time (mean per text; not inflated when the shared "
        "machine preempts a call, which hits the dynamic path's several short RNN calls more "
        "often than the static model's one call in wall-clock medians):",
        "",
        "| data set | exit every | static | one threshold | ratio | per-exit thresholds | ratio "
        "| read to the end | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dataset, r in measured.items():
        t, e, sh = r["timing"], r["timing_read_to_end"], r["timing_shared"]
        if "cpu_ratio" not in t:
            lines.append(
                f"| {_title(dataset)} | {r['every']} | not measured in this run | | | | | | |"
            )
            continue
        lines.append(
            f"| {_title(dataset)} | {r['every']} | {sh['static_cpu_mean_ms']:.3f} ms | "
            f"{sh['dynamic_cpu_mean_ms']:.3f} ms | {sh['cpu_ratio']:.2f} | "
            f"{t['dynamic_cpu_mean_ms']:.3f} ms | {t['cpu_ratio']:.2f} | "
            f"{e['dynamic_cpu_mean_ms']:.3f} ms | {e['cpu_ratio']:.2f} |"
        )
    lines += [
        "",
        "Batches of 32 test texts at the one-threshold point (best of three passes, one "
        "thread): the batch shrinks to the texts still reading, so each RNN call's fixed cost "
        "is shared by the batch:",
        "",
        "| data set | exit every | texts | static | stop reading | ratio | static CPU | stop "
        "reading CPU | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dataset, r in measured.items():
        b = r.get("throughput_shared")
        if b is None:
            lines.append(
                f"| {_title(dataset)} | {r['every']} | not measured in this run | | | | | | |"
            )
            continue
        lines.append(
            f"| {_title(dataset)} | {r['every']} | {b['texts']} | {b['static_s']:.3f} s | "
            f"{b['dynamic_s']:.3f} s | {b['ratio']:.2f} | {b['static_cpu_s']:.3f} s | "
            f"{b['dynamic_cpu_s']:.3f} s | {b['cpu_ratio']:.2f} |"
        )
    lines += ["", "Accuracy against MACs on test, one threshold for every exit:", ""]
    for dataset, r in measured.items():
        points = ", ".join(
            f"{p['macs']:.2f}: {pct(p['accuracy'])}"
            for p in r["curve"][:: max(1, len(r["curve"]) // 10)]
        )
        lines.append(f"- {_title(dataset)} (MACs: acc %): {points}")
    lines += ["", "Setup:", ""]
    for dataset, r in measured.items():
        lines.append(
            f"- {_title(dataset)}: {r['exits']} exits, one every {r['every']} "
            f"tokens of T = {r['steps']}; heads fine-tuned {r['epochs']} epochs on "
            f"{r['fit_rows']:,} texts{_shortened(r)} ({r['finetune_seconds'] / 60:.1f} min), "
            "thresholds "
            f"calibrated on {r['held_out_rows']:,} held-out texts, measured on "
            f"{r['test_rows']:,} test texts (mean text length {r['mean_text_tokens']:.1f} "
            "tokens)."
        )
    lines += ["", *provenance(result)]
    return "\n".join(lines)
