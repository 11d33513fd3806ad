"""Compile the Triton kernels ahead of time for NVIDIA targets, without a GPU (run by test_kernels.py).

The interpreter used by the CPU tests accepts constructs that the compiler rejects; this script
lowers a representative set of kernel variants to a cubin for sm_90 (H100) and sm_80 (A100) with
Triton's own compiler and bundled ptxas. It must run without TRITON_INTERPRET (the caller drops it).
Prints one line per failure and exits 1 if any variant does not compile.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from compress.kernels import triton_dequant, triton_gemm, triton_gemv  # noqa: E402

POINTERS = {"codes_ptr": "*i32", "codes_hi_ptr": "*i32", "scales_ptr": "*fp16", "gidx_ptr": "*i32",
            "lut_ptr": "*fp32", "scale_codes_ptr": "*u8", "scale_scales_ptr": "*fp32", "offset_ptr": "*fp32"}
INTEGERS = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "GROUP": "i32", "M_BUCKET": "i32"}
WEIGHTS = {  # name -> (constexprs, zeros pointer type)
    "int4 asym qzeros": (dict(FORMAT=0, BITS=4, ZERO_MODE=1, USE_GIDX=False, GROUP_ALIGNED=True), "*i32"),
    "int3 unpacked zeros": (dict(FORMAT=0, BITS=3, ZERO_MODE=2, USE_GIDX=False, GROUP_ALIGNED=False), "*u8"),
    "int2 sym act-order": (dict(FORMAT=0, BITS=2, ZERO_MODE=0, USE_GIDX=True, GROUP_ALIGNED=False), "*i32"),
    "int8 asym": (dict(FORMAT=0, BITS=8, ZERO_MODE=1, USE_GIDX=False, GROUP_ALIGNED=False), "*i32"),
    "nf4 aligned": (dict(FORMAT=1, BITS=4, ZERO_MODE=0, USE_GIDX=False, GROUP_ALIGNED=True), "*i32"),
    "nf3 unaligned": (dict(FORMAT=1, BITS=3, ZERO_MODE=0, USE_GIDX=False, GROUP_ALIGNED=False), "*i32"),
}


def compile_variant(kernel, types: dict, constexprs: dict, target: GPUTarget, **options) -> None:
    fn = kernel.fn  # the @triton.jit function under the heuristics wrapper
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(source, target=target, options=options)


def weight_meta(meta: dict) -> dict:
    nf = meta["FORMAT"] == 1
    return dict(meta, LEVELS=255 if nf else 1, NF_BLOCK=64 if nf else 1, SCALE_BLOCK=256 if nf else 1)


def variants():
    """(label, kernel, types, constexprs, options) for every variant checked."""
    for label, (meta, zeros) in WEIGHTS.items():
        base = dict(POINTERS, **INTEGERS, zeros_ptr=zeros)
        yield (f"dequant {label}", triton_dequant.dequant_kernel, dict(base, out_ptr="*fp32"),
               dict(weight_meta(meta), BLOCK_K=64, BLOCK_N=64), {"num_warps": 4, "enable_fp_fusion": False})
        for block_m in (1, 16):
            yield (f"gemv {label} M<={block_m}", triton_gemv.gemv_kernel, dict(base, x_ptr="*fp16", out_ptr="*fp32"),
                   dict(weight_meta(meta), BLOCK_M=block_m, BLOCK_N=64 if block_m == 1 else 32, BLOCK_K=64 if block_m == 1 else 32,
                        SPLIT_K=4), {"num_warps": 4, "num_stages": 2, "enable_fp_fusion": True})
    meta, zeros = WEIGHTS["int4 asym qzeros"]
    for dtype in ("*fp16", "*bf16", "*fp32"):
        yield (f"gemm int4 {dtype}", triton_gemm.gemm_kernel,
               dict(POINTERS, **INTEGERS, zeros_ptr=zeros, x_ptr=dtype, out_ptr=dtype),
               dict(weight_meta(meta), DOT_FP32=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
               {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": True})


def main() -> int:
    failures = 0
    for capability in (90, 80):
        target = GPUTarget("cuda", capability, 32)
        for label, kernel, types, constexprs, options in variants():
            try:
                compile_variant(kernel, types, constexprs, target, **options)
            except Exception as err:  # noqa: BLE001 - report every failing variant, then fail
                failures += 1
                print(f"sm_{capability} {label}: {type(err).__name__}: {str(err)[:400]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
