"""dynify: turn a trained static PyTorch network into a dynamic one.

dyn = dynify.convert(model, strategy="early-exit", example_input=torch.randn(1, 3, 224, 224))
with dyn.static():
    assert torch.equal(dyn(x), model(x))   # the original network, exactly
dynify.save(dyn, "model.dyn"); dyn = dynify.load("model.dyn")
"""

from dynify.convert import convert
from dynify.errors import DynifyError
from dynify.export import export_onnx, export_pt2
from dynify.export.artifact import load, save
from dynify.passes import strategy_names
from dynify.report import evaluate
from dynify.runtime.model import DynamicModel
from dynify.train.baseline import finetune_static
from dynify.train.calibrate import calibrate
from dynify.train.distill import finetune
from dynify.train.operating_point import OperatingPoint, choose_operating_point, operating_points
from dynify.zoo import build_model

__version__ = "0.1.0"

__all__ = [
    "DynamicModel",
    "DynifyError",
    "OperatingPoint",
    "build_model",
    "calibrate",
    "choose_operating_point",
    "convert",
    "evaluate",
    "export_onnx",
    "export_pt2",
    "finetune",
    "finetune_static",
    "load",
    "operating_points",
    "save",
    "strategy_names",
]
