// rnnfused._sim_C: the test build of rnnfused's CUDA path on the CUDA simulator. Not part of the
// shipped extension: setup.py builds it only with RNNFUSED_BUILD_SIM=1 (make test does).
//
// It defines the ops rnnfused_sim::* (the schemas of rnnfused::*), whose CPU kernels are the
// CUDA host code and kernels of csrc/cuda/ (recurrence_sim.cpp), and exposes the simulator's
// configuration and the self-test kernels (csrc/cuda/selftest_kernels.cuh) to the tests.
#include <torch/extension.h>
#include <torch/library.h>

#include "../../op_schemas.h"
#include "../selftest_kernels.cuh"
#include "runtime.h"

TORCH_LIBRARY(rnnfused_sim, m) {
  rnnfused::define_recurrence_ops(m);
  rnnfused::define_layer_norm_ops(m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace sim = rnnfused::sim;
  // Every CPU tensor made from now on is registered as simulated device memory.
  sim::install_tracking_allocator();
  m.doc() = "rnnfused's CUDA path on the CUDA simulator (test build)";
  m.def(
      "configure",
      [](int sm_count, bool check_global_races) {
        TORCH_CHECK(sm_count > 0, "sm_count must be positive");
        sim::config().sm_count = sm_count;
        sim::config().check_global_races = check_global_races;
      },
      "Set the simulated device's multiprocessor count and whether global accesses are race-checked",
      pybind11::arg("sm_count"), pybind11::arg("check_global_races"));
  m.def(
      "configure_limits",
      [](int max_threads_per_sm, int64_t shared_per_block) {
        TORCH_CHECK(max_threads_per_sm > 0 && shared_per_block > 0, "limits must be positive");
        const auto previous = std::make_tuple(sim::config().max_threads_per_sm,
                                              static_cast<int64_t>(sim::config().shared_per_block));
        sim::config().max_threads_per_sm = max_threads_per_sm;
        sim::config().shared_per_block = static_cast<size_t>(shared_per_block);
        return previous;
      },
      "Set the simulated device's threads per multiprocessor (which bounds a cooperative grid) and dynamic "
      "shared memory per block; returns the previous values",
      pybind11::arg("max_threads_per_sm"), pybind11::arg("shared_per_block"));
  m.def("sm_count", [] { return sim::config().sm_count; });
  m.def("check_global_races", [] { return sim::config().check_global_races; });
  m.def("launch_count", &sim::launch_count, "Kernel launches run on the simulator so far");
  m.def("last_kernel", &sim::last_kernel, "The name of the latest kernel launched on the simulator");
  m.def("selftest", &rnnfused::cuda::selftest::run, "Run a self-test kernel (bug = 0: its correct form)",
        pybind11::arg("name"), pybind11::arg("bug"), pybind11::arg("input"));
}
