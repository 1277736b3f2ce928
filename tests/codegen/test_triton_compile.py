"""Every generated kernel variant lowers to PTX and cubin for sm_90 (compile only, no GPU needed).

Variants: each (spec, dtype) of the pairwise covering array in ``triton_cases`` (every value and
pair of values of every dimension), each of its three kernels with the constexpr flags the
launchers use. The compiling runs in a child process without ``TRITON_INTERPRET``. The PTX is
also checked for what the kernels' speed relies on: relaxed atomics and pipelined sweeps (the
same checks passed with Triton 3.6, the version on the GPU machine, and 3.9).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.codegen.compile_kernels import COMPACT_KERNELS, STAGES, SWEEP_KERNELS, variants  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 warning; launches set it anyway
    done = subprocess.run([sys.executable, "-m", "tests.codegen.compile_kernels"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_kernel_variant_lowers_for_sm90(report):
    assert len(report) == len(variants())
    failures = {name: r["error"] for name, r in report.items() if "error" in r}
    assert not failures, "\n\n".join(f"{name}:\n{err}" for name, err in failures.items())
    base = {"_lif_fwd_kernel", "_lif_bwd_kernel", "_lif_bwd_init_kernel"}
    assert all(set(r) in (base, base | set(COMPACT_KERNELS)) for r in report.values())
    assert any(set(r) == base | set(COMPACT_KERNELS) for r in report.values())


def test_atomics_are_relaxed(report):
    # The weight gradient's atomics only accumulate; acquire/release ordering (Triton's default) would
    # make every add wait for its result and fence the thread's other memory operations.
    ordered = {name: {k: f["ordered_atomics"] for k, f in r.items() if f["ordered_atomics"]}
               for name, r in report.items() if "error" not in r}
    assert not any(ordered.values()), ordered


def test_sweeps_pipeline_their_loads(report):
    # With STAGES > 1 Triton's pipeliner issues the next steps' loads as cp.async copies; a sweep
    # without them waits for every step's load (the loops are latency-bound on a GPU). Float32 and
    # float64 layers; Triton 3.9 leaves the 16-bit input loads of bfloat16/float16 layers unpipelined.
    assert STAGES > 1
    wide = [name for name in report if "recurrent=False" in name and name.endswith(("float32", "float64"))]
    assert len(wide) >= 4
    missing = {name: sorted(k for k in SWEEP_KERNELS & set(report[name]) if not report[name][k]["async_copies"])
               for name in wide if "error" not in report[name]}
    assert not any(missing.values()), missing


def test_fused_int8_gemm_runs_on_int8_tensor_cores(report):
    # spike_matmul's fused int8 route is only worth timing if its dots lower to Hopper's int8
    # warpgroup MMA (not CUDA-core loops): each kernel variant that has it must show them.
    counts = [r["_int8_gemm_kernel"]["int8_wgmma"] for r in report.values() if "_int8_gemm_kernel" in r]
    assert counts and all(count > 0 for count in counts), counts

