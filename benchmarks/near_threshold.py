"""Decisions near a threshold: how often eager (batch and batch-1), ONNX Runtime and pt2 take a
different exit for inputs pushed to within 1e-6 of an exit's threshold.

    python -m benchmarks.near_threshold [--samples 64] [--model cifar_resnet20] [--exits 1]

Not timed. The model has random weights and randomised exit heads (what is measured is float
arithmetic, not accuracy). Each input is scaled by a factor bisected (in float64) until exit
0's score, computed alone at batch 1, lies within `--tolerance` of the threshold; then every
runtime decides on the pushed inputs, as one batch and one by one. Results: docs/export.md,
"Decisions near a threshold".
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import dynify


def randomised_heads(dyn: dynify.DynamicModel, seed: int) -> None:
    """Input-dependent exit heads (a fresh head predicts the uniform distribution)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dynify.new_parameters(dyn):  # the exit heads' weights
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 3.0 / p[0].numel() ** 0.5)


def exit0_score(dyn: dynify.DynamicModel, x: torch.Tensor) -> torch.Tensor:
    """Exit 0's confidence (max softmax of its tempered logits), per sample."""
    with torch.no_grad():
        logits = dyn.exit_logits(x)[0] / dyn.temperatures[0]
    return torch.softmax(logits, -1).amax(-1)


def push_to_threshold(
    dyn: dynify.DynamicModel, x: torch.Tensor, threshold: float, tolerance: float
) -> tuple[torch.Tensor, float] | None:
    """`c * x` with exit 0's batch-1 score within `tolerance` of `threshold`, or None when no
    scale in [1e-3, 1e3] brackets it."""
    scales = np.logspace(-3, 3, 61)
    side = [float(exit0_score(dyn, (x * s)[None])) >= threshold for s in scales]
    flips = [i for i in range(len(side) - 1) if side[i] != side[i + 1]]
    if not flips:
        return None
    lo, hi = float(scales[flips[0]]), float(scales[flips[0] + 1])
    lo_above = side[flips[0]]
    best, gap = None, float("inf")
    for _ in range(60):  # float64 halvings: far below float32's resolution of the scale
        mid = 0.5 * (lo + hi)
        pushed = (x.double() * mid).float()
        score = float(exit0_score(dyn, pushed[None]))
        if abs(score - threshold) < gap:
            best, gap = pushed, abs(score - threshold)
        if (score >= threshold) == lo_above:
            lo = mid
        else:
            hi = mid
    return best, gap


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    dyn = dynify.convert(
        args.model, "early-exit", options={"exits": args.exits}, weights="random"
    ).eval()
    randomised_heads(dyn, args.seed)
    inputs = torch.randn(args.samples, *dyn.input_shape)
    threshold = float(exit0_score(dyn, inputs).median())
    thresholds = [threshold] + [1.01] * (dyn.num_thresholds - 1)  # only exit 0 decides
    dyn.set_thresholds(thresholds)
    pushed, gaps = [], []
    for x in inputs:
        found = push_to_threshold(dyn, x, threshold, args.tolerance)
        if found is not None:
            pushed.append(found[0])
            gaps.append(found[1])
    xs = torch.stack(pushed)
    within = [i for i, g in enumerate(gaps) if g <= args.tolerance]
    xs = xs[within]
    n = len(xs)

    decided: dict[str, np.ndarray] = {}
    logits: dict[str, np.ndarray] = {}
    with torch.no_grad():
        out = dyn(xs)
        decided["eager batch"], logits["eager batch"] = dyn.last_exit.numpy(), out.numpy()
        ones = [(dyn(x[None]).numpy(), int(dyn.last_exit[0])) for x in xs]
    decided["eager batch-1"] = np.array([e for _, e in ones])
    logits["eager batch-1"] = np.concatenate([o for o, _ in ones])

    # Is a disagreement the arithmetic (the batch's score on the other side of the threshold)
    # or the rule (the same side, another decision)?
    score_batch = exit0_score(dyn, xs)
    score_one = torch.cat([exit0_score(dyn, x[None]) for x in xs])
    side_differs = (score_batch >= threshold) != (score_one >= threshold)
    decision_differs = torch.from_numpy(decided["eager batch"] != decided["eager batch-1"])

    thr = np.asarray(thresholds, np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        import onnxruntime as ort

        path = dynify.export_onnx(dyn, Path(tmp) / "m.onnx", verify=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out, dec = session.run(None, {"x": xs.numpy(), "thresholds": thr})[:2]
        decided["onnx batch"], logits["onnx batch"] = np.asarray(dec), out
        ones = [session.run(None, {"x": x[None].numpy(), "thresholds": thr})[:2] for x in xs]
        decided["onnx batch-1"] = np.concatenate([np.asarray(d) for _, d in ones])
        logits["onnx batch-1"] = np.concatenate([o for o, _ in ones])

        program = torch.export.load(dynify.export_pt2(dyn, Path(tmp) / "m.pt2", verify=False))
        module, t = program.module(), torch.tensor(thresholds)
        with torch.no_grad():
            out, dec = module(xs, t)
            decided["pt2 batch"], logits["pt2 batch"] = dec.numpy(), out.numpy()
            ones = [module(x[None], t) for x in xs]
        decided["pt2 batch-1"] = np.concatenate([d.numpy() for _, d in ones])
        logits["pt2 batch-1"] = np.concatenate([o.numpy() for o, _ in ones])

    reference = "eager batch-1"
    rows = []
    for name, dec in decided.items():
        differ = dec.reshape(-1) != decided[reference].reshape(-1)
        diff = np.abs(logits[name] - logits[reference]).max(1)
        rows.append(
            {
                "runtime": name,
                "exit 0 taken": int((dec.reshape(-1) == 0).sum()),
                f"differs from {reference}": int(differ.sum()),
                "max |logit diff| where it differs": float(diff[differ].max())
                if differ.any()
                else 0.0,
                "max |logit diff| elsewhere": float(diff[~differ].max())
                if (~differ).any()
                else 0.0,
            }
        )
    return {
        "model": args.model,
        "exits": args.exits,
        "threshold": threshold,
        "samples": args.samples,
        "bracketed": len(pushed),
        "within_tolerance": n,
        "tolerance": args.tolerance,
        "torch": torch.__version__,
        "eager_score_gap": float((score_batch - score_one).abs().max()),
        "eager_side_differs": int(side_differs.sum()),
        "eager_rule_differs": int((decision_differs & ~side_differs).sum()),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.near_threshold", description=__doc__
    )
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--exits", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = measure(args)
    print(
        f"{result['model']}, {result['exits']} exits, threshold {result['threshold']:.6f}: "
        f"{result['within_tolerance']} of {result['samples']} inputs pushed within "
        f"{result['tolerance']:g} of exit 0's threshold"
    )
    print(
        f"  eager exit-0 score, batch vs batch-1: max gap {result['eager_score_gap']:.2g}, on "
        f"opposite sides of the threshold for {result['eager_side_differs']}; decisions that "
        f"differ with the scores on one side: {result['eager_rule_differs']}"
    )
    for row in result["rows"]:
        print(
            "  "
            + ", ".join(
                f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()
            )
        )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
