"""``lrtrain bench`` and the benchmark harness on top of it (benchmarks/harness/) on tiny sizes: the FLOP-ideal
formula, the memory tracker, the step cases, the tuning sweep and the reports written by ``lrtrain bench`` and
benchmarks/bench_report.py (speed targets live in benchmarks/, never here)."""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lrtrain
from lrtrain import LowRankLinear
from lrtrain.cli import main
from lrtrain.cli.data import load_digits
from lrtrain.cli.models import mlp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness is not in the package
import bench_report  # noqa: E402
import bench_tuning  # noqa: E402
import harness as B  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.mark.parametrize("m,n,r", [(64, 64, 8), (48, 80, 5), (96, 32, 16)])
def test_flop_ideal_is_the_counted_flop_ratio_of_forward_plus_backward(m, n, r):
    x = torch.randn(16, n)
    dense = B.LayerCase(nn.Linear(n, m), x.clone(), "dense")
    low = B.LayerCase(LowRankLinear(n, m, r), x.clone(), "low")
    assert B.count_flops(dense) == 6 * 16 * m * n
    assert B.count_flops(dense) / B.count_flops(low) == pytest.approx(B.flop_ideal_speedup(m, n, r), rel=1e-12)
    assert B.flop_ideal_speedup(4096, 4096, 256) == pytest.approx(4096 ** 2 / (256 * 8192 + 256 ** 2))
    with pytest.raises(ValueError):
        B.flop_ideal_speedup(8, 8, 0)


def test_conv_block_case_factorizes_both_convolutions_and_saves_flops():
    dense = B.conv_block_case(None, channels=(8, 16, 16), hw=6, batch=2)
    low = B.conv_block_case(4, channels=(8, 16, 16), hw=6, batch=2)
    assert sum(type(m).__name__ == "LowRankConv2d" for m in low.module.modules()) == 2
    low()
    assert all(p.grad is not None for p in low.params) and low.x.grad is not None
    # per output position (P = 2·6·6 of them) dense 3mn MACs per conv; factorized 3r(m+n) + 2r² (G_S and
    # g_t S), plus U·S (m r²) once per conv; (m, n) = (16, 8·9) and (16, 16·9), r = 4
    P, r = 72, 4
    dense_macs = P * sum(3 * m * n for m, n in [(16, 72), (16, 144)])
    low_macs = sum(P * (3 * r * (m + n) + 2 * r * r) + m * r * r for m, n in [(16, 72), (16, 144)])
    assert B.count_flops(dense) / B.count_flops(low) == pytest.approx(dense_macs / low_macs, rel=1e-12)


def test_memory_tracker_counts_live_storages_and_their_peak():
    mib = 2 ** 20
    with B.TensorMemoryTracker() as t:
        a = torch.ones(mib // 4)  # 1 MiB of float32
        b = torch.ones(mib // 2)  # 2 MiB
        view = b[:10]  # same storage: no new bytes
        del a
        c = torch.zeros(mib // 8)  # 0.5 MiB while 2 MiB is live
        assert t.current == 2.5 * mib
    assert t.peak == 3 * mib
    del b, view, c
    assert t.current == 0


def test_profile_step_memory_parts_of_a_dense_adamw_step():
    torch.manual_seed(0)
    model = mlp(20, [32], 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    prof = B.profile_step_memory(model, opt, x, y)
    n_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert prof.parameters == n_bytes and prof.gradients == n_bytes
    # exp_avg + exp_avg_sq per parameter, plus torch's float32 'step' scalar per parameter
    assert prof.optimizer_state == 2 * n_bytes + 4 * len(list(model.parameters()))
    # saved for backward: at least the input and the hidden ReLU output
    assert prof.activations >= x.numel() * 4 + 8 * 32 * 4
    assert prof.peak >= prof.parameters + prof.gradients + prof.optimizer_state


def test_step_cases_keep_the_rank_and_lrtrain_uses_less_memory():
    methods = {m.key: m for m in B.available_methods()}
    assert list(methods)[:1] == ["dense"] and "lrtrain-reference" in methods
    dense = B.step_case(methods["dense"], hidden=(256, 256), rank=8, batch=16)
    for key in [k for k in methods if k.startswith("lrtrain")]:
        low = B.step_case(methods[key], hidden=(256, 256), rank=8, batch=16)
        assert low.opt.backend == key.split("-", 1)[1]
        for _ in range(3):
            low.train_step()
        assert {m.rank for m in low.model.modules() if hasattr(m, "rank")} == {8}
        p_dense = B.profile_step_memory(dense.model, dense.opt, dense.x, dense.y)
        p_low = B.profile_step_memory(low.model, low.opt, low.x, low.y)
        assert p_low.peak < 0.5 * p_dense.peak


def test_step_model_specs_parse_and_reject_bad_input():
    sm = B.StepModel.parse("1024-1024-1024@256:64")
    assert (sm.hidden, sm.batch, sm.ranks, sm.name) == ((1024, 1024, 1024), 256, (64,), "784-1024-1024-1024-10")
    assert B.StepModel.parse(sm.spec()) == sm
    for bad in ("1024@256", "1024-x@256:64", "1024@0:64", ""):
        with pytest.raises(ValueError):
            B.StepModel.parse(bad)


def test_optimizer_sweep_rows_have_ratios_against_dense():
    methods = [B.DENSE] + B.dlrt_methods()
    rows = B.optimizer_sweep([B.StepModel((32, 32), 8, (4,))], min_time=0.01, methods=methods, log=None)
    assert [r["key"] for r in rows] == [m.key for m in methods]
    dense = rows[0]
    assert dense["train_vs_dense"] == 1.0 and dense["opt_step_vs_dense"] == 1.0
    for r in rows[1:]:
        assert r["ranks"] == [4] and r["model"] == "784-32-32-10"
        assert r["opt_step_vs_dense"] == pytest.approx(r["opt_step_ms"] / dense["opt_step_ms"])


def test_target_checks_compare_against_the_thresholds():
    res = B.BenchResults(config={}, machine={}, command="")
    res.layers = [dict(size=4096, rank=256, fraction_of_ideal=0.59, speedup=4.6, ideal=7.76)]
    mem = lambda peak: dict(peak=peak)  # noqa: E731
    res.e2e = [dict(key="dense", method="dense AdamW", train_wall_s=100.0, test_accuracy=96.0, memory=mem(100),
                    epochs=5),
               dict(key="lrtrain-cpu", method="lrtrain", train_wall_s=60.0, test_accuracy=95.5, memory=mem(50),
                    epochs=5)]
    res.optimizer = [dict(model="m", batch=8, rank=4, key="galore", method="GaLoreAdamW", train_step_ms=9.0,
                          amortized_train_step_ms=10.0),
                     dict(model="m", batch=8, rank=4, key="lrtrain-cpu", method="lrtrain", train_step_ms=5.0)]
    status = [t["status"] for t in B.target_checks(res)]
    assert status == ["MISSED", "met", "met", "met"]  # 59% < 60%; 0.6x at -0.5; 0.5x; 2.0x
    res.e2e[1]["test_accuracy"] = 95.49
    assert B.target_checks(res)[1]["status"] == "MISSED"


def test_galore_refresh_recomputes_the_projectors():
    if not B.galore_status()[0]:
        pytest.skip(B.galore_status()[1])
    case = B.step_case(B.Method("galore", "GaLoreAdamW"), hidden=(64, 64), rank=4, batch=8)
    projectors = [st["projector"] for st in case.opt.state.values() if "projector" in st]
    assert len(projectors) == 2  # the two 64-wide hidden weights (the 64 -> 10 output layer stays dense)
    assert all(p.rank == 4 for p in projectors)
    before = [p.ortho_matrix for p in projectors]
    case.train_step()
    assert all(p.ortho_matrix is b for p, b in zip(projectors, before))  # steady step: same projector
    case.refresh_setup()
    case.step()
    assert all(p.ortho_matrix is not b for p, b in zip(projectors, before))


def _table(md: str, header_start: str) -> list:
    """Rows (lists of cell strings) of the markdown table whose header line starts with ``header_start``."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _x(cell: str) -> float:
    assert cell.endswith("x"), cell
    return float(cell[:-1])


def test_lrtrain_bench_writes_report_of_layers_and_steps(tmp_path, capsys):
    """``lrtrain bench``: the report's numbers parse and agree with its JSON; speedups are the ratios of the
    timings, the ideal is the FLOP formula; dense AdamW and DLRT train the same MLP, DLRT at the fixed rank."""
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--sizes", "64", "--ranks", "4", "8", "128", "--layer-batch", "16",
                 "--step-models", "32-32@8:4", "--min-time", "0.01"]) == 0
    md = (out / "bench.md").read_text()
    data = json.loads((out / "bench.json").read_text())
    assert "lrtrain bench --out" in md and "--ranks 4 8 128 --layer-batch 16" in md and "--min-time 0.01" in md
    m = data["machine"]
    assert m["torch"] == torch.__version__ and m["lrtrain"] == lrtrain.__version__ and m["torch_threads"] == 1
    assert f"{m['cores']} cores ({m['cores_usable']} usable), torch threads: 1; torch {torch.__version__};" in md

    rows = _table(md, "| size | rank | nn.Linear (ms)")
    assert [(int(r[0]), int(r[1])) for r in rows] == [(j["size"], j["rank"]) for j in data["layers"]]
    assert [(j["size"], j["rank"]) for j in data["layers"]] == [(64, 4), (64, 8)]  # rank 128 > 64: skipped
    for r, j in zip(rows, data["layers"]):
        assert (float(r[2]), float(r[3])) == (round(j["dense_ms"], 2), round(j["lowrank_ms"], 2))
        assert j["speedup"] == pytest.approx(j["dense_ms"] / j["lowrank_ms"], rel=1e-9)
        assert _x(r[4]) == pytest.approx(j["speedup"], abs=0.006)
        assert j["ideal"] == pytest.approx(B.flop_ideal_speedup(64, 64, j["rank"]), rel=1e-12)
        assert _x(r[5]) == pytest.approx(j["ideal"], abs=0.006)
        assert r[6] == f"{j['speedup'] / j['ideal']:.0%}"

    rows = _table(md, "| MLP | batch | rank | method | train step (ms)")
    assert [r[3] for r in rows] == [j["method"] for j in data["optimizer"]] == ["dense AdamW", "lrtrain DLRT"]
    assert all(r[:3] == ["784-32-32-10", "8", "4"] for r in rows)
    dense, low = data["optimizer"]
    assert dense["ranks"] == [] and low["ranks"] == [4]
    for r, j in zip(rows, data["optimizer"]):
        assert float(r[4]) == round(j["train_step_ms"], 1) and float(r[6]) == round(j["opt_step_ms"], 1)
        assert j["train_vs_dense"] == pytest.approx(dense["train_step_ms"] / j["train_step_ms"], rel=1e-9)
        assert j["opt_step_vs_dense"] == pytest.approx(j["opt_step_ms"] / dense["opt_step_ms"], rel=1e-9)
        assert _x(r[5]) == pytest.approx(j["train_vs_dense"], abs=0.006)
        assert _x(r[7]) == pytest.approx(j["opt_step_vs_dense"], abs=0.006)
    assert rows[0][5] == "1.00x" and rows[0][7] == "1.00x"
    assert f"report: {out / 'bench.md'}" in capsys.readouterr().out


def test_bench_report_writes_report_with_tables_targets_and_plots(tmp_path, capsys):
    """Every number in the report parses and agrees with the JSON; ratios are the ratios of the timings;
    parameter and memory counts are the model's; every method has its rows."""
    out = tmp_path / "bench"
    assert bench_report.main(["--out", str(out), "--data", "digits", "--sizes", "64", "--ranks", "4", "8",
                 "--layer-batch", "16", "--conv-ranks", "4", "--conv-hw", "4", "--conv-batch", "1", "--step-models", "32-32@8:4", "--hidden", "32", "32",
                 "--epochs", "1", "--rank", "8", "--tau", "0.12", "--taus", "0.3", "--min-time", "0.01",
                 "--probes", "1"]) == 0
    md = (out / "bench.md").read_text()
    data = json.loads((out / "bench.json").read_text())
    methods = B.available_methods()
    assert methods[0].key == "dense" and any(m.is_lrtrain for m in methods)
    galore = B.galore_status()[0]
    assert galore == any(m.key == "galore" for m in methods)

    # the command that reproduces the run, and the machine it ran on
    assert "python benchmarks/bench_report.py --out" in md and "--sizes 64 --ranks 4 8" in md and "--taus 0.3" in md
    m = data["machine"]
    assert m["torch"] == torch.__version__ and m["torch_threads"] == 1  # the autouse fixture's 1 thread
    assert f"- CPU: {m['cpu']}; {m['cores']} cores ({m['cores_usable']} usable), torch threads: 1" in md
    assert m["cpu"].strip() and m["cores"] >= m["cores_usable"] >= 1
    assert f"torch {torch.__version__};" in md
    if not torch.cuda.is_available():
        assert m["device"].startswith("cpu") and "- GPU numbers: not measured, no GPU in this session" in md
    if not galore:
        assert "GaLoreAdamW not benchmarked" in md

    # layers: one row per rank; speedup = dense / low-rank time; ideal = the FLOP formula; % = speedup / ideal
    rows = _table(md, "| size | rank | nn.Linear (ms)")
    assert [(int(r[0]), int(r[1])) for r in rows] == [(64, 4), (64, 8)]
    assert [(j["size"], j["rank"]) for j in data["layers"]] == [(64, 4), (64, 8)]
    for r, j in zip(rows, data["layers"]):
        dense_ms, low_ms, speedup, ideal = float(r[2]), float(r[3]), _x(r[4]), _x(r[5])
        assert dense_ms > 0 and low_ms > 0 and j["dense_ms"] > 0 and j["lowrank_ms"] > 0
        assert (dense_ms, low_ms) == (round(j["dense_ms"], 2), round(j["lowrank_ms"], 2))
        assert j["speedup"] == pytest.approx(j["dense_ms"] / j["lowrank_ms"], rel=1e-9)
        assert speedup == pytest.approx(j["speedup"], abs=0.006)
        assert j["ideal"] == pytest.approx(B.flop_ideal_speedup(64, 64, j["rank"]), rel=1e-12)
        assert ideal == pytest.approx(j["ideal"], abs=0.006)
        assert j["fraction_of_ideal"] == pytest.approx(j["speedup"] / j["ideal"], rel=1e-9)
        assert r[6] == f"{j['fraction_of_ideal']:.0%}"

    # conv block: the same relations
    rows = _table(md, "| rank | nn.Conv2d (ms)")
    assert [int(r[0]) for r in rows] == [j["rank"] for j in data["conv"]] == [4]
    for r, j in zip(rows, data["conv"]):
        assert j["speedup"] == pytest.approx(j["dense_ms"] / j["lowrank_ms"], rel=1e-9)
        assert _x(r[3]) == pytest.approx(j["speedup"], abs=0.006) and _x(r[4]) == pytest.approx(j["ideal"], abs=0.006)
        assert j["ideal"] > 1 and j["fraction_of_ideal"] == pytest.approx(j["speedup"] / j["ideal"], rel=1e-9)

    # optimizer step: one row per method; train speedup = dense / method's amortized train step, optimizer step
    # ratio = method / dense
    rows = _table(md, "| MLP | batch | rank | method | train step (ms)")
    assert [r[3] for r in rows] == [mm.label for mm in methods] == [j["method"] for j in data["optimizer"]]
    assert all(r[:3] == ["784-32-32-10", "8", "4"] for r in rows)
    dense = data["optimizer"][0]
    for r, j in zip(rows, data["optimizer"]):
        assert j["train_step_ms"] > 0 and j["opt_step_ms"] > 0
        assert float(r[4]) == round(j["train_step_ms"], 1) and float(r[7]) == round(j["opt_step_ms"], 1)
        assert j["train_vs_dense"] == pytest.approx(dense["train_step_ms"] / j["amortized_train_step_ms"], rel=1e-9)
        assert float(r[5]) == round(j["amortized_train_step_ms"], 1)
        assert j["opt_step_vs_dense"] == pytest.approx(j["opt_step_ms"] / dense["opt_step_ms"], rel=1e-9)
        assert _x(r[6]) == pytest.approx(j["train_vs_dense"], abs=0.006)
        assert _x(r[8]) == pytest.approx(j["opt_step_vs_dense"], abs=0.006)
        if j["key"] == "galore":  # amortized = steady step + (refresh - steady optimizer step)+ / gap
            assert j["refresh_step_ms"] > 0 and float(r[9]) == round(j["refresh_step_ms"], 1)
            assert j["amortized_train_step_ms"] == pytest.approx(
                j["train_step_ms"] + max(j["refresh_step_ms"] - j["opt_step_ms"], 0) / 200, rel=1e-9)
        else:
            assert r[9] == "-" and j["amortized_train_step_ms"] == j["train_step_ms"]
    assert rows[0][6] == "1.00x" and rows[0][8] == "1.00x"

    # end to end: one row per method (lrtrain methods once per τ); wall ratio, Δ accuracy, parameters,
    # memory and final ranks consistent with the JSON and with the models
    labels = [lab for mm in methods for lab in ([f"{mm.label} τ=0.12", f"{mm.label} τ=0.3"] if mm.is_lrtrain else [mm.label])]
    rows = _table(md, "| method | wall (s) | vs dense")
    e2e = data["e2e"]
    assert [r[0] for r in rows] == labels == [j["method"] for j in e2e]
    n_test = 449  # digits: 1797 images, a quarter held out
    dense = e2e[0]
    dense_model = mlp(64, [32, 32], 10)
    assert dense["parameters"] == sum(p.numel() for p in dense_model.parameters())
    for r, j in zip(rows, e2e):
        assert j["epochs"] == 1 and j["train_wall_s"] > 0 and math.isfinite(j["train_wall_s"])
        assert float(r[1]) == round(j["train_wall_s"], 1)
        assert _x(r[2]) == pytest.approx(j["train_wall_s"] / dense["train_wall_s"], abs=0.006)
        acc = float(r[3])
        assert 0 <= acc <= 100 and acc == round(j["test_accuracy"], 2)
        assert j["test_accuracy"] * n_test / 100 == pytest.approx(round(j["test_accuracy"] * n_test / 100), abs=1e-6)
        assert float(r[4]) == pytest.approx(j["test_accuracy"] - dense["test_accuracy"], abs=0.006)
        assert int(r[5].replace(",", "")) == j["parameters"]
        mem = j["memory"]
        assert float(r[6]) == round(mem["peak"] / 2 ** 20, 1)
        assert _x(r[7]) == pytest.approx(mem["peak"] / dense["memory"]["peak"], abs=0.006)
        assert mem["peak"] >= mem["parameters"] + mem["gradients"] > 0
        if j["key"] in ("dense", "galore"):
            assert r[9] == "-" and j["parameters"] == dense["parameters"]
            assert mem["parameters"] == 4 * dense["parameters"]  # float32
            continue
        # lrtrain: hidden layers 64->32 and 32->32 factorized at ranks (r1, r2), 32->10 left dense (330)
        ranks = list(j["final_ranks"].values())
        assert r[9] == " ".join(map(str, ranks)) and len(ranks) == 2
        assert all(1 <= k <= 16 for k in ranks)  # capacity 2 * rank 8
        r1, r2 = ranks
        assert j["parameters"] == r1 * (64 + 32 + r1) + 32 + r2 * (32 + 32 + r2) + 32 + 330
        assert j["parameters_initial"] == 8 * (64 + 32 + 8) + 32 + 8 * (32 + 32 + 8) + 32 + 330
        allocated = sum(p.numel() for p in lrtrain.lowrank(mlp(64, [32, 32], 10), rank=8).parameters())
        assert mem["parameters"] == 4 * allocated
        assert len(j["rank_trajectory"]) == j["steps"] == math.ceil(1348 / 128)
        assert j["rank_trajectory"][-1] == j["final_ranks"]
    # targets: every row has a status; measured end-to-end values are the ratios of the runs above
    targets = _table(md, "| target | measured | threshold")
    assert targets and all(t[3] in ("met", "MISSED", "not measured") for t in targets)
    assert "| layer fwd+bwd 4096², r=256, CPU: speedup / FLOP-ideal | - | >= 60% | not measured |" in md
    by_label = {j["method"]: j for j in e2e}
    wall = [t for t in targets if t[0].startswith("end-to-end wall time")]
    assert len(wall) == len(labels) - 1 - galore
    for t in wall:
        j = by_label[re.search(r"\), (.+?) / dense AdamW", t[0]).group(1)]
        ratio = j["train_wall_s"] / dense["train_wall_s"]
        assert _x(t[1]) == pytest.approx(ratio, abs=0.006)
        ok = ratio <= 0.6 and j["test_accuracy"] - dense["test_accuracy"] >= -0.5
        assert t[3] == ("met" if ok else "MISSED")
    for t in (t for t in targets if t[0].startswith("peak training memory")):
        j = by_label[re.search(r"memory, (.+?) / dense AdamW", t[0]).group(1)]
        ratio = j["memory"]["peak"] / dense["memory"]["peak"]
        assert _x(t[1]) == pytest.approx(ratio, abs=0.006) and t[3] == ("met" if ratio <= 0.5 else "MISSED")

    # plots, and the JSON reloads into the same results
    for name in ("speedup", "accuracy", "ranks"):
        assert (out / f"bench_{name}.png").read_bytes()[:8] == PNG
    again = B.load_results(str(out / "bench.json"))
    assert again.e2e == data["e2e"] and len(B.make_plots(again, str(tmp_path / "replot"))) == 3
    printed = capsys.readouterr().out
    assert f"report: {out / 'bench.md'}" in printed


def test_tuning_holds_out_a_validation_split_and_runs_a_config():
    data = load_digits()
    val = bench_tuning.validation_split(data, n_val=200)
    assert len(val.train_y) == len(data.train_y) - 200 and torch.equal(val.test_x, data.train_x[-200:])
    assert bench_tuning.parse_config("lrtrain:2e-3:0.1:16") == dict(kind="lrtrain", lr=2e-3, tau=0.1, r0=16)
    with pytest.raises(ValueError):
        bench_tuning.parse_config("lrtrain:1e-3:0.1")
    row = bench_tuning.run_config(bench_tuning.parse_config("lrtrain:1e-3:0.1:8"), val, epochs=1, hidden=(32, 32),
                                  batch_size=64)
    assert len(row["val_acc"]) == 1 and 0 <= row["val_acc"][0] <= 100 and all(1 <= r <= 16 for r in row["final_ranks"])


@pytest.mark.parametrize("args,expect", [
    (["--sizes", "0"], "--sizes: must be an integer >= 1"),
    (["--ranks", "8", "-1"], "--ranks: must be an integer >= 1"),
    (["--epochs", "0"], "--epochs: must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
    (["--lrtrain-lr", "-1"], "--lrtrain-lr: must be a finite number > 0"),
    (["--taus", "0.1", "-0.1"], "--taus: must be a finite number >= 0"),
    (["--min-time", "0"], "--min-time: must be a finite number > 0"),
    (["--probes", "-1"], "--probes: must be an integer >= 0"),
    (["--data", "/nonexistent"], "'/nonexistent': no such directory"),
    (["--step-models", "1024@0:64"], "--step-models: step model '1024@0:64'"),
    (["--only", "gpu"], "--only: invalid choice: 'gpu'"),
    (["--only", "layers", "--sizes", "64", "--ranks", "128"], "no --ranks value [128] is <= a --sizes value [64]"),
])
def test_bench_report_refuses_bad_arguments_in_one_line(args, expect, capsys, tmp_path):
    """Exit status 2, one line on stderr naming the script, no traceback; nothing ran, nothing written."""
    assert bench_report.main(["--out", str(tmp_path), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{bench_report.PROG}: error: "), captured.err
    assert expect in lines[0] and "Traceback" not in captured.err + captured.out
    assert not any(tmp_path.iterdir())
