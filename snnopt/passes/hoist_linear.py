"""Find where each matched layer's per-step current comes from, so it can be one batched op.

Matches, for the currents ``I[0..T-1]`` of a layer (after peeling a constant factor ``c·…``, which
becomes the layer's input scale):

* per-step slices of one tensor: ``X[:, t]`` / ``X[:, t, :]`` (batch-first), ``X[t]`` (time-first),
  or the items of ``X.unbind(dim)``: the layer reads ``X`` whole;
* one linear map applied per step — the same ``nn.Linear`` module, ``F.linear(y, W, b)``, or
  ``y @ W`` / ``torch.matmul(y, W)`` with a constant 2-D ``W`` — of such slices (or of any per-step
  tensors, which are then stacked);
* a linear map hoisted by the user and sliced per step: ``nn.Linear`` on the whole sequence, or
  ``einsum("bti,oi->bto", X, W)`` / ``einsum("bti,io->bto", X, W)``.

Produces ``match.input = LayerInput(x, weight, bias, time_dim)`` (``weight`` None when the layer
gets a precomputed current): the fused call then is ``linear_lif(x, W, b)``, which builds the
current from the input's events when the input is spikes. Leaves ``match.input`` None when none of
the forms fits (the fused call then gets ``torch.stack(I, dim=1)``). Refuses nothing.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from snnopt.passes import regions as R


@dataclass
class LayerInput:
    x: Any                 # a node, or a list of per-step nodes to stack
    weight: Any = None     # node (linear layout: out × in), or ("t", node) for a transposed weight
    bias: Any = None
    time_dim: int = 1


def _peel_scale(node, dependent):
    """``c * y`` / ``y * c`` / ``y / c`` with constant scalar ``c`` → (y, c); else (node, 1)."""
    if isinstance(node, fx.Node) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if R.is_call(node, *R.MULTIPLY):
            for value, other in ((a, b), (b, a)):
                c = R.constant_value(value, dependent)
                if isinstance(c, (int, float)) and isinstance(other, fx.Node):
                    return other, float(c)
                if isinstance(c, torch.Tensor) and c.numel() == 1 and isinstance(other, fx.Node):
                    return other, float(c)
        if R.is_call(node, operator.truediv, torch.div, "div"):
            c = R.constant_value(b, dependent)
            if isinstance(c, (int, float)) and c != 0 and isinstance(a, fx.Node):
                return a, 1.0 / float(c)
    return node, 1.0


def _step_slice(node) -> Optional[tuple]:
    """(source, time_dim, t) for ``X[:, t]``, ``X[:, t, :]``, ``X[t]``, ``X.unbind(d)[t]``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    source, index = node.args
    if isinstance(source, fx.Node) and R.is_call(source, torch.unbind, "unbind"):
        dim = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0)
        if isinstance(index, int) and dim in (0, 1):
            return source.args[0], dim, index
        return None
    if isinstance(index, int):
        return source, 0, index
    if isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and isinstance(index[1], int) \
            and all(i == slice(None) for i in index[2:]):
        return source, 1, index[1]
    return None


def _whole_sequence(nodes, steps) -> Optional[tuple]:
    """(X, time_dim) when ``nodes`` are exactly the slices t = 0..T-1 of one X of T steps."""
    slices = [_step_slice(n) for n in nodes]
    if any(s is None for s in slices):
        return None
    sources = {s[0] for s in slices}
    dims = {s[1] for s in slices}
    if len(sources) != 1 or len(dims) != 1 or [s[2] for s in slices] != list(range(steps)):
        return None
    source, dim = slices[0][0], slices[0][1]
    value = source.meta.get("value")
    if not isinstance(value, torch.Tensor) or value.dim() < 3 or value.shape[dim] != steps:
        return None
    return source, dim


def _linear_parts(node, gm, dependent) -> Optional[tuple]:
    """(input, weight, bias) of a linear map node; weight as node or ("t", node)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Linear) \
            and len(node.args) == 1 and not node.kwargs:
        module = gm.get_submodule(node.target)
        return node.args[0], ("module", node.target, "weight"), (
            ("module", node.target, "bias") if module.bias is not None else None)
    if node.op == "call_function" and node.target is torch.nn.functional.linear:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if isinstance(weight, fx.Node) and weight not in dependent and (bias is None or bias not in dependent):
            return node.args[0], weight, bias
    if R.is_call(node, operator.matmul, torch.matmul, torch.mm, "matmul", "mm") and len(node.args) == 2:
        x, weight = node.args
        value = weight.meta.get("value") if isinstance(weight, fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dim() == 2 and weight not in dependent:
            return x, ("t", weight), None
    if R.is_call(node, torch.einsum, torch.functional.einsum) and len(node.args) == 3 and isinstance(node.args[0], str):
        equation = node.args[0].replace(" ", "")
        match = re.fullmatch(r"(\w)(\w)(\w),(\w)(\w)->(\w)(\w)(\w)", equation)
        weight = node.args[2]
        if match and isinstance(weight, fx.Node) and weight not in dependent:
            a, b, i, w1, w2, o1, o2, o3 = match.groups()
            if (o1, o2) == (a, b) and len({a, b, i, o3}) == 4:
                if (w1, w2) == (o3, i):
                    return node.args[1], weight, None
                if (w1, w2) == (i, o3):
                    return node.args[1], ("t", weight), None
    return None


def _same_parts(parts) -> bool:
    first = parts[0]
    return all(p[1] == first[1] and p[2] == first[2] for p in parts)


class HoistLinear:
    """Pass: annotate each match with its batched input (see module docstring)."""

    name = "hoist_linear"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        dependent = R.placeholder_dependent(gm)
        kept = []
        for match in context.matches:
            match.input = self._input_of(match, gm, dependent)
            if match.input is not None:
                match.input_scale *= match.input_scale_peeled
                if match.bias is not None and match.input.weight is not None and match.input.bias is None \
                        and match.input_scale == 1.0:
                    match.input.bias, match.bias = match.bias, None  # the loop's "+ b" is the linear's bias
            kept.append(match)
        context.matches = kept
        hoisted = sum(1 for m in kept if m.input is not None and m.input.weight is not None)
        context.log(self.name, f"{hoisted} layers read their input through one batched linear map")
        return False

    def _input_of(self, match, gm, dependent) -> Optional[LayerInput]:
        steps = len(match.currents)
        peeled = [_peel_scale(c, dependent) for c in match.currents]
        scales = {s for _, s in peeled}
        match.input_scale_peeled = 1.0
        if len(scales) != 1:
            return None
        scale = scales.pop()
        currents = [c for c, _ in peeled]
        whole = _whole_sequence(currents, steps)
        if whole is not None:
            source, dim = whole
            parts = _linear_parts(source, gm, dependent)
            match.input_scale_peeled = scale
            if parts is not None:
                return LayerInput(parts[0], parts[1], parts[2], dim)
            return LayerInput(source, None, None, dim)
        parts = [_linear_parts(c, gm, dependent) for c in currents]
        if all(p is not None for p in parts) and _same_parts(parts):
            inputs = [p[0] for p in parts]
            whole = _whole_sequence(inputs, steps)
            match.input_scale_peeled = scale
            if whole is not None:
                return LayerInput(whole[0], parts[0][1], parts[0][2], whole[1])
            return LayerInput(inputs, parts[0][1], parts[0][2], 1)
        return None
