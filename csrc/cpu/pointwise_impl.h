// Implementation of the per-step passes declared in pointwise.h, written once on
// at::vec::Vectorized and compiled once per instruction set: pointwise_default.cpp (baseline
// x86-64 / any processor) and pointwise_avx2.cpp (AVX2 + FMA, where Vectorized<float> is one
// ymm register and exp/tanh are SLEEF's vector functions exported by libtorch_cpu).
//
// The including file defines RNNFUSED_ISA, the namespace of this copy, and
// RNNFUSED_ISA_NAME, its name as a string. at::vec already lives in an inline namespace per
// CPU_CAPABILITY, so the two copies never share a symbol.
#pragma once

#ifndef RNNFUSED_ISA
#error "define RNNFUSED_ISA before including pointwise_impl.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "../cell_math.h"
#include "pointwise.h"

namespace rnnfused {

// tanh for float vectors at a third of the cost of SLEEF's tanhf (which dominated the gate math):
//   |x| < 0.625: x + x^3 P(x^2), P a degree-4 fit of (tanh(x)/x - 1)/x^2 (relative error);
//   otherwise:   sign(x) (1 - 2 / (exp(2|x|) + 1)), no cancellation since the result is >= 0.55.
// Measured against double-precision tanh over every float in [-12, 12] on AVX-512: at most
// 1.33 ulp; exact at +-0 (sign kept) and +-inf; NaN stays NaN (tests/test_modules.py checks a
// dense grid through the ops on every instruction set).
inline at::vec::Vectorized<float> fast_tanh(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  const V ax = x.abs();
  const V u = x * x;
  V p(-0.005706497933715582f);
  p = at::vec::fmadd(p, u, V(0.020640265196561813f));
  p = at::vec::fmadd(p, u, V(-0.05373997613787651f));
  p = at::vec::fmadd(p, u, V(0.13331443071365356f));
  p = at::vec::fmadd(p, u, V(-0.3333328068256378f));
  const V small = at::vec::fmadd(x * u, p, x);
  const V e = (ax + ax).exp();
  const V large = V(1.f) - V(2.f) / (e + V(1.f));
  return V::blendv(large, small, ax < V(0.625f)) | (x & V(-0.f));  // | the sign bit of x (-0 stays -0)
}

// Vectorized transcendentals for the shared cell math.
template <typename S>
struct CellOps<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static inline V exp(V x) { return x.exp(); }
  static inline V tanh(V x) {
    if constexpr (std::is_same_v<S, float>) {
      return fast_tanh(x);
    } else {
      return x.tanh();
    }
  }
  static inline V relu(V x) { return at::vec::clamp_min(x, V(0)); }  // max_ps keeps NaN
  static inline V where_positive(V out, V grad) { return grad & (out > V(0)); }
};

namespace cpu::RNNFUSED_ISA {

// One task should carry several microseconds of work: an OpenMP fork/join costs ~1-2 us, and
// below that one thread is faster. Costs are in elements of a gate row (H wide).
constexpr int64_t kGrainGated = 2048;  // LSTM / GRU: four to five transcendentals per element
constexpr int64_t kGrainRnn = 8192;    // Elman RNN: one

// Calls f(row, j_begin, j_end) over rows x [0, width), split across threads in flat chunks so
// that a batch of one row still uses every thread when it is wide enough.
template <typename F>
inline void for_each_segment(int64_t rows, int64_t width, int64_t grain, const F& f) {
  const int64_t total = rows * width;
  if (total == 0) return;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    int64_t idx = begin;
    while (idx < end) {
      const int64_t row = idx / width;
      const int64_t j = idx - row * width;
      const int64_t j_end = std::min(width, j + (end - idx));
      f(row, j, j_end);
      idx += j_end - j;
    }
  });
}

// Loads and stores of `n` lanes (n == Vec::size() on all but the last chunk of a segment).
template <typename T>
struct Lanes {
  using Vec = at::vec::Vectorized<T>;
  int64_t n;
  inline Vec load(const T* p) const { return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n); }
  inline void store(T* p, const Vec& v) const {
    if (n == Vec::size()) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  }
};

template <typename T, typename F>
inline void for_each_vector(int64_t j_begin, int64_t j_end, const F& f) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t j = j_begin; j < j_end; j += Vec::size()) {
    f(j, Lanes<T>{std::min<int64_t>(Vec::size(), j_end - j)});
  }
}

template <typename T>
void lstm_forward_step(const LstmForwardStep<T>& a) {
  const int64_t H = a.hidden;
  for_each_segment(a.rows, H, kGrainGated, [&](int64_t row, int64_t j0, int64_t j1) {
    const T* gx = a.gates_x + row * 4 * H;
    const T* gh = a.gates_h + row * 4 * H;
    T* c = a.c_state + row * H;
    T* r = a.r_out + row * H;
    T* ws = a.workspace ? a.workspace + row * 5 * H : nullptr;
    for_each_vector<T>(j0, j1, [&](int64_t j, Lanes<T> l) {
      auto pre = [&](int64_t gate) {
        const int64_t k = gate * H + j;
        return l.load(gx + k) + l.load(gh + k) + l.load(a.bias + k);
      };
      const auto act = rnnfused::lstm_forward(pre(0), pre(1), pre(2), pre(3), l.load(c + j));
      l.store(c + j, act.c);
      l.store(r + j, act.r);
      if (ws) {
        l.store(ws + j, act.i);
        l.store(ws + H + j, act.f);
        l.store(ws + 2 * H + j, act.g);
        l.store(ws + 3 * H + j, act.o);
        l.store(ws + 4 * H + j, act.c);
      }
    });
  });
}

template <typename T>
void lstm_backward_step(const LstmBackwardStep<T>& a) {
  const int64_t H = a.hidden;
  for_each_segment(a.rows, H, kGrainGated, [&](int64_t row, int64_t j0, int64_t j1) {
    const T* ws = a.workspace + row * 5 * H;
    const T* c_prev = a.c_prev_rows                ? a.c_prev_rows + row * H
                      : row < a.rows_from_prev ? a.prev_workspace + row * 5 * H + 4 * H
                                               : a.c0 + row * H;
    const T* dr = a.grad_r + row * H;
    const T* dr_extra = a.grad_r_extra ? a.grad_r_extra + row * H : nullptr;
    T* dc = a.dc_state + row * H;
    T* dg = a.grad_gates + row * 4 * H;
    T* r = a.r_out ? a.r_out + row * H : nullptr;
    for_each_vector<T>(j0, j1, [&](int64_t j, Lanes<T> l) {
      auto grad_r = l.load(dr + j);
      if (dr_extra) grad_r = grad_r + l.load(dr_extra + j);
      const auto d = rnnfused::lstm_backward(l.load(ws + j), l.load(ws + H + j), l.load(ws + 2 * H + j),
                                   l.load(ws + 3 * H + j), l.load(ws + 4 * H + j), l.load(c_prev + j), grad_r,
                                   l.load(dc + j));
      l.store(dg + j, d.pre_i);
      l.store(dg + H + j, d.pre_f);
      l.store(dg + 2 * H + j, d.pre_g);
      l.store(dg + 3 * H + j, d.pre_o);
      l.store(dc + j, d.c_prev);
      if (r) l.store(r + j, d.r);
    });
  });
}

template <typename T>
void gru_forward_step(const GruForwardStep<T>& a) {
  const int64_t H = a.hidden;
  for_each_segment(a.rows, H, kGrainGated, [&](int64_t row, int64_t j0, int64_t j1) {
    const T* gx = a.gates_x + row * 3 * H;
    const T* gh = a.gates_h + row * 3 * H;
    T* h = a.h_state + row * H;
    T* ws = a.workspace ? a.workspace + row * 4 * H : nullptr;
    for_each_vector<T>(j0, j1, [&](int64_t j, Lanes<T> l) {
      auto hh = [&](int64_t gate) { return l.load(gh + gate * H + j) + l.load(a.bias + gate * H + j); };
      const auto hh_n = hh(2);
      const auto act = rnnfused::gru_forward(l.load(gx + j), l.load(gx + H + j), l.load(gx + 2 * H + j), hh(0), hh(1),
                                   hh_n, l.load(h + j));
      l.store(h + j, act.h);
      if (ws) {
        l.store(ws + j, act.r);
        l.store(ws + H + j, act.z);
        l.store(ws + 2 * H + j, act.n);
        l.store(ws + 3 * H + j, hh_n);
      }
    });
  });
}

template <typename T>
void gru_backward_step(const GruBackwardStep<T>& a) {
  const int64_t H = a.hidden;
  for_each_segment(a.rows, H, kGrainGated, [&](int64_t row, int64_t j0, int64_t j1) {
    const T* ws = a.workspace + row * 4 * H;
    const T* h_prev = a.h_prev + row * H;
    const T* go = a.grad_output ? a.grad_output + row * H : nullptr;
    T* dh_state = a.dh_state + row * H;
    T* dgx = a.grad_gates_x + row * 3 * H;
    T* dgh = a.grad_gates_h + row * 3 * H;
    for_each_vector<T>(j0, j1, [&](int64_t j, Lanes<T> l) {
      auto dh = l.load(dh_state + j);
      if (go) dh = dh + l.load(go + j);
      const auto d = rnnfused::gru_backward(l.load(ws + j), l.load(ws + H + j), l.load(ws + 2 * H + j),
                                  l.load(ws + 3 * H + j), l.load(h_prev + j), dh);
      l.store(dgx + j, d.x_r);
      l.store(dgx + H + j, d.x_z);
      l.store(dgx + 2 * H + j, d.x_n);
      l.store(dgh + j, d.x_r);
      l.store(dgh + H + j, d.x_z);
      l.store(dgh + 2 * H + j, d.hh_n);
      l.store(dh_state + j, d.h_prev);
    });
  });
}

template <typename T, Activation act>
void rnn_forward_step(const RnnForwardStep<T>& a) {
  const int64_t H = a.hidden;
  for_each_segment(a.rows, H, kGrainRnn, [&](int64_t row, int64_t j0, int64_t j1) {
    const T* gx = a.gates_x + row * H;
    const T* gh = a.gates_h + row * H;
    T* h = a.h_state + row * H;
    for_each_vector<T>(j0, j1, [&](int64_t j, Lanes<T> l) {
      l.store(h + j, rnnfused::rnn_forward<act>(l.load(gx + j) + l.load(gh + j) + l.load(a.bias + j)));
    });
  });
}

template <typename T, Activation act>
void rnn_backward_step(const RnnBackwardStep<T>& a) {
  const int64_t H = a.hidden;
  for_each_segment(a.rows, H, kGrainRnn, [&](int64_t row, int64_t j0, int64_t j1) {
    const T* h = a.h + row * H;
    const T* go = a.grad_output ? a.grad_output + row * H : nullptr;
    const T* dh_state = a.dh_state + row * H;
    T* dg = a.grad_gates + row * H;
    for_each_vector<T>(j0, j1, [&](int64_t j, Lanes<T> l) {
      auto dh = l.load(dh_state + j);
      if (go) dh = dh + l.load(go + j);
      l.store(dg + j, rnnfused::rnn_backward<act>(l.load(h + j), dh));
    });
  });
}

template <typename T>
PointwiseKernels<T> make_kernels() {
  return PointwiseKernels<T>{RNNFUSED_ISA_NAME,
                             &lstm_forward_step<T>,
                             &lstm_backward_step<T>,
                             &gru_forward_step<T>,
                             &gru_backward_step<T>,
                             &rnn_forward_step<T, Activation::Tanh>,
                             &rnn_forward_step<T, Activation::Relu>,
                             &rnn_backward_step<T, Activation::Tanh>,
                             &rnn_backward_step<T, Activation::Relu>};
}

}  // namespace cpu::RNNFUSED_ISA
}  // namespace rnnfused
