"""frame-exit on synthetic clips made from CIFAR-10 images, per-frame network a pretrained
CIFAR ResNet-44: accuracy vs MACs, and batch-1 latency against the MAC ratio.

    python -m benchmarks frame_exit --data ../shared/data --depth 44 --frames 8 \
        --test-images 1500 --calib-images 1000 --latency-clips 60 --groups 1 2 --threads 1

No video data ships with dynify, so the clips are a clear synthetic stand-in: each CIFAR-10
image becomes a clip of T frames, every frame a seeded random view of it (a random crop of the
reflect-padded image, a horizontal flip, an occluding grey square, a Gaussian blur, each at a
random strength), so frames differ in how much of the object they show, as a video's do.
Through the public API:
1. the TSN clip model: the pretrained CIFAR ResNet as the per-frame network, frames folded
   into the batch, logits averaged over time (`dynify.convert(..., "frame-exit")`);
2. `dynify.operating_points`: thresholds calibrated on clips of a held-out part of
   cifar10/train (the pretrained weights saw those images, so calibration is optimistic), per
   accuracy-drop and MAC-budget target, and a grid of shared thresholds; each measured on clips
   of cifar10/test (nothing is fitted there);
3. batch-1 CPU latency (eager, 1 thread) of the dynamic model at the point calibrated for a
   drop of at most 0.5 points, against the static clip model (all frames in one batch), timed
   on the same clips in alternating runs;
4. batch-1 ONNX Runtime latency (1 thread) of the export (an `If` per exit) against the static
   clip model exported the same way (`dynify.bench`: each exit forced in turn), weighted by
   where the test clips leave at the calibrated point.
Each of `--groups` (frames per decision, `FrameExitOptions.group`) is converted, calibrated
and timed alike; the eager runs alternate every group's model with the static one.
5. FrameExit's learned gates (`policy="gate"`) per group: trained with `dynify.finetune` (heads
   mode) on clips of `--gate-images` held-out train images disjoint from the calibration
   ones, calibrated with `dynify.calibrate`, checked and timed like the policy's models.
The per-frame network is frozen, so every frame runs through it once (its logits kept next to
the image cache); calibration, gate training and the curves run on a stand-in clip model that
replays those logits with the same decisions, and each calibrated point is then run on the
ResNet clip model itself (`measure_on`).
`--gate-seeds S ...` runs step 5 alone, once per seed on the same clips (no latency), into
`frame_exit_gate_seeds.json`: how far the gates' initialisation moves their calibrated point.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms.functional import gaussian_blur

import dynify
from benchmarks.cifar_data import (
    DEFAULT_CACHE,
    MEAN,
    STD,
    fit_and_calibration,
    load_cifar,
    subsample,
    weights_path,
)
from benchmarks.report import missing, pct, provenance
from benchmarks.results import read_result
from benchmarks.timing import alternating_runs

NAME = "frame_exit"
SEEDS = "frame_exit_gate_seeds"  # the learned gates trained once per seed
TARGET_MACS = 0.45  # of the all-frame average's MACs, within TARGET_DROP of its accuracy
TARGET_DROP = 0.005
TARGET_LATENCY = 1.15  # batch-1 latency ratio over MAC ratio
MAX_DROPS = (0.0, 0.0025, 0.005, 0.01, 0.02)
BUDGETS = (0.2, 0.3, 0.4, 0.5, 0.6)
GRID = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995)
GRID += (1.01,)
# shared gate thresholds: a clip looks further when its gate's p > 1 - t
GATE_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
# Strengths chosen so a frame alone is clearly worse than the image (CIFAR networks are
# fragile: a blur of sigma 1.4 alone takes ResNet-44 from 82 % to 17 %) yet mostly usable.
PAD = 4
BLUR_SIGMAS = (0.0, 0.0, 0.5, 0.8)
OCCLUDED, OCCLUSION_SIZES = 0.35, (6, 14)


class FrameByFrame(nn.Module):
    """The static clip model's computation one frame at a time (batch 1 per frame): what
    the per-frame network costs at the batch size frame-exit runs it at."""

    def __init__(self, frame: nn.Module):
        super().__init__()
        self.frame = frame

    def forward(self, clip: Tensor) -> Tensor:
        total = self.frame(clip[:, 0])
        for t in range(1, clip.shape[1]):
            total = total + self.frame(clip[:, t])
        return total / clip.shape[1]


class TSN(nn.Module):
    """A TSN-style clip model: frames folded into the batch, averaged logits."""

    def __init__(self, frame: nn.Module):
        super().__init__()
        self.frame = frame

    def forward(self, clip: Tensor) -> Tensor:
        logits = self.frame(clip.flatten(0, 1))
        return logits.unflatten(0, (clip.shape[0], clip.shape[1])).mean(1)


def make_clips(images: Tensor, frames: int, seed: int) -> Tensor:
    """[N, T, 3, H, W] normalised clips from uint8 images [N, 3, H, W], seeded: each frame a
    random crop of the reflect-padded image, maybe flipped, maybe occluded, maybe blurred."""
    g = torch.Generator().manual_seed(seed)
    x = dynify.normalize_batch(images, MEAN, STD)
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
    out = torch.empty(n, frames, *x.shape[1:])
    for t in range(frames):
        dy = torch.randint(0, 2 * PAD + 1, (n,), generator=g).tolist()
        dx = torch.randint(0, 2 * PAD + 1, (n,), generator=g).tolist()
        frame = torch.stack(
            [
                padded[i, :, a : a + h, b : b + w]
                for i, (a, b) in enumerate(zip(dy, dx, strict=True))
            ]
        )
        flip = torch.rand(n, generator=g) < 0.5
        frame[flip] = frame[flip].flip(-1)
        # an occluding square (0: the mean colour after normalisation) on some frames
        occluded = (torch.rand(n, generator=g) < OCCLUDED).tolist()
        sizes = torch.randint(*OCCLUSION_SIZES, (n,), generator=g).tolist()
        ys = torch.randint(0, h, (n,), generator=g).tolist()
        xs = torch.randint(0, w, (n,), generator=g).tolist()
        for i in range(n):
            if occluded[i]:
                s, a, b = sizes[i], ys[i] - sizes[i] // 2, xs[i] - sizes[i] // 2
                frame[i, :, max(a, 0) : a + s, max(b, 0) : b + s] = 0.0
        level = torch.randint(0, len(BLUR_SIGMAS), (n,), generator=g)
        for k, sigma in enumerate(BLUR_SIGMAS):
            chosen = level == k
            if sigma and chosen.any():
                frame[chosen] = gaussian_blur(frame[chosen], [7, 7], [sigma, sigma])
        out[:, t] = frame
    return out


def _images(dataset: Dataset) -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return (
        torch.stack([torch.as_tensor(img) for img, _ in items]),
        torch.tensor([int(label) for _, label in items]),
    )


def clip_data(dataset: Dataset, frames: int, seed: int) -> tuple[TensorDataset, Tensor]:
    images, labels = _images(dataset)
    clips = make_clips(images, frames, seed)
    return TensorDataset(clips, labels), clips


class Replay(nn.Module):
    """A per-frame "network" whose input is a frame's cached logits and whose output is the
    same logits, exactly (an identity linear layer: x * 1 + 0s). A clip model over it (`TSN`)
    decides as the real one does on the same per-frame logits, at no cost: what calibration
    and gate training run on, the per-frame network being frozen."""

    def __init__(self, classes: int):
        super().__init__()
        self.linear = nn.Linear(classes, classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(classes))
            self.linear.bias.zero_()

    def forward(self, logits: Tensor) -> Tensor:
        return self.linear(logits)


@torch.inference_mode()
def frame_logits(frame: nn.Module, clips: Tensor, batch: int = 64) -> Tensor:
    """[N, T, K]: every frame of `clips` through the frozen per-frame network, once."""
    out = [
        frame(clips[i : i + batch].flatten(0, 1)).unflatten(0, (-1, clips.shape[1]))
        for i in range(0, len(clips), batch)
    ]
    return torch.cat(out).clone()


def kept_logits(args: argparse.Namespace, what: str, compute: Callable[[], Tensor]) -> Tensor:
    """Per-frame logits computed once per setting and kept next to the image cache (the
    per-frame network is frozen: a re-run reads them back)."""
    key = f"d{args.depth}-t{args.frames}-s{args.seed}-{what}"
    path = args.cache.with_suffix(f".frame-logits-{key}.pt")
    if path.is_file():
        return torch.load(path, weights_only=True)
    logits = compute()
    tmp = path.with_suffix(".tmp")
    torch.save(logits, tmp)
    os.replace(tmp, path)
    return logits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--depth", type=int, default=44, choices=(20, 32, 44))
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--order", default="strided", choices=("strided", "sequential"))
    parser.add_argument("--policy", default="confidence")
    parser.add_argument("--test-images", type=int, default=1500, help="0: all 5000")
    parser.add_argument("--calib-images", type=int, default=1000)
    parser.add_argument(
        "--gate-images", type=int, default=2000, help="train images the gates learn on"
    )
    parser.add_argument("--gate-epochs", type=int, default=30)
    parser.add_argument("--gate-hidden", type=int, default=16)
    parser.add_argument(
        "--gate-target",
        default="correct",
        choices=("correct", "final"),
        help="what the gates learn: is the running prediction right (labels), or final",
    )
    parser.add_argument("--latency-clips", type=int, default=60)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2], help="frames per decision")
    parser.add_argument("--onnx-runs", type=int, default=60, help="0: no ONNX Runtime timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--gate-seeds",
        type=int,
        nargs="+",
        default=None,
        help="instead of the full run: train and calibrate the learned gates once per seed (their "
        "initial weights and batch order; the clips stay those of --seed), no latency",
    )


def apply_quick(args: argparse.Namespace) -> None:
    args.depth = 20 if args.depth == 44 else args.depth
    args.test_images, args.calib_images, args.gate_images = 40, 40, 60
    args.gate_epochs = 2
    args.latency_clips = min(args.latency_clips, 4)
    args.onnx_runs = min(args.onnx_runs, 3)
    args.groups = [2]  # one model per policy exported and timed: 3 exits, not 7
    if args.gate_seeds:
        args.gate_seeds = args.gate_seeds[:2]


def run(args: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(args.threads)
    if args.gate_seeds:
        return {SEEDS: gate_seed_rows(args)}
    return {NAME: full_run(args)}


@dataclass
class Clips:
    """The clip models and clips every part of the suite measures on."""

    static: nn.Module  # the TSN clip model over the per-frame network
    replay: nn.Module  # the TSN clip model over cached per-frame logits (`Replay`)
    test_clips: Tensor
    test_labels: Tensor
    cached: dict[str, TensorDataset]  # calib / test / gate: per-frame logits and labels
    clip_counts: dict[str, int]

    @property
    def example(self) -> Tensor:
        return self.test_clips[:1]

    @property
    def replay_example(self) -> Tensor:
        return self.cached["test"].tensors[0][:1]


def prepare(args: argparse.Namespace) -> Clips:
    """The seeded clips of each split and every frame's logits (computed once, then kept)."""
    train_set, test_set = load_cifar(args.data, args.cache)
    fit, calib = fit_and_calibration(train_set, args.seed, calib_images=args.calib_images)
    gate_set = subsample(fit, args.gate_images)  # disjoint from the calibration part
    test_set = subsample(test_set, args.test_images)
    splits = {
        "calib": clip_data(calib, args.frames, args.seed + 1),
        "test": clip_data(test_set, args.frames, args.seed + 2),
        "gate": clip_data(gate_set, args.frames, args.seed + 3),
    }
    name = f"cifar_resnet{args.depth}"
    frame_net, _ = dynify.build_model(name, weights=weights_path(args.data, args.depth))
    # every frame through the frozen per-frame network once; the policies are then calibrated
    # and the gates trained on these logits, replayed by a clip model of the same decisions
    cached = {
        key: TensorDataset(
            kept_logits(args, f"{key}{len(clips)}", lambda c=clips: frame_logits(frame_net, c)),
            data.tensors[1],
        )
        for key, (data, clips) in splits.items()
    }
    test_data, test_clips = splits["test"]
    return Clips(
        static=TSN(frame_net).eval(),
        replay=TSN(Replay(cached["test"].tensors[0].shape[-1])).eval(),
        test_clips=test_clips,
        test_labels=test_data.tensors[1],
        cached=cached,
        clip_counts={key: len(data) for key, (data, _) in splits.items()},
    )


def full_run(args: argparse.Namespace) -> dict:
    clips = prepare(args)
    static, replay, cached = clips.static, clips.replay, clips.cached
    example, replay_example = clips.example, clips.replay_example
    test_clips, test_labels = clips.test_clips, clips.test_labels
    models, by_group, gate_by_group = {}, [], []
    for group in args.groups:
        options = dynify.FrameExitOptions(order=args.order, policy=args.policy, group=group)
        dyn = dynify.convert(static, "frame-exit", example, options=options).eval()
        stand_in = dynify.convert(replay, "frame-exit", replay_example, options=options).eval()
        points = dynify.operating_points(
            stand_in,
            cached["calib"],
            cached["test"],
            budgets=BUDGETS,
            max_drops=MAX_DROPS,
            thresholds=GRID,
        )
        every_frame = next(p for p in points if p.target == {"threshold": 1.01})
        first_group = next(p for p in points if p.target == {"threshold": 0.0})
        chosen = next((p for p in points if p.target == {"max_drop": TARGET_DROP}), every_frame)
        dynify.use_operating_point(dyn, chosen)
        models[("confidence", group)] = dyn
        measured = measure_on(dyn, test_clips, test_labels)
        by_group.append(
            {
                "group": group,
                "policy": args.policy,
                "all_frames_test_acc": every_frame.test_accuracy,
                "all_frames_calib_acc": every_frame.calibration_accuracy,
                "first_group_test_acc": first_group.test_accuracy,
                "points": [p.to_dict() for p in points],
                "chosen": chosen.to_dict(),
                "measured": measured,
                "exit_shares": measured["exit_shares"],
                "onnx": onnx_latency(dyn, measured["exit_shares"], args)
                if args.onnx_runs
                else None,
            }
        )
        gate_options = learned_gates(args, group)
        gated = dynify.convert(static, "frame-exit", example, options=gate_options).eval()
        entry = gate_rows(gated, replay, replay_example, gate_options, cached, args)
        entry["measured"] = measure_on(gated, test_clips, test_labels)
        entry["exit_shares"] = entry["measured"]["exit_shares"]
        shares = entry["exit_shares"]
        entry["onnx"] = onnx_latency(gated, shares, args) if args.onnx_runs else None
        models[("gate", group)] = gated
        gate_by_group.append(entry)
    latency = measure_latency(static, models, test_clips[: args.latency_clips])
    for entry in by_group:
        entry["latency"] = latency[("confidence", entry["group"])]
    for entry in gate_by_group:
        entry["latency"] = latency[("gate", entry["group"])]
    settings = dict(vars(args))  # paths become strings in write_result
    first = models[("confidence", args.groups[0])]
    settings.update(
        calib_clips=clips.clip_counts["calib"],
        test_clips=clips.clip_counts["test"],
        gate_clips=clips.clip_counts["gate"],
        frame_macs=first.static_macs // args.frames,  # the clip model: T frames' worth
        order_of_frames=[int(t) for row in first.describe() for t in row["frame"].split(",")],
    )
    one = by_group[0]
    return {
        "settings": settings,
        "static_macs": first.static_macs,
        "all_frames_test_acc": one["all_frames_test_acc"],
        "all_frames_calib_acc": one["all_frames_calib_acc"],
        "one_frame_test_acc": one["first_group_test_acc"] if one["group"] == 1 else None,
        "static_ms": latency["static_ms"],
        "frame_by_frame_ms": latency["frame_by_frame_ms"],
        "by_group": by_group,
        "gate_by_group": gate_by_group,
    }


def learned_gates(args: argparse.Namespace, group: int) -> dynify.FrameExitOptions:
    """The options of the clip model with FrameExit's learned gates, one per `group` frames."""
    return dynify.FrameExitOptions(
        order=args.order,
        policy="gate",
        group=group,
        gate_hidden=args.gate_hidden,
        gate_target=args.gate_target,
    )


def gate_rows(
    gated: dynify.DynamicModel,
    replay: nn.Module,
    replay_example: Tensor,
    options: dynify.FrameExitOptions,
    cached: dict[str, TensorDataset],
    args: argparse.Namespace,
) -> dict:
    """Train the gates of a stand-in over cached logits, copy them into `gated` and set it at
    the point calibrated for TARGET_DROP (`gate_points`)."""
    stand_in, trained = train_gates(replay, replay_example, options, cached, args, args.seed)
    dynify.copy_new_parts(stand_in, gated)
    points = gate_points(stand_in, exit_costs(gated), cached)
    chosen = at_target(points) or points[-1]
    gated.set_thresholds(chosen["thresholds"])
    return {
        "group": options.group,
        "policy": "gate",
        "gate_hidden": options.gate_hidden,
        "train_history": trained.history[:1] + trained.history[-1:],
        "train_seconds": trained.seconds,
        "points": points,
        "chosen": chosen,
    }


def train_gates(
    replay: nn.Module,
    replay_example: Tensor,
    options: dynify.FrameExitOptions,
    cached: dict[str, TensorDataset],
    args: argparse.Namespace,
    seed: int,
) -> tuple[dynify.DynamicModel, dynify.FinetuneResult]:
    """A stand-in clip model over cached logits with its gates trained by `finetune` (heads
    mode) on the gate clips; `seed` sets the gates' initial weights and the batch order."""
    torch.manual_seed(seed)  # the gates' initial weights: the same whatever ran before
    stand_in = dynify.convert(replay, "frame-exit", replay_example, options=options).eval()
    trained = dynify.finetune(
        stand_in,
        cached["gate"],
        mode="heads",
        epochs=args.gate_epochs,
        batch_size=128,
        lr=3e-3,
        augment=False,
        calibration_fraction=0.0,
        seed=seed,
        progress=False,
    )
    return stand_in, trained


def exit_costs(gated: dynify.DynamicModel) -> Tensor:
    """Each exit's MACs as a fraction of the static clip model's (the real model's costs)."""
    return torch.tensor(gated.exit_macs(), dtype=torch.float64) / gated.static_macs


def gate_points(
    stand_in: dynify.DynamicModel, costs: Tensor, cached: dict[str, TensorDataset]
) -> list[dict]:
    """One threshold per gate calibrated on the calibration clips (`calibrate`) per accuracy
    drop, then a grid of thresholds shared by every gate: each read on calibration and test.
    MACs are `costs`, the real model's exit costs. Leaves the stand-in at TARGET_DROP's point."""

    def reach(data: TensorDataset) -> tuple[float, float]:
        logits, labels = data.tensors
        exits, hits = [], 0
        with torch.no_grad():
            for start in range(0, len(logits), 500):
                out = stand_in(logits[start : start + 500])
                hits += int((out.argmax(-1) == labels[start : start + 500]).sum())
                exits.append(stand_in.last_decisions())
        return hits / len(labels), float(costs[torch.cat(exits)].mean())

    points = []
    for drop in MAX_DROPS:
        try:
            dynify.calibrate(stand_in, cached["calib"], max_drop=drop, part="all")
        except dynify.DynifyError:
            continue
        points.append(_gate_point({"max_drop": drop}, stand_in, reach, cached))
    for t in GATE_GRID:
        stand_in.set_thresholds(t)
        points.append(_gate_point({"threshold": t}, stand_in, reach, cached))
    stand_in.set_thresholds((at_target(points) or points[-1])["thresholds"])
    return points


def _point_text(point: dict | None) -> str:
    if point is None:
        return "no point within the drop on calibration"
    return f"{pct(point['test_accuracy'])} % at {point['test_macs']:.3f} of the MACs on test"


def at_target(points: list[dict]) -> dict | None:
    """The point calibrated for a drop of at most TARGET_DROP, if calibration reached one."""
    return next((p for p in points if p["target"] == {"max_drop": TARGET_DROP}), None)


def gate_seed_rows(args: argparse.Namespace) -> dict:
    """The learned gates trained and calibrated once per seed of `--gate-seeds`, on the same
    clips: how far the calibrated point moves with the gates' initialisation alone."""
    clips = prepare(args)
    cached = clips.cached
    with torch.no_grad():
        logits, labels = cached["test"].tensors
        all_frames = clips.replay(logits).argmax(-1) == labels
    by_group = []
    for group in args.groups:
        options = learned_gates(args, group)
        costs = exit_costs(
            dynify.convert(clips.static, "frame-exit", clips.example, options=options)
        )
        seeds = []
        for seed in args.gate_seeds:
            stand_in, _ = train_gates(
                clips.replay, clips.replay_example, options, cached, args, seed
            )
            points = gate_points(stand_in, costs, cached)
            seeds.append({"seed": seed, "chosen": at_target(points), "points": points})
            print(
                f"gates, group {group}, seed {seed}: {_point_text(seeds[-1]['chosen'])}", flush=True
            )
        by_group.append({"group": group, "seeds": seeds})
    settings = dict(vars(args))  # paths become strings in write_result
    settings.update({f"{key}_clips": n for key, n in clips.clip_counts.items()})
    return {
        "settings": settings,
        "all_frames_test_acc": float(all_frames.float().mean()),
        "by_group": by_group,
    }


def _gate_point(target: dict, stand_in: dynify.DynamicModel, reach, cached) -> dict:
    cal_acc, cal_macs = reach(cached["calib"])
    test_acc, test_macs = reach(cached["test"])
    return {
        "target": target,
        "thresholds": [float(v) for v in stand_in.thresholds],
        "temperatures": [],
        "calibration_accuracy": cal_acc,
        "calibration_macs": cal_macs,
        "test_accuracy": test_acc,
        "test_macs": test_macs,
    }


def measure_on(dyn: dynify.DynamicModel, clips: Tensor, labels: Tensor, batch: int = 250) -> dict:
    """The real model on the test clips at its thresholds: accuracy, mean MACs (its own
    `last_macs`) and the share of clips leaving at each exit (the last: every frame)."""
    counts = torch.zeros(dyn.num_thresholds + 1)
    hits, macs = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(clips), batch):
            out = dyn(clips[start : start + batch])
            hits += int((out.argmax(-1) == labels[start : start + batch]).sum())
            macs += float(dyn.last_macs.double().sum())
            counts += torch.bincount(dyn.last_decisions(), minlength=dyn.num_thresholds + 1)
    return {
        "accuracy": hits / len(clips),
        "macs": macs / len(clips) / dyn.static_macs,
        "exit_shares": (counts / len(clips)).tolist(),
    }


def onnx_latency(dyn: dynify.DynamicModel, shares: list[float], args: argparse.Namespace) -> dict:
    """Batch-1 ONNX Runtime latency at the calibrated point: each exit forced in turn (exit j:
    the decisions before it never leave, it always does) and the static clip model, exported
    alike and timed interleaved (`dynify.bench`), weighted by the share of the test clips
    leaving at each exit."""
    k = dyn.num_thresholds
    cases = [(f"exit {j}", [1.01] * j + [0.0] * (k - j)) for j in range(k)]
    cases.append(("final", [1.01] * k))
    result = dynify.bench(
        dyn,
        runtime="onnx",
        batch=1,
        runs=args.onnx_runs,
        warmup=5,
        threads=args.threads,
        cases=cases,
    )
    rows = {r.label: r for r in result.rows}
    labels = [label for label, _ in cases]
    static_ms = rows["static"].latency_ms
    dynamic_ms = sum(s * rows[c].latency_ms for s, c in zip(shares, labels, strict=True))
    macs_ratio = sum(s * rows[c].macs_fraction for s, c in zip(shares, labels, strict=True))
    return {
        "runs": args.onnx_runs,
        "static_ms": static_ms,
        "dynamic_ms": dynamic_ms,
        "latency_ratio": dynamic_ms / static_ms,
        "macs_ratio": macs_ratio,
        "ratio_to_macs": dynamic_ms / static_ms / macs_ratio,
        "exits": [
            {"exit": c, "ms": rows[c].latency_ms, "macs": rows[c].macs_fraction} for c in labels
        ],
    }


def measure_latency(
    static: nn.Module, models: dict[tuple[str, int], dynify.DynamicModel], clips: Tensor
) -> dict:
    """Mean seconds per clip at batch 1 of the static clip model and of each model (its
    thresholds as set), on the same clips in alternating runs, and the MACs each spent."""
    names = {key: f"{key[0]} group {key[1]}" for key in models}
    spent: dict[str, list[int]] = {name: [] for name in names.values()}
    runners: dict[str, nn.Module] = {"static": static}
    runners.update({names[key]: dyn for key, dyn in models.items()})
    runners["frame_by_frame"] = FrameByFrame(static.frame)

    def record(name: str) -> None:
        if name in spent:
            spent[name].append(int(runners[name].last_macs[0]))

    with torch.no_grad():
        for model in runners.values():  # warm up
            model(clips[:1])
    times = alternating_runs(runners, clips, repeats=len(clips), block=10, after=record)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    out: dict = {
        "static_ms": 1e3 * mean["static"],
        "frame_by_frame_ms": 1e3 * mean["frame_by_frame"],
    }
    for key, dyn in models.items():
        name = names[key]
        latency_ratio = mean[name] / mean["static"]
        macs_ratio = statistics.fmean(spent[name]) / dyn.static_macs
        out[key] = {
            "clips": len(clips),
            "static_ms": 1e3 * mean["static"],
            "dynamic_ms": 1e3 * mean[name],
            "latency_ratio": latency_ratio,
            "macs_ratio": macs_ratio,
            "ratio_to_macs": latency_ratio / macs_ratio,
            "frame_by_frame_ms": 1e3 * mean["frame_by_frame"],
            "ratio_to_macs_frame_by_frame": mean[name] / mean["frame_by_frame"] / macs_ratio,
        }
    return out


def fewest_macs_within(points: list[dict], reference: float, drop: float, key: str) -> dict | None:
    """The cheapest point (on `key` data) whose accuracy there is within `drop` of reference."""
    acc, macs = f"{key}_accuracy", f"{key}_macs"
    within = [p for p in points if p[acc] >= reference - drop - 1e-12]
    return min(within, key=lambda p: p[macs]) if within else None


def _target(target: dict) -> str:
    ((key, value),) = target.items()
    return {"max_drop": f"drop <= {100 * value:g} pt", "budget": f"budget {value:g}"}.get(
        key, f"threshold {value:g}"
    )


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _label(entry: dict) -> str:
    """'confidence, group 2' / 'gate, group 1': which model a row is."""
    return f"{entry.get('policy', 'confidence')}, group {entry['group']}"


def _accuracy_lines(entry: dict, base: float) -> list[str]:
    chosen = entry["chosen"]
    curve = [p for p in entry["points"] if "threshold" in p["target"]]
    best = fewest_macs_within(entry["points"], base, TARGET_DROP, "test")
    best_curve = fewest_macs_within(curve, base, TARGET_DROP, "test")
    ok = _meets(chosen, base)
    line = (
        f"- {_label(entry)}: calibrated for a drop of at most {100 * TARGET_DROP:g} points (on "
        f"calibration clips only): **{pct(chosen['test_accuracy'])} % at "
        f"{chosen['test_macs']:.3f} of the MACs** on test "
        f"({100 * (chosen['test_accuracy'] - base):+.2f} points; target within "
        f"{100 * TARGET_DROP:g} points at <= {TARGET_MACS}: {_met(ok)})."
    )
    if best is not None:
        line += (
            f" Fewest MACs within {100 * TARGET_DROP:g} points read on test (a selection, not "
            f"a calibration): {best['test_macs']:.3f} ({pct(best['test_accuracy'])} %, "
            f"{_target(best['target'])})"
            + (
                f"; shared-threshold curve alone: {best_curve['test_macs']:.3f}."
                if best_curve
                else "."
            )
        )
    measured = entry.get("measured")
    if measured:
        line += (
            f" The real clip model at these thresholds, run on the test clips: "
            f"{pct(measured['accuracy'])} % at {measured['macs']:.3f} of the MACs."
        )
    return [line]


def _latency_row(entry: dict) -> str:
    lat, ort = entry["latency"], entry.get("onnx")
    cells = [
        _label(entry),
        pct(entry["chosen"]["test_accuracy"]),
        f"{entry['chosen']['test_macs']:.3f}",
        f"{lat['dynamic_ms']:.1f} / {lat['static_ms']:.1f}",
        f"{lat['macs_ratio']:.3f}",
        f"{lat['latency_ratio']:.3f}",
        f"**{lat['ratio_to_macs']:.3f}x**",
        f"{lat['ratio_to_macs_frame_by_frame']:.3f}x",
    ]
    if ort:
        cells += [
            f"{ort['dynamic_ms']:.2f} / {ort['static_ms']:.2f}",
            f"{ort['macs_ratio']:.3f}",
            f"{ort['latency_ratio']:.3f}",
            f"**{ort['ratio_to_macs']:.3f}x**",
        ]
    else:
        cells += ["-"] * 4
    return "| " + " | ".join(cells) + " |"


def _method_lines(s: dict, out: dict) -> list[str]:
    """How the curves were measured: on cached per-frame logits, checked on the real model."""
    if not out.get("gate_by_group"):
        return []
    return [
        "Every frame of the calibration, test and gate-training clips runs once through the "
        "frozen per-frame network; the policies are calibrated, the gates trained and every "
        "operating point read on these per-frame logits, replayed by a clip model of the same "
        "decisions (per-frame network: an exact identity on the logits). The gates: "
        f"`policy='gate'`, an MLP of {s['gate_hidden']} hidden units per decision on the "
        "running average and its sorted probabilities, trained with `dynify.finetune` (heads "
        f"mode, {s['gate_epochs']} epochs) on {s['gate_clips']} clips of held-out cifar10/train "
        "images disjoint from the calibration ones, to predict whether the running prediction "
        + (
            "is not yet right (FrameExit's target, `gate_target='correct'`, labels)"
            if s.get("gate_target", "final") == "correct"
            else "differs from the all-frame one (`gate_target='final'`, no labels)"
        )
        + "; copied into the ResNet clip model "
        "(`dynify.copy_new_parts`); thresholds by `dynify.calibrate` (one threshold per gate, "
        "searched on the gates' collected logits: a clip looks further while gate i's "
        "p > 1 - t_i); the curve below them is one threshold shared by every gate, on a grid. "
        "The gates' MACs are the "
        "ResNet model's own exit costs. The point calibrated for each row below was then set "
        "on the ResNet clip model and run on the test clips ('real clip model')."
    ]


def render() -> str:
    result = read_result(NAME)
    lines = ["# frame-exit: stopping early over a clip's frames", ""]
    if result is None or "by_group" not in result.data:
        return "\n".join(lines + missing(NAME, f"python -m benchmarks {NAME} --data DATA"))
    out = result.data
    s, groups = out["settings"], out["by_group"] + out.get("gate_by_group", [])
    base = out["all_frames_test_acc"]
    lines += [
        f"Synthetic clips (a stand-in: no video data ships): each of {s['test_clips']} "
        f"cifar10/test images (evenly spaced over the 5,000, every class alike) becomes a clip "
        f"of {s['frames']} frames, each a random crop, flip, occlusion and blur of it; "
        f"thresholds calibrated on clips of {s['calib_clips']} held-out cifar10/train images. "
        f"Per-frame network: the pretrained CIFAR ResNet-{s['depth']} "
        f"({s['frame_macs'] / 1e6:.1f} M MACs per frame), frames looked at in the "
        f"'{s['order']}' order {s['order_of_frames']}, exit policy '{s['policy']}'; group g: "
        "the order cut into groups of g frames, each run as one batch, one decision per group.",
        "",
        *_method_lines(s, out),
        "",
        f"- The {s['frames']}-frame average (the static clip model): **{pct(base)} %** on test"
        + (
            f"; one frame: {pct(out['one_frame_test_acc'])} %."
            if out.get("one_frame_test_acc") is not None
            else "."
        ),
    ]
    for entry in groups:
        lines += _accuracy_lines(entry, base)
    best = min(groups, key=lambda e: e["latency"]["ratio_to_macs"])
    lines += [
        "",
        f"Batch-1 latency at the calibrated point, 1 thread ({result.metadata.get('threads')} "
        f"torch thread(s)), target: latency ratio <= {TARGET_LATENCY}x the MAC ratio. Eager: "
        f"the first {groups[0]['latency']['clips']} test clips, every model and the static one "
        "in alternating runs, mean ms per clip (the MAC ratio is what those clips spent). The "
        f"static clip model one frame at a time (batch 1 per frame) takes "
        f"{out['frame_by_frame_ms']:.1f} ms; 'vs frame by frame' is the latency/MAC ratio "
        "against it. ONNX Runtime: the export (an `If` per exit, thresholds an input) against "
        "the static clip model exported alike, both for batch 1, each exit forced in turn "
        "(`dynify.bench`, median of "
        f"{(groups[0].get('onnx') or {}).get('runs', '-')} interleaved runs in a child "
        "process), weighted by the share of all test clips leaving at each exit.",
        "",
        "| policy, group | test acc % | test MACs | eager ms (dyn / static) | MAC ratio | latency "
        "ratio | **eager ratio / MACs** | vs frame by frame | ORT ms (dyn / static) | MAC "
        "ratio | latency ratio | **ORT ratio / MACs** |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[_latency_row(e) for e in groups],
        "",
        f"- Eager: best {_label(best)} at {best['latency']['ratio_to_macs']:.3f}x: "
        + _met(best["latency"]["ratio_to_macs"] <= TARGET_LATENCY)
        + ".",
    ]
    timed = [e for e in groups if e.get("onnx")]
    if timed:
        ort_best = min(timed, key=lambda e: e["onnx"]["ratio_to_macs"])
        lines.append(
            f"- ONNX Runtime: best {_label(ort_best)} at "
            f"{ort_best['onnx']['ratio_to_macs']:.3f}x: "
            + _met(ort_best["onnx"]["ratio_to_macs"] <= TARGET_LATENCY)
            + "."
        )
    for entry in groups:
        lines += [
            "",
            f"### {_label(entry)}: operating points",
            "",
            "| target | thresholds chosen on | calib acc % | calib MACs | test acc % | test MACs |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for p in entry["points"]:
            where = "calibration" if "threshold" not in p["target"] else "(fixed)"
            lines.append(
                f"| {_target(p['target'])} | {where} | {pct(p['calibration_accuracy'])} | "
                f"{p['calibration_macs']:.3f} | {pct(p['test_accuracy'])} | "
                f"{p['test_macs']:.3f} |"
            )
    lines += ["", *provenance(result), *seeds_section()]
    return "\n".join(lines)


def seeds_section() -> list[str]:
    """The learned gates' calibrated point over seeds: the spread the gates' initialisation
    alone gives on the same clips, read against the target."""
    result = read_result(SEEDS)
    if result is None:
        return []
    out = result.data
    base, s = out["all_frames_test_acc"], out["settings"]
    lines = [
        "",
        f"## Learned gates over {len(s['gate_seeds'])} seeds",
        "",
        f"The gates trained and calibrated (drop <= {100 * TARGET_DROP:g} points on "
        "calibration clips) once per seed on the same clips (the seed sets the gates' initial "
        f"weights and the batch order): {s['test_clips']} test clips, all-frame average "
        f"{pct(base)} %. A seed meets the target when it is within {100 * TARGET_DROP:g} points "
        f"at <= {TARGET_MACS} of the MACs on test.",
        "",
        "| group | seed | calib acc % | calib MACs | test acc % | test MACs | drop (points) | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    for entry in out["by_group"]:
        points = [(row["seed"], row["chosen"]) for row in entry["seeds"]]
        for seed, p in points:
            if p is None:
                lines.append(f"| {entry['group']} | {seed} | - | - | - | - | - | not reached |")
                continue
            lines.append(
                f"| {entry['group']} | {seed} | {pct(p['calibration_accuracy'])} | "
                f"{p['calibration_macs']:.3f} | {pct(p['test_accuracy'])} | "
                f"{p['test_macs']:.3f} | {100 * (p['test_accuracy'] - base):+.2f} | "
                f"{_met(_meets(p, base))} |"
            )
        reached = [p for _, p in points if p is not None]
        if len(reached) >= 2:
            drops = [100 * (p["test_accuracy"] - base) for p in reached]
            macs = [p["test_macs"] for p in reached]
            summary.append(
                f"- group {entry['group']}: drop {statistics.fmean(drops):+.2f} points "
                f"(sd {statistics.stdev(drops):.2f}, {min(drops):+.2f} to {max(drops):+.2f}) at "
                f"{statistics.fmean(macs):.3f} of the MACs (sd {statistics.stdev(macs):.3f}, "
                f"{min(macs):.3f} to {max(macs):.3f}); target met by "
                f"{sum(_meets(p, base) for p in reached)} of {len(points)} seeds."
            )
    return [*lines, "", *summary, "", *provenance(result)]


def _meets(point: dict, base: float) -> bool:
    """Within TARGET_DROP of the all-frame average at no more than TARGET_MACS, on test."""
    return point["test_macs"] <= TARGET_MACS and point["test_accuracy"] >= base - TARGET_DROP
