// The per-step passes and the fused engine for AVX2 + FMA processors. setup.py compiles this one file with
// -mavx2 -mfma -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 (at::vec's 256-bit types, SLEEF's
// vector exp/tanh exported by libtorch_cpu) and defines RNNFUSED_HAVE_AVX2_KERNELS for the
// dispatcher, which calls it only after checking the processor at run time. Elsewhere
// (another compiler or architecture) it compiles to nothing.
#if defined(__AVX2__) && defined(__FMA__) && defined(CPU_CAPABILITY_AVX2)
#define RNNFUSED_ISA avx2
#define RNNFUSED_ISA_NAME "avx2"
#include "pointwise_impl.h"
#include "engine_impl.h"

namespace rnnfused::cpu::avx2 {
template PointwiseKernels<float> make_kernels<float>();
template PointwiseKernels<double> make_kernels<double>();
template EngineKernels<float> make_engine<float>();
template EngineKernels<double> make_engine<double>();
}  // namespace rnnfused::cpu::avx2
#endif
