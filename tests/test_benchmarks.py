"""The benchmark suite's parsing, selection and result format (not its timings): shape parsing,
filters, presets, one tiny real run, the markdown table and compare mode."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ is a top-level package of the repository, not installed
    sys.path.insert(0, ROOT)

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import compare, report, runner, suite  # noqa: E402


def config_of(*argv):
    return cli.parse_args(list(argv)).config


def keys_of(config):
    return [case.key for case in config.selection.cases()]


# --- shapes and presets --------------------------------------------------------------------------


def test_parse_shape_five_fields():
    shape = suite.parse_shape("100,64,512,256,2")
    assert (shape.steps, shape.batch, shape.input_size, shape.hidden, shape.layers) == (100, 64, 512, 256, 2)
    assert shape.name == "T100_B64_I512_H256_L2"
    assert not shape.bidirectional and not shape.packed and shape.proj == 0


def test_parse_shape_layers_default_to_one():
    assert suite.parse_shape(" 10, 2, 3, 4 ").layers == 1


@pytest.mark.parametrize("text", ["1,2,3", "1,2,3,4,5,6", "a,2,3,4,1", "10,2,3.5,4,1", "0,2,3,4,1", "10,2,3,4,-1", ""])
def test_bad_shape_is_a_clear_error(text):
    with pytest.raises(ValueError, match="bad --shape"):
        suite.parse_shape(text)


def test_bad_shape_on_the_command_line_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--shape", "100,64,512"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad --shape '100,64,512'" in err and "T,B,I,H,layers" in err


def test_presets_exist_and_cover_the_shapes_people_compare_on():
    assert set(suite.PRESETS) == {"quick", "full"}
    for name, preset in suite.PRESETS.items():
        shapes = preset.shapes
        assert preset.min_run_time > 0 and preset.rounds >= 1
        assert len({s.name for s in shapes}) == len(shapes), name
        assert any(s.name.startswith("fastrnns") for s in shapes)
        assert any(s.batch == 1 for s in shapes)
        assert any(s.batch == 16 and s.layers == 1 and not s.bidirectional for s in shapes)
        assert any(s.layers == 2 for s in shapes)
        assert any(s.bidirectional for s in shapes)
        assert any(s.packed for s in shapes)
        assert any(s.proj for s in shapes)
    full = {s.name: s for s in suite.PRESETS["full"].shapes}
    fastrnns = full["fastrnns"]
    assert (fastrnns.steps, fastrnns.batch, fastrnns.input_size, fastrnns.hidden, fastrnns.layers) == (
        100, 64, 512, 512, 1)
    flashrnn = full["flashrnn"]
    assert (flashrnn.steps, flashrnn.batch, flashrnn.input_size, flashrnn.hidden) == (1024, 16, 768, 768)
    assert (full["large_batch"].batch, full["large_batch"].hidden) == (256, 1024)
    # a quick shape named like a full one is that shape; the others say how they differ
    for shape in suite.PRESETS["quick"].shapes:
        if shape.name in full:
            assert shape == full[shape.name]
        else:
            assert f"_T{shape.steps}" in shape.name or f"_B{shape.batch}" in shape.name, shape.name


def test_quick_preset_is_the_default_and_covers_every_cell_and_mode():
    config = config_of()
    assert config.preset == "quick"
    cases = config.selection.cases()
    assert {c.cell for c in cases} == set(suite.CELLS)
    assert {c.mode for c in cases} == {"fwd", "fwdbwd"}
    assert {c.device for c in cases} == set(runner.default_devices())
    assert {c.dtype for c in cases} == {"float32"}
    # proj_size is an LSTM feature: other cells skip that shape
    assert {c.cell for c in cases if c.shape.proj} == {"lstm"}


def test_cell_mode_direction_and_dtype_filters():
    config = config_of("--cell", "gru,rnn_relu", "--mode", "fwdbwd", "--direction", "bi",
                       "--dtype", "float64,float32", "--device", "cpu")
    cases = config.selection.cases()
    assert cases
    assert {c.cell for c in cases} == {"gru", "rnn_relu"}
    assert {c.mode for c in cases} == {"fwdbwd"}
    assert all(c.shape.bidirectional for c in cases)
    assert {c.dtype for c in cases} == {"float64", "float32"}
    assert {c.device for c in cases} == {"cpu"}


def test_name_filter_and_unknown_name():
    config = config_of("--name", "batch1", "--cell", "lstm", "--device", "cpu")
    assert keys_of(config) == ["cpu/float32/lstm/batch1/fwd", "cpu/float32/lstm/batch1/fwdbwd"]
    with pytest.raises(SystemExit):
        config_of("--name", "no_such_shape")


def test_filters_that_select_nothing_are_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--name", "batch1", "--direction", "bi"])
    assert exit_info.value.code == 2
    assert "no case matches" in capsys.readouterr().err


def test_explicit_shapes_replace_the_preset_and_take_each_direction():
    config = config_of("--shape", "5,2,3,4,1", "--shape", "6,1,3,4,2", "--direction", "uni,bi",
                       "--cell", "lstm", "--mode", "fwd", "--device", "cpu")
    assert config.preset == "custom"
    assert keys_of(config) == [
        "cpu/float32/lstm/T5_B2_I3_H4_L1/fwd", "cpu/float32/lstm/T5_B2_I3_H4_L1_bi/fwd",
        "cpu/float32/lstm/T6_B1_I3_H4_L2/fwd", "cpu/float32/lstm/T6_B1_I3_H4_L2_bi/fwd",
    ]
    # without --direction, an explicit shape runs unidirectional only
    assert keys_of(config_of("--shape", "5,2,3,4", "--cell", "gru", "--mode", "fwd", "--device", "cpu")) == [
        "cpu/float32/gru/T5_B2_I3_H4_L1/fwd"]


@pytest.mark.parametrize("argv", [
    ["--cell", "lstm,transformer"], ["--device", "tpu"], ["--dtype", "int8"], ["--direction", "sideways"],
    ["--mode", "bwd"], ["--threads", "0"], ["--min-run-time", "0"], ["--rounds", "0"], ["--preset", "huge"],
])
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_options_reach_the_config():
    config = config_of("--threads", "1", "--min-run-time", "0.05", "--rounds", "3", "--tf32", "--no-baselines")
    assert (config.threads, config.min_run_time, config.rounds, config.tf32, config.optional_baselines) == (
        1, 0.05, 3, True, False)
    quick = suite.PRESETS["quick"]
    assert (config_of().min_run_time, config_of().rounds) == (quick.min_run_time, quick.rounds)


def test_list_prints_the_selected_cases(capsys):
    assert cli.main(["--list", "--cell", "rnn_tanh", "--name", "packed_B16", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split() == [
        "cpu/float32/rnn_tanh/packed_B16/fwd", "cpu/float32/rnn_tanh/packed_B16/fwdbwd"]


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    for option in ("--preset", "--cell", "--device", "--dtype", "--direction", "--mode", "--shape", "--threads",
                   "--min-run-time", "--json", "--plot", "compare OLD.json NEW.json"):
        assert option in out


def test_flops_formula():
    shape = suite.Shape("s", steps=3, batch=2, input_size=4, hidden=5)
    rows = 6
    assert suite.layer_flops("lstm", shape, "fwd") == 2 * rows * 4 * 5 * (4 + 5)
    assert suite.layer_flops("gru", shape, "fwdbwd") == 3 * 2 * rows * 3 * 5 * (4 + 5)
    two_bi = suite.Shape("s", 3, 2, 4, 5, layers=2, bidirectional=True)
    assert suite.layer_flops("rnn_tanh", two_bi, "fwd") == 2 * (2 * rows * 5 * (4 + 5) + 2 * rows * 5 * (10 + 5))
    proj = suite.Shape("s", 3, 2, 4, 5, proj=2)
    assert suite.layer_flops("lstm", proj, "fwd") == 2 * rows * 20 * (4 + 2) + 2 * rows * 5 * 2


def test_packed_lengths_are_random_with_the_longest_t():
    shape = suite.Shape("p", steps=40, batch=16, input_size=3, hidden=4, packed=True)
    lengths = suite.sequence_lengths(shape)
    assert len(lengths) == 16 and max(lengths) == 40 and min(lengths) >= 10
    assert len(set(lengths)) > 1
    assert lengths == suite.sequence_lengths(shape)  # fixed seed


# --- a tiny real run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real run of the suite on a tiny shape (timings are not checked, only their format)."""
    out_dir = tmp_path_factory.mktemp("bench")
    json_path = out_dir / "tiny.json"
    argv = ["--shape", "3,2,4,5,1", "--cell", "lstm,gru", "--mode", "fwd", "--device", "cpu",
            "--min-run-time", "0.002", "--json", str(json_path), "--no-plot"]
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(argv)
    return status, json.loads(json_path.read_text()), stdout.getvalue(), stderr.getvalue()


def test_tiny_run_writes_the_documented_json(tiny_run):
    status, result, _, _ = tiny_run
    assert status == 0
    for key in report.RESULT_KEYS:
        assert key in result, key
    assert result["format"] == runner.RESULT_FORMAT and result["version"] == runner.RESULT_VERSION
    env = result["environment"]
    for key in ("date", "cpu", "onednn_isa", "gpu", "torch", "cuda", "cudnn", "cpu_threads", "rnnfused", "git_commit",
                "precision"):
        assert key in env, key
    assert env["onednn_isa"], "oneDNN's verbose mode names its instruction set"
    assert env["rnnfused"]["cpu_isa"] and "cuda" in env["rnnfused"]
    assert env["date"].endswith("+00:00")
    assert set(env["precision"]) == {"float32_matmul_precision", "cuda_matmul_allow_tf32", "cudnn_allow_tf32"}
    settings = result["settings"]
    assert settings["preset"] == "custom" and settings["cells"] == ["lstm", "gru"] and settings["modes"] == ["fwd"]
    assert "cpu/float32" in result["gemm_reference"] and result["gemm_reference"]["cpu/float32"]["gflops"] > 0
    assert not result["failures"]
    assert [row["key"] for row in result["rows"]] == [
        "cpu/float32/lstm/T3_B2_I4_H5_L1/fwd", "cpu/float32/gru/T3_B2_I4_H5_L1/fwd"]
    for row in result["rows"]:
        for key in report.ROW_KEYS:
            assert key in row, key
        assert (row["T"], row["B"], row["I"], row["H"], row["layers"], row["direction"]) == (3, 2, 4, 5, 1, "uni")
        for side in ("rnnfused", "torch.nn"):
            timing = row["timings"][side]
            assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
            assert timing["iqr_ms"] >= 0 and timing["blocks"] >= 3 and timing["calls"] >= timing["blocks"]
        rnnfused_ms, torch_ms = row["timings"]["rnnfused"]["median_ms"], row["timings"]["torch.nn"]["median_ms"]
        assert row["speedup"] == pytest.approx(torch_ms / rnnfused_ms)
        assert row["us_per_step"]["rnnfused"] == pytest.approx(rnnfused_ms * 1e3 / 3)
        assert row["flops"] == suite.layer_flops(row["cell"], suite.Shape("s", 3, 2, 4, 5), "fwd")
        assert row["pct_gemm_peak"] == pytest.approx(100 * row["gflops"] / row["gemm_gflops"])
        assert row["max_rel_diff"]["torch.nn"] < 1e-4  # both sides computed the same thing


def test_tiny_run_prints_the_table_and_progress(tiny_run):
    _, _, out, err = tiny_run
    assert "| cell | shape | T | B | I | H | L | dir | dtype | mode | torch.nn ms | rnnfused ms | speedup |" in out
    assert "| lstm | T3_B2_I4_H5_L1 | 3 | 2 | 4 | 5 | 1 | uni | float32 | fwd |" in out
    assert "[1/2] lstm T3_B2_I4_H5_L1 fwd" in err and "[2/2] gru" in err


# --- markdown, plots and compare on synthetic results ----------------------------------------------


def synthetic_timing(median_ms):
    return {"median_ms": median_ms, "min_ms": median_ms * 0.9, "max_ms": median_ms * 1.2,
            "iqr_ms": median_ms * 0.05, "blocks": 5, "calls": 50}


def synthetic_row(cell="lstm", shape="fastrnns", mode="fwd", ours_ms=10.0, torch_ms=15.0, batch=64, **extra_sides):
    timings = {"rnnfused": synthetic_timing(ours_ms), "torch.nn": synthetic_timing(torch_ms)}
    timings.update({name: synthetic_timing(ms) for name, ms in extra_sides.items()})
    return {
        "key": f"cpu/float32/{cell}/{shape}/{mode}", "device": "cpu", "dtype": "float32", "cell": cell,
        "shape": shape, "T": 100, "B": batch, "I": 512, "H": 512, "layers": 1, "direction": "uni", "packed": False,
        "proj": 0, "mode": mode, "flops": 2e9, "timings": timings,
        "speedups": {name: t["median_ms"] / ours_ms for name, t in timings.items() if name != "rnnfused"},
        "speedup": torch_ms / ours_ms, "us_per_step": {name: t["median_ms"] * 10 for name, t in timings.items()},
        "gflops": 200.0, "gemm_gflops": 400.0, "pct_gemm_peak": 50.0,
    }


def synthetic_result(rows, date="2026-01-01T00:00:00+00:00", commit="a" * 40):
    return {
        "format": runner.RESULT_FORMAT, "version": runner.RESULT_VERSION,
        "environment": {"date": date, "cpu": "Test CPU", "gpu": None, "cpu_threads": 2, "torch": "2.x", "cuda": None,
                        "cudnn": None, "rnnfused": {"cuda": False}, "git_commit": commit,
                        "precision": {"float32_matmul_precision": "highest", "cuda_matmul_allow_tf32": False,
                                      "cudnn_allow_tf32": False}},
        "settings": {"preset": "quick", "devices": ["cpu"]},
        "gemm_reference": {"cpu/float32": {"size": 1024, "gflops": 400.0}},
        "notes": ["a note"], "failures": [], "rows": rows,
    }


def test_markdown_table_format():
    rows = [synthetic_row(), synthetic_row(cell="gru", mode="fwdbwd", ours_ms=20.0, torch_ms=10.0)]
    table = report.results_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["cell", "shape", "T", "B", "I", "H", "L", "dir", "dtype", "mode", "torch.nn ms", "rnnfused ms",
                      "speedup", "us/step", "GFLOP/s", "% GEMM"]
    assert lines[1] == "|" + "|".join(["---"] * len(header)) + "|"
    first = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert first == ["lstm", "fastrnns", "100", "64", "512", "512", "1", "uni", "float32", "fwd", "15.000 ±5.0%",
                     "10.000 ±5.0%", "1.50x", "100.0", "200.0", "50.0"]
    assert "| 0.50x |" in lines[3]


def test_markdown_has_a_column_per_optional_baseline_and_the_notes():
    result = synthetic_result([synthetic_row(flashrnn=5.0), synthetic_row(cell="gru")])
    text = report.results_markdown(result)
    assert "| flashrnn ms |" in text and "| 5.000 ±5.0% |" in text
    assert "Test CPU" in text and "- a note" in text


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [synthetic_row(batch=b, shape=f"s{b}") for b in (1, 16, 64)]
    rows.append(synthetic_row(batch=16, shape="another_b16", ours_ms=30.0))  # two shapes with one batch size
    written, note = report.write_plots(synthetic_result(rows), str(tmp_path / "plots"))
    assert note is None
    assert sorted(os.path.basename(p) for p in written) == ["speedup_by_shape.png", "us_per_step_vs_batch.png"]
    assert all(os.path.getsize(p) > 0 for p in written)


def test_compare_mode(tmp_path, capsys):
    old = synthetic_result([synthetic_row(ours_ms=10.0, torch_ms=15.0), synthetic_row(cell="gru", ours_ms=8.0),
                            synthetic_row(cell="rnn_tanh")])
    new = synthetic_result([synthetic_row(ours_ms=8.0, torch_ms=15.0), synthetic_row(cell="gru", ours_ms=10.0),
                            synthetic_row(cell="rnn_relu")], date="2026-02-01T00:00:00+00:00", commit="b" * 40)
    old_path, new_path = tmp_path / "old.json", tmp_path / "new.json"
    old_path.write_text(json.dumps(old))
    new_path.write_text(json.dumps(new))
    assert cli.main(["compare", str(old_path), str(new_path)]) == 0
    out = capsys.readouterr().out
    assert "| case | rnnfused ms old | rnnfused ms new | change | speedup old | speedup new |" in out
    assert "| cpu/float32/lstm/fastrnns/fwd | 10.000 | 8.000 | -20.0% | 1.50x | 1.88x |" in out
    assert "| cpu/float32/gru/fastrnns/fwd | 8.000 | 10.000 | +25.0% |" in out
    assert "| cpu/float32/rnn_tanh/fastrnns/fwd | 10.000 | - | - | 1.50x | - | only in old |" in out
    assert "| cpu/float32/rnn_relu/fastrnns/fwd | - | 10.000 | - | - | 1.50x | only in new |" in out
    assert "2 matching rows, 1 only in old, 1 only in new" in out
    assert out == compare.compare(old, new) + "\n"


def test_compare_rejects_files_that_are_not_results(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(synthetic_result([])))
    with pytest.raises(ValueError, match="not a result file"):
        report.load_json(str(other))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", str(good), str(other)])
    assert exit_info.value.code == 2
    assert "not a result file" in capsys.readouterr().err


# --- the CUDA path sides ---------------------------------------------------------------------------


def test_cuda_path_sides_force_the_path_only_during_their_step(monkeypatch):
    """The 'rnnfused standard' / 'rnnfused persistent' sides set RNNFUSED_CUDA_PATH for their own
    step and restore what was there (set or not), also when the step raises."""
    from benchmarks import sides

    seen = []

    def step():
        seen.append(os.environ.get("RNNFUSED_CUDA_PATH"))
        if len(seen) == 3:
            raise RuntimeError("the persistent kernel cannot run this call")
        return len(seen)

    monkeypatch.delenv("RNNFUSED_CUDA_PATH", raising=False)
    assert sides.with_cuda_path("standard", step)() == 1
    assert "RNNFUSED_CUDA_PATH" not in os.environ
    monkeypatch.setenv("RNNFUSED_CUDA_PATH", "auto")
    assert sides.with_cuda_path("persistent", step)() == 2
    with pytest.raises(RuntimeError):
        sides.with_cuda_path("persistent", step)()
    assert os.environ["RNNFUSED_CUDA_PATH"] == "auto"
    assert seen == ["standard", "persistent", "persistent"]
    assert set(sides.CUDA_PATH_SIDES.values()) == {"standard", "persistent"}


# --- contention mode -------------------------------------------------------------------------------


def test_busy_core_spins_while_open_and_is_gone_after():
    """The spinner uses a core (its CPU time grows) and is stopped when the block ends, also when
    the block raises."""
    import time

    from benchmarks import contention

    def cpu_seconds(pid):
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    with pytest.raises(RuntimeError, match="case failed"):
        with contention.busy_core() as process:
            time.sleep(0.5)
            used = cpu_seconds(process.pid)
            assert process.poll() is None and used > 0.2, used
            raise RuntimeError("case failed")
    assert process.poll() is not None


def test_busy_core_stops_when_its_parent_dies_without_cleanup():
    """A process that dies inside the block (a crash in native code runs no `finally`) leaves no
    spinner behind: the spinner sees that its parent is gone and exits by itself."""
    import subprocess
    import sys
    import time

    code = ("import os, sys\nsys.path.insert(0, sys.argv[1])\nfrom benchmarks import contention\n"
            "with contention.busy_core() as process:\n    print(process.pid, flush=True)\n    os._exit(0)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code, repo], capture_output=True, text=True, timeout=60)
    pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # exited; its new parent has not reaped it yet
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        raise AssertionError("the spinner outlived its parent")


def test_contention_run_reports_each_sides_slowdown(tmp_path):
    import contextlib
    import io

    json_path = tmp_path / "contention.json"
    argv = ["--shape", "3,2,4,5,1", "--cell", "rnn_tanh", "--mode", "fwd", "--device", "cpu", "--contention",
            "--min-run-time", "0.002", "--rounds", "1", "--json", str(json_path), "--no-plot"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0
    result = json.loads(json_path.read_text())
    assert result["settings"]["contention"] is True
    (row,) = result["rows"]
    for side in ("rnnfused", "torch.nn"):
        entry = row["contention"][side]
        assert entry["median_ms"] > 0
        assert entry["slowdown"] == pytest.approx(entry["median_ms"] / row["timings"][side]["median_ms"])
    assert "Under contention (another process spinning on one core)" in stdout.getvalue()
    assert "| rnnfused ms (slowdown) | torch.nn ms (slowdown) |" in stdout.getvalue()
    assert "--contention" not in config_of("--cell", "gru").__dict__ and not config_of("--cell", "gru").contention


# --- instruction-set caps --------------------------------------------------------------------------


def test_isa_caps_cover_every_cpu_library():
    env = cli.isa_environment("avx2", {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "RNNFUSED_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "RNNFUSED_BENCH_ISA": "avx2"}


def test_isa_run_restarts_with_the_caps_and_records_them(tmp_path):
    """`--isa avx2`: the suite restarts itself with the caps, so both sides and the recorded
    environment run under them (oneDNN reports AVX2 whatever the machine has)."""
    import subprocess

    json_path = tmp_path / "isa.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RNNFUSED_", "ONEDNN_", "ATEN_CPU", "MKL_"))}
    command = [sys.executable, "-m", "benchmarks", "--isa", "avx2", "--shape", "3,2,4,5,1", "--cell", "rnn_tanh",
               "--mode", "fwd", "--device", "cpu", "--min-run-time", "0.002", "--rounds", "1", "--json",
               str(json_path), "--no-plot"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(json_path.read_text())
    assert run["settings"]["isa"] == "avx2"
    assert run["environment"]["rnnfused"]["cpu_isa"] == "avx2"
    assert "AVX2" in run["environment"]["onednn_isa"] and "512" not in run["environment"]["onednn_isa"]
    assert "instruction sets: rnnfused avx2, oneDNN" in result.stdout and "(--isa avx2)" in result.stdout
