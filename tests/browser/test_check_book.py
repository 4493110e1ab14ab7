"""The browser check itself: it passes a page that rendered and reads well, and fails one that did not.

Hand-written HTML (no Sphinx) keeps this fast: the pages mimic what MyST-NB renders (``div.cell``,
``.cell_input pre``, ``.cell_output``, ``<details>`` toggles, ``span.pasted-text``) and load the
book's own ``book/_static/esmerge.css``. Each reading rule has one page broken in exactly that way,
and the check must name that rule, and no other, on that page alone. Skipped when no
Chromium-family browser exists (``make test`` installs one before running the check on the real book).
"""
from __future__ import annotations

import shutil
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import check_book  # noqa: E402

BROWSER = next((shutil.which(name) for name in check_book.BROWSERS if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium/chrome on PATH (apt-get install chromium)")
BOOK_CSS = Path(__file__).resolve().parents[2] / "book" / "_static" / "esmerge.css"


def make_book(root: Path, pages: dict[str, str]) -> Path:
    """A built-book layout: ``_toc.yml`` listing ``pages`` and their HTML under ``_build/html``."""
    html = root / "_build" / "html"
    (html / "_static").mkdir(parents=True)
    shutil.copy(BOOK_CSS, html / "_static" / "esmerge.css")
    plt.imsave(html / "good.png", np.arange(12.0).reshape(3, 4))
    (html / "bad.png").write_bytes(b"this is not an image")
    (html / "index.html").write_text('<meta http-equiv="refresh" content="0; url=a.html">')
    names = list(pages)
    toc = [f"root: {names[0]}"]
    if names[1:]:
        toc += ["parts:", "  - chapters:"] + [f"      - file: {n}" for n in names[1:]]
    (root / "_toc.yml").write_text("format: jb-book\n" + "\n".join(toc) + "\n")
    for name, body in pages.items():
        up = "../" * name.count("/")
        page = html / f"{name}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        # The viewport tag every Sphinx theme writes: without it a phone lays the page out 980 px wide.
        page.write_text('<html><head><meta name="viewport" content="width=device-width, initial-scale=1">'
                        f'<link rel="stylesheet" href="{up}_static/esmerge.css"></head>'
                        f"<body><main>{body.replace('IMG/', up)}</main></body></html>")
    return root


def rules_by_page(problems: list[str]) -> dict[str, set[str]]:
    """{page: rules it fails}, the width left out of the page."""
    found = defaultdict(set)
    for problem in problems:
        found[problem.split(":")[0].split(" @")[0]].add(check_book.rule_of(problem))
    return dict(found)


# MyST-NB's markup, reduced to what the rules look at.
BANNER = '<div class="admonition esmerge-freshness"><p>Executed at scale smoke</p></div>'


def code_cell(lines: int, output: str = "", folded: bool = False) -> str:
    source = "\n".join(f"x{i} = {i}" for i in range(lines))
    code = f'<div class="cell_input docutils container"><div class="highlight"><pre>{source}\n</pre></div></div>'
    if folded:  # the hide-input tag: the source sits in a closed toggle
        code = f'<details class="hide above-input"><summary>Show code cell source</summary>{code}</details>'
    out = f'<div class="cell_output docutils container">{output}</div>' if output else ""
    return f'<div class="cell docutils container">{code}{out}</div>'


LONG_LINE = "loss=" + "0.123456," * 60  # one 545-character line without a space
WIDE_TABLE = "<table><tr>" + "".join(f"<td>column_{i}_value</td>" for i in range(40)) + "</tr></table>"
HIDDEN_TABLE = f'<div style="overflow-x: hidden">{WIDE_TABLE}</div>'  # its right-hand columns cannot be reached
FIGURE = ('<figure><img src="IMG/good.png"><figcaption><p><span class="caption-number">Fig. 1 </span>'
          '<span class="caption-text">The pipeline, stage by stage.</span></p></figcaption></figure>')
GLUE = '<p>The merged model keeps <span class="pasted-text">87.5</span> % of the specialists\' accuracy.</p>'
GOOD_CHAPTER = (
    BANNER
    + code_cell(3, f'<div class="output stream"><pre>{LONG_LINE}</pre></div>')  # wraps (esmerge.css)
    + code_cell(12, FIGURE, folded=True)  # long code, folded; a <figure> with its caption
    + code_cell(2, '<img src="IMG/good.png">') + "<p><strong>Figure 2.</strong> Loss by layer.</p>"
    + code_cell(1, f'<div class="output text_html">{WIDE_TABLE}</div>')  # scrolls in its output
)


def test_rendered_page_passes_and_is_screenshotted_at_both_widths(tmp_path):
    book = make_book(tmp_path, {"a": '<h1>A</h1><img src="good.png"><table><tr><td>1</td></tr></table>'})
    shots = tmp_path / "shots"
    (shots).mkdir()
    (shots / "gone@390.png").write_bytes(b"from a page no longer in the book")
    assert check_book.check_book(book, BROWSER, shots) == []
    assert sorted(p.name for p in shots.glob("*.png")) == ["a@1280.png", "a@390.png"]
    for png in shots.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_broken_image_empty_table_and_missing_heading_are_reported(tmp_path):
    book = make_book(tmp_path, {
        "a": '<h1>A</h1><img src="good.png">',
        "b": '<h1>B</h1><img src="bad.png"><img src="missing.png"><table></table>',
        "c": "<p>no heading here</p>",
    })
    problems = check_book.check_book(book, BROWSER, tmp_path / "shots")
    assert problems == [
        "b.html: [image] image bad.png did not load (naturalWidth 0)",
        "b.html: [image] image missing.png did not load (naturalWidth 0)",
        "b.html: [table] table 0 not rendered ({'rows': 0, 'cells': 0, 'height': 0, 'text': ''})",
        "c.html: [heading] no <h1> heading",
    ]


def test_chapter_without_its_freshness_banner_is_reported(tmp_path):
    book = make_book(tmp_path, {
        "shipped/cpu/01_data": f"<h1>Data</h1>{BANNER}{GLUE}",  # the toc's first page: it glues a number
        "shipped/cpu/02_specialists": "<h1>Specialists</h1>",
        "findings": "<h1>Findings</h1>",  # a page, not a chapter: no banner needed
    })
    assert check_book.check_book(book, BROWSER, tmp_path / "shots") == [
        "shipped/cpu/02_specialists.html: [banner] 0 freshness banners (a chapter shows exactly one)"]


def test_each_reading_rule_fails_on_its_broken_page_only(tmp_path):
    book = make_book(tmp_path, {
        "executed/smoke/00_overview": f"<h1>Overview</h1>{GLUE}{GOOD_CHAPTER}",
        "executed/smoke/01_good": f"<h1>Good</h1>{GOOD_CHAPTER}",
        "executed/smoke/02_clipped_table": f"<h1>Clipped</h1>{BANNER}{HIDDEN_TABLE}",
        # a cell output that neither wraps nor scrolls: its line runs out of the column
        "executed/smoke/03_output_runs_off": (f'<h1>Runs off</h1>{BANNER}' + code_cell(
            1, f'<div class="output stream" style="overflow-x: visible"><pre style="white-space: pre">'
               f'{LONG_LINE}</pre></div>')),
        "executed/smoke/04_unfolded_code": f"<h1>Code</h1>{BANNER}" + code_cell(8),
        # a bare plot: the next thing after it is a heading
        "executed/smoke/05_bare_figure": (f"<h1>Bare</h1>{BANNER}" + code_cell(2, '<img src="IMG/good.png">')
                                          + "<h2>Next section</h2><p>Figure 1 was above.</p>"),
        "findings": "<h1>Findings</h1><pre>" + "\n".join(f"line {i}" for i in range(20)) + "</pre>",  # no chapter
    })
    problems = check_book.check_book(book, BROWSER, tmp_path / "shots")
    assert rules_by_page(problems) == {
        "executed/smoke/02_clipped_table.html": {"clipped"},
        "executed/smoke/03_output_runs_off.html": {"clipped"},
        "executed/smoke/04_unfolded_code.html": {"unfolded-code"},
        "executed/smoke/05_bare_figure.html": {"uncaptioned-figure"},
    }, "\n".join(problems)
    # clipping is found at both widths; the rest once per page
    assert [p.split(": [")[0] for p in problems if "02_clipped" in p] == [
        "executed/smoke/02_clipped_table.html @1280px", "executed/smoke/02_clipped_table.html @390px"]
    assert "overflow-x hidden: no scrollbar" in problems[0]
    assert any("03_output_runs_off.html @390px" in p and "sticks out of the main column" in p for p in problems)
    assert "executed/smoke/04_unfolded_code.html: [unfolded-code] code cell 0 shows 8 lines" in "\n".join(problems)
    assert any(p.startswith("executed/smoke/05_bare_figure.html: [uncaptioned-figure] figure <img> good.png has "
                            "no caption (no <figcaption>, and the next block, <h2>") for p in problems)


def test_overview_without_a_glued_number_is_reported(tmp_path):
    book = make_book(tmp_path, {
        "executed/smoke/00_overview": f"<h1>Overview</h1><p>The merged model keeps 87.5 % (typed in).</p>"
                                      f"{GOOD_CHAPTER}",
        "executed/smoke/01_good": f"<h1>Good</h1>{GOOD_CHAPTER}",  # only the overview needs a glued number
    })
    assert check_book.check_book(book, BROWSER, tmp_path / "shots") == [
        "executed/smoke/00_overview.html: [no-glue] the overview glues no number into its text (0 glued values, "
        "none with a digit: use the {glue:text} role)"]


def test_legacy_shipped_waives_the_chapter_rules_on_shipped_pages_only_and_says_so(tmp_path, capsys):
    broken = code_cell(8, '<img src="IMG/good.png">') + "<h2>Next</h2>"  # unfolded code, bare figure
    book = make_book(tmp_path, {
        "shipped/cpu/00_overview": f"<h1>Overview</h1>{BANNER}{broken}",  # and no glued number
        "shipped/cpu/01_clipped": f"<h1>Clipped</h1>{BANNER}{HIDDEN_TABLE}",
        "executed/cpu/02_local": f"<h1>Local</h1>{BANNER}{broken}",  # not shipped: never waived
    })
    strict = rules_by_page(check_book.check_book(book, BROWSER, tmp_path / "shots"))
    assert strict == {"shipped/cpu/00_overview.html": {"unfolded-code", "uncaptioned-figure", "no-glue"},
                      "shipped/cpu/01_clipped.html": {"clipped"},
                      "executed/cpu/02_local.html": {"unfolded-code", "uncaptioned-figure"}}
    capsys.readouterr()
    legacy = rules_by_page(check_book.check_book(book, BROWSER, tmp_path / "shots", legacy_shipped=True))
    assert legacy == {"shipped/cpu/01_clipped.html": {"clipped"},
                      "executed/cpu/02_local.html": {"unfolded-code", "uncaptioned-figure"}}
    err = capsys.readouterr().err
    assert "--legacy-shipped: 3 problems" in err and "WAIVED" in err and "shipped/cpu/00_overview.html" in err
    # --legacy-chapters waives the same rules on every chapter, and never the clipping rule
    chapters = rules_by_page(check_book.check_book(book, BROWSER, tmp_path / "shots", legacy_chapters=True))
    assert chapters == {"shipped/cpu/01_clipped.html": {"clipped"}}
    assert "--legacy-chapters: 5 problems" in capsys.readouterr().err


def test_problem_lines_name_their_rule():
    assert check_book.rule_of("shipped/cpu/01_data.html @390px: [clipped] <div> cut off") == "clipped"
    assert check_book.rule_of("findings.html: [heading] no <h1> heading") == "heading"
    assert check_book.waivable("shipped/cpu/00_overview.html: [no-glue] the overview glues no number")
    assert not check_book.waivable("shipped/cpu/00_overview.html @390px: [clipped] <div> cut off")
    assert not check_book.waivable("executed/cpu/00_overview.html: [no-glue] the overview glues no number")
    assert check_book.waivable("executed/cpu/00_overview.html: [no-glue] the overview glues no number",
                               check_book.CHAPTER_DIRS)


def test_screenshots_go_to_the_scale_of_the_last_build(tmp_path):
    assert check_book.screenshots_dir(tmp_path) == tmp_path / "_build" / "screenshots"
    (tmp_path / "_build").mkdir()
    (tmp_path / "_build" / ".esmerge_scale").write_text("cpu")
    assert check_book.screenshots_dir(tmp_path) == tmp_path / "_build" / "screenshots" / "cpu"
