#include "bulk_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "blas.h"      // cpu_is_intel
#include "pointwise.h"  // pointwise_isa

namespace rnnfused::cpu {
namespace {

enum class BulkGemmMode { Auto, Blas, Brgemm };

BulkGemmMode parse_mode(const char* name, const char* what) {
  if (std::strcmp(name, "auto") == 0) return BulkGemmMode::Auto;
  if (std::strcmp(name, "blas") == 0) return BulkGemmMode::Blas;
  if (std::strcmp(name, "brgemm") == 0) return BulkGemmMode::Brgemm;
  TORCH_CHECK(false, what, ": expected 'auto', 'blas' or 'brgemm', got '", name, "'");
}

BulkGemmMode& mode_setting() {
  static BulkGemmMode mode = [] {
    const char* value = std::getenv("RNNFUSED_CPU_GEMM");
    return (value == nullptr || *value == '\0') ? BulkGemmMode::Auto : parse_mode(value, "RNNFUSED_CPU_GEMM");
  }();
  return mode;
}

std::atomic<int64_t> g_brgemm_calls{0};

// The blocks of C that one call of the micro-kernel computes: kBlockRows x kBlockCols, summed over
// kBlockDepth of k at a time (the A rows and the B panel of a call stay in L1/L2). The fastest of
// the sizes tried on the AMD EPYC (Zen 5): 32 x 64, 28 x 64, 64 x 64, 32 x 128 and 64 x 128, with
// k whole or in blocks of 256 (64 x 128 x 256: 225-257 GFLOP/s on one core, the others 137-235).
// The blocks do not depend on the thread count, so neither does any result.
constexpr int64_t kBlockRows = 64;
constexpr int64_t kBlockCols = 128;
constexpr int64_t kBlockDepth = 256;

}  // namespace

void transpose_into(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  constexpr int64_t kTile = 16;
  for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
    const int64_t c1 = std::min(cols, c0 + kTile);
    for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile);
      for (int64_t c = c0; c < c1; ++c) {
        const float* from = src + c * ld_src;
        for (int64_t r = r0; r < r1; ++r) dst[r * ld_dst + c] = from[r];
      }
    }
  }
}

namespace {

#ifdef CPUBLAS_BRGEMM_F32F32F32
// C[m, n] = A B (+ C where `accumulate`), float32, on the micro-kernel.
//   A: [m, k] with row stride lda, or (a_transposed) stored as [k, m] with row stride lda.
//   B: [k, n] with row stride ldb, or (b_transposed) stored as [n, k] with row stride ldb.
//   C: [m, n] with row stride ldc. `bias` ([n] or null): C = bias + A B (then nothing is read from C).
void brgemm_product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, bool a_transposed, const float* b,
                    int64_t ldb, bool b_transposed, const float* bias, bool accumulate, float* c, int64_t ldc) {
  g_brgemm_calls.fetch_add(1, std::memory_order_relaxed);
  // The micro-kernel reads B as [k, n] rows: a transposed B is transposed once, by column blocks
  // spread over the threads.
  std::vector<float> b_rows;
  if (b_transposed) {
    const int64_t stride = transposed_row_stride(n);
    b_rows.resize(static_cast<size_t>(k * stride));
    at::parallel_for(0, (n + kBlockCols - 1) / kBlockCols, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t j0 = block * kBlockCols, width = std::min(kBlockCols, n - j0);
        transpose_into(b + j0 * ldb, ldb, k, width, b_rows.data() + j0, stride);
      }
    });
    b = b_rows.data();
    ldb = stride;
  }
  const int64_t row_blocks = (m + kBlockRows - 1) / kBlockRows;
  const int64_t col_blocks = (n + kBlockCols - 1) / kBlockCols;
  // Row blocks are the unit of work (a transposed A is transposed once per row block); where there
  // are too few of them for the threads, the column blocks are split into groups as well.
  const int64_t threads = at::get_num_threads();
  int64_t col_groups = 1;
  while (row_blocks * col_groups < 4 * threads && col_groups < col_blocks) ++col_groups;
  at::parallel_for(0, row_blocks * col_groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t a_stride = transposed_row_stride(k);
    std::vector<float> a_rows(a_transposed ? static_cast<size_t>(kBlockRows * a_stride) : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row_block = item / col_groups, group = item % col_groups;
      const int64_t i0 = row_block * kBlockRows, rows = std::min(kBlockRows, m - i0);
      const float* a_block = a + i0 * lda;
      int64_t ld_a = lda;
      if (a_transposed) {
        transpose_into(a + i0, lda, rows, k, a_rows.data(), a_stride);
        a_block = a_rows.data();
        ld_a = a_stride;
      }
      const int64_t first = group * col_blocks / col_groups, last = (group + 1) * col_blocks / col_groups;
      for (int64_t col_block = first; col_block < last; ++col_block) {
        const int64_t j0 = col_block * kBlockCols, cols = std::min(kBlockCols, n - j0);
        float* c_block = c + i0 * ldc + j0;
        if (bias != nullptr) {
          for (int64_t i = 0; i < rows; ++i) std::memcpy(c_block + i * ldc, bias + j0, sizeof(float) * cols);
        }
        for (int64_t k0 = 0; k0 < k; k0 += kBlockDepth) {
          const int64_t depth = std::min(kBlockDepth, k - k0);
          at::native::cpublas::brgemm(rows, cols, depth, ld_a, ldb, ldc, accumulate || bias != nullptr || k0 > 0,
                                      a_block + k0, b + k0 * ldb + j0, c_block);
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}
#endif

// How a 2-D operand is laid out for the micro-kernel: row-major (stride 1 along the columns) or a
// transposed view of a row-major matrix; `leading` is the other stride.
struct Layout {
  bool row_major = false;
  bool transposed = false;
  int64_t leading = 0;
};

Layout layout_of(const at::Tensor& t) {
  Layout layout;
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(cols, 1)) {
    layout.row_major = true;
    layout.leading = t.stride(0);
  } else if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(rows, 1)) {
    layout.transposed = true;
    layout.leading = t.stride(1);
  }
  return layout;
}

}  // namespace

bool bulk_brgemm_available() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

bool bulk_gemm_uses_brgemm(c10::ScalarType dtype, int64_t m, int64_t n, int64_t k) {
  const BulkGemmMode mode = mode_setting();
  if (dtype != at::kFloat || mode == BulkGemmMode::Blas || m <= 0 || n <= 0 || k <= 0) return false;
  if (!bulk_brgemm_available()) return false;
  if (mode == BulkGemmMode::Brgemm) return true;
  return !cpu_is_intel() && std::strcmp(pointwise_isa(), "avx512") == 0 && 2 * m * n * k >= kBulkBrgemmMinFlops;
}

bool step_gemm_uses_brgemm() {
  const BulkGemmMode mode = mode_setting();
  if (mode == BulkGemmMode::Blas || !bulk_brgemm_available()) return false;
  return mode == BulkGemmMode::Brgemm || (!cpu_is_intel() && std::strcmp(pointwise_isa(), "avx512") == 0);
}

void brgemm_on_this_thread(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                           bool accumulate, float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  for (int64_t i0 = 0; i0 < m; i0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, m - i0);
    for (int64_t j0 = 0; j0 < n; j0 += kBlockCols) {
      const int64_t cols = std::min(kBlockCols, n - j0);
      for (int64_t k0 = 0; k0 < k; k0 += kBlockDepth) {
        at::native::cpublas::brgemm(rows, cols, std::min(kBlockDepth, k - k0), lda, ldb, ldc, accumulate || k0 > 0,
                                    a + i0 * lda + k0, b + k0 * ldb + j0, c + i0 * ldc + j0);
      }
    }
  }
#else
  TORCH_CHECK(false, "brgemm_on_this_thread: this torch ships no float32 brgemm micro-kernel");
#endif
}

const char* bulk_gemm_mode() {
  switch (mode_setting()) {
    case BulkGemmMode::Blas: return "blas";
    case BulkGemmMode::Brgemm: return "brgemm";
    default: return "auto";
  }
}

void set_bulk_gemm_mode(const char* mode) { mode_setting() = parse_mode(mode, "_set_cpu_bulk_gemm_mode"); }

int64_t bulk_brgemm_calls() { return g_brgemm_calls.load(std::memory_order_relaxed); }

at::Tensor bulk_mm(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "bulk_mm: expected 2-D tensors, got ", a.dim(), "-D and ", b.dim(), "-D");
  TORCH_CHECK(a.size(1) == b.size(0), "bulk_mm: shapes ", a.sizes(), " and ", b.sizes(), " cannot be multiplied");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const bool fast = a.device().is_cpu() && b.scalar_type() == a.scalar_type() &&
                    (!bias.has_value() || (bias->scalar_type() == a.scalar_type() && bias->dim() == 1 &&
                                           bias->size(0) == n)) &&
                    (!out.has_value() || out->scalar_type() == a.scalar_type()) &&
                    bulk_gemm_uses_brgemm(a.scalar_type(), m, n, k);
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (fast) {
    const at::Tensor a_in = (layout_of(a).row_major || layout_of(a).transposed) ? a : a.contiguous();
    const at::Tensor b_in = (layout_of(b).row_major || layout_of(b).transposed) ? b : b.contiguous();
    const Layout la = layout_of(a_in), lb = layout_of(b_in);
    const at::Tensor bias_in = bias.has_value() ? bias->contiguous() : at::Tensor();
    at::Tensor result;
    if (out.has_value()) {
      result = *out;
      result.resize_({m, n});
    }
    const bool direct = result.defined() && result.is_contiguous();
    at::Tensor target = direct ? result : at::empty({m, n}, a.options());
    brgemm_product(m, n, k, a_in.data_ptr<float>(), la.leading, la.transposed, b_in.data_ptr<float>(), lb.leading,
                   lb.transposed, bias_in.defined() ? bias_in.data_ptr<float>() : nullptr, false,
                   target.data_ptr<float>(), n);
    if (!result.defined()) return target;
    if (!direct) result.copy_(target);
    return result;
  }
#else
  (void)fast;
#endif
  if (bias.has_value()) {
    if (out.has_value()) {
      at::Tensor result = *out;
      return at::addmm_out(result, *bias, a, b);
    }
    return at::addmm(*bias, a, b);
  }
  if (out.has_value()) {
    at::Tensor result = *out;
    return at::mm_out(result, a, b);
  }
  return at::mm(a, b);
}

}  // namespace rnnfused::cpu
