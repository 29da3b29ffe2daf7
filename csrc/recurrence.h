// Host-side pieces shared by the CPU and CUDA implementations of the recurrence ops: the
// tensors each op returns, allocated the same way on every device so that the fake kernels
// in rnnfused/_ops.py describe all of them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

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

// Workspace columns per row: what the backward pass reads back.
constexpr int64_t kLstmWorkspaceGates = 5;  // i, f, g, o, c
constexpr int64_t kGruWorkspaceGates = 4;   // r, z, n, W_hn h + b_hn

// The workspace of a forward call: [N, gates * H] in the compute dtype when the call records
// for backward, else an empty [0].
inline at::Tensor empty_workspace(const at::Tensor& gates_x, bool training, int64_t gates, int64_t hidden) {
  const auto options = gates_x.options().dtype(compute_dtype(gates_x.scalar_type()));
  return training ? at::empty({gates_x.size(0), gates * hidden}, options) : at::empty({0}, options);
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

}  // namespace rnnfused
