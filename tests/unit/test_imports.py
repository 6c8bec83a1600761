"""The import graph of ``pigeon/`` (read with ast, every import counted: top-level, inside functions and
under ``TYPE_CHECKING``): no circles between modules or between packages, and ``pigeon.models`` knows
nothing of the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pigeon"
# What pigeon.models may not import: the pipeline's stages, the workspace, tracking, the whole Params
# (section configs such as ModelConfig are fine), and the layers above it.
FORBIDDEN_IN_MODELS = ("pigeon.stages", "pigeon.pipeline", "pigeon.paths", "pigeon.tracking", "pigeon.artifacts",
                       "pigeon.training", "pigeon.evaluation", "pigeon.serving", "pigeon.config.Params")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, module: str) -> set[str]:
    """Dotted names a module imports: ``a.b`` for ``import a.b``, ``a.b.c`` for ``from a.b import c``."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module → pigeon modules it imports, module → every dotted name it imports)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}

    def resolve(name: str) -> str | None:  # the longest module prefix of a dotted name
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    names = {m: imported_names(p, m) for m, p in files.items()}
    edges = {m: {t for t in map(resolve, ns) if t and t != m} for m, ns in names.items()}
    return edges, names


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between pigeon's top-level parts (``pigeon.models``, ``pigeon.training``, ``pigeon.runtime``…)."""
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    out: dict[str, set[str]] = {}
    for source, targets in edges.items():
        out.setdefault(part(source), set()).update(part(t) for t in targets if part(t) != part(source))
    return out


def test_the_graph_is_read():
    edges, names = import_graph()
    assert "pigeon.models.generation" in edges["pigeon.models.pigeon"]
    assert "pigeon.config.ModelConfig" in names["pigeon.models.pigeon"]
    assert "pigeon.pipeline" in edges["pigeon.stages"]  # a package's __init__ is the package's node
    assert "pigeon.models.types" in edges["pigeon.models.generation"]


def test_no_import_circles_between_modules():
    assert cycles(import_graph()[0]) == []


def test_no_import_circles_between_packages():
    assert cycles(package_graph(import_graph()[0])) == []


def forbidden_in_models(names: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {name}" for module, imported in names.items()
                  if module.startswith("pigeon.models") for name in imported
                  if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_MODELS))


def test_models_import_nothing_from_the_pipeline():
    assert forbidden_in_models(import_graph()[1]) == []


@pytest.mark.parametrize("files,expected", [
    ({"a.py": "from pigeon import b\n", "b.py": "import pigeon.c\n", "c.py": "from pigeon.a import x\n"},
     [["pigeon.a", "pigeon.b", "pigeon.c"]]),
    ({"a.py": "def f():\n    from . import b\n", "b.py": "from typing import TYPE_CHECKING\n"
      "if TYPE_CHECKING:\n    from .a import f\n"}, [["pigeon.a", "pigeon.b"]]),
    ({"a.py": "from pigeon import b\n", "b.py": "import os\n"}, []),
])
def test_a_circle_is_found(tmp_path, files, expected):
    """The check itself: a circle through plain, relative, lazy and TYPE_CHECKING imports is found."""
    root = tmp_path / "pigeon"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(text)
    assert cycles(import_graph(root)[0]) == expected


def test_a_forbidden_import_in_models_is_found(tmp_path):
    root = tmp_path / "pigeon"
    (root / "models").mkdir(parents=True)
    for init in (root / "__init__.py", root / "models" / "__init__.py"):
        init.write_text("")
    (root / "models" / "m.py").write_text("from pigeon.config import ModelConfig, Params\n"
                                          "def f():\n    from pigeon.paths import Workspace\n")
    assert forbidden_in_models(import_graph(root)[1]) == ["pigeon.models.m imports pigeon.config.Params",
                                                          "pigeon.models.m imports pigeon.paths.Workspace"]
