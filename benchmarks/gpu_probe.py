"""Run one Open Neuromorphic variant once (forward, backward) in a process of its own, and say whether it worked.

A kernel that faults (CUDA "illegal memory access") poisons the whole CUDA context: every later
call in that process fails, so one bad variant would take the rest of ``gpu_suite.py`` down with
it. ``gpu_check.sh`` therefore runs this probe first, one process per variant, with
``CUDA_LAUNCH_BLOCKING=1`` (the traceback then names the launch that faulted), and leaves the
variants that fail out of the suite (``--skip``), which reports them as skipped with the reason.

    python benchmarks/gpu_probe.py --variant snnopt_sparse --n 4096
    python benchmarks/gpu_probe.py --variant snnopt_exact --n 24 --device cpu --smoke

Prints one JSON line (variant, n, ok, stage times or the error; the full traceback goes to stderr)
and exits 0 when the variant ran, 3 when it failed with a CUDA error (the context is lost: the suite
must leave it out), 4 when it failed otherwise (not installed, say: the suite reports that itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

try:
    from benchmarks import _harness, gpu_suite
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import _harness
    import gpu_suite


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, help="an ON variant key of gpu_suite.py, e.g. snnopt_sparse")
    parser.add_argument("--n", type=int, required=True, help="layer width (an ON size)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--smoke", action="store_true", help="the suite's smoke batch and steps (CPU check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-input-rate", type=float, default=0.05)
    parser.add_argument("--on-weight-gain", type=float, default=1.0)
    args = parser.parse_args(argv)
    device = gpu_suite.normalise_device(torch.device(args.device))
    sizes = gpu_suite.MODES["smoke" if args.smoke else "full"]
    known = gpu_suite.on_builders(None, None)  # only the keys: nothing is built
    if args.variant not in known:
        parser.error(f"--variant: expected one of {', '.join(known)}, got {args.variant!r}")
    report = {"variant": args.variant, "n": args.n, "device": args.device, "ok": False, "stage": "setup"}
    stage_ms = {}
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        cfg, x, weight = gpu_suite.on_problem(args.n, sizes, args, device)
        with torch.device(device):
            module = gpu_suite.on_builders(cfg, weight)[args.variant][1]()
        forward, inp = gpu_suite.on_call(args.variant, module, x)
        for stage in ("forward", "backward"):
            report["stage"] = stage
            _harness.synchronize(device)
            start = time.perf_counter()
            if stage == "forward":
                loss = forward(inp).sum()
            else:
                loss.backward()
            _harness.synchronize(device)
            stage_ms[stage] = round((time.perf_counter() - start) * 1e3, 1)
        report.update(ok=True, stage="done")
    except Exception as error:
        report["error"] = gpu_suite.describe(error)
        report["cuda_error"] = _is_cuda_error(error)
        traceback.print_exc()
    report["first_call_ms"] = stage_ms
    from snnopt.codegen import spike_matmul

    report["spike_gemm_routes"] = spike_matmul.route_choices()  # the first forward times the routes
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 3 if report["cuda_error"] else 4


def _is_cuda_error(error: BaseException) -> bool:
    # torch.AcceleratorError (torch >= 2.8) is a RuntimeError; older builds raise RuntimeError("CUDA error: ...").
    return type(error).__name__ == "AcceleratorError" or "CUDA error" in str(error)


if __name__ == "__main__":
    sys.exit(main())
