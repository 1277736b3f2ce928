"""Where a sparse layer's step spends its time on a GPU: host (Python, dispatch, launches) or kernels.

The GPU suite's per-layer times are CUDA-event intervals: when the device waits on the host they
are host time. This script takes three floors of a backward call (autograd's own, a custom op's,
a custom op's with one zero fill and one Triton launch, as a seed layer's sparse backward makes),
the seed network's two hidden layers (B=256, T=100, H=200), its
whole training step (to the loss and back), and the Open Neuromorphic layer (n=4096), eager and
replayed from CUDA graphs, and reports for each
phase: the event interval, the host wall time (synchronised before and after), the device busy
time (``torch.profiler``), and the Python functions that take the host time (``cProfile``, top
entries by own time). Diagnostic only: nothing here is a result to quote without its context.

    python benchmarks/gpu_host_profile.py --out /some/folder     # about a minute on a warm GPU
    python benchmarks/gpu_host_profile.py --device cpu --smoke   # CPU check of this code
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from benchmarks import _harness, gpu_suite
    from benchmarks import seed_network as seed
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import _harness
    import gpu_suite
    import seed_network as seed


def _sync(device):
    _harness.synchronize(device)


def phase_times(case: "gpu_suite.Case", device, rounds: int) -> dict:
    """Median event interval and host wall time of forward and backward over ``rounds`` runs."""
    events = {"forward": [], "backward": []}
    walls = {"forward": [], "backward": []}
    for _ in range(rounds):
        case._clear()
        _sync(device)
        start = time.perf_counter()
        with _harness.timing_device(device):
            timer = _harness.StepTimer()
            out = case.forward()
            timer.mark()
            mid = time.perf_counter()
            case.backward(out)
            timer.mark()
            end_host = time.perf_counter()
            fwd, bwd = timer.intervals()
        walls["forward"].append(mid - start)
        walls["backward"].append(end_host - mid)
        events["forward"].append(fwd)
        events["backward"].append(bwd)
        del out
    return {phase: {"event_ms": round(statistics.median(events[phase]) * 1e3, 4),
                    "host_issue_ms": round(statistics.median(walls[phase]) * 1e3, 4)}
            for phase in events}


def python_profile(case: "gpu_suite.Case", device, calls: int = 5, top: int = 25) -> dict:
    """cProfile of ``calls`` steps, forward and backward profiled apart: the top functions by own time.

    Steps one after the other (a captured model replays its backward only after its own forward),
    the backward on the calling thread: CUDA backward functions run on autograd's device thread,
    which cProfile does not see.
    """
    profilers = {"forward": cProfile.Profile(), "backward": cProfile.Profile()}
    for _ in range(calls):
        case._clear()
        _sync(device)
        profilers["forward"].enable()
        out = case.forward()
        profilers["forward"].disable()
        _sync(device)
        with torch.autograd.set_multithreading_enabled(False):
            profilers["backward"].enable()
            case.backward(out)
            profilers["backward"].disable()
        del out
    _sync(device)
    case._clear()
    report = {}
    for phase, profiler in profilers.items():
        stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, own s, cumulative s, callers)}
        rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
        # Microseconds per step: own time, cumulative time, calls per step.
        report[phase] = [f"{own / calls * 1e6:9.1f} {cum / calls * 1e6:9.1f} {n / calls:6.1f}  "
                         f"{Path(file).name}:{line}({name})" for (file, line, name), (_, n, own, cum, _) in rows]
    return report


def cpu_side(case: "gpu_suite.Case", device, top: int = 15) -> dict:
    """The host's busiest operations of one forward and one backward (``torch.profiler`` self CPU time):
    where waits on the device (``cudaStreamSynchronize``, ``aten::_local_scalar_dense``) and launches go."""
    from torch.profiler import ProfilerActivity, profile

    report, out = {}, None
    case._clear()
    for phase in ("forward", "backward"):
        _sync(device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if phase == "forward":
                out = case.forward()
            else:
                case.backward(out)
            _sync(device)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        report[phase] = {e.key: {"calls": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1)} for e in events}
    del out
    case._clear()
    return report


def autograd_floor(device) -> "gpu_suite.Case":
    """The least a backward call costs: ``y = x * 2`` on one element, through autograd (the suite's
    per-layer backward times include this much whatever the layer does)."""
    x = torch.ones(1, device=device, requires_grad=True)
    grad = torch.ones(1, device=device)
    return gpu_suite.Case("autograd_floor", "x * 2, one element", lambda: x * 2,
                          lambda y: torch.autograd.backward(y, grad), [x])


# The floors between autograd's and a sparse layer's backward, one cost added at a time (what is
# left of the layer's time above the last one is snnopt's own host work):
#   custom_op_floor: a torch.library custom op whose registered backward returns its gradient
#     (the Python autograd wrapper every snnopt op's backward goes through);
#   launch_floor: the same, its backward also doing what a seed layer's sparse backward does besides
#     its own Python: a zero-filled (200, 784) weight gradient and one Triton launch (one element).
_FLOOR_OPS: dict = {}


def _floor_op(name: str, backward):
    if name not in _FLOOR_OPS:
        @torch.library.custom_op(f"snnopt_host_profile::{name}", mutates_args=())
        def op(x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        op.register_fake(lambda x: torch.empty_like(x))
        op.register_autograd(backward)
        _FLOOR_OPS[name] = op
    return _FLOOR_OPS[name]


def _identity_backward(ctx, grad):
    return grad


def _launch_backward(ctx, grad):
    from snnopt.codegen import triton_lif

    weight_grad = torch.zeros(200, 784, device=grad.device)
    one = torch.ones(1, 1, device=grad.device)
    triton_lif.split_bfloat16_into(one, torch.empty(3, 1, dtype=torch.bfloat16, device=grad.device), 0)
    del weight_grad
    return grad


def op_floors(device) -> dict:
    """``custom_op_floor`` and ``launch_floor`` (above); the launch needs CUDA (no interpreter here)."""
    x = torch.ones(1, device=device, requires_grad=True)
    grad = torch.ones(1, device=device)
    cases = {}
    for name, backward, label in (("custom_op_floor", _identity_backward, "custom op, identity backward"),
                                  ("launch_floor", _launch_backward, "custom op, zeros + one Triton launch")):
        if name == "launch_floor" and device.type != "cuda":
            cases[name] = "launch_floor needs CUDA (a Triton launch on CPU tensors needs TRITON_INTERPRET=1)"
            continue
        op = _floor_op(name, backward)
        cases[name] = gpu_suite.Case(name, label, lambda op=op: op(x), lambda y: torch.autograd.backward(y, grad), [x])
    return cases


# The captured variant with capture_graphs(..., wait_for_replay=True): each forward waits for its replay
# (the protocol until stop 19), next to the shipped one.
WAITING = gpu_suite.GRAPHED + "_waiting"


def cases(device, smoke: bool) -> dict:
    sizes = gpu_suite.MODES["smoke" if smoke else "full"]
    cfg = seed.SeedConfig(batch=sizes.seed_batch, steps=sizes.seed_steps, hidden=200)
    x, weights, s1, active1 = gpu_suite.seed_layer_inputs(cfg, device)
    out = {"autograd_floor": autograd_floor(device), **op_floors(device)}
    for name, inp, weight, needs in (("seed_L1", x, weights[0], False), ("seed_L2", s1, weights[1], True)):
        grad_out = torch.randn(cfg.batch, cfg.steps, cfg.hidden, device=device)
        errors: dict = {}
        layer = gpu_suite.layer_cases(cfg, inp, weight, grad_out, active1, needs, errors)
        if name == "seed_L1":  # the capture protocol before stop 19, for its device-idle gaps
            gpu_suite._add_graphed_layer(layer, cfg, inp, weight, grad_out, active1, needs, errors, key=WAITING,
                                         label=f"{gpu_suite.GRAPHED_LABEL}, waits for its replay",
                                         wait_for_replay=True)
        for key in ("snnopt_sparse", gpu_suite.GRAPHED, WAITING):
            if key in layer:
                out[f"{name}.{key}"] = layer[key]
            elif key in errors:
                out[f"{name}.{key}"] = errors[key]
    # The whole network's step (loss included), eager and replayed: in H200 run 5 its sparse backward
    # took 3.1 ms (1.7 ms replayed) where the two layers' own backwards took 0.8 + 1.3 ms.
    labels = torch.arange(cfg.batch, device=device) % cfg.outputs
    errors: dict = {}
    variants = {}
    for key in ("snnopt_sparse",):
        label, factory = seed.VARIANTS[key]
        with torch.device(device):
            variants[key] = seed.Variant(key, label, factory(cfg), weights, cfg)
    gpu_suite._add_graphed_network(variants, cfg, weights, device, errors, x)
    for key in ("snnopt_sparse", gpu_suite.GRAPHED_NETWORK):
        if key in variants:
            v = variants[key]
            out[f"seed_net.{key}"] = gpu_suite.Case(key, v.label, lambda v=v, x=x: v.loss(x, labels)[0],
                                                    lambda loss: loss.backward(), v.params)
        else:
            out[f"seed_net.{key}"] = errors.get(key, "not built")
    cfg, x, weight = gpu_suite.on_problem(sizes.on_neurons[0], sizes, argparse.Namespace(
        seed=0, on_input_rate=0.05, on_weight_gain=1.0), device)
    builders = gpu_suite.on_builders(cfg, weight)
    for key in ("snnopt_sparse", gpu_suite.GRAPHED, WAITING):
        try:
            with torch.device(device):
                module = builders[gpu_suite.GRAPHED if key == WAITING else key][1]()
            if key == WAITING:
                forward, inp = gpu_suite.captured(module, (x,), wait_for_replay=True), x
            else:
                forward, inp = gpu_suite.on_call(key, module, x)
        except Exception as error:  # no CUDA for the graphed variant (smoke runs on CPU)
            out[f"on_{cfg.hidden}.{key}"] = gpu_suite.describe(error)
            continue
        out[f"on_{cfg.hidden}.{key}"] = gpu_suite.Case(
            key, key, lambda forward=forward, inp=inp: forward(inp).sum(), lambda loss: loss.backward(),
            list(module.parameters()))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="folder for gpu_host_profile.json (default: print only)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    device = gpu_suite.normalise_device(torch.device(args.device))
    path = Path(args.out) / "gpu_host_profile.json" if args.out else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cases": {}}
    for name, case in cases(device, args.smoke).items():
        if isinstance(case, str):
            report["cases"][name] = {"error": case}
            continue
        entry = {}
        try:
            case.timed()  # compile, route timing
            entry["times"] = phase_times(case, device, args.rounds)
            with torch.autograd.set_multithreading_enabled(False):  # the backward on the calling thread
                entry["times_one_thread"] = phase_times(case, device, args.rounds)
            entry["python"] = python_profile(case, device)
            profile = gpu_suite.profile_case(case, device)
            entry["device"] = {phase: {k: profile[phase][k] for k in ("device_busy_us", "device_launches",
                                                                      "wall_us_under_profiler")}
                               for phase in profile}
            entry["device_idle"] = {phase: profile[phase]["idle"] for phase in profile if "idle" in profile[phase]}
            entry["device_top"] = {phase: profile[phase]["top"] for phase in profile}
            entry["host_top"] = cpu_side(case, device)
        except Exception as error:  # a diagnostic: one failing case must not hide the others
            entry["error"] = gpu_suite.describe(error)
        report["cases"][name] = entry
        if path is not None:  # after every case: a run cut short by its time limit keeps what finished
            path.write_text(json.dumps(report, indent=1))
        print(name, json.dumps({k: entry.get(k) for k in ("times", "times_one_thread", "device", "error")}), flush=True)
        for phase, lines in entry.get("python", {}).items():
            print(f"--- {name} {phase}: python by own time (us per step: own, cumulative, calls)")
            print("\n".join(lines))
        for phase, idle in entry.get("device_idle", {}).items():
            if "error" in idle:
                print(f"--- {name} {phase}: device idle not computed: {idle['error']}")
                continue
            print(f"--- {name} {phase}: device idle {idle['idle_us']} us under the profiler; longest gaps:")
            print("\n".join(f"  {g['idle_us']:>9} after {g['after'][:40]} before {g['before'][:40]}; host: "
                            + ", ".join(f"{k[:40]} {v}" for k, v in g["host"].items()) for g in idle["gaps"]))
        for phase, ops in entry.get("host_top", {}).items():
            print(f"--- {name} {phase}: host operations by self CPU time (us)")
            print("\n".join(f"  {v['self_cpu_us']:>10} {v['calls']:>5}  {k[:90]}" for k, v in ops.items()))
    if path is not None:
        path.write_text(json.dumps(report, indent=1))
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
