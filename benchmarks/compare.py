"""Compare mode: ``python -m benchmarks compare OLD.json NEW.json``.

Rows are matched on their key (device/dtype/cell/shape/mode). For each matching row: rnnfused's
median time before and after, the change in percent (negative = faster), and the speedup over
torch.nn before and after. Rows present in only one file are listed as such.
"""
import math

from .report import fmt, markdown_table
from .sides import RNNFUSED

HEADERS = ["case", "rnnfused ms old", "rnnfused ms new", "change", "speedup old", "speedup new", ""]


def describe(result):
    env = result["environment"]
    commit = (env.get("git_commit") or "unknown commit")[:12]
    device = env.get("gpu") if "cuda" in result["settings"]["devices"] and env.get("gpu") else env.get("cpu")
    return f"{env['date']}, {commit}, {device}, {env.get('cpu_threads')} threads"


def compare(old, new, old_name="old", new_name="new"):
    """Markdown comparison of two result files (as loaded by report.load_json)."""
    old_rows = {row["key"]: row for row in old["rows"]}
    new_rows = {row["key"]: row for row in new["rows"]}
    body = []
    for key in list(old_rows) + [k for k in new_rows if k not in old_rows]:
        before, after = old_rows.get(key), new_rows.get(key)
        before_ms = before["timings"][RNNFUSED]["median_ms"] if before else None
        after_ms = after["timings"][RNNFUSED]["median_ms"] if after else None
        if before and after:
            change = f"{100 * (after_ms - before_ms) / before_ms:+.1f}%"
            marker = ""
        else:
            change = "-"
            marker = f"only in {old_name}" if before else f"only in {new_name}"
        body.append([
            key, fmt(before_ms, 3), fmt(after_ms, 3), change,
            fmt(before and before["speedup"], 2, "x"), fmt(after and after["speedup"], 2, "x"), marker,
        ])
    common = [key for key in old_rows if key in new_rows]
    lines = [
        f"## rnnfused: {new_name} against {old_name}",
        "",
        f"- {old_name}: {describe(old)}",
        f"- {new_name}: {describe(new)}",
        "",
        "change = (new - old) / old of rnnfused's median time (negative is faster); "
        "speedup = torch.nn time / rnnfused time in that file.",
        "",
        markdown_table(HEADERS, body),
        "",
        f"{len(common)} matching rows, {len(old_rows) - len(common)} only in {old_name}, "
        f"{len(new_rows) - len(common)} only in {new_name}.",
    ]
    if common:
        ratios = [new_rows[k]["timings"][RNNFUSED]["median_ms"] / old_rows[k]["timings"][RNNFUSED]["median_ms"]
                  for k in common]
        geomean = _geometric_mean(ratios)
        lines.append(f"Geometric mean of new/old rnnfused time over the matching rows: {geomean:.3f} "
                     f"({100 * (geomean - 1):+.1f}%).")
    return "\n".join(lines)


def _geometric_mean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))
