"""The cases of the benchmark suite (shapes, presets, filters) and their measurement.

Every case is measured for rnnfused and for torch.nn side by side: the same shape, the same
weights (torch.nn's module loads rnnfused's state_dict), the same inputs, one right after the
other, with the same precision settings. Optional baselines (FlashRNN, haste) join when they
are importable.
"""
import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

import rnnfused

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
MODES = ("fwd", "fwdbwd")
DIRECTIONS = ("uni", "bi")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem size. ``packed``: variable lengths (uniform in [T/4, T]) as a PackedSequence;
    ``proj``: LSTM proj_size (other cells skip such a shape)."""

    name: str
    steps: int
    batch: int
    input_size: int
    hidden: int
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    proj: int = 0

    @property
    def direction(self):
        return "bi" if self.bidirectional else "uni"

    def applies_to(self, cell):
        return self.proj == 0 or cell == "lstm"


# The shapes people compare recurrent networks on. Quick versions are shortened in T (or size)
# to keep the whole quick run near two minutes on a 2-core CPU; their names say so.
FULL_SHAPES = [
    Shape("fastrnns", 100, 64, 512, 512),
    Shape("batch1", 100, 1, 256, 256),
    Shape("small_batch", 100, 16, 256, 256),
    Shape("flashrnn", 1024, 16, 768, 768),
    Shape("large_batch", 100, 256, 1024, 1024),
    Shape("two_layers", 100, 16, 256, 256, layers=2),
    Shape("bidirectional", 100, 16, 256, 256, bidirectional=True),
    Shape("packed", 100, 16, 256, 256, packed=True),
    Shape("proj", 100, 16, 256, 512, proj=128),
]
QUICK_SHAPES = [
    Shape("fastrnns_T25", 25, 64, 512, 512),
    Shape("batch1_T50", 50, 1, 256, 256),
    Shape("small_batch_T50", 50, 16, 256, 256),
    Shape("two_layers_T50", 50, 16, 256, 256, layers=2),
    Shape("bidirectional_T50", 50, 16, 256, 256, bidirectional=True),
    Shape("packed_T50", 50, 16, 256, 256, packed=True),
    Shape("proj_T50", 50, 16, 256, 512, proj=128),
]
PRESETS = {
    "quick": dict(shapes=QUICK_SHAPES, min_run_time=0.5),
    "full": dict(shapes=FULL_SHAPES, min_run_time=1.0),
}


def parse_shape(text):
    """``T,B,I,H,layers`` (layers optional, default 1) -> Shape named ``T{T}_B{B}_I{I}_H{H}_L{layers}``."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (4, 5) or not all(p.isdigit() for p in parts):
        raise ValueError(f"bad shape {text!r}: expected T,B,I,H or T,B,I,H,layers with positive integers")
    values = [int(p) for p in parts] + ([1] if len(parts) == 4 else [])
    if min(values) < 1:
        raise ValueError(f"bad shape {text!r}: every size must be at least 1")
    steps, batch, input_size, hidden, layers = values
    return Shape(f"T{steps}_B{batch}_I{input_size}_H{hidden}_L{layers}", steps, batch, input_size, hidden, layers)


def parse_list(text, allowed, what):
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise ValueError(f"bad {what} {text!r}: choose from {', '.join(allowed)}")
    return items


@dataclasses.dataclass(frozen=True)
class Case:
    cell: str
    shape: Shape
    dtype: str
    mode: str
    device: str

    @property
    def key(self):
        return f"{self.device}/{self.dtype}/{self.cell}/{self.shape.name}/{self.mode}"


def select_cases(shapes, cells, dtypes, modes, devices, directions):
    """The cross product of the filters, skipping shapes that do not apply (proj for non-LSTM)."""
    cases = []
    for device in devices:
        for dtype in dtypes:
            for shape in shapes:
                if shape.direction not in directions:
                    continue
                for cell in cells:
                    if not shape.applies_to(cell):
                        continue
                    for mode in modes:
                        cases.append(Case(cell, shape, dtype, mode, device))
    return cases


def layer_flops(case):
    """FLOPs of the GEMMs (2 per multiply-add): input projection and recurrence of every layer and
    direction, plus the projection; backward costs twice forward (dX/dh and dW), so fwd+bwd is
    3x forward. Pointwise gate math is not counted."""
    shape = case.shape
    directions = 2 if shape.bidirectional else 1
    width = shape.proj or shape.hidden
    rows = packed_rows(shape)
    gates = GATES[case.cell] * shape.hidden
    total = 0
    for layer in range(shape.layers):
        layer_input = shape.input_size if layer == 0 else directions * width
        per_direction = 2 * rows * gates * (layer_input + width) + (2 * rows * shape.hidden * width if shape.proj else 0)
        total += directions * per_direction
    return total * (3 if case.mode == "fwdbwd" else 1)


def sequence_lengths(shape):
    if not shape.packed:
        return [shape.steps] * shape.batch
    generator = torch.Generator().manual_seed(1)
    low = max(1, shape.steps // 4)
    lengths = torch.randint(low, shape.steps + 1, (shape.batch,), generator=generator)
    lengths[0] = shape.steps
    return lengths.tolist()


def packed_rows(shape):
    return sum(sequence_lengths(shape))


def build_modules(case):
    """rnnfused's module and torch.nn's with the same weights, on the case's device and dtype."""
    shape = case.shape
    kwargs = dict(num_layers=shape.layers, bidirectional=shape.bidirectional)
    if case.cell == "lstm":
        ours_cls, ref_cls = rnnfused.LSTM, nn.LSTM
        if shape.proj:
            kwargs["proj_size"] = shape.proj
    elif case.cell == "gru":
        ours_cls, ref_cls = rnnfused.GRU, nn.GRU
    else:
        ours_cls, ref_cls = rnnfused.RNN, nn.RNN
        kwargs["nonlinearity"] = case.cell.split("_")[1]
    torch.manual_seed(0)
    ours = ours_cls(shape.input_size, shape.hidden, **kwargs)
    ref = ref_cls(shape.input_size, shape.hidden, **kwargs)
    ref.load_state_dict(ours.state_dict())
    dtype = DTYPES[case.dtype]
    return ours.to(case.device, dtype), ref.to(case.device, dtype)


def build_input(case):
    """Random input (never zeros): [T, B, I], or a PackedSequence of it with random lengths."""
    shape = case.shape
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape.steps, shape.batch, shape.input_size, generator=generator)
    x = x.to(case.device, DTYPES[case.dtype]).requires_grad_(case.mode == "fwdbwd")
    if shape.packed:
        return torch.nn.utils.rnn.pack_padded_sequence(x, sequence_lengths(shape), enforce_sorted=False)
    return x


def _outputs(result):
    output, state = result
    output = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    states = state if isinstance(state, tuple) else (state,)
    return output, states


def make_step(module, inputs, mode):
    """One timed call: forward under no_grad, or forward + backward to the input and all weights."""
    params = [p for p in module.parameters()]
    leaf = inputs.data if isinstance(inputs, nn.utils.rnn.PackedSequence) else inputs

    if mode == "fwd":

        def step():
            with torch.no_grad():
                module(inputs)

        return step

    def step():
        output, states = _outputs(module(inputs))
        loss = output.float().sum() + sum(s.float().sum() for s in states)
        torch.autograd.grad(loss, [leaf] + params)

    return step


@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    iqr_s: float
    runs: int

    @staticmethod
    def of(step, min_run_time, device):
        for _ in range(2):  # warm-up: first-call allocations, lazy initialisation, autotuning
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        measurement = Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time)
        times = measurement.times
        return Timing(measurement.median, min(times), max(times), measurement.iqr, len(times))


def gemm_rate(device, dtype, size=1024, min_run_time=0.2):
    """GFLOP/s of one square torch.mm on this device and dtype: the roofline reference of the run."""
    dt = DTYPES[dtype]
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(size, size, generator=generator).to(device, dt)
    b = torch.randn(size, size, generator=generator).to(device, dt)
    timing = Timing.of(lambda: torch.mm(a, b), min_run_time, device)
    return 2 * size**3 / timing.median_s / 1e9


def optional_baselines():
    """FlashRNN and haste, when importable (never required). Returns {name: module or None}."""
    found = {}
    for name, module_name in (("flashrnn", "flashrnn"), ("haste", "haste_pytorch")):
        try:
            found[name] = __import__(module_name)
        except Exception:  # not installed, or fails to import: simply not measured
            found[name] = None
    return found


def run_case(case, min_run_time, gemm_gflops):
    """Measures both sides of one case and returns the result row (a dict)."""
    ours, ref = build_modules(case)
    inputs = build_input(case)
    ours_time = Timing.of(make_step(ours, inputs, case.mode), min_run_time, case.device)
    ref_time = Timing.of(make_step(ref, inputs, case.mode), min_run_time, case.device)
    flops = layer_flops(case)
    shape = case.shape
    rnnfused_gflops = flops / ours_time.median_s / 1e9
    return {
        "key": case.key,
        "cell": case.cell,
        "shape": shape.name,
        "T": shape.steps,
        "B": shape.batch,
        "I": shape.input_size,
        "H": shape.hidden,
        "layers": shape.layers,
        "direction": shape.direction,
        "packed": shape.packed,
        "proj": shape.proj,
        "dtype": case.dtype,
        "mode": case.mode,
        "device": case.device,
        "rnnfused": dataclasses.asdict(ours_time),
        "torch_nn": dataclasses.asdict(ref_time),
        "speedup": ref_time.median_s / ours_time.median_s,
        "us_per_step": ours_time.median_s / shape.steps * 1e6,
        "torch_nn_us_per_step": ref_time.median_s / shape.steps * 1e6,
        "flops": flops,
        "gflops": rnnfused_gflops,
        "gemm_peak_gflops": gemm_gflops,
        "fraction_of_gemm": rnnfused_gflops / gemm_gflops if gemm_gflops and not math.isnan(gemm_gflops) else None,
    }


def default_devices() -> list:
    devices = ["cpu"]
    if torch.cuda.is_available() and rnnfused.cuda_built():
        devices.append("cuda")
    return devices


def precision_settings() -> dict:
    """Settings that change float32 results; they apply to both sides alike."""
    settings = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    if torch.cuda.is_available():
        settings["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        settings["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return settings


def describe_skip(case) -> Optional[str]:
    """Why a case cannot run here (None when it can)."""
    if case.device == "cuda" and not (torch.cuda.is_available() and rnnfused.cuda_built()):
        return "no GPU or no CUDA kernels in this build"
    return None
