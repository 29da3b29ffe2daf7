// A team of threads that runs a whole time loop in one parallel region, with a barrier between
// the phases that need one (csrc/cpu/engine.h says what the phases are).
//
// Work comes in slices (a fixed range of hidden units each), one or more per thread, and in
// phases (a time step, or half of one in backward). Per slice, two counters on their own cache
// line: phases claimed and phases done. Whoever runs phase p of a slice first claims it (a
// compare-and-swap from p to p + 1, allowed only once the slice has finished phase p - 1), runs it
// and publishes "p + 1 done"; a barrier waits until every slice has published.
//
// Normally every thread runs its own slices, whose weights sit in its core's cache. A thread that
// has waited at a barrier for more than a short spin (a step is microseconds; a slice that late
// belongs to a thread whose core another process took) claims the late slice's next phase and runs
// it itself: under contention the threads that still have a core carry the sequence, instead of
// every step waiting for the one that lost its core. The results do not change: a slice's phase
// computes the same values in the same order whichever thread runs it. While waiting, a thread
// spins briefly, then yields its core to whatever else is runnable there.
//
// What a takeover cannot help: a thread that loses its core in the middle of a phase it claimed.
// The barrier then waits for the rest of the other process's time slice (about 4 ms on a 2-core
// AMD EPYC with one other busy process: a batch-1 Elman RNN forward + backward, 2 ms alone, took
// either 2 or 6 ms per call, half the calls each; on one thread, 3.3 ms, it did not slow at all).
// So a thread that has waited kStallNs for a phase that another thread is running marks the team
// stalled, and once it ends, every team of the next period (kSoloNs, doubling while teams keep
// stalling) runs on its calling thread alone, its GEMMs too (as inside another parallel region):
// one thread, which the scheduler moves to the core nobody else wants, loses nothing to the other
// process. A team that had a large share of its phases taken over from threads that had started
// running it counts as stalled too (kTakeoverShare below): its slices' owners kept missing their
// phases without stalling in one (the phases before a thread starts are left out: a thread that
// wakes late, after the team's threads were idle, misses the first phases of a short call without
// any contention). Then the whole team is tried again. Measured on that machine (T = 100,
// H = I = 256, eval forward under contention, medians of four alternating processes, 2026-11-30):
// LSTM B = 1 5.3 -> 4.4 ms, GRU B = 1 5.9 -> 3.9 ms, LSTM B = 16 38.0 -> 35.7 ms, alone unchanged;
// a batch-1 forward + backward gains little (Elman RNN 7.5 -> 7.8 and 6.8 -> 6.5 ms), since its
// GEMMs (MKL's parallel regions) stall the same way. Two other changes aimed at the stall
// were measured in a standalone team (2 slices, 200 phases of 1-10 us, 2026-11-30) and in the
// library, and left out: claiming a taken-over slice's next phases without the spin (mean time
// per 2 ms call under contention 6.1-7.0 -> 4.8-5.4 ms in the standalone team, no consistent
// change in the library's batch-1 cells), and a thread whose phase stalled leaving the team for
// 50 ms (5.8-6.4 ms there; 0.25 ms calls 1.14 -> 1.24 ms).
#pragma once

#include <ATen/Context.h>  // deterministicAlgorithms
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include <time.h>  // clock_gettime, nanosleep (the straggler testing hook)

#include "blas.h"  // OneThreadBlas

namespace rnnfused::cpu {

// Testing hooks (pointwise_dispatch.cpp): a delay that the threads owning slices other than the
// first take before each of their phases, or after claiming each (a thread that lost its core,
// on demand), and counts of the phases run by a thread other than their slice's owner, of the
// stalls noted and of the teams run on one thread after one.
int64_t engine_straggler_delay_us();
bool engine_straggler_delay_inside_phase();  // the delay after claiming a phase instead of before
bool engine_straggler_delay_before_start();   // the delay once, before the thread starts the team
void count_engine_takeover();
void count_engine_stall();
void count_engine_solo_run();

inline int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// A phase that another thread has been waiting for this long, and for kStallPhases times the
// average phase of the last team (its wall time over its phases), is stalled: its thread lost its
// core in the middle of it (a phase takes microseconds, up to about 15 ms at the largest shapes,
// and the threads' slices differ by at most one block of units).
constexpr int64_t kStallNs = 2000000;
constexpr int64_t kStallPhases = 8;
// How long teams then run on one thread: several of the other process's time slices. Each
// stall noted right after such a period (no whole team ran cleanly in between) doubles the next
// period, up to kMaxSoloNs: a whole team tried under lasting contention is itself slow (an LSTM's
// eval forward at B = 16, T = 100 took 14-190 ms under contention against 6 ms alone and about 12
// on one thread, 2-core Intel Xeon VM, 2026-12-01), and trying one every 50 ms cost more than the
// periods on one thread saved. A whole team that runs cleanly sets the period back to kSoloNs.
constexpr int64_t kSoloNs = 50000000;
constexpr int64_t kMaxSoloNs = 800000000;

// Until when (CLOCK_MONOTONIC, ns) teams run on one thread; one for the process, since the cores
// are the process's.
inline std::atomic<int64_t>& solo_until_ns() {
  static std::atomic<int64_t> until{0};
  return until;
}

// The next one-thread period's length (ns).
inline std::atomic<int64_t>& solo_period_ns() {
  static std::atomic<int64_t> period{kSoloNs};
  return period;
}

// A team (that ran on its threads) stalled: the teams that start in the next period run on one
// thread, and the period after it is twice as long.
inline void note_team_stall(int64_t now) {
  count_engine_stall();
  const int64_t period = solo_period_ns().load(std::memory_order_relaxed);
  solo_until_ns().store(now + period, std::memory_order_relaxed);
  solo_period_ns().store(std::min(2 * period, kMaxSoloNs), std::memory_order_relaxed);
}

// The average phase of the last team that ran (ns).
inline std::atomic<int64_t>& last_phase_ns() {
  static std::atomic<int64_t> ns{0};
  return ns;
}

// A team in which at least this share of its phases so far (1 / kTakeoverShare), and at least
// kMinTakeovers of them, were taken over from threads that had started running it has a thread
// without a core for much of its run: every phase that another thread took over first cost that
// thread the spin (kSpins, about 10-40 us) on top of the phase itself. Such a team counts as
// stalled, as one with a phase that stalled does. Measured on a 2-core Intel Xeon VM with another
// process spinning on one core (2026-12-01, T = 100, H = I = 256, ms per call, medians of 200
// calls; before (8992241) / after this rule, the one-thread periods' GEMMs on one thread
// (OneThreadBlas), the doubling periods and the stalled team's threads leaving it): Elman RNN
// (tanh) B = 1 eval forward 8.6 / 0.53 (0.34-0.38 alone: about half of its 200 phases per call
// were taken over, and one stall was noted in 200 calls), LSTM B = 16 eval forward 18.2 / 11.2
// (6.0-6.3 alone), Elman RNN (relu) B = 16 forward + backward 34.3 / 16.3 (5.8-6.1 alone); alone
// unchanged.
constexpr int64_t kTakeoverShare = 4;
constexpr int64_t kMinTakeovers = 8;
// A team whose phase is taken over from a thread that has not started running it this long after
// the team started is stalled too: a thread woken from its wait starts within about a hundred
// microseconds on an idle machine, while one whose core another process has may not start before
// the team ends, and then every phase of its slices cost the waiting thread its spin first
// (Elman RNN (tanh), B = 1, T = 100, H = I = 256, eval forward on the Intel Xeon VM under
// contention, 2026-12-01: 12.8 ms per call, median of 200, against 0.37 alone; 2 stalls noted in
// the 200 calls, while about 70 of each call's 100 phases were taken over).
constexpr int64_t kLateArrivalNs = 1000000;

class PhaseFlags {
 public:
  // start_ns: when the team started (monotonic_ns).
  PhaseFlags(int64_t slices, int64_t start_ns) : flags_(static_cast<size_t>(slices)), start_ns_(start_ns) {}

  // The thread that owns `slice` has started running the team.
  void arrive(int64_t slice) { flags_[slice].owner_arrived.store(true, std::memory_order_relaxed); }

  // Claims phase `phase` of `slice` if nobody has and the slice has finished the phase before it.
  bool try_claim(int64_t slice, int64_t phase) {
    Flag& flag = flags_[slice];
    if (flag.done.load(std::memory_order_acquire) != phase) return false;
    int64_t expected = phase;
    return flag.claimed.compare_exchange_strong(expected, phase + 1, std::memory_order_acq_rel);
  }

  void publish(int64_t slice, int64_t phases_done) {
    flags_[slice].done.store(phases_done, std::memory_order_release);
  }

  // Returns once `slice` has finished `phases` phases. After a short spin (none once the team has
  // stalled), runs the slice's next phase itself (run(slice, phase)) when nobody has claimed it
  // yet. While yielding it looks at the clock now and then, and marks the team stalled when one
  // phase of the slice keeps it waiting too long, or when it has taken over too many phases from
  // threads that had started (kTakeoverShare, counted up to the phase it takes).
  template <typename Run>
  void wait_for(int64_t slice, int64_t phases, const Run& run) {
    int64_t tries = 0;
    int64_t yielding_since = 0;  // 0: not yet; -1: stall noted
    int64_t waited_for = -1;     // the phase that yielding_since is about
    for (;;) {
      const int64_t done = flags_[slice].done.load(std::memory_order_acquire);
      if (done >= phases) return;
      if (done != waited_for) {
        waited_for = done;
        if (yielding_since > 0) yielding_since = 0;
      }
      if ((tries >= kSpins || stalled()) && try_claim(slice, done)) {
        count_engine_takeover();
        if (flags_[slice].owner_arrived.load(std::memory_order_relaxed)) {
          const int64_t late = late_takeovers_.fetch_add(1, std::memory_order_relaxed) + 1;
          if (late >= kMinTakeovers && late * kTakeoverShare >= done + 1) {
            stalled_.store(true, std::memory_order_relaxed);
          }
        } else if (!stalled() && monotonic_ns() - start_ns_ > kLateArrivalNs) {
          stalled_.store(true, std::memory_order_relaxed);  // its owner has not even started
        }
        run(slice, done);
        publish(slice, done + 1);
        tries = 0;
        yielding_since = 0;
        continue;
      }
      if (tries >= kSpins && (tries & 15) == 0 && yielding_since >= 0) {
        const int64_t now = monotonic_ns();
        if (yielding_since == 0) {
          yielding_since = now;
        } else if (now - yielding_since >
                   std::max(kStallNs, kStallPhases * last_phase_ns().load(std::memory_order_relaxed))) {
          stalled_.store(true, std::memory_order_relaxed);
          yielding_since = -1;
        }
      }
      back_off(tries++);
    }
  }

  // Whether the team stalled: a phase kept another thread waiting kStallNs, or a large share of
  // the phases so far were taken over from threads that had started.
  bool stalled() const { return stalled_.load(std::memory_order_relaxed); }

 private:
  static void back_off(int64_t tries) {
    if (tries < kSpins) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      // The core goes to any other runnable thread. No sleeping: a thread that slept would wake
      // late (tens of microseconds of timer slack) for steps that take a few microseconds, which
      // is what made a sequence under contention many times slower.
      std::this_thread::yield();
    }
  }

  // About 10-40 us of pause instructions before a waiting thread yields its core and may take over.
  static constexpr int64_t kSpins = 256;

  struct alignas(64) Flag {
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> claimed{0};
    std::atomic<bool> owner_arrived{false};
  };
  std::vector<Flag> flags_;
  // The phases that wait_for ran for a slice whose owner had started running the team (not those
  // before: a thread that wakes late, after the team's threads were idle, misses the first phases).
  alignas(64) std::atomic<int64_t> late_takeovers_{0};
  std::atomic<bool> stalled_{false};
  int64_t start_ns_;
};

// Runs `phases` phases on `slices` slices: prepare(slice) before the slice's first phase, then
// run(slice, q) for each phase q, with a barrier before phase q where barrier_before(q) says so.
// Whichever thread runs a slice's phase, it is run exactly once, in order. The callables must not
// throw or allocate through ATen (they run inside an OpenMP region).
template <typename Prepare, typename Run, typename BarrierBefore>
void run_team(int64_t slices, int64_t phases, const Prepare& prepare, const Run& run,
              const BarrierBefore& barrier_before) {
  const int64_t start = monotonic_ns();
  PhaseFlags flags(slices, start);
  auto run_phase = [&](int64_t slice, int64_t q) {
    if (q == 0) prepare(slice);
    run(slice, q);
  };
  const int64_t delay_us = engine_straggler_delay_us();
  const bool delay_inside = engine_straggler_delay_inside_phase();
  const bool delay_before_start = engine_straggler_delay_before_start();
  auto straggle = [&](int64_t begin) {
    if (delay_us > 0 && begin > 0) {
      const timespec delay{static_cast<time_t>(delay_us / 1000000), static_cast<long>(delay_us % 1000000) * 1000};
      nanosleep(&delay, nullptr);
    }
  };
  // Once the team has stalled, the threads other than the calling one (which runs the first
  // chunk) leave it between two phases, and the calling thread runs every phase left, without
  // spinning before it takes one over: the rest of the call runs as a one-thread team would.
  auto body = [&](int64_t begin, int64_t end) {
    if (delay_before_start) straggle(begin);
    for (int64_t slice = begin; slice < end; ++slice) flags.arrive(slice);
    for (int64_t q = 0; q < phases; ++q) {
      if (begin > 0 && flags.stalled()) return;
      if (!delay_inside && !delay_before_start) straggle(begin);
      if (q > 0 && barrier_before(q)) {
        for (int64_t slice = 0; slice < slices; ++slice) flags.wait_for(slice, q, run_phase);
      }
      for (int64_t slice = begin; slice < end; ++slice) {
        flags.wait_for(slice, q, run_phase);  // a phase another thread took must be finished first
        if (flags.try_claim(slice, q)) {
          if (delay_inside) straggle(begin);
          run_phase(slice, q);
          flags.publish(slice, q + 1);
        }
      }
    }
    if (begin == 0 && flags.stalled()) {
      for (int64_t slice = 0; slice < slices; ++slice) flags.wait_for(slice, phases, run_phase);
    }
  };
  bool whole_team = false;
  bool solo = false;  // on one thread in a one-thread period
#if AT_PARALLEL_OPENMP
  // at::parallel_for with grain 1 gives each OpenMP thread at most one contiguous chunk of slices,
  // all chunks running at once (one parallel region); inside another parallel region all slices
  // run on this thread, as in a one-thread period after a stall, and so do they when the caller
  // has one OpenMP thread (torch.set_num_threads(1), OneThreadBlas).
  if (slices > 1 && !at::in_parallel_region() && at::get_num_threads() > 1) {
    whole_team = solo_until_ns().load(std::memory_order_relaxed) <= start;
    solo = !whole_team;
    if (solo) count_engine_solo_run();
  }
#endif
  if (whole_team) {
    at::parallel_for(0, slices, 1, body);
  } else if (solo) {
    // The slices' GEMMs on this thread too, as inside a parallel region.
    OneThreadBlas one_thread;
    body(0, slices);
  } else {
    body(0, slices);
  }
  const int64_t end = monotonic_ns();
  if (phases > 0) last_phase_ns().store((end - start) / phases, std::memory_order_relaxed);
  if (whole_team) {
    if (flags.stalled()) {
      note_team_stall(end);
    } else {
      solo_period_ns().store(kSoloNs, std::memory_order_relaxed);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The per-step path (recurrence_cpu.cpp: one BLAS GEMM and one gate pass per step, each its own
// OpenMP parallel region) under contention. Each region waits for its slowest thread, and a
// thread that shares its core with another busy process now and then loses it for one of that
// process's time slices: the region it is in, and so the step, then takes milliseconds instead of
// tens of microseconds. There is no phase to take over, so the call watches its steps and its
// gate passes (pointwise_impl.h's for_each_segment notes how far apart their threads finished),
// and once it has stalled the rest of the call, and the calls of the next period, run on one
// thread: the one-thread period of the teams above (note_team_stall). Seen on a 2-core Intel Xeon
// VM with another process spinning on one core (2026-12-01; LSTM B = 16, T = 50, I = 256,
// H = 512, proj_size = 128, forward + backward): steps of 55-130 us, and a few per call of
// 4-22 ms, some of them in a row. Medians per call before this rule, two threads / one thread:
// 116 / 35 ms under contention (19 / 37 alone); LSTM B = 64, T = 25, I = H = 512: 324 / 138
// (75 / 137 alone).
// ---------------------------------------------------------------------------------------------

// A pass whose threads finished more than kLatePassNs apart, the last more than twice as late as
// the first (counting from the start of the pass), was late: its threads run equal shares, and
// those that keep their cores finish within microseconds of each other. One that finished
// kStallNs apart stalled.
constexpr int64_t kLatePassNs = 250000;
// A call in which at least this share of its split passes (1 / kLatePassShare), and at least
// kMinLatePasses of them, were late has stalled, as one with a stalled pass or step has.
constexpr int64_t kLatePassShare = 8;
constexpr int64_t kMinLatePasses = 4;

// The gate passes run on more than one thread (split), and the late and stalled ones among them,
// counted per calling thread.
struct PassBalance {
  int64_t split = 0;
  int64_t late = 0;
  int64_t stalled = 0;
};

inline PassBalance& pass_balance() {
  thread_local PassBalance balance;
  return balance;
}

// A pass that ran on `threads` threads, the first finishing `first_ns` and the last `last_ns`
// after it started.
inline void note_pass_balance(int64_t threads, int64_t first_ns, int64_t last_ns) {
  if (threads < 2) return;
  PassBalance& balance = pass_balance();
  ++balance.split;
  const int64_t gap = last_ns - first_ns;
  if (gap > kLatePassNs && last_ns > 2 * first_ns) ++balance.late;
  if (gap > kStallNs) ++balance.stalled;
}

// Whether this thread's calls may be put on one thread: it has more than one (not inside a
// parallel region), and torch.use_deterministic_algorithms is off (CallThreads below says why).
inline bool may_run_on_one_thread() {
  return !at::in_parallel_region() && at::get_num_threads() > 1 && !at::globalContext().deterministicAlgorithms();
}

// Whether a one-thread period runs now.
inline bool in_one_thread_period() { return solo_until_ns().load(std::memory_order_relaxed) > monotonic_ns(); }

// The threads of one call of a recurrence op. Within a one-thread period (a recent stall of a
// team or of another call) the whole call runs on its calling thread: the GEMMs before and after
// its time loop (gates_x, dW), its per-step GEMMs and passes (a team inside it runs as in a
// parallel region). Otherwise a per-step time loop calls start_steps() before its first step and
// after_step() after each; once the loop has stalled (a stalled pass, too many late ones, or a
// step that took kStallNs and kStallPhases times the fastest step of as many rows so far), the
// call notes the stall (starting a period) and runs the rest of itself on one thread: the GEMMs
// after the loop too, which under contention stall as the loop's did (LSTM B = 16, T = 50,
// proj_size = 128, forward + backward under contention, same machine, medians of 40 calls in
// separate runs: 40-58 ms with them on one thread, 86 with them on both). A call that ran split
// passes without a late one (its own or those of the calls it made) sets the next period back to
// the shortest, as a clean whole team does.
//
// On one thread a GEMM may round differently: MKL may split a product's sums across its threads
// (measured on a 2-core Intel Xeon: the per-step products at B = 1 and 5, and dW_hh at B = 256,
// H = 64, differed by up to about 1e-6 relative; none at B = 16 to 64). So a call that runs on one
// thread under contention is not bitwise the call on an idle machine, as torch.nn's results are
// not bitwise across thread counts. Under torch.use_deterministic_algorithms(True) calls keep
// their threads whatever happens (the teams' one-thread runs compute the same values, and stay).
class CallThreads {
 public:
  CallThreads() : start_(pass_balance()) {
    if (!may_run_on_one_thread()) return;
    if (in_one_thread_period()) {
      count_engine_solo_run();
      one_thread_ = std::make_unique<OneThreadBlas>();
      return;
    }
    watching_ = true;
  }
  ~CallThreads() {
    const PassBalance& now = pass_balance();
    if (watching_ && now.split > start_.split && now.late == start_.late) {
      solo_period_ns().store(kSoloNs, std::memory_order_relaxed);
    }
  }
  CallThreads(const CallThreads&) = delete;
  CallThreads& operator=(const CallThreads&) = delete;

  // Before the first step of a per-step time loop whose steps have at most `batch` rows.
  void start_steps(int64_t batch) {
    if (!watching_) return;
    fastest_ns_.assign(static_cast<size_t>(batch) + 1, 0);
    step_start_ns_ = monotonic_ns();
    first_step_ = true;
  }

  // After each step (`rows` rows) of the time loop.
  void after_step(int64_t rows) {
    if (!watching_) return;
    const int64_t now = monotonic_ns();
    const int64_t took = now - step_start_ns_;
    step_start_ns_ = now;
    if (first_step_) {
      // Not the first step's passes: in a process's first call they may start the thread pool,
      // and the new thread may share the caller's core for a few milliseconds.
      first_step_ = false;
      start_ = pass_balance();
    }
    int64_t& fastest = fastest_ns_[static_cast<size_t>(rows)];
    const bool slow_step = fastest > 0 && took > std::max(kStallNs, kStallPhases * fastest);
    if (fastest == 0 || took < fastest) fastest = took;
    const PassBalance& balance = pass_balance();
    const int64_t split = balance.split - start_.split;
    const int64_t late = balance.late - start_.late;
    if (slow_step || balance.stalled > start_.stalled || (late >= kMinLatePasses && late * kLatePassShare >= split)) {
      note_team_stall(now);
      count_engine_solo_run();
      one_thread_ = std::make_unique<OneThreadBlas>();
      watching_ = false;
    }
  }

 private:
  PassBalance start_;
  bool watching_ = false;
  std::vector<int64_t> fastest_ns_;  // per row count: the fastest step so far (0: none yet)
  int64_t step_start_ns_ = 0;
  bool first_step_ = false;
  std::unique_ptr<OneThreadBlas> one_thread_;
};

}  // namespace rnnfused::cpu
