"""Shared machinery of the parity tests: twin modules with the same weights, runs of every input
form, and comparisons of outputs, final states and all gradients."""
import itertools

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfused

# mode -> (torch.nn class, rnnfused class, extra constructor arguments)
LAYER_MODES = {
    "lstm": (nn.LSTM, rnnfused.LSTM, {}),
    "gru": (nn.GRU, rnnfused.GRU, {}),
    "rnn_tanh": (nn.RNN, rnnfused.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, rnnfused.RNN, {"nonlinearity": "relu"}),
}
CELL_MODES = {
    "lstm": (nn.LSTMCell, rnnfused.LSTMCell, {}),
    "gru": (nn.GRUCell, rnnfused.GRUCell, {}),
    "rnn_tanh": (nn.RNNCell, rnnfused.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, rnnfused.RNNCell, {"nonlinearity": "relu"}),
}

# Tolerances: float64 must agree to rounding; float32 to the stated tolerance.
TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def twin_layers(mode, input_size, hidden_size, dtype=torch.float64, seed=0, device=None, **kwargs):
    """torch.nn's layer and rnnfused's, holding the same weights (loaded with strict=True).

    ``device``: where both layers end up. The weights are always drawn on the CPU from ``seed``
    and then moved, so twins made for different devices hold the same values."""
    ref_cls, our_cls, extra = LAYER_MODES[mode]
    torch.manual_seed(seed)
    ref = ref_cls(input_size, hidden_size, dtype=dtype, **extra, **kwargs)
    ours = our_cls(input_size, hidden_size, dtype=dtype, **extra, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    if device is not None:
        ref.to(device)
        ours.to(device)
    return ref, ours


def twin_cells(mode, input_size, hidden_size, dtype=torch.float64, seed=0, device=None, **kwargs):
    """As twin_layers, for the cells."""
    ref_cls, our_cls, extra = CELL_MODES[mode]
    torch.manual_seed(seed)
    ref = ref_cls(input_size, hidden_size, dtype=dtype, **extra, **kwargs)
    ours = our_cls(input_size, hidden_size, dtype=dtype, **extra, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    if device is not None:
        ref.to(device)
        ours.to(device)
    return ref, ours


def flatten(value):
    """Tensors of a (nested) module result, in order; PackedSequence gives its data."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return [value.data]
    return list(itertools.chain.from_iterable(flatten(v) for v in value))


def cotangents(tensors, seed=1234):
    """Fixed random weights for the loss, one per output (so every gradient is exercised). Drawn
    on the CPU, then placed on each output's device: the same values on every device."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
        for t in tensors
    ]


def forward_backward(module, make_inputs):
    """Runs ``module(*make_inputs())`` and returns (outputs, gradients of inputs and parameters)."""
    leaves, args = make_inputs()
    result = module(*args)
    outputs = flatten(result)
    loss = sum((o * w).sum() for o, w in zip(outputs, cotangents(outputs)))
    wrt = [t for t in leaves if t.requires_grad] + list(module.parameters())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [o.detach() for o in outputs], list(grads)


def assert_close_lists(actual, expected, what, **tolerance):
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors vs {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None or torch.count_nonzero(a) == 0, f"{what}[{index}]: expected no gradient"
            continue
        assert a is not None, f"{what}[{index}]: missing gradient"
        torch.testing.assert_close(a, e, msg=lambda m: f"{what}[{index}]: {m}", **tolerance)


def assert_twins_agree(ref, ours, make_inputs, dtype=torch.float64):
    tolerance = TOLERANCES[dtype]
    ref_out, ref_grads = forward_backward(ref, make_inputs)
    our_out, our_grads = forward_backward(ours, make_inputs)
    assert_close_lists(our_out, ref_out, "outputs", **tolerance)
    assert_close_lists(our_grads, ref_grads, "gradients", **tolerance)


def sequence_inputs(form, steps, batch, input_size, state_shapes, dtype, batch_first=False, seed=7,
                    lengths=None, device=None):
    """A factory of fresh leaf inputs for one input form.

    form: "padded", "unbatched", "packed_sorted" or "packed_unsorted"; state_shapes: None (no hx),
    or the shapes of h0 (and c0), given for the batched case ([L*D, B, P]). device: where the
    leaves live (default: the CPU); values are drawn on the CPU, so every device gets the same
    ones. Sequence lengths stay on the CPU, as pack_padded_sequence wants them.
    """

    def make():
        generator = torch.Generator().manual_seed(seed)

        def leaf(*shape):
            value = torch.randn(*shape, generator=generator, dtype=torch.float64)
            value = value.to(dtype) if device is None else value.to(device=device, dtype=dtype)
            return value.requires_grad_()

        leaves = []
        if form == "unbatched":
            x = leaf(steps, input_size)
        elif batch_first:
            x = leaf(batch, steps, input_size)
        else:
            x = leaf(steps, batch, input_size)
        leaves.append(x)
        hx = None
        if state_shapes is not None:
            shapes = [s[:1] + s[2:] if form == "unbatched" else s for s in state_shapes]
            states = [leaf(*s) for s in shapes]
            leaves += states
            hx = states[0] if len(states) == 1 else tuple(states)
        if form.startswith("packed"):
            if lengths is not None:
                seq_lengths = torch.tensor(lengths)
            elif form == "packed_sorted":
                seq_lengths = torch.linspace(steps, 1, batch).round().long()
            else:
                seq_lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
                seq_lengths[batch // 2] = steps  # the longest one in the middle: really unsorted
            packed = pack_padded_sequence(
                x, seq_lengths, batch_first=batch_first, enforce_sorted=(form == "packed_sorted")
            )
            return leaves, (packed, hx)
        return leaves, (x, hx)

    return make


# Two implementations of the same formulas in the same order (rnnfused's CUDA path, real or
# simulated, against its CPU path) differ only in the GEMMs' summation order and in exp/tanh, a few
# units in the last place per step. They are compared at a few units of the dtype's precision:
# relative to each value, and absolute relative to the tensor's largest value (a sum over many
# rows, such as dW_hh, can cancel down to a small element). bfloat16 / float16 round h to the dtype
# every step, where such a difference can move a value by one unit of the dtype.
ULPS = {torch.float32: 64, torch.bfloat16: 4, torch.float16: 4}


def assert_close_in_ulps(actual, expected, dtype, what, ulps=None):
    ulps = ULPS[dtype] if ulps is None else ulps
    eps = torch.finfo(dtype).eps
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors vs {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype, f"{what}[{index}] has dtype {a.dtype}"
        a, e = a.detach().double().cpu(), e.detach().double().cpu()
        scale = e.abs().max().item() if e.numel() else 0.0
        torch.testing.assert_close(a, e, rtol=ulps * eps, atol=ulps * eps * scale,
                                   msg=lambda m: f"{what}[{index}]: {m}")


def check_selftest_kernels(run, device="cpu"):
    """The correct forms of the self-test kernels (csrc/cuda/selftest_kernels.cuh) give the right
    numbers. ``run(name, input)`` runs one: on the simulator, or on a GPU (where this also proves
    that the simulator's warp shuffles, votes and mma fragments are the hardware's)."""

    def on(t):
        return t.to(device)

    x = torch.arange(64, dtype=torch.float32)
    torch.testing.assert_close(run("neighbour_exchange", on(x)).cpu(), torch.roll(x, -1))
    y = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run("scale", on(y)).cpu(), 2 * y)
    w = torch.arange(32, dtype=torch.float32)
    assert run("warp_sum", on(w)).item() == w.sum().item()
    halves = torch.cat([torch.roll(w[:16], -1), torch.roll(w[16:], -1)])
    torch.testing.assert_close(run("half_warp_exchange", on(w)).cpu(), halves)
    g = torch.arange(128, dtype=torch.float32)
    torch.testing.assert_close(run("grid_exchange", on(g)).cpu(), torch.roll(g, -32))
    torch.testing.assert_close(run("divergent_barrier", on(x)).cpu(), x)
    torch.testing.assert_close(run("broadcast_then_overwrite", on(x)).cpu(), torch.zeros(64))
    assert run("atomic_sum", on(torch.ones(300))).cpu().tolist() == [300.0, 0.0]
    torch.testing.assert_close(run("vector_copy", on(y)).cpu(), y)
    largest = run("grid_exchange_max", on(x)).cpu()  # the occupancy query's largest cooperative grid
    assert largest.numel() >= 64 and largest.numel() % 32 == 0
    torch.testing.assert_close(largest, torch.roll(torch.arange(largest.numel(), dtype=torch.float32), -32))

    v = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = run("shuffle", on(v)).cpu().view(6, 64)
    index = torch.arange(64)
    lane = index % 32
    torch.testing.assert_close(out[0], v[index - lane + 3], rtol=0, atol=0)
    torch.testing.assert_close(out[1], torch.where(lane >= 2, v[(index - 2).clamp(min=0)], v), rtol=0, atol=0)
    down = torch.where(lane % 16 + 5 < 16, v[(index + 5).clamp(max=63)], v)  # width 16
    torch.testing.assert_close(out[2], down, rtol=0, atol=0)
    torch.testing.assert_close(out[3], v[index ^ 1], rtol=0, atol=0)
    for warp in range(2):
        lanes = v[32 * warp:32 * warp + 32]
        ballot = sum(1 << i for i in range(32) if lanes[i] > 0)
        assert (out[4, 32 * warp:32 * warp + 32] == ballot).all()
        expected = float((lanes > 1).any()) + 2.0 * float((lanes > -1).all())
        assert (out[5, 32 * warp:32 * warp + 32] == expected).all()

    # One m16n8k16 product through fragments loaded in the PTX ISA's layout equals A B + C with A
    # and B rounded to the input dtype (float accumulation in the hardware's own order: a few float
    # ulps); a transposed or shifted fragment would give a different matrix.
    generator = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(*shape, generator=generator) for shape in ((16, 16), (16, 8), (16, 8)))
    for name, dtype in (("mma_bf16", torch.bfloat16), ("mma_f16", torch.float16)):
        d = run(name, on(torch.cat([a.flatten(), b.flatten(), c.flatten()]))).cpu().double()
        torch.testing.assert_close(d, a.to(dtype).double() @ b.to(dtype).double() + c.double(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(d, a.to(dtype).double().t() @ b.to(dtype).double() + c.double(), rtol=1e-3, atol=1e-3)
