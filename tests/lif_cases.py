"""Random LIF test cases and their comparison against the readable reference.

A :class:`LifCase` is every choice a caller of ``snnopt.functional.lif`` / ``linear_lif`` can make
(spec, parameter kinds, shapes, layout, dtype, which outputs feed the loss) plus a seed; the seed
alone determines every tensor, so a failing hypothesis example prints everything needed to
reproduce it. :func:`check_case` runs the fused op and the reference
(:mod:`snnopt.codegen.reference`) on the same values and compares spikes (exactly), membrane and
final state (to float tolerance) and the gradient of a random linear loss w.r.t. every input that
requires one.

Spikes are a step function of the membrane, so two correct implementations that round differently
may disagree where ``v`` is within rounding of ``θ``; likewise the sparse window edge
``|v - θ| = window`` and the rectangular surrogate's edge ``|v - θ| = k/2``. Cases with an entry
that close to an edge are rejected (``hypothesis.assume``) instead of compared.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import assume, event
from hypothesis import strategies as st

import snnopt.functional as snf
from snnopt import surrogate as surrogate_lib
from snnopt.codegen import reference
from snnopt.spec import LifSpec

# Parameter ranges wide enough to reach each family's flat and steep regimes.
SURROGATE_PARAM_RANGES = {
    "superspike": (1.0, 100.0),
    "sigmoid": (1.0, 10.0),
    "atan": (0.5, 5.0),
    "triangle": (0.2, 2.0),
    "rectangular": (0.2, 2.0),
}
PARAM_KINDS = ("float", "0d", "neuron", "broadcast")
OUTPUTS = ("spikes", "membrane", "state", "all")

# Minimum distance of any v - θ from a discontinuity of the forward or the backward (see above).
EDGE_MARGIN = {torch.float64: 1e-6, torch.float32: 1e-4}
FORWARD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=1e-5, atol=1e-5)}
GRAD_TOL = {torch.float64: dict(rtol=1e-8, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@dataclasses.dataclass(frozen=True)
class LifCase:
    reset: str = "subtract"
    detach_reset: bool = True
    cuba: bool = False
    recurrent: bool = False
    surrogate: surrogate_lib.Surrogate = surrogate_lib.superspike()
    fire_at_threshold: bool = False
    backward: str = "sparse"
    window: float = 0.2
    beta_kind: str = "float"
    threshold_kind: str = "float"
    alpha_kind: str = "float"
    learn: bool = False  # tensor β/θ/α require grad (exact mode only)
    batch: int = 2
    steps: int = 5
    neurons: tuple = (5,)
    in_features: int = 4
    linear: bool = False  # linear_lif (x, weight, bias) instead of lif (current)
    bias: bool = True
    time_dim: int = 1
    dtype: torch.dtype = torch.float64
    outputs: str = "spikes"
    spikes_in_loss: bool = True  # False: only membrane/state feed the loss (no gradient reaches the spikes)
    initial_state: str = "none"  # "none" | "tensor" (v only) | "tuple" (v, syn)
    input_scale: float = 1.0
    input_offset: float = 0.0  # added to every input current (to the bias for linear_lif)
    # linear_lif only: spike-like inputs (a few percent nonzero) take the event-driven kernels, and
    # an input without grad lets the sparse backward build every linear gradient inside its sweep.
    sparse_input: bool = False
    input_requires_grad: bool = True
    seed: int = 0

    @property
    def spec(self) -> LifSpec:
        return LifSpec(reset=self.reset, detach_reset=self.detach_reset, surrogate=self.surrogate,
                       cuba=self.cuba, recurrent=self.recurrent, fire_at_threshold=self.fire_at_threshold,
                       backward=self.backward, window=self.window)

    @property
    def exact(self) -> bool:
        return self.backward == "exact"

    @property
    def return_membrane(self) -> bool:
        return self.outputs in ("membrane", "all")

    @property
    def return_state(self) -> bool:
        return self.outputs in ("state", "all")


@st.composite
def surrogates(draw):
    name = draw(st.sampled_from(sorted(SURROGATE_PARAM_RANGES)))
    low, high = SURROGATE_PARAM_RANGES[name]
    return surrogate_lib.Surrogate(name, draw(st.floats(low, high)))


@st.composite
def lif_cases(draw, *, linear: bool, dtype: torch.dtype = torch.float64, backward=None):
    backward = draw(st.sampled_from(["sparse", "exact"])) if backward is None else backward
    if linear:
        neurons = (draw(st.sampled_from([1, 3, 5, 7])),)
    else:
        neurons = draw(st.sampled_from([(1,), (3,), (5,), (7,), (2, 3), (3, 1), (1, 2, 3)]))
    return LifCase(
        reset=draw(st.sampled_from(["subtract", "zero", "none"])),
        detach_reset=draw(st.booleans()),
        cuba=draw(st.booleans()),
        recurrent=linear and draw(st.booleans()),
        surrogate=draw(surrogates()),
        fire_at_threshold=draw(st.booleans()),
        backward=backward,
        window=draw(st.one_of(st.floats(0.02, 0.6), st.just(1e6))) if backward == "sparse" else 0.2,
        beta_kind=draw(st.sampled_from(PARAM_KINDS)),
        threshold_kind=draw(st.sampled_from(PARAM_KINDS)),
        alpha_kind=draw(st.sampled_from(PARAM_KINDS)),
        learn=backward == "exact" and draw(st.booleans()),
        batch=draw(st.integers(1, 4)),
        steps=draw(st.sampled_from([1, 2, 3, 7, 11])),
        neurons=neurons,
        in_features=draw(st.sampled_from([1, 2, 5, 9])),
        linear=linear,
        bias=draw(st.booleans()),
        time_dim=draw(st.sampled_from([0, 1])),
        dtype=dtype,
        outputs=(outputs := draw(st.sampled_from(OUTPUTS))),
        spikes_in_loss=outputs == "spikes" or draw(st.booleans()),
        initial_state=draw(st.sampled_from(["none", "tensor", "tuple"])),
        input_scale=draw(st.sampled_from([0.5, 1.0, 2.0])),
        sparse_input=linear and draw(st.booleans()),
        input_requires_grad=not linear or draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_tensors(case: LifCase) -> dict:
    """Every value of the case, batch-first, in ``case.dtype``; leaves that get gradients require grad."""
    gen = torch.Generator().manual_seed(case.seed)

    def uniform(low, high, *shape):
        return (low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)).to(case.dtype)

    def normal(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(case.dtype)

    def param(kind, low, high):
        if kind == "float":
            return float(uniform(low, high).item())
        shape = {"0d": (), "neuron": case.neurons,
                 "broadcast": (case.neurons[-1],) if len(case.neurons) > 1 else (1,)}[kind]
        return uniform(low, high, *shape).requires_grad_(case.learn)

    b, t, n = case.batch, case.steps, case.neurons
    # CuBa integrates twice, so its drive is halved to keep a mix of silent and spiking neurons.
    scale = case.input_scale * (0.5 if case.cuba else 1.0)
    values = {
        "beta": param(case.beta_kind, 0.5, 0.95),
        "threshold": param(case.threshold_kind, 0.6, 1.4),
        "alpha": param(case.alpha_kind, 0.3, 0.9) if case.cuba else None,
    }
    if case.linear:
        x = uniform(0.0, 1.0, b, t, case.in_features)
        if case.sparse_input:  # about 5 % ones, the rest zeros: below snnopt's event threshold
            x = (x < 0.05).to(x.dtype) * (1.0 / 0.05 ** 0.5)
        values["x"] = x.requires_grad_(case.input_requires_grad)
        # Positive mean weight: a layer without bias still gets drive.
        values["weight"] = ((0.6 * normal(n[0], case.in_features) + 0.5) * (scale / math.sqrt(case.in_features))
                            ).requires_grad_()
        values["bias"] = (scale * (0.5 + 0.1 * normal(n[0])) + case.input_offset).requires_grad_() if case.bias else None
    else:
        values["current"] = (scale * uniform(-0.2, 1.0, b, t, *n) + case.input_offset).requires_grad_()
    values["recurrent_weight"] = (normal(n[0], n[0]) * (0.4 / math.sqrt(n[0]))).requires_grad_() if case.recurrent else None
    values["v0"] = values["syn0"] = None
    if case.initial_state != "none":
        # Initial-state gradients carry truncated BPTT across chunks, in both backward modes.
        values["v0"] = uniform(0.0, 1.4, b, *n).requires_grad_()
        if case.initial_state == "tuple" and case.cuba:
            values["syn0"] = uniform(0.0, 0.4, b, *n).requires_grad_()
    values["upstream"] = {name: normal(b, t, *n) if name in ("spikes", "membrane") else normal(b, *n)
                          for name in ("spikes", "membrane", "v", "syn")}
    return values


def _fresh(values: dict, dtype: torch.dtype) -> dict:
    """Independent leaves with the same values and requires_grad flags, cast to ``dtype``."""
    out = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.detach().to(dtype).requires_grad_(value.requires_grad)
        else:
            out[name] = value
    return out


def _loss(case: LifCase, outputs: dict, upstream: dict) -> torch.Tensor:
    # Everything the case returns feeds the loss, so each output's gradient path is exercised.
    loss = torch.zeros((), dtype=outputs["spikes"].dtype)
    if case.spikes_in_loss:
        loss = loss + (outputs["spikes"] * upstream["spikes"].to(loss.dtype)).sum()
    if case.return_membrane:
        loss = loss + (outputs["membrane"] * upstream["membrane"].to(loss.dtype)).sum()
    if case.return_state:
        loss = loss + (outputs["v"] * upstream["v"].to(loss.dtype)).sum()
        if case.cuba:
            loss = loss + (outputs["syn"] * upstream["syn"].to(loss.dtype)).sum()
    return loss


def _grads(loss: torch.Tensor, leaves: dict) -> dict:
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if not names:
        return {}
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, grads)}


def run_reference(case: LifCase, values: dict, *, spec: LifSpec | None = None, dtype=torch.float64):
    """Reference outputs (batch-first) and gradients, computed in ``dtype`` (float64 by default)."""
    leaves = _fresh({k: v for k, v in values.items() if k != "upstream"}, dtype)
    kwargs = dict(beta=leaves["beta"], threshold=leaves["threshold"], alpha=leaves["alpha"],
                  recurrent_weight=leaves["recurrent_weight"], initial_v=leaves["v0"],
                  initial_syn=leaves["syn0"])
    spec = case.spec if spec is None else spec
    if case.linear:
        result = reference.reference_linear_lif(leaves["x"], leaves["weight"], leaves["bias"], spec, **kwargs)
    else:
        result = reference.reference_lif(leaves["current"], spec, **kwargs)
    outputs = dict(zip(("spikes", "membrane", "v", "syn"), result))
    grads = _grads(_loss(case, outputs, values["upstream"]), leaves)
    return {k: (v.detach() if v is not None else None) for k, v in outputs.items()}, grads


def op_kwargs(case: LifCase, leaves: dict) -> dict:
    kwargs = dict(beta=leaves["beta"], threshold=leaves["threshold"], reset=case.reset,
                  detach_reset=case.detach_reset, surrogate=case.surrogate, backward=case.backward,
                  window=case.window, time_dim=case.time_dim, fire_at_threshold=case.fire_at_threshold,
                  return_membrane=case.return_membrane, return_state=case.return_state)
    if case.cuba:
        kwargs["alpha"] = leaves["alpha"]
    if case.initial_state == "tensor":
        kwargs["initial_state"] = leaves["v0"]
    elif case.initial_state == "tuple":
        kwargs["initial_state"] = (leaves["v0"], leaves["syn0"])
    return kwargs


def to_time_layout(case: LifCase, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if case.time_dim == 1 else tensor.transpose(0, 1)


def unpack_op_output(case: LifCase, result) -> dict:
    """The op's result as batch-first tensors, checking the return convention of the contract."""
    if not (case.return_membrane or case.return_state):
        assert isinstance(result, torch.Tensor), f"expected a spikes tensor, got {type(result).__name__}"
        return {"spikes": to_time_layout(case, result), "membrane": None, "v": None, "syn": None}
    assert not isinstance(result, torch.Tensor), "return_membrane/return_state must return a LifOutput"
    outputs = {"spikes": to_time_layout(case, result.spikes), "membrane": None, "v": None, "syn": None}
    if case.return_membrane:
        outputs["membrane"] = to_time_layout(case, result.membrane)
    else:
        assert result.membrane is None
    if case.return_state:
        outputs["v"], outputs["syn"] = result.state.v, result.state.syn
        assert (outputs["syn"] is None) == (not case.cuba)
    else:
        assert result.state is None
    return outputs


def run_op(case: LifCase, values: dict):
    """The fused op's outputs (batch-first) and gradients, in ``case.dtype``."""
    leaves = _fresh({k: v for k, v in values.items() if k != "upstream"}, case.dtype)
    kwargs = op_kwargs(case, leaves)
    if case.linear:
        if case.recurrent:
            kwargs["recurrent_weight"] = leaves["recurrent_weight"]
        result = snf.linear_lif(to_time_layout(case, leaves["x"]), leaves["weight"], leaves["bias"], **kwargs)
    else:
        result = snf.lif(to_time_layout(case, leaves["current"]), **kwargs)
    outputs = unpack_op_output(case, result)
    for name, value in outputs.items():
        if value is not None:
            assert value.dtype == case.dtype, f"{name} has dtype {value.dtype}, expected {case.dtype}"
    grads = _grads(_loss(case, outputs, values["upstream"]), leaves)
    return {k: (v.detach() if v is not None else None) for k, v in outputs.items()}, grads


def edge_distance(case: LifCase, values: dict, membrane: torch.Tensor) -> float:
    """Smallest distance of any v - θ (membrane and initial v) from an edge of H, window or surrogate."""
    threshold = values["threshold"]
    threshold = torch.as_tensor(threshold.detach() if isinstance(threshold, torch.Tensor) else threshold,
                                dtype=torch.float64)
    us = [membrane.double() - threshold]
    if values["v0"] is not None:
        us.append(values["v0"].detach().double() - threshold)
    edges = [0.0]
    if not case.exact:
        edges.append(case.window)
    if case.surrogate.name == "rectangular":
        edges.append(case.surrogate.param / 2)
    distance = math.inf
    for u in us:
        finite = u[torch.isfinite(u)].abs()
        for edge in edges:
            if finite.numel():
                distance = min(distance, float((finite - edge).abs().min()))
    return distance


def assert_close(actual, expected, tol, name):
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                               equal_nan=True, msg=lambda m: f"{name}: {m}")


def compare(case: LifCase, op: tuple, ref: tuple, *, check_grads: bool = True) -> None:
    (op_out, op_grads), (ref_out, ref_grads) = op, ref
    torch.testing.assert_close(op_out["spikes"].double(), ref_out["spikes"].double(), rtol=0, atol=0,
                               equal_nan=True, msg=lambda m: f"spikes differ: {m}")
    if case.return_membrane:
        assert_close(op_out["membrane"], ref_out["membrane"], FORWARD_TOL[case.dtype], "membrane")
    if case.return_state:
        assert_close(op_out["v"], ref_out["v"], FORWARD_TOL[case.dtype], "final v")
        if case.cuba:
            assert_close(op_out["syn"], ref_out["syn"], FORWARD_TOL[case.dtype], "final syn")
    if check_grads:
        assert op_grads.keys() == ref_grads.keys()
        for name in ref_grads:
            assert op_grads[name].dtype == case.dtype, f"grad of {name} has dtype {op_grads[name].dtype}"
            assert_close(op_grads[name], ref_grads[name], GRAD_TOL[case.dtype], f"gradient of {name}")


def check_case(case: LifCase, *, reject=assume, reference_spec: LifSpec | None = None) -> tuple:
    """Compare op and reference on ``case``; ``reject(False)`` is called for cases too close to an edge."""
    values = make_tensors(case)
    ref = run_reference(case, values, spec=reference_spec)
    reject(edge_distance(case, values, ref[0]["membrane"]) > EDGE_MARGIN[case.dtype])
    if reject is assume:  # coverage report for --hypothesis-show-statistics
        spikes = ref[0]["spikes"]
        event("spikes: " + ("none" if spikes.sum() == 0 else "all" if bool((spikes == 1).all()) else "some"))
        event("gradient: " + ("zero" if all(torch.count_nonzero(g) == 0 for g in ref[1].values()) else "nonzero"))
    op = run_op(case, values)
    compare(case, op, ref)
    return op, ref


def first_clear_seed(case: LifCase, tries: int = 50, margin: float | None = None) -> LifCase:
    """The case with the first seed whose values keep clear of every edge (for non-hypothesis tests)."""
    margin = EDGE_MARGIN[case.dtype] if margin is None else margin
    for seed in range(case.seed, case.seed + tries):
        candidate = dataclasses.replace(case, seed=seed)
        values = make_tensors(candidate)
        ref_out, _ = run_reference(candidate, values)
        if edge_distance(candidate, values, ref_out["membrane"]) > margin:
            return candidate
    raise AssertionError(f"no seed in {tries} tries keeps {case} clear of threshold edges")


def require(condition: bool) -> None:
    assert condition, "test case lands on a threshold edge; choose another seed"
