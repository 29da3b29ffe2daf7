"""rnnfused's benchmark suite: rnnfused against torch.nn (and FlashRNN / haste when installed),
side by side in one run, on the same inputs and weights.

Usage, from the repository root:

    python -m benchmarks                        # quick preset: 4 cells x 7 shapes, fwd and fwd+bwd, float32
    python -m benchmarks --preset full          # the full-size shapes, longer measurements
    python -m benchmarks --cell lstm,gru --mode fwdbwd --name fastrnns_T25,batch1
    python -m benchmarks --shape 100,64,512,512,1 --shape 50,16,256,256,2 --direction uni,bi
    python -m benchmarks --device cuda --dtype float32,bfloat16 --tf32
    python -m benchmarks --threads 1 --min-run-time 0.2 --json out.json --plot plots/
    python -m benchmarks --contention           # CPU cases again with one core taken by a busy process
    python -m benchmarks --isa avx2             # both sides capped to AVX2 (on an AVX-512 machine)
    python -m benchmarks --list                 # print the selected cases, measure nothing
    python -m benchmarks compare OLD.json NEW.json
    python -m benchmarks --help                 # every option, and the shapes of both presets

Presets. quick (the default): fastrnns_T25 (T=25 B=64 I=H=512), batch1 (T=100 B=1 I=H=256),
small_batch (T=100 B=16 I=H=256), and two layers, bidirectional, packed and proj_size variants at
B=16 H=256; about two minutes on an idle 2-core CPU. full: fastrnns (T=100 B=64 I=H=512), batch1,
small_batch, flashrnn (T=1024 B=16 I=H=768), large_batch (T=100 B=256 I=H=1024), and the
variants at the fastrnns sizes; flashrnn and large_batch run with T=256 and T=25 on the CPU.
Filters: --cell, --device, --dtype, --direction, --mode, --name (shape names); --shape
T,B,I,H,layers (repeatable) replaces the preset's shapes.

What a row measures. Each case (device, dtype, cell, shape, mode) builds rnnfused's module and
torch.nn's (which loads rnnfused's state_dict), one random input (torch.randn, fixed seed; packed
shapes use a PackedSequence of random lengths, enforce_sorted=False), runs each once (warm-up,
and a check that both compute the same output), then times them interleaved: in each of the
preset's rounds, every side gets a torch.utils.benchmark.Timer.blocked_autorange of
min_run_time / rounds seconds, the order alternating between rounds (CUDA is synchronized per
block). "fwd" is module(x) under torch.no_grad(); "fwdbwd" is the forward plus
torch.autograd.grad of output.sum() + the final states' sums with respect to the input and every
weight. Times are medians of the per-call block means (at least 3 blocks), with min, max and
interquartile range. speedup = torch.nn time / rnnfused time; us/step = rnnfused time / T.
GFLOP/s counts rnnfused's matrix products, 2 * rows * G*H * (I_layer + H_out) per layer and
direction (rows = sum of sequence lengths, G = 4/3/1 gate blocks, H_out = proj_size or H) plus
2 * rows * H * proj_size for the LSTM projection, fwd+bwd counted as 3x fwd; "% GEMM" divides it
by the GFLOP/s of a 1024^3 torch.mm (fastest block) timed in the same run, device and dtype.
Both sides run with the same threads (--threads; torch's default otherwise) and the same TF32
policy (off unless --tf32; torch.nn's cuDNN RNNs would otherwise use TF32 by default).

Output: the markdown table on stdout, progress on stderr, a JSON file (default
benchmarks/results/<UTC date>-<devices>.json, --json PATH) with every timing, the environment
(CPU model, GPU, torch / CUDA / cuDNN versions, threads, rnnfused.build_info(), git commit, UTC
date, precision settings), the preset and filters, the GEMM reference and the share of the
cores other work used before and after the run; PNG plots (speedup by shape, us/step against
batch) next to it, or in --plot DIR, when matplotlib is installed. The exit status is 1 when
some case failed.
"""
import argparse
import datetime
import os
import sys

from . import compare as compare_module
from . import report, runner, suite

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# --isa: the environment that caps every CPU library either side uses. They read it when they
# first dispatch, so the suite applies it by restarting itself (apply_isa_caps).
ISA_CAPS = {
    "avx2": {"RNNFUSED_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
_ISA_APPLIED = "RNNFUSED_BENCH_ISA"


def isa_environment(isa, environ):
    """``environ`` with the caps of ``isa`` set (a copy)."""
    return dict(environ, **ISA_CAPS[isa], **{_ISA_APPLIED: isa})


def apply_isa_caps(isa, argv):
    """Restarts the suite with the caps of ``isa`` in its environment, unless they are set already."""
    if isa is None or os.environ.get(_ISA_APPLIED) == isa:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], isa_environment(isa, os.environ))


def build_parser():
    preset_help = "; ".join(f"{name}: {preset.description}" for name, preset in suite.PRESETS.items())
    shape_lines = "\n".join(
        f"  {name:5} {shape.describe()}" for name, preset in suite.PRESETS.items() for shape in preset.shapes
    )
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="rnnfused against torch.nn (and FlashRNN / haste when importable), side by side.\n"
                    "Compare two result files with:  python -m benchmarks compare OLD.json NEW.json",
        epilog="shapes of the presets:\n" + shape_lines,
    )
    parser.add_argument("--preset", choices=sorted(suite.PRESETS), default="quick", help=f"shape set ({preset_help})")
    parser.add_argument("--cell", default=",".join(suite.CELLS),
                        help="comma list of " + ", ".join(suite.CELLS) + " (default: all)")
    parser.add_argument("--device", default=None,
                        help="comma list of cpu, cuda (default: cpu, plus cuda when a GPU is visible and rnnfused "
                             "has its CUDA kernels)")
    parser.add_argument("--dtype", default="float32",
                        help="comma list of " + ", ".join(suite.DTYPES) + " (default: float32)")
    parser.add_argument("--direction", default=None,
                        help="comma list of uni, bi: keeps the preset shapes of those directions (default: all); "
                             "--shape shapes are run in each listed direction (default: uni)")
    parser.add_argument("--mode", default=",".join(suite.MODES),
                        help="comma list of fwd (forward under no_grad), fwdbwd (forward + backward) (default: both)")
    parser.add_argument("--shape", action="append", default=[], metavar="T,B,I,H,layers",
                        help="run this shape instead of the preset's (repeatable); layers may be left out (1)")
    parser.add_argument("--name", default=None, help="comma list of shape names to keep (see the epilog)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) for every side (default: torch's)")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds of measurement per side and case (default: the preset's)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times the sides alternate within a case, splitting --min-run-time "
                             "(default: the preset's)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 on the GPU (both sides)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the optional baselines (FlashRNN, haste)")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), default=None,
                        help="cap both sides' CPU instruction set (rnnfused's kernels, oneDNN, ATen, MKL) to measure "
                             "what an older machine would run; the suite restarts itself with the caps set")
    parser.add_argument("--contention", action="store_true",
                        help="time every CPU case a second time while another process spins on one core, and "
                             "report each side's slowdown (benchmarks/contention.py)")
    parser.add_argument("--json", default=None,
                        help="result file (default: benchmarks/results/<UTC date>-<devices>.json)")
    parser.add_argument("--plot", default=None,
                        help="directory of the PNG plots (default: next to the JSON, <json name>-plots/)")
    parser.add_argument("--no-plot", action="store_true", help="write no plots")
    parser.add_argument("--no-json", action="store_true", help="write no JSON file (plots then only with --plot)")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit")
    return parser


def parse_args(argv):
    """The parsed command line plus ``args.config`` (a runner.RunConfig); exits with a usage
    message naming the bad option on any invalid value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.config = make_config(args)
    except ValueError as error:
        parser.error(str(error))
    if not args.config.selection.cases():
        parser.error("no case matches these filters (see --list and the shapes below --help)")
    return args


def make_config(args):
    preset = suite.PRESETS[args.preset]
    cells = suite.parse_list(args.cell, suite.CELLS, "--cell")
    devices = suite.parse_list(args.device, suite.DEVICES, "--device") if args.device else runner.default_devices()
    dtypes = suite.parse_list(args.dtype, suite.DTYPES, "--dtype")
    modes = suite.parse_list(args.mode, suite.MODES, "--mode")
    directions = suite.parse_list(args.direction, suite.DIRECTIONS, "--direction") if args.direction else None
    if args.shape:
        explicit = [suite.parse_shape(text) for text in args.shape]
        directions = directions or ["uni"]
        shapes = tuple(suite.with_direction(shape, d) for shape in explicit for d in directions)
        preset_name = "custom"
    else:
        shapes = preset.shapes
        directions = directions or list(suite.DIRECTIONS)
        preset_name = args.preset
    names = None
    if args.name:
        available = [shape.name for shape in shapes]
        names = suite.parse_list(args.name, available, "--name")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"bad --threads {args.threads}: must be at least 1")
    min_run_time = preset.min_run_time if args.min_run_time is None else args.min_run_time
    if min_run_time <= 0:
        raise ValueError(f"bad --min-run-time {min_run_time}: must be positive")
    rounds = preset.rounds if args.rounds is None else args.rounds
    if rounds < 1:
        raise ValueError(f"bad --rounds {rounds}: must be at least 1")
    selection = suite.Selection(shapes=shapes, cells=cells, devices=devices, dtypes=dtypes,
                                directions=directions, modes=modes, names=names)
    return runner.RunConfig(selection=selection, preset=preset_name, min_run_time=min_run_time, rounds=rounds,
                            threads=args.threads, tf32=args.tf32, optional_baselines=not args.no_baselines,
                            contention=args.contention, isa=args.isa)


def default_json_path(devices):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    return os.path.join(RESULTS_DIR, f"{stamp}-{'-'.join(devices)}.json")


def compare_main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks compare",
        description="Markdown table of the change of rnnfused's time per matching row of two result files "
                    "(rows only in one file are marked).",
    )
    parser.add_argument("old", help="earlier result file (JSON written by python -m benchmarks)")
    parser.add_argument("new", help="later result file")
    args = parser.parse_args(argv)
    try:
        old, new = report.load_json(args.old), report.load_json(args.new)
    except ValueError as error:
        parser.error(str(error))
    print(compare_module.compare(old, new))
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    if argv and argv[0] == "regularization":
        from . import regularization

        return regularization.main(argv[1:])
    args = parse_args(argv)
    apply_isa_caps(args.isa, argv)
    config = args.config
    if args.list:
        for case in config.selection.cases():
            print(case.key)
        return 0
    result = runner.run(config)
    print(report.results_markdown(result))
    plot_dir = args.plot
    if not args.no_json:
        path = args.json or default_json_path(config.selection.devices)
        report.write_json(result, path)
        print(f"\nresults: {display_path(path)}")
        plot_dir = plot_dir or os.path.splitext(path)[0] + "-plots"
    if plot_dir and not args.no_plot:
        written, note = report.write_plots(result, plot_dir)
        print(note or "plots: " + ", ".join(display_path(p) for p in written))
    return 1 if result["failures"] else 0


def display_path(path):
    """Relative to the current directory when below it, else as it is."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


if __name__ == "__main__":
    sys.exit(main())
