// The recurrence ops on CUDA: the same time loops as csrc/cpu/recurrence_cpu.cpp (which defines
// the semantics), with one cuBLAS GEMM per step (host.h's gemm_nt / gemm_nn straight into a
// preallocated buffer, on the current stream, honouring torch's TF32 setting) and one fused
// pointwise kernel per step (pointwise_kernels.cuh); an LSTM with a projection adds the W_hr
// GEMM and, in the forward, one small kernel (rounding h_t and copying it to the output).
// Backward mirrors the loop in reverse; dW_hh, db_hh and dW_hr are one GEMM / reduction each
// over all steps, after the loop.
//
// Every device buffer is allocated before the time loop. Inside it only kernels and GEMMs on raw
// pointers are queued (no tensors, no dispatcher; the bfloat16 / float16 forward GEMM goes
// through ATen for its 16-bit inputs); nothing synchronizes with the host, because the step
// plan (batch sizes, row offsets) is computed on the host from the CPU batch_sizes tensor
// before the loop.
//
// float32 and float64 run in their own type. bfloat16 and float16 run the float32 loop,
// rounding h_t to the input dtype every step while the cell state and the workspace stay float32,
// exactly as the CPU path does; the forward's recurrent GEMMs take the 16-bit h_t and W_hh with
// float32 accumulation (RecurrentProduct). The backward's GEMMs stay float32: their gradient
// operands are not rounded.
//
// The same source also builds for the host (RNNFUSED_CUDA_SIM, csrc/cuda/sim/): there the
// kernels run on rnnfused's CUDA simulator, the GEMMs on ATen's CPU kernels, and the ops are
// registered as rnnfused_sim::* for CPU tensors, so that CI runs this exact code (host.h holds
// the few host calls that differ).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "../cell_math.h"
#include "../recurrence.h"
#include "host.h"
#include "layer_norm_kernels.cuh"
#include "persistent_kernels.cuh"
#include "pointwise_kernels.cuh"

namespace rnnfused::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Host helpers (the same as the CPU path's, so that both allocate and convert identically)
// ---------------------------------------------------------------------------------------------

// A fresh, contiguous copy in `dtype` (the states are updated in place and must never alias a
// caller's tensor).
at::Tensor state_copy(const at::Tensor& t, at::ScalarType dtype) {
  return at::empty(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

// Contiguous view or copy in `dtype` (no copy when it already is).
at::Tensor compute_view(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

at::Tensor optional_compute_view(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  return present(t) ? compute_view(*t, dtype) : at::Tensor();
}

// b_hh in the compute dtype, or zeros for a layer without bias (one add per gate in the kernel
// is cheaper than a second kernel variant).
at::Tensor bias_or_zeros(const c10::optional<at::Tensor>& b_hh, int64_t size, const at::Tensor& like,
                         at::ScalarType dtype) {
  return present(b_hh) ? compute_view(*b_hh, dtype) : at::zeros({size}, like.options().dtype(dtype));
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Gradients leave in the dtype of the tensors they belong to.
at::Tensor to_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype); }

Storage storage_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return Storage::BFloat16;
    case at::kHalf:
      return Storage::Half;
    default:
      return Storage::Same;
  }
}

// ---------------------------------------------------------------------------------------------
// Device checks
// ---------------------------------------------------------------------------------------------

// One tensor argument of an op, by name; `tensor` is null for an absent optional.
struct Named {
  const char* name;
  const at::Tensor* tensor;
};

inline Named named(const char* name, const at::Tensor& t) { return {name, &t}; }
inline Named named(const char* name, const c10::optional<at::Tensor>& t) {
  return {name, present(t) ? &*t : nullptr};
}

// The dispatcher picks these kernels as soon as one argument is a CUDA tensor, so a CPU tensor,
// or one on another GPU, can arrive here: say which, before any kernel could read it.
// batch_sizes is the exception: it stays on the CPU (as PackedSequence keeps it), because the
// host plans the steps from it.
void check_devices(const char* op, const Named& ref, std::initializer_list<Named> others,
                   const c10::optional<at::Tensor>& batch_sizes) {
  TORCH_CHECK(!present(batch_sizes) || batch_sizes->device().is_cpu(), op,
              ": batch_sizes must be a CPU tensor (as in PackedSequence), got ", batch_sizes->device());
  const at::Tensor& r = *ref.tensor;
  TORCH_CHECK(is_device_tensor(r), op, ": ", ref.name, " is on ", r.device(),
              " but other arguments are on a CUDA device; all tensors must be on one CUDA device "
              "(only batch_sizes stays on the CPU)");
  for (const Named& other : others) {
    if (other.tensor == nullptr) continue;
    TORCH_CHECK(other.tensor->device() == r.device(), op, ": ", other.name, " is on ", other.tensor->device(),
                " but ", ref.name, " is on ", r.device(),
                "; all tensors must be on one CUDA device (only batch_sizes stays on the CPU)");
  }
}

// ---------------------------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------------------------

// Launch configuration of one op call: its stream and a grid cap, read once before the loop.
class Launcher {
 public:
  Launcher()
      : stream_(current_stream()),
        // A few waves of resident blocks: beyond that the grid-stride loop does the rest, and
        // fewer, fuller blocks launch faster.
        max_blocks_(static_cast<int64_t>(multiprocessor_count()) * 8) {}

  // kernel<<<...>>>(args) over n elements on the current stream; nothing for n == 0 (a grid of
  // zero blocks is a launch error). `name` names the kernel in the simulator's reports.
  template <typename Args>
  void operator()(const char* name, void (*kernel)(Args), int64_t n, const Args& args) const {
    if (n <= 0) return;
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks_);
    launch_kernel(name, kernel, dim3(static_cast<unsigned int>(blocks)), dim3(kThreads), 0, stream_, args);
  }

 private:
  Stream stream_;
  int64_t max_blocks_;
};

// hprev [N, P]: row r holds the h_{t-1} that the row's step read: the previous step's output row
// for rows that continue, h0 for rows that start at this step (csrc/cpu's gather_previous_h).
// Feeds dW_hh = dG^T hprev. The host writes the source of every row into a table from the step
// plan; one gather kernel on the current stream does the copying.
at::Tensor previous_h(const StepPlan& plan, const at::Tensor& output, const at::Tensor& h0, const Launcher& launch) {
  at::Tensor hprev = at::empty_like(output);
  if (plan.rows == 0) return hprev;
  std::vector<int64_t> source(plan.rows);
  for (const auto t : c10::irange(plan.steps())) {
    const int64_t from_prev = plan.rows_from_previous(t);
    const int64_t prev_offset = from_prev > 0 ? plan.offsets[plan.previous_step(t)] : 0;
    for (const auto r : c10::irange(plan.batch_sizes[t])) {
      source[plan.offsets[t] + r] = r < from_prev ? prev_offset + r : -1 - r;
    }
  }
  const at::Tensor table = upload(source, output);
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "rnnfused_previous_h", [&] {
    GatherRowsArgs<scalar_t> args;
    args.rows = plan.rows;
    args.width = output.size(1);
    args.source = table.data_ptr<int64_t>();
    args.output = output.data_ptr<scalar_t>();
    args.h0 = h0.data_ptr<scalar_t>();
    args.out = hprev.data_ptr<scalar_t>();
    launch("gather_rows", gather_rows_kernel<scalar_t>, plan.rows * args.width, args);
  });
  return hprev;
}

// ---------------------------------------------------------------------------------------------
// Recurrent dropout: recurrent_mask [B, P] multiplies h_{t-1} before the product with W_hh, row b
// of every step by mask row b (csrc/cpu/recurrence_cpu.cpp defines the semantics). Such calls
// take the standard path.
// ---------------------------------------------------------------------------------------------

// out[:count] = in * mask (or += with `accumulate`); `out` may be `in`.
template <typename T>
void apply_mask(const Launcher& launch, int64_t count, const T* in, const at::Tensor& mask, T* out, bool accumulate) {
  MaskRowsArgs<T> args;
  args.count = count;
  args.in = in;
  args.mask = mask.data_ptr<T>();
  args.out = out;
  args.accumulate = accumulate;
  launch("mask_rows", mask_rows_kernel<T>, count, args);
}

// rows [N, P] of a packed sequence times the mask row of their batch position (step t's row r is
// batch row r): the h_{t-1} W_hh saw, for dW_hh. One gather and multiply after the loop.
at::Tensor masked_rows(const StepPlan& plan, const at::Tensor& rows, const at::Tensor& mask) {
  if (!mask.defined() || plan.rows == 0) return rows;
  std::vector<int64_t> batch_row(plan.rows);
  for (const auto t : c10::irange(plan.steps())) {
    for (const auto r : c10::irange(plan.batch_sizes[t])) batch_row[plan.offsets[t] + r] = r;
  }
  return rows * mask.index_select(0, upload(batch_row, rows));
}

// Zoneout: keep weights [N, width] or a scalar (csrc/cpu/recurrence_cpu.cpp defines the
// semantics); the step kernels blend and split in place. Such calls take the standard path.

// The keep weights of the rows from `row` on (nullptr without zoneout), and their stride.
template <typename T>
const T* keep_rows(const at::Tensor& keep, int64_t row, int64_t width) {
  if (!keep.defined()) return nullptr;
  return keep.data_ptr<T>() + (keep.dim() == 0 ? 0 : row * width);
}
inline int64_t keep_stride(const at::Tensor& keep) { return keep.defined() && keep.dim() == 0 ? 0 : 1; }

// out[:count] = in (or += with `accumulate`).
template <typename T>
void copy_rows(const Launcher& launch, int64_t count, const T* in, T* out, bool accumulate) {
  RowsArgs<T> args;
  args.count = count;
  args.in = in;
  args.out = out;
  args.accumulate = accumulate;
  launch("zoneout_rows", rows_kernel<T>, count, args);
}

// The recurrent product of one step, gates_h[:rows] = h_{t-1}[:rows] W_hh^T (active rows are
// always the first `rows` rows of the batch, see StepPlan). float32 / float64 calls multiply
// their own h_state. bfloat16 / float16 calls also keep h_t in the storage dtype (the step's
// kernel writes it, see LowpCopy) and multiply 16-bit operands with float32 accumulation on
// tensor cores: the same product up to summation order, because h_t is exactly its rounded value
// and W_hh is the caller's 16-bit tensor.
class RecurrentProduct {
 public:
  // w_hh: the caller's [G*H, P]; h0 [B, P] in the caller's dtype; h_state [B, P] in the compute
  // dtype, updated by the step kernels.
  // mask: the recurrent dropout mask [B, P] in the compute dtype, or undefined. With one, every
  // dtype multiplies in the compute dtype (the masked h_{t-1} is not a 16-bit value), as it does
  // with `compute_dtype_product` (the Elman RNN with zoneout, whose backward recomputes the
  // products in the compute dtype).
  RecurrentProduct(const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& h_state,
                   const at::Tensor& mask = at::Tensor(), bool compute_dtype_product = false)
      : h_state_(h_state), mask_(mask) {
    if (storage_of(w_hh.scalar_type()) != Storage::Same && !mask.defined() && !compute_dtype_product) {
      w_ = w_hh.contiguous();
      h_lowp_ = state_copy(h0, h0.scalar_type());
    } else {
      w_ = compute_view(w_hh, h_state.scalar_type());
    }
    if (mask.defined()) masked_h_ = at::empty_like(h_state);
  }

  // gates_h [B, G*H] in the compute dtype T.
  template <typename T>
  void run(const at::Tensor& gates_h, int64_t rows, const Launcher& launch) const {
    if (h_lowp_.defined()) {
      at::Tensor out = gates_h.narrow(0, 0, rows);
      mm_lowp_into_float(out, h_lowp_.narrow(0, 0, rows), w_.t());
      return;
    }
    const T* h = h_state_.data_ptr<T>();
    if (mask_.defined()) {
      apply_mask<T>(launch, rows * w_.size(1), h, mask_, masked_h_.data_ptr<T>(), false);
      h = masked_h_.data_ptr<T>();
    }
    gemm_nt<T>(rows, w_.size(0), w_.size(1), h, w_.data_ptr<T>(), gates_h.data_ptr<T>(), T(0));
  }

  // Where the step kernel writes h_t in the storage dtype (nothing for float32 / float64).
  LowpCopy lowp_copy() const {
    LowpCopy copy;
    if (!h_lowp_.defined()) return copy;
    if (h_lowp_.scalar_type() == at::kBFloat16) copy.bf16 = h_lowp_.data_ptr<c10::BFloat16>();
    if (h_lowp_.scalar_type() == at::kHalf) copy.f16 = h_lowp_.data_ptr<c10::Half>();
    return copy;
  }

 private:
  at::Tensor h_state_;
  at::Tensor mask_;      // [B, P] recurrent dropout mask, or undefined
  at::Tensor masked_h_;  // [B, P] h_{t-1} * mask of the current step
  at::Tensor w_;         // [G*H, P]: the caller's dtype (bfloat16 / float16 calls) or the compute dtype
  at::Tensor h_lowp_;    // [B, P] in the storage dtype (bfloat16 / float16 calls without a mask)
};


// ---------------------------------------------------------------------------------------------
// The persistent path (persistent_kernels.cuh): path selection, layout, launch
// ---------------------------------------------------------------------------------------------

// Which path a call takes, from RNNFUSED_CUDA_PATH (read at every call, so tests and users can
// switch it at run time): "auto" (the default) picks the persistent path where it fits and the
// batch is at most kPersistentMaxBatch, "standard" always takes the per-step loop, "persistent"
// takes the persistent path or raises an error that says why it cannot.
enum class PathRequest { Auto, Standard, Persistent };

PathRequest requested_path() {
  const char* value = std::getenv("RNNFUSED_CUDA_PATH");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return PathRequest::Auto;
  if (std::strcmp(value, "standard") == 0) return PathRequest::Standard;
  if (std::strcmp(value, "persistent") == 0) return PathRequest::Persistent;
  TORCH_CHECK(false, "RNNFUSED_CUDA_PATH must be 'auto', 'standard' or 'persistent', got '", value, "'");
}

// Beyond this batch the standard path's GEMMs use the GPU well, and every block of the persistent
// kernel would read all of h_{t-1} (B x P) from L2 every step.
constexpr int64_t kPersistentMaxBatch = 64;

// How a persistent kernel splits one call over blocks, or why it cannot run it.
struct PersistentLayout {
  int64_t blocks = 0;
  int64_t units_per_block = 0;  // U: hidden units per block
  int64_t cols_per_block = 0;   // Pc: columns of P per block (= U without a projection)
  size_t shared_bytes = 0;
  std::string refusal;          // empty when the kernel can run the call
};

// One block per multiprocessor (never more blocks than hidden units), each owning a slice of the
// hidden units (and of the projection's columns).
PersistentLayout persistent_grid(int64_t H, int64_t P, bool proj) {
  PersistentLayout layout;
  if (requested_path() == PathRequest::Standard) {  // no occupancy queries for a path not taken
    layout.refusal = "RNNFUSED_CUDA_PATH=standard";
    return layout;
  }
  if (H == 0 || P == 0) {
    layout.refusal = "the hidden size is 0";
    return layout;
  }
  const int64_t sms = multiprocessor_count();
  const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(sms, H));
  layout.units_per_block = (H + wanted - 1) / wanted;
  layout.blocks = (H + layout.units_per_block - 1) / layout.units_per_block;
  layout.cols_per_block = proj ? (P + layout.blocks - 1) / layout.blocks : layout.units_per_block;
  return layout;
}

// Refuses the layout when a block's shared memory (its slice of the recurrent weights) does not
// fit, or when the grid cannot be co-resident (a grid barrier needs every block running at once).
template <typename Args>
PersistentLayout& check_residency(PersistentLayout& layout, void (*kernel)(Args), size_t shared_bytes) {
  if (!layout.refusal.empty()) return layout;
  layout.shared_bytes = shared_bytes;
  const size_t limit = max_dynamic_shared_bytes();
  if (layout.shared_bytes > limit) {
    layout.refusal = "its slice of the recurrent weights needs " + std::to_string(layout.shared_bytes) +
                     " bytes of shared memory per block over " + std::to_string(layout.blocks) +
                     " blocks, more than the " + std::to_string(limit) + " a block can have on this device";
    return layout;
  }
  reserve_dynamic_shared(kernel, layout.shared_bytes);
  const int64_t resident = max_cooperative_blocks(kernel, kPersistentThreads, layout.shared_bytes);
  if (resident < layout.blocks) {
    layout.refusal = "its grid of " + std::to_string(layout.blocks) + " blocks cannot be resident at once (" +
                     std::to_string(resident) + " fit)";
  }
  return layout;
}

// The FMA kernels: W_hh [U][G][P] (forward) or [Pc][G*H] (backward) in the compute dtype, plus the
// projection's slice.
template <typename Args>
PersistentLayout persistent_layout(void (*kernel)(Args), int64_t G, int64_t H, int64_t P, bool proj,
                                   size_t element_bytes, bool backward) {
  PersistentLayout layout = persistent_grid(H, P, proj);
  const int64_t U = layout.units_per_block, Pc = layout.cols_per_block;
  const int64_t elements = backward ? Pc * G * H + (proj ? U * P : 0) : U * G * P + (proj ? Pc * H : 0);
  return check_residency(layout, kernel, static_cast<size_t>(elements) * element_bytes);
}

// The tensor-core forward kernel (persistent_forward_mma_kernel): the A tiles in the 16-bit dtype
// and the partial product tiles of a step at batch B.
template <typename Args>
PersistentLayout persistent_mma_layout(void (*kernel)(Args), int64_t units_per_tile, int64_t H, int64_t B) {
  PersistentLayout layout = persistent_grid(H, H, false);
  if (!device_supports_mma()) {
    layout.refusal = "its tensor-core kernel needs a GPU of compute capability 8.0 or newer";
    return layout;
  }
  const int64_t warps = kPersistentThreads / kWarpSize;
  const int64_t m_tiles = (layout.units_per_block + units_per_tile - 1) / units_per_tile;
  const int64_t k_steps = (H + kMmaK - 1) / kMmaK;
  const int64_t tile_bytes = m_tiles * kMmaM * (k_steps * kMmaK + kMmaRowPad) * 2;
  // mma_split gives at most max(warps, tile pairs) items at any batch up to B.
  const int64_t items = std::max<int64_t>(warps, m_tiles * ((B + kMmaN - 1) / kMmaN));
  return check_residency(layout, kernel, static_cast<size_t>(tile_bytes + items * kMmaM * kMmaN * 4));
}

bool use_persistent(const char* op, const PersistentLayout& layout, const StepPlan& plan,
                    bool regularized = false) {
  if (plan.rows == 0) return false;  // nothing to run on either path
  if (regularized) {
    TORCH_CHECK(requested_path() != PathRequest::Persistent, op,
                ": RNNFUSED_CUDA_PATH=persistent, but the persistent kernels take neither a recurrent_mask nor "
                "zoneout (recurrent dropout and zoneout run on the standard path)");
    return false;
  }
  switch (requested_path()) {
    case PathRequest::Standard:
      return false;
    case PathRequest::Persistent:
      TORCH_CHECK(layout.refusal.empty(), op, ": RNNFUSED_CUDA_PATH=persistent, but the persistent kernel cannot ",
                  "run this call: ", layout.refusal);
      return true;
    case PathRequest::Auto:
    default:
      return layout.refusal.empty() && plan.batch <= kPersistentMaxBatch;
  }
}

// The step plan as the persistent kernels read it: one row of kPlanColumns per computed step, in
// the order of the forward computation.
at::Tensor plan_table(const StepPlan& plan, const at::Tensor& like) {
  std::vector<int64_t> table(plan.steps() * kPlanColumns);
  for (const auto s : c10::irange(plan.steps())) {
    const int64_t t = plan.step_at(s);
    const int64_t prev = plan.previous_step(t);
    int64_t* row = table.data() + s * kPlanColumns;
    row[kPlanRows] = plan.batch_sizes[t];
    row[kPlanOffset] = plan.offsets[t];
    row[kPlanPrevOffset] = prev >= 0 ? plan.offsets[prev] : 0;
    row[kPlanRowsFromPrev] = plan.rows_from_previous(t);
  }
  return upload(table, like);
}

// One cooperative launch of a persistent kernel over the layout's grid.
template <typename Args>
void launch_persistent(const char* name, void (*kernel)(Args), const PersistentLayout& layout, const Args& args) {
  launch_kernel(name, kernel, dim3(static_cast<unsigned int>(layout.blocks)), dim3(kPersistentThreads),
                layout.shared_bytes, current_stream(), args, /*cooperative=*/true);
}

// Fills what every persistent forward call shares.
template <typename T>
PersistentForwardArgs<T> persistent_forward_args(const StepPlan& plan, const PersistentLayout& layout,
                                                 const at::Tensor& table, int64_t H, int64_t P, const at::Tensor& gx,
                                                 const at::Tensor& whh, const at::Tensor& bias, const at::Tensor& h0,
                                                 at::Tensor& h_state, at::Tensor& output, at::Tensor& workspace,
                                                 bool training, Storage storage) {
  PersistentForwardArgs<T> a;
  a.steps = plan.steps();
  a.hidden = H;
  a.width = P;
  a.units_per_block = layout.units_per_block;
  a.cols_per_block = layout.cols_per_block;
  a.plan = table.data_ptr<int64_t>();
  a.gates_x = gx.data_ptr<T>();
  a.w_hh = whh.defined() ? whh.data_ptr<T>() : nullptr;  // undefined for the tensor-core kernel
  a.bias = bias.data_ptr<T>();
  a.h0 = h0.data_ptr<T>();
  a.h_state = h_state.data_ptr<T>();
  a.output = output.data_ptr<T>();
  a.workspace = training ? workspace.data_ptr<T>() : nullptr;
  a.storage = storage;
  return a;
}

template <typename T>
PersistentBackwardArgs<T> persistent_backward_args(const StepPlan& plan, const PersistentLayout& layout,
                                                   const at::Tensor& table, int64_t H, int64_t P,
                                                   const at::Tensor& whh) {
  PersistentBackwardArgs<T> a;
  a.steps = plan.steps();
  a.hidden = H;
  a.width = P;
  a.units_per_block = layout.units_per_block;
  a.cols_per_block = layout.cols_per_block;
  a.plan = table.data_ptr<int64_t>();
  a.w_hh = whh.data_ptr<T>();
  return a;
}

// bfloat16 / float16 calls without a projection: the tensor-core forward kernel, when it can run
// the call and the path choice takes the persistent path. Returns whether it ran; otherwise the
// caller goes on to the float32 FMA kernels' choice (e.g. on a GPU older than sm_80).
template <Cell cell, typename In>
bool try_persistent_mma_as(const char* op, const StepPlan& plan, int64_t H, const at::Tensor& gx,
                           const at::Tensor& w_hh, const at::Tensor& bias, const at::Tensor& h0_c,
                           at::Tensor& h_state, at::Tensor& c_state, at::Tensor& output, at::Tensor& workspace,
                           bool training, Storage storage) {
  const auto kernel = persistent_forward_mma_kernel<In, cell>;
  const PersistentLayout layout = persistent_mma_layout(kernel, mma_units_per_tile<cell>(), H, plan.batch);
  if (!layout.refusal.empty() || !use_persistent(op, layout, plan)) return false;
  const at::Tensor table = plan_table(plan, gx);
  const at::Tensor w = w_hh.contiguous();
  PersistentMmaArgs<In> args;
  args.base = persistent_forward_args<float>(plan, layout, table, H, H, gx, at::Tensor(), bias, h0_c, h_state, output,
                                             workspace, training, storage);
  if (c_state.defined()) args.base.c_state = c_state.data_ptr<float>();
  args.w_hh = w.data_ptr<In>();
  launch_persistent(cell == Cell::Lstm ? "persistent_lstm_forward_mma"
                    : cell == Cell::Gru ? "persistent_gru_forward_mma"
                                        : "persistent_rnn_forward_mma",
                    kernel, layout, args);
  return true;
}

template <Cell cell>
bool try_persistent_mma(const char* op, const StepPlan& plan, int64_t H, const at::Tensor& gx, const at::Tensor& w_hh,
                        const at::Tensor& bias, const at::Tensor& h0_c, at::Tensor& h_state, at::Tensor& c_state,
                        at::Tensor& output, at::Tensor& workspace, bool training, Storage storage) {
  if (w_hh.scalar_type() == at::kBFloat16) {
    return try_persistent_mma_as<cell, c10::BFloat16>(op, plan, H, gx, w_hh, bias, h0_c, h_state, c_state, output,
                                                      workspace, training, storage);
  }
  if (w_hh.scalar_type() == at::kHalf) {
    return try_persistent_mma_as<cell, c10::Half>(op, plan, H, gx, w_hh, bias, h0_c, h_state, c_state, output,
                                                  workspace, training, storage);
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// LSTM
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_cuda(
    const at::Tensor& gates_x, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& w_hr, const at::Tensor& h0, const at::Tensor& c0,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, bool training,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const c10::optional<at::Tensor>& cell_zoneout) {
  const char* op = kLstmOp;
  check_devices(op, named("gates_x", gates_x),
                {named("w_hh", w_hh), named("b_hh", b_hh), named("w_hr", w_hr), named("h0", h0), named("c0", c0),
                 named("recurrent_mask", recurrent_mask), named("zoneout", zoneout),
                 named("cell_zoneout", cell_zoneout)},
                batch_sizes);
  const DeviceGuard device_guard(gates_x.device());
  // The internal GEMMs write into preallocated buffers (out=), which autograd refuses for inputs
  // that require grad; this op's autograd is rnnfused's own (rnnfused/_ops.py).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t H = check_recurrence_inputs(op, 4, gates_x, w_hh, b_hh, h0);
  const int64_t P = w_hh.size(1);
  const bool proj = present(w_hr);
  if (proj) {
    check_matrix(op, "w_hr", *w_hr, gates_x, P, H);
  } else {
    TORCH_CHECK(P == H, op, ": without w_hr, w_hh must be [4 * hidden, hidden] = [", 4 * H, ", ", H, "], got ",
                w_hh.sizes());
  }
  check_matrix(op, "c0", c0, gates_x, h0.size(0), H);
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), B, batch_sizes, reverse);

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const Storage storage = storage_of(dtype);
  const at::Tensor gx = compute_view(gates_x, acc);
  const at::Tensor whr = optional_compute_view(w_hr, acc);
  const at::Tensor bias = bias_or_zeros(b_hh, 4 * H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc);  // [B, P]: rows of later steps keep h0 until they start
  at::Tensor c_state = state_copy(c0, acc);  // [B, H]
  at::Tensor output = at::empty({plan.rows, P}, gates_x.options().dtype(acc));
  at::Tensor workspace = empty_workspace(gates_x, training, kLstmWorkspaceGates, H);
  at::Tensor gates_h = at::empty({B, 4 * H}, gx.options());
  at::Tensor r_buffer = proj ? at::empty({B, H}, gx.options()) : at::Tensor();
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, P, gates_x, acc);
  const at::Tensor keep_c = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, gates_x, acc);
  const bool regularized = mask.defined() || keep_h.defined() || keep_c.defined();
  // Zoneout with a projection: h_{t-1} of a step, before the projection's GEMM overwrites it.
  at::Tensor h_prev = keep_h.defined() && proj ? at::empty({B, P}, gx.options()) : at::Tensor();
  const RecurrentProduct recurrent_product(w_hh, h0, h_state, mask);
  const Launcher launch;

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_lstm_cuda", [&] {
    using T = scalar_t;
    if constexpr (std::is_same_v<T, float>) {
      if (!proj && !regularized &&
          try_persistent_mma<Cell::Lstm>(op, plan, H, gx, w_hh, bias, compute_view(h0, acc), h_state, c_state, output,
                                         workspace, training, storage)) {
        return;
      }
    }
    const auto kernel = persistent_forward_kernel<T, Cell::Lstm>;
    const PersistentLayout layout = persistent_layout(kernel, 4, H, P, proj, sizeof(T), /*backward=*/false);
    if (use_persistent(op, layout, plan, regularized)) {
      const at::Tensor whh = compute_view(w_hh, acc), h0_c = compute_view(h0, acc);
      const at::Tensor table = plan_table(plan, gx);
      auto args = persistent_forward_args<T>(plan, layout, table, H, P, gx, whh, bias, h0_c, h_state, output,
                                             workspace, training, storage);
      args.w_hr = proj ? whr.data_ptr<T>() : nullptr;
      args.c_state = c_state.data_ptr<T>();
      args.r_scratch = proj ? r_buffer.data_ptr<T>() : nullptr;
      launch_persistent("persistent_lstm_forward", kernel, layout, args);
      return;
    }
    T* out = output.data_ptr<T>();
    T* ws = training ? workspace.data_ptr<T>() : nullptr;
    LstmForwardArgs<T> args;
    args.hidden = H;
    args.gates_h = gates_h.data_ptr<T>();
    args.bias = bias.data_ptr<T>();
    args.c_state = c_state.data_ptr<T>();
    args.r_out = proj ? r_buffer.data_ptr<T>() : h_state.data_ptr<T>();
    args.storage = proj ? Storage::Same : storage;
    if (!proj) args.h_lowp = recurrent_product.lowp_copy();
    args.keep_h_stride = keep_stride(keep_h);
    args.keep_c_stride = keep_stride(keep_c);
    for (const auto s : c10::irange(plan.steps())) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      recurrent_product.run<T>(gates_h, rows, launch);
      args.rows = rows;
      args.gates_x = gx.data_ptr<T>() + off * 4 * H;
      args.h_copy = proj ? nullptr : out + off * P;
      args.workspace = ws ? ws + off * kLstmWorkspaceGates * H : nullptr;
      args.keep_h = proj ? nullptr : keep_rows<T>(keep_h, off, P);  // with a projection: after it, below
      args.keep_c = keep_rows<T>(keep_c, off, H);
      launch("lstm_forward", lstm_forward_kernel<T>, rows * H, args);
      if (proj) {
        if (keep_h.defined()) copy_rows<T>(launch, rows * P, h_state.data_ptr<T>(), h_prev.data_ptr<T>(), false);
        // h_t = r W_hr^T: [rows, H] x [P, H]^T
        gemm_nt<T>(rows, P, H, r_buffer.data_ptr<T>(), whr.data_ptr<T>(), h_state.data_ptr<T>(), T(0));
        StoreStateArgs<T> store;
        store.count = rows * P;
        store.h_state = h_state.data_ptr<T>();
        store.h_copy = out + off * P;
        store.storage = storage;
        store.h_lowp = recurrent_product.lowp_copy();
        store.keep = keep_rows<T>(keep_h, off, P);
        store.keep_stride = keep_stride(keep_h);
        store.h_prev = keep_h.defined() ? h_prev.data_ptr<T>() : nullptr;
        launch("store_state", store_state_kernel<T>, rows * P, store);
      }
    }
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype), to_dtype(c_state, dtype), workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_backward_cuda(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
    const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output, const at::Tensor& workspace,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const c10::optional<at::Tensor>& cell_zoneout) {
  const char* op = kLstmBackwardOp;
  check_devices(op, named("output", output),
                {named("grad_output", grad_output), named("grad_h_n", grad_h_n), named("grad_c_n", grad_c_n),
                 named("w_hh", w_hh), named("w_hr", w_hr), named("h0", h0), named("c0", c0),
                 named("workspace", workspace), named("recurrent_mask", recurrent_mask), named("zoneout", zoneout),
                 named("cell_zoneout", cell_zoneout)},
                batch_sizes);
  const DeviceGuard device_guard(output.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(output.dim() == 2, op, ": output must be 2-D, got ", output.dim(), "-D");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0, op, ": w_hh must be [4 * hidden, P], got ", w_hh.sizes());
  const int64_t H = w_hh.size(0) / 4;
  const int64_t P = w_hh.size(1);
  const bool proj = present(w_hr);
  check_matrix(op, "w_hh", w_hh, output, 4 * H, output.size(1));
  if (proj) {
    check_matrix(op, "w_hr", *w_hr, output, P, H);
  } else {
    TORCH_CHECK(P == H, op, ": without w_hr, w_hh must be [4 * hidden, hidden] = [", 4 * H, ", ", H, "], got ",
                w_hh.sizes());
  }
  check_matrix(op, "h0", h0, output, -1, P);
  check_matrix(op, "c0", c0, output, h0.size(0), H);
  check_workspace(op, workspace, output, kLstmWorkspaceGates, H);
  check_optional_grad(op, "grad_output", grad_output, output);
  check_optional_grad(op, "grad_h_n", grad_h_n, h0);
  check_optional_grad(op, "grad_c_n", grad_c_n, c0);
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor whr = optional_compute_view(w_hr, acc);
  const at::Tensor h0_c = compute_view(h0, acc);
  const at::Tensor c0_c = compute_view(c0, acc);
  const at::Tensor out = compute_view(output, acc);
  const at::Tensor go = optional_compute_view(grad_output, acc);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, P, output, acc);
  const at::Tensor keep_c = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, output, acc);
  const bool regularized = mask.defined() || keep_h.defined() || keep_c.defined();
  // dG_t W_hh of a step with a mask, before its masked rows join dL/dh_{t-1} (with a projection or
  // zoneout, where they are added to what is there).
  at::Tensor product = mask.defined() && (proj || keep_h.defined()) ? at::empty({B, P}, options) : at::Tensor();
  // Zoneout with a projection: k dL/dh_t of a step, added to dL/dh_{t-1} after the step's GEMMs.
  at::Tensor dh_kept = keep_h.defined() && proj ? at::empty({B, P}, options) : at::Tensor();
  // The workspace is read through raw pointers: make sure of its layout (a caller's own tensor
  // may be a non-contiguous one of the right shape).
  const at::Tensor ws_c = workspace.contiguous();
  at::Tensor dc_state = present(grad_c_n) ? state_copy(*grad_c_n, acc) : at::zeros({B, H}, options);
  at::Tensor grad_gates = at::empty({plan.rows, 4 * H}, options);
  // dL/dh of the state. Without a projection it is carried from step to step in dh_state [B, P]
  // (the step kernel adds dL/doutput). With one, dL/dh_t of every row is kept for dW_hr in
  // grad_h_rows [N, P]: it starts as dL/doutput, plus dL/dh_n in the row where each sequence's
  // state ends, and each step's dG_t W_hh is accumulated into the rows of the step before it by
  // the GEMM itself (beta = 1), or written to dL/dh0 for the rows that start at step t; so a step
  // costs no extra kernel.
  at::Tensor dh_state, grad_h_rows, grad_h0;
  if (proj) {
    grad_h_rows = go.defined() ? go.clone(at::MemoryFormat::Contiguous) : at::zeros({plan.rows, P}, options);
    grad_h0 = plan.rows > 0 ? at::empty({B, P}, options)
                            : (present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, P}, options));
    if (present(grad_h_n) && plan.rows > 0) {
      std::vector<int64_t> final_row(B);  // the row of each sequence's last computed step
      for (const auto s : c10::irange(plan.steps())) {
        const int64_t t = plan.step_at(s);
        for (const auto r : c10::irange(plan.batch_sizes[t])) final_row[r] = plan.offsets[t] + r;
      }
      grad_h_rows.index_add_(0, upload(final_row, grad_h_rows), compute_view(*grad_h_n, acc));
    }
  } else {
    dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, P}, options);
  }
  at::Tensor r_rows = proj ? at::empty({plan.rows, H}, options) : at::Tensor();  // o tanh(c), for dW_hr
  at::Tensor grad_r = proj ? at::empty({B, H}, options) : at::Tensor();          // dL/dr of one step
  const Launcher launch;

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_lstm_backward_cuda", [&] {
    using T = scalar_t;
    const auto kernel = persistent_backward_kernel<T, Cell::Lstm>;
    const PersistentLayout layout = persistent_layout(kernel, 4, H, P, proj, sizeof(T), /*backward=*/true);
    if (use_persistent(op, layout, plan, regularized)) {
      const at::Tensor table = plan_table(plan, out);
      auto args = persistent_backward_args<T>(plan, layout, table, H, P, whh);
      args.w_hr = proj ? whr.data_ptr<T>() : nullptr;
      args.workspace = ws_c.data_ptr<T>();
      args.c0 = c0_c.data_ptr<T>();
      args.dc_state = dc_state.data_ptr<T>();
      args.grad_gates = grad_gates.data_ptr<T>();
      if (proj) {
        args.grad_h_rows = grad_h_rows.data_ptr<T>();
        args.grad_h0 = grad_h0.data_ptr<T>();
        args.grad_r = grad_r.data_ptr<T>();
        args.r_rows = r_rows.data_ptr<T>();
      } else {
        args.grad_output = ptr_or_null<T>(go);
        args.dh_state = dh_state.data_ptr<T>();
      }
      launch_persistent("persistent_lstm_backward", kernel, layout, args);
      return;
    }
    const T* ws = plan.rows > 0 ? ws_c.data_ptr<T>() : nullptr;
    const T* go_p = ptr_or_null<T>(go);
    const T* whh_p = whh.data_ptr<T>();
    T* dh = proj ? nullptr : dh_state.data_ptr<T>();
    // With cell zoneout, the c_{t-1} of every row is a zoned state, which the workspace (holding
    // the candidates c~) does not: recompute them, in the forward order, before the loop.
    at::Tensor c_prev_rows, zoned_cells;
    if (keep_c.defined() && plan.rows > 0) {
      c_prev_rows = at::empty({plan.rows, H}, options);
      zoned_cells = at::empty({plan.rows, H}, options);
      for (const auto s : c10::irange(plan.steps())) {
        const int64_t t = plan.step_at(s);
        const int64_t off = plan.offsets[t];
        ZonedCellsArgs<T> scan;
        scan.rows = plan.batch_sizes[t];
        scan.hidden = H;
        scan.rows_from_prev = plan.rows_from_previous(t);
        scan.prev_zoned =
            scan.rows_from_prev > 0 ? zoned_cells.data_ptr<T>() + plan.offsets[plan.previous_step(t)] * H : nullptr;
        scan.c0 = c0_c.data_ptr<T>();
        scan.workspace = ws + off * kLstmWorkspaceGates * H;
        scan.keep = keep_rows<T>(keep_c, off, H);
        scan.keep_stride = keep_stride(keep_c);
        scan.c_prev = c_prev_rows.data_ptr<T>() + off * H;
        scan.zoned = zoned_cells.data_ptr<T>() + off * H;
        launch("zoned_cells", zoned_cells_kernel<T>, scan.rows * H, scan);
      }
    }
    LstmBackwardArgs<T> args;
    args.hidden = H;
    args.c0 = c0_c.data_ptr<T>();
    args.dc_state = dc_state.data_ptr<T>();
    args.keep_h_stride = keep_stride(keep_h);
    args.keep_c_stride = keep_stride(keep_c);
    for (int64_t s = plan.steps() - 1; s >= 0; --s) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      const int64_t prev = plan.previous_step(t);
      const int64_t from_prev = plan.rows_from_previous(t);
      T* dg = grad_gates.data_ptr<T>() + off * 4 * H;
      args.rows = rows;
      args.workspace = ws + off * kLstmWorkspaceGates * H;
      args.prev_workspace = prev >= 0 ? ws + plan.offsets[prev] * kLstmWorkspaceGates * H : nullptr;
      args.rows_from_prev = from_prev;
      args.grad_gates = dg;
      args.keep_c = keep_rows<T>(keep_c, off, H);
      args.c_prev_rows = keep_c.defined() ? c_prev_rows.data_ptr<T>() + off * H : nullptr;
      if (proj) {
        if (keep_h.defined()) {  // the projection's output is the candidate: (1 - k) dL/dh_t
          ZoneoutSplitArgs<T> split;
          split.count = rows * P;
          split.keep = keep_rows<T>(keep_h, off, P);
          split.keep_stride = keep_stride(keep_h);
          split.grad = grad_h_rows.data_ptr<T>() + off * P;
          split.kept = dh_kept.data_ptr<T>();
          launch("zoneout_split", zoneout_split_kernel<T>, rows * P, split);
        }
        // dL/dr = (dL/dh_t) W_hr: [rows, P] x [P, H]
        gemm_nn<T>(rows, H, P, grad_h_rows.data_ptr<T>() + off * P, whr.data_ptr<T>(), grad_r.data_ptr<T>(), T(0));
        args.grad_r = grad_r.data_ptr<T>();
        args.grad_r_extra = nullptr;
        args.r_out = r_rows.data_ptr<T>() + off * H;
      } else {
        args.grad_r = dh;
        args.grad_r_extra = go_p ? go_p + off * P : nullptr;
        args.r_out = nullptr;
        args.keep_h = keep_rows<T>(keep_h, off, P);
        args.dh_kept = keep_h.defined() ? dh : nullptr;  // k dL/dh_t, which the GEMM below adds to
      }
      launch("lstm_backward", lstm_backward_kernel<T>, rows * H, args);
      // dL/dh_{t-1} = dG_t W_hh (times the recurrent mask): [rows, 4H] x [4H, P].
      if (!proj) {
        const T beta = keep_h.defined() ? T(1) : T(0);  // zoneout: onto k dL/dh_t
        if (!mask.defined()) {
          gemm_nn<T>(rows, P, 4 * H, dg, whh_p, dh, beta);  // into the state rows just consumed
        } else if (!keep_h.defined()) {
          gemm_nn<T>(rows, P, 4 * H, dg, whh_p, dh, T(0));
          apply_mask<T>(launch, rows * P, dh, mask, dh, false);
        } else {
          gemm_nn<T>(rows, P, 4 * H, dg, whh_p, product.data_ptr<T>(), T(0));
          apply_mask<T>(launch, rows * P, product.data_ptr<T>(), mask, dh, true);
        }
        continue;
      }
      if (mask.defined()) {
        T* prod = product.data_ptr<T>();
        gemm_nn<T>(rows, P, 4 * H, dg, whh_p, prod, T(0));
        if (from_prev > 0) {
          apply_mask<T>(launch, from_prev * P, prod, mask, grad_h_rows.data_ptr<T>() + plan.offsets[prev] * P, true);
        }
        if (rows > from_prev) {
          const int64_t starting = rows - from_prev;  // rows whose h_{t-1} is h0
          apply_mask<T>(launch, starting * P, prod + from_prev * P, mask.narrow(0, from_prev, starting),
                        grad_h0.data_ptr<T>() + from_prev * P, false);
        }
      } else {
        if (from_prev > 0) {
          gemm_nn<T>(from_prev, P, 4 * H, dg, whh_p, grad_h_rows.data_ptr<T>() + plan.offsets[prev] * P, T(1));
        }
        if (rows > from_prev) {
          gemm_nn<T>(rows - from_prev, P, 4 * H, dg + from_prev * 4 * H, whh_p,
                     grad_h0.data_ptr<T>() + from_prev * P, T(0));
        }
      }
      if (keep_h.defined()) {  // zoneout: k dL/dh_t joins dL/dh_{t-1}
        if (from_prev > 0) {
          copy_rows<T>(launch, from_prev * P, dh_kept.data_ptr<T>(),
                       grad_h_rows.data_ptr<T>() + plan.offsets[prev] * P, true);
        }
        if (rows > from_prev) {
          copy_rows<T>(launch, (rows - from_prev) * P, dh_kept.data_ptr<T>() + from_prev * P,
                       grad_h0.data_ptr<T>() + from_prev * P, true);
        }
      }
    }
  });
  const at::Tensor hprev = masked_rows(plan, previous_h(plan, out, h0_c, launch), mask);
  at::Tensor grad_w_hh = grad_gates.t().mm(hprev);
  at::Tensor grad_b_hh = grad_gates.sum(0);
  at::Tensor grad_w_hr = proj ? grad_h_rows.t().mm(r_rows) : at::empty({0}, options);
  return {to_dtype(grad_gates, dtype), to_dtype(grad_w_hh, dtype), to_dtype(grad_b_hh, dtype),
          to_dtype(grad_w_hr, dtype), to_dtype(proj ? grad_h0 : dh_state, dtype), to_dtype(dc_state, dtype)};
}

// ---------------------------------------------------------------------------------------------
// GRU
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_recurrence_cuda(const at::Tensor& gates_x, const at::Tensor& w_hh,
                                                                    const c10::optional<at::Tensor>& b_hh,
                                                                    const at::Tensor& h0,
                                                                    const c10::optional<at::Tensor>& batch_sizes,
                                                                    bool reverse, bool training,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout) {
  const char* op = kGruOp;
  check_devices(op, named("gates_x", gates_x),
                {named("w_hh", w_hh), named("b_hh", b_hh), named("h0", h0), named("recurrent_mask", recurrent_mask),
                 named("zoneout", zoneout)},
                batch_sizes);
  const DeviceGuard device_guard(gates_x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t H = check_recurrence_inputs(op, 3, gates_x, w_hh, b_hh, h0);
  TORCH_CHECK(w_hh.size(1) == H, op, ": w_hh must be [3 * hidden, hidden] = [", 3 * H, ", ", H, "], got ",
              w_hh.sizes());
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), B, batch_sizes, reverse);

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const at::Tensor gx = compute_view(gates_x, acc);
  const at::Tensor bias = bias_or_zeros(b_hh, 3 * H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc);
  at::Tensor output = at::empty({plan.rows, H}, gates_x.options().dtype(acc));
  at::Tensor workspace = empty_workspace(gates_x, training, kGruWorkspaceGates, H);
  at::Tensor gates_h = at::empty({B, 3 * H}, gx.options());
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, H, gates_x, acc);
  const bool regularized = mask.defined() || keep_h.defined();
  const RecurrentProduct recurrent_product(w_hh, h0, h_state, mask);
  const Launcher launch;

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_gru_cuda", [&] {
    using T = scalar_t;
    if constexpr (std::is_same_v<T, float>) {
      at::Tensor no_cell_state;
      if (!regularized && try_persistent_mma<Cell::Gru>(op, plan, H, gx, w_hh, bias, compute_view(h0, acc),
                                                           h_state, no_cell_state, output, workspace, training,
                                                           storage_of(dtype))) {
        return;
      }
    }
    const auto kernel = persistent_forward_kernel<T, Cell::Gru>;
    const PersistentLayout layout = persistent_layout(kernel, 3, H, H, false, sizeof(T), /*backward=*/false);
    if (use_persistent(op, layout, plan, regularized)) {
      const at::Tensor whh = compute_view(w_hh, acc), h0_c = compute_view(h0, acc);
      const at::Tensor table = plan_table(plan, gx);
      const auto args = persistent_forward_args<T>(plan, layout, table, H, H, gx, whh, bias, h0_c, h_state, output,
                                                   workspace, training, storage_of(dtype));
      launch_persistent("persistent_gru_forward", kernel, layout, args);
      return;
    }
    T* out = output.data_ptr<T>();
    T* ws = training ? workspace.data_ptr<T>() : nullptr;
    GruForwardArgs<T> args;
    args.hidden = H;
    args.gates_h = gates_h.data_ptr<T>();
    args.bias = bias.data_ptr<T>();
    args.h_state = h_state.data_ptr<T>();
    args.storage = storage_of(dtype);
    args.h_lowp = recurrent_product.lowp_copy();
    for (const auto s : c10::irange(plan.steps())) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      recurrent_product.run<T>(gates_h, rows, launch);
      args.rows = rows;
      args.gates_x = gx.data_ptr<T>() + off * 3 * H;
      args.h_copy = out + off * H;
      args.workspace = ws ? ws + off * kGruWorkspaceGates * H : nullptr;
      args.keep_h = keep_rows<T>(keep_h, off, H);
      args.keep_h_stride = keep_stride(keep_h);
      launch("gru_forward", gru_forward_kernel<T>, rows * H, args);
    }
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype), workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_recurrence_backward_cuda(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n, const at::Tensor& w_hh,
    const at::Tensor& h0, const at::Tensor& output, const at::Tensor& workspace,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout) {
  const char* op = kGruBackwardOp;
  check_devices(op, named("output", output),
                {named("grad_output", grad_output), named("grad_h_n", grad_h_n), named("w_hh", w_hh),
                 named("h0", h0), named("workspace", workspace), named("recurrent_mask", recurrent_mask),
                 named("zoneout", zoneout)},
                batch_sizes);
  const DeviceGuard device_guard(output.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(output.dim() == 2, op, ": output must be 2-D, got ", output.dim(), "-D");
  const int64_t H = output.size(1);
  check_matrix(op, "w_hh", w_hh, output, 3 * H, H);
  check_matrix(op, "h0", h0, output, -1, H);
  check_workspace(op, workspace, output, kGruWorkspaceGates, H);
  check_optional_grad(op, "grad_output", grad_output, output);
  check_optional_grad(op, "grad_h_n", grad_h_n, h0);
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor go = optional_compute_view(grad_output, acc);
  const at::Tensor ws_c = workspace.contiguous();
  at::Tensor dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, H}, options);
  const Launcher launch;
  const at::Tensor hprev = previous_h(plan, compute_view(output, acc), compute_view(h0, acc), launch);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, H, output, acc);
  const bool regularized = mask.defined() || keep_h.defined();
  // With a mask, dG_h W_hh of a step lands here before its masked rows join dh_t * z.
  at::Tensor product = mask.defined() ? at::empty({B, H}, options) : at::Tensor();
  at::Tensor grad_gates_x = at::empty({plan.rows, 3 * H}, options);
  at::Tensor grad_gates_h = at::empty({plan.rows, 3 * H}, options);

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_gru_backward_cuda", [&] {
    using T = scalar_t;
    const auto kernel = persistent_backward_kernel<T, Cell::Gru>;
    const PersistentLayout layout = persistent_layout(kernel, 3, H, H, false, sizeof(T), /*backward=*/true);
    if (use_persistent(op, layout, plan, regularized)) {
      const at::Tensor table = plan_table(plan, hprev);
      auto args = persistent_backward_args<T>(plan, layout, table, H, H, whh);
      args.workspace = ws_c.data_ptr<T>();
      args.h_prev = hprev.data_ptr<T>();
      args.grad_output = ptr_or_null<T>(go);
      args.dh_state = dh_state.data_ptr<T>();
      args.grad_gates = grad_gates_x.data_ptr<T>();
      args.grad_gates_h = grad_gates_h.data_ptr<T>();
      launch_persistent("persistent_gru_backward", kernel, layout, args);
      return;
    }
    const T* ws = plan.rows > 0 ? ws_c.data_ptr<T>() : nullptr;
    const T* go_p = ptr_or_null<T>(go);
    GruBackwardArgs<T> args;
    args.hidden = H;
    args.dh_state = dh_state.data_ptr<T>();
    for (int64_t s = plan.steps() - 1; s >= 0; --s) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      args.rows = rows;
      args.workspace = ws + off * kGruWorkspaceGates * H;
      args.h_prev = hprev.data_ptr<T>() + off * H;
      args.grad_output = go_p ? go_p + off * H : nullptr;
      args.grad_gates_x = grad_gates_x.data_ptr<T>() + off * 3 * H;
      args.grad_gates_h = grad_gates_h.data_ptr<T>() + off * 3 * H;
      args.keep_h = keep_rows<T>(keep_h, off, H);
      args.keep_h_stride = keep_stride(keep_h);
      launch("gru_backward", gru_backward_kernel<T>, rows * H, args);  // leaves dh_t * z in the state rows
      // dL/dh_{t-1} = dh_t * z + dG_h W_hh (times the recurrent mask): accumulated in place (beta = 1).
      if (mask.defined()) {
        gemm_nn<T>(rows, H, 3 * H, grad_gates_h.data_ptr<T>() + off * 3 * H, whh.data_ptr<T>(),
                   product.data_ptr<T>(), T(0));
        apply_mask<T>(launch, rows * H, product.data_ptr<T>(), mask, dh_state.data_ptr<T>(), true);
      } else {
        gemm_nn<T>(rows, H, 3 * H, grad_gates_h.data_ptr<T>() + off * 3 * H, whh.data_ptr<T>(),
                   dh_state.data_ptr<T>(), T(1));
      }
    }
  });
  at::Tensor grad_w_hh = grad_gates_h.t().mm(masked_rows(plan, hprev, mask));
  at::Tensor grad_b_hh = grad_gates_h.sum(0);
  return {to_dtype(grad_gates_x, dtype), to_dtype(grad_w_hh, dtype), to_dtype(grad_b_hh, dtype),
          to_dtype(dh_state, dtype)};
}

// ---------------------------------------------------------------------------------------------
// Elman RNN (tanh / relu)
// ---------------------------------------------------------------------------------------------

template <Activation act>
std::tuple<at::Tensor, at::Tensor> rnn_recurrence_cuda(const at::Tensor& gates_x, const at::Tensor& w_hh,
                                                        const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                        const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout) {
  const char* op = act == Activation::Tanh ? kRnnTanhOp : kRnnReluOp;
  check_devices(op, named("gates_x", gates_x),
                {named("w_hh", w_hh), named("b_hh", b_hh), named("h0", h0), named("recurrent_mask", recurrent_mask),
                 named("zoneout", zoneout)},
                batch_sizes);
  const DeviceGuard device_guard(gates_x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t H = check_recurrence_inputs(op, 1, gates_x, w_hh, b_hh, h0);
  TORCH_CHECK(w_hh.size(1) == H, op, ": w_hh must be [hidden, hidden] = [", H, ", ", H, "], got ", w_hh.sizes());
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), B, batch_sizes, reverse);

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const at::Tensor gx = compute_view(gates_x, acc);
  const at::Tensor bias = bias_or_zeros(b_hh, H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc);
  at::Tensor output = at::empty({plan.rows, H}, gates_x.options().dtype(acc));
  at::Tensor gates_h = at::empty({B, H}, gx.options());
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, H, gates_x, acc);
  const bool regularized = mask.defined() || keep_h.defined();
  const RecurrentProduct recurrent_product(w_hh, h0, h_state, mask, /*compute_dtype_product=*/keep_h.defined());
  const Launcher launch;

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_rnn_cuda", [&] {
    using T = scalar_t;
    constexpr Cell cell = act == Activation::Tanh ? Cell::RnnTanh : Cell::RnnRelu;
    if constexpr (std::is_same_v<T, float>) {
      at::Tensor no_cell_state, no_workspace;
      if (!regularized && try_persistent_mma<cell>(op, plan, H, gx, w_hh, bias, compute_view(h0, acc), h_state,
                                                      no_cell_state, output, no_workspace, false, storage_of(dtype))) {
        return;
      }
    }
    const auto kernel = persistent_forward_kernel<T, cell>;
    const PersistentLayout layout = persistent_layout(kernel, 1, H, H, false, sizeof(T), /*backward=*/false);
    if (use_persistent(op, layout, plan, regularized)) {
      const at::Tensor whh = compute_view(w_hh, acc), h0_c = compute_view(h0, acc);
      const at::Tensor table = plan_table(plan, gx);
      at::Tensor no_workspace;
      const auto args = persistent_forward_args<T>(plan, layout, table, H, H, gx, whh, bias, h0_c, h_state, output,
                                                   no_workspace, false, storage_of(dtype));
      launch_persistent("persistent_rnn_forward", kernel, layout, args);
      return;
    }
    T* out = output.data_ptr<T>();
    RnnForwardArgs<T> args;
    args.hidden = H;
    args.gates_h = gates_h.data_ptr<T>();
    args.bias = bias.data_ptr<T>();
    args.h_state = h_state.data_ptr<T>();
    args.storage = storage_of(dtype);
    args.h_lowp = recurrent_product.lowp_copy();
    for (const auto s : c10::irange(plan.steps())) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      recurrent_product.run<T>(gates_h, rows, launch);
      args.rows = rows;
      args.gates_x = gx.data_ptr<T>() + off * H;
      args.h_copy = out + off * H;
      args.keep_h = keep_rows<T>(keep_h, off, H);
      args.keep_h_stride = keep_stride(keep_h);
      launch("rnn_forward", rnn_forward_kernel<T, act>, rows * H, args);
    }
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype)};
}

template <Activation act>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_recurrence_backward_cuda(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n, const at::Tensor& w_hh,
    const at::Tensor& h0, const at::Tensor& output, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const c10::optional<at::Tensor>& gates_x, const c10::optional<at::Tensor>& b_hh) {
  const char* op = act == Activation::Tanh ? kRnnTanhBackwardOp : kRnnReluBackwardOp;
  check_devices(op, named("output", output),
                {named("grad_output", grad_output), named("grad_h_n", grad_h_n), named("w_hh", w_hh),
                 named("h0", h0), named("recurrent_mask", recurrent_mask), named("zoneout", zoneout),
                 named("gates_x", gates_x), named("b_hh", b_hh)},
                batch_sizes);
  const DeviceGuard device_guard(output.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(output.dim() == 2, op, ": output must be 2-D, got ", output.dim(), "-D");
  const int64_t H = output.size(1);
  check_matrix(op, "w_hh", w_hh, output, H, H);
  check_matrix(op, "h0", h0, output, -1, H);
  check_optional_grad(op, "grad_output", grad_output, output);
  check_optional_grad(op, "grad_h_n", grad_h_n, h0);
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor out = compute_view(output, acc);
  const at::Tensor go = optional_compute_view(grad_output, acc);
  at::Tensor dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, H}, options);
  at::Tensor grad_gates = at::empty({plan.rows, H}, options);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, H, output, acc);
  const bool regularized = mask.defined() || keep_h.defined();
  const Launcher launch;
  // With zoneout the output rows are not act(pre): the candidates h~ are recomputed from the
  // forward's gates_x and b_hh with the forward's per-step products and kernel (the same values).
  at::Tensor candidates, product;
  if (keep_h.defined()) {
    TORCH_CHECK(present(gates_x), op, ": with zoneout, the backward needs the forward's gates_x");
    check_matrix(op, "gates_x", *gates_x, output, plan.rows, H);
    if (present(b_hh)) check_vector(op, "b_hh", *b_hh, output, H);
    candidates = at::empty({plan.rows, H}, options);
    if (mask.defined()) product = at::empty({B, H}, options);
  }

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_rnn_backward_cuda", [&] {
    using T = scalar_t;
    constexpr Cell cell = act == Activation::Tanh ? Cell::RnnTanh : Cell::RnnRelu;
    const auto kernel = persistent_backward_kernel<T, cell>;
    const PersistentLayout layout = persistent_layout(kernel, 1, H, H, false, sizeof(T), /*backward=*/true);
    if (use_persistent(op, layout, plan, regularized)) {
      const at::Tensor table = plan_table(plan, out);
      auto args = persistent_backward_args<T>(plan, layout, table, H, H, whh);
      args.output = out.data_ptr<T>();
      args.grad_output = ptr_or_null<T>(go);
      args.dh_state = dh_state.data_ptr<T>();
      args.grad_gates = grad_gates.data_ptr<T>();
      launch_persistent("persistent_rnn_backward", kernel, layout, args);
      return;
    }
    const T* go_p = ptr_or_null<T>(go);
    if (keep_h.defined() && plan.rows > 0) {
      const at::Tensor gx = compute_view(*gates_x, acc);
      const at::Tensor bias = bias_or_zeros(b_hh, H, output, acc);
      const at::Tensor hprev = previous_h(plan, out, compute_view(h0, acc), launch);
      at::Tensor gates_h = at::empty({B, H}, options);
      at::Tensor masked_h = mask.defined() ? at::empty({B, H}, options) : at::Tensor();
      RnnForwardArgs<T> forward;
      forward.hidden = H;
      forward.gates_h = gates_h.data_ptr<T>();
      forward.bias = bias.data_ptr<T>();
      for (const auto s : c10::irange(plan.steps())) {
        const int64_t t = plan.step_at(s);
        const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
        const T* h_prev = hprev.data_ptr<T>() + off * H;
        if (mask.defined()) {
          apply_mask<T>(launch, rows * H, h_prev, mask, masked_h.data_ptr<T>(), false);
          h_prev = masked_h.data_ptr<T>();
        }
        gemm_nt<T>(rows, H, H, h_prev, whh.data_ptr<T>(), gates_h.data_ptr<T>(), T(0));
        forward.rows = rows;
        forward.gates_x = gx.data_ptr<T>() + off * H;
        forward.h_state = candidates.data_ptr<T>() + off * H;
        forward.h_copy = candidates.data_ptr<T>() + off * H;
        launch("rnn_candidates", rnn_forward_kernel<T, act>, rows * H, forward);
      }
    }
    RnnBackwardArgs<T> args;
    args.hidden = H;
    args.dh_state = dh_state.data_ptr<T>();
    args.keep_h_stride = keep_stride(keep_h);
    args.dh_kept = keep_h.defined() ? dh_state.data_ptr<T>() : nullptr;  // k dL/dh_t, which the GEMM adds to
    for (int64_t s = plan.steps() - 1; s >= 0; --s) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      args.rows = rows;
      args.h = (keep_h.defined() ? candidates : out).data_ptr<T>() + off * H;
      args.grad_output = go_p ? go_p + off * H : nullptr;
      args.grad_gates = grad_gates.data_ptr<T>() + off * H;
      args.keep_h = keep_rows<T>(keep_h, off, H);
      launch("rnn_backward", rnn_backward_kernel<T, act>, rows * H, args);
      const T* dg = grad_gates.data_ptr<T>() + off * H;
      if (!keep_h.defined()) {
        gemm_nn<T>(rows, H, H, dg, whh.data_ptr<T>(), dh_state.data_ptr<T>(), T(0));
        if (mask.defined()) {
          apply_mask<T>(launch, rows * H, dh_state.data_ptr<T>(), mask, dh_state.data_ptr<T>(), false);
        }
      } else if (!mask.defined()) {
        gemm_nn<T>(rows, H, H, dg, whh.data_ptr<T>(), dh_state.data_ptr<T>(), T(1));  // onto k dL/dh_t
      } else {
        gemm_nn<T>(rows, H, H, dg, whh.data_ptr<T>(), product.data_ptr<T>(), T(0));
        apply_mask<T>(launch, rows * H, product.data_ptr<T>(), mask, dh_state.data_ptr<T>(), true);
      }
    }
  });
  const at::Tensor hprev = masked_rows(plan, previous_h(plan, out, compute_view(h0, acc), launch), mask);
  at::Tensor grad_w_hh = grad_gates.t().mm(hprev);
  at::Tensor grad_b_hh = grad_gates.sum(0);
  return {to_dtype(grad_gates, dtype), to_dtype(grad_w_hh, dtype), to_dtype(grad_b_hh, dtype),
          to_dtype(dh_state, dtype)};
}

// ---------------------------------------------------------------------------------------------
// LayerNorm LSTM and GRU (csrc/cpu/layer_norm_cpu.cpp defines the semantics): per step one GEMM in
// the compute dtype and one kernel with a block per row (layer_norm_kernels.cuh); the backward's
// dW_hh and the gains' and biases' gradients are one GEMM / reduction each after the loop.
// ---------------------------------------------------------------------------------------------

// kernel<<<rows, kThreads>>>(args) on the current stream (one block per row); nothing for 0 rows.
template <typename Args>
void launch_per_row(const char* name, void (*kernel)(Args), int64_t rows, const Args& args) {
  if (rows <= 0) return;
  launch_kernel(name, kernel, dim3(static_cast<unsigned int>(rows)), dim3(kThreads), 0, current_stream(), args);
}

// The forward time loop of both cells (G = 4: LSTM, with c_state / cell_* and the optional
// projection whr [P, H]; G = 3: GRU).
template <typename T>
void layer_norm_forward_loop(const StepPlan& plan, int64_t G, int64_t H, double eps, bool training,
                             at::ScalarType storage, const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& whr,
                             const at::Tensor& h0, const at::Tensor& gain, const at::Tensor& shift,
                             const at::Tensor& cell_gain, const at::Tensor& cell_bias, const at::Tensor& mask,
                             const at::Tensor& keep_h, const at::Tensor& keep_c, at::Tensor& h_state,
                             at::Tensor& c_state, at::Tensor& output, at::Tensor& workspace) {
  const int64_t B = plan.batch, GH = G * H, P = w_hh.size(1);
  const bool proj = whr.defined();
  // With a projection: r = o tanh(c^) of the step's rows, and h_{t-1} kept for zoneout.
  at::Tensor r_buffer = proj ? at::empty({B, H}, gx.options()) : at::Tensor();
  at::Tensor h_prev = proj && keep_h.defined() ? at::empty({B, P}, gx.options()) : at::Tensor();
  const int64_t W = G == 4 ? layer_norm_lstm_workspace_width(H) : layer_norm_gru_workspace_width(H);
  const auto options = gx.options();
  at::Tensor product = at::empty({B, GH}, options);
  at::Tensor scratch = training ? at::Tensor() : at::empty({B, W}, options);
  const Launcher launch;
  // The masked h_{t-1} and the GEMM in the compute dtype for every dtype (the normalization follows).
  const RecurrentProduct recurrent(w_hh, h0, h_state, mask, /*compute_dtype_product=*/true);
  LayerNormForwardArgs<T> args;
  args.hidden = H;
  args.eps = static_cast<T>(eps);
  args.product = product.data_ptr<T>();
  args.gain = gain.data_ptr<T>();
  args.shift = shift.data_ptr<T>();
  args.cell_gain = ptr_or_null<T>(cell_gain);
  args.cell_bias = ptr_or_null<T>(cell_bias);
  args.keep_h_stride = keep_stride(keep_h);
  args.keep_c_stride = keep_stride(keep_c);
  args.h_state = proj ? r_buffer.data_ptr<T>() : h_state.data_ptr<T>();
  args.c_state = c_state.defined() ? c_state.data_ptr<T>() : nullptr;
  args.storage = proj ? Storage::Same : storage_of(storage);  // r is not rounded, h_t is (below)
  const auto kernel = G == 4 ? layer_norm_lstm_forward_kernel<T> : layer_norm_gru_forward_kernel<T>;
  for (const auto s : c10::irange(plan.steps())) {
    const int64_t t = plan.step_at(s);
    const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
    recurrent.run<T>(product, rows, launch);
    args.rows = rows;
    args.gates_x = gx.data_ptr<T>() + off * GH;
    args.keep_h = proj ? nullptr : keep_rows<T>(keep_h, off, H);  // with a projection: after it, below
    args.keep_c = keep_rows<T>(keep_c, off, H);
    args.h_copy = proj ? nullptr : output.data_ptr<T>() + off * H;
    args.workspace = training ? workspace.data_ptr<T>() + off * W : scratch.data_ptr<T>();
    launch_per_row(G == 4 ? "layer_norm_lstm_forward" : "layer_norm_gru_forward", kernel, rows, args);
    if (proj) {  // h_t = zoneout(h_{t-1}, r W_hr^T), rounded, into the state and the output rows
      if (keep_h.defined()) copy_rows<T>(launch, rows * P, h_state.data_ptr<T>(), h_prev.data_ptr<T>(), false);
      gemm_nt<T>(rows, P, H, r_buffer.data_ptr<T>(), whr.data_ptr<T>(), h_state.data_ptr<T>(), T(0));
      StoreStateArgs<T> store;
      store.count = rows * P;
      store.h_state = h_state.data_ptr<T>();
      store.h_copy = output.data_ptr<T>() + off * P;
      store.storage = storage_of(storage);
      store.keep = keep_rows<T>(keep_h, off, P);
      store.keep_stride = keep_stride(keep_h);
      store.h_prev = keep_h.defined() ? h_prev.data_ptr<T>() : nullptr;
      launch("store_state", store_state_kernel<T>, rows * P, store);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_lstm_cuda(
    const at::Tensor& gates_x, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const at::Tensor& hh_gain, const at::Tensor& hh_bias, const at::Tensor& cell_gain, const at::Tensor& cell_bias,
    const at::Tensor& h0, const at::Tensor& c0, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    bool training, double eps, const c10::optional<at::Tensor>& recurrent_mask,
    const c10::optional<at::Tensor>& zoneout, const c10::optional<at::Tensor>& cell_zoneout,
    const c10::optional<at::Tensor>& w_hr) {
  const char* op = kLayerNormLstmOp;
  check_devices(op, named("gates_x", gates_x),
                {named("w_hh", w_hh), named("b_hh", b_hh), named("hh_gain", hh_gain), named("hh_bias", hh_bias),
                 named("cell_gain", cell_gain), named("cell_bias", cell_bias), named("h0", h0), named("c0", c0),
                 named("recurrent_mask", recurrent_mask), named("zoneout", zoneout),
                 named("cell_zoneout", cell_zoneout), named("w_hr", w_hr)},
                batch_sizes);
  const DeviceGuard device_guard(gates_x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t H = check_layer_norm_inputs(op, 4, gates_x, w_hh, b_hh, hh_gain, hh_bias, &cell_gain, &cell_bias, h0,
                                            &c0, &w_hr, eps);
  const int64_t P = w_hh.size(1);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), h0.size(0), batch_sizes, reverse);
  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = gates_x.options().dtype(acc);
  const at::Tensor gx = compute_view(gates_x, acc);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, P, gates_x, acc);
  const at::Tensor keep_c = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc), c_state = state_copy(c0, acc);
  at::Tensor output = at::empty({plan.rows, P}, options);
  at::Tensor workspace =
      training ? at::empty({plan.rows, layer_norm_lstm_workspace_width(H)}, options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_lstm_cuda", [&] {
    layer_norm_forward_loop<scalar_t>(plan, 4, H, eps, training, dtype, gx, w_hh, optional_compute_view(w_hr, acc), h0,
                                      compute_view(hh_gain, acc),
                                      layer_norm_shift(hh_bias, b_hh, acc), compute_view(cell_gain, acc),
                                      compute_view(cell_bias, acc), mask, keep_h, keep_c, h_state, c_state, output,
                                      workspace);
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype), to_dtype(c_state, dtype), workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_gru_cuda(
    const at::Tensor& gates_x, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const at::Tensor& hh_gain, const at::Tensor& hh_bias, const at::Tensor& h0,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, bool training, double eps,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout) {
  const char* op = kLayerNormGruOp;
  check_devices(op, named("gates_x", gates_x),
                {named("w_hh", w_hh), named("b_hh", b_hh), named("hh_gain", hh_gain), named("hh_bias", hh_bias),
                 named("h0", h0), named("recurrent_mask", recurrent_mask), named("zoneout", zoneout)},
                batch_sizes);
  const DeviceGuard device_guard(gates_x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t H = check_layer_norm_inputs(op, 3, gates_x, w_hh, b_hh, hh_gain, hh_bias, nullptr, nullptr, h0,
                                            nullptr, nullptr, eps);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), h0.size(0), batch_sizes, reverse);
  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = gates_x.options().dtype(acc);
  const at::Tensor gx = compute_view(gates_x, acc);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc), no_cells;
  at::Tensor output = at::empty({plan.rows, H}, options);
  at::Tensor workspace =
      training ? at::empty({plan.rows, layer_norm_gru_workspace_width(H)}, options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_gru_cuda", [&] {
    layer_norm_forward_loop<scalar_t>(plan, 3, H, eps, training, dtype, gx, w_hh, at::Tensor(), h0,
                                      compute_view(hh_gain, acc),
                                      layer_norm_shift(hh_bias, b_hh, acc), at::Tensor(), at::Tensor(), mask, keep_h,
                                      at::Tensor(), h_state, no_cells, output, workspace);
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype), workspace};
}

// The backward time loop of both cells. Fills grad_gx, grad_hh, grad_product, grad_c_hat (LSTM),
// dh_state and dc_state (LSTM), and with the LSTM's projection whr [P, H] grad_h_cand (dL/dh~,
// [N, P]) and r_rows (o tanh(c^), [N, H]); dW_hh, dW_hr and the gains' gradients follow from them.
template <typename T>
void layer_norm_backward_loop(const StepPlan& plan, int64_t G, int64_t H, const at::Tensor& ws, const at::Tensor& hprev,
                              const at::Tensor& cprev, const at::Tensor& whh, const at::Tensor& whr,
                              const at::Tensor& gain, const at::Tensor& cell_gain, const at::Tensor& cell_bias,
                              const at::Tensor& go, const at::Tensor& mask, const at::Tensor& keep_h,
                              const at::Tensor& keep_c, at::Tensor& dh_state, at::Tensor& dc_state,
                              at::Tensor& grad_gx, at::Tensor& grad_hh, at::Tensor& grad_product,
                              at::Tensor& grad_c_hat, at::Tensor& grad_h_cand, at::Tensor& r_rows) {
  const int64_t B = plan.batch, GH = G * H, P = whh.size(1);
  const bool proj = whr.defined();
  const int64_t W = G == 4 ? layer_norm_lstm_workspace_width(H) : layer_norm_gru_workspace_width(H);
  const auto options = grad_gx.options();
  const Launcher launch;
  at::Tensor scratch = G == 4 ? at::empty({B, 2 * H}, options) : at::Tensor();
  at::Tensor product = mask.defined() ? at::empty({B, P}, options) : at::Tensor();  // dP W_hh before the mask
  at::Tensor grad_r = proj ? at::empty({B, H}, options) : at::Tensor();            // dL/dr of a step
  LayerNormBackwardArgs<T> args;
  args.hidden = H;
  args.gain = gain.data_ptr<T>();
  args.cell_gain = ptr_or_null<T>(cell_gain);
  args.cell_bias = ptr_or_null<T>(cell_bias);
  args.keep_h_stride = keep_stride(keep_h);
  args.keep_c_stride = keep_stride(keep_c);
  // With a projection the kernel reads dL/dr (and clears it: no zoneout inside); else dL/dh_t.
  args.dh_state = proj ? grad_r.data_ptr<T>() : dh_state.data_ptr<T>();
  args.dc_state = dc_state.defined() ? dc_state.data_ptr<T>() : nullptr;
  args.scratch = scratch.defined() ? scratch.data_ptr<T>() : nullptr;
  T* dh = dh_state.data_ptr<T>();
  const T* go_p = ptr_or_null<T>(go);
  const auto kernel = G == 4 ? layer_norm_lstm_backward_kernel<T> : layer_norm_gru_backward_kernel<T>;
  for (int64_t s = plan.steps() - 1; s >= 0; --s) {
    const int64_t t = plan.step_at(s);
    const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
    if (proj) {  // dL/dh~ = (1 - k) (dL/dh_t + grad_output); k (...) stays in the state rows for h_{t-1}
      T* cand = grad_h_cand.data_ptr<T>() + off * P;
      copy_rows<T>(launch, rows * P, dh, cand, false);
      if (go_p) copy_rows<T>(launch, rows * P, go_p + off * P, cand, true);
      if (keep_h.defined()) {
        ZoneoutSplitArgs<T> split;
        split.count = rows * P;
        split.keep = keep_rows<T>(keep_h, off, P);
        split.keep_stride = keep_stride(keep_h);
        split.grad = cand;
        split.kept = dh;
        launch("zoneout_split", zoneout_split_kernel<T>, rows * P, split);
      }
      // dL/dr = dL/dh~ W_hr: [rows, P] x [P, H]
      gemm_nn<T>(rows, H, P, cand, whr.data_ptr<T>(), grad_r.data_ptr<T>(), T(0));
    }
    args.rows = rows;
    args.workspace = ws.data_ptr<T>() + off * W;
    args.h_prev = hprev.data_ptr<T>() + off * P;
    args.c_prev = cprev.defined() ? cprev.data_ptr<T>() + off * H : nullptr;
    args.keep_h = proj ? nullptr : keep_rows<T>(keep_h, off, H);
    args.keep_c = keep_rows<T>(keep_c, off, H);
    args.grad_output = go_p && !proj ? go_p + off * H : nullptr;
    args.grad_gates_x = grad_gx.data_ptr<T>() + off * GH;
    args.grad_hh = grad_hh.data_ptr<T>() + off * GH;
    args.grad_c_hat = grad_c_hat.defined() ? grad_c_hat.data_ptr<T>() + off * H : nullptr;
    args.grad_product = grad_product.data_ptr<T>() + off * GH;
    args.r_out = proj ? r_rows.data_ptr<T>() + off * H : nullptr;
    launch_per_row(G == 4 ? "layer_norm_lstm_backward" : "layer_norm_gru_backward", kernel, rows, args);
    // dL/dh_{t-1} = (its direct part, left in the state rows: none with a projection and no
    // zoneout) + (dP W_hh) * mask.
    const T* dp = grad_product.data_ptr<T>() + off * GH;
    const bool accumulate = !proj || keep_h.defined();
    if (mask.defined()) {
      gemm_nn<T>(rows, P, GH, dp, whh.data_ptr<T>(), product.data_ptr<T>(), T(0));
      apply_mask<T>(launch, rows * P, product.data_ptr<T>(), mask, dh, accumulate);
    } else {
      gemm_nn<T>(rows, P, GH, dp, whh.data_ptr<T>(), dh, accumulate ? T(1) : T(0));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
layer_norm_lstm_backward_cuda(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
                              const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh,
                              const at::Tensor& hh_gain, const at::Tensor& cell_gain, const at::Tensor& cell_bias,
                              const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output,
                              const at::Tensor& workspace, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
                              const c10::optional<at::Tensor>& recurrent_mask,
                              const c10::optional<at::Tensor>& zoneout, const c10::optional<at::Tensor>& cell_zoneout,
                              const c10::optional<at::Tensor>& w_hr) {
  const char* op = kLayerNormLstmBackwardOp;
  check_devices(op, named("output", output),
                {named("grad_output", grad_output), named("grad_h_n", grad_h_n), named("grad_c_n", grad_c_n),
                 named("w_hh", w_hh), named("hh_gain", hh_gain), named("cell_gain", cell_gain),
                 named("cell_bias", cell_bias), named("h0", h0), named("c0", c0), named("workspace", workspace),
                 named("recurrent_mask", recurrent_mask), named("zoneout", zoneout),
                 named("cell_zoneout", cell_zoneout), named("w_hr", w_hr)},
                batch_sizes);
  const DeviceGuard device_guard(output.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t H = check_layer_norm_backward_inputs(op, 4, output, w_hh, hh_gain, &cell_gain, &cell_bias, h0, &c0,
                                                     grad_output, grad_h_n, &grad_c_n, workspace, &w_hr);
  const int64_t GH = 4 * H, B = h0.size(0), P = output.size(1);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);
  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const Launcher launch;
  const at::Tensor ws = workspace.contiguous();
  const at::Tensor hprev = previous_h(plan, compute_view(output, acc), compute_view(h0, acc), launch);
  // c_{t-1} of every row: the carried cell states (the workspace's c_t column) of the previous step.
  const at::Tensor cprev =
      previous_h(plan, ws.narrow(1, 2 * GH, H).contiguous(), compute_view(c0, acc), launch);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, P, output, acc);
  const at::Tensor keep_c = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, output, acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor whr = optional_compute_view(w_hr, acc);
  const bool proj = whr.defined();
  at::Tensor dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, P}, options);
  at::Tensor dc_state = present(grad_c_n) ? state_copy(*grad_c_n, acc) : at::zeros({B, H}, options);
  at::Tensor grad_gx = at::empty({plan.rows, GH}, options), grad_hh = at::empty({plan.rows, GH}, options);
  at::Tensor grad_product = at::empty({plan.rows, GH}, options), grad_c_hat = at::empty({plan.rows, H}, options);
  at::Tensor grad_h_cand = proj ? at::empty({plan.rows, P}, options) : at::Tensor();
  at::Tensor r_rows = proj ? at::empty({plan.rows, H}, options) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_lstm_backward_cuda", [&] {
    layer_norm_backward_loop<scalar_t>(plan, 4, H, ws, hprev, cprev, whh, whr, compute_view(hh_gain, acc),
                                       compute_view(cell_gain, acc), compute_view(cell_bias, acc),
                                       optional_compute_view(grad_output, acc), mask, keep_h, keep_c, dh_state,
                                       dc_state, grad_gx, grad_hh, grad_product, grad_c_hat, grad_h_cand, r_rows);
  });
  at::Tensor grad_w_hh = grad_product.t().mm(masked_rows(plan, hprev, mask));
  at::Tensor grad_w_hr = proj ? grad_h_cand.t().mm(r_rows) : at::empty({0}, options);
  at::Tensor grad_gain = (grad_hh * ws.narrow(1, GH, GH)).sum(0);
  at::Tensor grad_bias = grad_hh.sum(0);  // of hh_bias and of b_hh alike
  at::Tensor grad_cell_gain = (grad_c_hat * ws.narrow(1, 2 * GH + H, H)).sum(0);
  at::Tensor grad_cell_bias = grad_c_hat.sum(0);
  return {to_dtype(grad_gx, dtype),        to_dtype(grad_w_hh, dtype),  to_dtype(grad_bias, dtype),
          to_dtype(grad_gain, dtype),      to_dtype(grad_bias, dtype),  to_dtype(grad_cell_gain, dtype),
          to_dtype(grad_cell_bias, dtype), to_dtype(dh_state, dtype),   to_dtype(dc_state, dtype),
          to_dtype(grad_w_hr, dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_gru_backward_cuda(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n, const at::Tensor& w_hh,
    const at::Tensor& hh_gain, const at::Tensor& h0, const at::Tensor& output, const at::Tensor& workspace,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, const c10::optional<at::Tensor>& recurrent_mask,
    const c10::optional<at::Tensor>& zoneout) {
  const char* op = kLayerNormGruBackwardOp;
  check_devices(op, named("output", output),
                {named("grad_output", grad_output), named("grad_h_n", grad_h_n), named("w_hh", w_hh),
                 named("hh_gain", hh_gain), named("h0", h0), named("workspace", workspace),
                 named("recurrent_mask", recurrent_mask), named("zoneout", zoneout)},
                batch_sizes);
  const DeviceGuard device_guard(output.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t H = check_layer_norm_backward_inputs(op, 3, output, w_hh, hh_gain, nullptr, nullptr, h0, nullptr,
                                                     grad_output, grad_h_n, nullptr, workspace, nullptr);
  const int64_t GH = 3 * H, B = h0.size(0);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);
  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const Launcher launch;
  const at::Tensor ws = workspace.contiguous();
  const at::Tensor hprev = previous_h(plan, compute_view(output, acc), compute_view(h0, acc), launch);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, H, output, acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  at::Tensor dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, H}, options);
  at::Tensor no_cells, no_c_hat, no_h_cand, no_r;
  at::Tensor grad_gx = at::empty({plan.rows, GH}, options), grad_hh = at::empty({plan.rows, GH}, options);
  at::Tensor grad_product = at::empty({plan.rows, GH}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_gru_backward_cuda", [&] {
    layer_norm_backward_loop<scalar_t>(plan, 3, H, ws, hprev, at::Tensor(), whh, at::Tensor(),
                                       compute_view(hh_gain, acc), at::Tensor(), at::Tensor(),
                                       optional_compute_view(grad_output, acc), mask, keep_h, at::Tensor(), dh_state,
                                       no_cells, grad_gx, grad_hh, grad_product, no_c_hat, no_h_cand, no_r);
  });
  at::Tensor grad_w_hh = grad_product.t().mm(masked_rows(plan, hprev, mask));
  at::Tensor grad_gain = (grad_hh * ws.narrow(1, GH, GH)).sum(0);
  at::Tensor grad_bias = grad_hh.sum(0);
  return {to_dtype(grad_gx, dtype),   to_dtype(grad_w_hh, dtype),  to_dtype(grad_bias, dtype),
          to_dtype(grad_gain, dtype), to_dtype(grad_bias, dtype),  to_dtype(dh_state, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(RNNFUSED_CUDA_OPS_NAMESPACE, RNNFUSED_CUDA_DISPATCH_KEY, m) {
  m.impl("lstm_recurrence", &lstm_recurrence_cuda);
  m.impl("lstm_recurrence_backward", &lstm_recurrence_backward_cuda);
  m.impl("gru_recurrence", &gru_recurrence_cuda);
  m.impl("gru_recurrence_backward", &gru_recurrence_backward_cuda);
  m.impl("rnn_tanh_recurrence", &rnn_recurrence_cuda<Activation::Tanh>);
  m.impl("rnn_relu_recurrence", &rnn_recurrence_cuda<Activation::Relu>);
  m.impl("rnn_tanh_recurrence_backward", &rnn_recurrence_backward_cuda<Activation::Tanh>);
  m.impl("rnn_relu_recurrence_backward", &rnn_recurrence_backward_cuda<Activation::Relu>);
  m.impl("layer_norm_lstm_recurrence", &layer_norm_lstm_cuda);
  m.impl("layer_norm_lstm_recurrence_backward", &layer_norm_lstm_backward_cuda);
  m.impl("layer_norm_gru_recurrence", &layer_norm_gru_cuda);
  m.impl("layer_norm_gru_recurrence_backward", &layer_norm_gru_backward_cuda);
}

}  // namespace rnnfused::cuda
