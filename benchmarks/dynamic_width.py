"""Dynamic width on the pretrained CIFAR ResNet-44: accuracy vs MACs, widths, batch-1 latency.

    python -m benchmarks dynamic_width --data ../shared/data --steps 352 --epochs 2 \
        --budget 0.5 --calib 5000 --threads 1

Through the public API:
1. `dynify.convert("cifar_resnet44", "dynamic-width")` from the pretrained weights (every
   residual branch conv -> BN -> ReLU -> conv -> BN, widths 1/4, 1/2, 3/4, 1 of its channels);
2. `dynify.finetune(..., mode="joint")` on a seeded subset of the fit part of cifar10/train
   (the backbone learns to work at narrow widths, the gates to choose them, towards `--budget`);
3. `dynify.operating_points` over a grid of thresholds on a held-out calibration part of
   cifar10/train and on cifar10/test; the reported point is the cheapest one whose calibration
   accuracy is within `--max-drop` of the fine-tuned network's own at full width (chosen on
   calibration only: `dynify.choose_operating_point(min_accuracy=...)`);
4. the fair baseline `dynify.finetune_static`: the static ResNet-44 fine-tuned on the same
   images for as many epochs; the widths each test image runs per branch; batch-1 eager CPU
   latency (1 thread) of the dynamic model against the original network, alternating in runs.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

import torch

import dynify
from benchmarks import block_gates
from benchmarks.cifar_data import (
    DEFAULT_CACHE,
    INPUT_SIZE,
    accuracy,
    fit_and_calibration,
    load_cifar,
    normalized_images,
    subsample,
    weights_path,
)
from benchmarks.report import missing, provenance
from benchmarks.results import read_result
from benchmarks.timing import alternating_runs

NAME = "dynamic_width"
GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9]
FULL_COMMAND = (
    "python -m benchmarks dynamic_width --data ../shared/data --steps 352 --epochs 2 "
    "--static-epochs 2 --budget 0.5 --calib 5000 --threads 1"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--depth", type=int, default=44, help="the CIFAR ResNet's depth")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--steps", type=int, default=352, help="batches' worth of fit images")
    parser.add_argument("--epochs", type=int, default=2, help="passes over those images")
    parser.add_argument("--static-epochs", type=int, default=2, help="the baseline (0: none)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--calib", type=int, default=5000, help="calibration images")
    parser.add_argument("--max-drop", type=float, default=0.01, help="accuracy points / 100")
    parser.add_argument("--latency-repeats", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=0, help="0: all 5,000")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--mechanism",
        action="store_true",
        help="only time the converted network with every gate forced to one width (no training)",
    )


def apply_quick(args: argparse.Namespace) -> None:
    args.steps, args.epochs, args.static_epochs = 2, 1, 1
    args.batch_size = 32
    args.calib, args.test_images, args.latency_repeats = 128, 128, 10


def train(dyn, fit, args) -> dict:
    """Joint fine-tuning as the block-gates suite does it (same subset, recipe and log)."""
    out = block_gates.train(dyn, fit, args)
    out["steps"] *= args.epochs  # counted over every epoch here
    return out


def static_baseline(args, data: dict) -> dict:
    """The static network fine-tuned alone for as many epochs over the same images."""
    model, _ = dynify.build_model(
        f"cifar_resnet{args.depth}", weights=weights_path(args.data, args.depth)
    )
    result = dynify.finetune_static(
        model,
        block_gates.fit_subset(data["fit"], args),
        epochs=args.static_epochs,
        input_size=INPUT_SIZE,
        batch_size=args.batch_size,
        seed=0,
    )
    out = {
        "test_acc": accuracy(model, data["test"]),
        "epochs": args.static_epochs,
        "seconds": round(result.seconds, 1),
    }
    print(f"== static fine-tuned: {out}", flush=True)
    return out


@torch.no_grad()
def width_statistics(dyn, batches: list[torch.Tensor]) -> dict:
    """At the current thresholds: per branch, how many test images run each width; how many
    distinct width plans (one width per branch) the images take and the commonest one's share;
    and the share of branches whose width varies between images (a plan that is the same for
    every image is pruning, not dynamic width)."""
    rows = []
    for x in batches:
        dyn(x)
        rows.append(dyn.last_decisions())
    widths = torch.cat(rows)  # [images, branches]
    k = max(b.num_widths for b in dyn.width_plan())
    per_branch = [torch.bincount(col, minlength=k).tolist() for col in widths.T]
    plans = Counter(tuple(r) for r in widths.tolist())
    varying = sum(1 for counts in per_branch if sum(c > 0 for c in counts) > 1)
    # Per image, the fraction of branches whose width differs from that branch's commonest.
    modes = torch.tensor([max(range(k), key=lambda j: c[j]) for c in per_branch])
    off_mode = (widths != modes).double().mean(1)
    return {
        "per_branch": per_branch,
        "overall": torch.bincount(widths.reshape(-1), minlength=k).tolist(),
        "distinct_plans": len(plans),
        "commonest_plan_share": max(plans.values()) / len(widths),
        "branches_varying": varying,
        "branches": widths.shape[1],
        "mean_off_mode_share": float(off_mode.mean()),
    }


def latency(original, dyn, images: torch.Tensor, repeats: int) -> dict:
    """Batch-1 latency (ms, 1 thread, mean) of the original network and the dynamic model at
    its thresholds, alternating in runs of 10 consecutive images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    macs = []

    def record(name: str) -> None:
        if name == "dynamic":
            macs.append(float(dyn.last_macs[0]))

    try:
        models = {"static": original.eval(), "dynamic": dyn.eval()}
        with torch.no_grad():
            for i in range(10):
                for model in models.values():
                    model(images[i : i + 1])
        times = alternating_runs(models, images, repeats, 10, after=record)
    finally:
        torch.set_num_threads(threads)
    mean = {k: statistics.fmean(v) * 1e3 for k, v in times.items()}
    fraction = statistics.fmean(macs) / dyn.static_macs
    ratio = mean["dynamic"] / mean["static"]
    return {
        "static_ms": round(mean["static"], 3),
        "dynamic_ms": round(mean["dynamic"], 3),
        "ratio": round(ratio, 4),
        "macs_fraction": round(fraction, 4),
        "fall_over_mac_fall": round(_fall(ratio, fraction), 3),
    }


def _fall(latency_ratio: float, macs_fraction: float) -> float:
    saved = 1 - macs_fraction
    return (1 - latency_ratio) / saved if saved > 0.01 else float("nan")


def mechanism(args: argparse.Namespace) -> dict:
    """Batch-1 latency of the converted (untrained) network with every branch at one width,
    against the original, all models alternating in runs of 10 images: what the narrow
    convolutions and the gates cost, apart from what training teaches the gates."""
    torch.set_num_threads(args.threads)
    _, test_set = load_cifar(args.data, args.cache)
    images = normalized_images(subsample(test_set, max(args.latency_repeats, 20)))
    net = f"cifar_resnet{args.depth}"
    weights = weights_path(args.data, args.depth)
    original, _ = dynify.build_model(net, weights=weights)
    labels = ["1/4", "1/2", "3/4", "full"]
    models: dict = {"static": original.eval()}
    dyns = {}
    for w in range(4):
        dyn = dynify.convert(net, "dynamic-width", weights=weights).eval()
        dyn.force_width(w)  # every gate certain of width w
        dyns[labels[w]] = dyn
        models[labels[w]] = dyn
    no_gates = dynify.convert(net, "dynamic-width", weights=weights).eval()
    no_gates.set_thresholds(1.01)
    models["full, no gates"] = no_gates
    macs: dict = {name: [] for name in models}

    def record(name: str) -> None:
        if name != "static":
            macs[name].append(float(models[name].last_macs[0]))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for i in range(10):
                for model in models.values():
                    model(images[i : i + 1])
        times = alternating_runs(models, images, args.latency_repeats, 10, after=record)
    finally:
        torch.set_num_threads(threads)
    static_ms = statistics.fmean(times["static"]) * 1e3
    rows = []
    for name in models:
        if name == "static":
            continue
        ms = statistics.fmean(times[name]) * 1e3
        fraction = statistics.fmean(macs[name]) / no_gates.static_macs
        rows.append(
            {
                "widths": name,
                "macs_fraction": round(fraction, 4),
                "ms": round(ms, 3),
                "ratio": round(ms / static_ms, 4),
                "fall_over_mac_fall": round(_fall(ms / static_ms, fraction), 3),
            }
        )
    out = {"net": net, "static_ms": round(static_ms, 3), "rows": rows, "images": len(images)}
    print(f"== mechanism {out}", flush=True)
    return out


def run(args: argparse.Namespace) -> dict[str, dict]:
    if args.mechanism:
        return {f"{NAME}_mechanism": mechanism(args)}
    torch.set_num_threads(args.threads)
    train_set, test_set = load_cifar(args.data, args.cache)
    fit, calib = fit_and_calibration(train_set, 0)
    # every k-th image of the held-out part: it is in class order, so its first N would hold
    # only the first classes
    calib = subsample(calib, args.calib)
    test_set = subsample(test_set, args.test_images)
    images = normalized_images(test_set)
    data = {"fit": fit, "calib": calib, "test": test_set}
    out: dict = {
        "net": f"cifar_resnet{args.depth}",
        "settings": dict(vars(args)),  # paths become strings in write_result
        "full_command": FULL_COMMAND,
    }
    net = f"cifar_resnet{args.depth}"
    weights = weights_path(args.data, args.depth)
    original, _ = dynify.build_model(net, weights=weights)
    out["original_test_acc"] = accuracy(original, test_set)
    if args.static_epochs:
        out["static_ft"] = static_baseline(args, data)
    torch.manual_seed(0)
    dyn = dynify.convert(net, "dynamic-width", weights=weights, options={"budget": args.budget})
    out["branches"] = dyn.num_branches
    out["widths"] = [list(b.widths) for b in dyn.width_plan()]
    out["min_macs_fraction"] = dyn.min_macs() / dyn.static_macs
    print(f"== {net} dynamic-width, {dyn.num_branches} branches", flush=True)
    out["train"] = train(dyn, fit, args)
    dyn.eval()
    with dyn.static():
        out["full_width_calib_acc"] = accuracy(dyn, calib)
        out["full_width_test_acc"] = accuracy(dyn, test_set)
    points = dynify.operating_points(dyn, calib, test_set, thresholds=GRID, batch_size=500)
    out["curve"] = [
        {
            "threshold": p.target["threshold"],
            "calib_acc": p.calibration_accuracy,
            "calib_macs": p.calibration_macs,
            "test_acc": p.test_accuracy,
            "test_macs": p.test_macs,
        }
        for p in points
    ]
    chosen = dynify.choose_operating_point(
        points, min_accuracy=out["full_width_calib_acc"] - args.max_drop
    )
    out["chosen"] = {
        "threshold": chosen.target["threshold"],
        "calib_acc": chosen.calibration_accuracy,
        "test_acc": chosen.test_accuracy,
        "test_macs": chosen.test_macs,
    }
    dyn.set_thresholds(chosen.target["threshold"])
    batches = [images[i : i + 500] for i in range(0, len(images), 500)]
    out["width_stats"] = width_statistics(dyn, batches)
    out["latency"] = latency(
        original, dyn, images[: max(args.latency_repeats, 20)], args.latency_repeats
    )
    print(f"    chosen {out['chosen']} latency {out['latency']}", flush=True)
    return {NAME: out}


def _pct(x: float) -> str:
    return f"{x:.2%}"


def render() -> str:
    lines = ["# Dynamic width on CIFAR-10 (pretrained CIFAR ResNet-44, JPEG CIFAR-10)", ""]
    result = read_result(NAME)
    if result is None:
        return "\n".join(lines + missing(NAME, FULL_COMMAND))
    out = result.data
    c, lat, ws = out["chosen"], out["latency"], out["width_stats"]
    base = out.get("static_ft", {}).get("test_acc")
    delta = "" if base is None else f" ({100 * (c['test_acc'] - base):+.2f} points)"
    lines += [
        "**Current result** (targets: at most 0.5 of the MACs within 1 point of the static "
        "network fine-tuned as long; batch-1 eager latency falling at least 0.8 as much as the "
        "MACs):",
        "",
        f"- at the threshold chosen on calibration (cheapest within {out['settings']['max_drop']:.0%} "
        f"of full width there): {_pct(c['test_acc'])} on cifar10/test at **{c['test_macs']:.3f} of "
        f"the MACs**; static ResNet-44 fine-tuned as long: "
        f"{'-' if base is None else _pct(base)}{delta}. MAC target "
        f"{'met' if c['test_macs'] <= 0.5 and base is not None and c['test_acc'] >= base - 0.01 else 'not met'}.",
        f"- batch-1 eager latency {lat['dynamic_ms']:.2f} / {lat['static_ms']:.2f} ms = "
        f"{lat['ratio']:.3f} of the original at {lat['macs_fraction']:.3f} of its MACs: latency "
        f"falls **{lat['fall_over_mac_fall']:.2f}** as much as the MACs (target 0.8: "
        f"{'met' if lat['fall_over_mac_fall'] >= 0.8 else 'not met'}).",
        f"- the width choice varies between images in {ws['branches_varying']} of "
        f"{ws['branches']} branches; {ws['distinct_plans']} distinct width plans over the test "
        f"images, the commonest taken by {ws['commonest_plan_share']:.1%}; on average an image "
        f"runs {ws['mean_off_mode_share']:.1%} of its branches at a width other than that "
        "branch's commonest.",
        "",
    ]
    lines += provenance(result)
    settings = out["settings"]
    train = out["train"]
    shortened = settings["steps"] < 352 or settings["epochs"] < 2 or settings["calib"] < 5000
    lines += [
        f"This run: {train['images']:,} fit images x {settings['epochs']} epoch(s) "
        f"({train['steps']} steps of {settings['batch_size']}), static baseline "
        f"{settings['static_epochs']} epoch(s) over the same images, calibration on "
        f"{settings['calib']:,} held-out cifar10/train images, "
        f"{'all 5,000' if not settings['test_images'] else settings['test_images']} cifar10/test "
        "images."
        + (
            " **Shortened** to fit a loaded shared 2-core machine; the full run (45,056 fit "
            "images x 2 epochs, 5,000 calibration images) is:"
            if shortened
            else " The full run:"
        ),
        "",
        "```",
        out.get("full_command", FULL_COMMAND),
        "```",
        "",
        "Fine-tuning: joint (`dynify.finetune(..., mode='joint')`), the gates with Adam, the "
        "backbone with clipped SGD, batch-norm statistics frozen "
        "(`DynamicWidthModel.joint_recipe`); straight-through Gumbel-softmax width choices, "
        "a PI-controlled MAC price towards the budget. Accuracies on cifar10/test (5,000 JPEG "
        "images) unless marked calibration.",
        "",
        "| original | static fine-tuned | full width (after fine-tuning) | dynamic | MACs | "
        "threshold |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {_pct(out['original_test_acc'])} | {'-' if base is None else _pct(base)} | "
        f"{_pct(out['full_width_test_acc'])} | {_pct(c['test_acc'])} | {c['test_macs']:.3f} | "
        f"{c['threshold']} |",
        "",
        "Accuracy vs MACs at every threshold of the sweep (threshold 0: every branch at its "
        f"narrowest width, {out['min_macs_fraction']:.3f} of the MACs; above 1: full width):",
        "",
        "| threshold | calibration accuracy | calibration MACs | test accuracy | test MACs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in out["curve"]:
        lines.append(
            f"| {p['threshold']} | {_pct(p['calib_acc'])} | {p['calib_macs']:.3f} | "
            f"{_pct(p['test_acc'])} | {p['test_macs']:.3f} |"
        )
    lines += _mechanism_lines()
    names = ["1/4", "1/2", "3/4", "full"]
    total = sum(ws["overall"])
    lines += [
        "",
        "Widths run at the chosen threshold, over all branches and test images: "
        + ", ".join(
            f"{names[j] if j < len(names) else j}: {n / total:.1%}"
            for j, n in enumerate(ws["overall"])
        )
        + ".",
        "",
        "| branch | " + " | ".join(names[: len(ws["overall"])]) + " |",
        "| --- |" + " --- |" * len(ws["overall"]),
    ]
    for b, counts in enumerate(ws["per_branch"]):
        n = sum(counts)
        lines.append(f"| {b} | " + " | ".join(f"{v / n:.0%}" for v in counts) + " |")
    return "\n".join(lines) + "\n"


def _mechanism_lines() -> list[str]:
    result = read_result(f"{NAME}_mechanism")
    if result is None:
        return []
    out = result.data
    lines = [
        "",
        f"The mechanism alone: the converted {out['net'].replace('cifar_', '')} before "
        "training, every gate forced to one width (gates run), against the original network; "
        f"batch 1, 1 thread, mean over {out['images']} test images, the models alternating in "
        f"runs of 10 (original: {out['static_ms']:.2f} ms).",
        "",
    ]
    lines += provenance(result, "these timings")
    lines += [
        "| widths | MACs (of static) | batch-1 latency | of the original | latency fall / MAC fall |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in out["rows"]:
        fall = row["fall_over_mac_fall"]
        lines.append(
            f"| {row['widths']} | {row['macs_fraction']:.3f} | {row['ms']:.2f} ms | "
            f"{row['ratio']:.3f} | {'-' if fall != fall else f'{fall:.2f}'} |"
        )
    return lines
