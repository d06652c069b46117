"""benchmarks/lm_bench.py --smoke: the byte-level LM benchmark runs end to end on a tiny Llama (seconds) and
its markdown report states the same numbers as its json (no timing or quality target is checked here)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lm_bench.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_bench")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "lm_bench_smoke.json").read_text())
    md = (out / "lm_bench_smoke.md").read_text()
    print(f"lm_bench --smoke: {wall:.1f} s")
    return out, res, md


def test_all_methods_ran_on_the_same_init_batches_and_validation_windows(smoke):
    _, res, _ = smoke
    runs = res["runs"]
    expected = ["dense"] + (["galore"] if importlib.util.find_spec("galore_torch") else []) + ["lrtrain"]
    assert list(runs) == expected
    for key in ("init_checksum", "batch_schedule_sha256", "val_windows_sha256"):
        assert len({json.dumps(r[key]) for r in runs.values()}) == 1, key
    assert {tuple(r["corpus_sha256"]) for r in runs.values()} == {(res["corpus"]["train_sha256"],
                                                                   res["corpus"]["val_sha256"])}
    c = res["config"]
    # same learning-rate schedule: warmup then cosine, identical for all (only the peak lr may differ)
    for r in runs.values():
        assert r["steps"] == c["steps"] and r["tokens"] == c["steps"] * c["batch"] * c["context"]
        assert [e["step"] for e in r["evals"]] == [e["step"] for e in runs["dense"]["evals"]]
        assert r["evals"][-1]["step"] == c["steps"] and r["evals"][0]["step"] == 0
        assert all(math.isfinite(x) for x in r["train_loss"]) and len(r["train_loss"]) == c["steps"]
    assert res["corpus"]["train_files"] + res["corpus"]["val_files"] == res["corpus"]["files"]
    assert res["corpus"]["val_files"] == len(res["corpus"]["val_file_list"]) > 0


def test_numbers_are_consistent(smoke):
    _, res, _ = smoke
    for r in res["runs"].values():
        assert r["val_loss"] == r["evals"][-1]["val_loss"]
        assert r["bits_per_byte"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-12)
        for e in r["evals"]:
            assert e["bits_per_byte"] == pytest.approx(e["val_loss"] / math.log(2), rel=1e-12)
        s = r["time_split_s"]
        assert r["train_wall_s"] == pytest.approx(s["forward"] + s["backward"] + s["optimizer"], rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["train_wall_s"], rel=1e-9)
        assert r["evals"][-1]["wall_s"] == pytest.approx(r["train_wall_s"], rel=1e-9)
        m = r["memory_tensor_bytes"]
        assert m["peak"] >= m["parameters"] + m["gradients"] > 0
        assert 0 < r["params_active"] <= r["params_trainable"]
    dense, low = res["runs"]["dense"], res["runs"]["lrtrain"]
    assert dense["final_ranks"] == {} and dense["params_trainable"] == dense["params_dense_model"]
    # every attention and MLP projection converted, nothing else
    assert len(low["final_ranks"]) == 7 * res["config"]["layers"]
    assert all(n.endswith("_proj") and "lm_head" not in n for n in low["final_ranks"])
    ranks = list(low["final_ranks"].values())
    assert low["rank_stats"]["min"] == min(ranks) and low["rank_stats"]["max"] == max(ranks)
    assert all(1 <= r <= low["capacities"][n] for n, r in low["final_ranks"].items())
    assert low["params_active"] < dense["params_trainable"]


def test_report_states_the_json_numbers(smoke):
    out, res, md = smoke
    for k, r in res["runs"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {r['label']} |"))
        assert f"| {r['val_loss']:.4f} | {r['bits_per_byte']:.4f} | {r['train_wall_s']:.1f} |" in row
        assert f"| {r['params_trainable']:,} | {r['params_active']:,} |" in row
        st = r["rank_stats"]
        assert row.endswith(f"| {st['min']}/{st['median']:g}/{st['max']} |" if st else "| - |")
    low = res["runs"]["lrtrain"]
    layer0 = [low["final_ranks"][f"model.layers.0.{s}"] for s in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert "| 0 | " + " | ".join(map(str, layer0)) + " |" in md
    targets = res["targets"]
    assert len(targets) == (4 if "galore" in res["runs"] else 3)
    for t in targets:
        assert f"| {t['target']} | {t['measured']} |" in md
        assert f"**{'met' if t['met'] else 'missed'}**" in md
        assert t["met"] or t["why"]  # a missed target says what limits it
    assert res["command"] in md and f"{res['config']['steps'] * res['config']['batch'] * res['config']['context']:,}" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "lm_bench_smoke_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
