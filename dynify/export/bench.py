"""Latency of a dynamic model next to its static network: do saved MACs become saved time?

For each behaviour worth timing (every exit forced in turn, or a threshold sweep) and for the
static network, each round runs every configuration in a rotating order, so machine noise from
other processes hits all of them alike: one call each, or a run of `consecutive` calls after an
untimed one, as a server runs a model (its heads and decision units stay warm; timed right
after another configuration, their small ops pay for it). The figure is the median over all
timed calls after the warm-up rounds. Eager PyTorch runs the DynamicModel itself;
ONNX Runtime runs the exported graph (thresholds fed as an input) against the static network
exported from the same model's `static()` face, both fixed to the timed batch size, timed in
a child process whose sessions share one thread pool, as a deployed model runs
(`dynify.export.timing.time_onnx`).

With `prefixes`, an exit cascade's static network is also timed cut where each exit sits (no
head, no decision): that splits an exit's latency / MAC ratio into what the network itself
allows (its early layers may be slower per MAC than its late ones) and what the exit adds.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dynify.errors import ExportError, InputError
from dynify.export.timing import time_interleaved, time_onnx
from dynify.frontend.inputs import batch_size, input_tensors
from dynify.runtime.decisions import NEVER
from dynify.runtime.early_exit import EarlyExitModel
from dynify.runtime.model import DynamicModel, ExitCascade

Runtime = Literal["eager", "onnx"]
RUNTIMES = ("eager", "onnx")
SWEEP = (0.0, 0.5, NEVER)
STATIC = "static"


def settle_batch_norm(dyn: DynamicModel, batches: int = 2, size: int = 8) -> DynamicModel:
    """Batch-norm running statistics from random inputs, for timing random-weight models: their
    logits then stay O(1) like trained ones, so exits fire at ordinary thresholds and a 1e-4
    parity check of an export means something. Only the static network's BN layers move."""
    for module in dyn.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches
    dyn.train()
    with torch.no_grad(), dyn.static():
        for _ in range(batches):
            dyn(dyn.random_input(size))
    return dyn.eval()


def threshold_cases(dyn: DynamicModel) -> list[tuple[str, list[float]]]:
    """Named threshold vectors that pin the model to a known behaviour, cheapest first.

    Exit cascades (`ExitCascade`) get one case per exit: exit i is forced by never firing the
    exits before it (threshold 1.01) and always firing it (threshold 0), and "final" runs to
    the end. Other strategies get the sweep 0 (cheapest), 0.5, 1.01 (full compute).
    """
    k = dyn.num_thresholds
    if isinstance(dyn, ExitCascade):
        cases = [(f"exit {i}", [NEVER] * i + [0.0] * (k - i)) for i in range(k)]
        return [*cases, ("final", [NEVER] * k)]
    return [(f"threshold {t:g}", [t] * k) for t in SWEEP]


@dataclass
class BenchRow:
    """One configuration: its mean MACs (fraction of static) and median latency."""

    label: str
    thresholds: list[float] | None
    macs_fraction: float
    latency_ms: float
    latency_ratio: float  # latency / static latency
    ratio_to_macs: float  # latency_ratio / macs_fraction: 1.0 = time saved exactly like MACs
    exits: list[int] = field(default_factory=list)  # distinct exit indices taken (cascades)
    # with prefixes, on "exit i" rows: the static network cut at exit i, no head or decision
    prefix_ms: float | None = None
    prefix_ratio_to_macs: float | None = None  # the network's own latency / MAC ratio to there
    exit_overhead: float | None = None  # latency_ms / prefix_ms: what the exit itself costs


@dataclass
class BenchResult:
    """Rows of one benchmark run and how it was measured."""

    runtime: str
    batch: int
    threads: int
    runs: int
    warmup: int
    static_macs: int
    rows: list[BenchRow]
    channels_last: bool = False
    consecutive: int = 1  # timed calls in a row per configuration and round

    @property
    def worst_ratio_to_macs(self) -> float:
        """The largest latency-ratio / MAC-ratio over the dynamic rows."""
        return max(r.ratio_to_macs for r in self.rows if r.label != STATIC)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _eager_macs(dyn: DynamicModel, x: torch.Tensor, thr: list[float]) -> tuple[float, list[int]]:
    """Mean MACs fraction and distinct exits of one eager forward at `thr`."""
    dyn.set_thresholds(thr)
    with torch.inference_mode():
        dyn(x)
    exits = dyn.last_exit
    taken = sorted({int(e) for e in exits.reshape(-1)}) if exits is not None else []
    return dyn.mean_macs_fraction(), taken


class StaticPrefix(nn.Module):
    """An exit cascade's static network up to exit i's cut point: its first i + 1 segments,
    without heads or decisions. The fastest an exit there could possibly be."""

    def __init__(self, dyn: EarlyExitModel, exit_index: int) -> None:
        super().__init__()
        self.segments = nn.ModuleList(list(dyn.segments)[: exit_index + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for segment in self.segments:
            x = segment(x)
        return x


def prefix_cases(dyn: DynamicModel) -> list[tuple[str, int, float]]:
    """(row label, exit index, MAC fraction of the prefix) for every exit of a cascade; none
    for strategies without segments."""
    if not isinstance(dyn, EarlyExitModel):
        return []
    cases, spent = [], 0
    for i in range(dyn.num_exits):
        spent += dyn.segment_macs[i]
        cases.append((f"exit {i}", i, spent / dyn.static_macs))
    return cases


def _prefix_label(exit_label: str) -> str:
    return f"prefix of {exit_label}"


def _eager_runners(
    dyn: DynamicModel,
    x: torch.Tensor,
    cases: Sequence[tuple[str, list[float]]],
    prefixes: Sequence[tuple[str, int, float]] = (),
) -> dict[str, Callable[[], Any]]:
    def dynamic(thr: list[float]) -> Callable[[], Any]:
        t = torch.tensor(thr, dtype=torch.float32)

        def run() -> Any:
            dyn.thresholds.copy_(t)
            return dyn(x)

        return run

    def static() -> Any:
        with dyn.static():
            return dyn(x)

    runners = {label: dynamic(thr) for label, thr in cases}
    runners[STATIC] = static
    for label, i, _ in prefixes:
        prefix = StaticPrefix(dyn, i).eval()
        runners[_prefix_label(label)] = lambda prefix=prefix: prefix(x)
    return runners


def _onnx_runs(
    dyn: DynamicModel,
    x: torch.Tensor,
    cases: Sequence[tuple[str, list[float]]],
    folder: Path,
    onnx_path: Path | None,
    prefixes: Sequence[tuple[str, int, float]],
) -> tuple[dict[str, tuple[Path, dict[str, np.ndarray]]], dict[str, list[int]]]:
    """What to time in ONNX Runtime, {label: (graph, feed)}: each case, the static graph and
    the prefixes; and the exits the dynamic graph took in each case."""
    from dynify.export.onnx import write_onnx, write_plain_onnx, write_static_onnx
    from dynify.export.verify import ort_session

    if onnx_path is None:  # fixed to the timed batch, as the static graph below
        onnx_path = write_onnx(
            dyn.export_face(), x, folder / "dynamic.onnx", verify=False, dynamic_batch=False
        ).path
    static_path = write_static_onnx(dyn, x, folder / "static.onnx")  # fixed batch: its best case
    names = ["x"] + ([] if dyn.extra_input is None else [dyn.extra_input.name])
    xn = {name: t.detach().cpu().numpy() for name, t in zip(names, input_tensors(x), strict=True)}
    feeds = {label: {**xn, "thresholds": np.asarray(thr, np.float32)} for label, thr in cases}
    session = ort_session(onnx_path, threads=1)
    fixed = session.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and fixed != batch_size(x):
        raise ExportError(
            f"{onnx_path} is exported for batch {fixed}; time it with batch={fixed} "
            f"(`--batch {fixed}`), or export a graph for batch {batch_size(x)}"
        )
    exits = {
        label: sorted({int(e) for e in np.asarray(session.run(None, feed)[1]).reshape(-1)})
        for label, feed in feeds.items()
    }
    runs_of: dict[str, tuple[Path, dict[str, np.ndarray]]] = {
        label: (Path(onnx_path), feed) for label, feed in feeds.items()
    }
    runs_of[STATIC] = (static_path, dict(xn))
    for label, i, _ in prefixes:
        path = write_plain_onnx(
            StaticPrefix(dyn, i), x, folder / f"prefix{i}.onnx", output_name="feature"
        )
        runs_of[_prefix_label(label)] = (path, dict(xn))
    return runs_of, exits


def bench(
    dyn: DynamicModel,
    *,
    runtime: Runtime = "eager",
    batch: int = 1,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    cases: Sequence[tuple[str, list[float]]] | None = None,
    onnx_path: str | Path | None = None,
    seed: int = 0,
    channels_last: bool = False,
    prefixes: bool = False,
    consecutive: int = 1,
) -> BenchResult:
    """Median latency per forced behaviour and of the static network, with their MACs.

    `runtime` "eager" times the DynamicModel in PyTorch; "onnx" exports it (or uses
    `onnx_path`) and the static network to ONNX and times ONNX Runtime on the CPU. `threads`
    (default: torch.get_num_threads()) sets PyTorch's or ORT's intra-op threads. The input is
    random (seeded): the forced thresholds fix the path, so timing does not depend on it.
    `channels_last` (eager, 4-D inputs) runs model and input in channels-last memory format,
    static and dynamic alike: oneDNN's fast layout on CPU, which keeps the early, wide layers
    as fast per MAC as the later ones (in NCHW they are markedly slower per MAC).
    `prefixes` (exit cascades) also times the static network cut at each exit (`StaticPrefix`)
    and fills each exit row's `prefix_ms`, `prefix_ratio_to_macs` and `exit_overhead`.
    `consecutive` > 1 times runs of that many calls per configuration and round (see the
    module's docstring); `runs` counts rounds either way.
    """
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    if onnx_path is not None:
        check_onnx_file(onnx_path)
    if batch < 1 or runs < 1 or warmup < 0 or consecutive < 1:
        raise ExportError("batch, runs and consecutive must be >= 1 and warmup >= 0")
    threads = int(threads or torch.get_num_threads())
    cases = list(cases) if cases is not None else threshold_cases(dyn)
    labels = {label for label, _ in cases}
    cuts = [c for c in prefix_cases(dyn) if c[0] in labels] if prefixes else []
    x = dyn.random_input(batch, torch.Generator().manual_seed(seed))
    channels_last = channels_last and runtime == "eager" and input_tensors(x)[0].dim() == 4
    if channels_last:
        dyn.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dyn.eval()
    saved_thresholds = dyn.thresholds.detach().clone()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        macs = {label: _eager_macs(dyn, x, thr) for label, thr in cases}
        with tempfile.TemporaryDirectory(prefix="dynify_bench_") as tmp:
            if runtime == "eager":
                runners = _eager_runners(dyn, x, cases, cuts)
                exits = {label: m[1] for label, m in macs.items()}
                with torch.inference_mode():
                    times = time_interleaved(runners, runs, warmup, consecutive)
            else:
                path = None if onnx_path is None else Path(onnx_path)
                runs_of, exits = _onnx_runs(dyn, x, cases, Path(tmp), path, cuts)
                for label, _ in cases:
                    if macs[label][1] and exits[label] != macs[label][1]:
                        raise ExportError(
                            f"ONNX Runtime took exits {exits[label]} at '{label}' where eager "
                            f"took {macs[label][1]}; the export does not match the model"
                        )
                times = time_onnx(
                    runs_of, threads=threads, runs=runs, warmup=warmup,
                    consecutive=consecutive, folder=tmp,
                )  # fmt: skip
    finally:
        dyn.thresholds.copy_(saved_thresholds)
        torch.set_num_threads(saved_threads)
        if channels_last:
            dyn.to(memory_format=torch.contiguous_format)
    static_s = statistics.median(times[STATIC])
    rows = []
    for label, thr in [*cases, (STATIC, None)]:
        median = statistics.median(times[label])
        fraction = 1.0 if thr is None else macs[label][0]
        ratio = median / static_s
        rows.append(
            BenchRow(
                label=label,
                thresholds=thr,
                macs_fraction=fraction,
                latency_ms=median * 1e3,
                latency_ratio=ratio,
                ratio_to_macs=ratio / fraction if fraction > 0 else float("inf"),
                exits=[] if thr is None else exits[label],
            )
        )
    for label, _, fraction in cuts:
        row = next(r for r in rows if r.label == label)
        prefix_s = statistics.median(times[_prefix_label(label)])
        row.prefix_ms = prefix_s * 1e3
        row.prefix_ratio_to_macs = prefix_s / static_s / fraction
        row.exit_overhead = row.latency_ms / row.prefix_ms
    return BenchResult(
        runtime=runtime,
        batch=batch,
        threads=threads,
        runs=runs,
        warmup=warmup,
        static_macs=dyn.static_macs,
        rows=rows,
        channels_last=channels_last,
        consecutive=max(1, consecutive),
    )


def check_onnx_file(path: str | Path) -> Path:
    """Refuse a file that is not an ONNX model before anything is timed or exported."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"There is no ONNX file at {path}.")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InputError(
            f"{path} is not an ONNX model ({type(exc).__name__}: {str(exc)[:200]}). Give a file "
            "written by `dynify export --format onnx`."
        ) from None
    if not model.graph.input:
        raise InputError(f"{path} is an ONNX model without inputs; give one `dynify export` wrote.")
    return path
