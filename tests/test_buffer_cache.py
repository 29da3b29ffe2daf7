"""The CPU ops' cache of large buffers (csrc/cpu/buffer_cache.h): results are bitwise those of
plain allocations even when every buffer handed out is filled with NaN first (no op reads an
element before writing it, or leaves one unwritten); buffers are reused across calls; the cap,
rnnfused.empty_cpu_cache() and RNNFUSED_CPU_BUFFER_CACHE_MB do what they say; tensors the cache
backs behave as any other."""
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rnnfused
from rnnfused import _C

MIB = 1 << 20


@pytest.fixture(autouse=True)
def restore_cache():
    limit = rnnfused.cpu_cache_info()["limit_bytes"]
    yield
    _C._set_cpu_buffer_cache_poison(False)
    _C._set_cpu_buffer_cache_limit(limit)


# Shapes whose [N, G*H] and [N, H] buffers are at least 4 MiB in float32 (the cache's threshold):
# N = 4096 rows, padded at B = 64, and about as many packed at B = 16 (sequences of 512 to 1 steps,
# sorted).
def _inputs(batch, packed, size, generator):
    steps = (8192 if packed else 4096) // batch
    x = torch.randn(steps, batch, size, generator=generator)
    if not packed:
        return x
    lengths = torch.linspace(steps, 1, batch).round().long()
    return torch.nn.utils.rnn.pack_padded_sequence(x, lengths)


CELLS = {
    "lstm": lambda: rnnfused.LSTM(32, 256),
    "lstm_proj": lambda: rnnfused.LSTM(32, 256, proj_size=128),
    "gru": lambda: rnnfused.GRU(32, 256),
    "rnn_tanh": lambda: rnnfused.RNN(32, 256, nonlinearity="tanh"),
    "rnn_relu": lambda: rnnfused.RNN(32, 256, nonlinearity="relu"),
    "layer_norm_lstm": lambda: rnnfused.LayerNormLSTM(32, 256),
    "layer_norm_gru": lambda: rnnfused.LayerNormGRU(32, 256),
}


def _train_step(make, batch, packed):
    torch.manual_seed(0)
    module = make()
    x = _inputs(batch, packed, 32, torch.Generator().manual_seed(1))
    data = x.data if packed else x
    data.requires_grad_(True)
    output, _ = module(x)
    out = output.data if packed else output
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    return [out.detach().clone(), data.grad.clone()] + [p.grad.clone() for p in module.parameters()]


def _eval_forward(make, batch, packed):
    torch.manual_seed(0)
    module = make().eval()
    x = _inputs(batch, packed, 32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        output, _ = module(x)
    return [(output.data if packed else output).clone()]


@pytest.fixture
def deterministic():
    """Bitwise comparisons between calls: a per-step loop that stalls (another process took a
    core) goes on one thread, whose GEMMs may round differently (csrc/cpu/team.h, LoopThreads);
    torch.use_deterministic_algorithms(True) keeps its threads."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("batch,packed", [(64, False), (16, True)])
def test_results_match_plain_allocations_with_poisoned_buffers(cell, batch, packed, deterministic):
    torch.set_num_threads(2)
    _C._set_cpu_buffer_cache_limit(0)  # plain at::empty
    expected_train = _train_step(CELLS[cell], batch, packed)
    expected_eval = _eval_forward(CELLS[cell], batch, packed)
    _C._set_cpu_buffer_cache_limit(1024 * MIB)
    _C._set_cpu_buffer_cache_poison(True)
    reuses = rnnfused.cpu_cache_info()["reuses"]
    for _ in range(2):  # fresh blocks, then reused ones (both poisoned)
        got_train = _train_step(CELLS[cell], batch, packed)
        got_eval = _eval_forward(CELLS[cell], batch, packed)
        for want, got in zip(expected_train + expected_eval, got_train + got_eval):
            assert not torch.isnan(got).any()
            assert torch.equal(want, got)
    assert rnnfused.cpu_cache_info()["reuses"] > reuses


def test_cap_and_empty_cache():
    torch.set_num_threads(2)
    _C._set_cpu_buffer_cache_limit(1024 * MIB)
    rnnfused.empty_cpu_cache()
    lent = rnnfused.cpu_cache_info()["lent_bytes"]  # what live tensors of other tests hold
    _train_step(CELLS["lstm"], 64, False)
    info = rnnfused.cpu_cache_info()
    assert info["held_bytes"] >= 8 * MIB  # at least the workspace and the gates' gradient came back
    assert info["lent_bytes"] == lent  # the step's tensors are all gone
    before = info["reuses"]
    _train_step(CELLS["lstm"], 64, False)
    assert rnnfused.cpu_cache_info()["reuses"] >= before + 3  # output, workspace, gates' gradient
    _C._set_cpu_buffer_cache_limit(8 * MIB)
    assert rnnfused.cpu_cache_info()["held_bytes"] <= 8 * MIB
    _train_step(CELLS["lstm"], 64, False)
    held = rnnfused.cpu_cache_info()["held_bytes"]
    assert 0 < held <= 8 * MIB  # the 4 MiB output block is kept; the larger ones are not
    # A request larger than the cap takes a new block and leaves the held ones where they are.
    big = _C._cpu_empty_recycled([16 * MIB // 4], torch.empty(0))
    assert rnnfused.cpu_cache_info()["held_bytes"] == held
    del big
    assert rnnfused.cpu_cache_info()["held_bytes"] == held
    rnnfused.empty_cpu_cache()
    assert rnnfused.cpu_cache_info()["held_bytes"] == 0
    _C._set_cpu_buffer_cache_limit(0)
    before = rnnfused.cpu_cache_info()["reuses"]
    _train_step(CELLS["lstm"], 64, False)
    info = rnnfused.cpu_cache_info()
    assert info["reuses"] == before and info["held_bytes"] == 0 and info["lent_bytes"] == lent
    with pytest.raises(RuntimeError, match="must be >= 0"):
        _C._set_cpu_buffer_cache_limit(-1)


def test_cached_output_behaves_as_any_tensor():
    _C._set_cpu_buffer_cache_limit(1024 * MIB)
    module = rnnfused.GRU(32, 256).eval()
    lent = rnnfused.cpu_cache_info()["lent_bytes"]  # what live tensors of other tests hold
    with torch.no_grad():
        output, _ = module(torch.randn(64, 64, 32))
    assert rnnfused.cpu_cache_info()["lent_bytes"] >= lent + output.numel() * 4
    kept = output.clone()
    buffer = io.BytesIO()
    torch.save(output, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), kept)
    output.resize_(2 * output.numel())  # the storage grows through the cache's allocator
    assert torch.equal(output[: kept.numel()].view_as(kept), kept)
    output.add_(1)
    assert output.numpy().shape == (2 * kept.numel(),)
    del output
    assert rnnfused.cpu_cache_info()["lent_bytes"] == lent
    with torch.inference_mode():
        output, _ = module(torch.randn(64, 64, 32))
    assert output.is_inference() and torch.isfinite(output).all()


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, **env),
                          capture_output=True, text=True)


def test_environment_variable():
    code = """
        import torch, rnnfused
        rnnfused.RNN(32, 256)(torch.randn(64, 64, 32))
        print(rnnfused.cpu_cache_info()["limit_bytes"])
    """
    assert _run(code, RNNFUSED_CPU_BUFFER_CACHE_MB="16").stdout.split()[-1] == str(16 * MIB)
    assert _run(code, RNNFUSED_CPU_BUFFER_CACHE_MB="0").stdout.split()[-1] == "0"
    result = _run(code, RNNFUSED_CPU_BUFFER_CACHE_MB="lots")
    assert result.returncode != 0
    assert "RNNFUSED_CPU_BUFFER_CACHE_MB must be a whole number of megabytes" in result.stderr


@pytest.fixture
def bulk_gemm_mode():
    """Sets the rule of the projection's GEMMs (csrc/cpu/bulk_gemm.h) for one test."""
    before = _C._cpu_bulk_gemm_mode()
    yield _C._set_cpu_bulk_gemm_mode
    _C._set_cpu_bulk_gemm_mode(before)


@pytest.mark.parametrize("mode", ["blas", "brgemm"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_training_projection_matches_f_linear(with_bias, mode, bulk_gemm_mode):
    """The projection under autograd (functional._ProjectionIntoCache) against F.linear and its
    autograd, for the output and every gradient: bitwise where its GEMMs are the ATen calls
    ("blas"), to float32 rounding where oneDNN's brgemm micro-kernel runs them (each of the three
    products counted)."""
    from rnnfused import functional
    if mode == "brgemm" and not _C._cpu_bulk_brgemm_available():
        pytest.skip("this torch ships no float32 brgemm micro-kernel")
    bulk_gemm_mode(mode)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 48, generator=generator, requires_grad=True)
    w = torch.randn(1024, 48, generator=generator, requires_grad=True)
    b = torch.randn(1024, generator=generator, requires_grad=True) if with_bias else None
    grad = torch.randn(4096, 1024, generator=generator)
    assert functional._cached_projection(x, w, b)
    calls = _C._cpu_bulk_brgemm_calls()
    ours = functional._linear(x, w, b)
    assert type(ours.grad_fn).__name__ == "_ProjectionIntoCacheBackward"
    ref = torch.nn.functional.linear(x, w, b)
    inputs = (x, w) + ((b,) if with_bias else ())
    pairs = [(ours, ref)] + list(zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad)))
    for got, want in pairs:
        if mode == "blas":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert _C._cpu_bulk_brgemm_calls() - calls == (3 if mode == "brgemm" else 0)
    # Small (unless the micro-kernel runs them), strided or untracked inputs take F.linear.
    assert functional._cached_projection(x[:8], w, b) == (mode == "brgemm")
    assert not functional._cached_projection(x.detach(), w.detach(), None)
    assert not functional._cached_projection(x.t().contiguous().t(), w, b)


def test_training_projection_double_backward():
    from rnnfused import functional
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradgradcheck(functional._ProjectionIntoCache.apply, (x, w, b))


TORCH_NN_TWINS = {
    "lstm": (rnnfused.LSTM, torch.nn.LSTM, {}),
    "lstm_proj": (rnnfused.LSTM, torch.nn.LSTM, {"proj_size": 128}),
    "gru": (rnnfused.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (rnnfused.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (rnnfused.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}


@pytest.mark.parametrize("cell", sorted(TORCH_NN_TWINS))
def test_parity_with_torch_nn_through_poisoned_buffers(cell):
    """Training step against torch.nn holding the same weights, in float64, at a size whose buffers
    all come from the cache, every one filled with NaN before use."""
    torch.set_num_threads(2)
    _C._set_cpu_buffer_cache_limit(1024 * MIB)
    _C._set_cpu_buffer_cache_poison(True)
    ours_cls, ref_cls, kwargs = TORCH_NN_TWINS[cell]
    ref = ref_cls(32, 256, dtype=torch.float64, **kwargs)
    ours = ours_cls(32, 256, dtype=torch.float64, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(64, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    weights = torch.randn(64, 64, ref.proj_size or 256, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(6))
    results = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_(True)
        output, _ = module(xi)
        grads = torch.autograd.grad((output * weights).sum(), [xi] + list(module.parameters()))
        results.append([output.detach()] + list(grads))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
