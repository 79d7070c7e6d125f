"""Front end: trace a model, write shapes and MACs onto its nodes, analyse its graph."""

from dynify.frontend.analysis import GraphAnalysis, analyse
from dynify.frontend.cost import profile
from dynify.frontend.trace import TraceOptions, symbolic_trace

__all__ = ["GraphAnalysis", "TraceOptions", "analyse", "profile", "symbolic_trace"]
