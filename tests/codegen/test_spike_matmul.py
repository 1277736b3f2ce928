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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_gemm_on_gpu(monkeypatch):
    # The int8 route compiled: the Triton digits and combine equal the CPU reference bit for bit,
    # torch._int_mm's product is within the documented bound, and the route choice times both.
    gen = torch.Generator(device="cuda").manual_seed(6)
    rows, features, neurons = 4096, 2048, 1024
    x = (torch.rand(rows, features, device="cuda", generator=gen) < 0.05).float()
    w = torch.randn(neurons, features, device="cuda", generator=gen) / math.sqrt(features)
    w[3, 7] = float("inf")
    for t, dim in ((w.t(), 1), (torch.randn(rows, neurons, device="cuda", generator=gen) * 1e-3, 1)):
        digits, shifts = spike_matmul.quantize_int8(t, dim)
        ref_digits, ref_shifts = spike_matmul.quantize_int8(t.cpu(), dim)
        assert torch.equal(digits.cpu(), ref_digits) and torch.equal(shifts.cpu(), ref_shifts)
        acc = torch.randint(-2**20, 2**20, digits.shape, device="cuda", dtype=torch.int32, generator=gen)
        out = spike_matmul.combine_int8(acc, shifts, dim).cpu()
        ref = spike_matmul.combine_int8(acc.cpu(), ref_shifts, dim)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    w[3, 7] = 0.0
    assert spike_matmul.int8_fits(rows, features, neurons, "a") and spike_matmul._int_mm_available("cuda")
    out = spike_matmul.int8_mm(x, w.t(), spikes="a")
    exact = x.double() @ w.double().t()
    assert bool(((out.double() - exact).abs() <= _int8_bound(x, w.t(), exact, "a")).all())
    grad = torch.randn(rows, neurons, device="cuda", generator=gen)
    grad_w = spike_matmul.int8_mm(grad.t(), x, spikes="b")
    exact_w = grad.double().t() @ x.double()
    assert bool(((grad_w.double() - exact_w).abs() <= _int8_bound(x, grad.t(), exact_w, "b")).all())
    monkeypatch.setattr(spike_matmul, "_CHOICES", {})
    route = spike_matmul.preferred_route((rows, features, neurons), x.device)
    (choice,) = spike_matmul.route_choices()
    assert route == choice["route"] and set(choice["ms"]) == set(spike_matmul.ROUTES), choice
    assert choice["timed_rows"] == min(rows, spike_matmul.TIMING_ROWS)


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


@pytest.mark.parametrize("stack_dim", [0, 1])
def test_triton_repeat_writes_the_spikes_into_every_slot(stack_dim):
    # The spike operand's three copies in one launch (Triton's interpreter here), into garbage: the
    # same values as the torch route's conversion and copies, in the same slots, for every entry.
    pytest.importorskip("triton")
    from snnopt.codegen import triton_lif

    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(9, 1030, generator=gen) < 0.1) * torch.randint(-3, 4, (9, 1030), generator=gen).float()
    x[0, :3] = torch.tensor([1.5, -0.0078125, 2.0**100])  # other bfloat16 values
    rows, cols = x.shape
    shape = (3 * rows, cols) if stack_dim == 0 else (rows, 3 * cols)
    stacked = torch.full(shape, 77.0, dtype=torch.bfloat16)
    triton_lif.split_bfloat16_into(x, stacked, stack_dim, repeat=True)
    slots = stacked.reshape(3, rows, cols) if stack_dim == 0 else stacked.reshape(rows, 3, cols).transpose(0, 1)
    for slot in slots:
        assert torch.equal(slot.float(), x)
    assert torch.equal(stacked, spike_matmul._contraction_stack(x, stack_dim, repeat=True))


# ----------------------------------------------------------------------------- the int8 route


def _int8_bound(spikes: torch.Tensor, other: torch.Tensor, exact: torch.Tensor, side: str) -> torch.Tensor:
    # The module docstring's bound: one float32 rounding of the result, plus each rounded entry off
    # by at most INT8_ROW_ERROR (2⁻³⁰) of its row's largest, times Σ|spikes| along the contraction.
    if side == "a":  # rows of the result scaled: the columns of `other` (q × r)
        row_max = other.abs().amax(0).double()[None, :]
        weight = spikes.abs().double().sum(1, keepdim=True)
    else:  # `other` is (p × q), scaled per row
        row_max = other.abs().amax(1).double()[:, None]
        weight = spikes.abs().double().sum(0, keepdim=True)
    return 2.0**-24 * exact.abs() + weight * row_max * spike_matmul.INT8_ROW_ERROR


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)), elements=finite_float32),
       st.sampled_from([0, 1]))
def test_int8_digits_hold_each_row_to_its_fixed_point(values, scaled_dim):
    # Any finite float32 rows: the digits are int8, and Σ 256ᵏ·digit_k·2⁻ˢ is the entry rounded to
    # its row's fixed point (within half a unit 2⁻ˢ, which is at most 2⁻³⁰ of the row's largest), and
    # exactly for entries within 2⁶ of the row's largest.
    t = torch.from_numpy(values)
    t = t if scaled_dim == 0 else t.t()
    digits, shifts = spike_matmul.quantize_int8(t, scaled_dim)
    n = t.shape[scaled_dim]
    planes = [digits.narrow(scaled_dim, k * n, n).to(torch.float64) for k in range(spike_matmul.INT8_SLICES)]
    value = sum(plane * 256.0**k for k, plane in enumerate(planes))
    unit = torch.pow(2.0, -shifts.double()).unsqueeze(1 - scaled_dim)
    error = (value * unit - t.double()).abs()
    assert bool((error <= unit / 2).all())
    row_max = t.abs().amax(1 - scaled_dim).double().unsqueeze(1 - scaled_dim)
    assert bool((error <= row_max * spike_matmul.INT8_ROW_ERROR).all())
    assert bool((error[t.double().abs() >= row_max * 2.0**-6] == 0).all())
    top = (value.abs() * unit).amax(1 - scaled_dim)  # the row's largest is not pushed past the digits' range
    assert bool((value.abs() <= spike_matmul.INT8_LIMIT).all()) and bool((top <= row_max.squeeze() * 2).all())


def test_int8_shift_steps_back_at_the_top_of_the_digits_range():
    # A largest entry just under 1 scaled by 2³¹ would need a top digit of 128: the shift is one less
    # for such rows.
    just_under = torch.tensor([1 - 2.0**-24, 0.75, 0.0])
    shifts = spike_matmul.fixed_point_shifts(just_under)
    assert shifts.tolist() == [30, 31, 31]
    digits, _ = spike_matmul.quantize_int8(just_under[:, None].repeat(1, 8), scaled_dim=0)
    assert int(digits.abs().max()) <= 128


@pytest.mark.parametrize("rate", [0.05, 0.5])
@pytest.mark.parametrize("side", ["a", "b"])
def test_int8_product_is_the_rounded_exact_product_of_the_fixed_point_operand(rate, side):
    # Exactly one float32 rounding of Σ spikes·digits (summed in float64, exact below 2⁵³), scaled by
    # 2⁻ˢ: independent of the order of the additions, and within the documented bound of the float64
    # product of the original operands.
    gen = torch.Generator().manual_seed(11)
    spikes_shape, other_shape = ((120, 64), (64, 40)) if side == "a" else ((120, 40), (24, 120))
    spikes = (torch.rand(*spikes_shape, generator=gen) < rate).float()
    other = torch.randn(*other_shape, generator=gen) * torch.logspace(-3, 3, other_shape[0 if side == "b" else 1])[
        (slice(None), None) if side == "b" else (None, slice(None))]
    a, b = (spikes, other) if side == "a" else (other, spikes)
    out = spike_matmul.int8_mm(a, b, spikes=side)
    scaled_dim = 1 if side == "a" else 0
    digits, shifts = spike_matmul.quantize_int8(other, scaled_dim)
    n = other.shape[scaled_dim]
    fixed = sum(digits.narrow(scaled_dim, k * n, n).double() * 256.0**k for k in range(spike_matmul.INT8_SLICES))
    whole = spikes.double() @ fixed if side == "a" else fixed @ spikes.double()
    scale = torch.pow(2.0, -shifts.double()).float().unsqueeze(1 - scaled_dim)
    assert torch.equal(out, whole.float() * scale)
    exact = a.double() @ b.double()
    assert bool(((out.double() - exact).abs() <= _int8_bound(spikes, other, exact, side)).all())


def test_int8_product_of_a_non_finite_row_is_nan_and_leaves_the_others_alone():
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(40, 16, generator=gen) < 0.3).float()
    w = torch.randn(8, 16, generator=gen)
    clean = spike_matmul.int8_mm(x, w.t(), spikes="a")
    w[2, 5], w[6, 0] = float("inf"), float("nan")
    out = spike_matmul.int8_mm(x, w.t(), spikes="a")
    reference = x @ w.t()
    assert bool(out[:, [2, 6]].isnan().all()) and not bool(reference[:, [2, 6]].isfinite().any())
    keep = [0, 1, 3, 4, 5, 7]
    assert torch.equal(out[:, keep], clean[:, keep])


def test_spike_kind_tells_int8_from_bfloat16_values():
    assert spike_matmul.spike_kind(torch.tensor([0.0, 1.0, -3.0, 127.0])) == spike_matmul.INT8
    assert spike_matmul.spike_kind(torch.tensor([0.0, 1.0, 128.0])) == spike_matmul.BFLOAT16  # not int8
    assert spike_matmul.spike_kind(torch.tensor([0.0, 0.5])) == spike_matmul.BFLOAT16
    assert spike_matmul.spike_kind(torch.tensor([0.0, 0.3])) is None
    assert spike_matmul.spike_kind(torch.tensor([1.0, float("nan")])) is None
    assert spike_matmul.spike_kind(torch.zeros(0)) == spike_matmul.INT8


@pytest.mark.parametrize("route", ["bfloat16", "int8", "int8_triton"])
def test_linear_and_weight_grad_take_the_preferred_route(route, monkeypatch):
    if route == "int8_triton":
        pytest.importorskip("triton")
    monkeypatch.setattr(spike_matmul, "applies", lambda spikes, other, shape: True)
    used = []
    for name in ("split_mm", "int8_mm"):
        real = getattr(spike_matmul, name)
        monkeypatch.setattr(spike_matmul, name, lambda *a, _real=real, _name=name, **k: (
            used.append("int8_triton" if k.get("fused") else _name), _real(*a, **k))[1])
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 25, 90, generator=gen) < 0.1).float()
    w, b = torch.randn(33, 90, generator=gen) * 0.1, torch.randn(33, generator=gen)
    grad = torch.randn(100, 33, generator=gen)
    with spike_matmul.prefer(route):
        out = spike_matmul.linear(x, w, b)
        grad_w = spike_matmul.weight_grad(grad, x.reshape(100, 90))
        graded = spike_matmul.linear(x * 0.5, w)  # not integers: the bfloat16 route whatever the preference
    # The forward on the preferred route; the weight gradient on the bfloat16 one whatever the preference
    # (route_for: dL/dI's range); graded spikes on the bfloat16 one.
    assert used == [{"bfloat16": "split_mm", "int8": "int8_mm", "int8_triton": "int8_triton"}[route], "split_mm",
                    "split_mm"]
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w, grad.t() @ x.reshape(100, 90), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graded, torch.nn.functional.linear(x * 0.5, w), rtol=1e-5, atol=1e-5)


def test_route_choice_is_bfloat16_off_cuda_and_under_deterministic_algorithms(monkeypatch):
    timed = []
    monkeypatch.setattr(spike_matmul, "_time_routes", lambda shape, device: (
        timed.append(shape), {"route": "int8", "ms": {"bfloat16": 2.0, "int8": 1.0}, "errors": {}})[1])
    monkeypatch.setattr(spike_matmul, "_CHOICES", {})
    assert spike_matmul.preferred_route((64, 64, 64), torch.device("cpu")) == spike_matmul.BFLOAT16
    cuda = torch.device("cuda", 0)  # only its type is read before the timing (stubbed here)
    assert spike_matmul.preferred_route((64, 64, 64), cuda) == spike_matmul.INT8
    assert spike_matmul.preferred_route((64, 64, 64), cuda) == spike_matmul.INT8  # remembered
    assert spike_matmul.preferred_route((64, 64, 32), cuda) == spike_matmul.INT8  # another shape: timed
    assert timed == [(64, 64, 64), (64, 64, 32)]
    assert [(c["r"], c["route"]) for c in spike_matmul.route_choices()] == [(64, "int8"), (32, "int8")]
    with spike_matmul.prefer("bfloat16"):
        assert spike_matmul.preferred_route((64, 64, 64), cuda) == spike_matmul.BFLOAT16
    torch.use_deterministic_algorithms(True)
    try:
        assert spike_matmul.preferred_route((8, 8, 8), cuda) == spike_matmul.BFLOAT16
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(timed) == 2
    with pytest.raises(ValueError, match="prefer"):
        with spike_matmul.prefer("float16"):
            pass


def test_tensor_core_routes_take_spikes_already_in_int8(monkeypatch):
    # The exact backward rebuilds its input from events as int8 for the int8 route; the route check
    # must still accept it (it did not: the dense float32 product ran instead).
    monkeypatch.setattr(spike_matmul, "_float32_output_mm", lambda device_type: True)
    monkeypatch.setattr(spike_matmul, "_tf32_enabled", lambda: False)

    class FakeCuda:  # only the attributes applies() reads
        is_cuda, device = True, torch.device("cuda")

        def __init__(self, dtype):
            self.dtype = dtype

    big = (4096, 8000, 4096)
    assert spike_matmul.applies(FakeCuda(torch.int8), FakeCuda(torch.float32), big)
    assert not spike_matmul.applies(FakeCuda(torch.int8), FakeCuda(torch.float64), big)


def test_int8_route_fits_only_shapes_its_gemm_takes():
    assert spike_matmul.int8_fits(8000, 4096, 4096, "a") and spike_matmul.int8_fits(4096, 8000, 4096, "b")
    assert not spike_matmul.int8_fits(16, 4096, 4096, "a")  # torch._int_mm on CUDA: more than 16 rows
    assert not spike_matmul.int8_fits(8000, 4100, 4096, "a")  # contraction not a multiple of 8
    assert spike_matmul.int8_fits(16, 4100, 4096, "a", "cpu")  # the CPU product takes any shape
    assert not spike_matmul.int8_fits(8000, spike_matmul.INT8_MAX_CONTRACTION, 4096, "a", "cpu")  # int32 sums


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter on non-finite rows
@pytest.mark.parametrize("shape", [(37, 50, 29), (130, 264, 70)])  # partial tiles; two K blocks
@pytest.mark.parametrize("side", ["a", "b"])
def test_fused_triton_int8_gemm_gives_the_int8_route_bits(shape, side):
    # The fused route (one Triton GEMM adding the digit planes in its epilogue; the interpreter here)
    # against the unfused one (torch's exact int8 product, then the combine): the same bits,
    # including the NaN of a non-finite row.
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(8)
    p, q, r = shape
    if side == "a":
        a = (torch.rand(p, q, generator=gen) < 0.2).float()
        b = torch.randn(r, q, generator=gen).t()  # Wᵀ, as the forward passes it
        b[3, 1] = float("inf")
    else:
        a = (torch.randn(q, p, generator=gen) * torch.logspace(-2, 2, p)).t()  # dL/dIᵀ
        b = (torch.rand(q, r, generator=gen) < 0.2).float()
        a[1, 3] = float("nan")
    fused = spike_matmul.int8_mm(a, b, side, fused=True)
    unfused = spike_matmul.int8_mm(a, b, side)
    assert torch.equal(fused.isnan(), unfused.isnan()) and torch.equal(fused.nan_to_num(), unfused.nan_to_num())
    assert int(fused.isnan().any(1 if side == "b" else 0).sum()) == 1


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter on non-finite rows
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("scaled_dim", [0, 1])
def test_triton_int8_kernels_compute_the_reference_digits_and_products(layout, scaled_dim):
    # The CUDA route's quantize and combine launches (Triton's interpreter here) against the torch
    # reference, bit for bit, over magnitudes from subnormal to near float32's largest.
    pytest.importorskip("triton")
    from snnopt.codegen import triton_lif

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(7, 40, generator=gen) * torch.logspace(-30, 30, 40)
    w[0, 3], w[1, 2], w[2] = float("inf"), float("nan"), 0.0
    w[3] = torch.randn(40, generator=gen) * 1e-40
    w[4] = torch.randn(40, generator=gen) * 1e37
    t = w if layout == "contiguous" else w.t().contiguous().t()
    t = t if scaled_dim == 0 else t.t()
    shifts = spike_matmul.fixed_point_shifts(spike_matmul.row_max_abs(t, scaled_dim))
    shape = list(t.shape)
    shape[scaled_dim] *= spike_matmul.INT8_SLICES
    reference, _ = spike_matmul.quantize_int8(t, scaled_dim)  # CPU tensors: the torch reference
    digits = torch.empty(shape[::-1], dtype=torch.int8).t()
    triton_lif.quantize_int8_into(t, shifts, digits, scaled_dim, spike_matmul.INT8_SLICES)
    assert torch.equal(digits, reference)
    acc = torch.randint(-2**20, 2**20, shape, generator=gen, dtype=torch.int32)
    out = torch.empty(t.shape)
    triton_lif.combine_int8_into(acc, shifts, out, scaled_dim, spike_matmul.INT8_SLICES)
    expected = spike_matmul.combine_int8(acc, shifts, scaled_dim)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert bool(out.isnan().any()) and bool((out.nan_to_num() != 0).any())
