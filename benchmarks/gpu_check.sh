#!/usr/bin/env bash
# The one script to run on a rented GPU machine, from the repository root, with $OUT a folder to
# write into (everything that should come back lands there). Needs no network: snnTorch,
# SpikingJelly and their pure-Python dependency loguru travel as wheels in .whl/ (prepared with
# `pip download --no-deps`, see benchmarks/README.md), and snnopt runs from the source tree.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh          # at most 505 s of limits (run 5: 389 s)
#
# Steps: install the wheels into /tmp/site; print nvidia-smi and versions; a probe of the CUDA-graph
# capture in its own process (at most 60 s, compiling the kernels the suite then finds in Triton's
# cache; the suite leaves the captured variants out if it fails);
# the GPU suite (at most
# 210 s, 136 s in H200 run 5: seed sizes start until 95 s (run 5's 80 s left H = 1000 out; its
# four sizes took 72 s, about 20 s each), ON sizes until 165 s (run 5: 41 s for three), then the
# kernel-tuning trials until 190 s (run 5: 10 s); 5 timed rounds; torch.compile of the whole 500-step loop left
# out, see gpu_suite.py --with-compile; torch.compile of the step is in); the host profile (at
# most 60 s: where the per-layer and whole-step times go, host or kernels);
# then the GPU tests (pytest -m gpu, at most 90 + 5 s), then the capture-plan, compact-path and
# kernel-tuning test files with the compiled kernels (at most 75 + 5 s), both over 8 pytest-xdist
# processes where the image has it. The suite before the tests: a
# lease cut short keeps the numbers.
# Logs: $OUT/env.log, gpu_probe.log, gpu_suite.log, gpu_host_profile.log, gpu_tests.log,
# gpu_unit_tests.log; results: $OUT/gpu_host_profile.json, $OUT/gpu_suite_<device>.json
# (rewritten after every size, so a cut-short run keeps what finished) and .png. A failing step
# does not stop the next one.
set -u
OUT=${OUT:?set OUT to the folder that receives logs and results}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

{
  echo "== $(date -u +%FT%TZ) gpu_check.sh in $PWD"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      || python3 -c "import sys, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in sys.argv[1:]]" .whl/*.whl
    echo "installed into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    echo "no .whl/ folder: snnTorch and SpikingJelly will be reported as not installed"
  fi
} 2>&1 | tee "$OUT/env.log"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
  python3 - <<'PY'
import importlib, sys
import torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("triton", "numpy", "numba", "matplotlib", "snntorch", "spikingjelly", "loguru", "snnopt"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as error:
        print(name, "NOT IMPORTABLE:", type(error).__name__, error)
PY
} 2>&1 | tee -a "$OUT/env.log"

# CUDA-graph capture (snnopt.capture_graphs) has never run on a GPU before: probe it in a process
# of its own first (a capture that fails can leave the CUDA context unusable), and leave the captured
# variants out of the suite (--skip) if it fails.
echo "== CUDA-graph probe (limit 60 s)" | tee "$OUT/gpu_probe.log"
SKIP=""
timeout 60 python3 benchmarks/gpu_probe.py --variant snnopt_sparse_graphed --n 4096 2>&1 | tee -a "$OUT/gpu_probe.log"
if [ "${PIPESTATUS[0]}" != 0 ]; then SKIP="--skip snnopt_sparse_graphed"; fi
echo "probe done; suite options: ${SKIP:-none}" | tee -a "$OUT/gpu_probe.log"

echo "== GPU suite (limit 210 s)" | tee "$OUT/gpu_suite.log"
# shellcheck disable=SC2086  # $SKIP is empty or two words
timeout 210 python3 benchmarks/gpu_suite.py --device cuda:0 --out "$OUT" --repeat 5 --warmup 1 \
  --seed-budget 95 --budget 165 --tuning-budget 190 $SKIP 2>&1 | tee -a "$OUT/gpu_suite.log"
echo "gpu_suite exit status ${PIPESTATUS[0]} (1: a correctness check failed; 124: timed out, partial JSON kept)" \
  | tee -a "$OUT/gpu_suite.log"

# Where each variant's time goes: host or kernels (benchmarks/gpu_host_profile.py, diagnostic only).
echo "== host profile (limit 60 s)" | tee "$OUT/gpu_host_profile.log"
timeout 60 python3 benchmarks/gpu_host_profile.py --out "$OUT" 2>&1 | tee -a "$OUT/gpu_host_profile.log" >/dev/null
echo "gpu_host_profile exit status ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_host_profile.log"

# pytest-xdist is on the GPU image: the test runs below spread over 8 processes (16 cores there).
# Most of their time is Triton compiling each kernel variant on the host (run 5's compiled runs of
# the interpreter suites did not finish within 80 s in one process). One GPU serves them all. Their
# time limits send SIGINT: pytest then stops its workers and still prints what passed and failed.
PARALLEL=""
if python3 -c "import xdist" 2>/dev/null; then PARALLEL="-n 8"; fi

echo "== GPU tests (pytest -m gpu ${PARALLEL}, limit 90 s)" | tee "$OUT/gpu_tests.log"
# shellcheck disable=SC2086  # $PARALLEL is empty or two words
timeout -s INT -k 5 90 python3 -m pytest -m gpu -rfE -p no:cacheprovider $PARALLEL tests 2>&1 | tee -a "$OUT/gpu_tests.log"
echo "pytest exit status ${PIPESTATUS[0]} (5: no test marked gpu; 124: timed out)" | tee -a "$OUT/gpu_tests.log"

# The interpreter suites of the capture plans, the compact path and the kernel tunings, run here
# with the compiled kernels (they pick CUDA when present): the static plan (no host reads, padded
# lists, overflow flag), every code path of the one-sweep compaction, the event kernels and each
# tuning against the reference on the GPU, at tiny shapes, and deterministic algorithms (no atomic
# sums: two runs bit for bit). No -x: one failure must not hide the rest.
echo "== compiled-kernel runs of the interpreter suites (${PARALLEL:-one process}, limit 75 s)" \
  | tee "$OUT/gpu_unit_tests.log"
# In one process, most GPU-specific first (run 5 did not finish them: each compiles its variants).
# shellcheck disable=SC2086
timeout -s INT -k 5 75 python3 -m pytest -rfE -p no:cacheprovider $PARALLEL tests/codegen/test_capture_plan.py \
  tests/codegen/test_deterministic.py tests/codegen/test_triton_compact.py tests/codegen/test_kernel_tuning.py \
  2>&1 | tee -a "$OUT/gpu_unit_tests.log"
echo "pytest exit status ${PIPESTATUS[0]} (124: timed out)" | tee -a "$OUT/gpu_unit_tests.log"
ls -l "$OUT"
