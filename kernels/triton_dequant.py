"""Triton tile dequantization shared by the GEMV and GEMM kernels (layouts: ``kernels.layout``).

``dequant_tile`` returns the fp32 tile W^T[offs_k, offs_n] ([BLOCK_K, BLOCK_N]) with the same
operations, in the same order, as the torch oracle, so a tile is bit-exact against it wherever the
compiler does not contract a multiply-add (always in the interpreter):

- codes: word ``k // pf`` of a K-major plane, shifted by ``(k % pf) * bits`` (AutoGPTQ's addressing);
  3-bit codes come from a 2-bit plane and a 1-bit plane;
- uniform (FORMAT 0): ``(q - zero) * scale`` with the group ``k // GROUP`` or ``g_idx[k]``; the zero
  is the constant 2^(b-1) (ZERO_MODE 0), read from GPTQ v1 ``qzeros`` plus one (1) or read unpacked (2);
- nf (FORMAT 1): ``lut[q] * (c * (s2 / levels) + offset)`` with the block ``(n*K + k) // NF_BLOCK``,
  its uint8 scale code ``c`` and second-level scale ``s2``: double quantization undone on the fly.

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
def uniform_tile(codes, offs_k, offs_n, mask, N, K, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                 BITS: tl.constexpr, ZERO_MODE: tl.constexpr, USE_GIDX: tl.constexpr):
    if USE_GIDX:
        group = tl.load(gidx_ptr + offs_k, mask=offs_k < K, other=0)
    else:
        group = offs_k // GROUP
    index = group[:, None] * N + offs_n[None, :]
    scale = tl.load(scales_ptr + index, mask=mask, other=0.0).to(tl.float32)
    if ZERO_MODE == 0:
        zero = 1 << (BITS - 1)
    elif ZERO_MODE == 1:  # GPTQ v1 qzeros [G, ceil(N/32)*BITS], packed along N, stored as zero - 1
        PER_WORD: tl.constexpr = 32 // BITS
        row = ((N + 31) // 32) * BITS
        words = tl.load(zeros_ptr + group[:, None] * row + offs_n[None, :] // PER_WORD, mask=mask, other=0)
        zero = ((words >> ((offs_n[None, :] % PER_WORD) * BITS)) & ((1 << BITS) - 1)) + 1
    else:
        zero = tl.load(zeros_ptr + index, mask=mask, other=0).to(tl.int32)
    return (codes - zero).to(tl.float32) * scale


@triton.jit
def nf_tile(codes, offs_k, offs_n, mask, K, lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr,
            NF_BLOCK, SCALE_BLOCK, LEVELS: tl.constexpr):
    flat = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    block = flat // NF_BLOCK
    code = tl.load(scale_codes_ptr + block, mask=mask, other=0).to(tl.float32)
    second = tl.load(scale_scales_ptr + block // SCALE_BLOCK, mask=mask, other=0.0)
    offset = tl.load(offset_ptr)
    scale = code * (second / LEVELS) + offset
    return tl.load(lut_ptr + codes, mask=mask, other=0.0) * scale


@triton.jit
def dequant_tile(offs_k, offs_n, N, K,
                 codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                 lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr, NF_BLOCK, SCALE_BLOCK,
                 FORMAT: tl.constexpr, BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
                 USE_GIDX: tl.constexpr, LEVELS: tl.constexpr):
    """fp32 W^T tile [BLOCK_K, BLOCK_N]; zero outside K x N."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    codes = load_codes(codes_ptr, codes_hi_ptr, offs_k, offs_n, mask, N, BITS)
    if FORMAT == 0:
        tile = uniform_tile(codes, offs_k, offs_n, mask, N, K, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                            BITS, ZERO_MODE, USE_GIDX)
    else:
        tile = nf_tile(codes, offs_k, offs_n, mask, K, lut_ptr, scale_codes_ptr, scale_scales_ptr,
                       offset_ptr, NF_BLOCK, SCALE_BLOCK, LEVELS)
    return tl.where(mask, tile, 0.0)


@triton.jit
def dequant_kernel(out_ptr, N, K,
                   codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr, GROUP,
                   lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr, NF_BLOCK, SCALE_BLOCK,
                   FORMAT: tl.constexpr, BITS: tl.constexpr, ZERO_MODE: tl.constexpr,
                   USE_GIDX: tl.constexpr, LEVELS: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[K, N] (fp32) = W^T, one [BLOCK_K, BLOCK_N] tile per program."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = dequant_tile(offs_k, offs_n, N, K, codes_ptr, codes_hi_ptr, scales_ptr, zeros_ptr, gidx_ptr,
                        GROUP, lut_ptr, scale_codes_ptr, scale_scales_ptr, offset_ptr, NF_BLOCK,
                        SCALE_BLOCK, FORMAT, BITS, ZERO_MODE, USE_GIDX, LEVELS)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], tile, mask=mask)
