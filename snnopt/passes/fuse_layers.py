"""Replace each matched layer's unrolled steps by one fused call.

Matches: the :class:`~snnopt.passes.detect_lif_recurrence.LayerMatch` records left by the
detection passes. Produces, per layer: ``current = torch.stack([I[0], …, I[T-1]], dim=1)``, one
:func:`snnopt.functional.fused.fused_layer` call with the layer's constants, and per-step slices
``spikes[:, t]`` / ``membrane[:, t]`` that take over every use of the old ``s[t]`` / ``v[t]``
outside the layer. The old step nodes become dead and are removed later. The graph is then put
back in a topological order that keeps the original order wherever it can (the fused call needs
all currents before the first use of its outputs).

Refuses a layer (reason in ``context.skipped``) when one of its intermediate values — anything
but the spikes and the membrane — is used outside it, since the fused call does not produce it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from snnopt.functional.fused import fused_layer
from snnopt.passes import regions as R


def uniform_scalar(value) -> "float | None":
    """The scalar a tensor holds everywhere (to float32 rounding, as values read off probes carry), else None."""
    flat = torch.as_tensor(value).reshape(-1).double()
    if flat.numel() and float((flat - flat[0]).abs().max()) <= 1e-6 * max(1.0, abs(float(flat[0]))):
        return float(f"{float(flat.mean()):.7g}")
    return None


def constant_argument(gm: fx.GraphModule, value, name_hint: str):
    """A float for a uniform value, else a ``get_attr`` of a non-persistent buffer holding it."""
    if isinstance(value, fx.Node) or isinstance(value, (int, float)):
        return value
    value = torch.as_tensor(value)
    # A uniform value is the user's scalar (the rewrite is validated against the original
    # afterwards, so a wrong snap cannot go unnoticed).
    scalar = uniform_scalar(value)
    if scalar is not None:
        return scalar
    index = 0
    while hasattr(gm, f"_snnopt_{name_hint}_{index}"):
        index += 1
    name = f"_snnopt_{name_hint}_{index}"
    gm.register_buffer(name, value.clone(), persistent=False)
    return gm.graph.get_attr(name)


def reorder_topologically(graph: fx.Graph) -> None:
    """Stable topological order: original order wherever the dependences allow it."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    pending = {node: len(set(node.all_input_nodes)) for node in nodes}
    import heapq
    ready = [(position[n], i, n) for i, n in enumerate(nodes) if pending[n] == 0]
    heapq.heapify(ready)
    order = []
    counter = len(nodes)
    while ready:
        _, _, node = heapq.heappop(ready)
        order.append(node)
        for user in node.users:
            pending[user] -= 1
            if pending[user] == 0:
                counter += 1
                heapq.heappush(ready, (position[user], counter, user))
    if len(order) != len(nodes):
        raise RuntimeError("the rewritten graph has a cycle")
    output = next(n for n in nodes if n.op == "output")
    placeholders = [n for n in order if n.op == "placeholder"]
    rest = [n for n in order if n.op not in ("placeholder", "output")]
    anchor = graph._root  # noqa: SLF001  (fx has no public way to move nodes to the front)
    for node in placeholders + rest + [output]:
        anchor.append(node)
        anchor = node


class FuseLayers:
    """Pass: emit one fused call per matched layer (see module docstring)."""

    name = "fuse_layers"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        changed = False
        self.replaced: dict = {}  # old step node -> its slice of a fused output (for later layers' inputs)
        for match in _cyclic(context.matches):
            context.skip(match.states[0], "its input current depends on its own output (a loop through the layer "
                                          "that the fused op does not model, e.g. a recurrence on the synaptic "
                                          "current)", steps=len(match.states))
            context.matches.remove(match)
        dead = R.dead_nodes(gm)
        for number, match in enumerate(context.matches):
            reason = _outside_use(match, dead)
            if reason:
                context.skip(match.states[0], reason, steps=len(match.states))
                continue
            self._emit(gm, match, number, context)
            context.fused.append(match)
            changed = True
        if changed:
            reorder_topologically(gm.graph)
        context.log(self.name, f"{len(context.fused)} layers fused")
        return changed

    def _emit(self, gm, match, number, context) -> None:
        graph = gm.graph
        order = {node: i for i, node in enumerate(graph.nodes)}
        last = max(match.currents + match.states + match.spikes, key=order.__getitem__)
        spiking = match.kind != "leaky_integrator"
        need_membrane = (not spiking) or any(_used_outside(v, match) for v in match.states)
        layer_input = getattr(match, "input", None)
        with graph.inserting_after(last):
            time_dim = 1
            if layer_input is None:
                currents = [self.replaced.get(c, c) for c in match.currents]
                x = graph.call_function(torch.stack, (currents,), {"dim": 1})
                if match.bias is not None:
                    x = graph.call_function(operator.add, (x, match.bias))
                args = (x, None, None, _materialise(graph, _recurrent_reference(match)))
            else:
                x = layer_input.x
                if isinstance(x, list):
                    x = graph.call_function(torch.stack, ([self.replaced.get(n, n) for n in x],), {"dim": 1})
                else:
                    x = self.replaced.get(x, x)
                if match.bias is not None and layer_input.weight is None:
                    x = graph.call_function(operator.add, (x, match.bias))
                bias = _materialise(graph, layer_input.bias)
                if match.bias is not None and layer_input.weight is not None:
                    bias = match.bias if bias is None else graph.call_function(operator.add, (bias, match.bias))
                args = (x, _materialise(graph, layer_input.weight), bias,
                        _materialise(graph, _recurrent_reference(match)))
                time_dim = layer_input.time_dim
            kwargs = dict(beta=constant_argument(gm, match.beta, "beta"), spiking=spiking,
                          backward=context.backward if spiking else "exact", window=context.window,
                          input_scale=match.input_scale, return_membrane=need_membrane, backend=context.backend,
                          time_dim=time_dim)
            if spiking:
                kwargs.update(threshold=constant_argument(gm, match.threshold, "threshold"), reset=match.reset,
                              detach_reset=match.detach_reset,
                              surrogate=f"{match.surrogate.name}:{match.surrogate.param!r}",
                              fire_at_threshold=match.fire_at_threshold)
                if match.alpha is not None:
                    kwargs["alpha"] = constant_argument(gm, match.alpha, "alpha")
            fused = graph.call_function(fused_layer, args, kwargs)
        fused.meta["snnopt_layer"] = match
        match.fused_node = fused
        with graph.inserting_after(fused):
            spikes = graph.call_function(operator.getitem, (fused, 0)) if spiking else None
        with graph.inserting_after(spikes if spiking else fused):
            membrane = graph.call_function(operator.getitem, (fused, 1)) if need_membrane else None
        anchor = membrane if membrane is not None else spikes
        for t, state in enumerate(match.states):
            replacements = []
            if spiking:
                group = match.spike_groups[t] if match.spike_groups else [match.spikes[t]]
                replacements = [(spike, spikes) for spike in group]
            replacements.append((state, membrane))
            for old, source in replacements:
                if source is None or not _used_outside(old, match):
                    continue
                # The last step as index -1: "the final value" then stays right for any number of steps.
                index = -1 if t == len(match.states) - 1 else t
                with graph.inserting_after(anchor):
                    step = graph.call_function(operator.getitem, (source, (slice(None), index)))
                anchor = step
                old.replace_all_uses_with(step, delete_user_cb=lambda user: user not in match.nodes)
                self.replaced[old] = step


def _ancestors(nodes) -> set:
    seen, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def _cyclic(matches) -> list:
    """Matches whose fused call would have to run before its own inputs are known."""
    import networkx as nx
    order = nx.DiGraph()
    order.add_nodes_from(range(len(matches)))
    for b, consumer in enumerate(matches):
        feeds = _ancestors(consumer.currents)
        for a, producer in enumerate(matches):
            outputs = set(producer.states) | set(producer.spikes) | producer.nodes
            if feeds & outputs:
                order.add_edge(a, b)
    bad = set()
    for component in nx.strongly_connected_components(order):
        if len(component) > 1 or any(order.has_edge(i, i) for i in component):
            bad |= component
    return [matches[i] for i in sorted(bad)]


def _recurrent_reference(match):
    if match.recurrent_weight is None:
        return None
    return ("t", match.recurrent_weight) if match.recurrent_transposed else match.recurrent_weight


def _materialise(graph: fx.Graph, weight):
    """A node for a weight reference from hoist_linear: a node, ("t", node) or ("module", path, attr)."""
    if weight is None or isinstance(weight, fx.Node):
        return weight
    if weight[0] == "t":
        return graph.call_method("t", (weight[1],))
    return graph.get_attr(f"{weight[1]}.{weight[2]}")


def _used_outside(node: fx.Node, match) -> bool:
    return any(user not in match.nodes for user in node.users)


def _outside_use(match, dead: set) -> str:
    keep = set(match.states) | set(match.spikes) | {s for group in match.spike_groups for s in group}
    for node in keep:
        mutated = next((u for u in node.users if R.in_place(u) and u not in match.nodes), None)
        if mutated is not None:
            return (f"the layer's state or spikes are modified in place after the step ({mutated.name}); "
                    f"the fused op's outputs cannot be")
    for node in match.nodes:
        if node in keep:
            continue
        outside = [u for u in R.live_users(node, dead) if u not in match.nodes]
        if outside:
            return (f"an intermediate value of the layer ({node.name}) is also used outside it, by "
                    f"{outside[0].name}; only spikes and membrane can be taken from a fused layer")
    return ""
