// CPU kernel of dropout: y = keep ? x / (1 - p) : 0, the mask drawn from Philox4x32-10 in
// registers, never stored (the backward is the same op on the gradient, with the same seed).
//
// The mask is a function of (seed, n, c, spatial index), not of the memory layout: element
// (n, c, s) takes word c % 4 of philox(counter = (n * S + s) * ceil(C / 4) + c / 4, key = seed),
// as ddpm_perf/ops/reference.py spells out. So four channels of one pixel share a counter: NCHW
// walks 16 pixels of 4 channel rows per 16-lane Philox, channels_last 64 channels of one pixel
// (transposing the 4 words). AVX-512 where the CPU has it, portable C++ otherwise.
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "simd.h"

namespace ddpm_perf::cpu {
namespace {

using at::Tensor;

// Philox4x32 constants (Salmon et al. 2011; the same as cuRAND's and Triton's).
constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr uint32_t kKey0 = 0x9E3779B9u, kKey1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Params {
  uint32_t seed_lo, seed_hi;
  uint32_t threshold;  // keep where the 32-bit draw >= threshold = round(p * 2^32)
  float scale;         // 1 / (1 - p)
};

inline void philox(uint64_t counter, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0, p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kKey0;
    k1 += kKey1;
  }
  out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

template <typename T>
inline T apply(T x, uint32_t draw, const Params& q) {
  return draw >= q.threshold ? static_cast<T>(to_float(x) * q.scale) : static_cast<T>(0.f);
}
inline uint16_t apply(uint16_t x, uint32_t draw, const Params& q) {  // bf16 bits
  return draw >= q.threshold ? float_to_bf16(bf16_to_float(x) * q.scale) : 0;
}

template <typename T>
void dropout_scalar(const T* x, T* y, int64_t N, int64_t C, int64_t S, bool channels_last, const Params& q) {
  const int64_t C4 = (C + 3) / 4;
  parallel_for_caller_last(0, N * S, 256, [&](int64_t begin, int64_t end) {
    uint32_t w[4];
    for (int64_t pixel = begin; pixel < end; ++pixel) {  // pixel = n * S + s
      const int64_t n = pixel / S, s = pixel % S;
      for (int64_t cg = 0; cg < C4; ++cg) {
        philox(static_cast<uint64_t>(pixel * C4 + cg), q.seed_lo, q.seed_hi, w);
        for (int64_t c = cg * 4; c < std::min(C, cg * 4 + 4); ++c) {
          const int64_t i = channels_last ? pixel * C + c : (n * C + c) * S + s;
          y[i] = apply(x[i], w[c % 4], q);
        }
      }
    }
  });
}

// 16 lanes of Philox; counters (lo, hi) per lane.
struct Words16 {
  __m512i w[4];
};

DDPM_AVX512 inline void mulhilo(__m512i m, __m512i a, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(m, a);                         // 64-bit products of lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(m, _mm512_srli_epi64(a, 32));  // of lanes 1, 3, ...
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

DDPM_AVX512 inline Words16 philox16(__m512i c0, __m512i c1, const Params& q) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kMul0)), m1 = _mm512_set1_epi32(static_cast<int>(kMul1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = q.seed_lo, k1 = q.seed_hi;
  for (int r = 0; r < kRounds; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(m0, c0, hi0, lo0);
    mulhilo(m1, c2, hi1, lo1);
    c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // a ^ b ^ c
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = lo1;
    c3 = lo0;
    k0 += kKey0;
    k1 += kKey1;
  }
  return {{c0, c1, c2, c3}};
}

// Counters base + step * lane for the first `lanes` lanes, split into 32-bit halves.
DDPM_AVX512 inline void counters16(uint64_t base, uint64_t step, int lanes, __m512i& lo, __m512i& hi) {
  alignas(64) uint32_t l[16] = {}, h[16] = {};
  for (int j = 0; j < lanes; ++j) {
    const uint64_t c = base + step * static_cast<uint64_t>(j);
    l[j] = static_cast<uint32_t>(c);
    h[j] = static_cast<uint32_t>(c >> 32);
  }
  lo = _mm512_load_si512(l);
  hi = _mm512_load_si512(h);
}

template <typename T>
DDPM_AVX512 inline void apply16(const T* x, T* y, __m512i draw, __mmask16 m, const Params& q) {
  const __mmask16 keep = _mm512_mask_cmpge_epu32_mask(m, draw, _mm512_set1_epi32(static_cast<int>(q.threshold)));
  store16(y, _mm512_maskz_mul_ps(keep, load16(x, m), _mm512_set1_ps(q.scale)), m);
}

// NCHW tasks [begin, end) of (sample, group of 4 channels): 16 pixels of 4 rows per Philox.
template <typename T>
DDPM_AVX512 void dropout_nchw_avx512(const T* x, T* y, int64_t C, int64_t S, const Params& q, int64_t begin,
                                     int64_t end) {
  const int64_t C4 = (C + 3) / 4;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / C4, cg = task % C4, rows = std::min<int64_t>(4, C - cg * 4);
    for (int64_t s = 0; s < S; s += 16) {
      const int lanes = static_cast<int>(std::min<int64_t>(16, S - s));
      __m512i lo, hi;
      counters16(static_cast<uint64_t>((n * S + s) * C4 + cg), static_cast<uint64_t>(C4), lanes, lo, hi);
      const Words16 r = philox16(lo, hi, q);
      for (int64_t k = 0; k < rows; ++k) {
        const int64_t i = (n * C + cg * 4 + k) * S + s;
        apply16(x + i, y + i, r.w[k], tail_mask(lanes), q);
      }
    }
  }
}

// Words w[0..3] of counters 0..15 -> draws of channels 16j .. 16j + 15 in out[j] (channel 4i + k
// takes word k of counter i): a 4x4 transpose of 32-bit lanes, then of 128-bit blocks.
DDPM_AVX512 inline void interleave(const Words16& r, __m512i out[4]) {
  const __m512i t01l = _mm512_unpacklo_epi32(r.w[0], r.w[1]), t01h = _mm512_unpackhi_epi32(r.w[0], r.w[1]);
  const __m512i t23l = _mm512_unpacklo_epi32(r.w[2], r.w[3]), t23h = _mm512_unpackhi_epi32(r.w[2], r.w[3]);
  // block b of a/b/c/d: counter 4b / 4b+1 / 4b+2 / 4b+3, words 0..3
  const __m512i a = _mm512_unpacklo_epi64(t01l, t23l), b = _mm512_unpackhi_epi64(t01l, t23l);
  const __m512i c = _mm512_unpacklo_epi64(t01h, t23h), d = _mm512_unpackhi_epi64(t01h, t23h);
  const __m512i ab_lo = _mm512_shuffle_i32x4(a, b, 0x44), ab_hi = _mm512_shuffle_i32x4(a, b, 0xEE);
  const __m512i cd_lo = _mm512_shuffle_i32x4(c, d, 0x44), cd_hi = _mm512_shuffle_i32x4(c, d, 0xEE);
  out[0] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
  out[1] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xDD);
  out[2] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
  out[3] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xDD);
}

// channels_last pixels [begin, end): 64 channels per Philox.
template <typename T>
DDPM_AVX512 void dropout_nhwc_avx512(const T* x, T* y, int64_t C, const Params& q, int64_t begin, int64_t end) {
  const int64_t C4 = (C + 3) / 4;
  __m512i draws[4];
  for (int64_t pixel = begin; pixel < end; ++pixel) {
    for (int64_t c = 0; c < C; c += 64) {
      const int counters = static_cast<int>(std::min<int64_t>(16, C4 - c / 4));
      __m512i lo, hi;
      counters16(static_cast<uint64_t>(pixel * C4 + c / 4), 1, counters, lo, hi);
      interleave(philox16(lo, hi, q), draws);
      for (int64_t j = 0; j < 4 && c + 16 * j < C; ++j) {
        const int64_t i = pixel * C + c + 16 * j;
        apply16(x + i, y + i, draws[j], tail_mask(C - c - 16 * j), q);
      }
    }
  }
}

Tensor dropout_cpu(const Tensor& x_in, const Tensor& seed, double p) {
  TORCH_CHECK(x_in.dim() >= 2, "dropout: x must be (N, C, ...), got ", x_in.dim(), " dims");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "dropout: the CPU kernel takes float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "dropout: seed must be a one-element int64 CPU tensor");
  const bool channels_last = x_in.dim() == 4 && !x_in.is_contiguous() &&
                             x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor x = channels_last ? x_in : x_in.contiguous();
  Tensor y = at::empty_like(x);  // preserves the (now dense) layout
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / std::max<int64_t>(1, N * C);
  if (x.numel() == 0) return y;

  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  const Params q{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32),
                 static_cast<uint32_t>(std::min<double>(p * 4294967296.0 + 0.5, 4294967295.0)),
                 static_cast<float>(1.0 / (1.0 - p))};
  // The lambdas only pass pointers and integers to the AVX-512 functions: vector values must not
  // cross from code compiled without AVX-512 (the lambdas) into code compiled with it.
  auto run = [&](auto* xp, auto* yp) {
    if (!cpu_has_avx512()) return dropout_scalar(xp, yp, N, C, S, channels_last, q);
    if (channels_last) {
      return parallel_for_caller_last(0, N * S, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
        dropout_nhwc_avx512(xp, yp, C, q, begin, end);
      });
    }
    parallel_for_caller_last(0, N * ((C + 3) / 4), 1,
                             [&](int64_t begin, int64_t end) { dropout_nchw_avx512(xp, yp, C, S, q, begin, end); });
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>(), y.data_ptr<float>());
  } else {
    run(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_perf, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace ddpm_perf::cpu
