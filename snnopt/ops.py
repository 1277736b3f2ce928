"""The fused spiking-layer ops, as ``torch.library`` custom ops.

``snnopt::lif`` runs a whole (linear →) LIF / CuBa-LIF layer over all time steps in one call;
``snnopt::lif_backward`` is its backward, itself an op so that ``torch.compile`` and
``torch.export`` keep both whole. The non-spiking readout is the same op with θ = +inf and no
reset (a LIF that never fires is a leaky integrator of its current). Users reach them through
:mod:`snnopt.functional`; the compiler emits them directly.

Arguments are canonical: batch-first contiguous ``(B, T, features)`` tensors, per-neuron ``(N,)``
parameters, explicit ``(B, N)`` initial state. Besides the user-facing results the forward op
returns what its backward needs, in compact form (see ``_lif_fake``); ``setup_context`` saves
only those. Where a piece is not needed it is an empty tensor, so the op has one fixed signature.

Example::

    >>> outs = torch.ops.snnopt.lif(x, w, None, None, beta, theta, None, v0, None, None,
    ...                             "subtract", True, "superspike", 100.0, False, "sparse", 0.2, False, True)
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from snnopt.codegen import cpu_lif
from snnopt.surrogate import SURROGATE_CODES

# Above this fraction of nonzeros a BLAS matmul beats walking events (measured on 2 cores).
MAX_EVENT_DENSITY = 0.1

# numba's "workqueue" threading layer (the fallback when TBB is missing, see cpu_lif) must not be
# entered by two Python threads at once; serialising the op bodies keeps multi-threaded callers safe.
_KERNEL_LOCK = threading.Lock()


def _serialised(fn):
    if cpu_lif.KERNELS_THREAD_SAFE:
        return fn

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with _KERNEL_LOCK:
            return fn(*args, **kwargs)
    return locked


def outside_autocast(fn):
    """Run an op body with autocast off: a fused layer computes in its inputs' dtype.

    Autocast does not touch custom ops, but it does lower the matmuls inside their bodies (a
    bfloat16 input current, which the numba kernels cannot take, and a lower precision than the
    same op outside autocast). Inside, the op computes as without autocast; its outputs keep the
    inputs' dtype, and bfloat16/float16 inputs (Triton backend) still run in those dtypes.
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        on = [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
        if not on:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in on:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)
    return run


def _np(t: Optional[Tensor]):
    return None if t is None else t.detach().numpy()


def _empty(like: Tensor, dtype=None) -> Tensor:
    return torch.empty(0, dtype=like.dtype if dtype is None else dtype, device=like.device)


def _known_nonempty(t: Tensor) -> bool:
    """True when ``t`` surely has elements; False when it has none or when that is unknown (tracing)."""
    try:
        return int(t.numel()) > 0
    except Exception:  # an unbacked size while tracing
        return False


def _needs_spikes_u8(reset: str, recurrent: bool, backward: str, needs_backward: bool) -> bool:
    return needs_backward and backward == "sparse" and (reset == "zero" or recurrent)


@torch.library.custom_op("snnopt::lif", mutates_args=())
@outside_autocast
@_serialised
def lif_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], recurrent_weight: Optional[Tensor],
           beta: Tensor, threshold: Tensor, alpha: Optional[Tensor], initial_v: Tensor,
           initial_syn: Optional[Tensor], input_active: Optional[Tensor],
           reset: str, detach_reset: bool, surrogate: str, surrogate_param: float, fire_at_threshold: bool,
           backward: str, window: float, record_membrane: bool, needs_backward: bool
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                      Tensor, Tensor]:
    batch, steps = x.shape[0], x.shape[1]
    cuba = alpha is not None
    recurrent = recurrent_weight is not None
    sparse = backward == "sparse"
    events = linear = None
    if weight is None:
        current = _np(x)
        neurons = x.shape[2]
    else:
        neurons, in_features = weight.shape
        x2d = _np(x).reshape(batch * steps, in_features)
        events = cpu_lif.dense_to_events(x2d, MAX_EVENT_DENSITY)
        if events is not None:
            current = (batch, steps, neurons)
            linear = (events, np.ascontiguousarray(_np(weight).T), _np(bias))
        else:
            current = torch.nn.functional.linear(x.detach().reshape(batch * steps, in_features), weight.detach(),
                                                 None if bias is None else bias.detach()).numpy()
            current = current.reshape(batch, steps, neurons)
    np_dtype = _np(beta).dtype
    record_membrane_now = record_membrane or (needs_backward and not sparse)
    record_syn = needs_backward and not sparse and cuba
    spikes, membrane, syn_record, v_final, syn_final, active = cpu_lif.lif_forward(
        current, _np(beta), _np(threshold), np.zeros(neurons, np_dtype) if alpha is None else _np(alpha),
        np.ascontiguousarray(_np(recurrent_weight).T) if recurrent else np.zeros((1, 1), np_dtype),
        _np(initial_v), np.zeros((batch, neurons), np_dtype) if initial_syn is None else _np(initial_syn),
        reset=reset, cuba=cuba, recurrent=recurrent, fire_at_threshold=fire_at_threshold,
        record_membrane=record_membrane_now, record_syn=record_syn, collect_active=needs_backward and sparse,
        window=window, surrogate_code=SURROGATE_CODES[surrogate], surrogate_param=surrogate_param, linear=linear)
    spikes_t = torch.from_numpy(spikes)
    out_membrane = torch.from_numpy(membrane) if record_membrane_now else _empty(x)
    out_syn_final = torch.from_numpy(syn_final) if cuba else _empty(x)
    out_syn_record = torch.from_numpy(syn_record) if record_syn else _empty(x)
    if _needs_spikes_u8(reset, recurrent, backward, needs_backward):
        spikes_u8 = spikes_t.to(torch.uint8)
    else:
        spikes_u8 = _empty(x, torch.uint8)
    offsets, index, surr, dense = (_empty(x, torch.int64), _empty(x, torch.int32), _empty(x), _empty(x))
    if active is not None and active[0] == "list":
        offsets, index, surr = (torch.from_numpy(a) for a in active[1:])
    elif active is not None:
        dense = torch.from_numpy(active[1]).reshape(-1)
    row_ptr, cols, vals = (_empty(x, torch.int64), _empty(x, torch.int32), _empty(x))
    if events is not None and needs_backward:
        row_ptr, cols, vals = (torch.from_numpy(a) for a in events)
    return (spikes_t, out_membrane, torch.from_numpy(v_final), out_syn_final, out_syn_record, spikes_u8,
            offsets, index, surr, dense, row_ptr, cols, vals)


@lif_op.register_fake
def _lif_fake(x, weight, bias, recurrent_weight, beta, threshold, alpha, initial_v, initial_syn, input_active,
              reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window,
              record_membrane, needs_backward):
    batch, steps = x.shape[0], x.shape[1]
    neurons = x.shape[2] if weight is None else weight.shape[0]
    sparse = backward == "sparse"
    seq = x.new_empty(batch, steps, neurons)
    state = x.new_empty(batch, neurons)
    ctx = torch.library.get_ctx()
    membrane = x.new_empty(batch, steps, neurons) if (record_membrane or (needs_backward and not sparse)) else _empty(x)
    syn_final = x.new_empty(batch, neurons) if alpha is not None else _empty(x)
    syn_record = (x.new_empty(batch, steps, neurons) if (needs_backward and not sparse and alpha is not None)
                  else _empty(x))
    u8_shape = (batch, steps, neurons) if _needs_spikes_u8(reset, recurrent_weight is not None, backward,
                                                           needs_backward) else (0,)
    spikes_u8 = x.new_empty(u8_shape, dtype=torch.uint8)
    # Which compact form the active set takes, and whether the input is stored as events, depends
    # on the data: these sizes are unknown until run time.
    n_offsets, n_active, n_dense = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
    n_rows, n_events = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (seq, membrane, state, syn_final, syn_record, spikes_u8,
            x.new_empty(n_offsets, dtype=torch.int64), x.new_empty(n_active, dtype=torch.int32),
            x.new_empty(n_active), x.new_empty(n_dense),
            x.new_empty(n_rows, dtype=torch.int64), x.new_empty(n_events, dtype=torch.int32), x.new_empty(n_events))


def _lif_setup_context(ctx, inputs, output):
    (x, weight, bias, recurrent_weight, beta, threshold, alpha, initial_v, initial_syn, input_active,
     reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window,
     record_membrane, needs_backward) = inputs
    (spikes, membrane, v_final, syn_final, syn_record, spikes_u8, offsets, index, surr, dense,
     row_ptr, cols, vals) = output
    exact = backward == "exact"
    # The dense input is needed only for the weight gradient, and only when it was not compressed
    # into events (while tracing that is unknown, so it is kept).
    keep_x = weight is not None and not _known_nonempty(row_ptr)
    ctx.save_for_backward(
        x if keep_x else None, weight, recurrent_weight, beta, threshold, alpha, initial_v, initial_syn,
        input_active, membrane if exact else None, syn_record, spikes_u8, offsets, index, surr, dense,
        row_ptr, cols, vals)
    ctx.config = (reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window)
    ctx.steps = x.shape[1]
    ctx.input_shape = tuple(x.shape)
    # A restricted input gradient is fine for the producing layer but not for a user who inspects
    # the gradient at x; a weak reference lets the backward notice retain_grad() and hooks.
    eager_restricted = input_active is not None and not torch.compiler.is_compiling()
    ctx.input_ref = weakref.ref(x) if eager_restricted else None
    # The gradient of x may travel sparse only straight into the snnopt layer that produced x,
    # which reads it at its active entries (or densifies it); anything else, a leaf's .grad
    # above all, gets a dense tensor.
    ctx.sparse_input_grad = eager_restricted and type(x.grad_fn).__name__.startswith(_LIF_NODE_PREFIX)
    ctx.has_bias = bias is not None


_LIF_NODE_PREFIX = "GeneratedBackwardFor_snnopt_lif_"  # autograd's name for this op's backward node
_SAVED_INPUT_ACTIVE = 8  # positions in ctx.save_for_backward above
_SAVED_ACTIVE_OFFSETS = 12


def _lif_backward(ctx, grad_spikes, grad_membrane, grad_v_final, grad_syn_final, *_unused):
    saved = list(ctx.saved_tensors)
    needs = ctx.needs_input_grad
    x = ctx.input_ref() if ctx.input_ref is not None else None
    if x is not None and (x.retains_grad or getattr(x, "_backward_hooks", None)):
        saved[_SAVED_INPUT_ACTIVE] = None
    grad_at_active = None
    if grad_spikes is not None and grad_spikes.layout == torch.sparse_coo:
        grad_at_active = _values_at_active_entries(grad_spikes, saved, ctx)
        grad_spikes = None if grad_at_active is not None else grad_spikes.to_dense()
    grads = list(torch.ops.snnopt.lif_backward(
        grad_spikes, grad_at_active, grad_membrane, grad_v_final, grad_syn_final, *saved, ctx.steps, *ctx.config,
        needs[0], needs[1], ctx.has_bias and needs[2], needs[3], needs[4], needs[5], needs[6], needs[7],
        needs[8]))
    input_active = saved[_SAVED_INPUT_ACTIVE]
    if needs[0] and input_active is not None:
        grads[0] = _input_grad_from_values(grads[0], input_active, ctx.input_shape,
                                           as_sparse=ctx.sparse_input_grad and saved[_SAVED_INPUT_ACTIVE] is not None)
    result = [g if need else None for g, need in zip(grads, needs[:9])]
    return tuple(result) + (None,) * 10


def active_flat_index(offsets: Tensor, index: Tensor, steps: int, neurons: int) -> Tensor:
    """A layer's compact active entries as ascending flat indices into its (B, T, N) output."""
    offsets_np = offsets.numpy()
    batch_of_entry = np.repeat(np.arange(offsets_np.size - 1, dtype=np.int64), np.diff(offsets_np))
    return torch.from_numpy(batch_of_entry * (steps * neurons) + index.numpy())


def _values_at_active_entries(grad_spikes: Tensor, saved, ctx) -> Optional[Tensor]:
    """dL/ds sent back sparse by a consumer: its values, if it holds exactly this layer's active entries."""
    offsets, index = saved[_SAVED_ACTIVE_OFFSETS], saved[_SAVED_ACTIVE_OFFSETS + 1]
    if ctx.config[5] != "sparse" or offsets.numel() == 0 or torch.compiler.is_compiling():
        return None
    grad = grad_spikes.coalesce()
    steps, neurons = grad.shape[1], grad.shape[2]
    coords = grad.indices().numpy()
    flat = (coords[0] * steps + coords[1]) * neurons + coords[2]
    own = active_flat_index(offsets, index, steps, neurons).numpy()
    if flat.shape != own.shape or not np.array_equal(flat, own):
        return None
    return grad.values().contiguous()


def _input_grad_from_values(values: Tensor, input_active: Tensor, shape, as_sparse: bool) -> Tensor:
    """The gradient of the layer input from its values at ``input_active``.

    Handed to a producing snnopt layer it stays sparse (COO): that layer reads these entries and
    nothing else, so no dense (B, T, in) tensor is written or zero-filled. A leaf input, or any
    input while tracing, gets a dense tensor.
    """
    batch, steps, in_features = shape
    if as_sparse and not torch.compiler.is_compiling():
        flat = input_active.numpy()
        coords = np.stack([flat // (steps * in_features), (flat // in_features) % steps, flat % in_features])
        sorted_unique = flat.size < 2 or bool(np.all(flat[1:] > flat[:-1]))
        return torch.sparse_coo_tensor(torch.from_numpy(coords), values, (batch, steps, in_features),
                                       is_coalesced=sorted_unique, check_invariants=False)
    dense = values.new_zeros(batch * steps * in_features)
    dense.index_put_((input_active,), values, accumulate=True)
    return dense.reshape(batch, steps, in_features)


torch.library.register_autograd("snnopt::lif", _lif_backward, setup_context=_lif_setup_context)


@torch.library.custom_op("snnopt::lif_backward", mutates_args=())
@outside_autocast
@_serialised
def lif_backward_op(grad_spikes: Optional[Tensor], grad_spikes_at_active: Optional[Tensor],
                    grad_membrane: Optional[Tensor], grad_v_final: Optional[Tensor],
                    grad_syn_final: Optional[Tensor], x: Optional[Tensor], weight: Optional[Tensor],
                    recurrent_weight: Optional[Tensor], beta: Tensor, threshold: Tensor, alpha: Optional[Tensor],
                    initial_v: Tensor, initial_syn: Optional[Tensor], input_active: Optional[Tensor],
                    membrane: Optional[Tensor], syn_record: Tensor, spikes_u8: Tensor, active_offsets: Tensor,
                    active_index: Tensor, active_surrogate: Tensor, active_dense: Tensor, x_row_ptr: Tensor,
                    x_cols: Tensor, x_vals: Tensor, steps: int, reset: str, detach_reset: bool, surrogate: str,
                    surrogate_param: float, fire_at_threshold: bool, backward: str, window: float,
                    need_x: bool, need_weight: bool, need_bias: bool, need_recurrent: bool, need_beta: bool,
                    need_threshold: bool, need_alpha: bool, need_initial_v: bool, need_initial_syn: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch, neurons = initial_v.shape
    cuba = alpha is not None
    recurrent = recurrent_weight is not None
    seq_shape = (batch, steps, neurons)
    # dL/ds arrives dense, or (from a sparse consumer) as values at this layer's active entries.
    np_dtype = _np(beta).dtype
    gs = _np(grad_spikes) if grad_spikes is not None else None
    if gs is None and grad_spikes_at_active is None:
        gs = np.zeros(seq_shape, np_dtype)
    gs_at_active = _np(grad_spikes_at_active) if grad_spikes_at_active is not None else None
    gm = _np(grad_membrane) if grad_membrane is not None and grad_membrane.numel() else None
    state_zeros = np.zeros((batch, neurons), np_dtype)
    gvf = _np(grad_v_final) if grad_v_final is not None else state_zeros
    gsf = _np(grad_syn_final) if (grad_syn_final is not None and grad_syn_final.numel()) else state_zeros
    alpha_np = _np(alpha) if cuba else np.zeros(neurons, np_dtype)
    syn0 = _np(initial_syn) if initial_syn is not None else state_zeros
    rec_t = np.ascontiguousarray(_np(recurrent_weight).T) if recurrent else np.zeros((1, 1), np_dtype)
    code = SURROGATE_CODES[surrogate]
    def empty():  # a fresh tensor each time: outputs of a custom op must not alias each other
        return _empty(beta)

    grad_beta = grad_theta = grad_alpha = None
    grad_x = grad_w = grad_b = grad_rec = None
    has_events = weight is not None and x_row_ptr.numel() > 0
    events = (_np(x_row_ptr), _np(x_cols), _np(x_vals)) if has_events else None
    if backward == "sparse":
        if active_offsets.numel():
            active = ("list", _np(active_offsets), _np(active_index), _np(active_surrogate))
        else:
            active = ("dense", _np(active_dense).reshape(seq_shape))
        u8 = _np(spikes_u8) if spikes_u8.numel() else np.zeros((1, 1, 1), np.uint8)
        sweep = dict(reset=reset, cuba=cuba, recurrent=recurrent, fire_at_threshold=fire_at_threshold, window=window,
                     surrogate_code=code, surrogate_param=surrogate_param,
                     need_recurrent_grad=recurrent and need_recurrent, steps=steps, grad_at_active=gs_at_active)
        args = (gs, gm, gvf, gsf, active, _np(beta), alpha_np, _np(threshold), _np(initial_v), u8, rec_t)
        # With the input as events, all linear-layer gradients are built inside the sweep — unless a
        # dense input gradient is asked for, which needs dL/dI as a dense tensor anyway.
        if has_events and not (need_x and input_active is None):
            in_features = weight.shape[1]
            entries = order = None
            if need_x:
                sorted_index = _np(input_active)
                if sorted_index.size > 1 and not np.all(sorted_index[1:] >= sorted_index[:-1]):
                    order = np.argsort(sorted_index, kind="stable")  # the sweep visits rows in order
                    sorted_index = sorted_index[order]
                rows = sorted_index // in_features
                in_ptr = np.searchsorted(rows, np.arange(batch * steps + 1)).astype(np.int64)
                entries = (in_ptr, np.ascontiguousarray(sorted_index % in_features))
            _, grad_v0, grad_syn0, grad_w_t, grad_bias, grad_x_values, grad_rec_t = cpu_lif.lif_backward_sparse(
                *args, linear=(events, np.ascontiguousarray(_np(weight).T), entries), **sweep)
            grad_bias_t = torch.from_numpy(grad_bias)
            if need_weight:
                grad_w = _with_dense_nan_rows(torch.from_numpy(np.ascontiguousarray(grad_w_t.T)),
                                              ~torch.isfinite(grad_bias_t))
            grad_b = grad_bias_t if need_bias else None
            if need_x:  # values at input_active, in its order
                if order is not None:
                    unsorted = np.empty_like(grad_x_values)
                    unsorted[order] = grad_x_values
                    grad_x_values = unsorted
                grad_x = torch.from_numpy(grad_x_values)
            grad_current = None
        else:
            grad_current, grad_v0, grad_syn0, grad_rec_t = cpu_lif.lif_backward_sparse(*args, **sweep)
        if grad_rec_t is not None:
            nan_neurons = (~torch.isfinite(grad_bias_t) if grad_current is None
                           else torch.from_numpy(~np.isfinite(grad_current.reshape(-1, neurons).sum(0))))
            grad_rec = _with_dense_nan_rows(torch.from_numpy(np.ascontiguousarray(grad_rec_t.T)), nan_neurons)
    elif _never_fires_nor_resets(reset, cuba, recurrent, threshold) and gm is not None:
        # A layer that cannot fire and is not reset is a leaky integrator of its current (the
        # readouts leaky_integrator / linear_leaky_integrator); the spike path carries σ'(-inf) = 0. Its backward
        # is the integrator's reverse filter, a much lighter kernel than the general exact sweep.
        grad_current, grad_v0, grad_beta = cpu_lif.leaky_backward(gm, gvf, _np(beta), _np(membrane), _np(initial_v))
        grad_syn0 = state_zeros
        grad_theta = np.zeros(neurons, np_dtype)
    else:
        syn_rec = _np(syn_record) if syn_record.numel() else np.zeros((1, 1, 1), np_dtype)
        grad_current, grad_v0, grad_syn0, grad_beta, grad_theta, grad_alpha = cpu_lif.lif_backward_exact(
            gs, gm, gvf, gsf, _np(membrane), syn_rec, _np(beta), alpha_np, _np(threshold), _np(initial_v), syn0,
            rec_t, reset=reset, reset_in_graph=not detach_reset, cuba=cuba, recurrent=recurrent,
            fire_at_threshold=fire_at_threshold, surrogate_code=code, surrogate_param=surrogate_param)
        if recurrent and need_recurrent:
            grad_rec = _recurrent_weight_grad(torch.from_numpy(grad_current).reshape(batch * steps, neurons),
                                              membrane, initial_v, threshold, fire_at_threshold, seq_shape)
    if grad_current is not None:
        grad_x, grad_w, grad_b = _linear_grads_from_dense(
            torch.from_numpy(grad_current), x, weight, events, input_active, need_x, need_weight, need_bias,
            seq_shape)
    grad_beta_t = torch.from_numpy(grad_beta) if (need_beta and grad_beta is not None) else empty()
    grad_theta_t = torch.from_numpy(grad_theta) if (need_threshold and grad_theta is not None) else empty()
    grad_alpha_t = torch.from_numpy(grad_alpha) if (need_alpha and grad_alpha is not None and cuba) else empty()
    grad_x, grad_w, grad_b, grad_rec = (empty() if g is None else g for g in (grad_x, grad_w, grad_b, grad_rec))
    return (grad_x, grad_w, grad_b, grad_rec, grad_beta_t, grad_theta_t, grad_alpha_t,
            torch.from_numpy(grad_v0) if need_initial_v else empty(),
            torch.from_numpy(grad_syn0) if (need_initial_syn and cuba) else empty())


def _never_fires_nor_resets(reset: str, cuba: bool, recurrent: bool, threshold: Tensor) -> bool:
    return reset == "none" and not cuba and not recurrent and bool(torch.all(threshold == float("inf")))


def _linear_grads_from_dense(grad_current, x, weight, events, input_active, need_x, need_weight, need_bias,
                             seq_shape):
    """Gradients of ``x``, ``weight``, ``bias`` from a dense dL/dI (exact mode, or a dense input).

    With ``input_active`` the gradient of ``x`` is returned as its values at those entries.
    """
    batch, steps, neurons = seq_shape
    if weight is None:
        return (grad_current if need_x else None), None, None
    in_features = weight.shape[1]
    rows = grad_current.reshape(batch * steps, neurons)
    grad_x = grad_w = grad_b = None
    if need_weight:
        if events is not None:
            grad_w = _with_dense_nan_rows(
                torch.from_numpy(np.ascontiguousarray(cpu_lif.events_weight_grad(events, rows.numpy(), in_features))),
                torch.from_numpy(~np.isfinite(rows.numpy().sum(0))))
        else:
            grad_w = rows.t().mm(x.detach().reshape(batch * steps, in_features))
    if need_bias:
        grad_b = rows.sum(0)
    if need_x:
        if input_active is not None:  # values at input_active, in its order
            weight_t = np.ascontiguousarray(_np(weight).T)
            grad_x = torch.from_numpy(cpu_lif.input_grad_at(_np(input_active), rows.numpy(), weight_t))
        else:
            grad_x = rows.mm(weight.detach()).reshape(batch, steps, in_features)
    return grad_x, grad_w, grad_b


def _with_dense_nan_rows(grad_weight: Tensor, nan_neurons: Tensor) -> Tensor:
    """Make an event-built weight gradient NaN where a dense matmul's would be.

    Events skip the zeros of the input, so NaN·0 and inf·0 terms that ``dIᵀ @ x`` contains are
    missing; a neuron whose dL/dI holds a NaN or an infinity anywhere gets a NaN row, as in PyTorch.
    """
    if bool(nan_neurons.any()):
        grad_weight[nan_neurons] = float("nan")
    return grad_weight


def _recurrent_weight_grad(rows, membrane, initial_v, threshold, fire_at_threshold, seq_shape):
    """dV = Σ_t Gcur[t]ᵀ s[t-1] for the exact backward: the recurrent weight sees spikes one step late."""
    batch, steps, neurons = seq_shape
    u = membrane - threshold
    spikes = ((u >= 0) if fire_at_threshold else (u > 0)).to(rows.dtype)
    u0 = initial_v - threshold
    s_init = ((u0 >= 0) if fire_at_threshold else (u0 > 0)).to(rows.dtype)
    shifted = torch.cat([s_init.unsqueeze(1), spikes[:, :-1]], 1).reshape(batch * steps, neurons).contiguous()
    events = cpu_lif.dense_to_events(shifted.numpy(), MAX_EVENT_DENSITY)
    if events is None:
        return rows.t().mm(shifted)
    return torch.from_numpy(np.ascontiguousarray(cpu_lif.events_weight_grad(events, rows.numpy(), neurons)))


@lif_backward_op.register_fake
def _lif_backward_fake(grad_spikes, grad_spikes_at_active, grad_membrane, grad_v_final, grad_syn_final, x, weight, recurrent_weight, beta,
                       threshold, alpha, initial_v, initial_syn, input_active, membrane, syn_record, spikes_u8,
                       active_offsets, active_index, active_surrogate, active_dense, x_row_ptr, x_cols, x_vals,
                       steps, reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window,
                       need_x, need_weight, need_bias, need_recurrent, need_beta, need_threshold, need_alpha,
                       need_initial_v, need_initial_syn):
    batch, neurons = initial_v.shape

    def empty():
        return _empty(beta)

    in_features = neurons if weight is None else weight.shape[1]
    if not need_x:
        grad_x = empty()
    elif input_active is not None:
        grad_x = beta.new_empty(input_active.shape[0])
    else:
        grad_x = beta.new_empty(batch, steps, in_features)
    return (grad_x,
            weight.new_empty(weight.shape) if (need_weight and weight is not None) else empty(),
            beta.new_empty(neurons) if need_bias else empty(),
            beta.new_empty(neurons, neurons) if (need_recurrent and recurrent_weight is not None) else empty(),
            beta.new_empty(neurons) if (need_beta and backward == "exact") else empty(),
            beta.new_empty(neurons) if (need_threshold and backward == "exact") else empty(),
            beta.new_empty(neurons) if (need_alpha and alpha is not None and backward == "exact") else empty(),
            beta.new_empty(batch, neurons) if need_initial_v else empty(),
            beta.new_empty(batch, neurons) if (need_initial_syn and alpha is not None) else empty())
