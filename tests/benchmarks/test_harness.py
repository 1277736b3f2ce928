"""benchmarks/_harness.py's pure helpers (the GPU scripts lean on them where no test can follow)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import _harness  # noqa: E402


def test_idle_gaps_finds_every_stretch_the_device_waited_and_what_the_host_did_then():
    kernels = [(100, 200, "events"), (150, 260, "gemm"), (400, 450, "lif"), (452, 500, "gather")]
    host = [(0, 600, "autograd::forward"),            # covers every gap: a container, not the cause
            (30, 90, "aten::empty"), (260, 380, "aten::tolist"), (380, 395, "cuLaunchKernel"),
            (500, 590, "setup_context")]
    report = _harness.idle_gaps(kernels, host, (0, 600), min_us=5.0)
    # Device busy 100-260 (two overlapping kernels), 400-450, 452-500: idle 100 + 140 + 2 + 100.
    assert report["idle_us"] == 342.0
    gaps = report["gaps"]
    assert [g["idle_us"] for g in gaps] == [140.0, 100.0, 100.0]  # longest first; the 2 us one is left out
    middle = gaps[0]
    assert (middle["after"], middle["before"]) == ("gemm", "lif")
    assert middle["host"] == {"aten::tolist": 120.0, "cuLaunchKernel": 15.0}
    lead = next(g for g in gaps if g["after"] == "start of call")
    assert lead["before"] == "events" and lead["host"] == {"aten::empty": 60.0}
    tail = next(g for g in gaps if g["before"] == "end of call")
    assert tail["after"] == "gather" and tail["host"] == {"setup_context": 90.0}


def test_idle_gaps_of_a_busy_device_is_empty():
    report = _harness.idle_gaps([(0, 50, "a"), (50, 100, "b")], [(0, 100, "op")], (0, 100))
    assert report == {"idle_us": 0.0, "gaps": []}


def test_profiler_gaps_reads_a_cpu_trace():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64).add_(1).sum()
    report = _harness.profiler_gaps(prof)
    # No CUDA activity: the whole call is one idle stretch, the host's operations in it.
    (gap,) = report["gaps"]
    assert gap["after"] == "start of call" and gap["before"] == "end of call"
    assert report["idle_us"] == gap["idle_us"] > 0
    assert any(name.startswith("aten::") for name in gap["host"])
