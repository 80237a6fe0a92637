// The two ways to finish the SiLU of group_norm_silu's AVX-512 paths (csrc/cpu/silu.h,
// z / (1 + 2^t)): one division, or rcp14 (and for fp32 outputs one Newton step) then a multiply.
// The kernel divides for fp32 outputs and takes rcp14 for bf16 outputs (silu16_fast); all four
// are silu.h's own code (silu16<Precise, Division>). On 4096 L1-resident values,
// one thread: nanoseconds per 16 values, best of 7 runs, and the largest relative error of the
// fp32 sequences against fp64 over z in [-7, 7]. Prints one line:
//   fp32_division fp32_reciprocal bf16_division bf16_reciprocal error_division error_reciprocal
// Built and run by benchmarks/test_kernels.py::test_silu_sequences, e.g.
//   g++ -O2 -I csrc/cpu benchmarks/silu_sequences.cpp && ./a.out 20000
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "silu.h"

using namespace ddpm_perf::cpu;

template <bool Precise, bool Division>
DDPM_AVX512 double seconds(const float* x, float* y, int n, int reps) {
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r)
    for (int i = 0; i < n; i += 32) {  // two independent vectors per iteration, as the kernel's loop
      const __m512 a = silu16<Precise, Division>(_mm512_loadu_ps(x + i));
      const __m512 b = silu16<Precise, Division>(_mm512_loadu_ps(x + i + 16));
      _mm512_storeu_ps(y + i, a), _mm512_storeu_ps(y + i + 16, b);
    }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

template <bool Division>
DDPM_AVX512 double max_error(const std::vector<float>& x) {
  double worst = 0;
  for (size_t i = 0; i < x.size(); i += 16) {
    float y[16];
    _mm512_storeu_ps(y, silu16<true, Division>(_mm512_loadu_ps(&x[i])));
    for (int j = 0; j < 16; ++j) {
      const double z = x[i + j], exact = z / (1 + std::exp(-z));
      if (exact != 0) worst = std::max(worst, std::abs(y[j] - exact) / std::abs(exact));
    }
  }
  return worst;
}

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512dq")) return 3;
  const int n = 4096, reps = argc > 1 ? std::atoi(argv[1]) : 20000;
  std::vector<float> x(n), y(n);
  for (int i = 0; i < n; ++i) x[i] = (i % 200 - 100) * 0.07f;
  double best[4] = {1e30, 1e30, 1e30, 1e30};
  for (int k = 0; k < 7; ++k) {
    best[0] = std::min(best[0], seconds<true, true>(x.data(), y.data(), n, reps));
    best[1] = std::min(best[1], seconds<true, false>(x.data(), y.data(), n, reps));
    best[2] = std::min(best[2], seconds<false, true>(x.data(), y.data(), n, reps));
    best[3] = std::min(best[3], seconds<false, false>(x.data(), y.data(), n, reps));
  }
  const double vectors = double(n) / 16 * reps;
  for (double s : best) std::printf("%.4f ", s / vectors * 1e9);
  std::printf("%.3e %.3e\n", max_error<true>(x), max_error<false>(x));
}
