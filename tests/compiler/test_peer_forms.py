"""The forms peers' neuron modules take once traced, pass by pass: state a forward assigns to a buffer,
decays recomputed from a parameter at every step, a recurrent ``nn.Linear`` module, traced tests of
the state against ``None`` (snnTorch's ``Leaky(learn_beta=True)``, ``Synaptic``, ``RLeaky``,
``RSynaptic``; the whole models are in ``style_models.PEER_CASES``)."""

from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import snnopt
from snnopt.passes.canonicalize import Canonicalize
from snnopt.passes.expand_recurrent_linear import ExpandRecurrentLinear
from snnopt.passes.pipeline import PassContext
from snnopt.passes.recognise_spike_functions import RecogniseSpikeFunctions
from snnopt.passes.share_constant_subexpressions import ShareConstantSubexpressions
from snnopt.passes.trace import trace_model
from tests.compiler import style_models as zoo
from tests.compiler.style_models import gradients, run

_step = zoo.SuperSpike.apply


def _inputs(batch=5, steps=12, features=10, seed=1):
    return ((torch.rand(batch, steps, features, generator=torch.Generator().manual_seed(seed)) < 0.3).float(),)


# ------------------------------------------------------------------ state a forward assigns to a buffer


class BufferState(torch.nn.Module):
    """The membrane is a buffer that ``forward`` itself sets to zeros before the loop (snnTorch's
    ``reset_mem``), and β is a parameter: the first step multiplies the two."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(10, 8, generator=gen) * 0.7 + 0.1)
        self.beta = torch.nn.Parameter(torch.tensor(0.9))
        self.register_buffer("mem", torch.zeros(0), persistent=False)

    def forward(self, x):
        self.mem = torch.zeros(x.shape[0], 8)
        s = torch.zeros(x.shape[0], 8)
        out = []
        for t in range(x.shape[1]):
            self.mem = self.beta * self.mem + x[:, t] @ self.w - s.detach()
            s = _step(self.mem - 1.0)
            out.append(s)
        return torch.stack(out, dim=1)


def test_a_buffer_the_forward_assigned_is_traced_as_the_value_it_held():
    model = BufferState()
    inputs = _inputs()
    expected = model(*inputs)  # leaves the last membrane in model.mem
    gm, _, _ = trace_model(model, inputs)
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "mem" not in reads, gm.code  # the graph does not read what the last call left there
    with torch.no_grad():
        model.mem = torch.full((5, 8), 7.0)  # stale state must not matter
    assert torch.equal(gm(*inputs), expected)


def test_buffer_state_with_a_learnable_beta_is_fused_exactly():
    model = BufferState()
    inputs = _inputs()
    opt = snnopt.optimize(model, inputs, backward="exact")
    assert [layer.kind for layer in snnopt.explain(opt).layers] == ["lif"], str(snnopt.explain(opt))
    assert torch.equal(run(opt, inputs)[0], run(model, inputs)[0])
    expected = {k: g.clone() for k, g in gradients(model, inputs).items()}
    got = gradients(opt, inputs)
    for name in ("w", "beta"):
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name


# ------------------------------------------------------------------ repeated constant computations


class ClampedDecay(torch.nn.Module):
    """β = clamp(β_raw, 0, 1) recomputed at every step, as snnTorch's ``Leaky(learn_beta=True)`` does; a
    dropout mask drawn at every step beside it, which must stay one draw per step."""

    def __init__(self, dropout=False):
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.w = torch.nn.Parameter(torch.randn(10, 8, generator=gen) * 0.7 + 0.1)
        self.beta = torch.nn.Parameter(torch.tensor(0.9))
        self.gain = torch.nn.Parameter(torch.ones(8))
        self.dropout = dropout

    def forward(self, x):
        v = torch.zeros(x.shape[0], 8)
        s = torch.zeros_like(v)
        out = []
        for t in range(x.shape[1]):
            current = x[:, t] @ self.w
            if self.dropout:
                current = current * F.dropout(self.gain, 0.5)  # the same call at every step
            v = self.beta.clamp(0, 1) * v + current - s.detach()
            s = _step(v - 1.0)
            out.append(s)
        return torch.stack(out, dim=1)


def _after(model, inputs, *passes):
    gm, _, _ = trace_model(model, inputs)
    for rewrite in passes:
        rewrite(gm, PassContext())
    gm.graph.lint()
    gm.recompile()
    return gm


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


def test_a_decay_recomputed_from_a_parameter_at_every_step_becomes_one_node():
    inputs = _inputs()
    before = _after(ClampedDecay(), inputs, Canonicalize())
    after = _after(ClampedDecay(), inputs, Canonicalize(), ShareConstantSubexpressions())
    assert _count(before, "clamp") == inputs[0].shape[1]
    assert _count(after, "clamp") == 1
    torch.manual_seed(0)
    expected = ClampedDecay()(*inputs)
    assert torch.equal(after(*inputs), expected)


def test_random_draws_are_not_merged():
    inputs = _inputs()
    gm = _after(ClampedDecay(dropout=True), inputs, Canonicalize(), ShareConstantSubexpressions())
    assert _count(gm, F.dropout) == inputs[0].shape[1]  # one mask per step, as written
    assert _count(gm, "clamp") == 1


class WrittenCopies(torch.nn.Module):
    """Two equal expressions of a parameter, each then written in place differently: they are two tensors."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def forward(self, x):
        a = self.p.detach().mul(2.0)
        b = self.p.detach().mul(2.0)
        a.add_(1.0)
        b.view(2).mul_(3.0)
        return x * a + x * b


def test_results_written_in_place_are_not_merged():
    inputs = (torch.ones(3, 2),)
    model = WrittenCopies()
    gm = _after(model, inputs, ShareConstantSubexpressions())
    assert torch.equal(gm(*inputs), model(*inputs))


# ------------------------------------------------------------------ recurrent nn.Linear modules


class LinearRecurrence(torch.nn.Module):
    """A user's recurrent layer with an ``nn.Linear`` recurrence (bias included) and a feed-forward
    ``nn.Linear`` into a second layer: only the first feeds back."""

    def __init__(self):
        super().__init__()
        self.fc = zoo._linear(10, 8, seed=41, gain=2.2, bias_mean=0.05)
        self.rec = zoo._linear(8, 8, seed=43, gain=0.8, bias_mean=-0.02)
        self.fc2 = zoo._linear(8, 6, seed=45, gain=2.5, bias_mean=0.1)

    def forward(self, x):
        v1 = torch.zeros(x.shape[0], 8)
        s1 = torch.zeros_like(v1)
        v2 = torch.zeros(x.shape[0], 6)
        s2 = torch.zeros_like(v2)
        out = []
        for t in range(x.shape[1]):
            v1 = 0.9 * v1 + self.fc(x[:, t]) + self.rec(s1) - s1.detach()
            s1 = _step(v1 - 1.0)
            v2 = 0.85 * v2 + self.fc2(s1) - s2.detach()
            s2 = _step(v2 - 1.0)
            out.append(s2)
        return torch.stack(out, dim=1)


def test_only_a_linear_that_feeds_back_is_expanded():
    inputs = _inputs()
    gm = _after(LinearRecurrence(), inputs, Canonicalize(), RecogniseSpikeFunctions(), ExpandRecurrentLinear())
    modules = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    steps = inputs[0].shape[1]
    assert modules["fc2"] == steps and modules["fc"] == steps  # feed-forward: left to hoist_linear
    assert modules["rec"] == 1  # the first step's rec(zeros): no spikes yet
    assert _count(gm, F.linear) == steps - 1
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} >= {"rec.weight", "rec.bias"}
    assert torch.allclose(gm(*inputs), LinearRecurrence()(*inputs))


@pytest.mark.parametrize("backward", ["exact", "sparse"])
def test_a_linear_recurrence_with_bias_is_fused_with_its_gradients(backward):
    model, inputs = LinearRecurrence(), _inputs()
    opt = snnopt.optimize(model, inputs, backward=backward)
    report = snnopt.explain(opt)
    assert [(layer.kind, layer.recurrent) for layer in report.layers] == [("lif", True), ("lif", False)], str(report)
    assert torch.equal(run(opt, inputs)[0], run(model, inputs)[0])
    if backward == "exact":
        expected = {k: g.clone() for k, g in gradients(model, inputs).items()}
        got = gradients(opt, inputs)
        for name in ("fc.weight", "rec.weight", "rec.bias", "fc2.weight"):
            assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name


# ------------------------------------------------------------------ whole snnTorch layers


def test_snntorch_learnable_decays_are_refused_in_sparse_mode_and_nothing_else_is_fused():
    pytest.importorskip("snntorch")
    case = {c.name: c for c in zoo.PEER_CASES}["snntorch_learnable"]
    model = case.build()
    opt = snnopt.optimize(model, case.example_inputs(), backward="sparse")
    report = snnopt.explain(opt)
    # No pieces of the refused layers fused as leaky integrators (their membranes feed spikes); the
    # synaptic current, a linear integrator over every step, may be (exact in both modes).
    steps = case.example_inputs()[0].shape[1]
    assert [(layer.kind, layer.steps) for layer in report.layers] in ([], [("leaky_integrator", steps)]), str(report)
    reasons = " | ".join(s.reason for s in report.skipped)
    assert "learnable" in reasons and "backward='exact'" in reasons, reasons
    inputs = case.example_inputs()
    assert torch.equal(run(opt, inputs)[0], run(model, inputs)[0])


def test_snntorch_synaptic_fuses_as_one_current_based_layer():
    # Its traced `syn == None` tests are dead users of the synaptic current: they must not keep the
    # synaptic integrator apart from the membrane's LIF.
    pytest.importorskip("snntorch")
    case = {c.name: c for c in zoo.PEER_CASES}["snntorch_synaptic"]
    gm, _, _ = trace_model(case.build(), case.example_inputs())
    assert any(n.target is operator.eq for n in gm.graph.nodes)
    opt = snnopt.optimize(case.build(), case.example_inputs(), backward="exact")
    assert [layer.kind for layer in snnopt.explain(opt).layers] == ["cuba_lif", "lif"]


# ------------------------------------------------------------------ translation validation's numbering


class RefusedThenFused(torch.nn.Module):
    """Layer 1 hands out an intermediate value (its leak), so fuse_layers refuses it after detection;
    layer 2 fuses."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(6)
        self.w1 = torch.nn.Parameter(torch.randn(10, 8, generator=gen) * 0.7 + 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(8, 6, generator=gen) * 0.9 + 0.2)

    def forward(self, x):
        v1, s1 = torch.zeros(x.shape[0], 8), torch.zeros(x.shape[0], 8)
        v2, s2 = torch.zeros(x.shape[0], 6), torch.zeros(x.shape[0], 6)
        leaks, out = [], []
        for t in range(x.shape[1]):
            leak = 0.9 * v1
            leaks.append(leak)
            v1 = leak + x[:, t] @ self.w1 - s1.detach()
            s1 = _step(v1 - 1.0)
            v2 = 0.8 * v2 + s1 @ self.w2 - s2.detach()
            s2 = _step(v2 - 1.0)
            out.append(s2)
        return torch.stack(out, dim=1), torch.stack(leaks, dim=1)


def test_a_rejected_layer_is_excluded_by_its_detection_number(monkeypatch):
    # Translation validation rejects every fused layer here (forced). The layer it must put back is
    # detection's second match, fused first: excluding "fused layer 0" would exclude the refused
    # match instead and leave the rejected layer in.
    import snnopt.compiler as compiler

    def reject_fused(model, gm, inputs):
        return "output 0 differs (forced)" if any(n.target is compiler.fused_layer for n in gm.graph.nodes) else ""

    monkeypatch.setattr(compiler, "_validate", reject_fused)
    model, inputs = RefusedThenFused(), _inputs()
    report = snnopt.explain(snnopt.optimize(model, inputs, backward="exact"))
    assert not report.layers, str(report)
    reasons = [s.reason for s in report.skipped]
    assert any("intermediate value" in r for r in reasons), reasons
    assert any("did not reproduce the original" in r and "forced" in r for r in reasons), reasons
    assert not any("traced graph does not reproduce" in r for r in reasons), reasons


class SnntorchResets(torch.nn.Module):
    """One snnTorch layer with a given reset mechanism, states passed explicitly."""

    def __init__(self, kind: str, reset: str):
        super().__init__()
        import snntorch
        from snntorch import surrogate

        self.fc = zoo._linear(10, 8, seed=51, gain=2.2, bias_mean=0.05)
        spike_grad = surrogate.fast_sigmoid(slope=25)
        if kind == "rleaky":
            self.lif = snntorch.RLeaky(beta=0.9, linear_features=8, spike_grad=spike_grad, reset_mechanism=reset)
            self.lif.recurrent = zoo._linear(8, 8, seed=53, gain=0.8)
        else:
            self.lif = snntorch.Leaky(beta=0.9, spike_grad=spike_grad, reset_mechanism=reset)
        self.kind = kind

    def forward(self, x):
        state = self.lif.init_rleaky() if self.kind == "rleaky" else (None, self.lif.init_leaky())
        spk, mem = state
        out = []
        for t in range(x.shape[1]):
            if self.kind == "rleaky":
                spk, mem = self.lif(self.fc(x[:, t]), spk, mem)
            else:
                spk, mem = self.lif(self.fc(x[:, t]), mem)
            out.append(spk)
        return torch.stack(out, dim=1)


@pytest.mark.parametrize("backward", ["exact", "sparse"])
@pytest.mark.parametrize("kind, reset, fused", [("leaky", "zero", True), ("leaky", "none", True),
                                                ("rleaky", "none", True), ("rleaky", "zero", False)])
def test_snntorch_reset_mechanisms(kind, reset, fused, backward):
    pytest.importorskip("snntorch")
    model, inputs = SnntorchResets(kind, reset), _inputs()
    opt = snnopt.optimize(model, inputs, backward=backward)
    report = snnopt.explain(opt)
    assert [layer.kind for layer in report.layers] == (["lif"] if fused else []), str(report)
    if not fused:  # RLeaky's zero reset also discards the step's input: not the fused op's v·(1 − s)
        assert any("reset" in s.reason for s in report.skipped), str(report)
    assert torch.equal(run(opt, inputs)[0], run(model, inputs)[0])
    if backward == "exact":
        expected = {k: g.clone() for k, g in gradients(model, inputs).items()}
        got = gradients(opt, inputs)
        for name, grad in expected.items():
            assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name
