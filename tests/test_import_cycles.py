"""No import cycles between the modules of mmsoftmoe/, training/ and eval/, counting imports inside functions (a
function-level import hides a cycle from Python at start-up, not from a reader), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mmsoftmoe": "mmsoftmoe", "training": "mmsoftmoe_training", "eval": "mmsoftmoe_eval"}  # folder -> name


def module_files() -> dict[str, Path]:
    """Installed module name -> source file (a package is its `__init__.py`)."""
    modules = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((name, *parts))] = path
    return modules


def imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The modules of `known` that `path` (module `module`) imports anywhere in its body, relative imports
    resolved; `from package import name` counts `package.name` when that is a module, else the package."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from ..x import y` inside package a.b.c -> a.b.x
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *filter(None, [base])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports(path, module, set(files)) for module, path in files.items()}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_check_sees_a_cycle_hidden_in_a_function(tmp_path):
    (tmp_path / "a.py").write_text("from pkg.b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg.a import g\n")
    known = {"pkg.a", "pkg.b"}
    graph = {f"pkg.{n}": imports(tmp_path / f"{n}.py", f"pkg.{n}", known) for n in "ab"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
