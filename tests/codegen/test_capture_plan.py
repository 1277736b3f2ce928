"""CUDA-graph capture plans (snnopt.graphs) on the Triton op: in Triton's interpreter, or compiled on a GPU.

A static plan must give the same outputs and gradients as plain eager execution, read nothing from
the device (what a CUDA graph cannot do), and raise its flag where a list would overflow or a split
GEMM's input is not spikes. The capture itself needs a GPU (tests/codegen/test_graphs_gpu.py).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import snnopt  # noqa: E402
import snnopt.functional as SF  # noqa: E402
from snnopt import graphs  # noqa: E402
from snnopt.codegen import spike_matmul, triton_lif  # noqa: E402
from snnopt.errors import InvalidArgumentError, InvalidTypeError, UnsupportedModelError  # noqa: E402

# Ways a value comes back from the device to the host (a sync on CUDA; refused while capturing).
# Custom ops reach a TorchDispatchMode whole, so the Python entry points are watched instead.
_TENSOR_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "any", "all")
_TORCH_READS = ("equal", "nonzero")


class DeviceReads:
    """Records every host read of a tensor's values inside the block (what a CUDA graph cannot do)."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.seen, self.inside = monkeypatch, [], False

    def _watch(self, owner, name):
        real = getattr(owner, name)

        def watched(*args, **kwargs):
            result = real(*args, **kwargs)
            # any()/all() return tensors (no read); they count only when their result is read.
            if self.inside and name not in ("any", "all"):
                self.seen.append(name)
            return result
        self.monkeypatch.setattr(owner, name, watched)

    def __enter__(self):
        for name in _TENSOR_READS:
            self._watch(torch.Tensor, name)
        for name in _TORCH_READS:
            self._watch(torch, name)
        self.inside = True
        return self

    def __exit__(self, *exc):
        self.inside = False
        self.monkeypatch.undo()


def _network(x, w1, w2, w3):
    """The seed paper's network in small: two sparse LIF layers and an exact leaky readout."""
    h1 = SF.linear_lif(x, w1, beta=0.9, window=0.5, backend="triton")
    h2 = SF.linear_lif(h1, w2, beta=0.85, window=0.5, backend="triton")
    return SF.linear_leaky_integrator(h2, w3, beta=0.9, input_scale=0.1, backend="triton")


# The compiled kernels where a GPU is present (conftest.py turns the interpreter on only without one).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _problem(rate=0.3, seed=0, dtype=torch.float32, features=12):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, 8, features, generator=gen) < rate).to(DEVICE, dtype)
    w1 = ((torch.rand(10, features, generator=gen) - 0.2) * 0.9).to(DEVICE, dtype).requires_grad_()
    w2 = ((torch.rand(9, 10, generator=gen) - 0.2) * 1.2).to(DEVICE, dtype).requires_grad_()
    w3 = (torch.rand(4, 9, generator=gen) - 0.5).to(DEVICE, dtype).requires_grad_()
    return x, w1, w2, w3


def _step(fn, inputs):
    x, *weights = inputs
    out = fn(x, *weights)
    upstream = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return [out.detach()] + list(torch.autograd.grad((out * upstream).sum(), weights))


def _recorded_plan(inputs, headroom=2.0, network=_network):
    plan = graphs.CapturePlan(DEVICE, headroom)
    step = graphs._PlannedStep(network, plan)
    with graphs.following(plan):
        graphs._record_step(step, tuple(inputs))
    plan.freeze()
    return plan, step


def _static_step(plan, step, inputs):
    with graphs.following(plan):
        return _step(step, inputs)


@pytest.mark.parametrize("pairs", [True, False], ids=["event_pairs", "dense_weight_route"])
def test_static_plan_matches_eager(pairs, monkeypatch):
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: pairs)
    inputs = _problem()
    expected = _step(_network, inputs)
    plan, step = _recorded_plan(inputs)
    assert [s.pair_weight_grad for s in plan.sites[:2]] == [pairs, pairs]
    assert all(s.active_seen > 0 for s in plan.sites[:2]), "the layers need active entries for this test"
    assert plan.sites[0].events_capacity >= plan.sites[0].events_seen
    got = _static_step(plan, step, inputs)
    assert int(plan.invalid) == 0
    for name, a, b in zip(("output", "dW1", "dW2", "dW3"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# A later input each route cannot take: real values for the split bfloat16 route, graded spikes
# (bfloat16 values, not integers) for the int8 one.
_UNSUITED_SCALE = {spike_matmul.BFLOAT16: 0.3, spike_matmul.INT8: 0.5}


def _scaled_input_network(x, w1, w2, w3):
    """_network on an input computed inside the step (not one of its inputs): checked inside the graph."""
    return _network(x * 1.0, w1, w2, w3)


def _modified_input_network(x, w1, w2, w3):
    """_network on a step input modified in place first: the same memory, other values than the replay's copy
    had when it was checked, so checked inside the graph too."""
    return _network(x.mul_(1.0), w1, w2, w3)


@pytest.mark.parametrize("checked", ["before_replay", "in_graph", "in_graph_modified_input"])
@pytest.mark.parametrize("route", [spike_matmul.BFLOAT16, spike_matmul.INT8])
def test_static_plan_on_the_tensor_core_gemm_routes(route, checked, monkeypatch):
    # The tensor-core GEMMs forced at a tiny size (as on a GPU for large layers): the routes come
    # from the recording, and the static step checks on the device that the spikes suit them: the
    # forward GEMM's input before each replay where it is an input of the step, else inside the graph
    # (invalid: the replay's outputs are wrong); the weight gradient's inside the graph (overflow: only
    # the backward is).
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: False)
    monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: other.dtype == torch.float32)
    network = {"before_replay": _network, "in_graph": _scaled_input_network,
               "in_graph_modified_input": _modified_input_network}[checked]
    # 16 input features: on CUDA torch._int_mm takes only contractions that are multiples of 8
    # (spike_matmul.int8_fits); layer 1's product (24 x 16)·(16 x 10) fits.
    inputs = _problem(seed=3, features=16)
    with spike_matmul.prefer(route):
        expected = _step(network, inputs)
        plan, step = _recorded_plan(inputs, network=network)
        # The weight gradient takes the bfloat16 route whatever the preference (spike_matmul.route_for).
        assert (plan.sites[0].split_linear, plan.sites[0].split_weight_grad) == (route, spike_matmul.BFLOAT16)
        assert plan.sites[0].spike_routes() == {route, spike_matmul.BFLOAT16}
        with DeviceReads(pytest.MonkeyPatch()) as static_reads:
            got = _static_step(plan, step, inputs)
        assert static_reads.seen == []
        assert (int(plan.invalid), int(plan.overflow)) == (0, 0)
        before_replay = checked == "before_replay"
        assert plan.input_checks == ({0: {route}} if before_replay else {})
        assert plan.checks_in_graph is not before_replay
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        x, *weights = inputs
        unsuited = [x * _UNSUITED_SCALE[route]] + weights
        assert not graphs._check_step_inputs(plan, inputs)[0].value().any() if before_replay else True
        _static_step(plan, step, unsuited)
        if before_replay:
            assert graphs._check_step_inputs(plan, unsuited)[0].value().any()
            assert int(plan.invalid) == 0
        else:
            assert int(plan.invalid) == 1
        # Only real values fail the weight gradient's bfloat16 route (graded spikes are bfloat16 values).
        assert int(plan.overflow) == (route == spike_matmul.BFLOAT16)


def test_spike_check_answers_both_questions():
    # [not bfloat16, not int8] of the nonzero entries, as the counting launch of the input events.
    spikes = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], device=DEVICE)
    for values, expected in ((spikes, [0, 0]), (spikes * 0.5, [0, 1]), (spikes * 200.0, [0, 1]),
                             (spikes * 0.3, [1, 1]), (spikes * -3.0, [0, 0]), (torch.zeros(0, 4), [0, 0])):
        assert triton_lif.spike_check(values.to(DEVICE)).tolist() == expected, values
    assert triton_lif.spike_check(torch.tensor([1, 257], device=DEVICE)).tolist() == [1, 1]  # 257: not bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spike_check_copies_and_checks_in_one_pass(dtype):
    gen = torch.Generator().manual_seed(9)
    x = (torch.rand(3, 7, 37, generator=gen) < 0.4).to(dtype)
    for values, expected in ((x, [0, 0]), (x * 0.5, [0, 1]), (x * 0.3, [1, 1] if dtype == torch.float32 else [0, 1])):
        values = values.to(DEVICE)
        out = torch.full_like(values, 7.0)
        assert triton_lif.spike_check(values, copy_into=out).tolist() == expected
        assert torch.equal(out, values)
        assert triton_lif.spike_check(values).tolist() == expected
    with pytest.raises(ValueError, match="copy_into"):
        triton_lif.spike_check(x.to(DEVICE), copy_into=torch.empty(3, 7, 36, dtype=dtype, device=DEVICE))


def test_recorded_route_is_the_one_every_recorded_step_could_take():
    from snnopt.triton_ops import _common_route

    assert _common_route(spike_matmul.INT8, spike_matmul.INT8) == spike_matmul.INT8
    assert _common_route(spike_matmul.INT8, spike_matmul.BFLOAT16) == spike_matmul.BFLOAT16
    assert _common_route(spike_matmul.BFLOAT16, spike_matmul.INT8) == spike_matmul.BFLOAT16
    assert _common_route(spike_matmul.INT8, False) is False and _common_route(False, spike_matmul.INT8) is False
    assert _common_route(True, True) is True and _common_route(True, False) is False


def test_static_plan_reads_nothing_from_the_device(monkeypatch):
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    inputs = _problem(seed=1)
    with DeviceReads(pytest.MonkeyPatch()) as eager_reads:
        _step(_network, inputs)
    # Without a plan each sparse layer's forward reads two list lengths (the input events', the
    # active entries'), and its backward nothing.
    assert eager_reads.seen == ["__int__", "tolist"] * 2, eager_reads.seen
    plan, step = _recorded_plan(inputs)
    with DeviceReads(pytest.MonkeyPatch()) as static_reads:
        _static_step(plan, step, inputs)
    assert static_reads.seen == []


def test_static_plan_flags_a_list_that_would_overflow(monkeypatch):
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    monkeypatch.setattr(graphs, "CAPACITY_QUANTUM", 1)  # capacities as recorded, not rounded up to 1024
    quiet = _problem(rate=0.15, seed=2)
    plan, step = _recorded_plan(quiet, headroom=1.0)
    _static_step(plan, step, quiet)
    assert (int(plan.invalid), int(plan.overflow)) == (0, 0)
    x, *weights = quiet
    busy = (torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.6).to(DEVICE, x.dtype)
    assert busy.count_nonzero() > plan.sites[0].events_capacity
    output = _static_step(plan, step, [busy] + weights)[0]
    # Only the backward needs the lists: the forward's outputs stay right, and say nothing is wrong.
    assert (int(plan.invalid), int(plan.overflow)) == (0, 1)
    torch.testing.assert_close(output, _step(_network, [busy] + weights)[0], rtol=1e-5, atol=1e-6)
    _static_step(plan, step, quiet)  # each forward starts clean
    assert int(plan.overflow) == 0


def test_static_plan_lists_active_entries_from_staging_where_it_held(monkeypatch):
    # Staging that held in every recorded step: the captured forward lists the active entries from
    # the staging areas (one sweep) and flags an area that overflows later; staging that overflowed
    # while recording: the second sweep, which needs no flag.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    inputs = _problem(seed=4)
    expected = _step(_network, inputs)
    gathers = []
    real = triton_lif._compact_active
    monkeypatch.setattr(triton_lif, "_compact_active",
                        lambda *a, **k: (gathers.append(a[5].capacity > 0), real(*a, **k))[1])  # a[5]: the staging
    monkeypatch.setattr(triton_lif, "STAGE_FRACTION", 1.0)  # room for every entry
    plan, step = _recorded_plan(inputs)
    assert [s.staged for s in plan.sites[:2]] == [True, True]
    gathers.clear()
    got = _static_step(plan, step, inputs)
    assert gathers == [True, True] and int(plan.overflow) == 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(triton_lif, "STAGE_FRACTION", 1e-9)  # one step's lanes per program: too small now
    output = _static_step(plan, step, inputs)[0]
    assert (int(plan.invalid), int(plan.overflow)) == (0, 1)
    torch.testing.assert_close(output, expected[0], rtol=1e-5, atol=1e-6)  # the spikes do not need the lists
    plan, step = _recorded_plan(inputs)  # recorded with that small area: layer 1's overflowed
    assert plan.sites[0].staged is False
    gathers.clear()
    got = _static_step(plan, step, inputs)
    assert gathers == [False, plan.sites[1].staged] and int(plan.overflow) == 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_lists_give_the_same_gradients_as_exact_length_lists(monkeypatch):
    # Capacities far above the counts: most of each list is padding, which every kernel must skip.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    inputs = _problem(rate=0.2, seed=6)
    expected = _step(_network, inputs)
    plan, step = _recorded_plan(inputs, headroom=50.0)
    assert plan.sites[1].active_capacity > 2 * plan.sites[1].active_seen
    got = _static_step(plan, step, inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_uncapturable_layer_is_named_when_recording():
    x, w1, _, _ = _problem()
    recurrent = (torch.rand(10, 10) * 0.1).to(DEVICE).requires_grad_()
    plan = graphs.CapturePlan(DEVICE)

    def model(x, w1, recurrent):
        return SF.linear_lif(x, w1, recurrent_weight=recurrent, beta=0.9, backend="triton")

    with graphs.following(plan):
        graphs._record_step(graphs._PlannedStep(model, plan), (x, w1, recurrent))
    with pytest.raises(UnsupportedModelError, match=r"layer 0 .*torch.nonzero.*backward='exact'"):
        plan.freeze()


def test_capture_graphs_rejects_bad_arguments():
    x, w1, w2, w3 = (t.detach().cpu() for t in _problem())
    with pytest.raises(InvalidArgumentError, match=r"example_inputs\[0\]: CUDA graphs need CUDA tensors"):
        snnopt.capture_graphs(_network, (x, w1, w2, w3))
    with pytest.raises(InvalidTypeError, match="example_inputs"):
        snnopt.capture_graphs(_network, x)
    with pytest.raises(InvalidTypeError, match=r"example_inputs\[1\]"):
        snnopt.capture_graphs(_network, (x, "w1"))
    # The other arguments are checked before the device.
    with pytest.raises(InvalidArgumentError, match="headroom: expected a number >= 1"):
        snnopt.capture_graphs(_network, (x,), headroom=0.5)
    with pytest.raises(InvalidArgumentError, match="recapture_after: expected an int >= 0"):
        snnopt.capture_graphs(_network, (x,), recapture_after=-1)
    with pytest.raises(InvalidTypeError, match="wait_for_replay: expected True or False"):
        snnopt.capture_graphs(_network, (x,), wait_for_replay="yes")


class _Replays:
    """Stands in for the captured callable (no GPU here): runs the model and counts the calls."""

    def __init__(self, model, plan, raise_flag):
        self.model, self.plan, self.raise_flag, self.calls = model, plan, raise_flag, 0

    def __call__(self, *inputs):
        self.calls += 1
        self.plan.invalid.zero_()  # as the captured forward does first (CapturePlan.begin)
        out = self.model(*inputs)
        if self.raise_flag(inputs):
            self.plan.invalid.fill_(1)
        return out


class _Captures:
    """Stands in for record-and-capture: a fresh plan and stand-in graphs per capture, all kept."""

    def __init__(self, raise_flag=lambda inputs: False):
        self.raise_flag, self.made = raise_flag, []

    def __call__(self, inputs):
        plan = graphs.CapturePlan(DEVICE)
        plan.static = True
        plan.checks_in_graph = True  # the stand-in's flag says the forward's outputs are wrong: read after it
        self.made.append((inputs, _Replays(_network, plan, self.raise_flag)))
        return self.made[-1][1], plan

    @property
    def calls(self):
        return [replays.calls for _, replays in self.made]


def _graphed_model(raise_flag=lambda inputs: False, recapture_after=3):
    inputs = _problem()
    captures = _Captures(raise_flag)
    return graphs.GraphedModel(_network, captures, inputs, recapture_after), captures, inputs


def test_graphed_model_waits_for_a_replay_s_backward_before_the_next(monkeypatch):
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    model, captures, inputs = _graphed_model()
    first = model(*inputs)
    assert captures.calls == [1]
    second = model(*inputs)  # the first replay's backward has not run and its output is alive: eager
    assert captures.calls == [1] and model.overlapping == 1
    (first.sum() + second.sum()).backward()
    model(*inputs)
    assert captures.calls == [2]
    del first, second
    model(*inputs)  # an output dropped without a backward frees the buffers too
    assert captures.calls == [3] and model.overlapping == 1


def test_graphed_model_runs_eagerly_where_the_plan_did_not_hold(monkeypatch):
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    model, captures, inputs = _graphed_model(raise_flag=lambda inputs: True, recapture_after=0)
    with pytest.warns(RuntimeWarning, match="ran eagerly"):
        out = model(*inputs)
    assert captures.calls == [1] and model.fallbacks == 1
    torch.testing.assert_close(out, _network(*inputs))
    x, *weights = inputs
    model(x[:2], *weights)  # another batch size: no graph for it
    assert captures.calls == [1] and model.other_inputs == 1


def test_graphed_model_runs_eagerly_after_deterministic_algorithms_were_switched(monkeypatch):
    # The captured backward's routes were chosen without deterministic algorithms (atomic pair sums).
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # PyTorch's condition for cuBLAS under them
    model, captures, inputs = _graphed_model()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = model(*inputs)
    finally:
        torch.use_deterministic_algorithms(was)
    assert captures.calls == [0] and model.other_inputs == 1
    torch.testing.assert_close(out, _network(*inputs))
    model(*inputs)
    assert captures.calls == [1] and model.other_inputs == 1


def test_graphed_model_captures_again_after_steps_in_a_row_exceed_the_plan(monkeypatch):
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    x, *weights = _problem()
    busy = (x + 1.0).clamp(max=1.0)  # every input entry spikes
    # The stand-in graphs of the first capture (on x) overflow on busier inputs; a capture on those holds.
    def overflows(inputs):
        return len(captures.made) == 1 and bool(inputs[0].sum() > x.sum())

    model, captures, _ = _graphed_model(raise_flag=overflows, recapture_after=2)
    with pytest.warns(RuntimeWarning, match="captured again"):
        model(busy, *weights)
    assert model.fallbacks == 1 and model.recaptures == 0
    model(x, *weights)  # within the plan: the streak ends
    model(busy, *weights)
    assert model.fallbacks == 2 and model.recaptures == 0
    out = model(busy, *weights)  # second in a row: recorded and captured again on this input
    assert model.fallbacks == 3 and model.recaptures == 1 and len(captures.made) == 2
    assert captures.made[1][0][0] is busy
    torch.testing.assert_close(out, _network(busy, *weights))
    model(busy, *weights)
    assert captures.calls == [4, 1] and model.fallbacks == 3


def test_an_optimized_model_follows_a_static_plan(monkeypatch):
    # What capture_graphs captures for snnopt.optimize's output: the seed network (the zoo's small copy),
    # sparse, on the Triton backend. Under the static plan: the same outputs and gradients, no host reads.
    from tests.compiler import style_models as zoo

    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    case = next(c for c in zoo.STYLE_CASES if c.name == "seed_paper")
    inputs = case.example_inputs()
    inputs = tuple(t.to(DEVICE) for t in (inputs if isinstance(inputs, tuple) else (inputs,)))
    opt = snnopt.optimize(case.build().to(DEVICE), inputs, backward="sparse", backend="triton")
    params = [p for p in opt.parameters() if p.requires_grad]

    def step(model):
        outs = [o for o in torch.utils._pytree.tree_leaves(model(*inputs)) if o.requires_grad]
        loss = sum((o * torch.linspace(-1.0, 1.0, o.numel(), device=o.device).reshape(o.shape)).sum() for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, params))

    expected = step(opt)
    plan = graphs.CapturePlan(DEVICE)
    planned = graphs._PlannedStep(opt, plan)
    with graphs.following(plan):
        graphs._record_step(planned, inputs)
    plan.freeze()
    assert len(plan.sites) == 3 and plan.sites[0].active_seen > 0
    with graphs.following(plan), DeviceReads(pytest.MonkeyPatch()) as reads:
        got = step(planned)
    assert reads.seen == [] and int(plan.invalid) == 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_snnopt_nn_modules_follow_a_static_plan(monkeypatch):
    import snnopt.nn as snn

    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: False)  # the ON layer's weight route
    torch.manual_seed(3)
    model = torch.nn.Sequential(snn.LinearLIF(12, 10, beta=0.9, window=0.5, backend="triton"),
                                snn.LinearLIF(10, 9, bias=False, beta=0.85, window=0.5, backend="triton"),
                                snn.LinearLeakyIntegrator(9, 4, beta=0.9, input_scale=0.1, backend="triton")).to(DEVICE)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model[1].weight.mul_(3.0)
    x = _problem()[0]
    params = list(model.parameters())

    def step(module):
        out = module(x)
        return [out.detach()] + list(torch.autograd.grad(out.amax(1).logsumexp(1).sum(), params))

    expected = step(model)
    plan = graphs.CapturePlan(DEVICE)
    planned = graphs._PlannedStep(model, plan)
    with graphs.following(plan):
        graphs._record_step(planned, (x,))
    plan.freeze()
    assert [s.pair_weight_grad for s in plan.sites[:2]] == [False, False] and plan.sites[1].active_seen > 0
    with graphs.following(plan), DeviceReads(pytest.MonkeyPatch()) as reads:
        got = step(planned)
    assert reads.seen == [] and int(plan.invalid) == 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), steps=st.integers(1, 7), features=st.integers(1, 9), hidden=st.integers(1, 8),
       rate=st.floats(0.0, 0.9), headroom=st.floats(1.0, 40.0), pairs=st.booleans(), seed=st.integers(0, 2**16))
def test_static_plans_keep_results_for_any_shape_activity_and_capacity(batch, steps, features, hidden, rate,
                                                                         headroom, pairs, seed, monkeypatch):
    # Whatever the sizes, the activity (none at all included) and how much of each list is padding:
    # a static plan reproduces eager execution's outputs, and its gradients unless it says a list
    # overflowed.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: pairs)
    monkeypatch.setattr(graphs, "CAPACITY_QUANTUM", 1)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, steps, features, generator=gen) < rate).to(DEVICE)
    ws = [((torch.rand(o, i, generator=gen) - 0.25) * 2.5).to(DEVICE).requires_grad_()
          for o, i in ((hidden, features), (hidden, hidden), (2, hidden))]
    inputs = [x.float()] + ws
    expected = _step(_network, inputs)
    plan, step = _recorded_plan(inputs, headroom=headroom)
    got = _static_step(plan, step, inputs)
    assert (int(plan.invalid), int(plan.overflow)) == (0, 0)  # the recorded input always fits its own plan
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # A different input on the same plan: the same output; the same gradients unless the plan says
    # a list overflowed.
    other = (torch.rand(x.shape, generator=gen) < min(1.0, rate * 1.5 + 0.05)).float().to(DEVICE)
    got = _static_step(plan, step, [other] + ws)
    assert int(plan.invalid) == 0
    expected = _step(_network, [other] + ws)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    if not int(plan.overflow):
        for a, b in zip(got[1:], expected[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_graphed_model_captures_again_when_a_parameter_is_replaced(monkeypatch):
    # Graphs read parameters where they were at capture: updates in place are seen, a new tensor is not.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    x, w1, w2, w3 = _problem()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = (torch.nn.Parameter(w.detach().clone()) for w in (w1, w2, w3))

        def forward(self, x):
            return _network(x, self.w1, self.w2, self.w3)

    net = Net()
    made = []

    def capture(inputs):
        plan = graphs.CapturePlan(DEVICE)
        plan.static = True
        made.append(inputs)
        return net, plan

    model = graphs.GraphedModel(net, capture, (x,), recapture_after=3)
    model(x)
    with torch.no_grad():
        net.w1.mul_(1.5)  # in place: the same graphs
    model(x)
    assert len(made) == 1 and model.recaptures == 0
    net.w2 = torch.nn.Parameter(net.w2.detach() * 0.5)  # a new tensor: captured again
    model(x)
    assert len(made) == 2 and model.recaptures == 1


class _EagerGraph:
    """Stands in for a CUDA graph on any device: ``replay()`` runs again what was captured, into the same buffers."""

    def __init__(self, run):
        self.run, self.replays = run, 0

    def replay(self):
        self.replays += 1
        self.run()


def _eager_captured(network, example, plan, overflows=lambda inputs: False):
    """A graphs._Captured of ``network`` whose graphs run eagerly: the forward raises ``plan.overflow`` where
    ``overflows(inputs)``, and then the backward writes NaN gradients (an overflowed list's are unreliable)."""
    static_inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in example)
    kept = {}

    def forward():
        with torch.enable_grad():
            kept["out"] = network(*static_inputs)
        static_outputs[0].copy_(kept["out"].detach())
        plan.overflow.fill_(int(overflows(static_inputs)))

    def backward():
        wanted = [t for t in static_inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(kept["out"], wanted, static_grad_outputs[0]))
        for static in static_grads:
            if static is not None:
                static.copy_(next(grads))
                if int(plan.overflow):
                    static.fill_(float("nan"))

    with torch.no_grad():
        static_outputs = [network(*static_inputs)]
    static_grad_outputs = [torch.empty_like(static_outputs[0])]
    static_grads = [torch.empty_like(t) if t.requires_grad else None for t in static_inputs]
    return graphs._Captured(static_inputs, (), static_outputs, torch.utils._pytree.tree_flatten(static_outputs[0])[1],
                            [0], static_grad_outputs, static_grads, _EagerGraph(forward), _EagerGraph(backward))


def _eager_captures(made, overflows=lambda capture, inputs: False, input_checks=None):
    """capture_graphs' record-and-capture, stood in by _eager_captured: a fresh plan and graphs per capture,
    each kept in ``made``; ``overflows(k, inputs)`` for the k-th capture's replays."""
    def capture(inputs):
        plan = graphs.CapturePlan(DEVICE)
        plan.static = True
        plan.input_checks = dict(input_checks or {})
        k = len(made)
        made.append(_eager_captured(_network, inputs, plan, overflows=lambda given: overflows(k, given)))
        return graphs._replayer(made[-1], _network, plan), plan
    return capture


@pytest.mark.parametrize("overflowed", [False, True])
def test_replayed_step_hands_out_fresh_results_and_recomputes_an_overflowed_backward(overflowed, monkeypatch):
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    inputs = _problem()
    x, *weights = inputs
    plan = graphs.CapturePlan(DEVICE)
    captured = _eager_captured(_network, inputs, plan, overflows=lambda inputs: overflowed)
    told = []
    plan.on_backward = told.append
    replay = graphs._replayer(captured, _network, plan)
    expected = _step(_network, inputs)
    first = replay(*inputs)
    torch.testing.assert_close(first.detach(), expected[0])
    upstream = torch.linspace(-1.0, 1.0, first.numel(), device=DEVICE).reshape(first.shape)
    (first * upstream).sum().backward()
    assert told == [overflowed] and captured.backward_graph.replays == 1
    for w, grad in zip(weights, expected[1:]):
        torch.testing.assert_close(w.grad, grad, rtol=1e-5, atol=1e-6)  # recomputed where it overflowed
    # A second step adds into .grad: nothing handed out was one of the graphs' own buffers.
    second = replay(*inputs)
    assert second is not first and second.data_ptr() != first.data_ptr()
    (second * upstream).sum().backward()
    for w, grad in zip(weights, expected[1:]):
        torch.testing.assert_close(w.grad, 2 * grad, rtol=1e-5, atol=1e-6)


def test_graphed_model_captures_again_after_backwards_in_a_row_overflow(monkeypatch):
    # An overflow only the backward needs: the forward's outputs are handed out, the backward is
    # recomputed eagerly, and after recapture_after such steps in a row the next forward captures again.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    x, *weights = _problem()
    busy = (x + 1.0).clamp(max=1.0)
    made = []
    # The first capture's lists hold x's activity, not busier inputs'; a capture on busy holds.
    capture = _eager_captures(made, overflows=lambda k, given: k == 0 and bool(given[0].sum() > x.sum()))
    model = graphs.GraphedModel(_network, capture, (x, *weights), recapture_after=2)

    def step(inp):
        for w in weights:
            w.grad = None
        out = model(inp, *weights)
        out.sum().backward()
        return out, [w.grad for w in weights]

    with pytest.warns(RuntimeWarning, match="ran eagerly"):
        out, grads = step(busy)
    assert model.fallbacks == 1 and model.recaptures == 0
    expected = _step(lambda *a: _network(*a), [busy] + weights)
    torch.testing.assert_close(out.detach(), expected[0])
    eager = torch.autograd.grad(_network(busy, *weights).sum(), weights)
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    step(x)  # within the plan: the streak ends
    step(busy)
    assert model.fallbacks == 2 and model.recaptures == 0 and len(made) == 1
    step(busy)  # second in a row: the next forward records and captures again, on its own input
    assert model.fallbacks == 3 and model.recaptures == 0
    step(x)
    assert model.recaptures == 1 and len(made) == 2 and torch.equal(made[1].static_inputs[0], x)
    step(busy)
    assert model.fallbacks == 3


def test_graphed_model_checks_its_inputs_before_the_replay(monkeypatch):
    # A split GEMM's input that is an input of the step is checked before each replay (its outputs
    # would be wrong): one that is no longer spikes runs the step eagerly, without reading the replay.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    x, *weights = _problem()
    made = []
    capture = _eager_captures(made, input_checks={0: {spike_matmul.BFLOAT16}})
    model = graphs.GraphedModel(_network, capture, (x, *weights), recapture_after=0)
    reads = []
    real = graphs._HostRead.value
    monkeypatch.setattr(graphs._HostRead, "value", lambda self: (reads.append(self), real(self))[1])
    out = model(x, *weights)
    assert made[0].forward_graph.replays == 1 and model.fallbacks == 0 and len(reads) == 1
    torch.testing.assert_close(out.detach(), _network(x, *weights).detach())
    out.sum().backward()
    # The check copies the input into the graphs' own on its way (the replay does not copy it again).
    other = torch.roll(x, 1, dims=1)
    copies_by_replay = []
    made[0].static_inputs[0].copy_ = copies_by_replay.append  # (this tensor's own copy_ only)
    out = model(other, *weights)
    del made[0].static_inputs[0].copy_
    assert torch.equal(made[0].static_inputs[0], other) and model.fallbacks == 0 and copies_by_replay == []
    torch.testing.assert_close(out.detach(), _network(other, *weights).detach())
    out.sum().backward()
    real_values = x * 0.3
    with pytest.warns(RuntimeWarning, match="ran eagerly"):
        out = model(real_values, *weights)
    assert model.fallbacks == 1 and made[0].forward_graph.replays == 3
    torch.testing.assert_close(out.detach(), _network(real_values, *weights).detach())


def test_graphed_model_waiting_for_the_replay_reads_every_flag_in_the_forward(monkeypatch):
    # wait_for_replay (the protocol before stop 19): an overflow is read after the forward's replay,
    # and the whole step runs eagerly then; the replayed backward is never reached.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    x, *weights = _problem()
    made = []
    capture = _eager_captures(made, overflows=lambda k, given: True)
    model = graphs.GraphedModel(_network, capture, (x, *weights), recapture_after=0, wait_for_replay=True)
    with pytest.warns(RuntimeWarning, match="ran eagerly"):
        out = model(x, *weights)
    assert model.fallbacks == 1 and made[0].forward_graph.replays == 1
    out.sum().backward()
    assert made[0].backward_graph.replays == 0 and model.fallbacks == 1
    eager = torch.autograd.grad(_network(x, *weights).sum(), weights)
    for w, want in zip(weights, eager):
        torch.testing.assert_close(w.grad, want, rtol=1e-5, atol=1e-6)
