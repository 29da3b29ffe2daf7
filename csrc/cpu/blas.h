// Row-major GEMM on raw pointers for the time loops, without the dispatcher or a tensor
// allocation per call.
#pragma once

#include <cstdint>

namespace rnnfused::cpu {

// C[m, n] = alpha * op(A) @ op(B) + beta * C, op(X) = X or X^T, all row-major.
//   A: [m, k] ([k, m] if trans_a), row stride lda     B: [k, n] ([n, k] if trans_b), row stride ldb
//   C: [m, n], row stride ldc.   beta == 0 ignores what C held (NaN included), as BLAS does.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// "blas": the sgemm_/dgemm_ that libtorch_cpu itself calls (MKL or OpenBLAS);
// "aten": at::addmm_out on wrapped buffers, used where libtorch exports no BLAS symbols.
const char* blas_backend();
// Tests use this to run the time loops on either backend.
void set_blas_backend(const char* name);

}  // namespace rnnfused::cpu
