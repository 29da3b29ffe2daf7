"""Fake kernels and autograd formulas of the C++ ops (the schemas live in csrc/op_schemas.h).

Every forward op is differentiable through its `*_backward` op (the fused kernels). Second (and
higher) derivatives are exact too: the backward ops' own autograd formula is the vector-Jacobian
product of rnnfused/_reference_backward.py, the same backward recurrence written with
differentiable PyTorch operations. A second-order backward sends gradients to the activations the
forward op saved (its workspace, a differentiable output for that reason) and to its output; the
forward op's formula takes the workspace's gradient through the reference as well. None of this
runs unless a derivative of a derivative is asked for: first derivatives cost what they did.

`register(namespace)` registers them for one library of ops with rnnfused's schemas:
``rnnfused`` (the CPU and CUDA kernels), and ``rnnfused_sim`` in the test build of the CUDA path on
the CUDA simulator (rnnfused/_sim.py).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library that defines the ops)
from . import _reference_backward as reference
from . import _reference_layer_norm as reference_layer_norm

# Columns per row of the workspace (see csrc/recurrence.h).
LSTM_WORKSPACE_GATES = 5
GRU_WORKSPACE_GATES = 4


def compute_dtype(dtype):
    """The dtype the recurrence computes and keeps its workspace in."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fake_workspace(gates_x, training, gates, hidden):
    shape = (gates_x.shape[0], gates * hidden) if training else (0,)
    return gates_x.new_empty(shape, dtype=compute_dtype(gates_x.dtype))


def register(namespace):
    """Fake kernels and autograd of the ops ``<namespace>::*`` (rnnfused's schemas)."""
    _ops = getattr(torch.ops, namespace)

    # ----------------------------------------------------------------------------------------------
    # Fake (meta) kernels: shapes and dtypes only, for torch.compile, FakeTensor and the meta device.
    # ----------------------------------------------------------------------------------------------

    @torch.library.register_fake(f"{namespace}::lstm_recurrence")
    def _lstm_fake(gates_x, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse, training, recurrent_mask=None, zoneout=None,
                   cell_zoneout=None):
        hidden = gates_x.shape[1] // 4
        output = gates_x.new_empty((gates_x.shape[0], w_hh.shape[1]))
        workspace = _fake_workspace(gates_x, training, LSTM_WORKSPACE_GATES, hidden)
        return output, torch.empty_like(h0, memory_format=torch.contiguous_format), torch.empty_like(
            c0, memory_format=torch.contiguous_format
        ), workspace

    @torch.library.register_fake(f"{namespace}::lstm_recurrence_backward")
    def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, w_hh, w_hr, h0, c0, output, workspace, batch_sizes, reverse,
                            recurrent_mask=None, zoneout=None, cell_zoneout=None):
        hidden = w_hh.shape[0] // 4
        return (
            output.new_empty((output.shape[0], 4 * hidden)),
            output.new_empty(w_hh.shape),
            output.new_empty((4 * hidden,)),
            output.new_empty(w_hr.shape if w_hr is not None else (0,)),
            output.new_empty(h0.shape),
            output.new_empty(c0.shape),
        )

    @torch.library.register_fake(f"{namespace}::gru_recurrence")
    def _gru_fake(gates_x, w_hh, b_hh, h0, batch_sizes, reverse, training, recurrent_mask=None, zoneout=None):
        hidden = gates_x.shape[1] // 3
        output = gates_x.new_empty((gates_x.shape[0], hidden))
        workspace = _fake_workspace(gates_x, training, GRU_WORKSPACE_GATES, hidden)
        return output, torch.empty_like(h0, memory_format=torch.contiguous_format), workspace

    def _gated_backward_fake(gates, grad_output, grad_h_n, w_hh, h0, output):
        hidden = output.shape[1]
        return (
            output.new_empty((output.shape[0], gates * hidden)),
            output.new_empty(w_hh.shape),
            output.new_empty((gates * hidden,)),
            output.new_empty(h0.shape),
        )

    @torch.library.register_fake(f"{namespace}::gru_recurrence_backward")
    def _gru_backward_fake(grad_output, grad_h_n, w_hh, h0, output, workspace, batch_sizes, reverse,
                           recurrent_mask=None, zoneout=None):
        return _gated_backward_fake(3, grad_output, grad_h_n, w_hh, h0, output)

    def _rnn_fake(gates_x, w_hh, b_hh, h0, batch_sizes, reverse, recurrent_mask=None, zoneout=None):
        output = gates_x.new_empty((gates_x.shape[0], gates_x.shape[1]))
        return output, torch.empty_like(h0, memory_format=torch.contiguous_format)

    def _rnn_backward_fake(grad_output, grad_h_n, w_hh, h0, output, batch_sizes, reverse, recurrent_mask=None,
                           zoneout=None, gates_x=None, b_hh=None):
        return _gated_backward_fake(1, grad_output, grad_h_n, w_hh, h0, output)

    for _act in ("tanh", "relu"):
        torch.library.register_fake(f"{namespace}::rnn_{_act}_recurrence")(_rnn_fake)
        torch.library.register_fake(f"{namespace}::rnn_{_act}_recurrence_backward")(_rnn_backward_fake)

    # ----------------------------------------------------------------------------------------------
    # The first-order backward with a gradient at the workspace (second-order backward only): the
    # reference recurrence as an op of its own, so that a traced graph (torch.compile, opcheck)
    # holds one opaque call instead of a Python loop over data-dependent batch sizes.
    # ----------------------------------------------------------------------------------------------

    def _fresh(tensors):
        # A custom op's outputs must not alias its inputs (the reference may return one as is).
        return tuple(t.clone() for t in tensors)

    @torch.library.custom_op(f"{namespace}::lstm_workspace_backward", mutates_args=())
    def _lstm_workspace_backward(
        grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor], grad_workspace: Tensor,
        w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor, output: Tensor, workspace: Tensor,
        batch_sizes: Optional[Tensor], reverse: bool, recurrent_mask: Optional[Tensor] = None,
        zoneout: Optional[Tensor] = None, cell_zoneout: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _fresh(reference.lstm_backward(grad_output, grad_h_n, grad_c_n, grad_workspace, w_hh, w_hr, h0, c0,
                                              output, workspace, batch_sizes, reverse, recurrent_mask, zoneout,
                                              cell_zoneout))

    @_lstm_workspace_backward.register_fake
    def _(grad_output, grad_h_n, grad_c_n, grad_workspace, w_hh, w_hr, h0, c0, output, workspace, batch_sizes, reverse,
          recurrent_mask=None, zoneout=None, cell_zoneout=None):
        return _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, w_hh, w_hr, h0, c0, output, workspace, batch_sizes,
                                   reverse)

    @torch.library.custom_op(f"{namespace}::gru_workspace_backward", mutates_args=())
    def _gru_workspace_backward(
        grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], grad_workspace: Tensor, w_hh: Tensor, h0: Tensor,
        output: Tensor, workspace: Tensor, batch_sizes: Optional[Tensor], reverse: bool,
        recurrent_mask: Optional[Tensor] = None, zoneout: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return _fresh(reference.gru_backward(grad_output, grad_h_n, grad_workspace, w_hh, h0, output, workspace,
                                             batch_sizes, reverse, recurrent_mask, zoneout))

    @_gru_workspace_backward.register_fake
    def _(grad_output, grad_h_n, grad_workspace, w_hh, h0, output, workspace, batch_sizes, reverse,
          recurrent_mask=None, zoneout=None):
        return _gated_backward_fake(3, grad_output, grad_h_n, w_hh, h0, output)

    def _no_third_derivative(ctx, *grads):
        raise RuntimeError(_THIRD_ORDER_MESSAGE)

    def _no_context(ctx, inputs, output):
        pass

    for _op in (_lstm_workspace_backward, _gru_workspace_backward):
        _op.register_autograd(_no_third_derivative, setup_context=_no_context)

    # ----------------------------------------------------------------------------------------------
    # Autograd. Gradients of unused outputs arrive as None (no zero tensors are made for them) and
    # the C++ backward reads None as zero.
    # ----------------------------------------------------------------------------------------------

    def _lstm_setup_context(ctx, inputs, output):
        gates_x, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse, training = inputs[:9]
        extras = (_at(inputs, 9), _at(inputs, 10), _at(inputs, 11))  # recurrent_mask, zoneout, cell_zoneout
        out, _, _, workspace = output
        ctx.reverse = reverse
        ctx.has_bias = b_hh is not None
        ctx.has_projection = w_hr is not None
        ctx.recorded = training
        # A call with training=False kept no workspace; its backward recomputes the forward pass
        # (with training=True) from the saved inputs instead of failing.
        recompute_from = (gates_x, b_hh) if not training else (None, None)
        ctx.save_for_backward(w_hh, w_hr, h0, c0, out, workspace, batch_sizes, *extras, *recompute_from)
        ctx.set_materialize_grads(False)

    def _lstm_backward(ctx, grad_output, grad_h_n, grad_c_n, grad_workspace):
        w_hh, w_hr, h0, c0, out, workspace, batch_sizes, mask, k_h, k_c, gates_x, b_hh = ctx.saved_tensors
        if not ctx.recorded:
            out, _, _, workspace = _ops.lstm_recurrence(gates_x, w_hh, b_hh, w_hr, h0, c0, batch_sizes, ctx.reverse, True,
                                                        mask, k_h, k_c)
        if _has_grad(grad_workspace):  # only in a second-order backward (see the module docstring)
            grads = _ops.lstm_workspace_backward(grad_output, grad_h_n, grad_c_n, grad_workspace, w_hh, w_hr, h0, c0,
                                                 out, workspace, batch_sizes, ctx.reverse, mask, k_h, k_c)
        else:
            grads = _ops.lstm_recurrence_backward(
                grad_output, grad_h_n, grad_c_n, w_hh, w_hr, h0, c0, out, workspace, batch_sizes, ctx.reverse, mask,
                k_h, k_c,
            )
        grad_gx, grad_w_hh, grad_b_hh, grad_w_hr, grad_h0, grad_c0 = grads
        return (
            grad_gx,
            grad_w_hh,
            grad_b_hh if ctx.has_bias else None,
            grad_w_hr if ctx.has_projection else None,
            grad_h0,
            grad_c0,
            None,
            None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd(
        f"{namespace}::lstm_recurrence", _lstm_backward, setup_context=_lstm_setup_context
    )

    def _gru_setup_context(ctx, inputs, output):
        gates_x, w_hh, b_hh, h0, batch_sizes, reverse, training = inputs[:7]
        extras = (_at(inputs, 7), _at(inputs, 8))  # recurrent_mask, zoneout
        out, _, workspace = output
        ctx.reverse = reverse
        ctx.has_bias = b_hh is not None
        ctx.recorded = training
        recompute_from = (gates_x, b_hh) if not training else (None, None)  # as for the LSTM
        ctx.save_for_backward(w_hh, h0, out, workspace, batch_sizes, *extras, *recompute_from)
        ctx.set_materialize_grads(False)

    def _gru_backward(ctx, grad_output, grad_h_n, grad_workspace):
        w_hh, h0, out, workspace, batch_sizes, mask, k_h, gates_x, b_hh = ctx.saved_tensors
        if not ctx.recorded:
            out, _, workspace = _ops.gru_recurrence(gates_x, w_hh, b_hh, h0, batch_sizes, ctx.reverse, True, mask, k_h)
        if _has_grad(grad_workspace):  # only in a second-order backward
            grads = _ops.gru_workspace_backward(grad_output, grad_h_n, grad_workspace, w_hh, h0, out, workspace,
                                                batch_sizes, ctx.reverse, mask, k_h)
        else:
            grads = _ops.gru_recurrence_backward(grad_output, grad_h_n, w_hh, h0, out, workspace, batch_sizes,
                                                 ctx.reverse, mask, k_h)
        grad_gx, grad_w_hh, grad_b_hh, grad_h0 = grads
        return grad_gx, grad_w_hh, grad_b_hh if ctx.has_bias else None, grad_h0, None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::gru_recurrence", _gru_backward, setup_context=_gru_setup_context)

    def _rnn_setup_context(ctx, inputs, output):
        gates_x, w_hh, b_hh, h0, batch_sizes, reverse = inputs[:6]
        mask, keep = _at(inputs, 6), _at(inputs, 7)
        out, _ = output
        ctx.reverse = reverse
        ctx.has_bias = b_hh is not None
        # With zoneout the backward recomputes the candidates h~ from gates_x and b_hh.
        recompute_from = (gates_x, b_hh) if keep is not None else (None, None)
        ctx.save_for_backward(w_hh, h0, out, batch_sizes, mask, keep, *recompute_from)
        ctx.set_materialize_grads(False)

    def _make_rnn_backward(backward_op):
        def _rnn_backward(ctx, grad_output, grad_h_n):
            w_hh, h0, out, batch_sizes, mask, keep, gates_x, b_hh = ctx.saved_tensors
            grad_gx, grad_w_hh, grad_b_hh, grad_h0 = backward_op(
                grad_output, grad_h_n, w_hh, h0, out, batch_sizes, ctx.reverse, mask, keep, gates_x, b_hh
            )
            return grad_gx, grad_w_hh, grad_b_hh if ctx.has_bias else None, grad_h0, None, None, None, None

        return _rnn_backward

    for _act in ("tanh", "relu"):
        torch.library.register_autograd(
            f"{namespace}::rnn_{_act}_recurrence",
            _make_rnn_backward(getattr(_ops, f"rnn_{_act}_recurrence_backward")),
            setup_context=_rnn_setup_context,
        )

    # The backward ops' own autograd: the vector-Jacobian product of the reference backward
    # (rnnfused/_reference_backward.py) with respect to every input that needs a gradient, computed
    # by autograd on the reference run from detached copies of the saved inputs: the partial
    # derivatives with respect to the backward op's own arguments (output and workspace among them;
    # the engine then carries those into the forward op). Detached, the result is not
    # differentiable again, so a third derivative is refused rather than silently incomplete.
    def _save_inputs(ctx, inputs, output):
        # The backward ops' arguments end with (..., batch_sizes, reverse[, recurrent_mask]).
        reverse_at = next(i for i in range(len(inputs) - 1, -1, -1) if isinstance(inputs[i], bool))
        ctx.reverse = inputs[reverse_at]
        ctx.present = [isinstance(t, torch.Tensor) for t in inputs]
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])

    def _saved_inputs(ctx):
        saved = iter(ctx.saved_tensors)
        return [next(saved) if present else None for present in ctx.present]

    def _vjp(ctx, run_reference, grads):
        inputs = _saved_inputs(ctx)
        wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need and inputs[i] is not None]
        result = [None] * len(inputs)
        if not wanted:
            return tuple(result)
        if torch.is_grad_enabled():
            raise RuntimeError(_THIRD_ORDER_MESSAGE)
        leaves = [t.detach().requires_grad_(i in wanted) if isinstance(t, torch.Tensor) else t
                  for i, t in enumerate(inputs)]
        with torch.enable_grad():
            outputs = run_reference(leaves)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        if not pairs:
            return tuple(result)
        values = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                                     allow_unused=True)
        for i, value in zip(wanted, values):
            result[i] = value
        return tuple(result)

    def _lstm_backward_backward(ctx, *grads):
        def run(a):  # grad_output, grad_h_n, grad_c_n, w_hh, w_hr, h0, c0, output, workspace, batch_sizes, reverse
            return reference.lstm_backward(a[0], a[1], a[2], None, a[3], a[4], a[5], a[6], a[7], a[8], a[9], ctx.reverse,
                                           _at(a, 11), _at(a, 12), _at(a, 13))

        return _vjp(ctx, run, grads)

    def _gru_backward_backward(ctx, *grads):
        def run(a):  # grad_output, grad_h_n, w_hh, h0, output, workspace, batch_sizes, reverse
            return reference.gru_backward(a[0], a[1], None, a[2], a[3], a[4], a[5], a[6], ctx.reverse, _at(a, 8),
                                          _at(a, 9))

        return _vjp(ctx, run, grads)

    def _make_rnn_backward_backward(nonlinearity):
        def _rnn_backward_backward(ctx, *grads):
            def run(a):  # grad_output, grad_h_n, w_hh, h0, output, batch_sizes, reverse
                return reference.rnn_backward(nonlinearity, a[0], a[1], a[2], a[3], a[4], a[5], ctx.reverse, _at(a, 7),
                                              _at(a, 8), _at(a, 9), _at(a, 10))

            return _vjp(ctx, run, grads)

        return _rnn_backward_backward

    torch.library.register_autograd(f"{namespace}::lstm_recurrence_backward", _lstm_backward_backward,
                                    setup_context=_save_inputs)
    torch.library.register_autograd(f"{namespace}::gru_recurrence_backward", _gru_backward_backward,
                                    setup_context=_save_inputs)
    for _act in ("tanh", "relu"):
        torch.library.register_autograd(f"{namespace}::rnn_{_act}_recurrence_backward",
                                        _make_rnn_backward_backward(_act), setup_context=_save_inputs)


def register_layer_norm(namespace):
    """Fake kernels and autograd of the LayerNorm LSTM / GRU ops ``<namespace>::layer_norm_*``.

    First derivatives run the fused backward ops. A backward that builds a graph
    (``create_graph=True``, hence grad mode on inside it) instead differentiates the same recurrence
    written with PyTorch operations (rnnfused/_reference_layer_norm.py) from the saved inputs, so
    second and higher derivatives are exact."""
    _ops = getattr(torch.ops, namespace)

    def _workspace(gates_x, training, width):
        return gates_x.new_empty((gates_x.shape[0], width) if training else (0,), dtype=compute_dtype(gates_x.dtype))

    @torch.library.register_fake(f"{namespace}::layer_norm_lstm_recurrence")
    def _lstm_fake(gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0, batch_sizes, reverse, training,
                   eps, recurrent_mask=None, zoneout=None, cell_zoneout=None, w_hr=None):
        hidden = gates_x.shape[1] // 4
        return (gates_x.new_empty((gates_x.shape[0], w_hh.shape[1])), torch.empty_like(h0, memory_format=torch.contiguous_format),
                torch.empty_like(c0, memory_format=torch.contiguous_format),
                _workspace(gates_x, training, 10 * hidden + 2))

    @torch.library.register_fake(f"{namespace}::layer_norm_lstm_recurrence_backward")
    def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, w_hh, hh_gain, cell_gain, cell_bias, h0, c0, output,
                            workspace, batch_sizes, reverse, recurrent_mask=None, zoneout=None, cell_zoneout=None,
                            w_hr=None):
        return (output.new_empty((output.shape[0], w_hh.shape[0])), output.new_empty(w_hh.shape),
                output.new_empty(hh_gain.shape), output.new_empty(hh_gain.shape), output.new_empty(hh_gain.shape),
                output.new_empty(cell_gain.shape), output.new_empty(cell_gain.shape), output.new_empty(h0.shape),
                output.new_empty(c0.shape), output.new_empty(w_hr.shape if w_hr is not None else (0,)))

    @torch.library.register_fake(f"{namespace}::layer_norm_gru_recurrence")
    def _gru_fake(gates_x, w_hh, b_hh, hh_gain, hh_bias, h0, batch_sizes, reverse, training, eps, recurrent_mask=None,
                  zoneout=None):
        hidden = gates_x.shape[1] // 3
        return (gates_x.new_empty((gates_x.shape[0], hidden)), torch.empty_like(h0, memory_format=torch.contiguous_format),
                _workspace(gates_x, training, 7 * hidden + 1))

    @torch.library.register_fake(f"{namespace}::layer_norm_gru_recurrence_backward")
    def _gru_backward_fake(grad_output, grad_h_n, w_hh, hh_gain, h0, output, workspace, batch_sizes, reverse,
                           recurrent_mask=None, zoneout=None):
        return (output.new_empty((output.shape[0], w_hh.shape[0])), output.new_empty(w_hh.shape),
                output.new_empty(hh_gain.shape), output.new_empty(hh_gain.shape), output.new_empty(hh_gain.shape),
                output.new_empty(h0.shape))

    def _differentiate_reference(ctx, run, inputs, outputs_grads):
        """The gradients of every input that needs one, through the PyTorch form of the recurrence
        (``run(inputs)`` -> outputs), as a graph of its own (a backward with create_graph=True).
        ``inputs``: {position among the op's arguments: tensor or None}."""
        wanted = [i for i, t in inputs.items() if isinstance(t, torch.Tensor) and ctx.needs_input_grad[i]]
        result = [None] * len(ctx.needs_input_grad)
        outputs = run(inputs)
        pairs = [(o, g) for o, g in zip(outputs, outputs_grads) if g is not None and o is not None and o.requires_grad]
        if not wanted or not pairs:
            return tuple(result)
        values = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                     create_graph=True, allow_unused=True)
        for i, value in zip(wanted, values):
            result[i] = value
        return tuple(result)

    def _lstm_setup_context(ctx, inputs, output):
        (gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0, batch_sizes, reverse, training,
         eps) = inputs[:13]
        extras = (_at(inputs, 13), _at(inputs, 14), _at(inputs, 15), _at(inputs, 16))  # mask, zoneout x2, w_hr
        out, _, _, workspace = output
        ctx.reverse, ctx.recorded, ctx.eps = reverse, training, eps
        ctx.mark_non_differentiable(workspace)  # the backward reads it; nothing is computed from it
        ctx.save_for_backward(gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0, batch_sizes, out,
                              workspace, *extras)
        ctx.set_materialize_grads(False)

    def _lstm_backward(ctx, grad_output, grad_h_n, grad_c_n, grad_workspace):
        (gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0, batch_sizes, out, workspace, mask, k_h,
         k_c, w_hr) = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = dict(enumerate((gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0)))
            inputs[16] = w_hr

            def run(a):
                return reference_layer_norm.layer_norm_lstm_forward(*[a[i] for i in range(9)], batch_sizes, ctx.reverse,
                                                                    ctx.eps, mask, k_h, k_c, a[16])

            return _differentiate_reference(ctx, run, inputs, (grad_output, grad_h_n, grad_c_n))
        if not ctx.recorded:
            out, _, _, workspace = _ops.layer_norm_lstm_recurrence(
                gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0, batch_sizes, ctx.reverse, True,
                ctx.eps, mask, k_h, k_c, w_hr)
        grads = _ops.layer_norm_lstm_recurrence_backward(grad_output, grad_h_n, grad_c_n, w_hh, hh_gain, cell_gain,
                                                         cell_bias, h0, c0, out, workspace, batch_sizes, ctx.reverse,
                                                         mask, k_h, k_c, w_hr)
        d_gx, d_w_hh, d_b_hh, d_gain, d_beta, d_cgain, d_cbeta, d_h0, d_c0, d_w_hr = grads
        return (d_gx, d_w_hh, d_b_hh if b_hh is not None else None, d_gain, d_beta, d_cgain, d_cbeta, d_h0, d_c0,
                None, None, None, None, None, None, None, d_w_hr if w_hr is not None else None)

    torch.library.register_autograd(f"{namespace}::layer_norm_lstm_recurrence", _lstm_backward,
                                    setup_context=_lstm_setup_context)

    def _gru_setup_context(ctx, inputs, output):
        gates_x, w_hh, b_hh, hh_gain, hh_bias, h0, batch_sizes, reverse, training, eps = inputs[:10]
        extras = (_at(inputs, 10), _at(inputs, 11))
        out, _, workspace = output
        ctx.reverse, ctx.recorded, ctx.eps = reverse, training, eps
        ctx.mark_non_differentiable(workspace)  # the backward reads it; nothing is computed from it
        ctx.save_for_backward(gates_x, w_hh, b_hh, hh_gain, hh_bias, h0, batch_sizes, out, workspace, *extras)
        ctx.set_materialize_grads(False)

    def _gru_backward(ctx, grad_output, grad_h_n, grad_workspace):
        gates_x, w_hh, b_hh, hh_gain, hh_bias, h0, batch_sizes, out, workspace, mask, k_h = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = dict(enumerate((gates_x, w_hh, b_hh, hh_gain, hh_bias, h0)))

            def run(a):
                return reference_layer_norm.layer_norm_gru_forward(*[a[i] for i in range(6)], batch_sizes, ctx.reverse,
                                                                   ctx.eps, mask, k_h)

            return _differentiate_reference(ctx, run, inputs, (grad_output, grad_h_n))
        if not ctx.recorded:
            out, _, workspace = _ops.layer_norm_gru_recurrence(gates_x, w_hh, b_hh, hh_gain, hh_bias, h0, batch_sizes,
                                                               ctx.reverse, True, ctx.eps, mask, k_h)
        grads = _ops.layer_norm_gru_recurrence_backward(grad_output, grad_h_n, w_hh, hh_gain, h0, out, workspace,
                                                        batch_sizes, ctx.reverse, mask, k_h)
        d_gx, d_w_hh, d_b_hh, d_gain, d_beta, d_h0 = grads
        return (d_gx, d_w_hh, d_b_hh if b_hh is not None else None, d_gain, d_beta, d_h0, None, None, None, None, None,
                None)

    torch.library.register_autograd(f"{namespace}::layer_norm_gru_recurrence", _gru_backward,
                                    setup_context=_gru_setup_context)


def register_inference(namespace):
    """Fake kernel of ``<namespace>::layer_inference`` (csrc/op_schemas.h), and an autograd formula
    that refuses: the op has no derivative (rnnfused/functional.py calls it only where autograd
    records nothing)."""

    @torch.library.register_fake(f"{namespace}::layer_inference")
    def _inference_fake(cell, input, w_ih, b_ih, w_hh, b_hh, h0, c0, batch_sizes, reverse):
        output = input.new_empty((input.shape[0], w_hh.shape[1]))
        h_n = torch.empty_like(h0, memory_format=torch.contiguous_format)
        c_n = torch.empty_like(c0, memory_format=torch.contiguous_format) if c0 is not None else input.new_empty((0,))
        return output, h_n, c_n

    def _no_derivative(ctx, *grads):
        raise RuntimeError(
            f"{namespace}::layer_inference has no derivative: it is the inference form of a layer; "
            "differentiate through the layer's recurrence op (rnnfused.functional) instead"
        )

    torch.library.register_autograd(f"{namespace}::layer_inference", _no_derivative,
                                    setup_context=lambda ctx, inputs, output: None)


_THIRD_ORDER_MESSAGE = (
    "rnnfused: derivatives of third or higher order through a recurrence are not supported "
    "(second derivatives are exact); call the second backward without create_graph=True"
)


def _at(values, index):
    """An optional trailing argument of an op (None when not given)."""
    return values[index] if len(values) > index else None


def _has_grad(grad):
    return grad is not None and grad.numel() > 0


register("rnnfused")
register_layer_norm("rnnfused")
register_inference("rnnfused")
