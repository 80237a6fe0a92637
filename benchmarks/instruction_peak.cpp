// The instruction-level ceiling of this CPU: one AVX-512 multiply-add instruction (PEAK_INSN)
// issued back to back into 24 independent zmm accumulators, no memory traffic, on each of
// `threads` threads. Prints the rate in operations per second (a multiply-add counts 2).
// Built and run by benchmarks/test_roofline.py::test_instruction_peak, e.g.
//   g++ -O2 -pthread -DPEAK_INSN=vpdpbusd -DPEAK_OPS=128 instruction_peak.cpp && ./a.out 2
// Inline assembly: compilers keep 24 accumulator arrays in registers only grudgingly.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#define STR2(x) #x
#define STR(x) STR2(x)
#define ACC(r) STR(PEAK_INSN) " %%zmm1, %%zmm0, %%zmm" #r "\n\t"

static void run(long long iterations) {
  __asm__ volatile(
      "vpxord %%zmm0, %%zmm0, %%zmm0\n\tvpxord %%zmm1, %%zmm1, %%zmm1\n\t"
      "1:\n\t" ACC(8) ACC(9) ACC(10) ACC(11) ACC(12) ACC(13) ACC(14) ACC(15) ACC(16) ACC(17) ACC(18) ACC(19)
      ACC(20) ACC(21) ACC(22) ACC(23) ACC(24) ACC(25) ACC(26) ACC(27) ACC(28) ACC(29) ACC(30) ACC(31)
      "dec %0\n\tjnz 1b\n\t"
      : "+r"(iterations)
      :
      : "cc", "xmm0", "xmm1", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16",
        "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28",
        "xmm29", "xmm30", "xmm31");
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const long long iterations = argc > 2 ? std::atoll(argv[2]) : 20000000;
  std::vector<std::thread> pool;
  const auto start = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back(run, iterations);
  for (auto& t : pool) t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%.6e\n", double(iterations) * 24 * PEAK_OPS * threads / seconds);
}
