// CPU kernels of group_norm_silu: y = [silu](group_norm(x + shift) * weight + bias).
//
// Forward: slices of (sample, group) for NCHW, of (sample, block of groups) for channels_last, in
// parallel (parallel_chunks: each thread runs its own range, idle ones take from the others'). A
// task is a slice in NCHW, a pixel range of one in channels_last (its first task computes the
// statistics). Statistics are fp32 lane sums of (x - pivot), combined in fp64
// (the pivot, an element of the same group (NCHW) or channel (channels_last), keeps E[x^2] -
// E[x]^2 from cancelling). A slice is read twice (statistics, then output), the second time from
// cache; in NCHW the output loop also sums a slice ahead, and fp32 outputs of 8 MiB or more are
// written with non-temporal stores (kStreamBytes). AVX-512 where the
// CPU has it (checked at run time), with AVX512_BF16 conversions for bf16 output where it has
// those, portable C++ otherwise. bf16 comes in 32 values at a time as their even- and odd-indexed
// halves (load32_pair, simd.h), so channels_last blocks of 32 channels keep their per-channel
// values in that pair order (to_pair_order). group_norm_silu_quantized runs the same forward and
// stores uint8 codes for an int8 consumer (quantize.h; AVX512_VBMI where the CPU has it).
// Backward: per (sample, group) for NCHW, per (sample, block of groups) for channels_last: dz and
// its per-channel sums in one pass (dz kept in an fp32 scratch), dx in a second; AVX-512 where the
// CPU has it, portable C++ otherwise.
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "parallel.h"
#include "quantize.h"
#include "silu.h"
#include "simd.h"

namespace ddpm_perf::cpu {
namespace {

using at::Tensor;

inline float silu(float z) { return z / (1.f + std::exp(-z)); }

// Tasks [0, tasks) shared by the threads: each owns an equal contiguous range and runs it front to
// back a chunk at a time (about 8 chunks a thread); a thread done with its own range takes chunks
// from the back of the others'. So a thread that starts late (an OpenMP worker asleep under
// OMP_WAIT_POLICY=PASSIVE takes 20-50 us to wake here) or runs slowly (a busy neighbour on its core)
// ends up with less work, while an owner still reads its range as one stream.
// fn(begin, end, extend): run tasks [begin, end); extend(end) claims the owner's next chunk, which
// starts at end, and returns the new end (unchanged when there is none, or for a taken chunk).
// Calling extend is optional: chunks an owner leaves are run from the back. Callers' results must
// not depend on which thread runs which task.
class TaskRanges {
 public:
  TaskRanges(int64_t tasks, int64_t owners)
      : ranges_(owners), chunk_(std::max<int64_t>(1, tasks / (8 * owners))) {
    TORCH_CHECK(tasks < (int64_t(1) << 31), "group_norm_silu: too many tasks to share out: ", tasks);
    for (int64_t t = 0; t < owners; ++t) ranges_[t].v.store(pack(tasks * t / owners, tasks * (t + 1) / owners));
  }
  // the next chunk [begin, end) at the front (the owner) or the back (the others) of a range;
  // begin == end when it is empty
  std::pair<int64_t, int64_t> front(int64_t owner) { return claim(owner, true); }
  std::pair<int64_t, int64_t> back(int64_t owner) { return claim(owner, false); }

 private:
  struct alignas(64) Range {
    std::atomic<uint64_t> v;  // front | back << 32
  };
  static uint64_t pack(int64_t front, int64_t back) { return uint64_t(front) | uint64_t(back) << 32; }
  std::pair<int64_t, int64_t> claim(int64_t owner, bool at_front) {
    std::atomic<uint64_t>& r = ranges_[owner].v;
    uint64_t now = r.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t f = int64_t(now & 0xffffffffu), b = int64_t(now >> 32);
      if (f >= b) return {f, f};
      const int64_t cut = at_front ? std::min(b, f + chunk_) : std::max(f, b - chunk_);
      if (r.compare_exchange_weak(now, at_front ? pack(cut, b) : pack(f, cut), std::memory_order_relaxed))
        return at_front ? std::make_pair(f, cut) : std::make_pair(cut, b);
    }
  }
  std::vector<Range> ranges_;
  int64_t chunk_;
};

template <typename F>
void parallel_chunks(int64_t tasks, const F& fn) {
  const int64_t threads = at::get_num_threads();
  TaskRanges ranges(tasks, threads);
  const auto unchanged = [](int64_t end) { return end; };
  parallel_for_caller_last(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t own = first; own < last; ++own) {
      const auto extend = [&](int64_t end) {
        const auto [begin, next_end] = ranges.front(own);  // begin == end: only the owner moves the front
        return begin < next_end ? next_end : end;
      };
      const auto [begin, end] = ranges.front(own);
      if (begin < end) fn(begin, end, extend);
    }
    // then every range from the back, this thread's own included: a caller that never calls
    // extend leaves its range's later chunks there, and at one thread no one else takes them
    for (int64_t k = 0; k < threads; ++k) {
      const int64_t other = (first + k) % threads;
      for (auto c = ranges.back(other); c.first < c.second; c = ranges.back(other)) fn(c.first, c.second, unchanged);
    }
  });
}

struct Affine {  // per-channel fp32 parameters, any of them may be null
  const float* weight;
  const float* bias;
  const float* shift;  // row of the (N, C) shift for this sample
  float w(int64_t c) const { return weight ? weight[c] : 1.f; }
  float b(int64_t c) const { return bias ? bias[c] : 0.f; }
  float s(int64_t c) const { return shift ? shift[c] : 0.f; }
};

// The output parameters of one NCHW slice, a channel at a time, where the row loops need them:
// center = shift[c] - mean (in fp64), scale = rstd * weight[c], offset = bias[c]. Written to
// arrays before the output pass instead, they cost 4-5% of a one-thread 8x8 call
// (docs/performance.md, session 21).
struct SliceParams {
  Affine a;
  double v0, m;  // mean = v0 + m, v0 = pivot + shift[0]
  float rstd;
  float center(int64_t c) const { return float(double(a.s(c)) - v0 - m); }
  float scale(int64_t c) const { return rstd * a.w(c); }
  float offset(int64_t c) const { return a.b(c); }
};

// Mean and variance from per-channel sums of v = x + shift - pivot[c] over `hw` elements each.
// Returns the fp64 mean.
double combine(const double* s1, const double* s2, const float* pivot, int64_t channels, int64_t hw, float eps,
             float* mean, float* rstd) {
  double total = 0;
  for (int64_t c = 0; c < channels; ++c) total += s1[c] + pivot[c] * double(hw);
  const double cnt = double(channels * hw), mu = total / cnt;
  double m2 = 0;
  for (int64_t c = 0; c < channels; ++c) {
    const double d = pivot[c] - mu;
    m2 += s2[c] + 2 * d * s1[c] + d * d * double(hw);
  }
  *mean = float(mu);
  *rstd = float(1.0 / std::sqrt(std::max(m2 / cnt, 0.0) + eps));
  return mu;
}

// ---- statistics ----

// v = x + offset_to_v(a, c, pivot) = x + shift[c] - shift[0] - pivot, the offset rounded once
inline float offset_to_v(const Affine& a, int64_t c, float pivot) {
  return float(double(a.s(c)) - a.s(0) - pivot);
}

// NCHW, one (sample, group) slice of cpg channels of hw contiguous elements, summed as one run:
// sums of v = x + shift[c] - shift[0] - pivot, the pivot being the slice's first x. One reduction
// per group: per-channel reductions cost more than the channel's own sums at small hw. Within the
// pivot's channel v is exactly x - pivot, so a group of one value normalises to exactly 0.

template <typename T>
void nchw_sums_scalar(const T* x, int64_t cpg, int64_t hw, Affine a, double* s1, double* s2, float* pivot) {
  *pivot = to_float(x[0]);
  *s1 = *s2 = 0;
  for (int64_t c = 0; c < cpg; ++c) {
    const T* xc = x + c * hw;
    const float off = offset_to_v(a, c, *pivot);
    for (int64_t i0 = 0; i0 < hw; i0 += 256) {  // fp32 partial sums of 256 elements, fp64 totals
      float acc1 = 0, acc2 = 0;
      for (int64_t i = i0; i < std::min(hw, i0 + 256); ++i) {
        const float v = to_float(xc[i]) + off;
        acc1 += v;
        acc2 += v * v;
      }
      *s1 += acc1, *s2 += acc2;
    }
  }
}

struct LaneSums {  // fp64 lane totals of two fp32 accumulators (forward statistics, backward sums)
  __m512d a_lo, a_hi, b_lo, b_hi;
};

DDPM_AVX512 inline void flush_sums(LaneSums& s, __m512 a, __m512 b) {
  s.a_lo = _mm512_add_pd(s.a_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(a)));
  s.a_hi = _mm512_add_pd(s.a_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1))));
  s.b_lo = _mm512_add_pd(s.b_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(b)));
  s.b_hi = _mm512_add_pd(s.b_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1))));
}

// Sums of v = x + off and v^2 over n contiguous elements into fp32 lanes, flushed to fp64 every
// 256 vectors of a run.
template <typename T>
DDPM_AVX512 inline void sums_run_avx512(const T* x, int64_t n, __m512 off, LaneSums& total) {
  __m512 a1 = _mm512_setzero_ps(), a2 = a1, b1 = a1, b2 = a1;
  int64_t i = 0;
  while (i + 32 <= n) {
    const int64_t stop = std::min(n & ~int64_t(31), i + 256 * 16);
    for (; i < stop; i += 32) {  // two independent chains hide the add latency
      __m512 u, v;
      load32_pair(x + i, u, v);
      u = _mm512_add_ps(u, off), v = _mm512_add_ps(v, off);
      a1 = _mm512_add_ps(a1, u), a2 = _mm512_fmadd_ps(u, u, a2);
      b1 = _mm512_add_ps(b1, v), b2 = _mm512_fmadd_ps(v, v, b2);
    }
    flush_sums(total, _mm512_add_ps(a1, b1), _mm512_add_ps(a2, b2));
    a1 = a2 = b1 = b2 = _mm512_setzero_ps();
  }
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 u = _mm512_maskz_add_ps(m, load16(x + i, m), off);
    a1 = _mm512_add_ps(a1, u), a2 = _mm512_fmadd_ps(u, u, a2);
  }
  flush_sums(total, a1, a2);
}

DDPM_AVX512 inline double lane_total(__m512d lo, __m512d hi) { return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)); }

template <typename T>
DDPM_AVX512 void nchw_sums_avx512(const T* x, int64_t cpg, int64_t hw, Affine a, double* s1, double* s2,
                                  float* pivot) {
  *pivot = to_float(x[0]);
  const __m512d zd = _mm512_setzero_pd();
  LaneSums total{zd, zd, zd, zd};
  if (!a.shift) {  // the slice is one run
    sums_run_avx512(x, cpg * hw, _mm512_set1_ps(-*pivot), total);
  } else {
    for (int64_t c = 0; c < cpg; ++c) sums_run_avx512(x + c * hw, hw, _mm512_set1_ps(offset_to_v(a, c, *pivot)), total);
  }
  *s1 = lane_total(total.a_lo, total.a_hi);
  *s2 = lane_total(total.b_lo, total.b_hi);
}

// channels_last, a block of cb channels of one sample (x: its first channel at pixel 0, pixel
// stride C): per-channel sums of v = x - pivot[c] over the HW pixels (the shift cancels in
// (x + shift) - (pivot + shift)). Accumulated in s1, s2 (zeroed by the caller).
template <typename T>
void pixels_sums_scalar(const T* x, int64_t C, int64_t HW, int64_t cb, const float* pivot, double* s1,
                        double* s2) {
  for (int64_t p = 0; p < HW; ++p)
    for (int64_t c = 0; c < cb; ++c) {
      const float v = to_float(x[p * C + c]) - pivot[c];
      s1[c] += v, s2[c] += double(v) * v;
    }
}

// Per-channel values of whole blocks of 32 channels in the order load32_pair gives the channels:
// for bf16 the even channels of a block, then its odd ones (fp32: unchanged). What is left past the
// last whole block stays in channel order, for the 16-lane tail loops.
template <typename T, typename V>
void to_pair_order(V* values, int64_t channels) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    V block[32];
    for (int64_t c = 0; c + 32 <= channels; c += 32) {
      for (int l = 0; l < 16; ++l) block[l] = values[c + 2 * l], block[16 + l] = values[c + 2 * l + 1];
      std::copy(block, block + 32, values + c);
    }
  }
}

// channels_last per-channel sums are fp32 partial sums over windows of this many pixels (from
// pixel 0), each added to the fp64 totals.
constexpr int64_t kPixelWindow = 256;

// The rest of each pixel's row of a slice, bytes [from, to) past the block being summed,
// prefetched `ahead` pixels ahead for pixels below `until`; to == 0: none.
struct RowPrefetch {
  int64_t from = 0, to = 0, ahead = 0, until = 0;
};

// NV vectors of 16 channels (the last one `last` lanes wide) held in registers over all pixels,
// in fp32 partial sums of kPixelWindow pixels added to the fp64 totals. Whole blocks of 32
// channels are loaded by load32_pair; pivots and sums stay in channel order outside.
// Full: the last vector is whole (last == 16), so that width, and with it every branch of the
// pixel loop, is known at compile time; with a run-time width the compiler kept the branches and
// spilled the accumulators to the stack.
template <typename T, int NV, bool Full>
DDPM_AVX512 void pixels_sums_block_avx512(const T* x, int64_t C, int64_t HW, int64_t last_in, const float* pivot,
                                          double* s1, double* s2, const RowPrefetch& pf = {}) {
  constexpr int64_t kFlush = kPixelWindow;
  const int64_t last = Full ? 16 : last_in;
  const __mmask16 mlast = tail_mask(last);
  const int64_t width = 16 * (NV - 1) + last;
  alignas(64) float pivots[16 * NV];  // in the order the loads give the channels
  std::copy(pivot, pivot + width, pivots);
  to_pair_order<T>(pivots, width);
  __m512 pv[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) pv[j] = _mm512_maskz_loadu_ps(j == NV - 1 ? mlast : __mmask16(0xffff), pivots + 16 * j);
  for (int64_t p0 = 0; p0 < HW; p0 += kFlush) {
    const int64_t p1 = std::min(HW, p0 + kFlush);
    __m512 a1[NV], a2[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) a1[j] = a2[j] = _mm512_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      const T* xp = x + p * C;
      if (pf.to && p < pf.until) {  // every other line: the L2's adjacent-line prefetcher fetches its pair
        const char* row = reinterpret_cast<const char*>(xp + pf.ahead * C);
        for (int64_t b = pf.from; b < pf.to; b += 128) __builtin_prefetch(row + b, 0, 2);
      }
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        __m512 u;
        if (j % 2 == 0 && 16 * j + 32 <= width) {  // a whole block of 32 channels: vectors j and j + 1
          __m512 v;
          load32_pair(xp + 16 * j, u, v);
          v = _mm512_sub_ps(v, pv[j + 1]);
          a1[j + 1] = _mm512_add_ps(a1[j + 1], v), a2[j + 1] = _mm512_fmadd_ps(v, v, a2[j + 1]);
        } else if (j % 2 == 1 && 16 * j + 16 <= width) {  // loaded with vector j - 1
          continue;
        } else {
          u = j == NV - 1 ? load16(xp + 16 * j, mlast) : loadu16(xp + 16 * j);
        }
        u = _mm512_sub_ps(u, pv[j]);
        a1[j] = _mm512_add_ps(a1[j], u), a2[j] = _mm512_fmadd_ps(u, u, a2[j]);
      }
    }
    alignas(64) float r1[16], r2[16];
    for (int j = 0; j < NV; ++j) {
      _mm512_store_ps(r1, a1[j]), _mm512_store_ps(r2, a2[j]);
      const int64_t lanes = j == NV - 1 ? last : 16, block = 16 * (j & ~1);
      const bool paired = std::is_same_v<T, uint16_t> && block + 32 <= width;  // lane l: channel 2l (+1 if j odd)
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t c = paired ? block + 2 * l + (j & 1) : 16 * j + l;
        s1[c] += r1[l], s2[c] += r2[l];
      }
    }
  }
}

// Blocks of up to 128 channels (8 vectors: 16 accumulators + 8 pivots in registers), in tiles of
// one window of pixels: every block of a tile before the next tile, and the first block's pass
// prefetches the rest of the rows `kRowsAhead` pixels ahead. So a slice wider than one block is
// read from L3 or memory once, as one stream of whole rows, and its other blocks read the tile
// (at most 384 KiB at the U-Net's 384 channels) from L2. Against sweeping each block over all
// pixels (a part of each row, the rows again for each block): fp32 8x384x32x32 1.18-1.27x as fast
// in cache, 256x32x32 1.06x, 1.01-1.13x from memory, bf16 384x32x32 from memory 1.11x, the rest
// 0.94-1.07x (docs/performance.md, session 30). The sums are the same operations in the same
// order as a sweep's, so the outputs are bit-identical to it.
template <typename T>
DDPM_AVX512 void pixels_sums_avx512(const T* x, int64_t C, int64_t HW, int64_t cb, const float* pivot, double* s1,
                                    double* s2) {
  constexpr int64_t kRowsAhead = 32;
  const int64_t elt = sizeof(T);
  for (int64_t p0 = 0; p0 < HW; p0 += kPixelWindow) {
    const int64_t pixels = std::min(kPixelWindow, HW - p0);
    const T* xt = x + p0 * C;
    for (int64_t c = 0; c < cb; c += 128) {
      const int64_t width = std::min<int64_t>(128, cb - c), nv = (width + 15) / 16, last = width - 16 * (nv - 1);
      const bool first = c == 0 && cb > width;  // of several blocks
      const RowPrefetch pf = first ? RowPrefetch{width * elt, cb * elt, kRowsAhead, HW - p0 - kRowsAhead}
                                   : RowPrefetch{};
      const T* xc = xt + c;
      switch (nv) {
#define GN_CASE(K)                                                                                             \
  case K:                                                                                                      \
    if (last == 16) pixels_sums_block_avx512<T, K, true>(xc, C, pixels, last, pivot + c, s1 + c, s2 + c, pf);  \
    else pixels_sums_block_avx512<T, K, false>(xc, C, pixels, last, pivot + c, s1 + c, s2 + c, pf);            \
    break;
        GN_CASE(1) GN_CASE(2) GN_CASE(3) GN_CASE(4) GN_CASE(5) GN_CASE(6) GN_CASE(7) GN_CASE(8)
#undef GN_CASE
      }
    }
  }
}

// ---- output: y = act((x + center) * scale + offset) ----
// (x - mean) * scale + b rather than x * scale + (b - mean * scale): the latter loses digits when
// the variance is tiny and rstd large.
//   rows_out: rows of len contiguous elements, one channel each (NCHW), a slice's parameters;
//   pixels_out: HW pixels of a block of cb channels (channels_last, pixel stride C), per-channel
//   parameters;
//   ahead (rows): the distance in bytes to the next task's slice, prefetched as the pass goes (0:
//   none). pixels_out does not prefetch: its slices are whole samples, 512 KiB at 128x32x32, and
//   bringing in the next one evicted the current slice from the 1 MiB L2 before the output pass
//   re-read it (warm fp32 8-17% slower at 128x32x32 and 512x16x16 with it; docs/performance.md,
//   session 18).

inline void store_out(float* p, float v, const Quant&) { *p = v; }
inline void store_out(uint16_t* p, float v, const Quant&) { *p = float_to_bf16(v); }
inline void store_out(uint8_t* p, float v, const Quant& q) { *p = quantize(v, q); }

template <typename T, typename Y, bool Act>
void rows_out_scalar(const T* x, Y* y, int64_t rows, int64_t len, const SliceParams& p, const Quant& q,
                     int64_t /*ahead*/) {
  for (int64_t r = 0; r < rows; ++r) {
    const float center = p.center(r), scale = p.scale(r), offset = p.offset(r);
    for (int64_t i = r * len; i < (r + 1) * len; ++i) {
      const float z = (to_float(x[i]) + center) * scale + offset;
      store_out(y + i, Act ? silu(z) : z, q);
    }
  }
}

template <typename T, typename Y, bool Act>
void pixels_out_scalar(const T* x, Y* y, int64_t C, int64_t HW, int64_t cb, const float* center,
                       const float* scale, const float* offset, const Quant& q) {
  for (int64_t p = 0; p < HW; ++p)
    for (int64_t c = 0; c < cb; ++c) {
      const float z = (to_float(x[p * C + c]) + center[c]) * scale[c] + offset[c];
      store_out(y + p * C + c, Act ? silu(z) : z, q);
    }
}

// Prefetch (into L2) the 32 elements `ahead` bytes past p: the same place in the next task's
// slice. The output pass computes from cache while the next slice comes in, so the next task's
// statistics pass does not wait on memory (fp32: 5-15% faster at the larger cifar10 shapes).
template <typename T>
inline void prefetch_next(const T* p, int64_t ahead) {
  const char* q = reinterpret_cast<const char*>(p) + ahead;
  __builtin_prefetch(q, 0, 2);
  if constexpr (sizeof(T) == 4) __builtin_prefetch(q + 64, 0, 2);
}

// Stores of 16 (masked) and 32 lanes: fp32, bf16 by shifts and adds (any AVX-512 CPU), or uint8
// quantised with q (ignored by the others) ...
DDPM_AVX512 inline void out16(float* p, __m512 v, __mmask16 m, const Quant&) { store16(p, v, m); }
DDPM_AVX512 inline void out16(uint16_t* p, __m512 v, __mmask16 m, const Quant&) { store16(p, v, m); }
DDPM_AVX512 inline void out16(uint8_t* p, __m512 v, __mmask16 m, const Quant& q) { store16(p, v, m, q); }
DDPM_AVX512 inline void out32(float* p, __m512 lo, __m512 hi, const Quant&) {
  _mm512_storeu_ps(p, lo), _mm512_storeu_ps(p + 16, hi);
}
DDPM_AVX512 inline void out32(uint16_t* p, __m512 lo, __m512 hi, const Quant&) {
  store16(p, lo, 0xffff), store16(p + 16, hi, 0xffff);
}
DDPM_AVX512 inline void out32(uint8_t* p, __m512 lo, __m512 hi, const Quant& q) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_set_m128i(quantize16_u8(hi, q), quantize16_u8(lo, q)));
}
// 32 values in load32_pair's order for the input type T: for a bf16 input, the even- and
// odd-indexed values, interleaved back here.
template <typename T>
DDPM_AVX512 inline void out32_pair(float* p, __m512 a, __m512 b, const Quant&) { store32_pair(p, a, b); }
template <typename T>
DDPM_AVX512 inline void out32_pair(uint16_t* p, __m512 even, __m512 odd, const Quant&) { store32_pair(p, even, odd); }
template <typename T>
DDPM_AVX512 inline void out32_pair(uint8_t* p, __m512 a, __m512 b, const Quant& q) {
  if constexpr (std::is_same_v<T, float>) return out32(p, a, b, q);
  const __m128i even = quantize16_u8(a, q), odd = quantize16_u8(b, q);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_set_m128i(_mm_unpackhi_epi8(even, odd), _mm_unpacklo_epi8(even, odd)));
}
// ... or bf16 by vcvtneps2bf16 / vcvtne2ps2bf16 (AVX512_BF16).
DDPM_AVX512_BF16 inline void out16_bf16(uint16_t* p, __m512 v, __mmask16 m, const Quant&) { store16_bf16(p, v, m); }
DDPM_AVX512_BF16 inline void out32_bf16(uint16_t* p, __m512 lo, __m512 hi, const Quant&) { store32_bf16(p, lo, hi); }
template <typename T>
DDPM_AVX512_BF16 inline void out32_pair_bf16(uint16_t* p, __m512 even, __m512 odd, const Quant&) {
  store32_pair_bf16(p, even, odd);
}

// ... or fp32 by non-temporal stores (64-byte aligned p), for outputs too large to stay in cache
// (kStreamBytes): no read for ownership of each line before it is written.
DDPM_AVX512 inline void out32_stream(float* p, __m512 lo, __m512 hi, const Quant&) {
  _mm512_stream_ps(p, lo), _mm512_stream_ps(p + 16, hi);
}
template <typename T>
DDPM_AVX512 inline void out32_pair_stream(float* p, __m512 a, __m512 b, const Quant& q) {
  static_assert(std::is_same_v<T, float>, "streamed stores take fp32 input's plain order");
  out32_stream(p, a, b, q);
}

// ... or uint8 by float rounding and one byte permutation (AVX512_VBMI, quantize.h).
DDPM_AVX512_VBMI inline void out16_vbmi(uint8_t* p, __m512 v, __mmask16 m, const Quant& q) { store16_vbmi(p, v, m, q); }
DDPM_AVX512_VBMI inline void out32_vbmi(uint8_t* p, __m512 lo, __m512 hi, const Quant& q) {
  store32_vbmi<false>(p, lo, hi, q);
}
template <typename T>
DDPM_AVX512_VBMI inline void out32_pair_vbmi(uint8_t* p, __m512 a, __m512 b, const Quant& q) {
  store32_vbmi<!std::is_same_v<T, float>>(p, a, b, q);
}

// The AVX-512 output loops, stamped once per store flavour: a function's target attribute cannot
// depend on a template parameter, and the AVX512_BF16 (AVX512_VBMI) stores only inline into
// functions whose target includes avx512bf16 (avx512vbmi).
#define GN_OUTPUT_KERNELS(TARGET, SUFFIX, OUT16, OUT32, OUT32_PAIR)                                            \
  /* 32 contiguous values of a row with its parameters vc, vs, vo */                                           \
  template <typename T, typename Y, bool Act>                                                                  \
  TARGET inline void row_out32_##SUFFIX(const T* x, Y* y, __m512 vc, __m512 vs, __m512 vo, const Quant& q) {   \
    constexpr bool precise = std::is_same_v<Y, float>;                                                         \
    __m512 z0, z1;                                                                                             \
    load32_pair(x, z0, z1);                                                                                    \
    z0 = _mm512_fmadd_ps(_mm512_add_ps(z0, vc), vs, vo), z1 = _mm512_fmadd_ps(_mm512_add_ps(z1, vc), vs, vo);  \
    if constexpr (Act) z0 = silu16_fast<precise>(z0), z1 = silu16_fast<precise>(z1);                           \
    OUT32_PAIR<T>(y, z0, z1, q);                                                                               \
  }                                                                                                            \
  template <typename T, typename Y, bool Act>                                                                  \
  TARGET void rows_out_##SUFFIX(const T* x, Y* y, int64_t rows, int64_t len, const SliceParams& p,             \
                                const Quant& q, int64_t ahead) {                                               \
    constexpr bool precise = std::is_same_v<Y, float>;                                                         \
    for (int64_t r = 0; r < rows; ++r, x += len, y += len) {                                                   \
      const __m512 vc = _mm512_set1_ps(p.center(r)), vs = _mm512_set1_ps(p.scale(r)), vo = _mm512_set1_ps(p.offset(r)); \
      int64_t i = 0;                                                                                           \
      for (; i + 32 <= len; i += 32) {                                                                         \
        if (ahead) prefetch_next(x + i, ahead);                                                                \
        row_out32_##SUFFIX<T, Y, Act>(x + i, y + i, vc, vs, vo, q);                                            \
      }                                                                                                        \
      for (; i < len; i += 16) {                                                                               \
        const __mmask16 m = tail_mask(len - i);                                                                \
        __m512 z = _mm512_fmadd_ps(_mm512_add_ps(load16(x + i, m), vc), vs, vo);                               \
        if constexpr (Act) z = silu16_fast<precise>(z);                                                        \
        OUT16(y + i, z, m, q);                                                                                 \
      }                                                                                                        \
    }                                                                                                          \
  }                                                                                                            \
  /* rows_out for rows of len % 32 == 0, that also sums the next slice (v = next + next_off[row]) in */        \
  /* exactly nchw_sums_avx512's order: one run (per_row false), or one run per row (with a shift). So a */     \
  /* slice's statistics do not depend on which path summed it. */                                              \
  template <typename T, typename Y, bool Act>                                                                  \
  TARGET void rows_out_sums_##SUFFIX(const T* x, Y* y, int64_t rows, int64_t len, const SliceParams& p,        \
                                     const Quant& q,                                                           \
                                     const T* next,                                                            \
                                     const float* next_off, bool per_row, double* s1, double* s2,              \
                                     int64_t ahead) {                                                          \
    const __m512d zd = _mm512_setzero_pd();                                                                    \
    LaneSums total{zd, zd, zd, zd};                                                                            \
    __m512 a1 = _mm512_setzero_ps(), a2 = a1, b1 = a1, b2 = a1;                                                \
    const int64_t n = rows * len;                                                                              \
    for (int64_t r = 0, k = 0; r < rows; ++r) {                                                                \
      const __m512 vc = _mm512_set1_ps(p.center(r)), vs = _mm512_set1_ps(p.scale(r)), vo = _mm512_set1_ps(p.offset(r)); \
      const __m512 off = _mm512_set1_ps(next_off[r]);                                                          \
      for (int64_t i = 0; i < len; i += 32, k += 32) {                                                         \
        if (ahead) prefetch_next(next + k, ahead);                                                             \
        __m512 u, v;                                                                                           \
        load32_pair(next + k, u, v);                                                                           \
        u = _mm512_add_ps(u, off), v = _mm512_add_ps(v, off);                                                  \
        a1 = _mm512_add_ps(a1, u), a2 = _mm512_fmadd_ps(u, u, a2);                                             \
        b1 = _mm512_add_ps(b1, v), b2 = _mm512_fmadd_ps(v, v, b2);                                             \
        const int64_t done = per_row ? i + 32 : k + 32, run = per_row ? len : n;                               \
        if ((done & (256 * 16 - 1)) == 0 || done == run) {                                                     \
          flush_sums(total, _mm512_add_ps(a1, b1), _mm512_add_ps(a2, b2));                                     \
          a1 = a2 = b1 = b2 = _mm512_setzero_ps();                                                             \
        }                                                                                                      \
        row_out32_##SUFFIX<T, Y, Act>(x + k, y + k, vc, vs, vo, q);                                            \
      }                                                                                                        \
    }                                                                                                          \
    *s1 = lane_total(total.a_lo, total.a_hi), *s2 = lane_total(total.b_lo, total.b_hi);                        \
  }                                                                                                            \
  /* Pairs: each whole block of 32 channels is loaded and stored by load32_pair / store32_pair, so */          \
  /* its parameters come in pair order (to_pair_order) */                                                      \
  template <typename T, typename Y, bool Act, bool Pairs = false>                                              \
  TARGET void pixels_out_##SUFFIX(const T* x, Y* y, int64_t C, int64_t HW, int64_t cb, const float* center,    \
                                  const float* scale, const float* offset, const Quant& q) {                   \
    constexpr bool precise = std::is_same_v<Y, float>;                                                         \
    for (int64_t p = 0; p < HW; ++p) {                                                                         \
      const T* xp = x + p * C;                                                                                 \
      Y* yp = y + p * C;                                                                                       \
      int64_t c = 0;                                                                                           \
      for (; c + 32 <= cb; c += 32) {                                                                          \
        __m512 z0, z1;                                                                                         \
        if constexpr (Pairs) load32_pair(xp + c, z0, z1);                                                      \
        else z0 = loadu16(xp + c), z1 = loadu16(xp + c + 16);                                                  \
        z0 = _mm512_fmadd_ps(_mm512_add_ps(z0, _mm512_loadu_ps(center + c)), _mm512_loadu_ps(scale + c),       \
                             _mm512_loadu_ps(offset + c));                                                     \
        z1 = _mm512_fmadd_ps(_mm512_add_ps(z1, _mm512_loadu_ps(center + c + 16)), _mm512_loadu_ps(scale + c + 16), \
                             _mm512_loadu_ps(offset + c + 16));                                                \
        if constexpr (Act) z0 = silu16_fast<precise>(z0), z1 = silu16_fast<precise>(z1);                       \
        if constexpr (Pairs) OUT32_PAIR<T>(yp + c, z0, z1, q);                                                 \
        else OUT32(yp + c, z0, z1, q);                                                                         \
      }                                                                                                        \
      for (; c < cb; c += 16) {                                                                                \
        const __mmask16 m = tail_mask(cb - c);                                                                 \
        __m512 z = _mm512_fmadd_ps(_mm512_add_ps(load16(xp + c, m), _mm512_maskz_loadu_ps(m, center + c)),     \
                                   _mm512_maskz_loadu_ps(m, scale + c), _mm512_maskz_loadu_ps(m, offset + c)); \
        if constexpr (Act) z = silu16_fast<precise>(z);                                                        \
        OUT16(yp + c, z, m, q);                                                                                \
      }                                                                                                        \
    }                                                                                                          \
  }

GN_OUTPUT_KERNELS(DDPM_AVX512, avx512, out16, out32, out32_pair)
GN_OUTPUT_KERNELS(DDPM_AVX512_BF16, avx512bf16, out16_bf16, out32_bf16, out32_pair_bf16)
GN_OUTPUT_KERNELS(DDPM_AVX512_VBMI, avx512vbmi, out16_vbmi, out32_vbmi, out32_pair_vbmi)
GN_OUTPUT_KERNELS(DDPM_AVX512, avx512_stream, out16, out32_stream, out32_pair_stream)
#undef GN_OUTPUT_KERNELS

template <typename T, typename Y>
using RowsOut = void (*)(const T*, Y*, int64_t, int64_t, const SliceParams&, const Quant&, int64_t);
template <typename T, typename Y>
using RowsOutSums = void (*)(const T*, Y*, int64_t, int64_t, const SliceParams&, const Quant&, const T*,
                             const float*, bool, double*, double*, int64_t);
template <typename T, typename Y>
using PixelsOut = void (*)(const T*, Y*, int64_t, int64_t, int64_t, const float*, const float*, const float*,
                           const Quant&);

// Input T (fp32 or bf16), output Y (T, or uint8 quantised)
template <typename T, typename Y>
struct OutputKernels {
  RowsOut<T, Y> rows;
  RowsOutSums<T, Y> rows_sums;  // null without AVX-512
  PixelsOut<T, Y> pixels;
  PixelsOut<T, Y> pixels_pairs;  // parameters in pair order (to_pair_order); pixels without AVX-512
};

enum class Isa { kScalar, kAvx512, kAvx512Bf16 };

template <typename T, typename Y, bool Act>
OutputKernels<T, Y> output_kernels(Isa isa) {
  if constexpr (std::is_same_v<Y, uint8_t>)
    if (isa != Isa::kScalar && cpu_has_avx512_vbmi())
      return {rows_out_avx512vbmi<T, Y, Act>, rows_out_sums_avx512vbmi<T, Y, Act>, pixels_out_avx512vbmi<T, Y, Act>,
              pixels_out_avx512vbmi<T, Y, Act, true>};
  if constexpr (std::is_same_v<Y, uint16_t>)
    if (isa == Isa::kAvx512Bf16)
      return {rows_out_avx512bf16<T, Y, Act>, rows_out_sums_avx512bf16<T, Y, Act>, pixels_out_avx512bf16<T, Y, Act>,
              pixels_out_avx512bf16<T, Y, Act, true>};
  if (isa != Isa::kScalar)
    return {rows_out_avx512<T, Y, Act>, rows_out_sums_avx512<T, Y, Act>, pixels_out_avx512<T, Y, Act>,
            pixels_out_avx512<T, Y, Act, true>};
  return {rows_out_scalar<T, Y, Act>, nullptr, pixels_out_scalar<T, Y, Act>, pixels_out_scalar<T, Y, Act>};
}

// fp32 NCHW outputs of at least this many bytes are written with non-temporal stores. Input and
// output then fill at least half of a 32 MiB L3, so little of the output would stay in cache for
// its reader, while an ordinary store first reads each line it writes. On the Zen 4, fp32 NCHW,
// two threads: 8 MiB and 12 MiB outputs 1.11-1.25x faster warm, 1.21-1.40x cold, 1.02-1.12x with
// a consumer that reads y at once; 4 MiB outputs 0.94-0.98x warm (docs/performance.md, session
// 27). channels_last lost warm (0.64-1.05x).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// output_kernels<float, float, Act> with streamed stores in the row loops (NCHW). Every 32-value
// store of a row is 64-byte aligned when y is and rows are whole multiples of 16 values.
template <bool Act>
OutputKernels<float, float> streaming_output_kernels() {
  return {rows_out_avx512_stream<float, float, Act>, rows_out_sums_avx512_stream<float, float, Act>,
          pixels_out_avx512<float, float, Act>, pixels_out_avx512<float, float, Act, true>};
}

// ---- op ----

Tensor as_float_param(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : Tensor();
}

void check_inputs(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                  const c10::optional<Tensor>& shift, int64_t groups) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_silu: x must be (N, C, ...), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "group_norm_silu on CPU supports float32 and bfloat16 input, got ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(groups > 0 && C % groups == 0, "group_norm_silu: ", C, " channels are not divisible into ", groups,
              " groups");
  TORCH_CHECK(x.numel() > 0, "group_norm_silu: empty input");
  for (const auto* p : {&weight, &bias})
    if (p->has_value() && (*p)->defined())
      TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == C, "group_norm_silu: weight and bias must be (", C,
                  ",), got ", (*p)->sizes());
  if (shift.has_value() && shift->defined())
    TORCH_CHECK(shift->dim() == 2 && shift->size(0) == x.size(0) && shift->size(1) == C,
                "group_norm_silu: shift must be (N, C) = (", x.size(0), ", ", C, "), got ", shift->sizes());
}

bool is_channels_last(const Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// channels_last tasks are (sample, block of whole groups) slices. Whole pixel rows (one block)
// unless N samples give fewer than min_slices; then the fewest blocks that give that many, with
// block boundaries on cache lines (the slices' outputs must not share lines). Not blocks to fit a
// slice in L2: a block reads part of every row, which measured slower than whole rows at every
// size tried (fp32 8x256x32x32 1.8x slower in 512 KiB half-row slices than in 1 MiB whole ones;
// docs/performance.md, session 23).
int64_t channels_last_blocks(int64_t N, int64_t C, int64_t G, int64_t elt, int64_t min_slices) {
  int64_t blocks = 1;
  for (int64_t k = 2; k <= G && N * blocks < min_slices; ++k) {
    if (G % k) continue;
    if ((C / k) * elt % 64) break;
    blocks = k;
  }
  return blocks;
}

template <typename T, typename Y = T>
void forward_impl(const Tensor& x, Tensor& y, const Tensor& w, const Tensor& b, const Tensor& s, int64_t G,
                  float eps, bool act, float* mean, float* rstd, const Quant& q = {}) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.numel() / (N * C), cpg = C / G;
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  Y* yp = reinterpret_cast<Y*>(y.data_ptr());
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
  const Isa isa = cpu_has_avx512_bf16() ? Isa::kAvx512Bf16 : cpu_has_avx512() ? Isa::kAvx512 : Isa::kScalar;
  const bool simd = isa != Isa::kScalar;
  OutputKernels<T, Y> out = act ? output_kernels<T, Y, true>(isa) : output_kernels<T, Y, false>(isa);

  if (!is_channels_last(x)) {
    bool stream = false;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<Y, float>) {
      stream = simd && y.nbytes() >= kStreamBytes && HW % 16 == 0 && reinterpret_cast<uintptr_t>(yp) % 64 == 0;
      if (stream) out = act ? streaming_output_kernels<true>() : streaming_output_kernels<false>();
    }
    // One task per (sample, group): its cpg * HW contiguous elements are read for the statistics,
    // then again (from L1/L2) for the output. Where the output loop can (AVX-512, rows of whole
    // 32-element vectors), it also sums a slice `lead` ahead in the thread's stream: the output
    // pass is compute-bound and hides those memory reads. For slices of up to 4 KiB the lead is
    // two: the next slice's statistics (sums reduced, a fp64 square root and division) are then
    // worked out before this slice's output, not between the two, so its output loop does not
    // wait on their latency (one thread, 8x8: 7-8% faster). Larger slices hide it in their length
    // (docs/performance.md, session 21).
    const bool fuse = out.rows_sums && HW % 32 == 0;
    const int64_t lead = cpg * HW * int64_t(sizeof(T)) <= 4096 ? 2 : 1;
    parallel_chunks(N * G, [&](int64_t begin, int64_t end, const auto& extend) {
      // Below 16 elements a row, the slice's output runs as one row with its parameters per element
      // (center, scale, offset) instead of one masked vector per channel.
      const int64_t len = cpg * HW, count = HW < 16 ? len : 0;
      const double inv_len = 1.0 / double(len);
      std::vector<float> params(3 * count + cpg);
      float *center = params.data(), *scale = center + count, *offset = scale + count, *next_off = offset + count;
      const auto affine = [&](int64_t i) {
        const int64_t n = i / G, c0 = (i % G) * cpg;
        return Affine{wp ? wp + c0 : nullptr, bp ? bp + c0 : nullptr, sp ? sp + n * C + c0 : nullptr};
      };
      double s1, s2;  // sums of the slice summed last, pivot its first element
      float pivot;
      const auto sum = [&](int64_t i) {
        if (simd)
          nchw_sums_avx512(xp + i * len, cpg, HW, affine(i), &s1, &s2, &pivot);
        else
          nchw_sums_scalar(xp + i * len, cpg, HW, affine(i), &s1, &s2, &pivot);
      };
      // combine() for one pivot: var = E[v^2] - E[v]^2 of v = x + shift - shift[0] - pivot, in fp64
      const auto parameters = [&](int64_t i) {
        const Affine a = affine(i);
        const double m = s1 * inv_len, v0 = double(pivot) + a.s(0);
        const SliceParams p{a, v0, m, float(1.0 / std::sqrt(std::max(s2 * inv_len - m * m, 0.0) + eps))};
        mean[i] = float(v0 + m), rstd[i] = p.rstd;
        return p;
      };
      sum(begin);
      SliceParams p = parameters(begin);
      bool summed = false;  // s1, s2, pivot hold slice i + 1's sums
      const auto next_parameters = [&](int64_t i) {
        if (!summed) sum(i + 1);
        return parameters(i + 1);
      };
      for (int64_t i = begin; i < end; ++i) {
        if (i + lead + 1 >= end) end = extend(end);  // keep the owner's stream going: fused sums, prefetch
        SliceParams following{};
        if (lead == 2 && i + 1 < end) following = next_parameters(i);
        const T* xs = xp + i * len;
        Y* ys = yp + i * len;
        summed = fuse && i + lead < end;
        if (summed) {
          const T* next = xs + lead * len;
          const Affine an = affine(i + lead);
          pivot = to_float(next[0]);
          for (int64_t c = 0; c < cpg; ++c) next_off[c] = sp ? offset_to_v(an, c, pivot) : -pivot;
          out.rows_sums(xs, ys, cpg, HW, p, q, next, next_off, sp != nullptr, &s1, &s2,
                        i + lead + 1 < end ? len * int64_t(sizeof(T)) : 0);
        } else if (HW < 16) {
          for (int64_t c = 0, k = 0; c < cpg; ++c)
            for (int64_t j = 0; j < HW; ++j, ++k) center[k] = p.center(c), scale[k] = p.scale(c), offset[k] = p.offset(c);
          out.pixels(xs, ys, len, 1, len, center, scale, offset, q);
        } else {
          out.rows(xs, ys, cpg, HW, p, q, i + 1 < end ? len * int64_t(sizeof(T)) : 0);
        }
        if (lead == 1 && i + 1 < end) following = next_parameters(i);
        p = following;
      }
      if (stream) _mm_sfence();  // streamed stores are weakly ordered: visible before the join
    });
    return;
  }

  // channels_last: slices of cb channels of all HW pixels (channels_last_blocks): a slice is read
  // once for the per-channel sums and again, from cache, for the output. Two slices for each of
  // several threads; one thread takes whole samples, lone or not (batch 1: fp32 1x128x64x64
  // 107-118 us in two half-row blocks, 87-102 in whole rows; session 23).
  const int64_t threads = at::get_num_threads(), elt = sizeof(T);
  const int64_t blocks = channels_last_blocks(N, C, G, elt, threads > 1 ? 2 * threads : 1);
  const int64_t cb = C / blocks, gpb = G / blocks, slices = N * blocks;
  // A task is one of a slice's `parts` pixel ranges (about 64 KiB of input each). The first task to
  // reach a slice computes its statistics and parameters, and any other waits for them: the owner
  // runs a slice's parts in order, so it reads the slice twice as before, while a thread that wakes
  // late (OMP_WAIT_POLICY=PASSIVE) or finishes early shares out 64 KiB parts (at most 8 a slice)
  // rather than whole slices. A wait is at most one statistics pass of a thread that is running it.
  const int64_t parts = std::clamp<int64_t>(HW * cb * elt / (64 << 10), 1, std::min<int64_t>(HW, 8));
  const std::unique_ptr<float[]> slice_params(new float[3 * cb * slices]);  // center, scale, offset (pair order)
  // per slice: 0 no statistics yet, 1 being computed, 2 ready
  const std::unique_ptr<std::atomic<int>[]> state(new std::atomic<int>[slices]);
  for (int64_t t = 0; t < slices; ++t) state[t].store(0, std::memory_order_relaxed);
  auto slice_at = [&](int64_t t) { return (t / blocks) * HW * C + (t % blocks) * cb; };  // slice t's first element
  parallel_chunks(slices * parts, [&](int64_t begin, int64_t end, const auto& extend) {
    std::vector<double> sums(2 * cb);
    std::vector<float> pivots(2 * cb);
    double *s1 = sums.data(), *s2 = s1 + cb;
    float *pivot = pivots.data(), *pivot_s = pivot + cb;
    // slice t's parameters, computed here by the first task to need them
    auto statistics = [&](int64_t t, const T* xs, float* center, float* scale, float* offset) {
      const int64_t n = t / blocks, c0 = (t % blocks) * cb;
      for (int64_t c = 0; c < cb; ++c) pivot[c] = to_float(xs[c]);
      std::fill(sums.begin(), sums.end(), 0.0);
      if (simd)
        pixels_sums_avx512(xs, C, HW, cb, pivot, s1, s2);
      else
        pixels_sums_scalar(xs, C, HW, cb, pivot, s1, s2);
      for (int64_t j = 0; j < gpb; ++j) {
        const int64_t i = n * G + c0 / cpg + j, cj = j * cpg;
        // sums of x - x0 are sums of (x + shift) - (x0 + shift): the pivot carries the shift
        for (int64_t c = cj; c < cj + cpg; ++c) pivot_s[c] = pivot[c] + (sp ? sp[n * C + c0 + c] : 0.f);
        const double mu = combine(s1 + cj, s2 + cj, pivot_s + cj, cpg, HW, eps, mean + i, rstd + i);
        for (int64_t c = cj; c < cj + cpg; ++c) {
          center[c] = float((sp ? sp[n * C + c0 + c] : 0.0) - mu);
          scale[c] = rstd[i] * (wp ? wp[c0 + c] : 1.f);
          offset[c] = bp ? bp[c0 + c] : 0.f;
        }
      }
      if (simd) to_pair_order<T>(center, cb), to_pair_order<T>(scale, cb), to_pair_order<T>(offset, cb);
    };
    for (int64_t k = begin; k < end; ++k) {
      if (k + 1 >= end) end = extend(end);  // the owner's next chunk
      const int64_t t = k / parts, part = k % parts, start = slice_at(t);
      const T* xs = xp + start;
      Y* ys = yp + start;
      float *center = slice_params.get() + 3 * cb * t, *scale = center + cb, *offset = scale + cb;
      int expected = 0;
      if (parts == 1) {  // the slice's only task
        statistics(t, xs, center, scale, offset);
      } else if (state[t].compare_exchange_strong(expected, 1, std::memory_order_acquire)) {
        statistics(t, xs, center, scale, offset);
        state[t].store(2, std::memory_order_release);
      } else {  // spin, then yield in case the other thread was descheduled (an oversubscribed machine)
        for (int spins = 0; state[t].load(std::memory_order_acquire) != 2; ++spins) {
          if (spins < 4096)
            _mm_pause();
          else
            std::this_thread::yield();
        }
      }
      const int64_t p0 = HW * part / parts, p1 = HW * (part + 1) / parts;
      out.pixels_pairs(xs + p0 * C, ys + p0 * C, C, p1 - p0, cb, center, scale, offset, q);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_cpu(const Tensor& x_in, const c10::optional<Tensor>& weight,
                                                       const c10::optional<Tensor>& bias,
                                                       const c10::optional<Tensor>& shift, int64_t groups,
                                                       double eps, bool silu) {
  check_inputs(x_in, weight, bias, shift, groups);
  const Tensor x = is_channels_last(x_in) ? x_in : x_in.contiguous();
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({x.size(0), groups}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty_like(mean);
  const Tensor w = as_float_param(weight), b = as_float_param(bias), s = as_float_param(shift);
  if (x.scalar_type() == at::kFloat)
    forward_impl<float>(x, y, w, b, s, groups, float(eps), silu, mean.data_ptr<float>(), rstd.data_ptr<float>());
  else
    forward_impl<uint16_t>(x, y, w, b, s, groups, float(eps), silu, mean.data_ptr<float>(), rstd.data_ptr<float>());
  return {y, mean, rstd};
}

// The forward for a uint8 consumer (int8_conv2d): y quantised as it is stored, so no fp32 output
// is written and read back. Statistics are not returned (no backward). Values stay fp32 up to the
// store; the SiLU is the bf16 outputs' (relative error <= 2.9e-4, silu.h): on values inside the
// quantised range, at most 255 * 2.9e-4 = 0.074 of a quantisation step.
Tensor group_norm_silu_quantized_cpu(const Tensor& x_in, const c10::optional<Tensor>& weight,
                                     const c10::optional<Tensor>& bias, const c10::optional<Tensor>& shift,
                                     int64_t groups, double eps, bool silu, double scale, int64_t zero_point) {
  check_inputs(x_in, weight, bias, shift, groups);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "group_norm_silu_quantized: scale must be positive and finite, got ",
              scale);
  TORCH_CHECK(zero_point >= 0 && zero_point <= 255, "group_norm_silu_quantized: zero_point must be in [0, 255], got ",
              zero_point);
  const Tensor x = is_channels_last(x_in) ? x_in : x_in.contiguous();
  Tensor y = at::empty_like(x, x.options().dtype(at::kByte));
  std::vector<float> stats(2 * x.size(0) * groups);
  float *mean = stats.data(), *rstd = mean + x.size(0) * groups;
  const Tensor w = as_float_param(weight), b = as_float_param(bias), s = as_float_param(shift);
  const Quant q = make_quant(scale, zero_point);
  if (x.scalar_type() == at::kFloat)
    forward_impl<float, uint8_t>(x, y, w, b, s, groups, float(eps), silu, mean, rstd, q);
  else
    forward_impl<uint16_t, uint8_t>(x, y, w, b, s, groups, float(eps), silu, mean, rstd, q);
  return y;
}

// ---- backward ----
// With xhat = (x + shift - mean) * rstd, z = xhat * w + b, y = silu(z):
//   dz = dy * silu'(z);  dw[c] = sum dz * xhat;  db[c] = sum dz;
//   dx = rstd * (w dz - mean_group(w dz) - xhat * mean_group(w dz xhat)).
// Element (n, c, i) sits at n * sN + c * sC + i * sI (NCHW or channels_last strides).
template <typename T>
void backward_scalar(const Tensor& dy_t, const Tensor& x_t, Tensor& dx_t, const Tensor& w, const Tensor& b,
                   const Tensor& s, const float* mean, const float* rstd, int64_t G, bool act, double* dw_part,
                   double* db_part) {
  const int64_t N = x_t.size(0), C = x_t.size(1), HW = x_t.numel() / (N * C), cpg = C / G;
  const bool cl = is_channels_last(x_t);
  const int64_t sN = C * HW, sC = cl ? 1 : HW, sI = cl ? C : 1;
  const T* x = reinterpret_cast<const T*>(x_t.data_ptr());
  const T* dy = reinterpret_cast<const T*>(dy_t.data_ptr());
  T* dx = reinterpret_cast<T*>(dx_t.data_ptr());
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;

  parallel_for_caller_last(0, N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, g = ng % G;
      const float mu = mean[ng], rs = rstd[ng];
      auto dz_at = [&](int64_t c, int64_t off, float* xhat) {
        const float sh = sp ? sp[n * C + c] : 0.f;
        *xhat = (to_float(x[off]) + sh - mu) * rs;
        const float z = *xhat * (wp ? wp[c] : 1.f) + (bp ? bp[c] : 0.f), d = to_float(dy[off]);
        if (!act) return d;
        const float sig = 1.f / (1.f + std::exp(-z));
        return d * sig * (1.f + z * (1.f - sig));
      };
      double m1 = 0, m2 = 0;
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t c = g * cpg + j;
        double sdz = 0, sdzx = 0;
        for (int64_t i = 0; i < HW; ++i) {
          float xhat;
          const float dz = dz_at(c, n * sN + c * sC + i * sI, &xhat);
          sdz += dz, sdzx += double(dz) * xhat;
        }
        dw_part[n * C + c] = sdzx, db_part[n * C + c] = sdz;
        const double wc = wp ? wp[c] : 1.0;
        m1 += wc * sdz, m2 += wc * sdzx;
      }
      const double cnt = double(cpg * HW);
      const float mean_wdz = float(m1 / cnt), mean_wdzx = float(m2 / cnt);
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t c = g * cpg + j;
        const float wc = wp ? wp[c] : 1.f;
        for (int64_t i = 0; i < HW; ++i) {
          const int64_t off = n * sN + c * sC + i * sI;
          float xhat;
          const float dz = dz_at(c, off, &xhat);
          store_float(dx + off, rs * (wc * dz - mean_wdz - xhat * mean_wdzx));
        }
      }
    }
  });
}

// ---- AVX-512 backward ----
// Per task, two passes over its slice: pass 1 computes dz (stored to an fp32 scratch that stays
// in cache, so the sigmoid is evaluated once) and the per-channel sums of dz and dz * xhat in fp32
// lanes, flushed to fp64 every 256 vectors; pass 2 computes dx from x and the stored dz. NCHW
// walks each channel's row (broadcast parameters); channels_last walks the pixels, 16 channels a
// vector (per-lane parameters), each pixel's channels of the block as one contiguous run.

// The backward's sigmoid is the precise one of the forward (relative error ~3e-7), for bf16 too:
// dw and db are fp32 sums, and the cheaper bf16-output version saved only ~10% of the bf16 backward.

// NCHW pass 1 over `count` vectors `step` elements apart (lanes outside `m` are zero). xhat = (x + center) * rs,
// z = xhat * w + b, dz = dy * silu'(z) (or dy without the activation), stored to dz_out[16 k].
template <typename T, bool Act>
DDPM_AVX512 void bwd_pass1_avx512(const T* x, const T* dy, int64_t step, int64_t count, __mmask16 m, __m512 center,
                                  __m512 rs, __m512 w, __m512 b, float* dz_out, LaneSums& s) {
  constexpr int64_t kFlush = 256;
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t k0 = 0; k0 < count; k0 += kFlush) {
    const int64_t k1 = std::min(count, k0 + kFlush);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const __m512 xhat = _mm512_mul_ps(_mm512_add_ps(load16(x + k * step, m), center), rs);
      __m512 dz = load16(dy + k * step, m);
      if constexpr (Act) {
        // zc: z clamped to [-80, 80]; beyond, silu' is 1 or 0 to fp32
        const __m512 zc = clamp_magnitude(_mm512_fmadd_ps(xhat, w, b), 80.f);
        const __m512 sg = sigmoid16_clamped<true>(zc);
        // dy * sg * (1 + z (1 - sg))
        dz = _mm512_mul_ps(_mm512_mul_ps(dz, sg), _mm512_fmadd_ps(zc, _mm512_sub_ps(one, sg), one));
        _mm512_storeu_ps(dz_out + 16 * k, dz);
      }
      a1 = _mm512_add_ps(a1, dz);
      a2 = _mm512_fmadd_ps(dz, xhat, a2);
    }
    flush_sums(s, a1, a2);  // a: dz, b: dz * xhat
  }
}

// NCHW pass 2: dx = a * dz + (xhat * d + e), xhat = (x + center) * rs, dz from the scratch or, without
// the activation, from dy.
template <typename T, typename D>
DDPM_AVX512 void bwd_pass2_avx512(const T* x, const D* dz, int64_t dz_step, T* dx, int64_t step, int64_t count,
                                  __mmask16 m, __m512 center, __m512 rs, __m512 a, __m512 d, __m512 e) {
  for (int64_t k = 0; k < count; ++k) {
    const __m512 xhat = _mm512_mul_ps(_mm512_add_ps(load16(x + k * step, m), center), rs);
    const __m512 g = load16(dz + k * dz_step, m);
    store16(dx + k * step, _mm512_fmadd_ps(a, g, _mm512_fmadd_ps(xhat, d, e)), m);
  }
}

struct BwdArgs {
  int64_t N, C, HW, G, cpg;
  const float *w, *b, *s, *mean, *rstd;
  double *dw_part, *db_part;
};

// NCHW, the (sample, group) task i: cpg rows of HW contiguous elements. scratch: cpg * HW floats.
template <typename T, bool Act>
DDPM_AVX512 void bwd_task_nchw(const BwdArgs& A, const T* xp, const T* dyp, T* dxp, int64_t i, float* scratch) {
  const int64_t C = A.C, HW = A.HW, cpg = A.cpg, full = HW / 16, rest = HW % 16;
  const __mmask16 all = 0xffff, mrest = tail_mask(rest);
  const __m512d zd = _mm512_setzero_pd();
  const int64_t n = i / A.G, c0 = (i % A.G) * cpg, off = (n * C + c0) * HW;
  const float mu = A.mean[i], rsf = A.rstd[i];
  const __m512 rs = _mm512_set1_ps(rsf);
  double m1 = 0, m2 = 0;
  for (int64_t j = 0; j < cpg; ++j) {
    const int64_t c = c0 + j, o = off + j * HW;
    const float wc = A.w ? A.w[c] : 1.f, bc = A.b ? A.b[c] : 0.f, sh = A.s ? A.s[n * C + c] : 0.f;
    const __m512 center = _mm512_set1_ps(sh - mu), vw = _mm512_set1_ps(wc), vb = _mm512_set1_ps(bc);
    LaneSums acc{zd, zd, zd, zd};
    float* scr = Act ? scratch + j * HW : nullptr;
    bwd_pass1_avx512<T, Act>(xp + o, dyp + o, 16, full, all, center, rs, vw, vb, scr, acc);
    if (rest)
      bwd_pass1_avx512<T, Act>(xp + o + 16 * full, dyp + o + 16 * full, 16, 1, mrest, center, rs, vw, vb,
                                        Act ? scr + 16 * full : nullptr, acc);
    const double sdz = lane_total(acc.a_lo, acc.a_hi), sdzx = lane_total(acc.b_lo, acc.b_hi);
    A.db_part[n * C + c] = sdz, A.dw_part[n * C + c] = sdzx;
    m1 += wc * sdz, m2 += wc * sdzx;
  }
  const double cnt = double(cpg * HW);
  const float mean_wdz = float(m1 / cnt), mean_wdzx = float(m2 / cnt);
  const __m512 d = _mm512_set1_ps(-rsf * mean_wdzx), e = _mm512_set1_ps(-rsf * mean_wdz);
  for (int64_t j = 0; j < cpg; ++j) {
    const int64_t c = c0 + j, o = off + j * HW;
    const float wc = A.w ? A.w[c] : 1.f, sh = A.s ? A.s[n * C + c] : 0.f;
    const __m512 center = _mm512_set1_ps(sh - mu), a = _mm512_set1_ps(rsf * wc);
    if constexpr (Act) {
      const float* src = scratch + j * HW;
      bwd_pass2_avx512(xp + o, src, 16, dxp + o, 16, full, all, center, rs, a, d, e);
      if (rest)
        bwd_pass2_avx512(xp + o + 16 * full, src + 16 * full, 16, dxp + o + 16 * full, 16, 1, mrest, center, rs, a,
                         d, e);
    } else {
      const T* src = dyp + o;
      bwd_pass2_avx512(xp + o, src, 16, dxp + o, 16, full, all, center, rs, a, d, e);
      if (rest)
        bwd_pass2_avx512(xp + o + 16 * full, src + 16 * full, 16, dxp + o + 16 * full, 16, 1, mrest, center, rs, a,
                         d, e);
    }
  }
}

// channels_last pass 1 over NV vectors of channels (the last one `last` lanes wide) for all HW
// pixels (pixel stride C), pixel by pixel so that each pixel's channels are read as one contiguous
// run; accumulators in registers, fp32 partial sums of kFlush pixels added to fp64 s1, s2. The
// parameters are per-lane arrays; dz goes to dz_out[p * ld + 16 j].
template <typename T, bool Act, int NV>
DDPM_AVX512 void bwd_cl_pass1_avx512(const T* x, const T* dy, int64_t C, int64_t HW, int64_t last,
                                     const float* center, const float* rs, const float* w, const float* b,
                                     float* dz_out, int64_t ld, double* s1, double* s2) {
  constexpr int64_t kFlush = 256;
  const __mmask16 mlast = tail_mask(last);
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t p0 = 0; p0 < HW; p0 += kFlush) {
    const int64_t p1 = std::min(HW, p0 + kFlush);
    __m512 a1[NV], a2[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) a1[j] = a2[j] = _mm512_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      const T* xp = x + p * C;
      const T* dp = dy + p * C;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        const __mmask16 m = j == NV - 1 ? mlast : __mmask16(0xffff);
        const __m512 xhat =
            _mm512_mul_ps(_mm512_add_ps(load16(xp + 16 * j, m), _mm512_loadu_ps(center + 16 * j)), _mm512_loadu_ps(rs + 16 * j));
        __m512 dz = load16(dp + 16 * j, m);
        if constexpr (Act) {
          const __m512 zc = clamp_magnitude(
              _mm512_fmadd_ps(xhat, _mm512_loadu_ps(w + 16 * j), _mm512_loadu_ps(b + 16 * j)), 80.f);
          const __m512 sg = sigmoid16_clamped<true>(zc);
          dz = _mm512_mul_ps(_mm512_mul_ps(dz, sg), _mm512_fmadd_ps(zc, _mm512_sub_ps(one, sg), one));
          _mm512_storeu_ps(dz_out + p * ld + 16 * j, dz);
        }
        a1[j] = _mm512_add_ps(a1[j], dz);
        a2[j] = _mm512_fmadd_ps(dz, xhat, a2[j]);
      }
    }
    alignas(64) float r1[16], r2[16];
    for (int j = 0; j < NV; ++j) {
      _mm512_store_ps(r1, a1[j]), _mm512_store_ps(r2, a2[j]);
      for (int l = 0; l < 16; ++l) s1[16 * j + l] += r1[l], s2[16 * j + l] += r2[l];
    }
  }
}

// channels_last, task t = (sample, block of cb channels = whole groups), all HW pixels (pixel
// stride C). scratch: HW * 16 * nvec floats (dz, pixel-major); params: 7 * 16 * nvec floats;
// sums: 2 * 16 * nvec doubles.
template <typename T, bool Act>
DDPM_AVX512 void bwd_task_cl(const BwdArgs& A, const T* xp, const T* dyp, T* dxp, int64_t t, int64_t blocks,
                             int64_t cb, float* scratch, float* params, double* sums) {
  const int64_t C = A.C, HW = A.HW, G = A.G, cpg = A.cpg, gpb = cb / cpg, nvec = (cb + 15) / 16, ld = 16 * nvec;
  float *center = params, *rsv = center + ld, *wv = rsv + ld, *bv = wv + ld, *av = bv + ld, *dv = av + ld,
        *ev = dv + ld;
  double *s1 = sums, *s2 = s1 + ld;
  const int64_t n = t / blocks, c0 = (t % blocks) * cb, base = n * HW * C + c0;
  for (int64_t c = 0; c < ld; ++c) {  // padding lanes: harmless finite values
    const bool in = c < cb;
    const int64_t i = n * G + (in ? (c0 + c) / cpg : 0);
    center[c] = in ? (A.s ? A.s[n * C + c0 + c] : 0.f) - A.mean[i] : 0.f;
    rsv[c] = in ? A.rstd[i] : 0.f;
    wv[c] = in && A.w ? A.w[c0 + c] : 1.f;
    bv[c] = in && A.b ? A.b[c0 + c] : 0.f;
    av[c] = dv[c] = ev[c] = 0.f;
    s1[c] = s2[c] = 0;
  }
  for (int64_t c = 0; c < cb; c += 128) {  // up to 8 vectors of accumulators in registers
    const int64_t width = std::min<int64_t>(128, cb - c), nv = (width + 15) / 16, last = width - 16 * (nv - 1);
    const T *xc = xp + base + c, *dc = dyp + base + c;
    float* dzc = Act ? scratch + c : nullptr;
    switch (nv) {
#define GN_CASE(K)                                                                                                 \
  case K:                                                                                                          \
    bwd_cl_pass1_avx512<T, Act, K>(xc, dc, C, HW, last, center + c, rsv + c, wv + c, bv + c, dzc, ld, \
                                            s1 + c, s2 + c);                                                   \
    break;
      GN_CASE(1) GN_CASE(2) GN_CASE(3) GN_CASE(4) GN_CASE(5) GN_CASE(6) GN_CASE(7) GN_CASE(8)
#undef GN_CASE
    }
  }
  for (int64_t j = 0; j < gpb; ++j) {
    const int64_t i = n * G + c0 / cpg + j;
    double m1 = 0, m2 = 0;
    for (int64_t c = j * cpg; c < (j + 1) * cpg; ++c) {
      A.db_part[n * C + c0 + c] = s1[c], A.dw_part[n * C + c0 + c] = s2[c];
      m1 += wv[c] * s1[c], m2 += wv[c] * s2[c];
    }
    const double cnt = double(cpg * HW);
    const float mean_wdz = float(m1 / cnt), mean_wdzx = float(m2 / cnt), rsf = A.rstd[i];
    for (int64_t c = j * cpg; c < (j + 1) * cpg; ++c) {
      av[c] = rsf * wv[c];
      dv[c] = -rsf * mean_wdzx;
      ev[c] = -rsf * mean_wdz;
    }
  }
  // pass 2, pixel by pixel: dx = a * dz + (xhat * d + e)
  const __mmask16 mlast = tail_mask(cb - 16 * (nvec - 1));
  for (int64_t p = 0; p < HW; ++p) {
    const T* xq = xp + base + p * C;
    T* dq = dxp + base + p * C;
    for (int64_t v = 0; v < nvec; ++v) {
      const __mmask16 m = v == nvec - 1 ? mlast : __mmask16(0xffff);
      const __m512 xhat = _mm512_mul_ps(_mm512_add_ps(load16(xq + 16 * v, m), _mm512_loadu_ps(center + 16 * v)),
                                        _mm512_loadu_ps(rsv + 16 * v));
      __m512 g;
      if constexpr (Act)
        g = _mm512_loadu_ps(scratch + p * ld + 16 * v);
      else
        g = load16(dyp + base + p * C + 16 * v, m);
      const __m512 r = _mm512_fmadd_ps(_mm512_loadu_ps(av + 16 * v), g,
                                       _mm512_fmadd_ps(xhat, _mm512_loadu_ps(dv + 16 * v), _mm512_loadu_ps(ev + 16 * v)));
      store16(dq + 16 * v, r, m);
    }
  }
}

template <typename T, bool Act>
void backward_avx512(const Tensor& dy_t, const Tensor& x_t, Tensor& dx_t, const Tensor& w, const Tensor& b,
                     const Tensor& s, const float* mean, const float* rstd, int64_t G, double* dw_part,
                     double* db_part) {
  const int64_t N = x_t.size(0), C = x_t.size(1), HW = x_t.numel() / (N * C), cpg = C / G;
  const BwdArgs A{N,
                  C,
                  HW,
                  G,
                  cpg,
                  w.defined() ? w.data_ptr<float>() : nullptr,
                  b.defined() ? b.data_ptr<float>() : nullptr,
                  s.defined() ? s.data_ptr<float>() : nullptr,
                  mean,
                  rstd,
                  dw_part,
                  db_part};
  const T* xp = reinterpret_cast<const T*>(x_t.data_ptr());
  const T* dyp = reinterpret_cast<const T*>(dy_t.data_ptr());
  T* dxp = reinterpret_cast<T*>(dx_t.data_ptr());

  if (!is_channels_last(x_t)) {
    parallel_chunks(N * G, [&](int64_t begin, int64_t end, const auto& extend) {
      std::vector<float> scratch(Act ? cpg * HW + 16 : 0);
      for (int64_t i = begin; i < end; ++i) {
        bwd_task_nchw<T, Act>(A, xp, dyp, dxp, i, scratch.data());
        if (i + 1 == end) end = extend(end);  // the owner's next chunk
      }
    });
    return;
  }

  // channels_last: two tasks for every thread (channels_last_blocks; whole rows at batch 16: fp32
  // 16x128x32x32 685-1035 us in half-row blocks of 768 KiB, 566-597 in whole rows). Unlike the
  // forward, one thread still takes two blocks of a lone sample: there x, dy and dz of a block
  // stay in L2 across the two passes (fp32 1x128x32x32, one thread: 35-38 us in half rows, 55 in
  // whole ones; session 23).
  const int64_t threads = at::get_num_threads(), elt = sizeof(T);
  const int64_t blocks = channels_last_blocks(N, C, G, elt, 2 * threads);
  const int64_t cb = C / blocks, nvec = (cb + 15) / 16;
  parallel_chunks(N * blocks, [&](int64_t begin, int64_t end, const auto& extend) {
    std::vector<float> scratch(Act ? nvec * 16 * HW : 0), params(7 * 16 * nvec);
    std::vector<double> sums(2 * 16 * nvec);
    for (int64_t t = begin; t < end; ++t) {
      bwd_task_cl<T, Act>(A, xp, dyp, dxp, t, blocks, cb, scratch.data(), params.data(), sums.data());
      if (t + 1 == end) end = extend(end);
    }
  });
}

template <typename T>
void backward_impl(const Tensor& dy, const Tensor& x, Tensor& dx, const Tensor& w, const Tensor& b, const Tensor& s,
                   const float* mean, const float* rstd, int64_t G, bool act, double* dw_part, double* db_part) {
  if (!cpu_has_avx512())
    backward_scalar<T>(dy, x, dx, w, b, s, mean, rstd, G, act, dw_part, db_part);
  else if (act)
    backward_avx512<T, true>(dy, x, dx, w, b, s, mean, rstd, G, dw_part, db_part);
  else
    backward_avx512<T, false>(dy, x, dx, w, b, s, mean, rstd, G, dw_part, db_part);
}

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_backward_cpu(
    const Tensor& grad_y, const Tensor& x_in, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& shift, const Tensor& mean, const Tensor& rstd, int64_t groups, bool silu) {
  check_inputs(x_in, weight, bias, shift, groups);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes() && grad_y.scalar_type() == x_in.scalar_type(),
              "group_norm_silu_backward: grad_y must match x in shape and dtype");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK(mean.numel() == N * groups && rstd.numel() == N * groups,
              "group_norm_silu_backward: mean and rstd must be (N, groups)");
  const Tensor x = is_channels_last(x_in) ? x_in : x_in.contiguous();
  const Tensor dy = grad_y.contiguous(x.suggest_memory_format());
  Tensor dx = at::empty_like(x);
  const Tensor w = as_float_param(weight), b = as_float_param(bias), s = as_float_param(shift);
  const Tensor mean_f = mean.to(at::kFloat).contiguous(), rstd_f = rstd.to(at::kFloat).contiguous();
  Tensor dw_part = at::empty({N, C}, x.options().dtype(at::kDouble)), db_part = at::empty_like(dw_part);
  if (x.scalar_type() == at::kFloat)
    backward_impl<float>(dy, x, dx, w, b, s, mean_f.data_ptr<float>(), rstd_f.data_ptr<float>(), groups, silu,
                         dw_part.data_ptr<double>(), db_part.data_ptr<double>());
  else
    backward_impl<uint16_t>(dy, x, dx, w, b, s, mean_f.data_ptr<float>(), rstd_f.data_ptr<float>(), groups, silu,
                            dw_part.data_ptr<double>(), db_part.data_ptr<double>());
  // Without weight (bias) the gradient is an empty tensor in x's dtype, as the CUDA kernel returns.
  Tensor dw = w.defined() ? dw_part.sum(0).to(weight->scalar_type()) : at::empty({0}, x.options());
  Tensor db = (bias.has_value() && bias->defined()) ? db_part.sum(0).to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_perf, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_quantized", &group_norm_silu_quantized_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace ddpm_perf::cpu
