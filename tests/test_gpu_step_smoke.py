"""The prepared GPU check (issue 19 item 5) without a GPU: ``benchmarks/gpu_step.py`` on CPU at tiny sizes writes its
markdown and JSON with the expected rows, and ``benchmarks/gpu_check.sh`` parses, prints its stages in a dry run and,
on a machine without a GPU, records every GPU stage as failed or skipped, still writes gpu_check.md and exits 2.
Nothing here needs a GPU or times anything (the numbers are not checked)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lrtrain.update as update

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["env", "torch", "wheels", "build", "import", "tests", "bench", "memcheck", "racecheck", "synccheck"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.pop("OUT", None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_gpu_step_on_cpu_writes_markdown_and_json_with_every_row(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_step.py", "--device", "cpu", "--layers", "2", "--width", "64", "--rank", "8",
           "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "gpu_step.json").read_text())
    md = (tmp_path / "gpu_step.md").read_text()

    expected = ["dense", "lrtrain-reference"] + (["lrtrain-cpu", "lrtrain-auto"] if update.available()["cpu"] else [])
    assert [k for k in res["config"]["methods"] if k != "galore"] == expected
    keys = [(row["dtype"], row["key"]) for row in res["rows"]]
    want = [(d, k) for d in ("fp32", "bf16") for k in res["config"]["methods"]]
    assert keys == want, res["notes"]
    for row in res["rows"]:
        assert row["timed_steps"] == 2 and row["step_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["opt_ms"] > 0
        assert 0 < row["opt_share"] < 1 and row["loss_finite"] and row["peak_gib"] is None  # no CUDA memory on CPU
        if row["key"].startswith("lrtrain"):
            assert row["ranks"] == [8] and row["skipped_steps"] == 0
            fused = row["fused_layers"]  # layers launched on a compiled backend in one step
            assert fused == {"lrtrain-reference": {}, "lrtrain-cpu": {"cpu": 2}}.get(row["key"], fused)
            assert fused in ({}, {"cpu": 2})
            assert row["backend_used"] == ("reference" if not fused else "cpu (2/2 layers)")
        if row["key"] == "galore":
            assert row["projector_refreshes_timed"] == 0 and row["amortized_step_ms"] >= row["step_ms"]

    assert "- date: " in md and "- device: cpu (no GPU used)" in md and "- nvidia-smi: " in md
    assert "`update.available()` = " in md
    assert "## fp32" in md and "## bf16" in md
    for row in res["rows"]:  # one table line per row, in its dtype's section
        section = md.split(f"## {row['dtype']}", 1)[1].split("\n## ", 1)[0]
        assert f"| {row['method']} | {row['backend_used']} |" in section
    if "galore" not in res["config"]["methods"]:
        assert "GaLoreAdamW not run: " in md


def test_gpu_step_rejects_bad_arguments():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu_step.parse_args(["--device", "cpu"]).dtypes == ["fp32", "bf16"]
    for bad in (["--dtypes", "fp16"], ["--rank", "128", "--width", "64"], ["--galore-gap", "5"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit) as e:
            gpu_step.parse_args(["--device", "cpu", *bad])
        assert e.value.code == 2, bad


def test_gpu_check_script_parses_and_its_dry_run_lists_every_stage(tmp_path):
    bash = shutil.which("bash")
    assert subprocess.run([bash, "-n", str(SCRIPT)]).returncode == 0
    r = subprocess.run([bash, str(SCRIPT)], cwd=tmp_path, env=_env(GPU_CHECK_DRY="1", OUT=str(tmp_path)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    md = (tmp_path / "gpu_check.md").read_text()
    for s in STAGES:
        assert f"| {s} | " in md
    assert md.count("planned (dry run)") >= len(STAGES) - 1  # wheels: skipped without a .whl folder
    assert "pip install --no-build-isolation" in r.stdout
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"--tool {tool}" in r.stdout
    assert "--kernel-name kns=" in md  # the racecheck/synccheck filter: lrtrain's kernels, found in csrc/cuda/*.cu
    assert not (tmp_path / "gpu_check.log").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is here: run benchmarks/gpu_check.sh itself")
def test_gpu_check_without_a_gpu_skips_the_gpu_stages_and_exits_2(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=_env(OUT=str(tmp_path), GPU_CHECK_WHEELS=str(tmp_path)),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stdout + r.stderr
    md = (tmp_path / "gpu_check.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in md.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in STAGES}
    assert set(rows) == set(STAGES)
    assert rows["env"].startswith("FAIL") and "no GPU" in md
    for s in STAGES[2:]:
        assert rows[s].startswith("skipped"), (s, rows[s])
    assert "===== env: FAIL" in (tmp_path / "gpu_check.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "gpu_check.md"]
