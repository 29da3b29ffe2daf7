"""The LayerNorm LSTM and GRU recurrences (rnnfused::layer_norm_*_recurrence) written with
differentiable PyTorch operations: what makes their second derivatives exact. rnnfused/_ops.py
runs it only when a backward is asked to build a graph (``create_graph=True``); first derivatives
always run the fused kernels.

Each function computes what the forward op computes from the same arguments (csrc/op_schemas.h),
step by step in the order of the op's StepPlan (rows as in rnnfused/_reference_backward.py), and
returns output, h_n and (LSTM) c_n.
"""
import torch
import torch.nn.functional as F

from ._reference_backward import _keep, _masked, _plan, _replace_leading_rows, _rows

__all__ = ["layer_norm_lstm_forward", "layer_norm_gru_forward"]


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cast(tensor, dtype):
    return None if tensor is None else tensor.to(dtype)


def _zoned(keep, offset, rows, previous, candidate):
    if keep is None:
        return candidate
    k = _keep(keep, offset, rows)
    return k * previous + (1 - k) * candidate


def _run(cell, gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0, batch_sizes, reverse, eps,
         recurrent_mask, zoneout, cell_zoneout, w_hr=None):
    storage = gates_x.dtype
    dtype = _compute_dtype(storage)
    gx, w, bias, gain, beta = (_cast(t, dtype) for t in (gates_x, w_hh, b_hh, hh_gain, hh_bias))
    c_gain, c_beta, mask = _cast(cell_gain, dtype), _cast(cell_bias, dtype), _cast(recurrent_mask, dtype)
    k_h, k_c = _cast(zoneout, dtype), _cast(cell_zoneout, dtype)
    projection = _cast(w_hr, dtype)
    hidden = w.shape[0] // (4 if cell == "lstm" else 3)
    width = w.shape[0]
    h = h0.to(dtype)
    c = c0.to(dtype) if c0 is not None else None
    blocks = []
    for offset, rows, _, _ in _plan(gates_x.shape[0], h0.shape[0], batch_sizes, reverse):
        h_prev = h.narrow(0, 0, rows)
        hh = F.layer_norm(_masked(h_prev, mask) @ w.t(), (width,), gain, beta, eps)
        if bias is not None:
            hh = hh + bias
        x = _rows(gx, offset, rows)
        if cell == "lstm":
            c_prev = c.narrow(0, 0, rows)
            i, f, g, o = (x + hh).split(hidden, 1)
            c_cand = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
            h_cand = torch.sigmoid(o) * torch.tanh(F.layer_norm(c_cand, (hidden,), c_gain, c_beta, eps))
            if projection is not None:
                h_cand = h_cand @ projection.t()
            c = _replace_leading_rows(c, _zoned(k_c, offset, rows, c_prev, c_cand))
        else:
            x_r, x_z, x_n = x.split(hidden, 1)
            hh_r, hh_z, hh_n = hh.split(hidden, 1)
            r, z = torch.sigmoid(x_r + hh_r), torch.sigmoid(x_z + hh_z)
            n = torch.tanh(x_n + r * hh_n)
            h_cand = n + z * (h_prev - n)
        h_t = _zoned(k_h, offset, rows, h_prev, h_cand)
        if storage != dtype:  # the carried state is what the caller sees, as in the kernels
            h_t = h_t.to(storage).to(dtype)
        blocks.append((offset, h_t))
        h = _replace_leading_rows(h, h_t)
    blocks.sort(key=lambda block: block[0])
    output = torch.cat([block for _, block in blocks], 0) if blocks else gx.new_zeros((0, h0.shape[1]))
    return output.to(storage), h.to(storage), (c.to(storage) if c is not None else None)


def layer_norm_lstm_forward(gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0, batch_sizes, reverse,
                            eps, recurrent_mask=None, zoneout=None, cell_zoneout=None, w_hr=None):
    """output, h_n, c_n of rnnfused::layer_norm_lstm_recurrence."""
    return _run("lstm", gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0, batch_sizes, reverse, eps,
                recurrent_mask, zoneout, cell_zoneout, w_hr)


def layer_norm_gru_forward(gates_x, w_hh, b_hh, hh_gain, hh_bias, h0, batch_sizes, reverse, eps, recurrent_mask=None,
                           zoneout=None):
    """output, h_n of rnnfused::layer_norm_gru_recurrence."""
    output, h_n, _ = _run("gru", gates_x, w_hh, b_hh, hh_gain, hh_bias, None, None, h0, None, batch_sizes, reverse,
                          eps, recurrent_mask, zoneout, None)
    return output, h_n
