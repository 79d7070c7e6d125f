"""Early exits on pretrained CIFAR ResNets: accuracy against MACs on JPEG CIFAR-10.

    python -m benchmarks cifar10 --data ../shared/data --nets 44 --epochs 3 --joint 44 \
        --joint-epochs 10 --polish-epochs 8 --static-epochs 10 --threads 1

Per network, through the public API only: the original network's accuracy on cifar10/test;
`dynify.convert` with early exits; `dynify.finetune` in heads mode (backbone frozen), then, for
the `--joint` networks, joint mode and optionally heads again on the joint backbone ("polish");
after each phase `dynify.operating_points` (thresholds calibrated on a held-out 10 % of
cifar10/train for every MAC budget of a grid, each measured on cifar10/test), `dynify.calibrate`
for `max_drop=0.005` and `dynify.evaluate` (the real dynamic forward, per-exit accuracy, the
oracle). The fair baseline: `dynify.finetune_static`, the static network fine-tuned with the
same data and epochs, so adapting to JPEG is not credited to the exits.

`--strategy resolution` / `spatial-masks` run the same pipeline for those strategies (the
spatial suite's CIFAR-10 figures).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import dynify
from benchmarks.cifar_data import (
    DEFAULT_CACHE,
    INPUT_SIZE,
    accuracy,
    fit_and_calibration,
    load_cifar,
    subsample,
    weights_path,
)
from benchmarks.report import frac as _frac
from benchmarks.report import missing, provenance
from benchmarks.report import pct as _pct
from benchmarks.results import Result, read_result

NAME = "cifar10"
MODES = ("heads", "heads+ensemble", "joint", "joint+ensemble", "polish")
BUDGETS = [round(0.1 + 0.0125 * i, 4) for i in range(73)]  # 0.1 .. 1.0
QUICK_BUDGETS = [0.5, 0.8]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--nets", type=int, nargs="+", default=[20, 32, 44])
    parser.add_argument(
        "--strategy", default="early-exit", choices=["early-exit", "resolution", "spatial-masks"]
    )
    parser.add_argument("--exits", type=int, default=5)
    parser.add_argument("--head", default="auto", help="exit head kind: auto, linear or conv")
    parser.add_argument("--epochs", type=int, default=3, help="heads-mode epochs")
    parser.add_argument("--static-epochs", type=int, default=3, help="0: no static baseline")
    parser.add_argument("--joint", type=int, nargs="*", default=[44], help="nets trained jointly")
    parser.add_argument("--joint-epochs", type=int, default=2)
    parser.add_argument(
        "--joint-lr", type=float, default=None, help="joint phase's peak rate (default: 0.01)"
    )
    parser.add_argument(
        "--kd-temperature",
        type=float,
        default=None,
        help="distillation temperature of every phase (default: the strategy's own)",
    )
    parser.add_argument(
        "--clip-grad-norm", type=float, default=None, help="fine-tuning's clip (default: 50)"
    )
    parser.add_argument(
        "--polish-epochs", type=int, default=0, help="after joint: heads mode on its backbone"
    )
    parser.add_argument("--train-budget", type=float, default=None, help="masks: MAC target")
    parser.add_argument("--sweep-budgets", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=0, help="of the 45k fit part (0: all)")
    parser.add_argument("--calib-images", type=int, default=0, help="of the 5k (0: all)")
    parser.add_argument("--test-images", type=int, default=0, help="quick runs only (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-dir", type=Path, help="save each trained model (.dyn) here")
    parser.add_argument(
        "--from-artifacts", type=Path, help="load the models a --save-dir run wrote, not train"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--name", default=None, help="results name (default: by strategy)")


def apply_quick(args: argparse.Namespace) -> None:
    args.nets = args.nets if args.nets != [20, 32, 44] else [20]
    args.joint, args.polish_epochs = [], 0
    args.epochs = min(args.epochs, 1)
    args.static_epochs = min(args.static_epochs, 1)
    args.train_images = args.train_images or 512
    args.calib_images = args.calib_images or 256
    args.test_images = args.test_images or 256
    args.quick_budgets = True


def result_name(args: argparse.Namespace) -> str:
    if args.name:
        return args.name
    return {"early-exit": NAME, "resolution": "resolution_cifar10"}.get(
        args.strategy, "spatial_masks_cifar10"
    )


def log_every(steps: int):
    start = time.perf_counter()

    def callback(info: dict) -> None:
        if info["step"] % steps == 0:
            loss = info.get("loss", float("nan"))
            print(
                f"    epoch {info['epoch']} step {info['step']}: loss {loss:.3f}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )

    return callback


def within_half_point(curve: list[dict], baselines: dict) -> dict:
    """Per baseline, the cheapest test MAC fraction on the curve within 0.5 points of it."""
    within = {}
    for name, base in baselines.items():
        fits = [p["test_macs"] for p in curve if p["test_acc"] >= base - 0.005 - 1e-12]
        within[name] = min(fits) if fits else None
    return within


def _curve(points: list[dynify.OperatingPoint]) -> list[dict]:
    return [
        {
            "budget": p.target["budget"],
            "thresholds": p.thresholds,
            "calib_macs": p.calibration_macs,
            "calib_acc": p.calibration_accuracy,
            "test_macs": p.test_macs,
            "test_acc": p.test_accuracy,
        }
        for p in points
        if "budget" in p.target
    ]


def phase_results(dyn, calib, test, baselines: dict, budgets: list[float], out_dir) -> dict:
    """The calibrated curve, the max-drop point (real forward) and the per-exit figures."""
    exits = isinstance(dyn, dynify.ExitCascade) and dyn.num_exits > 0
    points = dynify.operating_points(
        dyn, calib, test, budgets=budgets, max_drops=[0.005] if exits else []
    )
    curve = _curve(points)
    result: dict[str, Any] = {
        "curve": curve,
        "macs_within_0.5": within_half_point(curve, baselines),
    }
    if not exits:
        result["final_exit_test_acc"] = dynify.evaluate(dyn, test).static_accuracy
        return result
    simulated = next(p for p in points if "max_drop" in p.target)
    drop = dynify.calibrate(dyn, calib, max_drop=0.005)
    report = dynify.evaluate(dyn, test)  # the real dynamic forward at these thresholds
    if out_dir is not None:
        report.plot(out_dir)
    result.update(
        {
            "max_drop_0.005": {
                "thresholds": drop.thresholds,
                "temperatures": drop.temperatures,
                "calib_acc": drop.accuracy,
                "calib_macs": drop.macs_fraction,
                "test_acc": report.dynamic_accuracy,
                "test_macs": report.dynamic_macs_fraction,
                "simulated_test_acc": simulated.test_accuracy,
                "simulated_test_macs": simulated.test_macs,
                "exit_histogram": report.exit_histogram,
            },
            "per_exit_test_acc": report.per_exit_accuracy,
            "exit_macs": report.exit_macs_fraction,
            "oracle": {"acc": report.oracle_accuracy, "macs": report.oracle_macs_fraction},
            "final_exit_test_acc": report.static_accuracy,
        }
    )
    return result


def run_net(depth: int, args, train, test, plots: Path | None) -> dict:
    fit, calib = fit_and_calibration(train, args.seed, args.train_images, args.calib_images)
    test = subsample(test, args.test_images)
    name = f"cifar_resnet{depth}"
    weights = weights_path(args.data, depth)
    torch.manual_seed(args.seed)
    options: dict[str, Any] = {}
    if args.strategy == "early-exit":
        options = {"exits": args.exits, "head": args.head}
    elif args.strategy == "spatial-masks":  # region tiles do not fit CIFAR's 8x8 maps
        options = {"granularity": "pixel"}
    dyn = dynify.convert(name, args.strategy, options=options, weights=weights)
    original, _ = dynify.build_model(name, weights=weights)
    res: dict[str, Any] = {
        "net": name,
        "static_macs": dyn.static_macs,
        "exits": dyn.num_exits if isinstance(dyn, dynify.ExitCascade) else 0,
        "strategy": args.strategy,
        "head": args.head,
        "train_images": len(fit),
        "calib_images": len(calib),
        "test_images": len(test),
        "static_original_acc": accuracy(original, test),
    }
    print(f"{name}: original static {res['static_original_acc']:.4f}", flush=True)
    if args.static_epochs:
        baseline = dynify.finetune_static(
            original,
            fit,
            epochs=args.static_epochs,
            input_size=INPUT_SIZE,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        res["static_ft_acc"] = accuracy(original, test)
        res["static_ft_epochs"] = args.static_epochs
        res["static_ft_seconds"] = baseline.seconds
        print(f"  static fine-tuned {res['static_ft_acc']:.4f}", flush=True)
    baselines = {"original": res["static_original_acc"]}
    if "static_ft_acc" in res:
        baselines["static_fine_tuned"] = res["static_ft_acc"]
    budgets = QUICK_BUDGETS if getattr(args, "quick_budgets", False) else BUDGETS
    if args.strategy == "spatial-masks":
        budgets = args.sweep_budgets
    # (phase, fine-tuning mode, epochs); each phase continues from the one before it
    phases = [("heads", "heads", args.epochs)]
    if depth in args.joint and args.joint_epochs:
        phases.append(("joint", "joint", args.joint_epochs))
        if args.polish_epochs:
            phases.append(("polish", "heads", args.polish_epochs))
    for phase, mode, epochs in phases:
        saved = args.from_artifacts and args.from_artifacts / f"{name}-{phase}.dyn"
        history: list = []
        if saved and saved.exists():  # trained by an earlier run with --save-dir
            dyn = dynify.load(saved)
            record = dyn.training_record
            seconds = record.seconds if record else 0.0
            epochs = record.epochs if record else epochs
        else:
            ft = dynify.finetune(
                dyn,
                fit,
                mode=mode,
                epochs=epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                calibration_fraction=0.0,  # the calibration part is held out above
                progress=False,
                callback=log_every(100),
                budget=args.train_budget,
                lr=args.joint_lr if mode == "joint" else None,
                clip_grad_norm=args.clip_grad_norm,
                kd_temperature=args.kd_temperature,
            )
            seconds, history = ft.seconds, ft.history
        plot = plots / f"cifar10-{name}-{phase}.png" if plots else None
        result = phase_results(dyn, calib, test, baselines, budgets, plot)
        if args.save_dir and not (saved and saved.exists()):  # calibrated at max_drop 0.005
            dynify.save(dyn, args.save_dir / f"{name}-{phase}.dyn")
        res[phase] = {"epochs": epochs, "seconds": seconds, "history": history, **result}
        print(f"  {phase}: {seconds:.0f} s, within 0.5: {result['macs_within_0.5']}", flush=True)
    return res


def run(args: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train, test = load_cifar(args.data, args.cache)
    # the published report's plots (a run under another name writes none)
    published = not args.quick and result_name(args) == NAME
    plots = Path(__file__).resolve().parent if published else None
    out: dict[str, Any] = {}
    for depth in args.nets:
        out[f"cifar_resnet{depth}"] = run_net(depth, args, train, test, plots)
    out["total_seconds"] = time.perf_counter() - start
    return {result_name(args): out}


def merge(previous: dict, new: dict) -> dict:
    """Networks measured by separate runs (`--add`): the new run's networks replace the old."""
    merged = {**previous, **new}
    merged["total_seconds"] = previous.get("total_seconds", 0.0) + new.get("total_seconds", 0.0)
    return merged


# --- the report --------------------------------------------------------------------------------


def headline(results: dict) -> list[str]:
    """The current figure: ResNet-44's best MAC fractions within 0.5 points of each baseline."""
    r44 = results.get("cifar_resnet44")
    if not r44:
        return []
    best: dict[str, tuple[float, str] | None] = {"original": None, "static_fine_tuned": None}
    for mode in MODES:
        for k, v in r44.get(mode, {}).get("macs_within_0.5", {}).items():
            if v is not None and (best.get(k) is None or v < best[k][0]):
                best[k] = (v, mode)
    parts = []
    for key, label, target in (
        ("original", f"the original network ({_pct(r44['static_original_acc'])} %)", 0.40),
        (
            "static_fine_tuned",
            f"the static network fine-tuned as long ({_pct(r44.get('static_ft_acc'))} %)",
            0.50,
        ),
    ):
        got = best.get(key)
        if got is None:
            parts.append(f"within 0.5 points of {label}: not reached (target <= {target:.2f})")
        else:
            verdict = "met" if got[0] <= target else "missed"
            parts.append(
                f"within 0.5 points of {label} at **{got[0]:.3f} of the MACs** ({got[1]}; "
                f"target <= {target:.2f}: {verdict})"
            )
    return [f"**Current result, ResNet-44 on cifar10/test:** {'; '.join(parts)}.", ""]


def render_tables(results: dict) -> list[str]:
    nets = [k for k in results if k.startswith("cifar_resnet")]
    lines = [
        "## Summary (cifar10/test)",
        "",
        "| network | static (original) | static fine-tuned | mode | dynamic @ max-drop 0.5 pt "
        "(calibrated) | MACs for <= 0.5 pt below original | MACs for <= 0.5 pt below "
        "fine-tuned static | oracle | fine-tuning time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for net in nets:
        r = results[net]
        for mode in MODES:
            if mode not in r:
                continue
            m = r[mode]
            drop = m["max_drop_0.005"]
            within = m["macs_within_0.5"]
            lines.append(
                f"| {net} | {_pct(r['static_original_acc'])} | {_pct(r.get('static_ft_acc'))} "
                f"| {mode} ({m['epochs']} ep, {r.get('train_images', '?')} images) | {_pct(drop['test_acc'])} % at "
                f"{drop['test_macs']:.3f} | {_frac(within.get('original'))} | "
                f"{_frac(within.get('static_fine_tuned'))} | {_pct(m['oracle']['acc'])} % at "
                f"{m['oracle']['macs']:.3f} | {m['seconds']:.0f} s |"
            )
    lines += [
        "",
        "MAC fractions are mean MACs per test image over the static network's, heads included, "
        "as counted by the runtime on the real dynamic forward. 'MACs for <= 0.5 pt below X': "
        "the cheapest point of the calibrated curve (thresholds chosen on the calibration split "
        "for budgets 0.1000, 0.1125, ..., 1.0000) whose test accuracy is at least X - 0.5 points. "
        "Static fine-tuned: the static network trained with the same images, augmentation, "
        "schedule, optimizer and loss (0.5 KD + 0.5 CE) as joint mode's final exit "
        "(`dynify.finetune_static`), for the epochs given in the command, so adapting to JPEG "
        "is not credited to the exits.",
        "",
    ]
    return lines


def render_details(results: dict) -> list[str]:
    nets = [k for k in results if k.startswith("cifar_resnet")]
    lines: list[str] = []
    for net in nets:
        r = results[net]
        lines += [f"## {net}", ""]
        lines.append(
            f"Static MACs {r['static_macs'] / 1e6:.1f} M; {r['exits']} exits, {r.get('head', 'linear')} "
            f"heads (`options={{'head': ...}}`), trained on {r.get('train_images', '?')} images. "
            "Original static "
            f"accuracy {_pct(r['static_original_acc'])} %; static fine-tuned "
            f"{_pct(r.get('static_ft_acc'))} % ({r.get('static_ft_seconds', 0):.0f} s)."
        )
        lines.append("")
        for mode in MODES:
            if mode not in r:
                continue
            m = r[mode]
            lines += [
                f"### {mode} mode, {m['epochs']} epochs, {m['seconds']:.0f} s",
                "",
                *(
                    [
                        "Polish: heads mode on the joint model, its backbone frozen: the exits "
                        "retrained on the backbone as joint fine-tuning left it (the backbone "
                        "trains no longer than the static baseline's). Seconds: this phase only.",
                        "",
                    ]
                    if mode == "polish"
                    else []
                ),
                "| exit | MACs | test accuracy alone | test share at max-drop 0.5 pt |",
                "| --- | --- | --- | --- |",
            ]
            hist = m["max_drop_0.005"]["exit_histogram"]
            total = max(sum(hist), 1)
            for i, (c, a) in enumerate(zip(m["exit_macs"], m["per_exit_test_acc"], strict=True)):
                name = "final" if i == len(hist) - 1 else str(i)
                lines.append(f"| {name} | {c:.3f} | {_pct(a)} % | {100 * hist[i] / total:.1f} % |")
            lines += [
                "",
                "Calibrated curve (budget on the calibration split -> test):",
                "",
                "| budget | calib MACs | calib acc | test MACs | test acc |",
                "| --- | --- | --- | --- | --- |",
            ]
            cited = set(m["macs_within_0.5"].values())  # the points the summary reads
            for p in m["curve"]:
                steps = round(p["budget"] * 80)  # multiples of 0.0125
                shown = steps % 4 == 0 or (p["budget"] <= 0.6 and steps % 2 == 0)
                if shown or p["test_macs"] in cited:
                    lines.append(
                        f"| {p['budget']:.4g} | {p['calib_macs']:.3f} | {_pct(p['calib_acc'])} "
                        f"| {p['test_macs']:.3f} | {_pct(p['test_acc'])} |"
                    )
            d = m["max_drop_0.005"]
            lines += [
                "",
                f"`--max-drop 0.005` on the calibration split: thresholds {d['thresholds']}, "
                f"temperatures {[round(t, 2) for t in d['temperatures']]}; calibration "
                f"{_pct(d['calib_acc'])} % at {d['calib_macs']:.3f}; test (real dynamic forward) "
                f"{_pct(d['test_acc'])} % at {d['test_macs']:.3f} (simulated from cached logits: "
                f"{_pct(d['simulated_test_acc'])} % at {d['simulated_test_macs']:.3f}).",
                "",
                f"![{net} {mode}](cifar10-{net}-{mode}.png)",
                "",
            ]
    return lines + _findings(results, nets)


def _findings(results: dict, nets: list[str]) -> list[str]:
    lines = ["## Findings", ""]
    r44 = results.get("cifar_resnet44")
    if r44:
        best = {"original": None, "static_fine_tuned": None}
        for mode in MODES:
            for k, v in r44.get(mode, {}).get("macs_within_0.5", {}).items():
                if v is not None and (best.get(k) is None or v < best[k]):
                    best[k] = v
        met_ft = best["static_fine_tuned"] is not None and best["static_fine_tuned"] <= 0.5
        met_orig = best["original"] is not None and best["original"] <= 0.4
        verdict = {
            (True, True): "Both targets (ResNet-44) met.",
            (True, False): "Target against the fine-tuned static model met; against the "
            "original not.",
            (False, True): "Target against the original met; against the fine-tuned static "
            "model not.",
            (False, False): "Targets (ResNet-44) not met.",
        }[(met_ft, met_orig)]
        lines.append(
            f"- **{verdict}** Within 0.5 points of the fine-tuned static model at "
            f"{_frac(best['static_fine_tuned'])} of its MACs (target <= 0.50); within 0.5 "
            f"points of the original static model at {_frac(best['original'])} (target <= 0.40). "
            "The first exit (about 16 % of the MACs) gets "
            + ", ".join(
                f"{_pct(r44[m]['per_exit_test_acc'][0])} % ({m})" for m in MODES if m in r44
            )
            + f" alone. Joint fine-tuning ran {r44.get('joint', {}).get('epochs', 0)} epochs "
            f"over {r44.get('train_images', '?')} images on one CPU thread"
            + (
                f", then {r44['polish']['epochs']} polish epochs; all phases together "
                f"{sum(r44[m]['seconds'] for m in ('heads', 'joint', 'polish') if m in r44) / 60:.0f}"
                " min."
                if "polish" in r44
                else "."
            )
        )
        half = [
            (p, m)
            for m in MODES
            for p in r44.get(m, {}).get("curve", [])
            if p["test_macs"] <= 0.505
        ]
        if half:
            point, mode = max(half, key=lambda pm: pm[0]["test_acc"])
            lines.append(
                f"- **At half the MACs** ({mode}, {point['test_macs']:.3f}): "
                f"{_pct(point['test_acc'])} %, "
                f"{100 * (point['test_acc'] - r44['static_original_acc']):+.2f} points against the "
                f"original network and "
                f"{100 * (point['test_acc'] - r44.get('static_ft_acc', float('nan'))):+.2f} against "
                "the static network fine-tuned as long: SDN's claim below (half the cost, "
                "accuracy preserved) is a comparison with the original network."
            )
    for net in nets:
        for mode in ("heads", "joint"):
            plain, mixed = results[net].get(mode), results[net].get(f"{mode}+ensemble")
            if plain and mixed:
                lines.append(
                    f"- **Ensemble ({net.removeprefix('cifar_')} {mode}).** Zero Time Waste's "
                    "geometric ensemble of the heads, fitted on the calibration split after "
                    "training: within 0.5 points of the original at "
                    f"{_frac(mixed['macs_within_0.5'].get('original'))} (heads alone "
                    f"{_frac(plain['macs_within_0.5'].get('original'))}). The fitted weights "
                    "stay close to 'each head alone' (presumably the heads' mistakes are correlated and each "
                    "later head is better than the ones before); ZTW's other half, heads that "
                    "read their predecessor's output during training, is not implemented."
                )
    lines.append(
        "- **Headroom.** The oracle (each image leaves at the first exit that is right) reaches "
        + ", ".join(
            f"{_pct(results[n][m]['oracle']['acc'])} % at {results[n][m]['oracle']['macs']:.2f} "
            f"({n.removeprefix('cifar_')} {m})"
            for n in nets
            for m in MODES
            if m in results[n]
        )
        + ": the heads know the answer early far more often than max-softmax confidence can "
        "tell. Better exit rules and stronger heads, not more exits, are where the gain is."
    )
    shifts = []
    for n in (n for n in nets if "heads" in results[n]):
        m = results[n]["heads"]
        full = m["curve"][-1]
        dev = max(abs(p["test_macs"] - p["calib_macs"]) for p in m["curve"])
        shifts.append(
            f"{n.removeprefix('cifar_')} {_pct(full['calib_acc'])} % vs "
            f"{_pct(full['test_acc'])} %, MAC gap {dev:.3f}"
        )
    drops = ", ".join(
        f"{100 * (results[n][m]['final_exit_test_acc'] - results[n][m]['max_drop_0.005']['test_acc']):.2f}"
        f" ({n.removeprefix('cifar_')} {m})"
        for n in nets
        for m in MODES
        if m in results[n]
    )
    lines.append(
        "- **Calibration on seen data.** Calibration must use a split of `cifar10/train`, which "
        "the pretrained networks were trained on, so there every exit looks more accurate than "
        "on test (near full compute, calibration vs test accuracy: "
        + "; ".join(shifts)
        + "). Relative targets still transferred: MAC budgets held on test to within the gaps "
        f"given, and `--max-drop 0.005` cost {drops} points on test against the model's own "
        "final exit. Absolute accuracies on the calibration split are not test accuracies."
    )
    drops_all = [results[n][m]["max_drop_0.005"] for n in nets for m in MODES if m in results[n]]
    agree = all(
        d["test_acc"] == d["simulated_test_acc"]
        and abs(d["test_macs"] - d["simulated_test_macs"]) < 1e-6
        for d in drops_all
    )
    lines.append(
        "- **Simulation against the runtime.** Thresholds are searched by simulating the exit "
        "rule on cached logits; the test numbers at the --max-drop thresholds were also measured "
        "with the real dynamic forward and "
        + (
            "agree exactly in every row above."
            if agree
            else "differ in some rows (see each mode's max-drop line)."
        )
    )
    lines.append(
        "- **Published anchors.** Shallow-Deep Networks (Kaya et al. 2019, "
        "[arXiv:1810.07052](https://arxiv.org/abs/1810.07052)) state in their abstract that "
        "confidence-based early exits 'reduce the average inference cost by more than 50% and "
        "preserve the accuracy' (four architectures, CIFAR-10/100 and Tiny ImageNet; on "
        "pretrained networks their internal classifiers train for 25 epochs with Adam, on the "
        "original PNG images, on GPUs). Zero Time Waste (Wolczyk et al. 2021, "
        "[arXiv:2106.05409](https://arxiv.org/abs/2106.05409)) improves on SDN by feeding each "
        "head its predecessor's output and ensembling the heads' predictions. Their per-network "
        "tables were not available to check here, so no figure of theirs is copied; the SDN "
        "claim corresponds to this benchmark's 'within 0.5 points at <= 0.50 of the MACs' column."
    )
    return [*lines, ""]


def render() -> str:
    lines = [
        "# CIFAR-10: early exits on pretrained CIFAR ResNets",
        "",
        "Pretrained CIFAR ResNet-20/32/44 (the weights of `../shared/data/pretrained`) on the "
        "JPEG CIFAR-10 of `../shared/data`. Heads, joint fine-tuning and the static baseline "
        "train on a seeded part of `cifar10/train`; temperatures and thresholds are fitted on a "
        "disjoint 5,000-image calibration split of `cifar10/train`; every figure below is "
        "measured on `cifar10/test` (5,000 images), which nothing was tuned on.",
        "",
    ]
    result = read_result(NAME)
    if result is None:
        return "\n".join(lines + missing(NAME, "python -m benchmarks cifar10"))
    results = result.data
    lines += headline(results)
    lines += provenance(result)
    lines += render_tables(results)
    lines += render_details(results)
    short = read_result("cifar10_resnet20_short")
    if short is not None:
        lines += render_short(short)
    return "\n".join(lines) + "\n"


def render_short(result: Result) -> list[str]:
    """A shortened re-run through this suite: the same code path at reduced settings."""
    lines = ["## Shortened re-run through the suite", ""]
    for net, r in result.data.items():
        if not net.startswith("cifar_resnet") or "heads" not in r:
            continue
        m = r["heads"]
        d = m.get("max_drop_0.005", {})
        within = m["macs_within_0.5"].get("original")
        reach = (
            f"within 0.5 points of the original at {within:.3f} of the MACs"
            if within is not None
            else "no point of the calibrated curve within 0.5 points of the original"
        )
        half = max(
            (p for p in m["curve"] if p["test_macs"] <= 0.505),
            key=lambda p: p["test_acc"],
            default=None,
        )
        at_half = (
            f"; at half the MACs ({half['test_macs']:.3f}) {_pct(half['test_acc'])} %"
            if half
            else ""
        )
        base = (
            f", the static network fine-tuned as long {_pct(r['static_ft_acc'])} %"
            if "static_ft_acc" in r
            else ""
        )
        lines.append(
            f"**{net}, {m['epochs']} heads epoch(s) on {r['train_images']} images** of the fit "
            f"part, calibrated on {r['calib_images']}, measured on {r['test_images']} test "
            f"images: original {_pct(r['static_original_acc'])} %{base}; at `max_drop=0.005` "
            f"{_pct(d.get('test_acc'))} % at {d.get('test_macs', float('nan')):.3f} of the "
            f"MACs{at_half}; {reach}; oracle {_pct(m['oracle']['acc'])} % at "
            f"{m['oracle']['macs']:.3f}; per exit "
            + ", ".join(f"{_pct(a)} %" for a in m["per_exit_test_acc"])
            + ". Not comparable with the tables above (5,000 of the 45,000 images, one epoch: the "
            "heads are barely trained); it shows the published pipeline running end to end on "
            "the code dynify ships."
        )
        lines.append("")
    return lines + provenance(result)
