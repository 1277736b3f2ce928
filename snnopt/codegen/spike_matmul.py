"""Matrix products with a spike operand, at float32 accuracy on bfloat16 tensor cores.

A layer's input current ``x·Wᵀ`` and its weight gradient ``dIᵀ·x`` both have a spike operand: its
entries are 0 and 1 (or any value bfloat16 holds exactly). The reference is the float32 product,
``torch.nn.functional.linear`` / ``torch.mm``. On a GPU without TF32 that product runs on the
float32 units (an H200 measured ~51 TFLOP/s in ``benchmarks/gpu_suite.py``), while bfloat16 tensor
cores are an order of magnitude faster. This module computes the same product there:

* bfloat16 has an 8-bit significand, float32 24 bits. Rounding a float32 ``W`` to bfloat16, then
  the remainder, then the remainder of that, gives ``W = W₁ + W₂ + W₃`` exactly: every remainder is
  exact in float32 and at least 8 significant bits shorter than the last (:func:`split_bfloat16`;
  exact for ``2⁻¹¹⁰ ≤ |W| ≤ 3.38·10³⁸``: below, the lost bits are under 2⁻¹³³; above, bfloat16
  overflows).
* On CUDA the split is one Triton launch writing the parts in place
  (:func:`snnopt.codegen.triton_lif.split_bfloat16_into`); :func:`split_bfloat16` is the torch
  reference and the route elsewhere. Both are exact, so they agree part for part up to the rounding
  direction of each conversion.
* The spike operand needs no split. Every product ``x·W_k`` is then exact in the tensor cores, and
  they accumulate in float32. One GEMM with the contraction dimension tripled,
  ``[x x x]·[W₃; W₂; W₁]``, keeps one float32 accumulator: the result is a float32 GEMM's up to the
  order of the additions, as between any two float32 GEMM implementations.
* Smallest part first: tensor cores add into the accumulator by truncation, not rounding, so a
  small term added to a large running sum loses its low bits, always in the same direction. With
  the parts largest first, the two small parts meet an accumulator that already holds the large
  one. Measured on an H200 (``benchmarks/gpu_suite.py``, ``split_gemm_accuracy``, 8000×4096·4096ᵀ
  at 5 % spikes): max error 6.1e-6 of the largest entry largest first, 1.3e-7 smallest first,
  6.5e-7 for cuBLAS's float32 GEMM.

:func:`linear` and :func:`weight_grad` take this route only where it pays and is exact: CUDA
tensors in float32, TF32 not enabled by the user (then the float32 product already uses tensor
cores, at TF32's precision, which is the user's choice), a product large enough to pay for the
split (:func:`pays`), and the spike operand checked to be bfloat16-exact. Anywhere else they are
the reference.

The int8 route (:func:`int8_mm`) does the same on integer tensor cores, which run twice as many
operations per second as bfloat16 ones on Hopper GPUs:

* Where the spikes are integers in [-128, 127] (0 and 1 are), they are int8 values as they stand.
* The other operand becomes fixed point, one scale per row of the result (per neuron: a row of
  ``W`` in the forward): the row is multiplied by the power of two ``2ˢ`` that brings its largest
  entry just under 2³¹, rounded to integers, and written as :data:`INT8_SLICES` (four) signed
  base-256 digits, four int8 planes (:func:`quantize_int8`). Scaling by a power of two is exact,
  and so is the rounding for every entry within 2⁶ of its row's largest (its 24 significant bits
  fit in the 31): weights at an initialisation's scale come through unchanged. Smaller entries move
  by at most 2⁻³⁰ of the row's largest (:data:`INT8_ROW_ERROR`).
* One int8 GEMM with the output dimension four times longer, ``x·[D₀ D₁ D₂ D₃]``, sums the digits'
  products in int32 exactly (no overflow for contractions shorter than
  :data:`INT8_MAX_CONTRACTION`, 2¹⁷). :func:`combine_int8` adds the planes as
  ``D₀ + 2⁸·D₁ + 2¹⁶·D₂ + 2²⁴·D₃`` in int64 (exact), converts once to float32 and scales back by
  2⁻ˢ: the result is the float32 rounding of the exact product of the spikes with the (rounded)
  operand — for weights within 2⁶ of their row's largest, the correctly rounded product. Its error
  is at most 2⁻²⁴ of the result plus Σ|x|·2⁻³⁰·max|row| (a float32 GEMM's bound is γ_K·Σ|x·w|,
  about K·2⁻²⁴ of the summed magnitudes), and it does not depend on the order of the additions:
  the same bits on every run.
* A row whose largest entry is ±inf or NaN comes out NaN (the float32 product is ±inf or NaN
  there, as 0·inf is NaN).
* Why four digits, not three (2⁻²² of the row's largest): a weight's rounding is the same at every
  step and for every batch entry, so its error does not average out as a GEMM's rounding does; it
  adds up in the membrane over the steps. With three digits the seed network's layers (exact
  backward) moved dL/dW by 2·10⁻⁴ of its norm from the float32 model's, and translation validation
  refused them (tests/codegen/test_optimize_triton.py, every route forced).
* The bound is relative to each row's largest entry, not to each term: a row whose entries span
  many binades loses the small ones' precision, where a float32 GEMM keeps each result's relative
  accuracy. Weight rows are within a few binades (initialisations draw them from one scale), so the
  forward product ``x·Wᵀ`` takes this route. A weight gradient's dL/dI is not (the surrogate's
  tails, the leak's decay over the steps): a dW entry whose terms are all small would carry an
  error set by the neuron's largest term. The weight gradient keeps the bfloat16 route
  (:func:`route_for`; on the seed network an int8 dW would have been within 4·10⁻⁸ of float32's in
  norm, so this is about single entries); :func:`int8_mm` itself takes the spikes on either side.

The int8 product runs as ``torch._int_mm`` (cuBLASLt) followed by one combine kernel
(:data:`INT8`), or as one Triton GEMM that adds the planes in its epilogue, so the int32 planes
never reach memory (:data:`INT8_TRITON`, :func:`snnopt.codegen.triton_lif.int8_gemm`; Hopper's
int8 warpgroup MMA). Both give the same bits.

Which route the forward product takes is chosen per shape on the GPU at hand: the first product
of a shape times each on operands of that shape (at most :data:`TIMING_ROWS` of its rows) and keeps
the fastest (:func:`preferred_route`; under
``torch.use_deterministic_algorithms`` and off CUDA, bfloat16 without timing). The bfloat16 and
int8 routes round differently, within the bounds above, so which one ran is part of a result:
:func:`route_choices` lists what was chosen and the times that chose it, and :func:`prefer` fixes
a route for a block of code.

Example::

    >>> current = linear(spikes, weight, bias)          # == F.linear(spikes, weight, bias)
    >>> grad_w = weight_grad(grad_current_2d, spikes_2d)  # == grad_current_2d.t() @ spikes_2d
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
from typing import Optional

import torch
from torch import Tensor

SPLIT_PARTS = 3  # 3 × 8 bits ≥ float32's 24-bit significand
# When the split pays, for a product (p × q)·(q × r): its extra passes over the operands (checking
# and stacking the spikes, splitting the other) move bytes ∝ q·(p + r); the GEMM time it saves is
# ∝ p·q·r. Break-even is at p·r/(p + r) of a few hundred (float32 units at ~51 TFLOP/s measured
# on an H200 against bfloat16 tensor cores at several hundred, memory at a few TB/s); below
# MIN_MACS launches and syncs dominate either way.
MIN_MACS = 2**30
MIN_OUTER = 384


def split_bfloat16(t: Tensor, parts: int = SPLIT_PARTS) -> list[Tensor]:
    """``parts`` bfloat16 tensors whose float32 sum is ``t`` (exactly, for 3 parts and float32 ``t``).

    A non-finite entry stays whole in the first part (its remainders are 0), so ±inf and NaN come
    out of a product as they would from the float32 one.
    """
    out = torch.empty((parts, *t.shape), dtype=torch.bfloat16, device=t.device)
    pieces = list(out.unbind(0))
    _split_into(t, pieces)
    return pieces


def _split_into(t: Tensor, pieces: list[Tensor]) -> None:
    # In slabs along the first dimension: the float32 remainders are temporaries of one slab, not of
    # the whole operand (a 16384² weight would need two extra GiB at once).
    rows = t.shape[0] if t.dim() else 1
    per_row = max(t[0].numel(), 1) if t.dim() else 1
    slab = max(1, _SPLIT_SLAB_ELEMENTS // per_row)
    if t.dim() == 0 or rows <= slab:
        _split_slab(t, pieces)
        return
    for start in range(0, rows, slab):
        stop = min(rows, start + slab)
        _split_slab(t[start:stop], [piece[start:stop] for piece in pieces])


_SPLIT_SLAB_ELEMENTS = 2**24


def _split_slab(t: Tensor, pieces: list[Tensor]) -> None:
    # Each piece is the remainder so far rounded to bfloat16 (copy_ rounds to nearest even).
    rest = t.to(torch.float32)
    for k, piece in enumerate(pieces):
        piece.copy_(rest)
        if k + 1 < len(pieces):
            if k == 0:
                rest = rest - piece.to(torch.float32)
                rest.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # inf − inf: keep inf in part 1
            else:
                rest.sub_(piece.to(torch.float32))


# The tensor-core routes: the split bfloat16 GEMM; the int8 one on cuBLASLt (torch._int_mm, then the
# combine kernel); the int8 one as a Triton GEMM with the combine fused (triton_lif.int8_gemm).
BFLOAT16, INT8, INT8_TRITON = "bfloat16", "int8", "int8_triton"
ROUTES = (BFLOAT16, INT8, INT8_TRITON)
INT8_ROUTES = (INT8, INT8_TRITON)  # the routes that need integer spikes
INT8_SLICES = 4  # int8 digits per fixed-point value: 4 × 8 bits, signed (why not 3: module docstring)
# The largest value the digits hold: 127·(1 + 2⁸ + 2¹⁶ + 2²⁴) (each digit in [-128, 127]).
INT8_LIMIT = 127 * sum(256**k for k in range(INT8_SLICES))
# The most the rounding moves an entry, relative to its row's largest: half a unit 2⁻ˢ, where
# 2⁻ˢ ≤ 2^(3 − 8·slices)·max|row| (the shift puts the largest in [2^(8·slices − 3), 2^(8·slices − 1))).
INT8_ROW_ERROR = 2.0 ** (2 - 8 * INT8_SLICES)
# int32 accumulators: |Σ x·d| ≤ K·128·128 < 2³¹ for any int8 spikes.
INT8_MAX_CONTRACTION = 2**17
NONFINITE_SHIFT = 1 << 20  # a row's shift where its largest entry is ±inf or NaN: the row comes out NaN


def spike_kind(t: Tensor, integers: bool = True) -> Optional[str]:
    """:data:`INT8` where every entry is an integer in [-128, 127] (every route takes it), :data:`BFLOAT16` where
    every entry is only a bfloat16 value, else None (NaN is neither). One read of the device. Without
    ``integers`` (no int8 route could follow) the integer check is skipped: bfloat16 values say BFLOAT16."""
    if t.dtype == torch.int8 or not t.numel():
        return INT8
    checks = [(t.to(torch.bfloat16).to(t.dtype) == t).all()]
    if integers:
        checks.append(((t == t.round()) & (t >= -128) & (t <= 127)).all())
    bfloat16_exact, *integral = torch.stack(checks).tolist()
    if not bfloat16_exact:
        return None
    return INT8 if integral and integral[0] else BFLOAT16


def kind_from_flags(not_bfloat16: int, not_int8: int) -> Optional[str]:
    """:func:`spike_kind`'s answer from the two flags the event-counting kernel raises instead
    (``triton_lif.input_events``: some nonzero is not a bfloat16 value; some is not an int8 integer)."""
    return None if not_bfloat16 else BFLOAT16 if not_int8 else INT8


def _pow2(k: Tensor) -> Tensor:
    """2**k in float32 for integer k in [-126, 127], built from its bits (as the Triton kernels do: exact)."""
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32)


def fixed_point_shifts(row_max: Tensor, slices: int = INT8_SLICES) -> Tensor:
    """Per row, the exponent s (int32) that scales the row's entries to ``slices`` int8 digits.

    The largest s with ``round(row_max·2ˢ)`` within the digits' range (:data:`INT8_LIMIT`): for
    ``row_max = m·2ᵉ``, m in [0.5, 1), s = 8·slices − 1 − e, one less where m is too close to 1.
    ±inf or NaN: :data:`NONFINITE_SHIFT`. A zero row gets 8·slices − 1 (its digits are 0).
    """
    limit = 127 * sum(256**k for k in range(slices))
    mantissa, exponent = torch.frexp(row_max.to(torch.float32))
    shift = (8 * slices - 1) - exponent.to(torch.int32)
    shift = shift - (mantissa.double() * 2.0 ** (8 * slices - 1) > limit).to(torch.int32)
    return torch.where(torch.isfinite(row_max), shift, torch.full_like(shift, NONFINITE_SHIFT))


def row_max_abs(t: Tensor, scaled_dim: int) -> Tensor:
    """max |t| along the contraction (the other dimension of a 2-D ``t``), per entry of ``scaled_dim``; NaN stays."""
    if t.shape[1 - scaled_dim] == 0:
        return t.new_zeros(t.shape[scaled_dim], dtype=torch.float32)
    return torch.linalg.vector_norm(t.to(torch.float32), float("inf"), dim=1 - scaled_dim)


def quantize_int8(t: Tensor, scaled_dim: int, slices: int = INT8_SLICES) -> tuple[Tensor, Tensor]:
    """A 2-D float32 ``t`` as ``slices`` int8 digit planes side by side along ``scaled_dim``, and the shifts.

    Returns ``(digits, shifts)``: ``digits`` has ``t``'s shape with ``scaled_dim`` ``slices`` times
    longer, plane k (the k-th base-256 digit, least significant first) at offset ``k·n`` along it, in
    ``t``'s memory order (a transposed view gives a transposed result); ``shifts`` (int32, one per
    entry of ``scaled_dim``) from :func:`fixed_point_shifts`. Entry ``t[i, j]`` ≈ ``Σ_k 256ᵏ·digit_k
    · 2⁻ˢ`` of its row, within 2⁻ˢ⁻¹ (:data:`INT8_ROW_ERROR` of the row's largest). On CUDA one
    Triton launch after the row maxima (:func:`snnopt.codegen.triton_lif.quantize_int8_into`);
    elsewhere the torch reference :func:`_quantize_reference`, which computes the same digits.
    """
    if t.dim() != 2 or scaled_dim not in (0, 1):
        raise ValueError(f"quantize_int8: expected a 2-D tensor and scaled_dim 0 or 1, got {tuple(t.shape)}, "
                         f"{scaled_dim!r}")
    shifts = fixed_point_shifts(row_max_abs(t, scaled_dim), slices)
    transposed = not t.is_contiguous() and t.t().is_contiguous()
    shape = list(t.shape)
    shape[scaled_dim] *= slices
    digits = (torch.empty(shape[::-1], dtype=torch.int8, device=t.device).t() if transposed
              else torch.empty(shape, dtype=torch.int8, device=t.device))
    if t.is_cuda and t.dtype == torch.float32 and _triton_importable():
        from snnopt.codegen import triton_lif

        triton_lif.quantize_int8_into(t, shifts, digits, scaled_dim, slices)
        return digits, shifts
    planes = _quantize_reference(t, shifts, scaled_dim, slices)
    n = t.shape[scaled_dim]
    for k, plane in enumerate(planes):
        digits.narrow(scaled_dim, k * n, n).copy_(plane)
    return digits, shifts


def _quantize_reference(t: Tensor, shifts: Tensor, scaled_dim: int, slices: int) -> list[Tensor]:
    # The digits as float32 planes (exact integers). Every step is exact in float32: scaling by two
    # powers of two (each within float32's exponent range; their product 2ˢ may not be), rounding
    # half up (x + 0.5 is exact below 2²³, and above it x is already an integer), and peeling digits
    # (q/256 + 0.5 is exact for |q| < 2³¹).
    s = shifts.unsqueeze(1 - scaled_dim)
    finite = s != NONFINITE_SHIFT
    s = torch.where(finite, s, 0)
    half = s >> 1  # floor(s / 2), also for negative s
    x = t.to(torch.float32) * _pow2(half) * _pow2(s - half)
    x = torch.where(finite, x, 0.0)
    q = torch.where(x.abs() >= 2.0**23, x, torch.floor(x + 0.5))
    planes = []
    for _ in range(slices - 1):
        digit = q - 256.0 * torch.floor(q * (1 / 256) + 0.5)
        planes.append(digit)
        q = (q - digit) * (1 / 256)
    planes.append(q)
    return planes


def combine_int8(acc: Tensor, shifts: Tensor, scaled_dim: int, slices: int = INT8_SLICES) -> Tensor:
    """The float32 product from an int8 GEMM's int32 ``acc``, whose ``scaled_dim`` holds ``slices`` digit planes.

    ``Σ_k 256ᵏ·acc_k`` in int64 (exact), one rounding to float32, then ``·2⁻ˢ`` per row of the
    planes (two exact power-of-two factors; only a subnormal result rounds a second time); NaN where
    the shift is :data:`NONFINITE_SHIFT`. On CUDA one Triton launch
    (:func:`snnopt.codegen.triton_lif.combine_int8_into`), else torch ops computing the same.
    """
    n = acc.shape[scaled_dim] // slices
    shape = list(acc.shape)
    shape[scaled_dim] = n
    if acc.is_cuda and _triton_importable():
        from snnopt.codegen import triton_lif

        out = torch.empty(shape, dtype=torch.float32, device=acc.device)
        triton_lif.combine_int8_into(acc.contiguous(), shifts, out, scaled_dim, slices)
        return out
    planes = acc.to(torch.int64).unflatten(scaled_dim, (slices, n)).unbind(scaled_dim)
    total = planes[-1]
    for plane in planes[-2::-1]:
        total = total * 256 + plane
    s = shifts.unsqueeze(1 - scaled_dim)
    finite = s != NONFINITE_SHIFT
    s = torch.where(finite, s, 0)
    half = s >> 1
    out = total.to(torch.float32) * _pow2(half - s) * _pow2(-half)
    return torch.where(finite, out, float("nan"))


def int8_mm(a: Tensor, b: Tensor, spikes: str, *, fused: bool = False) -> Tensor:
    """``a @ b`` in float32 on int8 tensor cores where ``spikes`` (``"a"`` or ``"b"``) names the operand of
    integers in [-128, 127] (see the module docstring for the rounding of the other one).

    Both 2-D. The other operand is quantized per row of the result (:func:`quantize_int8`). Then
    ``torch._int_mm`` (int8 × int8 → int32, cuBLASLt on CUDA; an exact integer product elsewhere)
    and :func:`combine_int8`; or with ``fused`` one Triton GEMM that adds the digit planes in its
    epilogue (:func:`snnopt.codegen.triton_lif.int8_gemm`; CUDA, or Triton's interpreter). Both give
    the same bits.
    """
    if spikes not in ("a", "b"):
        raise ValueError(f"spikes: 'a' or 'b', got {spikes!r}")
    if fused:
        from snnopt.codegen import triton_lif
    if spikes == "a":
        digits, shifts = quantize_int8(b, scaled_dim=1)
        a = a if a.dtype == torch.int8 else a.to(torch.int8)
        if fused:
            return triton_lif.int8_gemm(a, digits, shifts, digits_on_b=True)
        return combine_int8(_int_mm(a, digits), shifts, scaled_dim=1)
    digits, shifts = quantize_int8(a, scaled_dim=0)
    b = b if b.dtype == torch.int8 else b.to(torch.int8)
    if fused:
        return triton_lif.int8_gemm(digits, b, shifts, digits_on_b=False)
    return combine_int8(_int_mm(digits, b), shifts, scaled_dim=0)


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    if a.shape[1] == 0:
        return torch.zeros((a.shape[0], b.shape[1]), dtype=torch.int32, device=a.device)
    return torch._int_mm(a, b)


def int8_fits(p: int, q: int, r: int, spikes: str, device_type: str = "cuda") -> bool:
    """Whether a ``(p × q)·(q × r)`` product fits the int8 route: int32 sums that cannot overflow, and on CUDA
    the shapes ``torch._int_mm`` takes there (more than 16 rows, the other two dimensions multiples of 8)."""
    if not 0 < q < INT8_MAX_CONTRACTION:
        return False
    rows, cols = (p, INT8_SLICES * r) if spikes == "a" else (INT8_SLICES * p, r)
    return device_type != "cuda" or (rows > 16 and q % 8 == 0 and cols % 8 == 0)


_PREFERENCE = ["auto"]
_CHOICES: dict[tuple, dict] = {}
ROUTE_TRIALS = 3  # timed runs per route when choosing (after one warm-up run)


@contextlib.contextmanager
def prefer(route: str):
    """Take ``route`` (one of :data:`ROUTES`, or ``"auto"``) wherever a tensor-core route is taken inside the block
    (an int8 one only where the spikes are integers and the shape fits, :func:`int8_fits`).

    Example::

        >>> with prefer(INT8):
        ...     current = linear(spikes, weight)
    """
    if route not in (*ROUTES, "auto"):
        raise ValueError(f"prefer: expected one of {(*ROUTES, 'auto')}, got {route!r}")
    _PREFERENCE.append(route)
    try:
        yield route
    finally:
        _PREFERENCE.pop()


def route_choices() -> list[dict]:
    """What :func:`preferred_route` chose in this process: the shape (p, q, r), device, route, and the times (ms)."""
    return [dict(choice, p=key[1][0], q=key[1][1], r=key[1][2], device=key[0]) for key, choice in _CHOICES.items()]


def preferred_route(shape: tuple[int, int, int], device: torch.device) -> str:
    """The tensor-core route for a forward product ``x·Wᵀ`` of shape (p × q)·(q × r) whose spikes are int8-exact.

    :func:`prefer`'s choice where one is set; bfloat16 off CUDA and under
    ``torch.use_deterministic_algorithms`` (no timing: the same route every run); else the fastest
    of :data:`ROUTES` on this GPU, timed once per (shape, device) on operands of that shape, its rows
    capped at :data:`TIMING_ROWS` (:func:`_time_routes`; it allocates them and each route's
    temporaries once) and remembered for the process. A route that raises is not chosen.
    """
    preference = _PREFERENCE[-1]
    if preference != "auto":
        return preference
    if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return BFLOAT16
    key = (str(device), tuple(shape))
    if key not in _CHOICES:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # nothing to time in a capture
            return BFLOAT16
        _CHOICES[key] = _time_routes(shape, device)
    return _CHOICES[key]["route"]


# Rows the route timing takes at most: enough output tiles to fill a GPU, so the routes' relative
# speeds are those of the full product, without the full product's operands and temporaries (an
# Open Neuromorphic layer at n = 16384 has 8000 rows: ~4 GB of them for the int8 routes alone).
TIMING_ROWS = 4096


def _time_routes(shape: tuple[int, int, int], device: torch.device) -> dict:
    """Median ms of each route for ``x·Wᵀ`` on random operands of ``shape``, at most :data:`TIMING_ROWS`
    of its rows (5 % spikes; the values do not change the work). ``timed_rows`` says how many."""
    p, q, r = shape
    p = min(p, TIMING_ROWS)
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.rand(p, q, device=device, generator=gen) < 0.05).to(torch.int8)  # as a compact layer builds it
    w_t = torch.randn(r, q, device=device, generator=gen).t()  # Wᵀ, as the forward passes it
    runs = {BFLOAT16: lambda: split_mm(x, w_t, "a"), INT8: lambda: int8_mm(x, w_t, "a")}
    if _triton_importable():
        runs[INT8_TRITON] = lambda: int8_mm(x, w_t, "a", fused=True)  # its first call compiles the kernel
    times, errors = {}, {}
    for route, run in runs.items():
        try:
            run()
            samples = []
            for _ in range(ROUTE_TRIALS):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                stop.record()
                stop.synchronize()
                samples.append(start.elapsed_time(stop))
            times[route] = statistics.median(samples)
        except Exception as error:  # e.g. a cuBLASLt build without this int8 case, a Triton that cannot compile it
            errors[route] = f"{type(error).__name__}: {error}"
    route = min(times, key=times.get) if times else BFLOAT16
    return {"route": route, "ms": times, "errors": errors, "timed_rows": p}


def split_mm(a: Tensor, b: Tensor, spikes: str) -> Tensor:
    """``a @ b`` in float32 where ``spikes`` (``"a"`` or ``"b"``) names the bfloat16-exact operand.

    Both 2-D; the other operand is split in :data:`SPLIT_PARTS` (see the module docstring). On CUDA
    one bfloat16 GEMM with float32 output; on CPU (tests) the same products on float32 units.
    """
    if spikes not in ("a", "b"):
        raise ValueError(f"spikes: 'a' or 'b', got {spikes!r}")
    left = _contraction_stack(a, 1, repeat=spikes == "a")
    right = _contraction_stack(b, 0, repeat=spikes == "b")
    return _mm_float32_out(left, right)


def weight_grad_from_parts(parts: Tensor, x_rows: Tensor, *, stacked: bool = False) -> Tensor:
    """``Σ_k parts[k]ᵀ @ x_rows`` in float32: a weight gradient whose dL/dI is already split.

    ``parts`` is ``(SPLIT_PARTS, M, N)`` bfloat16, smallest part first (written so by the compact
    layer's reverse-filter kernel), ``x_rows`` the ``(M, K)`` spikes, or with ``stacked`` the
    ``(SPLIT_PARTS·M, K)`` bfloat16 spikes already repeated (built so by the caller, no copy here);
    one GEMM as in :func:`split_mm`.
    """
    if parts.dim() != 3 or parts.shape[0] != SPLIT_PARTS or parts.dtype != torch.bfloat16:
        raise ValueError(f"parts: expected ({SPLIT_PARTS}, M, N) bfloat16, got {tuple(parts.shape)} {parts.dtype}")
    count, rows, neurons = parts.shape
    if stacked and (x_rows.dtype != torch.bfloat16 or x_rows.dim() != 2 or x_rows.shape[0] != count * rows):
        raise ValueError(f"x_rows: expected stacked ({count * rows}, K) bfloat16, got {tuple(x_rows.shape)} "
                         f"{x_rows.dtype}")
    left = parts.reshape(count * rows, neurons).t()
    right = x_rows if stacked else _contraction_stack(x_rows, 0, repeat=True)
    return _mm_float32_out(left, right)


def _contraction_stack(operand: Tensor, dim: int, *, repeat: bool) -> Tensor:
    """``operand``'s :data:`SPLIT_PARTS` bfloat16 parts side by side along ``dim`` (the contraction).

    ``repeat``: the spike operand, the same values in every slot; else :func:`split_bfloat16`'s
    parts, smallest first. Written in place into one buffer (no part tensors, no concatenation
    copy). A transposed operand (Wᵀ as a view of W) is stacked in its own memory order and viewed
    back: contiguous writes, and cuBLAS reads either order.
    """
    transposed = not operand.is_contiguous() and operand.t().is_contiguous()
    base = operand.t() if transposed else operand
    stack_dim = 1 - dim if transposed else dim
    size = base.shape[stack_dim]
    shape = list(base.shape)
    shape[stack_dim] = size * SPLIT_PARTS
    stacked = torch.empty(shape, dtype=torch.bfloat16, device=base.device)
    if (base.is_cuda and base.dtype == torch.float32 and base.dim() == 2 and base.is_contiguous()
            and _triton_importable()):
        from snnopt.codegen import triton_lif

        # One launch writing the three parts in place, instead of ~9 torch ops on float32 temporaries;
        # for the spikes, one launch reading them once instead of a conversion and two copies.
        triton_lif.split_bfloat16_into(base, stacked, stack_dim, repeat=repeat)
        return stacked.t() if transposed else stacked
    slots = [stacked.narrow(stack_dim, k * size, size) for k in range(SPLIT_PARTS)]
    if repeat:
        slots[0].copy_(base)  # converts once (exact: the caller checked)
        for slot in slots[1:]:
            slot.copy_(slots[0])
    else:
        _split_into(base, slots[::-1])  # smallest part first along the contraction (module docstring)
    return stacked.t() if transposed else stacked


@functools.cache
def _triton_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _mm_float32_out(a: Tensor, b: Tensor) -> Tensor:
    if a.is_cuda:
        # PyTorch lets cuBLAS reduce bfloat16 GEMMs in reduced precision by default (split-K partial
        # sums); the exactness argument needs float32 throughout, so that is off for this call.
        matmul = torch.backends.cuda.matmul
        allowed = matmul.allow_bf16_reduced_precision_reduction
        matmul.allow_bf16_reduced_precision_reduction = False
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        finally:
            matmul.allow_bf16_reduced_precision_reduction = allowed
    # Exact widening: the float32 product of bfloat16 values is what the tensor cores compute.
    return torch.mm(a.to(torch.float32), b.to(torch.float32))


def pays(p: int, q: int, r: int) -> bool:
    """Whether the split route is worth it for a ``(p × q)·(q × r)`` product (see :data:`MIN_OUTER`)."""
    return p * q * r >= MIN_MACS and p * r >= MIN_OUTER * (p + r)


def applies(spikes: Tensor, other: Tensor, shape: tuple[int, int, int]) -> bool:
    """Whether :func:`split_mm` should replace the float32 product of ``shape`` = (p, q, r) (no sync)."""
    return (spikes.is_cuda and other.is_cuda and other.dtype == torch.float32
            and spikes.dtype in (torch.float32, torch.bfloat16, torch.int8)
            and not _tf32_enabled() and pays(*shape)
            and _float32_output_mm(spikes.device.type))


def _tf32_enabled() -> bool:
    # The user's choice (torch.backends.cuda.matmul.allow_tf32, or set_float32_matmul_precision).
    return bool(torch.backends.cuda.matmul.allow_tf32)


@functools.cache
def _float32_output_mm(device_type: str) -> bool:
    # torch.mm(bf16, bf16, out_dtype=float32) needs a recent torch build; probe it once.
    try:
        probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
        return torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


UNCHECKED = "unchecked"  # route_for's ``kind`` where the spike check has not been read yet


def route_for(spikes: Tensor, other: Tensor, shape: tuple[int, int, int], side: str, *,
              kind=UNCHECKED) -> Optional[str]:
    """The route for a ``(p × q)·(q × r)`` product whose spike operand is ``spikes`` (on ``side``, "a" or "b"):
    None (the float32 reference) or one of :data:`ROUTES`. Reads the device (:func:`spike_kind`; ``spikes``
    may be just the operand's nonzeros), unless ``kind`` is :func:`spike_kind`'s result for the same
    values, read before (with the integer check; the input events' count brings it back)."""
    if not applies(spikes, other, shape):
        return None
    # The int8 routes only for x·Wᵀ (spikes on the left): a weight gradient's dL/dI spans many binades
    # (the surrogate's tails, the leak's decay), and its small entries would lose their precision to
    # a fixed point set by each neuron's largest (module docstring).
    int8_possible = side == "a" and int8_fits(*shape, side, spikes.device.type)
    if kind == UNCHECKED:
        kind = spike_kind(spikes, integers=int8_possible)
    if kind == INT8 and int8_possible:
        route = preferred_route(shape, spikes.device)
        device_type = spikes.device.type
        usable = {BFLOAT16: True, INT8: _int_mm_available(device_type),
                  INT8_TRITON: _triton_importable() and (device_type == "cuda" or _triton_interpreted())}
        return route if usable[route] else BFLOAT16
    return None if kind is None else BFLOAT16


def _triton_interpreted() -> bool:
    # Triton kernels run on CPU tensors only in its interpreter (read when kernels are defined).
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _int_mm_available(device_type: str) -> bool:
    # torch._int_mm needs a build with the int8 GEMM for this device; probe it once.
    try:
        probe = torch.ones(32, 8, dtype=torch.int8, device=device_type)
        return torch._int_mm(probe, probe.t().contiguous()).dtype == torch.int32
    except (AttributeError, TypeError, RuntimeError, NotImplementedError):
        return False


def linear_route(x: Tensor, weight: Tensor, nonzeros: Optional[Tensor] = None, *, kind=UNCHECKED) -> Optional[str]:
    """:func:`route_for` of ``x·Wᵀ`` (reads the device: the spike check, on ``nonzeros`` where given,
    unless ``kind`` is its result already)."""
    features = x.shape[-1]
    rows = x.numel() // max(features, 1)
    return route_for(x if nonzeros is None else nonzeros, weight, (rows, features, weight.shape[0]), "a",
                     kind=kind)


def spike_operand_buffer(route: str, rows: int, features: int, device) -> Tensor:
    """Uninitialised room for :func:`linear`'s spike operand on ``route``: ``x`` as bfloat16 :data:`SPLIT_PARTS`
    times side by side ``(rows, SPLIT_PARTS·features)``, or as int8 ``(rows, features)`` on the int8 routes."""
    if route in INT8_ROUTES:
        return torch.empty((rows, features), dtype=torch.int8, device=device)
    return torch.empty((rows, SPLIT_PARTS * features), dtype=torch.bfloat16, device=device)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           nonzeros: Optional[Tensor] = None, spike_operand: Optional[Tensor] = None,
           route: Optional[str] | bool = None) -> Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``; on tensor cores when ``x`` is spikes and it pays.

    ``nonzeros``: the nonzero entries of ``x``, where the caller has them listed (a compact layer's
    input events): whether ``x`` is spikes is then read from those, a much smaller tensor, instead
    of passes over ``x``. ``spike_operand``: the GEMM's left operand for ``route`` where the caller has
    it already, in :func:`spike_operand_buffer`'s layout (a compact layer's: written by the launch that
    lists the events). ``route``: decided by the caller
    (:func:`linear_route`; a captured CUDA graph cannot read the device), False for the reference;
    a tensor-core route only where ``x`` suits it, which the caller has checked or will check.
    """
    features = x.shape[-1]
    rows = x.numel() // max(features, 1)
    if route is None:
        route = linear_route(x, weight, nonzeros)
    if route:
        if route in INT8_ROUTES:
            spikes = spike_operand if spike_operand is not None else x.reshape(rows, features).to(torch.int8)
            out = int8_mm(spikes, weight.t(), spikes="a", fused=route == INT8_TRITON)
        elif spike_operand is not None:
            out = _mm_float32_out(spike_operand, _contraction_stack(weight.t(), 0, repeat=False))
        else:
            out = split_mm(x.reshape(rows, features), weight.t(), spikes="a")  # converted while stacked
        if bias is not None:
            out += bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


def weight_grad_route(grad_rows: Tensor, x_rows: Tensor) -> Optional[str]:
    """:func:`route_for` of ``grad_rowsᵀ @ x_rows`` (reads the device: the spike check)."""
    return route_for(x_rows, grad_rows, (grad_rows.shape[1], grad_rows.shape[0], x_rows.shape[1]), "b")


def weight_grad(grad_rows: Tensor, x_rows: Tensor, *, route: Optional[str] | bool = None) -> Tensor:
    """``grad_rowsᵀ @ x_rows`` (``(N, M)·(M, K)``) in ``grad_rows``' dtype; on tensor cores when ``x_rows`` is spikes.

    ``route``: decided by the caller, as in :func:`linear` (only :data:`BFLOAT16` is taken here, see
    :func:`route_for`).
    """
    if route is None:
        route = weight_grad_route(grad_rows, x_rows)
    if route:
        return split_mm(grad_rows.t(), x_rows, spikes="b")
    return grad_rows.t().mm(x_rows.to(grad_rows.dtype))
