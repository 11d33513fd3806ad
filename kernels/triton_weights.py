"""Triton weight tiles for the GEMV and GEMM kernels: packed words loaded once, dequantized in registers.

``weight_tile(k0, ...)`` returns W^T[k0 : k0 + BLOCK_K, offs_n] ([BLOCK_K, BLOCK_N]) in ``DQ`` (the
activations' dtype; fp32 under the interpreter for bf16, whose bf16 arithmetic is wrong):

- words: the tile's ``BLOCK_K / pf`` words of every column are loaded as one [words, BLOCK_N] block
  (N contiguous: coalesced, vectorized along N), then every word is unpacked in registers by a
  broadcast shift ``(word >> (j * bits)) & mask`` into its pf codes, rows ``word * pf + j`` (the GPTQ
  order); 3-bit codes come from the 2-bit and 1-bit planes (two loads per 32 rows x 3 words);
- uniform (FORMAT 0): ``w = fma(q, s, z')`` in DQ (q made a DQ value by ``codes_to``), with ``z' = -z * s`` folded once per matrix in
  ``layout.prepare`` (``zero_folded``, fp32, exact) or ``-2^(b-1) * s`` for symmetric grids; q is an
  exact small integer in DQ, z' is rounded to DQ once (at most 2^-9 of the group's largest weight in
  bf16, what a bf16 copy of the weight would carry);
- nf (FORMAT 1): ``w = lut[q] * s`` through a 16-entry table gathered in registers (``tl.gather``,
  no memory access per weight), with the block scales dequantized once per matrix (``nf_scales``).

Scales and zeros: when the tile lies inside one group (``GROUP_ALIGNED``: the launcher picks
BLOCK_K dividing the group), one [BLOCK_N] row of each is loaded per tile; otherwise (act order,
groups smaller than the tile) one per row, gathered.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def plane_codes(plane_ptr, k0, offs_n, n_mask, N, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes [BLOCK_K, BLOCK_N] of one K-major plane of ``BITS``-bit fields (k0 % (32 / BITS) == 0)."""
    PF: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PF
    offs_w = k0 // PF + tl.arange(0, WORDS)
    w_mask = (offs_w < (K + PF - 1) // PF)[:, None] & n_mask[None, :]
    words = tl.load(plane_ptr + offs_w[:, None] * N + offs_n[None, :], mask=w_mask, other=0,
                    eviction_policy="evict_first")  # [WORDS, BLOCK_N]: each word once
    shifts = tl.arange(0, PF) * BITS
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [WORDS, PF, BLOCK_N]
    return tl.reshape(codes, (BLOCK_K, offs_n.shape[0]))


@triton.jit
def tile_codes(codes_ptr, codes_hi_ptr, k0, offs_n, n_mask, N, K, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    if BITS == 3:
        low = plane_codes(codes_ptr, k0, offs_n, n_mask, N, K, 2, BLOCK_K)
        return low | (plane_codes(codes_hi_ptr, k0, offs_n, n_mask, N, K, 1, BLOCK_K) << 2)
    else:
        return plane_codes(codes_ptr, k0, offs_n, n_mask, N, K, BITS, BLOCK_K)


@triton.jit
def tile_meta(k0, offs_n, N, K, scales_ptr, zeros_ptr, gidx_ptr, GROUP, FORMAT: tl.constexpr, BITS: tl.constexpr,
              FOLDED: tl.constexpr, USE_GIDX: tl.constexpr, GROUP_ALIGNED: tl.constexpr, DQ: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """(scale, folded zero) in DQ for the tile's rows: [1, BLOCK_N] when it sits in one group, else
    [BLOCK_K, BLOCK_N] gathered per row. The zero is unused for NF."""
    n_mask = offs_n < N
    if GROUP_ALIGNED:
        index = (k0 // GROUP) * N + offs_n[None, :]
        mask = n_mask[None, :]
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if USE_GIDX:
            rows = tl.load(gidx_ptr + offs_k, mask=offs_k < K, other=0)
        else:
            rows = offs_k // GROUP
        index = rows[:, None] * N + offs_n[None, :]
        mask = (offs_k < K)[:, None] & n_mask[None, :]
    scale = tl.load(scales_ptr + index, mask=mask, other=0.0).to(DQ)
    if FORMAT == 0 and FOLDED:
        zero = tl.load(zeros_ptr + index, mask=mask, other=0.0).to(DQ)
    else:  # symmetric: z' = -2^(b-1) * s
        zero = scale * (-(1 << (BITS - 1)))
    return scale, zero


@triton.jit
def codes_to(q, DQ: tl.constexpr, BITS: tl.constexpr):
    """Integer codes as DQ values, exactly. fp16: OR the code into the mantissa of 1024 (0x6400) and
    subtract 1024; bf16 codes below 128: the same with 128 (0x4300). One integer OR and one (pairable)
    subtraction instead of an int-to-float conversion, the slow instruction of packed-data kernels
    (Triton issue 4906); 8-bit codes in bf16 and fp32 convert."""
    if DQ == tl.float16:
        return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    elif DQ == tl.bfloat16 and BITS <= 4:
        return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return q.to(DQ)


@triton.jit
def dequant(q, scale, zero, lut_ptr, k0, offs_n, N, K, FORMAT: tl.constexpr, BITS: tl.constexpr, DQ: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] -> weights in DQ (uniform: one FMA; nf: table value times scale)."""
    if FORMAT == 0:
        w = tl.fma(codes_to(q, DQ, BITS), scale, zero)
    else:
        table = tl.load(lut_ptr + tl.arange(0, 1 << BITS)).to(DQ)
        values = tl.gather(table, tl.reshape(q, (BLOCK_K * offs_n.shape[0],)), 0)
        w = tl.reshape(values, (BLOCK_K, offs_n.shape[0])) * scale
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.where((offs_k < K)[:, None] & (offs_n < N)[None, :], w, 0.0)


@triton.jit
def weight_tile(k0, offs_n, N, K, codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, lut_ptr, GROUP,
                FORMAT: tl.constexpr, BITS: tl.constexpr, FOLDED: tl.constexpr, USE_GIDX: tl.constexpr,
                GROUP_ALIGNED: tl.constexpr, DQ: tl.constexpr, BLOCK_K: tl.constexpr):
    """W^T tile [BLOCK_K, BLOCK_N] in DQ; zero outside K x N (see the module docstring)."""
    q = tile_codes(codes_ptr, codes_hi_ptr, k0, offs_n, offs_n < N, N, K, BITS, BLOCK_K)
    scale, zero = tile_meta(k0, offs_n, N, K, scales_ptr, zeros_ptr, gidx_ptr, GROUP, FORMAT, BITS, FOLDED, USE_GIDX,
                            GROUP_ALIGNED, DQ, BLOCK_K)
    return dequant(q, scale, zero, lut_ptr, k0, offs_n, N, K, FORMAT, BITS, DQ, BLOCK_K)


def group_aligned(args: dict) -> bool:
    """Heuristic: every K tile lies inside one group (of scales; NF: of ``nf_scales`` rows)."""
    return not args["USE_GIDX"] and (args["GROUP"] % args["BLOCK_K"] == 0 or args["GROUP"] >= args["K"])


def rows_per_word(bits: int) -> int:
    """Rows a tile must be a multiple of: one word of every plane (3-bit: the 1-bit plane's 32)."""
    return 32 if bits == 3 else 32 // bits


HEURISTICS = {"GROUP_ALIGNED": group_aligned}
