"""The implementations a case is measured on ("sides"): rnnfused, torch.nn, on CUDA rnnfused with each
of its two paths forced (standard, persistent), and, when they are
importable, FlashRNN and haste.

Every side of a case gets the same weights (torch.nn's module loads rnnfused's state_dict; the
optional baselines get the same tensors in their own layouts) and the same random input, and is
driven the same way: forward under torch.no_grad(), or forward + backward of
``output.sum() + sum of the final states`` with respect to the input and every weight
(torch.autograd.grad, so no gradient accumulates between iterations).
"""
import dataclasses
import os
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnfused

from .suite import GATES, sequence_lengths

TORCH_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}
RNNFUSED = "rnnfused"
TORCH_NN = "torch.nn"
# On CUDA, rnnfused also runs with each path forced (RNNFUSED_CUDA_PATH): the "rnnfused" column is
# what a user gets (the automatic choice), these show both paths side by side.
CUDA_PATH_SIDES = {"rnnfused standard": "standard", "rnnfused persistent": "persistent"}


@dataclasses.dataclass
class Side:
    """One implementation, ready to time: ``step()`` runs one forward (or forward + backward) and
    returns the output sequence as a [T, B, D] tensor (or packed rows) to check against torch.nn."""

    name: str
    step: Callable[[], torch.Tensor]


class Unsupported(Exception):
    """An optional baseline does not implement this case: its column stays empty for the row."""


def build_modules(case):
    """rnnfused's module and torch.nn's, with the same weights, on the case's device and dtype."""
    shape = case.shape
    kwargs = dict(num_layers=shape.layers, bidirectional=shape.bidirectional)
    if case.cell == "lstm":
        ours_class, ref_class = rnnfused.LSTM, nn.LSTM
        if shape.proj:
            kwargs["proj_size"] = shape.proj
    elif case.cell == "gru":
        ours_class, ref_class = rnnfused.GRU, nn.GRU
    else:
        ours_class, ref_class = rnnfused.RNN, nn.RNN
        kwargs["nonlinearity"] = case.cell.split("_")[1]
    torch.manual_seed(0)
    ours = ours_class(shape.input_size, shape.hidden, **kwargs)
    ref = ref_class(shape.input_size, shape.hidden, **kwargs)
    ref.load_state_dict(ours.state_dict())
    dtype = TORCH_DTYPES[case.dtype]
    return ours.to(case.device, dtype), ref.to(case.device, dtype)


def build_input(case):
    """Random input (torch.randn, fixed seed): a [T, B, I] tensor, or a PackedSequence of it with
    random lengths (enforce_sorted=False). For forward + backward the tensor the modules read
    (the packed rows, when packed) is a leaf that requires grad."""
    shape = case.shape
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape.steps, shape.batch, shape.input_size, generator=generator)
    x = x.to(case.device, TORCH_DTYPES[case.dtype])
    needs_grad = case.mode == "fwdbwd"
    if not shape.packed:
        return x.requires_grad_(needs_grad)
    packed = pack_padded_sequence(x, torch.tensor(sequence_lengths(shape)), enforce_sorted=False)
    rows = packed.data.detach().requires_grad_(needs_grad)
    return PackedSequence(rows, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def _output_and_states(result):
    output, state = result
    if isinstance(output, PackedSequence):
        output = output.data
    return output, state if isinstance(state, tuple) else (state,)


def _loss(output, states):
    # Summed in float32 so that a float16 sum over many elements cannot overflow on either side.
    return output.float().sum() + sum(s.float().sum() for s in states)


def module_step(module, inputs, mode):
    """The timed call of a torch.nn-style module (rnnfused's or torch.nn's)."""
    leaf = inputs.data if isinstance(inputs, PackedSequence) else inputs
    wrt = [leaf] + [p for p in module.parameters() if p.requires_grad]

    if mode == "fwd":

        def step():
            with torch.no_grad():
                output, _ = _output_and_states(module(inputs))
            return output

        return step

    def step():
        output, states = _output_and_states(module(inputs))
        torch.autograd.grad(_loss(output, states), wrt)
        return output.detach()

    return step


def with_cuda_path(path, step):
    """``step`` run with RNNFUSED_CUDA_PATH=path (read by rnnfused's CUDA ops at every call); a path
    that cannot run the case raises, and the runner drops the side with a note."""

    def wrapped():
        saved = os.environ.get("RNNFUSED_CUDA_PATH")
        os.environ["RNNFUSED_CUDA_PATH"] = path
        try:
            return step()
        finally:
            if saved is None:
                os.environ.pop("RNNFUSED_CUDA_PATH", None)
            else:
                os.environ["RNNFUSED_CUDA_PATH"] = saved

    return wrapped


# --- optional baselines ------------------------------------------------------------------------


def _import_optional(module_name):
    try:
        return __import__(module_name), None
    except Exception as error:  # not installed, or broken: simply not measured
        return None, f"{type(error).__name__}: {error}"


def _plain_single_layer(case, what):
    """The optional baselines are single-layer, unidirectional, unpacked, GPU-only layers."""
    shape = case.shape
    if case.device != "cuda":
        raise Unsupported(f"{what} runs on CUDA only")
    if shape.layers != 1 or shape.bidirectional or shape.packed or shape.proj:
        raise Unsupported(f"{what} is measured on single-layer unidirectional unpacked shapes without proj_size")


class FlashRNNBaseline:
    """FlashRNN (github.com/NX-AI/flashrnn): ``flashrnn.flashrnn(Wx, R, b, ...)`` runs the
    recurrence on precomputed input projections, so its timed step includes the input GEMM
    ``Wx = x W_ih^T`` as the other sides do. Gate layouts are mapped so it computes the same
    function as torch.nn (LSTM i,f,g,o; GRU with the reset gate on the recurrent n term; Elman tanh)."""

    name = "flashrnn"
    module_name = "flashrnn"
    FUNCTIONS = {"lstm": "lstm", "gru": "gru", "rnn_tanh": "elman"}

    def __init__(self, package):
        self.package = package

    def side(self, case, ours, inputs):
        _plain_single_layer(case, "FlashRNN")
        if case.cell not in self.FUNCTIONS:
            raise Unsupported(f"FlashRNN has no {case.cell}")
        if case.dtype == "float64":
            raise Unsupported("FlashRNN has no float64 kernels")
        hidden = case.shape.hidden
        w_ih = ours.weight_ih_l0.detach()
        w_hh = ours.weight_hh_l0.detach()
        b_ih, b_hh = ours.bias_ih_l0.detach(), ours.bias_hh_l0.detach()
        gates = GATES[case.cell]
        if case.cell == "gru":
            # FlashRNN's GRU: recurrent blocks (n, r, z), input blocks (r, z, n), biases
            # (b_hn, b_ir + b_hr, b_iz + b_hz, b_in).
            r, z, n = w_hh.chunk(3)
            recurrent = torch.cat([n, r, z]).view(3, 1, hidden, hidden)
            bir, biz, bin_ = b_ih.chunk(3)
            bhr, bhz, bhn = b_hh.chunk(3)
            bias = torch.cat([bhn, bir + bhr, biz + bhz, bin_]).view(4, 1, hidden)
        else:
            recurrent = w_hh.view(gates, 1, hidden, hidden)
            bias = (b_ih + b_hh).view(gates, 1, hidden)
        needs_grad = case.mode == "fwdbwd"
        # Own copies (leaves of their own), so that nothing FlashRNN does can touch rnnfused's weights.
        w_ih = w_ih.clone().requires_grad_(needs_grad)
        recurrent = recurrent.clone().requires_grad_(needs_grad)
        bias = bias.clone().requires_grad_(needs_grad)
        # FlashRNN reads [B, T, ...]; the transpose of the input is made once, outside the timing.
        batch_first_x = inputs.detach().transpose(0, 1).contiguous().requires_grad_(needs_grad)
        function, dtype = self.FUNCTIONS[case.cell], case.dtype
        batch, steps = case.shape.batch, case.shape.steps
        run = self.package.flashrnn

        def forward():
            wx = F.linear(batch_first_x, w_ih).view(batch, steps, gates, 1, hidden)
            states, last = run(wx, recurrent, bias, function=function, backend="cuda_fused", dtype=dtype)
            return states, last

        def to_tbh(states):
            # states: [S, B, T, 1, H]; S=0 is the hidden state
            return states[0, :, :, 0].transpose(0, 1)

        if case.mode == "fwd":

            def step():
                with torch.no_grad():
                    states, _ = forward()
                return to_tbh(states)

        else:
            wrt = [batch_first_x, w_ih, recurrent, bias]

            def step():
                states, last = forward()
                loss = states[0].float().sum() + last.float().sum()
                torch.autograd.grad(loss, wrt)
                return to_tbh(states.detach())

        return Side(self.name, step)


class HasteBaseline:
    """haste (github.com/lmnt-com/haste): ``haste_pytorch.LSTM`` / ``GRU``, weights loaded with
    its ``from_native_weights`` (torch.nn's layout)."""

    name = "haste"
    module_name = "haste_pytorch"

    def __init__(self, package):
        self.package = package

    def side(self, case, ours, inputs):
        _plain_single_layer(case, "haste")
        classes = {"lstm": getattr(self.package, "LSTM", None), "gru": getattr(self.package, "GRU", None)}
        layer_class = classes.get(case.cell)
        if layer_class is None:
            raise Unsupported(f"haste has no {case.cell}")
        if case.dtype == "bfloat16":
            raise Unsupported("haste has no bfloat16 kernels")
        layer = layer_class(case.shape.input_size, case.shape.hidden)
        if hasattr(layer, "from_native_weights"):
            layer.from_native_weights(ours.weight_ih_l0.detach().float(), ours.weight_hh_l0.detach().float(),
                                      ours.bias_ih_l0.detach().float(), ours.bias_hh_l0.detach().float())
        layer = layer.to(case.device, TORCH_DTYPES[case.dtype])
        return Side(self.name, module_step(layer, inputs, case.mode))


OPTIONAL_BASELINES = (FlashRNNBaseline, HasteBaseline)


def optional_baselines():
    """The optional baselines importable here, and a note for each one that is not."""
    found, notes = [], []
    for baseline in OPTIONAL_BASELINES:
        package, error = _import_optional(baseline.module_name)
        if package is None:
            notes.append(f"{baseline.name} not measured: `import {baseline.module_name}` failed ({error})")
        else:
            found.append(baseline(package))
    return found, notes


def build_sides(case, baselines=()):
    """The sides of one case, in the order they are timed (rnnfused, torch.nn, on CUDA rnnfused with
    each path forced, then the optional baselines that implement the case), and notes on optional baselines that failed to set up."""
    ours, ref = build_modules(case)
    inputs = build_input(case)
    sides = [Side(RNNFUSED, module_step(ours, inputs, case.mode)), Side(TORCH_NN, module_step(ref, inputs, case.mode))]
    if case.device == "cuda":
        sides += [Side(name, with_cuda_path(path, module_step(ours, inputs, case.mode)))
                  for name, path in CUDA_PATH_SIDES.items()]
    notes = []
    for baseline in baselines:
        try:
            sides.append(baseline.side(case, ours, inputs))
        except Unsupported:
            pass  # the shape or dtype is outside what the baseline implements: no column entry
        except Exception as error:  # an optional baseline must never stop the suite
            notes.append(f"{baseline.name} failed to set up {case.key}: {type(error).__name__}: {error}")
    return sides, notes
