"""Fake kernels and autograd formulas of the C++ ops (the schemas live in csrc/op_schemas.h).

Every forward op is differentiable through its `*_backward` op. The backward ops themselves are
not differentiable: asking for a second derivative raises a clear error instead of returning a
silently wrong one.

`register(namespace)` registers them for one library of ops with rnnfused's schemas:
``rnnfused`` (the CPU and CUDA kernels), and ``rnnfused_sim`` in the test build of the CUDA path on
the CUDA simulator (rnnfused/_sim.py).
"""
import torch

from . import _C  # noqa: F401  (loads the library that defines the ops)

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
    def _lstm_fake(gates_x, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse, training):
        hidden = gates_x.shape[1] // 4
        output = gates_x.new_empty((gates_x.shape[0], w_hh.shape[1]))
        workspace = _fake_workspace(gates_x, training, LSTM_WORKSPACE_GATES, hidden)
        return output, torch.empty_like(h0, memory_format=torch.contiguous_format), torch.empty_like(
            c0, memory_format=torch.contiguous_format
        ), workspace

    @torch.library.register_fake(f"{namespace}::lstm_recurrence_backward")
    def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, w_hh, w_hr, h0, c0, output, workspace, batch_sizes, reverse):
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
    def _gru_fake(gates_x, w_hh, b_hh, h0, batch_sizes, reverse, training):
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
    def _gru_backward_fake(grad_output, grad_h_n, w_hh, h0, output, workspace, batch_sizes, reverse):
        return _gated_backward_fake(3, grad_output, grad_h_n, w_hh, h0, output)

    def _rnn_fake(gates_x, w_hh, b_hh, h0, batch_sizes, reverse):
        output = gates_x.new_empty((gates_x.shape[0], gates_x.shape[1]))
        return output, torch.empty_like(h0, memory_format=torch.contiguous_format)

    def _rnn_backward_fake(grad_output, grad_h_n, w_hh, h0, output, batch_sizes, reverse):
        return _gated_backward_fake(1, grad_output, grad_h_n, w_hh, h0, output)

    for _act in ("tanh", "relu"):
        torch.library.register_fake(f"{namespace}::rnn_{_act}_recurrence")(_rnn_fake)
        torch.library.register_fake(f"{namespace}::rnn_{_act}_recurrence_backward")(_rnn_backward_fake)

    # ----------------------------------------------------------------------------------------------
    # Autograd. Gradients of unused outputs arrive as None (no zero tensors are made for them) and
    # the C++ backward reads None as zero.
    # ----------------------------------------------------------------------------------------------

    def _lstm_setup_context(ctx, inputs, output):
        gates_x, w_hh, b_hh, w_hr, h0, c0, batch_sizes, reverse, training = inputs
        out, _, _, workspace = output
        ctx.reverse = reverse
        ctx.has_bias = b_hh is not None
        ctx.has_projection = w_hr is not None
        ctx.recorded = training
        # A call with training=False kept no workspace; its backward recomputes the forward pass
        # (with training=True) from the saved inputs instead of failing.
        recompute_from = (gates_x, b_hh) if not training else (None, None)
        ctx.save_for_backward(w_hh, w_hr, h0, c0, out, workspace, batch_sizes, *recompute_from)
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)

    def _lstm_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
        w_hh, w_hr, h0, c0, out, workspace, batch_sizes, gates_x, b_hh = ctx.saved_tensors
        if not ctx.recorded:
            out, _, _, workspace = _ops.lstm_recurrence(gates_x, w_hh, b_hh, w_hr, h0, c0, batch_sizes, ctx.reverse, True)
        grad_gx, grad_w_hh, grad_b_hh, grad_w_hr, grad_h0, grad_c0 = _ops.lstm_recurrence_backward(
            grad_output, grad_h_n, grad_c_n, w_hh, w_hr, h0, c0, out, workspace, batch_sizes, ctx.reverse
        )
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
        )

    torch.library.register_autograd(
        f"{namespace}::lstm_recurrence", _lstm_backward, setup_context=_lstm_setup_context
    )

    def _gru_setup_context(ctx, inputs, output):
        gates_x, w_hh, b_hh, h0, batch_sizes, reverse, training = inputs
        out, _, workspace = output
        ctx.reverse = reverse
        ctx.has_bias = b_hh is not None
        ctx.recorded = training
        recompute_from = (gates_x, b_hh) if not training else (None, None)  # as for the LSTM
        ctx.save_for_backward(w_hh, h0, out, workspace, batch_sizes, *recompute_from)
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)

    def _gru_backward(ctx, grad_output, grad_h_n, _grad_workspace):
        w_hh, h0, out, workspace, batch_sizes, gates_x, b_hh = ctx.saved_tensors
        if not ctx.recorded:
            out, _, workspace = _ops.gru_recurrence(gates_x, w_hh, b_hh, h0, batch_sizes, ctx.reverse, True)
        grad_gx, grad_w_hh, grad_b_hh, grad_h0 = _ops.gru_recurrence_backward(
            grad_output, grad_h_n, w_hh, h0, out, workspace, batch_sizes, ctx.reverse
        )
        return grad_gx, grad_w_hh, grad_b_hh if ctx.has_bias else None, grad_h0, None, None, None

    torch.library.register_autograd(f"{namespace}::gru_recurrence", _gru_backward, setup_context=_gru_setup_context)

    def _rnn_setup_context(ctx, inputs, output):
        gates_x, w_hh, b_hh, h0, batch_sizes, reverse = inputs
        out, _ = output
        ctx.reverse = reverse
        ctx.has_bias = b_hh is not None
        ctx.save_for_backward(w_hh, h0, out, batch_sizes)
        ctx.set_materialize_grads(False)

    def _make_rnn_backward(backward_op):
        def _rnn_backward(ctx, grad_output, grad_h_n):
            w_hh, h0, out, batch_sizes = ctx.saved_tensors
            grad_gx, grad_w_hh, grad_b_hh, grad_h0 = backward_op(
                grad_output, grad_h_n, w_hh, h0, out, batch_sizes, ctx.reverse
            )
            return grad_gx, grad_w_hh, grad_b_hh if ctx.has_bias else None, grad_h0, None, None

        return _rnn_backward

    for _act in ("tanh", "relu"):
        torch.library.register_autograd(
            f"{namespace}::rnn_{_act}_recurrence",
            _make_rnn_backward(getattr(_ops, f"rnn_{_act}_recurrence_backward")),
            setup_context=_rnn_setup_context,
        )

    # The backward ops get an autograd formula that refuses, so that create_graph=True followed by a
    # second backward fails loudly (as torch.nn's cuDNN path does) rather than dropping terms.
    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "rnnfused: double backward (a gradient of a gradient) through a recurrence is not supported; "
            "the fused kernels provide first derivatives only"
        )

    def _no_context(ctx, inputs, output):
        pass

    for _name in (
        "lstm_recurrence_backward",
        "gru_recurrence_backward",
        "rnn_tanh_recurrence_backward",
        "rnn_relu_recurrence_backward",
    ):
        torch.library.register_autograd(f"{namespace}::{_name}", _no_double_backward, setup_context=_no_context)


register("rnnfused")
