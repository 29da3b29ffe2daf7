// Small kernels that check the simulator (csrc/cuda/sim/) and, on a GPU, that the simulator
// agrees with the hardware: warp shuffles and votes, atomics, the m16n8k16 tensor-core fragments,
// the grid barrier, and one planted bug per check the simulator makes. Each kernel takes
// `bug` = 0 for its correct form; a non-zero value plants the bug named in its comment, which
// the simulator must report (tests/test_cuda_sim.py).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "host.h"
#include "pointwise_kernels.cuh"

namespace rnnfused::cuda::selftest {

struct Args {
  int64_t n = 0;
  int bug = 0;
  dptr<const float> in = nullptr;  // [n]
  dptr<float> out = nullptr;       // [n] (or as the kernel says)
  dptr<float> scratch = nullptr;   // [n]
};

// out[t] = in[(t + 1) % 64] through shared memory, one block of 64 threads.
// bug 1: no __syncthreads() between the writes and the neighbour's read (a race).
// bug 2: the writes go one element too far (shared memory out of bounds).
// bug 3: nothing is written to shared memory (an uninitialized read).
__global__ void neighbour_exchange_kernel(const Args a) {
  RNNFUSED_SHARED_ARRAY(float, tile, 64);
  const int t = static_cast<int>(threadIdx.x);
  if (a.bug != 3) tile[t + (a.bug == 2 ? 1 : 0)] = a.in[t];
  if (a.bug != 1) __syncthreads();
  a.out[t] = tile[(t + 1) % 64];
}

// out[i] = 2 in[i] over a multi-block grid-stride loop.
// bug 1: reads in[i + 1] (a global read out of bounds at the last element).
// bug 2: every thread writes out[0] (a race between threads and blocks).
__global__ void scale_kernel(const Args a) {
  RNNFUSED_CUDA_KERNEL_LOOP(i, a.n) {
    const float v = a.in[i + (a.bug == 1 ? 1 : 0)];
    a.out[a.bug == 2 ? 0 : i] = 2.0f * v;
  }
}

// A warp-sum of in[0..31] by __shfl_down_sync into out[0], one warp.
// bug 1: the mask names only lanes 0-15 although all 32 lanes take part (wrong lane mask).
// bug 2: lane 31 leaves before the reduction (the mask waits for a lane that exited).
__global__ void warp_sum_kernel(const Args a) {
  const int lane = static_cast<int>(threadIdx.x);
  if (a.bug == 2 && lane == 31) return;
  const unsigned mask = a.bug == 1 ? 0x0000ffffu : 0xffffffffu;
  float v = a.in[lane];
  for (int delta = 16; delta > 0; delta /= 2) v += __shfl_down_sync(mask, v, delta);
  if (lane == 0) a.out[0] = v;
}

// One warp in two halves: each lane writes in[lane] to shared memory, its half-warp meets at
// __syncwarp with the half's mask, then out[lane] = the next lane's value within the half.
// bug 1: no __syncwarp (a race inside each half).
// bug 2: the half-warps read across the halves (lanes the __syncwarp did not order: a race).
__global__ void half_warp_exchange_kernel(const Args a) {
  RNNFUSED_SHARED_ARRAY(float, tile, 32);
  const int lane = static_cast<int>(threadIdx.x);
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  tile[lane] = a.in[lane];
  if (a.bug != 1) __syncwarp(mask);
  const int neighbour = (lane & 16) | ((lane + 1) & 15);
  a.out[lane] = tile[a.bug == 2 ? neighbour ^ 16 : neighbour];
}

// Blocks of 32 threads: each thread copies in[i] to scratch[i], the whole grid meets at the grid
// barrier, then out[i] = scratch[(i + 32) % n], a value another block wrote. Cooperative launch.
// bug 1: the last block returns before the barrier (a grid barrier not all blocks reach).
// bug 2: no grid barrier (a race between blocks).
__global__ void grid_exchange_kernel(const Args a) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a.bug == 1 && blockIdx.x == gridDim.x - 1) return;
  a.scratch[i] = a.in[i];
  if (a.bug != 2) grid_sync();
  a.out[i] = a.scratch[(i + 32) % a.n];
}

// out[i] = in[i] four floats at a time (float4 vector accesses), n a multiple of 4.
// bug 1: the loads start one float late (misaligned 16-byte accesses).
__global__ void vector_copy_kernel(const Args a) {
  const dptr<const float4> in = ptr_cast<const float4>(a.in + (a.bug == 1 ? 1 : 0));
  const dptr<float4> out = ptr_cast<float4>(a.out);
  RNNFUSED_CUDA_KERNEL_LOOP(i, a.n / 4 - (a.bug == 1 ? 1 : 0)) { out[i] = in[i]; }
}

// One block of 64 threads: thread 0 stores in[0] in shared memory, every thread reads it, then
// thread 62 overwrites it with in[1]; out[t] = what thread t read (in[0]).
// bug 1: no __syncthreads between the reads and the overwrite: a race with the other readers.
// (The simulator resumes the threads after a barrier as 63, 0, 1, ..., 62, so the writer's own
// read is the last one before its write: the race is only seen if the shadow remembers an
// earlier reader too. On a GPU any order is possible.)
__global__ void broadcast_then_overwrite_kernel(const Args a) {
  RNNFUSED_SHARED_ARRAY(float, cell, 1);
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) cell[0] = a.in[0];
  __syncthreads();
  const float v = cell[0];
  if (a.bug != 1) __syncthreads();
  if (t == 62) cell[0] = a.in[1];
  a.out[t] = v;
}

// One block of 64 threads: thread 0 leaves early, the others meet at __syncthreads() (bug 1);
// without the bug every thread copies in to out around the barrier.
__global__ void divergent_barrier_kernel(const Args a) {
  const int t = static_cast<int>(threadIdx.x);
  if (a.bug == 1 && t == 0) return;
  const float v = a.in[t];
  __syncthreads();
  a.out[t] = v;
}

// Every thread of the grid adds in[i] to out[0] atomically.
// bug 1: thread 0 also reads out[0] plainly, unordered with the other threads' atomics (a race).
__global__ void atomic_sum_kernel(const Args a) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < a.n) atomicAdd(a.out + 0, a.in[i]);
  if (a.bug == 1 && i == 0) a.out[1] = a.out[0];
}

// Shuffles and votes of one block of 64 threads (two warps) over double values v = in[t]:
//   out[0:64]    __shfl_sync(v, lane 3)          out[64:128]  __shfl_up_sync(v, 2)
//   out[128:192] __shfl_down_sync(v, 5, width 16) out[192:256] __shfl_xor_sync(v, 1)
//   out[256:320] __ballot_sync(v > 0)            out[320:384] __any_sync(v > 1), __all_sync(v > -1) * 2
struct ShuffleArgs {
  dptr<const double> in = nullptr;  // [64]
  dptr<double> out = nullptr;       // [384]
};

__global__ void shuffle_kernel(const ShuffleArgs a) {
  const int t = static_cast<int>(threadIdx.x);
  const unsigned full = 0xffffffffu;
  const double v = a.in[t];
  a.out[t] = __shfl_sync(full, v, 3);
  a.out[64 + t] = __shfl_up_sync(full, v, 2);
  a.out[128 + t] = __shfl_down_sync(full, v, 5, 16);
  a.out[192 + t] = __shfl_xor_sync(full, v, 1);
  a.out[256 + t] = static_cast<double>(__ballot_sync(full, v > 0));
  a.out[320 + t] = static_cast<double>(__any_sync(full, v > 1)) + 2.0 * __all_sync(full, v > -1);
}

// D = A B + C through one mma.sync m16n8k16 on one warp: A [16, 16] row-major, B [16, 8]
// row-major (k, n), C and D [16, 8]; A and B are rounded to `In` as the fragments are loaded in
// the register layouts of the PTX ISA.
struct MmaArgs {
  dptr<const float> a = nullptr;  // [16, 16]
  dptr<const float> b = nullptr;  // [16, 8]
  dptr<const float> c = nullptr;  // [16, 8]
  dptr<float> d = nullptr;        // [16, 8]
};

template <typename In>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  return static_cast<uint32_t>(In(lo).x) | (static_cast<uint32_t>(In(hi).x) << 16);
}

template <typename In>
__global__ void mma_kernel(const MmaArgs args) {
  const int lane = static_cast<int>(threadIdx.x);
  const int group = lane / 4, tig = lane % 4;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int j = 0; j < 4; ++j) {
    const int row = group + 8 * (j % 2), col = 2 * tig + 8 * (j / 2);
    a[j] = pack_pair<In>(args.a[row * 16 + col], args.a[row * 16 + col + 1]);
  }
  for (int j = 0; j < 2; ++j) {
    const int k = 2 * tig + 8 * j;
    b[j] = pack_pair<In>(args.b[k * 8 + group], args.b[(k + 1) * 8 + group]);
  }
  for (int i = 0; i < 4; ++i) c[i] = args.c[(group + 8 * (i / 2)) * 8 + 2 * tig + i % 2];
  mma_m16n8k16<In>(d, a, b, c);
  for (int i = 0; i < 4; ++i) args.d[(group + 8 * (i / 2)) * 8 + 2 * tig + i % 2] = d[i];
}

// ---------------------------------------------------------------------------------------------
// Host side: run one of the kernels above by name on `input` (on the device: a CPU tensor in the
// simulated build), returning its output.
// ---------------------------------------------------------------------------------------------

inline at::Tensor run(const std::string& name, int64_t bug, const at::Tensor& input) {
  TORCH_CHECK(input.is_contiguous() && is_device_tensor(input), "selftest: input must be a contiguous device tensor");
  const Stream stream = current_stream();
  const auto as_float = [&](const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "selftest ", name, ": input must be float32");
    return t.data_ptr<float>();
  };
  Args a;
  a.n = input.numel();
  a.bug = static_cast<int>(bug);
  const auto blocks_of = [&](int64_t threads, int64_t cap) {
    return dim3(static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>((a.n + threads - 1) / threads, 1), cap)));
  };
  if (name == "neighbour_exchange") {
    TORCH_CHECK(a.n == 64, "selftest neighbour_exchange: input must have 64 elements");
    a.in = as_float(input);
    at::Tensor out = at::empty_like(input);
    a.out = out.data_ptr<float>();
    launch_kernel("neighbour_exchange", neighbour_exchange_kernel, dim3(1), dim3(64), 0, stream, a);
    return out;
  }
  if (name == "scale") {
    a.in = as_float(input);
    at::Tensor out = at::empty_like(input);
    a.out = out.data_ptr<float>();
    launch_kernel("scale", scale_kernel, blocks_of(64, 4), dim3(64), 0, stream, a);
    return out;
  }
  if (name == "warp_sum") {
    TORCH_CHECK(a.n == 32, "selftest warp_sum: input must have 32 elements");
    a.in = as_float(input);
    at::Tensor out = at::zeros({1}, input.options());
    a.out = out.data_ptr<float>();
    launch_kernel("warp_sum", warp_sum_kernel, dim3(1), dim3(32), 0, stream, a);
    return out;
  }
  if (name == "half_warp_exchange") {
    TORCH_CHECK(a.n == 32, "selftest half_warp_exchange: input must have 32 elements");
    a.in = as_float(input);
    at::Tensor out = at::empty_like(input);
    a.out = out.data_ptr<float>();
    launch_kernel("half_warp_exchange", half_warp_exchange_kernel, dim3(1), dim3(32), 0, stream, a);
    return out;
  }
  if (name == "grid_exchange" || name == "grid_exchange_not_cooperative") {
    TORCH_CHECK(a.n % 32 == 0 && a.n > 0, "selftest grid_exchange: input must have a positive multiple of 32 elements");
    a.in = as_float(input);
    at::Tensor out = at::empty_like(input);
    at::Tensor scratch = at::empty_like(input);
    a.out = out.data_ptr<float>();
    a.scratch = scratch.data_ptr<float>();
    launch_kernel("grid_exchange", grid_exchange_kernel, dim3(static_cast<unsigned int>(a.n / 32)), dim3(32), 0,
                  stream, a, /*cooperative=*/name == "grid_exchange");
    return out;
  }
  if (name == "vector_copy") {
    TORCH_CHECK(a.n % 4 == 0, "selftest vector_copy: input must have a multiple of 4 elements");
    a.in = as_float(input);
    at::Tensor out = at::empty_like(input);
    a.out = out.data_ptr<float>();
    launch_kernel("vector_copy", vector_copy_kernel, blocks_of(256, 4), dim3(64), 0, stream, a);
    return out;
  }
  if (name == "grid_exchange_max") {
    // The largest cooperative grid of 32-thread blocks the device holds (the occupancy query).
    const int64_t blocks = max_cooperative_blocks(grid_exchange_kernel, 32, 0);
    at::Tensor values = at::arange(blocks * 32, input.options());
    return run("grid_exchange", 0, values);
  }
  if (name == "broadcast_then_overwrite") {
    TORCH_CHECK(a.n == 64, "selftest broadcast_then_overwrite: input must have 64 elements");
    a.in = as_float(input);
    at::Tensor out = at::empty_like(input);
    a.out = out.data_ptr<float>();
    launch_kernel("broadcast_then_overwrite", broadcast_then_overwrite_kernel, dim3(1), dim3(64), 0, stream, a);
    return out;
  }
  if (name == "divergent_barrier") {
    TORCH_CHECK(a.n == 64, "selftest divergent_barrier: input must have 64 elements");
    a.in = as_float(input);
    at::Tensor out = at::empty_like(input);
    a.out = out.data_ptr<float>();
    launch_kernel("divergent_barrier", divergent_barrier_kernel, dim3(1), dim3(64), 0, stream, a);
    return out;
  }
  if (name == "atomic_sum") {
    a.in = as_float(input);
    at::Tensor out = at::zeros({2}, input.options());
    a.out = out.data_ptr<float>();
    launch_kernel("atomic_sum", atomic_sum_kernel, blocks_of(64, 1 << 16), dim3(64), 0, stream, a);
    return out;
  }
  if (name == "shuffle") {
    TORCH_CHECK(a.n == 64 && input.scalar_type() == at::kDouble, "selftest shuffle: input must be 64 float64 values");
    at::Tensor out = at::empty({384}, input.options());
    ShuffleArgs s;
    s.in = input.data_ptr<double>();
    s.out = out.data_ptr<double>();
    launch_kernel("shuffle", shuffle_kernel, dim3(1), dim3(64), 0, stream, s);
    return out;
  }
  if (name == "mma_bf16" || name == "mma_f16") {
    TORCH_CHECK(a.n == 16 * 16 + 2 * 16 * 8, "selftest mma: input must be A [16,16], B [16,8], C [16,8] flattened");
    const float* base = as_float(input);
    at::Tensor out = at::empty({16, 8}, input.options());
    MmaArgs m;
    m.a = base;
    m.b = base + 256;
    m.c = base + 384;
    m.d = out.data_ptr<float>();
    if (name == "mma_bf16") {
      launch_kernel("mma_bf16", mma_kernel<c10::BFloat16>, dim3(1), dim3(32), 0, stream, m);
    } else {
      launch_kernel("mma_f16", mma_kernel<c10::Half>, dim3(1), dim3(32), 0, stream, m);
    }
    return out;
  }
  TORCH_CHECK(false, "selftest: unknown kernel '", name, "'");
}

}  // namespace rnnfused::cuda::selftest
