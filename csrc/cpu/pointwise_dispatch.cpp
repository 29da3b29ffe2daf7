// Picks the per-step passes for this processor once, at the first call.
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

#include "pointwise.h"

// RNNFUSED_HAVE_AVX2_KERNELS: set by setup.py when it compiled pointwise_avx2.cpp for AVX2.
#ifndef RNNFUSED_HAVE_AVX2_KERNELS
#define RNNFUSED_HAVE_AVX2_KERNELS 0
#endif

namespace rnnfused::cpu {

namespace default_isa {
template <typename T>
PointwiseKernels<T> make_kernels();
}
#if RNNFUSED_HAVE_AVX2_KERNELS
namespace avx2 {
template <typename T>
PointwiseKernels<T> make_kernels();
}
#endif

namespace {

// RNNFUSED_CPU_ISA=default|avx2 overrides the choice (tests use it to cover both copies);
// otherwise ATEN_CPU_CAPABILITY=default, torch's own switch, also selects the baseline.
bool use_avx2() {
#if RNNFUSED_HAVE_AVX2_KERNELS
  const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (const char* forced = std::getenv("RNNFUSED_CPU_ISA")) {
    if (std::strcmp(forced, "default") == 0) return false;
    TORCH_CHECK(std::strcmp(forced, "avx2") == 0, "RNNFUSED_CPU_ISA must be 'default' or 'avx2', got '", forced,
                "'");
    TORCH_CHECK(supported, "RNNFUSED_CPU_ISA=avx2 but this processor lacks AVX2/FMA");
    return true;
  }
  if (const char* aten = std::getenv("ATEN_CPU_CAPABILITY")) {
    if (std::strcmp(aten, "default") == 0) return false;
  }
  return supported;
#else
  if (const char* forced = std::getenv("RNNFUSED_CPU_ISA")) {
    TORCH_CHECK(std::strcmp(forced, "default") == 0, "RNNFUSED_CPU_ISA=", forced,
                " is not available: this build has only the default kernels");
  }
  return false;
#endif
}

template <typename T>
PointwiseKernels<T> select_kernels() {
#if RNNFUSED_HAVE_AVX2_KERNELS
  if (use_avx2()) return avx2::make_kernels<T>();
#endif
  return default_isa::make_kernels<T>();
}

}  // namespace

template <typename T>
const PointwiseKernels<T>& pointwise_kernels() {
  static const PointwiseKernels<T> kernels = select_kernels<T>();
  return kernels;
}

template const PointwiseKernels<float>& pointwise_kernels<float>();
template const PointwiseKernels<double>& pointwise_kernels<double>();

const char* pointwise_isa() { return pointwise_kernels<float>().isa; }

}  // namespace rnnfused::cpu
