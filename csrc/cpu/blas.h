// Row-major GEMM on raw pointers for the time loops, without the dispatcher or a tensor
// allocation per call.
#pragma once

#include <cstdint>
#include <memory>

namespace rnnfused::cpu {

// C[m, n] = alpha * op(A) @ op(B) + beta * C, op(X) = X or X^T, all row-major.
//   A: [m, k] ([k, m] if trans_a), row stride lda     B: [k, n] ([n, k] if trans_b), row stride ldb
//   C: [m, n], row stride ldc.   beta == 0 ignores what C held (NaN included), as BLAS does.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// The B operand of C = A op(B) that every step of a time loop multiplies by (W_hh, W_hr).
// Where libtorch exports MKL's packed GEMM (float32), B is converted once per call into MKL's
// internal blocked layout, so that the per-step GEMM (a few rows of A against all of B) no longer
// re-packs the whole weight matrix on every step. Elsewhere (float64, other BLAS) it is a plain
// gemm. The packed buffer is allocated here, before the loop; multiply() allocates nothing.
//   B: [k, n] ([n, k] if trans_b), row stride ldb; rows: the batch the loop runs most steps at.
template <typename T>
class StepWeight {
 public:
  // `storage`: where the packed form goes (packed_size(rows, n, k, one_thread) elements), so that
  // a caller that keeps a buffer across calls spares the allocation and its page faults; null:
  // allocated. `one_thread`: multiply() is called on one thread (inside a team's slice), where
  // step_gemm_uses_brgemm() (below) the products run on oneDNN's brgemm micro-kernel over
  // B copied once as [k, n] rows, since MKL's packed GEMM runs AVX2 kernels on those processors.
  StepWeight(bool trans_b, int64_t rows, int64_t n, int64_t k, const T* b, int64_t ldb, T* storage = nullptr,
             bool one_thread = false);
  // Elements of the packed form for this shape (0 where B is used as it is).
  static int64_t packed_size(int64_t rows, int64_t n, int64_t k, bool one_thread = false);
  // C[m, n] = A[m, k] op(B) + beta * C (row-major). The packed form serves m == rows (MKL
  // documents packed operands for the shape they were packed for); other m take plain gemm.
  void multiply(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const;
  bool packed() const { return packed_ != nullptr; }

 private:
  bool trans_b_;
  int64_t rows_, n_, k_, ldb_;
  const T* b_;
  std::unique_ptr<float[]> packed_storage_;
  const float* packed_ = nullptr;
  bool brgemm_ = false;    // packed_ holds B as [k, n] rows for the micro-kernel,
  int64_t packed_ld_ = 0;  // with this row stride
};

// While alive, GEMMs called from this thread run on this thread alone: MKL's thread count for the
// calling thread (mkl_set_num_threads_local, as torch.set_num_threads sets it) and OpenMP's
// (thread-local in libgomp) are 1, and are restored after. A team that runs on its calling thread
// alone (team.h) calls the per-slice GEMMs outside any parallel region, where MKL would otherwise
// open a parallel region of torch's thread count for every slice's GEMM of every step: under
// contention each of those waits for a thread whose core another process has (an LSTM's eval
// forward at B = 16, T = 100 on a 2-core Intel Xeon VM, 2026-12-01: 88 ms per call, median).
class OneThreadBlas {
 public:
  OneThreadBlas();
  ~OneThreadBlas();
  OneThreadBlas(const OneThreadBlas&) = delete;
  OneThreadBlas& operator=(const OneThreadBlas&) = delete;

 private:
  int mkl_previous_ = 0;
  int omp_previous_ = 1;
};

// Whether float32 StepWeights use MKL's packed GEMM (libtorch exports it and the "blas" backend runs).
bool blas_packs_float();

// Whether the processor is Intel's (CPUID vendor "GenuineIntel"; false on other architectures).
// MKL's small GEMMs run at about the core's peak there; on an AMD EPYC (Zen 3) the engine's
// register tiles measured faster (engine_blas_product in engine.h).
bool cpu_is_intel();
// Testing hook: 1 answers as an Intel processor, -1 as another, 0 detects.
void set_cpu_vendor_override(int override);

// Whether StepWeight's float32 products on one thread (the fused engine's per-slice GEMMs,
// engine.h's engine_blas_product) run on oneDNN's brgemm micro-kernel instead of MKL's packed
// GEMM: bulk_gemm.h's rule (RNNFUSED_CPU_GEMM; on processors other than Intel's with AVX-512)
// without its minimum size. Defined in bulk_gemm.cpp.
bool step_gemm_uses_brgemm();

// "blas": the sgemm_/dgemm_ that libtorch_cpu itself calls (MKL or OpenBLAS);
// "aten": at::addmm_out on wrapped buffers, used where libtorch exports no BLAS symbols.
const char* blas_backend();
// Tests use this to run the time loops on either backend.
void set_blas_backend(const char* name);

}  // namespace rnnfused::cpu
