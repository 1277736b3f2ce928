"""snnopt: a compiler for spiking neural networks in PyTorch.

This release provides the fused spiking-layer ops (``snnopt.functional``, ``snnopt.nn``) with the
sparse spiking gradient of Perez-Nieves & Goodman (NeurIPS 2021) on CPU.
"""

from snnopt import functional, nn, surrogate
from snnopt.errors import InvalidArgumentError, InvalidTypeError, SnnoptError
from snnopt.spec import LifSpec

__version__ = "0.1.0"

__all__ = ["functional", "nn", "surrogate", "LifSpec", "SnnoptError", "InvalidArgumentError", "InvalidTypeError",
           "__version__"]
