"""Adversarial tests of ``snnopt.optimize``: edge cases of the promise "never a silent change of results".

Every model is small (B <= 8, T <= 20, <= 40 features) and deterministic (seeded generators). Each
test checks the promise on its case:

- ``backward="exact"``: outputs of ``opt`` equal the original's (spikes identical, other values
  <= 1e-5 relative) and every parameter gradient equals the original's (<= 1e-4 relative);
- ``backward="sparse"``: outputs equal, gradients equal the windowed, reset-detached twin's (built
  with :mod:`tests.compiler.style_models`' ``sparse_twin`` helpers) -- or, for a layer snnopt
  refuses, the original's (it is then left as written, with a reason in ``explain(opt).skipped``);
- what snnopt cannot handle raises ``snnopt.UnsupportedModelError`` under ``strict=True``; any
  error it raises on purpose is a ``snnopt.SnnoptError`` with a clear message.

Each case was first written against the compiler as it was; the four it broke (learnable β in sparse mode,
``torch.no_grad()`` inside forward, BatchNorm statistics moved by optimize(), a clamp the example never reaches)
were fixed and now pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import snnopt
from tests.compiler import style_models as zoo
from tests.compiler.checks import assert_gradients_equal, assert_outputs_equal
from tests.compiler.style_models import SuperSpike

MODES = ("exact", "sparse")


# ------------------------------------------------------------------------------ helpers


def spikes_in(batch=6, steps=12, features=24, rate=0.3, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, steps, features, generator=gen) < rate).to(dtype)


def run(model, inputs, seed=1234):
    torch.manual_seed(seed)
    return pytree.tree_leaves(model(*inputs))


def weighted_loss(outputs, seed=99):
    gen = torch.Generator().manual_seed(seed)
    terms = []
    for out in outputs:
        w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        if out.is_floating_point() and out.requires_grad:
            terms.append((out * w).sum())
    return sum(terms)


def grads(model, inputs, seed=1234, named=None):
    """{name: grad} of the parameters (of ``named``, default ``model``) and of inputs that require grad."""
    named = model if named is None else named
    named.zero_grad(set_to_none=True)
    inputs = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
    loss = weighted_loss(run(model, inputs, seed))
    loss.backward()
    result = {name: (None if p.grad is None else p.grad.clone()) for name, p in named.named_parameters()}
    for i, x in enumerate(inputs):
        if x.requires_grad:
            result[f"input{i}"] = x.grad.clone()
    named.zero_grad(set_to_none=True)
    return result


def check(model, opt, inputs, reference=None):
    """Outputs of ``opt`` equal ``model``'s; gradients equal ``reference``'s (default: ``model``)."""
    assert_outputs_equal(run(opt, inputs), run(model, inputs))
    reference = model if reference is None else reference
    expected = grads(reference, inputs)
    got = grads(opt, inputs, named=model)
    assert_gradients_equal(got, expected)


def twin_of(factory, model):
    twin = factory(sparse_twin=True)
    twin.load_state_dict(model.state_dict())
    return twin


def reference_for(backward, factory, model, opt):
    """The twin in sparse mode when a spiking layer was fused; the original otherwise."""
    if backward == "exact":
        return model
    fused_spiking = [l for l in snnopt.explain(opt).layers if l.kind != "leaky_integrator"]
    return twin_of(factory, model) if fused_spiking else model


def two_layer_reference(backward, factory, model, opt):
    """The reference of a TwoLayerPerStepExtras: in sparse mode, only the fused layers are twins."""
    if backward == "exact":
        return model
    fused = {l.neurons for l in snnopt.explain(opt).layers if l.kind != "leaky_integrator"}
    twin = factory(sparse_twin=(model.fc1.out_features in fused, model.fc2.out_features in fused))
    twin.load_state_dict(model.state_dict())
    twin.train(model.training)
    return twin


def fused_kinds(opt):
    return [layer.kind for layer in snnopt.explain(opt).layers]


def accounted(opt):
    """Something was fused or something was explained."""
    report = snnopt.explain(opt)
    return bool(report.layers) or bool(report.skipped)


_linear = zoo._linear
_draw = zoo._draw


# ------------------------------------------------------------------------------ models


class ModuleListNet(zoo._StyleModel):
    """Layers in an nn.ModuleList, stepped by a loop over layers inside the time loop."""

    def __init__(self, sizes=(24, 20, 16, 12), seed=40, **twin):
        super().__init__(**twin)
        self.fcs = nn.ModuleList(_linear(i, o, seed + 10 * k, gain=2.5, bias_mean=0.1)
                                 for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])))
        self.beta, self.threshold = 0.85, 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        vs = [torch.zeros(x.shape[0], fc.out_features) for fc in self.fcs]
        ss = [torch.zeros(x.shape[0], fc.out_features) for fc in self.fcs]
        rec = []
        for t in range(x.shape[1]):
            h = x[:, t]
            for i, fc in enumerate(self.fcs):
                vs[i] = self.beta * vs[i] + fc(h) - self.reset_spikes(ss[i]) * self.threshold
                ss[i] = self.spike_fn(vs[i] - self.threshold)
                h = ss[i]
            rec.append(h)
        return torch.stack(rec, dim=1)


class DictOutputs(zoo._StyleModel):
    """Returns a dict: stacked spikes, the final membrane, the final spikes and spike counts."""

    def __init__(self, n_in=24, n_out=20, seed=41, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.4, bias_mean=0.1)
        self.beta, self.threshold = 0.9, 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features)
        s = torch.zeros_like(v)
        rec = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(s)
        spikes = torch.stack(rec, dim=1)
        return {"spikes": spikes, "membrane": v, "last": (s, spikes.sum(dim=1))}


class LearnableBeta(zoo._StyleModel):
    """Per-neuron β as an nn.Parameter (``form="raw"``) or ``sigmoid`` of one (``form="sigmoid"``)."""

    def __init__(self, n_in=24, n_out=20, seed=42, form="raw", **twin):
        super().__init__(**twin)
        self.form = form
        self.fc = _linear(n_in, n_out, seed, gain=2.4, bias_mean=0.1)
        init = torch.linspace(0.7, 0.95, n_out)
        self.beta = nn.Parameter(init if form == "raw" else torch.log(init / (1 - init)))
        self.threshold = 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        beta = self.beta if self.form == "raw" else torch.sigmoid(self.beta)
        v = torch.zeros(x.shape[0], self.fc.out_features)
        s = torch.zeros_like(v)
        rec = []
        for t in range(x.shape[1]):
            v = beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(s)
        return torch.stack(rec, dim=1).sum(dim=1), v


class LearnableThreshold(zoo._StyleModel):
    """A scalar nn.Parameter threshold, used in the spike and in the (attached) reset."""

    def __init__(self, n_in=24, n_out=20, seed=43, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.4, bias_mean=0.1)
        self.beta = 0.9
        self.threshold = nn.Parameter(torch.tensor(1.1))
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features)
        s = torch.zeros_like(v)
        rec = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(v)
        return torch.stack(rec, dim=1)


class FrozenCurrent(zoo._StyleModel):
    """The whole input current computed under ``torch.no_grad()`` or ``.detach()``ed; a learnable
    bias inside the loop keeps the output differentiable."""

    def __init__(self, n_in=24, n_out=20, seed=44, how="no_grad", **twin):
        super().__init__(**twin)
        self.how = how
        self.fc = _linear(n_in, n_out, seed, gain=2.4, bias_mean=0.0)
        self.b = nn.Parameter(_draw((n_out,), seed + 5, 0.1, 0.1))
        self.beta, self.threshold = 0.9, 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        if self.how == "no_grad":
            with torch.no_grad():
                cur = self.fc(x)
        else:
            cur = self.fc(x).detach()
        v = torch.zeros(x.shape[0], self.fc.out_features)
        s = torch.zeros_like(v)
        rec = []
        for t in range(x.shape[1]):
            v = self.beta * v + cur[:, t] + self.b - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(v)
        return torch.stack(rec, dim=1)


class TwoLayerPerStepExtras(zoo._StyleModel):
    """Two LIF layers in one time loop with something per step between them: dropout on the
    current and the spikes (``extra="dropout"``), BatchNorm1d on the current (``"batchnorm"``),
    or layer 1's spikes through a ReLU and a scaling (``"relu_scale"``)."""

    def __init__(self, n_in=24, n_hidden=20, n_out=16, seed=45, extra="dropout", **twin):
        super().__init__(**twin)
        self.extra = extra
        self.fc1 = _linear(n_in, n_hidden, seed, gain=2.4, bias_mean=0.1)
        self.fc2 = _linear(n_hidden, n_out, seed + 10, gain=2.6, bias_mean=0.15)
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm1d(n_hidden)
        self.beta, self.threshold = 0.85, 1.0
        # sparse_twin may be a pair: which of the two layers is the windowed, reset-detached twin
        twins = self.sparse_twin if isinstance(self.sparse_twin, tuple) else (self.sparse_twin,) * 2
        self.spike1, self.spike2 = (zoo.spike_function(SuperSpike, t, self.window) for t in twins)
        self.reset1, self.reset2 = ((lambda s: s.detach()) if t else (lambda s: s) for t in twins)

    def forward(self, x):
        v1 = torch.zeros(x.shape[0], self.fc1.out_features)
        s1 = torch.zeros_like(v1)
        v2 = torch.zeros(x.shape[0], self.fc2.out_features)
        s2 = torch.zeros_like(v2)
        rec = []
        for t in range(x.shape[1]):
            cur = self.fc1(x[:, t])
            if self.extra == "dropout":
                cur = self.drop(cur)
            elif self.extra == "batchnorm":
                cur = self.bn(cur) + 0.8
            v1 = self.beta * v1 + cur - self.reset1(s1) * self.threshold
            s1 = self.spike1(v1 - self.threshold)
            h = s1
            if self.extra == "dropout":
                h = self.drop(s1)
            elif self.extra == "relu_scale":
                h = 1.5 * torch.relu(s1)
            v2 = self.beta * v2 + self.fc2(h) - self.reset2(s2) * self.threshold
            s2 = self.spike2(v2 - self.threshold)
            rec.append(s2)
        return torch.stack(rec, dim=1)


class DyadicSpikeGE(torch.autograd.Function):
    """Fires *at* the threshold (``u >= 0``), SuperSpike backward."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u >= 0).float()

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad / (100.0 * u.abs() + 1.0) ** 2


class FireAtThreshold(zoo._StyleModel):
    """Dyadic weights and β so the membrane lands *exactly* on θ: ``u >= 0`` must fire there."""

    def __init__(self, n_in=24, n_out=20, seed=46, **twin):
        super().__init__(**twin)
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randint(-1, 3, (n_in, n_out), generator=gen).float() * 0.25)
        self.beta, self.threshold = 0.5, 1.0
        self.spike_fn = self.spike_fn_for(DyadicSpikeGE)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.w.shape[1])
        s = torch.zeros_like(v)
        rec = []
        for t in range(x.shape[1]):
            v = self.beta * v + x[:, t] @ self.w - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(s)
        return torch.stack(rec, dim=1)


class ThresholdInsideSpike(torch.autograd.Function):
    """``(v > 1.0)`` with the threshold inside; backward SuperSpike of ``v - 1``."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return (v > 1.0).float()

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad / (100.0 * (v - 1.0).abs() + 1.0) ** 2


class ThresholdInside(zoo._StyleModel):
    """``s = spike(v)`` with θ = 1 inside the spike function (twin: gate on ``v - 1``)."""

    def __init__(self, n_in=24, n_out=20, seed=47, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.4, bias_mean=0.1)
        self.beta = 0.9

    def spike(self, v):
        if self.sparse_twin:
            # window on |v - 1|: gate the shifted value, then shift back (identity forward)
            v = zoo._WindowGate.apply(v - 1.0, self.window) + 1.0
        return ThresholdInsideSpike.apply(v)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features)
        s = torch.zeros_like(v)
        rec = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s)
            s = self.spike(v)
            rec.append(s)
        return torch.stack(rec, dim=1), torch.stack(rec, dim=1).mean(dim=1)


class Float64Net(zoo._StyleModel):
    """A float64 model whose spike function returns ``.to(u.dtype)`` (``cast="same"``) or, as many
    users write it, ``.float()`` (``cast="float"``: float32 spikes inside a float64 model)."""

    def __init__(self, n_in=24, n_out=20, seed=48, cast="same", **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.4, bias_mean=0.1).double()
        self.beta, self.threshold = 0.9, 1.0
        fn = zoo.ATanSpike if cast == "same" else SuperSpike
        self.spike_fn = self.spike_fn_for(fn)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features, dtype=x.dtype)
        s = torch.zeros_like(v)
        rec, mem = [], []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(s)
            mem.append(v)
        return torch.stack(rec, dim=1), torch.stack(mem, dim=1)


class InitialState(zoo._StyleModel):
    """``forward(x, v0)``: the initial membrane is a second input."""

    def __init__(self, n_in=24, n_out=20, seed=49, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.4, bias_mean=0.1)
        self.beta, self.threshold = 0.9, 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x, v0):
        v = v0
        s = torch.zeros_like(v0)
        rec = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(s)
        return torch.stack(rec, dim=1), v


class ConstantInitialState(zoo._StyleModel):
    """The membrane starts at a nonzero constant (``torch.full(..., 0.6)``), spikes at zero."""

    def __init__(self, n_in=24, n_out=20, seed=50, v_init=0.6, **twin):
        super().__init__(**twin)
        self.v_init = v_init
        self.fc = _linear(n_in, n_out, seed, gain=2.0, bias_mean=0.05)
        self.beta, self.threshold = 0.9, 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        v = torch.full((x.shape[0], self.fc.out_features), self.v_init)
        s = torch.zeros_like(v)
        rec = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(s)
        return torch.stack(rec, dim=1)


class LearnableInitialState(zoo._StyleModel):
    """The initial membrane is an nn.Parameter (per neuron), broadcast over the batch."""

    def __init__(self, n_in=24, n_out=20, seed=51, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.0, bias_mean=0.05)
        self.v0 = nn.Parameter(torch.linspace(-0.5, 0.9, n_out))
        self.beta, self.threshold = 0.9, 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        v = self.v0.expand(x.shape[0], -1)
        s = torch.zeros(x.shape[0], self.fc.out_features)
        rec = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(v)
        return torch.stack(rec, dim=1)


class ClampedMembrane(zoo._StyleModel):
    """``v = clamp(β v + I - θ s, min=-0.5)``: not a LIF once the membrane goes below -0.5."""

    def __init__(self, n_in=24, n_out=20, seed=52, floor=-0.5, **twin):
        super().__init__(**twin)
        self.floor = floor
        self.fc = _linear(n_in, n_out, seed, gain=3.0, bias_mean=0.3)
        self.beta, self.threshold = 0.9, 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features)
        s = torch.zeros_like(v)
        rec = []
        for t in range(x.shape[1]):
            v = torch.clamp(self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold, min=self.floor)
            s = self.spike_fn(v - self.threshold)
            rec.append(v)
        return torch.stack(rec, dim=1)


class IntegrateAndFire(zoo._StyleModel):
    """β = 1 (no leak), reset to zero with ``v * (1 - s)``."""

    def __init__(self, n_in=24, n_out=20, seed=53, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=1.5, bias_mean=0.05)
        self.threshold = 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features)
        s = torch.zeros_like(v)
        rec = []
        for t in range(x.shape[1]):
            v = 1.0 * v * (1 - self.reset_spikes(s)) + self.fc(x[:, t])
            s = self.spike_fn(v - self.threshold)
            rec.append(s)
        return torch.stack(rec, dim=1).sum(dim=1)


class HardThreshold(zoo._StyleModel):
    """Spikes from a bare comparison, ``(v > θ).float()``: no surrogate, so no gradient through them.

    Common in inference code and in a first attempt at training; the loss then reaches the weight
    only through the membrane (returned too). Once crashed optimize() (a tolerance check took
    ``abs`` of the comparison's bool value).
    """

    def __init__(self, n_in=24, n_out=20, seed=61, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.2, bias_mean=0.05)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features)
        spikes, membranes = [], []
        for t in range(x.shape[1]):
            v = 0.9 * v + self.fc(x[:, t])
            s = (v > 1.0).float()
            v = v - s
            spikes.append(s)
            membranes.append(v)
        return torch.stack(spikes, dim=1), torch.stack(membranes, dim=1)


class SharedWeights(zoo._StyleModel):
    """One nn.Linear drives two layers (the second reads the first's spikes)."""

    def __init__(self, n=20, seed=54, **twin):
        super().__init__(**twin)
        self.fc = _linear(n, n, seed, gain=2.8, bias_mean=0.2)
        self.beta, self.threshold = 0.85, 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        v1 = torch.zeros(x.shape[0], self.fc.out_features)
        s1 = torch.zeros_like(v1)
        v2, s2 = torch.zeros_like(v1), torch.zeros_like(v1)
        rec = []
        for t in range(x.shape[1]):
            v1 = self.beta * v1 + self.fc(x[:, t]) - self.reset_spikes(s1) * self.threshold
            s1 = self.spike_fn(v1 - self.threshold)
            v2 = self.beta * v2 + self.fc(s1) - self.reset_spikes(s2) * self.threshold
            s2 = self.spike_fn(v2 - self.threshold)
            rec.append(s2)
        return torch.stack(rec, dim=1)


class DropoutBetweenLoops(zoo._StyleModel):
    """Two layers, one loop each; Dropout on the stacked spikes between them (eval/train switch)."""

    def __init__(self, n_in=24, n_hidden=20, n_out=16, seed=55, **twin):
        super().__init__(**twin)
        self.fc1 = _linear(n_in, n_hidden, seed, gain=2.4, bias_mean=0.1)
        self.fc2 = _linear(n_hidden, n_out, seed + 10, gain=2.6, bias_mean=0.15)
        self.drop = nn.Dropout(0.3)
        self.beta, self.threshold = 0.85, 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def lif(self, cur):
        v = torch.zeros(cur.shape[0], cur.shape[2])
        s = torch.zeros_like(v)
        rec = []
        for t in range(cur.shape[1]):
            v = self.beta * v + cur[:, t] - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            rec.append(s)
        return torch.stack(rec, dim=1)

    def forward(self, x):
        h = self.drop(self.lif(self.fc1(x)))
        return self.lif(self.fc2(h))


def build(factory, mode, inputs, **kw):
    model = factory()
    opt = snnopt.optimize(model, inputs, backward=mode, **kw)
    return model, opt


# ------------------------------------------------------------------------------ tests: structure


@pytest.mark.parametrize("backward", MODES)
def test_modulelist_layers_stepped_in_a_loop(backward):
    inputs = (spikes_in(),)
    model, opt = build(ModuleListNet, backward, inputs)
    assert accounted(opt)
    check(model, opt, inputs, reference_for(backward, ModuleListNet, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_dict_and_tuple_outputs_with_final_membrane(backward):
    inputs = (spikes_in(),)
    model, opt = build(DictOutputs, backward, inputs)
    out = opt(*inputs)
    assert isinstance(out, dict) and set(out) == {"spikes", "membrane", "last"} and isinstance(out["last"], tuple)
    check(model, opt, inputs, reference_for(backward, DictOutputs, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_spikes_through_relu_and_scaling_into_next_layer(backward):
    factory = lambda **kw: TwoLayerPerStepExtras(extra="relu_scale", **kw)  # noqa: E731
    inputs = (spikes_in(),)
    model, opt = build(factory, backward, inputs)
    assert accounted(opt)
    check(model, opt, inputs, two_layer_reference(backward, factory, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_one_linear_shared_by_two_layers(backward):
    inputs = (spikes_in(features=20),)
    model, opt = build(SharedWeights, backward, inputs)
    check(model, opt, inputs, reference_for(backward, SharedWeights, model, opt))


# ------------------------------------------------------------------------------ learnable constants


@pytest.mark.parametrize("form", ["raw", "sigmoid"])
def test_learnable_beta_exact_gradient_matches(form):
    factory = lambda **kw: LearnableBeta(form=form, **kw)  # noqa: E731
    inputs = (spikes_in(),)
    model, opt = build(factory, "exact", inputs)
    check(model, opt, inputs)
    got = grads(opt, inputs, named=model)["beta"]
    assert got is not None and got.abs().sum() > 0


@pytest.mark.parametrize("form", ["raw", "sigmoid"])
def test_learnable_beta_sparse_is_refused_with_a_reason(form):
    factory = lambda **kw: LearnableBeta(form=form, **kw)  # noqa: E731
    inputs = (spikes_in(),)
    model, opt = build(factory, "sparse", inputs)
    report = snnopt.explain(opt)
    assert not [l for l in report.layers if l.kind != "leaky_integrator"], str(report)
    assert any("learnable" in r.reason for r in report.skipped), str(report)
    check(model, opt, inputs)  # left as written: the original's gradients
    with pytest.raises(snnopt.UnsupportedModelError):
        snnopt.optimize(factory(), inputs, backward="sparse", strict=True)


def test_learnable_threshold_exact_gradient_matches():
    inputs = (spikes_in(),)
    model, opt = build(LearnableThreshold, "exact", inputs)
    check(model, opt, inputs)
    assert grads(opt, inputs, named=model)["threshold"] is not None


def test_learnable_threshold_sparse_is_refused_with_a_reason():
    inputs = (spikes_in(),)
    model, opt = build(LearnableThreshold, "sparse", inputs)
    report = snnopt.explain(opt)
    assert not [l for l in report.layers if l.kind != "leaky_integrator"], str(report)
    assert report.skipped, str(report)
    check(model, opt, inputs)
    with pytest.raises(snnopt.UnsupportedModelError):
        snnopt.optimize(LearnableThreshold(), inputs, backward="sparse", strict=True)


@pytest.mark.parametrize("backward", MODES)
def test_hard_threshold_without_surrogate_is_left_alone_and_explained(backward):
    inputs = (spikes_in(),)
    model, opt = build(HardThreshold, backward, inputs)
    assert fused_kinds(opt) == [], str(snnopt.explain(opt))
    reasons = [r.reason for r in snnopt.explain(opt).skipped]
    assert any("surrogate" in r and "(v > θ).float()" in r for r in reasons), reasons
    assert run(model, inputs)[0].sum() > 0, "the layer should fire"
    check(model, opt, inputs)
    with pytest.raises(snnopt.UnsupportedModelError, match="surrogate"):
        snnopt.optimize(HardThreshold(), inputs, backward=backward, strict=True)


def test_a_comparison_outside_a_time_loop_is_not_called_a_spike():
    # A readout thresholded once (after a recurrence of a recognised spike function elsewhere, or
    # none): no chain of comparisons through time, so no bare-threshold reason.
    class Readout(zoo._StyleModel):
        def __init__(self, **twin):
            super().__init__(**twin)
            self.fc = _linear(24, 8, 62, gain=1.0, bias_mean=0.0)

        def forward(self, x):
            acc = torch.zeros(x.shape[0], 8)
            for t in range(x.shape[1]):
                acc = 0.9 * acc + self.fc(x[:, t])
            return acc, (acc > 0.5).float()

    inputs = (spikes_in(),)
    opt = snnopt.optimize(Readout(), inputs)
    assert not any("surrogate" in r.reason for r in snnopt.explain(opt).skipped), str(snnopt.explain(opt))


@torch.library.custom_op("snnopt_test::opaque_lif_step", mutates_args=())
def _opaque_lif_step(current: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LIF step inside a custom op, as SpikingJelly 2.0 runs its neurons (torch.ops.sj_lif)."""
    v = 0.9 * v + current
    s = (v > 1.0).to(v.dtype)
    return s, v - s


@_opaque_lif_step.register_fake
def _(current, v):
    return torch.empty_like(v), torch.empty_like(v)


def _opaque_lif_step_backward(ctx, grad_spikes, grad_v):
    # The reset treated as detached and no surrogate: gradient through the membrane only.
    return grad_v, 0.9 * grad_v


torch.library.register_autograd("snnopt_test::opaque_lif_step", _opaque_lif_step_backward)


class OpaqueNeuron(zoo._StyleModel):
    """A LIF layer whose step is one opaque custom op, its state passed from call to call."""

    def __init__(self, n_in=24, n_out=20, seed=63, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.2, bias_mean=0.05)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features)
        spikes = []
        for t in range(x.shape[1]):
            s, v = torch.ops.snnopt_test.opaque_lif_step(self.fc(x[:, t]), v)
            spikes.append(s + 0.0 * torch.tanh(v))  # the membrane on the output: a gradient path
        return torch.stack(spikes, dim=1)


def test_a_neuron_inside_an_opaque_op_is_explained():
    # Once: "0 layer(s) fused, 0 region(s) left as written", no reason at all.
    inputs = (spikes_in(),)
    model, opt = build(OpaqueNeuron, "sparse", inputs)
    report = snnopt.explain(opt)
    assert fused_kinds(opt) == [], str(report)
    reasons = [r.reason for r in report.skipped]
    assert any("torch.ops.snnopt_test.opaque_lif_step" in r and "opaque" in r for r in reasons), reasons
    assert_outputs_equal(run(opt, inputs), run(model, inputs))
    with pytest.raises(snnopt.UnsupportedModelError, match="opaque"):
        snnopt.optimize(OpaqueNeuron(), inputs, strict=True)


def test_a_spikingjelly_lif_node_is_explained():
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    from spikingjelly.activation_based import functional, surrogate

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _linear(24, 20, 64, gain=2.2, bias_mean=0.05)
            self.lif = neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(), detach_reset=True)

        def forward(self, x):
            functional.reset_net(self)
            return torch.stack([self.lif(self.fc(x[:, t])) for t in range(x.shape[1])], dim=1)

    inputs = (spikes_in(),)
    model = Net()
    opt = snnopt.optimize(model, inputs)
    reasons = " | ".join(r.reason for r in snnopt.explain(opt).skipped)
    assert "opaque" in reasons and "SpikingJelly" in reasons, reasons
    assert_outputs_equal(run(opt, inputs), run(model, inputs))


class StateAcrossCalls(nn.Module):
    """snnTorch's ``init_hidden=True`` as its tutorials use it: ``utils.reset(net)`` outside forward.

    The membrane lives on the module from one call to the next; nothing in forward resets it, so
    the second call starts from the first one's final state. A fused loop would start from zeros
    every call. Once this reached validation and came back as "backward through the graph a
    second time"; now it is named before tracing.
    """

    def __init__(self, reset_in_forward=False):
        super().__init__()
        import snntorch
        from snntorch import surrogate

        self.fc = _linear(24, 20, 65, gain=2.2, bias_mean=0.05)
        self.lif = snntorch.Leaky(beta=0.9, spike_grad=surrogate.atan(alpha=2.0), init_hidden=True)
        self.reset_in_forward = reset_in_forward

    def forward(self, x):
        if self.reset_in_forward:
            self.lif.reset_mem()
        return torch.stack([self.lif(self.fc(x[:, t])) for t in range(x.shape[1])], dim=1)


def test_state_kept_between_calls_is_named_and_left_alone():
    pytest.importorskip("snntorch")
    from snntorch import utils

    inputs = (spikes_in(),)
    model = StateAcrossCalls()
    utils.reset(model)
    opt = snnopt.optimize(model, inputs)
    report = snnopt.explain(opt)
    assert fused_kinds(opt) == [] and len(report.skipped) == 1, str(report)
    reason = report.skipped[0].reason
    assert "lif.mem" in reason and "reset" in reason and "utils.reset(self)" in reason, reason
    assert model.lif.mem.numel() == 0, "optimize() must leave the module's state as it found it"
    utils.reset(model)
    expected = [run(model, inputs), run(model, inputs)]  # the second call starts from the first's state
    utils.reset(model)
    assert_outputs_equal(run(opt, inputs), expected[0])
    assert_outputs_equal(run(opt, inputs), expected[1])
    with pytest.raises(snnopt.UnsupportedModelError, match="previous call"):
        snnopt.optimize(model, inputs, strict=True)
    # Reset at the start of forward: the same layer is fused.
    fused = snnopt.explain(snnopt.optimize(StateAcrossCalls(reset_in_forward=True), inputs)).layers
    assert [layer.kind for layer in fused] == ["lif"]
    # snnTorch keeps β and θ as module tensors: the report shows their values, not a tracer's name.
    assert (fused[0].beta, fused[0].threshold) == ("0.9", "1 (lif.threshold)"), fused[0]


def test_optimize_leaves_the_global_random_state_alone():
    # optimize() runs the model several times (tracing, the state check, validation), dropout included.
    inputs = (spikes_in(),)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    snnopt.optimize(DropoutBetweenLoops(), inputs)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("backward", MODES)
def test_learnable_initial_membrane(backward):
    inputs = (spikes_in(),)
    model, opt = build(LearnableInitialState, backward, inputs)
    check(model, opt, inputs, reference_for(backward, LearnableInitialState, model, opt))


# ------------------------------------------------------------------------------ gradient blocking


@pytest.mark.parametrize("backward", MODES)
def test_detached_input_current(backward):
    factory = lambda **kw: FrozenCurrent(how="detach", **kw)  # noqa: E731
    inputs = (spikes_in(),)
    model, opt = build(factory, backward, inputs)
    check(model, opt, inputs, reference_for(backward, factory, model, opt))
    assert grads(opt, inputs, named=model)["fc.weight"] is None


@pytest.mark.parametrize("backward", MODES)
def test_no_grad_input_current(backward):
    factory = lambda **kw: FrozenCurrent(how="no_grad", **kw)  # noqa: E731
    inputs = (spikes_in(),)
    model, opt = build(factory, backward, inputs)
    check(model, opt, inputs, reference_for(backward, factory, model, opt))


# ------------------------------------------------------------------------------ spike functions


@pytest.mark.parametrize("backward", MODES)
def test_fire_at_threshold_on_exact_hits(backward):
    inputs = (spikes_in(rate=0.4),)
    model, opt = build(FireAtThreshold, backward, inputs)
    # the case is only adversarial if the membrane does land on θ exactly
    with torch.no_grad():
        v = torch.zeros(inputs[0].shape[0], 20)
        s = torch.zeros_like(v)
        hits = 0
        for t in range(inputs[0].shape[1]):
            v = model.beta * v + inputs[0][:, t] @ model.w - s
            hits += int((v == 1.0).sum())
            s = (v >= 1.0).float()
    assert hits > 0
    check(model, opt, inputs, reference_for(backward, FireAtThreshold, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_threshold_inside_the_spike_function(backward):
    inputs = (spikes_in(),)
    model, opt = build(ThresholdInside, backward, inputs)
    assert "lif" in fused_kinds(opt) or snnopt.explain(opt).skipped
    check(model, opt, inputs, reference_for(backward, ThresholdInside, model, opt))


# ------------------------------------------------------------------------------ train-mode layers


@pytest.mark.parametrize("backward", MODES)
def test_dropout_per_step_train_mode(backward):
    factory = lambda **kw: TwoLayerPerStepExtras(extra="dropout", **kw)  # noqa: E731
    inputs = (spikes_in(),)
    model, opt = build(factory, backward, inputs)
    assert model.training
    check(model, opt, inputs, two_layer_reference(backward, factory, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_dropout_per_step_eval_mode(backward):
    factory = lambda **kw: TwoLayerPerStepExtras(extra="dropout", **kw).eval()  # noqa: E731
    inputs = (spikes_in(),)
    model, opt = build(factory, backward, inputs)
    assert "lif" in fused_kinds(opt), str(snnopt.explain(opt))
    check(model, opt, inputs, two_layer_reference(backward, factory, model, opt))


def _batchnorm_model():
    return TwoLayerPerStepExtras(extra="batchnorm")


@pytest.mark.parametrize("backward", MODES)
def test_batchnorm_per_step_train_mode(backward):
    factory = lambda **kw: TwoLayerPerStepExtras(extra="batchnorm", **kw)  # noqa: E731
    inputs = (spikes_in(),)
    model = factory()
    fresh = copy.deepcopy(model.state_dict())
    opt = snnopt.optimize(model, inputs, backward=backward)
    model.load_state_dict(fresh)  # (optimize's own effect on the buffers: see the test below)
    reference = copy.deepcopy(model)
    run(reference, inputs)
    run(opt, inputs)  # one forward of opt: the running statistics move exactly as the original's
    for key, value in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[key].double(), value.double(), rtol=1e-5, atol=1e-7), key
    model.load_state_dict(fresh)
    check(model, opt, inputs, two_layer_reference(backward, factory, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_optimize_does_not_touch_batchnorm_running_stats(backward):
    model = _batchnorm_model()
    before = copy.deepcopy(model.state_dict())
    snnopt.optimize(model, (spikes_in(),), backward=backward)
    after = model.state_dict()
    changed = [key for key, value in before.items() if not torch.equal(after[key], value)]
    assert not changed, changed


@pytest.mark.parametrize("backward", MODES)
def test_optimized_in_eval_mode_then_train(backward):
    inputs = (spikes_in(),)
    model = DropoutBetweenLoops().eval()
    opt = snnopt.optimize(model, inputs, backward=backward)
    opt.train()
    model.train()
    assert opt.training and model.training and model.drop.training
    # dropout must now be active in opt, with the same draws as the original
    check(model, opt, inputs, reference_for(backward, DropoutBetweenLoops, model, opt))
    assert not torch.equal(run(opt, inputs)[0], run(model.eval(), inputs)[0])


# ------------------------------------------------------------------------------ shapes, dtypes, inputs


@pytest.mark.parametrize("backward", MODES)
def test_fully_fused_accepts_other_batch_and_steps(backward):
    inputs = (spikes_in(),)
    model, opt = build(ModuleListNet, backward, inputs)
    if not snnopt.explain(opt).any_shape:
        pytest.skip("not fully fused")
    for shape in (dict(batch=3, steps=7), dict(batch=8, steps=20), dict(batch=1, steps=1)):
        other = (spikes_in(seed=5, **shape),)
        check(model, opt, other, reference_for(backward, ModuleListNet, model, opt))


@pytest.mark.parametrize("backward", MODES)
@pytest.mark.parametrize("name", ["no_reset_then_zero_reset", "cuba_recurrent_batchnorm"])
def test_partially_fused_rejects_other_shapes_with_snnopt_error(backward, name):
    case = {c.name: c for c in zoo.STYLE_CASES}[name]
    model = case.build()
    opt = snnopt.optimize(model, case.example_inputs(), backward=backward)
    assert not snnopt.explain(opt).any_shape
    for shape in (dict(batch=case.batch + 2), dict(steps=case.steps - 3)):
        with pytest.raises(snnopt.SnnoptError, match="traced with shape"):
            opt(*case.example_inputs(**shape))


@pytest.mark.parametrize("backward", MODES)
def test_any_shape_claim_holds_for_time_first_where_zero(backward):
    # the zoo marks this case fully_fused=False, but snnopt reports any_shape: then it must be right
    case = {c.name: c for c in zoo.STYLE_CASES}["time_first_where_zero"]
    model = case.build()
    opt = snnopt.optimize(model, case.example_inputs(), backward=backward)
    if not snnopt.explain(opt).any_shape:
        pytest.skip("fixed shape")
    reference = model if backward == "exact" else case.build(sparse_twin=True)
    for shape in (dict(batch=case.batch + 2), dict(batch=2, steps=case.steps - 5)):
        check(model, opt, case.example_inputs(**shape), reference)


@pytest.mark.parametrize("backward", MODES)
def test_single_step_example_then_many_steps(backward):
    model = DictOutputs()
    opt = snnopt.optimize(model, (spikes_in(steps=1),), backward=backward)
    other = (spikes_in(steps=15, seed=3),)
    if snnopt.explain(opt).any_shape:
        check(model, opt, other, reference_for(backward, DictOutputs, model, opt))
    else:
        with pytest.raises(snnopt.SnnoptError):
            opt(*other)


@pytest.mark.parametrize("backward", MODES)
def test_float64_model(backward):
    inputs = (spikes_in(dtype=torch.float64),)
    factory = lambda **kw: Float64Net(cast="same", **kw)  # noqa: E731
    model, opt = build(factory, backward, inputs)
    assert "lif" in fused_kinds(opt), str(snnopt.explain(opt))
    check(model, opt, inputs, reference_for(backward, factory, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_float64_model_with_float32_spikes(backward):
    inputs = (spikes_in(dtype=torch.float64),)
    factory = lambda **kw: Float64Net(cast="float", **kw)  # noqa: E731
    model, opt = build(factory, backward, inputs)
    check(model, opt, inputs, reference_for(backward, factory, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_initial_state_as_second_input(backward):
    gen = torch.Generator().manual_seed(11)
    x = spikes_in()
    v0 = torch.rand(x.shape[0], 20, generator=gen) * 1.4 - 0.4
    model, opt = build(InitialState, backward, (x, v0))
    ref = reference_for(backward, InitialState, model, opt)
    check(model, opt, (x, v0), ref)
    check(model, opt, (x, v0.requires_grad_(True)), ref)  # gradient to the initial state too
    v1 = torch.rand(x.shape[0], 20, generator=gen) * 1.4 - 0.4
    check(model, opt, (x, v1), ref)


@pytest.mark.parametrize("backward", MODES)
def test_initial_state_input_traced_with_zeros(backward):
    gen = torch.Generator().manual_seed(12)
    x = spikes_in()
    model, opt = build(InitialState, backward, (x, torch.zeros(x.shape[0], 20)))
    v1 = torch.rand(x.shape[0], 20, generator=gen) * 1.4 - 0.4
    check(model, opt, (x, v1), reference_for(backward, InitialState, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_nonzero_constant_initial_membrane(backward):
    inputs = (spikes_in(),)
    model, opt = build(ConstantInitialState, backward, inputs)
    check(model, opt, inputs, reference_for(backward, ConstantInitialState, model, opt))
    other = (spikes_in(batch=3, steps=9, seed=4),)
    if snnopt.explain(opt).any_shape:
        check(model, opt, other, reference_for(backward, ConstantInitialState, model, opt))


def test_exact_mode_input_gradient():
    x = spikes_in().requires_grad_(True)
    model, opt = build(ModuleListNet, "exact", (x.detach(),))
    check(model, opt, (x,))


@pytest.mark.parametrize("backward", MODES)
def test_integrate_and_fire_beta_one(backward):
    inputs = (spikes_in(),)
    model, opt = build(IntegrateAndFire, backward, inputs)
    check(model, opt, inputs, reference_for(backward, IntegrateAndFire, model, opt))


def test_all_zero_example_input():
    x = torch.zeros(6, 12, 24)
    model, opt = build(DictOutputs, "exact", (x,))
    check(model, opt, (x,))
    check(model, opt, (spikes_in(seed=9),))


# ------------------------------------------------------------------------------ nonlinearity


def test_membrane_clamp_hit_in_example_is_not_silently_fused():
    x = spikes_in(rate=0.3)
    model = ClampedMembrane()
    with torch.no_grad():
        model.fc.weight.sub_(0.25)  # strongly negative drive: the clamp is hit in the example
    opt = snnopt.optimize(model, (x,), backward="exact")
    check(model, opt, (x,))


def test_membrane_clamp_hit_only_later():
    model = ClampedMembrane(floor=-3.0)
    with torch.no_grad():
        model.fc.weight.sub_(0.25)
    example = spikes_in(rate=0.01, seed=0)  # sparse example: the membrane stays above -3
    with torch.no_grad():
        assert not (model(example) <= -3.0 + 1e-6).any()
    opt = snnopt.optimize(model, (example,), backward="exact")
    x = spikes_in(rate=0.3, seed=8)
    with torch.no_grad():
        assert (model(x) <= -3.0 + 1e-6).any()  # the clamp matters on this input
    check(model, opt, (x,))


# ------------------------------------------------------------------------------ usage


@pytest.mark.parametrize("backward", MODES)
def test_opt_under_no_grad(backward):
    inputs = (spikes_in(),)
    model, opt = build(ModuleListNet, backward, inputs)
    with torch.no_grad():
        got = run(opt, inputs)
        expected = run(model, inputs)
    assert all(not g.requires_grad for g in got)
    assert_outputs_equal(got, expected)


@pytest.mark.parametrize("backward", MODES)
def test_optimize_same_model_twice(backward):
    inputs = (spikes_in(),)
    model = ModuleListNet()
    first = snnopt.optimize(model, inputs, backward=backward)
    second = snnopt.optimize(model, inputs, backward="exact" if backward == "sparse" else "sparse")
    check(model, first, inputs, reference_for(backward, ModuleListNet, model, first))
    other = "exact" if backward == "sparse" else "sparse"
    check(model, second, inputs, reference_for(other, ModuleListNet, model, second))


@pytest.mark.parametrize("backward", MODES)
def test_optimize_the_optimized_module(backward):
    inputs = (spikes_in(),)
    model = ModuleListNet()
    opt = snnopt.optimize(model, inputs, backward=backward)
    try:
        again = snnopt.optimize(opt, inputs, backward=backward)
    except snnopt.SnnoptError:
        return  # a clear refusal is acceptable
    check(model, again, inputs, reference_for(backward, ModuleListNet, model, opt))


def test_strict_mode_raises_only_snnopt_errors_on_odd_models():
    for factory in (lambda: LearnableBeta(), lambda: ClampedMembrane(), lambda: FrozenCurrent(how="no_grad")):
        try:
            snnopt.optimize(factory(), (spikes_in(),), backward="sparse", strict=True)
        except snnopt.SnnoptError:
            pass


@pytest.mark.parametrize("backward", MODES)
def test_non_contiguous_input(backward):
    inputs = (spikes_in(),)
    model, opt = build(ModuleListNet, backward, inputs)
    x = spikes_in(batch=12, steps=24, seed=6)[::2, ::2]  # strided view, same shape as the example
    assert not x.is_contiguous()
    check(model, opt, (x,), reference_for(backward, ModuleListNet, model, opt))
    x_tf = spikes_in(seed=7).transpose(0, 1).contiguous().transpose(0, 1)  # batch-first view of time-first data
    check(model, opt, (x_tf,), reference_for(backward, ModuleListNet, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_deepcopy_of_opt_trains_the_copy_only(backward):
    inputs = (spikes_in(),)
    model, opt = build(DictOutputs, backward, inputs)
    clone = copy.deepcopy(opt)
    assert_outputs_equal(run(clone, inputs), run(opt, inputs))
    with torch.no_grad():
        clone.get_parameter("fc.weight").mul_(0.5)
    assert not torch.equal(clone.get_parameter("fc.weight"), model.fc.weight)
    check(model, opt, inputs, reference_for(backward, DictOutputs, model, opt))


@pytest.mark.parametrize("backward", MODES)
def test_fixed_shape_modules_raise_snnopt_error_on_other_shapes(backward):
    x, v0 = spikes_in(), torch.rand(6, 20, generator=torch.Generator().manual_seed(13))
    for model, example, other in (
            (InitialState(), (x, v0), (spikes_in(batch=3, steps=7), torch.zeros(3, 20))),
            (ConstantInitialState(), (x,), (spikes_in(batch=3, steps=7),))):
        opt = snnopt.optimize(model, example, backward=backward)
        if snnopt.explain(opt).any_shape:
            check(model, opt, other, reference_for(backward, type(model), model, opt))
        else:
            with pytest.raises(snnopt.SnnoptError, match="traced with shape"):
                opt(*other)
