// Implementation of the fused CPU recurrence engine declared in engine.h, written once on
// at::vec::Vectorized and compiled once per instruction set (included by pointwise_default.cpp,
// pointwise_avx2.cpp and pointwise_avx512.cpp after pointwise_impl.h, whose Lanes and CellOps it
// uses).
//
// Register tiles. A tile is R rows x U unit blocks x G gates of accumulators (one vector each),
// filled by a k loop that loads the U*G weight vectors of step k once and multiplies them by the
// broadcast h_{t-1}[row][k] of every row. R and U are chosen so the accumulators and the reused
// weight vectors fit the ISA's vector registers (16 on AVX2, 32 on AVX-512): several rows when
// the batch has them (and several blocks too where G = 1, the backward's dh = dG W_hh and the
// Elman forward); for one row, several blocks so that enough independent FMA chains are in
// flight. When a block's panel is larger than the first-level cache budget and several row tiles
// reuse it, the k loop runs in chunks and the partial sums wait in a small per-slice buffer (same
// order of additions: the result is the same).
#pragma once

#ifndef RNNFUSED_ISA
#error "define RNNFUSED_ISA before including engine_impl.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cell_math.h"
#include "blas.h"
#include "engine.h"
#include "team.h"

namespace rnnfused::cpu::RNNFUSED_ISA {
namespace engine {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// Register tiles of several rows: R rows x U blocks x G gates of accumulators, and either the
// U*G weight vectors of step k reused by every row plus one broadcast (R*U*G + U*G + 1 registers),
// or, where those do not fit, the R broadcasts of step k held while each weight vector is loaded
// once and used by every row (R*U*G + R + 1; run_tile picks the order that fits).
//   AVX-512 (32): G=4: 6x1 (29)   G=3: 8x1 (28)   G=1: 6x4 (29)
//   AVX2    (16): G=4: 3x1 (16, broadcasts held)   G=3: 4x1 (16)   G=1: 4x3 (16)
// The AVX2 LSTM tile had 2 rows (8 accumulators, 13 registers) until 2026-11-30: 8 FMA chains do
// not hide the FMA latency on two FMA pipes. With 3 rows (12 chains; no spills in the compiled
// loop) on an AMD EPYC (Zen 3, 2 threads, eval forward, T = 100, H = I = 256, register tiles, the
// GEMM first), speedup over torch.nn in the same process: B = 16 0.64x -> 0.83x, B = 8 0.82x ->
// 0.95x, B = 2 1.24x -> 1.30x (before and after in two runs). Not measured on an Intel processor.
// A row count of 3n + 1 ends in a 1-row tile (4 FMA chains); splitting the last 4 rows as 2 + 2
// instead measured slower there (eval forward, T = 100, H = I = 256: B = 16 17.6 -> 19.9 ms, B = 4
// 5.8 -> 6.5 ms, medians of six alternating processes, 2026-11-30), so multiply_blocks keeps it.
template <int G>
constexpr int kTileRows = kVectorRegisters == 32 ? (G == 4 ? 6 : G == 3 ? 8 : 6) : (G == 4 ? 3 : G == 3 ? 4 : 4);
// Whether a tile of R rows x U blocks keeps the step's weight vectors in registers (else it holds
// the rows' broadcasts).
template <int G, int R, int U>
constexpr bool kTileHoldsWeights = R * U * G + U * G + 1 <= kVectorRegisters;
template <int G>
constexpr int kTileBlocks = kVectorRegisters == 32 ? (G == 1 ? 4 : 1) : (G == 1 ? 3 : 1);
// Tiles of one row: the weights go straight from memory into the FMA; U*G accumulators, as many
// independent FMA chains as the registers allow (the k loop is bound by the cache's bandwidth).
constexpr int clamp_tile(int v) { return v < 1 ? 1 : (v > 8 ? 8 : v); }
template <int G>
constexpr int kMaxTileBlocks = clamp_tile((kVectorRegisters - 2) / G);

// Bytes that a chunk of the k loop may touch: the block's panel rows and the chunk of every
// input row (they are all reused while the row tiles of the block go by); about 2/3 of a 48 KiB L1.
constexpr int64_t kChunkBytes = 32 * 1024;

template <typename T>
using Vec = at::vec::Vectorized<T>;

// For the callables that do nothing but __builtin_prefetch (multiply_blocks' `prefetch`). To GCC
// that builtin has no side effects: a prefetching lambda that is not inlined early is found
// `const` by its interprocedural analysis, and every call to it is deleted. Until 2026-11-30 the
// forward's gates_x prefetch was in no build (not one prefetch instruction in the library); in a
// copy of the forward loop timed in one process against a loop of its own (Elman RNN, B = 16,
// H = 256, one thread, AMD EPYC Zen 3), the step went from 25-40% slower than that loop to 12-20%.
// Inlined into multiply_blocks, which stores, the prefetches stay. (An asm statement instead
// kept them too, but changed the inliner's choices: the tiles' k loop then zeroed its weight
// registers in memory on every k, three times slower.)
#if defined(__GNUC__)
#define RNNFUSED_ALWAYS_INLINE __attribute__((always_inline))
#else
#define RNNFUSED_ALWAYS_INLINE
#endif

template <typename T>
constexpr int64_t kLanes = Vec<T>::size();

// Calls f(std::integral_constant<int, n>) for the runtime n in [1, Max].
template <int Max, typename F>
inline void with_constant(int n, const F& f) {
  if constexpr (Max >= 1) {
    if (n == Max) {
      f(std::integral_constant<int, Max>{});
    } else {
      with_constant<Max - 1>(n, f);
    }
  }
}

// Panels of the unit blocks [b0, b1): panel_b[k][g][lane] = rows[g * gate_stride + b*V + lane][k]
// for k < K (zero for units at or past `units`). `rows` is row-major with row stride K.
//   forward: rows = W_hh [G*H, H], gate_stride = H, K = H (h_{t-1} W_hh^T, G gates). The backward
//   multiplies by W_hh itself and packs columns instead (pack_column_panels).
// at::vec's run-time-sized transpose shuffles 16x16 blocks on AVX-512 but copies element by element
// elsewhere: on AVX2, full blocks of 8 units go through its 8x8 shuffle instead, 8 values of k at a
// time for all G gates, so that each panel line is written whole at once. Element by element,
// packing W_hh and W_ih (H = I = 256) took about 15% of an LSTM's batch-1 forward (T = 100) on an
// AMD EPYC (Zen 3), 2% at B = 16.
template <typename T, int G>
void pack_row_panels(const T* rows, int64_t gate_stride, int64_t units, int64_t K, int64_t b0, int64_t b1,
                     T* panels) {
  constexpr int64_t V = kLanes<T>;
  for (int64_t b = b0; b < b1; ++b) {
    T* panel = panels + b * K * G * V;
    const int valid = static_cast<int>(std::min<int64_t>(V, units - b * V));
    int64_t k0 = 0;  // panel rows [0, k0) are packed
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      if (valid == 8) {
        for (; k0 + 8 <= K; k0 += 8) {
          for (int g = 0; g < G; ++g) {
            at::vec::transpose_mxn<float, 8, 8>(rows + (g * gate_stride + b * V) * K + k0, K,
                                                panel + (k0 * G + g) * V, G * V);
          }
        }
      }
    }
#endif
    if (k0 == K) continue;
    for (int g = 0; g < G; ++g) {
      // [valid units][K - k0] -> [K - k0][lanes] at row stride G*V.
      at::vec::transpose_mxn<T>(rows + (g * gate_stride + b * V) * K + k0, K, panel + (k0 * G + g) * V, G * V,
                                valid, static_cast<int>(K - k0));
      for (int64_t k = k0; k < K; ++k) {
        for (int64_t lane = valid; lane < V; ++lane) panel[(k * G + g) * V + lane] = T(0);
      }
    }
  }
}

// Panels of the column blocks [b0, b1) of a row-major matrix M [K, units] (row stride ld):
// panel_b[k][lane] = M[k][b*V + lane] (zero past `units`). The backward's W_hh [G*H, H]:
// dL/dh_{t-1} = dG W_hh, K = G*H.
template <typename T>
void pack_column_panels(const T* m, int64_t ld, int64_t units, int64_t K, int64_t b0, int64_t b1, T* panels) {
  constexpr int64_t V = kLanes<T>;
  for (int64_t b = b0; b < b1; ++b) {
    T* panel = panels + b * K * V;
    const int64_t valid = std::min<int64_t>(V, units - b * V);
    for (int64_t k = 0; k < K; ++k) {
      const T* src = m + k * ld + b * V;
      T* dst = panel + k * V;
      for (int64_t lane = 0; lane < valid; ++lane) dst[lane] = src[lane];
      for (int64_t lane = valid; lane < V; ++lane) dst[lane] = T(0);
    }
  }
}

// One register tile: rows a[0..R) (each a pointer to K values) times the panels of U consecutive
// blocks (panel stride `block_stride`), k in [k0, k1). `partial` [R][U][G][V] holds the sums
// between chunks; `first`/`last` say whether this chunk starts / ends the k range. On the last
// chunk finish(r, u, acc) receives the G accumulators of row r, block u of the tile.
template <typename T, int G, int R, int U, typename Finish>
inline void run_tile(const T* const* a, int64_t k0, int64_t k1, bool first, bool last, const T* panel,
                     int64_t block_stride, T* partial, const Finish& finish) {
  constexpr int64_t V = kLanes<T>;
  // at::vec's Vectorized() zeroes its register; an array of them whose address reaches finish
  // (not always inlined) was zeroed in memory with `rep stos` before every tile, then overwritten.
  // The union leaves the accumulators unconstructed; every one is assigned below before use.
  union Accumulators {
    Vec<T> v[R][U][G];
    Accumulators() {}
  } accumulators;
  auto& acc = accumulators.v;
#pragma GCC unroll 64
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 64
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 64
      for (int g = 0; g < G; ++g)
        acc[r][u][g] = first ? Vec<T>(T(0)) : Vec<T>::loadu(partial + ((r * U + u) * G + g) * V);
  const T* ap[R];
#pragma GCC unroll 64
  for (int r = 0; r < R; ++r) ap[r] = a[r];
  for (int64_t k = k0; k < k1; ++k) {
    const T* w = panel + k * G * V;
    if constexpr (R == 1) {
      const Vec<T> x(ap[0][k]);
#pragma GCC unroll 64
      for (int u = 0; u < U; ++u)
#pragma GCC unroll 64
        for (int g = 0; g < G; ++g)
          acc[0][u][g] = at::vec::fmadd(Vec<T>::loadu(w + u * block_stride + g * V), x, acc[0][u][g]);
    } else if constexpr (kTileHoldsWeights<G, R, U>) {
      Vec<T> wv[U][G];
#pragma GCC unroll 64
      for (int u = 0; u < U; ++u)
#pragma GCC unroll 64
        for (int g = 0; g < G; ++g) wv[u][g] = Vec<T>::loadu(w + u * block_stride + g * V);
#pragma GCC unroll 64
      for (int r = 0; r < R; ++r) {
        const Vec<T> x(ap[r][k]);
#pragma GCC unroll 64
        for (int u = 0; u < U; ++u)
#pragma GCC unroll 64
          for (int g = 0; g < G; ++g) acc[r][u][g] = at::vec::fmadd(wv[u][g], x, acc[r][u][g]);
      }
    } else {
      Vec<T> x[R];
#pragma GCC unroll 64
      for (int r = 0; r < R; ++r) x[r] = Vec<T>(ap[r][k]);
#pragma GCC unroll 64
      for (int u = 0; u < U; ++u)
#pragma GCC unroll 64
        for (int g = 0; g < G; ++g) {
          const Vec<T> wv = Vec<T>::loadu(w + u * block_stride + g * V);
#pragma GCC unroll 64
          for (int r = 0; r < R; ++r) acc[r][u][g] = at::vec::fmadd(wv, x[r], acc[r][u][g]);
        }
    }
  }
  if (last) {
#pragma GCC unroll 64
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 64
      for (int u = 0; u < U; ++u) finish(r, u, acc[r][u]);
  } else {
#pragma GCC unroll 64
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 64
      for (int u = 0; u < U; ++u)
#pragma GCC unroll 64
        for (int g = 0; g < G; ++g) acc[r][u][g].store(partial + ((r * U + u) * G + g) * V);
  }
}

// The product of `rows` rows (a[r]: K values each) with the panels of blocks [b0, b1), tile by
// tile; finish(row, block, acc[G]) receives each finished (row, block). prefetch(row, block) is
// called for every (row, block) of a tile before the tile's last k chunk starts, so that what its
// finish will read (the forward's gates_x rows, far out of cache) arrives while the chunk's FMAs run.
template <typename T, int G, typename Finish, typename Prefetch>
void multiply_blocks(const T* const* a, int64_t rows, int64_t K, const T* panels, int64_t b0, int64_t b1,
                     T* partial, const Finish& finish, const Prefetch& prefetch) {
  constexpr int64_t V = kLanes<T>;
  constexpr int kBlocks = kMaxTileBlocks<G>;
  const int64_t block_stride = K * G * V;
  if (rows == 1) {
    // One row: each panel is read once per step; several blocks per tile, no chunks.
    for (int64_t b = b0; b < b1;) {
      const int u_count = static_cast<int>(std::min<int64_t>(kBlocks, b1 - b));
      for (int u = 0; u < u_count; ++u) prefetch(0, b + u);
      with_constant<kBlocks>(u_count, [&](auto u_c) {
        constexpr int U = decltype(u_c)::value;
        run_tile<T, G, 1, U>(a, 0, K, true, true, panels + b * block_stride, block_stride, partial,
                             [&](int, int u, const Vec<T>* acc) { finish(0, b + u, acc); });
      });
      b += u_count;
    }
    return;
  }
  constexpr int kRows = kTileRows<G>;
  constexpr int kGroup = kTileBlocks<G>;
  const int64_t chunk =
      std::max<int64_t>(16, kChunkBytes / ((kGroup * G * V + rows) * static_cast<int64_t>(sizeof(T))));
  for (int64_t b = b0; b < b1;) {
    const int u_count = static_cast<int>(std::min<int64_t>(kGroup, b1 - b));
    const T* panel = panels + b * block_stride;
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
      const int64_t k1 = std::min(K, k0 + chunk);
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        const int r_count = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
        if (k1 == K) {
          for (int r = 0; r < r_count; ++r)
            for (int u = 0; u < u_count; ++u) prefetch(r0 + r, b + u);
        }
        with_constant<kRows>(r_count, [&](auto r_c) {
          with_constant<kGroup>(u_count, [&](auto u_c) {
            constexpr int R = decltype(r_c)::value;
            constexpr int U = decltype(u_c)::value;
            run_tile<T, G, R, U>(a + r0, k0, k1, k0 == 0, k1 == K, panel, block_stride, partial + r0 * U * G * V,
                                 [&](int r, int u, const Vec<T>* acc) { finish(r0 + r, b + u, acc); });
          });
        });
      }
    }
    b += u_count;
  }
}

// Stores h_t into the output row and the state row, rounded to the storage dtype first.
template <typename T>
inline void store_h(const ForwardProblem<T>& p, T* out, T* state, const Vec<T>& h, const Lanes<T>& l) {
  l.store(out, h);
  if constexpr (std::is_same_v<T, float>) {
    if (p.storage == c10::ScalarType::BFloat16) {
      for (int64_t i = 0; i < l.n; ++i) out[i] = static_cast<float>(static_cast<c10::BFloat16>(out[i]));
    } else if (p.storage == c10::ScalarType::Half) {
      for (int64_t i = 0; i < l.n; ++i) out[i] = static_cast<float>(static_cast<c10::Half>(out[i]));
    }
  }
  if (l.n == kLanes<T>) {
    Vec<T>::loadu(out).store(state);
  } else {
    std::memcpy(state, out, l.n * sizeof(T));
  }
}

// The unit blocks of slice s of `slices` (contiguous ranges, sizes differing by at most one).
inline std::pair<int64_t, int64_t> slice_blocks(int64_t blocks, int64_t slices, int64_t s) {
  return {blocks * s / slices, blocks * (s + 1) / slices};
}

inline int64_t team_size(int64_t blocks, int64_t flops_per_step) {
  if (at::in_parallel_region()) return 1;
  const int64_t min_flops = engine_min_flops_per_thread();
  int64_t team = std::min<int64_t>(at::get_num_threads(), blocks);
  if (min_flops > 0) team = std::min(team, std::max<int64_t>(1, flops_per_step / min_flops));
  return std::max<int64_t>(team, 1);
}

// The packed weights of a call, in a buffer that the calling thread keeps for its next calls
// (a fresh multi-megabyte allocation would cost page faults on every call). Uninitialized: the
// packing writes every element.
template <typename T>
T* panel_buffer(int64_t count) {
  static thread_local std::unique_ptr<T[]> buffer;
  static thread_local int64_t capacity = 0;
  if (count > capacity) {
    buffer.reset(new T[count]);
    capacity = count;
  }
  return buffer.get();
}

// A slice's products with BLAS (ForwardProblem::blas_product; Hs: the slice's units).
template <typename T>
struct BlasSlice {
  T* w_hh = nullptr;                      // [G*Hs, H]  the slice's rows of W_hh
  T* w_ih = nullptr;                      // [G*Hs, I]  and of W_ih (with the input)
  T* packed_hh = nullptr;                 // StepWeight's packed forms (where it packs)
  T* packed_ih = nullptr;
  T* gates_h = nullptr;                   // [B, G*Hs]  the step's h_{t-1} W_hh^T (gate g at g*Hs)
  T* gates_x = nullptr;                   // [B, G*Hs]  the step's x W_ih^T (+ b_ih)
  std::unique_ptr<StepWeight<T>> hh, ih;  // prepared for the per-step GEMM
};

// Per-slice buffers: the row pointers of a step and the partial sums of the chunked k loop.
template <typename T>
struct SliceScratch {
  std::vector<const T*> rows;
  std::vector<T> partial;
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// The rows of input projection that the engine computes at a time when it projects the input
// itself (ForwardProblem::input): at most this many bytes of x W_ih^T per chunk of steps (all
// units; each thread writes and reads only its own), so that a thread's part stays in its cache
// between the chunk's projection and the steps that read it.
constexpr int64_t kProjectionChunkBytes = 512 * 1024;
// The rows of input projection that a slice with the BLAS product computes at a time (at least).
constexpr int64_t kBlasProjectionRows = 256;

// Per step and slice: the product h_{t-1} W_hh^T for the slice's units, each finished (row, unit
// block) going into the cell's element function
//   finish_element(row, r, gx, gx_stride, j, lanes, h_prev, acc):
// packed row `row` (batch row r of its step), units [j, j + lanes); gx points at the row's
// gates_x of unit j, gate g at gx + g * gx_stride; h_prev is the row's h_{t-1}; acc[g] the G
// products. Two ways to the product:
// - register tiles (the default): W_hh packed into panels, tile by tile, each tile's sums going
//   straight into the element function. With p.input, every chunk of steps starts with the
//   projection of the chunk's rows for the slice's units (the same tiles, W_ih packed like W_hh).
// - BLAS (p.blas_product): the slice's rows of W_hh (all G gates of its units [j0, j1), Hs of
//   them) gathered into one matrix [G*Hs, H] that StepWeight prepares once (MKL's packed format
//   where libtorch has it); every step one GEMM of the step's h_{t-1} rows into the slice's
//   buffer [B, G*Hs], then the element function over it row by row while it is in the core's
//   cache. With p.input the slice projects the x rows of a chunk of steps (at least
//   kBlasProjectionRows rows) the same way, with its rows of W_ih, into a second buffer at the
//   chunk's first step, so the [N, G*H] projection never goes to memory; without it the element
//   function reads the given gates_x.
template <typename T, int G, typename Finish>
void forward_loop(const ForwardProblem<T>& p, const Finish& finish_element) {
  constexpr int64_t V = kLanes<T>;
  const StepPlan& plan = *p.plan;
  const int64_t H = p.hidden;
  const int64_t I = p.input_size;
  const bool projects = p.input != nullptr;
  const bool blas = p.blas_product;
  const bool blas_project = blas && projects;
  if (blas) count_engine_blas_call();
  const bool tiles_project = projects && !blas;
  const int64_t blocks = (H + V - 1) / V;
  const int64_t steps = plan.steps();
  // Chunks of steps for the register tiles' projection: chunk_row[s] is the first row of step s
  // in its chunk's buffer `projected` [chunk rows, G*H].
  const int64_t chunk_steps =
      tiles_project ? std::max<int64_t>(1, kProjectionChunkBytes / (G * H * static_cast<int64_t>(sizeof(T))) /
                                               std::max<int64_t>(1, plan.batch))
                    : 0;
  std::vector<int64_t> chunk_row(tiles_project ? steps : 0);
  int64_t chunk_rows = 0;
  for (int64_t s = 0, n = 0; tiles_project && s < steps; ++s) {
    if (s % chunk_steps == 0) n = 0;
    chunk_row[s] = n;
    n += plan.batch_sizes[plan.step_at(s)];
    chunk_rows = std::max(chunk_rows, n);
  }
  const int64_t team = team_size(blocks, 2 * plan.batch * G * H * (H + I));
  auto slice_units = [&](int64_t slice) {
    const auto [b0, b1] = slice_blocks(blocks, team, slice);
    return std::make_pair(b0 * V, std::min(H, b1 * V));
  };
  // The BLAS product's projection runs for a chunk of steps at a time (at least
  // kBlasProjectionRows rows: a GEMM of that many rows runs about a quarter faster than one of
  // 64, measured on one core); blas_chunk_rows holds each chunk's rows [first, last) of the input.
  const int64_t blas_chunk_steps =
      blas ? std::max<int64_t>(1, (kBlasProjectionRows + plan.batch - 1) / std::max<int64_t>(1, plan.batch)) : 1;
  std::vector<int64_t> blas_chunk_rows;
  int64_t blas_projection_rows = 0;
  for (int64_t s = 0; blas_project && s < steps; s += blas_chunk_steps) {
    int64_t first = plan.rows, last = 0;
    for (int64_t s2 = s; s2 < std::min(steps, s + blas_chunk_steps); ++s2) {
      const int64_t t = plan.step_at(s2);
      first = std::min(first, plan.offsets[t]);
      last = std::max(last, plan.offsets[t] + plan.batch_sizes[t]);
    }
    blas_chunk_rows.push_back(first);
    blas_chunk_rows.push_back(last);
    blas_projection_rows = std::max(blas_projection_rows, last - first);
  }
  // The BLAS products' buffers, slice after slice (each region 64-byte aligned), carved from
  // `base`; with a null base only counted. Returns the elements they take.
  std::vector<BlasSlice<T>> blas_slices(blas ? team : 0);
  auto carve_blas = [&](T* base) {
    int64_t used = 0;
    auto take = [&](int64_t count) {
      T* region = base != nullptr ? base + used : nullptr;
      used += (count + 15) / 16 * 16;
      return region;
    };
    for (int64_t slice = 0; slice < static_cast<int64_t>(blas_slices.size()); ++slice) {
      const auto [j0, j1] = slice_units(slice);
      const int64_t width = G * (j1 - j0);
      BlasSlice<T>& bs = blas_slices[slice];
      bs.w_hh = take(width * H);
      bs.w_ih = take(blas_project ? width * I : 0);
      bs.packed_hh = take(StepWeight<T>::packed_size(plan.batch, width, H, true));
      bs.packed_ih = take(blas_project ? StepWeight<T>::packed_size(blas_projection_rows, width, I, true) : 0);
      bs.gates_h = take(plan.batch * width);
      bs.gates_x = take(blas_projection_rows * width);
    }
    return used;
  };
  const int64_t blas_size = carve_blas(nullptr);
  const int64_t hh_panel_size = blas ? 0 : blocks * H * G * V;
  const int64_t ih_panel_size = tiles_project ? blocks * I * G * V : 0;
  T* const panels = panel_buffer<T>(hh_panel_size + ih_panel_size + chunk_rows * G * H + blas_size + 16);
  T* const ih_panels = panels + hh_panel_size;
  T* const projected = ih_panels + ih_panel_size;
  carve_blas(reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(projected + chunk_rows * G * H) + 63) &
                                  ~uintptr_t(63)));
  const int64_t tile_rows = std::max(plan.batch, chunk_rows);
  std::vector<SliceScratch<T>> scratch(team);
  for (auto& s : scratch) {
    s.rows.resize(tile_rows);
    if (!blas) s.partial.resize(static_cast<size_t>(tile_rows * kTileBlocks<G> * G * V));
  }
  // What every cell's finish reads from memory, far out of cache: the G gates_x lines of the
  // (row, unit block). The LSTM's cell state and the bias are small enough to stay in cache, and
  // a projection of the engine's own was just written.
  auto prefetch_element = [&](int64_t off, int64_t r, int64_t j) RNNFUSED_ALWAYS_INLINE {
    if (projects) return;
    const T* gx = p.gates_x + (off + r) * G * H + j;
    for (int g = 0; g < G; ++g) __builtin_prefetch(gx + g * H, 0, 3);
  };
  // x W_ih^T (+ b_ih) of the rows of steps [s, s + chunk_steps) for the units of blocks [b0, b1).
  auto project_chunk = [&](SliceScratch<T>& sc, int64_t s, int64_t b0, int64_t b1) {
    int64_t n = 0;
    for (int64_t s2 = s; s2 < std::min(steps, s + chunk_steps); ++s2) {
      const int64_t t = plan.step_at(s2);
      for (int64_t r = 0; r < plan.batch_sizes[t]; ++r) sc.rows[n++] = p.input + (plan.offsets[t] + r) * I;
    }
    multiply_blocks<T, G>(sc.rows.data(), n, I, ih_panels, b0, b1, sc.partial.data(),
                          [&](int64_t row, int64_t b, const Vec<T>* acc) {
                            const int64_t j = b * V;
                            const Lanes<T> l{std::min<int64_t>(V, H - j)};
                            T* dst = projected + row * G * H + j;
                            for (int g = 0; g < G; ++g) {
                              l.store(dst + g * H, p.b_ih ? acc[g] + l.load(p.b_ih + g * H + j) : acc[g]);
                            }
                          },
                          [](int64_t, int64_t) {});
  };
  // The BLAS product's preparation: the slice's rows of `weight` [G*H, K], all G gates of units
  // [j0, j1), gathered into `gathered` [G*Hs, K] and prepared for the step's GEMM.
  auto prepare_blas = [&](const T* weight, int64_t K, int64_t rows, int64_t j0, int64_t j1, T* gathered, T* packed,
                          std::unique_ptr<StepWeight<T>>& product) {
    const int64_t Hs = j1 - j0;
    for (int g = 0; g < G; ++g) std::memcpy(gathered + g * Hs * K, weight + (g * H + j0) * K, Hs * K * sizeof(T));
    product = std::make_unique<StepWeight<T>>(true, rows, G * Hs, K, gathered, K, packed, true);
  };
  // One step of a slice with the BLAS product (rows [rows], a[r]: the rows' h_{t-1}).
  auto blas_step = [&](BlasSlice<T>& bs, int64_t j0, int64_t j1, int64_t s, int64_t off, int64_t rows,
                       int64_t from_prev, const T* const* a) {
    const int64_t Hs = j1 - j0, width = G * Hs;
    T* const gh = bs.gates_h;
    // The rows that continue read the previous step's output rows, the rows that start here h0's:
    // two contiguous blocks of A.
    if (from_prev > 0) bs.hh->multiply(from_prev, a[0], H, T(0), gh, width);
    if (rows > from_prev) bs.hh->multiply(rows - from_prev, a[from_prev], H, T(0), gh + from_prev * width, width);
    // The rows' projection: row r's gate g of unit j at xs + r * x_row + g * x_gate + (j - j0).
    const T* xs = blas_project ? nullptr : p.gates_x + off * G * H + j0;  // gates_x is null with the input
    int64_t x_row = G * H, x_gate = H;
    if (blas_project) {
      // The chunk's projection first (its rows are contiguous: rows [first, last) of the input).
      const int64_t chunk = s / blas_chunk_steps;
      const int64_t first = blas_chunk_rows[2 * chunk], last = blas_chunk_rows[2 * chunk + 1];
      if (s % blas_chunk_steps == 0) {
        T beta = T(0);
        if (p.b_ih) {
          for (int64_t r = 0; r < last - first; ++r) {
            for (int g = 0; g < G; ++g) {
              std::memcpy(bs.gates_x + r * width + g * Hs, p.b_ih + g * H + j0, Hs * sizeof(T));
            }
          }
          beta = T(1);
        }
        bs.ih->multiply(last - first, p.input + first * I, I, beta, bs.gates_x, width);
      }
      xs = bs.gates_x + (off - first) * width;
      x_row = width;
      x_gate = Hs;
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = j0; j < j1; j += V) {
        const Lanes<T> l{std::min<int64_t>(V, j1 - j)};
        Vec<T> acc[G];
        for (int g = 0; g < G; ++g) acc[g] = l.load(gh + r * width + g * Hs + (j - j0));
        finish_element(off + r, r, xs + r * x_row + (j - j0), x_gate, j, l, a[r], acc);
      }
    }
  };
  run_team(
      team, steps,
      [&](int64_t slice) {
        const auto [b0, b1] = slice_blocks(blocks, team, slice);
        if (blas) {
          const auto [j0, j1] = slice_units(slice);
          BlasSlice<T>& bs = blas_slices[slice];
          prepare_blas(p.w_hh, H, plan.batch, j0, j1, bs.w_hh, bs.packed_hh, bs.hh);
          if (blas_project) prepare_blas(p.w_ih, I, blas_projection_rows, j0, j1, bs.w_ih, bs.packed_ih, bs.ih);
          return;
        }
        pack_row_panels<T, G>(p.w_hh, H, H, H, b0, b1, panels);
        if (tiles_project) pack_row_panels<T, G>(p.w_ih, H, H, I, b0, b1, ih_panels);
      },
      [&](int64_t slice, int64_t s) {
        const auto [b0, b1] = slice_blocks(blocks, team, slice);
        const int64_t t = plan.step_at(s);
        const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
        const int64_t from_prev = plan.rows_from_previous(t);
        const int64_t prev = plan.previous_step(t);
        SliceScratch<T>& sc = scratch[slice];
        // (The chunk's projection uses the row pointers for the input rows first.)
        if (tiles_project && s % chunk_steps == 0) project_chunk(sc, s, b0, b1);
        for (int64_t r = 0; r < rows; ++r) {
          sc.rows[r] = r < from_prev ? p.output + (plan.offsets[prev] + r) * H : p.h0 + r * H;
        }
        if (blas) {
          const auto [j0, j1] = slice_units(slice);
          blas_step(blas_slices[slice], j0, j1, s, off, rows, from_prev, sc.rows.data());
          return;
        }
        const T* const gx = tiles_project ? projected + chunk_row[s] * G * H : p.gates_x + off * G * H;
        multiply_blocks<T, G>(sc.rows.data(), rows, H, panels, b0, b1, sc.partial.data(),
                              [&](int64_t r, int64_t b, const Vec<T>* acc) {
                                const int64_t j = b * V;
                                finish_element(off + r, r, gx + r * G * H + j, H, j,
                                               Lanes<T>{std::min<int64_t>(V, H - j)}, sc.rows[r], acc);
                              },
                              [&](int64_t r, int64_t b) RNNFUSED_ALWAYS_INLINE {
                                prefetch_element(off, r, b * V);
                              });
      },
      [](int64_t) { return true; });
}

template <typename T>
void lstm_forward(const ForwardProblem<T>& p) {
  const int64_t H = p.hidden;
  forward_loop<T, 4>(p, [&](int64_t row, int64_t r, const T* gx, int64_t gx_stride, int64_t j, const Lanes<T>& l,
                            const T*, const Vec<T>* acc) {
    const T* bias = p.bias + j;
    auto pre = [&](int g) { return (l.load(gx + g * gx_stride) + acc[g]) + l.load(bias + g * H); };
    T* c = p.c_state + r * H + j;
    const auto a = rnnfused::lstm_forward(pre(0), pre(1), pre(2), pre(3), l.load(c));
    l.store(c, a.c);
    store_h(p, p.output + row * H + j, p.h_state + r * H + j, a.r, l);
    if (p.workspace) {
      T* ws = p.workspace + row * 5 * H + j;
      l.store(ws, a.i);
      l.store(ws + H, a.f);
      l.store(ws + 2 * H, a.g);
      l.store(ws + 3 * H, a.o);
      l.store(ws + 4 * H, a.c);
    }
  });
}

template <typename T>
void gru_forward(const ForwardProblem<T>& p) {
  const int64_t H = p.hidden;
  forward_loop<T, 3>(p, [&](int64_t row, int64_t r, const T* gx, int64_t gx_stride, int64_t j, const Lanes<T>& l,
                            const T* h_prev, const Vec<T>* acc) {
    const T* bias = p.bias + j;
    auto hh = [&](int g) { return acc[g] + l.load(bias + g * H); };
    const auto hh_n = hh(2);
    const auto a = rnnfused::gru_forward(l.load(gx), l.load(gx + gx_stride), l.load(gx + 2 * gx_stride), hh(0),
                                         hh(1), hh_n, l.load(h_prev + j));
    store_h(p, p.output + row * H + j, p.h_state + r * H + j, a.h, l);
    if (p.workspace) {
      T* ws = p.workspace + row * 4 * H + j;
      l.store(ws, a.r);
      l.store(ws + H, a.z);
      l.store(ws + 2 * H, a.n);
      l.store(ws + 3 * H, hh_n);
    }
  });
}

template <typename T, Activation act>
void rnn_forward(const ForwardProblem<T>& p) {
  const int64_t H = p.hidden;
  forward_loop<T, 1>(p, [&](int64_t row, int64_t r, const T* gx, int64_t, int64_t j, const Lanes<T>& l, const T*,
                            const Vec<T>* acc) {
    const auto h = rnnfused::rnn_forward<act>((l.load(gx) + acc[0]) + l.load(p.bias + j));
    store_h(p, p.output + row * H + j, p.h_state + r * H + j, h, l);
  });
}

template <typename T>
void forward(const ForwardProblem<T>& p) {
  switch (p.cell) {
    case CellKind::Lstm:
      return lstm_forward(p);
    case CellKind::Gru:
      return gru_forward(p);
    case CellKind::RnnTanh:
      return rnn_forward<T, Activation::Tanh>(p);
    case CellKind::RnnRelu:
      return rnn_forward<T, Activation::Relu>(p);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: phase 2s turns dL/dh_t of the slice's units into gate gradients (its units, all G
// gates); phase 2s+1, after the barrier, computes dL/dh_{t-1} of its units from the step's gate
// gradients of all units: dh[r][units] = sum_n dG[r][n] W_hh[n][units] (+ the GRU's direct dh z),
// with the register tiles or (p.blas_product) one BLAS GEMM of the slice per step, straight into
// the slice's columns of dh_state.
// ---------------------------------------------------------------------------------------------

template <typename T, typename Pointwise>
void backward_loop(const BackwardProblem<T>& p, int64_t G, const T* grad_for_dh, const Pointwise& pointwise,
                   bool accumulate_dh) {
  constexpr int64_t V = kLanes<T>;
  const StepPlan& plan = *p.plan;
  const int64_t H = p.hidden;
  const int64_t K = G * H;
  const int64_t blocks = (H + V - 1) / V;
  const int64_t team = team_size(blocks, 2 * plan.batch * G * H * H);
  const bool blas = p.blas_product;
  if (blas) count_engine_blas_call();
  // BLAS product: slice s multiplies by W_hh's columns of its units [j0, j1) (read in place, ld H),
  // which StepWeight packs into this buffer at offset blas_offsets[s].
  std::vector<int64_t> blas_offsets;
  int64_t blas_size = 0;
  for (int64_t slice = 0; blas && slice < team; ++slice) {
    const auto [b0, b1] = slice_blocks(blocks, team, slice);
    blas_offsets.push_back(blas_size);
    blas_size += (StepWeight<T>::packed_size(plan.batch, std::min(H, b1 * V) - b0 * V, K, true) + 15) / 16 * 16;
  }
  std::vector<std::unique_ptr<StepWeight<T>>> blas_weights(blas ? team : 0);
  T* const panels = panel_buffer<T>(blas ? blas_size + 16 : blocks * K * V);
  T* const blas_base =
      reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(panels) + 63) & ~uintptr_t(63));
  std::vector<SliceScratch<T>> scratch(team);
  for (auto& s : scratch) {
    s.rows.resize(plan.batch);
    if (!blas) s.partial.resize(static_cast<size_t>(plan.batch * kTileBlocks<1> * V));
  }
  const int64_t steps = plan.steps();
  run_team(
      team, 2 * steps,
      [&](int64_t slice) {
        const auto [b0, b1] = slice_blocks(blocks, team, slice);
        if (blas) {
          const int64_t j0 = b0 * V, j1 = std::min(H, b1 * V);
          blas_weights[slice] = std::make_unique<StepWeight<T>>(false, plan.batch, j1 - j0, K, p.w_hh + j0, H,
                                                                blas_base + blas_offsets[slice], true);
          return;
        }
        pack_column_panels(p.w_hh, H, H, K, b0, b1, panels);
      },
      [&](int64_t slice, int64_t q) {
        const auto [b0, b1] = slice_blocks(blocks, team, slice);
        const int64_t t = plan.step_at(steps - 1 - q / 2);
        const int64_t rows = plan.batch_sizes[t], off = plan.offsets[t];
        if (q % 2 == 0) {
          // Row by row: each row's units of the slice are contiguous in every gate (streams that
          // the hardware prefetchers follow).
          const int64_t from_prev = plan.rows_from_previous(t);
          const int64_t prev_off = from_prev > 0 ? plan.offsets[plan.previous_step(t)] : 0;
          for (int64_t r = 0; r < rows; ++r) {
            // The packed row of r's previous step, or -1 where r starts here (from h0 / c0).
            const int64_t prev_row = r < from_prev ? prev_off + r : -1;
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t j = b * V;
              pointwise(off + r, r, prev_row, j, Lanes<T>{std::min<int64_t>(V, H - j)});
            }
          }
          return;
        }
        if (blas) {
          const int64_t j0 = b0 * V;
          blas_weights[slice]->multiply(rows, grad_for_dh + off * K, K, accumulate_dh ? T(1) : T(0),
                                        p.dh_state + j0, H);
          return;
        }
        SliceScratch<T>& sc = scratch[slice];
        for (int64_t r = 0; r < rows; ++r) sc.rows[r] = grad_for_dh + (off + r) * K;
        multiply_blocks<T, 1>(sc.rows.data(), rows, K, panels, b0, b1, sc.partial.data(),
                              [&](int64_t r, int64_t b, const Vec<T>* acc) {
                                const int64_t j = b * V;
                                const Lanes<T> l{std::min<int64_t>(V, H - j)};
                                T* dh = p.dh_state + r * H + j;
                                l.store(dh, accumulate_dh ? l.load(dh) + acc[0] : acc[0]);
                              },
                              [](int64_t, int64_t) {});
      },
      [](int64_t q) { return q % 2 == 1; });
}

// The cells' backward element functions: pointwise(row, r, prev_row, j, lanes) for packed row
// `row` (batch row r of its step; prev_row: the packed row of r's previous step, or -1 where r
// starts at this step) and units [j, j + lanes).
template <typename T>
void lstm_backward(const BackwardProblem<T>& p) {
  const int64_t H = p.hidden;
  backward_loop(
      p, 4, p.grad_gates,
      [&](int64_t row, int64_t r, int64_t prev_row, int64_t j, const Lanes<T>& l) {
        const T* ws = p.workspace + row * 5 * H + j;
        const T* c_prev = prev_row >= 0 ? p.workspace + prev_row * 5 * H + 4 * H + j : p.c0 + r * H + j;
        auto grad_r = l.load(p.dh_state + r * H + j);
        if (p.grad_output) grad_r = grad_r + l.load(p.grad_output + row * H + j);
        T* dc = p.dc_state + r * H + j;
        const auto d = rnnfused::lstm_backward(l.load(ws), l.load(ws + H), l.load(ws + 2 * H), l.load(ws + 3 * H),
                                               l.load(ws + 4 * H), l.load(c_prev), grad_r, l.load(dc));
        T* dg = p.grad_gates + row * 4 * H + j;
        l.store(dg, d.pre_i);
        l.store(dg + H, d.pre_f);
        l.store(dg + 2 * H, d.pre_g);
        l.store(dg + 3 * H, d.pre_o);
        l.store(dc, d.c_prev);
      },
      false);
}

template <typename T>
void gru_backward(const BackwardProblem<T>& p) {
  const int64_t H = p.hidden;
  backward_loop(
      p, 3, p.grad_gates_h,
      [&](int64_t row, int64_t r, int64_t prev_row, int64_t j, const Lanes<T>& l) {
        const T* ws = p.workspace + row * 4 * H + j;
        const T* h_prev = prev_row >= 0 ? p.output + prev_row * H + j : p.h0 + r * H + j;
        T* dh_state = p.dh_state + r * H + j;
        auto dh = l.load(dh_state);
        if (p.grad_output) dh = dh + l.load(p.grad_output + row * H + j);
        const auto d = rnnfused::gru_backward(l.load(ws), l.load(ws + H), l.load(ws + 2 * H), l.load(ws + 3 * H),
                                              l.load(h_prev), dh);
        T* dgx = p.grad_gates + row * 3 * H + j;
        T* dgh = p.grad_gates_h + row * 3 * H + j;
        l.store(dgx, d.x_r);
        l.store(dgx + H, d.x_z);
        l.store(dgx + 2 * H, d.x_n);
        l.store(dgh, d.x_r);
        l.store(dgh + H, d.x_z);
        l.store(dgh + 2 * H, d.hh_n);
        l.store(dh_state, d.h_prev);
      },
      true);
}

template <typename T, Activation act>
void rnn_backward(const BackwardProblem<T>& p) {
  const int64_t H = p.hidden;
  backward_loop(
      p, 1, p.grad_gates,
      [&](int64_t row, int64_t r, int64_t, int64_t j, const Lanes<T>& l) {
        auto dh = l.load(p.dh_state + r * H + j);
        if (p.grad_output) dh = dh + l.load(p.grad_output + row * H + j);
        l.store(p.grad_gates + row * H + j, rnnfused::rnn_backward<act>(l.load(p.output + row * H + j), dh));
      },
      false);
}

template <typename T>
void backward(const BackwardProblem<T>& p) {
  switch (p.cell) {
    case CellKind::Lstm:
      return lstm_backward(p);
    case CellKind::Gru:
      return gru_backward(p);
    case CellKind::RnnTanh:
      return rnn_backward<T, Activation::Tanh>(p);
    case CellKind::RnnRelu:
      return rnn_backward<T, Activation::Relu>(p);
  }
}

}  // namespace engine

template <typename T>
EngineKernels<T> make_engine() {
  return EngineKernels<T>{RNNFUSED_ISA_NAME,
                          &engine::forward<T>,
                          &engine::backward<T>,
                          {0, engine::kTileRows<1>, 0, engine::kTileRows<3>, engine::kTileRows<4>}};
}

}  // namespace rnnfused::cpu::RNNFUSED_ISA
