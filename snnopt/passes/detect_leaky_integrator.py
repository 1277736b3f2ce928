"""Find non-spiking leaky integrators (readouts) across the unrolled time steps.

Matches: chains ``o[t] = β·o[t-1] + γ·I[t]`` written with ``+``/``-``/``*`` in any operand order —
an add/sub node one of whose operands is a product of a constant and the previous add/sub node of
the same chain. The step region between ``o[t-1]`` and ``o[t]`` is then evaluated on probes like a
LIF step (:func:`snnopt.passes.detect_lif_recurrence.fit_step` without spikes), and the fitted
equation must reproduce the traced run. Nodes already in a matched LIF layer are not considered,
nor are membranes that feed a spike function: a spiking layer the LIF detection refused (its
reason is reported) is not an integrator, and pieces of it fused as one would be a rewrite for
nothing.

Produces ``LayerMatch(kind="leaky_integrator")`` in ``context.matches``. Refuses (reason in
``context.skipped``) like the LIF detection: several time-varying inputs, in-place ops, learnable β
in a form that cannot be passed on, traced steps that do not follow the fitted equation.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from snnopt.passes import regions as R
from snnopt.passes.detect_lif_recurrence import (LayerMatch, StepFit, _bias_node, _close, _find_constant_node,
                                                 _first_current, _Refusal, _threshold_of, fit_step)
from snnopt.passes.trace import source_of


def _scaled_previous(node: fx.Node, dependent: set):
    """If ``node`` is ``c * p`` / ``p * c`` with a constant ``c``, return ``p``."""
    if not R.is_call(node, *R.MULTIPLY) or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and a in dependent and R.constant_value(b, dependent) is not None:
        return a
    if isinstance(b, fx.Node) and b in dependent and R.constant_value(a, dependent) is not None:
        return b
    return None


class DetectLeakyIntegrator:
    """Pass: fill ``context.matches`` with the leaky-integrator chains found (see module docstring)."""

    name = "detect_leaky_integrator"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        dependent = R.placeholder_dependent(gm)
        index = R.node_index(gm)
        taken = set().union(*(m.nodes for m in context.matches)) if context.matches else set()
        taken |= {_threshold_of(n, dependent)[0] for n in gm.graph.nodes if "spike" in n.meta}
        previous = {}
        for node in gm.graph.nodes:
            if node in taken or not R.is_call(node, *R.ADD, *R.SUBTRACT):
                continue
            for operand in node.args[:2]:
                if isinstance(operand, fx.Node):
                    prev = _scaled_previous(operand, dependent)
                    if prev is not None and prev not in taken and R.is_call(prev, *R.ADD, *R.SUBTRACT):
                        previous[node] = prev
                        break
        following = {}
        for node, prev in previous.items():
            following.setdefault(prev, []).append(node)
        starts = [p for p in following if p not in previous]
        found = 0
        for start in sorted(starts, key=index.__getitem__):
            chain = [start]
            while len(following.get(chain[-1], [])) == 1:
                chain.append(following[chain[-1]][0])
            if len(chain) < 2:
                continue
            try:
                match = self._match(gm, chain, dependent, index, context)
            except _Refusal as refusal:
                context.skip(chain[0], str(refusal), steps=len(chain))
                continue
            context.matches.append(match)
            found += 1
        context.log(self.name, f"{found} leaky integrators matched")
        return False

    def _match(self, gm, chain, dependent, index, context) -> LayerMatch:
        like = chain[0].meta["value"]
        if not isinstance(like, torch.Tensor) or like.dim() < 2 or not like.is_floating_point():
            raise _Refusal("the integrator state is not a floating-point (batch, neurons…) tensor")
        currents = [None] * len(chain)
        nodes: set = set()
        fitted = None
        for t in range(1, len(chain)):
            region = R.step_region(chain[t], [chain[t - 1]], index)
            bad = next((n for n in region if R.in_place(n)), None)
            if bad is not None:
                raise _Refusal(f"in-place operation {bad.target} inside the recurrence")
            inputs = R.region_inputs(region, [chain[t - 1]])
            varying = [n for n in inputs if n in dependent]
            if len(varying) != 1:
                raise _Refusal(f"the state update reads {len(varying)} time-varying inputs; one is expected")
            currents[t] = varying[0]
            if t == 1:
                fitted = fit_step(StepFit(gm, region, chain[0], None, currents[1], chain[1]), like, False, None, None)
            nodes.update(region)
        neuron_shape = tuple(like.shape[1:])
        offset = 0 if fitted["bias"] is None else fitted["bias"].reshape(neuron_shape)
        currents[0] = _first_current(chain[0], currents[1], index, dependent, set(currents[1:]),
                                     (chain[0].meta["value"] - offset) / fitted["input_scale"])
        if currents[0] is None:
            raise _Refusal("the first step's input could not be matched to the later steps' (is the initial "
                           "state zero?)")
        nodes.update(R.step_region(chain[0], [currents[0]], index))
        beta_value = fitted["beta"].reshape(neuron_shape)
        state = torch.zeros_like(like)
        for t, (node, current) in enumerate(zip(chain, currents)):
            expected = beta_value * state + fitted["input_scale"] * current.meta["value"] + offset
            if not _close(expected, node.meta["value"], rtol=1e-4):
                raise _Refusal(f"step {t} of the traced run does not follow out = β·out + γ·I "
                               f"(initial state not zero?)")
            state = node.meta["value"]
        beta = _find_constant_node(fitted["beta"], nodes, chain, dependent, gm)
        if beta is None:
            beta = beta_value
        bias = _bias_node(fitted, nodes, chain, dependent, gm)
        nodes.update(chain)
        return LayerMatch(kind="leaky_integrator", currents=currents, states=chain, spikes=[], beta=beta,
                          input_scale=fitted["input_scale"], nodes=nodes, source=source_of(chain[-1]),
                          neurons=int(torch.tensor(neuron_shape).prod()), beta_value=beta_value, bias=bias)
