"""Compiled CPU kernels for the fused LIF layer (numba), beside their reference in ``reference.py``.

Why compiled loops: the seed paper's sparse backward touches a few percent of B·T·N entries; written
with torch ops and a Python loop over T, per-op overhead (10–50 µs × ops × T) eats that saving.
Here one kernel runs the whole recurrence, parallel over the batch, and the backward walks compact
lists of active entries.

Layout everywhere: batch-first, contiguous ``(B, T, N)`` arrays, per-neuron parameters ``(N,)``.
Each kernel follows the equations in :mod:`snnopt.spec`; the reverse sweeps are their adjoints:

    Gs[t]   = dL/ds[t] + Vᵀ Gcur[t+1] + (attached reset: -θ Gv[t+1] | -β v[t] Gv[t+1])
    Gv[t]   = dL/dv[t] + Gs[t] σ'(v[t]-θ) + β m[t+1] Gv[t+1]     (m = 1 - s[t] for reset="zero")
    Gsyn[t] = Gv[t] + α Gsyn[t+1]                               (CuBa)
    Gcur[t] = Gsyn[t] (CuBa) or Gv[t];  dL/dI[t] = Gcur[t]

In sparse mode σ' is zero outside the window, so ``Gs[t] σ'`` is only evaluated at the active
entries recorded by the forward pass; the recurrent term Vᵀ Gcur[t+1] likewise.

Example::

    >>> spikes, membrane, syn_rec, v_fin, syn_fin, counts, idx, surr = lif_forward(...)  # see ops.py
"""

from __future__ import annotations

import ctypes
import math
import os
import sys

import numba
import numpy as np
from numba import njit, prange



def _choose_threading_layer() -> str:
    # numba's default "omp" layer loads a second OpenMP runtime next to PyTorch's; both spin while
    # idle and, on few cores, each slows the other several-fold (measured on 2 cores, seed network
    # step: sparse backward 12 ms with "omp", 3 ms alone). TBB threads yield quickly (measured:
    # forward 19 ms with "tbb" vs 30 ms with "workqueue"); "workqueue" needs no library but must
    # not be entered by two Python threads at once (see KERNELS_THREAD_SAFE). A user's
    # NUMBA_THREADING_LAYER still wins.
    if "NUMBA_THREADING_LAYER" in os.environ:
        return numba.config.THREADING_LAYER
    # pip's tbb wheel puts libtbb in <prefix>/lib, which the loader does not search in a virtual
    # environment; loading it by path first lets numba's TBB pool link against it.
    for candidate in ("libtbb.so.12", os.path.join(sys.prefix, "lib", "libtbb.so.12")):
        try:
            ctypes.CDLL(candidate)
            from numba.np.ufunc import tbbpool  # noqa: F401
            return "tbb"
        except (OSError, ImportError):
            continue
    return "workqueue"


numba.config.THREADING_LAYER = _choose_threading_layer()
KERNELS_THREAD_SAFE = numba.config.THREADING_LAYER not in ("workqueue", "default")

RESET_CODES = {"subtract": 0, "zero": 1, "none": 2}


@njit(inline="always", cache=True)
def _surrogate(u, code, k):
    # Codes follow snnopt.surrogate.SURROGATE_CODES.
    if code == 0:
        a = k * abs(u) + 1.0
        return 1.0 / (a * a)
    if code == 1:
        sg = 1.0 / (1.0 + math.exp(-k * u))
        return k * sg * (1.0 - sg)
    if code == 2:
        z = math.pi / 2.0 * k * u
        return (k / 2.0) / (1.0 + z * z)
    if code == 3:
        return max(0.0, 1.0 - abs(u) / k) / k
    return 1.0 / k if abs(u) < k / 2.0 else 0.0


@njit(inline="always", cache=True)
def _fires(u, fire_at_threshold):
    return u > 0.0 or (fire_at_threshold and u >= 0.0)


@njit(parallel=True, cache=True)
def _lif_forward_kernel(current, linear_events, x_row_ptr, x_cols, x_vals, weight_t, bias, has_bias,
                        beta, theta, alpha, recurrent_t, v0, syn0,
                        reset_code, cuba, recurrent, fire_at_threshold,
                        record_membrane, record_syn, collect_active, window, surrogate_code, surrogate_param,
                        spikes, membrane, syn_record, v_final, syn_final,
                        active_counts, active_index, active_surr):
    batch, steps, neurons = spikes.shape
    for b in prange(batch):
        v = v0[b].copy()
        syn = syn0[b].copy()
        s_prev = np.empty(neurons, dtype=spikes.dtype)
        cur = np.empty(neurons, dtype=spikes.dtype)
        for j in range(neurons):
            s_prev[j] = 1.0 if _fires(v[j] - theta[j], fire_at_threshold) else 0.0
        count = 0
        for t in range(steps):
            if linear_events:
                # The input current straight from the input's events: x @ Wᵀ + b for this step only.
                for j in range(neurons):
                    cur[j] = bias[j] if has_bias else 0.0
                row = b * steps + t
                for p in range(x_row_ptr[row], x_row_ptr[row + 1]):
                    xv = x_vals[p]
                    w_row = weight_t[x_cols[p]]
                    for j in range(neurons):
                        cur[j] += xv * w_row[j]
            else:
                cur[:] = current[b, t]
            if recurrent:
                # Event-driven: only presynaptic neurons that spiked at t-1 contribute.
                for k in range(neurons):
                    if s_prev[k] != 0.0:
                        for j in range(neurons):
                            cur[j] += recurrent_t[k, j]
            # One simple loop per concern (no stores under data-dependent branches) so that LLVM
            # vectorises each of them; the arithmetic order matches the reference exactly.
            if cuba:
                for j in range(neurons):
                    syn[j] = alpha[j] * syn[j] + cur[j]
                drive = syn
            else:
                drive = cur
            if reset_code == 0:
                for j in range(neurons):
                    v[j] = beta[j] * v[j] + drive[j] - theta[j] * s_prev[j]
            elif reset_code == 1:
                for j in range(neurons):
                    v[j] = beta[j] * v[j] * (1.0 - s_prev[j]) + drive[j]
            else:
                for j in range(neurons):
                    v[j] = beta[j] * v[j] + drive[j]
            spikes_t = spikes[b, t]
            if fire_at_threshold:
                for j in range(neurons):
                    s_prev[j] = 1.0 if v[j] - theta[j] >= 0.0 else 0.0
            else:
                for j in range(neurons):
                    s_prev[j] = 1.0 if v[j] - theta[j] > 0.0 else 0.0
            for j in range(neurons):
                spikes_t[j] = s_prev[j]
            if record_membrane:
                membrane[b, t] = v
            if record_syn:
                syn_record[b, t] = syn
            if collect_active:
                for j in range(neurons):
                    u = v[j] - theta[j]
                    # A NaN membrane is kept as an entry whose surrogate is σ'(NaN)·0, as in the
                    # windowed reference, so NaN gradients propagate exactly as PyTorch would.
                    if abs(u) < window or u != u:
                        sg = _surrogate(u, surrogate_code, surrogate_param)
                        active_index[b, count] = t * neurons + j
                        active_surr[b, count] = sg if u == u else sg * 0.0
                        count += 1
        for j in range(neurons):
            v_final[b, j] = v[j]
            syn_final[b, j] = syn[j]
        active_counts[b] = count


@njit(parallel=True, cache=True)
def _compact_active_kernel(active_counts, offsets, active_index, active_surr, out_index, out_surr):
    for b in prange(active_counts.shape[0]):
        start = offsets[b]
        for n in range(active_counts[b]):
            out_index[start + n] = active_index[b, n]
            out_surr[start + n] = active_surr[b, n]


@njit(parallel=True, cache=True)
def _densify_active_kernel(active_counts, active_index, active_surr, out_dense):
    for b in prange(active_counts.shape[0]):
        for n in range(active_counts[b]):
            out_dense[b, active_index[b, n]] = active_surr[b, n]


def lif_forward(current, beta, theta, alpha, recurrent_t, v0, syn0, *, reset, cuba, recurrent,
                fire_at_threshold, record_membrane, record_syn, collect_active, window, surrogate_code,
                surrogate_param, linear=None, dense_active_fraction=0.5):
    """Run the recurrence over all steps. numpy in, numpy out.

    ``current`` is the input current ``(B, T, N)``; or pass ``current=(B, T, N)`` (a shape) with
    ``linear=(x_events, weight_t, bias)`` to compute it from the input's CSR events on the fly.

    Returns ``(spikes, membrane, syn_record, v_final, syn_final, active)`` where ``active`` is
    ``None`` unless ``collect_active``; then it is ``("list", offsets, index, surr)`` (entries of
    batch b at ``offsets[b]:offsets[b+1]``, index ``t*N + j`` ascending) or, when more than
    ``dense_active_fraction`` of B·T·N is active, ``("dense", surr_dense)`` with zeros outside the
    window — the same numbers in less memory than a list would take.
    """
    dtype = beta.dtype
    if linear is None:
        batch, steps, neurons = current.shape
        row_ptr, cols, vals = np.zeros(1, np.int64), np.empty(0, np.int32), np.empty(0, dtype)
        weight_t, bias = np.empty((1, 1), dtype), None
    else:
        batch, steps, neurons = current
        (row_ptr, cols, vals), weight_t, bias = linear
        current = np.empty((1, 1, 1), dtype)
    seq_shape = (batch, steps, neurons)
    spikes = np.empty(seq_shape, dtype)
    membrane = np.empty(seq_shape, dtype) if record_membrane else np.empty((1, 1, 1), dtype)
    syn_record = np.empty(seq_shape, dtype) if record_syn else np.empty((1, 1, 1), dtype)
    v_final = np.empty((batch, neurons), dtype)
    syn_final = np.empty((batch, neurons), dtype)
    counts = np.zeros(batch, np.int64)
    # Worst-case per-batch buffers; untouched pages are never committed, and they are freed as
    # soon as the entries are compacted below.
    capacity = steps * neurons if collect_active else 1
    index_buf = np.empty((batch, capacity), np.int32)
    surr_buf = np.empty((batch, capacity), dtype)
    _lif_forward_kernel(current, linear is not None, row_ptr, cols, vals, weight_t,
                        bias if bias is not None else beta, bias is not None, beta, theta, alpha, recurrent_t, v0, syn0,
                        RESET_CODES[reset], cuba, recurrent, fire_at_threshold,
                        record_membrane, record_syn, collect_active, window, surrogate_code, surrogate_param,
                        spikes, membrane, syn_record, v_final, syn_final, counts, index_buf, surr_buf)
    active = None
    if collect_active:
        total = int(counts.sum())
        if total > dense_active_fraction * batch * steps * neurons:
            dense = np.zeros((batch, steps * neurons), dtype)
            _densify_active_kernel(counts, index_buf, surr_buf, dense)
            active = ("dense", dense.reshape(batch, steps, neurons))
        else:
            offsets = np.zeros(batch + 1, np.int64)
            np.cumsum(counts, out=offsets[1:])
            index = np.empty(total, np.int32)
            surr = np.empty(total, dtype)
            _compact_active_kernel(counts, offsets, index_buf, surr_buf, index, surr)
            active = ("list", offsets, index, surr)
    return spikes, membrane, syn_record, v_final, syn_final, active


@njit(inline="always", cache=True)
def _spike_grad(grad_output, j, with_recurrent, recurrent_t, grad_current_next):
    """dL/ds[t, j]: the output's gradient plus, if recurrent, (Vᵀ Gcur[t+1])[j]."""
    if not with_recurrent:
        return grad_output
    acc = 0.0
    for i in range(grad_current_next.shape[0]):
        acc += recurrent_t[j, i] * grad_current_next[i]
    return grad_output + acc


@njit(parallel=True, cache=True)
def _lif_backward_sparse_kernel(grad_spikes, use_grad_at_active, grad_at_active, has_grad_membrane, grad_membrane, grad_v_final, grad_syn_final,
                                offsets, active_index, active_surr, dense_mode, surr_dense,
                                beta, alpha, theta, v0, spikes_u8, recurrent_t,
                                reset_code, cuba, recurrent, fire_at_threshold, window,
                                surrogate_code, surrogate_param,
                                write_grad_current, grad_current, grad_v0, grad_syn0,
                                linear, x_row_ptr, x_cols, x_vals, weight_t, in_ptr, in_features_index, grad_x_values,
                                need_recurrent_grad, grad_weight_t_partial, grad_bias_partial, grad_recurrent_t_partial,
                                grad_current_shape_steps):
    # One chunk of batch entries per thread, each with its own weight-gradient accumulators, so the
    # linear layer's gradients are built inside the sweep: dL/dI[b, t] is used while it is in
    # cache and never stored as a dense (B, T, N) tensor.
    batch, steps, neurons = grad_v0.shape[0], grad_current_shape_steps, grad_v0.shape[1]
    chunks = grad_bias_partial.shape[0]
    per_chunk = (batch + chunks - 1) // chunks
    for c in prange(chunks):
        # gv holds Gv[t+1] on entering step t and Gv[t] on leaving it (likewise gsyn); gcur is
        # Gcur[t], the same array as gv unless CuBa. Simple loops, branches hoisted: they vectorise.
        gv = np.zeros(neurons, dtype=grad_spikes.dtype)
        gsyn = np.zeros(neurons, dtype=grad_spikes.dtype)
        gcur_next = np.zeros(neurons, dtype=grad_spikes.dtype)
        for b in range(c * per_chunk, min(batch, (c + 1) * per_chunk)):
            gv[:] = 0.0
            gsyn[:] = 0.0
            gcur_next[:] = 0.0
            gcur = gsyn if cuba else gv
            ptr = offsets[b + 1] - 1
            start = offsets[b]
            for t in range(steps - 1, -1, -1):
                for j in range(neurons):
                    gv[j] *= beta[j]
                if reset_code == 1:
                    spiked_t = spikes_u8[b, t]
                    for j in range(neurons):
                        gv[j] *= 1.0 - spiked_t[j]
                if has_grad_membrane:
                    grad_membrane_t = grad_membrane[b, t]
                    for j in range(neurons):
                        gv[j] += grad_membrane_t[j]
                if t == steps - 1:
                    for j in range(neurons):
                        gv[j] += grad_v_final[b, j]
                with_recurrent = recurrent and t < steps - 1
                if dense_mode:
                    for j in range(neurons):
                        sg = surr_dense[b, t, j]
                        if sg != 0.0:
                            gv[j] += _spike_grad(grad_spikes[b, t, j], j, with_recurrent, recurrent_t, gcur_next) * sg
                else:
                    while ptr >= start and active_index[ptr] // neurons == t:
                        j = active_index[ptr] % neurons
                        grad_output = grad_at_active[ptr] if use_grad_at_active else grad_spikes[b, t, j]
                        gs = _spike_grad(grad_output, j, with_recurrent, recurrent_t, gcur_next)
                        gv[j] += gs * active_surr[ptr]
                        ptr -= 1
                if cuba:
                    for j in range(neurons):
                        gsyn[j] = gv[j] + alpha[j] * gsyn[j]
                    if t == steps - 1:
                        for j in range(neurons):
                            gsyn[j] += grad_syn_final[b, j]
                if write_grad_current:
                    grad_current[b, t] = gcur
                if linear:
                    row = b * steps + t
                    for p in range(x_row_ptr[row], x_row_ptr[row + 1]):
                        xv = x_vals[p]
                        acc_row = grad_weight_t_partial[c, x_cols[p]]
                        for j in range(neurons):
                            acc_row[j] += xv * gcur[j]
                    bias_acc = grad_bias_partial[c]
                    for j in range(neurons):
                        bias_acc[j] += gcur[j]
                    for q in range(in_ptr[row], in_ptr[row + 1]):
                        w_row = weight_t[in_features_index[q]]
                        acc = 0.0
                        for j in range(neurons):
                            acc += gcur[j] * w_row[j]
                        grad_x_values[q] = acc
                if need_recurrent_grad:
                    # dV[:, k] gets Gcur[t] wherever s[t-1, k] = 1 (s[-1] from the initial membrane).
                    for k in range(neurons):
                        if t > 0:
                            spiked = spikes_u8[b, t - 1, k] != 0
                        else:
                            spiked = _fires(v0[b, k] - theta[k], fire_at_threshold)
                        if spiked:
                            acc_row = grad_recurrent_t_partial[c, k]
                            for j in range(neurons):
                                acc_row[j] += gcur[j]
                if recurrent:
                    gcur_next[:] = gcur
            # Step -1: the initial state. s[-1] = H(v0 - θ) feeds the reset (detached here) and the
            # recurrent input of step 0 (attached, windowed surrogate).
            for j in range(neurons):
                u0 = v0[b, j] - theta[j]
                carry = gv[j] * beta[j]
                if reset_code == 1 and _fires(u0, fire_at_threshold):
                    carry = 0.0
                if recurrent and abs(u0) < window:
                    acc = 0.0
                    for i in range(neurons):
                        acc += recurrent_t[j, i] * gcur_next[i]
                    carry += acc * _surrogate(u0, surrogate_code, surrogate_param)
                grad_v0[b, j] = carry
                grad_syn0[b, j] = alpha[j] * gsyn[j] if cuba else 0.0


def lif_backward_sparse(grad_spikes, grad_membrane, grad_v_final, grad_syn_final, active, beta, alpha, theta,
                        v0, spikes_u8, recurrent_t, *, reset, cuba, recurrent, fire_at_threshold, window,
                        surrogate_code, surrogate_param, linear=None, need_recurrent_grad=False, steps=None,
                        grad_at_active=None):
    """Reverse sweep of the windowed, reset-detached network.

    ``grad_spikes`` is dL/ds as a dense ``(B, T, N)`` array, or None with ``grad_at_active``: its
    values at the active entries only, in list order (what a sparse consumer layer sends back).

    Without ``linear``: returns ``(dL/dI, dL/dv0, dL/dsyn0)`` with dL/dI dense. With ``linear =
    (x_events, weight_t, input_active_rows)`` — the CSR events of the layer input, the weight as
    ``(in, N)`` and optionally ``(in_ptr, feature_index)`` of the entries whose input gradient is
    wanted (per row ``b*T + t``) — returns ``(None, dL/dv0, dL/dsyn0, dWᵀ, db, dx at those entries,
    dVᵀ or None)`` computed in the sweep.
    """
    batch, neurons = v0.shape
    dtype = v0.dtype
    if grad_spikes is not None:
        steps = grad_spikes.shape[1]
    use_grad_at_active = grad_at_active is not None
    if grad_spikes is None:
        grad_spikes = np.zeros((1, 1, 1), dtype) if use_grad_at_active else np.zeros((batch, steps, neurons), dtype)
    if grad_at_active is None:
        grad_at_active = np.empty(0, dtype)
    grad_v0 = np.empty((batch, neurons), dtype)
    grad_syn0 = np.empty((batch, neurons), dtype)
    has_grad_membrane = grad_membrane is not None
    if grad_membrane is None:
        grad_membrane = np.empty((1, 1, 1), dtype)
    if active[0] == "dense":
        offsets, index, surr, dense = np.zeros(batch + 1, np.int64), np.empty(0, np.int32), np.empty(0, dtype), active[1]
    else:
        (_, offsets, index, surr), dense = active, np.empty((1, 1, 1), dtype)
    chunks = max(1, min(batch, numba.get_num_threads()))
    if linear is None:
        grad_current = np.empty((batch, steps, neurons), dtype)
        row_ptr, cols, vals = np.zeros(1, np.int64), np.empty(0, np.int32), np.empty(0, dtype)
        weight_t, in_ptr, in_index = np.empty((1, 1), dtype), np.zeros(1, np.int64), np.empty(0, np.int64)
        grad_weight_t, grad_bias = np.empty((chunks, 1, 1), dtype), np.zeros((chunks, neurons), dtype)
    else:
        (row_ptr, cols, vals), weight_t, entries = linear
        grad_current = np.empty((1, 1, 1), dtype)
        in_ptr, in_index = entries if entries is not None else (np.zeros(batch * steps + 1, np.int64),
                                                                 np.empty(0, np.int64))
        grad_weight_t = np.zeros((chunks,) + weight_t.shape, dtype)
        grad_bias = np.zeros((chunks, neurons), dtype)
    grad_x_values = np.empty(in_index.shape[0], dtype)
    grad_rec_t = np.zeros((chunks, neurons, neurons) if need_recurrent_grad else (chunks, 1, 1), dtype)
    _lif_backward_sparse_kernel(grad_spikes, use_grad_at_active, grad_at_active, has_grad_membrane, grad_membrane, grad_v_final, grad_syn_final,
                                offsets, index, surr, active[0] == "dense", dense,
                                beta, alpha, theta, v0, spikes_u8, recurrent_t,
                                RESET_CODES[reset], cuba, recurrent, fire_at_threshold, window,
                                surrogate_code, surrogate_param,
                                linear is None, grad_current, grad_v0, grad_syn0,
                                linear is not None, row_ptr, cols, vals, weight_t, in_ptr, in_index, grad_x_values,
                                need_recurrent_grad, grad_weight_t, grad_bias, grad_rec_t, steps)
    grad_rec = grad_rec_t.sum(0) if need_recurrent_grad else None
    if linear is None:
        return grad_current, grad_v0, grad_syn0, grad_rec
    return None, grad_v0, grad_syn0, grad_weight_t.sum(0), grad_bias.sum(0), grad_x_values, grad_rec


@njit(parallel=True, cache=True)
def _lif_backward_exact_kernel(grad_spikes, has_grad_membrane, grad_membrane, grad_v_final, grad_syn_final,
                               membrane, syn_record, beta, alpha, theta, v0, syn0, recurrent_t,
                               reset_code, reset_in_graph, cuba, recurrent, fire_at_threshold,
                               surrogate_code, surrogate_param,
                               grad_current, grad_v0, grad_syn0, grad_beta_b, grad_theta_b, grad_alpha_b):
    batch, steps, neurons = grad_spikes.shape
    for b in prange(batch):
        gv_next = np.zeros(neurons, dtype=grad_spikes.dtype)
        gv = np.empty(neurons, dtype=grad_spikes.dtype)
        gsyn_next = np.zeros(neurons, dtype=grad_spikes.dtype)
        for t in range(steps - 1, -1, -1):
            for j in range(neurons):
                vt = membrane[b, t, j]
                u = vt - theta[j]
                s_t = 1.0 if _fires(u, fire_at_threshold) else 0.0
                # dL/ds[t]: output, recurrent input of step t+1, and the reset of step t+1.
                gs = grad_spikes[b, t, j]
                if t < steps - 1:
                    if recurrent:
                        acc = 0.0
                        for i in range(neurons):
                            acc += recurrent_t[j, i] * grad_current[b, t + 1, i]
                        gs += acc
                    if reset_in_graph:
                        if reset_code == 0:
                            gs -= theta[j] * gv_next[j]
                        elif reset_code == 1:
                            gs -= beta[j] * vt * gv_next[j]
                sg = _surrogate(u, surrogate_code, surrogate_param)
                carry = gv_next[j] * beta[j]
                if reset_code == 1:
                    carry *= 1.0 - s_t
                g = gs * sg + carry
                if has_grad_membrane:
                    g += grad_membrane[b, t, j]
                if t == steps - 1:
                    g += grad_v_final[b, j]
                gv[j] = g
                v_prev = membrane[b, t - 1, j] if t > 0 else v0[b, j]
                s_prev = 1.0 if _fires(v_prev - theta[j], fire_at_threshold) else 0.0
                grad_theta_b[b, j] -= gs * sg
                if reset_code == 0:
                    grad_theta_b[b, j] -= g * s_prev
                    grad_beta_b[b, j] += g * v_prev
                elif reset_code == 1:
                    grad_beta_b[b, j] += g * v_prev * (1.0 - s_prev)
                else:
                    grad_beta_b[b, j] += g * v_prev
            if cuba:
                for j in range(neurons):
                    gsyn = gv[j] + alpha[j] * gsyn_next[j]
                    if t == steps - 1:
                        gsyn += grad_syn_final[b, j]
                    syn_prev = syn_record[b, t - 1, j] if t > 0 else syn0[b, j]
                    grad_alpha_b[b, j] += gsyn * syn_prev
                    gsyn_next[j] = gsyn
                    grad_current[b, t, j] = gsyn
            else:
                for j in range(neurons):
                    grad_current[b, t, j] = gv[j]
            for j in range(neurons):
                gv_next[j] = gv[j]
        for j in range(neurons):
            u0 = v0[b, j] - theta[j]
            s0 = 1.0 if _fires(u0, fire_at_threshold) else 0.0
            gs = 0.0
            if recurrent:
                for i in range(neurons):
                    gs += recurrent_t[j, i] * grad_current[b, 0, i]
            if reset_in_graph:
                if reset_code == 0:
                    gs -= theta[j] * gv_next[j]
                elif reset_code == 1:
                    gs -= beta[j] * v0[b, j] * gv_next[j]
            sg = _surrogate(u0, surrogate_code, surrogate_param)
            carry = gv_next[j] * beta[j]
            if reset_code == 1:
                carry *= 1.0 - s0
            grad_v0[b, j] = gs * sg + carry
            grad_theta_b[b, j] -= gs * sg
            grad_syn0[b, j] = alpha[j] * gsyn_next[j] if cuba else 0.0


def lif_backward_exact(grad_spikes, grad_membrane, grad_v_final, grad_syn_final, membrane, syn_record, beta, alpha,
                       theta, v0, syn0, recurrent_t, *, reset, reset_in_graph, cuba, recurrent, fire_at_threshold,
                       surrogate_code, surrogate_param):
    """Full BPTT adjoint; returns ``(dI, dv0, dsyn0, dβ, dθ, dα)`` with parameter grads per neuron."""
    batch, steps, neurons = grad_spikes.shape
    dtype = grad_spikes.dtype
    grad_current = np.empty(grad_spikes.shape, grad_spikes.dtype)  # C order whatever grad's strides
    grad_v0 = np.empty((batch, neurons), dtype)
    grad_syn0 = np.empty((batch, neurons), dtype)
    # Per-batch partial sums avoid races between threads; reduced once at the end.
    grad_beta_b = np.zeros((batch, neurons), dtype)
    grad_theta_b = np.zeros((batch, neurons), dtype)
    grad_alpha_b = np.zeros((batch, neurons), dtype)
    has_grad_membrane = grad_membrane is not None
    if grad_membrane is None:
        grad_membrane = np.empty((1, 1, 1), dtype)
    _lif_backward_exact_kernel(grad_spikes, has_grad_membrane, grad_membrane, grad_v_final, grad_syn_final,
                               membrane, syn_record, beta, alpha, theta, v0, syn0, recurrent_t,
                               RESET_CODES[reset], reset_in_graph, cuba, recurrent, fire_at_threshold,
                               surrogate_code, surrogate_param,
                               grad_current, grad_v0, grad_syn0, grad_beta_b, grad_theta_b, grad_alpha_b)
    return (grad_current, grad_v0, grad_syn0, grad_beta_b.sum(0), grad_theta_b.sum(0), grad_alpha_b.sum(0))


# --- Sparse inputs: compact events instead of dense scans -------------------------------------------


_EVENT_BLOCK = 32


@njit(parallel=True, cache=True)
def _count_nonzero_rows(x_bits, magnitude_mask, counts, block_has_events):
    # Compare bit patterns without the sign bit: branch-free and vectorised (-0.0 counts as zero).
    # Fixed-size blocks keep the inner trip count constant; blocks with events are flagged so the
    # fill pass reads only those.
    for r in prange(x_bits.shape[0]):
        row = x_bits[r]
        width = row.shape[0]
        full_blocks = width // _EVENT_BLOCK
        n = 0
        for blk in range(full_blocks):
            start = blk * _EVENT_BLOCK
            in_block = 0
            for k in range(_EVENT_BLOCK):
                in_block += (row[start + k] & magnitude_mask) != 0
            block_has_events[r, blk] = in_block != 0
            n += in_block
        if full_blocks * _EVENT_BLOCK < width:
            in_block = 0
            for k in range(full_blocks * _EVENT_BLOCK, width):
                in_block += (row[k] & magnitude_mask) != 0
            block_has_events[r, full_blocks] = in_block != 0
            n += in_block
        counts[r] = n


@njit(parallel=True, cache=True)
def _fill_csr(x2d, block_has_events, row_ptr, cols, vals):
    width = x2d.shape[1]
    for r in prange(x2d.shape[0]):
        p = row_ptr[r]
        for blk in range(block_has_events.shape[1]):
            if block_has_events[r, blk]:
                for k in range(blk * _EVENT_BLOCK, min(width, (blk + 1) * _EVENT_BLOCK)):
                    xv = x2d[r, k]
                    if xv != 0.0:
                        cols[p] = k
                        vals[p] = xv
                        p += 1


def dense_to_events(x2d, max_density):
    """Compress rows of ``x2d`` into CSR events ``(row_ptr, cols, vals)``; None if denser than ``max_density``.

    NaN and ±inf are nonzero, so they travel as events and propagate like in a dense matmul
    (except that NaN·0 terms a dense matmul would add are absent, which cannot change a NaN result).
    """
    bits_dtype, mask = (np.uint32, np.uint32(0x7FFFFFFF)) if x2d.dtype == np.float32 else (
        np.uint64, np.uint64(0x7FFFFFFFFFFFFFFF))
    x_bits = x2d.view(bits_dtype)
    counts = np.empty(x2d.shape[0], np.int64)
    block_has_events = np.empty((x2d.shape[0], -(-x2d.shape[1] // _EVENT_BLOCK)), np.bool_)
    _count_nonzero_rows(x_bits, mask, counts, block_has_events)
    total = int(counts.sum())
    if total > max_density * x2d.size:
        return None
    row_ptr = np.zeros(x2d.shape[0] + 1, np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    cols = np.empty(total, np.int32)
    vals = np.empty(total, x2d.dtype)
    _fill_csr(x2d, block_has_events, row_ptr, cols, vals)
    return row_ptr, cols, vals


@njit(parallel=True, cache=True)
def _events_weight_grad_kernel(row_ptr, cols, vals, grad_rows, partial):
    # partial[c] accumulates dWᵀ for a contiguous block of rows; blocks are summed afterwards.
    chunks = partial.shape[0]
    rows = grad_rows.shape[0]
    outputs = grad_rows.shape[1]
    per_chunk = (rows + chunks - 1) // chunks
    for c in prange(chunks):
        acc = partial[c]
        for r in range(c * per_chunk, min(rows, (c + 1) * per_chunk)):
            for p in range(row_ptr[r], row_ptr[r + 1]):
                xv = vals[p]
                i = cols[p]
                for j in range(outputs):
                    acc[i, j] += xv * grad_rows[r, j]


def events_weight_grad(events, grad_rows, in_features):
    """``dW = grad_rowsᵀ @ x`` in ``(out, in)`` layout, visiting only the nonzeros of ``x``."""
    row_ptr, cols, vals = events
    chunks = max(1, numba.get_num_threads())
    partial = np.zeros((chunks, in_features, grad_rows.shape[1]), grad_rows.dtype)
    _events_weight_grad_kernel(row_ptr, cols, vals, grad_rows, partial)
    return partial.sum(0).T


@njit(parallel=True, cache=True)
def _input_grad_at_kernel(flat_index, grad_rows, weight_t, out_values):
    in_features = weight_t.shape[0]
    outputs = weight_t.shape[1]
    for n in prange(flat_index.shape[0]):
        r = flat_index[n] // in_features
        i = flat_index[n] % in_features
        acc = 0.0
        for j in range(outputs):
            acc += grad_rows[r, j] * weight_t[i, j]
        out_values[n] = acc


def input_grad_at(flat_index, grad_rows, weight_t):
    """Entries ``(grad_rows @ weight)[flat_index]`` only: the upstream layer reads nothing else."""
    out = np.empty(flat_index.shape[0], grad_rows.dtype)
    _input_grad_at_kernel(flat_index, grad_rows, weight_t, out)
    return out


# --- Non-spiking leaky integrator --------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _leaky_backward_kernel(grad_out, grad_final, beta, outputs, state0, grad_current, grad_state0, grad_beta_b):
    batch, steps, neurons = grad_out.shape
    for b in prange(batch):
        for j in range(neurons):
            g = grad_final[b, j]
            gb = 0.0
            for t in range(steps - 1, -1, -1):
                g = g + grad_out[b, t, j]
                grad_current[b, t, j] = g
                gb += g * (outputs[b, t - 1, j] if t > 0 else state0[b, j])
                g = g * beta[j]
            grad_state0[b, j] = g
            grad_beta_b[b, j] = gb


def leaky_backward(grad_out, grad_final, beta, outputs, state0):
    """Returns ``(dI, d state0, dβ per neuron)`` of ``out[t] = β out[t-1] + I[t]``."""
    grad_current = np.empty(grad_out.shape, grad_out.dtype)  # C order whatever grad's strides
    grad_state0 = np.empty(state0.shape, state0.dtype)
    grad_beta_b = np.empty(state0.shape, state0.dtype)
    _leaky_backward_kernel(grad_out, grad_final, beta, outputs, state0, grad_current, grad_state0, grad_beta_b)
    return grad_current, grad_state0, grad_beta_b.sum(0)
