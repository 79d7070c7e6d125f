"""Batch-1 latency of block-gated CIFAR ResNet-44 at a fixed plan, eager vs ONNX Runtime.

Latency depends only on which blocks run, not on what the gates learned, so the policy network
is pinned: its weights zeroed and its biases +3 (run) or -3 (skip) per block, skipping every
`--every`-th gated block whatever the input. At threshold 0.5 that plan runs; 1.01 is the
static network's work; 0 skips every skippable block. `dynify.export.bench` times each
threshold and the static network interleaved (median of `--runs` rounds), in eager PyTorch and
in ONNX Runtime (the export puts every gated branch under an `If`, verified against eager).

    python benchmarks/gates_latency.py            # writes benchmarks/gates_latency.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import dynify
from dynify.export.bench import bench, settle_batch_norm

HERE = Path(__file__).parent


def pinned_policy_model(skip_every: int) -> dynify.DynamicModel:
    torch.manual_seed(0)
    dyn = dynify.convert(
        "cifar_resnet44", "block-gates", weights="random", options={"gate": "policy"}
    )
    settle_batch_norm(dyn)
    with torch.no_grad():
        dyn.policy.fc.weight.zero_()
        bias = torch.full((dyn.num_gates,), 3.0)
        bias[skip_every - 1 :: skip_every] = -3.0
        dyn.policy.fc.bias.copy_(bias)
    return dyn.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=3, help="skip every n-th gated block")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "gates_latency.json")
    args = parser.parse_args()
    dyn = pinned_policy_model(args.every)
    k = int(dyn.thresholds.numel())
    cases = [
        ("skip none (1.01)", [1.01] * k),
        ("plan (0.5)", [0.5] * k),
        ("skip all (0)", [0.0] * k),
    ]
    results = {"every": args.every, "threads": args.threads, "runs": args.runs}
    for runtime in ("eager", "onnx"):
        res = bench(dyn, runtime=runtime, runs=args.runs, threads=args.threads, cases=cases)
        results[runtime] = res.to_dict()
        for row in res.rows:
            print(
                f"{runtime:5s} {row.label:18s} MACs {row.macs_fraction:.3f} "
                f"{row.latency_ms:.3f} ms ratio {row.latency_ratio:.3f} "
                f"fall/MAC fall {(1 - row.latency_ratio) / max(1 - row.macs_fraction, 1e-9):.2f}",
                flush=True,
            )
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
