// The GEMMs over all of a call's rows: the input projection x W_ih^T (+ b_ih) and, in the
// backward, dL/dx = dG W_ih, dW_ih = dG^T x and dW_hh = dG^T h_{t-1} (rnnfused/functional.py and
// the recurrence ops' backward).
//
// torch's CPU wheel runs float32 GEMMs with MKL, which keeps its AVX-512 kernels for Intel
// processors: on an AMD EPYC with AVX-512 (Zen 5, 2 threads, 2026-12-01) a 1024^3 torch.mm ran at
// 219 GFLOP/s, about 110 per core, while oneDNN's brgemm micro-kernel (which torch ships and calls
// itself, at::native::cpublas::brgemm) ran the same products at 225-255 GFLOP/s on one core
// (blocks of 64 x 128 x 256). torch.nn's LSTM runs its GEMMs with oneDNN there, so a training
// step of rnnfused's LSTM that left them to MKL took 1.7x torch.nn's time (B = 16, H = 256). Where
// bulk_gemm_uses_brgemm says so, these products run on that micro-kernel, in fixed blocks spread
// over torch's threads; elsewhere they are the ATen calls that torch.nn.functional makes (mm,
// addmm), so that results are bitwise those of F.linear and its autograd there.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace rnnfused::cpu {

// Whether a float32 product C[m, n] = A[m, k] B[k, n] runs on oneDNN's brgemm micro-kernel: where
// torch ships it (and torch.backends.mkldnn is enabled), on processors other than Intel's whose
// instruction set for rnnfused's kernels is AVX-512 (pointwise_isa()), for products of at least
// kBulkBrgemmMinFlops. RNNFUSED_CPU_GEMM=auto|blas|brgemm sets the rule at load time ("blas": the
// ATen calls always; "brgemm": wherever torch ships the micro-kernel, at every size and ISA).
constexpr int64_t kBulkBrgemmMinFlops = int64_t(1) << 22;
bool bulk_gemm_uses_brgemm(c10::ScalarType dtype, int64_t m, int64_t n, int64_t k);
// Whether this torch ships the float32 brgemm micro-kernel (and torch.backends.mkldnn is enabled).
bool bulk_brgemm_available();
// "auto", "blas" or "brgemm": the rule now.
const char* bulk_gemm_mode();
// Testing hook: sets the rule ("auto", "blas" or "brgemm").
void set_bulk_gemm_mode(const char* mode);
// Testing hook: products run on the micro-kernel since load.
int64_t bulk_brgemm_calls();

// step_gemm_uses_brgemm(): blas.h.
// dst[r * ld_dst + c] = src[c * ld_src + r] for r < rows, c < cols, in tiles that stay in L1 (the
// operands that the micro-kernel reads as rows).
void transpose_into(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst);
// The row stride of a copy of `cols` floats per row that transpose_into writes: 64 bytes more than
// the row, so that the tile's rows do not all fall in one set of the L1 cache (rows of 4 KiB
// multiples did: transposing W_hh's slice of an H = 512 LSTM took a fifth of its eval forward at
// B = 64 on the AMD EPYC, Zen 5).
inline int64_t transposed_row_stride(int64_t cols) { return cols + 16; }
// C[m, n] = A[m, k] B[k, n] (+ C where `accumulate`), float32, on the micro-kernel, on the calling
// thread. A, B and C row-major with row strides lda, ldb, ldc. Only where bulk_brgemm_available().
void brgemm_on_this_thread(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                           bool accumulate, float* c, int64_t ldc);

// a @ b (+ bias broadcast over the rows), into `out` where given (then resized as torch.mm's out=
// does), for 2-D CPU tensors of one floating dtype; a and b may be transposed views (a.t()).
// Where bulk_gemm_uses_brgemm says no: at::mm / at::addmm, exactly.
at::Tensor bulk_mm(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias = c10::nullopt,
                   const c10::optional<at::Tensor>& out = c10::nullopt);

}  // namespace rnnfused::cpu
