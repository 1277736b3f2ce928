"""Recognise the user's surrogate spike functions by probing them.

Matches: every graph node that applies a ``torch.autograd.Function`` (kept whole by the tracer).
Produces: ``node.meta["spike"]`` = :class:`SpikeFunction` (surrogate family and parameter, the
step's location ``shift`` when the threshold is inside the function, whether ``H(0) = 1``) or
``node.meta["spike_refusal"]`` = the reason it is not a spike function snnopt can fuse.

How: the forward is run on a fine grid and must be a Heaviside step (0 below one point, 1 above);
the step's exact location is found by bisection. The backward (with a unit incoming gradient) is
fitted to each family of :mod:`snnopt.surrogate`: the parameter follows from one sample (σ'(0) or
σ'(½)), then the whole curve must agree to float32 precision. A function that is not a step, or
whose backward fits no family, is left as the user wrote it, and the reason says which.

A model with no spike function at all but bare comparisons of time-varying values (``(v > θ)
.float()``: spikes without a surrogate, through which no gradient flows) gets a reason saying so
at those comparisons, since the recurrence passes can only report that the loop is not theirs.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from snnopt import surrogate as surrogate_lib
from snnopt.passes import regions as R
from snnopt.passes.trace import autograd_function_of

_GRID = torch.linspace(-3.0, 3.0, 6001, dtype=torch.float64)
_FIT_RTOL = 2e-4


@dataclass(frozen=True)
class SpikeFunction:
    """A recognised spike function: ``H(u - shift)`` forward, ``surrogate`` backward."""

    surrogate: surrogate_lib.Surrogate
    shift: float
    fire_at_threshold: bool
    name: str


def _apply(function_class, u: torch.Tensor, extra_args: tuple) -> torch.Tensor:
    return function_class.apply(u, *extra_args)


def _step_location(function_class, extra_args) -> tuple[Optional[float], bool, str]:
    u = _GRID.to(torch.float32)
    with torch.no_grad():
        out = _apply(function_class, u, extra_args).to(torch.float64)
    if out.shape != u.shape or not torch.all((out == 0) | (out == 1)):
        return None, False, "its forward is not a 0/1 step"
    ones = torch.nonzero(out == 1).flatten()
    if ones.numel() == 0 or ones.numel() == out.numel():
        return None, False, "its forward never switches between 0 and 1 on [-3, 3]"
    first = int(ones[0])
    if not torch.all(out[first:] == 1):
        return None, False, "its forward is not a single step from 0 to 1"
    low, high = float(u[first - 1]), float(u[first])
    with torch.no_grad():
        def fires(value: float) -> bool:
            return float(_apply(function_class, torch.tensor([value], dtype=torch.float32), extra_args)[0]) == 1
        for _ in range(40):  # bisection to ~1e-12 of the grid spacing
            middle = (low + high) / 2
            if fires(middle):
                high = middle
            else:
                low = middle
        # The user's constant is a "round" number near the switch: H(u - c) with H(0) = 1 fires
        # exactly at c, with H(0) = 0 just above it.
        shift = round(high, 6) + 0.0
        at_threshold = fires(shift)
        above = float(torch.nextafter(torch.tensor(shift, dtype=torch.float32), torch.tensor(math.inf)))
        below = float(torch.nextafter(torch.tensor(shift, dtype=torch.float32), torch.tensor(-math.inf)))
        if fires(below) or not fires(above):
            return None, False, f"its step near {shift:g} is not at a round threshold"
    return shift, at_threshold, ""


def _surrogate_candidates(slope_at: dict) -> list[surrogate_lib.Surrogate]:
    g0, g_half = slope_at[0.0], slope_at[0.5]
    candidates = []
    if g_half > 0:
        candidates.append(("superspike", (1.0 / math.sqrt(g_half) - 1.0) / 0.5))
    if g0 > 0:
        candidates += [("sigmoid", 4.0 * g0), ("atan", 2.0 * g0), ("triangle", 1.0 / g0), ("rectangular", 1.0 / g0)]
    result = []
    for name, param in candidates:
        if param > 0 and math.isfinite(param):
            result.append(surrogate_lib.Surrogate(name, float(f"{param:.6g}")))
    return result


def probe_spike_function(function_class, extra_args: tuple = ()) -> tuple[Optional[SpikeFunction], str]:
    """Fit ``function_class`` to a step + surrogate family; returns (SpikeFunction, "") or (None, reason)."""
    name = function_class.__qualname__
    try:
        shift, at_threshold, why = _step_location(function_class, extra_args)
    except Exception as error:  # the user's function does not run on a probe tensor
        return None, f"spike function {name} could not be probed: {type(error).__name__}: {error}"
    if shift is None:
        return None, f"{name} is not a spike function: {why}"
    u = (_GRID + shift).to(torch.float32).requires_grad_(True)
    try:
        out = _apply(function_class, u, extra_args)
        (slope,) = torch.autograd.grad(out.sum(), u)
    except Exception as error:
        return None, f"the backward of spike function {name} could not be probed: {type(error).__name__}: {error}"
    slope = slope.to(torch.float64)
    offsets = _GRID
    slope_at = {x: float(slope[int(torch.argmin((offsets - x).abs()))]) for x in (0.0, 0.5)}
    scale = float(slope.abs().max()) or 1.0
    for candidate in _surrogate_candidates(slope_at):
        expected = candidate.derivative(offsets)
        mismatch = (expected - slope).abs() > _FIT_RTOL * scale + 1e-7
        # Box and triangle edges may fall either side of a grid point in float32.
        allowed = 2 if candidate.name in ("rectangular", "triangle") else 0
        if int(mismatch.sum()) <= allowed:
            return SpikeFunction(candidate, shift, at_threshold, name), ""
    return None, (f"unknown surrogate: the backward of {name} fits none of the families "
                  f"{sorted(surrogate_lib.SURROGATE_CODES)}; it is kept as written")


class RecogniseSpikeFunctions:
    """Pass: annotate every autograd-Function node with what it is (see module docstring)."""

    name = "recognise_spike_functions"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        cache: dict = {}
        found = 0
        for node in gm.graph.nodes:
            function_class = autograd_function_of(node)
            if function_class is None:
                continue
            extra = tuple(node.args[1:])
            if any(isinstance(a, fx.Node) for a in extra) or node.kwargs:
                node.meta["spike_refusal"] = (f"{function_class.__qualname__} takes tensor or keyword arguments "
                                              f"besides the membrane; kept as written")
                continue
            key = (function_class, extra)
            if key not in cache:
                cache[key] = probe_spike_function(function_class, extra)
            info, reason = cache[key]
            if info is None:
                node.meta["spike_refusal"] = reason
            else:
                node.meta["spike"] = info
                found += 1
        context.log(self.name, f"{found} spike-function calls recognised")
        if not found and not any("spike_refusal" in node.meta for node in gm.graph.nodes):
            for node in _recurrent_bare_thresholds(gm):
                context.skip(node, BARE_THRESHOLD_REASON.format(op=_op_name(node)))
        return False


BARE_THRESHOLD_REASON = (
    "no spike function with a surrogate gradient in the model, and a bare comparison ({op}) of a time-varying "
    "value: spikes written as (v > θ).float() pass no gradient, so there is no spiking backward to fuse; write "
    "the spike as a torch.autograd.Function with a surrogate backward (snnopt.surrogate, snnTorch and "
    "SpikingJelly provide them) to have the layer fused")

_COMPARISONS = (operator.gt, operator.ge, operator.lt, operator.le, torch.gt, torch.ge, torch.lt, torch.le,
                torch.greater, torch.greater_equal, torch.less, torch.less_equal, torch.heaviside,
                "gt", "ge", "lt", "le", "greater", "greater_equal", "less", "less_equal", "heaviside")


def _recurrent_bare_thresholds(gm: fx.GraphModule) -> list:
    """Comparisons of a value that a later comparison's value depends on: a threshold inside a time loop.

    (A comparison elsewhere, in a readout or a mask, is not reported: only a chain through time.)
    """
    dependent = R.placeholder_dependent(gm)
    candidates = [node for node in gm.graph.nodes if _bare_threshold(node, dependent)]
    chained = []
    for earlier, later in zip(candidates, candidates[1:]):
        if R.depends_on(later.args[0], earlier.args[0], dependent):
            chained += [n for n in (earlier, later) if not chained or chained[-1] is not n]
    return chained


def _bare_threshold(node: fx.Node, dependent: set) -> bool:
    """A comparison whose left operand is a time-varying floating-point (batch, neurons…) tensor."""
    if not R.is_call(node, *_COMPARISONS):
        return False
    operand = node.args[0] if node.args else None
    value = operand.meta.get("value") if isinstance(operand, fx.Node) else None
    return (operand in dependent and isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.dim() >= 2)


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
