// The per-step passes and the fused engine for AVX-512 processors (F, BW, VL, DQ). setup.py
// compiles this one file with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
// -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 (at::vec's 512-bit types, SLEEF's vector
// exp/tanh exported by libtorch_cpu) and defines RNNFUSED_HAVE_AVX512_KERNELS for the dispatcher,
// which calls it only after checking the processor at run time. Elsewhere it compiles to nothing.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(CPU_CAPABILITY_AVX512)
#define RNNFUSED_ISA avx512
#define RNNFUSED_ISA_NAME "avx512"
#include "pointwise_impl.h"
#include "engine_impl.h"

namespace rnnfused::cpu::avx512 {
template PointwiseKernels<float> make_kernels<float>();
template PointwiseKernels<double> make_kernels<double>();
template EngineKernels<float> make_engine<float>();
template EngineKernels<double> make_engine<double>();
}  // namespace rnnfused::cpu::avx512
#endif
