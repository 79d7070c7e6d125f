"""The slowdown suite's frame-exit row: PGD on a clip's pixels against the exit scores.

The clips are `benchmarks/frame_exit.py`'s synthetic ones (each CIFAR-10 image a clip of random
views), the clip model its TSN over a pretrained CIFAR ResNet; `dynify.convert(...,
"frame-exit")` needs no training, so the model is calibrated to the budget
(`dynify.calibrate`) on clips of held-out cifar10/train images and measured on clips of
cifar10/test. The attack is the exit rows' (DeepSloth's hinge on score - threshold over every
exit), on the [0, 1] pixels of every frame of the clip (each frame within eps of its own).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import torch

import dynify
from benchmarks.cifar_data import MEAN, STD, fit_and_calibration, subsample, weights_path
from benchmarks.frame_exit import TSN, _images, make_clips
from benchmarks.pgd import pgd
from benchmarks.slowdown_rows import Attacked, measure_stream

TITLE = "frame exit (synthetic clips)"


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(MEAN).view(1, 1, 3, 1, 1), torch.tensor(STD).view(1, 1, 3, 1, 1)


def clip_input(pixels: torch.Tensor) -> torch.Tensor:
    """[N, T, 3, H, W] pixels in [0, 1] -> the clip model's normalised input."""
    mean, std = _stats()
    return (pixels - mean) / std


def clip_pixels(clips: torch.Tensor) -> torch.Tensor:
    """The normalised clips `make_clips` gives, back in [0, 1] pixels."""
    mean, std = _stats()
    return (clips * std + mean).clamp(0, 1)


def clip_pgd(dyn, pixels: torch.Tensor, eps: float, steps: int, seed: int) -> torch.Tensor:
    """DeepSloth's PGD on the clip's pixels: every exit's score below its threshold."""
    thresholds = dyn.thresholds.detach()

    def hinge(x: torch.Tensor) -> torch.Tensor:
        scores = dynify.exit_scores(dyn, clip_input(x))
        return sum(torch.relu(s - t).sum() for s, t in zip(scores, thresholds, strict=False))

    return pgd(pixels, hinge, eps, steps, seed, batch=25)


def run_clips(args: argparse.Namespace, train, test) -> dict[str, Any]:
    """Convert the TSN clip model, calibrate it to `args.clip_budget`, measure it clean and
    attacked, off and guarded."""
    start = time.perf_counter()
    _, calib = fit_and_calibration(train, args.seed, calib_images=args.calib_images)
    calib_images, calib_labels = _images(calib)
    calib_clips = make_clips(calib_images, args.frames, args.seed + 1)
    clean_images, clean_labels = _images(subsample(test, args.clean_images))
    attack_images, attack_labels = _images(subsample(test, args.attack_images))
    clean = clip_pixels(make_clips(clean_images, args.frames, args.seed + 2))
    attack = clip_pixels(make_clips(attack_images, args.frames, args.seed + 3))
    depth = args.nets[0]
    frame_net, _ = dynify.build_model(
        f"cifar_resnet{depth}", weights=weights_path(args.data, depth)
    )
    static = TSN(frame_net).eval()
    options = dynify.FrameExitOptions(order="strided", policy="confidence")
    dyn = dynify.convert(static, "frame-exit", calib_clips[:1], options=options).eval()
    budget = args.clip_budget
    calib_data = torch.utils.data.TensorDataset(calib_clips, calib_labels)
    cal = dynify.calibrate(dyn, calib_data, budget=budget, part="all")
    dyn.eval()
    with torch.no_grad(), dyn.static():
        static_acc = sum(
            int((dyn(clip_input(clean[i : i + 50])).argmax(-1) == clean_labels[i : i + 50]).sum())
            for i in range(0, len(clean), 50)
        ) / len(clean)
    print(f"frame exit: calibrated to {cal.macs_fraction:.3f} ({cal.accuracy:.4f})", flush=True)
    out: dict[str, Any] = {
        "kind": "units",
        "title": TITLE,
        "net": f"cifar_resnet{depth}",
        "strategy": "frame-exit",
        "options": {"frames": args.frames, "order": "strided", "policy": "confidence"},
        "budget": budget,
        "cap": None,
        "thresholds": list(cal.thresholds),
        "calib_macs": cal.macs_fraction,
        "calib_acc": cal.accuracy,
        "static_acc": static_acc,
        "reference_name": "every frame",
        "calib_images": len(calib_data),
        "clean_images": len(clean_labels),
        "attack_images": len(attack_labels),
        "guard": {
            "window": args.window,
            "gain": args.gain,
            "passes": args.passes,
            "steady_passes": args.steady_passes,
        },
        "rows": [],
    }
    g = out["guard"]
    out["setup"] = (
        f"TSN clip model of {args.frames} frames over the pretrained CIFAR ResNet-{depth} "
        "(`benchmarks/frame_exit.py`'s synthetic clips: random crops, flips, occluders and "
        "blurs of one cifar10 image), converted with the strided frame order and the "
        "confidence policy; no training. Calibrated to a budget of "
        f"{budget} on clips of {len(calib_data)} held-out cifar10/train images (there: "
        f"{cal.macs_fraction:.3f} of the MACs, {100 * cal.accuracy:.2f} %; thresholds "
        + ", ".join(f"{t:.3f}" for t in cal.thresholds)
        + f"). Every frame on the clean test clips: {100 * static_acc:.2f} %. 'worst': "
        "clips that looked at every frame (1.000 of the static MACs: the decisions cost none). "
        "No MAC cap here (frame exits take one through `dynify.calibrate(..., mac_cap=)`, not "
        f"measured). Guard: window {g['window']}, gain {g['gain']}, the last "
        f"{g['steady_passes']} of {g['passes']} shuffled passes, one clip at a time. Attack: "
        "PGD on every frame's [0, 1] pixels (each within eps), the exit rows' hinge."
    )

    def attacked() -> Iterator[Attacked]:
        for eps in args.eps:
            for steps in args.steps:
                t0 = time.perf_counter()
                adv = clip_pgd(dyn, attack, eps / 255, steps, args.seed)
                seconds = time.perf_counter() - t0
                yield "PGD", eps, steps, clip_input(adv), attack_labels, seconds

    clean_sets = [
        ("clean (test subset)", clip_input(clean), clean_labels),
        ("clean (attacked clips)", clip_input(attack), attack_labels),
    ]
    measure_stream(dyn, out["rows"], clean_sets, attacked(), args, budget)
    out["seconds"] = time.perf_counter() - start
    out["shortened"] = (
        f"Run size: {len(calib_data)} calibration clips, {len(clean_labels)} clean and "
        f"{len(attack_labels)} attacked test clips of {args.frames} frames."
    )
    return out
