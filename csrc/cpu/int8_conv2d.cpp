// CPU kernels of int8_conv2d: uint8 activations x int8 weights -> int32 -> dequantised output.
//
// 1. x is quantised into zero-point-padded NHWC uint8 (channels rounded up to 4), by each thread
//    for the input rows its own output pixels need, in the same parallel region as steps 2-4. A
//    uint8 x is already quantised: it is copied with the padding instead, or, in a pointwise conv
//    whose channels are a multiple of 4, read where it lies.
// 2. An implicit GEMM: M = output pixels, N = output channels, K = taps x channels. No im2col: a
//    tile of MR pixels keeps one base pointer per pixel and walks the taps by offset.
// 3. AVX-512 VNNI micro-kernel: MR x (16 NB) int32 accumulators; per group of 4 channels it loads
//    NB 64-byte weight vectors (16 outputs x 4 channels, packed once by int8_pack_weight) and,
//    per pixel, broadcasts 4 activation bytes into NB vpdpbusd.
// 4. The epilogue subtracts zero_point * colsum, scales by x_scale * w_scale[o], adds the bias and
//    stores fp32 or bf16 channels_last (out_dtype; by default x's, fp32 for a uint8 x). AVX2 (exact
//    int16 vpmaddwd) and portable C++ paths cover CPUs without AVX-512 VNNI.
// Where the CPU has AMX-INT8, stride-1 convs with channels in multiples of 64 and outputs in
// multiples of 16 (all but the first, last and downsampling convs of the U-Net) take tile
// matrix multiplies instead (conv_impl_amx, below), with the same packed weights and epilogue.
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <utility>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "quantize.h"
#include "simd.h"

namespace ddpm_perf::cpu {
namespace {

using at::Tensor;

#ifndef KMR
#define KMR 6
#define KNB 4
#endif
constexpr int kMR = KMR;  // pixels per tile
constexpr int kNB = KNB;  // 16-channel output blocks per tile: 6 x 4 = 24 zmm accumulators
constexpr int64_t kChunk = 16;  // at most this many tiles per work item

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---- weight packing: OIHW int8 -> [O/16][KH*KW][Cp/4][16 outputs][4 channels] ----

Tensor int8_pack_weight_cpu(const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kChar,
              "int8_pack_weight: weight must be int8 (O, I, KH, KW), got ", weight.scalar_type(), " ", weight.sizes());
  const int64_t O = weight.size(0), I = weight.size(1), taps = weight.size(2) * weight.size(3);
  const int64_t Ob = (O + 15) / 16, Cp = round_up(I, 4);
  Tensor packed = at::zeros({Ob * taps * Cp * 16}, weight.options());
  const Tensor w = weight.contiguous();
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = packed.data_ptr<int8_t>();
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i)
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t k4 = t * (Cp / 4) + i / 4;
        dst[((o / 16) * taps * (Cp / 4) + k4) * 64 + (o % 16) * 4 + i % 4] = src[(o * I + i) * taps + t];
      }
  return packed;
}

// ---- quantisation: x (N, C, H, W) channels_last -> uint8 [N][H + 2ph][W + 2pw][Cp] ----

template <typename T>
void quantize_row_scalar(const T* x, uint8_t* q, int64_t C, float inv_scale, int zp) {
  const Quant quant{inv_scale, zp};
  for (int64_t c = 0; c < C; ++c) q[c] = quantize(to_float(x[c]), quant);
}

template <typename T>  // round(x * inv_scale) + zp in int32 (quantize.h)
DDPM_AVX512 inline __m512i to_int(const T* x, __mmask16 m, __m512 inv_scale, __m512i zp) {
  return quantize16_epi32(load16(x, m), inv_scale, zp);
}

template <typename T>
DDPM_AVX512 void quantize_row_avx512(const T* x, uint8_t* q, int64_t C, float inv_scale, int zp) {
  const __m512 vs = _mm512_set1_ps(inv_scale);
  const __m512i vz = _mm512_set1_epi32(zp);
  // 64 values per step: two saturating packs (int32 -> int16 -> uint8, the clamp to [0, 255])
  // and one 64-byte store, instead of four narrowing stores; the packs interleave 128-bit lanes,
  // which one permute undoes. The source is prefetched 2 KiB ahead: rows of a few KiB gave the
  // hardware prefetcher too little run-up.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __mmask16 all = 0xFFFF;
  int64_t c = 0;
  for (; c + 64 <= C; c += 64) {
    for (int b = 0; b < 64 * int(sizeof(T)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(x + c) + 2048 + b);
    const __m512i lo = _mm512_packs_epi32(to_int(x + c, all, vs, vz), to_int(x + c + 16, all, vs, vz));
    const __m512i hi = _mm512_packs_epi32(to_int(x + c + 32, all, vs, vz), to_int(x + c + 48, all, vs, vz));
    _mm512_storeu_si512(q + c, _mm512_permutexvar_epi32(order, _mm512_packus_epi16(lo, hi)));
  }
  for (; c < C; c += 16) {
    const __mmask16 m = tail_mask(C - c);
    store16(q + c, load16(x + c, m), m, Quant{inv_scale, zp});
  }
}

// ---- micro-kernels: acc[MR][NB*16] += A[MR pixels][K] . B[K][NB*16] ----

struct Tile {
  const uint8_t* pixel[kMR];  // base of each pixel's top-left tap in the padded input
  const int64_t* tap_offset;  // byte offset of each tap from the pixel base
  int64_t taps, k4;           // k4 = Cp / 4 channel groups per tap
  const int8_t* weight;       // packed weight of the first output block of this tile
  int64_t block_stride;       // bytes between consecutive output blocks in the packed weight
};

template <int MR, int NB>
DDPM_AVX512_VNNI void gemm_tile_vnni(const Tile& t, int32_t* out /* [MR][NB*16] */) {
  __m512i acc[MR][NB];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  const int8_t* w = t.weight;
  for (int64_t tap = 0; tap < t.taps; ++tap) {
    const uint8_t* a[MR];
    for (int i = 0; i < MR; ++i) a[i] = t.pixel[i] + t.tap_offset[tap];
    for (int64_t k = 0; k < t.k4; ++k, w += 64) {
      __m512i b[NB];
      for (int j = 0; j < NB; ++j) b[j] = _mm512_loadu_si512(w + j * t.block_stride);
      for (int i = 0; i < MR; ++i) {
        int32_t four;
        std::memcpy(&four, a[i] + 4 * k, 4);
        const __m512i av = _mm512_set1_epi32(four);
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, b[j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NB; ++j) _mm512_storeu_si512(out + i * kNB * 16 + j * 16, acc[i][j]);
}

void gemm_tile_scalar(const Tile& t, int mr, int nb, int32_t* out) {
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nb * 16; ++j) {
      int32_t s = 0;
      const int8_t* w = t.weight + (j / 16) * t.block_stride + (j % 16) * 4;
      for (int64_t tap = 0; tap < t.taps; ++tap) {
        const uint8_t* a = t.pixel[i] + t.tap_offset[tap];
        for (int64_t k = 0; k < t.k4; ++k)
          for (int l = 0; l < 4; ++l) s += int32_t(a[4 * k + l]) * int32_t(w[(tap * t.k4 + k) * 64 + l]);
      }
      out[i * kNB * 16 + j] = s;
    }
}

// AVX2 (no VNNI): exact, by widening to int16 and vpmaddwd, 16 outputs x 2 pixels at a time.
// A 16-byte quarter of a packed 64-byte block holds 4 outputs x 4 channels; widened and multiplied
// with the pixel's 4 channels repeated, each int32 lane holds the sum of 2 of the 4 products, so
// the accumulators are folded pairwise at the end. (vpmaddubsw would be 2x faster but saturates.)
DDPM_AVX2 void gemm_tile_avx2(const Tile& t, int mr, int nb, int32_t* out) {
  for (int j = 0; j < nb; ++j) {
    for (int i0 = 0; i0 < mr; i0 += 2) {
      const int np = std::min(2, mr - i0);
      __m256i acc[2][4];
      for (int p = 0; p < 2; ++p)
        for (int c = 0; c < 4; ++c) acc[p][c] = _mm256_setzero_si256();
      const int8_t* w = t.weight + j * t.block_stride;
      for (int64_t tap = 0; tap < t.taps; ++tap) {
        const uint8_t* a0 = t.pixel[i0] + t.tap_offset[tap];
        const uint8_t* a1 = t.pixel[i0 + np - 1] + t.tap_offset[tap];
        for (int64_t k = 0; k < t.k4; ++k, w += 64) {
          int32_t f0, f1;
          std::memcpy(&f0, a0 + 4 * k, 4);
          std::memcpy(&f1, a1 + 4 * k, 4);
          const __m256i av0 = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(f0)));
          const __m256i av1 = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(f1)));
          for (int c = 0; c < 4; ++c) {
            const __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * c)));
            acc[0][c] = _mm256_add_epi32(acc[0][c], _mm256_madd_epi16(av0, w16));
            acc[1][c] = _mm256_add_epi32(acc[1][c], _mm256_madd_epi16(av1, w16));
          }
        }
      }
      alignas(32) int32_t lanes[8];
      for (int p = 0; p < np; ++p)
        for (int c = 0; c < 4; ++c) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[p][c]);
          for (int q = 0; q < 4; ++q) out[(i0 + p) * kNB * 16 + j * 16 + 4 * c + q] = lanes[2 * q] + lanes[2 * q + 1];
        }
    }
  }
}

using TileFn = void (*)(const Tile&, int32_t*);

template <int MR, int... NB>
constexpr std::array<TileFn, sizeof...(NB)> row_of_kernels(std::integer_sequence<int, NB...>) {
  return {&gemm_tile_vnni<MR, NB + 1>...};
}
template <int... MR>
constexpr std::array<std::array<TileFn, kNB>, sizeof...(MR)> table_of_kernels(std::integer_sequence<int, MR...>) {
  return {row_of_kernels<MR + 1>(std::make_integer_sequence<int, kNB>{})...};
}
const auto kVnniKernels = table_of_kernels(std::make_integer_sequence<int, kMR>{});  // [MR-1][NB-1]

// ---- epilogue: int32 -> (acc - zp * colsum[o]) * scale[o] + bias[o] -> fp32/bf16 ----

struct Epilogue {
  const int32_t* offset;  // zp * colsum[o], once per call rather than a multiply per output
  const float* scale;     // x_scale * w_scale[o]
  const float* bias;      // zeros when the layer has none
  int zp;
};

template <typename T>
void epilogue_row_scalar(const int32_t* acc, int64_t o0, int64_t count, T* y, const Epilogue& e) {
  for (int64_t j = 0; j < count; ++j) {
    const int64_t o = o0 + j;
    store_float(y + j, float(acc[j] - e.offset[o]) * e.scale[o] + e.bias[o]);
  }
}

template <typename T>
DDPM_AVX512 void epilogue_row_avx512(const int32_t* acc, int64_t o0, int64_t count, T* y, const Epilogue& e) {
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = tail_mask(count - j);
    const int64_t o = o0 + j;
    const __m512i corrected = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, acc + j), _mm512_maskz_loadu_epi32(m, e.offset + o));
    const __m512 b = _mm512_maskz_loadu_ps(m, e.bias + o);
    store16(y + j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(corrected), _mm512_maskz_loadu_ps(m, e.scale + o), b), m);
  }
}

// ---- the quantised input: zero-point-padded NHWC uint8, laid out [image][Hp][Wp][Cp] ----

template <typename T>
struct PaddedInput {
  const T* x;  // (N, H, W, C) channels_last
  int64_t C, Cp, H, W, PH, PW;
  float inv_scale;
  int zp;
  bool simd;

  int64_t Hp() const { return H + 2 * PH; }
  int64_t Wp() const { return W + 2 * PW; }

  // `pixels` consecutive pixels of x into dst, Cp bytes each: one run when no channel is padded.
  void pixels(const T* src, uint8_t* dst, int64_t pixels) const {
    if (Cp == C) return quantize(src, dst, pixels * C);
    for (int64_t p = 0; p < pixels; ++p) {
      quantize(src + p * C, dst + p * Cp, C);
      std::memset(dst + p * Cp + C, zp, Cp - C);  // the padded channels meet zero weights, but
    }                                             // results never depend on uninitialised memory
  }

  // Padded rows [hp0, hp1] of image n into q, a buffer holding images n0, n0 + 1, ...
  void rows(uint8_t* q, int64_t n0, int64_t n, int64_t hp0, int64_t hp1) const {
    for (int64_t hp = hp0; hp <= hp1; ++hp) {
      const int64_t h = hp - PH;
      uint8_t* row = q + ((n - n0) * Hp() + hp) * Wp() * Cp;
      if (h < 0 || h >= H) {
        std::memset(row, zp, Wp() * Cp);
        continue;
      }
      std::memset(row, zp, PW * Cp);
      std::memset(row + (W + PW) * Cp, zp, PW * Cp);
      pixels(x + (n * H + h) * W * C, row + PW * Cp, W);
    }
  }

 private:
  void quantize(const T* src, uint8_t* dst, int64_t count) const {
    if constexpr (std::is_same_v<T, uint8_t>)
      std::memcpy(dst, src, count);
    else if (simd)
      quantize_row_avx512(src, dst, count, inv_scale, zp);
    else
      quantize_row_scalar(src, dst, count, inv_scale, zp);
  }
};

// ---- AMX-INT8: stride-1 convs whose channels are a multiple of 64 ----
//
// One TDPBUSD multiplies a tile of 16 pixels x 64 channels (uint8) by 64 channels x 16 outputs
// (int8, the packed weight's layout already: 16 of its 64-byte rows) into 16 x 16 int32: 16K
// multiply-adds, against 64 for a vpdpbusd. A tile's 16 rows must lie at one stride, so the
// pixels are taken along the padded input's flattened rows: position p = oh * Wp + ow has its
// top-left tap at p * Cp, and positions with ow >= OW (the padding columns) are computed and
// dropped. Each block is 32 positions x 32 outputs: 2 A tiles, 2 B tiles, 4 accumulators.

constexpr int64_t kAmxRows = 16, kAmxBlock = 2 * kAmxRows;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

DDPM_AMX_INT8 void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = kAmxRows;  // A: tmm0-1, B: tmm2-3, C: tmm4-7
  // GCC 12's _tile_loadconfig does not tell the compiler it reads cfg, which then drops the
  // stores above (palette 1 with no rows configured: the first tile instruction raises #UD).
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// acc[32][32] = the block at `a` (32 positions, `a_stride` bytes apart) times NB output blocks.
template <int NB>
DDPM_AMX_INT8 void amx_block(const uint8_t* a, int64_t a_stride, const int64_t* tap_offset, int64_t taps,
                             int64_t kblocks, const int8_t* w, int64_t block_stride, int32_t* acc) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t tap = 0; tap < taps; ++tap)
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const uint8_t* ap = a + tap_offset[tap] + kb * 64;
      const int8_t* bp = w + (tap * kblocks + kb) * 1024;
      _tile_loadd(0, ap, a_stride);
      _tile_loadd(1, ap + kAmxRows * a_stride, a_stride);
      _tile_loadd(2, bp, 64);
      _tile_dpbusd(4, 0, 2);
      _tile_dpbusd(6, 1, 2);
      if constexpr (NB == 2) {
        _tile_loadd(3, bp + block_stride, 64);
        _tile_dpbusd(5, 0, 3);
        _tile_dpbusd(7, 1, 3);
      }
    }
  constexpr int64_t row = kAmxBlock * sizeof(int32_t);
  _tile_stored(4, acc, row);
  _tile_stored(6, acc + kAmxRows * kAmxBlock, row);
  if constexpr (NB == 2) {
    _tile_stored(5, acc + kAmxRows, row);
    _tile_stored(7, acc + kAmxRows * kAmxBlock + kAmxRows, row);
  }
}

DDPM_AMX_INT8 void amx_release() { _tile_release(); }

template <typename In, typename Out>
void conv_impl_amx(const Tensor& x, const Tensor& packed, int64_t O, const Epilogue& e, float inv_scale,
                   int64_t KH, int64_t KW, int64_t PH, int64_t PW, Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hp = H + 2 * PH, Wp = W + 2 * PW, OH = out.size(2), OW = out.size(3), taps = KH * KW;
  const int64_t positions = (OH - 1) * Wp + OW;  // per image, up to the last kept one
  const int64_t blocks = (positions + kAmxBlock - 1) / kAmxBlock, groups = (O / 16 + 1) / 2;
  // The last block's dropped positions read up to this far past its image's padded rows.
  const int64_t image = Hp * Wp * C, slack = (kAmxBlock + (KH - 1) * Wp + KW) * C;
  const uint8_t zp8 = static_cast<uint8_t>(e.zp);
  const PaddedInput<In> in{reinterpret_cast<const In*>(x.data_ptr()), C, C, H, W, PH, PW, inv_scale, e.zp, true};
  std::vector<int64_t> tap_offset(taps);
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw) tap_offset[kh * KW + kw] = (kh * Wp + kw) * C;
  const int8_t* wp = packed.data_ptr<int8_t>();
  const int64_t block_stride = taps * C * 16;
  Out* yp = reinterpret_cast<Out*>(out.data_ptr());

  // Work items (image, block, pair of output blocks), block-major. As in conv_impl, each thread
  // quantises the padded input rows its own blocks read into a buffer of its own, inside the
  // one parallel region (a second region costs ~30 us per conv on the Zen 5 and ~100 us on the
  // Xeon when the threads sleep between regions). Rows no kept position reads stay unwritten:
  // only dropped positions read them.
  parallel_for_caller_last(0, N * blocks * groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t first = begin / groups, last = (end - 1) / groups;  // blocks over all images
    const int64_t n0 = first / blocks, n1 = last / blocks;
    Tensor buffer = at::empty({(n1 - n0 + 1) * image + slack}, x.options().dtype(at::kByte));
    uint8_t* q = buffer.data_ptr<uint8_t>();
    std::memset(q + (n1 - n0 + 1) * image, zp8, slack);
    for (int64_t n = n0; n <= n1; ++n) {
      const int64_t b0 = n == n0 ? first % blocks : 0, b1 = n == n1 ? last % blocks : blocks - 1;
      const int64_t r0 = b0 * kAmxBlock / Wp;
      const int64_t r1 = std::min(Hp - 1, ((b1 + 1) * kAmxBlock - 1 + (KH - 1) * Wp + KW - 1) / Wp);
      in.rows(q, n0, n, r0, r1);
    }
    alignas(64) int32_t acc[kAmxBlock * kAmxBlock];
    amx_configure();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (blocks * groups), block = item / groups % blocks, ob = item % groups * 2;
      const int64_t p0 = block * kAmxBlock, o0 = ob * 16, count = std::min<int64_t>(32, O - o0);
      const uint8_t* a = q + (n - n0) * image + p0 * C;
      if (count == 32)
        amx_block<2>(a, C, tap_offset.data(), taps, C / 64, wp + ob * block_stride, block_stride, acc);
      else
        amx_block<1>(a, C, tap_offset.data(), taps, C / 64, wp + ob * block_stride, block_stride, acc);
      for (int64_t i = 0; i < kAmxBlock && p0 + i < positions; ++i) {
        const int64_t oh = (p0 + i) / Wp, ow = (p0 + i) % Wp;
        if (ow < OW) epilogue_row_avx512(acc + i * kAmxBlock, o0, count, yp + ((n * OH + oh) * OW + ow) * O + o0, e);
      }
    }
    amx_release();
  });
}

// ---- op ----

template <typename In, typename Out>
void conv_impl(const Tensor& x, const Tensor& packed, int64_t O, const Epilogue& e, float inv_scale,
               int64_t KH, int64_t KW, int64_t SH, int64_t SW, int64_t PH, int64_t PW, Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cp = round_up(C, 4), Hp = H + 2 * PH, Wp = W + 2 * PW;
  const int64_t OH = out.size(2), OW = out.size(3), M = N * OH * OW, taps = KH * KW, Ob = (O + 15) / 16;
  const bool vnni = cpu_has_avx512_vnni(), avx2 = cpu_has_avx2(), simd = cpu_has_avx512();

  const In* xp = reinterpret_cast<const In*>(x.data_ptr());
  const PaddedInput<In> in{xp, C, Cp, H, W, PH, PW, inv_scale, e.zp, simd};

  // 1. quantise into a zero-point-padded NHWC buffer, inside the same parallel region as the GEMM:
  // each thread quantises the input rows its own output pixels need (a few rows twice where two
  // threads' pixels meet) into a buffer of its own. A second parallel region costs more than
  // those rows: ~30 us per conv when the threads sleep between regions (OMP_WAIT_POLICY=PASSIVE).
  // A pointwise conv (1x1, stride 1, no padding) quantises per chunk of pixels instead (below),
  // which also saves writing and re-reading a uint8 copy of these memory-bound convs' input.
  const bool pointwise = KH == 1 && KW == 1 && SH == 1 && SW == 1 && PH == 0 && PW == 0;
  // A pointwise conv on uint8 channels in whole groups of 4 needs no copy: tiles point into x.
  const bool in_place = pointwise && std::is_same_v<In, uint8_t> && Cp == C;

  // 2-4. tiles of kMR output pixels x up to kNB output blocks
  std::vector<int64_t> tap_offset(taps);
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw) tap_offset[kh * KW + kw] = (kh * Wp + kw) * Cp;
  const int8_t* wp = packed.data_ptr<int8_t>();
  const int64_t block_stride = taps * Cp * 16;
  Out* yp = reinterpret_cast<Out*>(out.data_ptr());
  const int64_t tiles = (M + kMR - 1) / kMR, groups = (Ob + kNB - 1) / kNB;
  // Work items are (chunk of tiles, group of output blocks); within an item one group's packed
  // weights stay in L1 while the chunk's pixels stream past them. at::parallel_for hands each
  // thread a contiguous run of items, so the chunks are made equal and their number a multiple
  // of the threads: with 16-tile chunks a 4x4 level at batch 8 (22 tiles) split 16 + 6.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = round_up((tiles + kChunk - 1) / kChunk, threads);
  const int64_t chunk_tiles = (tiles + chunks - 1) / chunks;
  parallel_for_caller_last(0, chunks * groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[kMR * kNB * 16];
    std::vector<uint8_t> local(pointwise && !in_place ? chunk_tiles * kMR * Cp : 0);  // pointwise: this chunk's pixels
    int64_t local_chunk = -1;
    // k x k: the padded input rows under this run of items' output rows r0..r1 (r = n * OH + oh).
    const int64_t r0 = std::min(M - 1, begin / groups * chunk_tiles * kMR) / OW;
    const int64_t r1 = (std::min(M, ((end - 1) / groups + 1) * chunk_tiles * kMR) - 1) / OW;
    const int64_t n0 = r0 / OH;
    Tensor rows = at::empty({pointwise ? 0 : (r1 / OH - n0 + 1) * Hp * Wp * Cp}, x.options().dtype(at::kByte));
    uint8_t* q = rows.data_ptr<uint8_t>();
    if (!pointwise)
      for (int64_t n = n0; n <= r1 / OH; ++n) {
        const int64_t oh0 = n == n0 ? r0 % OH : 0, oh1 = n == r1 / OH ? r1 % OH : OH - 1;
        in.rows(q, n0, n, oh0 * SH, oh1 * SH + KH - 1);
      }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / groups, ob = item % groups * kNB;
      const int64_t tile_end = std::min(tiles, (chunk + 1) * chunk_tiles);
      const int64_t first_pixel = chunk * chunk_tiles * kMR;
      if (pointwise && !in_place && chunk != local_chunk) {
        in.pixels(xp + first_pixel * C, local.data(), std::min(M, tile_end * kMR) - first_pixel);
        local_chunk = chunk;
      }
      const int nb = static_cast<int>(std::min<int64_t>(kNB, Ob - ob));
      const int64_t o0 = ob * 16, count = std::min<int64_t>(nb * 16, O - o0);
      // Pointwise: while the chunk's last group runs, prefetch the input the next chunk will
      // quantise, a slice per tile; read in one burst it stalled on memory (a third of the time of
      // a 384->128 1x1 conv at 32x32, batch 8).
      const int64_t tiles_here = std::max<int64_t>(1, tile_end - chunk * chunk_tiles);  // the last chunks may be empty
      const int64_t next_begin = std::min(M, tile_end * kMR) * C * int64_t(sizeof(In));
      const int64_t next_bytes = pointwise && ob + kNB >= Ob && item + 1 < end
          ? std::min(M, (tile_end + chunk_tiles) * kMR) * C * int64_t(sizeof(In)) - next_begin : 0;
      const int64_t slice = round_up((next_bytes + tiles_here - 1) / tiles_here, 64);
      const char* x_bytes = reinterpret_cast<const char*>(xp);
      for (int64_t tile = chunk * chunk_tiles; tile < tile_end; ++tile) {
        const int64_t m0 = tile * kMR;
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
        // The output lines this tile's epilogue writes, fetched while its GEMM runs: stores that
        // miss fill the store queue and stalled the epilogue (a sixth of that 1x1 conv's time).
        for (int i = 0; i < mr; ++i) {
          const char* y = reinterpret_cast<const char*>(yp + (m0 + i) * O + o0);
          for (int64_t b = 0; b < count * int64_t(sizeof(Out)); b += 64) __builtin_prefetch(y + b, 1, 3);
        }
        const int64_t from = (tile - chunk * chunk_tiles) * slice, to = std::min(next_bytes, from + slice);
        for (int64_t b = from; b < to; b += 64) __builtin_prefetch(x_bytes + next_begin + b, 0, 3);
        Tile t{{}, tap_offset.data(), taps, Cp / 4, wp + ob * block_stride, block_stride};
        if (in_place) {
          const uint8_t* xq = reinterpret_cast<const uint8_t*>(xp);
          for (int i = 0; i < kMR; ++i) t.pixel[i] = xq + (m0 + std::min(i, mr - 1)) * C;
        } else if (pointwise) {
          for (int i = 0; i < kMR; ++i) t.pixel[i] = local.data() + (m0 + std::min(i, mr - 1) - first_pixel) * Cp;
        } else {
          // the tile's first pixel by division, the others by stepping along rows and images
          int64_t n = m0 / (OH * OW), oh = m0 / OW % OH, ow = m0 % OW;
          for (int i = 0; i < kMR; ++i) {
            if (i > 0 && i < mr && ++ow == OW && (ow = 0, ++oh == OH)) oh = 0, ++n;
            t.pixel[i] = q + (((n - n0) * Hp + oh * SH) * Wp + ow * SW) * Cp;
          }
        }
        if (vnni)
          kVnniKernels[mr - 1][nb - 1](t, acc);
        else if (avx2)
          gemm_tile_avx2(t, mr, nb, acc);
        else
          gemm_tile_scalar(t, mr, nb, acc);
        for (int i = 0; i < mr; ++i) {
          Out* y = yp + (m0 + i) * O + o0;
          if (simd)
            epilogue_row_avx512(acc + i * kNB * 16, o0, count, y, e);
          else
            epilogue_row_scalar(acc + i * kNB * 16, o0, count, y, e);
        }
      }
    }
  });
}

Tensor int8_conv2d_cpu(const Tensor& x_in, const Tensor& packed, const Tensor& colsum, const Tensor& w_scale,
                       const c10::optional<Tensor>& bias, double x_scale, int64_t x_zero_point,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       std::optional<at::ScalarType> out_dtype_arg) {
  TORCH_CHECK(x_in.dim() == 4, "int8_conv2d: x must be (N, C, H, W), got ", x_in.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kByte,
              "int8_conv2d on CPU takes float32, bfloat16 or uint8 (already quantised) x, got ", dtype);
  const auto out_dtype = out_dtype_arg.value_or(dtype == at::kByte ? at::kFloat : dtype);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16,
              "int8_conv2d on CPU writes float32 or bfloat16, got out_dtype ", out_dtype);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 1,
              "int8_conv2d: packed_weight must come from int8_pack_weight");
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "int8_conv2d: kernel_size, stride and padding take two values each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0 && kernel_size[0] > 0 &&
                  kernel_size[1] > 0, "int8_conv2d: invalid kernel_size/stride/padding");
  TORCH_CHECK(x_scale > 0 && std::isfinite(x_scale), "int8_conv2d: x_scale must be positive, got ", x_scale);
  TORCH_CHECK(x_zero_point >= 0 && x_zero_point <= 255, "int8_conv2d: x_zero_point must be in [0, 255], got ",
              x_zero_point);
  const int64_t O = w_scale.numel(), taps = kernel_size[0] * kernel_size[1], Cp = round_up(x_in.size(1), 4);
  TORCH_CHECK(O > 0 && packed.numel() == (O + 15) / 16 * taps * Cp * 16,
              "int8_conv2d: packed_weight does not match ", O, " outputs, ", x_in.size(1), " input channels and a ",
              kernel_size[0], "x", kernel_size[1], " kernel");
  TORCH_CHECK(colsum.scalar_type() == at::kInt, "int8_conv2d: weight_colsum must be int32, got ", colsum.scalar_type());
  TORCH_CHECK(colsum.numel() == O, "int8_conv2d: weight_colsum has ", colsum.numel(), " values and weight_scale ", O,
              ": both must have one per output channel");
  const int64_t H = x_in.size(2) + 2 * padding[0], W = x_in.size(3) + 2 * padding[1];
  TORCH_CHECK(H >= kernel_size[0] && W >= kernel_size[1], "int8_conv2d: input smaller than the kernel");
  const int64_t OH = (H - kernel_size[0]) / stride[0] + 1, OW = (W - kernel_size[1]) / stride[1] + 1;

  const Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  Tensor out = at::empty({x.size(0), O, OH, OW},
                         x.options().dtype(out_dtype).memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;  // an empty batch, as F.conv2d (the work split divides by the tiles)
  // x_scale * w_scale[o] in fp64 then rounded, as the reference does; a plain loop, not three
  // tensor ops: this runs for every layer of every step.
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat, "int8_conv2d: weight_scale must be float32");
  const Tensor ws = w_scale.contiguous();
  std::vector<float> scale(O);
  for (int64_t o = 0; o < O; ++o) scale[o] = static_cast<float>(double(ws.data_ptr<float>()[o]) * x_scale);
  const Tensor cs = colsum.contiguous();
  std::vector<int32_t> offset(O);
  for (int64_t o = 0; o < O; ++o) offset[o] = static_cast<int32_t>(x_zero_point) * cs.data_ptr<int32_t>()[o];
  const Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::zeros({O});
  TORCH_CHECK(b.numel() == O, "int8_conv2d: bias must be (", O, ",)");
  const Epilogue e{offset.data(), scale.data(), b.data_ptr<float>(), static_cast<int>(x_zero_point)};
  const float inv_scale = static_cast<float>(1.0 / x_scale);
  const bool amx = cpu_has_amx_int8() && stride[0] == 1 && stride[1] == 1 && x.size(1) % 64 == 0 && O % 16 == 0;
  const auto run = [&](auto in, auto out_type) {
    using In = decltype(in);
    using Out = decltype(out_type);
    if (amx)
      conv_impl_amx<In, Out>(x, packed, O, e, inv_scale, kernel_size[0], kernel_size[1], padding[0], padding[1], out);
    else
      conv_impl<In, Out>(x, packed, O, e, inv_scale, kernel_size[0], kernel_size[1], stride[0], stride[1],
                         padding[0], padding[1], out);
  };
  const auto run_into = [&](auto in) {
    if (out_dtype == at::kFloat)
      run(in, float{});
    else
      run(in, uint16_t{});  // bfloat16
  };
  if (dtype == at::kFloat)
    run_into(float{});
  else if (dtype == at::kBFloat16)
    run_into(uint16_t{});
  else
    run_into(uint8_t{});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_perf, CPU, m) {
  m.impl("int8_pack_weight", &int8_pack_weight_cpu);
  m.impl("int8_conv2d", &int8_conv2d_cpu);
}

}  // namespace ddpm_perf::cpu
