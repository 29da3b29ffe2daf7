"""The fused CPU engine (csrc/cpu/engine_impl.h): parity with torch.nn at odd sizes on every
instruction set this processor has, with teams of 1, 2 and 3 threads; agreement with the per-step
path; the vectorized tanh; the path and ISA switches."""
import itertools
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import rnnfused
from rnnfused import _C
from helpers import LAYER_MODES, assert_twins_agree, sequence_inputs, twin_layers


def available_isas():
    """Instruction sets this processor and build can run: each is tried in a subprocess."""
    isas = []
    for isa in ("default", "avx2", "avx512"):
        result = subprocess.run([sys.executable, "-c", "import rnnfused; print(rnnfused.build_info()['cpu_isa'])"],
                                env=dict(os.environ, RNNFUSED_CPU_ISA=isa), capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.split()[-1] == isa:
            isas.append(isa)
    return isas


ISAS = available_isas()


def _run(code, **env):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, **env),
                            capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# Sizes chosen against the engine's tiling: H not a multiple of 8 or 16 (a partial last block of
# units), H below one vector, B from 1 to 67 (one-row tiles of several blocks, full and partial
# row tiles, chunked k loops), packed batches that shrink (forward) and grow (reverse).
ENGINE_SNIPPET = """
    import torch, rnnfused
    from rnnfused import _C
    from helpers import LAYER_MODES, assert_twins_agree, sequence_inputs, twin_layers
    print(rnnfused.build_info()["cpu_isa"])
    _C._set_cpu_path("fused")          # every batch on the engine
    _C._set_cpu_engine_min_flops(0)   # every size runs on the whole team
    # The register tiles, or every slice's products as BLAS GEMMs
    _C._set_cpu_engine_blas_override(1 if PRODUCT == "blas" else -1)
    cases = [(3, 1, 2, "padded", False), (37, 5, 9, "packed_unsorted", True), (70, 67, 4, "padded", True),
             (37, 17, 6, "packed_sorted", False), (21, 1, 5, "unbatched", True)]
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for mode in LAYER_MODES:
            for hidden, batch, steps, form, bidirectional in cases:
                ref, ours = twin_layers(mode, 11, hidden, dtype=torch.float64, num_layers=2,
                                        bidirectional=bidirectional)
                states = [2 * (1 + bidirectional), batch, hidden]
                shapes = [states, states] if mode == "lstm" else [states]
                assert_twins_agree(ref, ours, sequence_inputs(form, steps, batch, 11, shapes, torch.float64))
            ref, ours = twin_layers(mode, 11, 37, dtype=torch.float32, bidirectional=True)
            assert_twins_agree(ref, ours, sequence_inputs("packed_unsorted", 8, 19, 11, None, torch.float32),
                               dtype=torch.float32)
            # Every step with the whole batch: float32 GEMMs on MKL's packed weights where it has them
            ref, ours = twin_layers(mode, 11, 37, dtype=torch.float32, bidirectional=True)
            assert_twins_agree(ref, ours, sequence_inputs("padded", 6, 9, 11, None, torch.float32),
                               dtype=torch.float32)
    print("blas_calls", _C._cpu_engine_blas_calls(), "ok")
"""


@pytest.mark.parametrize("product", ["tiles", "blas"])
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_engine_parity_every_isa_and_team(isa, product):
    """float64 parity with torch.nn (outputs, states, every gradient) on the engine, for each
    instruction set, with teams of 1, 2 and 3 threads (3 on a 2-core machine oversubscribes it:
    the barrier must still make progress), on the register tiles and on per-slice BLAS GEMMs."""
    if isa not in ISAS:
        pytest.skip(f"this processor or build cannot run the {isa} kernels")
    if product == "blas" and _C.cpu_blas() != "blas":
        pytest.skip("this torch exports no BLAS")
    out = _run(f"PRODUCT = {product!r}\n" + textwrap.dedent(ENGINE_SNIPPET), RNNFUSED_CPU_ISA=isa).split()
    assert out[0] == isa and out[-3] == "blas_calls" and out[-1] == "ok", out
    assert (int(out[-2]) > 0) == (product == "blas"), out


@pytest.fixture
def whole_team():
    previous = _C._cpu_engine_min_flops()
    _C._set_cpu_engine_min_flops(0)
    yield
    _C._set_cpu_engine_min_flops(previous)


@pytest.fixture
def cpu_path():
    previous = _C.cpu_path()

    def set_path(name):
        _C._set_cpu_path(name)

    yield set_path
    _C._set_cpu_path(previous)
    _C._set_cpu_engine_blas_override(0)
    _C._set_cpu_vendor_override(0)


def _op_outputs(mode, dtype, path, set_path, reverse, batch_sizes):
    """One recurrence op forward and backward on fixed inputs, on the given path."""
    set_path(path)
    gates = {"lstm": 4, "gru": 3}.get(mode, 1)
    hidden, batch = 29, 6
    rows = int(batch_sizes.sum())
    g = torch.Generator().manual_seed(3)
    gx = torch.randn(rows, gates * hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(gates * hidden, hidden, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    b = torch.randn(gates * hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    h0 = torch.randn(batch, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    leaves = [gx, w, b, h0]
    if mode == "lstm":
        c0 = torch.randn(batch, hidden, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        leaves.append(c0)
        outs = torch.ops.rnnfused.lstm_recurrence(gx, w, b, None, h0, c0, batch_sizes, reverse, True)[:3]
    elif mode == "gru":
        outs = torch.ops.rnnfused.gru_recurrence(gx, w, b, h0, batch_sizes, reverse, True)[:2]
    else:
        outs = getattr(torch.ops.rnnfused, f"{mode}_recurrence")(gx, w, b, h0, batch_sizes, reverse)
    weights = torch.Generator().manual_seed(5)
    loss = sum((o.double() * torch.randn(o.shape, generator=weights, dtype=torch.float64)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("product", ["tiles", "blas"])
@pytest.mark.parametrize("lengths", ["shrinking", "full"])
def test_engine_agrees_with_per_step_path(mode, reverse, dtype, product, lengths, cpu_path, whole_team):
    """The engine (register tiles, or per-slice BLAS GEMMs: MKL's packed weights in float32 where
    every step has the whole batch, the plain GEMM otherwise) and the per-step GEMM path compute
    the same formulas; they differ only in the order of the GEMM's sums (and, in float32, in the
    vectorized tanh, which both share). bfloat16 / float16 round h to the dtype at every step on
    both paths."""
    if product == "blas" and _C.cpu_blas() != "blas":
        pytest.skip("this torch exports no BLAS")
    batch_sizes = torch.tensor([6, 6, 5, 3, 3, 1] if lengths == "shrinking" else [6] * 6)
    _C._set_cpu_engine_blas_override(1 if product == "blas" else -1)
    calls = _C._cpu_engine_blas_calls()
    fused = _op_outputs(mode, dtype, "fused", cpu_path, reverse, batch_sizes)
    assert _C._cpu_engine_blas_calls() - calls == (2 if product == "blas" else 0)  # forward and backward
    steps = _op_outputs(mode, dtype, "steps", cpu_path, reverse, batch_sizes)
    if dtype == torch.float64:
        tolerance = dict(rtol=1e-12, atol=1e-12)
    elif dtype == torch.float32:
        tolerance = dict(rtol=1e-5, atol=1e-5)
    else:  # one unit of the 16-bit dtype can move an h, and the steps after it
        tolerance = dict(rtol=0.05, atol=0.05)
    for a, e in zip(fused[0] + fused[1], steps[0] + steps[1]):
        torch.testing.assert_close(a.double(), e.double(), **tolerance)


def test_fast_tanh_accuracy_through_the_op():
    """float32 tanh (RNN tanh cell with W_hh = 0, b_hh = 0: h = tanh(gates_x)) on a dense grid of
    [-12, 12] and the special values, against float64 tanh, on every instruction set."""
    snippet = """
        import torch, rnnfused
        print(rnnfused.build_info()["cpu_isa"])
        x = torch.cat([torch.linspace(-12, 12, 2_000_001), torch.tensor([0.0, 1e-30, -1e-30, 1e-8, -3e-5, 0.6249,
                       0.625, -0.625, 0.6251, 9.0, 10.0, 30.0, -30.0, 1e30, float("inf"), float("-inf")])])
        x = torch.cat([x, torch.zeros((-x.numel()) % 64)]).reshape(-1, 64)
        rows, hidden = x.shape
        h = torch.ops.rnnfused.rnn_tanh_recurrence(x, torch.zeros(hidden, hidden), None, torch.zeros(rows, hidden),
                                                   torch.full((1,), rows, dtype=torch.long), False)[0]
        exact = torch.tanh(x.double())
        magnitude = exact.float().abs()
        ulp = (magnitude.nextafter(torch.tensor(float("inf"))) - magnitude).double().clamp_min(1e-45)
        err = ((h.double() - exact).abs() / ulp).max().item()
        assert err <= 1.5, err
        assert torch.isnan(torch.ops.rnnfused.rnn_tanh_recurrence(torch.full((1, 64), float("nan")),
            torch.zeros(64, 64), None, torch.zeros(1, 64), None, False)[0]).all()
        print("ok", err)
    """
    for isa in ISAS:
        out = _run(snippet, RNNFUSED_CPU_ISA=isa).split()
        assert out[0] == isa and out[1] == "ok", out


def test_fast_sigmoid_accuracy_through_the_op():
    """float32 sigmoid (the LSTM's workspace holds i = sigmoid(gates_x) when W_hh = 0 and there is
    no bias) on a dense grid of [-90, 90] and the special values, against float64 sigmoid, on every
    instruction set and both CPU paths: within 2.5 ulp where the result is a normal float, 0 where
    e^-x overflows (x < -88.7, as 1 / (1 + e^-x) gives), exact 0 / 1 at -inf / +inf, NaN kept."""
    snippet = """
        import torch, rnnfused
        from rnnfused import _C
        print(rnnfused.build_info()["cpu_isa"])
        x = torch.cat([torch.linspace(-90, 90, 2_000_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -3e-5, 17.0,
                       -17.0, 30.0, -30.0, 88.0, -88.0, 88.8, -88.8, 1e30, -1e30, float("inf"), float("-inf")])])
        x = torch.cat([x, torch.zeros((-x.numel()) % 64)]).reshape(-1, 64)
        rows, hidden = x.shape
        gates_x = torch.cat([x, x, x, x], 1)
        exact = torch.sigmoid(x.double())
        normal = exact >= torch.finfo(torch.float32).tiny
        for path in ("fused", "steps"):
            _C._set_cpu_path(path)
            workspace = torch.ops.rnnfused.lstm_recurrence(
                gates_x, torch.zeros(4 * hidden, hidden), None, None, torch.zeros(rows, hidden),
                torch.zeros(rows, hidden), torch.full((1,), rows, dtype=torch.long), False, True)[3]
            i = workspace[:, :hidden].double()
            magnitude = exact.float()
            ulp = (magnitude.nextafter(torch.tensor(float("inf"))) - magnitude).double()
            err = ((i - exact).abs() / ulp)[normal].max().item()
            # 1 / (1 + e^-x) rounds 1 + e^-x: torch.sigmoid itself is 2.41 ulp from exact on this grid.
            assert err <= 2.5, (path, err)
            assert (i[x < -88.8] == 0).all() and (i[~normal] <= exact[~normal] * 2 + 1e-44).all()
            assert i[x == float("-inf")].eq(0).all() and i[x == float("inf")].eq(1).all()
            nan = torch.ops.rnnfused.lstm_recurrence(torch.full((1, 256), float("nan")), torch.zeros(256, 64), None,
                                                     None, torch.zeros(1, 64), torch.zeros(1, 64), None, False, True)[3]
            assert torch.isnan(nan[:, :64]).all()
        print("ok", err)
    """
    for isa in ISAS:
        out = _run(snippet, RNNFUSED_CPU_ISA=isa).split()
        assert out[0] == isa and out[1] == "ok", out


def test_path_switch_and_errors(cpu_path):
    assert _C.cpu_path() == "auto"  # the default
    with pytest.raises(RuntimeError, match="must be 'auto', 'fused' or 'steps', got 'fast'"):
        _C._set_cpu_path("fast")
    out = _run("import rnnfused; from rnnfused import _C; print(_C.cpu_path())", RNNFUSED_CPU_PATH="steps")
    assert out.split()[-1] == "steps"
    result = subprocess.run([sys.executable, "-c", "import torch, rnnfused; torch.ops.rnnfused.rnn_tanh_recurrence("
                             "torch.zeros(2, 3), torch.zeros(3, 3), None, torch.zeros(1, 3), None, False)"],
                            env=dict(os.environ, RNNFUSED_CPU_PATH="fastest"), capture_output=True, text=True)
    assert result.returncode != 0
    assert "RNNFUSED_CPU_PATH must be 'auto', 'fused' or 'steps', got 'fastest'" in result.stderr


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_auto_path_gives_the_same_numbers_at_the_threshold(mode, cpu_path):
    """'auto' runs batches of up to 16 rows on the engine and larger ones per step (but on processors
    other than Intel's inference on the engine at every batch, and training up to 128 rows for the
    LSTM, 64 for the GRU, 16 for the Elman RNN, or at every batch where the engine's products run
    on oneDNN's brgemm micro-kernel): at B = 16 and B = 17 the numbers are torch.nn's either way
    (float64)."""
    runs = _C._cpu_engine_runs
    cpu_path("auto")
    for gates, training in itertools.product((4, 3, 1), (False, True)):
        assert runs(1, gates, training) and runs(16, gates, training)
    _C._set_cpu_vendor_override(1)
    for gates, training in itertools.product((4, 3, 1), (False, True)):
        assert not runs(17, gates, training)
    _C._set_cpu_vendor_override(-1)
    gemm_mode = _C._cpu_bulk_gemm_mode()
    try:
        _C._set_cpu_bulk_gemm_mode("blas")
        assert not _C._cpu_step_gemm_uses_brgemm()
        for gates in (4, 3, 1):
            assert runs(17, gates, False) and runs(1000, gates, False)
        assert runs(17, 4, True) and runs(128, 4, True) and not runs(129, 4, True)
        assert runs(17, 3, True) and runs(64, 3, True) and not runs(65, 3, True)
        assert not runs(17, 1, True)
        if _C._cpu_bulk_brgemm_available():
            _C._set_cpu_bulk_gemm_mode("brgemm")
            assert _C._cpu_step_gemm_uses_brgemm()
            for gates, training in itertools.product((4, 3, 1), (False, True)):
                assert runs(17, gates, training) and runs(1000, gates, training)
    finally:
        _C._set_cpu_bulk_gemm_mode(gemm_mode)
    cpu_path("fused")
    assert runs(17, 3, True) and runs(1000, 1, False) and runs(1000, 4, True)
    cpu_path("steps")
    assert not runs(1, 4, False) and not runs(1000, 4, True)
    _C._set_cpu_vendor_override(0)
    cpu_path("auto")
    for batch in (16, 17):
        ref, ours = twin_layers(mode, 5, 19, dtype=torch.float64)
        assert_twins_agree(ref, ours, sequence_inputs("padded", 4, batch, 5, None, torch.float64))


def test_training_runs_the_blas_products_where_the_rule_says(cpu_path):
    """On the "auto" path the recurrence ops' forward and backward run on the per-slice BLAS
    products where engine_blas_product says so (from 2 rows, or 1 where W_hh takes 512 KiB to 1 MiB,
    float32 compute, every step with the whole batch, MKL's packed GEMM there, an Intel processor),
    on the register tiles elsewhere, and
    never above the engine's 16 rows (the per-step path) nor on the "fused" path."""
    cpu_path("auto")
    _C._set_cpu_vendor_override(1)  # the rule's Intel branch on every machine (reset by cpu_path)
    packs = _C.cpu_blas() == "blas" and _C._cpu_blas_packs()

    def calls(batch, dtype=torch.float32, lengths=None, hidden=24):
        layer = rnnfused.LSTM(7, hidden).to(dtype)
        x = torch.randn(5, batch, 7, dtype=dtype)
        if lengths is not None:
            x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        before = _C._cpu_engine_blas_calls()
        out = layer(x)[0]
        (out.data if lengths is not None else out).sum().backward()
        return _C._cpu_engine_blas_calls() - before

    expected = 2 if packs else 0  # forward and backward
    assert calls(2) == expected and calls(8) == expected and calls(16) == expected
    assert calls(16, torch.bfloat16) == expected  # computed in float32
    assert calls(1, hidden=256) == expected  # W_hh of 512 KiB to 1 MiB
    assert calls(1) == 0 and calls(1, hidden=300) == 0  # smaller or larger: the register tiles
    assert calls(16, torch.float64) == 0
    assert calls(9, lengths=[5, 5, 4, 5, 5, 5, 5, 5, 5]) == 0  # a step with fewer rows
    assert calls(17) == 0  # the per-step path
    _C._set_cpu_vendor_override(-1)  # another vendor: the register tiles up to 16 rows
    assert calls(2) == 0 and calls(16) == 0
    _C._set_cpu_vendor_override(1)
    cpu_path("fused")
    assert calls(16) == 0


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("objdump") is None,
                    reason="reads x86 machine code with objdump")
def test_forward_prefetches_are_in_the_build():
    """The forward's tiles prefetch the gates_x lines their finish reads (multiply_blocks'
    `prefetch`). GCC deletes every call to a callable that does nothing but __builtin_prefetch
    unless it is inlined early, and no build had a single prefetch instruction until that was
    found: the forward tiles of each compiled instruction set must have some."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
    counts = {}
    function = ""
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
        elif "prefetcht0" in line and "engine::multiply_blocks" in function and "forward_loop" in function:
            isa = function.split("rnnfused::cpu::", 1)[1].split("::", 1)[0]
            counts[isa] = counts.get(isa, 0) + 1
    compiled = [isa for isa in ("default_isa", "avx2", "avx512")
                if f"rnnfused::cpu::{isa}::engine::forward_loop" in listing]
    assert compiled, "no engine forward found in the library's machine code"
    for isa in compiled:
        # Elman RNN (tanh, relu), GRU and LSTM, float and double: at least one per cell and type.
        assert counts.get(isa, 0) >= 8, f"{isa}: {counts.get(isa, 0)} prefetch instructions in the forward tiles"


def test_bad_isa_is_a_clear_error():
    result = subprocess.run([sys.executable, "-c", "import rnnfused; rnnfused.build_info()"],
                            env=dict(os.environ, RNNFUSED_CPU_ISA="sse9"), capture_output=True, text=True)
    assert result.returncode != 0
    assert "RNNFUSED_CPU_ISA must be 'default', 'avx2' or 'avx512', got 'sse9'" in result.stderr


def test_engine_from_several_python_threads(whole_team):
    """Several Python threads calling at once (each call opens its own team; the packed weights live
    in a buffer per calling thread) still get torch.nn's numbers."""
    import threading

    ref, ours = twin_layers("lstm", 7, 37, dtype=torch.float64)
    x = torch.randn(6, 9, 7, dtype=torch.float64)
    expected = ref(x)[0]
    errors = []

    def work():
        try:
            for _ in range(5):
                torch.testing.assert_close(ours(x)[0], expected, rtol=1e-9, atol=1e-11)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# A late thread in a team on 2 threads (every cell, forward and backward, float64, packed unsorted,
# bidirectional): STRAGGLER sets the testing delay, COUNTERS names what to count, and the snippet
# prints each counter's increase over the loop after the word "counts".
TEAM_SNIPPET = """
    import torch, rnnfused
    from rnnfused import _C
    from helpers import LAYER_MODES, assert_twins_agree, sequence_inputs, twin_layers
    torch.set_num_threads(2)
    _C._set_cpu_path("fused")
    _C._set_cpu_engine_min_flops(0)
    _C._set_cpu_engine_blas_override(1 if PRODUCT == "blas" else -1)
    STRAGGLER(_C)
    before = [getattr(_C, name)() for name in COUNTERS]
    for mode in LAYER_MODES:
        ref, ours = twin_layers(mode, 7, 45, dtype=torch.float64, bidirectional=True)
        assert_twins_agree(ref, ours, sequence_inputs("packed_unsorted", 12, 5, 7, None, torch.float64))
    print("counts", *[getattr(_C, name)() - b for name, b in zip(COUNTERS, before)])
"""


def _team_snippet(product, straggler, counters, after=""):
    head = f"PRODUCT = {product!r}\nCOUNTERS = {counters!r}\ndef STRAGGLER(_C):\n"
    head += "".join(f"    _C.{call}\n" for call in straggler)
    return head + textwrap.dedent(TEAM_SNIPPET) + textwrap.dedent(after)


@pytest.mark.parametrize("product", ["tiles", "blas"])
def test_stalled_phase_puts_the_next_teams_on_one_thread(product):
    """A thread that stalls in the middle of a phase it claimed (it sleeps 3 ms there, as a thread
    whose core another process took) is noted by the thread waiting for it; the teams that start
    in the next 50 ms run on their calling thread alone, and the numbers are still torch.nn's,
    forward and backward, for every cell, on the register tiles and on the per-slice BLAS
    products. Once the one-thread period is ended, a team uses its threads again."""
    if product == "blas" and _C.cpu_blas() != "blas":
        pytest.skip("this torch exports no BLAS")
    after = """
        _C._set_cpu_engine_straggler_delay_us(0)
        ref, ours = twin_layers("lstm", 7, 45, dtype=torch.float64)
        ours.eval()
        _C._end_cpu_engine_solo()
        solo = _C._cpu_engine_solo_runs()
        with torch.no_grad():
            ours(torch.randn(6, 5, 7, dtype=torch.float64))  # one team, started after the end
        print("after_end", _C._cpu_engine_solo_runs() - solo)
    """
    straggler = ["_set_cpu_engine_straggler_delay_us(3000)", "_set_cpu_engine_straggler_inside_phase(True)"]
    out = _run(_team_snippet(product, straggler, ["_cpu_engine_stalls", "_cpu_engine_solo_runs"], after)).split()
    assert out[-5] == "counts" and int(out[-4]) > 0 and int(out[-3]) > 0, out
    assert out[-2:] == ["after_end", "0"], out


@pytest.mark.parametrize("product", ["tiles", "blas"])
def test_late_thread_is_taken_over(product):
    """A thread that owns slices other than the first sleeps 300 us before each phase (as a thread
    whose core another process took): the others run its phases (takeovers counted), and the
    numbers are still torch.nn's, forward and backward, for every cell, on the register tiles and
    on the per-slice BLAS products (a slice's GEMM weights belong to the slice, not to a thread)."""
    if product == "blas" and _C.cpu_blas() != "blas":
        pytest.skip("this torch exports no BLAS")
    out = _run(_team_snippet(product, ["_set_cpu_engine_straggler_delay_us(300)"], ["_cpu_engine_takeovers"])).split()
    assert out[-2] == "counts" and int(out[-1]) > 0, out


@pytest.mark.parametrize("product", ["tiles", "blas"])
def test_team_mostly_taken_over_puts_the_next_teams_on_one_thread(product):
    """A thread that is late before every phase (300 us: never inside a phase, so no phase stalls)
    has most of its phases run by the others; such a team notes a stall when it ends, and the
    teams of the next 50 ms run on their calling thread alone (under contention every taken-over
    phase costs the waiting thread its spin first). The numbers are still torch.nn's."""
    if product == "blas" and _C.cpu_blas() != "blas":
        pytest.skip("this torch exports no BLAS")
    counters = ["_cpu_engine_takeovers", "_cpu_engine_stalls", "_cpu_engine_solo_runs"]
    out = _run(_team_snippet(product, ["_set_cpu_engine_straggler_delay_us(300)"], counters)).split()
    assert out[-4] == "counts" and all(int(n) > 0 for n in out[-3:]), out


@pytest.mark.parametrize("product", ["tiles", "blas"])
def test_thread_that_never_starts_puts_the_next_teams_on_one_thread(product):
    """A thread that has not started running its team 1 ms after the team started (it sleeps 20 ms
    first, longer than the team's phases take, as a thread whose core another process has when
    the team starts) leaves its phases to
    the calling thread, each after a spin: the team counts as stalled, and the teams of the next
    period run on their calling thread alone. The numbers are still torch.nn's (T = 300, H = 128,
    so that the phases and the spins before their takeovers outlast the millisecond)."""
    if product == "blas" and _C.cpu_blas() != "blas":
        pytest.skip("this torch exports no BLAS")
    out = _run(f"""
        import torch, rnnfused
        from rnnfused import _C
        from helpers import LAYER_MODES, assert_twins_agree, sequence_inputs, twin_layers
        torch.set_num_threads(2)
        _C._set_cpu_path("fused")
        _C._set_cpu_engine_min_flops(0)
        _C._set_cpu_engine_blas_override({1 if product == "blas" else -1})
        _C._set_cpu_engine_straggler_delay_us(20000)
        _C._set_cpu_engine_straggler_before_start(True)
        before = _C._cpu_engine_stalls(), _C._cpu_engine_solo_runs()
        for mode in LAYER_MODES:
            _C._end_cpu_engine_solo()
            ref, ours = twin_layers(mode, 7, 128, dtype=torch.float64)
            assert_twins_agree(ref, ours, sequence_inputs("padded", 300, 1, 7, None, torch.float64))
        print("counts", _C._cpu_engine_stalls() - before[0], _C._cpu_engine_solo_runs() - before[1])
    """).split()
    assert out[-3] == "counts" and int(out[-2]) >= len(LAYER_MODES) and int(out[-1]) > 0, out


def test_one_thread_period_doubles_while_teams_keep_stalling():
    """Each stalled team (noted here through the testing hook, as a team that stalled notes itself
    when it ends) puts the teams of the next period on one thread and doubles the next period (50,
    100, 200, ... ms, at most 800); ending the period by hand sets it back to 50 ms, and so does a
    whole team that runs without stalling. Inference LSTM on 2 threads."""
    out = _run("""
        import time, torch, rnnfused
        from rnnfused import _C
        torch.set_num_threads(2)
        _C._set_cpu_path("fused")
        _C._set_cpu_engine_min_flops(0)
        lstm = rnnfused.LSTM(7, 45).double().eval()
        x = torch.randn(8, 5, 7, dtype=torch.float64)
        _C._end_cpu_engine_solo()
        periods = [_C._cpu_engine_solo_period_ms()]
        for _ in range(6):
            _C._note_cpu_engine_team_stall()
            periods.append(_C._cpu_engine_solo_period_ms())
        solo = _C._cpu_engine_solo_runs()
        with torch.no_grad():
            lstm(x)  # within the period just noted: on one thread
        print("solo", _C._cpu_engine_solo_runs() - solo)
        _C._end_cpu_engine_solo()
        print("ended", _C._cpu_engine_solo_period_ms())
        _C._note_cpu_engine_team_stall()  # 50 ms on one thread, the next period 100 ms
        time.sleep(0.06)
        for _ in range(5):  # whole teams; one that stalls by chance (another process) doubles it again
            with torch.no_grad():
                lstm(x)
            if _C._cpu_engine_solo_period_ms() == 50:
                break
            time.sleep(_C._cpu_engine_solo_period_ms() / 2000 + 0.01)
        print("periods", *periods, "clean", _C._cpu_engine_solo_period_ms())
    """).split()
    assert out[-14:] == ["solo", "1", "ended", "50", "periods", "50", "100", "200", "400", "800", "800", "800",
                         "clean", "50"], out


# The per-step path under a late thread: every cell, forward and backward, float64, bidirectional,
# packed, on 2 threads; B * H large enough that every gate pass splits across both threads (the
# Elman RNN's grain is 8192 elements). Prints the increase of the stall and one-thread counters.
STEPS_SNIPPET = """
    import torch, rnnfused
    from rnnfused import _C
    from helpers import LAYER_MODES, assert_twins_agree, sequence_inputs, twin_layers
    torch.set_num_threads(2)
    _C._set_cpu_path("steps")
    _C._end_cpu_engine_solo()
    _C._set_cpu_engine_straggler_delay_us(DELAY_US)
    torch.use_deterministic_algorithms(DETERMINISTIC)
    counters = ["_cpu_engine_stalls", "_cpu_engine_solo_runs"]
    before = [getattr(_C, name)() for name in counters]
    for mode in LAYER_MODES:
        _C._end_cpu_engine_solo()  # each cell's calls start on both threads
        extra = {"proj_size": PROJ} if mode == "lstm" and PROJ else {}
        ref, ours = twin_layers(mode, 5, 259, dtype=torch.float64, bidirectional=True, **extra)
        assert_twins_agree(ref, ours, sequence_inputs("packed_unsorted", 4, 67, 5, None, torch.float64))
    print("counts", *[getattr(_C, name)() - b for name, b in zip(counters, before)])
"""


@pytest.mark.parametrize("proj", [0, 131])
def test_stalled_per_step_pass_puts_the_call_on_one_thread(proj):
    """The per-step path (one GEMM and one gate pass per step, each a parallel region): a thread
    other than the calling one sleeps 3 ms in each gate pass, as a thread whose core another
    process took. The call notes the stall, runs the rest of its steps (and its GEMMs) on the
    calling thread, and starts a one-thread period as a stalled team does; the numbers are still
    torch.nn's, for every cell, with and without the LSTM's projection. Without the delay nothing
    stalls and nothing runs on one thread (one stray stall is allowed: another process, or a new
    thread sharing its creator's core until the scheduler moves it);
    under torch.use_deterministic_algorithms(True) the loops keep their threads despite the delay
    (on one thread their GEMMs may round differently)."""
    def counts(delay_us, deterministic=False):
        head = f"DELAY_US = {delay_us}\nPROJ = {proj}\nDETERMINISTIC = {deterministic}\n"
        out = _run(head + textwrap.dedent(STEPS_SNIPPET)).split()
        assert out[-3] == "counts", out
        return int(out[-2]), int(out[-1])

    stalls, solo = counts(3000)
    assert stalls >= len(LAYER_MODES) and solo >= len(LAYER_MODES)
    assert counts(0)[0] <= 1
    assert counts(3000, deterministic=True) == (0, 0)


def test_one_thread_period_puts_per_step_calls_on_one_thread():
    """Within a one-thread period (a stall noted by hand here, as a stalled team notes it) a call of
    the per-step path runs on its calling thread alone, training forward and backward included,
    and so do the layer's input projection and its backward (each of the four counted once), with
    torch.nn's numbers; once the period is ended, calls use both threads again."""
    out = _run("""
        import torch, rnnfused
        from rnnfused import _C
        from helpers import assert_twins_agree, sequence_inputs, twin_layers
        torch.set_num_threads(2)
        _C._set_cpu_path("steps")
        ref, ours = twin_layers("gru", 5, 64, dtype=torch.float64)
        inputs = sequence_inputs("padded", 6, 67, 5, None, torch.float64)
        _C._end_cpu_engine_solo()
        _C._note_cpu_engine_team_stall()  # 50 ms on one thread
        solo = _C._cpu_engine_solo_runs()
        assert_twins_agree(ref, ours, inputs)  # ours: the projection and the op, forward and backward
        print("solo", _C._cpu_engine_solo_runs() - solo)
        _C._end_cpu_engine_solo()
        solo = _C._cpu_engine_solo_runs()
        assert_twins_agree(ref, ours, inputs)
        print("after_end", _C._cpu_engine_solo_runs() - solo)
    """).split()
    assert out[-4:] == ["solo", "4", "after_end", "0"], out


def test_one_thread_period_scope_for_the_gemms_outside_the_ops():
    """rnnfused's layers run their input projection (and its backward) inside _C._CpuOneThreadPeriod:
    within a one-thread period the block runs on one thread (torch.get_num_threads() is 1 inside,
    the caller's count again after it); outside a period, and under
    torch.use_deterministic_algorithms(True), nothing changes (_cpu_one_thread_period_applies says
    which). A layer trained within a period (its projection then through _ProjectionIntoCache,
    whatever its size) gives torch.nn's numbers."""
    out = _run("""
        import torch, rnnfused
        from rnnfused import _C
        from helpers import assert_twins_agree, sequence_inputs, twin_layers
        torch.set_num_threads(2)
        def inside():
            applies = _C._cpu_one_thread_period_applies()
            with _C._CpuOneThreadPeriod() as applied:
                threads = torch.get_num_threads()
            return applies, applied, threads, torch.get_num_threads()
        _C._end_cpu_engine_solo()
        print("outside", *inside())
        _C._note_cpu_engine_team_stall()
        print("period", *inside())
        torch.use_deterministic_algorithms(True)
        print("deterministic", *inside())
        torch.use_deterministic_algorithms(False)
        ref, ours = twin_layers("rnn_relu", 5, 64, dtype=torch.float64)
        _C._note_cpu_engine_team_stall()
        assert_twins_agree(ref, ours, sequence_inputs("padded", 6, 3, 5, None, torch.float64))
        print("ok")
    """).split()
    assert out[-16:] == ["outside", "False", "False", "2", "2", "period", "True", "True", "1", "2",
                         "deterministic", "False", "False", "2", "2", "ok"], out
