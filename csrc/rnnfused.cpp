// rnnfused._C: the op library rnnfused::* (schemas in csrc/op_schemas.h) and build information.
//
// One op = one layer, one direction, the whole sequence. The input projection
// x W_ih^T + b_ih of all steps is one GEMM done by the caller; the ops run only the recurrence.
//   gates_x     [N, G*H]  input projection of every row, packed layout
//   w_hh        [G*H, P]  b_hh [G*H] (optional)     w_hr [P, H] (LSTM projection, optional)
//   h0          [B, P]    c0 [B, H] (LSTM)
//   batch_sizes [T] int64 on the CPU (PackedSequence.batch_sizes); None for a padded batch of
//                         B rows per step
//   reverse     run the steps from last to first (the reverse direction of a bidirectional layer)
//   training    record the workspace that backward needs (empty [0] otherwise)
// Outputs: output [N, P], h_n [B, P], c_n [B, H] (LSTM), workspace.
// The backward ops take the forward's saved tensors and the gradients of its outputs (None
// reads as zero) and return the gradients of gates_x, w_hh, b_hh, [w_hr: [0] without
// projection], h0 and [c0].
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/blas.h"
#include "cpu/buffer_cache.h"
#include "cpu/bulk_gemm.h"
#include "cpu/engine.h"
#include "cpu/pointwise.h"
#include "op_schemas.h"

TORCH_LIBRARY(rnnfused, m) {
  rnnfused::define_recurrence_ops(m);
  rnnfused::define_layer_norm_ops(m);
  rnnfused::define_inference_ops(m);
}

namespace rnnfused {
#ifdef RNNFUSED_WITH_CUDA
namespace cuda {
at::Tensor run_selftest(const std::string& name, const at::Tensor& input);  // csrc/cuda/selftest.cu
std::string gemm_library();                                                  // csrc/cuda/selftest.cu
}
#endif

// setup.py defines RNNFUSED_WITH_CUDA when it compiles csrc/cuda.
bool cuda_built() {
#ifdef RNNFUSED_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace rnnfused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnfused: fused LSTM, GRU and Elman RNN recurrences (C++ CPU and CUDA kernels)";
  m.def("cuda_built", &rnnfused::cuda_built, "Whether this build carries the CUDA kernels");
  m.def("cpu_isa", &rnnfused::cpu::pointwise_isa,
        "Instruction set of the CPU kernels: 'avx512', 'avx2' or 'default'");
  m.def(
      "cpu_path", [] { return std::string(rnnfused::cpu::cpu_path_name(rnnfused::cpu::cpu_path())); },
      "Time loops of the CPU ops: 'auto' (the fused engine for batches of at most 16 rows, per-step GEMMs "
      "above), 'fused' (the engine: GEMM and gates in one pass, one thread team per call) or 'steps' (one GEMM "
      "and one gate pass per step)");
  m.def("cpu_blas", &rnnfused::cpu::blas_backend, "GEMM path of the CPU time loops: 'blas' or 'aten'");
#ifdef RNNFUSED_WITH_CUDA
  m.def("_cuda_selftest", &rnnfused::cuda::run_selftest,
        "Testing hook: run one of the self-test kernels of csrc/cuda/selftest_kernels.cuh (correct form) on the GPU");
  m.def("_cuda_gemm_library", &rnnfused::cuda::gemm_library,
        "Testing hook: the libcublas whose GEMMs the CUDA time loops call (resolved on first use)");
#endif
  m.def(
      "_set_cpu_blas", [](const std::string& name) { rnnfused::cpu::set_blas_backend(name.c_str()); },
      "Testing hook: run the CPU time loops on 'blas' (direct sgemm_/dgemm_) or 'aten' (at::addmm)");
  m.def(
      "_set_cpu_path",
      [](const std::string& name) {
        rnnfused::cpu::set_cpu_path(rnnfused::cpu::parse_cpu_path(name, "_set_cpu_path: the path"));
      },
      "Testing hook: run the CPU time loops on 'auto', 'fused' (the engine) or 'steps' (per-step GEMMs)");
  m.def("_cpu_engine_runs", &rnnfused::cpu::engine_runs,
        "Testing hook: whether a call of this many rows (no projection) of a cell of this many gate blocks "
        "(4 LSTM, 3 GRU, 1 Elman RNN), in training (a forward recording the workspace, or a backward) or not, "
        "runs on the engine under the current path",
        py::arg("batch"), py::arg("gates"), py::arg("training"));
  m.def("_cpu_engine_projects_input", &rnnfused::cpu::engine_projects_input,
        "Whether layer_inference projects the input inside the engine for (batch, G * hidden, hidden, input_size, "
        "element size)");
  m.def("_set_cpu_engine_projection_override", &rnnfused::cpu::set_engine_projection_override,
        "Testing hook: 1 makes layer_inference project inside the engine wherever it runs, -1 never, 0 by the rule");
  m.def("_cpu_engine_blas_product", &rnnfused::cpu::engine_blas_product,
        "Whether the engine runs its products as per-slice BLAS GEMMs (layer_inference, the recurrence ops' "
        "forward and backward) for (batch, element size, every step has the full batch, gate blocks)");
  m.def("_cpu_blas_packs", &rnnfused::cpu::blas_packs_float,
        "Whether the CPU time loops' float32 GEMMs use MKL's packed GEMM (libtorch exports it)");
  m.def("_cpu_is_intel", &rnnfused::cpu::cpu_is_intel,
        "Whether the processor is Intel's (the engine runs MKL's per-slice GEMMs at 2-16 rows only there)");
  m.def("_set_cpu_vendor_override", &rnnfused::cpu::set_cpu_vendor_override,
        "Testing hook: 1 makes _cpu_is_intel() answer True, -1 False, 0 detects");
  m.def("_set_cpu_engine_blas_override", &rnnfused::cpu::set_engine_blas_override,
        "Testing hook: 1 makes the engine use its BLAS products wherever the BLAS is libtorch's and the path "
        "is not 'steps', -1 never, 0 by the rule");
  m.def("_cpu_engine_blas_calls", &rnnfused::cpu::engine_blas_calls,
        "Testing hook: how many engine calls (forward or backward) ran the per-slice BLAS products (since load)");
  m.def("_set_cpu_engine_straggler_delay_us", &rnnfused::cpu::set_engine_straggler_delay_us,
        "Testing hook: the threads owning slices other than the first sleep this long before each phase, and in "
        "the per-step path the threads other than the calling one before their share of each gate pass");
  m.def("_cpu_engine_takeovers", &rnnfused::cpu::engine_takeovers,
        "Testing hook: how many phases a thread has run for a late slice's owner (since load)");
  m.def("_set_cpu_engine_straggler_inside_phase", &rnnfused::cpu::set_engine_straggler_delay_inside_phase,
        "Testing hook: the straggler delay comes after the thread claimed its phase (a thread that lost its "
        "core in the middle of a phase) instead of before");
  m.def("_set_cpu_engine_straggler_before_start", &rnnfused::cpu::set_engine_straggler_delay_before_start,
        "Testing hook: the straggler delay comes once, before the thread starts running the team (a thread that "
        "has no core when the team starts) instead of before each phase");
  m.def("_cpu_engine_stalls", &rnnfused::cpu::engine_stalls,
        "Testing hook: how many stalled teams were noted: a thread waited at least 2 ms (and 8 times the last team's "
        "average phase) for a phase that another thread was running, or at least a quarter of the team's phases (and 8) "
        "were taken over; or a per-step call stalled: a gate pass whose threads finished 2 ms apart, a step that took "
        "2 ms and 8 times the fastest step of as many rows, or at least an eighth of the split passes (and 4) 250 us "
        "apart (since load)");
  m.def("_note_cpu_engine_team_stall", &rnnfused::cpu::note_engine_team_stall,
        "Testing hook: note a stalled team now (the next teams run on one thread; the next period doubles)");
  m.def("_cpu_engine_solo_period_ms", &rnnfused::cpu::engine_solo_period_ms,
        "Testing hook: how long the teams after the next stall will run on one thread (ms)");
  m.def("_cpu_engine_solo_runs", &rnnfused::cpu::engine_solo_runs,
        "Testing hook: how many engine teams and recurrence calls ran on their calling thread alone because of a "
        "recent stall, and per-step calls that went on alone after stalling (since load)");
  m.def("_end_cpu_engine_solo", &rnnfused::cpu::end_engine_solo,
        "Testing hook: teams use all their threads again from now, whatever the last stall; the next "
        "one-thread period is the shortest again");
  // A context manager: inside it, within a one-thread period, this thread's GEMMs run on one thread.
  struct OneThreadPeriodScope {
    std::unique_ptr<rnnfused::cpu::OneThreadBlas> one_thread;
  };
  py::class_<OneThreadPeriodScope>(
      m, "_CpuOneThreadPeriod",
      "Within a one-thread period after a stall (another process took a core), the calling thread's MKL and "
      "OpenMP calls inside the block run on one thread (counted as a one-thread run); otherwise nothing "
      "changes. __enter__ returns whether it applied.")
      .def(py::init<>())
      .def("__enter__",
           [](OneThreadPeriodScope& scope) {
             scope.one_thread = rnnfused::cpu::one_thread_in_period();
             return scope.one_thread != nullptr;
           })
      .def("__exit__", [](OneThreadPeriodScope& scope, const py::args&) {
        scope.one_thread.reset();
        return false;
      });
  m.def(
      "_cpu_bulk_mm",
      [](const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias,
         const c10::optional<at::Tensor>& out) { return rnnfused::cpu::bulk_mm(a, b, bias, out); },
      py::arg("a"), py::arg("b"), py::arg("bias") = py::none(), py::arg("out") = py::none(),
      "a @ b (+ bias), into out where given: the input projection and the GEMMs of its backward "
      "(csrc/cpu/bulk_gemm.h); torch.mm / torch.addmm exactly where the brgemm rule says no");
  m.def(
      "_cpu_bulk_gemm_uses_brgemm",
      [](int64_t m, int64_t n, int64_t k) { return rnnfused::cpu::bulk_gemm_uses_brgemm(at::kFloat, m, n, k); },
      "Whether a float32 [m, k] x [k, n] product of _cpu_bulk_mm runs on oneDNN's brgemm micro-kernel");
  m.def("_cpu_step_gemm_uses_brgemm", &rnnfused::cpu::step_gemm_uses_brgemm,
        "Whether the fused engine's per-slice float32 products run on oneDNN's brgemm micro-kernel");
  m.def("_cpu_bulk_gemm_mode", &rnnfused::cpu::bulk_gemm_mode,
        "The rule of _cpu_bulk_mm: 'auto', 'blas' or 'brgemm' (RNNFUSED_CPU_GEMM)");
  m.def("_set_cpu_bulk_gemm_mode", [](const std::string& mode) { rnnfused::cpu::set_bulk_gemm_mode(mode.c_str()); },
        "Testing hook: sets the rule of _cpu_bulk_mm ('auto', 'blas' or 'brgemm')");
  m.def("_cpu_bulk_brgemm_available", &rnnfused::cpu::bulk_brgemm_available,
        "Whether this torch ships oneDNN's float32 brgemm micro-kernel (and torch.backends.mkldnn is enabled)");
  m.def("_cpu_bulk_brgemm_calls", &rnnfused::cpu::bulk_brgemm_calls,
        "Testing hook: the products _cpu_bulk_mm and the ops' backward ran on the micro-kernel since load");
  m.def("_cpu_one_thread_period_applies", &rnnfused::cpu::one_thread_period_applies,
        "Whether _CpuOneThreadPeriod would put the calling thread on one thread now");
  m.def("_cpu_engine_min_flops", &rnnfused::cpu::engine_min_flops_per_thread,
        "Testing hook: the per-step work each thread of the engine's team must have");
  m.def("_set_cpu_engine_min_flops", &rnnfused::cpu::set_engine_min_flops_per_thread,
        "Testing hook: set it (0: one thread per unit block, up to torch's thread count)");
  m.def(
      "cpu_buffer_cache_stats",
      [] {
        const auto s = rnnfused::cpu::buffer_cache_stats();
        return std::make_tuple(s.held_bytes, s.lent_bytes, s.limit_bytes, s.reuses);
      },
      "The CPU ops' cache of large buffers (csrc/cpu/buffer_cache.h): (bytes of free blocks held, bytes lent to "
      "live tensors, cap on the first, requests served from a held block)");
  m.def("empty_cpu_buffer_cache", &rnnfused::cpu::empty_buffer_cache,
        "Returns every free block of the CPU ops' buffer cache to the system");
  m.def("_set_cpu_buffer_cache_limit", &rnnfused::cpu::set_buffer_cache_limit,
        "Sets the cap on the free blocks the CPU buffer cache holds, in bytes (0 turns it off)");
  m.def(
      "_cpu_empty_recycled",
      [](std::vector<int64_t> sizes, const at::Tensor& like) {
        TORCH_CHECK(like.device().is_cpu(), "_cpu_empty_recycled: CPU tensors only");
        return rnnfused::cpu::empty_recycled(sizes, at::TensorOptions().dtype(like.scalar_type()));
      },
      "torch.empty(sizes, dtype=like.dtype) on the CPU through the buffer cache (rnnfused.functional's "
      "projections)");
  m.attr("_cpu_recycled_min_bytes") = rnnfused::cpu::kRecycledMinBytes;
  m.def("_set_cpu_buffer_cache_poison", &rnnfused::cpu::set_buffer_cache_poison,
        "Testing hook: fill every block the CPU buffer cache hands out with 0xFF bytes (NaN) first");
}
