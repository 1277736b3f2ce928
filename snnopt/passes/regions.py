"""Graph helpers shared by the passes: dependence queries and evaluating a region on probe values.

A *step region* is the set of nodes that compute one time step's new state from the previous
step's state (the boundary) and the step's input current. Detection evaluates such regions on
chosen probe values — that is how it reads β, θ and the reset rule off any spelling of them.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx


def node_index(gm: fx.GraphModule) -> dict:
    return {node: i for i, node in enumerate(gm.graph.nodes)}


# Factories that read only the shape of their tensor argument: ``zeros_like(x)`` is a constant.
SHAPE_ONLY = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, "zeros_like", "ones_like",
               "new_zeros", "new_ones", "new_empty", "new_full", "empty_like", "full_like"}


def placeholder_dependent(gm: fx.GraphModule) -> set:
    """Nodes whose value depends on the module's input *values* (everything else is a constant)."""
    dependent: set = set()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and node.target in SHAPE_ONLY:
            continue
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def depends_on(node: fx.Node, ancestor: fx.Node, within: set) -> bool:
    """Whether ``node`` reads ``ancestor``'s value, directly or through nodes in ``within``."""
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        if current in seen:
            continue
        seen.add(current)
        stack.extend(n for n in current.all_input_nodes if n in within)
    return False


def step_region(target: fx.Node, boundary: Iterable[fx.Node], index: dict) -> list:
    """Nodes between ``boundary`` and ``target`` (inclusive of target), in graph order.

    A node belongs when it depends on a boundary node and ``target`` depends on it, with the
    boundary nodes themselves excluded (paths are not followed back through them).
    """
    boundary = set(boundary)
    limit = index[target]
    reached: set = set()
    frontier = list(boundary)
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in reached and user not in boundary and index[user] <= limit:
                reached.add(user)
                frontier.append(user)
    region: set = set()
    frontier = [target]
    while frontier:
        node = frontier.pop()
        if node in region or node in boundary or node not in reached:
            continue
        region.add(node)
        frontier.extend(node.all_input_nodes)
    return sorted(region, key=index.__getitem__)


def region_inputs(region: list, boundary: Iterable[fx.Node]) -> list:
    """Nodes read by ``region`` that are neither in it nor in ``boundary``."""
    inside, boundary = set(region), set(boundary)
    seen: list = []
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in boundary and arg not in seen:
                seen.append(arg)
    return seen


def evaluate(gm: fx.GraphModule, region: list, env: dict) -> dict:
    """Run ``region``'s nodes with the values in ``env`` (others from ``node.meta['value']``)."""
    values = dict(env)

    def load(arg):
        if isinstance(arg, fx.Node):
            return values[arg] if arg in values else arg.meta["value"]
        return arg

    for node in region:
        args = fx.node.map_aggregate(node.args, load)
        kwargs = fx.node.map_aggregate(node.kwargs, load)
        if node.op == "call_function":
            values[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "call_module":
            values[node] = gm.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "get_attr":
            values[node] = node.meta["value"]
        else:
            raise ValueError(f"cannot evaluate a {node.op} node inside a region")
    return values


def is_call(node: Any, *targets) -> bool:
    """Whether ``node`` calls one of ``targets`` (functions or method names)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


SUBTRACT = (operator.sub, torch.sub, "sub")
MULTIPLY = (operator.mul, torch.mul, "mul")
ADD = (operator.add, torch.add, "add")


def constant_value(node: Any, dependent: set) -> Optional[Any]:
    """A literal, or the value of a node that does not depend on the inputs; else None."""
    if not isinstance(node, fx.Node):
        return node if isinstance(node, (int, float)) else None
    if node in dependent:
        return None
    return node.meta.get("value")


def dead_nodes(gm: fx.GraphModule) -> set:
    """Nodes whose results nothing live reads and that change nothing (what eliminate_dead_code removes at
    the end): snnTorch's traced ``if not syn == None`` tests, the reset spike ``reset_mechanism="none"``
    still computes from the initial state. Before that pass they must not count as uses of a layer's
    values outside it; they stay in the graph meanwhile (a last step's unused spike still marks its
    membrane as one)."""
    dead: set = set()
    for node in reversed(gm.graph.nodes):
        if node.op in ("output", "placeholder") or in_place(node) or node.is_impure():
            continue
        if all(user in dead for user in node.users):
            dead.add(node)
    return dead


def live_users(node: fx.Node, dead: set) -> list:
    """``node``'s users less the :func:`dead_nodes`."""
    return [u for u in node.users if u not in dead]


def in_place(node: fx.Node) -> bool:
    """Whether ``node`` mutates one of its arguments (``x.add_(…)``, ``x[i] = …``, ``out=``)."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return True
        if name.endswith("_") and not name.endswith("__"):
            return True
    return "out" in node.kwargs
