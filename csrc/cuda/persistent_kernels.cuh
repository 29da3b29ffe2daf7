// The persistent path of the CUDA recurrence: one cooperative launch runs every step of one layer
// and direction. Each block keeps its slice of the recurrent weights in shared memory for the
// whole sequence (loaded once), the blocks exchange h_t through global memory (L2) and meet at one
// grid barrier per step (two with a projection), so a step costs no kernel launch and no re-read
// of W_hh from DRAM. The standard path (recurrence_cuda.cu: a GEMM and a pointwise kernel per
// step) defines the semantics; the gate math is the same element functions of
// pointwise_kernels.cuh (csrc/cell_math.h), and the step plan is the same StepPlan, uploaded as a
// table.
//
// Work split. A block owns a contiguous slice of hidden units [u0, u0 + U) and all G gates of
// them, so a step's cell update is block-local (c_t and the LSTM cell state never leave their
// block). With a projection it also owns a slice [p0, p0 + Pc) of the P columns of h_t = W_hr r_t.
// The backward uses the transposed split: a block owns the columns k of dL/dh_{t-1} = dG_t W_hh
// for k in its slice, and keeps W_hh[:, slice] (a slice of W_hh^T) on chip.
//
// Products. A warp computes the dot products of one weight row group with a tile of kRowTile
// batch rows: lane l sums k = l, l + 32, ... in order with FMA, then the 32 partial sums are
// combined by an xor butterfly (every lane ends with the same, bit-identical total). The order is
// fixed, so results are deterministic run to run; it is not cuBLAS's order, so the two paths agree
// to rounding, not bit for bit. float32 runs in float32 (no TF32), float64 in float64; bfloat16 /
// float16 run the float32 kernel on float32 copies of their 16-bit weights (exact) with h_t rounded
// to the 16-bit dtype every step, exactly as the standard path's semantics say.
//
// Arguments use the legend of csrc/cell_math.h; every pointer is a contiguous row-major buffer in
// the compute dtype T unless stated.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../cell_math.h"
#include "device.cuh"
#include "pointwise_kernels.cuh"

namespace rnnfused::cuda {

// 8 warps per block, one block per multiprocessor (the weight slice takes most of its shared
// memory).
constexpr int kPersistentThreads = 256;
constexpr int kWarpSize = 32;
// Batch rows per warp item: each weight loaded from shared memory feeds kRowTile FMAs.
constexpr int kRowTile = 4;

enum class Cell : int { Lstm, Gru, RnnTanh, RnnRelu };

template <Cell cell>
constexpr int gates_of() {
  return cell == Cell::Lstm ? 4 : cell == Cell::Gru ? 3 : 1;
}

template <Cell cell>
constexpr Activation activation_of() {
  return cell == Cell::RnnRelu ? Activation::Relu : Activation::Tanh;
}

// One computed step of the plan (position s of the recurrence), as the host uploads it: an
// int64 table [steps, kPlanColumns].
enum PlanColumn : int { kPlanRows = 0, kPlanOffset, kPlanPrevOffset, kPlanRowsFromPrev, kPlanColumns };

struct PlannedStep {
  int64_t rows, offset, prev_offset, rows_from_prev;
};

__device__ __forceinline__ PlannedStep planned_step(const dptr<const int64_t>& plan, int64_t s) {
  const dptr<const int64_t> p = plan + s * kPlanColumns;
  return {p[kPlanRows], p[kPlanOffset], p[kPlanPrevOffset], p[kPlanRowsFromPrev]};
}

// a * b + c rounded once (FFMA / DFMA), the same instruction on the GPU and in the simulator.
template <typename T>
__device__ __forceinline__ T fused_multiply_add(T a, T b, T c) {
  if constexpr (std::is_same_v<T, float>) {
    return fmaf(a, b, c);
  } else {
    return fma(a, b, c);
  }
}

// [begin, end) of this block's share of n items, `per_block` each (the last blocks may get fewer
// or none).
struct Slice {
  int64_t begin, size;
};

__device__ __forceinline__ Slice block_slice(int64_t n, int64_t per_block) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t end = begin + per_block < n ? begin + per_block : n;
  return {begin, end > begin ? end - begin : 0};
}

// sums[g][r] = sum_k w[g * K + k] * x[r][k] for NG weight rows w (shared memory, [NG, K]) and
// kRowTile rows x (global memory; null for a row outside the step), computed by the whole warp;
// every lane returns the same totals. Called by all 32 lanes of a warp together.
template <typename T, int NG>
__device__ __forceinline__ void warp_dot(const dptr<const T>& w, int64_t K, const dptr<const T> (&x)[kRowTile],
                                         int lane, T (&sums)[NG][kRowTile]) {
#pragma unroll
  for (int g = 0; g < NG; ++g) {
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) sums[g][r] = T(0);
  }
  for (int64_t k = lane; k < K; k += kWarpSize) {
    T xv[kRowTile];
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) xv[r] = x[r] ? static_cast<T>(x[r][k]) : T(0);
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      const T wv = w[g * K + k];
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) sums[g][r] = fused_multiply_add(wv, xv[r], sums[g][r]);
    }
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int g = 0; g < NG; ++g) {
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) sums[g][r] += __shfl_xor_sync(0xffffffffu, sums[g][r], offset);
    }
  }
}

// sums[g][r] for r = lane, without a dynamically indexed register array.
template <typename T, int NG>
__device__ __forceinline__ T lane_sum(const T (&sums)[NG][kRowTile], int g, int lane) {
  T v = sums[g][0];
#pragma unroll
  for (int r = 1; r < kRowTile; ++r) v = lane == r ? sums[g][r] : v;
  return v;
}

// Copies rows [row0, row0 + rows) x columns [col0, col0 + cols) of a row-major [*, ld] global
// matrix into shared memory as [rows][cols] (transpose = false) or [cols][rows] (transpose =
// true), with every thread of the block.
template <typename T>
__device__ __forceinline__ void load_weight_slice(const dptr<T>& dst, const dptr<const T>& src, int64_t ld,
                                                  int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                                                  bool transpose) {
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    const T v = src[(row0 + r) * ld + col0 + c];
    if (transpose) {
      dst[c * rows + r] = v;
    } else {
      dst[i] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T>
struct PersistentForwardArgs {
  int64_t steps = 0, hidden = 0, width = 0;   // T, H, P
  int64_t units_per_block = 0;                // U: hidden units of each block
  int64_t cols_per_block = 0;                 // Pc: columns of h_t = W_hr r_t per block (projection)
  dptr<const int64_t> plan = nullptr;         // [T, kPlanColumns] in the order of computation
  dptr<const T> gates_x = nullptr;            // [N, G*H]  x W_ih^T + b_ih
  dptr<const T> w_hh = nullptr;               // [G*H, P]
  dptr<const T> bias = nullptr;               // [G*H]     b_hh (zeros for a layer without bias)
  dptr<const T> w_hr = nullptr;               // [P, H]    LSTM projection, or null
  dptr<const T> h0 = nullptr;                 // [B, P]
  dptr<T> h_state = nullptr;                  // [B, P]    in: h0; out: h_n
  dptr<T> c_state = nullptr;                  // [B, H]    LSTM: in: c0; out: c_n
  dptr<T> r_scratch = nullptr;                // [B, H]    LSTM projection: r_t = o tanh(c_t) of the step
  dptr<T> output = nullptr;                   // [N, P]
  dptr<T> workspace = nullptr;                // [N, 5H] (LSTM) / [N, 4H] (GRU), or null in inference
  Storage storage = Storage::Same;
};

// The element functions' arguments for one step of a persistent forward (row pointers at the
// step's first row), and the call of the cell's element function with the step's recurrent sums
// gh[g] = (h_{t-1} W_hh^T)[row, g*H + j]; shared by the FMA and the tensor-core kernels.
template <typename T, Cell cell>
struct ForwardStep {
  LstmForwardArgs<T> lstm;
  GruForwardArgs<T> gru;
  RnnForwardArgs<T> rnn;

  __device__ __forceinline__ ForwardStep(const PersistentForwardArgs<T>& a, const PlannedStep& st) {
    const int64_t H = a.hidden, P = a.width;
    const bool proj = static_cast<bool>(a.w_hr);
    if constexpr (cell == Cell::Lstm) {
      lstm.rows = st.rows;
      lstm.hidden = H;
      lstm.gates_x = a.gates_x + st.offset * 4 * H;
      lstm.bias = a.bias;
      lstm.c_state = a.c_state;
      lstm.r_out = proj ? a.r_scratch : a.h_state;
      lstm.h_copy = proj ? dptr<T>(nullptr) : a.output + st.offset * P;
      lstm.workspace = a.workspace ? a.workspace + st.offset * 5 * H : dptr<T>(nullptr);
      lstm.storage = proj ? Storage::Same : a.storage;
    } else if constexpr (cell == Cell::Gru) {
      gru.rows = st.rows;
      gru.hidden = H;
      gru.gates_x = a.gates_x + st.offset * 3 * H;
      gru.bias = a.bias;
      gru.h_state = a.h_state;
      gru.h_copy = a.output + st.offset * H;
      gru.workspace = a.workspace ? a.workspace + st.offset * 4 * H : dptr<T>(nullptr);
      gru.storage = a.storage;
    } else {
      rnn.rows = st.rows;
      rnn.hidden = H;
      rnn.gates_x = a.gates_x + st.offset * H;
      rnn.bias = a.bias;
      rnn.h_state = a.h_state;
      rnn.h_copy = a.output + st.offset * H;
      rnn.storage = a.storage;
    }
  }

  __device__ __forceinline__ void apply(int64_t row, int64_t j, const T (&gh)[gates_of<cell>()]) const {
    if constexpr (cell == Cell::Lstm) {
      lstm_forward_element(lstm, row, j, gh[0], gh[1], gh[2], gh[3]);
    } else if constexpr (cell == Cell::Gru) {
      gru_forward_element(gru, row, j, gh[0], gh[1], gh[2]);
    } else {
      rnn_forward_element<T, activation_of<cell>()>(rnn, row, j, gh[0]);
    }
  }
};

// Dynamic shared memory: the block's W_hh rows [U][G][P] (unit-major, so one warp item reads the
// G rows of one unit), then with a projection its W_hr rows [Pc][H].
template <typename T, Cell cell>
__global__ void __launch_bounds__(kPersistentThreads) persistent_forward_kernel(const PersistentForwardArgs<T> a) {
  constexpr int G = gates_of<cell>();
  RNNFUSED_DYNAMIC_SHARED(T, smem);
  const int64_t H = a.hidden, P = a.width;
  const bool proj = static_cast<bool>(a.w_hr);
  const Slice units = block_slice(H, a.units_per_block);
  const Slice cols = block_slice(P, a.cols_per_block);
  const dptr<T> w_slice = smem;
  const dptr<T> wr_slice = smem + a.units_per_block * G * P;
  for (int g = 0; g < G; ++g) {
    // W_hh rows g*H + u0 .. g*H + u0 + U, stored at [u][g][:].
    for (int64_t i = threadIdx.x; i < units.size * P; i += blockDim.x) {
      const int64_t u = i / P, k = i - u * P;
      w_slice[(u * G + g) * P + k] = a.w_hh[(g * H + units.begin + u) * P + k];
    }
  }
  if (proj) load_weight_slice<T>(wr_slice, a.w_hr, H, cols.begin, cols.size, 0, H, false);
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  for (int64_t s = 0; s < a.steps; ++s) {
    const PlannedStep st = planned_step(a.plan, s);
    const int64_t tiles = (st.rows + kRowTile - 1) / kRowTile;
    const ForwardStep<T, cell> step(a, st);
    // Phase 1: the block's units. h_{t-1} of a row is the previous step's output row, or h0 for a
    // row that starts at this step; warps take (unit, row tile) items, unit fastest, so the warps
    // of a block read the same rows of h_{t-1} at once (L1 hits).
    for (int64_t item = warp; item < units.size * tiles; item += warps) {
      const int64_t u = item % units.size, r0 = (item / units.size) * kRowTile;
      dptr<const T> x[kRowTile];
      for (int r = 0; r < kRowTile; ++r) {
        const int64_t row = r0 + r;
        x[r] = row >= st.rows                ? dptr<const T>(nullptr)
               : row < st.rows_from_prev     ? dptr<const T>(a.output + (st.prev_offset + row) * P)
                                             : a.h0 + row * P;
      }
      T sums[G][kRowTile];
      warp_dot<T, G>(w_slice + u * G * P, P, x, lane, sums);
      const int64_t row = r0 + lane;
      if (lane < kRowTile && row < st.rows) {
        T gh[G];
        for (int g = 0; g < G; ++g) gh[g] = lane_sum(sums, g, lane);
        step.apply(row, units.begin + u, gh);
      }
    }
    if (proj) {
      // Phase 2: h_t = r_t W_hr^T for the block's columns, once every block's r_t is written.
      grid_sync();
      StoreStateArgs<T> store;
      store.h_state = a.h_state;
      store.h_copy = a.output + st.offset * P;
      store.storage = a.storage;
      for (int64_t item = warp; item < cols.size * tiles; item += warps) {
        const int64_t p = item % cols.size, r0 = (item / cols.size) * kRowTile;
        dptr<const T> x[kRowTile];
        for (int r = 0; r < kRowTile; ++r) {
          x[r] = r0 + r < st.rows ? dptr<const T>(a.r_scratch + (r0 + r) * H) : dptr<const T>(nullptr);
        }
        T sums[1][kRowTile];
        warp_dot<T, 1>(wr_slice + p * H, H, x, lane, sums);
        const int64_t row = r0 + lane;
        if (lane < kRowTile && row < st.rows) store_state_element(store, row * P + cols.begin + p, lane_sum(sums, 0, lane));
      }
    }
    // Step s + 1 reads every block's h_t (and, with a projection, overwrites r_scratch).
    if (s + 1 < a.steps) grid_sync();
  }
}

// ---------------------------------------------------------------------------------------------
// Forward on tensor cores (bfloat16 / float16, no projection)
// ---------------------------------------------------------------------------------------------
//
// The same step as persistent_forward_kernel, with the recurrent product on mma.sync m16n8k16:
// A = 16 rows of the block's W_hh slice (16-bit, in shared memory), B = 8 batch rows of h_{t-1}
// (k x n; h_t is stored rounded to the 16-bit dtype, so converting it back is exact), float32
// accumulation: the numbers of the standard path's 16-bit GEMM, up to summation order. An A tile
// holds the G gate rows of kMmaUnits = 16 / G units (GRU: 5 units, one zero row); K is padded
// with zeros to a multiple of 16. When there are fewer (tile, batch tile) pairs than warps, the K
// steps are split over warps too; the partial tiles go to shared memory and the pointwise phase
// adds them in a fixed order, so results are deterministic.

constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;
// Row stride padding of the A tiles (in 16-bit elements): 16 bytes, so that the 8 rows one
// fragment load touches fall in different shared-memory banks.
constexpr int kMmaRowPad = 8;

template <Cell cell>
constexpr int mma_units_per_tile() {
  return kMmaM / gates_of<cell>();
}

template <typename In>
__device__ __forceinline__ uint32_t pack_lowp_pair(float lo, float hi) {
  return static_cast<uint32_t>(In(lo).x) | (static_cast<uint32_t>(In(hi).x) << 16);
}

// How a step's product is split over the warps of a block; the host sizes the scratch with
// the same function at the batch of the call.
struct MmaSplit {
  int64_t m_tiles, n_tiles, k_steps, k_split;
  __host__ __device__ int64_t items() const { return m_tiles * n_tiles * k_split; }
};

__host__ __device__ inline MmaSplit mma_split(int64_t units, int64_t units_per_tile, int64_t rows, int64_t width,
                                              int64_t warps) {
  MmaSplit s;
  s.m_tiles = (units + units_per_tile - 1) / units_per_tile;
  s.n_tiles = (rows + kMmaN - 1) / kMmaN;
  s.k_steps = (width + kMmaK - 1) / kMmaK;
  const int64_t pairs = s.m_tiles * s.n_tiles;
  s.k_split = pairs > 0 && pairs < warps ? warps / pairs : 1;
  if (s.k_split > s.k_steps) s.k_split = s.k_steps > 0 ? s.k_steps : 1;
  return s;
}

template <typename In>
struct PersistentMmaArgs {
  PersistentForwardArgs<float> base;  // everything but W_hh, float32 buffers (w_hh / w_hr unused)
  dptr<const In> w_hh = nullptr;      // [G*H, P] in the 16-bit dtype
};

// Dynamic shared memory: the A tiles [m_tiles][16][Kp + kMmaRowPad] (16-bit), then the partial
// product tiles [items][16][8] (float32).
template <typename In, Cell cell>
__global__ void __launch_bounds__(kPersistentThreads) persistent_forward_mma_kernel(const PersistentMmaArgs<In> m) {
  constexpr int G = gates_of<cell>();
  constexpr int kUnitsPerTile = mma_units_per_tile<cell>();
  const PersistentForwardArgs<float>& a = m.base;
  RNNFUSED_DYNAMIC_SHARED(In, smem);
  const int64_t H = a.hidden, P = a.width;
  const Slice units = block_slice(H, a.units_per_block);
  const int64_t max_m_tiles = (a.units_per_block + kUnitsPerTile - 1) / kUnitsPerTile;
  const int64_t k_steps = (P + kMmaK - 1) / kMmaK;
  const int64_t ld = k_steps * kMmaK + kMmaRowPad;
  const dptr<In> tiles = smem;
  const dptr<float> partial = ptr_cast<float>(smem + max_m_tiles * kMmaM * ld);
  // A tile rows: row r of tile mt is gate r % G of unit mt * kUnitsPerTile + r / G; rows past the
  // block's units, the GRU's 16th row and the K padding are zeros.
  for (int64_t i = threadIdx.x; i < max_m_tiles * kMmaM * ld; i += blockDim.x) {
    const int64_t row = i / ld, k = i - row * ld;
    const int64_t mt = row / kMmaM, r = row - mt * kMmaM;
    const int64_t u = mt * kUnitsPerTile + r / G;
    const bool valid = r < kUnitsPerTile * G && u < units.size && k < P;
    tiles[i] = valid ? static_cast<In>(m.w_hh[((r % G) * H + units.begin + u) * P + k]) : In(0.f);
  }
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int group = lane / 4, tig = lane % 4;
  const int64_t warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  for (int64_t s = 0; s < a.steps; ++s) {
    const PlannedStep st = planned_step(a.plan, s);
    const MmaSplit split = mma_split(units.size, kUnitsPerTile, st.rows, P, warps);
    // Phase 1: partial products, one (A tile, batch tile, K chunk) item per warp at a time.
    for (int64_t item = warp; item < split.items(); item += warps) {
      const int64_t ks = item % split.k_split, pair = item / split.k_split;
      const int64_t nt = pair % split.n_tiles, mt = pair / split.n_tiles;
      const int64_t k_begin = ks * split.k_steps / split.k_split, k_end = (ks + 1) * split.k_steps / split.k_split;
      // This lane's batch row of the B fragment (n = group) and where its h_{t-1} is.
      const int64_t row = nt * kMmaN + group;
      const dptr<const float> h_row = row >= st.rows            ? dptr<const float>(nullptr)
                                      : row < st.rows_from_prev ? dptr<const float>(a.output + (st.prev_offset + row) * P)
                                                                : a.h0 + row * P;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t kt = k_begin; kt < k_end; ++kt) {
        const int64_t k0 = kt * kMmaK;
        uint32_t afrag[4], bfrag[2];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t r = mt * kMmaM + group + 8 * (j % 2), c = k0 + 2 * tig + 8 * (j / 2);
          afrag[j] = ptr_cast<uint32_t>(tiles + r * ld + c)[0];
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t k = k0 + 2 * tig + 8 * j;
          const float lo = h_row && k < P ? static_cast<float>(h_row[k]) : 0.f;
          const float hi = h_row && k + 1 < P ? static_cast<float>(h_row[k + 1]) : 0.f;
          bfrag[j] = pack_lowp_pair<In>(lo, hi);
        }
        mma_m16n8k16<In>(acc, afrag, bfrag, acc);
      }
      const dptr<float> out = partial + item * kMmaM * kMmaN;
#pragma unroll
      for (int i = 0; i < 4; ++i) out[(group + 8 * (i / 2)) * kMmaN + 2 * tig + i % 2] = acc[i];
    }
    __syncthreads();
    // Phase 2: the cell update of each (row, unit), adding the K chunks in order.
    const ForwardStep<float, cell> step(a, st);
    for (int64_t e = threadIdx.x; e < st.rows * units.size; e += blockDim.x) {
      const int64_t row = e / units.size, u = e - row * units.size;
      const int64_t mt = u / kUnitsPerTile, r0 = (u - mt * kUnitsPerTile) * G;
      const int64_t nt = row / kMmaN, col = row - nt * kMmaN;
      float gh[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float sum = 0.f;
        for (int64_t ks = 0; ks < split.k_split; ++ks) {
          sum += partial[((mt * split.n_tiles + nt) * split.k_split + ks) * kMmaM * kMmaN + (r0 + g) * kMmaN + col];
        }
        gh[g] = sum;
      }
      step.apply(row, units.begin + u, gh);
    }
    // Step s + 1 reads every block's h_t, and overwrites the partial tiles.
    if (s + 1 < a.steps) grid_sync();
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename T>
struct PersistentBackwardArgs {
  int64_t steps = 0, hidden = 0, width = 0;   // T, H, P
  int64_t units_per_block = 0;                // U: hidden units of each block (pointwise phase)
  int64_t cols_per_block = 0;                 // Pc: columns of dL/dh_{t-1} per block; = U without
                                              //   a projection, so both phases touch the same columns
  dptr<const int64_t> plan = nullptr;         // [T, kPlanColumns] in the order of the forward
  dptr<const T> w_hh = nullptr;               // [G*H, P]
  dptr<const T> w_hr = nullptr;               // [P, H]    LSTM projection, or null
  dptr<const T> workspace = nullptr;          // [N, 5H] (LSTM) / [N, 4H] (GRU)
  dptr<const T> output = nullptr;             // [N, P]    forward output (RNN: h_t)
  dptr<const T> h_prev = nullptr;             // [N, H]    GRU: h_{t-1} of every row
  dptr<const T> c0 = nullptr;                 // [B, H]    LSTM
  dptr<const T> grad_output = nullptr;        // [N, P]    or null (without a projection)
  dptr<T> dh_state = nullptr;                 // [B, P]    in: dL/dh_n; out: dL/dh0 (without a projection)
  dptr<T> dc_state = nullptr;                 // [B, H]    LSTM: in: dL/dc_n; out: dL/dc0
  dptr<T> grad_h_rows = nullptr;              // [N, P]    LSTM projection: dL/dh_t of every row (in:
                                              //   dL/doutput + dL/dh_n; the loop adds dG W_hh)
  dptr<T> grad_h0 = nullptr;                  // [B, P]    LSTM projection: out: dL/dh0
  dptr<T> grad_r = nullptr;                   // [B, H]    LSTM projection: dL/dr_t of the step
  dptr<T> r_rows = nullptr;                   // [N, H]    LSTM projection: out: r_t = o tanh(c_t)
  dptr<T> grad_gates = nullptr;               // [N, G*H]  out: dL/d pre-activations (GRU: of gates_x)
  dptr<T> grad_gates_h = nullptr;             // [N, 3H]   GRU: out: dL/d(h W_hh^T + b_hh)
};

// Dynamic shared memory: the block's columns of W_hh as [Pc][G*H] (W_hh^T rows), then with a
// projection its W_hr columns as [U][P] (W_hr^T rows).
template <typename T, Cell cell>
__global__ void __launch_bounds__(kPersistentThreads) persistent_backward_kernel(const PersistentBackwardArgs<T> a) {
  constexpr int G = gates_of<cell>();
  RNNFUSED_DYNAMIC_SHARED(T, smem);
  const int64_t H = a.hidden, P = a.width, GH = G * H;
  const bool proj = static_cast<bool>(a.w_hr);
  const Slice units = block_slice(H, a.units_per_block);
  const Slice cols = block_slice(P, a.cols_per_block);
  const dptr<T> wt_slice = smem;
  const dptr<T> wrt_slice = smem + a.cols_per_block * GH;
  load_weight_slice<T>(wt_slice, a.w_hh, P, 0, GH, cols.begin, cols.size, true);
  if (proj) load_weight_slice<T>(wrt_slice, a.w_hr, H, 0, P, units.begin, units.size, true);
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  const dptr<const T> grad_gates_for_product = cell == Cell::Gru ? a.grad_gates_h : a.grad_gates;
  for (int64_t s = a.steps - 1; s >= 0; --s) {
    const PlannedStep st = planned_step(a.plan, s);
    const int64_t tiles = (st.rows + kRowTile - 1) / kRowTile;
    // Phase A: the pointwise backward of the block's units.
    if constexpr (cell == Cell::Lstm) {
      LstmBackwardArgs<T> lstm;
      lstm.rows = st.rows;
      lstm.hidden = H;
      lstm.workspace = a.workspace + st.offset * 5 * H;
      lstm.prev_workspace =
          st.rows_from_prev > 0 ? a.workspace + st.prev_offset * 5 * H : dptr<const T>(nullptr);
      lstm.rows_from_prev = st.rows_from_prev;
      lstm.c0 = a.c0;
      lstm.dc_state = a.dc_state;
      lstm.grad_gates = a.grad_gates + st.offset * 4 * H;
      if (proj) {
        // dL/dr_t = dL/dh_t W_hr for the block's units (a dot product over P per element), each
        // finished by the lane that computed it.
        lstm.grad_r = a.grad_r;
        lstm.r_out = a.r_rows + st.offset * H;
        for (int64_t item = warp; item < units.size * tiles; item += warps) {
          const int64_t u = item % units.size, r0 = (item / units.size) * kRowTile;
          dptr<const T> x[kRowTile];
          for (int r = 0; r < kRowTile; ++r) {
            x[r] = r0 + r < st.rows ? dptr<const T>(a.grad_h_rows + (st.offset + r0 + r) * P)
                                    : dptr<const T>(nullptr);
          }
          T sums[1][kRowTile];
          warp_dot<T, 1>(wrt_slice + u * P, P, x, lane, sums);
          const int64_t row = r0 + lane;
          if (lane < kRowTile && row < st.rows) {
            const int64_t j = units.begin + u;
            a.grad_r[row * H + j] = lane_sum(sums, 0, lane);
            lstm_backward_element(lstm, row, j);
          }
        }
      } else {
        lstm.grad_r = a.dh_state;
        lstm.grad_r_extra = a.grad_output ? a.grad_output + st.offset * P : dptr<const T>(nullptr);
        for (int64_t i = threadIdx.x; i < st.rows * units.size; i += blockDim.x) {
          lstm_backward_element(lstm, i / units.size, units.begin + i % units.size);
        }
      }
    } else if constexpr (cell == Cell::Gru) {
      GruBackwardArgs<T> gru;
      gru.rows = st.rows;
      gru.hidden = H;
      gru.workspace = a.workspace + st.offset * 4 * H;
      gru.h_prev = a.h_prev + st.offset * H;
      gru.grad_output = a.grad_output ? a.grad_output + st.offset * H : dptr<const T>(nullptr);
      gru.dh_state = a.dh_state;
      gru.grad_gates_x = a.grad_gates + st.offset * 3 * H;
      gru.grad_gates_h = a.grad_gates_h + st.offset * 3 * H;
      for (int64_t i = threadIdx.x; i < st.rows * units.size; i += blockDim.x) {
        gru_backward_element(gru, i / units.size, units.begin + i % units.size);
      }
    } else {
      RnnBackwardArgs<T> rnn;
      rnn.rows = st.rows;
      rnn.hidden = H;
      rnn.h = a.output + st.offset * H;
      rnn.grad_output = a.grad_output ? a.grad_output + st.offset * H : dptr<const T>(nullptr);
      rnn.dh_state = a.dh_state;
      rnn.grad_gates = a.grad_gates + st.offset * H;
      for (int64_t i = threadIdx.x; i < st.rows * units.size; i += blockDim.x) {
        rnn_backward_element<T, activation_of<cell>()>(rnn, i / units.size, units.begin + i % units.size);
      }
    }
    // Phase B needs every block's dG_t.
    grid_sync();
    // Phase B: dL/dh_{t-1}[:, k] = dG_t W_hh[:, k] for the block's columns k.
    for (int64_t item = warp; item < cols.size * tiles; item += warps) {
      const int64_t kk = item % cols.size, r0 = (item / cols.size) * kRowTile;
      dptr<const T> x[kRowTile];
      for (int r = 0; r < kRowTile; ++r) {
        x[r] = r0 + r < st.rows ? grad_gates_for_product + (st.offset + r0 + r) * GH : dptr<const T>(nullptr);
      }
      T sums[1][kRowTile];
      warp_dot<T, 1>(wt_slice + kk * GH, GH, x, lane, sums);
      const int64_t row = r0 + lane;
      if (lane < kRowTile && row < st.rows) {
        const int64_t k = cols.begin + kk;
        const T sum = lane_sum(sums, 0, lane);
        if (proj) {
          // Into the rows of the step before (their dL/dh_{t-1}), or dL/dh0 for rows that start here.
          if (row < st.rows_from_prev) {
            a.grad_h_rows[(st.prev_offset + row) * P + k] += sum;
          } else {
            a.grad_h0[row * P + k] = sum;
          }
        } else if (cell == Cell::Gru) {
          a.dh_state[row * P + k] += sum;  // the pointwise phase left dh_t * z there
        } else {
          a.dh_state[row * P + k] = sum;
        }
      }
    }
    // The next step's pointwise phase reads dL/dh_{t-1}: without a projection only the block's
    // own columns (= its units), written by this block; with one, every block's columns.
    if (proj) {
      grid_sync();
    } else {
      __syncthreads();
    }
  }
}

}  // namespace rnnfused::cuda
