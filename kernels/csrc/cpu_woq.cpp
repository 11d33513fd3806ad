// Weight-only-quantized matmul for x86 CPUs: y[M, N] = x[M, K] @ W^T, W given as integer codes with
// per-group scales (the layout is built by kernels/cpu_native.py; read its docstring first).
//
// Codes live in column blocks of 64 outputs, stored at 2, 4 or 8 bits (cpu_woq_expand.h has the
// table of layouts): each load unit of one to four row pairs expands in registers to vectors of 32 bf16
// lanes in the pair order of VDPBF16PS and of an AMX B-tile row.
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

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>

#include "cpu_features.h"
#include "cpu_woq_expand.h"

namespace {

constexpr int64_t kBlockN = 64;    // outputs per column block: 4 vectors of 16 fp32 lanes
constexpr int64_t kTileK = 32;     // rows of W^T per AMX tile (16 row pairs)
constexpr int64_t kChunkK = 128;   // rows expanded at once on the AMX path (4 tiles per 16 columns)
constexpr int kPassBlocks = 2;  // column blocks per pass of the one-row register path
constexpr int64_t kPrefetch = 8192;  // bytes ahead in each plane, into L2: the streams outrun the hardware prefetcher (measured: 2.0x slower without)

struct Problem {
  const uint16_t* x;     // bf16 bits [Mp, Kp], zero padded
  const float* xsum;     // [Mp, Kp / segment]: x summed over each segment, or null (no zero term)
  const uint8_t* codes;  // [NB, units, Unit::bytes]
  const void* scales;    // [NB, G, 64], fp16 or fp32: a block's groups contiguous, like its codes
  const uint16_t* zeros; // fp16 [NB, G, 64] zero points, or null
  const uint16_t* lut;   // 32 bf16 (4-bit codes)
  float* acc;            // [Mp, Np]
  int64_t M, Kp, Np, group, groups;
  int64_t segment;       // rows per scaled partial sum: the group (registers) or the AMX chunk
  float z0;              // the zero the table already subtracts
  bool half_scales;
};

#define TARGET_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma,amx-tile,amx-bf16")))

TARGET_AVX inline __m512 load_scale(const Problem& p, int64_t offset) {
  if (p.half_scales)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p.scales) + offset)));
  return _mm512_loadu_ps(static_cast<const float*>(p.scales) + offset);
}

// offset of (block nb, group g) in the scales and zeros
inline int64_t meta_row(const Problem& p, int64_t nb, int64_t g) { return (nb * p.groups + g) * kBlockN; }

// the next group's scales and zeros on their way (a block's metadata is one short stream)
TARGET_AVX inline void prefetch_meta(const Problem& p, int64_t nb, int64_t g) {
  const int64_t row = meta_row(p, nb, g);
  const char* s = static_cast<const char*>(p.scales) + row * (p.half_scales ? 2 : 4);
  _mm_prefetch(s, _MM_HINT_T0);
  _mm_prefetch(s + 64, _MM_HINT_T0);
  if (!p.half_scales) {
    _mm_prefetch(s + 128, _MM_HINT_T0);
    _mm_prefetch(s + 192, _MM_HINT_T0);
  }
  if (p.zeros) {
    _mm_prefetch(reinterpret_cast<const char*>(p.zeros + row), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p.zeros + row) + 64, _MM_HINT_T0);
  }
}

// acc[m, n0 + 16j + i] += s * (part - (z - z0) * xsum) for the block's 4 vectors of row m; part sums
// segment seg (rows [seg * p.segment, (seg + 1) * p.segment)) of group g
TARGET_AVX inline void apply_group(const Problem& p, int64_t m, int64_t g, int64_t seg, int64_t n0, const __m512* part) {
  float* out = p.acc + m * p.Np + n0;
  const int64_t row = meta_row(p, n0 / kBlockN, g);
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

// Every cache line of the unit kPrefetch bytes ahead
template <int BITS>
TARGET_AVX inline void prefetch_unit(const uint8_t* unit) {
  _mm_prefetch(reinterpret_cast<const char*>(unit + kPrefetch), _MM_HINT_T1);
  if constexpr (Unit<BITS>::bytes > 64) _mm_prefetch(reinterpret_cast<const char*>(unit + kPrefetch + 64), _MM_HINT_T1);
}

// One load unit's row pairs (U = 0 .. pairs - 1) against MB rows of x: pair U feeds accumulator set U % ACC
template <int BITS, int MB, int ACC, int U = 0>
TARGET_AVX inline void unit_dots(const Raw& r, __m512i lut, __m512 (*part)[MB][4], const uint32_t* x, int64_t stride,
                                 int64_t kp) {
  __m512i w[4];
  expand<BITS, U>(r, lut, w);
  dot_pair<MB>(part[U % ACC], w, x, stride, kp + U);
  if constexpr (U + 1 < Unit<BITS>::pairs) unit_dots<BITS, MB, ACC, U + 1>(r, lut, part, x, stride, kp);
}

// Rows [m0, m0 + MB) of BLOCKS adjacent column blocks from nb, weights expanded in registers (M <= 4,
// or no AMX). Two blocks in one pass keep two code streams in flight per core (memory-level
// parallelism) and give VDPBF16PS independent accumulators; one block alone alternates two sets.
template <int BITS, int MB, int BLOCKS>
TARGET_AVX void register_block(const Problem& p, int64_t nb, int64_t m0) {
  using Layout = Unit<BITS>;
  constexpr int ACC = BLOCKS == 1 && MB <= 2 ? 2 : 1;
  const int64_t units = p.Kp / 2 / Layout::pairs, per_group = p.group / 2 / Layout::pairs, stride = p.Kp / 2;
  const __m512i lut = _mm512_loadu_si512(p.lut);
  const uint32_t* x = reinterpret_cast<const uint32_t*>(p.x) + m0 * stride;  // bf16 pairs
  const uint8_t* codes[BLOCKS];
  for (int b = 0; b < BLOCKS; ++b) codes[b] = p.codes + (nb + b) * units * Layout::bytes;
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int b = 0; b < BLOCKS && g + 1 < p.groups; ++b) prefetch_meta(p, nb + b, g + 1);
    __m512 part[BLOCKS * ACC][MB][4];
    for (int a = 0; a < BLOCKS * ACC; ++a)
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < 4; ++j) part[a][m][j] = _mm512_setzero_ps();
    for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j)
      for (int b = 0; b < BLOCKS; ++b) {
        prefetch_unit<BITS>(codes[b] + j * Layout::bytes);
        const Raw r = load_unit<BITS>(codes[b] + j * Layout::bytes);
        unit_dots<BITS, MB, ACC>(r, lut, part + b * ACC, x, stride, j * Layout::pairs);
      }
    for (int b = 0; b < BLOCKS; ++b)
      for (int m = 0; m < MB; ++m) {
        for (int a = 1; a < ACC; ++a)
          for (int j = 0; j < 4; ++j) part[b * ACC][m][j] = _mm512_add_ps(part[b * ACC][m][j], part[b * ACC + a][m][j]);
        apply_group(p, m0 + m, g, g, (nb + b) * kBlockN, part[b * ACC][m]);
      }
  }
}

// Blocks [nb, nb + count), all rows of x: a row or two at a time with PASS blocks per pass (more code
// streams and independent accumulators where the rows leave registers for them), 3-4 rows one block
template <int BITS, int MB, int PASS>
TARGET_AVX void register_passes(const Problem& p, int64_t nb, int64_t count, int64_t m0) {
  int64_t b = nb;
  for (; b + PASS <= nb + count; b += PASS) register_block<BITS, MB, PASS>(p, b, m0);
  for (; b < nb + count; ++b) register_block<BITS, MB, 1>(p, b, m0);
}

template <int BITS>
TARGET_AVX void register_rows(const Problem& p, int64_t nb, int64_t count) {
  for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
    switch (std::min<int64_t>(4, p.M - m0)) {
      case 1: register_passes<BITS, 1, kPassBlocks>(p, nb, count, m0); break;
      case 2: register_passes<BITS, 2, 2>(p, nb, count, m0); break;
      case 3: register_passes<BITS, 3, 1>(p, nb, count, m0); break;
      default: register_passes<BITS, 4, 1>(p, nb, count, m0); break;
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

// One load unit's row pairs into rows r, r + 1, ... of the k-tile's four B tiles
template <int BITS, int U = 0>
TARGET_AMX inline void unit_tiles(const Raw& r, __m512i lut, uint16_t* tile) {
  __m512i w[4];
  expand<BITS, U>(r, lut, w);
  for (int j = 0; j < 4; ++j) _mm512_store_si512(tile + (j << 9) + U * 32, w[j]);
  if constexpr (U + 1 < Unit<BITS>::pairs) unit_tiles<BITS, U + 1>(r, lut, tile);
}

// Column block nb with AMX: each chunk of rows (inside one group) is expanded once into B tiles and
// multiplied with every 16-row block of x; the chunk's fp32 sums are scaled into acc.
template <int BITS>
TARGET_AMX void tile_block(const Problem& p, int64_t nb, uint16_t* bufs, float* cbuf) {
  using Layout = Unit<BITS>;
  const int64_t units = p.Kp / 2 / Layout::pairs, n0 = nb * kBlockN, chunk = p.segment;
  const uint8_t* codes = p.codes + nb * units * Layout::bytes;
  const __m512i lut = _mm512_loadu_si512(p.lut);
  for (int64_t k0 = 0; k0 < p.Kp; k0 += chunk) {
    const int64_t tiles = std::min(chunk, p.Kp - k0) / kTileK, g = k0 / p.group, seg = k0 / chunk;
    if (g + 1 < p.groups) prefetch_meta(p, nb, g + 1);
    for (int64_t kt = 0; kt < tiles; ++kt)
      for (int r = 0; r < 16; r += Layout::pairs) {
        const int64_t j = ((k0 + kt * kTileK) / 2 + r) / Layout::pairs;
        prefetch_unit<BITS>(codes + j * Layout::bytes);
        const Raw raw = load_unit<BITS>(codes + j * Layout::bytes);
        unit_tiles<BITS>(raw, lut, bufs + ((kt * 4) << 9) + r * 32);
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

template <int BITS>
void run_blocks(const Problem& p, bool tiles, int64_t NB, const float* bias, at::Tensor& out) {
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    if (tiles) {
      alignas(64) uint16_t bufs[4 * 4 * 512];  // 4 k-tiles x 4 column groups x (16 rows x 32 bf16)
      alignas(64) float cbuf[16 * 64];
      configure_tiles();
      for (int64_t nb = begin; nb < end; ++nb) {
        tile_block<BITS>(p, nb, bufs, cbuf);
        finish_block(p, nb, bias, out);
      }
      release_tiles();
    } else {
      for (int64_t nb = begin; nb < end; nb += kPassBlocks) {
        const int64_t count = std::min<int64_t>(kPassBlocks, end - nb);
        register_rows<BITS>(p, nb, count);
        for (int64_t b = nb; b < nb + count; ++b) finish_block(p, b, bias, out);
      }
    }
  });
}

// One line naming the first argument that does not fit the layout (cpu_native.py builds them)
void check_args(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, const at::Tensor& lut, const std::optional<at::Tensor>& perm,
                const std::optional<at::Tensor>& bias, int64_t bits, int64_t group, int64_t out_features) {
  TORCH_CHECK(features().avx512bf16, "compress_cpu::woq_linear needs AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
              "x must be bf16, fp16 or fp32");
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "codes are stored at 2, 4 or 8 bits");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 3, "codes: uint8 [NB, units, bytes]");
  TORCH_CHECK((scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf) && scales.is_contiguous()
              && scales.dim() == 3 && scales.size(2) == kBlockN, "scales: fp16 or fp32 [NB, G, 64]");
  TORCH_CHECK(lut.numel() == 32 && lut.element_size() == 2, "lut: 32 bf16");
  const int pairs = bits == 2 ? 2 : 1;  // Unit<bits>::pairs
  const int64_t K = x.size(1), NB = codes.size(0), Np = NB * kBlockN, Kp = codes.size(1) * 2 * pairs;
  TORCH_CHECK(codes.size(2) == (bits == 8 ? 128 : 64) && scales.size(0) == NB && K <= Kp
              && Kp == scales.size(1) * group && group % (2 * pairs) == 0 && out_features <= Np,
              "inconsistent layout: codes ", codes.sizes(), ", scales ", scales.sizes(), ", group ", group, ", K ", K);
  TORCH_CHECK(!zeros || (zeros->sizes() == scales.sizes() && zeros->scalar_type() == at::kHalf && zeros->is_contiguous()),
              "zeros: fp16 [NB, G, 64]");
  TORCH_CHECK(!perm || (perm->scalar_type() == at::kLong && perm->numel() == K), "perm: int64 [K]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == out_features), "bias: fp32 [N]");
}

at::Tensor woq_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const at::Tensor& lut, const std::optional<at::Tensor>& perm,
                      const std::optional<at::Tensor>& bias, int64_t bits, int64_t group, double z0, int64_t out_features) {
  check_args(x, codes, scales, zeros, lut, perm, bias, bits, group, out_features);
  const int pairs = bits == 2 ? 2 : 1;  // Unit<bits>::pairs
  const int64_t M = x.size(0), NB = codes.size(0), Np = NB * kBlockN, Kp = codes.size(1) * 2 * pairs;
  const bool tiles = features().amx && M > 4 && group % kTileK == 0;
  const int64_t Mp = tiles ? (M + 15) / 16 * 16 : M, segment = tiles ? std::gcd(group, kChunkK) : group;
  at::Tensor xb = at::zeros({Mp, Kp}, x.options().dtype(at::kBFloat16));
  at::Tensor xsum = zeros ? at::zeros({Mp, Kp / segment}, x.options().dtype(at::kFloat)) : at::Tensor();
  pack_input(x, perm ? perm->data_ptr<int64_t>() : nullptr, reinterpret_cast<uint16_t*>(xb.data_ptr()),
             zeros ? xsum.data_ptr<float>() : nullptr, Kp, segment);
  at::Tensor acc = at::zeros({Mp, Np}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({M, out_features}, x.options());
  Problem p{reinterpret_cast<const uint16_t*>(xb.data_ptr()), zeros ? xsum.data_ptr<float>() : nullptr,
            codes.data_ptr<uint8_t>(), scales.data_ptr(), zeros ? reinterpret_cast<const uint16_t*>(zeros->data_ptr()) : nullptr,
            reinterpret_cast<const uint16_t*>(lut.data_ptr()), acc.data_ptr<float>(), M, Kp, Np, group, Kp / group, segment,
            float(z0), scales.scalar_type() == at::kHalf};
  const float* bias_ptr = bias ? bias->data_ptr<float>() : nullptr;
  switch (bits) {
    case 2: run_blocks<2>(p, tiles, NB, bias_ptr, out); break;
    case 4: run_blocks<4>(p, tiles, NB, bias_ptr, out); break;
    default: run_blocks<8>(p, tiles, NB, bias_ptr, out); break;
  }
  return out;
}

std::vector<int64_t> cpu_features() {
  const Features& f = features();
  return {int64_t(f.avx512bf16), int64_t(f.amx)};
}

}  // namespace

TORCH_LIBRARY(compress_cpu, m) {
  m.def("woq_linear(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor lut, Tensor? perm, "
        "Tensor? bias, int bits, int group, float z0, int out_features) -> Tensor");
  m.impl("woq_linear", c10::DispatchKey::CPU, TORCH_FN(woq_linear));
  m.def("cpu_features() -> int[]");
  m.impl("cpu_features", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(cpu_features));
}
