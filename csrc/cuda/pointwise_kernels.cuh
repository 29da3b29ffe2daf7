// The fused per-step kernels of the CUDA recurrence: everything of one time step except the
// GEMMs with W_hh (and W_hr), one thread per element of the step's [rows, H] block, in a
// grid-stride loop. The gate math is csrc/cell_math.h with V = float / double, so the CPU and
// CUDA paths compute the same formulas in the same order.
//
// Every kernel takes one argument struct by value (kernel parameters live in constant memory)
// of device pointers (dptr, device.cuh) to contiguous row-major buffers in the compute dtype T
// (float or double).
// Shapes use the legend of csrc/cell_math.h; `rows` is the number of active rows of the step
// (batch_sizes[t]) and every per-row pointer already points at the step's first row. The
// structs mirror csrc/cpu/pointwise.h, plus what the CPU loop does in separate passes and is
// fused here (the copy of h_t into the output rows, its rounding to bfloat16 / float16);
// csrc/cuda/recurrence_cuda.cu fills them.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../cell_math.h"
#include "device.cuh"

namespace rnnfused::cuda {

// 256 threads: a multiple of the warp size that keeps enough blocks per SM for latency hiding
// in these memory-bound kernels.
constexpr int kThreads = 256;

// The dtype the caller sees for h. bfloat16 / float16 calls compute in float but round h_t to
// that dtype every step (as the CPU path does), so that the state carried to the next step is
// exactly the output row the caller gets and backward differentiates what forward computed.
enum class Storage : int { Same, BFloat16, Half };

template <typename T>
__device__ __forceinline__ T round_to_storage(T x, Storage storage) {
  if constexpr (std::is_same_v<T, float>) {
    // c10's conversions round to nearest even on the device as on the host, so the rounded
    // values match the CPU path bit for bit.
    if (storage == Storage::BFloat16) return static_cast<float>(c10::BFloat16(x));
    if (storage == Storage::Half) return static_cast<float>(c10::Half(x));
  }
  return x;
}

// A second copy of h_t in the storage dtype itself (bfloat16 / float16 calls; both pointers null
// otherwise): the operand of the next step's GEMM, which then runs on 16-bit inputs with float32
// accumulation (tensor cores). The value is already rounded to that dtype, so the copy is exact.
struct LowpCopy {
  dptr<c10::BFloat16> bf16 = nullptr;  // [rows, width]
  dptr<c10::Half> f16 = nullptr;       // [rows, width]
};

template <typename T>
__device__ __forceinline__ void store_lowp(const LowpCopy& copy, int64_t idx, T value) {
  if (copy.bf16) {
    copy.bf16[idx] = c10::BFloat16(static_cast<float>(value));
  } else if (copy.f16) {
    copy.f16[idx] = c10::Half(static_cast<float>(value));
  }
}

// Grid-stride loop over [0, n): a grid capped at a few blocks per SM covers any size, and the
// index is 64-bit because rows * 4H can pass 2^31 for long packed batches.
#define RNNFUSED_CUDA_KERNEL_LOOP(idx, n)                                                       \
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < (n); \
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)

// ---------------------------------------------------------------------------------------------
// LSTM
// ---------------------------------------------------------------------------------------------

template <typename T>
struct LstmForwardArgs {
  int64_t rows = 0, hidden = 0;
  dptr<const T> gates_x = nullptr;  // [rows, 4H]  x W_ih^T + b_ih
  dptr<const T> gates_h = nullptr;  // [rows, 4H]  h_{t-1} W_hh^T
  dptr<const T> bias = nullptr;     // [4H]        b_hh (zeros for a layer without bias)
  dptr<T> c_state = nullptr;        // [rows, H]   in: c_{t-1}; out: c_t
  dptr<T> r_out = nullptr;          // [rows, H]   o * tanh(c_t): h_t (the state), or the projection's input
  dptr<T> h_copy = nullptr;         // [rows, H]   the step's output rows (a second copy of h_t); nullptr
                               //             with a projection, where h_t is W_hr r, not r
  dptr<T> workspace = nullptr;      // [rows, 5H]  i, f, g, o, c_t for backward; nullptr in inference
  Storage storage = Storage::Same;  // rounding of r_out / h_copy (Same with a projection: r is
                                    // not h, and the CPU path keeps it unrounded)
  LowpCopy h_lowp;                  // [rows, H]   h_t in the storage dtype (no projection only)
  // Zoneout (standard path only): keep weights of h (no projection: r_out holds h_{t-1} on entry)
  // and of c, [rows, H] each or one value (stride 0); nullptr: none. The workspace keeps c~_t.
  dptr<const T> keep_h = nullptr;
  dptr<const T> keep_c = nullptr;
  int64_t keep_h_stride = 1, keep_c_stride = 1;
};

// One element (row, j) of an LSTM step, given the recurrent sums gh_* = (h_{t-1} W_hh^T)[row, g*H + j]
// of its four gates: the body of lstm_forward_kernel and the epilogue of the persistent kernel.
template <typename T>
__device__ __forceinline__ void lstm_forward_element(const LstmForwardArgs<T>& a, int64_t row, int64_t j, T gh_i,
                                                     T gh_f, T gh_g, T gh_o) {
  const int64_t H = a.hidden;
  const int64_t idx = row * H + j;
  const dptr<const T> gx = a.gates_x + row * 4 * H + j;
  const dptr<const T> b = a.bias + j;
  // Same summation order as the CPU pass: (x + h) + b.
  const T c_prev = a.c_state[idx];
  const auto act = rnnfused::lstm_forward<T>(gx[0] + gh_i + b[0], gx[H] + gh_f + b[H], gx[2 * H] + gh_g + b[2 * H],
                                             gx[3 * H] + gh_o + b[3 * H], c_prev);
  a.c_state[idx] = a.keep_c ? rnnfused::zoneout(a.keep_c[idx * a.keep_c_stride], c_prev, act.c) : act.c;
  const T r = round_to_storage(
      a.keep_h ? rnnfused::zoneout(a.keep_h[idx * a.keep_h_stride], static_cast<T>(a.r_out[idx]), act.r) : act.r,
      a.storage);
  a.r_out[idx] = r;
  if (a.h_copy) a.h_copy[idx] = r;
  store_lowp(a.h_lowp, idx, r);
  if (a.workspace) {
    const dptr<T> ws = a.workspace + row * 5 * H + j;
    ws[0] = act.i;
    ws[H] = act.f;
    ws[2 * H] = act.g;
    ws[3 * H] = act.o;
    ws[4 * H] = act.c;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_forward_kernel(const LstmForwardArgs<T> a) {
  const int64_t H = a.hidden;
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.rows * H) {
    const int64_t row = idx / H;
    const int64_t j = idx - row * H;
    const dptr<const T> gh = a.gates_h + row * 4 * H + j;
    lstm_forward_element(a, row, j, gh[0], gh[H], gh[2 * H], gh[3 * H]);
  }
}

template <typename T>
struct LstmBackwardArgs {
  int64_t rows = 0, hidden = 0;
  dptr<const T> workspace = nullptr;       // [rows, 5H]  this step's i, f, g, o, c
  dptr<const T> prev_workspace = nullptr;  // [rows_from_prev, 5H]  the previous step's rows (their c is
                                      //   c_{t-1}); nullptr when rows_from_prev == 0
  int64_t rows_from_prev = 0;         // rows whose c_{t-1} is in prev_workspace; the others start
                                      //   at this step and read c0
  dptr<const T> c0 = nullptr;              // [B, H]      c0 (row r of the step is row r of c0)
  dptr<const T> grad_r = nullptr;          // [rows, H]   gradient of r = o tanh(c)
  dptr<const T> grad_r_extra = nullptr;    // [rows, H]   added to grad_r when not null (grad of output)
  dptr<T> dc_state = nullptr;              // [rows, H]   in: dL/dc_t; out: dL/dc_{t-1}
  dptr<T> grad_gates = nullptr;            // [rows, 4H]  dL/d pre-activations (i, f, g, o)
  dptr<T> r_out = nullptr;                 // [rows, H]   o tanh(c) for dW_hr; nullptr without projection
  // Zoneout (standard path only). keep_h (no projection): grad_r + grad_r_extra is dL/dh_t; its
  // (1 - k) part is the candidate's, and k dL/dh_t is written to dh_kept (may alias grad_r: the
  // GEMM of dL/dh_{t-1} then adds to it). keep_c: dc_state's (1 - k) part is the candidate's and
  // k dL/dc_t joins dL/dc_{t-1}; c_prev_rows [rows, H] then holds the zoned c_{t-1} of every row.
  dptr<const T> keep_h = nullptr;
  dptr<const T> keep_c = nullptr;
  int64_t keep_h_stride = 1, keep_c_stride = 1;
  dptr<T> dh_kept = nullptr;
  dptr<const T> c_prev_rows = nullptr;
};

// One element (row, j) of an LSTM backward step: the body of lstm_backward_kernel and of the
// persistent backward kernel's pointwise phase.
template <typename T>
__device__ __forceinline__ void lstm_backward_element(const LstmBackwardArgs<T>& a, int64_t row, int64_t j) {
  const int64_t H = a.hidden;
  const int64_t idx = row * H + j;
  const dptr<const T> ws = a.workspace + row * 5 * H + j;
  const T c_prev = a.c_prev_rows              ? a.c_prev_rows[idx]
                   : row < a.rows_from_prev ? a.prev_workspace[row * 5 * H + 4 * H + j]
                                            : a.c0[idx];
  T dr = a.grad_r[idx];
  if (a.grad_r_extra) dr = dr + a.grad_r_extra[idx];
  if (a.keep_h) {
    const T keep = a.keep_h[idx * a.keep_h_stride];
    a.dh_kept[idx] = keep * dr;
    dr = (T(1) - keep) * dr;
  }
  T dc = a.dc_state[idx];
  T dc_kept = T(0);
  if (a.keep_c) {
    const T keep = a.keep_c[idx * a.keep_c_stride];
    dc_kept = keep * dc;
    dc = (T(1) - keep) * dc;
  }
  const auto d = rnnfused::lstm_backward<T>(ws[0], ws[H], ws[2 * H], ws[3 * H], ws[4 * H], c_prev, dr, dc);
  const dptr<T> dg = a.grad_gates + row * 4 * H + j;
  dg[0] = d.pre_i;
  dg[H] = d.pre_f;
  dg[2 * H] = d.pre_g;
  dg[3 * H] = d.pre_o;
  a.dc_state[idx] = d.c_prev + dc_kept;
  if (a.r_out) a.r_out[idx] = d.r;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_backward_kernel(const LstmBackwardArgs<T> a) {
  const int64_t H = a.hidden;
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.rows * H) {
    const int64_t row = idx / H;
    lstm_backward_element(a, row, idx - row * H);
  }
}

// ---------------------------------------------------------------------------------------------
// GRU
// ---------------------------------------------------------------------------------------------

template <typename T>
struct GruForwardArgs {
  int64_t rows = 0, hidden = 0;
  dptr<const T> gates_x = nullptr;  // [rows, 3H]  x W_ih^T + b_ih
  dptr<const T> gates_h = nullptr;  // [rows, 3H]  h_{t-1} W_hh^T
  dptr<const T> bias = nullptr;     // [3H]        b_hh (zeros for a layer without bias)
  dptr<T> h_state = nullptr;        // [rows, H]   in: h_{t-1}; out: h_t (rounded to `storage`)
  dptr<T> h_copy = nullptr;         // [rows, H]   the step's output rows (a second copy of h_t)
  dptr<T> workspace = nullptr;      // [rows, 4H]  r, z, n, hh_n (= W_hn h + b_hn); nullptr in inference
  Storage storage = Storage::Same;
  LowpCopy h_lowp;                  // [rows, H]   h_t in the storage dtype
  dptr<const T> keep_h = nullptr;   // [rows, H] or one value (stride 0): zoneout (standard path only)
  int64_t keep_h_stride = 1;
};

// One element (row, j) of a GRU step, given the recurrent sums gh_* = (h_{t-1} W_hh^T)[row, g*H + j].
template <typename T>
__device__ __forceinline__ void gru_forward_element(const GruForwardArgs<T>& a, int64_t row, int64_t j, T gh_r,
                                                    T gh_z, T gh_n) {
  const int64_t H = a.hidden;
  const int64_t idx = row * H + j;
  const dptr<const T> gx = a.gates_x + row * 3 * H + j;
  const dptr<const T> b = a.bias + j;
  const T hh_n = gh_n + b[2 * H];
  // Each thread reads and writes only its own element of h_state: the product that read all of
  // h_{t-1} is complete before any element of the step is written.
  const T h_prev = a.h_state[idx];
  const auto act = rnnfused::gru_forward<T>(gx[0], gx[H], gx[2 * H], gh_r + b[0], gh_z + b[H], hh_n, h_prev);
  const T h = round_to_storage(
      a.keep_h ? rnnfused::zoneout(a.keep_h[idx * a.keep_h_stride], h_prev, act.h) : act.h, a.storage);
  a.h_state[idx] = h;
  a.h_copy[idx] = h;
  store_lowp(a.h_lowp, idx, h);
  if (a.workspace) {
    const dptr<T> ws = a.workspace + row * 4 * H + j;
    ws[0] = act.r;
    ws[H] = act.z;
    ws[2 * H] = act.n;
    ws[3 * H] = hh_n;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gru_forward_kernel(const GruForwardArgs<T> a) {
  const int64_t H = a.hidden;
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.rows * H) {
    const int64_t row = idx / H;
    const int64_t j = idx - row * H;
    const dptr<const T> gh = a.gates_h + row * 3 * H + j;
    gru_forward_element(a, row, j, gh[0], gh[H], gh[2 * H]);
  }
}

template <typename T>
struct GruBackwardArgs {
  int64_t rows = 0, hidden = 0;
  dptr<const T> workspace = nullptr;    // [rows, 4H]  r, z, n, hh_n of the step
  dptr<const T> h_prev = nullptr;       // [rows, H]   h_{t-1} of each row
  dptr<const T> grad_output = nullptr;  // [rows, H]   may be null (no gradient for the output)
  dptr<T> dh_state = nullptr;           // [rows, H]   in: dL/dh_t from later steps; out: dh_t * z
  dptr<T> grad_gates_x = nullptr;       // [rows, 3H]  dL/d gates_x
  dptr<T> grad_gates_h = nullptr;       // [rows, 3H]  dL/d(h_{t-1} W_hh^T + b_hh)
  // Zoneout (standard path only): the (1 - k) part of dL/dh_t is the candidate's; k dL/dh_t joins
  // the dh_t * z left in dh_state.
  dptr<const T> keep_h = nullptr;
  int64_t keep_h_stride = 1;
};

// One element (row, j) of a GRU backward step.
template <typename T>
__device__ __forceinline__ void gru_backward_element(const GruBackwardArgs<T>& a, int64_t row, int64_t j) {
  const int64_t H = a.hidden;
  const int64_t idx = row * H + j;
  const dptr<const T> ws = a.workspace + row * 4 * H + j;
  T dh = a.dh_state[idx];
  if (a.grad_output) dh = dh + a.grad_output[idx];
  T kept = T(0);
  if (a.keep_h) {
    const T keep = a.keep_h[idx * a.keep_h_stride];
    kept = keep * dh;
    dh = (T(1) - keep) * dh;
  }
  const auto d = rnnfused::gru_backward<T>(ws[0], ws[H], ws[2 * H], ws[3 * H], a.h_prev[idx], dh);
  const dptr<T> dgx = a.grad_gates_x + row * 3 * H + j;
  const dptr<T> dgh = a.grad_gates_h + row * 3 * H + j;
  dgx[0] = d.x_r;
  dgx[H] = d.x_z;
  dgx[2 * H] = d.x_n;
  dgh[0] = d.x_r;
  dgh[H] = d.x_z;
  dgh[2 * H] = d.hh_n;
  a.dh_state[idx] = d.h_prev + kept;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gru_backward_kernel(const GruBackwardArgs<T> a) {
  const int64_t H = a.hidden;
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.rows * H) {
    const int64_t row = idx / H;
    gru_backward_element(a, row, idx - row * H);
  }
}

// ---------------------------------------------------------------------------------------------
// Elman RNN (tanh / relu)
// ---------------------------------------------------------------------------------------------

template <typename T>
struct RnnForwardArgs {
  int64_t rows = 0, hidden = 0;
  dptr<const T> gates_x = nullptr;  // [rows, H]
  dptr<const T> gates_h = nullptr;  // [rows, H]  h_{t-1} W_hh^T
  dptr<const T> bias = nullptr;     // [H]        b_hh (zeros for a layer without bias)
  dptr<T> h_state = nullptr;        // [rows, H]  out: h_t (rounded to `storage`); in: h_{t-1} with zoneout
  dptr<T> h_copy = nullptr;         // [rows, H]  the step's output rows
  Storage storage = Storage::Same;
  LowpCopy h_lowp;                  // [rows, H]  h_t in the storage dtype
  dptr<const T> keep_h = nullptr;   // [rows, H] or one value (stride 0): zoneout (standard path only)
  int64_t keep_h_stride = 1;
};

// One element (row, j) of an Elman RNN step, given the recurrent sum gh = (h_{t-1} W_hh^T)[row, j].
template <typename T, Activation act>
__device__ __forceinline__ void rnn_forward_element(const RnnForwardArgs<T>& a, int64_t row, int64_t j, T gh) {
  const int64_t idx = row * a.hidden + j;
  const T candidate = rnnfused::rnn_forward<act, T>(a.gates_x[idx] + gh + a.bias[j]);
  const T h = round_to_storage(
      a.keep_h ? rnnfused::zoneout(a.keep_h[idx * a.keep_h_stride], static_cast<T>(a.h_state[idx]), candidate)
               : candidate,
      a.storage);
  a.h_state[idx] = h;
  a.h_copy[idx] = h;
  store_lowp(a.h_lowp, idx, h);
}

template <typename T, Activation act>
__global__ void __launch_bounds__(kThreads) rnn_forward_kernel(const RnnForwardArgs<T> a) {
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.rows * a.hidden) {
    const int64_t row = idx / a.hidden;
    rnn_forward_element<T, act>(a, row, idx - row * a.hidden, a.gates_h[idx]);
  }
}

template <typename T>
struct RnnBackwardArgs {
  int64_t rows = 0, hidden = 0;
  dptr<const T> h = nullptr;            // [rows, H]  h_t (the step's output rows); the candidates with zoneout
  dptr<const T> grad_output = nullptr;  // [rows, H]  may be null
  dptr<const T> dh_state = nullptr;     // [rows, H]  dL/dh_t from later steps
  dptr<T> grad_gates = nullptr;         // [rows, H]  dL/d pre-activation
  // Zoneout (standard path only): the (1 - k) part of dL/dh_t is the candidate's; k dL/dh_t is
  // written to dh_kept (aliasing dh_state: the GEMM of dL/dh_{t-1} then adds to it).
  dptr<const T> keep_h = nullptr;
  int64_t keep_h_stride = 1;
  dptr<T> dh_kept = nullptr;
};

// One element (row, j) of an Elman RNN backward step.
template <typename T, Activation act>
__device__ __forceinline__ void rnn_backward_element(const RnnBackwardArgs<T>& a, int64_t row, int64_t j) {
  const int64_t idx = row * a.hidden + j;
  T dh = a.dh_state[idx];
  if (a.grad_output) dh = dh + a.grad_output[idx];
  if (a.keep_h) {
    const T keep = a.keep_h[idx * a.keep_h_stride];
    a.dh_kept[idx] = keep * dh;
    dh = (T(1) - keep) * dh;
  }
  a.grad_gates[idx] = rnnfused::rnn_backward<act, T>(a.h[idx], dh);
}

template <typename T, Activation act>
__global__ void __launch_bounds__(kThreads) rnn_backward_kernel(const RnnBackwardArgs<T> a) {
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.rows * a.hidden) {
    const int64_t row = idx / a.hidden;
    rnn_backward_element<T, act>(a, row, idx - row * a.hidden);
  }
}

// ---------------------------------------------------------------------------------------------
// The LSTM projection: storing h_t after its GEMM
// ---------------------------------------------------------------------------------------------

// After h_t = r W_hr^T: round h_t to the storage dtype in place and copy it to the output rows.
template <typename T>
struct StoreStateArgs {
  int64_t count = 0;        // rows * P
  dptr<T> h_state = nullptr;     // [rows, P]  in: h_t; out: h_t rounded
  dptr<T> h_copy = nullptr;      // [rows, P]  the step's output rows
  Storage storage = Storage::Same;
  LowpCopy h_lowp;               // [rows, P]  h_t in the storage dtype
  // Zoneout (standard path only): h_t = zoneout(keep, h_prev, projection's output).
  dptr<const T> keep = nullptr;  // [rows, P] or one value (stride 0)
  int64_t keep_stride = 1;
  dptr<const T> h_prev = nullptr;  // [rows, P]  h_{t-1}
};

// Stores element idx of h_t (the projection's output, before rounding) in the state, the output
// rows and the 16-bit copy.
template <typename T>
__device__ __forceinline__ void store_state_element(const StoreStateArgs<T>& a, int64_t idx, T value) {
  const T h = round_to_storage(value, a.storage);
  a.h_state[idx] = h;
  a.h_copy[idx] = h;
  store_lowp(a.h_lowp, idx, h);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) store_state_kernel(const StoreStateArgs<T> a) {
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.count) {
    const T value = a.h_state[idx];
    store_state_element(a, idx, a.keep ? rnnfused::zoneout(a.keep[idx * a.keep_stride], a.h_prev[idx], value) : value);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: h_{t-1} of every row, for dW_hh = dG^T hprev
// ---------------------------------------------------------------------------------------------

// Row r of `out` is the h_{t-1} that row r's step read: a row of the forward output for rows
// that continue from the previous step, a row of h0 for rows that start at their step. One
// launch for the whole sequence, whatever the batch sizes.
template <typename T>
struct GatherRowsArgs {
  int64_t rows = 0, width = 0;           // N, P
  dptr<const int64_t> source = nullptr;  // [N]     >= 0: that row of `output`; < 0: row -1 - source of h0
  dptr<const T> output = nullptr;        // [N, P]  the forward output
  dptr<const T> h0 = nullptr;            // [B, P]
  dptr<T> out = nullptr;                 // [N, P]
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(const GatherRowsArgs<T> a) {
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.rows * a.width) {
    const int64_t row = idx / a.width;
    const int64_t col = idx - row * a.width;
    const int64_t src = a.source[row];
    a.out[idx] = src >= 0 ? a.output[src * a.width + col] : a.h0[(-1 - src) * a.width + col];
  }
}

// Recurrent dropout (recurrent_mask [B, P]): out = in * mask, or out += in * mask, over the first
// `count` elements of row-major [rows, P] buffers (row r of a step is batch row r, so the mask's
// first rows line up). `out` may be `in` itself.
template <typename T>
struct MaskRowsArgs {
  int64_t count = 0;             // rows * P
  dptr<const T> in = nullptr;    // [rows, P]
  dptr<const T> mask = nullptr;  // [rows, P]  the first rows of recurrent_mask
  dptr<T> out = nullptr;         // [rows, P]
  bool accumulate = false;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) mask_rows_kernel(const MaskRowsArgs<T> a) {
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.count) {
    const T value = a.in[idx] * a.mask[idx];
    a.out[idx] = a.accumulate ? a.out[idx] + value : value;
  }
}

// out = in, or out += in (`accumulate`), over `count` elements: the zoneout copies and sums.
template <typename T>
struct RowsArgs {
  int64_t count = 0;
  dptr<const T> in = nullptr;
  dptr<T> out = nullptr;
  bool accumulate = false;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_kernel(const RowsArgs<T> a) {
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.count) { a.out[idx] = a.accumulate ? a.out[idx] + a.in[idx] : a.in[idx]; }
}

// Zoneout (split): the gradient g of a zoned state's rows; kept = k g (for s_{t-1}) and g becomes
// (1 - k) g (the candidate's).
template <typename T>
struct ZoneoutSplitArgs {
  int64_t count = 0;
  dptr<const T> keep = nullptr;  // [rows, width] or one value (stride 0)
  int64_t keep_stride = 1;
  dptr<T> grad = nullptr;        // [rows, width]
  dptr<T> kept = nullptr;        // [rows, width]
};

template <typename T>
__global__ void __launch_bounds__(kThreads) zoneout_split_kernel(const ZoneoutSplitArgs<T> a) {
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.count) {
    const T keep = a.keep[idx * a.keep_stride];
    const T g = a.grad[idx];
    a.kept[idx] = keep * g;
    a.grad[idx] = (T(1) - keep) * g;
  }
}

// One step of the scan that recomputes the LSTM's zoned cell states for the backward with cell
// zoneout: c_{t-1} of each row (the previous step's zoned state, or c0 for rows starting here)
// and c_t = zoneout(k, c_{t-1}, c~_t), c~_t read from the workspace.
template <typename T>
struct ZonedCellsArgs {
  int64_t rows = 0, hidden = 0, rows_from_prev = 0;
  dptr<const T> prev_zoned = nullptr;  // [rows_from_prev, H]  c_{t-1} of the continuing rows
  dptr<const T> c0 = nullptr;          // [B, H]
  dptr<const T> workspace = nullptr;   // [rows, 5H]  the step's workspace rows (c~ at 4H)
  dptr<const T> keep = nullptr;        // [rows, H] or one value (stride 0)
  int64_t keep_stride = 1;
  dptr<T> c_prev = nullptr;            // [rows, H]  out: c_{t-1}
  dptr<T> zoned = nullptr;             // [rows, H]  out: c_t
};

template <typename T>
__global__ void __launch_bounds__(kThreads) zoned_cells_kernel(const ZonedCellsArgs<T> a) {
  const int64_t H = a.hidden;
  RNNFUSED_CUDA_KERNEL_LOOP(idx, a.rows * H) {
    const int64_t row = idx / H;
    const int64_t j = idx - row * H;
    const T previous = row < a.rows_from_prev ? a.prev_zoned[idx] : a.c0[idx];
    a.c_prev[idx] = previous;
    a.zoned[idx] = rnnfused::zoneout(a.keep[idx * a.keep_stride], previous, a.workspace[row * 5 * H + 4 * H + j]);
  }
}

}  // namespace rnnfused::cuda
