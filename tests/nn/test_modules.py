import math

import pytest
import torch

import snnopt.functional as snf
import snnopt.nn as snn
from snnopt import surrogate as surrogate_lib
from snnopt.codegen.reference import reference_leaky_integrator, reference_lif, reference_linear_lif
from snnopt.spec import LifSpec

F64 = torch.float64


def _clear_of_threshold(membrane, threshold, window):
    u = (membrane - threshold).abs()
    return u.min() > 1e-6 and (u - window).abs().min() > 1e-6


@pytest.mark.parametrize("backward", ["sparse", "exact"])
@pytest.mark.parametrize("reset,cuba", [("subtract", False), ("zero", True), ("none", False)])
@pytest.mark.parametrize("time_dim", [1, 0])
def test_lif_module_matches_reference(backward, reset, cuba, time_dim):
    gen = torch.Generator().manual_seed(0)
    current = torch.rand(3, 8, 2, 3, generator=gen, dtype=F64) * 0.8 - 0.1
    kwargs = dict(reset=reset, detach_reset=False, alpha=0.7 if cuba else None, surrogate="atan:3",
                  backward=backward, window=0.3)
    spec = LifSpec(reset=reset, detach_reset=False, cuba=cuba, surrogate=surrogate_lib.atan(3.0),
                   backward=backward, window=0.3)
    layer = snn.LIF(0.85, 0.9, time_dim=time_dim, **kwargs).double()
    # The constants are buffers of the default dtype: compare with the values the module holds.
    torch.testing.assert_close(layer.beta, torch.tensor(0.85, dtype=F64), rtol=1e-7, atol=0)
    ref_in = current.clone().requires_grad_()
    ref_spikes, ref_membrane, ref_v, ref_syn = reference_lif(ref_in, spec, beta=layer.beta, threshold=layer.threshold,
                                                             alpha=layer.alpha)
    assert _clear_of_threshold(ref_membrane, 0.9, 0.3)
    op_in = current.clone().requires_grad_()
    spikes, state = layer(op_in if time_dim == 1 else op_in.transpose(0, 1), return_state=True)
    spikes = spikes if time_dim == 1 else spikes.transpose(0, 1)
    torch.testing.assert_close(spikes, ref_spikes, rtol=0, atol=0)
    torch.testing.assert_close(state.v, ref_v)
    if cuba:
        torch.testing.assert_close(state.syn, ref_syn)
    upstream = torch.randn(ref_spikes.shape, generator=gen, dtype=F64)
    (spikes * upstream).sum().backward()
    (ref_spikes * upstream).sum().backward()
    torch.testing.assert_close(op_in.grad, ref_in.grad, rtol=1e-9, atol=1e-12)


def test_lif_module_without_state_returns_spikes_tensor_equal_to_functional():
    current = torch.rand(2, 6, 5, dtype=F64) * 2
    layer = snn.LIF(0.8).double()
    spikes = layer(current)
    assert isinstance(spikes, torch.Tensor)
    torch.testing.assert_close(spikes, snf.lif(current, beta=layer.beta), rtol=0, atol=0)


@pytest.mark.parametrize("backward", ["sparse", "exact"])
def test_lif_module_state_carries_between_chunks(backward):
    gen = torch.Generator().manual_seed(1)
    current = torch.rand(2, 10, 4, generator=gen, dtype=F64) * 0.8 - 0.1
    layer = snn.LIF(0.9, alpha=0.5, backward=backward).double()
    whole, whole_state = layer(current, return_state=True)
    first, state = layer(current[:, :4], return_state=True)
    second, final_state = layer(current[:, 4:], state, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=0)
    torch.testing.assert_close(final_state.v, whole_state.v)
    torch.testing.assert_close(final_state.syn, whole_state.syn)


@pytest.mark.parametrize("backward", ["sparse", "exact"])
@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_lif_module_matches_reference(backward, recurrent, bias):
    torch.manual_seed(2)
    layer = snn.LinearLIF(6, 5, bias=bias, recurrent=recurrent, beta=0.85, threshold=1.1, reset="subtract",
                          backward=backward, window=0.25).double()
    with torch.no_grad():
        layer.weight.mul_(2.0)  # more drive than the nn.Linear init, so the layer spikes
        if bias:
            layer.bias.fill_(0.4)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 9, 6, generator=gen, dtype=F64)
    weight = layer.weight.detach().clone().requires_grad_()
    bias_ref = layer.bias.detach().clone().requires_grad_() if bias else None
    rec_ref = layer.recurrent_weight.detach().clone().requires_grad_() if recurrent else None
    spec = LifSpec(recurrent=recurrent, backward=backward, window=0.25)
    x_ref = x.clone().requires_grad_()
    ref_spikes, ref_membrane, _, _ = reference_linear_lif(x_ref, weight, bias_ref, spec, beta=layer.beta,
                                                          threshold=layer.threshold, recurrent_weight=rec_ref)
    assert _clear_of_threshold(ref_membrane, 1.1, 0.25)
    assert 0 < ref_spikes.sum() < ref_spikes.numel()
    x_op = x.clone().requires_grad_()
    spikes = layer(x_op)
    torch.testing.assert_close(spikes, ref_spikes, rtol=0, atol=0)
    upstream = torch.randn(ref_spikes.shape, generator=gen, dtype=F64)
    (spikes * upstream).sum().backward()
    (ref_spikes * upstream).sum().backward()
    torch.testing.assert_close(x_op.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-9, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.bias.grad, bias_ref.grad, rtol=1e-9, atol=1e-12)
    if recurrent:
        torch.testing.assert_close(layer.recurrent_weight.grad, rec_ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bias,recurrent,expected", [
    (True, False, {"weight", "bias"}),
    (False, False, {"weight"}),
    (True, True, {"weight", "bias", "recurrent_weight"}),
])
def test_linear_lif_parameters_and_state_dict_keys(bias, recurrent, expected):
    layer = snn.LinearLIF(3, 4, bias=bias, recurrent=recurrent)
    assert {name for name, _ in layer.named_parameters()} == expected
    assert expected <= set(layer.state_dict())
    assert layer.weight.shape == (4, 3)
    if bias:
        assert layer.bias.shape == (4,)
    if recurrent:
        assert layer.recurrent_weight.shape == (4, 4)


def test_linear_lif_initialised_like_nn_linear():
    torch.manual_seed(4)
    layer = snn.LinearLIF(50, 40)
    bound = 1 / math.sqrt(50)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    # Uniform on [-bound, bound]: the spread must use most of the interval, not a tiny init.
    assert layer.weight.abs().max() > 0.9 * bound
    assert layer.weight.dtype == torch.get_default_dtype()


def test_lif_module_without_learning_has_no_parameters():
    assert list(snn.LIF(0.9).parameters()) == []
    assert list(snn.LeakyIntegrator(0.9).parameters()) == []


@pytest.mark.parametrize("module_factory,name", [
    (lambda: snn.LIF(0.9, learn_beta=True, backward="exact"), "beta"),
    (lambda: snn.LIF(0.9, learn_threshold=True, backward="exact"), "threshold"),
    (lambda: snn.LIF(0.9, alpha=0.5, learn_alpha=True, backward="exact"), "alpha"),
    (lambda: snn.LinearLIF(3, 4, learn_beta=True, backward="exact"), "beta"),
    (lambda: snn.LeakyIntegrator(0.9, learn_beta=True), "beta"),
])
def test_learned_constants_are_parameters_in_state_dict(module_factory, name):
    module = module_factory()
    params = dict(module.named_parameters())
    assert isinstance(params.get(name), torch.nn.Parameter)
    assert name in module.state_dict()


@pytest.mark.parametrize("learn", ["beta", "threshold", "alpha"])
def test_learned_lif_constant_gets_reference_gradient_in_exact_mode(learn):
    gen = torch.Generator().manual_seed(5)
    current = torch.rand(3, 8, 4, generator=gen, dtype=F64) * 0.8 - 0.1
    layer = snn.LIF(0.85, 0.9, alpha=0.6, backward="exact", surrogate="sigmoid:5", **{f"learn_{learn}": True}).double()
    values = {name: getattr(layer, name).detach() for name in ("beta", "threshold", "alpha")}
    leaf = getattr(layer, learn).detach().clone().requires_grad_()
    values[learn] = leaf
    ref_spikes, ref_membrane, _, _ = reference_lif(current, LifSpec(cuba=True, backward="exact",
                                                                     surrogate=surrogate_lib.sigmoid(5.0)), **values)
    assert (ref_membrane - values["threshold"]).abs().min() > 1e-6
    spikes = layer(current)
    torch.testing.assert_close(spikes, ref_spikes, rtol=0, atol=0)
    upstream = torch.randn(spikes.shape, generator=gen, dtype=F64)
    (spikes * upstream).sum().backward()
    (ref_spikes * upstream).sum().backward()
    grad = getattr(layer, learn).grad
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-9, atol=1e-12)


def test_learned_beta_of_linear_lif_gets_reference_gradient():
    torch.manual_seed(6)
    layer = snn.LinearLIF(4, 3, learn_beta=True, backward="exact", beta=0.8).double()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    x = torch.rand(2, 7, 4, dtype=F64)
    beta = layer.beta.detach().clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    ref_spikes, ref_membrane, _, _ = reference_linear_lif(x, weight, layer.bias.detach(), LifSpec(backward="exact"),
                                                          beta=beta, threshold=layer.threshold)
    assert (ref_membrane - layer.threshold).abs().min() > 1e-6
    spikes = layer(x)
    torch.testing.assert_close(spikes, ref_spikes, rtol=0, atol=0)
    (spikes * ref_membrane.detach()).sum().backward()
    (ref_spikes * ref_membrane.detach()).sum().backward()
    torch.testing.assert_close(layer.beta.grad, beta.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, weight.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("flag", ["learn_beta", "learn_threshold"])
def test_learned_constants_in_sparse_mode_are_rejected(flag):
    with pytest.raises(ValueError, match=flag.removeprefix("learn_")):
        snn.LIF(0.9, backward="sparse", **{flag: True})(torch.rand(2, 3, 4))


@pytest.mark.parametrize("learn_beta", [False, True])
@pytest.mark.parametrize("time_dim", [1, 0])
def test_leaky_integrator_module_matches_reference(learn_beta, time_dim):
    gen = torch.Generator().manual_seed(7)
    current = torch.randn(3, 6, 4, generator=gen, dtype=F64)
    layer = snn.LeakyIntegrator(0.7, time_dim=time_dim, learn_beta=learn_beta).double()
    beta = layer.beta.detach().clone().requires_grad_(learn_beta)
    state = torch.randn(3, 4, generator=gen, dtype=F64)
    ref_out, ref_final = reference_leaky_integrator(current, beta=beta, initial_state=state)
    out, final = layer(current if time_dim == 1 else current.transpose(0, 1), state, return_state=True)
    out = out if time_dim == 1 else out.transpose(0, 1)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(final, ref_final)
    if learn_beta:
        out.sum().backward()
        ref_out.sum().backward()
        torch.testing.assert_close(layer.beta.grad, beta.grad)


def test_modules_follow_float32_default():
    layer = snn.LinearLIF(3, 2)
    spikes = layer(torch.rand(2, 4, 3))
    assert spikes.dtype == torch.float32 and spikes.shape == (2, 4, 2)
    readout = snn.LeakyIntegrator(0.9)(spikes)
    assert readout.dtype == torch.float32 and readout.shape == (2, 4, 2)
