"""The GEMMs over all of a call's rows (csrc/cpu/bulk_gemm.h, rnnfused._C._cpu_bulk_mm): the ATen
calls exactly under the "blas" rule, oneDNN's brgemm micro-kernel under "brgemm" (every layout,
bias, odd sizes, results independent of the thread count), the "auto" rule, and the recurrence
ops' dW_hh through it."""
import os
import subprocess
import sys

import pytest
import torch

import rnnfused
from rnnfused import _C

needs_brgemm = pytest.mark.skipif(not _C._cpu_bulk_brgemm_available(),
                                  reason="this torch ships no float32 brgemm micro-kernel")


@pytest.fixture
def bulk_gemm_mode():
    before = _C._cpu_bulk_gemm_mode()
    yield _C._set_cpu_bulk_gemm_mode
    _C._set_cpu_bulk_gemm_mode(before)


def _operands(m, n, k, layout_a, layout_b, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=generator, dtype=dtype)
    b = torch.randn(k, n, generator=generator, dtype=dtype)
    if layout_a == "transposed":
        a = a.t().contiguous().t()
    elif layout_a == "strided":
        a = torch.randn(m, 2 * k, generator=generator, dtype=dtype)[:, ::2]
    if layout_b == "transposed":
        b = b.t().contiguous().t()
    elif layout_b == "padded":
        b = torch.randn(k, n + 5, generator=generator, dtype=dtype)[:, :n]
    return a, b


SIZES = [(1, 1, 1), (3, 1000, 77), (67, 129, 300), (300, 67, 129), (1600, 1024, 256), (130, 257, 513)]


@needs_brgemm
@pytest.mark.parametrize("m,n,k", SIZES)
@pytest.mark.parametrize("layout_a", ["row", "transposed", "strided"])
@pytest.mark.parametrize("layout_b", ["row", "transposed", "padded"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_brgemm_products_match_float64(m, n, k, layout_a, layout_b, with_bias, bulk_gemm_mode):
    bulk_gemm_mode("brgemm")
    a, b = _operands(m, n, k, layout_a, layout_b)
    bias = torch.randn(n) if with_bias else None
    want = a.double() @ b.double() + (bias.double() if with_bias else 0)
    out = torch.full((m, n), float("nan"))  # nothing of out may be read
    calls = _C._cpu_bulk_brgemm_calls()
    got = _C._cpu_bulk_mm(a, b, bias, out)
    assert _C._cpu_bulk_brgemm_calls() == calls + 1
    assert got.data_ptr() == out.data_ptr() and got.shape == (m, n)
    # As close as torch.mm's float32 result is.
    scale = want.abs().max().item()
    error = (got.double() - want).abs().max().item() / scale
    torch_error = ((a @ b + (bias if with_bias else 0)).double() - want).abs().max().item() / scale
    assert error <= max(4 * torch_error, 1e-6)
    # Without out, a fresh [m, n] tensor; into a non-contiguous out, its values.
    torch.testing.assert_close(_C._cpu_bulk_mm(a, b, bias), got, rtol=0, atol=0)
    strided_out = torch.zeros(n, m).t()
    _C._cpu_bulk_mm(a, b, bias, strided_out)
    torch.testing.assert_close(strided_out, got, rtol=0, atol=0)


@needs_brgemm
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_brgemm_results_do_not_depend_on_the_thread_count(threads, bulk_gemm_mode):
    bulk_gemm_mode("brgemm")
    a, b = _operands(700, 300, 600, "transposed", "transposed", seed=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = _C._cpu_bulk_mm(a, b)
        torch.set_num_threads(threads)
        got = _C._cpu_bulk_mm(a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout_a", ["row", "transposed"])
def test_blas_rule_is_torch_mm_bitwise(dtype, layout_a, bulk_gemm_mode):
    bulk_gemm_mode("blas")
    a, b = _operands(300, 200, 100, layout_a, "transposed", dtype=dtype, seed=2)
    bias = torch.randn(200, dtype=dtype)
    calls = _C._cpu_bulk_brgemm_calls()
    assert torch.equal(_C._cpu_bulk_mm(a, b), torch.mm(a, b))
    out = torch.empty(300, 200, dtype=dtype)
    assert torch.equal(_C._cpu_bulk_mm(a, b, bias, out), torch.addmm(bias, a, b))
    assert _C._cpu_bulk_brgemm_calls() == calls


def test_float64_never_takes_the_micro_kernel(bulk_gemm_mode):
    bulk_gemm_mode("brgemm")
    a, b = _operands(300, 200, 100, "row", "row", dtype=torch.float64)
    calls = _C._cpu_bulk_brgemm_calls()
    assert torch.equal(_C._cpu_bulk_mm(a, b), torch.mm(a, b))
    assert _C._cpu_bulk_brgemm_calls() == calls


def test_bad_operands_raise():
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        _C._cpu_bulk_mm(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(RuntimeError, match="expected 2-D"):
        _C._cpu_bulk_mm(torch.randn(3), torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="expected 'auto', 'blas' or 'brgemm'"):
        _C._set_cpu_bulk_gemm_mode("fast")


def test_auto_rule(bulk_gemm_mode):
    """Auto: on processors other than Intel's whose kernels run AVX-512, from kBulkBrgemmMinFlops;
    never on Intel's (MKL's own kernels run at the core's peak there)."""
    bulk_gemm_mode("auto")
    try:
        _C._set_cpu_vendor_override(1)
        assert not _C._cpu_bulk_gemm_uses_brgemm(1600, 1024, 256)
        _C._set_cpu_vendor_override(-1)
        expected = _C._cpu_bulk_brgemm_available() and rnnfused.build_info()["cpu_isa"] == "avx512"
        assert _C._cpu_bulk_gemm_uses_brgemm(1600, 1024, 256) == expected
        assert not _C._cpu_bulk_gemm_uses_brgemm(16, 16, 16)  # below the minimum size
    finally:
        _C._set_cpu_vendor_override(0)


def test_mode_from_the_environment():
    code = "from rnnfused import _C; print(_C._cpu_bulk_gemm_mode())"
    env = dict(os.environ, RNNFUSED_CPU_GEMM="blas")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.stdout.split()[-1] == "blas"
    env["RNNFUSED_CPU_GEMM"] = "quick"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "RNNFUSED_CPU_GEMM: expected 'auto', 'blas' or 'brgemm'" in result.stderr


@needs_brgemm
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_training_step_with_the_micro_kernel_matches_torch_nn(cell, bulk_gemm_mode):
    """A layer's forward + backward with every bulk product on the micro-kernel (the projection,
    its backward and the ops' dW_hh) against torch.nn with the same weights."""
    bulk_gemm_mode("brgemm")
    torch.manual_seed(5)
    make = {"lstm": (rnnfused.LSTM, torch.nn.LSTM, {}), "gru": (rnnfused.GRU, torch.nn.GRU, {}),
            "rnn_tanh": (rnnfused.RNN, torch.nn.RNN, {})}[cell]
    ours = make[0](40, 72, num_layers=2, **make[2])
    ref = make[1](40, 72, num_layers=2, **make[2])
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(30, 9, 40)
    calls = _C._cpu_bulk_brgemm_calls()
    out, _ = ours(x)
    out.square().sum().backward()
    assert _C._cpu_bulk_brgemm_calls() > calls
    out_ref, _ = ref(x)
    out_ref.square().sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)
