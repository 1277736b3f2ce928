"""Immutable descriptions of a spiking layer's dynamics.

A :class:`LifSpec` holds everything about a leaky integrate-and-fire layer that is fixed at
compile time: reset rule, whether the reset is in the autograd graph, surrogate, synaptic current
(current-based LIF, "CuBa"), recurrence, backward mode and window. The per-neuron numbers (β, θ,
α) are tensors passed next to it, so one spec serves layers of any size. The compiler records one
spec per fused layer, the kernels are cached per spec, and the reference implements every spec.

Dynamics, for batch b, step t, neuron j (``I`` the input current, ``V`` the recurrent weight)::

    cur[t] = I[t] + V s[t-1]                      (recurrent only)
    syn[t] = α syn[t-1] + cur[t]                  (CuBa only; otherwise syn[t] = cur[t])
    v[t]   = β v[t-1] + syn[t] - θ s[t-1]         reset="subtract"
    v[t]   = β v[t-1] (1 - s[t-1]) + syn[t]       reset="zero"
    v[t]   = β v[t-1] + syn[t]                    reset="none"
    s[t]   = H(v[t] - θ)                          (H(0) = 1 only if fire_at_threshold)

with ``s[-1] = H(v[-1] - θ)`` computed from the initial membrane, so a sequence can be run in
chunks by passing the final ``(v, syn)`` of one chunk as the initial state of the next.

Example::

    >>> LifSpec(reset="zero", cuba=True).kind
    'cuba_lif'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from snnopt import surrogate as surrogate_lib
from snnopt.errors import InvalidArgumentError, InvalidTypeError

RESET_MODES = ("subtract", "zero", "none")
BACKWARD_MODES = ("sparse", "exact")


@dataclass(frozen=True)
class LifSpec:
    """Static description of a LIF / CuBa-LIF layer (see module docstring for the equations).

    ``backward="sparse"`` is the seed paper's method: the surrogate is zero outside
    ``|v - θ| < window`` and the reset is detached, whatever ``detach_reset`` says.
    """

    reset: str = "subtract"
    detach_reset: bool = True
    surrogate: surrogate_lib.Surrogate = field(default_factory=surrogate_lib.superspike)
    cuba: bool = False
    recurrent: bool = False
    fire_at_threshold: bool = False
    backward: str = "sparse"
    window: float = 0.2

    def __post_init__(self) -> None:
        if self.reset not in RESET_MODES:
            raise InvalidArgumentError(f"reset: expected one of {RESET_MODES}, got {self.reset!r}")
        if self.backward not in BACKWARD_MODES:
            raise InvalidArgumentError(f"backward: expected one of {BACKWARD_MODES}, got {self.backward!r}")
        if not isinstance(self.surrogate, surrogate_lib.Surrogate):
            raise InvalidTypeError("surrogate: expected a snnopt.surrogate.Surrogate; use surrogate.get(...)")
        for name in ("detach_reset", "cuba", "recurrent", "fire_at_threshold"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidTypeError(f"{name}: expected a bool, got {type(getattr(self, name)).__name__}")
        if isinstance(self.window, bool) or not isinstance(self.window, (int, float)):
            raise InvalidTypeError(f"window: expected a float, got {type(self.window).__name__}")
        if not (self.window >= 0 and math.isfinite(self.window)):
            raise InvalidArgumentError(f"window: expected a finite number >= 0, got {self.window!r}")
        object.__setattr__(self, "window", float(self.window))

    @property
    def kind(self) -> str:
        return "cuba_lif" if self.cuba else "lif"

    @property
    def sparse(self) -> bool:
        return self.backward == "sparse"

    @property
    def reset_in_graph(self) -> bool:
        """Whether the reset term carries gradient (never in sparse mode)."""
        return not self.detach_reset and not self.sparse

    def describe(self) -> str:
        parts = [self.kind + (" recurrent" if self.recurrent else ""), f"reset={self.reset}"
                 + ("" if self.reset == "none" else (" detached" if self.detach_reset else " attached")),
                 f"surrogate={self.surrogate}", f"backward={self.backward}"]
        if self.sparse:
            parts.append(f"window={self.window:g}")
        return ", ".join(parts)
