"""Runs the selected cases and collects the result: environment, settings, one row per case."""
import contextlib
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import time
import warnings
from typing import Optional

import torch

import rnnfused

from . import contention as contention_module
from . import sides as sides_module
from . import suite, timing

RESULT_FORMAT = "rnnfused-benchmarks"
RESULT_VERSION = 1

# Largest |other side - rnnfused| / max(1, |output|) before the row gets a warning note: a side
# that computes something else makes its timing meaningless. Loose on purpose (the parity tests
# are where exactness is checked); half precisions round differently on each side.
AGREEMENT_TOLERANCE = {"float64": 1e-6, "float32": 1e-2, "bfloat16": 0.25, "float16": 0.1}


@dataclasses.dataclass
class RunConfig:
    selection: suite.Selection
    preset: str
    min_run_time: float
    rounds: int
    threads: Optional[int] = None
    tf32: bool = False
    optional_baselines: bool = True
    contention: bool = False  # time CPU cases again with another process spinning on one core
    isa: Optional[str] = None  # the CPU instruction-set cap both sides ran under (--isa)


def cuda_usable():
    return torch.cuda.is_available() and rnnfused.cuda_built()


def default_devices():
    devices = ["cpu"]
    if cuda_usable():
        devices.append("cuda")
    return devices


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    """The commit of the checkout the suite runs from, or None (not a git checkout, no git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


_ONEDNN_PROBE = (
    "import torch\n"
    "with torch.no_grad():\n"
    "    torch.nn.LSTM(8, 8)(torch.randn(2, 1, 8))\n"
)


def onednn_isa():
    """The instruction set oneDNN (torch.nn's CPU LSTM) runs with in this environment, as its
    verbose mode reports it (a small LSTM in a subprocess, so that this process's oneDNN is
    untouched; ONEDNN_MAX_CPU_ISA passes through), or None when it cannot be read."""
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    try:
        result = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE], env=env, capture_output=True, text=True,
                                timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (result.stdout + result.stderr).splitlines():
        if ",info,cpu,isa:" in line:
            return line.split(",info,cpu,isa:", 1)[1].strip()
    return None


def set_tf32(enabled):
    """One TF32 policy for both sides: torch.nn's cuDNN RNNs follow cudnn.allow_tf32 (on by
    default), matrix products follow cuda.matmul.allow_tf32 (off by default); the suite sets both
    alike so that neither side computes float32 in TF32 unless asked (--tf32)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def precision_settings():
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def environment():
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "onednn_isa": onednn_isa(),
        "gpu": gpu,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rnnfused": rnnfused.build_info(),
        "git_commit": git_commit(),
        "precision": precision_settings(),
    }


def _cpu_times():
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def other_cpu_load(interval=0.5):
    """Share of all cores busy with other work, sampled over ``interval`` seconds while this
    process sleeps (Linux /proc/stat; None elsewhere). Other work competing for the cores makes
    timings noisy, multi-threaded ones especially, so the result records it before and after."""
    try:
        total_before, idle_before = _cpu_times()
        time.sleep(interval)
        total_after, idle_after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total_after - total_before
    return round(1 - (idle_after - idle_before) / elapsed, 3) if elapsed > 0 else None


# Other work above this share of the cores (sampled before the run) earns the run a warning note.
BUSY_THRESHOLD = 0.1


def busy_machine_note(busy, threads):
    """A warning when other work kept the cores busy as the run started."""
    if busy is None or busy <= BUSY_THRESHOLD:
        return None
    plural = "" if threads == 1 else "s"
    return (f"other work kept {100 * busy:.0f}% of the {os.cpu_count()} cores busy as the run started "
            f"({threads} thread{plural} per side): timings are noisier than on an idle machine, "
            f"multi-threaded ones especially")


def agreement(reference, other):
    """Largest difference of ``other`` from rnnfused's output, relative to the output's scale."""
    if reference is None or other is None or tuple(reference.shape) != tuple(other.shape):
        return None
    reference, other = reference.detach().double().cpu(), other.detach().double().cpu()
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    return (other - reference).abs().max().item() / scale if reference.numel() else 0.0


def measure_case(case, config, baselines, gemm_gflops):
    """One case: build the sides, warm each up (an optional side that fails is dropped), time them
    interleaved and return (row, notes). rnnfused failing raises."""
    sides, notes = sides_module.build_sides(case, baselines)
    outputs, steps = {}, {}
    for side in sides:
        try:
            outputs[side.name] = timing.warm_up(side.step, case.device)
        except Exception as error:
            if side.name == sides_module.RNNFUSED:
                raise
            notes.append(f"{side.name} failed on {case.key}: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        steps[side.name] = side.step
    timings = timing.measure_interleaved(steps, config.min_run_time, config.rounds)
    row = make_row(case, timings, gemm_gflops)
    if config.contention and case.device == "cpu":
        with contention_module.busy_core():
            contended = timing.measure_interleaved(steps, config.min_run_time, config.rounds)
        row["contention"] = contention_module.slowdowns(timings, contended)
        ours = row["contention"].get(sides_module.RNNFUSED)
        theirs = row["contention"].get(sides_module.TORCH_NN)
        if ours and theirs and ours["slowdown"] > theirs["slowdown"]:
            notes.append(f"{case.key}: under contention rnnfused slowed {ours['slowdown']:.2f}x, "
                         f"torch.nn {theirs['slowdown']:.2f}x")
    reference = outputs[sides_module.RNNFUSED]
    row["max_rel_diff"] = {name: agreement(reference, outputs[name]) for name in steps if name != sides_module.RNNFUSED}
    for name, diff in row["max_rel_diff"].items():
        if diff is not None and diff > AGREEMENT_TOLERANCE[case.dtype]:
            notes.append(f"{case.key}: {name}'s output differs from rnnfused's by {diff:.3g} (relative)")
    return row, notes


def make_row(case, timings, gemm_gflops):
    shape = case.shape
    ours = timings[sides_module.RNNFUSED]
    flops = suite.layer_flops(case.cell, shape, case.mode)
    gflops = flops / (ours.median_ms * 1e-3) / 1e9
    torch_nn = timings.get(sides_module.TORCH_NN)
    return {
        "key": case.key,
        "device": case.device,
        "dtype": case.dtype,
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
        "mode": case.mode,
        "flops": flops,
        "timings": {name: t.as_dict() for name, t in timings.items()},
        # speedup of rnnfused over each other side: that side's median time / rnnfused's
        "speedups": {name: t.median_ms / ours.median_ms
                     for name, t in timings.items() if name != sides_module.RNNFUSED},
        "speedup": torch_nn.median_ms / ours.median_ms if torch_nn else None,
        "us_per_step": {name: t.median_ms * 1e3 / shape.steps for name, t in timings.items()},
        "gflops": gflops,
        "gemm_gflops": gemm_gflops,
        "pct_gemm_peak": 100 * gflops / gemm_gflops if gemm_gflops else None,
    }


@contextlib.contextmanager
def run_settings(threads, tf32):
    """Threads and TF32 policy for the run, restored afterwards (the suite also runs inside
    other processes, e.g. its tests)."""
    saved_threads = torch.get_num_threads()
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        if threads:
            torch.set_num_threads(threads)
        set_tf32(tf32)
        with warnings.catch_warnings():
            # torch.nn announces which LSTM path it takes (e.g. "LSTM with projections is not
            # supported with oneDNN"); that is no news here and would break the progress lines.
            warnings.filterwarnings("ignore", message=".*not supported with oneDNN.*")
            yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def run(config, progress=None):
    """Measures every selected case, reporting progress on ``progress`` (default: stderr);
    returns the result (what report.write_json stores)."""
    with run_settings(config.threads, config.tf32):
        return _run(config, progress or sys.stderr)


def _run(config, progress):
    cases = config.selection.cases()
    env = environment()
    busy_at_start = other_cpu_load()
    baselines, notes = sides_module.optional_baselines() if config.optional_baselines else ([], [])
    if baselines:
        notes.append("optional baselines run on CUDA only, on single-layer unidirectional unpacked shapes: "
                     + ", ".join(b.name for b in baselines))
    if "cuda" in config.selection.devices and not cuda_usable():
        notes.append("cuda cases skipped: " + ("no GPU visible" if not torch.cuda.is_available()
                                                   else "this build of rnnfused has no CUDA kernels"))
    busy = busy_machine_note(busy_at_start, torch.get_num_threads())
    if busy:
        notes.append(busy)
    gemm = {}
    rows, failures = [], []
    started = time.perf_counter()
    for index, case in enumerate(cases, 1):
        if case.device == "cuda" and not cuda_usable():
            continue
        reference_key = f"{case.device}/{case.dtype}"
        if reference_key not in gemm:
            print(f"[{index}/{len(cases)}] GEMM reference {reference_key} ...", file=progress, flush=True)
            gemm[reference_key] = timing.gemm_reference(case.device, sides_module.TORCH_DTYPES[case.dtype],
                                                        max(0.2, config.min_run_time))
        print(f"[{index}/{len(cases)}] {case.label} ...", end="", file=progress, flush=True)
        try:
            row, case_notes = measure_case(case, config, baselines, gemm[reference_key]["gflops"])
        except Exception as error:
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f" FAILED ({message})", file=progress, flush=True)
            failures.append({"key": case.key, "error": message})
            continue
        rows.append(row)
        notes.extend(case_notes)
        summary = ", ".join(f"{name} {t['median_ms']:.3f} ms" for name, t in row["timings"].items())
        speedup = f", {row['speedup']:.2f}x" if row["speedup"] else ""
        print(f" {summary}{speedup} [{time.perf_counter() - started:.0f} s]", file=progress, flush=True)
    selection = config.selection
    return {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "environment": env,
        "settings": {
            "preset": config.preset,
            "cells": list(selection.cells),
            "devices": list(selection.devices),
            "dtypes": list(selection.dtypes),
            "directions": list(selection.directions),
            "modes": list(selection.modes),
            "names": None if selection.names is None else list(selection.names),
            "shapes": [shape.as_dict() for shape in selection.shapes],
            "threads": torch.get_num_threads(),
            "min_run_time": config.min_run_time,
            "rounds": config.rounds,
            "tf32": config.tf32,
            "contention": config.contention,
            "isa": config.isa,
        },
        "gemm_reference": gemm,
        "notes": notes,
        "failures": failures,
        "rows": rows,
        "wall_time_s": time.perf_counter() - started,
        "other_cpu_load": {"start": busy_at_start, "end": other_cpu_load()},
    }
