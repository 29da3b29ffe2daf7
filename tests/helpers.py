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
