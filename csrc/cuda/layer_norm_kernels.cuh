// The per-step kernels of the LayerNorm LSTM and GRU on CUDA (csrc/cuda/recurrence_cuda.cu runs
// their time loops; csrc/cpu/layer_norm_cpu.cpp defines the semantics). One block of kThreads
// threads per row of the step: a row's normalization is a reduction over its G*H gate values (and
// the LSTM's H cell values), done in shared memory; every thread then works on units
// u = threadIdx.x, threadIdx.x + kThreads, ... The gate math is csrc/cell_math.h with V = float /
// double, the same formulas as the CPU kernels (the sums in another order).
//
// Workspace rows as in csrc/recurrence.h; shapes use the legend of csrc/cell_math.h. Every
// per-row pointer points at the step's first row; row = blockIdx.x.
#pragma once

#include <cstdint>

#include "../cell_math.h"
#include "device.cuh"
#include "pointwise_kernels.cuh"

namespace rnnfused::cuda {

// Sums v and w over the block (kThreads threads, a power of two); every thread gets both totals.
// shared: [2 * kThreads].
template <typename T>
__device__ __forceinline__ void block_sum2(T& v, T& w, dptr<T> shared) {
  const int tid = threadIdx.x;
  shared[tid] = v;
  shared[kThreads + tid] = w;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      const T v0 = shared[tid], v1 = shared[tid + s];
      const T w0 = shared[kThreads + tid], w1 = shared[kThreads + tid + s];
      shared[tid] = v0 + v1;
      shared[kThreads + tid] = w0 + w1;
    }
    __syncthreads();
  }
  v = shared[0];
  w = shared[kThreads];
  __syncthreads();  // everyone has read the totals before the array is written again
}

// mean and rstd = 1 / sqrt(var + eps) of one row of `width` values (torch.nn.LayerNorm's biased
// variance), two passes over it.
template <typename T>
__device__ __forceinline__ void row_moments(dptr<const T> x, int64_t width, T eps, dptr<T> shared, T& mean,
                                            T& rstd) {
  T sum = 0, unused = 0;
  for (int64_t j = threadIdx.x; j < width; j += kThreads) sum += x[j];
  block_sum2(sum, unused, shared);
  mean = sum / T(width);
  T squares = 0;
  unused = 0;
  for (int64_t j = threadIdx.x; j < width; j += kThreads) {
    const T d = x[j] - mean;
    squares += d * d;
  }
  block_sum2(squares, unused, shared);
  rstd = T(1) / CellOps<T>::sqrt(squares / T(width) + eps);
}

template <typename T>
struct LayerNormForwardArgs {
  int64_t rows = 0, hidden = 0;
  T eps = 0;
  dptr<const T> gates_x = nullptr;    // [rows, G*H]  LN(x W_ih^T) ih_gain + ih_bias + b_ih
  dptr<const T> product = nullptr;    // [rows, G*H]  (m h_{t-1}) W_hh^T
  dptr<const T> gain = nullptr;       // [G*H]        hh_gain
  dptr<const T> shift = nullptr;      // [G*H]        hh_bias + b_hh
  dptr<const T> cell_gain = nullptr;  // [H]          LSTM
  dptr<const T> cell_bias = nullptr;  // [H]          LSTM
  dptr<const T> keep_h = nullptr;     // [rows, H] or one value (stride 0); nullptr: no zoneout
  dptr<const T> keep_c = nullptr;     // LSTM, as keep_h
  int64_t keep_h_stride = 1, keep_c_stride = 1;
  dptr<T> h_state = nullptr;          // [rows, H]    in: h_{t-1}; out: h_t (LSTM with a projection: r =
                                      //              o tanh(c^), keep_h null, storage Same)
  dptr<T> c_state = nullptr;          // [rows, H]    LSTM; in: c_{t-1}; out: c_t
  dptr<T> h_copy = nullptr;           // [rows, H]    the step's output rows (null with a projection)
  dptr<T> workspace = nullptr;        // [rows, W]    W = 10 H + 2 (LSTM) / 7 H + 1 (GRU); scratch in inference
  Storage storage = Storage::Same;    // rounding of h_t
};

template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm_lstm_forward_kernel(const LayerNormForwardArgs<T> a) {
  RNNFUSED_SHARED_ARRAY(T, partial, 2 * kThreads);
  const int64_t H = a.hidden, GH = 4 * H, row = blockIdx.x;
  const dptr<const T> p = a.product + row * GH;
  const dptr<const T> gx = a.gates_x + row * GH;
  const dptr<T> ws = a.workspace + row * (10 * H + 2);
  T mean, rstd;
  row_moments<T>(p, GH, a.eps, partial, mean, rstd);
  T c_sum = 0, unused = 0;
  for (int64_t u = threadIdx.x; u < H; u += kThreads) {
    T pre[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t j = k * H + u;
      const T xh = (p[j] - mean) * rstd;
      ws[GH + j] = xh;
      pre[k] = gx[j] + (a.gain[j] * xh + a.shift[j]);
    }
    const auto s = rnnfused::lstm_gates<T>(pre[0], pre[1], pre[2], pre[3], a.c_state[row * H + u]);
    ws[u] = s.i;
    ws[H + u] = s.f;
    ws[2 * H + u] = s.g;
    ws[3 * H + u] = s.o;
    ws[2 * GH + u] = s.c;  // c~ until the last pass
    c_sum += s.c;
  }
  block_sum2(c_sum, unused, partial);
  const T c_mean = c_sum / T(H);
  T squares = 0;
  unused = 0;
  for (int64_t u = threadIdx.x; u < H; u += kThreads) {
    const T d = ws[2 * GH + u] - c_mean;
    squares += d * d;
  }
  block_sum2(squares, unused, partial);
  const T c_rstd = T(1) / CellOps<T>::sqrt(squares / T(H) + a.eps);
  if (threadIdx.x == 0) {
    ws[2 * GH + 2 * H] = rstd;
    ws[2 * GH + 2 * H + 1] = c_rstd;
  }
  for (int64_t u = threadIdx.x; u < H; u += kThreads) {
    const int64_t idx = row * H + u;
    const T c_cand = ws[2 * GH + u];
    const T xc = (c_cand - c_mean) * c_rstd;
    ws[2 * GH + H + u] = xc;
    T h = ws[3 * H + u] * tanh_act(a.cell_gain[u] * xc + a.cell_bias[u]);
    const T c = a.keep_c ? rnnfused::zoneout<T>(a.keep_c[idx * a.keep_c_stride], a.c_state[idx], c_cand) : c_cand;
    if (a.keep_h) h = rnnfused::zoneout<T>(a.keep_h[idx * a.keep_h_stride], a.h_state[idx], h);
    h = round_to_storage(h, a.storage);
    ws[2 * GH + u] = c;
    a.c_state[idx] = c;
    a.h_state[idx] = h;
    if (a.h_copy) a.h_copy[idx] = h;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm_gru_forward_kernel(const LayerNormForwardArgs<T> a) {
  RNNFUSED_SHARED_ARRAY(T, partial, 2 * kThreads);
  const int64_t H = a.hidden, GH = 3 * H, row = blockIdx.x;
  const dptr<const T> p = a.product + row * GH;
  const dptr<const T> gx = a.gates_x + row * GH;
  const dptr<T> ws = a.workspace + row * (7 * H + 1);
  T mean, rstd;
  row_moments<T>(p, GH, a.eps, partial, mean, rstd);
  if (threadIdx.x == 0) ws[2 * GH + H] = rstd;
  for (int64_t u = threadIdx.x; u < H; u += kThreads) {
    const int64_t idx = row * H + u;
    T hh[3];
    for (int k = 0; k < 3; ++k) {
      const int64_t j = k * H + u;
      const T xh = (p[j] - mean) * rstd;
      ws[GH + j] = xh;
      hh[k] = a.gain[j] * xh + a.shift[j];
    }
    const T h_prev = a.h_state[idx];
    const auto s = rnnfused::gru_forward<T>(gx[u], gx[H + u], gx[2 * H + u], hh[0], hh[1], hh[2], h_prev);
    ws[u] = s.r;
    ws[H + u] = s.z;
    ws[2 * H + u] = s.n;
    ws[2 * GH + u] = hh[2];
    T h = a.keep_h ? rnnfused::zoneout<T>(a.keep_h[idx * a.keep_h_stride], h_prev, s.h) : s.h;
    h = round_to_storage(h, a.storage);
    a.h_state[idx] = h;
    a.h_copy[idx] = h;
  }
}

template <typename T>
struct LayerNormBackwardArgs {
  int64_t rows = 0, hidden = 0;
  dptr<const T> workspace = nullptr;    // [rows, W]
  dptr<const T> h_prev = nullptr;       // [rows, H]    GRU: h_{t-1}
  dptr<const T> c_prev = nullptr;       // [rows, H]    LSTM: c_{t-1}
  dptr<const T> gain = nullptr;         // [G*H]        hh_gain
  dptr<const T> cell_gain = nullptr;    // [H]          LSTM
  dptr<const T> cell_bias = nullptr;    // [H]          LSTM
  dptr<const T> keep_h = nullptr;       // as in LayerNormForwardArgs
  dptr<const T> keep_c = nullptr;
  int64_t keep_h_stride = 1, keep_c_stride = 1;
  dptr<const T> grad_output = nullptr;  // [rows, H]    may be null
  dptr<T> dh_state = nullptr;           // [rows, H]    in: dL/dh_t from later steps; out: its direct part for h_{t-1}
  dptr<T> dc_state = nullptr;           // [rows, H]    LSTM; in: dL/dc_t; out: dL/dc_{t-1}
  dptr<T> grad_gates_x = nullptr;       // [rows, G*H]
  dptr<T> grad_hh = nullptr;            // [rows, G*H]  dL/dhh, hh = gain xhat + shift
  dptr<T> grad_c_hat = nullptr;         // [rows, H]    LSTM: dL/d(LN(c~) cell_gain + cell_bias)
  dptr<T> grad_product = nullptr;       // [rows, G*H]  dL/d((m h_{t-1}) W_hh^T)
  dptr<T> r_out = nullptr;              // [rows, H]    LSTM with a projection: o tanh(c^) (for dW_hr); else null
  dptr<T> scratch = nullptr;            // [rows, 2H]   LSTM
};

// grad_product = LN's input gradient from dL/dhh of the row (rows' grad_hh written and visible).
template <typename T>
__device__ __forceinline__ void layer_norm_product_backward(const LayerNormBackwardArgs<T>& a, int64_t GH,
                                                            dptr<const T> xh, T rstd, dptr<T> shared) {
  const int64_t row = blockIdx.x;
  const dptr<const T> dhh = a.grad_hh + row * GH;
  T sum = 0, sum_x = 0;
  for (int64_t j = threadIdx.x; j < GH; j += kThreads) {
    const T d = dhh[j] * a.gain[j];
    sum += d;
    sum_x += d * xh[j];
  }
  block_sum2(sum, sum_x, shared);
  const T m1 = sum / T(GH), m2 = sum_x / T(GH);
  for (int64_t j = threadIdx.x; j < GH; j += kThreads) {
    a.grad_product[row * GH + j] = rnnfused::layer_norm_input_grad<T>(rstd, dhh[j] * a.gain[j], xh[j], m1, m2);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm_lstm_backward_kernel(const LayerNormBackwardArgs<T> a) {
  RNNFUSED_SHARED_ARRAY(T, partial, 2 * kThreads);
  const int64_t H = a.hidden, GH = 4 * H, row = blockIdx.x;
  const dptr<const T> ws = a.workspace + row * (10 * H + 2);
  const dptr<const T> xh = ws + GH;
  const dptr<const T> xc = ws + 2 * GH + H;
  const T rstd = ws[2 * GH + 2 * H], c_rstd = ws[2 * GH + 2 * H + 1];
  const dptr<T> d = a.grad_gates_x + row * GH;
  const dptr<T> dhh = a.grad_hh + row * GH;
  const dptr<T> d_xc = a.scratch + row * 2 * H;
  const dptr<T> dc_cand = d_xc + H;
  T sum = 0, sum_x = 0;
  for (int64_t u = threadIdx.x; u < H; u += kThreads) {
    const int64_t idx = row * H + u;
    const T dh = a.dh_state[idx] + (a.grad_output ? static_cast<T>(a.grad_output[idx]) : T(0));
    const T kh = a.keep_h ? static_cast<T>(a.keep_h[idx * a.keep_h_stride]) : T(0);
    const T kc = a.keep_c ? static_cast<T>(a.keep_c[idx * a.keep_c_stride]) : T(0);
    const T cg = a.cell_gain[u];
    const T x = xc[u];
    const T tanh_c_hat = tanh_act(cg * x + a.cell_bias[u]);
    const auto od = rnnfused::layer_norm_lstm_output_backward<T>(ws[3 * H + u], tanh_c_hat, (T(1) - kh) * dh);
    if (a.r_out) a.r_out[idx] = ws[3 * H + u] * tanh_c_hat;
    const T dc = a.dc_state[idx];
    d[3 * H + u] = od.pre_o;
    dhh[3 * H + u] = od.pre_o;
    a.grad_c_hat[idx] = od.c_hat;
    d_xc[u] = od.c_hat * cg;
    dc_cand[u] = (T(1) - kc) * dc;
    a.dc_state[idx] = kc * dc;
    a.dh_state[idx] = kh * dh;  // the kept part of dL/dh_t goes to h_{t-1}
    sum += od.c_hat * cg;
    sum_x += od.c_hat * cg * x;
  }
  block_sum2(sum, sum_x, partial);
  const T m1 = sum / T(H), m2 = sum_x / T(H);
  for (int64_t u = threadIdx.x; u < H; u += kThreads) {
    const int64_t idx = row * H + u;
    const T dc_total = dc_cand[u] + rnnfused::layer_norm_input_grad<T>(c_rstd, d_xc[u], xc[u], m1, m2);
    const auto g = rnnfused::lstm_cell_backward<T>(ws[u], ws[H + u], ws[2 * H + u], a.c_prev[idx], dc_total);
    d[u] = g.pre_i;
    d[H + u] = g.pre_f;
    d[2 * H + u] = g.pre_g;
    dhh[u] = g.pre_i;
    dhh[H + u] = g.pre_f;
    dhh[2 * H + u] = g.pre_g;
    a.dc_state[idx] = a.dc_state[idx] + g.c_prev;
  }
  __syncthreads();  // the row's dL/dhh, written by every thread, is read by every thread below
  layer_norm_product_backward(a, GH, xh, rstd, partial);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) layer_norm_gru_backward_kernel(const LayerNormBackwardArgs<T> a) {
  RNNFUSED_SHARED_ARRAY(T, partial, 2 * kThreads);
  const int64_t H = a.hidden, GH = 3 * H, row = blockIdx.x;
  const dptr<const T> ws = a.workspace + row * (7 * H + 1);
  const dptr<T> d = a.grad_gates_x + row * GH;
  const dptr<T> dhh = a.grad_hh + row * GH;
  for (int64_t u = threadIdx.x; u < H; u += kThreads) {
    const int64_t idx = row * H + u;
    const T dh = a.dh_state[idx] + (a.grad_output ? static_cast<T>(a.grad_output[idx]) : T(0));
    const T kh = a.keep_h ? static_cast<T>(a.keep_h[idx * a.keep_h_stride]) : T(0);
    const auto g = rnnfused::gru_backward<T>(ws[u], ws[H + u], ws[2 * H + u], ws[2 * GH + u], a.h_prev[idx],
                                             (T(1) - kh) * dh);
    d[u] = g.x_r;
    d[H + u] = g.x_z;
    d[2 * H + u] = g.x_n;
    dhh[u] = g.x_r;
    dhh[H + u] = g.x_z;
    dhh[2 * H + u] = g.hh_n;
    a.dh_state[idx] = kh * dh + g.h_prev;
  }
  __syncthreads();
  layer_norm_product_backward(a, GH, ws + GH, static_cast<T>(ws[2 * GH + H]), partial);
}

}  // namespace rnnfused::cuda
