// rnnfused._C: the op library rnnfused::* (schemas in csrc/op_schemas.h) and build information.
//
// One op = one layer, one direction, the whole sequence. The input projection
// x W_ih^T + b_ih of all steps is one GEMM done by the caller; the ops run only the recurrence.
//   gates_x     [N, G*H]  input projection of every row, packed layout
//   w_hh        [G*H, P]  b_hh [G*H] (optional)     w_hr [P, H] (LSTM projection, optional)
//   h0          [B, P]    c0 [B, H] (LSTM)
//   batch_sizes [T] int64 on the CPU (PackedSequence.batch_sizes); None for a padded batch of
//                         B rows per step
//   reverse     run the steps from last to first (the reverse direction of a bidirectional layer)
//   training    record the workspace that backward needs (empty [0] otherwise)
// Outputs: output [N, P], h_n [B, P], c_n [B, H] (LSTM), workspace.
// The backward ops take the forward's saved tensors and the gradients of its outputs (None
// reads as zero) and return the gradients of gates_x, w_hh, b_hh, [w_hr: [0] without
// projection], h0 and [c0].
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/blas.h"
#include "cpu/pointwise.h"
#include "op_schemas.h"

TORCH_LIBRARY(rnnfused, m) { rnnfused::define_recurrence_ops(m); }

namespace rnnfused {
#ifdef RNNFUSED_WITH_CUDA
namespace cuda {
at::Tensor run_selftest(const std::string& name, const at::Tensor& input);  // csrc/cuda/selftest.cu
std::string gemm_library();                                                  // csrc/cuda/selftest.cu
}
#endif

// setup.py defines RNNFUSED_WITH_CUDA when it compiles csrc/cuda.
bool cuda_built() {
#ifdef RNNFUSED_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace rnnfused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnfused: fused LSTM, GRU and Elman RNN recurrences (C++ CPU and CUDA kernels)";
  m.def("cuda_built", &rnnfused::cuda_built, "Whether this build carries the CUDA kernels");
  m.def("cpu_isa", &rnnfused::cpu::pointwise_isa, "Instruction set of the CPU gate kernels: 'avx2' or 'default'");
  m.def("cpu_blas", &rnnfused::cpu::blas_backend, "GEMM path of the CPU time loops: 'blas' or 'aten'");
#ifdef RNNFUSED_WITH_CUDA
  m.def("_cuda_selftest", &rnnfused::cuda::run_selftest,
        "Testing hook: run one of the self-test kernels of csrc/cuda/selftest_kernels.cuh (correct form) on the GPU");
  m.def("_cuda_gemm_library", &rnnfused::cuda::gemm_library,
        "Testing hook: the libcublas whose GEMMs the CUDA time loops call (resolved on first use)");
#endif
  m.def(
      "_set_cpu_blas", [](const std::string& name) { rnnfused::cpu::set_blas_backend(name.c_str()); },
      "Testing hook: run the CPU time loops on 'blas' (direct sgemm_/dgemm_) or 'aten' (at::addmm)");
}
