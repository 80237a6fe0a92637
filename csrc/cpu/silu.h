#pragma once

// SiLU and sigmoid of 16 fp32 lanes for the AVX-512 paths of group_norm_silu (forward and
// backward). A header of its own so that benchmarks/silu_sequences.cpp times exactly this code
// against the reciprocal sequence it replaced.
//
// z * sigmoid(z) = z / (1 + 2^t) with t = -z log2(e) = n + f, n an integer, |f| <= 1/2: 2^f by a
// polynomial fitted for least maximum relative error on [-1/2, 1/2], 2^n by scalef, then one
// division. Precise, for fp32 outputs: degree 5 (relative error 1.7e-7) and a division, 13
// instructions; the division beat rcp14 and a Newton step (3 instructions) in speed and in
// accuracy on both machines measured. Otherwise, for bf16 outputs whose rounding error is 2^-9:
// degree 3 (1.0e-4) and rcp14 (2^-14), 11 instructions; rcp14 was 1.24x faster than the division
// on the Xeon and 1.05x slower on the Zen 5 (docs/performance.md, "group_norm_silu: the
// division", "group_norm_silu on the Xeon: rcp14 for bf16 outputs").
#include <immintrin.h>

#include "simd.h"

namespace ddpm_perf::cpu {

template <bool Precise>
DDPM_AVX512 inline __m512 one_plus_exp_neg(__m512 zc) {  // 1 + e^-zc, zc within [-80, 80]
  const __m512 c = _mm512_set1_ps(-1.44269504088896341f);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(zc, c), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fmsub_ps(zc, c, n);  // zc * c - n with zc * c unrounded
  __m512 p;
  if constexpr (Precise) {
    p = _mm512_fmadd_ps(_mm512_set1_ps(1.326472731e-03f), f, _mm512_set1_ps(9.671512991e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550733581e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402224243e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470037e-01f));
  } else {
    p = _mm512_fmadd_ps(_mm512_set1_ps(5.500892922e-02f), f, _mm512_set1_ps(2.422109693e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.932829022e-01f));
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.f));
}

template <bool Precise>
DDPM_AVX512 inline __m512 sigmoid16_clamped(__m512 zc) {
  return _mm512_div_ps(_mm512_set1_ps(1.f), one_plus_exp_neg<Precise>(zc));
}

// z * sigmoid(z), finished by one division or by rcp14 (plus a Newton step when Precise).
template <bool Precise, bool Division>
DDPM_AVX512 inline __m512 silu16(__m512 z) {
  // z clamped to [-80, 80] (vrangeps: the smaller magnitude, z's sign) keeps f = t - n within
  // [-1/2, 1/2] and 1 + 2^t finite; silu is z beyond 80 and 0 (to fp32's resolution) below -80,
  // where the result is zeroed. NaN stays NaN.
  const __m512 zc = _mm512_range_ps(z, _mm512_set1_ps(80.f), 0b0110);
  const __mmask16 keep = _mm512_cmp_ps_mask(z, _mm512_set1_ps(-80.f), _CMP_NLT_UQ);
  const __m512 d = one_plus_exp_neg<Precise>(zc);
  if constexpr (Division) return _mm512_maskz_div_ps(keep, z, d);
  __m512 r = _mm512_rcp14_ps(d);
  if constexpr (Precise) r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));  // r (2 - d r)
  return _mm512_maskz_mul_ps(keep, z, r);
}

// The kernels' choice: the division for fp32 outputs, rcp14 for bf16 outputs.
template <bool Precise>
DDPM_AVX512 inline __m512 silu16_fast(__m512 z) {
  return silu16<Precise, Precise>(z);
}

}  // namespace ddpm_perf::cpu
