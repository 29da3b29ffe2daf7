// The fused per-step passes of the CPU recurrence: everything of one time step except the
// GEMM with W_hh (and W_hr), in one vectorized sweep over the active rows.
//
// Each pass takes a struct of raw pointers to contiguous row-major buffers; shapes use the
// legend of csrc/cell_math.h, with `rows` the active rows of the step (batch_sizes[t]).
// T is float or double: half and bfloat16 calls compute in float (see recurrence_cpu.cpp).
#pragma once

#include <cstdint>

namespace rnnfused::cpu {

template <typename T>
struct LstmForwardStep {
  int64_t rows = 0, hidden = 0;
  const T* gates_x = nullptr;  // [rows, 4H]  x W_ih^T + b_ih
  const T* gates_h = nullptr;  // [rows, 4H]  h_{t-1} W_hh^T
  const T* bias = nullptr;     // [4H]        b_hh (zeros for a layer without bias)
  T* c_state = nullptr;        // [rows, H]   in: c_{t-1}; out: c_t
  T* r_out = nullptr;          // [rows, H]   o * tanh(c_t): h_t, or the input of the projection
  T* workspace = nullptr;      // [rows, 5H]  i, f, g, o, c_t for backward; nullptr in inference
};

template <typename T>
struct LstmBackwardStep {
  int64_t rows = 0, hidden = 0;
  const T* workspace = nullptr;      // [rows, 5H]  this step's i, f, g, o, c
  const T* prev_workspace = nullptr; // [rows_from_prev, 5H]  previous step's rows (their c is c_{t-1})
  int64_t rows_from_prev = 0;        // rows whose c_{t-1} is in prev_workspace
  const T* c0 = nullptr;             // [rows, H]   c_{t-1} of the rows that start at this step
  const T* c_prev_rows = nullptr;    // [rows, H]   c_{t-1} of every row when not null (cell zoneout: the
                                     //             zoned states), instead of prev_workspace / c0
  const T* grad_r = nullptr;         // [rows, H]   gradient of r = o tanh(c)
  const T* grad_r_extra = nullptr;   // [rows, H]   added to grad_r when not null (grad of output)
  T* dc_state = nullptr;             // [rows, H]   in: dL/dc_t; out: dL/dc_{t-1}
  T* grad_gates = nullptr;           // [rows, 4H]  dL/d pre-activations
  T* r_out = nullptr;                // [rows, H]   o tanh(c) for dW_hr; nullptr without projection
};

template <typename T>
struct GruForwardStep {
  int64_t rows = 0, hidden = 0;
  const T* gates_x = nullptr;  // [rows, 3H]
  const T* gates_h = nullptr;  // [rows, 3H]  h_{t-1} W_hh^T
  const T* bias = nullptr;     // [3H]        b_hh (zeros for a layer without bias)
  T* h_state = nullptr;        // [rows, H]   in: h_{t-1}; out: h_t
  T* workspace = nullptr;      // [rows, 4H]  r, z, n, hh_n (= W_hn h + b_hn); nullptr in inference
};

template <typename T>
struct GruBackwardStep {
  int64_t rows = 0, hidden = 0;
  const T* workspace = nullptr;     // [rows, 4H]
  const T* h_prev = nullptr;        // [rows, H]
  const T* grad_output = nullptr;   // [rows, H]  may be null (no gradient for the output)
  T* dh_state = nullptr;            // [rows, H]  in: dL/dh_t from later steps; out: dh_t * z
  T* grad_gates_x = nullptr;        // [rows, 3H]
  T* grad_gates_h = nullptr;        // [rows, 3H] dL/d(h_{t-1} W_hh^T + b_hh)
};

template <typename T>
struct RnnForwardStep {
  int64_t rows = 0, hidden = 0;
  const T* gates_x = nullptr;  // [rows, H]
  const T* gates_h = nullptr;  // [rows, H]
  const T* bias = nullptr;     // [H]
  T* h_state = nullptr;        // [rows, H] out: h_t
};

template <typename T>
struct RnnBackwardStep {
  int64_t rows = 0, hidden = 0;
  const T* h = nullptr;            // [rows, H]  h_t (the output rows of the step)
  const T* grad_output = nullptr;  // [rows, H]  may be null
  const T* dh_state = nullptr;     // [rows, H]  dL/dh_t from later steps
  T* grad_gates = nullptr;         // [rows, H]
};

// LayerNorm LSTM / GRU (layer_norm_cpu.cpp): one row of one step per call (a row's normalization
// is a reduction over all its gates). Workspace rows as in csrc/recurrence.h. Keep weights of
// zoneout: null when off, else [H] with keep_stride 1, or one scalar with keep_stride 0.
template <typename T>
struct LayerNormRowForward {
  int64_t hidden = 0;
  T eps = 0;
  const T* gates_x = nullptr;    // [G*H]  LN(x W_ih^T) ih_gain + ih_bias + b_ih
  const T* product = nullptr;    // [G*H]  (m h_{t-1}) W_hh^T
  const T* gain = nullptr;       // [G*H]  hh_gain
  const T* shift = nullptr;      // [G*H]  hh_bias + b_hh
  const T* cell_gain = nullptr;  // [H]    LSTM
  const T* cell_bias = nullptr;  // [H]    LSTM
  const T* keep_h = nullptr;
  const T* keep_c = nullptr;     // LSTM
  int64_t keep_h_stride = 0, keep_c_stride = 0;
  T* h_state = nullptr;          // [H]    in: h_{t-1}; out: h_t (with a projection: r = o tanh(c^), keep_h null)
  T* c_state = nullptr;          // [H]    LSTM; in: c_{t-1}; out: c_t
  T* workspace = nullptr;        // [10H + 2] (LSTM) / [7H + 1] (GRU)
};

template <typename T>
struct LayerNormRowBackward {
  int64_t hidden = 0;
  const T* workspace = nullptr;    // this row's
  const T* h_prev = nullptr;       // [H]    GRU: h_{t-1}
  const T* c_prev = nullptr;       // [H]    LSTM: c_{t-1}
  const T* gain = nullptr;         // [G*H]  hh_gain
  const T* cell_gain = nullptr;    // [H]    LSTM
  const T* cell_bias = nullptr;    // [H]    LSTM
  const T* keep_h = nullptr;
  const T* keep_c = nullptr;
  int64_t keep_h_stride = 0, keep_c_stride = 0;
  const T* grad_output = nullptr;  // [H]    may be null
  T* dh_state = nullptr;           // [H]    in: dL/dh_t from later steps; out: the direct part of dL/dh_{t-1}
  T* dc_state = nullptr;           // [H]    LSTM; in: dL/dc_t; out: dL/dc_{t-1}
  T* grad_gates_x = nullptr;       // [G*H]  dL/dgates_x
  T* grad_hh = nullptr;            // [G*H]  dL/dhh, hh = gain xhat + shift (for the gains and biases)
  T* grad_c_hat = nullptr;         // [H]    LSTM: dL/d(LN(c~) cell_gain + cell_bias)
  T* grad_product = nullptr;       // [G*H]  dL/d((m h_{t-1}) W_hh^T)
  T* r_out = nullptr;              // [H]    LSTM with a projection: o tanh(c^), recomputed (for dW_hr); else null
  T* scratch = nullptr;            // [2H + G*H]
};

template <typename T>
struct PointwiseKernels {
  const char* isa;
  void (*lstm_forward)(const LstmForwardStep<T>&);
  void (*lstm_backward)(const LstmBackwardStep<T>&);
  void (*gru_forward)(const GruForwardStep<T>&);
  void (*gru_backward)(const GruBackwardStep<T>&);
  void (*rnn_tanh_forward)(const RnnForwardStep<T>&);
  void (*rnn_relu_forward)(const RnnForwardStep<T>&);
  void (*rnn_tanh_backward)(const RnnBackwardStep<T>&);
  void (*rnn_relu_backward)(const RnnBackwardStep<T>&);
  void (*layer_norm_lstm_forward)(const LayerNormRowForward<T>&);
  void (*layer_norm_lstm_backward)(const LayerNormRowBackward<T>&);
  void (*layer_norm_gru_forward)(const LayerNormRowForward<T>&);
  void (*layer_norm_gru_backward)(const LayerNormRowBackward<T>&);
};

// The best set for this processor (AVX2 + FMA when present), chosen once.
template <typename T>
const PointwiseKernels<T>& pointwise_kernels();

// Which instruction set the kernels use: "avx2" or "default".
const char* pointwise_isa();

}  // namespace rnnfused::cpu
