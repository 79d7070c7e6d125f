"""Block gates on pretrained CIFAR ResNet-32/-44, each decider: accuracy, MACs, latency.

    python -m benchmarks block_gates --data ../shared/data --nets 32 44 \
        --gates policy function halting --steps 352 --epochs 2 --budget 0.65 --calib 5000 \
        --max-macs 0.7 --static-epochs 2 --halting-compute-weight 5 --threads 1

Per network and gate kind (function, halting, policy), through the public API:
1. `dynify.convert(..., "block-gates")` from the pretrained weights;
2. `dynify.finetune(..., mode="joint")` on a seeded subset of the 45k fit part of cifar10/train
   (the gates' recipe: clipped SGD for the backbone, Adam for the decision units, BN statistics
   frozen), towards the MAC `--budget`;
3. `dynify.operating_points` over a grid of thresholds on a held-out calibration part of
   cifar10/train and on cifar10/test, and `dynify.choose_operating_point`: the most accurate
   point on calibration within `--max-macs` (calibration accuracy alone cannot place it: the
   pretrained weights saw those images);
4. the fair baseline `dynify.finetune_static` (the static network fine-tuned as long), and
   batch-1 CPU latency (1 thread) of the dynamic model at the chosen threshold against the
   original network, each timed in runs of consecutive test images, the two alternating.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import Subset

import dynify
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
from benchmarks.results import Result, read_result
from benchmarks.timing import alternating_runs

NAME = "block_gates"
# Re-runs of the published settings through this suite: the policy network at full length
# (one results file per net), and all three deciders shortened (fewer steps and epochs); each
# with the batch-1 latency of its saved models, measured apart on an idle machine.
FULL = ("block_gates_resnet32_policy_full", "block_gates_resnet44_policy_full")
FULL_LATENCY = "block_gates_policy_full_latency"
SHORT = "block_gates_resnet32_short"
SHORT_LATENCY = "block_gates_resnet32_short_latency"
# Threshold 1.01 (every block runs) is the fine-tuned static network, measured separately.
GRIDS = {
    "function": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
    "policy": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
    "halting": [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99],
}
# Published anchors on CIFAR-10 ResNet-110 (trained for hundreds of epochs on the original PNG
# images, so absolute accuracies are not comparable with this JPEG split; what compares is the
# compute saved and the accuracy cost), each with where it was read. Figures that could not be
# checked against a source are not given: a misquoted anchor is worse than none.
ANCHORS = [
    (
        "SkipNet-110, HRL + SP, recurrent gates (Wang et al. 2018)",
        "50 % fewer FLOPs, accuracy within 0.5 points of ResNet-110's 93.60 %; the released "
        "checkpoint: 93.30 % at 49.5 % of the FLOPs",
        "paper, Sec. 4.1 and Table 2; github.com/ucbdrive/skipnet cifar/README.md",
    ),
    (
        "BlockDrop, ResNet-110 (Wu et al. 2018)",
        "93.6 % with 16.9 of 54 blocks on average (1.81e8 FLOPs per image); the static "
        "ResNet-110 checkpoint it starts from: 93.2 % (its file name)",
        "github.com/Tushar-N/blockdrop Readme.md (not checked against the paper's table)",
    ),
    (
        "ConvNet-AIG 110 (Veit & Belongie 2018)",
        "about 82 % of the layers executed on average (t = 0.7), above ResNet-110's accuracy; "
        "its error and FLOPs could not be checked",
        "quoted from the paper by two third-party summaries",
    ),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--nets", type=int, nargs="+", default=[32, 44])
    parser.add_argument("--gates", nargs="*", default=["policy", "function", "halting"])
    parser.add_argument("--steps", type=int, default=352, help="batches' worth of fit images")
    parser.add_argument("--epochs", type=int, default=2, help="passes over those images")
    parser.add_argument("--static-epochs", type=int, default=2, help="the baseline (0: none)")
    parser.add_argument("--compute-weight", type=float, default=None)
    parser.add_argument(
        "--halting-compute-weight", type=float, default=5.0, help="compute weight for halting"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--budget", type=float, default=0.65)
    parser.add_argument("--calib", type=int, default=5000, help="calibration images")
    parser.add_argument("--max-macs", type=float, default=0.7, help="operating point MAC cap")
    parser.add_argument("--latency-repeats", type=int, default=300)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--test-images", type=int, default=0, help="quick runs only (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-dir", type=Path, default=None, help="save each trained model")
    parser.add_argument(
        "--from-artifacts", type=Path, default=None, help="measure models a --save-dir run wrote"
    )
    parser.add_argument(
        "--no-latency",
        action="store_true",
        help="accuracy and MACs only: time the saved models later with --from-artifacts on an "
        "idle machine",
    )
    parser.add_argument("--name", default=NAME, help="results name (default: the published one)")


def apply_quick(args: argparse.Namespace) -> None:
    args.nets = [32] if args.nets == [32, 44] else args.nets[:1]
    args.gates = args.gates[:1] or ["policy"]
    args.steps, args.epochs, args.static_epochs = 4, 1, 1
    args.calib, args.test_images = 256, 256
    args.latency_repeats, args.latency_rounds = 20, 1


@torch.no_grad()
def plan_diversity(dyn, batches: list[torch.Tensor]) -> dict:
    """How many distinct run/skip plans the test images take, and the commonest one's share:
    a policy that collapsed to one plan is block removal, not a per-sample decision."""
    counts = plan_counts(dyn, batches)
    return {"distinct": len(counts), "commonest_share": max(counts.values()) / sum(counts.values())}


def plan_counts(dyn, inputs) -> Counter:
    """How many samples of the input batches take each run/skip plan (current thresholds)."""
    counts: Counter = Counter()
    for x in inputs:
        dyn(x)
        counts.update(tuple(row) for row in dyn.last_decisions().tolist())
    return counts


def latency(
    static_model, dyn, images: torch.Tensor, repeats: int, rounds: int = 1, block: int = 10
) -> list[dict]:
    """Batch-1 latency (ms, 1 thread) of the original static module, the dynamic model and the
    dynamic model in static mode, each timed as a server runs a model: in runs of `block`
    consecutive images (the first call of a run, just after switching models, is not timed).
    The models take turns run by run over the same images, so drift in the machine's speed hits
    all alike. (Alternating image by image, each call follows the other model's, with its own
    weights and code cold: that moved the ratio by ~0.04 on ResNet-44, docs/block_gates.md.)
    One result per round of `repeats` images; the models are built once.

    The headline ratio is of means, like the MAC fraction it is compared with: with per-image
    plans the median image is not the mean one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def static_mode(x: torch.Tensor) -> torch.Tensor:
        with dyn.static():
            return dyn(x)

    models = {"static": static_model.eval(), "dynamic": dyn.eval(), "static_mode": static_mode}
    plan = common_plan(dyn, images[:100])
    skipped = [k for k, run in enumerate(plan) if not run]
    gated = dyn.gate_plan()
    if all(gated[k].identity_shortcut for k in skipped):  # relu(x + 0) = x: removable
        blocks = [gated[k].block for k in skipped]
        models["removed"] = without_blocks(static_model, blocks).eval()
    try:
        for i in range(10):
            for model in models.values():
                model(images[i : i + 1])
        return [_latency_round(models, dyn, images, repeats, block, skipped) for _ in range(rounds)]
    finally:
        torch.set_num_threads(threads)


def _latency_round(models: dict, dyn, images, repeats: int, block: int, skipped: list) -> dict:
    macs, plans = [], set()
    gated = dyn.gate_plan()

    def record(name: str) -> None:
        if name == "dynamic":
            macs.append(float(dyn.last_macs[0]))
            plans.add(tuple(dyn.last_decisions()[0].tolist()))

    times = alternating_runs(models, images, repeats, block, after=record)
    mean = {k: statistics.fmean(v) * 1e3 for k, v in times.items()}
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    removed = {}
    if "removed" in models:
        removed = {
            "removed_blocks": [gated[k].block for k in skipped],
            "removed_ms": round(mean["removed"], 3),
            "ratio_removed": round(mean["removed"] / mean["static"], 4),
            "removed_macs_fraction": round(
                1 - sum(gated[k].branch_macs for k in skipped) / dyn.static_macs, 4
            ),
        }
    return {
        **removed,
        "protocol": f"runs of {block} consecutive images per model, models alternating",
        "static_ms": round(mean["static"], 3),
        "dynamic_ms": round(mean["dynamic"], 3),
        "static_mode_ms": round(mean["static_mode"], 3),
        "static_median_ms": round(median["static"], 3),
        "dynamic_median_ms": round(median["dynamic"], 3),
        "ratio_mean": round(mean["dynamic"] / mean["static"], 4),
        "ratio_median": round(median["dynamic"] / median["static"], 4),
        "ratio_vs_static_mode": round(mean["dynamic"] / mean["static_mode"], 4),
        "macs_fraction": round(statistics.fmean(macs) / dyn.static_macs, 4),
        "distinct_plans": len(plans),
    }


def common_plan(dyn, images: torch.Tensor) -> list[bool]:
    """The run/skip plan the most images of `images` take (batch 1, current thresholds)."""
    counts = plan_counts(dyn, (images[i : i + 1] for i in range(len(images))))
    return list(counts.most_common(1)[0][0])


def without_blocks(model: torch.nn.Module, blocks: list[str]) -> torch.nn.Module:
    """A copy of a CIFAR ResNet with the named residual blocks' branches removed: the physical
    floor for skipping them, no decision or Python of any kind. A block keeps what a skipped
    gated block still computes: nothing with an identity shortcut, ReLU(shortcut) with the
    downsampling one (function and policy gates also gate a stage's first block)."""
    model = copy.deepcopy(model)
    for name in blocks:
        block = model.get_submodule(name)
        if not isinstance(getattr(block, "shortcut", None), torch.nn.Module):
            raise ValueError(f"{name} is not a residual block of {type(model).__name__}")
        parent, child = name.rsplit(".", 1)
        rest = block.shortcut
        if not isinstance(rest, torch.nn.Identity):
            rest = torch.nn.Sequential(rest, torch.nn.ReLU())
        setattr(model.get_submodule(parent), child, rest)
    return model


def fit_subset(fit, args) -> Subset:
    """The first `--steps` batches' worth of a seeded shuffle of the fit part."""
    images = min(args.steps * args.batch_size, len(fit))
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(0))[:images]
    return Subset(fit, order.tolist())


def train(dyn, fit, args) -> dict:
    """Joint fine-tuning with `dynify.finetune` on `fit_subset` of the fit part, towards
    `--budget`, logging the loss terms every 20 steps."""
    subset = fit_subset(fit, args)
    images = len(subset)
    history: list[dict] = []

    def log(info: dict) -> None:
        if info["step"] % 20 == 0:
            keep = ("loss", "distill", "macs_fraction", "greedy_macs_fraction", "compute_price")
            history.append(
                {"step": info["step"], **{k: round(info[k], 4) for k in keep if k in info}}
            )
            print(f"    step {info['step']}: {history[-1]}", flush=True)

    result = dynify.finetune(
        dyn,
        subset,
        mode="joint",
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        budget=args.budget,
        calibration_fraction=0.0,
        progress=False,
        callback=log,
    )
    steps = images // args.batch_size
    return {
        "steps": steps,
        "images": images,
        "seconds": round(result.seconds, 1),
        "history": history,
    }


def run_gate(depth: int, kind: str, args, data: dict, out: dict) -> None:
    name = f"cifar_resnet{depth}"
    weights = weights_path(args.data, depth)
    original, _ = dynify.build_model(name, weights=weights)
    key = f"{name}/{kind}"
    print(f"== {key}", flush=True)
    torch.manual_seed(0)
    options = {"gate": kind, "budget": args.budget}
    weight = args.halting_compute_weight if kind == "halting" else args.compute_weight
    if weight is not None:
        options["compute_weight"] = weight
    dyn = dynify.convert(name, "block-gates", weights=weights, options=options)
    res: dict = {
        "net": name,
        "gate": kind,
        "static_macs": dyn.static_macs,
        "gated_blocks": dyn.num_gates,
    }
    if name not in out.setdefault("original", {}):
        out["original"][name] = accuracy(original, data["test"])
    res["original_test_acc"] = out["original"][name]
    res["settings"] = {"steps": args.steps, "recipe": asdict(dyn.joint_recipe), "options": options}
    if args.from_artifacts is not None:  # measure again what a --save-dir run trained
        dyn = dynify.load(args.from_artifacts / f"{name}-{kind}.dyn")
        res["train"] = {"recorded": False}
    else:
        res["train"] = train(dyn, data["fit"], args)
    with dyn.static():
        res["static_ft_calib_acc"] = accuracy(dyn, data["calib"])
        res["static_ft_test_acc"] = accuracy(dyn, data["test"])
    points = dynify.operating_points(
        dyn, data["calib"], data["test"], thresholds=GRIDS[kind], batch_size=500
    )
    res["calib_sweep"] = [
        {
            "threshold": p.target["threshold"],
            "calib_acc": p.calibration_accuracy,
            "calib_macs": p.calibration_macs,
        }
        for p in points
    ]
    res["test_curve"] = [
        {"threshold": p.target["threshold"], "test_acc": p.test_accuracy, "test_macs": p.test_macs}
        for p in points
    ]
    chosen = dynify.choose_operating_point(points, max_macs=args.max_macs)
    res["chosen_threshold"] = chosen.target["threshold"]
    res["max_macs"] = args.max_macs
    res["chosen"] = {
        "threshold": chosen.target["threshold"],
        "test_acc": chosen.test_accuracy,
        "test_macs": chosen.test_macs,
    }
    dyn.set_thresholds(chosen.target["threshold"])
    res["plans"] = plan_diversity(dyn, data["test_batches"])
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        dynify.save(dyn, args.save_dir / f"{name}-{kind}.dyn")
    out.setdefault("runs", {})[key] = res
    if args.no_latency:
        return
    # Timing on a shared 2-core VM scatters by several percent from minute to minute: measure
    # several rounds and report the one with the median ratio, with the others' falls.
    rounds = latency(
        original, dyn, data["latency_images"], args.latency_repeats, args.latency_rounds
    )
    rounds.sort(key=lambda r: r["ratio_mean"])
    res["latency"] = rounds[len(rounds) // 2]
    res["latency"]["round_falls"] = [
        round(_fall(r["ratio_mean"], r["macs_fraction"]), 3) for r in rounds
    ]
    print(f"    chosen {res['chosen']} latency {res['latency']}", flush=True)


def static_baseline(depth: int, args, data: dict, out: dict) -> None:
    """The static network fine-tuned alone for as many epochs over the same images."""
    name = f"cifar_resnet{depth}"
    model, _ = dynify.build_model(name, weights=weights_path(args.data, depth))
    fit = data["fit"]
    images = args.steps * args.batch_size
    if images < len(fit):  # the images the gates train on (all of them at the defaults)
        order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(0))[:images]
        fit = Subset(fit, order.tolist())
    result = dynify.finetune_static(
        model,
        fit,
        epochs=args.static_epochs,
        input_size=INPUT_SIZE,
        batch_size=args.batch_size,
        seed=0,
    )
    out.setdefault("static_ft", {})[name] = {
        "test_acc": accuracy(model, data["test"]),
        "epochs": args.static_epochs,
        "seconds": round(result.seconds, 1),
    }
    print(f"== {name} static fine-tuned: {out['static_ft'][name]}", flush=True)


def _test_batches(test, size: int):
    """Normalised test images in batches (for counting plans) and the first `size` alone."""
    images = normalized_images(test)
    return [images[i : i + 500] for i in range(0, len(images), 500)], images[:size]


def run(args: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(args.threads)
    train_set, test_set = load_cifar(args.data, args.cache)
    fit, calib = fit_and_calibration(train_set, 0, calib_images=args.calib)
    test_set = subsample(test_set, args.test_images)
    batches, latency_images = _test_batches(test_set, args.latency_repeats)
    data = {
        "fit": fit,
        "calib": calib,
        "test": test_set,
        "test_batches": batches,
        "latency_images": latency_images,
    }
    out: dict = {
        "settings": dict(vars(args))  # paths become strings in write_result
    }
    for depth in args.nets:
        if args.static_epochs:
            static_baseline(depth, args, data, out)
        for kind in args.gates:
            run_gate(depth, kind, args, data, out)
    return {args.name: out}


def _plans(res: dict) -> str:
    plans = res.get("plans")
    if plans is None:
        return "-"
    return f"{plans['distinct']} ({plans['commonest_share']:.0%} take the commonest)"


def _fall(latency_ratio: float, macs_fraction: float) -> float:
    """Latency fall over MAC fall: (1 - latency ratio) / (1 - MAC fraction)."""
    saved = 1 - macs_fraction
    return (1 - latency_ratio) / saved if saved > 0.01 else float("nan")


def headline(out: dict) -> list[str]:
    lines = []
    for res in out.get("runs", {}).values():
        if res["gate"] != "policy":
            continue
        c, lat = res["chosen"], res["latency"]
        base = out.get("static_ft", {}).get(res["net"], {}).get("test_acc")
        delta = (
            ""
            if base is None
            else f", {100 * (c['test_acc'] - base):+.2f} points from the static network fine-tuned as long ({base:.2%})"
        )
        lines.append(
            f"- {res['net']}, policy network (BlockDrop): {c['test_acc']:.2%} at "
            f"**{c['test_macs']:.3f} of the MACs**{delta}; batch-1 eager latency falls "
            f"**{_fall(lat['ratio_mean'], lat['macs_fraction']):.2f}** as much as the MACs."
        )
    if not lines:
        return []
    return [
        "**Current result** (target: at least 30 % fewer MACs within 1 point of the static "
        "network fine-tuned as long, latency falling at least 0.85 as much as the MACs):",
        "",
        *lines,
        "",
    ]


def render() -> str:
    lines = ["# Block gates on CIFAR-10 (pretrained CIFAR ResNets, JPEG CIFAR-10)", ""]
    result = read_result(NAME)
    if result is None:
        return "\n".join(lines + missing(NAME, "python -m benchmarks block_gates"))
    out = result.data
    full = [r for r in map(read_result, FULL) if r is not None]
    timed = read_result(FULL_LATENCY)
    current = _timed_runs(full, timed) if timed is not None else None
    if current is not None and current["runs"]:  # the suite's own run is the current result
        lines += headline(current)
        lines += [
            "From the re-run at the published settings through this suite (its section below "
            "gives the commands); first, the published run of all three deciders, from an "
            "earlier script.",
            "",
            "## The published run: all three deciders",
            "",
        ]
    else:
        lines += headline(out)
    lines += provenance(result)
    lines += [
        "Fine-tuning: joint (`dynify.finetune(..., mode='joint')`), flip/crop augmentation, "
        "backbone SGD cosine with the gradient norm clipped at 2, decision units Adam "
        "(`GatedModel.joint_recipe`), towards a training budget of the static MACs; batch-norm "
        "statistics frozen. Thresholds: swept on held-out cifar10/train images; the chosen one "
        "is the most accurate there within the MAC cap (`dynify.choose_operating_point`). All "
        "accuracies below are on cifar10/test (5,000 JPEG images).",
        "",
        "'every block' is `dyn.static()` after fine-tuning: the same weights with every block "
        "run; 'static fine-tuned' is the original network fine-tuned alone on the same images "
        "for as many epochs (`dynify.finetune_static`, the early-exit benchmark's baseline). "
        "Latency: batch 1, 1 thread, mean over test images, the dynamic model against the "
        "original static module, each timed in runs of consecutive images as a server runs it, "
        "the two alternating run by run; 'latency fall / MAC fall' is (1 - latency ratio) / "
        "(1 - MAC fraction), both on the timed images.",
        "",
        "| net | gate | original | static fine-tuned | every block | dynamic | MACs (of static) | "
        "threshold | batch-1 latency dyn / static (MACs on the timed images) | "
        "latency fall / MAC fall | distinct plans on test |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in out.get("runs", {}).values():
        c, lat = res["chosen"], res["latency"]
        fall = f"{_fall(lat['ratio_mean'], lat['macs_fraction']):.2f}"
        if len(lat.get("round_falls", [])) > 1:
            fall += f" (median of rounds {', '.join(f'{f:.2f}' for f in lat['round_falls'])})"
        separate = out.get("static_ft", {}).get(res["net"], {}).get("test_acc")
        separate = "-" if separate is None else f"{separate:.2%}"
        lines.append(
            f"| {res['net'].replace('cifar_', '')} | {res['gate']} | "
            f"{res['original_test_acc']:.2%} | {separate} | {res['static_ft_test_acc']:.2%} | "
            f"{c['test_acc']:.2%} | {c['test_macs']:.3f} | {res['chosen_threshold']} | "
            f"{lat['dynamic_ms']:.2f} / {lat['static_ms']:.2f} ms = {lat['ratio_mean']:.3f} "
            f"({lat['macs_fraction']:.3f}) | {fall} | {_plans(res)} |"
        )
    for res in out.get("runs", {}).values():
        lat = res["latency"]
        if "ratio_removed" in lat:
            ceiling = _fall(lat["ratio_removed"], lat["removed_macs_fraction"])
            lines += [
                "",
                f"{res['net']}/{res['gate']}: the original network with the blocks of the "
                f"dynamic model's most common plan removed ({lat['removed_blocks']}, "
                f"{lat['distinct_plans']} distinct plans over the timed images) runs in "
                f"{lat['removed_ms']:.2f} ms = {lat['ratio_removed']:.3f} of the original at "
                f"{lat['removed_macs_fraction']:.3f} of its MACs: "
                f"{ceiling:.2f} of the MAC fall, the ceiling for "
                "skipping those blocks.",
            ]
    overrides = [
        f"{r['net']}/{r['gate']}: compute_weight {r['settings']['options']['compute_weight']}"
        for r in out.get("runs", {}).values()
        if "compute_weight" in r.get("settings", {}).get("options", {})
    ]
    if overrides:
        lines += ["", "Runs with other settings than the header's: " + "; ".join(overrides) + "."]
    lines += [
        "",
        "Accuracy vs MACs on cifar10/test at every threshold of the sweep (threshold > 1 is the "
        "'every block' column above):",
        "",
    ]
    lines += [
        "| net | gate | threshold | test accuracy | MACs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for res in out.get("runs", {}).values():
        for p in res["test_curve"]:
            lines.append(
                f"| {res['net'].replace('cifar_', '')} | {res['gate']} | {p['threshold']} | "
                f"{p['test_acc']:.2%} | {p['test_macs']:.3f} |"
            )
    lines += ["", "Calibration sweeps (held-out cifar10/train) are in the JSON file.", ""]
    if full:
        lines += render_rerun(full, out, timed, FULL_LATENCY)
    short = read_result(SHORT)
    if short is not None:
        lines += render_rerun([short], out, read_result(SHORT_LATENCY), SHORT_LATENCY)
    lines += [
        "Published anchors (CIFAR-10 ResNet-110, trained for hundreds of epochs on the original "
        "PNG images: compare the compute saved and the accuracy cost, not the accuracies):",
        "",
        "| method | reported | source |",
        "| --- | --- | --- |",
        *(f"| {name} | {figure} | {source} |" for name, figure, source in ANCHORS),
    ]
    return "\n".join(lines) + "\n"


def _timed_runs(results: list[Result], timed: Result) -> dict:
    """The runs of `results` that `timed` measured the latency of, with that latency, and their
    static baselines: what `headline` reads."""
    latencies = {k: r.get("latency") for k, r in timed.data.get("runs", {}).items()}
    runs = {
        key: {**run, "latency": latencies[key]}
        for result in results
        for key, run in result.data.get("runs", {}).items()
        if latencies.get(key)
    }
    static = {k: v for r in results for k, v in r.data.get("static_ft", {}).items()}
    return {"runs": runs, "static_ft": static}


def render_rerun(
    results: list[Result], published: dict, timed: Result | None, latency_name: str
) -> list[str]:
    """Re-runs through this suite next to the published figures: what differs from the
    published settings, each decider's operating point against the published one, and the
    latency of the saved models if a `--from-artifacts` run timed them."""
    settings = results[0].data["settings"]
    shortened = settings["steps"] < 352 or settings["epochs"] < 2
    title = "Shortened re-run" if shortened else "Re-run at the published settings"
    lines = [f"## {title} through the suite", ""]
    runs = {k: v for r in results for k, v in r.data.get("runs", {}).items()}
    static = {k: v for r in results for k, v in r.data.get("static_ft", {}).items()}
    first = next(iter(runs.values()), None)
    if first is None:
        return [*lines, "(no runs in the results file)", ""]
    images = first["train"].get("images", settings["steps"] * settings["batch_size"])
    training = (
        f"shortened: {settings['steps']} steps x {settings['epochs']} epoch(s) of joint "
        f"fine-tuning ({images} fit images) instead of 352 x 2 (45,000 images twice), the "
        f"static baseline {settings['static_epochs']} epoch(s) on the same images instead of 2"
        if shortened
        else f"in full: {settings['steps']} steps x {settings['epochs']} epochs of joint "
        f"fine-tuning ({images} fit images), the static baseline {settings['static_epochs']} "
        "epochs on the same images"
    )
    lines += [
        f"The published settings (budget {settings['budget']}, {settings['calib']} calibration "
        f"images, MAC cap {settings['max_macs']}, halting compute weight "
        f"{settings['halting_compute_weight']}, batch {settings['batch_size']}, lr "
        f"{settings['lr']}) {training}. Measured on all 5,000 test images; published figures "
        "in brackets.",
        "",
        "| net | gate | static fine-tuned | every block | dynamic | MACs (of static) | threshold "
        "| distinct plans on test | batch-1 latency fall / MAC fall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    timed_runs = timed.data.get("runs", {}) if timed is not None else {}
    old_runs, old_static = published.get("runs", {}), published.get("static_ft", {})
    for key, res in runs.items():
        old = old_runs.get(key)
        base = static.get(res["net"], {}).get("test_acc")
        old_base = old_static.get(res["net"], {}).get("test_acc")
        c = res["chosen"]

        def cell(new: float | None, was: float | None, fmt: str) -> str:
            if new is None:
                return "-"
            return format(new, fmt) + (f" ({format(was, fmt)})" if was is not None else "")

        lat = timed_runs.get(key, {}).get("latency")
        fall = (
            f"{_fall(lat['ratio_mean'], lat['macs_fraction']):.2f}"
            if lat
            else "not timed (`--no-latency`)"
        )
        if lat and old and "latency" in old:
            fall += f" ({_fall(old['latency']['ratio_mean'], old['latency']['macs_fraction']):.2f})"
        lines.append(
            f"| {res['net'].replace('cifar_', '')} | {res['gate']} | "
            f"{cell(base, old_base, '.2%')} | "
            f"{cell(res['static_ft_test_acc'], old and old['static_ft_test_acc'], '.2%')} | "
            f"{cell(c['test_acc'], old and old['chosen']['test_acc'], '.2%')} | "
            f"{cell(c['test_macs'], old and old['chosen']['test_macs'], '.3f')} | "
            f"{c['threshold']} ({old['chosen']['threshold'] if old else '-'}) | "
            f"{_plans(res)} | {fall} |"
        )
    ceilings = [
        f"{key.replace('cifar_', '')} "
        f"{_fall(lat['ratio_removed'], lat['removed_macs_fraction']):.2f} "
        f"({lat['removed_ms']:.2f} / {lat['static_ms']:.2f} ms)"
        for key, run in timed_runs.items()
        if key in runs and "ratio_removed" in (lat := run.get("latency", {}))
    ]
    if ceilings:
        lines += [
            "",
            "The original network with the blocks of the commonest plan removed, timed in the "
            "same rounds (latency fall / MAC fall, its time / the original's): "
            + "; ".join(ceilings)
            + ". The rest of the dynamic model's gap to it is the cost of deciding.",
        ]
    lines.append("")
    for result in results:
        lines += provenance(result, "(accuracy and MACs; the models saved for timing)")
    if timed is not None:
        lines += provenance(timed, "the latency column (the saved models, on an idle machine)")
    else:
        lines += [
            "The latency column is measured apart, on an otherwise idle machine, from the "
            "models this run saved: the same command with `--from-artifacts DIR --static-epochs "
            f"0 --name {latency_name}` in place of `--no-latency --save-dir DIR --name ...`.",
            "",
        ]
    return lines
