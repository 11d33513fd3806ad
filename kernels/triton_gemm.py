"""Triton GEMM for batches above the GEMV range: ``out[M, N] = x[M, K] @ W^T`` with ``tl.dot``.

Programs tile the output [BLOCK_M, BLOCK_N] (grouped along M for L2 reuse of weight tiles); the K
loop dequantizes a [BLOCK_K, BLOCK_N] weight tile in fp32 (``triton_dequant.dequant_tile``), casts it
to the activation dtype (fp16/bf16: tensor cores; fp32: IEEE fp32 dot, no TF32) and accumulates in
fp32. ``M_BUCKET`` (M rounded up to a power of two) is unused by the body: it keys the autotuner, so
prompts of every length share the tuning of their bucket. ``DOT_FP32`` forces fp32 operands, which the interpreter needs (its bf16 dot is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_dequant import HEURISTICS, dequant_tile


def gemm_configs() -> list[triton.Config]:
    configs = []
    for block_m, block_n, block_k, warps, stages in (
            (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3),
            (64, 128, 32, 4, 4), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 128, 32, 8, 3),
            (128, 256, 32, 8, 3), (64, 256, 32, 8, 4)):
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                      "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return configs


def prune_gemm_configs(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (M, N, K rounded up to powers of two), and for fp32
    activations the widest output tiles (their fp32 dot operands spill registers)."""
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    wide_fp32 = getattr(named_args.get("x_ptr"), "dtype", None) == torch.float32
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(k))
            and not (wide_fp32 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128)]
    return kept or configs[:1]


@triton.heuristics(HEURISTICS)
@triton.jit
def gemm_kernel(x_ptr, out_ptr, M, N, K, stride_xm, stride_om,
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
