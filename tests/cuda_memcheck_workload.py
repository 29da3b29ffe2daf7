"""A small forward + backward workload over every CUDA kernel of rnnfused, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python tests/cuda_memcheck_workload.py

PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc, so that a read or write
past the end of a buffer leaves the allocation and memcheck sees it (with the caching allocator
it would land in a neighbouring tensor of the same pool). tests/test_cuda.py runs this under
memcheck when compute-sanitizer is installed.

Covered: the four recurrences, forward and reverse directions (bidirectional), two layers,
padded and unsorted packed batches (steps whose batch shrinks and grows), the LSTM projection,
layers without bias, float32 / float64 / bfloat16 (the rounding path), training (workspace
recorded) and eval (no workspace; backward recomputes the forward), and a zero-length call.
"""
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfused


def run_layer(cls, kwargs, dtype, packed, train):
    torch.manual_seed(0)
    layer = cls(6, 8, num_layers=2, bidirectional=True, dtype=dtype, **kwargs).cuda()
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


def main():
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
    for cls, kwargs in layers:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for packed in (False, True):
                for train in (True, False):
                    run_layer(cls, kwargs, dtype, packed, train)
    run_empty()
    torch.cuda.synchronize()
    print("rnnfused CUDA workload done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
