"""snnopt.capture_graphs on a real GPU: the replayed step against the eager one, and its eager fallbacks.

Run with ``python -m pytest -m gpu``; skipped without CUDA. The plan's static path is also tested
without a GPU, in Triton's interpreter (test_capture_plan.py).
"""

import pytest
import torch

pytest.importorskip("triton")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _graph_network(x, w1, w2, w3):
    import snnopt.functional as SF

    h1 = SF.linear_lif(x, w1, beta=0.9, window=0.2)
    h2 = SF.linear_lif(h1, w2, beta=0.9, window=0.2)
    return SF.linear_leaky_integrator(h2, w3, beta=0.9, input_scale=0.1)


def _graph_problem(rate=0.05, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.rand(64, 100, 784, device="cuda", generator=gen) < rate).float()
    ws = [(torch.rand(o, i, device="cuda", generator=gen) - 0.3) * (6.0 / i) ** 0.5
          for o, i in ((200, 784), (200, 200), (10, 200))]
    return x, [w.requires_grad_() for w in ws]


def _graph_step(model, x, weights):
    out = model(x, *weights)
    return [out.detach().clone()] + [g.clone() for g in torch.autograd.grad(out.amax(1).logsumexp(1).sum(),
                                                                            weights)]


def test_captured_graphs_replay_the_eager_step():
    import snnopt

    x, weights = _graph_problem()
    expected = _graph_step(_graph_network, x, weights)
    graphed = snnopt.capture_graphs(_graph_network, (x, *weights))
    assert any(site["active_seen"] > 0 for site in graphed.plan.summary())
    for _ in range(2):  # replays, not the capture run
        got = _graph_step(graphed, x, weights)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Another batch of the same shape replays the same graphs on its own values.
    x2 = (torch.rand(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(5)) < 0.05).float()
    for a, b in zip(_graph_step(graphed, x2, weights), _graph_step(_graph_network, x2, weights)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert graphed.fallbacks == 0


def test_a_busier_step_than_captured_runs_eagerly_with_the_same_results():
    import snnopt

    x, weights = _graph_problem(rate=0.02)
    graphed = snnopt.capture_graphs(_graph_network, (x, *weights), headroom=1.0)
    busy = (torch.rand(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)) < 0.2).float()
    with pytest.warns(RuntimeWarning, match="ran eagerly"):
        got = _graph_step(graphed, busy, weights)
    assert graphed.fallbacks == 1
    for a, b in zip(got, _graph_step(_graph_network, busy, weights)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Busy steps in a row (each overflows only the backward's lists: the replayed forward's outputs
    # are handed out, the backward is recomputed eagerly): the next forward captures again on the
    # busy input, whose replays then hold.
    for _ in range(graphed.recapture_after - 1):
        _graph_step(graphed, busy, weights)
    assert graphed.recaptures == 0 and graphed.fallbacks == graphed.recapture_after
    for a, b in zip(_graph_step(graphed, busy, weights), _graph_step(_graph_network, busy, weights)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert graphed.recaptures == 1 and graphed.fallbacks == graphed.recapture_after


def test_replays_hand_out_fresh_outputs_and_gradients_that_accumulate():
    import snnopt

    x, weights = _graph_problem()
    x2 = (torch.rand(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7)) < 0.05).float()
    graphed = snnopt.capture_graphs(_graph_network, (x, *weights))
    example = x.clone()
    first = graphed(x2, *weights)
    first.amax(1).logsumexp(1).sum().backward()
    kept, grads_once = first.detach().clone(), [w.grad.clone() for w in weights]
    second = graphed(x, *weights)  # a replay on other values: `first` and the .grad tensors stay as they were
    second.amax(1).logsumexp(1).sum().backward()
    assert torch.equal(first.detach(), kept) and torch.equal(x, example)
    expected = _graph_step(_graph_network, x, weights)
    torch.testing.assert_close(second.detach(), expected[0], rtol=1e-5, atol=1e-6)
    for w, once, again in zip(weights, grads_once, expected[1:]):  # accumulated, as without graphs
        torch.testing.assert_close(w.grad, once + again, rtol=1e-5, atol=1e-6)
    assert graphed.fallbacks == 0


def test_backwards_after_a_capture_accumulate_on_the_callers_stream():
    # The captured step's autograd graph is dropped once its backward is captured: kept, it would keep
    # each parameter's AccumulateGrad node as created on the capture's side stream, and every later
    # backward into .grad, replayed or eager, would be synchronised onto that stream (torch warns).
    # Parameters of a module: the captured forward reads them directly (tensors passed as inputs are
    # copied into the graphs' own).
    import warnings

    import snnopt

    x, weights = _graph_problem()

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterList(torch.nn.Parameter(w.detach().clone()) for w in weights)

        def forward(self, x):
            return _graph_network(x, *self.weights)

    network = Network()
    graphed = snnopt.capture_graphs(network, (x,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model in (graphed, network, graphed):  # replayed, eager with the same parameters, replayed
            model(x).amax(1).logsumexp(1).sum().backward()
        torch.cuda.synchronize()
    mismatches = [str(w.message) for w in caught if "AccumulateGrad" in str(w.message)]
    assert not mismatches, mismatches
    assert all(w.grad is not None for w in network.weights) and graphed.fallbacks == 0


def test_replayed_and_eager_steps_agree_with_the_backward_on_the_calling_thread():
    # A training loop may run its backward on the calling thread (benchmarks/gpu_suite.py times both
    # sides so too): the engine then runs the CUDA nodes, the replay included, without its device thread.
    import snnopt

    x, weights = _graph_problem()
    graphed = snnopt.capture_graphs(_graph_network, (x, *weights))  # captured as usual, replayed without the thread
    with torch.autograd.set_multithreading_enabled(False):
        expected = _graph_step(_graph_network, x, weights)
        for _ in range(2):
            for a, b in zip(_graph_step(graphed, x, weights), expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert graphed.fallbacks == 0


def test_split_gemm_inputs_are_checked_before_the_replay(monkeypatch):
    # The split GEMM forced on (as for large layers): layer 1's input, an input of the step, is checked
    # before each replay; layers 2 and 3 take the spikes of the layer before, which need no check. An
    # input that is no longer spikes runs the step eagerly, with the eager results.
    import snnopt
    from snnopt.codegen import spike_matmul

    monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: other.dtype == torch.float32)
    x, weights = _graph_problem()
    graphed = snnopt.capture_graphs(_graph_network, (x, *weights))
    assert graphed.plan.input_checks == {0: {spike_matmul.BFLOAT16}} and not graphed.plan.checks_in_graph
    for a, b in zip(_graph_step(graphed, x, weights), _graph_step(_graph_network, x, weights)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    real = x * 0.3
    with pytest.warns(RuntimeWarning, match="ran eagerly"):
        got = _graph_step(graphed, real, weights)
    for a, b in zip(got, _graph_step(_graph_network, real, weights)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert graphed.fallbacks == 1
