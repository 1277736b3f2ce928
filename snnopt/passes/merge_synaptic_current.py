"""Merge a synaptic-current integrator into the LIF layer it drives: the current-based LIF (CuBa).

Matches: a LIF layer whose per-step current ``I[t]`` is exactly the state ``syn[t]`` of a matched
leaky integrator (``syn[t] = α·syn[t-1] + J[t]``), where ``syn`` is used by nothing but that LIF
layer. Produces one ``cuba_lif`` match — current ``J``, ``alpha = α`` — in place of the two: one
fused op with two states instead of two ops and a (B, T, N) intermediate. Refuses (leaves both
layers fused separately, which computes the same) when ``syn`` is also used elsewhere (e.g.
recorded), since the fused CuBa op does not return it.
"""

from __future__ import annotations

from snnopt.passes import regions as R


class MergeSynapticCurrent:
    """Pass: fold integrator + LIF pairs into CuBa-LIF matches (see module docstring)."""

    name = "merge_synaptic_current"

    def __call__(self, gm, context) -> bool:
        integrators = {tuple(m.states): m for m in context.matches if m.kind == "leaky_integrator"}
        dead = R.dead_nodes(gm)
        merged = 0
        for match in list(context.matches):
            if match.kind != "lif" or match.recurrent_weight is not None:
                continue
            synaptic = integrators.get(tuple(match.currents))
            if synaptic is None or synaptic not in context.matches:
                continue
            inside = synaptic.nodes | match.nodes
            if any(user not in inside for state in synaptic.states for user in R.live_users(state, dead)):
                continue
            match.kind = "cuba_lif"
            match.alpha, match.alpha_value = synaptic.beta, synaptic.beta_value
            match.currents = synaptic.currents
            match.input_scale = synaptic.input_scale
            match.bias = synaptic.bias
            match.nodes = inside
            context.matches.remove(synaptic)
            merged += 1
        context.log(self.name, f"{merged} synaptic currents merged into CuBa-LIF layers")
        return False
