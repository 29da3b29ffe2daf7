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

// A [rows, cols] row-major matrix at `p`, as a CPU tensor that does not own it.
template <typename T>
at::Tensor host_matrix(const T* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// The row-major GEMMs of the time loops, on one contiguous block of rows each (see the CUDA
// versions below). Here: ATen's CPU GEMM on views of the same memory.
//   gemm_nt: c[rows, n] = a[rows, k] b^T + beta c, b [n, k]
//   gemm_nn: c[rows, n] = a[rows, k] b   + beta c, b [k, n]
template <typename T>
void gemm_nt(int64_t rows, int64_t n, int64_t k, const T* a, const T* b, T* c, T beta) {
  if (rows == 0 || n == 0) return;
  host_matrix(c, rows, n).addmm_(host_matrix(a, rows, k), host_matrix(b, n, k).t(), beta, 1);
}

template <typename T>
void gemm_nn(int64_t rows, int64_t n, int64_t k, const T* a, const T* b, T* c, T beta) {
  if (rows == 0 || n == 0) return;
  host_matrix(c, rows, n).addmm_(host_matrix(a, rows, k), host_matrix(b, k, n), beta, 1);
}

// The largest grid a cooperative launch of `kernel` with `threads` threads per block and
// `shared_bytes` of dynamic shared memory may have (every block resident at once).
template <typename Args>
int64_t max_cooperative_blocks(void (*)(Args), int threads, size_t shared_bytes) {
  return ::rnnfused::sim::max_cooperative_blocks(threads, shared_bytes);
}

// The most dynamic shared memory one block may have (with the opt-in a real launch makes).
inline size_t max_dynamic_shared_bytes() { return ::rnnfused::sim::config().shared_per_block; }

// Whether mma.sync with bfloat16 / float16 inputs runs here (the simulator models it).
inline bool device_supports_mma() { return true; }

// Lets `kernel` launch with `bytes` of dynamic shared memory (nothing to do here).
template <typename Args>
void reserve_dynamic_shared(void (*)(Args), size_t) {}

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
#include <cublas_v2.h>
#include <dlfcn.h>

#include <algorithm>
#include <limits>
#include <string>

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

// cuBLAS's float32 and float64 GEMMs, taken from the libcublas that libtorch_cuda has loaded (it
// is a dependency of it): torch does not export its own GEMM wrappers, and pip's wheels carry no
// unversioned libcublas.so to link against. Resolved once, by the soname of the cuBLAS headers
// rnnfused was compiled with.
struct CublasGemms {
  decltype(&cublasSgemm_v2) sgemm = nullptr;
  decltype(&cublasDgemm_v2) dgemm = nullptr;
  std::string library;
};

inline const CublasGemms& cublas_gemms() {
  static const CublasGemms gemms = [] {
    CublasGemms g;
    g.library = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* lib = dlopen(g.library.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen(g.library.c_str(), RTLD_NOW);
    TORCH_CHECK(lib != nullptr, "rnnfused: cannot load ", g.library, " (", dlerror(), ")");
    g.sgemm = reinterpret_cast<decltype(&cublasSgemm_v2)>(dlsym(lib, "cublasSgemm_v2"));
    g.dgemm = reinterpret_cast<decltype(&cublasDgemm_v2)>(dlsym(lib, "cublasDgemm_v2"));
    TORCH_CHECK(g.sgemm != nullptr && g.dgemm != nullptr, "rnnfused: ", g.library,
                " lacks cublasSgemm_v2 / cublasDgemm_v2");
    return g;
  }();
  return gemms;
}

// Column-major C[m, n] = op(A) op(B) + beta C on torch's cuBLAS handle for the current device,
// which is bound to the current stream and set to torch's TF32 choice for float32.
template <typename T>
void cublas_gemm(cublasOperation_t op_a, cublasOperation_t op_b, int64_t m, int64_t n, int64_t k, const T* a,
                 int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "rnnfused: a GEMM dimension exceeds cuBLAS's 32-bit range");
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const T alpha = 1;
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  cublasStatus_t status;
  if constexpr (std::is_same_v<T, float>) {
    status = cublas_gemms().sgemm(handle, op_a, op_b, i(m), i(n), i(k), &alpha, a, i(lda), b, i(ldb), &beta, c, i(ldc));
  } else {
    status = cublas_gemms().dgemm(handle, op_a, op_b, i(m), i(n), i(k), &alpha, a, i(lda), b, i(ldb), &beta, c, i(ldc));
  }
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "rnnfused: cuBLAS GEMM failed with status ", static_cast<int>(status));
}

// The row-major GEMMs of the time loops, on one contiguous block of rows each: straight to cuBLAS,
// with no tensor views and no dispatcher, so a step costs one cuBLAS call of host time per GEMM.
//   gemm_nt: c[rows, n] = a[rows, k] b^T + beta c, b [n, k]   (h W_hh^T, r W_hr^T)
//   gemm_nn: c[rows, n] = a[rows, k] b   + beta c, b [k, n]   (dG W_hh, dh W_hr)
// Row-major c[rows, n] is column-major c^T [n, rows], so each is the column-major product of the
// transposes: c^T = b a^T and c^T = b^T a^T.
template <typename T>
void gemm_nt(int64_t rows, int64_t n, int64_t k, const T* a, const T* b, T* c, T beta) {
  if (rows == 0 || n == 0) return;
  cublas_gemm<T>(CUBLAS_OP_T, CUBLAS_OP_N, n, rows, k, b, std::max<int64_t>(k, 1), a, std::max<int64_t>(k, 1), beta, c,
                 n);
}

template <typename T>
void gemm_nn(int64_t rows, int64_t n, int64_t k, const T* a, const T* b, T* c, T beta) {
  if (rows == 0 || n == 0) return;
  cublas_gemm<T>(CUBLAS_OP_N, CUBLAS_OP_N, n, rows, k, b, n, a, std::max<int64_t>(k, 1), beta, c, n);
}

// Which libcublas the GEMMs use (resolving it on the first call): a testing hook.
inline std::string cublas_library() { return cublas_gemms().library; }

// The largest grid a cooperative launch of `kernel` with `threads` threads per block and
// `shared_bytes` of dynamic shared memory may have (every block resident at once).
template <typename Args>
int64_t max_cooperative_blocks(void (*kernel)(Args), int threads, size_t shared_bytes) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, shared_bytes));
  return static_cast<int64_t>(per_sm) * multiprocessor_count();
}

// The most dynamic shared memory one block may have, with the opt-in (above 48 KiB) that
// reserve_dynamic_shared makes.
inline size_t max_dynamic_shared_bytes() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

// Whether mma.sync with bfloat16 / float16 inputs runs on the current device (sm_80 and newer).
inline bool device_supports_mma() { return at::cuda::getCurrentDeviceProperties()->major >= 8; }

// Lets `kernel` launch with `bytes` of dynamic shared memory (beyond the default 48 KiB a kernel
// must opt in); to be called before the occupancy query, which counts with it.
template <typename Args>
void reserve_dynamic_shared(void (*kernel)(Args), size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
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
