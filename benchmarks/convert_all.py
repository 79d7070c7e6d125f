"""Convert every torchvision classification model (and the CIFAR ResNets, a sample of timm).

    python -m benchmarks convert_all                       # all models, random weights
    python -m benchmarks convert_all --models resnet18 vit_b_16

For each, through the public API: `dynify.build_model` (random weights) and `dynify.convert` with
the default early exits; the conversion time, the exits placed, and the largest difference
between the original model and `with dyn.static(): dyn(x)` on one random input. A failure is
recorded with its message, never hidden.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import dynify
from benchmarks.report import missing, provenance
from benchmarks.results import read_result

NAME = "convert_all"
EXTRA = ["cifar_resnet20", "cifar_resnet44"]
TIMM = [
    "timm:mobilevit_xs",
    "timm:vit_tiny_patch16_224",
    "timm:deit_tiny_patch16_224",
    "timm:convnext_atto",
    "timm:efficientnet_b0",
    "timm:levit_128s",
    "timm:regnetx_002",
    "timm:resnet18d",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="*", default=None, help="default: every model")
    parser.add_argument(
        "--resume", action="store_true", help="keep the models results/convert_all.json has"
    )


def apply_quick(args: argparse.Namespace) -> None:
    args.models = args.models or ["cifar_resnet20", "resnet18"]


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model, ref = dynify.build_model(name, weights="random")
    x = torch.randn(1, 3, ref.input_size, ref.input_size)
    start = time.perf_counter()
    dyn = dynify.convert(model, example_input=x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        expected = model(x)
        with dyn.static():
            got = dyn(x)
    return {
        "model": name,
        "input": ref.input_size,
        "gmacs": dyn.static_macs / 1e9,
        "exits": [round(float(r["of static"]), 2) for r in dyn.describe()[:-1]],
        "head_share": max(c.macs for c in dyn.costs() if c.name.startswith("head"))
        / dyn.static_macs,
        "max_abs_diff": float((got - expected).abs().max()),
        "convert_s": seconds,
        "status": "ok"
        if torch.equal(got, expected)
        else "close"
        if torch.allclose(got, expected, atol=1e-5)
        else "DIFF",
    }


def run(args: argparse.Namespace) -> dict[str, dict]:
    torch.set_num_threads(1)
    previous = read_result(NAME) if args.resume else None
    results: dict[str, dict] = dict(previous.data) if previous else {}
    names = args.models or torchvision.models.list_models(module=torchvision.models) + EXTRA + TIMM
    for name in names:
        if name in results and "error" not in results[name]:
            continue
        try:
            results[name] = measure(name)
        except Exception as exc:  # recorded, not hidden: the table shows every failure
            results[name] = {"model": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        print(f"{name}: {results[name].get('status', results[name].get('error'))}", flush=True)
    return {NAME: results}


def render() -> str:
    lines = ["# Early-exit conversion of every torchvision classification model", ""]
    result = read_result(NAME)
    if result is None:
        return "\n".join(lines + missing(NAME, "python -m benchmarks convert_all"))
    rows = sorted(result.data.values(), key=lambda r: r["model"])
    ok = sum(r.get("status") in ("ok", "close") for r in rows)
    exact = sum(r.get("status") == "ok" for r in rows)
    lines += [
        f"**Current result: {ok} of {len(rows)} models convert with static output within 1e-5** "
        f"({exact} bit-identical).",
        "",
        *provenance(result),
        "Random weights, one random input at the model's default resolution, 1 CPU thread. "
        "`static diff` is the largest absolute difference between the original model and "
        "`with dyn.static(): dyn(x)`; `exits` are the MAC fractions at which the 4 default exits "
        "sit (each including the heads before it); `head share` is the costliest head as a "
        "fraction of the model's MACs. The last rows are the built-in CIFAR ResNets and a "
        "sample of timm models.",
        "",
        "| model | input | GMACs | exits (MAC fraction) | head share | static diff | convert s | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | | | | FAILED: {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['input']} | {r['gmacs']:.2f} | {', '.join(f'{e:.2f}' for e in r['exits'])} "
            f"| {r['head_share']:.2%} | {r['max_abs_diff']:.1e} | {r['convert_s']:.1f} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"
