"""rnnfused.convert: an existing model switched between torch.nn's recurrent layers and rnnfused's,
in place, on models written the way real code writes them. The converted model holds the same
Parameter objects, so an optimizer built before the call keeps training it; its outputs and a few
training steps equal the original's (float64)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfused

DTYPE = torch.float64
RNNFUSED_CLASSES = (rnnfused.LSTM, rnnfused.GRU, rnnfused.RNN, rnnfused.LSTMCell, rnnfused.GRUCell, rnnfused.RNNCell)
TOL = dict(rtol=1e-9, atol=1e-11)


class Seq2SeqAttention(nn.Module):
    """A bidirectional packed LSTM encoder and an LSTMCell decoder with dot-product attention."""

    def __init__(self, vocab=11, emb=6, hidden=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.encoder = nn.LSTM(emb, hidden, bidirectional=True, batch_first=True)
        self.bridge = nn.Linear(2 * hidden, hidden)
        self.decoder = nn.LSTMCell(emb + 2 * hidden, hidden)
        self.query = nn.Linear(hidden, 2 * hidden, bias=False)
        self.out = nn.Linear(hidden + 2 * hidden, vocab)

    def forward(self, source, lengths, target):
        packed = pack_padded_sequence(self.embed(source), lengths, batch_first=True, enforce_sorted=False)
        memory, (h_n, _) = self.encoder(packed)
        memory, _ = pad_packed_sequence(memory, batch_first=True)  # [B, S, 2H]
        mask = torch.arange(memory.shape[1])[None, :] < lengths[:, None]
        h = torch.tanh(self.bridge(torch.cat([h_n[0], h_n[1]], -1)))
        c = torch.zeros_like(h)
        context = memory.new_zeros(memory.shape[0], memory.shape[2])
        logits = []
        for step in range(target.shape[1]):
            h, c = self.decoder(torch.cat([self.embed(target[:, step]), context], -1), (h, c))
            scores = torch.einsum("bsd,bd->bs", memory, self.query(h)).masked_fill(~mask, float("-inf"))
            context = torch.einsum("bs,bsd->bd", scores.softmax(-1), memory)
            logits.append(self.out(torch.cat([h, context], -1)))
        return torch.stack(logits, 1)


class SpeechGRU(nn.Module):
    """Stacked bidirectional GRU over filterbank frames with inter-layer dropout, and a frame
    classifier (a CTC-style acoustic model)."""

    def __init__(self, features=10, hidden=7, classes=5):
        super().__init__()
        self.rnn = nn.GRU(features, hidden, num_layers=3, bidirectional=True, batch_first=True, dropout=0.2)
        self.classify = nn.Linear(2 * hidden, classes)

    def forward(self, frames):
        out, _ = self.rnn(frames)
        return self.classify(out).log_softmax(-1)


class FixedDropConnect(nn.Module):
    """DropConnect on W_hh written as a parametrization (AWD-LSTM's weight drop): one mask per
    training step, drawn from (seed, draw) alone, so that every read of the weight within a step
    sees the same mask (torch.nn.LSTM reads a parametrized weight several times per forward,
    rnnfused once) and two copies of a model draw the same masks."""

    def __init__(self, p, seed):
        super().__init__()
        self.p = p
        self.seed = seed
        self.draw = 0

    def forward(self, weight):
        if not self.training:
            return weight
        generator = torch.Generator().manual_seed(1000 * self.seed + self.draw)
        keep = torch.rand(weight.shape, generator=generator, dtype=weight.dtype) >= self.p
        return weight * keep / (1 - self.p)


class AwdLanguageModel(nn.Module):
    """AWD-LSTM style: a list of single-layer LSTMs of different sizes, DropConnect on each W_hh,
    and the decoder's weight tied to the embedding."""

    def __init__(self, vocab=13, emb=6, hidden=9):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        sizes = [emb, hidden, hidden, emb]
        self.rnns = nn.ModuleList(nn.LSTM(sizes[i], sizes[i + 1]) for i in range(3))
        for i, rnn in enumerate(self.rnns):
            parametrize.register_parametrization(rnn, "weight_hh_l0", FixedDropConnect(0.3, seed=i))
        self.decoder = nn.Linear(emb, vocab)
        self.decoder.weight = self.embed.weight  # tied

    def new_masks(self):
        for rnn in self.rnns:
            rnn.parametrizations.weight_hh_l0[0].draw += 1

    def forward(self, tokens, states=None):
        x = self.embed(tokens)
        new_states = []
        for i, rnn in enumerate(self.rnns):
            x, state = rnn(x, None if states is None else states[i])
            new_states.append(state)
        return self.decoder(x), new_states


def _seq2seq_batch():
    g = torch.Generator().manual_seed(1)
    source = torch.randint(0, 11, (4, 7), generator=g)
    lengths = torch.tensor([7, 3, 5, 2])
    target = torch.randint(0, 11, (4, 5), generator=g)
    return (source, lengths, target), lambda out: F.cross_entropy(out.reshape(-1, 11), target.reshape(-1))


def _speech_batch():
    frames = torch.randn(3, 9, 10, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    labels = torch.randint(0, 5, (3, 9), generator=torch.Generator().manual_seed(3))
    return (frames,), lambda out: F.nll_loss(out.reshape(-1, 5), labels.reshape(-1))


def _lm_batch():
    tokens = torch.randint(0, 13, (8, 3), generator=torch.Generator().manual_seed(4))
    return (tokens,), lambda out: F.cross_entropy(out[0][:-1].reshape(-1, 13), tokens[1:].reshape(-1))


MODELS = {
    "seq2seq_attention": (Seq2SeqAttention, _seq2seq_batch, ["encoder", "decoder"]),
    "speech_gru": (SpeechGRU, _speech_batch, ["rnn"]),
    "awd_lm": (AwdLanguageModel, _lm_batch, ["rnns.0", "rnns.1", "rnns.2"]),
}


def _train(model, optimizer, inputs, loss_of, steps=3):
    losses = []
    for step in range(steps):
        torch.manual_seed(10 + step)  # the same inter-layer dropout draws on both models
        if hasattr(model, "new_masks"):
            model.new_masks()
        optimizer.zero_grad()
        loss = loss_of(model(*inputs))
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_trains_exactly_like_the_original(name):
    build, batch, recurrent = MODELS[name]
    # Two copies, built from the same seed (deepcopy refuses a torch.nn.LSTM whose weight is
    # parametrized: its _flat_weights hold the computed, non-leaf tensor).
    torch.manual_seed(0)
    original = build().to(DTYPE)
    torch.manual_seed(0)
    model = build().to(DTYPE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # built before convert
    reference_optimizer = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9)
    parameters_before = [id(p) for p in model.parameters()]

    assert rnnfused.convert(model) is model
    modules = dict(model.named_modules())
    for module_name in recurrent:
        module = modules[module_name]
        assert isinstance(module, RNNFUSED_CLASSES), f"{module_name} was not converted: {type(module)}"
    assert [id(p) for p in model.parameters()] == parameters_before
    if name == "awd_lm":
        assert model.decoder.weight is model.embed.weight
        assert all(parametrize.is_parametrized(rnn, "weight_hh_l0") for rnn in model.rnns)
        assert all(isinstance(rnn, rnnfused.LSTM) for rnn in model.rnns)

    inputs, loss_of = batch()
    model.eval(), original.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), original(*inputs), **TOL)
    model.train(), original.train()
    losses = _train(model, optimizer, inputs, loss_of)
    reference_losses = _train(original, reference_optimizer, inputs, loss_of)
    torch.testing.assert_close(losses, reference_losses, **TOL)
    for (pname, p), q in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"{pname}: {m}")


def test_the_way_back_and_what_stays():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(4, 5, num_layers=2), nn.GRUCell(3, 2), nn.RNN(4, 3, nonlinearity="relu"))
    model[0].double()
    model.eval()
    calls = []
    model[0].register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    expected, _ = model[0](x)

    rnnfused.convert(model)
    assert [type(m) for m in model] == [rnnfused.LSTM, rnnfused.GRUCell, rnnfused.RNN]
    assert not model.training and model[0].weight_hh_l0.dtype == torch.float64 and model[2].nonlinearity == "relu"
    out, _ = model[0](x)
    torch.testing.assert_close(out, expected, **TOL)
    assert calls == ["LSTM", "LSTM"]  # the hook stayed, and ran on the converted module

    rnnfused.convert(model, to="torch.nn")
    assert [type(m) for m in model] == [nn.LSTM, nn.GRUCell, nn.RNN]
    torch.testing.assert_close(model[0](x)[0], expected, **TOL)
    assert calls == ["LSTM"] * 3
    # A model that is itself a recurrent layer converts too (in place: the same object).
    layer = nn.GRU(3, 4)
    assert rnnfused.convert(layer) is layer and type(layer) is rnnfused.GRU


def test_weight_norm_parametrization_is_kept():
    torch.manual_seed(0)
    layer = nn.LSTM(3, 4, dtype=torch.float64)
    torch.nn.utils.parametrizations.weight_norm(layer, "weight_hh_l0")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = layer(x)[0]
    rnnfused.convert(layer)
    assert isinstance(layer, rnnfused.LSTM) and parametrize.is_parametrized(layer, "weight_hh_l0")
    assert type(layer).__name__ == "ParametrizedLSTM"
    torch.testing.assert_close(layer(x)[0], expected, **TOL)
    # The parametrization is still live: changing its original changes the result.
    with torch.no_grad():
        layer.parametrizations.weight_hh_l0.original0.mul_(2)  # the norm g
    assert not torch.allclose(layer(x)[0], expected)
    rnnfused.convert(layer, to="torch.nn")
    assert isinstance(layer, nn.LSTM) and type(layer).__name__ == "ParametrizedLSTM"


def test_user_subclasses_are_left_alone_with_a_warning():
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    model = nn.Sequential(MyLSTM(3, 4), nn.LSTM(4, 4))
    with pytest.warns(UserWarning, match=r"left 0 \(.*MyLSTM, a subclass of torch.nn.modules.rnn.LSTM\) as it is"):
        rnnfused.convert(model)
    assert type(model[0]) is MyLSTM and type(model[1]) is rnnfused.LSTM


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`to` must be 'rnnfused' or 'torch.nn', got 'cudnn'"):
        rnnfused.convert(nn.LSTM(2, 2), to="cudnn")
    with pytest.raises(TypeError, match=r"expected a torch.nn.Module, got dict"):
        rnnfused.convert({})


def test_a_scripted_model_converts_back():
    """torch.jit.script switches rnnfused modules to their TorchScript form (a subclass); convert
    still recognises them."""
    model = nn.Sequential(rnnfused.GRUCell(3, 4))
    torch.jit.script(model)
    assert type(model[0]).__name__ == "ScriptGRUCell"
    rnnfused.convert(model, to="torch.nn")
    assert type(model[0]) is nn.GRUCell
