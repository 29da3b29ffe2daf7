"""rnnfused's CUDA path, run on the CPU by the CUDA simulator (csrc/cuda/sim/, rnnfused/_sim.py).

The ops rnnfused_sim::* are the host code and kernels of csrc/cuda/ compiled for the simulator:
every kernel launch runs thread by thread with its memory accesses bounds- and race-checked and
its barriers and warp operations checked. Here they meet the same tests as the CPU path: the
parity grid against torch.nn (float64, tight), agreement with rnnfused's CPU kernels (float32,
bfloat16, float16), gradcheck of every op, at sizes that use several blocks and several warps.
The simulator's own checks are proven by kernels with planted bugs that it must report.

This module needs the test build (RNNFUSED_BUILD_SIM=1, which `make test` sets); without it every
test here fails (the rest of the suite still runs) rather than skips.
"""
import itertools

import pytest
import torch

import rnnfused
from rnnfused import _sim, functional
from helpers import (
    LAYER_MODES,
    TOLERANCES,
        assert_close_in_ulps,
    assert_twins_agree,
    check_selftest_kernels,
    forward_backward,
    sequence_inputs,
    twin_layers,
)
from test_ops import GATES, _op_cases, _opcheck_cases, _recurrence_args, assert_gradcheck

# Sizes that spread every launch over several blocks of several warps: the pointwise kernels
# run one thread per element of a step's [rows, H] block in blocks of 256 threads, so 9 x 40 =
# 360 threads are two blocks and 12 warps; with one multiprocessor the grid is capped at 8
# blocks (2048 threads), so the larger case below also runs the grid-stride loop.
STEPS, BATCH, INPUT, HIDDEN, PROJ = 5, 9, 5, 40, 7
FORMS = ["padded", "unbatched", "packed_sorted", "packed_unsorted"]


# The persistent path's tests run on a device of PERSISTENT_SMS multiprocessors: one block each,
# so HIDDEN = 40 units are split 14 + 14 + 12 and PROJ = 7 columns 3 + 3 + 1 (test_ops' sizes,
# H = 3 and P = 2, give blocks of one unit and a block with no column).
PERSISTENT_SMS = 3


@pytest.fixture(autouse=True)
def simulated(request, monkeypatch):
    """Every test runs with rnnfused's layers routed to the simulated CUDA ops, on a simulated
    device of one multiprocessor, on the standard path unless it asks for the `path` fixture,
    and checks that kernels really ran there."""
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "standard")
    if not _sim.available():
        pytest.fail(
            "rnnfused was built without the CUDA simulator (rnnfused._sim_C); rebuild with "
            "RNNFUSED_BUILD_SIM=1 pip install --no-build-isolation -e . (make test does)",
            pytrace=False,
        )
    before = _sim.launch_count()
    with _sim.simulated_cuda(sm_count=1, check_global_races=True):
        yield
    if "no_launch_check" not in request.keywords:
        assert _sim.launch_count() > before, "no kernel ran on the simulator"


@pytest.fixture(params=["standard", "persistent"])
def path(request, monkeypatch):
    """Runs the test on each CUDA path (forced by RNNFUSED_CUDA_PATH): the per-step loop, and the
    persistent kernels on a device of several multiprocessors (so that they use several blocks)."""
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", request.param)
    if request.param == "standard":
        yield request.param
    else:
        with _sim.simulated_cuda(sm_count=PERSISTENT_SMS):
            yield request.param


def state_shapes(mode, layers, bidirectional, batch, hidden, proj):
    directions = 2 if bidirectional else 1
    h_shape = (layers * directions, batch, proj or hidden)
    return [h_shape, (layers * directions, batch, hidden)] if mode == "lstm" else [h_shape]


# ----------------------------------------------------------------------------------------------
# Parity with torch.nn (float64)
# ----------------------------------------------------------------------------------------------


def _grid():
    for mode in LAYER_MODES:
        for layers, bidirectional, proj, form, with_hx in itertools.product(
            (1, 2), (False, True), (0, PROJ) if mode == "lstm" else (0,), FORMS, (False, True)
        ):
            name = (
                f"{mode}-L{layers}-{'bi' if bidirectional else 'uni'}-P{proj}-{form}-{'hx' if with_hx else 'nohx'}"
            )
            yield pytest.param(mode, layers, bidirectional, proj, form, with_hx, id=name)


@pytest.mark.parametrize("mode,layers,bidirectional,proj,form,with_hx", list(_grid()))
def test_layer_parity_float64(mode, layers, bidirectional, proj, form, with_hx, path):
    kwargs = dict(num_layers=layers, bidirectional=bidirectional)
    if proj:
        kwargs["proj_size"] = proj
    ref, ours = twin_layers(mode, INPUT, HIDDEN, **kwargs)
    shapes = state_shapes(mode, layers, bidirectional, BATCH, HIDDEN, proj) if with_hx else None
    make = sequence_inputs(form, STEPS, BATCH, INPUT, shapes, torch.float64)
    assert_twins_agree(ref, ours, make)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_layer_parity_no_bias_batch_first(mode, path):
    ref, ours = twin_layers(mode, INPUT, HIDDEN, num_layers=2, bidirectional=True, bias=False, batch_first=True)
    shapes = state_shapes(mode, 2, True, BATCH, HIDDEN, 0)
    make = sequence_inputs("packed_unsorted", STEPS, BATCH, INPUT, shapes, torch.float64, batch_first=True)
    assert_twins_agree(ref, ours, make)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_layer_parity_grid_stride(mode):
    """16 x 160 = 2560 threads per step on a grid capped at 8 blocks of 256: the kernels' grid-stride
    loops take a second turn."""
    ref, ours = twin_layers(mode, 6, 160, num_layers=1)
    make = sequence_inputs("packed_unsorted", 3, 16, 6, state_shapes(mode, 1, False, 16, 160, 0), torch.float64)
    assert_twins_agree(ref, ours, make)


def test_cells_run_on_the_simulated_path(path):
    torch.manual_seed(0)
    for ref_cls, our_cls in ((torch.nn.LSTMCell, rnnfused.LSTMCell), (torch.nn.GRUCell, rnnfused.GRUCell),
                             (torch.nn.RNNCell, rnnfused.RNNCell)):
        ref = ref_cls(INPUT, HIDDEN, dtype=torch.float64)
        ours = our_cls(INPUT, HIDDEN, dtype=torch.float64)
        ours.load_state_dict(ref.state_dict())

        def make():
            x = torch.randn(BATCH, INPUT, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            x.requires_grad_()
            return [x], (x,)

        assert_twins_agree(ref, ours, make)


# ----------------------------------------------------------------------------------------------
# Agreement with rnnfused's CPU kernels (float32, bfloat16, float16)
# ----------------------------------------------------------------------------------------------

# The simulated CUDA path and the CPU path compute the same formulas (csrc/cell_math.h) in the
# same order; they differ in the GEMMs' summation order and in exp/tanh (scalar libm here, SIMD on
# the CPU path): they are compared within a few units of the dtype's precision (helpers.ULPS).
@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("form", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_agrees_with_cpu_kernels(mode, form, dtype, path):
    kwargs = dict(num_layers=2, bidirectional=True)
    proj = PROJ if mode == "lstm" and form == "padded" else 0
    if proj:
        kwargs["proj_size"] = proj
    shapes = state_shapes(mode, 2, True, BATCH, HIDDEN, proj)
    seed = first_seed_clear_of_relu_edges(form, dtype, kwargs, shapes) if mode == "rnn_relu" else 1
    _, ours = twin_layers(mode, INPUT, HIDDEN, seed=seed, **kwargs)
    ours.to(dtype)
    make = sequence_inputs(form, STEPS, BATCH, INPUT, shapes, dtype)
    assert_agrees_with_cpu_kernels(ours, make, dtype)


def assert_agrees_with_cpu_kernels(module, make, dtype):
    """module's outputs and gradients on the simulated path (the current context) and on rnnfused's
    CPU kernels agree within a few units of the dtype."""
    sim_out, sim_grads = forward_backward(module, make)
    saved, functional._ops_ns = functional._ops_ns, torch.ops.rnnfused  # the CPU kernels
    try:
        cpu_out, cpu_grads = forward_backward(module, make)
    finally:
        functional._ops_ns = saved
    assert_close_in_ulps(sim_out, cpu_out, dtype, "outputs")
    assert_close_in_ulps(sim_grads, cpu_grads, dtype, "gradients")


# ReLU's kink turns a difference of one rounding in a pre-activation into a different gradient:
# where a pre-activation p lies within the float32 sums' error of 0 (the branch taken), or, in a
# 16-bit network, of a midpoint between two 16-bit values (h_t = round(relu(p)) then differs by a
# unit, and the next steps' pre-activations with it), two correct implementations that sum in
# another order disagree by whole upstream gradients. Such a network cannot compare the kernels'
# gradients, so the comparison above runs on the first seed whose network takes the same branches
# on both paths: in 16 bits, every recurrence's outputs are equal bit for bit on the two paths (the
# rounding to 16 bits absorbs the sums' order elsewhere, and equal outputs give equal branches); in
# float32, whose outputs differ in the last bits, every pre-activation is farther from 0 than the
# bound on the error of a float32 sum of n = H + 2 terms, n u sum |terms| (u = 2^-24). With seed 1
# the float16 packed network has an h_t at a midpoint where MKL's Zen kernels and the simulator
# round apart (2026-11-30); on Intel's MKL kernels it does not.
def first_seed_clear_of_relu_edges(form, dtype, kwargs, shapes, tries=20):
    for seed in range(1, tries + 1):
        _, module = twin_layers("rnn_relu", INPUT, HIDDEN, seed=seed, **kwargs)
        module.to(dtype)
        make = sequence_inputs(form, STEPS, BATCH, INPUT, shapes, dtype)
        cpu_calls = recorded_relu_recurrences(module, make, torch.ops.rnnfused)
        if dtype == torch.float32:
            clear = all(relu_recurrence_clear_of_kink(args, result) for args, result in cpu_calls)
        else:
            sim_calls = recorded_relu_recurrences(module, make, functional._ops_ns)
            clear = all(
                torch.equal(ours, theirs)
                for (_, sim_result), (_, cpu_result) in zip(sim_calls, cpu_calls)
                for ours, theirs in zip(sim_result, cpu_result)
            )
        if clear:
            return seed
    pytest.fail(f"no seed of {tries} gives a {dtype} ReLU network that takes the same branches on both paths")


def recorded_relu_recurrences(module, make, namespace):
    """(args, result) of every rnn_relu_recurrence call of one forward of module on namespace's ops."""
    calls = []

    class Recording:
        def __getattr__(self, name):
            op = getattr(namespace, name)
            if name != "rnn_relu_recurrence":
                return op

            def recorded(*args):
                result = op(*args)
                calls.append((args, result))
                return result

            return recorded

    saved, functional._ops_ns = functional._ops_ns, Recording()
    try:
        _, args = make()
        module(*args)
    finally:
        functional._ops_ns = saved
    assert len(calls) == 4, "expected one recurrence per layer and direction"
    return calls


def relu_recurrence_clear_of_kink(args, result):
    """True where every pre-activation p = gates_x + bias + h_{t-1} W_hh^T of one float32
    rnn_relu_recurrence call (recomputed in float64 from its inputs and its outputs h_t) is
    farther from 0 than the error bound of its float32 sum."""
    gates_x, w_hh, bias, h0, batch_sizes, reverse = args[:6]
    w = w_hh.double()
    hidden = w.shape[0]
    gx = gates_x.double().reshape(-1, hidden)
    out = result[0].double().reshape(-1, hidden)
    h0 = h0.double()
    b = bias.double() if bias is not None else torch.zeros(hidden, dtype=torch.float64)
    sizes = [h0.shape[0]] * (gx.shape[0] // h0.shape[0]) if batch_sizes is None else batch_sizes.tolist()
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    previous = None
    for t in reversed(range(len(sizes))) if reverse else range(len(sizes)):
        rows = slice(offsets[t], offsets[t] + sizes[t])
        h_prev = h0[: sizes[t]].clone()
        if previous is not None:  # packed: the rows still running carry their step's h
            carried = min(sizes[t], sizes[previous])
            h_prev[:carried] = out[offsets[previous] : offsets[previous] + carried]
        p = gx[rows] + b + h_prev @ w.t()
        bound = (hidden + 2) * 2.0**-24 * (gx[rows].abs() + b.abs() + h_prev.abs() @ w.abs().t())
        if bool((p.abs() <= bound).any()):
            return False
        previous = t
    return True


# ----------------------------------------------------------------------------------------------
# The ops: gradcheck on the simulated path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_op_cases()))
def test_gradcheck(mode, packed, reverse, bias, proj, path):
    assert_gradcheck(mode, _recurrence_args(mode, packed, reverse, bias, proj, requires_grad=True), _sim.ops)


@pytest.mark.parametrize("mode", list(GATES))
def test_ops_match_cpu_ops_exactly_in_shape_and_dtype(mode, path):
    """Every output of the simulated forward op has the CPU op's shape and dtype (one fake kernel
    serves both), and float64 values agree to rounding."""
    args = _recurrence_args(mode, True, True, True, 2 if mode == "lstm" else 0, False)
    flag = (True,) if mode in ("lstm", "gru") else ()
    sim_res = getattr(_sim.ops, f"{mode}_recurrence")(*args, *flag)
    cpu_res = getattr(torch.ops.rnnfused, f"{mode}_recurrence")(*args, *flag)
    for s, c in zip(sim_res, cpu_res):
        assert s.shape == c.shape and s.dtype == c.dtype and s.is_contiguous()
        torch.testing.assert_close(s, c, **TOLERANCES[torch.float64])


# ----------------------------------------------------------------------------------------------
# The simulator itself: correct kernels give the right numbers, planted bugs are reported
# ----------------------------------------------------------------------------------------------


def test_selftest_kernels_compute_what_they_should():
    check_selftest_kernels(lambda name, values: _sim.selftest(name, 0, values))


PLANTED_BUGS = [
    # (kernel, bug, input, what the report must say)
    ("neighbour_exchange", 1, torch.arange(64.0), r"race on shared memory 'tile'.*no barrier"),
    ("neighbour_exchange", 2, torch.arange(64.0), r"shared memory access out of bounds: writes 4 bytes at byte offset 256"),
    ("neighbour_exchange", 3, torch.arange(64.0), r"reads shared memory 'tile' .*\(uninitialized shared memory\)"),
    ("scale", 1, torch.ones(1000), r"global memory access out of bounds: reads 4 bytes at byte offset 4000 of "
                                   r"global memory \(an allocation of 4000 bytes\)"),
    ("scale", 2, torch.ones(1000), r"race on global memory .* wrote it with no barrier"),
    ("warp_sum", 1, torch.ones(32), r"__shfl_down_sync.*not in the mask 0x0000ffff"),
    ("warp_sum", 2, torch.ones(32), r"exited while lanes .* wait for it in __shfl_down_sync with mask 0xffffffff"),
    ("half_warp_exchange", 1, torch.ones(32), r"race on shared memory 'tile'"),
    ("half_warp_exchange", 2, torch.ones(32), r"race on shared memory 'tile'"),
    ("grid_exchange", 1, torch.ones(128), r"exited while 96 threads wait at the grid-wide barrier"),
    ("grid_exchange", 2, torch.ones(128), r"race on global memory .* block \(0,0,0\) read it"),
    ("grid_exchange_not_cooperative", 0, torch.ones(128), r"grid-wide barrier in a launch that is not cooperative"),
    ("divergent_barrier", 1, torch.ones(64), r"__syncthreads\(\) is not reached by every thread of the block"),
    ("broadcast_then_overwrite", 1, torch.ones(64),
     r"thread \(62,0,0\): race on shared memory 'cell' .* this thread writes it, and .* read it"),
    ("atomic_sum", 1, torch.ones(300), r"race on global memory .* atomically updates it"),
    ("vector_copy", 1, torch.ones(1000), r"misaligned access: reads 16 bytes at byte offset 4 .* alignment 16"),
]


@pytest.mark.parametrize("kernel,bug,values,report", PLANTED_BUGS,
                         ids=[f"{k}-bug{b}" for k, b, _, _ in PLANTED_BUGS])
def test_planted_bug_is_reported(kernel, bug, values, report):
    with pytest.raises(RuntimeError, match=report) as error:
        _sim.selftest(kernel, bug, values)
    assert f"kernel {kernel.replace('_not_cooperative', '')}" in str(error.value)


def test_cooperative_launch_larger_than_the_device_is_refused():
    # One multiprocessor holds 2048 threads: 64 blocks of 32 (what the occupancy query says); the
    # 65th cannot be co-resident.
    assert _sim.selftest("grid_exchange_max", 0, torch.ones(4)).numel() == 64 * 32
    _sim.selftest("grid_exchange", 0, torch.ones(32 * 64))
    with pytest.raises(RuntimeError, match=r"at most 64 blocks fit on the device at once"):
        _sim.selftest("grid_exchange", 0, torch.ones(32 * 65))


@pytest.mark.no_launch_check
def test_a_tensor_from_outside_the_simulator_is_not_device_memory():
    """Memory the simulator did not allocate (here numpy's) is refused by the bounds checker, as a
    host pointer would fault on a GPU."""
    import numpy as np

    outside = torch.from_numpy(np.ones(64, dtype=np.float32))
    with pytest.raises(RuntimeError, match=r"pointer into no device allocation"):
        _sim.selftest("neighbour_exchange", 0, outside)


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_opcheck_cases()))
def test_opcheck_forward(mode, packed, reverse, bias, proj, path):
    """The simulated ops carry rnnfused's schemas, fake kernels and autograd (rnnfused/_ops.py
    registers them for both libraries): torch.library.opcheck passes on them as on the CPU ops."""
    args = _recurrence_args(mode, packed, reverse, bias, proj, True, dtype=torch.float32)
    op = getattr(_sim.ops, f"{mode}_recurrence").default
    for flag in ((False,), (True,)) if mode in ("lstm", "gru") else ((),):
        torch.library.opcheck(op, args + flag)


# ----------------------------------------------------------------------------------------------
# Choosing between the standard and the persistent path (RNNFUSED_CUDA_PATH)
# ----------------------------------------------------------------------------------------------


def _forward_op_call(mode, batch, steps=5, hidden=HIDDEN, dtype=torch.float64):
    """Runs one forward op on the simulated path; returns its results and the kernels it launched."""
    g = torch.Generator().manual_seed(7)
    gates = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[mode]
    gates_x = torch.randn(steps * batch, gates * hidden, generator=g, dtype=dtype)
    w_hh = torch.randn(gates * hidden, hidden, generator=g, dtype=dtype) * 0.2
    b_hh = torch.randn(gates * hidden, generator=g, dtype=dtype)
    h0 = torch.randn(batch, hidden, generator=g, dtype=dtype)
    if mode == "lstm":
        args = (gates_x, w_hh, b_hh, None, h0, torch.randn(batch, hidden, generator=g, dtype=dtype), None, False, True)
    elif mode == "gru":
        args = (gates_x, w_hh, b_hh, h0, None, False, True)
    else:
        args = (gates_x, w_hh, b_hh, h0, None, False)
    before = _sim.launch_count()
    result = getattr(_sim.ops, f"{mode}_recurrence")(*args)
    return result, _sim.launch_count() - before


@pytest.mark.parametrize("mode", list(GATES))
def test_auto_path_is_persistent_up_to_batch_64(mode, monkeypatch):
    """One launch for the whole sequence where the weights fit and B <= 64; one launch per step
    (the GEMMs run outside the simulator) beyond; the same numbers either way."""
    with _sim.simulated_cuda(sm_count=PERSISTENT_SMS, check_global_races=False):
        for batch, launches in ((64, 1), (65, 5)):
            monkeypatch.setenv("RNNFUSED_CUDA_PATH", "auto")
            auto, auto_launches = _forward_op_call(mode, batch, hidden=8)
            assert auto_launches == launches, f"B={batch}: {auto_launches} launches"
            monkeypatch.setenv("RNNFUSED_CUDA_PATH", "standard")
            standard, _ = _forward_op_call(mode, batch, hidden=8)
            for a, s in zip(auto, standard):
                torch.testing.assert_close(a, s, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("limits,reason", [
    # 14 units x 4 gates x 40 columns x 8 bytes = 17920 bytes per block
    (dict(max_threads_per_sm=2048, shared_per_block=1024),
     r"its slice of the recurrent weights needs 17920 bytes of shared memory per block over 3 blocks, more than "
     r"the 1024 a block can have on this device"),
    (dict(max_threads_per_sm=128, shared_per_block=227 * 1024),
     r"its grid of 3 blocks cannot be resident at once \(0 fit\)"),
])
def test_a_call_the_persistent_kernel_cannot_run(limits, reason, monkeypatch):
    """Weights too large for a block's shared memory, or a grid that cannot be co-resident (a grid
    barrier would never complete): auto takes the standard path, a forced persistent path says why
    it cannot run."""
    with _sim.simulated_cuda(sm_count=PERSISTENT_SMS), _sim.device_limits(**limits):
        monkeypatch.setenv("RNNFUSED_CUDA_PATH", "auto")
        _, launches = _forward_op_call("lstm", 4, hidden=40)
        assert launches == 5
        monkeypatch.setenv("RNNFUSED_CUDA_PATH", "persistent")
        with pytest.raises(RuntimeError, match=r"rnnfused::lstm_recurrence: RNNFUSED_CUDA_PATH=persistent, but the "
                                               r"persistent kernel cannot run this call: " + reason):
            _forward_op_call("lstm", 4, hidden=40)


@pytest.mark.no_launch_check
def test_unknown_path_is_refused(monkeypatch):
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "fastest")
    with pytest.raises(RuntimeError, match=r"RNNFUSED_CUDA_PATH must be 'auto', 'standard' or 'persistent', got "
                                           r"'fastest'"):
        _forward_op_call("gru", 2)


@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("dtype,suffix", [(torch.float64, ""), (torch.float32, ""), (torch.bfloat16, "_mma"),
                                          (torch.float16, "_mma")])
def test_persistent_forward_kernel_of_each_dtype(mode, dtype, suffix, monkeypatch):
    """float32 / float64 run the FMA kernel; bfloat16 / float16 the tensor-core (mma.sync) kernel."""
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "persistent")
    with _sim.simulated_cuda(sm_count=PERSISTENT_SMS, check_global_races=False):
        _forward_op_call(mode, 9, hidden=20, dtype=dtype)
    assert _sim.last_kernel() == f"persistent_{mode.split('_')[0]}_forward{suffix}"


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_path_at_a_larger_shape_agrees_with_cpu_kernels(mode, dtype, monkeypatch):
    """H = 70 over 4 blocks (18 + 18 + 18 + 16 units: tensor-core tiles with unused rows, K padded
    from 70 to 80), a packed batch of 20 (three batch tiles of 8, the last partial, shrinking
    over the steps so that the K steps are split over warps at the end), bidirectional (reverse:
    rows start from h0 as the batch grows)."""
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "persistent")
    _, ours = twin_layers(mode, 6, 70, seed=4, bidirectional=True)
    ours.to(dtype)
    make = sequence_inputs("packed_unsorted", 4, 20, 6, state_shapes(mode, 1, True, 20, 70, 0), dtype)
    with _sim.simulated_cuda(sm_count=4, check_global_races=False):
        assert_agrees_with_cpu_kernels(ours, make, dtype)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_second_derivatives_on_the_simulated_path(mode, path):
    """A gradient penalty through the simulated CUDA ops: the same as torch.nn's (the first-order
    backward runs the simulated kernels, the second order rnnfused's reference recurrence)."""
    kwargs = dict(bidirectional=True, proj_size=3) if mode == "lstm" else dict(bidirectional=True)
    ref, ours = twin_layers(mode, 4, 7, **kwargs)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for module in (ref, ours):
        inp = x.clone().requires_grad_()
        packed = torch.nn.utils.rnn.pack_padded_sequence(inp, [5, 3, 2])
        out, state = module(packed)
        states = state if isinstance(state, tuple) else (state,)
        loss = (out.data * out.data).sum() + sum(s.sum() for s in states)
        params = list(module.parameters())
        first = torch.autograd.grad(loss, [inp] + params, create_graph=True)
        results.append(torch.autograd.grad(sum((f * f).sum() for f in first), [inp] + params))
    for r, o in zip(*results):
        torch.testing.assert_close(o, r, rtol=1e-8, atol=1e-10)
