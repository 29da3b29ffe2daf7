"""TorchScript forms of rnnfused's modules, for ``torch.jit.script``.

The eager modules (rnnfused/modules.py) are written for Python and torch.compile, not for the
TorchScript compiler. ``torch.jit.script`` asks every module for ``__prepare_scriptable__()``
first; rnnfused's modules answer with themselves, their class switched to one of the subclasses
below (the same object: the same Parameter objects, buffers, hooks and flags), so the scripted
module has torch.nn's parameter names and ``state_dict``. From Python their ``forward`` is the
eager class's (the module behaves exactly as before); what TorchScript compiles is torch.nn's
forward written in TorchScript's subset of Python, with torch.nn's ATen RNN call replaced by
rnnfused's registered ops (``torch.ops.rnnfused.*``), which TorchScript calls through the
dispatcher (CPU and CUDA kernels, autograd). As for torch.nn.LSTM, GRU and RNN, whose scripted
``forward`` is overloaded (Tensor or PackedSequence input), a scripted layer is called from a
scripted parent module; the scripted cells can be called directly. A saved scripted model needs
``import rnnfused`` in the process that loads it (as any model with custom ops does).
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import _ops  # noqa: F401  (registers the ops' autograd)
from . import modules
from .modules import _check_cell_hidden, _check_cell_input, _zero_width_state



def _project_summed_bias(input: Tensor, w_ih: Tensor, b_ih: Optional[Tensor],
                         b_hh: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """rnnfused.functional's projection for the LSTM and the Elman RNN: x W_ih^T, and b_ih + b_hh
    for the op to add at every step (float32 outside autocast, and float64)."""
    device = input.device.type
    if input.dtype == torch.float64:
        summed = True
    elif input.dtype == torch.float32:
        # TorchScript knows the per-device forms of torch.is_autocast_enabled(device).
        if device == "cpu":
            summed = not torch.is_autocast_cpu_enabled()
        elif device == "cuda":
            summed = not torch.is_autocast_enabled()
        else:
            summed = True
    else:
        summed = False
    if b_ih is None or b_hh is None or not summed:
        return F.linear(input, w_ih, b_ih), b_hh
    return F.linear(input, w_ih), b_ih + b_hh


def _run_layer(
    mode: str, weights: List[Tensor], has_bias: bool, proj_size: int, layer_input: Tensor,
    batch_sizes: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], reverse: bool, training: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer and direction: the input projection and rnnfused's recurrence op."""
    b_ih: Optional[Tensor] = None
    b_hh: Optional[Tensor] = None
    if has_bias:
        b_ih = weights[2]
        b_hh = weights[3]
    if mode == "GRU":
        gates_x = F.linear(layer_input, weights[0], b_ih)
        bias = b_hh
    else:
        gates_x, bias = _project_summed_bias(layer_input, weights[0], b_ih, b_hh)
    w_hh = weights[1]
    # The workspace for backward is kept where a backward can follow (as rnnfused.functional does).
    record = training and torch.is_grad_enabled()
    if mode == "LSTM":
        w_hr: Optional[Tensor] = None
        if proj_size > 0:
            w_hr = weights[len(weights) - 1]
        assert c0 is not None
        out, h_n, c_n, _ = torch.ops.rnnfused.lstm_recurrence(gates_x, w_hh, bias, w_hr, h0, c0, batch_sizes, reverse, record)
        return out, h_n, c_n
    if mode == "GRU":
        out, h_n, _ = torch.ops.rnnfused.gru_recurrence(gates_x, w_hh, b_hh, h0, batch_sizes, reverse, record)
        return out, h_n, None
    if mode == "RNN_TANH":
        out, h_n = torch.ops.rnnfused.rnn_tanh_recurrence(gates_x, w_hh, bias, h0, batch_sizes, reverse)
        return out, h_n, None
    out, h_n = torch.ops.rnnfused.rnn_relu_recurrence(gates_x, w_hh, bias, h0, batch_sizes, reverse)
    return out, h_n, None


def _run_stack(
    mode: str, flat_weights: List[Tensor], has_bias: bool, num_layers: int, bidirectional: bool, proj_size: int,
    dropout: float, training: bool, batch_first: bool, input: Tensor, batch_sizes: Optional[Tensor], h0: Tensor,
    c0: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The stacked layers (rnnfused.modules._FusedStack._run_stack, in TorchScript): input padded
    [T, B, I] ([B, T, I] with batch_first) or packed rows [N, I]."""
    steps = 0
    batch = 0
    if batch_sizes is None:
        steps_first = input.transpose(0, 1) if batch_first else input
        steps = steps_first.size(0)
        batch = steps_first.size(1)
        if steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        layer_input = steps_first.reshape(steps * batch, steps_first.size(2))
    else:
        layer_input = input
    num_directions = 2 if bidirectional else 1
    per_layer = len(flat_weights) // (num_layers * num_directions)
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    for layer in range(num_layers):
        outputs: List[Tensor] = []
        for direction in range(num_directions):
            index = layer * num_directions + direction
            c0_index: Optional[Tensor] = None
            if c0 is not None:
                c0_index = c0[index]
            out, h, c = _run_layer(
                mode, flat_weights[index * per_layer : (index + 1) * per_layer], has_bias, proj_size, layer_input,
                batch_sizes, h0[index], c0_index, direction == 1, training,
            )
            outputs.append(out)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        layer_output = outputs[0] if num_directions == 1 else torch.cat(outputs, 1)
        if dropout != 0 and training and layer < num_layers - 1:
            layer_output = F.dropout(layer_output, dropout, True)
        layer_input = layer_output
    output = layer_input
    if batch_sizes is None:
        output = output.view(steps, batch, output.size(1))
        if batch_first:
            output = output.transpose(0, 1).contiguous()
    c_out: Optional[Tensor] = None
    if len(c_n) > 0:
        c_out = torch.stack(c_n, 0)
    return output, torch.stack(h_n, 0), c_out


class _StackMixin:
    def _stack(self, input: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Optional[Tensor]):
        return _run_stack(
            self.mode, self._flat_weights, self.bias, self.num_layers, self.bidirectional, self.proj_size,
            self.dropout, self.training, self.batch_first, input, batch_sizes, h0, c0,
        )


class ScriptLSTM(_StackMixin, modules.LSTM):
    """rnnfused.LSTM for TorchScript (see the module docstring)."""

    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:  # noqa: E501
        pass

    @torch._jit_internal._overload_method  # noqa: F811
    def forward(  # noqa: F811
        self, input: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        pass

    def forward(self, input, hx=None):  # noqa: F811
        if not torch.jit.is_scripting():
            return modules.LSTM.forward(self, input, hx)  # in Python: the eager module's forward
        orig_input = input
        batch_sizes = None
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = batch_sizes[0]
            if hx is None:
                h_zeros = torch.zeros(self.num_layers * num_directions, max_batch_size, real_hidden_size,
                                      dtype=input.dtype, device=input.device)
                c_zeros = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                                      dtype=input.dtype, device=input.device)
                hx = (h_zeros, c_zeros)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(input, hx, batch_sizes)
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
                h_zeros = torch.zeros(self.num_layers * num_directions, max_batch_size, real_hidden_size,
                                      dtype=input.dtype, device=input.device)
                c_zeros = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                                      dtype=input.dtype, device=input.device)
                hx = (h_zeros, c_zeros)
                self.check_forward_args(input, hx, batch_sizes)
            else:
                if is_batched:
                    if hx[0].dim() != 3 or hx[1].dim() != 3:
                        msg = ("For batched 3-D input, hx and cx should "
                               f"also be 3-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                        raise RuntimeError(msg)
                else:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        msg = ("For unbatched 2-D input, hx and cx should "
                               f"also be 2-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                        raise RuntimeError(msg)
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
                self.check_forward_args(input, hx, batch_sizes)
                hx = self.permute_hidden(hx, sorted_indices)
        output, h_n, c_n = self._stack(input, batch_sizes, hx[0], hx[1])
        assert c_n is not None
        hidden = (h_n, c_n)
        if isinstance(orig_input, PackedSequence):
            output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output_packed, self.permute_hidden(hidden, unsorted_indices)
        else:
            if not is_batched:
                output = output.squeeze(batch_dim)
                hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
            return output, self.permute_hidden(hidden, unsorted_indices)


class ScriptGRU(_StackMixin, modules.GRU):
    """rnnfused.GRU for TorchScript (see the module docstring)."""

    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        pass

    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: PackedSequence, hx: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]:  # noqa: F811
        pass

    def forward(self, input, hx=None):  # noqa: F811
        if not torch.jit.is_scripting():
            return modules.GRU.forward(self, input, hx)  # in Python: the eager module's forward
        orig_input = input
        num_directions = 2 if self.bidirectional else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = batch_sizes[0]
            if hx is None:
                hx = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                                 dtype=input.dtype, device=input.device)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            batch_sizes = None
            if input.dim() not in (2, 3):
                raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            else:
                if hx is not None and hx.dim() != 3:
                    raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = None
            unsorted_indices = None
            if hx is None:
                hx = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                                 dtype=input.dtype, device=input.device)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(input, hx, batch_sizes)
        output, hidden, _ = self._stack(input, batch_sizes, hx, None)
        if isinstance(orig_input, PackedSequence):
            output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output_packed, self.permute_hidden(hidden, unsorted_indices)
        else:
            if not is_batched:
                output = output.squeeze(batch_dim)
                hidden = hidden.squeeze(1)
            return output, self.permute_hidden(hidden, unsorted_indices)


class ScriptRNN(_StackMixin, modules.RNN):
    """rnnfused.RNN for TorchScript (see the module docstring)."""

    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        pass

    @torch._jit_internal._overload_method  # noqa: F811
    def forward(self, input: PackedSequence, hx: Optional[Tensor] = None) -> Tuple[PackedSequence, Tensor]:  # noqa: F811
        pass

    def forward(self, input, hx=None):  # noqa: F811
        if not torch.jit.is_scripting():
            return modules.RNN.forward(self, input, hx)  # in Python: the eager module's forward
        orig_input = input
        num_directions = 2 if self.bidirectional else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = batch_sizes[0]
            if hx is None:
                hx = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                                 dtype=input.dtype, device=input.device)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            batch_sizes = None
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            else:
                if hx is not None and hx.dim() != 3:
                    raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = None
            unsorted_indices = None
            if hx is None:
                hx = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                                 dtype=input.dtype, device=input.device)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(input, hx, batch_sizes)
        output, hidden, _ = self._stack(input, batch_sizes, hx, None)
        if isinstance(orig_input, PackedSequence):
            output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output_packed, self.permute_hidden(hidden, unsorted_indices)
        else:
            if not is_batched:
                output = output.squeeze(batch_dim)
                hidden = hidden.squeeze(1)
            return output, self.permute_hidden(hidden, unsorted_indices)


# ----------------------------------------------------------------------------------------------
# Cells: one step of the same ops, with the eager cells' own checks (modules.py). The layers'
# TorchScript forward methods above are written out per class: TorchScript binds a forward's
# overloads (Tensor / PackedSequence input) to the class that defines them.
# ----------------------------------------------------------------------------------------------


class ScriptRNNCell(modules.RNNCell):
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if not torch.jit.is_scripting():
            return modules.RNNCell.forward(self, input, hx)  # in Python: the eager module's forward
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
        _check_cell_input(input, self.weight_ih)
        _check_cell_hidden(input, hx, self.weight_hh.size(1), "0")
        if self.hidden_size == 0:
            ret = _zero_width_state(input, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh, hx)
        else:
            gates_x, bias = _project_summed_bias(input, self.weight_ih, self.bias_ih, self.bias_hh)
            if self.nonlinearity == "tanh":
                ret, _ = torch.ops.rnnfused.rnn_tanh_recurrence(gates_x, self.weight_hh, bias, hx, None, False)
            elif self.nonlinearity == "relu":
                ret, _ = torch.ops.rnnfused.rnn_relu_recurrence(gates_x, self.weight_hh, bias, hx, None, False)
            else:
                raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        if not is_batched:
            ret = ret.squeeze(0)
        return ret


class ScriptGRUCell(modules.GRUCell):
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if not torch.jit.is_scripting():
            return modules.GRUCell.forward(self, input, hx)  # in Python: the eager module's forward
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
            gates_x = F.linear(input, self.weight_ih, self.bias_ih)
            record = self.training and torch.is_grad_enabled()
            ret, _, _ = torch.ops.rnnfused.gru_recurrence(gates_x, self.weight_hh, self.bias_hh, hx, None, False, record)
        if not is_batched:
            ret = ret.squeeze(0)
        return ret


class ScriptLSTMCell(modules.LSTMCell):
    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if not torch.jit.is_scripting():
            return modules.LSTMCell.forward(self, input, hx)  # in Python: the eager module's forward
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
        _check_cell_input(input, self.weight_ih)
        _check_cell_hidden(input, hx[0], self.weight_hh.size(1), "0")
        _check_cell_hidden(input, hx[1], self.weight_hh.size(1), "1")
        if self.hidden_size == 0:
            h = _zero_width_state(input, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh, hx[0])
            c = _zero_width_state(input, self.weight_ih, self.bias_ih, self.weight_hh, self.bias_hh, hx[1])
        else:
            gates_x, bias = _project_summed_bias(input, self.weight_ih, self.bias_ih, self.bias_hh)
            record = self.training and torch.is_grad_enabled()
            h, _, c, _ = torch.ops.rnnfused.lstm_recurrence(gates_x, self.weight_hh, bias, None, hx[0], hx[1], None,
                                                            False, record)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


SCRIPT_CLASSES = {
    modules.LSTM: ScriptLSTM,
    modules.GRU: ScriptGRU,
    modules.RNN: ScriptRNN,
    modules.LSTMCell: ScriptLSTMCell,
    modules.GRUCell: ScriptGRUCell,
    modules.RNNCell: ScriptRNNCell,
}


def prepare_scriptable(module: nn.Module) -> nn.Module:
    """``module`` itself, its class switched to the TorchScript form (a subclass whose forward,
    run from Python, is the eager class's, so the module behaves as before), for torch.jit.script
    to compile. A subclass of an rnnfused class, or a parametrized module, is refused: its
    forward or properties would not be what TorchScript compiles."""
    cls = type(module)
    if any(getattr(module, name, 0) for name in ("recurrent_dropout", "dropconnect", "zoneout", "cell_zoneout")):
        raise RuntimeError(
            "rnnfused: torch.jit.script does not support recurrent_dropout, dropconnect or zoneout (the TorchScript "
            "form runs torch.nn's forward); use torch.compile or torch.export, or script a module without them"
        )
    if cls in SCRIPT_CLASSES.values():
        return module
    if cls not in SCRIPT_CLASSES:
        raise RuntimeError(
            f"rnnfused: torch.jit.script supports rnnfused's own classes, not {cls.__qualname__} (a subclass or a "
            "parametrized module, whose forward TorchScript would not see); script the plain module, or use "
            "torch.jit.trace"
        )
    module.__class__ = SCRIPT_CLASSES[cls]
    return module
