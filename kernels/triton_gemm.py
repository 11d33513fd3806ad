"""Triton GEMM for batches above the GEMV range: ``out[M, N] = x[M, K] @ W^T`` with ``tl.dot``.

Programs tile the output [BLOCK_M, BLOCK_N] (grouped along M for L2 reuse of weight tiles); the K loop
builds each [BLOCK_K, BLOCK_N] weight tile from its packed words loaded once (``triton_weights``),
dequantized in the activations' dtype (fp16/bf16 operands for the tensor cores; fp32 activations: an
IEEE fp32 dot, no TF32), and accumulates in fp32. When the tiles sit inside groups, a group's scales and
folded zeros are loaded once per program, at the group's first tile, and kept in registers for the
others. ``M_BUCKET`` (M rounded up to a power of two) only keys the autotuner, so prompts of every
length share the tuning of their bucket. ``DOT_FP32`` forces fp32 operands and dequantization, which
the interpreter needs (its bf16 arithmetic and dot are wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_weights import HEURISTICS, dequant, rows_per_word, tile_codes, tile_meta


def gemm_configs() -> list[triton.Config]:
    configs = []
    for block_m, block_n, block_k, warps, stages in (
            (16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3),
            (64, 128, 32, 4, 4), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (64, 256, 32, 8, 4), (128, 256, 64, 8, 3)):
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                      "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return configs


def prune_gemm_configs(configs, named_args, **kwargs):
    """Keep tiles not much larger than the problem (M, N, K rounded up to powers of two), whose K tile
    is whole words of every plane and divides the group (when any does), and for fp32 activations not
    the widest output tiles (their fp32 dot operands spill registers)."""
    m, n, k, group = named_args["M"], named_args["N"], named_args["K"], named_args["GROUP"]
    bits = kwargs.get("BITS", named_args.get("BITS"))
    wide_fp32 = getattr(named_args.get("x_ptr"), "dtype", None) == torch.float32
    whole = [c for c in configs if c.kwargs["BLOCK_K"] % rows_per_word(bits) == 0]
    aligned = [c for c in whole if group % c.kwargs["BLOCK_K"] == 0 or group >= k] or whole
    kept = [c for c in aligned
            if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
            and c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(k))
            and not (wide_fp32 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128)]
    return kept or aligned[:1] or configs[:1]


@triton.heuristics(HEURISTICS)
@triton.jit
def gemm_kernel(x_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, lut_ptr, GROUP, M_BUCKET,
                FORMAT: tl.constexpr, BITS: tl.constexpr, FOLDED: tl.constexpr, USE_GIDX: tl.constexpr,
                GROUP_ALIGNED: tl.constexpr, DQ: tl.constexpr, DOT_FP32: tl.constexpr,
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
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    scale, zero = tile_meta(0, offs_n, N, K, scales_ptr, zeros_ptr, gidx_ptr, GROUP, FORMAT, BITS, FOLDED, USE_GIDX,
                            GROUP_ALIGNED, DQ, BLOCK_K)
    for tile in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = tile * BLOCK_K
        if GROUP_ALIGNED:
            if (k0 % GROUP == 0) & (k0 > 0):  # a new group: its scales, once per program
                scale, zero = tile_meta(k0, offs_n, N, K, scales_ptr, zeros_ptr, gidx_ptr, GROUP, FORMAT, BITS,
                                        FOLDED, USE_GIDX, GROUP_ALIGNED, DQ, BLOCK_K)
        else:
            scale, zero = tile_meta(k0, offs_n, N, K, scales_ptr, zeros_ptr, gidx_ptr, GROUP, FORMAT, BITS, FOLDED,
                                    USE_GIDX, GROUP_ALIGNED, DQ, BLOCK_K)
        q = tile_codes(codes_ptr, codes_hi_ptr, k0, offs_n, n_mask, N, K, BITS, BLOCK_K)
        w = dequant(q, scale, zero, lut_ptr, k0, offs_n, N, K, FORMAT, BITS, DQ, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        elif x.dtype == tl.float32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out_mask = (offs_m[:, None] < M) & n_mask[None, :]
    tl.store(out_ptr + rows * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
