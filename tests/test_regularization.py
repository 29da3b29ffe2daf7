"""Recurrent dropout, DropConnect and zoneout (README "Regularization beyond torch.nn"): the fused
ops against a plain PyTorch loop over the steps written here, the modules' and cells' draws, eval
mode, defaults, gradcheck, opcheck, torch.compile / torch.export, the CUDA time loops on the
simulator, and the errors."""
import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfused
import rnnfused.functional as rf

from helpers import LAYER_MODES

MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


# ------------------------------------------------------------------------------------------------
# The reference: one layer and direction, step by step, in plain PyTorch (never shipped).
# ------------------------------------------------------------------------------------------------


def dropout_mask(shape, p, dtype):
    """The modules' documented draw: u = torch.rand(shape, float32); 1 / (1 - p) where u >= p."""
    return (torch.rand(shape, dtype=torch.float32) >= p).to(dtype) * (1.0 / (1.0 - p))


def zoneout_draws(shape, p, dtype):
    """The modules' documented draw: u = torch.rand(shape, float32); keep (1) where u < p."""
    return (torch.rand(shape, dtype=torch.float32) < p).to(dtype)


def reference_layer(mode, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None, reverse=False, mask=None, w_hr=None,
                    round_h=None, keep_h=None, keep_c=None):
    """x [T, B, I]; returns output [T, B, P] (zeros past each length), h_n, c_n. ``mask`` [B, P]
    multiplies h_{t-1} before the product with w_hh; ``lengths`` (descending) make a packed batch;
    ``round_h``: a dtype the input projection and h_t (every step) are rounded to, as in the fused
    layers' bfloat16 calls. ``keep_h`` [T, B, P] / ``keep_c`` [T, B, H] (or scalars): zoneout,
    s_t = k s_{t-1} + (1 - k) s~_t."""

    def keep_at(keep, t):
        return keep if keep.dim() == 0 else keep[t]

    steps, batch = x.shape[0], x.shape[1]
    lengths = lengths if lengths is not None else [steps] * batch
    h, c = h0, c0
    outputs = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        active = sum(1 for length in lengths if length > t)
        keep = torch.zeros(batch, 1, dtype=x.dtype)
        keep[:active] = 1
        h_in = h if mask is None else h * mask
        gates_x = F.linear(x[t], w_ih, b_ih)
        if round_h is not None:  # the fused layers project the input in the input's dtype
            gates_x = gates_x.to(round_h).to(gates_x.dtype)
        gates_h = F.linear(h_in, w_hh, b_hh)
        if mode == "lstm":
            i, f, g, o = (gates_x + gates_h).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_hr is not None:
                h_new = F.linear(h_new, w_hr)
            if keep_c is not None:
                c_new = keep_at(keep_c, t) * c + (1 - keep_at(keep_c, t)) * c_new
            c = keep * c_new + (1 - keep) * c
        elif mode == "gru":
            x_r, x_z, x_n = gates_x.chunk(3, 1)
            h_r, h_z, h_n = gates_h.chunk(3, 1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h_new = (1 - z) * n + z * h
        else:
            pre = gates_x + gates_h
            h_new = torch.tanh(pre) if mode == "rnn_tanh" else torch.relu(pre)
        if keep_h is not None:
            h_new = keep_at(keep_h, t) * h + (1 - keep_at(keep_h, t)) * h_new
        if round_h is not None:
            h_new = h_new.to(round_h).to(h_new.dtype)
        h = keep * h_new + (1 - keep) * h
        outputs[t] = h * keep
    return torch.stack(outputs), h, c


def make_layer_args(mode, steps, batch, input_size, hidden, dtype, proj=0, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = proj or hidden

    def rand(*shape):
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype).requires_grad_()

    G = GATES[mode]
    args = dict(
        x=rand(steps, batch, input_size), w_ih=rand(G * hidden, input_size), w_hh=rand(G * hidden, P),
        b_ih=rand(G * hidden) if bias else None, b_hh=rand(G * hidden) if bias else None, h0=rand(batch, P),
    )
    if mode == "lstm":
        args["c0"] = rand(batch, hidden)
        args["w_hr"] = rand(P, hidden) if proj else None
    mask = (torch.rand(batch, P, generator=g, dtype=torch.float64) > 0.4).to(dtype) / 0.6
    return args, mask.to(dtype)


def run_fused(mode, args, lengths, reverse, mask, keep_h=None, keep_c=None):
    """The fused op through rnnfused.functional: output [T, B, P] (zeros past each length), h_n, c_n.
    keep_h / keep_c: zoneout keep weights in the packed row layout [N, width], or scalars."""
    x = args["x"]
    steps, batch = x.shape[0], x.shape[1]
    if lengths is not None:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=True)
        rows, batch_sizes = packed.data, packed.batch_sizes
    else:
        rows, batch_sizes = x.reshape(steps * batch, -1), None
    common = (args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"])
    c_n = None
    if mode == "lstm":
        out, h_n, c_n = rf.lstm_layer(rows, *common, args["w_hr"], args["h0"], args["c0"], batch_sizes, reverse,
                                      recurrent_mask=mask, zoneout=keep_h, cell_zoneout=keep_c)
    elif mode == "gru":
        out, h_n = rf.gru_layer(rows, *common, args["h0"], batch_sizes, reverse, recurrent_mask=mask, zoneout=keep_h)
    else:
        layer = rf.rnn_tanh_layer if mode == "rnn_tanh" else rf.rnn_relu_layer
        out, h_n = layer(rows, *common, args["h0"], batch_sizes, reverse, recurrent_mask=mask, zoneout=keep_h)
    if lengths is not None:
        from torch.nn.utils.rnn import PackedSequence

        out, _ = pad_packed_sequence(PackedSequence(out, batch_sizes), total_length=steps)
    else:
        out = out.view(steps, batch, -1)
    return out, h_n, c_n


def outputs_and_grads(run, args):
    out, h_n, c_n = run()
    results = [out, h_n] + ([c_n] if c_n is not None else [])
    g = torch.Generator().manual_seed(7)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.dtype).to(r.device)).sum()
               for r in results)
    leaves = [v for v in args.values() if v is not None]
    grads = torch.autograd.grad(loss, leaves)
    return [r.detach() for r in results], list(grads)


def check_against_reference(mode, batch, hidden, lengths, reverse, proj, context, which="", kind="draws",
                            device="cpu"):
    """The fused op (run inside ``context``, on ``device``) with a recurrent mask and the zoneout of
    ``which`` ('h', 'c'): forward and every gradient equal the step loop's (on the CPU), float64."""
    steps = 6
    args, mask = make_layer_args(mode, steps, batch, 4, hidden, torch.float64, proj=proj)
    rows = sum(lengths) if lengths else steps * batch
    keep_h = make_keep(kind, rows, proj or hidden, torch.float64, 1) if "h" in which else None
    keep_c = make_keep(kind, rows, hidden, torch.float64, 2) if "c" in which else None

    def on_device(t):
        return None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)

    placed = {k: on_device(v) for k, v in args.items()}
    with context:
        ours = outputs_and_grads(lambda: run_fused(mode, placed, lengths, reverse, on_device(mask), on_device(keep_h),
                                                   on_device(keep_c)), placed)
    ref = outputs_and_grads(lambda: reference_layer(
        mode, **args, lengths=lengths, reverse=reverse, mask=mask,
        keep_h=None if keep_h is None else packed_rows_to_steps(keep_h, lengths, steps, batch),
        keep_c=None if keep_c is None else packed_rows_to_steps(keep_c, lengths, steps, batch)), args)
    for a, b in zip(ours[0] + ours[1], ref[0] + ref[1]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)



@contextlib.contextmanager
def cpu_path(path):
    """Runs the block on one of the CPU time loops (RNNFUSED_CPU_PATH's values)."""
    previous = rnnfused._C.cpu_path()
    rnnfused._C._set_cpu_path(path)
    try:
        yield
    finally:
        rnnfused._C._set_cpu_path(previous)


LAYER_CASES = [
    # mode, batch, hidden, lengths, reverse, proj
    (mode, batch, hidden, lengths, reverse, proj)
    for mode in MODES
    for (batch, hidden, lengths) in [(1, 5, None), (5, 21, None), (5, 13, [6, 6, 4, 2, 1]), (17, 37, None)]
    for reverse in (False, True)
    for proj in ((0, 3) if mode == "lstm" else (0,))
]


@pytest.mark.parametrize("mode,batch,hidden,lengths,reverse,proj", LAYER_CASES)
@pytest.mark.parametrize("path", ["auto", "steps"])
def test_recurrent_mask_matches_reference_float64(mode, batch, hidden, lengths, reverse, proj, path):
    """Forward and every gradient of the fused op with a recurrent mask equal the step loop's."""
    check_against_reference(mode, batch, hidden, lengths, reverse, proj, cpu_path(path))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recurrent_mask_matches_reference_low_precision(mode, dtype):
    """float32 / bfloat16 calls against the loop on the same values, in float64 (the bfloat16 call
    computes in float32 and rounds h_t every step: so does the loop, in float32)."""
    args, mask = make_layer_args(mode, 7, 9, 6, 24, dtype)
    ours = outputs_and_grads(lambda: run_fused(mode, args, None, False, mask), args)
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    round_h = None if dtype == torch.float32 else dtype
    args64 = {k: (v.detach().to(wide).requires_grad_() if v is not None else None) for k, v in args.items()}
    ref = outputs_and_grads(lambda: reference_layer(mode, **args64, mask=mask.to(wide), round_h=round_h), args64)
    for a, b in zip(ours[0] + ours[1], ref[0] + ref[1]):
        scale = b.abs().max().item()
        tol = dict(rtol=2e-4, atol=2e-5 * scale) if dtype == torch.float32 else dict(rtol=0.05, atol=0.02 * scale)
        torch.testing.assert_close(a.double(), b.double(), **tol)


def test_mask_of_ones_is_the_plain_op():
    """A mask of ones gives exactly what the op gives without a mask (the per-step path)."""
    for mode in MODES:
        args, _ = make_layer_args(mode, 5, 3, 4, 8, torch.float64)
        ones = torch.ones_like(args["h0"]).detach()
        with cpu_path("steps"):
            a = outputs_and_grads(lambda: run_fused(mode, args, None, False, ones), args)
            b = outputs_and_grads(lambda: run_fused(mode, args, None, False, None), args)
        for x, y in zip(a[0] + a[1], b[0] + b[1]):
            assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------
# gradcheck, second derivatives, opcheck
# ------------------------------------------------------------------------------------------------


def _op_call(mode, with_mask=True, packed=False):
    g = torch.Generator().manual_seed(3)
    G, H, B, T = GATES[mode], 3, 3, 3
    batch_sizes = torch.tensor([3, 2, 1]) if packed else None
    rows = 6 if packed else T * B

    def rand(*shape):
        return torch.rand(shape, generator=g, dtype=torch.float64).mul(2).sub(1).requires_grad_()

    gates_x, w_hh, b_hh, h0 = rand(rows, G * H), rand(G * H, H), rand(G * H), rand(B, H)
    mask = ((torch.rand(B, H, generator=g, dtype=torch.float64) > 0.3).double() / 0.7) if with_mask else None
    op = getattr(torch.ops.rnnfused, f"{mode}_recurrence")
    if mode == "lstm":
        c0 = rand(B, H)
        return op, (gates_x, w_hh, b_hh, None, h0, c0, batch_sizes, False, True, mask)
    if mode == "gru":
        return op, (gates_x, w_hh, b_hh, h0, batch_sizes, True, True, mask)
    return op, (gates_x, w_hh, b_hh, h0, batch_sizes, False, mask)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_and_gradgradcheck_with_mask(mode, packed):
    assert_gradcheck_and_gradgradcheck(mode, *_op_call(mode, packed=packed))


def assert_gradcheck_and_gradgradcheck(mode, op, args):
    """gradcheck and gradgradcheck of a forward op with respect to every input that requires grad,
    through its output, h_n (and c_n)."""
    tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*tensors):
        full = list(args)
        for i, t in zip(tensor_at, tensors):
            full[i] = t
        result = op(*full)
        return result[:3] if mode == "lstm" else result[:2]  # output, h_n[, c_n]: not the workspace

    inputs = tuple(args[i] for i in tensor_at)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_with_mask(mode):
    op, args = _op_call(mode)
    torch.library.opcheck(op.default, args)
    # and the backward op, with the forward's saved tensors
    result = op(*args)
    out = result[0].detach()
    if mode == "lstm":
        gates_x, w_hh, b_hh, w_hr, h0, c0, bs, rev, _, mask = args
        backward = (torch.randn_like(out), None, None, w_hh.detach(), None, h0.detach(), c0.detach(), out,
                    result[3].detach(), bs, rev, mask)
    elif mode == "gru":
        gates_x, w_hh, b_hh, h0, bs, rev, _, mask = args
        backward = (torch.randn_like(out), None, w_hh.detach(), h0.detach(), out, result[2].detach(), bs, rev, mask)
    else:
        gates_x, w_hh, b_hh, h0, bs, rev, mask = args
        backward = (torch.randn_like(out), None, w_hh.detach(), h0.detach(), out, bs, rev, mask)
    torch.library.opcheck(getattr(torch.ops.rnnfused, f"{mode}_recurrence_backward").default, backward)


def test_mask_shape_and_dtype_errors():
    op, args = _op_call("gru")
    bad = list(args)
    bad[-1] = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="recurrent_mask"):
        op(*bad)
    bad[-1] = torch.ones(3, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="recurrent_mask has dtype Float"):
        op(*bad)


# ------------------------------------------------------------------------------------------------
# The modules: draws, eval mode, defaults, options
# ------------------------------------------------------------------------------------------------


def reference_module(module, x, hx=None, lengths=None):
    """A module's training-mode forward, re-done with the step loop and the documented draws:
    per layer, for each direction in order, DropConnect of W_hh then the recurrent mask; then
    inter-layer dropout (torch.nn's)."""
    mode = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[module.mode]
    D = 2 if module.bidirectional else 1
    steps, batch = x.shape[0], x.shape[1]
    P = module.proj_size or module.hidden_size
    if hx is None:
        h0 = x.new_zeros(module.num_layers * D, batch, P)
        c0 = x.new_zeros(module.num_layers * D, batch, module.hidden_size)
    else:
        h0, c0 = hx if mode == "lstm" else (hx, None)
    layer_input = x
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        draws = []
        for d in range(D):
            index = layer * D + d
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            w_hh = getattr(module, "weight_hh" + suffix)
            if module.dropconnect:
                w_hh = w_hh * dropout_mask(w_hh.shape, module.dropconnect, w_hh.dtype)
            mask = None
            if module.recurrent_dropout:
                mask = dropout_mask(h0[index].shape, module.recurrent_dropout, x.dtype)
            draws.append((suffix, w_hh, mask))
        outs = []
        for d, (suffix, w_hh, mask) in enumerate(draws):
            index = layer * D + d
            p = lambda name: getattr(module, name + suffix, None)  # noqa: E731
            out, h, c = reference_layer(
                mode, layer_input, p("weight_ih"), w_hh, p("bias_ih"), p("bias_hh"), h0[index],
                c0[index] if mode == "lstm" else None, lengths, d == 1, mask, p("weight_hr"),
            )
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outs, 2)
        if module.dropout and layer < module.num_layers - 1:
            if lengths is None:
                layer_input = F.dropout(layer_input, module.dropout, True)
            else:  # drawn over the packed rows, as the module's layers see them
                packed = pack_padded_sequence(layer_input, torch.tensor(lengths))
                dropped = packed._replace(data=F.dropout(packed.data, module.dropout, True))
                layer_input = pad_packed_sequence(dropped, total_length=steps)[0]
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if mode == "lstm" else None)


def make_module(mode, **kwargs):
    _, cls, extra = LAYER_MODES[mode]
    torch.manual_seed(0)
    return cls(4, 7, dtype=torch.float64, **extra, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", [dict(recurrent_dropout=0.3), dict(dropconnect=0.4),
                                     dict(recurrent_dropout=0.25, dropconnect=0.2, num_layers=2, dropout=0.3,
                                          bidirectional=True)])
@pytest.mark.parametrize("packed", [False, True])
def test_module_training_matches_reference_with_same_seed(mode, options, packed):
    module = make_module(mode, **options).train()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    lengths = [6, 5, 5, 3, 1] if packed else None
    torch.manual_seed(11)
    if packed:
        out, state = module(pack_padded_sequence(x, torch.tensor(lengths)))
        out = pad_packed_sequence(out, total_length=6)[0]
    else:
        out, state = module(x)
    torch.manual_seed(11)
    ref_out, ref_h, ref_c = reference_module(module, x, lengths=lengths)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[0] if mode == "lstm" else state, ref_h, rtol=1e-10, atol=1e-12)
    if mode == "lstm":
        torch.testing.assert_close(state[1], ref_c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_module_gradients_match_reference(mode):
    module = make_module(mode, recurrent_dropout=0.3, dropconnect=0.3, num_layers=2, bidirectional=True).train()
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [x] + list(module.parameters())
    torch.manual_seed(5)
    out = module(x)[0]
    ours = torch.autograd.grad((out * out.detach().sin()).sum(), params)
    torch.manual_seed(5)
    ref = reference_module(module, x)[0]
    theirs = torch.autograd.grad((ref * ref.detach().sin()).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_masks_and_new_masks_each_call(mode):
    module = make_module(mode, recurrent_dropout=0.5, dropconnect=0.5).train()
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    torch.manual_seed(1)
    a = module(x)[0]
    b = module(x)[0]
    torch.manual_seed(1)
    c = module(x)[0]
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_eval_mode_is_the_plain_module(mode):
    """In eval mode both options are the identity: bit for bit the module without them."""
    plain = make_module(mode).eval()
    regularized = make_module(mode, recurrent_dropout=0.5, dropconnect=0.5).eval()
    regularized.load_state_dict(plain.state_dict())
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    a, b = plain(x), regularized(x)
    assert torch.equal(a[0], b[0])
    assert torch.equal(regularized(x)[0], b[0])  # deterministic


@pytest.mark.parametrize("mode", MODES)
def test_defaults_off_are_bit_identical(mode):
    plain = make_module(mode).train()
    zero = make_module(mode, recurrent_dropout=0.0, dropconnect=0).train()
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    a, b = plain(x)[0], zero(x)[0]
    assert torch.equal(a, b)
    assert plain.state_dict().keys() == zero.state_dict().keys()
    ga = torch.autograd.grad(a.sum(), [x] + list(plain.parameters()))
    gb = torch.autograd.grad(b.sum(), [x] + list(zero.parameters()))
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_options_in_repr_and_state_dict():
    module = rnnfused.LSTM(3, 4, recurrent_dropout=0.25, dropconnect=0.5)
    assert "recurrent_dropout=0.25" in repr(module) and "dropconnect=0.5" in repr(module)
    assert "recurrent_dropout" not in repr(rnnfused.LSTM(3, 4))
    reference = nn.LSTM(3, 4)
    module.load_state_dict(reference.state_dict(), strict=True)
    assert module.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("value", [1, 1.0, -0.1, 2, "0.5", True, None])
@pytest.mark.parametrize("option", ["recurrent_dropout", "dropconnect"])
def test_bad_probabilities(option, value):
    for cls in (rnnfused.LSTM, rnnfused.GRU, rnnfused.RNN):
        with pytest.raises(ValueError, match=f"{option} must be a number in \\[0, 1\\)"):
            cls(3, 4, **{option: value})


@pytest.mark.parametrize("cls", [rnnfused.LSTMCell, rnnfused.GRUCell, rnnfused.RNNCell])
@pytest.mark.parametrize("option", ["recurrent_dropout", "dropconnect"])
def test_cells_refuse_sequence_options(cls, option):
    with pytest.raises(TypeError, match=f"does not take {option}"):
        cls(3, 4, **{option: 0.5})


def test_torchscript_refuses_options():
    with pytest.raises(RuntimeError, match="torch.jit.script does not support recurrent_dropout"):
        torch.jit.script(rnnfused.GRU(3, 4, recurrent_dropout=0.2))


def test_onnx_export_in_training_mode_refuses_options(tmp_path):
    pytest.importorskip("onnx")
    module = rnnfused.LSTM(3, 4, recurrent_dropout=0.2).train()
    x = (torch.randn(5, 2, 3),)
    # The exporter's default exports the eval-mode model, where the options are the identity.
    torch.onnx.export(module, x, str(tmp_path / "eval.onnx"), dynamo=False)
    with pytest.raises(RuntimeError, match="call module.eval"):
        torch.onnx.export(module, x, str(tmp_path / "m.onnx"), dynamo=False, training=torch.onnx.TrainingMode.TRAINING)


def _simulator():
    from rnnfused import _sim

    if not _sim.available():
        pytest.skip("the simulated CUDA build is not part of this install (RNNFUSED_BUILD_SIM=1)")
    return _sim


SIM_CASES = [
    (mode, batch, hidden, lengths, reverse, proj)
    for mode in MODES
    for (batch, hidden, lengths, reverse) in [(3, 5, None, False), (5, 7, [6, 6, 4, 2, 1], True)]
    for proj in ((0, 3) if mode == "lstm" else (0,))
]


@pytest.mark.parametrize("mode,batch,hidden,lengths,reverse,proj", SIM_CASES)
@pytest.mark.parametrize("cuda_path", ["standard", "auto"])
def test_cuda_kernels_on_the_simulator_match_reference(mode, batch, hidden, lengths, reverse, proj, cuda_path,
                                                        monkeypatch):
    """The CUDA time loops (run on the CUDA simulator) with a recurrent mask: forward and every
    gradient equal the step loop's. `auto` sends masked calls to the standard path."""
    sim = _simulator()
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", cuda_path)
    check_against_reference(mode, batch, hidden, lengths, reverse, proj, sim.simulated_cuda())


@pytest.mark.parametrize("mode", MODES)
def test_cuda_kernels_on_the_simulator_bfloat16_match_cpu(mode, monkeypatch):
    """bfloat16 with a mask: the CUDA loop (simulated) multiplies the masked h in float32 as the CPU
    loop does."""
    sim = _simulator()
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "standard")
    args, mask = make_layer_args(mode, 5, 3, 4, 8, torch.bfloat16)
    cpu = outputs_and_grads(lambda: run_fused(mode, args, None, False, mask), args)
    with sim.simulated_cuda():
        simulated = outputs_and_grads(lambda: run_fused(mode, args, None, False, mask), args)
    for a, b in zip(simulated[0] + simulated[1], cpu[0] + cpu[1]):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())


def test_forced_persistent_path_refuses_the_mask(monkeypatch):
    sim = _simulator()
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "persistent")
    _, args = _op_call("gru")
    with pytest.raises(RuntimeError, match="persistent kernels take neither a recurrent_mask nor zoneout"):
        sim.ops.gru_recurrence(*args)
    _, args = _zoneout_op_call("lstm", False, "weights")
    with pytest.raises(RuntimeError, match="persistent kernels take neither a recurrent_mask nor zoneout"):
        sim.ops.lstm_recurrence(*args)


# ------------------------------------------------------------------------------------------------
# Zoneout
# ------------------------------------------------------------------------------------------------


def packed_rows_to_steps(rows, lengths, steps, batch):
    """[N, width] in the packed row layout -> [T, B, width] (zeros where a sequence has ended)."""
    if rows.dim() == 0:
        return rows
    if lengths is None:
        return rows.view(steps, batch, -1)
    from torch.nn.utils.rnn import PackedSequence

    sizes = [sum(1 for length in lengths if length > t) for t in range(steps)]
    return pad_packed_sequence(PackedSequence(rows, torch.tensor(sizes)), total_length=steps)[0]


def make_keep(kind, rows, width, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "draws":
        return (torch.rand(rows, width, generator=g, dtype=torch.float64) < 0.4).to(dtype)
    if kind == "weights":
        return torch.rand(rows, width, generator=g, dtype=torch.float64).to(dtype)
    return torch.tensor(0.3, dtype=dtype)  # eval mode: the scalar p


ZONEOUT_CASES = [
    (mode, batch, hidden, lengths, reverse, proj, which, kind)
    for mode in MODES
    for (batch, hidden, lengths, reverse) in [(1, 5, None, False), (5, 13, [6, 6, 4, 2, 1], True),
                                              (17, 21, None, True)]
    for proj in ((0, 3) if mode == "lstm" else (0,))
    for which in (("h", "c", "hc") if mode == "lstm" else ("h",))
    for kind in ("draws", "weights", "scalar")
]


@pytest.mark.parametrize("mode,batch,hidden,lengths,reverse,proj,which,kind", ZONEOUT_CASES)
def test_zoneout_matches_reference_float64(mode, batch, hidden, lengths, reverse, proj, which, kind):
    check_against_reference(mode, batch, hidden, lengths, reverse, proj, contextlib.nullcontext(), which, kind)


@pytest.mark.parametrize("mode", MODES)
def test_zoneout_bfloat16_and_float32(mode):
    for dtype in (torch.float32, torch.bfloat16):
        args, mask = make_layer_args(mode, 7, 9, 6, 24, dtype)
        keep_h = make_keep("draws", 63, 24, dtype, 1)
        keep_c = make_keep("weights", 63, 24, dtype, 2) if mode == "lstm" else None
        ours = outputs_and_grads(lambda: run_fused(mode, args, None, False, mask, keep_h, keep_c), args)
        wide = torch.float64 if dtype == torch.float32 else torch.float32
        round_h = None if dtype == torch.float32 else dtype
        wide_args = {k: (v.detach().to(wide).requires_grad_() if v is not None else None) for k, v in args.items()}
        ref = outputs_and_grads(lambda: reference_layer(
            mode, **wide_args, mask=mask.to(wide), round_h=round_h, keep_h=keep_h.to(wide).view(7, 9, 24),
            keep_c=None if keep_c is None else keep_c.to(wide).view(7, 9, 24)), wide_args)
        for a, b in zip(ours[0] + ours[1], ref[0] + ref[1]):
            scale = b.abs().max().item()
            tol = dict(rtol=2e-4, atol=2e-5 * scale) if dtype == torch.float32 else dict(rtol=0.05, atol=0.02 * scale)
            torch.testing.assert_close(a.double(), b.double(), **tol)


def _zoneout_op_call(mode, packed, kind):
    op, args = _op_call(mode, packed=packed)
    rows = args[0].shape[0]
    keep_h = make_keep(kind, rows, 3, torch.float64, 4)
    if mode == "lstm":
        return op, args + (keep_h, make_keep(kind, rows, 3, torch.float64, 5))
    return op, args + (keep_h,)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["weights", "scalar"])
def test_zoneout_gradcheck_and_gradgradcheck(mode, packed, kind):
    assert_gradcheck_and_gradgradcheck(mode, *_zoneout_op_call(mode, packed, kind))


@pytest.mark.parametrize("mode", MODES)
def test_zoneout_opcheck(mode):
    op, args = _zoneout_op_call(mode, True, "weights")
    torch.library.opcheck(op.default, args)
    result = op(*args)
    out = result[0].detach()
    if mode == "lstm":
        gates_x, w_hh, b_hh, w_hr, h0, c0, bs, rev, _, mask, k_h, k_c = args
        backward = (torch.randn_like(out), None, torch.randn_like(c0), w_hh.detach(), None, h0.detach(), c0.detach(),
                    out, result[3].detach(), bs, rev, mask, k_h, k_c)
    elif mode == "gru":
        gates_x, w_hh, b_hh, h0, bs, rev, _, mask, k_h = args
        backward = (torch.randn_like(out), None, w_hh.detach(), h0.detach(), out, result[2].detach(), bs, rev, mask,
                    k_h)
    else:  # the Elman RNN's backward recomputes the candidates from gates_x and b_hh
        gates_x, w_hh, b_hh, h0, bs, rev, mask, k_h = args
        backward = (torch.randn_like(out), None, w_hh.detach(), h0.detach(), out, bs, rev, mask, k_h,
                    gates_x.detach(), b_hh.detach())
    torch.library.opcheck(getattr(torch.ops.rnnfused, f"{mode}_recurrence_backward").default, backward)


def test_zoneout_shape_errors():
    op, args = _zoneout_op_call("gru", False, "weights")
    bad = list(args)
    bad[-1] = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"zoneout must be \[9, 3\] or a scalar"):
        op(*bad)
    bad[-1] = torch.ones(9, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="zoneout has dtype Float"):
        op(*bad)


def reference_zoned_module(module, x, lengths=None):
    """The module's forward with zoneout (and the other options), re-done with the step loop and
    the documented draws per layer and direction: DropConnect, recurrent mask, zoneout of h, of c."""
    mode = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[module.mode]
    D = 2 if module.bidirectional else 1
    steps, batch = x.shape[0], x.shape[1]
    rows = sum(lengths) if lengths else steps * batch
    P = module.proj_size or module.hidden_size
    h0 = x.new_zeros(module.num_layers * D, batch, P)
    c0 = x.new_zeros(module.num_layers * D, batch, module.hidden_size)
    layer_input = x
    h_n, c_n = [], []

    def keep(p, width):
        if not p:
            return None
        if module.training:
            draws = zoneout_draws((rows, width), p, x.dtype)
            return packed_rows_to_steps(draws, lengths, steps, batch)
        return torch.tensor(p, dtype=x.dtype)

    for layer in range(module.num_layers):
        draws = []
        for d in range(D):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            w_hh = getattr(module, "weight_hh" + suffix)
            if module.training and module.dropconnect:
                w_hh = w_hh * dropout_mask(w_hh.shape, module.dropconnect, w_hh.dtype)
            mask = None
            if module.training and module.recurrent_dropout:
                mask = dropout_mask((batch, P), module.recurrent_dropout, x.dtype)
            k_h = keep(module.zoneout, P)
            k_c = keep(module.cell_zoneout, module.hidden_size) if mode == "lstm" else None
            draws.append((suffix, w_hh, mask, k_h, k_c))
        outs = []
        for d, (suffix, w_hh, mask, k_h, k_c) in enumerate(draws):
            index = layer * D + d
            p = lambda name: getattr(module, name + suffix, None)  # noqa: E731
            out, h, c = reference_layer(
                mode, layer_input, p("weight_ih"), w_hh, p("bias_ih"), p("bias_hh"), h0[index],
                c0[index] if mode == "lstm" else None, lengths, d == 1, mask, p("weight_hr"), keep_h=k_h, keep_c=k_c,
            )
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outs, 2)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if mode == "lstm" else None)


ZONEOUT_MODULES = [
    ("lstm", dict(zoneout=0.3)),
    ("lstm", dict(cell_zoneout=0.4)),
    ("lstm", dict(zoneout=0.2, cell_zoneout=0.5, recurrent_dropout=0.3, dropconnect=0.2, num_layers=2,
                  bidirectional=True)),
    ("lstm", dict(zoneout=0.25, proj_size=3)),
    ("gru", dict(zoneout=0.3)),
    ("gru", dict(zoneout=0.2, recurrent_dropout=0.3, num_layers=2, bidirectional=True)),
    ("rnn_tanh", dict(zoneout=0.3)),
    ("rnn_relu", dict(zoneout=0.2, recurrent_dropout=0.3, dropconnect=0.1, num_layers=2, bidirectional=True)),
]


@pytest.mark.parametrize("mode,options", ZONEOUT_MODULES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_zoneout_module_matches_reference(mode, options, packed, training):
    module = make_module(mode, **options).train(training)
    x = torch.randn(6, 5, 4, dtype=torch.float64, requires_grad=True)
    lengths = [6, 5, 5, 3, 1] if packed else None
    params = [x] + list(module.parameters())
    torch.manual_seed(21)
    if packed:
        out, state = module(pack_padded_sequence(x, torch.tensor(lengths)))
        out = pad_packed_sequence(out, total_length=6)[0]
    else:
        out, state = module(x)
    torch.manual_seed(21)
    ref_out, ref_h, ref_c = reference_zoned_module(module, x, lengths)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[0] if mode == "lstm" else state, ref_h, rtol=1e-10, atol=1e-12)
    ours = torch.autograd.grad((out * out.detach().cos()).sum(), params)
    theirs = torch.autograd.grad((ref_out * ref_out.detach().cos()).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_zoneout_eval_is_deterministic_and_the_expectation():
    module = make_module("lstm", zoneout=0.3, cell_zoneout=0.6).eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    a, b = module(x), module(x)
    assert torch.equal(a[0], b[0])
    plain = make_module("lstm").eval()
    assert not torch.allclose(a[0], plain(x)[0])  # the expectation is not the plain cell


@pytest.mark.parametrize("training", [True, False])
def test_zoneout_cells(training):
    """A cell's step: s' = k s + (1 - k) s~ with the plain cell's s~ (LSTM: from the candidate c~),
    k drawn per call in training ([B, H], h first, then c) and p in eval mode."""
    torch.manual_seed(0)
    lstm = rnnfused.LSTMCell(4, 6, zoneout=0.3, cell_zoneout=0.5, dtype=torch.float64).train(training)
    gru = rnnfused.GRUCell(4, 6, zoneout=0.4, dtype=torch.float64).train(training)
    rnn = rnnfused.RNNCell(4, 6, nonlinearity="relu", zoneout=0.2, dtype=torch.float64).train(training)
    plain_lstm = rnnfused.LSTMCell(4, 6, dtype=torch.float64)
    plain_gru = rnnfused.GRUCell(4, 6, dtype=torch.float64)
    plain_rnn = rnnfused.RNNCell(4, 6, nonlinearity="relu", dtype=torch.float64)
    plain_lstm.load_state_dict(lstm.state_dict())
    plain_gru.load_state_dict(gru.state_dict())
    plain_rnn.load_state_dict(rnn.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64)
    h, c = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)

    def keep(p):
        return zoneout_draws((3, 6), p, torch.float64) if training else p

    torch.manual_seed(9)
    h1, c1 = lstm(x, (h, c))
    g1 = gru(x, h)
    r1 = rnn(x, h)
    torch.manual_seed(9)
    k_h, k_c, k_g, k_r = keep(0.3), keep(0.5), keep(0.4), keep(0.2)
    h_t, c_t = plain_lstm(x, (h, c))
    torch.testing.assert_close(h1, k_h * h + (1 - k_h) * h_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c1, k_c * c + (1 - k_c) * c_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, k_g * h + (1 - k_g) * plain_gru(x, h), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r1, k_r * h + (1 - k_r) * plain_rnn(x, h), rtol=1e-12, atol=1e-12)
    assert "zoneout=0.3" in repr(lstm) and "cell_zoneout=0.5" in repr(lstm)


def test_zoneout_errors():
    with pytest.raises(ValueError, match="cell_zoneout applies to the LSTM"):
        rnnfused.GRU(3, 4, cell_zoneout=0.1)
    with pytest.raises(ValueError, match="zoneout must be a number in \\[0, 1\\)"):
        rnnfused.LSTM(3, 4, zoneout=1.0)
    with pytest.raises(RuntimeError, match="torch.jit.script does not support"):
        torch.jit.script(rnnfused.LSTMCell(3, 4, zoneout=0.2))


def test_zoneout_onnx_export_refused(tmp_path):
    pytest.importorskip("onnx")
    module = rnnfused.GRU(3, 4, zoneout=0.2).eval()
    with pytest.raises(RuntimeError, match="ONNX has no zoneout"):
        torch.onnx.export(module, (torch.randn(5, 2, 3),), str(tmp_path / "m.onnx"), dynamo=False)


SIM_ZONEOUT_CASES = [
    (mode, batch, hidden, lengths, reverse, proj, which, kind)
    for mode in MODES
    for (batch, hidden, lengths, reverse) in [(3, 5, None, False), (5, 7, [6, 6, 4, 2, 1], True)]
    for proj in ((0, 3) if mode == "lstm" else (0,))
    for which in (("hc", "c") if mode == "lstm" else ("h",))
    for kind in ("draws", "scalar")
]


@pytest.mark.parametrize("mode,batch,hidden,lengths,reverse,proj,which,kind", SIM_ZONEOUT_CASES)
def test_zoneout_cuda_kernels_on_the_simulator_match_reference(mode, batch, hidden, lengths, reverse, proj, which,
                                                                kind, monkeypatch):
    """The CUDA time loops (on the simulator, standard path) with zoneout and a recurrent mask:
    forward and every gradient equal the step loop's."""
    sim = _simulator()
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "auto")
    check_against_reference(mode, batch, hidden, lengths, reverse, proj, sim.simulated_cuda(), which, kind)


@pytest.mark.parametrize("mode", MODES)
def test_zoneout_cuda_kernels_on_the_simulator_bfloat16_match_cpu(mode, monkeypatch):
    sim = _simulator()
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "standard")
    args, mask = make_layer_args(mode, 5, 3, 4, 8, torch.bfloat16)
    keep_h = make_keep("draws", 15, 8, torch.bfloat16, 1)
    keep_c = make_keep("scalar", 15, 8, torch.bfloat16, 2) if mode == "lstm" else None
    for m in (None, mask):
        cpu = outputs_and_grads(lambda: run_fused(mode, args, None, False, m, keep_h, keep_c), args)
        with sim.simulated_cuda():
            simulated = outputs_and_grads(lambda: run_fused(mode, args, None, False, m, keep_h, keep_c), args)
        for a, b in zip(simulated[0] + simulated[1], cpu[0] + cpu[1]):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())


# ------------------------------------------------------------------------------------------------
# torch.compile and torch.export
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,options", [
    ("lstm", dict(recurrent_dropout=0.3, dropconnect=0.2)),
    ("gru", dict(recurrent_dropout=0.3, dropconnect=0.2)),
    ("lstm", dict(zoneout=0.3, cell_zoneout=0.2)),
    ("gru", dict(zoneout=0.3, recurrent_dropout=0.1)),
])
def test_compile_fullgraph_training_matches_eager(mode, options):
    """torch.compile(fullgraph=True) draws the same masks as eager from the same seed (the
    aot_eager backend keeps torch's RNG ops), with the same outputs and gradients."""
    module = make_module(mode, num_layers=2, **options).train()
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    eager_out = module(x)[0]
    eager_grad = torch.autograd.grad(eager_out.sum(), x)[0]
    torch.manual_seed(3)
    out = compiled(x)[0]
    grad = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(out, eager_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [dict(recurrent_dropout=0.3, dropconnect=0.2), dict(zoneout=0.3, cell_zoneout=0.1)])
def test_export_eval_and_train(options):
    module = make_module("lstm", **options).eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    exported = torch.export.export(module, (x,))
    torch.testing.assert_close(exported.module()(x)[0], module(x)[0])
    module.train()
    exported = torch.export.export(module, (x,))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert any("lstm_recurrence" in t for t in targets)
    assert exported.module()(x)[0].shape == (5, 3, 7)


# ------------------------------------------------------------------------------------------------
# The example and the benchmark's plumbing
# ------------------------------------------------------------------------------------------------


def test_regularization_example_quick_run(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plot = tmp_path / "loss.png"
    command = [sys.executable, os.path.join("examples", "regularization.py"), "--quick", "--device", "cpu",
               "--plot", str(plot)]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("plain", "recurrent_dropout=0.3", "zoneout=0.15", "dropconnect=0.5"):
        assert name in result.stdout
    assert "time per epoch relative to the plain LSTM" in result.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert plot.exists()


def test_regularization_benchmark_plumbing(tmp_path):
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
        sys.path.insert(0, root)
    from benchmarks import regularization

    rows = regularization.measure(["lstm", "gru", "rnn_tanh"], regularization.SHAPES["tiny"], ["fwd", "fwdbwd"], 0.01,
                                  1)
    options = {(r["cell"], r["option"]) for r in rows}
    assert ("lstm", "cell_zoneout") in options and ("gru", "zoneout") in options and ("rnn_tanh", "all") in options
    for r in rows:
        assert r["rnnfused_ms"] > 0 and r["loop_ms"] > 0
        if r["option"] == "plain":
            assert r["cost_vs_plain"] == 1.0
    table = regularization.markdown(rows)
    assert "| lstm | tiny | fwdbwd | all |" in table
    path = tmp_path / "rows.json"
    assert regularization.main(["--preset", "tiny", "--min-run-time", "0.01", "--rounds", "1", "--json",
                                str(path)]) == 0
    assert path.exists()


def test_convert_to_torch_nn_refuses_the_options():
    model = torch.nn.Sequential(rnnfused.GRU(3, 4), rnnfused.LSTM(4, 5, zoneout=0.1))
    with pytest.raises(ValueError, match=r"convert: 1 uses zoneout, which torch.nn's LSTM does not have"):
        rnnfused.convert(model, to="torch.nn")
    assert type(model[0]) is rnnfused.GRU  # nothing was converted
    model[1].zoneout = 0
    rnnfused.convert(model, to="torch.nn")
    assert type(model[0]) is torch.nn.GRU and type(model[1]) is torch.nn.LSTM
    rnnfused.convert(model)
    assert model[1].zoneout == 0 and "zoneout" not in repr(model[1])
