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
#include <atomic>
#include <climits>
#include <cmath>
#include <type_traits>

#include "../cell_math.h"
#include "pointwise.h"
#include "team.h"  // note_pass_balance, monotonic_ns

namespace rnnfused {

// e^x for float vectors, inlined (SLEEF's expf is a call and dominated the gate math): n = round(x
// log2 e), r = x - n ln 2 in two steps (Cody-Waite), e^r by Cephes' degree-5 polynomial, then
// r scaled by 2^n. The argument is clamped to [-104, 89], beyond which e^x is 0 or +inf in float
// (so the scale stays finite: the result still overflows to +inf and underflows gradually to 0).
// NaN stays NaN. Accuracy: tests/test_cpu_engine.py measures it through the ops (sigmoid, tanh).
// Elsewhere than AVX2 / AVX-512 it is at::vec's exp.
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const V xc = at::vec::clamp(x, V(-104.f), V(89.f));  // keeps NaN
  const V n = (xc * V(1.44269504088896341f)).round();
  V r = at::vec::fmadd(n, V(-0.693359375f), xc);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, V(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, V(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, V(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, V(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, V(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r) + V(1.f);  // 1 added last: one rounding of the result
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  // 2^n as two normal floats 2^(n/2 rounded down) and 2^(the rest), n in [-150, 129].
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const V s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const V s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return (p * s1) * s2;
#endif
#else
  return x.exp();
#endif
}

// 1 / d for d >= 1 or +inf (0 exactly). AVX-512: the 14-bit estimate and one Newton step (a
// division of 16 floats costs about as much as the rest of an LSTM cell's gate math), at most one
// unit in the last place from the correctly rounded quotient; elsewhere a division.
inline at::vec::Vectorized<float> reciprocal_at_least_one(const at::vec::Vectorized<float>& d) {
  using V = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 e = _mm512_rcp14_ps(d);
  const __m512 refined = _mm512_fmadd_ps(_mm512_fnmadd_ps(d, e, _mm512_set1_ps(1.f)), e, e);
  // rcp14(inf) = 0, but the Newton step would turn 0 * inf into NaN.
  const __mmask16 infinite = _mm512_cmp_ps_mask(d, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
  return _mm512_mask_blend_ps(infinite, refined, _mm512_setzero_ps());
#else
  return V(1.f) / d;
#endif
}

// tanh for float vectors at a third of the cost of SLEEF's tanhf (which dominated the gate math):
//   |x| < 0.625: x + x^3 P(x^2), P a degree-4 fit of (tanh(x)/x - 1)/x^2 (relative error);
//   otherwise:   sign(x) (1 - 2 / (exp(2|x|) + 1)), no cancellation since the result is >= 0.55.
// Against double-precision tanh over a dense grid of [-12, 12] (tests/test_cpu_engine.py, every
// instruction set): within 1.5 ulp; exact at +-0 (sign kept) and +-inf; NaN stays NaN.
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
  const V e = fast_exp(ax + ax);
  const V large = V(1.f) - V(2.f) * reciprocal_at_least_one(e + V(1.f));
  return V::blendv(large, small, ax < V(0.625f)) | (x & V(-0.f));  // | the sign bit of x (-0 stays -0)
}

// sigmoid for float vectors: 1 / (1 + e^-x) with the inlined exp and reciprocal above. Where e^-x
// overflows (x < -88.7) the result is 0, as with the division.
inline at::vec::Vectorized<float> fast_sigmoid(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  return reciprocal_at_least_one(V(1.f) + fast_exp(V(0.f) - x));
}

// Vectorized transcendentals for the shared cell math.
template <typename S>
struct CellOps<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static inline V exp(V x) {
    if constexpr (std::is_same_v<S, float>) {
      return fast_exp(x);
    } else {
      return x.exp();
    }
  }
  static inline V tanh(V x) {
    if constexpr (std::is_same_v<S, float>) {
      return fast_tanh(x);
    } else {
      return x.tanh();
    }
  }
  static inline V sigmoid(V x) {
    if constexpr (std::is_same_v<S, float>) {
      return fast_sigmoid(x);
    } else {
      return sigmoid_by_division(x);
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
// Notes how far apart its threads finished (note_pass_balance, team.h: the per-step path's
// watch for a thread without a core).
template <typename F>
inline void for_each_segment(int64_t rows, int64_t width, int64_t grain, const F& f) {
  const int64_t total = rows * width;
  if (total == 0) return;
  const int64_t start = monotonic_ns();
  const int64_t straggler_us = engine_straggler_delay_us();  // testing hook: late threads
  std::atomic<int64_t> threads{0}, first{INT64_MAX}, last{0};
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    if (straggler_us > 0 && begin > 0) {
      const timespec delay{static_cast<time_t>(straggler_us / 1000000),
                           static_cast<long>(straggler_us % 1000000) * 1000};
      nanosleep(&delay, nullptr);
    }
    int64_t idx = begin;
    while (idx < end) {
      const int64_t row = idx / width;
      const int64_t j = idx - row * width;
      const int64_t j_end = std::min(width, j + (end - idx));
      f(row, j, j_end);
      idx += j_end - j;
    }
    const int64_t done = monotonic_ns() - start;
    threads.fetch_add(1, std::memory_order_relaxed);
    for (int64_t seen = first.load(); done < seen && !first.compare_exchange_weak(seen, done);) {
    }
    for (int64_t seen = last.load(); done > seen && !last.compare_exchange_weak(seen, done);) {
    }
  });
  note_pass_balance(threads.load(), first.load(), last.load());
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

// ---------------------------------------------------------------------------------------------
// LayerNorm LSTM / GRU, one row (see pointwise.h; math in cell_math.h).
// ---------------------------------------------------------------------------------------------

// Sum over [0, width) of f(vector at j) for full vectors, plus tail(j) for the last elements
// (a partial vector's zero-filled lanes would not be zero in every summand).
template <typename T, typename F, typename Tail>
inline T row_sum(int64_t width, const F& f, const Tail& tail) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + Vec::size() <= width; j += Vec::size()) acc = acc + f(j);
  alignas(64) T lanes[Vec::size()];
  acc.store(lanes);
  T sum = 0;
  for (int64_t k = 0; k < Vec::size(); ++k) sum += lanes[k];
  for (; j < width; ++j) sum += tail(j);
  return sum;
}

// xhat = (x - mean) rstd over one row; returns rstd (torch.nn.LayerNorm's biased variance).
template <typename T>
inline T normalize_row(int64_t width, const T* x, T eps, T* xhat) {
  using Vec = at::vec::Vectorized<T>;
  const T mean =
      row_sum<T>(width, [&](int64_t j) { return Vec::loadu(x + j); }, [&](int64_t j) { return x[j]; }) / T(width);
  const Vec mean_v(mean);
  const T var = row_sum<T>(
                    width,
                    [&](int64_t j) {
                      const Vec d = Vec::loadu(x + j) - mean_v;
                      return d * d;
                    },
                    [&](int64_t j) { return (x[j] - mean) * (x[j] - mean); }) /
                T(width);
  const T rstd = T(1) / std::sqrt(var + eps);
  const Vec rstd_v(rstd);
  for_each_vector<T>(0, width, [&](int64_t j, Lanes<T> l) { l.store(xhat + j, (l.load(x + j) - mean_v) * rstd_v); });
  return rstd;
}

// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) over one row (dx may be dxhat).
template <typename T>
inline void normalize_row_backward(int64_t width, T rstd, const T* xhat, const T* dxhat, T* dx) {
  using Vec = at::vec::Vectorized<T>;
  const T mean_d = row_sum<T>(width, [&](int64_t j) { return Vec::loadu(dxhat + j); },
                              [&](int64_t j) { return dxhat[j]; }) / T(width);
  const T mean_dx = row_sum<T>(width, [&](int64_t j) { return Vec::loadu(dxhat + j) * Vec::loadu(xhat + j); },
                               [&](int64_t j) { return dxhat[j] * xhat[j]; }) / T(width);
  const Vec r(rstd), m1(mean_d), m2(mean_dx);
  for_each_vector<T>(0, width, [&](int64_t j, Lanes<T> l) {
    l.store(dx + j, rnnfused::layer_norm_input_grad(r, l.load(dxhat + j), l.load(xhat + j), m1, m2));
  });
}

// Zoneout keep weights at j: a row of them, or the eval-mode scalar.
template <typename T>
inline at::vec::Vectorized<T> keep_at(const T* keep, int64_t stride, int64_t j, Lanes<T> l) {
  return stride ? l.load(keep + j) : at::vec::Vectorized<T>(keep[0]);
}

template <typename T>
void layer_norm_lstm_forward_row(const LayerNormRowForward<T>& a) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t H = a.hidden, GH = 4 * H;
  T* ws = a.workspace;
  T *xh = ws + GH, *c_out = ws + 2 * GH, *xc = ws + 2 * GH + H;
  ws[2 * GH + 2 * H] = normalize_row(GH, a.product, a.eps, xh);
  for_each_vector<T>(0, H, [&](int64_t j, Lanes<T> l) {
    auto pre = [&](int64_t gate) {
      const int64_t k = gate * H + j;
      return l.load(a.gates_x + k) + at::vec::fmadd(l.load(a.gain + k), l.load(xh + k), l.load(a.shift + k));
    };
    const auto s = rnnfused::lstm_gates(pre(0), pre(1), pre(2), pre(3), l.load(a.c_state + j));
    l.store(ws + j, s.i);
    l.store(ws + H + j, s.f);
    l.store(ws + 2 * H + j, s.g);
    l.store(ws + 3 * H + j, s.o);
    l.store(c_out + j, s.c);  // c~ until the second pass
  });
  ws[2 * GH + 2 * H + 1] = normalize_row(H, c_out, a.eps, xc);
  for_each_vector<T>(0, H, [&](int64_t j, Lanes<T> l) {
    const Vec c_hat = at::vec::fmadd(l.load(a.cell_gain + j), l.load(xc + j), l.load(a.cell_bias + j));
    Vec h = l.load(ws + 3 * H + j) * CellOps<Vec>::tanh(c_hat);
    Vec c = l.load(c_out + j);
    if (a.keep_c) c = rnnfused::zoneout(keep_at(a.keep_c, a.keep_c_stride, j, l), l.load(a.c_state + j), c);
    if (a.keep_h) h = rnnfused::zoneout(keep_at(a.keep_h, a.keep_h_stride, j, l), l.load(a.h_state + j), h);
    l.store(c_out + j, c);
    l.store(a.c_state + j, c);
    l.store(a.h_state + j, h);
  });
}

template <typename T>
void layer_norm_lstm_backward_row(const LayerNormRowBackward<T>& a) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t H = a.hidden, GH = 4 * H;
  const T* ws = a.workspace;
  const T *xh = ws + GH, *xc = ws + 2 * GH + H;
  const T rstd_hh = ws[2 * GH + 2 * H], rstd_c = ws[2 * GH + 2 * H + 1];
  T *d_xc = a.scratch, *dc_cand = a.scratch + H, *d_xhat = a.scratch + 2 * H;
  T* d = a.grad_gates_x;
  const Vec one(T(1));
  for_each_vector<T>(0, H, [&](int64_t j, Lanes<T> l) {
    Vec dh = l.load(a.dh_state + j);
    if (a.grad_output) dh = dh + l.load(a.grad_output + j);
    const Vec kh = a.keep_h ? keep_at(a.keep_h, a.keep_h_stride, j, l) : Vec(T(0));
    const Vec kc = a.keep_c ? keep_at(a.keep_c, a.keep_c_stride, j, l) : Vec(T(0));
    const Vec cg = l.load(a.cell_gain + j);
    const Vec tanh_c_hat = CellOps<Vec>::tanh(at::vec::fmadd(cg, l.load(xc + j), l.load(a.cell_bias + j)));
    const auto od = rnnfused::layer_norm_lstm_output_backward(l.load(ws + 3 * H + j), tanh_c_hat, (one - kh) * dh);
    const Vec dc = l.load(a.dc_state + j);
    l.store(d + 3 * H + j, od.pre_o);
    l.store(a.grad_c_hat + j, od.c_hat);
    if (a.r_out) l.store(a.r_out + j, l.load(ws + 3 * H + j) * tanh_c_hat);
    l.store(d_xc + j, od.c_hat * cg);
    l.store(a.dh_state + j, kh * dh);       // the kept part of dL/dh_t goes to h_{t-1}
    l.store(dc_cand + j, (one - kc) * dc);  // the candidate's share of dL/dc_t
    l.store(a.dc_state + j, kc * dc);
  });
  normalize_row_backward(H, rstd_c, xc, d_xc, d_xc);
  for_each_vector<T>(0, H, [&](int64_t j, Lanes<T> l) {
    const auto g = rnnfused::lstm_cell_backward(l.load(ws + j), l.load(ws + H + j), l.load(ws + 2 * H + j),
                                                l.load(a.c_prev + j), l.load(dc_cand + j) + l.load(d_xc + j));
    l.store(d + j, g.pre_i);
    l.store(d + H + j, g.pre_f);
    l.store(d + 2 * H + j, g.pre_g);
    l.store(a.dc_state + j, l.load(a.dc_state + j) + g.c_prev);
  });
  for_each_vector<T>(0, GH, [&](int64_t j, Lanes<T> l) {
    const Vec dj = l.load(d + j);
    l.store(a.grad_hh + j, dj);  // hh enters the pre-activations as is
    l.store(d_xhat + j, dj * l.load(a.gain + j));
  });
  normalize_row_backward(GH, rstd_hh, xh, d_xhat, a.grad_product);
}

template <typename T>
void layer_norm_gru_forward_row(const LayerNormRowForward<T>& a) {
  const int64_t H = a.hidden, GH = 3 * H;
  T* ws = a.workspace;
  T *xh = ws + GH, *hh_n = ws + 2 * GH;
  ws[2 * GH + H] = normalize_row(GH, a.product, a.eps, xh);
  for_each_vector<T>(0, H, [&](int64_t j, Lanes<T> l) {
    auto hh = [&](int64_t gate) {
      const int64_t k = gate * H + j;
      return at::vec::fmadd(l.load(a.gain + k), l.load(xh + k), l.load(a.shift + k));
    };
    const auto h_prev = l.load(a.h_state + j);
    const auto hn = hh(2);
    const auto s = rnnfused::gru_forward(l.load(a.gates_x + j), l.load(a.gates_x + H + j),
                                         l.load(a.gates_x + 2 * H + j), hh(0), hh(1), hn, h_prev);
    l.store(ws + j, s.r);
    l.store(ws + H + j, s.z);
    l.store(ws + 2 * H + j, s.n);
    l.store(hh_n + j, hn);
    l.store(a.h_state + j, a.keep_h ? rnnfused::zoneout(keep_at(a.keep_h, a.keep_h_stride, j, l), h_prev, s.h) : s.h);
  });
}

template <typename T>
void layer_norm_gru_backward_row(const LayerNormRowBackward<T>& a) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t H = a.hidden, GH = 3 * H;
  const T* ws = a.workspace;
  const T *xh = ws + GH, *hh_n = ws + 2 * GH;
  const T rstd = ws[2 * GH + H];
  T* d_xhat = a.scratch + 2 * H;
  T *d = a.grad_gates_x, *dhh = a.grad_hh;
  const Vec one(T(1));
  for_each_vector<T>(0, H, [&](int64_t j, Lanes<T> l) {
    Vec dh = l.load(a.dh_state + j);
    if (a.grad_output) dh = dh + l.load(a.grad_output + j);
    const Vec kh = a.keep_h ? keep_at(a.keep_h, a.keep_h_stride, j, l) : Vec(T(0));
    const auto g = rnnfused::gru_backward(l.load(ws + j), l.load(ws + H + j), l.load(ws + 2 * H + j),
                                          l.load(hh_n + j), l.load(a.h_prev + j), (one - kh) * dh);
    l.store(d + j, g.x_r);
    l.store(d + H + j, g.x_z);
    l.store(d + 2 * H + j, g.x_n);
    l.store(dhh + j, g.x_r);
    l.store(dhh + H + j, g.x_z);
    l.store(dhh + 2 * H + j, g.hh_n);
    l.store(a.dh_state + j, kh * dh + g.h_prev);
  });
  for_each_vector<T>(0, GH, [&](int64_t j, Lanes<T> l) { l.store(d_xhat + j, l.load(dhh + j) * l.load(a.gain + j)); });
  normalize_row_backward(GH, rstd, xh, d_xhat, a.grad_product);
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
                             &rnn_backward_step<T, Activation::Relu>,
                             &layer_norm_lstm_forward_row<T>,
                             &layer_norm_lstm_backward_row<T>,
                             &layer_norm_gru_forward_row<T>,
                             &layer_norm_gru_backward_row<T>};
}

}  // namespace cpu::RNNFUSED_ISA
}  // namespace rnnfused
