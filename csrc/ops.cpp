// The ddpm_perf operator library: every schema is declared here, once. Implementations live
// per backend: csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(ddpm_perf, CPU, m)) and
// csrc/cuda/<op>.cu (TORCH_LIBRARY_IMPL(ddpm_perf, CUDA, m)). Fake (meta) kernels and autograd
// are registered from Python, in ddpm_perf/ops.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/simd.h"

#ifndef DDPM_PERF_TORCH_VERSION
#define DDPM_PERF_TORCH_VERSION "unknown"
#endif

namespace ddpm_perf {

// The torch version this library was compiled against; ddpm_perf.ops compares it with the
// running torch and refuses to use a mismatched build.
std::string build_torch_version() { return DDPM_PERF_TORCH_VERSION; }
// The widest instruction set the CPU kernels use on this machine: avx512-vnni, avx512, avx2 or scalar.


TORCH_LIBRARY(ddpm_perf, m) {
  // y = [silu](group_norm(x + shift[:, :, None, None]) * weight + bias). Returns
  // (y, mean, rstd), the statistics (N, groups) in fp32 for the backward.
  m.def("group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, int groups, "
        "float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  // The forward's y quantised to uint8 for an int8 consumer: clamp(round(y / scale) + zero_point,
  // 0, 255), y never stored in float. Forward only.
  m.def("group_norm_silu_quantized(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, int groups, "
        "float eps, bool silu, float scale, int zero_point) -> Tensor");
  // Gradients (grad_x, grad_weight, grad_bias); grad_x is also the gradient of x + shift.
  m.def("group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, "
        "Tensor? shift, Tensor mean, Tensor rstd, int groups, bool silu) -> (Tensor, Tensor, Tensor)");
  // Packs an int8 OIHW weight once, in the layout this backend's int8_conv2d reads.
  m.def("int8_pack_weight(Tensor weight) -> Tensor");
  // conv2d(dequant(quant(x)), weight * weight_scale[:, None, None, None]) + bias, computed as
  // uint8 x int8 -> int32 with the dequantisation fused into the epilogue. A floating x is
  // quantised with the static per-tensor (x_scale, x_zero_point); a uint8 x is already quantised
  // with them. weight_colsum[o] = sum of weight[o] (int32). Output: channels_last, out_dtype, by
  // default x's dtype (float32 for a uint8 x).
  m.def("int8_conv2d(Tensor x, Tensor packed_weight, Tensor weight_colsum, Tensor weight_scale, "
        "Tensor? bias, float x_scale, int x_zero_point, int[2] kernel_size, int[2] stride, "
        "int[2] padding, ScalarType? out_dtype=None) -> Tensor");
  // Dropout with a counter-based mask: y = keep ? x / (1 - p) : 0, keep drawn from Philox4x32-10
  // keyed by seed (a one-element int64 CPU tensor), a function of (n, c, spatial index) and not of
  // the layout; the mask is never stored, the backward is the same op on the gradient.
  m.def("dropout(Tensor x, Tensor seed, float p) -> Tensor");
  m.def("build_torch_version() -> str", &build_torch_version);
  m.def("cpu_isa() -> str", &cpu::isa_name);
}

}  // namespace ddpm_perf

// Importing ddpm_perf._C runs the static initialisers above; no Python bindings are needed.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
