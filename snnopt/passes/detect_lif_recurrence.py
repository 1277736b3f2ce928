"""Find the LIF recurrences across the unrolled time steps and read their constants.

Matches: chains of membrane nodes ``v[0] → v[1] → …`` where each ``v[t]`` feeds a recognised spike
function (``spike(v - θ)`` or ``spike(v)`` with the threshold inside the function) and ``v[t]``
depends on ``v[t-1]`` along a path that crosses no spike function (a backward search through the
data-dependence graph that stops at spike nodes: an upstream layer reaches ``v[t]`` only through
its spikes).

For each step ``t ≥ 1`` the *step region* between the state ``(v[t-1], s[t-1])`` and ``v[t]`` is
cut out; its one input that depends on the model's inputs is the step's current ``I[t]``. The
region is then evaluated on probe values to read, whatever the spelling: β (per neuron), the
reset rule (``v - θ s``, ``v (1 - s)``, ``where``, or none), whether the reset carries gradient
(autograd through the region), a recurrent weight (``s[t-1] @ V``), and that nothing else is
going on: the fitted LIF equation must reproduce the region on random probes. Step 0, which the
tracer constant-folds against the zero initial state, is matched to ``I[0]`` and checked on the
traced values.

Produces ``context.matches``: one :class:`LayerMatch` per layer. Refuses (a reason in
``context.skipped``) on: an unknown spike function, several or no input currents, an in-place op
in the region, a state value used outside the layer, a reset that does not subtract the threshold,
learnable β/θ in sparse mode, or any probe mismatch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from snnopt.passes import regions as R
from snnopt.passes.trace import source_of

_PROBE_SEED = 1234
_FIRST_STEP_DEPTH = 8


@dataclass
class LayerMatch:
    """One recognised layer: per-step nodes and the constants of its equation."""

    kind: str                                   # "lif", "cuba_lif" or "leaky_integrator"
    currents: list                              # I[t] nodes
    states: list                                # v[t] nodes
    spikes: list                                # s[t] nodes ([] for a leaky integrator)
    beta: Any                                   # a node, or a float / tensor value
    threshold: Any = float("inf")
    reset: str = "none"
    detach_reset: bool = True
    surrogate: Any = None
    fire_at_threshold: bool = False
    recurrent_weight: Optional[fx.Node] = None  # node holding V with V @ s (linear layout) …
    recurrent_transposed: bool = False          # … or Vᵀ (s @ W style)
    input_scale: float = 1.0
    bias: Optional[fx.Node] = None              # a constant added to the current inside the recurrence
    spike_groups: list = field(default_factory=list)  # per step, every spike call of that membrane
    alpha: Any = None                           # CuBa: the synaptic current's decay (node or value)
    alpha_value: Any = None
    nodes: set = field(default_factory=set)     # every node of the layer (to check outside uses)
    source: Optional[str] = None
    neurons: int = 0
    beta_value: Any = None
    threshold_value: Any = None
    notes: list = field(default_factory=list)
    number: int = -1  # its place among the matches when layers are excluded: what ``excluded_layers`` keys name


def _per_neuron(ratio: torch.Tensor) -> Optional[torch.Tensor]:
    """The (N,) vector when every batch row of ``ratio`` agrees, else None."""
    flat = ratio.reshape(ratio.shape[0], -1) if ratio.dim() > 1 else ratio.reshape(1, -1)
    first = flat[0]
    if not torch.allclose(flat, first.expand_as(flat), rtol=1e-5, atol=1e-6):
        return None
    return first


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    if a.shape != b.shape or a.is_complex() or b.is_complex():
        return False
    if not a.numel():
        return True
    # Traced values may be bool or integer (a comparison `v > θ`, a count): compared as numbers.
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    return float((a - b).abs().max()) <= rtol * scale


class _Refusal(Exception):
    pass


def _all_zero(node: fx.Node) -> bool:
    """A constant that is all zeros (e.g. ``s0 @ V`` with the zero initial spikes) passes no gradient."""
    value = node.meta.get("value")
    return isinstance(value, torch.Tensor) and not bool(value.detach().ne(0).any())


def _same_constant(a, b) -> bool:
    """Whether two threshold operands are the same constant (fx makes a new get_attr per buffer read)."""
    if a is b:
        return True
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if a.op == "get_attr" and b.op == "get_attr":
            return a.target == b.target
        va, vb = a.meta.get("value"), b.meta.get("value")
        return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape \
            and torch.equal(va, vb)
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return False
    return a == b


def _depends_on_trainable(node: Any, gm: fx.GraphModule) -> bool:
    if not isinstance(node, fx.Node):
        return False
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            value = current.meta.get("value")
            if isinstance(value, torch.nn.Parameter) and value.requires_grad:
                return True
        if current.op in ("call_function", "call_method") and current.target in R.SHAPE_ONLY:
            continue  # zeros_like(w) carries no gradient to w
        stack.extend(current.all_input_nodes)
    return False


class StepFit:
    """Evaluates one step region as ``F(v_prev, s_prev, I) -> v`` on probe tensors."""

    def __init__(self, gm, region, v_prev, s_prev, current, target):
        self.gm, self.region, self.v_prev, self.s_prev = gm, region, v_prev, s_prev
        self.current, self.target = current, target

    def __call__(self, v, s, current):
        env = {self.v_prev: v, self.current: current}
        for spike in (self.s_prev or []):
            env[spike] = s
        return R.evaluate(self.gm, self.region, env)[self.target]


def fit_step(fit: StepFit, like: torch.Tensor, spiking: bool, threshold: Optional[torch.Tensor],
             recurrent: Optional[torch.Tensor]) -> dict:
    """Read β, input scale and the reset rule off a step region by probing it (see module docstring)."""
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    shape, dtype = like.shape, like.dtype
    zeros = torch.zeros(shape, dtype=dtype, device=like.device)

    def rand():
        return torch.rand(shape, generator=generator, dtype=dtype, device="cpu").to(like.device) + 0.5

    theta_b = None
    if spiking:
        theta_b = threshold.reshape(shape[1:]) if len(shape) > 1 else threshold
    with torch.no_grad():
        offset = _per_neuron(fit(zeros, zeros, zeros))
        if offset is None:
            raise _Refusal("the state update adds a term that differs between batch entries")
        offset_b = offset.reshape(shape[1:]) if len(shape) > 1 else offset
        probe = rand()
        scale = _per_neuron((fit(zeros, zeros, probe) - offset_b) / probe)
        if scale is None or not torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-5):
            raise _Refusal("the input current is not added with one scale for all neurons")
        input_scale = float(f"{float(scale.mean()):.6g}")  # float32 probes: 0.9999999 is the user's 1
        # Probes keep s = H(v - θ), as a region that recomputes the reset from v expects, and stay at
        # least 0.5 from 0: β is read as a ratio to v, after the constant term is taken off.
        v = rand() if not spiking else torch.clamp(theta_b, max=0.0) - 0.5 - rand()
        leaked = fit(v, zeros, zeros) - offset_b
        if not _close(fit(0.5 * v, zeros, zeros) - offset_b, 0.5 * leaked) \
                or not _close(fit(v, zeros, probe) - offset_b, leaked + input_scale * probe):
            raise _Refusal("the recurrence is not linear in the previous state and the current "
                           "(β·v + I is expected)")
        beta = _per_neuron(leaked / v)
        if beta is None:
            raise _Refusal("the leak β differs between batch entries")
        bias = None if bool((offset == 0).all()) else offset
        if bias is not None and input_scale != 1.0:
            raise _Refusal("the state update adds both a scaled current and a constant term")
        result = {"beta": beta, "input_scale": input_scale, "reset": "none", "detach_reset": True, "bias": bias}
        beta_b = beta.reshape(shape[1:]) if len(shape) > 1 else beta
        # Far from the example's values too: a clamp or another piecewise step the example never
        # reached must not pass for a linear leak.
        far = 10 * (rand() + 1)
        v_far = -far if not spiking else theta_b - far
        current_far = -far
        if not _close(fit(v_far, zeros, current_far) - offset_b, beta_b * v_far + input_scale * current_far,
                      rtol=1e-4):
            raise _Refusal("the recurrence is not linear over the whole range of the state (a clamp or another "
                           "piecewise operation?)")
        if not spiking:
            return result
        v = theta_b + 2 * torch.rand(shape, generator=generator, dtype=dtype, device="cpu").to(like.device) - 1
        spikes = (v - theta_b > 0).to(dtype)
        beta_b = beta.reshape(shape[1:]) if len(shape) > 1 else beta
        recurrent_in = torch.zeros_like(zeros) if recurrent is None else _recurrent_current(spikes, recurrent)
        delta = fit(v, spikes, zeros) - offset_b - beta_b * v - recurrent_in
        forms = {"subtract": -theta_b * spikes, "zero": -beta_b * v * spikes, "none": torch.zeros_like(v)}
        reset = next((name for name, expected in forms.items() if _close(delta, expected)), None)
        if reset is None:
            raise _Refusal("the reset is none of: subtract the threshold (v - θ·s), to zero (v·(1-s)), none")
        result["reset"] = reset
        v_high = theta_b + 10 * (rand() + 1)
        ones = torch.ones_like(v_high)
        recurrent_high = torch.zeros_like(v_high) if recurrent is None else _recurrent_current(ones, recurrent)
        reset_high = {"subtract": theta_b * ones, "zero": beta_b * v_high, "none": torch.zeros_like(v_high)}[reset]
        if not _close(fit(v_high, ones, zeros) - offset_b, beta_b * v_high - reset_high + recurrent_high, rtol=1e-4):
            raise _Refusal("the recurrence is not linear over the whole range of the membrane (a clamp or another "
                           "piecewise operation?)")
    # Whether the reset carries gradient: d v[t] / d s[t-1] through the region.
    spikes_grad = spikes.clone().requires_grad_(True)
    weights = torch.rand(shape, generator=generator, dtype=dtype, device="cpu").to(like.device)
    with torch.enable_grad():
        out = fit(v, spikes_grad, zeros)
        grad = None
        if out.requires_grad:
            (grad,) = torch.autograd.grad((out * weights).sum(), spikes_grad, allow_unused=True)
    grad = torch.zeros_like(v) if grad is None else grad
    recurrent_grad = torch.zeros_like(v) if recurrent is None else _recurrent_current(weights, recurrent.T)
    attached = {"subtract": -theta_b * weights, "zero": -beta_b * v * weights, "none": torch.zeros_like(v)}[reset]
    if _close(grad, recurrent_grad):
        result["detach_reset"] = True
    elif _close(grad, recurrent_grad + attached):
        result["detach_reset"] = False
    else:
        raise _Refusal("the gradient through the reset or the recurrent input is neither the attached nor the "
                       "detached form (a partly detached recurrent input?)")
    if reset == "none":
        result["detach_reset"] = True
    return result


def _recurrent_current(spikes: torch.Tensor, linear_layout_weight: torch.Tensor) -> torch.Tensor:
    return spikes @ linear_layout_weight.T


_MATMULS = (operator.matmul, torch.matmul, torch.mm, "matmul", "mm", torch.nn.functional.linear)


def _unit_multiple(node, s_prev: fx.Node) -> bool:
    """``s_prev * c`` with c exactly 1 everywhere (snnTorch's ``graded_spikes_factor`` left at 1)."""
    if not R.is_call(node, *R.MULTIPLY) or len(node.args) != 2 or s_prev not in node.args:
        return False
    factor = node.args[1] if node.args[0] is s_prev else node.args[0]
    held = factor.meta.get("value") if isinstance(factor, fx.Node) else factor
    if isinstance(held, torch.Tensor):
        return bool((held == 1).all()) and not held.requires_grad
    return isinstance(held, (int, float)) and held == 1


def _release_spike_copies(layer_nodes: set, groups: list) -> None:
    """Leave outside the layer a unit multiple of its spikes that the recurrence reads and the model
    also uses (snnTorch's ``spk * graded_spikes_factor``, fed to its recurrent linear and returned):
    it is then computed from the fused op's spikes like any later use of them."""
    spikes = {s for group in groups for s in group}
    for node in list(layer_nodes):
        if any(user not in layer_nodes for user in node.users) and any(
                _unit_multiple(node, s) for s in node.all_input_nodes if s in spikes):
            layer_nodes.discard(node)


def _find_recurrent_weight(region: list, s_prev: fx.Node, dependent: set):
    """The ``s[t-1] @ W`` / ``linear(s[t-1], V)`` node's weight in the region, or (None, False)."""
    for node in region:
        if node.op == "call_function" and node.target is torch.nn.functional.linear and (
                node.args[0] is s_prev or _unit_multiple(node.args[0], s_prev)):
            if len(node.args) > 2 and node.args[2] is not None:
                return None, False
            return node.args[1], False
        if R.is_call(node, *[m for m in _MATMULS if m is not torch.nn.functional.linear]) and node.args[0] is s_prev:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight not in dependent:
                return weight, True
    return None, False


def _threshold_of(spike_node: fx.Node, dependent: set):
    """(membrane node, threshold node-or-float or None) from ``spike(v - θ)`` / ``spike(v)``."""
    argument = spike_node.args[0]
    if R.is_call(argument, *R.SUBTRACT) and isinstance(argument.args[0], fx.Node):
        theta = argument.args[1]
        # A threshold is a number or one value per neuron; a constant with a batch dimension (the
        # folded "- s0" of the first step) is part of the update, not a threshold.
        held = theta.meta.get("value") if isinstance(theta, fx.Node) else None
        per_neuron = not isinstance(held, torch.Tensor) or held.dim() <= 1
        if (not isinstance(theta, fx.Node) or theta not in dependent) and per_neuron:
            return argument.args[0], theta, argument
    return argument, None, None


class DetectLifRecurrence:
    """Pass: fill ``context.matches`` with the LIF layers found (see module docstring)."""

    name = "detect_lif_recurrence"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        dependent = R.placeholder_dependent(gm)
        index = R.node_index(gm)
        spike_nodes = [n for n in gm.graph.nodes if "spike" in n.meta]
        for node in gm.graph.nodes:
            if "spike_refusal" in node.meta:
                context.skip(node, node.meta["spike_refusal"])
        membrane_of = {}
        for spike in spike_nodes:
            membrane, theta, shifted = _threshold_of(spike, dependent)
            if isinstance(membrane, fx.Node):
                membrane_of[spike] = (membrane, theta, shifted)
        membranes = {m for m, _, _ in membrane_of.values()}
        # A membrane may feed several spike calls (snnTorch computes the reset from the previous
        # membrane with a second call): all of them are the layer's spikes at that step.
        spike_groups: dict = {}
        for spike in sorted(membrane_of, key=index.__getitem__):
            spike_groups.setdefault(membrane_of[spike][0], []).append(spike)
        spike_set = set(spike_nodes)
        previous = {}
        for membrane in membranes:
            found = set()
            stack, seen = list(membrane.all_input_nodes), set()
            while stack:
                node = stack.pop()
                if node in seen or node in spike_set:
                    continue
                seen.add(node)
                if node in membranes:
                    found.add(node)
                    continue
                stack.extend(node.all_input_nodes)
            if len(found) == 1:
                previous[membrane] = found.pop()
            elif len(found) > 1:
                context.skip(membrane, "its membrane depends on several other membranes without a spike between")
        chains = []
        starts = [m for m in membranes if m not in previous]
        following = {p: m for m, p in previous.items()}
        for start in sorted(starts, key=index.__getitem__):
            chain = [start]
            while chain[-1] in following:
                chain.append(following[chain[-1]])
            chains.append(chain)
        for chain in chains:
            while chain and chain[0] not in dependent:  # a constant initial state fed to a spike call
                chain.pop(0)
            if not chain:
                continue
            if len(chain) < 2:
                context.skip(chain[0], "a single time step: nothing to fuse across time")
                continue
            groups = [spike_groups[m] for m in chain]
            try:
                match = self._match_layer(gm, chain, groups, membrane_of, dependent, index, context)
            except _Refusal as refusal:
                context.skip(chain[0], str(refusal), steps=len(chain))
                continue
            context.matches.append(match)
        context.log(self.name, f"{len(context.matches)} LIF layers matched")
        return False

    def _match_layer(self, gm, chain, groups, membrane_of, dependent, index, context) -> LayerMatch:
        spikes = [group[0] for group in groups]
        every_spike = [s for group in groups for s in group]
        infos = [s.meta["spike"] for s in every_spike]
        if len({(i.surrogate, i.shift, i.fire_at_threshold) for i in infos}) != 1:
            raise _Refusal("the spike function differs between time steps")
        info = infos[0]
        thetas = [membrane_of[s][1] for s in every_spike]
        if not all(_same_constant(t, thetas[0]) for t in thetas):
            raise _Refusal("the threshold differs between time steps")
        theta_node = thetas[0]
        like = chain[0].meta["value"]
        if not isinstance(like, torch.Tensor) or like.dim() < 2 or not like.is_floating_point():
            raise _Refusal("the membrane is not a floating-point (batch, neurons…) tensor")
        neuron_shape = tuple(like.shape[1:])
        theta_value = torch.zeros(neuron_shape, dtype=like.dtype, device=like.device) + info.shift
        if theta_node is not None:
            theta_value = theta_value + torch.as_tensor(
                theta_node.meta["value"] if isinstance(theta_node, fx.Node) else theta_node, dtype=like.dtype,
                device=like.device)
        if theta_value.shape != neuron_shape:
            raise _Refusal("the threshold does not broadcast to one value per neuron")
        layer_nodes: set = set()
        currents: list = [None] * len(chain)
        fitted = None
        recurrent, recurrent_transposed = None, False
        for t in range(1, len(chain)):
            boundary = [chain[t - 1], *groups[t - 1]]
            region = R.step_region(chain[t], boundary, index)
            if not region:
                raise _Refusal("a step's membrane does not depend on the previous step")
            bad = next((n for n in region if R.in_place(n)), None)
            if bad is not None:
                raise _Refusal(f"in-place operation {bad.target} inside the recurrence")
            inputs = R.region_inputs(region, boundary)
            varying = [n for n in inputs if n in dependent]
            if len(varying) != 1:
                raise _Refusal(f"the state update reads {len(varying)} time-varying inputs; one input current "
                               f"is expected")
            currents[t] = varying[0]
            if t == 1 and _current_fed_back(chain, groups, dependent, index):
                # The "current" is fed back from the layer itself: a synaptic state carried across steps.
                return self._match_with_synaptic_state(gm, chain, groups, membrane_of, dependent, index, context,
                                                       info, theta_node, theta_value, like)
            if t == 1:
                recurrent, recurrent_transposed = _find_recurrent_weight(region, spikes[0], dependent)
                recurrent_value = None
                if recurrent is not None:
                    recurrent_value = recurrent.meta["value"]
                    recurrent_value = recurrent_value.T if recurrent_transposed else recurrent_value
                fit = StepFit(gm, region, chain[0], groups[0], currents[1], chain[1])
                fitted = fit_step(fit, like, True, theta_value.reshape(-1), recurrent_value)
                fitted["recurrent_value"] = recurrent_value
            layer_nodes.update(region)
        # Step 0: the current that corresponds to I[1], checked on the traced values.
        beta_value = fitted["beta"].reshape(neuron_shape)
        offset = 0 if fitted["bias"] is None else fitted["bias"].reshape(neuron_shape)
        expected = (chain[0].meta["value"] - offset) / fitted["input_scale"]
        currents[0] = _first_current(chain[0], currents[1], index, dependent, set(currents[1:]), expected)
        if currents[0] is None:
            raise _Refusal("the first step's input current could not be matched to the later steps' "
                           "(is the initial state zero?)")
        layer_nodes.update(R.step_region(chain[0], [currents[0]], index))
        bias = _bias_node(fitted, layer_nodes, chain, dependent, gm)
        _check_traced_steps(chain, spikes, currents, beta_value, theta_value, fitted, info)
        beta = _find_constant_node(fitted["beta"], layer_nodes, chain, dependent, gm)
        # Every learnable constant the update reads must reach the fused op as itself: the bias and
        # the recurrent weight always, β (and θ, read off the spike call) only in exact mode.
        learnable = [n for n in R.region_inputs(sorted(layer_nodes, key=index.__getitem__), set(chain) | set(spikes))
                     if n not in dependent and n is not recurrent and n is not bias and _depends_on_trainable(n, gm)
                     and not _all_zero(n)]
        if isinstance(theta_node, fx.Node) and _depends_on_trainable(theta_node, gm):
            learnable.append(theta_node)
        passed_on = [n for n in learnable if n is beta or (n is theta_node and info.shift == 0.0)]
        if context.requested_backward == "sparse" and passed_on:
            raise _Refusal(f"β or θ is learnable ({passed_on[0].name}), but backward='sparse' treats them as "
                           f"constants; use backward='exact'")
        if isinstance(theta_node, fx.Node) and theta_node in passed_on and (
                not fitted["detach_reset"] or recurrent is not None):
            # The fused op starts from s[-1] = H(v0 - θ) and differentiates it; the model's initial
            # spikes are constant zeros. With gradient flowing into s[-1], θ's gradients would differ.
            raise _Refusal(f"θ is learnable ({theta_node.name}) and the initial spikes reach the gradient (attached "
                           f"reset or recurrent input): the fused op's initial spike H(v0 − θ) is differentiated, "
                           f"the model's constant zeros are not")
        others = [n for n in learnable if n not in passed_on]
        if others:
            raise _Refusal(f"the update reads a learnable value ({others[0].name}) that is not β, θ, a bias or a "
                           f"recurrent weight, so its gradient could not be passed on")
        if beta is None:
            beta = beta_value
        for group, membrane in zip(groups, chain):
            layer_nodes.add(membrane)
            for spike in group:
                layer_nodes.add(spike)
                shifted = membrane_of[spike][2]
                if shifted is not None:
                    layer_nodes.add(shifted)
        _release_spike_copies(layer_nodes, groups)
        kind = "lif"
        return LayerMatch(kind=kind, currents=currents, states=chain, spikes=spikes, beta=beta,
                          threshold=theta_node if (theta_node is not None and info.shift == 0.0
                                                   and isinstance(theta_node, fx.Node)) else theta_value,
                          reset=fitted["reset"], detach_reset=fitted["detach_reset"], surrogate=info.surrogate,
                          fire_at_threshold=info.fire_at_threshold, recurrent_weight=recurrent,
                          recurrent_transposed=recurrent_transposed, input_scale=fitted["input_scale"],
                          nodes=layer_nodes, source=source_of(chain[-1]), neurons=int(torch.tensor(neuron_shape).prod()),
                          beta_value=beta_value, threshold_value=theta_value, bias=bias, spike_groups=groups)


    def _match_with_synaptic_state(self, gm, chain, groups, membrane_of, dependent, index, context, info,
                                   theta_node, theta_value, like) -> LayerMatch:
        """CuBa whose synaptic current also takes the recurrent input: ``syn = α·syn + I + V·s[t-1]``.

        The synaptic state ``syn[t-1]`` is the node the next step's update reads besides the
        membrane and the spikes; with it in the boundary, each step region is
        ``(v, s, syn, I) → (syn', v')``, probed like the plain LIF step.
        """
        steps = len(chain)
        spikes = [group[0] for group in groups]
        carried: list = [None] * steps
        for t in range(1, steps):
            region = R.step_region(chain[t], [chain[t - 1], *groups[t - 1]], index)
            varying = [n for n in R.region_inputs(region, [chain[t - 1], *groups[t - 1]]) if n in dependent]
            if len(varying) != 1:
                raise _Refusal("a synaptic-current recurrence whose steps read several time-varying inputs")
            carried[t - 1] = _carried_state(varying[0], chain[t - 1], dependent, index)
            if carried[t - 1] is None:
                raise _Refusal("the recurrence carries a second state snnopt could not identify")
        currents: list = [None] * steps
        layer_nodes: set = set()
        for t in range(1, steps):
            boundary = [chain[t - 1], *groups[t - 1], carried[t - 1]]
            targets = [chain[t]] + ([carried[t]] if carried[t] is not None else [])
            region = sorted(set().union(*(R.step_region(n, boundary, index) for n in targets)), key=index.__getitem__)
            if any(R.in_place(n) for n in region):
                raise _Refusal("in-place operation inside the recurrence")
            varying = [n for n in R.region_inputs(region, boundary) if n in dependent]
            if len(varying) != 1:
                raise _Refusal(f"the synaptic update reads {len(varying)} time-varying inputs; one is expected")
            currents[t] = varying[0]
            layer_nodes.update(region)
            if t == 1:
                recurrent, transposed = _find_recurrent_weight(region, spikes[0], dependent)
                recurrent_value = None
                if recurrent is not None:
                    recurrent_value = recurrent.meta["value"].T if transposed else recurrent.meta["value"]
                step = _SynapticStep(gm, region, chain[0], groups[0], carried[0], currents[1], chain[1], carried[1])
                fitted = _fit_synaptic_step(step, like, theta_value.reshape(-1), recurrent_value)
                fitted["recurrent_value"] = recurrent_value
                first_region, first_boundary = region, boundary
        neuron_shape = tuple(like.shape[1:])
        offset = 0 if fitted["bias"] is None else fitted["bias"].reshape(neuron_shape)
        currents[0] = _first_current(chain[0], currents[1], index, dependent, set(currents[1:]),
                                     (chain[0].meta["value"] - offset) / fitted["input_scale"])
        if currents[0] is None:
            raise _Refusal("the first step's input current could not be matched to the later steps'")
        layer_nodes.update(R.step_region(chain[0], [currents[0]], index))
        layer_nodes.update(n for n in carried if n is not None)
        _check_traced_synaptic_steps(chain, spikes, carried, currents, theta_value, fitted, info)
        beta = _find_constant_node(fitted["beta"], layer_nodes, chain, dependent, gm)
        alpha = _find_constant_node(fitted["alpha"], layer_nodes, chain, dependent, gm)
        bias = _bias_node(fitted, layer_nodes, chain, dependent, gm)
        # The recurrent weight and the bias carry gradient in both modes (a recurrent linear's bias is a
        # learnable bias); anything else learnable is β, α or θ.
        trainable = [n for n in R.region_inputs(first_region, first_boundary)
                     if n not in dependent and n is not recurrent and n is not bias and _depends_on_trainable(n, gm)]
        if trainable and context.requested_backward == "sparse":
            raise _Refusal("β, α or θ is learnable, but backward='sparse' treats them as constants; "
                           "use backward='exact'")
        for group, membrane in zip(groups, chain):
            layer_nodes.add(membrane)
            for spike in group:
                layer_nodes.add(spike)
                if membrane_of[spike][2] is not None:
                    layer_nodes.add(membrane_of[spike][2])
        _release_spike_copies(layer_nodes, groups)
        beta_value = fitted["beta"].reshape(neuron_shape)
        alpha_value = fitted["alpha"].reshape(neuron_shape)
        return LayerMatch(kind="cuba_lif", currents=currents, states=chain, spikes=spikes,
                          beta=beta if beta is not None else beta_value,
                          threshold=theta_node if (theta_node is not None and info.shift == 0.0
                                                   and isinstance(theta_node, fx.Node)) else theta_value,
                          reset=fitted["reset"], detach_reset=fitted["detach_reset"], surrogate=info.surrogate,
                          fire_at_threshold=info.fire_at_threshold, recurrent_weight=recurrent,
                          recurrent_transposed=transposed, input_scale=fitted["input_scale"], nodes=layer_nodes,
                          source=source_of(chain[-1]), neurons=int(torch.tensor(neuron_shape).prod()),
                          beta_value=beta_value, threshold_value=theta_value, bias=bias, spike_groups=groups,
                          alpha=alpha if alpha is not None else alpha_value, alpha_value=alpha_value)


def _current_fed_back(chain, groups, dependent, index) -> bool:
    """Whether step 2's input current depends on the layer's own earlier membranes or spikes."""
    if len(chain) < 3:
        return False
    boundary = [chain[1], *groups[1]]
    region = R.step_region(chain[2], boundary, index)
    varying = [n for n in R.region_inputs(region, boundary) if n in dependent]
    return len(varying) == 1 and _depends_on_layer(varying[0], chain[:1] + list(groups[0]), index)


def _depends_on_layer(node: fx.Node, layer_nodes, index, depth: int = 12) -> bool:
    targets = set(layer_nodes)
    stack, seen = [(node, 0)], set()
    while stack:
        current, d = stack.pop()
        if current in targets:
            return True
        if current in seen or d > depth:
            continue
        seen.add(current)
        stack.extend((n, d + 1) for n in current.all_input_nodes)
    return False


def _carried_state(next_input: fx.Node, membrane: fx.Node, dependent: set, index) -> Optional[fx.Node]:
    """The latest node that feeds both ``membrane`` (this step) and the next step's input: ``syn``."""
    def ancestors(node, depth=12):
        found, stack = set(), [(node, 0)]
        while stack:
            current, d = stack.pop()
            if current in found or d > depth:
                continue
            found.add(current)
            stack.extend((n, d + 1) for n in current.all_input_nodes if n in dependent)
        return found
    shared = (ancestors(next_input) - {next_input}) & (ancestors(membrane) - {membrane})
    shared = {n for n in shared if n.op != "placeholder"}
    return max(shared, key=index.__getitem__) if shared else None


class _SynapticStep:
    """One step region as ``(v, s, syn, I) -> (syn', v')``."""

    def __init__(self, gm, region, v_prev, s_prev, syn_prev, current, v_next, syn_next):
        self.gm, self.region = gm, region
        self.v_prev, self.s_prev, self.syn_prev, self.current = v_prev, s_prev, syn_prev, current
        self.v_next, self.syn_next = v_next, syn_next

    def __call__(self, v, s, syn, current):
        env = {self.v_prev: v, self.syn_prev: syn, self.current: current}
        for spike in self.s_prev:
            env[spike] = s
        values = R.evaluate(self.gm, self.region, env)
        return values[self.syn_next], values[self.v_next]


def _fit_synaptic_step(step: _SynapticStep, like, threshold, recurrent) -> dict:
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    shape, dtype = like.shape, like.dtype
    z = torch.zeros(shape, dtype=dtype, device=like.device)
    theta = threshold.reshape(shape[1:])

    def rand():
        return torch.rand(shape, generator=generator, dtype=dtype, device="cpu").to(like.device) + 0.5

    def rec(spikes):
        return torch.zeros_like(spikes) if recurrent is None else _recurrent_current(spikes, recurrent)

    with torch.no_grad():
        syn0, _ = step(z, z, z, z)
        offset = _per_neuron(syn0)
        if offset is None:
            raise _Refusal("the synaptic update adds a term that differs between batch entries")
        off = offset.reshape(shape[1:])
        syn_probe, current_probe = rand(), rand()
        alpha = _per_neuron((step(z, z, syn_probe, z)[0] - off) / syn_probe)
        scale = _per_neuron((step(z, z, z, current_probe)[0] - off) / current_probe)
        if alpha is None or scale is None or not torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-5):
            raise _Refusal("the synaptic current is not syn = α·syn + I")
        input_scale = float(scale[0])
        v = torch.clamp(theta, max=0.0) - 0.5 - rand()  # below θ, and away from 0: β is read as a ratio to v
        syn_new, v_new = step(v, z, syn_probe, current_probe)
        expected_syn = alpha.reshape(shape[1:]) * syn_probe + input_scale * current_probe + off
        if not _close(syn_new, expected_syn):
            raise _Refusal("the synaptic current depends on the membrane, or is not linear")
        beta = _per_neuron((v_new - syn_new) / v)
        if beta is None:
            raise _Refusal("the membrane update is not v = β·v + syn − reset")
        beta_b = beta.reshape(shape[1:])
        v = theta + 2 * torch.rand(shape, generator=generator, dtype=dtype, device="cpu").to(like.device) - 1
        spikes = (v - theta > 0).to(dtype)
        syn_new, v_new = step(v, spikes, z, z)
        if not _close(syn_new - off, rec(spikes)):
            raise _Refusal("the spikes enter the synaptic current other than through one recurrent weight")
        delta = v_new - syn_new - beta_b * v
        forms = {"subtract": -theta * spikes, "zero": -beta_b * v * spikes, "none": torch.zeros_like(v)}
        reset = next((name for name, expected in forms.items() if _close(delta, expected)), None)
        if reset is None:
            raise _Refusal("the reset is none of: subtract the threshold (v - θ·s), to zero (v·(1-s)), none")
    spikes_grad = spikes.clone().requires_grad_(True)
    weights = torch.rand(shape, generator=generator, dtype=dtype, device="cpu").to(like.device)
    with torch.enable_grad():
        _, v_new = step(v, spikes_grad, z, z)
        grad = torch.autograd.grad((v_new * weights).sum(), spikes_grad, allow_unused=True)[0] \
            if v_new.requires_grad else None
    grad = torch.zeros_like(v) if grad is None else grad
    recurrent_grad = torch.zeros_like(v) if recurrent is None else _recurrent_current(weights, recurrent.T)
    attached = {"subtract": -theta * weights, "zero": -beta_b * v * weights, "none": torch.zeros_like(v)}[reset]
    if _close(grad, recurrent_grad):
        detach = True
    elif _close(grad, recurrent_grad + attached):
        detach = reset == "none"
    else:
        raise _Refusal("the gradient through the reset or the recurrent input is neither attached nor detached")
    return {"beta": beta, "alpha": alpha, "input_scale": input_scale, "reset": reset, "detach_reset": detach,
            "bias": None if bool((offset == 0).all()) else offset}


def _check_traced_synaptic_steps(chain, spikes, carried, currents, theta, fitted, info) -> None:
    neuron_shape = theta.shape
    beta, alpha = fitted["beta"].reshape(neuron_shape), fitted["alpha"].reshape(neuron_shape)
    offset = 0 if fitted["bias"] is None else fitted["bias"].reshape(neuron_shape)
    recurrent = fitted["recurrent_value"]
    v = torch.zeros_like(chain[0].meta["value"])
    s, syn = torch.zeros_like(v), torch.zeros_like(v)
    for t, (membrane, spike, current) in enumerate(zip(chain, spikes, currents)):
        syn = alpha * syn + fitted["input_scale"] * current.meta["value"] + offset
        if recurrent is not None:
            syn = syn + _recurrent_current(s, recurrent)
        reset = {"subtract": theta * s, "zero": beta * v * s, "none": 0}[fitted["reset"]]
        v = beta * v + syn - reset
        if not _close(v, membrane.meta["value"], rtol=1e-4) or (
                carried[t] is not None and not _close(syn, carried[t].meta["value"], rtol=1e-4)):
            raise _Refusal(f"step {t} of the traced run does not follow the fitted CuBa-LIF equation")
        v, syn = membrane.meta["value"], (carried[t].meta["value"] if carried[t] is not None else syn)
        s = spike.meta["value"]


def _first_current(first_state, second_current, index, dependent, later_currents, expected=None):
    """The node computing I[0], which the tracer folded together with the zero initial state.

    Candidates are the input-dependent ancestors of ``v[0]`` whose traced value is ``expected``
    (what I[0] must be for ``v[0]`` to follow the fitted equation from a zero state). Preferred:
    the same operation as I[1]; then an operation of the same name (``a + b`` / ``a.add(b)``); then
    the earliest, i.e. the one farthest from the folded step-0 arithmetic.
    """
    candidates = []
    # I[0] sits a few operations above v[0]; a bounded search keeps this linear in the graph size.
    stack, seen = [(first_state, 0)], set()
    while stack:
        node, depth = stack.pop()
        if node in seen or depth > _FIRST_STEP_DEPTH:
            continue
        seen.add(node)
        if node in dependent and node not in later_currents:
            value = node.meta.get("value")
            if expected is None or (isinstance(value, torch.Tensor) and value.shape == expected.shape
                                    and _close(value, expected, rtol=1e-5)):
                candidates.append(node)
        stack.extend((n, depth + 1) for n in node.all_input_nodes if n in dependent)

    def name(target):
        return getattr(target, "__name__", str(target)).strip("_")

    def rank(node):
        same = node.op == second_current.op and node.target == second_current.target
        similar = name(node.target) == name(second_current.target)
        return (same, similar, -index[node])

    return max(candidates, key=rank) if candidates else None


def _lif_step(v, s, current, beta, theta, fitted):
    recurrent = fitted.get("recurrent_value")
    cur = current * fitted["input_scale"]
    if fitted.get("bias") is not None:
        cur = cur + fitted["bias"].reshape(cur.shape[1:])
    if recurrent is not None:
        cur = cur + _recurrent_current(s, recurrent)
    reset = fitted["reset"]
    if reset == "subtract":
        new = beta * v + cur - theta * s
    elif reset == "zero":
        new = beta * v * (1 - s) + cur
    else:
        new = beta * v + cur
    return new


def _check_traced_steps(chain, spikes, currents, beta, theta, fitted, info) -> None:
    v = torch.zeros_like(chain[0].meta["value"])
    s = torch.zeros_like(v)
    for t, (membrane, spike, current) in enumerate(zip(chain, spikes, currents)):
        expected = _lif_step(v, s, current.meta["value"], beta, theta, fitted)
        got = membrane.meta["value"]
        if not isinstance(got, torch.Tensor) or not _close(expected, got, rtol=1e-4):
            raise _Refusal(f"step {t} of the traced run does not follow the fitted LIF equation: the initial "
                           f"state is not zero, the steps differ, or spike and reset are not in snnopt's order "
                           f"(v = β·v + I − reset from the previous step's spike, then s = H(v − θ))")
        v = got
        s = spike.meta["value"]
        fires = (v - theta >= 0) if info.fire_at_threshold else (v - theta > 0)
        if not torch.equal(s.to(torch.bool), fires):
            raise _Refusal(f"step {t}: the spikes are not H(v - θ) with the fitted threshold")


def _bias_node(fitted, layer_nodes, chain, dependent, gm) -> Optional[fx.Node]:
    """The node holding the constant term of the update (a bias written inside the loop), if any."""
    if fitted.get("bias") is None:
        return None
    node = _find_constant_node(fitted["bias"], layer_nodes, chain, dependent, gm)
    if node is None:
        raise _Refusal("the state update has a constant term snnopt cannot pass on as a bias")
    return node


def _find_constant_node(value: torch.Tensor, layer_nodes: set, chain, dependent: set, gm) -> Optional[fx.Node]:
    """A graph node (parameter, buffer, computed constant) the layer reads whose value is β."""
    candidates = []
    for node in layer_nodes:
        for arg in node.all_input_nodes:
            if arg in dependent or arg in layer_nodes:
                continue
            held = arg.meta.get("value")
            if isinstance(held, torch.Tensor) and held.numel() in (1, value.numel()):
                try:
                    if torch.allclose(held.detach().to(value.dtype).expand(value.shape) if held.numel() == 1
                                      else held.detach().reshape(value.shape).to(value.dtype), value,
                                      rtol=1e-6, atol=1e-7):
                        candidates.append(arg)
                except RuntimeError:
                    continue
    trainable = [c for c in candidates if _depends_on_trainable(c, gm)]
    if trainable:
        return trainable[0]
    return candidates[0] if candidates else None
