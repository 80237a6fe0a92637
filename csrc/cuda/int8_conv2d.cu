// CUDA implementations of ddpm_perf::int8_pack_weight and ddpm_perf::int8_conv2d (schemas in
// csrc/ops.cpp; semantics defined by ddpm_perf/ops/reference.py::int8_conv2d and
// quantize_activation).
//
// int8_pack_weight: int8 OIHW (any strides) -> int8 [O][KH][KW][Ip], Ip = I rounded up to a
// multiple of 4, the extra input channels zero. Read as int32 words, a row o is then the GEMM
// column of output channel o, K-ordered (kh, kw, 4-channel group), four channels per word, the
// order __dp4a consumes.
//
// int8_conv2d, for x (N, C, H, W) in fp32 / fp16 / bf16, NCHW or channels_last (any strides):
//   1. quantise: xq = clamp(rint(x * (float)(1.0 / x_scale)) + zero_point, 0, 255) as uint8, written
//      channel-last [N][H][W][Cp] (Cp = C rounded up to 4; the extra channels hold the zero point
//      and meet zero weights). rint rounds half to even, as torch.round.
//   2. implicit GEMM: out[m, o] = sum_k A[m, k] * B[k, o] with m = (n, oh, ow), k = (kh, kw, ci);
//      A is gathered from xq on the fly (a position in the spatial padding reads the zero point,
//      so that after step 3 it contributes exactly 0), B is the packed weight. 64 x 64 output
//      tiles, 8 words (32 input channels) of K per step, staged in shared memory; each of the 256
//      threads owns a 4 x 4 block of outputs and accumulates in int32 with dp4a.
//   3. epilogue (fp64, exact as the reference): (acc - zero_point * weight_colsum[o])
//      * (x_scale * weight_scale[o]) + bias[o], written in out_dtype (by default x's dtype, float32
//      for a uint8 x) to an (N, O, OH, OW) tensor in channels_last memory format.
// The int32 accumulator cannot overflow: the host checks C * KH * KW * 255 * 128 < 2^31.
//
// Headers: torch/all.h and the c10 CUDA headers, not torch/extension.h (pytorch/extension-cpp#112)
// and not ATen/cuda/CUDAContext.h (it pulls in cuBLAS/cuSPARSE/cuSOLVER headers these kernels
// do not need); at::cuda::getCurrentCUDAStream is c10/cuda/CUDAStream.h's.
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

#include "quantize.cuh"

#define DDPM_PERF_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace ddpm_perf {
namespace {

constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = 65536;  // grid-stride loops beyond this

constexpr int kBlockM = 64;       // output positions per block
constexpr int kBlockN = 64;       // output channels per block
constexpr int kBlockK = 8;        // int32 words (4 input channels each) of K per step
constexpr int kConvThreads = 256; // 16 x 16 threads, each 4 x 4 outputs
constexpr int kThreadGrid = 16;
constexpr int kPerThread = kBlockM / kThreadGrid;  // 4 (also kBlockN / kThreadGrid)
constexpr int kLoadRows = kConvThreads / kBlockK;  // 32 tile rows filled per pass of the loaders
constexpr int kLoadPasses = kBlockM / kLoadRows;   // 2
// Shared tiles are [kBlockK][kTileStride]. A loader thread writes word (k = tid % 8, row = tid / 8);
// a warp's 32 stores land on banks (k * 68 + row) % 32 = (4k + row) % 32, k in 0..7, row in 0..3:
// all distinct, so the stores are conflict-free. The compute reads are broadcasts or 16 distinct
// consecutive words.
constexpr int kTileStride = kBlockM + 4;

static_assert(kBlockM == kBlockN, "the loaders fill A and B rows with the same mapping");
static_assert(kConvThreads % kBlockK == 0 && kBlockM % kLoadRows == 0, "loader mapping");
static_assert(kThreadGrid * kThreadGrid == kConvThreads, "thread grid");

// d = c + sum_j a.byte[j] * b.byte[j], with a's bytes UNSIGNED (uint8 activations) and b's bytes
// SIGNED (int8 weights), int32 accumulation. The CUDA headers' __dp4a has only the both-signed
// (int, int, int) and both-unsigned (unsigned, unsigned, unsigned) overloads: passing a uint8
// activation word through the signed one would read bytes >= 128 as negative, and the unsigned
// one would read negative weights as >= 128. PTX has the mixed form (dp4a.u32.s32, sm_61+), so
// it is used directly.
__device__ __forceinline__ int32_t dp4a_u8s8(uint32_t a, int32_t b, int32_t c) {
  int32_t d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// ---------------------------------------------------------------------------------------------
// Weight packing
// ---------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kElementwiseThreads)
    int8_pack_weight_kernel(const int8_t* __restrict__ weight, int8_t* __restrict__ packed, int64_t total,
                            int I, int Ip, int KH, int KW, int64_t stride_o, int64_t stride_i,
                            int64_t stride_h, int64_t stride_w) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int ip = static_cast<int>(idx % Ip);
    int64_t rest = idx / Ip;
    const int kw = static_cast<int>(rest % KW);
    rest /= KW;
    const int kh = static_cast<int>(rest % KH);
    const int64_t o = rest / KH;
    packed[idx] = ip < I ? weight[o * stride_o + ip * stride_i + kh * stride_h + kw * stride_w]
                         : static_cast<int8_t>(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Activation quantisation
// ---------------------------------------------------------------------------------------------

// quantize_u8: quantize.cuh

// An element of x as its uint8 code: quantised, or as it is when x is already uint8.
template <typename scalar_t>
__device__ __forceinline__ uint32_t activation_code(scalar_t v, float inv_scale, float zero_point) {
  return quantize_u8(static_cast<float>(v), inv_scale, zero_point);
}
__device__ __forceinline__ uint32_t activation_code(uint8_t v, float, float) { return v; }

// One thread per 32-bit word of xq [N][H][W][Cw] (Cw = Cp / 4): four consecutive channels, the
// lowest channel in the lowest byte. x is read through its strides (any memory format); a uint8
// x is already quantised and only repacked.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    quantize_activation_kernel(const scalar_t* __restrict__ x, uint32_t* __restrict__ xq, int64_t total_words,
                               int C, int Cw, int H, int W, int64_t stride_n, int64_t stride_c,
                               int64_t stride_h, int64_t stride_w, float inv_scale, int zero_point) {
  const float zp = static_cast<float>(zero_point);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total_words;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int cw = static_cast<int>(idx % Cw);
    int64_t rest = idx / Cw;
    const int w = static_cast<int>(rest % W);
    rest /= W;
    const int h = static_cast<int>(rest % H);
    const int64_t n = rest / H;
    const scalar_t* x_pos = x + n * stride_n + h * stride_h + w * stride_w;
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = cw * 4 + j;
      const uint32_t q = c < C ? activation_code(x_pos[c * stride_c], inv_scale, zp)
                               : static_cast<uint32_t>(zero_point);
      word |= q << (8 * j);
    }
    xq[idx] = word;
  }
}

// ---------------------------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------------------------

struct ConvShape {
  int H, W, Cw;        // input (Cw: 4-channel words per position)
  int O, KW;           // output channels, kernel width
  int OH, OW;          // output size
  int stride_h, stride_w, pad_h, pad_w;
  int M;               // N * OH * OW, the GEMM rows
  int Kw;              // KH * KW * Cw, the GEMM depth in words
};

// grid: (ceil(M / 64), ceil(O / 64)), kConvThreads threads.
// xq: [N][H][W][Cw] words; wq: [O][Kw] words; colsum: (O,) int32; out_scale: (O,) fp64
// x_scale * weight_scale[o]; bias: (O,) fp64 or nullptr; y: [M][O] (channels_last (N, O, OH, OW)).
template <typename scalar_t>
__global__ void __launch_bounds__(kConvThreads)
    int8_conv2d_dp4a_kernel(const uint32_t* __restrict__ xq, const int32_t* __restrict__ wq,
                            const int32_t* __restrict__ colsum, const double* __restrict__ out_scale,
                            const double* __restrict__ bias, uint32_t zero_word, int zero_point, ConvShape p,
                            scalar_t* __restrict__ y) {
  __shared__ uint32_t a_tile[kBlockK][kTileStride];  // [k][m]
  __shared__ int32_t b_tile[kBlockK][kTileStride];   // [k][o]

  const int tid = threadIdx.x;
  const int tx = tid % kThreadGrid;  // output channels o0 + tx + 16 * j
  const int ty = tid / kThreadGrid;  // output rows m0 + ty + 16 * i
  const int m0 = blockIdx.x * kBlockM;
  const int o0 = blockIdx.y * kBlockN;

  // Loader mapping: this thread fills word k = load_k of tile rows load_row + 32 * r, for A
  // (output positions) and B (output channels) alike. The row geometry is fixed for the block.
  const int load_k = tid % kBlockK;
  const int load_row = tid / kBlockK;
  int a_n[kLoadPasses], a_ih0[kLoadPasses], a_iw0[kLoadPasses];
  bool a_valid[kLoadPasses], b_valid[kLoadPasses];
  int b_o[kLoadPasses];
#pragma unroll
  for (int r = 0; r < kLoadPasses; ++r) {
    const int m = m0 + load_row + kLoadRows * r;
    a_valid[r] = m < p.M;
    const int mm = a_valid[r] ? m : 0;
    const int ow = mm % p.OW;
    const int t = mm / p.OW;
    const int oh = t % p.OH;
    a_n[r] = t / p.OH;
    a_ih0[r] = oh * p.stride_h - p.pad_h;
    a_iw0[r] = ow * p.stride_w - p.pad_w;
    b_o[r] = o0 + load_row + kLoadRows * r;
    b_valid[r] = b_o[r] < p.O;
  }

  uint32_t a_reg[kLoadPasses];
  int32_t b_reg[kLoadPasses];
  // Global -> registers for the K step starting at word k0. Past the end of K both operands are
  // 0; A rows past M and B columns past O are 0 (never stored); a tap in the spatial padding
  // reads the zero point in all four bytes.
  auto load_step = [&](int k0) {
    const int kk = k0 + load_k;
    const bool k_valid = kk < p.Kw;
    int kh = 0, kw = 0, cw = 0;
    if (k_valid) {
      const int tap = kk / p.Cw;
      cw = kk - tap * p.Cw;
      kh = tap / p.KW;
      kw = tap - kh * p.KW;
    }
#pragma unroll
    for (int r = 0; r < kLoadPasses; ++r) {
      uint32_t av = 0;
      if (k_valid && a_valid[r]) {
        const int ih = a_ih0[r] + kh;
        const int iw = a_iw0[r] + kw;
        if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {
          av = xq[((static_cast<int64_t>(a_n[r]) * p.H + ih) * p.W + iw) * p.Cw + cw];
        } else {
          av = zero_word;
        }
      }
      a_reg[r] = av;
      b_reg[r] = (k_valid && b_valid[r]) ? wq[static_cast<int64_t>(b_o[r]) * p.Kw + kk] : 0;
    }
  };

  int32_t acc[kPerThread][kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc[i][j] = 0;
  }

  load_step(0);
  for (int k0 = 0; k0 < p.Kw; k0 += kBlockK) {  // uniform trip count: __syncthreads is safe
#pragma unroll
    for (int r = 0; r < kLoadPasses; ++r) {
      a_tile[load_k][load_row + kLoadRows * r] = a_reg[r];
      b_tile[load_k][load_row + kLoadRows * r] = b_reg[r];
    }
    __syncthreads();
    if (k0 + kBlockK < p.Kw) load_step(k0 + kBlockK);  // next step's loads overlap this step's math
#pragma unroll
    for (int k = 0; k < kBlockK; ++k) {
      uint32_t a[kPerThread];
      int32_t b[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        a[i] = a_tile[k][ty + kThreadGrid * i];
        b[i] = b_tile[k][tx + kThreadGrid * i];
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] = dp4a_u8s8(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();  // everyone is done reading the tiles before the next step overwrites them
  }

  // Epilogue in fp64 with explicit round-to-nearest ops (no FMA contraction), as the reference
  // computes acc * (x_scale * weight_scale) + bias in float64 before casting to x's dtype.
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int o = o0 + tx + kThreadGrid * j;
    if (o >= p.O) continue;
    const int64_t zero_sum = static_cast<int64_t>(zero_point) * colsum[o];
    const double scale = out_scale[o];
    const double b = bias != nullptr ? bias[o] : 0.0;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int m = m0 + ty + kThreadGrid * i;
      if (m >= p.M) continue;
      double v = __dmul_rn(static_cast<double>(static_cast<int64_t>(acc[i][j]) - zero_sum), scale);
      if (bias != nullptr) v = __dadd_rn(v, b);
      y[static_cast<int64_t>(m) * p.O + o] = static_cast<scalar_t>(static_cast<float>(v));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

int elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<int>(blocks < kMaxElementwiseBlocks ? blocks : kMaxElementwiseBlocks);
}

int64_t round_up4(int64_t v) { return (v + 3) / 4 * 4; }

// int8 OIHW on the GPU -> int8 [O][KH][KW][round_up(I, 4)], zero padded.
at::Tensor int8_pack_weight_cuda(const at::Tensor& weight) {
  TORCH_CHECK(weight.is_cuda(), "ddpm_perf::int8_pack_weight (CUDA): weight must be a CUDA tensor, got ",
              weight.device());
  TORCH_CHECK(weight.scalar_type() == at::kChar, "ddpm_perf::int8_pack_weight (CUDA): weight must be int8, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4, "ddpm_perf::int8_pack_weight (CUDA): weight must be OIHW (4 dims), got shape ",
              weight.sizes());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const int64_t O = weight.size(0), I = weight.size(1), KH = weight.size(2), KW = weight.size(3);
  const int64_t Ip = round_up4(I);
  TORCH_CHECK(Ip <= std::numeric_limits<int>::max() && KH <= std::numeric_limits<int>::max() &&
                  KW <= std::numeric_limits<int>::max(),
              "ddpm_perf::int8_pack_weight (CUDA): weight is too large: ", weight.sizes());
  at::Tensor packed = at::empty({O, KH, KW, Ip}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = packed.numel();
  if (total == 0) return packed;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int8_pack_weight_kernel<<<elementwise_blocks(total), kElementwiseThreads, 0, stream>>>(
      weight.const_data_ptr<int8_t>(), packed.mutable_data_ptr<int8_t>(), total, static_cast<int>(I),
      static_cast<int>(Ip), static_cast<int>(KH), static_cast<int>(KW), weight.stride(0), weight.stride(1),
      weight.stride(2), weight.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return packed;
}

void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, "ddpm_perf::int8_conv2d (CUDA): ", name, " must have 2 values, got ", v);
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value && v[0] <= std::numeric_limits<int>::max() &&
                  v[1] <= std::numeric_limits<int>::max(),
              "ddpm_perf::int8_conv2d (CUDA): ", name, " must be at least ", min_value, ", got ", v);
}

void check_per_channel(const at::Tensor& t, const at::Tensor& x, int64_t O, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "ddpm_perf::int8_conv2d (CUDA): ", name, " must be on ", x.device(),
              ", got ", t.device());
  TORCH_CHECK(t.numel() == O, "ddpm_perf::int8_conv2d (CUDA): ", name, " must have one value per output channel (",
              O, "), got shape ", t.sizes());
}

at::Tensor int8_conv2d_cuda(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& weight_colsum,
                            const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias, double x_scale,
                            int64_t x_zero_point, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, std::optional<at::ScalarType> out_dtype_arg) {
  TORCH_CHECK(x.is_cuda(), "ddpm_perf::int8_conv2d (CUDA): x must be a CUDA tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kByte,
              "ddpm_perf::int8_conv2d (CUDA): x must be float32, float16, bfloat16 or uint8 (already quantised), got ",
              dtype);
  TORCH_CHECK(x.dim() == 4, "ddpm_perf::int8_conv2d (CUDA): x must be (N, C, H, W), got shape ", x.sizes());
  check_pair(kernel_size, "kernel_size", 1);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  TORCH_CHECK(packed_weight.device() == x.device(), "ddpm_perf::int8_conv2d (CUDA): packed_weight must be on ",
              x.device(), ", got ", packed_weight.device());
  TORCH_CHECK(packed_weight.scalar_type() == at::kChar && packed_weight.dim() == 4,
              "ddpm_perf::int8_conv2d (CUDA): packed_weight must be the int8 [O][KH][KW][I padded to 4] tensor "
              "from ddpm_perf::int8_pack_weight on CUDA, got ",
              packed_weight.scalar_type(), " ", packed_weight.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = packed_weight.size(0), KH = packed_weight.size(1), KW = packed_weight.size(2);
  const int64_t Cp = packed_weight.size(3);
  TORCH_CHECK(KH == kernel_size[0] && KW == kernel_size[1],
              "ddpm_perf::int8_conv2d (CUDA): kernel_size ", kernel_size, " does not match packed_weight ",
              packed_weight.sizes());
  TORCH_CHECK(Cp == round_up4(C), "ddpm_perf::int8_conv2d (CUDA): packed_weight ", packed_weight.sizes(),
              " is for ", Cp, " (padded) input channels, x has ", C);
  TORCH_CHECK(weight_colsum.scalar_type() == at::kInt,
              "ddpm_perf::int8_conv2d (CUDA): weight_colsum must be int32, got ", weight_colsum.scalar_type());
  check_per_channel(weight_colsum, x, O, "weight_colsum");
  TORCH_CHECK(at::isFloatingType(weight_scale.scalar_type()),
              "ddpm_perf::int8_conv2d (CUDA): weight_scale must be floating point, got ",
              weight_scale.scalar_type());
  check_per_channel(weight_scale, x, O, "weight_scale");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()),
                "ddpm_perf::int8_conv2d (CUDA): bias must be floating point, got ", bias->scalar_type());
    check_per_channel(*bias, x, O, "bias");
  }
  TORCH_CHECK(std::isfinite(x_scale) && x_scale > 0.0, "ddpm_perf::int8_conv2d (CUDA): x_scale must be positive, got ",
              x_scale);
  TORCH_CHECK(x_zero_point >= 0 && x_zero_point <= 255,
              "ddpm_perf::int8_conv2d (CUDA): x_zero_point must be in [0, 255] (uint8), got ", x_zero_point);
  // |acc| <= C * KH * KW * 255 * 128 must fit int32 (the zero-point correction too).
  TORCH_CHECK(C * KH * KW <= std::numeric_limits<int32_t>::max() / (255 * 128),
              "ddpm_perf::int8_conv2d (CUDA): C * KH * KW = ", C * KH * KW,
              " is too large for exact int32 accumulation (at most ",
              std::numeric_limits<int32_t>::max() / (255 * 128), ")");
  const int64_t OH = (H + 2 * padding[0] - KH) / stride[0] + 1;
  const int64_t OW = (W + 2 * padding[1] - KW) / stride[1] + 1;
  TORCH_CHECK(H + 2 * padding[0] >= KH && W + 2 * padding[1] >= KW,
              "ddpm_perf::int8_conv2d (CUDA): the padded input (", H + 2 * padding[0], " x ", W + 2 * padding[1],
              ") is smaller than the kernel (", KH, " x ", KW, ")");
  const int64_t M = N * OH * OW;
  const int64_t Cw = Cp / 4;
  const int64_t Kw = KH * KW * Cw;
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M <= kIntMax - kBlockM && O <= kIntMax - kBlockN && Kw <= kIntMax - kBlockK && H <= kIntMax &&
                  W <= kIntMax && N * H <= kIntMax,
              "ddpm_perf::int8_conv2d (CUDA): the problem is too large for this kernel");
  TORCH_CHECK((O + kBlockN - 1) / kBlockN <= 65535, "ddpm_perf::int8_conv2d (CUDA): too many output channels (", O,
              ")");

  const c10::cuda::CUDAGuard device_guard(x.device());
  // Output in out_dtype, by default x's dtype (float32 for a uint8 x).
  const auto out_dtype = out_dtype_arg.value_or(dtype == at::kByte ? at::kFloat : dtype);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "ddpm_perf::int8_conv2d (CUDA): out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  at::Tensor y = at::empty({N, O, OH, OW}, x.options().dtype(out_dtype).memory_format(at::MemoryFormat::ChannelsLast));
  if (M == 0 || O == 0) return y;

  // The packed weight is read as int32 words: it must be contiguous and 4-byte aligned.
  at::Tensor wq = packed_weight.contiguous();
  if (reinterpret_cast<std::uintptr_t>(wq.const_data_ptr()) % alignof(int32_t) != 0) wq = wq.clone();
  const at::Tensor colsum = weight_colsum.contiguous();
  // x_scale * weight_scale in float64, exactly as the reference's x_scale * weight_scale.double().
  const at::Tensor out_scale = weight_scale.to(at::kDouble).mul(x_scale).contiguous();
  const at::Tensor bias64 = has_bias ? bias->to(at::kDouble).contiguous() : at::Tensor();

  // Quantised activations, channel-last, channels padded to 4 (a fresh allocation: aligned).
  at::Tensor xq = at::empty({N, H, W, Cp}, x.options().dtype(at::kByte));
  const int64_t total_words = N * H * W * Cw;
  // (float)(1.0 / x_scale): the reference multiplies the fp32 tensor by the Python float 1.0/scale,
  // which torch applies in fp32.
  const float inv_scale = static_cast<float>(1.0 / x_scale);
  const uint32_t zero_word = static_cast<uint32_t>(x_zero_point) * 0x01010101u;

  ConvShape shape;
  shape.H = static_cast<int>(H);
  shape.W = static_cast<int>(W);
  shape.Cw = static_cast<int>(Cw);
  shape.O = static_cast<int>(O);
  shape.KW = static_cast<int>(KW);
  shape.OH = static_cast<int>(OH);
  shape.OW = static_cast<int>(OW);
  shape.stride_h = static_cast<int>(stride[0]);
  shape.stride_w = static_cast<int>(stride[1]);
  shape.pad_h = static_cast<int>(padding[0]);
  shape.pad_w = static_cast<int>(padding[1]);
  shape.M = static_cast<int>(M);
  shape.Kw = static_cast<int>(Kw);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto in_zero, auto out_zero) {
    using in_t = decltype(in_zero);
    using out_t = decltype(out_zero);
    if (total_words > 0) {
      quantize_activation_kernel<in_t><<<elementwise_blocks(total_words), kElementwiseThreads, 0, stream>>>(
          x.const_data_ptr<in_t>(), reinterpret_cast<uint32_t*>(xq.mutable_data_ptr<uint8_t>()), total_words,
          static_cast<int>(C), static_cast<int>(Cw), static_cast<int>(H), static_cast<int>(W), x.stride(0),
          x.stride(1), x.stride(2), x.stride(3), inv_scale, static_cast<int>(x_zero_point));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const dim3 grid(static_cast<unsigned>((M + kBlockM - 1) / kBlockM),
                    static_cast<unsigned>((O + kBlockN - 1) / kBlockN));
    int8_conv2d_dp4a_kernel<out_t><<<grid, kConvThreads, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(xq.const_data_ptr<uint8_t>()),
        reinterpret_cast<const int32_t*>(wq.const_data_ptr<int8_t>()), colsum.const_data_ptr<int32_t>(),
        out_scale.const_data_ptr<double>(), has_bias ? bias64.const_data_ptr<double>() : nullptr, zero_word,
        static_cast<int>(x_zero_point), shape, y.mutable_data_ptr<out_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  DDPM_PERF_DISPATCH_FLOAT_HALF_BF16(out_dtype, "ddpm_perf::int8_conv2d (CUDA)", [&] {
    using out_t = scalar_t;
    if (dtype == at::kByte) {
      launch(uint8_t{}, out_t{});
    } else {
      DDPM_PERF_DISPATCH_FLOAT_HALF_BF16(dtype, "ddpm_perf::int8_conv2d (CUDA)", [&] { launch(scalar_t{}, out_t{}); });
    }
  });
  return y;
}

}  // namespace
}  // namespace ddpm_perf

TORCH_LIBRARY_IMPL(ddpm_perf, CUDA, m) {
  m.impl("int8_pack_weight", &ddpm_perf::int8_pack_weight_cuda);
  m.impl("int8_conv2d", &ddpm_perf::int8_conv2d_cuda);
}
