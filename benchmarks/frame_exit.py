"""frame-exit on synthetic clips made from CIFAR-10 images, per-frame network a pretrained
CIFAR ResNet-44: accuracy vs MACs, and batch-1 latency against the MAC ratio.

    python -m benchmarks frame_exit --data ../shared/data --depth 44 --frames 8 \
        --test-images 1500 --calib-images 1000 --latency-clips 60 --threads 1

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
   on the same clips in alternating runs.
"""

from __future__ import annotations

import argparse
import statistics
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
TARGET_MACS = 0.45  # of the all-frame average's MACs, within TARGET_DROP of its accuracy
TARGET_DROP = 0.005
TARGET_LATENCY = 1.15  # batch-1 latency ratio over MAC ratio
MAX_DROPS = (0.0, 0.0025, 0.005, 0.01, 0.02)
BUDGETS = (0.2, 0.3, 0.4, 0.5, 0.6)
GRID = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.993, 0.995, 0.997, 0.998, 0.999, 0.9995)
GRID += (1.01,)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--depth", type=int, default=44, choices=(20, 32, 44))
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--order", default="strided", choices=("strided", "sequential"))
    parser.add_argument("--policy", default="confidence")
    parser.add_argument("--test-images", type=int, default=1500, help="0: all 5000")
    parser.add_argument("--calib-images", type=int, default=1000)
    parser.add_argument("--latency-clips", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)


def apply_quick(args: argparse.Namespace) -> None:
    args.depth = 20 if args.depth == 44 else args.depth
    args.test_images, args.calib_images = 40, 40
    args.latency_clips = min(args.latency_clips, 4)


def run(args: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(args.threads)
    train_set, test_set = load_cifar(args.data, args.cache)
    _, calib = fit_and_calibration(train_set, args.seed, calib_images=args.calib_images)
    test_set = subsample(test_set, args.test_images)
    calib_data, _ = clip_data(calib, args.frames, args.seed + 1)
    test_data, test_clips = clip_data(test_set, args.frames, args.seed + 2)
    name = f"cifar_resnet{args.depth}"
    frame_net, _ = dynify.build_model(name, weights=weights_path(args.data, args.depth))
    static = TSN(frame_net).eval()
    example = test_clips[:1]
    options = dynify.FrameExitOptions(order=args.order, policy=args.policy)
    dyn = dynify.convert(static, "frame-exit", example, options=options).eval()
    points = dynify.operating_points(
        dyn, calib_data, test_data, budgets=BUDGETS, max_drops=MAX_DROPS, thresholds=GRID
    )
    rows = [p.to_dict() for p in points]
    every_frame = next(p for p in points if p.target == {"threshold": 1.01})
    one_frame = next(p for p in points if p.target == {"threshold": 0.0})
    chosen = next((p for p in points if p.target == {"max_drop": TARGET_DROP}), every_frame)
    dyn.set_thresholds(chosen.thresholds)
    dyn.temperatures.copy_(torch.tensor(chosen.temperatures))
    latency = measure_latency(static, dyn, test_clips[: args.latency_clips])
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.update(
        calib_clips=len(calib_data),
        test_clips=len(test_data),
        frame_macs=dyn.frame_macs,
        order_of_frames=dyn.order,
    )
    return {
        NAME: {
            "settings": settings,
            "static_macs": dyn.static_macs,
            "all_frames_test_acc": every_frame.test_accuracy,
            "all_frames_calib_acc": every_frame.calibration_accuracy,
            "one_frame_test_acc": one_frame.test_accuracy,
            "points": rows,
            "chosen": chosen.to_dict(),
            "latency": latency,
        }
    }


def measure_latency(static: nn.Module, dyn: dynify.DynamicModel, clips: Tensor) -> dict:
    """Mean seconds per clip at batch 1 of the static clip model and of `dyn` (its thresholds
    as set), on the same clips in alternating runs, and the MACs `dyn` spent on them."""
    spent: list[int] = []

    def record(name: str) -> None:
        if name == "dynamic":
            spent.append(int(dyn.last_macs[0]))

    models = {"static": static, "dynamic": dyn, "frame_by_frame": FrameByFrame(static.frame)}
    with torch.no_grad():
        for model in models.values():  # warm up
            model(clips[:1])
    times = alternating_runs(models, clips, repeats=len(clips), block=10, after=record)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    latency_ratio = mean["dynamic"] / mean["static"]
    macs_ratio = statistics.fmean(spent) / dyn.static_macs
    return {
        "clips": len(clips),
        "static_ms": 1e3 * mean["static"],
        "dynamic_ms": 1e3 * mean["dynamic"],
        "latency_ratio": latency_ratio,
        "macs_ratio": macs_ratio,
        "ratio_to_macs": latency_ratio / macs_ratio,
        "frame_by_frame_ms": 1e3 * mean["frame_by_frame"],
        "ratio_to_macs_frame_by_frame": mean["dynamic"] / mean["frame_by_frame"] / macs_ratio,
    }


def fewest_macs_within(points: list[dict], reference: float, drop: float, key: str) -> dict | None:
    """The cheapest point (on `key` data) whose accuracy there is within `drop` of reference."""
    acc, macs = f"{key}_accuracy", f"{key}_macs"
    within = [p for p in points if p[acc] >= reference - drop - 1e-12]
    return min(within, key=lambda p: p[macs]) if within else None


def _frame_by_frame(lat: dict) -> str:
    if "frame_by_frame_ms" not in lat:
        return ""
    return (
        f" The static model run one frame at a time (batch 1 per frame, as frame-exit runs "
        f"them) takes {lat['frame_by_frame_ms']:.1f} ms: against it the dynamic model's "
        f"latency ratio over its MAC ratio is {lat['ratio_to_macs_frame_by_frame']:.3f}x, so "
        "the gap is the per-frame network's lower throughput at batch 1 than on the clip's "
        "frames batched together, not the decisions."
    )


def _target(target: dict) -> str:
    ((key, value),) = target.items()
    return {"max_drop": f"drop <= {100 * value:g} pt", "budget": f"budget {value:g}"}.get(
        key, f"threshold {value:g}"
    )


def render() -> str:
    result = read_result(NAME)
    lines = ["# frame-exit: stopping early over a clip's frames", ""]
    if result is None:
        return "\n".join(lines + missing(NAME, f"python -m benchmarks {NAME} --data DATA"))
    out = result.data
    s, lat, chosen = out["settings"], out["latency"], out["chosen"]
    base = out["all_frames_test_acc"]
    curve = [p for p in out["points"] if "threshold" in p["target"]]
    best = fewest_macs_within(out["points"], base, TARGET_DROP, "test")
    best_curve = fewest_macs_within(curve, base, TARGET_DROP, "test")
    lines += [
        f"Synthetic clips (a stand-in: no video data ships): each of {s['test_clips']} "
        f"cifar10/test images (evenly spaced over the 5,000, every class alike) becomes a clip of {s['frames']} "
        "frames, each a random crop, flip, occlusion and blur of it; thresholds calibrated on "
        f"clips of {s['calib_clips']} held-out cifar10/train images. Per-frame network: the "
        f"pretrained CIFAR ResNet-{s['depth']} ({s['frame_macs'] / 1e6:.1f} M MACs per frame), "
        f"frames looked at in the '{s['order']}' order {s['order_of_frames']}, exit policy "
        f"'{s['policy']}'.",
        "",
        f"- The {s['frames']}-frame average (the static clip model): **{pct(base)} %** on test; "
        f"one frame: {pct(out['one_frame_test_acc'])} %.",
        f"- Calibrated for a drop of at most {100 * TARGET_DROP:g} points (on calibration "
        f"clips only): **{pct(chosen['test_accuracy'])} % at {chosen['test_macs']:.3f} of the "
        f"MACs** on test ({100 * (chosen['test_accuracy'] - base):+.2f} points); target: within "
        f"{100 * TARGET_DROP:g} points at <= {TARGET_MACS} of the MACs: "
        + (
            "met."
            if chosen["test_macs"] <= TARGET_MACS and chosen["test_accuracy"] >= base - TARGET_DROP
            else "not met."
        ),
    ]
    if best is not None:
        lines.append(
            f"- The fewest MACs within {100 * TARGET_DROP:g} points on test, over every point "
            f"below (read on test, so a selection, not a calibration): {best['test_macs']:.3f} "
            f"({pct(best['test_accuracy'])} %, {_target(best['target'])})"
            + (
                f"; on the shared-threshold curve alone: {best_curve['test_macs']:.3f}."
                if best_curve is not None
                else "."
            )
        )
    lines += [
        f"- Batch-1 latency (eager, {result.metadata.get('threads')} thread, {lat['clips']} "
        f"test clips, alternating runs) at the calibrated point: {lat['dynamic_ms']:.1f} ms "
        f"against {lat['static_ms']:.1f} ms, a latency ratio of {lat['latency_ratio']:.3f} for "
        f"a MAC ratio of {lat['macs_ratio']:.3f} on those clips: **{lat['ratio_to_macs']:.3f}x** "
        f"(target <= {TARGET_LATENCY}x: "
        + ("met)." if lat["ratio_to_macs"] <= TARGET_LATENCY else "not met).")
        + _frame_by_frame(lat),
        "",
        "| target | thresholds chosen on | calib acc % | calib MACs | test acc % | test MACs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in out["points"]:
        where = "calibration" if "threshold" not in p["target"] else "(fixed)"
        lines.append(
            f"| {_target(p['target'])} | {where} | {pct(p['calibration_accuracy'])} | "
            f"{p['calibration_macs']:.3f} | {pct(p['test_accuracy'])} | {p['test_macs']:.3f} |"
        )
    lines += ["", *provenance(result)]
    return "\n".join(lines)
