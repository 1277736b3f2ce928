"""Normalise equivalent spellings of arithmetic before any pattern looks at the graph.

Matches: ``torch.add(a, b)`` / ``a.add(b)`` / ``torch.sub`` / ``a.sub(b)`` / ``torch.mul`` /
``a.mul(b)`` / ``torch.div`` / ``a.div(b)`` / ``torch.matmul`` / ``a.matmul(b)`` / ``a.neg()`` with
plain positional operands (no ``alpha=``, ``out=``, ``rounding_mode=``), and products whose
constant factor is written first (``0.9 * v``). Produces the operator form (``a + b``, ``a - b``,
``a * b``, ``a / b``, ``a @ b``, ``-a``) with a product's constant factor second (``v * 0.9``),
so later passes see one spelling. Every rewrite computes the same values bit for bit
(elementwise ``+`` and ``*`` are commutative in floating point) and keeps autograd's graph; the
rewritten module is validated against the original anyway. Refuses nothing: anything else is
left as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

_FUNCTIONS = {torch.add: operator.add, torch.sub: operator.sub, torch.mul: operator.mul,
              torch.div: operator.truediv, torch.matmul: operator.matmul, torch.neg: operator.neg}
_METHODS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
            "matmul": operator.matmul, "neg": operator.neg}


def _is_tensor_node(value) -> bool:
    return isinstance(value, fx.Node) and isinstance(value.meta.get("value"), torch.Tensor)


def _constant(value, dependent: set) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, fx.Node) and value not in dependent)


class Canonicalize:
    """Pass: one spelling for each arithmetic operation (see module docstring)."""

    name = "canonicalize"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        from snnopt.passes.regions import placeholder_dependent

        dependent = placeholder_dependent(gm)
        rewritten = 0
        for node in list(gm.graph.nodes):
            target = None
            if node.op == "call_function" and node.target in _FUNCTIONS and not node.kwargs:
                target = _FUNCTIONS[node.target]
            elif node.op == "call_method" and node.target in _METHODS and not node.kwargs \
                    and _is_tensor_node(node.args[0]):
                target = _METHODS[node.target]
            args = tuple(node.args)
            if target is not None and len(args) != (1 if target is operator.neg else 2):
                target = None
            if target is None and node.op == "call_function" and node.target is operator.mul:
                target = operator.mul
            if target is None:
                continue
            if target is operator.mul and _constant(args[0], dependent) and not _constant(args[1], dependent):
                args = (args[1], args[0])
            if (node.op, node.target, tuple(node.args)) == ("call_function", target, args):
                continue
            node.op, node.target, node.args = "call_function", target, args
            rewritten += 1
        if rewritten:
            gm.recompile()
        context.log(self.name, f"{rewritten} operations rewritten to their canonical spelling")
        return rewritten > 0
