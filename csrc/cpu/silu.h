#pragma once

// SiLU and sigmoid of 16 fp32 lanes for the AVX-512 paths of group_norm_silu (forward and
// backward). A header of its own so that benchmarks/silu_sequences.cpp times exactly this code
// against the reciprocal sequence it replaced.
//
// z * sigmoid(z) = z / (1 + 2^t) with t = -z log2(e) = r + f: 2^r = 2^floor(r) * 2^(k/n) by scalef
// and an n-entry table, 2^f by a short polynomial, then one division or rcp14. Precise, for fp32
// outputs: r a multiple of 1/32, |f| <= 1/64, a 32-entry table (vpermt2ps), a degree-2 minimax
// polynomial and the division (relative error <= 2.9e-7 on [-7, 7]). Otherwise, for bf16 outputs
// whose rounding error is 2^-9: sixteenths, a 16-entry table (vpermps), degree 1 (2.9e-4) and rcp14
// (2^-14). Every instruction the table saves is a multiply-pipe instruction, and those bound the
// sequence: on the Zen 5 sixteenths and degree 3 cut fp32 from 1.50-1.53 to 1.32-1.33 ns per 16
// values against degree 5 over |f| <= 1/2 ("group_norm_silu: a table for the exponential (session
// 14)"); on the Zen 4 thirty-seconds and degree 2 cut it from 2.65 to 2.47 ns ("group_norm_silu on
// the Zen 4 (session 24)", docs/performance.md). The division beat rcp14 and a Newton step in speed
// and accuracy on every machine measured ("group_norm_silu: the division").
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

// 2^(k/32), k = 0..15
DDPM_AVX512 inline __m512 exp2_thirty_seconds_low() {
  return _mm512_setr_ps(1.0f, 1.0218971486541167f, 1.0442737824274138f, 1.0671404006768236f,
                        1.0905077326652577f, 1.1143867425958925f, 1.1387886347566917f, 1.1637248587775775f,
                        1.1892071150027211f, 1.2152473599804689f, 1.241857812073484f, 1.2690509571917332f,
                        1.2968395546510097f, 1.3252366431597413f, 1.3542555469368927f, 1.383909881963832f);
}

// 2^(k/32), k = 16..31
DDPM_AVX512 inline __m512 exp2_thirty_seconds_high() {
  return _mm512_setr_ps(1.414213562373095f, 1.4451808069770466f, 1.4768261459394993f, 1.5091644275934227f,
                        1.5422108254079408f, 1.5759808451078865f, 1.6104903319492543f, 1.6457554781539648f,
                        1.6817928305074291f, 1.7186192981224779f, 1.7562521603732995f, 1.7947090750031072f,
                        1.8340080864093425f, 1.8741676341102999f, 1.9152065613971473f, 1.9571441241754003f);
}

// z with its magnitude clamped to `limit`, keeping z's sign (vrangeps imm 0b0010; 0b0110 would
// take the chosen operand's sign, +limit for z < -limit). NaN stays NaN.
DDPM_AVX512 inline __m512 clamp_magnitude(__m512 z, float limit) {
  return _mm512_range_ps(z, _mm512_set1_ps(limit), 0b0010);
}

template <bool Precise>
DDPM_AVX512 inline __m512 one_plus_exp_neg(__m512 zc) {  // 1 + e^-zc, |zc| <= 1000; inf beyond ~88
  const __m512 c = _mm512_set1_ps(-1.44269504088896341f);
  // s = t + 1.5 * 2^(23 - b) has 2^-b as its last place: s - magic is t rounded to that, and s's
  // low b bits are k, the table index (vpermt2ps reads the low 5 bits, vpermps the low 4).
  const __m512 magic = _mm512_set1_ps(Precise ? 393216.f : 786432.f);
  const __m512 s = _mm512_fmadd_ps(zc, c, magic);
  const __m512 r = _mm512_sub_ps(s, magic);
  const __m512i k = _mm512_castps_si512(s);
  __m512 e;  // 2^(k/n) * 2^f
  if constexpr (Precise) {
    const __m512 table = _mm512_permutex2var_ps(exp2_thirty_seconds_low(), k, exp2_thirty_seconds_high());
    const __m512 f = _mm512_fmsub_ps(zc, c, r);  // zc * c - r with zc * c unrounded
    // minimax for (2^f - 1) / f on |f| <= 1/64 (relative error of 2^f 5.3e-8)
    const __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.24022649737533916f), f, _mm512_set1_ps(0.6931573297731336f));
    e = _mm512_fmadd_ps(_mm512_mul_ps(p, f), table, table);
  } else {
    const __m512 table = _mm512_permutexvar_ps(k, exp2_sixteenths());
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
