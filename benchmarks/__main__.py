"""rnnfused's benchmark suite: rnnfused against torch.nn, side by side in one run.

    python -m benchmarks                          # quick preset (about two minutes on 2 CPU cores)
    python -m benchmarks --preset full            # every shape, longer measurements
    python -m benchmarks --cell lstm,gru --mode fwdbwd --shape 100,32,256,256,2
    python -m benchmarks compare OLD.json NEW.json

Each case builds rnnfused's module and torch.nn's with the same weights and inputs and times
both, one right after the other (torch.utils.benchmark, warm-up first, medians with min/max and
IQR). Forward runs under no_grad; forward+backward differentiates the sum of all outputs with
respect to the input and every weight. Output: a markdown table on stdout, a JSON file (all
timings, device, versions, thread count, git commit, date), and PNG plots when matplotlib is
installed. The README's `make bench` runs the quick preset.
"""
import argparse
import datetime
import os
import sys

import torch

from . import report, suite


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="rnnfused vs torch.nn (cuDNN on the GPU, oneDNN/ATen on the CPU), side by side.",
        epilog="compare mode: python -m benchmarks compare OLD.json NEW.json",
    )
    parser.add_argument("--preset", choices=sorted(suite.PRESETS), default="quick",
                        help="quick (default: shortened shapes, ~2 min on 2 CPU cores) or full")
    parser.add_argument("--cell", default=",".join(suite.CELLS), help="comma list of " + ", ".join(suite.CELLS))
    parser.add_argument("--device", default=None, help="comma list of cpu, cuda (default: cpu, and cuda when usable)")
    parser.add_argument("--dtype", default="float32", help="comma list of " + ", ".join(suite.DTYPES))
    parser.add_argument("--direction", default="uni,bi", help="comma list of uni, bi")
    parser.add_argument("--mode", default="fwd,fwdbwd", help="comma list of fwd (forward), fwdbwd (forward+backward)")
    parser.add_argument("--shape", action="append", default=[], metavar="T,B,I,H[,layers]",
                        help="explicit shape instead of the preset's (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both sides")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds of measurement per side and case")
    parser.add_argument("--json", default=None, help="result file (default benchmarks/results/<date>-<device>.json)")
    parser.add_argument("--plot", default=None, help="directory of the PNG plots (default: next to the JSON)")
    parser.add_argument("--no-plot", action="store_true", help="write no plots")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.cells = suite.parse_list(args.cell, suite.CELLS, "--cell")
        args.devices = suite.parse_list(args.device, ("cpu", "cuda"), "--device") if args.device else suite.default_devices()
        args.dtypes = suite.parse_list(args.dtype, tuple(suite.DTYPES), "--dtype")
        args.directions = suite.parse_list(args.direction, suite.DIRECTIONS, "--direction")
        args.modes = suite.parse_list(args.mode, suite.MODES, "--mode")
        args.shapes = [suite.parse_shape(s) for s in args.shape] or suite.PRESETS[args.preset]["shapes"]
    except ValueError as error:
        parser.error(str(error))
    if args.min_run_time is None:
        args.min_run_time = suite.PRESETS[args.preset]["min_run_time"]
    return args


def default_json_path(devices):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%S")
    root = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(root, "results", f"{stamp}-{'-'.join(devices)}.json")


def run(args, progress=sys.stderr):
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = suite.select_cases(args.shapes, args.cells, args.dtypes, args.modes, args.devices, args.directions)
    notes = []
    for name, module in suite.optional_baselines().items():
        if module is None:
            notes.append(f"{name} is not installed: not measured")
        else:
            notes.append(f"{name} is installed, but the suite does not drive it yet: not measured")
    gemm = {}
    rows = []
    for index, case in enumerate(cases, 1):
        skip = suite.describe_skip(case)
        if skip:
            notes.append(f"skipped {case.key}: {skip}")
            continue
        if (case.device, case.dtype) not in gemm:
            gemm[(case.device, case.dtype)] = suite.gemm_rate(case.device, case.dtype)
        print(f"[{index}/{len(cases)}] {case.key}", file=progress, flush=True)
        rows.append(suite.run_case(case, args.min_run_time, gemm[(case.device, case.dtype)]))
    return {
        "version": report.RESULT_VERSION,
        "environment": report.environment(suite.precision_settings()),
        "preset": args.preset if not args.shape else "custom",
        "filters": {
            "cells": args.cells, "devices": args.devices, "dtypes": args.dtypes,
            "directions": args.directions, "modes": args.modes, "min_run_time": args.min_run_time,
        },
        "gemm_peak_gflops": {f"{d}/{t}": v for (d, t), v in gemm.items()},
        "notes": notes,
        "rows": rows,
    }


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        if len(argv) != 3:
            print("usage: python -m benchmarks compare OLD.json NEW.json", file=sys.stderr)
            return 2
        print(report.compare(report.load_json(argv[1]), report.load_json(argv[2])))
        return 0
    args = parse_args(argv)
    if args.list:
        for case in suite.select_cases(args.shapes, args.cells, args.dtypes, args.modes, args.devices, args.directions):
            print(case.key)
        return 0
    result = run(args)
    print(report.results_markdown(result))
    path = args.json or default_json_path(args.devices)
    report.write_json(result, path)
    print(f"\nresults: {path}")
    if not args.no_plot:
        written, note = report.write_plots(result, args.plot or os.path.splitext(path)[0])
        print(note or "plots: " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
