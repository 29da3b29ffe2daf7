"""ONNX export: torch.onnx.export of a model with rnnfused layers gives ONNX's own LSTM, GRU and RNN
operators (as torch.nn's layers export), and onnxruntime's outputs match rnnfused's.

onnx, onnxruntime and onnxscript (the torch.export-based exporter's translator) are optional test
dependencies: `make test` (and so CI) installs them; elsewhere this module is skipped, saying so."""
import io
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfused

onnx = pytest.importorskip("onnx", reason="onnx is an optional test dependency (make test installs it)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional test dependency (make test installs it)")

TOL = dict(rtol=1e-4, atol=1e-5)  # float32; onnxruntime sums in its own order


def _export(model, args, dynamo, names):
    if dynamo:
        pytest.importorskip("onnxscript", reason="the torch.export-based ONNX exporter needs onnxscript")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, dynamo=dynamo, input_names=names, verbose=False)
    return buffer.getvalue()


def _run(model_bytes, args):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


class Layer(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, h0):
        if isinstance(self.layer, (rnnfused.LSTM, torch.nn.LSTM)):
            out, (h, c) = self.layer(x, (h0, torch.zeros_like(h0)))
            return out, h, c
        out, h = self.layer(x, h0)
        return out, h


LAYERS = {
    "lstm_2layer_bi": (lambda: rnnfused.LSTM(5, 6, num_layers=2, bidirectional=True), "LSTM", False),
    "gru_bi_batch_first": (lambda: rnnfused.GRU(5, 6, bidirectional=True, batch_first=True), "GRU", True),
    "gru_2layer_no_bias": (lambda: rnnfused.GRU(5, 6, num_layers=2, bias=False), "GRU", False),
    "rnn_tanh": (lambda: rnnfused.RNN(5, 6), "RNN", False),
    "rnn_relu_2layer_bi": (lambda: rnnfused.RNN(5, 6, num_layers=2, nonlinearity="relu", bidirectional=True), "RNN", False),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_export_to_onnx_recurrent_operators(name, dynamo):
    build, op_type, batch_first = LAYERS[name]
    torch.manual_seed(0)
    layer = build().eval()
    model = Layer(layer)
    directions = 2 if layer.bidirectional else 1
    x = torch.randn((3, 4, 5) if batch_first else (4, 3, 5))
    h0 = torch.randn(layer.num_layers * directions, 3, 6)
    graph = onnx.load_from_string(_export(model, (x, h0), dynamo, ["x", "h0"])).graph
    ops = [node.op_type for node in graph.node]
    # The same graph as torch.nn's layer with these weights exports to ...
    twin = Layer(build().eval())
    twin.load_state_dict(model.state_dict())
    rnnfused.convert(twin, to="torch.nn")
    assert type(twin.layer).__module__ == "torch.nn.modules.rnn"
    torch_nn_graph = onnx.load_from_string(_export(twin, (x, h0), dynamo, ["x", "h0"])).graph
    assert sorted(ops) == sorted(node.op_type for node in torch_nn_graph.node)
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), "a non-standard operator was exported"
    if not dynamo:
        # ... which, with the TorchScript-based exporter, is one ONNX recurrent operator per layer
        # (the torch.export-based one decomposes some of torch.nn's layers into matrix products).
        assert ops.count(op_type) == layer.num_layers, ops
    for node in graph.node:
        if node.op_type == "GRU":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attributes.get("linear_before_reset") == 1  # torch.nn's (and rnnfused's) GRU
    # The model still runs rnnfused's kernels outside the export.
    assert not torch.onnx.is_in_onnx_export()
    with torch.no_grad():
        expected = model(x, h0)
    torch.testing.assert_close(_run(_export(model, (x, h0), dynamo, ["x", "h0"]), (x, h0)), list(expected), **TOL)


class PackedEncoder(torch.nn.Module):
    """A bidirectional encoder over a padded batch with lengths, packed inside the model."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, state = self.layer(packed)
        out, _ = pad_packed_sequence(out, total_length=x.shape[0])
        h = state[0] if isinstance(state, tuple) else state
        return out, h


@pytest.mark.parametrize("cls,op_type", [(rnnfused.LSTM, "LSTM"), (rnnfused.GRU, "GRU"), (rnnfused.RNN, "RNN")])
def test_packed_input_exports_with_sequence_lengths(cls, op_type):
    """As for torch.nn (whose packed layers export with the TorchScript-based exporter only): the
    recurrent operator takes the sequence lengths, and onnxruntime matches rnnfused per sequence."""
    torch.manual_seed(0)
    model = PackedEncoder(cls(5, 6, bidirectional=True)).eval()
    x = torch.randn(5, 3, 5)
    lengths = torch.tensor([5, 2, 4])
    model_bytes = _export(model, (x, lengths), False, ["x", "lengths"])
    nodes = [n for n in onnx.load_from_string(model_bytes).graph.node if n.op_type == op_type]
    assert len(nodes) == 1 and len(nodes[0].input) > 4 and nodes[0].input[4] != "", "no sequence_lens input"
    with torch.no_grad():
        expected = model(x, lengths)
    torch.testing.assert_close(_run(model_bytes, (x, lengths)), list(expected), **TOL)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize("cls", [rnnfused.LSTMCell, rnnfused.GRUCell, rnnfused.RNNCell])
def test_cells_export_and_match_onnxruntime(cls, dynamo):
    torch.manual_seed(0)
    cell = cls(5, 6).eval()
    x, h = torch.randn(3, 5), torch.randn(3, 6)
    args = (x, (h, torch.randn(3, 6))) if cls is rnnfused.LSTMCell else (x, h)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, x, h, c=None):
            return self.cell(x, h if c is None else (h, c))

    flat = (x, h) if cls is not rnnfused.LSTMCell else (x, args[1][0], args[1][1])
    with torch.no_grad():
        expected = Step()(*flat)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    torch.testing.assert_close(_run(_export(Step(), flat, dynamo, None), flat), expected, **TOL)
