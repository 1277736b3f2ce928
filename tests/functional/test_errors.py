import subprocess
import sys
import textwrap

import pytest
import torch

import snnopt.functional as snf
from snnopt.errors import SnnoptError

F64 = torch.float64


def current(*shape, dtype=F64):
    return torch.rand(shape or (2, 5, 3), dtype=dtype)


def x_in():
    return torch.rand(2, 5, 4, dtype=F64)


def weight(out=3, inp=4):
    return torch.randn(out, inp, dtype=F64)


LIF_ERRORS = {
    "reset-unknown": (ValueError, "reset", lambda: snf.lif(current(), beta=0.9, reset="foo")),
    "backward-unknown": (ValueError, "backward", lambda: snf.lif(current(), beta=0.9, backward="dense")),
    "window-negative": (ValueError, "window", lambda: snf.lif(current(), beta=0.9, window=-1.0)),
    "window-nan": (ValueError, "window", lambda: snf.lif(current(), beta=0.9, window=float("nan"))),
    "surrogate-unknown": (ValueError, "surrogate", lambda: snf.lif(current(), beta=0.9, surrogate="nope")),
    "surrogate-wrong-type": (TypeError, "surrogate", lambda: snf.lif(current(), beta=0.9, surrogate=3)),
    "time-dim-2": (ValueError, "time_dim", lambda: snf.lif(current(), beta=0.9, time_dim=2)),
    "detach-reset-not-bool": (TypeError, "detach_reset", lambda: snf.lif(current(), beta=0.9, detach_reset="yes")),
    "current-int": (TypeError, "current", lambda: snf.lif(torch.ones(2, 5, 3, dtype=torch.int64), beta=0.9)),
    "current-float16": (TypeError, "current", lambda: snf.lif(current(dtype=torch.float16), beta=0.9)),
    "current-bool": (TypeError, "current", lambda: snf.lif(torch.ones(2, 5, 3, dtype=torch.bool), beta=0.9)),
    "current-not-tensor": (TypeError, "current", lambda: snf.lif([[0.5, 0.5]], beta=0.9)),
    "current-1d": (ValueError, "current", lambda: snf.lif(torch.rand(5, dtype=F64), beta=0.9)),
    "beta-wrong-shape": (ValueError, "beta", lambda: snf.lif(current(), beta=torch.full((4,), 0.9, dtype=F64))),
    "beta-int-tensor": (TypeError, "beta", lambda: snf.lif(current(), beta=torch.ones(3, dtype=torch.int64))),
    "threshold-wrong-shape": (ValueError, "threshold",
                              lambda: snf.lif(current(), beta=0.9, threshold=torch.ones(2, 3, dtype=F64))),
    "alpha-wrong-shape": (ValueError, "alpha", lambda: snf.lif(current(), beta=0.9, alpha=torch.full((5,), 0.5, dtype=F64))),
    "beta-requires-grad-in-sparse": (ValueError, "beta", lambda: snf.lif(
        current(), beta=torch.full((3,), 0.9, dtype=F64, requires_grad=True), backward="sparse")),
    "threshold-requires-grad-in-sparse": (ValueError, "threshold", lambda: snf.lif(
        current(), beta=0.9, threshold=torch.tensor(1.0, dtype=F64, requires_grad=True))),
    "alpha-requires-grad-in-sparse": (ValueError, "alpha", lambda: snf.lif(
        current(), beta=0.9, alpha=torch.tensor(0.5, dtype=F64, requires_grad=True))),
    "initial-state-wrong-shape": (ValueError, "initial_state",
                                  lambda: snf.lif(current(), beta=0.9, initial_state=torch.zeros(3, 3, dtype=F64))),
    "initial-state-time-first-wrong-shape": (ValueError, "initial_state", lambda: snf.lif(
        current(), beta=0.9, time_dim=0, initial_state=torch.zeros(2, 3, dtype=F64))),
    "initial-syn-wrong-shape": (ValueError, "initial_state", lambda: snf.lif(
        current(), beta=0.9, alpha=0.5, initial_state=(torch.zeros(2, 3, dtype=F64), torch.zeros(2, 4, dtype=F64)))),
}

LINEAR_ERRORS = {
    "weight-in-features-mismatch": (ValueError, "weight", lambda: snf.linear_lif(x_in(), weight(3, 5), beta=0.9)),
    "weight-1d": (ValueError, "weight", lambda: snf.linear_lif(x_in(), torch.randn(4, dtype=F64), beta=0.9)),
    "weight-int": (TypeError, "weight", lambda: snf.linear_lif(x_in(), torch.ones(3, 4, dtype=torch.int64), beta=0.9)),
    "weight-dtype-differs-from-x": (TypeError, "weight",
                                    lambda: snf.linear_lif(x_in(), weight().float(), beta=0.9)),
    "x-2d": (ValueError, "x", lambda: snf.linear_lif(torch.rand(5, 4, dtype=F64), weight(), beta=0.9)),
    "x-int": (TypeError, "x", lambda: snf.linear_lif(torch.ones(2, 5, 4, dtype=torch.int64), weight(), beta=0.9)),
    "bias-wrong-shape": (ValueError, "bias", lambda: snf.linear_lif(x_in(), weight(), torch.zeros(4, dtype=F64), beta=0.9)),
    "recurrent-weight-wrong-shape": (ValueError, "recurrent_weight", lambda: snf.linear_lif(
        x_in(), weight(), beta=0.9, recurrent_weight=torch.zeros(3, 4, dtype=F64))),
    "beta-wrong-shape": (ValueError, "beta", lambda: snf.linear_lif(x_in(), weight(), beta=torch.full((4,), 0.9, dtype=F64))),
    "initial-state-wrong-shape": (ValueError, "initial_state", lambda: snf.linear_lif(
        x_in(), weight(), beta=0.9, initial_state=torch.zeros(2, 4, dtype=F64))),
    "reset-unknown": (ValueError, "reset", lambda: snf.linear_lif(x_in(), weight(), beta=0.9, reset="foo")),
    "time-dim-2": (ValueError, "time_dim", lambda: snf.linear_lif(x_in(), weight(), beta=0.9, time_dim=2)),
    "input-active-float": (TypeError, "input_active", lambda: snf.linear_lif(
        x_in(), weight(), beta=0.9, input_active=torch.zeros(3, dtype=F64))),
}

INTEGRATOR_ERRORS = {
    "current-int": (TypeError, "current", lambda: snf.leaky_integrator(torch.ones(2, 5, 3, dtype=torch.int64), beta=0.9)),
    "beta-wrong-shape": (ValueError, "beta",
                         lambda: snf.leaky_integrator(current(), beta=torch.full((4,), 0.9, dtype=F64))),
    "time-dim-2": (ValueError, "time_dim", lambda: snf.leaky_integrator(current(), beta=0.9, time_dim=2)),
    "initial-state-wrong-shape": (ValueError, "initial_state",
                                  lambda: snf.leaky_integrator(current(), beta=0.9, initial_state=torch.zeros(3, 3, dtype=F64))),
}


def _check(kind, argument, call):
    with pytest.raises(kind, match=argument) as info:
        call()
    assert isinstance(info.value, SnnoptError), f"{type(info.value).__name__} is not a snnopt error"


@pytest.mark.parametrize("name", list(LIF_ERRORS))
def test_lif_rejects_bad_argument_naming_it(name):
    _check(*LIF_ERRORS[name])


@pytest.mark.parametrize("name", list(LINEAR_ERRORS))
def test_linear_lif_rejects_bad_argument_naming_it(name):
    _check(*LINEAR_ERRORS[name])


@pytest.mark.parametrize("name", list(INTEGRATOR_ERRORS))
def test_leaky_integrator_rejects_bad_argument_naming_it(name):
    _check(*INTEGRATOR_ERRORS[name])


def test_learnable_beta_is_accepted_in_exact_mode():
    beta = torch.full((3,), 0.9, dtype=F64, requires_grad=True)
    snf.lif(current() * 2, beta=beta, backward="exact").sum().backward()
    assert beta.grad is not None and beta.grad.shape == (3,)


def test_weight_on_another_device_is_rejected_naming_weight():
    meta_weight = torch.empty(3, 4, dtype=F64, device="meta")
    _check(ValueError, "weight", lambda: snf.linear_lif(x_in(), meta_weight, beta=0.9))


def test_beta_on_another_device_is_rejected_naming_beta():
    meta_beta = torch.full((3,), 0.9, dtype=F64, device="meta")
    _check(ValueError, "beta", lambda: snf.lif(current(), beta=meta_beta))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weight_on_cuda_with_cpu_input_is_rejected():
    _check(ValueError, "weight", lambda: snf.linear_lif(x_in(), weight().cuda(), beta=0.9))


@pytest.mark.parametrize("indices", [[0, 40], [-1], [0, 10**9]], ids=["past-end", "negative", "huge"])
def test_input_active_out_of_range_is_rejected_naming_it(indices):
    # In a child process: an unchecked index reaches a compiled kernel and can crash the interpreter.
    script = textwrap.dedent(f"""
        import torch, snnopt.functional as snf
        x = torch.rand(2, 5, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        try:
            snf.linear_lif(x, w, beta=0.9, input_active=torch.tensor({indices!r})).sum().backward()
        except ValueError as error:
            print("ValueError:", error)
        else:
            print("no error")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"crashed with exit code {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.startswith("ValueError:") and "input_active" in result.stdout, result.stdout
