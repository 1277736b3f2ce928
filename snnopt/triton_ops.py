"""The fused LIF layer on generated Triton kernels, as ``torch.library`` custom ops.

``snnopt::lif_triton`` and ``snnopt::lif_triton_backward`` take the same arguments as the CPU ops
``snnopt::lif`` / ``snnopt::lif_backward`` (:mod:`snnopt.ops`) and run the kernels of
:mod:`snnopt.codegen.triton_lif`. Separate ops, so the numba op never depends on Triton and this
module is imported only when the Triton backend is chosen (``import snnopt`` needs neither triton
nor a GPU). Both have fake implementations and a fixed output signature, so ``torch.compile`` and
``torch.export`` keep them whole.

What the forward keeps for the backward: exact mode the membrane (and synaptic current, CuBa) in
the accumulation dtype; sparse feedforward layers with reset by subtraction or none only compact
lists (active entries: flat int64 index, surrogate value, per-(b, t) offsets; input: its nonzero
events), see ``triton_lif.sparse_backward``; other sparse layers one uint8 flag per entry (spiked,
active) and the active list.

Example::

    >>> outs = torch.ops.snnopt.lif_triton(x, w, None, None, beta, theta, None, v0, None, None,
    ...                                    "subtract", True, "superspike", 100.0, False, "sparse", 0.2, False, True)
"""

from __future__ import annotations

import contextvars
import functools
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from snnopt import graphs
from snnopt.codegen import spike_matmul, triton_lif
from snnopt.errors import UnsupportedModelError
from snnopt.ops import _empty, outside_autocast
from snnopt.spec import LifSpec
from snnopt.surrogate import Surrogate


@functools.lru_cache(maxsize=64)  # a frozen value; building and validating it costs host time on every call
def _spec(reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window, cuba,
          recurrent) -> LifSpec:
    return LifSpec(reset=reset, detach_reset=detach_reset, surrogate=Surrogate(surrogate, surrogate_param),
                   cuba=cuba, recurrent=recurrent, fire_at_threshold=fire_at_threshold, backward=backward,
                   window=window)


@outside_autocast
@triton_lif.on_device_of("x")
def _lif_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], recurrent_weight: Optional[Tensor],
                beta: Tensor, threshold: Tensor, alpha: Optional[Tensor], initial_v: Tensor,
                initial_syn: Optional[Tensor], input_active: Optional[Tensor],
                reset: str, detach_reset: bool, surrogate: str, surrogate_param: float, fire_at_threshold: bool,
                backward: str, window: float, record_membrane: bool, needs_backward: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                           Tensor, Tensor]:
    args = (x, weight, bias, recurrent_weight, beta, threshold, alpha, initial_v, initial_syn, input_active, reset,
            detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window, record_membrane,
            needs_backward)
    try:
        return _lif_forward(*args, guess_events=True)
    except _GuessFellShort:  # (rare: the input's events outgrew the last call's, or stopped being spikes)
        return _lif_forward(*args, guess_events=False)


class _GuessFellShort(Exception):
    """A compact layer's guessed event count (KernelTuning.guess_event_count) did not hold: list again."""


# A compact layer's input-event count and spike check of its last eager call, per weight tensor and
# input shape: the next call's guess (see KernelTuning.guess_event_count).
_EVENT_COUNTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _event_guess(weight: Tensor, x: Tensor) -> Optional[tuple[int, str | None]]:
    """Room for the events of ``x`` from the last call's count (a quarter more, at least 256 more,
    at most every entry), and that call's spike check; None without a last call."""
    last = _EVENT_COUNTS.get(weight, {}).get((tuple(x.shape), x.dtype))
    if last is None:
        return None
    count, kind = last
    return min(x.numel(), count + max(count // 4, 256)), kind


def _route_suits(route, kind) -> bool:
    # Whether a GEMM route chosen from a guessed spike check holds for the input's actual one.
    if not route:
        return True  # the float32 product takes any input
    if route in spike_matmul.INT8_ROUTES:
        return kind == spike_matmul.INT8
    return kind in (spike_matmul.BFLOAT16, spike_matmul.INT8)


def _lif_forward(x, weight, bias, recurrent_weight, beta, threshold, alpha, initial_v, initial_syn, input_active,
                 reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window,
                 record_membrane, needs_backward, *, guess_events: bool):
    cuba, recurrent = alpha is not None, recurrent_weight is not None
    spec = _spec(reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window, cuba, recurrent)
    acc = triton_lif.accumulation_dtype(x.dtype)
    compact = needs_backward and _compact_path(spec, weight)
    plan = graphs.active_plan()
    site = _capture_site(plan, spec, x, weight, compact, needs_backward) if plan is not None else None
    static = site is not None and plan.static
    # A compact layer keeps its input as events; listed first, they also tell the GEMM below
    # whether x is spikes (checking the few nonzeros instead of all of x).
    events = None
    checks = []  # the events' spike check, where their count brought it back

    def forward_route():
        # x·Wᵀ's route (spike_matmul; a captured step follows the recorded one), from the events' spike
        # check where their count brought it back (a compact layer), else from x itself.
        return _decided(site, static, "split_linear", lambda: spike_matmul.linear_route(
            x, weight, kind=checks[0] if checks else spike_matmul.UNCHECKED))

    routed = []  # (route, its spike operand or None), where the events' listing decided it
    unread = []  # with a guessed event count: [count, (spike check flags)] on the device, read below
    received = []
    device_checks = []  # a static plan's spike check of the input, [not bfloat16, not int8] on the device
    if compact:
        # The check only where a product of this layer may take a tensor-core route (on the input as
        # x·Wᵀ's left operand, or as the weight gradient's right one).
        batch, steps, features = x.shape
        products = ((batch * steps, features, weight.shape[0]), (weight.shape[0], batch * steps, features))
        check = any(spike_matmul.applies(x, weight, shape) for shape in products)

        def gemm_operand() -> Optional[Tensor]:
            # Between the events' count (the spike check with it) and their listing: x·Wᵀ's route is
            # decided here, and a tensor-core route's spike operand is written by the listing launch.
            route = forward_route()
            operand = spike_matmul.spike_operand_buffer(route, batch * steps, features, x.device) if route else None
            routed.append((route, operand))
            return operand

        guessing = guess_events and site is None and triton_lif.current_tuning().guess_event_count
        guess = _event_guess(weight, x) if guessing else None
        if static:
            # An overflow leaves the forward's outputs right (the GEMM's operand is written whole): only
            # the backward needs the lists. The spike check comes from the counting launch, all of x.
            events = triton_lif.input_events(x, acc, site.events_capacity, plan.flag_overflow, operand=gemm_operand,
                                             device_check=device_checks.append if site.spike_routes() else None)
        elif guess is not None:
            # No read here: the count and the spike check come back with the active list's length below.
            if check:
                checks.append(guess[1])  # the route is chosen from the last call's check, verified below
            events = triton_lif.input_events(x, acc, checked=checks.append if check else None,
                                             operand=gemm_operand, guess=guess[0], unread=unread.append)
        else:
            events = triton_lif.input_events(x, acc, checked=checks.append if check else None,
                                             operand=gemm_operand)
        if site is not None and not static:
            site.events_seen = max(site.events_seen, events[1].numel())
            if checks:
                _INPUT_KINDS[events[2]] = checks[0]  # for this layer's backward (which would read it again)
    if weight is None:
        current = x.to(acc, copy=True) if recurrent else x
    else:
        # One GEMM for all steps (in the input dtype, as nn.Linear would; a large spike input on
        # bfloat16 tensor cores at float32 accuracy, see spike_matmul); the kernels read it in `acc`.
        batch, steps, features = x.shape
        nonzeros = events[2] if events is not None else None
        route, operand = routed[0] if routed else (forward_route(), None)
        if static:  # the routes assume spikes: say so on the device if this input is not
            plan.check_input(site, x, device_checks[0] if device_checks else None)
        current = spike_matmul.linear(
            x, weight, bias, nonzeros=nonzeros, route=route,
            spike_operand=operand)
        if recurrent:
            current = current.to(acc)
    exact_saves = needs_backward and not spec.sparse
    # The outputs' empty placeholders, made before the sweep: an eager compact forward reads the device
    # once, in lif_forward, and what the host issues after that read it issues while the device waits.
    no_membrane = _empty(x) if not record_membrane else None
    no_saved_membrane = _empty(x, acc) if not exact_saves else None
    no_syn_final = _empty(x) if not cuba else None
    no_syn_record = _empty(x, acc) if not (exact_saves and cuba) else None
    no_flags = _empty(x, torch.uint8) if compact else None
    spikes, membrane, syn_record, v_state, syn_state, flags, surr, lists = triton_lif.lif_forward(
        current.contiguous(), beta, threshold, alpha, recurrent_weight, initial_v, initial_syn, spec,
        out_dtype=x.dtype, record_membrane=record_membrane or exact_saves, record_syn=exact_saves and cuba,
        collect_active=needs_backward and spec.sparse and not compact, compact_active=compact,
        list_capacity=site.active_capacity if (static and compact) else None,
        flag=plan.flag_overflow if static else None,  # (the active lists: only the backward reads them)
        staged=bool(static and site.staged), staging_held=None if (site is None or static) else site.staging_held,
        read_along=(unread[0], received.extend) if unread else None)
    del current
    if static:
        plan.note_spikes(spikes)
    if compact and site is None:
        events = _settle_events(events, unread, received, checks, routed, weight, x, check)
    out_membrane = membrane.to(x.dtype, copy=exact_saves) if record_membrane else no_membrane
    saved_membrane = membrane if exact_saves else no_saved_membrane
    if events is None:
        events = (_empty(x, torch.int64), _empty(x, _event_pos_dtype(x)), _empty(x, acc))
    if compact:
        active_index, active_surr, active_offsets = lists
        flags = no_flags
        if site is not None and not static:
            site.active_seen = max(site.active_seen, active_index.numel())
    elif flags is not None:
        active_index = torch.nonzero(flags.reshape(-1) & triton_lif.FLAG_ACTIVE).squeeze(1)
        active_surr = surr.reshape(-1)[active_index]
        active_offsets = _empty(x, torch.int64)
    else:
        flags, active_index, active_surr = _empty(x, torch.uint8), _empty(x, torch.int64), _empty(x, acc)
        active_offsets = _empty(x, torch.int64)
    return (spikes, out_membrane, v_state.to(x.dtype), syn_state.to(x.dtype) if cuba else no_syn_final,
            saved_membrane, syn_record if syn_record is not None else no_syn_record, flags, active_index,
            active_surr, active_offsets, *events)


def _settle_events(events, unread, received, checks, routed, weight: Tensor, x: Tensor, check: bool):
    """An eager compact layer's input events once their count is known: kept for the next call's guess
    and, where they were listed from a guess, cut to the count (or :class:`_GuessFellShort`)."""
    offsets, pos, values = events
    count = pos.numel()
    if unread:
        count, *flags = received
        if check:
            checks[0] = spike_matmul.kind_from_flags(*flags)
    kind = checks[0] if checks else None
    _EVENT_COUNTS.setdefault(weight, {})[(tuple(x.shape), x.dtype)] = (count, kind)  # the next call's guess
    if unread:
        if count > pos.numel() or not _route_suits(routed[0][0] if routed else None, kind):
            raise _GuessFellShort
        pos, values = pos[:count], values[:count]
    if checks:
        _INPUT_KINDS[values] = kind  # for this layer's backward (which would read it again)
    return offsets, pos, values


# The forward's spike check of a compact layer's input events (spike_matmul.spike_kind's result), by the
# events' values tensor, until _setup_context moves it to the layer's autograd context.
_INPUT_KINDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _capture_site(plan: graphs.CapturePlan, spec: LifSpec, x: Tensor, weight: Optional[Tensor], compact: bool,
                  needs_backward: bool) -> graphs.CaptureSite:
    """This call's entry in a CUDA-graph capture plan; while recording, whether it can be captured at all."""
    batch, steps, features = x.shape
    neurons = features if weight is None else weight.shape[0]
    site = plan.next_site(f"linear {features} -> {neurons} + {spec.describe()}" if weight is not None
                          else spec.describe())
    plan.current = site
    if not plan.static:
        site.events_limit, site.active_limit = batch * steps * features, batch * steps * neurons
        if needs_backward and spec.sparse and not compact:
            site.uncapturable.append("a sparse layer that is recurrent, has a synaptic current, resets to zero or "
                                     "has no weight lists its active entries with torch.nonzero (a host read); "
                                     "give it backward='exact' to capture it")
    return site


def _route(site: Optional[graphs.CaptureSite], static: bool, route: str, decide) -> Optional[bool | str]:
    """One of a layer's route choices (``route``: a CaptureSite field) under a capture plan.

    A choice is False (the plain route), True, or a tensor-core route of ``spike_matmul`` (which
    also counts as True). No plan: None (the caller decides as usual). Recording: ``decide()``
    (which may read the device), kept as the plan's choice: False once any recorded step chose
    False (each route is correct for any input; the others only promise more speed where they held
    every time), and bfloat16 where steps chose both tensor-core routes (it takes any spikes the
    int8 route takes). Static: the recorded choice, as a captured step cannot read the device.
    """
    if site is None:
        return None
    if not static:
        chosen = decide() or False
        recorded = getattr(site, route)
        setattr(site, route, chosen if recorded is None else _common_route(recorded, chosen))
        return chosen
    value = getattr(site, route)
    if value is None:
        raise UnsupportedModelError(
            f"capture_graphs: layer {site.index} ({site.description}) now needs a choice ({route}) that the recorded "
            "steps never made: a captured model must compute the same gradients (same parameters requiring grad) "
            "in every step")
    return value


lif_triton_op = torch.library.custom_op("snnopt::lif_triton", mutates_args=())(_lif_triton)


def lif_triton(*args) -> tuple[Tensor, ...]:
    """``lif_triton_op(*args)``, or in plain eager mode its implementation under a plain autograd function.

    The op exists so ``torch.compile`` / ``torch.export`` / FX see the layer whole, and it is what
    they record. In plain eager mode (no compiler, no functorch transform, ordinary tensors) the
    dispatcher's trip adds only host time, which is most of a sparse layer's time on a GPU: the
    custom op's autograd wrapper rebuilds every argument's default from the schema (about 0.1 ms
    for this op's 19 arguments on a 2-core Xeon) and checks its outputs' storages. The same
    forward, setup and backward functions run either way, so the results are the same
    (tests/codegen/test_triton_compact.py compares the two).
    """
    if not _plain_eager(args):
        return lif_triton_op(*args)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
        return _EagerLifTriton.apply(*args)
    return _lif_triton(*args)


def _plain_eager(args) -> bool:
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(t) in _PLAIN_TENSOR_TYPES for t in args if isinstance(t, Tensor))


class _EagerLifTriton(torch.autograd.Function):
    """``snnopt::lif_triton``'s autograd (:func:`_setup_context`, :func:`_backward`) without the dispatcher.

    The forward takes ``ctx`` and sets it up itself rather than through a ``setup_context`` method:
    with one, every ``apply`` binds its arguments to the forward's signature with ``inspect``
    (~30 µs on a 2-core AMD EPYC, against ~15 µs for the whole apply without). Plain eager mode only,
    where the functorch transforms that need ``setup_context`` are not active (:func:`_plain_eager`).
    """

    @staticmethod
    def forward(ctx, *args):
        output = _lif_triton(*args)
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def _common_route(recorded, chosen):
    if not recorded or not chosen:
        return False
    return recorded if recorded == chosen else spike_matmul.BFLOAT16


def _decided(site: Optional[graphs.CaptureSite], static: bool, route: str, decide):
    """:func:`_route`'s choice, or without a capture plan ``decide()`` itself (False for None)."""
    chosen = _route(site, static, route, decide)
    return (decide() or False) if chosen is None else chosen


def _compact_path(spec: LifSpec, weight: Optional[Tensor]) -> bool:
    """Whether a layer keeps only compact lists for its backward (see ``triton_lif.sparse_backward``).

    Feedforward sparse linear layers with reset by subtraction (or none) and no synaptic current:
    there dL/dI is a pure reverse β-filter of the active entries. A zero reset needs every step's
    spike, CuBa a second filter, a recurrent layer the per-step recurrent term: they keep the
    per-entry flags and the dense reverse sweep.
    """
    return spec.sparse and not spec.recurrent and not spec.cuba and spec.reset != "zero" and weight is not None


def _event_pos_dtype(x: Tensor) -> torch.dtype:
    return torch.int32 if x.shape[1] * x.shape[2] < 2**31 else torch.int64


@lif_triton_op.register_fake
def _lif_triton_fake(x, weight, bias, recurrent_weight, beta, threshold, alpha, initial_v, initial_syn, input_active,
                     reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window,
                     record_membrane, needs_backward):
    batch, steps = x.shape[0], x.shape[1]
    neurons = x.shape[2] if weight is None else weight.shape[0]
    acc = triton_lif.accumulation_dtype(x.dtype)
    exact_saves = needs_backward and backward == "exact"
    collect = needs_backward and backward == "sparse"
    seq = (batch, steps, neurons)
    compact = collect and weight is not None and recurrent_weight is None and alpha is None and reset != "zero"
    n_active = torch.library.get_ctx().new_dynamic_size() if collect else 0
    n_events = torch.library.get_ctx().new_dynamic_size() if compact else 0
    return (x.new_empty(seq), x.new_empty(seq) if record_membrane else _empty(x), x.new_empty(batch, neurons),
            x.new_empty(batch, neurons) if alpha is not None else _empty(x),
            x.new_empty(seq, dtype=acc) if exact_saves else _empty(x, acc),
            x.new_empty(seq, dtype=acc) if (exact_saves and alpha is not None) else _empty(x, acc),
            x.new_empty(seq, dtype=torch.uint8) if (collect and not compact) else _empty(x, torch.uint8),
            x.new_empty(n_active, dtype=torch.int64), x.new_empty(n_active, dtype=acc),
            x.new_empty(batch * steps + 1 if compact else 0, dtype=torch.int64),
            x.new_empty(batch * steps + 1 if compact else 0, dtype=torch.int64),
            x.new_empty(n_events, dtype=_event_pos_dtype(x)), x.new_empty(n_events, dtype=acc))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, recurrent_weight, beta, threshold, alpha, initial_v, initial_syn, input_active,
     reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window,
     record_membrane, needs_backward) = inputs
    _, _, _, _, membrane, syn_record, flags, active_index, active_surr, active_offsets, *events = output
    spec = _spec(reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window,
                 alpha is not None, recurrent_weight is not None)
    compact = needs_backward and _compact_path(spec, weight)
    # A compact layer keeps its input as events (output), not the dense x.
    ctx.save_for_backward(x if (weight is not None and not compact) else None, weight, recurrent_weight, beta,
                          threshold, alpha, initial_v, initial_syn, input_active, membrane, syn_record, flags,
                          active_index, active_surr, active_offsets, *events)
    ctx.config = (reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window)
    # What the forward's spike check read from the input events, if it ran (the backward's weight
    # gradient then needs no second read): a spike_matmul.spike_kind result, or UNCHECKED.
    ctx.input_kind = _KIND_NAMES[_INPUT_KINDS.pop(events[-1], spike_matmul.UNCHECKED)]
    ctx.steps = x.shape[1]
    ctx.input_shape = tuple(x.shape)
    ctx.has_bias = bias is not None
    # Unused outputs (membrane, final state) send None, not zeros: a compact layer then never reads
    # a dense dL/dv it does not need.
    ctx.set_materialize_grads(False)
    # The restricted input gradient may travel as a sparse COO tensor to a compact producer, which
    # reads its values in the order of its own active list (no dense zero-filled (B, T, in) tensor).
    eager = not torch.compiler.is_compiling()
    plan = graphs.active_plan()
    ctx.capture = (plan, plan.current) if plan is not None else None
    ctx.sparse_input_grad = (eager and plan is None and compact and input_active is not None
                             and type(x.grad_fn).__name__.startswith(_TRITON_NODE_PREFIXES)
                             and _is_producer_list(x, input_active))


# Autograd's names for this op's backward node: through the op, and through lif_triton in plain eager mode.
_TRITON_NODE_PREFIXES = ("GeneratedBackwardFor_snnopt_lif_triton_", "_EagerLifTritonBackward")
_SAVED_ACTIVE_INDEX = 12  # position in ctx.save_for_backward above
# COO gradients built here, mapped to the flat index list their values follow.
_COO_SOURCES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _is_producer_list(x: Tensor, input_active: Tensor) -> bool:
    # Only the producer's own active list (sorted, unique) may label a COO tensor as coalesced.
    from snnopt.functional import spiking

    entry = spiking._SPARSE_PRODUCERS.get(x)
    if entry is None:
        return False
    listed = entry[0]()
    return listed.numel() == input_active.numel() and listed.data_ptr() == input_active.data_ptr()


def _dense(grad: Optional[Tensor]) -> Optional[Tensor]:
    # A sparse consumer may send dL/ds as a COO tensor; these kernels read it dense.
    return grad.to_dense() if grad is not None and grad.layout == torch.sparse_coo else grad


def _backward(ctx, grad_spikes, grad_membrane, grad_v_final, grad_syn_final, *_unused):
    needs = ctx.needs_input_grad
    saved = ctx.saved_tensors
    compact_grad = False
    if grad_spikes is not None and grad_spikes.layout == torch.sparse_coo:
        own, source = saved[_SAVED_ACTIVE_INDEX], _COO_SOURCES.get(grad_spikes)
        if (source is not None and own.numel() and source.numel() == own.numel()
                and source.data_ptr() == own.data_ptr()):
            grad_spikes, compact_grad = grad_spikes._values(), True  # one value per active entry, same order
        else:
            grad_spikes = grad_spikes.to_dense()
    entry = _backward_entry(grad_spikes, saved)
    if ctx.capture is not None:
        if entry is torch.ops.snnopt.lif_triton_backward:
            raise UnsupportedModelError(
                "capture_graphs: the backward of a captured snnopt layer must run in plain eager autograd (not under "
                "create_graph=True, torch.compile or a tensor subclass)")
    token = _BACKWARD_CAPTURE.set(ctx.capture)  # the plan and site, for _lif_triton_backward
    try:
        grads = list(entry(
            grad_spikes, _dense(grad_membrane), grad_v_final, grad_syn_final, *saved, ctx.steps, compact_grad,
            ctx.input_kind, *ctx.config, needs[0], needs[1], ctx.has_bias and needs[2], needs[3], needs[4], needs[5],
            needs[6], needs[7], needs[8]))
    finally:
        _BACKWARD_CAPTURE.reset(token)
    input_active = saved[8]
    if needs[0] and input_active is not None and saved[14].numel():
        grads[0] = _input_grad_from_values(grads[0], input_active, ctx.input_shape, ctx.sparse_input_grad)
    return tuple(g if need else None for g, need in zip(grads, needs[:9])) + (None,) * 10


# (plan, site) of a captured layer's backward while it runs: a context, not an argument, as the
# backward op's schema holds tensors and plain values only.
_BACKWARD_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("snnopt_backward_capture", default=None)


def _backward_entry(grad_spikes: Optional[Tensor], saved):
    """The backward op, or in plain eager mode its implementation called directly.

    The op exists so ``torch.compile`` / ``torch.export`` see the backward whole. In eager mode
    (grad mode off, as autograd runs a backward without ``create_graph``; no compiler; ordinary
    tensors) going through the dispatcher again only adds host time, which is most of a sparse
    layer's backward on a GPU (a couple of kernel launches).
    """
    plain = (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
             and all(type(t) in _PLAIN_TENSOR_TYPES for t in (grad_spikes, *saved) if t is not None))
    if plain:
        return functools.partial(_lif_triton_backward, fresh_placeholders=False)
    return torch.ops.snnopt.lif_triton_backward


# Saved weights are nn.Parameter: as plain as Tensor here (no __torch_function__ of their own), unlike
# FakeTensor, functional tensors or user subclasses, which must go through the op.
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _input_grad_from_values(values: Tensor, input_active: Tensor, shape, as_sparse: bool) -> Tensor:
    """dL/dx from its values at ``input_active``: sparse COO for a compact producer, else dense."""
    batch, steps, features = shape
    if as_sparse:
        coords = torch.stack([input_active // (steps * features), (input_active // features) % steps,
                              input_active % features])
        grad = torch.sparse_coo_tensor(coords, values, shape, is_coalesced=True, check_invariants=False)
        _COO_SOURCES[grad] = input_active
        return grad
    # scatter_add_: one atomic kernel on CUDA (index_put_ with accumulate sorts the indices first).
    # One slot more for a captured graph's padded list (index B·T·F, value 0), cut off after.
    entries = batch * steps * features
    dense = values.new_zeros(entries + 1).scatter_add_(0, input_active, values)
    return dense[:entries].reshape(shape)


torch.library.register_autograd("snnopt::lif_triton", _backward, setup_context=_setup_context)


@outside_autocast
@triton_lif.on_device_of("initial_v")
def _lif_triton_backward(grad_spikes: Optional[Tensor], grad_membrane: Optional[Tensor],
                           grad_v_final: Optional[Tensor], grad_syn_final: Optional[Tensor], x: Optional[Tensor],
                           weight: Optional[Tensor], recurrent_weight: Optional[Tensor], beta: Tensor,
                           threshold: Tensor, alpha: Optional[Tensor], initial_v: Tensor,
                           initial_syn: Optional[Tensor], input_active: Optional[Tensor], membrane: Tensor,
                           syn_record: Tensor, flags: Tensor, active_index: Tensor, active_surr: Tensor,
                           active_offsets: Tensor, event_offsets: Tensor, event_pos: Tensor, event_values: Tensor,
                           steps: int, grad_is_compact: bool, input_kind: str,
                           reset: str, detach_reset: bool, surrogate: str, surrogate_param: float,
                           fire_at_threshold: bool, backward: str, window: float, need_x: bool, need_weight: bool,
                           need_bias: bool, need_recurrent: bool, need_beta: bool, need_threshold: bool,
                           need_alpha: bool, need_initial_v: bool, need_initial_syn: bool,
                           fresh_placeholders: bool = True
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch, neurons = initial_v.shape
    cuba, recurrent = alpha is not None, recurrent_weight is not None
    spec = _spec(reset, detach_reset, surrogate, surrogate_param, fire_at_threshold, backward, window, cuba, recurrent)
    in_dtype = initial_v.dtype
    acc = triton_lif.accumulation_dtype(in_dtype)
    seq_shape = (batch, steps, neurons)
    gsf = grad_syn_final if (grad_syn_final is not None and grad_syn_final.numel()) else None
    gm = grad_membrane if (grad_membrane is not None and grad_membrane.numel()) else None
    compact = active_offsets.numel() > 0
    # Under a CUDA-graph capture plan (snnopt.graphs): routes recorded once, then followed.
    capture = _BACKWARD_CAPTURE.get()
    plan, site = capture if capture is not None else (None, None)
    static = plan is not None and plan.static

    def empty():
        # Unneeded outputs: through the op a fresh tensor each (outputs of a custom op must not
        # alias each other); called directly (eager), None, and no allocations.
        return _empty(beta) if fresh_placeholders else None

    if compact:
        restricted = need_x and input_active is not None
        # The compact kernels differentiate dL/ds through the active entries only; a membrane or
        # final-state gradient or an unrestricted input gradient takes the full dense reverse
        # sweep, rebuilt from the same lists.
        events = (event_offsets, event_pos, event_values)
        dense = grad_spikes is None or gm is not None or grad_v_final is not None or (need_x and not restricted)
        if dense and site is not None:
            site.uncapturable.append("its backward needs the dense route (a membrane or final-state gradient, or "
                                     "the input gradient everywhere rather than at an upstream sparse layer's "
                                     "active entries)")
        if not dense:
            # The pair sum adds into dW, db and dv0 with atomics, in an order that varies from run to
            # run: under torch.use_deterministic_algorithms they come from the reverse sweep instead.
            deterministic = torch.are_deterministic_algorithms_enabled()

            # Too many input events for the pair sum: the weight gradient goes dense (a reverse
            # β-filter, then one GEMM); db and dv0 come from the same sweep.
            def cheaper():
                if deterministic:
                    return False
                forced = triton_lif.current_tuning().weight_grad_route
                if forced != "auto":
                    return forced == "pairs"
                return triton_lif.events_are_cheaper(active_index.numel(), event_pos.numel(), batch, steps,
                                                     neurons, weight.shape[1])
            pairs = need_weight and _decided(site, static, "pair_weight_grad", cheaper)
            sums_needed = need_bias or need_initial_v
            if (need_weight and not pairs) or (deterministic and sums_needed):
                route = need_weight and _decided(site, static, "split_weight_grad",
                                                 lambda: _input_route(events, weight, batch, steps, input_kind))
                grad_current, grad_b, grad_v0, grad_x = triton_lif.reverse_sweep(
                    grad_spikes, grad_is_compact, active_index, active_surr, active_offsets, beta, weight,
                    input_active if restricted else None, batch, steps, write=need_weight,
                    split=route == spike_matmul.BFLOAT16, need_sums=sums_needed, in_dtype=in_dtype)
                grad_w = _weight_grad_from_current(grad_current, events, weight, batch, steps, route) \
                    if need_weight else None
            else:
                grad_w, grad_b, grad_v0, grad_x = triton_lif.sparse_backward(
                    grad_spikes, grad_is_compact, active_index, active_surr, active_offsets,
                    events if pairs else None, beta, weight, input_active if restricted else None,
                    batch, steps, need_weight=pairs, need_bias=need_bias, need_initial_v=need_initial_v,
                    in_dtype=in_dtype)
            return (grad_x.to(in_dtype) if grad_x is not None else empty(),
                    grad_w.to(weight.dtype) if grad_w is not None else empty(),
                    grad_b.to(weight.dtype) if (need_bias and grad_b is not None) else empty(), empty(), empty(),
                    empty(), empty(), grad_v0.to(in_dtype) if (need_initial_v and grad_v0 is not None) else empty(),
                    empty())
        if grad_is_compact:
            values = grad_spikes
            grad_spikes = torch.zeros(batch * steps * neurons, dtype=values.dtype, device=values.device)
            grad_spikes[active_index] = values
            grad_spikes = grad_spikes.reshape(seq_shape)
        flags = torch.zeros(batch * steps * neurons, dtype=torch.uint8, device=initial_v.device)
        flags[active_index] = triton_lif.FLAG_ACTIVE
        flags = flags.reshape(seq_shape)
        if need_weight:
            x = _dense_spikes(events, batch, steps, weight.shape[1],
                              _input_route(events, weight, batch, steps, input_kind) or acc)
        else:
            x = None
    surr = None
    if spec.sparse:
        surr = torch.zeros(batch * steps * neurons, dtype=acc, device=initial_v.device)
        surr[active_index] = active_surr
        surr = surr.reshape(seq_shape)
    grad_current, grad_v0, grad_syn0, grad_beta, grad_theta, grad_alpha = triton_lif.lif_backward(
        grad_spikes, gm, grad_v_final, gsf, membrane if membrane.numel() else None,
        syn_record if syn_record.numel() else None, flags if flags.numel() else None, surr, beta, threshold, alpha,
        recurrent_weight, initial_v, initial_syn, steps, spec, in_dtype)

    rows = grad_current.reshape(batch * steps, neurons)
    grad_x = grad_w = grad_b = grad_rec = None
    if weight is None:
        grad_x = grad_current.to(in_dtype) if need_x else None
    else:
        in_features = weight.shape[1]
        weight_acc = weight.to(acc)
        if need_weight:
            x_rows = x.reshape(batch * steps, in_features)
            route = _route(site, static, "split_weight_grad",
                           lambda: spike_matmul.weight_grad_route(rows, x_rows))
            grad_w = spike_matmul.weight_grad(rows, x_rows, route=route).to(weight.dtype)
        if need_bias:
            grad_b = rows.sum(0).to(weight.dtype)
        if need_x and input_active is not None:
            # Only where the producing layer reads it: one dot product per listed entry.
            entries = batch * steps * in_features
            listed = input_active.clamp(max=entries - 1) if plan is not None else input_active  # padding: see below
            values = (rows[listed // in_features] * weight_acc.t()[listed % in_features]).sum(1)
            if plan is not None:
                values = values * (input_active < entries)  # a captured graph's padded entries add nothing
            if compact:
                grad_x = values.to(in_dtype)  # the autograd wrapper places them
            else:
                grad_x = torch.zeros(entries + 1, dtype=acc, device=rows.device)  # + the padding's slot
                grad_x.scatter_add_(0, input_active, values)
                grad_x = grad_x[:entries].reshape(batch, steps, in_features).to(in_dtype)
        elif need_x:
            grad_x = rows.mm(weight_acc).reshape(batch, steps, in_features).to(in_dtype)
    if recurrent and need_recurrent:
        # dV = Σ_t Gcur[t]ᵀ s[t-1]; s[-1] from the initial membrane.
        theta_acc = threshold.to(acc)
        if spec.sparse:
            spikes = (flags & triton_lif.FLAG_SPIKE).to(acc)
        else:
            spikes = triton_lif._fires(membrane - theta_acc, fire_at_threshold).to(acc)
        s_init = triton_lif._fires(initial_v.to(acc) - theta_acc, fire_at_threshold).to(acc)
        shifted = torch.cat([s_init.unsqueeze(1), spikes[:, :-1]], 1).reshape(batch * steps, neurons)
        grad_rec = rows.t().mm(shifted).to(recurrent_weight.dtype)
    exact = not spec.sparse
    return (empty() if grad_x is None else grad_x,
            empty() if grad_w is None else grad_w,
            empty() if grad_b is None else grad_b,
            empty() if grad_rec is None else grad_rec,
            grad_beta.to(beta.dtype) if (need_beta and exact) else empty(),
            grad_theta.to(beta.dtype) if (need_threshold and exact) else empty(),
            grad_alpha.to(beta.dtype) if (need_alpha and exact and cuba) else empty(),
            grad_v0.to(in_dtype) if need_initial_v else empty(),
            grad_syn0.to(in_dtype) if (need_initial_syn and cuba) else empty())


lif_triton_backward_op = torch.library.custom_op("snnopt::lif_triton_backward", mutates_args=())(
    _lif_triton_backward)


def _weight_grad_from_current(grad_current: Tensor, events, weight: Tensor, batch: int, steps: int, route) -> Tensor:
    """dW = dL/dIᵀ·x on the dense route, x rebuilt from its events as the GEMM's operand.

    ``route`` is the GEMM's (``spike_matmul``; a weight gradient takes only the bfloat16 one): there
    ``grad_current`` is dL/dI's three exact parts, smallest first (:func:`triton_lif.reverse_sweep`),
    and x is rebuilt directly as the stacked operand; else both are float32. The sweep's dense g is
    already freed: the peak holds dL/dI and x, not g as well.
    """
    features = weight.shape[1]
    if route == spike_matmul.BFLOAT16:
        x_stacked = triton_lif.dense_input(events, batch, steps, features, torch.bfloat16,
                                           copies=spike_matmul.SPLIT_PARTS)
        return spike_matmul.weight_grad_from_parts(grad_current, x_stacked, stacked=True)
    return grad_current.t().mm(triton_lif.dense_input(events, batch, steps, features, grad_current.dtype))


def _dense_spikes(events, batch: int, steps: int, features: int, kind) -> Tensor:
    """The layer input rebuilt from its events as a GEMM operand: ``kind`` a ``spike_matmul`` route (bfloat16;
    int8) or a dtype."""
    dtype = (torch.bfloat16 if kind == spike_matmul.BFLOAT16 else torch.int8 if kind in spike_matmul.INT8_ROUTES
             else kind)
    return triton_lif.dense_input(events, batch, steps, features, dtype)


def _input_route(events, weight: Tensor, batch: int, steps: int, input_kind: str) -> Optional[str]:
    """The weight gradient's GEMM route for this input (``spike_matmul.route_for``: spikes read from its
    events, unless ``input_kind`` names what the forward read from them)."""
    neurons, features = weight.shape
    return spike_matmul.route_for(events[2], weight, (neurons, batch * steps, features), "b",
                                  kind=_KINDS_BY_NAME[input_kind])


# spike_matmul.spike_kind results as the backward op's string argument (its schema takes no None there).
_KIND_NAMES = {spike_matmul.UNCHECKED: "unchecked", None: "none", spike_matmul.BFLOAT16: "bfloat16",
               spike_matmul.INT8: "int8"}
_KINDS_BY_NAME = {name: kind for kind, name in _KIND_NAMES.items()}


@lif_triton_backward_op.register_fake
def _lif_triton_backward_fake(grad_spikes, grad_membrane, grad_v_final, grad_syn_final, x, weight, recurrent_weight,
                              beta, threshold, alpha, initial_v, initial_syn, input_active, membrane, syn_record,
                              flags, active_index, active_surr, active_offsets, event_offsets, event_pos,
                              event_values, steps, grad_is_compact, input_kind, reset, detach_reset, surrogate,
                              surrogate_param, fire_at_threshold, backward, window, need_x, need_weight, need_bias,
                              need_recurrent, need_beta, need_threshold, need_alpha, need_initial_v,
                              need_initial_syn, fresh_placeholders=True):
    batch, neurons = initial_v.shape
    exact = backward == "exact"

    def empty():
        return _empty(beta)

    in_features = neurons if weight is None else weight.shape[1]
    if need_x and input_active is not None and active_offsets.numel():
        grad_x = initial_v.new_empty(input_active.shape)  # values at input_active, placed by the autograd wrapper
    else:
        grad_x = initial_v.new_empty(batch, steps, in_features) if need_x else empty()
    return (grad_x,
            weight.new_empty(weight.shape) if (need_weight and weight is not None) else empty(),
            weight.new_empty(neurons) if (need_bias and weight is not None) else empty(),
            recurrent_weight.new_empty(neurons, neurons) if (need_recurrent and recurrent_weight is not None)
            else empty(),
            beta.new_empty(neurons) if (need_beta and exact) else empty(),
            beta.new_empty(neurons) if (need_threshold and exact) else empty(),
            beta.new_empty(neurons) if (need_alpha and alpha is not None and exact) else empty(),
            initial_v.new_empty(batch, neurons) if need_initial_v else empty(),
            initial_v.new_empty(batch, neurons) if (need_initial_syn and alpha is not None) else empty())
