// A team of threads that runs a whole time loop in one parallel region, with a barrier between
// the phases that need one (csrc/cpu/engine.h says what the phases are).
//
// The barrier is a per-slice progress counter on its own cache line: a slice publishes "phases
// done" after each phase; a barrier waits until every slice has published. Waiting spins briefly
// (a step is a few microseconds), then yields the core, then sleeps: when another process takes
// the core of a slice that is late, the waiting threads give their cores back instead of burning
// them. Slices are the unit of work; a thread may run several of them (an OpenMP team smaller
// than asked for, or a call from inside another parallel region, which runs all slices on one
// thread): a thread publishes its slices together, so nothing waits on work not yet started.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

#include <time.h>

namespace rnnfused::cpu {

class PhaseFlags {
 public:
  explicit PhaseFlags(int64_t slices) : flags_(static_cast<size_t>(slices)) {}

  void publish(int64_t slice, int64_t phases_done) {
    flags_[slice].value.store(phases_done, std::memory_order_release);
  }

  // Returns once every slice has published at least `phases_done`.
  void wait_all(int64_t phases_done) const {
    for (const Flag& flag : flags_) {
      int64_t tries = 0;
      while (flag.value.load(std::memory_order_acquire) < phases_done) back_off(tries++);
    }
  }

 private:
  static void back_off(int64_t tries) {
    if (tries < kSpins) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else if (tries < kSpins + kYields) {
      std::this_thread::yield();
    } else {
      const timespec nap{0, kSleepNanoseconds};
      nanosleep(&nap, nullptr);
    }
  }

  // About 10-40 us of pause instructions, then about a millisecond of yields, then 50 us naps.
  static constexpr int64_t kSpins = 256;
  static constexpr int64_t kYields = 1000;
  static constexpr long kSleepNanoseconds = 50 * 1000;

  struct alignas(64) Flag {
    std::atomic<int64_t> value{0};
  };
  std::vector<Flag> flags_;
};

// Runs `phases` phases on `slices` slices: prepare(slice) once, then for each phase q,
// run(slice, q) for every slice, with a barrier before phase q where barrier_before(q) says so.
// The callables must not throw or allocate through ATen (they run inside an OpenMP region).
template <typename Prepare, typename Run, typename BarrierBefore>
void run_team(int64_t slices, int64_t phases, const Prepare& prepare, const Run& run,
              const BarrierBefore& barrier_before) {
  PhaseFlags flags(slices);
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t slice = begin; slice < end; ++slice) prepare(slice);
    for (int64_t q = 0; q < phases; ++q) {
      if (q > 0 && barrier_before(q)) flags.wait_all(q);
      for (int64_t slice = begin; slice < end; ++slice) run(slice, q);
      for (int64_t slice = begin; slice < end; ++slice) flags.publish(slice, q + 1);
    }
  };
#if AT_PARALLEL_OPENMP
  // at::parallel_for with grain 1 gives each OpenMP thread at most one contiguous chunk, all chunks
  // running at once (one parallel region); inside another parallel region it runs one chunk here.
  if (slices > 1) {
    at::parallel_for(0, slices, 1, body);
    return;
  }
#endif
  body(0, slices);
}

}  // namespace rnnfused::cpu
