"""When a notebook must run again: its *input key*, and the keys stored after its last run.

A notebook's key hashes its own text, the injected parameters, the data manifest, the keys of the
notebooks it needs, and the source of the package modules it can reach: its *import closure*,
found statically with ``ast`` (``import esmerge.x``, ``from esmerge import x``, relative imports
inside the package, and module names written as strings, as the method registry does). So an edit
to ``plots.py`` re-runs only the notebooks that import it, directly or through other modules.
Keys live in ``runs/{scale}/regenerate_state.json``.
"""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from esmerge.paths import Layout
from esmerge.regen.notebook_graph import Notebook, RegenerateError, discover, topological_order


def _sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    return digest.hexdigest()


def package_modules(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under ``package`` (a package ``__init__`` is its folder's name)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        elif ".".join(parts) in modules:
            continue  # a folder ``x/`` and a module ``x.py``: Python imports the package
        modules[".".join(parts)] = path
    return modules


def imported_names(source: str, module: str = "", is_package: bool = False) -> set[str]:
    """Every dotted name ``source`` may import (candidates: ``from a import b`` gives ``a`` and ``a.b``).

    ``module`` is the importing module's dotted name, to resolve relative imports; string
    constants that look like dotted names count too (``importlib.import_module("esmerge.x")``).

    >>> sorted(imported_names("import esmerge.signals.probe\\nfrom esmerge import plots as p\\n"
    ...                       "x = 'esmerge.signals.combine'"))
    ['esmerge', 'esmerge.plots', 'esmerge.signals.combine', 'esmerge.signals.probe']
    >>> sorted(imported_names("from .static import run\\nfrom .. import cache", "esmerge.methods.es"))
    ['esmerge', 'esmerge.cache', 'esmerge.methods.static', 'esmerge.methods.static.run']
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
            names.add(node.value)
    return names


def import_closure(source: str, package: Path) -> list[str]:
    """Package modules that running ``source`` can import, directly or through each other (sorted).

    Importing ``esmerge.methods.es`` runs ``esmerge/__init__.py`` and ``esmerge/methods/__init__.py``
    too, so every enclosing package is part of the closure. Unparsable package modules count as
    importing the whole package (a broken module must not look unchanged).
    """
    modules = package_modules(package)
    seen: set[str] = set()
    stack = [(source, "")]
    while stack:
        text, name = stack.pop()
        try:
            found = imported_names(text, name, bool(name) and modules[name].name == "__init__.py")
        except SyntaxError:
            found = set(modules)
        for candidate in found:
            parts = candidate.split(".")
            for i in range(1, len(parts) + 1):  # the module and every package above it
                dotted = ".".join(parts[:i])
                if dotted in modules and dotted not in seen:
                    seen.add(dotted)
                    stack.append((modules[dotted].read_text(), dotted))
    return sorted(seen)


def closure_hash(source: str, package: Path) -> str:
    """sha256 over the relative path and bytes of every module in ``source``'s import closure."""
    modules = package_modules(package)
    chunks = []
    for name in import_closure(source, package):
        path = modules[name]
        chunks += [path.relative_to(package).as_posix().encode(), path.read_bytes()]
    return _sha256(*chunks)


def input_keys(notebooks: dict[str, Notebook], order: list[str], parameters: dict, code_hashes: dict[str, str],
               data_hash: str) -> dict[str, str]:
    """Input key of every notebook: hash(text, parameters, its code closure, data, keys of what it needs)."""
    keys: dict[str, str] = {}
    params = json.dumps(parameters, sort_keys=True).encode()
    for stem in order:
        nb = notebooks[stem]
        upstream = json.dumps({dep: keys[dep] for dep in sorted(nb.needs)}).encode()
        keys[stem] = _sha256(nb.path.read_bytes(), params, code_hashes[stem].encode(), data_hash.encode(),
                             upstream)[:20]
    return keys


def keys_now(notebooks: dict[str, Notebook], order: list[str], parameters: dict, layout: Layout) -> dict[str, str]:
    """``input_keys`` of ``notebooks`` as the files in ``layout`` are now."""
    data_hash = _sha256(layout.manifest.read_bytes()) if layout.manifest.exists() else ""
    code = {stem: closure_hash(notebooks[stem].path.read_text(), layout.package) for stem in order}
    return input_keys(notebooks, order, parameters, code, data_hash)


def current_keys(scale: str, layout: Layout, seed: int = 0) -> dict[str, str]:
    """Input key every notebook would have now (see ``input_keys``)."""
    notebooks = discover(layout.notebooks)
    return keys_now(notebooks, topological_order(notebooks), {"scale": scale, "seed": seed}, layout)


def load_state(path: Path) -> dict:
    """The stored ``regenerate_state.json`` (``{"notebooks": {stem: {key, seconds, ...}}}``); empty if absent."""
    if not path.exists():
        return {"notebooks": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"notebooks": {}}  # a corrupt state only costs a re-run
    state.setdefault("notebooks", {})
    return state


def stale_chapters(scale: str, layout: Layout, seed: int = 0) -> list[str]:
    """Executed notebooks of ``scale`` whose inputs changed since they ran (the book would show old results)."""
    try:
        keys = current_keys(scale, layout, seed)
    except RegenerateError:
        return []  # an unrunnable notebook set is reported by the run itself
    state = load_state(layout.state_file(scale))["notebooks"]
    return [stem for stem in keys if (layout.executed(scale) / f"{stem}.ipynb").exists()
            and state.get(stem, {}).get("key") != keys[stem]]
