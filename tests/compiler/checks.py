"""Comparisons shared by the compiler tests: outputs (spikes identical) and gradients (relative)."""

from __future__ import annotations

import torch

OUTPUT_RTOL = 1e-5
GRAD_RTOL = 1e-4
NORM_FLOOR = 1e-6  # absolute floor of the norms relative errors divide by


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / max(float(reference.norm()), NORM_FLOOR))


def assert_outputs_equal(got, expected):
    assert len(got) == len(expected), f"{len(got)} outputs, expected {len(expected)}"
    for k, (out, ref) in enumerate(zip(got, expected)):
        assert out.shape == ref.shape and out.dtype == ref.dtype, (k, out.shape, ref.shape, out.dtype, ref.dtype)
        if bool(((ref == 0) | (ref == 1)).all()):  # spikes: identical
            mismatches = int((out != ref).sum())
            assert mismatches == 0, f"output {k}: {mismatches} spikes differ"
        else:
            err = relative_error(out, ref)
            assert err <= OUTPUT_RTOL, f"output {k}: relative error {err:.2e}"


def assert_gradients_equal(got: dict, expected: dict, rtol: float = GRAD_RTOL):
    assert got.keys() == expected.keys()
    errors = {}
    # A gradient that is zero in theory (a bias before a train-mode BatchNorm) is float noise on
    # both sides; it is compared relative to the model's largest gradient instead of its own norm.
    largest = max([float(g.double().norm()) for g in expected.values() if g is not None] or [0.0])
    for name, ref in expected.items():
        value = got[name]
        if ref is None or value is None:
            other = value if ref is None else ref
            assert other is None or not other.any(), f"{name}: gradient missing on one side only"
            continue
        scale = max(float(ref.double().norm()), 1e-3 * largest, NORM_FLOOR)
        errors[name] = float((value.double() - ref.double()).norm()) / scale
    bad = {name: f"{err:.2e}" for name, err in errors.items() if not err <= rtol}
    assert not bad, f"relative gradient errors above {rtol}: {bad}"
