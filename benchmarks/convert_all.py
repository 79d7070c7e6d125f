"""Convert every torchvision classification model (and the CIFAR ResNets) with early exits.

For each: the conversion time, the exits placed, and the largest difference between the static
model and `with dyn.static(): dyn(x)` on one random input. Results go to a JSON file as they
come (an interrupted run keeps what it measured and resumes) and to benchmarks/convert_all.md.

    python benchmarks/convert_all.py            # all models, random weights
    python benchmarks/convert_all.py resnet18 vit_b_16
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torchvision
from rich.progress import track

import dynify
from dynify.zoo import build_model

HERE = Path(__file__).parent
RESULTS = HERE / "convert_all.json"
REPORT = HERE / "convert_all.md"
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


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model, ref = build_model(name, weights="random")
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
        "head_share": max(dyn.head_macs) / dyn.static_macs,
        "max_abs_diff": float((got - expected).abs().max()),
        "convert_s": seconds,
        "status": "ok"
        if torch.equal(got, expected)
        else "close"
        if torch.allclose(got, expected, atol=1e-5)
        else "DIFF",
    }


def write_report(results: dict[str, dict]) -> None:
    rows = sorted(results.values(), key=lambda r: r["model"])
    ok = sum(r["status"] in ("ok", "close") for r in rows)
    lines = [
        "# Early-exit conversion of every torchvision classification model",
        "",
        "Produced by `python benchmarks/convert_all.py` (random weights, one random input at the",
        "model's default resolution, 1 CPU thread, this 2-core machine). `static diff` is the",
        "largest absolute difference between the original model and `with dyn.static(): dyn(x)`;",
        "`exits` are the MAC fractions at which the 4 default exits sit (each including the heads",
        "before it); `head share` is the costliest head as a fraction of the model's MACs.",
        "",
        "The last rows are the built-in CIFAR ResNets and a sample of timm models.",
        "",
        f"**{ok} of {len(rows)} models convert with static output within 1e-5** "
        f"({sum(r['status'] == 'ok' for r in rows)} bit-identical).",
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
    REPORT.write_text("\n".join(lines) + "\n")


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    names = names or torchvision.models.list_models(module=torchvision.models) + EXTRA + TIMM
    for name in track(names, description="Converting"):
        if name in results and "error" not in results[name]:
            continue
        try:
            results[name] = measure(name)
        except Exception as exc:  # recorded, not hidden: the table shows every failure
            results[name] = {"model": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        RESULTS.write_text(json.dumps(results, indent=1))
    write_report(results)
    print(REPORT.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
