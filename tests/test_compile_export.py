import copy
import os

import pytest
import torch

import snnopt.nn as snn


class TwoLayerSnn(torch.nn.Module):
    def __init__(self, backward="sparse", recurrent=False):
        super().__init__()
        self.hidden = snn.LinearLIF(6, 8, recurrent=recurrent, beta=0.85, backward=backward, window=0.3)
        self.out = snn.LinearLIF(8, 3, beta=0.9, alpha=0.6, reset="zero", backward=backward, window=0.3)
        self.readout = snn.LeakyIntegrator(0.8)

    def forward(self, x):
        return self.readout(self.out(self.hidden(x))).sum(1)


def _model(backward, recurrent=False):
    torch.manual_seed(0)
    model = TwoLayerSnn(backward, recurrent).double()
    with torch.no_grad():
        for layer in (model.hidden, model.out):
            layer.weight.mul_(4.0)  # nn.Linear init is too weak to make these small layers spike
            layer.bias.fill_(0.3)
    return model


def _inputs(batch=3, steps=10):
    gen = torch.Generator().manual_seed(1)
    return (torch.rand(batch, steps, 6, generator=gen, dtype=torch.float64) < 0.5).double()


def _loss_and_grads(model, x, call=None):
    model.zero_grad()
    out = (model if call is None else call)(x)
    target = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    ((out - target) ** 2).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _check_compiled(backward, recurrent, **compile_kwargs):
    eager = _model(backward, recurrent)
    x = _inputs()
    eager_out, eager_grads = _loss_and_grads(eager, x)
    assert eager_out.abs().sum() > 0, "the model must spike for the test to mean something"
    assert any(g.abs().sum() > 0 for g in eager_grads.values())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, **compile_kwargs)
    out, grads = _loss_and_grads(compiled_model, x, call=compiled)
    torch.testing.assert_close(out, eager_out, rtol=1e-9, atol=1e-12)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # A second shape must retrace or reuse a dynamic graph, not return stale results.
    x2 = _inputs(batch=2, steps=7)
    torch.testing.assert_close(compiled(x2), eager(x2), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backward", ["sparse", "exact"])
@pytest.mark.parametrize("recurrent", [False, True])
def test_torch_compile_aot_eager_matches_eager_outputs_and_gradients(backward, recurrent):
    torch._dynamo.reset()
    _check_compiled(backward, recurrent, backend="aot_eager")


@pytest.mark.skipif(os.environ.get("SNNOPT_SKIP_INDUCTOR") == "1", reason="SNNOPT_SKIP_INDUCTOR=1")
def test_torch_compile_inductor_matches_eager_outputs_and_gradients():
    torch._dynamo.reset()
    _check_compiled("sparse", False)


@pytest.mark.parametrize("backward", ["sparse", "exact"])
@pytest.mark.parametrize("recurrent", [False, True])
def test_torch_export_matches_eager_and_keeps_fused_ops(backward, recurrent):
    model = _model(backward, recurrent).eval()
    x = _inputs()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-9, atol=1e-12)
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert sum(t.startswith("snnopt.") for t in targets) >= 3, f"fused ops were decomposed: {targets}"
    # The per-step recurrence must not be unrolled: the graph must not grow with the sequence length.
    longer = torch.export.export(model, (_inputs(steps=25),))
    assert len(longer.graph.nodes) == len(exported.graph.nodes)


def test_torch_export_with_dynamic_time_dimension():
    model = _model("sparse").eval()
    steps = torch.export.Dim("steps", min=2, max=64)
    exported = torch.export.export(model, (_inputs(steps=10),), dynamic_shapes={"x": {1: steps}})
    x = _inputs(steps=23)
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-9, atol=1e-12)
