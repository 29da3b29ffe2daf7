// The LayerNorm LSTM and GRU recurrences on the CPU (rnnfused::layer_norm_*_recurrence, schemas in
// csrc/op_schemas.h): per step one GEMM, h_{t-1} W_hh^T into a preallocated buffer, then one
// vectorized pass per row (pointwise.h's layer_norm_* kernels, per instruction set; rows in
// parallel) that normalizes it, finishes the gates (cell_math.h), for the LSTM normalizes the new
// cell state, and writes h_t. A row's normalization is a reduction over all its
// G*H gate values, which is why these cells run a per-row pass rather than the fused engine's
// per-slice split of the hidden units.
//
// Backward mirrors the loop in reverse: per step one pass per row (the gates' gradients, both
// normalizations' backward) and one GEMM for dh_{t-1}; dW_hh and the gains' and biases' gradients
// are one GEMM / reduction each over all rows, after the loop.
//
// float32 and float64 run in their own type; bfloat16 and float16 run the float32 loop on float
// copies, rounding h_t to the input dtype every step, as the plain ops do (recurrence_cpu.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../cell_math.h"
#include "../recurrence.h"
#include "blas.h"
#include "buffer_cache.h"
#include "op_helpers.h"
#include "pointwise.h"
#include "team.h"  // CallThreads

namespace rnnfused::cpu {
namespace {

// Rows a pass hands to one thread: enough work per task to pay for the fork.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 2048 / std::max<int64_t>(1, width)); }

// The gains' and biases' gradients, summed over all rows: gain[j] = sum_b grad[b, j] xhat[b, j],
// bias[j] = sum_b grad[b, j] (columns split across threads, rows in a fixed order).
template <typename T>
void accumulate_gain_grads(int64_t rows, int64_t width, const T* grad, int64_t grad_stride, const T* xhat,
                           int64_t xhat_stride, T* grad_gain, T* grad_bias) {
  at::parallel_for(0, width, 512, [&](int64_t j0, int64_t j1) {
    for (int64_t b = 0; b < rows; ++b) {
      const T* g = grad + b * grad_stride;
      const T* x = xhat + b * xhat_stride;
      for (int64_t j = j0; j < j1; ++j) {
        grad_gain[j] += g[j] * x[j];
        grad_bias[j] += g[j];
      }
    }
  });
}

// The h_{t-1} rows [rows, H] of a step that the product with W_hh saw (times the recurrent mask).
template <typename T>
void seen_previous_h(int64_t rows, int64_t from_prev, int64_t H, const T* prev_output, const T* h0, const T* mask,
                     T* seen) {
  for (int64_t b = 0; b < rows; ++b) {
    const T* src = b < from_prev ? prev_output + b * H : h0 + b * H;
    for (int64_t u = 0; u < H; ++u) seen[b * H + u] = mask ? src[u] * mask[b * H + u] : src[u];
  }
}

// ---------------------------------------------------------------------------------------------
// The time loops, shared by both cells (G gates; c_state / keep_c only for the LSTM).
// ---------------------------------------------------------------------------------------------

// What a forward call runs on, in the compute dtype. whr: the LSTM's projection [P, H] or undefined.
struct ForwardTensors {
  at::Tensor gx, whh, whr, gain, shift, cell_gain, cell_bias, mask, keep_h, keep_c, h_state, c_state, output,
      workspace;
};

template <typename T>
void run_forward(const StepPlan& plan, int64_t G, int64_t H, double eps, bool training, at::ScalarType storage,
                 void (*row_kernel)(const LayerNormRowForward<T>&), ForwardTensors& f) {
  const int64_t B = plan.batch, GH = G * H, P = f.whh.size(1);
  const bool proj = f.whr.defined();
  const int64_t W = G == 4 ? layer_norm_lstm_workspace_width(H) : layer_norm_gru_workspace_width(H);
  const auto options = f.gx.options();
  // Per-step buffers: the product, the masked h_{t-1}, (without a workspace) the rows' scratch, and
  // with a projection r = o tanh(c^) and its product with W_hr, h~.
  at::Tensor product = at::empty({B, GH}, options);
  at::Tensor masked_h = f.mask.defined() ? at::empty({B, P}, options) : at::Tensor();
  at::Tensor scratch = training ? at::Tensor() : at::empty({B, W}, options);
  at::Tensor r_buffer = proj ? at::empty({B, H}, options) : at::Tensor();
  at::Tensor h_cand = proj ? at::empty({B, P}, options) : at::Tensor();
  T* hs = f.h_state.data_ptr<T>();
  T* cs = f.c_state.defined() ? f.c_state.data_ptr<T>() : nullptr;
  T* out = f.output.data_ptr<T>();
  T* gh = product.data_ptr<T>();
  const KeepRows<T> keep_h(f.keep_h, P), keep_c(f.keep_c, H);
  LayerNormRowForward<T> common;
  common.hidden = H;
  common.eps = static_cast<T>(eps);
  common.gain = f.gain.data_ptr<T>();
  common.shift = f.shift.data_ptr<T>();
  common.cell_gain = ptr_or_null<T>(f.cell_gain);
  common.cell_bias = ptr_or_null<T>(f.cell_bias);
  common.keep_h_stride = keep_h.stride;
  common.keep_c_stride = keep_c.stride;
  const StepWeight<T> recurrent(true, B, GH, P, f.whh.data_ptr<T>(), P);                   // h W_hh^T
  const StepWeight<T> projection(true, B, P, H, proj ? f.whr.data_ptr<T>() : nullptr, H);  // r W_hr^T
  CallThreads threads;  // on one thread in a one-thread period, or once its time loop stalls (team.h)
  threads.start_steps(B);
  for (const auto s : c10::irange(plan.steps())) {
    const int64_t t = plan.step_at(s);
    const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
    recurrent.multiply(rows, masked_previous<T>(rows * P, hs, f.mask, masked_h), P, T(0), gh, GH);
    T* ws_step = training ? f.workspace.data_ptr<T>() + off * W : scratch.data_ptr<T>();
    at::parallel_for(0, rows, row_grain(GH), [&](int64_t begin, int64_t end) {
      LayerNormRowForward<T> r = common;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t row = off + b;
        r.gates_x = f.gx.data_ptr<T>() + row * GH;
        r.product = gh + b * GH;
        r.h_state = proj ? r_buffer.data_ptr<T>() + b * H : hs + b * H;
        r.c_state = cs ? cs + b * H : nullptr;
        r.workspace = ws_step + b * W;
        r.keep_h = keep_h && !proj ? keep_h.at(row) : nullptr;  // with a projection: after it, below
        r.keep_c = keep_c ? keep_c.at(row) : nullptr;
        row_kernel(r);
        if (!proj) {
          round_to_storage(storage, r.h_state, H);
          std::memcpy(out + row * H, r.h_state, H * sizeof(T));
        }
      }
    });
    if (proj) {  // h_t = zoneout(h_{t-1}, r W_hr^T), rounded, into the state and the output rows
      T* hc = h_cand.data_ptr<T>();
      projection.multiply(rows, r_buffer.data_ptr<T>(), H, T(0), hc, P);
      const T* k = keep_h ? keep_h.at(off) : nullptr;
      for (int64_t i = 0; i < rows * P; ++i) {
        T h = k ? rnnfused::zoneout(k[i * keep_h.stride], hs[i], hc[i]) : hc[i];
        round_to_storage(storage, &h, 1);
        hs[i] = out[off * P + i] = h;
      }
    }
    threads.after_step(rows);
  }
}

// What a backward call runs on, in the compute dtype.
struct BackwardTensors {
  at::Tensor whh, whr, gain, cell_gain, cell_bias, output, h0, c0, grad_output, mask, keep_h, keep_c, workspace;
  at::Tensor dh_state, dc_state, grad_gx, grad_whh, grad_whr, grad_gain, grad_bias, grad_cell_gain, grad_cell_bias;
};

template <typename T>
void run_backward(const StepPlan& plan, int64_t G, int64_t H, void (*row_kernel)(const LayerNormRowBackward<T>&),
                  BackwardTensors& f) {
  const int64_t B = plan.batch, GH = G * H, P = f.whh.size(1);
  const bool proj = f.whr.defined();
  const int64_t W = G == 4 ? layer_norm_lstm_workspace_width(H) : layer_norm_gru_workspace_width(H);
  const bool lstm = G == 4;
  const auto options = f.output.options();
  // Of every row: dL/dhh, dL/d(h W_hh^T), dL/dc^ (LSTM), the h_{t-1} the product saw (masked), and
  // with a projection dL/dh~ and r, for the reductions after the loop. Per step: the rows' scratch,
  // dL/dh_{t-1} through W_hh and (projection) dL/dr.
  const int64_t N = plan.rows;
  at::Tensor d_hh = empty_recycled({N, GH}, options), d_product = empty_recycled({N, GH}, options);
  at::Tensor d_c_hat = lstm ? empty_recycled({N, H}, options) : at::Tensor();
  at::Tensor h_seen = empty_recycled({N, P}, options);
  at::Tensor d_h_cand = proj ? empty_recycled({N, P}, options) : at::Tensor();
  at::Tensor r_rows = proj ? empty_recycled({N, H}, options) : at::Tensor();
  at::Tensor scratch = at::empty({B, 2 * H + GH}, options), dh_product = at::empty({B, P}, options);
  at::Tensor d_r = proj ? at::empty({B, H}, options) : at::Tensor();
  const T* ws_all = f.workspace.data_ptr<T>();
  const T* o_all = f.output.data_ptr<T>();
  const T* h0 = f.h0.data_ptr<T>();
  const T* c0 = ptr_or_null<T>(f.c0);
  const T* go = ptr_or_null<T>(f.grad_output);
  const T* m = ptr_or_null<T>(f.mask);
  T *dhs = f.dh_state.data_ptr<T>(), *dcs = f.dc_state.defined() ? f.dc_state.data_ptr<T>() : nullptr;
  T *dhh = d_hh.data_ptr<T>(), *dp = d_product.data_ptr<T>(), *dch = d_c_hat.defined() ? d_c_hat.data_ptr<T>() : nullptr;
  const KeepRows<T> keep_h(f.keep_h, P), keep_c(f.keep_c, H);
  LayerNormRowBackward<T> common;
  common.hidden = H;
  common.gain = f.gain.data_ptr<T>();
  common.cell_gain = ptr_or_null<T>(f.cell_gain);
  common.cell_bias = ptr_or_null<T>(f.cell_bias);
  common.keep_h_stride = keep_h.stride;
  common.keep_c_stride = keep_c.stride;
  const StepWeight<T> recurrent(false, B, P, GH, f.whh.data_ptr<T>(), P);                  // dP W_hh
  const StepWeight<T> projection(false, B, H, P, proj ? f.whr.data_ptr<T>() : nullptr, H);  // dL/dh~ W_hr
  CallThreads threads;  // on one thread in a one-thread period, or once its time loop stalls (team.h)
  threads.start_steps(B);
  for (int64_t s = plan.steps() - 1; s >= 0; --s) {
    const int64_t t = plan.step_at(s);
    const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
    const int64_t from_prev = plan.rows_from_previous(t);
    const int64_t prev_off = from_prev > 0 ? plan.offsets[plan.previous_step(t)] : 0;
    if (proj) {  // dL/dh~ = (1 - k) dL/dh_t (k dL/dh_t stays for h_{t-1}); dL/dr = dL/dh~ W_hr
      T* dc = d_h_cand.data_ptr<T>() + off * P;
      const T* k = keep_h ? keep_h.at(off) : nullptr;
      for (int64_t i = 0; i < rows * P; ++i) {
        const T g = dhs[i] + (go ? go[off * P + i] : T(0));
        const T keep = k ? k[i * keep_h.stride] : T(0);
        dc[i] = (T(1) - keep) * g;
        dhs[i] = keep * g;
      }
      projection.multiply(rows, dc, P, T(0), d_r.data_ptr<T>(), H);
    }
    at::parallel_for(0, rows, row_grain(GH), [&](int64_t begin, int64_t end) {
      LayerNormRowBackward<T> r = common;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t row = off + b;
        const bool continues = b < from_prev;
        r.workspace = ws_all + row * W;
        r.h_prev = continues ? o_all + (prev_off + b) * P : h0 + b * P;
        r.c_prev = lstm ? (continues ? ws_all + (prev_off + b) * W + 2 * GH : c0 + b * H) : nullptr;
        r.keep_h = keep_h && !proj ? keep_h.at(row) : nullptr;
        r.keep_c = keep_c ? keep_c.at(row) : nullptr;
        r.grad_output = go && !proj ? go + row * H : nullptr;
        r.dh_state = proj ? d_r.data_ptr<T>() + b * H : dhs + b * H;  // with a projection: dL/dr (then cleared)
        r.dc_state = dcs ? dcs + b * H : nullptr;
        r.grad_gates_x = f.grad_gx.data_ptr<T>() + row * GH;
        r.grad_hh = dhh + row * GH;
        r.grad_c_hat = dch ? dch + row * H : nullptr;
        r.grad_product = dp + row * GH;
        r.r_out = proj ? r_rows.data_ptr<T>() + row * H : nullptr;
        r.scratch = scratch.data_ptr<T>() + b * (2 * H + GH);
        row_kernel(r);
      }
    });
    // dL/dh_{t-1} += (dP W_hh) * mask.
    T* dhp = dh_product.data_ptr<T>();
    recurrent.multiply(rows, dp + off * GH, GH, T(0), dhp, P);
    for (int64_t i = 0; i < rows * P; ++i) dhs[i] += m ? dhp[i] * m[i] : dhp[i];
    seen_previous_h(rows, from_prev, P, o_all + prev_off * P, h0, m, h_seen.data_ptr<T>() + off * P);
    threads.after_step(rows);
  }
  // dW_hh = dP^T (h_{t-1} * mask) and dW_hr = dL/dh~^T r over all rows; the gains' and biases' sums.
  gemm<T>(true, false, GH, P, N, T(1), dp, GH, h_seen.data_ptr<T>(), P, T(0), f.grad_whh.data_ptr<T>(), P);
  if (proj) {
    gemm<T>(true, false, P, H, N, T(1), d_h_cand.data_ptr<T>(), P, r_rows.data_ptr<T>(), H, T(0),
            f.grad_whr.data_ptr<T>(), H);
  }
  accumulate_gain_grads(N, GH, dhh, GH, ws_all + GH, W, f.grad_gain.data_ptr<T>(), f.grad_bias.data_ptr<T>());
  if (lstm) {
    accumulate_gain_grads(N, H, dch, H, ws_all + 2 * GH + H, W, f.grad_cell_gain.data_ptr<T>(),
                          f.grad_cell_bias.data_ptr<T>());
  }
}

// ---------------------------------------------------------------------------------------------
// LSTM
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_lstm_cpu(
    const at::Tensor& gates_x, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const at::Tensor& hh_gain, const at::Tensor& hh_bias, const at::Tensor& cell_gain, const at::Tensor& cell_bias,
    const at::Tensor& h0, const at::Tensor& c0, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    bool training, double eps, const c10::optional<at::Tensor>& recurrent_mask,
    const c10::optional<at::Tensor>& zoneout, const c10::optional<at::Tensor>& cell_zoneout,
    const c10::optional<at::Tensor>& w_hr) {
  const char* op = kLayerNormLstmOp;
  const int64_t H = check_layer_norm_inputs(op, 4, gates_x, w_hh, b_hh, hh_gain, hh_bias, &cell_gain, &cell_bias, h0,
                                            &c0, &w_hr, eps);
  const int64_t P = w_hh.size(1);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), h0.size(0), batch_sizes, reverse);

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = gates_x.options().dtype(acc);
  ForwardTensors f;
  f.gx = compute_view(gates_x, acc);
  f.whh = compute_view(w_hh, acc);
  f.whr = optional_compute_view(w_hr, acc);
  f.gain = compute_view(hh_gain, acc);
  f.shift = layer_norm_shift(hh_bias, b_hh, acc);
  f.cell_gain = compute_view(cell_gain, acc);
  f.cell_bias = compute_view(cell_bias, acc);
  f.mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  f.keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, P, gates_x, acc);
  f.keep_c = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, gates_x, acc);
  f.h_state = state_copy(h0, acc);
  f.c_state = state_copy(c0, acc);
  f.output = empty_recycled({plan.rows, P}, options);
  f.workspace = training ? empty_recycled({plan.rows, layer_norm_lstm_workspace_width(H)}, options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_lstm_cpu", [&] {
    run_forward<scalar_t>(plan, 4, H, eps, training, dtype, pointwise_kernels<scalar_t>().layer_norm_lstm_forward, f);
  });
  return {to_dtype(f.output, dtype), to_dtype(f.h_state, dtype), to_dtype(f.c_state, dtype), f.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
layer_norm_lstm_backward_cpu(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
                             const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh,
                             const at::Tensor& hh_gain, const at::Tensor& cell_gain, const at::Tensor& cell_bias,
                             const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output,
                             const at::Tensor& workspace, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
                             const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
                             const c10::optional<at::Tensor>& cell_zoneout, const c10::optional<at::Tensor>& w_hr) {
  const char* op = kLayerNormLstmBackwardOp;
  const int64_t H = check_layer_norm_backward_inputs(op, 4, output, w_hh, hh_gain, &cell_gain, &cell_bias, h0, &c0,
                                                     grad_output, grad_h_n, &grad_c_n, workspace, &w_hr);
  const int64_t GH = 4 * H, B = h0.size(0), P = output.size(1);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  BackwardTensors f;
  f.whh = compute_view(w_hh, acc);
  f.whr = optional_compute_view(w_hr, acc);
  f.gain = compute_view(hh_gain, acc);
  f.cell_gain = compute_view(cell_gain, acc);
  f.cell_bias = compute_view(cell_bias, acc);
  f.output = compute_view(output, acc);
  f.h0 = compute_view(h0, acc);
  f.c0 = compute_view(c0, acc);
  f.grad_output = optional_compute_view(grad_output, acc);
  f.mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  f.keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, P, output, acc);
  f.keep_c = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, output, acc);
  f.workspace = workspace;
  f.dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, P}, options);
  f.dc_state = present(grad_c_n) ? state_copy(*grad_c_n, acc) : at::zeros({B, H}, options);
  f.grad_gx = empty_recycled({plan.rows, GH}, options);
  f.grad_whh = at::zeros({GH, P}, options);
  f.grad_whr = f.whr.defined() ? at::zeros({P, H}, options) : at::empty({0}, options);
  f.grad_gain = at::zeros({GH}, options);
  f.grad_bias = at::zeros({GH}, options);
  f.grad_cell_gain = at::zeros({H}, options);
  f.grad_cell_bias = at::zeros({H}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_lstm_backward_cpu", [&] {
    run_backward<scalar_t>(plan, 4, H, pointwise_kernels<scalar_t>().layer_norm_lstm_backward, f);
  });
  // b_hh and hh_bias add at the same place: one gradient, returned for both.
  return {to_dtype(f.grad_gx, dtype),        to_dtype(f.grad_whh, dtype),       to_dtype(f.grad_bias, dtype),
          to_dtype(f.grad_gain, dtype),      to_dtype(f.grad_bias, dtype),      to_dtype(f.grad_cell_gain, dtype),
          to_dtype(f.grad_cell_bias, dtype), to_dtype(f.dh_state, dtype),       to_dtype(f.dc_state, dtype),
          to_dtype(f.grad_whr, dtype)};
}

// ---------------------------------------------------------------------------------------------
// GRU
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_gru_cpu(
    const at::Tensor& gates_x, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const at::Tensor& hh_gain, const at::Tensor& hh_bias, const at::Tensor& h0,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, bool training, double eps,
    const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout) {
  const char* op = kLayerNormGruOp;
  const int64_t H = check_layer_norm_inputs(op, 3, gates_x, w_hh, b_hh, hh_gain, hh_bias, nullptr, nullptr, h0,
                                            nullptr, nullptr, eps);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), h0.size(0), batch_sizes, reverse);

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = gates_x.options().dtype(acc);
  ForwardTensors f;
  f.gx = compute_view(gates_x, acc);
  f.whh = compute_view(w_hh, acc);
  f.gain = compute_view(hh_gain, acc);
  f.shift = layer_norm_shift(hh_bias, b_hh, acc);
  f.mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  f.keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, H, gates_x, acc);
  f.h_state = state_copy(h0, acc);
  f.output = empty_recycled({plan.rows, H}, options);
  f.workspace = training ? empty_recycled({plan.rows, layer_norm_gru_workspace_width(H)}, options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_gru_cpu", [&] {
    run_forward<scalar_t>(plan, 3, H, eps, training, dtype, pointwise_kernels<scalar_t>().layer_norm_gru_forward, f);
  });
  return {to_dtype(f.output, dtype), to_dtype(f.h_state, dtype), f.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_gru_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n, const at::Tensor& w_hh,
    const at::Tensor& hh_gain, const at::Tensor& h0, const at::Tensor& output, const at::Tensor& workspace,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, const c10::optional<at::Tensor>& recurrent_mask,
    const c10::optional<at::Tensor>& zoneout) {
  const char* op = kLayerNormGruBackwardOp;
  const int64_t H = check_layer_norm_backward_inputs(op, 3, output, w_hh, hh_gain, nullptr, nullptr, h0, nullptr,
                                                     grad_output, grad_h_n, nullptr, workspace, nullptr);
  const int64_t GH = 3 * H, B = h0.size(0);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  BackwardTensors f;
  f.whh = compute_view(w_hh, acc);
  f.gain = compute_view(hh_gain, acc);
  f.output = compute_view(output, acc);
  f.h0 = compute_view(h0, acc);
  f.grad_output = optional_compute_view(grad_output, acc);
  f.mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  f.keep_h = zoneout_view(op, "zoneout", zoneout, plan.rows, H, output, acc);
  f.workspace = workspace;
  f.dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, H}, options);
  f.grad_gx = empty_recycled({plan.rows, GH}, options);
  f.grad_whh = at::zeros({GH, H}, options);
  f.grad_gain = at::zeros({GH}, options);
  f.grad_bias = at::zeros({GH}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_gru_backward_cpu", [&] {
    run_backward<scalar_t>(plan, 3, H, pointwise_kernels<scalar_t>().layer_norm_gru_backward, f);
  });
  return {to_dtype(f.grad_gx, dtype),   to_dtype(f.grad_whh, dtype),  to_dtype(f.grad_bias, dtype),
          to_dtype(f.grad_gain, dtype), to_dtype(f.grad_bias, dtype), to_dtype(f.dh_state, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnfused, CPU, m) {
  m.impl("layer_norm_lstm_recurrence", &layer_norm_lstm_cpu);
  m.impl("layer_norm_lstm_recurrence_backward", &layer_norm_lstm_backward_cpu);
  m.impl("layer_norm_gru_recurrence", &layer_norm_gru_cpu);
  m.impl("layer_norm_gru_recurrence_backward", &layer_norm_gru_backward_cpu);
}

}  // namespace rnnfused::cpu
