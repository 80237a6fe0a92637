// The CPU kernels' parallel regions: at::parallel_for, except that the calling thread, done with
// its own range, waits awake until the other threads are done with theirs (for at most kJoinWait)
// and so reaches the region's join last. Under OMP_WAIT_POLICY=PASSIVE a thread that reaches the
// join first goes to sleep there, and the thread that arrives last has to wake it: 20-30 us in
// this VM, against ops of 50-400 us. The other threads may sleep at the join; nothing waits on
// their waking. The caller yields while it waits, so that a thread sharing its core (a busy
// neighbour, or a third thread of ours) runs meanwhile: spinning on pause instead cost 1-30% with
// one core busy. ("Waiting at the join awake", docs/performance.md.)
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

namespace ddpm_perf::cpu {

// Covers a late worker's start (20-45 us here under PASSIVE) and its last chunk; a longer wait
// (a worker descheduled by a neighbour) falls back to the join's sleep.
inline constexpr std::chrono::microseconds kJoinWait{100};

template <typename F>
void parallel_for_caller_last(int64_t begin, int64_t end, int64_t grain, const F& f) {
  std::atomic<int64_t> started{0};  // the length of the ranges whose threads have begun
  std::atomic<int> running{0};      // threads inside f
  at::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    running.fetch_add(1);  // before `started` grows: seeing all ranges started, the caller sees every thread counted
    started.fetch_add(last - first);
    f(first, last);
    // at::parallel_for runs the first range on the calling thread (OpenMP's thread 0, or inline)
    if (first == begin) {
      const auto since = std::chrono::steady_clock::now();
      while ((started.load() < end - begin || running.load() > 1) &&
             std::chrono::steady_clock::now() - since < kJoinWait)
        std::this_thread::yield();
    }
    running.fetch_sub(1);
  });
}

}  // namespace ddpm_perf::cpu
