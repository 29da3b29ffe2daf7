#include "blas.h"

#include "bulk_gemm.h"  // brgemm_on_this_thread

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// The Fortran BLAS entry points that libtorch_cpu exports when it links MKL or OpenBLAS
// statically (ATen's own CPUBlas.cpp calls these). Weak, so that a torch without them still
// loads this library; a null address means "not available" and the ATen path is taken.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));

// MKL's packed GEMM (row-major CBLAS flavour; MKL_INT is int in the LP64 interface torch uses).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));

// MKL's thread count for the calling thread (returns the previous one; 0: the process-wide one).
// The C entry point that mkl.h's mkl_set_num_threads_local names; the lowercase symbol is the
// Fortran one (its argument by pointer).
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
}

namespace rnnfused::cpu {
namespace {

bool g_force_aten = false;

template <typename T>
struct FortranGemm;
template <>
struct FortranGemm<float> {
  static bool available() { return sgemm_ != nullptr; }
  static void call(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                   const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                   const int* ldc) {
    sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
};
template <>
struct FortranGemm<double> {
  static bool available() { return dgemm_ != nullptr; }
  static void call(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                   const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                   const int* ldc) {
    dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
};

bool fits_int(int64_t v) { return v <= INT_MAX; }

template <typename T>
void gemm_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto wrap = [&](const T* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, options);
  };
  at::Tensor A = trans_a ? wrap(a, k, m, lda).t() : wrap(a, m, k, lda);
  at::Tensor B = trans_b ? wrap(b, n, k, ldb).t() : wrap(b, k, n, ldb);
  at::Tensor C = wrap(c, m, n, ldc);
  if (beta == T(0)) {
    // addmm with beta = 0 still reads C in some kernels; mm does not.
    at::Tensor product = at::mm(A, B);
    if (alpha != T(1)) product.mul_(alpha);
    C.copy_(product);
  } else {
    C.copy_(at::addmm(C, A, B, beta, alpha));
  }
}

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) {
      T* row = c + i * ldc;
      if (beta == T(0)) {
        std::fill(row, row + n, T(0));
      } else {
        for (int64_t j = 0; j < n; ++j) row[j] *= beta;
      }
    }
    return;
  }
  const bool direct = !g_force_aten && FortranGemm<T>::available() && fits_int(m) && fits_int(n) && fits_int(k) &&
                      fits_int(lda) && fits_int(ldb) && fits_int(ldc);
  if (!direct) {
    gemm_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the same buffers with the
  // operands swapped and the same transpose flags.
  const char ta = trans_a ? 'T' : 'N';
  const char tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ildb = static_cast<int>(std::max<int64_t>(ldb, 1));
  const int ildc = static_cast<int>(std::max<int64_t>(ldc, 1));
  FortranGemm<T>::call(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t);

namespace {
// CBLAS / MKL enumerators.
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;
constexpr int kMklBMatrix = 162, kMklPacked = 151;

bool mkl_packing_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}
}  // namespace

template <typename T>
int64_t StepWeight<T>::packed_size(int64_t rows, int64_t n, int64_t k, bool one_thread) {
  if constexpr (std::is_same_v<T, float>) {
    const bool shapes_fit = rows > 0 && n > 0 && k > 0 && fits_int(rows) && fits_int(n) && fits_int(k);
    if (one_thread && shapes_fit && step_gemm_uses_brgemm()) return k * transposed_row_stride(n);
    if (!g_force_aten && mkl_packing_available() && shapes_fit) {
      return static_cast<int64_t>(cblas_sgemm_pack_get_size(kMklBMatrix, int(rows), int(n), int(k)) / sizeof(float)) +
             16;
    }
  }
  return 0;
}

bool blas_packs_float() { return StepWeight<float>::packed_size(1, 1, 1) > 0; }

namespace {
int g_vendor_override = 0;

bool detect_intel() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return false;
  char vendor[13];
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  vendor[12] = '\0';
  return std::strcmp(vendor, "GenuineIntel") == 0;
#else
  return false;
#endif
}
}  // namespace

OneThreadBlas::OneThreadBlas() {
  if (MKL_Set_Num_Threads_Local != nullptr) mkl_previous_ = MKL_Set_Num_Threads_Local(1);
#ifdef _OPENMP
  omp_previous_ = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
}

OneThreadBlas::~OneThreadBlas() {
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_previous_);
#ifdef _OPENMP
  omp_set_num_threads(omp_previous_);
#endif
}

bool cpu_is_intel() {
  static const bool intel = detect_intel();
  return g_vendor_override != 0 ? g_vendor_override > 0 : intel;
}

void set_cpu_vendor_override(int override) { g_vendor_override = override; }

template <typename T>
StepWeight<T>::StepWeight(bool trans_b, int64_t rows, int64_t n, int64_t k, const T* b, int64_t ldb, T* storage,
                          bool one_thread)
    : trans_b_(trans_b), rows_(rows), n_(n), k_(k), ldb_(ldb), b_(b) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t size = packed_size(rows, n, k, one_thread);
    if (b != nullptr && size > 0 && one_thread && step_gemm_uses_brgemm()) {
      if (storage == nullptr) {
        packed_storage_.reset(new float[size]);
        storage = packed_storage_.get();
      }
      // B as [k, n] rows: element (kk, j) of op(B) is b[j * ldb + kk] transposed, b[kk * ldb + j] not.
      packed_ld_ = transposed_row_stride(n);
      if (trans_b) {
        transpose_into(b, ldb, k, n, storage, packed_ld_);
      } else {
        for (int64_t kk = 0; kk < k; ++kk) std::memcpy(storage + kk * packed_ld_, b + kk * ldb, sizeof(float) * n);
      }
      packed_ = storage;
      brgemm_ = true;
      return;
    }
    if (b != nullptr && size > 0 && fits_int(ldb)) {
      if (storage == nullptr) {
        packed_storage_.reset(new float[size]);
        storage = packed_storage_.get();
      }
      cblas_sgemm_pack(kCblasRowMajor, kMklBMatrix, trans_b ? kCblasTrans : kCblasNoTrans, int(rows), int(n),
                       int(k), 1.0f, b, int(std::max<int64_t>(ldb, 1)), storage);
      packed_ = storage;
    }
  }
}

template <typename T>
void StepWeight<T>::multiply(int64_t m, const T* a, int64_t lda, T beta, T* c, int64_t ldc) const {
  if constexpr (std::is_same_v<T, float>) {
    if (brgemm_ && (beta == 0.0f || beta == 1.0f)) {
      brgemm_on_this_thread(m, n_, k_, a, lda, packed_, packed_ld_, beta != 0.0f, c, ldc);
      return;
    }
    if (packed_ != nullptr && !brgemm_ && m == rows_ && fits_int(lda) && fits_int(ldc)) {
      cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kMklPacked, int(m), int(n_), int(k_), a,
                          int(std::max<int64_t>(lda, 1)), packed_, int(n_), beta, c, int(std::max<int64_t>(ldc, 1)));
      return;
    }
  }
  gemm<T>(false, trans_b_, m, n_, k_, T(1), a, lda, b_, ldb_, beta, c, ldc);
}

template class StepWeight<float>;
template class StepWeight<double>;

const char* blas_backend() {
  return (!g_force_aten && FortranGemm<float>::available() && FortranGemm<double>::available()) ? "blas" : "aten";
}

void set_blas_backend(const char* name) {
  if (std::strcmp(name, "aten") == 0) {
    g_force_aten = true;
  } else {
    TORCH_CHECK(std::strcmp(name, "blas") == 0, "set_blas_backend: expected 'blas' or 'aten', got '", name, "'");
    TORCH_CHECK(FortranGemm<float>::available() && FortranGemm<double>::available(),
                "set_blas_backend('blas'): this torch exports no sgemm_/dgemm_");
    g_force_aten = false;
  }
}

}  // namespace rnnfused::cpu
