"""TorchScript: torch.jit.trace (with its own checks) and torch.jit.script of every rnnfused module and
cell, as torch.nn's work; the TorchScript module gives the eager module's outputs and gradients,
and survives torch.jit.save / torch.jit.load."""
import io
from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import rnnfused

DTYPE = torch.float64


def _layers():
    return {
        "lstm_2layer_bi": lambda: rnnfused.LSTM(5, 6, num_layers=2, bidirectional=True, dtype=DTYPE),
        "lstm_proj_batch_first": lambda: rnnfused.LSTM(5, 6, proj_size=3, batch_first=True, dtype=DTYPE),
        "gru_no_bias": lambda: rnnfused.GRU(5, 6, num_layers=2, bias=False, dtype=DTYPE),
        "rnn_relu_bi": lambda: rnnfused.RNN(5, 6, nonlinearity="relu", bidirectional=True, dtype=DTYPE),
    }


def _cells():
    return {
        "lstm_cell": lambda: rnnfused.LSTMCell(5, 6, dtype=DTYPE),
        "gru_cell": lambda: rnnfused.GRUCell(5, 6, dtype=DTYPE),
        "rnn_cell": lambda: rnnfused.RNNCell(5, 6, nonlinearity="relu", dtype=DTYPE),
    }


def _input(name, steps=4, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name.endswith("cell"):
        return torch.randn(batch, 5, generator=g, dtype=DTYPE)
    shape = (batch, steps, 5) if "batch_first" in name else (steps, batch, 5)
    return torch.randn(shape, generator=g, dtype=DTYPE)


def _flatten(result):
    if isinstance(result, Tensor):
        return [result]
    out = []
    for item in result:
        out += _flatten(item)
    return out


def _outputs_and_grads(module, x):
    x = x.clone().requires_grad_()
    outputs = _flatten(module(x))
    loss = sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs)
    grads = torch.autograd.grad(loss, [x] + list(module.parameters()))
    return [o.detach() for o in outputs], grads


BUILDERS = {**_layers(), **_cells()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_trace_passes_its_checks_and_matches_eager(name):
    torch.manual_seed(0)
    module = BUILDERS[name]()
    traced = torch.jit.trace(module, (_input(name),))  # check_trace=True: reruns and compares
    for seed, steps, batch in ((1, 4, 3), (2, 7, 2)):  # other values, and other sizes
        x = _input(name, steps, batch, seed)
        expected_out, expected_grads = _outputs_and_grads(module, x)
        out, grads = _outputs_and_grads(traced, x)
        torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
        torch.testing.assert_close(grads, expected_grads, rtol=1e-12, atol=1e-14)


class Padded(torch.nn.Module):
    """How a scripted model calls a recurrent layer: from its own scripted forward."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out, state = self.layer(x)
        if isinstance(state, Tensor):
            return out, state
        return out, state[0] + state[1].sum()


class Packed(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x: PackedSequence, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        out, state = self.layer(x)
        if isinstance(state, Tensor):
            return out.data, state
        return out.data, state[0]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_script_matches_eager_and_survives_save_and_load(name):
    torch.manual_seed(0)
    layer = BUILDERS[name]()
    model = layer if name.endswith("cell") else Padded(layer)
    scripted = torch.jit.script(model)
    assert isinstance(layer, type(BUILDERS[name]()))  # the module is still an rnnfused module
    assert list(scripted.state_dict()) == list(model.state_dict())
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for seed, steps, batch in ((1, 4, 3), (2, 7, 2)):
        x = _input(name, steps, batch, seed)
        expected_out, expected_grads = _outputs_and_grads(model, x)
        for candidate in (scripted, loaded):
            out, grads = _outputs_and_grads(candidate, x)
            torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
            torch.testing.assert_close(grads, expected_grads, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(_layers()))
def test_script_packed_input(name):
    torch.manual_seed(0)
    model = Packed(_layers()[name]())
    scripted = torch.jit.script(model)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randn(n, 5, generator=g, dtype=DTYPE) for n in (2, 5, 3)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    expected = model(packed)
    torch.testing.assert_close(scripted(packed), expected, rtol=0, atol=0)


def test_scripted_layer_keeps_torch_nn_errors():
    scripted = torch.jit.script(Padded(rnnfused.GRU(5, 6)))
    with pytest.raises(Exception, match=r"GRU: Expected input to be 2D or 3D, got 4D instead"):
        scripted(torch.randn(2, 3, 4, 5))
    with pytest.raises(Exception, match=r"input.size\(-1\) must be equal to input_size. Expected 5, got 4"):
        scripted(torch.randn(2, 3, 4))


def test_scripting_a_subclass_is_refused_clearly():
    class Doubled(rnnfused.LSTM):
        def forward(self, x, hx=None):
            return super().forward(2 * x, hx)

    with pytest.raises(RuntimeError, match=r"torch.jit.script supports rnnfused's own classes, not .*Doubled"):
        torch.jit.script(Padded(Doubled(5, 6)))
