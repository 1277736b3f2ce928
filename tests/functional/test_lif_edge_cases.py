import dataclasses

import pytest
import torch

import snnopt.functional as snf
from snnopt import surrogate as surrogate_lib
from snnopt.codegen.reference import reference_lif, reference_linear_lif
from snnopt.spec import LifSpec
from tests.lif_cases import (LifCase, check_case, first_clear_seed, make_tensors, require, run_op,
                             run_reference)

BACKWARDS = ["sparse", "exact"]


def _variants(**common):
    # One plain LIF with a trailing neuron shape, one CuBa linear layer, one recurrent linear layer.
    return [LifCase(neurons=(2, 3), **common),
            LifCase(linear=True, cuba=True, neurons=(5,), **common),
            LifCase(linear=True, recurrent=True, reset="zero", neurons=(5,), **common)]


VARIANT_IDS = ["lif-2x3", "linear-cuba", "linear-recurrent-zero"]


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("variant", range(3), ids=VARIANT_IDS)
@pytest.mark.parametrize("batch,steps", [(1, 1), (1, 6), (3, 1)], ids=["B1-T1", "B1-T6", "B3-T1"])
def test_single_step_and_single_sample(backward, variant, batch, steps):
    case = _variants(backward=backward, batch=batch, steps=steps, outputs="all", initial_state="tuple",
                     learn=backward == "exact", beta_kind="neuron", threshold_kind="0d", alpha_kind="neuron",
                     seed=21)[variant]
    check_case(first_clear_seed(case), reject=require)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("variant", range(3), ids=VARIANT_IDS)
def test_no_spikes_for_tiny_input(backward, variant):
    case = _variants(backward=backward, batch=3, steps=7, input_scale=0.01, seed=1)[variant]
    (op_out, op_grads), _ = check_case(first_clear_seed(case), reject=require)
    assert torch.count_nonzero(op_out["spikes"]) == 0
    if backward == "sparse":
        # Every membrane is far below θ - window, so the windowed surrogate is zero everywhere.
        for name, grad in op_grads.items():
            assert torch.count_nonzero(grad) == 0, f"gradient of {name} should be zero"
    else:
        assert op_grads["current" if "current" in op_grads else "x"].abs().sum() > 0


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("variant", range(3), ids=VARIANT_IDS)
@pytest.mark.parametrize("outputs", ["spikes", "all"])
def test_every_neuron_spiking_for_large_input(backward, variant, outputs):
    case = _variants(backward=backward, batch=2, steps=7, input_offset=8.0, outputs=outputs,
                     learn=backward == "exact", beta_kind="neuron", threshold_kind="neuron", seed=2)[variant]
    (op_out, op_grads), _ = check_case(first_clear_seed(case), reject=require)
    assert bool((op_out["spikes"] == 1).all())
    if backward == "sparse" and outputs == "spikes":
        for name, grad in op_grads.items():
            assert torch.count_nonzero(grad) == 0, f"gradient of {name} should be zero"


@pytest.mark.parametrize("variant", range(3), ids=VARIANT_IDS)
@pytest.mark.parametrize("outputs", ["spikes", "all"])
def test_window_zero_gives_no_spike_gradient(variant, outputs):
    case = _variants(backward="sparse", window=0.0, batch=3, steps=7, outputs=outputs, seed=3)[variant]
    (op_out, op_grads), (ref_out, ref_grads) = check_case(first_clear_seed(case), reject=require)
    spikes = op_out["spikes"]
    assert 0 < spikes.sum() < spikes.numel(), "test needs some but not all neurons spiking"
    if outputs == "spikes":
        for name, grad in op_grads.items():
            assert torch.count_nonzero(grad) == 0, f"gradient of {name} should be zero"
    else:
        # The membrane output is differentiable without any surrogate.
        assert op_grads["current" if "current" in op_grads else "x"].abs().sum() > 0


@pytest.mark.parametrize("variant", range(3), ids=VARIANT_IDS)
@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
@pytest.mark.parametrize("surrogate", [surrogate_lib.superspike(), surrogate_lib.atan(3.0)], ids=["superspike", "atan"])
def test_wide_window_sparse_equals_exact_with_detached_reset(variant, reset, surrogate):
    case = _variants(backward="sparse", window=1e6, batch=3, steps=7, outputs="all", detach_reset=False,
                     surrogate=surrogate, seed=4)[variant]
    case = first_clear_seed(dataclasses.replace(case, reset=reset))
    exact_detached = dataclasses.replace(case.spec, backward="exact", detach_reset=True)
    check_case(case, reject=require, reference_spec=exact_detached)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_sparse_ignores_detach_reset_false_but_exact_does_not(backward):
    # With reset in the graph the exact gradient differs; sparse must behave as if detached.
    case = first_clear_seed(LifCase(linear=True, backward=backward, detach_reset=False, window=0.5,
                                    batch=3, steps=9, neurons=(5,), seed=5))
    values = make_tensors(case)
    _, op_grads = run_op(case, values)
    _, detached_grads = run_reference(dataclasses.replace(case, detach_reset=True), values)
    differs = not torch.allclose(op_grads["weight"], detached_grads["weight"], rtol=1e-6, atol=1e-9)
    assert differs == (backward == "exact")


def test_hand_computed_values_subtract_and_zero_reset():
    current = torch.tensor([[0.6, 0.6, 0.6, 0.0, 1.5]], dtype=torch.float64).unsqueeze(-1)
    for reset, membrane in [("subtract", [0.6, 0.9, 1.05, -0.475, 1.2625]), ("zero", [0.6, 0.9, 1.05, 0.0, 1.5]),
                            ("none", [0.6, 0.9, 1.05, 0.525, 1.7625])]:
        out = snf.lif(current, beta=0.5, threshold=1.0, reset=reset, return_membrane=True)
        torch.testing.assert_close(out.membrane.squeeze(), torch.tensor(membrane, dtype=torch.float64))
        torch.testing.assert_close(out.spikes.squeeze(), (torch.tensor(membrane) > 1.0).double())


@pytest.mark.parametrize("fire_at_threshold", [False, True])
def test_membrane_exactly_at_threshold_fires_only_if_fire_at_threshold(fire_at_threshold):
    current = torch.tensor([[[0.5], [0.5]]], dtype=torch.float64)
    spikes = snf.lif(current, beta=1.0, threshold=1.0, fire_at_threshold=fire_at_threshold)
    torch.testing.assert_close(spikes.squeeze(), torch.tensor([0.0, float(fire_at_threshold)], dtype=torch.float64))


@pytest.mark.parametrize("backward", BACKWARDS)
def test_default_arguments_match_default_spec(backward):
    gen = torch.Generator().manual_seed(0)
    current = torch.rand(2, 9, 4, generator=gen, dtype=torch.float64) * 0.9 - 0.15
    ref_spikes, ref_membrane, *_ = reference_lif(current, LifSpec(backward=backward), beta=0.9)
    assert (ref_membrane - 1.0).abs().min() > 1e-6
    out = snf.lif(current, beta=0.9, backward=backward, return_membrane=True)
    torch.testing.assert_close(out.spikes, ref_spikes, rtol=0, atol=0)
    torch.testing.assert_close(out.membrane, ref_membrane)
    # Default spec: subtract reset, SuperSpike(100), window 0.2 — checked through the gradient.
    c1 = current.clone().requires_grad_()
    c2 = current.clone().requires_grad_()
    snf.lif(c1, beta=0.9, backward=backward).sum().backward()
    reference_lif(c2, LifSpec(backward=backward), beta=0.9)[0].sum().backward()
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spelling", ["atan:3.5", surrogate_lib.Surrogate("atan", 3.5)], ids=["string", "object"])
def test_surrogate_accepts_name_with_parameter(spelling):
    gen = torch.Generator().manual_seed(1)
    current = (torch.rand(2, 6, 3, generator=gen, dtype=torch.float64) * 0.9 - 0.15).requires_grad_()
    snf.lif(current, beta=0.9, surrogate=spelling, backward="exact").sum().backward()
    reference = current.detach().clone().requires_grad_()
    reference_lif(reference, LifSpec(surrogate=surrogate_lib.atan(3.5), backward="exact"), beta=0.9)[0].sum().backward()
    torch.testing.assert_close(current.grad, reference.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("cuba", [False, True])
def test_chunked_run_with_state_equals_one_pass(backward, cuba):
    exact = backward == "exact"
    gen = torch.Generator().manual_seed(8)
    current = torch.rand(3, 12, 4, generator=gen, dtype=torch.float64) * 0.8 - 0.1
    beta = (0.7 + 0.25 * torch.rand(4, generator=gen, dtype=torch.float64)).requires_grad_(exact)
    kwargs = dict(beta=beta, threshold=0.9, reset="zero", alpha=0.6 if cuba else None, backward=backward,
                  detach_reset=False, surrogate="sigmoid:5", return_membrane=True, return_state=True)
    upstream = torch.randn(3, 12, 4, generator=gen, dtype=torch.float64)

    whole_in = current.clone().requires_grad_()
    whole = snf.lif(whole_in, **kwargs)
    u = (whole.membrane - 0.9).abs()
    assert u.min() > 1e-6 and (u - 0.2).abs().min() > 1e-6
    first_in = current[:, :5].clone().requires_grad_()
    second_in = current[:, 5:].clone().requires_grad_()
    first = snf.lif(first_in, **kwargs)
    second = snf.lif(second_in, initial_state=first.state, **kwargs)
    torch.testing.assert_close(torch.cat([first.spikes, second.spikes], 1), whole.spikes, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([first.membrane, second.membrane], 1), whole.membrane)
    torch.testing.assert_close(second.state.v, whole.state.v)
    if cuba:
        torch.testing.assert_close(second.state.syn, whole.state.syn)
    # The state carries the gradient from the second chunk back into the first.
    (whole.spikes * upstream).sum().backward()
    whole_beta_grad = beta.grad.clone() if exact else None
    beta.grad = None
    (torch.cat([first.spikes, second.spikes], 1) * upstream).sum().backward()
    assert first_in.grad.abs().sum() > 0
    torch.testing.assert_close(torch.cat([first_in.grad, second_in.grad], 1), whole_in.grad, rtol=1e-9, atol=1e-12)
    if exact:
        torch.testing.assert_close(beta.grad, whole_beta_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_nan_input_propagates_like_reference(dtype, backward):
    gen = torch.Generator().manual_seed(9)
    current = torch.rand(3, 6, 4, generator=gen, dtype=dtype) * 0.9 - 0.15
    current[0, 2, 1] = float("nan")
    spec = LifSpec(backward=backward)
    ref_in = current.clone().requires_grad_()
    ref_spikes, ref_membrane, ref_v, _ = reference_lif(ref_in, spec, beta=0.9)
    op_in = current.clone().requires_grad_()
    out = snf.lif(op_in, beta=0.9, backward=backward, return_membrane=True, return_state=True)
    torch.testing.assert_close(out.spikes, ref_spikes, rtol=0, atol=0)
    torch.testing.assert_close(out.membrane, ref_membrane, equal_nan=True)
    torch.testing.assert_close(out.state.v, ref_v, equal_nan=True)
    assert torch.isnan(out.membrane[0, 2:, 1]).all()
    upstream = torch.randn(3, 6, 4, generator=gen, dtype=dtype)
    (out.spikes * upstream).sum().backward()
    (ref_spikes * upstream).sum().backward()
    # Samples without a NaN do not depend on it (lif does not mix the batch).
    torch.testing.assert_close(op_in.grad[1:], ref_in.grad[1:])


@pytest.mark.parametrize("backward", BACKWARDS)
def test_nan_input_to_linear_lif_propagates_without_crash(backward):
    gen = torch.Generator().manual_seed(10)
    x = torch.rand(2, 5, 3, generator=gen, dtype=torch.float64)
    x[1, 3, 0] = float("nan")
    weight = (torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    bias = torch.full((4,), 0.3, dtype=torch.float64, requires_grad=True)
    ref_spikes, ref_membrane, _, _ = reference_linear_lif(x, weight, bias, LifSpec(backward=backward), beta=0.9)
    out = snf.linear_lif(x.clone().requires_grad_(), weight, bias, beta=0.9, backward=backward, return_membrane=True)
    torch.testing.assert_close(out.spikes, ref_spikes, rtol=0, atol=0)
    torch.testing.assert_close(out.membrane, ref_membrane, equal_nan=True)
    out.spikes.sum().backward()
    assert weight.grad is not None and bias.grad is not None


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("outputs", ["membrane", "state"])
@pytest.mark.parametrize("variant", range(3), ids=VARIANT_IDS)
def test_loss_without_spikes_gets_gradient_through_membrane_or_state_only(backward, outputs, variant):
    case = _variants(backward=backward, batch=2, steps=6, outputs=outputs, spikes_in_loss=False,
                     initial_state="tuple", learn=backward == "exact", beta_kind="neuron", seed=31)[variant]
    check_case(first_clear_seed(case), reject=require)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("variant", range(3), ids=VARIANT_IDS)
def test_longer_sequence_and_wider_layer(backward, variant):
    case = _variants(backward=backward, batch=4, steps=60, in_features=17, outputs="all", window=0.1,
                     initial_state="tuple", learn=backward == "exact", beta_kind="neuron", threshold_kind="neuron",
                     alpha_kind="neuron", seed=41)[variant]
    case = dataclasses.replace(case, neurons=(3, 11) if not case.linear else (33,))
    check_case(first_clear_seed(case, tries=200), reject=require)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_no_grad_and_inference_mode_give_same_forward(backward):
    gen = torch.Generator().manual_seed(13)
    x = torch.rand(3, 8, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    kwargs = dict(beta=0.9, alpha=0.5, backward=backward, return_membrane=True, return_state=True)
    with_grad = snf.linear_lif(x, weight, **kwargs)
    with torch.no_grad():
        no_grad = snf.linear_lif(x, weight, **kwargs)
    with torch.inference_mode():
        inference = snf.linear_lif(x, weight, **kwargs)
    for out in (no_grad, inference):
        assert not out.spikes.requires_grad
        torch.testing.assert_close(out.spikes, with_grad.spikes, rtol=0, atol=0)
        torch.testing.assert_close(out.membrane, with_grad.membrane.detach())
        torch.testing.assert_close(out.state.syn, with_grad.state.syn.detach())


@pytest.mark.parametrize("backward", BACKWARDS)
def test_expanded_and_strided_inputs(backward):
    gen = torch.Generator().manual_seed(14)
    base = torch.rand(1, 7, 5, generator=gen, dtype=torch.float64) * 1.2 - 0.2
    current = base.expand(3, 7, 5)  # stride 0 along the batch
    strided = torch.rand(3, 14, 5, generator=gen, dtype=torch.float64)[:, ::2] * 1.2 - 0.2
    for value in (current, strided):
        ref_spikes, ref_membrane, _, _ = reference_lif(value, LifSpec(backward=backward), beta=0.8)
        out = snf.lif(value, beta=0.8, backward=backward, return_membrane=True)
        torch.testing.assert_close(out.spikes, ref_spikes, rtol=0, atol=0)
        torch.testing.assert_close(out.membrane, ref_membrane)


@pytest.mark.parametrize("backward", ["exact", "sparse"])
def test_lif_with_a_recurrent_weight_matches_the_reference(backward):
    from snnopt.codegen.reference import reference_lif
    from snnopt.functional import lif
    from snnopt.spec import LifSpec
    from snnopt import surrogate as surrogate_lib
    gen = torch.Generator().manual_seed(3)
    current = (torch.rand(3, 9, 5, generator=gen, dtype=torch.float64) * 1.2).requires_grad_()
    recurrent = (torch.randn(5, 5, generator=gen, dtype=torch.float64) * 0.4).requires_grad_()
    spikes = lif(current, beta=0.8, alpha=0.6, recurrent_weight=recurrent, backward=backward, surrogate="atan")
    spec = LifSpec(surrogate=surrogate_lib.get("atan"), cuba=True, recurrent=True, backward=backward)
    expected = reference_lif(current, spec, beta=0.8, alpha=0.6, recurrent_weight=recurrent)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert torch.equal(spikes, expected)
    weights = torch.rand(spikes.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((spikes * weights).sum(), [current, recurrent])
    want = torch.autograd.grad((expected * weights).sum(), [current, recurrent])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)
