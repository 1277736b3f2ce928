"""Compile every kernel variant of ``triton_cases`` for sm_90 and print the failures as JSON.

Run as ``python -m tests.codegen.compile_kernels`` in a process without ``TRITON_INTERPRET``
(``test_triton_compile`` does so): Triton's interpreter and its compiler do not mix in one process.
"""

import json
import re
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from snnopt.codegen import spike_matmul, triton_lif
from tests.codegen.triton_cases import CASES, make_layer

TARGET = GPUTarget("cuda", 90, 32)
_POINTER_TYPES = {torch.float64: "*fp64", torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
# Pointers carrying the input dtype; the rest are the accumulation dtype, flags are uint8.
_INPUT_DTYPE_POINTERS = {"cur_ptr", "spikes_ptr", "gs_ptr", "gm_ptr", "gvf_ptr", "gsf_ptr", "v0_ptr", "syn0_ptr",
                         "x_ptr", "w_ptr"}
_INDEX_POINTERS = {"counts_ptr": "*i32", "offsets_ptr": "*i64", "index_ptr": "*i64", "evt_off_ptr": "*i64",
                   "stage_index_ptr": "*i64", "overflow_ptr": "*i64", "slot_start_ptr": "*i32",
                   "evt_pos_ptr": "*i32", "pos_ptr": "*i32", "input_active_ptr": "*i64", "act_off_ptr": "*i64",
                   "kind_ptr": "*i64",  # (the events' spike check flags)
                   "parts_ptr": "*bf16"}  # (and the bfloat16 parts of a split dL/dI: fixed types too)
TUNING = triton_lif.KernelTuning()  # the shipped launch choices
STAGES = TUNING.sweep_stages
# The compact sparse path's kernels (feedforward sparse layers), with the flags its launchers use.
COMPACT_KERNELS = {
    # counting (with or without the spike check), listing, and listing that also writes the forward
    # GEMM's spike operand (bfloat16 three times side by side, or int8 once); and a captured step's
    # input copied and checked (spike_check with copy_into: the operand is the copy)
    "_input_events_kernel": [dict(WRITE=write, CHECK=check, OPERAND=copies, ROWS=TUNING.event_tile // 1024,
                                  BLOCK=1024, num_warps=8, **({"op_ptr": op} if op else {}))
                             for write, check, copies, op in ((False, False, 0, None), (False, True, 0, None),
                                                              (True, False, 0, None), (True, False, 3, "*bf16"),
                                                              (True, False, 1, "*i8"), (False, True, 1, "*fp32"))],
    # several entries per program (the shipped pair_entries) and one (the suite's trial pair_entries_1)
    # (and the suite's trial grouped_pairs_32: a block's pairs of one (b, j) merged before the atomics)
    "_sparse_weight_grad_kernel": [
        dict(GS_COMPACT=False, NEED_W=True, NEED_B=True, NEED_V0=True, ENTRIES=entries, BLOCK_E=TUNING.pair_block,
             GROUP=group, ATOMIC_SEM=TUNING.atomic_sem, num_warps=triton_lif._warps(TUNING.pair_block))
        for entries, group in ((TUNING.pair_entries, False), (1, False), (32, True))] + [
        dict(GS_COMPACT=True, NEED_W=True, NEED_B=False, NEED_V0=False, ENTRIES=TUNING.pair_entries,
             BLOCK_E=TUNING.pair_block, GROUP=False, ATOMIC_SEM=TUNING.atomic_sem,
             num_warps=triton_lif._warps(TUNING.pair_block))],
    "_sparse_input_grad_kernel": [dict(ENTRIES=entries, BLOCK_A=TUNING.pair_block // 2,
                                       num_warps=triton_lif._warps(TUNING.pair_block // 2))
                                  for entries in (TUNING.pair_entries, 1)],
    # one slot per program, or TUNING.gather_slots per one-warp program
    "_gather_staged_kernel": [dict(BLOCK=256, SLOTS=1), dict(BLOCK=32, SLOTS=TUNING.gather_slots, num_warps=1)],
    # the dense input of the dense weight route: in the accumulation dtype, or bfloat16 for the split GEMM
    "_scatter_events_kernel": [dict(BLOCK=128, ZERO_BLOCK=1024, **({"out_ptr": out} if out else {}))
                               for out in (None, "*bf16", "*i8")],
    # spike_matmul's CUDA split (and the spike operand's three copies)
    "_split_bfloat16_kernel": [dict(REPEAT=repeat, BLOCK=1024, src_ptr="*fp32", out_ptr="*bf16")
                               for repeat in (False, True)],
    # spike_matmul's int8 route: the fixed-point digits, and the product put back together (both orientations)
    "_quantize_int8_kernel": [dict(SCALED_DIM=dim, SLICES=spike_matmul.INT8_SLICES, BLOCK=1024, src_ptr="*fp32",
                                   shift_ptr="*i32", out_ptr="*i8") for dim in (0, 1)],
    "_combine_int8_kernel": [dict(SCALED_DIM=dim, SLICES=spike_matmul.INT8_SLICES, BLOCK=1024, acc_ptr="*i32",
                                  shift_ptr="*i32", out_ptr="*fp32") for dim in (0, 1)],
    # ... and the fused route's GEMM (digits on either operand), with the shipped tile configuration
    "_int8_gemm_kernel": [dict(DIGITS_ON_B=on_b, **triton_lif.INT8_GEMM_CONFIG, a_ptr="*i8", b_ptr="*i8",
                               shift_ptr="*i32", out_ptr="*fp32") for on_b in (True, False)],
    # the dense weight route (triton_lif.reverse_sweep): g scattered, then the sweep with the
    # combinations its launcher uses (dL/dI as float32 or split parts, with or without db/dv0 sums,
    # or only the sums: deterministic db and dv0 without a weight gradient)
    "_scatter_active_grad_kernel": [dict(GS_COMPACT=compact, BLOCK=1024) for compact in (False, True)],
    "_reverse_filter_kernel": [dict(WRITE=write, SPLIT=split, SUMS=sums, BLOCK_N=256, STAGES=STAGES)
                               for write, split, sums in ((True, False, False), (True, False, True),
                                                          (True, True, False), (True, True, True),
                                                          (False, False, True))],
}
# The kernels with a serial time loop whose loads the launchers pipeline (KernelTuning.sweep_stages).
SWEEP_KERNELS = {"_lif_fwd_kernel", "_lif_bwd_kernel", "_reverse_filter_kernel"}
# PTX facts: an atomic or fence with ordering beyond relaxed (every atomic here only accumulates),
# and asynchronous global-to-shared copies (what Triton's pipeliner emits for a loop's loads).
_ORDERED = re.compile(r"^\s*(@!?%p\d+\s+)?(atom|red|fence)\S*\.(acq_rel|acquire|release|sc)\b|^\s*membar", re.M)
_ASYNC_COPY = re.compile(r"^\s*(@!?%p\d+\s+)?cp\.async\.(ca|cg)\b", re.M)
# Hopper's warpgroup MMA on int8 operands (the fused int8 GEMM must run on tensor cores).
_INT8_WGMMA = re.compile(r"wgmma\.mma_async\S*\.s32\.s8\.s8")


def ptx_facts(ptx: str) -> dict:
    """Size, ordered atomics/fences and async copies of one kernel's PTX."""
    return {"ptx_bytes": len(ptx), "ordered_atomics": len(_ORDERED.findall(ptx)),
            "async_copies": len(_ASYNC_COPY.findall(ptx)), "int8_wgmma": len(_INT8_WGMMA.findall(ptx))}


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
        elif name in _INDEX_POINTERS:
            signature[name] = _INDEX_POINTERS[name]
        elif name.endswith("_ptr"):
            signature[name] = _POINTER_TYPES[dtype] if name in _INPUT_DTYPE_POINTERS else acc
        else:
            signature[name] = "i32"
    return signature


def compile_variant(spec, dtype) -> dict:
    """Compile the kernels with the constexpr flags the launchers use; returns {kernel: summed ptx_facts}."""
    module = triton_lif.kernels(spec, dtype)
    exact = not spec.sparse
    # A recurrent layer's sweeps run one step per launch, without pipelining (triton_lif._sweep_stages).
    stages = 1 if spec.recurrent else STAGES
    flags = dict(COUNT_ACTIVE=False, STAGE_ACTIVE=False, WRITE_ACTIVE=False, STORE_SPIKES=True, STAGES=stages)
    constants = {
        "_lif_fwd_kernel": [dict(RECORD_MEMBRANE=True, RECORD_SYN=exact and spec.cuba, COLLECT_ACTIVE=spec.sparse,
                                 BLOCK_N=256, **flags)],
        "_lif_bwd_kernel": [dict(HAS_GRAD_MEMBRANE=True, BLOCK_N=256, STAGES=stages)],
        "_lif_bwd_init_kernel": [dict(BLOCK_N=256)],
    }
    if spec.sparse:  # the in-kernel compaction's passes (staged, count only, rerun), and the compact backward
        constants["_lif_fwd_kernel"] += [
            dict(RECORD_MEMBRANE=False, RECORD_SYN=False, COLLECT_ACTIVE=False, BLOCK_N=256, COUNT_ACTIVE=True,
                 STAGE_ACTIVE=stage, WRITE_ACTIVE=False, STORE_SPIKES=True, STAGES=STAGES) for stage in (True, False)]
        constants["_lif_fwd_kernel"].append(
            dict(RECORD_MEMBRANE=False, RECORD_SYN=False, COLLECT_ACTIVE=False, BLOCK_N=256, COUNT_ACTIVE=False,
                 STAGE_ACTIVE=False, WRITE_ACTIVE=True, STORE_SPIKES=False, STAGES=STAGES))
        constants.update(COMPACT_KERNELS)
        if triton_lif.accumulation_dtype(dtype) != torch.float32:  # the launcher groups float32 layers only
            constants["_sparse_weight_grad_kernel"] = [flags for flags in COMPACT_KERNELS["_sparse_weight_grad_kernel"]
                                                       if not flags["GROUP"]]
    facts = {}
    for name, variants_of_kernel in constants.items():
        fn = getattr(module, name)
        total = {"ptx_bytes": 0, "ordered_atomics": 0, "async_copies": 0, "int8_wgmma": 0}
        for flags_of_launch in variants_of_kernel:
            consts = dict(flags_of_launch)
            options = dict(triton_lif.LAUNCH_OPTIONS, num_warps=consts.pop("num_warps", 4))  # 4: Triton's default
            signature = _signature(fn, dtype)
            signature.update({name: consts.pop(name) for name in list(consts) if name.endswith("_ptr")})
            compiled = triton.compile(ASTSource(fn, signature, constexprs=consts), target=TARGET, options=options)
            for fact, value in ptx_facts(compiled.asm["ptx"]).items():
                total[fact] += value
        facts[name] = total
    return facts


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
