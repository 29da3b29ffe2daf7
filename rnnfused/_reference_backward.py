"""The backward recurrences of rnnfused's ops written with differentiable PyTorch operations: what
makes second derivatives exact (rnnfused/_ops.py uses it only then; first derivatives always run
the fused kernels).

Each function computes what the matching ``*_recurrence_backward`` op computes, from the same
arguments, plus ``grad_workspace``: a gradient arriving at the forward op's saved activations (a
second-order backward sends one there, because the first-order backward reads them). It enters at
the step that produced them: the gradient of an activation becomes a gradient of its
pre-activation through the activation's derivative, written with its output (sigmoid' = s(1 - s),
tanh' = 1 - t^2), and that of the LSTM cell state joins dL/dc_t. With it the function is the exact
vector-Jacobian product of the forward op with respect to all its differentiable outputs, and its
own autograd graph gives the derivative of the backward.

Formulas and summation structure follow csrc/cell_math.h; rows follow the packed step plan of
csrc/checks.h (StepPlan): step t owns batch_sizes[t] rows, in reverse a row starts at its last
step from h0 / c0.
"""
import torch

__all__ = ["lstm_backward", "gru_backward", "rnn_backward"]


def _plan(rows, batch, batch_sizes, reverse):
    """[(offset, rows, previous offset, rows continuing from the previous step)] in the order of
    the forward computation."""
    if batch_sizes is None:
        sizes = [batch] * (rows // batch if batch else 0)
    else:
        sizes = [int(b) for b in batch_sizes.tolist()]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    plan, previous = [], None
    for t in order:
        from_prev = 0 if previous is None else min(sizes[t], sizes[previous])
        plan.append((offsets[t], sizes[t], offsets[previous] if previous is not None else 0, from_prev))
        previous = t
    return plan


def _rows(tensor, offset, count):
    return tensor.narrow(0, offset, count)


def _previous(values, initial, step):
    """The rows a step reads from the step before (values) or, for rows starting here, initial."""
    offset, rows, prev_offset, from_prev = step
    parts = []
    if from_prev > 0:
        parts.append(_rows(values, prev_offset, from_prev))
    if rows > from_prev:
        parts.append(_rows(initial, from_prev, rows - from_prev))
    return torch.cat(parts, 0) if len(parts) > 1 else parts[0]


def _replace_leading_rows(state, new_rows):
    """state with its first rows replaced (out of place, so that autograd sees every value)."""
    count = new_rows.shape[0]
    if count == state.shape[0]:
        return new_rows
    return torch.cat([new_rows, state.narrow(0, count, state.shape[0] - count)], 0)


def _assemble(blocks, reverse, width, like):
    """The per-step blocks of rows, collected from the last computed step to the first, as one
    [N, width] tensor in row order (forward: the reverse of the collection order)."""
    if not blocks:
        return like.new_zeros((0, width))
    return torch.cat(blocks if reverse else blocks[::-1], 0)


def _sigmoid_grad(s):
    return s * (1 - s)


def _tanh_grad(t):
    return 1 - t * t


def _compute(t, dtype):
    return None if t is None else t.to(dtype)


def _keep(keep, offset, rows):
    """The zoneout keep weights of a step's rows: [rows, width], or the scalar of eval mode."""
    return keep if keep.dim() == 0 else _rows(keep, offset, rows)


def _zoned_states(plan, candidates, initial, keep):
    """[N, width] zoned states s_t = k s_{t-1} + (1 - k) candidate_t, in the order of the forward
    computation (s_{t-1} from the previous step's rows or `initial`)."""
    states = [None] * len(plan)
    by_offset = {}
    for index, step in enumerate(plan):
        offset, rows = step[0], step[1]
        prev = _previous_from(by_offset, initial, step)
        k = _keep(keep, offset, rows)
        states[index] = k * prev + (1 - k) * _rows(candidates, offset, rows)
        by_offset[offset] = states[index]
    ordered = sorted(zip([s[0] for s in plan], states), key=lambda pair: pair[0])
    return torch.cat([state for _, state in ordered], 0) if ordered else candidates


def _previous_from(by_offset, initial, step):
    offset, rows, prev_offset, from_prev = step
    parts = []
    if from_prev > 0:
        parts.append(by_offset[prev_offset].narrow(0, 0, from_prev))
    if rows > from_prev:
        parts.append(initial.narrow(0, from_prev, rows - from_prev))
    return torch.cat(parts, 0) if len(parts) > 1 else parts[0]


def _masked(rows, mask):
    """rows [rows, P] of one step times the recurrent dropout mask's first rows (no mask: rows)."""
    return rows if mask is None else rows * mask.narrow(0, 0, rows.shape[0])


def lstm_backward(grad_output, grad_h_n, grad_c_n, grad_workspace, w_hh, w_hr, h0, c0, output, workspace,
                  batch_sizes, reverse, recurrent_mask=None, zoneout=None, cell_zoneout=None):
    """grad_gates_x, grad_w_hh, grad_b_hh, grad_w_hr (empty without a projection), grad_h0, grad_c0.

    With zoneout (keep weights k of h, [N, P] or a scalar) and cell_zoneout (of c, [N, H] or a
    scalar): h_t = k h_{t-1} + (1 - k) h~_t and c_t = k_c c_{t-1} + (1 - k_c) c~_t, where the
    workspace's c column holds the candidate c~_t; the zoned cell states are recomputed here from
    it (a scan in the order of the forward computation)."""
    mask = _compute(recurrent_mask, workspace.dtype)
    k_h, k_c = _compute(zoneout, workspace.dtype), _compute(cell_zoneout, workspace.dtype)
    dtype = workspace.dtype
    out_dtype = output.dtype
    w_hh_c, w_hr_c, h0_c, c0_c = (_compute(t, dtype) for t in (w_hh, w_hr, h0, c0))
    output_c, go, gws = _compute(output, dtype), _compute(grad_output, dtype), _compute(grad_workspace, dtype)
    hidden = c0.shape[1]
    batch = h0.shape[0]
    dh = _compute(grad_h_n, dtype) if grad_h_n is not None else h0_c.new_zeros(h0_c.shape)
    dc = _compute(grad_c_n, dtype) if grad_c_n is not None else c0_c.new_zeros(c0_c.shape)
    grad_w_hh = w_hh_c.new_zeros(w_hh_c.shape)
    grad_b_hh = w_hh_c.new_zeros((w_hh_c.shape[0],))
    grad_w_hr = w_hr_c.new_zeros(w_hr_c.shape) if w_hr_c is not None else w_hh_c.new_zeros((0,))
    grad_gates = []
    plan = _plan(output.shape[0], batch, batch_sizes, reverse)
    candidates = workspace.narrow(1, 4 * hidden, hidden).to(dtype)
    cell_states = candidates if k_c is None else _zoned_states(plan, candidates, c0_c, k_c)
    for step in reversed(plan):
        offset, rows = step[0], step[1]
        ws = _rows(workspace, offset, rows).to(dtype)
        i, f, g, o, c = ws.split(hidden, 1)
        c_prev = _previous(cell_states, c0_c, step)
        dh_t = dh.narrow(0, 0, rows)
        if go is not None:
            dh_t = dh_t + _rows(go, offset, rows)
        dh_kept = 0
        if k_h is not None:
            keep = _keep(k_h, offset, rows)
            dh_kept, dh_t = keep * dh_t, (1 - keep) * dh_t
        dc_t = dc.narrow(0, 0, rows)
        dc_kept = 0
        if k_c is not None:
            keep = _keep(k_c, offset, rows)
            dc_kept, dc_t = keep * dc_t, (1 - keep) * dc_t
        tc = torch.tanh(c)
        if w_hr_c is not None:
            dr = dh_t @ w_hr_c
            grad_w_hr = grad_w_hr + dh_t.t() @ (o * tc)
        else:
            dr = dh_t
        inject = [0, 0, 0, 0, 0] if gws is None else list(_rows(gws, offset, rows).split(hidden, 1))
        dc_total = dc_t + dr * o * _tanh_grad(tc) + inject[4]
        d_i = (dc_total * g + inject[0]) * _sigmoid_grad(i)
        d_f = (dc_total * c_prev + inject[1]) * _sigmoid_grad(f)
        d_g = (dc_total * i + inject[2]) * _tanh_grad(g)
        d_o = (dr * tc + inject[3]) * _sigmoid_grad(o)
        d_gates = torch.cat([d_i, d_f, d_g, d_o], 1)
        grad_gates.append(d_gates)
        h_prev = _masked(_previous(output_c, h0_c, step), mask)
        grad_w_hh = grad_w_hh + d_gates.t() @ h_prev
        grad_b_hh = grad_b_hh + d_gates.sum(0)
        dh = _replace_leading_rows(dh, _masked(d_gates @ w_hh_c, mask) + dh_kept)
        dc = _replace_leading_rows(dc, dc_total * f + dc_kept)
    grad_gx = _assemble(grad_gates, reverse, 4 * hidden, w_hh_c)
    return (grad_gx.to(out_dtype), grad_w_hh.to(w_hh.dtype), grad_b_hh.to(out_dtype), grad_w_hr.to(out_dtype),
            dh.to(h0.dtype), dc.to(c0.dtype))


def gru_backward(grad_output, grad_h_n, grad_workspace, w_hh, h0, output, workspace, batch_sizes, reverse,
                 recurrent_mask=None, zoneout=None):
    """grad_gates_x, grad_w_hh, grad_b_hh, grad_h0. zoneout as for lstm_backward."""
    dtype = workspace.dtype
    mask = _compute(recurrent_mask, dtype)
    k_h = _compute(zoneout, dtype)
    out_dtype = output.dtype
    w_hh_c, h0_c, output_c = _compute(w_hh, dtype), _compute(h0, dtype), _compute(output, dtype)
    go, gws = _compute(grad_output, dtype), _compute(grad_workspace, dtype)
    hidden = h0.shape[1]
    dh = _compute(grad_h_n, dtype) if grad_h_n is not None else h0_c.new_zeros(h0_c.shape)
    grad_w_hh = w_hh_c.new_zeros(w_hh_c.shape)
    grad_b_hh = w_hh_c.new_zeros((w_hh_c.shape[0],))
    grad_gates = []
    for step in reversed(_plan(output.shape[0], h0.shape[0], batch_sizes, reverse)):
        offset, rows = step[0], step[1]
        r, z, n, hh_n = _rows(workspace, offset, rows).to(dtype).split(hidden, 1)
        h_prev = _previous(output_c, h0_c, step)
        dh_t = dh.narrow(0, 0, rows)
        if go is not None:
            dh_t = dh_t + _rows(go, offset, rows)
        dh_kept = 0
        if k_h is not None:
            keep = _keep(k_h, offset, rows)
            dh_kept, dh_t = keep * dh_t, (1 - keep) * dh_t
        inject = [0, 0, 0, 0] if gws is None else list(_rows(gws, offset, rows).split(hidden, 1))
        d_n = (dh_t * (1 - z) + inject[2]) * _tanh_grad(n)
        d_hh_n = d_n * r + inject[3]
        d_r = (d_n * hh_n + inject[0]) * _sigmoid_grad(r)
        d_z = (dh_t * (h_prev - n) + inject[1]) * _sigmoid_grad(z)
        grad_gates.append(torch.cat([d_r, d_z, d_n], 1))
        d_gates_h = torch.cat([d_r, d_z, d_hh_n], 1)
        grad_w_hh = grad_w_hh + d_gates_h.t() @ _masked(h_prev, mask)
        grad_b_hh = grad_b_hh + d_gates_h.sum(0)
        dh = _replace_leading_rows(dh, dh_t * z + _masked(d_gates_h @ w_hh_c, mask) + dh_kept)
    grad_gx = _assemble(grad_gates, reverse, 3 * hidden, w_hh_c)
    return grad_gx.to(out_dtype), grad_w_hh.to(w_hh.dtype), grad_b_hh.to(out_dtype), dh.to(h0.dtype)


def rnn_backward(nonlinearity, grad_output, grad_h_n, w_hh, h0, output, batch_sizes, reverse, recurrent_mask=None,
                 zoneout=None, gates_x=None, b_hh=None):
    """grad_gates_x, grad_w_hh, grad_b_hh, grad_h0 of an Elman RNN (its backward reads only h_t).
    With zoneout (keep weights as for lstm_backward) the output is not the activation: the
    candidates h~ = act(gates_x + (m * h_{t-1}) W_hh^T + b_hh) are recomputed from gates_x and b_hh."""
    dtype = torch.float32 if output.dtype in (torch.float16, torch.bfloat16) else output.dtype
    mask = _compute(recurrent_mask, dtype)
    k_h = _compute(zoneout, dtype)
    gx, bias = _compute(gates_x, dtype), _compute(b_hh, dtype)
    out_dtype = output.dtype
    w_hh_c, h0_c, output_c, go = (_compute(t, dtype) for t in (w_hh, h0, output, grad_output))
    hidden = h0.shape[1]
    dh = _compute(grad_h_n, dtype) if grad_h_n is not None else h0_c.new_zeros(h0_c.shape)
    grad_w_hh = w_hh_c.new_zeros(w_hh_c.shape)
    grad_b_hh = w_hh_c.new_zeros((hidden,))
    grad_gates = []
    for step in reversed(_plan(output.shape[0], h0.shape[0], batch_sizes, reverse)):
        offset, rows = step[0], step[1]
        h = _rows(output_c, offset, rows)
        dh_t = dh.narrow(0, 0, rows)
        if go is not None:
            dh_t = dh_t + _rows(go, offset, rows)
        dh_kept = 0
        if k_h is not None:
            pre = _rows(gx, offset, rows) + _masked(_previous(output_c, h0_c, step), mask) @ w_hh_c.t()
            if bias is not None:
                pre = pre + bias
            h = torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)  # the candidate
            keep = _keep(k_h, offset, rows)
            dh_kept, dh_t = keep * dh_t, (1 - keep) * dh_t
        if nonlinearity == "tanh":
            d_pre = dh_t * _tanh_grad(h)
        else:
            d_pre = torch.where(h > 0, dh_t, torch.zeros_like(dh_t))
        grad_gates.append(d_pre)
        h_prev = _masked(_previous(output_c, h0_c, step), mask)
        grad_w_hh = grad_w_hh + d_pre.t() @ h_prev
        grad_b_hh = grad_b_hh + d_pre.sum(0)
        dh = _replace_leading_rows(dh, _masked(d_pre @ w_hh_c, mask) + dh_kept)
    grad_gx = _assemble(grad_gates, reverse, hidden, w_hh_c)
    return grad_gx.to(out_dtype), grad_w_hh.to(w_hh.dtype), grad_b_hh.to(out_dtype), dh.to(h0.dtype)
