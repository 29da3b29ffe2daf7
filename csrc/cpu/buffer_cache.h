// Large per-call buffers of the CPU ops (outputs, workspaces and gradients with a row per
// sequence element: tens to hundreds of megabytes), kept for the next call instead of returned to
// the operating system.
//
// Why: glibc serves an allocation of more than 32 MiB (its largest mmap threshold) with a fresh
// mmap and returns it with munmap when it is freed, so every call of a training loop faults each
// 4 KiB page of its buffers in again, zeroed by the kernel, on first touch. On an AMD EPYC (Zen 3,
// 2 threads, 2026-11-30) an LSTM's training forward at T = 100, B = 64, H = 512 took 1970 us per
// step with a fresh 65 MB workspace per call and 1399 us where glibc was told to keep its memory
// (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_), against 1272 us for the eval forward, which
// writes no workspace; its forward+backward went from about 1050 to 817 ms the same way.
//
// How: a tensor of at least kRecycledMinBytes is allocated through RecyclingAllocator. When its
// storage is freed, the block goes back to a list of free blocks instead of to the system, and
// the next request it fits (its capacity at least the size asked and at most a quarter more, plus
// one 2 MiB page) takes it. Blocks are whole 2 MiB pages, aligned to them and, on Linux, marked
// MADV_HUGEPAGE (where transparent huge pages are enabled, a first touch faults 2 MiB at a time).
// The free blocks held are capped (RNNFUSED_CPU_BUFFER_CACHE_MB, default 1024; 0 turns the cache
// off): a block freed past the cap goes back to the system, and a request that no free block fits
// first frees the blocks freed longest ago until the new block would fit under the cap.
// rnnfused.empty_cpu_cache() returns every free block at once. The contents of a recycled block
// are whatever its last tensor left there, as at::empty's are undefined: every caller writes all
// of it before reading.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

namespace rnnfused::cpu {

// Smaller tensors go to at::empty: glibc serves them from its heap and keeps their pages.
constexpr int64_t kRecycledMinBytes = int64_t{4} << 20;

// at::empty(sizes, options) (CPU, contiguous) through the recycling allocator when it is at
// least kRecycledMinBytes.
at::Tensor empty_recycled(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes of free blocks held, bytes of blocks lent to live tensors, and the cap on the first.
struct BufferCacheStats {
  int64_t held_bytes = 0;
  int64_t lent_bytes = 0;
  int64_t limit_bytes = 0;
  int64_t reuses = 0;  // requests served by a held block since the start
};
BufferCacheStats buffer_cache_stats();
// Returns every free block to the system.
void empty_buffer_cache();
// Sets the cap (bytes; 0 turns recycling off and frees the blocks held).
void set_buffer_cache_limit(int64_t bytes);
// Testing hook: while on, every block the cache hands out (new or reused) is first filled with
// 0xFF bytes (NaN in float32, float64 and bfloat16), so that a test sees any element an op reads
// before writing, or leaves unwritten.
void set_buffer_cache_poison(bool on);

}  // namespace rnnfused::cpu
