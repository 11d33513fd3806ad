"""Triton GEMV for small batches (M <= 16), split over K: ``out[M, N] += x[M, K] @ W^T``.

The memory-bound design (gemlite's "revsplitK"): the grid is (N / BLOCK_N, K / BLOCK_K) and every
program owns one [BLOCK_K, BLOCK_N] tile of W^T, with no loop: it loads the tile's packed words once
(``triton_weights.weight_tile``: a few words per column across a wide, coalesced N tile, unpacked in
registers, dequantized in the activations' dtype, scales and zeros read once per tile when the tile sits
in one group), multiplies it by the tile's slice of x and adds the [BLOCK_M, BLOCK_N] partial sums into
an fp32 output with atomics (the launcher zeroes it; autotuning resets it). M <= 4 multiplies on CUDA
cores (``tl.sum`` over K of fp32 products: no tensor-core tile fits a vector); 4 < M <= 16 runs the
same tile through ``tl.dot`` with BLOCK_M = 16. The order of the atomic adds (hence the last bits) varies
between runs.

Autotuning: BLOCK_N 64-512, BLOCK_K 1-4 words per column (always dividing the group when the group
allows it), 1-4 warps, pruned by shape (``prune_gemv_configs``); results cached per key (N, K, format,
group, M bucket) by ``triton.autotune``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .triton_weights import HEURISTICS, rows_per_word, weight_tile

MAX_M = 16
MAX_LIVE = 64  # fp32 products per thread for M <= 4 (BLOCK_M * BLOCK_K * BLOCK_N / threads): no spills

# ``COMPRESS_TRITON_TUNE=quick``: a small space for the first call's autotuning (each config is one
# compile per format): the GPU check's time limit.
QUICK_GEMV = ((128, 32, 2), (256, 32, 4), (256, 64, 4), (512, 32, 4), (128, 64, 2), (64, 32, 1))


def gemv_configs(space: str | None = None) -> list[triton.Config]:
    """Autotuning space: ``full`` (default) or ``quick`` (``COMPRESS_TRITON_TUNE``, read at import)."""
    space = space or os.environ.get("COMPRESS_TRITON_TUNE", "full")
    if space not in ("full", "quick"):
        raise ValueError(f"COMPRESS_TRITON_TUNE is full or quick, not {space!r}")
    shapes = QUICK_GEMV if space == "quick" else [(n, k, w) for n in (64, 128, 256, 512) for k in (16, 32, 64, 128)
                                                     for w in (1, 2, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1) for n, k, w in shapes]


def prune_gemv_configs(configs, named_args, **kwargs):
    """Keep configs whose K tile is whole words of every plane and divides the group (when any does),
    whose N tile is not far wider than N, and whose live fp32 products fit the registers."""
    n, k, bits = named_args["N"], named_args["K"], kwargs.get("BITS", named_args.get("BITS"))
    group = named_args["GROUP"]
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    whole = [c for c in configs if c.kwargs["BLOCK_K"] % rows_per_word(bits) == 0]
    aligned = [c for c in whole if group % c.kwargs["BLOCK_K"] == 0 or group >= k] or whole
    kept = [c for c in aligned
            if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
            and c.kwargs["BLOCK_K"] <= max(rows_per_word(bits), triton.next_power_of_2(k))
            and (block_m > 4 or block_m * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] <= MAX_LIVE * 32 * c.num_warps)]
    return kept or aligned[:1] or configs[:1]


@triton.heuristics(HEURISTICS)
@triton.jit
def gemv_kernel(x_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, lut_ptr, GROUP,
                FORMAT: tl.constexpr, BITS: tl.constexpr, FOLDED: tl.constexpr, USE_GIDX: tl.constexpr,
                GROUP_ALIGNED: tl.constexpr, DQ: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    k0 = tl.program_id(1) * BLOCK_K
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = weight_tile(k0, offs_n, N, K, codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, lut_ptr, GROUP,
                    FORMAT, BITS, FOLDED, USE_GIDX, GROUP_ALIGNED, DQ, BLOCK_K)
    rows = offs_m.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                other=0.0, eviction_policy="evict_last")
    if BLOCK_M == 1:
        acc = tl.reshape(tl.sum(w.to(tl.float32) * tl.reshape(x.to(tl.float32), (BLOCK_K, 1)), axis=0), (1, BLOCK_N))
    elif BLOCK_M <= 4:
        acc = tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    elif DOT_FP32:  # the interpreter: fp32 operands (its half-precision dot is wrong)
        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    elif x.dtype == tl.float32:
        acc = tl.dot(x, w, input_precision="ieee")
    else:
        acc = tl.dot(x, w.to(x.dtype))
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.atomic_add(out_ptr + rows * stride_om + offs_n[None, :], acc, mask=out_mask, sem="relaxed")
