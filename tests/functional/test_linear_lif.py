import itertools

import pytest
import torch
from hypothesis import given, settings

import snnopt.functional as snf
from snnopt import surrogate as surrogate_lib
from snnopt.codegen.reference import reference_linear_lif
from snnopt.spec import LifSpec
from tests.lif_cases import LifCase, check_case, first_clear_seed, lif_cases, make_tensors, require


@given(lif_cases(linear=True, backward="exact"))
def test_linear_lif_exact_backward_matches_reference_float64(case):
    check_case(case)


@given(lif_cases(linear=True, backward="sparse"))
def test_linear_lif_sparse_backward_matches_windowed_reference_float64(case):
    check_case(case)


@settings(max_examples=settings.default.max_examples // 2)
@given(lif_cases(linear=True, dtype=torch.float32))
def test_linear_lif_float32_matches_float64_reference(case):
    check_case(case)


SURROGATE_CYCLE = [surrogate_lib.superspike(), surrogate_lib.sigmoid(), surrogate_lib.atan(),
                   surrogate_lib.triangle(0.6), surrogate_lib.rectangular(0.9)]
COMBINATIONS = list(itertools.product(["subtract", "zero", "none"], [True, False], [False, True],
                                      [False, True], [False, True], ["sparse", "exact"]))


@pytest.mark.parametrize(
    "reset,detach_reset,cuba,recurrent,fire_at_threshold,backward", COMBINATIONS,
    ids=["-".join(str(v) for v in combo) for combo in COMBINATIONS])
def test_every_spec_combination_matches_reference(reset, detach_reset, cuba, recurrent, fire_at_threshold,
                                                  backward):
    index = COMBINATIONS.index((reset, detach_reset, cuba, recurrent, fire_at_threshold, backward))
    case = LifCase(reset=reset, detach_reset=detach_reset, cuba=cuba, recurrent=recurrent,
                   fire_at_threshold=fire_at_threshold, backward=backward, linear=True, batch=3, steps=7,
                   neurons=(5,), in_features=4, surrogate=SURROGATE_CYCLE[index % len(SURROGATE_CYCLE)],
                   beta_kind="neuron", threshold_kind="neuron", alpha_kind="neuron", learn=backward == "exact",
                   outputs="all", initial_state="tuple", window=0.3, seed=1000 * index)
    check_case(first_clear_seed(case), reject=require)


def _input_active_case(backward, time_dim, recurrent=False):
    return first_clear_seed(LifCase(linear=True, backward=backward, time_dim=time_dim, recurrent=recurrent,
                                    batch=3, steps=6, neurons=(5,), in_features=7, seed=7))


def _linear_lif_input_grad(case, values, input_active=None):
    x = values["x"].detach().clone().requires_grad_()
    weight = values["weight"].detach().clone().requires_grad_()
    kwargs = {} if input_active is None else {"input_active": input_active}
    if case.recurrent:
        kwargs["recurrent_weight"] = values["recurrent_weight"].detach()
    x_in = x if case.time_dim == 1 else x.transpose(0, 1)
    spikes = snf.linear_lif(x_in, weight, values["bias"].detach(), beta=values["beta"],
                            threshold=values["threshold"], backward=case.backward, window=case.window,
                            time_dim=case.time_dim, **kwargs)
    if case.time_dim == 0:
        spikes = spikes.transpose(0, 1)
    (spikes * values["upstream"]["spikes"]).sum().backward()
    return x.grad, weight.grad


@pytest.mark.parametrize("time_dim", [1, 0])
@pytest.mark.parametrize("backward", ["sparse", "exact"])
@pytest.mark.parametrize("recurrent", [False, True])
def test_input_active_restricts_input_gradient_to_given_entries(backward, time_dim, recurrent):
    case = _input_active_case(backward, time_dim, recurrent)
    values = make_tensors(case)
    full_grad_x, full_grad_w = _linear_lif_input_grad(case, values)
    assert full_grad_x.abs().sum() > 0, "test needs a nonzero input gradient"
    gen = torch.Generator().manual_seed(3)
    numel = full_grad_x.numel()
    active = torch.randperm(numel, generator=gen)[: numel // 3].sort().values.to(torch.int64)
    grad_x, grad_w = _linear_lif_input_grad(case, values, input_active=active)
    expected = torch.zeros(numel, dtype=full_grad_x.dtype)
    expected[active] = full_grad_x.reshape(-1)[active]
    torch.testing.assert_close(grad_x.reshape(-1), expected, rtol=1e-10, atol=1e-12)
    # The weight gradient never depends on the upstream active set.
    torch.testing.assert_close(grad_w, full_grad_w, rtol=1e-10, atol=1e-12)


def test_input_active_empty_gives_zero_input_gradient():
    case = _input_active_case("sparse", 1)
    values = make_tensors(case)
    grad_x, grad_w = _linear_lif_input_grad(case, values, input_active=torch.zeros(0, dtype=torch.int64))
    assert torch.count_nonzero(grad_x) == 0
    assert grad_w.abs().sum() > 0


def test_input_active_all_entries_equals_full_gradient():
    case = _input_active_case("sparse", 1)
    values = make_tensors(case)
    full_grad_x, _ = _linear_lif_input_grad(case, values)
    every = torch.arange(full_grad_x.numel(), dtype=torch.int64)
    grad_x, _ = _linear_lif_input_grad(case, values, input_active=every)
    torch.testing.assert_close(grad_x, full_grad_x, rtol=1e-10, atol=1e-12)


def _two_layer_chain(first, second, time_dim, regularise_hidden, seed=12, input_active="auto", retain=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 9, 6, generator=gen, dtype=torch.float64)
    w1 = torch.randn(5, 6, generator=gen, dtype=torch.float64) * 0.7
    b1 = torch.full((5,), 0.2, dtype=torch.float64)
    w2 = torch.randn(4, 5, generator=gen, dtype=torch.float64) * 0.8
    up_out = torch.randn(3, 9, 4, generator=gen, dtype=torch.float64)
    up_hidden = torch.randn(3, 9, 5, generator=gen, dtype=torch.float64)
    spec1, spec2 = LifSpec(backward=first, window=0.3), LifSpec(backward=second, window=0.3)

    def leaves():
        return [t.clone().requires_grad_() for t in (x, w1, b1, w2)]

    def loss(hidden, out):
        value = (out * up_out).sum()
        return value + (hidden * up_hidden).sum() if regularise_hidden else value

    rx, rw1, rb1, rw2 = leaves()
    r_hidden, r_membrane1, _, _ = reference_linear_lif(rx, rw1, rb1, spec1, beta=0.9)
    r_out, r_membrane2, _, _ = reference_linear_lif(r_hidden, rw2, None, spec2, beta=0.85)
    for membrane in (r_membrane1, r_membrane2):
        u = (membrane - 1.0).abs()
        assert u.min() > 1e-6 and (u - 0.3).abs().min() > 1e-6
    assert 0 < r_hidden.sum() < r_hidden.numel() and r_out.sum() > 0
    ref = dict(zip(("x", "w1", "b1", "w2", "hidden"),
                   torch.autograd.grad(loss(r_hidden, r_out), [rx, rw1, rb1, rw2, r_hidden])))

    ox, ow1, ob1, ow2 = leaves()
    layout = (lambda t: t) if time_dim == 1 else (lambda t: t.transpose(0, 1))
    o_hidden = snf.linear_lif(layout(ox), ow1, ob1, beta=0.9, backward=first, window=0.3, time_dim=time_dim)
    o_out = snf.linear_lif(o_hidden, ow2, beta=0.85, backward=second, window=0.3, time_dim=time_dim,
                           input_active=input_active)
    if retain:
        o_hidden.retain_grad()
        loss(layout(o_hidden), layout(o_out)).backward()
        op = dict(x=ox.grad, w1=ow1.grad, b1=ob1.grad, w2=ow2.grad, hidden=o_hidden.grad)
    else:
        op = dict(zip(("x", "w1", "b1", "w2", "hidden"),
                      torch.autograd.grad(loss(layout(o_hidden), layout(o_out)), [ox, ow1, ob1, ow2, o_hidden])))
    op["hidden"] = layout(op["hidden"])
    op["membrane1"] = r_membrane1
    torch.testing.assert_close(layout(o_out), r_out, rtol=0, atol=0)
    return op, ref


CHAINS = [("sparse", "sparse"), ("sparse", "exact"), ("exact", "sparse")]


@pytest.mark.parametrize("first,second", CHAINS, ids=["-".join(c) for c in CHAINS])
@pytest.mark.parametrize("time_dim", [1, 0])
@pytest.mark.parametrize("regularise_hidden", [False, True], ids=["out-loss", "out-and-hidden-loss"])
def test_stacked_layers_parameter_gradients_match_reference_chain(first, second, time_dim, regularise_hidden):
    op, ref = _two_layer_chain(first, second, time_dim, regularise_hidden)
    for name in ("x", "w1", "b1", "w2"):
        torch.testing.assert_close(op[name], ref[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("first,second", CHAINS, ids=["-".join(c) for c in CHAINS])
def test_gradient_wrt_intermediate_spikes_with_full_input_gradient_matches_reference(first, second):
    op, ref = _two_layer_chain(first, second, 1, False, input_active=None)
    torch.testing.assert_close(op["hidden"], ref["hidden"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first,second", CHAINS, ids=["-".join(c) for c in CHAINS])
def test_retain_grad_on_intermediate_spikes_sees_the_full_gradient(first, second):
    op, ref = _two_layer_chain(first, second, 1, False, retain=True)
    torch.testing.assert_close(op["hidden"], ref["hidden"], rtol=1e-9, atol=1e-12)
    for name in ("x", "w1", "b1", "w2"):
        torch.testing.assert_close(op[name], ref[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_auto_input_active_gives_the_gradient_only_where_the_sparse_producer_reads_it():
    op, ref = _two_layer_chain("sparse", "sparse", 1, False)
    # It travels as a sparse COO tensor, so no dense zero-filled tensor is built for it.
    assert op["hidden"].layout == torch.sparse_coo
    op["hidden"] = op["hidden"].to_dense()
    active = (op["membrane1"] - 1.0).abs() < 0.3
    assert 0 < active.sum() < active.numel()
    torch.testing.assert_close(op["hidden"][active], ref["hidden"][active], rtol=1e-9, atol=1e-12)
    assert torch.all(op["hidden"][~active] == 0)
    assert torch.any(ref["hidden"][~active] != 0)  # so the restriction really dropped work


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("backward", ["sparse", "exact"])
def test_autocast_leaves_the_fused_layer_in_its_input_dtype(backward, recurrent):
    # Autocast would lower the matmuls inside the op's body (a bfloat16 current, which the CPU
    # kernels cannot take: this used to raise a TypeError); the op computes as without it.
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 12, 20, generator=gen) < 0.3).float()
    w0 = torch.randn(16, 20, generator=gen) * 0.6
    v0 = torch.randn(16, 16, generator=gen) * 0.1 if recurrent else None
    upstream = torch.randn(4, 12, 16, generator=gen)

    def step(autocast):
        w = w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = snf.linear_lif(x, w, recurrent_weight=v0, beta=0.9, window=0.3, backward=backward)
            (out * upstream).sum().backward()  # the backward inside the autocast block too
        return out, w.grad

    (out, grad), (expected_out, expected_grad) = step(True), step(False)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected_out) and torch.equal(grad, expected_grad)
