"""Remove the nodes no output needs any more (the unrolled steps a fused call replaced).

Matches: nodes without users that have no side effect. In-place ops and calls of modules or
functions that may mutate state (anything fx cannot prove pure) are kept, as fx's own dead-code
elimination does. Produces the smaller graph and drops constants and buffers no node reads.
"""

from __future__ import annotations

import torch.fx as fx


class EliminateDeadCode:
    """Pass: dead-code elimination, then unused constant attributes (see module docstring)."""

    name = "eliminate_dead_code"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        before = len(gm.graph.nodes)
        changed = gm.graph.eliminate_dead_code()
        read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
        for name in list(gm._buffers):
            if (name.startswith("_tensor_constant") or name.startswith("_snnopt_")) and name not in read:
                del gm._buffers[name]
        context.log(self.name, f"{before - len(gm.graph.nodes)} nodes removed")
        return changed
