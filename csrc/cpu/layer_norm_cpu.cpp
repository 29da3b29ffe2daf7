// The LayerNorm LSTM and GRU recurrences on the CPU (rnnfused::layer_norm_*_recurrence, schemas in
// csrc/op_schemas.h): per step one GEMM, h_{t-1} W_hh^T into a preallocated buffer, then one pass
// per row (rows in parallel) that normalizes it, finishes the gates (cell_math.h), for the LSTM
// normalizes the new cell state, and writes h_t. A row's normalization is a reduction over all its
// G*H gate values, which is why these cells run a per-row pass rather than the fused engine's
// per-slice split of the hidden units.
//
// Backward mirrors the loop in reverse: per step one pass per row (the gates' gradients, both
// normalizations' backward), one GEMM for dh_{t-1} and one accumulating dW_hh.
//
// float32 and float64 run in their own type; bfloat16 and float16 run the float32 loop on float
// copies, rounding h_t to the input dtype every step, as the plain ops do (recurrence_cpu.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "../cell_math.h"
#include "../recurrence.h"
#include "blas.h"
#include "op_helpers.h"

namespace rnnfused::cpu {
namespace {

// Normalizes one row: xhat = (x - mean) rstd over `width` values (x and xhat may be the same
// buffer). Returns rstd = 1 / sqrt(var + eps), the biased variance as torch.nn.LayerNorm's.
template <typename T>
T normalize_row(int64_t width, const T* x, T eps, T* xhat) {
  T mean = 0;
  for (int64_t j = 0; j < width; ++j) mean += x[j];
  mean /= T(width);
  T var = 0;
  for (int64_t j = 0; j < width; ++j) {
    const T d = x[j] - mean;
    var += d * d;
  }
  var /= T(width);
  const T rstd = T(1) / std::sqrt(var + eps);
  for (int64_t j = 0; j < width; ++j) xhat[j] = (x[j] - mean) * rstd;
  return rstd;
}

// dx of one normalized row from dxhat (the gradient of xhat), see cell_math.h.
template <typename T>
void normalize_row_backward(int64_t width, T rstd, const T* xhat, const T* dxhat, T* dx) {
  T mean_d = 0, mean_dx = 0;
  for (int64_t j = 0; j < width; ++j) {
    mean_d += dxhat[j];
    mean_dx += dxhat[j] * xhat[j];
  }
  mean_d /= T(width);
  mean_dx /= T(width);
  for (int64_t j = 0; j < width; ++j) dx[j] = layer_norm_input_grad(rstd, dxhat[j], xhat[j], mean_d, mean_dx);
}

// Rows a pass hands to one thread: enough work per task to pay for the fork.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)); }

// The keep weight of element u of a zoned row (0 when zoneout is off: the state is the candidate).
template <typename T>
T keep_at(const KeepRows<T>& keep, int64_t row, int64_t u) {
  return keep ? keep.at(row)[u * keep.stride] : T(0);
}

struct LayerNormArgs {
  at::Tensor gx, whh, bias, hh_gain, hh_bias, cell_gain, cell_bias, mask, keep_h, keep_c;
};

void check_gain(const char* op, const char* what, const at::Tensor& t, const at::Tensor& gates_x, int64_t size) {
  check_vector(op, what, t, gates_x, size);
}

// ---------------------------------------------------------------------------------------------
// LSTM
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_lstm_cpu(
    const at::Tensor& gates_x, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const at::Tensor& hh_gain, const at::Tensor& hh_bias, const at::Tensor& cell_gain, const at::Tensor& cell_bias,
    const at::Tensor& h0, const at::Tensor& c0, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    bool training, double eps, const c10::optional<at::Tensor>& recurrent_mask,
    const c10::optional<at::Tensor>& zoneout, const c10::optional<at::Tensor>& cell_zoneout) {
  const char* op = kLayerNormLstmOp;
  const int64_t H = check_recurrence_inputs(op, 4, gates_x, w_hh, b_hh, h0);
  const int64_t GH = 4 * H;
  TORCH_CHECK(w_hh.size(1) == H, op, ": w_hh must be [4 * hidden, hidden] = [", GH, ", ", H,
              "] (the LayerNorm LSTM has no projection), got ", w_hh.sizes());
  check_gain(op, "hh_gain", hh_gain, gates_x, GH);
  check_gain(op, "hh_bias", hh_bias, gates_x, GH);
  check_gain(op, "cell_gain", cell_gain, gates_x, H);
  check_gain(op, "cell_bias", cell_bias, gates_x, H);
  check_matrix(op, "c0", c0, gates_x, h0.size(0), H);
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), B, batch_sizes, reverse);
  const int64_t W = layer_norm_lstm_workspace_width(H);

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const at::Tensor gx = compute_view(gates_x, acc), whh = compute_view(w_hh, acc);
  const at::Tensor bias = bias_or_zeros(b_hh, GH, gates_x, acc);
  const at::Tensor gain = compute_view(hh_gain, acc), beta = compute_view(hh_bias, acc);
  const at::Tensor cgain = compute_view(cell_gain, acc), cbeta = compute_view(cell_bias, acc);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, H, gates_x, acc);
  const at::Tensor keep_c_t = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc), c_state = state_copy(c0, acc);
  at::Tensor output = at::empty({plan.rows, H}, gates_x.options().dtype(acc));
  const auto ws_options = gates_x.options().dtype(acc);
  at::Tensor workspace = training ? at::empty({plan.rows, W}, ws_options) : at::empty({0}, ws_options);
  // Per-step buffers: the product, the masked h_{t-1}, and (without a workspace) the rows' scratch.
  at::Tensor product = at::empty({B, GH}, ws_options);
  at::Tensor masked_h = mask.defined() ? at::empty({B, H}, ws_options) : at::Tensor();
  at::Tensor scratch = training ? at::Tensor() : at::empty({B, W}, ws_options);

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_lstm_cpu", [&] {
    using T = scalar_t;
    T* hs = h_state.data_ptr<T>();
    T* cs = c_state.data_ptr<T>();
    T* out = output.data_ptr<T>();
    T* gh = product.data_ptr<T>();
    const T *g = gain.data_ptr<T>(), *be = beta.data_ptr<T>(), *bi = bias.data_ptr<T>();
    const T *cg = cgain.data_ptr<T>(), *cb = cbeta.data_ptr<T>();
    const KeepRows<T> keep_h(keep_h_t, H), keep_c(keep_c_t, H);
    const T epsilon = static_cast<T>(eps);
    const StepWeight<T> recurrent(true, B, GH, H, whh.data_ptr<T>(), H);  // h W_hh^T
    for (const auto s : c10::irange(plan.steps())) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      const T* h_in = hs;
      if (mask.defined()) {
        const T* m = mask.data_ptr<T>();
        T* dst = masked_h.data_ptr<T>();
        for (int64_t i = 0; i < rows * H; ++i) dst[i] = hs[i] * m[i];
        h_in = dst;
      }
      recurrent.multiply(rows, h_in, H, T(0), gh, GH);
      T* ws_step = training ? workspace.data_ptr<T>() + off * W : scratch.data_ptr<T>();
      at::parallel_for(0, rows, row_grain(GH), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t row = off + b;
          T* ws = ws_step + b * W;
          T *act = ws, *xh = ws + GH, *c_out = ws + 2 * GH, *xc = ws + 2 * GH + H;
          ws[2 * GH + 2 * H] = normalize_row<T>(GH, gh + b * GH, epsilon, xh);
          const T* x = gx.data_ptr<T>() + row * GH;
          T* c_row = cs + b * H;
          for (int64_t u = 0; u < H; ++u) {
            T pre[4];
            for (int k = 0; k < 4; ++k) {
              const int64_t j = k * H + u;
              pre[k] = x[j] + (g[j] * xh[j] + be[j]) + bi[j];
            }
            const auto a = lstm_forward(pre[0], pre[1], pre[2], pre[3], c_row[u]);
            act[u] = a.i;
            act[H + u] = a.f;
            act[2 * H + u] = a.g;
            act[3 * H + u] = a.o;
            c_out[u] = a.c;  // c~ for now; the carried c_t below
          }
          ws[2 * GH + 2 * H + 1] = normalize_row<T>(H, c_out, epsilon, xc);
          T* h_row = hs + b * H;
          for (int64_t u = 0; u < H; ++u) {
            const T h_cand = act[3 * H + u] * tanh_act(cg[u] * xc[u] + cb[u]);
            const T c_t = keep_c ? rnnfused::zoneout(keep_at(keep_c, row, u), c_row[u], c_out[u]) : c_out[u];
            T h_t = keep_h ? rnnfused::zoneout(keep_at(keep_h, row, u), h_row[u], h_cand) : h_cand;
            round_to_storage(dtype, &h_t, 1);
            c_out[u] = c_row[u] = c_t;
            h_row[u] = out[row * H + u] = h_t;
          }
        }
      });
    }
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype), to_dtype(c_state, dtype), workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_norm_lstm_backward_cpu(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n,
                             const c10::optional<at::Tensor>& grad_c_n, const at::Tensor& w_hh,
                             const at::Tensor& hh_gain, const at::Tensor& cell_gain, const at::Tensor& cell_bias,
                             const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& output,
                             const at::Tensor& workspace, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
                             const c10::optional<at::Tensor>& recurrent_mask, const c10::optional<at::Tensor>& zoneout,
                             const c10::optional<at::Tensor>& cell_zoneout) {
  const char* op = kLayerNormLstmBackwardOp;
  TORCH_CHECK(output.dim() == 2, op, ": output must be 2-D, got ", output.dim(), "-D");
  const int64_t H = output.size(1), GH = 4 * H;
  check_matrix(op, "w_hh", w_hh, output, GH, H);
  check_gain(op, "hh_gain", hh_gain, output, GH);
  check_gain(op, "cell_gain", cell_gain, output, H);
  check_gain(op, "cell_bias", cell_bias, output, H);
  check_matrix(op, "h0", h0, output, -1, H);
  const int64_t B = h0.size(0);
  check_matrix(op, "c0", c0, output, B, H);
  check_optional_grad(op, "grad_output", grad_output, output);
  check_optional_grad(op, "grad_h_n", grad_h_n, h0);
  check_optional_grad(op, "grad_c_n", grad_c_n, c0);
  const int64_t W = layer_norm_lstm_workspace_width(H);
  check_workspace(op, workspace, output, 1, W);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const at::Tensor whh = compute_view(w_hh, acc), gain = compute_view(hh_gain, acc);
  const at::Tensor cgain = compute_view(cell_gain, acc), cbeta = compute_view(cell_bias, acc);
  const at::Tensor out = compute_view(output, acc), h0_c = compute_view(h0, acc), c0_c = compute_view(c0, acc);
  const at::Tensor go = optional_compute_view(grad_output, acc);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, H, output, acc);
  const at::Tensor keep_c_t = zoneout_view(op, "cell_zoneout", cell_zoneout, plan.rows, H, output, acc);
  at::Tensor dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, H}, options);
  at::Tensor dc_state = present(grad_c_n) ? state_copy(*grad_c_n, acc) : at::zeros({B, H}, options);
  at::Tensor grad_gx = at::empty({plan.rows, GH}, options);
  at::Tensor grad_whh = at::zeros({GH, H}, options);
  at::Tensor grad_gain = at::zeros({GH}, options), grad_beta = at::zeros({GH}, options);
  at::Tensor grad_cgain = at::zeros({H}, options), grad_cbeta = at::zeros({H}, options);
  // Per-step buffers: dL/d(h W_hh^T) of the rows, dL/dc^ (the normalized cell state), the h_{t-1}
  // the product saw (masked), and dL/dh_{t-1} through W_hh.
  at::Tensor d_product = at::empty({B, GH}, options), d_c_hat = at::empty({B, H}, options);
  at::Tensor h_seen = at::empty({B, H}, options), dh_product = at::empty({B, H}, options);

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_lstm_backward_cpu", [&] {
    using T = scalar_t;
    const T* ws_all = workspace.data_ptr<T>();
    const T *o_all = out.data_ptr<T>(), *g = gain.data_ptr<T>(), *cg = cgain.data_ptr<T>(), *cb = cbeta.data_ptr<T>();
    const T* go_p = ptr_or_null<T>(go);
    const T* m = ptr_or_null<T>(mask);
    T *dhs = dh_state.data_ptr<T>(), *dcs = dc_state.data_ptr<T>(), *dgx = grad_gx.data_ptr<T>();
    T *dp = d_product.data_ptr<T>(), *dch = d_c_hat.data_ptr<T>(), *hseen = h_seen.data_ptr<T>();
    const KeepRows<T> keep_h(keep_h_t, H), keep_c(keep_c_t, H);
    for (int64_t s = plan.steps() - 1; s >= 0; --s) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      const int64_t from_prev = plan.rows_from_previous(t);
      const int64_t prev_off = from_prev > 0 ? plan.offsets[plan.previous_step(t)] : 0;
      at::parallel_for(0, rows, row_grain(GH), [&](int64_t begin, int64_t end) {
        std::vector<T> d_xc(H), dc_cand(H), d_xhat(GH);
        for (int64_t b = begin; b < end; ++b) {
          const int64_t row = off + b;
          const T* ws = ws_all + row * W;
          const T *act = ws, *xh = ws + GH, *xc = ws + 2 * GH + H;
          const T rstd_hh = ws[2 * GH + 2 * H], rstd_c = ws[2 * GH + 2 * H + 1];
          const bool continues = b < from_prev;
          const T* h_prev = continues ? o_all + (prev_off + b) * H : h0_c.data_ptr<T>() + b * H;
          const T* c_prev = continues ? ws_all + (prev_off + b) * W + 2 * GH : c0_c.data_ptr<T>() + b * H;
          T* d = dgx + row * GH;
          T *dh = dhs + b * H, *dc = dcs + b * H;
          for (int64_t u = 0; u < H; ++u) {
            const T dh_total = dh[u] + (go_p ? go_p[row * H + u] : T(0));
            const T kh = keep_at(keep_h, row, u), kc = keep_at(keep_c, row, u);
            const auto od = layer_norm_lstm_output_backward(act[3 * H + u], tanh_act(cg[u] * xc[u] + cb[u]),
                                                            (T(1) - kh) * dh_total);
            d[3 * H + u] = od.pre_o;
            dch[b * H + u] = od.c_hat;
            d_xc[u] = od.c_hat * cg[u];
            dh[u] = kh * dh_total;            // the kept part of dh_t, to h_{t-1}; W_hh's part joins below
            dc_cand[u] = (T(1) - kc) * dc[u];  // the candidate's share of dc_t
            dc[u] = kc * dc[u];
          }
          normalize_row_backward<T>(H, rstd_c, xc, d_xc.data(), d_xc.data());
          for (int64_t u = 0; u < H; ++u) {
            const auto gd = lstm_backward(act[u], act[H + u], act[2 * H + u], act[3 * H + u], T(0), c_prev[u], T(0),
                                          dc_cand[u] + d_xc[u]);
            d[u] = gd.pre_i;
            d[H + u] = gd.pre_f;
            d[2 * H + u] = gd.pre_g;
            dc[u] += gd.c_prev;
            hseen[b * H + u] = m ? h_prev[u] * m[b * H + u] : h_prev[u];
          }
          for (int64_t j = 0; j < GH; ++j) d_xhat[j] = d[j] * g[j];
          normalize_row_backward<T>(GH, rstd_hh, xh, d_xhat.data(), dp + b * GH);
        }
      });
      // The gains' and biases' gradients, summed over the rows in a fixed order.
      T *dgain = grad_gain.data_ptr<T>(), *dbeta = grad_beta.data_ptr<T>();
      T *dcgain = grad_cgain.data_ptr<T>(), *dcbeta = grad_cbeta.data_ptr<T>();
      for (int64_t b = 0; b < rows; ++b) {
        const T* ws = ws_all + (off + b) * W;
        const T* d = dgx + (off + b) * GH;
        for (int64_t j = 0; j < GH; ++j) {
          dgain[j] += d[j] * ws[GH + j];
          dbeta[j] += d[j];
        }
        for (int64_t u = 0; u < H; ++u) {
          dcgain[u] += dch[b * H + u] * ws[2 * GH + H + u];
          dcbeta[u] += dch[b * H + u];
        }
      }
      // dL/dh_{t-1} += (dP W_hh) * mask;  dW_hh += dP^T (h_{t-1} * mask).
      T* dhp = dh_product.data_ptr<T>();
      gemm<T>(false, false, rows, H, GH, T(1), dp, GH, whh.data_ptr<T>(), H, T(0), dhp, H);
      for (int64_t i = 0; i < rows * H; ++i) dhs[i] += m ? dhp[i] * m[i] : dhp[i];
      gemm<T>(true, false, GH, H, rows, T(1), dp, GH, hseen, H, T(1), grad_whh.data_ptr<T>(), H);
    }
  });
  return {to_dtype(grad_gx, dtype),   to_dtype(grad_whh, dtype),   to_dtype(grad_beta, dtype),
          to_dtype(grad_gain, dtype), to_dtype(grad_beta, dtype),  to_dtype(grad_cgain, dtype),
          to_dtype(grad_cbeta, dtype), to_dtype(dh_state, dtype), to_dtype(dc_state, dtype)};
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
  const int64_t H = check_recurrence_inputs(op, 3, gates_x, w_hh, b_hh, h0);
  const int64_t GH = 3 * H;
  TORCH_CHECK(w_hh.size(1) == H, op, ": w_hh must be [3 * hidden, hidden] = [", GH, ", ", H, "], got ",
              w_hh.sizes());
  check_gain(op, "hh_gain", hh_gain, gates_x, GH);
  check_gain(op, "hh_bias", hh_bias, gates_x, GH);
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  const int64_t B = h0.size(0);
  const StepPlan plan = make_step_plan(op, gates_x.size(0), B, batch_sizes, reverse);
  const int64_t W = layer_norm_gru_workspace_width(H);

  const auto dtype = gates_x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto ws_options = gates_x.options().dtype(acc);
  const at::Tensor gx = compute_view(gates_x, acc), whh = compute_view(w_hh, acc);
  const at::Tensor bias = bias_or_zeros(b_hh, GH, gates_x, acc);
  const at::Tensor gain = compute_view(hh_gain, acc), beta = compute_view(hh_bias, acc);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, H, gates_x, acc);
  at::Tensor h_state = state_copy(h0, acc);
  at::Tensor output = at::empty({plan.rows, H}, ws_options);
  at::Tensor workspace = training ? at::empty({plan.rows, W}, ws_options) : at::empty({0}, ws_options);
  at::Tensor product = at::empty({B, GH}, ws_options);
  at::Tensor masked_h = mask.defined() ? at::empty({B, H}, ws_options) : at::Tensor();
  at::Tensor scratch = training ? at::Tensor() : at::empty({B, W}, ws_options);

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_gru_cpu", [&] {
    using T = scalar_t;
    T* hs = h_state.data_ptr<T>();
    T* out = output.data_ptr<T>();
    T* gh = product.data_ptr<T>();
    const T *g = gain.data_ptr<T>(), *be = beta.data_ptr<T>(), *bi = bias.data_ptr<T>();
    const KeepRows<T> keep_h(keep_h_t, H);
    const T epsilon = static_cast<T>(eps);
    const StepWeight<T> recurrent(true, B, GH, H, whh.data_ptr<T>(), H);
    for (const auto s : c10::irange(plan.steps())) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      const T* h_in = hs;
      if (mask.defined()) {
        const T* m = mask.data_ptr<T>();
        T* dst = masked_h.data_ptr<T>();
        for (int64_t i = 0; i < rows * H; ++i) dst[i] = hs[i] * m[i];
        h_in = dst;
      }
      recurrent.multiply(rows, h_in, H, T(0), gh, GH);
      T* ws_step = training ? workspace.data_ptr<T>() + off * W : scratch.data_ptr<T>();
      at::parallel_for(0, rows, row_grain(GH), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t row = off + b;
          T* ws = ws_step + b * W;
          T *act = ws, *xh = ws + GH, *hh_n = ws + 2 * GH;
          ws[2 * GH + H] = normalize_row<T>(GH, gh + b * GH, epsilon, xh);
          const T* x = gx.data_ptr<T>() + row * GH;
          T* h_row = hs + b * H;
          for (int64_t u = 0; u < H; ++u) {
            T hh[3];
            for (int k = 0; k < 3; ++k) {
              const int64_t j = k * H + u;
              hh[k] = (g[j] * xh[j] + be[j]) + bi[j];
            }
            const auto a = gru_forward(x[u], x[H + u], x[2 * H + u], hh[0], hh[1], hh[2], h_row[u]);
            act[u] = a.r;
            act[H + u] = a.z;
            act[2 * H + u] = a.n;
            hh_n[u] = hh[2];
            T h_t = keep_h ? rnnfused::zoneout(keep_at(keep_h, row, u), h_row[u], a.h) : a.h;
            round_to_storage(dtype, &h_t, 1);
            h_row[u] = out[row * H + u] = h_t;
          }
        }
      });
    }
  });
  return {to_dtype(output, dtype), to_dtype(h_state, dtype), workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_gru_backward_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_h_n, const at::Tensor& w_hh,
    const at::Tensor& hh_gain, const at::Tensor& h0, const at::Tensor& output, const at::Tensor& workspace,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, const c10::optional<at::Tensor>& recurrent_mask,
    const c10::optional<at::Tensor>& zoneout) {
  const char* op = kLayerNormGruBackwardOp;
  TORCH_CHECK(output.dim() == 2, op, ": output must be 2-D, got ", output.dim(), "-D");
  const int64_t H = output.size(1), GH = 3 * H;
  check_matrix(op, "w_hh", w_hh, output, GH, H);
  check_gain(op, "hh_gain", hh_gain, output, GH);
  check_matrix(op, "h0", h0, output, -1, H);
  const int64_t B = h0.size(0);
  check_optional_grad(op, "grad_output", grad_output, output);
  check_optional_grad(op, "grad_h_n", grad_h_n, h0);
  const int64_t W = layer_norm_gru_workspace_width(H);
  check_workspace(op, workspace, output, 1, W);
  const StepPlan plan = make_step_plan(op, output.size(0), B, batch_sizes, reverse);

  const auto dtype = output.scalar_type();
  const auto acc = compute_dtype(dtype);
  const auto options = output.options().dtype(acc);
  const at::Tensor whh = compute_view(w_hh, acc), gain = compute_view(hh_gain, acc);
  const at::Tensor out = compute_view(output, acc), h0_c = compute_view(h0, acc);
  const at::Tensor go = optional_compute_view(grad_output, acc);
  const at::Tensor mask = recurrent_mask_view(op, recurrent_mask, h0, acc);
  const at::Tensor keep_h_t = zoneout_view(op, "zoneout", zoneout, plan.rows, H, output, acc);
  at::Tensor dh_state = present(grad_h_n) ? state_copy(*grad_h_n, acc) : at::zeros({B, H}, options);
  at::Tensor grad_gx = at::empty({plan.rows, GH}, options);
  at::Tensor grad_whh = at::zeros({GH, H}, options);
  at::Tensor grad_gain = at::zeros({GH}, options), grad_beta = at::zeros({GH}, options);
  // Per-step buffers: dL/dhh (hh = gain xhat + bias + b_hh), dL/d(h W_hh^T), the h_{t-1} the product
  // saw (masked), and dL/dh_{t-1} through W_hh.
  at::Tensor d_hh = at::empty({B, GH}, options), d_product = at::empty({B, GH}, options);
  at::Tensor h_seen = at::empty({B, H}, options), dh_product = at::empty({B, H}, options);

  AT_DISPATCH_FLOATING_TYPES(acc, "rnnfused_layer_norm_gru_backward_cpu", [&] {
    using T = scalar_t;
    const T* ws_all = workspace.data_ptr<T>();
    const T *o_all = out.data_ptr<T>(), *g = gain.data_ptr<T>();
    const T* go_p = ptr_or_null<T>(go);
    const T* m = ptr_or_null<T>(mask);
    T *dhs = dh_state.data_ptr<T>(), *dgx = grad_gx.data_ptr<T>();
    T *dhh = d_hh.data_ptr<T>(), *dp = d_product.data_ptr<T>(), *hseen = h_seen.data_ptr<T>();
    const KeepRows<T> keep_h(keep_h_t, H);
    for (int64_t s = plan.steps() - 1; s >= 0; --s) {
      const int64_t t = plan.step_at(s);
      const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
      const int64_t from_prev = plan.rows_from_previous(t);
      const int64_t prev_off = from_prev > 0 ? plan.offsets[plan.previous_step(t)] : 0;
      at::parallel_for(0, rows, row_grain(GH), [&](int64_t begin, int64_t end) {
        std::vector<T> d_xhat(GH);
        for (int64_t b = begin; b < end; ++b) {
          const int64_t row = off + b;
          const T* ws = ws_all + row * W;
          const T *act = ws, *xh = ws + GH, *hh_n = ws + 2 * GH;
          const T rstd = ws[2 * GH + H];
          const T* h_prev = b < from_prev ? o_all + (prev_off + b) * H : h0_c.data_ptr<T>() + b * H;
          T* d = dgx + row * GH;
          T* dr = dhh + b * GH;
          T* dh = dhs + b * H;
          for (int64_t u = 0; u < H; ++u) {
            const T dh_total = dh[u] + (go_p ? go_p[row * H + u] : T(0));
            const T kh = keep_at(keep_h, row, u);
            const auto gd = gru_backward(act[u], act[H + u], act[2 * H + u], hh_n[u], h_prev[u], (T(1) - kh) * dh_total);
            d[u] = dr[u] = gd.x_r;
            d[H + u] = dr[H + u] = gd.x_z;
            d[2 * H + u] = gd.x_n;
            dr[2 * H + u] = gd.hh_n;
            dh[u] = kh * dh_total + gd.h_prev;
            hseen[b * H + u] = m ? h_prev[u] * m[b * H + u] : h_prev[u];
          }
          for (int64_t j = 0; j < GH; ++j) d_xhat[j] = dr[j] * g[j];
          normalize_row_backward<T>(GH, rstd, xh, d_xhat.data(), dp + b * GH);
        }
      });
      T *dgain = grad_gain.data_ptr<T>(), *dbeta = grad_beta.data_ptr<T>();
      for (int64_t b = 0; b < rows; ++b) {
        const T* xh = ws_all + (off + b) * W + GH;
        for (int64_t j = 0; j < GH; ++j) {
          dgain[j] += dhh[b * GH + j] * xh[j];
          dbeta[j] += dhh[b * GH + j];
        }
      }
      T* dhp = dh_product.data_ptr<T>();
      gemm<T>(false, false, rows, H, GH, T(1), dp, GH, whh.data_ptr<T>(), H, T(0), dhp, H);
      for (int64_t i = 0; i < rows * H; ++i) dhs[i] += m ? dhp[i] * m[i] : dhp[i];
      gemm<T>(true, false, GH, H, rows, T(1), dp, GH, hseen, H, T(1), grad_whh.data_ptr<T>(), H);
    }
  });
  return {to_dtype(grad_gx, dtype),   to_dtype(grad_whh, dtype),  to_dtype(grad_beta, dtype),
          to_dtype(grad_gain, dtype), to_dtype(grad_beta, dtype), to_dtype(dh_state, dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnfused, CPU, m) {
  m.impl("layer_norm_lstm_recurrence", &layer_norm_lstm_cpu);
  m.impl("layer_norm_lstm_recurrence_backward", &layer_norm_lstm_backward_cpu);
  m.impl("layer_norm_gru_recurrence", &layer_norm_gru_cpu);
  m.impl("layer_norm_gru_recurrence_backward", &layer_norm_gru_backward_cpu);
}

}  // namespace rnnfused::cpu
