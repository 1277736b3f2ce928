"""Record which fused layers compute their input gradient only where the producer is active.

Matches: a fused spiking layer whose input is, unchanged, the spike output of another fused layer
with the sparse backward (``fused_layer(...)[0]`` feeding ``fused_layer(...)``; the fold pass makes
``torch.stack(spk_rec)`` such a direct edge). The producer's backward reads the gradient of its
spikes only at its active entries, so the consumer computes that gradient only there: at run time
``linear_lif``'s ``input_active="auto"`` finds the producer's active set from the spike tensor
itself. This pass makes the edge visible in ``explain`` (``input gradient: only at layer k's
active entries``); it refuses nothing and changes no node.
"""

from __future__ import annotations

import operator

import torch.fx as fx


class PropagateActiveSets:
    """Pass: annotate consumer layers with their sparse producer (see module docstring)."""

    name = "propagate_active_sets"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        linked = 0
        for node in gm.graph.nodes:
            match = node.meta.get("snnopt_layer")
            if match is None or not node.args or node.kwargs.get("time_dim", 1) != 1:
                continue
            source = node.args[0]
            if not (isinstance(source, fx.Node) and source.target is operator.getitem and source.args[1] == 0):
                continue
            producer = source.args[0].meta.get("snnopt_layer") if isinstance(source.args[0], fx.Node) else None
            # Linked whatever the mode: validation runs exact; the report shows it for sparse only.
            if producer is None or producer.kind == "leaky_integrator":
                continue
            if node.args[1] is None:  # no input weight: the gradient w.r.t. x is the dense current's
                continue
            match.input_from = producer
            linked += 1
        context.log(self.name, f"{linked} layers take input gradients only at their producer's active entries")
        return False
