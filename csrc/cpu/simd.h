// Helpers shared by the CPU kernels: run-time ISA detection and the AVX-512 primitives the
// kernels need (bf16 <-> fp32 loads and stores, masks). Functions that use AVX-512 carry DDPM_AVX512 so the
// rest of the library is compiled for the baseline ISA and runs on any x86-64 CPU; callers
// choose a path with cpu_has_avx512() / cpu_has_avx512_vnni() / cpu_has_avx2() at run time.
#pragma once

#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#define DDPM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define DDPM_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define DDPM_AVX2 __attribute__((target("avx2,fma")))

namespace ddpm_perf::cpu {

// DDPM_PERF_ISA=avx512-vnni|avx512|avx2|scalar caps what the kernels use (read once per
// process): to test the fallbacks on a bigger CPU, or to rule a fast path out when hunting a bug.
inline int isa_cap() {
  static const int cap = [] {
    const char* env = std::getenv("DDPM_PERF_ISA");
    const std::string v = env ? env : "";
    return v == "scalar" ? 0 : v == "avx2" ? 1 : v == "avx512" ? 2 : v == "avx512-vnni" ? 3 : 4;
  }();
  return cap;
}
inline bool cpu_has_avx512() {
  static const bool has = isa_cap() >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return has;
}
inline bool cpu_has_avx512_vnni() {
  static const bool has = isa_cap() >= 3 && cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  return has;
}
inline bool cpu_has_avx2() {
  static const bool has = isa_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// AMX-INT8 (Intel Sapphire Rapids and later): tile registers of 16 rows x 64 bytes. Linux hands
// them to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA), made once.
#define DDPM_AMX_INT8 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,amx-tile,amx-int8")))
inline bool cpu_has_amx_int8() {
  static const bool has = [] {
    if (isa_cap() < 4 || !cpu_has_avx512_vnni() || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-int8"))
      return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
}

// bf16 is the upper half of an fp32; rounding to nearest even as c10::BFloat16 does.
inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline void store_float(float* p, float v) { *p = v; }
inline void store_float(uint16_t* p, float v) { *p = float_to_bf16(v); }

// Loads/stores of 16 lanes (the first `n` of them), from/to fp32 or bf16 (uint16_t) memory.
DDPM_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}
DDPM_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
DDPM_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
DDPM_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
// v's bf16, rounded to nearest even as float_to_bf16, in the upper 16 bits of each lane; NaN -> 0x7fc0
DDPM_AVX512 inline __m512i bf16_rounded_high(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
}
DDPM_AVX512 inline void store16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_rounded_high(v), 16)));
}

// AVX512_BF16 (vcvtneps2bf16): fp32 -> bf16 in one instruction, rounding to nearest even like
// float_to_bf16 except that denormal inputs and outputs are flushed to zero. Callers check
// cpu_has_avx512_bf16() and keep store16 for AVX-512 CPUs without it.
#define DDPM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

inline bool cpu_has_avx512_bf16() {
  static const bool has = isa_cap() >= 3 && cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}
// The first `n` of 16 lanes to bf16 memory.
DDPM_AVX512_BF16 inline void store16_bf16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
// 32 lanes, lo then hi, to bf16 memory in one 64-byte store.
DDPM_AVX512_BF16 inline void store32_bf16(uint16_t* p, __m512 lo, __m512 hi) {
  _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}
// Unmasked 16-lane loads from fp32 or bf16 memory.
DDPM_AVX512 inline __m512 loadu16(const float* p) { return _mm512_loadu_ps(p); }
DDPM_AVX512 inline __m512 loadu16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// 32 consecutive values as two fp32 vectors. fp32: the first 16 and the last 16. bf16: the
// even-indexed and the odd-indexed values, from one 64-byte load by a shift and a mask, with no
// lane-crossing widening (vpmovzxwd), which competes with the SiLU's table lookup for the shuffle
// unit. Sums do not care about the order; store32_pair puts elementwise results back in order.
DDPM_AVX512 inline void load32_pair(const float* p, __m512& a, __m512& b) {
  a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
}
DDPM_AVX512 inline void load32_pair(const uint16_t* p, __m512& even, __m512& odd) {
  const __m512i raw = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int(0xffff0000u))));
}
DDPM_AVX512 inline void store32_pair(float* p, __m512 a, __m512 b) { _mm512_storeu_ps(p, a), _mm512_storeu_ps(p + 16, b); }
// bf16 rounded to nearest even as store16 does, each pair's even value into the low half of a
// 32-bit lane and its odd value into the high half: one store, no narrowing shuffle.
DDPM_AVX512 inline void store32_pair(uint16_t* p, __m512 even, __m512 odd) {
  const __m512i lo = _mm512_srli_epi32(bf16_rounded_high(even), 16);
  const __m512i hi = _mm512_and_si512(bf16_rounded_high(odd), _mm512_set1_epi32(int(0xffff0000u)));
  _mm512_storeu_si512(p, _mm512_or_si512(lo, hi));
}
// The same with AVX512_BF16: both rounded by one vcvtne2ps2bf16 (even values in words 0-15, odd in
// 16-31), then interleaved by one word permutation.
DDPM_AVX512_BF16 inline void store32_pair_bf16(uint16_t* p, __m512 even, __m512 odd) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), packed));
}

inline std::string isa_name() {
  if (cpu_has_amx_int8()) return "amx-int8";
  if (cpu_has_avx512_vnni()) return "avx512-vnni";
  if (cpu_has_avx512()) return "avx512";
  if (cpu_has_avx2()) return "avx2";
  return "scalar";
}

}  // namespace ddpm_perf::cpu
