"""One recurrent layer, one direction, over a whole sequence.

Rows are in the packed layout of :class:`torch.nn.utils.rnn.PackedSequence`: step ``t`` owns
``batch_sizes[t]`` consecutive rows, batch sizes never grow with ``t``. A padded ``[T, B, I]``
batch is passed as its ``[T * B, I]`` reshape with ``batch_sizes=None``.

Shapes (N rows, B batch, I input, H hidden, P = proj_size or H):
    input [N, I]; w_ih [G*H, I]; w_hh [G*H, P]; b_ih, b_hh [G*H]; w_hr [P, H];
    h0 [B, P]; c0 [B, H]  ->  output [N, P], h_n [B, P], c_n [B, H]

The input projection of all steps is one GEMM here (so autograd gives dx, dW_ih and db_ih
from it); the recurrence is one fused op of rnnfused.

``recurrent_mask`` [B, P] (optional, h0's dtype): recurrent dropout. At every step, row b of
h_{t-1} is multiplied by ``recurrent_mask[b]`` before the product with w_hh; the carried state
and the outputs stay unmasked. The modules draw it once per call, layer and direction
(0 or 1 / (1 - p), see README "Regularization beyond torch.nn").

``zoneout`` [N, P] or a scalar (every cell), ``cell_zoneout`` [N, H] or a scalar (LSTM; the input's
dtype): keep weights k of h (of the LSTM's c): every step, s_t = k s_{t-1} + (1 - k) s~_t per row
and unit, where s~_t is what the cell computes (for the LSTM h~_t = o tanh(c~_t), from the
candidate cell state c~_t = f c_{t-1} + i g). The modules pass 0/1 draws (1 with probability p) in training
and the scalar p in eval mode.
"""
import contextlib
import threading

import torch
import torch.nn.functional as F

from . import _C, _ops  # noqa: F401  (registers the ops, their fake kernels and autograd)

__all__ = ["lstm_layer", "gru_layer", "rnn_tanh_layer", "rnn_relu_layer", "layer_norm_lstm_layer", "layer_norm_gru_layer",
           "supported_device"]

# The library whose recurrence ops the layers call. rnnfused._sim swaps in rnnfused_sim (the CUDA
# path on the CUDA simulator) for the tests; nothing else changes it.
_ops_ns = torch.ops.rnnfused
_CPU_OPS = _ops_ns  # the library with layer_inference (rnnfused_sim has none)


def supported_device(device):
    """Whether rnnfused has kernels for ``device`` in this build (meta: shapes only)."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return True
    return device.type == "cuda" and _C.cuda_built()


def _check_device(tensor):
    if supported_device(tensor.device):
        return
    if tensor.device.type == "cuda":
        raise RuntimeError(
            "rnnfused was built without its CUDA kernels, so it cannot run on "
            f"{tensor.device}; rebuild it with a CUDA toolkit and a CUDA build of torch "
            "(FORCE_CUDA=1 pip install --no-build-isolation -e .) or move the module to the CPU"
        )
    raise RuntimeError(f"rnnfused has no kernels for device type '{tensor.device.type}' (supported: cpu, cuda)")


def _records_workspace(keep, *tensors):
    """Whether the forward op keeps its workspace for backward: the caller allows it (modules pass
    ``self.training``), grad mode is on and some input requires grad. Without it a backward still
    works: it recomputes the forward pass first (see rnnfused/_ops.py).

    Under torch.jit.trace the module's flag alone decides: a traced graph records it as a
    constant, and must not depend on the grad mode of the call that traced it (the tracer's own
    check reruns the module in another one)."""
    if torch.jit.is_tracing():
        return keep
    return keep and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Projections of at least this many bytes (glibc's largest threshold for serving an allocation
# from the heap: anything larger is a fresh mmap, whose pages fault in, zeroed, on first touch)
# are written into a buffer kept per thread (see _linear).
_REUSED_PROJECTION_MIN_BYTES = 32 << 20
_projection_buffers = threading.local()
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _eager_cpu_plain(input, tensors):
    """The given ``tensors`` (``input`` among them; None left out) where a layer's call on them runs
    in eager mode on the CPU on plain tensors of one dtype, outside autocast; else None."""
    if input.device.type != "cpu" or input.dim() != 2 or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    # Plain tensors only: under torch.export / make_fx the inputs are fake or functional tensors
    # (what the layer does here would enter the traced graph), and a subclass may not take out=.
    # Nor under torch.func transforms, whose wrapped tensors are plain to type() but have no
    # batching rule for out= (nor for the inference op).
    tensors = [t for t in tensors if t is not None]
    if any(type(t) not in _PLAIN_TENSOR_TYPES or _is_functorch_wrapped(t) for t in tensors):
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    if not all(t.dtype == input.dtype and t.device.type == "cpu" for t in tensors):
        return None
    return tensors


def _gemm_threads(input, tensors):
    """The threads of a layer's GEMMs outside the recurrence ops (the input projection and its
    backward): in eager CPU calls on plain tensors, a scope that puts them on one thread while a
    one-thread period runs (csrc/cpu/team.h: another process took a core, and the ops run on one
    thread; a GEMM on two threads would leave OpenMP's other thread spinning after it, on the core
    the calling thread needs). Elsewhere nothing changes."""
    if _eager_cpu_plain(input, tensors) is None:
        return contextlib.nullcontext()
    return _C._CpuOneThreadPeriod()


def _records_graph(tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _eager_cpu_inference(input, tensors):
    """Whether a layer's call on ``tensors`` (``input`` among them) runs in eager mode on the CPU
    on plain tensors of one dtype, outside autocast, with nothing for autograd to record."""
    tensors = _eager_cpu_plain(input, tensors)
    return tensors is not None and not _records_graph(tensors)


def _reusable_projection(input, w_ih, b_ih):
    """Whether ``x W_ih^T (+ b_ih)`` may go into this thread's kept buffer: in eager CPU inference
    (then the recurrence op reads the projection once and keeps no reference to it; a recorded op
    may save it for a backward that recomputes the forward), and large enough that a fresh tensor
    would be a fresh mmap."""
    if not _eager_cpu_inference(input, (input, w_ih, b_ih)):
        return False
    return input.shape[0] * w_ih.shape[0] * input.element_size() >= _REUSED_PROJECTION_MIN_BYTES


def _infers_from_input(input, w_ih, w_hh, h0, batch_sizes, tensors):
    """Whether a layer runs as one rnnfused::layer_inference op, which projects the input itself
    inside the fused engine (csrc/op_schemas.h): in eager CPU inference in float32 or float64,
    where the engine's per-slice BLAS products run (libtorch's BLAS; above 16 rows, and on Intel
    processors from 2 rows in float32 with MKL's packed GEMM unless the sequences are packed, and at
1 row where W_hh takes 512 KiB to 1 MiB; on
    others not for the LSTM, whose register tiles run at every batch in inference there), or where
    its register tiles run and projecting inside them was measured faster (the cell, the ISA's
    tiles, whether each thread's share of W_ih and W_hh fits its cache). The rules and their
    measurements: csrc/cpu/engine.h. Elsewhere the projection is one GEMM before the recurrence op."""
    return (_ops_ns is _CPU_OPS and _eager_cpu_inference(input, tensors)
            and input.dtype in (torch.float32, torch.float64)
            and (_C._cpu_engine_blas_product(h0.shape[0], input.element_size(), batch_sizes is None,
                                             w_ih.shape[0] // w_hh.shape[1], w_hh.shape[1])
                 or _C._cpu_engine_projects_input(h0.shape[0], w_ih.shape[0], w_hh.shape[1], input.shape[1],
                                                  input.element_size())))


def _cached_projection(input, w_ih, b_ih):
    """Whether ``x W_ih^T (+ b_ih)`` under autograd goes through _ProjectionIntoCache: in eager
    CPU training (what autograd records is then that Function, not an addmm) on contiguous float32
    or float64 tensors, where the projection is large enough for the CPU buffer cache, or within a
    one-thread period (then its backward's GEMMs run on one thread too, _gemm_threads; a smaller
    projection gets a plain tensor from _cpu_empty_recycled)."""
    tensors = _eager_cpu_plain(input, (input, w_ih, b_ih))
    if tensors is None or not _records_graph(tensors) or input.dtype not in (torch.float32, torch.float64):
        return False
    if not (input.is_contiguous() and w_ih.is_contiguous()):
        return False
    return (input.shape[0] * w_ih.shape[0] * input.element_size() >= _C._cpu_recycled_min_bytes
            or _C._cpu_one_thread_period_applies()
            or (input.dtype == torch.float32
                and _C._cpu_bulk_gemm_uses_brgemm(input.shape[0], w_ih.shape[0], input.shape[1])))


def _cache_mm(a, b):
    """a @ b, into a buffer of the CPU buffer cache where no graph is being recorded (a backward
    without create_graph) and the product is large enough for it."""
    if torch.is_grad_enabled():
        return a.mm(b)
    if a.shape[0] * b.shape[1] * a.element_size() < _C._cpu_recycled_min_bytes:
        return _C._cpu_bulk_mm(a, b)
    return _C._cpu_bulk_mm(a, b, out=_C._cpu_empty_recycled([a.shape[0], b.shape[1]], a))


class _ProjectionIntoCache(torch.autograd.Function):
    """``F.linear(input, weight, bias)`` for 2-D CPU tensors under autograd, written into a buffer of
    rnnfused's CPU buffer cache (csrc/cpu/buffer_cache.h) instead of a fresh tensor: the [N, G*H]
    projection of a training step is tens of megabytes, which glibc maps afresh on every call (a
    page fault per 4 KiB page). Forward and backward make the products that F.linear and its
    autograd make (grad_input = grad W, grad_weight = grad^T x, grad_bias = the sum of grad's rows)
    through _C._cpu_bulk_mm: the same ATen calls (addmm or mm), so results bitwise those of
    F.linear, except where oneDNN's brgemm micro-kernel runs them instead (processors other than
    Intel's with AVX-512, where torch's MKL runs AVX2 kernels: csrc/cpu/bulk_gemm.h); the backward
    is itself differentiable (double backward: recorded, it makes the ATen calls). grad_input goes
    into the cache as well where no graph is being recorded."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        out = _C._cpu_empty_recycled([input.shape[0], weight.shape[0]], input)
        _C._cpu_bulk_mm(input, weight.t(), bias, out)
        ctx.save_for_backward(input, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        with _gemm_threads(grad, (grad, input, weight)):
            grad_input = _cache_mm(grad, weight) if ctx.needs_input_grad[0] else None
            grad_weight = None
            if ctx.needs_input_grad[1]:
                # With create_graph the backward is recorded: the ATen call autograd knows.
                grad_weight = grad.t().mm(input) if torch.is_grad_enabled() else _C._cpu_bulk_mm(grad.t(), input)
            grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias


def _linear(input, w_ih, b_ih=None):
    """F.linear(input, w_ih, b_ih), written into a buffer that this thread keeps across calls
    where _reusable_projection allows: a projection of tens of megabytes (T * B rows of G * H
    gates) would otherwise cost a page fault per 4 KiB page on every call, about a third of the
    GEMM's own time (measured: T100 B64 H512 LSTM, 57 ms fresh vs 41 ms into a kept buffer). The
    buffer grows to the largest projection the thread has run and is freed with the thread (as
    oneDNN keeps its scratchpad, where torch.nn's LSTM writes the same projection). Under
    autograd, into a buffer of the CPU buffer cache where _cached_projection allows. On one thread
    within a one-thread period (_gemm_threads)."""
    cached = _cached_projection(input, w_ih, b_ih)  # before the scope: inside it one thread is left
    with _gemm_threads(input, (input, w_ih, b_ih)):
        return _linear_in_scope(input, w_ih, b_ih, cached)


def _linear_in_scope(input, w_ih, b_ih, cached):
    if cached:
        return _ProjectionIntoCache.apply(input, w_ih, b_ih)
    if not _reusable_projection(input, w_ih, b_ih):
        return F.linear(input, w_ih, b_ih)
    count = input.shape[0] * w_ih.shape[0]
    buffer = getattr(_projection_buffers, "buffer", None)
    if buffer is None or buffer.dtype != input.dtype or buffer.numel() < count:
        _projection_buffers.buffer = None  # the old one is freed before the new one is allocated
        # A normal tensor even when made under inference_mode: an inference tensor could not be
        # written to by a later call outside it.
        with torch.inference_mode(False):
            buffer = _projection_buffers.buffer = torch.empty(count, dtype=input.dtype)
    out = buffer[:count].view(input.shape[0], w_ih.shape[0])
    return _C._cpu_bulk_mm(input, w_ih.t(), b_ih, out)


def _project(input, w_ih, b_ih):
    _check_device(input)
    return _linear(input, w_ih, b_ih)


def _project_summed_bias(input, w_ih, b_ih, b_hh):
    """For the cells whose pre-activations are plain sums x W_ih^T + b_ih + h W_hh^T + b_hh (LSTM,
    Elman RNN): ``gates_x = x W_ih^T`` and the bias ``b_ih + b_hh`` that the recurrence op adds at
    every step. The projection then writes no bias into its [N, G*H] rows (a linear with a bias
    first copies it into every row) and its backward sums no gradient over those rows (the op's
    bias gradient is the same sum). In float32 and float64 only: a 16-bit sum b_ih + b_hh would be
    rounded to 16 bits (the op adds b_hh in float32), and where autocast lowers the product's
    precision torch.nn rounds b_ih with it."""
    _check_device(input)
    device = input.device.type
    if input.dtype == torch.float64:
        summed = True
    elif input.dtype == torch.float32:
        summed = not ((device == "cpu" or device == "cuda") and torch.is_autocast_enabled(device))
    else:
        summed = False
    if b_ih is None or b_hh is None or not summed:
        return _linear(input, w_ih, b_ih), b_hh
    return _linear(input, w_ih), b_ih + b_hh


def _summed_bias(b_ih, b_hh):
    """(b_ih, b_hh) for the inference op of the LSTM and Elman RNN: (None, b_ih + b_hh) where both
    are given, as _project_summed_bias does in float32 and float64."""
    if b_ih is None or b_hh is None:
        return b_ih, b_hh
    return None, b_ih + b_hh


def lstm_layer(input, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, batch_sizes=None, reverse=False, training=True,
               recurrent_mask=None, zoneout=None, cell_zoneout=None):
    """LSTM layer (with a projection when ``w_hr`` is given). Returns ``output, h_n, c_n``.

    ``training=False`` (eval mode) keeps no workspace for backward, so that inference, exported
    programs included, stores nothing extra; a backward through it recomputes the forward."""
    if (w_hr is None and recurrent_mask is None and zoneout is None and cell_zoneout is None
            and _infers_from_input(input, w_ih, w_hh, h0, batch_sizes, (input, w_ih, w_hh, b_ih, b_hh, h0, c0))):
        b_ih, b_hh = _summed_bias(b_ih, b_hh)
        return _ops_ns.layer_inference("lstm", input, w_ih, b_ih, w_hh, b_hh, h0, c0, batch_sizes, reverse)
    gates_x, bias = _project_summed_bias(input, w_ih, b_ih, b_hh)
    training = _records_workspace(training, gates_x, w_hh, bias, w_hr, h0, c0)
    output, h_n, c_n, _ = _ops_ns.lstm_recurrence(gates_x, w_hh, bias, w_hr, h0, c0, batch_sizes, reverse, training,
                                                  recurrent_mask, zoneout, cell_zoneout)
    return output, h_n, c_n


def gru_layer(input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes=None, reverse=False, training=True, recurrent_mask=None,
              zoneout=None):
    """GRU layer. Returns ``output, h_n``. ``training`` as for :func:`lstm_layer`."""
    if recurrent_mask is None and zoneout is None and _infers_from_input(input, w_ih, w_hh, h0, batch_sizes,
                                                                          (input, w_ih, w_hh, b_ih, b_hh, h0)):
        output, h_n, _ = _ops_ns.layer_inference("gru", input, w_ih, b_ih, w_hh, b_hh, h0, None, batch_sizes, reverse)
        return output, h_n
    gates_x = _project(input, w_ih, b_ih)
    training = _records_workspace(training, gates_x, w_hh, b_hh, h0)
    output, h_n, _ = _ops_ns.gru_recurrence(gates_x, w_hh, b_hh, h0, batch_sizes, reverse, training, recurrent_mask,
                                            zoneout)
    return output, h_n


def _elman_layer(nonlinearity, input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes, reverse, recurrent_mask, zoneout):
    if recurrent_mask is None and zoneout is None and _infers_from_input(input, w_ih, w_hh, h0, batch_sizes,
                                                                          (input, w_ih, w_hh, b_ih, b_hh, h0)):
        b_ih, b_hh = _summed_bias(b_ih, b_hh)
        output, h_n, _ = _ops_ns.layer_inference(f"rnn_{nonlinearity}", input, w_ih, b_ih, w_hh, b_hh, h0, None,
                                                 batch_sizes, reverse)
        return output, h_n
    gates_x, bias = _project_summed_bias(input, w_ih, b_ih, b_hh)
    recurrence = getattr(_ops_ns, f"rnn_{nonlinearity}_recurrence")
    return recurrence(gates_x, w_hh, bias, h0, batch_sizes, reverse, recurrent_mask, zoneout)


def rnn_tanh_layer(input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes=None, reverse=False, recurrent_mask=None,
                   zoneout=None):
    """Elman RNN layer with tanh. Returns ``output, h_n``."""
    return _elman_layer("tanh", input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes, reverse, recurrent_mask, zoneout)


def rnn_relu_layer(input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes=None, reverse=False, recurrent_mask=None,
                   zoneout=None):
    """Elman RNN layer with ReLU. Returns ``output, h_n``."""
    return _elman_layer("relu", input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes, reverse, recurrent_mask, zoneout)


# ---------------------------------------------------------------------------------------------------
# LayerNorm LSTM and GRU (Ba et al. 2016). Shapes as above, plus the gains and
# biases of the normalizations: ih_gain, ih_bias, hh_gain, hh_bias [G*H]; cell_gain, cell_bias [H].
#   gates_x = LN(x W_ih^T) ih_gain + ih_bias + b_ih                   (here, one op for all steps)
#   hh_t    = LN(h_{t-1} W_hh^T) hh_gain + hh_bias + b_hh             (in the fused op, every step)
# then the cell's gates from gates_x and hh_t as in torch.nn, and for the LSTM
#   c~_t = f c_{t-1} + i g,   h~_t = o tanh(LN(c~_t) cell_gain + cell_bias)   (times W_hr^T with a projection).
# LN normalizes each row over its G*H (or H) values: (v - mean) / sqrt(var + eps), biased variance.
# ---------------------------------------------------------------------------------------------------


def _normalized_input_projection(input, w_ih, b_ih, ih_gain, ih_bias, eps):
    _check_device(input)
    gates_x = F.layer_norm(F.linear(input, w_ih), (w_ih.shape[0],), ih_gain, ih_bias, eps)
    return gates_x if b_ih is None else gates_x + b_ih


def layer_norm_lstm_layer(input, w_ih, w_hh, b_ih, b_hh, ih_gain, ih_bias, hh_gain, hh_bias, cell_gain, cell_bias, h0,
                          c0, batch_sizes=None, reverse=False, training=True, eps=1e-5, recurrent_mask=None,
                          zoneout=None, cell_zoneout=None, w_hr=None):
    """LayerNorm LSTM layer (with a projection h_t = W_hr h~_t when ``w_hr`` [P, H] is given; then
    w_hh is [4H, P] and h0 [B, P]). Returns ``output, h_n, c_n``. ``training`` as for
    :func:`lstm_layer`."""
    gates_x = _normalized_input_projection(input, w_ih, b_ih, ih_gain, ih_bias, eps)
    training = _records_workspace(training, gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias, h0, c0, w_hr)
    output, h_n, c_n, _ = _ops_ns.layer_norm_lstm_recurrence(gates_x, w_hh, b_hh, hh_gain, hh_bias, cell_gain, cell_bias,
                                                             h0, c0, batch_sizes, reverse, training, eps,
                                                             recurrent_mask, zoneout, cell_zoneout, w_hr)
    return output, h_n, c_n


def layer_norm_gru_layer(input, w_ih, w_hh, b_ih, b_hh, ih_gain, ih_bias, hh_gain, hh_bias, h0, batch_sizes=None,
                         reverse=False, training=True, eps=1e-5, recurrent_mask=None, zoneout=None):
    """LayerNorm GRU layer. Returns ``output, h_n``."""
    gates_x = _normalized_input_projection(input, w_ih, b_ih, ih_gain, ih_bias, eps)
    training = _records_workspace(training, gates_x, w_hh, b_hh, hh_gain, hh_bias, h0)
    output, h_n, _ = _ops_ns.layer_norm_gru_recurrence(gates_x, w_hh, b_hh, hh_gain, hh_bias, h0, batch_sizes, reverse,
                                                       training, eps, recurrent_mask, zoneout)
    return output, h_n
