"""Compile every kernel variant of ``triton_cases`` for sm_90 and print the failures as JSON.

Run as ``python -m tests.codegen.compile_kernels`` in a process without ``TRITON_INTERPRET``
(``test_triton_compile`` does so): Triton's interpreter and its compiler do not mix in one process.
"""

import json
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from snnopt.codegen import triton_lif
from tests.codegen.triton_cases import CASES, make_layer

TARGET = GPUTarget("cuda", 90, 32)
_POINTER_TYPES = {torch.float64: "*fp64", torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
# Pointers carrying the input dtype; the rest are the accumulation dtype, flags are uint8.
_INPUT_DTYPE_POINTERS = {"cur_ptr", "spikes_ptr", "gs_ptr", "gm_ptr", "gvf_ptr", "gsf_ptr", "v0_ptr", "syn0_ptr"}


def variants():
    seen = {}
    for case in CASES:
        layer = make_layer(case)
        seen.setdefault(triton_lif.kernel_key(layer.spec, layer.dtype), (layer.spec, layer.dtype))
    return list(seen.values())


def _signature(fn, dtype):
    acc = _POINTER_TYPES[triton_lif.accumulation_dtype(dtype)]
    signature = {}
    for name in fn.arg_names:
        if name.isupper():
            signature[name] = "constexpr"
        elif name == "flags_ptr":
            signature[name] = "*u8"
        elif name.endswith("_ptr"):
            signature[name] = _POINTER_TYPES[dtype] if name in _INPUT_DTYPE_POINTERS else acc
        else:
            signature[name] = "i32"
    return signature


def compile_variant(spec, dtype) -> dict:
    """Compile the three kernels with the constexpr flags the launchers use; returns {kernel: PTX size}."""
    module = triton_lif.kernels(spec, dtype)
    exact = not spec.sparse
    constants = {
        "_lif_fwd_kernel": dict(RECORD_MEMBRANE=True, RECORD_SYN=exact and spec.cuba, COLLECT_ACTIVE=spec.sparse,
                                BLOCK_N=256),
        "_lif_bwd_kernel": dict(HAS_GRAD_MEMBRANE=True, BLOCK_N=256),
        "_lif_bwd_init_kernel": dict(BLOCK_N=256),
    }
    sizes = {}
    for name, consts in constants.items():
        fn = getattr(module, name)
        compiled = triton.compile(ASTSource(fn, _signature(fn, dtype), constexprs=consts), target=TARGET,
                                  options=dict(triton_lif.LAUNCH_OPTIONS))
        sizes[name] = len(compiled.asm["ptx"])
    return sizes


def main() -> int:
    report = {}
    for spec, dtype in variants():
        name = f"{triton_lif.kernel_key(spec, dtype)!r} / {dtype}"  # describe() omits fire_at_threshold
        try:
            report[name] = compile_variant(spec, dtype)
        except Exception:  # reported, the test fails on it
            report[name] = {"error": traceback.format_exc(limit=3)}
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
