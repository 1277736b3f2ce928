"""Readable PyTorch references: plain autograd backpropagation through time.

These loops are the ground truth every fast path (CPU kernels, Triton kernels, rewritten graphs)
is tested against, forward values and gradients. They follow :mod:`snnopt.spec` to the letter and
are deliberately naive: one autograd node per operation per step.

For ``spec.backward == "sparse"`` the reference is the *windowed* network the seed paper's sparse
backward differentiates exactly: surrogate set to zero outside ``|v - θ| < window`` and reset
detached. For ``"exact"`` it is the network as specified.

All tensors are batch-first: ``current`` is ``(B, T, *neurons)``; β, θ, α broadcast against
``neurons``; ``recurrent_weight`` is ``(N, N)`` in ``torch.nn.functional.linear`` layout and needs
a single neuron dimension.

Example::

    >>> spikes, membrane, v_final, syn_final = reference_lif(torch.rand(2, 5, 3), LifSpec(), beta=0.9)
"""

from __future__ import annotations

import torch

from snnopt.spec import LifSpec
from snnopt.surrogate import spike


def reference_lif(current, spec: LifSpec, *, beta, threshold=1.0, alpha=None, recurrent_weight=None,
                  initial_v=None, initial_syn=None):
    """BPTT reference of a LIF/CuBa-LIF layer; returns ``(spikes, membrane, v_final, syn_final)``."""
    window = spec.window if spec.sparse else None
    detach_reset = spec.detach_reset or spec.sparse
    beta = torch.as_tensor(beta, dtype=current.dtype)
    threshold = torch.as_tensor(threshold, dtype=current.dtype)
    state_shape = (current.shape[0],) + tuple(current.shape[2:])
    v = current.new_zeros(state_shape) if initial_v is None else initial_v
    syn = current.new_zeros(state_shape) if initial_syn is None else initial_syn
    if spec.cuba:
        alpha = torch.as_tensor(alpha, dtype=current.dtype)

    def fire(membrane):
        return spike(membrane - threshold, spec.surrogate, window, spec.fire_at_threshold)

    s_prev = fire(v)
    spikes, membranes = [], []
    for t in range(current.shape[1]):
        cur = current[:, t]
        if spec.recurrent:
            cur = cur + s_prev @ recurrent_weight.t()
        if spec.cuba:
            syn = alpha * syn + cur
            drive = syn
        else:
            drive = cur
        reset_spikes = s_prev.detach() if detach_reset else s_prev
        if spec.reset == "subtract":
            v = beta * v + drive - threshold * reset_spikes
        elif spec.reset == "zero":
            v = beta * v * (1.0 - reset_spikes) + drive
        else:
            v = beta * v + drive
        s_prev = fire(v)
        spikes.append(s_prev)
        membranes.append(v)
    return torch.stack(spikes, 1), torch.stack(membranes, 1), v, (syn if spec.cuba else None)


def reference_linear_lif(x, weight, bias, spec: LifSpec, **kwargs):
    """``reference_lif`` fed by ``torch.nn.functional.linear(x, weight, bias)`` at every step."""
    return reference_lif(torch.nn.functional.linear(x, weight, bias), spec, **kwargs)


def reference_leaky_integrator(current, *, beta, initial_state=None):
    """Non-spiking leaky integrator ``out[t] = β out[t-1] + I[t]``; returns ``(outputs, final)``."""
    beta = torch.as_tensor(beta, dtype=current.dtype)
    out = current.new_zeros((current.shape[0],) + tuple(current.shape[2:])) if initial_state is None else initial_state
    outputs = []
    for t in range(current.shape[1]):
        out = beta * out + current[:, t]
        outputs.append(out)
    return torch.stack(outputs, 1), out
