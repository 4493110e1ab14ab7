"""The package's layout: one subpackage per pipeline stage, imports only from earlier stages."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "esmerge"
# Stage of each subpackage, in the book's order; the shared top-level modules are stage 0 and
# the CLI (which starts every stage: the ``cli`` package and ``__main__``) the last.
STAGES = {"data": 1, "specialists": 2, "signals": 3, "methods": 4, "evaluate": 5, "report": 6, "run": 7,
          "regen": 8}
TOP_LEVEL_CLI = {"cli", "__main__"}
CLI_PACKAGE = "cli"  # a folder of its own, but no pipeline stage


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    if parts[1] in STAGES:
        return STAGES[parts[1]]
    return len(STAGES) + 1 if parts[1] in TOP_LEVEL_CLI else 0


def imported_modules(source: str, own: str, is_package: bool = False) -> set[str]:
    """The esmerge modules ``source`` (the text of module ``own``) imports, at module level or inside
    functions, as dotted names; ``from esmerge.x import y`` names ``esmerge.x.y`` when y is a module."""
    package = own if is_package else own.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("esmerge")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("esmerge"):
                out |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
    return out - {own}


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_tree_has_one_folder_per_stage_and_few_top_level_modules():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(STAGES) | {CLI_PACKAGE}
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 10, sorted(top)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_from_a_later_stage(path):
    here = stage_of(module_name(path))
    later = sorted(m for m in imports_of(path) if stage_of(m) > here)
    assert not later, f"{module_name(path)} (stage {here}) imports later stages: {later}"


def test_no_two_subpackages_import_each_other():
    edges = set()
    for path in MODULES:
        a = module_name(path).split(".")
        for target in imports_of(path):
            b = target.split(".")
            if len(a) > 1 and len(b) > 1 and a[1] != b[1]:
                edges.add((a[1], b[1]))
    assert not {(a, b) for a, b in edges if (b, a) in edges}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (a list of nodes, first == last), or [] when it has none.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    ['a', 'b', 'c', 'a']
    >>> find_cycle({"a": {"b"}, "b": set()})
    []
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_loop():
    # A package's __init__ that hands on its own modules' names is the package's face, not a room of
    # its own: edges from it into its own folder are left out.
    graph = {}
    for path in MODULES:
        own = module_name(path)
        targets = imports_of(path)
        if path.name == "__init__.py":
            targets = {m for m in targets if not m.startswith(own + ".")}
        graph[own] = targets
    assert find_cycle(graph) == []


def test_the_checks_see_an_upward_import_and_a_loop():
    source = "from esmerge.methods import es\nfrom esmerge.errors import UsageError\n"
    found = imported_modules(source, "esmerge.data.files")
    assert found == {"esmerge.methods.es", "esmerge.errors"}
    assert [m for m in found if stage_of(m) > stage_of("esmerge.data.files")] == ["esmerge.methods.es"]
    assert imported_modules("from .. import cache\n", "esmerge.data.files") == {"esmerge.cache"}
    assert (find_cycle({"esmerge.a": {"esmerge.b"}, "esmerge.b": {"esmerge.a"}})
            == ["esmerge.a", "esmerge.b", "esmerge.a"])
