// Packed codes -> bf16 weight vectors in registers, one table per stored width (cpu_woq.cpp's layouts).
//
// A column block holds 64 outputs; row pair kp (rows 2kp, 2kp+1 of W^T) of the block is 128 weights,
// expanded to four vectors w[t] of 32 bf16 lanes (columns 16t..16t+15, the two rows of each column
// adjacent: the pair order of VDPBF16PS and of an AMX B-tile row). Codes are read in load units of
// Unit<BITS>::pairs row pairs:
//
// | bits | unit        | per unit                                | field of word l (l = 0..31)                    |
// |------|-------------|-----------------------------------------|------------------------------------------------|
// | 4    | 1 row pair  | 64 B: nibble t                          | row 2kp + (l & 1), column 16t + (l >> 1)       |
// | 2    | 2 row pairs | 64 B: crumb 4u + t                      | row pair 2j + u, same row and column           |
// | 8    | 1 row pair  | 128 B: 32 B per 16 columns, the signed  | (byte 2c: row 2kp, byte 2c + 1: row 2kp + 1)   |
// |      |             | codes - 128 of both rows per column     |                                                |
//
// A word shifted right so that its field starts at bit 0 indexes the table with VPERMW, which reads the
// low 5 bits of each 16-bit lane: the table repeats its 2^bits values to 32 entries, so whatever the
// neighbouring fields leave in bits [bits, 5) does not matter. 8-bit: sign-extended, converted to fp32
// and packed to bf16 (exact: |code - 128| <= 128). Instructions per 32 weights: 4-bit 1 load/4 + 0.75
// shift + 1 VPERMW; 2-bit 1 load/8 + 0.875 shift + 1 VPERMW. 3-bit codes are stored as 4-bit: a 3-bit
// layout (2-bit plane + 1-bit plane merged by VPTERNLOGD, 2 shifts per 32 weights) was built and measured
// 1.26x slower than 4-bit storage at 4096x4096 (2.6x vs 3.3x dense): this kernel is bound by its
// instructions per weight before the bytes it reads.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define TARGET_AVX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))

template <int BITS>
struct Unit {
  static constexpr int pairs = BITS == 2 ? 2 : 1;           // row pairs per load unit
  static constexpr int64_t bytes = BITS == 8 ? 128 : 64;    // bytes per unit
};

struct Raw {
  __m512i a;
  const uint8_t* p;  // 8-bit: the unit itself (its bytes are sign-extended from memory)
};

template <int BITS>
TARGET_AVX inline Raw load_unit(const uint8_t* unit) {
  Raw r;
  r.p = unit;
  if constexpr (BITS != 8) r.a = _mm512_loadu_si512(unit);
  return r;
}

template <int S>
TARGET_AVX inline __m512i shift_right(__m512i v) {
  if constexpr (S > 0) return _mm512_srli_epi16(v, S);
  else return v;
}

template <int BITS, int U, int T>
TARGET_AVX inline __m512i expand_one(const Raw& r, __m512i lut) {
  if constexpr (BITS == 4) {
    return _mm512_permutexvar_epi16(shift_right<4 * T>(r.a), lut);
  } else if constexpr (BITS == 2) {
    return _mm512_permutexvar_epi16(shift_right<2 * (4 * U + T)>(r.a), lut);
  } else {
    const __m128i* q = reinterpret_cast<const __m128i*>(r.p) + 2 * T;  // 32 bytes per 16 columns
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
}

// w[t], t = 0..3: row pair U of the unit
template <int BITS, int U>
TARGET_AVX inline void expand(const Raw& r, __m512i lut, __m512i* w) {
  w[0] = expand_one<BITS, U, 0>(r, lut);
  w[1] = expand_one<BITS, U, 1>(r, lut);
  w[2] = expand_one<BITS, U, 2>(r, lut);
  w[3] = expand_one<BITS, U, 3>(r, lut);
}
