"""Shipping a regeneration (``--ship``), the freshness check (``--check``), the banners and the findings page.

Tiny notebooks in a temporary git repository, as in ``test_regenerate.py``: a run, then a
shipment, then edits to a notebook's text or to package code, and what ``--check`` and the book
say about each.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_regenerate import make_layout, quiet, run_cli, write_notebook

from esmerge.errors import OutputExistsError
from esmerge.paths import BOOK_DIR
from esmerge.regen import findings, freshness, ship
from esmerge.regen import regenerate as rg

REPO_BOOK = BOOK_DIR


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def regenerated(tmp_path: Path) -> rg.Layout:
    """A committed repository with three notebooks, run once at smoke scale."""
    layout = make_layout(tmp_path)
    write_notebook(tmp_path, "00_intro", "print('intro')\n")
    write_notebook(tmp_path, "01_first", """\
        from pkg import helpers
        (out / "value.csv").write_text(f"value\\n{40 + helpers.VALUE}\\n")
        (out / "figure.png").write_bytes(b"png bytes the notebook also shows inline")
        (out / "cache.pt").write_bytes(b"tensors")
        (out / "merged").mkdir(exist_ok=True)
        (out / "merged" / "adapter.safetensors").write_bytes(b"weights")
    """)
    write_notebook(tmp_path, "08_claims", """\
        (out / "representation_claims.csv").write_text("claim,source,evidence,verdict\\nA moves,Fig. 1,1.02 vs 0.7,holds\\n")
    """, needs="01_first")  # noqa: E501  (a long line of the notebook's code, inside the string)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "notebooks", "pkg", "files.yaml")
    git(tmp_path, "commit", "-q", "-m", "notebooks")
    report = rg.run_notebooks("smoke", layout, log=quiet)
    assert report.executed == ["00_intro", "01_first", "08_claims"] and report.failed is None
    return layout


def test_ship_copies_notebooks_and_small_tables_only_then_check_tracks_text_and_code(tmp_path):
    layout = regenerated(tmp_path)
    head = git(tmp_path, "rev-parse", "HEAD")
    state = json.loads(layout.state_file("smoke").read_text())["notebooks"]
    assert state["01_first"]["commit"] == head and state["01_first"]["uncommitted_changes"] is False
    assert state["01_first"]["text_sha256"] == freshness.text_sha256(tmp_path / "notebooks/01_first.py")

    lines: list[str] = []
    assert rg.check_shipped("smoke", layout, log=lines.append) == 0  # nothing shipped yet: passes, says so
    assert lines == [f"  check       no shipped smoke results in {tmp_path / 'book/shipped/smoke'}: nothing to check"]

    target = ship.ship("smoke", layout, log=quiet)
    assert target == tmp_path / "book/shipped/smoke"
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    # Figures live in the executed notebooks only; no cached tensors, no model folders.
    assert files == ["00_intro.ipynb", "01_first.ipynb", "08_claims.ipynb", "SHIPPED.json", "regenerate_state.json",
                     "runs/01_first/value.csv", "runs/08_claims/representation_claims.csv"]
    marker = json.loads((target / "SHIPPED.json").read_text())
    assert marker["commit"] == head and marker["chapters"] == ["00_intro", "01_first", "08_claims"]
    assert marker["total_bytes"] == sum((target / row["path"]).stat().st_size for row in marker["files"])
    assert {(row["path"], row["why"]) for row in marker["left_out"]} == {
        ("runs/01_first/figure.png", "figure: embedded in the executed notebook"),
        ("runs/01_first/cache.pt", "cached tensors"),
        ("runs/01_first/merged/", "folder (merged models, evaluation caches)")}
    assert not list(target.parent.glob(".smoke.*.partial"))  # assembled aside, renamed into place

    with pytest.raises(OutputExistsError, match="pass --force"):
        ship.ship("smoke", layout, log=quiet)

    lines.clear()
    assert rg.check_shipped("smoke", layout, log=lines.append) == 0  # right after the run: fresh
    assert "3 fresh" in lines[0] and len(lines) == 1

    # Code only (a module 01 imports): 01 and 08, which reads it, are stale; a warning, not a failure.
    (layout.package / "helpers.py").write_text("VALUE = 1  # same value, new text\n")
    lines.clear()
    assert rg.check_shipped("smoke", layout, log=lines.append) == 0
    assert [line.split(":")[0].strip() for line in lines[1:3]] == ["warning     01_first", "warning     08_claims"]
    assert "code or data changed since these shipped smoke chapters ran: 01_first, 08_claims" in lines[-1]

    # The notebook's own text: a failure naming it; its downstream chapter only warns.
    notebook = tmp_path / "notebooks/01_first.py"
    notebook.write_text(notebook.read_text() + "print('a new cell the shipped copy never ran')\n")
    lines.clear()
    assert rg.check_shipped("smoke", layout, log=lines.append) == 1
    assert any(line.startswith("  STALE       01_first: text changed") for line in lines)
    assert any(line.startswith("  warning     08_claims: code changed") for line in lines)
    assert "out of date with their notebook text: 01_first;" in lines[-1]

    # A stale run is not shipped; after re-running it is, with --force over the old shipment.
    with pytest.raises(rg.RegenerateError, match=r"cannot ship smoke: 01_first \(text changed\), 08_claims"):
        ship.ship("smoke", layout, force=True, log=quiet)
    assert rg.run_notebooks("smoke", layout, log=quiet).executed == ["01_first", "08_claims"]
    ship.ship("smoke", layout, force=True, log=quiet)
    assert rg.check_shipped("smoke", layout, log=quiet) == 0

    # A new notebook with no shipped chapter fails too; so does a hand-edited shipped file.
    write_notebook(tmp_path, "09_new", "print('new')\n")
    assert rg.check_shipped("smoke", layout, log=quiet) == 1
    (tmp_path / "notebooks/09_new.py").unlink()
    (target / "runs/01_first/value.csv").write_text("value\n99\n")
    lines.clear()
    assert rg.check_shipped("smoke", layout, log=lines.append) == 1
    assert any("value.csv: differs from the shipped file" in line for line in lines)


def test_cli_ship_and_check_exit_codes(tmp_path, capsys):
    layout = regenerated(tmp_path)
    assert run_cli(["--scale", "smoke", "--check"], layout) == 0
    assert run_cli(["--scale", "smoke", "--ship"], layout) == 0
    assert run_cli(["--scale", "smoke", "--ship"], layout) == 1  # exists: refused in one line
    assert "already holds shipped smoke results; pass --force" in capsys.readouterr().err
    notebook = tmp_path / "notebooks/00_intro.py"
    notebook.write_text(notebook.read_text().replace("intro", "introduction"))
    assert run_cli(["--scale", "smoke", "--check"], layout) == 1
    assert "notebook text: 00_intro;" in capsys.readouterr().out
    assert run_cli(["--scale", "smoke", "--check", "--ship"], layout) == 2
    assert "--ship and --check are separate steps" in capsys.readouterr().err
    assert run_cli(["--scale", "smoke", "--shipped"], layout) == 2


def test_book_renders_shipped_chapters_with_banners_and_findings_first(tmp_path):
    layout = regenerated(tmp_path)
    head = git(tmp_path, "rev-parse", "HEAD")
    ship.ship("smoke", layout, log=quiet)
    shutil.rmtree(tmp_path / "book/executed")  # a fresh clone: only what is shipped
    shutil.rmtree(tmp_path / "runs")
    for name in ("_config.yml", "references.bib"):
        shutil.copy(REPO_BOOK / name, layout.book / name)

    html = rg.build_book("smoke", layout, log=quiet).parent
    toc = (tmp_path / "book/_toc.yml").read_text()
    assert "root: shipped/smoke/00_intro" in toc
    assert toc.index("file: findings") < toc.index("file: shipped/smoke/01_first")
    page = (html / "shipped/smoke/01_first.html").read_text()
    assert "esmerge-freshness" in page and head[:12] in page and "matches the code now." in page
    assert "Executed from the code as it is now" in page
    key = json.loads((tmp_path / "book/shipped/smoke/regenerate_state.json")
                     .read_text())["notebooks"]["01_first"]["key"]
    assert key in page
    glance = (html / "findings.html").read_text()
    assert "Findings at a glance" in glance and "A moves" in glance and "1.02 vs 0.7" in glance
    assert "08_claims: Executed at scale" in glance and "1 claim:" in glance and "holds (1)" in glance
    assert 'href="shipped/smoke/08_claims.html"' in glance

    # Code changes, notebooks do not: the rebuilt pages say which chapters are stale.
    (layout.package / "helpers.py").write_text("VALUE = 1  # edited\n")
    html = rg.build_book("smoke", layout, log=quiet).parent
    stale = (html / "shipped/smoke/01_first.html").read_text()
    assert "esmerge-code-changed" in stale and "Stale: code changed since this ran" in stale
    assert "matches the code now." in (html / "shipped/smoke/00_intro.html").read_text()


def test_findings_page_lists_every_verdict_with_its_numbers(tmp_path):
    claims = tmp_path / "runs" / "08_claims"
    retention = tmp_path / "runs" / "09_retention"
    claims.mkdir(parents=True)
    retention.mkdir()
    (claims / "accuracy_claims.csv").write_text(
        "claim,source,paper,datasets,ours,lo,hi,n_compared,verdict,detail\n"
        "ES beats avg on Mol-Prot,§5.2,1.5,1/3,-2.0,-4.5,0.5,7,inconclusive (partial),vs avg: -2.0\n"
        "ES beats ties on CYP,§5.3,5.0,5/5,3.1,1.2,5.0,7,supported,vs ties: +3.1\n")
    (claims / "representation_claims.csv").write_text(
        "claim,source,evidence,verdict\n"
        "\"molecule moves | most\",Fig. 1,\"molecule 1.02, protein 0.716\",does not hold\n")
    (claims / "margin_claims.csv").write_text("model,margin\nes,1\n")  # no verdict column: not a register
    (claims / "margins.csv").write_text("model,verdict\nes,holds\n")  # not a *claims.csv: not a register
    (retention / "retention_claims.csv").write_text("claim,retained,verdict\nES keeps molecule skill,0.81,holds\n")
    text = findings.findings_page(tmp_path / "runs", "cpu", chapters={
        "08_claims": ("executed/cpu/08_claims.ipynb", "Executed from x"), "09_retention": (None, None)})
    assert text.splitlines()[0] == "# Findings at a glance"
    assert "**4 claims:** does not hold (1), inconclusive (1), supported (1), holds (1)." in text
    assert (text.index("## Representation claims") < text.index("## Accuracy claims")
            < text.index("## Retention claims")) and "| es |" not in text
    assert "| molecule moves \\| most | Fig. 1 | molecule 1.02, protein 0.716 | does not hold |" in text
    assert "| ES beats avg on Mol-Prot | §5.2 | 1.5 | 1/3 | -2.0 [-4.5, 0.5] | 7 | inconclusive (partial) |" in text
    assert "| ES beats ties on CYP | §5.3 | 5.0 | 5/5 | 3.1 [1.2, 5.0] | 7 | supported |" in text
    assert "| ES keeps molecule skill | 0.81 | holds |" in text
    assert "[08_claims](executed/cpu/08_claims.ipynb)" in text and "\n08_claims: Executed from x\n" in text
    assert "From `09_retention`." in text  # no page to link to

    book = tmp_path / "book"
    book.mkdir()
    assert findings.write_findings_page(book, tmp_path / "runs", "cpu") == book / "findings.md"
    assert findings.write_findings_page(book, tmp_path / "nothing", "cpu") is None
    assert not (book / "findings.md").exists()  # another scale's page does not linger


def test_check_counts_a_notebook_whose_esmerge_imports_moved_as_a_code_change(tmp_path):
    """Moving a function between esmerge modules changes a notebook's import lines and the module it
    is reached through, not what the chapter says or calls: a warning. Any other edit fails."""
    layout = make_layout(tmp_path)
    write_notebook(tmp_path, "01_first", """\
        from esmerge import errors
        print(errors.check_seed(7),
              "seed")
    """)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "notebooks", "pkg", "files.yaml")
    git(tmp_path, "commit", "-q", "-m", "notebooks")
    assert rg.run_notebooks("smoke", layout, log=quiet).failed is None
    ship.ship("smoke", layout, log=quiet)
    notebook = tmp_path / "notebooks/01_first.py"
    shipped_text = notebook.read_text()

    notebook.write_text(shipped_text.replace("from esmerge import errors\n", "from esmerge.errors import check_seed\n")
                        .replace('print(errors.check_seed(7),\n      "seed")', 'print(check_seed(7), "seed")'))
    assert "errors." not in notebook.read_text() and "from esmerge.errors import" in notebook.read_text()
    lines: list[str] = []
    assert rg.check_shipped("smoke", layout, log=lines.append) == 0
    assert any(line.startswith("  note        01_first: its text differs from the shipped run only in its esmerge "
                               "imports") for line in lines)
    assert any(line.startswith("  warning     01_first: code changed") for line in lines)

    notebook.write_text(shipped_text.replace("check_seed(7)", "check_seed(8)"))
    lines.clear()
    assert rg.check_shipped("smoke", layout, log=lines.append) == 1
    assert any(line.startswith("  STALE       01_first: text changed") for line in lines)
