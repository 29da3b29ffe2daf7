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
};

// The best set for this processor (AVX2 + FMA when present), chosen once.
template <typename T>
const PointwiseKernels<T>& pointwise_kernels();

// Which instruction set the kernels use: "avx2" or "default".
const char* pointwise_isa();

}  // namespace rnnfused::cpu
