#pragma once

// Per-tensor affine uint8, as reference.quantize_activation and the CPU kernels (csrc/cpu/quantize.h):
// round(v * inv_scale) + zero_point, clamped to [0, 255], with inv_scale = (float)(1.0 / scale).
// fp32 throughout; rintf rounds half to even like torch.round. NaN becomes 0.
#include <cstdint>

namespace ddpm_perf {

__device__ __forceinline__ uint32_t quantize_u8(float v, float inv_scale, float zero_point) {
  const float q = rintf(v * inv_scale) + zero_point;
  return static_cast<uint32_t>(fminf(fmaxf(q, 0.f), 255.f));
}

}  // namespace ddpm_perf
