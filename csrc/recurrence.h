// Host-side pieces shared by the CPU and CUDA implementations of the recurrence ops: the
// tensors each op returns, allocated the same way on every device so that the fake kernels
// in rnnfused/_ops.py describe all of them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <tuple>

#include "checks.h"

namespace rnnfused {

// The type the recurrence computes and keeps its workspace in: float for bfloat16 and
// float16, the dtype itself otherwise.
inline at::ScalarType compute_dtype(at::ScalarType t) { return at::toOpMathType(t); }

// Names used in error messages.
constexpr const char* kLstmOp = "rnnfused::lstm_recurrence";
constexpr const char* kLstmBackwardOp = "rnnfused::lstm_recurrence_backward";
constexpr const char* kGruOp = "rnnfused::gru_recurrence";
constexpr const char* kGruBackwardOp = "rnnfused::gru_recurrence_backward";
constexpr const char* kRnnTanhOp = "rnnfused::rnn_tanh_recurrence";
constexpr const char* kRnnReluOp = "rnnfused::rnn_relu_recurrence";
constexpr const char* kRnnTanhBackwardOp = "rnnfused::rnn_tanh_recurrence_backward";
constexpr const char* kRnnReluBackwardOp = "rnnfused::rnn_relu_recurrence_backward";
constexpr const char* kLayerInferenceOp = "rnnfused::layer_inference";

// Workspace columns per row: what the backward pass reads back.
constexpr int64_t kLstmWorkspaceGates = 5;  // i, f, g, o, c
constexpr int64_t kGruWorkspaceGates = 4;   // r, z, n, W_hn h + b_hn

// LayerNorm LSTM / GRU (csrc/cpu/layer_norm_cpu.cpp) workspace columns per row, in order:
//   LSTM 10 H + 2: i f g o (4H) | xhat of h_{t-1} W_hh^T (4H) | c_t, the carried cell state (H) |
//                  xhat of c~_t (H) | rstd of the first normalization | rstd of the second
//   GRU   7 H + 1: r z n (3H) | xhat of h_{t-1} W_hh^T (3H) | hh_n = gain xhat + bias + b_hh of the
//                  n gate (H) | rstd
constexpr int64_t layer_norm_lstm_workspace_width(int64_t hidden) { return 10 * hidden + 2; }
constexpr int64_t layer_norm_gru_workspace_width(int64_t hidden) { return 7 * hidden + 1; }
constexpr const char* kLayerNormLstmOp = "rnnfused::layer_norm_lstm_recurrence";
constexpr const char* kLayerNormLstmBackwardOp = "rnnfused::layer_norm_lstm_recurrence_backward";
constexpr const char* kLayerNormGruOp = "rnnfused::layer_norm_gru_recurrence";
constexpr const char* kLayerNormGruBackwardOp = "rnnfused::layer_norm_gru_recurrence_backward";

// The workspace of a forward call: [N, gates * H] in the compute dtype when the call records
// for backward, else an empty [0].
// `empty_rows`: how the [N, gates * H] tensor is allocated (the CPU ops pass their buffer cache,
// cpu/buffer_cache.h); at::empty when null.
using EmptyRows = at::Tensor (*)(at::IntArrayRef, const at::TensorOptions&);
inline at::Tensor empty_workspace(const at::Tensor& gates_x, bool training, int64_t gates, int64_t hidden,
                                  EmptyRows empty_rows = nullptr) {
  const auto options = gates_x.options().dtype(compute_dtype(gates_x.scalar_type()));
  if (!training) return at::empty({0}, options);
  const std::array<int64_t, 2> sizes{gates_x.size(0), gates * hidden};
  return empty_rows != nullptr ? empty_rows(sizes, options) : at::empty(sizes, options);
}

// A backward call needs the workspace its forward recorded.
inline void check_workspace(const char* op, const at::Tensor& workspace, const at::Tensor& output,
                            int64_t gates, int64_t hidden) {
  const int64_t rows = output.size(0);
  TORCH_CHECK(rows == 0 || workspace.numel() > 0, op,
              ": the workspace is empty; the forward call ran with training=False and recorded nothing for backward");
  TORCH_CHECK(rows == 0 || (workspace.dim() == 2 && workspace.size(0) == rows && workspace.size(1) == gates * hidden),
              op, ": workspace must have shape [", rows, ", ", gates * hidden, "], got ", workspace.sizes());
  TORCH_CHECK(workspace.scalar_type() == compute_dtype(output.scalar_type()), op, ": workspace must be ",
              compute_dtype(output.scalar_type()), ", got ", workspace.scalar_type());
  TORCH_CHECK(workspace.device() == output.device(), op, ": workspace is on ", workspace.device(),
              " but output is on ", output.device());
}

// Shared checks of the backward ops. `output` is the forward output [N, P] and the reference for
// dtype and device; the optional gradients must match the tensors they are the gradients of.
inline void check_optional_grad(const char* op, const char* what, const c10::optional<at::Tensor>& grad,
                                const at::Tensor& like) {
  if (!grad.has_value() || !grad->defined()) return;
  TORCH_CHECK(grad->sizes() == like.sizes(), op, ": ", what, " must have shape ", like.sizes(), ", got ",
              grad->sizes());
  TORCH_CHECK(grad->scalar_type() == like.scalar_type(), op, ": ", what, " must be ", like.scalar_type(), ", got ",
              grad->scalar_type());
  TORCH_CHECK(grad->device() == like.device(), op, ": ", what, " is on ", grad->device(), " but the forward ran on ",
              like.device());
}

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The regularization arguments of the ops (op_schemas.h), checked, in the compute dtype `acc`;
// undefined when absent.
// recurrent_mask: [B, P], like h0.
inline at::Tensor recurrent_mask_view(const char* op, const c10::optional<at::Tensor>& mask, const at::Tensor& h0,
                                      at::ScalarType acc) {
  if (!present(mask)) return at::Tensor();
  check_matrix(op, "recurrent_mask", *mask, h0, h0.size(0), h0.size(1));  // shape, dtype, device
  return mask->to(acc).contiguous();
}

// zoneout / cell_zoneout keep weights: [rows, width] or a scalar, in the dtype and on the device of
// `like`.
inline at::Tensor zoneout_view(const char* op, const char* what, const c10::optional<at::Tensor>& keep, int64_t rows,
                               int64_t width, const at::Tensor& like, at::ScalarType acc) {
  if (!present(keep)) return at::Tensor();
  TORCH_CHECK(keep->dim() == 0 || (keep->dim() == 2 && keep->size(0) == rows && keep->size(1) == width), op, ": ",
              what, " must be [", rows, ", ", width, "] or a scalar, got ", keep->sizes());
  TORCH_CHECK(keep->scalar_type() == like.scalar_type(), op, ": ", what, " has dtype ", keep->scalar_type(),
              " but the op runs in ", like.scalar_type());
  TORCH_CHECK(keep->device() == like.device(), op, ": ", what, " is on ", keep->device(), " but the op runs on ",
              like.device());
  return keep->to(acc).contiguous();
}

// hh_bias + b_hh of a LayerNorm cell in the compute dtype: both add after the gain, so the loops add
// their sum (b_hh may be absent).
inline at::Tensor layer_norm_shift(const at::Tensor& hh_bias, const c10::optional<at::Tensor>& b_hh, at::ScalarType acc) {
  const at::Tensor beta = hh_bias.to(acc).contiguous();
  return present(b_hh) ? (beta + b_hh->to(acc)).contiguous() : beta;
}

// The checks of a LayerNorm recurrence forward (op_schemas.h), shared by the CPU and CUDA ops.
// G = 4 (LSTM: cell_gain, cell_bias, c0 and the optional w_hr given) or 3 (GRU: nullptr). Returns H;
// the width of h is w_hh.size(1) (P: proj_size with w_hr, else H).
inline int64_t check_layer_norm_inputs(const char* op, int64_t G, const at::Tensor& gates_x, const at::Tensor& w_hh,
                                       const c10::optional<at::Tensor>& b_hh, const at::Tensor& hh_gain,
                                       const at::Tensor& hh_bias, const at::Tensor* cell_gain,
                                       const at::Tensor* cell_bias, const at::Tensor& h0, const at::Tensor* c0,
                                       const c10::optional<at::Tensor>* w_hr, double eps) {
  const int64_t H = check_recurrence_inputs(op, G, gates_x, w_hh, b_hh, h0);
  const int64_t P = w_hh.size(1);
  if (w_hr && present(*w_hr)) {
    check_matrix(op, "w_hr", **w_hr, gates_x, P, H);
  } else {
    TORCH_CHECK(P == H, op, ": without w_hr, w_hh must be [", G, " * hidden, hidden] = [", G * H, ", ", H,
                "], got ", w_hh.sizes());
  }
  check_vector(op, "hh_gain", hh_gain, gates_x, G * H);
  check_vector(op, "hh_bias", hh_bias, gates_x, G * H);
  if (cell_gain) check_vector(op, "cell_gain", *cell_gain, gates_x, H);
  if (cell_bias) check_vector(op, "cell_bias", *cell_bias, gates_x, H);
  if (c0) check_matrix(op, "c0", *c0, gates_x, h0.size(0), H);
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  return H;
}

// The checks of a LayerNorm recurrence backward; cell_* / c0 / grad_c_n / w_hr as above. Returns H.
inline int64_t check_layer_norm_backward_inputs(const char* op, int64_t G, const at::Tensor& output,
                                                const at::Tensor& w_hh, const at::Tensor& hh_gain,
                                                const at::Tensor* cell_gain, const at::Tensor* cell_bias,
                                                const at::Tensor& h0, const at::Tensor* c0,
                                                const c10::optional<at::Tensor>& grad_output,
                                                const c10::optional<at::Tensor>& grad_h_n,
                                                const c10::optional<at::Tensor>* grad_c_n, const at::Tensor& workspace,
                                                const c10::optional<at::Tensor>* w_hr) {
  TORCH_CHECK(output.dim() == 2, op, ": output must be 2-D, got ", output.dim(), "-D");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % G == 0 && w_hh.size(0) > 0, op, ": w_hh must be [", G,
              " * hidden, width of h], got ", w_hh.sizes());
  const int64_t H = w_hh.size(0) / G, P = output.size(1);
  check_matrix(op, "w_hh", w_hh, output, G * H, P);
  if (w_hr && present(*w_hr)) {
    check_matrix(op, "w_hr", **w_hr, output, P, H);
  } else {
    TORCH_CHECK(P == H, op, ": without w_hr, output must have ", H, " columns, got ", P);
  }
  check_vector(op, "hh_gain", hh_gain, output, G * H);
  if (cell_gain) check_vector(op, "cell_gain", *cell_gain, output, H);
  if (cell_bias) check_vector(op, "cell_bias", *cell_bias, output, H);
  check_matrix(op, "h0", h0, output, -1, P);
  if (c0) check_matrix(op, "c0", *c0, output, h0.size(0), H);
  check_optional_grad(op, "grad_output", grad_output, output);
  check_optional_grad(op, "grad_h_n", grad_h_n, h0);
  if (grad_c_n && c0) check_optional_grad(op, "grad_c_n", *grad_c_n, *c0);
  check_workspace(op, workspace, output, 1,
                  G == 4 ? layer_norm_lstm_workspace_width(H) : layer_norm_gru_workspace_width(H));
  return H;
}

}  // namespace rnnfused
