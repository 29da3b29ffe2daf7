// Gate math of the LSTM, GRU and Elman RNN cells, forward and backward, for one element.
//
// Every function is a template on the value type V so that one definition serves the
// CPU kernels (V = at::vec::Vectorized<float/double>, one SIMD register per call) and the
// CUDA kernels (V = float/double, one thread per element). The type supplies its
// transcendental functions through the CellOps<V> trait: scalar specializations live here,
// the Vectorized one in csrc/cpu/pointwise_impl.h.
//
// Legend shared by all rnnfused sources:
//   N  packed rows (sum of the batch sizes over all steps)
//   T  steps        B  batch (rows of the first step)
//   I  input size   H  hidden size   P  width of h (proj_size, or H without projection)
//   G  gates per cell: 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n), 1 (RNN)
// Gate order is torch.nn's.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace rnnfused {

// Transcendentals and the ReLU pieces for a value type. Specialized per type.
template <typename V>
struct CellOps;

// 1 / (1 + e^-x): saturates to exactly 0 or 1 without NaN at either end.
template <typename V>
C10_HOST_DEVICE inline V sigmoid_by_division(V x) {
  return V(1) / (V(1) + CellOps<V>::exp(V(0) - x));
}

template <>
struct CellOps<float> {
  static C10_HOST_DEVICE inline float exp(float x) { return ::expf(x); }
  static C10_HOST_DEVICE inline float tanh(float x) { return ::tanhf(x); }
  static C10_HOST_DEVICE inline float sigmoid(float x) { return sigmoid_by_division(x); }
  static C10_HOST_DEVICE inline float sqrt(float x) { return ::sqrtf(x); }
  // x < 0 is false for NaN, so NaN propagates as in torch.relu.
  static C10_HOST_DEVICE inline float relu(float x) { return x < 0.f ? 0.f : x; }
  // `grad` where `out` > 0, else 0 (the derivative of ReLU written through its output).
  static C10_HOST_DEVICE inline float where_positive(float out, float grad) {
    return out > 0.f ? grad : 0.f;
  }
};

template <>
struct CellOps<double> {
  static C10_HOST_DEVICE inline double exp(double x) { return ::exp(x); }
  static C10_HOST_DEVICE inline double tanh(double x) { return ::tanh(x); }
  static C10_HOST_DEVICE inline double sigmoid(double x) { return sigmoid_by_division(x); }
  static C10_HOST_DEVICE inline double sqrt(double x) { return ::sqrt(x); }
  static C10_HOST_DEVICE inline double relu(double x) { return x < 0. ? 0. : x; }
  static C10_HOST_DEVICE inline double where_positive(double out, double grad) {
    return out > 0. ? grad : 0.;
  }
};

// 1 / (1 + e^-x), each CellOps' sigmoid (the scalar types' and, on the CPU, the double vectors'; the
// float vectors compute the same formula without a division, csrc/cpu/pointwise_impl.h).
template <typename V>
C10_HOST_DEVICE inline V sigmoid(V x) {
  return CellOps<V>::sigmoid(x);
}

template <typename V>
C10_HOST_DEVICE inline V tanh_act(V x) {
  return CellOps<V>::tanh(x);
}

// ---------------------------------------------------------------------------------------------
// LSTM.  Pre-activations are x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh, per gate.
//   i = s(pre_i)  f = s(pre_f)  g = tanh(pre_g)  o = s(pre_o)
//   c = f c_prev + i g          r = o tanh(c)    h = r (or W_hr r with a projection)
// ---------------------------------------------------------------------------------------------
template <typename V>
struct LstmActivations {
  V i, f, g, o, c, r;
};

// The gates and the new cell state c (r left unset): shared with the LayerNorm LSTM, whose output
// reads a normalized c.
template <typename V>
C10_HOST_DEVICE inline LstmActivations<V> lstm_gates(V pre_i, V pre_f, V pre_g, V pre_o, V c_prev) {
  LstmActivations<V> a;
  a.i = sigmoid(pre_i);
  a.f = sigmoid(pre_f);
  a.g = tanh_act(pre_g);
  a.o = sigmoid(pre_o);
  a.c = a.f * c_prev + a.i * a.g;
  return a;
}

template <typename V>
C10_HOST_DEVICE inline LstmActivations<V> lstm_forward(V pre_i, V pre_f, V pre_g, V pre_o, V c_prev) {
  LstmActivations<V> a = lstm_gates(pre_i, pre_f, pre_g, pre_o, c_prev);
  a.r = a.o * tanh_act(a.c);
  return a;
}

template <typename V>
struct LstmGradients {
  V pre_i, pre_f, pre_g, pre_o;  // gradients of the four pre-activations
  V c_prev;                      // gradient flowing into c_{t-1}
  V r;                           // o * tanh(c), recomputed (needed for dW_hr)
};

// dr: gradient of r = o tanh(c) (equal to dh without projection); dc: gradient of c_t arriving
// from step t+1 (or from c_n).
// The input, forget and cell gates' pre-activation gradients and dc_{t-1} from dc_total, the whole
// gradient of c_t (shared with the LayerNorm LSTM); pre_o, r are left unset.
template <typename V>
C10_HOST_DEVICE inline LstmGradients<V> lstm_cell_backward(V i, V f, V g, V c_prev, V dc_total) {
  LstmGradients<V> d;
  const V one(1);
  d.pre_i = dc_total * g * i * (one - i);
  d.pre_f = dc_total * c_prev * f * (one - f);
  d.pre_g = dc_total * i * (one - g * g);
  d.c_prev = dc_total * f;
  return d;
}

template <typename V>
C10_HOST_DEVICE inline LstmGradients<V> lstm_backward(V i, V f, V g, V o, V c, V c_prev, V dr, V dc) {
  const V one(1);
  const V tc = tanh_act(c);
  const V dc_total = dc + dr * o * (one - tc * tc);
  LstmGradients<V> d = lstm_cell_backward(i, f, g, c_prev, dc_total);
  d.pre_o = dr * tc * o * (one - o);
  d.r = o * tc;
  return d;
}

// ---------------------------------------------------------------------------------------------
// GRU.  x_* = x W_ih^T + b_ih per gate; hh_* = h_{t-1} W_hh^T + b_hh per gate.
//   r = s(x_r + hh_r)   z = s(x_z + hh_z)   n = tanh(x_n + r hh_n)
//   h = n + z (h_prev - n)                   (= (1 - z) n + z h_prev, in torch.nn's form)
// b_hn stays inside r * (...), which is why b_hh is an argument of the recurrence.
// ---------------------------------------------------------------------------------------------
template <typename V>
struct GruActivations {
  V r, z, n, h;
};

template <typename V>
C10_HOST_DEVICE inline GruActivations<V> gru_forward(V x_r, V x_z, V x_n, V hh_r, V hh_z, V hh_n, V h_prev) {
  GruActivations<V> a;
  a.r = sigmoid(x_r + hh_r);
  a.z = sigmoid(x_z + hh_z);
  a.n = tanh_act(x_n + a.r * hh_n);
  a.h = a.n + a.z * (h_prev - a.n);
  return a;
}

template <typename V>
struct GruGradients {
  V x_r, x_z, x_n;  // gradients of the input-side gate sums (= of gates_x)
  V hh_n;           // gradient of hh_n; those of hh_r and hh_z equal x_r and x_z
  V h_prev;         // the direct part of dh_{t-1}: dh * z (the W_hh part is a GEMM)
};

template <typename V>
C10_HOST_DEVICE inline GruGradients<V> gru_backward(V r, V z, V n, V hh_n, V h_prev, V dh) {
  GruGradients<V> d;
  const V one(1);
  const V dn = dh * (one - z) * (one - n * n);
  d.x_n = dn;
  d.hh_n = dn * r;
  d.x_r = dn * hh_n * r * (one - r);
  d.x_z = dh * (h_prev - n) * z * (one - z);
  d.h_prev = dh * z;
  return d;
}

// ---------------------------------------------------------------------------------------------
// Elman RNN.  h = act(x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act = tanh or relu.
// The backward needs only h itself: tanh' = 1 - h^2, relu' = [h > 0].
// ---------------------------------------------------------------------------------------------
enum class Activation { Tanh, Relu };

template <Activation act, typename V>
C10_HOST_DEVICE inline V rnn_forward(V pre) {
  if constexpr (act == Activation::Tanh) {
    return tanh_act(pre);
  } else {
    return CellOps<V>::relu(pre);
  }
}

template <Activation act, typename V>
C10_HOST_DEVICE inline V rnn_backward(V h, V dh) {
  if constexpr (act == Activation::Tanh) {
    return dh * (V(1) - h * h);
  } else {
    return CellOps<V>::where_positive(h, dh);
  }
}

// ---------------------------------------------------------------------------------------------
// Zoneout.  A state keeps its previous value with weight k: s_t = k s_{t-1} + (1 - k) s~_t, where
// s~_t is what the cell computes (k is a Bernoulli(p) draw in training, p in eval mode). Its
// gradient g splits into k g for s_{t-1} and (1 - k) g for s~_t.
// ---------------------------------------------------------------------------------------------
template <typename V>
C10_HOST_DEVICE inline V zoneout(V keep, V previous, V candidate) {
  return keep * previous + (V(1) - keep) * candidate;
}

// ---------------------------------------------------------------------------------------------
// Layer normalization (LayerNormLSTM / LayerNormGRU, Ba et al. 2016) of one row of width W:
//   mean = sum(x) / W   var = sum((x - mean)^2) / W   rstd = 1 / sqrt(var + eps)
//   xhat = (x - mean) rstd   y = gain xhat + bias
// The row sums are per device (a loop on the CPU, a block reduction on CUDA); the per-element
// pieces are these. With dxhat = dy gain, the input's gradient is
//   dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
// ---------------------------------------------------------------------------------------------
template <typename V>
C10_HOST_DEVICE inline V layer_norm_input_grad(V rstd, V dxhat, V xhat, V mean_dxhat, V mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

// LayerNorm LSTM: the gates and c~ = f c_prev + i g are lstm_forward's; the output reads the
// normalized cell state, h~ = o tanh(c^), c^ = gain_c LN(c~) + bias_c. Its backward:
//   pre_o = dh tanh(c^) o (1 - o)     dc^ = dh o (1 - tanh(c^)^2)
// and, with dc~ (the cell state's total gradient, LN's part included), the other three gates
// and dc_prev are lstm_backward's with dr = 0.
template <typename V>
struct LstmOutputGradients {
  V pre_o, c_hat;
};

template <typename V>
C10_HOST_DEVICE inline LstmOutputGradients<V> layer_norm_lstm_output_backward(V o, V tanh_c_hat, V dh) {
  LstmOutputGradients<V> d;
  const V one(1);
  d.pre_o = dh * tanh_c_hat * o * (one - o);
  d.c_hat = dh * o * (one - tanh_c_hat * tanh_c_hat);
  return d;
}

}  // namespace rnnfused
