"""Write a recurrent ``nn.Linear`` module call as the weight product plus the bias it adds.

Matches: a call of an ``nn.Linear`` module (kept whole by the tracer, like any library module)
whose input is a layer's own spikes, ``spike(v - θ)`` or those spikes times an exact 1, and whose
output flows back into the same layer's next membrane: the recurrence of snnTorch's ``RLeaky``
and ``RSynaptic`` (``self.recurrent(self.spk)``) or of a user's ``self.rec(s)``. Produces
``linear(s, weight) + bias`` with the module's own parameters (``get_attr`` nodes), which the LIF
detection reads as the recurrent weight and a constant added inside the loop: the parameters the
fused op takes, and through which gradients reach them. The values are the module call's up to
the rounding of the separate bias addition; translation validation checks the result as always.

Refuses (leaves the call alone) when the linear does not feed back into the layer whose spikes it
reads (a feed-forward layer between two spiking layers: ``hoist_linear`` batches those over time
as module calls), when its input is the spikes scaled by anything but 1, or when the module is
not exactly ``torch.nn.Linear`` (a subclass may compute something else).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from snnopt.passes import regions as R
from snnopt.passes.detect_lif_recurrence import _threshold_of, _unit_multiple

# How far forward from the linear's output, and from the membrane, the search for their meeting
# goes (nodes, not steps): one step's update is a handful of arithmetic nodes.
_MEETING_DEPTH = 12


def _spike_source(node):
    """The spike call ``node`` is, or is the unit multiple of (``spk * graded_spikes_factor``), else None: the
    forms the recurrence detection reads as the recurrent input (expanding others would fuse nothing)."""
    if isinstance(node, fx.Node) and "spike" in node.meta:
        return node
    if isinstance(node, fx.Node):
        return next((a for a in node.all_input_nodes if "spike" in a.meta and _unit_multiple(node, a)), None)
    return None


def _reach(start: fx.Node, stop: set) -> set:
    """Nodes reached forward from ``start`` within :data:`_MEETING_DEPTH` steps, not through ``stop``."""
    reached, frontier = set(), [start]
    for _ in range(_MEETING_DEPTH):
        following = []
        for node in frontier:
            for user in node.users:
                if user not in reached and user not in stop:
                    reached.add(user)
                    following.append(user)
        frontier = following
    return reached


def _feeds_back(call: fx.Node, membrane: fx.Node, spike_nodes: set) -> bool:
    # The linear's output and the membrane's leak (the membrane's own path, not through its spikes)
    # meet in one node: the next step's update. A downstream layer's current meets the upstream
    # membrane only through spikes.
    return bool(_reach(call, spike_nodes) & _reach(membrane, spike_nodes | {call}))


class ExpandRecurrentLinear:
    """Pass: recurrent ``nn.Linear`` calls become ``linear(s, W) + b`` (see module docstring)."""

    name = "expand_recurrent_linear"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        dependent = R.placeholder_dependent(gm)
        spike_nodes = {n for n in gm.graph.nodes if "spike" in n.meta}
        expanded = 0
        self._parameters: dict = {}  # one get_attr node per parameter, shared by every step
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            module = gm.get_submodule(node.target)
            if type(module) is not torch.nn.Linear:
                continue
            spike = _spike_source(node.args[0])
            membrane = _threshold_of(spike, dependent)[0] if spike is not None else None
            if not isinstance(membrane, fx.Node) or not _feeds_back(node, membrane, spike_nodes):
                continue
            self._expand(gm, node, module)
            expanded += 1
        context.log(self.name, f"{expanded} recurrent linear module calls written as weight products")
        return expanded > 0

    def _parameter(self, gm: fx.GraphModule, path: str, value: torch.Tensor) -> fx.Node:
        node = self._parameters.get(path)
        if node is None:
            first = next(n for n in gm.graph.nodes if n.op != "placeholder")
            with gm.graph.inserting_before(first):
                node = self._parameters[path] = gm.graph.get_attr(path)
            node.meta["value"] = value
        return node

    def _expand(self, gm: fx.GraphModule, node: fx.Node, module: torch.nn.Linear) -> None:
        graph = gm.graph
        held = node.args[0].meta.get("value")
        weight = self._parameter(gm, f"{node.target}.weight", module.weight)
        bias = self._parameter(gm, f"{node.target}.bias", module.bias) if module.bias is not None else None
        with graph.inserting_before(node):
            product = graph.call_function(F.linear, (node.args[0], weight))
            product.meta.update(node.meta)
            if isinstance(held, torch.Tensor):
                with torch.no_grad():
                    product.meta["value"] = F.linear(held, module.weight)
            result = product
            if bias is not None:
                result = graph.call_function(operator.add, (product, bias))
                result.meta.update(node.meta)
                if isinstance(held, torch.Tensor):
                    with torch.no_grad():
                        result.meta["value"] = product.meta["value"] + module.bias
        node.replace_all_uses_with(result)
        graph.erase_node(node)
