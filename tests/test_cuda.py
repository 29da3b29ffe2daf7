"""rnnfused's CUDA kernels: parity with torch.nn on the same GPU (cuDNN) and with rnnfused's own
CPU kernels, at one-block and multi-block sizes, gradcheck and torch.library.opcheck of every op on
CUDA, low-precision values against the CPU kernels and error against a float64 reference, streams
(a delayed side stream, no host synchronization in the time loops), device handling, the
simulator's self-test kernels on the hardware, and compute-sanitizer runs (marker: sanitizer,
kept out of a plain run: `pytest -m sanitizer`).

Every test here needs a GPU (marker: cuda); on a machine without one the module is skipped. On a
machine with a GPU, a build of rnnfused without its CUDA kernels is a failure, not a skip."""
import itertools
import os
import shutil
import subprocess
import sys

import pytest
import torch

import rnnfused
from helpers import (
    LAYER_MODES,
    TOLERANCES,
    assert_close_in_ulps,
    assert_close_lists,
    check_selftest_kernels,
    assert_twins_agree,
    forward_backward,
    sequence_inputs,
    twin_layers,
)
from test_ops import GATES, _forward, _op_cases, _opcheck_cases, _recurrence_args, assert_gradcheck

HAS_GPU = torch.cuda.is_available()
if HAS_GPU and not rnnfused.cuda_built():
    pytest.fail(
        "a GPU is present but this build of rnnfused carries no CUDA kernels; rebuild it with a CUDA build of "
        "torch and a CUDA toolkit (FORCE_CUDA=1 pip install --no-build-isolation -e .)",
        pytrace=False,
    )
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")]

CUDA = torch.device("cuda")
ops = torch.ops.rnnfused
STEPS, BATCH, INPUT, HIDDEN, PROJ = 5, 3, 4, 6, 3


@pytest.fixture
def no_tf32():
    """float32 GEMMs in full precision on both sides (cuBLAS for rnnfused, cuDNN for torch.nn)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(params=["standard", "persistent"])
def cuda_path(request, monkeypatch):
    """Runs the test on each CUDA path, forced by RNNFUSED_CUDA_PATH: the per-step loop (a cuBLAS
    GEMM and a pointwise kernel per step) and the persistent kernels (one cooperative launch per
    layer and direction)."""
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", request.param)
    return request.param


def state_shapes(mode, layers, bidirectional, batch, hidden, proj):
    directions = 2 if bidirectional else 1
    h_shape = (layers * directions, batch, proj or hidden)
    return [h_shape, (layers * directions, batch, hidden)] if mode == "lstm" else [h_shape]


def on_device(args, device):
    """Op arguments on `device`; batch_sizes (int64) stays on the CPU, as PackedSequence keeps it."""

    def move(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().to(device).requires_grad_(a.requires_grad)
        return a

    return tuple(move(a) for a in args)


def to_cpu(tensors):
    return [None if t is None else t.cpu() for t in tensors]


# ----------------------------------------------------------------------------------------------
# Modules: rnnfused on CUDA against torch.nn on CUDA (cuDNN), identical weights
# ----------------------------------------------------------------------------------------------

CUDNN_FORMS = ["padded", "packed_unsorted", "unbatched"]


def _cudnn_grid():
    for mode in LAYER_MODES:
        for layers, bidirectional, form, proj in itertools.product(
            (1, 2), (False, True), CUDNN_FORMS, (0, PROJ) if mode == "lstm" else (0,)
        ):
            name = f"{mode}-L{layers}-{'bi' if bidirectional else 'uni'}-P{proj}-{form}"
            yield pytest.param(mode, layers, bidirectional, form, proj, id=name)


@pytest.mark.parametrize("mode,layers,bidirectional,form,proj", list(_cudnn_grid()))
def test_layer_parity_with_cudnn_float64(mode, layers, bidirectional, form, proj, cuda_path):
    kwargs = dict(num_layers=layers, bidirectional=bidirectional)
    if proj:
        kwargs["proj_size"] = proj
    ref, ours = twin_layers(mode, INPUT, HIDDEN, device=CUDA, **kwargs)
    shapes = state_shapes(mode, layers, bidirectional, BATCH, HIDDEN, proj)
    make = sequence_inputs(form, STEPS, BATCH, INPUT, shapes, torch.float64, device=CUDA)
    assert_twins_agree(ref, ours, make)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_layer_parity_with_cudnn_no_bias_batch_first_no_hx(mode, cuda_path):
    ref, ours = twin_layers(mode, INPUT, HIDDEN, device=CUDA, num_layers=2, bidirectional=True, bias=False,
                            batch_first=True)
    make = sequence_inputs("packed_sorted", STEPS, BATCH, INPUT, None, torch.float64, batch_first=True, device=CUDA)
    assert_twins_agree(ref, ours, make)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("form", ["padded", "packed_unsorted"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_parity_with_cudnn_float32(no_tf32, mode, form, bidirectional, cuda_path):
    """float32 (TF32 off on both sides) agrees with cuDNN to rtol 2e-4, atol 2e-5 (T=12, two layers)."""
    kwargs = dict(num_layers=2, bidirectional=bidirectional)
    proj = PROJ if mode == "lstm" else 0
    if proj:
        kwargs["proj_size"] = proj
    ref, ours = twin_layers(mode, 8, 16, dtype=torch.float32, device=CUDA, **kwargs)
    shapes = state_shapes(mode, 2, bidirectional, 5, 16, proj)
    make = sequence_inputs(form, 12, 5, 8, shapes, torch.float32, device=CUDA)
    assert_twins_agree(ref, ours, make, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# rnnfused on CUDA against rnnfused on the CPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("form", ["padded", "packed_unsorted", "unbatched"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(no_tf32, mode, form, dtype, cuda_path):
    kwargs = dict(num_layers=2, bidirectional=True)
    proj = PROJ if mode == "lstm" else 0
    if proj:
        kwargs["proj_size"] = proj
    _, on_cpu = twin_layers(mode, INPUT, HIDDEN, dtype=dtype, **kwargs)
    _, on_gpu = twin_layers(mode, INPUT, HIDDEN, dtype=dtype, device=CUDA, **kwargs)
    shapes = state_shapes(mode, 2, True, BATCH, HIDDEN, proj)
    cpu_out, cpu_grads = forward_backward(on_cpu, sequence_inputs(form, STEPS, BATCH, INPUT, shapes, dtype))
    gpu_out, gpu_grads = forward_backward(on_gpu, sequence_inputs(form, STEPS, BATCH, INPUT, shapes, dtype, device=CUDA))
    assert all(t.is_cuda for t in gpu_out)
    assert_close_lists(to_cpu(gpu_out), cpu_out, "outputs", **TOLERANCES[dtype])
    assert_close_lists(to_cpu(gpu_grads), cpu_grads, "gradients", **TOLERANCES[dtype])


@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [False, True])
def test_op_outputs_match_cpu_shapes_and_dtypes(mode, dtype, training):
    """Every output of every op (forward and backward, workspace included) has the CPU op's shape,
    dtype and contiguity, on the CUDA device."""
    args = _recurrence_args(mode, True, True, True, PROJ if mode == "lstm" else 0, False, dtype=dtype)
    gpu_args = on_device(args, CUDA)
    forward = getattr(ops, f"{mode}_recurrence")
    flag = (training,) if mode in ("lstm", "gru") else ()
    cpu_res, gpu_res = forward(*args, *flag), forward(*gpu_args, *flag)
    for c, g in zip(cpu_res, gpu_res):
        assert g.device.type == "cuda" and g.shape == c.shape and g.dtype == c.dtype and g.is_contiguous()
    if mode in ("lstm", "gru") and not training:
        return
    grads = [torch.ones_like(t) for t in cpu_res[:3 if mode == "lstm" else 2]]
    if mode == "lstm":
        _, w_hh, _, w_hr, h0, c0, bs, rev = args
        cpu_b = ops.lstm_recurrence_backward(*grads, w_hh, w_hr, h0, c0, cpu_res[0], cpu_res[3], bs, rev)
        _, w_hh, _, w_hr, h0, c0, bs, rev = gpu_args
        gpu_b = ops.lstm_recurrence_backward(*[g.cuda() for g in grads], w_hh, w_hr, h0, c0, gpu_res[0], gpu_res[3],
                                             bs, rev)
    elif mode == "gru":
        _, w_hh, _, h0, bs, rev = args
        cpu_b = ops.gru_recurrence_backward(*grads, w_hh, h0, cpu_res[0], cpu_res[2], bs, rev)
        _, w_hh, _, h0, bs, rev = gpu_args
        gpu_b = ops.gru_recurrence_backward(*[g.cuda() for g in grads], w_hh, h0, gpu_res[0], gpu_res[2], bs, rev)
    else:
        backward = getattr(ops, f"{mode}_recurrence_backward")
        _, w_hh, _, h0, bs, rev = args
        cpu_b = backward(*grads, w_hh, h0, cpu_res[0], bs, rev)
        _, w_hh, _, h0, bs, rev = gpu_args
        gpu_b = backward(*[g.cuda() for g in grads], w_hh, h0, gpu_res[0], bs, rev)
    for c, g in zip(cpu_b, gpu_b):
        assert g.device.type == "cuda" and g.shape == c.shape and g.dtype == c.dtype and g.is_contiguous()


@pytest.mark.parametrize("mode", list(GATES))
def test_zero_length_sequence_matches_cpu(mode):
    """No rows at all (T = 0): empty output, h_n = h0, and gradients that pass straight through."""
    args = list(_recurrence_args(mode, False, False, True, 0, True))
    args[0] = args[0][:0].detach().requires_grad_()  # gates_x [0, G*H]
    results = []
    for device in ("cpu", CUDA):
        moved = on_device(tuple(args), device)
        outs = _forward(mode, moved)
        loss = sum((o.double() * (i + 1)).sum() for i, o in enumerate(outs))
        leaves = [a for a in moved if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append(([o.detach() for o in outs], grads))
    (cpu_out, cpu_grads), (gpu_out, gpu_grads) = results
    assert_close_lists(to_cpu(gpu_out), cpu_out, "outputs", **TOLERANCES[torch.float64])
    assert_close_lists(to_cpu(gpu_grads), list(cpu_grads), "gradients", **TOLERANCES[torch.float64])


# ----------------------------------------------------------------------------------------------
# Multi-block sizes, and bfloat16 / float16 values, against cuDNN and the CPU kernels
# ----------------------------------------------------------------------------------------------

# 64 x 512 = 32768 threads per step: every kernel launch spans 128 blocks (and the grid-stride loop
# runs where the grid is capped), the previous_h gather covers 3200 rows.
BIG_T, BIG_B, BIG_I, BIG_H = 50, 64, 64, 512


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("form", ["padded", "packed_unsorted"])
def test_multi_block_parity_with_cudnn_and_cpu(no_tf32, mode, form, cuda_path):
    """float32, TF32 off on both sides: rnnfused on the GPU agrees with cuDNN and with its own CPU
    kernels within 1024 float32 ulps (0.01%) of each value and of each tensor's largest value over
    50 steps; an indexing or synchronization mistake is off by O(1)."""
    ref, ours = twin_layers(mode, BIG_I, BIG_H, dtype=torch.float32, device=CUDA)
    _, on_cpu = twin_layers(mode, BIG_I, BIG_H, dtype=torch.float32)
    shapes = state_shapes(mode, 1, False, BIG_B, BIG_H, 0)
    gpu_inputs = sequence_inputs(form, BIG_T, BIG_B, BIG_I, shapes, torch.float32, device=CUDA)
    cudnn_out, cudnn_grads = forward_backward(ref, gpu_inputs)
    gpu_out, gpu_grads = forward_backward(ours, gpu_inputs)
    cpu_out, cpu_grads = forward_backward(on_cpu, sequence_inputs(form, BIG_T, BIG_B, BIG_I, shapes, torch.float32))
    for label, expected_out, expected_grads in (("cuDNN", cudnn_out, cudnn_grads), ("CPU", cpu_out, cpu_grads)):
        assert_close_in_ulps(gpu_out, expected_out, torch.float32, f"outputs vs {label}", ulps=1024)
        assert_close_in_ulps(gpu_grads, expected_grads, torch.float32, f"gradients vs {label}", ulps=1024)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_values_match_cpu(no_tf32, mode, dtype, cuda_path):
    """bfloat16 / float16 values (outputs, states, every gradient) on the GPU match rnnfused's CPU
    kernels within a few units of the dtype: both compute in float32 and round h to the dtype every
    step, so only float32 rounding differences can move a value, by about one unit."""
    kwargs = dict(num_layers=2, bidirectional=True)
    _, on_cpu = twin_layers(mode, 8, 64, seed=1, **kwargs)
    _, on_gpu = twin_layers(mode, 8, 64, seed=1, device=CUDA, **kwargs)
    on_cpu.to(dtype)
    on_gpu.to(dtype)
    shapes = state_shapes(mode, 2, True, 16, 64, 0)
    cpu_out, cpu_grads = forward_backward(on_cpu, sequence_inputs("packed_unsorted", 20, 16, 8, shapes, dtype))
    gpu_out, gpu_grads = forward_backward(on_gpu, sequence_inputs("packed_unsorted", 20, 16, 8, shapes, dtype,
                                                                  device=CUDA))
    assert_close_in_ulps(gpu_out, cpu_out, dtype, "outputs", ulps=8)
    assert_close_in_ulps(gpu_grads, cpu_grads, dtype, "gradients", ulps=8)


# ----------------------------------------------------------------------------------------------
# The ops: gradcheck, opcheck
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_op_cases()))
def test_gradcheck_cuda(mode, packed, reverse, bias, proj, cuda_path):
    assert_gradcheck(mode, on_device(_recurrence_args(mode, packed, reverse, bias, proj, requires_grad=True), CUDA))


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_opcheck_cases()))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward_cuda(mode, packed, reverse, bias, proj, requires_grad):
    args = on_device(_recurrence_args(mode, packed, reverse, bias, proj, requires_grad, dtype=torch.float32), CUDA)
    if mode in ("lstm", "gru"):
        for training in (False, True):
            torch.library.opcheck(getattr(ops, f"{mode}_recurrence").default, args + (training,))
    else:
        torch.library.opcheck(getattr(ops, f"{mode}_recurrence").default, args)


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_opcheck_cases()))
@pytest.mark.parametrize("with_grad_output,with_grad_state", [(True, True), (False, True), (True, False)])
def test_opcheck_backward_cuda(mode, packed, reverse, bias, proj, with_grad_output, with_grad_state, cuda_path):
    args = on_device(_recurrence_args(mode, packed, reverse, bias, proj, False, dtype=torch.float32), CUDA)
    generator = torch.Generator().manual_seed(5)

    def grad_like(t, present):
        return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) if present else None

    if mode == "lstm":
        _, w_hh, _, w_hr, h0, c0, batch_sizes, rev = args
        output, h_n, c_n, workspace = ops.lstm_recurrence(*args, True)
        backward_args = (grad_like(output, with_grad_output), grad_like(h_n, with_grad_state),
                         grad_like(c_n, with_grad_state), w_hh, w_hr, h0, c0, output, workspace, batch_sizes, rev)
    elif mode == "gru":
        _, w_hh, _, h0, batch_sizes, rev = args
        output, h_n, workspace = ops.gru_recurrence(*args, True)
        backward_args = (grad_like(output, with_grad_output), grad_like(h_n, with_grad_state),
                         w_hh, h0, output, workspace, batch_sizes, rev)
    else:
        _, w_hh, _, h0, batch_sizes, rev = args
        output, h_n = getattr(ops, f"{mode}_recurrence")(*args)
        backward_args = (grad_like(output, with_grad_output), grad_like(h_n, with_grad_state),
                         w_hh, h0, output, batch_sizes, rev)
    torch.library.opcheck(getattr(ops, f"{mode}_recurrence_backward").default, backward_args)


# ----------------------------------------------------------------------------------------------
# Low precision
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_against_float64_cuda(mode, dtype, cuda_path):
    """bfloat16 / float16 on CUDA judged against a float64 reference: rnnfused's error (outputs,
    states, gradients) is at most twice torch.nn's own error in the same dtype on the same GPU,
    plus one unit of the dtype's precision at the scale of the value (cuDNN may keep more of its
    intermediate state in float32 than rnnfused, which rounds h to the dtype every step as
    torch.nn's CPU cells do).

    The seed is one whose ReLU pre-activations keep clear of zero (see test_parity)."""
    kwargs = dict(num_layers=2, bidirectional=True)
    ref64, ours = twin_layers(mode, 8, 16, dtype=torch.float64, seed=1, device=CUDA, **kwargs)
    ref_low, _ = twin_layers(mode, 8, 16, dtype=torch.float64, seed=1, device=CUDA, **kwargs)
    ref_low.to(dtype)
    ours.to(dtype)
    shapes = [(4, 5, 16)] * (2 if mode == "lstm" else 1)
    make64 = sequence_inputs("padded", 20, 5, 8, shapes, torch.float64, device=CUDA)
    make_low = sequence_inputs("padded", 20, 5, 8, shapes, dtype, device=CUDA)
    unit = torch.finfo(dtype).eps

    exact_out, exact_grads = forward_backward(ref64, make64)
    for label, exact, ref_vals, our_vals in (
        ("outputs", exact_out, *[forward_backward(m, make_low)[0] for m in (ref_low, ours)]),
        ("gradients", exact_grads, *[forward_backward(m, make_low)[1] for m in (ref_low, ours)]),
    ):
        for index, (e, r, o) in enumerate(zip(exact, ref_vals, our_vals)):
            assert o.dtype == dtype and o.is_cuda, f"{label}[{index}] is {o.dtype} on {o.device}"
            ref_error = (r.double() - e).abs().max().item()
            our_error = (o.double() - e).abs().max().item()
            scale = e.abs().max().item()
            assert our_error <= 2 * ref_error + unit * scale, (
                f"{label}[{index}]: rnnfused error {our_error:.3g} vs torch.nn {ref_error:.3g} ({dtype})"
            )


# ----------------------------------------------------------------------------------------------
# Devices and streams
# ----------------------------------------------------------------------------------------------


def test_tensors_on_different_devices_are_a_clear_error():
    args = list(on_device(_recurrence_args("lstm", True, False, True, 0, False), CUDA))
    cpu_h0 = list(args)
    cpu_h0[4] = args[4].cpu()
    with pytest.raises(RuntimeError, match=r"rnnfused::lstm_recurrence: h0 is on cpu but gates_x is on cuda"):
        ops.lstm_recurrence(*cpu_h0, True)
    cpu_gates = list(args)
    cpu_gates[0] = args[0].cpu()
    with pytest.raises(RuntimeError, match=r"rnnfused::lstm_recurrence: gates_x is on cpu"):
        ops.lstm_recurrence(*cpu_gates, True)
    cuda_sizes = list(args)
    cuda_sizes[6] = args[6].cuda()
    with pytest.raises(RuntimeError, match="batch_sizes must be a CPU tensor"):
        ops.lstm_recurrence(*cuda_sizes, True)
    gru = list(on_device(_recurrence_args("gru", False, False, True, 0, False), CUDA))
    output, h_n, workspace = ops.gru_recurrence(*gru, True)
    _, w_hh, _, h0, batch_sizes, rev = gru
    with pytest.raises(RuntimeError, match=r"rnnfused::gru_recurrence_backward: w_hh is on cpu but output is on cuda"):
        ops.gru_recurrence_backward(None, torch.ones_like(h_n), w_hh.cpu(), h0, output, workspace, batch_sizes, rev)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_second_gpu_matches_first(mode):
    """The kernels run on the tensors' device, not on the current one (which stays cuda:0)."""
    kwargs = dict(num_layers=2, bidirectional=True)
    shapes = state_shapes(mode, 2, True, BATCH, HIDDEN, 0)
    results = []
    for device in (torch.device("cuda", 0), torch.device("cuda", 1)):
        _, ours = twin_layers(mode, INPUT, HIDDEN, device=device, **kwargs)
        results.append(forward_backward(ours, sequence_inputs("packed_unsorted", STEPS, BATCH, INPUT, shapes,
                                                              torch.float64, device=device)))
    assert torch.cuda.current_device() == 0
    (out0, grads0), (out1, grads1) = results
    assert all(t.device.index == 1 for t in out1)
    assert_close_lists(to_cpu(out1), to_cpu(out0), "outputs", **TOLERANCES[torch.float64])
    assert_close_lists(to_cpu(grads1), to_cpu(grads0), "gradients", **TOLERANCES[torch.float64])


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_side_stream(mode, cuda_path):
    """Work queued on a non-default stream gives the default stream's result: every kernel, GEMM
    and copy goes to the current stream. The side stream starts with a long sleep, so that a
    kernel sent to another stream would run before the side stream's inputs exist and give
    wrong values."""
    kwargs = dict(num_layers=2, bidirectional=True)
    _, ours = twin_layers(mode, 16, 32, device=CUDA, **kwargs)
    shapes = state_shapes(mode, 2, True, 8, 32, 0)
    make = sequence_inputs("packed_unsorted", 30, 8, 16, shapes, torch.float64, device=CUDA)
    expected = forward_backward(ours, make)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU clock cycles
        got = forward_backward(ours, make)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert_close_lists(got[0], expected[0], "outputs", **TOLERANCES[torch.float64])
    assert_close_lists(got[1], expected[1], "gradients", **TOLERANCES[torch.float64])


@pytest.mark.parametrize("mode", list(GATES))
def test_time_loops_never_synchronize_with_the_host(mode, cuda_path):
    """Forward and backward ops (packed, reverse, projection) run with torch's sync debug mode set
    to "error": any host synchronization inside them (a blocking copy, .item(), a pageable upload)
    raises."""
    args = on_device(_recurrence_args(mode, True, True, True, PROJ if mode == "lstm" else 0, False), CUDA)
    flag = (True,) if mode in ("lstm", "gru") else ()
    forward = getattr(ops, f"{mode}_recurrence")
    warm = forward(*args, *flag)
    grads = [torch.ones_like(t) for t in warm[:3 if mode == "lstm" else 2]]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = forward(*args, *flag)
        if mode == "lstm":
            _, w_hh, _, w_hr, h0, c0, bs, rev = args
            ops.lstm_recurrence_backward(*grads, w_hh, w_hr, h0, c0, results[0], results[3], bs, rev)
        elif mode == "gru":
            _, w_hh, _, h0, bs, rev = args
            ops.gru_recurrence_backward(*grads, w_hh, h0, results[0], results[2], bs, rev)
        else:
            _, w_hh, _, h0, bs, rev = args
            getattr(ops, f"{mode}_recurrence_backward")(*grads, w_hh, h0, results[0], bs, rev)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_simulator_selftests_agree_with_the_hardware():
    """The self-test kernels that check the CUDA simulator (shared memory, warp shuffles and votes,
    atomics, the grid barrier of a cooperative launch, mma.sync m16n8k16 fragments in bfloat16 and
    float16) give on this GPU the numbers the simulator gives (tests/test_cuda_sim.py)."""
    check_selftest_kernels(lambda name, values: rnnfused._C._cuda_selftest(name, values), device=CUDA)


# ----------------------------------------------------------------------------------------------
# compute-sanitizer
# ----------------------------------------------------------------------------------------------


def _compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        candidate = os.path.join(root, "bin", "compute-sanitizer") if root else None
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


# Each tool runs tests/cuda_memcheck_workload.py (forward + backward through every recurrence
# kernel, and the self-test kernels' correct forms, which use shared memory, barriers, warp
# operations and a cooperative launch). Only rnnfused's kernels are instrumented (kernel-name
# filter) and failing API calls are not reported: torch and the driver probe the API with calls
# that are meant to fail, which are no error of rnnfused's. With RNNFUSED_SANITIZER_LOGS set, each
# report is also written there (the GPU check, .ci/gpu_check.sh, collects them).
SANITIZER_TOOLS = {  # tool: (its options, the workload's options)
    "memcheck": (["--tool", "memcheck", "--leak-check", "no"], []),
    "racecheck": (["--tool", "racecheck", "--racecheck-report", "hazard"], ["--light"]),
    "synccheck": (["--tool", "synccheck"], ["--light"]),
}


@pytest.mark.sanitizer
@pytest.mark.slow
@pytest.mark.parametrize("tool", list(SANITIZER_TOOLS))
def test_compute_sanitizer(tool):
    sanitizer = _compute_sanitizer()
    assert sanitizer is not None, "compute-sanitizer not found (CUDA toolkit: set CUDA_HOME)"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests_dir)
    # The caching allocator off, so that an out-of-bounds access leaves its allocation.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    tool_options, workload_options = SANITIZER_TOOLS[tool]
    command = [sanitizer, *tool_options, "--kernel-name", "kns=rnnfused", "--report-api-errors", "no",
               "--error-exitcode", "99", sys.executable, os.path.join(tests_dir, "cuda_memcheck_workload.py"),
               *workload_options]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    report = result.stdout + result.stderr
    log_dir = os.environ.get("RNNFUSED_SANITIZER_LOGS")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, f"compute-sanitizer-{tool}.log"), "w") as log:
            log.write(" ".join(command) + "\n\n" + report)
    tail = report[-6000:]
    assert result.returncode == 0, f"compute-sanitizer {tool} failed (exit {result.returncode}):\n{tail}"
    assert "rnnfused CUDA workload done" in report, tail
    summary = [line for line in report.splitlines() if "SUMMARY" in line]
    assert summary and all(" 0 errors" in line or ": 0 hazards" in line for line in summary), tail


def test_persistent_path_refuses_weights_that_do_not_fit(monkeypatch):
    """H = 2048 LSTM float32: a block's slice of W_hh (16 units x 4 gates x 2048 x 4 bytes = 512 KiB)
    is more than any GPU's shared memory per block. Forced, the persistent path says so; auto takes
    the standard path; nothing hangs."""
    layer = rnnfused.LSTM(8, 2048).to(CUDA)
    x = torch.randn(3, 2, 8, device=CUDA)
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "persistent")
    with pytest.raises(RuntimeError, match=r"RNNFUSED_CUDA_PATH=persistent, but the persistent kernel cannot run "
                                           r"this call: its slice of the recurrent weights needs"):
        layer(x)
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "auto")
    out, _ = layer(x)
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "standard")
    torch.testing.assert_close(out, layer(x)[0])


# ----------------------------------------------------------------------------------------------
# Recurrent dropout and zoneout (tests/test_regularization.py's reference loop, on the GPU)
# ----------------------------------------------------------------------------------------------

from test_regularization import (  # noqa: E402
    SIM_ZONEOUT_CASES, check_against_reference, make_layer_args, make_keep, outputs_and_grads, run_fused,
)


@pytest.mark.parametrize("mode,batch,hidden,lengths,reverse,proj,which,kind", SIM_ZONEOUT_CASES)
@pytest.mark.parametrize("path", ["auto", "standard"])
def test_regularized_ops_match_reference(mode, batch, hidden, lengths, reverse, proj, which, kind, path, monkeypatch,
                                         no_tf32):
    """The CUDA ops with a recurrent mask and zoneout: forward and every gradient equal the CPU
    step loop's in float64 (auto sends such calls to the standard path)."""
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", path)
    import contextlib

    check_against_reference(mode, batch, hidden, lengths, reverse, proj, contextlib.nullcontext(), which, kind,
                            device=CUDA)


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_regularized_ops_match_cpu(mode, dtype, no_tf32):
    """float32 / bfloat16 with a recurrent mask and zoneout: the GPU against the CPU."""
    args, mask = make_layer_args(mode, 7, 9, 6, 24, dtype)
    keep_h = make_keep("draws", 63, 24, dtype, 1)
    keep_c = make_keep("scalar", 63, 24, dtype, 2) if mode == "lstm" else None
    cpu = outputs_and_grads(lambda: run_fused(mode, args, None, False, mask, keep_h, keep_c), args)
    placed = {k: (v.detach().to(CUDA).requires_grad_() if v is not None else None) for k, v in args.items()}
    gpu = outputs_and_grads(lambda: run_fused(mode, placed, None, False, mask.to(CUDA),
                                              None if keep_h is None else keep_h.to(CUDA),
                                              None if keep_c is None else keep_c.to(CUDA)), placed)
    for a, b in zip(gpu[0] + gpu[1], cpu[0] + cpu[1]):
        scale = b.abs().max().item()
        tol = dict(rtol=1e-4, atol=1e-5 * scale) if dtype == torch.float32 else dict(rtol=0.05, atol=0.02 * scale)
        torch.testing.assert_close(a.cpu().double(), b.double(), **tol)


def test_regularized_modules_train_on_the_gpu():
    """Every option on the GPU: a training step runs, the same seed gives the same result, eval
    mode is deterministic."""
    for cls, options in ((rnnfused.LSTM, dict(recurrent_dropout=0.3, dropconnect=0.2, zoneout=0.1, cell_zoneout=0.1)),
                         (rnnfused.GRU, dict(recurrent_dropout=0.3, dropconnect=0.2, zoneout=0.1)),
                         (rnnfused.RNN, dict(recurrent_dropout=0.3, dropconnect=0.2, zoneout=0.1))):
        module = cls(8, 16, num_layers=2, bidirectional=True, **options).to(CUDA)
        x = torch.randn(12, 5, 8, device=CUDA, requires_grad=True)
        torch.manual_seed(4)
        a = module(x)[0]
        a.sum().backward()
        torch.manual_seed(4)
        b = module(x)[0]
        assert torch.equal(a, b)
        module.eval()
        assert torch.equal(module(x)[0], module(x)[0])


# ----------------------------------------------------------------------------------------------
# LayerNormLSTM / LayerNormGRU (tests/test_layer_norm.py's reference loop, on the GPU)
# ----------------------------------------------------------------------------------------------

from test_layer_norm import compare as compare_layer_norm  # noqa: E402
from test_layer_norm import make_params as make_layer_norm_params  # noqa: E402
from test_layer_norm import run_fused_layer as run_layer_norm_layer  # noqa: E402


class _OnGpu:
    """Runs the fused layer of tests/test_layer_norm.py's compare() on the GPU: its tensors move
    there and the results come back (the reference stays on the CPU)."""

    def __enter__(self):
        import rnnfused.functional as rf

        self.saved = (rf.layer_norm_lstm_layer, rf.layer_norm_gru_layer)

        def moved(layer):
            def run(*args, **kwargs):
                to = lambda v: v.to(CUDA) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v  # noqa: E731
                outs = layer(*[to(a) for a in args], **{k: to(v) for k, v in kwargs.items()})
                return tuple(o.cpu() for o in outs)

            return run

        rf.layer_norm_lstm_layer, rf.layer_norm_gru_layer = moved(self.saved[0]), moved(self.saved[1])
        return self

    def __exit__(self, *exc):
        import rnnfused.functional as rf

        rf.layer_norm_lstm_layer, rf.layer_norm_gru_layer = self.saved
        return False


@pytest.mark.parametrize("mode,options", [("lstm", ()), ("lstm", ("mask", "zoneout", "cell_zoneout")),
                                          ("gru", ()), ("gru", ("mask", "zoneout")), ("gru", ("eval", "zoneout"))])
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([6, 4, 4, 1], True)])
def test_layer_norm_ops_match_reference(mode, options, lengths, reverse, no_tf32):
    """The LayerNorm ops on the GPU: forward and every gradient equal the step loop's in float64."""
    compare_layer_norm(mode, 4, 5, lengths, reverse, options, context=_OnGpu)
    compare_layer_norm(mode, 3, 300, [6, 2, 1], False, options, context=_OnGpu)
    if mode == "lstm":
        compare_layer_norm(mode, 4, 5, lengths, reverse, options, context=_OnGpu, proj=3)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_modules_match_cpu(mode, dtype, no_tf32):
    cls = rnnfused.LayerNormLSTM if mode == "lstm" else rnnfused.LayerNormGRU
    torch.manual_seed(0)
    module = cls(16, 64, num_layers=2, bidirectional=True).to(dtype)
    x = torch.randn(9, 5, 16, dtype=dtype)
    out, _ = module(x)
    gpu_out, _ = module.to(CUDA)(x.to(CUDA))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(gpu_out.cpu().float(), out.float(), **tol)
