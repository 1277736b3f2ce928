"""The compact sparse path of feedforward Triton layers (in-kernel compaction, event-pair backward).

Compared with the windowed reference (Triton's interpreter on CPU, the compiled kernels on a GPU):
spikes-only losses (the event route), membrane losses (the dense route rebuilt from the same
lists), edge cases of the compaction (no active entry, every entry active, T=1, B=1, zero input),
per-neuron β, non-binary input, and two chained layers passing a sparse COO gradient.
"""

import pytest
import torch

pytest.importorskip("triton")

import snnopt.functional as SF  # noqa: E402
from snnopt import triton_ops  # noqa: E402
from snnopt.codegen import triton_lif  # noqa: E402
from snnopt.codegen.reference import reference_linear_lif  # noqa: E402
from snnopt.spec import LifSpec  # noqa: E402
from snnopt.surrogate import Surrogate  # noqa: E402

@pytest.fixture(autouse=True)
def event_route(monkeypatch):
    # At these tiny sizes the cost model would pick the dense GEMM; the tests want the event pairs.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)


TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5), torch.bfloat16: (4e-2, 4e-2)}


def _inputs(batch, steps, features, neurons, dtype, device, *, rate=0.4, binary=True, gain=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, steps, features, generator=gen, dtype=torch.float64)
    x = (x < rate).double() if binary else x * (x < rate)
    w = (torch.rand(neurons, features, generator=gen, dtype=torch.float64) - 0.3) * gain * 3.0 / features
    b = torch.rand(neurons, generator=gen, dtype=torch.float64) * 0.3
    beta = torch.rand(neurons, generator=gen, dtype=torch.float64) * 0.3 + 0.6
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(w).requires_grad_(), cast(b).requires_grad_(), beta.to(
        torch.float64 if dtype == torch.float64 else torch.float32).to(device)


def _check(x, w, b, beta, *, reset="subtract", window=0.5, membrane_loss=False, x_grad=False, device="cpu"):
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    surrogate = Surrogate("superspike", 10.0)
    spec = LifSpec(reset=reset, surrogate=surrogate, window=window)
    x = x.clone().requires_grad_(x_grad)
    out = SF.linear_lif(x, w, b, beta=beta, reset=reset, surrogate=surrogate, window=window,
                        return_membrane=membrane_loss, input_active=None, backend="triton")
    spikes = out.spikes if membrane_loss else out
    xr = x.detach().to(acc).requires_grad_(x_grad)
    wr, br = w.detach().to(acc).requires_grad_(), b.detach().to(acc).requires_grad_()
    ref_spikes, ref_membrane, _, _ = reference_linear_lif(xr, wr, br, spec, beta=beta.to(acc))
    assert torch.equal(spikes.to(acc), ref_spikes)
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn(ref_spikes.shape, generator=gen, dtype=acc).to(device)
    loss = (spikes.to(acc) * upstream).sum()
    ref_loss = (ref_spikes * upstream).sum()
    if membrane_loss:
        loss = loss + out.membrane.to(acc).sum()
        ref_loss = ref_loss + ref_membrane.sum()
    leaves = [w, b] + ([x] if x_grad else [])
    ours = torch.autograd.grad(loss, leaves)
    theirs = torch.autograd.grad(ref_loss, [wr, br] + ([xr] if x_grad else []))
    rtol, atol = TOL[dtype]
    for name, a, r in zip(("weight", "bias", "x"), ours, theirs):
        assert a.dtype == dtype
        torch.testing.assert_close(a.to(acc), r, rtol=rtol, atol=atol * max(1.0, r.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")
    return spikes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reset", ["subtract", "none"])
def test_event_route_matches_reference(dtype, reset, device):
    x, w, b, beta = _inputs(3, 7, 9, 6, dtype, device)
    _check(x, w, b, beta, reset=reset, device=device)


@pytest.mark.parametrize("shape", [(1, 1, 5, 4), (2, 1, 3, 17), (1, 6, 1, 1)])
def test_event_route_odd_shapes_and_one_step(shape, device):
    x, w, b, beta = _inputs(*shape, torch.float64, device, rate=0.7)
    _check(x, w, b, beta, device=device)


def test_non_binary_input_is_kept_exactly(device):
    x, w, b, beta = _inputs(2, 5, 8, 5, torch.float64, device, binary=False, rate=0.5)
    _check(x, w, b, beta, device=device)


def test_no_active_entry_and_no_input_event(device):
    x, w, b, beta = _inputs(2, 4, 5, 3, torch.float64, device)
    spikes = _check(torch.zeros_like(x), w, b, beta, window=0.05, device=device)
    assert not spikes.any()


def test_every_entry_active(device):
    x, w, b, beta = _inputs(2, 4, 5, 3, torch.float64, device)
    with torch.no_grad():
        w.zero_()
        b.fill_(0.5)  # v climbs 0.5, 0.95, … and stays within the wide window of θ = 1
    _check(x, w, b, beta, window=10.0, device=device)
    outs = triton_ops.lif_triton_op(x, w, b, None, beta, torch.ones_like(beta), None,
                                    torch.zeros(2, 3, dtype=x.dtype, device=device), None, None, "subtract", True,
                                    "superspike", 10.0, False, "sparse", 10.0, False, True)
    assert outs[7].numel() == 2 * 4 * 3 and torch.equal(outs[7], torch.arange(24, device=device))
    assert outs[9].tolist() == [3 * k for k in range(9)]  # where each (b, t) starts


def test_compaction_lists_active_entries_in_flat_order(device):
    x, w, b, beta = _inputs(3, 6, 7, 20, torch.float64, device, seed=3)
    theta = torch.ones_like(beta)
    outs = triton_ops.lif_triton_op(x, w, b, None, beta, theta, None, torch.zeros(3, 20, dtype=x.dtype, device=device),
                                    None, None, "subtract", True, "superspike", 10.0, False, "sparse", 0.3, True, True)
    membrane = outs[1]
    expected = ((membrane - 1.0).abs() < 0.3).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(outs[7], expected)
    assert outs[6].numel() == 0  # no per-entry flags kept
    offsets, pos, values = outs[10], outs[11], outs[12]
    flat_events = x.reshape(3 * 6, 7).nonzero()
    assert pos.numel() == flat_events.shape[0] and torch.all(values == 1)
    assert offsets.diff().tolist() == (x.reshape(18, 7) != 0).sum(1).tolist()


class _LaunchLog:
    """A generated kernel module whose launches are logged (kernel name, and whether it was the rerun)."""

    def __init__(self, module, log):
        self._module, self._log = module, log

    def __getattr__(self, name):
        kernel = getattr(self._module, name)
        if not name.endswith("_kernel"):
            return kernel
        log = self._log

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    log.append(name + (":rerun" if kwargs.get("WRITE_ACTIVE") else ""))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Launcher()


@pytest.mark.parametrize("stage_fraction, one_pass, gather_slots, expected", [
    (1.0, True, 8, "_gather_staged_kernel"),       # every program's entries fit: one sweep, a parallel copy
    (1.0, True, 1, "_gather_staged_kernel"),       # ... by one program per slot (KernelTuning.gather_slots)
    (1.0, True, 64, "_gather_staged_kernel"),      # ... per 64: more slots per program than there are (81)
    (1e-9, True, 1, "_lif_fwd_kernel:rerun"),      # area of one step's lanes, overflowed: the second sweep
    (1.0, False, 1, "_lif_fwd_kernel:rerun"),      # staging off (KernelTuning.one_pass_compaction)
])
def test_one_pass_compaction_lists_what_the_rerun_lists(stage_fraction, one_pass, gather_slots, expected, device,
                                                        monkeypatch):
    x, w, b, beta = _inputs(3, 9, 7, 40, torch.float32, device, seed=5)
    theta = torch.ones_like(beta)
    args = (x, w, b, None, beta, theta, None, torch.zeros(3, 40, device=device), None, None, "subtract", True,
            "superspike", 10.0, False, "sparse", 0.1, True, True)
    with triton_lif.tuning(one_pass_compaction=False, max_block=16):  # the reference: written by the rerun
        reference = triton_ops.lif_triton_op(*args)
    real, log = triton_lif.kernels, []
    monkeypatch.setattr(triton_lif, "kernels", lambda spec, dtype=torch.float32: _LaunchLog(real(spec, dtype), log))
    monkeypatch.setattr(triton_lif, "STAGE_FRACTION", stage_fraction)
    with triton_lif.tuning(one_pass_compaction=one_pass, max_block=16, gather_slots=gather_slots):
        outs = triton_ops.lif_triton_op(*args)  # 40 neurons: 3 programs per row
    assert expected in log and ("_gather_staged_kernel" in log) != ("_lif_fwd_kernel:rerun" in log)
    active, membrane = reference[7], reference[1]
    assert 10 < active.numel() < membrane.numel() // 2  # some entries active, in several programs
    assert torch.equal(active, ((membrane - 1.0).abs() < 0.1).reshape(-1).nonzero().squeeze(1))
    for k in (0, 7, 8, 9):  # spikes, active index, surrogate values, per-(b, t) offsets
        assert torch.equal(outs[k], reference[k]), k


def test_membrane_loss_takes_the_dense_route(device):
    x, w, b, beta = _inputs(2, 5, 6, 4, torch.float64, device)
    _check(x, w, b, beta, membrane_loss=True, device=device)


def test_full_input_gradient_takes_the_dense_route(device):
    x, w, b, beta = _inputs(2, 5, 6, 4, torch.float64, device)
    _check(x, w, b, beta, x_grad=True, device=device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reset", ["subtract", "none"])
def test_dense_events_take_the_gemm_route(dtype, reset, device, monkeypatch):
    # The weight gradient from a dense dL/dI (reverse sweep of the lists' g) and one GEMM; bias and
    # initial state from the same sweep, and no pair kernel at all.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: False)
    swept, paired = [], []
    real = triton_lif.reverse_sweep
    monkeypatch.setattr(triton_lif, "reverse_sweep", lambda *a, **k: (swept.append((k["split"], k["need_sums"])),
                                                                     real(*a, **k))[1])
    monkeypatch.setattr(triton_lif, "sparse_backward", lambda *a, **k: paired.append(1))
    x, w, b, beta = _inputs(2, 5, 6, 4, dtype, device, seed=2)
    _check(x, w, b, beta, reset=reset, device=device)
    assert swept == [(False, True)] and paired == []  # CPU sizes: no split GEMM


@pytest.mark.parametrize("pairs", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chained_layers_pass_a_sparse_gradient(dtype, pairs, device, monkeypatch):
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: pairs)
    x, w1, _, _ = _inputs(3, 8, 6, 7, dtype, device, gain=2.5, seed=5)
    w2 = (torch.rand(5, 7, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 0.8).to(dtype).to(
        device).requires_grad_()
    grads = []
    for restrict in ("auto", None):
        h = SF.linear_lif(x, w1, beta=0.9, window=0.5, backend="triton")
        out = SF.linear_lif(h, w2, beta=0.9, window=0.5, backend="triton", input_active=restrict)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=dtype, device=device).reshape(out.shape)
        grads.append(torch.autograd.grad((out * upstream).sum(), [w1, w2]))
    rtol, atol = TOL[dtype]
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol)


def test_sparse_gradient_reaches_the_producer_as_coo(device, monkeypatch):
    seen = []
    original = triton_lif.sparse_backward

    def spy(grad_spikes, grad_is_compact, *args, **kwargs):
        seen.append(grad_is_compact)
        return original(grad_spikes, grad_is_compact, *args, **kwargs)

    monkeypatch.setattr(triton_lif, "sparse_backward", spy)
    x, w1, _, _ = _inputs(2, 6, 5, 6, torch.float64, device, gain=2.5, seed=5)
    w2 = torch.full((4, 6), 0.4, dtype=torch.float64, device=device, requires_grad=True)
    h = SF.linear_lif(x, w1, beta=0.9, window=0.5, backend="triton")
    out = SF.linear_lif(h, w2, beta=0.9, window=0.5, backend="triton")
    out.sum().backward()
    assert seen == [False, True]  # layer 2 reads dense dL/ds, layer 1 the COO values in its own order


@pytest.fixture
def dense_route_on_tensor_cores(monkeypatch):
    """Tiny float32 layers take the dense weight route and the tensor-core GEMMs (the large-layer GPU routes)."""
    from snnopt.codegen import spike_matmul

    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: False)
    monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: other.dtype == torch.float32)
    return spike_matmul


@pytest.mark.parametrize("reset", ["subtract", "none"])
@pytest.mark.parametrize("membrane_loss", [False, True])
def test_split_bfloat16_gemms_in_forward_and_dense_route(reset, membrane_loss, monkeypatch, device,
                                                         dense_route_on_tensor_cores):
    # The current and, on the dense route, the weight gradient from spikes (the large-layer GPU
    # route, forced here at a tiny size) against the float32 reference.
    spike_matmul = dense_route_on_tensor_cores
    used = []
    real, real_parts = spike_matmul.split_mm, spike_matmul.weight_grad_from_parts
    monkeypatch.setattr(spike_matmul, "split_mm", lambda *a, **k: (used.append(k["spikes"]), real(*a, **k))[1])
    monkeypatch.setattr(spike_matmul, "weight_grad_from_parts",
                        lambda *a, **k: (used.append("parts"), real_parts(*a, **k))[1])
    real_buffer = spike_matmul.spike_operand_buffer
    monkeypatch.setattr(spike_matmul, "spike_operand_buffer", lambda *a: (used.append("a from the listing"),
                                                                          real_buffer(*a))[1])
    x, w, b, beta = _inputs(3, 8, 10, 6, torch.float32, device, seed=5)
    _check(x, w, b, beta, reset=reset, membrane_loss=membrane_loss, device=device)
    # The forward current (its spike operand written, uninitialised before, by the launch that lists
    # the input's events), then the weight gradient: from dL/dI split by the reverse-filter kernel, or
    # (membrane loss: the full dense sweep) split afterwards.
    assert used == ["a from the listing", "b" if membrane_loss else "parts"]


@pytest.mark.parametrize("reset", ["subtract", "none"])
@pytest.mark.parametrize("membrane_loss", [False, True])
def test_int8_gemms_in_forward_and_dense_route(reset, membrane_loss, monkeypatch, device, dense_route_on_tensor_cores):
    # The int8 route preferred: the forward current from the input rebuilt as int8 from its events;
    # the weight gradient stays on the bfloat16 route (spike_matmul.route_for: dL/dI's range), from
    # the reverse sweep's parts, or (membrane loss) split afterwards. Against the float32 reference.
    spike_matmul = dense_route_on_tensor_cores
    used = []
    real_int8, real_split, real_parts = spike_matmul.int8_mm, spike_matmul.split_mm, spike_matmul.weight_grad_from_parts
    monkeypatch.setattr(spike_matmul, "int8_mm", lambda *a, **k: (used.append(("int8", k["spikes"], a[0].dtype,
                                                                                 a[1].dtype)), real_int8(*a, **k))[1])
    monkeypatch.setattr(spike_matmul, "split_mm", lambda *a, **k: (used.append("split"), real_split(*a, **k))[1])
    monkeypatch.setattr(spike_matmul, "weight_grad_from_parts",
                        lambda *a, **k: (used.append("parts"), real_parts(*a, **k))[1])
    x, w, b, beta = _inputs(3, 8, 10, 6, torch.float32, device, seed=5)
    with spike_matmul.prefer(spike_matmul.INT8):
        _check(x, w, b, beta, reset=reset, membrane_loss=membrane_loss, device=device)
    assert used == [("int8", "a", torch.int8, torch.float32), "split" if membrane_loss else "parts"]


def test_non_spike_input_keeps_the_float32_gemm_when_the_split_would_apply(monkeypatch, device):
    # The forward learns from the input's events whether x is spikes; real values keep the reference.
    from snnopt.codegen import spike_matmul

    monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: other.dtype == torch.float32)
    used = []
    real = spike_matmul.split_mm
    monkeypatch.setattr(spike_matmul, "split_mm", lambda *a, **k: (used.append(k["spikes"]), real(*a, **k))[1])
    x, w, b, beta = _inputs(2, 6, 8, 5, torch.float32, device, binary=False, rate=0.5, seed=4)
    _check(x, w, b, beta, device=device)
    assert used == []


@pytest.mark.parametrize("form", ["sum", "per_neuron", "time_major"])
@pytest.mark.parametrize("weight_route", ["events", "dense"])
def test_upstream_gradient_read_through_its_strides(form, weight_route, monkeypatch, device):
    # autograd hands sum()'s gradient over as an expanded view (all strides 0: one stored value),
    # a per-neuron weighting's as strides (0, 0, 1), a loss on a time-major view as a permuted
    # tensor. Read as contiguous, dL/ds ran off the end of its storage (an illegal address on an
    # H200 at 16384 neurons; garbage gradients below that).
    if weight_route == "dense":
        monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: False)
    x, w, b, beta = _inputs(3, 7, 9, 6, torch.float64, device, seed=5)
    surrogate = Surrogate("superspike", 10.0)
    spec = LifSpec(surrogate=surrogate, window=0.5)
    per_neuron = torch.linspace(0.5, 2.0, 6, dtype=torch.float64, device=device)
    time_major = torch.randn(7, 3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)

    def loss(spikes):
        if form == "sum":
            return spikes.sum()
        if form == "per_neuron":
            return (spikes * per_neuron).sum()
        return (spikes.transpose(0, 1) * time_major).sum()

    spikes = SF.linear_lif(x, w, b, beta=beta, surrogate=surrogate, window=0.5, input_active=None, backend="triton")
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref_spikes, _, _, _ = reference_linear_lif(x, wr, br, spec, beta=beta)
    assert torch.equal(spikes, ref_spikes) and 0 < int(ref_spikes.sum()) < ref_spikes.numel()
    ours = torch.autograd.grad(loss(spikes), [w, b])
    theirs = torch.autograd.grad(loss(ref_spikes), [wr, br])
    for a, r in zip(ours, theirs):
        assert r.abs().max() > 0
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def test_eager_forward_skips_the_dispatcher_and_matches_the_op(monkeypatch, device):
    # Plain eager layers run the op's implementation under a plain autograd function; forcing the
    # op gives the same spikes and gradients, with a sparse gradient passed from layer to layer
    # (the producer is recognised by either backward node) and without grad mode.
    x, w1, _, _ = _inputs(3, 8, 6, 7, torch.float32, device, gain=2.5, seed=5)
    w2 = (torch.rand(5, 7, generator=torch.Generator().manual_seed(9)) * 0.8).to(device).requires_grad_()
    runs, nodes, coo = [], [], []
    real_pairs = triton_lif.sparse_backward
    monkeypatch.setattr(triton_lif, "sparse_backward",
                        lambda gs, compact, *a, **k: (coo.append(compact), real_pairs(gs, compact, *a, **k))[1])
    for plain in (True, False):
        if not plain:
            monkeypatch.setattr(triton_ops, "_plain_eager", lambda args: False)
        h = SF.linear_lif(x, w1, beta=0.9, window=0.5, backend="triton")
        out = SF.linear_lif(h, w2, beta=0.9, window=0.5, backend="triton")
        nodes.append((type(h.grad_fn).__name__, type(out.grad_fn).__name__))
        upstream = torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape)
        with torch.no_grad():
            inference = SF.linear_lif(x, w1, beta=0.9, window=0.5, backend="triton")
        runs.append((out.detach(), inference, *torch.autograd.grad((out * upstream).sum(), [w1, w2])))
    assert "Eager" in nodes[0][0] and "Eager" in nodes[0][1]
    assert nodes[1][0].startswith("GeneratedBackwardFor") and nodes[1][1].startswith("GeneratedBackwardFor")
    assert coo == [False, True, False, True], "layer 1 gets layer 2's input gradient as its compact values"
    for plain, dispatched in zip(*runs):
        assert torch.equal(plain, dispatched)


def test_eager_layer_call_binds_no_signature(monkeypatch, device):
    # An autograd.Function with a setup_context method binds its arguments with inspect.signature on
    # every apply (~30 µs of host time on a 2-core AMD EPYC); the plain eager path sets its context up in forward.
    import inspect

    x, w, _, _ = _inputs(2, 6, 5, 4, torch.float32, device, gain=2.5, seed=3)
    signed, real = [], inspect.signature
    # (Triton's interpreter inspects a kernel on its first launch: only the layer's own functions count.)
    monkeypatch.setattr(inspect, "signature", lambda fn, *a, **k: (signed.append(fn), real(fn, *a, **k))[1])
    out = SF.linear_lif(x, w, beta=0.9, window=0.5, backend="triton")
    assert "Eager" in type(out.grad_fn).__name__
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().max() > 0
    bound = [fn for fn in signed if getattr(fn, "__module__", "") in ("snnopt.triton_ops", "torch.autograd.function")]
    assert not bound


@pytest.mark.parametrize("reuse", [True, False])
def test_dense_weight_route_backward_reuses_the_forward_spike_check(reuse, monkeypatch, device):
    # The forward learns whether the input's events are spikes with their count (its GEMM's route);
    # the backward's weight gradient takes its split route from that and reads nothing from the
    # device. Without the forward's answer it reads the check itself: the same gradients either way.
    from snnopt.codegen import spike_matmul
    from tests.codegen.test_capture_plan import DeviceReads

    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: False)
    monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: other.dtype == torch.float32)
    if not reuse:
        forgetful = type("Forgetful", (dict,), {"__setitem__": lambda self, key, value: None})()
        monkeypatch.setattr(triton_ops, "_INPUT_KINDS", forgetful)  # the forward's answer never reaches the backward
    checks, parts = [], []
    real_kind, real_parts = spike_matmul.spike_kind, spike_matmul.weight_grad_from_parts
    monkeypatch.setattr(spike_matmul, "spike_kind", lambda *a, **k: (checks.append(1), real_kind(*a, **k))[1])
    monkeypatch.setattr(spike_matmul, "weight_grad_from_parts",
                        lambda *a, **k: (parts.append(1), real_parts(*a, **k))[1])
    x, w, b, beta = _inputs(2, 6, 8, 5, torch.float32, device, seed=3)
    surrogate = Surrogate("superspike", 10.0)
    spikes = SF.linear_lif(x, w, b, beta=beta, surrogate=surrogate, window=0.5, input_active=None, backend="triton")
    assert checks == [], "the forward's check came with the events' count"
    upstream = torch.linspace(-1, 1, spikes.numel(), device=device).reshape(spikes.shape)
    with DeviceReads(pytest.MonkeyPatch()) as reads:
        grads = torch.autograd.grad((spikes * upstream).sum(), [w, b])
    assert parts == [1], "the weight gradient takes the split GEMM"
    assert (reads.seen == [] and checks == []) if reuse else (reads.seen != [] and checks == [1])
    wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    spec = LifSpec(reset="subtract", surrogate=surrogate, window=0.5)
    ref_spikes, _, _, _ = reference_linear_lif(x, wr, br, spec, beta=beta)
    assert torch.equal(spikes, ref_spikes)
    for a, r in zip(grads, torch.autograd.grad((ref_spikes * upstream).sum(), [wr, br])):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()))


def test_eager_backward_skips_the_dispatcher_and_matches_the_op(monkeypatch, device):
    # Plain eager backward (grad mode off) calls the op's implementation directly; with
    # create_graph the op itself runs. Both give the same gradients.
    chosen = []
    real = triton_ops._backward_entry
    monkeypatch.setattr(triton_ops, "_backward_entry", lambda *a: (chosen.append(real(*a)), chosen[-1])[1])
    x, w, b, beta = _inputs(2, 6, 8, 5, torch.float32, device, seed=9)
    w, b = torch.nn.Parameter(w.detach()), torch.nn.Parameter(b.detach())  # as a module holds them
    results = []
    for create_graph in (False, True):
        spikes = SF.linear_lif(x, w, b, beta=beta, window=0.5, input_active=None, backend="triton")
        upstream = torch.linspace(-1, 1, spikes.numel(), device=device).reshape(spikes.shape)
        results.append(torch.autograd.grad((spikes * upstream).sum(), [w, b], create_graph=create_graph))
    direct, dispatched = chosen
    assert direct.func is triton_ops._lif_triton_backward and direct.keywords == {"fresh_placeholders": False}
    assert dispatched is torch.ops.snnopt.lif_triton_backward
    for direct, dispatched in zip(*results):
        assert torch.equal(direct, dispatched.detach())


@pytest.mark.parametrize("compact_grad", [False, True])
def test_reverse_sweep_and_its_in_kernel_split(compact_grad, device):
    # dL/dI from the active entries' g = dL/ds·σ′: the float32 sweep against a loop, the three
    # bfloat16 parts the split sweep writes sum exactly to it, and its sums (db per batch row summed,
    # dv0 = β·dL/dI[:, 0]). dL/ds dense (a strided view) or compact (one value per entry); a padded
    # entry (index B·T·N, as a captured graph's list) adds nothing.
    gen = torch.Generator().manual_seed(12)
    batch, steps, neurons = 3, 7, 20
    entries = batch * steps * neurons
    active = torch.randperm(entries, generator=gen)[:90].sort().values
    surr = torch.rand(90, generator=gen) + 0.5
    grad_dense = (torch.randn(batch, neurons, steps, generator=gen)
                  * torch.logspace(-6, 6, steps)).transpose(1, 2)  # wide range of magnitudes, strided
    g = grad_dense.reshape(-1)[active] * surr
    grad_spikes = grad_dense.reshape(-1)[active] if compact_grad else grad_dense
    padded = torch.cat([active, torch.tensor([entries, entries])])
    surr_padded = torch.cat([surr, torch.ones(2)])
    grad_padded = torch.cat([grad_spikes, torch.ones(2)]) if compact_grad else grad_spikes
    beta = torch.rand(neurons, generator=gen) * 0.3 + 0.6
    weight = torch.zeros(neurons, 5)
    offsets = torch.zeros(batch * steps + 1, dtype=torch.int64)  # only the input gradient reads them

    def sweep(split):
        return triton_lif.reverse_sweep(
            grad_padded.to(device), compact_grad, padded.to(device), surr_padded.to(device), offsets.to(device),
            beta.to(device), weight.to(device), None, batch, steps, write=True, split=split, need_sums=True,
            in_dtype=torch.float32)

    dense, grad_b, grad_v0, grad_x = sweep(split=False)
    parts, grad_b_split, grad_v0_split, _ = sweep(split=True)
    dense_g = torch.zeros(entries).index_put_((active,), g).reshape(batch, steps, -1)
    expected = torch.zeros_like(dense_g)
    carry = torch.zeros(batch, neurons)
    for t in reversed(range(steps)):
        carry = carry * beta + dense_g[:, t]
        expected[:, t] = carry
    assert grad_x is None
    assert torch.equal(dense.reshape(batch, steps, neurons).cpu(), expected)  # same operations, same order
    torch.testing.assert_close(grad_b.cpu(), expected.sum((0, 1)), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_v0.cpu(), expected[:, 0] * beta, rtol=1e-6, atol=0)
    assert torch.equal(grad_b_split, grad_b) and torch.equal(grad_v0_split, grad_v0)
    assert parts.shape == (3, batch * steps, neurons) and parts.dtype == torch.bfloat16
    assert torch.equal(parts.double().sum(0), dense.double())
    # smallest first, as the GEMM accumulates them (which way each part rounds is the compiler's:
    # the interpreter truncates, the GPU rounds to nearest; either split is exact)
    lo, mid, hi = parts.float().abs()
    assert bool((lo <= mid).all() and (mid <= hi).all()) and bool((lo > 0).any())


@pytest.mark.parametrize("event_tile", [16, 1024, 4096])
@pytest.mark.parametrize("shape", [(3, 5, 70), (2, 3, 1100), (1, 1, 5)])
def test_input_events_list_every_nonzero_in_order(shape, event_tile, device):
    # One or several rows per program (KernelTuning.event_tile), rows past the last one masked,
    # rows longer than one block (1100 features: two loop iterations), empty rows; against
    # torch.nonzero, and with a capacity below the count (a captured graph's list): the first
    # entries, the offsets clamped, the overflow flagged.
    batch, steps, features = shape
    gen = torch.Generator().manual_seed(8)
    x = (torch.rand(shape, generator=gen) < 0.1) * torch.randn(shape, generator=gen)
    x[0, -1] = 0
    x = x.to(device)
    nz = x.reshape(batch * steps, features).nonzero()
    with triton_lif.tuning(event_tile=event_tile):
        offsets, pos, values = triton_lif.input_events(x, torch.float32)
        flags = []
        capped = triton_lif.input_events(x, torch.float32, capacity=max(1, nz.shape[0] // 2), flag=flags.append)
    counts = torch.bincount(nz[:, 0], minlength=batch * steps)
    assert torch.equal(offsets.cpu(), torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    assert torch.equal(pos.long().cpu(), (nz[:, 0] % steps) * features + nz[:, 1])
    assert torch.equal(values.cpu(), x.reshape(batch * steps, features)[nz[:, 0], nz[:, 1]].cpu())
    length = max(1, nz.shape[0] // 2)
    kept = min(length, nz.shape[0])  # positions past the events are never read (the offsets end there)
    assert torch.equal(capped[1][:kept].cpu(), pos[:kept].cpu()) and torch.equal(capped[0], offsets.clamp(max=length))
    assert len(flags) == 1 and bool(flags[0]) == (nz.shape[0] > length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("values", ["spikes", "integers", "wide_integers", "bfloat16_values", "real", "nan", "none"])
def test_event_count_reads_the_spike_check_with_it(values, dtype, device):
    # The counting launch works out spike_matmul.spike_kind of the nonzeros on the way: the same
    # answer as the torch check on the listed values, for every input dtype.
    from snnopt.codegen import spike_matmul

    gen = torch.Generator().manual_seed(11)
    mask = torch.rand(2, 4, 300, generator=gen) < 0.2
    fill = {"spikes": torch.ones(1), "integers": torch.randint(-128, 128, (2, 4, 300), generator=gen).float(),
            "wide_integers": torch.randint(-200, 200, (2, 4, 300), generator=gen).float(),
            "bfloat16_values": torch.randn(2, 4, 300, generator=gen).bfloat16().float(),
            "real": torch.randn(2, 4, 300, generator=gen), "nan": torch.full((1,), float("nan")),
            "none": torch.zeros(1)}[values]
    x = (mask * fill).to(dtype)
    if values == "nan":
        x[0, 0, 0] = 1.0  # NaN entries, and a spike
    x = x.to(device)
    acc = triton_lif.accumulation_dtype(dtype)
    seen = []
    offsets, pos, events = triton_lif.input_events(x, acc, checked=seen.append)
    assert seen == [spike_matmul.spike_kind(events)], (values, dtype)
    assert torch.equal(offsets, triton_lif.input_events(x, acc)[0])


@pytest.mark.parametrize("dtype, copies", [(torch.float32, 1), (torch.bfloat16, 3), (torch.float64, 2),
                                          (torch.int8, 1)])
@pytest.mark.parametrize("features", [70, 1100])
def test_dense_input_rebuilds_the_input_from_its_events(dtype, copies, features, device, monkeypatch):
    # The dense weight route's x (copies below each other) in memory that starts as garbage (the
    # kernel zeroes each row before its events): every copy equal to the input, empty rows, rows
    # longer than one zeroing block and an all-zero input (no events at all) included.
    gen = torch.Generator().manual_seed(4)
    shape = (3, 5, features)
    input_dtype = torch.float32 if dtype == torch.int8 else dtype  # (int8: the operand of an int8 GEMM)
    x = (torch.rand(shape, generator=gen) < 0.2).to(input_dtype) * torch.randint(1, 4, shape, generator=gen)
    x[1, 2] = 0  # a (b, t) row without events
    real_empty = torch.empty
    for inp in (x.to(device), torch.zeros_like(x, device=device)):
        events = triton_lif.input_events(inp, triton_lif.accumulation_dtype(input_dtype))
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(77))
            rows = triton_lif.dense_input(events, 3, 5, features, dtype, copies=copies)
        assert rows.dtype == dtype and torch.equal(rows, inp.reshape(15, features).to(dtype).repeat(copies, 1))


@pytest.mark.parametrize("event_tile", [16, 4096])
@pytest.mark.parametrize("operand_dtype, copies", [(torch.bfloat16, 3), (torch.int8, 1), (torch.bfloat16, 1)])
@pytest.mark.parametrize("capacity", [None, 7])
def test_event_listing_writes_the_forward_gemm_operand(operand_dtype, copies, capacity, event_tile, device):
    # The listing launch also writes x as the forward GEMM's spike operand, `copies` side by side per
    # row, into a buffer that starts as garbage: every entry written (empty rows, rows past a
    # program's last, rows longer than one block, an all-zero input whose listing has no events),
    # whatever the capacity of a captured graph's list; the events themselves unchanged. The
    # callback runs after the count's spike check.
    from snnopt.codegen import spike_matmul

    gen = torch.Generator().manual_seed(6)
    for shape in ((3, 5, 70), (2, 3, 1100)):
        x = (torch.rand(shape, generator=gen) < 0.1).float() * torch.randint(1, 4, shape, generator=gen)
        x[0, 1] = 0
        for inp in (x.to(device), torch.zeros_like(x, device=device)):
            rows, features = shape[0] * shape[1], shape[2]
            order, buffers = [], []

            def operand():
                order.append("operand")
                buffers.append(torch.full((rows, copies * features), 77, dtype=operand_dtype, device=device))
                return buffers[-1]

            with triton_lif.tuning(event_tile=event_tile):
                plain = triton_lif.input_events(inp, torch.float32, capacity, (lambda flag: None))
                listed = triton_lif.input_events(inp, torch.float32, capacity, (lambda flag: None), operand=operand,
                                                 checked=None if capacity else order.append)
            assert order == ([] if capacity else [spike_matmul.INT8]) + ["operand"]
            expected = inp.reshape(rows, features).to(operand_dtype).repeat(1, copies)
            assert torch.equal(buffers[0], expected)
            kept = int(plain[0][-1])  # (past a capacity's clamped length the list is not read)
            assert torch.equal(plain[0], listed[0])
            for a, b in zip(plain[1:], listed[1:]):
                assert a.shape == b.shape and torch.equal(a[:kept], b[:kept])


def test_weight_grad_from_parts_rejects_a_wrong_layout():
    from snnopt.codegen import spike_matmul

    with pytest.raises(ValueError, match="parts"):
        spike_matmul.weight_grad_from_parts(torch.zeros(2, 4, 3, dtype=torch.bfloat16), torch.zeros(4, 5))


def _guessing_layer(w, b, beta):
    surrogate = Surrogate("superspike", 10.0)
    spec = LifSpec(reset="subtract", surrogate=surrogate, window=0.5)

    def run(x):
        from tests.codegen.test_capture_plan import DeviceReads

        with DeviceReads(pytest.MonkeyPatch()) as reads:
            spikes = SF.linear_lif(x, w, b, beta=beta, surrogate=surrogate, window=0.5, input_active=None,
                                   backend="triton")
        upstream = torch.linspace(-1, 1, spikes.numel(), device=x.device).reshape(spikes.shape)
        grads = torch.autograd.grad((spikes * upstream).sum(), [w, b])
        wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        ref_spikes, _, _, _ = reference_linear_lif(x, wr, br, spec, beta=beta)
        assert torch.equal(spikes, ref_spikes)
        for a, r in zip(grads, torch.autograd.grad((ref_spikes * upstream).sum(), [wr, br])):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6 * max(1.0, float(r.abs().max())))
        return reads.seen
    return run


def test_repeated_call_guesses_its_event_count_and_reads_the_device_once(device):
    # The first call reads the event count, then the active list's length; a second call with the
    # same weight and input shape lists its events into room from the first call's count and reads
    # both counts at once. Its lists are cut to the count: the weight gradient reads them.
    x, w, b, beta = _inputs(3, 8, 40, 6, torch.float32, device, rate=0.1, seed=11)
    run = _guessing_layer(w, b, beta)
    assert len(run(x)) == 2
    x2 = x.roll(1, dims=2)  # other events, as many
    assert len(run(x2)) == 1
    with triton_lif.tuning(guess_event_count=False):
        assert len(run(x2)) == 2
    # The op's saved events: exactly the input's nonzeros, in order, though listed into more room.
    outs = triton_ops.lif_triton_op(x2, w, b, None, beta, torch.ones_like(beta), None,
                                    torch.zeros(3, 6, device=device), None, None, "subtract", True, "superspike",
                                    10.0, False, "sparse", 0.5, False, True)
    offsets, pos, values = outs[10], outs[11], outs[12]
    rows = x2.reshape(3 * 8, 40)
    assert pos.numel() == values.numel() == int((rows != 0).sum()) and torch.all(values == 1)
    assert offsets.diff().tolist() == (rows != 0).sum(1).tolist()
    assert torch.equal(pos.long() % 40, rows.nonzero()[:, 1])


def test_guessed_event_count_that_falls_short_lists_again(device):
    # An input with far more events than the last call's: the guessed lists hold only some, so the
    # forward runs again with the count it read (three reads in all); the next call guesses from it.
    x, w, b, beta = _inputs(2, 30, 60, 5, torch.float32, device, rate=0.02, seed=12)
    run = _guessing_layer(w, b, beta)
    run(x)
    dense, _, _, _ = _inputs(2, 30, 60, 5, torch.float32, device, rate=0.6, seed=13)
    assert (dense != 0).sum() > (x != 0).sum() + max(int((x != 0).sum()) // 4, 256)  # past the headroom
    assert len(run(dense)) == 3
    assert len(run(dense)) == 1


def test_guessed_spike_check_that_no_longer_holds_lists_again(monkeypatch, device):
    # The GEMM route chosen from the last call's spike check (the split bfloat16 one, forced here at a
    # tiny size) does not suit real-valued input: the forward runs again on the float32 product.
    from snnopt.codegen import spike_matmul

    monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: other.dtype == torch.float32)
    used = []
    real_buffer = spike_matmul.spike_operand_buffer
    monkeypatch.setattr(spike_matmul, "spike_operand_buffer",
                        lambda route, *a: (used.append(route), real_buffer(route, *a))[1])
    x, w, b, beta = _inputs(2, 6, 8, 5, torch.float32, device, seed=14)
    run = _guessing_layer(w, b, beta)
    run(x)
    assert used == [spike_matmul.BFLOAT16]
    real_valued, _, _, _ = _inputs(2, 6, 8, 5, torch.float32, device, binary=False, rate=0.5, seed=15)
    assert len(run(real_valued)) == 3
    assert used == [spike_matmul.BFLOAT16] * 2  # the guess's listing wrote the split operand; the rerun did not
    # Spikes again: the float32 route guessed from the last call takes them too (one read, no rerun);
    # the call after that guesses the split route from this one's check.
    assert len(run(x)) == 1 and used == [spike_matmul.BFLOAT16] * 2
    assert len(run(x)) == 1 and used == [spike_matmul.BFLOAT16] * 3
