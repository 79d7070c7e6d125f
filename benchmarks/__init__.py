"""dynify's benchmark suite: thin scripts over the public API, results with their metadata,
reports rendered from the results.

    python -m benchmarks --list              # every suite and the report it writes
    python -m benchmarks NAME [options]      # run one suite; results/NAME*.json, then its report
    python -m benchmarks NAME --quick        # a tiny end-to-end run (results to a temp folder)
    python -m benchmarks render [NAME ...]   # rewrite the reports from results/

A suite is a module of this package with `add_arguments(parser)`, `apply_quick(args)`,
`run(args) -> {result name: figures}` and `render() -> markdown`; it is registered in `SUITES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Suite:
    """A registered suite: its module, the report it renders and what it measures."""

    name: str
    report: str
    measures: str

    @property
    def report_path(self) -> Path:
        return HERE / self.report

    def module(self) -> ModuleType:
        return importlib.import_module(f"benchmarks.{self.name}")


SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        Suite(
            "convert_all",
            "convert_all.md",
            "every torchvision classification model (and the CIFAR ResNets, a sample of timm) "
            "converts with early exits; static mode equals the original",
        ),
        Suite(
            "latency",
            "latency.md",
            "batch-1 latency at each forced early exit against its MAC share, eager PyTorch "
            "and ONNX Runtime",
        ),
        Suite(
            "cifar10",
            "cifar10.md",
            "early exits on pretrained CIFAR ResNets: accuracy vs MACs on JPEG CIFAR-10, "
            "against the static network fine-tuned as long",
        ),
        Suite(
            "block_gates",
            "block_gates.md",
            "block gates (function, halting, policy) on CIFAR ResNet-32/44: accuracy, MACs "
            "and batch-1 latency at a calibrated operating point",
        ),
        Suite(
            "spatial",
            "spatial.md",
            "spatial masks: masked-block latency at fixed densities; the resolution cascade "
            "and pixel masks trained and calibrated on CIFAR-10",
        ),
        Suite(
            "slowdown",
            "slowdown.md",
            "slowdown attacks (DeepSloth-style PGD on the exit scores, gate and mask "
            "probabilities) on CIFAR ResNet-20 early exits, block gates and spatial masks: mean "
            "MACs, share at the worst case and accuracy, with and without BudgetGuard and the "
            "MAC cap",
        ),
        Suite(
            "text_baseline",
            "text_baseline.md",
            "the static LSTM text classifiers the temporal strategies start from, trained from "
            "scratch on AG News and SST-2: development test accuracy (weights cached)",
        ),
        Suite(
            "dynamic_width",
            "dynamic_width.md",
            "dynamic width on the pretrained CIFAR ResNet-44: accuracy vs MACs, the widths each "
            "image runs, batch-1 latency against the MAC fall",
        ),
        Suite(
            "frame_exit",
            "frame_exit.md",
            "frame-exit on synthetic 8-frame clips of CIFAR-10 images, pretrained CIFAR "
            "ResNet-44 per frame: accuracy vs MACs and batch-1 latency against the MAC ratio",
        ),
        Suite(
            "stop_reading",
            "stop_reading.md",
            "stop-reading on the static LSTM text classifiers (AG News, SST-2): tokens read "
            "against accuracy, a calibrated operating point, batch-1 wall-clock vs static",
        ),
        Suite(
            "skip_rnn",
            "skip_rnn.md",
            "skip-rnn on AG News: accuracy vs share of state updates (gate fine-tuned, threshold "
            "calibrated on held-out training rows), batch-32 wall clock against the static LSTM",
        ),
        Suite(
            "dynamic_conv",
            "dynamic_conv.md",
            "dynamic convolutions on CIFAR ResNet-20 fine-tuned N epochs against the static "
            "ResNet-20 and ResNet-32 fine-tuned as long: accuracy, MACs, batch-1 and batch-64 "
            "latency, how much the routers route",
        ),
    ]
}
