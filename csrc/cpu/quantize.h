#pragma once

// Per-tensor affine uint8: q = clamp(round(v * inv_scale) + zero_point, 0, 255), rounding to
// nearest even, with inv_scale = float(1 / scale) rounded once. int8_conv2d quantises its input
// this way and group_norm_silu_quantized its output, so a norm that hands uint8 to the convolution
// gives exactly the codes the convolution would have made from the norm's fp32 output.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace ddpm_perf::cpu {

struct Quant {
  float inv_scale;
  int32_t zero_point;
};

inline Quant make_quant(double scale, int64_t zero_point) {
  return {static_cast<float>(1.0 / scale), static_cast<int32_t>(zero_point)};
}

inline uint8_t quantize(float v, const Quant& q) {
  const float r = std::nearbyint(v * q.inv_scale) + float(q.zero_point);
  return static_cast<uint8_t>(std::min(255.f, std::max(0.f, r)));
}

// round(v * inv_scale) + zero_point in int32, not yet clamped to [0, 255]. Capped at 2^30 first:
// vcvtps2dq turns anything beyond the int32 range into INT_MIN, which would clamp a huge positive
// value to 0 instead of 255 (a NaN becomes 255).
DDPM_AVX512 inline __m512i quantize16_epi32(__m512 v, __m512 inv_scale, __m512i zero_point) {
  const __m512 t = _mm512_min_ps(_mm512_mul_ps(v, inv_scale), _mm512_set1_ps(0x1p30f));
  return _mm512_add_epi32(_mm512_cvtps_epi32(t), zero_point);
}

// 16 lanes quantised to 16 bytes: negatives to 0 by a max, above 255 by the unsigned saturation
DDPM_AVX512 inline __m128i quantize16_u8(__m512 v, const Quant& q) {
  const __m512i i = quantize16_epi32(v, _mm512_set1_ps(q.inv_scale), _mm512_set1_epi32(q.zero_point));
  return _mm512_cvtusepi32_epi8(_mm512_max_epi32(i, _mm512_setzero_si512()));
}

// The first `n` of 16 lanes quantised to uint8 memory.
DDPM_AVX512 inline void store16(uint8_t* p, __m512 v, __mmask16 m, const Quant& q) {
  _mm_mask_storeu_epi8(p, m, quantize16_u8(v, q));
}

// With AVX512_VBMI (Ice Lake, Zen 4 and later), for loops whose vector pipes are already busy
// (group_norm_silu's SiLU): t + (1.5 * 2^23 + zero_point) rounds t to the nearest integer, half to
// even, into the low mantissa bits; clamped in float to [0, 255] plus that constant, each lane's
// low byte is the code, and one byte permutation gathers 32 of them. Only float additions and
// comparisons besides the multiply, where vcvtps2dq and two narrowing moves per 16 values compete
// with the SiLU for the shuffle unit. The same codes: for |t| < 2^22 the sum is exact up to the
// rounding, and anything larger is clamped either way.
#define DDPM_AVX512_VBMI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")))

inline bool cpu_has_avx512_vbmi() {
  static const bool has = isa_cap() >= 3 && cpu_has_avx512() && __builtin_cpu_supports("avx512vbmi");
  return has;
}

// v's codes, each in the low byte of its lane
DDPM_AVX512_VBMI inline __m512i quantize16_low_bytes(__m512 v, const Quant& q) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  // the product rounded on its own, as quantize16_epi32's: the explicit rounding keeps the compiler
  // from fusing the multiply and the add into one FMA (-ffp-contract), which rounds once
  const __m512 scaled = _mm512_mul_round_ps(v, _mm512_set1_ps(q.inv_scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 t = _mm512_add_ps(scaled, _mm512_set1_ps(kMagic + q.zero_point));
  const __m512 clamped = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(kMagic)), _mm512_set1_ps(kMagic + 255.f));
  return _mm512_castps_si512(clamped);  // max(NaN, kMagic) is kMagic: NaN becomes 0
}

DDPM_AVX512_VBMI inline void store16_vbmi(uint8_t* p, __m512 v, __mmask16 m, const Quant& q) {
  _mm512_mask_cvtepi32_storeu_epi8(p, m, quantize16_low_bytes(v, q));
}

// 32 codes: lanes of a then of b (interleave false), or a's and b's alternately (true: the even-
// and odd-indexed values of load32_pair's bf16 order).
template <bool Interleave>
DDPM_AVX512_VBMI inline void store32_vbmi(uint8_t* p, __m512 a, __m512 b, const Quant& q) {
  alignas(64) static constexpr auto kIndex = [] {
    struct { uint8_t v[64]; } index{};
    for (int j = 0; j < 32; ++j)
      index.v[j] = Interleave ? uint8_t((j % 2) * 64 + (j / 2) * 4) : uint8_t((j / 16) * 64 + (j % 16) * 4);
    return index;
  }();
  const __m512i codes = _mm512_permutex2var_epi8(quantize16_low_bytes(a, q), _mm512_load_si512(kIndex.v),
                                                 quantize16_low_bytes(b, q));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(codes));
}

}  // namespace ddpm_perf::cpu
