"""The console script: `lrtrain demo` trains both models, prints the table and writes the rank plot;
bad arguments and library errors end in one line on stderr with exit status 2."""
import os
import re
import subprocess
import sys

import pytest

from lrtrain.cli import main


def test_demo_prints_table_and_saves_plot(tmp_path, capsys):
    assert main(["demo", "--epochs", "2", "--hidden", "128", "--rank", "24", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (dense AdamW|lrtrain DLRT) \| ([\d.]+) \| ([\d,]+) \|", out, re.M)
    assert [r[0] for r in rows] == ["dense AdamW", "lrtrain DLRT"]
    acc = {name: float(a) for name, a, _ in rows}
    params = {name: int(n.replace(",", "")) for name, _, n in rows}
    assert acc["lrtrain DLRT"] > 80 and acc["dense AdamW"] > 80  # 10 classes: chance is 10%
    assert params["lrtrain DLRT"] < params["dense AdamW"]
    png = tmp_path / "ranks.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- errors
# Every error: exit status 2 (argparse's convention), one line on stderr naming the command, no traceback.

def _error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize("args,expect", [
    (["--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
    (["--epochs", "two"], "--epochs: expected an integer"),
    (["--data", "/nonexistent"], "'/nonexistent': no such directory"),
    (["--rank", "0"], "--rank: must be an integer >= 1"),
    (["--rank", "-4"], "--rank: must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["--batch-size", "-64"], "--batch-size: must be an integer >= 1"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
    (["--lr=-1e-3"], "--lr: must be a finite number > 0"),
    (["--lr", "nan"], "--lr: must be a finite number > 0"),
    (["--lr", "inf"], "--lr: must be a finite number > 0"),
    (["--weight-decay", "-1"], "--weight-decay: must be a finite number >= 0"),
    (["--tau", "-0.1"], "--tau: must be a finite number >= 0"),
    (["--hidden", "256", "0"], "--hidden: must be an integer >= 1"),
    (["--seed", "-1"], "--seed: must be an integer >= 0"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_demo_refuses_bad_arguments_in_one_line(args, expect, capsys):
    assert main(["demo", "--no-progress", *args]) == 2
    line = _error_line(capsys, "lrtrain demo" if args != ["--bogus"] else "lrtrain")
    assert expect in line


@pytest.mark.parametrize("hidden,rank", [(["8"], "40"), (["256", "256"], "1000")])
def test_demo_refuses_a_model_where_no_layer_is_factorized(hidden, rank, capsys, tmp_path):
    """Nothing factorized: no fake 'lrtrain DLRT' row, no empty plot; the reason per layer instead."""
    assert main(["demo", "--no-progress", "--hidden", *hidden, "--rank", rank, "--out", str(tmp_path)]) == 2
    line = _error_line(capsys, "lrtrain demo")
    assert "no layer of MLP 64-" in line and "can be factorized" in line
    assert ("min_features" in line) if hidden == ["8"] else ("would not save parameters" in line)
    assert not (tmp_path / "ranks.png").exists()


def test_demo_reports_layers_left_dense(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--hidden", "32", "--rank", "4", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 Linear layers factorized" in out
    assert "layer 3 left dense: min(out, in) = 10 < min_features = 16" in out


def test_library_errors_become_one_line(tmp_path, capsys):
    """Errors raised while the command runs (here: a malformed IDX file, a ValueError of the data
    reader; a directory without the files, a FileNotFoundError) are reported like argument errors."""
    assert main(["demo", "--no-progress", "--data", str(tmp_path)]) == 2
    assert "no train-images-idx3-ubyte[.gz]" in _error_line(capsys, "lrtrain demo")
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")  # dtype 0x0d: float, refused
    assert main(["demo", "--no-progress", "--data", str(tmp_path)]) == 2
    assert "not an unsigned-byte IDX file" in _error_line(capsys, "lrtrain demo")


# The end-to-end options of the benchmark suite (--epochs, --lr, --data, ...) are benchmarks/bench_report.py's:
# tests/test_bench_smoke.py checks that it refuses bad values the same way.
@pytest.mark.parametrize("args,expect", [
    (["--sizes", "0"], "--sizes: must be an integer >= 1"),
    (["--ranks", "8", "-1"], "--ranks: must be an integer >= 1"),
    (["--layer-batch", "0"], "--layer-batch: must be an integer >= 1"),
    (["--min-time", "0"], "--min-time: must be a finite number > 0"),
    (["--min-time", "nan"], "--min-time: must be a finite number > 0"),
    (["--step-models", "1024@0:64"], "--step-models: step model '1024@0:64'"),
    (["--only", "gpu"], "--only: invalid choice: 'gpu'"),
])
def test_bench_refuses_bad_arguments_in_one_line(args, expect, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), *args]) == 2
    assert expect in _error_line(capsys, "lrtrain bench")
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_bench_refuses_a_layer_group_with_nothing_to_measure(capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), "--only", "layers", "--sizes", "64", "--ranks", "128"]) == 2
    assert "no --ranks value [128] is <= a --sizes value [64]" in _error_line(capsys, "lrtrain bench")
    assert not tmp_path.joinpath("bench.md").exists()


def test_help_exits_zero(capsys):
    assert main(["demo", "--help"]) == 0
    assert "--epochs" in capsys.readouterr().out


def test_console_script_exit_status_and_stderr():
    """The real process: `python -m lrtrain demo --epochs 0` exits 2 with one stderr line."""
    proc = subprocess.run([sys.executable, "-m", "lrtrain", "demo", "--epochs", "0"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "lrtrain demo: error: argument --epochs: must be an integer >= 1, got 0 (see lrtrain demo --help)"]
    assert proc.stdout == ""
