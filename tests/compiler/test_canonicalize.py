"""Method and torch-function spellings of the LIF update fuse like the operator spelling."""

from __future__ import annotations

import operator

import torch

import snnopt
from snnopt.passes.canonicalize import Canonicalize
from snnopt.passes.pipeline import PassContext
from snnopt.passes.trace import trace_model
from tests.compiler import style_models as zoo
from tests.compiler.style_models import gradients, run


class MethodSpelling(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.w = torch.nn.Parameter(torch.randn(12, 10, generator=gen) * 0.6 + 0.08)

    def forward(self, x):
        v = torch.zeros(x.shape[0], 10)
        s = torch.zeros_like(v)
        out = []
        for t in range(x.shape[1]):
            v = torch.add(v.mul(0.9), torch.matmul(x[:, t], self.w)).sub(s.detach().mul(1.0))
            s = _step(v.sub(1.0))
            out.append(s)
        return torch.stack(out, dim=1)


_step = zoo.SuperSpike.apply


def _inputs():
    return ((torch.rand(5, 14, 12, generator=torch.Generator().manual_seed(1)) < 0.3).float(),)


def test_canonicalize_turns_methods_and_torch_functions_into_operators():
    gm, _, _ = trace_model(MethodSpelling(), _inputs())
    Canonicalize()(gm, PassContext())
    targets = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert not targets & {torch.add, torch.matmul, "mul", "sub", "add"}
    assert {operator.add, operator.sub, operator.mul, operator.matmul} <= targets
    model = MethodSpelling()
    assert torch.equal(gm(*_inputs()), model(*_inputs()))


def test_method_spelling_is_fused_with_the_same_results():
    model = MethodSpelling()
    opt = snnopt.optimize(model, _inputs(), backward="exact")
    assert [layer.kind for layer in snnopt.explain(opt).layers] == ["lif"], str(snnopt.explain(opt))
    inputs = _inputs()
    assert torch.equal(run(opt, inputs)[0], run(model, inputs)[0])
    expected = gradients(model, inputs)["w"].clone()
    assert torch.allclose(gradients(opt, inputs)["w"], expected, rtol=1e-4, atol=1e-6)
