// The schemas of rnnfused's ops (documented in csrc/rnnfused.cpp), defined once for every
// library that registers them: rnnfused::* (CPU and CUDA kernels) and, in the test build of the
// simulated CUDA path, rnnfused_sim::*.
#pragma once

#include <torch/library.h>

namespace rnnfused {

inline void define_recurrence_ops(torch::Library& m) {
  m.def(
      "lstm_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor h0, Tensor c0, "
      "Tensor? batch_sizes, bool reverse, bool training) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def(
      "lstm_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor w_hh, Tensor? w_hr, "
      "Tensor h0, Tensor c0, Tensor output, Tensor workspace, Tensor? batch_sizes, bool reverse) -> "
      "(Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_w_hr, Tensor grad_h0, Tensor grad_c0)");
  m.def(
      "gru_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? batch_sizes, bool reverse, "
      "bool training) -> (Tensor output, Tensor h_n, Tensor workspace)");
  m.def(
      "gru_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor w_hh, Tensor h0, Tensor output, "
      "Tensor workspace, Tensor? batch_sizes, bool reverse) -> "
      "(Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");
  // The Elman RNN needs no workspace: its backward reads the output itself (tanh' = 1 - h^2,
  // relu' = [h > 0]).
  m.def(
      "rnn_tanh_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_tanh_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor w_hh, Tensor h0, Tensor output, "
      "Tensor? batch_sizes, bool reverse) -> (Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");
  m.def(
      "rnn_relu_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_relu_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor w_hh, Tensor h0, Tensor output, "
      "Tensor? batch_sizes, bool reverse) -> (Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");
}

}  // namespace rnnfused
