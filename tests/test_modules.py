"""Module behaviours that PyTorch's own RNN tests ask of torch.nn's classes, and edge cases."""
import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_sequence, pad_sequence

import rnnfused
from helpers import (
    CELL_MODES,
    LAYER_MODES,
    assert_close_lists,
    assert_twins_agree,
    forward_backward,
    sequence_inputs,
    twin_layers,
)

F64 = torch.float64


def _layer_classes(mode):
    return LAYER_MODES[mode]


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_same_seed_gives_torch_nn_initial_weights(mode):
    ref_cls, our_cls, extra = _layer_classes(mode)
    kwargs = dict(num_layers=2, bidirectional=True, **extra)
    if mode == "lstm":
        kwargs["proj_size"] = 3
    torch.manual_seed(42)
    ref = ref_cls(5, 7, **kwargs)
    torch.manual_seed(42)
    ours = our_cls(5, 7, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", list(CELL_MODES))
def test_cells_same_seed_and_state_dict(mode):
    ref_cls, our_cls, extra = CELL_MODES[mode]
    torch.manual_seed(3)
    ref = ref_cls(5, 7, **extra)
    torch.manual_seed(3)
    ours = our_cls(5, 7, **extra)
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours) == repr(ref)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_state_dict_both_ways_all_weights_repr(mode):
    ref_cls, our_cls, extra = _layer_classes(mode)
    kwargs = dict(num_layers=3, bidirectional=True, bias=False, batch_first=True, dropout=0.25, **extra)
    if mode == "lstm":
        kwargs["proj_size"] = 2
    ref, ours = ref_cls(4, 6, **kwargs), our_cls(4, 6, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours) == repr(ref)
    assert [[p.shape for p in layer] for layer in ours.all_weights] == [
        [p.shape for p in layer] for layer in ref.all_weights
    ]
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in ref.named_parameters()]
    assert isinstance(ours, nn.RNNBase)
    ours.flatten_parameters()  # a no-op on the CPU, as in torch.nn


def test_positional_constructor_arguments():
    ref = nn.RNN(4, 6, 2, "relu", False, True, 0.0, True)
    ours = rnnfused.RNN(4, 6, 2, "relu", False, True, 0.0, True)
    assert repr(ours) == repr(ref)
    assert ours.nonlinearity == "relu" and ours.mode == "RNN_RELU"
    ref = nn.LSTM(4, 6, 2, True, True, 0.0, True, 3)
    ours = rnnfused.LSTM(4, 6, 2, True, True, 0.0, True, 3)
    assert repr(ours) == repr(ref)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_meta_device_construction_and_forward(mode):
    _, our_cls, extra = _layer_classes(mode)
    ours = our_cls(4, 6, num_layers=2, bidirectional=True, device="meta", **extra)
    assert all(p.is_meta for p in ours.parameters())
    out, state = ours(torch.randn(5, 3, 4, device="meta"))
    assert out.is_meta and out.shape == (5, 3, 12)
    states = state if isinstance(state, tuple) else (state,)
    assert all(s.shape == (4, 3, 6) for s in states)
    ours.to_empty(device="cpu")
    assert not any(p.is_meta for p in ours.parameters())


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_save_and_load_whole_module(mode):
    _, ours = twin_layers(mode, 4, 6, num_layers=2)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(ours)
    x = torch.randn(5, 3, 4, dtype=F64)
    assert_close_lists(list(loaded(x)[0:1]), list(ours(x)[0:1]), "output", rtol=0, atol=0)
    clone = copy.deepcopy(ours)
    assert torch.equal(clone(x)[0], ours(x)[0])


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("which", ["old", "parametrizations"])
def test_weight_norm_on_recurrent_weight(mode, which):
    ref, ours = twin_layers(mode, 4, 6)
    if which == "old":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for m in (ref, ours):
                nn.utils.weight_norm(m, "weight_hh_l0")
    else:
        for m in (ref, ours):
            nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    make = sequence_inputs("padded", 5, 3, 4, None, F64)
    assert_twins_agree(ref, ours, make)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_tied_parameters(mode):
    ref, ours = twin_layers(mode, 6, 6, num_layers=2)
    for m in (ref, ours):
        m.weight_hh_l1 = m.weight_hh_l0
        m.weight_ih_l1 = m.weight_ih_l0
    assert len(list(ours.parameters())) == len(list(ref.parameters()))
    make = sequence_inputs("padded", 5, 3, 6, None, F64)
    assert_twins_agree(ref, ours, make)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_non_contiguous_input_and_hx_contiguous_results(mode):
    ref, ours = twin_layers(mode, 4, 6, num_layers=2, bidirectional=True)

    def make():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 4, dtype=F64, generator=generator).transpose(0, 1).requires_grad_()  # strided [T, B, I]
        leaves = [x]
        states = []
        for width in (6, 6) if mode == "lstm" else (6,):
            h = torch.randn(3, 4, width, dtype=F64, generator=generator).transpose(0, 1).requires_grad_()
            states.append(h)
        leaves += states
        assert not x.is_contiguous() and not states[0].is_contiguous()
        return leaves, (x, tuple(states) if mode == "lstm" else states[0])

    assert_twins_agree(ref, ours, make)
    leaves, args = make()
    out, state = ours(*args)
    states = state if isinstance(state, tuple) else (state,)
    assert out.is_contiguous() and all(s.is_contiguous() for s in states)
    (out.sum() + sum(s.sum() for s in states)).backward()
    assert all(leaf.grad.is_contiguous() or leaf.grad.transpose(0, 1).is_contiguous() for leaf in leaves)
    assert all(p.grad.is_contiguous() for p in ours.parameters())


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_batch_first_output_matches_values_and_is_contiguous(mode):
    ref, ours = twin_layers(mode, 4, 6, batch_first=True)
    x = torch.randn(3, 5, 4, dtype=F64)
    out, _ = ours(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref(x)[0])


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("batch_first", [False, True])
def test_batch_of_size_zero(mode, batch_first):
    ref, ours = twin_layers(mode, 4, 6, num_layers=2, batch_first=batch_first)
    x = torch.randn(0, 5, 4, dtype=F64) if batch_first else torch.randn(5, 0, 4, dtype=F64)
    x.requires_grad_()
    ref_out, ref_state = ref(x)
    out, state = ours(x)
    assert out.shape == ref_out.shape
    states = state if isinstance(state, tuple) else (state,)
    ref_states = ref_state if isinstance(ref_state, tuple) else (ref_state,)
    assert [s.shape for s in states] == [s.shape for s in ref_states]
    (out.sum() + sum(s.sum() for s in states)).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in ours.parameters())


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_dropout_matches_torch_nn_with_same_seed(mode):
    ref, ours = twin_layers(mode, 4, 6, num_layers=3, dropout=0.4)
    ref.train(), ours.train()
    x = torch.randn(5, 3, 4, dtype=F64)
    torch.manual_seed(11)
    ref_out = ref(x)[0]
    torch.manual_seed(11)
    our_out = ours(x)[0]
    torch.testing.assert_close(our_out, ref_out, rtol=1e-9, atol=1e-11)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_dropout_attribute_changed_after_construction(mode):
    _, ours = twin_layers(mode, 4, 6, num_layers=2)
    x = torch.randn(5, 3, 4, dtype=F64)
    ours.train()
    before = ours(x)[0]
    assert torch.equal(ours(x)[0], before)  # no dropout: deterministic
    ours.dropout = 0.9
    torch.manual_seed(0)
    first = ours(x)[0]
    torch.manual_seed(1)
    second = ours(x)[0]
    assert not torch.equal(first, second)
    ours.eval()
    torch.testing.assert_close(ours(x)[0], before)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_repeated_backward_with_retain_graph(mode):
    _, ours = twin_layers(mode, 4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    out, _ = ours(x)
    loss = (out * out).sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in ours.parameters()]
    loss.backward()
    second = [x.grad] + [p.grad for p in ours.parameters()]
    assert_close_lists(second, [2 * g for g in first], "accumulated gradients", rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_batch_equals_each_sequence_alone(mode, bidirectional):
    _, ours = twin_layers(mode, 4, 6, num_layers=2, bidirectional=bidirectional)
    lengths = [4, 7, 1, 5]
    sequences = [torch.randn(n, 4, dtype=F64) for n in lengths]
    packed_out, packed_state = ours(pack_sequence(sequences, enforce_sorted=False))
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(packed_out)
    packed_states = packed_state if isinstance(packed_state, tuple) else (packed_state,)
    for b, sequence in enumerate(sequences):
        alone_out, alone_state = ours(sequence)  # unbatched
        alone_states = alone_state if isinstance(alone_state, tuple) else (alone_state,)
        torch.testing.assert_close(padded[: lengths[b], b], alone_out, rtol=1e-12, atol=1e-13)
        assert torch.count_nonzero(padded[lengths[b] :, b]) == 0
        for s_packed, s_alone in zip(packed_states, alone_states):
            torch.testing.assert_close(s_packed[:, b], s_alone, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize(
    "steps,batch,input_size,hidden",
    [(1, 3, 4, 5), (6, 1, 4, 5), (6, 3, 4, 1), (6, 3, 1, 5), (1, 1, 1, 1)],
    ids=["T1", "B1", "H1", "I1", "all1"],
)
def test_edge_shapes(mode, steps, batch, input_size, hidden):
    ref, ours = twin_layers(mode, input_size, hidden, num_layers=2, bidirectional=True)
    shapes = [(4, batch, hidden)] * (2 if mode == "lstm" else 1)
    for form in ("padded", "packed_sorted", "unbatched"):
        make = sequence_inputs(form, steps, batch, input_size, shapes, F64)
        assert_twins_agree(ref, ours, make)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_long_sequence(mode):
    """T = 2000 forward and backward, float64 against torch.nn."""
    ref, ours = twin_layers(mode, 3, 8)
    if mode == "rnn_relu":  # keep a 2000-step ReLU recurrence from growing without bound
        with torch.no_grad():
            for m in (ref, ours):
                m.weight_hh_l0.mul_(0.5)
    make = sequence_inputs("packed_unsorted", 2000, 3, 3, None, F64)
    assert_twins_agree(ref, ours, make)


def test_project_lstm_uses_projection_size_for_hidden():
    ref, ours = twin_layers("lstm", 4, 6, proj_size=2, num_layers=2, bidirectional=True)
    out, (h, c) = ours(torch.randn(5, 3, 4, dtype=F64))
    assert out.shape == (5, 3, 4) and h.shape == (4, 3, 2) and c.shape == (4, 3, 6)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_no_grad_inference_matches_training_forward(mode):
    ref, ours = twin_layers(mode, 4, 6, num_layers=2)
    x = torch.randn(5, 3, 4, dtype=F64)
    with torch.no_grad():
        inference = ours(x)[0]
    torch.testing.assert_close(inference, ref(x)[0], rtol=1e-12, atol=1e-13)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x)[0], inference, rtol=0, atol=0)


def test_forward_runs_no_aten_rnn_kernel():
    """Forward and backward of every module run through rnnfused's ops, never torch.nn's or
    ATen's RNN kernels (checked on the profiler's list of executed ops)."""
    forbidden = ("aten::lstm", "aten::gru", "aten::rnn_tanh", "aten::rnn_relu", "_thnn_fused", "mkldnn_rnn",
                 "_cell")
    modules = [twin_layers(mode, 4, 6, num_layers=2, bidirectional=True)[1] for mode in LAYER_MODES]
    modules += [CELL_MODES[mode][1](4, 6, dtype=F64, **CELL_MODES[mode][2]) for mode in CELL_MODES]
    for module in modules:
        x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True) if isinstance(module, nn.RNNBase) else (
            torch.randn(3, 4, dtype=F64, requires_grad=True)
        )
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = module(x)
            outputs = [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]
            if isinstance(module, nn.RNNBase):
                outputs = [result[0]]
            sum(o.sum() for o in outputs).backward()
        names = {event.name for event in prof.events()}
        assert any(name.startswith("rnnfused::") for name in names), names
        assert not [n for n in names if any(f in n for f in forbidden)], names


def _run_in_subprocess(code, **env):
    full_env = dict(os.environ, **env)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                            text=True, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


PARITY_SNIPPET = """
    import torch, rnnfused
    from helpers import LAYER_MODES, assert_twins_agree, sequence_inputs, twin_layers
    print(rnnfused.build_info()["cpu_isa"])
    for dtype in (torch.float64, torch.float32):
        for mode in LAYER_MODES:
            ref, ours = twin_layers(mode, 20, 37, dtype=dtype, num_layers=2, bidirectional=True)
            for form in ("padded", "packed_unsorted"):
                assert_twins_agree(ref, ours, sequence_inputs(form, 9, 11, 20, None, dtype), dtype=dtype)
"""


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_each_cpu_instruction_set(isa):
    """The vectorized gate kernels exist per instruction set; each one is checked for parity
    (hidden sizes that are not a multiple of the vector width, both dtypes)."""
    best = rnnfused.build_info()["cpu_isa"]
    if isa != "default" and (best == "default" or (isa == "avx512" and best != "avx512")):
        pytest.skip(f"this CPU or build has no {isa} kernels")
    assert _run_in_subprocess(PARITY_SNIPPET, RNNFUSED_CPU_ISA=isa).split()[0] == isa


def test_aten_gemm_path():
    """The per-step GEMM has two routes (BLAS directly, or ATen's mm); both are parity-checked."""
    from rnnfused import _C

    previous = _C.cpu_blas()
    try:
        _C._set_cpu_blas("aten")
        assert _C.cpu_blas() == "aten"
        for mode in LAYER_MODES:
            ref, ours = twin_layers(mode, 5, 7, num_layers=2, bidirectional=True)
            assert_twins_agree(ref, ours, sequence_inputs("packed_unsorted", 6, 4, 5, None, F64))
    finally:
        _C._set_cpu_blas(previous)


def test_gradients_flow_to_every_leaf():
    _, ours = twin_layers("lstm", 4, 6, proj_size=3, num_layers=2, bidirectional=True)
    outputs, grads = forward_backward(ours, sequence_inputs("padded", 5, 3, 4, [(4, 3, 3), (4, 3, 6)], F64))
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_pad_sequence_roundtrip_shapes():
    _, ours = twin_layers("gru", 4, 6, batch_first=True)
    sequences = [torch.randn(n, 4, dtype=F64) for n in (3, 5)]
    out, h = ours(pad_sequence(sequences, batch_first=True))
    assert out.shape == (2, 5, 6) and h.shape == (1, 2, 6)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_eval_mode_keeps_no_workspace_and_backward_still_works(mode):
    """In eval mode the forward op keeps no workspace (inference stores nothing extra); a
    backward through it recomputes the forward pass and gives torch.nn's gradients."""
    ref, ours = twin_layers(mode, 4, 6, num_layers=2, bidirectional=True)
    ref.eval(), ours.eval()
    assert_twins_agree(ref, ours, sequence_inputs("packed_unsorted", 5, 3, 4, None, F64))
    program = torch.export.export(ours, (torch.randn(5, 3, 4, dtype=F64),))
    calls = [n for n in program.graph.nodes if n.op == "call_function" and "recurrence" in str(n.target)]
    assert calls
    if mode in ("lstm", "gru"):
        assert all(n.args[-1] is False for n in calls), [n.args for n in calls]


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cells_accept_a_zero_hidden_size(name, batched, with_hx, bias):
    """As torch.nn's cells do: the state is [B, 0], and every gradient matches torch.nn's (zeros of
    the input's and weights' shapes)."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(5, 0, bias=bias, dtype=torch.float64)
    ours = getattr(rnnfused, name)(5, 0, bias=bias, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    shape = (3, 5) if batched else (5,)
    results = []
    for module in (ref, ours):
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        state_shape = (3, 0) if batched else (0,)
        hx = None
        if with_hx:
            hx = torch.zeros(state_shape, dtype=torch.float64, requires_grad=True)
            hx = (hx, hx.clone()) if name == "LSTMCell" else hx
        out = module(x, hx)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.sum() for o in outs) + x.sum() * 0
        grads = torch.autograd.grad(loss, [x] + list(module.parameters()), allow_unused=True)
        results.append(([o.shape for o in outs], grads))
    (ref_shapes, ref_grads), (our_shapes, our_grads) = results
    assert our_shapes == ref_shapes
    for ours_grad, ref_grad in zip(our_grads, ref_grads):
        if ref_grad is None:
            assert ours_grad is None or not ours_grad.any()
        else:
            torch.testing.assert_close(ours_grad, ref_grad)


@pytest.fixture
def projection_buffer_for_every_size(monkeypatch):
    """Makes every CPU projection eligible for the kept per-thread buffer (by default only those
    of 32 MiB and more, which no test shape reaches), starting from no buffer. The small batches of
    these tests would run as the inference op, which projects inside the engine and needs no
    buffer (tests/test_inference_op.py): here they take the GEMM, as larger batches do."""
    import rnnfused.functional as rf

    monkeypatch.setattr(rf, "_REUSED_PROJECTION_MIN_BYTES", 0)
    monkeypatch.setattr(rf, "_infers_from_input", lambda *args: False)
    monkeypatch.setattr(rf, "_projection_buffers", __import__("threading").local())
    return rf


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_inference_projection_into_kept_buffer_matches_fresh(projection_buffer_for_every_size, mode):
    """Inference writes x W_ih^T into a buffer the thread keeps (no page faults of a fresh
    multi-megabyte tensor per call): the same results as a fresh tensor, bit for bit, through
    layers and directions that reuse the buffer one after the other."""
    rf = projection_buffer_for_every_size
    ref, ours = twin_layers(mode, 4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4, dtype=F64)
    with torch.no_grad():
        expected = ref(x)
        first = ours(x)
        buffer = rf._projection_buffers.buffer
        second = ours(x)
    assert rf._projection_buffers.buffer is buffer and buffer.dtype == F64
    leaves = torch.utils._pytree.tree_leaves
    for a, b in zip(leaves(first), leaves(expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    for a, b in zip(leaves(first), leaves(second), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # a float32 call gets a buffer of its own dtype
        ours.float()(x.float())
    assert rf._projection_buffers.buffer.dtype == torch.float32


def test_projection_buffer_made_under_inference_mode_serves_no_grad(projection_buffer_for_every_size):
    """A buffer first made inside torch.inference_mode is still written by calls outside it
    (an inference tensor would refuse the in-place write), and the other way round."""
    rf = projection_buffer_for_every_size
    ours = rnnfused.GRU(4, 6)
    x = torch.randn(5, 3, 4)
    with torch.inference_mode():
        first = ours(x)[0]
    assert not rf._projection_buffers.buffer.is_inference()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], first, rtol=0, atol=0)
    rf._projection_buffers.buffer = None
    with torch.no_grad():
        ours(x)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x)[0], first, rtol=0, atol=0)


def test_projection_buffer_only_where_nothing_keeps_the_projection(projection_buffer_for_every_size):
    """A recorded op may save its projection (a backward in eval mode recomputes the forward from
    it), and traced programs must not capture a buffer: those take a fresh tensor."""
    rf = projection_buffer_for_every_size
    x = torch.randn(6, 4)
    w = torch.randn(8, 4, requires_grad=True)
    assert not rf._reusable_projection(x, w, None)  # autograd records
    with torch.no_grad():
        assert rf._reusable_projection(x, w, None)
        assert not rf._reusable_projection(x.view(2, 3, 4), w, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not rf._reusable_projection(x, w, None)
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            assert not rf._reusable_projection(mode.from_tensor(x), mode.from_tensor(w), None)
    assert rf._reusable_projection(x, w.detach(), None)
    gru = rnnfused.GRU(4, 6)
    with torch.no_grad():  # torch.func.vmap: wrapped tensors, no batching rule for out=
        batched = torch.func.vmap(lambda xs: gru(xs)[0])(torch.randn(2, 5, 3, 4))
    assert batched.shape == (2, 5, 3, 6) and getattr(rf._projection_buffers, "buffer", None) is None
    ours = rnnfused.LSTM(4, 6).eval()
    ours(torch.randn(5, 3, 4)).__getitem__(0).sum().backward()  # eval mode, recorded: no buffer
    assert getattr(rf._projection_buffers, "buffer", None) is None
    with torch.no_grad():
        program = torch.export.export(ours, (torch.randn(5, 3, 4),))
    assert getattr(rf._projection_buffers, "buffer", None) is None
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x)[0], ours(x)[0], rtol=0, atol=0)
