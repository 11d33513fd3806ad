// Weight-only-quantized matmul for x86 CPUs: y[M, N] = x[M, K] @ W^T, W given as integer codes with
// per-group scales (the layout is built by kernels/cpu_native.py; read its docstring first).
//
// Codes live in column blocks of 64 outputs. Inside a block, row pair kp (rows 2kp and 2kp+1 of W^T)
// is one contiguous run of 64 bytes (4-bit) or 128 bytes (8-bit) that expands in registers to four
// vectors of 32 bf16 lanes in the pair order of VDPBF16PS and of an AMX B-tile row (expand_run).
// The table holds code - z0 (uniform: exact small integers) or the NF codebook rounded to bf16, so the
// products are exact in fp32 for uniform codes; each group's sum is scaled once in fp32:
//   y[m, n] = sum_g s[g, n] * (sum_{k in g} x[m, k] * lut[q[k, n]] - (z[g, n] - z0) * xsum[m, g])
// (the zero term only for grids whose zero is not z0: asymmetric and float zeros).
// Paths: M <= 4 keeps the expanded weights in registers and runs VDPBF16PS for each row (AVX512-BF16);
// M > 4 expands a chunk of up to 128 rows into B tiles once and runs AMX TDPBF16PS for every 16-row
// block of x (AMX-BF16), or the register path four rows at a time where there is no AMX.
// Threads: at::parallel_for over column blocks (torch's intra-op pool, torch.get_num_threads()).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>

namespace {

constexpr int64_t kBlockN = 64;    // outputs per column block: 4 vectors of 16 fp32 lanes
constexpr int64_t kTileK = 32;     // rows of W^T per AMX tile (16 row pairs)
constexpr int64_t kChunkK = 128;   // rows expanded at once on the AMX path (4 tiles per 16 columns)
constexpr int64_t kPrefetch = 32;  // row pairs ahead (2 KiB of 4-bit codes): the streams outrun the hardware prefetcher

struct Features {
  bool avx512bf16 = false;
  bool amx = false;
};

uint64_t xcr0() {
  uint32_t lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

Features detect() {
  Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return f;  // OSXSAVE
  if ((xcr0() & 0xE6) != 0xE6) return f;                                 // the OS saves zmm state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31));  // F, BW, VL
  const bool amx_hw = (d & (1u << 22)) && (d & (1u << 24));                        // AMX-BF16, AMX-TILE
  unsigned a1 = 0, b1, c1, d1;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  f.avx512bf16 = avx512 && (a1 & (1u << 5));
  // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
  f.amx = f.avx512bf16 && amx_hw && syscall(SYS_arch_prctl, 0x1023, 18) == 0 && (xcr0() & 0x60000) == 0x60000;
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

struct Problem {
  const uint16_t* x;     // bf16 bits [Mp, Kp], zero padded
  const float* xsum;     // [Mp, Kp / segment]: x summed over each segment, or null (no zero term)
  const uint8_t* codes;  // [NB, Kp / 2, run]
  const void* scales;    // [G, Np], fp16 or fp32
  const uint16_t* zeros; // fp16 [G, Np] zero points, or null
  const uint16_t* lut;   // 32 bf16 (4-bit codes)
  float* acc;            // [Mp, Np]
  int64_t M, Kp, Np, group;
  int64_t segment;       // rows per scaled partial sum: the group (registers) or the AMX chunk
  float z0;              // the zero the table already subtracts
  int bits;
  bool half_scales;
};

#define TARGET_AVX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
#define TARGET_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma,amx-tile,amx-bf16")))

// The 128 weights of one row pair of a column block (4 vectors of 16 columns x 2 rows), in VDPBF16PS
// pair order. 4-bit: the 64-byte run holds 32 words; nibble t of word l is the code of row 2kp + (l & 1),
// column 16t + (l >> 1), so a word shifted right by 4t indexes the table with its low nibble (VPERMW
// reads 5 bits: the table is the 16 values twice, so the next nibble's low bit does not matter):
// one load, three shifts and four VPERMW. 8-bit: 32 bytes per 16 columns, both rows' signed codes per
// column; sign-extended, converted to fp32 and packed to bf16 (exact: |code - 128| <= 128).
TARGET_AVX inline void expand_run(const uint8_t* p, int bits, __m512i lut, __m512i* w) {
  if (bits == 4) {
    const __m512i raw = _mm512_loadu_si512(p);
    w[0] = _mm512_permutexvar_epi16(raw, lut);
    w[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 4), lut);
    w[2] = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 8), lut);
    w[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 12), lut);
    return;
  }
  for (int j = 0; j < 4; ++j) {
    const __m128i* q = reinterpret_cast<const __m128i*>(p + 32 * j);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
    w[j] = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
}

TARGET_AVX inline __m512 load_scale(const Problem& p, int64_t offset) {
  if (p.half_scales)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p.scales) + offset)));
  return _mm512_loadu_ps(static_cast<const float*>(p.scales) + offset);
}

// acc[m, n0 + 16j + i] += s * (part - (z - z0) * xsum) for the block's 4 vectors of row m; part sums
// segment seg (rows [seg * p.segment, (seg + 1) * p.segment)) of group g
TARGET_AVX inline void apply_group(const Problem& p, int64_t m, int64_t g, int64_t seg, int64_t n0, const __m512* part) {
  float* out = p.acc + m * p.Np + n0;
  const int64_t row = g * p.Np + n0;
  const __m512 xs = _mm512_set1_ps(p.zeros ? -p.xsum[m * (p.Kp / p.segment) + seg] : 0.f);
  const __m512 z0 = _mm512_set1_ps(p.z0);
  for (int j = 0; j < 4; ++j) {
    __m512 sum = part[j];
    if (p.zeros) {
      const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.zeros + row + 16 * j)));
      sum = _mm512_fmadd_ps(_mm512_sub_ps(z, z0), xs, sum);
    }
    _mm512_storeu_ps(out + 16 * j, _mm512_fmadd_ps(sum, load_scale(p, row + 16 * j), _mm512_loadu_ps(out + 16 * j)));
  }
}

// part[m][j] += the row pair's weights times x's pair, for MB rows
template <int MB>
TARGET_AVX inline void dot_pair(__m512 (*part)[4], const __m512i* w, const uint32_t* x, int64_t stride, int64_t kp) {
  for (int m = 0; m < MB; ++m) {
    const __m512bh xp = (__m512bh)_mm512_set1_epi32(int(x[m * stride + kp]));
    for (int j = 0; j < 4; ++j) part[m][j] = _mm512_dpbf16_ps(part[m][j], (__m512bh)w[j], xp);
  }
}

// Rows [m0, m0 + MB) of column block nb, weights expanded in registers (M <= 4, or no AMX). With one
// or two rows, even and odd row pairs feed separate accumulators (VDPBF16PS's latency).
template <int MB>
TARGET_AVX void register_block(const Problem& p, int64_t nb, int64_t m0) {
  constexpr int U = MB <= 2 ? 2 : 1;
  const int64_t run = kBlockN * p.bits / 4;  // bytes per row pair in a block
  const uint8_t* codes = p.codes + nb * (p.Kp / 2) * run;
  const __m512i lut = _mm512_loadu_si512(p.lut);
  const int64_t pairs = p.group / 2, stride = p.Kp / 2;
  const uint32_t* x = reinterpret_cast<const uint32_t*>(p.x) + m0 * stride;  // bf16 pairs
  for (int64_t g = 0; g < p.Kp / p.group; ++g) {
    __m512 part[U][MB][4];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < 4; ++j) part[u][m][j] = _mm512_setzero_ps();
    const int64_t end = (g + 1) * pairs;
    int64_t kp = g * pairs;
    for (; kp + U <= end; kp += U)
      for (int u = 0; u < U; ++u) {
        _mm_prefetch(reinterpret_cast<const char*>(codes + (kp + u + kPrefetch) * run), _MM_HINT_T0);
        __m512i w[4];
        expand_run(codes + (kp + u) * run, p.bits, lut, w);
        dot_pair<MB>(part[u], w, x, stride, kp + u);
      }
    for (; kp < end; ++kp) {
      __m512i w[4];
      expand_run(codes + kp * run, p.bits, lut, w);
      dot_pair<MB>(part[0], w, x, stride, kp);
    }
    for (int m = 0; m < MB; ++m) {
      for (int u = 1; u < U; ++u)
        for (int j = 0; j < 4; ++j) part[0][m][j] = _mm512_add_ps(part[0][m][j], part[u][m][j]);
      apply_group(p, m0 + m, g, g, nb * kBlockN, part[0][m]);
    }
  }
}

TARGET_AVX void register_rows(const Problem& p, int64_t nb) {
  for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
    switch (std::min<int64_t>(4, p.M - m0)) {
      case 1: register_block<1>(p, nb, m0); break;
      case 2: register_block<2>(p, nb, m0); break;
      case 3: register_block<3>(p, nb, m0); break;
      default: register_block<4>(p, nb, m0); break;
    }
  }
}

// GCC does not tell its optimizer that tile loads and stores touch memory (ldtilecfg's operand, the
// expanded B tiles, the stored C tiles): without a barrier it drops or reorders the plain accesses.
inline void memory_barrier() { asm volatile("" ::: "memory"); }

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-3: C for the block's four 16-column groups; 4: A (16 rows of x); 5, 6: B
TARGET_AMX void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  memory_barrier();
  _tile_loadconfig(&cfg);
}

TARGET_AMX void release_tiles() { _tile_release(); }

#define AMX_STEP(C, B)                                \
  _tile_loadd(B, bufs + ((kt * 4 + C) << 9), 64);     \
  _tile_dpbf16ps(C, 4, B);

// Column block nb with AMX: each chunk of rows (inside one group) is expanded once into B tiles and
// multiplied with every 16-row block of x; the chunk's fp32 sums are scaled into acc.
TARGET_AMX void tile_block(const Problem& p, int64_t nb, uint16_t* bufs, float* cbuf) {
  const int64_t run = kBlockN * p.bits / 4, n0 = nb * kBlockN, chunk = p.segment;
  const uint8_t* codes = p.codes + nb * (p.Kp / 2) * run;
  const __m512i lut = _mm512_loadu_si512(p.lut);
  for (int64_t k0 = 0; k0 < p.Kp; k0 += chunk) {
    const int64_t tiles = std::min(chunk, p.Kp - k0) / kTileK, g = k0 / p.group, seg = k0 / chunk;
    for (int64_t kt = 0; kt < tiles; ++kt)
      for (int r = 0; r < 16; ++r) {
        const uint8_t* row = codes + ((k0 + kt * kTileK) / 2 + r) * run;
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * run), _MM_HINT_T0);
        __m512i w[4];
        expand_run(row, p.bits, lut, w);
        for (int j = 0; j < 4; ++j) _mm512_store_si512(bufs + ((kt * 4 + j) << 9) + r * 32, w[j]);
      }
    memory_barrier();
    for (int64_t m0 = 0; m0 < p.M; m0 += 16) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int64_t kt = 0; kt < tiles; ++kt) {
        _tile_loadd(4, p.x + m0 * p.Kp + k0 + kt * kTileK, p.Kp * 2);
        AMX_STEP(0, 5) AMX_STEP(1, 6) AMX_STEP(2, 5) AMX_STEP(3, 6)
      }
      _tile_stored(0, cbuf, 256); _tile_stored(1, cbuf + 16, 256);
      _tile_stored(2, cbuf + 32, 256); _tile_stored(3, cbuf + 48, 256);
      memory_barrier();
      for (int64_t m = m0; m < std::min(p.M, m0 + 16); ++m) {
        __m512 part[4];
        for (int j = 0; j < 4; ++j) part[j] = _mm512_loadu_ps(cbuf + (m - m0) * 64 + 16 * j);
        apply_group(p, m, g, seg, n0, part);
      }
    }
  }
}

// acc (+ bias) of the block's columns into out, in out's dtype
void finish_block(const Problem& p, int64_t nb, const float* bias, at::Tensor& out) {
  const int64_t n0 = nb * kBlockN, N = out.size(1), width = std::min(kBlockN, N - n0);
  for (int64_t m = 0; m < p.M; ++m) {
    float* row = p.acc + m * p.Np + n0;
    if (bias)
      for (int64_t i = 0; i < width; ++i) row[i] += bias[n0 + i];
    if (out.scalar_type() == at::kFloat) {
      std::memcpy(out.data_ptr<float>() + m * N + n0, row, width * sizeof(float));
    } else if (out.scalar_type() == at::kBFloat16) {
      auto* dst = out.data_ptr<at::BFloat16>() + m * N + n0;
      for (int64_t i = 0; i < width; ++i) dst[i] = at::BFloat16(row[i]);
    } else {
      auto* dst = out.data_ptr<at::Half>() + m * N + n0;
      for (int64_t i = 0; i < width; ++i) dst[i] = at::Half(row[i]);
    }
  }
}

// Row m of x (columns through perm when given) rounded to bf16 into xb [.., Kp], and its sums over
// segments of `segment` rows (of the rounded values) into xsum when given
template <typename T>
void pack_row(const T* x, const int64_t* perm, int64_t K, uint16_t* xb, float* xsum, int64_t segment) {
  for (int64_t s0 = 0; s0 < K; s0 += segment) {
    float sum = 0.f;
    for (int64_t k = s0; k < std::min(K, s0 + segment); ++k) {
      const at::BFloat16 v(static_cast<float>(x[perm ? perm[k] : k]));
      xb[k] = v.x;
      sum += static_cast<float>(v);
    }
    if (xsum) xsum[s0 / segment] = sum;
  }
}

void pack_input(const at::Tensor& x, const int64_t* perm, uint16_t* xb, float* xsum, int64_t Kp, int64_t segment) {
  const int64_t M = x.size(0), K = x.size(1), sums = Kp / segment;
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float* s = xsum ? xsum + m * sums : nullptr;
      if (x.scalar_type() == at::kBFloat16) pack_row(x.data_ptr<at::BFloat16>() + m * K, perm, K, xb + m * Kp, s, segment);
      else if (x.scalar_type() == at::kHalf) pack_row(x.data_ptr<at::Half>() + m * K, perm, K, xb + m * Kp, s, segment);
      else pack_row(x.data_ptr<float>() + m * K, perm, K, xb + m * Kp, s, segment);
    }
  });
}

at::Tensor woq_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const at::Tensor& lut, const std::optional<at::Tensor>& perm,
                      const std::optional<at::Tensor>& bias, int64_t bits, int64_t group, double z0, int64_t out_features) {
  const Features& f = features();
  TORCH_CHECK(f.avx512bf16, "compress_cpu::woq_linear needs AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
              "x must be bf16, fp16 or fp32");
  TORCH_CHECK(bits == 4 || bits == 8, "codes are 4- or 8-bit");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 3, "codes: uint8 [NB, Kp/2, run]");
  TORCH_CHECK((scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf) && scales.is_contiguous(),
              "scales: fp16 or fp32 [G, Np]");
  TORCH_CHECK(lut.numel() == 32 && lut.element_size() == 2, "lut: 32 bf16");
  const int64_t M = x.size(0), K = x.size(1), NB = codes.size(0), Np = NB * kBlockN, Kp = codes.size(1) * 2;
  TORCH_CHECK(codes.size(2) == kBlockN * bits / 4 && scales.size(1) == Np && K <= Kp && Kp == scales.size(0) * group
              && group % 2 == 0 && out_features <= Np,
              "inconsistent layout: codes ", codes.sizes(), ", scales ", scales.sizes(), ", group ", group, ", K ", K);
  TORCH_CHECK(!zeros || (zeros->sizes() == scales.sizes() && zeros->scalar_type() == at::kHalf && zeros->is_contiguous()),
              "zeros: fp16 [G, Np]");
  TORCH_CHECK(!perm || (perm->scalar_type() == at::kLong && perm->numel() == K), "perm: int64 [K]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == out_features), "bias: fp32 [N]");
  const bool tiles = f.amx && M > 4 && group % kTileK == 0;
  const int64_t Mp = tiles ? (M + 15) / 16 * 16 : M, segment = tiles ? std::gcd(group, kChunkK) : group;
  at::Tensor xb = at::zeros({Mp, Kp}, x.options().dtype(at::kBFloat16));
  at::Tensor xsum = zeros ? at::zeros({Mp, Kp / segment}, x.options().dtype(at::kFloat)) : at::Tensor();
  pack_input(x, perm ? perm->data_ptr<int64_t>() : nullptr, reinterpret_cast<uint16_t*>(xb.data_ptr()),
             zeros ? xsum.data_ptr<float>() : nullptr, Kp, segment);
  at::Tensor acc = at::zeros({Mp, Np}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({M, out_features}, x.options());
  Problem p{reinterpret_cast<const uint16_t*>(xb.data_ptr()), zeros ? xsum.data_ptr<float>() : nullptr,
            codes.data_ptr<uint8_t>(), scales.data_ptr(), zeros ? reinterpret_cast<const uint16_t*>(zeros->data_ptr()) : nullptr,
            reinterpret_cast<const uint16_t*>(lut.data_ptr()), acc.data_ptr<float>(), M, Kp, Np, group, segment,
            float(z0), int(bits), scales.scalar_type() == at::kHalf};
  const float* bias_ptr = bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    if (tiles) {
      alignas(64) uint16_t bufs[4 * 4 * 512];  // 4 k-tiles x 4 column groups x (16 rows x 32 bf16)
      alignas(64) float cbuf[16 * 64];
      configure_tiles();
      for (int64_t nb = begin; nb < end; ++nb) {
        tile_block(p, nb, bufs, cbuf);
        finish_block(p, nb, bias_ptr, out);
      }
      release_tiles();
    } else {
      for (int64_t nb = begin; nb < end; ++nb) {
        register_rows(p, nb);
        finish_block(p, nb, bias_ptr, out);
      }
    }
  });
  return out;
}

std::vector<int64_t> cpu_features() {
  const Features& f = features();
  return {int64_t(f.avx512bf16), int64_t(f.amx)};
}

}  // namespace

TORCH_LIBRARY(compress_cpu, m) {
  m.def("woq_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor lut, Tensor? perm, Tensor? bias, "
        "int bits, int group, float z0, int out_features) -> Tensor");
  m.impl("woq_linear", c10::DispatchKey::CPU, TORCH_FN(woq_linear));
  m.def("cpu_features() -> int[]");
  m.impl("cpu_features", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(cpu_features));
}
