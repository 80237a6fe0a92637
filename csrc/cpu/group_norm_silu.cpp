// CPU kernels of group_norm_silu: y = [silu](group_norm(x + shift) * weight + bias).
//
// Forward: per (sample, group) for NCHW, per (sample, pixel chunk) for channels_last, in parallel
// with at::parallel_for. Statistics are fp32 lane sums of (x - pivot), combined in fp64 (the
// pivot, an element of the same channel, keeps E[x^2] - E[x]^2 from cancelling). The input is read
// twice (statistics, then output); a (sample, group) slice is small enough that the second read
// comes from cache. AVX-512 where the CPU has it (checked at run time), portable C++ otherwise.
// Backward: portable C++, parallel over (sample, group).
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "simd.h"

namespace ddpm_perf::cpu {
namespace {

using at::Tensor;

inline float silu(float z) { return z / (1.f + std::exp(-z)); }

struct Affine {  // per-channel fp32 parameters, any of them may be null
  const float* weight;
  const float* bias;
  const float* shift;  // row of the (N, C) shift for this sample
  float w(int64_t c) const { return weight ? weight[c] : 1.f; }
  float b(int64_t c) const { return bias ? bias[c] : 0.f; }
  float s(int64_t c) const { return shift ? shift[c] : 0.f; }
};

// Mean and variance from per-channel sums of v = x + shift - pivot[c] over `hw` elements each.
void combine(const double* s1, const double* s2, const float* pivot, int64_t channels, int64_t hw, float eps,
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
}

// ---- NCHW: one (sample, group) slice, cpg channels of hw contiguous elements ----

template <typename T>
void nchw_group_scalar(const T* x, T* y, int64_t cpg, int64_t hw, Affine a, float eps, bool act, float* mean,
                       float* rstd) {
  std::vector<double> s1(cpg), s2(cpg);
  std::vector<float> pivot(cpg);
  for (int64_t c = 0; c < cpg; ++c) {
    const T* xc = x + c * hw;
    pivot[c] = to_float(xc[0]) + a.s(c);
    float acc1 = 0, acc2 = 0;
    for (int64_t i = 0; i < hw; ++i) {
      const float v = to_float(xc[i]) + a.s(c) - pivot[c];
      acc1 += v;
      acc2 += v * v;
    }
    s1[c] = acc1, s2[c] = acc2;
  }
  combine(s1.data(), s2.data(), pivot.data(), cpg, hw, eps, mean, rstd);
  for (int64_t c = 0; c < cpg; ++c) {
    // (x - mean) * scale + b, not x * scale + (b - mean * scale): the latter loses digits
    // when the variance is tiny and rstd large.
    const float scale = *rstd * a.w(c), center = a.s(c) - *mean, offset = a.b(c);
    const T* xc = x + c * hw;
    T* yc = y + c * hw;
    for (int64_t i = 0; i < hw; ++i) {
      const float z = (to_float(xc[i]) + center) * scale + offset;
      store_float(yc + i, act ? silu(z) : z);
    }
  }
}

template <typename T>
DDPM_AVX512 void nchw_group_avx512(const T* x, T* y, int64_t cpg, int64_t hw, Affine a, float eps, bool act,
                                   float* mean, float* rstd) {
  std::vector<double> s1(cpg), s2(cpg);
  std::vector<float> pivot(cpg);
  for (int64_t c = 0; c < cpg; ++c) {
    const T* xc = x + c * hw;
    pivot[c] = to_float(xc[0]) + a.s(c);
    const __m512 off = _mm512_set1_ps(a.s(c) - pivot[c]);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), b1 = a1, b2 = a1;
    int64_t i = 0;
    for (; i + 32 <= hw; i += 32) {  // two independent chains hide the add latency
      const __m512 u = _mm512_add_ps(load16(xc + i, 0xffff), off);
      const __m512 v = _mm512_add_ps(load16(xc + i + 16, 0xffff), off);
      a1 = _mm512_add_ps(a1, u), a2 = _mm512_fmadd_ps(u, u, a2);
      b1 = _mm512_add_ps(b1, v), b2 = _mm512_fmadd_ps(v, v, b2);
    }
    for (; i < hw; i += 16) {
      const __mmask16 m = tail_mask(hw - i);
      const __m512 u = _mm512_maskz_add_ps(m, load16(xc + i, m), off);
      a1 = _mm512_add_ps(a1, u), a2 = _mm512_fmadd_ps(u, u, a2);
    }
    s1[c] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
    s2[c] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
  }
  combine(s1.data(), s2.data(), pivot.data(), cpg, hw, eps, mean, rstd);
  for (int64_t c = 0; c < cpg; ++c) {
    const __m512 vs = _mm512_set1_ps(*rstd * a.w(c)), vc = _mm512_set1_ps(a.s(c) - *mean),
                 vo = _mm512_set1_ps(a.b(c));
    const T* xc = x + c * hw;
    T* yc = y + c * hw;
    for (int64_t i = 0; i < hw; i += 16) {
      const __mmask16 m = tail_mask(hw - i);
      __m512 z = _mm512_fmadd_ps(_mm512_add_ps(load16(xc + i, m), vc), vs, vo);
      store16(yc + i, act ? silu16(z) : z, m);
    }
  }
}

// ---- channels_last: pixels [p0, p1) of one sample, C contiguous channels per pixel ----

// Per-channel sums of v = x - pivot[c] (the shift cancels in x + shift - (x0 + shift)).
template <typename T>
void nhwc_sums_scalar(const T* x, int64_t C, int64_t p0, int64_t p1, const float* x0, double* s1, double* s2) {
  for (int64_t c = 0; c < C; ++c) {
    float acc1 = 0, acc2 = 0;
    for (int64_t p = p0; p < p1; ++p) {
      const float v = to_float(x[p * C + c]) - x0[c];
      acc1 += v, acc2 += v * v;
    }
    s1[c] = acc1, s2[c] = acc2;
  }
}

template <typename T>
DDPM_AVX512 void nhwc_sums_avx512(const T* x, int64_t C, int64_t p0, int64_t p1, const float* x0, double* s1,
                                  double* s2) {
  alignas(64) float r1[16], r2[16];
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = tail_mask(C - c);
    const __m512 piv = _mm512_maskz_loadu_ps(m, x0 + c);
    __m512 a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) {
      const __m512 v = _mm512_sub_ps(load16(x + p * C + c, m), piv);
      a1 = _mm512_add_ps(a1, v), a2 = _mm512_fmadd_ps(v, v, a2);
    }
    _mm512_store_ps(r1, a1), _mm512_store_ps(r2, a2);
    for (int64_t j = 0; j < 16 && c + j < C; ++j) s1[c + j] = r1[j], s2[c + j] = r2[j];
  }
}

template <typename T>
void nhwc_normalize_scalar(const T* x, T* y, int64_t C, int64_t p0, int64_t p1, const float* center,
                           const float* scale, const float* offset, bool act) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = 0; c < C; ++c) {
      const float z = (to_float(x[p * C + c]) + center[c]) * scale[c] + offset[c];
      store_float(y + p * C + c, act ? silu(z) : z);
    }
}

template <typename T>
DDPM_AVX512 void nhwc_normalize_avx512(const T* x, T* y, int64_t C, int64_t p0, int64_t p1, const float* center,
                                       const float* scale, const float* offset, bool act) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = tail_mask(C - c);
      const __m512 v = _mm512_add_ps(load16(x + p * C + c, m), _mm512_maskz_loadu_ps(m, center + c));
      __m512 z = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, scale + c), _mm512_maskz_loadu_ps(m, offset + c));
      store16(y + p * C + c, act ? silu16(z) : z, m);
    }
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

template <typename T>
void forward_impl(const Tensor& x, Tensor& y, const Tensor& w, const Tensor& b, const Tensor& s, int64_t G,
                  float eps, bool act, float* mean, float* rstd) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.numel() / (N * C), cpg = C / G;
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
  const bool simd = cpu_has_avx512();

  if (!is_channels_last(x)) {
    at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / G, c0 = (i % G) * cpg, off = (n * C + c0) * HW;
        Affine a{wp ? wp + c0 : nullptr, bp ? bp + c0 : nullptr, sp ? sp + n * C + c0 : nullptr};
        if (simd)
          nchw_group_avx512(xp + off, yp + off, cpg, HW, a, eps, act, mean + i, rstd + i);
        else
          nchw_group_scalar(xp + off, yp + off, cpg, HW, a, eps, act, mean + i, rstd + i);
      }
    });
    return;
  }

  // channels_last: pass 1, per-channel sums over pixel chunks; combine per group; pass 2, output.
  const int64_t chunk = std::max<int64_t>(64, (HW + 7) / 8), chunks = (HW + chunk - 1) / chunk;
  std::vector<double> s1(N * chunks * C), s2(N * chunks * C);
  std::vector<float> x0(N * C), center(N * C), scale(N * C), offset(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) x0[n * C + c] = to_float(xp[n * HW * C + c]);
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / chunks, p0 = (i % chunks) * chunk, p1 = std::min(HW, p0 + chunk);
      if (simd)
        nhwc_sums_avx512(xp + n * HW * C, C, p0, p1, &x0[n * C], &s1[i * C], &s2[i * C]);
      else
        nhwc_sums_scalar(xp + n * HW * C, C, p0, p1, &x0[n * C], &s1[i * C], &s2[i * C]);
    }
  });
  std::vector<double> g1(cpg), g2(cpg);
  std::vector<float> piv(cpg);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t c = g * cpg + j;
        g1[j] = g2[j] = 0;
        for (int64_t k = 0; k < chunks; ++k) g1[j] += s1[(n * chunks + k) * C + c], g2[j] += s2[(n * chunks + k) * C + c];
        // sums of x - x0 are sums of (x + shift) - (x0 + shift): the pivot carries the shift
        piv[j] = x0[n * C + c] + (sp ? sp[n * C + c] : 0.f);
      }
      const int64_t i = n * G + g;
      combine(g1.data(), g2.data(), piv.data(), cpg, HW, eps, mean + i, rstd + i);
      for (int64_t j = 0; j < cpg; ++j) {
        const int64_t c = g * cpg + j;
        const float sh = sp ? sp[n * C + c] : 0.f, w_ = wp ? wp[c] : 1.f, b_ = bp ? bp[c] : 0.f;
        center[n * C + c] = sh - mean[i];
        scale[n * C + c] = rstd[i] * w_;
        offset[n * C + c] = b_;
      }
    }
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / chunks, p0 = (i % chunks) * chunk, p1 = std::min(HW, p0 + chunk);
      if (simd)
        nhwc_normalize_avx512(xp + n * HW * C, yp + n * HW * C, C, p0, p1, &center[n * C], &scale[n * C], &offset[n * C], act);
      else
        nhwc_normalize_scalar(xp + n * HW * C, yp + n * HW * C, C, p0, p1, &center[n * C], &scale[n * C], &offset[n * C], act);
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

// ---- backward ----
// With xhat = (x + shift - mean) * rstd, z = xhat * w + b, y = silu(z):
//   dz = dy * silu'(z);  dw[c] = sum dz * xhat;  db[c] = sum dz;
//   dx = rstd * (w dz - mean_group(w dz) - xhat * mean_group(w dz xhat)).
// Element (n, c, i) sits at n * sN + c * sC + i * sI (NCHW or channels_last strides).
template <typename T>
void backward_impl(const Tensor& dy_t, const Tensor& x_t, Tensor& dx_t, const Tensor& w, const Tensor& b,
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

  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
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
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace ddpm_perf::cpu
