"""Compile the Triton kernels ahead of time for NVIDIA targets, without a GPU (run by test_kernels.py).

The interpreter used by the CPU tests accepts constructs that the compiler rejects (and computes bf16 in
fp32); this script lowers a representative set of kernel variants (``compress.kernels.triton_compile``)
to a cubin for sm_90 (H100) and sm_80 (A100) with Triton's own compiler and bundled ptxas: the GEMV at
M = 1 and 16 and the GEMM for every weight format in fp16, the bf16 and fp32 dequantization paths, act
order and tiles that straddle groups, and the fp32 exact tile kernel. It must run without
TRITON_INTERPRET (dropped here). Prints one line per failure and exits 1 if any variant does not compile.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from compress.kernels import triton_compile as tc  # noqa: E402


def checked():
    yield from tc.variants(dtypes=("fp16",), block_ms=(1, 16))
    for label in ("int4 asym", "int3 asym", "nf4"):
        yield tc.gemv_variant(label, "bf16", 4)
        yield tc.gemm_variant(label, "bf16")
    yield tc.gemm_variant("int4 asym", "fp32", block_m=64, block_n=64)
    yield tc.gemv_variant("int8 sym", "fp32", 1)
    unaligned = tc.gemv_variant("nf3", "fp16", 1, block_k=128)  # 128-row tiles over 64-row blocks: per-row scales
    act_order = tc.gemv_variant("int2 sym", "fp16", 16)
    act_order.constexprs.update(USE_GIDX=True, GROUP_ALIGNED=False)
    yield unaligned
    yield act_order


def main() -> int:
    failures = 0
    for capability in (90, 80):
        for variant in checked():
            try:
                tc.compile_variant(variant, capability)
            except Exception as err:  # noqa: BLE001 - report every failing variant, then fail
                failures += 1
                print(f"sm_{capability} {variant.name}: {type(err).__name__}: {str(err)[:400]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
