"""Drop-in replacements for torch.nn.LSTM, GRU, RNN and their Cell classes.

The layer classes derive from ``torch.nn.RNNBase`` (as torch.nn.LSTM, GRU and RNN do, but not from
those classes themselves: torch.compile refuses to trace any instance of them) and the cells from
their torch.nn counterparts. The constructor, parameter names, ``state_dict``, ``repr``,
``all_weights``, ``flatten_parameters`` and the argument checks are torch.nn's own, so a state_dict moves between the two with strict=True and
bad input raises torch.nn's exception with torch.nn's message. The forward passes follow
torch.nn's line by line up to the point where torch.nn calls its ATen/cuDNN kernels; there
rnnfused runs its own fused ops, layer by layer and direction by direction.
"""
import numbers
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from . import functional as rf

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU"]

_ZERO_LENGTH_MESSAGE = "Expected sequence length to be larger than 0 in RNN"

# One side stream per CUDA device, on which the reverse direction of a bidirectional layer runs
# while the forward direction runs on the caller's stream (see _FusedStack._run_directions).
_SIDE_STREAMS = {}


def _side_stream(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


# Keyword-only options of the layer classes beyond torch.nn (README "Regularization"); 0 = off.
_RECURRENT_OPTIONS = ("recurrent_dropout", "dropconnect", "zoneout", "cell_zoneout")
_MEANING = {"recurrent_dropout": "dropping", "dropconnect": "dropping", "zoneout": "keeping",
            "cell_zoneout": "keeping"}


def _check_probability(name, p):
    if isinstance(p, bool) or not isinstance(p, numbers.Number) or not 0 <= p < 1:
        raise ValueError(
            f"{name} must be a number in [0, 1) (the probability of {_MEANING[name]} an element), got {p!r}"
        )
    return float(p)


def _pop_recurrent_options(kwargs, mode):
    options = {name: _check_probability(name, kwargs.pop(name, 0.0)) for name in _RECURRENT_OPTIONS}
    if options["cell_zoneout"] and mode != "LSTM":
        raise ValueError("cell_zoneout applies to the LSTM's cell state; use zoneout for the hidden state")
    return options


def _uniform(shape, like):
    """The random numbers behind every mask of the options: one float32 uniform draw in [0, 1) per
    element (torch.rand, torch's generator) on ``like``'s device. Comparing it with p costs a third
    of torch's CPU Bernoulli sampling, which dominated the options' cost."""
    return torch.rand(shape, dtype=torch.float32, device=like.device)


def _dropout_mask(shape, p, like):
    """Dropout's mask in ``like``'s dtype: 1 / (1 - p) where the draw is >= p, else 0."""
    return (_uniform(shape, like) >= p).to(like.dtype) * (1.0 / (1.0 - p))


def _zoneout_keep(p, training, rows, like):
    """Keep weights of one zoned state: in training [rows, width], 1 where the draw is < p (the
    unit keeps its previous value), else 0; in eval mode the scalar p (the expectation); None when
    p is 0."""
    if not p:
        return None
    if training:
        return (_uniform((rows, like.shape[-1]), like) < p).to(like.dtype)
    return torch.full((), p, dtype=like.dtype, device=like.device)


class _FusedStack:
    """Runs the stacked, possibly bidirectional layers of an RNNBase on rnnfused's ops."""

    # Class-level defaults: a torch.nn module converted in place (rnnfused.convert) has them off.
    recurrent_dropout = 0.0
    dropconnect = 0.0
    zoneout = 0.0
    cell_zoneout = 0.0

    def _set_recurrent_options(self, options):
        for name, value in options.items():
            setattr(self, name, value)

    def extra_repr(self):
        text = nn.RNNBase.extra_repr(self)
        for name in _RECURRENT_OPTIONS:
            if getattr(self, name):
                text += f", {name}={getattr(self, name)}"
        return text

    def _recurrent_draws(self, index, h0, c0, rows):
        """(w_hh, recurrent_mask, zoneout, cell_zoneout) of layer-direction ``index`` for this call,
        drawn from torch's generator in that order (None where off). In training: W_hh with
        DropConnect applied, the recurrent dropout mask [B, P] (h0's shape and dtype), zoneout's
        keep draws [rows, P] and [rows, H]; in eval mode only zoneout's expectation p."""
        w_hh = mask = None
        if self.training and self.dropconnect:
            w_hh = self._layer_parameters(index)[1]
            w_hh = w_hh * _dropout_mask(w_hh.shape, self.dropconnect, w_hh)
        if self.training and self.recurrent_dropout:
            mask = _dropout_mask(h0.shape, self.recurrent_dropout, h0)
        keep_h = _zoneout_keep(self.zoneout, self.training, rows, h0)
        keep_c = _zoneout_keep(self.cell_zoneout, self.training, rows, c0) if c0 is not None else None
        return w_hh, mask, keep_h, keep_c

    def _layer_parameters(self, index):
        """w_ih, w_hh, b_ih, b_hh, w_hr of layer-direction ``index`` (None where absent)."""
        # Read by name rather than from ``_flat_weights``: the result is the same, it follows a
        # reparametrization such as weight_norm without ``_update_flat_weights``, and
        # torch.compile traces it.
        names = self._flat_weights_names
        per_layer = len(names) // (self.num_layers * (2 if self.bidirectional else 1))
        weights = [getattr(self, name) for name in names[index * per_layer : (index + 1) * per_layer]]
        w_ih, w_hh = weights[0], weights[1]
        b_ih, b_hh = (weights[2], weights[3]) if self.bias else (None, None)
        w_hr = weights[-1] if self.proj_size > 0 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def _run_layer(self, layer_input, index, h0, c0, batch_sizes, reverse, draws=(None, None, None, None)):
        w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_parameters(index)
        dropped_w_hh, mask, keep_h, keep_c = draws
        if dropped_w_hh is not None:
            w_hh = dropped_w_hh
        if self.mode == "LSTM":
            return rf.lstm_layer(layer_input, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes, reverse,
                                 training=self.training, recurrent_mask=mask, zoneout=keep_h, cell_zoneout=keep_c)
        if self.mode == "GRU":
            return rf.gru_layer(layer_input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes, reverse, training=self.training,
                                recurrent_mask=mask, zoneout=keep_h)
        if self.mode == "RNN_TANH":
            return rf.rnn_tanh_layer(layer_input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes, reverse, recurrent_mask=mask,
                                     zoneout=keep_h)
        if self.mode == "RNN_RELU":
            return rf.rnn_relu_layer(layer_input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes, reverse, recurrent_mask=mask,
                                     zoneout=keep_h)
        raise ValueError("Unrecognized RNN mode: " + self.mode)

    def _run_directions(self, layer_input, layer, num_directions, h0, c0, batch_sizes):
        """The results of every direction of one layer, forward first.

        On a GPU the two directions of a bidirectional layer are independent chains of small
        kernels, each too small to fill the device: the reverse one runs on a side stream while
        the forward one runs on the caller's stream, and the caller's stream then waits for it.
        Autograd runs each backward op on its forward op's stream, so the backward passes overlap
        too. Elsewhere (CPU, meta, under torch.compile or CUDA graph capture) they run one after
        the other. Either way the results are the same, bit for bit."""

        # Masks are drawn here, forward direction first, whichever stream runs which direction.
        draws = []
        for d in range(num_directions):
            index = layer * num_directions + d
            draws.append(self._recurrent_draws(index, h0[index], None if c0 is None else c0[index],
                                               layer_input.shape[0]))

        def run(direction):
            index = layer * num_directions + direction
            return self._run_layer(
                layer_input, index, h0[index], None if c0 is None else c0[index], batch_sizes, direction == 1,
                draws[direction],
            )

        if (
            num_directions == 1
            or not layer_input.is_cuda
            or torch.compiler.is_compiling()
            or torch.cuda.is_current_stream_capturing()
        ):
            return [run(direction) for direction in range(num_directions)]
        main = torch.cuda.current_stream(layer_input.device)
        side = _side_stream(layer_input.device)
        side.wait_stream(main)  # the layer input, states and weights are ready
        # Made on the caller's stream and read on the side one, here and by the reverse direction's
        # backward (autograd saves them): their memory must not be reused before the side stream
        # is done with them, whenever they are freed.
        for tensor in (layer_input, h0, c0, *draws[1]):
            if tensor is not None:
                tensor.record_stream(side)
        with torch.cuda.stream(side):
            reverse = run(1)
        forward = run(0)
        main.wait_stream(side)
        # Made on the side stream, used from here on on the caller's: the caching allocator must
        # not hand their memory out again before the caller's stream is done with them.
        for tensor in reverse:
            if tensor is not None:
                tensor.record_stream(main)
        return [forward, reverse]

    def _run_stack(self, input, batch_sizes, h0, c0=None):
        """The equivalent of torch.nn's ``_VF.lstm/gru/rnn_*`` call.

        input: padded [T, B, I] ([B, T, I] with batch_first) or packed data [N, I];
        h0: [L*D, B, P]; c0: [L*D, B, H] (LSTM). Returns output in the input's layout, h_n, c_n.
        """
        if batch_sizes is None:
            steps_first = input.transpose(0, 1) if self.batch_first else input
            steps, batch = steps_first.shape[0], steps_first.shape[1]
            if steps == 0:
                raise RuntimeError(_ZERO_LENGTH_MESSAGE)
            layer_input = steps_first.reshape(steps * batch, steps_first.shape[2])
        else:
            layer_input = input
        num_directions = 2 if self.bidirectional else 1
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for result in self._run_directions(layer_input, layer, num_directions, h0, c0, batch_sizes):
                outputs.append(result[0])
                h_n.append(result[1])
                if c0 is not None:
                    c_n.append(result[2])
            layer_output = outputs[0] if num_directions == 1 else torch.cat(outputs, 1)
            # Inter-layer dropout, in training only, as torch.nn applies it (same RNG draws).
            if self.dropout != 0 and self.training and layer < self.num_layers - 1:
                layer_output = F.dropout(layer_output, self.dropout, True)
            layer_input = layer_output
        output = layer_input
        if batch_sizes is None:
            output = output.view(steps, batch, output.shape[1])
            if self.batch_first:
                output = output.transpose(0, 1).contiguous()
        return output, torch.stack(h_n, 0), (torch.stack(c_n, 0) if c0 is not None else None)


def _exporting_to_onnx():
    """Whether torch.onnx.export is running. Then the layers and cells run torch.nn's own forward on
    the same parameters (their attributes are torch.nn's), which the exporter turns into ONNX's
    LSTM / GRU / RNN operators (gate order, GRU's linear_before_reset and the sequence lengths of
    packed input as ONNX defines them): an ONNX model has no place for rnnfused's ops, and an ONNX
    runtime runs its own kernels."""
    return torch.onnx.is_in_onnx_export()


def _check_export_options(module):
    """torch.nn's forward, which an ONNX export runs, has none of rnnfused's regularization: recurrent
    dropout and DropConnect are the identity in eval mode, zoneout is not (its expectation)."""
    if getattr(module, "zoneout", 0) or getattr(module, "cell_zoneout", 0):
        raise RuntimeError(
            "rnnfused: ONNX has no zoneout (its eval-mode expectation is not torch.nn's cell), so a module with "
            "zoneout or cell_zoneout cannot be exported to ONNX"
        )
    if module.training and (getattr(module, "recurrent_dropout", 0) or getattr(module, "dropconnect", 0)):
        raise RuntimeError(
            "rnnfused: an ONNX export of a module in training mode with recurrent_dropout or dropconnect would "
            "leave them out; call module.eval() first (in eval mode both are the identity)"
        )


def _check_forward_args(module, input, hx, batch_sizes):
    """torch.nn's argument checks. Under torch.compile a packed batch's size is data
    (``batch_sizes[0]``), which the compiler cannot guard on; there the op itself checks the
    states against ``batch_sizes`` when it runs."""
    if batch_sizes is not None and torch.compiler.is_compiling():
        module.check_input(input, batch_sizes)
        return
    module.check_forward_args(input, hx, batch_sizes)


def _refuse_projection(kwargs):
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


def _single_state_forward(module, name, input, hx):
    """forward of torch.nn.RNN and torch.nn.GRU (they differ only in a message), on rnnfused's ops."""
    num_directions = 2 if module.bidirectional else 1
    orig_input = input
    if isinstance(orig_input, PackedSequence):
        input, batch_sizes, sorted_indices, unsorted_indices = input
        max_batch_size = int(batch_sizes[0])
        if hx is None:
            hx = torch.zeros(
                module.num_layers * num_directions,
                max_batch_size,
                module.hidden_size,
                dtype=input.dtype,
                device=input.device,
            )
        else:
            hx = module.permute_hidden(hx, sorted_indices)
    else:
        batch_sizes = None
        if input.dim() not in (2, 3):
            suffix = " tensor instead" if name == "RNN" else " instead"
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{suffix}")
        is_batched = input.dim() == 3
        batch_dim = 0 if module.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                    )
                hx = hx.unsqueeze(1)
        else:
            if hx is not None and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        max_batch_size = input.size(0) if module.batch_first else input.size(1)
        sorted_indices = None
        unsorted_indices = None
        if hx is None:
            hx = torch.zeros(
                module.num_layers * num_directions,
                max_batch_size,
                module.hidden_size,
                dtype=input.dtype,
                device=input.device,
            )
        else:
            hx = module.permute_hidden(hx, sorted_indices)

    _check_forward_args(module, input, hx, batch_sizes)
    output, hidden, _ = module._run_stack(input, batch_sizes, hx)

    if isinstance(orig_input, PackedSequence):
        output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        return output_packed, module.permute_hidden(hidden, unsorted_indices)
    if not is_batched:
        output = output.squeeze(batch_dim)
        hidden = hidden.squeeze(1)
    return output, module.permute_hidden(hidden, unsorted_indices)


class RNN(_FusedStack, nn.RNNBase):
    __doc__ = "rnnfused's drop-in for :class:`torch.nn.RNN` (fused kernels).\n\n" + (nn.RNN.__doc__ or "")

    def __init__(self, *args, **kwargs):
        # torch.nn.RNN.__init__, which picks the mode from ``nonlinearity``.
        _refuse_projection(kwargs)
        options = _pop_recurrent_options(kwargs, "RNN")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)
        self._set_recurrent_options(options)

    def __prepare_scriptable__(self):
        # torch.jit.script compiles a TorchScript form sharing this module's state (_script.py).
        from . import _script

        return _script.prepare_scriptable(self)

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            _check_export_options(self)
            return nn.RNN.forward(self, input, hx)
        return _single_state_forward(self, "RNN", input, hx)


class GRU(_FusedStack, nn.RNNBase):
    __doc__ = "rnnfused's drop-in for :class:`torch.nn.GRU` (fused kernels).\n\n" + (nn.GRU.__doc__ or "")

    def __init__(self, *args, **kwargs):
        _refuse_projection(kwargs)
        options = _pop_recurrent_options(kwargs, "GRU")
        super().__init__("GRU", *args, **kwargs)
        self._set_recurrent_options(options)

    def __prepare_scriptable__(self):
        # torch.jit.script compiles a TorchScript form sharing this module's state (_script.py).
        from . import _script

        return _script.prepare_scriptable(self)

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            _check_export_options(self)
            return nn.GRU.forward(self, input, hx)
        return _single_state_forward(self, "GRU", input, hx)


class LSTM(_FusedStack, nn.RNNBase):
    __doc__ = "rnnfused's drop-in for :class:`torch.nn.LSTM` (fused kernels).\n\n" + (nn.LSTM.__doc__ or "")

    def __init__(self, *args, **kwargs):
        options = _pop_recurrent_options(kwargs, "LSTM")
        super().__init__("LSTM", *args, **kwargs)
        self._set_recurrent_options(options)

    # torch.nn.LSTM's own checks of the two states, and its permutation of both.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __prepare_scriptable__(self):
        # torch.jit.script compiles a TorchScript form sharing this module's state (_script.py).
        from . import _script

        return _script.prepare_scriptable(self)

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            _check_export_options(self)
            return nn.LSTM.forward(self, input, hx)
        orig_input = input
        batch_sizes = None
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is None:
                h_zeros = torch.zeros(
                    self.num_layers * num_directions,
                    max_batch_size,
                    real_hidden_size,
                    dtype=input.dtype,
                    device=input.device,
                )
                c_zeros = torch.zeros(
                    self.num_layers * num_directions,
                    max_batch_size,
                    self.hidden_size,
                    dtype=input.dtype,
                    device=input.device,
                )
                hx = (h_zeros, c_zeros)
            else:
                _check_two_states(hx)
                hx = self.permute_hidden(hx, sorted_indices)
            # torch.nn.LSTM leaves a packed batch unchecked here (its kernels then fail with
            # unrelated messages, or not at all); rnnfused applies the padded path's checks.
            _check_forward_args(self, input, hx, batch_sizes)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = None
            unsorted_indices = None
            if hx is None:
                h_zeros = torch.zeros(
                    self.num_layers * num_directions,
                    max_batch_size,
                    real_hidden_size,
                    dtype=input.dtype,
                    device=input.device,
                )
                c_zeros = torch.zeros(
                    self.num_layers * num_directions,
                    max_batch_size,
                    self.hidden_size,
                    dtype=input.dtype,
                    device=input.device,
                )
                hx = (h_zeros, c_zeros)
                self.check_forward_args(input, hx, batch_sizes)
            else:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        msg = (
                            "For batched 3-D input, hx and cx should "
                            f"also be 3-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                        raise RuntimeError(msg)
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        msg = (
                            "For unbatched 2-D input, hx and cx should "
                            f"also be 2-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                        raise RuntimeError(msg)
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                self.check_forward_args(input, hx, batch_sizes)
                _check_two_states(hx)
                hx = self.permute_hidden(hx, sorted_indices)

        output, h_n, c_n = self._run_stack(input, batch_sizes, hx[0], hx[1])
        hidden = (h_n, c_n)
        if isinstance(orig_input, PackedSequence):
            output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output_packed, self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)


class _LayerNorm:
    """The layer normalization of LayerNormLSTM / LayerNormGRU (Ba et al. 2016): per layer and
    direction, a gain (starting at 1) and a bias (starting at 0), as in torch.nn.LayerNorm, for
    each normalized quantity: ``layer_norm_ih_{weight,bias}_l{k}[_reverse]`` of x W_ih^T and
    ``layer_norm_hh_...`` of h_{t-1} W_hh^T ([G * hidden_size], over all gates of a row), and for the
    LSTM ``layer_norm_cell_...`` of the cell state ([hidden_size]). torch.nn's parameters keep
    their names and meaning (bias_ih / bias_hh add after the normalization)."""

    _NORMALIZED = ("ih", "hh")

    def __init__(self, *args, **kwargs):
        eps = kwargs.pop("layer_norm_eps", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Number) or not eps >= 0:
            raise ValueError(f"layer_norm_eps must be a non-negative number, got {eps!r}")
        super().__init__(*args, **kwargs)  # rnnfused.LSTM / GRU
        self._make_layer_norm_parameters(float(eps), self.weight_ih_l0.device, self.weight_ih_l0.dtype)

    def _make_layer_norm_parameters(self, eps, device, dtype):
        self.layer_norm_eps = eps
        gates = {"LSTM": 4, "GRU": 3}[self.mode]
        width = {"ih": gates * self.hidden_size, "hh": gates * self.hidden_size, "cell": self.hidden_size}
        names = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]:
                for what in self._NORMALIZED:
                    for kind in ("weight", "bias"):
                        name = f"layer_norm_{what}_{kind}_l{layer}{suffix}"
                        setattr(self, name, nn.Parameter(torch.empty(width[what], device=device, dtype=dtype)))
                        names.append(name)
        self._layer_norm_names = names
        self._reset_layer_norm()

    def _reset_layer_norm(self):
        with torch.no_grad():
            for name in getattr(self, "_layer_norm_names", ()):
                getattr(self, name).fill_(1.0 if "_weight_" in name else 0.0)

    def reset_parameters(self):
        nn.RNNBase.reset_parameters(self)  # every parameter uniform, as torch.nn's
        self._reset_layer_norm()  # then the normalizations' gains 1 and biases 0

    def extra_repr(self):
        text = _FusedStack.extra_repr(self)
        if self.layer_norm_eps != 1e-5:
            text += f", layer_norm_eps={self.layer_norm_eps}"
        return text

    def _layer_norm_parameters(self, index):
        """(gain, bias) pairs of layer-direction ``index``, in the order of _NORMALIZED, flattened."""
        directions = 2 if self.bidirectional else 1
        layer, suffix = index // directions, ("", "_reverse")[index % directions]
        return [getattr(self, f"layer_norm_{what}_{kind}_l{layer}{suffix}") for what in self._NORMALIZED
                for kind in ("weight", "bias")]

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"rnnfused.{type(self).__name__} cannot be compiled by torch.jit.script (TorchScript has no form of it); "
            "use torch.compile or torch.export"
        )

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            raise RuntimeError(
                f"rnnfused.{type(self).__name__} cannot be exported to ONNX: ONNX has no LayerNorm recurrent operator "
                "(torch.export can capture it)"
            )
        return super().forward(input, hx)


class LayerNormLSTM(_LayerNorm, LSTM):
    """LSTM with layer normalization (Ba et al. 2016): rnnfused.LSTM's constructor and forward, plus
    keyword-only ``layer_norm_eps`` (1e-5). Per layer and direction, with LN(v) = (v - mean(v)) /
    sqrt(var(v) + eps) over a row's values:

        gates = LN(x W_ih^T) g_ih + b'_ih + b_ih + LN(h_{t-1} W_hh^T) g_hh + b'_hh + b_hh
        i, f, g, o as torch.nn.LSTM's from gates;   c_t = f c_{t-1} + i g
        h_t = o tanh(LN(c_t) g_cell + b'_cell)          (times W_hr^T with proj_size)

    (g, b': the ``layer_norm_*_weight`` / ``_bias`` parameters)."""

    _NORMALIZED = ("ih", "hh", "cell")

    def _run_layer(self, layer_input, index, h0, c0, batch_sizes, reverse, draws=(None, None, None, None)):
        w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_parameters(index)
        dropped_w_hh, mask, keep_h, keep_c = draws
        if dropped_w_hh is not None:
            w_hh = dropped_w_hh
        return rf.layer_norm_lstm_layer(layer_input, w_ih, w_hh, b_ih, b_hh, *self._layer_norm_parameters(index), h0,
                                        c0, batch_sizes, reverse, training=self.training, eps=self.layer_norm_eps,
                                        recurrent_mask=mask, zoneout=keep_h, cell_zoneout=keep_c, w_hr=w_hr)


class LayerNormGRU(_LayerNorm, GRU):
    """GRU with layer normalization (Ba et al. 2016): rnnfused.GRU's constructor and forward, plus
    keyword-only ``layer_norm_eps`` (1e-5). Per layer and direction:

        xg = LN(x W_ih^T) g_ih + b'_ih + b_ih          hh = LN(h_{t-1} W_hh^T) g_hh + b'_hh + b_hh
        r, z, n, h_t from xg and hh as torch.nn.GRU's (n = tanh(xg_n + r hh_n))"""

    def _run_layer(self, layer_input, index, h0, c0, batch_sizes, reverse, draws=(None, None, None, None)):
        w_ih, w_hh, b_ih, b_hh, _ = self._layer_parameters(index)
        dropped_w_hh, mask, keep_h, _ = draws
        if dropped_w_hh is not None:
            w_hh = dropped_w_hh
        return rf.layer_norm_gru_layer(layer_input, w_ih, w_hh, b_ih, b_hh, *self._layer_norm_parameters(index), h0,
                                       batch_sizes, reverse, training=self.training, eps=self.layer_norm_eps,
                                       recurrent_mask=mask, zoneout=keep_h)


def _check_two_states(hx):
    if len(hx) != 2:
        raise RuntimeError("lstm expects two hidden states")


# ----------------------------------------------------------------------------------------------
# Cells: one step of the same ops (T = 1). Shape checks and messages are ATen's for the cells.
# ----------------------------------------------------------------------------------------------


# The cells' checks and their zero-width state are written in TorchScript's subset of Python:
# rnnfused/_script.py's TorchScript cells call them too.


def _check_cell_input(input: torch.Tensor, weight_ih: torch.Tensor):
    if input.size(1) != weight_ih.size(1):
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {weight_ih.size(1)}")


def _check_cell_hidden(input: torch.Tensor, hx: torch.Tensor, hidden_size: int, label: str):
    if input.size(0) != hx.size(0):
        raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{label} batch size {hx.size(0)}")
    if hx.size(1) != hidden_size:
        raise RuntimeError(f"hidden{label} has inconsistent hidden_size: got {hx.size(1)}, expected {hidden_size}")


def _zero_width_state(input: torch.Tensor, weight_ih: torch.Tensor, bias_ih: Optional[torch.Tensor],
                      weight_hh: torch.Tensor, bias_hh: Optional[torch.Tensor], state: torch.Tensor) -> torch.Tensor:
    """A cell's next state when hidden_size is 0 (torch.nn accepts it): [B, 0], connected to the
    input, every weight and the state in autograd as torch.nn's is (every gradient is zero or
    empty)."""
    return F.linear(input, weight_ih, bias_ih) + F.linear(state, weight_hh, bias_hh) + state


def _cell_options(name, kwargs):
    """The zoneout options of a cell (one step: a fresh draw per call, as per step in a layer);
    recurrent dropout and DropConnect act over a whole sequence and are refused."""
    for option in ("recurrent_dropout", "dropconnect"):
        if option in kwargs:
            raise TypeError(
                f"{name} does not take {option}: it draws one mask per sequence (recurrent_dropout) or per call over "
                f"all steps (dropconnect), and a cell runs one step; use rnnfused.{name[:-4]} over the sequence"
            )
    mode = {"LSTMCell": "LSTM", "GRUCell": "GRU", "RNNCell": "RNN"}[name]
    options = _pop_recurrent_options(kwargs, mode)
    return {"zoneout": options["zoneout"], "cell_zoneout": options["cell_zoneout"]}


class _CellOptions:
    """Zoneout of the cells (class-level defaults off, for modules converted in place)."""

    zoneout = 0.0
    cell_zoneout = 0.0

    def extra_repr(self):
        text = super().extra_repr()
        for name in ("zoneout", "cell_zoneout"):
            if getattr(self, name):
                text += f", {name}={getattr(self, name)}"
        return text


class RNNCell(_CellOptions, nn.RNNCell):
    __doc__ = "rnnfused's drop-in for :class:`torch.nn.RNNCell`.\n\n" + (nn.RNNCell.__doc__ or "")

    def __init__(self, *args, **kwargs):
        options = _cell_options("RNNCell", kwargs)
        super().__init__(*args, **kwargs)
        self.zoneout, self.cell_zoneout = options["zoneout"], options["cell_zoneout"]

    def __prepare_scriptable__(self):
        # torch.jit.script compiles a TorchScript form sharing this module's state (_script.py).
        from . import _script

        return _script.prepare_scriptable(self)

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            _check_export_options(self)
            return nn.RNNCell.forward(self, input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        else:
            hx = hx.unsqueeze(0) if not is_batched else hx
        if self.nonlinearity == "tanh":
            layer = rf.rnn_tanh_layer
        elif self.nonlinearity == "relu":
            layer = rf.rnn_relu_layer
        else:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        _check_cell_input(input, self.weight_ih)
        _check_cell_hidden(input, hx, self.weight_hh.size(1), "0")
        if self.hidden_size == 0:
            ret = _zero_width_state(input, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh, hx)
        else:
            ret, _ = layer(input, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, hx,
                           zoneout=_zoneout_keep(self.zoneout, self.training, input.shape[0], hx))
        if not is_batched:
            ret = ret.squeeze(0)
        return ret


class GRUCell(_CellOptions, nn.GRUCell):
    __doc__ = "rnnfused's drop-in for :class:`torch.nn.GRUCell`.\n\n" + (nn.GRUCell.__doc__ or "")

    def __init__(self, *args, **kwargs):
        options = _cell_options("GRUCell", kwargs)
        super().__init__(*args, **kwargs)
        self.zoneout, self.cell_zoneout = options["zoneout"], options["cell_zoneout"]

    def __prepare_scriptable__(self):
        # torch.jit.script compiles a TorchScript form sharing this module's state (_script.py).
        from . import _script

        return _script.prepare_scriptable(self)

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            _check_export_options(self)
            return nn.GRUCell.forward(self, input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        else:
            hx = hx.unsqueeze(0) if not is_batched else hx
        _check_cell_input(input, self.weight_ih)
        _check_cell_hidden(input, hx, self.weight_hh.size(1), "0")
        if self.hidden_size == 0:
            ret = _zero_width_state(input, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh, hx)
        else:
            ret, _ = rf.gru_layer(
                input, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, hx, training=self.training,
                zoneout=_zoneout_keep(self.zoneout, self.training, input.shape[0], hx),
            )
        if not is_batched:
            ret = ret.squeeze(0)
        return ret


class LSTMCell(_CellOptions, nn.LSTMCell):
    __doc__ = "rnnfused's drop-in for :class:`torch.nn.LSTMCell`.\n\n" + (nn.LSTMCell.__doc__ or "")

    def __init__(self, *args, **kwargs):
        options = _cell_options("LSTMCell", kwargs)
        super().__init__(*args, **kwargs)
        self.zoneout, self.cell_zoneout = options["zoneout"], options["cell_zoneout"]

    def __prepare_scriptable__(self):
        # torch.jit.script compiles a TorchScript form sharing this module's state (_script.py).
        from . import _script

        return _script.prepare_scriptable(self)

    def forward(self, input, hx=None):
        if _exporting_to_onnx():
            _check_export_options(self)
            return nn.LSTMCell.forward(self, input, hx)
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        else:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if not is_batched else hx
        if len(hx) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
        _check_cell_input(input, self.weight_ih)
        _check_cell_hidden(input, hx[0], self.weight_hh.size(1), "0")
        _check_cell_hidden(input, hx[1], self.weight_hh.size(1), "1")
        if self.hidden_size == 0:
            h = _zero_width_state(input, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh, hx[0])
            c = _zero_width_state(input, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh, hx[1])
        else:
            h, _, c = rf.lstm_layer(
                input, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None, hx[0], hx[1],
                training=self.training, zoneout=_zoneout_keep(self.zoneout, self.training, input.shape[0], hx[0]),
                cell_zoneout=_zoneout_keep(self.cell_zoneout, self.training, input.shape[0], hx[1]),
            )
        if input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # torch.nn.LSTMCell under CPU autocast: its gates run in the autocast dtype, but
            # c' = f * c + i * g promotes to the state's dtype, and so does h' = o * tanh(c').
            state_dtype = torch.promote_types(hx[1].dtype, h.dtype)
            h, c = h.to(state_dtype), c.to(state_dtype)
        ret = (h, c)
        if not is_batched:
            ret = (ret[0].squeeze(0), ret[1].squeeze(0))
        return ret
