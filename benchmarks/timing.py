"""Measurement: torch.utils.benchmark's blocked_autorange, the sides of a case interleaved, and
the GEMM reference rate of the machine.

torch.utils.benchmark.Timer synchronizes CUDA around every block it times, so one code path
serves the CPU and the GPU. Its ``num_threads`` defaults to 1; the suite passes the current
torch.get_num_threads() so that every side runs with the threads the run was given.
"""
import dataclasses
import statistics
import time
from typing import Dict, List, Sequence

import torch
from torch.utils.benchmark import Timer


@dataclasses.dataclass
class Timing:
    """Statistics of the per-call times of one side (each sample is the mean of one block of
    calls, as blocked_autorange takes them), in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float
    blocks: int
    calls: int

    @staticmethod
    def of(block_times_s: Sequence[float], calls: int) -> "Timing":
        times = sorted(t * 1e3 for t in block_times_s)
        if len(times) >= 2:
            quartiles = statistics.quantiles(times, n=4, method="inclusive")
            iqr = quartiles[2] - quartiles[0]
        else:
            iqr = 0.0
        return Timing(statistics.median(times), times[0], times[-1], iqr, len(times), calls)

    def as_dict(self):
        return dataclasses.asdict(self)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def warm_up(step, device, calls=1):
    """Runs ``step`` (first-call allocations, weight packing, cuDNN plans, lazy CUDA init) and
    returns its last output. blocked_autorange's own block-size estimate warms up further."""
    output = None
    for _ in range(calls):
        output = step()
    synchronize(device)
    return output


# Fewest samples a side gets: a step slower than min_run_time yields one block from
# blocked_autorange, and a median and spread need more than that.
MIN_SAMPLES = 3


def measure_interleaved(steps: Dict[str, callable], min_run_time: float, rounds: int = 1) -> Dict[str, Timing]:
    """Times every step of one case, alternating between them.

    Each of ``rounds`` rounds gives every step a blocked_autorange of ``min_run_time / rounds``
    seconds, in order A B C in even rounds and C B A in odd ones (so a slow drift of the machine,
    e.g. other work on shared cores, weighs on all sides alike). Steps left with fewer than
    MIN_SAMPLES blocks then get single-call blocks, again in turn. The samples of all rounds are
    pooled per step.
    """
    names = list(steps)
    threads = torch.get_num_threads()
    timers = {name: Timer(stmt="step()", globals={"step": steps[name]}, num_threads=threads) for name in names}
    samples: Dict[str, List[float]] = {name: [] for name in names}
    calls = {name: 0 for name in names}
    rounds = max(1, rounds)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            measurement = timers[name].blocked_autorange(min_run_time=min_run_time / rounds)
            samples[name].extend(measurement.times)
            calls[name] += measurement.number_per_run * len(measurement.times)
    while any(len(samples[name]) < MIN_SAMPLES for name in names):
        for name in names:
            if len(samples[name]) < MIN_SAMPLES:
                samples[name].extend(timers[name].timeit(number=1).times)
                calls[name] += 1
    return {name: Timing.of(samples[name], calls[name]) for name in names}


GEMM_SIZE = 1024
# A GEMM reference call slower than this (e.g. bfloat16 on a CPU without native support) is
# retaken at half the size, so that the reference costs the run seconds, not minutes.
GEMM_SLOW_CALL_S = 0.25


def gemm_reference(device, dtype, min_run_time, size=GEMM_SIZE):
    """GFLOP/s of a square ``torch.mm`` (size^3, random operands) in the given device and dtype,
    from its fastest block: what this machine's matrix product reaches, the yardstick of
    "% of GEMM peak"."""
    while True:
        generator = torch.Generator().manual_seed(3)
        a = torch.randn(size, size, generator=generator).to(device, dtype)
        b = torch.randn(size, size, generator=generator).to(device, dtype)

        def step():
            return torch.mm(a, b)

        started = time.perf_counter()
        warm_up(step, device)  # also the first call's allocation and library initialisation
        if time.perf_counter() - started <= GEMM_SLOW_CALL_S or size <= 256:
            break
        size //= 2
    timing = measure_interleaved({"mm": step}, min_run_time)["mm"]
    # A peak: the fastest block. The median would let a moment of other work on the cores lower
    # the yardstick and inflate every row's "% of GEMM peak".
    return {"size": size, "gflops": 2 * size**3 / (timing.min_ms * 1e-3) / 1e9, "timing": timing.as_dict()}
