"""``snnopt.optimize(model, x, backend="triton")`` on the seed paper's network, in both modes.

Without a GPU the generated kernels run in Triton's interpreter (see conftest.py), so the network
is the zoo's scaled-down copy of the paper's (40-24-24-5, T=16): outputs and every parameter
gradient must match the original model (exact) and its windowed, reset-detached twin (sparse), on
every route of the spike GEMMs.
"""

from __future__ import annotations

import pytest
import torch

import snnopt
from snnopt.codegen import spike_matmul
from tests.compiler import style_models as zoo
from tests.compiler.style_models import gradients, run

pytest.importorskip("triton")

from snnopt.codegen import triton_lif  # noqa: E402

SEED_PAPER = next(case for case in zoo.STYLE_CASES if case.name == "seed_paper")


# Where the spike GEMMs run: the float32 product (as at these sizes), or each tensor-core route of
# spike_matmul forced (on a GPU they take over from a few hundred neurons on), with the sparse
# weight gradient on the dense route that uses it.
GEMM_ROUTES = [None, *spike_matmul.ROUTES]


@pytest.mark.parametrize("route", GEMM_ROUTES, ids=lambda route: route or "float32")
@pytest.mark.parametrize("backward", ["exact", "sparse"])
def test_optimize_with_the_triton_backend_matches_the_reference(backward, route, device, monkeypatch):
    if route is not None:
        monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: other.dtype == torch.float32)
        monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: False)
    with spike_matmul.prefer(route or "auto"):
        _check_seed_network(backward, device)


def _check_seed_network(backward, device):
    model = SEED_PAPER.build().to(device)
    reference = model if backward == "exact" else SEED_PAPER.build(sparse_twin=True).to(device)
    reference.load_state_dict(model.state_dict())
    inputs = tuple(x.to(device) for x in (SEED_PAPER.example_inputs(),)) if not isinstance(
        SEED_PAPER.example_inputs(), tuple) else tuple(x.to(device) for x in SEED_PAPER.example_inputs())
    opt = snnopt.optimize(model, inputs, backward=backward, backend="triton")
    fused = [node for node in opt.graph.nodes if node.kwargs.get("backend") == "triton"]
    assert len(fused) == 3, opt.code
    got_outputs, expected_outputs = run(opt, inputs), run(reference, inputs)
    for got, expected in zip(got_outputs, expected_outputs):
        if bool(((expected == 0) | (expected == 1)).all()):
            assert torch.equal(got, expected)
        else:
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    expected = {k: g.clone() for k, g in gradients(reference, inputs).items()}
    got = gradients(opt, inputs)
    for name, grad in expected.items():
        error = float((got[name].double() - grad.double()).norm() / max(float(grad.double().norm()), 1e-6))
        assert error <= 1e-4, (name, error)
