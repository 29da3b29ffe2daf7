// The self-test kernels (selftest_kernels.cuh) in the CUDA build, so that a GPU run can check that
// the simulator's warp operations and tensor-core fragments agree with the hardware
// (tests/test_cuda.py). Only their correct forms are run on a GPU.
#include "selftest_kernels.cuh"

namespace rnnfused::cuda {

at::Tensor run_selftest(const std::string& name, const at::Tensor& input) {
  const DeviceGuard device_guard(input.device());
  return selftest::run(name, /*bug=*/0, input);
}

std::string gemm_library() { return cublas_library(); }

}  // namespace rnnfused::cuda
