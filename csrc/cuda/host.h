// The host side of the portability layer (see device.cuh): what the CUDA time loops need from
// the CUDA runtime and from torch's CUDA support. Under nvcc these are the real thing; in the
// simulated build the "device" is the CPU, tensors are CPU tensors, launches run on
// csrc/cuda/sim/ and streams and device guards have nothing to do.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "device.cuh"

#if defined(RNNFUSED_CUDA_SIM)

// The simulated build registers its ops in their own namespace, for CPU tensors.
#define RNNFUSED_CUDA_OPS_NAMESPACE rnnfused_sim
#define RNNFUSED_CUDA_DISPATCH_KEY CPU

namespace rnnfused::cuda {

using Stream = int;
inline Stream current_stream() { return 0; }

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

inline bool is_device_tensor(const at::Tensor& t) { return t.device().is_cpu(); }
inline int multiprocessor_count() { return ::rnnfused::sim::config().sm_count; }

// kernel<<<grid, block, shared_bytes, stream>>>(args), or a cooperative launch (every block
// co-resident, so that grid_sync() can complete).
template <typename Args>
void launch_kernel(const char* name, void (*kernel)(Args), dim3 grid, dim3 block, size_t shared_bytes, Stream,
                   const Args& args, bool cooperative = false) {
  ::rnnfused::sim::launch(name, {grid, block, shared_bytes, cooperative}, [&] { kernel(args); });
}

// The largest grid a cooperative launch of `kernel` with `threads` threads per block and
// `shared_bytes` of dynamic shared memory may have (every block resident at once).
template <typename Args>
int64_t max_cooperative_blocks(void (*)(Args), int threads, size_t shared_bytes) {
  return ::rnnfused::sim::max_cooperative_blocks(threads, shared_bytes);
}

// out (float32) = a b for 16-bit a and b with float32 accumulation. Here: the same product on
// float32 copies (exact: a 16-bit value is a float32 value), which is what the GPU's tensor
// cores compute up to summation order.
inline void mm_lowp_into_float(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
}

// A host table as a tensor on the device of `like` (here: the CPU).
inline at::Tensor upload(const std::vector<int64_t>& table, const at::Tensor& like) {
  return at::tensor(table, like.options().dtype(at::kLong));
}

}  // namespace rnnfused::cuda

#else  // nvcc

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define RNNFUSED_CUDA_OPS_NAMESPACE rnnfused
#define RNNFUSED_CUDA_DISPATCH_KEY CUDA

namespace rnnfused::cuda {

using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;

inline bool is_device_tensor(const at::Tensor& t) { return t.is_cuda(); }
inline int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// kernel<<<grid, block, shared_bytes, stream>>>(args), or a cooperative launch (every block
// co-resident, so that grid_sync() can complete), checked.
template <typename Args>
void launch_kernel(const char*, void (*kernel)(Args), dim3 grid, dim3 block, size_t shared_bytes, Stream stream,
                   const Args& args, bool cooperative = false) {
  if (cooperative) {
    void* params[] = {const_cast<Args*>(&args)};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, params,
                                               shared_bytes, stream));
  } else {
    kernel<<<grid, block, shared_bytes, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The largest grid a cooperative launch of `kernel` with `threads` threads per block and
// `shared_bytes` of dynamic shared memory may have (every block resident at once).
template <typename Args>
int64_t max_cooperative_blocks(void (*kernel)(Args), int threads, size_t shared_bytes) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, shared_bytes));
  return static_cast<int64_t>(per_sm) * multiprocessor_count();
}

// out (float32) = a b for 16-bit a and b (bfloat16 / float16) with float32 accumulation, on
// tensor cores (cuBLAS through ATen's mm with out_dtype).
inline void mm_lowp_into_float(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b, at::kFloat);
}

// A host table as a tensor on the device of `like`: staged in pinned memory (torch's caching
// host allocator keeps it alive until the copy is done) and copied on the current stream, so the
// host never waits for the device.
inline at::Tensor upload(const std::vector<int64_t>& table, const at::Tensor& like) {
  at::Tensor staged = at::empty({static_cast<int64_t>(table.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(table.begin(), table.end(), staged.data_ptr<int64_t>());
  return staged.to(like.device(), /*non_blocking=*/true);
}

}  // namespace rnnfused::cuda

#endif
