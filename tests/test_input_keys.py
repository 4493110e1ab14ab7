"""Input keys follow each notebook's import closure within the package, not every file of it."""
from __future__ import annotations

import shutil
from pathlib import Path

from esmerge.paths import Layout
from esmerge.regen import input_keys

REPO = Path(__file__).resolve().parents[1]


def make_package(root: Path) -> Path:
    pkg = root / "pkg"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""pkg."""\n')
    (pkg / "core.py").write_text("import json\nfrom pkg import util\n")
    (pkg / "util.py").write_text("X = 1\n")
    (pkg / "plots.py").write_text("import matplotlib\n")
    (pkg / "methods" / "__init__.py").write_text('_MODULES = ("pkg.methods.es",)\n')  # a registry by name
    (pkg / "methods" / "es.py").write_text("from ..core import util\nfrom . import helpers\n")
    (pkg / "methods" / "helpers.py").write_text("def f():\n    from pkg import late  # function-local counts too\n")
    (pkg / "late.py").write_text("")
    (pkg / "broken.py").write_text("def (:\n")
    return pkg


def test_closure_follows_absolute_relative_local_and_registry_imports(tmp_path):
    pkg = make_package(tmp_path)
    assert input_keys.import_closure("from pkg.methods import es\nimport os\n", pkg) == [
        "pkg", "pkg.core", "pkg.late", "pkg.methods", "pkg.methods.es", "pkg.methods.helpers", "pkg.util"]
    # Importing the registry package reaches the modules it names as strings.
    assert "pkg.methods.es" in input_keys.import_closure("import pkg.methods\n", pkg)
    assert input_keys.import_closure("from pkg import util\n", pkg) == ["pkg", "pkg.util"]
    assert input_keys.import_closure("import numpy\n", pkg) == []
    # A module that does not parse counts as importing everything (a broken edit is never "unchanged").
    assert input_keys.import_closure("import pkg.broken\n", pkg) == sorted(input_keys.package_modules(pkg))


def test_editing_a_module_outside_a_notebooks_closure_keeps_its_key(tmp_path):
    pkg = make_package(tmp_path)
    source = "from pkg import core\n"
    before = input_keys.closure_hash(source, pkg)
    (pkg / "plots.py").write_text("import matplotlib  # restyled\n")
    (pkg / "late.py").write_text("Y = 2\n")
    assert input_keys.closure_hash(source, pkg) == before
    (pkg / "util.py").write_text("X = 2\n")  # reached through core
    assert input_keys.closure_hash(source, pkg) != before


def test_real_notebooks_rekey_only_on_modules_they_import(tmp_path):
    """The repository's notebooks against a copy of the package: evaluate/yardstick.py is outside 01_data's
    closure and inside 07_results'."""
    shutil.copytree(REPO / "esmerge", tmp_path / "esmerge", ignore=shutil.ignore_patterns("__pycache__"))
    layout = Layout(notebooks=REPO / "notebooks", runs=tmp_path / "runs", book=tmp_path / "book",
                    package=tmp_path / "esmerge", manifest=REPO / "data_manifest" / "files.yaml", cwd=tmp_path)
    before = input_keys.current_keys("smoke", layout)
    closure = input_keys.import_closure((REPO / "notebooks" / "01_data.py").read_text(), layout.package)
    assert "esmerge.data.files" in closure and "esmerge.evaluate.yardstick" not in closure

    with (layout.package / "evaluate" / "yardstick.py").open("a") as fh:
        fh.write("\n# a yardstick change\n")
    after = input_keys.current_keys("smoke", layout)
    assert after["01_data"] == before["01_data"]
    assert after["07_results"] != before["07_results"]  # it scores the yardstick rows

    with (layout.package / "data" / "files.py").open("a") as fh:
        fh.write("\n# a data change\n")
    changed = input_keys.current_keys("smoke", layout)
    assert changed["01_data"] != after["01_data"]
    # Everything that needs 01_data, directly or not, is re-keyed with it.
    assert all(changed[stem] != after[stem] for stem in ("02_specialists", "03_probe", "07_results"))
