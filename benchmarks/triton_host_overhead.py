"""Host time of the Triton path's sparse backward, without a GPU: every kernel launch a no-op.

On a GPU a seed-network layer's sparse backward is one or two small kernels, so its time is mostly
the Python and dispatch work around them. This script measures that work on CPU tensors under
``TRITON_INTERPRET=1`` with each generated kernel replaced by a stub that does nothing but fill the
counts the launchers read back (so the compact lists get their sizes). The numbers are host
overhead only: no kernel runs, and CPU tensor ops stand in for CUDA ones.

    python benchmarks/triton_host_overhead.py            # B=4, T=100, 784 -> 200, sparse
    python benchmarks/triton_host_overhead.py --backward exact --calls 5000
    # the Open Neuromorphic layer's path (a large CUDA layer's routes, forced at a small size):
    python benchmarks/triton_host_overhead.py --shape 2 50 512 512 --rate 0.05 --gemm-routes --dense-weight-route

Prints the median and minimum time of one ``backward`` call (``retain_graph=True``, same graph)
and the launches it makes; then, for one forward and one backward, the torch operations the host
issues (top-level ATen calls, counted with ``torch.profiler``; the stubs' own writes left out). On
a GPU each is a dispatch and often a launch, so their number is what a host-bound layer pays.

``--gemm-routes`` forces what a large layer takes on a GPU: its spike GEMMs on spike_matmul's
split-bfloat16 route (here the products run as float32 ones, and the weight's split, one Triton
launch on CUDA, as torch operations). ``--dense-weight-route`` forces the weight gradient's dense
route (a reverse sweep and one GEMM), which a layer with many input events takes.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import snnopt.functional as SF  # noqa: E402
from snnopt.codegen import triton_lif  # noqa: E402

LAUNCHES: collections.Counter = collections.Counter()
STUB_SCOPE = "stub writes"  # profiler label of the stubs' own fill_ calls (not the layer's operations)


class _NoLaunch:
    """``kernel[grid](*args)`` that only counts, and writes the counts the launcher reads back."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **meta):
            LAUNCHES[self.name] += 1
            with torch.profiler.record_function(STUB_SCOPE):
                self._write_counts(args, meta)
        return launch

    def _write_counts(self, args, meta):
        if self.name == "_input_events_kernel":
            (args[3] if meta.get("WRITE") else args[1]).fill_(0 if meta.get("WRITE") else 1)
        elif self.name == "_lif_fwd_kernel" and meta.get("COUNT_ACTIVE"):
            args[11].fill_(1)  # one active entry per (b, t, block)
            if meta.get("STAGE_ACTIVE"):
                args[18].fill_(0)  # slot starts within the area (and no overflow: no second sweep)
        elif self.name == "_lif_fwd_kernel" and meta.get("WRITE_ACTIVE"):
            args[13].fill_(0)  # valid flat indices
        elif self.name == "_gather_staged_kernel":
            args[5].fill_(0)  # valid flat indices


def _stub_kernels():
    real = triton_lif.kernels
    stubs = {}

    def kernels(spec, dtype=torch.float32):
        module = real(spec, dtype)  # the real lookup, so its cost counts
        if id(module) not in stubs:
            stubs[id(module)] = type("Stubs", (), {name: _NoLaunch(name) for name in dir(module)
                                                   if name.startswith("_") and name.endswith("_kernel")})()
        return stubs[id(module)]

    triton_lif.kernels = kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backward", choices=("sparse", "exact"), default="sparse")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--shape", type=int, nargs=4, default=(4, 100, 784, 200), metavar=("B", "T", "IN", "N"))
    parser.add_argument("--rate", type=float, default=0.004, help="input spike probability per entry")
    parser.add_argument("--gemm-routes", action="store_true", help="spike GEMMs on the split-bfloat16 route")
    parser.add_argument("--dense-weight-route", action="store_true", help="the weight gradient's dense route")
    args = parser.parse_args(argv)
    _stub_kernels()
    if args.gemm_routes:
        from snnopt.codegen import spike_matmul

        spike_matmul.applies = lambda spikes, other, shape: other.dtype == torch.float32
    if args.dense_weight_route:
        triton_lif.events_are_cheaper = lambda *args: False
    torch.manual_seed(0)
    batch, steps, features, neurons = args.shape
    x = (torch.rand(batch, steps, features) < args.rate).float()
    weight = (torch.randn(neurons, features) * 0.05).requires_grad_()
    upstream = torch.randn(batch, steps, neurons)
    spikes = SF.linear_lif(x, weight, beta=0.9, backend="triton", backward=args.backward)
    for _ in range(50):
        spikes.backward(upstream, retain_graph=True)
    LAUNCHES.clear()
    times = []
    for _ in range(args.calls):
        weight.grad = None
        start = time.perf_counter()
        spikes.backward(upstream, retain_graph=True)
        times.append(time.perf_counter() - start)
    per_call = {name: count / args.calls for name, count in LAUNCHES.items()}
    print(f"{args.backward} backward, shape {tuple(args.shape)}: host time median "
          f"{statistics.median(times) * 1e6:.1f} us, min {min(times) * 1e6:.1f} us over {args.calls} calls; "
          f"launches per call {per_call}")
    for phase, ops, launches in _operations(x, weight, upstream, args.backward):
        print(f"{args.backward} {phase}: {sum(ops.values())} torch operations {dict(ops.most_common())}; "
              f"launches {launches}")
    return 0


def _operations(x, weight, upstream, backward: str):
    """(phase, top-level ATen calls, kernel launches) of one forward and one backward."""
    from torch.profiler import ProfilerActivity, profile

    results = []
    spikes = None
    for phase in ("forward", "backward"):
        LAUNCHES.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if phase == "forward":
                spikes = SF.linear_lif(x, weight, beta=0.9, backend="triton", backward=backward)
            else:
                spikes.backward(upstream)
        ops = collections.Counter(
            event.name for event in prof.events()
            if event.name.startswith("aten::") and not (event.cpu_parent is not None and (
                event.cpu_parent.name.startswith("aten::") or event.cpu_parent.name == STUB_SCOPE)))
        results.append((phase, ops, dict(LAUNCHES)))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
