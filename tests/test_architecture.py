"""The package's structure: every module imports on its own, no import cycle between modules,
no module imports another module's private name, and one ``key=value`` parser.

Pure static checks on the source tree (and one interpreter importing each module afresh); no
real data needed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fmri_data"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, top_level_only: bool):
    """``(imported module, name or None, line)`` for each fmri_data import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if top_level_only and isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not run
            continue
        if isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            if base.split(".")[0] != "fmri_data":
                continue
            for alias in node.names:
                yield base, alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fmri_data":
                    yield alias.name, None, node.lineno


def _graph() -> dict[str, set[str]]:
    """Module -> the fmri_data modules its top-level statements import (run at import time)."""
    graph = {}
    for module in MODULES:
        edges = set()
        for base, name, _ in _imports(module, top_level_only=True):
            target = f"{base}.{name}" if name and f"{base}.{name}" in MODULES else base
            if target != module and not module.startswith(target + "."):  # a parent package is not an edge
                edges.add(target)
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _python(code: str) -> None:
    """Run ``code`` in a fresh interpreter; fail with its output unless it exits 0."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cycle_detector_finds_a_known_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for module in MODULES:
        for base, name, line in _imports(module, top_level_only=False):
            private = name and name.startswith("_") and not name.endswith("__")
            if private and f"{base}.{name}" not in MODULES:
                offenders.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {base}.{name}")
    assert not offenders, "\n".join(offenders)


def test_one_key_value_parser():
    """``key=value`` text is split in one place (fmri_data.config.overrides)."""
    home = PACKAGE / "config" / "overrides.py"
    others = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
              if p != home and '.partition("=")' in p.read_text()]
    assert home.is_file() and '.partition("=")' in home.read_text()
    assert not others, others


def test_every_module_imports_on_its_own():
    """Each module imported in a fresh module table (dependencies stay cached for speed)."""
    code = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {sorted(m for m in MODULES if not m.endswith('__main__'))!r}:\n"
        "    for key in [k for k in sys.modules if k == 'fmri_data' or k.startswith('fmri_data.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    _python(code)


@pytest.mark.parametrize("name", ["convert", "ConvertReport", "Store", "discover", "load_recipe", "validate_store"])
def test_public_api_names_are_the_documented_objects(name):
    """``from fmri_data import convert`` calls the function even after the subpackage of the same
    name was imported (it used to give the module: "'module' object is not callable")."""
    code = (
        "import fmri_data.convert.run, fmri_data.discover, fmri_data.store.root\n"
        f"from fmri_data import {name} as obj\n"
        "assert callable(obj), obj\n"
        "if obj.__name__.endswith('convert'):\n"
        "    from fmri_data.errors import FmriDataError\n"
        "    try:\n"
        "        obj('/nonexistent/bids', '/nonexistent/out.zarr', progress=False)\n"
        "    except FmriDataError:\n"
        "        pass\n"
    )
    _python(code)


def test_function_level_imports_of_other_packages_go_through_load_module():
    """A package imported inside a function is imported when a worker thread first runs it:
    :func:`fmri_data.imports.load_module` makes such first imports one thread at a time (CI once
    failed a conversion with scikit-learn's ``_DeadlockError`` from two threads importing nilearn)."""
    offenders = []
    for module, path in MODULES.items():
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                top = {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"fmri_data"}
                if top:
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {', '.join(sorted(top))}")
    assert not offenders, "use load_module:\n" + "\n".join(offenders)


def test_threads_first_importing_circular_packages_all_succeed():
    """Eight threads released together each import a different heavy module for the first time in a
    fresh interpreter. With plain ``importlib.import_module`` this fails in most runs on CPython 3.11
    (``cannot import name 'PytestTester' from partially initialized module 'scipy._lib._testutils'``,
    or ``_DeadlockError`` through scikit-learn); through ``load_module`` every thread gets its module."""
    names = ["nilearn.masking", "nilearn.datasets", "nilearn.image", "scipy.ndimage", "scipy.stats",
             "scipy.interpolate", "scipy.spatial", "scipy.signal"]
    code = (
        "import sys, threading\n"
        "from fmri_data.imports import load_module\n"
        f"names = {names!r}\n"
        "assert not [n for n in names if n in sys.modules], 'already imported'\n"
        "barrier, failed = threading.Barrier(len(names)), []\n"
        "def first_import(name):\n"
        "    barrier.wait()\n"
        "    try:\n"
        "        assert load_module(name).__name__ == name\n"
        "    except BaseException as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "threads = [threading.Thread(target=first_import, args=(n,)) for n in names]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "assert not failed, failed\n"
    )
    for _ in range(3):
        _python(code)
