"""The Triton backend under ``torch.use_deterministic_algorithms(True)``: no atomic sums.

The compact sparse backward adds dW, db and dv0 entry by entry with atomics (the event-pair route),
in an order that varies from run to run on a GPU. Under deterministic algorithms all three come
from the dense route instead (``triton_lif.reverse_sweep``: a reverse β-filter that also sums db
and dv0 per batch row, then a GEMM). Checked here: that route is taken (no pair kernel, the only
one with atomic sums), it gives the pair route's gradients, on
the float32 GEMM and on the split bfloat16 one, and two runs agree bit for bit (meaningful on a
GPU, where this file runs compiled; on CPU, Triton's interpreter).
"""

import contextlib

import pytest
import torch

pytest.importorskip("triton")

import snnopt.functional as SF  # noqa: E402
from snnopt.codegen import spike_matmul, triton_lif  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def cublas_workspace(monkeypatch):
    # PyTorch refuses a cuBLAS GEMM under deterministic algorithms unless this is set (its docs say
    # so for CUDA >= 10.2); a user enabling determinism on a GPU sets it the same way.
    if DEVICE.type == "cuda":
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@contextlib.contextmanager
def deterministic_algorithms():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, 9, 14, generator=gen) < 0.3).float()
    w = (torch.rand(11, 14, generator=gen) - 0.25) * 0.8
    b = torch.rand(11, generator=gen) * 0.2
    v0 = torch.rand(3, 11, generator=gen) * 0.9
    beta = torch.rand(11, generator=gen) * 0.3 + 0.6  # per neuron: the reductions must weight by each β
    return [t.to(DEVICE) for t in (x, w, b, v0, beta)]


def _grads(problem, train_weight=True):
    x, w, b, v0, beta = problem
    w, b, v0 = (t.clone().requires_grad_(train) for t, train in ((w, train_weight), (b, True), (v0, True)))
    out = SF.linear_lif(x, w, b, beta=beta, window=0.5, initial_state=v0, input_active=None, backend="triton")
    upstream = torch.linspace(-1.0, 1.0, out.numel(), device=DEVICE).reshape(out.shape)
    grads = torch.autograd.grad((out * upstream).sum(), (w, b, v0) if train_weight else (b, v0))
    return [out.detach(), *grads]


@pytest.fixture
def launches(monkeypatch):
    """The need_* flags of every sparse_backward call (True flags launch atomic sums), and
    ``{"sweep": (write, need_sums)}`` for every reverse_sweep call (no atomics)."""
    seen = []
    real_pairs, real_sweep = triton_lif.sparse_backward, triton_lif.reverse_sweep

    def pairs(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("need_weight", "need_bias", "need_initial_v")})
        return real_pairs(*args, **kwargs)

    def sweep(*args, **kwargs):
        seen.append({"sweep": (kwargs["write"], kwargs["need_sums"])})
        return real_sweep(*args, **kwargs)
    monkeypatch.setattr(triton_lif, "sparse_backward", pairs)
    monkeypatch.setattr(triton_lif, "reverse_sweep", sweep)
    return seen


@pytest.mark.parametrize("split", [False, True], ids=["float32_gemm", "split_bfloat16_gemm"])
def test_deterministic_algorithms_take_the_dense_route_with_the_same_gradients(split, launches, monkeypatch):
    # The pair route where the cost model is free to choose it (tiny sizes would pick the GEMM).
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    if split:  # the split GEMM forced at this size, as on a GPU for large layers
        monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: other.dtype == torch.float32)
    problem = _problem()
    expected = _grads(problem)
    assert launches == [{"need_weight": True, "need_bias": True, "need_initial_v": True}], "pair route expected"
    launches.clear()
    with deterministic_algorithms():
        got = _grads(problem)
    assert launches == [{"sweep": (True, True)}]
    assert got[1].abs().max() > 0 and got[3].abs().max() > 0, "the problem needs active entries"
    for name, a, e in zip(("spikes", "dW", "db", "dv0"), got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_deterministic_bias_and_initial_state_gradients_without_the_weight_s(launches, monkeypatch):
    # A frozen weight: no dW, and db, dv0 still without atomics (dL/dI rebuilt for them alone).
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    problem = _problem(seed=2)
    expected = _grads(problem, train_weight=False)
    with deterministic_algorithms():
        got = _grads(problem, train_weight=False)
    assert launches == [{"need_weight": False, "need_bias": True, "need_initial_v": True}, {"sweep": (False, True)}]
    for name, a, e in zip(("spikes", "db", "dv0"), got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_deterministic_runs_agree_bit_for_bit(monkeypatch):
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: True)
    problem = _problem(seed=1)
    with deterministic_algorithms():
        first, second = _grads(problem), _grads(problem)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
