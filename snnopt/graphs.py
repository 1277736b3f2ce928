"""CUDA-graph capture of a training step's snnopt Triton layers: one replay per forward and backward.

Why: a sparse layer's kernels are tiny (tens of microseconds on an H100/H200 at the seed paper's
sizes), so launched one by one from Python its time is host time, per torch operation and per
Triton launch (run 4 of ``benchmarks/gpu_suite.py`` on an H200: a per-layer sparse backward of
0.7–0.9 ms whatever the layer width). A CUDA graph replays the recorded launches without the host.

What a graph cannot do is read the device: the compact sparse path sizes its lists from the counts
of input events and of active entries (two host reads per forward; the first also brings back
whether the input suits the split bfloat16 GEMM, i.e. is spikes). Under a :class:`CapturePlan` the
Triton op instead

* gives every list a fixed capacity, measured while recording (the largest count seen in the
  warm-up steps times ``headroom``): entries past a list's length are padding (index one past the
  last entry, value zero), which every kernel skips, and a list that would overflow raises a flag
  on the device (``CapturePlan.overflow``) instead of growing;
* takes the GEMM routes and the backward's weight-gradient route recorded in the warm-up, and
  checks on the device that a split GEMM's spike operand is still exact.

:func:`capture_graphs` records a plan on the example inputs, captures the forward and backward
(as ``torch.cuda.make_graphed_callables`` does, but the graphs read private copies of the inputs
and every call hands out fresh outputs and gradients, so no replay overwrites what a caller holds:
a parameter's ``.grad`` accumulates over several backwards as without graphs), and returns a
:class:`GraphedModel`. What the host reads, and when:

* The forward's outputs depend on the spike checks of its split GEMMs' inputs, not on list
  lengths (a GEMM's operand is written whole; the spikes come from the sweep, which the lists only
  record). An input that is an earlier layer's spikes needs no check; one that is an input of the
  step is checked before the replay, and the forward waits for that check only, while the device
  goes on with the replay; any other is checked inside the graph (``CapturePlan.invalid``), and
  that forward waits for its replay. A check that fails runs the step again eagerly.
* Only the backward needs the lists. Their overflow flag is copied to the host after the forward's
  replay without waiting; the backward issues its own replay, then reads it (by then the forward's
  replay has ended, or soon will). Raised, the replayed gradients are dropped and the step is
  recomputed eagerly and differentiated (the same outputs, as above).

So a batch busier than the warm-up, or an input no longer spikes, gets the same outputs and
gradients as without graphs, only slower (``GraphedModel.fallbacks`` counts them; a warning says
so once); several such steps in a row record and capture the model again on the current batch.
And in a training loop the host issues the loss and the backward while the device runs the
replayed forward, so the device does not wait for the host between them. An input of another
shape, dtype or device runs eagerly too (a graph holds one shape), and so does a forward while an
earlier replay's backward is still to come. Tested without a GPU as far as that goes: the static
plan in Triton's interpreter, and the replay protocol with graphs that run eagerly
(tests/codegen/test_capture_plan.py); the capture itself in the ``-m gpu`` tests.

Sparse layers on the per-entry flag path (recurrent, CuBa, zero reset: their lists come from
``torch.nonzero``), and compact layers whose backward needs the dense route (a membrane or state
gradient, an unrestricted input gradient) cannot be captured: recording says which, by
:class:`~snnopt.errors.UnsupportedModelError`. Exact-backward layers need no lists.

Example::

    >>> opt = snnopt.optimize(model, x.cuda(), backend="triton")
    >>> step = snnopt.capture_graphs(opt, (x.cuda(),))
    >>> loss = loss_fn(step(x.cuda()), labels); loss.backward()   # two graph replays
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from snnopt.codegen import spike_matmul, triton_lif
from snnopt.errors import InvalidArgumentError, InvalidTypeError, UnsupportedModelError

# Capacities are rounded up to this many entries: a little headroom for free, and aligned buffers.
CAPACITY_QUANTUM = 1024


@dataclass
class CaptureSite:
    """What one snnopt Triton layer call of the captured step needs to run without reading the device."""

    index: int
    description: str = ""
    events_seen: int = 0          # the largest count of input events seen while recording
    active_seen: int = 0          # the largest count of active entries seen while recording
    events_limit: int = 0         # the most there can be (B·T·F, B·T·N): no capacity above it
    active_limit: int = 0
    events_capacity: Optional[int] = None
    active_capacity: Optional[int] = None
    # The tensor-core route (one of spike_matmul.ROUTES) of the forward GEMM and of the backward's
    # weight-gradient GEMM, False for the float32 product.
    split_linear: Optional[bool | str] = None
    split_weight_grad: Optional[bool | str] = None
    pair_weight_grad: Optional[bool] = None   # the compact backward's weight gradient from event pairs
    # Whether the forward's active entries fit their staging areas in every recorded step: then the
    # captured forward lists them from there (one sweep), else with a second sweep.
    staged: Optional[bool] = None
    uncapturable: list = field(default_factory=list)

    def staging_held(self, held: bool) -> None:
        self.staged = held if self.staged is None else self.staged and held

    def spike_routes(self) -> set:
        """The tensor-core routes the step takes, each relying on the layer input suiting it (checked on the device)."""
        return {route for route in (self.split_linear, self.split_weight_grad) if isinstance(route, str)}


class CapturePlan:
    """The per-layer choices of one model's captured step, in the order its layers run.

    ``recording``: layers run as usual (reading the device) and write down their counts and routes;
    ``static``: they run from the plan, without reading the device, raising :attr:`invalid` where
    the plan does not hold. :meth:`begin` starts a forward (the next layer call is site 0).
    """

    def __init__(self, device: torch.device, headroom: float = 2.0):
        self.headroom = headroom
        self.sites: list[CaptureSite] = []
        self.static = False
        self._cursor = 0
        self.current: Optional[CaptureSite] = None  # the site of the layer call running now
        # Raised where a replayed forward's outputs may be wrong (a split GEMM's input that is not
        # spikes, checked inside the graph): read right after the replay.
        self.invalid = torch.zeros(1, dtype=torch.int32, device=device)
        # Raised where only the backward may be wrong (a list that overflowed its capacity, the weight
        # gradient's spike operand that is not spikes): the forward's outputs do not depend on them,
        # so it is read when the backward replays, long after the forward was issued.
        self.overflow = torch.zeros(1, dtype=torch.int32, device=device)
        # Forward checks of the step's own inputs, done before each replay (GraphedModel): input index
        # -> the routes it feeds. checks_in_graph: some forward check is inside the graph (read after it).
        self.input_checks: dict[int, set] = {}
        self.checks_in_graph = False
        self.on_backward: Optional[Callable[[bool], None]] = None  # told whether a replayed backward overflowed
        self._step_inputs: tuple = ()
        # The spikes the step's snnopt layers output so far (0 and 1 only: every route takes them),
        # held until the next step so that their memory is not another tensor's meanwhile.
        self._spike_outputs: list = []

    def begin(self, inputs: Sequence = ()) -> None:
        self._cursor = 0
        # (with their versions now: one modified in place later in the step no longer holds these values)
        self._step_inputs = tuple((t, t._version) if isinstance(t, Tensor) else (None, None) for t in inputs)
        self._spike_outputs = []
        if self.static:  # recorded into the forward graph: every replay starts clean
            self.invalid.zero_()
            self.overflow.zero_()

    def next_site(self, description: str) -> CaptureSite:
        index = self._cursor
        self._cursor += 1
        if index < len(self.sites):
            return self.sites[index]
        if self.static:
            raise UnsupportedModelError(
                f"capture_graphs: the forward called {index + 1} snnopt layers, {len(self.sites)} while recording; "
                "a captured model must call the same layers in the same order every step")
        site = CaptureSite(index, description)
        self.sites.append(site)
        return site

    def flag(self, condition: Tensor) -> None:
        """Raise :attr:`invalid` where ``condition`` (a bool tensor, any shape) holds anywhere; no host read."""
        torch.bitwise_or(self.invalid, condition.any().reshape(1).to(torch.int32), out=self.invalid)

    def flag_overflow(self, condition: Tensor) -> None:
        """Raise :attr:`overflow` (what only the backward depends on) where ``condition`` holds anywhere."""
        torch.bitwise_or(self.overflow, condition.any().reshape(1).to(torch.int32), out=self.overflow)

    def input_slot(self, x: Tensor) -> Optional[int]:
        """Which of the step's inputs ``x`` is (same storage, place, shape, strides; not modified since), or None."""
        for k, (t, version) in enumerate(self._step_inputs):
            if t is not None and _same_values(t, x) and x._version == version:
                return k
        return None

    def note_spikes(self, spikes: Tensor) -> None:
        """``spikes`` (an snnopt layer's output) holds only 0 and 1: a later layer taking it needs no check."""
        if self.static:
            self._spike_outputs.append((spikes, spikes._version))

    def forget_step(self) -> None:
        self._step_inputs, self._spike_outputs = (), []

    def check_input(self, site: "CaptureSite", x: Tensor, kinds: Optional[Tensor] = None) -> None:
        """Check on the device that a layer input ``x`` suits the tensor-core routes ``site`` recorded.

        ``kinds``: ``[not bfloat16, not int8]`` of x's nonzeros where a launch worked them out already
        (the input events' count); else x is checked here. The
        forward GEMM's route decides the forward's outputs: an earlier layer's spikes need no check;
        for an input of the step itself the check is left to :class:`GraphedModel`, before each replay
        (``input_checks``); otherwise it raises :attr:`invalid` inside the graph. The weight
        gradient's route decides only the backward's: :attr:`overflow`.
        """
        for route, forward in ((site.split_linear, True), (site.split_weight_grad, False)):
            if not isinstance(route, str):
                continue
            if forward:
                if any(_same_values(spikes, x) and x._version == version for spikes, version in self._spike_outputs):
                    continue  # an earlier layer's spikes, as it output them
                slot = self.input_slot(x)
                if slot is not None:
                    self.input_checks.setdefault(slot, set()).add(route)
                    continue
                self.checks_in_graph = True
            if kinds is not None:
                condition = kinds[1 if route in spike_matmul.INT8_ROUTES else 0] != 0
            else:
                condition = _unsuited(x, route)
            if condition is not None:
                (self.flag if forward else self.flag_overflow)(condition)

    def freeze(self) -> None:
        """Capacities from what recording saw; raises if a layer said it cannot run captured."""
        problems = [f"layer {site.index} ({site.description}): {reason}"
                    for site in self.sites for reason in site.uncapturable]
        if problems:
            raise UnsupportedModelError("capture_graphs: " + "; ".join(dict.fromkeys(problems)))
        for site in self.sites:
            site.events_capacity = _capacity(site.events_seen, self.headroom, site.events_limit)
            site.active_capacity = _capacity(site.active_seen, self.headroom, site.active_limit)
        self.static = True

    def summary(self) -> list[dict]:
        return [{"layer": site.index, "what": site.description,
                 "active_seen": site.active_seen, "active_capacity": site.active_capacity,
                 "events_seen": site.events_seen, "events_capacity": site.events_capacity,
                 "split_linear": site.split_linear, "split_weight_grad": site.split_weight_grad,
                 "pair_weight_grad": site.pair_weight_grad, "staged": site.staged} for site in self.sites]


def _same_values(t: Tensor, x: Tensor) -> bool:
    # The same tensor, or a view of the same memory laid out alike (views share their base's version
    # counter: the callers compare it with the one noted when ``t`` was seen).
    return t is x or (t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.stride() == x.stride()
                      and t.dtype == x.dtype and t.device == x.device)


def _unsuited(values: Tensor, route: str) -> Optional[Tensor]:
    """Where ``values`` do not suit ``route`` (see spike_matmul.spike_kind): not a bfloat16 value for the
    bfloat16 route, not an integer in [-128, 127] for the int8 routes; None where every value does."""
    if not values.numel():
        return None
    if route in spike_matmul.INT8_ROUTES:
        if values.dtype == torch.int8:
            return None
        return ~((values == values.round()) & (values >= -128) & (values <= 127))
    if values.dtype == torch.bfloat16:
        return None
    return values.to(torch.bfloat16).to(values.dtype) != values


def _capacity(seen: int, headroom: float, limit: int) -> int:
    wanted = math.ceil(seen * headroom)
    wanted = -(-max(wanted, 1) // CAPACITY_QUANTUM) * CAPACITY_QUANTUM
    return max(1, min(wanted, limit)) if limit else wanted


_PLAN: contextvars.ContextVar[Optional[CapturePlan]] = contextvars.ContextVar("snnopt_capture_plan", default=None)


def active_plan() -> Optional[CapturePlan]:
    """The plan the running step follows, or None (plain eager execution)."""
    return _PLAN.get()


@contextlib.contextmanager
def following(plan: CapturePlan):
    """Run snnopt layers under ``plan`` (recording or static) inside the block."""
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


class _PlannedStep(nn.Module):
    """The user's model or function, each call starting a plan's forward (site 0)."""

    def __init__(self, model: Callable, plan: CapturePlan):
        super().__init__()
        self.model = model
        self.plan = plan

    def forward(self, *inputs):
        self.plan.begin(inputs)
        return self.model(*inputs)


class GraphedModel(nn.Module):
    """A model whose forward and backward replay CUDA graphs (see :func:`capture_graphs`).

    A replay reuses the same buffers, so a step's backward must run before the next replayed
    forward, as in a training loop. While an earlier replay's output is still alive and its
    backward has not run, a forward runs eagerly instead (counted in ``overlapping``): gradient
    accumulation over several forwards stays correct, only slower.

    ``fallbacks`` counts the steps that exceeded the plan and ran eagerly: the forward, where an
    input of a split GEMM was not spikes (its outputs would have been wrong), or only the backward,
    where a list overflowed (the replayed forward's outputs do not depend on list lengths; its
    backward then recomputes the step eagerly and differentiates that). Activity moves as a network
    trains: after ``recapture_after`` such steps in a row the model is recorded again on the current
    inputs and captured anew (``recaptures`` counts it; 0 turns it off). ``other_inputs`` counts
    calls with inputs unlike the captured ones (or after a switch between ``train()`` and
    ``eval()``), run eagerly; so do calls after ``torch.use_deterministic_algorithms`` changed since
    the capture (the captured routes were chosen under the setting of then). ``plan.summary()``
    lists each layer's capacities and routes.

    Host reads: a forward waits only for its inputs' spike check, which runs before the replay
    (where a split GEMM's input is an input of the step), or for the whole replay (where the check
    is inside the graph); a backward waits for its forward's replay to end (the lists' overflow
    flag), after issuing its own. Either way the host goes on issuing the step while the device runs
    the replayed forward, instead of leaving the device idle from the forward's end to the
    backward's first kernel. ``wait_for_replay``: every forward waits for its replay and reads
    every flag then, the overflow included, running the whole step eagerly where one was raised
    (as before; kept to compare the two).
    """

    def __init__(self, model: Callable, capture: Callable[[tuple], tuple], example_inputs: Sequence[Tensor],
                 recapture_after: int = 3, wait_for_replay: bool = False):
        super().__init__()
        self.model = model
        self._capture = capture  # inputs -> (graphed callable, plan): records, then captures
        self.recapture_after = recapture_after
        self.wait_for_replay = wait_for_replay
        self._signature = [_signature(t) for t in example_inputs]
        self._captured_training = _training(model)
        self.fallbacks = 0
        self.recaptures = 0
        self.other_inputs = 0
        self.overlapping = 0
        self._streak = 0  # steps in a row that exceeded the plan
        self._verdict_pending = False  # a replayed forward whose backward has not said whether its lists held
        self._warned = False
        self._pending: list = []  # weak references to the outputs of a replay whose backward has not run
        self._install(*capture(tuple(example_inputs)))

    def _install(self, graphed: Callable, plan: CapturePlan) -> None:
        self._graphed = graphed
        self.plan = plan
        # (weakly: the plan lives in the graphs' closures, which must not keep this module alive)
        outcome = weakref.WeakMethod(self._backward_outcome)
        plan.on_backward = lambda overflowed: (lambda method: method and method(overflowed))(outcome())
        # The graphs read the parameters where they were at capture: replaced ones (not updated in
        # place, as optimisers and load_state_dict do) mean capturing again.
        self._param_places = _param_places(self.model)
        # Routes were chosen under this setting (no atomic sums under deterministic algorithms).
        self._captured_deterministic = torch.are_deterministic_algorithms_enabled()

    def forward(self, *inputs):
        if len(inputs) != len(self._signature) or any(
                _signature(t) != s for t, s in zip(inputs, self._signature)) or (
                _training(self.model) != self._captured_training  # e.g. .eval(): not what was captured
                or torch.are_deterministic_algorithms_enabled() != self._captured_deterministic):
            self.other_inputs += 1
            return self.model(*inputs)
        if any(ref() is not None for ref in self._pending):
            self.overlapping += 1  # replaying now would overwrite what that backward reads
            return self.model(*inputs)
        self._pending = []
        if self._verdict_pending:  # the last replay had no backward: a step within the plan
            self._verdict_pending = False
            self._streak = 0
        with _launch_device(inputs):  # graphs and captures on the inputs' GPU, whichever is current
            if _param_places(self.model) != self._param_places:
                self._recapture(inputs)
            elif self.recapture_after and self._streak >= self.recapture_after:  # backwards that overflowed
                self._recapture(inputs)
            # Issued before the replay, and waited for alone. (It may copy the inputs it checks into the
            # graphs' own: the replay then does not.)
            checked, copied = _check_step_inputs(self.plan, inputs, getattr(self._graphed, "static_inputs", ()))
            out = self._graphed(*inputs, copied=copied) if copied else self._graphed(*inputs)
            unsuited = checked is not None and bool(checked.value().any())
            if self.wait_for_replay:  # every flag, overflow included, after the replay (before stop 19)
                unsuited = unsuited or bool((self.plan.invalid | self.plan.overflow).item())
            elif not unsuited and self.plan.checks_in_graph:
                unsuited = bool(self.plan.invalid.item())  # waits for the replay
            if unsuited:
                return self._fall_back(inputs)
        self._verdict_pending = True
        self._await_backward(out)
        return out

    def _recapture(self, inputs) -> None:
        self._install(*self._capture(tuple(inputs)))
        self.recaptures += 1
        self._streak = 0

    def _exceeded(self) -> None:
        self.fallbacks += 1
        self._streak += 1
        if not self._warned:
            self._warned = True
            warnings.warn("snnopt.capture_graphs: a step exceeded the captured plan (more active entries or input "
                          "events than its lists hold: its backward; or an input that is no longer spikes: its "
                          "forward) and ran eagerly, with the same results"
                          + (f"; after {self.recapture_after} such steps in a row the model is captured again"
                             if self.recapture_after else "")
                          + " (GraphedModel.fallbacks, .recaptures)", RuntimeWarning, stacklevel=4)

    def _backward_outcome(self, overflowed: bool) -> None:
        # Told by the replayed backward (on autograd's thread, while the caller waits in backward()).
        self._verdict_pending = False
        if overflowed:
            self._exceeded()  # recaptured at the next forward, outside autograd, if it keeps happening
        else:
            self._streak = 0

    def _fall_back(self, inputs):
        self._exceeded()
        out = self.model(*inputs)  # this step, eagerly: the same results
        if self.recapture_after and self._streak >= self.recapture_after:
            self._recapture(inputs)
        return out

    def _await_backward(self, out) -> None:
        # Until a gradient reaches one of the outputs (the replayed backward follows), or they are gone.
        tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and t.requires_grad]
        refs = [weakref.ref(t) for t in tensors]

        def backward_started(grad):
            if self._pending is refs:
                self._pending = []
            return grad
        for t in tensors:
            t.register_hook(backward_started)
        self._pending = refs


def _launch_device(inputs):
    return triton_lif.launch_device(inputs[0]) if inputs and isinstance(inputs[0], Tensor) else contextlib.nullcontext()


class _HostRead:
    """A small device tensor copied to the host without waiting now: :meth:`value` waits only for the work
    issued before the copy (pinned memory and an event on CUDA; elsewhere the values are there already)."""

    def __init__(self, tensor: Tensor):
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = tensor.clone(), None

    def value(self) -> Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host


def _check_step_inputs(plan: CapturePlan, inputs, static_inputs: Sequence[Tensor] = ()
                       ) -> tuple[Optional[_HostRead], frozenset]:
    """The spike check of the step inputs that feed split GEMMs (``plan.input_checks``), on its way to the host
    (nonzero entries where an input does not suit a route it feeds), and the inputs it copied.

    Where the graphs' own copy of an input (``static_inputs``) is laid out as the input, one pass
    copies it there and checks it (the replay then skips that copy); else the check reads it alone.
    """
    if not plan.input_checks:
        return None, frozenset()
    flags, copied = [], set()
    for slot, routes in sorted(plan.input_checks.items()):
        given = inputs[slot]
        static = static_inputs[slot] if slot < len(static_inputs) else None
        if (static is not None and static.data_ptr() != given.data_ptr() and static.shape == given.shape
                and static.dtype == given.dtype and given.is_floating_point() and given.is_contiguous()
                and static.is_contiguous()):
            kinds = triton_lif.spike_check(given.detach(), copy_into=static.detach())
            copied.add(slot)
        else:
            kinds = triton_lif.spike_check(given)  # [not bfloat16, not int8] of its nonzeros
        for index in sorted({1 if route in spike_matmul.INT8_ROUTES else 0 for route in routes}):
            flags.append(kinds[index:index + 1])
    return _HostRead(flags[0] if len(flags) == 1 else torch.cat(flags)), frozenset(copied)


def _param_places(model) -> tuple:
    return tuple(p.data_ptr() for p in model.parameters()) if isinstance(model, nn.Module) else ()


def _training(model) -> bool:
    return model.training if isinstance(model, nn.Module) else True


def _signature(t) -> tuple:
    if not isinstance(t, Tensor):
        return (type(t),)
    return (tuple(t.shape), t.dtype, t.device, t.requires_grad, t.stride())


def capture_graphs(model: Callable, example_inputs: Sequence[Tensor], *, headroom: float = 2.0,
                   warmup_steps: int = 3, recapture_after: int = 3, wait_for_replay: bool = False) -> GraphedModel:
    """Capture ``model``'s forward and backward on ``example_inputs`` as CUDA graphs; see the module docstring.

    ``model``: an ``nn.Module`` (an :func:`snnopt.optimize` result, or one built from ``snnopt.nn``
    on the Triton backend) or a function of tensors; ``example_inputs``: CUDA tensors shaped as
    every later call's. ``headroom``: each list's capacity over the most entries seen in
    ``warmup_steps`` recorded steps. ``recapture_after``: record and capture again after that
    many steps in a row exceeded the plan (0: never). ``wait_for_replay``: each forward waits for its
    replay and checks every flag then (see :class:`GraphedModel`; by default only the backward
    waits for the forward's replay). Recording and capturing run the forward and backward several
    times: parameter gradients are computed, not accumulated, but a module's own state
    (BatchNorm's running statistics, say) moves as in any step.
    """
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InvalidTypeError("example_inputs: expected a non-empty tuple of tensors")
    for k, t in enumerate(example_inputs):
        if not isinstance(t, Tensor):
            raise InvalidTypeError(f"example_inputs[{k}]: expected a tensor, got {type(t).__name__}")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not headroom >= 1.0:
        raise InvalidArgumentError(f"headroom: expected a number >= 1, got {headroom!r}")
    for name, value, least in (("warmup_steps", warmup_steps, 1), ("recapture_after", recapture_after, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidArgumentError(f"{name}: expected an int >= {least}, got {value!r}")
    if not isinstance(wait_for_replay, bool):
        raise InvalidTypeError(f"wait_for_replay: expected True or False, got {wait_for_replay!r}")
    for k, t in enumerate(example_inputs):
        if t.device.type != "cuda":
            raise InvalidArgumentError(f"example_inputs[{k}]: CUDA graphs need CUDA tensors, got one on {t.device}; "
                                       "move the model and inputs to a GPU, or run without capture_graphs")
    capture = functools.partial(_record_and_capture, model, headroom=float(headroom), warmup_steps=warmup_steps)
    with _launch_device(example_inputs):
        return GraphedModel(model, capture, example_inputs, recapture_after, wait_for_replay)


def _record_and_capture(model: Callable, inputs: tuple, *, headroom: float, warmup_steps: int):
    """A plan recorded over ``warmup_steps`` eager steps on ``inputs``, and the graphs captured under it."""
    plan = CapturePlan(inputs[0].device, headroom)
    step = _PlannedStep(model, plan)
    with following(plan):
        for _ in range(warmup_steps):
            _record_step(step, inputs)
    plan.freeze()
    try:
        with following(plan):
            graphed = _capture(step, inputs)
    except RuntimeError as error:  # CUDA's refusal of something in the step, as torch reports it
        raise UnsupportedModelError(f"capture_graphs: capturing the step failed ({error}); run the model without "
                                    "capture_graphs") from error
    finally:
        plan.forget_step()  # (the captured step's inputs and spikes: the graphs keep what they need)
    return graphed, plan


CAPTURE_WARMUPS = 2  # static-plan steps on a side stream before capturing (kernels compiled, libraries set up)


def _capture(step: "_PlannedStep", example_inputs: tuple) -> Callable:
    """``step``'s forward and backward as two CUDA graphs, behind an autograd function that replays them.

    As ``torch.cuda.make_graphed_callables`` does (warm-up on a side stream, forward then backward
    captured into one memory pool, the backward by ``torch.autograd.grad``), with three
    differences that keep eager semantics: the graphs read private copies of the inputs (the
    caller's example tensors are never written); each call returns fresh outputs and the backward
    fresh gradients (copied out of the graphs' buffers, one operation each), so nothing handed out
    is overwritten by the next replay (with the graphs' own buffers, a parameter's ``.grad`` would
    be one, and a second backward before ``zero_grad`` would overwrite the first's gradient instead
    of adding to it); and a backward whose lists overflowed is recomputed eagerly (:func:`_replayer`).
    """
    params = tuple(step.parameters())
    static_inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in example_inputs)
    surface = static_inputs + params  # what the step reads and may differentiate
    wants_grad = [t.requires_grad for t in surface]
    grad_surface = [t for t in surface if t.requires_grad]

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUPS):
            _record_step(step, static_inputs)  # (under a static plan it records nothing)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    pool = torch.cuda.graph_pool_handle()
    forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(forward_graph, pool=pool):
        captured_out = step(*static_inputs)
    static_outputs, spec = pytree.tree_flatten(captured_out)
    if not all(isinstance(o, Tensor) for o in static_outputs):
        raise UnsupportedModelError("capture_graphs: the model must return tensors (or tuples, lists, dicts of them)")
    differentiable = [k for k, o in enumerate(static_outputs) if o.requires_grad]
    static_grad_outputs = [torch.empty_like(static_outputs[k]) for k in differentiable]
    static_grads: list = [None] * len(surface)
    if differentiable and grad_surface:
        with torch.cuda.graph(backward_graph, pool=pool):
            grads = torch.autograd.grad([static_outputs[k] for k in differentiable], grad_surface,
                                        grad_outputs=static_grad_outputs, allow_unused=True)
        it = iter(grads)
        static_grads = [next(it) if wanted else None for wanted in wants_grad]
    # The captured step's autograd graph is spent (its backward is backward_graph): let it go. Kept
    # alive through the outputs, it would keep each parameter's AccumulateGrad node as created, on
    # the capture's side stream, and every later backward into ``.grad`` (replayed or an eager
    # fallback) would be synchronised onto that stream, with torch warning each time that the
    # "AccumulateGrad node's stream does not match".
    static_outputs = [o.detach() for o in static_outputs]
    del captured_out
    return _replayer(_Captured(static_inputs, params, static_outputs, spec, differentiable, static_grad_outputs,
                               static_grads, forward_graph, backward_graph), step.model, step.plan)


@dataclass
class _Captured:
    """A captured step: its two graphs (anything with ``replay()``) and the buffers they read and write."""

    static_inputs: tuple           # the forward graph reads the step's inputs here
    params: tuple                  # and the parameters where they are
    static_outputs: list           # it writes the outputs here (flattened; unflattened with ``spec``)
    spec: object
    differentiable: list           # which outputs have gradients
    static_grad_outputs: list      # the backward graph reads their gradients here
    static_grads: list             # and writes dL/d(input or parameter) here (None: not wanted)
    forward_graph: object
    backward_graph: object


def _replayer(captured: _Captured, model: Callable, plan: CapturePlan) -> Callable:
    """The callable that replays ``captured`` as one autograd function (the graphed step).

    Forward: the inputs copied into the graph's (where they are not those already, and the caller
    did not copy them on its way: ``copied``), one replay, fresh outputs, and the lists' overflow
    flag on its way to the host. Backward: the gradients copied in, one replay, fresh gradients,
    then the flag (the forward's replay has ended by then, or soon will: the host waits for it,
    not for this backward's work). Where a list overflowed the replayed gradients are dropped:
    ``model`` runs the step again eagerly on the same inputs (its outputs are the replay's: they do
    not depend on list lengths) and is differentiated instead. ``plan.on_backward`` is told which.
    """
    static_inputs, params = captured.static_inputs, captured.params
    differentiable = captured.differentiable
    n_inputs = len(static_inputs)
    fresh_grad_slots = [k for k, g in enumerate(captured.static_grads) if g is not None]
    copied_by_caller: list = [frozenset()]  # inputs the caller has copied into static_inputs for this call

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            for k, (static, given) in enumerate(zip(static_inputs, args[:n_inputs])):
                if k not in copied_by_caller[0] and static.data_ptr() != given.data_ptr():
                    static.copy_(given)
            captured.forward_graph.replay()
            fresh = tuple(o.clone() for o in captured.static_outputs)  # the next replay rewrites the graph's own
            ctx.mark_non_differentiable(*(o for k, o in enumerate(fresh) if k not in differentiable))
            ctx.overflow = _HostRead(plan.overflow)
            ctx.save_for_backward(*args[:n_inputs])  # (only an overflowed backward reads them again)
            return fresh

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            for static, k in zip(captured.static_grad_outputs, differentiable):
                if static.data_ptr() != grads[k].data_ptr():
                    static.copy_(grads[k])
            captured.backward_graph.replay()
            out: list = [None] * (n_inputs + len(params))
            if fresh_grad_slots:  # one operation for all of them: copies outside the graph's buffers
                copies = torch._foreach_mul([captured.static_grads[k] for k in fresh_grad_slots], 1.0)
                for k, copy in zip(fresh_grad_slots, copies):
                    out[k] = copy
            overflowed = bool(ctx.overflow.value().any())
            if plan.on_backward is not None:
                plan.on_backward(overflowed)
            if overflowed:
                return _eager_gradients(model, ctx.saved_tensors, params, differentiable, grads, fresh_grad_slots)
            return tuple(out)

    def replay(*inputs, copied: frozenset = frozenset()):
        """``copied``: indices of inputs already copied into ``replay.static_inputs`` for this call."""
        copied_by_caller[0] = copied
        try:
            flat = Replay.apply(*inputs, *params)
        finally:
            copied_by_caller[0] = frozenset()
        return pytree.tree_unflatten(list(flat), captured.spec)

    replay.static_inputs = static_inputs
    return replay


def _eager_gradients(model: Callable, inputs: Sequence[Tensor], params: tuple, differentiable: list, grads: tuple,
                     wanted: list) -> tuple:
    """The step run again eagerly on ``inputs`` and differentiated: gradients for the surface slots in ``wanted``
    (inputs, then ``params``), None elsewhere."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        outputs = pytree.tree_leaves(model(*leaves))
        surface = leaves + list(params)
        computed = torch.autograd.grad([outputs[k] for k in differentiable], [surface[k] for k in wanted],
                                       grad_outputs=[grads[k] for k in differentiable], allow_unused=True)
    out: list = [None] * len(surface)
    for k, grad in zip(wanted, computed):
        out[k] = grad
    return tuple(out)


def _record_step(step: nn.Module, inputs: tuple) -> None:
    """One forward and backward (of ones): under a recording plan they write down counts and routes.

    Gradients are computed, not accumulated into ``.grad``.
    """
    outputs = step(*inputs)
    outputs = [outputs] if isinstance(outputs, Tensor) else [o for o in pytree.tree_leaves(outputs)
                                                               if isinstance(o, Tensor)]
    differentiable = [o for o in outputs if o.requires_grad]
    wrt = [p for p in step.parameters() if p.requires_grad] + [t for t in inputs if t.requires_grad]
    if differentiable and wrt:
        torch.autograd.grad(differentiable, wrt, grad_outputs=[torch.ones_like(o) for o in differentiable],
                            allow_unused=True)
