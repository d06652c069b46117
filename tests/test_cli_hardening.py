"""Issue 20 (hardening, round 2), the console script: malformed IDX data, report names that are paths, the
demo's help, --rank and --tau, progress bars off a terminal, and the demo's figure.

A refused run changes nothing: exit status 2, one line on stderr, nothing written."""
import gzip
import io
import re
import struct
import sys

import numpy as np
import pytest
import torch

from lrtrain.cli import main
from test_cli import _error_line as error_line
from lrtrain.cli import demo as demo_cli
from lrtrain.cli.args import ArgumentParser, file_name, relative_tolerance
from lrtrain.cli.bench import write_report
from lrtrain.cli.train import History, fit

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _error_line(capsys, command: str = "lrtrain demo") -> str:
    return error_line(capsys, command)


# ------------------------------------------------------------------------------------------- IDX data
def _idx(a: np.ndarray) -> bytes:
    a = np.asarray(a, dtype=np.uint8)
    return struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.tobytes()


def _arrays(n_train=40, n_test=20, size=8, classes=4):
    g = np.random.default_rng(0)
    return {STEMS[0]: g.integers(0, 256, (n_train, size, size)), STEMS[1]: np.arange(n_train) % classes,
            STEMS[2]: g.integers(0, 256, (n_test, size, size)), STEMS[3]: np.arange(n_test) % classes}


def _write(directory, arrays: dict, raw: dict | None = None):
    directory.mkdir(exist_ok=True)
    for stem, a in arrays.items():
        data = (raw or {}).get(stem, _idx(a) if a is not None else None)
        (directory / stem).write_bytes(data)
    return directory


def _demo(data_dir, out):
    return main(["demo", "--no-progress", "--epochs", "1", "--hidden", "32", "--rank", "4", "--data", str(data_dir),
                 "--out", str(out)])


def test_a_well_formed_idx_directory_trains(tmp_path, capsys):
    """The control for the cases below: the synthetic files they corrupt are valid."""
    assert _demo(_write(tmp_path / "data", _arrays()), tmp_path / "out") == 0
    assert "data: 40 train / 20 test, MLP 64-32-4" in capsys.readouterr().out


def _corrupt(case: str):
    """(arrays, raw bytes per stem) of a malformed data set, and the message expected."""
    a, raw = _arrays(), {}
    img = _idx(a[STEMS[0]])
    if case == "empty":
        raw[STEMS[0]] = b""
        return a, raw, "train-images-idx3-ubyte: empty file, too short for an IDX header"
    if case == "magic":
        raw[STEMS[0]] = b"\x12\x34" + img[2:]
        return a, raw, "not an unsigned-byte IDX file (magic number 0x12340803, expected 0x00000803 for images"
    if case == "float-labels":  # type code 0x0d: floats
        raw[STEMS[1]] = b"\x00\x00\x0d\x01" + _idx(a[STEMS[1]])[4:]
        return a, raw, "not an unsigned-byte IDX file (magic number 0x00000d01, expected 0x00000801 for labels"
    if case == "labels-as-images":
        raw[STEMS[0]] = _idx(a[STEMS[1]])
        return a, raw, "an IDX array of 1 dimensions (magic number 0x00000801), expected 0x00000803"
    if case == "truncated":
        raw[STEMS[0]] = img[:-5]
        return a, raw, "header says (40, 8, 8) (2,560 values), found 2,555 (truncated file)"
    if case == "trailing":
        raw[STEMS[2]] = _idx(a[STEMS[2]]) + b"\x00"
        return a, raw, "found 1,281 (trailing bytes after the array)"
    if case == "truncated-header":
        raw[STEMS[0]] = img[:9]
        return a, raw, "truncated IDX header (9 bytes; 3 dimensions need 16)"
    if case == "zero-images":
        a[STEMS[0]], a[STEMS[1]] = np.zeros((0, 8, 8)), np.zeros(0)
        return a, raw, "empty IDX array (shape (0, 8, 8))"
    if case == "more-labels":
        a[STEMS[1]] = np.arange(41) % 4
        return a, raw, "41 training labels for 40 training images"
    if case == "fewer-labels":
        a[STEMS[3]] = np.arange(19) % 4
        return a, raw, "19 test labels for 20 test images"
    if case == "sizes-differ":
        a[STEMS[2]] = np.random.default_rng(1).integers(0, 256, (20, 9, 9))
        return a, raw, "training images are 8x8 pixels, test images 9x9 (they must be the same size)"
    if case == "constant-train":
        a[STEMS[0]] = np.full((40, 8, 8), 7)
        return a, raw, "every pixel of the 40 training images is 7 (constant images: nothing to learn)"
    if case == "constant-test":
        a[STEMS[2]] = np.zeros((20, 8, 8))
        return a, raw, "every pixel of the 20 test images is 0"
    if case == "one-class":
        a[STEMS[1]], a[STEMS[3]] = np.full(40, 3), np.full(20, 3)
        return a, raw, "every training label is 3; labels must be the classes 0..K-1 with K >= 2"
    if case == "gaps":  # labels 0, 1, 200: not 0..K-1 for a sensible K
        a[STEMS[1]] = np.array([0, 1, 200] * 13 + [0])
        return a, raw, "training labels must be the classes 0..K-1 (here K = 201, the largest label + 1), each " \
                       "with an example; 198 have none: 2, 3, 4, 5, 6, 7, 8, 9, ..."
    if case == "test-label-unseen":
        a[STEMS[3]] = np.arange(20) % 5
        return a, raw, "test label 4 is not a class of the training labels 0..3"
    raise AssertionError(case)


CASES = ["empty", "magic", "float-labels", "labels-as-images", "truncated", "trailing", "truncated-header",
         "zero-images", "more-labels", "fewer-labels", "sizes-differ", "constant-train", "constant-test", "one-class",
         "gaps", "test-label-unseen"]


@pytest.mark.parametrize("case", CASES)
def test_demo_refuses_malformed_idx_data_in_one_line(case, tmp_path, capsys):
    arrays, raw, expect = _corrupt(case)
    data = _write(tmp_path / "data", arrays, raw)
    out = tmp_path / "out"
    assert _demo(data, out) == 2
    assert expect in _error_line(capsys)
    assert not out.exists()  # refused before training: nothing written


def test_a_truncated_gzip_file_is_refused_in_one_line(tmp_path, capsys):
    arrays = _arrays()
    data = _write(tmp_path / "data", {k: v for k, v in arrays.items() if k != STEMS[0]})
    (data / (STEMS[0] + ".gz")).write_bytes(gzip.compress(_idx(arrays[STEMS[0]]))[:-30])
    assert _demo(data, tmp_path / "out") == 2
    assert "train-images-idx3-ubyte.gz: not a readable gzip file" in _error_line(capsys)
    (data / (STEMS[0] + ".gz")).write_bytes(b"not gzip at all")
    assert _demo(data, tmp_path / "out") == 2
    assert "train-images-idx3-ubyte.gz: not a readable gzip file" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- names and paths
BAD_NAMES = ["../../x", "../x", "a/b", "/tmp/x", "a\\b", "", " ", ".", "..", "x..y", "a\0b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bench_refuses_a_name_that_is_a_path(name, tmp_path, capsys):
    out = tmp_path / "a" / "b"
    assert main(["bench", "--out", str(out), "--name", name, "--only", "layers", "--sizes", "64", "--ranks", "8"]) == 2
    line = _error_line(capsys, "lrtrain bench")
    assert "argument --name:" in line and "(the file is written inside --out)" in line
    assert list(tmp_path.rglob("*")) == []  # nothing ran, nothing written, inside --out or out of it


@pytest.mark.parametrize("name", BAD_NAMES)
def test_write_report_refuses_a_name_that_is_a_path(name, tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(ValueError, match="report name"):
        write_report({}, str(out), name)
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize("name", ["bench", "bench_e2e-full", "run.v2", "x.y.z"])
def test_plain_file_names_are_accepted(name):
    assert file_name(name) == name


@pytest.mark.parametrize("command", [["demo", "--no-progress"], ["bench", "--only", "layers", "--sizes", "64"]])
def test_an_out_that_is_a_file_is_refused_before_running(command, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    for out, expect in ((f, "exists and is not a directory"), (f / "sub", "is not a directory")):
        assert main([*command, "--out", str(out)]) == 2
        line = _error_line(capsys, f"lrtrain {command[0]}")
        assert "argument --out:" in line and expect in line
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and f.read_text() == "keep"


# --------------------------------------------------------------------------------- help, --rank, --tau
def _subparser(module):
    sub = ArgumentParser(prog="lrtrain").add_subparsers(dest="command")
    module.add_parser(sub)
    return next(iter(sub.choices.values()))


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_every_option_has_help_and_its_default(command, capsys):
    import importlib

    parser = _subparser(importlib.import_module(f"lrtrain.cli.{command}"))
    assert main([command, "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (at hyphens too)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 8
    for a in options:
        assert a.help, f"{a.option_strings[0]} has no help text"
        assert "".join(f"{a.option_strings[0]} {a.metavar or ''}".split()) in text
        assert "".join(f"{a.help} (default: {a.default})".split()) in text, a.option_strings[0]


def test_demo_help_documents_rank_and_tau(capsys):
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for expect in ("(default: 15)", "(default: 64)", "(default: 0.002)", "(default: 0.0005)", "(default: 0)",
                   "min(RANK, min(out, in))", "a RANK no layer can take is refused", "in [0, 1)"):
        assert expect in text


@pytest.mark.parametrize("tau", ["5", "1", "1.0", "inf", "-0.1"])
def test_demo_refuses_tau_outside_0_1(tau, tmp_path, capsys):
    assert main(["demo", "--no-progress", f"--tau={tau}", "--out", str(tmp_path / "out")]) == 2
    assert "argument --tau: must be a finite number >= 0 and < 1" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tau", ["0", "0.12", "0.999"])
def test_tau_in_0_1_is_accepted(tau):
    assert relative_tolerance(tau) == float(tau)


def test_demo_rank_report_shows_the_rank_asked_and_what_it_became(tmp_path, capsys):
    """Layer 1 (400 x 64) cannot take --rank 100: capped at 64, where factors save nothing: left dense, and the
    report says both numbers; layer 3 (400 x 400) starts at the rank asked."""
    assert main(["demo", "--no-progress", "--epochs", "1", "--hidden", "400", "400", "--rank", "100",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"layer 1 left dense: .*would not save parameters "
                     r"\(--rank 100 capped at min\(out, in\) = 64\)", out)
    assert re.search(r"layer 3 \(400 x 400\): rank 100 at the start \(--rank\), \d+ at the end; capacity \d+", out)


def test_demo_refusing_a_rank_names_the_rank_asked(tmp_path, capsys):
    assert main(["demo", "--no-progress", "--rank", "300", "--out", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert "can be factorized at rank 300" in line
    assert re.search(r"layer 1: [^;]*would not save parameters \(--rank 300 capped at min\(out, in\) = 64\)", line)
    assert re.search(r"layer 3: [^;]*would not save parameters \(--rank 300 capped at min\(out, in\) = 256\)", line)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- progress and figure
def test_demo_off_a_terminal_prints_no_progress_bars_and_writes_the_figure(tmp_path, capsys):
    """stderr captured (not a TTY) and no --no-progress: no progress-bar lines (tqdm's 'dense: 0it' noise)."""
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    assert not sys.stderr.isatty()
    assert main(["demo", "--epochs", "2", "--hidden", "128", "--rank", "24", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"figure (test accuracy per epoch, active parameters, rank per layer): {tmp_path / 'ranks.png'}" \
        in captured.out
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert demo_cli._progress(True, "dense") is None
    monkeypatch.setattr(sys, "stderr", _TTY())
    wrap = demo_cli._progress(True, "dense")
    assert wrap is not None and list(wrap(range(3))) == [0, 1, 2]
    assert demo_cli._progress(False, "dense") is None  # --no-progress
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed
    assert demo_cli._progress(True, "dense") is None


def _histories(epochs=3, steps_per_epoch=4):
    dense = History(epoch_accuracies=[60.0, 80.0, 90.0][:epochs])
    lr = History(epoch_accuracies=[55.0, 82.0, 91.0][:epochs])
    r = [1, 2, 2, 3, 3, 3, 2, 2, 2, 2, 2, 2]  # small ranks: matplotlib's default ticks would be 0, 0.5, ...
    lr.ranks = [{"1": a, "3": max(a - 1, 1)} for a in r[:epochs * steps_per_epoch]]
    active = [500] + [400 + 10 * a for a in r[:epochs * steps_per_epoch]]
    return dense, lr, active


def test_plot_demo_draws_accuracy_parameters_and_ranks_against_capacity():
    pytest.importorskip("matplotlib")
    dense, lr, active = _histories()
    fig = demo_cli.plot_demo(dense, lr, dense_params=1000, active=active, allocated=700,
                             layers={"1": (2, 3), "3": (1, 2)})
    acc, par, rk = fig.axes
    lines = {ln.get_label(): ln for ln in acc.get_lines()}
    assert sorted(lines) == ["dense", "lrtrain"]
    assert list(lines["dense"].get_xdata()) == [1, 2, 3] and list(lines["dense"].get_ydata()) == [60, 80, 90]
    assert list(lines["lrtrain"].get_ydata()) == [55, 82, 91]
    assert "accuracy" in acc.get_ylabel()

    lines = {ln.get_label(): ln for ln in par.get_lines()}
    assert {"dense", "lrtrain (active)", "lrtrain (allocated)"} <= set(lines)
    assert list(lines["lrtrain (active)"].get_ydata()) == active
    assert set(lines["dense"].get_ydata()) == {1000}

    lines = {ln.get_label(): ln for ln in rk.get_lines()}
    assert list(lines["layer 1"].get_ydata()) == [2] + [s["1"] for s in lr.ranks]
    assert set(lines["layer 1 capacity 3"].get_ydata()) == {3} and set(lines["layer 3 capacity 2"].get_ydata()) == {2}
    assert lines["layer 1"].get_xdata()[-1] == 3  # steps on the epoch axis of the other panels
    fig.canvas.draw()
    ticks = [t for t in rk.get_yticks() if rk.get_ylim()[0] <= t <= rk.get_ylim()[1]]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)  # no fractional ranks
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch"
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_fit_records_the_test_accuracy_after_each_epoch(digits):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    h = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), digits.subset(200, 100), epochs=3, batch_size=50,
            eval_each_epoch=True)
    assert len(h.epoch_accuracies) == 3 and h.test_accuracy == h.epoch_accuracies[-1]
    assert fit(model, torch.optim.SGD(model.parameters(), lr=0.1), digits.subset(200, 100), 1).epoch_accuracies == []
    with pytest.raises(ValueError, match="eval_each_epoch must be True or False"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), digits, 1, eval_each_epoch=1)
