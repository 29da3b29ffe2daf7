"""rnnfused.LayerNormLSTM and LayerNormGRU (README "Regularization beyond torch.nn"): the fused ops
and the modules against a plain PyTorch loop over the steps written here, with and without the
regularization options; gradcheck, gradgradcheck, opcheck; parameters, state_dict and init;
torch.compile / torch.export; eval mode, low precision, and the errors."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnfused
import rnnfused.functional as rf

from test_regularization import dropout_mask, packed_rows_to_steps, zoneout_draws

GATES = {"lstm": 4, "gru": 3}
CLASSES = {"lstm": rnnfused.LayerNormLSTM, "gru": rnnfused.LayerNormGRU}
EPS = 1e-5


# ------------------------------------------------------------------------------------------------
# The reference: one layer and direction, step by step, in plain PyTorch (never shipped).
# ------------------------------------------------------------------------------------------------


def reference_layer(mode, x, p, h0, c0=None, lengths=None, reverse=False, mask=None, keep_h=None, keep_c=None,
                    eps=EPS):
    """x [T, B, I]; p: w_ih, w_hh, b_ih, b_hh, ih_w, ih_b, hh_w, hh_b (, cell_w, cell_b, w_hr). Returns
    output [T, B, P] (zeros past each length), h_n, c_n. mask [B, P]: recurrent dropout; keep_h
    [T, B, P], keep_c [T, B, H] or scalars: zoneout."""

    def keep_at(keep, t):
        return keep if keep.dim() == 0 else keep[t]

    steps, batch = x.shape[0], x.shape[1]
    width = p["w_hh"].shape[0]
    hidden = width // GATES[mode]
    lengths = lengths if lengths is not None else [steps] * batch
    h, c = h0, c0
    outputs = [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        active = torch.tensor([[1.0] if length > t else [0.0] for length in lengths], dtype=x.dtype)
        gx = F.layer_norm(x[t] @ p["w_ih"].t(), (width,), p["ih_w"], p["ih_b"], eps)
        gh = F.layer_norm((h if mask is None else h * mask) @ p["w_hh"].t(), (width,), p["hh_w"], p["hh_b"], eps)
        if p["b_ih"] is not None:
            gx, gh = gx + p["b_ih"], gh + p["b_hh"]
        if mode == "lstm":
            i, f, g, o = (gx + gh).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(F.layer_norm(c_new, (hidden,), p["cell_w"], p["cell_b"], eps))
            if p.get("w_hr") is not None:
                h_new = h_new @ p["w_hr"].t()
            if keep_c is not None:
                c_new = keep_at(keep_c, t) * c + (1 - keep_at(keep_c, t)) * c_new
            c = active * c_new + (1 - active) * c
        else:
            x_r, x_z, x_n = gx.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h_new = (1 - z) * n + z * h
        if keep_h is not None:
            h_new = keep_at(keep_h, t) * h + (1 - keep_at(keep_h, t)) * h_new
        h = active * h_new + (1 - active) * h
        outputs[t] = h * active
    return torch.stack(outputs), h, c


def make_params(mode, input_size, hidden, dtype=torch.float64, bias=True, seed=0, proj=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale + shift).to(dtype).requires_grad_()

    G = GATES[mode] * hidden
    p = dict(w_ih=rand(G, input_size), w_hh=rand(G, proj or hidden), b_ih=rand(G) if bias else None,
             b_hh=rand(G) if bias else None, ih_w=rand(G, scale=0.5, shift=1.0), ih_b=rand(G, scale=0.3),
             hh_w=rand(G, scale=0.5, shift=1.0), hh_b=rand(G, scale=0.3))
    if mode == "lstm":
        p.update(cell_w=rand(hidden, scale=0.5, shift=1.0), cell_b=rand(hidden, scale=0.3))
        if proj:
            p.update(w_hr=rand(proj, hidden))
    return p


def run_fused_layer(mode, x, p, h0, c0, lengths, reverse, mask=None, keep_h=None, keep_c=None, training=True):
    """rnnfused.functional's layer: output [T, B, H] (zeros past each length), h_n, c_n. keep_h /
    keep_c in the packed row layout [N, H], or scalars."""
    steps, batch = x.shape[0], x.shape[1]
    if lengths is not None:
        packed = pack_padded_sequence(x, torch.tensor(lengths))
        rows, batch_sizes = packed.data, packed.batch_sizes
    else:
        rows, batch_sizes = x.reshape(steps * batch, -1), None
    common = (rows, p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], p["ih_w"], p["ih_b"], p["hh_w"], p["hh_b"])
    c_n = None
    if mode == "lstm":
        out, h_n, c_n = rf.layer_norm_lstm_layer(*common, p["cell_w"], p["cell_b"], h0, c0, batch_sizes, reverse,
                                                 training=training, recurrent_mask=mask, zoneout=keep_h,
                                                 cell_zoneout=keep_c, w_hr=p.get("w_hr"))
    else:
        out, h_n = rf.layer_norm_gru_layer(*common, h0, batch_sizes, reverse, training=training, recurrent_mask=mask,
                                           zoneout=keep_h)
    if lengths is not None:
        out = pad_packed_sequence(PackedSequence(out, batch_sizes), total_length=steps)[0]
    else:
        out = out.view(steps, batch, -1)
    return out, h_n, c_n


def steps_to_rows(keep, lengths, steps, batch):
    """[T, B, H] keep weights -> the packed row layout [N, H] (padded: t * B + b)."""
    if lengths is None:
        return keep.reshape(steps * batch, -1)
    return pack_padded_sequence(keep, torch.tensor(lengths)).data


def compare(mode, batch, hidden, lengths, reverse, options, dtype=torch.float64, rtol=1e-10, atol=1e-12,
            bias=True, training=True, context=None, proj=0):
    steps, input_size = 6, 5
    torch.manual_seed(3)
    p = make_params(mode, input_size, hidden, dtype, bias, proj=proj)
    width = proj or hidden
    x = torch.randn(steps, batch, input_size, dtype=dtype, requires_grad=True)
    h0 = torch.randn(batch, width, dtype=dtype, requires_grad=True)
    c0 = torch.randn(batch, hidden, dtype=dtype, requires_grad=True) if mode == "lstm" else None
    mask = dropout_mask((batch, width), 0.3, dtype) if "mask" in options else None
    keep_h = zoneout_draws((steps, batch, width), 0.4, dtype) if "zoneout" in options else None
    keep_c = zoneout_draws((steps, batch, hidden), 0.3, dtype) if "cell_zoneout" in options else None
    if "eval" in options:
        keep_h = torch.tensor(0.3, dtype=dtype) if "zoneout" in options else None
        keep_c = torch.tensor(0.2, dtype=dtype) if "cell_zoneout" in options else None

    def rows(keep):
        return keep if keep is None or keep.dim() == 0 else steps_to_rows(keep, lengths, steps, batch)

    with context() if context is not None else contextlib.nullcontext():
        out, h_n, c_n = run_fused_layer(mode, x, p, h0, c0, lengths, reverse, mask, rows(keep_h), rows(keep_c),
                                        training)
    ref_out, ref_h, ref_c = reference_layer(mode, x, p, h0, c0, lengths, reverse, mask, keep_h, keep_c)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(h_n, ref_h, rtol=rtol, atol=atol)
    if mode == "lstm":
        torch.testing.assert_close(c_n, ref_c, rtol=rtol, atol=atol)
    leaves = [x, h0] + ([c0] if c0 is not None else []) + [t for t in p.values() if t is not None]
    weights = torch.randn_like(out)

    def loss(o, h, c):
        total = (o * weights).sum() + (h * h).sum()
        return total + (c.sin().sum() if c is not None else 0)

    with context() if context is not None else contextlib.nullcontext():
        ours = torch.autograd.grad(loss(out, h_n, c_n), leaves)
    theirs = torch.autograd.grad(loss(ref_out, ref_h, ref_c), leaves)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10)


# ------------------------------------------------------------------------------------------------
# The ops through rnnfused.functional.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("batch,hidden", [(1, 3), (4, 7), (9, 16)])
@pytest.mark.parametrize("lengths", [None, "packed"])
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_matches_reference_float64(mode, batch, hidden, lengths, reverse):
    if lengths == "packed":
        lengths = sorted([6 - (i * 5) // max(batch, 1) for i in range(batch)], reverse=True)
    compare(mode, batch, hidden, lengths, reverse, ())


OPTION_CASES = [("lstm", ("mask",)), ("lstm", ("zoneout",)), ("lstm", ("cell_zoneout",)),
                ("lstm", ("mask", "zoneout", "cell_zoneout")), ("lstm", ("eval", "zoneout", "cell_zoneout")),
                ("gru", ("mask",)), ("gru", ("zoneout",)), ("gru", ("mask", "zoneout")), ("gru", ("eval", "zoneout"))]


@pytest.mark.parametrize("mode,options", OPTION_CASES)
@pytest.mark.parametrize("lengths", [None, [6, 4, 4, 1]])
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_with_options_matches_reference(mode, options, lengths, reverse):
    compare(mode, 4, 5, lengths, reverse, options)


@pytest.mark.parametrize("options", [(), ("mask", "zoneout", "cell_zoneout"), ("eval", "zoneout", "cell_zoneout")])
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([6, 4, 4, 1], True)])
def test_lstm_projection_matches_reference(options, lengths, reverse):
    """LayerNormLSTM with proj_size: h_t = W_hr h~_t (zoneout after the projection)."""
    compare("lstm", 4, 5, lengths, reverse, options, proj=3)
    compare("lstm", 3, 4, lengths and lengths[:3], reverse, options, proj=6, training=False)  # P > H, no workspace


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_layer_without_bias_and_without_workspace(mode):
    compare(mode, 3, 4, [6, 3, 2], True, ("zoneout",), bias=False)
    compare(mode, 3, 4, None, False, ("mask",), training=False)  # backward recomputes the forward


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_layer_float32(mode):
    compare(mode, 5, 12, [6, 5, 5, 2, 1], False, ("mask", "zoneout"), dtype=torch.float32, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_low_precision_follows_float32(mode, dtype):
    torch.manual_seed(0)
    p = make_params(mode, 5, 8, torch.float32)
    x = torch.randn(6, 3, 5)
    h0, c0 = torch.randn(3, 8), torch.randn(3, 8)
    low = {k: (v.detach().to(dtype) if v is not None else None) for k, v in p.items()}
    out, h_n, _ = run_fused_layer(mode, x.to(dtype), low, h0.to(dtype), c0.to(dtype), None, False)
    ref, _, _ = run_fused_layer(mode, x.to(dtype).float(), {k: (v.float() if v is not None else None)
                                                             for k, v in low.items()},
                                h0.to(dtype).float(), c0.to(dtype).float(), None, False)
    assert out.dtype == dtype and h_n.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def _op_args(mode, packed, options=(), proj=0):
    torch.manual_seed(1)
    H, B = 3, 3
    P = proj or H
    G = GATES[mode] * H
    batch_sizes = torch.tensor([3, 2, 2, 1]) if packed else None
    N = 8 if packed else 9

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    args = [rand(N, G), rand(G, P), rand(G), (1 + 0.3 * torch.randn(G, dtype=torch.float64)).requires_grad_(),
            rand(G)]
    if mode == "lstm":
        args += [(1 + 0.3 * torch.randn(H, dtype=torch.float64)).requires_grad_(), rand(H), rand(B, P), rand(B, H)]
    else:
        args += [rand(B, H)]
    args += [batch_sizes, True, True, EPS]
    mask = (torch.rand(B, P, dtype=torch.float64) > 0.3).double() / 0.7 if "mask" in options else None
    keep = (torch.rand(N, P, dtype=torch.float64) < 0.4).double() if "zoneout" in options else None
    args += [mask, keep]
    if mode == "lstm":
        args += [torch.tensor(0.3, dtype=torch.float64) if "zoneout" in options else None]
        if proj:
            args += [rand(P, H)]
    return args


OP = {"lstm": lambda: torch.ops.rnnfused.layer_norm_lstm_recurrence,
      "gru": lambda: torch.ops.rnnfused.layer_norm_gru_recurrence}


@pytest.mark.parametrize("mode,proj", [("lstm", 0), ("lstm", 2), ("gru", 0)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("options", [(), ("mask", "zoneout")])
def test_gradcheck_and_gradgradcheck(mode, proj, packed, options):
    args = _op_args(mode, packed, options, proj)
    op = OP[mode]()
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def fn(*values):
        call = list(args)
        for i, v in zip(tensors, values):
            call[i] = v
        outs = op(*call)
        return outs[:-1]  # the workspace is not differentiable

    inputs = [args[i] for i in tensors]
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_opcheck(mode):
    args = _op_args(mode, True, ("mask", "zoneout"))
    torch.library.opcheck(OP[mode](), args)
    args = _op_args(mode, False)
    torch.library.opcheck(OP[mode](), args)
    if mode == "lstm":
        torch.library.opcheck(OP[mode](), _op_args(mode, True, ("zoneout",), proj=2))


def test_workspace_is_not_differentiable():
    args = _op_args("gru", False)
    out, h_n, workspace = torch.ops.rnnfused.layer_norm_gru_recurrence(*args)
    assert out.requires_grad and not workspace.requires_grad


def test_op_errors():
    args = _op_args("lstm", False)
    bad = list(args)
    bad[3] = args[3].detach()[:-1]
    with pytest.raises(RuntimeError, match="hh_gain must have shape"):
        torch.ops.rnnfused.layer_norm_lstm_recurrence(*bad)
    bad = list(args)
    bad[5] = args[5].detach().float()
    with pytest.raises(RuntimeError, match="cell_gain has dtype Float but gates_x has dtype Double"):
        torch.ops.rnnfused.layer_norm_lstm_recurrence(*bad)
    bad = list(args)
    bad[12] = -1.0
    with pytest.raises(RuntimeError, match="eps must be non-negative"):
        torch.ops.rnnfused.layer_norm_lstm_recurrence(*bad)
    gargs = _op_args("gru", False)
    bad = list(gargs)
    bad[1], bad[5] = gargs[1].detach()[:, :2], gargs[5].detach()[:, :2]
    with pytest.raises(RuntimeError, match="without w_hr, w_hh must be \\[3 \\* hidden, hidden\\]"):
        torch.ops.rnnfused.layer_norm_gru_recurrence(*bad)
    pargs = _op_args("lstm", False, proj=2)
    bad = list(pargs)
    bad[16] = pargs[16].detach()[:, :2]
    with pytest.raises(RuntimeError, match="w_hr must have 3 columns"):
        torch.ops.rnnfused.layer_norm_lstm_recurrence(*bad)


# ------------------------------------------------------------------------------------------------
# The modules.
# ------------------------------------------------------------------------------------------------


def layer_parameters(module, layer, suffix):
    get = lambda name: getattr(module, f"{name}_l{layer}{suffix}", None)  # noqa: E731
    p = dict(w_ih=get("weight_ih"), w_hh=get("weight_hh"), b_ih=get("bias_ih"), b_hh=get("bias_hh"),
             ih_w=get("layer_norm_ih_weight"), ih_b=get("layer_norm_ih_bias"), hh_w=get("layer_norm_hh_weight"),
             hh_b=get("layer_norm_hh_bias"))
    if module.mode == "LSTM":
        p.update(cell_w=get("layer_norm_cell_weight"), cell_b=get("layer_norm_cell_bias"), w_hr=get("weight_hr"))
    return p


def reference_module(module, x, hx=None, lengths=None):
    """The module's forward re-done with the step loop, x [T, B, I] (batch_first handled by the
    caller), with the documented draws per layer and direction: DropConnect, recurrent mask,
    zoneout of h, of c."""
    mode = module.mode.lower()
    D = 2 if module.bidirectional else 1
    steps, batch = x.shape[0], x.shape[1]
    rows = sum(lengths) if lengths else steps * batch
    H = module.hidden_size
    P = getattr(module, "proj_size", 0) or H
    if hx is None:
        h0 = x.new_zeros(module.num_layers * D, batch, P)
        c0 = x.new_zeros(module.num_layers * D, batch, H)
    else:
        h0, c0 = hx if mode == "lstm" else (hx, None)

    def keep(p, width):
        if not p:
            return None
        if module.training:
            return packed_rows_to_steps(zoneout_draws((rows, width), p, x.dtype), lengths, steps, batch)
        return torch.tensor(p, dtype=x.dtype)

    layer_input = x
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        draws = []
        for d in range(D):
            suffix = "_reverse" if d else ""
            p = layer_parameters(module, layer, suffix)
            if module.training and module.dropconnect:
                p["w_hh"] = p["w_hh"] * dropout_mask(p["w_hh"].shape, module.dropconnect, x.dtype)
            mask = dropout_mask((batch, P), module.recurrent_dropout, x.dtype) if (
                module.training and module.recurrent_dropout) else None
            draws.append((p, mask, keep(module.zoneout, P), keep(module.cell_zoneout, H) if mode == "lstm" else None))
        outs = []
        for d, (p, mask, k_h, k_c) in enumerate(draws):
            index = layer * D + d
            out, h, c = reference_layer(mode, layer_input, p, h0[index], c0[index] if mode == "lstm" else None,
                                        lengths, d == 1, mask, k_h, k_c, module.layer_norm_eps)
            outs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outs, 2)
        if module.dropout and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, True)
    return layer_input, torch.stack(h_n), (torch.stack(c_n) if mode == "lstm" else None)


def randomize_layer_norm(module, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith("layer_norm_"):
                param.copy_(torch.rand(param.shape, generator=g, dtype=torch.float64) * 0.6
                            + (0.7 if "_weight_" in name else -0.3))


MODULE_CASES = [
    ("lstm", dict()),
    ("lstm", dict(num_layers=2, bidirectional=True)),
    ("lstm", dict(num_layers=2, bidirectional=True, recurrent_dropout=0.3, zoneout=0.2, cell_zoneout=0.1,
                  dropconnect=0.2)),
    ("lstm", dict(bias=False, zoneout=0.3)),
    ("lstm", dict(proj_size=3, num_layers=2, bidirectional=True, zoneout=0.2, cell_zoneout=0.1, recurrent_dropout=0.2)),
    ("gru", dict()),
    ("gru", dict(num_layers=2, bidirectional=True, recurrent_dropout=0.25, zoneout=0.3, dropconnect=0.1)),
    ("gru", dict(num_layers=3, layer_norm_eps=1e-3)),
]


@pytest.mark.parametrize("mode,options", MODULE_CASES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_module_matches_reference(mode, options, packed, training):
    torch.manual_seed(0)
    module = CLASSES[mode](4, 5, dtype=torch.float64, **options).train(training)
    randomize_layer_norm(module)
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
    ref_out, ref_h, ref_c = reference_module(module, x, lengths=lengths)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[0] if mode == "lstm" else state, ref_h, rtol=1e-10, atol=1e-12)
    if mode == "lstm":
        torch.testing.assert_close(state[1], ref_c, rtol=1e-10, atol=1e-12)
    ours = torch.autograd.grad((out * out.detach().cos()).sum(), params)
    theirs = torch.autograd.grad((ref_out * ref_out.detach().cos()).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_module_hx_batch_first_unbatched_and_inter_layer_dropout(mode):
    torch.manual_seed(0)
    module = CLASSES[mode](3, 4, num_layers=2, batch_first=True, dropout=0.3, dtype=torch.float64)
    randomize_layer_norm(module)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64)
    hx = (h0, torch.randn(2, 2, 4, dtype=torch.float64)) if mode == "lstm" else h0
    torch.manual_seed(4)
    out, state = module(x, hx)
    torch.manual_seed(4)
    ref_out, ref_h, _ = reference_module(module, x.transpose(0, 1), hx)
    torch.testing.assert_close(out, ref_out.transpose(0, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state[0] if mode == "lstm" else state, ref_h, rtol=1e-10, atol=1e-12)
    module.eval()
    single, _ = module(x[0], tuple(h[:, 0] for h in hx) if mode == "lstm" else h0[:, 0])
    batched, _ = module(x[:1], tuple(h[:, :1] for h in hx) if mode == "lstm" else h0[:, :1])
    torch.testing.assert_close(single, batched[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_parameters_state_dict_and_init(mode):
    torch.manual_seed(0)
    module = CLASSES[mode](3, 4, num_layers=2, bidirectional=True)
    G = GATES[mode] * 4
    names = dict(module.named_parameters())
    base = CLASSES[mode].__mro__[2](3, 4, num_layers=2, bidirectional=True)  # rnnfused.LSTM / GRU
    for name in dict(base.named_parameters()):
        assert name in names
    for layer in range(2):
        for suffix in ("", "_reverse"):
            for what in ("ih", "hh") + (("cell",) if mode == "lstm" else ()):
                weight = names[f"layer_norm_{what}_weight_l{layer}{suffix}"]
                bias = names[f"layer_norm_{what}_bias_l{layer}{suffix}"]
                assert weight.shape == bias.shape == ((4,) if what == "cell" else (G,))
                assert torch.equal(weight, torch.ones_like(weight)) and torch.equal(bias, torch.zeros_like(bias))
    extra = 2 * 2 * 2 * (3 if mode == "lstm" else 2)
    assert len(names) == len(dict(base.named_parameters())) + extra
    state = module.state_dict()
    other = CLASSES[mode](3, 4, num_layers=2, bidirectional=True)
    other.load_state_dict(state, strict=True)
    module.reset_parameters()
    assert torch.equal(module.layer_norm_hh_weight_l1_reverse, torch.ones(G))
    assert module.weight_hh_l0.abs().max() <= 0.5 + 1e-6  # torch.nn's uniform(-1/sqrt(H), 1/sqrt(H))
    assert f"{CLASSES[mode].__name__}(3, 4, num_layers=2, bidirectional=True)" == repr(module)
    assert "layer_norm_eps=0.001" in repr(CLASSES[mode](3, 4, layer_norm_eps=1e-3))


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_float32_module_and_optimizer_step(mode):
    torch.manual_seed(0)
    module = CLASSES[mode](8, 16, num_layers=2, recurrent_dropout=0.2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.randn(7, 4, 8)
    out, _ = module(x)
    out.pow(2).mean().backward()
    optimizer.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert module.layer_norm_ih_weight_l0.grad.abs().sum() > 0
    module.eval()
    with torch.no_grad():
        first, _ = module(x)
        second, _ = module(x)
    assert torch.equal(first, second)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_autocast_cpu(mode):
    torch.manual_seed(0)
    module = CLASSES[mode](8, 16)
    x = torch.randn(5, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = module(x)
    out.float().sum().backward()
    reference, _ = module(x)
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_compile_fullgraph_matches_eager(mode):
    torch.manual_seed(0)
    module = CLASSES[mode](4, 6, num_layers=2, zoneout=0.2, recurrent_dropout=0.2)
    x = torch.randn(5, 3, 4, requires_grad=True)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    out, _ = compiled(x)
    grads = torch.autograd.grad(out.sum(), [x] + list(module.parameters()))
    torch.manual_seed(1)
    ref, _ = module(x)
    ref_grads = torch.autograd.grad(ref.sum(), [x] + list(module.parameters()))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_export(mode):
    torch.manual_seed(0)
    module = CLASSES[mode](4, 6).eval()
    x = torch.randn(5, 3, 4)
    program = torch.export.export(module, (x,))
    torch.testing.assert_close(program.module()(x)[0], module(x)[0])


def test_errors():
    with pytest.raises(ValueError, match="layer_norm_eps must be a non-negative number"):
        rnnfused.LayerNormGRU(3, 4, layer_norm_eps=-1)
    with pytest.raises(ValueError, match="cell_zoneout applies to the LSTM"):
        rnnfused.LayerNormGRU(3, 4, cell_zoneout=0.1)
    with pytest.raises(ValueError, match="zoneout must be a number in"):
        rnnfused.LayerNormLSTM(3, 4, zoneout=1.0)
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script"):
        torch.jit.script(rnnfused.LayerNormLSTM(3, 4))
    module = rnnfused.LayerNormGRU(3, 4)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        module(torch.randn(5, 2, 7))


def test_onnx_export_refused(tmp_path):
    module = rnnfused.LayerNormLSTM(3, 4).eval()
    with pytest.raises(RuntimeError, match="cannot be exported to ONNX"):
        torch.onnx.export(module, (torch.randn(5, 2, 3),), str(tmp_path / "m.onnx"), dynamo=False)


def test_convert_leaves_layer_norm_modules_alone():
    model = torch.nn.Sequential(rnnfused.LayerNormLSTM(3, 4))
    with pytest.warns(UserWarning, match="left 0"):
        rnnfused.convert(model, to="torch.nn")
    assert type(model[0]) is rnnfused.LayerNormLSTM


def test_benchmark_layer_norm_rows_and_loop():
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
        sys.path.insert(0, root)
    from benchmarks import regularization

    # The benchmark's per-step loop computes the same LayerNorm cell (without options).
    for cell in ("lstm", "gru"):
        torch.manual_seed(0)
        module = CLASSES[cell](5, 6, dtype=torch.float64)
        randomize_layer_norm(module)
        x = torch.randn(4, 3, 5, dtype=torch.float64)
        torch.testing.assert_close(regularization.loop_layer(cell, module, x, {}, layer_norm=True), module(x)[0],
                                   rtol=1e-10, atol=1e-12)
    rows = regularization.measure(["lstm", "gru"], regularization.SHAPES["tiny"], ["fwdbwd"], 0.01, 1,
                                  options=["layer_norm"])
    assert {(r["cell"], r["option"]) for r in rows} == {(c, o) for c in ("lstm", "gru") for o in ("plain", "layer_norm")}
    assert all(r["rnnfused_ms"] > 0 and r["loop_ms"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        regularization.main(["--preset", "tiny", "--option", "batch_norm"])


# ------------------------------------------------------------------------------------------------
# The CUDA time loops and kernels, on the CUDA simulator (CPU tensors; the GPU tests are in
# tests/test_cuda.py).
# ------------------------------------------------------------------------------------------------


def _simulator():
    from rnnfused import _sim

    if not _sim.available():
        pytest.skip("the simulated CUDA build is not part of this install (RNNFUSED_BUILD_SIM=1)")
    return _sim


SIM_CASES = [("lstm", ()), ("lstm", ("mask", "zoneout", "cell_zoneout")), ("lstm", ("eval", "zoneout", "cell_zoneout")),
             ("gru", ()), ("gru", ("mask", "zoneout")), ("gru", ("eval", "zoneout"))]


@pytest.mark.parametrize("mode,options", SIM_CASES)
@pytest.mark.parametrize("lengths,reverse", [(None, False), ([6, 4, 4, 1], True)])
def test_cuda_kernels_on_the_simulator_match_reference(mode, options, lengths, reverse):
    """The CUDA forward and backward loops (a block per row, shared-memory reductions; bounds,
    barriers and races checked by the simulator) against the step loop in float64."""
    sim = _simulator()
    compare(mode, 4, 5, lengths, reverse, options, context=sim.simulated_cuda)


@pytest.mark.parametrize("options", [(), ("mask", "zoneout", "cell_zoneout"), ("eval", "zoneout")])
def test_cuda_kernels_on_the_simulator_projection(options):
    sim = _simulator()
    compare("lstm", 4, 5, [6, 4, 4, 1], True, options, context=sim.simulated_cuda, proj=3)
    compare("lstm", 3, 4, None, False, options, context=sim.simulated_cuda, proj=6, training=False)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_cuda_kernels_on_the_simulator_wide_rows_and_inference(mode):
    """More units than a block has threads (each thread then owns several), and a call that keeps
    no workspace (its backward recomputes the forward)."""
    sim = _simulator()
    compare(mode, 2, 300, [6, 3], False, ("zoneout",), context=sim.simulated_cuda)
    compare(mode, 3, 4, None, True, ("mask",), training=False, context=sim.simulated_cuda)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_cuda_kernels_on_the_simulator_bfloat16_match_cpu(mode):
    sim = _simulator()
    torch.manual_seed(0)
    p = {k: (v.detach().to(torch.bfloat16) if v is not None else None)
         for k, v in make_params(mode, 5, 8, torch.float32).items()}
    x = torch.randn(6, 3, 5).to(torch.bfloat16)
    h0, c0 = torch.randn(3, 8).to(torch.bfloat16), torch.randn(3, 8).to(torch.bfloat16)
    cpu = run_fused_layer(mode, x, p, h0, c0, [6, 5, 2], False)
    with sim.simulated_cuda():
        simulated = run_fused_layer(mode, x, p, h0, c0, [6, 5, 2], False)
    for a, b in zip(simulated, cpu):
        if b is not None:
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02)


def test_module_on_the_simulator():
    sim = _simulator()
    torch.manual_seed(0)
    module = rnnfused.LayerNormLSTM(4, 6, num_layers=2, bidirectional=True, zoneout=0.2, recurrent_dropout=0.2,
                                    dtype=torch.float64)
    randomize_layer_norm(module)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.manual_seed(2)
    out, (h_n, c_n) = module(x)
    with sim.simulated_cuda():
        torch.manual_seed(2)
        sim_out, (sim_h, sim_c) = module(x)
    for a, b in ((sim_out, out), (sim_h, h_n), (sim_c, c_n)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


ISA_SNIPPET = """
import torch, rnnfused
from test_layer_norm import compare
print(rnnfused.build_info()["cpu_isa"])
for threads in (1, 3):
    torch.set_num_threads(threads)
    for mode in ("lstm", "gru"):
        compare(mode, 7, 37, [6, 6, 5, 3, 3, 2, 1], True, ("mask", "zoneout"))
        compare(mode, 4, 21, None, False, ("eval", "zoneout"))
        compare(mode, 5, 37, [6, 5, 5, 2, 1], False, ("mask",), dtype=torch.float32, rtol=1e-4, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_each_cpu_instruction_set(isa):
    """The LayerNorm row kernels exist per instruction set; each one against the step loop (hidden
    sizes that are not a multiple of the vector width, partial vectors in the row sums, float64 and
    float32, one and three threads)."""
    import os
    import subprocess
    import sys

    best = rnnfused.build_info()["cpu_isa"]
    if isa != "default" and (best == "default" or (isa == "avx512" and best != "avx512")):
        pytest.skip(f"this CPU or build has no {isa} kernels")
    result = subprocess.run([sys.executable, "-c", ISA_SNIPPET], env=dict(os.environ, RNNFUSED_CPU_ISA=isa),
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [isa, "ok"]
