"""Fold the per-step slices of a fused layer's output back into the whole tensor.

Also through per-step elementwise ops with scalar or per-neuron operands:
``stack([S[:, t] * g for t])`` becomes ``S * g`` (snnTorch scales its spikes by a factor).

Matches: ``torch.stack([S[:, 0], S[:, 1], …, S[:, T-1]], dim=d)`` where ``S`` is a fused layer's
batch-first output and the slices are every step in order — the user's ``torch.stack(spk_rec)``
after :mod:`fuse_layers` redirected ``spk_rec`` to the fused output. Produces ``S`` itself
(``d = 1``) or ``S.transpose(0, 1)`` (``d = 0``), so the next layer reads the fused output whole:
no copies, and a sparse-backward producer's spikes arrive unchanged at its consumer (which is what
lets the consumer restrict its input gradient to the producer's active entries). Other stacks are
left alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


def _slice_of(node):
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], int):
            return source, index[1]
    return None


# Elementwise ops that commute with stacking when their other operands are scalars or per-neuron
# vectors: stack([f(S[:, t], c) for t]) == f(S, c).
_ELEMENTWISE = {operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub,
                torch.div, torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu, "mul", "add", "sub",
                "div", "relu", "sigmoid", "tanh", "float", "detach"}


def _identity(value):
    """Equal for the same node, for reads of the same attribute (fx makes one node per read), and equal literals."""
    if isinstance(value, fx.Node):
        return ("attr", value.target) if value.op == "get_attr" else ("node", id(value))
    return ("literal", repr(value))


def _broadcast_safe(value) -> bool:
    if isinstance(value, (int, float, bool)) or value is None:
        return True
    if isinstance(value, fx.Node):
        held = value.meta.get("value")
        return isinstance(held, torch.Tensor) and held.dim() <= 1
    return False


class FoldStepSlices:
    """Pass: ``stack`` of all per-step slices → the sliced tensor (see module docstring)."""

    name = "fold_step_slices"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        folded = 0
        for node in list(gm.graph.nodes):
            if not (node.op == "call_function" and node.target is torch.stack):
                continue
            items = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(items, (list, tuple)) or not items or dim not in (0, 1, -3):
                continue
            with gm.graph.inserting_before(node):
                whole = self._fold(gm, list(items))
            if whole is None:
                continue
            if dim == 1:
                node.replace_all_uses_with(whole)
            else:
                with gm.graph.inserting_after(node):
                    swapped = gm.graph.call_method("transpose", (whole, 0, 1))
                node.replace_all_uses_with(swapped)
            folded += 1
        context.log(self.name, f"{folded} stacks of per-step slices folded")
        return folded > 0

    def _fold(self, gm, items):
        """A batch-first (B, T, …) node equal to ``stack(items, dim=1)``, or None."""
        slices = [_slice_of(item) for item in items]
        steps = len(items)
        if all(s is not None for s in slices) and len({s[0] for s in slices}) == 1:
            source = slices[0][0]
            if [s[1] % steps for s in slices] == list(range(steps)) and _is_fused_output(source, steps):
                return source
            return None
        # The same elementwise op applied to every step: fold its per-step operand, apply it once.
        first = items[0]
        if not all(isinstance(i, fx.Node) and i.op == first.op and i.target == first.target
                   and i.op in ("call_function", "call_method") and i.target in _ELEMENTWISE
                   and len(i.args) == len(first.args) and i.kwargs == first.kwargs for i in items):
            return None
        varying = [k for k in range(len(first.args)) if len({_identity(i.args[k]) for i in items}) > 1]
        if len(varying) != 1:
            return None
        k = varying[0]
        if not all(_broadcast_safe(a) for j, a in enumerate(first.args) if j != k):
            return None
        inner = self._fold(gm, [i.args[k] for i in items])
        if inner is None:
            return None
        args = list(first.args)
        args[k] = inner
        return gm.graph.create_node(first.op, first.target, tuple(args), dict(first.kwargs))


def _is_fused_output(node, steps) -> bool:
    """Whether ``node`` is ``fused_layer(...)[k]`` of a layer with ``steps`` steps."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    fused = node.args[0]
    match = fused.meta.get("snnopt_layer") if isinstance(fused, fx.Node) else None
    return match is not None and len(match.states) == steps
