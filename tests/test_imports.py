"""``import lrtrain`` and ``import lrtrain.cli`` load no plotting, progress-bar, dataset, mocking, Hugging Face
or test library, and none of the console script's dataset code; the subcommand modules import those
libraries only inside the functions that use them. Checked in a fresh interpreter per module.

torch itself imports some of these (torch 2.13: ``unittest.mock`` from ``torch._guards``, ``tqdm`` from
``torch.hub`` when it is installed), so a module counts as loaded by lrtrain when ``import torch`` alone did
not load it; and every import statement that lrtrain's own modules run is recorded too, which catches an
import of a module torch had already loaded.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BANNED = ("tqdm", "matplotlib", "sklearn", "unittest.mock", "transformers", "pytest", "datasets", "torchvision")
CLI_DATA = ("lrtrain.cli.data", "lrtrain.cli.train", "lrtrain.cli.models")  # the demo's data set, loop and model

# Imports MODULE (argv[1]) after torch; prints the modules it loaded that torch had not, and the absolute imports
# (with their from-list) run by lrtrain's own modules meanwhile.
PROBE = r"""
import builtins, importlib, json, sys
import torch

before = set(sys.modules)
requested = []
real_import = builtins.__import__


def spy(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    if level == 0 and importer.split(".")[0] == "lrtrain":
        requested.extend([name] + [f"{name}.{f}" for f in fromlist or ()])
    return real_import(name, globals, locals, fromlist, level)


builtins.__import__ = spy
importlib.import_module(sys.argv[1])
builtins.__import__ = real_import
print(json.dumps({"loaded": sorted(set(sys.modules) - before), "requested": sorted(set(requested))}))
"""


def _probe(module: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _banned(name: str) -> bool:
    return any(name == b or name.startswith(b + ".") for b in BANNED)


@pytest.fixture(scope="module")
def probes() -> dict:
    return {m: _probe(m) for m in ("lrtrain", "lrtrain.cli", "lrtrain.cli.demo", "lrtrain.cli.bench")}


@pytest.mark.parametrize("module", ["lrtrain", "lrtrain.cli", "lrtrain.cli.demo", "lrtrain.cli.bench"])
def test_import_loads_no_plotting_progress_dataset_mocking_or_test_library(probes, module):
    got = probes[module]
    assert [m for m in got["loaded"] if _banned(m)] == []
    assert [m for m in got["requested"] if _banned(m)] == []


@pytest.mark.parametrize("module", ["lrtrain", "lrtrain.cli"])
def test_import_loads_no_dataset_code(probes, module):
    loaded = probes[module]["loaded"]
    assert [m for m in loaded if m.startswith(CLI_DATA)] == []
    if module == "lrtrain":  # the library does not import its console script at all
        assert [m for m in loaded if m == "lrtrain.cli" or m.startswith("lrtrain.cli.")] == []
    # the probe sees what a module loads: the demo's own module does load the dataset code
    assert "lrtrain.cli.data" in probes["lrtrain.cli.demo"]["loaded"]
