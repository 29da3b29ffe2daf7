"""The registered ops themselves: gradcheck (float64), torch.library.opcheck (schema, fake kernel,
autograd registration, AOT dispatch), torch.compile(fullgraph=True), and second derivatives
(gradgradcheck, the reference backward, a gradient penalty against torch.nn)."""
import itertools

import pytest
import torch

import rnnfused  # noqa: F401  (registers the ops)
from helpers import LAYER_MODES, twin_layers

ops = torch.ops.rnnfused
HIDDEN, PROJ = 3, 2
PACKED_BATCH_SIZES = [3, 3, 2, 1]  # N = 9 rows, batch 3
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _recurrence_args(mode, packed, reverse, bias, proj, requires_grad, dtype=torch.float64, seed=0):
    """Arguments of ``rnnfused::<mode>_recurrence`` (without ``training``) for a small problem."""
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape, scale=1.0):
        value = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
        return value.to(dtype).requires_grad_(requires_grad)

    if packed:
        batch_sizes = torch.tensor(PACKED_BATCH_SIZES, dtype=torch.int64)
        rows, batch = sum(PACKED_BATCH_SIZES), PACKED_BATCH_SIZES[0]
    else:
        batch_sizes, rows, batch = None, 4 * 2, 2
    gates = GATES[mode]
    width = proj if proj else HIDDEN
    gates_x = tensor(rows, gates * HIDDEN)
    w_hh = tensor(gates * HIDDEN, width, scale=0.5)
    b_hh = tensor(gates * HIDDEN) if bias else None
    h0 = tensor(batch, width)
    if mode == "lstm":
        w_hr = tensor(proj, HIDDEN) if proj else None
        c0 = tensor(batch, HIDDEN)
        return (gates_x, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse)
    return (gates_x, w_hh, b_hh, h0, batch_sizes, reverse)


def _op_cases():
    for mode in GATES:
        for packed, reverse, bias in itertools.product((False, True), repeat=3):
            for proj in (0, PROJ) if mode == "lstm" else (0,):
                name = f"{mode}-{'packed' if packed else 'padded'}-{'rev' if reverse else 'fwd'}-" + (
                    f"{'bias' if bias else 'nobias'}-P{proj}"
                )
                yield pytest.param(mode, packed, reverse, bias, proj, id=name)


def _opcheck_cases():
    """A smaller set for opcheck (each call traces the op several ways, which is slow): the
    plainest case and the most involved one of every op, plus the projection for the LSTM."""
    for mode in GATES:
        cases = [(False, False, True, 0), (True, True, False, 0)]
        if mode == "lstm":
            cases.append((True, True, True, PROJ))
        for packed, reverse, bias, proj in cases:
            name = f"{mode}-{'packed' if packed else 'padded'}-{'rev' if reverse else 'fwd'}-" + (
                f"{'bias' if bias else 'nobias'}-P{proj}"
            )
            yield pytest.param(mode, packed, reverse, bias, proj, id=name)


def _forward(mode, args, library=ops):
    """The op's differentiable outputs (the workspace is internal). ``library``: the op namespace
    (torch.ops.rnnfused, or rnnfused_sim for the CUDA path on the simulator)."""
    if mode == "lstm":
        return library.lstm_recurrence(*args, True)[:3]
    if mode == "gru":
        return library.gru_recurrence(*args, True)[:2]
    return getattr(library, f"{mode}_recurrence")(*args)


def _as_function(mode, args, library=ops):
    """The op as a function of its arguments that require grad, and those arguments."""
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*values):
        full = list(args)
        for i, v in zip(tensors, values):
            full[i] = v
        return _forward(mode, tuple(full), library)

    return fn, tuple(args[i] for i in tensors)


def assert_gradcheck(mode, args, library=ops):
    """torch.autograd.gradcheck of the op over every argument that requires grad."""
    fn, inputs = _as_function(mode, args, library)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def assert_gradgradcheck(mode, args, fast_mode):
    """torch.autograd.gradgradcheck of the op (fast mode: random directions)."""
    fn, inputs = _as_function(mode, args)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=fast_mode)


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_op_cases()))
def test_gradcheck(mode, packed, reverse, bias, proj):
    assert_gradcheck(mode, _recurrence_args(mode, packed, reverse, bias, proj, requires_grad=True))


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_opcheck_cases()))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(mode, packed, reverse, bias, proj, requires_grad):
    args = _recurrence_args(mode, packed, reverse, bias, proj, requires_grad, dtype=torch.float32)
    if mode in ("lstm", "gru"):
        for training in (False, True):
            torch.library.opcheck(getattr(ops, f"{mode}_recurrence").default, args + (training,))
    else:
        torch.library.opcheck(getattr(ops, f"{mode}_recurrence").default, args)


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_opcheck_cases()))
@pytest.mark.parametrize("with_grad_output,with_grad_state", [(True, True), (True, False), (False, True)])
def test_opcheck_backward(mode, packed, reverse, bias, proj, with_grad_output, with_grad_state):
    args = _recurrence_args(mode, packed, reverse, bias, proj, requires_grad=False, dtype=torch.float32)
    generator = torch.Generator().manual_seed(5)

    def grad_like(t, present):
        return torch.randn(t.shape, generator=generator, dtype=t.dtype) if present else None

    if mode == "lstm":
        gates_x, w_hh, b_hh, w_hr, h0, c0, batch_sizes, rev = args
        output, h_n, c_n, workspace = ops.lstm_recurrence(*args, True)
        backward_args = (
            grad_like(output, with_grad_output),
            grad_like(h_n, with_grad_state),
            grad_like(c_n, with_grad_state),
            w_hh, w_hr, h0, c0, output, workspace, batch_sizes, rev,
        )
    elif mode == "gru":
        gates_x, w_hh, b_hh, h0, batch_sizes, rev = args
        output, h_n, workspace = ops.gru_recurrence(*args, True)
        backward_args = (
            grad_like(output, with_grad_output), grad_like(h_n, with_grad_state),
            w_hh, h0, output, workspace, batch_sizes, rev,
        )
    else:
        gates_x, w_hh, b_hh, h0, batch_sizes, rev = args
        output, h_n = getattr(ops, f"{mode}_recurrence")(*args)
        backward_args = (
            grad_like(output, with_grad_output), grad_like(h_n, with_grad_state),
            w_hh, h0, output, batch_sizes, rev,
        )
    torch.library.opcheck(getattr(ops, f"{mode}_recurrence_backward").default, backward_args)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("packed", [False, True])
def test_torch_compile_fullgraph_forward_backward(mode, packed):
    torch._dynamo.reset()
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True)
    if mode == "lstm":
        kwargs["proj_size"] = 3
    _, ours = twin_layers(mode, 4, 6, dtype=torch.float32, **kwargs)
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.randn(3, 7, 4)

    def run(module):
        inp = x.clone().requires_grad_()
        arg = inp
        if packed:
            arg = torch.nn.utils.rnn.pack_padded_sequence(inp, torch.tensor([7, 4, 6]), True, enforce_sorted=False)
        out, state = module(arg)
        out = out.data if packed else out
        states = state if isinstance(state, tuple) else (state,)
        loss = (out * out).sum() + sum((s * s).sum() for s in states)
        grads = torch.autograd.grad(loss, [inp] + list(ours.parameters()))
        return [out.detach(), *[s.detach() for s in states], *grads]

    for got, expected in zip(run(compiled), run(ours)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_graph_calls_rnnfused_ops_only():
    """The compiled forward holds rnnfused's recurrence op and no ATen RNN kernel."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    backend = EagerAndRecordGraphs()
    _, ours = twin_layers("lstm", 4, 6, dtype=torch.float32)
    torch.compile(ours, backend=backend, fullgraph=True)(torch.randn(5, 2, 4))
    code = "\n".join(graph.code for graph in backend.graphs)
    assert "rnnfused.lstm_recurrence" in code
    for forbidden in ("aten.lstm", "torch.lstm", "_VF", "mkldnn_rnn", "lstm_cell"):
        assert forbidden not in code


# ----------------------------------------------------------------------------------------------
# Second derivatives (rnnfused/_reference_backward.py)
# ----------------------------------------------------------------------------------------------


def _backward_args(mode, args):
    """The forward op's results and the arguments of its backward op, with random gradients."""
    outputs = getattr(ops, f"{mode}_recurrence")(*args, *((True,) if mode in ("lstm", "gru") else ()))
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outputs[:3 if mode == "lstm" else 2]]
    return outputs, grads


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_op_cases()))
def test_reference_backward_equals_the_fused_backward(mode, packed, reverse, bias, proj):
    """The differentiable reference computes what the fused backward kernels compute."""
    from rnnfused import _reference_backward as reference

    args = _recurrence_args(mode, packed, reverse, bias, proj, requires_grad=False)
    outputs, grads = _backward_args(mode, args)
    if mode == "lstm":
        gates_x, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse = args
        out, _, _, ws = outputs
        fused = ops.lstm_recurrence_backward(*grads, w_hh, w_hr, h0, c0, out, ws, batch_sizes, reverse)
        ref = reference.lstm_backward(*grads, None, w_hh, w_hr, h0, c0, out, ws, batch_sizes, reverse)
    elif mode == "gru":
        gates_x, w_hh, b_hh, h0, batch_sizes, reverse = args
        out, _, ws = outputs
        fused = ops.gru_recurrence_backward(*grads, w_hh, h0, out, ws, batch_sizes, reverse)
        ref = reference.gru_backward(*grads, None, w_hh, h0, out, ws, batch_sizes, reverse)
    else:
        gates_x, w_hh, b_hh, h0, batch_sizes, reverse = args
        out, _ = outputs
        fused = getattr(ops, f"{mode}_recurrence_backward")(*grads, w_hh, h0, out, batch_sizes, reverse)
        ref = reference.rnn_backward(mode.split("_")[1], *grads, w_hh, h0, out, batch_sizes, reverse)
    for f, r in zip(fused, ref):
        torch.testing.assert_close(r, f, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,packed,reverse,bias,proj", list(_op_cases()))
def test_gradgradcheck(mode, packed, reverse, bias, proj):
    """Second derivatives of every op (fast mode: random directions; one case below in full)."""
    assert_gradgradcheck(mode, _recurrence_args(mode, packed, reverse, bias, proj, requires_grad=True), fast_mode=True)


@pytest.mark.parametrize("mode,proj", [("lstm", PROJ), ("gru", 0), ("rnn_tanh", 0)])
def test_gradgradcheck_full(mode, proj):
    assert_gradgradcheck(mode, _recurrence_args(mode, True, True, True, proj, requires_grad=True), fast_mode=False)


@pytest.mark.parametrize("mode", list(LAYER_MODES))
@pytest.mark.parametrize("packed", [False, True])
def test_gradient_penalty_matches_torch_nn(mode, packed):
    """A gradient penalty (the second derivative a WGAN-GP or a MAML step needs) through a
    two-layer bidirectional layer: the same parameter gradients as torch.nn's (float64, CPU)."""
    kwargs = dict(num_layers=2, bidirectional=True)
    if mode == "lstm":
        kwargs["proj_size"] = 3
    ref, ours = twin_layers(mode, 4, 5, **kwargs)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 4, dtype=torch.float64, generator=g)
    results = []
    for module in (ref, ours):
        inp = x.clone().requires_grad_()
        arg = torch.nn.utils.rnn.pack_padded_sequence(inp, [6, 4, 2]) if packed else inp
        out, state = module(arg)
        out = out.data if packed else out
        states = state if isinstance(state, tuple) else (state,)
        loss = (out * out).sum() + sum(s.sum() for s in states)
        params = list(module.parameters())
        first = torch.autograd.grad(loss, [inp] + params, create_graph=True)
        penalty = sum((f * f).sum() for f in first)
        results.append(torch.autograd.grad(penalty, [inp] + params))
    for r, o in zip(*results):
        torch.testing.assert_close(o, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", list(GATES))
def test_op_rejects_bad_arguments(mode):
    """The ops check their own arguments (shape, dtype, batch_sizes) with messages naming the op."""
    args = list(_recurrence_args(mode, True, False, True, 0, requires_grad=False))
    call = (lambda a: _forward(mode, tuple(a)))
    h0_index = 4 if mode == "lstm" else 3
    bad_h0 = list(args)
    bad_h0[h0_index] = args[h0_index][:, :-1]
    with pytest.raises(RuntimeError, match=f"rnnfused::{mode}_recurrence: h0"):
        call(bad_h0)
    bad_dtype = list(args)
    bad_dtype[h0_index] = args[h0_index].float()
    with pytest.raises(RuntimeError, match="dtype"):
        call(bad_dtype)
    growing = list(args)
    growing[-2] = torch.tensor([1, 3, 3, 2])
    with pytest.raises(RuntimeError, match="batch_sizes"):
        call(growing)
    wrong_rows = list(args)
    wrong_rows[-2] = torch.tensor([3, 3, 2, 2])
    with pytest.raises(RuntimeError, match="batch_sizes"):
        call(wrong_rows)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_gradient_penalty_matches_torch_nn(name):
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(4, 5, dtype=torch.float64)
    ours = getattr(rnnfused, name)(4, 5, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for module in (ref, ours):
        inp = x.clone().requires_grad_()
        out = module(inp)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o * o).sum() for o in outs)
        params = list(module.parameters())
        first = torch.autograd.grad(loss, [inp] + params, create_graph=True)
        results.append(torch.autograd.grad(sum((f * f).sum() for f in first), [inp] + params))
    for r, o in zip(*results):
        torch.testing.assert_close(o, r, rtol=1e-8, atol=1e-10)


def test_third_derivative_is_refused_clearly():
    _, ours = twin_layers("gru", 4, 5)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    out, _ = ours(x)
    (g1,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"derivatives of third or higher order through a recurrence are not "
                                           r"supported \(second derivatives are exact\)"):
        torch.autograd.grad(g1.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_first_derivatives_never_run_the_reference(mode, monkeypatch):
    """First-order training, eager and compiled, runs the fused backward only: the reference
    recurrence (second order) is never called."""
    from rnnfused import _reference_backward as reference

    calls = []
    original = getattr(reference, f"{mode}_backward")
    monkeypatch.setattr(reference, f"{mode}_backward", lambda *a: calls.append(1) or original(*a))
    _, ours = twin_layers(mode, 4, 6, dtype=torch.float32, num_layers=2)
    x = torch.randn(5, 2, 4, requires_grad=True)
    for module in (ours, torch.compile(ours, fullgraph=True)):
        out, _ = module(x)
        out.sum().backward()
    assert calls == []


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_maml_meta_gradient_matches_torch_nn(mode):
    """MAML: an inner SGD step through torch.func.functional_call with create_graph=True, then the
    meta-gradient through it (second derivatives), the same as torch.nn's."""
    from torch.func import functional_call

    ref, ours = twin_layers(mode, 4, 5)
    x = torch.randn(6, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for module in (ref, ours):
        params = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
        out, _ = functional_call(module, params, (x,))
        grads = torch.autograd.grad(out.pow(2).mean(), list(params.values()), create_graph=True)
        fast = {k: p - 0.1 * g for (k, p), g in zip(params.items(), grads)}
        out, _ = functional_call(module, fast, (x,))
        results.append(torch.autograd.grad(out.pow(2).mean(), list(params.values())))
    for r, o in zip(*results):
        torch.testing.assert_close(o, r, rtol=1e-8, atol=1e-10)
