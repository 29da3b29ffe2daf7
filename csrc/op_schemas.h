// The schemas of rnnfused's ops (documented in csrc/rnnfused.cpp), defined once for every
// library that registers them: rnnfused::* (CPU and CUDA kernels) and, in the test build of the
// simulated CUDA path, rnnfused_sim::*.
#pragma once

#include <torch/library.h>

namespace rnnfused {

// recurrent_mask [B, P] (optional, every op): recurrent dropout. Row b of every step multiplies
// h_{t-1} by recurrent_mask[b] before the product with W_hh (the carried state and the outputs
// stay unmasked).
// zoneout [N, P] or a scalar, cell_zoneout [N, H] or a scalar (optional; LSTM and GRU): keep
// weights k of h (of the LSTM's c): s_t = k s_{t-1} + (1 - k) s~_t per row and unit, s~_t the
// cell's new value (Bernoulli(p) draws in training, p in eval mode). The LSTM workspace's c
// column then holds c~_t, the candidate.
// A backward op takes the regularization tensors its forward took.
inline void define_recurrence_ops(torch::Library& m) {
  m.def(
      "lstm_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor h0, Tensor c0, "
      "Tensor? batch_sizes, bool reverse, bool training, Tensor? recurrent_mask=None, Tensor? zoneout=None, "
      "Tensor? cell_zoneout=None) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def(
      "lstm_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor w_hh, Tensor? w_hr, "
      "Tensor h0, Tensor c0, Tensor output, Tensor workspace, Tensor? batch_sizes, bool reverse, "
      "Tensor? recurrent_mask=None, Tensor? zoneout=None, Tensor? cell_zoneout=None) -> "
      "(Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_w_hr, Tensor grad_h0, Tensor grad_c0)");
  m.def(
      "gru_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? batch_sizes, bool reverse, "
      "bool training, Tensor? recurrent_mask=None, Tensor? zoneout=None) -> (Tensor output, Tensor h_n, "
      "Tensor workspace)");
  m.def(
      "gru_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor w_hh, Tensor h0, Tensor output, "
      "Tensor workspace, Tensor? batch_sizes, bool reverse, Tensor? recurrent_mask=None, Tensor? zoneout=None) -> "
      "(Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");
  // The Elman RNN needs no workspace: its backward reads the output itself (tanh' = 1 - h^2,
  // relu' = [h > 0]). With zoneout the output is not the activation: the backward then takes the
  // forward's gates_x and b_hh and recomputes the candidates h~ = act(pre) step by step.
  m.def(
      "rnn_tanh_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? batch_sizes, bool reverse, "
      "Tensor? recurrent_mask=None, Tensor? zoneout=None) -> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_tanh_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor w_hh, Tensor h0, Tensor output, "
      "Tensor? batch_sizes, bool reverse, Tensor? recurrent_mask=None, Tensor? zoneout=None, Tensor? gates_x=None, "
      "Tensor? b_hh=None) -> (Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");
  m.def(
      "rnn_relu_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? batch_sizes, bool reverse, "
      "Tensor? recurrent_mask=None, Tensor? zoneout=None) -> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_relu_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor w_hh, Tensor h0, Tensor output, "
      "Tensor? batch_sizes, bool reverse, Tensor? recurrent_mask=None, Tensor? zoneout=None, Tensor? gates_x=None, "
      "Tensor? b_hh=None) -> (Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_h0)");
}

// One layer and direction of inference from the input itself (CPU only; no autograd: the Python
// layers call it only where autograd records nothing). cell: "lstm", "gru", "rnn_tanh" or
// "rnn_relu".
//   input [N, I]; w_ih [G*H, I]; b_ih [G*H] (optional); w_hh [G*H, H]; b_hh [G*H] (optional);
//   h0 [B, H]; c0 [B, H] (LSTM only); batch_sizes, reverse as above
//   -> output [N, H], h_n [B, H], c_n [B, H] (LSTM; [0] otherwise)
// The same as the recurrence op of the cell on gates_x = x W_ih^T + b_ih, except that where the fused
// engine runs (engine.h), it computes the projection itself a few steps ahead, each thread for its
// own units, so that the [N, G*H] projection never goes through memory; elsewhere it is one GEMM
// first. The sums of the projection then run in another order than a GEMM's: results agree with
// the recurrence op to rounding, not bit for bit.
inline void define_inference_ops(torch::Library& m) {
  m.def(
      "layer_inference(str cell, Tensor input, Tensor w_ih, Tensor? b_ih, Tensor w_hh, Tensor? b_hh, Tensor h0, "
      "Tensor? c0, Tensor? batch_sizes, bool reverse) -> (Tensor output, Tensor h_n, Tensor c_n)");
}

// LayerNorm LSTM and GRU (Ba et al. 2016), one layer and direction. gates_x is the normalized input
// projection (LN(x W_ih^T) gain_ih + bias_ih + b_ih, computed by the caller). Every step normalizes
// the recurrent projection over all gates of a row, hh = LN(h_{t-1} W_hh^T) hh_gain + hh_bias + b_hh
// (hh_gain, hh_bias: [G*H]), and the LSTM also its cell state before the output tanh:
// h~ = o tanh(LN(c~) cell_gain + cell_bias) (cell_gain, cell_bias: [H]); eps as torch.nn.LayerNorm's.
// The LSTM's optional w_hr [P, H] projects h~ (then w_hh is [4H, P], h0 [B, P]; the backward returns
// grad_w_hr, [0] without it). recurrent_mask, zoneout and cell_zoneout as above (zoneout after the
// projection). The workspace is [N, 10 H + 2] (LSTM) / [N, 7 H + 1] (GRU), see csrc/recurrence.h.
inline void define_layer_norm_ops(torch::Library& m) {
  m.def(
      "layer_norm_lstm_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor hh_gain, Tensor hh_bias, "
      "Tensor cell_gain, Tensor cell_bias, Tensor h0, Tensor c0, Tensor? batch_sizes, bool reverse, bool training, "
      "float eps, Tensor? recurrent_mask=None, Tensor? zoneout=None, Tensor? cell_zoneout=None, Tensor? w_hr=None) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def(
      "layer_norm_lstm_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor w_hh, "
      "Tensor hh_gain, Tensor cell_gain, Tensor cell_bias, Tensor h0, Tensor c0, Tensor output, Tensor workspace, "
      "Tensor? batch_sizes, bool reverse, Tensor? recurrent_mask=None, Tensor? zoneout=None, "
      "Tensor? cell_zoneout=None, Tensor? w_hr=None) -> (Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, "
      "Tensor grad_hh_gain, Tensor grad_hh_bias, Tensor grad_cell_gain, Tensor grad_cell_bias, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_w_hr)");
  m.def(
      "layer_norm_gru_recurrence(Tensor gates_x, Tensor w_hh, Tensor? b_hh, Tensor hh_gain, Tensor hh_bias, "
      "Tensor h0, Tensor? batch_sizes, bool reverse, bool training, float eps, Tensor? recurrent_mask=None, "
      "Tensor? zoneout=None) -> (Tensor output, Tensor h_n, Tensor workspace)");
  m.def(
      "layer_norm_gru_recurrence_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor w_hh, Tensor hh_gain, "
      "Tensor h0, Tensor output, Tensor workspace, Tensor? batch_sizes, bool reverse, Tensor? recurrent_mask=None, "
      "Tensor? zoneout=None) -> (Tensor grad_gates_x, Tensor grad_w_hh, Tensor grad_b_hh, Tensor grad_hh_gain, "
      "Tensor grad_hh_bias, Tensor grad_h0)");
}

}  // namespace rnnfused
