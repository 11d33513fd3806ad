"""The GEMV and GEMM kernels as they were when issue 39 started (commit f09f39e), kept for the
benchmarks only: ``kernel_speed.py`` times them beside the current kernels on a GPU and
``kernel_static.py`` compiles them beside the current ones for sm_90. Nothing in the library imports this.

Their design, for the record: every element of a [BLOCK_K, BLOCK_N] tile loads its own packed word
(``triton_dequant.dequant_tile``, the fp32 bit-exact tile that ``triton_dequantize`` still uses), unpacks
and dequantizes in fp32, and reads scales per element unless the tile lies inside one group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels.triton_dequant import HEURISTICS, dequant_tile
from compress.kernels.triton_launch import exact_args

# the old quick GEMV space (the GPU check's) and the old GEMM tiles
GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=4, num_stages=2)
                for n, k, s in ((64, 64, 1), (64, 128, 1), (128, 64, 1), (128, 128, 1), (256, 64, 1), (64, 64, 4),
                                (64, 128, 4), (128, 64, 2), (32, 128, 8), (32, 32, 1), (32, 32, 4))]
GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for m, n, k, w, s in ((16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3),
                                      (64, 128, 32, 4, 4), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
                                      (128, 128, 32, 8, 3), (128, 256, 32, 8, 3), (64, 256, 32, 8, 4))]
KEY = ["N", "K", "FORMAT", "BITS", "ZERO_MODE", "USE_GIDX", "GROUP", "NF_BLOCK"]


@triton.heuristics(HEURISTICS)
@triton.jit
def legacy_gemv_kernel(x_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr,
                NF_BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr, FORMAT: tl.constexpr, BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
                USE_GIDX: tl.constexpr, LEVELS: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    partial = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # BLOCK_M == 1: reduce once, after the loop
    for tile in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        w = dequant_tile(tile * BLOCK_K, offs_n, N, K, codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr,
                         GROUP, lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr, NF_BLOCK,
                         SCALE_BLOCK, FORMAT, BITS, ZERO_MODE, USE_GIDX, LEVELS, GROUP_ALIGNED, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=x_mask, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            partial += w * tl.reshape(x, (BLOCK_K, 1))
        else:
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    if BLOCK_M == 1:
        acc = tl.reshape(tl.sum(partial, axis=0), (1, BLOCK_N))
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = out_ptr + rows * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=out_mask)
    else:  # partial sums of the K splits; their order (hence the last bits) varies between runs
        tl.atomic_add(out, acc, mask=out_mask, sem="relaxed")


@triton.heuristics(HEURISTICS)
@triton.jit
def legacy_gemm_kernel(x_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr, M_BUCKET,
                NF_BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr, FORMAT: tl.constexpr, BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
                USE_GIDX: tl.constexpr, LEVELS: tl.constexpr, GROUP_ALIGNED: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)[:, None]  # M * N may exceed 2^31 (long prompts times a large vocabulary)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        w = dequant_tile(tile * BLOCK_K, offs_n, N, K, codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr,
                         GROUP, lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr, NF_BLOCK,
                         SCALE_BLOCK, FORMAT, BITS, ZERO_MODE, USE_GIDX, LEVELS, GROUP_ALIGNED, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        elif x.dtype == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out = out_ptr + rows * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

legacy_gemv = triton.autotune(configs=GEMV_CONFIGS, key=["BLOCK_M", *KEY], reset_to_zero=["out_ptr"])(legacy_gemv_kernel)
legacy_gemm = triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", *KEY])(legacy_gemm_kernel)


def legacy_matmul(x: torch.Tensor, weight) -> torch.Tensor:
    """``x @ W^T`` through the old kernels (CUDA, autotuned): GEMV for M <= 16, GEMM above."""
    (m, k), n = x.shape, weight.shape[0]
    args, meta = exact_args(weight)
    if m <= 16:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
        grid = lambda c: (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])  # noqa: E731
        legacy_gemv[grid](x, out, m, n, k, x.stride(0), out.stride(0), *args, **meta,
                          BLOCK_M=max(1, triton.next_power_of_2(m)), enable_fp_fusion=True)
        return out.to(x.dtype)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)  # noqa: E731
    legacy_gemm[grid](x, out, m, n, k, x.stride(0), out.stride(0), *args, M_BUCKET=triton.next_power_of_2(m), **meta,
                      DOT_FP32=False, enable_fp_fusion=True)
    return out
