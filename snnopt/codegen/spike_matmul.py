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

Example::

    >>> current = linear(spikes, weight, bias)          # == F.linear(spikes, weight, bias)
    >>> grad_w = weight_grad(grad_current_2d, spikes_2d)  # == grad_current_2d.t() @ spikes_2d
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

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


def is_bfloat16_exact(t: Tensor) -> bool:
    """Whether every entry of ``t`` is a bfloat16 value (spikes are); NaN is not. Syncs with the device."""
    return as_bfloat16_if_exact(t) is not None


def as_bfloat16_if_exact(t: Tensor) -> Optional[Tensor]:
    """``t`` in bfloat16 if that loses nothing (see :func:`is_bfloat16_exact`), else None."""
    if t.dtype == torch.bfloat16:
        return t
    rounded = t.to(torch.bfloat16)
    return rounded if torch.equal(rounded.to(t.dtype), t) else None


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
    right = x_rows if stacked else _contraction_stack(x_rows.to(torch.bfloat16), 0, repeat=True)
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
    if (not repeat and base.is_cuda and base.dtype == torch.float32 and base.dim() == 2 and base.is_contiguous()
            and _triton_importable()):
        from snnopt.codegen import triton_lif

        # One launch writing the three parts in place, instead of ~9 torch ops on float32 temporaries.
        triton_lif.split_bfloat16_into(base, stacked, stack_dim)
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
            and spikes.dtype in (torch.float32, torch.bfloat16)
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


def linear_takes_split(x: Tensor, weight: Tensor, nonzeros: Optional[Tensor] = None) -> bool:
    """Whether :func:`linear` would take the split GEMM for ``x`` (reads the device: the spike check)."""
    features = x.shape[-1]
    rows = x.numel() // max(features, 1)
    if not applies(x, weight, (rows, features, weight.shape[0])):
        return False
    return is_bfloat16_exact(x if nonzeros is None else nonzeros)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           nonzeros: Optional[Tensor] = None, stacked_spikes: Optional[Callable[[], Tensor]] = None,
           split: Optional[bool] = None) -> Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``; split bfloat16 GEMM when ``x`` is spikes and it pays.

    ``nonzeros``: the nonzero entries of ``x``, where the caller has them listed (a compact layer's
    input events): whether ``x`` is spikes is then read from those, a much smaller tensor, instead
    of three passes over ``x``. ``stacked_spikes``: builds the GEMM's left operand, ``x`` as
    bfloat16 :data:`SPLIT_PARTS` times side by side ``(rows, SPLIT_PARTS·features)``, where the caller
    can do that more cheaply than from the dense ``x`` (from those events). ``split``: the route
    decided by the caller (:func:`linear_takes_split`; a captured CUDA graph cannot read the
    device), True only where ``x`` is bfloat16-exact, which the caller has checked or will check.
    """
    features = x.shape[-1]
    rows = x.numel() // max(features, 1)
    spikes = None
    if split is not None:
        spikes = x if split else None
    elif applies(x, weight, (rows, features, weight.shape[0])):
        if nonzeros is None:
            spikes = as_bfloat16_if_exact(x)
        elif is_bfloat16_exact(nonzeros):
            spikes = x  # converted while stacked
    if spikes is not None:
        if stacked_spikes is not None:
            out = _mm_float32_out(stacked_spikes(), _contraction_stack(weight.t(), 0, repeat=False))
        else:
            out = split_mm(spikes.reshape(rows, features), weight.t(), spikes="a")
        if bias is not None:
            out += bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


def weight_grad_takes_split(grad_rows: Tensor, x_rows: Tensor) -> bool:
    """Whether :func:`weight_grad` would take the split GEMM (reads the device: the spike check)."""
    shape = (grad_rows.shape[1], grad_rows.shape[0], x_rows.shape[1])
    return applies(x_rows, grad_rows, shape) and is_bfloat16_exact(x_rows)


def weight_grad(grad_rows: Tensor, x_rows: Tensor, *, split: Optional[bool] = None) -> Tensor:
    """``grad_rowsᵀ @ x_rows`` (``(N, M)·(M, K)``) in ``grad_rows``' dtype; split GEMM when ``x_rows`` is spikes.

    ``split``: the route decided by the caller, as in :func:`linear`.
    """
    shape = (grad_rows.shape[1], grad_rows.shape[0], x_rows.shape[1])
    if split is not None:
        spikes = x_rows if split else None
    else:
        spikes = as_bfloat16_if_exact(x_rows) if applies(x_rows, grad_rows, shape) else None
    if spikes is not None:
        return split_mm(grad_rows.t(), spikes, spikes="b")
    return grad_rows.t().mm(x_rows.to(grad_rows.dtype))
