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
from benchmarks.slowdown_rows import add_row

# the suite's defaults, for saying when a committed run was shortened
FULL = {"train_images": 10000, "attack_images": 200}
FULL_COMMAND = (
    "python -m benchmarks slowdown --add --strategies block-gates block-gates-halting "
    "block-gates-policy dynamic-width --nets 20 32, and for the masks --strategies "
    "spatial-masks spatial-masks-pixel --unit-mode heads --unit-lr 0.02"
)
# strategy name in --strategies -> (dynify strategy, options, title)
UNIT_STRATEGIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "block-gates": ("block-gates", {"gate": "function"}, "block gates (function)"),
    "block-gates-halting": ("block-gates", {"gate": "halting"}, "block gates (halting)"),
    "block-gates-policy": ("block-gates", {"gate": "policy"}, "block gates (policy)"),
    "spatial-masks": ("spatial-masks", {"granularity": "region"}, "spatial masks (region)"),
    "spatial-masks-pixel": ("spatial-masks", {"granularity": "pixel"}, "spatial masks (pixel)"),
    "dynamic-width": ("dynamic-width", {}, "dynamic width"),
}
# strategies whose conversion options carry the training budget
BUDGET_OPTION = ("block-gates", "dynamic-width")


def unit_hinge(
    dyn, probs: list[torch.Tensor], thresholds: torch.Tensor, halting: bool = False
) -> torch.Tensor:
    """What the attack descends: zero once every unit takes its dearest decision.

    Gates, mask units, width gates (p: the open / active / full-width probability): a unit
    takes the dear side when p > 1 - t, so sum relu((1 - t) - p). Halting units (p: the
    halting score): a stage halts once its cumulative score reaches its threshold, so the
    attacker keeps each stage's sum of scores under it: sum relu(sum_stage p - t_stage).
    `halting`: the model was converted with halting gates (the suite knows its options).
    """
    if halting:
        stages: dict[int, torch.Tensor] = {}
        for gate, p in zip(dyn.gate_plan(), probs, strict=True):
            stages[gate.threshold] = stages.get(gate.threshold, 0) + p
        return sum(torch.relu(s - thresholds[g]).sum() for g, s in stages.items())
    if len(probs) == 1 and probs[0].dim() == 2 and len(thresholds) > 1:  # a policy's plan
        return torch.relu((1.0 - thresholds) - probs[0]).sum()
    return sum(torch.relu((1.0 - thresholds[k]) - p).sum() for k, p in enumerate(probs))


def unit_pgd(
    dyn,
    pixels: torch.Tensor,
    eps: float,
    steps: int,
    seed: int,
    to_input,
    batch: int = 50,
    halting: bool = False,
) -> torch.Tensor:
    """PGD within `eps` (L-inf) pushing every unit to its dearest decision (`unit_hinge`)."""
    thresholds = dyn.thresholds.detach()

    def hinge(x: torch.Tensor) -> torch.Tensor:
        return unit_hinge(dyn, dyn.unit_probabilities(to_input(x)), thresholds, halting)

    return pgd(pixels, hinge, eps, steps, seed, batch)


HALTING_COMPUTE_WEIGHT = 5.0  # the block-gates suite's: halting units oscillate at 20


def _log(info: dict) -> None:
    if info["step"] % 20 == 0:
        keep = ("loss", "distill", "macs_fraction", "greedy_macs_fraction", "density")
        print(
            f"    step {info['step']}: "
            + ", ".join(f"{k} {info[k]:.3f}" for k in keep if k in info),
            flush=True,
        )


@torch.no_grad()
def every_unit_accuracy(dyn, pixels, labels, to_input) -> float:
    """Accuracy of `dyn.static()` (every block, every unit, full width) on the images."""
    with dyn.static():
        hits = sum(
            int((dyn(to_input(pixels[i : i + 200])).argmax(-1) == labels[i : i + 200]).sum())
            for i in range(0, len(labels), 200)
        )
    return hits / len(labels)


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
    clean and attacked, off, capped (where the strategy holds a MAC cap) and guarded."""
    start = time.perf_counter()
    strategy, options, title = UNIT_STRATEGIES[name]
    fit, calib = fit_and_calibration(train, args.seed, args.train_images, args.calib_images)
    torch.manual_seed(args.seed)
    budget = args.unit_budget
    if strategy in BUDGET_OPTION:
        options = {**options, "budget": budget}
        weight = args.unit_compute_weight
        if weight is None and options.get("gate") == "halting":
            weight = HALTING_COMPUTE_WEIGHT
        if weight is not None:
            options["compute_weight"] = weight
        if args.unit_budget_rate is not None:
            options["budget_rate"] = args.unit_budget_rate
    dyn = dynify.convert(
        f"cifar_resnet{depth}", strategy, options=options, weights=weights_path(args.data, depth)
    )
    clean_images, clean_labels = _items(subsample(test, args.clean_images))
    clean_pixels = clean_images.float() / 255
    dyn.eval()
    original_acc = every_unit_accuracy(dyn, clean_pixels, clean_labels, to_input)
    ft = dynify.finetune(
        dyn,
        fit,
        mode=args.unit_mode,
        epochs=args.unit_epochs,
        batch_size=args.batch_size,
        lr=args.unit_lr,
        seed=args.seed,
        budget=budget,
        calibration_fraction=0.0,  # the calibration part is held out above
        progress=False,
        callback=_log,
    )
    cal = dynify.calibrate(dyn, calib, budget=budget, part="all")
    dyn.eval()
    print(
        f"{title}, resnet{depth}: units {ft.seconds:.0f} s; calibrated to "
        f"{cal.macs_fraction:.3f} of the MACs ({100 * cal.accuracy:.2f} %), thresholds "
        f"{[round(t, 3) for t in cal.thresholds]}",
        flush=True,
    )
    attack_images, attack_labels = _items(subsample(test, args.attack_images))
    attack_pixels = attack_images.float() / 255
    worst = worst_decisions(dyn, to_input(clean_pixels[:1]))
    static_acc = every_unit_accuracy(dyn, clean_pixels, clean_labels, to_input)
    capped = isinstance(dyn, dynify.MacCapped)
    out: dict[str, Any] = {
        "kind": "units",
        "title": title,
        "net": f"cifar_resnet{depth}",
        "strategy": strategy,
        "options": options,
        "budget": budget,
        "mode": args.unit_mode,
        "lr": args.unit_lr,
        "cap": args.cap if capped else None,
        "worst_case": dyn.worst_case_macs() / dyn.static_macs,
        "cap_floor": dyn.cap_floor() / dyn.static_macs if capped else None,
        "thresholds": list(cal.thresholds),
        "calib_macs": cal.macs_fraction,
        "calib_acc": cal.accuracy,
        "static_acc": static_acc,
        "original_acc": original_acc,
        "train_images": len(fit),
        "calib_images": len(calib),
        "clean_images": len(clean_labels),
        "attack_images": len(attack_labels),
        "epochs": args.unit_epochs,
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

    rows = out["rows"]

    def row(name: str, eps: int, steps: int, pixels, labels, **extra) -> None:
        figures = {"off": measure(dyn, pixels, labels, to_input, worst)}
        if capped:
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
        add_row(rows, name, eps, steps, labels, figures, **extra)

    for label, pixels, labels in (
        ("clean (test subset)", clean_pixels, clean_labels),
        ("clean (attacked images)", attack_pixels, attack_labels),
    ):
        row(label, 0, 0, pixels, labels)
    for eps in args.eps:
        for steps in args.steps:
            t0 = time.perf_counter()
            adv = unit_pgd(
                dyn,
                attack_pixels,
                eps / 255,
                steps,
                args.seed,
                to_input,
                halting=options.get("gate") == "halting",
            )
            seconds = time.perf_counter() - t0
            row("PGD", eps, steps, adv, attack_labels, attack_seconds=seconds)
    out["seconds"] = time.perf_counter() - start
    return out


# --- the report --------------------------------------------------------------------------------


def _strongest(r: dict) -> dict | None:
    """The row of the strongest attack: PGD 8/255, 30 steps (images), or the last row."""
    rows = [row for row in r["rows"] if row["eps"] == 8 and row["steps"] == 30]
    if rows:
        return rows[0]
    attacked = [row for row in r["rows"] if row["input"] != "clean" and row["eps"]]
    return attacked[-1] if attacked else None


def attack_name(r: dict, row: dict) -> str:
    if r.get("attack") == "swaps":
        return f"{row['eps']} token swaps"
    return f"PGD {row['eps']}/255, {row['steps']} steps"


def headline(r: dict) -> list[str]:
    w = _strongest(r)
    if w is None:
        return []
    clean = r["rows"][0]
    net = r["net"].removeprefix("cifar_")
    guard = w["on"]["macs"]
    met = "met" if guard <= r["budget"] + 0.05 else "not met"
    text = (
        f"**{r['title'][0].upper() + r['title'][1:]}, {net}** (clean accuracy "
        f"{100 * clean['off']['acc']:.2f} %; "
        + (
            f"the static network {100 * r['original_acc']:.2f} %, every block after "
            f"fine-tuning {100 * r['static_acc']:.2f} %"
            if "original_acc" in r
            else f"{r.get('reference_name', 'the every-block network')} "
            f"{100 * r['static_acc']:.2f} %"
        )
        + f"): under {attack_name(r, w)}, the mean cost is "
        f"{w['off']['macs']:.3f} of the static MACs with the calibrated thresholds (clean "
        f"{clean['off']['macs']:.3f}; {100 * w['off']['worst']:.1f} % of inputs at the worst "
        f"case, the dearest {w['off']['max_macs']:.3f}); **{guard:.3f} with "
        f"`BudgetGuard(budget={r['budget']})`** (budget + 0.05: {met}; on clean inputs the guard "
        f"answers {100 * clean['on']['acc']:.2f} %)"
    )
    if r.get("cap") is not None and "cap" in w:
        text += (
            f"; {w['cap']['macs']:.3f} with `set_mac_cap({r['cap']})` (the dearest input "
            f"{w['cap']['max_macs']:.3f}; the cap costs "
            f"{100 * (clean['off']['acc'] - clean['cap']['acc']):.2f} points on clean inputs)"
        )
    else:
        text += "; no MAC cap (the strategy is not `dynify.MacCapped`)"
    return [text + ".", ""]


def _setup(r: dict) -> str:
    """The paragraph under a unit row's title: how the model was made and calibrated."""
    g = r["guard"]
    lr = "" if r.get("lr") is None else f", lr {r['lr']}"
    cap = (
        f"; the cap {r['cap']} (its floor, every unit skipped: {r['cap_floor']:.3f})"
        if r.get("cap") is not None
        else "; no MAC cap (the strategy is not `dynify.MacCapped`)"
    )
    original = (
        f", the pretrained network before fine-tuning {100 * r['original_acc']:.2f} %"
        if "original_acc" in r
        else ""
    )
    return (
        f"Fine-tuned in {r['mode']} mode for {r['epochs']} epoch(s){lr} on "
        f"{r['train_images']} cifar10/train images ({r['units_seconds']:.0f} s) towards a budget "
        f"of {r['budget']}, calibrated to it on {r['calib_images']} held-out cifar10/train images "
        f"(there: {r['calib_macs']:.3f} of the MACs, {100 * r['calib_acc']:.2f} %; thresholds "
        + ", ".join(f"{t:.3f}" for t in r["thresholds"])
        + f"). Worst case per image: {r['worst_case']:.3f} of the static MACs{cap}. "
        f"Every-block network on the clean test subset: {100 * r['static_acc']:.2f} %{original}. "
        f"Guard: window {g['window']}, gain {g['gain']}, the last {g['steady_passes']} of "
        f"{g['passes']} shuffled passes streamed one image at a time."
    )


def table(key: str, r: dict) -> list[str]:
    g = r["guard"]
    net = r["net"].removeprefix("cifar_")
    options = ", ".join(f"{k}={v}" for k, v in r["options"].items())
    title = r["title"][0].upper() + r["title"][1:]
    capped = r.get("cap") is not None
    swaps = r.get("attack") == "swaps"
    lines = [
        f"## {title} on {net} (`{r['strategy']}`" + (f", {options}" if options else "") + ")",
        "",
        r.get("setup") or _setup(r),
        "",
        f"| input | {'swaps' if swaps else 'eps'} | {'-' if swaps else 'steps'} | n | "
        "MACs off | worst off | max off | acc off | "
        + ("MACs cap | worst cap | max cap | acc cap | " if capped else "")
        + "MACs guard | worst guard | acc guard | final level |",
        "| --- " * (12 + 4 * capped) + "|",
    ]
    if r.get("shortened"):
        lines[4:4] = [r["shortened"], ""]
    elif not swaps and (
        r["train_images"] < FULL["train_images"] or r["attack_images"] < FULL["attack_images"]
    ):
        lines[4:4] = [
            f"Shortened run: {r['train_images']} training images, {r['calib_images']} "
            f"calibration, {r['clean_images']} clean and {r['attack_images']} attacked test "
            f"images, {g['passes']} guard passes (the full run: `{FULL_COMMAND}`, "
            f"{FULL['train_images']} training, {FULL['attack_images']} attacked).",
            "",
        ]
    for row in r["rows"]:
        off, on = row["off"], row["on"]
        if swaps:
            eps, steps = (str(row["eps"]) if row["eps"] else "-"), "-"
        else:
            eps = f"{row['eps']}/255" if row["eps"] else "-"
            steps = str(row["steps"]) if row["steps"] else "-"
        cells = [
            row["input"],
            eps,
            steps,
            str(row["images"]),
            f"{off['macs']:.3f}",
            f"{100 * off['worst']:.1f} %",
            f"{off['max_macs']:.3f}",
            f"{100 * off['acc']:.2f} %",
        ]
        if capped:
            cap = row["cap"]
            cells += [
                f"{cap['macs']:.3f}",
                f"{100 * cap['worst']:.1f} %",
                f"{cap['max_macs']:.3f}",
                f"{100 * cap['acc']:.2f} %",
            ]
        cells += [
            f"{on['macs']:.3f}",
            f"{100 * on['worst']:.1f} %",
            f"{100 * on['acc']:.2f} %",
            f"{on['final_level']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


NOTES = (
    "Gates, masks, widths, frames and texts: MACs are per input as a fraction of the static "
    "network's, deciders and mask units included (`last_macs`); 'worst' is the share of inputs "
    "that took the dearest decisions (every gate open, every mask unit active, every branch at "
    "full width; clips and texts: as each row's setup says); 'max' the dearest input. Off: the "
    "calibrated thresholds. Cap: the same thresholds with `dyn.set_mac_cap(cap)` (the rule in "
    "`dynify.runtime.mac_cap`: a branch or mask runs only where it fits what is left of the "
    "image's allowance). Guard: `dynify.BudgetGuard` with the budget, no cap. Attack on gates, "
    "masks and widths: PGD descending sum_k relu((1 - t_k) - p_k) over every gate, mask unit or "
    "width gate, p_k its probability of the dear side (open, active, full width) on the "
    "every-block network's features (halting units: sum over each stage of relu(sum of its "
    "halting scores - t)), against the uncapped, unguarded model."
)
