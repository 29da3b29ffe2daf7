// The per-step passes and the fused engine for any processor: at::vec at the build's baseline instruction set.
#define RNNFUSED_ISA default_isa
#define RNNFUSED_ISA_NAME "default"
#include "pointwise_impl.h"
#include "engine_impl.h"

namespace rnnfused::cpu::default_isa {
template PointwiseKernels<float> make_kernels<float>();
template PointwiseKernels<double> make_kernels<double>();
template EngineKernels<float> make_engine<float>();
template EngineKernels<double> make_engine<double>();
}  // namespace rnnfused::cpu::default_isa
