"""Output of the benchmark suite: the markdown table, the JSON file, the plots, and the
comparison of two JSON files."""
import datetime
import json
import os
import platform
import subprocess

import torch

import rnnfused

RESULT_VERSION = 1


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def environment(settings):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rnnfused": rnnfused.build_info(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
    }
    info.update(settings)
    return info


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


TABLE_COLUMNS = [
    "device", "dtype", "cell", "shape", "T", "B", "I", "H", "L", "dir", "mode",
    "torch.nn ms", "rnnfused ms", "speedup", "us/step", "GFLOP/s", "% GEMM",
]


def table_row(row):
    return [
        row["device"], row["dtype"], row["cell"], row["shape"], str(row["T"]), str(row["B"]), str(row["I"]),
        str(row["H"]), str(row["layers"]), row["direction"], row["mode"],
        _fmt(row["torch_nn"]["median_s"] * 1e3, 3), _fmt(row["rnnfused"]["median_s"] * 1e3, 3),
        _fmt(row["speedup"]) + "x", _fmt(row["us_per_step"], 1), _fmt(row["gflops"], 1),
        _fmt(None if row["fraction_of_gemm"] is None else 100 * row["fraction_of_gemm"], 0),
    ]


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def results_markdown(result):
    env = result["environment"]
    head = (
        f"rnnfused vs torch.nn, {env['date']}; device: {env['gpu'] or env['cpu']}, {env['cpu_threads']} CPU threads; "
        f"torch {env['torch']}; float32 matmul precision {env['float32_matmul_precision']}\n"
        "speedup = torch.nn time / rnnfused time (medians); us/step and GFLOP/s are rnnfused's; "
        "% GEMM = rnnfused GFLOP/s over a 1024^3 torch.mm in the same run\n\n"
    )
    table = markdown_table(TABLE_COLUMNS, [table_row(r) for r in result["rows"]])
    notes = "".join(f"\n- {note}" for note in result.get("notes", []))
    return head + table + ("\n" + notes if notes else "")


def write_json(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def load_json(path):
    with open(path) as f:
        result = json.load(f)
    if "rows" not in result or "environment" not in result:
        raise ValueError(f"{path} is not a result file of the rnnfused benchmark suite")
    return result


def write_plots(result, directory):
    """Speedup per case (bar chart) and us/step against batch size. Returns the files written,
    or a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots"
    os.makedirs(directory, exist_ok=True)
    rows = result["rows"]
    written = []

    labels = [f"{r['cell']} {r['shape']} {r['mode']} {r['dtype']} {r['device']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    colors = ["tab:green" if r["speedup"] >= 1 else "tab:red" for r in rows]
    ax.barh(range(len(rows)), [r["speedup"] for r in rows], color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over torch.nn (torch.nn time / rnnfused time)")
    ax.set_title(f"rnnfused vs torch.nn, {result['environment']['date'][:10]}")
    fig.tight_layout()
    path = os.path.join(directory, "speedup.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 5))
    for side, key, marker in (("rnnfused", "us_per_step", "o"), ("torch.nn", "torch_nn_us_per_step", "x")):
        ax.scatter([r["B"] for r in rows], [r[key] for r in rows], marker=marker, label=side)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("us per step")
    ax.set_title("time per step against batch size (all cases)")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(directory, "us_per_step.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written, None


def compare(old, new):
    """Markdown table of the change of each case present in both result files, then the cases
    present in only one."""
    old_rows = {r["key"]: r for r in old["rows"]}
    new_rows = {r["key"]: r for r in new["rows"]}
    headers = ["case", "rnnfused ms old", "rnnfused ms new", "change", "speedup old", "speedup new"]
    body = []
    for key in [k for k in new_rows if k in old_rows]:
        o, n = old_rows[key], new_rows[key]
        before, after = o["rnnfused"]["median_s"], n["rnnfused"]["median_s"]
        change = (after - before) / before * 100
        body.append([
            key, _fmt(before * 1e3, 3), _fmt(after * 1e3, 3), f"{change:+.1f}%",
            _fmt(o["speedup"]) + "x", _fmt(n["speedup"]) + "x",
        ])
    text = (
        f"old: {old['environment']['date']} ({old['environment'].get('git_commit')}); "
        f"new: {new['environment']['date']} ({new['environment'].get('git_commit')})\n"
        "change: rnnfused time, new against old (negative is faster)\n\n" + markdown_table(headers, body)
    )
    only_old = [k for k in old_rows if k not in new_rows]
    only_new = [k for k in new_rows if k not in old_rows]
    if only_old:
        text += "\n\nonly in old: " + ", ".join(only_old)
    if only_new:
        text += "\n\nonly in new: " + ", ".join(only_new)
    return text
