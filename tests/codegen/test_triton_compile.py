"""Every generated kernel variant lowers to PTX and cubin for sm_90 (compile only, no GPU needed).

Variants: each (spec, dtype) of the pairwise covering array in ``triton_cases`` (every value and
pair of values of every dimension), each of its three kernels with the constexpr flags the
launchers use. The compiling runs in a child process without ``TRITON_INTERPRET``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.codegen.compile_kernels import COMPACT_KERNELS, variants  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_variant_lowers_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 warning; launches set it anyway
    done = subprocess.run([sys.executable, "-m", "tests.codegen.compile_kernels"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert len(report) == len(variants())
    failures = {name: r["error"] for name, r in report.items() if "error" in r}
    assert not failures, "\n\n".join(f"{name}:\n{err}" for name, err in failures.items())
    base = {"_lif_fwd_kernel", "_lif_bwd_kernel", "_lif_bwd_init_kernel"}
    assert all(set(r) in (base, base | set(COMPACT_KERNELS)) for r in report.values())
    assert any(set(r) == base | set(COMPACT_KERNELS) for r in report.values())
