// CUDA implementations of ddpm_perf::group_norm_silu and ddpm_perf::group_norm_silu_backward
// (schemas in csrc/ops.cpp; semantics defined by ddpm_perf/ops/reference.py::group_norm_silu):
//
//   h = x + shift[:, :, None, None]            (shift optional, shape (N, C))
//   xhat = (h - mean) * rstd                   (mean, var over each (n, group), biased, fp32)
//   z = xhat * weight + bias                   (weight, bias optional, shape (C,))
//   y = silu(z) if silu else z                 (in x's dtype)
//
// Inputs: x of dtype fp32, fp16 or bf16, of shape (N, C, *spatial), either NCHW-contiguous or
// channel-last (channels_last for 4-d, channels_last_3d for 5-d); anything else is made
// contiguous first. The output has the (suggested) memory format of x. weight, bias and shift
// may be of any floating dtype: they are read as fp32. All arithmetic and the statistics are fp32.
//
// One thread block per (n, group). The forward makes two passes over the group: Welford
// statistics (per thread, then merged across the warp with shuffles and across warps through
// shared memory), then normalise + affine + SiLU. The backward block computes per-channel sums
// sum(dz) and sum(dz * xhat) (deterministic: no atomics), combines them into the two group means
// the input gradient needs, and writes grad_x; a second small kernel sums the per-(n, c) partials
// over n into grad_weight and grad_bias (again deterministic).
//
// Headers: torch/all.h and the c10 CUDA headers, not torch/extension.h (it needs the full Python
// API; see pytorch/extension-cpp#112) and not ATen/cuda/CUDAContext.h, which pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers that these kernels do not use (and which a bare nvcc toolkit
// does not ship). at::cuda::getCurrentCUDAStream is c10/cuda/CUDAStream.h's (torch's macros
// header opens c10::cuda into at::cuda).
#include <torch/all.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "quantize.cuh"

// fp32, fp16 and bf16 only (the reference computes in fp32, so double is not offered here).
#define DDPM_PERF_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace ddpm_perf {
namespace {

constexpr int kThreads = 256;  // every kernel here is launched with exactly this many threads
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------

struct Welford {
  float mean;
  float m2;     // sum of squared deviations from mean
  float count;  // fp32: exact up to 2^24 elements, a negligible relative error beyond
};

__device__ __forceinline__ void welford_update(Welford& w, float v) {
  w.count += 1.f;
  const float delta = v - w.mean;
  w.mean += delta / w.count;
  w.m2 += delta * (v - w.mean);
}

// Chan et al.'s pairwise merge.
__device__ __forceinline__ Welford welford_combine(const Welford& a, const Welford& b) {
  if (b.count == 0.f) return a;
  if (a.count == 0.f) return b;
  const float count = a.count + b.count;
  const float delta = b.mean - a.mean;
  const float frac_b = b.count / count;
  Welford r;
  r.mean = a.mean + delta * frac_b;
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * frac_b;
  r.count = count;
  return r;
}

// After this, lane 0 holds the merge of the whole warp (other lanes hold partial garbage).
__device__ __forceinline__ Welford warp_reduce_welford(Welford w) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    Welford other;
    other.mean = __shfl_down_sync(kFullMask, w.mean, offset);
    other.m2 = __shfl_down_sync(kFullMask, w.m2, offset);
    other.count = __shfl_down_sync(kFullMask, w.count, offset);
    w = welford_combine(w, other);
  }
  return w;
}

// Every thread of the block must call it; every thread gets the block's result. Called at most
// once per kernel (the shared slots are not reused).
__device__ __forceinline__ Welford block_reduce_welford(Welford w) {
  __shared__ Welford partials[kWarps];
  __shared__ Welford result;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  w = warp_reduce_welford(w);
  if (lane == 0) partials[warp] = w;
  __syncthreads();
  if (warp == 0) {
    Welford v;
    if (lane < kWarps) {
      v = partials[lane];
    } else {
      v.mean = 0.f;
      v.m2 = 0.f;
      v.count = 0.f;
    }
    v = warp_reduce_welford(v);
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// Lane 0 ends with the warp's sums.
__device__ __forceinline__ void warp_reduce_sum2(float& a, float& b) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    a += __shfl_down_sync(kFullMask, a, offset);
    b += __shfl_down_sync(kFullMask, b, offset);
  }
}

// Every thread of the block must call it; every thread gets the block's sums. Called at most
// once per kernel.
__device__ __forceinline__ void block_reduce_sum2(float& a, float& b) {
  __shared__ float partial_a[kWarps];
  __shared__ float partial_b[kWarps];
  __shared__ float result[2];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  warp_reduce_sum2(a, b);
  if (lane == 0) {
    partial_a[warp] = a;
    partial_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    float va = lane < kWarps ? partial_a[lane] : 0.f;
    float vb = lane < kWarps ? partial_b[lane] : 0.f;
    warp_reduce_sum2(va, vb);
    if (lane == 0) {
      result[0] = va;
      result[1] = vb;
    }
  }
  __syncthreads();
  a = result[0];
  b = result[1];
}

// ---------------------------------------------------------------------------------------------
// Indexing
// ---------------------------------------------------------------------------------------------

// Element i (0 <= i < channels_per_group * HW) of group g of one sample: its channel c and its
// offset from the start of the sample. NCHW: the group is one contiguous run, channel-major.
// Channel-last: spatial position s = i / cpg, channel c = g * cpg + i % cpg, so consecutive i
// (consecutive threads) read consecutive channels of one position, which are adjacent in memory.
template <bool kChannelsLast>
__device__ __forceinline__ void element_location(int i, int g, int cpg, int C, int HW, int& c,
                                                 int64_t& offset) {
  if (kChannelsLast) {
    const int s = i / cpg;
    c = g * cpg + (i - s * cpg);
    offset = static_cast<int64_t>(s) * C + c;
  } else {
    c = g * cpg + i / HW;
    offset = static_cast<int64_t>(g) * cpg * HW + i;
  }
}

__device__ __forceinline__ float silu(float z) { return z / (1.f + expf(-z)); }

// The input gradient of the affine + SiLU part: dL/dz from dL/dy at pre-activation z.
// silu'(z) = s + z * s * (1 - s) with s = sigmoid(z).
__device__ __forceinline__ float dz_from_dy(float dy, float z, bool apply_silu) {
  if (!apply_silu) return dy;
  const float s = 1.f / (1.f + expf(-z));
  return dy * (s * (1.f + z * (1.f - s)));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// The stored output: y in x's dtype, or (out_t uint8_t) quantised for an int8 consumer.
struct OutputQuant {
  float inv_scale, zero_point;
};
template <typename out_t>
__device__ __forceinline__ out_t to_output(float v, OutputQuant) {
  return static_cast<out_t>(v);
}
template <>
__device__ __forceinline__ uint8_t to_output<uint8_t>(float v, OutputQuant q) {
  return static_cast<uint8_t>(quantize_u8(v, q.inv_scale, q.zero_point));
}

// grid: N * groups blocks of kThreads. weight, bias, shift: fp32 or nullptr.
template <typename scalar_t, typename out_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    group_norm_silu_forward_kernel(const scalar_t* __restrict__ x, const float* __restrict__ weight,
                                   const float* __restrict__ bias, const float* __restrict__ shift,
                                   out_t* __restrict__ y, float* __restrict__ mean_out,
                                   float* __restrict__ rstd_out, int C, int HW, int groups, float eps,
                                   bool apply_silu, OutputQuant quant) {
  const int ng = blockIdx.x;
  const int n = ng / groups;
  const int g = ng - n * groups;
  const int cpg = C / groups;
  const int group_size = cpg * HW;
  const int64_t sample = static_cast<int64_t>(n) * C * HW;
  const float* shift_n = shift == nullptr ? nullptr : shift + static_cast<int64_t>(n) * C;
  const scalar_t* x_n = x + sample;
  out_t* y_n = y + sample;

  // Pass 1: statistics of h = x + shift.
  Welford w;
  w.mean = 0.f;
  w.m2 = 0.f;
  w.count = 0.f;
  for (int i = threadIdx.x; i < group_size; i += kThreads) {
    int c;
    int64_t offset;
    element_location<kChannelsLast>(i, g, cpg, C, HW, c, offset);
    float v = static_cast<float>(x_n[offset]);
    if (shift_n != nullptr) v += shift_n[c];
    welford_update(w, v);
  }
  w = block_reduce_welford(w);
  const float mean = w.mean;
  const float var = fmaxf(w.m2 / w.count, 0.f);  // biased (correction=0), as the reference
  const float rstd = rsqrtf(var + eps);
  if (threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }

  // Pass 2: normalise, affine, SiLU.
  for (int i = threadIdx.x; i < group_size; i += kThreads) {
    int c;
    int64_t offset;
    element_location<kChannelsLast>(i, g, cpg, C, HW, c, offset);
    float v = static_cast<float>(x_n[offset]);
    if (shift_n != nullptr) v += shift_n[c];
    float out = (v - mean) * rstd;
    if (weight != nullptr) out *= weight[c];
    if (bias != nullptr) out += bias[c];
    if (apply_silu) out = silu(out);
    y_n[offset] = to_output<out_t>(out, quant);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// grid: N * groups blocks of kThreads. Writes grad_x and, for each channel c of the group,
// channel_dz[n, c] = sum_s dz and channel_dz_xhat[n, c] = sum_s dz * xhat (fp32, (N, C)). Those
// two buffers are written and then read back by the same block, so they are plain pointers (no
// __restrict__/const: the read must not go through the non-coherent read-only cache).
template <typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) group_norm_silu_backward_kernel(
    const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, const float* __restrict__ weight,
    const float* __restrict__ bias, const float* __restrict__ shift, const float* __restrict__ mean,
    const float* __restrict__ rstd, scalar_t* __restrict__ dx, float* channel_dz,
    float* channel_dz_xhat, int C, int HW, int groups, bool apply_silu) {
  const int ng = blockIdx.x;
  const int n = ng / groups;
  const int g = ng - n * groups;
  const int cpg = C / groups;
  const int group_size = cpg * HW;
  const int64_t sample = static_cast<int64_t>(n) * C * HW;
  const float* shift_n = shift == nullptr ? nullptr : shift + static_cast<int64_t>(n) * C;
  const scalar_t* x_n = x + sample;
  const scalar_t* dy_n = dy + sample;
  scalar_t* dx_n = dx + sample;
  float* channel_dz_n = channel_dz + static_cast<int64_t>(n) * C;
  float* channel_dz_xhat_n = channel_dz_xhat + static_cast<int64_t>(n) * C;
  const float mu = mean[ng];
  const float rs = rstd[ng];

  // Phase 1: per-channel sums of dz and dz * xhat.
  if (!kChannelsLast) {
    // NCHW: a channel is a contiguous run of HW elements; one warp per channel, lanes along HW.
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    for (int cl = warp; cl < cpg; cl += kWarps) {  // uniform within a warp
      const int c = g * cpg + cl;
      const float w_c = weight != nullptr ? weight[c] : 1.f;
      const float b_c = bias != nullptr ? bias[c] : 0.f;
      const float sh_c = shift_n != nullptr ? shift_n[c] : 0.f;
      const int64_t base = static_cast<int64_t>(c) * HW;
      float sum_dz = 0.f;
      float sum_dz_xhat = 0.f;
      for (int s = lane; s < HW; s += kWarpSize) {
        const float xhat = (static_cast<float>(x_n[base + s]) + sh_c - mu) * rs;
        const float dz = dz_from_dy(static_cast<float>(dy_n[base + s]), xhat * w_c + b_c, apply_silu);
        sum_dz += dz;
        sum_dz_xhat += dz * xhat;
      }
      warp_reduce_sum2(sum_dz, sum_dz_xhat);
      if (lane == 0) {
        channel_dz_n[c] = sum_dz;
        channel_dz_xhat_n[c] = sum_dz_xhat;
      }
    }
  } else {
    // Channel-last: a position's channels are adjacent. Threads form a (rows x tile) grid:
    // tile = min(cpg, 32) adjacent channels by rows spatial positions; each thread sums its
    // channel over positions ty, ty + rows, ...; then the rows are summed through shared memory.
    __shared__ float s_dz[kThreads];
    __shared__ float s_dz_xhat[kThreads];
    const int tile = cpg < kWarpSize ? cpg : kWarpSize;
    const int rows = kThreads / tile;
    const int tx = threadIdx.x % tile;
    const int ty = threadIdx.x / tile;
    for (int c0 = 0; c0 < cpg; c0 += tile) {  // same trip count for every thread
      const int cl = c0 + tx;
      float sum_dz = 0.f;
      float sum_dz_xhat = 0.f;
      if (ty < rows && cl < cpg) {
        const int c = g * cpg + cl;
        const float w_c = weight != nullptr ? weight[c] : 1.f;
        const float b_c = bias != nullptr ? bias[c] : 0.f;
        const float sh_c = shift_n != nullptr ? shift_n[c] : 0.f;
        for (int s = ty; s < HW; s += rows) {
          const int64_t offset = static_cast<int64_t>(s) * C + c;
          const float xhat = (static_cast<float>(x_n[offset]) + sh_c - mu) * rs;
          const float dz = dz_from_dy(static_cast<float>(dy_n[offset]), xhat * w_c + b_c, apply_silu);
          sum_dz += dz;
          sum_dz_xhat += dz * xhat;
        }
      }
      s_dz[threadIdx.x] = sum_dz;
      s_dz_xhat[threadIdx.x] = sum_dz_xhat;
      __syncthreads();
      if (threadIdx.x < tile && c0 + static_cast<int>(threadIdx.x) < cpg) {
        float total_dz = 0.f;
        float total_dz_xhat = 0.f;
        for (int r = 0; r < rows; ++r) {
          total_dz += s_dz[r * tile + threadIdx.x];
          total_dz_xhat += s_dz_xhat[r * tile + threadIdx.x];
        }
        const int c = g * cpg + c0 + threadIdx.x;
        channel_dz_n[c] = total_dz;
        channel_dz_xhat_n[c] = total_dz_xhat;
      }
      __syncthreads();  // before the next tile overwrites s_dz
    }
  }
  __syncthreads();  // the block's global writes above are visible to the whole block after this

  // Phase 2: the group means of dxhat = dz * w and of dxhat * xhat.
  float sum_dxhat = 0.f;
  float sum_dxhat_xhat = 0.f;
  for (int cl = threadIdx.x; cl < cpg; cl += kThreads) {
    const int c = g * cpg + cl;
    const float w_c = weight != nullptr ? weight[c] : 1.f;
    sum_dxhat += w_c * channel_dz_n[c];
    sum_dxhat_xhat += w_c * channel_dz_xhat_n[c];
  }
  block_reduce_sum2(sum_dxhat, sum_dxhat_xhat);
  const float inv_count = 1.f / static_cast<float>(group_size);
  const float mean_dxhat = sum_dxhat * inv_count;
  const float mean_dxhat_xhat = sum_dxhat_xhat * inv_count;

  // Phase 3: grad_h = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
  for (int i = threadIdx.x; i < group_size; i += kThreads) {
    int c;
    int64_t offset;
    element_location<kChannelsLast>(i, g, cpg, C, HW, c, offset);
    const float w_c = weight != nullptr ? weight[c] : 1.f;
    const float b_c = bias != nullptr ? bias[c] : 0.f;
    const float sh_c = shift_n != nullptr ? shift_n[c] : 0.f;
    const float xhat = (static_cast<float>(x_n[offset]) + sh_c - mu) * rs;
    const float dz = dz_from_dy(static_cast<float>(dy_n[offset]), xhat * w_c + b_c, apply_silu);
    dx_n[offset] = static_cast<scalar_t>(rs * (dz * w_c - mean_dxhat - xhat * mean_dxhat_xhat));
  }
}

// One thread per channel: grad_bias[c] = sum_n channel_dz[n, c], grad_weight[c] = sum_n
// channel_dz_xhat[n, c] (fp32; either output may be nullptr).
__global__ void __launch_bounds__(kThreads)
    group_norm_param_grad_kernel(const float* __restrict__ channel_dz,
                                 const float* __restrict__ channel_dz_xhat,
                                 float* __restrict__ grad_weight, float* __restrict__ grad_bias, int N,
                                 int C) {
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c >= C) return;
  float gw = 0.f;
  float gb = 0.f;
  for (int n = 0; n < N; ++n) {
    const int64_t idx = static_cast<int64_t>(n) * C + c;
    gb += channel_dz[idx];
    gw += channel_dz_xhat[idx];
  }
  if (grad_weight != nullptr) grad_weight[c] = gw;
  if (grad_bias != nullptr) grad_bias[c] = gb;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

void check_float_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "ddpm_perf::group_norm_silu (CUDA): ", name, " must be a CUDA tensor, got ",
              x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "ddpm_perf::group_norm_silu (CUDA): ", name, " must be float32, float16 or bfloat16, got ",
              dtype);
}

// weight / bias: (C,); shift: N * C elements, read as (N, C). Returned as contiguous fp32 on x's
// device, or an undefined tensor when absent.
at::Tensor channel_param(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t numel,
                         const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == x.device(), "ddpm_perf::group_norm_silu (CUDA): ", name,
              " must be on the same device as x (", x.device(), "), got ", t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "ddpm_perf::group_norm_silu (CUDA): ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == numel, "ddpm_perf::group_norm_silu (CUDA): ", name, " must have ", numel,
              " elements, got shape ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

struct Geometry {
  int64_t N, C, HW, groups;
  at::MemoryFormat memory_format;
  bool channels_last;
};

Geometry check_geometry(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.dim() >= 2, "ddpm_perf::group_norm_silu (CUDA): x must have at least 2 dims (N, C, ...), got ",
              x.dim());
  Geometry geo;
  geo.N = x.size(0);
  geo.C = x.size(1);
  geo.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) geo.HW *= x.size(d);
  geo.groups = groups;
  TORCH_CHECK(groups > 0, "ddpm_perf::group_norm_silu (CUDA): groups must be positive, got ", groups);
  TORCH_CHECK(geo.C % groups == 0, "ddpm_perf::group_norm_silu (CUDA): channels (", geo.C,
              ") must be divisible by groups (", groups, ")");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK((geo.C / groups) * geo.HW <= kIntMax - kThreads && geo.C <= kIntMax && geo.HW <= kIntMax,
              "ddpm_perf::group_norm_silu (CUDA): a group of ", (geo.C / groups) * geo.HW,
              " elements is too large for this kernel");
  TORCH_CHECK(geo.N * groups <= kIntMax, "ddpm_perf::group_norm_silu (CUDA): N * groups is too large");
  geo.memory_format = x.suggest_memory_format();
  geo.channels_last = geo.memory_format == at::MemoryFormat::ChannelsLast ||
                      geo.memory_format == at::MemoryFormat::ChannelsLast3d;
  return geo;
}

// The forward of both ops: y in x's dtype, or uint8 codes quantised with `quant` when `codes`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu, bool codes, OutputQuant quant) {
  check_float_input(x, "x");
  const Geometry geo = check_geometry(x, groups);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::Tensor w = channel_param(weight, x, geo.C, "weight");
  const at::Tensor b = channel_param(bias, x, geo.C, "bias");
  const at::Tensor sh = channel_param(shift, x, geo.N * geo.C, "shift");

  const at::Tensor xc = x.contiguous(geo.memory_format);
  // same (dense) strides as xc: x's memory format
  at::Tensor y = codes ? at::empty_like(xc, xc.options().dtype(at::kByte)) : at::empty_like(xc);
  const auto stat_options = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({geo.N, geo.groups}, stat_options);
  at::Tensor rstd = at::empty({geo.N, geo.groups}, stat_options);
  if (xc.numel() == 0) {
    // Statistics of empty groups are NaN, as torch.var_mean of an empty tensor.
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, rstd};
  }

  const int blocks = static_cast<int>(geo.N * geo.groups);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DDPM_PERF_DISPATCH_FLOAT_HALF_BF16(xc.scalar_type(), "ddpm_perf::group_norm_silu (CUDA)", [&] {
    const auto launch = [&](auto* y_ptr) {
      using out_t = std::remove_pointer_t<decltype(y_ptr)>;
      const auto kernel = geo.channels_last ? group_norm_silu_forward_kernel<scalar_t, out_t, true>
                                            : group_norm_silu_forward_kernel<scalar_t, out_t, false>;
      kernel<<<blocks, kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), ptr_or_null(w), ptr_or_null(b), ptr_or_null(sh), y_ptr,
          mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), static_cast<int>(geo.C),
          static_cast<int>(geo.HW), static_cast<int>(geo.groups), static_cast<float>(eps), silu, quant);
    };
    if (codes)
      launch(y.mutable_data_ptr<uint8_t>());
    else
      launch(y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& shift, int64_t groups, double eps, bool silu) {
  return forward_cuda(x, weight, bias, shift, groups, eps, silu, false, OutputQuant{1.f, 0.f});
}

// y quantised to uint8 (clamp(round(y / scale) + zero_point, 0, 255)) for an int8 consumer; the
// statistics are scratch (no backward).
at::Tensor group_norm_silu_quantized_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& shift, int64_t groups, double eps,
                                          bool silu, double scale, int64_t zero_point) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0,
              "ddpm_perf::group_norm_silu_quantized (CUDA): scale must be positive and finite, got ", scale);
  TORCH_CHECK(zero_point >= 0 && zero_point <= 255,
              "ddpm_perf::group_norm_silu_quantized (CUDA): zero_point must be in [0, 255], got ", zero_point);
  TORCH_CHECK(x.numel() > 0, "ddpm_perf::group_norm_silu_quantized (CUDA): empty input");
  const OutputQuant quant{static_cast<float>(1.0 / scale), static_cast<float>(zero_point)};
  return std::get<0>(forward_cuda(x, weight, bias, shift, groups, eps, silu, true, quant));
}

// Returns (grad_x in x's dtype and memory format, grad_weight, grad_bias). grad_weight (grad_bias)
// is a (C,) tensor in weight's (bias's) dtype when weight (bias) is given. The schema does not
// allow an undefined Tensor in the result, so when weight (bias) is None its gradient is an
// empty tensor of shape (0,) with x's dtype and device; the autograd formula in Python must map
// it to None.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t groups, bool silu) {
  check_float_input(x, "x");
  check_float_input(grad_y, "grad_y");
  TORCH_CHECK(grad_y.device() == x.device(), "ddpm_perf::group_norm_silu_backward (CUDA): grad_y is on ",
              grad_y.device(), " but x is on ", x.device());
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "ddpm_perf::group_norm_silu_backward (CUDA): grad_y shape ",
              grad_y.sizes(), " differs from x shape ", x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "ddpm_perf::group_norm_silu_backward (CUDA): grad_y dtype ",
              grad_y.scalar_type(), " differs from x dtype ", x.scalar_type());
  const Geometry geo = check_geometry(x, groups);
  for (const at::Tensor* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->device() == x.device() && stat->scalar_type() == at::kFloat &&
                    stat->numel() == geo.N * geo.groups,
                "ddpm_perf::group_norm_silu_backward (CUDA): mean and rstd must be float32 (N, groups) = (",
                geo.N, ", ", geo.groups, ") tensors on ", x.device(), ", got ", stat->scalar_type(), " ",
                stat->sizes(), " on ", stat->device());
  }
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::Tensor w = channel_param(weight, x, geo.C, "weight");
  const at::Tensor b = channel_param(bias, x, geo.C, "bias");
  const at::Tensor sh = channel_param(shift, x, geo.N * geo.C, "shift");
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor rstd_c = rstd.contiguous();

  const at::Tensor xc = x.contiguous(geo.memory_format);
  const at::Tensor dyc = grad_y.contiguous(geo.memory_format);  // the same layout as xc
  at::Tensor dx = at::empty_like(xc);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor channel_dz = at::empty({geo.N, geo.C}, f32);
  at::Tensor channel_dz_xhat = at::empty({geo.N, geo.C}, f32);
  at::Tensor grad_w = w.defined() ? at::empty({geo.C}, f32) : at::Tensor();
  at::Tensor grad_b = b.defined() ? at::empty({geo.C}, f32) : at::Tensor();

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (xc.numel() > 0) {
    const int blocks = static_cast<int>(geo.N * geo.groups);
    DDPM_PERF_DISPATCH_FLOAT_HALF_BF16(xc.scalar_type(), "ddpm_perf::group_norm_silu_backward (CUDA)", [&] {
      const auto* dy_ptr = dyc.const_data_ptr<scalar_t>();
      const auto* x_ptr = xc.const_data_ptr<scalar_t>();
      auto* dx_ptr = dx.mutable_data_ptr<scalar_t>();
      if (geo.channels_last) {
        group_norm_silu_backward_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
            dy_ptr, x_ptr, ptr_or_null(w), ptr_or_null(b), ptr_or_null(sh), mean_c.const_data_ptr<float>(),
            rstd_c.const_data_ptr<float>(), dx_ptr, channel_dz.mutable_data_ptr<float>(),
            channel_dz_xhat.mutable_data_ptr<float>(), static_cast<int>(geo.C), static_cast<int>(geo.HW),
            static_cast<int>(geo.groups), silu);
      } else {
        group_norm_silu_backward_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
            dy_ptr, x_ptr, ptr_or_null(w), ptr_or_null(b), ptr_or_null(sh), mean_c.const_data_ptr<float>(),
            rstd_c.const_data_ptr<float>(), dx_ptr, channel_dz.mutable_data_ptr<float>(),
            channel_dz_xhat.mutable_data_ptr<float>(), static_cast<int>(geo.C), static_cast<int>(geo.HW),
            static_cast<int>(geo.groups), silu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    // No elements (N == 0 or an empty spatial dim): every per-channel sum is empty.
    channel_dz.zero_();
    channel_dz_xhat.zero_();
  }

  if ((grad_w.defined() || grad_b.defined()) && geo.C > 0) {
    const int blocks = static_cast<int>((geo.C + kThreads - 1) / kThreads);
    group_norm_param_grad_kernel<<<blocks, kThreads, 0, stream>>>(
        channel_dz.const_data_ptr<float>(), channel_dz_xhat.const_data_ptr<float>(),
        grad_w.defined() ? grad_w.mutable_data_ptr<float>() : nullptr,
        grad_b.defined() ? grad_b.mutable_data_ptr<float>() : nullptr, static_cast<int>(geo.N),
        static_cast<int>(geo.C));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor grad_weight = grad_w.defined() ? grad_w.to(weight->scalar_type()) : at::empty({0}, x.options());
  at::Tensor grad_bias = grad_b.defined() ? grad_b.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, grad_weight, grad_bias};
}

}  // namespace
}  // namespace ddpm_perf

TORCH_LIBRARY_IMPL(ddpm_perf, CUDA, m) {
  m.impl("group_norm_silu", &ddpm_perf::group_norm_silu_cuda);
  m.impl("group_norm_silu_quantized", &ddpm_perf::group_norm_silu_quantized_cuda);
  m.impl("group_norm_silu_backward", &ddpm_perf::group_norm_silu_backward_cuda);
}
