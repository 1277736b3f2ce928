"""Say why a recurrence hidden inside an opaque call is not fused.

Matches: calls the detection passes cannot look into, a custom op outside PyTorch's own and
snnopt's namespaces (``torch.ops.sj_lif.forward``: SpikingJelly 2.0 runs its LIF neurons as such
an op) or a module kept whole that is not one of ``torch.nn``'s, where a later call of the same
op depends on an earlier one: a state carried through time inside it. Produces one skip record
per such op (nothing is rewritten): without it a model whose neurons are all opaque got "0 layers
fused" and no reason at all.

Why it may stay silent: an opaque call whose later calls do not depend on its earlier ones is a
stateless per-step function (a user's activation, say), which needs no explanation.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from snnopt.passes import regions as R

# Op namespaces whose operations the detection passes see as what they are.
KNOWN_NAMESPACES = frozenset({"aten", "prims", "snnopt"})


class ReportOpaqueRecurrences:
    """Pass: a skip record for each opaque op that carries state between its calls (see module docstring)."""

    name = "report_opaque_recurrences"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        dependent = R.placeholder_dependent(gm)
        calls: dict = {}
        for node in gm.graph.nodes:
            what = _opaque_target(gm, node)
            if what is not None and node in dependent:
                # One group per op and calling module: two layers of the same neuron class are two.
                calls.setdefault((what, _module_path(node)), []).append(node)
        reported = 0
        for (what, module), nodes in calls.items():
            if any(R.depends_on(later, earlier, dependent) for earlier, later in zip(nodes, nodes[1:])):
                context.skip(nodes[0], _reason(what, module), steps=len(nodes))
                reported += 1
        context.log(self.name, f"{reported} opaque recurrences reported")
        return False


def _opaque_target(gm: fx.GraphModule, node: fx.Node):
    """A readable name for a call the detection passes cannot see into, or None."""
    if node.op == "call_function" and isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        namespace = node.target.namespace if hasattr(node.target, "namespace") else str(node.target).split(".")[0]
        if namespace not in KNOWN_NAMESPACES:
            return f"torch.ops.{node.target}"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = type(module)
        if not kind.__module__.startswith("torch.nn"):
            return f"{kind.__module__}.{kind.__qualname__}"
    return None


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _reason(what: str, module: str) -> str:
    where = f" (in {module})" if module else ""
    hint = ""
    if what.startswith("torch.ops.sj_"):
        hint = ("; SpikingJelly 2.0 runs its neurons as such ops: written as tensor operations with a surrogate "
                "spike function, as in snnTorch or a hand-written loop, the layer would be fused")
    return (f"{what}{where} is an opaque call that carries a state from one step to the next: the neuron inside "
            f"it is not visible as tensor operations, so it is left as written{hint}")
