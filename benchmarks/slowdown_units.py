"""The slowdown suite's rows for strategies whose decisions are units: block gates and spatial
masks (`benchmarks/slowdown.py` runs them; this module attacks, measures and tabulates them).

Per (strategy, net): the CIFAR ResNet converted, its decision units fine-tuned (heads mode:
the backbone frozen) on a seeded subset of cifar10/train towards the budget, calibrated to the
budget on held-out cifar10/train images. The attack is PGD on the pixels (L-inf eps, random
start) descending sum_k relu((1 - t_k) - p_k) over every gate / mask unit, p_k its probability
on the every-block network's features (`unit_probabilities`): DeepSloth's hinge turned to gates,
pushing every gate open and every mask unit active. Each input set is measured with the
calibrated thresholds (off), with the MAC cap (`set_mac_cap`, the same thresholds) and streamed
through `dynify.BudgetGuard` (on); the attack targets the uncapped, unguarded model.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import dynify
from benchmarks.cifar_data import (
    INPUT_SIZE,
    _items,
    fit_and_calibration,
    subsample,
    weights_path,
)
from benchmarks.pgd import pgd

# the suite's defaults, for saying when a committed run was shortened
FULL = {"train_images": 10000, "attack_images": 200}
# strategy name in --strategies -> (dynify strategy, options, title)
UNIT_STRATEGIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "block-gates": ("block-gates", {"gate": "function"}, "block gates (function)"),
    "spatial-masks": ("spatial-masks", {"granularity": "region"}, "spatial masks (region)"),
    "spatial-masks-pixel": ("spatial-masks", {"granularity": "pixel"}, "spatial masks (pixel)"),
}


def unit_pgd(
    dyn, pixels: torch.Tensor, eps: float, steps: int, seed: int, to_input, batch: int = 50
) -> torch.Tensor:
    """PGD within `eps` (L-inf) pushing every unit's probability over 1 - threshold."""
    thresholds = dyn.thresholds.detach()

    def hinge(x: torch.Tensor) -> torch.Tensor:
        probs = dyn.unit_probabilities(to_input(x))
        if len(probs) == 1 and probs[0].dim() == 2 and len(thresholds) > 1:  # a plan
            return torch.relu((1.0 - thresholds) - probs[0]).sum()
        return sum(torch.relu((1.0 - thresholds[k]) - p).sum() for k, p in enumerate(probs))

    return pgd(pixels, hinge, eps, steps, seed, batch)


def worst_decisions(dyn, x: torch.Tensor) -> torch.Tensor:
    """The decisions of the dearest behaviour (every gate open, every unit active), [K]."""
    with torch.no_grad(), dyn.static():
        dyn(x[:1])
    return dyn.last_decisions()[0]


@torch.no_grad()
def measure(dyn, pixels, labels, to_input, worst: torch.Tensor) -> dict[str, float]:
    """Mean MACs fraction, share at the worst case, accuracy, the largest per-sample cost."""
    macs, at_worst, hits = [], [], 0
    for start in range(0, len(pixels), 100):
        x = to_input(pixels[start : start + 100])
        hits += int((dyn(x).argmax(-1) == labels[start : start + 100]).sum())
        macs.append(dyn.last_macs.double() / dyn.static_macs)
        at_worst.append((dyn.last_decisions() == worst).all(1))
    macs = torch.cat(macs)
    return {
        "macs": float(macs.mean()),
        "max_macs": float(macs.max()),
        "worst": float(torch.cat(at_worst).double().mean()),
        "acc": hits / len(labels),
    }


def run_units(
    name: str, depth: int, args: argparse.Namespace, train, test, to_input
) -> dict[str, Any]:
    """Convert, fine-tune, calibrate one unit strategy on CIFAR ResNet-`depth`; measure it
    clean and attacked, off, capped and guarded."""
    start = time.perf_counter()
    strategy, options, title = UNIT_STRATEGIES[name]
    fit, calib = fit_and_calibration(train, args.seed, args.train_images, args.calib_images)
    torch.manual_seed(args.seed)
    budget = args.unit_budget
    if strategy == "block-gates":
        options = {**options, "budget": budget}
    dyn = dynify.convert(
        f"cifar_resnet{depth}", strategy, options=options, weights=weights_path(args.data, depth)
    )
    ft = dynify.finetune(
        dyn,
        fit,
        mode=args.unit_mode,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        budget=budget,
        calibration_fraction=0.0,  # the calibration part is held out above
        progress=False,
    )
    cal = dynify.calibrate(dyn, calib, budget=budget, part="all")
    dyn.eval()
    print(
        f"{title}, resnet{depth}: units {ft.seconds:.0f} s; calibrated to "
        f"{cal.macs_fraction:.3f} of the MACs ({100 * cal.accuracy:.2f} %), thresholds "
        f"{[round(t, 3) for t in cal.thresholds]}",
        flush=True,
    )
    clean_images, clean_labels = _items(subsample(test, args.clean_images))
    attack_images, attack_labels = _items(subsample(test, args.attack_images))
    clean_pixels = clean_images.float() / 255
    attack_pixels = attack_images.float() / 255
    worst = worst_decisions(dyn, to_input(clean_pixels[:1]))
    with torch.no_grad(), dyn.static():
        static_acc = sum(
            int(
                (
                    dyn(to_input(clean_pixels[i : i + 200])).argmax(-1) == clean_labels[i : i + 200]
                ).sum()
            )
            for i in range(0, len(clean_labels), 200)
        ) / len(clean_labels)
    out: dict[str, Any] = {
        "kind": "units",
        "title": title,
        "net": f"cifar_resnet{depth}",
        "strategy": strategy,
        "options": options,
        "budget": budget,
        "mode": args.unit_mode,
        "cap": args.cap,
        "worst_case": dyn.worst_case_macs() / dyn.static_macs,
        "cap_floor": dyn.cap_floor() / dyn.static_macs,
        "thresholds": list(cal.thresholds),
        "calib_macs": cal.macs_fraction,
        "calib_acc": cal.accuracy,
        "static_acc": static_acc,
        "train_images": len(fit),
        "calib_images": len(calib),
        "clean_images": len(clean_labels),
        "attack_images": len(attack_labels),
        "epochs": args.epochs,
        "input_size": INPUT_SIZE,
        "guard": {
            "window": args.window,
            "gain": args.gain,
            "passes": args.passes,
            "steady_passes": args.steady_passes,
        },
        "units_seconds": ft.seconds,
        "rows": [],
    }

    def row(name: str, eps: int, steps: int, pixels, labels, **extra) -> dict[str, Any]:
        figures = {"off": measure(dyn, pixels, labels, to_input, worst)}
        dyn.set_mac_cap(args.cap)
        figures["cap"] = measure(dyn, pixels, labels, to_input, worst)
        dyn.set_mac_cap(None)
        from benchmarks.slowdown import measure_on  # the exit rows' guard stream; imports this

        figures["on"] = measure_on(
            dyn,
            pixels,
            labels,
            args,
            args.seed,
            budget=args.unit_budget,
            inputs=to_input,
            dearest=lambda d: (d.last_decisions() == worst).all(1),
            dearest_key="worst",
        )
        return {
            "input": name,
            "eps": eps,
            "steps": steps,
            "images": len(labels),
            **extra,
            **figures,
        }

    rows = out["rows"]
    for label, pixels, labels in (
        ("clean (test subset)", clean_pixels, clean_labels),
        ("clean (attacked images)", attack_pixels, attack_labels),
    ):
        rows.append(row(label, 0, 0, pixels, labels))
        print(f"{label}: {rows[-1]}", flush=True)
    for eps in args.eps:
        for steps in args.steps:
            t0 = time.perf_counter()
            adv = unit_pgd(dyn, attack_pixels, eps / 255, steps, args.seed, to_input)
            seconds = time.perf_counter() - t0
            rows.append(row("PGD", eps, steps, adv, attack_labels, attack_seconds=seconds))
            print(f"eps {eps}/255, {steps} steps: {rows[-1]}", flush=True)
    out["seconds"] = time.perf_counter() - start
    return out


# --- the report --------------------------------------------------------------------------------


def headline(r: dict) -> list[str]:
    worst = [row for row in r["rows"] if row["eps"] == 8 and row["steps"] == 30]
    if not worst:
        return []
    w, clean = worst[0], r["rows"][0]
    net = r["net"].removeprefix("cifar_")
    return [
        f"**{r['title'].capitalize()}, {net}:** under PGD 8/255, 30 steps, the mean cost is "
        f"{w['off']['macs']:.3f} of the static MACs with the calibrated thresholds "
        f"({100 * w['off']['worst']:.1f} % of images at the worst case, the dearest "
        f"{w['off']['max_macs']:.3f}); **{w['cap']['macs']:.3f} with `set_mac_cap({r['cap']})`** "
        f"(the dearest image {w['cap']['max_macs']:.3f}) and {w['on']['macs']:.3f} with "
        f"`BudgetGuard(budget={r['budget']})`. On clean test images the cap costs "
        f"{100 * (clean['off']['acc'] - clean['cap']['acc']):.2f} points "
        f"({100 * clean['off']['acc']:.2f} % off, {100 * clean['cap']['acc']:.2f} % capped; "
        f"the every-block network {100 * r['static_acc']:.2f} %).",
        "",
    ]


def table(key: str, r: dict) -> list[str]:
    g = r["guard"]
    net = r["net"].removeprefix("cifar_")
    lines = [
        f"## {r['title'].capitalize()} on {net} (`{r['strategy']}`, "
        + ", ".join(f"{k}={v}" for k, v in r["options"].items())
        + ")",
        "",
        f"Fine-tuned in {r['mode']} mode for {r['epochs']} epoch(s) on "
        f"{r['train_images']} cifar10/train images ({r['units_seconds']:.0f} s) towards a budget "
        f"of {r['budget']}, calibrated to it on {r['calib_images']} held-out cifar10/train images "
        f"(there: {r['calib_macs']:.3f} of the MACs, {100 * r['calib_acc']:.2f} %; thresholds "
        + ", ".join(f"{t:.3f}" for t in r["thresholds"])
        + f"). Worst case per image: {r['worst_case']:.3f} of the static MACs; the cap "
        f"{r['cap']} (its floor, every unit skipped: {r['cap_floor']:.3f}). Every-block network "
        f"on the clean test subset: {100 * r['static_acc']:.2f} %. Guard: window {g['window']}, "
        f"gain {g['gain']}, the last {g['steady_passes']} of {g['passes']} shuffled passes "
        "streamed one image at a time.",
        "",
        "| input | eps | steps | images | MACs off | worst off | max off | acc off | "
        "MACs cap | worst cap | max cap | acc cap | MACs guard | worst guard | acc guard | "
        "final level |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
        "--- | --- |",
    ]
    if r["train_images"] < FULL["train_images"] or r["attack_images"] < FULL["attack_images"]:
        lines[2:2] = [
            f"Shortened run: {r['train_images']} training images, {r['calib_images']} "
            f"calibration, {r['clean_images']} clean and {r['attack_images']} attacked test "
            f"images, {g['passes']} guard passes (the full run: "
            f"`python -m benchmarks slowdown --add --strategies block-gates spatial-masks "
            f"--nets 20 32`, {FULL['train_images']} training, {FULL['attack_images']} attacked).",
            "",
        ]
    for row in r["rows"]:
        off, cap, on = row["off"], row["cap"], row["on"]
        eps = f"{row['eps']}/255" if row["eps"] else "-"
        steps = str(row["steps"]) if row["steps"] else "-"
        lines.append(
            f"| {row['input']} | {eps} | {steps} | {row['images']} | {off['macs']:.3f} | "
            f"{100 * off['worst']:.1f} % | {off['max_macs']:.3f} | {100 * off['acc']:.2f} % | "
            f"{cap['macs']:.3f} | {100 * cap['worst']:.1f} % | {cap['max_macs']:.3f} | "
            f"{100 * cap['acc']:.2f} % | {on['macs']:.3f} | {100 * on['worst']:.1f} % | "
            f"{100 * on['acc']:.2f} % | {on['final_level']:.3f} |"
        )
    return [*lines, ""]


NOTES = (
    "Gates and masks: MACs are per image as a fraction of the static network's, deciders and "
    "mask units included (`last_macs`); 'worst' is the share of images that took the dearest "
    "decisions (every gate open, every mask unit active); 'max' the dearest image. Off: the "
    "calibrated thresholds. Cap: the same thresholds with `dyn.set_mac_cap(cap)` (the rule in "
    "`dynify.runtime.mac_cap`: a branch or mask runs only where it fits what is left of the "
    "image's allowance). Guard: `dynify.BudgetGuard` with the budget, no cap. Attack: PGD "
    "descending sum_k relu((1 - t_k) - p_k) over every gate or mask unit, p_k its probability "
    "on the every-block network's features, against the uncapped, unguarded model."
)
