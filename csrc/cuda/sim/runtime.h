// rnnfused's CUDA simulator: the CUDA execution model on the host, so that the kernel sources of
// csrc/cuda/ run on the CPU (in CI, where no GPU is) with their races and bad accesses reported.
//
// Only the test build includes this (RNNFUSED_CUDA_SIM, see setup.py); kernels reach it through
// csrc/cuda/device.cuh, whose names are the CUDA built-ins under nvcc.
//
// The model:
// - A launch runs every thread of the grid as a fiber (its own stack) on the calling host thread,
//   one at a time. A fiber runs until it meets a barrier or a warp operation, where it waits
//   until every participant has arrived. A plain launch runs its blocks one after another; a
//   cooperative launch keeps every block alive at once, as cudaLaunchCooperativeKernel does, so
//   that a grid-wide barrier can complete.
// - __syncthreads (block), __syncwarp / __shfl*_sync / votes / mma (warp, by lane mask) and the
//   grid barrier are checked: every participant must arrive, with the same mask; a thread that
//   exits while others wait for it, a lane outside its own mask, or a wait that can never
//   complete is an error naming the kernel, block and thread, never a hang.
// - Memory is reached through checked pointers (Ptr<T>): global memory is any allocation of the
//   CPU allocator the simulator installs (every tensor made while it is loaded), shared memory is
//   per block. Every access is bounds-checked against the allocation (or shared array) its
//   pointer came from, and recorded in a shadow of that memory (2-byte granules) with the
//   thread's position in the launch's barriers; two accesses by different threads, at least one
//   a write and not both atomic, that no barrier orders are reported as a race. A read of shared
//   memory that no thread of the block has written is reported too. __syncwarp orders the lanes
//   of its mask (a vector clock per lane), so a half-warp __syncwarp(0x0000ffff) orders lanes
//   0-15 among themselves and nothing else; shuffles and votes order no memory (CUDA promises
//   none). Limit: each 2-byte granule remembers its last
//   write and the last reads of two different threads (a race between an earlier reader and a
//   later writer goes unnoticed when reads by two other threads came in between).
// - Tensor-core fragments (mma.sync m16n8k16, bfloat16/float16 inputs, float accumulation) are
//   gathered from the 32 lanes in the register layouts the PTX ISA documents and multiplied with
//   scalar float math, so a layout mistake gives the same wrong numbers as on a GPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>

// The CUDA built-in vector types (their alignment is what makes a vector access legal).
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

// The CUDA built-in vector type of launch configurations and indices.
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace rnnfused::sim {

// ---------------------------------------------------------------------------------------------
// Configuration of the simulated device
// ---------------------------------------------------------------------------------------------

struct DeviceConfig {
  int sm_count = 2;                        // multiprocessors (kernels size their grids by it)
  int max_threads_per_block = 1024;
  int max_threads_per_sm = 2048;           // bounds a cooperative launch: blocks must be co-resident
  size_t static_shared_per_block = 48 * 1024;
  size_t shared_per_block = 227 * 1024;    // static + dynamic, with the opt-in of a real launch
  size_t shared_per_sm = 228 * 1024;
  bool check_global_races = true;          // shadow every global access (the slow part)
};

DeviceConfig& config();

// ---------------------------------------------------------------------------------------------
// Memory: regions (allocations and shared arrays) and checked pointers
// ---------------------------------------------------------------------------------------------

enum class Space : uint8_t { Global, Shared };
enum class Access : uint8_t { Read, Write, Atomic };

struct Region;  // defined in runtime.cpp

// The live global allocation holding `p` (nullptr if none) and its generation, which a pointer
// keeps so that a use after the allocation was freed is reported, not silently allowed.
Region* find_global_region(const void* p, uint64_t* generation);

// Checks one access of `bytes` bytes at `addr` through a pointer into `region` (bounds, alignment
// to `align` bytes, use after free, races) and throws an error that names the kernel, block and
// thread when it fails.
void check_access(const Region* region, uint64_t generation, const void* addr, size_t bytes, size_t align,
                  Access kind);

template <typename T>
class Ptr;

// A reference to one element of writable memory: reads and writes are checked as they happen.
template <typename T>
class Ref {
 public:
  Ref(T* p, Region* region, uint64_t generation) : p_(p), region_(region), generation_(generation) {}
  operator T() const {
    check_access(region_, generation_, p_, sizeof(T), alignof(T), Access::Read);
    return *p_;
  }
  const Ref& operator=(const T& value) const {
    check_access(region_, generation_, p_, sizeof(T), alignof(T), Access::Write);
    *p_ = value;
    return *this;
  }
  const Ref& operator=(const Ref& other) const { return *this = static_cast<T>(other); }
  const Ref& operator+=(const T& v) const { return *this = static_cast<T>(*this) + v; }
  const Ref& operator-=(const T& v) const { return *this = static_cast<T>(*this) - v; }
  const Ref& operator*=(const T& v) const { return *this = static_cast<T>(*this) * v; }
  const Ref& operator/=(const T& v) const { return *this = static_cast<T>(*this) / v; }
  Ptr<T> operator&() const { return Ptr<T>(p_, region_, generation_); }

 private:
  T* p_;
  Region* region_;
  uint64_t generation_;
};

// A pointer into simulated device memory. Arithmetic is free; every dereference is checked.
// Made implicitly from a raw pointer on the host (as a kernel argument is filled), where it
// finds the allocation it points into.
template <typename T>
class Ptr {
 public:
  using element_type = T;
  using value_type = std::remove_const_t<T>;

  Ptr() = default;
  Ptr(std::nullptr_t) {}
  Ptr(T* p) : p_(p) {
    if (p_ != nullptr) region_ = find_global_region(p_, &generation_);
  }
  Ptr(T* p, Region* region, uint64_t generation) : p_(p), region_(region), generation_(generation) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  Ptr(const Ptr<U>& other) : p_(other.raw()), region_(other.region()), generation_(other.generation()) {}

  T* raw() const { return p_; }
  Region* region() const { return region_; }
  uint64_t generation() const { return generation_; }

  // Read-only memory reads by value; writable memory hands out checked references.
  auto operator[](int64_t i) const {
    if constexpr (std::is_const_v<T>) {
      check_access(region_, generation_, p_ + i, sizeof(T), alignof(T), Access::Read);
      return static_cast<value_type>(p_[i]);
    } else {
      return Ref<T>(p_ + i, region_, generation_);
    }
  }
  auto operator*() const { return (*this)[0]; }

  Ptr operator+(int64_t n) const { return Ptr(p_ + n, region_, generation_); }
  Ptr operator-(int64_t n) const { return Ptr(p_ - n, region_, generation_); }
  Ptr& operator+=(int64_t n) {
    p_ += n;
    return *this;
  }
  Ptr& operator-=(int64_t n) {
    p_ -= n;
    return *this;
  }
  Ptr& operator++() { return *this += 1; }
  std::ptrdiff_t operator-(const Ptr& other) const { return p_ - other.p_; }
  explicit operator bool() const { return p_ != nullptr; }
  bool operator==(const Ptr& other) const { return p_ == other.p_; }
  bool operator!=(const Ptr& other) const { return p_ != other.p_; }
  bool operator==(std::nullptr_t) const { return p_ == nullptr; }
  bool operator!=(std::nullptr_t) const { return p_ != nullptr; }

 private:
  T* p_ = nullptr;
  Region* region_ = nullptr;
  uint64_t generation_ = 0;
};

template <typename T>
Ptr<T> operator+(int64_t n, const Ptr<T>& p) {
  return p + n;
}

// The same bytes seen as another type (a vector load of float4 from a float array, ...).
template <typename U, typename T>
Ptr<U> ptr_cast(const Ptr<T>& p) {
  return Ptr<U>(reinterpret_cast<U*>(p.raw()), p.region(), p.generation());
}

// The first byte of a region.
void* region_data(Region* region);

// A `__shared__ T name[count]` declaration: one array per block, made on the first use in the
// block. Kernels declare it through RNNFUSED_SHARED_ARRAY (csrc/cuda/device.cuh).
class SharedDecl {
 public:
  SharedDecl(const char* name, size_t bytes);
  template <typename T>
  Ptr<T> get() const {
    Region* region = block_shared_region(id_, name_, bytes_);
    return Ptr<T>(static_cast<T*>(region_data(region)), region, 1);
  }

 private:
  static Region* block_shared_region(int id, const char* name, size_t bytes);
  int id_;
  const char* name_;
  size_t bytes_;
};

// The block's dynamic shared memory (the launch's shared-memory size), as `T`.
Region* dynamic_shared_region();
template <typename T>
Ptr<T> dynamic_shared() {
  Region* region = dynamic_shared_region();
  return Ptr<T>(static_cast<T*>(region_data(region)), region, 1);
}

// ---------------------------------------------------------------------------------------------
// Threads, barriers, warp operations
// ---------------------------------------------------------------------------------------------

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void sync_block();                  // __syncthreads
void sync_warp(uint32_t mask);      // __syncwarp
void sync_grid();                   // cooperative_groups::this_grid().sync()

enum class Shuffle : uint8_t { Index, Up, Down, Xor };
// One 32-bit or 64-bit lane value through a shuffle (the value's bits, zero-extended).
uint64_t shuffle(Shuffle kind, uint32_t mask, uint64_t bits, int lane_or_delta, int width);
enum class Vote : uint8_t { Ballot, Any, All };
uint32_t vote(Vote kind, uint32_t mask, bool predicate);

// D = A B + C on one warp, m16n8k16, A row-major and B column-major fragments of 16-bit values
// (bfloat16 or float16) packed two per 32-bit register, C and D float.
enum class MmaInput : uint8_t { BFloat16, Float16 };
void mma_m16n8k16(MmaInput input, float* d, const uint32_t* a, const uint32_t* b, const float* c);

// Atomic read-modify-write of one element (the simulator runs one thread at a time, so this is
// an ordinary update, recorded as atomic for the race checks).
template <typename T, typename F>
T atomic_update(const Ptr<T>& p, F&& update) {
  check_access(p.region(), p.generation(), p.raw(), sizeof(T), alignof(T), Access::Atomic);
  const T old = *p.raw();
  *p.raw() = update(old);
  return old;
}

// ---------------------------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------------------------

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  bool cooperative = false;
};

// Runs `body` (the kernel called with its arguments) once per thread of the launch and returns
// when all have finished. Errors (bad configuration, a failed check in any thread) are thrown as
// c10::Error after the launch is abandoned.
void launch(const char* kernel, const LaunchConfig& config, const std::function<void()>& body);

// The most blocks of `threads` threads with `shared_bytes` of dynamic shared memory that are
// resident at once on the simulated device: the largest grid of a cooperative launch.
int64_t max_cooperative_blocks(int64_t threads, size_t shared_bytes);

// Installs the allocator that registers every CPU allocation as global device memory. Called
// when the simulator's extension loads.
void install_tracking_allocator();

// How many launches have run (a testing aid: proves that a path went through the simulator).
uint64_t launch_count();
// The name of the latest kernel launched.
std::string last_kernel();

}  // namespace rnnfused::sim

// ---------------------------------------------------------------------------------------------
// The CUDA built-ins, as kernels write them
// ---------------------------------------------------------------------------------------------

#define threadIdx (::rnnfused::sim::thread_idx())
#define blockIdx (::rnnfused::sim::block_idx())
#define blockDim (::rnnfused::sim::block_dim())
#define gridDim (::rnnfused::sim::grid_dim())
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

inline void __syncthreads() { ::rnnfused::sim::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::rnnfused::sim::sync_warp(mask); }
inline void __threadfence() {}
template <typename T>
T __ldg(const ::rnnfused::sim::Ptr<const T>& p) {
  return p[0];
}
inline void __threadfence_block() {}

namespace rnnfused::sim {
template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32-bit or 64-bit values");
  uint64_t bits = 0;
  __builtin_memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  __builtin_memcpy(&v, &bits, sizeof(T));
  return v;
}
}  // namespace rnnfused::sim

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  using namespace ::rnnfused::sim;
  return from_bits<T>(shuffle(Shuffle::Index, mask, to_bits(v), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::rnnfused::sim;
  return from_bits<T>(shuffle(Shuffle::Up, mask, to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace ::rnnfused::sim;
  return from_bits<T>(shuffle(Shuffle::Down, mask, to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace ::rnnfused::sim;
  return from_bits<T>(shuffle(Shuffle::Xor, mask, to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::rnnfused::sim::vote(::rnnfused::sim::Vote::Ballot, mask, predicate != 0);
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(::rnnfused::sim::vote(::rnnfused::sim::Vote::Any, mask, predicate != 0));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(::rnnfused::sim::vote(::rnnfused::sim::Vote::All, mask, predicate != 0));
}

template <typename T>
T atomicAdd(const ::rnnfused::sim::Ptr<T>& p, T v) {
  return ::rnnfused::sim::atomic_update(p, [v](T old) { return old + v; });
}
template <typename T>
T atomicMax(const ::rnnfused::sim::Ptr<T>& p, T v) {
  return ::rnnfused::sim::atomic_update(p, [v](T old) { return old < v ? v : old; });
}
template <typename T>
T atomicMin(const ::rnnfused::sim::Ptr<T>& p, T v) {
  return ::rnnfused::sim::atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <typename T>
T atomicExch(const ::rnnfused::sim::Ptr<T>& p, T v) {
  return ::rnnfused::sim::atomic_update(p, [v](T) { return v; });
}
template <typename T>
T atomicCAS(const ::rnnfused::sim::Ptr<T>& p, T compare, T v) {
  return ::rnnfused::sim::atomic_update(p, [compare, v](T old) { return old == compare ? v : old; });
}
