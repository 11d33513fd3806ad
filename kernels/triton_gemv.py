"""Triton GEMV with split-K for small batches (M <= 16): ``out[M, N] += x[M, K] @ W^T``.

Each program owns BLOCK_N output columns and every SPLIT_K-th K tile; it dequantizes the tile once
(``triton_dequant.dequant_tile``) and reduces ``x[:, :, None] * w[None]`` over K for all BLOCK_M rows
(BLOCK_M = next power of two >= M); at BLOCK_M = 1 it keeps a [BLOCK_K, BLOCK_N] running product
and reduces once after the K loop (no cross-thread reduction per step). At batch 1 no tensor-core
shape fits, so the kernel runs on CUDA cores, bound by the bytes of the packed weight it streams. With SPLIT_K > 1 the
partial sums meet in an fp32 output through atomics (the launcher zeroes it; autotuning resets it).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .triton_dequant import HEURISTICS, dequant_tile

MAX_M = 16
MAX_TILE_PRODUCTS = 16 * 1024  # BLOCK_M * BLOCK_K * BLOCK_N live fp32 products: ~128 per thread at 4 warps


# ``COMPRESS_TRITON_TUNE=quick``: 11 configs instead of 96 for the first call's autotuning (each config
# is one compile per format, about a second): the GPU check's time limit; the best quick config is at
# most as fast as the best of all 96.
QUICK_GEMV = ((64, 64, 1), (64, 128, 1), (128, 64, 1), (128, 128, 1), (256, 64, 1), (64, 64, 4), (64, 128, 4),
              (128, 64, 2), (32, 128, 8), (32, 32, 1), (32, 32, 4))


def gemv_configs(space: str | None = None) -> list[triton.Config]:
    """Autotuning space: ``full`` (default) or ``quick`` (``COMPRESS_TRITON_TUNE``, read at import)."""
    space = space or os.environ.get("COMPRESS_TRITON_TUNE", "full")
    if space not in ("full", "quick"):
        raise ValueError(f"COMPRESS_TRITON_TUNE is full or quick, not {space!r}")
    shapes = QUICK_GEMV if space == "quick" else [(n, k, s) for n in (32, 64, 128, 256) for k in (32, 64, 128)
                                                    for s in (1, 2, 4, 8)]
    warps = (4,) if space == "quick" else (2, 4)
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=2)
            for n, k, s in shapes for w in warps]


def prune_gemv_configs(configs, named_args, **kwargs):
    """Drop configs that waste work on this shape: tiles far wider than N or K, more K splits than
    K tiles, or too many live products per thread for BLOCK_M rows (register spills)."""
    n, k, block_m = named_args["N"], named_args["K"], kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    kept = []
    for config in configs:
        meta = config.kwargs
        tiles_k = triton.cdiv(k, meta["BLOCK_K"])
        if meta["BLOCK_N"] > max(64, triton.next_power_of_2(n)) or meta["BLOCK_K"] > max(32, triton.next_power_of_2(k)):
            continue
        if meta["SPLIT_K"] > tiles_k or block_m * meta["BLOCK_N"] * meta["BLOCK_K"] > MAX_TILE_PRODUCTS:
            continue
        kept.append(config)
    return kept or configs[:1]


@triton.heuristics(HEURISTICS)
@triton.jit
def gemv_kernel(x_ptr, out_ptr, M, N, K, stride_xm, stride_om,
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
