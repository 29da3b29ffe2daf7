"""Autocast rules of the recurrence ops: inside ``torch.autocast`` they run in the dtype torch.nn's
own recurrent layers would produce there.

Under autocast the input projection (``F.linear``) comes out in the autocast dtype while ``w_hh``,
``b_hh``, ``h0`` and ``c0`` stay in float32, and the ops need one dtype for all of them. Each
forward op therefore gets an autocast kernel that casts its floating-point inputs to one dtype
and runs the op with autocast off (as ATen's own autocast wrappers do). The casts are ordinary
differentiable ops, so gradients reach the float32 parameters in float32.

The dtype follows torch.nn under the same autocast:

* CUDA, every op: the autocast dtype (torch.nn runs cuDNN's RNN and the ATen cells in lower
  precision there).
* CPU, LSTM and Elman RNN: the autocast dtype (torch.nn.LSTM's oneDNN layer,
  ``aten::mkldnn_rnn_layer``, is on the CPU lower-precision list; torch.nn.RNN's cell math stays
  in it).
* CPU, GRU: the widest floating dtype among the inputs, i.e. float32 for a float32 model
  (torch.nn.GRU's CPU cell promotes its new state to the float32 hidden state).
* LayerNorm LSTM / GRU, both devices: the widest, as for the CPU GRU (autocast's layer_norm, which
  makes their input projection, is float32; torch.nn has no such layer to follow).

float64 tensors are never cast, as in torch's own autocast. The kernel reads the autocast dtype
of the region at call time, so ``torch.autocast(..., dtype=torch.float16)`` and ``bfloat16`` both
work. The backward ops need no rule: they receive tensors that already share one dtype.
"""
import torch

from . import _C  # noqa: F401  (defines the ops)

__all__ = ["AUTOCAST_POLICY"]

LOWER = "lower_precision"
PROMOTE = "promote"

# device type -> op name -> policy
AUTOCAST_POLICY = {
    "cpu": {
        "lstm_recurrence": LOWER,
        "gru_recurrence": PROMOTE,
        "rnn_tanh_recurrence": LOWER,
        "rnn_relu_recurrence": LOWER,
        # LayerNorm cells: torch's autocast runs layer_norm in float32, so the normalized input
        # projection arrives in float32; the op follows it (torch.nn has no such layer to follow).
        "layer_norm_lstm_recurrence": PROMOTE,
        "layer_norm_gru_recurrence": PROMOTE,
    },
    "cuda": {
        "lstm_recurrence": LOWER,
        "gru_recurrence": LOWER,
        "rnn_tanh_recurrence": LOWER,
        "rnn_relu_recurrence": LOWER,
        "layer_norm_lstm_recurrence": PROMOTE,  # as on the CPU
        "layer_norm_gru_recurrence": PROMOTE,
    },
}


def _autocast_dtype(device_type):
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":  # torch before 2.4
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


def _eligible(value, device_type):
    """As torch's autocast: floating point, on the autocast device, not float64."""
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.device.type == device_type
        and value.dtype is not torch.float64
    )


def _target_dtype(policy, device_type, args):
    dtype = _autocast_dtype(device_type)
    if policy == PROMOTE:
        for value in args:
            if _eligible(value, device_type):
                dtype = torch.promote_types(dtype, value.dtype)
    return dtype


def _make_kernel(op, policy, device_type, dispatch_key):
    excluded = torch._C.DispatchKeySet(dispatch_key)

    def kernel(*args):
        dtype = _target_dtype(policy, device_type, args)
        cast = tuple(value.to(dtype) if _eligible(value, device_type) else value for value in args)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*cast)

    return kernel


def _register():
    if not hasattr(torch.library, "Library") or not hasattr(torch._C, "_ExcludeDispatchKeyGuard"):
        return None
    library = torch.library.Library("rnnfused", "IMPL")
    for device_type, ops in AUTOCAST_POLICY.items():
        key_name = "AutocastCPU" if device_type == "cpu" else "AutocastCUDA"
        dispatch_key = getattr(torch._C.DispatchKey, key_name, None)
        if dispatch_key is None:
            continue
        for name, policy in ops.items():
            op = getattr(torch.ops.rnnfused, name).default
            library.impl(name, _make_kernel(op, policy, device_type, dispatch_key), key_name)
    return library


# Kept alive for the lifetime of the process: the registrations go with the Library object.
_LIBRARY = _register()
