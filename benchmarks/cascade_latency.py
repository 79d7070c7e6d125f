"""Batch-1 latency of a trained cascade (early exits or resolution) at calibrated thresholds.

    python benchmarks/cascade_latency.py ARTIFACT.dyn --budgets 0.4 0.6 --json out.json

The artifact (e.g. one `benchmarks/cifar10.py --save-dir` wrote) is calibrated on the same
5,000-image calibration split of `cifar10/train` as in that script, for each budget; then the
dynamic model and the original static network are timed on `cifar10/test` images at batch 1
on one thread, in runs of 10 consecutive images per model, the two alternating run by run
(as `benchmarks/block_gates.py` does), for several rounds. Reported per budget: the mean
latency ratio, the mean MAC fraction of the timed images, and the latency fall over the MAC
fall; the round with the median ratio, with every round's fall.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from cifar10 import MEAN, STD, WEIGHTS, load_cifar
from timing import alternating_runs

import dynify
from dynify.train.batches import Batches, Preprocessing
from dynify.train.calibrate import calibrate, collect_outputs
from dynify.train.data import split_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/dynify-cifar10-uint8.pt"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--repeats", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    train, test = load_cifar(args.data, args.cache)
    pre = Preprocessing(32, MEAN, STD)
    _, calib = split_dataset(train, 0.1, seed=0)  # cifar10.py's calibration split
    dyn = dynify.load(args.artifact).eval()
    depth = int(dyn.spec["model"]["name"].removeprefix("cifar_resnet"))
    weights = str(args.data / "pretrained" / WEIGHTS[depth])
    static = dynify.zoo.build_model(f"cifar_resnet{depth}", weights=weights)[0].eval()
    calib_out = collect_outputs(dyn, Batches(calib, pre, batch_size=500))
    images = next(iter(Batches(test, pre, batch_size=args.repeats).epoch(0)))[0]
    torch.set_num_threads(1)
    results = {"artifact": str(args.artifact), "strategy": dyn.strategy, "budgets": []}
    for budget in args.budgets:
        cal = calibrate(dyn, calib_out, budget=budget)
        rounds = []
        for _ in range(args.rounds):
            macs: list[float] = []

            def record(name: str, macs: list[float] = macs) -> None:
                if name == "dynamic":
                    macs.append(float(dyn.last_macs[0]))

            times = alternating_runs(
                {"static": static, "dynamic": dyn}, images, args.repeats, after=record
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
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
