"""The inference op rnnfused::layer_inference (csrc/op_schemas.h): one layer and direction from the
input itself, the projection computed inside the fused engine a few steps ahead. Parity with
torch.nn at odd sizes on every instruction set and with teams of 1, 2 and 3 threads; agreement
with the recurrence ops on a GEMM's projection; when the layers call it and when they do not;
its errors; its fake kernel."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

import rnnfused
from rnnfused import _C, functional
from helpers import LAYER_MODES, flatten, sequence_inputs, twin_layers
from test_cpu_engine import ISAS, _run

ops = torch.ops.rnnfused
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}

# Eval-mode forward under no_grad, where the layers run the inference op, against torch.nn, at the
# engine's awkward sizes (H not a multiple of the vector, B from 1 to 67, packed batches that shrink
# and, in reverse, grow; chunks of the projection that end inside the sequence).
INFERENCE_SNIPPET = """
    import torch, rnnfused
    from rnnfused import _C, functional
    from helpers import LAYER_MODES, flatten, sequence_inputs, twin_layers
    print(rnnfused.build_info()["cpu_isa"])
    _C._set_cpu_engine_min_flops(0)   # every size runs on the whole team
    if PRODUCT == "tiles":
        _C._set_cpu_path("fused")          # every batch on the engine's register tiles
        _C._set_cpu_engine_projection_override(1)  # every cell projects inside the engine, on every ISA
    else:
        _C._set_cpu_engine_blas_override(1)  # every batch on the engine's per-slice BLAS products
    calls = []
    op = torch.ops.rnnfused.layer_inference
    class Counting:
        def __getattr__(self, name):
            if name == "layer_inference":
                calls.append(1)
            return getattr(torch.ops.rnnfused, name)
    functional._ops_ns = functional._CPU_OPS = Counting()
    cases = [(3, 1, 2, "padded", False), (37, 5, 9, "packed_unsorted", True), (70, 67, 4, "padded", True),
             (37, 17, 6, "packed_sorted", False), (21, 1, 5, "unbatched", True), (16, 16, 300, "padded", False)]
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for mode in LAYER_MODES:
            for hidden, batch, steps, form, bidirectional in cases:
                for dtype, tolerance in ((torch.float64, dict(rtol=1e-9, atol=1e-11)),
                                         (torch.float32, dict(rtol=2e-4, atol=2e-5))):
                    ref, ours = twin_layers(mode, 11, hidden, dtype=dtype, num_layers=2, bidirectional=bidirectional)
                    ref.eval(), ours.eval()
                    states = [2 * (1 + bidirectional), batch, hidden]
                    shapes = [states, states] if mode == "lstm" else [states]
                    _, args = sequence_inputs(form, steps, batch, 11, shapes, dtype)()
                    before = len(calls)
                    with torch.no_grad():
                        expected, actual = flatten(ref(*args)), flatten(ours(*args))
                    assert len(calls) - before == 2 * (1 + bidirectional), (mode, form, len(calls) - before)
                    for a, e in zip(actual, expected):
                        torch.testing.assert_close(a, e, **tolerance)
    print("ok")
"""


@pytest.mark.parametrize("product", ["tiles", "blas"])
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_inference_parity_every_isa_and_team(isa, product):
    """Outputs and final states of every layer class in eval mode under no_grad (two layers, both
    directions, every input form) match torch.nn in float64 and float32, for each instruction set
    and teams of 1, 2 and 3 threads, with every layer on the inference op: the engine's register
    tiles projecting the input themselves, and its per-slice BLAS products."""
    if isa not in ISAS:
        pytest.skip(f"this processor or build cannot run the {isa} kernels")
    if product == "blas" and _C.cpu_blas() != "blas":
        pytest.skip("this torch exports no BLAS (the engine's BLAS products need it)")
    out = _run(f"PRODUCT = {product!r}\n" + textwrap.dedent(INFERENCE_SNIPPET), RNNFUSED_CPU_ISA=isa).split()
    assert out[0] == isa and out[-1] == "ok"


def _op_inputs(mode, dtype, bias, batch_sizes, hidden=29, input_size=13, batch=6):
    g = torch.Generator().manual_seed(11)
    G = GATES[mode]
    rows = int(batch_sizes.sum()) if batch_sizes is not None else 5 * batch

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    x = draw(rows, input_size)
    w_ih = draw(G * hidden, input_size, scale=0.3)
    w_hh = draw(G * hidden, hidden, scale=0.3)
    b_ih = draw(G * hidden) if bias else None
    b_hh = draw(G * hidden) if bias else None
    h0 = draw(batch, hidden)
    c0 = draw(batch, hidden) if mode == "lstm" else None
    return x, w_ih, b_ih, w_hh, b_hh, h0, c0


def _recurrence(mode, x, w_ih, b_ih, w_hh, b_hh, h0, c0, batch_sizes, reverse):
    """The same layer through F.linear and the cell's recurrence op."""
    gates_x = F.linear(x, w_ih, b_ih)
    if mode == "lstm":
        return ops.lstm_recurrence(gates_x, w_hh, b_hh, None, h0, c0, batch_sizes, reverse, False)[:3]
    if mode == "gru":
        return ops.gru_recurrence(gates_x, w_hh, b_hh, h0, batch_sizes, reverse, False)[:2]
    return getattr(ops, f"{mode}_recurrence")(gates_x, w_hh, b_hh, h0, batch_sizes, reverse)


@pytest.fixture
def cpu_path():
    previous = _C.cpu_path()
    flops = _C._cpu_engine_min_flops()
    yield _C._set_cpu_path
    _C._set_cpu_path(previous)
    _C._set_cpu_engine_min_flops(flops)
    _C._set_cpu_engine_blas_override(0)
    _C._set_cpu_vendor_override(0)


@pytest.fixture
def projection_everywhere():
    """Every call the engine runs projects inside it, whatever the cell, ISA and size (by default
    only where that was measured faster: csrc/cpu/engine.h), so that the code is tested on all."""
    _C._set_cpu_engine_projection_override(1)
    yield
    _C._set_cpu_engine_projection_override(0)


def _run_on(path, cpu_path):
    """Sets the CPU path ("fused": the engine's register tiles at every batch; "steps"), or for
    "blas" the engine's per-slice BLAS products at every batch (skipped without libtorch's BLAS)."""
    if path != "blas":
        cpu_path(path)
        return
    if _C.cpu_blas() != "blas":
        pytest.skip("this torch exports no BLAS")
    cpu_path("auto")
    _C._set_cpu_engine_blas_override(1)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("path", ["fused", "blas", "steps"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_op_agrees_with_the_recurrence_op(mode, path, dtype, reverse, bias, cpu_path, projection_everywhere):
    """On the engine (register tiles or per-slice BLAS products) the projection's sums may run in
    another order than the GEMM's: agreement to rounding. On the per-step path (and in 16-bit
    dtypes, which never project in the engine) the op is the GEMM and the recurrence op: the same
    numbers, bit for bit."""
    _run_on(path, cpu_path)
    _C._set_cpu_engine_min_flops(0)
    batch_sizes = torch.tensor([6, 6, 5, 3, 3, 1])
    args = _op_inputs(mode, dtype, bias, batch_sizes)
    expected = _recurrence(mode, *args, batch_sizes, reverse)
    output, h_n, c_n = ops.layer_inference(mode, *args, batch_sizes, reverse)
    actual = (output, h_n, c_n) if mode == "lstm" else (output, h_n)
    assert c_n.numel() == 0 or mode == "lstm"
    in_engine = path in ("fused", "blas") and dtype in (torch.float32, torch.float64)
    if not in_engine:
        tolerance = dict(rtol=0, atol=0)
    elif dtype == torch.float64:
        tolerance = dict(rtol=1e-12, atol=1e-12)
    else:
        tolerance = dict(rtol=1e-5, atol=1e-5)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, **tolerance)


@pytest.mark.parametrize("product", ["tiles", "blas"])
@pytest.mark.parametrize("reverse", [False, True])
def test_op_padded_and_long_sequences(product, reverse, cpu_path, projection_everywhere):
    """No batch_sizes (a padded batch), and more steps than one chunk of the projection holds
    (chunks ending inside the sequence, in both directions)."""
    _run_on("fused" if product == "tiles" else "blas", cpu_path)
    for mode in LAYER_MODES:
        args = _op_inputs(mode, torch.float64, True, torch.tensor([3] * 400), hidden=20, batch=3)
        expected = _recurrence(mode, *args, None, reverse)
        actual = ops.layer_inference(mode, *args, None, reverse)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_op_errors():
    args = list(_op_inputs("lstm", torch.float32, True, None))
    with pytest.raises(RuntimeError, match="cell must be 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got 'lstmx'"):
        ops.layer_inference("lstmx", *args, None, False)
    with pytest.raises(RuntimeError, match="c0 must be given for the LSTM and only for it"):
        ops.layer_inference("lstm", *args[:6], None, None, False)
    with pytest.raises(RuntimeError, match="input must be 2-D"):
        ops.layer_inference("lstm", args[0][None], *args[1:], None, False)
    with pytest.raises(RuntimeError, match="w_ih has dtype Double but input has dtype Float"):
        ops.layer_inference("lstm", args[0], args[1].double(), *args[2:], None, False)
    with pytest.raises(RuntimeError, match="w_ih must have 4 \\* hidden rows"):
        ops.layer_inference("lstm", args[0], args[1][:-1], *args[2:], None, False)
    with pytest.raises(RuntimeError, match="w_hh must have 29 columns"):
        ops.layer_inference("lstm", *args[:3], args[3][:, :-1], *args[4:], None, False)
    with pytest.raises(RuntimeError, match="b_hh must have shape \\[116\\]"):
        ops.layer_inference("lstm", *args[:4], args[4][:-1], *args[5:], None, False)
    with pytest.raises(RuntimeError, match="c0 must have 6 rows"):
        ops.layer_inference("lstm", *args[:6], args[6][:-1], None, False)
    with pytest.raises(RuntimeError, match="not a multiple of the batch"):
        ops.layer_inference("lstm", args[0][:-1], *args[1:], None, False)
    gru = list(_op_inputs("gru", torch.float32, True, None))
    with pytest.raises(RuntimeError, match="c0 must be given for the LSTM and only for it"):
        ops.layer_inference("gru", *gru[:6], torch.zeros(6, 29), None, False)


def test_op_has_no_derivative():
    args = list(_op_inputs("gru", torch.float64, True, None))
    args[0].requires_grad_()
    output, _, _ = ops.layer_inference("gru", *args, None, False)
    with pytest.raises(RuntimeError, match="layer_inference has no derivative"):
        output.sum().backward()


def test_opcheck():
    """The fake kernel agrees with the CPU kernel (shapes, dtypes, strides), with and without the
    optional arguments (no derivative: the inputs do not require grad)."""
    for mode in LAYER_MODES:
        for bias in (True, False):
            batch_sizes = torch.tensor([6, 4, 4, 1])
            args = _op_inputs(mode, torch.float32, bias, batch_sizes)
            torch.library.opcheck(ops.layer_inference.default, (mode, *args, batch_sizes, True),
                                  test_utils=("test_schema", "test_faketensor"))
    meta = [t.to("meta") if t is not None else None for t in _op_inputs("lstm", torch.float32, True, None)]
    output, h_n, c_n = ops.layer_inference("lstm", *meta, None, False)
    assert output.shape == (30, 29) and h_n.shape == (6, 29) and c_n.shape == (6, 29)


class _CountingOps:
    """Stands in for functional's op library and counts the inference op's calls."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        if name == "layer_inference":
            self.calls += 1
        return getattr(torch.ops.rnnfused, name)


@pytest.fixture
def counted(monkeypatch):
    counter = _CountingOps()
    monkeypatch.setattr(functional, "_ops_ns", counter)
    monkeypatch.setattr(functional, "_CPU_OPS", counter)
    return counter


def _layer(mode, **kwargs):
    ref, ours = twin_layers(mode, 11, 24, dtype=torch.float32, **kwargs)
    return ref, ours, torch.randn(9, 4, 11)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_layers_use_it_in_inference_only(mode, counted, cpu_path, projection_everywhere):
    cpu_path("auto")
    ref, ours, x = _layer(mode)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=2e-4, atol=2e-5)
    assert counted.calls == 1
    with torch.inference_mode():
        ours(x)
    assert counted.calls == 2
    ours(x)  # autograd records: the recurrence op, whose backward is rnnfused's
    ours(x.requires_grad_())
    assert counted.calls == 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x)
    with torch.no_grad():
        ours.double()(x.double())  # float64 too
        assert counted.calls == 3
        ours.to(torch.bfloat16)(x.to(torch.bfloat16))  # 16-bit dtypes: not in the engine's projection
        torch.func.vmap(lambda v: ours.float()(v)[0], in_dims=1)(x.float())
    assert counted.calls == 3
    # Batches above the register tiles' run on the engine's BLAS products where the BLAS is
    # libtorch's; on the per-step path, one GEMM for the projection as before.
    with torch.no_grad():
        ours(torch.randn(3, 40, 11))
        assert counted.calls == (4 if _C.cpu_blas() == "blas" else 3)
        cpu_path("steps")
        ours(torch.randn(3, 40, 11))
        ours(x)
    assert counted.calls == (4 if _C.cpu_blas() == "blas" else 3)


def test_where_it_projects_inside_the_engine(counted, cpu_path):
    """The rule of csrc/cpu/engine.h (what was measured faster than the GEMM first): the LSTM and
    GRU where the ISA's register tiles hold at least 3 rows (AVX-512: LSTM 6, GRU 8; AVX2 and the
    portable build: LSTM 3, GRU 4), never the Elman RNN, and each thread's share of W_ih and W_hh
    at most 1 MiB; elsewhere the layer projects with one GEMM first."""
    cpu_path("auto")
    _C._set_cpu_engine_blas_override(-1)  # the register tiles' rule alone
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _C._cpu_engine_projects_input(16, 4 * 256, 256, 256, 4)  # 1 MiB per thread
        assert not _C._cpu_engine_projects_input(16, 4 * 256, 256, 264, 4)  # a little more
        assert _C._cpu_engine_projects_input(16, 3 * 256, 256, 256, 4)
        assert not _C._cpu_engine_projects_input(16, 256, 256, 256, 4)
        assert not _C._cpu_engine_projects_input(16, 5 * 256, 256, 256, 4)  # no cell has 5 gates
        assert not _C._cpu_engine_projects_input(16, 3 * 256 + 1, 256, 256, 4)
        assert not _C._cpu_engine_projects_input(16, 3 * 256, 256, 430, 4)
        assert not _C._cpu_engine_projects_input(16, 3 * 512, 512, 512, 4)
        assert not _C._cpu_engine_projects_input(16, 3 * 256, 256, 256, 8)  # float64: twice the bytes
        assert not _C._cpu_engine_projects_input(16, 3 * 256, 256, 0, 4)
        _C._set_cpu_vendor_override(1)  # Intel's rule: no engine at B = 64 (auto)
        assert not _C._cpu_engine_projects_input(64, 3, 1, 1, 4)
        _C._set_cpu_vendor_override(0)
        with torch.no_grad():
            rnnfused.GRU(512, 512).eval()(torch.randn(3, 16, 512))
            rnnfused.RNN(256, 256).eval()(torch.randn(3, 16, 256))
            assert counted.calls == 0
            rnnfused.GRU(256, 256).eval()(torch.randn(3, 16, 256))
            assert counted.calls == 1
    finally:
        torch.set_num_threads(threads)


def test_where_it_runs_the_blas_products(counted, cpu_path):
    """The rule of csrc/cpu/engine.h: with the auto path and libtorch's BLAS, on an Intel processor
    above the register tiles' batches (16 rows) and from 2 rows in float32 where MKL's packed GEMM
    is there and every step has the full batch, and at 1 row where W_hh (G * H * H floats) takes
    more than 512 KiB and at most 1 MiB; on other processors above 16 rows for the Elman
    RNN only, or where the products run on oneDNN's brgemm micro-kernel (float32 compute) above 16
    rows for every cell and from 8 for the Elman RNN and where W_hh takes more than 1 MiB; never on
    the per-step path, never with the register tiles forced ("fused"),
    never on ATen's GEMM (it would run inside the engine's parallel region)."""
    cpu_path("auto")
    blas = _C._cpu_engine_blas_product
    if _C.cpu_blas() != "blas":
        assert not blas(64, 4, True, 3, 64)
        return
    mkl_packed = _C._cpu_blas_packs()
    gemm_mode = _C._cpu_bulk_gemm_mode()
    ops_run = 0  # layer_inference calls of the brgemm section below
    _C._set_cpu_bulk_gemm_mode("blas")  # MKL's packed GEMM in the engine's products everywhere
    try:
        _C._set_cpu_vendor_override(1)
        assert _C._cpu_is_intel()
        for gates in (4, 3, 1):
            assert blas(16, 4, True, gates, 64) == mkl_packed and blas(2, 4, True, gates, 64) == mkl_packed
            assert blas(17, 4, True, gates, 64) and blas(17, 4, False, gates, 64)
            assert blas(64, 8, True, gates, 64)
            assert not blas(1, 4, True, gates, 1024)  # a large W_hh: the register tiles are faster
            assert blas(1, 4, True, gates, 512 if gates == 1 else 256) == mkl_packed  # 512 KiB to 1 MiB
            assert not blas(1, 4, True, gates, 128)  # a small W_hh: the register tiles are faster
            assert not blas(1, 8, True, gates, 64)
            assert not blas(16, 4, False, gates, 64)  # packed sequences of several lengths
            assert not blas(16, 8, True, gates, 64)
        assert blas(1, 4, True, 4, 256) == mkl_packed and not blas(1, 4, True, 4, 257)
        assert blas(1, 4, True, 1, 363) == mkl_packed and not blas(1, 4, True, 1, 362)
        _C._set_cpu_vendor_override(-1)  # an AMD processor: the register tiles up to 16 rows, and
        assert not _C._cpu_is_intel()  # the LSTM's and GRU's above them too
        for gates in (4, 3, 1):
            assert not blas(16, 4, True, gates, 64) and not blas(2, 4, True, gates, 64)
        assert blas(17, 4, True, 1, 64) and blas(64, 8, True, 1, 64) and blas(17, 4, False, 1, 64)
        for gates in (4, 3):
            assert not blas(17, 4, True, gates, 64) and not blas(64, 8, True, gates, 64)
            assert not blas(256, 4, True, gates, 64) and not blas(1, 4, True, gates, 64)
        if _C._cpu_bulk_brgemm_available():
            _C._set_cpu_bulk_gemm_mode("brgemm")  # the products on the micro-kernel
            for gates in (4, 3, 1):
                assert blas(17, 4, True, gates, 64) and blas(256, 4, False, gates, 64)
                assert not blas(2, 4, True, gates, 64) and not blas(1, 4, True, gates, 256)
            assert blas(8, 4, True, 1, 64) and blas(16, 4, False, 1, 64) and not blas(7, 4, True, 1, 64)
            assert not blas(16, 4, True, 4, 64) and not blas(16, 4, True, 3, 64)
            assert not blas(16, 4, True, 4, 256) and blas(8, 4, True, 4, 257)  # W_hh over 1 MiB
            assert blas(8, 4, False, 3, 512) and not blas(7, 4, True, 3, 512)
            try:  # within a one-thread period, from half of that (one core's L2)
                _C._note_cpu_engine_team_stall()
                assert blas(16, 4, True, 4, 256) and blas(8, 4, True, 3, 210)
                assert not blas(8, 4, True, 4, 128) and not blas(4, 4, True, 4, 256)
                with torch.no_grad():  # the op in the period, on one thread: the products too
                    before = _C._cpu_engine_blas_calls()
                    rnnfused.LSTM(256, 256).eval()(torch.randn(3, 16, 256))
                    ops_run += 1
                    assert _C._cpu_engine_blas_calls() == before + 1
                torch.use_deterministic_algorithms(True)  # which keeps the threads, and the rule
                try:
                    assert not blas(16, 4, True, 4, 256)
                finally:
                    torch.use_deterministic_algorithms(False)
            finally:
                _C._end_cpu_engine_solo()
            assert not blas(16, 4, True, 4, 256)
            assert blas(17, 8, True, 1, 64) and not blas(17, 8, True, 3, 64)  # float64: MKL's rule
            _C._set_cpu_bulk_gemm_mode("blas")
    finally:
        _C._set_cpu_vendor_override(0)
    with torch.no_grad():
        rnnfused.GRU(24, 24).double().eval()(torch.randn(3, 40, 24, dtype=torch.float64))
        assert counted.calls == 1 + ops_run
    _C._set_cpu_vendor_override(-1)  # another vendor at B = 40: the GRU on the register tiles
    try:
        before = _C._cpu_engine_blas_calls()
        with torch.no_grad():
            rnnfused.GRU(24, 24).eval()(torch.randn(3, 40, 24))
            assert _C._cpu_engine_blas_calls() == before
            rnnfused.RNN(24, 24).eval()(torch.randn(3, 40, 24))  # the Elman RNN on the BLAS products
            assert _C._cpu_engine_blas_calls() == before + 1
            if _C._cpu_bulk_brgemm_available():
                _C._set_cpu_bulk_gemm_mode("brgemm")  # and the GRU too on the micro-kernel
                rnnfused.GRU(24, 24).eval()(torch.randn(3, 40, 24))
                assert _C._cpu_engine_blas_calls() == before + 2
        assert counted.calls == 3 + ops_run + _C._cpu_bulk_brgemm_available()
    finally:
        _C._set_cpu_vendor_override(0)
        _C._set_cpu_bulk_gemm_mode(gemm_mode)
    cpu_path("fused")
    assert not blas(64, 4, True, 3, 64)
    cpu_path("steps")
    assert not blas(64, 4, True, 3, 64)
    _C._set_cpu_engine_blas_override(1)
    assert not blas(64, 4, True, 3, 64)  # not even forced
    cpu_path("auto")
    assert blas(2, 8, False, 4, 64)
    _C._set_cpu_blas("aten")
    try:
        assert not blas(64, 4, True, 3, 64)
        with torch.no_grad():  # ATen's GEMM: the register tiles or the GEMM first, the same numbers
            ref, ours = twin_layers("lstm", 11, 24, dtype=torch.float64)
            x = torch.randn(4, 40, 11, dtype=torch.float64)
            torch.testing.assert_close(ours.eval()(x)[0], ref.eval()(x)[0], rtol=1e-9, atol=1e-11)
    finally:
        _C._set_cpu_blas("blas")


def test_blas_products_late_thread_is_taken_over():
    """With the BLAS products too, a thread that owns slices other than the first and is late
    before each phase has its phases run by the others (a slice's GEMMs and buffers belong to the
    slice, not to a thread), and the numbers are still torch.nn's."""
    if _C.cpu_blas() != "blas":
        pytest.skip("this torch exports no BLAS")
    snippet = """
        import torch, rnnfused
        from rnnfused import _C
        from helpers import LAYER_MODES, flatten, sequence_inputs, twin_layers
        torch.set_num_threads(2)
        _C._set_cpu_engine_min_flops(0)
        _C._set_cpu_engine_blas_override(1)
        _C._set_cpu_engine_straggler_delay_us(300)
        before = _C._cpu_engine_takeovers()
        for mode in LAYER_MODES:
            ref, ours = twin_layers(mode, 7, 45, dtype=torch.float64, bidirectional=True)
            ref.eval(), ours.eval()
            _, args = sequence_inputs("packed_unsorted", 12, 5, 7, None, torch.float64)()
            with torch.no_grad():
                for a, e in zip(flatten(ours(*args)), flatten(ref(*args))):
                    torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
        print("takeovers", _C._cpu_engine_takeovers() - before)
    """
    out = _run(snippet).split()
    assert out[-2] == "takeovers" and int(out[-1]) > 0, out


def test_regularized_and_projected_layers_do_not_use_it(counted, projection_everywhere):
    with torch.no_grad():
        rnnfused.LSTM(11, 24, proj_size=7).eval()(torch.randn(5, 3, 11))
        rnnfused.LSTM(11, 24, zoneout=0.2).eval()(torch.randn(5, 3, 11))
        rnnfused.GRU(11, 24, zoneout=0.2).eval()(torch.randn(5, 3, 11))
        rnnfused.GRU(11, 24, recurrent_dropout=0.3).train()(torch.randn(5, 3, 11))
    assert counted.calls == 0


def test_traced_and_exported_layers_do_not_use_it(counted, projection_everywhere):
    ours = rnnfused.LSTM(11, 24).eval()
    x = torch.randn(5, 3, 11)
    with torch.no_grad():
        torch.jit.trace(ours, (x,), check_trace=False)
    torch.export.export(ours, (x,))
    assert counted.calls == 0
