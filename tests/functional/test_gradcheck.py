"""torch.autograd.gradcheck where the numeric derivative is meaningful.

Spikes are a step function: their numeric derivative is 0 while the op's is the surrogate, so
gradcheck only applies to outputs that spikes do not reach through a differentiable path. That is
the membrane and final state when the reset is absent or detached and the layer is not recurrent;
spikes then enter only as locally constant values (values are kept 1e-3 away from θ, far more than
a gradcheck perturbation moves them), and analytic and numeric derivatives must agree, including
the derivative of the detached reset term -θ·s[t-1] w.r.t. θ.
"""

import dataclasses

import pytest
import torch

import snnopt.functional as snf
from tests.lif_cases import LifCase, first_clear_seed, make_tensors, op_kwargs, run_reference, to_time_layout

GRADCHECK_CASES = {
    "lif-reset-none-exact": (LifCase(reset="none", backward="exact"), ("current", "beta", "threshold", "v0")),
    "cuba-reset-none-exact-time-first": (LifCase(reset="none", cuba=True, backward="exact", time_dim=0),
                                         ("current", "beta", "alpha", "v0", "syn0")),
    "lif-subtract-detached-exact": (LifCase(reset="subtract", backward="exact"), ("current", "beta", "threshold", "v0")),
    "cuba-zero-detached-exact": (LifCase(reset="zero", cuba=True, backward="exact"),
                                 ("current", "beta", "alpha", "threshold", "v0", "syn0")),
    "lif-trailing-shape-subtract-exact": (LifCase(reset="subtract", backward="exact", neurons=(2, 3)),
                                          ("current", "beta", "threshold")),
    "lif-subtract-sparse": (LifCase(reset="subtract", backward="sparse", window=0.1), ("current", "v0")),
    "cuba-zero-sparse-time-first": (LifCase(reset="zero", cuba=True, backward="sparse", time_dim=0),
                                    ("current", "v0", "syn0")),
    "linear-subtract-detached-exact": (LifCase(linear=True, reset="subtract", backward="exact"),
                                       ("x", "weight", "bias", "beta", "threshold", "v0")),
    "linear-cuba-none-exact-time-first": (LifCase(linear=True, reset="none", cuba=True, backward="exact", time_dim=0),
                                          ("x", "weight", "bias", "alpha")),
    "linear-subtract-sparse": (LifCase(linear=True, reset="subtract", backward="sparse"),
                               ("x", "weight", "bias", "v0")),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_membrane_and_state(name):
    template, names = GRADCHECK_CASES[name]
    exact = template.backward == "exact"
    kind = "neuron" if exact else "float"
    case = first_clear_seed(
        dataclasses.replace(template, batch=2, steps=5, in_features=3, beta_kind=kind, threshold_kind=kind,
                            alpha_kind=kind, learn=exact, initial_state="tuple", outputs="all", seed=11),
        margin=1e-3)
    values = make_tensors(case)
    if case.reset != "none":
        ref_out, _ = run_reference(case, values)
        assert ref_out["spikes"].sum() > 0, "the reset term must be exercised"

    def membrane_and_state(*tensors):
        leaves = {**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in values.items()},
                  **dict(zip(names, tensors))}
        kwargs = op_kwargs(case, leaves)
        if case.linear:
            out = snf.linear_lif(to_time_layout(case, leaves["x"]), leaves["weight"], leaves["bias"], **kwargs)
        else:
            out = snf.lif(to_time_layout(case, leaves["current"]), **kwargs)
        return (out.membrane, out.state.v) + ((out.state.syn,) if case.cuba else ())

    inputs = tuple(values[k].detach().clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(membrane_and_state, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("time_dim", [1, 0])
def test_gradcheck_leaky_integrator(time_dim):
    gen = torch.Generator().manual_seed(5)
    current = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    beta = (0.5 + 0.4 * torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_()
    state = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def integrate(current, beta, state):
        x = current if time_dim == 1 else current.transpose(0, 1)
        return snf.leaky_integrator(x, beta=beta, initial_state=state, time_dim=time_dim, return_state=True)

    assert torch.autograd.gradcheck(integrate, (current, beta, state), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_leaky_integrator_scalar_beta_tensor():
    gen = torch.Generator().manual_seed(6)
    current = torch.randn(1, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, b: snf.leaky_integrator(c, beta=b), (current, beta))
