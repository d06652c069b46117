"""The package's architecture holds: no import cycle between lrtrain's subpackages (lazy imports included),
the layer update (lrtrain.update) imports nothing else of lrtrain, and the compiled modules are refused
when they do not match the Python side (constants, torch version, argument contract)."""
import ast
import os
import warnings

import pytest
import torch

import lrtrain
import lrtrain.update as update
from lrtrain.update import backends, constants

ROOT = os.path.dirname(lrtrain.__file__)


def _unit(module: str) -> str:
    """The architectural unit of a module: its subpackage (lrtrain.X) or top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _imports(path: str, module: str) -> set:
    """Every lrtrain module imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    pkg = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lrtrain")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("lrtrain"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}
    return out


def _graph() -> dict:
    graph: dict = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            module = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            src = _unit(module)
            for dst in map(_unit, _imports(path, module)):
                if dst != src and dst != "lrtrain":
                    graph.setdefault(src, set()).add(dst)
    return graph


def test_no_import_cycle_between_subpackages():
    graph = _graph()
    state: dict = {}

    def visit(u, path):
        state[u] = "open"
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [u, v])}")
            if v not in state:
                visit(v, path + [u])
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [])


def test_the_update_package_imports_nothing_else_of_lrtrain():
    graph = _graph()
    assert "lrtrain.optim" in graph and "lrtrain.update" in graph["lrtrain.optim"]  # the graph sees imports
    assert graph.get("lrtrain.update", set()) == set()


def test_generated_header_is_the_constants_module():
    """setup.py writes build/generated/lrtrain_constants.h from lrtrain.update.constants."""
    path = os.path.join(os.path.dirname(ROOT), "build", "generated", "lrtrain_constants.h")
    if not os.path.exists(path):
        pytest.skip("not built from this checkout")
    assert open(path).read() == constants.c_header()


needs_cpu = pytest.mark.skipif(not update.available()["cpu"], reason="CPU extension not built")


@pytest.fixture
def reload_backends(monkeypatch):
    """Forget the loaded modules (before and after the test), so a patched expectation is checked afresh."""
    monkeypatch.setattr(backends, "_modules", {})
    monkeypatch.setattr(backends, "_errors", {})
    yield


def _layer_step():
    g = torch.Generator().manual_seed(0)
    U, V = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))[0], \
        torch.linalg.qr(torch.randn(16, 4, generator=g, dtype=torch.float64))[0]
    t = [U, torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)), V, torch.randn(20, 4, generator=g, dtype=torch.float64),
         torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64),
         torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)]
    return update.LayerStep(*t, max_rank=8, spare=1)


def _refused(monkeypatch, patch, match):
    patch()
    with pytest.warns(RuntimeWarning, match=match):
        assert update.available()["cpu"] is False
    assert match in update.load_errors()["cpu"] or pytest.fail(update.load_errors()["cpu"])
    with pytest.raises(ValueError, match="not active here"):
        update.check_backend("cpu")
    items = [_layer_step(), _layer_step()]
    got = update.update_layers(items, 1e-2, 0.1, 1, backend="auto")  # the reference, bitwise
    ref = update.reference_update_layers(items, 1e-2, 0.1, 1)
    assert all(torch.equal(a.S, b.S) and torch.equal(a.U, b.U) for a, b in zip(got, ref))
    assert not isinstance(got[0], update.FusedResult)


@needs_cpu
def test_a_module_compiled_with_other_constants_is_refused(monkeypatch, reload_backends):
    changed = tuple((n, v * 10 if n == "kCholqrShift" else v) for n, v in constants.COMPILED)
    _refused(monkeypatch, lambda: monkeypatch.setattr(constants, "COMPILED", changed), "kCholqrShift")


@needs_cpu
def test_a_module_built_against_another_torch_is_refused(monkeypatch, reload_backends):
    _refused(monkeypatch, lambda: monkeypatch.setattr(torch, "__version__", "0.0.1"), "built against torch")


@needs_cpu
def test_a_module_with_another_argument_contract_is_refused(monkeypatch, reload_backends):
    fields = ("U", "S_decayed", "V", "G_L", "G_K", "D_K", "D_L", "D_S")
    _refused(monkeypatch, lambda: monkeypatch.setattr(backends, "LAYER_INPUTS", fields), "arguments")


@needs_cpu
def test_the_matching_module_is_accepted(reload_backends):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert update.available()["cpu"] is True
    assert "cpu" not in update.load_errors()
    from lrtrain.update import _cpu

    assert _cpu.TORCH_VERSION == torch.__version__ and dict(_cpu.constants()) == constants.compiled()
