"""Acceptance tests of ``snnopt.optimize`` on the style zoo (issue 4, "Styles to support").

For every supported style and both backward modes the optimized module must compute the same
outputs, the same parameter gradients as the original (``backward="exact"``) or as the windowed,
reset-detached twin (``backward="sparse"``), fuse the expected layers, and share the original's
parameters. Models the compiler cannot handle must come back unchanged, with a reason.
"""

from __future__ import annotations

import functools
import json
from collections import Counter

import pytest
import torch

import snnopt
from tests.compiler import style_models as zoo
from tests.compiler.checks import GRAD_RTOL, assert_gradients_equal, assert_outputs_equal
from tests.compiler.style_models import gradients, run

if not hasattr(snnopt, "optimize"):
    pytest.skip("snnopt.optimize does not exist yet (issue 4)", allow_module_level=True)

MODES = ("exact", "sparse")

SUPPORTED = zoo.STYLE_CASES + zoo.PEER_CASES
CASES = {case.name: case for case in zoo.ALL_CASES}


def _params(cases):
    return [pytest.param(case, mode, id=f"{case.name}-{mode}") for case in cases for mode in MODES
            if mode in case.modes]


@functools.cache
def optimized(name: str, backward: str):
    """The original model and its optimized module, built once per case and mode."""
    case = CASES[name]
    model = case.build()
    opt = snnopt.optimize(model, case.example_inputs(), backward=backward, window=case.window)
    return model, opt


# ------------------------------------------------------------------------------ supported styles


@pytest.mark.parametrize("case, backward", _params(SUPPORTED))
def test_optimized_outputs_equal_the_original(case, backward):
    model, opt = optimized(case.name, backward)
    inputs = case.example_inputs()
    assert_outputs_equal(run(opt, inputs), run(model, inputs))


@pytest.mark.parametrize("case, backward", _params(SUPPORTED))
def test_optimized_gradients_equal_the_reference(case, backward):
    # exact: the original's gradients; sparse: the windowed, reset-detached twin's.
    model, opt = optimized(case.name, backward)
    inputs = case.example_inputs()
    reference = model if backward == "exact" else case.build(sparse_twin=True)
    expected = {k: None if g is None else g.clone() for k, g in gradients(reference, inputs).items()}
    assert_gradients_equal(gradients(opt, inputs), expected, GRAD_RTOL)


@pytest.mark.parametrize("case, backward", _params(SUPPORTED))
def test_explain_lists_the_expected_fused_layers(case, backward):
    _, opt = optimized(case.name, backward)
    report = snnopt.explain(opt)
    assert dict(Counter(layer.kind for layer in report.layers)) == case.expected_fused, str(report)
    recurrent = [layer for layer in report.layers if layer.recurrent]
    assert bool(recurrent) == ("recurrent" in case.styles), str(report)
    for layer in report.layers:
        # A leaky integrator is linear: its gradient is exact in both modes.
        assert layer.backward == (backward if layer.kind != "leaky_integrator" else "exact"), str(report)
        assert layer.kind in str(report)
    json.dumps(report.to_dict())


@pytest.mark.parametrize("case, backward", _params(SUPPORTED))
def test_optimized_module_shares_the_original_parameters(case, backward):
    model, opt = optimized(case.name, backward)
    assert isinstance(opt, torch.fx.GraphModule)
    assert set(opt.state_dict().keys()) == set(model.state_dict().keys())
    opt_state = opt.state_dict()
    for key, value in model.state_dict().items():
        assert opt_state[key].data_ptr() == value.data_ptr(), key
    for name, param in model.named_parameters():
        assert opt.get_parameter(name) is param, name


FULLY_FUSED = [case for case in SUPPORTED if case.fully_fused]


@pytest.mark.parametrize("case, backward", _params(FULLY_FUSED))
def test_fully_fused_module_runs_other_batch_sizes_and_step_counts(case, backward):
    model, opt = optimized(case.name, backward)
    for shape in (dict(batch=case.batch + 3), dict(batch=1, steps=case.steps + 5)):
        inputs = case.example_inputs(**shape)
        assert_outputs_equal(run(opt, inputs), run(model, inputs))


# ------------------------------------------------------------------------------ unsupported input


def _assert_reason(text: str, case):
    missing = [word for word in case.expected_reason_keywords if word not in text.lower()]
    assert not missing, f"reason {text!r} lacks {missing}"


@pytest.mark.parametrize("case, backward", _params(zoo.UNSUPPORTED_CASES))
def test_unsupported_model_is_left_alone_and_explained(case, backward):
    # The unsupported recurrence stays as written; other regions (e.g. a synaptic-current
    # integrator) may still be fused, so the whole model agrees to float tolerance, not bitwise.
    model, opt = optimized(case.name, backward)
    inputs = case.example_inputs()
    expected_outputs, got_outputs = run(model, inputs), run(opt, inputs)
    assert_outputs_equal(got_outputs, expected_outputs)
    expected = {k: g.clone() for k, g in gradients(model, inputs).items()}
    got = gradients(opt, inputs)
    assert got.keys() == expected.keys()
    assert_gradients_equal(got, expected, GRAD_RTOL)
    report = snnopt.explain(opt)
    assert not [layer for layer in report.layers if layer.kind != "leaky_integrator"], str(report)
    assert report.skipped, f"{case.name}: nothing reported as left alone"
    reasons = " | ".join(str(record.reason) for record in report.skipped)
    _assert_reason(reasons, case)


@pytest.mark.parametrize("case", zoo.UNSUPPORTED_CASES, ids=[c.name for c in zoo.UNSUPPORTED_CASES])
def test_unsupported_model_raises_in_strict_mode(case):
    with pytest.raises(snnopt.UnsupportedModelError) as error:
        snnopt.optimize(case.build(), case.example_inputs(), strict=True)
    _assert_reason(str(error.value), case)
