"""The generated Triton kernels against the reference, on tiny shapes (Triton's interpreter on CPU).

Which spec variants run is described in ``triton_cases`` (a pairwise covering array over every
spec, dtype and shape dimension) plus the explicit edge cases below. On a machine with CUDA the
same tests run the compiled kernels on the GPU.
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

import snnopt.functional as SF  # noqa: E402
from snnopt.codegen.reference import reference_leaky_integrator, reference_lif  # noqa: E402
from snnopt.spec import LifSpec  # noqa: E402
from tests.codegen.triton_cases import (CASES, DIMENSIONS, case_id, compare_with_reference,  # noqa: E402
                                        make_layer, pairwise_cases, run_snnopt)


def test_cases_cover_every_pair():
    names = list(DIMENSIONS)
    seen = {(a, c[a], b, c[b]) for c in CASES for a, b in itertools.combinations(names, 2)}
    for a, b in itertools.combinations(names, 2):
        for va, vb in itertools.product(DIMENSIONS[a], DIMENSIONS[b]):
            impossible = (a, b) in (("recurrent", "linear"), ("linear", "bias")) and (va, vb) in ((True, False),)
            impossible |= (a, b) == ("linear", "bias") and (va, vb) == (False, True)
            assert impossible or (a, va, b, vb) in seen, f"pair {a}={va}, {b}={vb} not covered"
    assert pairwise_cases(seed=0) + pairwise_cases(seed=1) == CASES  # deterministic


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_variant_matches_reference(case, device):
    compare_with_reference(make_layer(case, device=device))


BASE = dict(cuba=False, recurrent=False, reset="subtract", detach_reset=True, surrogate="superspike",
            backward="sparse", fire_at_threshold=False, dtype="float64", steps=5, linear=True, bias=True)


@pytest.mark.parametrize("backward", ["sparse", "exact"])
@pytest.mark.parametrize("level", ["silent", "saturated"])
def test_no_spikes_and_all_spikes(backward, level, device):
    layer = make_layer({**BASE, "backward": backward, "cuba": True, "recurrent": True}, device=device)
    with torch.no_grad():
        sign = -1.0 if level == "silent" else 1.0
        layer.tensors["weight"].abs_().mul_(sign * 3.0)
        layer.tensors["bias"].fill_(sign * 3.0)
        layer.tensors["recurrent_weight"].abs_().mul_(sign)
    compare_with_reference(layer)
    assert run_snnopt(layer)[0].mean().item() == (0.0 if level == "silent" else 1.0)


@pytest.mark.parametrize("fire_at_threshold", [False, True])
@pytest.mark.parametrize("backward", ["sparse", "exact"])
def test_membrane_exactly_at_threshold(fire_at_threshold, backward, device):
    current = torch.zeros(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    v0 = torch.ones(2, 4, dtype=torch.float64, device=device, requires_grad=True)
    spec = LifSpec(reset="none", fire_at_threshold=fire_at_threshold, backward=backward)
    out = SF.lif(current, beta=1.0, threshold=1.0, reset="none", fire_at_threshold=fire_at_threshold,
                 backward=backward, initial_state=v0, backend="triton")
    ref = reference_lif(current, spec, beta=1.0, threshold=1.0, initial_v=v0)[0]
    torch.testing.assert_close(out, ref)
    assert out.sum().item() == (24.0 if fire_at_threshold else 0.0)
    grads = torch.autograd.grad(out.sum(), [current, v0])
    grads_ref = torch.autograd.grad(ref.sum(), [current, v0])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cuba", [False, True])
@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("detach_reset", [True, False])
def test_learnable_beta_threshold_alpha_exact(cuba, reset, detach_reset, device):
    case = {**BASE, "backward": "exact", "cuba": cuba, "reset": reset, "detach_reset": detach_reset,
            "recurrent": True}
    compare_with_reference(make_layer(case, device=device, learn_params=True))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_input_gradient_only_at_input_active(dtype, device):
    layer = make_layer({**BASE, "dtype": dtype}, device=device, batch=3)
    x = layer.tensors["x"]
    active = torch.tensor([0, 5, 6, 17, 40, 59], device=device)
    spikes = SF.linear_lif(x, layer.tensors["weight"], layer.tensors["bias"], beta=layer.tensors["beta"],
                           threshold=layer.tensors["threshold"], window=0.5, surrogate=layer.spec.surrogate,
                           input_active=active, backend="triton")
    full = SF.linear_lif(x, layer.tensors["weight"], layer.tensors["bias"], beta=layer.tensors["beta"],
                         threshold=layer.tensors["threshold"], window=0.5, surrogate=layer.spec.surrogate,
                         input_active=None, backend="triton")
    upstream = torch.randn(spikes.shape, dtype=spikes.dtype, device=device)
    grad, grad_w = torch.autograd.grad((spikes * upstream).sum(), [x, layer.tensors["weight"]])
    grad_full, grad_w_full = torch.autograd.grad((full * upstream).sum(), [x, layer.tensors["weight"]])
    expected = torch.zeros_like(grad_full).reshape(-1)
    expected[active] = grad_full.reshape(-1)[active]
    torch.testing.assert_close(grad, expected.reshape(grad.shape))
    torch.testing.assert_close(grad_w, grad_w_full)


def test_sparse_layers_pass_their_active_set_downstream(device):
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(2, 6, 5, generator=gen) < 0.5).double().to(device)
    w1 = (torch.rand(7, 5, generator=gen, dtype=torch.float64) * 0.9).to(device).requires_grad_()
    w2 = (torch.rand(3, 7, generator=gen, dtype=torch.float64) * 0.9).to(device).requires_grad_()
    grads = []
    for backend, restrict in (("triton", "auto"), ("triton", None)):
        h = SF.linear_lif(x, w1, beta=0.9, window=0.5, backend=backend)
        out = SF.linear_lif(h, w2, beta=0.9, window=0.5, backend=backend, input_active=restrict, return_membrane=True)
        grads.append(torch.autograd.grad(out.membrane.sum() + out.spikes.sum(), [w1, w2]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_leaky_integrators_match_reference(dtype, device):
    gen = torch.Generator().manual_seed(4)
    current = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    beta = torch.tensor([0.5, 0.8, 0.95], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        device=device, requires_grad=True)
    v0 = torch.randn(2, 3, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    out, final = SF.leaky_integrator(current, beta=beta, initial_state=v0, return_state=True, backend="triton")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref, ref_final = reference_leaky_integrator(current.to(acc), beta=beta, initial_state=v0.to(acc))
    rtol, atol = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    torch.testing.assert_close(out.to(acc), ref, rtol=rtol, atol=atol)
    g = torch.randn(ref.shape, generator=gen, dtype=acc).to(device)
    ours = torch.autograd.grad((out.to(acc) * g).sum() + final.to(acc).sum(), [current, beta, v0])
    theirs = torch.autograd.grad((ref * g).sum() + ref_final.sum(), [current, beta, v0])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.to(acc), b.to(acc), rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


def test_linear_leaky_integrator_matches_cpu_backend():
    gen = torch.Generator().manual_seed(5)
    x = (torch.rand(2, 4, 6, generator=gen) < 0.4).double()
    w = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    results = []
    for backend in ("cpu", "triton"):
        out = SF.linear_leaky_integrator(x, w, beta=0.9, input_scale=0.1, backend=backend)
        results.append((out, *torch.autograd.grad(out.square().sum(), [w])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_time_first_layout():
    gen = torch.Generator().manual_seed(6)
    current = torch.rand(4, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    outs = [SF.lif(current, beta=0.8, time_dim=0, backward="exact", backend=b) for b in ("cpu", "triton")]
    torch.testing.assert_close(outs[0], outs[1])
    grads = [torch.autograd.grad((o * torch.arange(o.numel()).reshape(o.shape)).sum(), current)[0] for o in outs]
    torch.testing.assert_close(grads[0], grads[1])
