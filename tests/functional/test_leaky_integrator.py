import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import snnopt.functional as snf
import snnopt.nn as snn
from snnopt.codegen.reference import reference_leaky_integrator
from tests.lif_cases import GRAD_TOL, assert_close


@st.composite
def integrator_cases(draw):
    return dict(batch=draw(st.integers(1, 4)), steps=draw(st.sampled_from([1, 2, 3, 7, 11])),
                neurons=draw(st.sampled_from([(1,), (3,), (10,), (2, 3)])),
                beta_kind=draw(st.sampled_from(["float", "0d", "neuron"])),
                learn=draw(st.booleans()), initial_state=draw(st.booleans()),
                return_state=draw(st.booleans()), time_dim=draw(st.sampled_from([0, 1])),
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _run_integrator(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, t, n, dtype = case["batch"], case["steps"], case["neurons"], case["dtype"]
    current = torch.randn((b, t, *n), generator=gen, dtype=torch.float64)
    if case["beta_kind"] == "float":
        beta = 0.5 + 0.45 * float(torch.rand((), generator=gen, dtype=torch.float64))
    else:
        shape = () if case["beta_kind"] == "0d" else n
        beta = 0.5 + 0.45 * torch.rand(shape, generator=gen, dtype=torch.float64)
    state = torch.randn((b, *n), generator=gen, dtype=torch.float64) if case["initial_state"] else None
    up_out = torch.randn((b, t, *n), generator=gen, dtype=torch.float64)
    up_state = torch.randn((b, *n), generator=gen, dtype=torch.float64)

    def leaves(target_dtype):
        result = {"current": current.to(target_dtype).requires_grad_()}
        if isinstance(beta, torch.Tensor):
            result["beta"] = beta.to(target_dtype).requires_grad_(case["learn"])
        else:
            result["beta"] = beta
        result["state"] = None if state is None else state.to(target_dtype).requires_grad_()
        return result

    ref_in = leaves(torch.float64)
    ref_out, ref_final = reference_leaky_integrator(ref_in["current"], beta=ref_in["beta"],
                                                    initial_state=ref_in["state"])
    op_in = leaves(dtype)
    x = op_in["current"] if case["time_dim"] == 1 else op_in["current"].transpose(0, 1)
    kwargs = dict(beta=op_in["beta"], time_dim=case["time_dim"])
    if op_in["state"] is not None:
        kwargs["initial_state"] = op_in["state"]
    if case["return_state"]:
        op_out, op_final = snf.leaky_integrator(x, return_state=True, **kwargs)
    else:
        op_out, op_final = snf.leaky_integrator(x, **kwargs), None
        assert isinstance(op_out, torch.Tensor)
    if case["time_dim"] == 0:
        op_out = op_out.transpose(0, 1)
    assert op_out.dtype == dtype

    def grads(inputs, out, final):
        loss = (out * up_out.to(out.dtype)).sum()
        if final is not None:
            loss = loss + (final * up_state.to(out.dtype)).sum()
        names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        return dict(zip(names, torch.autograd.grad(loss, [inputs[k] for k in names])))

    ref_grads = grads(ref_in, ref_out, ref_final if case["return_state"] else None)
    op_grads = grads(op_in, op_out, op_final)
    return (op_out, op_final, op_grads), (ref_out, ref_final, ref_grads)


@given(integrator_cases())
def test_leaky_integrator_matches_reference(case):
    (op_out, op_final, op_grads), (ref_out, ref_final, ref_grads) = _run_integrator(case)
    tol = GRAD_TOL[case["dtype"]]
    assert_close(op_out, ref_out, tol, "outputs")
    if case["return_state"]:
        assert_close(op_final, ref_final, tol, "final state")
    assert op_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert op_grads[name].shape == ref_grads[name].shape
        assert_close(op_grads[name], ref_grads[name], tol, f"gradient of {name}")


def test_leaky_integrator_in_chunks_equals_one_pass():
    gen = torch.Generator().manual_seed(0)
    current = torch.randn(3, 10, 4, generator=gen, dtype=torch.float64)
    full, full_final = snf.leaky_integrator(current, beta=0.8, return_state=True)
    first, state = snf.leaky_integrator(current[:, :6], beta=0.8, return_state=True)
    second, final = snf.leaky_integrator(current[:, 6:], beta=0.8, initial_state=state, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, full_final, rtol=1e-12, atol=1e-12)


def test_leaky_integrator_known_values():
    current = torch.tensor([[[1.0], [0.0], [2.0]]], dtype=torch.float64)
    out = snf.leaky_integrator(current, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([[[1.0], [0.5], [2.25]]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leaky_integrator_propagates_nan(dtype):
    current = torch.ones(2, 4, 3, dtype=dtype)
    current[0, 1, 2] = float("nan")
    out = snf.leaky_integrator(current, beta=0.9)
    ref, _ = reference_leaky_integrator(current, beta=0.9)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.isnan(out[0, 1:, 2]).all() and torch.isfinite(out[1]).all()


@st.composite
def linear_integrator_cases(draw):
    return dict(batch=draw(st.integers(1, 4)), steps=draw(st.sampled_from([1, 2, 5, 9])),
                in_features=draw(st.sampled_from([1, 3, 8])), out_features=draw(st.sampled_from([1, 2, 5])),
                density=draw(st.sampled_from([0.05, 0.3, 1.0])), bias=draw(st.booleans()),
                learn_beta=draw(st.booleans()), input_scale=draw(st.sampled_from([1.0, 0.1, -2.0])),
                time_dim=draw(st.sampled_from([0, 1])), initial_state=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


@given(linear_integrator_cases())
def test_linear_leaky_integrator_matches_linear_then_reference_integrator(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, t, i, o = case["batch"], case["steps"], case["in_features"], case["out_features"]
    dtype = torch.float64
    values = torch.randn(b, t, i, generator=gen, dtype=dtype)
    x = torch.where(torch.rand(b, t, i, generator=gen, dtype=dtype) < case["density"], values, 0.0)
    weight = torch.randn(o, i, generator=gen, dtype=dtype)
    bias = torch.randn(o, generator=gen, dtype=dtype) if case["bias"] else None
    beta = 0.5 + 0.45 * torch.rand(o, generator=gen, dtype=dtype)
    state = torch.randn(b, o, generator=gen, dtype=dtype) if case["initial_state"] else None
    up_out, up_final = torch.randn(b, t, o, generator=gen, dtype=dtype), torch.randn(b, o, generator=gen, dtype=dtype)

    def leaves():
        tensors = [x.clone().requires_grad_(), weight.clone().requires_grad_(),
                   beta.clone().requires_grad_(case["learn_beta"])]
        tensors.append(None if bias is None else bias.clone().requires_grad_())
        tensors.append(None if state is None else state.clone().requires_grad_())
        return tensors

    rx, rw, rbeta, rb, rstate = leaves()
    ref_out, ref_final = reference_leaky_integrator(case["input_scale"] * torch.nn.functional.linear(rx, rw, rb),
                                                    beta=rbeta, initial_state=rstate)
    ox, ow, obeta, ob, ostate = leaves()
    layout = (lambda z: z) if case["time_dim"] == 1 else (lambda z: z.transpose(0, 1))
    out, final = snf.linear_leaky_integrator(layout(ox), ow, ob, beta=obeta, input_scale=case["input_scale"],
                                             time_dim=case["time_dim"], initial_state=ostate, return_state=True)
    out = layout(out)
    assert_close(out, ref_out, GRAD_TOL[dtype], "outputs")
    assert_close(final, ref_final, GRAD_TOL[dtype], "final state")
    ref_inputs = [z for z in (rx, rw, rbeta, rb, rstate) if z is not None and z.requires_grad]
    op_inputs = [z for z in (ox, ow, obeta, ob, ostate) if z is not None and z.requires_grad]
    ref_grads = torch.autograd.grad((ref_out * up_out).sum() + (ref_final * up_final).sum(), ref_inputs)
    op_grads = torch.autograd.grad((out * up_out).sum() + (final * up_final).sum(), op_inputs)
    for n, (got, want) in enumerate(zip(op_grads, ref_grads)):
        assert_close(got, want, GRAD_TOL[dtype], f"gradient {n}")


def test_linear_leaky_integrator_module_matches_functional():
    torch.manual_seed(3)
    module = snn.LinearLeakyIntegrator(6, 3, beta=0.8, input_scale=0.2)
    x = (torch.rand(2, 7, 6) < 0.3).float()
    expected = snf.linear_leaky_integrator(x, module.weight, module.bias, beta=0.8, input_scale=0.2)
    torch.testing.assert_close(module(x), expected)
    assert set(module.state_dict()) == {"weight", "bias", "beta"}
