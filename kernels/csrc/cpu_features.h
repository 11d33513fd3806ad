// What this x86 CPU and OS let the native kernel use: AVX512-BF16, and AMX tiles (Linux hands the tile
// state out only on request: ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, once per process).
#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace {

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

}  // namespace
