"""Ahead-of-time compilation of the Triton kernels for an NVIDIA target, without a GPU.

``compile_variant(variant, capability)`` lowers one kernel variant through Triton's own compiler and
bundled ptxas to PTX and a cubin (``CompiledKernel.asm``), which is all that ``tests/gpu_compile_check.py``
(does every variant compile?) and ``benchmarks/kernel_static.py`` (what does its inner loop do?) need.
Must run without ``TRITON_INTERPRET`` (callers drop it before importing triton).

A ``Variant`` names a kernel and the constexprs it is specialized on; ``variants()`` enumerates the GEMV
(M = 1, 4 on CUDA cores; 16 through ``tl.dot``) and GEMM kernels for every weight format (uniform 2/3/4/8
bits, symmetric or with folded zeros; NF 2/3/4) and activation dtype the dispatcher sends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_dequant, triton_gemm, triton_gemv

POINTERS = {"codes_ptr": "*i32", "codes_hi_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*fp32",
            "gidx_ptr": "*i32", "lut_ptr": "*fp32"}
INTEGERS = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_om": "i32", "GROUP": "i32",
            "M_BUCKET": "i32"}
ALIGNED = ("N", "K", "stride_xm", "stride_om", "GROUP")  # integers a real launch sees divisible by 16
DTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
# weight formats: (constexprs, group) -- group 128 (uniform) / 64 (nf) rows: tiles inside one group
FORMATS = {
    "int4 asym": (dict(FORMAT=0, BITS=4, FOLDED=True), 128), "int4 sym": (dict(FORMAT=0, BITS=4, FOLDED=False), 128),
    "int3 asym": (dict(FORMAT=0, BITS=3, FOLDED=True), 128), "int2 asym": (dict(FORMAT=0, BITS=2, FOLDED=True), 64),
    "int2 sym": (dict(FORMAT=0, BITS=2, FOLDED=False), 64), "int8 asym": (dict(FORMAT=0, BITS=8, FOLDED=True), 128),
    "int8 sym": (dict(FORMAT=0, BITS=8, FOLDED=False), 128), "nf4": (dict(FORMAT=1, BITS=4, FOLDED=False), 64),
    "nf3": (dict(FORMAT=1, BITS=3, FOLDED=False), 64), "nf2": (dict(FORMAT=1, BITS=2, FOLDED=False), 64),
}


@dataclass
class Variant:
    name: str
    kernel: object  # a triton.jit function, possibly under a heuristics wrapper
    types: dict
    constexprs: dict
    options: dict = field(default_factory=dict)
    words_per_program: int = 0  # packed 32-bit words of every plane one program (or loop iteration) reads
    columns: int = 0  # BLOCK_N


def compile_variant(variant: Variant, capability: int = 90):
    """The CompiledKernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``) for sm_<capability>.

    Specialized as a launch on real shapes is: every pointer 16-byte aligned and the sizes, strides
    and group divisible by 16 (``ALIGNED``), which is what lets the compiler vectorize loads."""
    fn = getattr(variant.kernel, "fn", variant.kernel)  # the @triton.jit function under the heuristics wrapper
    signature = {name: "constexpr" if name in variant.constexprs else variant.types[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in variant.constexprs and (variant.types[name].startswith("*") or name in ALIGNED)}
    source = ASTSource(fn=fn, signature=signature, constexprs=variant.constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=variant.options)


def _words(bits: int, block_k: int, block_n: int) -> int:
    planes = ((2, 16), (1, 32)) if bits == 3 else ((bits, 32 // bits),)
    return sum(block_k // per_word for _, per_word in planes) * block_n


def gemv_variant(label: str, dtype: str, block_m: int, block_n: int = 256, block_k: int = 32, warps: int = 4) -> Variant:
    meta, group = FORMATS[label]
    types = dict(POINTERS, **INTEGERS, x_ptr=f"*{dtype}", out_ptr="*fp32")
    constexprs = dict(meta, USE_GIDX=False, GROUP_ALIGNED=group % block_k == 0, DQ=DTYPES[dtype], DOT_FP32=False,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return Variant(f"gemv {label} {dtype} M={block_m}", triton_gemv.gemv_kernel, types, constexprs,
                   {"num_warps": warps, "num_stages": 1, "enable_fp_fusion": True},
                   _words(meta["BITS"], block_k, block_n), block_n)


def gemm_variant(label: str, dtype: str, block_m: int = 128, block_n: int = 256, block_k: int = 64) -> Variant:
    meta, group = FORMATS[label]
    block_k = min(block_k, group)
    types = dict(POINTERS, **INTEGERS, x_ptr=f"*{dtype}", out_ptr=f"*{dtype}")
    constexprs = dict(meta, USE_GIDX=False, GROUP_ALIGNED=True, DQ=DTYPES[dtype], DOT_FP32=False, BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8)
    return Variant(f"gemm {label} {dtype}", triton_gemm.gemm_kernel, types, constexprs,
                   {"num_warps": 8, "num_stages": 3, "enable_fp_fusion": True},
                   _words(meta["BITS"], block_k, block_n), block_n)


def exact_variant(label: str) -> Variant:
    """The fp32 bit-exact tile kernel (backward and the oracle tests)."""
    meta, _ = FORMATS[label]
    nf = meta["FORMAT"] == 1
    types = dict(POINTERS, **INTEGERS, zeros_ptr="*i32", out_ptr="*fp32", scale_codes_ptr="*u8",
                 scale_scales_ptr="*fp32", offset_ptr="*fp32")
    constexprs = dict(FORMAT=meta["FORMAT"], BITS=meta["BITS"], ZERO_MODE=int(meta["FOLDED"]), USE_GIDX=False,
                      GROUP_ALIGNED=True, LEVELS=255 if nf else 1, NF_BLOCK=64 if nf else 1,
                      SCALE_BLOCK=256 if nf else 1, BLOCK_K=64, BLOCK_N=64)
    return Variant(f"dequant {label}", triton_dequant.dequant_kernel, types, constexprs,
                   {"num_warps": 4, "enable_fp_fusion": False})


def variants(formats=tuple(FORMATS), dtypes=("fp16", "bf16"), block_ms=(1, 4, 16), gemm=True, exact=True):
    """Every GEMV (per M path) and GEMM variant of the given formats and activation dtypes."""
    for label in formats:
        for dtype in dtypes:
            for block_m in block_ms:
                yield gemv_variant(label, dtype, block_m)
            if gemm:
                yield gemm_variant(label, dtype)
        if exact:
            yield exact_variant(label)
