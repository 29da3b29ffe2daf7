"""The benchmark suite's parsing, case selection and result format (not its timings)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import report, suite  # noqa: E402


def test_parse_shape():
    shape = suite.parse_shape("100,64,512,256,2")
    assert (shape.steps, shape.batch, shape.input_size, shape.hidden, shape.layers) == (100, 64, 512, 256, 2)
    assert suite.parse_shape("10, 2, 3, 4").layers == 1
    assert suite.parse_shape("10,2,3,4").name == "T10_B2_I3_H4_L1"


@pytest.mark.parametrize("bad", ["", "1,2,3", "1,2,3,4,5,6", "a,2,3,4", "0,2,3,4", "1,-2,3,4"])
def test_bad_shape_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="bad shape"):
        suite.parse_shape(bad)


def test_bad_filter_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--cell", "lstm,transformer"])
    assert exit_info.value.code == 2
    assert "choose from lstm, gru, rnn_tanh, rnn_relu" in capsys.readouterr().err


def test_presets_cover_the_compared_shapes():
    full = {s.name for s in suite.PRESETS["full"]["shapes"]}
    assert {"fastrnns", "batch1", "flashrnn", "large_batch", "two_layers", "bidirectional", "packed", "proj"} <= full
    fastrnns = next(s for s in suite.FULL_SHAPES if s.name == "fastrnns")
    assert (fastrnns.steps, fastrnns.batch, fastrnns.input_size, fastrnns.hidden) == (100, 64, 512, 512)
    assert suite.PRESETS["quick"]["shapes"]


def test_filters_select_the_right_cases():
    args = cli.parse_args(["--cell", "gru,lstm", "--mode", "fwd", "--direction", "bi", "--device", "cpu"])
    cases = suite.select_cases(args.shapes, args.cells, args.dtypes, args.modes, args.devices, args.directions)
    assert cases
    assert {c.cell for c in cases} == {"gru", "lstm"}
    assert {c.mode for c in cases} == {"fwd"}
    assert all(c.shape.bidirectional for c in cases)
    # proj shapes apply to the LSTM only
    args = cli.parse_args(["--cell", "gru", "--device", "cpu"])
    cases = suite.select_cases(args.shapes, args.cells, args.dtypes, args.modes, args.devices, args.directions)
    assert all(c.shape.proj == 0 for c in cases)


def test_explicit_shapes_replace_the_preset():
    args = cli.parse_args(["--shape", "5,2,3,4", "--shape", "6,1,3,4,2", "--device", "cpu"])
    assert [s.name for s in args.shapes] == ["T5_B2_I3_H4_L1", "T6_B1_I3_H4_L2"]


def test_flop_count():
    case = suite.Case("lstm", suite.Shape("s", 10, 2, 3, 5), "float32", "fwd", "cpu")
    assert suite.layer_flops(case) == 2 * 20 * 4 * 5 * (3 + 5)
    case = suite.Case("gru", suite.Shape("s", 10, 2, 3, 5, layers=2, bidirectional=True), "float32", "fwdbwd", "cpu")
    per_direction = [2 * 20 * 15 * (3 + 5), 2 * 20 * 15 * (10 + 5)]
    assert suite.layer_flops(case) == 3 * 2 * sum(per_direction)


def test_tiny_run_json_markdown_and_compare(tmp_path, capsys):
    path = tmp_path / "result.json"
    code = cli.main([
        "--shape", "3,2,4,5", "--mode", "fwd,fwdbwd", "--cell", "lstm,rnn_relu", "--device", "cpu",
        "--min-run-time", "0.01", "--json", str(path), "--no-plot",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "| device | dtype | cell |" in out and "speedup" in out
    result = json.loads(path.read_text())
    assert result["environment"]["torch"] and "cpu" in result["environment"] and "date" in result["environment"]
    assert "git_commit" in result["environment"] and "cpu_threads" in result["environment"]
    assert len(result["rows"]) == 4
    row = result["rows"][0]
    for key in ("key", "cell", "shape", "T", "B", "I", "H", "layers", "direction", "dtype", "mode", "device",
                "rnnfused", "torch_nn", "speedup", "us_per_step", "gflops", "fraction_of_gemm"):
        assert key in row, key
    for side in ("rnnfused", "torch_nn"):
        assert set(row[side]) == {"median_s", "min_s", "max_s", "iqr_s", "runs"}
        assert row[side]["min_s"] <= row[side]["median_s"] <= row[side]["max_s"]
    assert row["speedup"] == pytest.approx(row["torch_nn"]["median_s"] / row["rnnfused"]["median_s"])

    # compare mode: a second file with one row changed and one missing
    other = json.loads(path.read_text())
    other["rows"][0]["rnnfused"]["median_s"] *= 2
    dropped = other["rows"].pop()
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    assert cli.main(["compare", str(path), str(other_path)]) == 0
    text = capsys.readouterr().out
    assert "+100.0%" in text
    assert "only in old: " + dropped["key"] in text


def test_compare_rejects_foreign_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a result file"):
        report.load_json(str(path))
