"""Do saved MACs become saved milliseconds? Early-exit latency against the static network.

    python -m benchmarks latency --models resnet18 resnet50 --runs 12
    python -m benchmarks latency --models cifar_resnet44 --runs 40
    (each again with --consecutive 1: call by call)
    python -m benchmarks latency --any-batch --models cifar_resnet44 --runs 40

For ResNet-18 and ResNet-50 at 224x224 and CIFAR ResNet-44 at 32x32 (random weights: the
forced thresholds fix the path, so timing does not depend on what the heads predict), batch 1,
in eager PyTorch (NCHW and channels-last) and in ONNX Runtime, at 1 and 2 threads: the median
latency when every sample leaves at exit i (thresholds [1.01]*i + [0, ...]), when it runs to the
end, and of the static network, interleaved round by round (`--consecutive N`: runs of N calls
per configuration and round), and of the static network cut at each exit (the split of each
exit's lat./MAC into the network's own and the exit's overhead). The ONNX files are exported for
batch 1, as the static graphs they are timed against, and verified against eager (max abs diff
<= 1e-4); ONNX Runtime is timed in a child process on one shared thread pool. `--any-batch`
times, instead, that batch-1 graph against the default export (any batch size, whose exits
carry the per-sample gather/scatter) in ONNX Runtime, each at every forced exit against the
static network.

Time on an otherwise idle machine: other processes' load moves the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dynify

NAME = "latency"
MODELS = [("resnet18", 224), ("resnet50", 224), ("cifar_resnet44", 32), ("cifar_resnet20", 32)]
# Variants with non-default options, {label: (model, options)}. Since the early-exit pass caps a
# head at 2**20 weights (heads are matrix-vector products whose time follows their weight bytes,
# not their MACs), the default heads are the small ones; none is needed now.
VARIANTS: dict[str, tuple[str, dict]] = {}
# (runtime, channels_last)
CONFIGS = [("eager", False), ("eager", True), ("onnx", False)]
TARGET = 1.15


def export_batch_policies(dyn: dynify.DynamicModel, folder: Path, name: str) -> dict:
    """Batch 8 with mixed exits: export per-sample gather/scatter and one-decision-per-batch."""
    torch.manual_seed(0)
    for _, p in dynify.new_parameters(dyn):  # spread the confidences so a threshold splits
        if p.dim() == 2:  # the batch: the exit heads' linear classifiers
            nn.init.normal_(p, std=0.3)
    x = dyn.random_input(8, torch.Generator().manual_seed(3))
    with torch.no_grad():
        scores = [torch.softmax(lg, -1).amax(-1) for lg in dyn.exit_logits(x)[:-1]]
    # halfway between the 4th and 5th score: no sample sits on a threshold, where float noise
    # between runtimes (ORT fuses the heads' batch norms) could flip its decision
    thr = torch.stack([s.sort().values[3:5].mean() for s in scores])
    paths = {}
    for policy in ("per_sample", "batch_all"):
        path = folder / f"{name}-{policy}.onnx"
        paths[policy] = str(dynify.export_onnx(dyn, path, batch_policy=policy))
    save_file({"x": x}, folder / f"{name}-batch8.safetensors")
    return {"thresholds": thr.tolist(), "paths": paths}


def time_batch_policies(meta: dict, folder: Path, name: str, runs: int) -> dict:
    """Median ORT latency (1 thread, interleaved) and mean MACs of both batch policies."""
    import numpy as np
    import onnxruntime as ort

    x = load_file(folder / f"{name}-batch8.safetensors")["x"]
    feed = {"x": x.numpy(), "thresholds": np.asarray(meta["batch8"]["thresholds"], np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {
        policy: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for policy, path in meta["batch8"]["paths"].items()
    }
    times = dynify.time_interleaved(
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
    dynify.settle_batch_norm(dyn)
    dynify.save(dyn, folder / f"{name}.dyn")
    start = time.perf_counter()
    export = dynify.export_onnx_report(dyn, folder / f"{name}.onnx", batch=1)  # as the static graph
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="*", default=[m for m, _ in MODELS[:3]] + list(VARIANTS))
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument(
        "--runs", type=int, default=None, help="rounds (default: 12 at 224x224, 40 at 32x32)"
    )
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
    parser.add_argument(
        "--no-batch8", dest="batch8", action="store_false", help="skip the batch-8 policies"
    )
    parser.add_argument(
        "--any-batch",
        action="store_true",
        help="time one model's batch-1 ONNX graph against its default any-batch graph "
        f"(ONNX Runtime, batch 1) instead; writes results/{NAME}_any_batch_graph.json",
    )


def apply_quick(args: argparse.Namespace) -> None:
    args.models = ["cifar_resnet20"]
    args.threads, args.runs, args.warmup, args.consecutive = [1], 2, 1, 2
    args.folder = Path(tempfile.mkdtemp(prefix="dynify-latency-"))
    args.batch8 = False


def result_name(args: argparse.Namespace) -> str:
    if args.any_batch:
        return f"{NAME}_any_batch_graph"
    return NAME if args.consecutive > 1 else f"{NAME}_call_by_call"


def exported(name: str, folder: Path) -> dict:
    """The export record of `name` in `folder`, exporting it first if there is none."""
    meta_path = folder / f"{name}.export.json"
    return json.loads(meta_path.read_text()) if meta_path.exists() else export_model(name, folder)


def any_batch_graph(args: argparse.Namespace) -> dict[str, list]:
    """Per thread count, ONNX Runtime's batch-1 latency at each forced exit, the final
    classifier and the static network, of the graph exported for batch 1 and of the default
    any-batch graph: {"<graph>, <T> thread(s)": [[label, ms, lat./MAC], ...]}."""
    if len(args.models) != 1:
        raise SystemExit("--any-batch times one model: give it with --models NAME.")
    (name,) = args.models
    meta = exported(name, args.folder)
    dyn = dynify.load(args.folder / f"{name}.dyn")
    any_path = args.folder / f"{name}-any-batch.onnx"
    if not any_path.exists():
        dynify.export_onnx(dyn, any_path)  # the default: any batch size
    graphs = {"batch-1 graph": args.folder / f"{name}.onnx", "any-batch graph": any_path}
    runs = args.runs or (12 if meta["input"][-1] >= 224 else 40)
    data: dict[str, list] = {}
    for threads in args.threads:
        for graph, path in graphs.items():
            res = dynify.bench(
                dyn,
                runtime="onnx",
                batch=1,
                runs=runs,
                warmup=args.warmup,
                threads=threads,
                onnx_path=path,
                consecutive=args.consecutive,
            )
            rows = [[r.label, round(r.latency_ms, 3), round(r.ratio_to_macs, 3)] for r in res.rows]
            data[f"{graph}, {threads} thread(s)"] = rows
            print(f"{name} {graph} t={threads}: {rows}", flush=True)
    return data


def run(args: argparse.Namespace) -> dict[str, dict]:
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.any_batch:
        return {result_name(args): any_batch_graph(args)}
    results = {
        "runs": args.runs,
        "warmup": args.warmup,
        "consecutive": args.consecutive,
        "models": {},
    }
    for name in args.models:
        meta = exported(name, args.folder)
        if args.export_only:
            continue
        dyn = dynify.load(args.folder / f"{name}.dyn")
        runs = args.runs or (12 if meta["input"][-1] >= 224 else 40)
        entry = {**meta, "runs": []}
        for threads in args.threads:
            for runtime, channels_last in CONFIGS:
                res = dynify.bench(
                    dyn,
                    runtime=runtime,
                    batch=1,
                    runs=runs,
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
        if "batch8" in meta and args.batch8:
            entry["batch8"] = time_batch_policies(meta, args.folder, name, runs)
            print(f"{name} batch 8: {entry['batch8']}", flush=True)
        results["models"][name] = entry
    return {result_name(args): results}


def tables(results: dict, level: str = "####") -> list[str]:
    """Per model and thread count, each runtime's median latency, latency ratio to static and
    that ratio divided by the MAC ratio (bold above TARGET), then the network/exit split."""
    lines = []
    for name, entry in results["models"].items():
        shape = "x".join(map(str, entry["input"]))
        for threads in sorted({r["threads"] for r in entry["runs"]}):
            runs = [r for r in entry["runs"] if r["threads"] == threads]
            lines.append(
                f"{level} {name} ({shape}, {entry['static_macs'] / 1e6:.0f} M MACs), batch 1, "
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
    return lines


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


# --- the report --------------------------------------------------------------------------------

RUNTIMES = {(False, "eager"): "eager NCHW", (True, "eager"): "eager channels-last"}


def _parts(data: dict) -> list[dict]:
    """A results file holds one run, or several (one per group of models) keyed by models."""
    return [data] if "models" in data else list(data.values())


def worst_ratios(data: dict) -> dict[tuple[str, int, str], tuple[float, str]]:
    """(model, threads, runtime) -> the worst lat./MAC over the exits, and which exit."""
    worst: dict[tuple[str, int, str], tuple[float, str]] = {}
    for part in _parts(data):
        for model, entry in part["models"].items():
            for run in entry["runs"]:
                runtime = RUNTIMES.get(
                    (bool(run.get("channels_last")), run["runtime"]), "ONNX Runtime"
                )
                rows = [r for r in run["rows"] if r["label"].startswith("exit")]
                top = max(rows, key=lambda r: r["ratio_to_macs"])
                worst[(model, run["threads"], runtime)] = (top["ratio_to_macs"], top["label"])
    return worst


def summary(consecutive: dict, call_by_call: dict | None) -> list[str]:
    a = worst_ratios(consecutive)
    b = worst_ratios(call_by_call) if call_by_call else {}
    runtimes = ["eager NCHW", "eager channels-last", "ONNX Runtime"]
    lines = [
        "| model, threads | " + " | ".join(runtimes) + " |",
        "| --- | --- | --- | --- |",
    ]
    for model, threads in sorted({(m, t) for m, t, _ in a}, key=lambda k: (k[0], k[1])):
        cells = []
        for runtime in runtimes:
            key = (model, threads, runtime)
            if key not in a:
                cells.append("-")
                continue
            parts = []
            for source in (a, b):
                if key in source:
                    v = source[key][0]
                    mark = "**" if v > TARGET else ""
                    parts.append(f"{mark}{v:.2f}{mark}")
            cells.append(" / ".join(parts) + f" ({a[key][1]})")
        lines.append(f"| {model}, {threads} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def headline(consecutive: dict, call_by_call: dict | None) -> list[str]:
    ort = [
        v
        for src in (consecutive, call_by_call or {})
        for (m, t, r), (v, _) in worst_ratios(src).items()
        if r == "ONNX Runtime"
    ]
    if not ort:
        return []
    verdict = "met" if max(ort) <= TARGET else "missed"
    return [
        f"**Current result:** in ONNX Runtime the worst latency ratio / MAC ratio over every "
        f"exit of every timed network, at every thread count and in both protocols, is "
        f"**{max(ort):.2f}** (target <= {TARGET}: {verdict}). Eager PyTorch: the table below.",
        "",
    ]


def any_batch_table(data: dict) -> list[str]:
    lines = ["| graph, threads | lat./MAC at exits 0-3 |", "| --- | --- |"]
    for label, rows in data.items():
        ratios = [f"{r[2]:.2f}" for r in rows if str(r[0]).startswith("exit")]
        lines.append(f"| {label} | {' / '.join(ratios)} |")
    return [*lines, ""]


def render() -> str:
    from benchmarks.report import missing, provenance
    from benchmarks.results import read_result

    lines = [
        "# Do saved MACs become saved milliseconds? Early-exit latency, eager and ONNX Runtime",
        "",
    ]
    consecutive = read_result(NAME)
    if consecutive is None:
        return "\n".join(lines + missing(NAME, "python -m benchmarks latency"))
    call = read_result(f"{NAME}_call_by_call")
    lines += headline(consecutive.data, call.data if call else None)
    lines += [
        "## Worst lat./MAC over the exits (target <= 1.15)",
        "",
        "Latency ratio (the exit's median latency / the static network's) over MAC ratio (the "
        "exit's MACs, heads passed included / the static network's), the worst exit of each "
        "network; runs of 10 consecutive calls"
        + (" / call by call" if call else "")
        + ", bold above the target. Where the table misses, the split in the full tables "
        "shows whether the network's own layers before the exit (the first number) or the "
        "exit's overhead (the second) is the cause.",
        "",
        *summary(consecutive.data, call.data if call else None),
    ]
    lines += provenance(consecutive, "(runs of 10 consecutive calls)")
    if call:
        lines += provenance(call, "(call by call)")
    for part in _parts(consecutive.data):
        for entry in part["models"].values():
            b8 = entry.get("batch8")
            if b8 and "per_sample" in b8 and "latency_ms" in b8["per_sample"]:
                ps, ba = b8["per_sample"], b8["batch_all"]
                lines += [
                    "## Batch 8: per-sample exits against one decision for the batch",
                    "",
                    "CIFAR ResNet-44, ONNX Runtime, one thread, a batch of 8 with mixed "
                    "confidences (thresholds between the 4th and 5th score of each exit):",
                    "",
                    "| policy | exits | MACs (of static) | latency |",
                    "| --- | --- | --- | --- |",
                    f"| per-sample (default): gather the undecided samples into each `If` "
                    f"branch, scatter back | {','.join(map(str, ps['exits']))} | "
                    f"{ps['macs_fraction']:.3f} | {ps['latency_ms']:.2f} ms |",
                    f'| `batch_policy="batch_all"`: leave only when the whole batch is '
                    f"confident | {','.join(map(str, ba['exits']))} | {ba['macs_fraction']:.3f} "
                    f"| {ba['latency_ms']:.2f} ms |",
                    "",
                ]
    any_batch = read_result(f"{NAME}_any_batch_graph")
    if any_batch:
        lines += [
            "## The default export (any batch size) at batch 1",
            "",
            "CIFAR ResNet-44 in ONNX Runtime, the graph exported for batch 1 (`--batch 1`, as in "
            "the tables) against the default any-batch graph, whose exits carry the per-sample "
            "gather/scatter:",
            "",
            *any_batch_table(any_batch.data),
            *provenance(any_batch),
        ]
    lines += ["## Full tables, runs of 10 consecutive calls", ""]
    for part in _parts(consecutive.data):
        lines += tables(part)
    if call:
        lines += ["## Full tables, call by call", ""]
        for part in _parts(call.data):
            lines += tables(part)
    return "\n".join(lines) + "\n"
