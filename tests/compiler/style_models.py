"""A zoo of spiking networks written the way users write them, for the compiler's behaviour tests.

Every model here is plain PyTorch: a Python loop over time steps in ``forward``, the user's own
``torch.autograd.Function`` spike with a surrogate backward, state created with
``torch.zeros(x.shape[0], n)``. A :class:`StyleCase` wraps one model with its inputs and what a
correct ``snnopt.optimize`` should make of it (how many fused layers of each kind).

Two variants of each model exist, selected by the constructor flag ``sparse_twin``:

- the original (``sparse_twin=False``): what the user trains; ``backward="exact"`` must reproduce
  its gradients;
- the *windowed, reset-detached twin* (``sparse_twin=True``): the same forward computation, but the
  surrogate gradient is multiplied by ``1{|v - θ| < window}`` (one shared gate,
  :func:`spike_function`) and the reset term is detached (:meth:`_StyleModel.reset_spikes`).
  ``backward="sparse"`` must reproduce *its* gradients: that is the seed paper's claim.

snnopt's LIF form (``snnopt/spec.py``) reads the reset from the *previous* step's spike::

    v[t] = β v[t-1] + I[t] - θ s[t-1]          subtract (θ is subtracted after the leak)
    v[t] = β v[t-1] (1 - s[t-1]) + I[t]        zero
    s[t] = H(v[t] - θ)

so the fusable models below update ``v`` first and compute the new spike last; a ``torch.where``
reset tests the previous step's spike. Styles that look alike but differ (the reset applied right
after the spike in the same step, so the next step leaks it; a reset that also discards the input)
are in :data:`UNSUPPORTED_CASES`: fusing them would change the results.

Outputs are tensors or tuples/lists of tensors; tests flatten them with ``torch.utils._pytree``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

WINDOW = 0.2

# ------------------------------------------------------------------------------ spike functions
# Each is a user's own autograd.Function; SURROGATE_FAMILIES says which snnopt.surrogate family
# (name, parameter) its backward is, and the zoo self-test checks the formula on a grid.


class SuperSpike(torch.autograd.Function):
    """The seed paper's spike: H(u), backward 1/(100|u|+1)²."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u > 0).float()

    @staticmethod
    def backward(ctx, grad_output):
        (u,) = ctx.saved_tensors
        return grad_output / (100.0 * u.abs() + 1.0) ** 2


class FastSigmoid(torch.autograd.Function):
    """snnTorch's fast sigmoid, slope passed at the call: backward 1/(slope·|u|+1)²."""

    @staticmethod
    def forward(ctx, u, slope):
        ctx.save_for_backward(u)
        ctx.slope = slope
        return (u > 0).float()

    @staticmethod
    def backward(ctx, grad_output):
        (u,) = ctx.saved_tensors
        return grad_output / (ctx.slope * torch.abs(u) + 1.0) ** 2, None


class ATanSpike(torch.autograd.Function):
    """snnTorch / SpikingJelly ATan with alpha 2: backward (α/2)/(1+(π/2·α·u)²)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return u.gt(0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (u,) = ctx.saved_tensors
        alpha = 2.0
        return alpha / 2 / (1 + (math.pi / 2 * alpha * u).pow(2)) * grad_output


class SigmoidSpike(torch.autograd.Function):
    """Derivative of a logistic of slope 4 (SpikingJelly's Sigmoid)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u > 0).float()

    @staticmethod
    def backward(ctx, grad_output):
        (u,) = ctx.saved_tensors
        sg = torch.sigmoid(4.0 * u)
        return grad_output * 4.0 * sg * (1.0 - sg)


class TriangleSpike(torch.autograd.Function):
    """Piecewise-linear surrogate max(0, 1-|u|); fires *at* the threshold (SpikingJelly's ``u >= 0``)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (u,) = ctx.saved_tensors
        return grad_output * torch.clamp(1.0 - u.abs(), min=0.0)


class BoxcarSpike(torch.autograd.Function):
    """Rectangular surrogate: gradient 1 where |u| < 0.5, else 0."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return u.gt(0).float()

    @staticmethod
    def backward(ctx, grad_output):
        (u,) = ctx.saved_tensors
        return grad_output * (u.abs() < 0.5).float()


class ExpSpike(torch.autograd.Function):
    """A surrogate that is none of snnopt's families: backward exp(-|u|)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u > 0).float()

    @staticmethod
    def backward(ctx, grad_output):
        (u,) = ctx.saved_tensors
        return grad_output * torch.exp(-u.abs())


# fn -> (snnopt family, parameter, extra apply() arguments after u, fires at u == 0)
SURROGATE_FAMILIES: dict[type, tuple[str | None, float | None, tuple, bool]] = {
    SuperSpike: ("superspike", 100.0, (), False),
    FastSigmoid: ("superspike", 25.0, (25.0,), False),
    ATanSpike: ("atan", 2.0, (), False),
    SigmoidSpike: ("sigmoid", 4.0, (), False),
    TriangleSpike: ("triangle", 1.0, (), True),
    BoxcarSpike: ("rectangular", 1.0, (), False),
    ExpSpike: (None, None, (), False),
}


class _WindowGate(torch.autograd.Function):
    """Identity forward; backward keeps the gradient only where |u| < window."""

    @staticmethod
    def forward(ctx, u, window):
        ctx.save_for_backward(u)
        ctx.window = window
        return u.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (u,) = ctx.saved_tensors
        return grad_output * (u.abs() < ctx.window).to(grad_output.dtype), None


def spike_function(fn: type[torch.autograd.Function], sparse_twin: bool, window: float = WINDOW) -> Callable:
    """``fn.apply`` for the original model; for the twin, the same spike with the windowed surrogate.

    The gate sits in front of ``fn`` so its backward becomes σ'(u)·1{|u| < window} whatever ``fn``
    is, with identical forward values. Extra arguments (a slope) pass through to ``fn``.
    """
    if not sparse_twin:
        return fn.apply

    def windowed(u, *args):
        return fn.apply(_WindowGate.apply(u, window), *args)

    return windowed


# ------------------------------------------------------------------------------ deterministic init


def _draw(shape, seed: int, scale: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale + mean


def _linear(in_features: int, out_features: int, seed: int, gain: float = 1.0, bias_mean: float = 0.0,
            bias: bool = True) -> nn.Linear:
    """An nn.Linear with weights N(0, gain²/in) and biases N(bias_mean, 0.1²), drawn from ``seed``."""
    with torch.random.fork_rng():  # nn.Linear's own init draws from the global generator; leave it alone
        fc = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        fc.weight.copy_(_draw((out_features, in_features), seed, gain / math.sqrt(in_features)))
        if bias:
            fc.bias.copy_(_draw((out_features,), seed + 1, 0.1, bias_mean))
    return fc


def _param(shape, seed: int, gain: float = 1.0, mean: float = 0.0) -> nn.Parameter:
    """A raw weight N(mean, gain²/fan_in) with fan_in = shape[0] (``x @ w`` layout)."""
    return nn.Parameter(_draw(shape, seed, gain / math.sqrt(shape[0]), mean))


class _StyleModel(nn.Module):
    """The twin switch every zoo model shares; ``forward`` is the user's code."""

    def __init__(self, sparse_twin: bool = False, window: float = WINDOW):
        super().__init__()
        self.sparse_twin = sparse_twin
        self.window = window

    def spike_fn_for(self, fn):
        return spike_function(fn, self.sparse_twin, self.window)

    def reset_spikes(self, s):
        """The spikes as the reset term sees them: the twin detaches them, the original does not."""
        return s.detach() if self.sparse_twin else s


# ------------------------------------------------------------------------------ supported styles


class EinsumHoisted(_StyleModel):
    """Currents of all steps by one einsum, sliced per step; ``- s*θ`` reset kept in the graph."""

    def __init__(self, n_in=32, n_out=24, seed=1, **twin):
        super().__init__(**twin)
        self.w = nn.Parameter(_draw((n_out, n_in), seed, 2.2 / math.sqrt(n_in), 0.01))
        self.beta = 0.9
        self.threshold = 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        cur = torch.einsum("bti,oi->bto", x, self.w)
        v = torch.zeros(x.shape[0], self.w.shape[0])
        s = torch.zeros(x.shape[0], self.w.shape[0])
        spk_rec, mem_rec = [], []
        for t in range(x.shape[1]):
            v = self.beta * v + cur[:, t] - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            spk_rec.append(s)
            mem_rec.append(v)
        return torch.stack(spk_rec, dim=1), torch.stack(mem_rec, dim=1)


class LinearPerStepTwoLayers(_StyleModel):
    """snnTorch-tutorial shape, hand-written: nn.Linear per step, two LIF layers in one loop.

    Layer 1 resets with ``- θ*s`` (attached), layer 2 with the detached mask ``- s.detach()*θ``.
    Fast sigmoid slope 25 with the slope passed to ``apply``. Output: spike counts of layer 2.
    """

    def __init__(self, n_in=32, n_hidden=28, n_out=20, seed=2, **twin):
        super().__init__(**twin)
        self.fc1 = _linear(n_in, n_hidden, seed, gain=2.0, bias_mean=0.05)
        self.fc2 = _linear(n_hidden, n_out, seed + 10, gain=2.5, bias_mean=0.1)
        self.beta = 0.85
        self.threshold = 1.0
        self.slope = 25.0
        self.spike_grad = self.spike_fn_for(FastSigmoid)

    def forward(self, x):
        mem1 = torch.zeros(x.shape[0], self.fc1.out_features)
        spk1 = torch.zeros(x.shape[0], self.fc1.out_features)
        mem2 = torch.zeros(x.shape[0], self.fc2.out_features)
        spk2 = torch.zeros(x.shape[0], self.fc2.out_features)
        spk2_rec = []
        for t in range(x.shape[1]):
            cur1 = self.fc1(x[:, t])
            mem1 = self.beta * mem1 + cur1 - self.threshold * self.reset_spikes(spk1)
            spk1 = self.spike_grad(mem1 - self.threshold, self.slope)
            cur2 = self.fc2(spk1)
            mem2 = self.beta * mem2 + cur2 - spk2.detach() * self.threshold
            spk2 = self.spike_grad(mem2 - self.threshold, self.slope)
            spk2_rec.append(spk2)
        return torch.stack(spk2_rec, dim=1).sum(dim=1)


class RawMatmulWhereReset(_StyleModel):
    """``x[:, t] @ self.w + self.b`` with raw Parameters; reset ``torch.where(s > 0, v - θ, v)``.

    Per-neuron β as a buffer, θ = 1.25, atan surrogate. A ``where`` on ``s > 0`` carries no
    gradient through the spike, so this reset is detached even in the original. Output: firing
    rates (spikes averaged over time).
    """

    def __init__(self, n_in=30, n_out=20, seed=3, **twin):
        super().__init__(**twin)
        self.w = _param((n_in, n_out), seed, gain=2.6, mean=0.05)
        self.b = nn.Parameter(_draw((n_out,), seed + 1, 0.1, 0.1))
        self.register_buffer("beta", torch.linspace(0.8, 0.95, n_out))
        self.threshold = 1.25
        self.spike_fn = self.spike_fn_for(ATanSpike)

    def forward(self, x):
        batch, steps = x.shape[0], x.shape[1]
        v = torch.zeros(batch, self.w.shape[1])
        s = torch.zeros(batch, self.w.shape[1])
        spikes = []
        for t in range(steps):
            v = self.beta * v + x[:, t] @ self.w + self.b
            v = torch.where(s > 0, v - self.threshold, v)
            s = self.spike_fn(v - self.threshold)
            spikes.append(s)
        return torch.stack(spikes, dim=1).mean(dim=1)


class ZeroResetMul(_StyleModel):
    """Reset to zero written ``β·v·(1 - s)`` (attached); sigmoid surrogate; only last values returned."""

    def __init__(self, n_in=24, n_out=16, seed=4, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.4, bias_mean=0.15)
        self.beta = math.exp(-1.0 / 8.0)
        self.threshold = 1.0
        self.spike_fn = self.spike_fn_for(SigmoidSpike)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features)
        s = torch.zeros(x.shape[0], self.fc.out_features)
        for t in range(x.shape[1]):
            v = self.beta * v * (1 - self.reset_spikes(s)) + self.fc(x[:, t])
            s = self.spike_fn(v - self.threshold)
        return s, v


class TimeFirstWhereZero(_StyleModel):
    """Time-first ``x[t]``; reset to zero by ``torch.where(s > 0, 0, v)``; triangle surrogate firing
    at threshold; a per-step ReLU on the spikes; leaky-integrator readout, max over time."""

    def __init__(self, n_in=32, n_hidden=24, n_out=6, seed=5, **twin):
        super().__init__(**twin)
        self.fc1 = _linear(n_in, n_hidden, seed, gain=2.4, bias_mean=0.1)
        self.fc2 = _linear(n_hidden, n_out, seed + 10, gain=1.0)
        self.beta = 0.9
        self.beta_out = 0.8
        self.threshold = 0.8
        self.spike_fn = self.spike_fn_for(TriangleSpike)

    def forward(self, x):
        v = torch.zeros(x.shape[1], self.fc1.out_features)
        s = torch.zeros(x.shape[1], self.fc1.out_features)
        out = torch.zeros(x.shape[1], self.fc2.out_features)
        out_rec = []
        for t in range(x.shape[0]):
            v = torch.where(s > 0, 0, v)
            v = self.beta * v + self.fc1(x[t])
            s = self.spike_fn(v - self.threshold)
            out = self.beta_out * out + self.fc2(torch.relu(s))
            out_rec.append(out)
        return torch.stack(out_rec).max(dim=0).values


class CubaBoxcar(_StyleModel):
    """Current-based LIF (``syn = α syn + I; v = β v + syn - s.detach()·θ``), currents from one
    nn.Linear call on the whole (B, T, F) input; boxcar surrogate; spikes and membranes returned."""

    def __init__(self, n_in=36, n_out=24, seed=6, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=1.2, bias_mean=0.0)
        self.alpha = 0.7
        self.beta = 0.85
        self.threshold = 1.0
        self.spike_fn = self.spike_fn_for(BoxcarSpike)

    def forward(self, x):
        cur = self.fc(x)
        syn = torch.zeros(x.shape[0], self.fc.out_features)
        mem = torch.zeros(x.shape[0], self.fc.out_features)
        spk = torch.zeros(x.shape[0], self.fc.out_features)
        spk_rec, mem_rec = [], []
        for t in range(x.shape[1]):
            syn = self.alpha * syn + cur[:, t]
            mem = self.beta * mem + syn - spk.detach() * self.threshold
            spk = self.spike_fn(mem - self.threshold)
            spk_rec.append(spk)
            mem_rec.append(mem)
        return torch.stack(spk_rec, dim=1), torch.stack(mem_rec, dim=1)


class RecurrentLayerNormReadout(_StyleModel):
    """Recurrent LIF ``I = x[:, t] @ W + s_prev @ V`` with attached ``- s*θ`` reset; LayerNorm and
    Dropout on the stacked spikes; the seed paper's readout ``out = β out + (1-β)·fc(h[:, t])``;
    output averaged over time."""

    def __init__(self, n_in=32, n_hidden=24, n_out=5, seed=7, **twin):
        super().__init__(**twin)
        self.w_in = _param((n_in, n_hidden), seed, gain=2.2, mean=0.03)
        self.w_rec = _param((n_hidden, n_hidden), seed + 1, gain=0.8)
        self.norm = nn.LayerNorm(n_hidden)
        self.drop = nn.Dropout(0.1)
        self.fc_out = _linear(n_hidden, n_out, seed + 2, gain=1.0)
        self.beta = 0.9
        self.beta_out = 0.85
        self.threshold = 1.0
        self.spike_fn = self.spike_fn_for(SuperSpike)

    def forward(self, x):
        s = torch.zeros(x.shape[0], self.w_in.shape[1])
        v = torch.zeros(x.shape[0], self.w_in.shape[1])
        spk_rec = []
        for t in range(x.shape[1]):
            v = self.beta * v + (x[:, t] @ self.w_in + s @ self.w_rec) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            spk_rec.append(s)
        h = self.drop(self.norm(torch.stack(spk_rec, dim=1)))
        out = torch.zeros(x.shape[0], self.fc_out.out_features)
        outs = []
        for t in range(x.shape[1]):
            out = self.beta_out * out + (1 - self.beta_out) * self.fc_out(h[:, t])
            outs.append(out)
        return torch.stack(outs, dim=1).mean(dim=1)


class CubaRecurrentBatchNorm(_StyleModel):
    """Time-first CuBa with recurrent weights, its input current passed through BatchNorm1d per step
    (so the linear layer cannot be fused with it, but the neuron can); spike counts over time."""

    def __init__(self, n_in=28, n_out=20, seed=8, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=1.0)
        self.bn = nn.BatchNorm1d(n_out)
        self.rec = nn.Parameter(_draw((n_out, n_out), seed + 1, 0.5 / math.sqrt(n_out)))
        self.alpha = 0.6
        self.beta = 0.8
        self.threshold = 1.5
        self.spike_fn = self.spike_fn_for(FastSigmoid)

    def forward(self, x):
        steps, batch = x.shape[0], x.shape[1]
        syn = torch.zeros(batch, self.rec.shape[0])
        v = torch.zeros(batch, self.rec.shape[0])
        s = torch.zeros(batch, self.rec.shape[0])
        spikes = []
        for t in range(steps):
            current = self.bn(self.fc(x[t]))
            syn = self.alpha * syn + current + s @ self.rec.t()
            v = self.beta * v + syn - self.threshold * s.detach()
            s = self.spike_fn(v - self.threshold, 25.0)
            spikes.append(s)
        return torch.stack(spikes, dim=0).sum(dim=0)


class NoResetThenZeroReset(_StyleModel):
    """Two layers, one loop each: a ReLU'd per-step nn.Linear current into a LIF without reset,
    then a hoisted matmul of its stacked spikes into a LIF reset to zero with a detached mask
    ``v·(1 - s.detach())``; both layers' spikes returned, the second also as a membrane record."""

    def __init__(self, n_in=32, n_hidden=24, n_out=16, seed=11, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_hidden, seed, gain=1.0, bias_mean=-0.15)
        self.w2 = _param((n_hidden, n_out), seed + 1, gain=2.0, mean=0.1)
        self.beta1 = 0.7
        self.beta2 = 0.9
        self.threshold = 1.0
        self.spike_fn = self.spike_fn_for(ATanSpike)

    def forward(self, x):
        v = torch.zeros(x.shape[0], self.fc.out_features)
        spk1 = []
        for t in range(x.shape[1]):
            v = self.beta1 * v + torch.relu(self.fc(x[:, t]))
            spk1.append(self.spike_fn(v - self.threshold))
        s1 = torch.stack(spk1, dim=1)
        cur = s1 @ self.w2
        v2 = torch.zeros(x.shape[0], self.w2.shape[1])
        s2 = torch.zeros(x.shape[0], self.w2.shape[1])
        spk2, mem2 = [], []
        for t in range(x.shape[1]):
            v2 = self.beta2 * v2 * (1.0 - s2.detach()) + cur[:, t]
            s2 = self.spike_fn(v2 - self.threshold)
            spk2.append(s2)
            mem2.append(v2)
        return s1, torch.stack(spk2, dim=1), torch.stack(mem2, dim=1)


def _seed_paper(sparse_twin: bool = False, window: float = WINDOW, unbind: bool = False) -> nn.Module:
    """The benchmark's ``DenseEagerSNN`` itself (the paper's loop), scaled to 40-24-24-5.

    Its own spike function takes the window (``window=None``: full surrogate), so the twin is the
    benchmark's windowed variant; its reset is already detached.
    """
    from benchmarks.seed_network import DenseEagerSNN, SeedConfig, initial_weights

    cfg = SeedConfig(inputs=40, hidden=24, outputs=5, steps=16, weight_multiplier=40.0, seed=3)
    model = DenseEagerSNN(cfg, window=window if sparse_twin else None, unbind=unbind)
    with torch.no_grad():
        for param, weight in zip(model.weights(), initial_weights(cfg)):
            param.copy_(weight)
    return model


# ------------------------------------------------------------------------------ unsupported styles


class _OneLayer(_StyleModel):
    """A per-step nn.Linear into one spiking layer; subclasses write the loop."""

    spike_class: type = SuperSpike

    def __init__(self, n_in=32, n_out=20, seed=20, **twin):
        super().__init__(**twin)
        self.fc = _linear(n_in, n_out, seed, gain=2.2, bias_mean=0.05)
        self.beta = 0.9
        self.threshold = 1.0
        self.spike_fn = self.spike_fn_for(self.spike_class)

    def state(self, x):
        return torch.zeros(x.shape[0], self.fc.out_features)


class DataDependentIf(_OneLayer):
    """Resets only when some neuron fired: a Python ``if`` on a tensor value."""

    def forward(self, x):
        v, s = self.state(x), self.state(x)
        spikes = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t])
            if s.sum() > 0:
                v = v - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            spikes.append(s)
        return torch.stack(spikes, dim=1)


class DataDependentWhile(_OneLayer):
    """Clips runaway membranes with a ``while`` on tensor values."""

    def forward(self, x):
        v, s = self.state(x), self.state(x)
        spikes = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            while bool((v > 2.5).any()):
                v = torch.where(v > 2.5, v - 1.0, v)
            s = self.spike_fn(v - self.threshold)
            spikes.append(s)
        return torch.stack(spikes, dim=1)


class NonlinearRecurrence(_OneLayer):
    """The leak depends on the membrane itself: ``v = β·v·sigmoid(v) + I - s·θ``, not LIF."""

    def forward(self, x):
        v, s = self.state(x), self.state(x)
        spikes = []
        for t in range(x.shape[1]):
            v = self.beta * v * torch.sigmoid(v) + 1.3 * self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            spikes.append(s)
        return torch.stack(spikes, dim=1)


class InPlaceState(_OneLayer):
    """State updated in place (``v.mul_(β).add_(I)``) and reset by masked assignment ``v[s > 0] = 0``."""

    def forward(self, x):
        v = self.state(x)
        spikes = []
        for t in range(x.shape[1]):
            v.mul_(self.beta).add_(self.fc(x[:, t]))
            s = self.spike_fn(v - self.threshold)
            v[s > 0] = 0
            spikes.append(s)
        return torch.stack(spikes, dim=1)


class UnknownSurrogate(_OneLayer):
    """A LIF in snnopt's form whose spike's backward, exp(-|u|), is none of snnopt's families."""

    spike_class = ExpSpike

    def forward(self, x):
        v, s = self.state(x), self.state(x)
        spikes = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t]) - self.reset_spikes(s) * self.threshold
            s = self.spike_fn(v - self.threshold)
            spikes.append(s)
        return torch.stack(spikes, dim=1)


class SameStepSubtractReset(_OneLayer):
    """Reset right after the spike, in the same step: ``v = v - s·θ`` after firing.

    The next step then leaks the reset: v[t] = β v[t-1] + I[t] - β θ s[t-1], a reset of βθ, which
    snnopt's LIF (reset θ after the leak) cannot express. Must not be fused.
    """

    def forward(self, x):
        v = self.state(x)
        spikes = []
        for t in range(x.shape[1]):
            v = self.beta * v + self.fc(x[:, t])
            s = self.spike_fn(v - self.threshold)
            v = v - self.reset_spikes(s) * self.threshold
            spikes.append(s)
        return torch.stack(spikes, dim=1)


class SpyTorchCuba(_OneLayer):
    """Zenke's SpyTorch tutorial loop: the spike is read from the membrane *before* the update,
    and the reset multiplies the whole update, input included:
    ``new_mem = (β·mem + syn)·(1 - rst)``. snnopt's zero reset keeps the input. Must not be fused."""

    def forward(self, x):
        syn, mem = self.state(x), self.state(x)
        h = self.fc(x)
        spk_rec, mem_rec = [], []
        for t in range(x.shape[1]):
            out = self.spike_fn(mem - 1.0)
            rst = out.detach()
            new_syn = 0.7 * syn + h[:, t]
            new_mem = (self.beta * mem + syn) * (1.0 - rst)
            mem_rec.append(mem)
            spk_rec.append(out)
            mem = new_mem
            syn = new_syn
        return torch.stack(spk_rec, dim=1), torch.stack(mem_rec, dim=1)


# ------------------------------------------------------------------------------ snnTorch peers


class SnntorchInitLeaky(nn.Module):
    """snnTorch tutorial style: ``mem = lif.init_leaky()`` then ``spk, mem = lif(fc(x[:, t]), mem)``."""

    def __init__(self, n_in=32, n_hidden=24, n_out=16, seed=30, sparse_twin=False, window=WINDOW):
        super().__init__()
        import snntorch
        from snntorch import surrogate

        spike_grad = surrogate.fast_sigmoid(slope=25)
        if sparse_twin:  # snnTorch's reset is detached already; window the surrogate only
            base = spike_grad
            spike_grad = lambda u: base(_WindowGate.apply(u, window))  # noqa: E731
        self.fc1 = _linear(n_in, n_hidden, seed, gain=2.2, bias_mean=0.05)
        self.lif1 = snntorch.Leaky(beta=0.9, spike_grad=spike_grad)
        self.fc2 = _linear(n_hidden, n_out, seed + 10, gain=2.5, bias_mean=0.1)
        self.lif2 = snntorch.Leaky(beta=0.85, spike_grad=spike_grad)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        spk2_rec, mem2_rec = [], []
        for step in range(x.shape[1]):
            spk1, mem1 = self.lif1(self.fc1(x[:, step]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spk2_rec.append(spk2)
            mem2_rec.append(mem2)
        return torch.stack(spk2_rec, dim=1), torch.stack(mem2_rec, dim=1)


class SnntorchInitHidden(nn.Module):
    """snnTorch with ``init_hidden=True``: the membrane lives on the module, reset by ``reset_mem()``."""

    def __init__(self, n_in=32, n_hidden=24, seed=31, sparse_twin=False, window=WINDOW):
        super().__init__()
        import snntorch
        from snntorch import surrogate

        spike_grad = surrogate.atan(alpha=2.0)
        if sparse_twin:
            base = spike_grad
            spike_grad = lambda u: base(_WindowGate.apply(u, window))  # noqa: E731
        self.fc = _linear(n_in, n_hidden, seed, gain=2.2, bias_mean=0.05)
        self.lif = snntorch.Leaky(beta=0.9, spike_grad=spike_grad, init_hidden=True)

    def forward(self, x):
        self.lif.reset_mem()
        spk_rec = []
        for step in range(x.shape[1]):
            spk_rec.append(self.lif(self.fc(x[:, step])))
        return torch.stack(spk_rec, dim=1).sum(dim=1)


def _snntorch_spike_grad(surrogate_fn, sparse_twin: bool, window: float):
    if not sparse_twin:  # snnTorch's reset is detached already; the twin windows the surrogate only
        return surrogate_fn
    return lambda u: surrogate_fn(_WindowGate.apply(u, window))


class SnntorchSynaptic(nn.Module):
    """snnTorch ``Synaptic`` (current-based) then ``Leaky``, states passed explicitly."""

    def __init__(self, n_in=32, n_hidden=24, n_out=16, seed=32, sparse_twin=False, window=WINDOW):
        super().__init__()
        import snntorch
        from snntorch import surrogate

        spike_grad = _snntorch_spike_grad(surrogate.fast_sigmoid(slope=25), sparse_twin, window)
        self.fc1 = _linear(n_in, n_hidden, seed, gain=1.2, bias_mean=0.02)
        self.lif1 = snntorch.Synaptic(alpha=0.7, beta=0.9, spike_grad=spike_grad)
        self.fc2 = _linear(n_hidden, n_out, seed + 10, gain=2.5, bias_mean=0.1)
        self.lif2 = snntorch.Leaky(beta=0.85, spike_grad=spike_grad)

    def forward(self, x):
        syn1, mem1 = self.lif1.init_synaptic()
        mem2 = self.lif2.init_leaky()
        spikes = []
        for step in range(x.shape[1]):
            spk1, syn1, mem1 = self.lif1(self.fc1(x[:, step]), syn1, mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            spikes.append(spk2)
        return torch.stack(spikes, dim=1)


class SnntorchRecurrent(nn.Module):
    """snnTorch ``RLeaky`` or ``RSynaptic`` (all-to-all ``nn.Linear`` recurrence, with its bias) in an
    ``nn.Sequential``, ``init_hidden=True``, reset inside ``forward``."""

    def __init__(self, n_in=32, n_hidden=24, seed=33, sparse_twin=False, window=WINDOW, synaptic=False):
        super().__init__()
        import snntorch
        from snntorch import surrogate

        spike_grad = _snntorch_spike_grad(surrogate.atan(alpha=2.0), sparse_twin, window)
        if synaptic:
            lif = snntorch.RSynaptic(alpha=0.7, beta=0.9, linear_features=n_hidden, spike_grad=spike_grad,
                                     init_hidden=True)
        else:
            lif = snntorch.RLeaky(beta=0.9, linear_features=n_hidden, spike_grad=spike_grad, init_hidden=True)
        lif.recurrent = _linear(n_hidden, n_hidden, seed + 20, gain=0.8, bias_mean=-0.02)
        self.net = nn.Sequential(_linear(n_in, n_hidden, seed, gain=1.2 if synaptic else 2.2, bias_mean=0.05), lif)

    def forward(self, x):
        self.net[1].reset_mem()
        return torch.stack([self.net(x[:, step]) for step in range(x.shape[1])], dim=1)


class SnntorchLearnable(nn.Module):
    """snnTorch layers whose decays and threshold are parameters: ``Leaky(learn_beta, learn_threshold)``
    (β read through ``beta.clamp(0, 1)`` at every step) and ``Synaptic(learn_alpha, learn_beta)``."""

    def __init__(self, n_in=32, n_hidden=24, n_out=16, seed=34, sparse_twin=False, window=WINDOW):
        super().__init__()
        import snntorch
        from snntorch import surrogate

        spike_grad = _snntorch_spike_grad(surrogate.fast_sigmoid(slope=25), sparse_twin, window)
        self.fc1 = _linear(n_in, n_hidden, seed, gain=2.2, bias_mean=0.05)
        self.lif1 = snntorch.Leaky(beta=0.9, spike_grad=spike_grad, learn_beta=True, learn_threshold=True)
        self.fc2 = _linear(n_hidden, n_out, seed + 10, gain=1.6, bias_mean=0.05)
        self.lif2 = snntorch.Synaptic(alpha=0.7, beta=0.85, spike_grad=spike_grad, learn_alpha=True,
                                      learn_beta=True)

    def forward(self, x):
        mem1 = self.lif1.init_leaky()
        syn2, mem2 = self.lif2.init_synaptic()
        spikes = []
        for step in range(x.shape[1]):
            spk1, mem1 = self.lif1(self.fc1(x[:, step]), mem1)
            spk2, syn2, mem2 = self.lif2(self.fc2(spk1), syn2, mem2)
            spikes.append(spk2)
        return torch.stack(spikes, dim=1)


# ------------------------------------------------------------------------------ running a case


def run(model, inputs, seed: int = 1234):
    """Outputs of one forward pass as a flat list of tensors (dropout draws seeded)."""
    torch.manual_seed(seed)
    return pytree.tree_leaves(model(*inputs))


def weighted_loss(outputs, seed: int = 99):
    """A fixed random-weighted sum of all outputs; output k always gets the same weights."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out.shape, generator=gen) for out in outputs]
    return sum((out * w).sum() for out, w in zip(outputs, weights) if out.requires_grad)


def gradients(model, inputs):
    """``{name: grad}`` of every parameter after backward of :func:`weighted_loss`."""
    model.zero_grad(set_to_none=True)
    weighted_loss(run(model, inputs)).backward()
    return {name: p.grad for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------ cases


def spike_inputs(batch: int, steps: int, features: int, rate: float, seed: int, time_first: bool) -> torch.Tensor:
    """Bernoulli spike trains, float32, ``(B, T, F)`` or ``(T, B, F)``."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, steps, features, generator=gen) < rate).float()
    return x.transpose(0, 1).contiguous() if time_first else x


@dataclass(frozen=True, eq=False)
class StyleCase:
    """One model of the zoo, its inputs and what ``snnopt.optimize`` should make of it.

    ``fully_fused``: every time-dependent region becomes a fused op, so the optimized module
    must accept other batch sizes and step counts; False where per-step non-spiking ops stay.
    """

    name: str
    model: Callable[..., nn.Module]
    features: int
    expected_fused: dict[str, int]
    styles: tuple[str, ...]
    time_first: bool = False
    batch: int = 6
    steps: int = 16
    input_rate: float = 0.3
    input_seed: int = 0
    fully_fused: bool = True
    window: float = WINDOW
    modes: tuple[str, ...] = ("exact", "sparse")  # the backward modes that fuse it

    def build(self, sparse_twin: bool = False) -> nn.Module:
        return self.model(sparse_twin=sparse_twin, window=self.window)

    def example_inputs(self, batch: int | None = None, steps: int | None = None) -> tuple[torch.Tensor, ...]:
        seed = self.input_seed if batch is None and steps is None else self.input_seed + 1000
        return (spike_inputs(batch or self.batch, steps or self.steps, self.features, self.input_rate, seed,
                             self.time_first),)


@dataclass(frozen=True, eq=False)
class UnsupportedCase(StyleCase):
    """A model ``snnopt.optimize`` must leave alone, and the words its reason should contain."""

    expected_fused: dict[str, int] = field(default_factory=dict)
    styles: tuple[str, ...] = ()
    reason: str = ""
    expected_reason_keywords: tuple[str, ...] = ()
    fully_fused: bool = False


STYLE_CASES: list[StyleCase] = [
    StyleCase("seed_paper", _seed_paper, features=40, expected_fused={"lif": 2, "leaky_integrator": 1},
              styles=("seed paper network", "hoisted matmul sliced per step", "superspike(100)", "reset detached",
                      "reset state variable", "leaky integrator (1-beta) scaling", "output max over time",
                      "several layers", "batch-first", "output stacked"),
              input_rate=0.2),
    StyleCase("seed_paper_unbind", lambda **kw: _seed_paper(unbind=True, **kw), features=40,
              expected_fused={"lif": 2, "leaky_integrator": 1},
              styles=("seed paper network", "unbind steps", "superspike(100)"), input_rate=0.2),
    StyleCase("einsum_hoisted", EinsumHoisted, features=32, expected_fused={"lif": 1},
              styles=("hoisted einsum sliced per step", "reset s*theta", "reset attached", "superspike(100)",
                      "output stacked", "membrane records", "batch-first")),
    StyleCase("linear_per_step_two_layers", LinearPerStepTwoLayers, features=32, expected_fused={"lif": 2},
              styles=("per-step nn.Linear", "reset theta*s", "reset detached mask", "reset attached",
                      "fast_sigmoid(25)", "several layers", "output summed")),
    StyleCase("raw_matmul_where_reset", RawMatmulWhereReset, features=30, expected_fused={"lif": 1},
              styles=("per-step matmul raw parameters", "reset where subtract", "atan(2)", "per-neuron beta buffer",
                      "output averaged")),
    StyleCase("zero_reset_mul", ZeroResetMul, features=24, expected_fused={"lif": 1},
              styles=("reset zero (1-s)", "reset attached", "sigmoid(4)", "output last value")),
    StyleCase("time_first_where_zero", TimeFirstWhereZero, features=32,
              expected_fused={"lif": 1, "leaky_integrator": 1}, time_first=True, fully_fused=True,
              styles=("time-first", "reset zero where", "triangle(1)", "fire at threshold", "relu per step",
                      "leaky integrator readout", "output max over time")),
    StyleCase("cuba_boxcar", CubaBoxcar, features=36, expected_fused={"cuba_lif": 1},
              styles=("cuba", "hoisted nn.Linear sliced per step", "reset detached mask", "rectangular(1)",
                      "membrane records", "output stacked")),
    StyleCase("recurrent_layernorm_readout", RecurrentLayerNormReadout, features=32,
              expected_fused={"lif": 1, "leaky_integrator": 1},
              styles=("recurrent", "reset s*theta", "reset attached", "layernorm on stacked", "dropout on stacked",
                      "leaky integrator (1-beta) scaling", "output averaged", "several layers")),
    StyleCase("cuba_recurrent_batchnorm", CubaRecurrentBatchNorm, features=28, expected_fused={"cuba_lif": 1},
              time_first=True, fully_fused=False,
              styles=("cuba", "recurrent", "time-first", "batchnorm1d per step", "reset theta*s",
                      "reset detached mask", "fast_sigmoid(25)", "output summed")),
    StyleCase("no_reset_then_zero_reset", NoResetThenZeroReset, features=32, expected_fused={"lif": 2},
              fully_fused=False,
              styles=("no reset", "relu per step", "reset zero (1-s)", "reset detached mask", "several layers",
                      "hoisted matmul sliced per step", "atan(2)", "membrane records", "output stacked")),
]

UNSUPPORTED_CASES: list[UnsupportedCase] = [
    UnsupportedCase("data_dependent_if", DataDependentIf, features=32,
                    reason="a Python `if` on a tensor value inside the time loop",
                    expected_reason_keywords=("control flow",)),
    UnsupportedCase("data_dependent_while", DataDependentWhile, features=32,
                    reason="a `while` loop on tensor values inside the time loop",
                    expected_reason_keywords=("control flow",)),
    UnsupportedCase("nonlinear_recurrence", NonlinearRecurrence, features=32,
                    reason="v[t] depends nonlinearly on v[t-1] (β·v·sigmoid(v)): not a LIF recurrence",
                    expected_reason_keywords=("recurrence",)),
    UnsupportedCase("in_place_state", InPlaceState, features=32,
                    reason="the membrane is updated in place (mul_/add_, masked assignment)",
                    expected_reason_keywords=("in-place",)),
    UnsupportedCase("unknown_surrogate", UnknownSurrogate, features=32,
                    reason="the spike function's backward exp(-|u|) is none of snnopt's surrogate families",
                    expected_reason_keywords=("surrogate",)),
    UnsupportedCase("same_step_subtract_reset", SameStepSubtractReset, features=32,
                    reason="the reset is applied after the spike in the same step and then leaked (reset βθ)",
                    expected_reason_keywords=("reset",)),
    UnsupportedCase("spytorch_cuba", SpyTorchCuba, features=32,
                    reason="spike read before the update; the zero reset also discards the input current",
                    expected_reason_keywords=("reset",)),
]

PEER_CASES: list[StyleCase] = [
    StyleCase("snntorch_init_leaky", SnntorchInitLeaky, features=32, expected_fused={"lif": 2},
              styles=("snntorch leaky init_leaky", "fast_sigmoid(25)", "membrane records", "several layers")),
    StyleCase("snntorch_init_hidden", SnntorchInitHidden, features=32, expected_fused={"lif": 1},
              styles=("snntorch leaky init_hidden", "atan(2)", "output summed")),
    StyleCase("snntorch_synaptic", SnntorchSynaptic, features=32, expected_fused={"cuba_lif": 1, "lif": 1},
              styles=("snntorch synaptic", "cuba", "fast_sigmoid(25)", "several layers", "output stacked")),
    StyleCase("snntorch_rleaky", SnntorchRecurrent, features=32, expected_fused={"lif": 1},
              styles=("snntorch rleaky init_hidden", "recurrent", "nn.Linear recurrence with bias", "atan(2)",
                      "output stacked")),
    StyleCase("snntorch_rsynaptic", functools.partial(SnntorchRecurrent, synaptic=True), features=32,
              expected_fused={"cuba_lif": 1},
              styles=("snntorch rsynaptic init_hidden", "cuba", "recurrent", "nn.Linear recurrence with bias",
                      "atan(2)", "output stacked")),
    # β, α and θ are parameters: backward="sparse" treats them as constants and refuses (tested apart).
    StyleCase("snntorch_learnable", SnntorchLearnable, features=32, expected_fused={"lif": 1, "cuba_lif": 1},
              styles=("snntorch learn_beta learn_threshold", "snntorch synaptic learn_alpha", "learnable beta",
                      "cuba", "several layers", "output stacked"), modes=("exact",)),
]

ALL_CASES: list[StyleCase] = STYLE_CASES + UNSUPPORTED_CASES + PEER_CASES

# The styles issue 4 lists; the self-test checks STYLE_CASES cover each one.
REQUIRED_STYLES = (
    "hoisted einsum sliced per step", "per-step nn.Linear", "per-step matmul raw parameters",
    "reset s*theta", "reset theta*s", "reset detached mask", "reset where subtract",
    "reset zero (1-s)", "reset zero where", "no reset", "reset detached", "reset attached",
    "cuba", "recurrent", "leaky integrator readout", "leaky integrator (1-beta) scaling",
    "batch-first", "time-first", "output stacked", "output summed", "output averaged",
    "output max over time", "output last value", "membrane records",
    "layernorm on stacked", "batchnorm1d per step", "dropout on stacked", "relu per step", "several layers",
    "superspike(100)", "fast_sigmoid(25)", "atan(2)", "sigmoid(4)", "triangle(1)", "rectangular(1)",
    "seed paper network",
)
