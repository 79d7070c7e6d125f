"""Do saved MACs become saved milliseconds? Early-exit latency vs the static network.

For ResNet-18 and ResNet-50 at 224x224 and CIFAR ResNet-44 at 32x32 (random weights: the
forced thresholds fix the path, so timing does not depend on what the heads predict), batch 1,
in eager PyTorch and in ONNX Runtime, at 1 and 2 threads: the median latency when every sample
leaves at exit i (thresholds [1.01]*i + [0, ...]), when it runs to the end, and of the static
network, all interleaved round by round (dynify.export.bench; `--consecutive N`: runs of N calls
per configuration and round), and of the static network cut at each exit (the split of each
exit's lat./MAC into the network's own and the exit's overhead). The ONNX files are exported
for batch 1, as the static graphs they are timed against, and verified by dynify.export (ONNX
Runtime vs eager, max abs diff <= 1e-4); ONNX Runtime is timed in a child process on one
shared thread pool (dynify.export.timing).

Run under the shared CPU lock:
    nohup flock /tmp/dynify-cpu.lock .venv/bin/python benchmarks/latency.py > /tmp/latency.log 2>&1 &
Writes `--out` (default benchmarks/latency.json) and its tables next to it (X.tables.md), which
benchmarks/latency.md quotes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import dynify
from dynify.export import export_onnx_report
from dynify.export.bench import bench, settle_batch_norm
from dynify.export.verify import ort_session

HERE = Path(__file__).parent
MODELS = [("resnet18", 224), ("resnet50", 224), ("cifar_resnet44", 32)]
# Variants with non-default options, {label: (model, options)}. Since the early-exit pass caps a
# head at 2**20 weights (heads are matrix-vector products whose time follows their weight bytes,
# not their MACs), the default heads are the small ones; none is needed now.
VARIANTS: dict[str, tuple[str, dict]] = {}
# (runtime, channels_last)
CONFIGS = [("eager", False), ("eager", True), ("onnx", False)]
TARGET = 1.15


def export_batch_policies(dyn: dynify.DynamicModel, folder: Path, name: str) -> dict:
    """Batch 8 with mixed exits: export per-sample gather/scatter and one-decision-per-batch."""
    from dynify.export.onnx import write_onnx

    torch.manual_seed(0)
    for head in dyn.heads:  # spread the confidences so a threshold splits the batch
        nn.init.normal_(head.classifier.weight, std=0.3)
    x = torch.randn(8, *dyn.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scores = [torch.softmax(lg, -1).amax(-1) for lg in dyn.exit_logits(x)[:-1]]
    # halfway between the 4th and 5th score: no sample sits on a threshold, where float noise
    # between runtimes (ORT fuses the heads' batch norms) could flip its decision
    thr = torch.stack([s.sort().values[3:5].mean() for s in scores])
    cascade = dyn.export_face()
    together = cascade.with_batch_policy("batch_all").eval()
    paths = {}
    for policy, module in (("per_sample", cascade), ("batch_all", together)):
        result = write_onnx(
            module, x, folder / f"{name}-{policy}.onnx", inputs=[x], thresholds_list=[thr]
        )
        paths[policy] = str(result.path)
    torch.save(x, folder / f"{name}-batch8.pt")
    return {"thresholds": thr.tolist(), "paths": paths}


def time_batch_policies(meta: dict, folder: Path, name: str, runs: int) -> dict:
    """Median ORT latency (1 thread, interleaved) and mean MACs of both batch policies."""
    import numpy as np

    from dynify.export.timing import time_interleaved

    x = torch.load(folder / f"{name}-batch8.pt", weights_only=True)
    feed = {"x": x.numpy(), "thresholds": np.asarray(meta["batch8"]["thresholds"], np.float32)}
    sessions = {p: ort_session(path, threads=1) for p, path in meta["batch8"]["paths"].items()}
    times = time_interleaved(
        {p: (lambda s=s: s.run(None, feed)) for p, s in sessions.items()}, runs, 3
    )
    exit_macs = torch.tensor(meta["exit_macs"], dtype=torch.float64)
    result: dict = {"thresholds": meta["batch8"]["thresholds"]}
    for policy, session in sessions.items():
        exits = torch.as_tensor(session.run(None, feed)[1])
        result[policy] = {
            "exits": exits.tolist(),
            "macs_fraction": float(exit_macs[exits].mean() / meta["static_macs"]),
            "latency_ms": statistics.median(times[policy]) * 1e3,
        }
    return result


def export_model(name: str, folder: Path) -> dict:
    """Convert (random weights, settled BN), save the artifact, export and verify the ONNX."""
    torch.manual_seed(0)
    model, options = VARIANTS.get(name, (name, {}))
    dyn = dynify.convert(
        model, weights="random", input_size=dict(MODELS).get(model), options=options
    )
    settle_batch_norm(dyn)
    dynify.save(dyn, folder / f"{name}.dyn")
    start = time.perf_counter()
    export = export_onnx_report(dyn, folder / f"{name}.onnx", batch=1)  # as the static graph
    meta = {
        "input": list(dyn.input_shape),
        "static_macs": dyn.static_macs,
        "exit_macs": dyn.exit_macs(),
        "export_seconds": time.perf_counter() - start,
        "if_nodes": export.if_nodes,
        "parity_cases": len(export.report.cases),
        "parity_max_abs_diff": export.report.max_abs_diff,
    }
    if name == "cifar_resnet44":
        meta["batch8"] = export_batch_policies(dyn, folder, name)
    (folder / f"{name}.export.json").write_text(json.dumps(meta, indent=1))
    print(
        f"{name}: exported in {meta['export_seconds']:.0f} s, {meta['if_nodes']} If nodes, "
        f"parity {meta['parity_max_abs_diff']:.2e}",
        flush=True,
    )
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[m for m, _ in MODELS] + list(VARIANTS))
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--consecutive",
        type=int,
        default=10,
        help="timed calls in a row per configuration and round (1: call by call)",
    )
    parser.add_argument("--folder", type=Path, default=Path("/tmp/dynify_latency"))
    parser.add_argument(
        "--export-only", action="store_true", help="Export (no lock needed), do not time."
    )
    parser.add_argument("--out", type=Path, default=HERE / "latency.json")
    args = parser.parse_args()
    args.folder.mkdir(exist_ok=True)
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads available",
        "runs": args.runs,
        "warmup": args.warmup,
        "consecutive": args.consecutive,
        "models": {},
    }
    for name in args.models:
        meta_path = args.folder / f"{name}.export.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if meta is None:
            meta = export_model(name, args.folder)
        if args.export_only:
            continue
        dyn = dynify.load(args.folder / f"{name}.dyn")
        entry = {**meta, "runs": []}
        for threads in args.threads:
            for runtime, channels_last in CONFIGS:
                res = bench(
                    dyn,
                    runtime=runtime,
                    batch=1,
                    runs=args.runs,
                    warmup=args.warmup,
                    threads=threads,
                    onnx_path=args.folder / f"{name}.onnx",
                    channels_last=channels_last,
                    prefixes=True,
                    consecutive=args.consecutive,
                )
                entry["runs"].append(res.to_dict())
                rows = ", ".join(
                    f"{r.label} {r.latency_ms:.2f}ms x{r.ratio_to_macs:.2f}" for r in res.rows
                )
                layout = "-cl" if channels_last else ""
                print(f"{name} {runtime}{layout} t={threads}: {rows}", flush=True)
        if "batch8" in meta:
            entry["batch8"] = time_batch_policies(meta, args.folder, name, args.runs)
            print(f"{name} batch 8: {entry['batch8']}", flush=True)
        results["models"][name] = entry
        args.out.write_text(json.dumps(results, indent=1))
    if not args.export_only:
        write_markdown(results, args.out.with_suffix(".tables.md"))


def write_markdown(results: dict, path: Path) -> None:
    """The tables for latency.md: per model and thread count, each runtime's median latency,
    latency ratio to static and that ratio divided by the MAC ratio (bold above TARGET)."""
    lines = []
    for name, entry in results["models"].items():
        shape = "x".join(map(str, entry["input"]))
        for threads in sorted({r["threads"] for r in entry["runs"]}):
            runs = [r for r in entry["runs"] if r["threads"] == threads]
            lines.append(
                f"#### {name} ({shape}, {entry['static_macs'] / 1e6:.0f} M MACs), batch 1, "
                f"{threads} thread(s)\n"
            )
            heads = [
                f"{r['runtime']}{' channels-last' if r.get('channels_last') else ''}" for r in runs
            ]
            lines.append(
                "| exit | MAC ratio | "
                + " | ".join(f"{h}: ms, lat. ratio, lat./MAC" for h in heads)
                + " |"
            )
            lines.append("|---|---:|" + "---:|" * len(runs))
            for i, row in enumerate(runs[0]["rows"]):
                cells = []
                for r in runs:
                    q = r["rows"][i]["ratio_to_macs"]
                    mark = "**" if q > TARGET else ""
                    cells.append(
                        f"{r['rows'][i]['latency_ms']:.2f}, {r['rows'][i]['latency_ratio']:.3f}, "
                        f"{mark}{q:.2f}{mark}"
                    )
                lines.append(
                    f"| {row['label']} | {row['macs_fraction']:.3f} | " + " | ".join(cells) + " |"
                )
            lines.append("")
            lines += _split_table(runs, heads)
    path.write_text("\n".join(lines))


def _split_table(runs: list[dict], heads: list[str]) -> list[str]:
    """Each exit's lat./MAC split: the static network cut there (no head, no decision) over
    its MAC share, and the exit's latency over that cut network's."""
    if not any(row.get("prefix_ms") for row in runs[0]["rows"]):
        return []
    lines = [
        "Split (network lat./MAC, exit overhead): "
        + "; ".join(heads)
        + ". The first is the static network cut at the exit, no head: what the network "
        "itself allows.",
        "",
        "| exit | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for i, row in enumerate(runs[0]["rows"]):
        if row.get("prefix_ms") is None:
            continue
        cells = [
            f"{r['rows'][i]['prefix_ratio_to_macs']:.2f}, {r['rows'][i]['exit_overhead']:.2f}"
            for r in runs
        ]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


if __name__ == "__main__":
    main()
