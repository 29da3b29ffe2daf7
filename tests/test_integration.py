"""rnnfused inside the rest of PyTorch: DistributedDataParallel, autocast, torch.compile of a whole
training step, torch.export, and the example scripts (quick runs)."""
import copy
import datetime
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rnnfused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available() and rnnfused.cuda_built()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and rnnfused's CUDA kernels")

# mode -> (torch.nn class, rnnfused class, extra constructor arguments)
MODES = {
    "lstm": (nn.LSTM, rnnfused.LSTM, {}),
    "gru": (nn.GRU, rnnfused.GRU, {}),
    "rnn_tanh": (nn.RNN, rnnfused.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, rnnfused.RNN, {"nonlinearity": "relu"}),
}


def twins(mode, input_size, hidden_size, seed=0, **kwargs):
    """torch.nn's layer and rnnfused's with the same weights (float32)."""
    ref_cls, our_cls, extra = MODES[mode]
    torch.manual_seed(seed)
    ref = ref_cls(input_size, hidden_size, **extra, **kwargs)
    ours = our_cls(input_size, hidden_size, **extra, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


class SequenceRegressor(nn.Module):
    """A small LSTM + Linear model, as in the examples."""

    def __init__(self, lib=rnnfused, dtype=torch.float64):
        super().__init__()
        self.rnn = lib.LSTM(3, 8, num_layers=2, batch_first=True, dtype=dtype)
        self.head = nn.Linear(8, 2, dtype=dtype)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.head(output[:, -1])


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_data(dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 3, generator=generator, dtype=torch.float64).to(dtype)
    y = torch.randn(8, 2, generator=generator, dtype=torch.float64).to(dtype)
    return x, y


def _ddp_worker(rank, world_size, port, backend, dtype, result_path):
    """One DDP rank: trains on its share of the batch for two SGD steps, saves the gradients of the
    first step and the parameters after the second."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # A short timeout: a rank that fails must not leave the other waiting for the default 30 minutes.
    torch.distributed.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.manual_seed(0)
        model = SequenceRegressor(dtype=dtype).to(device)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x, y = _ddp_data(dtype)
        share = x.shape[0] // world_size
        x, y = x[rank * share : (rank + 1) * share].to(device), y[rank * share : (rank + 1) * share].to(device)
        grads = None
        for _ in range(2):
            optimizer.zero_grad()
            F.mse_loss(ddp(x), y).backward()
            if grads is None:
                grads = [p.grad.detach().cpu().clone() for p in model.parameters()]
            optimizer.step()
        params = [p.detach().cpu().clone() for p in model.parameters()]
        torch.save({"grads": grads, "params": params}, f"{result_path}.{rank}")
        # Both ranks done before either tears gloo down: a rank that destroys the group while the
        # other's gloo threads still talk to it aborts ("terminate called without an active exception").
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _single_process_reference(dtype, device):
    torch.manual_seed(0)
    model = SequenceRegressor(dtype=dtype).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = (t.to(device) for t in _ddp_data(dtype))
    grads = None
    for _ in range(2):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        if grads is None:
            grads = [p.grad.detach().cpu().clone() for p in model.parameters()]
        optimizer.step()
    return grads, [p.detach().cpu().clone() for p in model.parameters()]


def _run_ddp(backend, world_size, dtype, device, tolerance):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "result")
        torch.multiprocessing.spawn(
            _ddp_worker, args=(world_size, _free_port(), backend, dtype, path), nprocs=world_size, join=True
        )
        results = [torch.load(f"{path}.{rank}") for rank in range(world_size)]
    grads, params = _single_process_reference(dtype, device)
    for rank, result in enumerate(results):
        # DDP averages the gradients of the ranks' equal shares: the full batch's mean-loss gradient.
        for index, (got, expected) in enumerate(zip(result["grads"], grads)):
            torch.testing.assert_close(got, expected, **tolerance, msg=lambda m: f"rank {rank} grad {index}: {m}")
        for index, (got, expected) in enumerate(zip(result["params"], params)):
            torch.testing.assert_close(got, expected, **tolerance, msg=lambda m: f"rank {rank} param {index}: {m}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_gloo_cpu_matches_single_process():
    _run_ddp("gloo", 2, torch.float64, torch.device("cpu"), dict(rtol=1e-10, atol=1e-12))


@pytest.mark.skipif(
    not (CUDA and torch.distributed.is_available() and torch.distributed.is_nccl_available()),
    reason="needs a GPU, rnnfused's CUDA kernels and NCCL",
)
def test_ddp_nccl_cuda_matches_single_process():
    # One rank per GPU: two ranks with two GPUs, else one (NCCL refuses two ranks on one GPU).
    world_size = min(2, torch.cuda.device_count())
    _run_ddp("nccl", world_size, torch.float32, torch.device("cuda", 0), dict(rtol=1e-4, atol=1e-6))


# ----------------------------------------------------------------------------------------------
# Autocast
# ----------------------------------------------------------------------------------------------


def _relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


def _autocast_run(module, x, device_type, dtype, weights):
    """Forward and backward under autocast; returns output, final state and all gradients."""
    x = x.clone().requires_grad_()
    module.zero_grad()
    with torch.autocast(device_type, dtype=dtype):
        output, state = module(x)
        h_n = state[0] if isinstance(state, tuple) else state
        loss = (output.float() * weights).sum()
    loss.backward()
    return output, h_n, [x.grad] + [p.grad for p in module.parameters()]


def _float64_reference(ref, x, weights):
    ref64 = copy.deepcopy(ref).double()
    x64 = x.double().requires_grad_()
    output, state = ref64(x64)
    h_n = state[0] if isinstance(state, tuple) else state
    (output * weights.double()).sum().backward()
    return output.detach(), h_n.detach(), [x64.grad] + [p.grad for p in ref64.parameters()]


def _check_autocast(mode, device, dtype, expect_same_dtype=True):
    ref, ours = twins(mode, 6, 16, num_layers=2, bidirectional=True)
    ref, ours = ref.to(device), ours.to(device)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, 6, generator=generator).to(device)
    weights = torch.randn(12, 4, 32, generator=generator).to(device)
    out64, h64, grads64 = _float64_reference(ref, x, weights)

    our_out, our_h, our_grads = _autocast_run(ours, x, device.type, dtype, weights)
    try:
        ref_out, ref_h, ref_grads = _autocast_run(ref, x, device.type, dtype, weights)
        ref_path = "default"
    except RuntimeError as error:
        # torch.nn.LSTM on the CPU runs oneDNN's LSTM in bfloat16 under autocast, which fails on CPUs
        # without AVX-512 ("could not create a primitive descriptor"). Its native path (oneDNN off)
        # then gives the reference values, and torch's CPU autocast policy for that oneDNN layer
        # (lower precision) the expected dtype.
        if not (mode == "lstm" and device.type == "cpu" and "primitive descriptor" in str(error)):
            raise
        with torch.backends.mkldnn.flags(enabled=False):
            ref_out, ref_h, ref_grads = _autocast_run(ref, x, device.type, dtype, weights)
        ref_path = "native (oneDNN bfloat16 LSTM unsupported on this CPU)"
        expect_same_dtype = False
        assert our_out.dtype == dtype

    if expect_same_dtype:
        assert our_out.dtype == ref_out.dtype, f"output dtype {our_out.dtype}, torch.nn: {ref_out.dtype}"
        assert our_h.dtype == ref_h.dtype, f"h_n dtype {our_h.dtype}, torch.nn: {ref_h.dtype}"
    for p, g in zip(ours.parameters(), our_grads[1:]):
        assert g.dtype == p.dtype, "parameter gradients keep the parameters' dtype"

    # Values: close to torch.nn's at the precision of the autocast dtype, and no further from the
    # float64 result than torch.nn's (up to a factor of 2 and a small epsilon).
    tolerance = dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(our_out.float(), ref_out.float(), **tolerance)
    pairs = [("output", our_out, ref_out, out64), ("h_n", our_h, ref_h, h64)]
    pairs += [(f"grad {i}", a, b, c) for i, (a, b, c) in enumerate(zip(our_grads, ref_grads, grads64))]
    for what, got, theirs, exact in pairs:
        ours_error, ref_error = _relative_error(got, exact), _relative_error(theirs, exact)
        # A ReLU unit whose pre-activation lies within rounding of zero can land on either side of
        # it, which switches its derivative between 0 and 1: the ReLU RNN's gradients at low
        # precision then depend on which few units flipped (in rnnfused, in torch.nn or in both).
        # Its gradients get an absolute allowance instead of the tight epsilon.
        epsilon = 5e-2 if (mode == "rnn_relu" and what.startswith("grad")) else 2e-3
        assert ours_error <= 2 * ref_error + epsilon, (
            f"{mode} {what}: rnnfused relative error {ours_error:.2e} vs torch.nn ({ref_path}) {ref_error:.2e}"
        )


@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_cpu_bfloat16_matches_torch_nn(mode):
    _check_autocast(mode, torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("mode", ["gru", "rnn_tanh"])
def test_autocast_cpu_float16_matches_torch_nn(mode):
    _check_autocast(mode, torch.device("cpu"), torch.float16)


@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_cpu_packed_input(mode):
    """A packed, unsorted batch under autocast: same dtype and close values as torch.nn."""
    ref, ours = twins(mode, 5, 8, bidirectional=True, batch_first=True)
    x = torch.randn(4, 7, 5)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 7, 5, 1]), batch_first=True, enforce_sorted=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        our_out, _ = ours(packed)
        context = torch.backends.mkldnn.flags(enabled=mode != "lstm")  # see _check_autocast
        with context:
            ref_out, _ = ref(packed)
    if mode != "lstm":
        assert our_out.data.dtype == ref_out.data.dtype
    torch.testing.assert_close(our_out.data.float(), ref_out.data.float(), rtol=3e-2, atol=3e-2)


def test_autocast_leaves_float64_alone():
    _, ours = twins("lstm", 4, 6)
    ours = ours.double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = ours(x)
    outside, _ = ours(x)
    assert inside.dtype == torch.float64
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


@pytest.mark.parametrize(
    "mode",
    [
        "gru",
        "rnn_tanh",
        "lstm",
    ],
)
def test_autocast_cpu_cells_dtype(mode):
    classes = {"lstm": (nn.LSTMCell, rnnfused.LSTMCell), "gru": (nn.GRUCell, rnnfused.GRUCell),
               "rnn_tanh": (nn.RNNCell, rnnfused.RNNCell)}
    ref_cls, our_cls = classes[mode]
    torch.manual_seed(0)
    ref = ref_cls(4, 6)
    ours = our_cls(4, 6)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, our_out = ref(x), ours(x)
    ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
    our_out = our_out[0] if isinstance(our_out, tuple) else our_out
    torch.testing.assert_close(our_out.float(), ref_out.float(), rtol=3e-2, atol=3e-2)
    assert our_out.dtype == ref_out.dtype


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_autocast_inside_torch_compile(mode):
    """A compiled model (fullgraph) under autocast: the autocast rules hold in the traced graph."""
    torch._dynamo.reset()
    _, ours = twins(mode, 4, 6, num_layers=2)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_out, _ = ours(x)
        compiled_out, _ = compiled(x)
        compiled_out.float().sum().backward()
    assert compiled_out.dtype == eager_out.dtype == (torch.float32 if mode == "gru" else torch.bfloat16)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-2, atol=1e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


@requires_cuda
@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_cuda_float16_matches_torch_nn(mode):
    _check_autocast(mode, torch.device("cuda"), torch.float16)


@requires_cuda
@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_cuda_bfloat16(mode):
    # rnnfused runs in the autocast dtype the user picked; torch.nn's cuDNN RNN casts to float16
    # whatever the autocast dtype, so only the values (not the dtype) are compared with torch.nn.
    _check_autocast(mode, torch.device("cuda"), torch.bfloat16, expect_same_dtype=False)
    _, ours = twins(mode, 6, 16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output, _ = ours.cuda()(torch.randn(5, 2, 6, device="cuda"))
    assert output.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# torch.compile and torch.export
# ----------------------------------------------------------------------------------------------


class TextModel(nn.Module):
    """Embedding + rnnfused layer + Linear, as in examples/text_classification.py (padded input)."""

    def __init__(self, kind="LSTM"):
        super().__init__()
        self.embedding = nn.Embedding(30, 8)
        self.rnn = getattr(rnnfused, kind)(8, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens):
        output, _ = self.rnn(self.embedding(tokens))
        return self.head(output[:, -1])


def _text_batch(seed, batch=6, steps=9):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (batch, steps), generator=generator), torch.randint(0, 3, (batch,), generator=generator)


def test_compile_whole_training_step():
    """forward, loss, backward and an SGD update with momentum in one compiled function (fullgraph
    where this torch can trace backward), against the same steps run eagerly."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = TextModel()
    compiled_model = copy.deepcopy(eager_model)

    def make_step(model):
        params = list(model.parameters())
        buffers = [torch.zeros_like(p) for p in params]

        def step(tokens, labels):
            loss = F.cross_entropy(model(tokens), labels)
            loss.backward()
            with torch.no_grad():
                for p, buffer in zip(params, buffers):
                    buffer.mul_(0.9).add_(p.grad)
                    p.sub_(0.05 * buffer)
                    p.grad = None
            return loss.detach()

        return step

    eager_step = make_step(eager_model)
    traces_backward = hasattr(torch._dynamo.config, "trace_autograd_ops")
    if traces_backward:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            compiled_step = torch.compile(make_step(compiled_model), fullgraph=True)
            losses = [(eager_step(*_text_batch(i)), compiled_step(*_text_batch(i))) for i in range(3)]
    else:  # older torch: Dynamo breaks the graph at backward()
        compiled_step = torch.compile(make_step(compiled_model))
        losses = [(eager_step(*_text_batch(i)), compiled_step(*_text_batch(i))) for i in range(3)]
    for eager_loss, compiled_loss in losses:
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, got), expected in zip(compiled_model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_compiled_model_with_adam_and_clipping():
    """torch.compile(model, fullgraph=True) trained with Adam and clip_grad_norm_ (eager optimizer)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = TextModel("GRU")
    compiled_model = copy.deepcopy(eager_model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    runs = [(eager_model, eager_model), (compiled_model, compiled)]
    optimizers = [torch.optim.Adam(model.parameters(), lr=1e-2) for model, _ in runs]
    for i in range(3):
        tokens, labels = _text_batch(10 + i)
        for (model, forward), optimizer in zip(runs, optimizers):
            optimizer.zero_grad()
            F.cross_entropy(forward(tokens), labels).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
    for got, expected in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_export_inference_model(kind):
    """torch.export of an eval-mode model: the program calls rnnfused's ops (no ATen RNN), takes
    other batch sizes and lengths (dynamic shapes), and matches eager."""
    torch.manual_seed(0)
    model = TextModel(kind).eval()
    tokens, _ = _text_batch(0)
    batch, steps = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("steps", min=1, max=256)
    # Under no_grad the exported recurrences keep no backward workspace (training=False).
    with torch.no_grad():
        program = torch.export.export(model, (tokens,), dynamic_shapes=({0: batch, 1: steps},))
    code = program.graph_module.code
    op = f"rnnfused.{kind.lower()}_recurrence"
    assert code.count(op) == 4, code  # 2 layers x 2 directions
    for forbidden in ("aten.lstm", "aten.gru", "mkldnn_rnn", "lstm_cell", "gru_cell", "_VF"):
        assert forbidden not in code
    exported = program.module()
    for seed, (b, t) in enumerate([(6, 9), (2, 4), (5, 17)]):
        tokens, _ = _text_batch(seed, b, t)
        with torch.no_grad():
            torch.testing.assert_close(exported(tokens), model(tokens), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Examples: quick runs as subprocesses
# ----------------------------------------------------------------------------------------------

EXAMPLES = {
    "sequence_classification.py": ["--quick", "--epochs", "2"],
    "forecasting.py": ["--quick", "--epochs", "1", "--no-plot"],
    "text_classification.py": ["--quick", "--epochs", "1", "--train-size", "300"],
    "stacked_sequences.py": ["--quick", "--epochs", "1", "--train-size", "200"],
}


@pytest.mark.parametrize("script", list(EXAMPLES))
def test_example_quick_run(script):
    command = [sys.executable, os.path.join("examples", script), *EXAMPLES[script], "--device", "cpu"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "speed ratio (torch.nn time / rnnfused time)" in result.stdout
