"""Surrogate gradients of the Heaviside spike function.

The forward pass of every spiking neuron is a step ``s = H(v - θ)``; training replaces its
derivative by a smooth ``σ'(u)`` with ``u = v - θ``. A :class:`Surrogate` names the family and its
parameter; it is a frozen value so it can sit inside a :class:`snnopt.spec.LifSpec`, be hashed into
kernel cache keys and be compared by the compiler when it recognises a user's spike function.

Families (``k`` is the parameter):

==============  ==========================================  ========  ==========================
name            σ'(u)                                       default   also known as
==============  ==========================================  ========  ==========================
superspike      1 / (k|u| + 1)²                             100       fast_sigmoid (snnTorch: 25)
sigmoid         k · sig(ku) · (1 - sig(ku))                 4         SpikingJelly Sigmoid
atan            (k/2) / (1 + (π/2 · k · u)²)                2         snnTorch / SpikingJelly ATan
triangle        max(0, 1 - |u|/k) / k                        1         piecewise linear
rectangular     1{|u| < k/2} / k                             1         boxcar
==============  ==========================================  ========  ==========================

Example::

    >>> from snnopt import surrogate
    >>> surrogate.get("atan").param
    2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from snnopt.errors import InvalidArgumentError, InvalidTypeError

# The integer codes are what the compiled kernels switch on; never renumber them.
SURROGATE_CODES = {"superspike": 0, "sigmoid": 1, "atan": 2, "triangle": 3, "rectangular": 4}
DEFAULT_PARAMS = {"superspike": 100.0, "sigmoid": 4.0, "atan": 2.0, "triangle": 1.0, "rectangular": 1.0}
ALIASES = {"fast_sigmoid": "superspike", "boxcar": "rectangular", "triangular": "triangle", "arctan": "atan"}


@dataclass(frozen=True)
class Surrogate:
    """A surrogate-gradient family with its parameter, e.g. ``Surrogate("superspike", 100.0)``."""

    name: str
    param: float

    def __post_init__(self) -> None:
        if self.name not in SURROGATE_CODES:
            raise InvalidArgumentError(
                f"surrogate: unknown family {self.name!r}; expected one of {sorted(SURROGATE_CODES)}"
            )
        if not (isinstance(self.param, (int, float)) and math.isfinite(self.param) and self.param > 0):
            raise InvalidArgumentError(
                f"surrogate: parameter of {self.name!r} must be a positive finite number, got {self.param!r}"
            )
        object.__setattr__(self, "param", float(self.param))

    @property
    def code(self) -> int:
        return SURROGATE_CODES[self.name]

    def derivative(self, u: torch.Tensor) -> torch.Tensor:
        """σ'(u), elementwise, in the dtype of ``u``."""
        k = self.param
        if self.name == "superspike":
            return 1.0 / (k * u.abs() + 1.0) ** 2
        if self.name == "sigmoid":
            sig = torch.sigmoid(k * u)
            return k * sig * (1.0 - sig)
        if self.name == "atan":
            return (k / 2.0) / (1.0 + (math.pi / 2.0 * k * u) ** 2)
        if self.name == "triangle":
            return torch.clamp(1.0 - u.abs() / k, min=0.0) / k
        return (u.abs() < k / 2.0).to(u.dtype) / k

    def __str__(self) -> str:
        return f"{self.name}({self.param:g})"


def superspike(slope: float = 100.0) -> Surrogate:
    """SuperSpike / fast sigmoid, σ'(u) = 1/(slope·|u|+1)², the seed paper's choice."""
    return Surrogate("superspike", slope)


fast_sigmoid = superspike


def sigmoid(slope: float = 4.0) -> Surrogate:
    """Derivative of a logistic of the given slope."""
    return Surrogate("sigmoid", slope)


def atan(alpha: float = 2.0) -> Surrogate:
    """Derivative of (1/π)·arctan(π/2·alpha·u) + 1/2 (snnTorch's and SpikingJelly's ATan)."""
    return Surrogate("atan", alpha)


def triangle(width: float = 1.0) -> Surrogate:
    """Piecewise-linear bump of half-width ``width`` and unit area."""
    return Surrogate("triangle", width)


def rectangular(width: float = 1.0) -> Surrogate:
    """Box of total width ``width`` and unit area."""
    return Surrogate("rectangular", width)


def get(surrogate: "Surrogate | str | None" = None) -> Surrogate:
    """Normalise a user's ``surrogate=`` argument: a :class:`Surrogate`, a family name, or None.

    A name takes the family's default parameter; ``"name:param"`` sets it (``"atan:4"``).
    """
    if surrogate is None:
        return superspike()
    if isinstance(surrogate, Surrogate):
        return surrogate
    if isinstance(surrogate, str):
        name, _, param = surrogate.partition(":")
        name = ALIASES.get(name.strip().lower(), name.strip().lower())
        if name not in SURROGATE_CODES:
            raise InvalidArgumentError(
                f"surrogate: unknown family {surrogate!r}; expected one of "
                f"{sorted(SURROGATE_CODES) + sorted(ALIASES)} or a snnopt.surrogate.Surrogate"
            )
        try:
            value = float(param) if param else DEFAULT_PARAMS[name]
        except ValueError:
            raise InvalidArgumentError(f"surrogate: cannot read the parameter in {surrogate!r}") from None
        return Surrogate(name, value)
    raise InvalidTypeError(
        f"surrogate: expected a snnopt.surrogate.Surrogate or a family name, got {type(surrogate).__name__}"
    )


class _SpikeFunction(torch.autograd.Function):
    # Used by the readable reference only; emitted graphs use the fused custom ops instead.
    @staticmethod
    def forward(ctx, u, surrogate, window, fire_at_threshold):
        ctx.save_for_backward(u)
        ctx.surrogate = surrogate
        ctx.window = window
        return (u >= 0).to(u.dtype) if fire_at_threshold else (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_spikes):
        (u,) = ctx.saved_tensors
        slope = ctx.surrogate.derivative(u)
        if ctx.window is not None:
            slope = slope * (u.abs() < ctx.window).to(u.dtype)
        return grad_spikes * slope, None, None, None


def spike(u: torch.Tensor, surrogate: Surrogate, window: float | None = None,
          fire_at_threshold: bool = False) -> torch.Tensor:
    """Heaviside step of ``u`` with the surrogate gradient; ``window`` zeroes it where |u| ≥ window."""
    return _SpikeFunction.apply(u, surrogate, window, fire_at_threshold)
