"""Compute once what the unrolled loop recomputes at every step from constants and parameters alone.

Matches: ``call_function`` / ``call_method`` nodes that read a trainable parameter, do not depend
on the module's inputs, and repeat an earlier node exactly: the same target, the same arguments
(the same nodes, equal constants). The typical case is a neuron module that derives its decay from a learnable parameter
inside its step, as snnTorch's ``Leaky(learn_beta=True)`` does with ``self.beta.clamp(0, 1)``:
unrolled over T steps that is T nodes holding one value, and the recurrence detection would see T
learnable values where the fused op takes one β. Produces one node where there were several; the
later ones' users read the first. The value is the same bit for bit, and the gradient reaching the
parameter is the sum of the same terms (summed in another order).

Refuses (leaves alone) anything whose repetition is not a repetition of the value: calls that
draw random numbers (``rand``, ``dropout``, ``bernoulli``, ...), in-place or otherwise impure
calls, module calls and autograd Functions (a user's function may keep state), nodes whose
arguments hold values that cannot be compared (tensors stored in arguments, unknown objects), and
nodes whose result an in-place operation writes, directly or through a view (two tensors the code
mutates separately must stay two). Constants that read no parameter (a loop's initial zeros) are
left as they are: nothing downstream needs them shared.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from snnopt.passes import regions as R
from snnopt.passes.trace import autograd_function_of

# Name fragments of torch's random functions and methods: two calls draw different numbers.
_RANDOM = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial", "poisson", "exponential",
           "cauchy", "geometric", "log_normal", "random")
# Calls whose result may share memory with their first argument: a write into the result writes it.
_VIEWS = frozenset({"view", "view_as", "reshape", "reshape_as", "getitem", "select", "narrow", "slice", "transpose",
                    "t", "T", "mT", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten",
                    "as_strided", "detach", "split", "chunk", "unbind", "movedim", "swapaxes", "diagonal",
                    "contiguous", "to", "type_as", "real", "imag", "view_as_real", "view_as_complex", "unfold"})


class _Incomparable(Exception):
    pass


def _key(value):
    """A hashable stand-in for a node's argument; raises _Incomparable for what it cannot compare."""
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                           torch.memory_format)):
        return (type(value).__name__, value)
    raise _Incomparable(type(value).__name__)


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _written(gm: fx.GraphModule) -> set:
    """Nodes whose result an in-place operation may write: its operand, and what that aliases."""
    written: set = set()
    for node in gm.graph.nodes:
        if not R.in_place(node):
            continue
        stack = [node.kwargs["out"] if "out" in node.kwargs else (node.args[0] if node.args else None)]
        while stack:
            current = stack.pop()
            if not isinstance(current, fx.Node) or current in written:
                continue
            written.add(current)
            if current.op in ("call_function", "call_method") and current.args and (
                    _name(current) in _VIEWS or R.in_place(current)):
                stack.append(current.args[0])
    return written


def _reads_trainable(gm: fx.GraphModule) -> set:
    reads: set = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = node.meta.get("value")
            if isinstance(value, torch.nn.Parameter) and value.requires_grad:
                reads.add(node)
        elif node.op in ("call_function", "call_method") and node.target not in R.SHAPE_ONLY \
                and any(a in reads for a in node.all_input_nodes):
            reads.add(node)
    return reads


def _shareable(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.is_impure() or R.in_place(node):
        return False
    if autograd_function_of(node) is not None:
        return False
    return not any(fragment in _name(node).lower() for fragment in _RANDOM)


class ShareConstantSubexpressions:
    """Pass: merge repeated input-independent computations (see module docstring)."""

    name = "share_constant_subexpressions"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        dependent, written, reads = R.placeholder_dependent(gm), _written(gm), _reads_trainable(gm)
        first: dict = {}
        merged = 0
        for node in list(gm.graph.nodes):
            if node in dependent or node in written or node not in reads or not _shareable(node):
                continue
            try:
                key = (node.op, node.target, _key(node.args), _key(node.kwargs))
            except _Incomparable:
                continue
            earlier = first.setdefault(key, node)
            if earlier is not node:
                node.replace_all_uses_with(earlier)
                gm.graph.erase_node(node)
                merged += 1
        context.log(self.name, f"{merged} repeated constant computations merged")
        return merged > 0
