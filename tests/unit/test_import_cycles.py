"""No import cycle among the project's modules, imports inside functions included: a cycle through a
function-level import works only as long as nobody calls it at import time, and it ties the modules into
one block that cannot be read, tested or moved apart. And the benchmark harness (benchmarks/, not one of
the installed packages) imports Cherry, never the other way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "jobs", "tuiapp", "benchmarks")
INSTALLED = ("engine", "jobs", "tuiapp")  # what Cherry's wheel ships; benchmarks/ is its own distribution


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the packages (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for file in (root / package).rglob("*.py"):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = file
    return modules


def imported_modules(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (module level, functions, branches)."""
    package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                # `from benchmarks.training import dpo` imports the submodule; `from engine.spec import X` the module
                if submodule in modules:
                    found.add(submodule)
                elif target in modules:
                    found.add(target)
    found.discard(name)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imported_modules(name, file, modules) for name, file in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles as paths (a -> b -> ... -> a), one per back edge of a depth-first search; none when there is none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all it reaches is explored
    path: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_function_level_and_relative_imports(tmp_path):
    (tmp_path / "engine" / "loop").mkdir(parents=True)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "tuiapp").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "loop" / "__init__.py").write_text("")
    (tmp_path / "engine" / "a.py").write_text("import os\n\ndef f():\n    from engine.loop import b\n")
    (tmp_path / "engine" / "loop" / "b.py").write_text("from . import c\n")
    (tmp_path / "engine" / "loop" / "c.py").write_text("if True:\n    from ..a import f\n")
    (tmp_path / "jobs" / "d.py").write_text("from engine.a import f\n")
    graph = import_graph(tmp_path)
    assert graph["engine.a"] == {"engine.loop.b"}
    assert graph["engine.loop.b"] == {"engine.loop.c"}
    assert graph["engine.loop.c"] == {"engine.a"}
    assert find_cycles(graph) == [["engine.a", "engine.loop.b", "engine.loop.c", "engine.a"]]
    (tmp_path / "engine" / "loop" / "c.py").write_text("import os\n")
    assert find_cycles(import_graph(tmp_path)) == []


def test_no_import_cycle_among_engine_jobs_tuiapp_and_benchmarks():
    graph = import_graph(ROOT)
    assert "engine.train" in graph and "tuiapp.cli" in graph and "benchmarks.cli" in graph  # the scan found them
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (move the shared piece to a third module):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_the_installed_packages_never_import_the_benchmarks():
    """`pip install cherry-rlhf` has no benchmarks/: an import of it from engine, jobs or tuiapp would fail
    there. `cherry bench` finds the harness by name at call time (tuiapp/cli/bench.py), not by an import."""
    graph = import_graph(ROOT)
    assert graph["benchmarks.training.against"] & {"engine.train", "engine.spec"}  # the scan sees its imports
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name.split(".")[0] in INSTALLED
        for target in targets
        if target.split(".")[0] == "benchmarks"
    )
    assert not wrong, "the installed packages import the benchmark harness:\n" + "\n".join(wrong)
