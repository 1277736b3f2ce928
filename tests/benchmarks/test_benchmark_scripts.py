"""The benchmark scripts run end to end at tiny sizes on the CPU.

GPU time is scarce (a few minutes a session): a suite that crashes there wastes it, as a report
bug once did. These runs take every code path the GPU run takes (but the CUDA-only ones) and
check that the scripts' own correctness checks pass and the results they write are complete. No
timing is asserted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args, tmp_path, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("variant", ["snnopt_sparse", "dense_eager"])
def test_gpu_probe_runs_one_variant_and_reports_it(variant, tmp_path):
    result = _run([str(ROOT / "benchmarks" / "gpu_probe.py"), "--variant", variant, "--n", "24", "--device", "cpu",
                   "--smoke"], tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["variant"] == variant and set(report["first_call_ms"]) == {"forward", "backward"}


def test_gpu_probe_names_a_missing_variant(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_probe.py"), "--variant", "nope", "--n",
                             "8", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--variant" in result.stderr and "snnopt_sparse" in result.stderr


def test_gpu_host_profile_reports_every_case_on_cpu(tmp_path):
    _run([str(ROOT / "benchmarks" / "gpu_host_profile.py"), "--device", "cpu", "--smoke", "--rounds", "2", "--out",
          str(tmp_path)], tmp_path)
    report = json.loads((tmp_path / "gpu_host_profile.json").read_text())
    cases = report["cases"]
    assert set(cases) == {"autograd_floor", "custom_op_floor", "launch_floor",
                          "seed_L1.snnopt_sparse", "seed_L1.snnopt_sparse_graphed",
                          "seed_L1.snnopt_sparse_graphed_waiting",
                          "seed_L2.snnopt_sparse", "seed_L2.snnopt_sparse_graphed",
                          "seed_net.snnopt_sparse", "seed_net.snnopt_sparse_graphed", "on_24.snnopt_sparse",
                          "on_24.snnopt_sparse_graphed", "on_24.snnopt_sparse_graphed_waiting"}
    for name, entry in cases.items():
        if "_graphed" in name or name == "launch_floor":  # CUDA only: the reason is recorded, the rest goes on
            assert "CUDA" in entry["error"], entry
            continue
        for times in (entry["times"], entry["times_one_thread"]):
            assert all(times[phase]["event_ms"] > 0 for phase in ("forward", "backward")), (name, times)
        assert entry["python"]["backward"] and entry["host_top"]["forward"], name


def test_gpu_suite_smoke_run_on_cpu_writes_complete_results(tmp_path):
    _run([str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--smoke", "--out", str(tmp_path)], tmp_path)
    (path,) = tmp_path.glob("gpu_suite_*_smoke.json")
    payload = json.loads(path.read_text())
    assert payload["status"] == "complete"
    accuracy = payload["split_gemm_accuracy"]
    assert accuracy and all(0 <= route["max_rel"] < 1e-5 for shape in accuracy.values() for route in shape.values())
    assert path.with_suffix(".png").exists()
    seed_sizes = payload["seed_network"]["sizes"]
    assert seed_sizes and all(size["checks"]["all_passed"] for size in seed_sizes.values())
    for size in seed_sizes.values():
        for layer in size["layers"].values():
            for key in ("dense_eager", "snnopt_exact", "snnopt_sparse"):
                assert layer[key]["backward_ms"] > 0 and layer[key]["speedup_vs_dense"]["backward"] > 0
            profile = layer["snnopt_sparse"]["profile"]
            assert all(profile[phase]["wall_us_under_profiler"] > 0 for phase in ("forward", "backward"))
            # timed again with both backwards on the calling thread, and compared with each other
            for key in ("dense_eager", "snnopt_sparse"):
                again = layer[key]["calling_thread"]
                assert again["backward_ms"] > 0 and len(again["samples_ms"]) == layer[key]["repeats"], again
            assert layer["dense_eager"]["calling_thread"]["backward_speedup_vs_dense"] == 1.0
            assert layer["snnopt_sparse"]["calling_thread"]["backward_speedup_vs_dense"] == pytest.approx(
                layer["dense_eager"]["calling_thread"]["backward_ms"]
                / layer["snnopt_sparse"]["calling_thread"]["backward_ms"])
    on_sizes = payload["open_neuromorphic"]["sizes"]
    assert on_sizes
    for size in on_sizes.values():
        assert size["checks"]["passed"] and size["checks"]["spike_mismatches"] == 0
        sparse_check = size["checks_sparse"]  # snnopt sparse against the windowed dense loop
        assert sparse_check["passed"] and sparse_check["candidate"] == "snnopt sparse", sparse_check
        assert sparse_check["second_call"]["spikes_equal"], sparse_check  # a later call's paths, same results
        assert "float32 GEMM" in size["snnopt_matmul"]  # CPU: the reference product
        for key in ("dense_eager", "snnopt_exact", "snnopt_sparse"):
            assert size["variants"][key]["step_ms"] > 0
        assert size["snnopt_sparse_step_ratio_vs_fastest_peer"] > 0
        assert size["variants"]["snnopt_sparse"]["profile"]["backward"]["wall_us_under_profiler"] > 0
    overhead = payload["launch_overhead"]  # CUDA, or Triton's interpreter when the environment turns it on
    assert "skipped" in overhead or all(v["host_us"] > 0 for k, v in overhead.items() if k != "calls"), overhead
    targets = payload["targets"]  # computed from the entries above (on CPU, not a statement about the GPU)
    assert set(targets["met"]) == {"seed_backward_speedup", "seed_backward_memory_own", "seed_backward_memory_peak",
                                   "seed_backward_memory_added", "on_step_ratio", "seed_backward_speedup_graphed",
                                   "on_step_ratio_graphed", "seed_backward_speedup_calling_thread",
                                   "seed_backward_speedup_graphed_calling_thread"}
    # The CUDA-graph variants need CUDA: on CPU each says so, and the rest of the run carries on.
    graphed_errors = [v for k, v in payload["errors"].items() if k.endswith("snnopt_sparse_graphed")]
    assert graphed_errors and all("CUDA graphs need CUDA tensors" in v for v in graphed_errors), payload["errors"]
    assert all("CUDA graphs need CUDA" in size["variants"]["snnopt_sparse_graphed"]["error"]
               for size in on_sizes.values())
    assert all(v["backward_speedup"] > 0 and v["backward_speedup_calling_thread"] > 0
               for v in targets["seed"].values()) and len(targets["seed"]) == 4
    assert set(targets["on_step_ratio"]) == set(on_sizes)
    tuning = payload["kernel_tuning"]
    assert tuning["shipped"]["sweep_stages"] >= 1
    timed = {part: {key: {trial: v.get("step_ms") for trial, v in trials.items()}
                    for key, trials in tuning[part]["trials"].items()} for part in ("seed", "on")}
    assert set(timed["seed"]) == {"layer1", "layer2"} and set(timed["on"]) == {"snnopt_sparse", "snnopt_exact"}
    assert all(ms and ms > 0 for part in timed.values() for trials in part.values() for ms in trials.values()), timed
    assert {"bfloat16_gemms", "int8_gemms"} <= set(tuning["on"]["trials"]["snnopt_sparse"])
    # each timed trial also profiled once: kernel time per phase (0 on CPU: no device kernels)
    assert all(set(v["device"]) == {"forward", "backward"} and v["device"]["backward"]["busy_us"] >= 0
               for part in ("seed", "on") for trials in tuning[part]["trials"].values() for v in trials.values())
    assert "int8_mm (as shipped)" in next(iter(accuracy.values()))  # the int8 route runs on CPU too
    assert payload["spike_gemm_routes"] == []  # CPU: no tensor-core route, nothing timed


def test_gpu_suite_tuning_trials_name_real_settings():
    # A misspelt trial would raise only on the GPU, losing that trial's numbers there.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from snnopt.codegen import spike_matmul, triton_lif

    for trials in (gpu_suite.SEED_TUNING_TRIALS, gpu_suite.ON_TUNING_TRIALS):
        for changes in trials.values():
            changes = dict(changes)
            assert changes.pop("spike_route", "auto") in (*spike_matmul.ROUTES, "auto")
            triton_lif.KernelTuning(**changes)  # raises on an unknown field or value


def test_seed_network_quick_run_passes_its_checks(tmp_path):
    output = tmp_path / "seed.json"
    _run([str(ROOT / "benchmarks" / "seed_network.py"), "--quick", "--output", str(output), "--no-plot"], tmp_path)
    payload = json.loads(output.read_text())
    checks = {key: check for key, check in payload["checks"].items() if isinstance(check, dict) and "passed" in check}
    assert {"snnopt_optimize", "snnopt_exact", "snnopt_sparse"} <= set(checks)
    assert payload["checks"]["all_passed"] and all(check["passed"] for check in checks.values()), checks


def test_triton_host_overhead_script_counts_the_sparse_backward_launch(tmp_path):
    pytest.importorskip("triton")
    result = _run([str(ROOT / "benchmarks" / "triton_host_overhead.py"), "--calls", "20"], tmp_path)
    assert "sparse backward" in result.stdout and "'_sparse_weight_grad_kernel': 1.0" in result.stdout


def test_triton_host_overhead_script_takes_the_on_layer_routes_when_forced(tmp_path):
    # --gemm-routes / --dense-weight-route: the large GPU layer's path at a small size (its forward
    # lists the events and writes the GEMM operand in one launch; the dense weight route's three).
    pytest.importorskip("triton")
    result = _run([str(ROOT / "benchmarks" / "triton_host_overhead.py"), "--calls", "5", "--shape", "2", "10", "64",
                   "64", "--rate", "0.1", "--gemm-routes", "--dense-weight-route"], tmp_path)
    backward = next(line for line in result.stdout.splitlines() if line.startswith("sparse backward:"))
    assert "_reverse_filter_kernel" in backward and "_scatter_events_kernel" in backward, result.stdout
    assert "_sparse_weight_grad_kernel" not in backward and "'aten::mm': 1" in backward, result.stdout


def _last_line_in_interpreter(code: str, tmp_path) -> str:
    """The last line ``code`` prints, run with benchmarks/ on sys.path (``sys.argv[1]``) under Triton's interpreter."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_gpu_suite_launch_overhead_runs_every_launch_in_the_interpreter(tmp_path):
    # On the GPU these launches time the host cost per call; here Triton's interpreter runs the same
    # calls on CPU tensors, so a wrong argument list fails before GPU time is spent on it.
    report = json.loads(_last_line_in_interpreter(
        "import json, sys, torch; sys.path.insert(0, sys.argv[1]); import gpu_suite; "
        "print(json.dumps(gpu_suite.launch_overhead(torch.device('cpu'), calls=2)))", tmp_path))
    timed = {name: entry for name, entry in report.items() if name != "calls"}
    assert len(timed) >= 6 and all(entry.get("host_us", 0) > 0 for entry in timed.values()), timed


def test_gpu_suite_scattered_adds_run_in_the_interpreter(tmp_path):
    # The atomic-add ceiling's kernel, at its smoke size: a broken kernel fails here, not on the GPU.
    (entry,) = json.loads(_last_line_in_interpreter(
        "import json, sys, torch; sys.path.insert(0, sys.argv[1]); import gpu_suite; "
        "print(json.dumps(gpu_suite.scattered_adds(torch.device('cpu'), smoke=True)))", tmp_path)).values()
    assert entry["adds"] == 4096 and entry["slots"] == 1024
    assert all(entry[kind]["us"] > 0 and entry[kind]["billion_per_s"] > 0 for kind in ("atomic_add", "store"))


def test_scattered_adds_kernel_adds_every_value(tmp_path):
    # What the ceiling times is really one add per listed position (the interpreter runs the kernel).
    printed = _last_line_in_interpreter(
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import _atomics\n"
        "index = torch.tensor([0, 3, 3, 7, 3]); values = torch.tensor([1., 2., 4., 8., 16.])\n"
        "out = torch.zeros(8)\n"
        "_atomics.scatter(index, values, out, atomic=True)\n"
        "print(out.tolist())", tmp_path)
    assert printed == str([1.0, 0.0, 0.0, 22.0, 0.0, 0.0, 0.0, 8.0])


def test_gpu_check_script_parses_and_its_limits_fit_one_device_call():
    """gpu_check.sh runs as one device command within a 15-minute device budget that also pays the
    machine's start: its steps' limits (plus the grace periods after SIGINT) stay near 8 minutes."""
    import re

    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    limits = re.findall(r"^\s*timeout (?:-s [A-Z]+ )?(?:-k (\d+) )?(\d+) ", script.read_text(), flags=re.MULTILINE)
    assert len(limits) == 5, limits  # probe, suite, host profile, GPU tests, compiled interpreter suites
    assert sum(int(grace or 0) + int(limit) for grace, limit in limits) <= 510


def test_memory_ratios_include_the_seed_papers_measure():
    """The CUDA-only memory facts (a CPU run has none) turn into the ratios the targets read."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_suite

    dense = {"backward_peak_bytes": 1000, "output_bytes": 100, "input_grad_bytes": 100, "backward_added_bytes": 400}
    sparse = {"backward_peak_bytes": 300, "output_bytes": 100, "input_grad_bytes": 100, "backward_added_bytes": 120}
    ratios = gpu_suite._memory_ratios(sparse, dense)
    assert ratios["backward_peak"] == 0.3 and ratios["backward_added"] == 0.3
    assert ratios["backward_peak_excluding_caller_tensors"] == 100 / 800
    assert "backward_added" not in gpu_suite._memory_ratios({"backward_peak_bytes": 300}, dense)


def test_gpu_suite_graph_reads_part_runs_and_prints(monkeypatch, capsys):
    # The host-read comparison of captured layers needs CUDA to capture; here a stand-in for the
    # captured model (the layer itself, with a GraphedModel's counters) runs the rest of its code.
    import argparse

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.pop(0)

    class StandIn:
        fallbacks = recaptures = other_inputs = overlapping = 0
        graph_pool_bytes = None

        def __init__(self, model, options):
            self.model, self.options = model, options
            self.plan = argparse.Namespace(summary=lambda: [], input_checks={0: {"bfloat16"}}, checks_in_graph=False)

        def __call__(self, *inputs):
            return self.model(*inputs)

    made = []
    monkeypatch.setattr(gpu_suite, "_can_capture", lambda device: True)
    monkeypatch.setattr(gpu_suite, "captured", lambda model, inputs, **options: made.append(options) or
                        StandIn(model, options))
    errors: dict = {}
    args = argparse.Namespace(seed=0, on_input_rate=0.05, on_weight_gain=1.0)
    result = gpu_suite._graph_reads(gpu_suite.MODES["smoke"], args, torch.device("cpu"), errors)
    assert not errors, errors
    assert made == [{"wait_for_replay": False}] * 2 + [{"wait_for_replay": True}] * 2
    layers = [key for key in result if key != "config"]
    assert len(layers) == 2 and all(set(result[key]) == {"shipped", "waits_for_replay"} for key in layers)
    assert all(v["step_ms"] > 0 and v["input_checks"] == {"0": ["bfloat16"]} for key in layers
               for v in result[key].values())
    gpu_suite.print_tuning({"kernel_tuning": {"shipped": {}, "graph_reads": result}, "device": {"name": "cpu"}})
    assert "host-read protocols" in capsys.readouterr().out
