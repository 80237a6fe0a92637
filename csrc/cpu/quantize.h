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

}  // namespace ddpm_perf::cpu
