"""How many scattered float32 adds per second the device takes: the ceiling of the sparse weight gradient.

The seed network's sparse backward sums its weight gradient as event pairs, one relaxed atomic add
into dW[j, i] per (active entry, earlier input event) pair: ~4M adds into a 200 x 784 gradient at
H = 200, ~17M into 800 x 784 at H = 800 (H200 run 5: 48 and 176 us). Whether that kernel is
bound by the device's atomics or by its own work decides what can make it faster (more entries
per program, a grouping that adds fewer times, or the dense route). This times the same number
of adds into the same number of slots at random positions, with Triton's relaxed ``atomic_add``
(``red`` instructions, as the kernel's), and plain stores to the same positions for comparison.
Triton kernels need a real source file: hence this module (``gpu_suite.scattered_adds`` times it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scatter_kernel(index_ptr, value_ptr, out_ptr, count, BLOCK: tl.constexpr, ATOMIC: tl.constexpr):
    # One add (or store) per listed position, BLOCK of them per program.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    listed = offs < count
    index = tl.load(index_ptr + offs, mask=listed, other=0)
    value = tl.load(value_ptr + offs, mask=listed, other=0.0)
    if ATOMIC:
        tl.atomic_add(out_ptr + index, value, mask=listed, sem="relaxed")
    else:
        tl.store(out_ptr + index, value, mask=listed)


# (label, adds, slots): the seed network's layer-1 weight gradient at H = 200 and H = 800 (pairs as
# active entries x half a batch row's input events, at the activity of run 5).
SHAPES = (("H=200: 4.2M adds into 200x784", 4_200_000, 200 * 784),
          ("H=800: 17M adds into 800x784", 17_000_000, 800 * 784))
SMOKE_SHAPES = (("smoke: 4096 adds into 1024", 4096, 1024),)
BLOCK = 1024


def scatter(index: torch.Tensor, values: torch.Tensor, out: torch.Tensor, atomic: bool) -> None:
    """``out[index[k]] += values[k]`` for every k (``atomic``), or ``out[index[k]] = values[k]``: one launch."""
    _scatter_kernel[(triton.cdiv(index.numel(), BLOCK),)](index, values, out, index.numel(), BLOCK=BLOCK,
                                                          ATOMIC=atomic, num_warps=4)
