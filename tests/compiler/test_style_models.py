"""Self-test of the model zoo (no compiler needed): the cases must be sound tests before they test it."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

from snnopt import surrogate as surrogate_lib
from tests.compiler import style_models as zoo
from tests.compiler.style_models import gradients, run

# Spikes flip where v - θ crosses 0; the windowed gradient jumps at |v - θ| = window and the
# boxcar's at |v - θ| = 0.5. Two correct float32 implementations may round across such an edge
# only if an entry lies this close to it, so the zoo keeps every entry farther away.
EDGE_MARGIN = 2e-5
MIN_FIRING_RATE, MAX_FIRING_RATE = 0.02, 0.5
MIN_NEAR_THRESHOLD = 0.01  # fraction of entries with |v - θ| < window
TORCH_DIR = os.path.dirname(torch.__file__)


def _ids(cases):
    return [case.name for case in cases]


@contextlib.contextmanager
def record_spike_calls():
    """Record (call site, u, spikes) for every autograd.Function call whose output is 0/1 valued."""
    calls = []
    apply = torch.autograd.Function.apply.__func__

    def recording(cls, *args, **kwargs):
        out = apply(cls, *args, **kwargs)
        if cls is not zoo._WindowGate and isinstance(out, torch.Tensor) and out.is_floating_point():
            if bool(((out == 0) | (out == 1)).all()):
                frames, frame = [], sys._getframe(1)
                while frame is not None and len(frames) < 3:
                    if not frame.f_code.co_filename.startswith(TORCH_DIR):
                        frames.append((frame.f_code.co_filename, frame.f_lineno))
                    frame = frame.f_back
                calls.append((tuple(frames), args[0].detach(), out.detach()))
        return out

    torch.autograd.Function.apply = classmethod(recording)
    try:
        yield calls
    finally:
        torch.autograd.Function.apply = classmethod(apply)


def spiking_layers(case):
    """Per call site (a spiking layer): every u = v - θ its spike function saw, and its spikes."""
    with record_spike_calls() as calls, torch.no_grad():
        run(case.build(), case.example_inputs())  # built inside: models bind ``fn.apply`` at construction
    layers: dict = {}
    for site, u, s in calls:
        layers.setdefault(site, ([], []))
        layers[site][0].append(u.flatten())
        layers[site][1].append(s.flatten())
    return {site: (torch.cat(us), torch.cat(ss)) for site, (us, ss) in layers.items()}


@pytest.mark.parametrize("fn", list(zoo.SURROGATE_FAMILIES), ids=lambda fn: fn.__name__)
def test_user_spike_function_matches_its_snnopt_family(fn):
    family, param, extra, fires_at_zero = zoo.SURROGATE_FAMILIES[fn]
    u = torch.linspace(-2.0, 2.0, 4001, dtype=torch.float64)
    u = u[(u.abs() - 0.5).abs() > 1e-9].clone().requires_grad_(True)  # off the boxcar's edge
    spikes = fn.apply(u, *extra)
    assert torch.equal(spikes, (u >= 0 if fires_at_zero else u > 0).to(spikes.dtype))
    (grad,) = torch.autograd.grad(spikes.sum(), u)
    if family is None:
        for name, default in surrogate_lib.DEFAULT_PARAMS.items():
            for k in (default / 4, default / 2, default, default * 2, default * 4):
                expected = surrogate_lib.Surrogate(name, k).derivative(u.detach())
                assert not torch.allclose(grad, expected.to(grad.dtype), rtol=1e-3, atol=1e-4), (name, k)
        return
    expected = surrogate_lib.Surrogate(family, param).derivative(u.detach())
    torch.testing.assert_close(grad, expected.to(grad.dtype), rtol=1e-5, atol=1e-6)


def test_style_cases_cover_every_style_of_the_issue():
    covered = {style for case in zoo.STYLE_CASES for style in case.styles}
    assert set(zoo.REQUIRED_STYLES) <= covered, sorted(set(zoo.REQUIRED_STYLES) - covered)
    assert "seed_paper" in _ids(zoo.STYLE_CASES)
    names = _ids(zoo.ALL_CASES)
    assert len(names) == len(set(names))


def test_expected_fused_kinds_are_snnopt_kinds():
    for case in zoo.STYLE_CASES + zoo.PEER_CASES:
        assert case.expected_fused and set(case.expected_fused) <= {"lif", "cuba_lif", "leaky_integrator"}
    for case in zoo.UNSUPPORTED_CASES:
        assert case.expected_fused == {} and case.reason and case.expected_reason_keywords
        assert all(word == word.lower() for word in case.expected_reason_keywords)


@pytest.mark.parametrize("case", zoo.ALL_CASES, ids=_ids(zoo.ALL_CASES))
def test_same_seed_gives_the_same_parameters_in_both_variants(case):
    a, b, twin = case.build(), case.build(), case.build(sparse_twin=True)
    for other in (b, twin):
        assert a.state_dict().keys() == other.state_dict().keys()
        for key, value in a.state_dict().items():
            assert torch.equal(value, other.state_dict()[key]), key
    assert [x.dtype for x in case.example_inputs()] == [torch.float32]
    (x,) = case.example_inputs()
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x, case.example_inputs()[0])
    assert x.shape[1 if case.time_first else 0] == case.batch
    (bigger,) = case.example_inputs(batch=case.batch + 3, steps=case.steps + 5)
    assert bigger.shape[1 if case.time_first else 0] == case.batch + 3
    assert bigger.shape[0 if case.time_first else 1] == case.steps + 5


@pytest.mark.parametrize("case", zoo.ALL_CASES, ids=_ids(zoo.ALL_CASES))
def test_twin_has_the_same_outputs_and_different_gradients(case):
    model, twin = case.build(), case.build(sparse_twin=True)
    inputs = case.example_inputs()
    outputs, twin_outputs = run(model, inputs), run(twin, inputs)
    assert len(outputs) == len(twin_outputs)
    for out, twin_out in zip(outputs, twin_outputs):
        assert torch.equal(out, twin_out)
    grads, twin_grads = gradients(model, inputs), gradients(twin, inputs)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert twin_grads[name] is not None, name
    assert any(not torch.allclose(grads[k], twin_grads[k], rtol=1e-3, atol=1e-6) for k in grads)


@pytest.mark.parametrize("case", zoo.ALL_CASES, ids=_ids(zoo.ALL_CASES))
def test_every_spiking_layer_fires_sometimes_and_sits_near_threshold(case):
    layers = spiking_layers(case)
    assert layers, "no spike function was called"
    for site, (u, s) in layers.items():
        rate = s.mean().item()
        near = (u.abs() < case.window).float().mean().item()
        where = f"{case.name} at {site[0][0].rsplit('/', 1)[-1]}:{site[0][1]}"
        assert MIN_FIRING_RATE <= rate <= MAX_FIRING_RATE, f"{where}: firing rate {rate:.3f}"
        assert near >= MIN_NEAR_THRESHOLD, f"{where}: only {near:.4f} of entries near threshold"
        for edge in (0.0, case.window, 0.5):
            gap = ((u.abs() - edge).abs()).min().item()
            assert gap > EDGE_MARGIN, f"{where}: an entry of v - θ lies {gap:.1e} from the edge {edge}"
