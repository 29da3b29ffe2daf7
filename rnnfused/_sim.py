"""rnnfused's CUDA path on the CUDA simulator: a test build, not part of the shipped library.

With ``RNNFUSED_BUILD_SIM=1`` (``make test`` sets it) setup.py also builds ``rnnfused._sim_C``: the
host code and kernels of ``csrc/cuda/`` compiled by the host compiler against the simulator of
``csrc/cuda/sim/``. Its ops ``torch.ops.rnnfused_sim.*`` have rnnfused's schemas and run the CUDA
time loops on CPU tensors, each kernel launch executed thread by thread with its memory accesses,
barriers and warp operations checked. ``simulated_cuda()`` routes rnnfused's modules to them.

Importing this module installs the simulator's CPU allocator (every CPU tensor made afterwards is
registered as simulated device memory, so kernels can be bounds-checked against it).
"""
import contextlib

import torch

from . import _ops, functional

try:
    from . import _sim_C
except ImportError:  # a build without RNNFUSED_BUILD_SIM=1
    _sim_C = None


def available():
    """Whether this build carries the simulated CUDA path."""
    return _sim_C is not None


if _sim_C is not None:
    _ops.register("rnnfused_sim")
    _ops.register_layer_norm("rnnfused_sim")
    ops = torch.ops.rnnfused_sim
    configure = _sim_C.configure
    selftest = _sim_C.selftest
    launch_count = _sim_C.launch_count
    last_kernel = _sim_C.last_kernel


@contextlib.contextmanager
def device_limits(max_threads_per_sm, shared_per_block):
    """Within the block, the simulated device has these limits: threads per multiprocessor (which
    bounds how many blocks of a cooperative launch can be co-resident) and dynamic shared memory per
    block (which bounds the persistent kernels' weight slices)."""
    if _sim_C is None:
        raise RuntimeError("rnnfused was built without the CUDA simulator; rebuild with RNNFUSED_BUILD_SIM=1")
    saved = _sim_C.configure_limits(max_threads_per_sm, shared_per_block)
    try:
        yield
    finally:
        _sim_C.configure_limits(*saved)


@contextlib.contextmanager
def simulated_cuda(sm_count=None, check_global_races=None):
    """Within the block, rnnfused's layers and cells run their recurrences on the simulated CUDA
    path (CPU tensors in, CPU tensors out). ``sm_count`` and ``check_global_races`` set the
    simulated device for the block (kernels size their grids by the multiprocessor count)."""
    if _sim_C is None:
        raise RuntimeError("rnnfused was built without the CUDA simulator; rebuild with RNNFUSED_BUILD_SIM=1")
    saved_ops, saved = functional._ops_ns, (_sim_C.sm_count(), _sim_C.check_global_races())
    configure(saved[0] if sm_count is None else sm_count, saved[1] if check_global_races is None else check_global_races)
    functional._ops_ns = ops
    try:
        yield
    finally:
        functional._ops_ns = saved_ops
        configure(*saved)
