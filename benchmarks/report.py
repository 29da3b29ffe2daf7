"""Output of the benchmark suite: the markdown table, the JSON file and the PNG plots."""
import json
import os

from .runner import RESULT_FORMAT, RESULT_VERSION
from .sides import RNNFUSED, TORCH_NN

# Keys every result file has (tests and compare mode rely on them).
RESULT_KEYS = ("format", "version", "environment", "settings", "gemm_reference", "notes", "failures", "rows")
ROW_KEYS = (
    "key", "device", "dtype", "cell", "shape", "T", "B", "I", "H", "layers", "direction", "packed", "proj",
    "mode", "flops", "timings", "speedups", "speedup", "us_per_step", "gflops", "gemm_gflops", "pct_gemm_peak",
)


def fmt(value, digits=2, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def fmt_ms(timing):
    """Median with its spread: '12.345 ±1.2%' where ± is the interquartile range over the median."""
    if timing is None:
        return "-"
    spread = 100 * timing["iqr_ms"] / timing["median_ms"] if timing["median_ms"] else 0.0
    return f"{timing['median_ms']:.3f} ±{spread:.1f}%"


def markdown_table(headers, body):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in cells) + " |" for cells in body]
    return "\n".join(lines)


def other_sides(rows):
    """Optional baselines present in any row, in order of appearance."""
    names = []
    for row in rows:
        for name in row["timings"]:
            if name not in (RNNFUSED, TORCH_NN) and name not in names:
                names.append(name)
    return names


def results_table(rows):
    several_devices = len({row["device"] for row in rows}) > 1
    extra = other_sides(rows)
    headers = (["device"] if several_devices else []) + [
        "cell", "shape", "T", "B", "I", "H", "L", "dir", "dtype", "mode", "torch.nn ms", "rnnfused ms",
    ] + [f"{name} ms" for name in extra] + ["speedup", "us/step", "GFLOP/s", "% GEMM"]
    body = []
    for row in rows:
        timings = row["timings"]
        shape = row["shape"] + (" (packed)" if row["packed"] and "packed" not in row["shape"] else "")
        body.append(([row["device"]] if several_devices else []) + [
            row["cell"], shape, row["T"], row["B"], row["I"], row["H"], row["layers"], row["direction"],
            row["dtype"], row["mode"], fmt_ms(timings.get(TORCH_NN)), fmt_ms(timings[RNNFUSED]),
        ] + [fmt_ms(timings.get(name)) for name in extra] + [
            fmt(row["speedup"], 2, "x"), fmt(row["us_per_step"][RNNFUSED], 1), fmt(row["gflops"], 1),
            fmt(row["pct_gemm_peak"], 1),
        ])
    return markdown_table(headers, body)


def contention_table(rows):
    names = []
    for row in rows:
        for name in row["contention"]:
            if name not in names:
                names.append(name)
    headers = ["cell", "shape", "B", "H", "mode"] + [f"{name} ms (slowdown)" for name in names]
    body = []
    for row in rows:
        cells = []
        for name in names:
            entry = row["contention"].get(name)
            cells.append(f"{entry['median_ms']:.3f} ({entry['slowdown']:.2f}x)" if entry else "-")
        body.append([row["cell"], row["shape"], row["B"], row["H"], row["mode"]] + cells)
    return markdown_table(headers, body)


def results_markdown(result):
    env, settings = result["environment"], result["settings"]
    devices = []
    if "cpu" in settings["devices"]:
        threads = env["cpu_threads"]
        isa = (f"; instruction sets: rnnfused {env['rnnfused'].get('cpu_isa')}, oneDNN {env.get('onednn_isa') or 'unknown'}"
               + (f" (--isa {settings['isa']})" if settings.get("isa") else ""))
        devices.append(f"CPU {env['cpu']} ({threads} thread{'' if threads == 1 else 's'}{isa})")
    if "cuda" in settings["devices"] and env.get("gpu"):
        devices.append(f"GPU {env['gpu']} (CUDA {env['cuda']}, cuDNN {env['cudnn']})")
    build = env["rnnfused"]
    gemm_text = f", large GEMMs {build['cpu_gemm']}" if build.get("cpu_gemm") else ""
    build_text = (f"rnnfused {build.get('version')} (CPU {build.get('cpu_isa')}, {build.get('cpu_blas')}{gemm_text}; "
                  f"CUDA kernels {'built' if build.get('cuda') else 'not built'})")
    precision = env["precision"]
    gemm = ", ".join(f"{key} {value['gflops']:.1f} GFLOP/s ({value['size']}^3 torch.mm, fastest block)"
                     for key, value in result["gemm_reference"].items())
    lines = [
        f"## rnnfused vs torch.nn ({settings['preset']} preset)",
        "",
        f"{env['date']}; {'; '.join(devices)}; torch {env['torch']}; {build_text}; "
        f"commit {env['git_commit'] or 'unknown'}",
        f"float32 matmul precision {precision['float32_matmul_precision']}, "
        f"TF32 matmul {precision['cuda_matmul_allow_tf32']}, TF32 cuDNN {precision['cudnn_allow_tf32']} (both sides)",
        f"GEMM reference: {gemm or '-'}",
        "",
        "ms: median time of one call (forward under no_grad, or forward + backward to the input and all "
        "weights) ± interquartile range; speedup = torch.nn time / rnnfused time; us/step = rnnfused time / T; "
        "GFLOP/s = rnnfused's matrix-product FLOPs (fwd+bwd = 3x fwd) per second; "
        "% GEMM = that over the GEMM reference of the row's device and dtype.",
        "",
        results_table(result["rows"]),
    ]
    contended = [row for row in result["rows"] if row.get("contention")]
    if contended:
        lines += ["", "Under contention (another process spinning on one core): each side's median and its "
                      "slowdown over its time alone.", "", contention_table(contended)]
    if result.get("failures"):
        lines += ["", "Failed cases:"] + [f"- {f['key']}: {f['error']}" for f in result["failures"]]
    if result.get("notes"):
        lines += ["", "Notes:"] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)


def write_json(result, path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as out:
        json.dump(result, out, indent=1)
        out.write("\n")


def load_json(path):
    """A result file of this suite; ValueError (naming the file) for anything else."""
    try:
        with open(path) as source:
            result = json.load(source)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a result file ({error})") from None
    if not isinstance(result, dict) or result.get("format") != RESULT_FORMAT or "rows" not in result:
        raise ValueError(f"{path} is not a result file of the rnnfused benchmark suite")
    if result.get("version") != RESULT_VERSION:
        raise ValueError(f"{path}: result format version {result.get('version')}, this suite reads {RESULT_VERSION}")
    return result


def write_plots(result, directory):
    """PNG plots: speedup over torch.nn per shape (grouped by cell, one panel per device, dtype and
    mode) and us/step against batch size. Returns (paths written, note or None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots written"
    rows = [row for row in result["rows"] if row.get("speedup")]
    if not rows:
        return [], "no rows with a torch.nn timing: no plots written"
    os.makedirs(directory, exist_ok=True)
    return [speedup_plot(plt, rows, directory), step_time_plot(plt, rows, directory)], None


def _panels(rows):
    panels = {}
    for row in rows:
        panels.setdefault((row["device"], row["dtype"], row["mode"]), []).append(row)
    return panels


def speedup_plot(plt, rows, directory):
    panels = _panels(rows)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, ((device, dtype, mode), panel) in zip(axes[:, 0], panels.items()):
        shapes = list(dict.fromkeys(row["shape"] for row in panel))
        cells = list(dict.fromkeys(row["cell"] for row in panel))
        width = 0.8 / len(cells)
        for index, cell in enumerate(cells):
            by_shape = {row["shape"]: row["speedup"] for row in panel if row["cell"] == cell}
            positions = [s + (index - (len(cells) - 1) / 2) * width for s in range(len(shapes))]
            ax.bar(positions, [by_shape.get(shape, 0) for shape in shapes], width, label=cell)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)), shapes, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("speedup over torch.nn")
        ax.set_title(f"{device} {dtype}, {mode}: torch.nn time / rnnfused time")
        ax.legend(fontsize=8, ncol=len(cells))
    fig.tight_layout()
    path = os.path.join(directory, "speedup_by_shape.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_time_plot(plt, rows, directory):
    """us/step against B over the plain shapes (one layer, one direction, unpacked, no proj):
    rnnfused solid, torch.nn dashed, one colour per cell, one panel per device, dtype and mode."""
    plain = [r for r in rows if r["layers"] == 1 and r["direction"] == "uni" and not r["packed"] and not r["proj"]]
    panels = _panels(plain or rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ((device, dtype, mode), panel) in zip(axes[0], panels.items()):
        cells = list(dict.fromkeys(row["cell"] for row in panel))
        for index, cell in enumerate(cells):
            # Two shapes may share a batch size (the full preset's small_batch and flashrnn): order
            # by B, then by time; the dicts of times themselves do not compare.
            points = sorted(((row["B"], row["us_per_step"]) for row in panel if row["cell"] == cell),
                            key=lambda point: (point[0], point[1][RNNFUSED]))
            batches = [b for b, _ in points]
            color = colors[index % len(colors)]
            ax.plot(batches, [us[RNNFUSED] for _, us in points], "o-", color=color, label=f"{cell} rnnfused")
            ax.plot(batches, [us.get(TORCH_NN) for _, us in points], "x--", color=color, label=f"{cell} torch.nn")
            if index == 0:  # name the shapes once, next to the first cell's points
                for row in sorted((r for r in panel if r["cell"] == cell), key=lambda r: r["B"]):
                    ax.annotate(f"{row['shape']} (H={row['H']})", (row["B"], row["us_per_step"][RNNFUSED]),
                                fontsize=6, xytext=(4, -10), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("us per time step")
        ax.set_title(f"{device} {dtype}, {mode} (one layer, one direction, unpacked)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(directory, "us_per_step_vs_batch.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
