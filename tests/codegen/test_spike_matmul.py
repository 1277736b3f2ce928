"""Split-bfloat16 products with a spike operand (snnopt.codegen.spike_matmul) against float64.

On CPU the bfloat16 GEMM is emulated by the exact float32 widening of the parts, so these tests
check the algebra (the split is exact, the products agree with the float64 product within a float32
GEMM's error bound, bad cases fall back); ``test_split_gemm_on_gpu`` checks the cuBLAS route.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from snnopt.codegen import spike_matmul

FLOAT32_EPS = 2.0**-24


def _gemm_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # |fl(Σ) − Σ| ≤ γ_n Σ|terms| for float32 summation of n terms in any order (Higham, §3.1), with
    # γ_n = n·u/(1 − n·u). The split GEMM sums SPLIT_PARTS·K exact products whose magnitudes add
    # up to at most (1 + 2⁻⁷)·|a|@|b| (the parts of w have |w₁|+|w₂|+|w₃| ≤ (1 + 2⁻⁷)|w|).
    k = a.shape[1] * spike_matmul.SPLIT_PARTS
    gamma = (k + 1) * FLOAT32_EPS / (1 - (k + 1) * FLOAT32_EPS)
    return gamma * (1 + 2.0**-7) * (a.abs().double() @ b.abs().double())


# Up to bfloat16's largest finite value (3.39e38; float32's is 3.40e38): above it the first part
# rounds to inf, the documented limit of the split.
_BF16_MAX = float(np.float32(3.3e38))
finite_float32 = st.floats(min_value=-_BF16_MAX, max_value=_BF16_MAX, allow_nan=False, allow_infinity=False,
                           width=32)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64), elements=finite_float32))
def test_three_bfloat16_parts_sum_exactly_to_any_float32(values):
    t = torch.from_numpy(values)
    tiny = t.abs() < 2.0**-110  # documented limit: bits below bfloat16's smallest subnormal
    parts = spike_matmul.split_bfloat16(t)
    assert len(parts) == 3 and all(p.dtype == torch.bfloat16 for p in parts)
    total = sum(p.double() for p in parts)
    exact = total == t.double()
    assert bool((exact | tiny).all()), t[~(exact | tiny)]


def test_split_in_slabs_is_the_same_split(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(57, 33, generator=gen)
    whole = spike_matmul.split_bfloat16(w)
    monkeypatch.setattr(spike_matmul, "_SPLIT_SLAB_ELEMENTS", 100)  # 3 rows a slab, the last one short
    slabs = spike_matmul.split_bfloat16(w)
    assert all(torch.equal(a, b) for a, b in zip(whole, slabs))
    x = (torch.rand(20, 57, generator=gen) < 0.3).float()
    torch.testing.assert_close(spike_matmul.split_mm(w.t(), x.t(), spikes="b"), w.t() @ x.t())


def test_two_parts_are_not_enough():
    t = torch.randn(10_000)
    two = sum(p.double() for p in spike_matmul.split_bfloat16(t, parts=2))
    assert (two != t.double()).any()  # the third part carries real bits: 2 × 8 < 24


def test_non_finite_entries_stay_in_the_first_part():
    t = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.5])
    hi, mid, lo = spike_matmul.split_bfloat16(t)
    assert torch.equal(hi[:2].float(), t[:2]) and torch.isnan(hi[2]) and hi[3] == 1.5
    assert (mid == 0).all() and (lo == 0).all()


@pytest.mark.parametrize("rate", [0.05, 0.5, 1.0])
def test_split_product_with_spikes_on_the_left_is_within_float32_gemm_error(rate):
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(64, 300, generator=gen) < rate).float()
    w = torch.randn(40, 300, generator=gen) * 0.07
    out = spike_matmul.split_mm(x, w.t(), spikes="a")
    exact = x.double() @ w.double().t()
    assert out.dtype == torch.float32
    assert bool(((out.double() - exact).abs() <= _gemm_bound(x, w.t())).all())


def test_split_product_with_spikes_on_the_right_is_within_float32_gemm_error():
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(500, 30, generator=gen) * torch.rand(500, 30, generator=gen).lt(0.1)  # sparse dL/dI
    x = (torch.rand(500, 70, generator=gen) < 0.2).float()
    out = spike_matmul.split_mm(grad.t(), x, spikes="b")
    exact = grad.double().t() @ x.double()
    assert bool(((out.double() - exact).abs() <= _gemm_bound(grad.t(), x)).all())


def test_one_spike_per_row_reads_the_weights_back_bit_exactly():
    # One nonzero product per output: the parts' partial sums are exact, so the result is W itself
    # (a two-part split would be off in the last 7 bits).
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(64, 40, generator=gen)
    columns = torch.randint(0, 40, (200,), generator=gen)
    x = torch.nn.functional.one_hot(columns, 40).float()
    out = spike_matmul.split_mm(x, w.t(), spikes="a")
    assert torch.equal(out, w.t()[columns])


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_split_product_reads_any_operand_layout(layout):
    gen = torch.Generator().manual_seed(6)
    x = (torch.rand(30, 50, generator=gen) < 0.3).float()
    w = torch.randn(20, 100, generator=gen)[:, :50]  # strided: every row skips 50 entries
    b = {"contiguous": w.t().contiguous(), "transposed": w.contiguous().t(), "strided": w.t()}[layout]
    out = spike_matmul.split_mm(x, b, spikes="a")
    assert bool(((out.double() - x.double() @ b.double()).abs() <= _gemm_bound(x, b)).all())


@pytest.mark.parametrize("transposed", [False, True])
def test_parts_are_stacked_smallest_first_along_the_contraction(transposed):
    # Tensor cores add into the accumulator by truncation: the small parts go in while it is small.
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(12, 9, generator=gen)
    operand = w.contiguous().t() if transposed else w
    stacked = spike_matmul._contraction_stack(operand, 0, repeat=False)
    hi, mid, lo = spike_matmul.split_bfloat16(operand)
    rows = operand.shape[0]
    assert stacked.shape == (3 * rows, operand.shape[1])
    assert torch.equal(stacked[:rows], lo) and torch.equal(stacked[rows:2 * rows], mid)
    assert torch.equal(stacked[2 * rows:], hi)


def test_split_mm_rejects_an_unknown_operand_name():
    with pytest.raises(ValueError, match="spikes"):
        spike_matmul.split_mm(torch.ones(2, 2), torch.ones(2, 2), spikes="left")


@pytest.fixture
def split_everywhere(monkeypatch):
    """Let linear / weight_grad take the split route on CPU tensors of any size."""
    monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: True)
    calls = []
    real = spike_matmul.split_mm
    monkeypatch.setattr(spike_matmul, "split_mm", lambda *a, **k: (calls.append(k["spikes"]), real(*a, **k))[1])
    return calls


def test_linear_takes_the_split_for_spikes_and_matches_f_linear(split_everywhere):
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 25, 90, generator=gen) < 0.1).float()
    w, b = torch.randn(33, 90, generator=gen) * 0.1, torch.randn(33, generator=gen)
    out = spike_matmul.linear(x, w, b)
    assert split_everywhere == ["a"] and out.shape == (4, 25, 33)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_falls_back_when_the_input_is_not_bfloat16_exact(split_everywhere):
    x = torch.rand(3, 7, 16)  # real-valued: rounding it to bfloat16 would change the product
    w = torch.randn(5, 16)
    out = spike_matmul.linear(x, w)
    assert split_everywhere == []
    assert torch.equal(out, torch.nn.functional.linear(x, w))
    x_nan = (torch.rand(3, 7, 16) < 0.5).float()
    x_nan[0, 0, 0] = float("nan")  # NaN is not "exact": the reference decides what it gives
    spike_matmul.linear(x_nan, w)
    assert split_everywhere == []


def test_linear_reads_spikiness_from_the_listed_nonzeros(split_everywhere):
    x = (torch.rand(2, 9, 16) < 0.4).float()
    w = torch.randn(6, 16)
    real_values = torch.tensor([0.3, 1.0])
    assert torch.equal(spike_matmul.linear(x, w, nonzeros=real_values), torch.nn.functional.linear(x, w))
    assert split_everywhere == []  # the nonzeros say "not spikes": the reference
    torch.testing.assert_close(spike_matmul.linear(x, w, nonzeros=x[x != 0]), torch.nn.functional.linear(x, w))
    assert split_everywhere == ["a"]


def test_weight_grad_takes_the_split_and_matches_the_float32_product(split_everywhere):
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(200, 12, generator=gen)
    x = (torch.rand(200, 20, generator=gen) < 0.3).to(torch.bfloat16)  # as triton_lif.dense_input builds it
    out = spike_matmul.weight_grad(grad, x)
    assert split_everywhere == ["b"]
    torch.testing.assert_close(out, grad.t() @ x.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stacked", [False, True])
def test_weight_grad_from_parts_takes_rows_or_the_stacked_operand(stacked):
    gen = torch.Generator().manual_seed(9)
    grad = torch.randn(150, 11, generator=gen) * torch.logspace(-4, 4, 11)
    x = (torch.rand(150, 17, generator=gen) < 0.3).to(torch.bfloat16)
    parts = torch.stack(spike_matmul.split_bfloat16(grad)[::-1])  # smallest first, as the kernel writes them
    right = torch.cat([x] * spike_matmul.SPLIT_PARTS) if stacked else x
    out = spike_matmul.weight_grad_from_parts(parts, right, stacked=stacked)
    assert bool(((out.double() - grad.double().t() @ x.double()).abs() <= _gemm_bound(grad.t(), x.float())).all())


def test_weight_grad_from_parts_names_a_wrong_operand():
    parts = torch.zeros(3, 5, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="parts"):
        spike_matmul.weight_grad_from_parts(parts[:2], torch.zeros(5, 2))
    with pytest.raises(ValueError, match="stacked"):
        spike_matmul.weight_grad_from_parts(parts, torch.zeros(5, 2, dtype=torch.bfloat16), stacked=True)


def test_route_is_not_taken_on_cpu_or_when_the_user_enabled_tf32(monkeypatch):
    big = (8000, 4096, 4096)  # the Open Neuromorphic layer at n = 4096
    x, w = torch.ones(8, 8), torch.ones(8, 8)
    assert not spike_matmul.applies(x, w, big)  # CPU tensors: the reference product
    monkeypatch.setattr(spike_matmul, "_float32_output_mm", lambda device_type: True)

    class FakeCuda:  # only the attributes applies() reads
        is_cuda, dtype, device = True, torch.float32, torch.device("cuda")

    monkeypatch.setattr(spike_matmul, "_tf32_enabled", lambda: False)
    assert spike_matmul.applies(FakeCuda(), FakeCuda(), big)
    monkeypatch.setattr(spike_matmul, "_tf32_enabled", lambda: True)
    assert not spike_matmul.applies(FakeCuda(), FakeCuda(), big)


def test_split_pays_only_for_large_products_with_both_outer_dimensions_large():
    assert spike_matmul.pays(8000, 16384, 16384)  # ON layer, current
    assert spike_matmul.pays(1000, 25600, 784)  # seed layer 1 at H = 1000, weight gradient
    assert not spike_matmul.pays(25600, 784, 200)  # seed layer 1 at H = 200: r too small to pay
    assert not spike_matmul.pays(10**6, 10**3, 10)  # many MACs, but one thin outer dimension
    assert not spike_matmul.pays(600, 600, 600)  # both outer dimensions fine, too few MACs


def test_tf32_setting_is_read_from_torch():
    # torch.backends.cuda.matmul is not a plain module (monkeypatch cannot restore it): set and
    # restore by hand.
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # TF32 allowed
        assert spike_matmul._tf32_enabled()
        torch.set_float32_matmul_precision("highest")
        assert not spike_matmul._tf32_enabled()
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_split_gemm_on_gpu():
    if torch.backends.cuda.matmul.allow_tf32:
        pytest.skip("TF32 enabled in this process: the split route is off by design")
    gen = torch.Generator(device="cuda").manual_seed(5)
    rows, features, neurons = 4096, 2048, 1024
    assert spike_matmul.pays(rows, features, neurons) and spike_matmul.pays(neurons, rows, features)
    x = (torch.rand(rows, features, device="cuda", generator=gen) < 0.05).float()
    w = torch.randn(neurons, features, device="cuda", generator=gen) / math.sqrt(features)
    assert spike_matmul.applies(x, w, (rows, features, neurons)), "torch.mm(out_dtype=float32) missing"
    out = spike_matmul.linear(x, w)
    exact = x.double() @ w.double().t()
    assert bool(((out.double() - exact).abs() <= _gemm_bound(x, w.t())).all())
    grad = torch.randn(rows, neurons, device="cuda", generator=gen)
    grad_w = spike_matmul.weight_grad(grad, x)
    exact_w = grad.double().t() @ x.double()
    assert bool(((grad_w.double() - exact_w).abs() <= _gemm_bound(grad.t(), x)).all())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("stack_dim", [0, 1])
def test_triton_split_writes_exact_parts_smallest_first(stack_dim):
    # The CUDA route's one-launch split (Triton's interpreter here) against the operand itself: the
    # parts add up to it exactly, lie in the slots the torch split uses, and keep inf / NaN whole.
    pytest.importorskip("triton")
    from snnopt.codegen import triton_lif

    gen = torch.Generator().manual_seed(9)
    w = torch.randn(7, 33, generator=gen) * torch.logspace(-30, 30, 33)  # wide range of magnitudes
    w[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    w[1, :2] = torch.tensor([2.0**-110, -3.3e38])  # the ends of the exact range (module docstring)
    rows, cols = w.shape
    stacked = torch.empty((3 * rows, cols) if stack_dim == 0 else (rows, 3 * cols), dtype=torch.bfloat16)
    triton_lif.split_bfloat16_into(w, stacked, stack_dim)
    lo, mid, hi = (stacked.reshape(3, rows, cols) if stack_dim == 0 else stacked.reshape(rows, 3, cols).transpose(0, 1))
    finite = torch.isfinite(w)
    total = hi.double() + mid.double() + lo.double()
    assert torch.equal(total[finite], w.double()[finite])
    assert torch.equal(hi[~finite].float(), w[~finite]) or bool(torch.isnan(w[~finite]).any())
    assert bool((mid[~finite] == 0).all() and (lo[~finite] == 0).all())
    assert torch.isnan(hi[0, 2]) and hi[0, 0] == float("inf") and hi[0, 1] == float("-inf")
    lo, mid, hi = lo.float().abs()[finite], mid.float().abs()[finite], hi.float().abs()[finite]
    assert bool((lo <= mid).all() and (mid <= hi).all()) and bool((lo > 0).any())
