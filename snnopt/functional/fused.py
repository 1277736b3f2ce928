"""The one call the compiler emits for every fused layer.

:func:`fused_layer` dispatches to :func:`snnopt.functional.linear_lif` / :func:`lif` with the
layer's constants; its outputs are always batch-first ``(B, T, N)`` so that the rewritten graph
can slice them per step whatever the layout of the layer's input. The readout (a leaky
integrator) is the same call with ``spiking=False``.

Example::

    >>> spikes, membrane = fused_layer(current, beta=0.9, threshold=1.0, reset="subtract",
    ...                                detach_reset=True, surrogate="superspike:100", backward="sparse")
"""

from __future__ import annotations

import functools
from typing import Optional

import torch.fx
from torch import Tensor

from snnopt.functional.spiking import linear_lif, lif


def graph_leaf(function):
    """Keep ``function`` one node when fx traces code that calls it (e.g. unpickling a GraphModule).

    ``torch.fx`` re-traces a GraphModule's generated code when it is unpickled; a function that
    checks its arguments would see proxies there. This records a call instead, as ``fx.wrap`` does
    for functions called from user code.
    """
    @functools.wraps(function)
    def leaf(*args, **kwargs):
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", leaf, args, kwargs)
        return function(*args, **kwargs)
    return leaf


@graph_leaf
def fused_layer(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                recurrent_weight: Optional[Tensor] = None, *, beta, threshold=1.0, alpha=None, reset: str = "subtract",
                detach_reset: bool = True, surrogate: str = "superspike:100", fire_at_threshold: bool = False,
                backward: str = "sparse", window: float = 0.2, time_dim: int = 1, input_scale: float = 1.0,
                spiking: bool = True, return_membrane: bool = False, backend: str = "auto"):
    """Run one fused layer; returns ``(spikes, membrane)`` batch-first (``membrane`` None unless asked)."""
    if not spiking:
        threshold, reset, backward, return_membrane = float("inf"), "none", "exact", True
    options = dict(beta=beta, threshold=threshold, alpha=alpha, reset=reset, detach_reset=detach_reset, surrogate=surrogate,
                   backward=backward, window=window, time_dim=time_dim, fire_at_threshold=fire_at_threshold,
                   return_membrane=return_membrane, backend=backend)
    if weight is None:
        if input_scale != 1.0:
            x = x * input_scale
        out = lif(x, recurrent_weight=recurrent_weight, **options)
    else:
        if input_scale != 1.0:
            weight = weight * input_scale
            bias = None if bias is None else bias * input_scale
        out = linear_lif(x, weight, bias, recurrent_weight=recurrent_weight, **options)
    spikes, membrane = (out, None) if isinstance(out, Tensor) else (out.spikes, out.membrane)
    if time_dim == 0:
        spikes = spikes.transpose(0, 1)
        membrane = None if membrane is None else membrane.transpose(0, 1)
    return (spikes if spiking else None), membrane


__all__ = ["fused_layer"]
