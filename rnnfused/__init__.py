"""rnnfused: fused LSTM, GRU and Elman RNN kernels for PyTorch.

``rnnfused.LSTM``, ``GRU``, ``RNN``, ``LSTMCell``, ``GRUCell`` and ``RNNCell`` are drop-in
replacements for their torch.nn namesakes: same constructor, parameters, state_dict, outputs and
errors, computed by rnnfused's own C++ (CPU) and CUDA (GPU) kernels. ``rnnfused.LayerNormLSTM`` and
``LayerNormGRU`` add layer normalization.
"""
import torch  # noqa: F401  (loads libtorch, which the extension links against, first)

from . import _C, _ops, functional  # noqa: F401
from .modules import GRU, LSTM, RNN, GRUCell, LayerNormGRU, LayerNormLSTM, LSTMCell, RNNCell
from .convert import convert
from . import _autocast  # noqa: F401  (autocast rules of the recurrence ops)

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "LayerNormLSTM", "LayerNormGRU", "convert", "functional", "cuda_built", "build_info",
           "empty_cpu_cache", "cpu_cache_info"]


def cuda_built():
    """Whether this build of rnnfused carries its CUDA kernels."""
    return _C.cuda_built()


def build_info():
    """What this build runs on: CUDA kernels present, CPU instruction set ('avx512', 'avx2' or
    'default'), the CPU time loop ('auto', 'fused' or 'steps'; see RNNFUSED_CPU_PATH), the GEMM
    behind the per-step path, and what runs the large float32 GEMMs ('brgemm': oneDNN's micro-kernel,
    on processors other than Intel's with AVX-512, see RNNFUSED_CPU_GEMM; 'blas' elsewhere)."""
    return {"version": __version__, "cuda": _C.cuda_built(), "cpu_isa": _C.cpu_isa(), "cpu_path": _C.cpu_path(),
            "cpu_blas": _C.cpu_blas(), "cpu_gemm": "brgemm" if _C._cpu_step_gemm_uses_brgemm() else "blas"}


def empty_cpu_cache():
    """Returns to the system the large CPU buffers that rnnfused keeps for its next calls.

    rnnfused's CPU ops allocate their outputs, workspaces and row-wise gradients of 4 MiB and more
    through a cache: a freed buffer is kept and reused by the next call that fits it, instead of
    being unmapped and faulted in again, page by page, on every call. The free buffers held are
    capped by RNNFUSED_CPU_BUFFER_CACHE_MB (megabytes, read when the cache is first used; default
    1024, 0 turns the cache off). Buffers that live tensors hold are not affected."""
    _C.empty_cpu_buffer_cache()


def cpu_cache_info():
    """The CPU buffer cache's state (see empty_cpu_cache): ``held_bytes`` (free buffers kept),
    ``lent_bytes`` (buffers live tensors hold), ``limit_bytes`` (the cap on held_bytes) and
    ``reuses`` (allocations served by a kept buffer so far)."""
    held, lent, limit, reuses = _C.cpu_buffer_cache_stats()
    return {"held_bytes": held, "lent_bytes": lent, "limit_bytes": limit, "reuses": reuses}
