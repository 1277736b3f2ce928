"""Spec variants for the Triton kernel tests, and one routine comparing a variant with the reference.

Coverage: the full product of the spec dimensions (CuBa × recurrent × 3 resets × detached/attached
× 5 surrogates × 2 backward modes × 2 firing rules × 4 dtypes, times the shape dimensions: T, fused
linear or not, bias) is thousands of variants, far too slow under Triton's interpreter. ``CASES``
is two deterministic pairwise covering arrays: every value of every dimension, and every pair of
values of any two dimensions, occurs in at least one case (``test_cases_cover_every_pair`` checks
it). Explicit tests add what pairs cannot show (no spikes, all spikes, firing exactly at the
threshold, input_active, learnable β/θ/α, the leaky integrator).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

import snnopt.functional as SF
from snnopt.codegen.reference import reference_lif
from snnopt.spec import LifSpec
from snnopt.surrogate import Surrogate

DIMENSIONS = {
    "cuba": (False, True),
    "recurrent": (False, True),
    "reset": ("subtract", "zero", "none"),
    "detach_reset": (True, False),
    "surrogate": ("superspike", "sigmoid", "atan", "triangle", "rectangular"),
    "backward": ("sparse", "exact"),
    "fire_at_threshold": (False, True),
    "dtype": ("float64", "float32", "bfloat16", "float16"),
    "steps": (1, 2, 5),
    "linear": (True, False),
    "bias": (True, False),
}
# Parameters that make the surrogates non-negligible over the tiny tests' membrane range.
SURROGATE_PARAMS = {"superspike": 10.0, "sigmoid": 4.0, "atan": 2.0, "triangle": 1.0, "rectangular": 1.0}

TOLERANCES = {  # (rtol, atol) for values of order one
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (4e-2, 4e-2),
    torch.float16: (1e-2, 1e-2),
}


def _valid(case: dict) -> bool:
    # recurrent needs the fused linear layer (lif() has no recurrent weight)
    return not (case["recurrent"] and not case["linear"]) and not (case["bias"] and not case["linear"])


def pairwise_cases(seed: int = 0, candidates: int = 60) -> list[dict]:
    """A greedy pairwise covering array over DIMENSIONS (deterministic)."""
    names = list(DIMENSIONS)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in DIMENSIONS[a] for vb in DIMENSIONS[b]
                 if _valid({**{n: DIMENSIONS[n][0] for n in names}, a: va, b: vb}) or _pair_possible(a, va, b, vb)}
    rng = random.Random(seed)
    cases = []
    while uncovered:
        target = next(iter(sorted(uncovered, key=repr)))
        best, best_gain = None, -1
        for _ in range(candidates):
            case = {n: rng.choice(DIMENSIONS[n]) for n in names}
            case[target[0]], case[target[2]] = target[1], target[3]
            if not _valid(case):
                continue
            gain = sum((a, case[a], b, case[b]) in uncovered for a, b in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = case, gain
        if best is None:  # the target pair cannot occur in a valid case
            uncovered.discard(target)
            continue
        cases.append(best)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return cases


def _pair_possible(a, va, b, vb) -> bool:
    names = list(DIMENSIONS)
    for rest in itertools.product(*(DIMENSIONS[n] for n in names if n not in (a, b))):
        case = dict(zip([n for n in names if n not in (a, b)], rest))
        case[a], case[b] = va, vb
        if _valid(case):
            return True
    return False


# Two independent covering arrays: every pair twice, in different company.
CASES = pairwise_cases(seed=0) + pairwise_cases(seed=1)


def case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@dataclass
class Layer:
    spec: LifSpec
    dtype: torch.dtype
    tensors: dict


def make_layer(case: dict, *, batch=3, neurons=8, in_features=6, device="cpu", seed=0, learn_params=None,
               window=0.5) -> Layer:
    dtype = getattr(torch, case["dtype"])
    spec = LifSpec(reset=case["reset"], detach_reset=case["detach_reset"],
                   surrogate=Surrogate(case["surrogate"], SURROGATE_PARAMS[case["surrogate"]]),
                   cuba=case["cuba"], recurrent=case["recurrent"], fire_at_threshold=case["fire_at_threshold"],
                   backward=case["backward"], window=window)
    gen = torch.Generator().manual_seed(seed)
    steps = case["steps"]

    def rand(*shape, scale=1.0, shift=0.0):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) + shift) * scale).to(dtype).to(device)

    learn = (spec.backward == "exact") if learn_params is None else learn_params
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    tensors = {
        "beta": (torch.rand(neurons, generator=gen, dtype=torch.float64) * 0.3 + 0.6).to(pdtype).to(device),
        "threshold": (torch.rand(neurons, generator=gen, dtype=torch.float64) * 0.4 + 0.8).to(pdtype).to(device),
        "v0": rand(batch, neurons, scale=1.4),
    }
    if spec.cuba:
        tensors["alpha"] = (torch.rand(neurons, generator=gen, dtype=torch.float64) * 0.4 + 0.4).to(pdtype).to(device)
        tensors["syn0"] = rand(batch, neurons, scale=0.3)
    if case["linear"]:
        tensors["x"] = rand(batch, steps, in_features)
        # Scaled so that the current stays of order one (near the threshold) at any layer size.
        tensors["weight"] = rand(neurons, in_features, scale=1.2 * 4 / in_features, shift=-0.35)
        if case["bias"]:
            tensors["bias"] = rand(neurons, scale=0.2, shift=-0.5)
        if spec.recurrent:
            tensors["recurrent_weight"] = rand(neurons, neurons, scale=0.8 * 6 / neurons, shift=-0.5)
    else:
        tensors["x"] = rand(batch, steps, neurons, scale=0.9)
    for name, t in tensors.items():
        if name in ("beta", "threshold", "alpha") and not learn:
            continue
        t.requires_grad_(True)
    return Layer(spec, dtype, tensors)


def run_snnopt(layer: Layer, backend="triton", input_active=None):
    t, spec = layer.tensors, layer.spec
    state = (t["v0"], t["syn0"]) if spec.cuba else t["v0"]
    common = dict(beta=t["beta"], threshold=t["threshold"], alpha=t.get("alpha"), reset=spec.reset,
                  detach_reset=spec.detach_reset, surrogate=spec.surrogate, backward=spec.backward,
                  window=spec.window, fire_at_threshold=spec.fire_at_threshold, initial_state=state,
                  return_membrane=True, return_state=True, backend=backend)
    if "weight" in t:
        out = SF.linear_lif(t["x"], t["weight"], t.get("bias"), recurrent_weight=t.get("recurrent_weight"),
                            input_active=input_active, **common)
    else:
        out = SF.lif(t["x"], **common)
    return out.spikes, out.membrane, out.state.v, out.state.syn


def run_reference(layer: Layer):
    """The reference in the accumulation dtype, fed the current as the fast path computes it."""
    t, spec = layer.tensors, layer.spec
    acc = torch.float64 if layer.dtype == torch.float64 else torch.float32
    if "weight" in t:
        current = torch.nn.functional.linear(t["x"], t["weight"], t.get("bias"))  # in the input dtype, like nn.Linear
    else:
        current = t["x"]
    rec = t.get("recurrent_weight")
    out = reference_lif(current.to(acc), spec, beta=t["beta"].to(acc), threshold=t["threshold"].to(acc),
                        alpha=t["alpha"].to(acc) if spec.cuba else None,
                        recurrent_weight=None if rec is None else rec.to(acc), initial_v=t["v0"].to(acc),
                        initial_syn=t["syn0"].to(acc) if spec.cuba else None)
    return out


def _loss(outputs, upstream):
    spikes, membrane, v_final, syn_final = outputs
    loss = (spikes.to(upstream[0].dtype) * upstream[0]).sum() + (membrane.to(upstream[0].dtype) * upstream[1]).sum()
    loss = loss + (v_final.to(upstream[0].dtype) * upstream[2]).sum()
    if syn_final is not None:
        loss = loss + (syn_final.to(upstream[0].dtype) * upstream[3]).sum()
    return loss


def compare_with_reference(layer: Layer, backend="triton", check_spike_mismatch=0.0):
    """Forward values and every gradient of ``layer`` on snnopt vs the reference; asserts closeness."""
    torch.manual_seed(1)
    t = layer.tensors
    ours = run_snnopt(layer, backend)
    ref = run_reference(layer)
    acc = torch.float64 if layer.dtype == torch.float64 else torch.float32
    rtol, atol = TOLERANCES[layer.dtype]
    mismatch = (ours[0].to(acc) != ref[0]).to(torch.float64).mean().item()
    assert mismatch <= check_spike_mismatch, f"spikes differ at {mismatch:.2%} of entries"
    if mismatch:
        return  # a flipped spike changes everything downstream; values are not comparable
    assert ours[0].dtype == layer.dtype and ours[1].dtype == layer.dtype
    for name, a, b in zip(("membrane", "v_final", "syn_final"), ours[1:], ref[1:]):
        if b is not None:
            torch.testing.assert_close(a.to(acc), b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    device = ours[0].device
    gen = torch.Generator().manual_seed(2)
    upstream = [torch.randn(o.shape, generator=gen, dtype=acc).to(device) if o is not None else None for o in ref]
    leaves = [(n, v) for n, v in t.items() if v.requires_grad]
    grads_ours = torch.autograd.grad(_loss(ours, upstream), [v for _, v in leaves], allow_unused=True)
    grads_ref = torch.autograd.grad(_loss(ref, upstream), [v for _, v in leaves], allow_unused=True)
    for (name, leaf), a, b in zip(leaves, grads_ours, grads_ref):
        if b is None:
            b = torch.zeros_like(leaf)
        assert a is not None, f"no gradient for {name}"
        assert a.dtype == leaf.dtype, f"{name}: gradient dtype {a.dtype}, expected {leaf.dtype}"
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.to(acc), b.to(acc), rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"gradient of {name}: {m}")
