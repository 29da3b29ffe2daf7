"""A small forward + backward workload over every CUDA kernel of rnnfused, for compute-sanitizer
(memcheck, racecheck, synccheck: tests/test_cuda.py::test_compute_sanitizer).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --kernel-name kns=rnnfused \\
        --report-api-errors no --error-exitcode 1 python tests/cuda_memcheck_workload.py

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so that a read or write
past the end of a buffer leaves the allocation and memcheck sees it (with the caching allocator
it would land in a neighbouring tensor of the same pool). tests/test_cuda.py runs this under
memcheck when compute-sanitizer is installed.

Covered: the four recurrences, forward and reverse directions (bidirectional), two layers,
padded and unsorted packed batches (steps whose batch shrinks and grows), the LSTM projection,
layers without bias, float32 / float64 / bfloat16 (the rounding path), training (workspace
recorded) and eval (no workspace; backward recomputes the forward), a zero-length call, and the
self-test kernels of csrc/cuda/selftest_kernels.cuh; all of it on the standard and on the persistent
path (RNNFUSED_CUDA_PATH). Then the regularization options (recurrent dropout, zoneout: the
standard path's mask and zoneout kernels) and LayerNormLSTM / LayerNormGRU (their per-row kernels,
also with more hidden units than a block has threads).
"""
import os
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfused


def run_layer(cls, kwargs, dtype, packed, train, hidden=8):
    torch.manual_seed(0)
    layer = cls(6, hidden, num_layers=2, bidirectional=True, dtype=dtype, **kwargs).cuda()
    layer.train(train)
    x = torch.randn(7, 5, 6, dtype=dtype, device="cuda", requires_grad=True)
    arg = pack_padded_sequence(x, torch.tensor([3, 7, 1, 5, 7]), enforce_sorted=False) if packed else x
    out, state = layer(arg)
    out = out.data if packed else out
    states = state if isinstance(state, tuple) else (state,)
    loss = out.float().square().sum() + sum(s.float().square().sum() for s in states)
    loss.backward()


def run_empty():
    ops = torch.ops.rnnfused
    gates_x = torch.empty(0, 4 * 3, device="cuda", requires_grad=True)
    w_hh = torch.randn(4 * 3, 3, device="cuda", requires_grad=True)
    h0 = torch.randn(2, 3, device="cuda", requires_grad=True)
    c0 = torch.randn(2, 3, device="cuda", requires_grad=True)
    output, h_n, c_n, _ = ops.lstm_recurrence(gates_x, w_hh, None, None, h0, c0, None, False, True)
    (output.sum() + h_n.sum() + c_n.sum()).backward()


def run_selftests():
    """The correct forms of the simulator's self-test kernels: shared memory with barriers, warp
    shuffles and votes, atomics, a cooperative launch with a grid barrier, mma fragments."""
    device = "cuda"
    run = rnnfused._C._cuda_selftest
    run("neighbour_exchange", torch.arange(64.0, device=device))
    run("scale", torch.ones(1000, device=device))
    run("warp_sum", torch.ones(32, device=device))
    run("grid_exchange", torch.ones(128, device=device))
    run("divergent_barrier", torch.ones(64, device=device))
    run("atomic_sum", torch.ones(300, device=device))
    run("shuffle", torch.ones(64, device=device, dtype=torch.float64))
    for name in ("mma_bf16", "mma_f16"):
        run(name, torch.ones(16 * 16 + 2 * 16 * 8, device=device))


def main(argv):
    """``--light``: float32 only, one input form and mode per layer (for the slower
    racecheck/synccheck runs; memcheck runs the whole workload)."""
    light = "--light" in argv
    if not (torch.cuda.is_available() and rnnfused.cuda_built()):
        print("needs a GPU and a CUDA build of rnnfused")
        return 2
    layers = [
        (rnnfused.LSTM, {}),
        (rnnfused.LSTM, {"proj_size": 3}),
        (rnnfused.LSTM, {"bias": False}),
        (rnnfused.GRU, {}),
        (rnnfused.GRU, {"bias": False}),
        (rnnfused.RNN, {"nonlinearity": "tanh"}),
        (rnnfused.RNN, {"nonlinearity": "relu"}),
    ]
    dtypes = (torch.float32,) if light else (torch.float32, torch.float64, torch.bfloat16)
    forms = (True,) if light else (False, True)
    modes = (True,) if light else (True, False)
    # Both CUDA paths: the per-step kernels and the persistent (cooperative) kernels.
    for path in ("standard", "persistent"):
        os.environ["RNNFUSED_CUDA_PATH"] = path
        for cls, kwargs in layers:
            for dtype in dtypes:
                for packed in forms:
                    for train in modes:
                        run_layer(cls, kwargs, dtype, packed, train)
    os.environ.pop("RNNFUSED_CUDA_PATH")
    regularized = [
        (rnnfused.LSTM, {"recurrent_dropout": 0.3, "zoneout": 0.2, "cell_zoneout": 0.1}),
        (rnnfused.GRU, {"recurrent_dropout": 0.3, "zoneout": 0.2}),
        (rnnfused.RNN, {"zoneout": 0.2}),
        (rnnfused.LayerNormLSTM, {}),
        (rnnfused.LayerNormLSTM, {"recurrent_dropout": 0.3, "zoneout": 0.2, "cell_zoneout": 0.1}),
        (rnnfused.LayerNormLSTM, {"proj_size": 3, "zoneout": 0.2}),
        (rnnfused.LayerNormGRU, {"bias": False, "zoneout": 0.2}),
    ]
    for cls, kwargs in regularized:
        for dtype in dtypes:
            for packed in forms:
                for train in modes:
                    run_layer(cls, kwargs, dtype, packed, train)
    for cls in (rnnfused.LayerNormLSTM, rnnfused.LayerNormGRU):
        run_layer(cls, {}, torch.float32, True, True, hidden=300)
    run_empty()
    run_selftests()
    torch.cuda.synchronize()
    print("rnnfused CUDA workload done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
