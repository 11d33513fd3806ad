"""Triton fp32 tile dequantization, bit-exact against the torch oracle (layouts: ``kernels.layout``).

Used by ``triton_dequantize`` (the backward of the custom ops recomputes W^T from it) and by the tests
that hold the Triton arithmetic to the oracle bit for bit; the GEMV and GEMM kernels build their tiles in
half precision from ``triton_weights`` instead (each packed word loaded once).

``dequant_tile`` returns the fp32 tile W^T[offs_k, offs_n] ([BLOCK_K, BLOCK_N]) with the same
operations, in the same order, as the torch oracle, so a tile is bit-exact against it wherever the
compiler does not contract a multiply-add (always in the interpreter):

- codes: word ``k // pf`` of a K-major plane, shifted by ``(k % pf) * bits`` (AutoGPTQ's addressing);
  3-bit codes come from a 2-bit plane and a 1-bit plane;
- uniform (FORMAT 0): ``(q - zero) * scale`` with the group ``k // GROUP`` or ``g_idx[k]``; the zero
  is the constant 2^(b-1) (ZERO_MODE 0), read from GPTQ v1 ``qzeros`` plus one (1), read unpacked (2),
  or a float read from fp16 ``zeros`` (3, ``float_zero`` configs: ``(q - zero) * scale`` in fp32);
- nf (FORMAT 1): ``lut[q] * (c * (s2 / levels) + offset)`` with the block ``(n*K + k) // NF_BLOCK``,
  its uint8 scale code ``c`` and second-level scale ``s2``: double quantization undone on the fly.

When a K tile lies inside one scale group (``GROUP_ALIGNED``, set by the ``group_aligned`` heuristic
from the tile size the autotuner picked), scales, zeros and NF block scales are loaded once per
column instead of once per weight.

``dequant_kernel`` writes dequantized tiles to memory; tests compare it with the oracle.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes(codes_ptr, codes_hi_ptr, offs_k, offs_n, mask, N, BITS: tl.constexpr):
    """Integer codes [BLOCK_K, BLOCK_N] (int32) of rows offs_k, columns offs_n."""
    if BITS == 3:
        low = tl.load(codes_ptr + (offs_k[:, None] // 16) * N + offs_n[None, :], mask=mask, other=0)
        high = tl.load(codes_hi_ptr + (offs_k[:, None] // 32) * N + offs_n[None, :], mask=mask, other=0)
        low = (low >> ((offs_k[:, None] % 16) * 2)) & 3
        high = (high >> (offs_k[:, None] % 32)) & 1
        return low | (high << 2)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        words = tl.load(codes_ptr + (offs_k[:, None] // PER_WORD) * N + offs_n[None, :], mask=mask, other=0)
        return (words >> ((offs_k[:, None] % PER_WORD) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def uniform_tile(codes, k_start, offs_k, offs_n, mask, N, K, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                 BITS: tl.constexpr, ZERO_MODE: tl.constexpr, USE_GIDX: tl.constexpr,
                 GROUP_ALIGNED: tl.constexpr):
    if GROUP_ALIGNED:  # the tile lies inside one group: one row of scales and zeros, broadcast
        group_rows = tl.zeros((1,), dtype=tl.int32) + k_start // GROUP
        col_mask = (offs_n < N)[None, :]
    elif USE_GIDX:
        group_rows = tl.load(gidx_ptr + offs_k, mask=offs_k < K, other=0)
        col_mask = mask
    else:
        group_rows = offs_k // GROUP
        col_mask = mask
    index = group_rows[:, None] * N + offs_n[None, :]
    scale = tl.load(scales_ptr + index, mask=col_mask, other=0.0).to(tl.float32)
    if ZERO_MODE == 0:
        tile = (codes - (1 << (BITS - 1))).to(tl.float32) * scale
    elif ZERO_MODE == 1:  # GPTQ v1 qzeros [G, ceil(N/32)*BITS], packed along N, stored as zero - 1
        PER_WORD: tl.constexpr = 32 // BITS
        row = ((N + 31) // 32) * BITS
        words = tl.load(zeros_ptr + group_rows[:, None] * row + offs_n[None, :] // PER_WORD, mask=col_mask, other=0)
        zero = ((words >> ((offs_n[None, :] % PER_WORD) * BITS)) & ((1 << BITS) - 1)) + 1
        tile = (codes - zero).to(tl.float32) * scale
    elif ZERO_MODE == 2:
        tile = (codes - tl.load(zeros_ptr + index, mask=col_mask, other=0).to(tl.int32)).to(tl.float32) * scale
    else:  # 3: float zeros, fp16 [G, N]
        tile = (codes.to(tl.float32) - tl.load(zeros_ptr + index, mask=col_mask, other=0.0).to(tl.float32)) * scale
    return tile


@triton.jit
def nf_tile(codes, k_start, offs_k, offs_n, mask, N, K, lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr,
            NF_BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr, LEVELS: tl.constexpr,
            GROUP_ALIGNED: tl.constexpr):
    if GROUP_ALIGNED:  # K % NF_BLOCK == 0 and the tile lies inside one block of every column
        block = (offs_n[None, :].to(tl.int64) * (K // NF_BLOCK) + k_start // NF_BLOCK)
        block_mask = (offs_n < N)[None, :]
    else:
        block = (offs_n[None, :].to(tl.int64) * K + offs_k[:, None]) // NF_BLOCK
        block_mask = mask
    code = tl.load(scale_codes_ptr + block, mask=block_mask, other=0).to(tl.float32)
    second = tl.load(scale_scales_ptr + block // SCALE_BLOCK, mask=block_mask, other=0.0)
    offset = tl.load(offset_ptr)
    scale = code * tl.math.div_rn(second, tl.full(second.shape, LEVELS, tl.float32)) + offset  # IEEE division
    return tl.load(lut_ptr + codes, mask=mask, other=0.0) * scale


@triton.jit
def dequant_tile(k_start, offs_n, N, K,
                 codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                 lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr,
                 NF_BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                 FORMAT: tl.constexpr, BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
                 USE_GIDX: tl.constexpr, LEVELS: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """fp32 W^T tile [BLOCK_K, BLOCK_N] of rows k_start + [0, BLOCK_K); zero outside K x N."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    codes = load_codes(codes_ptr, codes_hi_ptr, offs_k, offs_n, mask, N, BITS)
    if FORMAT == 0:
        tile = uniform_tile(codes, k_start, offs_k, offs_n, mask, N, K, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                            BITS, ZERO_MODE, USE_GIDX, GROUP_ALIGNED)
    else:
        tile = nf_tile(codes, k_start, offs_k, offs_n, mask, N, K, lut_ptr, scale_codes_ptr, scale_scales_ptr,
                       offset_ptr, NF_BLOCK, SCALE_BLOCK, LEVELS, GROUP_ALIGNED)
    return tl.where(mask, tile, 0.0)


def group_aligned(args: dict) -> bool:
    """Heuristic: every K tile lies inside one scale group (uniform) or one block per column (nf),
    so a tile needs one row of scales instead of one per weight."""
    if args["FORMAT"] == 0:
        return not args["USE_GIDX"] and args["GROUP"] % args["BLOCK_K"] == 0
    return args["K"] % args["NF_BLOCK"] == 0 and args["NF_BLOCK"] % args["BLOCK_K"] == 0


HEURISTICS = {"GROUP_ALIGNED": group_aligned}


@triton.heuristics(HEURISTICS)
@triton.jit
def dequant_kernel(out_ptr, N, K,
                   codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                   lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr,
                   NF_BLOCK: tl.constexpr, SCALE_BLOCK: tl.constexpr, FORMAT: tl.constexpr, BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
                   USE_GIDX: tl.constexpr, LEVELS: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[K, N] (fp32) = W^T, one [BLOCK_K, BLOCK_N] tile per program."""
    k_start = tl.program_id(0) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = dequant_tile(k_start, offs_n, N, K, codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr,
                        GROUP, lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr, NF_BLOCK,
                        SCALE_BLOCK, FORMAT, BITS, ZERO_MODE, USE_GIDX, LEVELS, GROUP_ALIGNED, BLOCK_K)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :], tile, mask=mask)
