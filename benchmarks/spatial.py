"""Spatial strategies: masked-block latency, and the resolution cascade and pixel masks on
CIFAR-10.

    python -m benchmarks spatial --part latency --models resnet18 resnet50 --reps 15
    python -m benchmarks spatial --part resolution --data ../shared/data --nets 44 --epochs 1 \
        --joint 44 --joint-epochs 6 --static-epochs 6 --threads 1 --save-dir DIR
    python -m benchmarks spatial --part resolution-latency --artifact DIR/cifar_resnet44-joint.dyn
    python -m benchmarks spatial --part masks --data ../shared/data --nets 44 --epochs 2 \
        --joint-epochs 0 --train-budget 0.6 --calib-images 2000 --threads 2

`latency`: torchvision ResNets with random weights at 224x224, batch 1. Every maskable block gets
a fixed random mask of the given density (region: random tiles, drawn from the coarsest tiles to
the finest so the MAC-weighted density is the target; pixel: a smooth random blob mask
thresholded at the density quantile, as learned masks are spatially coherent). Dense branch and
sparse wrapper are timed interleaved, block by block, on the same captured block inputs, and
the medians are summed over the masked blocks; the whole network is timed the same way
(`dynify.force_mask_density` and `dynify.bench_masked_blocks`).

`resolution` and `masks`: the early-exit suite's CIFAR-10 pipeline (benchmarks/cifar10.py) with
`--strategy resolution` / `spatial-masks`. `resolution-latency`: batch-1 eager latency of a
trained cascade at thresholds `dynify.calibrate` chooses for `--latency-budgets`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import dynify
from benchmarks import cifar10
from benchmarks.cifar_data import fit_and_calibration, load_cifar, normalized_images, weights_path
from benchmarks.report import frac, missing, pct, provenance
from benchmarks.results import read_result
from benchmarks.timing import alternating_runs

DENSITIES = (1.0, 0.5, 0.25, 0.1)
PARTS = ("latency", "resolution", "resolution-latency", "masks")
RESULTS = {
    "latency": "spatial_masks_latency",
    "resolution": "resolution_cifar10",
    "resolution-latency": "resolution_latency",
    "masks": "spatial_masks_cifar10",
}
# Re-runs of the published CIFAR-10 parts through this suite at the published settings (the
# resolution cascade: its defaults, distillation temperature 3 and joint rate 0.01), and
# shortened (fewer images, epochs).
FULL = {
    "resolution": "resolution_cifar10_resnet44_t3",
    "masks": "spatial_masks_cifar10_resnet44_full",
}
# The shortened resolution re-run again with one joint setting changed from its default.
SHORT_RESOLUTION_VARIANTS = (
    "resolution_cifar10_resnet44_short_lr0005",
    "resolution_cifar10_resnet44_short_clip10",
)
# Fine-tuning settings a re-run may change, as the suite's flags, with their defaults.
JOINT_SETTINGS = {"--joint-lr": ("joint rate", "0.01"), "--clip-grad-norm": ("clip", "50")}
SHORT = {
    "resolution": "resolution_cifar10_resnet44_short",
    "masks": "spatial_masks_cifar10_resnet44_short",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=PARTS, default="latency")
    cifar10.add_arguments(parser)  # resolution and masks: the CIFAR-10 pipeline's options
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--granularities", nargs="+", default=["region", "pixel"])
    parser.add_argument("--tile", type=int, default=8)
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--artifact", type=Path, help="resolution-latency: the trained cascade")
    parser.add_argument("--latency-budgets", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    parser.add_argument("--latency-repeats", type=int, default=600)
    parser.add_argument("--latency-rounds", type=int, default=3)


def apply_quick(args: argparse.Namespace) -> None:
    if args.part == "latency":
        args.models, args.granularities, args.reps = ["resnet18"], ["region"], 2
        args.densities = [0.25]
    elif args.part == "resolution-latency":
        args.latency_repeats, args.latency_rounds, args.latency_budgets = 20, 1, [0.5]
        args.calib_images = args.calib_images or 256
    else:
        cifar10.apply_quick(args)
        args.strategy = "resolution" if args.part == "resolution" else "spatial-masks"


def run(args: argparse.Namespace) -> dict[str, dict]:
    name = args.name or RESULTS[args.part]  # --name: a results file apart from the published
    torch.set_num_threads(args.threads)
    if args.part == "latency":
        results = [
            mask_latency(m, g, args.tile, args.reps, seed=0, densities=tuple(args.densities))
            for m in args.models
            for g in args.granularities
        ]
        return {name: {"results": results}}
    if args.part == "resolution-latency":
        return {name: cascade_latency(args)}
    args.strategy = "resolution" if args.part == "resolution" else "spatial-masks"
    args.name = name
    return cifar10.run(args)


# --- masked-block latency ----------------------------------------------------------------------


def mask_latency(
    model_name: str,
    granularity: str,
    tile: int,
    reps: int,
    seed: int,
    densities: tuple[float, ...] = DENSITIES,
) -> dict:
    """A torchvision network with random weights converted with spatial masks, its masked
    blocks timed at each forced density by `dynify.bench_masked_blocks`."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, model_name)().eval()
    options = dynify.SpatialMaskOptions(granularity=granularity, tile=tile)
    dyn = dynify.convert(model, "spatial-masks", torch.randn(1, 3, 224, 224), options=options)
    bench = dynify.bench_masked_blocks(dyn, densities, runs=reps, seed=seed)
    for row in bench.rows:
        print(json.dumps({"model": model_name, **row.to_dict()}), flush=True)
    return {"model": model_name, "tile": tile, **bench.to_dict()}


# --- the resolution cascade's latency ----------------------------------------------------------


def cascade_latency(args: argparse.Namespace) -> dict:
    """Batch-1 eager latency of a trained cascade against the original network, at the
    thresholds `dynify.calibrate` chooses on the calibration split for each budget; runs of
    consecutive test images, the two models alternating; the median of the rounds."""
    if args.artifact is None:
        raise SystemExit("--part resolution-latency needs --artifact (a trained cascade).")
    train, test = load_cifar(args.data, args.cache)
    _, calib = fit_and_calibration(train, args.seed, calib_images=args.calib_images)
    dyn = dynify.load(args.artifact).eval()
    net = dyn.model_name
    static, _ = dynify.build_model(
        net, weights=weights_path(args.data, int(net.removeprefix("cifar_resnet")))
    )
    images = normalized_images(test)[: args.latency_repeats]
    torch.set_num_threads(1)
    results: dict = {"artifact": str(args.artifact), "strategy": dyn.strategy, "budgets": []}
    for budget in args.latency_budgets:
        cal = dynify.calibrate(dyn, calib, budget=budget)
        rounds = []
        for _ in range(args.latency_rounds):
            macs: list[float] = []

            def record(name: str, macs: list[float] = macs) -> None:
                if name == "dynamic":
                    macs.append(float(dyn.last_macs[0]))

            times = alternating_runs(
                {"static": static, "dynamic": dyn}, images, args.latency_repeats, after=record
            )
            means = {name: statistics.fmean(v) for name, v in times.items()}
            ratio = means["dynamic"] / means["static"]
            fraction = statistics.fmean(macs) / dyn.static_macs
            rounds.append(
                {
                    "static_ms": means["static"] * 1e3,
                    "dynamic_ms": means["dynamic"] * 1e3,
                    "ratio": ratio,
                    "macs_fraction": fraction,
                    "fall": (1 - ratio) / (1 - fraction),
                }
            )
        rounds.sort(key=lambda r: r["ratio"])
        row = {"budget": budget, "thresholds": cal.thresholds, **rounds[len(rounds) // 2]}
        row["round_falls"] = [round(r["fall"], 3) for r in rounds]
        results["budgets"].append(row)
        print(json.dumps(row), flush=True)
    return results


# --- the report --------------------------------------------------------------------------------


def _partial_cell(row: dict) -> str:
    """The blocks neither all on nor all off (older results files do not record them)."""
    if not row.get("partial_blocks"):
        return "-"
    return (
        f"{row['partial_blocks']}, {row['partial_density']:.2f}, {row['partial_cpu_speedup']:.2f}x"
    )


def latency_tables(data: dict) -> list[str]:
    lines: list[str] = []
    for res in data["results"]:
        lines += [
            f"#### {res['model']}, {res['granularity']} masks "
            f"({res['masked_blocks']} masked blocks = {res['masked_share_of_macs']:.0%} of "
            f"the MACs; tiles {sorted(set(res['tiles']))}; skipped {res['skipped_blocks']})",
            "",
            "| density (realized) | block MACs | masked blocks dense / sparse, CPU ms | "
            "speed-up CPU (wall) | ideal 1/MACs | partially masked blocks: count, "
            "density, speed-up | whole net dense / dynamic, CPU ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            for key in ("blocks_dense", "blocks_sparse", "net_dense", "net_dynamic"):
                r.setdefault(f"{key}_cpu_ms", r[f"{key}_ms"])  # wall-only older runs
            r.setdefault("cpu_speedup", r["speedup"])
            name = f"{r['density']:.2f} ({r['realized_density']:.2f})"
            if r["dense_fallback"]:
                name += ", dense fallback"
            lines.append(
                f"| {name} | {r['macs_fraction']:.2f} | {r['blocks_dense_cpu_ms']:.1f} / "
                f"{r['blocks_sparse_cpu_ms']:.1f} | **{r['cpu_speedup']:.2f}x** "
                f"({r['speedup']:.2f}x) | {1 / max(r['macs_fraction'], 1e-9):.2f}x | "
                f"{_partial_cell(r)} | "
                f"{r['net_dense_cpu_ms']:.1f} / {r['net_dynamic_cpu_ms']:.1f} |"
            )
        lines.append("")
    return lines


def _row_at(data: dict, model: str, granularity: str, density: float) -> dict | None:
    for res in data["results"]:
        if res["model"] == model and res["granularity"] == granularity:
            for r in res["rows"]:
                if r["density"] == density and not r["dense_fallback"]:
                    return r
    return None


def mask_headline(data: dict) -> list[str]:
    cells = []
    for model in ("resnet18", "resnet50"):
        r = _row_at(data, model, "region", 0.25)
        if r is not None:
            part = (
                f", partially masked blocks alone {r['partial_cpu_speedup']:.2f}x"
                if r.get("partial_blocks")
                else ""
            )
            cells.append(
                f"{model} **{r['cpu_speedup']:.2f}x** (realized density "
                f"{r['realized_density']:.2f}{part})"
            )
    if not cells:
        return []
    return [
        "**Current result:** region masks at a MAC-weighted density of 0.25, 224x224, batch 1: "
        "the masked blocks run " + "; ".join(cells) + " faster than dense (target 1.5x).",
        "",
    ]


def _baseline_note(meta: dict) -> list[str]:
    """A baseline measured by another run than the rest of the results file."""
    base = meta.get("baseline")
    if not base:
        return []
    return [
        f"The baseline ({base['what']}) was measured by a separate run, recorded in commit "
        f"{base['recorded_in_commit']}: `{base['command']}`.",
        "",
    ]


def resolution_section() -> list[str]:
    result = read_result(RESULTS["resolution"])
    lines = ["## The resolution cascade on CIFAR ResNet-44, trained like the early exits", ""]
    if result is None:
        return lines + missing(
            RESULTS["resolution"], "python -m benchmarks spatial --part resolution"
        )
    r = result.data["cifar_resnet44"]
    base = r.get("static_ft_acc")
    phase = r.get("joint") or r["heads"]
    best = _cheapest_within(phase, base)
    rerun = read_result(FULL["resolution"])
    label = "Current result"
    if rerun is not None:
        lines += [*_current_result(rerun, base), ""]
        label = "Published result (an earlier version of the code, the same settings)"
    lines += [
        f"**{label}:** within 0.5 points of the static network fine-tuned as long "
        f"({pct(base)} %, {r.get('static_ft_epochs')} epochs) at **{frac(best)} of the "
        "MACs** (target: at <= 0.60); the low-resolution pass alone "
        f"{pct(phase['per_exit_test_acc'][0])} % at {phase['exit_macs'][0]:.2f} of the MACs; "
        f"original network {pct(r['static_original_acc'])} %.",
        "",
        *provenance(result),
        *_baseline_note(result.metadata),
        "| model (cifar10/test) | accuracy | MACs (of static) |",
        "| --- | --- | --- |",
        f"| original static network | {pct(r['static_original_acc'])} % | 1.000 |",
        f"| static network fine-tuned {r.get('static_ft_epochs')} epochs (the baseline) | {pct(base)} % | 1.000 |",
    ]
    for name in ("heads", "joint"):
        if name in r:
            m = r[name]
            lines.append(
                f"| cascade after {name} ({m['epochs']} ep): low-resolution pass alone | "
                f"{pct(m['per_exit_test_acc'][0])} % | {m['exit_macs'][0]:.3f} |"
            )
            lines.append(
                f"| cascade after {name}: full-resolution pass alone | "
                f"{pct(m['per_exit_test_acc'][-1])} % | 1.000 |"
            )
    for p in phase["curve"]:
        if p["budget"] in (0.4, 0.6):
            lines.append(
                f"| cascade at budget {p['budget']} (thresholds chosen on calibration) | "
                f"{pct(p['test_acc'])} % | {p['test_macs']:.3f} |"
            )
    d = phase.get("max_drop_0.005")
    if d:
        lines.append(
            f"| cascade at `max_drop=0.005` (calibration) | {pct(d['test_acc'])} % | {d['test_macs']:.3f} |"
        )
    lines += [
        "",
        "Calibrated curve (budget on the calibration split -> test):",
        "",
        "| budget | calib MACs | calib acc | test MACs | test acc |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in phase["curve"]:
        if round(p["budget"] * 40) == p["budget"] * 40 and p["budget"] >= 0.3:
            lines.append(
                f"| {p['budget']:.4g} | {p['calib_macs']:.3f} | {pct(p['calib_acc'])} | "
                f"{p['test_macs']:.3f} | {pct(p['test_acc'])} |"
            )
    lines.append("")
    lat = read_result(RESULTS["resolution-latency"])
    if lat is not None:
        lines += [
            "Batch-1 eager latency (one thread, runs of 10 consecutive test images per model, "
            "alternating with the original network, median of the rounds) at thresholds "
            "calibrated for each budget:",
            "",
            "| budget | MACs | latency dyn / static | latency fall / MAC fall |",
            "| --- | --- | --- | --- |",
        ]
        for b in lat.data["budgets"]:
            lines.append(
                f"| {b['budget']} | {b['macs_fraction']:.3f} | {b['dynamic_ms']:.2f} / "
                f"{b['static_ms']:.2f} ms = {b['ratio']:.3f} | {b['fall']:.2f} |"
            )
        lines += ["", *provenance(lat)]
    return lines


def _network(result) -> str:
    """The CIFAR ResNet a result measured (its data holds one network's figures)."""
    return next(k for k in result.data if k.startswith("cifar_resnet"))


def _cheapest_within(phase: dict, base: float | None) -> float | None:
    """The fewest MACs of a phase's calibrated curve within 0.5 points of the baseline."""
    return cifar10.within_half_point(phase["curve"], {"ft": base} if base else {}).get("ft")


def _current_result(rerun, published_base: float | None) -> list[str]:
    """The headline as the code dynify ships gives it: the full re-run through the suite, held
    to the published static baseline when it did not train its own."""
    r = rerun.data[_network(rerun)]
    base = r.get("static_ft_acc") or published_base
    phase = r.get("joint") or r["heads"]
    best = _cheapest_within(phase, base)
    return [
        "**Current result (the code dynify ships, at the published settings: the cascade's "
        "defaults, one heads epoch and six joint epochs over 45,000 images):** within 0.5 points "
        f"of the static network fine-tuned as long ({pct(base)} %) at **{frac(best)} of the "
        f"MACs** (target: at <= 0.60); the low-resolution pass alone "
        f"{pct(phase['per_exit_test_acc'][0])} %. The re-run's figures next to the published "
        'ones and its command: the section "Re-run at the published settings through the '
        'suite".',
    ]


def _resolution_figures(r: dict) -> dict[str, tuple[float | None, float | None]]:
    """The resolution section's figures of one network's results: label -> (accuracy, MACs)."""
    base = r.get("static_ft_acc")
    phase = r.get("joint") or r["heads"]
    figures: dict[str, tuple[float | None, float | None]] = {
        "original static network": (r["static_original_acc"], 1.0),
        "static network fine-tuned as long (the baseline)": (base, 1.0),
    }
    for name in ("heads", "joint"):
        if name in r:
            m = r[name]
            figures[f"after {name}: low-resolution pass alone"] = (
                m["per_exit_test_acc"][0],
                m["exit_macs"][0],
            )
            figures[f"after {name}: full-resolution pass alone"] = (m["per_exit_test_acc"][-1], 1.0)
    last = "joint" if "joint" in r else "heads"
    for p in phase["curve"]:
        if p["budget"] in (0.4, 0.6):
            figures[f"after {last}: at budget {p['budget']}"] = (p["test_acc"], p["test_macs"])
    d = phase.get("max_drop_0.005")
    if d:
        figures[f"after {last}: at `max_drop=0.005`"] = (d["test_acc"], d["test_macs"])
    within = _cheapest_within(phase, base)
    figures[f"after {last}: cheapest within 0.5 points of the baseline"] = (None, within)
    return figures


def _cell(acc: float | None, macs: float | None) -> str:
    if acc is None and macs is None:
        return "not reached"
    acc_text = "" if acc is None else f"{pct(acc)} % "
    return acc_text + ("" if macs is None else f"at {macs:.3f}")


def resolution_rerun(name: str) -> list[str]:
    """A re-run of the resolution part through the suite next to the published figures. A run
    without its own static baseline (`--static-epochs 0`) is held to the published one, which
    fine-tuned the same network on the same images as long."""
    rerun = read_result(name)
    published = read_result(RESULTS["resolution"])
    if rerun is None or published is None:
        return []
    net = _network(rerun)
    r, was = dict(rerun.data[net]), published.data.get(net)
    old = _resolution_figures(was) if was else {}
    joint = r.get("joint", {}).get("epochs", 0)
    borrowed = r.get("static_ft_acc") is None and was is not None and "static_ft_acc" in was
    if borrowed:
        r["static_ft_acc"], r["static_ft_epochs"] = was["static_ft_acc"], was["static_ft_epochs"]
    if r["train_images"] >= 45000 and joint >= 6:
        title = "Re-run at the published settings through the suite"
        what = (
            f"{net}: {r['train_images']} fit images, heads {r['heads']['epochs']} epoch(s), "
            f"joint {joint} epochs, as published"
        )
    else:
        title = "Shortened re-run through the suite"
        what = (
            f"{net}: {r['train_images']} fit images instead of 45,000; heads "
            f"{r['heads']['epochs']} epoch(s), joint {joint} epoch(s) instead of 6"
        )
    changed = _changed_settings(rerun.command)
    if changed:
        title += ", " + ", ".join(changed)
        what += "; " + ", ".join(changed) + " instead of the default"
    baseline = (
        f"the static baseline not re-run: the published one ({pct(r['static_ft_acc'])} %, "
        f"{r['static_ft_epochs']} epochs on the same images) is the reference"
        if borrowed
        else f"the static baseline {r.get('static_ft_epochs', 0)} epoch(s) on the same images"
    )
    lines = [
        f"### {title}",
        "",
        f"{what}; {baseline}; calibrated on {r.get('calib_images', '?')} held-out images, "
        f"measured on {r.get('test_images', '?')} test images.",
        "",
        "| cifar10/test: accuracy at MACs (of static) | this run | published |",
        "| --- | --- | --- |",
    ]
    new = _resolution_figures(r)
    for label in [*new, *(k for k in old if k not in new)]:
        cells = [_cell(*f[label]) if label in f else "-" for f in (new, old)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return [*lines, "", *provenance(rerun)]


def _changed_settings(command: str) -> list[str]:
    """'joint rate 0.005': each fine-tuning setting a command gives a value other than its
    default."""
    words = command.split()
    changed = []
    for flag, (label, default) in JOINT_SETTINGS.items():
        if flag in words[:-1] and words[words.index(flag) + 1] != default:
            changed.append(f"{label} {words[words.index(flag) + 1]}")
    return changed


def masks_rerun(name: str) -> list[str]:
    """A re-run of the pixel-mask part through the suite next to the published figures."""
    rerun = read_result(name)
    published = read_result(RESULTS["masks"])
    if rerun is None:
        return []
    net = _network(rerun)
    r = rerun.data[net]
    old_curve = {}
    if published is not None and net in published.data:
        old_curve = {p["budget"]: p for p in published.data[net]["heads"]["curve"]}
    full = r["train_images"] >= 45000 and r["heads"]["epochs"] >= 2
    training = (
        f"{r['heads']['epochs']} epochs over {r['train_images']} fit images, as published"
        if full
        else f"{r['heads']['epochs']} epoch(s) over {r['train_images']} fit images instead of 2 "
        "over 45,000"
    )
    lines = [
        f"### {'Re-run at the published settings' if full else 'Shortened re-run'} through "
        "the suite",
        "",
        f"{net}, original network {pct(r['static_original_acc'])} %: the mask units trained "
        f"{training}, calibrated on {r.get('calib_images', '?')} held-out images spread over "
        f"every class (`benchmarks/cifar_data.py` `subsample`), measured on "
        f"{r.get('test_images', '?')} test images. Published figures in brackets; that run "
        "calibrated on the first 2,000 images of the held-out part, which is sorted by class "
        "(`split_dataset`), so on four of the ten classes only.",
        "",
        "| budget | threshold | calibration MACs / acc. | test MACs | test accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in r["heads"]["curve"]:
        thr = p.get("threshold", p.get("thresholds", [None])[0])
        o = old_curve.get(p["budget"])
        oc = f" ({o['calib_macs']:.3f} / {pct(o['calib_acc'])} %)" if o else ""
        ot = (f" ({o['test_macs']:.3f})", f" ({pct(o['test_acc'])} %)") if o else ("", "")
        lines.append(
            f"| {p['budget']} | {thr:.3f} | {p['calib_macs']:.3f} / {pct(p['calib_acc'])} %"
            f"{oc} | {p['test_macs']:.3f}{ot[0]} | {pct(p['test_acc'])} %{ot[1]} |"
        )
    return [*lines, "", *provenance(rerun)]


def masks_section() -> list[str]:
    result = read_result(RESULTS["masks"])
    lines = ["## Pixel masks on CIFAR ResNet-44, mask units trained on 45,000 images", ""]
    if result is None:
        return lines + missing(RESULTS["masks"], "python -m benchmarks spatial --part masks")
    r = result.data["cifar_resnet44"]
    m = r["heads"]
    lines += [
        f"Original network {pct(r['static_original_acc'])} %. Pixel masks, the mask units alone "
        f"trained by `dynify.finetune` in heads mode ({m['epochs']} epochs over "
        f"{r['train_images']} fit images), the mask threshold calibrated for each budget by "
        "`dynify.calibrate`'s sweep, then the real sparse forward on `cifar10/test`:",
        "",
        "| budget | threshold | calibration MACs / acc. | test MACs | test accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in m["curve"]:
        thr = p.get("threshold", p.get("thresholds", [None])[0])
        lines.append(
            f"| {p['budget']} | {thr:.3f} | {p['calib_macs']:.3f} / {pct(p['calib_acc'])} % | "
            f"{p['test_macs']:.3f} | {pct(p['test_acc'])} % |"
        )
    return [*lines, "", *provenance(result)]


def render() -> str:
    lines = ["# Spatial strategies: spatial masks and the resolution cascade", ""]
    lat = read_result(RESULTS["latency"])
    lines += ["## Masked-block latency at 224x224, batch 1", ""]
    if lat is None:
        lines += missing(RESULTS["latency"], "python -m benchmarks spatial --part latency")
    else:
        lines += mask_headline(lat.data)
        lines += provenance(lat)
        lines += latency_tables(lat.data)
    lines += resolution_section()
    lines += resolution_rerun(FULL["resolution"])
    lines += resolution_rerun(SHORT["resolution"])
    for name in SHORT_RESOLUTION_VARIANTS:
        lines += resolution_rerun(name)
    lines += masks_section()
    lines += masks_rerun(FULL["masks"])
    lines += masks_rerun(SHORT["masks"])
    return "\n".join(lines) + "\n"
