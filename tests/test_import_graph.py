"""qvggt_export has no import cycles (docs/architecture.md, "Import direction").

Every import counts, at module level or inside a function (a lazy import hides a cycle, it does not
remove it), relative or absolute. Importing `a.b.c` also runs the `__init__` of `a.b` (and `a`) unless
the importer lives inside that package already, so those packages are edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "qvggt_export"


def module_files(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """dotted module name -> (file, is a package __init__)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join(parts)] = (path, is_package)
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an `import` or `from ... import` anywhere in the module can bind to a module."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the modules of the package that importing it runs directly."""
    modules = module_files(package_dir)

    def owning_module(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (path, is_package) in modules.items():
        importer_packages = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}
        edges = set()
        for name in _imported_names(ast.parse(path.read_text(), str(path)), module, is_package):
            target = owning_module(name)
            if target is None:
                continue
            # the target and each enclosing package __init__ the importer is not already inside
            parts = target.split(".")
            edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                         if p not in importer_packages)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_qvggt_export_has_no_import_cycle():
    graph = import_graph(PACKAGE_ROOT)
    assert len(graph) > 50 and graph["qvggt_export.export.onnx_export"] >= {"qvggt_export.export.lower"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("files,expected", [
    # a function-level relative import closing the loop
    ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "def f():\n    from .a import g\n"},
     ["pkg.a", "pkg.b", "pkg.a"]),
    # an absolute import of a module whose package __init__ imports the importer
    ({"__init__.py": "", "x.py": "import pkg.sub.y\n", "sub/__init__.py": "from ..x import z\n", "sub/y.py": ""},
     ["pkg.sub", "pkg.x", "pkg.sub"]),
])
def test_the_detector_finds_lazy_and_package_cycles(tmp_path, files, expected):
    assert find_cycle(import_graph(_write_package(tmp_path, files))) == expected


def test_a_package_whose_init_imports_its_submodules_is_no_cycle(tmp_path):
    # pkg.a imports pkg.b through the package name: pkg/__init__ already runs, so that is no edge to pkg.
    package = _write_package(tmp_path, {"__init__.py": "from .a import f\n", "a.py": "from pkg.b import g\n",
                                        "b.py": "import os\n"})
    graph = import_graph(package)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert find_cycle(graph) is None
