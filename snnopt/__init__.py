"""snnopt: a compiler for spiking neural networks in PyTorch.

``snnopt.optimize(model, example_inputs)`` traces a user's SNN, fuses its leaky integrate-and-fire
recurrences into custom ops with the sparse spiking gradient of Perez-Nieves & Goodman (NeurIPS
2021) and returns an optimized module; ``snnopt.explain`` says what was fused and what was left
alone. The fused layers are also usable directly (``snnopt.functional``, ``snnopt.nn``).
"""

from snnopt import functional, nn, surrogate
from snnopt.compiler import explain, optimize
from snnopt.errors import (InvalidArgumentError, InvalidTypeError, ModelTraceError, SnnoptError,
                           UnsupportedModelError)
from snnopt.export import export_onnx
from snnopt.graphs import GraphedModel, capture_graphs
from snnopt.report import Report
from snnopt.spec import LifSpec

__version__ = "0.1.0"

__all__ = ["optimize", "explain", "export_onnx", "capture_graphs", "GraphedModel", "Report", "functional", "nn",
           "surrogate", "LifSpec", "SnnoptError", "InvalidArgumentError", "InvalidTypeError", "UnsupportedModelError", "ModelTraceError", "__version__"]
