// Picks the instruction set of the CPU kernels (the per-step passes and the fused engine) once,
// at the first call, and holds the engine's switches.
#include <cstdlib>
#include <atomic>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>

#include <ATen/Parallel.h>

#include "blas.h"
#include "engine.h"
#include "team.h"
#include "pointwise.h"

// Set by setup.py when it compiled pointwise_avx2.cpp / pointwise_avx512.cpp for their ISA.
#ifndef RNNFUSED_HAVE_AVX2_KERNELS
#define RNNFUSED_HAVE_AVX2_KERNELS 0
#endif
#ifndef RNNFUSED_HAVE_AVX512_KERNELS
#define RNNFUSED_HAVE_AVX512_KERNELS 0
#endif

namespace rnnfused::cpu {

namespace default_isa {
template <typename T>
PointwiseKernels<T> make_kernels();
template <typename T>
EngineKernels<T> make_engine();
}  // namespace default_isa
#if RNNFUSED_HAVE_AVX2_KERNELS
namespace avx2 {
template <typename T>
PointwiseKernels<T> make_kernels();
template <typename T>
EngineKernels<T> make_engine();
}  // namespace avx2
#endif
#if RNNFUSED_HAVE_AVX512_KERNELS
namespace avx512 {
template <typename T>
PointwiseKernels<T> make_kernels();
template <typename T>
EngineKernels<T> make_engine();
}  // namespace avx512
#endif

namespace {

enum class Isa { Default, Avx2, Avx512 };

bool cpu_has_avx2() {
#if RNNFUSED_HAVE_AVX2_KERNELS
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// What ATen's AVX512 capability requires too.
bool cpu_has_avx512() {
#if RNNFUSED_HAVE_AVX512_KERNELS
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// RNNFUSED_CPU_ISA=default|avx2|avx512 forces a choice (tests use it to cover every copy; an ISA
// this processor or build lacks is an error). Otherwise ATEN_CPU_CAPABILITY, torch's own switch,
// caps it (default / avx2), and the best the processor has is taken.
Isa choose_isa() {
  if (const char* forced = std::getenv("RNNFUSED_CPU_ISA")) {
    const std::string name(forced);
    if (name == "default") return Isa::Default;
    if (name == "avx2") {
      TORCH_CHECK(cpu_has_avx2(), "RNNFUSED_CPU_ISA=avx2, but ",
                  RNNFUSED_HAVE_AVX2_KERNELS ? "this processor lacks AVX2/FMA" : "this build has no AVX2 kernels");
      return Isa::Avx2;
    }
    TORCH_CHECK(name == "avx512", "RNNFUSED_CPU_ISA must be 'default', 'avx2' or 'avx512', got '", name, "'");
    TORCH_CHECK(cpu_has_avx512(), "RNNFUSED_CPU_ISA=avx512, but ",
                RNNFUSED_HAVE_AVX512_KERNELS ? "this processor lacks AVX-512 (F, BW, VL, DQ)"
                                             : "this build has no AVX-512 kernels");
    return Isa::Avx512;
  }
  if (const char* aten = std::getenv("ATEN_CPU_CAPABILITY")) {
    if (std::strcmp(aten, "default") == 0) return Isa::Default;
    if (std::strcmp(aten, "avx2") == 0) return cpu_has_avx2() ? Isa::Avx2 : Isa::Default;
  }
  if (cpu_has_avx512()) return Isa::Avx512;
  if (cpu_has_avx2()) return Isa::Avx2;
  return Isa::Default;
}

Isa chosen_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

template <typename T>
PointwiseKernels<T> select_kernels() {
  switch (chosen_isa()) {
#if RNNFUSED_HAVE_AVX512_KERNELS
    case Isa::Avx512:
      return avx512::make_kernels<T>();
#endif
#if RNNFUSED_HAVE_AVX2_KERNELS
    case Isa::Avx2:
      return avx2::make_kernels<T>();
#endif
    default:
      return default_isa::make_kernels<T>();
  }
}

template <typename T>
EngineKernels<T> select_engine() {
  switch (chosen_isa()) {
#if RNNFUSED_HAVE_AVX512_KERNELS
    case Isa::Avx512:
      return avx512::make_engine<T>();
#endif
#if RNNFUSED_HAVE_AVX2_KERNELS
    case Isa::Avx2:
      return avx2::make_engine<T>();
#endif
    default:
      return default_isa::make_engine<T>();
  }
}

CpuPath cpu_path_from_environment() {
  const char* path = std::getenv("RNNFUSED_CPU_PATH");
  return path == nullptr ? CpuPath::Auto : parse_cpu_path(path, "RNNFUSED_CPU_PATH");
}

CpuPath g_cpu_path = cpu_path_from_environment();
int64_t g_straggler_delay_us = 0;
std::atomic<int64_t> g_takeovers{0};
bool g_straggler_inside_phase = false;
bool g_straggler_before_start = false;
std::atomic<int64_t> g_stalls{0};
std::atomic<int64_t> g_solo_runs{0};
std::atomic<int64_t> g_blas_calls{0};

// About 1 us of one core's work: a step barrier costs a fraction of that.
int64_t g_min_flops_per_thread = 32 * 1024;

// engine_projects_input's testing override (engine.h).
int g_projection_override = 0;
// engine_blas_product's testing override (engine.h).
int g_blas_override = 0;

}  // namespace

template <typename T>
const PointwiseKernels<T>& pointwise_kernels() {
  static const PointwiseKernels<T> kernels = select_kernels<T>();
  return kernels;
}

template <typename T>
const EngineKernels<T>& engine_kernels() {
  static const EngineKernels<T> kernels = select_engine<T>();
  return kernels;
}

template const PointwiseKernels<float>& pointwise_kernels<float>();
template const PointwiseKernels<double>& pointwise_kernels<double>();
template const EngineKernels<float>& engine_kernels<float>();
template const EngineKernels<double>& engine_kernels<double>();

const char* pointwise_isa() { return pointwise_kernels<float>().isa; }

CpuPath cpu_path() { return g_cpu_path; }
void set_cpu_path(CpuPath path) { g_cpu_path = path; }
const char* cpu_path_name(CpuPath path) {
  return path == CpuPath::Auto ? "auto" : path == CpuPath::Fused ? "fused" : "steps";
}
CpuPath parse_cpu_path(const std::string& name, const char* what) {
  if (name == "auto") return CpuPath::Auto;
  if (name == "fused") return CpuPath::Fused;
  TORCH_CHECK(name == "steps", what, " must be 'auto', 'fused' or 'steps', got '", name, "'");
  return CpuPath::Steps;
}
bool engine_projects_input(int64_t batch, int64_t gate_rows, int64_t hidden, int64_t input_size,
                           int64_t element_size) {
  if (input_size <= 0 || hidden <= 0) return false;
  const int64_t gates = gate_rows / hidden;
  if (!engine_runs(batch, gates, false)) return false;  // layer_inference: no training
  if (g_projection_override != 0) return g_projection_override > 0;
  if (gates * hidden != gate_rows || (gates != 3 && gates != 4)) return false;  // the LSTM and GRU only
  const int* tile_rows = element_size == 8 ? engine_kernels<double>().tile_rows : engine_kernels<float>().tile_rows;
  if (tile_rows[gates] < 3) return false;
  // The engine's team (team_size in engine_impl.h, up to the number of unit blocks).
  const int64_t flops = 2 * batch * gate_rows * (hidden + input_size);
  int64_t team = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (g_min_flops_per_thread > 0) team = std::min(team, std::max<int64_t>(1, flops / g_min_flops_per_thread));
  team = std::max<int64_t>(1, std::min(team, hidden));
  return gate_rows * (hidden + input_size) * element_size <= kProjectingPanelBytes * team;
}
void set_engine_projection_override(int override) { g_projection_override = override; }
bool engine_blas_product(int64_t batch, int64_t element_size, bool full_steps, int64_t gates, int64_t hidden) {
  // The GEMMs run inside the team's parallel region: only the BLAS that libtorch links, never ATen.
  if (std::strcmp(blas_backend(), "blas") != 0 || cpu_path() == CpuPath::Steps) return false;
  if (g_blas_override != 0) return g_blas_override > 0;
  if (cpu_path() != CpuPath::Auto) return false;
  if (!cpu_is_intel()) {
    if (element_size == 4 && step_gemm_uses_brgemm()) {
      // Within a one-thread period the call runs on one thread, whose L2 holds half of two's (not
      // one_thread_period_applies(): inside the op, CallThreads has already put it on one thread).
      const bool one_thread = in_one_thread_period() && !at::globalContext().deterministicAlgorithms();
      const int64_t weight_limit = kEngineBrgemmMinWeightBytes / (one_thread ? 2 : 1);
      const bool large_weight = gates * hidden * hidden * 4 > weight_limit;
      return batch > kEngineMaxBatch || (batch >= kEngineBrgemmMinBatch && (gates == 1 || large_weight));
    }
    return batch > kEngineMaxBatch && gates == 1;
  }
  const int64_t w_hh_bytes = gates * hidden * hidden * 4;
  const bool one_row = batch == 1 && w_hh_bytes > kEngineBlasBatch1MinWeightBytes &&
                       w_hh_bytes <= kEngineBlasBatch1MaxWeightBytes;
  return batch > kEngineMaxBatch || ((batch >= kEngineBlasMinBatch || one_row) && full_steps && element_size == 4 &&
                                     blas_packs_float());
}
void set_engine_blas_override(int override) { g_blas_override = override; }
int64_t engine_min_flops_per_thread() { return g_min_flops_per_thread; }
void set_engine_min_flops_per_thread(int64_t flops) { g_min_flops_per_thread = flops; }

}  // namespace rnnfused::cpu

namespace rnnfused::cpu {
int64_t engine_straggler_delay_us() { return g_straggler_delay_us; }
void set_engine_straggler_delay_us(int64_t us) { g_straggler_delay_us = us; }
void count_engine_takeover() { g_takeovers.fetch_add(1, std::memory_order_relaxed); }
int64_t engine_takeovers() { return g_takeovers.load(std::memory_order_relaxed); }
bool engine_straggler_delay_inside_phase() { return g_straggler_inside_phase; }
void set_engine_straggler_delay_inside_phase(bool inside) { g_straggler_inside_phase = inside; }
bool engine_straggler_delay_before_start() { return g_straggler_before_start; }
void set_engine_straggler_delay_before_start(bool before) { g_straggler_before_start = before; }
void count_engine_stall() { g_stalls.fetch_add(1, std::memory_order_relaxed); }
int64_t engine_stalls() { return g_stalls.load(std::memory_order_relaxed); }
void count_engine_solo_run() { g_solo_runs.fetch_add(1, std::memory_order_relaxed); }
int64_t engine_solo_runs() { return g_solo_runs.load(std::memory_order_relaxed); }
int64_t engine_solo_period_ms() { return solo_period_ns().load(std::memory_order_relaxed) / 1000000; }
void note_engine_team_stall() { note_team_stall(monotonic_ns()); }
bool one_thread_period_applies() { return may_run_on_one_thread() && in_one_thread_period(); }
std::unique_ptr<OneThreadBlas> one_thread_in_period() {
  if (!one_thread_period_applies()) return nullptr;
  count_engine_solo_run();
  return std::make_unique<OneThreadBlas>();
}
void end_engine_solo() {
  solo_until_ns().store(0, std::memory_order_relaxed);
  solo_period_ns().store(kSoloNs, std::memory_order_relaxed);
}
void count_engine_blas_call() { g_blas_calls.fetch_add(1, std::memory_order_relaxed); }
int64_t engine_blas_calls() { return g_blas_calls.load(std::memory_order_relaxed); }
}  // namespace rnnfused::cpu
