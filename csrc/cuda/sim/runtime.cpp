// The CUDA simulator's scheduler, checks and memory registry (see runtime.h for the model).
#include "runtime.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <iomanip>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace rnnfused::sim {

DeviceConfig& config() {
  static DeviceConfig c;
  return c;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Fibers: one stack per simulated thread, switched cooperatively on the host thread
// ---------------------------------------------------------------------------------------------

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;  // an unmapped page below each stack: overflow faults

#if defined(__x86_64__)
// rnnfused_sim_switch(save, next): saves the callee-saved registers, the SSE and x87 control
// words and the stack pointer into *save, then resumes the fiber whose stack pointer is `next`.
asm(R"(
  .text
  .p2align 4
  .globl rnnfused_sim_switch
  .hidden rnnfused_sim_switch
  .type rnnfused_sim_switch,@function
rnnfused_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rnnfused_sim_switch, .-rnnfused_sim_switch
)");
extern "C" void rnnfused_sim_switch(void** save, void* next);
#endif

struct Fiber {
  char* stack = nullptr;  // lowest usable byte (above the guard page)
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

// Per host thread: launches run on the thread that makes them, so two host threads never share a
// stack (or any other launch state, all of it thread_local below).
std::vector<char*>& stack_pool() {
  thread_local std::vector<char*> pool;
  return pool;
}

char* take_stack() {
  auto& pool = stack_pool();
  if (!pool.empty()) {
    char* s = pool.back();
    pool.pop_back();
    return s;
  }
  void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(mem != MAP_FAILED, "rnnfused CUDA simulator: cannot map a thread stack");
  mprotect(mem, kGuardBytes, PROT_NONE);
  return static_cast<char*>(mem) + kGuardBytes;
}

void give_back_stack(char* s) { stack_pool().push_back(s); }

// ---------------------------------------------------------------------------------------------
// Launch state
// ---------------------------------------------------------------------------------------------

enum class Wait : uint8_t { Running, Block, Warp, Grid, Done };
enum class WarpOp : uint8_t { Sync, Shuffle, Vote, Mma };

const char* warp_op_name(WarpOp op, Shuffle shuffle, Vote vote) {
  switch (op) {
    case WarpOp::Sync:
      return "__syncwarp";
    case WarpOp::Mma:
      return "mma.sync m16n8k16";
    case WarpOp::Vote:
      return vote == Vote::Ballot ? "__ballot_sync" : vote == Vote::Any ? "__any_sync" : "__all_sync";
    case WarpOp::Shuffle:
      switch (shuffle) {
        case Shuffle::Index:
          return "__shfl_sync";
        case Shuffle::Up:
          return "__shfl_up_sync";
        case Shuffle::Down:
          return "__shfl_down_sync";
        case Shuffle::Xor:
          return "__shfl_xor_sync";
      }
  }
  return "?";
}

struct Block;

struct Thread {
  Fiber fiber;
  dim3 idx;
  uint32_t linear = 0;  // within the block
  uint32_t global = 0;  // block linear * threads per block + linear
  int warp = 0, lane = 0;
  Block* block = nullptr;
  Wait wait = Wait::Running;
  // The warp operation this thread waits in, and its operands / result.
  WarpOp op = WarpOp::Sync;
  Shuffle shuffle_kind = Shuffle::Index;
  Vote vote_kind = Vote::Ballot;
  uint32_t mask = 0;
  uint64_t bits = 0;
  int arg = 0, width = 32;
  bool predicate = false;
  uint64_t result = 0;
  MmaInput mma_input = MmaInput::BFloat16;
  const uint32_t* mma_a = nullptr;
  const uint32_t* mma_b = nullptr;
  const float* mma_c = nullptr;
  float* mma_d = nullptr;
  // Vector clock of the warp's lanes, for the race checks: `clock` numbers this lane's stretches
  // between the warp operations it takes part in; seen[l] is the latest stretch of lane l that is
  // ordered before this lane's present one (through warp operations they took part in, directly
  // or by way of other lanes).
  uint32_t clock = 1;
  uint32_t seen[32] = {};
};

// A warp operation that some lanes have reached and others not yet.
struct PendingWarpOp {
  WarpOp op;
  Shuffle shuffle_kind;
  Vote vote_kind;
  uint32_t mask;
  uint32_t arrived;
};

struct WarpState {
  uint32_t existing = 0;  // lanes the block has in this warp
  uint32_t exited = 0;
  std::vector<PendingWarpOp> pending;
};

}  // namespace

struct Region {
  char* base = nullptr;
  size_t bytes = 0;
  Space space = Space::Global;
  std::string name;  // shared arrays: their declared name
  uint64_t generation = 0;
  bool live = true;
  struct Stamp {
    uint32_t thread, grid, block, warp;
  };
  struct Cell {
    // The last write, and the last reads by two different threads (most recent first).
    uint32_t write_launch = 0, read_launch[2] = {0, 0};
    Stamp write{}, read[2]{};
    bool write_atomic = false;
  };
  std::vector<Cell> shadow;  // one cell per 2-byte granule, made on the first checked access
};

namespace {

struct Block {
  dim3 idx;
  uint32_t linear = 0;
  std::vector<Thread> threads;
  std::vector<WarpState> warps;
  uint32_t epoch = 0;     // completed __syncthreads
  int arrived = 0;        // threads waiting at __syncthreads
  int exited = 0;
  std::map<int, std::unique_ptr<Region>> shared;  // by declaration
  // The first read of shared memory that no thread had written. Reported when the block's next
  // barrier completes or the block ends, unless a write by another thread turns out to race
  // with it first (the usual cause: a missing __syncthreads between the write and the read).
  struct UninitializedRead {
    const Region* region = nullptr;
    std::ptrdiff_t offset = 0;
    uint32_t thread = 0;
  } uninitialized_read;
  size_t static_shared_bytes = 0;
  std::unique_ptr<Region> dynamic_shared;
};

struct Launch {
  const char* kernel = "";
  LaunchConfig cfg;
  uint32_t id = 0;
  uint32_t threads_per_block = 0;
  uint32_t total_threads = 0;  // of the blocks alive at once (the grid, when cooperative)
  uint32_t grid_epoch = 0;
  uint32_t grid_arrived = 0;
  uint32_t grid_exited = 0;
  const std::function<void()>* body = nullptr;
  std::deque<Thread*> runnable;
  std::vector<std::unique_ptr<Block>> blocks;  // alive now
  std::string error;
};

thread_local Launch* g_launch = nullptr;
thread_local Thread* g_thread = nullptr;
#if defined(__x86_64__)
thread_local void* g_scheduler_sp = nullptr;
#else
thread_local ucontext_t g_scheduler_context;
#endif

std::atomic<uint32_t> g_launch_ids{0};
std::atomic<uint64_t> g_launch_count{0};
std::string g_last_kernel;  // the name of the latest launch (tests check which kernel a path ran)

std::string fmt(const dim3& d) {
  std::ostringstream s;
  s << "(" << d.x << "," << d.y << "," << d.z << ")";
  return s.str();
}

std::string hex(uint32_t mask) {
  std::ostringstream s;
  s << "0x" << std::hex << std::setfill('0');
  s.width(8);
  s << mask;
  return s.str();
}

dim3 unflatten(uint32_t linear, const dim3& extent) {
  return dim3(linear % extent.x, (linear / extent.x) % extent.y, linear / (extent.x * extent.y));
}

std::string where(const Thread* t) {
  std::ostringstream s;
  s << "kernel " << g_launch->kernel << ", block " << fmt(t->block->idx) << ", thread " << fmt(t->idx);
  return s.str();
}

// A failed check inside a simulated thread: unwinds the thread's own stack to its entry, which
// records the message and abandons the launch.
[[noreturn]] void fail(const std::string& what) {
  if (g_thread == nullptr) throw std::runtime_error("rnnfused CUDA simulator: " + what);
  throw std::runtime_error("rnnfused CUDA simulator: " + where(g_thread) + ": " + what);
}

// A launch-wide error (no single thread to name): "rnnfused CUDA simulator: kernel K: what".
std::string launch_error(const std::string& what) {
  return "rnnfused CUDA simulator: kernel " + std::string(g_launch->kernel) + ": " + what;
}

void record_error(const std::string& what) {
  if (g_launch->error.empty()) g_launch->error = launch_error(what);
}

Thread* current(const char* what) {
  if (g_thread == nullptr) {
    throw std::runtime_error(std::string("rnnfused CUDA simulator: ") + what + " called outside a kernel");
  }
  return g_thread;
}

void yield(Thread* t) {
#if defined(__x86_64__)
  rnnfused_sim_switch(&t->fiber.sp, g_scheduler_sp);
#else
  swapcontext(&t->fiber.context, &g_scheduler_context);
#endif
}

void resume(Thread* t) {
  g_thread = t;
#if defined(__x86_64__)
  rnnfused_sim_switch(&g_scheduler_sp, t->fiber.sp);
#else
  swapcontext(&g_scheduler_context, &t->fiber.context);
#endif
  g_thread = nullptr;
}

void wake(Thread* t) {
  t->wait = Wait::Running;
  g_launch->runnable.push_back(t);
}

// Bookkeeping of a thread that returned from the kernel: anyone still waiting for it never
// gets it, which on a GPU hangs or corrupts; here it is the launch's error.
void thread_exited(Thread* t) {
  Block& b = *t->block;
  Launch& L = *g_launch;
  WarpState& w = b.warps[t->warp];
  b.exited++;
  w.exited |= 1u << t->lane;
  L.grid_exited++;
  std::ostringstream s;
  s << "thread " << fmt(t->idx) << " of block " << fmt(b.idx) << " exited while ";
  if (b.arrived > 0) {
    s << b.arrived << " threads of its block wait at __syncthreads(); every thread of the block must reach "
                      "each __syncthreads() (a barrier in divergent code hangs or corrupts on a GPU)";
    record_error(s.str());
    return;
  }
  for (const PendingWarpOp& p : w.pending) {
    if (p.mask & (1u << t->lane)) {
      s << "lanes " << hex(p.arrived) << " of its warp wait for it in "
        << warp_op_name(p.op, p.shuffle_kind, p.vote_kind) << " with mask " << hex(p.mask)
        << "; every lane named in the mask must take part (wrong lane mask?)";
      record_error(s.str());
      return;
    }
  }
  if (L.grid_arrived > 0) {
    s << L.grid_arrived << " threads wait at the grid-wide barrier; every thread of every block must reach it";
    record_error(s.str());
  }
}

[[noreturn]] void fiber_main() {
  Thread* t = g_thread;
  try {
    (*g_launch->body)();
  } catch (const std::exception& e) {
    if (g_launch->error.empty()) g_launch->error = e.what();
  } catch (...) {
    if (g_launch->error.empty()) g_launch->error = "rnnfused CUDA simulator: unknown exception in a kernel";
  }
  thread_exited(t);
  t->wait = Wait::Done;
  yield(t);
  std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
void fiber_entry_trampoline() { fiber_main(); }
#endif

void start_fiber(Thread* t) {
  t->fiber.stack = take_stack();
#if defined(__x86_64__)
  // The stack as rnnfused_sim_switch leaves it, so that its `ret` enters fiber_main with the
  // alignment of a call: [control words][r15 r14 r13 r12 rbx rbp][fiber_main][0].
  auto top = reinterpret_cast<uintptr_t>(t->fiber.stack + kStackBytes) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top - 16);  // 16-byte aligned: rsp + 8 after `ret`
  slot[1] = 0;
  slot[0] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 1; i <= 6; ++i) slot[-i] = 0;
  uint32_t control[2] = {0x1F80u, 0x037Fu};  // MXCSR and x87 control word defaults
  std::memcpy(&slot[-7], control, sizeof(control));
  t->fiber.sp = &slot[-7];
#else
  getcontext(&t->fiber.context);
  t->fiber.context.uc_stack.ss_sp = t->fiber.stack;
  t->fiber.context.uc_stack.ss_size = kStackBytes;
  t->fiber.context.uc_link = nullptr;
  makecontext(&t->fiber.context, fiber_entry_trampoline, 0);
#endif
}

std::unique_ptr<Block> make_block(Launch& L, uint32_t linear) {
  auto b = std::make_unique<Block>();
  b->linear = linear;
  b->idx = unflatten(linear, L.cfg.grid);
  const uint32_t n = L.threads_per_block;
  b->threads.resize(n);
  b->warps.resize((n + 31) / 32);
  for (uint32_t i = 0; i < n; ++i) {
    Thread& t = b->threads[i];
    t.idx = unflatten(i, L.cfg.block);
    t.linear = i;
    t.global = linear * n + i;
    t.warp = static_cast<int>(i / 32);
    t.lane = static_cast<int>(i % 32);
    t.block = b.get();
    b->warps[t.warp].existing |= 1u << t.lane;
  }
  b->dynamic_shared = std::make_unique<Region>();
  Region& d = *b->dynamic_shared;
  d.space = Space::Shared;
  d.name = "dynamic shared memory";
  d.generation = 1;
  d.bytes = L.cfg.shared_bytes;
  d.base = d.bytes ? static_cast<char*>(std::malloc(d.bytes)) : nullptr;
  if (d.base) std::memset(d.base, 0xA5, d.bytes);  // garbage, as on a GPU
  return b;
}

void free_block(Block& b) {
  for (Thread& t : b.threads) {
    if (t.fiber.stack) give_back_stack(t.fiber.stack);
    t.fiber.stack = nullptr;
  }
  for (auto& entry : b.shared) std::free(entry.second->base);
  if (b.dynamic_shared) std::free(b.dynamic_shared->base);
}

std::string describe_waits(Launch& L) {
  std::ostringstream s;
  int shown = 0;
  for (auto& bp : L.blocks) {
    for (Thread& t : bp->threads) {
      if (t.wait == Wait::Done || t.wait == Wait::Running) continue;
      if (shown++ == 4) {
        s << "; ...";
        return s.str();
      }
      s << (shown > 1 ? "; " : "") << "thread " << fmt(t.idx) << " of block " << fmt(bp->idx) << " waits at ";
      if (t.wait == Wait::Block) s << "__syncthreads()";
      if (t.wait == Wait::Grid) s << "the grid-wide barrier";
      if (t.wait == Wait::Warp) s << warp_op_name(t.op, t.shuffle_kind, t.vote_kind) << " with mask " << hex(t.mask);
    }
  }
  return s.str();
}

void run(Launch& L) {
  while (!L.runnable.empty() && L.error.empty()) {
    Thread* t = L.runnable.front();
    L.runnable.pop_front();
    resume(t);
  }
  if (!L.error.empty()) return;
  for (auto& bp : L.blocks) {
    for (Thread& t : bp->threads) {
      if (t.wait != Wait::Done) {
        L.error = launch_error("deadlock, no thread can go on (it would hang on a GPU): " + describe_waits(L));
        return;
      }
    }
  }
}

std::string who(uint32_t global);
std::string region_name(const Region* r);

// The block's pending uninitialized read, as an error message ("" if none).
std::string uninitialized_read_error(Block& b) {
  const Block::UninitializedRead& u = b.uninitialized_read;
  if (u.region == nullptr) return "";
  return who(u.thread) + " reads " + region_name(u.region) + " at byte offset " + std::to_string(u.offset) +
         " that no thread of the block has written (uninitialized shared memory)";
}

Region::Stamp stamp_of(const Thread* t) { return {t->global, g_launch->grid_epoch, t->block->epoch, t->clock}; }

// Whether an earlier access `a` happens before the access `b` that thread `now` makes: the same
// thread, or a barrier between them that both took part in (the grid barrier, __syncthreads, or
// a chain of warp operations from a's lane to now's).
bool ordered(const Region::Stamp& a, const Region::Stamp& b, const Thread* now) {
  if (a.thread == b.thread || a.grid < b.grid) return true;
  const uint32_t tpb = g_launch->threads_per_block;
  if (a.thread / tpb != b.thread / tpb) return false;
  if (a.block < b.block) return true;
  const uint32_t a_in_block = a.thread % tpb;
  return a_in_block / 32 == now->linear / 32 && now->seen[a_in_block % 32] >= a.warp;
}

std::string who(uint32_t global) {
  const Launch& L = *g_launch;
  const uint32_t tpb = L.threads_per_block;
  return "thread " + fmt(unflatten(global % tpb, L.cfg.block)) + " of block " +
         fmt(unflatten(global / tpb, L.cfg.grid));
}

std::string region_name(const Region* r) {
  if (r->space == Space::Shared) return "shared memory '" + r->name + "'";
  return "global memory (an allocation of " + std::to_string(r->bytes) + " bytes)";
}

const char* access_name(Access kind) {
  return kind == Access::Read ? "reads" : kind == Access::Write ? "writes" : "atomically updates";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Memory registry and the tracking allocator
// ---------------------------------------------------------------------------------------------

namespace {

std::mutex g_regions_mutex;
std::map<uintptr_t, Region*> g_live_regions;  // by base address
std::vector<Region*> g_free_regions;
uint64_t g_generations = 1;

void register_global(void* base, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_regions_mutex);
  Region* r;
  if (!g_free_regions.empty()) {
    r = g_free_regions.back();
    g_free_regions.pop_back();
  } else {
    r = new Region();
  }
  r->base = static_cast<char*>(base);
  r->bytes = bytes;
  r->space = Space::Global;
  r->generation = ++g_generations;
  r->live = true;
  r->shadow.clear();
  g_live_regions[reinterpret_cast<uintptr_t>(base)] = r;
}

void unregister_global(void* base) {
  std::lock_guard<std::mutex> lock(g_regions_mutex);
  auto it = g_live_regions.find(reinterpret_cast<uintptr_t>(base));
  if (it == g_live_regions.end()) return;
  Region* r = it->second;
  g_live_regions.erase(it);
  r->live = false;
  r->shadow.clear();
  r->shadow.shrink_to_fit();
  g_free_regions.push_back(r);
}

// Registers each allocation as a region of global device memory. Its data pointers are "simple"
// (context == data, a raw deleter), as ATen's CPU kernels (oneDNN's among them) require of the
// CPU allocator, so the deleter finds the region by address.
class TrackingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* data = c10::alloc_cpu(n);
    if (data) register_global(data, n);
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  static void release(void* data) {
    if (data == nullptr) return;
    unregister_global(data);
    c10::free_cpu(data);
  }
};

}  // namespace

void install_tracking_allocator() {
  static TrackingAllocator allocator;
  static std::once_flag once;
  std::call_once(once, [] { c10::SetCPUAllocator(&allocator, /*priority=*/100); });
}

Region* find_global_region(const void* p, uint64_t* generation) {
  std::lock_guard<std::mutex> lock(g_regions_mutex);
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = g_live_regions.upper_bound(addr);
  if (it == g_live_regions.begin()) return nullptr;
  --it;
  Region* r = it->second;
  if (addr > it->first + r->bytes) return nullptr;  // one past the end still belongs to it
  *generation = r->generation;
  return r;
}

void check_access(const Region* region_c, uint64_t generation, const void* addr, size_t bytes, size_t align,
                  Access kind) {
  auto* r = const_cast<Region*>(region_c);
  if (r == nullptr) {
    std::ostringstream s;
    s << access_name(kind) << " " << bytes << " bytes at " << addr
      << " through a pointer into no device allocation (null, host memory, or never allocated)";
    fail(s.str());
  }
  if (!r->live || r->generation != generation) fail(std::string(access_name(kind)) + " memory that has been freed");
  const auto* p = static_cast<const char*>(addr);
  const std::ptrdiff_t offset = p - r->base;
  if (offset < 0 || static_cast<size_t>(offset) + bytes > r->bytes) {
    std::ostringstream s;
    s << (r->space == Space::Shared ? "shared" : "global") << " memory access out of bounds: " << access_name(kind)
      << " " << bytes << " bytes at byte offset " << offset << " of " << region_name(r) << " ("
      << (offset < 0 ? "before its start" : "past its end") << ")";
    fail(s.str());
  }
  if (reinterpret_cast<uintptr_t>(addr) % align != 0) {
    std::ostringstream s;
    s << "misaligned access: " << access_name(kind) << " " << bytes << " bytes at byte offset " << offset << " of "
      << region_name(r) << ", which is not a multiple of their alignment " << align;
    fail(s.str());
  }
  Thread* t = g_thread;
  if (t == nullptr) return;  // host code: bounds only
  if (r->space == Space::Global && !config().check_global_races) return;
  if (r->shadow.empty()) r->shadow.resize((r->bytes + 1) / 2);
  const Region::Stamp now = stamp_of(t);
  const uint32_t launch = g_launch->id;
  const size_t first = static_cast<size_t>(offset) / 2, last = (static_cast<size_t>(offset) + bytes - 1) / 2;
  for (size_t g = first; g <= last; ++g) {
    Region::Cell& c = r->shadow[g];
    const bool written = c.write_launch == launch;
    if (r->space == Space::Shared && kind == Access::Read && c.write_launch == 0 &&
        t->block->uninitialized_read.region == nullptr) {
      t->block->uninitialized_read = {r, offset, t->global};
    }
    auto race = [&](const Region::Stamp& other, const char* other_did) {
      std::ostringstream s;
      s << "race on " << region_name(r) << " at byte offset " << g * 2 << ": this thread " << access_name(kind)
        << " it, and " << who(other.thread) << " " << other_did
        << " it with no barrier between the two (__syncthreads, __syncwarp or the grid barrier)";
      fail(s.str());
    };
    if (written && !ordered(c.write, now, t) && !(c.write_atomic && kind == Access::Atomic)) {
      race(c.write, c.write_atomic ? "atomically updated" : "wrote");
    }
    if (kind == Access::Read) {
      if (c.read_launch[0] != launch || c.read[0].thread != now.thread) {
        c.read_launch[1] = c.read_launch[0];
        c.read[1] = c.read[0];
      }
      c.read_launch[0] = launch;
      c.read[0] = now;
    } else {
      for (int i = 0; i < 2; ++i) {
        if (c.read_launch[i] == launch && !ordered(c.read[i], now, t)) race(c.read[i], "read");
      }
      c.write_launch = launch;
      c.write = now;
      c.write_atomic = kind == Access::Atomic;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Shared memory
// ---------------------------------------------------------------------------------------------

namespace {
std::atomic<int> g_shared_ids{0};
}

SharedDecl::SharedDecl(const char* name, size_t bytes) : id_(g_shared_ids++), name_(name), bytes_(bytes) {}

Region* SharedDecl::block_shared_region(int id, const char* name, size_t bytes) {
  Thread* t = current("a __shared__ array");
  Block& b = *t->block;
  auto it = b.shared.find(id);
  if (it != b.shared.end()) return it->second.get();
  b.static_shared_bytes += bytes;
  if (b.static_shared_bytes > config().static_shared_per_block) {
    fail("static shared memory of the block exceeds " + std::to_string(config().static_shared_per_block) +
         " bytes (declaring '" + name + "')");
  }
  if (b.static_shared_bytes + g_launch->cfg.shared_bytes > config().shared_per_block) {
    fail("static + dynamic shared memory of the block exceeds " + std::to_string(config().shared_per_block) + " bytes");
  }
  auto r = std::make_unique<Region>();
  r->space = Space::Shared;
  r->name = name;
  r->generation = 1;
  r->bytes = bytes;
  r->base = bytes ? static_cast<char*>(std::malloc(bytes)) : nullptr;
  if (r->base) std::memset(r->base, 0xA5, bytes);
  Region* raw = r.get();
  b.shared.emplace(id, std::move(r));
  return raw;
}


Region* dynamic_shared_region() { return current("dynamic shared memory")->block->dynamic_shared.get(); }

void* region_data(Region* region) { return region->base; }

// ---------------------------------------------------------------------------------------------
// Indices and barriers
// ---------------------------------------------------------------------------------------------

const dim3& thread_idx() { return current("threadIdx")->idx; }
const dim3& block_idx() { return current("blockIdx")->block->idx; }
const dim3& block_dim() {
  current("blockDim");
  return g_launch->cfg.block;
}
const dim3& grid_dim() {
  current("gridDim");
  return g_launch->cfg.grid;
}

void sync_block() {
  Thread* t = current("__syncthreads");
  Block& b = *t->block;
  if (b.exited > 0) {
    fail("__syncthreads() is not reached by every thread of the block: " + std::to_string(b.exited) +
         " threads have already exited (a barrier in divergent code hangs or corrupts on a GPU)");
  }
  if (++b.arrived == static_cast<int>(b.threads.size())) {
    const std::string uninitialized = uninitialized_read_error(b);
    if (!uninitialized.empty()) throw std::runtime_error(launch_error(uninitialized));
    b.arrived = 0;
    b.epoch++;
    for (Thread& other : b.threads) {
      if (other.wait == Wait::Block) wake(&other);
    }
    return;
  }
  t->wait = Wait::Block;
  yield(t);
}

void sync_grid() {
  Thread* t = current("the grid-wide barrier");
  Launch& L = *g_launch;
  if (!L.cfg.cooperative) {
    fail("grid-wide barrier in a launch that is not cooperative: its blocks need not be co-resident, so the "
         "barrier can hang; launch the kernel cooperatively");
  }
  if (L.grid_exited > 0) {
    fail("the grid-wide barrier is not reached by every thread of the grid: " + std::to_string(L.grid_exited) +
         " threads have already exited");
  }
  if (++L.grid_arrived == L.total_threads) {
    L.grid_arrived = 0;
    L.grid_epoch++;
    for (auto& bp : L.blocks) {
      for (Thread& other : bp->threads) {
        if (other.wait == Wait::Grid) wake(&other);
      }
    }
    return;
  }
  t->wait = Wait::Grid;
  yield(t);
}

// ---------------------------------------------------------------------------------------------
// Warp operations
// ---------------------------------------------------------------------------------------------

namespace {

float unpack_half(uint32_t reg, int half, MmaInput input) {
  const auto bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xFFFFu);
  if (input == MmaInput::BFloat16) {
    const uint32_t f = static_cast<uint32_t>(bits) << 16;
    float v;
    std::memcpy(&v, &f, sizeof(v));
    return v;
  }
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// The m16n8k16 product over the warp's fragments, in the layouts of the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type"); groupID = lane / 4,
// threadID_in_group = lane % 4:
//   A (16x16, row): register j holds a[2j], a[2j+1] (low half first) at
//        row = groupID + 8 * (j % 2), col = 2 * threadID_in_group + half + 8 * (j / 2)
//   B (16x8, col):  register j holds b[2j], b[2j+1] at
//        row = 2 * threadID_in_group + half + 8 * j, col = groupID
//   C, D (16x8):    element i at row = groupID + 8 * (i / 2), col = 2 * threadID_in_group + i % 2
void complete_mma(Block& b, int warp) {
  float A[16][16], B[16][8], C[16][8];
  Thread* lanes[32];
  for (int l = 0; l < 32; ++l) {
    Thread& t = b.threads[warp * 32 + l];
    lanes[l] = &t;
    const int group = l / 4, tig = l % 4;
    for (int j = 0; j < 4; ++j) {
      for (int h = 0; h < 2; ++h) {
        A[group + 8 * (j % 2)][2 * tig + h + 8 * (j / 2)] = unpack_half(t.mma_a[j], h, t.mma_input);
      }
    }
    for (int j = 0; j < 2; ++j) {
      for (int h = 0; h < 2; ++h) B[2 * tig + h + 8 * j][group] = unpack_half(t.mma_b[j], h, t.mma_input);
    }
    for (int i = 0; i < 4; ++i) C[group + 8 * (i / 2)][2 * tig + i % 2] = t.mma_c[i];
  }
  for (int l = 0; l < 32; ++l) {
    const int group = l / 4, tig = l % 4;
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const int row = group + 8 * (i / 2), col = 2 * tig + i % 2;
      float acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[i] = acc;
    }
    for (int i = 0; i < 4; ++i) lanes[l]->mma_d[i] = d[i];
  }
}

void complete(Block& b, int warp, const PendingWarpOp& p) {
  auto lane_thread = [&](int l) -> Thread& { return b.threads[warp * 32 + l]; };
  if (p.op == WarpOp::Mma) {
    complete_mma(b, warp);
    return;
  }
  if (p.op == WarpOp::Vote) {
    uint32_t ballot = 0;
    for (int l = 0; l < 32; ++l) {
      if ((p.mask >> l & 1) && lane_thread(l).predicate) ballot |= 1u << l;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(p.mask >> l & 1)) continue;
      Thread& t = lane_thread(l);
      t.result = p.vote_kind == Vote::Ballot ? ballot : p.vote_kind == Vote::Any ? (ballot != 0) : (ballot == p.mask);
    }
    return;
  }
  if (p.op != WarpOp::Shuffle) return;
  for (int l = 0; l < 32; ++l) {
    if (!(p.mask >> l & 1)) continue;
    Thread& t = lane_thread(l);
    const int width = t.width;
    const int segment = l & ~(width - 1);
    int src = l;
    switch (p.shuffle_kind) {
      case Shuffle::Index:
        src = segment + (t.arg & (width - 1));
        break;
      case Shuffle::Up:
        src = l - t.arg < segment ? l : l - t.arg;
        break;
      case Shuffle::Down:
        src = l + t.arg >= segment + width ? l : l + t.arg;
        break;
      case Shuffle::Xor:
        src = (l ^ t.arg) >= segment + width ? l : (l ^ t.arg);
        break;
    }
    if (src < 0 || src > 31 || !(p.mask >> src & 1)) {
      g_thread = &t;  // the error names the reading lane
      fail(std::string(warp_op_name(p.op, p.shuffle_kind, p.vote_kind)) + ": lane " + std::to_string(l) +
           " reads lane " + std::to_string(src) + ", which is not in the mask " + hex(p.mask) +
           " (its value is undefined)");
    }
    t.result = lane_thread(src).bits;
  }
}

// The calling lane arrives at a warp operation; returns once every lane of the mask has.
void warp_collective(Thread* t) {
  Block& b = *t->block;
  WarpState& w = b.warps[t->warp];
  const char* name = warp_op_name(t->op, t->shuffle_kind, t->vote_kind);
  const uint32_t self = 1u << t->lane;
  if (!(t->mask & self)) {
    fail(std::string(name) + " with mask " + hex(t->mask) + " called by lane " + std::to_string(t->lane) +
         ", which is not in the mask (wrong lane mask)");
  }
  if (t->mask & ~w.existing) {
    fail(std::string(name) + " with mask " + hex(t->mask) + " names lanes that this warp does not have (it has " +
         hex(w.existing) + ")");
  }
  if (t->mask & w.exited) {
    fail(std::string(name) + " with mask " + hex(t->mask) + " waits for lanes " + hex(t->mask & w.exited) +
         ", which have exited (wrong lane mask?)");
  }
  if (t->op == WarpOp::Shuffle && (t->width < 1 || t->width > 32 || (t->width & (t->width - 1)))) {
    fail(std::string(name) + ": width " + std::to_string(t->width) + " is not a power of two in [1, 32]");
  }
  if (t->op == WarpOp::Mma && t->mask != 0xFFFFFFFFu) {
    fail(std::string(name) + " must be executed by all 32 lanes of the warp (mask " + hex(t->mask) + ")");
  }
  PendingWarpOp* p = nullptr;
  for (PendingWarpOp& q : w.pending) {
    if (!(q.mask & t->mask)) continue;
    if (q.mask != t->mask || q.op != t->op || q.shuffle_kind != t->shuffle_kind || q.vote_kind != t->vote_kind) {
      fail("lanes of a warp meet at different warp operations: this lane calls " + std::string(name) + " with mask " +
           hex(t->mask) + ", while lanes " + hex(q.arrived) + " wait in " +
           warp_op_name(q.op, q.shuffle_kind, q.vote_kind) + " with mask " + hex(q.mask));
    }
    p = &q;
  }
  if (p == nullptr) {
    w.pending.push_back({t->op, t->shuffle_kind, t->vote_kind, t->mask, 0});
    p = &w.pending.back();
  }
  p->arrived |= self;
  if (p->arrived == p->mask) {
    const PendingWarpOp done = *p;
    w.pending.erase(w.pending.begin() + (p - w.pending.data()));
    complete(b, t->warp, done);
    g_thread = t;
    // After __syncwarp the lanes of the mask are ordered after everything each of them (and every
    // lane they had synchronized with) did before: merge their clocks, then start a new stretch
    // each. Shuffles, votes and mma exchange registers only; CUDA promises no memory ordering
    // for them, so neither does the simulator.
    uint32_t merged[32] = {};
    for (int l = 0; l < 32 && done.op == WarpOp::Sync; ++l) {
      if (!(done.mask >> l & 1)) continue;
      const Thread& lane = b.threads[t->warp * 32 + l];
      for (int k = 0; k < 32; ++k) merged[k] = std::max(merged[k], lane.seen[k]);
      merged[l] = std::max(merged[l], lane.clock);
    }
    for (int l = 0; l < 32 && done.op == WarpOp::Sync; ++l) {
      if (!(done.mask >> l & 1)) continue;
      Thread& lane = b.threads[t->warp * 32 + l];
      std::copy(std::begin(merged), std::end(merged), std::begin(lane.seen));
      lane.clock++;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(done.mask >> l & 1) || l == t->lane) continue;  // the mask names existing lanes only
      Thread& other = b.threads[t->warp * 32 + l];
      if (other.wait == Wait::Warp) wake(&other);
    }
    return;
  }
  t->wait = Wait::Warp;
  yield(t);
}

}  // namespace

void sync_warp(uint32_t mask) {
  Thread* t = current("__syncwarp");
  t->op = WarpOp::Sync;
  t->mask = mask;
  warp_collective(t);
}

uint64_t shuffle(Shuffle kind, uint32_t mask, uint64_t bits, int lane_or_delta, int width) {
  Thread* t = current("a warp shuffle");
  t->op = WarpOp::Shuffle;
  t->shuffle_kind = kind;
  t->mask = mask;
  t->bits = bits;
  t->arg = lane_or_delta;
  t->width = width;
  warp_collective(t);
  return t->result;
}

uint32_t vote(Vote kind, uint32_t mask, bool predicate) {
  Thread* t = current("a warp vote");
  t->op = WarpOp::Vote;
  t->vote_kind = kind;
  t->mask = mask;
  t->predicate = predicate;
  warp_collective(t);
  return static_cast<uint32_t>(t->result);
}

void mma_m16n8k16(MmaInput input, float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  Thread* t = current("mma.sync");
  t->op = WarpOp::Mma;
  t->mask = 0xFFFFFFFFu;
  t->mma_input = input;
  t->mma_a = a;
  t->mma_b = b;
  t->mma_c = c;
  t->mma_d = d;
  warp_collective(t);
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

uint64_t launch_count() { return g_launch_count; }
std::string last_kernel() { return g_last_kernel; }

int64_t max_cooperative_blocks(int64_t threads, size_t shared_bytes) {
  const DeviceConfig& dev = config();
  int64_t per_sm = threads > 0 ? dev.max_threads_per_sm / threads : 0;
  if (shared_bytes > 0) per_sm = std::min<int64_t>(per_sm, dev.shared_per_sm / shared_bytes);
  return per_sm * dev.sm_count;
}

void launch(const char* kernel, const LaunchConfig& cfg, const std::function<void()>& body) {
  TORCH_CHECK(g_launch == nullptr, "rnnfused CUDA simulator: kernel ", kernel,
              " launched from inside a kernel (dynamic parallelism is not simulated)");
  const DeviceConfig& dev = config();
  const uint64_t tpb = static_cast<uint64_t>(cfg.block.x) * cfg.block.y * cfg.block.z;
  const uint64_t blocks = static_cast<uint64_t>(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  TORCH_CHECK(tpb > 0 && blocks > 0, "rnnfused CUDA simulator: kernel ", kernel, ": launch with an empty grid ",
              fmt(cfg.grid), " or block ", fmt(cfg.block), " (cudaErrorInvalidConfiguration)");
  TORCH_CHECK(tpb <= static_cast<uint64_t>(dev.max_threads_per_block), "rnnfused CUDA simulator: kernel ", kernel,
              ": block of ", tpb, " threads exceeds ", dev.max_threads_per_block, " (cudaErrorInvalidConfiguration)");
  TORCH_CHECK(cfg.block.z <= 64 && cfg.grid.y <= 65535 && cfg.grid.z <= 65535, "rnnfused CUDA simulator: kernel ",
              kernel, ": grid ", fmt(cfg.grid), " or block ", fmt(cfg.block), " exceeds the CUDA limits");
  TORCH_CHECK(cfg.shared_bytes <= dev.shared_per_block, "rnnfused CUDA simulator: kernel ", kernel, ": ",
              cfg.shared_bytes, " bytes of dynamic shared memory exceed ", dev.shared_per_block);
  if (cfg.cooperative) {
    const int64_t fit = max_cooperative_blocks(static_cast<int64_t>(tpb), cfg.shared_bytes);
    TORCH_CHECK(static_cast<int64_t>(blocks) <= fit, "rnnfused CUDA simulator: cooperative launch of kernel ", kernel,
                " with ", blocks, " blocks of ", tpb, " threads: at most ", fit,
                " blocks fit on the device at once (cudaErrorCooperativeLaunchTooLarge)");
  }

  Launch L;
  L.kernel = kernel;
  L.cfg = cfg;
  L.id = ++g_launch_ids;
  if (L.id == 0) L.id = ++g_launch_ids;  // 0 marks "never" in the shadow
  L.threads_per_block = static_cast<uint32_t>(tpb);
  L.body = &body;
  ++g_launch_count;
  g_last_kernel = kernel;
  g_launch = &L;
  auto run_blocks = [&](uint32_t first, uint32_t count) {
    L.blocks.clear();
    for (uint32_t i = 0; i < count; ++i) L.blocks.push_back(make_block(L, first + i));
    L.total_threads = count * L.threads_per_block;
    L.grid_arrived = L.grid_exited = 0;
    for (auto& bp : L.blocks) {
      for (Thread& t : bp->threads) {
        start_fiber(&t);
        L.runnable.push_back(&t);
      }
    }
    run(L);
    for (auto& bp : L.blocks) {
      if (L.error.empty()) {
        const std::string uninitialized = uninitialized_read_error(*bp);
        if (!uninitialized.empty()) L.error = launch_error(uninitialized);
      }
    }
    L.runnable.clear();
    for (auto& bp : L.blocks) free_block(*bp);
    L.blocks.clear();
  };
  if (cfg.cooperative) {
    run_blocks(0, static_cast<uint32_t>(blocks));
  } else {
    for (uint32_t b = 0; b < blocks && L.error.empty(); ++b) run_blocks(b, 1);
  }
  g_launch = nullptr;
  g_thread = nullptr;
  TORCH_CHECK(L.error.empty(), L.error);
}

}  // namespace rnnfused::sim
