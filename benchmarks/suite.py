"""What the benchmark suite measures: cells, shapes, presets, filters, and the cases they select.

A case is one (device, dtype, cell, shape, mode) combination; every case is measured for
rnnfused and each baseline (torch.nn always; FlashRNN and haste when importable) on the same
inputs and weights.
"""
import dataclasses
from typing import Optional, Sequence, Tuple

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# Gate blocks per cell: the width of W_ih / W_hh is GATES * hidden_size.
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16", "float64")
DIRECTIONS = ("uni", "bi")
MODES = ("fwd", "fwdbwd")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem size, named for the tables.

    ``steps`` (T), ``batch`` (B), ``input_size`` (I), ``hidden`` (H) and ``layers`` as in torch.nn;
    ``packed``: the batch is a PackedSequence (enforce_sorted=False) of random lengths in
    [T/4, T], the longest being T; ``proj``: the LSTM's proj_size (the other cells skip such a
    shape); ``devices``: where the shape runs (some full-size shapes have a shortened CPU twin).
    """

    name: str
    steps: int
    batch: int
    input_size: int
    hidden: int
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False
    proj: int = 0
    devices: Tuple[str, ...] = DEVICES

    @property
    def direction(self):
        return "bi" if self.bidirectional else "uni"

    def applies_to(self, cell, device):
        return (self.proj == 0 or cell == "lstm") and device in self.devices

    def describe(self):
        """E.g. 'packed_T50: T=50 B=16 I=256 H=256 layers=1, packed'."""
        extras = [label for label, present in (("bidirectional", self.bidirectional), ("packed", self.packed),
                                                (f"proj_size={self.proj}", self.proj),
                                                (f"{'/'.join(self.devices)} only", len(self.devices) < len(DEVICES)))
                  if present]
        sizes = f"T={self.steps} B={self.batch} I={self.input_size} H={self.hidden} layers={self.layers}"
        return f"{self.name}: {sizes}" + "".join(", " + extra for extra in extras)

    def as_dict(self):
        return {
            "name": self.name, "T": self.steps, "B": self.batch, "I": self.input_size, "H": self.hidden,
            "layers": self.layers, "direction": self.direction, "packed": self.packed, "proj": self.proj,
        }


# The shapes recurrent kernels are usually compared on:
#   fastrnns     PyTorch's fastrnns benchmark default (benchmarks/fastrnns in the PyTorch repo)
#   batch1       single-sequence latency
#   small_batch  B=16, where the per-step GEMM is thin and per-step overhead shows
#   flashrnn     FlashRNN's long-sequence configuration (B=16, T=1024, I=H=768)
#   large_batch  B=256, H=1024, where the per-step GEMM dominates
#   two_layers, bidirectional, packed, proj: the structural variants.
# Shapes far too slow for a 2-core CPU get a CPU twin with a shorter T (its name says so).
FULL_SHAPES = (
    Shape("fastrnns", 100, 64, 512, 512),
    Shape("batch1", 100, 1, 256, 256),
    Shape("small_batch", 100, 16, 256, 256),
    Shape("flashrnn", 1024, 16, 768, 768, devices=("cuda",)),
    Shape("flashrnn_T256", 256, 16, 768, 768, devices=("cpu",)),
    Shape("large_batch", 100, 256, 1024, 1024, devices=("cuda",)),
    Shape("large_batch_T25", 25, 256, 1024, 1024, devices=("cpu",)),
    Shape("two_layers", 100, 64, 512, 512, layers=2),
    Shape("bidirectional", 100, 64, 512, 512, bidirectional=True),
    Shape("packed", 100, 64, 512, 512, packed=True),
    Shape("proj", 100, 64, 512, 1024, proj=256),
)

# The quick preset: the same kinds of shapes, sized so that the whole run (rnnfused and torch.nn,
# forward and forward+backward, all four cells) takes about two minutes on 2 CPU cores. A quick
# shape named like a full one is that shape; the others say in their name how they differ
# (the structural variants are built on small_batch's B=16, H=256 instead of fastrnns' sizes).
QUICK_SHAPES = (
    Shape("fastrnns_T25", 25, 64, 512, 512),
    Shape("batch1", 100, 1, 256, 256),
    Shape("small_batch", 100, 16, 256, 256),
    Shape("two_layers_B16_T50", 50, 16, 256, 256, layers=2),
    Shape("bidirectional_B16_T50", 50, 16, 256, 256, bidirectional=True),
    Shape("packed_B16", 100, 16, 256, 256, packed=True),
    Shape("proj_B16_T50", 50, 16, 256, 512, proj=128),
)


@dataclasses.dataclass(frozen=True)
class Preset:
    shapes: Tuple[Shape, ...]
    min_run_time: float  # seconds of measurement per side and case, split over the rounds
    rounds: int  # how often the sides alternate within a case (see timing.measure_interleaved)
    description: str


PRESETS = {
    "quick": Preset(QUICK_SHAPES, 1.0, 2, "shortened shapes, float32; about two minutes on 2 CPU cores"),
    "full": Preset(FULL_SHAPES, 1.0, 2, "the full-size shapes (CPU twins with shorter T where noted)"),
}


def parse_shape(text):
    """``T,B,I,H,layers`` (``layers`` may be left out: 1) -> a Shape named
    ``T{T}_B{B}_I{I}_H{H}_L{layers}``. Raises ValueError with the reason for anything else."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (4, 5):
        raise ValueError(f"bad --shape {text!r}: expected T,B,I,H,layers (5 comma-separated integers), "
                         f"got {len(parts)} fields")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"bad --shape {text!r}: every field of T,B,I,H,layers must be an integer") from None
    if len(values) == 4:
        values.append(1)
    if min(values) < 1:
        raise ValueError(f"bad --shape {text!r}: T, B, I, H and layers must all be at least 1")
    steps, batch, input_size, hidden, layers = values
    return Shape(f"T{steps}_B{batch}_I{input_size}_H{hidden}_L{layers}", steps, batch, input_size, hidden, layers)


def with_direction(shape, direction):
    """The shape run in the given direction; a bidirectional copy of a named shape gets ``_bi``."""
    if direction == shape.direction:
        return shape
    suffix = "_bi" if direction == "bi" else "_uni"
    return dataclasses.replace(shape, name=shape.name + suffix, bidirectional=direction == "bi")


def parse_list(text, allowed, option):
    """A comma-separated choice list, checked against ``allowed`` (order kept, duplicates dropped)."""
    items = []
    for item in (part.strip() for part in text.split(",")):
        if item and item not in items:
            items.append(item)
    if not items:
        raise ValueError(f"bad {option} {text!r}: give one or more of {', '.join(allowed)}")
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise ValueError(f"bad {option} {text!r}: {', '.join(unknown)} is not one of {', '.join(allowed)}")
    return items


@dataclasses.dataclass(frozen=True)
class Case:
    device: str
    dtype: str
    cell: str
    shape: Shape
    mode: str

    @property
    def key(self):
        """Identifies the case across result files (compare mode matches rows on it)."""
        return f"{self.device}/{self.dtype}/{self.cell}/{self.shape.name}/{self.mode}"

    @property
    def label(self):
        return f"{self.cell} {self.shape.name} {self.mode} ({self.device}, {self.dtype})"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The filters of one run; ``cases()`` is their cross product over the shapes."""

    shapes: Sequence[Shape]
    cells: Sequence[str] = CELLS
    devices: Sequence[str] = ("cpu",)
    dtypes: Sequence[str] = ("float32",)
    directions: Sequence[str] = DIRECTIONS
    modes: Sequence[str] = MODES
    names: Optional[Sequence[str]] = None  # None: every shape; else the shape names to keep

    def cases(self):
        shapes = [
            shape for shape in self.shapes
            if shape.direction in self.directions and (self.names is None or shape.name in self.names)
        ]
        return [
            Case(device, dtype, cell, shape, mode)
            for device in self.devices
            for dtype in self.dtypes
            for shape in shapes
            for cell in self.cells
            if shape.applies_to(cell, device)
            for mode in self.modes
        ]


def sequence_lengths(shape):
    """Per-sequence lengths: all T, or (packed) random in [T/4, T] with a fixed seed and the
    first sequence T long, so that the longest is T whatever the draw."""
    if not shape.packed:
        return [shape.steps] * shape.batch
    import torch

    generator = torch.Generator().manual_seed(1)
    shortest = max(1, shape.steps // 4)
    lengths = torch.randint(shortest, shape.steps + 1, (shape.batch,), generator=generator)
    lengths[0] = shape.steps
    return lengths.tolist()


def layer_flops(cell, shape, mode):
    """FLOPs of the case's matrix products, 2 per multiply-add.

    Per layer and direction, with R rows (sum of sequence lengths: T*B, fewer when packed),
    G gate blocks (LSTM 4, GRU 3, RNN 1), I_l the layer's input width (I, then H_out times the
    directions), H_out the recurrent width (proj_size or H):
        2 * R * G*H * (I_l + H_out)        input projection + recurrent product
      + 2 * R * H * proj_size              LSTM projection (when proj_size > 0)
    forward + backward counts 3x forward (the backward computes a gradient of both operands of
    every product). The pointwise gate math is not counted.
    """
    directions = 2 if shape.bidirectional else 1
    width = shape.proj or shape.hidden
    rows = sum(sequence_lengths(shape))
    gate_width = GATES[cell] * shape.hidden
    total = 0
    for layer in range(shape.layers):
        layer_input = shape.input_size if layer == 0 else directions * width
        per_direction = 2 * rows * gate_width * (layer_input + width)
        if shape.proj:
            per_direction += 2 * rows * shape.hidden * shape.proj
        total += directions * per_direction
    return total * (3 if mode == "fwdbwd" else 1)
