#pragma once

// SiLU and sigmoid of 16 fp32 lanes for the AVX-512 paths of group_norm_silu (forward and
// backward). A header of its own so that benchmarks/silu_sequences.cpp times exactly this code
// against the reciprocal sequence it replaced.
//
// z * sigmoid(z) = z / (1 + 2^t) with t = -z log2(e) = r + f, r a multiple of 1/16 and
// |f| <= 1/32: 2^r = 2^floor(r) * 2^(k/16) by scalef and a 16-entry table (vpermps), 2^f by a
// short polynomial, then one division. Precise, for fp32 outputs: degree 3 in f (relative error
// <= 2.4e-7 on [-7, 7]) and a division, 12 instructions; otherwise, for bf16 outputs whose
// rounding error is 2^-9: degree 1 (2.9e-4) and rcp14 (2^-14), 10 instructions. The table moves
// work off the multiply pipes, which bound the sequence: on the Zen 5 it cut fp32 from 1.50-1.53
// to 1.32-1.33 ns per 16 values and bf16 outputs from 1.21-1.24 to 0.96-0.97 ns, against a
// degree-5 (degree-3) polynomial over |f| <= 1/2 (docs/performance.md, "group_norm_silu: a table
// for the exponential (session 14)"). The division beat rcp14 and a Newton step in speed and
// accuracy on both machines measured ("group_norm_silu: the division").
#include <immintrin.h>

#include <cmath>

#include "simd.h"

namespace ddpm_perf::cpu {

// 2^(k/16), k = 0..15
DDPM_AVX512 inline __m512 exp2_sixteenths() {
  return _mm512_setr_ps(1.0f, 1.0442737824274138f, 1.0905077326652577f, 1.1387886347566916f, 1.1892071150027210f,
                        1.2418578120734840f, 1.2968395546510096f, 1.3542555469368927f, 1.4142135623730951f,
                        1.4768261459394993f, 1.5422108254079408f, 1.6104903319492543f, 1.6817928305074290f,
                        1.7562521603732995f, 1.8340080864093424f, 1.9152065613971474f);
}

// z with its magnitude clamped to `limit`, keeping z's sign (vrangeps imm 0b0010; 0b0110 would
// take the chosen operand's sign, +limit for z < -limit). NaN stays NaN.
DDPM_AVX512 inline __m512 clamp_magnitude(__m512 z, float limit) {
  return _mm512_range_ps(z, _mm512_set1_ps(limit), 0b0010);
}

template <bool Precise>
DDPM_AVX512 inline __m512 one_plus_exp_neg(__m512 zc) {  // 1 + e^-zc, |zc| <= 1000; inf beyond ~88
  const __m512 c = _mm512_set1_ps(-1.44269504088896341f), magic = _mm512_set1_ps(786432.f);
  // s = t + 1.5 * 2^19 has a sixteenth as its last place: s - magic is t rounded to sixteenths,
  // and s's low 4 bits are k, the table index (vpermps reads only those).
  const __m512 s = _mm512_fmadd_ps(zc, c, magic);
  const __m512 r = _mm512_sub_ps(s, magic);
  const __m512 table = _mm512_permutexvar_ps(_mm512_castps_si512(s), exp2_sixteenths());
  __m512 e;  // 2^(k/16) * 2^f
  if constexpr (Precise) {
    const __m512 f = _mm512_fmsub_ps(zc, c, r);  // zc * c - r with zc * c unrounded
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(5.550410866e-02f), f, _mm512_set1_ps(2.402265070e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471806e-01f));
    e = _mm512_fmadd_ps(_mm512_mul_ps(p, f), table, table);
  } else {
    const __m512 g = _mm512_fnmsub_ps(r, _mm512_set1_ps(0.693147181f), zc);  // f ln 2 = -zc - r ln 2
    e = _mm512_fmadd_ps(g, table, table);
  }
  return _mm512_add_ps(_mm512_scalef_ps(e, r), _mm512_set1_ps(1.f));
}

template <bool Precise>
DDPM_AVX512 inline __m512 sigmoid16_clamped(__m512 zc) {
  return _mm512_div_ps(_mm512_set1_ps(1.f), one_plus_exp_neg<Precise>(zc));
}

// z * sigmoid(z), finished by one division or by rcp14 (plus a Newton step when Precise).
template <bool Precise, bool Division>
DDPM_AVX512 inline __m512 silu16(__m512 z) {
  // Below about -88, 1 + 2^t is inf and the division gives -0 (rcp14: 0); above, 2^t is 0 and
  // silu is z. NaN stays NaN, -inf gives NaN as in torch (-inf * 0).
  const __m512 zc = clamp_magnitude(z, 1000.f);
  const __m512 d = one_plus_exp_neg<Precise>(zc);
  if constexpr (Division) return _mm512_div_ps(z, d);
  __m512 r = _mm512_rcp14_ps(d);
  if constexpr (Precise) {  // r (2 - d r) is NaN where d is inf: zero those lanes
    const __mmask16 finite = _mm512_cmp_ps_mask(d, _mm512_set1_ps(INFINITY), _CMP_NEQ_UQ);
    r = _mm512_maskz_mul_ps(finite, r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  }
  return _mm512_mul_ps(z, r);
}

// The kernels' choice: the division for fp32 outputs, rcp14 for bf16 outputs.
template <bool Precise>
DDPM_AVX512 inline __m512 silu16_fast(__m512 z) {
  return silu16<Precise, Precise>(z);
}

}  // namespace ddpm_perf::cpu
