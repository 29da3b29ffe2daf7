// Argument checks of the recurrence ops, with messages that name the op and the argument.
// Shared by the CPU and CUDA implementations (host code only).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <string>
#include <vector>

namespace rnnfused {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// `what` must be a 2-D tensor of `rows` x `cols` (negative: any) with the dtype and device of the
// reference `ref` (named ref_name in the messages).
inline void check_matrix(const char* op, const char* what, const at::Tensor& t, const at::Tensor& ref,
                         int64_t rows, int64_t cols, const char* ref_name = "gates_x") {
  TORCH_CHECK(t.dim() == 2, op, ": ", what, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(rows < 0 || t.size(0) == rows, op, ": ", what, " must have ", rows, " rows, got shape ",
              t.sizes());
  TORCH_CHECK(cols < 0 || t.size(1) == cols, op, ": ", what, " must have ", cols, " columns, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", what, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", what, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
}

inline void check_vector(const char* op, const char* what, const at::Tensor& t, const at::Tensor& ref,
                         int64_t size, const char* ref_name = "gates_x") {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", what, " must have shape [", size, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", what, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", what, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
}

// The time structure of a call: which rows belong to which step.
//
// Rows follow the packed layout of torch.nn.utils.rnn.PackedSequence: step t owns
// batch_sizes[t] contiguous rows starting at offsets[t], and batch sizes never grow with t, so
// the active rows of a step are always rows [0, batch_sizes[t]) of the batch. A padded [T, B]
// batch is the special case batch_sizes[t] = B.
struct StepPlan {
  int64_t rows = 0;   // N
  int64_t batch = 0;  // B
  std::vector<int64_t> batch_sizes;  // [T]
  std::vector<int64_t> offsets;      // [T]: first row of each step
  bool reverse = false;

  int64_t steps() const { return static_cast<int64_t>(batch_sizes.size()); }
  // The step processed at position s of the recurrence (0 = first computed).
  int64_t step_at(int64_t s) const { return reverse ? steps() - 1 - s : s; }
  // The step whose state feeds step t (-1 for the first computed step).
  int64_t previous_step(int64_t t) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return (p < 0 || p >= steps()) ? -1 : p;
  }
  // How many of the active rows of step t continue from the previous step; the others start
  // from h0 / c0. All of them in the forward direction; in reverse a row starts at its last step.
  int64_t rows_from_previous(int64_t t) const {
    const int64_t p = previous_step(t);
    return p < 0 ? 0 : std::min(batch_sizes[t], batch_sizes[p]);
  }
};

// batch_sizes: optional 1-D int64 CPU tensor (PackedSequence.batch_sizes); absent for a padded
// batch, where every step has `batch` rows.
inline StepPlan make_step_plan(const char* op, int64_t rows, int64_t batch,
                               const c10::optional<at::Tensor>& batch_sizes, bool reverse) {
  StepPlan plan;
  plan.rows = rows;
  plan.batch = batch;
  plan.reverse = reverse;
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1, op, ": batch_sizes must be 1-D, got ", bs.dim(), "-D");
    TORCH_CHECK(bs.scalar_type() == at::kLong, op, ": batch_sizes must be int64, got ", bs.scalar_type());
    TORCH_CHECK(bs.device().is_cpu(), op, ": batch_sizes must be a CPU tensor (as in PackedSequence), got ",
                bs.device());
    const at::Tensor bs_c = bs.contiguous();
    const int64_t* data = bs_c.data_ptr<int64_t>();
    const int64_t steps = bs_c.numel();
    plan.batch_sizes.assign(data, data + steps);
    plan.offsets.resize(steps);
    int64_t total = 0;
    for (const auto t : c10::irange(steps)) {
      const int64_t b = plan.batch_sizes[t];
      TORCH_CHECK(b > 0, op, ": batch_sizes must be positive, got ", b, " at step ", t);
      TORCH_CHECK(t == 0 || b <= plan.batch_sizes[t - 1], op,
                  ": batch_sizes must be non-increasing (sorted packed layout), got ", plan.batch_sizes[t - 1],
                  " then ", b, " at step ", t);
      plan.offsets[t] = total;
      total += b;
    }
    TORCH_CHECK(steps == 0 || plan.batch_sizes[0] == batch, op, ": batch_sizes[0] (", steps ? plan.batch_sizes[0] : 0,
                ") must equal the batch of h0 (", batch, ")");
    TORCH_CHECK(total == rows, op, ": batch_sizes sum to ", total, " but gates_x has ", rows, " rows");
  } else {
    TORCH_CHECK(batch > 0 || rows == 0, op, ": h0 has an empty batch but gates_x has ", rows, " rows");
    const int64_t steps = batch > 0 ? rows / batch : 0;
    TORCH_CHECK(steps * batch == rows, op, ": gates_x has ", rows, " rows, not a multiple of the batch ", batch,
                " (pass batch_sizes for a packed batch)");
    plan.batch_sizes.assign(steps, batch);
    plan.offsets.resize(steps);
    for (const auto t : c10::irange(steps)) plan.offsets[t] = t * batch;
  }
  return plan;
}

// The shared checks of a recurrence forward. Returns the hidden size H.
//   gates_x: [N, G*H]   w_hh: [G*H, P]   b_hh: [G*H]   h0: [B, P]
inline int64_t check_recurrence_inputs(const char* op, int64_t gates, const at::Tensor& gates_x,
                                       const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
                                       const at::Tensor& h0) {
  TORCH_CHECK(gates_x.dim() == 2, op, ": gates_x must be 2-D [rows, ", gates, " * hidden], got ",
              gates_x.dim(), "-D");
  TORCH_CHECK(is_supported_dtype(gates_x.scalar_type()), op,
              ": supports float32, float64, bfloat16 and float16, got ", gates_x.scalar_type());
  TORCH_CHECK(gates_x.size(1) % gates == 0 && gates_x.size(1) > 0, op, ": gates_x must have ", gates,
              " * hidden columns, got ", gates_x.size(1));
  const int64_t hidden = gates_x.size(1) / gates;
  check_matrix(op, "w_hh", w_hh, gates_x, gates * hidden, -1);
  TORCH_CHECK(w_hh.size(1) > 0, op, ": w_hh must have at least one column");
  if (b_hh.has_value() && b_hh->defined()) check_vector(op, "b_hh", *b_hh, gates_x, gates * hidden);
  check_matrix(op, "h0", h0, gates_x, -1, w_hh.size(1));
  return hidden;
}

}  // namespace rnnfused
