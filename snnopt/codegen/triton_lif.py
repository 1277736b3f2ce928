"""Generated Triton kernels for the fused LIF layer (CUDA; Triton's interpreter on CPU for tests).

From a :class:`snnopt.spec.LifSpec` and the accumulation dtype this module writes Triton source
with the spec folded in as constants (reset rule, attached reset, CuBa, firing rule, surrogate
derivative as an expression, window), stores it in the kernel cache (:mod:`kernel_cache`) and
imports it. One kernel set per (spec, accumulation dtype), memoised per process and shared
between processes through the cache folder. :func:`emit_kernels` saves the source for reading.

Kernel design (three kernels per spec; every one parallel over batch × blocks of neurons, the
time loop inside, state in registers):

* ``_lif_fwd_kernel``: the recurrence of :mod:`snnopt.spec` over steps ``[t_start, t_stop)`` from
  a precomputed input current (one cuBLAS matmul ``x @ Wᵀ + b`` for all steps, done by torch).
  State goes in and out through ``(B, N)`` buffers, so a recurrent layer runs one launch per step
  after torch adds ``s[t-1] @ Vᵀ`` to that step's current (a per-step GEMM: simple and correct,
  slower than the feedforward path; an in-kernel dot would need one program per batch row).
  It writes spikes in the input dtype and, for the backward, either the membrane (exact mode) or a
  uint8 flag per entry (bit 0 spiked, bit 1 active: ``|v − θ| < window``) plus the surrogate value
  at active entries (sparse mode), compacted by torch into an index list.
* ``_lif_bwd_kernel``: the reverse sweep (adjoint equations in :mod:`snnopt.codegen.cpu_lif`).
  Exact mode recomputes spikes and σ′ from the saved membrane and accumulates per-batch partial
  dβ, dθ, dα; sparse mode reads σ′ only where the active flag is set (windowed surrogate,
  detached reset), so the sweep is the seed paper's reverse filter. Recurrent layers again run one
  launch per step, torch adding ``Gcur[t+1] @ V`` to dL/ds[t] in between.
* ``_lif_bwd_init_kernel``: the step −1 terms (gradient of the initial state, the spike of the
  initial membrane).

Feedforward sparse layers (reset by subtraction or none, no synaptic current) take the *compact
path*: the forward counts the active entries per (b, t, block) in the kernel and stages them per
program, torch turns the counts into offsets (one host read: the list's length), and a parallel
copy writes the active list (ascending flat index + surrogate value, no per-entry buffer); where a
program's entries overflow its staging area, a second launch reruns the recurrence and writes them
in place. The input is kept as events (``input_events``). Its backward (``sparse_backward``) is
two launches over those lists: the weight gradient as pairs (active entry × earlier input event of
the same row) and the input gradient at the upstream active entries only, which goes back to a
compact producer as a sparse COO tensor read in the producer's own list order. When the pairs
would outnumber a GEMM's work (dense inputs, e.g. the Open Neuromorphic configuration), one sweep
rebuilds dL/dI densely from the same lists, with the bias and initial-state gradients on the way
(``reverse_sweep``), and the weight gradient is one cuBLAS GEMM; a membrane / final-state / full
input gradient takes the general reverse sweep from the lists. Other sparse specs keep one uint8
flag per entry and the dense sweep.

float64 kernels accumulate in float64; float32, float16 and bfloat16 inputs in float32. This module
needs no triton itself (the generated modules import it), so :func:`emit_kernels` works anywhere.

Example::

    >>> from snnopt.spec import LifSpec
    >>> paths = emit_kernels(LifSpec(cuba=True), "kernels/")    # [PosixPath('kernels/lif_kernels_….py')]
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

from snnopt.codegen import kernel_cache, spike_matmul
from snnopt.errors import InvalidArgumentError
from snnopt.spec import LifSpec

FLAG_SPIKE = 1
FLAG_ACTIVE = 2
# No fused multiply-adds: each step then rounds exactly as the eager reference (and a user's loop)
# does, so spikes near the threshold come out the same. The kernels are memory-bound; FMA buys nothing.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@dataclass(frozen=True)
class KernelTuning:
    """Launch choices that change how fast the kernels run, never what they compute.

    * ``sweep_stages``: time steps in flight in a sweep's loop (``tl.range(..., num_stages=)``). A
      sweep is one long serial loop per (batch row, block of neurons) and its loads do not depend on
      the recurrence, so Triton's pipeliner can issue the loads of the next steps (``cp.async`` into
      shared memory) while this one computes; with 1 every step waits for its own load. Sweeps that
      run one step per launch (recurrent layers) always use 1.
    * ``max_block``: most neurons per sweep program (a power of two, 16 to 1024). Fewer means more
      programs for the same lanes.
    * ``atomic_sem``: memory order of the sparse weight gradient's atomic adds. They only
      accumulate, so ``"relaxed"`` suffices and compiles to fire-and-forget ``red`` instructions;
      Triton's default ``"acq_rel"`` waits for every add to return and orders it with the thread's
      other memory operations.
    * ``pair_block``: events the sparse weight gradient's programs walk at a time (the input events
      of their entries' batch rows; one warp per 32); the input gradient's programs walk the active
      entries half as many at a time.
    * ``pair_entries``: active entries per program of the sparse weight gradient, and listed input
      entries per program of the sparse input gradient (a power of two, 1 to 64). With 1 (until
      stop 18) a program took one entry: run 5 on an H200 spent 1.4–1.9 ns per program whatever its
      pairs (seed network, H = 200: 48 µs for layer 1's 25k entries, 70 µs for a captured graph's
      50k-entry list, half of it padding). With more, a program's entries share each tile of
      events they walk. 8 is an estimate, not yet measured: the suite's trials ``pair_entries_1``
      and ``pair_entries_32`` time it.
    * ``pair_grouping``: a weight-gradient program adds up the pairs of its entries that share a
      (b, j) (a neuron active over several steps) before its atomics, one add per (b, j) and event
      instead of one per entry and event, through a 0/1 merge matrix times the pair tile (float32
      layers; needs ``pair_entries`` >= 16). Fewer atomics for more arithmetic: worth it only where
      the device's atomics bound the kernel. Off (shipped) until a GPU measures it: the suite's
      trial ``grouped_pairs_32``.
    * ``weight_grad_route``: how a compact sparse layer's weight gradient is summed: ``"pairs"``
      (atomics over active entry × earlier input event, :func:`sparse_backward`), ``"dense"``
      (dL/dI rebuilt by a reverse sweep, then one GEMM, :func:`reverse_sweep`) or ``"auto"``
      (shipped): pairs where :func:`events_are_cheaper` estimates them cheaper, a guess (an atomic
      costed as 64 GEMM multiply-adds) that picks pairs at the seed network's sizes. Unlike the
      fields above this one changes the order of the sums, so results differ in rounding (the dense
      route's GEMM keeps float32 accuracy, see :mod:`spike_matmul`); under deterministic algorithms
      the route is always dense. The suite's trial ``dense_weight_grad`` times the dense route on
      the seed layers.
    * ``one_pass_compaction``: the compact forward stages each program's active entries as it
      finds them and a parallel copy orders them (one serial sweep over T); off, or where a
      program's entries overflow its staging area (:data:`STAGE_FRACTION`), a second sweep reruns
      the recurrence to write them in order.
    * ``event_tile``: input entries the event-listing kernel reads per loop iteration (a power of
      two): it takes ``event_tile // BLOCK`` rows per program, ``BLOCK`` the row length rounded up
      to a power of two, at most 1024. One row of the seed network's input (784 features) was too
      little work for a program to hide its loads' latency.
    * ``gather_slots``: (b, t, block) slots per program of the copy that orders the one-pass
      compaction's staged entries (a power of two, 1 to 64). With 1 (until run 5), a program of
      ``BLOCK_N`` lanes copies one slot's few entries (about 4 at the ON layer's 1.5 % activity, 0.5
      at the seed network's): 128k programs at n = 4096, 84 µs on an H200 in run 5. With more, a
      one-warp program walks that many slots. 8 is an estimate (16k one-warp programs, each a few
      dependent loads per slot), not yet measured: the suite's trial ``gather_slots_1`` times it.
    * ``guess_event_count``: an eager compact layer called again with the same weight and input
      shape sizes its input-event lists from the last call's count (with headroom) instead of
      reading this call's count from the device; the count and the spike check come back with the
      active list's length, in the forward's one read, and a guess that fell short (or a spike
      check that no longer suits the GEMM route it chose) reruns the forward with the exact count.
      Off, the forward reads the device twice (run 5 measured its eager forward on an H200 at
      3.4 ms against 1.9 ms of kernels: the device waits while the host works after each read).
      Not measured on a GPU yet: the suite's trial ``read_event_count`` times the two reads.

    The defaults are what snnopt ships; :func:`tuning` changes them for a block of code, so a
    benchmark can time alternatives side by side (``benchmarks/gpu_suite.py``, ``kernel_tuning``).
    """

    sweep_stages: int = 3
    max_block: int = 256
    atomic_sem: str = "relaxed"
    pair_block: int = 128
    pair_entries: int = 8
    pair_grouping: bool = False
    weight_grad_route: str = "auto"
    one_pass_compaction: bool = True
    event_tile: int = 4096
    gather_slots: int = 8
    guess_event_count: bool = True

    def __post_init__(self):
        if not isinstance(self.sweep_stages, int) or not 1 <= self.sweep_stages <= 8:
            raise InvalidArgumentError(f"sweep_stages: expected an int from 1 to 8, got {self.sweep_stages!r}")
        if (not isinstance(self.max_block, int) or not 16 <= self.max_block <= 1024
                or self.max_block & (self.max_block - 1)):
            raise InvalidArgumentError(f"max_block: expected a power of two from 16 to 1024, got {self.max_block!r}")
        if self.atomic_sem not in ("relaxed", "acq_rel"):
            raise InvalidArgumentError(f"atomic_sem: expected 'relaxed' or 'acq_rel', got {self.atomic_sem!r}")
        if (not isinstance(self.pair_block, int) or not 32 <= self.pair_block <= 1024
                or self.pair_block & (self.pair_block - 1)):
            raise InvalidArgumentError(f"pair_block: expected a power of two from 32 to 1024, got {self.pair_block!r}")
        if (not isinstance(self.pair_entries, int) or not 1 <= self.pair_entries <= 64
                or self.pair_entries & (self.pair_entries - 1)):
            raise InvalidArgumentError(f"pair_entries: expected a power of two from 1 to 64, got {self.pair_entries!r}")
        if not isinstance(self.pair_grouping, bool):
            raise InvalidArgumentError(f"pair_grouping: expected a bool, got {self.pair_grouping!r}")
        if self.pair_grouping and self.pair_entries < 16:
            raise InvalidArgumentError(
                f"pair_grouping: needs pair_entries >= 16 (a block's merge is a matrix product), "
                f"got {self.pair_entries}")
        if self.weight_grad_route not in ("auto", "pairs", "dense"):
            raise InvalidArgumentError(
                f"weight_grad_route: expected 'auto', 'pairs' or 'dense', got {self.weight_grad_route!r}")
        if not isinstance(self.one_pass_compaction, bool):
            raise InvalidArgumentError(f"one_pass_compaction: expected a bool, got {self.one_pass_compaction!r}")
        if (not isinstance(self.event_tile, int) or not 16 <= self.event_tile <= 16384
                or self.event_tile & (self.event_tile - 1)):
            raise InvalidArgumentError(f"event_tile: expected a power of two from 16 to 16384, got {self.event_tile!r}")
        if (not isinstance(self.gather_slots, int) or not 1 <= self.gather_slots <= 64
                or self.gather_slots & (self.gather_slots - 1)):
            raise InvalidArgumentError(f"gather_slots: expected a power of two from 1 to 64, got {self.gather_slots!r}")
        if not isinstance(self.guess_event_count, bool):
            raise InvalidArgumentError(f"guess_event_count: expected a bool, got {self.guess_event_count!r}")


_TUNING = [KernelTuning()]


def current_tuning() -> KernelTuning:
    """The :class:`KernelTuning` launches use now."""
    return _TUNING[-1]


@contextlib.contextmanager
def tuning(**changes):
    """Launch with some :class:`KernelTuning` fields changed inside the block (the results are the same).

    Example::

        >>> with tuning(sweep_stages=1):
        ...     spikes = layer(x)   # the sweeps without software pipelining
    """
    _TUNING.append(replace(current_tuning(), **changes))
    try:
        yield current_tuning()
    finally:
        _TUNING.pop()


@dataclass(frozen=True)
class KernelKey:
    """What the generated source depends on: the spec, normalised, and the accumulation dtype."""

    reset: str
    reset_in_graph: bool
    surrogate: str
    surrogate_param: float
    cuba: bool
    recurrent: bool
    fire_at_threshold: bool
    sparse: bool
    window: float
    acc: str  # "float32" or "float64"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_key(spec: LifSpec, dtype: torch.dtype) -> KernelKey:
    return KernelKey(reset=spec.reset, reset_in_graph=spec.reset_in_graph, surrogate=spec.surrogate.name,
                     surrogate_param=spec.surrogate.param, cuba=spec.cuba, recurrent=spec.recurrent,
                     fire_at_threshold=spec.fire_at_threshold, sparse=spec.sparse,
                     window=spec.window if spec.sparse else 0.0,
                     acc=str(accumulation_dtype(dtype)).replace("torch.", ""))


# --- source generation -------------------------------------------------------------------------


def _const(value: float) -> str:
    # tl.full keeps a float64 constant exact; a bare literal would be rounded to float32 first.
    return f"tl.full([], {float(value)!r}, ACC)"


def _surrogate_lines(key: KernelKey) -> list[str]:
    """Body of ``_surrogate(u)``: σ′(u) of :mod:`snnopt.surrogate`, the parameter folded in."""
    k = key.surrogate_param
    if key.surrogate == "superspike":
        return [f"a = {_const(k)} * tl.abs(u) + 1.0", "return 1.0 / (a * a)"]
    if key.surrogate == "sigmoid":
        return [f"sg = 1.0 / (1.0 + tl.exp(-{_const(k)} * u))", f"return {_const(k)} * sg * (1.0 - sg)"]
    if key.surrogate == "atan":
        return [f"z = {_const(math.pi / 2.0 * k)} * u", f"return {_const(k / 2.0)} / (1.0 + z * z)"]
    if key.surrogate == "triangle":
        return [f"return tl.maximum(1.0 - tl.abs(u) / {_const(k)}, 0.0) / {_const(k)}"]
    return [f"return tl.where(tl.abs(u) < {_const(k / 2.0)}, 1.0 / {_const(k)}, 0.0 * u)"]


def _fire(u: str, key: KernelKey) -> str:
    op = ">=" if key.fire_at_threshold else ">"
    return f"tl.where({u} {op} 0.0, 1.0, 0.0).to(ACC)"


def _membrane_update(key: KernelKey) -> str:
    # The reference's operation order, so float32 spikes match it bit for bit.
    if key.reset == "subtract":
        return "v = beta * v + drive - theta * s_prev"
    if key.reset == "zero":
        return "v = beta * v * (1.0 - s_prev) + drive"
    return "v = beta * v + drive"


def _indent(lines: list[str], spaces: int) -> str:
    return "\n".join(" " * spaces + line if line else "" for line in lines)


# Kernels of the compact sparse path (feedforward layer, reset detached by subtraction or none, no
# synaptic current): they depend on the spec only through the accumulation dtype. See
# ``sparse_backward`` for the formulation and why it is organised this way.
COMPACT_KERNELS = '''

@triton.jit
def _powi(base, n):
    # base ** n for integer n >= 0, per lane (0 ** 0 = 1, negative bases keep their sign).
    return _powi_from_log(tl.log(tl.abs(base)), base < 0, n)


@triton.jit
def _powi_from_log(log_abs, negative, n):
    # _powi from log|base| and base < 0, worked out once where many exponents share a base.
    magnitude = tl.exp(n.to(ACC) * log_abs)
    magnitude = tl.where(n == 0, 1.0, magnitude)
    return tl.where(negative, tl.where((n % 2) == 1, -magnitude, magnitude), magnitude)


@triton.jit(do_not_specialize=["rows", "capacity"])
def _input_events_kernel(x_ptr, counts_ptr, offsets_ptr, pos_ptr, val_ptr, kind_ptr, op_ptr, rows, steps, features,
                         capacity, WRITE: tl.constexpr, CHECK: tl.constexpr, OPERAND: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # One program per ROWS (b, t) rows of the input: counts each row's nonzeros, or (WRITE) lists them
    # as (t * features + i, value) at the row's offset. Rows in order, so events are grouped by b, then
    # t. Several rows per program: a row of a few hundred features is too little work for one.
    # Events at or past `capacity` are not written (a captured graph's fixed list; the caller flags it).
    # OPERAND: the pass reads every entry anyway, so it also writes the input as the forward GEMM's
    # spike operand (with WRITE), OPERAND copies side by side per row ((B*T, OPERAND*features) of
    # op_ptr's dtype, every entry written: no zero fill, no rebuild from the events); or (counting,
    # OPERAND=1 in the input's dtype) a plain copy: spike_check's copy_into.
    # CHECK: kind[0] = 1 where a nonzero is not a bfloat16 value, kind[1] = 1 where one is not an
    # integer in [-128, 127] (spike_matmul.spike_kind of the events, read with their count).
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = r < rows
    t = r % steps
    base = tl.zeros([ROWS], tl.int64)
    if WRITE:
        base = tl.load(offsets_ptr + r, mask=live, other=0)
    total = tl.zeros([ROWS], tl.int32)
    not_bfloat16 = tl.zeros([], tl.int32)
    not_int8 = tl.zeros([], tl.int32)
    for start in range(0, features, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = live[:, None] & (offs < features)[None, :]
        xv = tl.load(x_ptr + r[:, None] * features + offs[None, :], mask=m, other=0.0)
        nz = (xv != 0) & m
        if OPERAND > 0:
            operand = xv.to(op_ptr.dtype.element_ty)  # exact: the caller's route checked the values
            for c in tl.static_range(OPERAND):
                tl.store(op_ptr + r[:, None] * (OPERAND * features) + c * features + offs[None, :], operand,
                         mask=m)
        if WRITE:
            pos = base[:, None] + tl.cumsum(nz.to(tl.int64), axis=1) - 1
            keep = nz & (pos < capacity)
            tl.store(pos_ptr + pos, (t[:, None] * features + offs[None, :]).to(pos_ptr.dtype.element_ty), mask=keep)
            tl.store(val_ptr + pos, xv.to(ACC), mask=keep)
            base += tl.sum(nz.to(tl.int64), axis=1)
        else:
            total += tl.sum(nz.to(tl.int32), axis=1)
        if CHECK:
            xf = xv.to(tl.float32)
            exact = xf.to(xv.dtype) == xv  # (a float64 beyond float32 is neither)
            bfloat16_ok = exact & (xf.to(tl.bfloat16).to(tl.float32) == xf)
            in_range = (xf >= -128.0) & (xf <= 127.0)  # (NaN is not)
            int8_ok = exact & in_range & (tl.where(in_range, xf, 0.0).to(tl.int32).to(tl.float32) == xf)
            not_bfloat16 = tl.maximum(not_bfloat16, tl.max(tl.max(tl.where(nz & ~bfloat16_ok, 1, 0), axis=1),
                                                           axis=0))
            not_int8 = tl.maximum(not_int8, tl.max(tl.max(tl.where(nz & ~int8_ok, 1, 0), axis=1), axis=0))
    if not WRITE:
        tl.store(counts_ptr + r, total, mask=live)
    if CHECK:
        tl.atomic_max(kind_ptr, not_bfloat16.to(tl.int64), sem="relaxed")  # only a flag: no ordering needed
        tl.atomic_max(kind_ptr + 1, not_int8.to(tl.int64), sem="relaxed")


@triton.jit(do_not_specialize=["count", "entries"])
def _sparse_weight_grad_kernel(gs_ptr, index_ptr, asurr_ptr, beta_ptr, evt_off_ptr, evt_pos_ptr, evt_val_ptr,
                               g_ptr, gw_ptr, gb_ptr, gv0_ptr, count, steps, neurons, features, entries,
                               gs_stride_b, gs_stride_t, gs_stride_n,
                               GS_COMPACT: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                               NEED_V0: tl.constexpr, ENTRIES: tl.constexpr, BLOCK_E: tl.constexpr,
                               GROUP: tl.constexpr, ATOMIC_SEM: tl.constexpr):
    # One program per ENTRIES consecutive active entries e = (b, t, j) of the `count` listed: g =
    # dL/ds * surrogate; then, for every input event (b, t0, i) with t0 <= t, dW[j, i] += g * x *
    # beta_j^(t - t0); db[j] += g * sum_k<=t beta_j^k; dv0[b, j] += g * beta_j^(t + 1). dL/ds is read
    # through its strides: autograd hands a sum() loss's gradient over as an expanded view (stride 0),
    # one stored value for all B*T*N entries.
    # Why several entries per program: one entry is a few hundred pairs at most, too little work for
    # a program (run 5 on an H200: ~1.4-1.9 ns per program whatever its pairs). The list is sorted by
    # (b, t, j), so the block's entries mostly share a batch row and walk the same events: each event
    # tile is loaded once for all of them, as an (ENTRIES, BLOCK_E) tile of pairs, each pair masked to
    # its own entry's range [first event of row b, last event at step t].
    # An index outside [0, entries) is padding (a captured graph's list past its length): g = 0, no
    # pairs; a block of padding only loads its indices.
    # GROUP (float32, ENTRIES >= 16): the block's entries of one (b, j), a neuron active over several
    # steps, add their pairs up before the atomics: one add per (b, j) and event, not per entry and
    # event (a 0/1 merge matrix times the pair tile, on the first entry of each (b, j) in the block).
    e = tl.program_id(0).to(tl.int64) * ENTRIES + tl.arange(0, ENTRIES)
    listed = e < count
    flat = tl.load(index_ptr + e, mask=listed, other=-1)
    valid = listed & (flat >= 0) & (flat < entries)
    flat = tl.where(valid, flat, 0)
    j = flat % neurons
    bt = flat // neurons
    t = bt % steps
    b = bt // steps
    if GS_COMPACT:
        gs = tl.load(gs_ptr + e, mask=listed, other=0.0).to(ACC)
    else:
        gs = tl.load(gs_ptr + b * gs_stride_b + t * gs_stride_t + j * gs_stride_n, mask=valid, other=0.0).to(ACC)
    g = tl.where(valid, gs * tl.load(asurr_ptr + e, mask=listed, other=0.0), 0.0)
    tl.store(g_ptr + e, g, mask=listed)
    beta = tl.load(beta_ptr + j, mask=valid, other=0.5).to(ACC)  # padding: any finite log and 1 - beta
    if NEED_W:
        log_beta = tl.log(tl.abs(beta))  # once per entry: every pair of the entry decays by its beta
        start = tl.load(evt_off_ptr + b * steps, mask=valid, other=0)
        stop = tl.load(evt_off_ptr + bt + 1, mask=valid, other=0)
        # The union of the entries' ranges: empty (lo > hi) for a block of padding.
        lo = tl.min(tl.where(valid, start, 9223372036854775807), axis=0)
        hi = tl.max(tl.where(valid, stop, 0), axis=0)
        if GROUP:
            row = b * neurons + j
            same = (row[:, None] == row[None, :]) & valid[:, None] & valid[None, :]
            before = tl.arange(0, ENTRIES)[None, :] < tl.arange(0, ENTRIES)[:, None]
            first = valid & (tl.sum((same & before).to(tl.int32), axis=1) == 0)  # first of its (b, j) here
            merge = (same & first[:, None]).to(tl.float32)
        for k in range(lo, hi, BLOCK_E):
            ks = k + tl.arange(0, BLOCK_E)
            in_list = ks < hi
            p = tl.load(evt_pos_ptr + ks, mask=in_list, other=0).to(tl.int64)
            val = tl.load(evt_val_ptr + ks, mask=in_list, other=0.0)
            pair = valid[:, None] & (ks[None, :] >= start[:, None]) & (ks[None, :] < stop[:, None])
            decay = _powi_from_log(log_beta[:, None], (beta < 0)[:, None], t[:, None] - (p // features)[None, :])
            target = gw_ptr + j[:, None] * features + (p % features)[None, :]
            if GROUP:
                # (rows of entries that are not first of their (b, j) are zero: merge has none there)
                summed = tl.dot(merge, tl.where(pair, g[:, None] * val[None, :] * decay, 0.0), input_precision="ieee")
                tl.atomic_add(target, summed, mask=summed != 0.0, sem=ATOMIC_SEM)
            else:
                tl.atomic_add(target, g[:, None] * val[None, :] * decay, mask=pair, sem=ATOMIC_SEM)
    if NEED_B:
        geometric = tl.where(beta == 1.0, (t + 1).to(ACC), (1.0 - _powi(beta, t + 1)) / (1.0 - beta))
        tl.atomic_add(gb_ptr + j, g * geometric, mask=valid, sem=ATOMIC_SEM)
    if NEED_V0:
        tl.atomic_add(gv0_ptr + b * neurons + j, g * _powi(beta, t + 1), mask=valid, sem=ATOMIC_SEM)


@triton.jit(do_not_specialize=["slots"])
def _gather_staged_kernel(counts_ptr, offsets_ptr, slot_start_ptr, stage_index_ptr, stage_surr_ptr, index_ptr,
                          asurr_ptr, steps, blocks, stage_capacity, list_limit, slots, BLOCK: tl.constexpr,
                          SLOTS: tl.constexpr):
    # SLOTS (b, t, block) slots of the forward per program (KernelTuning.gather_slots), each: its
    # active entries, staged by the forward's program (b, block) at the slot's start in that
    # program's area, copied to the slot's offset in the ordered list. Entries at or past
    # `list_limit` (a captured graph's fixed-length list that overflowed), or past the end of their
    # program's area (it overflowed: they were never staged), are left as the list's padding; the
    # caller raises the plan's flag. Only a captured graph gathers from an overflowed area (eager
    # calls rerun the sweep instead).
    for i in range(SLOTS):
        slot = tl.program_id(0).to(tl.int64) * SLOTS + i
        count = tl.load(counts_ptr + slot, mask=slot < slots, other=0)
        if count > 0:
            b = slot // (steps * blocks)
            start = tl.load(slot_start_ptr + slot)
            source = (b * blocks + slot % blocks) * stage_capacity + start
            target = tl.load(offsets_ptr + slot)
            for k in range(0, count, BLOCK):
                ks = k + tl.arange(0, BLOCK)
                m = (ks < count) & (target + ks < list_limit) & (start + ks < stage_capacity)
                tl.store(index_ptr + target + ks, tl.load(stage_index_ptr + source + ks, mask=m), mask=m)
                tl.store(asurr_ptr + target + ks, tl.load(stage_surr_ptr + source + ks, mask=m), mask=m)


@triton.jit
def _bfloat16_parts(x):
    # float32 x as three bfloat16 parts hi + mid + lo, exactly (see spike_matmul); a non-finite
    # remainder is dropped, so inf and NaN stay whole in hi. Returned smallest first: lo, mid, hi.
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)
    rest = tl.where(tl.abs(rest) < float("inf"), rest, 0.0)
    mid = rest.to(tl.bfloat16)
    return (rest - mid.to(tl.float32)).to(tl.bfloat16), mid, hi


@triton.jit
def _split_bfloat16_kernel(src_ptr, out_ptr, cols, total, out_row_stride, slot_stride, REPEAT: tl.constexpr,
                           BLOCK: tl.constexpr):
    # Each float32 entry of a contiguous (rows, cols) tensor as its three bfloat16 parts, written
    # smallest first: lo, mid, hi at slots 0, 1, 2 of spike_matmul's stacked GEMM operand; or
    # (REPEAT, the spike operand: bfloat16 values, which the caller checked) the entry in all three.
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    x = tl.load(src_ptr + e, mask=m, other=0.0)
    if REPEAT:
        lo = x.to(tl.bfloat16)
        mid = lo
        hi = lo
    else:
        lo, mid, hi = _bfloat16_parts(x)
    target = out_ptr + (e // cols) * out_row_stride + e % cols
    tl.store(target, lo, mask=m)
    tl.store(target + slot_stride, mid, mask=m)
    tl.store(target + 2 * slot_stride, hi, mask=m)


@triton.jit
def _pow2(k):
    # 2**k in float32 for an int32 k in [-126, 127], from its bits (exact; exp2 may be approximate).
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_int8_kernel(src_ptr, shift_ptr, out_ptr, cols, total, src_row_stride, src_col_stride,
                          out_row_stride, out_col_stride, plane_stride,
                          SCALED_DIM: tl.constexpr, SLICES: tl.constexpr, BLOCK: tl.constexpr):
    # Each float32 entry of a (rows, cols) tensor as SLICES int8 base-256 digits of its row's fixed
    # point (spike_matmul.quantize_int8; the torch reference computes the same digits): scaled by
    # 2**shift of its row (two exact powers of two), rounded half up, digits peeled least
    # significant first, digit k written at k * plane_stride along the scaled dimension.
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    r = e // cols
    c = e % cols
    x = tl.load(src_ptr + r * src_row_stride + c * src_col_stride, mask=m, other=0.0)
    s = tl.load(shift_ptr + (r if SCALED_DIM == 0 else c), mask=m, other=0)
    finite = s != NONFINITE_SHIFT
    s = tl.where(finite, s, 0)
    half = s >> 1
    x = x * _pow2(half) * _pow2(s - half)
    x = tl.where(finite, x, 0.0)
    q = tl.where(tl.abs(x) >= 8388608.0, x, tl.floor(x + 0.5))
    target = out_ptr + r * out_row_stride + c * out_col_stride
    for k in tl.static_range(SLICES - 1):
        digit = q - 256.0 * tl.floor(q * 0.00390625 + 0.5)
        tl.store(target + k * plane_stride, digit.to(tl.int8), mask=m)
        q = (q - digit) * 0.00390625
    tl.store(target + (SLICES - 1) * plane_stride, q.to(tl.int8), mask=m)


@triton.jit
def _scale_back(whole, s):
    # The digit planes' int64 sum rounded once to float32, times 2**-s (two exact power-of-two
    # steps: 2**-s alone may be out of float32's range); NaN where s is NONFINITE_SHIFT.
    finite = s != NONFINITE_SHIFT
    s = tl.where(finite, s, 0)
    half = s >> 1
    out = whole.to(tl.float32) * _pow2(half - s) * _pow2(-half)
    return tl.where(finite, out, float("nan"))


@triton.jit
def _combine_int8_kernel(acc_ptr, shift_ptr, out_ptr, cols, total, acc_row_stride, plane_stride,
                         SCALED_DIM: tl.constexpr, SLICES: tl.constexpr, BLOCK: tl.constexpr):
    # out[r, c] = (sum_k 256**k * acc_k[r, c] in int64, rounded once to float32) * 2**-shift of its
    # row, NaN for a non-finite row (spike_matmul.combine_int8): the int8 GEMM's digit planes put
    # back together. acc is contiguous with plane k at k * plane_stride; out is contiguous.
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < total
    r = e // cols
    c = e % cols
    source = acc_ptr + r * acc_row_stride + c
    whole = tl.load(source + (SLICES - 1) * plane_stride, mask=m, other=0).to(tl.int64)
    for k in tl.static_range(SLICES - 1):
        whole = whole * 256 + tl.load(source + (SLICES - 2 - k) * plane_stride, mask=m, other=0).to(tl.int64)
    s = tl.load(shift_ptr + (r if SCALED_DIM == 0 else c), mask=m, other=0)
    tl.store(out_ptr + e, _scale_back(whole, s), mask=m)


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, shift_ptr, out_ptr, rows, cols, depth, stride_am, stride_ak, stride_bk, stride_bn,
                      plane_stride, DIGITS_ON_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr):
    # out (rows x cols, float32, contiguous) = a @ b where one operand holds int8 spikes and the other
    # four int8 digit planes (plane k at k * plane_stride) of a per-row fixed point: one int32
    # accumulator per plane, exact; the epilogue of spike_matmul.combine_int8 (int64 sum, one
    # rounding, 2**-shift per row of the scaled operand: columns of b, or rows of a). Grouped
    # tile order, so neighbouring programs share operand tiles in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(rows, BLOCK_M)
    tiles_n = tl.cdiv(cols, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % group) % rows_in_group
    tile_n = (pid % group) // rows_in_group
    rm = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_tile = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k in tl.range(0, depth, BLOCK_K, num_stages=STAGES):
        a_mask = (rm[:, None] < rows) & (rk[None, :] + k < depth)
        b_mask = (rk[:, None] + k < depth) & (rn[None, :] < cols)
        if DIGITS_ON_B:
            a = tl.load(a_tile, mask=a_mask, other=0)
            acc0 = tl.dot(a, tl.load(b_tile, mask=b_mask, other=0), acc0, out_dtype=tl.int32)
            acc1 = tl.dot(a, tl.load(b_tile + plane_stride, mask=b_mask, other=0), acc1, out_dtype=tl.int32)
            acc2 = tl.dot(a, tl.load(b_tile + 2 * plane_stride, mask=b_mask, other=0), acc2, out_dtype=tl.int32)
            acc3 = tl.dot(a, tl.load(b_tile + 3 * plane_stride, mask=b_mask, other=0), acc3, out_dtype=tl.int32)
        else:
            b = tl.load(b_tile, mask=b_mask, other=0)
            acc0 = tl.dot(tl.load(a_tile, mask=a_mask, other=0), b, acc0, out_dtype=tl.int32)
            acc1 = tl.dot(tl.load(a_tile + plane_stride, mask=a_mask, other=0), b, acc1, out_dtype=tl.int32)
            acc2 = tl.dot(tl.load(a_tile + 2 * plane_stride, mask=a_mask, other=0), b, acc2, out_dtype=tl.int32)
            acc3 = tl.dot(tl.load(a_tile + 3 * plane_stride, mask=a_mask, other=0), b, acc3, out_dtype=tl.int32)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    whole = ((acc3.to(tl.int64) * 256 + acc2.to(tl.int64)) * 256 + acc1.to(tl.int64)) * 256 + acc0.to(tl.int64)
    if DIGITS_ON_B:
        s = tl.load(shift_ptr + rn, mask=rn < cols, other=0)[None, :]
    else:
        s = tl.load(shift_ptr + rm, mask=rm < rows, other=0)[:, None]
    out = _scale_back(whole, s)
    tl.store(out_ptr + rm[:, None] * cols + rn[None, :], out, mask=(rm[:, None] < rows) & (rn[None, :] < cols))


@triton.jit
def _scatter_events_kernel(offsets_ptr, pos_ptr, val_ptr, out_ptr, features, copy_stride, copies,
                           BLOCK: tl.constexpr, ZERO_BLOCK: tl.constexpr):
    # One program per (b, t) row: row b*T + t of every copy of the dense input zeroed, then its input
    # events (pos = t * features + i) written there: the input rebuilt from its events, into memory
    # never filled before (one launch, where a zero fill of the whole operand and a scatter were two).
    # Copies stacked below each other (copy_stride = B*T*features).
    r = tl.program_id(0).to(tl.int64)
    for f in range(0, features, ZERO_BLOCK):
        fs = f + tl.arange(0, ZERO_BLOCK)
        for c in range(copies):
            tl.store(out_ptr + c * copy_stride + r * features + fs, tl.zeros([ZERO_BLOCK], out_ptr.dtype.element_ty),
                     mask=fs < features)
    # The events' stores below may hit entries another thread of this program just zeroed: they must
    # land after (a block barrier orders the program's global stores).
    tl.debug_barrier()
    start = tl.load(offsets_ptr + r)
    stop = tl.load(offsets_ptr + r + 1)
    for k in range(start, stop, BLOCK):
        ks = k + tl.arange(0, BLOCK)
        m = ks < stop
        i = tl.load(pos_ptr + ks, mask=m, other=0).to(tl.int64) % features
        value = tl.load(val_ptr + ks, mask=m, other=0.0).to(out_ptr.dtype.element_ty)
        for c in range(copies):
            tl.store(out_ptr + c * copy_stride + r * features + i, value, mask=m)


@triton.jit(do_not_specialize=["count", "entries"])
def _scatter_active_grad_kernel(gs_ptr, index_ptr, asurr_ptr, g_ptr, dense_ptr, count, steps, neurons, entries,
                                gs_stride_b, gs_stride_t, gs_stride_n, GS_COMPACT: tl.constexpr,
                                BLOCK: tl.constexpr):
    # g = dL/ds * surrogate at each of the `count` active entries: stored compact (g_ptr, the input
    # gradient's kernel reads it) and at its flat index in the dense zeros (dense_ptr, B*T*N + 1 slots)
    # that the reverse filter sweeps. Plain stores: the list holds each entry once. An index outside
    # [0, entries) is padding (a captured graph's list past its length): g = 0, into the spare slot.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < count
    flat = tl.load(index_ptr + offs, mask=m, other=0)
    valid = m & (flat >= 0) & (flat < entries)
    safe = tl.where(valid, flat, 0)
    if GS_COMPACT:
        gs = tl.load(gs_ptr + offs, mask=m, other=0.0).to(ACC)
    else:
        j = safe % neurons
        bt = safe // neurons
        gs = tl.load(gs_ptr + (bt // steps) * gs_stride_b + (bt % steps) * gs_stride_t + j * gs_stride_n,
                     mask=valid, other=0.0).to(ACC)
    g = tl.where(valid, gs * tl.load(asurr_ptr + offs, mask=m, other=0.0), 0.0)
    tl.store(g_ptr + offs, g, mask=m)
    tl.store(dense_ptr + tl.where(valid, flat, entries), g, mask=m)


@triton.jit
def _reverse_filter_kernel(g_ptr, beta_ptr, out_ptr, parts_ptr, gb_rows_ptr, gv0_ptr, steps, neurons, rows_total,
                           WRITE: tl.constexpr, SPLIT: tl.constexpr, SUMS: tl.constexpr, BLOCK_N: tl.constexpr,
                           STAGES: tl.constexpr):
    # One program per (b, block of neurons): dL/dI[b,t,j] = beta_j * dL/dI[b,t+1,j] + g[b,t,j] for
    # t = T-1 .. 0 (g: dL/ds * surrogate, dense, zero outside the active entries). WRITE stores it:
    # as float32 (out), or with SPLIT as three bfloat16 parts hi + mid + lo (exact, see spike_matmul),
    # smallest first (the order the GEMM accumulates them): lo, mid, hi to parts[0, 1, 2][b*T + t, j].
    # SUMS also gives, per (b, j), sum_t dL/dI (this row's share of db: summed over b by the caller,
    # no atomics) and dL/dv0 = beta_j * dL/dI[b,0,j].
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < neurons
    plane = rows_total.to(tl.int64) * neurons
    beta = tl.load(beta_ptr + offs, mask=mask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_N], ACC)
    total = tl.zeros([BLOCK_N], ACC)
    # STAGES > 1 issues later steps' loads early (KernelTuning): no load here reads what this loop writes.
    for k in tl.range(steps, num_stages=STAGES):
        row = (b * steps + (steps - 1 - k)) * neurons + offs
        acc = acc * beta + tl.load(g_ptr + row, mask=mask, other=0.0).to(ACC)
        if SUMS:
            total += acc
        if WRITE:
            if SPLIT:
                lo, mid, hi = _bfloat16_parts(acc.to(tl.float32))  # float32 layers only (the split GEMM's)
                tl.store(parts_ptr + row, lo, mask=mask)
                tl.store(parts_ptr + plane + row, mid, mask=mask)
                tl.store(parts_ptr + 2 * plane + row, hi, mask=mask)
            else:
                tl.store(out_ptr + row, acc, mask=mask)
    if SUMS:
        tl.store(gb_rows_ptr + b * neurons + offs, total, mask=mask)
        tl.store(gv0_ptr + b * neurons + offs, acc * beta, mask=mask)


@triton.jit(do_not_specialize=["count", "input_entries"])
def _sparse_input_grad_kernel(input_active_ptr, g_ptr, index_ptr, act_off_ptr, beta_ptr, w_ptr, out_ptr, count,
                              steps, neurons, features, input_entries, ENTRIES: tl.constexpr,
                              BLOCK_A: tl.constexpr):
    # One program per ENTRIES consecutive listed input entries u = (b, t, i) of the `count` listed:
    # dL/dx = sum over this layer's active entries (b, t', j) with t' >= t of g * beta_j^(t' - t) *
    # W[j, i] (they are contiguous: sorted by b, t). As in the weight gradient, several entries per
    # program share the loads of this layer's entries (the input list is sorted by (b, t, i) too): an
    # (ENTRIES, BLOCK_A) tile, each row masked to its own entry's range.
    # An index outside [0, input_entries) is padding (a captured graph's list): its value is 0.
    u = tl.program_id(0).to(tl.int64) * ENTRIES + tl.arange(0, ENTRIES)
    listed = u < count
    flat = tl.load(input_active_ptr + u, mask=listed, other=-1)
    valid = listed & (flat >= 0) & (flat < input_entries)
    flat = tl.where(valid, flat, 0)
    i = flat % features
    bt = flat // features
    t = bt % steps
    b = bt // steps
    start = tl.load(act_off_ptr + bt, mask=valid, other=0)
    stop = tl.load(act_off_ptr + (b + 1) * steps, mask=valid, other=0)
    lo = tl.min(tl.where(valid, start, 9223372036854775807), axis=0)
    hi = tl.max(tl.where(valid, stop, 0), axis=0)
    acc = tl.zeros([ENTRIES, BLOCK_A], ACC)
    for k in range(lo, hi, BLOCK_A):
        ks = k + tl.arange(0, BLOCK_A)
        in_list = ks < hi
        idx = tl.load(index_ptr + ks, mask=in_list, other=0)
        g = tl.load(g_ptr + ks, mask=in_list, other=0.0)
        j = idx % neurons
        beta = tl.load(beta_ptr + j, mask=in_list, other=1.0).to(ACC)
        pair = valid[:, None] & (ks[None, :] >= start[:, None]) & (ks[None, :] < stop[:, None])
        w = tl.load(w_ptr + j[None, :] * features + i[:, None], mask=pair, other=0.0).to(ACC)
        decay = _powi_from_log(tl.log(tl.abs(beta))[None, :], (beta < 0)[None, :],
                               ((idx // neurons) % steps)[None, :] - t[:, None])
        acc += tl.where(pair, g[None, :] * decay * w, 0.0)
    tl.store(out_ptr + u, tl.sum(acc, axis=1), mask=listed)
'''


def kernel_source(spec: LifSpec, dtype: torch.dtype = torch.float32) -> str:
    """The Triton source of the kernel set for ``spec`` with inputs of ``dtype``."""
    key = kernel_key(spec, dtype)
    cuba = key.cuba
    fwd_state = ["syn = tl.load(syn_ptr + state, mask=mask, other=0.0).to(ACC)",
                 "alpha = tl.load(alpha_ptr + offs, mask=mask, other=0.0).to(ACC)"] if cuba else []
    fwd_drive = ["syn = alpha * syn + cur", "drive = syn"] if cuba else ["drive = cur"]
    fwd_store_state = ["tl.store(syn_ptr + state, syn, mask=mask)"] if cuba else []
    fwd_record_syn = (["if RECORD_SYN:", "    tl.store(syn_rec_ptr + row, syn, mask=mask)"] if cuba else [])

    if key.sparse:
        bwd_step = ["flags = tl.load(flags_ptr + row, mask=mask, other=0)",
                    "gv = gv * beta"]
        if key.reset == "zero":
            bwd_step.append(f"gv = gv * (1.0 - (flags & {FLAG_SPIKE}).to(ACC))")
        bwd_step += ["if HAS_GRAD_MEMBRANE:",
                     "    gv += tl.load(gm_ptr + row, mask=mask, other=0.0).to(ACC)",
                     "if t == steps - 1:",
                     "    gv += tl.load(gvf_ptr + state, mask=mask, other=0.0).to(ACC)",
                     "gs = tl.load(gs_ptr + row, mask=mask, other=0.0).to(ACC)",
                     "sg = tl.load(surr_ptr + row, mask=mask, other=0.0).to(ACC)",
                     f"gv += tl.where((flags & {FLAG_ACTIVE}) != 0, gs * sg, 0.0)"]
        bwd_params_load, bwd_params_store = [], []
    else:
        reset_grad = []
        if key.reset_in_graph and key.reset == "subtract":
            reset_grad = ["gs -= theta * gv"]
        elif key.reset_in_graph and key.reset == "zero":
            reset_grad = ["gs -= beta * vt * gv"]
        bwd_step = ["vt = tl.load(mem_ptr + row, mask=mask, other=0.0).to(ACC)",
                    "u = vt - theta",
                    f"s_t = {_fire('u', key)}",
                    "gs = tl.load(gs_ptr + row, mask=mask, other=0.0).to(ACC)",
                    *reset_grad,
                    "sg = _surrogate(u)",
                    "carry = gv * beta"]
        if key.reset == "zero":
            bwd_step.append("carry = carry * (1.0 - s_t)")
        bwd_step += ["gv = gs * sg + carry",
                     "if HAS_GRAD_MEMBRANE:",
                     "    gv += tl.load(gm_ptr + row, mask=mask, other=0.0).to(ACC)",
                     "if t == steps - 1:",
                     "    gv += tl.load(gvf_ptr + state, mask=mask, other=0.0).to(ACC)",
                     "if t > 0:",
                     "    v_prev = tl.load(mem_ptr + row - neurons, mask=mask, other=0.0).to(ACC)",
                     "else:",
                     "    v_prev = tl.load(v0_ptr + state, mask=mask, other=0.0).to(ACC)",
                     f"s_prev = {_fire('v_prev - theta', key)}",
                     "g_theta -= gs * sg"]
        if key.reset == "subtract":
            bwd_step += ["g_theta -= gv * s_prev", "g_beta += gv * v_prev"]
        elif key.reset == "zero":
            bwd_step += ["g_beta += gv * v_prev * (1.0 - s_prev)"]
        else:
            bwd_step += ["g_beta += gv * v_prev"]
        bwd_params_load = ["g_beta = tl.load(gbeta_ptr + state, mask=mask, other=0.0)",
                           "g_theta = tl.load(gtheta_ptr + state, mask=mask, other=0.0)"]
        bwd_params_store = ["tl.store(gbeta_ptr + state, g_beta, mask=mask)",
                            "tl.store(gtheta_ptr + state, g_theta, mask=mask)"]
        if cuba:
            bwd_params_load.append("g_alpha = tl.load(galpha_ptr + state, mask=mask, other=0.0)")
            bwd_params_store.append("tl.store(galpha_ptr + state, g_alpha, mask=mask)")
    if cuba:
        bwd_step += ["gsyn = gv + alpha * gsyn",
                     "if t == steps - 1:",
                     "    gsyn += tl.load(gsf_ptr + state, mask=mask, other=0.0).to(ACC)"]
        if not key.sparse:
            bwd_step += ["if t > 0:",
                         "    syn_prev = tl.load(syn_rec_ptr + row - neurons, mask=mask, other=0.0).to(ACC)",
                         "else:",
                         "    syn_prev = tl.load(syn0_ptr + state, mask=mask, other=0.0).to(ACC)",
                         "g_alpha += gsyn * syn_prev"]
        bwd_step.append("tl.store(gcur_ptr + row, gsyn, mask=mask)")
    else:
        bwd_step.append("tl.store(gcur_ptr + row, gv, mask=mask)")
    bwd_alpha = ["alpha = tl.load(alpha_ptr + offs, mask=mask, other=0.0).to(ACC)"] if cuba else []
    bwd_state_load = ["gv = tl.load(gv_ptr + state, mask=mask, other=0.0)"]
    bwd_state_store = ["tl.store(gv_ptr + state, gv, mask=mask)"]
    if cuba:
        bwd_state_load.append("gsyn = tl.load(gsyn_ptr + state, mask=mask, other=0.0)")
        bwd_state_store.append("tl.store(gsyn_ptr + state, gsyn, mask=mask)")

    # Step -1: the spike of the initial membrane feeds the reset (and, recurrent, the current) of step 0.
    init = ["v0 = tl.load(v0_ptr + state, mask=mask, other=0.0).to(ACC)",
            "u0 = v0 - theta",
            f"s0 = {_fire('u0', key)}",
            "gv = tl.load(gv_ptr + state, mask=mask, other=0.0)",
            "carry = gv * beta"]
    if key.reset == "zero":
        init.append("carry = carry * (1.0 - s0)")
    if key.sparse:
        if key.recurrent:
            init += ["gs0 = tl.load(gs0_ptr + state, mask=mask, other=0.0).to(ACC)",
                     f"carry += tl.where(tl.abs(u0) < {_const(key.window)}, gs0 * _surrogate(u0), 0.0)"]
    else:
        init.append("gs0 = tl.load(gs0_ptr + state, mask=mask, other=0.0).to(ACC)" if key.recurrent
                    else "gs0 = tl.zeros([BLOCK_N], ACC)")
        if key.reset_in_graph and key.reset == "subtract":
            init.append("gs0 -= theta * gv")
        elif key.reset_in_graph and key.reset == "zero":
            init.append("gs0 -= beta * v0 * gv")
        init += ["sg0 = _surrogate(u0)",
                 "carry += gs0 * sg0",
                 "g_theta = tl.load(gtheta_ptr + state, mask=mask, other=0.0)",
                 "tl.store(gtheta_ptr + state, g_theta - gs0 * sg0, mask=mask)"]
    init.append("tl.store(gv0_ptr + state, carry, mask=mask)")
    if cuba:
        init += ["alpha = tl.load(alpha_ptr + offs, mask=mask, other=0.0).to(ACC)",
                 "gsyn = tl.load(gsyn_ptr + state, mask=mask, other=0.0)",
                 "tl.store(gsyn0_ptr + state, alpha * gsyn, mask=mask)"]

    if key.sparse:
        # Compact active list without a dense buffer: the launch counts the active entries of every
        # (b, t, block) slot and (STAGE_ACTIVE) appends them to its program's own staging area, in
        # step order; torch turns the counts into offsets, and a parallel copy moves each slot's
        # entries to its offset (``_gather_staged_kernel``). Slots in (b, t, block) order give
        # ascending flat indices. Where a program's entries overflow its staging area (or staging is
        # off), a second launch reruns the (deterministic) recurrence and writes each entry at its
        # slot's offset plus its rank among the slot's active lanes (WRITE_ACTIVE).
        compact = ["if COUNT_ACTIVE or WRITE_ACTIVE:",
                   f"    active = ((tl.abs(u) < {_const(key.window)}) | (u != u)) & mask",
                   "    slot = (b * steps + t) * tl.num_programs(1) + tl.program_id(1)",
                   "    if COUNT_ACTIVE:",
                   "        counted = tl.sum(active.to(tl.int32), axis=0)",
                   "        tl.store(counts_ptr + slot, counted)",
                   "        if STAGE_ACTIVE:",
                   "            tl.store(slot_start_ptr + slot, staged)  # where this slot's entries go in the area",
                   "            local = staged + tl.cumsum(active.to(tl.int32), axis=0) - 1",
                   "            keep = active & (local < stage_capacity)",
                   "            tl.store(stage_index_ptr + stage_base + local, row, mask=keep)",
                   "            tl.store(stage_surr_ptr + stage_base + local, _surrogate_at(u), mask=keep)",
                   "            staged += counted",
                   "    if WRITE_ACTIVE:",
                   "        pos = tl.load(offsets_ptr + slot) + tl.cumsum(active.to(tl.int64), axis=0) - 1",
                   "        keep = active & (pos < list_capacity)  # a captured graph's fixed list",
                   "        tl.store(index_ptr + pos, row, mask=keep)",
                   "        tl.store(asurr_ptr + pos, _surrogate_at(u), mask=keep)"]
        collect = ["if COLLECT_ACTIVE:",
                   f"    active = (tl.abs(u) < {_const(key.window)}) | (u != u)",
                   f"    flags = tl.where(s > 0.0, {FLAG_SPIKE}, 0) + tl.where(active, {FLAG_ACTIVE}, 0)",
                   "    tl.store(flags_ptr + row, flags.to(tl.uint8), mask=mask)",
                   "    tl.store(surr_ptr + row, tl.where(active, _surrogate_at(u), 0.0), mask=mask)"]
    else:
        collect, compact = [], []

    return f'''"""Generated by snnopt.codegen.triton_lif; do not edit. Spec: {spec.describe()}, accumulation {key.acc}.

{key!r}
"""

import triton
import triton.language as tl

ACC = tl.constexpr(tl.{key.acc})
NONFINITE_SHIFT = tl.constexpr({spike_matmul.NONFINITE_SHIFT})  # spike_matmul's mark of a non-finite row


@triton.jit
def _surrogate(u):
{_indent(_surrogate_lines(key), 4)}


@triton.jit
def _surrogate_at(u):
    # σ'(u) at an active entry: a NaN membrane is active, with σ'(NaN)·0, as in the windowed reference.
    sg = _surrogate(u)
    return tl.where(u == u, sg, sg * 0.0)


@triton.jit(do_not_specialize=["list_capacity"])
def _lif_fwd_kernel(cur_ptr, beta_ptr, theta_ptr, alpha_ptr, v_ptr, syn_ptr,
                    spikes_ptr, mem_ptr, syn_rec_ptr, flags_ptr, surr_ptr,
                    counts_ptr, offsets_ptr, index_ptr, asurr_ptr,
                    stage_index_ptr, stage_surr_ptr, overflow_ptr, slot_start_ptr,
                    t_start, t_stop, steps, neurons, stage_capacity, list_capacity,
                    RECORD_MEMBRANE: tl.constexpr, RECORD_SYN: tl.constexpr, COLLECT_ACTIVE: tl.constexpr,
                    COUNT_ACTIVE: tl.constexpr, STAGE_ACTIVE: tl.constexpr, WRITE_ACTIVE: tl.constexpr,
                    STORE_SPIKES: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < neurons
    state = b * neurons + offs
    beta = tl.load(beta_ptr + offs, mask=mask, other=0.0).to(ACC)
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(v_ptr + state, mask=mask, other=0.0).to(ACC)
{_indent(fwd_state, 4)}
    s_prev = {_fire("v - theta", key)}
    program = b * tl.num_programs(1) + tl.program_id(1)
    stage_base = program * stage_capacity  # this program's staging area (STAGE_ACTIVE)
    staged = tl.zeros([], tl.int32)
    # STAGES > 1 issues later steps' loads early (KernelTuning): no load here reads what this loop writes.
    for t in tl.range(t_start, t_stop, num_stages=STAGES):
        row = (b * steps + t) * neurons + offs
        cur = tl.load(cur_ptr + row, mask=mask, other=0.0).to(ACC)
{_indent(fwd_drive, 8)}
        {_membrane_update(key)}
        u = v - theta
        s = {_fire("u", key)}
        if STORE_SPIKES:
            tl.store(spikes_ptr + row, s.to(spikes_ptr.dtype.element_ty), mask=mask)
        if RECORD_MEMBRANE:
            tl.store(mem_ptr + row, v, mask=mask)
{_indent(fwd_record_syn, 8)}
{_indent(collect, 8)}
{_indent(compact, 8)}
        s_prev = s
    tl.store(v_ptr + state, v, mask=mask)
{_indent(fwd_store_state, 4)}
    if STAGE_ACTIVE:  # more entries than its area holds: flag it, the caller reruns the sweep
        tl.store(overflow_ptr, (staged > stage_capacity).to(tl.int64), mask=staged > stage_capacity)


@triton.jit
def _lif_bwd_kernel(gs_ptr, gm_ptr, gvf_ptr, gsf_ptr, mem_ptr, syn_rec_ptr, flags_ptr, surr_ptr,
                    beta_ptr, theta_ptr, alpha_ptr, v0_ptr, syn0_ptr,
                    gv_ptr, gsyn_ptr, gcur_ptr, gbeta_ptr, gtheta_ptr, galpha_ptr,
                    t_start, t_stop, steps, neurons,
                    HAS_GRAD_MEMBRANE: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    # Reverse sweep over steps t_stop-1 … t_start. gv holds Gv[t+1] entering step t, Gv[t] leaving it.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < neurons
    state = b * neurons + offs
    beta = tl.load(beta_ptr + offs, mask=mask, other=0.0).to(ACC)
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
{_indent(bwd_alpha + bwd_state_load + bwd_params_load, 4)}
    # STAGES > 1 issues later steps' loads early (KernelTuning): no load here reads what this loop writes.
    for i in tl.range(t_start, t_stop, num_stages=STAGES):
        t = t_stop - 1 - (i - t_start)
        row = (b * steps + t) * neurons + offs
{_indent(bwd_step, 8)}
{_indent(bwd_state_store + bwd_params_store, 4)}


@triton.jit
def _lif_bwd_init_kernel(gs0_ptr, beta_ptr, theta_ptr, alpha_ptr, v0_ptr, gv_ptr, gsyn_ptr, gtheta_ptr,
                         gv0_ptr, gsyn0_ptr, neurons, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < neurons
    state = b * neurons + offs
    beta = tl.load(beta_ptr + offs, mask=mask, other=0.0).to(ACC)
    theta = tl.load(theta_ptr + offs, mask=mask, other=0.0).to(ACC)
{_indent(init, 4)}
{COMPACT_KERNELS}'''


_PLAIN_SPEC = LifSpec()  # the compact kernels do not depend on the spec


def kernels(spec: LifSpec, dtype: torch.dtype = torch.float32) -> ModuleType:
    """The imported kernel module for ``spec`` and inputs of ``dtype`` (generated on first use)."""
    # Memoised on what the source and the import depend on: generating and hashing the source
    # costs ~40 µs, paid several times per layer call otherwise (the host time of a sparse backward
    # on a GPU is a few such calls and launches).
    memo_key = (spec, dtype, os.environ.get("TRITON_INTERPRET", ""), os.environ.get("SNNOPT_CACHE_DIR"))
    module = _KERNELS.get(memo_key)
    if module is None:
        module = _KERNELS[memo_key] = kernel_cache.load_module("lif_kernels", kernel_source(spec, dtype))
    return module


_KERNELS: dict = {}


def emit_kernels(spec: LifSpec, directory, dtype: torch.dtype = torch.float32) -> list[Path]:
    """Save the generated Triton source for ``spec`` in ``directory``; returns the files written.

    Example::

        >>> emit_kernels(LifSpec(reset="zero"), "kernels", dtype=torch.bfloat16)
    """
    source = kernel_source(spec, dtype)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    return [kernel_cache.write_atomically(folder / f"{kernel_cache.source_name('lif_kernels', source)}.py", source)]


# --- launchers -------------------------------------------------------------------------------------


def _unused(dtype: torch.dtype, device) -> Tensor:
    # A placeholder for a pointer argument the kernel neither reads nor writes (its flags say so).
    # One per dtype and device, kept: allocating it on every call is host time, and a sparse layer
    # on a GPU is mostly host time. Never returned to a caller, never converted.
    key = (dtype, device)  # torch.device hashes by type and index (str() of it costs more than the rest)
    placeholder = _PLACEHOLDERS.get(key)
    if placeholder is None:
        placeholder = _PLACEHOLDERS[key] = torch.empty(1, dtype=dtype, device=device)
    return placeholder


_PLACEHOLDERS: dict = {}


def launch_device(t: Tensor):
    """A context in which Triton launches go to ``t``'s GPU (no-op on CPU or where it is current).

    Triton launches on the current CUDA device whatever device the tensors are on: a layer on
    ``cuda:1`` run while ``cuda:0`` is current would run its kernels on the wrong GPU (a crash, or
    garbage). torch's own CUDA ops guard themselves; custom ops with Triton kernels must do it.
    """
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_device_of(argument: str):
    """Decorator: run the function under :func:`launch_device` of its tensor argument ``argument``."""
    def wrap(function):
        position = list(inspect.signature(function).parameters).index(argument)

        @functools.wraps(function)
        def guarded(*args, **kwargs):
            tensor = kwargs[argument] if argument in kwargs else args[position]
            with launch_device(tensor):
                return function(*args, **kwargs)
        return guarded
    return wrap


def _block(neurons: int) -> int:
    # Enough programs to fill a GPU even at small batch; at least 16 lanes for a tidy layout.
    return max(16, min(current_tuning().max_block, 1 << max(0, (int(neurons) - 1).bit_length())))


def _warps(lanes: int) -> int:
    # One warp per 32 lanes of a 1-D program (more would hold copies of the same lanes), 1 to 8.
    return max(1, min(8, lanes // 32))


def _sweep_stages(one_step_per_launch: bool) -> int:
    # A recurrent layer's sweep runs one step per launch: nothing to pipeline.
    return 1 if one_step_per_launch else current_tuning().sweep_stages


def _fires(u: Tensor, fire_at_threshold: bool) -> Tensor:
    return (u >= 0) if fire_at_threshold else (u > 0)


def lif_forward(current: Tensor, beta: Tensor, theta: Tensor, alpha: Optional[Tensor],
                recurrent_weight: Optional[Tensor], v0: Tensor, syn0: Optional[Tensor], spec: LifSpec, *,
                out_dtype: torch.dtype,
                record_membrane: bool, record_syn: bool, collect_active: bool, compact_active: bool = False,
                list_capacity: Optional[int] = None, flag: Optional[Callable[[Tensor], None]] = None,
                staged: bool = False, staging_held: Optional[Callable[[bool], None]] = None,
                read_along: Optional[tuple[Tensor, Callable[[list], None]]] = None):
    """Run the recurrence; ``current`` is the ``(B, T, N)`` input current (a fresh tensor: recurrent layers add to it).

    Returns ``(spikes, membrane, syn_record, v_final, syn_final, flags, surrogate, compact)``: membrane
    and syn_record in the accumulation dtype (or None); flags (uint8) and the dense surrogate at
    active entries (zero elsewhere) when ``collect_active``; when ``compact_active`` (feedforward
    sparse layers only) ``compact = (active_index, active_surr, active_offsets)``: the active
    entries' ascending flat indices, their surrogate values and, per (b, t), where its entries
    start (``B*T + 1`` values), built without any dense per-entry buffer.

    ``list_capacity`` (a captured CUDA graph, :mod:`snnopt.graphs`): the active list has exactly
    that many entries, padded past its length with index B·T·N and surrogate 0, its offsets
    clamped to it, and no host read; ``flag`` is called with a device bool that holds where the
    list overflowed. Such a list comes from a second sweep or, with ``staged`` (staging held in
    every recorded step), from the staging areas, flagged where one overflowed. Without a
    capacity, ``staging_held`` is told whether this call's entries all fit their staging areas, and
    ``read_along = (values, receive)``: an int64 device tensor read in the same host read as the
    list's length, its values handed to ``receive`` (a compact layer's guessed event count).
    """
    batch, steps, neurons = current.shape
    acc = accumulation_dtype(out_dtype)
    module = kernels(spec, out_dtype)
    device = current.device
    spikes = torch.empty((batch, steps, neurons), dtype=out_dtype, device=device)
    seq = lambda dtype: torch.empty((batch, steps, neurons), dtype=dtype, device=device)  # noqa: E731
    nothing = _unused(acc, device)
    nothing_i64 = _unused(torch.int64, device)
    membrane = seq(acc) if record_membrane else None
    syn_record = seq(acc) if record_syn else None
    flags = seq(torch.uint8) if collect_active else None
    surr = seq(acc) if collect_active else None
    v_state = v0.to(acc, copy=True).contiguous()
    syn_state = syn0.to(acc, copy=True).contiguous() if syn0 is not None else nothing
    block = _block(neurons)
    blocks = -(-neurons // block)
    grid = (batch, blocks)
    slots = batch * steps * blocks
    counts = torch.empty(slots, dtype=torch.int32, device=device) if compact_active else _unused(torch.int32, device)
    # The compact list's offsets (an exclusive prefix sum of the counts, filled later), its total,
    # and one more entry: the flag a program raises when its staging area overflowed. One host read
    # of the last two then tells the list's length and whether the staged entries are complete.
    ends = torch.zeros(slots + 2, dtype=torch.int64, device=device) if compact_active else None
    beta_a, theta_a = beta.to(acc).contiguous(), theta.to(acc).contiguous()
    alpha_a = alpha.to(acc).contiguous() if alpha is not None else nothing
    # A fixed-capacity list takes the second sweep unless staging held while the plan was recorded:
    # without a host read, an overflowed staging area can only be flagged, not rerun.
    stage = (_Staging.allocate(batch * blocks, steps, block, acc, device)
             if compact_active and current_tuning().one_pass_compaction and (list_capacity is None or staged)
             else _Staging.unused(acc, device))
    overflow = ends[slots + 1:] if stage.capacity else nothing_i64
    args = (beta_a, theta_a, alpha_a, v_state, syn_state, spikes,
            membrane if membrane is not None else nothing, syn_record if syn_record is not None else nothing,
            flags if flags is not None else _unused(torch.uint8, device), surr if surr is not None else nothing,
            counts, nothing_i64, nothing_i64, nothing, stage.index, stage.surr, overflow, stage.slot_start)
    consts = dict(RECORD_MEMBRANE=record_membrane, RECORD_SYN=record_syn, COLLECT_ACTIVE=collect_active,
                  COUNT_ACTIVE=compact_active, STAGE_ACTIVE=stage.capacity > 0, WRITE_ACTIVE=False,
                  STORE_SPIKES=True, BLOCK_N=block, STAGES=_sweep_stages(recurrent_weight is not None),
                  **LAUNCH_OPTIONS)
    compact = None
    if recurrent_weight is None:
        module._lif_fwd_kernel[grid](current, *args, 0, steps, steps, neurons, stage.capacity, 0, **consts)
        if compact_active:
            compact = _compact_active(module, current, args, counts, ends, stage, v0, syn0, acc, grid, steps,
                                      neurons, block, list_capacity, flag, staging_held, read_along)
    else:
        if compact_active:
            raise ValueError("compact_active: feedforward layers only")
        rec_t = recurrent_weight.to(acc).t()
        s_prev = _fires(v0.to(acc) - args[1], spec.fire_at_threshold).to(acc)
        for t in range(steps):
            # The recurrent input of step t needs the spikes of step t-1 from every neuron of the row.
            current[:, t].addmm_(s_prev, rec_t)
            module._lif_fwd_kernel[grid](current, *args, t, t + 1, steps, neurons, 0, 0, **consts)
            s_prev = spikes[:, t].to(acc)
    return spikes, membrane, syn_record, v_state, (syn_state if syn0 is not None else None), flags, surr, compact


# Staging area of the one-pass compaction, per forward program (b, block of neurons): room for this
# fraction of its T·BLOCK_N entries (at least one step's worth). Its bytes are 12 × that fraction of
# B·T·N (int64 index, float32 surrogate): 0.75 B·T·N bytes at 1/16, against 4 B·T·N for a float32
# copy of the layer's output. A program with more active entries (over 6 % of its entries: the seed
# network's layers have ~0.5 %, the ON layer ~1.5 %) makes the forward fall back to the second sweep.
STAGE_FRACTION = 1 / 16


@dataclass
class _Staging:
    """The one-pass compaction's buffers: each program's staged entries, and where each slot's start."""

    index: Tensor
    surr: Tensor
    slot_start: Tensor  # per (b, t, block) slot: where its entries start in its program's area
    capacity: int

    @classmethod
    def allocate(cls, programs: int, steps: int, block: int, acc: torch.dtype, device) -> "_Staging":
        capacity = max(block, math.ceil(steps * block * STAGE_FRACTION))
        return cls(torch.empty(programs * capacity, dtype=torch.int64, device=device),
                   torch.empty(programs * capacity, dtype=acc, device=device),
                   torch.empty(programs * steps, dtype=torch.int32, device=device), capacity)

    @classmethod
    def unused(cls, acc: torch.dtype, device) -> "_Staging":
        return cls(_unused(torch.int64, device), _unused(acc, device), _unused(torch.int32, device), 0)


def _compact_active(module, current, args, counts, ends, stage: _Staging, v0, syn0, acc, grid, steps, neurons,
                    block, list_capacity: Optional[int] = None, flag=None, staging_held=None, read_along=None):
    """The active list from the first launch's counts: ordered from its staging areas, or by a second sweep.

    Offsets from the counts into ``ends`` (one host read: the total and the overflow flag); then
    one parallel copy per (b, t, block) slot from the staging areas, or, where staging is off or a
    program overflowed its area, a rerun of the recurrence that writes each entry in place.
    With ``list_capacity`` no host read: a list of that length, padded, from the staging areas
    where they were allocated (an overflowed area raises ``flag``), else from the rerun.
    """
    batch, blocks = grid
    device = current.device
    slots = counts.numel()
    torch.cumsum(counts, 0, dtype=torch.int64, out=ends[1:slots + 1])
    offsets = ends[:slots]
    if list_capacity is not None:
        flag(ends[slots] > list_capacity)
        index = torch.full((list_capacity,), batch * steps * neurons, dtype=torch.int64, device=device)
        values = torch.zeros(list_capacity, dtype=acc, device=device)
        # Every (b, t)'s start, and the length, within the list (the entries past it were dropped).
        per_row = ends[:slots + 1:blocks].clamp(max=list_capacity)
        total, staged_in_full = list_capacity, bool(stage.capacity)
        if staged_in_full:
            flag(ends[slots + 1] != 0)  # a staging area overflowed: its entries are missing
    else:
        # Every (b, t)'s start, and the total (kept for the backward): issued before the read, so the
        # host does not issue it while the device waits idle after the sync.
        per_row = ends[:slots + 1:blocks].clone()
        if read_along is None:
            total, overflowed = ends[slots:].tolist()  # the forward's one host sync
        else:
            along, receive = read_along
            total, overflowed, *others = torch.cat((ends[slots:], along)).tolist()
            receive(others)
        staged_in_full = bool(stage.capacity) and not overflowed
        if staging_held is not None:
            staging_held(staged_in_full)
        index = torch.empty(total, dtype=torch.int64, device=device)
        values = torch.empty(total, dtype=acc, device=device)
    if total and staged_in_full:
        per_program = current_tuning().gather_slots
        # One slot per program: a program of the sweep's width; several: one warp walks them.
        lanes, warps = (block, 4) if per_program == 1 else (32, 1)
        module._gather_staged_kernel[(-(-slots // per_program),)](
            counts, offsets, stage.slot_start, stage.index, stage.surr, index, values, steps, blocks, stage.capacity,
            total, slots, BLOCK=lanes, SLOTS=per_program, num_warps=warps)
    elif total:
        # The state buffers were advanced by the first pass; rerun from fresh copies of the initial state.
        fresh = list(args)
        fresh[3] = v0.to(acc, copy=True).contiguous()
        if syn0 is not None:
            fresh[4] = syn0.to(acc, copy=True).contiguous()
        fresh[10:14] = [counts, offsets, index, values]
        module._lif_fwd_kernel[grid](current, *fresh, 0, steps, steps, neurons, 0, total, RECORD_MEMBRANE=False,
                                     RECORD_SYN=False, COLLECT_ACTIVE=False, COUNT_ACTIVE=False, STAGE_ACTIVE=False,
                                     WRITE_ACTIVE=True, STORE_SPIKES=False, BLOCK_N=block,
                                     STAGES=_sweep_stages(False), **LAUNCH_OPTIONS)
    return index, values, per_row


def _event_pass_shape(rows: int, features: int) -> tuple[int, int, tuple, int]:
    """The event kernel's launch for ``rows`` rows of ``features``: (BLOCK, ROWS per program, grid, warps)."""
    block = max(16, min(1024, 1 << max(0, (int(features) - 1).bit_length())))
    # Rows per program: about EVENT_TILE entries per loop iteration (KernelTuning.event_tile).
    rows_per_program = max(1, current_tuning().event_tile // block)
    warps = 8 if rows_per_program * block >= 2048 else 4  # about 16 entries per thread at most
    return block, rows_per_program, (-(-rows // rows_per_program),), warps


def spike_check(x: Tensor, copy_into: Optional[Tensor] = None) -> Tensor:
    """``[not bfloat16, not int8]`` of ``x``'s nonzero entries, as an int64 tensor on x's device, unread.

    Nonzero where some entry is not a bfloat16 value, or not an integer in [-128, 127]
    (``spike_matmul.spike_kind``'s two questions): the input events' counting launch, without the
    events. ``copy_into`` (contiguous, of x's shape and floating dtype; x contiguous too): the same
    launch also writes x there, a copy in the pass that checks. A captured step checks its own
    inputs this way on their way into the graphs' copies, before each replay (``snnopt.graphs``).
    """
    if copy_into is not None and (copy_into.shape != x.shape or copy_into.dtype != x.dtype
                                  or not (x.is_contiguous() and copy_into.is_contiguous())
                                  or not x.is_floating_point()):
        raise ValueError(f"spike_check: copy_into must be contiguous like x, of a floating dtype, got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(copy_into.shape)} {copy_into.dtype}")
    kinds = torch.zeros(2, dtype=torch.int64, device=x.device)
    if not x.numel():
        return kinds
    if not x.is_floating_point():  # (the split routes take float32 inputs: not a hot path)
        return torch.stack([(x.to(torch.bfloat16).to(x.dtype) != x).any(),
                            ((x < -128) | (x > 127)).any()]).to(torch.int64)
    features = x.shape[-1] if x.dim() else 1
    flat = x.contiguous().reshape(-1, features)
    rows = flat.shape[0]
    block, rows_per_program, grid, warps = _event_pass_shape(rows, features)
    device = x.device
    # The counting pass with the check; copying, its input written out as a one-copy operand. (The
    # counts are not needed; steps: only the events' positions use it.)
    kernels(_PLAIN_SPEC, x.dtype)._input_events_kernel[grid](
        flat, torch.empty(rows, dtype=torch.int32, device=device), _unused(torch.int64, device),
        _unused(torch.int32, device), _unused(accumulation_dtype(x.dtype), device), kinds,
        _unused(torch.bfloat16, device) if copy_into is None else copy_into, rows, 1, features, 0, WRITE=False,
        CHECK=True, OPERAND=0 if copy_into is None else 1, ROWS=rows_per_program, BLOCK=block, num_warps=warps)
    return kinds


def input_events(x: Tensor, acc: torch.dtype, capacity: Optional[int] = None,
                 flag: Optional[Callable[[Tensor], None]] = None, *,
                 checked: Optional[Callable[[Optional[str]], None]] = None,
                 device_check: Optional[Callable[[Tensor], None]] = None,
                 operand: Optional[Callable[[], Optional[Tensor]]] = None,
                 guess: Optional[int] = None, unread: Optional[Callable[[Tensor], None]] = None):
    """The nonzero entries of ``x`` ``(B, T, F)`` as events grouped by (b, t): ``(offsets, pos, values)``.

    ``offsets`` has ``B*T + 1`` entries (row (b, t) holds events ``offsets[bT+t] … offsets[bT+t+1]``),
    ``pos = t * F + i`` and ``values`` the entries themselves in ``acc`` (1.0 for spikes), so any input
    is represented exactly; a spiking input at a few percent costs a few percent of the dense bytes.
    ``capacity`` (a captured CUDA graph): ``pos`` and ``values`` hold that many entries (values 0
    past the length), the offsets are clamped to it, no host read; ``flag`` gets the overflow.
    ``checked`` (without a capacity): given ``spike_matmul.spike_kind`` of the events' values, which
    the counting launch works out on the way and the one host read of the count brings back.
    ``device_check`` (with a capacity): given the same check as a device tensor, ``[not bfloat16,
    not int8]`` of x's nonzeros (nonzero where some value is not), unread; complete whatever the
    capacity.
    ``operand``: called once, after ``checked`` and before the events are written; it may return a
    ``(B*T, copies*F)`` tensor (the forward GEMM's spike operand: ``x`` ``copies`` times side by side
    per row) that the writing launch fills with ``x`` converted to its dtype: the input is read once
    for both, where a rebuild from the events would zero-fill the operand and scatter into it (two
    more launches over it).
    ``guess`` (without a capacity; with ``unread``): ``pos`` and ``values`` have room for that many
    events and nothing is read: ``unread`` gets the int64 device tensor ``[count]``, or with
    ``checked`` ``[count, not_bfloat16, not_int8]`` (``checked`` itself is not called), for the
    caller to read later. Where the count exceeds the guess, the lists hold only the events below
    it and the caller must list again; else their first ``count`` entries are the events (the
    offsets are exact either way).
    """
    from snnopt.codegen import spike_matmul

    batch, steps, features = x.shape
    module = kernels(_PLAIN_SPEC, x.dtype)
    device = x.device
    rows = batch * steps
    x = x.contiguous()
    counts = torch.empty(rows, dtype=torch.int32, device=device)
    pos_dtype = torch.int32 if steps * features < 2**31 else torch.int64
    block, rows_per_program, grid, warps = _event_pass_shape(rows, features)
    nothing = _unused(torch.int64, device)
    # (with a guess: into `ends`, read by the caller; with device_check: handed over unread)
    check = (checked is not None and capacity is None) or (device_check is not None and capacity is not None)
    # The exclusive prefix sum of the counts with the total appended, then (check) the two flags: the
    # total and the flags are one read.
    ends = torch.zeros(rows + 3 if check else rows + 1, dtype=torch.int64, device=device)
    offsets = ends[:rows + 1]
    module._input_events_kernel[grid](x, counts, nothing, _unused(pos_dtype, device), _unused(acc, device),
                                      ends[rows + 1:] if check else nothing, _unused(torch.bfloat16, device), rows,
                                      steps, features, 0, WRITE=False, CHECK=check, OPERAND=0, ROWS=rows_per_program,
                                      BLOCK=block, num_warps=warps)
    torch.cumsum(counts, 0, dtype=torch.int64, out=offsets[1:])
    if capacity is not None:
        if check:
            device_check(ends[rows + 1:])
        total = capacity
        pos = torch.empty(total, dtype=pos_dtype, device=device)  # read only below the (clamped) offsets
        values = torch.zeros(total, dtype=acc, device=device)      # all of it is checked for spikes
    elif guess is not None:
        total = guess
        pos = torch.empty(total, dtype=pos_dtype, device=device)  # the caller keeps the first `count`
        values = torch.empty(total, dtype=acc, device=device)
        unread(ends[rows:])
    else:
        if check:  # the count and the spike check in one read
            total, not_bfloat16, not_int8 = ends[rows:].tolist()
            checked(spike_matmul.kind_from_flags(not_bfloat16, not_int8))
        else:
            total = int(offsets[-1])
        pos = torch.empty(total, dtype=pos_dtype, device=device)
        values = torch.empty(total, dtype=acc, device=device)
    dense = operand() if operand is not None else None
    copies = 0
    if dense is not None:
        copies = dense.shape[1] // max(features, 1)
        if dense.shape != (rows, copies * features) or not dense.is_contiguous() or dense.device != device:
            raise ValueError(f"operand: expected a contiguous ({rows}, copies * {features}) tensor on {device}, "
                             f"got {tuple(dense.shape)} on {dense.device}")
    if total or copies:
        # (no events: the launch writes only the operand; placeholders, not empty tensors, for the lists)
        module._input_events_kernel[grid](x, counts, offsets, pos if total else _unused(pos_dtype, device),
                                          values if total else _unused(acc, device), nothing,
                                          dense if copies else _unused(torch.bfloat16, device), rows, steps,
                                          features, total, WRITE=True, CHECK=False, OPERAND=copies,
                                          ROWS=rows_per_program, BLOCK=block, num_warps=warps)
    if capacity is not None:
        flag(offsets[-1] > capacity)
        offsets.clamp_(max=capacity)
    return offsets, pos, values


def lif_backward(grad_spikes: Optional[Tensor], grad_membrane: Optional[Tensor], grad_v_final: Optional[Tensor],
                 grad_syn_final: Optional[Tensor], membrane: Optional[Tensor], syn_record: Optional[Tensor],
                 flags: Optional[Tensor], surr: Optional[Tensor], beta: Tensor, theta: Tensor, alpha: Optional[Tensor],
                 recurrent_weight: Optional[Tensor], v0: Tensor, syn0: Optional[Tensor], steps: int, spec: LifSpec,
                 in_dtype: torch.dtype):
    """The reverse sweep; returns ``(dI, dv0, dsyn0, dβ, dθ, dα)`` in the accumulation dtype.

    Exact mode needs ``membrane`` (and ``syn_record`` for CuBa); sparse mode ``flags`` and the dense
    ``surr`` (zero outside the active set). dβ, dθ, dα are None in sparse mode.
    """
    batch, neurons = v0.shape
    acc = accumulation_dtype(in_dtype)
    module = kernels(spec, in_dtype)
    device = v0.device
    nothing = _unused(acc, device)
    seq_shape = (batch, steps, neurons)
    if grad_spikes is None:
        gs = torch.zeros(seq_shape, dtype=acc, device=device)
    elif recurrent_weight is not None:
        gs = grad_spikes.to(acc, copy=True).contiguous()  # the sweep adds the recurrent term into it
    else:
        gs = grad_spikes.contiguous()
    state_zeros = lambda: torch.zeros((batch, neurons), dtype=acc, device=device)  # noqa: E731
    # Buffers only some specs' kernels touch are placeholders for the others (a zero fill each is
    # host time): the synaptic ones for CuBa, the parameter gradients for the exact backward.
    cuba, exact = spec.cuba, not spec.sparse
    gvf = grad_v_final.contiguous() if grad_v_final is not None else state_zeros()
    gsf = grad_syn_final.contiguous() if (grad_syn_final is not None and cuba) else (
        state_zeros() if cuba else nothing)
    gm = grad_membrane.contiguous() if grad_membrane is not None else None
    gv, gsyn = state_zeros(), (state_zeros() if cuba else nothing)
    gcur = torch.empty(seq_shape, dtype=acc, device=device)
    gbeta, gtheta = (state_zeros(), state_zeros()) if exact else (nothing, nothing)
    galpha = state_zeros() if (exact and cuba) else nothing
    beta_a, theta_a = beta.to(acc).contiguous(), theta.to(acc).contiguous()
    alpha_a = alpha.to(acc).contiguous() if alpha is not None else nothing
    syn0_a = syn0.contiguous() if syn0 is not None else (state_zeros() if cuba else nothing)
    block = _block(neurons)
    grid = (batch, -(-neurons // block))

    def sweep(t_start, t_stop):
        module._lif_bwd_kernel[grid](
            gs, gm if gm is not None else nothing, gvf, gsf,
            membrane if membrane is not None else nothing, syn_record if syn_record is not None else nothing,
            flags if flags is not None else _unused(torch.uint8, device), surr if surr is not None else nothing,
            beta_a, theta_a, alpha_a, v0.contiguous(), syn0_a, gv, gsyn, gcur, gbeta, gtheta, galpha,
            t_start, t_stop, steps, neurons, HAS_GRAD_MEMBRANE=gm is not None, BLOCK_N=block,
            STAGES=_sweep_stages(recurrent_weight is not None), **LAUNCH_OPTIONS)

    gs0 = nothing
    if recurrent_weight is None:
        sweep(0, steps)
    else:
        rec = recurrent_weight.to(acc)
        for t in range(steps - 1, -1, -1):
            if t < steps - 1:
                gs[:, t].addmm_(gcur[:, t + 1], rec)  # dL/ds[t] += Gcur[t+1] V
            sweep(t, t + 1)
        gs0 = gcur[:, 0].mm(rec)
    gv0, gsyn0 = torch.empty_like(gv), (torch.empty_like(gv) if cuba else nothing)
    module._lif_bwd_init_kernel[grid](gs0, beta_a, theta_a, alpha_a, v0.contiguous(), gv, gsyn, gtheta, gv0, gsyn0,
                                      neurons, BLOCK_N=block, **LAUNCH_OPTIONS)
    gsyn0 = gsyn0 if cuba else None
    if spec.sparse:
        return gcur, gv0, gsyn0, None, None, None
    return gcur, gv0, gsyn0, gbeta.sum(0), gtheta.sum(0), galpha.sum(0) if cuba else None



def sparse_backward(grad_spikes: Tensor, grad_is_compact: bool, active_index: Tensor, active_surr: Tensor,
                    active_offsets: Tensor, events: Optional[tuple], beta: Tensor, weight: Tensor,
                    input_active: Optional[Tensor], batch: int, steps: int, *, need_weight: bool, need_bias: bool,
                    need_initial_v: bool, in_dtype: torch.dtype):
    """The seed paper's backward of a feedforward sparse layer from its compact lists alone (two launches).

    With the reset detached and the surrogate zero outside the window, dL/dI[b,t,j] is the reverse
    β-filter of g = dL/ds·σ′ at the active entries A. Nothing dense is formed:

    * ``_sparse_weight_grad_kernel`` (one program per ``KernelTuning.pair_entries`` active entries):
      dW[j,i] += g·x·β_j^(t−t0) over the input events (b, t0 ≤ t, i) of the same batch row: the
      paper's Σ_A g·trace[b,t,:], with the trace evaluated at the input's events only (a
      latency-coded or Bernoulli input has a few hundred per row); β may differ per neuron, which a
      shared trace could not express. It also gives db, dv0.
    * ``_sparse_input_grad_kernel`` (one program per ``pair_entries`` ``input_active`` entries (b, t, i)):
      Σ over this layer's entries (b, t' ≥ t, j) of g·β_j^(t'−t)·W[j,i], read as one contiguous
      range (sorted list).

    Work: |A| × (events per row) atomics for dW and |input_active| × |A per row| reads for dx, instead
    of a B·T·N·F GEMM on a dense dL/dI: ~4M / 20M atomics vs 4 / 20 GFMA at the seed sizes N = 200 /
    1000 (fp32 without tensor cores), and no B·T·N or B·T·F buffer. The caller takes the dense route,
    :func:`reverse_sweep`, when the events are too many (see ``events_are_cheaper``). ``events`` is
    ``input_events(x)`` or None (weight gradient not needed). Returns ``(dW, db, dv0, dx at
    input_active)``, unneeded ones None.
    """
    module = kernels(_PLAIN_SPEC, in_dtype)
    tuning = current_tuning()
    acc = accumulation_dtype(in_dtype)
    device = active_index.device
    neurons, features = weight.shape
    count = active_index.numel()
    nothing = _unused(acc, device)
    g = torch.empty(count, dtype=acc, device=device)
    grad_w = torch.zeros((neurons, features), dtype=acc, device=device) if need_weight else None
    grad_b = torch.zeros(neurons, dtype=acc, device=device) if need_bias else None
    grad_v0 = torch.zeros((batch, neurons), dtype=acc, device=device) if need_initial_v else None
    beta_a = beta.to(acc).contiguous()
    evt_off, evt_pos, evt_val = events if events is not None else (
        _unused(torch.int64, device), _unused(torch.int32, device), nothing)
    # A compact dL/ds is one value per active entry; a dense one may be any strided (B, T, N) view.
    gs_strides = (0, 0, 0) if grad_is_compact else grad_spikes.stride()
    if count:
        module._sparse_weight_grad_kernel[(-(-count // tuning.pair_entries),)](
            grad_spikes, active_index, active_surr, beta_a, evt_off, evt_pos, evt_val, g,
            grad_w if grad_w is not None else nothing, grad_b if grad_b is not None else nothing,
            grad_v0 if grad_v0 is not None else nothing, count, steps, neurons, features, batch * steps * neurons,
            *gs_strides,
            GS_COMPACT=grad_is_compact, NEED_W=need_weight, NEED_B=need_bias, NEED_V0=need_initial_v,
            ENTRIES=tuning.pair_entries, BLOCK_E=tuning.pair_block,
            GROUP=tuning.pair_grouping and need_weight and acc == torch.float32, ATOMIC_SEM=tuning.atomic_sem,
            num_warps=_warps(tuning.pair_block))
    grad_x = None
    if input_active is not None:
        grad_x = _input_grad_at(module, input_active, g, active_index, active_offsets, beta_a, weight, batch, steps,
                                acc)
    return grad_w, grad_b, grad_v0, grad_x


def _input_grad_at(module, input_active: Tensor, g: Tensor, active_index: Tensor, active_offsets: Tensor,
                   beta: Tensor, weight: Tensor, batch: int, steps: int, acc: torch.dtype) -> Tensor:
    """dL/dx at the upstream layer's active entries ``input_active``, from this layer's compact g (one launch;
    ``beta`` contiguous in the accumulation dtype)."""
    neurons, features = weight.shape
    if not (active_index.numel() and input_active.numel()):
        return torch.zeros(input_active.numel(), dtype=acc, device=input_active.device)
    tuning = current_tuning()
    count = input_active.numel()
    grad_x = torch.empty(count, dtype=acc, device=input_active.device)  # the kernel writes each
    module._sparse_input_grad_kernel[(-(-count // tuning.pair_entries),)](
        input_active, g, active_index, active_offsets, beta, weight.contiguous(), grad_x, count, steps,
        neurons, features, batch * steps * features, ENTRIES=tuning.pair_entries, BLOCK_A=tuning.pair_block // 2,
        num_warps=_warps(tuning.pair_block // 2))
    return grad_x


def split_bfloat16_into(base: Tensor, stacked: Tensor, stack_dim: int, *, repeat: bool = False) -> None:
    """Write the three bfloat16 parts of ``base`` (contiguous float32, 2-D) into ``stacked``, smallest first.

    ``stacked`` is ``(3·R, C)`` (``stack_dim`` 0) or ``(R, 3·C)`` (``stack_dim`` 1), contiguous: the
    split operand of ``spike_matmul``'s GEMM. One launch, no float32 temporaries (the torch version,
    ``spike_matmul._split_into``, is the reference: both splits are exact). ``repeat``: ``base`` is the
    spike operand (bfloat16 values, checked by the caller), written as it is into all three slots,
    still one launch reading it once (the torch version converts once and copies twice).
    """
    rows, cols = base.shape
    total = base.numel()
    row_stride, slot_stride = (3 * cols, cols) if stack_dim == 1 else (cols, rows * cols)
    if total:
        block = 1024
        kernels(_PLAIN_SPEC, torch.float32)._split_bfloat16_kernel[(-(-total // block),)](
            base, stacked, cols, total, row_stride, slot_stride, REPEAT=repeat, BLOCK=block, **LAUNCH_OPTIONS)


def quantize_int8_into(t: Tensor, shifts: Tensor, digits: Tensor, scaled_dim: int, slices: int) -> None:
    """Write ``t``'s int8 digit planes into ``digits`` (``spike_matmul.quantize_int8``'s CUDA route; one launch).

    ``t`` 2-D float32, any strides; ``shifts`` one int32 per entry of ``scaled_dim``; ``digits`` 2-D int8
    with ``scaled_dim`` ``slices`` times ``t``'s, any strides. The torch version,
    ``spike_matmul._quantize_reference``, is the reference: both compute the same digits.
    """
    rows, cols = t.shape
    total = t.numel()
    plane_stride = (rows if scaled_dim == 0 else cols) * digits.stride(scaled_dim)
    if total:
        block = 1024
        kernels(_PLAIN_SPEC, torch.float32)._quantize_int8_kernel[(-(-total // block),)](
            t, shifts, digits, cols, total, t.stride(0), t.stride(1), digits.stride(0), digits.stride(1),
            plane_stride, SCALED_DIM=scaled_dim, SLICES=slices, BLOCK=block, **LAUNCH_OPTIONS)


def combine_int8_into(acc: Tensor, shifts: Tensor, out: Tensor, scaled_dim: int, slices: int) -> None:
    """``spike_matmul.combine_int8``'s CUDA route: ``acc`` (contiguous int32, ``slices`` planes along
    ``scaled_dim``) into ``out`` (contiguous float32), one launch."""
    rows, cols = out.shape
    total = out.numel()
    plane_stride = rows * acc.stride(0) if scaled_dim == 0 else cols
    if total:
        block = 1024
        kernels(_PLAIN_SPEC, torch.float32)._combine_int8_kernel[(-(-total // block),)](
            acc, shifts, out, cols, total, acc.stride(0), plane_stride, SCALED_DIM=scaled_dim, SLICES=slices,
            BLOCK=block, **LAUNCH_OPTIONS)


# The fused int8 GEMM's tiles: four int32 accumulators of BLOCK_M × BLOCK_N over 8 warps (128
# registers a thread), operand tiles of BLOCK_K bytes a row, three stages in shared memory (~144 KB).
INT8_GEMM_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, STAGES=3, num_warps=8)


def int8_gemm(a: Tensor, b: Tensor, shifts: Tensor, digits_on_b: bool) -> Tensor:
    """``spike_matmul``'s int8 product in one launch: the GEMM of int8 spikes with four int8 digit planes and
    the combine of :func:`combine_int8_into` fused (no int32 planes in memory).

    ``digits_on_b``: ``b`` is ``(K, 4·N)`` digit planes side by side and ``a`` ``(M, K)`` spikes (shifts
    per column); else ``a`` is ``(4·M, K)`` digit planes stacked and ``b`` ``(K, N)`` spikes (shifts
    per row). Any strides. Returns ``(M, N)`` float32, equal to ``combine_int8(a @ b)``.
    """
    planes = spike_matmul.INT8_SLICES
    if planes != 4:
        raise InvalidArgumentError("int8_gemm: the kernel adds four digit planes")
    if digits_on_b:
        rows, depth, cols = a.shape[0], a.shape[1], b.shape[1] // planes
        plane_stride = cols * b.stride(1)
    else:
        rows, depth, cols = a.shape[0] // planes, a.shape[1], b.shape[1]
        plane_stride = rows * a.stride(0)
    out = torch.empty((rows, cols), dtype=torch.float32, device=a.device)
    config = dict(INT8_GEMM_CONFIG)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    if rows and cols:
        grid = (-(-rows // block_m) * -(-cols // block_n),)
        kernels(_PLAIN_SPEC, torch.float32)._int8_gemm_kernel[grid](
            a, b, shifts, out, rows, cols, depth, a.stride(0), a.stride(1), b.stride(0), b.stride(1), plane_stride,
            DIGITS_ON_B=digits_on_b, **config, **LAUNCH_OPTIONS)
    return out


def dense_input(events, batch: int, steps: int, features: int, dtype: torch.dtype, copies: int = 1) -> Tensor:
    """The layer input rebuilt from its events: ``(copies·B·T, F)`` rows of ``dtype``.

    ``copies`` > 1 writes it that many times below each other (the weight gradient's split-GEMM spike
    operand, stacked along its contraction). One launch, which zeroes each row before its events. (The
    forward's operand is written by the events' own listing launch: :func:`input_events`.)
    """
    offsets, pos, values = events
    rows = batch * steps
    dense = torch.empty((copies * rows, features), dtype=dtype, device=pos.device)  # every entry written below
    if dense.numel():
        if not pos.numel():  # no events: the kernel only zeroes (placeholders, not empty tensors, for the lists)
            pos, values = _unused(pos.dtype, pos.device), _unused(values.dtype, pos.device)
        kernels(_PLAIN_SPEC, torch.float32)._scatter_events_kernel[(rows,)](
            offsets, pos, values, dense, features, rows * features, copies, BLOCK=128, ZERO_BLOCK=1024)
    return dense


def reverse_sweep(grad_spikes: Tensor, grad_is_compact: bool, active_index: Tensor, active_surr: Tensor,
                  active_offsets: Tensor, beta: Tensor, weight: Tensor, input_active: Optional[Tensor], batch: int,
                  steps: int, *, write: bool, split: bool, need_sums: bool, in_dtype: torch.dtype):
    """A compact layer's backward through a dense dL/dI: its weight gradient's dense route (two launches).

    The route for layers whose input has too many events for the pair sum (see
    :func:`events_are_cheaper`), and for db and dv0 under deterministic algorithms (no atomics):

    * ``_scatter_active_grad_kernel``: g = dL/ds·σ′ at the active entries, kept compact and stored
      into dense zeros (one slot more, where a captured graph's padded list points);
    * ``_reverse_filter_kernel``: one sweep from t = T−1 down to 0 gives dL/dI, written (``write``)
      as float32 or (``split``) as its three exact bfloat16 parts, ``(3, B·T, N)`` smallest first, the
      left operand of spike_matmul's GEMM; with ``need_sums`` also each batch row's Σ_t dL/dI (db
      after a sum over rows) and dv0 = β·dL/dI[:, 0].

    The input gradient at ``input_active`` comes from the compact g as in :func:`sparse_backward`.
    Returns ``(dL/dI or None, db or None, dv0 or None, dx at input_active or None)``; the dense g is
    freed on return, before the caller rebuilds x for the GEMM.
    """
    module = kernels(_PLAIN_SPEC, in_dtype)
    acc = accumulation_dtype(in_dtype)
    device = active_index.device
    neurons = weight.shape[0]
    rows = batch * steps
    count = active_index.numel()
    g = torch.empty(count, dtype=acc, device=device)
    dense_g = torch.zeros(rows * neurons + 1, dtype=acc, device=device)
    gs_strides = (0, 0, 0) if grad_is_compact else grad_spikes.stride()
    beta_a = beta.to(acc).contiguous()
    if count:
        block = 1024
        module._scatter_active_grad_kernel[(-(-count // block),)](
            grad_spikes, active_index, active_surr, g, dense_g, count, steps, neurons, rows * neurons, *gs_strides,
            GS_COMPACT=grad_is_compact, BLOCK=block, **LAUNCH_OPTIONS)
    nothing = _unused(acc, device)
    grad_current = dense_out = parts_out = None
    if write and split:
        grad_current = parts_out = torch.empty((3, rows, neurons), dtype=torch.bfloat16, device=device)
    elif write:
        grad_current = dense_out = torch.empty((rows, neurons), dtype=acc, device=device)
    bias_rows = torch.empty((batch, neurons), dtype=acc, device=device) if need_sums else None
    grad_v0 = torch.empty((batch, neurons), dtype=acc, device=device) if need_sums else None
    block = _block(neurons)
    module._reverse_filter_kernel[(batch, -(-neurons // block))](
        dense_g, beta_a, nothing if dense_out is None else dense_out,
        _unused(torch.bfloat16, device) if parts_out is None else parts_out,
        nothing if bias_rows is None else bias_rows, nothing if grad_v0 is None else grad_v0, steps, neurons, rows,
        WRITE=write, SPLIT=split, SUMS=need_sums, BLOCK_N=block, STAGES=_sweep_stages(False), **LAUNCH_OPTIONS)
    del dense_g
    grad_x = None
    if input_active is not None:
        grad_x = _input_grad_at(module, input_active, g, active_index, active_offsets, beta_a, weight, batch, steps,
                                acc)
    return grad_current, None if bias_rows is None else bias_rows.sum(0), grad_v0, grad_x


def events_are_cheaper(active_count: int, event_count: int, batch: int, steps: int, neurons: int,
                       features: int) -> bool:
    """Whether the event-pair weight gradient beats a dense GEMM: pairs × ~64 (an atomic vs a GEMM FMA) < B·T·N·F."""
    pairs = active_count * (event_count / max(batch, 1)) / 2
    return pairs * 64 < batch * steps * neurons * features
