// The portability layer of rnnfused's kernels: what a kernel needs beyond the CUDA built-ins
// (threadIdx, __syncthreads, __shfl_*_sync, atomics, which it writes as usual). Under nvcc every
// name here is the CUDA construct itself at no cost; in the simulated build (RNNFUSED_CUDA_SIM,
// csrc/cuda/sim/) the same kernel source runs on the host with checked memory and barriers.
//
//   dptr<T>                              a pointer to device memory: T* under nvcc, a checked
//                                        pointer in the simulator. Kernel argument structs and
//                                        kernel locals that point into memory use it.
//   RNNFUSED_SHARED_ARRAY(T, name, n)    __shared__ T name[n]
//   RNNFUSED_DYNAMIC_SHARED(T, name)     the launch's dynamic shared memory as T* name
//   ptr_cast<U>(p)                       reinterpret_cast<U*>(p): the same bytes as another type
//                                        (vector loads; alignment is checked by the simulator)
//   grid_sync()                          cooperative_groups::this_grid().sync() (cooperative
//                                        launches only)
//   mma_m16n8k16<In>(d, a, b, c)         mma.sync.aligned.m16n8k16.row.col.f32.In.In.f32, In =
//                                        c10::BFloat16 or c10::Half; fragments as in the PTX ISA
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(RNNFUSED_CUDA_SIM)
#include "sim/runtime.h"

namespace rnnfused::cuda {
template <typename T>
using dptr = ::rnnfused::sim::Ptr<T>;
using ::rnnfused::sim::ptr_cast;

inline void grid_sync() { ::rnnfused::sim::sync_grid(); }

template <typename In>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same_v<In, c10::BFloat16> || std::is_same_v<In, c10::Half>, "bfloat16 or float16 inputs");
  ::rnnfused::sim::mma_m16n8k16(
      std::is_same_v<In, c10::BFloat16> ? ::rnnfused::sim::MmaInput::BFloat16 : ::rnnfused::sim::MmaInput::Float16, d,
      a, b, c);
}
}  // namespace rnnfused::cuda

#define RNNFUSED_SHARED_ARRAY(type, name, count)                                     \
  static const ::rnnfused::sim::SharedDecl name##_declaration_(#name, sizeof(type) * (count)); \
  const ::rnnfused::sim::Ptr<type> name = name##_declaration_.get<type>()
#define RNNFUSED_DYNAMIC_SHARED(type, name) \
  const ::rnnfused::sim::Ptr<type> name = ::rnnfused::sim::dynamic_shared<type>()

#else  // nvcc

#include <cooperative_groups.h>
#include <cuda_runtime.h>

namespace rnnfused::cuda {
template <typename T>
using dptr = T*;

template <typename U, typename T>
__host__ __device__ __forceinline__ U* ptr_cast(T* p) {
  return reinterpret_cast<U*>(p);
}

__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }

template <typename In>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same_v<In, c10::BFloat16> || std::is_same_v<In, c10::Half>, "bfloat16 or float16 inputs");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<In, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#else
  __trap();  // tensor-core fragments of this shape need sm_80 or newer
#endif
}
}  // namespace rnnfused::cuda

#define RNNFUSED_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define RNNFUSED_DYNAMIC_SHARED(type, name)                  \
  extern __shared__ __align__(16) unsigned char name##_bytes_[]; \
  type* const name = reinterpret_cast<type*>(name##_bytes_)

#endif
