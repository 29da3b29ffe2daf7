// The recycling allocator of buffer_cache.h.
#include "buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Functions.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace rnnfused::cpu {
namespace {

// Blocks are whole huge pages (x86-64 Linux's transparent huge page size).
constexpr int64_t kBlockGranule = int64_t{2} << 20;

struct Block {
  void* ptr;
  int64_t capacity;
};

int64_t limit_from_environment() {
  const char* value = std::getenv("RNNFUSED_CPU_BUFFER_CACHE_MB");
  if (value == nullptr || *value == '\0') return int64_t{1024} << 20;
  char* end = nullptr;
  const long long megabytes = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && megabytes >= 0 && megabytes < (int64_t{1} << 40),
              "RNNFUSED_CPU_BUFFER_CACHE_MB must be a whole number of megabytes (0 turns the cache off), got '",
              value, "'");
  return static_cast<int64_t>(megabytes) << 20;
}

void free_block(const Block& block) { std::free(block.ptr); }

std::atomic<bool> poison_blocks{false};

class RecyclingAllocator final : public c10::Allocator {
 public:
  RecyclingAllocator() : limit_(limit_from_environment()) {}

  c10::DataPtr allocate(size_t bytes) override {
    const auto n = static_cast<int64_t>(bytes);
    // A resize_ of a recycled tensor's storage comes here too, at any size.
    if (n < kRecycledMinBytes) return c10::GetCPUAllocator()->allocate(bytes);
    const int64_t capacity = (n + kBlockGranule - 1) / kBlockGranule * kBlockGranule;
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest free block that fits without wasting more than a quarter (and a granule).
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->capacity >= n && it->capacity <= n + n / 4 + kBlockGranule &&
            (best == free_.end() || it->capacity < best->capacity)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        Block* block = new Block(*best);
        free_.erase(best);
        held_ -= block->capacity;
        lent_ += block->capacity;
        ++reuses_;
        return lend(block);
      }
      // A new block: make room under the cap for it to be kept when it comes back (a block
      // larger than the cap will not be kept, and leaves the held ones alone).
      if (capacity <= limit_) evict_locked(capacity, evicted);
      lent_ += capacity;
    }
    for (const Block& block : evicted) free_block(block);
    void* ptr = std::aligned_alloc(kBlockGranule, capacity);
    if (ptr == nullptr) {
      empty();
      ptr = std::aligned_alloc(kBlockGranule, capacity);
    }
    if (ptr == nullptr) {
      std::lock_guard<std::mutex> lock(mutex_);
      lent_ -= capacity;
    }
    TORCH_CHECK(ptr != nullptr, "rnnfused: out of memory: failed to allocate ", n, " bytes for a CPU buffer");
#ifdef __linux__
    // Best effort: where transparent huge pages are in "madvise" mode, a first touch then faults
    // 2 MiB at a time instead of 4 KiB.
    (void)madvise(ptr, static_cast<size_t>(capacity), MADV_HUGEPAGE);
#endif
    return lend(new Block{ptr, capacity});
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  BufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {held_, lent_, limit_, reuses_};
  }

  int64_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "rnnfused: the CPU buffer cache's limit must be >= 0 bytes, got ", bytes);
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      evict_locked(0, evicted);
    }
    for (const Block& block : evicted) free_block(block);
  }

  void empty() {
    std::list<Block> all;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
      held_ = 0;
    }
    for (const Block& block : all) free_block(block);
  }

 private:
  static c10::DataPtr lend(Block* block) {
    if (poison_blocks.load(std::memory_order_relaxed)) {
      std::memset(block->ptr, 0xFF, static_cast<size_t>(block->capacity));
    }
    return {block->ptr, block, &RecyclingAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  // Moves the free blocks released longest ago into `evicted` until `incoming` more bytes of
  // free blocks would stay within the cap.
  void evict_locked(int64_t incoming, std::vector<Block>& evicted) {
    while (!free_.empty() && held_ + incoming > limit_) {
      evicted.push_back(free_.front());
      held_ -= free_.front().capacity;
      free_.pop_front();
    }
  }

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    instance().give_back(*block);
    delete block;
  }

  void give_back(const Block& block) {
    std::vector<Block> evicted;
    bool keep = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      lent_ -= block.capacity;
      if (block.capacity <= limit_) {
        evict_locked(block.capacity, evicted);
        free_.push_back(block);
        held_ += block.capacity;
        keep = true;
      }
    }
    for (const Block& old : evicted) free_block(old);
    if (!keep) free_block(block);
  }

 public:
  // Never destroyed: tensors freed during the interpreter's shutdown still return their blocks.
  static RecyclingAllocator& instance() {
    static RecyclingAllocator* allocator = new RecyclingAllocator();
    return *allocator;
  }

 private:
  std::mutex mutex_;
  std::list<Block> free_;  // released longest ago first
  int64_t held_ = 0;
  int64_t lent_ = 0;
  int64_t limit_;
  int64_t reuses_ = 0;
};

}  // namespace

at::Tensor empty_recycled(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "empty_recycled: CPU tensors only");
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  RecyclingAllocator& allocator = RecyclingAllocator::instance();
  if (bytes < kRecycledMinBytes || allocator.limit() == 0) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

BufferCacheStats buffer_cache_stats() { return RecyclingAllocator::instance().stats(); }

void empty_buffer_cache() { RecyclingAllocator::instance().empty(); }

void set_buffer_cache_limit(int64_t bytes) { RecyclingAllocator::instance().set_limit(bytes); }

void set_buffer_cache_poison(bool on) { poison_blocks.store(on, std::memory_order_relaxed); }

}  // namespace rnnfused::cpu
