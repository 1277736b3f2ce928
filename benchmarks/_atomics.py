"""How many scattered float32 adds per second the device takes: the ceiling of the sparse weight gradient.

The seed network's sparse backward sums its weight gradient as event pairs, one relaxed atomic add
into dW[j, i] per (active entry, earlier input event) pair: ~4M adds into a 200 x 784 gradient at
H = 200, ~17M into 800 x 784 at H = 800 (H200 run 5: 48 and 176 us). Whether that kernel is
bound by the device's atomics or by its own work decides what can make it faster (more entries
per program, a grouping that adds fewer times, or the dense route). This times the same number
of adds into the same number of slots at random positions, with Triton's relaxed ``atomic_add``
(``red`` instructions, as the kernel's), and plain stores to the same positions for comparison.
Triton kernels need a real source file: hence this module.
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


def scattered_adds(device: torch.device, smoke: bool = False, rounds: int = 5) -> dict:
    """Per shape: median microseconds and billions per second of relaxed atomic adds and of plain
    stores to the same random positions (CUDA events; on CPU only in Triton's interpreter)."""
    results = {}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for label, adds, slots in SMOKE_SHAPES if smoke else SHAPES:
        index = torch.randint(0, slots, (adds,), generator=generator).to(device)
        values = torch.rand(adds, generator=generator).to(device)
        out = torch.zeros(slots, device=device)
        entry = {"adds": adds, "slots": slots}
        for name, atomic in (("atomic_add", True), ("store", False)):
            launch = lambda atomic=atomic: _scatter_kernel[(triton.cdiv(adds, BLOCK),)](  # noqa: E731
                index, values, out, adds, BLOCK=BLOCK, ATOMIC=atomic, num_warps=4)
            launch()  # compile
            times = []
            for _ in range(rounds):
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    launch()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3)
                else:
                    import time

                    began = time.perf_counter()
                    launch()
                    times.append((time.perf_counter() - began) * 1e6)
            times.sort()
            median_us = times[len(times) // 2]
            entry[name] = {"us": round(median_us, 2), "billion_per_s": float(f"{adds / median_us / 1e3:.3g}")}
        results[label] = entry
    return results
