"""Bad input: rnnfused raises torch.nn's exception type with torch.nn's message. The expected
exception is taken live from torch.nn (same weights, same arguments), never written down here."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from helpers import CELL_MODES, LAYER_MODES, twin_cells, twin_layers

F64 = torch.float64


def assert_same_error(ref_call, our_call):
    with pytest.raises(Exception) as expected:
        ref_call()
    with pytest.raises(Exception) as got:
        our_call()
    assert type(got.value) is type(expected.value), f"{type(got.value)} vs torch.nn's {type(expected.value)}"
    assert str(got.value) == str(expected.value)


def _states(mode, layers_dirs, batch, hidden, dims=3):
    shape = (layers_dirs, batch, hidden)[3 - dims :]
    h = torch.randn(*shape, dtype=F64)
    if mode == "lstm":
        return (h, torch.randn(*shape, dtype=F64))
    return h


LAYER_CASES = {
    "wrong_feature_size": lambda mode: (torch.randn(5, 3, 7, dtype=F64), None),
    "input_1d": lambda mode: (torch.randn(5, dtype=F64), None),
    "input_4d": lambda mode: (torch.randn(5, 3, 4, 1, dtype=F64), None),
    "input_dtype": lambda mode: (torch.randn(5, 3, 4, dtype=torch.float32), None),
    "hidden_batch": lambda mode: (torch.randn(5, 3, 4, dtype=F64), _states(mode, 2, 4, 6)),
    "hidden_size": lambda mode: (torch.randn(5, 3, 4, dtype=F64), _states(mode, 2, 3, 5)),
    "hidden_layers": lambda mode: (torch.randn(5, 3, 4, dtype=F64), _states(mode, 1, 3, 6)),
    "hidden_2d_for_batched": lambda mode: (torch.randn(5, 3, 4, dtype=F64), _states(mode, 2, 3, 6, dims=2)),
    "hidden_3d_for_unbatched": lambda mode: (torch.randn(5, 4, dtype=F64), _states(mode, 2, 3, 6)),
    "unbatched_hidden_size": lambda mode: (torch.randn(5, 4, dtype=F64), _states(mode, 2, 1, 5, dims=2)),
    "zero_length": lambda mode: (torch.randn(0, 3, 4, dtype=F64), None),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_layer_errors_match_torch_nn(mode, case):
    ref, ours = twin_layers(mode, 4, 6, num_layers=2)
    x, hx = LAYER_CASES[case](mode)
    assert_same_error(lambda: ref(x, hx), lambda: ours(x, hx))


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_packed_hidden_shape_error_matches_torch_nn(mode):
    if mode == "lstm":
        pytest.skip("torch.nn.LSTM does not check a packed batch's states (rnnfused does; see below)")
    ref, ours = twin_layers(mode, 4, 6)
    packed = pack_padded_sequence(torch.randn(5, 3, 4, dtype=F64), [5, 3, 2])
    hx = _states(mode, 1, 2, 6)
    assert_same_error(lambda: ref(packed, hx), lambda: ours(packed, hx))


def test_packed_lstm_hidden_shape_is_checked():
    _, ours = twin_layers("lstm", 4, 6)
    packed = pack_padded_sequence(torch.randn(5, 3, 4, dtype=F64), [5, 3, 2])
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 3, 6\), got \[1, 2, 6\]"):
        ours(packed, _states("lstm", 1, 2, 6))
    with pytest.raises(RuntimeError, match="lstm expects two hidden states"):
        ours(packed, _states("lstm", 1, 3, 6) + (torch.zeros(1),))


def test_lstm_state_count_matches_torch_nn():
    ref, ours = twin_layers("lstm", 4, 6)
    x = torch.randn(5, 3, 4, dtype=F64)
    h = torch.randn(1, 3, 6, dtype=F64)
    for hx in ((h,), (h, h, h)):
        assert_same_error(lambda: ref(x, hx), lambda: ours(x, hx))


@pytest.mark.parametrize("mode", list(LAYER_MODES))
def test_hidden_dtype_mismatch_is_a_clear_runtime_error(mode):
    """torch.nn fails deep in its backend with a backend-specific message; rnnfused raises the same
    exception type and names the dtypes."""
    ref, ours = twin_layers(mode, 4, 6)
    x = torch.randn(5, 3, 4, dtype=F64)
    hx = _states(mode, 1, 3, 6)
    hx = tuple(h.float() for h in hx) if isinstance(hx, tuple) else hx.float()
    with pytest.raises(Exception) as expected:
        ref(x, hx)
    with pytest.raises(type(expected.value), match="dtype"):
        ours(x, hx)


def test_constructor_errors_match_torch_nn():
    import torch.nn as nn

    import rnnfused

    cases = [
        (lambda m: m.RNN(4, 6, nonlinearity="gelu")),
        (lambda m: m.RNN(4, 6, 1, "sigmoid")),
        (lambda m: m.GRU(4, 6, proj_size=2)),
        (lambda m: m.RNN(4, 6, proj_size=2)),
        (lambda m: m.LSTM(4, 6, proj_size=6)),
        (lambda m: m.LSTM(4, 6, proj_size=-1)),
        (lambda m: m.LSTM(4, 6, dropout=1.5)),
        (lambda m: m.LSTM(4, 0)),
        (lambda m: m.LSTM(4, 6, num_layers=0)),
        (lambda m: m.LSTM(4, 6, dropout=True)),
    ]
    for make in cases:
        assert_same_error(lambda: make(nn), lambda: make(rnnfused))


CELL_CASES = {
    "wrong_feature_size": lambda mode: (torch.randn(3, 7, dtype=F64), None),
    "input_3d": lambda mode: (torch.randn(3, 4, 1, dtype=F64), None),
    "hidden_batch": lambda mode: (torch.randn(3, 4, dtype=F64), _states(mode, None, 2, 6, dims=2)),
    "hidden_size": lambda mode: (torch.randn(3, 4, dtype=F64), _states(mode, None, 3, 5, dims=2)),
    "hidden_3d": lambda mode: (torch.randn(3, 4, dtype=F64), _states(mode, 1, 3, 6)),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
@pytest.mark.parametrize("mode", list(CELL_MODES))
def test_cell_errors_match_torch_nn(mode, case):
    ref, ours = twin_cells(mode, 4, 6)
    x, hx = CELL_CASES[case](mode)
    assert_same_error(lambda: ref(x, hx), lambda: ours(x, hx))


def test_lstm_cell_state_count_matches_torch_nn():
    ref, ours = twin_cells("lstm", 4, 6)
    x = torch.randn(3, 4, dtype=F64)
    h = torch.randn(3, 6, dtype=F64)
    assert_same_error(lambda: ref(x, (h, h, h)), lambda: ours(x, (h, h, h)))


def test_cell_nonlinearity_changed_after_construction():
    ref, ours = twin_cells("rnn_tanh", 4, 6)
    ref.nonlinearity = ours.nonlinearity = "foo"
    x = torch.randn(3, 4, dtype=F64)
    assert_same_error(lambda: ref(x), lambda: ours(x))


def test_cuda_tensor_without_cuda_build_is_a_clear_error():
    import rnnfused

    if rnnfused.cuda_built() or not torch.cuda.is_available():
        pytest.skip("needs a GPU and a CPU-only build of rnnfused")
    layer = rnnfused.LSTM(4, 6).cuda()
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        layer(torch.randn(5, 3, 4, device="cuda"))
