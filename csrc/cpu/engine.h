// The fused CPU recurrence engine: the whole time loop of one layer and direction in one parallel
// region, the per-step product with W_hh and the gate math in one pass.
//
// How it works (csrc/cpu/engine_impl.h holds the code, compiled once per instruction set):
// - A team of threads runs the whole sequence. The hidden units are cut into blocks of one
//   vector (V units: 8 floats on AVX2, 16 on AVX-512); each thread owns a contiguous range of
//   blocks, all G gates of them, and packs its own rows of W_hh once per call into panels
//   [block][k][gate][lane], which then stay in its core's cache for the whole sequence.
// - Forward step: for each of its blocks the thread accumulates h_{t-1} W_hh^T for a tile of
//   rows x G gates x V units in registers, and finishes the gates in the same pass (gates_x,
//   b_hh, the cell's element function of csrc/cell_math.h), writing h_t straight into the
//   step's output rows. h_{t-1} is read from the previous step's output rows (or h0 for rows
//   that start at the step), so packed, reverse and growing batches need no copies.
// - Inference from the input (the op layer_inference): the thread also packs its rows of W_ih,
//   and every few steps computes x W_ih^T (+ b_ih) of the coming steps' rows for its own units,
//   with the same register tiles, into a buffer that its steps then read while it is in cache.
// - Backward step: the thread turns dL/dh_t of its units into the gate gradients of its units,
//   then (after the step barrier) computes dL/dh_{t-1} of its units from all the step's gate
//   gradients with W_hh's columns of its units, packed once per call the same way.
// - From 2 rows on Intel processors, above 16 on others (engine_blas_product), each slice runs its
//   products as BLAS GEMMs instead of the register tiles: its rows of W_hh (and W_ih), or in the
//   backward W_hh's columns of its units, packed once per call by MKL, one single-thread GEMM per
//   step into a buffer of the slice that the element functions then read while it is in cache.
//   On processors other than Intel's with AVX-512 these GEMMs run on oneDNN's brgemm micro-kernel
//   (step_gemm_uses_brgemm, blas.h), where MKL runs AVX2 kernels.
// - Steps are separated by a barrier that spins briefly, then yields the core, so that a waiting
//   thread never holds a core another process needs for long; a thread that has waited
//   past the spin runs the late slice's step itself (team.h), so a thread that lost its core to
//   another process does not hold the others back.
// The order of every sum is fixed: results do not depend on timing, on which thread runs a slice,
// or on the number of threads (each output element is computed once, in the same order).
#pragma once

#include <ATen/core/ATen_fwd.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>

#include "../checks.h"
#include "blas.h"  // cpu_is_intel

namespace rnnfused::cpu {

enum class CellKind { Lstm, Gru, RnnTanh, RnnRelu };

// One forward call (LSTM without projection, GRU, RNN). Shapes in the legend of csrc/cell_math.h.
template <typename T>
struct ForwardProblem {
  CellKind cell = CellKind::Lstm;
  const StepPlan* plan = nullptr;
  int64_t hidden = 0;          // H (= P: no projection)
  const T* gates_x = nullptr;  // [N, G*H]   x W_ih^T + b_ih (null with `input`)
  const T* w_hh = nullptr;     // [G*H, H]
  const T* bias = nullptr;     // [G*H]      b_hh (zeros for a layer without bias)
  const T* h0 = nullptr;       // [B, H]
  T* h_state = nullptr;        // [B, H]     in: a copy of h0; out: h_n
  T* c_state = nullptr;        // [B, H]     LSTM: in: a copy of c0; out: c_n
  T* output = nullptr;         // [N, H]     h_t of every row
  T* workspace = nullptr;      // [N, W*H]   what backward reads (W = 5 LSTM, 4 GRU); null in inference
  // With `input` the engine projects the input itself (gates_x is then null): every few steps each
  // thread computes x W_ih^T (+ b_ih) of the next steps' rows for its own units into a buffer that
  // stays in its cache (the inference op layer_inference).
  const T* input = nullptr;    // [N, I]
  const T* w_ih = nullptr;     // [G*H, I]
  const T* b_ih = nullptr;     // [G*H]      null: none (the LSTM and Elman RNN add theirs to b_hh)
  int64_t input_size = 0;      // I
  // Each slice's products with BLAS GEMMs (its rows of W_hh, and of W_ih with `input`, packed once)
  // instead of the register tiles (engine_blas_product).
  bool blas_product = false;
  // bfloat16/float16 calls compute in float and round h_t to this type at every step (it is what
  // the caller sees and what the next step reads); the dtype itself otherwise.
  c10::ScalarType storage = c10::ScalarType::Float;
};

// One backward call (LSTM without projection, GRU, RNN).
template <typename T>
struct BackwardProblem {
  CellKind cell = CellKind::Lstm;
  const StepPlan* plan = nullptr;
  int64_t hidden = 0;              // H
  const T* w_hh = nullptr;         // [G*H, H]
  const T* h0 = nullptr;           // [B, H]   GRU: h_{t-1} of the rows that start at a step
  const T* c0 = nullptr;           // [B, H]   LSTM: c_{t-1} of the rows that start at a step
  const T* output = nullptr;       // [N, H]   forward output (GRU: h_{t-1}; RNN: h_t)
  const T* workspace = nullptr;    // [N, W*H] the forward's workspace (LSTM, GRU)
  const T* grad_output = nullptr;  // [N, H]   may be null
  T* dh_state = nullptr;           // [B, H]   in: dL/dh_n (zeros if absent); out: dL/dh0
  T* dc_state = nullptr;           // [B, H]   LSTM: in: dL/dc_n; out: dL/dc0
  T* grad_gates = nullptr;         // [N, G*H] dL/d pre-activations (GRU: of gates_x)
  T* grad_gates_h = nullptr;       // [N, 3H]  GRU only: dL/d(h_{t-1} W_hh^T + b_hh)
  // dL/dh_{t-1} of each slice's units with a BLAS GEMM (W_hh's columns of its units packed once)
  // instead of the register tiles (engine_blas_product).
  bool blas_product = false;
};

template <typename T>
struct EngineKernels {
  const char* isa;
  void (*forward)(const ForwardProblem<T>&);
  void (*backward)(const BackwardProblem<T>&);
  int tile_rows[5];  // rows of the forward's register tiles, by G (entries 1, 3 and 4)
};

// The engine for the processor's instruction set (the same choice as pointwise_kernels()).
template <typename T>
const EngineKernels<T>& engine_kernels();

// Which time loop a call runs: the engine ("fused") or the per-step GEMM and gate passes
// ("steps"; always for the LSTM with proj_size). "auto" (the default) takes the engine for batches
// of at most kEngineMaxBatch rows, and at larger batches on processors other than Intel's
// (engine_runs). Measured side by side on 2 threads (AVX-512 Xeon, 2026-11-29):
// against the per-step path the engine is 1.2-2.8x faster at B <= 4, 1.0-1.3x at B = 8, 0.9-1.1x
// at B = 16 and 0.6-0.9x at B >= 64 (where MKL's packed GEMM runs the product faster than the
// engine's register tiles); with another process busy on one of the two cores, the engine slows
// 2-4x at B = 16 where per-step parallel regions slow 20-70x. Hence 16.
// RNNFUSED_CPU_PATH=auto|fused|steps sets it at load time.
enum class CpuPath { Auto, Fused, Steps };
constexpr int64_t kEngineMaxBatch = 16;
CpuPath cpu_path();
void set_cpu_path(CpuPath path);
const char* cpu_path_name(CpuPath path);
CpuPath parse_cpu_path(const std::string& name, const char* what);
// The gate blocks of a cell: G = 4 (LSTM), 3 (GRU), 1 (Elman RNN).
inline int64_t gate_blocks(CellKind cell) { return cell == CellKind::Lstm ? 4 : cell == CellKind::Gru ? 3 : 1; }
// Whether a call of `batch` rows (without projection) of a cell of `gates` gate blocks runs on the
// engine: up to kEngineMaxBatch rows, and on processors other than Intel's inference at every
// batch, training (`training`: a forward that records the workspace, or a backward) up to
// kEngineMaxLstmTrainingBatch rows for the LSTM and kEngineMaxGruTrainingBatch for the GRU (the
// Elman RNN's inference products above 16 rows are per-slice BLAS GEMMs there, the LSTM's and
// GRU's the register tiles: engine_blas_product). There
// (an AMD EPYC, Zen 3, AVX2, 2 threads, 2026-11-30; ms, per-step path / engine on the register
// tiles / torch.nn, side by side in one process) the LSTM's eval forward at H = I = 512, B = 64
// took 127 / 96 / 89 (T = 25) and 382 / 257 / 278 (T = 100), against 105 and 282 with the engine's
// BLAS products; at B = 256, H = 1024, T = 25 1305 / 1162 / 823 (BLAS products 1139). Its training
// forward+backward (T = 25 unless said) at H = 512: B = 32 (T = 50) 180 / 184 / 162, B = 64 226 /
// 211 / 205 and (T = 100) 996 / 906 / 1034, B = 128 450 / 439 / 381, B = 256 978 / 1202 / 841; at
// H = 1024: B = 64 907 / 822 / 766, B = 128 1832 / 1867 / 1506, B = 256 3012 / 3522 / 2738: in
// training the engine loses above 128 rows. The GRU and Elman RNN (ms, per-step path / engine with
// the BLAS products / torch.nn, 07:36-07:41 UTC): eval forward H = I = 512 T = 25, B = 64 GRU 51.7
// / 47.3 / 59.7, rnn_tanh 18.1 / 16.2 / 27.6, rnn_relu 17.3 / 15.3 / 17.9; B = 32 (T = 50) GRU
// 81.4 / 77.7 / 89.0, rnn_tanh 27.7 / 25.2 / 31.7; H = 1024, B = 256, T = 10 GRU 294 / 302 / 333,
// rnn_tanh 93.5 / 87.5 / 105; training T = 25 H = 512: B = 64 GRU 157 / 139 / 186, rnn_tanh 53.0 /
// 48.7 / 54.2, rnn_relu 53.2 / 51.5 / 53.1; B = 128 GRU 279 / 279 / 302, rnn_tanh 75.8 / 87.4 /
// 82.2; H = 1024, B = 256, T = 10 GRU 954 / 901 / 1031, rnn_tanh 301 / 304 / 328; B = 32 (T = 50)
// GRU 163 / 153 / 205, rnn_relu 58.1 / 53.7 / 65.1; measured again (08:04 UTC) at B = 64 GRU 216
// / 183 / 245, rnn_relu 58.3 / 57.0 / 60.4 and 68.7 / 70.1 / 70.1, rnn_tanh 56.7 / 56.1 / 64.7, at
// B = 48 rnn_tanh 41.9 / 43.0 / 52.4: the GRU's training gains, the Elman RNN's does not (within
// 3% either way), so it stays on the per-step path above 16 rows. On the Intel Xeon measured, the
// per-step path or the BLAS products beat the tiles above 16 rows for every cell (above and at
// engine_blas_product below), and the per-step path stays there.
// Where the engine's per-slice products run on oneDNN's brgemm micro-kernel (step_gemm_uses_brgemm
// in blas.h: processors other than Intel's with AVX-512, where MKL runs AVX2 kernels), the engine
// runs at every batch: on an AMD EPYC (Zen 5, AVX-512, 2 threads, 2026-12-01, H = I = 512, T = 25
// unless said, training forward + backward, ms, per-step path / engine with those products /
// torch.nn side by side) Elman RNN (tanh) B = 64 16.2 / 12.4 / 26.8-30.7, B = 128 31.1 / 24.7 /
// 53.4-55.4; GRU B = 64 38.3 / 36.6 / 78.8-88.1, B = 128 104.8 / 71.0 / 150.5-162.5; LSTM B = 256,
// T = 10 104.0 / 79.7 / 89.2-91.2.
constexpr int64_t kEngineMaxLstmTrainingBatch = 128;
constexpr int64_t kEngineMaxGruTrainingBatch = 64;
inline bool engine_runs(int64_t batch, int64_t gates, bool training) {
  const CpuPath path = cpu_path();
  if (path != CpuPath::Auto) return path == CpuPath::Fused;
  if (batch <= kEngineMaxBatch) return true;
  if (cpu_is_intel()) return false;
  if (!training || step_gemm_uses_brgemm()) return true;
  return batch <= (gates == 4 ? kEngineMaxLstmTrainingBatch : gates == 3 ? kEngineMaxGruTrainingBatch : kEngineMaxBatch);
}

// Whether layer_inference projects the input inside the engine (ForwardProblem::input) for a call
// of `batch` rows, G*H = gate_rows, H = hidden, I = input_size: where the engine runs, for the LSTM
// and GRU where the ISA's register tiles hold at least 3 rows, and where each thread's packed W_ih
// and W_hh together take at most kProjectingPanelBytes; otherwise the op projects with one GEMM
// first. Measured side by side against the GEMM first (2 threads, AVX-512 Xeon with 2 MiB of L2
// per core, 2026-11-29, eval forward, T = 100, I = H = 256, B = 16 unless said): AVX-512 LSTM
// (6-row tiles) 4-9% faster, GRU (8 rows) 20-25% faster, Elman RNN 10% slower (a quarter of the
// work per row, where the GEMM's larger tiles win); capped to AVX2: GRU (4 rows) 7% faster, LSTM
// (2 rows) 7% slower, RNN 32% slower. AVX-512 LSTM with H = I = 512 (4 MiB per thread) 8% slower,
// H = I = 768 (9 MiB, T = 256) 7% slower: the panels no longer stay in cache. The AVX2 LSTM's
// tiles hold 3 rows since 2026-11-30; on an AMD EPYC (Zen 3, AVX2) projecting inside was then
// faster at B = 2, 4 and 16 and 5% slower at B = 8 (figures at engine_blas_product below).
constexpr int64_t kProjectingPanelBytes = 1 << 20;
bool engine_projects_input(int64_t batch, int64_t gate_rows, int64_t hidden, int64_t input_size, int64_t element_size);
// Testing hook: 1 projects inside the engine wherever the engine runs, -1 never, 0 by the rule.
void set_engine_projection_override(int override);

// Whether the engine runs its products with BLAS GEMMs per slice (ForwardProblem::blas_product:
// layer_inference, projecting the input itself, and the recurrence ops' forward;
// BackwardProblem::blas_product: their backward's dL/dh_{t-1}) for a call of `batch` rows of
// `element_size` bytes (the compute dtype's: 4 for bfloat16/float16 calls), `gates` gate blocks of
// `hidden` units, where `full_steps`
// says whether every step has all `batch` rows (no packed sequence of several lengths): with the
// "auto" path where the GEMMs are libtorch's BLAS (they run inside the team's parallel region),
// above kEngineMaxBatch rows, and from kEngineBlasMinBatch rows (one row where W_hh takes 512 KiB
// to 1 MiB, kEngineBlasBatch1MaxWeightBytes below) in float32 where MKL's packed
// GEMM is there and every step has the full batch (a step with fewer rows than MKL packed for
// takes the unpacked GEMM, which packs the slice's weights again: packed B = 16 LSTM 15% slower).
// Measured side by side (2 threads, AVX-512 Xeon, 2026-11-29, I = H) against the register tiles:
// eval forward T = 100 (with the tiles' own projection where engine_projects_input says so):
// LSTM H = 256 B = 8 / 16: 5.19 -> 4.19, 8.56 -> 7.49 ms; B = 16 with H = 512 / 768: 5-7% faster;
// GRU B = 16 6% and Elman RNN B = 8 / 16 5-10% faster; capped to AVX2, LSTM B = 16 13.9 ->
// 11.0 ms, GRU 9.95 -> 8.65 ms. Training forward + backward (H = 256, T = 100): LSTM B = 16
// 28.1 -> 27.3 ms, B = 8 15.8 -> 14.6, two layers T = 50 B = 16 30.0 -> 28.1, GRU B = 16 23.9 ->
// 22.9, Elman RNN 8.8 -> 8.3. B = 2 and 4 (measured again, 22:10-22:27 UTC): H = 256 eval forward
// LSTM 2.61 -> 2.08 / 3.49 -> 3.02 ms, GRU 2.10 -> 1.62 / 2.91 -> 2.63, Elman RNN 0.96 -> 0.75 /
// 1.23 -> 1.12; training B = 2 LSTM 7.60 -> 6.68, B = 4 LSTM 9.14 -> 8.93, GRU 9.30 -> 8.04,
// Elman RNN 3.43 -> 3.07; H = 512 eval B = 2 LSTM 14.5 -> 13.3, GRU 7.45 -> 6.61, B = 4 LSTM
// 15.3 -> 15.7, training B = 2 LSTM 28.2 -> 29.4; capped to AVX2, H = 256 eval LSTM B = 2 / 4
// 2.99 -> 2.30 / 5.05 -> 3.45, GRU B = 4 3.30 -> 2.82, Elman RNN 1.19 -> 1.26. At B = 1 the
// tiles were as fast or faster for the GRU and Elman RNN at H = 256 (RNN 0.80 / 0.80, 0.72 /
// 0.74 ms) and for the LSTM at H = 512 (9.1 vs 11.9 ms; at H = 256 the BLAS was 6-9% faster);
// measured again on 2026-12-01 the BLAS products won where W_hh takes 512 KiB to 1 MiB (below).
// Against the GEMM first and the per-step path at B = 64, H = 512 (eval forward): T = 100 5-10%
// faster (the [N, G*H] projection no longer goes to memory and back), T = 25 the same; B = 256,
// H = 1024 4-15% faster. MKL's single-thread kernel runs the slices' GEMMs at about the core's peak.
// On other processors than Intel's the register tiles stay up to kEngineMaxBatch rows (cpu_is_intel
// in blas.h): on an AMD EPYC (Zen 3, AVX2 only, 2 threads, 2026-11-30, I = H = 256, T = 100; ms,
// tiles with the GEMM first / tiles projecting the input / BLAS products / torch.nn) eval forward
// LSTM B = 16 19.4 / 18.0 / 21.1 / 17.5, B = 8 13.2 / 13.8 / 15.9 / 11.7, B = 4 9.0 / 8.2 / 10.3 /
// 8.2, B = 2 5.5 / 4.7 / 7.5 / 6.8, GRU B = 16 16.1 / 14.7 / 17.7 / 26.2, B = 4 3.9 / 3.9 / 5.6;
// training (tiles / BLAS / torch.nn) LSTM B = 16 44.6 / 55.2 / 42.8, B = 4 13.9 / 18.6 / 15.4, GRU
// B = 16 39.7 / 43.7 / 69.8, B = 4 14.2 / 17.2, Elman RNN B = 16 16.1 / 16.6 / 31.6, B = 4 5.1 / 6.9.
// (Only the Elman RNN's eval forward at B = 16 was faster with BLAS there: 6.7 -> 5.7 ms.)
constexpr int64_t kEngineBlasMinBatch = 2;
// On other processors than Intel's: above kEngineMaxBatch rows, for the Elman RNN only (`gates`:
// the cell's gate blocks; figures at engine_runs above and below). The GRU took them above 16 rows
// there until the register tiles were measured against them (AMD EPYC, Zen 3, AVX2, 2 threads,
// 2026-11-30, after the G = 1 tiles lost their rep stos; ms, tiles / BLAS products, the two
// alternating in one process, medians): GRU eval forward H = I = 512, T = 25, B = 64 46.5 / 52.9,
// 48.7 / 52.8, 51.4 / 55.0; B = 32 26.2 / 29.8; B = 128 87.6 / 90.1; H = 1024, B = 256, T = 10
// 283 / 289; H = 256, B = 32, T = 100 25.6 / 30.6; B = 64, T = 50 24.0 / 28.3; training forward +
// backward B = 64 H = 512 T = 25 141.9 / 144.1, B = 32 H = 256 T = 100 69.3 / 73.4, B = 64 H = 256
// T = 50 79.0 / 78.3. The Elman RNN's eval forward at B = 64, H = 512, T = 25 stays faster with
// them: 16.9 / 14.1, 17.8 / 16.7 (its training runs the per-step path above 16 rows).
// At one row, on Intel processors, where W_hh ([G*H, H], `gates` = G, `hidden` = H) in float32
// takes more than kEngineBlasBatch1MinWeightBytes and at most kEngineBlasBatch1MaxWeightBytes.
// Measured on a 2-core Intel Xeon VM (AVX-512, 2 threads, 2026-12-01, T = 100, I = H, eval
// forward, ms, register tiles (projecting the input where engine_projects_input says so) / BLAS
// products), timed as the benchmark suite times (torch.utils.benchmark, calls back to back,
// medians of four alternating rounds in one process): LSTM H = 256 (1 MiB) 1.20 / 1.08, H = 192
// (576 KiB) 0.76 / 0.75, GRU H = 256 (768 KiB) 0.91 / 0.88, Elman RNN H = 512 (1 MiB) 1.12 / 1.09;
// smaller, the tiles win: Elman RNN H = 256 (256 KiB) 0.37 / 0.46, LSTM H = 128 0.40 / 0.42, GRU
// H = 160 0.41 / 0.44; larger too (10 calls per round, alternating): LSTM H = 384 2.04 / 2.11,
// H = 512 5.30 / 6.54, H = 768 19.9 / 24.6, GRU H = 512 2.97 / 3.70. Forward + backward (10 calls
// per round): LSTM H = 256 3.19 / 2.90, GRU H = 256 2.39 / 2.31.
// Where the products run on oneDNN's brgemm micro-kernel (step_gemm_uses_brgemm, blas.h): above
// kEngineMaxBatch rows for every cell, and from kEngineBrgemmMinBatch rows for the Elman RNN and
// where W_hh takes more than kEngineBrgemmMinWeightBytes (the register tiles' panels no longer
// stay in the cores' L2 of 1 MiB). Measured on an AMD EPYC (Zen 5, AVX-512, 2 threads, 2026-12-01,
// I = H, ms, register tiles / brgemm products, the two alternating in one process, medians of
// three rounds): H = 512, T = 25, eval forward B = 32 LSTM 13.4 / 10.7, GRU 9.6 / 7.1, Elman RNN
// 3.3 / 2.5; B = 64 LSTM 24.7 / 18.2 (15.6 once the transposed copies had padded rows), GRU 17.9
// / 12.4, Elman RNN 6.6 / 4.4; B = 16 LSTM 6.32 / 4.64, GRU 4.81 / 3.44; B = 8 LSTM 3.74 / 2.81,
// GRU 2.56 / 2.11; B = 2 LSTM 1.57 / 1.68, GRU 1.01 / 1.03; LSTM H = 384, T = 50 B = 8 4.11 /
// 2.81, B = 16 6.99 / 4.66; training within 3% either way at B >= 8 (LSTM B = 64 50.6 / 49.7), the
// tiles 5-12% faster at B = 2. H = 256, T = 100: Elman RNN eval forward B = 8 1.14 / 0.85, B = 16
// 1.95 / 1.51 (training 2.66 / 2.56, 4.46 / 4.54); the LSTM (W_hh 1 MiB) and GRU at B <= 16 within
// -9% / +11% (LSTM B = 8 forward 2.98 / 2.69, B = 16 training 15.1 / 15.7; GRU B = 16 forward 3.65
// / 3.74, training 12.1 / 13.0), B <= 4 the tiles faster for every cell (LSTM B = 1 forward 0.56 /
// 0.87).
// Within a one-thread period (team.h: another process took a core) the call runs on one thread,
// whose L2 holds half of what two hold: there from kEngineBrgemmMinBatch rows where W_hh takes
// more than half of kEngineBrgemmMinWeightBytes (same machine, T = 100, I = H = 256, B = 16, eval
// forward on one thread, ms, register tiles / brgemm products / torch.nn on one thread: LSTM 12.60
// / 8.39 / 7.5, GRU 9.38 / 6.26 / 15.7). Not where the thread count is 1 by the user's choice, so
// that results stay the same at every thread count on an idle machine.
constexpr int64_t kEngineBrgemmMinBatch = 8;
constexpr int64_t kEngineBrgemmMinWeightBytes = 1 << 20;
constexpr int64_t kEngineBlasBatch1MinWeightBytes = 1 << 19;
constexpr int64_t kEngineBlasBatch1MaxWeightBytes = 1 << 20;
bool engine_blas_product(int64_t batch, int64_t element_size, bool full_steps, int64_t gates, int64_t hidden);
// Testing hook: 1 uses it wherever the BLAS is libtorch's and the path is not "steps", -1 never,
// 0 by the rule.
void set_engine_blas_override(int override);
// Testing hook: the engine calls (forward or backward) that ran the BLAS products, since load.
int64_t engine_blas_calls();
void count_engine_blas_call();

// The work of one step (in flops) that one more thread of the team must have at least; below
// it the team is smaller (a barrier per step costs about a microsecond). 0: as many threads as
// there are unit blocks (tests use it to run small sizes on several threads).
int64_t engine_min_flops_per_thread();
void set_engine_min_flops_per_thread(int64_t flops);

// Testing hooks of the team (team.h): make the threads that own slices other than the first late
// by this many microseconds before each phase (0: off), or inside each phase they claimed (and
// the threads other than the calling one in each gate pass of the per-step path, before their
// share), or once before they start running the team; count the phases that a thread ran for a late slice's owner, the stalls noted (teams
// and per-step calls, team.h) and the teams and calls run on one thread after one; end the
// one-thread period now.
void set_engine_straggler_delay_us(int64_t us);
void set_engine_straggler_delay_inside_phase(bool inside);
void set_engine_straggler_delay_before_start(bool before);
int64_t engine_takeovers();
int64_t engine_stalls();
int64_t engine_solo_runs();
void end_engine_solo();
// The length of the next one-thread period after a stall (ms; team.h).
int64_t engine_solo_period_ms();
// Testing hook: notes a stalled team now, as a team that stalled does when it ends.
void note_engine_team_stall();

// Within a one-thread period after a stall (team.h), and outside torch.use_deterministic_algorithms
// and parallel regions with more than one thread: a scope that puts this thread's MKL and OpenMP
// calls on one thread; otherwise nullptr. For the GEMMs that the layers make outside the ops (the
// input projection and its backward, rnnfused/functional.py): on two threads each leaves
// OpenMP's other thread spinning for a while after it, on the core the calling thread would have
// (batch-1 Elman RNN eval forward under contention on a 2-core Intel Xeon VM, 2026-12-01: the op
// ran on one thread, yet 120 of 200 calls took over 2 ms against 0.5 alone).
std::unique_ptr<OneThreadBlas> one_thread_in_period();
// Whether one_thread_in_period() would put this thread on one thread now.
bool one_thread_period_applies();

}  // namespace rnnfused::cpu
