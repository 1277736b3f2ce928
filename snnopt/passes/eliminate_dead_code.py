"""Remove the nodes no output needs any more (the unrolled steps a fused call replaced).

Matches: nodes without users that have no side effect. In-place ops (``v.add_(…)``,
``v[m] = 0``, ``out=``) are kept even when their result is unused: their effect is the mutation. Produces the smaller graph and drops constants and buffers no node reads.
"""

from __future__ import annotations

import torch.fx as fx

from snnopt.passes import regions as R


class EliminateDeadCode:
    """Pass: dead-code elimination, then unused constant attributes (see module docstring)."""

    name = "eliminate_dead_code"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        before = len(gm.graph.nodes)
        changed = gm.graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or R.in_place(node))
        read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
        for name in list(gm._buffers):
            if (name.startswith("_tensor_constant") or name.startswith("_snnopt_")) and name not in read:
                del gm._buffers[name]
        context.log(self.name, f"{before - len(gm.graph.nodes)} nodes removed")
        return changed
