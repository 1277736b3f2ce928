"""``torch.nn`` modules around :mod:`snnopt.functional`: :class:`LIF`, :class:`LinearLIF`, :class:`LeakyIntegrator`.

Each module processes a whole sequence per call (batch-first by default). Neuron parameters are
buffers, or ``nn.Parameter`` when ``learn_beta`` / ``learn_threshold`` / ``learn_alpha`` is set
(learning them needs ``backward="exact"``). ``backend`` ("auto", "cpu", "triton") chooses the kernels
as in :func:`snnopt.functional.lif`.

Example::

    >>> net = torch.nn.Sequential(LinearLIF(784, 200, beta=0.9), LinearLIF(200, 10, beta=0.9))
    >>> spikes = net((torch.rand(8, 100, 784) < 0.01).float())   # (8, 100, 10)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from snnopt import surrogate as surrogate_lib
from snnopt.errors import InvalidArgumentError
from snnopt.functional import spiking as F
from snnopt.spec import LifSpec


def _neuron_param(module: nn.Module, name: str, value, learn: bool, size: Optional[int]) -> None:
    if learn:
        tensor = value.detach().clone() if isinstance(value, Tensor) else torch.tensor(float(value))
        if size is not None and tensor.dim() == 0:
            tensor = tensor.expand(size).clone()  # one learnable value per neuron
        module.register_parameter(name, nn.Parameter(tensor.to(torch.get_default_dtype())))
    else:
        # Constants keep full precision (a Python float as float64); each call casts them to the
        # input's dtype, exactly as a hand-written loop multiplying by the float would.
        tensor = value.detach().clone() if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
        module.register_buffer(name, tensor)


def _check_backend(backend) -> str:
    # Which kernels run is decided per call from the input's device; only the name is checked here.
    if not isinstance(backend, str) or backend not in F.BACKENDS:
        raise InvalidArgumentError(f"backend: expected one of {F.BACKENDS}, got {backend!r}")
    return backend


def _init_like_linear(weight: Tensor, bias: Optional[Tensor]) -> None:
    # Same as nn.Linear: kaiming-uniform weight, bias uniform in ±1/sqrt(fan_in).
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class _LifOptions(nn.Module):
    def __init__(self, beta, threshold, reset, detach_reset, alpha, surrogate, backward, window, time_dim,
                 fire_at_threshold, learn_beta, learn_threshold, learn_alpha, size: Optional[int], backend="auto"):
        super().__init__()
        self.backend = _check_backend(backend)
        # Validate once at construction so mistakes surface where the model is defined.
        self.spec = LifSpec(reset=reset, detach_reset=detach_reset, surrogate=surrogate_lib.get(surrogate),
                            cuba=alpha is not None, backward=backward, window=window,
                            fire_at_threshold=fire_at_threshold)
        F._check_time_dim(time_dim)
        self.time_dim = time_dim
        _neuron_param(self, "beta", beta, learn_beta, size)
        _neuron_param(self, "threshold", threshold, learn_threshold, size)
        if alpha is not None:
            _neuron_param(self, "alpha", alpha, learn_alpha, size)
        else:
            self.alpha = None

    def _kwargs(self):
        spec = self.spec
        return dict(beta=self.beta, threshold=self.threshold, alpha=self.alpha, reset=spec.reset,
                    detach_reset=spec.detach_reset, surrogate=spec.surrogate, backward=spec.backward,
                    window=spec.window, time_dim=self.time_dim, fire_at_threshold=spec.fire_at_threshold,
                    backend=self.backend)

    def extra_repr(self) -> str:
        return self.spec.describe()


class LIF(_LifOptions):
    """LIF / CuBa-LIF neurons over a whole sequence of input currents (any trailing neuron shape).

    Example::

        >>> LIF(beta=0.9)(torch.rand(4, 20, 3, 8, 8)).shape
        torch.Size([4, 20, 3, 8, 8])
    """

    def __init__(self, beta=0.9, threshold=1.0, *, reset="subtract", detach_reset=True, alpha=None,
                 surrogate=None, backward="sparse", window=0.2, time_dim=1, fire_at_threshold=False,
                 learn_beta=False, learn_threshold=False, learn_alpha=False, backend="auto"):
        super().__init__(beta, threshold, reset, detach_reset, alpha, surrogate, backward, window, time_dim,
                         fire_at_threshold, learn_beta, learn_threshold, learn_alpha, size=None, backend=backend)

    def forward(self, current: Tensor, state=None, *, return_state: bool = False):
        out = F.lif(current, initial_state=state, return_state=return_state, **self._kwargs())
        return (out.spikes, out.state) if return_state else out


class LinearLIF(_LifOptions):
    """``nn.Linear`` feeding LIF neurons, fused (the seed paper's layer); optional recurrence.

    Weights are initialised like ``nn.Linear``; a recurrent weight like a square ``nn.Linear``.

    Example::

        >>> layer = LinearLIF(700, 200, recurrent=True, beta=0.95, backward="exact")
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, recurrent: bool = False,
                 beta=0.9, threshold=1.0, reset="subtract", detach_reset=True, alpha=None, surrogate=None,
                 backward="sparse", window=0.2, time_dim=1, fire_at_threshold=False, learn_beta=False,
                 learn_threshold=False, learn_alpha=False, dtype=None, backend="auto"):
        super().__init__(beta, threshold, reset, detach_reset, alpha, surrogate, backward, window, time_dim,
                         fire_at_threshold, learn_beta, learn_threshold, learn_alpha, size=out_features,
                         backend=backend)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.recurrent_weight = (nn.Parameter(torch.empty(out_features, out_features, dtype=dtype))
                                 if recurrent else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_like_linear(self.weight, self.bias)
        if self.recurrent_weight is not None:
            nn.init.kaiming_uniform_(self.recurrent_weight, a=math.sqrt(5))

    def forward(self, x: Tensor, state=None, *, return_state: bool = False):
        out = F.linear_lif(x, self.weight, self.bias, recurrent_weight=self.recurrent_weight, initial_state=state,
                           return_state=return_state, **self._kwargs())
        return (out.spikes, out.state) if return_state else out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, " + self.spec.describe())


class LeakyIntegrator(nn.Module):
    """Non-spiking leaky readout ``out[t] = β out[t-1] + input[t]`` over a whole sequence.

    Example::

        >>> logits = LeakyIntegrator(beta=0.95)(torch.rand(8, 100, 10)).amax(1)
    """

    def __init__(self, beta=0.9, *, time_dim: int = 1, learn_beta: bool = False, size: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        F._check_time_dim(time_dim)
        self.backend = _check_backend(backend)
        self.time_dim = time_dim
        _neuron_param(self, "beta", beta, learn_beta, size)

    def forward(self, current: Tensor, state: Optional[Tensor] = None, *, return_state: bool = False):
        return F.leaky_integrator(current, beta=self.beta, time_dim=self.time_dim, initial_state=state,
                                  return_state=return_state, backend=self.backend)

    def extra_repr(self) -> str:
        return f"time_dim={self.time_dim}"


class LinearLeakyIntegrator(nn.Module):
    """``nn.Linear`` feeding a leaky readout, fused: ``out[t] = β out[t-1] + input_scale · linear(x[t])``.

    With spiking input the current is built from the spikes' events and the input gradient only
    where a sparse upstream layer reads it (see :func:`snnopt.functional.linear_lif`).

    Example::

        >>> readout = LinearLeakyIntegrator(200, 10, beta=0.9, input_scale=0.1)   # the seed paper's
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, beta=0.9, input_scale: float = 1.0,
                 time_dim: int = 1, learn_beta: bool = False, dtype=None, backend: str = "auto"):
        super().__init__()
        F._check_time_dim(time_dim)
        self.backend = _check_backend(backend)
        self.in_features, self.out_features = in_features, out_features
        self.input_scale, self.time_dim = float(input_scale), time_dim
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        _neuron_param(self, "beta", beta, learn_beta, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_like_linear(self.weight, self.bias)

    def forward(self, x: Tensor, state: Optional[Tensor] = None, *, return_state: bool = False):
        return F.linear_leaky_integrator(x, self.weight, self.bias, beta=self.beta, input_scale=self.input_scale,
                                         time_dim=self.time_dim, initial_state=state, return_state=return_state,
                                         backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_scale={self.input_scale:g}")
