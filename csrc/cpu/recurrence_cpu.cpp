// The recurrence ops on the CPU: the time loops around one GEMM per step (h_{t-1} W_hh^T into a
// preallocated buffer) and one fused, vectorized, multi-threaded pass over the gates
// (pointwise.h). Backward mirrors the loop in reverse; dW_hh, db_hh and dW_hr are one GEMM /
// reduction each over all steps, after the loop. Nothing is allocated inside a time loop.
//
// float32 and float64 run in their own type. bfloat16 and float16 run the float32 loop on
// float copies, rounding h_t to the input dtype every step (so the state carried forward is
// exactly the output the caller sees, and backward differentiates what forward computed)
// while the cell state and the workspace stay float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cstring>

#include "../cell_math.h"
#include "../recurrence.h"
#include "blas.h"
#include "buffer_cache.h"
#include "bulk_gemm.h"
#include "engine.h"
#include "op_helpers.h"
#include "pointwise.h"
#include "team.h"  // CallThreads

namespace rnnfused::cpu {
namespace {

// hprev [N, P]: row r holds the h_{t-1} that the row's step read: the previous step's output row
// for rows that continue, h0 for rows that start at this step. Feeds dW_hh = dG^T hprev.
template <typename T>
void gather_previous_h(const StepPlan& plan, const T* output, const T* h0, int64_t width, T* hprev) {
  for (const auto t : c10::irange(plan.steps())) {
    const int64_t rows = plan.batch_sizes[t];
    const int64_t from_prev = plan.rows_from_previous(t);
    T* dst = hprev + plan.offsets[t] * width;
    if (from_prev > 0) {
      std::memcpy(dst, output + plan.offsets[plan.previous_step(t)] * width, from_prev * width * sizeof(T));
    }
    std::memcpy(dst + from_prev * width, h0 + from_prev * width, (rows - from_prev) * width * sizeof(T));
  }
}

at::Tensor previous_h(const StepPlan& plan, const at::Tensor& output, const at::Tensor& h0) {
  at::Tensor hprev = empty_recycled(output.sizes(), output.options());
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "rnnfused_previous_h", [&] {
    gather_previous_h<scalar_t>(plan, output.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), output.size(1),
                                hprev.data_ptr<scalar_t>());
  });
  return hprev;
}

// Whether a call runs on the fused engine (engine.h): never with the LSTM projection, a recurrent
// dropout mask or zoneout (`regularized`: the per-step path applies them). `training`: a forward
// that records the workspace for backward, or a backward.
bool use_engine(bool proj, bool regularized, int64_t batch, CellKind cell, bool training) {
  return !proj && !regularized && engine_runs(batch, gate_blocks(cell), training);
}

// ---------------------------------------------------------------------------------------------
// Recurrent dropout: recurrent_mask [B, P] multiplies h_{t-1} before the product with W_hh, row b
// of every step by mask row b. The state and the outputs stay unmasked.
// ---------------------------------------------------------------------------------------------

// state[i] += product[i] * mask[i]: the masked W_hh part of dL/dh_{t-1} joining its direct part.
template <typename T>
void add_masked(int64_t count, const T* product, const T* mask, T* state) {
  for (int64_t i = 0; i < count; ++i) state[i] += product[i] * mask[i];
}

// ---------------------------------------------------------------------------------------------
// Zoneout: keep weights k blend the previous state into the new one, s_t = k s_{t-1} + (1 - k) s~_t
// (h, and the LSTM's c with cell_zoneout). k is [N, width] (one per row and unit: Bernoulli(p)
// draws in training) or a scalar (p, in eval mode).
// ---------------------------------------------------------------------------------------------

// out = k * prev + (1 - k) * candidate over `count` elements of consecutive rows; `out` may be
// `prev` or `candidate`.
template <typename T>
void zoneout_blend(int64_t count, const T* k, int64_t stride, const T* prev, const T* candidate, T* out) {
  for (int64_t i = 0; i < count; ++i) {
    out[i] = rnnfused::zoneout(k[i * stride], prev[i], candidate[i]);
  }
}

// The gradient g (+ extra) of a zoned state splits: kept = k g flows to s_{t-1}, and g becomes
// (1 - k) g, the gradient of the candidate.
template <typename T>
void zoneout_split(int64_t count, const T* k, int64_t stride, T* grad, const T* extra, T* kept) {
  for (int64_t i = 0; i < count; ++i) {
    const T keep = k[i * stride];
    const T g = extra ? grad[i] + extra[i] : grad[i];
    kept[i] = keep * g;
    grad[i] = (T(1) - keep) * g;
  }
}

template <typename T>
void add_into(int64_t count, const T* src, T* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] += src[i];
}

// c_prev_rows [N, H]: the c_{t-1} every row's step read, with cell zoneout (the zoned states,
// recomputed from the workspace's candidates c~ in the order of the forward computation; `zoned`
// [N, H] receives c_t of every row).
template <typename T>
void zoned_previous_cells(const StepPlan& plan, int64_t H, const T* ws, const T* c0, const KeepRows<T>& keep,
                          T* c_prev_rows, T* zoned) {
  for (const auto s : c10::irange(plan.steps())) {
    const int64_t t = plan.step_at(s);
    const int64_t off = plan.offsets[t], from_prev = plan.rows_from_previous(t);
    const int64_t prev_off = from_prev > 0 ? plan.offsets[plan.previous_step(t)] : 0;
    for (const auto r : c10::irange(plan.batch_sizes[t])) {
      const int64_t row = off + r;
      const T* source = r < from_prev ? zoned + (prev_off + r) * H : c0 + r * H;
      std::memcpy(c_prev_rows + row * H, source, H * sizeof(T));
      zoneout_blend(H, keep.at(row), keep.stride, c_prev_rows + row * H, ws + row * kLstmWorkspaceGates * H + 4 * H,
                    zoned + row * H);
    }
  }
}

// The Elman RNN's candidates h~ = act(gates_x + (m * h_{t-1}) W_hh^T + b_hh) of every row, with the
// forward's own per-step products and pass (so the same values): hprev [N, H] holds the h_{t-1}
// each row read.
template <typename T, Activation act>
void recompute_candidates(const StepPlan& plan, int64_t B, int64_t H, const at::Tensor& gx, const at::Tensor& whh,
                          const at::Tensor& bias, const at::Tensor& hprev, const at::Tensor& mask,
                          at::Tensor& candidates) {
  const auto& kernels = pointwise_kernels<T>();
  const auto pass = act == Activation::Tanh ? kernels.rnn_tanh_forward : kernels.rnn_relu_forward;
  at::Tensor gates_h = at::empty({B, H}, gx.options());
  at::Tensor masked_h = mask.defined() ? at::empty({B, H}, gx.options()) : at::Tensor();
  const StepWeight<T> recurrent(true, B, H, H, whh.data_ptr<T>(), H);  // as the forward's (same packing)
  RnnForwardStep<T> step;
  step.hidden = H;
  step.gates_h = gates_h.data_ptr<T>();
  step.bias = bias.data_ptr<T>();
  for (const auto s : c10::irange(plan.steps())) {
    const int64_t t = plan.step_at(s);
    const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
    recurrent.multiply(rows, masked_previous(rows * H, hprev.data_ptr<T>() + off * H, mask, masked_h), H, T(0),
                       gates_h.data_ptr<T>(), H);
    step.rows = rows;
    step.gates_x = gx.data_ptr<T>() + off * H;
    step.h_state = candidates.data_ptr<T>() + off * H;
    pass(step);
  }
}

// rows [N, P] of a packed sequence times the mask row of their batch position (step t's row r
// is batch row r): the h_{t-1} W_hh saw, for dW_hh.
at::Tensor masked_rows(const StepPlan& plan, const at::Tensor& rows, const at::Tensor& mask) {
  if (!mask.defined()) return rows;
  at::Tensor result = at::empty_like(rows);
  const int64_t width = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "rnnfused_masked_rows", [&] {
    for (const auto t : c10::irange(plan.steps())) {
      const int64_t at_row = plan.offsets[t] * width;
      multiply_by_mask(plan.batch_sizes[t] * width, rows.data_ptr<scalar_t>() + at_row, mask.data_ptr<scalar_t>(),
                       result.data_ptr<scalar_t>() + at_row);
    }
  });
  return result;
}

template <typename T>
ForwardProblem<T> forward_problem(CellKind cell, const StepPlan& plan, int64_t H, const at::Tensor& gx,
                                  const at::Tensor& whh, const at::Tensor& bias, const at::Tensor& h0,
                                  at::Tensor& h_state, at::Tensor& output, at::Tensor& workspace, bool training,
                                  at::ScalarType storage) {
  ForwardProblem<T> p;
  p.cell = cell;
  p.plan = &plan;
  p.hidden = H;
  p.gates_x = ptr_or_null<T>(gx);  // undefined: the engine projects the input itself (layer_inference)
  p.w_hh = whh.data_ptr<T>();
  p.bias = bias.data_ptr<T>();
  p.h0 = h0.data_ptr<T>();
  p.h_state = h_state.data_ptr<T>();
  p.output = output.data_ptr<T>();
  p.workspace = training ? workspace.data_ptr<T>() : nullptr;
  p.storage = storage;
  p.blas_product =
      engine_blas_product(plan.batch, sizeof(T), plan.rows == plan.steps() * plan.batch, gate_blocks(cell), H);
  return p;
}

template <typename T>
BackwardProblem<T> backward_problem(CellKind cell, const StepPlan& plan, int64_t H, const at::Tensor& whh,
                                    const at::Tensor& h0, const at::Tensor& output, const at::Tensor& go,
                                    at::Tensor& dh_state, at::Tensor& grad_gates) {
  BackwardProblem<T> p;
  p.cell = cell;
  p.plan = &plan;
  p.hidden = H;
  p.w_hh = whh.data_ptr<T>();
  p.h0 = h0.data_ptr<T>();
  p.output = output.data_ptr<T>();
  p.grad_output = ptr_or_null<T>(go);
  p.dh_state = dh_state.data_ptr<T>();
  p.grad_gates = grad_gates.data_ptr<T>();
  p.blas_product =
      engine_blas_product(plan.batch, sizeof(T), plan.rows == plan.steps() * plan.batch, gate_blocks(cell), H);
  return p;
}


// ---------------------------------------------------------------------------------------------
// LSTM
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_cpu(
    const at::Tensor& gates_x, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& w_hr, const at::Tensor& h0, const at::Tensor& c0,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, bool training,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const c10::optional<at::Tensor>& cell_zoneout) {
  const char* op = kLstmOp;
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
  CallThreads threads;  // on one thread in a one-thread period, or once its time loop stalls

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const at::Tensor gx = compute_view(gates_x, acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor whr = optional_compute_view(w_hr, acc);
  const at::Tensor bias = bias_or_zeros(b_hh, 4 * H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc);
  at::Tensor c_state = state_copy(c0, acc);
  at::Tensor output = empty_recycled({plan.rows, P}, gates_x.options().dtype(acc));
  at::Tensor workspace = empty_workspace(gates_x, training, kLstmWorkspaceGates, H, &empty_recycled);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, P, gates_x, acc);
  const at::Tensor keep_c_t = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, gates_x, acc);
  const bool regularized = mask.defined() || keep_h_t.defined() || keep_c_t.defined();
  if (use_engine(proj, regularized, B, CellKind::Lstm, training)) {
    const at::Tensor h0_c = compute_view(h0, acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_lstm_cpu", [&] {
      auto p = forward_problem<scalar_t>(CellKind::Lstm, plan, H, gx, whh, bias, h0_c, h_state, output, workspace,
                                         training, dtype);
      p.c_state = c_state.data_ptr<scalar_t>();
      engine_kernels<scalar_t>().forward(p);
    });
    return {to_dtype(output, dtype), to_dtype(h_state, dtype), to_dtype(c_state, dtype), workspace};
  }
  // The per-step path's buffers: h_{t-1} W_hh^T of a step, and o tanh(c) before the projection.
  at::Tensor gates_h = at::empty({B, 4 * H}, gx.options());
  at::Tensor r_buffer = proj ? at::empty({B, H}, gx.options()) : at::Tensor();
  at::Tensor masked_h = mask.defined() ? at::empty({B, P}, gx.options()) : at::Tensor();  // h_{t-1} * mask
  // Zoneout: h_{t-1} and c_{t-1} of a step, before the step overwrites the states.
  at::Tensor h_prev = keep_h_t.defined() ? at::empty({B, P}, gx.options()) : at::Tensor();
  at::Tensor c_prev = keep_c_t.defined() ? at::empty({B, H}, gx.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_lstm_cpu", [&] {
    using T = scalar_t;
    const auto& kernels = pointwise_kernels<T>();
    T* hs = h_state.data_ptr<T>();
    T* out = output.data_ptr<T>();
    T* ws = training ? workspace.data_ptr<T>() : nullptr;
    T* gh = gates_h.data_ptr<T>();
    T* r = proj ? r_buffer.data_ptr<T>() : nullptr;
    const KeepRows<T> keep_h(keep_h_t, P), keep_c(keep_c_t, H);
    LstmForwardStep<T> step;
    step.hidden = H;
    step.gates_h = gh;
    step.bias = bias.data_ptr<T>();
    step.c_state = c_state.data_ptr<T>();
    step.r_out = proj ? r : hs;
    const StepWeight<T> recurrent(true, B, 4 * H, P, whh.data_ptr<T>(), P);          // h W_hh^T
    const StepWeight<T> projection(true, B, P, H, proj ? whr.data_ptr<T>() : nullptr, H);  // r W_hr^T
    threads.start_steps(B);
    for (const auto s : c10::irange(plan.steps())) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      recurrent.multiply(rows, masked_previous(rows * P, hs, mask, masked_h), P, T(0), gh, 4 * H);
      step.rows = rows;
      step.gates_x = gx.data_ptr<T>() + off * 4 * H;
      step.workspace = ws ? ws + off * kLstmWorkspaceGates * H : nullptr;
      if (keep_h) std::memcpy(h_prev.data_ptr<T>(), hs, rows * P * sizeof(T));
      if (keep_c) std::memcpy(c_prev.data_ptr<T>(), step.c_state, rows * H * sizeof(T));
      kernels.lstm_forward(step);  // c_state: c~_t (also the workspace's c); h_t or r: o tanh(c~_t)
      if (keep_c) {
        zoneout_blend(rows * H, keep_c.at(off), keep_c.stride, c_prev.data_ptr<T>(), step.c_state, step.c_state);
      }
      if (proj) projection.multiply(rows, r, H, T(0), hs, P);
      if (keep_h) zoneout_blend(rows * P, keep_h.at(off), keep_h.stride, h_prev.data_ptr<T>(), hs, hs);
      round_to_storage(dtype, hs, rows * P);
      std::memcpy(out + off * P, hs, rows * P * sizeof(T));
      threads.after_step(rows);
    }
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype), to_dtype(c_state, dtype), workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
    const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output, const at::Tensor& workspace,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, const c10::optional<at::Tensor>& recurrent_mask,
    const c10::optional<at::Tensor>& zoneout, const c10::optional<at::Tensor>& cell_zoneout) {
  const char* op = kLstmBackwardOp;
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
  CallThreads threads;  // on one thread in a one-thread period, or once its time loop stalls

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor whr = optional_compute_view(w_hr, acc);
  const at::Tensor h0_c = compute_view(h0, acc);
  const at::Tensor c0_c = compute_view(c0, acc);
  const at::Tensor out = compute_view(output, acc);
  const at::Tensor go = optional_compute_view(grad_output, acc);
  at::Tensor dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, P}, options);
  at::Tensor dc_state = present(grad_c_n) ? state_copy(*grad_c_n, acc) : at::zeros({B, H}, options);
  at::Tensor grad_gates = empty_recycled({plan.rows, 4 * H}, options);
  // With a projection: dL/dh per row (for dW_hr), o tanh(c) per row, and dL/dr of one step.
  at::Tensor grad_h_rows = proj ? empty_recycled({plan.rows, P}, options) : at::Tensor();
  at::Tensor r_rows = proj ? empty_recycled({plan.rows, H}, options) : at::Tensor();
  at::Tensor grad_r = proj ? at::empty({B, H}, options) : at::Tensor();
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, P, output, acc);
  const at::Tensor keep_c_t = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, output, acc);
  const bool regularized = mask.defined() || keep_h_t.defined() || keep_c_t.defined();
  // Zoneout: the parts of dL/dh_t and dL/dc_t that flow straight to step t-1 (k times the gradient).
  at::Tensor dh_kept = keep_h_t.defined() ? at::empty({B, P}, options) : at::Tensor();
  at::Tensor dc_kept = keep_c_t.defined() ? at::empty({B, H}, options) : at::Tensor();

  if (use_engine(proj, regularized, B, CellKind::Lstm, true)) {
    AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_lstm_backward_cpu", [&] {
      auto p = backward_problem<scalar_t>(CellKind::Lstm, plan, H, whh, h0_c, out, go, dh_state, grad_gates);
      p.c0 = c0_c.data_ptr<scalar_t>();
      p.workspace = workspace.data_ptr<scalar_t>();
      p.dc_state = dc_state.data_ptr<scalar_t>();
      engine_kernels<scalar_t>().backward(p);
    });
  } else {
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_lstm_backward_cpu", [&] {
    using T = scalar_t;
    const auto& kernels = pointwise_kernels<T>();
    const T* ws = workspace.data_ptr<T>();
    const T* go_p = ptr_or_null<T>(go);
    T* dh = dh_state.data_ptr<T>();
    T* dg = grad_gates.data_ptr<T>();
    const KeepRows<T> keep_h(keep_h_t, P), keep_c(keep_c_t, H);
    // With cell zoneout, the c_{t-1} of every row is a zoned state, which the workspace (holding
    // the candidates c~) does not: recompute them, in the forward order, before the loop.
    at::Tensor c_prev_rows, zoned_cells;
    if (keep_c) {
      c_prev_rows = empty_recycled({plan.rows, H}, options);
      zoned_cells = empty_recycled({plan.rows, H}, options);
      zoned_previous_cells(plan, H, ws, c0_c.data_ptr<T>(), keep_c, c_prev_rows.data_ptr<T>(),
                           zoned_cells.data_ptr<T>());
    }
    LstmBackwardStep<T> step;
    step.hidden = H;
    step.c0 = c0_c.data_ptr<T>();
    step.dc_state = dc_state.data_ptr<T>();
    const StepWeight<T> recurrent(false, B, P, 4 * H, whh.data_ptr<T>(), P);           // dG W_hh
    const StepWeight<T> projection(false, B, H, P, proj ? whr.data_ptr<T>() : nullptr, H);  // dh W_hr
    threads.start_steps(B);
    for (int64_t s = plan.steps() - 1; s >= 0; --s) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      const int64_t prev = plan.previous_step(t);
      step.rows = rows;
      step.workspace = ws + off * kLstmWorkspaceGates * H;
      step.prev_workspace = prev >= 0 ? ws + plan.offsets[prev] * kLstmWorkspaceGates * H : nullptr;
      step.rows_from_prev = plan.rows_from_previous(t);
      step.grad_gates = dg + off * 4 * H;
      if (proj) {
        // dL/dh_t = dL/doutput_t + dL/dh_t from step t+1, kept for dW_hr; dL/dr = (dL/dh_t) W_hr.
        T* gh_rows = grad_h_rows.data_ptr<T>() + off * P;
        for (int64_t i = 0; i < rows * P; ++i) gh_rows[i] = dh[i] + (go_p ? go_p[off * P + i] : T(0));
        // Zoneout: the projection's output is the candidate, whose gradient is (1 - k) dL/dh_t.
        if (keep_h) zoneout_split(rows * P, keep_h.at(off), keep_h.stride, gh_rows, static_cast<const T*>(nullptr),
                                  dh_kept.data_ptr<T>());
        projection.multiply(rows, gh_rows, P, T(0), grad_r.data_ptr<T>(), H);
        step.grad_r = grad_r.data_ptr<T>();
        step.grad_r_extra = nullptr;
        step.r_out = r_rows.data_ptr<T>() + off * H;
      } else {
        step.grad_r = dh;
        step.grad_r_extra = go_p ? go_p + off * P : nullptr;
        step.r_out = nullptr;
        if (keep_h) {
          zoneout_split(rows * P, keep_h.at(off), keep_h.stride, dh, step.grad_r_extra, dh_kept.data_ptr<T>());
          step.grad_r_extra = nullptr;
        }
      }
      if (keep_c) {
        zoneout_split(rows * H, keep_c.at(off), keep_c.stride, step.dc_state, static_cast<const T*>(nullptr),
                      dc_kept.data_ptr<T>());
        step.c_prev_rows = c_prev_rows.data_ptr<T>() + off * H;
      }
      kernels.lstm_backward(step);
      // dL/dh_{t-1} = dG_t W_hh (times the recurrent mask), into the state rows the pointwise pass
      // has just consumed.
      recurrent.multiply(rows, dg + off * 4 * H, 4 * H, T(0), dh, P);
      if (mask.defined()) multiply_by_mask(rows * P, dh, mask.data_ptr<T>(), dh);
      if (keep_h) add_into(rows * P, dh_kept.data_ptr<T>(), dh);
      if (keep_c) add_into(rows * H, dc_kept.data_ptr<T>(), step.dc_state);
      threads.after_step(rows);
    }
  });
  }
  const at::Tensor hprev = masked_rows(plan, previous_h(plan, out, h0_c), mask);
  at::Tensor grad_w_hh = bulk_mm(grad_gates.t(), hprev);
  at::Tensor grad_b_hh = grad_gates.sum(0);
  at::Tensor grad_w_hr = proj ? bulk_mm(grad_h_rows.t(), r_rows) : at::empty({0}, options);
  return {to_dtype(grad_gates, dtype), to_dtype(grad_w_hh, dtype), to_dtype(grad_b_hh, dtype),
          to_dtype(grad_w_hr, dtype), to_dtype(dh_state, dtype), to_dtype(dc_state, dtype)};
}

// ---------------------------------------------------------------------------------------------
// GRU
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_recurrence_cpu(const at::Tensor& gates_x, const at::Tensor& w_hh,
                                                                   const c10::optional<at::Tensor>& b_hh,
                                                                   const at::Tensor& h0,
                                                                   const c10::optional<at::Tensor>& batch_sizes,
                                                                   bool reverse, bool training,
                                                                   const c10::optional<at::Tensor>& recurrent_mask,
                                                                   const c10::optional<at::Tensor>& zoneout) {
  const char* op = kGruOp;
  const int64_t H = check_recurrence_inputs(op, 3, gates_x, w_hh, b_hh, h0);
  TORCH_CHECK(w_hh.size(1) == H, op, ": w_hh must be [3 * hidden, hidden] = [", 3 * H, ", ", H, "], got ",
              w_hh.sizes());
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), B, batch_sizes, reverse);
  CallThreads threads;  // on one thread in a one-thread period, or once its time loop stalls

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const at::Tensor gx = compute_view(gates_x, acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor bias = bias_or_zeros(b_hh, 3 * H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc);
  at::Tensor output = empty_recycled({plan.rows, H}, gates_x.options().dtype(acc));
  at::Tensor workspace = empty_workspace(gates_x, training, kGruWorkspaceGates, H, &empty_recycled);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, H, gates_x, acc);
  const bool regularized = mask.defined() || keep_h_t.defined();
  if (use_engine(false, regularized, B, CellKind::Gru, training)) {
    const at::Tensor h0_c = compute_view(h0, acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_gru_cpu", [&] {
      engine_kernels<scalar_t>().forward(forward_problem<scalar_t>(CellKind::Gru, plan, H, gx, whh, bias, h0_c,
                                                                   h_state, output, workspace, training, dtype));
    });
    return {to_dtype(output, dtype), to_dtype(h_state, dtype), workspace};
  }
  at::Tensor gates_h = at::empty({B, 3 * H}, gx.options());  // h_{t-1} W_hh^T of a step
  at::Tensor masked_h = mask.defined() ? at::empty({B, H}, gx.options()) : at::Tensor();  // h_{t-1} * mask
  at::Tensor h_prev = keep_h_t.defined() ? at::empty({B, H}, gx.options()) : at::Tensor();  // zoneout: h_{t-1}
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_gru_cpu", [&] {
    using T = scalar_t;
    const auto& kernels = pointwise_kernels<T>();
    T* hs = h_state.data_ptr<T>();
    T* out = output.data_ptr<T>();
    T* ws = training ? workspace.data_ptr<T>() : nullptr;
    T* gh = gates_h.data_ptr<T>();
    const KeepRows<T> keep_h(keep_h_t, H);
    GruForwardStep<T> step;
    step.hidden = H;
    step.gates_h = gh;
    step.bias = bias.data_ptr<T>();
    step.h_state = hs;
    const StepWeight<T> recurrent(true, B, 3 * H, H, whh.data_ptr<T>(), H);  // h W_hh^T
    threads.start_steps(B);
    for (const auto s : c10::irange(plan.steps())) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      recurrent.multiply(rows, masked_previous(rows * H, hs, mask, masked_h), H, T(0), gh, 3 * H);
      step.rows = rows;
      step.gates_x = gx.data_ptr<T>() + off * 3 * H;
      step.workspace = ws ? ws + off * kGruWorkspaceGates * H : nullptr;
      if (keep_h) std::memcpy(h_prev.data_ptr<T>(), hs, rows * H * sizeof(T));
      kernels.gru_forward(step);
      if (keep_h) zoneout_blend(rows * H, keep_h.at(off), keep_h.stride, h_prev.data_ptr<T>(), hs, hs);
      round_to_storage(dtype, hs, rows * H);
      std::memcpy(out + off * H, hs, rows * H * sizeof(T));
      threads.after_step(rows);
    }
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype), workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_recurrence_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n, const at::Tensor& w_hh,
    const at::Tensor& h0, const at::Tensor& output, const at::Tensor& workspace,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, const c10::optional<at::Tensor>& recurrent_mask,
    const c10::optional<at::Tensor>& zoneout) {
  const char* op = kGruBackwardOp;
  TORCH_CHECK(output.dim() == 2, op, ": output must be 2-D, got ", output.dim(), "-D");
  const int64_t H = output.size(1);
  check_matrix(op, "w_hh", w_hh, output, 3 * H, H);
  check_matrix(op, "h0", h0, output, -1, H);
  check_workspace(op, workspace, output, kGruWorkspaceGates, H);
  check_optional_grad(op, "grad_output", grad_output, output);
  check_optional_grad(op, "grad_h_n", grad_h_n, h0);
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);
  CallThreads threads;  // on one thread in a one-thread period, or once its time loop stalls

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor go = optional_compute_view(grad_output, acc);
  at::Tensor dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, H}, options);
  const at::Tensor out = compute_view(output, acc);
  const at::Tensor h0_c = compute_view(h0, acc);
  const at::Tensor hprev = previous_h(plan, out, h0_c);
  at::Tensor grad_gates_x = empty_recycled({plan.rows, 3 * H}, options);
  at::Tensor grad_gates_h = empty_recycled({plan.rows, 3 * H}, options);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, H, output, acc);
  const bool regularized = mask.defined() || keep_h_t.defined();
  // Zoneout: the part of dL/dh_t that flows straight to step t-1 (k times the gradient).
  at::Tensor dh_kept = keep_h_t.defined() ? at::empty({B, H}, options) : at::Tensor();
  if (use_engine(false, regularized, B, CellKind::Gru, true)) {
    AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_gru_backward_cpu", [&] {
      auto p = backward_problem<scalar_t>(CellKind::Gru, plan, H, whh, h0_c, out, go, dh_state, grad_gates_x);
      p.workspace = workspace.data_ptr<scalar_t>();
      p.grad_gates_h = grad_gates_h.data_ptr<scalar_t>();
      engine_kernels<scalar_t>().backward(p);
    });
  } else {
  // dG_h W_hh of a step lands here before it (masked, with a mask) joins dh_t * z: added after the
  // GEMM in both cases, so that a mask of ones gives the unmasked gradients bit for bit on every
  // BLAS (a GEMM with beta = 1 may add C into its partial sums in another order).
  at::Tensor product = at::empty({B, H}, options);

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_gru_backward_cpu", [&] {
    using T = scalar_t;
    const auto& kernels = pointwise_kernels<T>();
    const T* go_p = ptr_or_null<T>(go);
    T* dh = dh_state.data_ptr<T>();
    const KeepRows<T> keep_h(keep_h_t, H);
    GruBackwardStep<T> step;
    step.hidden = H;
    step.dh_state = dh;
    const StepWeight<T> recurrent(false, B, H, 3 * H, whh.data_ptr<T>(), H);  // dG_h W_hh
    threads.start_steps(B);
    for (int64_t s = plan.steps() - 1; s >= 0; --s) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      step.rows = rows;
      step.workspace = workspace.data_ptr<T>() + off * kGruWorkspaceGates * H;
      step.h_prev = hprev.data_ptr<T>() + off * H;
      step.grad_output = go_p ? go_p + off * H : nullptr;
      step.grad_gates_x = grad_gates_x.data_ptr<T>() + off * 3 * H;
      step.grad_gates_h = grad_gates_h.data_ptr<T>() + off * 3 * H;
      if (keep_h) {
        zoneout_split(rows * H, keep_h.at(off), keep_h.stride, dh, step.grad_output, dh_kept.data_ptr<T>());
        step.grad_output = nullptr;
      }
      kernels.gru_backward(step);  // leaves dh_t * z in the state rows
      recurrent.multiply(rows, step.grad_gates_h, 3 * H, T(0), product.data_ptr<T>(), H);
      if (mask.defined()) {
        add_masked(rows * H, product.data_ptr<T>(), mask.data_ptr<T>(), dh);
      } else {
        add_into(rows * H, product.data_ptr<T>(), dh);
      }
      if (keep_h) add_into(rows * H, dh_kept.data_ptr<T>(), dh);
      threads.after_step(rows);
    }
  });
  }
  at::Tensor grad_w_hh = bulk_mm(grad_gates_h.t(), masked_rows(plan, hprev, mask));
  at::Tensor grad_b_hh = grad_gates_h.sum(0);
  return {to_dtype(grad_gates_x, dtype), to_dtype(grad_w_hh, dtype), to_dtype(grad_b_hh, dtype),
          to_dtype(dh_state, dtype)};
}

// ---------------------------------------------------------------------------------------------
// Elman RNN (tanh / relu)
// ---------------------------------------------------------------------------------------------

template <Activation act>
constexpr CellKind rnn_kind() {
  return act == Activation::Tanh ? CellKind::RnnTanh : CellKind::RnnRelu;
}

template <Activation act>
std::tuple<at::Tensor, at::Tensor> rnn_recurrence_cpu(const at::Tensor& gates_x, const at::Tensor& w_hh,
                                                       const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
                                                       const c10::optional<at::Tensor>& batch_sizes, bool reverse,
                                                       const c10::optional<at::Tensor>& recurrent_mask,
                                                       const c10::optional<at::Tensor>& zoneout) {
  const char* op = act == Activation::Tanh ? kRnnTanhOp : kRnnReluOp;
  const int64_t H = check_recurrence_inputs(op, 1, gates_x, w_hh, b_hh, h0);
  TORCH_CHECK(w_hh.size(1) == H, op, ": w_hh must be [hidden, hidden] = [", H, ", ", H, "], got ", w_hh.sizes());
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), B, batch_sizes, reverse);
  CallThreads threads;  // on one thread in a one-thread period, or once its time loop stalls

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const at::Tensor gx = compute_view(gates_x, acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor bias = bias_or_zeros(b_hh, H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc);
  at::Tensor output = empty_recycled({plan.rows, H}, gates_x.options().dtype(acc));
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, H, gates_x, acc);
  const bool regularized = mask.defined() || keep_h_t.defined();
  // (The Elman RNN's rule does not depend on training; its forward keeps no workspace.)
  if (use_engine(false, regularized, B, rnn_kind<act>(), false)) {
    const at::Tensor h0_c = compute_view(h0, acc);
    at::Tensor no_workspace;
    AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_rnn_cpu", [&] {
      engine_kernels<scalar_t>().forward(forward_problem<scalar_t>(
          rnn_kind<act>(), plan, H, gx, whh, bias, h0_c, h_state, output, no_workspace, false, dtype));
    });
    return {to_dtype(output, dtype), to_dtype(h_state, dtype)};
  }
  at::Tensor gates_h = at::empty({B, H}, gx.options());  // h_{t-1} W_hh^T of a step
  at::Tensor masked_h = mask.defined() ? at::empty({B, H}, gx.options()) : at::Tensor();  // h_{t-1} * mask
  at::Tensor h_prev = keep_h_t.defined() ? at::empty({B, H}, gx.options()) : at::Tensor();  // zoneout: h_{t-1}
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_rnn_cpu", [&] {
    using T = scalar_t;
    const auto& kernels = pointwise_kernels<T>();
    const auto pass = act == Activation::Tanh ? kernels.rnn_tanh_forward : kernels.rnn_relu_forward;
    T* hs = h_state.data_ptr<T>();
    T* out = output.data_ptr<T>();
    T* gh = gates_h.data_ptr<T>();
    const KeepRows<T> keep_h(keep_h_t, H);
    RnnForwardStep<T> step;
    step.hidden = H;
    step.gates_h = gh;
    step.bias = bias.data_ptr<T>();
    step.h_state = hs;
    const StepWeight<T> recurrent(true, B, H, H, whh.data_ptr<T>(), H);  // h W_hh^T
    threads.start_steps(B);
    for (const auto s : c10::irange(plan.steps())) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      recurrent.multiply(rows, masked_previous(rows * H, hs, mask, masked_h), H, T(0), gh, H);
      step.rows = rows;
      step.gates_x = gx.data_ptr<T>() + off * H;
      if (keep_h) std::memcpy(h_prev.data_ptr<T>(), hs, rows * H * sizeof(T));
      pass(step);
      if (keep_h) zoneout_blend(rows * H, keep_h.at(off), keep_h.stride, h_prev.data_ptr<T>(), hs, hs);
      round_to_storage(dtype, hs, rows * H);
      std::memcpy(out + off * H, hs, rows * H * sizeof(T));
      threads.after_step(rows);
    }
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype)};
}

template <Activation act>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_recurrence_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n, const at::Tensor& w_hh,
    const at::Tensor& h0, const at::Tensor& output, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
    const c10::optional<at::Tensor>& gates_x, const c10::optional<at::Tensor>& b_hh) {
  const char* op = act == Activation::Tanh ? kRnnTanhBackwardOp : kRnnReluBackwardOp;
  TORCH_CHECK(output.dim() == 2, op, ": output must be 2-D, got ", output.dim(), "-D");
  const int64_t H = output.size(1);
  check_matrix(op, "w_hh", w_hh, output, H, H);
  check_matrix(op, "h0", h0, output, -1, H);
  check_optional_grad(op, "grad_output", grad_output, output);
  check_optional_grad(op, "grad_h_n", grad_h_n, h0);
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);
  CallThreads threads;  // on one thread in a one-thread period, or once its time loop stalls

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const at::Tensor whh = compute_view(w_hh, acc);
  const at::Tensor out = compute_view(output, acc);
  const at::Tensor go = optional_compute_view(grad_output, acc);
  at::Tensor dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, H}, options);
  at::Tensor grad_gates = empty_recycled({plan.rows, H}, options);

  const at::Tensor h0_c = compute_view(h0, acc);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, H, output, acc);
  const bool regularized = mask.defined() || keep_h_t.defined();
  // With zoneout the output rows are not act(pre): the candidates h~ are recomputed from the
  // forward's gates_x and b_hh, step by step as the forward computed them.
  at::Tensor candidates, gx, bias;
  if (keep_h_t.defined()) {
    TORCH_CHECK(present(gates_x), op, ": with zoneout, the backward needs the forward's gates_x");
    check_matrix(op, "gates_x", *gates_x, output, plan.rows, H);
    if (present(b_hh)) check_vector(op, "b_hh", *b_hh, output, H);
    gx = compute_view(*gates_x, acc);
    bias = bias_or_zeros(b_hh, H, output, acc);
    candidates = empty_recycled({plan.rows, H}, options);
  }
  if (use_engine(false, regularized, B, rnn_kind<act>(), true)) {
    AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_rnn_backward_cpu", [&] {
      engine_kernels<scalar_t>().backward(backward_problem<scalar_t>(
          rnn_kind<act>(), plan, H, whh, h0_c, out, go, dh_state, grad_gates));
    });
  } else {
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_rnn_backward_cpu", [&] {
    using T = scalar_t;
    const auto& kernels = pointwise_kernels<T>();
    const auto pass = act == Activation::Tanh ? kernels.rnn_tanh_backward : kernels.rnn_relu_backward;
    const T* go_p = ptr_or_null<T>(go);
    T* dh = dh_state.data_ptr<T>();
    const KeepRows<T> keep_h(keep_h_t, H);
    at::Tensor dh_kept;  // zoneout: k dL/dh_t of a step, which flows straight to step t-1
    if (keep_h) {
      dh_kept = at::empty({B, H}, options);
      recompute_candidates<T, act>(plan, B, H, gx, whh, bias, previous_h(plan, out, h0_c), mask, candidates);
    }
    RnnBackwardStep<T> step;
    step.hidden = H;
    step.dh_state = dh;
    const StepWeight<T> recurrent(false, B, H, H, whh.data_ptr<T>(), H);  // dG W_hh
    threads.start_steps(B);
    for (int64_t s = plan.steps() - 1; s >= 0; --s) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      step.rows = rows;
      step.h = (keep_h ? candidates : out).data_ptr<T>() + off * H;
      step.grad_output = go_p ? go_p + off * H : nullptr;
      step.grad_gates = grad_gates.data_ptr<T>() + off * H;
      if (keep_h) {
        zoneout_split(rows * H, keep_h.at(off), keep_h.stride, dh, step.grad_output, dh_kept.data_ptr<T>());
        step.grad_output = nullptr;
      }
      pass(step);
      recurrent.multiply(rows, step.grad_gates, H, T(0), dh, H);
      if (mask.defined()) multiply_by_mask(rows * H, dh, mask.data_ptr<T>(), dh);
      if (keep_h) add_into(rows * H, dh_kept.data_ptr<T>(), dh);
      threads.after_step(rows);
    }
  });
  }
  const at::Tensor hprev = masked_rows(plan, previous_h(plan, out, h0_c), mask);
  at::Tensor grad_w_hh = bulk_mm(grad_gates.t(), hprev);
  at::Tensor grad_b_hh = grad_gates.sum(0);
  return {to_dtype(grad_gates, dtype), to_dtype(grad_w_hh, dtype), to_dtype(grad_b_hh, dtype),
          to_dtype(dh_state, dtype)};
}

// ---------------------------------------------------------------------------------------------
// Inference from the input (layer_inference, csrc/op_schemas.h)
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_inference_cpu(
    c10::string_view cell, const at::Tensor& input, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0,
    const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& batch_sizes, bool reverse) {
  const char* op = kLayerInferenceOp;
  CellKind kind;
  int64_t G;
  if (cell == "lstm") {
    kind = CellKind::Lstm, G = 4;
  } else if (cell == "gru") {
    kind = CellKind::Gru, G = 3;
  } else if (cell == "rnn_tanh") {
    kind = CellKind::RnnTanh, G = 1;
  } else if (cell == "rnn_relu") {
    kind = CellKind::RnnRelu, G = 1;
  } else {
    TORCH_CHECK(false, op, ": cell must be 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got '", cell, "'");
  }
  const bool lstm = kind == CellKind::Lstm;
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D [rows, input_size], got ", input.dim(), "-D");
  TORCH_CHECK(is_supported_dtype(input.scalar_type()), op, ": supports float32, float64, bfloat16 and float16, got ",
              input.scalar_type());
  check_matrix(op, "w_ih", w_ih, input, -1, input.size(1), "input");
  TORCH_CHECK(w_ih.size(0) > 0 && w_ih.size(0) % G == 0, op, ": w_ih must have ", G, " * hidden rows, got shape ",
              w_ih.sizes());
  const int64_t H = w_ih.size(0) / G;
  const int64_t I = input.size(1);
  if (present(b_ih)) check_vector(op, "b_ih", *b_ih, input, G * H, "input");
  check_matrix(op, "w_hh", w_hh, input, G * H, H, "input");
  if (present(b_hh)) check_vector(op, "b_hh", *b_hh, input, G * H, "input");
  check_matrix(op, "h0", h0, input, -1, H, "input");
  TORCH_CHECK(lstm == present(c0), op, ": c0 must be given for the LSTM and only for it");
  if (lstm) check_matrix(op, "c0", *c0, input, h0.size(0), H, "input");
  const int64_t B = h0.size(0);
  const auto dtype = input.scalar_type();
  const StepPlan plan = make_step_plan(op, input.size(0), B, batch_sizes, reverse);
  CallThreads threads;  // on one thread in a one-thread period, or once its time loop stalls
  const bool own_dtype = dtype == at::kFloat || dtype == at::kDouble;
  const auto element_size = static_cast<int64_t>(c10::elementSize(dtype));
  const bool full_steps = plan.rows == plan.steps() * B;  // no step with fewer rows than the batch
  const bool blas_product = own_dtype && engine_blas_product(B, element_size, full_steps, G, H);
  const bool engine = own_dtype && (blas_product || engine_projects_input(B, G * H, H, I, element_size));
  if (!engine) {
    // One GEMM, then the cell's recurrence op.
    const at::Tensor gates_x = at::linear(input, w_ih, b_ih);
    const c10::optional<at::Tensor> none;
    switch (kind) {
      case CellKind::Lstm: {
        auto [output, h_n, c_n, workspace] =
            lstm_recurrence_cpu(gates_x, w_hh, b_hh, none, h0, *c0, batch_sizes, reverse, false, none, none, none);
        return {output, h_n, c_n};
      }
      case CellKind::Gru: {
        auto [output, h_n, workspace] =
            gru_recurrence_cpu(gates_x, w_hh, b_hh, h0, batch_sizes, reverse, false, none, none);
        return {output, h_n, at::empty({0}, output.options())};
      }
      case CellKind::RnnTanh:
      case CellKind::RnnRelu: {
        const auto rnn = kind == CellKind::RnnTanh ? &rnn_recurrence_cpu<Activation::Tanh>
                                                   : &rnn_recurrence_cpu<Activation::Relu>;
        auto [output, h_n] = rnn(gates_x, w_hh, b_hh, h0, batch_sizes, reverse, none, none);
        return {output, h_n, at::empty({0}, output.options())};
      }
    }
  }
  const at::Tensor x = input.contiguous();
  const at::Tensor wih = w_ih.contiguous();
  const at::Tensor bih = present(b_ih) ? b_ih->contiguous() : at::Tensor();
  const at::Tensor whh = w_hh.contiguous();
  const at::Tensor bias = bias_or_zeros(b_hh, G * H, input, dtype);
  const at::Tensor h0_c = h0.contiguous();
  at::Tensor h_state = state_copy(h0, dtype);
  at::Tensor c_state = lstm ? state_copy(*c0, dtype) : at::empty({0}, input.options());
  at::Tensor output = empty_recycled({plan.rows, H}, input.options());
  at::Tensor no_workspace;
  AT_DISPATCH_FLOATING_TYPES(dtype, "rnnfused_layer_inference_cpu", [&] {
    auto p = forward_problem<scalar_t>(kind, plan, H, at::Tensor(), whh, bias, h0_c, h_state, output, no_workspace,
                                       false, dtype);
    p.c_state = lstm ? c_state.data_ptr<scalar_t>() : nullptr;
    p.input = x.data_ptr<scalar_t>();
    p.w_ih = wih.data_ptr<scalar_t>();
    p.b_ih = ptr_or_null<scalar_t>(bih);
    p.input_size = I;
    p.blas_product = blas_product;
    engine_kernels<scalar_t>().forward(p);
  });
  return {output, h_state, c_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnfused, CPU, m) {
  m.impl("layer_inference", &layer_inference_cpu);
  m.impl("lstm_recurrence", &lstm_recurrence_cpu);
  m.impl("lstm_recurrence_backward", &lstm_recurrence_backward_cpu);
  m.impl("gru_recurrence", &gru_recurrence_cpu);
  m.impl("gru_recurrence_backward", &gru_recurrence_backward_cpu);
  m.impl("rnn_tanh_recurrence", &rnn_recurrence_cpu<Activation::Tanh>);
  m.impl("rnn_relu_recurrence", &rnn_recurrence_cpu<Activation::Relu>);
  m.impl("rnn_tanh_recurrence_backward", &rnn_recurrence_backward_cpu<Activation::Tanh>);
  m.impl("rnn_relu_recurrence_backward", &rnn_recurrence_backward_cpu<Activation::Relu>);
}

}  // namespace rnnfused::cpu
