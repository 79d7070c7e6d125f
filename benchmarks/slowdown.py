"""Slowdown attacks on exit cascades, block gates and spatial masks, and what
`dynify.BudgetGuard` and the MAC cap keep of the budget.

    python -m benchmarks slowdown --data ../shared/data
    python -m benchmarks slowdown --add --strategies block-gates spatial-masks --nets 20 32

Block gates and spatial masks: `benchmarks/slowdown_units.py` (attack on the gate and mask
probabilities; measured off, with `set_mac_cap` and with the guard). Exit cascades:

Through the public API, per strategy whose decisions are exits (early exits with 4 exits, the
resolution cascade): CIFAR ResNet-20 converted, its new parts fine-tuned
(`dynify.finetune`, heads mode) on a seeded subset of cifar10/train, calibrated
(`dynify.calibrate`) to a mean-MAC budget on the held-out part of cifar10/train. Then
DeepSloth-style PGD (Hong et al., ICLR 2021) on cifar10/test images: L-inf perturbations of the
[0, 1] pixels that push every exit's score below its threshold (hinge on score - threshold,
summed over the exits), for each eps and step count. Each input set (clean, and each attack) is
measured with the calibrated thresholds (guard off) and streamed one image at a time through a
`dynify.BudgetGuard` with the same budget (guard on), several passes in a shuffled order so the
guard's window fills; guard-on figures are over the last passes (its steady state) and over the
whole stream. The attack is computed against the calibrated thresholds (not adaptive to the
guard). cifar10/test is used only for measuring.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import dynify
from benchmarks.cifar_data import (
    DEFAULT_CACHE,
    INPUT_SIZE,
    MEAN,
    STD,
    _items,
    fit_and_calibration,
    load_cifar,
    subsample,
    weights_path,
)
from benchmarks.pgd import pgd
from benchmarks.report import missing, provenance
from benchmarks.results import read_result
from benchmarks.slowdown_clips import run_clips
from benchmarks.slowdown_text import TEXT_STRATEGIES, add_text_arguments, run_text
from benchmarks.slowdown_units import NOTES as UNIT_NOTES
from benchmarks.slowdown_units import UNIT_STRATEGIES, run_units
from benchmarks.slowdown_units import headline as unit_headline
from benchmarks.slowdown_units import table as unit_table

NAME = "slowdown"
# strategies whose decisions are exits (`dynify.ExitCascade`): the attack's scores are theirs
STRATEGIES = {"early-exit": "early exits", "resolution": "resolution cascade (16x16 first)"}
NOT_MEASURED = (
    "ResNet-32 rows for most unit strategies (`--nets 20 32`), a MAC cap on frame exits "
    "(`dynify.calibrate(..., mac_cap=)`), and attacks that adapt to the guard's moving "
    "thresholds (every attack here targets the calibrated ones)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=[*STRATEGIES],  # the other rows' commands: benchmarks/slowdown.md
        choices=[*STRATEGIES, *UNIT_STRATEGIES, "frame-exit", *TEXT_STRATEGIES],
    )
    parser.add_argument(
        "--nets", type=int, nargs="+", default=[20], help="CIFAR ResNet depths (gates, masks)"
    )
    parser.add_argument("--cap", type=float, default=0.9, help="gates, masks: the MAC cap")
    parser.add_argument(
        "--unit-budget", type=float, default=0.85, help="gates, masks: budget (and the guard's)"
    )
    # the block-gates suite's recipe: heads mode at its default lr never closed a gate (report)
    parser.add_argument(
        "--unit-mode", default="joint", choices=["heads", "joint"], help="gates, masks: tuning"
    )
    parser.add_argument("--unit-epochs", type=int, default=2, help="gates, masks: epochs")
    parser.add_argument("--unit-lr", type=float, default=0.01, help="gates, masks: lr")
    parser.add_argument("--unit-compute-weight", type=float, default=None, help="gates, width")
    parser.add_argument("--unit-budget-rate", type=float, default=0.5, help="gates, width")
    parser.add_argument("--exits", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1, help="heads-mode epochs")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--calib-images", type=int, default=0, help="of the held-out 5k (0: all)")
    parser.add_argument("--attack-images", type=int, default=200, help="of cifar10/test")
    parser.add_argument("--clean-images", type=int, default=1000, help="of cifar10/test")
    parser.add_argument("--eps", type=int, nargs="+", default=[2, 4, 8], help="in 1/255")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--window", type=int, default=256, help="the guard's window")
    parser.add_argument("--gain", type=float, default=1.0, help="the guard's gain")
    parser.add_argument("--passes", type=int, default=5, help="guard-on stream: passes")
    parser.add_argument("--steady-passes", type=int, default=2, help="of which measured")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--frames", type=int, default=8, help="frame-exit: frames per clip")
    parser.add_argument("--clip-budget", type=float, default=0.5, help="frame-exit: budget")
    add_text_arguments(parser)


def apply_quick(args: argparse.Namespace) -> None:
    args.train_images, args.calib_images = 256, 128
    args.attack_images, args.clean_images = 16, 32
    args.eps, args.steps = [8], [2]
    args.window, args.passes, args.steady_passes = 16, 2, 1
    args.clean_texts, args.attack_texts, args.swaps, args.quick_text = 32, 8, [1], True
    args.frames, args.text_epochs, args.reading_budget = 3, 1, 0.5


def to_input(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB pixels as the network's input (normalised)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def slowdown_pgd(
    dyn, pixels: torch.Tensor, eps: float, steps: int, seed: int, batch: int = 50
) -> torch.Tensor:
    """DeepSloth-style PGD: pixels within `eps` (L-inf) whose exit scores fall below the
    thresholds: gradient descent on sum_i relu(score_i - threshold_i), random start."""
    thresholds = dyn.thresholds.detach()

    def hinge(x: torch.Tensor) -> torch.Tensor:
        scores = dynify.exit_scores(dyn, to_input(x))
        return sum(torch.relu(s - t).sum() for s, t in zip(scores, thresholds, strict=False))

    return pgd(pixels, hinge, eps, steps, seed, batch)


@torch.no_grad()
def measure_off(dyn, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """At the calibrated thresholds: mean MACs fraction, share run to the end, accuracy."""
    macs, ends, hits = [], [], 0
    for start in range(0, len(pixels), 100):
        x = to_input(pixels[start : start + 100])
        hits += int((dyn(x).argmax(-1) == labels[start : start + 100]).sum())
        macs.append(dyn.last_macs.double() / dyn.static_macs)
        ends.append(dyn.last_exit == dyn.num_exits)
    return {
        "macs": float(torch.cat(macs).mean()),
        "to_end": float(torch.cat(ends).double().mean()),
        "acc": hits / len(labels),
    }


def ran_to_end(dyn) -> torch.Tensor:
    """[N] bool: the samples of the last forward that left at the final exit."""
    return dyn.last_exit == dyn.num_exits


@torch.no_grad()
def measure_on(
    dyn,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    args,
    seed: int,
    *,
    budget: float | None = None,
    inputs: Callable[[torch.Tensor], torch.Tensor] = to_input,
    dearest: Callable[[Any], torch.Tensor] = ran_to_end,
    dearest_key: str = "to_end",
) -> dict:
    """Streamed one image at a time through a fresh BudgetGuard (`budget`, default
    `args.budget`), `passes` shuffled passes; `dearest(dyn)` says whether the last sample took
    the dearest way (ran to the end, opened every unit), reported under `dearest_key`."""
    calibrated = dyn.thresholds.clone()
    budget = args.budget if budget is None else budget
    guard = dynify.BudgetGuard(dyn, budget=budget, window=args.window, gain=args.gain)
    generator = torch.Generator().manual_seed(seed)
    macs, dear, hits = [], [], []
    for _ in range(args.passes):
        for i in torch.randperm(len(pixels), generator=generator).tolist():
            logits = guard(inputs(pixels[i : i + 1]))
            macs.append(float(dyn.last_macs[0]) / dyn.static_macs)
            dear.append(bool(dearest(dyn)[0]))
            hits.append(int(logits.argmax(-1)[0]) == int(labels[i]))
    level = guard.level
    dyn.set_thresholds(calibrated)
    tail = args.steady_passes * len(pixels)

    def mean(values: list) -> float:
        return sum(values) / len(values)

    return {
        "macs": mean(macs[-tail:]),
        dearest_key: mean(dear[-tail:]),
        "acc": mean(hits[-tail:]),
        "stream_macs": mean(macs),
        "stream_acc": mean(hits),
        "final_window_macs": mean(macs[-args.window :]),
        "final_level": level,
        "samples": len(macs),
    }


def run(args: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train, test = load_cifar(args.data, args.cache)
    out: dict[str, Any] = {"strategies": {}}
    for strategy in args.strategies:
        print(f"{strategy}:", flush=True)
        if strategy == "frame-exit":
            out["strategies"]["frame-exit"] = run_clips(args, train, test)
        elif strategy in TEXT_STRATEGIES:
            out["strategies"][strategy] = run_text(strategy, args)
        elif strategy in UNIT_STRATEGIES:
            for depth in args.nets:
                key = f"{strategy}/resnet{depth}"
                out["strategies"][key] = run_units(strategy, depth, args, train, test, to_input)
        else:
            out["strategies"][strategy] = run_strategy(strategy, args, train, test)
    out["total_seconds"] = time.perf_counter() - start
    return {NAME: out}


def merge(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`--add`: the strategies of both runs, the new run's where both have one."""
    return {
        "strategies": {**previous["strategies"], **new["strategies"]},
        "total_seconds": previous.get("total_seconds", 0.0) + new["total_seconds"],
    }


def run_strategy(strategy: str, args: argparse.Namespace, train, test) -> dict[str, Any]:
    """Convert, fine-tune, calibrate one strategy; measure it clean and attacked."""
    start = time.perf_counter()
    fit, calib = fit_and_calibration(train, args.seed, args.train_images, args.calib_images)
    torch.manual_seed(args.seed)
    options = {"exits": args.exits} if strategy == "early-exit" else {}
    dyn = dynify.convert(
        "cifar_resnet20", strategy, options=options, weights=weights_path(args.data, 20)
    )
    ft = dynify.finetune(
        dyn,
        fit,
        mode="heads",
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        calibration_fraction=0.0,  # the calibration part is held out above
        progress=False,
    )
    cal = dynify.calibrate(dyn, calib, budget=args.budget, part="all")
    dyn.eval()
    print(
        f"heads {ft.seconds:.0f} s; calibrated to {cal.macs_fraction:.3f} of the MACs, "
        f"thresholds {[round(t, 3) for t in cal.thresholds]}",
        flush=True,
    )
    clean_images, clean_labels = _items(subsample(test, args.clean_images))
    attack_images, attack_labels = _items(subsample(test, args.attack_images))
    clean_pixels = clean_images.float() / 255
    attack_pixels = attack_images.float() / 255
    out: dict[str, Any] = {
        "net": "cifar_resnet20",
        "strategy": strategy,
        "exits": dyn.num_exits,
        "exit_macs": [m / dyn.static_macs for m in dyn.exit_macs()],
        "budget": args.budget,
        "thresholds": list(cal.thresholds),
        "calib_macs": cal.macs_fraction,
        "calib_acc": cal.accuracy,
        "train_images": len(fit),
        "calib_images": len(calib),
        "clean_images": len(clean_labels),
        "attack_images": len(attack_labels),
        "input_size": INPUT_SIZE,
        "guard": {
            "window": args.window,
            "gain": args.gain,
            "passes": args.passes,
            "steady_passes": args.steady_passes,
        },
        "heads_seconds": ft.seconds,
        "rows": [],
    }
    rows = out["rows"]
    for name, pixels, labels in (
        ("clean (test subset)", clean_pixels, clean_labels),
        ("clean (attacked images)", attack_pixels, attack_labels),
    ):
        rows.append(
            {
                "input": name,
                "eps": 0,
                "steps": 0,
                "images": len(labels),
                "off": measure_off(dyn, pixels, labels),
                "on": measure_on(dyn, pixels, labels, args, args.seed),
            }
        )
        print(f"{name}: {rows[-1]}", flush=True)
    for eps in args.eps:
        for steps in args.steps:
            t0 = time.perf_counter()
            adv = slowdown_pgd(dyn, attack_pixels, eps / 255, steps, args.seed)
            rows.append(
                {
                    "input": "PGD",
                    "eps": eps,
                    "steps": steps,
                    "images": len(attack_labels),
                    "attack_seconds": time.perf_counter() - t0,
                    "off": measure_off(dyn, adv, attack_labels),
                    "on": measure_on(dyn, adv, attack_labels, args, args.seed),
                }
            )
            print(f"eps {eps}/255, {steps} steps: {rows[-1]}", flush=True)
    out["seconds"] = time.perf_counter() - start
    return out


# --- the report --------------------------------------------------------------------------------


def render() -> str:
    result = read_result(NAME)
    lines = ["# Slowdown attacks and the budget guard", ""]
    if result is None:
        return "\n".join(lines + missing(NAME, f"python -m benchmarks {NAME} --data DATA"))
    measured = result.data["strategies"]
    exits = {k: r for k, r in measured.items() if r.get("kind") != "units"}
    units = {k: r for k, r in measured.items() if r.get("kind") == "units"}
    for strategy, r in exits.items():
        lines += headline(strategy, r)
    for r in units.values():
        lines += unit_headline(r)
    lines += [
        "Early exits and the resolution cascade: CIFAR ResNet-20 converted through "
        "`dynify.convert`, its new parts "
        "fine-tuned in heads mode (`dynify.finetune`), calibrated to the budget on held-out "
        "cifar10/train images (`dynify.calibrate`), measured on cifar10/test. Attack: PGD on the "
        "[0, 1] pixels, L-inf eps, random start, step 2.5 eps / steps, descending "
        "sum_i relu(score_i - threshold_i) over the exits (DeepSloth's aim: no exit reached).",
        "",
    ]
    for strategy, r in exits.items():
        lines += table(strategy, r)
    for key, r in units.items():
        lines += unit_table(key, r)
    lines += [
        "MACs: mean per image as a fraction of the static network's, every exit passed "
        "included, as the runtime records them (`last_macs`). To end: share of images that ran "
        "to the final classifier (full resolution). Off: the calibrated thresholds. On: "
        "streamed one image at a time through `dynify.BudgetGuard` with the same budget. Level: "
        "how far the guard had moved the thresholds towards 0 at the end (served thresholds = "
        "calibrated x (1 - level)). The attack targets the calibrated thresholds; an attacker "
        "cannot push a score below a threshold of 0, so at level 1 every image leaves at the "
        "first exit. Accuracy on attacked images is not comparable with clean accuracy: images "
        "pushed to the end are classified by the full network.",
        "",
        UNIT_NOTES,
        "",
        f"Not measured: {NOT_MEASURED}.",
        "",
        *provenance(result),
    ]
    return "\n".join(lines)


def headline(strategy: str, r: dict) -> list[str]:
    worst = [row for row in r["rows"] if row["eps"] == 8 and row["steps"] == 30]
    if not worst:
        return []
    on = worst[0]["on"]["macs"]
    target = r["budget"] + 0.05
    verdict = "met" if on <= target else "missed"
    clean = r["rows"][0]
    return [
        f"**{STRATEGIES.get(strategy, strategy).capitalize()}:** under PGD 8/255, 30 steps, the "
        f"mean cost is {worst[0]['off']['macs']:.3f} of the static MACs with the calibrated "
        f"thresholds ({100 * worst[0]['off']['to_end']:.1f} % of images to the end) and "
        f"**{on:.3f} with `BudgetGuard(budget={r['budget']})`** (target <= {target:.2f}: "
        f"{verdict}). On clean test images the guard costs "
        f"{100 * (clean['off']['acc'] - clean['on']['acc']):.2f} points of accuracy "
        f"({100 * clean['off']['acc']:.2f} % off, {100 * clean['on']['acc']:.2f} % on); on the "
        f"attacked images it answers {100 * worst[0]['on']['acc']:.2f} % right "
        f"({100 * worst[0]['off']['acc']:.2f} % without it, having run them to the end).",
        "",
    ]


def table(strategy: str, r: dict) -> list[str]:
    g = r["guard"]
    lines = [
        f"## {STRATEGIES.get(strategy, strategy).capitalize()} (`{strategy}`)",
        "",
        f"{r['exits']} exit(s) before the final classifier (exit MACs "
        + ", ".join(f"{m:.3f}" for m in r["exit_macs"])
        + f" of static), trained on {r['train_images']} cifar10/train images "
        f"({r['heads_seconds']:.0f} s), calibrated to a budget of {r['budget']} on "
        f"{r['calib_images']} held-out cifar10/train images (there: {r['calib_macs']:.3f} of the "
        f"MACs, {100 * r['calib_acc']:.2f} %; thresholds "
        + ", ".join(f"{t:.3f}" for t in r["thresholds"])
        + f"). Guard: window {g['window']}, gain {g['gain']}; guard-on figures are over the "
        f"last {g['steady_passes']} of {g['passes']} shuffled passes streamed one image at a "
        "time ('stream': all passes, the transient included).",
        "",
        "| input | eps | steps | images | MACs off | to end off | acc off | MACs on | "
        "to end on | acc on | MACs on (stream) | acc on (stream) | final level |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["rows"]:
        off, on = row["off"], row["on"]
        eps = f"{row['eps']}/255" if row["eps"] else "-"
        steps = str(row["steps"]) if row["steps"] else "-"
        lines.append(
            f"| {row['input']} | {eps} | {steps} | {row['images']} | {off['macs']:.3f} | "
            f"{100 * off['to_end']:.1f} % | {100 * off['acc']:.2f} % | {on['macs']:.3f} | "
            f"{100 * on['to_end']:.1f} % | {100 * on['acc']:.2f} % | {on['stream_macs']:.3f} | "
            f"{100 * on['stream_acc']:.2f} % | {on['final_level']:.3f} |"
        )
    return [*lines, ""]
