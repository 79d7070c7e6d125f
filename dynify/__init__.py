"""dynify: turn a trained static PyTorch network into a dynamic one.

dyn = dynify.convert(model, "early-exit", torch.randn(1, 3, 224, 224),
                     options=dynify.EarlyExitOptions(exits=4))
with dyn.static():
    assert torch.equal(dyn(x), model(x))   # the original network, exactly
dynify.finetune(dyn, "train/", dynify.FinetuneConfig(epochs=5))
dynify.calibrate(dyn, "train/", budget=0.5)  # on the part fine-tuning held out
dynify.save(dyn, "model.dyn"); dyn = dynify.load("model.dyn")

Everything the command line does goes through the names below; nothing else is public.
"""

from dynify.api import (
    StrategyInfo,
    exit_scores,
    preprocessing,
    save_json,
    strategies,
)
from dynify.convert import convert
from dynify.errors import DynifyError
from dynify.evaluate import EvaluationReport, check_plot_path, evaluate
from dynify.export import export_onnx, export_onnx_report, export_pt2, export_pt2_report
from dynify.export.artifact import load, save
from dynify.export.bench import BenchResult, bench, check_onnx_file, settle_batch_norm
from dynify.export.mask_bench import MaskedBlockBench, MaskedBlockRow, bench_masked_blocks
from dynify.export.timing import time_interleaved
from dynify.export.verify import PARITY_ATOL, ParityReport
from dynify.files import atomic_output, write_text_atomic
from dynify.inspect import ModelSummary, inspect
from dynify.models.text import TextClassifier
from dynify.options import (
    BlockGateOptions,
    DynamicConvOptions,
    DynamicWidthOptions,
    EarlyExitOptions,
    FinetuneConfig,
    FrameExitOptions,
    ResolutionOptions,
    SkipRNNOptions,
    SpatialMaskOptions,
    StopReadingOptions,
    StrategyOptions,
)
from dynify.passes import register_strategy, strategy_names
from dynify.runtime.block_gates import GatedBlock
from dynify.runtime.budget_guard import BudgetGuard
from dynify.runtime.dynamic_width import BranchWidths
from dynify.runtime.forced_masks import force_mask_density
from dynify.runtime.mac_cap import CostBound, cost_bound
from dynify.runtime.model import (
    CostItem,
    DecisionScalars,
    DynamicModel,
    ExitCascade,
    GatedExits,
    MacCapped,
    PerSampleExits,
    TrainingRecord,
)
from dynify.runtime.stop_reading import tokens_read
from dynify.train.baseline import finetune_static
from dynify.train.batches import Preprocessing
from dynify.train.calibrate import calibrate
from dynify.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TextDataset,
    Vocabulary,
    cached_tensor_dataset,
    load_dataset,
    load_text_dataset,
    normalize_batch,
    split_dataset,
    tokenize,
)
from dynify.train.data.loading import TEXT_SUFFIXES
from dynify.train.data.text import read_labels
from dynify.train.distill import FinetuneResult, finetune
from dynify.train.operating_point import OperatingPoint, choose_operating_point, operating_points
from dynify.train.targets import CalibrationResult
from dynify.train.transfer import copy_new_parts, new_parameters, use_operating_point
from dynify.zoo import build_model

__version__ = "0.1.0"

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PARITY_ATOL",
    "TEXT_SUFFIXES",
    "BenchResult",
    "BlockGateOptions",
    "BranchWidths",
    "BudgetGuard",
    "CalibrationResult",
    "CostBound",
    "CostItem",
    "DecisionScalars",
    "DynamicConvOptions",
    "DynamicModel",
    "DynamicWidthOptions",
    "DynifyError",
    "EarlyExitOptions",
    "EvaluationReport",
    "ExitCascade",
    "FinetuneConfig",
    "FinetuneResult",
    "FrameExitOptions",
    "GatedBlock",
    "GatedExits",
    "MacCapped",
    "MaskedBlockBench",
    "MaskedBlockRow",
    "ModelSummary",
    "OperatingPoint",
    "ParityReport",
    "PerSampleExits",
    "Preprocessing",
    "ResolutionOptions",
    "SkipRNNOptions",
    "SpatialMaskOptions",
    "StopReadingOptions",
    "StrategyInfo",
    "StrategyOptions",
    "TextClassifier",
    "TextDataset",
    "TrainingRecord",
    "Vocabulary",
    "atomic_output",
    "bench",
    "bench_masked_blocks",
    "build_model",
    "cached_tensor_dataset",
    "calibrate",
    "check_onnx_file",
    "check_plot_path",
    "choose_operating_point",
    "convert",
    "copy_new_parts",
    "cost_bound",
    "evaluate",
    "exit_scores",
    "export_onnx",
    "export_onnx_report",
    "export_pt2",
    "export_pt2_report",
    "finetune",
    "finetune_static",
    "force_mask_density",
    "inspect",
    "load",
    "load_dataset",
    "load_text_dataset",
    "new_parameters",
    "normalize_batch",
    "operating_points",
    "preprocessing",
    "read_labels",
    "register_strategy",
    "save",
    "save_json",
    "settle_batch_norm",
    "split_dataset",
    "strategies",
    "strategy_names",
    "time_interleaved",
    "tokenize",
    "tokens_read",
    "use_operating_point",
    "write_text_atomic",
]
