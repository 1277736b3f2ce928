"""Fused spiking layers as functions: :func:`lif`, :func:`linear_lif`, :func:`leaky_integrator`.

Each call runs a whole layer over all time steps through one ``snnopt::`` custom op: the input
currents for all steps in one matmul (or from the input's events when it is sparse), the
recurrence in one compiled pass, and a backward that is either the exact BPTT gradient or the
seed paper's sparse gradient (see :mod:`snnopt.spec`, README "How the sparse backward works").

Example::

    >>> import torch, snnopt.functional as SF
    >>> x = (torch.rand(8, 100, 784) < 0.01).float()
    >>> w = torch.randn(200, 784, requires_grad=True) * 0.05
    >>> spikes = SF.linear_lif(x, w, beta=0.9)           # (8, 100, 200), sparse backward
    >>> spikes.sum().backward()
"""

from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

import snnopt.ops  # noqa: F401  (registers the torch.ops.snnopt ops)
from snnopt import graphs
from snnopt import surrogate as surrogate_lib
from snnopt.errors import InvalidArgumentError, InvalidTypeError
from snnopt.spec import LifSpec


class LifState(NamedTuple):
    """State of a LIF layer between chunks: membrane ``v`` and synaptic current ``syn`` (CuBa only)."""

    v: Tensor
    syn: Optional[Tensor] = None


class LifOutput(NamedTuple):
    """Returned when ``return_membrane`` or ``return_state`` is set; unrequested fields are None."""

    spikes: Tensor
    membrane: Optional[Tensor]
    state: Optional[LifState]


# Spike tensors produced by a sparse-backward layer, mapped to that layer's active entries. A layer
# fed with such a tensor computes its input gradient only there: the producer's backward reads its
# incoming gradient at its active entries and nowhere else, so the rest would be wasted work.
_SPARSE_PRODUCERS: WeakIdKeyDictionary = WeakIdKeyDictionary()

_FLOAT_DTYPES = (torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)  # Triton backend only: float32 state and accumulation
BACKENDS = ("auto", "cpu", "triton")


def lif(current: Tensor, *, beta, threshold=1.0, reset: str = "subtract", detach_reset: bool = True, alpha=None,
        surrogate=None, backward: str = "sparse", window: float = 0.2, time_dim: int = 1,
        fire_at_threshold: bool = False, initial_state=None, return_membrane: bool = False,
        return_state: bool = False, backend: str = "auto", recurrent_weight: Optional[Tensor] = None):
    """LIF (or, with ``alpha``, current-based LIF) neurons driven by ``current``.

    ``current`` is ``(B, T, *neurons)`` (``time_dim=1``) or ``(T, B, *neurons)`` (``time_dim=0``);
    ``beta``, ``threshold``, ``alpha`` are floats or tensors broadcastable to ``neurons``. Returns
    the spikes, shaped like ``current``, or a :class:`LifOutput` when ``return_membrane`` /
    ``return_state`` ask for more. ``backward="sparse"`` (default) is the seed paper's gradient
    (surrogate zero outside ``|v-θ| < window``, reset detached); ``"exact"`` is full BPTT.

    ``backend``: ``"auto"`` (default) runs CUDA tensors on the generated Triton kernels and CPU
    tensors on the compiled CPU op; ``"cpu"`` / ``"triton"`` force one (``"triton"`` on CPU tensors
    needs ``TRITON_INTERPRET=1``: Triton's interpreter, for testing). float16/bfloat16 inputs need
    the Triton backend; they are integrated in float32.

    ``recurrent_weight`` (``(N, N)``, linear layout; one neuron dimension) adds
    ``s[t-1] @ recurrent_weightᵀ`` to the current, as in :func:`linear_lif`.

    Example::

        >>> spikes = lif(torch.rand(4, 50, 10), beta=0.9, surrogate="atan")
    """
    spec = _make_spec(reset, detach_reset, alpha, surrogate, backward, window, fire_at_threshold,
                      recurrent=recurrent_weight is not None)
    backend = resolve_backend(backend, current, "current")
    _check_tensor("current", current, min_dim=3, backend=backend)
    if recurrent_weight is not None:
        neurons = current.shape[-1]
        _check_tensor("recurrent_weight", recurrent_weight, exact_dim=2, like=current, like_name="current",
                      backend=backend)
        if tuple(recurrent_weight.shape) != (neurons, neurons):
            raise InvalidArgumentError(
                f"recurrent_weight: expected shape ({neurons}, {neurons}), got {tuple(recurrent_weight.shape)}")
    return _run(current, None, None, recurrent_weight, spec, beta, threshold, alpha, time_dim, initial_state,
                return_membrane, return_state, None, backend)


def linear_lif(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, recurrent_weight: Optional[Tensor] = None,
               beta, threshold=1.0, reset: str = "subtract", detach_reset: bool = True, alpha=None, surrogate=None,
               backward: str = "sparse", window: float = 0.2, time_dim: int = 1, fire_at_threshold: bool = False,
               initial_state=None, return_membrane: bool = False, return_state: bool = False,
               input_active="auto", backend: str = "auto"):
    """``lif(torch.nn.functional.linear(x, weight, bias), ...)`` fused: the seed paper's layer.

    Owning the weight lets the backward build the weight gradient from the compact input events
    and the reverse-filtered active entries, never from dense B·T·N tensors. ``recurrent_weight``
    (``(N, N)``, linear layout) adds ``s[t-1] @ recurrent_weightᵀ`` to the current.

    ``input_active`` limits the gradient w.r.t. ``x`` to some entries: an int64 tensor of flat
    indices into the batch-first ``(B, T, in)`` input, ``None`` for the full gradient, or
    ``"auto"`` (default): when ``x`` is the spike output of a sparse-backward snnopt layer, only
    that layer's active entries — the only ones its backward reads, so parameter gradients are
    unchanged. The gradient *at* those spikes is then zero elsewhere: if you read it yourself with
    ``torch.autograd.grad(loss, spikes)``, pass ``input_active=None`` (a ``retain_grad()`` or
    ``register_hook`` on the spikes is noticed and gets the full gradient automatically).
    ``backend`` chooses the kernels as in :func:`lif`.

    Example::

        >>> spikes = linear_lif((torch.rand(2, 30, 5) < .2).float(), torch.rand(3, 5), beta=0.8)
    """
    spec = _make_spec(reset, detach_reset, alpha, surrogate, backward, window, fire_at_threshold,
                      recurrent=recurrent_weight is not None)
    backend = resolve_backend(backend, x, "x")
    _check_tensor("x", x, exact_dim=3, backend=backend)
    _check_tensor("weight", weight, exact_dim=2, like=x, like_name="x", backend=backend)
    if weight.shape[1] != x.shape[-1]:
        raise InvalidArgumentError(
            f"weight: shape {tuple(weight.shape)} does not match x's {x.shape[-1]} input features; "
            f"expected (out_features, {x.shape[-1]})")
    neurons = weight.shape[0]
    if bias is not None:
        _check_tensor("bias", bias, exact_dim=1, like=x, like_name="x", backend=backend)
        if bias.shape[0] != neurons:
            raise InvalidArgumentError(f"bias: expected shape ({neurons},), got {tuple(bias.shape)}")
    if recurrent_weight is not None:
        _check_tensor("recurrent_weight", recurrent_weight, exact_dim=2, like=x, like_name="x", backend=backend)
        if tuple(recurrent_weight.shape) != (neurons, neurons):
            raise InvalidArgumentError(
                f"recurrent_weight: expected shape ({neurons}, {neurons}), got {tuple(recurrent_weight.shape)}")
    if isinstance(input_active, Tensor):
        _check_input_active(input_active, x)
    elif input_active is not None and input_active != "auto":
        raise InvalidTypeError(
            f"input_active: expected 'auto', None or a 1-D int64 tensor of flat indices, got {input_active!r}")
    return _run(x, weight, bias, recurrent_weight, spec, beta, threshold, alpha, time_dim, initial_state,
                return_membrane, return_state, input_active, backend)


def leaky_integrator(current: Tensor, *, beta, time_dim: int = 1, initial_state: Optional[Tensor] = None,
                     return_state: bool = False, backend: str = "auto"):
    """Non-spiking readout ``out[t] = β out[t-1] + current[t]``; exact gradient (it is linear).

    Returns the outputs shaped like ``current``, or ``(outputs, final_state)``.

    Example::

        >>> out = leaky_integrator(torch.rand(4, 50, 10), beta=0.95).amax(1)
    """
    out = lif(current, beta=beta, threshold=float("inf"), reset="none", backward="exact", time_dim=time_dim,
              initial_state=initial_state, return_membrane=True, return_state=return_state, backend=backend)
    return (out.membrane, out.state.v) if return_state else out.membrane


def linear_leaky_integrator(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, beta, input_scale: float = 1.0,
                            time_dim: int = 1, initial_state: Optional[Tensor] = None, return_state: bool = False,
                            input_active="auto", backend: str = "auto"):
    """Readout ``out[t] = β out[t-1] + input_scale · (x[t] @ weightᵀ + bias)``, fused.

    The seed paper's readout with ``input_scale = 1 - β``. Fed with spikes, the current comes
    from their events and, as in :func:`linear_lif`, the input gradient is computed only where a
    sparse-backward producer reads it (``input_active``). Exact gradient (the readout is linear).

    Example::

        >>> logits = linear_leaky_integrator(spikes, w_out, beta=0.9, input_scale=0.1).amax(1)
    """
    if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)):
        raise InvalidTypeError(f"input_scale: expected a float, got {type(input_scale).__name__}")
    if input_scale != 1.0:
        weight = weight * input_scale
        bias = None if bias is None else bias * input_scale
    # As in leaky_integrator: a LIF layer that never fires and is not reset integrates its current.
    out = linear_lif(x, weight, bias, beta=beta, threshold=float("inf"), reset="none", backward="exact",
                     time_dim=time_dim, initial_state=initial_state, return_membrane=True,
                     return_state=return_state, input_active=input_active, backend=backend)
    return (out.membrane, out.state.v) if return_state else out.membrane


# --- shared plumbing ---------------------------------------------------------------------------------


def _make_spec(reset, detach_reset, alpha, surrogate, backward, window, fire_at_threshold, recurrent) -> LifSpec:
    if not isinstance(reset, str):
        raise InvalidTypeError(f"reset: expected one of 'subtract', 'zero', 'none', got {type(reset).__name__}")
    if not isinstance(backward, str):
        raise InvalidTypeError(f"backward: expected 'sparse' or 'exact', got {type(backward).__name__}")
    return LifSpec(reset=reset, detach_reset=detach_reset, surrogate=surrogate_lib.get(surrogate),
                   cuba=alpha is not None, recurrent=recurrent, fire_at_threshold=fire_at_threshold,
                   backward=backward, window=window)


def resolve_backend(backend, x, name: str) -> str:
    """``"cpu"`` or ``"triton"``: the kernels that run ``backend=`` on a tensor like ``x``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InvalidArgumentError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    device = x.device.type if isinstance(x, Tensor) else "cpu"
    if backend == "auto":
        return "triton" if device == "cuda" else "cpu"
    if backend == "cpu" and device != "cpu":
        raise InvalidArgumentError(
            f"{name}: is on {x.device}, but backend='cpu' runs on CPU tensors only; move it with .cpu() "
            f"or use backend='auto' or 'triton'")
    if backend == "triton":
        if device not in ("cpu", "cuda"):
            raise InvalidArgumentError(f"{name}: is on {x.device}; backend='triton' runs on CUDA tensors")
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InvalidArgumentError(
                f"{name}: is a CPU tensor, but backend='triton' runs its kernels on a CUDA GPU; move it with "
                f".cuda(), or set TRITON_INTERPRET=1 before starting Python to run them in Triton's "
                f"(slow) interpreter, or use backend='cpu'")
    return backend


def _run(x, weight, bias, recurrent_weight, spec: LifSpec, beta, threshold, alpha, time_dim, initial_state,
         return_membrane, return_state, input_active, backend):
    _check_time_dim(time_dim)
    seq = x.transpose(0, 1) if time_dim == 0 else x
    batch, steps = seq.shape[0], seq.shape[1]
    if steps < 1 or batch < 1:
        raise InvalidArgumentError(f"x: needs at least one batch entry and one time step, got shape {tuple(x.shape)}")
    if weight is None:
        neuron_shape = tuple(seq.shape[2:])
        canonical = seq.reshape(batch, steps, math.prod(neuron_shape)).contiguous()
    else:
        neuron_shape = (weight.shape[0],)
        canonical = seq.contiguous()
    neurons = math.prod(neuron_shape)
    sparse = spec.sparse
    beta_n = _per_neuron("beta", beta, neuron_shape, x, allow_grad=not sparse)
    theta_n = _per_neuron("threshold", threshold, neuron_shape, x, allow_grad=not sparse)
    alpha_n = None if alpha is None else _per_neuron("alpha", alpha, neuron_shape, x, allow_grad=not sparse)
    if recurrent_weight is not None and weight is None and len(neuron_shape) != 1:
        raise InvalidArgumentError("recurrent_weight: needs a single neuron dimension")
    v0, syn0 = _initial_state(initial_state, batch, neuron_shape, x, spec.cuba, backend)
    tensors = [t for t in (x, weight, bias, recurrent_weight, beta_n, theta_n, alpha_n, v0, syn0) if t is not None]
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    eager = not torch.compiler.is_compiling()
    if isinstance(input_active, str):  # "auto"
        input_active = (_upstream_active(x, time_dim, batch, steps)
                        if weight is not None and eager and needs_backward and x.requires_grad else None)
    if backend == "triton":
        from snnopt import triton_ops  # imported only here: `import snnopt` needs neither triton nor a GPU
        op = triton_ops.lif_triton  # the op, or in plain eager mode its implementation (no dispatcher)
    else:
        op = torch.ops.snnopt.lif
    outs = op(
        canonical, weight, bias, recurrent_weight, beta_n, theta_n, alpha_n, v0.reshape(batch, neurons),
        None if syn0 is None else syn0.reshape(batch, neurons), input_active,
        spec.reset, spec.detach_reset, spec.surrogate.name, spec.surrogate.param, spec.fire_at_threshold,
        spec.backward, spec.window, bool(return_membrane), needs_backward)
    spikes = _user_layout(outs[0], batch, steps, neuron_shape, time_dim)
    if sparse and needs_backward and eager:
        active = _active_flat_index_fn(outs, backend, steps, neurons)
        if active is not None:
            _SPARSE_PRODUCERS[spikes] = (active, steps, neurons, time_dim, spikes._version, batch)
    if not (return_membrane or return_state):
        return spikes
    membrane = _user_layout(outs[1], batch, steps, neuron_shape, time_dim) if return_membrane else None
    state = None
    if return_state:
        state = LifState(outs[2].reshape((batch,) + neuron_shape),
                         outs[3].reshape((batch,) + neuron_shape) if spec.cuba else None)
    return LifOutput(spikes, membrane, state)


def _active_flat_index_fn(outs, backend: str, steps: int, neurons: int):
    """A thunk giving the layer's active entries as flat indices into (B, T, N), or None if none are listed."""
    if backend == "triton":
        flat = outs[7]  # the Triton op lists them flat already
        return lambda: flat
    offsets, index = outs[6], outs[7]
    if not offsets.numel():
        return None
    return lambda: snnopt.ops.active_flat_index(offsets, index, steps, neurons)


def _upstream_active(x: Tensor, time_dim: int, batch: int, steps: int) -> Optional[Tensor]:
    entry = _SPARSE_PRODUCERS.get(x)
    if entry is None:
        return None
    active, producer_steps, neurons, producer_time_dim, version, producer_batch = entry
    if (version != x._version or producer_time_dim != time_dim or producer_steps != steps
            or neurons != x.shape[-1] or producer_batch != batch):
        return None
    return active()


def _check_input_active(input_active: Tensor, x: Tensor) -> None:
    if input_active.dtype != torch.int64 or input_active.dim() != 1:
        raise InvalidTypeError(
            f"input_active: expected a 1-D int64 tensor of flat indices into (B, T, in), got "
            f"{input_active.dtype} with shape {tuple(input_active.shape)}")
    if input_active.device != x.device:
        raise InvalidArgumentError(f"input_active: on {input_active.device} but x is on {x.device}")
    # Under a CUDA-graph capture plan the list may be an upstream layer's padded one and nothing may
    # read the device: the kernels skip indices outside [0, B·T·in) there instead.
    if input_active.numel() and graphs.active_plan() is None:
        low, high = torch.stack([input_active.min(), input_active.max()]).tolist()  # one device sync, not two
        if low < 0 or high >= x.numel():
            raise InvalidArgumentError(
                f"input_active: indices must lie in [0, {x.numel()}) (flat positions in the batch-first x of "
                f"shape {tuple(x.shape)}), got values from {low} to {high}")


def _user_layout(t: Tensor, batch, steps, neuron_shape, time_dim) -> Tensor:
    shape = (batch, steps) + tuple(neuron_shape)
    if tuple(t.shape) != shape:  # no view when none is needed: the next layer sees the op's own output
        t = t.reshape(shape)
    return t.transpose(0, 1) if time_dim == 0 else t


def _check_time_dim(time_dim) -> None:
    if isinstance(time_dim, bool) or time_dim not in (0, 1):
        raise InvalidArgumentError(f"time_dim: expected 0 (time-first) or 1 (batch-first), got {time_dim!r}")


def _check_tensor(name, t, *, min_dim=None, exact_dim=None, like=None, like_name=None, backend="cpu") -> None:
    if not isinstance(t, Tensor):
        raise InvalidTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype in _HALF_DTYPES and backend != "triton":
        raise InvalidTypeError(
            f"{name}: dtype {t.dtype} runs only on the Triton backend (CUDA tensors, or backend='triton'); "
            f"cast it to float32 for the CPU backend")
    if t.dtype not in _FLOAT_DTYPES + _HALF_DTYPES:
        raise InvalidTypeError(f"{name}: expected dtype float32 or float64 (or float16/bfloat16 on the Triton "
                               f"backend), got {t.dtype}")
    if exact_dim is not None and t.dim() != exact_dim:
        raise InvalidArgumentError(f"{name}: expected {exact_dim} dimensions, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise InvalidArgumentError(
            f"{name}: expected at least {min_dim} dimensions (batch, time, neurons...), got shape {tuple(t.shape)}")
    if t.device.type != "cpu" and backend != "triton":
        raise InvalidArgumentError(
            f"{name}: is on {t.device}, but the CPU backend runs on CPU tensors only; move it with .cpu() "
            f"or use backend='triton'")
    if like is not None:
        if t.dtype != like.dtype:
            raise InvalidTypeError(f"{name}: dtype {t.dtype} differs from {like_name}'s {like.dtype}; cast one of them")
        if t.device != like.device:
            raise InvalidArgumentError(f"{name}: on {t.device} but {like_name} is on {like.device}")


def _param_dtype(like: Tensor) -> torch.dtype:
    # β, θ, α stay float32 for half-precision inputs: the state is integrated in float32 anyway.
    return torch.float32 if like.dtype in _HALF_DTYPES else like.dtype


def _per_neuron(name, value, neuron_shape, like: Tensor, allow_grad: bool) -> Tensor:
    """β/θ/α as a flat ``(N,)`` tensor in ``like``'s dtype; gradients flow back through the expand."""
    neurons = math.prod(neuron_shape)
    if isinstance(value, bool):
        raise InvalidTypeError(f"{name}: expected a float or a tensor, got bool")
    dtype = _param_dtype(like)
    if isinstance(value, numbers.Real):
        return torch.full((neurons,), float(value), dtype=dtype, device=like.device)
    if not isinstance(value, Tensor):
        raise InvalidTypeError(f"{name}: expected a float or a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise InvalidTypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    if value.device != like.device:
        raise InvalidArgumentError(f"{name}: on {value.device} but the input is on {like.device}")
    if value.requires_grad and not allow_grad and torch.is_grad_enabled():
        raise InvalidArgumentError(
            f"{name}: requires grad, but backward='sparse' treats it as a constant; "
            f"use backward='exact' to learn it, or pass {name}.detach()")
    try:
        expanded = value.to(dtype).expand(neuron_shape) if value.dim() <= len(neuron_shape) else None
    except RuntimeError:
        expanded = None
    if expanded is None:
        raise InvalidArgumentError(
            f"{name}: shape {tuple(value.shape)} does not broadcast to the neuron shape {tuple(neuron_shape)}")
    return expanded.reshape(neurons)


def _state_tensor(name, value, batch, neuron_shape, like: Tensor, backend: str) -> Tensor:
    if value is None:
        return torch.zeros((batch, math.prod(neuron_shape)), dtype=like.dtype, device=like.device)
    _check_tensor(name, value, like=like, like_name="the input", backend=backend)
    if tuple(value.shape) != (batch,) + tuple(neuron_shape):
        raise InvalidArgumentError(
            f"{name}: expected shape {(batch,) + tuple(neuron_shape)} (batch, *neurons), got {tuple(value.shape)}")
    return value.reshape(batch, math.prod(neuron_shape))


def _initial_state(initial_state, batch, neuron_shape, like: Tensor, cuba: bool, backend: str):
    if initial_state is None:
        v, syn = None, None
    elif isinstance(initial_state, Tensor):
        v, syn = initial_state, None
    elif isinstance(initial_state, tuple) and len(initial_state) in (1, 2):
        v, syn = initial_state[0], (initial_state[1] if len(initial_state) == 2 else None)
    else:
        raise InvalidTypeError("initial_state: expected None, a tensor v, or a LifState / (v, syn) tuple")
    if syn is not None and not cuba:
        raise InvalidArgumentError("initial_state: a synaptic current was given but the layer has no alpha (not CuBa)")
    v0 = _state_tensor("initial_state.v", v, batch, neuron_shape, like, backend)
    syn0 = _state_tensor("initial_state.syn", syn, batch, neuron_shape, like, backend) if cuba else None
    return v0, syn0
