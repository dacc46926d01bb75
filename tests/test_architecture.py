"""The architecture rules, checked on the code as it is (imports inside functions included):

- the import-linter contracts of pyproject.toml hold (`lint-imports`), and a violating import in a
  copy of the tree breaks them (so the check can fail);
- no import cycle between any two modules (strongly connected components of grimp's graph);
- no module over 600 lines outside tests and generated stubs.

An entry in the allow-lists below is a known exception waiting for its fix; an entry that no longer
applies fails the test, so the lists only shrink.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("expert_store", "gpu_worker", "client", "bench", "moe")
MAX_LINES = 600

KNOWN_CYCLES: list[set[str]] = []
"""Import cycles not broken yet (each also an `ignore_imports` line of the acyclic contract)."""

KNOWN_LONG_MODULES: set[str] = set()
"""Modules over MAX_LINES not split yet."""


def _lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail("lint-imports is missing: pip install -e '.[test]' (import-linter is a test dependency)")
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env, check=False)


def test_import_contracts_hold():
    r = _lint_imports(REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_a_violating_import_breaks_the_contracts(tmp_path):
    """A copy of the tree where the store imports the worker and the client imports the store."""
    for pkg in ("expert_store", "gpu_worker", "client", "bench"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "proto" / "moe", tmp_path / "moe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    assert _lint_imports(tmp_path, env).returncode == 0  # the copy is as good as the tree
    (tmp_path / "expert_store" / "bad.py").write_text("def f():\n    from gpu_worker import engine\n")
    (tmp_path / "client" / "bad.py").write_text("import expert_store.pack\n")
    r = _lint_imports(tmp_path, env)
    assert r.returncode != 0
    assert "The store never imports the worker" in r.stdout and "expert_store.bad -> gpu_worker.engine" in r.stdout
    assert "client.bad -> expert_store" in r.stdout


def _import_cycles() -> list[set[str]]:
    """Sets of modules that import each other, directly or through others (Tarjan's algorithm)."""
    import grimp

    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    modules = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.add(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        cycles.append(component)
    return cycles


def test_no_import_cycle_between_modules():
    cycles = _import_cycles()
    new = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"these cycles are broken: delete them from KNOWN_CYCLES (and pyproject's ignore_imports): {gone}"


def test_no_module_over_600_lines():
    lengths = {}
    for pkg in ("expert_store", "gpu_worker", "client", "bench", "proto"):
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if "_pb2" in path.name:  # generated stubs
                continue
            lengths[rel] = len(path.read_text().splitlines())
    long = {p: n for p, n in lengths.items() if n > MAX_LINES}
    new = {p: n for p, n in long.items() if p not in KNOWN_LONG_MODULES}
    assert not new, f"modules over {MAX_LINES} lines (split them along their concepts): {new}"
    done = sorted(p for p in KNOWN_LONG_MODULES if p not in long)
    assert not done, f"no longer over {MAX_LINES} lines: delete from KNOWN_LONG_MODULES: {done}"


