"""CIFAR-10 block-gates benchmark: pretrained CIFAR ResNet-32/-44, each gate kind.

    python benchmarks/block_gates.py --data ../shared/data

Per network and gate kind (function, halting, policy):
1. convert the pretrained network (`dynify.convert(..., "block-gates")`);
2. fine-tune jointly on a random subset of the 45k fit part of cifar10/train: the backbone with
   SGD, the gates / halting units / policy with Adam (a few hundred steps move Adam-trained
   gates; SGD at the backbone's rate barely moves them), loss = `dyn.training_loss` (KD from the
   original static network + CE + the compute term towards --budget);
3. sweep the thresholds on a held-out calibration part of cifar10/train (never test), and pick
   the most accurate threshold there whose MACs stay within `--max-macs` (0.70: the issue's
   "30 % fewer MACs"). Calibration accuracy alone cannot place the operating point: the
   pretrained weights saw these images, so on them the dynamic model loses nothing;
4. report on cifar10/test: accuracy and MACs at every threshold of the sweep, the fine-tuned
   static network (`dyn.static()`, the same fine-tuned weights with every block run), the
   original static network; batch-1 CPU latency (1 thread) of
   the dynamic model at the chosen threshold against the original static module, each timed in
   runs of consecutive test images, the two alternating (`latency`).
`--save-dir` keeps the trained models; `--from-artifacts` measures them again without training.
Results go to JSON and a markdown section (benchmarks/block_gates.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

# a sibling script (benchmarks/ is on sys.path when a script here runs): one CIFAR loader
from cifar10 import MEAN, STD, finetune_static, load_cifar, static_accuracy
from timing import alternating_runs
from torch.utils.data import Subset

import dynify
from dynify.models.cifar_resnet import BasicBlock
from dynify.train.batches import Batches, Preprocessing
from dynify.train.data import split_dataset
from dynify.zoo import build_model

WEIGHTS = {32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th"}
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


@torch.no_grad()
def measure(model, batches: Batches, dyn: bool = True) -> tuple[float, float]:
    """(accuracy, mean MAC fraction) of the real forward pass."""
    model.eval()
    hits = total = 0
    macs = 0.0
    for x, y in batches.epoch(0):
        out = model(x)
        hits += int((out.argmax(-1) == y).sum())
        total += len(y)
        if dyn:
            macs += float(model.last_macs.double().sum())
    return hits / total, (macs / total / model.static_macs if dyn else 1.0)


@torch.no_grad()
def plan_diversity(dyn, batches: Batches) -> dict:
    """How many distinct run/skip plans the test images take, and the commonest one's share:
    a policy that collapsed to one plan is block removal, not a per-sample decision."""
    counts = plan_counts(dyn, (x for x, _ in batches.epoch(0)))
    return {"distinct": len(counts), "commonest_share": max(counts.values()) / sum(counts.values())}


def plan_counts(dyn, inputs) -> Counter:
    """How many samples of the input batches take each run/skip plan (current thresholds)."""
    counts: Counter = Counter()
    for x in inputs:
        dyn(x)
        counts.update(tuple(row) for row in dyn.last_gates.tolist())
    return counts


def train(dyn, fit, pre, args, budget: float) -> dict:
    """Joint fine-tuning with `dynify.finetune` on the first `--steps` batches' worth of a
    seeded shuffle of the fit part: the gates' recipe (clipped SGD for the backbone, Adam for
    the decision units, BN statistics frozen) is the library's (`GatedModel.joint_recipe`)."""
    images = min(args.steps * args.batch_size, len(fit))
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(0))[:images]
    history: list[dict] = []

    def log(info: dict) -> None:
        if info["step"] % 20 == 0:
            keep = ("loss", "distill", "macs_fraction", "greedy_macs_fraction", "compute_price")
            history.append({"step": info["step"], **{k: round(info[k], 4) for k in keep}})
            print(f"    step {info['step']}: {history[-1]}", flush=True)

    result = dynify.finetune(
        dyn,
        Subset(fit, order.tolist()),
        mode="joint",
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        budget=budget,
        calibration_fraction=0.0,
        preprocessing=pre,
        progress=False,
        callback=log,
    )
    return {
        "steps": images // args.batch_size,
        "images": images,
        "seconds": round(result.seconds, 1),
        "history": history,
    }


@torch.no_grad()  # inference: no autograd bookkeeping for any model
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
    if all(dyn.gates[k].shortcut is None for k in skipped):  # relu(x + 0) = x: removable
        blocks = [gated_block(dyn.gates[k]) for k in skipped]
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

    def record(name: str) -> None:
        if name == "dynamic":
            macs.append(float(dyn.last_macs[0]))
            plans.add(tuple(dyn.last_gates[0].tolist()))

    times = alternating_runs(models, images, repeats, block, after=record)
    mean = {k: statistics.fmean(v) * 1e3 for k, v in times.items()}
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    removed = {}
    if "removed" in models:
        removed = {
            "removed_blocks": [gated_block(dyn.gates[k]) for k in skipped],
            "removed_ms": round(mean["removed"], 3),
            "ratio_removed": round(mean["removed"] / mean["static"], 4),
            "removed_macs_fraction": round(
                1 - sum(dyn.gates[k].branch_macs for k in skipped) / dyn.static_macs, 4
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


def gated_block(gate) -> str:
    """The qualified name of the residual block a gate wraps (its lifted branch keeps the
    original module paths: 'layer2.3.conv1' -> 'layer2.3'). Gate k is not the k-th block:
    halting never gates a stage's first block."""
    conv = next(n for n, m in gate.branch.named_modules() if isinstance(m, torch.nn.Conv2d))
    return conv.rsplit(".", 1)[0]


def without_blocks(model: torch.nn.Module, blocks: list[str]) -> torch.nn.Module:
    """A copy of a CIFAR ResNet with the named residual blocks' branches removed: the physical
    floor for skipping them, no decision or Python of any kind. A block keeps what a skipped
    gated block still computes: nothing with an identity shortcut, ReLU(shortcut) with the
    downsampling one (function and policy gates also gate a stage's first block)."""
    model = copy.deepcopy(model)
    for name in blocks:
        block = model.get_submodule(name)
        if not isinstance(block, BasicBlock):
            raise ValueError(f"{name} is not a residual block of {type(model).__name__}")
        parent, child = name.rsplit(".", 1)
        rest = block.shortcut
        if not isinstance(rest, torch.nn.Identity):
            rest = torch.nn.Sequential(rest, torch.nn.ReLU())
        setattr(model.get_submodule(parent), child, rest)
    return model


def run(depth: int, kind: str, args, data: dict, out: dict) -> None:
    name = f"cifar_resnet{depth}"
    weights = str(args.data / "pretrained" / WEIGHTS[depth])
    pre = data["pre"]
    original, _ = build_model(name, weights=weights)
    original.eval()
    key = f"{name}/{kind}"
    print(f"== {key}", flush=True)
    torch.manual_seed(0)
    options = {"gate": kind, "budget": args.budget}
    if args.compute_weight is not None:
        options["compute_weight"] = args.compute_weight
    dyn = dynify.convert(name, "block-gates", weights=weights, options=options)
    res: dict = {
        "net": name,
        "gate": kind,
        "static_macs": dyn.static_macs,
        "gated_blocks": dyn.num_gates,
    }
    if name not in out.setdefault("original", {}):
        out["original"][name] = measure(original, data["test"], dyn=False)[0]
    res["original_test_acc"] = out["original"][name]
    res["settings"] = {"steps": args.steps, "recipe": asdict(dyn.joint_recipe), "options": options}
    if args.from_artifacts is not None:  # measure again what a --save-dir run trained
        dyn = dynify.load(args.from_artifacts / f"{name}-{kind}.dyn")
        # what the training run recorded (a run that crashed after saving recorded nothing)
        res["train"] = out.get("runs", {}).get(key, {}).get("train") or {"recorded": False}
    else:
        res["train"] = train(dyn, data["fit"], pre, args, args.budget)
    with dyn.static():
        res["static_ft_calib_acc"] = measure(dyn, data["calib"], dyn=False)[0]
    sweep = []
    for t in GRIDS[kind]:
        dyn.set_thresholds(t)
        acc, macs = measure(dyn, data["calib"])
        sweep.append({"threshold": t, "calib_acc": acc, "calib_macs": macs})
        print(f"    calib t={t}: acc {acc:.4f} macs {macs:.3f}", flush=True)
    res["calib_sweep"] = sweep
    chosen = choose_threshold(sweep, args.max_macs)
    res["chosen_threshold"] = chosen["threshold"]
    res["max_macs"] = args.max_macs
    with dyn.static():
        res["static_ft_test_acc"] = measure(dyn, data["test"], dyn=False)[0]
    test_points = []
    for t in GRIDS[kind]:  # the whole curve is reported; only calibration chose the point
        dyn.set_thresholds(t)
        acc, macs = measure(dyn, data["test"])
        test_points.append({"threshold": t, "test_acc": acc, "test_macs": macs})
        print(f"    test t={t}: acc {acc:.4f} macs {macs:.3f}", flush=True)
    res["test_curve"] = test_points
    dyn.set_thresholds(chosen["threshold"])
    res["chosen"] = next(p for p in test_points if p["threshold"] == chosen["threshold"])
    res["plans"] = plan_diversity(dyn, data["test"])
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        dynify.save(dyn, args.save_dir / f"{name}-{kind}.dyn")
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
    out.setdefault("runs", {})[key] = res


def static_baseline(depth: int, args, data: dict, out: dict) -> None:
    """The static network fine-tuned alone for as many epochs over the same images
    (`cifar10.finetune_static`: the early-exit benchmark's baseline), once per network."""
    name = f"cifar_resnet{depth}"
    if name in out.setdefault("static_ft", {}):
        return
    model, _ = build_model(name, weights=str(args.data / "pretrained" / WEIGHTS[depth]))
    seconds = finetune_static(
        model, data["fit"], data["pre"], args.static_epochs, args.batch_size, 0
    )
    out["static_ft"][name] = {
        "test_acc": static_accuracy(model, data["test"]),
        "epochs": args.static_epochs,
        "seconds": round(seconds, 1),
    }
    print(f"== {name} static fine-tuned: {out['static_ft'][name]}", flush=True)


def choose_threshold(sweep: list[dict], max_macs: float) -> dict:
    """The most accurate sweep point (on calibration) within `max_macs`, else the cheapest."""
    within = [p for p in sweep if p["calib_macs"] <= max_macs]
    if not within:
        return min(sweep, key=lambda p: p["calib_macs"])
    return max(within, key=lambda p: (p["calib_acc"], -p["calib_macs"]))


def _plans(res: dict) -> str:
    plans = res.get("plans")
    if plans is None:
        return "-"
    return f"{plans['distinct']} ({plans['commonest_share']:.0%} take the commonest)"


def _fall(latency_ratio: float, macs_fraction: float) -> float:
    """Latency fall over MAC fall: (1 - latency ratio) / (1 - MAC fraction)."""
    saved = 1 - macs_fraction
    return (1 - latency_ratio) / saved if saved > 0.01 else float("nan")


def markdown(out: dict) -> str:
    args = out["args"]
    recorded = [r for r in out.get("runs", {}).values() if "steps" in r["train"]]
    first = recorded[0] if recorded else {"train": {"steps": 0, "images": 0}}
    steps, images = first["train"]["steps"], first["train"]["images"]
    lines = [
        "## Block gates on CIFAR-10 (ResNet-32 / ResNet-44, pretrained, JPEG CIFAR-10)",
        "",
        f"Produced by `python benchmarks/block_gates.py {args['cmdline']}` on {out['machine']} "
        f"({out['date']}). Fine-tuning: joint, {args.get('epochs', 1)} epoch(s) of {steps} steps of batch "
        f"{args['batch_size']} with flip/crop augmentation over {images:,} images of the fit "
        f"part of cifar10/train ({images / 45000:.2f} x 45k) with `dynify.finetune(..., "
        f"mode='joint')`: backbone SGD lr {args['lr']} cosine, gradient norm clipped at 2, "
        "decision units Adam (lr 0.02, halting 0.008: `GatedModel.joint_recipe`), training budget "
        f"{args['budget']} of the static MACs. Thresholds: swept on {args['calib']} held-out "
        "cifar10/train images; the chosen one is the most accurate there within "
        f"{args.get('max_macs', 0.7)} of the static MACs (the pretrained weights saw those "
        "images, so calibration accuracy is no guide to the accuracy cost). All accuracies "
        "below are on cifar10/test (5,000 JPEG images). Batch-norm statistics are frozen "
        "during fine-tuning.",
        "",
        "'every block' is `dyn.static()` after fine-tuning: the same weights with every block "
        "run; 'static fine-tuned' is the original network fine-tuned alone on the same images "
        "for as many epochs (`--static-epochs`, the early-exit benchmark's baseline). Latency: batch 1, 1 thread, mean over test images, the dynamic model against "
        "the original static module, each timed in runs of consecutive images as a server runs "
        "it, the two alternating run by run (`latency()` in the script); 'latency fall / MAC "
        "fall' is (1 - latency ratio) / (1 - MAC fraction), both on the timed images.",
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
    for rerun in out.get("reruns", []):
        lines += ["", f"Re-run (replacing those rows): `python benchmarks/block_gates.py {rerun}`."]
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
    lines += [
        "Published anchors (CIFAR-10 ResNet-110, trained for hundreds of epochs on the original "
        "PNG images: compare the compute saved and the accuracy cost, not the accuracies):",
        "",
        "| method | reported | source |",
        "| --- | --- | --- |",
        *(f"| {name} | {figure} | {source} |" for name, figure, source in ANCHORS),
    ]
    return "\n".join(lines) + "\n"


def vars_cmdline(args: argparse.Namespace) -> str:
    return " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k in ("nets", "gates", "steps", "epochs", "compute_weight", "budget", "from_artifacts")
        and v is not None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/dynify-cifar10-uint8.pt"))
    parser.add_argument("--nets", type=int, nargs="+", default=[32, 44])
    parser.add_argument("--gates", nargs="*", default=["function", "halting", "policy"])
    parser.add_argument("--steps", type=int, default=100, help="batches' worth of fit images")
    parser.add_argument("--epochs", type=int, default=1, help="passes over those images")
    parser.add_argument(
        "--static-epochs",
        type=int,
        default=0,
        help="also fine-tune the static network alone this long (the baseline); --gates may "
        "then be empty",
    )
    parser.add_argument("--compute-weight", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--calib", type=int, default=1000)
    parser.add_argument(
        "--max-macs", type=float, default=0.7, help="operating point: MACs cap on calibration"
    )
    parser.add_argument("--latency-repeats", type=int, default=300)
    parser.add_argument(
        "--latency-rounds", type=int, default=3, help="timing rounds; the median one is reported"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--test-limit", type=int, default=None, help="smoke runs only")
    parser.add_argument("--save-dir", type=Path, default=None, help="save each trained model")
    parser.add_argument(
        "--from-artifacts",
        type=Path,
        default=None,
        help="no training: load the models a --save-dir run wrote (same --json) and measure",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/block_gates.json"))
    parser.add_argument("--md", type=Path, default=Path("benchmarks/block_gates.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set, test_set = load_cifar(args.data, args.cache)
    fraction = args.calib / len(train_set)
    fit, calib = split_dataset(train_set, fraction, seed=0)
    pre = Preprocessing(32, MEAN, STD)
    if args.test_limit:
        test_set = torch.utils.data.Subset(test_set, list(range(args.test_limit)))
    test_b = Batches(test_set, pre, batch_size=500)
    latency_images = next(iter(Batches(test_set, pre, batch_size=args.latency_repeats).epoch(0)))[0]
    data = {
        "pre": pre,
        "fit": fit,
        "calib": Batches(calib, pre, batch_size=500),
        "test": test_b,
        "latency_images": latency_images,
    }
    out: dict = {
        "args": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "cmdline": " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items()
                if k in ("nets", "gates", "steps", "epochs", "budget", "calib", "max_macs")
            ),
        },
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if args.json.is_file():  # accumulate runs made in several invocations
        previous = json.loads(args.json.read_text())
        out["runs"] = previous.get("runs", {})
        out["original"] = previous.get("original", {})
        out["static_ft"] = previous.get("static_ft", {})
        out["args"] = previous.get("args", out["args"])  # the header describes the first run
        out.setdefault("reruns", previous.get("reruns", [])).append(vars_cmdline(args))
    for depth in args.nets:
        if args.static_epochs:
            static_baseline(depth, args, data, out)
            args.json.write_text(json.dumps(out, indent=1))
        for kind in args.gates:
            run(depth, kind, args, data, out)
            args.json.write_text(json.dumps(out, indent=1))
            args.md.write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
